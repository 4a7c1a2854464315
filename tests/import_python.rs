//! `import python`: the Python deployment's exact `user_auth_sessions` table on a real
//! PostgreSQL server, imported by the real binary, then served by the service over the sandbox
//! (TLS); and its SQLite app store with Fernet-sealed secrets.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::pg::{Pg, PYTHON_DDL};
use common::{open_store, Service, KEY};
use lark_service::config::fernet::FernetKey;
use lark_service::export::{postgres, python_apps};
use lark_service::sandbox::{Sandbox, SandboxOptions, APP_ID};
use secrecy::{ExposeSecret, SecretString};

/// A row of the Python table; times are SQL expressions (naive UTC, as that service wrote).
#[allow(clippy::too_many_arguments)]
fn insert(
    id: u32,
    state: &str,
    open_id: Option<&str>,
    user_id: Option<&str>,
    token: Option<&str>,
    token_expires: &str,
    completed: &str,
) -> String {
    let q = |v: Option<&str>| v.map_or("NULL".to_owned(), |v| format!("'{v}'"));
    format!(
        "INSERT INTO user_auth_sessions (id, session_id, app_id, state, auth_method, redirect_uri,
            open_id, user_id, union_id, user_name, mobile, email, user_access_token,
            token_expires_at, created_at, expires_at, completed_at, message_id)
         VALUES ({id}, '1b4e28ba-2fa1-11d2-883f-{id:012x}', '{APP_ID}', '{state}', 'websocket_card',
            NULL, {}, {}, NULL, 'User {id}', '+86 138 0000 {id:04}', 'u{id}@example.com', {},
            {token_expires}, (now() AT TIME ZONE 'utc') - interval '3 hours',
            (now() AT TIME ZONE 'utc') - interval '170 minutes', {completed}, 'om_{id}');",
        q(open_id),
        q(user_id),
        q(token),
    )
}

const NOW_PLUS: &str = "(now() AT TIME ZONE 'utc') + interval";
const NOW_MINUS: &str = "(now() AT TIME ZONE 'utc') - interval";

fn run_binary(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let config = dir.join("config.toml");
    std::fs::write(&config, "").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lark-service"));
    cmd.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LARK_TOKEN_ENCRYPTION_KEY", KEY)
        .env("STORAGE_PATH", dir.join("s.redb"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.arg("--config")
        .arg(&config)
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn create_db(pg: &Pg, name: &str) -> String {
    let admin = postgres::connect(&pg.url("postgres"), &net())
        .await
        .unwrap();
    admin
        .batch_execute(&format!("CREATE DATABASE {name};"))
        .await
        .unwrap();
    pg.url(name)
}

fn net() -> lark_service::net::Net {
    lark_service::net::Net::new(&lark_service::net::NetOptions::default()).unwrap()
}

/// The issue's test: rows in the exact Python schema, `import python` by the real binary, then
/// the service serves each migrated user's token, never an expired one, and a token without a
/// refresh token turns needs-reauth at expiry (the card re-sent), never refreshed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrated_users_get_their_tokens_from_the_service() {
    let pg = tokio::task::spawn_blocking(Pg::start).await.unwrap();
    let url = create_db(&pg, "python_app").await;
    let py = postgres::connect(&url, &net()).await.unwrap();
    py.batch_execute(PYTHON_DDL).await.unwrap();
    let carol_ttl = Duration::from_secs(15);
    let rows = [
        // Alice authorized twice: the newer token is her current one.
        insert(
            1,
            "completed",
            Some("ou_sandbox_alice"),
            Some("sandbox_alice"),
            Some("py-alice-old"),
            &format!("{NOW_PLUS} '1 hour'"),
            &format!("{NOW_MINUS} '2 hours'"),
        ),
        insert(
            2,
            "completed",
            Some("ou_sandbox_alice"),
            Some("sandbox_alice"),
            Some("py-alice-token"),
            &format!("{NOW_PLUS} '2 hours'"),
            &format!("{NOW_MINUS} '10 minutes'"),
        ),
        // Bob's token has expired: not served, not carried over.
        insert(
            3,
            "completed",
            Some("ou_sandbox_bob"),
            Some("sandbox_bob"),
            Some("py-bob-expired"),
            &format!("{NOW_MINUS} '1 hour'"),
            &format!("{NOW_MINUS} '3 hours'"),
        ),
        // Carol (no user_id) has a token that expires in a few seconds.
        insert(
            4,
            "completed",
            Some("ou_sandbox_carol"),
            None,
            Some("py-carol-token"),
            &format!("{NOW_PLUS} '{} seconds'", carol_ttl.as_secs()),
            &format!("{NOW_MINUS} '1 hour'"),
        ),
        insert(
            5,
            "completed",
            Some("ou_dan"),
            Some("dan"),
            Some("py-dan-token"),
            &format!("{NOW_PLUS} '2 hours'"),
            &format!("{NOW_MINUS} '1 hour'"),
        ),
        insert(
            6,
            "pending",
            Some("ou_erin"),
            Some("erin"),
            None,
            "NULL",
            "NULL",
        ),
        insert(
            7,
            "expired",
            Some("ou_fay"),
            Some("fay"),
            None,
            "NULL",
            "NULL",
        ),
    ];
    py.batch_execute(&rows.concat()).await.unwrap();
    let inserted = Instant::now();

    // `import postgres` on this table says what to use instead (it used to panic).
    let scratch = lark_service::storage::Store::open_in_memory(
        lark_service::storage::Keyring::new(
            lark_service::storage::Key::from_bytes(&[1; 32]),
            vec![],
        ),
        lark_service::storage::StoreOptions::default(),
    )
    .unwrap();
    let e = postgres::import_all(&scratch.into(), &url, &net())
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("use `lark-service import python`"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let out = run_binary(
        dir.path(),
        &[],
        &["import", "python", "--postgres-url", &url],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("read 7 rows; imported 6 sessions, 3 tokens, 4 users"),
        "{stdout}"
    );
    assert!(stdout.contains("skipped 1 session(s): pending"), "{stdout}");
    assert!(stdout.contains("row id=6 (session_id 1b4e28ba-2fa1-11d2-883f-000000000006)"));
    assert!(
        stdout.contains(
            "row id=1 (session_id 1b4e28ba-2fa1-11d2-883f-000000000001), superseded by row id=2 "
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("skipped 1 token(s): superseded by a newer session of the same user"),
        "{stdout}"
    );
    assert!(stdout.contains("the token has expired"), "{stdout}");
    for secret in ["py-alice-token", "py-dan-token", "py-carol-token"] {
        assert!(!stdout.contains(secret) && !stderr.contains(secret));
    }
    // Sealed at rest: no plaintext token in the store file.
    let raw = std::fs::read(dir.path().join("s.redb")).unwrap();
    for secret in [
        "py-alice-token",
        "py-alice-old",
        "py-dan-token",
        "py-carol-token",
    ] {
        assert!(
            !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} in the store file"
        );
    }
    // Running it again changes nothing.
    let again = run_binary(
        dir.path(),
        &[],
        &["import", "python", "--postgres-url", &url],
    );
    assert!(again.status.success());
    assert!(
        text(&again.stdout).contains("imported 0 sessions, 0 tokens, 0 users"),
        "{}",
        text(&again.stdout)
    );

    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    assert!(sandbox.base_url().starts_with("https://"));
    let svc_dir = dir.path().to_owned();
    let svc = Service::start_in(dir, &sandbox, &[("AUTH_RESEND_CARD_ON_REAUTH", "true")]).await;
    let token = |user: &'static str| {
        let svc = &svc;
        async move {
            let (status, body) = svc.get(&format!("/api/v1/users/{user}/token")).await;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            (status, v["access_token"].as_str().map(str::to_owned), v)
        }
    };
    for (user, want) in [
        ("ou_sandbox_alice", "py-alice-token"),
        ("sandbox_alice", "py-alice-token"),
        ("ou_dan", "py-dan-token"),
        ("dan", "py-dan-token"),
        ("ou_sandbox_carol", "py-carol-token"),
    ] {
        let (status, got, body) = token(user).await;
        assert_eq!(
            (status, got.as_deref()),
            (200, Some(want)),
            "{user}: {body}"
        );
    }
    assert!(
        inserted.elapsed() < carol_ttl,
        "the machine was too slow to see Carol's token before it expired"
    );
    // While the service runs, the import refuses: the store is locked.
    let dir_path = svc_dir.clone();
    let out = run_binary(
        &dir_path,
        &[],
        &["import", "python", "--postgres-url", &url],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("locked"),
        "{}",
        text(&out.stderr)
    );
    for user in ["ou_sandbox_bob", "ou_erin", "ou_fay"] {
        let (status, got, body) = token(user).await;
        assert_eq!((status, got), (404, None), "{user}: {body}");
    }

    // Carol's token expires: it is not refreshed (there is no refresh token), it turns
    // needs-reauth and, as configured, a new card goes to her.
    let left = carol_ttl.saturating_sub(inserted.elapsed());
    tokio::time::sleep(left + Duration::from_secs(1)).await;
    let (status, got, body) = token("ou_sandbox_carol").await;
    assert_eq!((status, got), (409, None), "{body}");
    assert_eq!(body["error"], "needs_reauthorization");
    svc.wait_for(|| async { !sandbox.messages_for("ou_sandbox_carol").is_empty() })
        .await;
    assert_eq!(sandbox.hits("oauth_token"), 0, "nothing was refreshed");
    let (status, got, _) = token("ou_sandbox_alice").await;
    assert_eq!((status, got.as_deref()), (200, Some("py-alice-token")));
    svc.stop().await;
}

/// A bad row is named (its id, session id and column) and nothing is imported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_row_is_named_and_nothing_is_imported() {
    let pg = tokio::task::spawn_blocking(Pg::start).await.unwrap();
    let url = create_db(&pg, "python_bad").await;
    let py = postgres::connect(&url, &net()).await.unwrap();
    py.batch_execute(PYTHON_DDL).await.unwrap();
    let good = insert(
        1,
        "completed",
        Some("ou_a"),
        Some("a"),
        Some("py-a"),
        &format!("{NOW_PLUS} '1 hour'"),
        &format!("{NOW_MINUS} '1 hour'"),
    );
    let bad = insert(
        42,
        "sleeping",
        Some("ou_b"),
        Some("b"),
        None,
        "NULL",
        "NULL",
    );
    py.batch_execute(&format!("{good}{bad}")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = run_binary(
        dir.path(),
        &[],
        &["import", "python", "--postgres-url", &url],
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr
            .contains("row id=42 (session_id 1b4e28ba-2fa1-11d2-883f-00000000002a): column state"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let store = open_store(dir.path());
    assert!(store.list_sessions(None, 100).unwrap().is_empty());
    assert!(store.get_token(APP_ID, "a").unwrap().is_none());

    // A session id that is not a UUID, and a negative time, are named too.
    py.batch_execute(
        "UPDATE user_auth_sessions SET state = 'expired', session_id = 'nope' WHERE id = 42;",
    )
    .await
    .unwrap();
    drop(store);
    // The URL from a private file works the same.
    let url_file = dir.path().join("pg-url");
    std::fs::write(&url_file, &url).unwrap();
    std::fs::set_permissions(
        &url_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let out = run_binary(
        dir.path(),
        &[],
        &[
            "import",
            "python",
            "--postgres-url-file",
            url_file.to_str().unwrap(),
        ],
    );
    assert!(
        text(&out.stderr).contains("row id=42 (session_id nope): column session_id"),
        "{}",
        text(&out.stderr)
    );
}

/// A URL with a password is not taken on the command line (every local user can read it),
/// and the password is not echoed; neither source given is a usage error.
#[test]
fn a_password_never_goes_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_binary(
        dir.path(),
        &[],
        &[
            "import",
            "python",
            "--postgres-url",
            "postgres://u:pw-on-argv@127.0.0.1:9/db",
        ],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("--postgres-url-file") && !stderr.contains("pw-on-argv"),
        "{stderr}"
    );
    let out = run_binary(dir.path(), &[], &["import", "python"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("--apps-db"));
}

const FIXTURE: &str = include_str!("fixtures/python/fernet.json");

fn apps_db(path: &Path, rows: &[(&str, &str, &str, &str, Option<&str>)]) {
    let db = rusqlite::Connection::open(path).unwrap();
    db.execute_batch(
        "CREATE TABLE applications (
            app_id VARCHAR(64) NOT NULL PRIMARY KEY,
            app_name VARCHAR(128) NOT NULL UNIQUE,
            app_secret TEXT NOT NULL,
            description TEXT,
            status VARCHAR(16) NOT NULL,
            permissions TEXT,
            created_at DATETIME NOT NULL,
            updated_at DATETIME NOT NULL,
            created_by VARCHAR(64));",
    )
    .unwrap();
    for (id, name, secret, status, perms) in rows {
        db.execute(
            "INSERT INTO applications VALUES (?1, ?2, ?3, 'desc', ?4, ?5,
                '2025-03-01 08:00:00.123456', '2025-03-02 09:30:00', 'admin')",
            rusqlite::params![id, name, secret, status, perms],
        )
        .unwrap();
    }
}

/// The SQLite app store: secrets written by Python's Fernet (and by ours, under a 64-hex key)
/// are opened; a wrong key or a bad row is named; the binary lists the apps, never a secret.
#[test]
fn the_python_app_store_is_read_and_its_secrets_opened() {
    let v: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
    let key = v["key"].as_str().unwrap();
    let tok = |i: usize| v["tokens"][i]["token"].as_str().unwrap().to_owned();
    let plain = |i: usize| v["tokens"][i]["plaintext"].as_str().unwrap().to_owned();
    let ours = FernetKey::parse(key)
        .unwrap()
        .encrypt(b"our-own-secret", 1_740_000_000);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("lark_config.db");
    apps_db(
        &db,
        &[
            (
                "cli_one",
                "One",
                &tok(0),
                "active",
                Some(r#"["im:message"]"#),
            ),
            ("cli_two", "Two", &tok(2), "inactive", None),
            ("cli_three", "Three", &ours, "deleted", Some("{}")),
        ],
    );
    let apps = python_apps::read_apps(&db, &SecretString::from(key.to_owned())).unwrap();
    let got: Vec<(&str, &str, String, &str)> = apps
        .iter()
        .map(|a| {
            (
                a.app_id.as_str(),
                a.app_name.as_str(),
                a.app_secret.expose_secret().to_owned(),
                a.status.as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("cli_one", "One", plain(0), "active"),
            ("cli_three", "Three", "our-own-secret".to_owned(), "deleted"),
            ("cli_two", "Two", plain(2), "inactive"),
        ]
    );
    assert_eq!(apps[0].permissions, Some(serde_json::json!(["im:message"])));
    assert_eq!(apps[0].created_at, Some(1_740_816_000_123));
    assert_eq!(apps[0].updated_at, Some(1_740_907_800_000));
    assert_eq!(apps[0].description.as_deref(), Some("desc"));

    // Another key: the app and the column are named.
    let e = python_apps::read_apps(&db, &SecretString::from("ab".repeat(32))).unwrap_err();
    assert!(
        matches!(&e, python_apps::AppsError::BadColumn { app, column: "app_secret", .. } if app == "cli_one"),
        "{e}"
    );

    // The binary, with the Fernet key in LARK_CONFIG_ENCRYPTION_KEY, lists them.
    let out = run_binary(
        dir.path(),
        &[("LARK_CONFIG_ENCRYPTION_KEY", key)],
        &["import", "python", "--apps-db", db.to_str().unwrap()],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("apps in "), "{stdout}");
    assert!(stdout.contains("app cli_one \"One\" active"), "{stdout}");
    assert!(stdout.contains("app cli_two \"Two\" inactive"), "{stdout}");
    assert!(!stdout.contains(&plain(0)) && !stdout.contains("our-own-secret"));
    assert!(stdout.contains("apps: 3 imported, 0 skipped"), "{stdout}");
    // They are in the registry with their status and times, their secrets sealed.
    let out = run_binary(
        dir.path(),
        &[("LARK_CONFIG_ENCRYPTION_KEY", key)],
        &["app", "list", "--status", "inactive", "--json"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["app_id"], "cli_two");
    assert_eq!(listed[0]["status"], "inactive");
    let out = run_binary(
        dir.path(),
        &[("LARK_CONFIG_ENCRYPTION_KEY", key)],
        &["app", "show", "cli_one", "--json"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let one: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(one["status"], "active");
    assert_eq!(one["created_at"], 1_740_816_000_123_u64);
    let file = std::fs::read(dir.path().join("s.redb")).unwrap();
    for secret in [plain(0), plain(2), "our-own-secret".to_owned()] {
        assert!(
            !file.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "an app secret is in the store file in clear"
        );
    }
    // Again: nothing changes.
    let out = run_binary(
        dir.path(),
        &[("LARK_CONFIG_ENCRYPTION_KEY", key)],
        &["import", "python", "--apps-db", db.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("apps: 0 imported, 3 skipped"),
        "{}",
        text(&out.stdout)
    );
    // Without the key it says what to set.
    let out = run_binary(
        dir.path(),
        &[],
        &["import", "python", "--apps-db", db.to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("LARK_CONFIG_ENCRYPTION_KEY"));

    // The 64-hex key form, and a row with an unknown status.
    let hex_key = "5a".repeat(32);
    let sealed = FernetKey::parse(&hex_key)
        .unwrap()
        .encrypt(b"hex-secret", 1);
    let db2 = dir.path().join("two.db");
    apps_db(
        &db2,
        &[
            ("cli_h", "H", &sealed, "active", None),
            ("cli_z", "Z", &sealed, "sleeping", None),
        ],
    );
    let e = python_apps::read_apps(&db2, &SecretString::from(hex_key.clone())).unwrap_err();
    assert!(
        matches!(&e, python_apps::AppsError::BadColumn { app, column: "status", .. } if app == "cli_z"),
        "{e}"
    );
    rusqlite::Connection::open(&db2)
        .unwrap()
        .execute("DELETE FROM applications WHERE app_id = 'cli_z'", [])
        .unwrap();
    let apps = python_apps::read_apps(&db2, &SecretString::from(hex_key)).unwrap();
    assert_eq!(apps[0].app_secret.expose_secret(), "hex-secret");
    // Not an app store.
    let e = python_apps::read_apps(
        &dir.path().join("s.redb"),
        &SecretString::from(key.to_owned()),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            python_apps::AppsError::Open { .. } | python_apps::AppsError::Table(_)
        ),
        "{e}"
    );
}
