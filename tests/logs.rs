//! No secret in any log line: run the binary in sandbox mode with debug JSON logs through a
//! whole authorization (request, card, approve, code exchange, token read, reject), then search
//! every log line for the secrets that passed through the process.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_lark-service");
const ADMIN: &str = "logs-test-admin-token-4471-0123456789";

fn unescape(s: &str) -> String {
    s.replace("&amp;", "&")
        .replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_authorization_logs_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LOG_LEVEL", "debug")
        .env("LOG_JSON_FORMAT", "true")
        .env("HTTP_LISTEN", "127.0.0.1:0")
        .env("ADMIN_LISTEN", "127.0.0.1:0")
        .env("PROMETHEUS_PORT", "0")
        .env("LARK_SERVICE_ADMIN_TOKEN", ADMIN)
        .args(["serve", "--sandbox"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut sandbox = String::new();
    let mut service = String::new();
    let mut public = String::new();
    while service.is_empty() {
        let l = lines.next().unwrap().unwrap();
        if let Some(rest) = l.strip_prefix("sandbox: a local imitation of Feishu runs at ") {
            sandbox = rest
                .split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches('/')
                .to_owned();
        }
        if let Some(rest) = l.strip_prefix("lark-service ready: ") {
            public = rest
                .split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches('/')
                .to_owned();
            // The admin API is on the admin listener.
            service = rest
                .split("admin API: ")
                .nth(1)
                .unwrap()
                .trim()
                .trim_end_matches('/')
                .to_owned();
        }
    }
    // The sandbox serves HTTPS with the CA `serve --sandbox` wrote beside its store.
    let ca = std::fs::read(dir.path().join("data/sandbox-ca.pem")).unwrap();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();

    // Wait for the long connection, then ask Alice and Bob to authorize.
    for _ in 0..200 {
        if http
            .get(format!("{public}/readyz"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .contains("long connection up")
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    for who in ["ou_sandbox_alice", "ou_sandbox_bob"] {
        let r = http
            .post(format!("{service}/api/v1/auth/requests"))
            .bearer_auth(ADMIN)
            .json(&serde_json::json!({"open_id": who}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
    }
    let page = http
        .get(format!("{sandbox}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    // Alice approves on the authorize page (as the browser would: form post, then redirect).
    let href = page
        .split("class=btn href=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    let authorize = url::Url::parse(&unescape(href)).unwrap();
    let mut form: Vec<(String, String)> = authorize
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .filter(|(k, _)| k != "sandbox_user")
        .collect();
    form.push(("sandbox_user".into(), "ou_sandbox_alice".into()));
    form.push(("decision".into(), "approve".into()));
    let r = http
        .post(format!("{sandbox}/sandbox/authorize"))
        .form(&form)
        .send()
        .await
        .unwrap();
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let cb = url::Url::parse(&location).unwrap();
    let code = cb
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .into_owned();
    let state = cb
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    let done = http.get(&location).send().await.unwrap();
    assert_eq!(done.status().as_u16(), 200);
    let token: serde_json::Value = http
        .get(format!("{service}/api/v1/users/ou_sandbox_alice/token"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let access = token["access_token"].as_str().unwrap().to_owned();

    // Bob rejects with the card's callback button (a card action over the long connection).
    let page = http
        .get(format!("{sandbox}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let bob = page.split_once("<h2>Bob").unwrap().1;
    let field = |name: &str| {
        unescape(
            bob.split(&format!("name={name} value=\""))
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap(),
        )
    };
    let r = http
        .post(format!("{sandbox}/sandbox/click"))
        .form(&[
            ("message_id", field("message_id")),
            ("open_id", "ou_sandbox_bob".to_owned()),
            ("value", field("value")),
        ])
        .send()
        .await
        .unwrap();
    assert!(r.status().is_redirection());
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(child.wait().unwrap().success());

    let key = std::fs::read_to_string(dir.path().join("data/sandbox-token.key")).unwrap();
    let secrets = [
        ("app secret", lark_service::sandbox::APP_SECRET.to_owned()),
        ("admin token", ADMIN.to_owned()),
        ("token key", key.trim().to_owned()),
        ("access token", access.clone()),
        ("any sandbox user token", "eyJsandbox".to_owned()),
        ("authorization code", code),
        ("OAuth state", state),
        ("card body", "act on your behalf".to_owned()),
    ];
    assert!(
        logs.lines().count() > 20,
        "expected debug logs, got:\n{logs}"
    );
    for line in logs.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        for (what, secret) in &secrets {
            assert!(
                !line.contains(secret.as_str()),
                "the {what} appears in a log line: {line}"
            );
        }
    }
    assert!(logs.contains("event_id"), "events are logged with their id");
}

/// At `LOG_LEVEL=trace` the long connection's handshake URL (it carries `ticket` and
/// `access_key`) is never logged: the WebSocket library logs the whole request at trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_never_show_the_websocket_handshake_url() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LOG_LEVEL", "trace")
        .env("HTTP_LISTEN", "127.0.0.1:0")
        .env("ADMIN_LISTEN", "127.0.0.1:0")
        .env("PROMETHEUS_PORT", "0")
        .env("LARK_SERVICE_ADMIN_TOKEN", ADMIN)
        .args(["serve", "--sandbox"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Trace output is large: drain it on a thread so the service never blocks on the pipe.
    let mut stderr = child.stderr.take().unwrap();
    let drain = std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = stderr.read_to_end(&mut all);
        all
    });
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let service = loop {
        let l = lines.next().unwrap().unwrap();
        if let Some(rest) = l.strip_prefix("lark-service ready: ") {
            break rest
                .split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches('/')
                .to_owned();
        }
    };
    let http = reqwest::Client::new();
    let mut up = false;
    for _ in 0..400 {
        let r = http
            .get(format!("{service}/readyz"))
            .bearer_auth(ADMIN)
            .send()
            .await;
        if let Ok(r) = r {
            if r.text()
                .await
                .unwrap_or_default()
                .contains("long connection up")
            {
                up = true;
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(up, "the long connection came up");
    let _ = child.kill();
    let _ = child.wait();
    let log = String::from_utf8_lossy(&drain.join().unwrap()).into_owned();
    assert!(log.contains("TRACE"), "trace logging was on");
    for secret in ["ticket=", "access_key="] {
        assert!(!log.contains(secret), "{secret} appears in the trace log");
    }
}
