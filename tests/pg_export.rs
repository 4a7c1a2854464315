//! PostgreSQL export and import against a real PostgreSQL server (`apt-get install postgresql`).
//! Without `initdb` these tests fail: they never pass silently.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::path::Path;
use std::time::{Duration, Instant};

mod common;
use common::pg::{Pg, PYTHON_DDL};

use lark_service::export::postgres;
use lark_service::storage::{
    AuthSession, Db, Key, Keyring, SessionId, SessionState, Store, StoreOptions,
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

async fn check_matches_store(store: &Db, url: &str, want: usize) {
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
    let store = Db::from(Store::open_in_memory(ring(), StoreOptions::default()).unwrap());
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
    let store = Db::from(Store::open_in_memory(ring(), StoreOptions::default()).unwrap());
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

    let fresh = Db::from(Store::open_in_memory(ring(), StoreOptions::default()).unwrap());
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
    let fresh = Db::from(Store::open_in_memory(ring(), StoreOptions::default()).unwrap());
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
        let store = Db::from(Store::open(&path, ring(), opts(true)).unwrap());
        store.put_sessions(&all[..10]).unwrap();
    }
    {
        let store = Db::from(Store::open(&path, ring(), opts(false)).unwrap());
        store.put_sessions(&all[10..25]).unwrap();
        store.sweep(0, 100).unwrap();
        assert!(store.changes_after(0, 100).unwrap().is_empty());
    }
    let store = Db::from(Store::open(&path, ring(), opts(true)).unwrap());
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
    let fresh = Db::from(Store::open_in_memory(ring(), StoreOptions::default()).unwrap());
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
    let store = Db::from(Store::open_in_memory(ring(), StoreOptions::default()).unwrap());
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

/// Every column of the Python table, which the export's table must keep (a superset).
const PYTHON_COLUMNS: [&str; 18] = [
    "id",
    "session_id",
    "app_id",
    "state",
    "auth_method",
    "redirect_uri",
    "open_id",
    "user_id",
    "union_id",
    "user_name",
    "mobile",
    "email",
    "user_access_token",
    "token_expires_at",
    "created_at",
    "expires_at",
    "completed_at",
    "message_id",
];

async fn columns(c: &tokio_postgres::Client) -> Vec<(String, String)> {
    c.query(
        "SELECT column_name::text, data_type::text FROM information_schema.columns
         WHERE table_name = 'user_auth_sessions' AND table_schema = current_schema()",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// The guide's query, as operators' reports run it.
const GUIDE_SQL: &str = "SELECT session_id::text, user_id::text, user_access_token,
        (extract(epoch from token_expires_at) * 1000)::bigint,
        (extract(epoch from completed_at) * 1000)::bigint, message_id::text, email::text
    FROM user_auth_sessions WHERE state = 'completed' AND open_id = $1
    ORDER BY completed_at DESC";

fn assert_superset(cols: &[(String, String)]) {
    for want in PYTHON_COLUMNS {
        assert!(
            cols.iter().any(|(c, _)| c == want),
            "no column {want}: {cols:?}"
        );
    }
    for (name, ty) in [
        ("created_at", "timestamp without time zone"),
        ("expires_at", "timestamp without time zone"),
        ("token_expires_at", "timestamp without time zone"),
        ("completed_at", "timestamp without time zone"),
        ("access_token_ct", "bytea"),
        ("refresh_token_ct", "bytea"),
        ("token_key_id", "text"),
    ] {
        assert!(
            cols.iter().any(|(c, t)| c == name && t == ty),
            "{name} is not {ty}: {cols:?}"
        );
    }
}

/// Issue 18: the export into a database that holds the Python deployment's table migrates it
/// in place (one transaction) and the guide's SQL keeps working; a session imported from it
/// has one row afterwards (the export's, no plaintext).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_into_the_python_table_migrates_it_in_place() {
    use lark_service::export::python;
    let pg = tokio::task::spawn_blocking(Pg::start).await.unwrap();
    let admin = pg_client(&pg.url("postgres")).await;
    admin
        .batch_execute("CREATE DATABASE py_export;")
        .await
        .unwrap();
    let url = pg.url("py_export");
    let c = pg_client(&url).await;
    c.batch_execute(PYTHON_DDL).await.unwrap();
    c.batch_execute(
        "INSERT INTO user_auth_sessions (session_id, app_id, state, auth_method, open_id, user_id,
            user_name, mobile, email, user_access_token, token_expires_at, created_at, expires_at,
            completed_at, message_id) VALUES
         ('0b9e6a1c-2f3d-4e5f-8a9b-0c1d2e3f4a5b', 'cli_app', 'completed', 'websocket_card',
            'ou_py', 'u_py', 'Py', '+86 1', 'py@example.com', 'py-plain-token',
            (now() AT TIME ZONE 'utc') + interval '1 hour', '2024-01-01 00:00:00',
            '2024-01-01 00:10:00', '2024-01-01 00:01:00', 'om_py'),
         ('7c9e6679-7425-40de-944b-e07fc1f90ae7', 'cli_app', 'pending', 'oauth',
            NULL, NULL, NULL, NULL, NULL, NULL, NULL, '2024-01-02 00:00:00',
            '2024-01-02 00:10:00', NULL, NULL);",
    )
    .await
    .unwrap();

    // The store: the Python sessions imported, and one of this service's own.
    let store = Db::from(Store::open_in_memory(ring(), StoreOptions::default()).unwrap());
    let report = python::import(
        &store,
        &url,
        &net(),
        lark_service::storage::now_ms(),
        &|_, _| {},
    )
    .await
    .unwrap();
    assert_eq!((report.sessions, report.tokens), (1, 1));
    let mut own = session(4);
    own.open_id = Some("ou_own".into());
    own.card_message_id = Some("om_own".into());
    own.user_email = Some("own@example.com".into());
    store.put_session(&own).unwrap();

    // A table that is neither: the export stops, naming why, and changes nothing.
    admin
        .batch_execute("CREATE DATABASE other_table;")
        .await
        .unwrap();
    let other = pg_client(&pg.url("other_table")).await;
    other
        .batch_execute("CREATE TABLE user_auth_sessions (session_id text, note text);")
        .await
        .unwrap();
    let e = postgres::export_all(&store, &pg.url("other_table"), &net())
        .await
        .unwrap_err();
    assert!(
        matches!(e, postgres::ExportError::Schema(_)) && e.to_string().contains("no column app_id"),
        "{e}"
    );
    assert_eq!(columns(&other).await.len(), 2, "nothing changed");

    assert_eq!(postgres::export_all(&store, &url, &net()).await.unwrap(), 2);
    let cols = columns(&c).await;
    assert_superset(&cols);
    let idx: Vec<String> = c
        .query(
            "SELECT indexname::text FROM pg_indexes WHERE tablename = 'user_auth_sessions'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        idx.iter().any(|i| i == "idx_auth_session_open_id"),
        "{idx:?}"
    );

    // The guide's SQL: one row per completed session, no plaintext.
    let rows = c.query(GUIDE_SQL, &[&"ou_own"]).await.unwrap();
    assert_eq!(rows.len(), 0, "pending");
    let rows = c.query(GUIDE_SQL, &[&"ou_py"]).await.unwrap();
    assert_eq!(rows.len(), 1, "the Python row was replaced, not duplicated");
    let r = &rows[0];
    assert_eq!(r.get::<_, String>(0), "0b9e6a1c2f3d4e5f8a9b0c1d2e3f4a5b");
    assert_eq!(r.get::<_, String>(1), "u_py");
    assert_eq!(r.get::<_, Option<String>>(2), None, "never plaintext");
    assert_eq!(r.get::<_, Option<i64>>(4), Some(1_704_067_260_000));
    assert_eq!(r.get::<_, Option<String>>(5).as_deref(), Some("om_py"));
    assert_eq!(
        r.get::<_, Option<String>>(6).as_deref(),
        Some("py@example.com")
    );
    // The Python deployment's pending row (not imported) stays as it was.
    let left: i64 = c
        .query_one(
            "SELECT count(*) FROM user_auth_sessions WHERE user_access_token IS NOT NULL
                OR session_id = '7c9e6679-7425-40de-944b-e07fc1f90ae7'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 1);
    // New rows get ids from the Python table's sequence.
    let ids: i64 = c
        .query_one("SELECT count(DISTINCT id) FROM user_auth_sessions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ids, 3);

    // A completed session of this service's own shows in the guide's SQL.
    own.state = SessionState::Completed;
    own.access_token = Some(SecretString::from("u-own-access".to_owned()));
    own.token_expires_at = Some(own.created_at + 7_200_000);
    own.updated_at = own.created_at + 60_000;
    store.put_session(&own).unwrap();
    assert_eq!(postgres::export_all(&store, &url, &net()).await.unwrap(), 2);
    let rows = c.query(GUIDE_SQL, &[&"ou_own"]).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, String>(0), own.session_id.to_string());
    assert_eq!(
        rows[0].get::<_, Option<i64>>(3),
        Some(i64::try_from(own.created_at + 7_200_000).unwrap())
    );
    assert_eq!(
        rows[0].get::<_, Option<i64>>(4),
        Some(i64::try_from(own.updated_at).unwrap())
    );
    assert_eq!(
        rows[0].get::<_, Option<String>>(5).as_deref(),
        Some("om_own")
    );
    assert_eq!(
        rows[0].get::<_, Option<String>>(6).as_deref(),
        Some("own@example.com")
    );

    // `import postgres` takes the export's rows back (not the Python deployment's own).
    let fresh = Db::from(Store::open_in_memory(ring(), StoreOptions::default()).unwrap());
    assert_eq!(postgres::import_all(&fresh, &url, &net()).await.unwrap(), 2);
    let got = fresh.get_session(own.session_id).unwrap().unwrap();
    assert_eq!(got.access_token.unwrap().expose_secret(), "u-own-access");
    assert_eq!(got.created_at, own.created_at);
}

/// An export made by an earlier version (migration 1 only, `timestamptz` columns) is migrated
/// to the superset with its rows and their times intact, and keeps round-tripping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_export_is_migrated_to_the_superset() {
    let pg = tokio::task::spawn_blocking(Pg::start).await.unwrap();
    let admin = pg_client(&pg.url("postgres")).await;
    admin
        .batch_execute("CREATE DATABASE old_export;")
        .await
        .unwrap();
    let url = pg.url("old_export");
    let c = pg_client(&url).await;
    // As the released version left it (migration 1, recorded), with a row it wrote.
    c.batch_execute(
        "SET TIME ZONE 'Asia/Shanghai';
        CREATE TABLE lark_service_migrations (
            version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());
        INSERT INTO lark_service_migrations (version) VALUES (1);
        CREATE TABLE IF NOT EXISTS user_auth_sessions (
        session_id text PRIMARY KEY,
        app_id text NOT NULL,
        user_id text NOT NULL,
        open_id text,
        union_id text,
        state text NOT NULL,
        failure_reason text,
        card_message_id text,
        created_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL,
        expires_at timestamptz NOT NULL,
        access_token_ct bytea,
        refresh_token_ct bytea,
        token_key_id text,
        token_expires_at timestamptz,
        refresh_token_expires_at timestamptz,
        scopes text[] NOT NULL DEFAULT '{}',
        user_name text,
        user_email text,
        avatar_url text,
        exported_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX IF NOT EXISTS idx_auth_session_user ON user_auth_sessions (app_id, user_id);
    CREATE INDEX IF NOT EXISTS idx_auth_session_token_expires ON user_auth_sessions (token_expires_at);
    CREATE INDEX IF NOT EXISTS idx_auth_session_open_id ON user_auth_sessions (open_id);
    INSERT INTO user_auth_sessions (session_id, app_id, user_id, open_id, state, created_at,
        updated_at, expires_at, user_email)
    VALUES ('000000000000000000000000000000aa', 'cli_app', 'old', 'ou_old', 'completed',
        'epoch'::timestamptz + 1704067200000 * interval '1 millisecond',
        'epoch'::timestamptz + 1704067260000 * interval '1 millisecond',
        'epoch'::timestamptz + 1704067800000 * interval '1 millisecond', 'old@example.com');",
    )
    .await
    .unwrap();
    // Connections from now on run in a time zone other than UTC: the change of type must keep
    // the instants whatever the session's zone.
    admin
        .batch_execute("ALTER DATABASE old_export SET timezone TO 'Asia/Shanghai';")
        .await
        .unwrap();
    let store = Db::from(Store::open_in_memory(ring(), StoreOptions::default()).unwrap());
    let all: Vec<AuthSession> = (0..6).map(session).collect();
    store.put_sessions(&all).unwrap();
    assert_eq!(postgres::export_all(&store, &url, &net()).await.unwrap(), 6);
    assert_superset(&columns(&c).await);
    let versions: Vec<i32> = c
        .query(
            "SELECT version FROM lark_service_migrations ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, vec![1, 2]);
    // The old row's instants survived the change of type (whatever the session's time zone).
    let r = c
        .query_one(
            "SELECT (extract(epoch from created_at) * 1000)::bigint,
                    (extract(epoch from expires_at) * 1000)::bigint, id
             FROM user_auth_sessions WHERE session_id = '000000000000000000000000000000aa'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (r.get::<_, i64>(0), r.get::<_, i64>(1)),
        (1_704_067_200_000, 1_704_067_800_000)
    );
    assert!(r.get::<_, i32>(2) > 0);
    assert_eq!(count(&url).await, 7);
    // Round trip from the migrated table: the old row and the new ones.
    let fresh = Db::from(Store::open_in_memory(ring(), StoreOptions::default()).unwrap());
    assert_eq!(postgres::import_all(&fresh, &url, &net()).await.unwrap(), 7);
    let old: SessionId = "000000000000000000000000000000aa".parse().unwrap();
    let got = fresh.get_session(old).unwrap().unwrap();
    assert_eq!(
        (got.created_at, got.expires_at),
        (1_704_067_200_000, 1_704_067_800_000)
    );
    assert_eq!(got.user_email.as_deref(), Some("old@example.com"));
    // Migrating again is a no-op.
    let mut client = pg_client(&url).await;
    postgres::migrate(&mut client).await.unwrap();
    assert_eq!(count(&url).await, 7);
    assert_superset(&columns(&c).await);
}
