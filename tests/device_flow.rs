//! The device flow against the sandbox over TLS, without a browser: the fallback path of the
//! device authorization endpoint, and what a restart does to a device session in flight.
//! (Approve, reject, expiry, the owner check and a grant without a refresh token are driven
//! by a real browser in `tests/browser.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

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

/// A device code is never stored: polling stops at shutdown (the service stops at once, not
/// after the code's lifetime), and the next start expires the session the earlier run left
/// pending, with its card patched, so it is never lost silently. Approving it afterwards
/// stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_expires_device_sessions_in_flight() {
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
