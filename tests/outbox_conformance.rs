//! The outbox conformance checks (`storage::testing::outbox_conformance`) against the redb
//! store, in memory and in a file, and the schema-7 migration that seeds the users' grants.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::cell::RefCell;

use lark_service::storage::testing::outbox_conformance::{checks, run_all};
use lark_service::storage::testing::set_schema_version;
use lark_service::storage::{
    AuthSession, Backend, Key, Keyring, Outbox, SessionState, Store, StoreOptions, UserToken,
};
use secrecy::SecretString;

fn ring() -> Keyring {
    Keyring::new(Key::from_bytes(&[5; 32]), vec![])
}

fn run_each<B: Backend + Outbox>(make: impl Fn() -> B) {
    for (name, check) in checks::<B>() {
        eprintln!("outbox conformance check {name}");
        if let Err(e) = check(&make()) {
            panic!("outbox conformance check {name} failed: {e}");
        }
    }
}

#[test]
fn redb_in_memory_passes_the_outbox_checks() {
    run_each(|| Store::open_in_memory(ring(), StoreOptions::default()).unwrap());
}

#[test]
fn redb_file_passes_the_outbox_checks() {
    let dirs = RefCell::new(Vec::new());
    run_each(|| {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Store::open(&dir.path().join("s.redb"), ring(), StoreOptions::default()).unwrap();
        dirs.borrow_mut().push(dir);
        store
    });
}

#[test]
fn run_all_runs_every_outbox_check() {
    let made = RefCell::new(0usize);
    run_all(|| {
        *made.borrow_mut() += 1;
        Store::open_in_memory(ring(), StoreOptions::default()).unwrap()
    })
    .unwrap();
    assert_eq!(*made.borrow(), checks::<Store>().len());
}

/// Outbox entries survive closing and reopening the file (what a restart relies on).
#[test]
fn outbox_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    {
        let store = Store::open(&path, ring(), StoreOptions::default()).unwrap();
        store
            .outbox_append(
                &[lark_service::storage::OutboxEvent {
                    event_id: "ev-1".into(),
                    kind: "token.revoked".into(),
                    body: b"{}".to_vec(),
                }],
                7,
            )
            .unwrap();
    }
    let store = Store::open(&path, ring(), StoreOptions::default()).unwrap();
    let got = store.outbox_pending(10).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].event_id, "ev-1");
}

/// A schema-6 file (no grants table rows) gets each token's grant on open: the creation of the
/// session that produced it, else the token's `obtained_at`.
#[test]
fn schema_6_file_gets_grants_seeded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let mut s = AuthSession::new_pending("cli_m", "u1", vec![], 1_000, 600_000);
    s.state = SessionState::Completed;
    let tok = |user: &str, session, obtained_at| UserToken {
        app_id: "cli_m".into(),
        user_id: user.into(),
        open_id: None,
        access_token: SecretString::from("at".to_owned()),
        refresh_token: Some(SecretString::from("rt".to_owned())),
        expires_at: 9_000,
        refresh_expires_at: None,
        refresh_due_at: 8_000,
        scopes: vec![],
        obtained_at,
        session_id: session,
        needs_reauth: false,
        refresh_in_doubt_since: None,
    };
    {
        let store = Store::open(&path, ring(), StoreOptions::default()).unwrap();
        store.put_session(&s).unwrap();
        // put_token records no grant (only a completion does): as a schema-6 file holds it.
        store
            .put_token(&tok("u1", Some(s.session_id), 5_000))
            .unwrap();
        store.put_token(&tok("u2", None, 3_000)).unwrap();
        assert_eq!(store.grant_of("cli_m", "u1").unwrap(), None);
    }
    set_schema_version(&path, 6).unwrap();
    let store = Store::open(&path, ring(), StoreOptions::default()).unwrap();
    assert_eq!(
        store.schema_version().unwrap(),
        lark_service::storage::tables::SCHEMA_VERSION
    );
    assert_eq!(store.grant_of("cli_m", "u1").unwrap(), Some((1_000, 0)));
    assert_eq!(store.grant_of("cli_m", "u2").unwrap(), Some((3_000, 0)));
}
