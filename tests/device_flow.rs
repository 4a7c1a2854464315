//! The device flow against the sandbox over TLS, without a browser: the fallback path of the
//! device authorization endpoint, and what a restart does to a device session in flight (the
//! real binary resumes its stored poll; a session of an older version, without one, expires).
//! (Approve, reject, expiry, the owner check and a grant without a refresh token are driven
//! by a real browser in `tests/browser.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use lark_service::sandbox::{DeviceSettings, Sandbox, SandboxOptions};
use serde_json::{json, Value};

const ALICE: &str = "ou_sandbox_alice";

fn device() -> [(&'static str, &'static str); 2] {
    [("AUTH_FLOW", "device"), ("CARD_LOCALE", "en")]
}

/// The user code on the newest card `open_id` got (its button opens the verification page).
fn user_code(sandbox: &Sandbox, open_id: &str) -> String {
    let m = sandbox.messages_for(open_id).pop().expect("a card");
    let text = m.history.first().unwrap_or(&m.content).to_string();
    let at = text.find("user_code=").expect("a device card") + "user_code=".len();
    text[at..]
        .chars()
        .take_while(char::is_ascii_alphanumeric)
        .collect()
}

/// The value of the `auth_method="device"` series of `family` (with `extra` labels after it).
async fn device_metric(svc: &Service, family: &str, extra: &str) -> f64 {
    let text = svc.scrape().await;
    let series = format!(
        "{family}{{app_id=\"{}\",auth_method=\"device\"{extra}}} ",
        lark_service::sandbox::APP_ID
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.split_whitespace().next())
        .map_or(0.0, |v| v.parse().unwrap())
}

async fn session(svc: &Service, id: &str) -> Value {
    let (code, body) = svc.get(&format!("/api/v1/auth/sessions/{id}")).await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// When the accounts path answers 404, the OpenAPI path is used, and the flow completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_path_is_used_when_the_accounts_path_is_missing() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    sandbox.set_device(DeviceSettings {
        interval: Duration::from_secs(1),
        primary_path_missing: true,
        ..DeviceSettings::default()
    });
    let svc = Service::start(&sandbox, &device()).await;
    let (code, body) = svc
        .post("/api/v1/auth/requests", json!({"open_id": ALICE}))
        .await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(
        sandbox.hits("device_authorization"),
        2,
        "the 404, then the fallback"
    );
    let id = body["session_id"].as_str().unwrap().to_owned();
    sandbox
        .decide_device(&user_code(&sandbox, ALICE), ALICE, true)
        .unwrap();
    svc.wait_for_within(Duration::from_secs(20), || async {
        session(&svc, &id).await["state"] == "completed"
    })
    .await;
    assert_eq!(
        svc.get(&format!("/api/v1/users/{ALICE}/token")).await.0,
        200
    );
    // Counted as the device flow, not as the redirect flow.
    assert!(device_metric(&svc, "lark_service_auth_session_total", "").await >= 1.0);
    assert!(device_metric(&svc, "lark_service_auth_success_total", "").await >= 1.0);
    svc.stop().await;
}

/// A device session of an earlier version (its code was never stored) cannot be polled: the
/// next start expires it, with its card patched, so it is never lost silently. Approving it
/// afterwards stores nothing. Polling stops at shutdown (the service stops at once, not after
/// the code's lifetime).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_expires_device_sessions_without_a_stored_code() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    sandbox.set_device(DeviceSettings {
        interval: Duration::from_secs(1),
        ..DeviceSettings::default()
    });
    let svc = Service::start(&sandbox, &device()).await;
    let (code, body) = svc
        .post("/api/v1/auth/requests", json!({"open_id": ALICE}))
        .await;
    assert_eq!(code, 201, "{body}");
    let id = body["session_id"].as_str().unwrap().to_owned();
    let code = user_code(&sandbox, ALICE);
    // Polling runs.
    svc.wait_for_within(Duration::from_secs(10), || async {
        sandbox.device_polls().0 >= 1
    })
    .await;
    let stopping = Instant::now();
    let dir = svc.stop_keep_dir().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "shutdown waited for the poll: {:?}",
        stopping.elapsed()
    );
    // The code is stored, sealed; an older version stored none: remove it to be that version.
    {
        let store = open_store(dir.path());
        let sid: lark_service::storage::SessionId = id.parse().unwrap();
        assert!(store.get_device_poll(sid).unwrap().is_some());
        assert!(store.delete_device_poll(sid).unwrap());
    }
    let polls = sandbox.device_polls().0;

    let svc = Service::start_in(dir, &sandbox, &device()).await;
    svc.wait_for_within(Duration::from_secs(10), || async {
        session(&svc, &id).await["state"] == "expired"
    })
    .await;
    assert_eq!(
        session(&svc, &id).await["failure_reason"],
        "session_expired"
    );
    assert!(
        device_metric(
            &svc,
            "lark_service_auth_failure_total",
            ",reason=\"session_expired\""
        )
        .await
            >= 1.0
    );
    svc.wait_for_within(Duration::from_secs(10), || async {
        sandbox.messages_for(ALICE)[0]
            .content
            .to_string()
            .contains("Authorization request expired")
    })
    .await;
    // Nothing polls the old code any more; approving it now stores nothing.
    sandbox.decide_device(&code, ALICE, true).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sandbox.device_polls().0, polls);
    assert_eq!(
        svc.get(&format!("/api/v1/users/{ALICE}/token")).await.0,
        404
    );
    svc.stop().await;
}

/// The real binary on one redb file, its admin API, stopped with SIGTERM or `kill -9`.
struct Bin {
    child: Child,
    admin: String,
    client: reqwest::Client,
}

impl Bin {
    async fn start(dir: &std::path::Path, sandbox: &Sandbox) -> Self {
        let ca = trust_sandbox(dir, sandbox).unwrap();
        let config = dir.join("config.toml");
        std::fs::write(&config, "").unwrap();
        let http_port = free_port();
        let admin_port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_lark-service"))
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("APP_ID", lark_service::sandbox::APP_ID)
            .env("APP_SECRET", lark_service::sandbox::APP_SECRET)
            .env("LARK_DOMAIN", sandbox.base_url())
            .env("TLS_CA_FILE", &ca)
            .env("WEBSOCKET_ENABLED", "false")
            .env("LARK_TOKEN_ENCRYPTION_KEY", KEY)
            .env("LARK_SERVICE_ADMIN_TOKEN", ADMIN)
            .env("CARD_LOCALE", "en")
            .env("AUTH_FLOW", "device")
            .env("STORAGE_PATH", dir.join("s.redb"))
            .env("HTTP_LISTEN", format!("127.0.0.1:{http_port}"))
            .env("ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
            .env("PROMETHEUS_PORT", "0")
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let ready = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().map(|l| l.unwrap()).unwrap_or_default();
            std::thread::spawn(move || for _ in lines {});
            first
        })
        .await
        .unwrap();
        assert!(ready.starts_with("lark-service ready:"), "{ready}");
        Self {
            child,
            admin: format!("http://127.0.0.1:{admin_port}"),
            client: reqwest::Client::new(),
        }
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .client
            .get(format!("{}{path}", self.admin))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}{path}", self.admin))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// SIGTERM; the process must exit cleanly, and soon (a poll does not hold it up).
    fn term(mut self) {
        let pid = self.child.id().to_string();
        let at = Instant::now();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let st = self.child.wait().unwrap();
        assert!(st.success(), "exited with {st}");
        assert!(at.elapsed() < Duration::from_secs(15), "{:?}", at.elapsed());
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Bin {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

async fn wait_until<F, Fut>(what: &str, within: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The real binary on redb, stopped mid-poll with SIGTERM and started again, resumes polling
/// the stored code at once; killed with `kill -9` mid-poll and started again, it resumes once
/// the dead run's lease lapses; the user then approves and the authorization completes, once,
/// with the card's user. While the binary is down nothing polls; no poll ever comes sooner
/// than the interval, and the code is never polled after it was redeemed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_binary_resumes_device_polls_after_sigterm_and_kill9() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    sandbox.set_device(DeviceSettings {
        interval: Duration::from_secs(1),
        ..DeviceSettings::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let bin = Bin::start(dir.path(), &sandbox).await;
    let (status, body) = bin
        .post("/api/v1/auth/requests", json!({"open_id": ALICE}))
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["session_id"].as_str().unwrap().to_owned();
    let code = user_code(&sandbox, ALICE);
    let polls = || sandbox.device_code_polls(&code).unwrap().polls;
    wait_until("polling", Duration::from_secs(15), || async {
        polls() >= 2
    })
    .await;

    // SIGTERM mid-poll: nothing polls while it is down; the next start resumes at once.
    bin.term();
    let down = polls();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(polls(), down, "polled while the service was down");
    let started = Instant::now();
    let bin = Bin::start(dir.path(), &sandbox).await;
    wait_until("resumed after SIGTERM", Duration::from_secs(10), || async {
        polls() > down
    })
    .await;
    let after_term = started.elapsed();
    assert_eq!(
        bin.get(&format!("/api/v1/auth/sessions/{id}")).await.1["state"],
        "pending"
    );

    // kill -9 mid-poll: the next start resumes once the dead run's lease lapses.
    wait_until("polling again", Duration::from_secs(10), || async {
        polls() >= down + 2
    })
    .await;
    bin.kill9();
    let down = polls();
    let started = Instant::now();
    let bin = Bin::start(dir.path(), &sandbox).await;
    wait_until("resumed after kill -9", Duration::from_secs(30), || async {
        polls() > down
    })
    .await;
    let after_kill = started.elapsed();

    sandbox.decide_device(&code, ALICE, true).unwrap();
    wait_until("completed", Duration::from_secs(15), || async {
        bin.get(&format!("/api/v1/auth/sessions/{id}")).await.1["state"] == "completed"
    })
    .await;
    assert_eq!(
        bin.get(&format!("/api/v1/users/{ALICE}/token")).await.0,
        200
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = sandbox.device_code_polls(&code).unwrap();
    assert_eq!(seen.too_fast, 0, "{seen:?}");
    assert_eq!(seen.after_redeemed, 0, "{seen:?}");
    eprintln!(
        "resumed {after_term:?} after a SIGTERM restart, {after_kill:?} after a kill -9 restart"
    );
    bin.term();
}
