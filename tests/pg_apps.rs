//! The app registry on PostgreSQL: the same registry behaviour on both backends (one check
//! list run against redb and a real throw-away PostgreSQL), secrets sealed in the database,
//! compare-and-set edits from two instances, the copy between the backends, and a fleet of two
//! real instances following registry changes made through one of them or the `app` command.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::time::{Duration, Instant};

use common::fleet::{authorize_url, land_on, Instance};
use common::pg::Pg;
use common::{free_port, metric, ADMIN, KEY};
use lark_service::apps::{AppChange, AppStatus, AppsError, NewApp, Registry};
use lark_service::net::{Net, NetOptions};
use lark_service::sandbox::{Sandbox, SandboxOptions, APP2_ID, APP2_SECRET, APP_ID};
use lark_service::storage::postgres::{PgOptions, PgStore};
use lark_service::storage::{Db, Key, Keyring, Store, StoreOptions, TokenStore, UserToken};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

fn ring() -> Keyring {
    Keyring::new(Key::from_bytes(&[9; 32]), vec![])
}

fn config_ring() -> Keyring {
    Keyring::new(Key::from_bytes(&[4; 32]), vec![])
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

    fn fresh_db(&self) -> String {
        self.pg.fresh_db()
    }

    fn open(&self, url: &str) -> PgStore {
        PgStore::open(url, &net(), ring(), PgOptions::default()).unwrap()
    }
}

const SECRET_A: &str = "app-secret-PLAINTEXT-a1b2c3";
const SECRET_B: &str = "app-secret-PLAINTEXT-d4e5f6";
const SECRET_B2: &str = "app-secret-PLAINTEXT-0a0b0c";

fn new_app(id: &str, name: &str, secret: &str) -> NewApp {
    NewApp {
        app_id: id.into(),
        app_name: name.into(),
        app_secret: SecretString::from(secret.to_owned()),
        description: Some("first".into()),
        permissions: Some(r#"["im:message"]"#.into()),
        created_by: Some("ops".into()),
    }
}

fn token(app: &str, user: &str) -> UserToken {
    UserToken {
        app_id: app.into(),
        user_id: user.into(),
        open_id: None,
        access_token: SecretString::from("t".to_owned()),
        refresh_token: None,
        expires_at: 10,
        refresh_expires_at: None,
        refresh_due_at: 5,
        scopes: vec![],
        obtained_at: 1,
        session_id: None,
        needs_reauth: false,
        refresh_in_doubt_since: None,
    }
}

fn active_ids(r: &Registry) -> Vec<String> {
    r.active().unwrap().into_iter().map(|a| a.app_id).collect()
}

/// The registry's behaviour, whatever the backend: what `app add|list|show|update|enable|
/// disable|delete` and the reconciler see.
fn registry_conformance(db: &Db) {
    // A secret sealed under the config key (cli_a) and one under the store's key (cli_b).
    let with_key = Registry::new(db.clone(), Some(config_ring()), None);
    let plain = Registry::new(db.clone(), None, None);
    with_key.add(new_app("cli_a", "alpha", SECRET_A)).unwrap();
    plain.add(new_app("cli_b", "beta", SECRET_B)).unwrap();
    let a = with_key.show("cli_a").unwrap();
    assert_eq!(
        (a.status, a.secret_sealed_with, a.description.as_deref()),
        ("active", "config_encryption_key", Some("first"))
    );
    assert_eq!(plain.show("cli_b").unwrap().secret_sealed_with, "token_key");
    // Ids and names are unique, in any status.
    assert!(plain.add(new_app("cli_a", "other", "x")).is_err());
    assert!(plain.add(new_app("cli_c", "alpha", "x")).is_err());
    assert!(plain
        .update(
            "cli_b",
            AppChange {
                app_name: Some("alpha".into()),
                ..AppChange::default()
            }
        )
        .is_err());
    // The secret under the config key opens only with it (fail closed without).
    let (ok, refused) = plain.active_each().unwrap();
    assert_eq!(
        ok.iter().map(|a| a.app_id.as_str()).collect::<Vec<_>>(),
        ["cli_b"]
    );
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].0, "cli_a");
    let served = with_key.active().unwrap();
    assert_eq!(served.len(), 2);
    let secret_of = |id: &str| {
        served
            .iter()
            .find(|a| a.app_id == id)
            .unwrap()
            .app_secret
            .expose_secret()
            .to_owned()
    };
    assert_eq!(
        (secret_of("cli_a"), secret_of("cli_b")),
        (SECRET_A.to_owned(), SECRET_B.to_owned())
    );
    // An edit changes only what it names; a new secret is served.
    let b = with_key
        .update(
            "cli_b",
            AppChange {
                description: Some("second".into()),
                app_secret: Some(SecretString::from(SECRET_B2.to_owned())),
                ..AppChange::default()
            },
        )
        .unwrap();
    assert_eq!(
        (
            b.app_name.as_str(),
            b.description.as_deref(),
            b.secret_sealed_with
        ),
        ("beta", Some("second"), "config_encryption_key")
    );
    assert_eq!(
        db.app_secret("cli_b", Some(&config_ring()))
            .unwrap()
            .unwrap()
            .expose_secret(),
        SECRET_B2
    );
    assert!(matches!(
        plain.update("cli_none", AppChange::default()),
        Err(AppsError::NotFound(_))
    ));
    // Disable, enable, soft delete, hard delete.
    with_key.set_status("cli_a", AppStatus::Inactive).unwrap();
    assert_eq!(active_ids(&with_key), ["cli_b"]);
    with_key.set_status("cli_a", AppStatus::Active).unwrap();
    assert_eq!(active_ids(&with_key).len(), 2);
    // Tokens are counted from the token table; deleting an app with tokens needs force.
    db.put_token(&token("cli_a", "u1")).unwrap();
    db.put_token(&token("cli_a", "u2")).unwrap();
    db.put_token(&token("cli_b", "u1")).unwrap();
    assert_eq!(db.app_token_count("cli_a").unwrap(), 2);
    assert!(matches!(
        with_key.delete("cli_a", false, false),
        Err(AppsError::HasTokens { tokens: 2, .. })
    ));
    // Refused: nothing changed (still served), hard or soft.
    assert!(matches!(
        with_key.delete("cli_a", false, true),
        Err(AppsError::HasTokens { tokens: 2, .. })
    ));
    assert_eq!(with_key.show("cli_a").unwrap().status, "active");
    assert_eq!(active_ids(&with_key).len(), 2);
    assert!(matches!(
        with_key.delete("cli_none", true, true),
        Err(AppsError::NotFound(_))
    ));
    assert_eq!(with_key.delete("cli_a", true, false).unwrap(), 2);
    assert_eq!(with_key.show("cli_a").unwrap().status, "deleted");
    assert!(with_key
        .list(None)
        .unwrap()
        .iter()
        .all(|v| v.app_id != "cli_a"));
    assert_eq!(with_key.list(Some(AppStatus::Deleted)).unwrap().len(), 1);
    assert_eq!(active_ids(&with_key), ["cli_b"]);
    with_key.delete("cli_a", true, true).unwrap();
    assert!(matches!(
        with_key.show("cli_a"),
        Err(AppsError::NotFound(_))
    ));
    assert!(!db.remove_app("cli_a").unwrap());
    let ids: Vec<_> = db
        .list_apps()
        .unwrap()
        .into_iter()
        .map(|r| r.app_id)
        .collect();
    assert_eq!(ids, ["cli_b"]);
}

#[test]
fn the_registry_behaves_the_same_on_redb_and_postgres() {
    let redb: Db = Store::open_in_memory(ring(), StoreOptions::default())
        .unwrap()
        .into();
    registry_conformance(&redb);
    assert_eq!(redb.apps_version().unwrap(), None);

    let server = Server::start();
    let url = server.fresh_db();
    let pg: Db = server.open(&url).into();
    assert_eq!(pg.apps_version().unwrap(), Some(0));
    registry_conformance(&pg);
    // Each of the 7 writes (2 adds, an edit, disable, enable, soft and hard delete) moved the
    // registry's version (what the fleet polls) once; the refused ones did not.
    let v = pg.apps_version().unwrap().unwrap();
    assert_eq!(v, 7);
    let reg = Registry::new(pg.clone(), None, None);
    assert!(reg.add(new_app("cli_b", "again", "x")).is_err());
    assert_eq!(pg.apps_version().unwrap(), Some(v));
    // A second handle on the database (another instance) sees the same registry.
    let other: Db = server.open(&url).into();
    assert_eq!(other.list_apps().unwrap(), pg.list_apps().unwrap());
}

/// A raw connection to the database (another instance's transaction, held open by the test).
struct Raw {
    rt: tokio::runtime::Runtime,
    c: tokio_postgres::Client,
}

impl Raw {
    fn connect(url: &str) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let c = rt
            .block_on(lark_service::net::postgres::connect_pg(url, &net()))
            .unwrap();
        Self { rt, c }
    }

    fn sql(&self, q: &str) {
        self.rt.block_on(self.c.batch_execute(q)).unwrap();
    }

    /// Begins a transaction that stores a token of `app` for `user` and leaves it open.
    fn begin_token_insert(&self, app: &str, user: &str) {
        self.sql(&format!(
            "BEGIN; INSERT INTO ls_tokens (app_id, user_id, access_token, access_token_key,
                expires_at, refresh_due_at, scopes, obtained_at, needs_reauth)
             VALUES ('{app}', '{user}', '\\x00', 1, 10, 5, '{{}}', 1, false)"
        ));
    }
}

/// `reg.delete(app, force, hard)` on another thread; its answer comes on the channel.
fn delete_in_thread(
    reg: &Registry,
    app: &'static str,
    force: bool,
    hard: bool,
) -> std::sync::mpsc::Receiver<Result<u64, AppsError>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let reg = reg.clone();
    std::thread::spawn(move || {
        let _ = tx.send(reg.delete(app, force, hard));
    });
    rx
}

/// The token count and the delete are one transaction: a delete while another instance's
/// transaction is storing a token for the app waits for it, then counts that token (refused
/// without force; counted with it), and gives up unchanged (503-able, "try again") when the
/// token write does not finish within its lock timeout. Before, the count ran on its own and
/// missed the token in flight: the app with a token was deleted without force.
#[test]
fn a_delete_waits_for_a_token_being_stored_and_counts_it() {
    let server = Server::start();
    let url = server.fresh_db();
    let db: Db = server.open(&url).into();
    let reg = Registry::new(db.clone(), None, None);
    reg.add(new_app("cli_a", "alpha", SECRET_A)).unwrap();
    reg.add(new_app("cli_c", "gamma", SECRET_B)).unwrap();
    let raw = Raw::connect(&url);
    let pause = Duration::from_millis(800);

    // Without force: waits for the token being stored, then refuses.
    raw.begin_token_insert("cli_a", "u_late");
    let rx = delete_in_thread(&reg, "cli_a", false, false);
    std::thread::sleep(pause);
    assert!(
        rx.try_recv().is_err(),
        "the delete answered while a token of the app was being stored"
    );
    raw.sql("COMMIT");
    let got = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        matches!(got, Err(AppsError::HasTokens { tokens: 1, .. })),
        "{got:?}"
    );
    assert_eq!(reg.show("cli_a").unwrap().status, "active");

    // With force (hard): waits, then counts the token stored meanwhile too.
    raw.begin_token_insert("cli_a", "u_later");
    let rx = delete_in_thread(&reg, "cli_a", true, true);
    std::thread::sleep(pause);
    assert!(rx.try_recv().is_err(), "the forced delete did not wait");
    raw.sql("COMMIT");
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap(),
        2
    );
    assert!(matches!(reg.show("cli_a"), Err(AppsError::NotFound(_))));

    // A token write that does not finish: the delete gives up after its lock timeout and
    // changes nothing (fail closed), whatever the token write then does.
    raw.begin_token_insert("cli_c", "u_stuck");
    let started = Instant::now();
    let got = delete_in_thread(&reg, "cli_c", false, false)
        .recv_timeout(Duration::from_secs(20))
        .unwrap();
    let waited = started.elapsed();
    assert!(
        matches!(
            got,
            Err(AppsError::Store(lark_service::storage::Error::Unavailable(
                _
            )))
        ),
        "{got:?}"
    );
    assert!(waited >= Duration::from_secs(4), "{waited:?}");
    raw.sql("ROLLBACK");
    assert_eq!(reg.show("cli_c").unwrap().status, "active");
    // With nothing in flight it goes through at once.
    assert_eq!(reg.delete("cli_c", false, false).unwrap(), 0);
    assert_eq!(reg.show("cli_c").unwrap().status, "deleted");
}

/// Sealed at rest: no column of `ls_apps` holds the secret, as text or as bytes; it opens only
/// under the key ring that sealed it, and a wrong key ring is refused.
#[test]
fn postgres_holds_no_plaintext_app_secret() {
    let server = Server::start();
    let url = server.fresh_db();
    let store = server.open(&url);
    let reg = Registry::new(store.clone(), None, None);
    reg.add(new_app("cli_a", "alpha", SECRET_A)).unwrap();
    Registry::new(store.clone(), Some(config_ring()), None)
        .add(new_app("cli_b", "beta", SECRET_B))
        .unwrap();
    let dump = dump_table(&url, "ls_apps");
    assert!(dump.contains("cli_a") && dump.contains("alpha"), "{dump}");
    for s in [SECRET_A, SECRET_B] {
        assert!(!dump.contains(s), "plaintext secret in ls_apps");
        let hex = s.bytes().fold(String::new(), |mut h, b| {
            use std::fmt::Write as _;
            write!(h, "{b:02x}").unwrap();
            h
        });
        assert!(!dump.contains(&hex), "plaintext secret bytes in ls_apps");
    }
    assert!(store.app_secret("cli_b", None).is_err());
    let wrong = Keyring::new(Key::from_bytes(&[5; 32]), vec![]);
    assert!(store.app_secret("cli_b", Some(&wrong)).is_err());
    assert_eq!(
        store
            .app_secret("cli_b", Some(&config_ring()))
            .unwrap()
            .unwrap()
            .expose_secret(),
        SECRET_B
    );
}

fn dump_table(url: &str, table: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = lark_service::net::postgres::connect_pg(url, &net())
            .await
            .unwrap();
        let mut out = String::new();
        for m in c
            .simple_query(&format!("SELECT * FROM {table}"))
            .await
            .unwrap()
        {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                for i in 0..r.len() {
                    out.push_str(r.get(i).unwrap_or("NULL"));
                    out.push('|');
                }
                out.push('\n');
            }
        }
        out
    })
}

/// Two instances (two handles, two threads) editing one app at once: every edit survives.
/// Each edit appends its own mark to what it read; a lost update would drop marks.
#[test]
fn two_instances_editing_one_app_lose_no_edit() {
    let server = Server::start();
    let url = server.fresh_db();
    let a: Db = server.open(&url).into();
    let b: Db = server.open(&url).into();
    Registry::new(a.clone(), None, None)
        .add(NewApp {
            description: Some(String::new()),
            ..new_app("cli_a", "alpha", SECRET_A)
        })
        .unwrap();
    const EDITS: usize = 40;
    std::thread::scope(|s| {
        for (who, db) in [("a", &a), ("b", &b)] {
            s.spawn(move || {
                for i in 0..EDITS {
                    let mark = format!("{who}{i},");
                    db.update_app(
                        "cli_a",
                        |r| {
                            let mut d = r.description.clone().unwrap_or_default();
                            d.push_str(&mark);
                            r.description = Some(d);
                        },
                        None,
                        None,
                    )
                    .unwrap()
                    .unwrap();
                }
            });
        }
    });
    let d = a.get_app("cli_a").unwrap().unwrap().description.unwrap();
    let marks: std::collections::BTreeSet<&str> = d.split(',').filter(|m| !m.is_empty()).collect();
    assert_eq!(marks.len(), 2 * EDITS, "lost edits: {d}");
    // The secret was never touched by the edits.
    assert_eq!(
        a.app_secret("cli_a", None)
            .unwrap()
            .unwrap()
            .expose_secret(),
        SECRET_A
    );
}

/// `migrate` moves the registry both ways, sealed as it is: the rows compare equal and the
/// secrets open on the other side (under the config key for one app, the store's for the other).
#[test]
fn the_copy_moves_the_registry_both_ways() {
    let server = Server::start();
    let url = server.fresh_db();
    let dir = tempfile::tempdir().unwrap();
    let src = Store::open(&dir.path().join("a.redb"), ring(), StoreOptions::default()).unwrap();
    Registry::new(src.clone(), None, None)
        .add(new_app("cli_a", "alpha", SECRET_A))
        .unwrap();
    let with_key = Registry::new(src.clone(), Some(config_ring()), None);
    with_key.add(new_app("cli_b", "beta", SECRET_B)).unwrap();
    with_key.set_status("cli_b", AppStatus::Inactive).unwrap();
    let pg = server.open(&url);
    pg.copy_from_redb(&src, &mut |_, _| {}).unwrap();
    assert_eq!(pg.list_apps().unwrap(), src.list_apps().unwrap());
    assert_eq!(
        pg.app_secret("cli_a", None)
            .unwrap()
            .unwrap()
            .expose_secret(),
        SECRET_A
    );
    assert_eq!(
        pg.app_secret("cli_b", Some(&config_ring()))
            .unwrap()
            .unwrap()
            .expose_secret(),
        SECRET_B
    );
    // Into a database that already holds apps: refused.
    assert!(pg.copy_from_redb(&src, &mut |_, _| {}).is_err());
    let back = Store::open(&dir.path().join("b.redb"), ring(), StoreOptions::default()).unwrap();
    pg.copy_into_redb(&back, &mut |_, _| {}).unwrap();
    assert_eq!(back.list_apps().unwrap(), src.list_apps().unwrap());
    assert_eq!(
        back.app_secret("cli_b", Some(&config_ring()))
            .unwrap()
            .unwrap()
            .expose_secret(),
        SECRET_B
    );
    assert!(pg.copy_into_redb(&back, &mut |_, _| {}).is_err());
}

/// A database at schema 3 (before the registry) gets it in place at open.
#[test]
fn a_database_without_the_registry_gets_it_in_place() {
    let server = Server::start();
    let url = server.fresh_db();
    let store = server.open(&url);
    store.put_token(&token("cli_x", "u1")).unwrap();
    drop(store);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = lark_service::net::postgres::connect_pg(&url, &net())
            .await
            .unwrap();
        c.batch_execute(&common::pg::back_to_schema(3))
            .await
            .unwrap();
    });
    let store = server.open(&url);
    assert_eq!(
        store.schema_version().unwrap(),
        lark_service::storage::postgres::SCHEMA_VERSION
    );
    assert!(store.list_apps().unwrap().is_empty());
    assert_eq!(store.app_token_count("cli_x").unwrap(), 1);
    Registry::new(store.clone(), None, None)
        .add(new_app("cli_a", "alpha", SECRET_A))
        .unwrap();
    assert_eq!(store.apps_version().unwrap(), 1);
}

async fn wait_until<F: FnMut() -> bool>(what: &str, within: Duration, mut f: F) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

/// Runs `lark-service app …` against the database, as an operator would while the fleet runs.
fn app_cli(pg_url: &str, args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lark-service"))
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LARK_TOKEN_ENCRYPTION_KEY", KEY)
        .env("STORAGE_BACKEND", "postgres")
        .env("STORAGE_POSTGRES_URL", pg_url)
        .env("STORAGE_PATH", dir.path().join("must-not-exist.redb"))
        .arg("--config")
        .arg(&config)
        .arg("app")
        .args(args)
        .output()
        .unwrap();
    assert!(!dir.path().join("must-not-exist.redb").exists());
    out
}

/// Two real instances on one database, long connections on, the cluster sandbox over TLS: an
/// app added through A's admin API gets a long connection from A and from B, and a user of it
/// authorizes with the request on A and the redirect landing on B; disabled with the `app`
/// command against the database, both connections close; enabled again, both reopen; its
/// secret edited (wrong, then right), both restart; deleted through B's admin API, both close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_follows_the_registry_changes_made_anywhere() {
    let pg = Pg::start();
    let url = pg.url("postgres");
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let (pa, pb) = (free_port(), free_port());
    let redirect = format!("http://127.0.0.1:{pa}/oauth/callback");
    let ws = [("WEBSOCKET_ENABLED", "true")];
    let a = Instance::start(&sandbox, &url, pa, &redirect, &ws).await;
    let b = Instance::start(&sandbox, &url, pb, &redirect, &ws).await;
    let within = Duration::from_secs(20);
    wait_until("both connections of the config app", within, || {
        sandbox.connections_of(APP_ID) == 2
    })
    .await;
    assert_eq!(sandbox.connections_of(APP2_ID), 0);

    // Added through A's admin API: A and B each open their own connection.
    let (code, body) = a
        .post(
            "/api/v1/apps",
            json!({"app_id": APP2_ID, "app_name": "second", "app_secret": APP2_SECRET}),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    assert!(!body.to_string().contains(APP2_SECRET));
    let took = wait_until("two connections of the added app", within, || {
        sandbox.connections_of(APP2_ID) == 2
    })
    .await;
    eprintln!("added app connected on both instances in {took:?}");
    assert_eq!(sandbox.connections_of(APP_ID), 2);
    let (code, listed) = b.get("/api/v1/apps").await;
    assert_eq!(code, 200);
    assert!(listed.to_string().contains(APP2_ID), "{listed}");

    // A user of the added app: asked on A, the redirect lands on B, the token served by both.
    let alice = "ou_sandbox_alice";
    let (code, body) = a
        .post(
            "/api/v1/auth/requests",
            json!({"open_id": alice, "app_id": APP2_ID}),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let card = sandbox
        .messages_for(alice)
        .into_iter()
        .find(|m| m.app_id == APP2_ID)
        .expect("a card sent as the added app");
    let to_a = sandbox
        .approve(authorize_url(&card.content), alice)
        .unwrap();
    let page = reqwest::get(land_on(&to_a, pa, pb)).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page
        .text()
        .await
        .unwrap()
        .contains("Authorization complete"));
    let path = format!("/api/v1/users/{alice}/token?app_id={APP2_ID}");
    let (sb, tb) = b.get(&path).await;
    assert_eq!(sb, 200, "{tb}");
    let (sa, ta) = a.get(&path).await;
    assert_eq!(sa, 200, "{ta}");
    assert_eq!(ta["access_token"], tb["access_token"]);
    assert_eq!(
        sandbox.token_app(tb["access_token"].as_str().unwrap()),
        Some(APP2_ID)
    );

    // Disabled with the `app` command against the database while the fleet runs.
    let out = app_cli(&url, &["disable", APP2_ID]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let took = wait_until(
        "both connections of the disabled app closed",
        within,
        || sandbox.connections_of(APP2_ID) == 0,
    )
    .await;
    eprintln!("app disabled by the app command: both connections closed in {took:?}");
    assert_eq!(sandbox.connections_of(APP_ID), 2);
    let out = app_cli(&url, &["list", "--status", "inactive", "--json"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(APP2_ID));
    let out = app_cli(&url, &["enable", APP2_ID]);
    assert!(out.status.success());
    wait_until("both connections of the enabled app", within, || {
        sandbox.connections_of(APP2_ID) == 2
    })
    .await;
    // Edited: a secret the platform refuses makes both instances drop their connection (each
    // restarts the app's runtime with the new secret); the right one brings both back.
    let out = app_cli(&url, &["update", APP2_ID, "--app-secret", "not-the-secret"]);
    assert!(out.status.success());
    wait_until(
        "both connections closed after the secret edit",
        within,
        || sandbox.connections_of(APP2_ID) == 0,
    )
    .await;
    let out = app_cli(&url, &["update", APP2_ID, "--app-secret", APP2_SECRET]);
    assert!(out.status.success());
    wait_until(
        "both connections back with the right secret",
        within,
        || sandbox.connections_of(APP2_ID) == 2,
    )
    .await;

    // Deleted through B's admin API (it has a token: forced): both close.
    let r = reqwest::Client::new()
        .delete(format!(
            "{}/api/v1/apps/{APP2_ID}?force=true&hard=true",
            b.admin
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let took = wait_until("both connections of the deleted app closed", within, || {
        sandbox.connections_of(APP2_ID) == 0
    })
    .await;
    eprintln!("app deleted through B: both connections closed in {took:?}");
    assert_eq!(sandbox.connections_of(APP_ID), 2);
    // Each instance reloaded on changes it did not make itself.
    for i in [&a, &b] {
        let reloads = metric(
            &i.scrape().await,
            "lark_service_app_registry_reloads_total",
            "",
        );
        assert!(reloads >= 5.0, "{reloads}");
    }
    a.stop();
    b.stop();
}
