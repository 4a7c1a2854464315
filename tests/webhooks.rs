//! Outgoing webhooks (issue 20), end to end: the service against the sandbox (over TLS), the
//! events delivered to a receiver this test serves over TLS (its own throwaway CA, trusted the
//! way an operator trusts a company CA: `TLS_CA_FILE`), through the service's own HTTP client.
//!
//! - every delivery's signature verifies with the shared secret, and not with another;
//! - a receiver answering 5xx gets the same event again, until it answers 2xx;
//! - nothing is lost across a restart of the real binary while the receiver is down, and each
//!   event arrives once when nothing goes wrong (delivery is at least once: the event id is
//!   the receiver's de-duplication key);
//! - no payload carries a token or a secret.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::receiver::{receiver_tls, serve_receiver, trust_both, Got, Receiver};
use common::{find_string, free_port, metric, open_store, Service, ADMIN, KEY};
use lark_service::sandbox::{Sandbox, SandboxOptions, APP_ID, APP_SECRET};
use lark_service::webhooks::verify;
use secrecy::ExposeSecret;
use serde_json::{json, Value};

const SECRET: &str = "whsec-0123456789abcdef0123456789abcdef-test";

async fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Every delivery verifies with the secret (and no other), its headers match its body, and no
/// body or header holds any of `secrets`.
fn check_deliveries(got: &[Got], secrets: &[String]) {
    assert!(!got.is_empty());
    for g in got {
        assert_eq!(
            verify(SECRET.as_bytes(), &g.signature, &g.body, now_s(), 300),
            Ok(()),
            "a receiver with the secret verifies every delivery"
        );
        assert!(
            verify(
                b"wrong-secret-0123456789abcdef0123456789",
                &g.signature,
                &g.body,
                now_s(),
                300
            )
            .is_err(),
            "a wrong secret does not verify"
        );
        let v = g.json();
        assert_eq!(g.event_id_header, v["event_id"].as_str().unwrap());
        assert_eq!(g.event_type_header, v["type"].as_str().unwrap());
        assert_eq!(v["app_id"], APP_ID);
        let text = format!(
            "{} {} {} {}",
            String::from_utf8_lossy(&g.body),
            g.signature,
            g.event_id_header,
            g.event_type_header
        );
        for s in secrets {
            assert!(!s.is_empty());
            assert!(
                !text.contains(s.as_str()),
                "a webhook carries a secret or token: {text}"
            );
        }
    }
}

async fn authorize(
    http: &reqwest::Client,
    admin: &str,
    sandbox: &Sandbox,
    open_id: &str,
    approve: bool,
) -> String {
    let before = sandbox.messages_for(open_id).len();
    let r = http
        .post(format!("{admin}/api/v1/auth/requests"))
        .bearer_auth(ADMIN)
        .json(&json!({"open_id": open_id}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let cards = sandbox.messages_for(open_id);
    assert!(cards.len() > before, "the Authorize card was sent");
    let authorize = find_string(&cards[cards.len() - 1].content, &|s| {
        s.contains("/open-apis/authen/v1/authorize?")
    })
    .unwrap()
    .to_owned();
    let redirect = if approve {
        sandbox.approve(&authorize, open_id).unwrap()
    } else {
        sandbox.reject(&authorize, open_id).unwrap()
    };
    let page = http.get(&redirect).send().await.unwrap();
    assert_eq!(page.status(), 200);
    redirect
}

async fn access_token(http: &reqwest::Client, admin: &str, open_id: &str) -> String {
    let r = http
        .get(format!("{admin}/api/v1/users/{open_id}/token"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Signed deliveries, retries after 5xx, every event type the flow produces here (completed,
/// failed with its reason, revoked), and no secret in any of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_are_signed_retried_after_5xx_and_carry_no_secret() {
    let _serial = common::METRICS_SERIAL.lock().await;
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let (ca, acceptor) = receiver_tls();
    let receiver = Receiver::default();
    // The first two deliveries are answered 503.
    receiver.fail_next.store(2, Ordering::SeqCst);
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let server = serve_receiver(addr, acceptor, receiver.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let cas = trust_both(dir.path(), &sandbox, &ca);
    let url = format!("https://127.0.0.1:{port}/hook");
    let svc = Service::start_in(
        dir,
        &sandbox,
        &[
            ("TLS_CA_FILE", cas.as_str()),
            ("WEBSOCKET_ENABLED", "false"),
            ("WEBHOOKS_URLS", url.as_str()),
            ("WEBHOOKS_SECRET", SECRET),
            ("WEBHOOKS_TIMEOUT_SECONDS", "3"),
        ],
    )
    .await;
    let before = svc.scrape().await;
    let admin = format!("http://{}", svc.admin);
    let http = reqwest::Client::new();

    // Alice authorizes: the completion is answered 503 twice, then delivered: three requests,
    // one event id.
    let alice_redirect = authorize(&http, &admin, &sandbox, "ou_sandbox_alice", true).await;
    let alice_access = access_token(&http, &admin, "ou_sandbox_alice").await;
    eventually("the completion accepted", Duration::from_secs(30), || {
        receiver.accepted().len() == 1
    })
    .await;
    // Bob declines at the consent page.
    let bob_redirect = authorize(&http, &admin, &sandbox, "ou_sandbox_bob", false).await;
    eventually("two events accepted", Duration::from_secs(30), || {
        receiver.accepted().len() == 2
    })
    .await;
    let all = receiver.all();
    let first_id = all[0].json()["event_id"].as_str().unwrap().to_owned();
    let tries: Vec<&Got> = all
        .iter()
        .filter(|g| g.json()["event_id"] == first_id.as_str())
        .collect();
    assert_eq!(
        tries.iter().map(|g| g.status).collect::<Vec<_>>(),
        [503, 503, 200],
        "a 5xx answer is retried until the receiver takes the event"
    );
    assert!(
        tries.iter().all(|g| g.body == tries[0].body),
        "a retry sends the same bytes"
    );
    let accepted = receiver.accepted();
    let kinds: BTreeMap<String, Value> = accepted
        .values()
        .map(|g| {
            (
                g[0].json()["type"].as_str().unwrap().to_owned(),
                g[0].json(),
            )
        })
        .collect();
    let completed = &kinds["authorization.completed"];
    assert_eq!(completed["user_id"], "ou_sandbox_alice");
    assert_eq!(completed["open_id"], "ou_sandbox_alice");
    assert!(completed["session_id"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    let failed = &kinds["authorization.failed"];
    assert_eq!(failed["user_id"], "ou_sandbox_bob");
    assert!(
        failed["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{failed}"
    );

    // Alice's token is revoked: token.revoked.
    let r = http
        .delete(format!("{admin}/api/v1/users/ou_sandbox_alice/token"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    eventually("token.revoked accepted", Duration::from_secs(30), || {
        receiver.accepted().len() == 3
    })
    .await;
    let accepted = receiver.accepted();
    let revoked = accepted
        .values()
        .map(|g| g[0].json())
        .find(|v| v["type"] == "token.revoked")
        .expect("token.revoked delivered");
    assert_eq!(revoked["user_id"], "ou_sandbox_alice");
    assert_eq!(revoked["session_id"], completed["session_id"]);
    assert!(
        accepted.values().all(|g| g.len() == 1),
        "each event was taken once"
    );

    // The outbox is empty once everything is delivered: `/workers` and the gauge say so, once
    // the worker has had the receiver's answer (the receiver counts the event as taken before
    // the worker has read its 200 and updated both).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let after = loop {
        let workers = svc.get("/workers").await.1;
        let after = svc.scrape().await;
        if workers.contains("0 pending, 0 dead")
            && metric(&after, "lark_service_webhook_outbox_pending", "") == 0.0
        {
            break after;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the outbox never showed empty: {workers}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let d = |name: &str, f: &str| metric(&after, name, f) - metric(&before, name, f);
    assert_eq!(
        d("lark_service_webhook_deliveries_total", "outcome=\"retry\""),
        2.0
    );
    assert_eq!(
        d(
            "lark_service_webhook_deliveries_total",
            "outcome=\"success\""
        ),
        3.0
    );
    assert_eq!(
        metric(&after, "lark_service_webhook_outbox_pending", ""),
        0.0
    );

    // Secrets and tokens: none in any request (the refresh token is read from the store).
    let dir = svc.stop_keep_dir().await;
    let store = open_store(dir.path());
    let mut secrets = vec![
        SECRET.to_owned(),
        APP_SECRET.to_owned(),
        ADMIN.to_owned(),
        KEY.to_owned(),
        alice_access,
    ];
    for redirect in [&alice_redirect, &bob_redirect] {
        let u = url::Url::parse(redirect).unwrap();
        for (k, v) in u.query_pairs() {
            if k == "code" || k == "state" {
                secrets.push(v.into_owned());
            }
        }
    }
    for s in store.sessions_for_user(APP_ID, "ou_sandbox_alice").unwrap() {
        assert!(
            s.refresh_token.is_none(),
            "revoked: the refresh token is gone"
        );
    }
    assert!(
        secrets.len() >= 6,
        "the OAuth code and state are checked too"
    );
    check_deliveries(&receiver.all(), &secrets);
    server.abort();
}

/// Starts the real binary on `dir`; returns it once it printed its ready line.
async fn spawn_binary(
    dir: &std::path::Path,
    sandbox: &Sandbox,
    cas: &str,
    url: &str,
    ports: (u16, u16),
) -> std::process::Child {
    let config = dir.join("config.toml");
    std::fs::write(&config, "").unwrap();
    let (http_port, admin_port) = ports;
    let mut serve = Command::new(env!("CARGO_BIN_EXE_lark-service"))
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("APP_ID", APP_ID)
        .env("APP_SECRET", APP_SECRET)
        .env("LARK_DOMAIN", sandbox.base_url())
        .env("TLS_CA_FILE", cas)
        .env("WEBSOCKET_ENABLED", "false")
        .env("LARK_TOKEN_ENCRYPTION_KEY", KEY)
        .env("LARK_SERVICE_ADMIN_TOKEN", ADMIN)
        .env("STORAGE_PATH", dir.join("s.redb"))
        .env("HTTP_LISTEN", format!("127.0.0.1:{http_port}"))
        .env("ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .env(
            "AUTH_REDIRECT_URI",
            format!("http://127.0.0.1:{http_port}/oauth/callback"),
        )
        .env("WEBHOOKS_URLS", url)
        .env("WEBHOOKS_SECRET", SECRET)
        .env("WEBHOOKS_TIMEOUT_SECONDS", "2")
        .arg("--config")
        .arg(&config)
        .args(["serve", "--set", "metrics.port=0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = serve.stdout.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        lines.next().unwrap().unwrap()
    })
    .await
    .unwrap();
    assert!(ready.starts_with("lark-service ready:"), "{ready}");
    serve
}

async fn sigterm(serve: std::process::Child) -> String {
    let rc = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    assert!(rc.success());
    let out = tokio::time::timeout(
        Duration::from_secs(25),
        tokio::task::spawn_blocking(move || serve.wait_with_output().unwrap()),
    )
    .await
    .expect("the service stops within the grace period")
    .unwrap();
    let logs = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{logs}");
    logs
}

/// The receiver is down while events are produced; the binary is stopped (SIGTERM) with them
/// undelivered and started again; the receiver comes up: every event arrives, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_event_is_lost_across_a_restart_of_the_binary() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let (ca, acceptor) = receiver_tls();
    let dir = tempfile::tempdir().unwrap();
    let cas = trust_both(dir.path(), &sandbox, &ca);
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}/hook");
    let ports = (free_port(), free_port());
    let admin = format!("http://127.0.0.1:{}", ports.1);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();

    // Receiver down: events are produced and wait in the outbox.
    let serve = spawn_binary(dir.path(), &sandbox, &cas, &url, ports).await;
    authorize(&http, &admin, &sandbox, "ou_sandbox_alice", true).await;
    authorize(&http, &admin, &sandbox, "ou_sandbox_carol", true).await;
    let alice_access = access_token(&http, &admin, "ou_sandbox_alice").await;
    authorize(&http, &admin, &sandbox, "ou_sandbox_bob", false).await;
    let r = http
        .delete(format!("{admin}/api/v1/users/ou_sandbox_carol/token"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    // Let the worker try (and fail) at least once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sigterm(serve).await;

    let (expected, alice_refresh) = {
        let store = open_store(dir.path());
        let pending = store.outbox_pending(100).unwrap();
        let tok = store
            .get_token(APP_ID, "ou_sandbox_alice")
            .unwrap()
            .unwrap();
        let ids: BTreeSet<String> = pending.iter().map(|e| e.event_id.clone()).collect();
        assert!(
            pending.iter().any(|e| e.attempts >= 1),
            "the worker tried while the receiver was down: {pending:?}"
        );
        (ids, tok.refresh_token.unwrap().expose_secret().to_owned())
    };
    assert_eq!(
        expected.len(),
        4,
        "two completions, one failure and one revocation wait in the outbox"
    );

    // Restarted, with the receiver up.
    let receiver = Receiver::default();
    let server = serve_receiver(
        format!("127.0.0.1:{port}").parse().unwrap(),
        acceptor,
        receiver.clone(),
    )
    .await;
    let serve = spawn_binary(dir.path(), &sandbox, &cas, &url, ports).await;
    eventually(
        "every event delivered after the restart",
        Duration::from_secs(60),
        || receiver.accepted().len() == expected.len(),
    )
    .await;
    // Settle: nothing more comes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let accepted = receiver.accepted();
    assert_eq!(
        accepted.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "exactly the events produced before the restart"
    );
    assert!(
        accepted.values().all(|g| g.len() == 1),
        "none twice: {:?}",
        accepted
            .iter()
            .map(|(k, g)| (k, g.len()))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        receiver.all().len(),
        expected.len(),
        "no request beyond one per event"
    );
    let types: BTreeSet<String> = accepted
        .values()
        .map(|g| g[0].json()["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        types,
        [
            "authorization.completed",
            "authorization.failed",
            "token.revoked"
        ]
        .map(str::to_owned)
        .into()
    );
    sigterm(serve).await;
    let store = open_store(dir.path());
    assert_eq!(
        store.outbox_counts().unwrap(),
        (0, 0),
        "delivered entries are deleted"
    );
    check_deliveries(
        &receiver.all(),
        &[
            SECRET.to_owned(),
            APP_SECRET.to_owned(),
            ADMIN.to_owned(),
            KEY.to_owned(),
            alice_access,
            alice_refresh,
        ],
    );
    server.abort();
}

/// The expiry reminder: a grant near its hard expiry (here a grant lifetime of 8 s and a lead
/// of 7 s, so it is due a second after authorizing) gets one new Authorize card and
/// `token.expiring`; neither comes again, not even after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_grant_gets_one_reminder_card_and_event() {
    // In-process: its deliveries move the process-wide counters another test compares.
    let _serial = common::METRICS_SERIAL.lock().await;
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let (ca, acceptor) = receiver_tls();
    let receiver = Receiver::default();
    let port = free_port();
    let server = serve_receiver(
        format!("127.0.0.1:{port}").parse().unwrap(),
        acceptor,
        receiver.clone(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cas = trust_both(dir.path(), &sandbox, &ca);
    let url = format!("https://127.0.0.1:{port}/hook");
    let settings = [
        ("TLS_CA_FILE", cas.as_str()),
        ("WEBSOCKET_ENABLED", "false"),
        ("WEBHOOKS_URLS", url.as_str()),
        ("WEBHOOKS_SECRET", SECRET),
        ("WEBHOOKS_GRANT_LIFETIME_SECONDS", "8"),
        ("WEBHOOKS_EXPIRY_REMINDER_LEAD_SECONDS", "7"),
    ];
    let svc = Service::start_in(dir, &sandbox, &settings).await;
    let admin = format!("http://{}", svc.admin);
    let http = reqwest::Client::new();
    authorize(&http, &admin, &sandbox, "ou_sandbox_alice", true).await;
    assert_eq!(sandbox.messages_for("ou_sandbox_alice").len(), 1);
    eventually("the reminder card", Duration::from_secs(20), || {
        sandbox.messages_for("ou_sandbox_alice").len() == 2
    })
    .await;
    let reminder = sandbox.messages_for("ou_sandbox_alice")[1].content.clone();
    assert!(
        find_string(&reminder, &|s| s
            .contains("/open-apis/authen/v1/authorize?"))
        .is_some(),
        "the reminder is an Authorize card: {reminder}"
    );
    eventually("token.expiring delivered", Duration::from_secs(20), || {
        receiver
            .accepted()
            .values()
            .any(|g| g[0].json()["type"] == "token.expiring")
    })
    .await;
    let accepted = receiver.accepted();
    let completed = accepted
        .values()
        .map(|g| g[0].json())
        .find(|v| v["type"] == "authorization.completed")
        .unwrap();
    let expiring = accepted
        .values()
        .map(|g| g[0].json())
        .find(|v| v["type"] == "token.expiring")
        .unwrap();
    assert_eq!(expiring["user_id"], "ou_sandbox_alice");
    assert_eq!(expiring["session_id"], completed["session_id"]);
    let at = |v: &Value, k: &str| {
        chrono::DateTime::parse_from_rfc3339(v[k].as_str().unwrap())
            .unwrap()
            .timestamp_millis()
    };
    // The grant ends its lifetime (8 s) after the authorization.
    let lifetime = at(&expiring, "expires_at") - at(&completed, "time");
    assert!((7_000..=9_000).contains(&lifetime), "{lifetime} ms");

    // Several reminder runs (one a second) later: still one reminder.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(sandbox.messages_for("ou_sandbox_alice").len(), 2);
    // And after a restart.
    let dir = svc.stop_keep_dir().await;
    let svc = Service::start_in(dir, &sandbox, &settings).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        sandbox.messages_for("ou_sandbox_alice").len(),
        2,
        "the reminder was recorded: a restart does not send it again"
    );
    let expiring_events = receiver
        .accepted()
        .values()
        .filter(|g| g[0].json()["type"] == "token.expiring")
        .count();
    assert_eq!(expiring_events, 1);
    svc.stop().await;
    server.abort();
}

/// The platform refuses a refresh token for good (20037, the 365-day cap reached early):
/// `token.needs_reauth` is delivered, with the user and the session, and no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_refresh_sends_token_needs_reauth() {
    // In-process: its deliveries move the process-wide counters another test compares.
    let _serial = common::METRICS_SERIAL.lock().await;
    let sandbox = Sandbox::start(SandboxOptions {
        // Due for refresh 1.6 s after it is issued.
        user_token_ttl: 2,
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let (ca, acceptor) = receiver_tls();
    let receiver = Receiver::default();
    let port = free_port();
    let server = serve_receiver(
        format!("127.0.0.1:{port}").parse().unwrap(),
        acceptor,
        receiver.clone(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cas = trust_both(dir.path(), &sandbox, &ca);
    let url = format!("https://127.0.0.1:{port}/hook");
    let svc = Service::start_in(
        dir,
        &sandbox,
        &[
            ("TLS_CA_FILE", cas.as_str()),
            ("WEBSOCKET_ENABLED", "false"),
            ("WEBHOOKS_URLS", url.as_str()),
            ("WEBHOOKS_SECRET", SECRET),
        ],
    )
    .await;
    let admin = format!("http://{}", svc.admin);
    let http = reqwest::Client::new();
    authorize(&http, &admin, &sandbox, "ou_sandbox_alice", true).await;
    let access = access_token(&http, &admin, "ou_sandbox_alice").await;
    sandbox.fail_next_code("oauth_token", 20037, 10);
    eventually(
        "token.needs_reauth delivered",
        Duration::from_secs(30),
        || {
            receiver
                .accepted()
                .values()
                .any(|g| g[0].json()["type"] == "token.needs_reauth")
        },
    )
    .await;
    let all: Vec<Value> = receiver.accepted().values().map(|g| g[0].json()).collect();
    let completed = all
        .iter()
        .find(|v| v["type"] == "authorization.completed")
        .unwrap();
    let reauth = all
        .iter()
        .find(|v| v["type"] == "token.needs_reauth")
        .unwrap();
    assert_eq!(reauth["user_id"], "ou_sandbox_alice");
    assert_eq!(reauth["open_id"], "ou_sandbox_alice");
    assert_eq!(reauth["session_id"], completed["session_id"]);
    let r = http
        .get(format!("{admin}/api/v1/users/ou_sandbox_alice/token"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        409,
        "the token API agrees: reauthorization needed"
    );
    check_deliveries(
        &receiver.all(),
        &[
            SECRET.to_owned(),
            APP_SECRET.to_owned(),
            ADMIN.to_owned(),
            access,
        ],
    );
    svc.stop().await;
    server.abort();
}

/// A card nobody answers: the sweep expires the session and `authorization.failed` with
/// `session_expired` is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_session_sends_authorization_failed() {
    // In-process: its deliveries move the process-wide counters another test compares.
    let _serial = common::METRICS_SERIAL.lock().await;
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let (ca, acceptor) = receiver_tls();
    let receiver = Receiver::default();
    let port = free_port();
    let server = serve_receiver(
        format!("127.0.0.1:{port}").parse().unwrap(),
        acceptor,
        receiver.clone(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cas = trust_both(dir.path(), &sandbox, &ca);
    let url = format!("https://127.0.0.1:{port}/hook");
    let svc = Service::start_in(
        dir,
        &sandbox,
        &[
            ("TLS_CA_FILE", cas.as_str()),
            ("WEBSOCKET_ENABLED", "false"),
            ("WEBHOOKS_URLS", url.as_str()),
            ("WEBHOOKS_SECRET", SECRET),
            ("AUTH_SESSION_EXPIRY_SECONDS", "10"),
            ("SWEEP_INTERVAL_SECONDS", "1"),
        ],
    )
    .await;
    let (status, body) = svc
        .post(
            "/api/v1/auth/requests",
            json!({"open_id": "ou_sandbox_carol"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let session = body["session_id"].as_str().unwrap().to_owned();
    eventually(
        "authorization.failed delivered",
        Duration::from_secs(30),
        || !receiver.accepted().is_empty(),
    )
    .await;
    let all: Vec<Value> = receiver.accepted().values().map(|g| g[0].json()).collect();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["type"], "authorization.failed");
    assert_eq!(all[0]["reason"], "session_expired");
    assert_eq!(all[0]["user_id"], "ou_sandbox_carol");
    assert_eq!(all[0]["session_id"], session.as_str());
    check_deliveries(&receiver.all(), &[SECRET.to_owned(), APP_SECRET.to_owned()]);
    svc.stop().await;
    server.abort();
}
