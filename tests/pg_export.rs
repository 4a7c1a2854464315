//! PostgreSQL export and import against a real PostgreSQL server (`apt-get install postgresql`).
//! Without `initdb` these tests fail: they never pass silently.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::path::Path;
use std::time::{Duration, Instant};

mod common;
use common::pg::Pg;

use lark_service::export::postgres;
use lark_service::storage::{
    AuthSession, Key, Keyring, SessionId, SessionState, Store, StoreOptions,
};
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;

fn key(b: u8) -> Key {
    Key::from_bytes(&[b; 32])
}

/// Built-in roots, no proxy: these servers speak plain TCP (sslmode's default, prefer, finds
/// no TLS offered).
fn net() -> lark_service::net::Net {
    lark_service::net::Net::new(&lark_service::net::NetOptions::default()).unwrap()
}

fn ring() -> Keyring {
    Keyring::new(key(7), vec![])
}

fn session(i: u64) -> AuthSession {
    let now = 1_700_000_000_123 + i;
    let mut s = AuthSession::new_pending(
        "cli_app",
        &format!("user{}", i % 997),
        vec!["offline_access".into(), "contact:read".into()],
        now,
        600_000,
    );
    s.open_id = Some(format!("ou_{i}"));
    if i.is_multiple_of(3) {
        s.state = SessionState::Completed;
        s.access_token = Some(SecretString::from(format!("u-access-{i}")));
        s.refresh_token = Some(SecretString::from(format!("ur-refresh-{i}")));
        s.token_expires_at = Some(now + 7_200_000);
        s.refresh_token_expires_at = Some(now + 2_592_000_000);
        s.user_name = Some(format!("User {i}"));
    }
    s
}

async fn pg_client(url: &str) -> tokio_postgres::Client {
    postgres::connect(url, &net()).await.unwrap()
}

async fn count(url: &str) -> i64 {
    match postgres::connect(url, &net()).await {
        Ok(c) => c
            .query_one("SELECT count(*) FROM user_auth_sessions", &[])
            .await
            .map_or(-1, |r| r.get(0)),
        Err(_) => -1,
    }
}

async fn check_matches_store(store: &Store, url: &str, want: usize) {
    let c = pg_client(url).await;
    let row = c
        .query_one(
            "SELECT count(*), count(DISTINCT session_id) FROM user_auth_sessions",
            &[],
        )
        .await
        .unwrap();
    let (n, distinct): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(usize::try_from(n).unwrap(), want, "row count");
    assert_eq!(distinct, n, "duplicates");
    let rows = c
        .query(
            "SELECT session_id, app_id, user_id, open_id, state,
                    (extract(epoch from created_at) * 1000)::bigint,
                    (extract(epoch from token_expires_at) * 1000)::bigint,
                    access_token_ct, refresh_token_ct, token_key_id, scopes, user_name
             FROM user_auth_sessions",
            &[],
        )
        .await
        .unwrap();
    for r in rows {
        let id: SessionId = r.get::<_, String>(0).parse().unwrap();
        let e = store
            .export_row(id)
            .unwrap()
            .expect("row of a live session");
        assert_eq!(r.get::<_, String>(1), e.app_id);
        assert_eq!(r.get::<_, String>(2), e.user_id);
        assert_eq!(r.get::<_, Option<String>>(3), e.open_id);
        assert_eq!(r.get::<_, String>(4), e.state.as_str());
        assert_eq!(u64::try_from(r.get::<_, i64>(5)).unwrap(), e.created_at);
        assert_eq!(
            r.get::<_, Option<i64>>(6)
                .map(|v| u64::try_from(v).unwrap()),
            e.token_expires_at
        );
        assert_eq!(
            r.get::<_, Option<Vec<u8>>>(7),
            e.access_token.as_ref().map(|t| t.bytes.clone())
        );
        assert_eq!(
            r.get::<_, Option<Vec<u8>>>(8),
            e.refresh_token.as_ref().map(|t| t.bytes.clone())
        );
        assert_eq!(
            r.get::<_, Option<String>>(9),
            e.access_token.as_ref().map(|t| t.key_id.clone())
        );
        assert_eq!(r.get::<_, Vec<String>>(10), e.scopes);
        assert_eq!(r.get::<_, Option<String>>(11), e.user_name);
        // Never plaintext.
        if let Some(ct) = r.get::<_, Option<Vec<u8>>>(7) {
            assert!(!String::from_utf8_lossy(&ct).contains("u-access-"));
        }
    }
    let idx: Vec<String> = c
        .query(
            "SELECT indexname::text FROM pg_indexes WHERE tablename = 'user_auth_sessions'
             ORDER BY indexname",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for want in [
        "idx_auth_session_open_id",
        "idx_auth_session_token_expires",
        "idx_auth_session_user",
    ] {
        assert!(
            idx.iter().any(|i| i == want),
            "index {want} missing: {idx:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn continuous_export_survives_a_postgres_crash_exactly_once() {
    let pg = tokio::task::spawn_blocking(Pg::start).await.unwrap();
    let url = pg.url("postgres");
    let store = Store::open_in_memory(ring(), StoreOptions::default()).unwrap();
    let all: Vec<AuthSession> = (0..10_000).map(session).collect();
    for chunk in all[..6_000].chunks(1_000) {
        store.put_sessions(chunk).unwrap();
    }
    let cancel = CancellationToken::new();
    let exporter = tokio::spawn(postgres::run_continuous(
        store.clone(),
        SecretString::from(url.clone()),
        net(),
        Duration::from_millis(50),
        Duration::from_millis(200),
        cancel.clone(),
    ));
    // Mid-way: some rows are in, not all.
    let t0 = Instant::now();
    loop {
        let n = count(&url).await;
        if n >= 500 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "export never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pg_ref = &pg;
    tokio::task::block_in_place(|| pg_ref.stop_immediate());
    // The auth path keeps writing while PostgreSQL is down.
    let started = Instant::now();
    for chunk in all[6_000..].chunks(1_000) {
        store.put_sessions(chunk).unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        store.cursor(postgres::CURSOR).unwrap().unwrap_or(0) < store.last_change_seq().unwrap(),
        "the export cannot have finished while PostgreSQL was down"
    );
    tokio::task::block_in_place(|| pg_ref.start_server());
    let t0 = Instant::now();
    loop {
        let done =
            store.cursor(postgres::CURSOR).unwrap() == Some(store.last_change_seq().unwrap());
        if done && count(&url).await == 10_000 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "export did not catch up: {} rows, cursor {:?} of {}",
            count(&url).await,
            store.cursor(postgres::CURSOR).unwrap(),
            store.last_change_seq().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cancel.cancel();
    exporter.await.unwrap();
    check_matches_store(&store, &url, 10_000).await;
    let metrics = lark_service::metrics::get().encode();
    assert!(
        metrics.contains("lark_service_export_errors_total"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_shot_export_and_import_round_trip() {
    let pg = tokio::task::spawn_blocking(Pg::start).await.unwrap();
    let url = pg.url("postgres");
    let store = Store::open_in_memory(ring(), StoreOptions::default()).unwrap();
    let all: Vec<AuthSession> = (0..1_234).map(session).collect();
    store.put_sessions(&all).unwrap();
    assert_eq!(
        postgres::export_all(&store, &url, &net()).await.unwrap(),
        1_234
    );
    assert_eq!(
        store.cursor(postgres::CURSOR).unwrap(),
        Some(store.last_change_seq().unwrap())
    );
    // Idempotent: a second export changes nothing.
    assert_eq!(
        postgres::export_all(&store, &url, &net()).await.unwrap(),
        1_234
    );
    check_matches_store(&store, &url, 1_234).await;

    let fresh = Store::open_in_memory(ring(), StoreOptions::default()).unwrap();
    assert_eq!(
        postgres::import_all(&fresh, &url, &net()).await.unwrap(),
        1_234
    );
    for s in all.iter().step_by(7) {
        let got = fresh.get_session(s.session_id).unwrap().unwrap();
        assert_eq!(got.app_id, s.app_id);
        assert_eq!(got.state, s.state);
        assert_eq!(got.created_at, s.created_at);
        assert_eq!(got.scopes, s.scopes);
        assert_eq!(
            got.access_token
                .as_ref()
                .map(|t| t.expose_secret().to_owned()),
            s.access_token
                .as_ref()
                .map(|t| t.expose_secret().to_owned())
        );
        assert_eq!(
            got.refresh_token
                .as_ref()
                .map(|t| t.expose_secret().to_owned()),
            s.refresh_token
                .as_ref()
                .map(|t| t.expose_secret().to_owned())
        );
    }

    // The Python service's table: plaintext tokens, sealed on import.
    let c = pg_client(&url).await;
    c.batch_execute("CREATE DATABASE python_svc;")
        .await
        .unwrap();
    let py_url = pg.url("python_svc");
    let py = pg_client(&py_url).await;
    py.batch_execute(
        "CREATE TABLE user_auth_sessions (
            session_id varchar(64) PRIMARY KEY, app_id varchar(64), user_id varchar(64),
            open_id varchar(64), union_id varchar(64), state varchar(32),
            failure_reason varchar(64), card_message_id varchar(64),
            created_at timestamp, updated_at timestamp, expires_at timestamp,
            access_token text, refresh_token text, token_expires_at timestamp,
            refresh_token_expires_at timestamp, scopes text, user_name varchar(128),
            user_email varchar(128), avatar_url text);
         INSERT INTO user_auth_sessions VALUES
           ('0b9e6a1c-2f3d-4e5f-8a9b-0c1d2e3f4a5b', 'cli_app', 'u1', 'ou_1', NULL, 'COMPLETED',
            NULL, 'om_1', '2024-01-01 00:00:00', '2024-01-01 00:01:00', '2024-01-01 00:10:00',
            'plain-access', 'plain-refresh', '2024-01-01 02:00:00', NULL,
            '[\"offline_access\"]', 'Ann', NULL, NULL);",
    )
    .await
    .unwrap();
    let fresh = Store::open_in_memory(ring(), StoreOptions::default()).unwrap();
    assert_eq!(
        postgres::import_all(&fresh, &py_url, &net()).await.unwrap(),
        1
    );
    let id: SessionId = "0b9e6a1c2f3d4e5f8a9b0c1d2e3f4a5b".parse().unwrap();
    let got = fresh.get_session(id).unwrap().unwrap();
    assert_eq!(got.state, SessionState::Completed);
    assert_eq!(got.access_token.unwrap().expose_secret(), "plain-access");
    assert_eq!(got.scopes, vec!["offline_access".to_owned()]);
    assert_eq!(got.created_at, 1_704_067_200_000);
    let e = fresh.export_row(id).unwrap().unwrap();
    assert!(!String::from_utf8_lossy(&e.access_token.unwrap().bytes).contains("plain-access"));
}

/// A store that ran without an exporter (change feed off) has a gap in its feed: the
/// continuous export, once configured, copies every session first, then follows the feed.
/// And an import never panics on a bad row: it names the row and the column.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_exporter_after_a_feed_gap_copies_everything_and_bad_rows_are_named() {
    let pg = tokio::task::spawn_blocking(Pg::start).await.unwrap();
    let url = pg.url("postgres");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let opts = |change_feed| StoreOptions {
        change_feed,
        ..StoreOptions::default()
    };
    let all: Vec<AuthSession> = (0..30).map(session).collect();
    {
        let store = Store::open(&path, ring(), opts(true)).unwrap();
        store.put_sessions(&all[..10]).unwrap();
    }
    {
        let store = Store::open(&path, ring(), opts(false)).unwrap();
        store.put_sessions(&all[10..25]).unwrap();
        store.sweep(0, 100).unwrap();
        assert!(store.changes_after(0, 100).unwrap().is_empty());
    }
    let store = Store::open(&path, ring(), opts(true)).unwrap();
    store.put_sessions(&all[25..]).unwrap();
    let mut client = pg_client(&url).await;
    postgres::migrate(&mut client).await.unwrap();
    while postgres::export_changes_once(&store, &mut client)
        .await
        .unwrap()
        > 0
    {}
    assert_eq!(
        store.cursor(postgres::CURSOR).unwrap(),
        Some(store.last_change_seq().unwrap())
    );
    check_matches_store(&store, &url, 30).await;
    // Caught up: the feed is pruned up to the exporter's cursor.
    store.put_session(&all[0]).unwrap();
    assert!(
        postgres::export_changes_once(&store, &mut client)
            .await
            .unwrap()
            > 0
    );
    assert!(store.sweep(0, 100).unwrap().changes_pruned > 0);
    assert!(store
        .changes_after(0, 100)
        .unwrap()
        .iter()
        .all(|c| Some(c.0) > store.cursor(postgres::CURSOR).unwrap()));

    // A table of another shape, with a NULL where a value is required.
    client
        .batch_execute("CREATE DATABASE bad_rows;")
        .await
        .unwrap();
    let bad_url = pg.url("bad_rows");
    let bad = pg_client(&bad_url).await;
    bad.batch_execute(
        "CREATE TABLE user_auth_sessions (session_id text, app_id text, user_id text, state text);
         INSERT INTO user_auth_sessions VALUES
           ('0b9e6a1c2f3d4e5f8a9b0c1d2e3f4a5b', NULL, 'u1', 'pending');",
    )
    .await
    .unwrap();
    let fresh = Store::open_in_memory(ring(), StoreOptions::default()).unwrap();
    let err = postgres::import_all(&fresh, &bad_url, &net())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, postgres::ExportError::BadColumn { row, column: "app_id", .. }
            if row == "session 0b9e6a1c2f3d4e5f8a9b0c1d2e3f4a5b"),
        "{msg}"
    );
    bad.batch_execute("UPDATE user_auth_sessions SET app_id = 'cli_app', session_id = NULL;")
        .await
        .unwrap();
    let err = postgres::import_all(&fresh, &bad_url, &net())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, postgres::ExportError::BadColumn { row, column: "session_id", .. }
            if row == "row 1"),
        "{err}"
    );
}

/// A CA and a server certificate for 127.0.0.1 signed by it: (CA PEM, cert PEM, key PEM).
fn test_ca_and_server_cert() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca_cert.pem(), leaf.pem(), key.serialize_pem())
}

fn net_trusting(ca_pem: &str, dir: &Path) -> lark_service::net::Net {
    let f = dir.join("company-ca.pem");
    std::fs::write(&f, ca_pem).unwrap();
    lark_service::net::Net::new(&lark_service::net::NetOptions {
        trust: lark_service::net::TrustOptions {
            ca_files: vec![f],
            ca_dirs: vec![],
        },
        ..lark_service::net::NetOptions::default()
    })
    .unwrap()
}

#[tokio::test]
async fn export_over_tls_verifies_the_server_certificate_and_honours_sslmode() {
    let (ca, cert, key) = test_ca_and_server_cert();
    let pg = Pg::start_tls(&cert, &key);
    let scratch = tempfile::tempdir().unwrap();
    let trusted = net_trusting(&ca, scratch.path());
    let url = |mode: &str| format!("{}?sslmode={mode}", pg.url("postgres"));

    // require (and libpq's verify-full) with the CA trusted: the session is encrypted.
    for mode in ["require", "verify-full", "prefer"] {
        let c = postgres::connect(&url(mode), &trusted).await.unwrap();
        let ssl: bool = c
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(ssl, "sslmode={mode} uses TLS when the server offers it");
    }

    // The CA not trusted: refused with words that name the host and how to add a CA.
    let err = postgres::connect(&url("require"), &net())
        .await
        .map(|_| ())
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("not trusted") && msg.contains("127.0.0.1") && msg.contains("tls.ca_file"),
        "{msg}"
    );
    // `prefer` does not fall back to plain text when the certificate is bad.
    assert!(postgres::connect(&url("prefer"), &net()).await.is_err());

    // A whole export over TLS.
    let store = Store::open_in_memory(ring(), StoreOptions::default()).unwrap();
    let all: Vec<AuthSession> = (0..50).map(session).collect();
    store.put_sessions(&all).unwrap();
    assert_eq!(
        postgres::export_all(&store, &url("require"), &trusted)
            .await
            .unwrap(),
        50
    );

    // sslmode=disable on a TLS server: plain, as asked.
    let c = postgres::connect(&url("disable"), &net()).await.unwrap();
    let ssl: bool = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!ssl);
}
