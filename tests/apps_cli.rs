//! `lark-service app …` as an operator uses it: the registry in the store (secrets sealed,
//! never printed), soft and hard delete, and the same commands through the running service.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use lark_service::storage::{Key, Keyring, Store, StoreOptions, UserToken};
use secrecy::SecretString;

const BIN: &str = env!("CARGO_BIN_EXE_lark-service");
const CONFIG_APP_SECRET: &str = "sentinel-config-app-secret-77e1";
const SECRET_B: &str = "sentinel-app-b-secret-4c19d0aa";
const SECRET_B2: &str = "sentinel-app-b-second-secret-0e9b";
const KEY1: &str = "5e17e1f05e17e1f05e17e1f05e17e1f05e17e1f05e17e1f05e17e1f05e17e1f0";
/// A Fernet key as the Python deployment holds it (44 characters of URL-safe base64).
const FERNET_KEY: &str = "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=";

fn cmd(dir: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("APP_ID", "cli_a0000000000000aa")
        .env("APP_SECRET", CONFIG_APP_SECRET)
        .env("LARK_DOMAIN", "http://127.0.0.1:9")
        .env("WEBSOCKET_ENABLED", "false")
        .env("PUBLIC_URL", "https://svc.example.com")
        .env("LARK_TOKEN_ENCRYPTION_KEY", KEY1)
        .env("STORAGE_PATH", dir.join("s.redb"));
    c
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn run(c: &mut Command, args: &[&str]) -> Output {
    let o = c.args(args).output().unwrap();
    for s in [CONFIG_APP_SECRET, SECRET_B, SECRET_B2, KEY1, FERNET_KEY] {
        assert!(!text(&o).contains(s), "a secret was printed:\n{}", text(&o));
    }
    o
}

fn ok(c: &mut Command, args: &[&str]) -> String {
    let o = run(c, args);
    assert!(o.status.success(), "{args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn list_json(dir: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["app", "list", "--json"];
    args.extend_from_slice(extra);
    let out = ok(&mut cmd(dir), &args);
    serde_json::from_str::<serde_json::Value>(out.trim())
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn ids(apps: &[serde_json::Value]) -> Vec<(String, String)> {
    apps.iter()
        .map(|a| {
            (
                a["app_id"].as_str().unwrap().to_owned(),
                a["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn file_contains(path: &Path, needle: &str) -> bool {
    let bytes = std::fs::read(path).unwrap();
    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn app_commands_seal_the_secret_list_as_json_and_delete_soft_then_hard() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let secret_file = d.join("b.secret");
    std::fs::write(&secret_file, format!("{SECRET_B}\n")).unwrap();
    let out = ok(
        &mut cmd(d),
        &[
            "app",
            "add",
            "--app-id",
            "cli_b000000000000bb",
            "--app-name",
            "second",
            "--app-secret-file",
            secret_file.to_str().unwrap(),
            "--description",
            "the second app",
            "--permissions",
            r#"["im:message"]"#,
        ],
    );
    assert!(out.contains("secret sealed with token_key"), "{out}");
    // Sealed at rest: the store file holds neither secret in clear.
    let store = d.join("s.redb");
    assert!(
        file_contains(&store, "cli_b000000000000bb"),
        "the row is there"
    );
    assert!(!file_contains(&store, SECRET_B));
    assert!(!file_contains(&store, CONFIG_APP_SECRET));

    let apps = list_json(d, &[]);
    assert_eq!(
        ids(&apps),
        [
            ("cli_a0000000000000aa".into(), "active".into()),
            ("cli_b000000000000bb".into(), "active".into())
        ]
    );
    assert_eq!(apps[0]["source"], "config");
    assert_eq!(apps[1]["source"], "store");
    assert_eq!(apps[1]["permissions"], serde_json::json!(["im:message"]));
    assert!(apps[1].get("app_secret").is_none());

    // The configuration's app is not editable here.
    let o = run(&mut cmd(d), &["app", "disable", "cli_a0000000000000aa"]);
    assert!(
        !o.status.success() && text(&o).contains("configuration"),
        "{}",
        text(&o)
    );
    // Duplicate names are refused.
    let o = run(
        &mut cmd(d),
        &[
            "app",
            "add",
            "--app-id",
            "cli_c",
            "--app-name",
            "second",
            "--app-secret",
            "x",
        ],
    );
    assert!(
        !o.status.success() && text(&o).contains("already used"),
        "{}",
        text(&o)
    );

    ok(
        &mut cmd(d),
        &[
            "app",
            "update",
            "cli_b000000000000bb",
            "--app-secret",
            SECRET_B2,
        ],
    );
    assert!(!file_contains(&store, SECRET_B2));
    ok(&mut cmd(d), &["app", "disable", "cli_b000000000000bb"]);
    assert_eq!(
        ids(&list_json(d, &["--status", "inactive"])),
        [("cli_b000000000000bb".into(), "inactive".into())]
    );
    ok(&mut cmd(d), &["app", "enable", "cli_b000000000000bb"]);
    let show = ok(&mut cmd(d), &["app", "show", "cli_b000000000000bb"]);
    assert!(
        show.contains("status: active") && show.contains("app_name: second"),
        "{show}"
    );

    // A user token of app B: delete needs --force.
    {
        let s = Store::open(
            &store,
            Keyring::new(
                Key::from_hex(&SecretString::from(KEY1.to_owned())).unwrap(),
                vec![],
            ),
            StoreOptions::default(),
        )
        .unwrap();
        s.put_token(&UserToken {
            app_id: "cli_b000000000000bb".into(),
            user_id: "u1".into(),
            open_id: None,
            access_token: SecretString::from("tok".to_owned()),
            refresh_token: None,
            expires_at: u64::MAX / 2,
            refresh_expires_at: None,
            refresh_due_at: u64::MAX / 4,
            scopes: vec![],
            obtained_at: 0,
            session_id: None,
            needs_reauth: false,
            refresh_in_doubt_since: None,
        })
        .unwrap();
    }
    let o = run(&mut cmd(d), &["app", "delete", "cli_b000000000000bb"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("1 stored user token"), "{}", text(&o));

    // Soft delete: hidden from the default list, kept with status deleted.
    ok(
        &mut cmd(d),
        &["app", "delete", "cli_b000000000000bb", "--force"],
    );
    assert_eq!(
        ids(&list_json(d, &[])),
        [("cli_a0000000000000aa".into(), "active".into())]
    );
    assert_eq!(
        ids(&list_json(d, &["--status", "deleted"])),
        [("cli_b000000000000bb".into(), "deleted".into())]
    );
    // Hard delete: the row is gone.
    ok(
        &mut cmd(d),
        &["app", "delete", "cli_b000000000000bb", "--force", "--hard"],
    );
    assert!(list_json(d, &["--status", "deleted"]).is_empty());
    let o = run(&mut cmd(d), &["app", "show", "cli_b000000000000bb"]);
    assert!(
        !o.status.success() && text(&o).contains("no app"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_fernet_config_key_seals_app_secrets_and_is_needed_to_serve_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = ok(
        cmd(d).env("LARK_CONFIG_ENCRYPTION_KEY", FERNET_KEY),
        &[
            "app",
            "add",
            "--app-id",
            "cli_f",
            "--app-name",
            "f",
            "--app-secret",
            SECRET_B,
        ],
    );
    assert!(
        out.contains("secret sealed with config_encryption_key"),
        "{out}"
    );
    assert!(!file_contains(&d.join("s.redb"), SECRET_B));
    // The 64-hex form is accepted too; a malformed key is a configuration error.
    ok(
        cmd(d).env("LARK_CONFIG_ENCRYPTION_KEY", KEY1),
        &["app", "list"],
    );
    let o = run(
        cmd(d).env("LARK_CONFIG_ENCRYPTION_KEY", "not-a-key"),
        &["app", "list"],
    );
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
}

#[test]
fn while_the_service_runs_app_commands_go_through_its_admin_api() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let admin = "admin-token-of-at-least-32-bytes-0123456789";
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let with_admin = |c: &mut Command| {
        c.env("LARK_SERVICE_ADMIN_TOKEN", admin)
            .env("ADMIN_LISTEN", format!("127.0.0.1:{port}"));
    };
    let mut serve_cmd = cmd(d);
    with_admin(&mut serve_cmd);
    let mut serve = serve_cmd
        .args([
            "serve",
            "--set",
            "http.listen=127.0.0.1:0",
            "--set",
            "metrics.port=0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(serve.stdout.take().unwrap()).lines();
    let ready = lines.next().unwrap().unwrap();
    assert!(ready.starts_with("lark-service ready"), "{ready}");

    let mut c = cmd(d);
    with_admin(&mut c);
    ok(
        &mut c,
        &[
            "app",
            "add",
            "--app-id",
            "cli_live",
            "--app-name",
            "live",
            "--app-secret",
            SECRET_B,
        ],
    );
    let mut c = cmd(d);
    with_admin(&mut c);
    let out = ok(&mut c, &["app", "list", "--json"]);
    let apps: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(apps.as_array().unwrap().len(), 2, "{apps}");
    assert_eq!(apps[1]["app_id"], "cli_live");
    // Without the admin token the CLI says what to do.
    let o = run(&mut cmd(d), &["app", "list"]);
    assert!(
        !o.status.success() && text(&o).contains("admin_token"),
        "{}",
        text(&o)
    );

    let rc = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    assert!(rc.success());
    let out = serve.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Stopped: the same registry, read from the file directly, sealed.
    assert_eq!(
        ids(&list_json(d, &[]))[1],
        ("cli_live".into(), "active".into())
    );
    assert!(!file_contains(&d.join("s.redb"), SECRET_B));
}

/// Without the configuration's app, `serve` serves the registry's apps; with neither, it
/// refuses to start (exit 64) and says how to add one, rather than run with nothing to serve.
/// An app that is only inactive does not count.
#[test]
fn serve_without_any_app_refuses_and_says_how_to_add_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let serve = |d: &Path| {
        let mut c = cmd(d);
        c.env_remove("APP_ID").env_remove("APP_SECRET").args([
            "serve",
            "--set",
            "http.listen=127.0.0.1:0",
            "--set",
            "metrics.port=0",
            "--set",
            "admin.listen=127.0.0.1:0",
        ]);
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = c.spawn().unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(!text(&out).contains(SECRET_B), "{}", text(&out));
        out
    };
    let out = serve(d);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        text(&out).contains("no app to serve") && text(&out).contains("lark-service app add"),
        "{}",
        text(&out)
    );
    // An inactive registry app is not something to serve either.
    let mut add = cmd(d);
    add.env_remove("APP_ID").env_remove("APP_SECRET");
    ok(
        &mut add,
        &[
            "app",
            "add",
            "--app-id",
            "cli_b",
            "--app-name",
            "b",
            "--app-secret",
            SECRET_B,
        ],
    );
    let mut disable = cmd(d);
    disable.env_remove("APP_ID").env_remove("APP_SECRET");
    ok(&mut disable, &["app", "disable", "cli_b"]);
    let out = serve(d);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("no app to serve"), "{}", text(&out));
}
