//! End to end: the service (in-process) against the sandbox platform.
//! Covers the long connection (connect, ACK, fragments, duplicates, drop → reconnect, bad
//! credentials), authorization by card (approve, reject), HTTP callbacks (signed, encrypted,
//! forged) and that the metrics families exist and move.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::time::Duration;

use common::*;
use lark_service::sandbox::{PushOpts, Sandbox, SandboxOptions, APP_ID};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_by_card_over_the_long_connection() {
    let _serial = METRICS_SERIAL.lock().await;
    let sandbox = Sandbox::start(SandboxOptions {
        redeliver_after: Duration::from_millis(800),
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let svc = Service::start(&sandbox, &[]).await;
    svc.wait_for(|| async { sandbox.connections() == 1 }).await;
    svc.wait_for(|| async { svc.public_get("/readyz").await.0 == 200 })
        .await;
    let before = svc.scrape().await;

    // Request → card.
    let (status, body) = svc
        .post(
            "/api/v1/auth/requests",
            json!({"open_id": "ou_sandbox_alice"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let session = body["session_id"].as_str().unwrap().to_owned();
    let cards = sandbox.messages_for("ou_sandbox_alice");
    assert_eq!(cards.len(), 1);
    assert_eq!(cards[0].msg_type, "interactive");
    let authorize = find_string(&cards[0].content, &|s| {
        s.contains("/open-apis/authen/v1/authorize?")
    })
    .unwrap()
    .to_owned();

    // The user approves; the browser follows the redirect to the service.
    let redirect = sandbox.approve(&authorize, "ou_sandbox_alice").unwrap();
    let page = svc.client.get(&redirect).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(page
        .text()
        .await
        .unwrap()
        .contains("Authorization complete"));
    let (_, s) = svc.get(&format!("/api/v1/auth/sessions/{session}")).await;
    let s: Value = serde_json::from_str(&s).unwrap();
    assert_eq!(s["state"], "completed", "{s}");
    assert!(
        !s.to_string().contains("eyJsandbox"),
        "session status must not show tokens"
    );
    let (code, tok) = svc.get("/api/v1/users/ou_sandbox_alice/token").await;
    assert_eq!(code, 200, "{tok}");
    assert!(tok.contains("eyJsandbox.access."), "{tok}");
    svc.wait_for(|| async { sandbox.messages_for("ou_sandbox_alice")[0].history.len() == 1 })
        .await;
    // Replaying the same redirect is refused and changes nothing.
    let replay = svc.client.get(&redirect).send().await.unwrap();
    assert!(replay.status().is_client_error());

    // Bob rejects with the card's button: a card.action.trigger over the long connection.
    let (status, body) = svc
        .post(
            "/api/v1/auth/requests",
            json!({"open_id": "ou_sandbox_bob"}),
        )
        .await;
    assert_eq!(status, 201);
    let bob_session = body["session_id"].as_str().unwrap().to_owned();
    let card = sandbox.messages_for("ou_sandbox_bob").remove(0);
    let value = find_callback_value(&card.content).expect("the card has a reject button");
    let frame_id = sandbox
        .click_card_button(&card.message_id, "ou_sandbox_bob", value)
        .unwrap();
    svc.wait_for(|| async { sandbox.acks().iter().any(|a| a.message_id == frame_id) })
        .await;
    let ack = sandbox
        .acks()
        .into_iter()
        .find(|a| a.message_id == frame_id)
        .unwrap();
    assert_eq!(ack.code, 200);
    assert!(
        ack.data.is_some(),
        "the card callback answers with a response"
    );
    assert!(ack.biz_rt.is_some());
    let (_, s) = svc
        .get(&format!("/api/v1/auth/sessions/{bob_session}"))
        .await;
    assert!(s.contains("\"state\":\"rejected\""), "{s}");
    assert!(s.contains("user_rejected"), "{s}");

    // Carol asks by message; the event is fragmented, out of order and delivered twice.
    let msg_event = json!({
        "sender": {"sender_id": {"open_id": "ou_sandbox_carol", "user_id": "sandbox_carol", "union_id": "on_sandbox_carol"}, "sender_type": "user", "tenant_key": "sandbox"},
        "message": {"message_id": "om_in_1", "chat_id": "oc_p2p", "chat_type": "p2p", "message_type": "text", "content": "{\"text\":\"/authorize\"}", "create_time": "1"}
    });
    let fid = sandbox
        .push_event(
            "im.message.receive_v1",
            msg_event,
            PushOpts {
                fragments: 3,
                out_of_order: true,
                duplicate: true,
            },
        )
        .unwrap();
    svc.wait_for(|| async { sandbox.messages_for("ou_sandbox_carol").len() == 1 })
        .await;
    svc.wait_for(|| async {
        sandbox
            .acks()
            .iter()
            .filter(|a| a.message_id == fid)
            .count()
            >= 2
    })
    .await;
    assert!(sandbox
        .acks()
        .iter()
        .filter(|a| a.message_id == fid)
        .all(|a| a.code == 200));
    assert_eq!(
        sandbox.messages_for("ou_sandbox_carol").len(),
        1,
        "the duplicate was not handled twice"
    );

    // The platform drops the socket: the service reconnects by itself.
    // (The reconnect waits out a jittered backoff of up to the sandbox's 5 s interval plus its
    // 1 s nonce; the guard leaves room for a loaded machine.)
    sandbox.close_ws_abruptly();
    svc.wait_for(|| async { sandbox.connections() == 0 }).await;
    svc.wait_for_within(Duration::from_secs(30), || async {
        sandbox.connections() == 1
    })
    .await;
    // And a garbage frame does not kill it.
    sandbox.send_garbage_frame();
    let fid = sandbox
        .push_event(
            "contact.user.updated_v3",
            json!({"object": {}}),
            PushOpts::default(),
        )
        .unwrap();
    svc.wait_for(|| async { sandbox.acks().iter().any(|a| a.message_id == fid) })
        .await;
    assert_eq!(sandbox.unacked(), 0);

    // Every documented family is exported, and the ones this run exercised moved.
    let after = svc.scrape().await;
    for name in lark_service::metrics::EXPORTED {
        let family = name.trim_end_matches("_total");
        assert!(
            after.contains(&format!("# TYPE {name} "))
                || after.contains(&format!("# TYPE {family} ")),
            "{name} missing"
        );
    }
    let moved =
        |name: &str, filter: &str| metric(&after, name, filter) - metric(&before, name, filter);
    assert!(moved("lark_service_auth_requests_total", "") >= 3.0);
    assert!(moved("lark_service_auth_success_total", "") >= 1.0);
    assert!(moved("lark_service_auth_failure_total", "user_rejected") >= 1.0);
    assert!(moved("lark_service_auth_duration_seconds_count", "") >= 1.0);
    assert!(moved("lark_service_events_received_total", "websocket") >= 3.0);
    assert!(moved("lark_service_events_deduplicated_total", "") >= 1.0);
    assert!(moved("lark_service_event_ack_duration_seconds_count", "") >= 3.0);
    assert!(moved("lark_service_websocket_frames_received_total", "event") >= 3.0);
    assert!(moved("lark_service_websocket_reconnects_total", "") >= 1.0);
    // The Python deployment's reconnect family: the redial started and its handshake completed.
    assert!(
        moved(
            "lark_service_websocket_reconnect_total",
            "outcome=\"attempt\""
        ) >= 1.0
    );
    assert!(
        moved(
            "lark_service_websocket_reconnect_total",
            "outcome=\"success\""
        ) >= 1.0
    );
    assert!(moved("lark_service_lark_api_requests_total", "ws_endpoint") >= 1.0);
    assert!(moved("lark_service_store_commit_duration_seconds_count", "") >= 3.0);
    assert_eq!(
        metric(&after, "lark_service_websocket_connection_status", APP_ID),
        1.0
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_stop_the_long_connection_with_a_clear_state() {
    let _serial = METRICS_SERIAL.lock().await;
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let svc = Service::start(
        &sandbox,
        &[
            ("APP_SECRET", "wrong-secret"),
            ("WEBSOCKET_FALLBACK_TO_HTTP", "false"),
        ],
    )
    .await;
    svc.wait_for(|| async { sandbox.hits("ws_endpoint") >= 1 })
        .await;
    // Discovery refuses the credentials: the service does not retry.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sandbox.hits("ws_endpoint"), 1);
    assert_eq!(sandbox.connections(), 0);
    let (code, body) = svc.public_get("/readyz").await;
    assert_eq!(code, 503);
    assert!(body.starts_with("not ready"), "{body}");
    svc.stop().await;
}

fn signed(body: &[u8], ts: &str) -> Vec<(&'static str, String)> {
    let nonce = "n0nce";
    vec![
        ("X-Lark-Request-Timestamp", ts.to_owned()),
        ("X-Lark-Request-Nonce", nonce.to_owned()),
        (
            "X-Lark-Signature",
            lark_service::callbacks::signature_hex(ts, nonce, ENCRYPT_KEY, body),
        ),
    ]
}

/// The status the server at `addr` answers a POST to `path` announcing a body of `len` bytes,
/// read before any of the body is sent.
async fn oversize_status(addr: std::net::SocketAddr, path: &str, len: usize) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {len}\r\n\r\n"
    );
    c.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.windows(2).any(|w| w == b"\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
            .await
            .expect("no answer before the body was sent")
            .unwrap();
        assert!(n > 0, "closed without an answer");
        got.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&got);
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_callbacks_are_verified_decrypted_and_deduplicated() {
    let _serial = METRICS_SERIAL.lock().await;
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let svc = Service::start(&sandbox, &[("WEBSOCKET_ENABLED", "false")]).await;
    let url = format!("http://{}/callbacks/event", svc.http);
    let cipher = lark_service::callbacks::EventCipher::new(ENCRYPT_KEY);
    let mut rng = rand::rng();
    let now = (lark_service::storage::now_ms() / 1000).to_string();
    let send = |body: Vec<u8>, headers: Vec<(&'static str, String)>| {
        let mut r = svc
            .client
            .post(&url)
            .header("content-type", "application/json")
            .body(body);
        for (k, v) in headers {
            r = r.header(k, v);
        }
        r.send()
    };

    // url_verification (encrypted) answers the challenge.
    let plain = json!({"challenge": "ch-123", "token": VTOKEN, "type": "url_verification"});
    let body = serde_json::to_vec(
        &json!({"encrypt": cipher.encrypt(&serde_json::to_vec(&plain).unwrap(), &mut rng)}),
    )
    .unwrap();
    let r = send(body, vec![]).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["challenge"], "ch-123");

    // A signed, encrypted event is accepted; the same event again is a duplicate (still 200).
    let event = json!({"schema": "2.0", "header": {"event_id": "http-ev-1", "event_type": "contact.user.updated_v3", "create_time": "1", "token": VTOKEN, "app_id": APP_ID, "tenant_key": "t"}, "event": {}});
    let body = serde_json::to_vec(
        &json!({"encrypt": cipher.encrypt(&serde_json::to_vec(&event).unwrap(), &mut rng)}),
    )
    .unwrap();
    let before = svc.scrape().await;
    // Forged signature: 401 and no side effect.
    let mut forged = signed(&body, &now);
    forged[2].1 = "00".repeat(32);
    assert_eq!(
        send(body.clone(), forged).await.unwrap().status().as_u16(),
        401
    );
    // Stale timestamp: 401.
    assert_eq!(
        send(body.clone(), signed(&body, "1000000000"))
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    // Malformed and oversize bodies.
    assert_eq!(
        send(b"{not json".to_vec(), signed(b"{not json", &now))
            .await
            .unwrap()
            .status()
            .as_u16(),
        400
    );
    // An oversize body is refused from its Content-Length, before a byte of it is read. (Sent
    // over a raw connection that reads the answer before writing the body: a client writing
    // the 2 MiB meanwhile may see its write fail with a broken pipe, since the server closes
    // the connection once it has answered, instead of the 413.)
    assert_eq!(
        oversize_status(svc.http, "/callbacks/event", 2 * 1024 * 1024).await,
        413
    );
    let mid = svc.scrape().await;
    assert_eq!(
        metric(&mid, "lark_service_events_received_total", "http"),
        metric(&before, "lark_service_events_received_total", "http"),
        "rejected bodies must not reach the dispatcher"
    );
    // Valid: handled, then a duplicate.
    assert_eq!(
        send(body.clone(), signed(&body, &now))
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    assert_eq!(
        send(body.clone(), signed(&body, &now))
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    let after = svc.scrape().await;
    assert_eq!(
        metric(&after, "lark_service_events_received_total", "http")
            - metric(&before, "lark_service_events_received_total", "http"),
        2.0
    );
    assert!(
        metric(&after, "lark_service_events_deduplicated_total", "")
            - metric(&before, "lark_service_events_deduplicated_total", "")
            >= 1.0
    );
    // With the socket off, HTTP callbacks keep the service ready.
    let (code, body) = svc.public_get("/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("HTTP callbacks"), "{body}");
    svc.stop().await;
}

fn authorize_url(sandbox: &Sandbox, open_id: &str) -> String {
    let cards = sandbox.messages_for(open_id);
    let card = cards.last().expect("a card was sent");
    find_string(&card.content, &|s| {
        s.contains("/open-apis/authen/v1/authorize?")
    })
    .unwrap()
    .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_restart_refresh_and_expiry_on_the_sandbox() {
    let _serial = METRICS_SERIAL.lock().await;
    let sandbox = Sandbox::start(SandboxOptions {
        user_token_ttl: 10,
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let extra = [
        ("AUTH_REQUEST_RATE_LIMIT", "3"),
        ("AUTH_SESSION_EXPIRY_SECONDS", "10"),
        ("SWEEP_INTERVAL_SECONDS", "1"),
    ];
    let svc = Service::start(&sandbox, &extra).await;
    svc.wait_for(|| async { sandbox.connections() == 1 }).await;
    let before = svc.scrape().await;

    // Rate limit: the same pending session is reused, and the 4th request in the window is
    // refused with 429 and sends no card.
    let (s1, b1) = svc
        .post(
            "/api/v1/auth/requests",
            json!({"open_id": "ou_sandbox_alice"}),
        )
        .await;
    assert_eq!(s1, 201, "{b1}");
    let (s2, b2) = svc
        .post(
            "/api/v1/auth/requests",
            json!({"open_id": "ou_sandbox_alice"}),
        )
        .await;
    assert_eq!((s2, b2["reused"].as_bool()), (200, Some(true)), "{b2}");
    assert_eq!(b2["session_id"], b1["session_id"]);
    svc.post(
        "/api/v1/auth/requests",
        json!({"open_id": "ou_sandbox_alice"}),
    )
    .await;
    let (s4, b4) = svc
        .post(
            "/api/v1/auth/requests",
            json!({"open_id": "ou_sandbox_alice"}),
        )
        .await;
    assert_eq!(s4, 429, "{b4}");
    assert_eq!(sandbox.messages_for("ou_sandbox_alice").len(), 1);
    let alice_session = b1["session_id"].as_str().unwrap().to_owned();

    // Restart in the middle of the pending flow: the new process completes it.
    let url = authorize_url(&sandbox, "ou_sandbox_alice");
    let old_addr = svc.http.to_string();
    let dir = svc.stop_keep_dir().await;
    let redirect_uri = format!("http://{old_addr}/oauth/callback");
    let mut extra2 = extra.to_vec();
    extra2.push(("AUTH_REDIRECT_URI", redirect_uri.as_str()));
    let svc = Service::start_in(dir, &sandbox, &extra2).await;
    svc.wait_for(|| async { sandbox.connections() == 1 }).await;
    // A real deployment keeps its public address; here the new process got a new port, so the
    // browser's request is sent to it while the registered redirect URI stays the same.
    let redirect = sandbox
        .approve(&url, "ou_sandbox_alice")
        .unwrap()
        .replace(&old_addr, &svc.http.to_string());
    let page = svc.client.get(&redirect).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let (_, s) = svc
        .get(&format!("/api/v1/auth/sessions/{alice_session}"))
        .await;
    assert!(s.contains("\"state\":\"completed\""), "{s}");
    let (_, t1) = svc.get("/api/v1/users/ou_sandbox_alice/token").await;
    let t1: Value = serde_json::from_str(&t1).unwrap();

    // One authorization, in the Python deployment's families and label sets: one session (the
    // reused and refused requests sent no card), one success, one duration observation.
    let mid = svc.scrape().await;
    let card = format!("{{app_id=\"{APP_ID}\",auth_method=\"websocket_card\"}}");
    let moved_mid =
        |name: &str, filter: &str| metric(&mid, name, filter) - metric(&before, name, filter);
    assert_eq!(moved_mid("lark_service_auth_session_total", &card), 1.0);
    assert_eq!(moved_mid("lark_service_auth_success_total", &card), 1.0);
    assert_eq!(
        moved_mid("lark_service_auth_duration_seconds_count", &card),
        1.0
    );
    let bucket = |text: &str, le: &str| -> Vec<f64> {
        text.lines()
            .filter(|l| {
                l.starts_with("lark_service_auth_duration_seconds_bucket{")
                    && l.contains(&format!("app_id=\"{APP_ID}\""))
                    && l.contains("auth_method=\"websocket_card\"")
                    && l.contains(&format!("le=\"{le}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect()
    };
    assert_eq!(bucket(&mid, "15.0").len(), 1, "no le=15 bucket:\n{mid}");
    assert_eq!(bucket(&mid, "60.0")[0] - bucket(&before, "60.0")[0], 1.0);

    // Bob never answers: the sweep expires his session and patches the card.
    let (_, bb) = svc
        .post(
            "/api/v1/auth/requests",
            json!({"open_id": "ou_sandbox_bob"}),
        )
        .await;
    let bob_session = bb["session_id"].as_str().unwrap().to_owned();
    let bob_url = authorize_url(&sandbox, "ou_sandbox_bob");

    // The refresh worker refreshes Alice's 10-second token once 80 % of it has passed.
    let refreshes = sandbox.hits("oauth_token");
    for _ in 0..120 {
        if sandbox.hits("oauth_token") > refreshes {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        sandbox.hits("oauth_token") > refreshes,
        "the worker did not refresh the token"
    );
    svc.wait_for(|| async {
        let (_, t2) = svc.get("/api/v1/users/ou_sandbox_alice/token").await;
        serde_json::from_str::<Value>(&t2).is_ok_and(|t2| t2["access_token"] != t1["access_token"])
    })
    .await;

    svc.wait_for(|| async {
        let (_, s) = svc
            .get(&format!("/api/v1/auth/sessions/{bob_session}"))
            .await;
        s.contains("\"state\":\"expired\"")
    })
    .await;
    svc.wait_for(|| async { !sandbox.messages_for("ou_sandbox_bob")[0].history.is_empty() })
        .await;
    // Approving after expiry does not complete it.
    let redirect = sandbox
        .approve(&bob_url, "ou_sandbox_bob")
        .unwrap()
        .replace(&old_addr, &svc.http.to_string());
    let page = svc.client.get(&redirect).send().await.unwrap();
    assert!(!page.status().is_success());
    let (_, s) = svc
        .get(&format!("/api/v1/auth/sessions/{bob_session}"))
        .await;
    assert!(s.contains("session_expired"), "{s}");

    let after = svc.scrape().await;
    let moved =
        |name: &str, filter: &str| metric(&after, name, filter) - metric(&before, name, filter);
    assert!(moved("lark_service_auth_rate_limited_total", "") >= 1.0);
    assert!(moved("lark_service_token_refresh_total", "success") >= 1.0);
    assert!(moved("lark_service_auth_failure_total", "session_expired") >= 1.0);
    assert!(moved("lark_service_sweep_runs_total", "") >= 1.0);
    assert!(moved("lark_service_sweep_removed_total", "expired") >= 1.0);
    // Bob's card was the second session; his is the one the sweep expired.
    let app = format!("{{app_id=\"{APP_ID}\"}}");
    assert_eq!(moved("lark_service_auth_session_total", &card), 2.0);
    assert_eq!(moved("lark_service_auth_success_total", &card), 1.0);
    assert_eq!(moved("lark_service_auth_session_expired_total", &app), 1.0);
    assert!(
        moved(
            "lark_service_token_refresh_total",
            &format!("{{app_id=\"{APP_ID}\",outcome=\"success\"}}")
        ) >= 1.0
    );
    assert!(
        moved(
            "lark_service_auth_failure_total",
            &format!(
                "{{app_id=\"{APP_ID}\",auth_method=\"websocket_card\",reason=\"session_expired\"}}"
            )
        ) >= 1.0
    );
    // The store gauges (set after each sweep): nothing pending, Alice's token kept fresh.
    svc.wait_for(|| async {
        let now = svc.scrape().await;
        metric(&now, "lark_service_auth_session_active", &app) == 0.0
            && metric(&now, "lark_service_token_active_count", &app) == 1.0
    })
    .await;
    svc.stop().await;
}

/// The sandbox page as a newcomer sees it beside the service: how to call the token API and
/// where the admin token is, each user's session state and stored token (from the service's
/// admin API), and the card rendered (markdown as HTML, never raw `**`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_page_shows_the_card_session_state_token_and_admin_token_file() {
    let _serial = METRICS_SERIAL.lock().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // The page calls the admin API, on the admin listener.
    let service = format!("http://{}", admin.local_addr().unwrap());
    let token_file = std::path::PathBuf::from("/srv/dev/data/sandbox-admin-token");
    let sandbox = Sandbox::start(SandboxOptions {
        request_auth_url: Some(format!("{service}/api/v1/auth/requests")),
        service_url: Some(service.clone()),
        admin_token: Some(ADMIN.to_owned()),
        admin_token_file: Some(token_file.clone()),
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pem = sandbox.ca_pem().expect("the sandbox serves HTTPS");
    let ca = trust_sandbox(dir.path(), &sandbox).expect("the sandbox serves HTTPS");
    let svc = Service::start_on_both(
        dir,
        listener,
        admin,
        &sandbox.base_url(),
        &[("TLS_CA_FILE", &ca)],
    )
    .await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let page_url = format!("{}/", sandbox.base_url());
    let page = || async {
        http.get(&page_url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let alice = |p: &str| -> String {
        let start = p
            .find("id=\"status-ou_sandbox_alice\"")
            .expect("Alice's status");
        p[start..start + p[start..].find("</div></div>").unwrap()].to_owned()
    };

    let p = page().await;
    assert!(
        p.contains(&format!(
            "<code id=admin-token-file>{}</code>",
            token_file.display()
        )),
        "{p}"
    );
    assert!(
        p.contains(&format!(
            "curl -H \"Authorization: Bearer $(cat {})\" {service}/api/v1/users/ou_sandbox_alice/token",
            token_file.display()
        )),
        "{p}"
    );
    assert!(!p.contains(ADMIN), "the page names the file, not the token");
    assert!(alice(&p).contains("no token stored"), "{}", alice(&p));

    // "Ask Alice to authorize": the page asks the service, which sends the card.
    let r = http
        .post(format!("{}/sandbox/request", sandbox.base_url()))
        .form(&[("open_id", "ou_sandbox_alice")])
        .send()
        .await
        .unwrap();
    assert!(r.status().is_redirection());
    let p = page().await;
    let a = alice(&p);
    let session = a
        .split("session <code>")
        .nth(1)
        .and_then(|x| x.split("</code>").next())
        .expect("the page shows the session it started")
        .to_owned();
    assert!(a.contains("<b class=state>pending</b>"), "{a}");
    assert!(a.contains("no token stored"), "{a}");
    assert!(
        p.contains("<div class=title>Authorization required</div>"),
        "{p}"
    );
    assert!(p.contains("<b>Permissions:</b>"), "{p}");
    assert!(!p.contains("**"), "raw markdown on the page: {p}");
    let (code, s) = svc.get(&format!("/api/v1/auth/sessions/{session}")).await;
    assert_eq!(code, 200, "{s}");

    // The card's Authorize link, then Approve: the session completes and a token is stored.
    let card = sandbox.messages_for("ou_sandbox_alice");
    let authorize = find_string(&card[0].content, &|s| {
        s.contains("/open-apis/authen/v1/authorize?")
    })
    .unwrap()
    .to_owned();
    let redirect = sandbox.approve(&authorize, "ou_sandbox_alice").unwrap();
    assert_eq!(http.get(&redirect).send().await.unwrap().status(), 200);
    let p = page().await;
    let a = alice(&p);
    assert!(a.contains("<b class=state>completed</b>"), "{a}");
    let (code, t) = svc.get("/api/v1/users/ou_sandbox_alice/token").await;
    assert_eq!(code, 200, "{t}");
    let t: Value = serde_json::from_str(&t).unwrap();
    let expires = chrono::DateTime::from_timestamp_millis(t["expires_at"].as_i64().unwrap())
        .unwrap()
        .format("%Y-%m-%d %H:%M:%S UTC")
        .to_string();
    assert!(
        a.contains(&format!("token stored</b>, expires {expires}")),
        "{a} vs {expires}"
    );
    assert!(
        !p.contains(t["access_token"].as_str().unwrap()),
        "no token on the page"
    );
    assert!(
        p.contains("<div class=title>Authorization complete</div>"),
        "{p}"
    );
    svc.stop().await;
}
