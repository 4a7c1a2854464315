//! The PostgreSQL backend (`storage::postgres::PgStore`) on a real, throw-away PostgreSQL:
//! the store-trait conformance suite unchanged (each check in a fresh database), the fleet
//! checks with two instances on one database, what only a database can show (no plaintext in
//! any column), and the schema versioning.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::pg::Pg;
use lark_service::net::{Net, NetOptions};
use lark_service::storage::postgres::{PgOptions, PgStore, SCHEMA_VERSION};
use lark_service::storage::testing::conformance::{checks, fleet_checks};
use lark_service::storage::{
    AuthSession, Error, Key, Keyring, SeenEvents, SessionStore, TokenStore, UserToken,
};
use secrecy::SecretString;

fn ring() -> Keyring {
    Keyring::new(Key::from_bytes(&[9; 32]), vec![])
}

fn net() -> Net {
    Net::new(&NetOptions::default()).unwrap()
}

struct Server {
    pg: Pg,
}

impl Server {
    fn start() -> Self {
        Self { pg: Pg::start() }
    }

    /// Runs `sql` with `psql` as the superuser on database `db`.
    fn psql(&self, db: &str, sql: &str) {
        let port = self.pg.port.to_string();
        self.pg.run(
            "psql",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                db,
                "-At",
                "-c",
                sql,
            ],
        );
    }

    /// A new, empty database; its URL.
    fn fresh_db(&self) -> String {
        self.pg.fresh_db()
    }

    fn open(&self, url: &str) -> PgStore {
        PgStore::open(url, &net(), ring(), PgOptions::default()).unwrap()
    }
}

#[test]
fn postgres_passes_the_conformance_suite() {
    let server = Server::start();
    for (name, check) in checks::<PgStore>() {
        eprintln!("conformance check {name}");
        let store = server.open(&server.fresh_db());
        if let Err(e) = check(&store) {
            panic!("conformance check {name} failed: {e}");
        }
    }
}

/// The webhook outbox and the grants (`storage::testing::outbox_conformance`), the same checks
/// the redb store passes, each in a fresh database.
#[test]
fn postgres_passes_the_outbox_conformance_suite() {
    let server = Server::start();
    let all = lark_service::storage::testing::outbox_conformance::checks::<PgStore>();
    assert!(all.len() >= 9);
    for (name, check) in all {
        eprintln!("outbox conformance check {name}");
        let store = server.open(&server.fresh_db());
        if let Err(e) = check(&store) {
            panic!("outbox conformance check {name} failed: {e}");
        }
    }
}

#[test]
fn two_postgres_instances_pass_the_fleet_checks() {
    let server = Server::start();
    for (name, check) in fleet_checks::<PgStore>() {
        eprintln!("fleet check {name}");
        let url = server.fresh_db();
        // Two stores, two pools, two runtimes: two instances of the service.
        let (a, b) = (server.open(&url), server.open(&url));
        if let Err(e) = check(&a, &b) {
            panic!("fleet check {name} failed: {e}");
        }
    }
}

/// The event dispatcher's fleet-wide claim (`Db::claim_event`) between two instances on one
/// database: of claims for one id exactly one wins, a claim held elsewhere says until when, a
/// record outlasts any claim, a released or lapsed claim is free again.
#[test]
fn event_claims_decide_between_two_instances() {
    use lark_service::storage::{Db, EventClaim};
    let server = Server::start();
    let url = server.fresh_db();
    let (a, b): (Db, Db) = (server.open(&url).into(), server.open(&url).into());
    let now = lark_service::storage::now_ms();
    let claim = now + 30_000;
    let record = now + 86_400_000;

    assert_eq!(a.claim_event("ev1", claim, now).unwrap(), EventClaim::Won);
    assert_eq!(
        b.claim_event("ev1", claim, now).unwrap(),
        EventClaim::Held(claim)
    );
    // Handled: the claim becomes a record, seen by the other instance.
    a.settle_events(&["ev1"], record).unwrap();
    assert_eq!(
        b.claim_event("ev1", claim, now).unwrap(),
        EventClaim::Recorded(record)
    );
    assert!(b.event_seen("ev1").unwrap());
    // An id recorded without a claim (settle is an upsert) is a record too.
    b.settle_events(&["ev0"], record).unwrap();
    assert_eq!(
        a.claim_event("ev0", claim, now).unwrap(),
        EventClaim::Recorded(record)
    );

    // A failed handler lets its claim go: the other instance takes it.
    assert_eq!(a.claim_event("ev2", claim, now).unwrap(), EventClaim::Won);
    a.release_events(&["ev2"], claim).unwrap();
    assert_eq!(b.claim_event("ev2", claim, now).unwrap(), EventClaim::Won);

    // A claimer that died: its claim lapses and the other instance takes it.
    assert_eq!(
        a.claim_event("ev3", now + 1_000, now).unwrap(),
        EventClaim::Won
    );
    assert_eq!(
        b.claim_event("ev3", now + 31_000, now + 999).unwrap(),
        EventClaim::Held(now + 1_000)
    );
    assert_eq!(
        b.claim_event("ev3", now + 31_000, now + 1_000).unwrap(),
        EventClaim::Won
    );

    // Many claims at once, from both instances: one wins.
    let won = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let st = if i % 2 == 0 { &a } else { &b };
                sc.spawn(move || st.claim_event("ev4", claim, now).unwrap())
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap())
            .filter(|c| *c == EventClaim::Won)
            .count()
    });
    assert_eq!(won, 1, "exactly one claim wins");

    // redb is one process: its memory decides, the store does not claim.
    let dir = tempfile::tempdir().unwrap();
    let r: Db = lark_service::storage::Store::open(
        &dir.path().join("s.redb"),
        ring(),
        lark_service::storage::StoreOptions::default(),
    )
    .unwrap()
    .into();
    assert_eq!(
        r.claim_event("ev1", claim, now).unwrap(),
        EventClaim::NotShared
    );
}

/// Runs SQL statements on `url` with a client of its own; every column of every row as text.
fn sql(url: &str, query: &str) -> Vec<Vec<Option<String>>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = lark_service::net::postgres::connect_pg(url, &net())
            .await
            .unwrap();
        let mut out = Vec::new();
        for m in c.simple_query(query).await.unwrap() {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                out.push((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect());
            }
        }
        out
    })
}

const SECRETS: [&str; 6] = [
    "access-PLAINTEXT-4f1c9a",
    "refresh-PLAINTEXT-77be02",
    "pkce-PLAINTEXT-c0ffee",
    "token-access-PLAINTEXT-ab12",
    "token-refresh-PLAINTEXT-cd34",
    "device-code-PLAINTEXT-9e7d",
];

fn write_secrets(store: &PgStore) -> AuthSession {
    let mut sess = AuthSession::new_pending("cli_app", "u1", vec![], 1, 1000);
    sess.access_token = Some(SecretString::from(SECRETS[0].to_owned()));
    sess.refresh_token = Some(SecretString::from(SECRETS[1].to_owned()));
    sess.pkce_verifier = Some(SecretString::from(SECRETS[2].to_owned()));
    store.put_session(&sess).unwrap();
    store
        .put_token(&UserToken {
            app_id: "cli_app".into(),
            user_id: "u1".into(),
            open_id: None,
            access_token: SecretString::from(SECRETS[3].to_owned()),
            refresh_token: Some(SecretString::from(SECRETS[4].to_owned())),
            expires_at: 10,
            refresh_expires_at: None,
            refresh_due_at: 5,
            scopes: vec![],
            obtained_at: 1,
            session_id: Some(sess.session_id),
            needs_reauth: false,
            refresh_in_doubt_since: None,
        })
        .unwrap();
    store
        .put_device_poll(&lark_service::storage::DevicePoll {
            session_id: sess.session_id,
            app_id: "cli_app".into(),
            device_code: SecretString::from(SECRETS[5].to_owned()),
            interval_ms: 5_000,
            expires_at: 1_000,
        })
        .unwrap();
    sess
}

/// Sealed at rest: after writing secrets through the traits, no table of the database holds
/// any of them, neither as text nor as bytes (a `bytea` column reads back as hex).
#[test]
fn postgres_holds_no_plaintext_secret() {
    let server = Server::start();
    let url = server.fresh_db();
    let store = server.open(&url);
    let sess = write_secrets(&store);
    let tables = sql(
        &url,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
    );
    assert!(
        tables.len() >= 10,
        "the schema's tables are listed: {tables:?}"
    );
    let mut scanned = 0;
    for t in tables {
        let name = t[0].clone().unwrap();
        for row in sql(&url, &format!("SELECT t::text FROM \"{name}\" AS t")) {
            let text = row[0].clone().unwrap_or_default();
            scanned += text.len();
            for s in SECRETS {
                assert!(!text.contains(s), "{s} in clear in table {name}");
                assert!(
                    !text.contains(&hex::encode(s)),
                    "{s} in clear (as bytes) in table {name}"
                );
            }
        }
    }
    assert!(scanned > 0);
    // The scan can see a secret: the sealed columns really hold what was written.
    let got = store.get_session(sess.session_id).unwrap().unwrap();
    use secrecy::ExposeSecret;
    assert_eq!(got.pkce_verifier.unwrap().expose_secret(), SECRETS[2]);
    let tok = store.get_token("cli_app", "u1").unwrap().unwrap();
    assert_eq!(tok.access_token.expose_secret(), SECRETS[3]);
    let poll = store.get_device_poll(sess.session_id).unwrap().unwrap();
    assert_eq!(poll.device_code.expose_secret(), SECRETS[5]);
    assert_eq!((poll.interval_ms, poll.expires_at), (5_000, 1_000));
    // A known plaintext written where it may be (a user id) is found by the same scan.
    let rows = sql(&url, "SELECT t::text FROM ls_sessions AS t");
    assert!(rows
        .iter()
        .any(|r| r[0].as_deref().unwrap_or("").contains("cli_app")));
}

#[test]
fn a_newer_schema_is_refused_and_left_alone() {
    let server = Server::start();
    let url = server.fresh_db();
    drop(server.open(&url));
    assert_eq!(
        sql(&url, "SELECT version FROM lark_service_schema")[0][0].as_deref(),
        Some(SCHEMA_VERSION.to_string().as_str())
    );
    let newer = SCHEMA_VERSION + 1;
    sql(
        &url,
        &format!("UPDATE lark_service_schema SET version = {newer}"),
    );
    match PgStore::open(&url, &net(), ring(), PgOptions::default()) {
        Err(Error::NewerDatabaseSchema { found, supported }) => {
            assert_eq!((found, supported), (newer, SCHEMA_VERSION));
        }
        other => panic!("a newer schema must be refused, got {other:?}"),
    }
    assert_eq!(
        sql(&url, "SELECT version FROM lark_service_schema")[0][0].as_deref(),
        Some(newer.to_string().as_str()),
        "the refused database is not touched"
    );
}

#[test]
fn a_wrong_key_is_refused() {
    let server = Server::start();
    let url = server.fresh_db();
    drop(server.open(&url));
    let other = Keyring::new(Key::from_bytes(&[3; 32]), vec![]);
    match PgStore::open(&url, &net(), other, PgOptions::default()) {
        Err(Error::WrongKey { .. }) => {}
        other => panic!("another key must be refused, got {other:?}"),
    }
    // The previous key among the configured ones opens it.
    let rotated = Keyring::new(Key::from_bytes(&[3; 32]), vec![Key::from_bytes(&[9; 32])]);
    PgStore::open(&url, &net(), rotated, PgOptions::default()).unwrap();
}

/// Instances starting together on a new database: the schema is created once, both open.
#[test]
fn concurrent_opens_migrate_once() {
    let server = Server::start();
    let url = server.fresh_db();
    let stores: Vec<PgStore> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4).map(|_| s.spawn(|| server.open(&url))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for st in &stores {
        assert_eq!(st.schema_version().unwrap(), SCHEMA_VERSION);
    }
    assert_eq!(
        sql(&url, "SELECT count(*) FROM lark_service_schema")[0][0].as_deref(),
        Some("1")
    );
}

/// The calls are synchronous: from `spawn_blocking` inside a multi-threaded tokio runtime (how
/// the service calls the store) and from a current-thread runtime's blocking pool they work,
/// and dropping the last handle inside an async task does not panic.
#[test]
fn callable_from_spawn_blocking_and_droppable_in_async_code() {
    let server = Server::start();
    let url = server.fresh_db();
    for flavor in ["multi", "current"] {
        let rt = if flavor == "multi" {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        }
        .unwrap();
        let url = url.clone();
        rt.block_on(async move {
            let store = tokio::task::spawn_blocking(move || {
                PgStore::open(&url, &net(), ring(), PgOptions::default()).unwrap()
            })
            .await
            .unwrap();
            let s2 = store.clone();
            let fresh = tokio::task::spawn_blocking(move || {
                s2.mark_events_seen(&["from-blocking"], u64::MAX / 2)
            })
            .await
            .unwrap()
            .unwrap();
            assert_eq!(fresh, vec![flavor == "multi"]);
            // The last handle dropped in async code.
            tokio::spawn(async move { drop(store) }).await.unwrap();
        });
    }
}

/// A database that goes away is a transient, typed error, never a panic, and the pool
/// reconnects when it is back.
#[test]
fn an_outage_is_a_transient_error_and_the_pool_recovers() {
    let server = Server::start();
    let url = server.fresh_db();
    let store = server.open(&url);
    assert!(!store.event_seen("x").unwrap());
    server.pg.stop_immediate();
    let e = store.event_seen("x").unwrap_err();
    assert!(e.is_transient(), "{e:?}");
    server.pg.start_server();
    let mut ok = false;
    for _ in 0..3 {
        if store.event_seen("x").is_ok() {
            ok = true;
            break;
        }
    }
    assert!(ok, "the store answers again once the database is back");
}

/// The methods the service calls beyond the traits answer as the redb store's do.
#[test]
fn service_methods_beyond_the_traits() {
    let server = Server::start();
    let url = server.fresh_db();
    let store = server.open(&url);
    let sess = write_secrets(&store);
    assert_eq!(store.store_key_id().unwrap(), store.active_key_id());
    let summary = store.get_session_summary(sess.session_id).unwrap().unwrap();
    assert_eq!(
        (summary.session_id, summary.state, summary.has_tokens),
        (sess.session_id.to_string(), "pending", true)
    );
    assert_eq!(store.count_active_tokens().unwrap(), 1);
    let mut t = store.get_token("cli_app", "u1").unwrap().unwrap();
    t.needs_reauth = true;
    store.put_token(&t).unwrap();
    assert_eq!(store.count_active_tokens().unwrap(), 0);
    let counts = store.counts().unwrap();
    assert_eq!((counts.sessions, counts.tokens), (1, 1));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let id = sess.session_id;
    let got = rt
        .block_on(store.run(move |s| s.get_session(id)))
        .unwrap()
        .unwrap();
    assert_eq!(got.session_id, id);
}

/// The service serves from PostgreSQL when asked; a database it cannot reach stops it at start
/// (fail closed) with a message that names PostgreSQL and not the password, instead of quietly
/// serving from a local file (which would split a fleet).
#[test]
fn the_service_refuses_to_start_on_a_postgres_store_it_cannot_reach() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lark-service"))
        .args(["serve", "--sandbox"])
        .current_dir(dir.path())
        .env("STORAGE_BACKEND", "postgres")
        .env(
            "STORAGE_POSTGRES_URL",
            "postgres://u:pw-sentinel-5150@127.0.0.1:1/db",
        )
        .env("WEBHOOKS_EXPIRY_REMINDER_LEAD_SECONDS", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(
        out.status.code(),
        Some(75),
        "unreachable is transient: {err}"
    );
    assert!(err.contains("PostgreSQL store is unreachable"), "{err}");
    assert!(
        !err.contains("pw-sentinel-5150"),
        "the password leaked: {err}"
    );
    assert!(
        !dir.path().join("data/lark-service.redb").exists(),
        "no local store was opened"
    );
}

/// Every feature is served on PostgreSQL: with backups, webhooks, the expiry reminders (on by
/// default) and the device flow all configured, the service refuses none of them at start; it
/// stops only because the database cannot be reached (and never opens a local store instead).
#[test]
fn the_service_refuses_no_feature_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lark-service"))
        .args(["serve", "--sandbox"])
        .current_dir(dir.path())
        .env("STORAGE_BACKEND", "postgres")
        .env("STORAGE_POSTGRES_URL", "postgres://u@127.0.0.1:1/db")
        .env("BACKUP_SCHEDULE", "0 2 * * *")
        .env("BACKUP_DIR", dir.path().join("bk"))
        .env("WEBHOOKS_URLS", "https://hooks.example.com/x")
        .env("WEBHOOKS_SECRET", "0123456789abcdef0123456789abcdef")
        .env("AUTH_FLOW", "device")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(!err.contains("does not serve"), "{err}");
    for setting in [
        "backup.schedule",
        "webhooks.urls",
        "webhooks.expiry_reminder_lead_seconds",
        "auth.flow",
    ] {
        assert!(!err.contains(setting), "{setting} refused: {err}");
    }
    assert!(
        !dir.path().join("data/lark-service.redb").exists(),
        "no local store was opened"
    );
}

/// Two event dispatchers (two instances) on one database given the same event: while one
/// handles it the other answers "failed" (the platform redelivers) and never runs its handler;
/// once handled, it is a duplicate everywhere; a failed handler lets the event go to the other;
/// given at once to both, one handler runs.
#[test]
fn two_dispatchers_on_one_database_handle_an_event_once() {
    use lark_service::callbacks::parse_event_payload;
    use lark_service::events::{
        DispatchConfig, Dispatcher, EventSource, Handler, HandlerReply, Outcome,
    };
    use lark_service::storage::Db;
    use lark_service::workers::Supervisor;
    use std::sync::Arc;

    let server = Server::start();
    let url = server.fresh_db();
    let (a, b): (Db, Db) = (server.open(&url).into(), server.open(&url).into());
    let event = |id: &str| {
        let body = serde_json::json!({
            "schema": "2.0",
            "header": {"event_id": id, "event_type": "im.message.receive_v1", "create_time": "1", "token": "t", "app_id": "cli_x", "tenant_key": "tk"},
            "event": {}
        });
        parse_event_payload(&serde_json::to_vec(&body).unwrap()).unwrap()
    };
    // A handler that counts its calls, fails the ids in `fail`, and waits for `gate` first.
    let handler = |calls: Arc<AtomicUsize>,
                   gate: Arc<tokio::sync::Semaphore>,
                   fail: &'static [&'static str]|
     -> Handler {
        Arc::new(move |cb| {
            calls.fetch_add(1, Ordering::SeqCst);
            let gate = gate.clone();
            let id = match &cb {
                lark_service::callbacks::Callback::Event(e) => e.event_id.clone(),
                _ => String::new(),
            };
            Box::pin(async move {
                let _pass = gate.acquire().await.unwrap();
                if fail.contains(&id.as_str()) {
                    Err("boom".into())
                } else {
                    Ok(HandlerReply::Done)
                }
            })
        })
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cfg = DispatchConfig {
            ack_deadline: std::time::Duration::from_millis(300),
            ..DispatchConfig::default()
        };
        let (sa, sb) = (Supervisor::default(), Supervisor::default());
        let (da, db) = (
            Dispatcher::new(a.clone(), cfg.clone(), &sa),
            Dispatcher::new(b.clone(), cfg, &sb),
        );
        let (ca, cb) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let gate_a = Arc::new(tokio::sync::Semaphore::new(0));
        let open = Arc::new(tokio::sync::Semaphore::new(1_000));
        da.set_handler(handler(ca.clone(), gate_a.clone(), &["e2"]));
        db.set_handler(handler(cb.clone(), open.clone(), &[]));
        let ws = EventSource::WebSocket;

        // A is still handling e1 past its ACK deadline: B does not handle it, asks again.
        assert_eq!(da.dispatch(event("e1"), ws).await, Outcome::Accepted);
        assert_eq!(db.dispatch(event("e1"), ws).await, Outcome::Failed);
        assert_eq!(cb.load(Ordering::SeqCst), 0, "B never ran its handler");
        // A finishes: e1 is recorded, a duplicate for B.
        gate_a.add_permits(1_000);
        // (Recorded: held far beyond any claim, by the seen-id TTL.)
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let now = lark_service::storage::now_ms();
            let claim = now + 60_000;
            match b.claim_event("e1", claim, now).unwrap() {
                lark_service::storage::EventClaim::Recorded(t) if t > claim => break,
                lark_service::storage::EventClaim::Held(_) => {}
                other => panic!("e1 free while A handles it: {other:?}"),
            }
            assert!(std::time::Instant::now() < until, "e1 never recorded");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(db.dispatch(event("e1"), ws).await, Outcome::Duplicate);
        assert_eq!(da.dispatch(event("e1"), ws).await, Outcome::Duplicate);
        assert_eq!(ca.load(Ordering::SeqCst), 1);
        assert_eq!(cb.load(Ordering::SeqCst), 0);

        // A's handler fails on e2: the event is let go, and B handles the redelivery.
        assert_eq!(da.dispatch(event("e2"), ws).await, Outcome::Failed);
        assert_eq!(
            db.dispatch(event("e2"), ws).await,
            Outcome::Handled(HandlerReply::Done)
        );
        db.flush().await;
        assert_eq!(da.dispatch(event("e2"), ws).await, Outcome::Duplicate);

        // Both given e3 at once: one handler runs.
        let before = ca.load(Ordering::SeqCst) + cb.load(Ordering::SeqCst);
        let (ra, rb) = tokio::join!(da.dispatch(event("e3"), ws), db.dispatch(event("e3"), ws));
        let handled = [&ra, &rb]
            .iter()
            .filter(|o| matches!(o, Outcome::Handled(_)))
            .count();
        assert_eq!(handled, 1, "{ra:?} {rb:?}");
        assert_eq!(
            ca.load(Ordering::SeqCst) + cb.load(Ordering::SeqCst),
            before + 1
        );
        da.close().await;
        db.close().await;
    });
}

/// The fleet's heartbeat table: each instance upserts its own row, the live count is every row
/// seen within the window (the caller included), a clean stop deletes the row, and a row not
/// seen for a day is deleted by anyone's next beat.
#[test]
fn heartbeats_count_the_live_instances_of_the_fleet() {
    use lark_service::storage::postgres::{InstanceRow, FORGET_AFTER_MS};
    use lark_service::storage::Leases as _;
    let server = Server::start();
    let url = server.fresh_db();
    let (a, b) = (server.open(&url), server.open(&url));
    let row = |holder: &str, seen: u64| InstanceRow {
        holder: holder.to_owned(),
        host: "host".to_owned(),
        pid: 42,
        version: "1.2.3".to_owned(),
        started_at: 1_000,
        last_seen: seen,
    };
    let day = FORGET_AFTER_MS;
    let window = 15_000;
    let t = 10 * day;
    // A lease whose holder died without letting it go (a user's refresh lease), and one that
    // is kept (a singleton worker's, renewed).
    assert!(b
        .try_acquire_lease("refresh/app/ou_dead", "dead", 1_000, t)
        .unwrap());
    assert!(b.try_acquire_lease("worker/sweep", "b", 10_000, t).unwrap());
    assert_eq!(a.heartbeat(&row("a", t), window).unwrap(), 1);
    assert_eq!(b.heartbeat(&row("b", t + 1_000), window).unwrap(), 2);
    // A beat again is an update, not a second row.
    assert_eq!(a.heartbeat(&row("a", t + 2_000), window).unwrap(), 2);
    let live = b.live_instances(t + 2_000, window).unwrap();
    assert_eq!(live, vec![row("a", t + 2_000), row("b", t + 1_000)]);
    // b stops beating: once its beat is older than the window it no longer counts.
    assert_eq!(a.heartbeat(&row("a", t + 16_500), window).unwrap(), 1);
    assert_eq!(a.live_instances(t + 16_500, window).unwrap().len(), 1);
    // b is still listed in the table (a crashed instance stays visible for a day)...
    assert_eq!(a.live_instances(t + 16_500, day).unwrap().len(), 2);
    // ...and is deleted by the first beat after that, with the leases that lapsed a day ago.
    // (The kept one was taken again meanwhile.)
    assert!(a
        .try_acquire_lease("worker/sweep", "b", 10_000, t + 1_000 + day)
        .unwrap());
    let leases = || sql(&url, "SELECT name FROM ls_leases ORDER BY name");
    assert_eq!(leases().len(), 2);
    assert_eq!(a.heartbeat(&row("a", t + 2_000 + day), window).unwrap(), 1);
    assert_eq!(leases(), vec![vec![Some("worker/sweep".to_owned())]]);
    assert_eq!(
        a.live_instances(t + 2_000 + day, 10 * day).unwrap().len(),
        1
    );
    // A clean stop deletes the row at once.
    assert_eq!(b.heartbeat(&row("b", t + 3_000 + day), window).unwrap(), 2);
    assert!(b.forget_instance("b").unwrap());
    assert!(!b.forget_instance("b").unwrap());
    assert_eq!(a.heartbeat(&row("a", t + 4_000 + day), window).unwrap(), 1);
}

/// The per-user rate limit counted in the database: two instances (two stores, two pools)
/// hammering one key at once admit exactly the limit together, never more; no span of one
/// window ever holds more than the limit (the previous window counts); keys are separate.
#[test]
fn two_instances_never_admit_more_than_the_limit_together() {
    use std::time::Duration;
    let server = Server::start();
    let url = server.fresh_db();
    let (a, b) = (server.open(&url), server.open(&url));
    let window = Duration::from_secs(60);
    let w = 60_000;
    let t0 = 1_000 * w + 30_000; // the middle of a window
    let admitted = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for i in 0..8 {
            let store = if i % 2 == 0 { &a } else { &b };
            let admitted = &admitted;
            s.spawn(move || {
                for j in 0..10 {
                    if store
                        .rate_acquire("auth/ou_hot", 5, window, t0 + j)
                        .unwrap()
                        .is_none()
                    {
                        admitted.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    assert_eq!(admitted.load(Ordering::SeqCst), 5, "80 attempts, limit 5");
    // Refused: the wait runs to where the window's events leave the count (this window full:
    // two boundaries on).
    let wait = b.rate_acquire("auth/ou_hot", 5, window, t0 + 100).unwrap();
    assert_eq!(wait, Some(Duration::from_millis(w + w / 2 - 100)));
    // Another key is counted apart.
    assert_eq!(a.rate_acquire("auth/ou_cold", 5, window, t0).unwrap(), None);
    // The next window still sees the previous one's 5: a span of one window never holds 6.
    assert!(a
        .rate_acquire("auth/ou_hot", 5, window, t0 + w)
        .unwrap()
        .is_some());
    // Two windows on, the burst has left the count.
    for i in 0..5 {
        assert_eq!(
            a.rate_acquire("auth/ou_hot", 5, window, t0 + 2 * w + i)
                .unwrap(),
            None,
            "attempt {i}"
        );
    }
    assert!(b
        .rate_acquire("auth/ou_hot", 5, window, t0 + 2 * w + 9)
        .unwrap()
        .is_some());
    // The sweep forgets counters whose windows no longer matter.
    use lark_service::storage::SessionStore as _;
    a.sweep(t0 + 10 * w, 100).unwrap();
    let left = sql(&url, "SELECT count(*) FROM ls_rate_counts");
    assert_eq!(left, vec![vec![Some("0".to_owned())]]);
}

/// The user sync in a fleet: at each scheduled time exactly one instance runs it (the one
/// taking the lease; the last leader keeps it), an instance whose clock lags does not run the
/// same time again, and when the leader is gone a follower runs the first time after its
/// lease lapsed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_scheduled_user_sync_runs_on_one_instance() {
    use lark_service::daemon::{scheduled_gate, GateRole, SCHEDULED_LEASE_TTL};
    use lark_service::storage::Db;
    use lark_service::workers::{ManualClock, SharedClock};
    use std::sync::Arc;
    // Blocking calls on a worker thread of this test's own runtime: safe (see PgStore).
    let server = Server::start();
    let url = server.fresh_db();
    let (a, b) = (Db::from(server.open(&url)), Db::from(server.open(&url)));
    let day: u64 = 24 * 3600 * 1000;
    let clock = Arc::new(ManualClock::at(100 * day));
    let shared: SharedClock = clock.clone();
    let (role_a, role_b) = (GateRole::default(), GateRole::default());
    let gate_a = scheduled_gate(
        a,
        "host-a/1/aa",
        "user_sync",
        shared.clone(),
        role_a.clone(),
    );
    let gate_b = scheduled_gate(
        b,
        "host-b/2/bb",
        "user_sync",
        shared.clone(),
        role_b.clone(),
    );
    assert_eq!((role_a.status(), role_b.status()), (None, None));
    let fire = 100 * day;
    let (ra, rb) = tokio::join!(gate_a(fire), gate_b(fire));
    assert!(
        ra ^ rb,
        "exactly one instance runs the sync at {fire}: {ra} {rb}"
    );
    let (leader, follower, follower_role) = if ra {
        (&gate_a, &gate_b, &role_b)
    } else {
        (&gate_b, &gate_a, &role_a)
    };
    // What `/workers` shows for each instance's user sync.
    let mut roles = [role_a.status(), role_b.status()];
    roles.sort();
    assert_eq!(roles, [Some("follower"), Some("leader")]);
    // A follower whose clock lags wakes a little later: still not its turn.
    clock.advance(std::time::Duration::from_secs(5));
    assert!(!follower(fire).await);
    // The next day the leader runs it again, the follower does not.
    clock.advance(std::time::Duration::from_millis(day));
    assert!(leader(fire + day).await);
    assert!(!follower(fire + day).await);
    // The leader is gone: the next day its lease has lapsed and the follower runs it.
    clock.advance(std::time::Duration::from_millis(day));
    assert!(SCHEDULED_LEASE_TTL.as_millis() < u128::from(day));
    assert!(follower(fire + 2 * day).await);
    assert_eq!(follower_role.status(), Some("leader"));
}

/// Two transactions locking the same rows in opposite order deadlock; PostgreSQL aborts one
/// (`40P01`). When it is the store's, the store runs the whole transaction again, and the
/// write succeeds: the caller never sees the deadlock.
#[test]
fn a_deadlocked_transaction_is_run_again_and_succeeds() {
    let server = Server::start();
    let url = server.fresh_db();
    let store = server.open(&url);
    let s1 = AuthSession::new_pending("cli_dl", "u1", vec![], 0, 100);
    let s2 = AuthSession::new_pending("cli_dl", "u2", vec![], 0, 100);
    store.put_sessions(&[s1.clone(), s2.clone()]).unwrap();
    // The store locks a batch's rows in id order: `first`, then `second`.
    let order = sql(
        &url,
        "SELECT user_id FROM ls_sessions WHERE app_id = 'cli_dl' ORDER BY id",
    );
    let (first, second) = (order[0][0].clone().unwrap(), order[1][0].clone().unwrap());
    let before = store.retried();
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let other_url = url.clone();
    // The other transaction: takes `second`, waits until the store's holds `first` and waits
    // for `second`, then takes `first`. Its own deadlock_timeout is long, so the deadlock check
    // runs in the store's backend first and aborts the store's transaction.
    let other = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let c = lark_service::net::postgres::connect_pg(&other_url, &net())
                .await
                .unwrap();
            c.batch_execute("BEGIN; SET LOCAL deadlock_timeout = '30s'")
                .await
                .unwrap();
            let lock =
                "SELECT 1 FROM ls_sessions WHERE app_id = 'cli_dl' AND user_id = $1 FOR UPDATE";
            c.execute(lock, &[&second]).await.unwrap();
            locked_tx.send(()).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            loop {
                let waiting: i64 = c
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity
                         WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                if waiting > 0 {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the store never waited"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            // Deadlock: this waits for `first` until PostgreSQL aborts the store's transaction.
            c.execute(lock, &[&first]).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            c.batch_execute("COMMIT").await.unwrap();
        });
    });
    locked_rx.recv().unwrap();
    let (mut w1, mut w2) = (s1.clone(), s2.clone());
    w1.card_message_id = Some("om_after_retry_1".into());
    w2.card_message_id = Some("om_after_retry_2".into());
    store.put_sessions(&[w1.clone(), w2.clone()]).unwrap();
    other.join().unwrap();
    assert!(
        store.retried() > before,
        "the store's transaction was the deadlock's victim and was run again"
    );
    for w in [w1, w2] {
        let got = store.get_session(w.session_id).unwrap().unwrap();
        assert_eq!(got.card_message_id, w.card_message_id);
    }
}

/// Every schema step after the first has its undo in `common::pg::UNDO_STEPS` (the tests of
/// older databases build them with it), and undoing them all leaves a database the current
/// build migrates again.
#[test]
fn every_schema_step_can_be_undone_for_the_migration_tests() {
    assert_eq!(
        common::pg::UNDO_STEPS.first().map(|(v, _)| *v),
        Some(SCHEMA_VERSION),
        "the newest schema step has no undo in tests/common/pg.rs"
    );
    let server = Server::start();
    let url = server.fresh_db();
    drop(server.open(&url));
    sql(&url, &common::pg::back_to_schema(1));
    let left = sql(
        &url,
        "SELECT count(*) FROM information_schema.tables WHERE table_name LIKE 'ls\\_%'",
    );
    let store = server.open(&url);
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    let after = sql(
        &url,
        "SELECT count(*) FROM information_schema.tables WHERE table_name LIKE 'ls\\_%'",
    );
    assert_ne!(left, after, "undoing the steps dropped nothing");
}

/// A database at schema 1 (as the first PostgreSQL release left it) is brought to the current
/// schema in place at open: the fleet's tables and the app registry are added, nothing already
/// stored is touched.
#[test]
fn a_schema_1_database_is_migrated_in_place() {
    let server = Server::start();
    let url = server.fresh_db();
    let store = server.open(&url);
    let sess = write_secrets(&store);
    drop(store);
    // What schema 1 had: nothing a later step adds.
    sql(&url, &common::pg::back_to_schema(1));
    let store = server.open(&url);
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    // Every table a later step adds is there again and works.
    assert_eq!(
        sql(
            &url,
            "SELECT count(*) FROM information_schema.tables WHERE table_name IN
             ('ls_instances', 'ls_rate_counts', 'ls_outbox', 'ls_outbox_dead', 'ls_grants')"
        ),
        [[Some("5".to_owned())]]
    );
    assert_eq!(
        sql(
            &url,
            "SELECT count(*) FROM information_schema.columns
             WHERE table_name = 'ls_instances' AND column_name IN ('key_ids', 'active_key')"
        ),
        [[Some("2".to_owned())]]
    );
    // The app registry (schema 5) is there, empty.
    assert!(store.list_apps().unwrap().is_empty());
    assert_eq!(store.apps_version().unwrap(), 0);
    let got = store.get_session(sess.session_id).unwrap().unwrap();
    assert_eq!(got.user_id, sess.user_id);
    assert!(store.get_token("cli_app", "u1").unwrap().is_some());
    use lark_service::storage::postgres::InstanceRow;
    let me = InstanceRow {
        holder: "h".into(),
        host: "host".into(),
        pid: 1,
        version: "v".into(),
        started_at: 1,
        last_seen: 2,
    };
    assert_eq!(store.heartbeat(&me, 1_000).unwrap(), 1);
    assert_eq!(
        store
            .rate_acquire("k", 1, std::time::Duration::from_secs(60), 5)
            .unwrap(),
        None
    );
    // Version 6's device polls.
    let poll = lark_service::storage::DevicePoll {
        session_id: sess.session_id,
        app_id: "cli_app".into(),
        device_code: secrecy::SecretString::from("dc-migrated".to_owned()),
        interval_ms: 5_000,
        expires_at: 9_000,
    };
    store.put_device_poll(&poll).unwrap();
    assert_eq!(
        store.device_polls_of("cli_app", 10).unwrap(),
        vec![sess.session_id]
    );
}

/// A database at schema 7 (before a claim held its id by `held_until`, and before its ids
/// compared bytewise) keeps what its seen ids meant: a claim (its row's `forget_at` its end)
/// holds until then and is free after, a record holds until its time, and its holder's
/// release still lets the claim go. Its rows do not tell a claim from a record, so both read
/// as records (the dispatcher refuses one held no longer than its own claim, as before).
#[test]
fn a_schema_7_databases_claims_and_records_hold_as_before() {
    use lark_service::storage::{Db, EventClaim};
    let server = Server::start();
    let url = server.fresh_db();
    drop(server.open(&url));
    let now = lark_service::storage::now_ms();
    let (until, record) = (now + 30_000, now + 86_400_000);
    sql(&url, &common::pg::back_to_schema(7));
    sql(
        &url,
        &format!(
            "INSERT INTO ls_seen_events (id, forget_at) VALUES
             ('claimed', {until}), ('released', {until}), ('recorded', {record})"
        ),
    );
    let pg = server.open(&url);
    assert_eq!(pg.schema_version().unwrap(), SCHEMA_VERSION);
    // The ids compare bytewise now.
    assert_eq!(
        sql(
            &url,
            "SELECT collation_name FROM information_schema.columns
             WHERE table_name = 'ls_seen_events' AND column_name = 'id'"
        ),
        [[Some("C".to_owned())]]
    );
    let db: Db = pg.into();
    assert_eq!(
        db.claim_event("claimed", now + 40_000, now).unwrap(),
        EventClaim::Recorded(until)
    );
    assert_eq!(
        db.claim_event("recorded", now + 40_000, now).unwrap(),
        EventClaim::Recorded(record)
    );
    db.release_events(&["released"], until).unwrap();
    assert_eq!(
        db.claim_event("released", now + 40_000, now).unwrap(),
        EventClaim::Won
    );
    assert_eq!(
        db.claim_event("claimed", now + 40_000, until).unwrap(),
        EventClaim::Won
    );
    assert_eq!(
        db.claim_event("recorded", now + 40_000, until).unwrap(),
        EventClaim::Recorded(record)
    );
}

/// A database at schema 3 (before the webhook outbox) is brought to the current schema in
/// place: the outbox works, and every stored token gets its grant as redb's migration seeds
/// it (the earlier of the token's `obtained_at` and its session's creation, not reminded).
#[test]
fn a_schema_3_database_gets_the_outbox_and_its_grants_seeded() {
    use lark_service::storage::OutboxEvent;
    let server = Server::start();
    let url = server.fresh_db();
    let store = server.open(&url);
    let sess = write_secrets(&store);
    let mut orphan = store.get_token("cli_app", "u1").unwrap().unwrap();
    orphan.user_id = "u2".into();
    orphan.session_id = None;
    orphan.obtained_at = 4_242;
    store.put_token(&orphan).unwrap();
    let mut later = orphan.clone();
    later.user_id = "u3".into();
    later.session_id = Some(sess.session_id);
    later.obtained_at = sess.created_at + 9_999;
    store.put_token(&later).unwrap();
    drop(store);
    sql(&url, &common::pg::back_to_schema(3));
    let store = server.open(&url);
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    let t1 = store.get_token("cli_app", "u1").unwrap().unwrap();
    assert_eq!(
        store.grant_of("cli_app", "u1").unwrap(),
        Some((t1.obtained_at.min(sess.created_at), 0))
    );
    assert_eq!(store.grant_of("cli_app", "u2").unwrap(), Some((4_242, 0)));
    assert_eq!(
        store.grant_of("cli_app", "u3").unwrap(),
        Some((sess.created_at, 0)),
        "the session's creation, earlier than the token"
    );
    store
        .outbox_append(
            &[OutboxEvent {
                event_id: "ev-after-migration".into(),
                kind: "token.revoked".into(),
                body: b"{}".to_vec(),
            }],
            7,
        )
        .unwrap();
    assert_eq!(store.outbox_counts().unwrap(), (1, 0));
}

/// The state [`batched_claims_decide_as_single_claims_did`] starts from: two records, a
/// lapsed claim, a live claim.
fn claims_setup(db: &lark_service::storage::Db, now: u64) {
    use lark_service::storage::EventClaim;
    db.settle_events(&["rec-0", "rec-1"], now + 86_400_000)
        .unwrap();
    assert_eq!(
        db.claim_event("lapsed", now + 5, now).unwrap(),
        EventClaim::Won
    );
    assert_eq!(
        db.claim_event("live", now + 20_000, now).unwrap(),
        EventClaim::Won
    );
}

/// The claim batcher decides as the claim it replaced: one batch (new, recorded, lapsed,
/// live ids, each asked twice with different untils) answers exactly what the same claims
/// made one by one answer; and many claims through two stores' batchers at once (every id
/// asked four times, duplicates inside batches and across the stores) let exactly one claim
/// per id win, every other asker told the winner's until (or the record's).
#[test]
fn batched_claims_decide_as_single_claims_did() {
    use lark_service::storage::{Db, EventClaim};
    let server = Server::start();
    let now = lark_service::storage::now_ms();
    let asks: Vec<(&str, u64)> = vec![
        ("new", now + 30_000),
        ("rec-0", now + 30_000),
        ("new", now + 40_000),
        ("lapsed", now + 50_000),
        ("live", now + 30_000),
        ("lapsed", now + 60_000),
        ("rec-1", now + 30_000),
        ("live", now + 35_000),
        ("new-2", now + 30_000),
    ];
    let at = now + 10;

    let one_by_one: Vec<EventClaim> = {
        let url = server.fresh_db();
        let db: Db = server.open(&url).into();
        claims_setup(&db, now);
        asks.iter()
            .map(|(id, until)| db.claim_event(id, *until, at).unwrap())
            .collect()
    };
    let url = server.fresh_db();
    let pa = server.open(&url);
    let (a, b): (Db, Db) = (pa.clone().into(), server.open(&url).into());
    claims_setup(&a, now);
    let batched = pa.claim_batch(&asks, at).unwrap();
    let record = now + 86_400_000;
    assert_eq!(
        one_by_one,
        vec![
            EventClaim::Won,
            EventClaim::Recorded(record),
            EventClaim::Held(now + 30_000),
            EventClaim::Won,
            EventClaim::Held(now + 20_000),
            EventClaim::Held(now + 50_000),
            EventClaim::Recorded(record),
            EventClaim::Held(now + 20_000),
            EventClaim::Won
        ]
    );
    assert_eq!(batched, one_by_one);
    // What the batch wrote is what the single claim then finds.
    for (id, held) in [
        ("new", now + 30_000),
        ("lapsed", now + 50_000),
        ("new-2", now + 30_000),
    ] {
        assert_eq!(
            b.claim_event(id, now + 90_000, at).unwrap(),
            EventClaim::Held(held),
            "{id}"
        );
    }

    // Through the batchers of both stores, all at once.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ids: Vec<String> = (0..300).map(|i| format!("c{i}")).collect();
    b.settle_events(&["c7", "c77", "c177"], record).unwrap();
    let answers = rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for round in 0..4u64 {
            for (k, id) in ids.iter().enumerate() {
                let st = if (k as u64 + round).is_multiple_of(2) {
                    a.clone()
                } else {
                    b.clone()
                };
                let (id, until) = (id.clone(), now + 30_000 + round);
                tasks.spawn(async move {
                    let got = st
                        .claim_event_batched(&id, until, now + 86_400_000, now)
                        .await
                        .unwrap();
                    (id, until, got)
                });
            }
        }
        tasks.join_all().await
    });
    assert_eq!(answers.len(), 4 * ids.len());
    for id in &ids {
        let mine: Vec<_> = answers.iter().filter(|(i, _, _)| i == id).collect();
        let won: Vec<u64> = mine
            .iter()
            .filter(|(_, _, c)| *c == EventClaim::Won)
            .map(|(_, u, _)| *u)
            .collect();
        let holder = if ["c7", "c77", "c177"].contains(&id.as_str()) {
            assert!(won.is_empty(), "{id}: a recorded id was claimed");
            EventClaim::Recorded(record)
        } else {
            assert_eq!(won.len(), 1, "{id}: {mine:?}");
            EventClaim::Held(won[0])
        };
        for (_, _, c) in mine.iter().filter(|(_, _, c)| *c != EventClaim::Won) {
            assert_eq!(*c, holder, "{id}: {mine:?}");
        }
        // The unbatched claim agrees.
        assert_eq!(
            a.claim_event(id, now + 90_000, now).unwrap(),
            holder,
            "{id}"
        );
    }

    // On redb nothing is queued: the answer is ready on the first poll.
    let dir = tempfile::tempdir().unwrap();
    let r: Db = lark_service::storage::Store::open(
        &dir.path().join("s.redb"),
        ring(),
        lark_service::storage::StoreOptions::default(),
    )
    .unwrap()
    .into();
    assert_eq!(
        futures_util::FutureExt::now_or_never(r.claim_event_batched(
            "x",
            now + 30_000,
            now + 86_400_000,
            now
        ))
        .map(Result::unwrap),
        Some(EventClaim::NotShared)
    );
}

/// A release lets go of this instance's claim only: a handler that fails after its claim
/// lapsed and was taken again by another instance leaves that claim (the other instance is
/// handling the event), and a release after the claim became a record leaves the record.
#[test]
fn a_release_leaves_a_claim_taken_again_since() {
    use lark_service::storage::{Db, EventClaim};
    let server = Server::start();
    let url = server.fresh_db();
    let (a, b): (Db, Db) = (server.open(&url).into(), server.open(&url).into());
    let now = lark_service::storage::now_ms();
    let record = now + 86_400_000;

    assert_eq!(
        a.claim_event("x", now + 1_000, now).unwrap(),
        EventClaim::Won
    );
    // A's claim lapses and B takes the event.
    assert_eq!(
        b.claim_event("x", now + 31_000, now + 1_000).unwrap(),
        EventClaim::Won
    );
    // A's handler fails late: B's claim stays.
    a.release_events(&["x"], now + 1_000).unwrap();
    assert_eq!(
        a.claim_event("x", now + 32_000, now + 1_001).unwrap(),
        EventClaim::Held(now + 31_000)
    );
    // B's own release lets it go.
    b.release_events(&["x"], now + 31_000).unwrap();
    assert_eq!(
        a.claim_event("x", now + 32_000, now + 1_001).unwrap(),
        EventClaim::Won
    );
    // Handled: a release (with the claim's until) after the record leaves the record.
    a.settle_events(&["x"], record).unwrap();
    a.release_events(&["x"], now + 32_000).unwrap();
    assert_eq!(
        b.claim_event("x", now + 40_000, now + 2_000).unwrap(),
        EventClaim::Recorded(record)
    );
}

/// A claim queued with its record's time (as the dispatcher queues every claim) becomes that
/// record when settled, whatever time the settle carries, and in place: PostgreSQL counts
/// every one of those settles as a HOT update (no index entry written). Until then it is held
/// until its claim's end only: lapsed, another instance takes it. A release after the record
/// leaves the record.
#[test]
fn a_claim_made_with_its_records_time_becomes_that_record_in_place() {
    use lark_service::storage::{Db, EventClaim};
    let server = Server::start();
    let url = server.fresh_db();
    let (a, b): (Db, Db) = (server.open(&url).into(), server.open(&url).into());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let now = lark_service::storage::now_ms();
    let (until, keep) = (now + 30_000, now + 86_400_000);
    let ids: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
    for id in &ids {
        assert_eq!(
            rt.block_on(a.claim_event_batched(id, until, keep, now))
                .unwrap(),
            EventClaim::Won
        );
    }
    // Held by the claim: until its end, not its record's time.
    assert_eq!(
        b.claim_event("k0", now + 40_000, now + 1).unwrap(),
        EventClaim::Held(until)
    );
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    a.settle_events(&refs, keep + 5_000).unwrap();
    let updates = || {
        let got = sql(
            &url,
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables
             WHERE relname = 'ls_seen_events'",
        );
        let n = |i: usize| got[0][i].as_deref().unwrap().parse::<u64>().unwrap();
        (n(0), n(1))
    };
    // The batcher's connection reports its counts when it goes idle (within about 10 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let (upd, hot) = loop {
        let (upd, hot) = updates();
        if upd >= 40 || std::time::Instant::now() > deadline {
            break (upd, hot);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(
        (upd, hot),
        (40, 40),
        "(updates, HOT updates) of the settles"
    );
    for id in &refs {
        assert_eq!(
            b.claim_event(id, now + 40_000, now + 2).unwrap(),
            EventClaim::Recorded(keep),
            "{id}"
        );
    }
    a.release_events(&["k1"], until).unwrap();
    assert_eq!(
        b.claim_event("k1", now + 40_000, now + 2).unwrap(),
        EventClaim::Recorded(keep)
    );
    // A claim that lapsed (its record's time far off) is free, and a release with its end
    // lets go of it.
    assert_eq!(
        rt.block_on(a.claim_event_batched("gone", now + 5, keep, now))
            .unwrap(),
        EventClaim::Won
    );
    assert_eq!(
        b.claim_event("gone", now + 40_000, now + 10).unwrap(),
        EventClaim::Won
    );
    b.release_events(&["gone"], now + 40_000).unwrap();
    assert_eq!(
        rt.block_on(a.claim_event_batched("gone", now + 50_000, keep, now + 20))
            .unwrap(),
        EventClaim::Won
    );
    a.release_events(&["gone"], now + 50_000).unwrap();
    assert_eq!(
        b.claim_event("gone", now + 60_000, now + 30).unwrap(),
        EventClaim::Won
    );
}

/// Settles and claims in one statement (what the claim batcher sends per batch): the settled
/// ids are records once it returns (another instance finds them), a settle keeps the later of
/// two record times, a claim of an id settled in the same batch finds the record, and the
/// claims beside them decide as claims alone do (new: won; live claim elsewhere: held; lapsed:
/// won).
#[test]
fn settles_ride_with_claims_in_one_statement() {
    use lark_service::storage::{Db, EventClaim};
    let server = Server::start();
    let url = server.fresh_db();
    let pa = server.open(&url);
    let (a, b): (Db, Db) = (pa.clone().into(), server.open(&url).into());
    let now = lark_service::storage::now_ms();
    let record = now + 86_400_000;
    let later = record + 1_000;

    assert_eq!(
        a.claim_event("mine", now + 30_000, now).unwrap(),
        EventClaim::Won
    );
    assert_eq!(
        b.claim_event("live", now + 20_000, now).unwrap(),
        EventClaim::Won
    );
    assert_eq!(
        b.claim_event("lapsed", now + 5, now).unwrap(),
        EventClaim::Won
    );
    b.settle_events(&["old-rec"], later).unwrap();

    let got = pa
        .settle_and_claim_batch(
            &[
                ("mine", record),
                ("unclaimed", record),
                ("old-rec", record),
                ("mine", record - 7),
            ],
            &[
                ("new", now + 30_000),
                ("mine", now + 30_000),
                ("live", now + 30_000),
                ("lapsed", now + 40_000),
                ("new", now + 35_000),
            ],
            now + 10,
        )
        .unwrap();
    assert_eq!(
        got,
        vec![
            EventClaim::Won,
            EventClaim::Recorded(record),
            EventClaim::Held(now + 20_000),
            EventClaim::Won,
            EventClaim::Held(now + 30_000)
        ]
    );
    // Committed, and seen from the other instance's connections.
    for (id, held) in [
        ("mine", EventClaim::Recorded(record)),
        ("unclaimed", EventClaim::Recorded(record)),
        ("old-rec", EventClaim::Recorded(later)),
        ("new", EventClaim::Held(now + 30_000)),
        ("live", EventClaim::Held(now + 20_000)),
        ("lapsed", EventClaim::Held(now + 40_000)),
    ] {
        assert_eq!(
            b.claim_event(id, now + 90_000, now + 20).unwrap(),
            held,
            "{id}"
        );
    }
    // Only settles, only claims, nothing: each is one statement too.
    assert_eq!(
        pa.settle_and_claim_batch(&[("new", record)], &[], now)
            .unwrap(),
        vec![]
    );
    assert_eq!(
        b.claim_event("new", now + 90_000, now + 20).unwrap(),
        EventClaim::Recorded(record)
    );
    assert_eq!(pa.settle_and_claim_batch(&[], &[], now).unwrap(), vec![]);
    // A bad id spoils nothing it did not touch: refused before anything is sent.
    let long = "x".repeat(10_000);
    assert!(matches!(
        pa.settle_and_claim_batch(&[(&long, record)], &[("other", now + 30_000)], now),
        Err(Error::Invalid(_))
    ));
    assert_eq!(
        b.claim_event("other", now + 30_000, now + 20).unwrap(),
        EventClaim::Won
    );
}

/// The dispatcher's settles go through the claim batcher, carried by the round trip of the
/// claims queued meanwhile: while claims stream through the batcher, every settle returns only
/// once its records are committed (a fresh connection of another instance finds each one the
/// moment it returns), a settle made from inside a runtime (the writer's fallback after close)
/// neither panics nor hangs, and every claim is still decided exactly once.
#[test]
fn settles_through_the_batcher_are_durable_when_they_return() {
    use lark_service::storage::{Db, EventClaim};
    let server = Server::start();
    let url = server.fresh_db();
    let (a, b): (Db, Db) = (server.open(&url).into(), server.open(&url).into());
    let now = lark_service::storage::now_ms();
    let record = now + 86_400_000;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // A stream of claims through A's batcher, from a runtime, as the dispatchers make them.
    let claimer = {
        let a = a.clone();
        rt.spawn(async move {
            let mut won = 0;
            for round in 0..40 {
                let mut tasks = tokio::task::JoinSet::new();
                for k in 0..32 {
                    let (a, id) = (a.clone(), format!("stream-{round}-{k}"));
                    tasks.spawn(async move {
                        a.claim_event_batched(&id, now + 30_000, now + 86_400_000, now)
                            .await
                            .unwrap()
                    });
                }
                won += tasks
                    .join_all()
                    .await
                    .into_iter()
                    .filter(|c| *c == EventClaim::Won)
                    .count();
            }
            won
        })
    };
    // Meanwhile the writer settles what it claimed, group after group.
    for g in 0..40 {
        let ids: Vec<String> = (0..8).map(|k| format!("done-{g}-{k}")).collect();
        for id in &ids {
            assert_eq!(
                rt.block_on(a.claim_event_batched(id, now + 30_000, now + 86_400_000, now))
                    .unwrap(),
                EventClaim::Won
            );
        }
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        a.settle_events(&refs, record).unwrap();
        for id in &ids {
            assert_eq!(
                b.claim_event(id, now + 30_000, now).unwrap(),
                EventClaim::Recorded(record),
                "{id} was not recorded when its settle returned"
            );
        }
    }
    assert_eq!(rt.block_on(claimer).unwrap(), 40 * 32);
    // From inside the runtime (the seen-id writer's fallback once it is closed).
    rt.block_on(async {
        a.settle_events(&["late"], record).unwrap();
    });
    assert_eq!(
        b.claim_event("late", now + 30_000, now).unwrap(),
        EventClaim::Recorded(record)
    );
}

/// The claim batcher's own connection lost (PostgreSQL restarted it, or a proxy cut it): the
/// batch it was running fails as unavailable (it may have committed: the dispatcher decides),
/// and the next batch opens a new connection and decides as before.
#[test]
fn the_claim_batcher_reconnects_after_losing_its_connection() {
    use lark_service::storage::{Db, EventClaim};
    let server = Server::start();
    let url = server.fresh_db();
    let (a, b): (Db, Db) = (server.open(&url).into(), server.open(&url).into());
    let db_name = url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let now = lark_service::storage::now_ms();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    assert_eq!(
        rt.block_on(a.claim_event_batched("before", now + 30_000, now + 86_400_000, now))
            .unwrap(),
        EventClaim::Won
    );
    // Every other backend of this database goes (the batcher's among them).
    let kill = format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE datname = '{db_name}' AND pid <> pg_backend_pid()"
    );
    server.psql("postgres", &kill);
    let mut outcomes = Vec::new();
    for k in 0..3 {
        outcomes.push(rt.block_on(a.claim_event_batched(
            &format!("after-{k}"),
            now + 30_000,
            now + 86_400_000,
            now,
        )));
    }
    // At most the first fails (and only as unavailable); then claims are decided again.
    assert!(
        matches!(
            &outcomes[0],
            Ok(EventClaim::Won) | Err(Error::Unavailable(_))
        ),
        "{:?}",
        outcomes[0]
    );
    assert!(
        matches!(outcomes[1], Ok(EventClaim::Won)),
        "{:?}",
        outcomes[1]
    );
    assert!(
        matches!(outcomes[2], Ok(EventClaim::Won)),
        "{:?}",
        outcomes[2]
    );
    assert_eq!(
        b.claim_event("after-2", now + 40_000, now).unwrap(),
        EventClaim::Held(now + 30_000)
    );
    assert_eq!(
        b.claim_event("before", now + 40_000, now).unwrap(),
        EventClaim::Held(now + 30_000)
    );
}

/// A unit the server ends in the middle (`57P01`: `pg_terminate_backend`, a fast shutdown)
/// fails as `Unavailable`, not as an engine error, and its connection is never handed to the
/// next unit: the server's error arrives before the client sees the socket close, and a
/// pooled connection taken in that gap failed the next unit too.
#[test]
fn a_connection_the_server_ended_is_not_handed_to_the_next_unit() {
    let server = Server::start();
    let url = server.fresh_db();
    let store: lark_service::storage::Db = server.open(&url).into();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut locker = rt
        .block_on(lark_service::net::postgres::connect_pg(&url, &net()))
        .unwrap();
    let now = lark_service::storage::now_ms();
    for round in 0..20 {
        // Another session holds the seen-id table, so the store's claim waits on PostgreSQL.
        let tx = rt.block_on(locker.transaction()).unwrap();
        rt.block_on(tx.batch_execute("LOCK TABLE ls_seen_events IN ACCESS EXCLUSIVE MODE"))
            .unwrap();
        let waiting = {
            let store = store.clone();
            std::thread::spawn(move || {
                store.claim_event(&format!("held-{round}"), now + 30_000, now)
            })
        };
        let killed = loop {
            let row = rt
                .block_on(tx.query_one(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    &[],
                ))
                .unwrap();
            if row.get::<_, i64>(0) > 0 {
                break true;
            }
            if waiting.is_finished() {
                break false;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        };
        assert!(killed, "round {round}: the claim never waited on the lock");
        rt.block_on(tx.rollback()).unwrap();
        let ended = waiting.join().unwrap();
        assert!(
            matches!(ended, Err(Error::Unavailable(_))),
            "round {round}: {ended:?}"
        );
        let next = store.claim_event(&format!("next-{round}"), now + 30_000, now);
        assert!(
            matches!(next, Ok(lark_service::storage::EventClaim::Won)),
            "round {round}: {next:?}"
        );
    }
}

/// A release on the claim batcher's connection that PostgreSQL aborts as a deadlock victim
/// (`40P01`) is run again, as a unit on a pooled connection is: the release must end done,
/// and the ids be free, not left held until their claims lapse.
#[test]
fn a_release_picked_as_a_deadlock_victim_is_run_again() {
    use lark_service::storage::{Db, EventClaim};
    let server = Server::start();
    let url = server.fresh_db();
    let pg = server.open(&url);
    let db: Db = pg.clone().into();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let now = lark_service::storage::now_ms();
    let until = now + 30_000;
    let keep = now + 86_400_000;
    let ids = ["rel-a", "rel-b"];
    let claimed = rt
        .block_on(db.claim_events_batched(&ids, until, keep, now))
        .unwrap();
    assert_eq!(claimed, vec![EventClaim::Won, EventClaim::Won]);

    let mut locker = rt
        .block_on(lark_service::net::postgres::connect_pg(&url, &net()))
        .unwrap();
    let tx = rt.block_on(locker.transaction()).unwrap();
    // Only the release (PostgreSQL's default of 1 s) looks for the deadlock, so it is the
    // one rolled back however the two processes are scheduled.
    rt.block_on(tx.batch_execute("SET LOCAL deadlock_timeout = '60s'"))
        .unwrap();
    let lock = |id: &str| format!("SELECT 1 FROM ls_seen_events WHERE id = '{id}' FOR UPDATE");
    rt.block_on(tx.batch_execute(&lock("rel-b"))).unwrap();
    // The release deletes rel-a, then waits for rel-b.
    let release = {
        let db = db.clone();
        rt.spawn(async move { db.release_events_queued(&ids, until).await })
    };
    let waits = "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'";
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while rt
        .block_on(tx.query_one(waits, &[]))
        .unwrap()
        .get::<_, i64>(0)
        == 0
    {
        assert!(
            std::time::Instant::now() < give_up,
            "the release never waited"
        );
        rt.block_on(async { tokio::time::sleep(std::time::Duration::from_millis(5)).await });
    }
    // Now this session waits for rel-a: a deadlock. The release finds it and is rolled back;
    // this session then gets rel-a.
    rt.block_on(tx.batch_execute(&lock("rel-a"))).unwrap();
    rt.block_on(tx.rollback()).unwrap();
    let released = rt.block_on(release).unwrap();
    assert!(released.is_ok(), "{released:?}");
    assert!(pg.retried() >= 1, "the release was not run again");
    let again = rt
        .block_on(db.claim_events_batched(&ids, until + 1, keep, now))
        .unwrap();
    assert_eq!(again, vec![EventClaim::Won, EventClaim::Won]);
}

/// The claim batcher prepares its statement once, and PostgreSQL soon runs it with a generic
/// plan, costed without the batch's ids. That plan must find each held id by its key, never by
/// reading the whole seen-id table: a join planned while the table was small did, and every
/// batch then cost time in proportion to every id ever seen.
#[test]
fn the_claim_batchers_plan_never_reads_the_whole_seen_id_table() {
    let server = Server::start();
    let url = server.fresh_db();
    let store = server.open(&url);
    let whole_table = |plan: &str| {
        plan.lines()
            .any(|l| l.contains("Seq Scan on ls_seen_events"))
    };
    let plan = store.testing_claim_round_plan().unwrap();
    assert!(!whole_table(&plan), "on an empty table:\n{plan}");
    let now = lark_service::storage::now_ms();
    let ids: Vec<String> = (0..20_000).map(|i| format!("ev-{i:05}")).collect();
    for chunk in ids.chunks(2_000) {
        let settles: Vec<(&str, u64)> =
            chunk.iter().map(|id| (id.as_str(), now + 60_000)).collect();
        store.settle_and_claim_batch(&settles, &[], now).unwrap();
    }
    let db = url.rsplit('/').next().unwrap().split('?').next().unwrap();
    server.psql(db, "ANALYZE ls_seen_events");
    let plan = store.testing_claim_round_plan().unwrap();
    assert!(!whole_table(&plan), "on 20 000 ids:\n{plan}");
}

/// Two instances given the same event at once claim its two keys (its event id and its
/// message's id) together: one statement decides both on each instance, so one instance gets
/// both and the other neither. Claimed apart (two requests, which the batcher can send in two
/// statements), each could take one key, and both would let the event go.
#[test]
fn keys_claimed_together_go_to_one_instance_whole() {
    use lark_service::storage::{Db, EventClaim};
    let server = Server::start();
    let url = server.fresh_db();
    let (a, b): (Db, Db) = (server.open(&url).into(), server.open(&url).into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let now = lark_service::storage::now_ms();
    let (until, keep) = (now + 30_000, now + 86_400_000);
    let split = rt.block_on(async {
        let mut split = Vec::new();
        for round in 0..300 {
            let keys = [format!("ev-{round}"), format!("msg:om-{round}")];
            let ids: Vec<&str> = keys.iter().map(String::as_str).collect();
            // Other claims keep both batchers busy, so that each request meets batches in
            // flight, as under load.
            let noise = |db: &Db, side: &str| {
                let (db, side) = (db.clone(), side.to_owned());
                tokio::spawn(async move {
                    for k in 0..3 {
                        let id = format!("noise-{side}-{round}-{k}");
                        db.claim_event_batched(&id, until, keep, now).await.unwrap();
                    }
                })
            };
            let (na, nb) = (noise(&a, "a"), noise(&b, "b"));
            let (x, y) = tokio::join!(
                a.claim_events_batched(&ids, until, keep, now),
                b.claim_events_batched(&ids, until, keep, now)
            );
            let (x, y) = (x.unwrap(), y.unwrap());
            na.await.unwrap();
            nb.await.unwrap();
            let won = |v: &[EventClaim]| v.iter().filter(|c| **c == EventClaim::Won).count();
            assert_eq!(won(&x) + won(&y), 2, "round {round}: {x:?} {y:?}");
            if won(&x) == 1 {
                split.push(round);
            }
            for c in x.iter().chain(&y) {
                assert!(
                    *c == EventClaim::Won || *c == EventClaim::Held(until),
                    "round {round}: {c:?}"
                );
            }
        }
        split
    });
    assert!(
        split.is_empty(),
        "keys split between the instances in rounds {split:?}"
    );
}

/// Runs one event (`ev-held`) through a dispatcher on a one-thread runtime while another
/// session locks the event's row once its claim is there; then the handler ends (`Ok` when
/// `succeed`, else an error). With `close_first`, the dispatcher's seen-id writer is closed
/// (as at shutdown) before the handler ends. What the dispatcher then asks of PostgreSQL (a
/// release, a record) waits on that lock. Returns the outcome, whether the runtime kept
/// running its other tasks meanwhile, and the store (the lock is gone) with its server.
fn dispatch_while_the_row_is_locked(
    succeed: bool,
    close_first: bool,
) -> (
    lark_service::events::Outcome,
    bool,
    lark_service::storage::Db,
    Server,
) {
    use lark_service::callbacks::parse_event_payload;
    use lark_service::events::{DispatchConfig, Dispatcher, EventSource, Handler, HandlerReply};
    use lark_service::storage::Db;
    use lark_service::workers::Supervisor;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    let server = Server::start();
    let url = server.fresh_db();
    let store: Db = server.open(&url).into();
    let body = serde_json::json!({
        "schema": "2.0",
        "header": {"event_id": "ev-held", "event_type": "im.message.receive_v1", "create_time": "1", "token": "t", "app_id": "cli_x", "tenant_key": "tk"},
        "event": {}
    });
    let event = parse_event_payload(&serde_json::to_vec(&body).unwrap()).unwrap();
    // The handler waits until the row is locked (and the writer closed, if asked), then ends.
    let locked = Arc::new(tokio::sync::Semaphore::new(0));
    let gate = locked.clone();
    let handler: Handler = Arc::new(move |_cb| {
        let gate = gate.clone();
        Box::pin(async move {
            let _pass = gate.acquire().await.unwrap();
            if succeed {
                Ok(HandlerReply::Done)
            } else {
                Err("boom".into())
            }
        })
    });
    // Ticks while the runtime thread is free.
    let ticks = Arc::new(AtomicUsize::new(0));
    let ran_while_locked = Arc::new(AtomicBool::new(false));
    let closed = Arc::new(AtomicBool::new(!close_first));

    // Another session: locks the claim's row once it is there, lets the handler end (once
    // the writer is closed, if asked), and keeps the lock until the runtime has ticked on
    // (or 10 s went by).
    let locker = {
        let (url, locked, ticks, ran, closed) = (
            url.clone(),
            locked.clone(),
            ticks.clone(),
            ran_while_locked.clone(),
            closed.clone(),
        );
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut c = lark_service::net::postgres::connect_pg(&url, &net())
                    .await
                    .unwrap();
                let give_up = std::time::Instant::now() + std::time::Duration::from_secs(20);
                let tx = loop {
                    let tx = c.transaction().await.unwrap();
                    let rows = tx
                        .query(
                            "SELECT 1 FROM ls_seen_events WHERE id = 'ev-held' FOR UPDATE",
                            &[],
                        )
                        .await
                        .unwrap();
                    if !rows.is_empty() {
                        break tx;
                    }
                    drop(tx);
                    assert!(std::time::Instant::now() < give_up, "the claim never came");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                };
                while !closed.load(Ordering::SeqCst) {
                    assert!(
                        std::time::Instant::now() < give_up,
                        "the writer never closed"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                locked.add_permits(1);
                // The dispatcher's statement is now waiting on this lock (or about to).
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                let from = ticks.load(Ordering::SeqCst);
                let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while std::time::Instant::now() < until {
                    if ticks.load(Ordering::SeqCst) >= from + 5 {
                        ran.store(true, Ordering::SeqCst);
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                tx.commit().await.unwrap();
            });
        })
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let outcome = rt.block_on(async {
        let sup = Supervisor::default();
        let cfg = DispatchConfig {
            ack_deadline: std::time::Duration::from_secs(30),
            ..DispatchConfig::default()
        };
        let d = Dispatcher::new(store.clone(), cfg, &sup);
        d.set_handler(handler);
        let ticker = {
            let ticks = ticks.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    ticks.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        let (outcome, ()) = tokio::join!(d.dispatch(event, EventSource::WebSocket), async {
            if close_first {
                d.close().await;
                closed.store(true, Ordering::SeqCst);
            }
        });
        ticker.abort();
        if !close_first {
            d.close().await;
        }
        outcome
    });
    locker.join().unwrap();
    (
        outcome,
        ran_while_locked.load(Ordering::SeqCst),
        store,
        server,
    )
}

/// A handler fails, and the dispatcher lets its claim go while another session holds the
/// claim's row: the release waits on PostgreSQL, and the runtime that ran the dispatcher (one
/// thread) goes on running its other tasks meanwhile; once the row is free, the release is
/// done and the event is free to claim.
#[test]
fn letting_a_claim_go_never_holds_the_dispatchers_runtime_thread() {
    use lark_service::events::Outcome;
    use lark_service::storage::EventClaim;
    let (outcome, ran_while_locked, store, _server) =
        dispatch_while_the_row_is_locked(false, false);
    assert_eq!(outcome, Outcome::Failed);
    assert!(
        ran_while_locked,
        "the runtime thread was held while the release waited on PostgreSQL"
    );
    // The release went through once the row was free: the event is free to claim.
    let now = lark_service::storage::now_ms();
    assert_eq!(
        store.claim_event("ev-held", now + 60_000, now).unwrap(),
        EventClaim::Won
    );
}

/// A handler ends after the seen-id writer closed (shutdown) while another session holds the
/// claim's row: the claim still becomes a record (or it would lapse and another instance
/// handle the event again), and recording it waits on PostgreSQL without holding the
/// dispatcher's runtime thread.
#[test]
fn recording_an_event_after_the_writer_closed_never_holds_the_runtime_thread() {
    use lark_service::events::{HandlerReply, Outcome};
    use lark_service::storage::EventClaim;
    let (outcome, ran_while_locked, store, _server) = dispatch_while_the_row_is_locked(true, true);
    assert_eq!(outcome, Outcome::Handled(HandlerReply::Done));
    assert!(
        ran_while_locked,
        "the runtime thread was held while the record waited on PostgreSQL"
    );
    // A record (kept for the seen-id TTL, a day), not a claim (30 s) nor free.
    let now = lark_service::storage::now_ms();
    match store.claim_event("ev-held", now + 60_000, now).unwrap() {
        EventClaim::Recorded(t) => {
            assert!(t > now + 3_600_000, "recorded only until {t} (now {now})");
        }
        other => panic!("{other:?}"),
    }
}

/// A dispatcher on `db` (default config) on a two-thread runtime, its handler counting its
/// calls; the supervisor it runs under is returned to be kept.
fn counting_dispatcher(
    db: lark_service::storage::Db,
) -> (
    tokio::runtime::Runtime,
    lark_service::workers::Supervisor,
    lark_service::events::Dispatcher,
    std::sync::Arc<AtomicUsize>,
) {
    use lark_service::events::{DispatchConfig, Dispatcher, HandlerReply};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sup = lark_service::workers::Supervisor::default();
    let d = rt.block_on(async { Dispatcher::new(db, DispatchConfig::default(), &sup) });
    let calls = std::sync::Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    d.set_handler(std::sync::Arc::new(move |_cb| {
        c.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(HandlerReply::Done) })
    }));
    (rt, sup, d, calls)
}

/// An event with id `id` and no message (one de-duplication key).
fn plain_event(id: &str) -> lark_service::callbacks::Callback {
    let body = serde_json::json!({
        "schema": "2.0",
        "header": {"event_id": id, "event_type": "contact.user.updated_v3", "create_time": "1", "token": "t", "app_id": "cli_x", "tenant_key": "tk"},
        "event": {}
    });
    lark_service::callbacks::parse_event_payload(&serde_json::to_vec(&body).unwrap()).unwrap()
}

/// Another instance's claim longer than this dispatcher's own (its ACK deadline configured
/// longer, or its clock ahead) is a handler in flight there, not a record: the delivery here is
/// refused for redelivery and its handler does not run. (Told apart by time, the claim read
/// as a record, the delivery was answered as a duplicate, and the event was lost if the other
/// handler then failed.) Once the other instance records the event, it is a duplicate here.
#[test]
fn a_longer_claim_elsewhere_is_never_taken_for_a_record() {
    use lark_service::events::{EventSource, Outcome};
    use lark_service::storage::{Db, EventClaim};
    let server = Server::start();
    let url = server.fresh_db();
    let (a, b): (Db, Db) = (server.open(&url).into(), server.open(&url).into());
    let now = lark_service::storage::now_ms();
    // The other instance holds the event for ten minutes, twenty times this one's claim.
    assert_eq!(
        b.claim_event("ev_long", now + 600_000, now).unwrap(),
        EventClaim::Won
    );
    let (rt, _sup, d, calls) = counting_dispatcher(a);
    let event = || plain_event("ev_long");
    assert_eq!(
        rt.block_on(d.dispatch(event(), EventSource::WebSocket)),
        Outcome::Failed
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "handled beside a live claim"
    );
    // The other handler succeeds: recorded, a duplicate here.
    b.settle_events(&["ev_long"], now + 86_400_000).unwrap();
    assert_eq!(
        rt.block_on(d.dispatch(event(), EventSource::WebSocket)),
        Outcome::Duplicate
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    rt.block_on(d.close());
}

/// When PostgreSQL cannot answer a claim, the event is not handled on a guess: it is answered
/// as failed (the platform delivers it again) and its handler does not run; once PostgreSQL is
/// back, the same event is claimed and handled.
#[test]
fn an_event_whose_claim_cannot_be_decided_is_refused_not_handled() {
    use lark_service::events::{EventSource, HandlerReply, Outcome};
    use lark_service::storage::Db;
    let server = Server::start();
    let url = server.fresh_db();
    let db: Db = server.open(&url).into();
    let (rt, _sup, d, calls) = counting_dispatcher(db);
    let event = || plain_event("ev_undecided");
    server.pg.stop_immediate();
    let out = rt.block_on(d.dispatch(event(), EventSource::WebSocket));
    assert_eq!(out, Outcome::Failed);
    assert_eq!(calls.load(Ordering::SeqCst), 0, "not handled on a guess");
    server.pg.start_server();
    let mut out = Outcome::Failed;
    for _ in 0..100 {
        out = rt.block_on(d.dispatch(event(), EventSource::WebSocket));
        if out != Outcome::Failed {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(out, Outcome::Handled(HandlerReply::Done));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    rt.block_on(d.close());
}
