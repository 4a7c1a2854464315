//! The binary as an operator uses it: exit codes, redaction, store commands, lock reporting.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use lark_service::storage::{
    AuthSession, Key, Keyring, SessionState, Store, StoreOptions, UserToken,
};
use secrecy::SecretString;

const BIN: &str = env!("CARGO_BIN_EXE_lark-service");
/// Secret values used below; none may appear in any output (CI also greps the test log).
const APP_SECRET: &str = "sentinel-app-secret-6f1d2c";
const KEY1: &str = "5e17e1f05e17e1f05e17e1f05e17e1f05e17e1f05e17e1f05e17e1f05e17e1f0";
const KEY2: &str = "a11ce0b0a11ce0b0a11ce0b0a11ce0b0a11ce0b0a11ce0b0a11ce0b0a11ce0b0";
const TOKEN: &str = "sentinel-user-access-token-93ab";

fn cmd(dir: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("APP_ID", "cli_a0000000000000aa")
        .env("LARK_DOMAIN", "http://127.0.0.1:9")
        .env("WEBSOCKET_ENABLED", "false")
        .env("APP_SECRET", APP_SECRET)
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

fn assert_no_secrets(s: &str) {
    for secret in [APP_SECRET, KEY1, KEY2, TOKEN] {
        assert!(!s.contains(secret), "secret leaked into output:\n{s}");
    }
}

#[test]
fn config_check_prints_the_effective_config_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let o = cmd(dir.path()).args(["config", "check"]).output().unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("app_id = \"cli_a0000000000000aa\"  # environment APP_ID"),
        "{t}"
    );
    assert!(
        t.contains("auth.session_expiry_seconds = \"600\"  # default"),
        "{t}"
    );
    assert!(t.contains("configuration is valid"), "{t}");
    assert_no_secrets(&t);
}

#[test]
fn config_errors_exit_64_and_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let o = cmd(dir.path())
        .env("AUTH_REQUEST_RATE_LIMIT", "lots")
        .args(["config", "check"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(64));
    let t = text(&o);
    assert!(
        t.contains("AUTH_REQUEST_RATE_LIMIT") && t.contains("\"lots\""),
        "{t}"
    );

    let o = cmd(dir.path())
        .env("LARK_TOKEN_ENCRYPTION_KEY", format!("{KEY1}00"))
        .args(["config", "check"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(64));
    assert_no_secrets(&text(&o));

    let o = cmd(dir.path())
        .env_remove("APP_SECRET")
        .args(["config", "check"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(64));
    assert!(text(&o).contains("app_secret is not set"), "{}", text(&o));
}

#[test]
fn keys_generate_writes_a_private_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let o = cmd(dir.path()).args(["keys", "generate"]).output().unwrap();
    let k = String::from_utf8(o.stdout).unwrap();
    assert_eq!(k.trim().len(), 64);
    assert!(k.trim().chars().all(|c| c.is_ascii_hexdigit()));
    let f = dir.path().join("k");
    let o = cmd(dir.path())
        .args(["keys", "generate", "--out"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // And it is usable as a *_FILE secret.
    let o = cmd(dir.path())
        .env_remove("LARK_TOKEN_ENCRYPTION_KEY")
        .env("LARK_TOKEN_ENCRYPTION_KEY_FILE", &f)
        .args(["config", "check"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}

fn seed(dir: &Path) -> Vec<AuthSession> {
    let store = Store::open(
        &dir.join("s.redb"),
        Keyring::new(
            Key::from_hex(&SecretString::from(KEY1.to_owned())).unwrap(),
            vec![],
        ),
        StoreOptions::default(),
    )
    .unwrap();
    let mut out = Vec::new();
    for i in 0..3 {
        let mut s = AuthSession::new_pending(
            "cli_a0000000000000aa",
            &format!("user{i}"),
            vec!["offline_access".into()],
            lark_service::storage::now_ms(),
            600_000,
        );
        if i == 0 {
            s.state = SessionState::Completed;
            s.access_token = Some(SecretString::from(TOKEN.to_owned()));
            let t = UserToken {
                app_id: s.app_id.clone(),
                user_id: s.user_id.clone(),
                open_id: None,
                access_token: SecretString::from(TOKEN.to_owned()),
                refresh_token: None,
                expires_at: u64::MAX / 2,
                refresh_expires_at: None,
                refresh_due_at: u64::MAX / 4,
                scopes: vec![],
                obtained_at: 0,
                session_id: Some(s.session_id),
                needs_reauth: false,
                refresh_in_doubt_since: None,
            };
            store.complete_session(&s, &t).unwrap();
        } else {
            store.put_session(&s).unwrap();
        }
        out.push(s);
    }
    out
}

#[test]
fn sessions_list_show_revoke_and_sweep_print_no_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let sessions = seed(dir.path());
    let o = cmd(dir.path()).args(["sessions", "list"]).output().unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for s in &sessions {
        assert!(t.contains(&s.session_id.to_string()), "{t}");
    }
    assert!(t.contains("completed") && t.contains("pending"), "{t}");
    assert_no_secrets(&t);

    let o = cmd(dir.path())
        .args(["sessions", "list", "--state", "completed", "--json"])
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(t.lines().count(), 1, "{t}");
    assert!(t.contains("\"has_tokens\":true"), "{t}");
    assert_no_secrets(&t);

    let id = sessions[0].session_id.to_string();
    let o = cmd(dir.path())
        .args(["sessions", "show", &id])
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_no_secrets(&text(&o));
    let o = cmd(dir.path())
        .args(["sessions", "revoke", &id])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = cmd(dir.path())
        .args(["sessions", "show", &id])
        .output()
        .unwrap();
    assert!(text(&o).contains("\"state\": \"revoked\""), "{}", text(&o));
    let o = cmd(dir.path())
        .args(["sessions", "show", "nothex"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(64));
    let o = cmd(dir.path())
        .args(["sessions", "sweep"])
        .output()
        .unwrap();
    assert!(
        text(&o).contains("sweep: 0 sessions expired"),
        "{}",
        text(&o)
    );
}

#[test]
fn wrong_key_is_reported_by_key_id_and_rotation_via_cli() {
    let dir = tempfile::tempdir().unwrap();
    seed(dir.path());
    let o = cmd(dir.path())
        .env("LARK_TOKEN_ENCRYPTION_KEY", KEY2)
        .args(["sessions", "list"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(65));
    let t = text(&o);
    let id1 = Key::from_hex(&SecretString::from(KEY1.to_owned()))
        .unwrap()
        .id()
        .to_string();
    assert!(
        t.contains(&format!("token key does not match the store: key id {id1}")),
        "{t}"
    );
    assert_no_secrets(&t);

    let rotate = |args: &[&str]| {
        cmd(dir.path())
            .env("LARK_TOKEN_ENCRYPTION_KEY", KEY2)
            .env("LARK_TOKEN_ENCRYPTION_PREVIOUS_KEYS", KEY1)
            .args(args)
            .output()
            .unwrap()
    };
    let t = text(&rotate(&["keys", "status"]));
    assert!(t.contains("rotation pending:   yes"), "{t}");
    let o = rotate(&["keys", "rotate", "--batch", "1"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("rotating: ") && t.contains("rotation complete"),
        "{t}"
    );
    assert_no_secrets(&t);
    // The old key is no longer needed.
    let o = cmd(dir.path())
        .env("LARK_TOKEN_ENCRYPTION_KEY", KEY2)
        .args(["keys", "status"])
        .output()
        .unwrap();
    let t = text(&o);
    assert!(
        o.status.success() && t.contains("rotation pending:   no"),
        "{t}"
    );
}

#[test]
fn a_running_service_holds_the_lock_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = cmd(dir.path())
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
    assert!(
        ready.starts_with("lark-service ready: http://127.0.0.1:"),
        "{ready}"
    );

    let o = cmd(dir.path()).args(["sessions", "list"]).output().unwrap();
    assert_eq!(o.status.code(), Some(75), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("locked by pid {}", serve.id())),
        "{}",
        text(&o)
    );

    let rc = std::process::Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    assert!(rc.success());
    let out = serve.wait_with_output().unwrap();
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{logs}");
    assert!(logs.contains("Stopped."), "{logs}");
    assert_no_secrets(&logs);
    // The lock is released: the CLI reads the store now.
    assert!(cmd(dir.path())
        .args(["sessions", "list"])
        .output()
        .unwrap()
        .status
        .success());
}

/// systemd may stop the service the instant it says READY=1; the SIGTERM handler must already be
/// installed by then, so the stop is clean (exit 0), not a kill by the default signal action.
#[test]
fn sigterm_right_after_ready_is_a_clean_stop() {
    use std::os::unix::net::UnixDatagram;
    for round in 0..40 {
        let dir = tempfile::tempdir().unwrap();
        let sock_path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&sock_path).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let mut serve = cmd(dir.path())
            .env("NOTIFY_SOCKET", &sock_path)
            .args([
                "serve",
                "--set",
                "http.listen=127.0.0.1:0",
                "--set",
                "metrics.port=0",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut buf = [0u8; 1024];
        loop {
            let n = sock.recv(&mut buf).expect("READY=1 within 30 s");
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "READY=1")
            {
                break;
            }
        }
        let killed = Command::new("kill")
            .args(["-TERM", &serve.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let status = serve.wait().unwrap();
        assert!(
            status.success(),
            "round {round}: SIGTERM right after READY=1 ended the service with {status}"
        );
    }
}

/// `serve --sandbox` from an empty working directory with nothing configured: everything it
/// keeps is under `./data/` (store, generated token key and admin token, both mode 0600), its
/// listeners are on loopback, and the admin token in the file it names opens the admin API.
/// (The packaged default config path is fixed at /etc/lark-service/config.toml, so that
/// sandbox mode does not read it is tested at the function level in `daemon::tests`.)
#[test]
fn sandbox_serve_keeps_everything_under_data_and_names_the_admin_token_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Command::new(BIN)
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir.path())
        .env("HTTP_LISTEN", "127.0.0.1:0")
        .env("ADMIN_LISTEN", "127.0.0.1:0")
        .env("PROMETHEUS_PORT", "0")
        .args(["serve", "--sandbox"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(serve.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let ready = loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("the service stopped before it was ready: {seen:?}"))
            .unwrap();
        if line.starts_with("lark-service ready: ") {
            break line;
        }
        seen.push(line);
    };
    let data = dir.path().join("data");
    let token_file = data.join("sandbox-admin-token");
    let canonical = std::fs::canonicalize(&token_file).unwrap();
    assert!(
        seen.iter().any(|l| l.contains("admin token")
            && (l.contains(&token_file.display().to_string())
                || l.contains(&canonical.display().to_string()))),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|l| l.contains("sandbox: a local imitation of Feishu runs at https://127.0.0.1:")),
        "{seen:?}"
    );
    assert!(data.join("lark-service.redb").exists());
    // The sandbox's CA is written beside the store and is what the service trusts it by.
    assert!(std::fs::read_to_string(data.join("sandbox-ca.pem"))
        .unwrap()
        .starts_with("-----BEGIN CERTIFICATE-----"));
    for f in [&token_file, &data.join("sandbox-token.key")] {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    // The admin API is on the admin listener.
    let service = ready
        .split("admin API: ")
        .nth(1)
        .unwrap()
        .trim()
        .trim_end_matches('/')
        .to_owned();
    assert!(service.starts_with("http://127.0.0.1:"), "{ready}");
    let token = std::fs::read_to_string(&token_file).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let get = |bearer: &str| {
        rt.block_on(async {
            reqwest::Client::new()
                .get(format!("{service}/api/v1/users/ou_sandbox_alice/token"))
                .bearer_auth(bearer.trim())
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    assert_eq!(get(&token), 404, "the file's admin token opens the API");
    assert_eq!(get("wrong"), 401);

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
    // Nothing outside ./data/ (and no config file) was created in the working directory.
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(entries, ["data"], "{entries:?}");
}

/// Issue 16: `serve` of a real app refuses to start without a redirect users' browsers reach,
/// naming both settings; the sandbox needs none.
#[test]
fn serve_without_a_public_url_or_redirect_uri_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let o = cmd(dir.path())
        .env_remove("PUBLIC_URL")
        .args([
            "serve",
            "--set",
            "http.listen=127.0.0.1:0",
            "--set",
            "metrics.port=0",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(64), "{t}");
    assert!(
        t.contains("PUBLIC_URL") && t.contains("AUTH_REDIRECT_URI"),
        "{t}"
    );
    assert_no_secrets(&t);
}

/// Issue 16: the PostgreSQL URL (with its password) never goes on the command line, where every
/// local user can read it: `--url` is gone; the URL comes from a private file or the config.
#[test]
fn export_and_import_take_no_database_url_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    for verb in ["export", "import"] {
        let o = cmd(dir.path())
            .args([
                verb,
                "postgres",
                "--url",
                "postgres://u:pw-on-argv@127.0.0.1:9/db",
            ])
            .output()
            .unwrap();
        assert!(!o.status.success(), "{verb} took --url");
        let o = cmd(dir.path()).args([verb, "postgres"]).output().unwrap();
        let t = text(&o);
        assert!(!o.status.success());
        assert!(
            t.contains("--url-file") && t.contains("EXPORT_POSTGRES_URL"),
            "{t}"
        );
        // A URL file readable by others is refused like any secret file.
        let f = dir.path().join("pg-url");
        std::fs::write(&f, "postgres://u:pw-in-file@127.0.0.1:9/db\n").unwrap();
        std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let o = cmd(dir.path())
            .args([verb, "postgres", "--url-file", f.to_str().unwrap()])
            .output()
            .unwrap();
        let t = text(&o);
        assert_eq!(o.status.code(), Some(64), "{t}");
        assert!(t.contains("chmod 600") && !t.contains("pw-in-file"), "{t}");
    }
}

/// Issue 16: store commands run as root refuse a store another user owns (files root would
/// create beside it lock the service out). Run as root in CI.
#[test]
fn store_commands_as_root_refuse_a_store_another_user_owns() {
    let am_root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    assert!(am_root, "this test needs root (CI runs as root)");
    let dir = tempfile::tempdir().unwrap();
    let o = cmd(dir.path()).args(["sessions", "list"]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let store = dir.path().join("s.redb");
    std::os::unix::fs::chown(&store, Some(65534), Some(65534)).unwrap();
    let o = cmd(dir.path()).args(["sessions", "list"]).output().unwrap();
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("uid 65534") && t.contains("sudo -u"), "{t}");
    assert!(!dir.path().join("s.redb.pid").exists());
}
