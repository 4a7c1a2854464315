//! The store-trait conformance suite (`storage::testing::conformance`) run against the redb
//! store, in memory and in a file, plus what only the redb file can show: no plaintext secret
//! in its bytes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::cell::RefCell;

use lark_service::storage::testing::conformance::{checks, fleet_checks, run_all, run_fleet};
use lark_service::storage::{
    AuthSession, Backend, Key, Keyring, SessionStore, Store, StoreOptions, TokenStore, UserToken,
};
use secrecy::SecretString;

fn ring() -> Keyring {
    Keyring::new(Key::from_bytes(&[9; 32]), vec![])
}

fn run_each<B: Backend>(make: impl Fn() -> B) {
    for (name, check) in checks::<B>() {
        eprintln!("conformance check {name}");
        if let Err(e) = check(&make()) {
            panic!("conformance check {name} failed: {e}");
        }
    }
}

#[test]
fn redb_in_memory_passes_the_conformance_suite() {
    run_each(|| Store::open_in_memory(ring(), StoreOptions::default()).unwrap());
}

#[test]
fn redb_file_passes_the_conformance_suite() {
    let dirs = RefCell::new(Vec::new());
    run_each(|| {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Store::open(&dir.path().join("s.redb"), ring(), StoreOptions::default()).unwrap();
        dirs.borrow_mut().push(dir);
        store
    });
}

/// The fleet checks on redb: one file cannot be opened twice, so the second handle is a clone
/// of the first (the races go through redb's one-writer transactions).
#[test]
fn redb_clones_pass_the_fleet_checks() {
    for (name, check) in fleet_checks::<Store>() {
        eprintln!("fleet check {name}");
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(&dir.path().join("s.redb"), ring(), StoreOptions::default()).unwrap();
        if let Err(e) = check(&a, &a.clone()) {
            panic!("fleet check {name} failed: {e}");
        }
    }
    run_fleet(|| {
        let a = Store::open_in_memory(ring(), StoreOptions::default()).unwrap();
        (a.clone(), a)
    })
    .unwrap();
}

#[test]
fn run_all_runs_every_check_on_a_fresh_backend() {
    let made = RefCell::new(0usize);
    run_all(|| {
        *made.borrow_mut() += 1;
        Store::open_in_memory(ring(), StoreOptions::default()).unwrap()
    })
    .unwrap();
    assert_eq!(*made.borrow(), checks::<Store>().len());
}

/// Sealed at rest (redb only): after writing secrets through the traits, the file's bytes
/// hold none of them.
#[test]
fn redb_file_holds_no_plaintext_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let secrets = [
        "access-PLAINTEXT-4f1c9a",
        "refresh-PLAINTEXT-77be02",
        "pkce-PLAINTEXT-c0ffee",
        "token-access-PLAINTEXT-ab12",
        "token-refresh-PLAINTEXT-cd34",
        "device-code-PLAINTEXT-9e7d",
    ];
    let device_session = lark_service::storage::SessionId::random();
    {
        let store = Store::open(&path, ring(), StoreOptions::default()).unwrap();
        let s = &store;
        {
            let mut sess = AuthSession::new_pending("cli_app", "u1", vec![], 1, 1000);
            sess.access_token = Some(SecretString::from(secrets[0].to_owned()));
            sess.refresh_token = Some(SecretString::from(secrets[1].to_owned()));
            sess.pkce_verifier = Some(SecretString::from(secrets[2].to_owned()));
            SessionStore::put_session(s, &sess).unwrap();
            TokenStore::put_token(
                s,
                &UserToken {
                    app_id: "cli_app".into(),
                    user_id: "u1".into(),
                    open_id: None,
                    access_token: SecretString::from(secrets[3].to_owned()),
                    refresh_token: Some(SecretString::from(secrets[4].to_owned())),
                    expires_at: 10,
                    refresh_expires_at: None,
                    refresh_due_at: 5,
                    scopes: vec![],
                    obtained_at: 1,
                    session_id: Some(sess.session_id),
                    needs_reauth: false,
                    refresh_in_doubt_since: None,
                },
            )
            .unwrap();
            s.put_device_poll(&lark_service::storage::DevicePoll {
                session_id: device_session,
                app_id: "cli_app".into(),
                device_code: SecretString::from(secrets[5].to_owned()),
                interval_ms: 5_000,
                expires_at: 600_000,
            })
            .unwrap();
        }
    }
    let bytes = std::fs::read(&path).unwrap();
    for s in secrets {
        assert!(
            !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
            "{s} found in clear in the store file"
        );
    }
    // And the secrets were really written (read back through a reopened store).
    let store = Store::open(&path, ring(), StoreOptions::default()).unwrap();
    assert!(TokenStore::get_token(&store, "cli_app", "u1")
        .unwrap()
        .is_some());
    use secrecy::ExposeSecret;
    assert_eq!(
        store
            .get_device_poll(device_session)
            .unwrap()
            .unwrap()
            .device_code
            .expose_secret(),
        secrets[5]
    );
}
