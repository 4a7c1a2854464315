//! `lark-service migrate --from redb --to postgres` with the real binary on a real, throw-away
//! PostgreSQL: everything arrives (sessions with their OAuth binding, tokens, users, seen
//! ids), still sealed and readable with the same key; counts printed and verified; a live
//! store and a non-empty target are refused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use common::pg::Pg;
use lark_service::net::{Net, NetOptions};
use lark_service::storage::postgres::{PgOptions, PgStore};
use lark_service::storage::{
    AuthSession, Key, Keyring, SeenEvents, SessionState, SessionStore, Store, StoreOptions,
    TokenStore, UserInfo, UserStore, UserToken,
};
use secrecy::{ExposeSecret, SecretString};

const KEY_BYTE: u8 = 0x2a;

fn ring() -> Keyring {
    Keyring::new(Key::from_bytes(&[KEY_BYTE; 32]), vec![])
}

fn secret(s: String) -> SecretString {
    SecretString::from(s)
}

fn fill(store: &Store, n: usize) -> Vec<AuthSession> {
    let mut all = Vec::new();
    for i in 0..n {
        let mut s = AuthSession::new_pending(
            "cli_mig",
            &format!("u{i}"),
            vec!["offline_access".into()],
            1_700_000_000_000 + i as u64,
            600_000,
        );
        s.pkce_verifier = Some(secret(format!("pkce-{i}")));
        let mut hash = [7u8; 32];
        hash[..8].copy_from_slice(&(i as u64).to_be_bytes());
        s.state_hash = Some(hash);
        if i % 3 == 0 {
            s.state = SessionState::Completed;
            s.access_token = Some(secret(format!("acc-{i}")));
            s.refresh_token = Some(secret(format!("ref-{i}")));
            store
                .put_token(&UserToken {
                    app_id: "cli_mig".into(),
                    user_id: format!("u{i}"),
                    open_id: Some(format!("ou_{i}")),
                    access_token: secret(format!("tok-acc-{i}")),
                    refresh_token: Some(secret(format!("tok-ref-{i}"))),
                    expires_at: 1_800_000_000_000,
                    refresh_expires_at: None,
                    refresh_due_at: 1_790_000_000_000 + i as u64,
                    scopes: vec!["offline_access".into()],
                    obtained_at: 1_700_000_000_000,
                    session_id: Some(s.session_id),
                    needs_reauth: false,
                    refresh_in_doubt_since: None,
                })
                .unwrap();
            store
                .put_user(&UserInfo {
                    app_id: "cli_mig".into(),
                    open_id: format!("ou_{i}"),
                    user_id: Some(format!("u{i}")),
                    union_id: None,
                    name: Some(format!("User {i}")),
                    email: None,
                    avatar_url: None,
                    updated_at: 1_700_000_000_000,
                })
                .unwrap();
        }
        all.push(s);
    }
    store.put_sessions(&all).unwrap();
    let ids: Vec<String> = (0..n).map(|i| format!("ev-{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    store.mark_events_seen(&refs, 1_900_000_000_000).unwrap();
    all
}

fn migrate(dir: &Path, store: &Path, url: &str) -> Output {
    let url_file = dir.join("pg-url");
    std::fs::write(&url_file, url).unwrap();
    std::fs::set_permissions(&url_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    Command::new(env!("CARGO_BIN_EXE_lark-service"))
        .args([
            "migrate",
            "--from",
            "redb",
            "--to",
            "postgres",
            "--url-file",
        ])
        .arg(&url_file)
        .current_dir(dir)
        .env("STORAGE_PATH", store)
        .env("LARK_TOKEN_ENCRYPTION_KEY", hex::encode([KEY_BYTE; 32]))
        .output()
        .unwrap()
}

#[test]
fn migrate_copies_everything_sealed_and_verifies_counts() {
    let pg = Pg::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let sessions = {
        let store = Store::open(&path, ring(), StoreOptions::default()).unwrap();
        fill(&store, 1200)
    };
    let url = pg.url("postgres");

    // While another process holds the store, it is refused and nothing is written.
    {
        let _live = Store::open(&path, ring(), StoreOptions::default()).unwrap();
        let out = migrate(dir.path(), &path, &url);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a live store must be refused: {err}");
        assert!(err.contains("locked"), "{err}");
    }

    let out = migrate(dir.path(), &path, &url);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    eprintln!("{stdout}");
    assert!(
        stdout.contains("migrated 1200 sessions, 400 tokens, 400 users, 1200 seen event ids")
            && stdout.contains("counts verified"),
        "{stdout}"
    );

    let net = Net::new(&NetOptions::default()).unwrap();
    let target = PgStore::open(&url, &net, ring(), PgOptions::default()).unwrap();
    for s in sessions.iter().step_by(7) {
        let got = target.get_session(s.session_id).unwrap().unwrap();
        assert_eq!(
            (got.state, got.created_at, got.state_hash),
            (s.state, s.created_at, s.state_hash)
        );
        assert_eq!(
            got.pkce_verifier.map(|p| p.expose_secret().to_owned()),
            s.pkce_verifier
                .as_ref()
                .map(|p| p.expose_secret().to_owned())
        );
        assert_eq!(
            got.access_token.map(|p| p.expose_secret().to_owned()),
            s.access_token
                .as_ref()
                .map(|p| p.expose_secret().to_owned())
        );
    }
    // A pending session is still reachable by its OAuth state on the new store.
    let pending = sessions
        .iter()
        .find(|s| s.state == SessionState::Pending)
        .unwrap();
    assert_eq!(
        target
            .session_by_state_hash(&pending.state_hash.unwrap())
            .unwrap()
            .map(|s| s.session_id),
        Some(pending.session_id)
    );
    let tok = target.get_token("cli_mig", "u3").unwrap().unwrap();
    assert_eq!(tok.access_token.expose_secret(), "tok-acc-3");
    assert_eq!(target.tokens_due(u64::MAX / 2, 10_000).unwrap().len(), 400);
    assert_eq!(target.list_users("cli_mig").unwrap().len(), 400);
    assert!(target.event_seen("ev-1199").unwrap());
    assert_eq!(
        target.mark_events_seen(&["ev-5", "ev-new"], 1).unwrap(),
        vec![false, true],
        "seen ids carry over: a redelivery after the move is still a duplicate"
    );
    let counts = target.count_sessions_by_state().unwrap();
    assert!(
        counts.contains(&(SessionState::Completed, 400))
            && counts.contains(&(SessionState::Pending, 800))
    );

    // Into a store that already holds data: refused, nothing added.
    let again = migrate(dir.path(), &path, &url);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        !again.status.success() && err.contains("not empty"),
        "{err}"
    );
    assert_eq!(target.counts().unwrap().sessions, 1200);
}
