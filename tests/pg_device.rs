//! The device flow on a fleet: two instances of the real binary on one throw-away PostgreSQL,
//! against the sandbox over TLS, `AUTH_FLOW=device`, several users asking through the first.
//! Some approve while it polls (it completes them); then it is killed with `kill -9` while the
//! others' device codes are pending, and the survivor takes their polls over and completes
//! them. What must hold: every authorization completes, once (no code is redeemed twice, no
//! token is stored for a user twice); each device code is polled by one instance at a time
//! (no poll ever comes sooner than the code's interval, which two pollers of one code could
//! not avoid); the survivor took the polls over within seconds of the kill.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::time::{Duration, Instant};

use common::fleet::Instance;
use common::pg::Pg;
use common::{free_port, metric};
use lark_service::sandbox::{DeviceSettings, Sandbox, SandboxOptions, APP_ID};
use serde_json::{json, Value};

/// Users asking; the first `EARLY` approve before the kill.
const USERS: usize = 8;
const EARLY: usize = 3;

fn open_id(i: usize) -> String {
    format!("ou_sandbox_user{i:04}")
}

/// The user code on the newest card `open_id` got.
fn user_code(sandbox: &Sandbox, open_id: &str) -> String {
    let m = sandbox.messages_for(open_id).pop().expect("a card");
    let text = m.history.first().unwrap_or(&m.content).to_string();
    let at = text.find("user_code=").expect("a device card") + "user_code=".len();
    text[at..]
        .chars()
        .take_while(char::is_ascii_alphanumeric)
        .collect()
}

async fn state(i: &Instance, id: &str) -> String {
    let (code, body) = i.get(&format!("/api/v1/auth/sessions/{id}")).await;
    assert_eq!(code, 200, "{body}");
    body["state"].as_str().unwrap_or_default().to_owned()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instances_device_polls_are_taken_over_and_complete_once() {
    let pg = Pg::start();
    let url = pg.url("postgres");
    let sandbox = Sandbox::start(SandboxOptions {
        extra_users: USERS,
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    sandbox.set_device(DeviceSettings {
        interval: Duration::from_secs(1),
        ..DeviceSettings::default()
    });
    let (pa, pb) = (free_port(), free_port());
    let redirect = format!("http://127.0.0.1:{pa}/oauth/callback");
    let env = [("AUTH_FLOW", "device"), ("AUTH_REQUEST_RATE_LIMIT", "1000")];
    let mut a = Instance::start(&sandbox, &url, pa, &redirect, &env).await;
    let b = Instance::start(&sandbox, &url, pb, &redirect, &env).await;

    // Every user asks through A: A holds every poll lease.
    let mut sessions = Vec::new();
    for i in 0..USERS {
        let (status, body): (u16, Value) = a
            .post("/api/v1/auth/requests", json!({ "open_id": open_id(i) }))
            .await;
        assert_eq!(status, 201, "{body}");
        let id = body["session_id"].as_str().unwrap().to_owned();
        sessions.push((id, user_code(&sandbox, &open_id(i))));
    }
    for (_, code) in &sessions {
        wait_until("every code polled", Duration::from_secs(20), || async {
            sandbox.device_code_polls(code).unwrap().polls >= 2
        })
        .await;
    }
    // The early ones approve; A (the only poller) completes them.
    for (i, (_, code)) in sessions.iter().enumerate().take(EARLY) {
        sandbox.decide_device(code, &open_id(i), true).unwrap();
    }
    for (id, _) in sessions.iter().take(EARLY) {
        wait_until(
            "A completes the early ones",
            Duration::from_secs(20),
            || async { state(&a, id).await == "completed" },
        )
        .await;
    }
    // B polled nothing so far: it has completed nothing, though its takeover looked every 2 s.
    let b_success = |text: &str| {
        metric(
            text,
            "lark_service_auth_success_total",
            &format!("app_id=\"{APP_ID}\",auth_method=\"device\""),
        )
    };
    assert_eq!(b_success(&b.scrape().await), 0.0);

    // A dies with the others' codes pending.
    let before: Vec<u64> = sessions
        .iter()
        .map(|(_, c)| sandbox.device_code_polls(c).unwrap().polls)
        .collect();
    a.kill9();
    let killed = Instant::now();
    for (n, (_, code)) in sessions.iter().enumerate().skip(EARLY) {
        wait_until("B resumes the polls", Duration::from_secs(30), || async {
            sandbox.device_code_polls(code).unwrap().polls > before[n]
        })
        .await;
    }
    let taken_over = killed.elapsed();
    assert!(
        taken_over < Duration::from_secs(20),
        "the survivor took over after {taken_over:?}"
    );
    for (i, (_, code)) in sessions.iter().enumerate().skip(EARLY) {
        sandbox.decide_device(code, &open_id(i), true).unwrap();
    }
    for (id, _) in &sessions {
        wait_until(
            "every session completed",
            Duration::from_secs(30),
            || async { state(&b, id).await == "completed" },
        )
        .await;
    }
    for i in 0..USERS {
        assert_eq!(b.token(&open_id(i)).await.0, 200, "user {i}");
    }
    // Settle: a second redemption or a late double poll would show now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (n, (_, code)) in sessions.iter().enumerate() {
        let seen = sandbox.device_code_polls(code).unwrap();
        assert_eq!(seen.too_fast, 0, "user {n}: two pollers at once ({seen:?})");
        assert_eq!(
            seen.after_redeemed, 0,
            "user {n}: the code was polled after it was redeemed ({seen:?})"
        );
    }
    assert_eq!(
        b_success(&b.scrape().await),
        (USERS - EARLY) as f64,
        "B completed exactly the ones it took over"
    );
    eprintln!("takeover after kill -9: {taken_over:?}");
    b.stop();
}
