//! Key rotation and backups of the PostgreSQL store, on a real, throw-away PostgreSQL: a
//! rotation while another instance reads and writes (every token readable throughout, all
//! under the new key after, the key check last), resumed after an interruption, refused while a
//! live instance lacks the key; a backup restored to redb holds the same sessions and tokens
//! (opened and compared), grants, outbox entries and apps, and loads back into PostgreSQL;
//! scheduled backups on two real instances run on one of them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::pg::Pg;
use lark_service::backup::{restore_backup, write_backup_db, Protection};
use lark_service::net::{Net, NetOptions};
use lark_service::storage::postgres::{InstanceRow, PgOptions, PgStore, RotationCursor};
use lark_service::storage::{
    AppRow, AppStatus, AuthSession, Db, DevicePoll, Error, ExpiringGrant, Key, KeyId, Keyring,
    OutboxEntry, OutboxEvent, SecretKey, SeenEvents, SessionId, SessionStore, Store, StoreOptions,
    TokenStore, UserInfo, UserStore, UserToken,
};
use secrecy::{ExposeSecret, SecretString};

const OLD: [u8; 32] = [1; 32];
const NEW: [u8; 32] = [2; 32];

fn key_id(bytes: &[u8; 32]) -> KeyId {
    Key::from_bytes(bytes).id()
}

/// The old key alone (before the rotation).
fn old_ring() -> Keyring {
    Keyring::new(Key::from_bytes(&OLD), vec![])
}

/// The new key active, the old one kept for reading.
fn new_ring() -> Keyring {
    Keyring::new(Key::from_bytes(&NEW), vec![Key::from_bytes(&OLD)])
}

/// The new key alone (after the rotation, the old one dropped).
fn new_only() -> Keyring {
    Keyring::new(Key::from_bytes(&NEW), vec![])
}

fn net() -> Net {
    Net::new(&NetOptions::default()).unwrap()
}

fn now() -> u64 {
    lark_service::storage::now_ms()
}

struct Server {
    pg: Pg,
}

impl Server {
    fn start() -> Self {
        Self { pg: Pg::start() }
    }

    fn fresh_db(&self) -> String {
        self.pg.fresh_db()
    }
}

fn open(url: &str, ring: Keyring) -> PgStore {
    PgStore::open(url, &net(), ring, PgOptions::default()).unwrap()
}

fn secret(s: String) -> SecretString {
    SecretString::from(s)
}

fn token(user: &str, gen: u64) -> UserToken {
    UserToken {
        app_id: "cli_keys".into(),
        user_id: user.into(),
        open_id: Some(format!("ou_{user}")),
        access_token: secret(format!("acc-{user}-{gen}")),
        refresh_token: Some(secret(format!("ref-{user}-{gen}"))),
        expires_at: now() + 7_200_000,
        refresh_expires_at: None,
        refresh_due_at: now() + 3_600_000,
        scopes: vec!["contact:read".into()],
        obtained_at: now(),
        session_id: None,
        needs_reauth: false,
        refresh_in_doubt_since: None,
    }
}

fn session(user: &str) -> AuthSession {
    let mut s = AuthSession::new_pending("cli_keys", user, vec![], now(), 600_000);
    s.pkce_verifier = Some(secret(format!("pkce-{user}")));
    s.access_token = Some(secret(format!("sacc-{user}")));
    s.refresh_token = Some(secret(format!("sref-{user}")));
    s
}

/// `sessions` sessions and `tokens` tokens, written by an instance holding only the old key.
fn fill(url: &str, sessions: usize, tokens: usize) -> Vec<AuthSession> {
    let store = open(url, old_ring());
    let all: Vec<AuthSession> = (0..sessions).map(|i| session(&format!("s{i}"))).collect();
    for chunk in all.chunks(200) {
        store.put_sessions(chunk).unwrap();
    }
    for i in 0..tokens {
        store.put_token(&token(&format!("t{i}"), 0)).unwrap();
    }
    all
}

/// Heartbeat of an instance holding `ring`, seen now.
fn beat(store: &PgStore, holder: &str) {
    let me = InstanceRow {
        holder: holder.into(),
        host: "host".into(),
        pid: 1,
        version: "test".into(),
        started_at: now(),
        last_seen: now(),
    };
    store.heartbeat(&me, 15_000).unwrap();
}

fn sealed_by_key(store: &PgStore) -> Vec<(String, u64)> {
    store
        .key_status()
        .unwrap()
        .sealed_fields_by_key
        .into_iter()
        .collect()
}

/// A rotation while another instance (its own pool) keeps reading every token and writing
/// sessions and tokens: no read fails or misses, and after it every sealed column and the key
/// check are under the new key, so a store holding only the new key opens and reads everything.
#[test]
fn rotation_runs_while_another_instance_reads_and_writes() {
    let server = Server::start();
    let url = server.fresh_db();
    let sessions = fill(&url, 600, 400);
    let rotator = open(&url, new_ring());
    let serving = open(&url, new_ring());
    beat(&serving, "host/2/serving");
    assert!(rotator.rotation_pending().unwrap());
    let st = rotator.key_status().unwrap();
    assert!(st.rotation_pending);
    assert_eq!(st.store_key, key_id(&OLD).to_string());

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let worker = {
        let (stop, reads, serving) = (stop.clone(), reads.clone(), serving.clone());
        std::thread::spawn(move || {
            let mut gen = 1u64;
            let mut written = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                for i in 0..400 {
                    let user = format!("t{i}");
                    let t = serving.get_token("cli_keys", &user).unwrap().unwrap();
                    let acc = t.access_token.expose_secret().to_owned();
                    assert!(acc.starts_with(&format!("acc-{user}-")), "{acc}");
                    reads.fetch_add(1, Ordering::Relaxed);
                    if i % 50 == 0 {
                        // A refresh: the new token sealed under the instance's active key.
                        serving.put_token(&token(&user, gen)).unwrap();
                        let s = session(&format!("w{gen}"));
                        serving.put_session(&s).unwrap();
                        written.push(s);
                        gen += 1;
                    }
                }
            }
            written
        })
    };
    let mut calls = 0;
    let report = rotator
        .rotate_keys(50, &mut |done, total| {
            calls += 1;
            assert!(done <= total, "{done}/{total}");
        })
        .unwrap();
    let reads_during = reads.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    let written = worker.join().unwrap();
    assert!(
        reads_during > 0,
        "the other instance read during the rotation"
    );
    assert!(calls >= 1000 / 50, "a progress call per batch: {calls}");
    assert!(report.resealed >= 1, "{report:?}");
    assert!(report.resealed <= 1000, "{report:?}");

    let st = rotator.key_status().unwrap();
    assert!(!st.rotation_pending, "{st:?}");
    assert_eq!(st.store_key, key_id(&NEW).to_string());
    assert_eq!(
        sealed_by_key(&rotator)
            .iter()
            .map(|(k, _)| k.clone())
            .collect::<Vec<_>>(),
        vec![key_id(&NEW).to_string()]
    );
    assert!(!rotator.rotation_pending().unwrap());
    assert!(!Db::from(rotator.clone()).rotation_pending().unwrap());

    // The old key can go: a store with the new key alone opens (the key check) and reads all.
    let after = open(&url, new_only());
    for s in sessions.iter().chain(&written) {
        let got = after.get_session(s.session_id).unwrap().unwrap();
        assert_eq!(
            got.pkce_verifier.unwrap().expose_secret(),
            s.pkce_verifier.as_ref().unwrap().expose_secret()
        );
        assert_eq!(
            got.access_token.unwrap().expose_secret(),
            s.access_token.as_ref().unwrap().expose_secret()
        );
    }
    for i in 0..400 {
        let user = format!("t{i}");
        let t = after.get_token("cli_keys", &user).unwrap().unwrap();
        assert!(t
            .access_token
            .expose_secret()
            .starts_with(&format!("acc-{user}-")));
        assert!(t
            .refresh_token
            .unwrap()
            .expose_secret()
            .starts_with(&format!("ref-{user}-")));
    }
    // And one holding the old key alone no longer opens the store.
    let err = PgStore::open(&url, &net(), old_ring(), PgOptions::default()).unwrap_err();
    assert!(matches!(err, Error::WrongKey { .. }), "{err}");
}

/// A rotation stopped after a few batches leaves the store readable and the rotation pending
/// (the key check is still the old key's); run again, it re-seals only what is left.
#[test]
fn an_interrupted_rotation_resumes_where_it_stopped() {
    let server = Server::start();
    let url = server.fresh_db();
    fill(&url, 120, 80);
    let store = open(&url, new_ring());
    let total = store.rows_to_reseal().unwrap();
    assert_eq!(total, 200);
    let mut cur = RotationCursor::default();
    for _ in 0..3 {
        store.rotation_batch(&mut cur, 25).unwrap();
    }
    let first = cur.report.resealed;
    assert_eq!(first, 75);
    drop(cur); // interrupted: nothing of it is kept but the rows themselves
    let st = store.key_status().unwrap();
    assert!(st.rotation_pending, "{st:?}");
    assert_eq!(st.store_key, key_id(&OLD).to_string());
    assert_eq!(store.rows_to_reseal().unwrap(), total - first);
    // Every record still opens (some under each key).
    let by_key = sealed_by_key(&store);
    assert_eq!(by_key.len(), 2, "{by_key:?}");
    assert!(store.get_token("cli_keys", "t0").unwrap().is_some());

    let report = store.rotate_keys(40, &mut |_, _| {}).unwrap();
    assert_eq!(report.resealed, total - first, "only what was left");
    assert_eq!(store.rows_to_reseal().unwrap(), 0);
    let st = store.key_status().unwrap();
    assert!(!st.rotation_pending, "{st:?}");
    // Nothing left: a second run re-seals nothing and stays done.
    assert_eq!(store.rotate_keys(40, &mut |_, _| {}).unwrap().resealed, 0);
}

fn device_poll(i: usize) -> DevicePoll {
    DevicePoll {
        session_id: SessionId::random(),
        app_id: "cli_keys".into(),
        device_code: secret(format!("dc-keys-{i}")),
        interval_ms: 5_000,
        expires_at: now() + 600_000,
    }
}

/// Pending device polls survive a rotation that retires the old key: they count as pending
/// and in `keys status`, are re-sealed in batches (resumably: read from their key id column),
/// and a store holding only the new key opens every code.
#[test]
fn a_rotation_reseals_the_device_polls() {
    let server = Server::start();
    let url = server.fresh_db();
    let polls: Vec<DevicePoll> = (0..7).map(device_poll).collect();
    {
        let old = open(&url, old_ring());
        for p in &polls {
            old.put_device_poll(p).unwrap();
        }
    }
    let store = open(&url, new_ring());
    assert!(store.rotation_pending().unwrap());
    assert_eq!(store.rows_to_reseal().unwrap(), 7);
    assert_eq!(sealed_by_key(&store), vec![(key_id(&OLD).to_string(), 7)]);
    // An interrupted pass: two batches of 3 (sessions and tokens are empty, so these are the
    // device polls), then a new rotation finishes the last one.
    let mut cur = RotationCursor::default();
    for _ in 0..4 {
        store.rotation_batch(&mut cur, 3).unwrap();
    }
    assert_eq!(cur.report.resealed, 6);
    assert_eq!(store.rows_to_reseal().unwrap(), 1);
    assert!(store.rotation_pending().unwrap());
    assert_eq!(store.rotate_keys(3, &mut |_, _| {}).unwrap().resealed, 1);
    assert_eq!(store.rows_to_reseal().unwrap(), 0);
    assert!(!store.rotation_pending().unwrap());
    assert_eq!(sealed_by_key(&store), vec![(key_id(&NEW).to_string(), 7)]);

    let after = open(&url, new_only());
    for p in &polls {
        let got = after.get_device_poll(p.session_id).unwrap().unwrap();
        assert_eq!(
            got.device_code.expose_secret(),
            p.device_code.expose_secret()
        );
        assert_eq!((got.app_id.as_str(), got.interval_ms), ("cli_keys", 5_000));
    }
}

/// A device code under an older key while the key check is already under the active one (left
/// by a rotation of a build that did not re-seal device polls) makes a rotation pending, so the
/// daemon runs one, and that rotation re-seals it.
#[test]
fn a_device_code_under_an_older_key_makes_the_rotation_pending() {
    let server = Server::start();
    let url = server.fresh_db();
    drop(open(&url, new_only()));
    let p = device_poll(0);
    {
        // The old key active, the new one kept for reading (it opens the key check).
        let old = open(
            &url,
            Keyring::new(Key::from_bytes(&OLD), vec![Key::from_bytes(&NEW)]),
        );
        old.put_device_poll(&p).unwrap();
    }
    let store = open(&url, new_ring());
    assert_eq!(
        store.key_status().unwrap().store_key,
        key_id(&NEW).to_string()
    );
    assert!(store.rotation_pending().unwrap());
    assert!(store.key_status().unwrap().rotation_pending);
    assert_eq!(store.rotate_keys(10, &mut |_, _| {}).unwrap().resealed, 1);
    assert!(!store.rotation_pending().unwrap());
    let got = open(&url, new_only())
        .get_device_poll(p.session_id)
        .unwrap()
        .unwrap();
    assert_eq!(got.device_code.expose_secret(), "dc-keys-0");
}

/// App secrets of the registry sealed under the store's key ring are re-sealed by a rotation
/// (those under the config key are not the token key's business): they count as pending and in
/// `keys status`, and after the rotation a store holding only the new key opens them.
#[test]
fn a_rotation_reseals_the_registry_app_secrets_under_the_store_key() {
    use lark_service::apps::{NewApp, Registry};
    let server = Server::start();
    let url = server.fresh_db();
    let config_key = || Keyring::new(Key::from_bytes(&[7; 32]), vec![]);
    let app = |id: &str, name: &str| NewApp {
        app_id: id.into(),
        app_name: name.into(),
        app_secret: secret(format!("app-secret-{id}")),
        description: None,
        permissions: None,
        created_by: None,
    };
    {
        let old: Db = open(&url, old_ring()).into();
        Registry::new(old.clone(), None, None)
            .add(app("cli_store", "by-store"))
            .unwrap();
        Registry::new(old, Some(config_key()), None)
            .add(app("cli_config", "by-config"))
            .unwrap();
    }
    let store = open(&url, new_ring());
    assert!(store.rotation_pending().unwrap());
    assert_eq!(store.rows_to_reseal().unwrap(), 1);
    assert_eq!(sealed_by_key(&store), vec![(key_id(&OLD).to_string(), 1)]);
    assert_eq!(store.rotate_keys(10, &mut |_, _| {}).unwrap().resealed, 1);
    assert!(!store.rotation_pending().unwrap());
    assert_eq!(sealed_by_key(&store), vec![(key_id(&NEW).to_string(), 1)]);

    let after = open(&url, new_only());
    assert_eq!(
        after
            .app_secret("cli_store", None)
            .unwrap()
            .unwrap()
            .expose_secret(),
        "app-secret-cli_store"
    );
    assert_eq!(
        after
            .app_secret("cli_config", Some(&config_key()))
            .unwrap()
            .unwrap()
            .expose_secret(),
        "app-secret-cli_config"
    );
}

/// Refused, before anything is re-sealed, while a live instance lacks the new key, seals under
/// another active key, or does not say (an older build); allowed once that instance is gone.
#[test]
fn rotation_is_refused_while_a_live_instance_lacks_the_key() {
    let server = Server::start();
    let url = server.fresh_db();
    fill(&url, 10, 10);
    let before = sealed_by_key(&open(&url, old_ring()));
    let rotator = open(&url, new_ring());

    // An instance with the old key alone.
    let old = open(&url, old_ring());
    beat(&old, "host/1/old");
    let err = rotator
        .rotate_keys(5, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("host/1/old (lacks the key)") && err.contains(&key_id(&NEW).to_string()),
        "{err}"
    );
    assert_eq!(sealed_by_key(&rotator), before, "something was re-sealed");

    // An instance holding the new key, but still sealing under the old one.
    let behind = open(
        &url,
        Keyring::new(Key::from_bytes(&OLD), vec![Key::from_bytes(&NEW)]),
    );
    old.forget_instance("host/1/old").unwrap();
    beat(&behind, "host/3/behind");
    let err = rotator
        .rotate_keys(5, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("host/3/behind (seals under another active key)"),
        "{err}"
    );
    // An older build, whose heartbeat says nothing about its keys.
    behind.forget_instance("host/3/behind").unwrap();
    beat(&rotator, "host/4/older-build");
    let c = common_sql(&url);
    c("UPDATE ls_instances SET key_ids = NULL, active_key = NULL");
    let err = rotator
        .rotate_keys(5, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("host/4/older-build (its build does not report its keys)"),
        "{err}"
    );
    assert_eq!(sealed_by_key(&rotator), before, "something was re-sealed");

    // That instance stopped long ago (not live): the rotation runs.
    c("UPDATE ls_instances SET last_seen = 0");
    let report = rotator.rotate_keys(5, &mut |_, _| {}).unwrap();
    assert_eq!(report.resealed, 20);
    assert!(!rotator.key_status().unwrap().rotation_pending);
}

/// One SQL statement on `url`, outside the store.
fn common_sql(url: &str) -> impl Fn(&str) + '_ {
    move |q: &str| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let c = lark_service::net::postgres::connect_pg(url, &net())
                .await
                .unwrap();
            c.batch_execute(q).await.unwrap();
        });
    }
}

/// A backup of the PostgreSQL store (secrets under two keys, users, seen ids, grants, live and
/// dead outbox entries, apps), restored to a redb store, holds the same sessions, tokens, users,
/// grants (with their reminder marks), outbox entries (with their delivery progress) and apps
/// (rows, and secrets opened), each compared; the backup's progress never passes its total; the
/// restored store loads back into an empty database (`migrate --to postgres`'s copy) with the
/// same grants, outbox and apps.
#[test]
fn a_backup_of_postgres_restores_to_redb_with_the_same_sessions_and_tokens() {
    let server = Server::start();
    let url = server.fresh_db();
    let mut sessions = fill(&url, 150, 0);
    let pg = open(&url, new_ring());
    for i in 0..60 {
        pg.put_token(&token(&format!("t{i}"), 7)).unwrap();
    }
    let mut done = session("done");
    done.state = lark_service::storage::SessionState::Completed;
    pg.put_session(&done).unwrap();
    sessions.push(done);
    for i in 0..5 {
        pg.put_user(&UserInfo {
            app_id: "cli_keys".into(),
            open_id: format!("ou_{i}"),
            user_id: Some(format!("u{i}")),
            union_id: None,
            name: Some(format!("User {i}")),
            email: None,
            avatar_url: None,
            updated_at: now(),
        })
        .unwrap();
    }
    pg.mark_events_seen(&["ev-1", "ev-2"], now() + 86_400_000)
        .unwrap();
    let (grants, outbox, apps) = fill_webhooks_and_apps(&pg, &mut sessions);

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pg.backup.age");
    let prot = Protection::Passphrase(secret("a passphrase for the pg backup".into()));
    let mut calls: Vec<(u64, u64)> = Vec::new();
    let header = write_backup_db(&Db::from(pg.clone()), &out, &prot, &mut |done, total| {
        calls.push((done, total));
    })
    .unwrap();
    // The copy's progress counts every row it copies against a total that includes them all
    // (the outbox, the grants and the apps too): it never runs past its total, and ends on it.
    let copied = 154 + 63 + 5 + 2 + 3 + 4 + 1 + 2;
    assert!(
        calls.iter().all(|(done, total)| done <= total),
        "progress past its total: {calls:?}"
    );
    assert!(calls.contains(&(copied, copied)), "{calls:?}");
    assert_eq!(header.counts["sessions"], 154);
    assert_eq!(header.counts["tokens"], 63);
    assert_eq!(header.counts["users"], 5);
    assert_eq!(header.counts["seen_events"], 2);
    assert_eq!(header.store_key_id, key_id(&OLD).to_string());
    // The scratch copy is gone; only the backup is left beside it.
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "{left:?}");

    let target = dir.path().join("restored.redb");
    restore_backup(
        &out,
        &prot,
        &target,
        new_ring(),
        StoreOptions::default(),
        false,
        &mut |_, _| {},
    )
    .unwrap();
    let redb = Store::open(&target, new_ring(), StoreOptions::default()).unwrap();
    assert_eq!(redb.counts().unwrap(), pg.counts().unwrap());
    for s in &sessions {
        let a = pg.get_session(s.session_id).unwrap().unwrap();
        let b = redb.get_session(s.session_id).unwrap().unwrap();
        assert_eq!((a.state, &a.user_id), (b.state, &b.user_id));
        for (x, y) in [
            (&a.pkce_verifier, &b.pkce_verifier),
            (&a.access_token, &b.access_token),
            (&a.refresh_token, &b.refresh_token),
        ] {
            assert_eq!(
                x.as_ref().map(|v| v.expose_secret().to_owned()),
                y.as_ref().map(|v| v.expose_secret().to_owned())
            );
        }
    }
    for i in 0..60 {
        let user = format!("t{i}");
        let a = pg.get_token("cli_keys", &user).unwrap().unwrap();
        let b = redb.get_token("cli_keys", &user).unwrap().unwrap();
        assert_eq!(b.access_token.expose_secret(), format!("acc-{user}-7"));
        assert_eq!(
            a.access_token.expose_secret(),
            b.access_token.expose_secret()
        );
        assert_eq!(a.refresh_due_at, b.refresh_due_at);
    }
    assert_eq!(
        redb.list_users("cli_keys").unwrap(),
        pg.list_users("cli_keys").unwrap()
    );
    assert!(redb.event_seen("ev-2").unwrap());
    same_webhooks_and_apps(&pg, &redb, &grants, &outbox, &apps);
    // The restored store's key check is the database's (under the old key, rotation pending).
    assert_eq!(redb.store_key_id().unwrap(), key_id(&OLD));
    // A ring without the key the backup's MAC was made with is refused.
    let err = restore_backup(
        &out,
        &prot,
        &dir.path().join("wrong.redb"),
        old_ring(),
        StoreOptions::default(),
        false,
        &mut |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("key"), "{err}");

    // And back into an empty database.
    let back = open(&server.fresh_db(), new_ring());
    drop(pg);
    let report = back.copy_from_redb(&redb, &mut |_, _| {}).unwrap();
    assert_eq!(report.source, report.target);
    assert_eq!(report.target.sessions, 154);
    same_webhooks_and_apps(&back, &redb, &grants, &outbox, &apps);
}

/// `(user, granted_at, reminded_at)` of the grants written.
type Grants = Vec<(String, u64, u64)>;
/// The live and the dead outbox entries.
type OutboxRows = (Vec<OutboxEntry>, Vec<OutboxEntry>);
/// The app rows and their secrets (`true`: sealed under [`config_ring`]).
type Apps = Vec<(AppRow, String, bool)>;

/// The key ring of `LARK_CONFIG_ENCRYPTION_KEY` in these tests.
fn config_ring() -> Keyring {
    Keyring::new(Key::from_bytes(&[3; 32]), vec![])
}

/// Three grants (completed sessions with their tokens, one reminded), outbox entries (live,
/// one with delivery progress, and dead) and two apps (one secret under the store's key, one
/// under the config key), written to `pg`; the sessions are added to `sessions`.
fn fill_webhooks_and_apps(
    pg: &PgStore,
    sessions: &mut Vec<AuthSession>,
) -> (Grants, OutboxRows, Apps) {
    let t0 = now() - 60_000;
    let mut grants = Vec::new();
    for i in 0..3u64 {
        let user = format!("g{i}");
        let mut s = session(&user);
        s.state = lark_service::storage::SessionState::Completed;
        s.updated_at = t0 + i;
        let mut tok = token(&user, 1);
        tok.session_id = Some(s.session_id);
        pg.complete_session(&s, &tok).unwrap();
        sessions.push(s);
        grants.push((user, t0 + i, 0));
    }
    let ev = |id: &str| OutboxEvent {
        event_id: id.to_owned(),
        kind: "authorization.completed".to_owned(),
        body: format!("{{\"event_id\":\"{id}\"}}").into_bytes(),
    };
    assert!(pg
        .mark_reminded("cli_keys", "g1", t0 + 1, &[ev("reminded-g1")], t0 + 5)
        .unwrap());
    grants[1].2 = t0 + 5;
    pg.outbox_append(&[ev("ob-1"), ev("ob-2"), ev("ob-3"), ev("ob-4")], t0 + 6)
        .unwrap();
    let all = pg.outbox_pending(10).unwrap();
    assert_eq!(all.len(), 5);
    let mut retried = all[1].clone();
    retried.attempts = 3;
    retried.next_attempt_at = t0 + 90_000;
    retried.delivered_to = vec!["https://a.example/hook".into()];
    retried.last_error = Some("HTTP 503".into());
    assert!(pg.outbox_reschedule(&retried).unwrap());
    let mut dead = all[2].clone();
    dead.attempts = 12;
    dead.last_error = Some("HTTP 500".into());
    assert!(pg.outbox_bury(&dead).unwrap());
    let outbox = (pg.outbox_pending(10).unwrap(), pg.outbox_dead(10).unwrap());
    assert_eq!((outbox.0.len(), outbox.1.len()), (4, 1));
    assert!(outbox.0.contains(&retried), "{outbox:?}");
    assert_eq!(outbox.1, [dead]);

    let mut apps = Vec::new();
    for (i, (status, config)) in [(AppStatus::Active, false), (AppStatus::Inactive, true)]
        .into_iter()
        .enumerate()
    {
        let row = AppRow {
            app_id: format!("cli_backup_{i}"),
            app_name: format!("backup app {i}"),
            description: config.then(|| "its secret under the config key".to_owned()),
            status,
            permissions: Some(format!("{{\"scopes\":[\"contact:read\"],\"n\":{i}}}")),
            created_at: t0 + 10 + i as u64,
            updated_at: t0 + 20 + i as u64,
            created_by: Some(format!("admin{i}")),
            secret_key: if config {
                SecretKey::Config
            } else {
                SecretKey::Store
            },
        };
        let app_secret = format!("app-secret-{i}-0123456789abcdef");
        let ring = config_ring();
        pg.insert_app(&row, &secret(app_secret.clone()), config.then_some(&ring))
            .unwrap();
        apps.push((row, app_secret, config));
    }
    (grants, outbox, apps)
}

/// `copy` holds the grants, the outbox entries and the apps written to `pg` (as written, and
/// as `pg` reads them now), app secrets opened.
fn same_webhooks_and_apps(
    pg: &PgStore,
    copy: &(impl WebhooksAndApps + ?Sized),
    grants: &Grants,
    outbox: &OutboxRows,
    apps: &Apps,
) {
    for (user, granted, reminded) in grants {
        let want = Some((*granted, *reminded));
        assert_eq!(pg.grant_of("cli_keys", user).unwrap(), want, "{user}");
        assert_eq!(copy.grant(user), want, "{user}");
    }
    let due = pg.grants_to_remind(u64::MAX, 100).unwrap();
    assert_eq!(due.len(), 2, "g0 and g2 are not reminded yet: {due:?}");
    assert_eq!(copy.due_grants(), due);
    assert_eq!(
        (pg.outbox_pending(10).unwrap(), pg.outbox_dead(10).unwrap()),
        *outbox
    );
    assert_eq!(copy.outbox(), *outbox);
    let rows: Vec<AppRow> = apps.iter().map(|(row, _, _)| row.clone()).collect();
    assert_eq!(pg.list_apps().unwrap(), rows);
    assert_eq!(copy.apps(), rows);
    for (row, app_secret, config) in apps {
        let ring = config_ring();
        let key = config.then_some(&ring);
        assert_eq!(copy.app_secret(&row.app_id, key), *app_secret);
        if *config {
            assert!(
                copy.app_secret_result(&row.app_id).is_err(),
                "a secret under the config key is not opened without it"
            );
        }
    }
}

/// What [`same_webhooks_and_apps`] reads of a copy, on either backend.
trait WebhooksAndApps {
    fn grant(&self, user: &str) -> Option<(u64, u64)>;
    fn due_grants(&self) -> Vec<ExpiringGrant>;
    fn outbox(&self) -> OutboxRows;
    fn apps(&self) -> Vec<AppRow>;
    fn app_secret(&self, app_id: &str, config: Option<&Keyring>) -> String;
    /// The secret opened without the config key.
    fn app_secret_result(&self, app_id: &str) -> Result<Option<SecretString>, Error>;
}

macro_rules! webhooks_and_apps {
    ($t:ty) => {
        impl WebhooksAndApps for $t {
            fn grant(&self, user: &str) -> Option<(u64, u64)> {
                self.grant_of("cli_keys", user).unwrap()
            }
            fn due_grants(&self) -> Vec<ExpiringGrant> {
                self.grants_to_remind(u64::MAX, 100).unwrap()
            }
            fn outbox(&self) -> OutboxRows {
                (
                    self.outbox_pending(10).unwrap(),
                    self.outbox_dead(10).unwrap(),
                )
            }
            fn apps(&self) -> Vec<AppRow> {
                self.list_apps().unwrap()
            }
            fn app_secret(&self, app_id: &str, config: Option<&Keyring>) -> String {
                <$t>::app_secret(self, app_id, config)
                    .unwrap()
                    .unwrap()
                    .expose_secret()
                    .to_owned()
            }
            fn app_secret_result(&self, app_id: &str) -> Result<Option<SecretString>, Error> {
                <$t>::app_secret(self, app_id, None)
            }
        }
    };
}
webhooks_and_apps!(Store);
webhooks_and_apps!(PgStore);

/// Backups in `dir` (the scheduled ones' names).
fn backups_in(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    lark_service::backup::rotation::list(dir).unwrap_or_default()
}

/// Three real instances of the binary on one database whose rows are under the old key: A holds
/// the old key alone; B and C hold the new one (active) and the old one, and back up every
/// minute. While A is live, the fleet's rotation waits (B's or C's `/workers` says why) and
/// nothing is re-sealed; once A stopped, one instance rotates everything to the new key. Each
/// scheduled backup is taken by one of B and C, and restores to a store with the same tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_rotates_once_every_instance_holds_the_key_and_backs_up_on_one_instance() {
    use common::fleet::{role, Instance};
    use common::free_port;
    use lark_service::sandbox::{Sandbox, SandboxOptions};
    use std::time::{Duration, Instant};

    let pg = Pg::start();
    let url = pg.url("postgres");
    fill(&url, 40, 30);
    let watcher = open(&url, new_ring());
    let before = sealed_by_key(&watcher);
    assert_eq!(before.len(), 1, "{before:?}");
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let (old_hex, new_hex) = (hex::encode(OLD), hex::encode(NEW));
    let start = |extra: Vec<(&'static str, String)>| {
        let (sandbox, url) = (&sandbox, url.clone());
        async move {
            let http_port = free_port();
            let redirect = format!("http://127.0.0.1:{http_port}/oauth/callback");
            let mut env: Vec<(&str, &str)> = vec![
                ("WEBSOCKET_FALLBACK_TO_HTTP", "true"),
                ("LARK_ENCRYPT_KEY", "pg-keys-encrypt-key"),
            ];
            env.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
            Instance::start(sandbox, &url, http_port, &redirect, &env).await
        }
    };
    let a = start(vec![("LARK_TOKEN_ENCRYPTION_KEY", old_hex.clone())]).await;
    // A's heartbeat is on record before the others start.
    let t0 = Instant::now();
    while watcher.live_instances(now(), 15_000).unwrap().is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(20), "no heartbeat of A");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (dir_b, dir_c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let with_new = |dir: &std::path::Path| {
        vec![
            ("LARK_TOKEN_ENCRYPTION_KEY", new_hex.clone()),
            ("LARK_TOKEN_ENCRYPTION_PREVIOUS_KEYS", old_hex.clone()),
            ("BACKUP_SCHEDULE", "* * * * *".to_owned()),
            ("BACKUP_DIR", dir.display().to_string()),
            (
                "BACKUP_PASSPHRASE",
                "the fleet's backup passphrase".to_owned(),
            ),
        ]
    };
    let b = start(with_new(dir_b.path())).await;
    let c = start(with_new(dir_c.path())).await;

    // The rotation waits for A, and says so on the instance running it.
    let t0 = Instant::now();
    loop {
        let (_, wb) = b.get("/workers").await;
        let (_, wc) = c.get("/workers").await;
        let says = |w: &serde_json::Value| {
            w["key_rotation"]["status"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        };
        let (sb, sc) = (says(&wb), says(&wc));
        if sb.contains("waiting") || sc.contains("waiting") {
            let s = if sb.contains("waiting") { sb } else { sc };
            assert!(s.contains("lacks the key"), "{s}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the rotation does not say it waits: {sb:?} {sc:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(sealed_by_key(&watcher), before, "re-sealed while A is live");
    assert!(watcher.rotation_pending().unwrap());

    // A leaves: one of B and C rotates everything.
    a.stop();
    let t0 = Instant::now();
    while watcher.rotation_pending().unwrap() {
        assert!(
            t0.elapsed() < Duration::from_secs(45),
            "no rotation: {:?}",
            watcher.key_status().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let st = watcher.key_status().unwrap();
    assert_eq!(st.store_key, key_id(&NEW).to_string());
    assert_eq!(
        sealed_by_key(&watcher)
            .into_iter()
            .map(|(k, _)| k)
            .collect::<Vec<_>>(),
        vec![key_id(&NEW).to_string()]
    );
    let after = open(&url, new_only());
    assert!(after.get_token("cli_keys", "t7").unwrap().is_some());

    // The next scheduled minute (one may have passed during the rotation): one backup, by one
    // of B and C.
    let earlier = backups_in(dir_b.path()).len() + backups_in(dir_c.path()).len();
    let new_files = || {
        let fresh = |d: &std::path::Path| -> Vec<std::path::PathBuf> {
            backups_in(d)
                .into_iter()
                .filter(|p| {
                    p.metadata()
                        .and_then(|m| m.modified())
                        .is_ok_and(|t| t > std::time::SystemTime::now() - Duration::from_secs(30))
                })
                .collect()
        };
        (fresh(dir_b.path()), fresh(dir_c.path()))
    };
    let t0 = Instant::now();
    loop {
        if backups_in(dir_b.path()).len() + backups_in(dir_c.path()).len() > earlier {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(75),
            "no scheduled backup"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        backups_in(dir_b.path()).len() + backups_in(dir_c.path()).len(),
        earlier + 1,
        "two instances backed up the same scheduled time"
    );
    let (in_b, in_c) = new_files();
    assert_eq!(in_b.len() + in_c.len(), 1, "{in_b:?} {in_c:?}");
    let (_, wb) = b.get("/workers").await;
    let (_, wc) = c.get("/workers").await;
    let mut roles = [role(&wb, "backup"), role(&wc, "backup")];
    roles.sort();
    assert_eq!(
        roles,
        [Some("follower".to_owned()), Some("leader".to_owned())],
        "{wb} {wc}"
    );
    let file = in_b.into_iter().chain(in_c).next().unwrap();
    let restored = dir_b.path().join("restored.redb");
    let prot = Protection::Passphrase(secret("the fleet's backup passphrase".into()));
    restore_backup(
        &file,
        &prot,
        &restored,
        new_only(),
        StoreOptions::default(),
        false,
        &mut |_, _| {},
    )
    .unwrap();
    let redb = Store::open(&restored, new_only(), StoreOptions::default()).unwrap();
    assert_eq!(redb.counts().unwrap().tokens, 30);
    for i in 0..30 {
        let user = format!("t{i}");
        let t = redb.get_token("cli_keys", &user).unwrap().unwrap();
        assert_eq!(t.access_token.expose_secret(), format!("acc-{user}-0"));
    }
    b.stop();
    c.stop();
}
