//! A long connection that never gives up and says the truth (issue 15): an outage longer than
//! the retry limit degrades and recovers by itself, a panic in the connection task is
//! restarted by the supervisor, refused credentials pause dialing until a reload (`SIGHUP`),
//! `/readyz` counts only signed callbacks and reads cached state, and a flood of slow handlers
//! stays within the handler bound.
//!
//! Tests assert the order of what happens, never durations; waits are polls with generous
//! guards. The metrics are process-wide and every sandbox app has the same id, so the tests of
//! this binary run one at a time (`SERIAL`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::time::Duration;

use common::*;
use lark_service::sandbox::{PushOpts, Sandbox, SandboxOptions};
use serde_json::{json, Value};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Guard for conditions that wait out reconnect backoff (the sandbox caps it at 5 s).
const BACKOFF_GUARD: Duration = Duration::from_secs(90);

async fn gauge(svc: &Service, name: &str) -> f64 {
    metric(&svc.scrape().await, name, "")
}

async fn anonymous_readyz(svc: &Service) -> (u16, String) {
    let r = svc
        .client
        .get(format!("http://{}/readyz", svc.http))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn acked_ok(sandbox: &Sandbox, message_id: &str) -> bool {
    sandbox
        .acks()
        .iter()
        .any(|a| a.message_id == message_id && a.code == 200)
}

async fn long_connection_worker(svc: &Service) -> Value {
    let (code, body) = svc.get("/workers").await;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["long_connection"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_past_the_retry_limit_degrades_then_recovers_by_itself() {
    let _serial = SERIAL.lock().await;
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    // The long connection is the only event path; two failures in a row mean degraded.
    let svc = Service::start(
        &sandbox,
        &[
            ("WEBSOCKET_FALLBACK_TO_HTTP", "false"),
            ("WEBSOCKET_MAX_RECONNECT_RETRIES", "2"),
        ],
    )
    .await;
    svc.wait_for(|| async { svc.public_get("/readyz").await.0 == 200 })
        .await;
    assert_eq!(gauge(&svc, "lark_service_websocket_degraded").await, 0.0);
    let discoveries = sandbox.hits("ws_endpoint");
    let before = svc.scrape().await;

    // The platform goes down: the socket drops and discovery fails (retryable).
    sandbox.set_discovery_error(Some(1_000_040_343));
    sandbox.close_ws_abruptly();
    svc.wait_for_within(BACKOFF_GUARD, || async {
        gauge(&svc, "lark_service_websocket_degraded").await == 1.0
    })
    .await;
    assert!(
        sandbox.hits("ws_endpoint") >= discoveries + 2,
        "degraded only after the retry limit of failed attempts"
    );
    let (code, body) = svc.public_get("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("long connection degraded"), "{body}");
    // Anonymous callers get the reason word, not the internal error text.
    let (code, body) = anonymous_readyz(&svc).await;
    assert_eq!(
        (code, body.as_str()),
        (503, "not ready: long connection degraded\n")
    );
    assert_eq!(
        svc.public_get("/healthz").await.0,
        200,
        "alive though not ready"
    );

    // Degraded is not stopped: it keeps redialing past the limit.
    let during = sandbox.hits("ws_endpoint");
    svc.wait_for_within(BACKOFF_GUARD, || async {
        sandbox.hits("ws_endpoint") >= during + 2
    })
    .await;
    assert_eq!(sandbox.connections(), 0);
    assert_eq!(svc.public_get("/readyz").await.0, 503);

    // The platform comes back: the service reconnects by itself, and handles events.
    sandbox.set_discovery_error(None);
    svc.wait_for_within(BACKOFF_GUARD, || async { sandbox.connections() == 1 })
        .await;
    svc.wait_for(|| async { svc.public_get("/readyz").await.0 == 200 })
        .await;
    assert_eq!(gauge(&svc, "lark_service_websocket_degraded").await, 0.0);
    assert_eq!(
        gauge(&svc, "lark_service_websocket_connection_status").await,
        1.0
    );
    // websocket_reconnect_total: the failed redials of the outage, the one that came back, and
    // every attempt ended as one or the other.
    let after = svc.scrape().await;
    let moved = |outcome: &str| {
        let filter = format!("outcome=\"{outcome}\"");
        metric(&after, "lark_service_websocket_reconnect_total", &filter)
            - metric(&before, "lark_service_websocket_reconnect_total", &filter)
    };
    assert!(moved("failure") >= 4.0, "{after}");
    assert_eq!(moved("success"), 1.0);
    assert_eq!(moved("attempt"), moved("success") + moved("failure"));
    let fid = sandbox
        .push_event("contact.user.updated_v3", json!({}), PushOpts::default())
        .unwrap();
    svc.wait_for(|| async { acked_ok(&sandbox, &fid) }).await;
    // The task never ended: the supervisor did not have to restart it.
    let w = long_connection_worker(&svc).await;
    assert_eq!(w["state"], "running", "{w}");
    assert_eq!(w["restarts"], 0, "{w}");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_connection_task_is_restarted_and_events_flow_again() {
    let _serial = SERIAL.lock().await;
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let svc = Service::start(&sandbox, &[("WEBSOCKET_FALLBACK_TO_HTTP", "false")]).await;
    svc.wait_for(|| async { svc.public_get("/readyz").await.0 == 200 })
        .await;
    assert_eq!(long_connection_worker(&svc).await["restarts"], 0);
    let discoveries = sandbox.hits("ws_endpoint");

    // The task panics on the next message it reads: this event.
    lark_service::longconn::conn::fault::panic_on_next_message(&sandbox.base_url());
    let lost = sandbox
        .push_event(
            "contact.user.updated_v3",
            json!({"n": 1}),
            PushOpts::default(),
        )
        .unwrap();
    svc.wait_for_within(BACKOFF_GUARD, || async {
        long_connection_worker(&svc).await["restarts"] == 1
    })
    .await;
    let w = long_connection_worker(&svc).await;
    assert!(
        w["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("panicked: injected fault")),
        "{w}"
    );
    // Restarted: it redials, and the event it dropped is redelivered on the new connection.
    svc.wait_for_within(BACKOFF_GUARD, || async {
        sandbox.connections() == 1 && svc.public_get("/readyz").await.0 == 200
    })
    .await;
    assert!(sandbox.hits("ws_endpoint") > discoveries);
    svc.wait_for_within(BACKOFF_GUARD, || async { acked_ok(&sandbox, &lost) })
        .await;
    let fid = sandbox
        .push_event(
            "contact.user.updated_v3",
            json!({"n": 2}),
            PushOpts::default(),
        )
        .unwrap();
    svc.wait_for(|| async { acked_ok(&sandbox, &fid) }).await;
    assert_eq!(long_connection_worker(&svc).await["restarts"], 1);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_pause_dialing_until_a_reload_redials() {
    let _serial = SERIAL.lock().await;
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    // A credential retry far beyond the test: only the reload can make it dial again.
    let svc = Service::start(
        &sandbox,
        &[
            ("WEBSOCKET_FALLBACK_TO_HTTP", "false"),
            ("WEBSOCKET_CREDENTIAL_RETRY_SECONDS", "86400"),
        ],
    )
    .await;
    svc.wait_for(|| async { svc.public_get("/readyz").await.0 == 200 })
        .await;

    // The platform starts refusing the app (a fatal discovery code) and drops the socket.
    sandbox.set_discovery_error(Some(403));
    sandbox.close_ws_abruptly();
    svc.wait_for_within(BACKOFF_GUARD, || async {
        gauge(&svc, "lark_service_websocket_credentials_rejected").await == 1.0
    })
    .await;
    let refused_at = sandbox.hits("ws_endpoint");
    let (code, body) = anonymous_readyz(&svc).await;
    assert_eq!(
        (code, body.as_str()),
        (503, "not ready: long connection credentials_rejected\n")
    );
    // The service keeps serving meanwhile.
    assert_eq!(svc.public_get("/healthz").await.0, 200);
    let (status, body) = svc
        .post(
            "/api/v1/auth/requests",
            json!({"open_id": "ou_sandbox_alice"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(sandbox.hits("ws_endpoint"), refused_at, "no fast retries");

    // The platform accepts the app again; a reload (SIGHUP) redials at once.
    sandbox.set_discovery_error(None);
    svc.reload(&[]).await;
    svc.wait_for(|| async { sandbox.connections() == 1 }).await;
    svc.wait_for(|| async { svc.public_get("/readyz").await.0 == 200 })
        .await;
    assert_eq!(
        sandbox.hits("ws_endpoint"),
        refused_at + 1,
        "exactly one dial, after the reload"
    );
    assert_eq!(
        gauge(&svc, "lark_service_websocket_credentials_rejected").await,
        0.0
    );
    let fid = sandbox
        .push_event("contact.user.updated_v3", json!({}), PushOpts::default())
        .unwrap();
    svc.wait_for(|| async { acked_ok(&sandbox, &fid) }).await;
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_corrected_credentials_connects() {
    let _serial = SERIAL.lock().await;
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let svc = Service::start(
        &sandbox,
        &[
            ("APP_SECRET", "wrong-secret"),
            ("WEBSOCKET_FALLBACK_TO_HTTP", "false"),
            ("WEBSOCKET_CREDENTIAL_RETRY_SECONDS", "86400"),
        ],
    )
    .await;
    svc.wait_for_within(BACKOFF_GUARD, || async {
        gauge(&svc, "lark_service_websocket_credentials_rejected").await == 1.0
    })
    .await;
    assert_eq!(sandbox.hits("ws_endpoint"), 1);
    assert_eq!(svc.public_get("/readyz").await.0, 503);
    // The operator fixes the secret and sends SIGHUP.
    svc.reload(&[("APP_SECRET", lark_service::sandbox::APP_SECRET)])
        .await;
    svc.wait_for(|| async { sandbox.connections() == 1 }).await;
    assert_eq!(sandbox.hits("ws_endpoint"), 2);
    let fid = sandbox
        .push_event("contact.user.updated_v3", json!({}), PushOpts::default())
        .unwrap();
    svc.wait_for(|| async { acked_ok(&sandbox, &fid) }).await;
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_counts_only_signed_callbacks_and_never_fetches_a_token() {
    let _serial = SERIAL.lock().await;
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    // Callbacks on but unsigned (no encrypt key), long connection off: no trustworthy path.
    let svc = Service::start(
        &sandbox,
        &[
            ("WEBSOCKET_ENABLED", "false"),
            ("WEBSOCKET_FALLBACK_TO_HTTP", "true"),
            ("LARK_ENCRYPT_KEY", ""),
        ],
    )
    .await;
    // Wait for the token to be held, then ask only for the event path's verdict.
    svc.wait_for(|| async { !svc.public_get("/readyz").await.1.contains("tenant token") })
        .await;
    let (code, body) = svc.public_get("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no event channel"), "{body}");
    assert_eq!(
        anonymous_readyz(&svc).await,
        (503, "not ready: no event channel\n".to_owned())
    );
    svc.stop().await;

    // Signed callbacks (an encrypt key) make events possible: ready.
    let svc = Service::start(
        &sandbox,
        &[
            ("WEBSOCKET_ENABLED", "false"),
            ("WEBSOCKET_FALLBACK_TO_HTTP", "true"),
        ],
    )
    .await;
    svc.wait_for(|| async { svc.public_get("/readyz").await.0 == 200 })
        .await;
    // Probes read cached state: a hundred of them fetch no token.
    let tokens = sandbox.hits("tenant_token");
    for _ in 0..100 {
        assert_eq!(anonymous_readyz(&svc).await.0, 200);
    }
    assert_eq!(sandbox.hits("tenant_token"), tokens);
    // The platform forgets its tokens: probes still do not fetch (the cached token's state
    // is what they report), so a probe storm cannot become a token storm.
    sandbox.expire_tenant_tokens();
    for _ in 0..100 {
        let _ = anonymous_readyz(&svc).await;
    }
    assert_eq!(sandbox.hits("tenant_token"), tokens);
    svc.stop().await;
}

fn authorize_message(open_id: &str, message_id: &str) -> Value {
    let name = open_id.trim_start_matches("ou_");
    json!({
        "sender": {"sender_id": {"open_id": open_id, "user_id": name, "union_id": format!("on_{name}")}, "sender_type": "user", "tenant_key": "sandbox"},
        "message": {"message_id": message_id, "chat_id": "oc_p2p", "chat_type": "p2p", "message_type": "text", "content": "{\"text\":\"/authorize\"}", "create_time": "1"}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_slow_handlers_stays_within_the_handler_bound() {
    let _serial = SERIAL.lock().await;
    const LIMIT: usize = 4;
    const FLOOD: usize = 30;
    let sandbox = Sandbox::start(SandboxOptions {
        extra_users: FLOOD,
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let svc = Service::start(&sandbox, &[("WEBSOCKET_MAX_CONCURRENT_HANDLERS", "4")]).await;
    svc.wait_for(|| async { svc.public_get("/readyz").await.0 == 200 })
        .await;
    let overloaded_before = gauge(&svc, "lark_service_events_overloaded_total").await;

    // The IM API hangs: every `/authorize` handler blocks in its card send.
    sandbox.hold("im");
    let users: Vec<String> = (0..FLOOD)
        .map(|i| format!("ou_sandbox_user{i:04}"))
        .collect();
    let frames: Vec<String> = users
        .iter()
        .enumerate()
        .map(|(i, u)| {
            sandbox
                .push_event(
                    "im.message.receive_v1",
                    authorize_message(u, &format!("om_flood_{i}")),
                    PushOpts::default(),
                )
                .unwrap()
        })
        .collect();
    // Every event is answered: the ones beyond the bound at once, as failed.
    svc.wait_for_within(BACKOFF_GUARD, || async {
        let acks = sandbox.acks();
        frames
            .iter()
            .all(|f| acks.iter().any(|a| &a.message_id == f))
    })
    .await;
    let failed = sandbox
        .acks()
        .iter()
        .filter(|a| frames.contains(&a.message_id) && a.code != 200)
        .count();
    assert!(failed >= FLOOD - LIMIT, "{failed} failed ACKs");
    assert!(
        gauge(&svc, "lark_service_events_overloaded_total").await - overloaded_before
            >= (FLOOD - LIMIT) as f64
    );
    // Exactly the bound is running, blocked; never more.
    svc.wait_for(|| async { sandbox.held("im") == LIMIT as u64 })
        .await;
    assert_eq!(
        gauge(&svc, "lark_service_event_handlers_inflight").await,
        LIMIT as f64
    );
    // Redeliveries while the slots are full are refused again, not queued.
    sandbox.redeliver_now();
    let refused = gauge(&svc, "lark_service_events_overloaded_total").await;
    svc.wait_for(|| async { gauge(&svc, "lark_service_events_overloaded_total").await > refused })
        .await;
    assert_eq!(sandbox.held("im"), LIMIT as u64);
    assert_eq!(
        gauge(&svc, "lark_service_event_handlers_inflight").await,
        LIMIT as f64
    );

    // The platform recovers: redeliveries are handled, every user gets exactly one card.
    sandbox.release("im");
    svc.wait_for_within(BACKOFF_GUARD, || async {
        sandbox.redeliver_now();
        tokio::time::sleep(Duration::from_millis(100)).await;
        users.iter().all(|u| !sandbox.messages_for(u).is_empty())
    })
    .await;
    for u in &users {
        assert_eq!(sandbox.messages_for(u).len(), 1, "{u}");
    }
    svc.wait_for(|| async { gauge(&svc, "lark_service_event_handlers_inflight").await == 0.0 })
        .await;
    svc.stop().await;
}
