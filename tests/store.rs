//! Store behaviour: round trips, keys, rotation, schema, expiry index.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::collections::BTreeSet;
use std::time::Duration;

use lark_service::storage::{
    self, AuthSession, DevicePoll, Error, FailureReason, Key, Keyring, SessionId, SessionState,
    Store, StoreOptions, UserInfo, UserToken,
};
use proptest::prelude::*;
use secrecy::{ExposeSecret, SecretString};

fn key(byte: u8) -> Key {
    Key::from_bytes(&[byte; 32])
}

fn ring(byte: u8) -> Keyring {
    Keyring::new(key(byte), vec![])
}

fn secret(s: &str) -> SecretString {
    SecretString::from(s.to_owned())
}

fn full_session(user: &str, now: u64) -> AuthSession {
    let mut s = AuthSession::new_pending(
        "cli_app",
        user,
        vec!["contact:user".into(), "offline_access".into()],
        now,
        600_000,
    );
    s.open_id = Some(format!("ou_{user}"));
    s.union_id = Some(format!("on_{user}"));
    s.card_message_id = Some("om_card".into());
    s.access_token = Some(secret(&format!("u-access-{user}")));
    s.refresh_token = Some(secret(&format!("ur-refresh-{user}")));
    s.token_expires_at = Some(now + 7_200_000);
    s.refresh_token_expires_at = Some(now + 604_800_000);
    s.user_name = Some("Zhang San".into());
    s.user_email = Some("zs@example.com".into());
    s.avatar_url = Some("https://example.com/a.png".into());
    s.state_hash = Some([7; 32]);
    s.pkce_verifier = Some(secret("pkce-verifier-xyz"));
    s
}

fn token(user: &str, now: u64, session: Option<SessionId>) -> UserToken {
    UserToken {
        app_id: "cli_app".into(),
        user_id: user.into(),
        open_id: Some(format!("ou_{user}")),
        access_token: secret(&format!("u-access-{user}")),
        refresh_token: Some(secret(&format!("ur-refresh-{user}"))),
        expires_at: now + 7_200_000,
        refresh_expires_at: Some(now + 604_800_000),
        refresh_due_at: now + 5_760_000,
        scopes: vec!["offline_access".into()],
        obtained_at: now,
        session_id: session,
        needs_reauth: false,
        refresh_in_doubt_since: None,
    }
}

fn assert_same_session(a: &AuthSession, b: &AuthSession) {
    let e = |s: &Option<SecretString>| s.as_ref().map(|x| x.expose_secret().to_owned());
    assert_eq!(a.session_id, b.session_id);
    assert_eq!(
        (
            &a.app_id,
            &a.user_id,
            &a.open_id,
            &a.union_id,
            a.state,
            a.failure_reason,
            &a.card_message_id
        ),
        (
            &b.app_id,
            &b.user_id,
            &b.open_id,
            &b.union_id,
            b.state,
            b.failure_reason,
            &b.card_message_id
        )
    );
    assert_eq!(
        (a.created_at, a.updated_at, a.expires_at),
        (b.created_at, b.updated_at, b.expires_at)
    );
    assert_eq!(e(&a.access_token), e(&b.access_token));
    assert_eq!(e(&a.refresh_token), e(&b.refresh_token));
    assert_eq!(e(&a.pkce_verifier), e(&b.pkce_verifier));
    assert_eq!(
        (a.token_expires_at, a.refresh_token_expires_at),
        (b.token_expires_at, b.refresh_token_expires_at)
    );
    assert_eq!(a.scopes, b.scopes);
    assert_eq!(
        (&a.user_name, &a.user_email, &a.avatar_url, a.state_hash),
        (&b.user_name, &b.user_email, &b.avatar_url, b.state_hash)
    );
}

#[test]
fn every_record_type_round_trips_through_a_reopened_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let now = 1_700_000_000_000;
    let s = full_session("u1", now);
    let t = token("u1", now, Some(s.session_id));
    let user = UserInfo {
        app_id: "cli_app".into(),
        open_id: "ou_u1".into(),
        user_id: Some("u1".into()),
        union_id: None,
        name: Some("Zhang San".into()),
        email: None,
        avatar_url: None,
        updated_at: now,
    };
    {
        let store = Store::open(&path, ring(1), StoreOptions::default()).unwrap();
        store.put_session(&s).unwrap();
        store.put_token(&t).unwrap();
        store.put_user(&user).unwrap();
        assert_eq!(
            store
                .mark_events_seen(&["ev1", "ev2", "ev1"], now + 1000)
                .unwrap(),
            vec![true, true, false]
        );
        store.set_cursor("export", 42).unwrap();
    }
    let store = Store::open(&path, ring(1), StoreOptions::default()).unwrap();
    assert_same_session(&store.get_session(s.session_id).unwrap().unwrap(), &s);
    let got = store.get_token("cli_app", "u1").unwrap().unwrap();
    assert_eq!(got.access_token.expose_secret(), "u-access-u1");
    assert_eq!(got.refresh_token.unwrap().expose_secret(), "ur-refresh-u1");
    assert_eq!(
        (got.expires_at, got.refresh_due_at, got.session_id),
        (t.expires_at, t.refresh_due_at, t.session_id)
    );
    assert_eq!(store.get_user("cli_app", "ou_u1").unwrap().unwrap(), user);
    assert!(store.event_seen("ev1").unwrap());
    assert!(!store.event_seen("ev3").unwrap());
    assert_eq!(
        store.mark_events_seen(&["ev2", "ev3"], now + 1000).unwrap(),
        vec![false, true]
    );
    assert_eq!(store.cursor("export").unwrap(), Some(42));
    assert_eq!(store.sessions_for_user("cli_app", "u1").unwrap().len(), 1);
    assert_eq!(store.tokens_due(t.refresh_due_at, 10).unwrap().len(), 1);
    assert!(store
        .tokens_due(t.refresh_due_at - 1, 10)
        .unwrap()
        .is_empty());
    let c = store.counts().unwrap();
    assert_eq!((c.sessions, c.tokens, c.users, c.seen_events), (1, 1, 1, 3));
}

#[test]
fn secrets_are_not_stored_in_clear() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = Store::open(&path, ring(1), StoreOptions::default()).unwrap();
    let s = full_session("u1", 1);
    store.put_session(&s).unwrap();
    store.put_token(&token("u1", 1, None)).unwrap();
    drop(store);
    let bytes = std::fs::read(&path).unwrap();
    for needle in ["u-access-u1", "ur-refresh-u1", "pkce-verifier-xyz"] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{needle} found in clear in the file"
        );
    }
}

#[test]
fn wrong_key_is_rejected_with_the_key_id() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let id = key(1).id();
    drop(Store::open(&path, ring(1), StoreOptions::default()).unwrap());
    let err = Store::open(&path, ring(2), StoreOptions::default()).unwrap_err();
    assert!(
        matches!(err, Error::WrongKey { store_key, .. } if store_key == id),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with("token key does not match the store: key id "),
        "{msg}"
    );
    assert!(msg.contains(&id.to_string()), "{msg}");
}

#[test]
fn a_record_moved_to_another_row_does_not_decrypt() {
    let store = Store::open_in_memory(ring(1), StoreOptions::default()).unwrap();
    let a = full_session("ua", 1);
    let b = full_session("ub", 1);
    store.put_session(&a).unwrap();
    store.put_session(&b).unwrap();
    store
        .testing_copy_session_row(a.session_id, b.session_id)
        .unwrap();
    let err = store.get_session(b.session_id).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Decrypt {
                table: "sessions",
                ..
            }
        ),
        "{err:?}"
    );
    // Tokens too: a's token row copied over b's.
    store.put_token(&token("ua", 1, None)).unwrap();
    store.put_token(&token("ub", 1, None)).unwrap();
    store.testing_copy_token_row("cli_app", "ua", "ub").unwrap();
    let err = store.get_token("cli_app", "ub").unwrap_err();
    assert!(
        matches!(
            err,
            Error::Decrypt {
                table: "tokens",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(store.get_token("cli_app", "ua").is_ok());
}

#[test]
fn a_record_under_a_key_that_is_not_configured_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let s = full_session("u1", 1);
    {
        // Written under key 1, then rotated to key 2 only part-way is impossible to fake
        // without raw access, so: store under key 1 with key 2 active and key 1 previous.
        let store = Store::open(&path, ring(1), StoreOptions::default()).unwrap();
        store.put_session(&s).unwrap();
    }
    {
        let store = Store::open(
            &path,
            Keyring::new(key(2), vec![key(1)]),
            StoreOptions::default(),
        )
        .unwrap();
        // Readable while key 1 is still configured as previous.
        assert_same_session(&store.get_session(s.session_id).unwrap().unwrap(), &s);
        assert!(store.rotation_pending().unwrap());
    }
    // Key 2 alone does not open a store whose records and key check are under key 1.
    let err = Store::open(&path, ring(2), StoreOptions::default()).unwrap_err();
    assert!(matches!(err, Error::WrongKey { .. }), "{err:?}");
}

#[test]
fn rotation_reseals_everything_and_the_old_key_is_no_longer_needed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let sessions: Vec<AuthSession> = (0..250)
        .map(|i| full_session(&format!("u{i}"), 1))
        .collect();
    {
        let store = Store::open(&path, ring(1), StoreOptions::default()).unwrap();
        for s in &sessions {
            store.put_session(s).unwrap();
            store
                .put_token(&token(&s.user_id, 1, Some(s.session_id)))
                .unwrap();
        }
    }
    {
        let store = Store::open(
            &path,
            Keyring::new(key(2), vec![key(1)]),
            StoreOptions::default(),
        )
        .unwrap();
        let before = store.key_status().unwrap();
        assert!(before.rotation_pending);
        assert_eq!(
            before.sealed_fields_by_key.get(&key(1).id().to_string()),
            Some(&(250 * 3 + 250 * 2))
        );
        let mut calls = 0;
        let report = store
            .rotate_keys(64, &mut |done, total| {
                calls += 1;
                assert!(done <= total);
            })
            .unwrap();
        assert_eq!(report.scanned, 500);
        assert_eq!(report.resealed, 500);
        assert!(calls >= 8, "progress reported per batch, got {calls}");
        let after = store.key_status().unwrap();
        assert!(!after.rotation_pending);
        assert_eq!(after.sealed_fields_by_key.len(), 1);
        // A second run has nothing to do.
        assert_eq!(store.rotate_keys(64, &mut |_, _| {}).unwrap().resealed, 0);
    }
    let store = Store::open(&path, ring(2), StoreOptions::default()).unwrap();
    for s in &sessions {
        assert_same_session(&store.get_session(s.session_id).unwrap().unwrap(), s);
        let t = store.get_token("cli_app", &s.user_id).unwrap().unwrap();
        assert_eq!(
            t.access_token.expose_secret(),
            format!("u-access-{}", s.user_id)
        );
    }
    drop(store);
    assert!(matches!(
        Store::open(&path, ring(1), StoreOptions::default()).unwrap_err(),
        Error::WrongKey { .. }
    ));
}

fn device_poll(code: &str) -> DevicePoll {
    DevicePoll {
        session_id: SessionId::random(),
        app_id: "cli_app".into(),
        device_code: secret(code),
        interval_ms: 5_000,
        expires_at: 600_000,
    }
}

/// A pending device poll survives a rotation that retires the old key: after it, a store
/// holding only the new key opens the device code (sealed again, in batches).
#[test]
fn rotation_reseals_device_polls_and_the_old_key_is_no_longer_needed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let polls: Vec<DevicePoll> = (0..5)
        .map(|i| device_poll(&format!("dc-rotate-{i}")))
        .collect();
    {
        let store = Store::open(&path, ring(1), StoreOptions::default()).unwrap();
        for p in &polls {
            store.put_device_poll(p).unwrap();
        }
    }
    {
        let store = Store::open(
            &path,
            Keyring::new(key(2), vec![key(1)]),
            StoreOptions::default(),
        )
        .unwrap();
        let before = store.key_status().unwrap();
        assert!(before.rotation_pending);
        assert_eq!(
            before.sealed_fields_by_key.get(&key(1).id().to_string()),
            Some(&5),
            "{before:?}"
        );
        // Batches of 2: the device polls take several write transactions.
        let report = store.rotate_keys(2, &mut |_, _| {}).unwrap();
        assert_eq!((report.scanned, report.resealed), (5, 5));
        let after = store.key_status().unwrap();
        assert!(!after.rotation_pending, "{after:?}");
        assert_eq!(
            after.sealed_fields_by_key.get(&key(2).id().to_string()),
            Some(&5),
            "{after:?}"
        );
        assert_eq!(store.rotate_keys(2, &mut |_, _| {}).unwrap().resealed, 0);
    }
    let store = Store::open(&path, ring(2), StoreOptions::default()).unwrap();
    for p in &polls {
        let got = store.get_device_poll(p.session_id).unwrap().unwrap();
        assert_eq!(
            got.device_code.expose_secret(),
            p.device_code.expose_secret()
        );
        assert_eq!(
            (got.app_id.as_str(), got.interval_ms, got.expires_at),
            ("cli_app", 5_000, 600_000)
        );
    }
}

/// A device code left under an older key while the key check is already under the active one
/// (a rotation by a build that did not re-seal device polls) makes the rotation pending, and
/// the next rotation re-seals it.
#[test]
fn a_device_code_under_an_older_key_makes_the_rotation_pending() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    // The key check under key 2 ...
    drop(Store::open(&path, ring(2), StoreOptions::default()).unwrap());
    // ... and a device code sealed under key 1 (active in that ring, key 2 kept for reading).
    let p = device_poll("dc-left-behind");
    {
        let store = Store::open(
            &path,
            Keyring::new(key(1), vec![key(2)]),
            StoreOptions::default(),
        )
        .unwrap();
        store.put_device_poll(&p).unwrap();
    }
    let store = Store::open(
        &path,
        Keyring::new(key(2), vec![key(1)]),
        StoreOptions::default(),
    )
    .unwrap();
    assert_eq!(
        store.key_status().unwrap().store_key,
        key(2).id().to_string()
    );
    assert!(store.rotation_pending().unwrap());
    assert!(store.key_status().unwrap().rotation_pending);
    assert_eq!(store.rotate_keys(16, &mut |_, _| {}).unwrap().resealed, 1);
    assert!(!store.rotation_pending().unwrap());
    drop(store);
    let store = Store::open(&path, ring(2), StoreOptions::default()).unwrap();
    let got = store.get_device_poll(p.session_id).unwrap().unwrap();
    assert_eq!(got.device_code.expose_secret(), "dc-left-behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_runs_online_while_writes_continue() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    {
        let store = Store::open(&path, ring(1), StoreOptions::default()).unwrap();
        for i in 0..300 {
            store
                .put_session(&full_session(&format!("u{i}"), 1))
                .unwrap();
        }
    }
    let store = Store::open(
        &path,
        Keyring::new(key(2), vec![key(1)]),
        StoreOptions::default(),
    )
    .unwrap();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..100 {
                let s = full_session(&format!("w{i}"), 2);
                ids.push(s.session_id);
                store.run(move |st| st.put_session(&s)).await.unwrap();
            }
            ids
        })
    };
    let report = store
        .run(|st| st.rotate_keys(16, &mut |_, _| {}))
        .await
        .unwrap();
    let ids = writer.await.unwrap();
    assert!(report.scanned >= 300);
    assert!(!store.key_status().unwrap().rotation_pending);
    drop(store);
    let store = Store::open(&path, ring(2), StoreOptions::default()).unwrap();
    for id in ids {
        assert!(store.get_session(id).unwrap().is_some());
    }
    assert_eq!(store.counts().unwrap().sessions, 400);
}

#[test]
fn a_newer_schema_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    drop(Store::open(&path, ring(1), StoreOptions::default()).unwrap());
    storage::testing::set_schema_version(&path, storage::tables::SCHEMA_VERSION + 1).unwrap();
    let err = Store::open(&path, ring(1), StoreOptions::default()).unwrap_err();
    assert!(
        matches!(err, Error::NewerSchema { found, .. } if found == storage::tables::SCHEMA_VERSION + 1),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("newer than this build supports"),
        "{err}"
    );
}

#[test]
fn a_schema_1_file_is_migrated_and_keeps_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.redb");
    let now = 1_000_000;
    let mut pending = full_session("p", now);
    pending.expires_at = now + 10;
    pending.state_hash = None;
    pending.pkce_verifier = None;
    let mut done = full_session("d", now);
    done.state = SessionState::Completed;
    done.state_hash = None;
    done.pkce_verifier = None;
    storage::testing::write_schema_v1(&path, &ring(1), &[pending.clone(), done.clone()]).unwrap();
    let store = Store::open(&path, ring(1), StoreOptions::default()).unwrap();
    assert_eq!(
        store.schema_version().unwrap(),
        storage::tables::SCHEMA_VERSION
    );
    assert_same_session(
        &store.get_session(pending.session_id).unwrap().unwrap(),
        &pending,
    );
    assert_same_session(&store.get_session(done.session_id).unwrap().unwrap(), &done);
    // The rebuilt deadline index works.
    assert_eq!(
        store.pending_expired(now + 10).unwrap(),
        vec![pending.session_id]
    );
}

/// Migrating a schema-1 file to the current schema also counts its sessions per state (the
/// gauges read the counts, not the records) and gives it the leases table.
#[test]
fn a_schema_1_file_gets_state_counts_and_leases_on_migration() {
    use lark_service::storage::SessionStore;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.redb");
    let now = 1_000_000;
    let mut sessions = Vec::new();
    for (i, state) in [
        SessionState::Pending,
        SessionState::Pending,
        SessionState::Completed,
        SessionState::Revoked,
    ]
    .into_iter()
    .enumerate()
    {
        let mut s = full_session(&format!("u{i}"), now);
        s.state = state;
        s.state_hash = None;
        s.pkce_verifier = None;
        sessions.push(s);
    }
    storage::testing::write_schema_v1(&path, &ring(1), &sessions).unwrap();
    let store = Store::open(&path, ring(1), StoreOptions::default()).unwrap();
    let counts = SessionStore::count_sessions_by_state(&store).unwrap();
    let n = |st: SessionState| counts.iter().find(|c| c.0 == st).map(|c| c.1);
    assert_eq!(n(SessionState::Pending), Some(2));
    assert_eq!(n(SessionState::Completed), Some(1));
    assert_eq!(n(SessionState::Revoked), Some(1));
    assert_eq!(n(SessionState::Expired), Some(0));
    assert!(store.try_acquire_lease("sweep", "me", 1000, now).unwrap());
    assert_eq!(
        store.lease_holder("sweep", now).unwrap(),
        Some("me".to_owned())
    );
}

#[test]
fn a_locked_store_names_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let _held = Store::open(&path, ring(1), StoreOptions::default()).unwrap();
    let err = Store::open(&path, ring(1), StoreOptions::default()).unwrap_err();
    assert!(
        matches!(err, Error::Locked { pid: Some(p), .. } if p == std::process::id()),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains(&format!("locked by pid {}", std::process::id())),
        "{err}"
    );
}

#[test]
fn a_corrupt_or_truncated_file_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    std::fs::write(&path, b"this is not a redb file at all, just some bytes").unwrap();
    let before = std::fs::read(&path).unwrap();
    let err = Store::open(&path, ring(1), StoreOptions::default()).unwrap_err();
    assert!(!err.to_string().is_empty());
    assert!(
        matches!(
            err,
            Error::Corrupt { .. } | Error::Io { .. } | Error::Engine(_)
        ),
        "{err:?}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "a refused file must not be modified"
    );

    let path2 = dir.path().join("t.redb");
    {
        let store = Store::open(&path2, ring(1), StoreOptions::default()).unwrap();
        for i in 0..50 {
            store
                .put_session(&full_session(&format!("u{i}"), 1))
                .unwrap();
        }
    }
    let len = std::fs::metadata(&path2).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path2)
        .unwrap();
    f.set_len(len / 3).unwrap();
    drop(f);
    match Store::open(&path2, ring(1), StoreOptions::default()) {
        Err(e) => assert!(!e.to_string().is_empty()),
        Ok(s) => {
            // redb may repair a file cut after its last commit; then every read must still be
            // clean or a clear error, never a panic.
            let _ = s.list_sessions(None, 100);
        }
    }
}

#[test]
fn sweep_expires_pending_purges_terminal_and_forgets_events() {
    let store = Store::open_in_memory(
        ring(1),
        StoreOptions {
            terminal_retention: Duration::from_millis(1000),
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let now = 10_000;
    let mut p1 = full_session("a", now);
    p1.expires_at = now + 100;
    let mut p2 = full_session("b", now);
    p2.expires_at = now + 5000;
    let mut done = full_session("c", now);
    done.state = SessionState::Completed;
    for s in [&p1, &p2, &done] {
        store.put_session(s).unwrap();
    }
    store.mark_events_seen(&["e1"], now + 50).unwrap();
    store.mark_events_seen(&["e2"], now + 9000).unwrap();

    let r = store.sweep(now + 100, 2).unwrap();
    assert_eq!(
        r.expired.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![p1.session_id]
    );
    assert_eq!(r.events_forgotten, 1);
    assert_eq!(r.purged, 0);
    let got = store.get_session(p1.session_id).unwrap().unwrap();
    assert_eq!(got.state, SessionState::Expired);
    assert_eq!(got.failure_reason, Some(FailureReason::SessionExpired));
    assert!(!store.event_seen("e1").unwrap());
    assert!(store.event_seen("e2").unwrap());

    // Retention of 1 s after their last update: the completed one and the just-expired one go.
    let r = store.sweep(now + 1100, 2).unwrap();
    assert_eq!(r.purged, 2);
    assert!(store.get_session(done.session_id).unwrap().is_none());
    assert!(store.get_session(p1.session_id).unwrap().is_none());
    assert!(store.get_session(p2.session_id).unwrap().is_some());
    assert!(store.sessions_for_user("cli_app", "c").unwrap().is_empty());
}

#[test]
fn revoke_marks_the_session_and_deletes_its_token() {
    let store = Store::open_in_memory(ring(1), StoreOptions::default()).unwrap();
    let mut s = full_session("u", 1);
    s.state = SessionState::Completed;
    store
        .complete_session(&s, &token("u", 1, Some(s.session_id)))
        .unwrap();
    assert!(store.get_token("cli_app", "u").unwrap().is_some());
    let r = store.revoke_session(s.session_id, 5).unwrap().unwrap();
    assert_eq!(r.state, SessionState::Revoked);
    assert!(r.access_token.is_none());
    assert!(store.get_token("cli_app", "u").unwrap().is_none());
    assert!(store.tokens_due(u64::MAX - 1, 10).unwrap().is_empty());
    assert!(store.revoke_session(SessionId(12345), 5).unwrap().is_none());
}

#[test]
fn oauth_state_index_follows_the_session_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = Store::open(&path, ring(1), StoreOptions::default()).unwrap();
    let now = 1_000;
    let mut s = full_session("u", now);
    s.state_hash = Some([9; 32]);
    store.put_session(&s).unwrap();
    let mut other = full_session("v", now);
    other.state_hash = Some([8; 32]);
    other.state = SessionState::Completed;
    store.put_session(&other).unwrap();
    // Only pending sessions are reachable by their state.
    assert_eq!(
        store
            .session_by_state_hash(&[9; 32])
            .unwrap()
            .map(|x| x.session_id),
        Some(s.session_id)
    );
    assert!(store.session_by_state_hash(&[8; 32]).unwrap().is_none());
    drop(store);
    // Reopening as a schema-2 file rebuilds the index from the records.
    storage::testing::set_schema_version(&path, 2).unwrap();
    let store = Store::open(&path, ring(1), StoreOptions::default()).unwrap();
    assert_eq!(
        store.schema_version().unwrap(),
        storage::tables::SCHEMA_VERSION
    );
    assert!(store.session_by_state_hash(&[9; 32]).unwrap().is_some());
    assert!(store.session_by_state_hash(&[8; 32]).unwrap().is_none());

    // A compare-and-set with the wrong expected hash loses and writes nothing.
    let mut claimed = s.clone();
    claimed.state_hash = None;
    let lost = store
        .update_if_pending(Some([1; 32]), &claimed, None)
        .unwrap();
    assert!(matches!(lost, storage::PendingUpdate::Lost(_)));
    assert!(store.session_by_state_hash(&[9; 32]).unwrap().is_some());
    // With the right one it wins, and the state is no longer reachable.
    let won = store
        .update_if_pending(Some([9; 32]), &claimed, None)
        .unwrap();
    assert!(matches!(won, storage::PendingUpdate::Written));
    assert!(store.session_by_state_hash(&[9; 32]).unwrap().is_none());
    // The sweep expires it first; completing afterwards loses and leaves it expired.
    store.sweep(s.expires_at, 10).unwrap();
    let mut done = claimed.clone();
    done.state = SessionState::Completed;
    match store
        .update_if_pending(None, &done, Some(&token("u", now, Some(s.session_id))))
        .unwrap()
    {
        storage::PendingUpdate::Lost(cur) => assert_eq!(cur.state, SessionState::Expired),
        other => panic!("expected Lost, got {other:?}"),
    }
    assert!(store.get_token("cli_app", "u").unwrap().is_none());
    assert!(matches!(
        store
            .update_if_pending(None, &full_session("w", now), None)
            .unwrap(),
        storage::PendingUpdate::Missing
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// The deadline index returns exactly the pending sessions whose expiry is at or before
    /// `now`, across inserts, state changes and re-expiries.
    #[test]
    fn expiry_index_returns_exactly_the_expired_set(
        entries in proptest::collection::vec((0u64..1000, 0usize..3, any::<bool>(), 0u64..1000), 1..60),
        now in 0u64..1000,
    ) {
        let store = Store::open_in_memory(ring(1), StoreOptions::default()).unwrap();
        let mut model = std::collections::BTreeMap::new();
        for (i, (expires, state, rewrite, expires2)) in entries.iter().enumerate() {
            let mut s = AuthSession::new_pending("cli_app", &format!("u{}", i % 7), vec![], 0, 0);
            s.expires_at = *expires;
            s.state = [SessionState::Pending, SessionState::Completed, SessionState::Rejected][*state];
            store.put_session(&s).unwrap();
            if *rewrite {
                // Rewrite with a new expiry and back to pending: the old index entry must go.
                s.expires_at = *expires2;
                s.state = SessionState::Pending;
                store.put_session(&s).unwrap();
            }
            model.insert(s.session_id, (s.state, s.expires_at));
        }
        let want: BTreeSet<SessionId> = model
            .iter()
            .filter(|(_, (st, exp))| *st == SessionState::Pending && *exp <= now)
            .map(|(id, _)| *id)
            .collect();
        let got: BTreeSet<SessionId> = store.pending_expired(now).unwrap().into_iter().collect();
        prop_assert_eq!(&got, &want);
        let swept: BTreeSet<SessionId> = store.sweep(now, 5).unwrap().expired.into_iter().map(|e| e.0).collect();
        prop_assert_eq!(swept, want);
        prop_assert!(store.pending_expired(now).unwrap().is_empty());
    }
}

#[test]
fn change_feed_records_writes_purges_and_migration_seeds_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let now = 1_700_000_000_000;
    let mut a = full_session("a", now);
    a.state = SessionState::Completed;
    a.state_hash = None;
    a.pkce_verifier = None;
    let mut b = full_session("b", now);
    b.state = SessionState::Completed;
    b.state_hash = None;
    b.pkce_verifier = None;
    storage::testing::write_schema_v1(&path, &ring(1), &[a.clone(), b.clone()]).unwrap();
    let opts = StoreOptions {
        terminal_retention: std::time::Duration::from_secs(1),
        ..StoreOptions::default()
    };
    let store = Store::open(&path, ring(1), opts).unwrap();
    // Migration seeds one upsert per session.
    let seeded = store.changes_after(0, 100).unwrap();
    assert_eq!(seeded.len(), 2);
    assert!(seeded
        .iter()
        .all(|(_, k, _)| *k == storage::ChangeKind::Upsert));
    assert_eq!(store.last_change_seq().unwrap(), 2);
    // A write appends.
    store.put_session(&a).unwrap();
    let c = store.changes_after(2, 100).unwrap();
    assert_eq!(c, vec![(3, storage::ChangeKind::Upsert, a.session_id)]);
    // The export row carries the sealed bytes, not the token.
    let e = store.export_row(a.session_id).unwrap().unwrap();
    let ct = e.access_token.unwrap();
    assert_eq!(ct.key_id, store.active_key_id().to_string());
    assert!(ct.bytes.len() > 24 + 16);
    // The sweep's purge appends tombstones.
    store.sweep(now + 10_000_000, 100).unwrap();
    let c = store.changes_after(3, 100).unwrap();
    assert_eq!(c.len(), 2);
    assert!(c.iter().all(|(_, k, _)| *k == storage::ChangeKind::Delete));
    assert!(store.export_row(a.session_id).unwrap().is_none());
    // Pruning never makes a seq come back.
    assert_eq!(store.prune_changes(5).unwrap(), 5);
    assert!(store.changes_after(0, 100).unwrap().is_empty());
    store.put_session(&b).unwrap();
    assert_eq!(store.changes_after(0, 100).unwrap()[0].0, 6);
}

/// Issue 16: the pid file is created without following a symlink planted at its path (which
/// would make a store command overwrite another file).
#[test]
fn the_pid_file_never_follows_a_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let path = dir.path().join("s.redb");
    std::os::unix::fs::symlink(&victim, dir.path().join("s.redb.pid")).unwrap();
    let store = Store::open(&path, ring(1), StoreOptions::default()).unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    let pid = dir.path().join("s.redb.pid");
    assert!(!std::fs::symlink_metadata(&pid)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        std::fs::read_to_string(&pid).unwrap().trim(),
        std::process::id().to_string()
    );
    drop(store);
}

/// A new store is created aside and renamed into place once initialized: what a kill during
/// the creation leaves (an empty file at the path, a half-made file aside) never stops the
/// next start, and a finished creation leaves nothing aside. A file with data that is not a
/// store is still refused (never replaced).
#[test]
fn a_store_killed_while_being_created_opens_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let aside = dir.path().join("s.redb.creating");
    // What a kill right after the file was created left (before this build).
    std::fs::write(&path, b"").unwrap();
    std::fs::write(&aside, b"half a header").unwrap();
    let store = Store::open(&path, ring(1), StoreOptions::default()).unwrap();
    assert!(!aside.exists(), "the creation's file is left aside");
    let s = lark_service::storage::AuthSession::new_pending("cli_a", "u1", vec![], 1, 1_000);
    store.put_session(&s).unwrap();
    drop(store);
    let store = Store::open(&path, ring(1), StoreOptions::default()).unwrap();
    assert!(store.get_session(s.session_id).unwrap().is_some());
    drop(store);
    let other = dir.path().join("other.redb");
    std::fs::write(&other, b"not a store at all").unwrap();
    assert!(Store::open(&other, ring(1), StoreOptions::default()).is_err());
    assert_eq!(std::fs::read(&other).unwrap(), b"not a store at all");
}

/// The dispatcher's seen-id log: logged ids count as seen at once, move into `seen_events`
/// with their first record standing, and a log a crash left behind is moved when the store is
/// next opened (so a restarted process's snapshot lookups find every id).
#[test]
fn seen_log_moves_into_seen_events_and_a_crash_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let now = storage::now_ms();
    {
        let store = Store::open(&path, ring(1), StoreOptions::default()).unwrap();
        store.mark_events_seen(&["ev-old"], now + 1_000).unwrap();
        store
            .log_events_seen(&["ev-a", "ev-old", "ev-b"], now + 5_000)
            .unwrap();
        store
            .log_events_seen(&["ev-a", "ev-c"], now + 9_000)
            .unwrap();
        assert_eq!(store.seen_log_len().unwrap(), 5);
        for id in ["ev-a", "ev-b", "ev-c", "ev-old"] {
            assert!(store.event_seen(id).unwrap(), "{id} logged but not seen");
        }
        assert!(!store.event_seen("ev-z").unwrap());
        // A snapshot reads only `seen_events`: the log is not in it yet.
        let snap = store.seen_snapshot().unwrap();
        assert!(!snap.contains("ev-a").unwrap() && snap.contains("ev-old").unwrap());
        drop(snap);
        assert!(store.log_events_seen(&["ev-d", ""], now).is_err());
        assert_eq!(
            store.seen_log_len().unwrap(),
            5,
            "a refused batch logs nothing"
        );
        assert_eq!(store.merge_seen_log().unwrap(), 5);
        assert_eq!(store.merge_seen_log().unwrap(), 0);
        assert_eq!(store.seen_log_len().unwrap(), 0);
        let snap = store.seen_snapshot().unwrap();
        for id in ["ev-a", "ev-b", "ev-c", "ev-old"] {
            assert!(snap.contains(id).unwrap(), "{id} not moved");
        }
        drop(snap);
        assert_eq!(store.counts().unwrap().seen_events, 4);
        // Each id keeps its first record: ev-old its own, ev-a the first log entry's.
        let r = store.sweep(now + 1_000, 100).unwrap();
        assert_eq!(r.events_forgotten, 1);
        assert!(!store.event_seen("ev-old").unwrap());
        let r = store.sweep(now + 5_000, 100).unwrap();
        assert_eq!(
            r.events_forgotten, 2,
            "ev-a and ev-b are forgotten at their first record"
        );
        assert!(store.event_seen("ev-c").unwrap());
        // Logged, then the process dies before moving the log.
        store
            .log_events_seen(&["ev-e", "ev-f"], now + 9_000)
            .unwrap();
    }
    let store = Store::open(&path, ring(1), StoreOptions::default()).unwrap();
    assert_eq!(store.seen_log_len().unwrap(), 0, "opening moves the log");
    let snap = store.seen_snapshot().unwrap();
    for id in ["ev-c", "ev-e", "ev-f"] {
        assert!(snap.contains(id).unwrap(), "{id} lost by the restart");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// Moving the seen-id log: whatever was stored before and however ids repeat, every id
    /// keeps its first time (as `mark_events_seen` would have recorded them in order), and the
    /// sweep forgets it exactly then.
    #[test]
    fn a_moved_log_keeps_each_ids_first_time(
        stored in proptest::collection::vec((0u16..300, 1u64..50), 0..120),
        logged in proptest::collection::vec(proptest::collection::vec((0u16..300, 1u64..50), 1..40), 0..6),
    ) {
        let store = Store::open_in_memory(ring(1), StoreOptions::default()).unwrap();
        let mut want = std::collections::BTreeMap::new();
        let base = 1_000_000u64;
        for (id, at) in &stored {
            let id = format!("ev-{id:03}");
            let fresh = store.mark_events_seen(&[id.as_str()], base + at).unwrap()[0];
            if fresh {
                want.insert(id, base + at);
            }
        }
        for batch in &logged {
            // One time per batch, as the writer logs them: the batch's first entry's.
            let t = base + batch[0].1;
            let ids: Vec<String> = batch.iter().map(|(id, _)| format!("ev-{id:03}")).collect();
            for name in &ids {
                want.entry(name.clone()).or_insert(t);
            }
            let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            store.log_events_seen(&refs, t).unwrap();
        }
        store.merge_seen_log().unwrap();
        prop_assert_eq!(store.counts().unwrap().seen_events, want.len() as u64);
        for t in 1..=50u64 {
            store.sweep(base + t, 10_000).unwrap();
            for (id, at) in &want {
                prop_assert_eq!(store.event_seen(id).unwrap(), *at > base + t, "{} at {}", id, t);
            }
        }
    }
}
