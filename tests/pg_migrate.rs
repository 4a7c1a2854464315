//! `lark-service migrate --from redb --to postgres` and back with the real binary on a real,
//! throw-away PostgreSQL: everything arrives (sessions with their OAuth binding, tokens, users,
//! seen ids), still sealed and readable with the same key; counts printed and verified; a live
//! store, a live fleet and a non-empty target are refused. Also the store commands with
//! `storage.backend = "postgres"`: `sessions`, `keys` and `backup` work on the database,
//! `restore` and the redb-only commands refuse with exit 64 and say what to do.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use common::pg::Pg;
use common::Service;
use lark_service::net::{Net, NetOptions};
use lark_service::sandbox::{Sandbox, SandboxOptions, APP_ID};
use lark_service::storage::postgres::{PgOptions, PgStore};
use lark_service::storage::{
    AuthSession, Key, Keyring, Leases, SeenEvents, SessionState, SessionStore, Store, StoreOptions,
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

// ---------------------------------------------------------------------------------------------
// PostgreSQL back to redb.

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The real binary in `dir` with only `env` (and PATH), an empty config file.
fn run(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let config = dir.join("config.toml");
    std::fs::write(&config, "").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lark-service"));
    cmd.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.arg("--config")
        .arg(&config)
        .args(args)
        .output()
        .unwrap()
}

fn url_file(dir: &Path, url: &str) -> String {
    let f = dir.join("pg-url");
    std::fs::write(&f, url).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    f.display().to_string()
}

/// `migrate --from FROM --to TO` with the tests' shared key (the one `common::Service` uses).
fn migrate_dir(dir: &Path, store: &Path, url: &str, from: &str, to: &str) -> Output {
    let f = url_file(dir, url);
    let store = store.display().to_string();
    run(
        dir,
        &[
            ("STORAGE_PATH", store.as_str()),
            ("LARK_TOKEN_ENCRYPTION_KEY", common::KEY),
        ],
        &["migrate", "--from", from, "--to", to, "--url-file", &f],
    )
}

fn shared_ring() -> Keyring {
    Keyring::new(
        Key::from_hex(&SecretString::from(common::KEY.to_owned())).unwrap(),
        vec![],
    )
}

fn now() -> u64 {
    lark_service::storage::now_ms()
}

/// Sessions (pending, completed, rejected), tokens fresh for two hours, users and seen ids
/// of the sandbox's app, `n` of each kind of session.
fn fill_served(store: &Store, n: usize) {
    let at = now();
    let mut all = Vec::new();
    for i in 0..n {
        let mut s = AuthSession::new_pending(
            APP_ID,
            &format!("u{i}"),
            vec!["offline_access".into()],
            at - 1000 + i as u64,
            3_600_000,
        );
        s.pkce_verifier = Some(secret(format!("pkce-{i}")));
        let mut hash = [9u8; 32];
        hash[..8].copy_from_slice(&(i as u64).to_be_bytes());
        s.state_hash = Some(hash);
        match i % 3 {
            0 => {
                s.state = SessionState::Completed;
                s.access_token = Some(secret(format!("s-acc-{i}")));
                s.refresh_token = Some(secret(format!("s-ref-{i}")));
                store
                    .put_token(&UserToken {
                        app_id: APP_ID.into(),
                        user_id: format!("u{i}"),
                        open_id: Some(format!("ou_{i}")),
                        access_token: secret(format!("tok-acc-{i}")),
                        refresh_token: Some(secret(format!("tok-ref-{i}"))),
                        expires_at: at + 7_200_000,
                        refresh_expires_at: Some(at + 30 * 86_400_000),
                        refresh_due_at: at + 3_600_000 + i as u64,
                        scopes: vec!["offline_access".into()],
                        obtained_at: at,
                        session_id: Some(s.session_id),
                        needs_reauth: false,
                        refresh_in_doubt_since: None,
                    })
                    .unwrap();
                store
                    .put_user(&UserInfo {
                        app_id: APP_ID.into(),
                        open_id: format!("ou_{i}"),
                        user_id: Some(format!("u{i}")),
                        union_id: None,
                        name: Some(format!("User {i}")),
                        email: Some(format!("u{i}@example.com")),
                        avatar_url: None,
                        updated_at: at,
                    })
                    .unwrap();
            }
            1 => s.state = SessionState::Rejected,
            _ => {}
        }
        all.push(s);
    }
    store.put_sessions(&all).unwrap();
    let ids: Vec<String> = (0..n).map(|i| format!("ev-{i}")).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    store.mark_events_seen(&refs, at + 86_400_000).unwrap();
}

fn exposed(s: Option<&SecretString>) -> Option<String> {
    s.map(|s| s.expose_secret().to_owned())
}

/// Everything of a session, its secrets opened.
fn session_view(s: &AuthSession) -> String {
    format!(
        "{s:?} {:?} {:?} {:?}",
        exposed(s.access_token.as_ref()),
        exposed(s.refresh_token.as_ref()),
        exposed(s.pkce_verifier.as_ref())
    )
}

fn token_view(t: &UserToken) -> String {
    format!(
        "{t:?} {:?} {:?}",
        t.access_token.expose_secret(),
        exposed(t.refresh_token.as_ref())
    )
}

/// Every session, token and user of a redb store, opened, in key order.
fn contents(store: &Store) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut sessions: Vec<String> = store
        .list_sessions(None, usize::MAX)
        .unwrap()
        .iter()
        .map(|r| {
            session_view(
                &store
                    .get_session(r.session_id.parse().unwrap())
                    .unwrap()
                    .unwrap(),
            )
        })
        .collect();
    sessions.sort();
    let users = store.list_users(APP_ID).unwrap();
    let mut tokens: Vec<String> = (0..users.len() * 3)
        .filter_map(|i| store.get_token(APP_ID, &format!("u{i}")).unwrap())
        .map(|t| token_view(&t))
        .collect();
    tokens.sort();
    let users = users.iter().map(|u| format!("{u:?}")).collect();
    (sessions, tokens, users)
}

/// The round trip: redb → PostgreSQL → a new redb file, with the real binary; every
/// session, token, user and seen id arrives with the same secrets, the printed counts are the
/// real ones, and the service serves the tokens from the new file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_redb_postgres_redb_and_the_service_serves_the_copy() {
    let pg = tokio::task::spawn_blocking(Pg::start).await.unwrap();
    let url = pg.url("postgres");
    let src_dir = tempfile::tempdir().unwrap();
    let src_path = src_dir.path().join("s.redb");
    let before = {
        let store = Store::open(&src_path, shared_ring(), StoreOptions::default()).unwrap();
        fill_served(&store, 1500);
        contents(&store)
    };
    assert_eq!(
        (before.0.len(), before.1.len(), before.2.len()),
        (1500, 500, 500)
    );
    let out = migrate_dir(src_dir.path(), &src_path, &url, "redb", "postgres");
    assert!(out.status.success(), "{}", text(&out.stderr));

    let svc_dir = tempfile::tempdir().unwrap();
    let new_path = svc_dir.path().join("s.redb");
    let started = std::time::Instant::now();
    let out = migrate_dir(svc_dir.path(), &new_path, &url, "postgres", "redb");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    eprintln!(
        "{stdout}(1500 sessions, 500 tokens, 500 users, 1500 ids back in {:?})",
        started.elapsed()
    );
    assert!(
        stdout.contains(
            "migrated 1500 sessions, 500 tokens, 500 users, 1500 seen event ids from PostgreSQL to"
        ) && stdout.contains("counts verified"),
        "{stdout}"
    );
    // A progress line every batch of 500 rows.
    for line in [
        "migrate: 500 sessions copied",
        "migrate: 1000 sessions copied",
        "migrate: 1500 sessions copied",
        "migrate: 500 tokens copied",
        "migrate: 1500 seen events copied",
    ] {
        assert!(stderr.contains(line), "{line}: {stderr}");
    }

    {
        let back = Store::open(&new_path, shared_ring(), StoreOptions::default()).unwrap();
        let after = contents(&back);
        assert!(after.0 == before.0, "sessions differ after the round trip");
        assert!(after.1 == before.1, "tokens differ after the round trip");
        assert_eq!(after.2, before.2, "users differ after the round trip");
        assert!(back.event_seen("ev-1499").unwrap());
        assert_eq!(
            back.mark_events_seen(&["ev-7", "ev-new"], 1).unwrap(),
            vec![false, true],
            "a redelivery after the move back is still a duplicate"
        );
        // The indexes came with the rows: the OAuth state, the refresh queue, the counts.
        let mut hash = [9u8; 32];
        hash[..8].copy_from_slice(&2u64.to_be_bytes());
        assert_eq!(
            back.session_by_state_hash(&hash)
                .unwrap()
                .map(|s| s.user_id),
            Some("u2".to_owned())
        );
        assert_eq!(back.tokens_due(u64::MAX / 2, 10_000).unwrap().len(), 500);
        let counts = back.count_sessions_by_state().unwrap();
        for want in [
            (SessionState::Completed, 500),
            (SessionState::Rejected, 500),
            (SessionState::Pending, 500),
        ] {
            assert!(counts.contains(&want), "{counts:?}");
        }
        // No secret in clear in the file.
        drop(back);
        let bytes = std::fs::read(&new_path).unwrap();
        for needle in ["tok-acc-3", "tok-ref-3", "pkce-4", "s-acc-6"] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{needle} in clear in the redb file"
            );
        }
    }

    // The service serves the copied tokens from the new file.
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let svc = Service::start_in(svc_dir, &sandbox, &[]).await;
    for (user, want) in [
        ("u0", "tok-acc-0"),
        ("u3", "tok-acc-3"),
        ("ou_3", "tok-acc-3"),
        ("u1497", "tok-acc-1497"),
    ] {
        let (status, body) = svc.get(&format!("/api/v1/users/{user}/token")).await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        assert_eq!(
            (status, v["access_token"].as_str()),
            (200, Some(want)),
            "{user}: {body}"
        );
    }
    let (status, _) = svc.get("/api/v1/users/u1/token").await;
    assert_eq!(status, 404, "a rejected session left no token");
    assert_eq!(sandbox.hits("oauth_token"), 0, "nothing was refreshed");
    svc.stop().await;
}

fn pg_store(url: &str) -> PgStore {
    let net = Net::new(&NetOptions::default()).unwrap();
    PgStore::open(url, &net, shared_ring(), PgOptions::default()).unwrap()
}

fn one_session(user: &str) -> AuthSession {
    let mut s = AuthSession::new_pending(APP_ID, user, vec![], now(), 600_000);
    s.pkce_verifier = Some(secret(format!("pkce-{user}")));
    s
}

/// A database a fleet still serves from (an unexpired lease) is refused, and no file is left
/// behind; an expired lease is not a live instance. A target file that holds data is refused
/// and kept as it was; an empty one is filled.
#[test]
fn migrate_back_refuses_a_live_fleet_and_a_target_that_holds_data() {
    let pg = Pg::start();
    let url = pg.url("postgres");
    let store = pg_store(&url);
    store
        .put_sessions(&[one_session("a"), one_session("b")])
        .unwrap();
    assert!(store
        .try_acquire_lease("worker/ttl_sweep", "host-1/4242/live", 60_000, now())
        .unwrap());
    // Lapsed long ago: a dead instance.
    assert!(store
        .try_acquire_lease("refresh/x/y", "host-2/1/dead", 1_000, now() - 3_600_000)
        .unwrap());

    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("back.redb");
    let out = migrate_dir(dir.path(), &target, &url, "postgres", "redb");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("still serve") && err.contains("host-1/4242/live"),
        "{err}"
    );
    assert!(
        !err.contains("host-2/1/dead"),
        "a lapsed lease is no instance: {err}"
    );
    assert!(!target.exists(), "the refused run left a file behind");

    store
        .release_lease("worker/ttl_sweep", "host-1/4242/live")
        .unwrap();

    // A target that holds data: refused, kept as it was.
    {
        let other = Store::open(&target, shared_ring(), StoreOptions::default()).unwrap();
        other.put_session(&one_session("local")).unwrap();
    }
    let out = migrate_dir(dir.path(), &target, &url, "postgres", "redb");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("not empty"), "{err}");
    {
        let kept = Store::open(&target, shared_ring(), StoreOptions::default()).unwrap();
        assert_eq!(
            kept.counts().unwrap().sessions,
            1,
            "the existing file was changed"
        );
    }

    // A target held by a running service: refused by its lock.
    std::fs::remove_file(&target).unwrap();
    {
        let _live = Store::open(&target, shared_ring(), StoreOptions::default()).unwrap();
        let out = migrate_dir(dir.path(), &target, &url, "postgres", "redb");
        let err = text(&out.stderr);
        assert!(!out.status.success() && err.contains("locked"), "{err}");
    }

    // The same file, existing but empty, and no live instance: copied.
    let out = migrate_dir(dir.path(), &target, &url, "postgres", "redb");
    let (stdout, err) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}{err}");
    assert!(
        stdout.contains("migrated 2 sessions, 0 tokens, 0 users, 0 seen event ids"),
        "{stdout}"
    );
    let back = Store::open(&target, shared_ring(), StoreOptions::default()).unwrap();
    let users: Vec<String> = back
        .list_sessions(None, 10)
        .unwrap()
        .into_iter()
        .map(|s| s.user_id)
        .collect();
    assert_eq!(users.len(), 2);
    assert!(users.contains(&"a".to_owned()) && users.contains(&"b".to_owned()));

    // Same backend on both sides is a usage error.
    let out = migrate_dir(dir.path(), &target, &url, "redb", "redb");
    assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));
}

/// Into an empty database a fleet already serves from: refused (its writes would mix with the
/// copy), nothing written.
#[test]
fn migrate_into_a_database_a_fleet_serves_from_is_refused() {
    let pg = Pg::start();
    let url = pg.url("postgres");
    let target = pg_store(&url);
    assert!(target
        .try_acquire_lease("worker/export_postgres", "host-3/77/live", 60_000, now())
        .unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    {
        let store = Store::open(&path, shared_ring(), StoreOptions::default()).unwrap();
        store.put_session(&one_session("f")).unwrap();
    }
    let out = migrate_dir(dir.path(), &path, &url, "redb", "postgres");
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("still serve") && err.contains("host-3/77/live"),
        "{err}"
    );
    assert_eq!(target.counts().unwrap().sessions, 0, "something was copied");
}

// ---------------------------------------------------------------------------------------------
// The store commands with storage.backend = "postgres".

/// `sessions list/show`, `keys status`, `keys rotate` and `backup` work on the PostgreSQL store
/// (never a local file); `restore` and the commands that only work on a redb file refuse with
/// exit 64 and say what to do instead. No local store file is ever created.
#[test]
fn store_commands_on_postgres_read_the_database_or_refuse_with_what_to_do() {
    let pg = Pg::start();
    let url = pg.url("postgres");
    let store = pg_store(&url);
    let sessions = [one_session("pa"), one_session("pb"), one_session("pc")];
    store.put_sessions(&sessions).unwrap();
    store
        .put_token(&UserToken {
            app_id: APP_ID.into(),
            user_id: "pa".into(),
            open_id: None,
            access_token: secret("pg-acc".into()),
            refresh_token: Some(secret("pg-ref".into())),
            expires_at: now() + 7_200_000,
            refresh_expires_at: None,
            refresh_due_at: now() + 3_600_000,
            scopes: vec![],
            obtained_at: now(),
            session_id: None,
            needs_reauth: false,
            refresh_in_doubt_since: None,
        })
        .unwrap();
    let key_id = shared_ring().active_id().to_string();

    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("data").join("local.redb");
    let local_s = local.display().to_string();
    let env = [
        ("STORAGE_BACKEND", "postgres"),
        ("STORAGE_POSTGRES_URL", url.as_str()),
        ("STORAGE_PATH", local_s.as_str()),
        ("LARK_TOKEN_ENCRYPTION_KEY", common::KEY),
    ];

    let out = run(dir.path(), &env, &["sessions", "list"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for s in &sessions {
        assert!(stdout.contains(&s.session_id.to_string()), "{stdout}");
    }
    let out = run(dir.path(), &env, &["sessions", "list", "--json"]);
    assert_eq!(
        text(&out.stdout).lines().count(),
        3,
        "{}",
        text(&out.stdout)
    );
    let id = sessions[1].session_id.to_string();
    let out = run(dir.path(), &env, &["sessions", "show", &id]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        stdout.contains(&id) && stdout.contains("\"pb\""),
        "{stdout}"
    );
    assert!(!stdout.contains("pkce-pb"), "a secret printed: {stdout}");

    let out = run(dir.path(), &env, &["keys", "status"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Three PKCE verifiers, one access and one refresh token.
    assert!(
        stdout.contains(&format!("sealed fields under {key_id}: 5"))
            && stdout.contains(&format!("active key id:      {key_id}"))
            && stdout.contains("rotation pending:   no"),
        "{stdout}"
    );

    // Revoke and the sweep go to the database too.
    let id = sessions[2].session_id.to_string();
    let out = run(dir.path(), &env, &["sessions", "revoke", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        store
            .get_session(sessions[2].session_id)
            .unwrap()
            .unwrap()
            .state,
        SessionState::Revoked
    );
    let out = run(dir.path(), &env, &["sessions", "sweep"]);
    assert!(
        out.status.success() && text(&out.stdout).contains("sweep: 0 sessions expired"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    let pass = dir.path().join("pass");
    std::fs::write(&pass, "a passphrase long enough to be accepted").unwrap();
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let pass = pass.display().to_string();
    let backup = dir.path().join("b.age").display().to_string();
    let refusals: [(&[&str], &str); 2] = [
        (
            &["restore", "--from", &backup, "--passphrase-file", &pass],
            "pg_restore",
        ),
        (
            &[
                "export",
                "postgres",
                "--url-file",
                &url_file(dir.path(), &url),
            ],
            "local redb store",
        ),
    ];
    for (args, says) in refusals {
        let out = run(dir.path(), &env, args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert!(!Path::new(&backup).exists(), "a backup file was written");
    // `backup` and `keys rotate` work on the database (`tests/pg_keys.rs` checks what they
    // write): a backup file, a rotation with nothing to re-seal.
    let out = run(
        dir.path(),
        &env,
        &["backup", "--out", &backup, "--passphrase-file", &pass],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("3 sessions, 1 tokens"),
        "{}",
        text(&out.stdout)
    );
    assert!(Path::new(&backup).exists(), "no backup file");
    let out = run(dir.path(), &env, &["keys", "rotate"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("0 re-sealed"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        !local.exists() && !dir.path().join("data").exists(),
        "a local store was created beside PostgreSQL"
    );
}

/// The webhook outbox (live and dead entries) and the grants (with their reminder marks) go
/// redb → PostgreSQL → redb with `migrate`, as they were; the sequence goes on above the
/// source's on each side (a new event gets a number never handed out before).
#[test]
fn migrate_copies_the_webhook_outbox_and_the_grants_both_ways() {
    use lark_service::storage::{OutboxEvent, StoreOptions, UserToken};
    let ev = |id: &str| OutboxEvent {
        event_id: id.to_owned(),
        kind: "token.revoked".to_owned(),
        body: format!("{{\"event_id\":\"{id}\"}}").into_bytes(),
    };
    let pg = Pg::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let url = pg.url("postgres");
    let t0 = now();
    let (live, dead) = {
        let store = Store::open(&path, shared_ring(), StoreOptions::default()).unwrap();
        for (i, user) in ["u-a", "u-b"].iter().enumerate() {
            let mut s = one_session(user);
            s.state = lark_service::storage::SessionState::Completed;
            s.updated_at = t0 + i as u64;
            store
                .complete_session(
                    &s,
                    &UserToken {
                        app_id: APP_ID.into(),
                        user_id: (*user).into(),
                        open_id: Some(format!("ou_{user}")),
                        access_token: secret(format!("at-{user}")),
                        refresh_token: Some(secret(format!("rt-{user}"))),
                        expires_at: t0 + 7_200_000,
                        refresh_expires_at: None,
                        refresh_due_at: t0 + 5_000_000,
                        scopes: vec![],
                        obtained_at: t0,
                        session_id: Some(s.session_id),
                        needs_reauth: false,
                        refresh_in_doubt_since: None,
                    },
                )
                .unwrap();
        }
        assert!(store
            .mark_reminded(APP_ID, "u-a", t0, &[ev("reminded")], t0 + 5)
            .unwrap());
        store
            .outbox_append(&[ev("e1"), ev("e2"), ev("e3")], t0)
            .unwrap();
        let all = store.outbox_pending(10).unwrap();
        let mut d = all[1].clone();
        d.attempts = 12;
        d.last_error = Some("HTTP 503".into());
        assert!(store.outbox_bury(&d).unwrap());
        // The newest entry is delivered: its number must not come back.
        assert!(store.outbox_delivered(all[3].seq).unwrap());
        (
            store.outbox_pending(10).unwrap(),
            store.outbox_dead(10).unwrap(),
        )
    };
    assert_eq!((live.len(), dead.len()), (2, 1));
    let top = live.iter().chain(&dead).map(|e| e.seq).max().unwrap() + 1;

    let out = migrate_dir(dir.path(), &path, &url, "redb", "postgres");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let p = pg_store(&url);
    assert_eq!(p.outbox_pending(10).unwrap(), live);
    assert_eq!(p.outbox_dead(10).unwrap(), dead);
    assert_eq!(p.grant_of(APP_ID, "u-a").unwrap(), Some((t0, t0 + 5)));
    assert_eq!(p.grant_of(APP_ID, "u-b").unwrap(), Some((t0 + 1, 0)));
    assert_eq!(p.grants_to_remind(u64::MAX, 10).unwrap().len(), 1);
    p.outbox_append(&[ev("on-pg")], t0 + 9).unwrap();
    let on_pg = p.outbox_pending(10).unwrap();
    let new_seq = on_pg.last().unwrap().seq;
    assert!(new_seq > top, "{new_seq} not above {top}");
    drop(p);

    let back = dir.path().join("back.redb");
    let out = migrate_dir(dir.path(), &back, &url, "postgres", "redb");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r = Store::open(&back, shared_ring(), StoreOptions::default()).unwrap();
    assert_eq!(r.outbox_pending(10).unwrap(), on_pg);
    assert_eq!(r.outbox_dead(10).unwrap(), dead);
    assert_eq!(r.grant_of(APP_ID, "u-a").unwrap(), Some((t0, t0 + 5)));
    assert_eq!(r.grant_of(APP_ID, "u-b").unwrap(), Some((t0 + 1, 0)));
    r.outbox_append(&[ev("on-redb")], t0 + 10).unwrap();
    assert!(r.outbox_pending(10).unwrap().last().unwrap().seq > new_seq);
}
