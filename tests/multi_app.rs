//! Several apps in one service, on the sandbox over TLS: each active app has its own long
//! connection; events, cards, sessions and tokens never cross; disabling an app drops its
//! connection while the others keep working, without a restart.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use common::*;
use lark_service::sandbox::{Sandbox, SandboxOptions, SentMessage, APP2_ID, APP2_SECRET, APP_ID};
use rmcp::model::{CallToolRequestParams, ClientConfig};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::ServiceExt;
use serde_json::{json, Value};

const MCP_TOKEN: &str = "multi-app-mcp-token-0123456789abcdef";

fn cards_from(sandbox: &Sandbox, open_id: &str, app: &str) -> Vec<SentMessage> {
    sandbox
        .messages_for(open_id)
        .into_iter()
        .filter(|m| m.app_id == app)
        .collect()
}

fn authorize_url(card: &SentMessage) -> String {
    find_string(&card.content, &|s| {
        s.contains("/open-apis/authen/v1/authorize?")
    })
    .unwrap()
    .to_owned()
}

fn message_event(open_id: &str, message_id: &str, text: &str) -> Value {
    let user = open_id.trim_start_matches("ou_");
    json!({
        "sender": {"sender_id": {"open_id": open_id, "user_id": user, "union_id": format!("on_{user}")}, "sender_type": "user", "tenant_key": "sandbox"},
        "message": {"message_id": message_id, "chat_id": "oc_p2p", "chat_type": "p2p", "message_type": "text", "content": json!({"text": text}).to_string(), "create_time": "1"}
    })
}

async fn approve_in_browser(svc: &Service, sandbox: &Sandbox, card: &SentMessage, open_id: &str) {
    let redirect = sandbox.approve(&authorize_url(card), open_id).unwrap();
    let page = svc.client.get(&redirect).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(page
        .text()
        .await
        .unwrap()
        .contains("Authorization complete"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_apps_each_with_its_connection_events_cards_and_tokens_never_cross() {
    let _serial = METRICS_SERIAL.lock().await;
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    // App A comes from the configuration (APP_ID / APP_SECRET).
    let svc = Service::start(&sandbox, &[("LARK_SERVICE_MCP_TOKEN", MCP_TOKEN)]).await;
    svc.wait_for(|| async { sandbox.connections_of(APP_ID) == 1 })
        .await;
    assert_eq!(sandbox.connections_of(APP2_ID), 0);

    // App B is added while the service runs: its long connection opens, no restart.
    let (code, b) = svc
        .post(
            "/api/v1/apps",
            json!({"app_id": APP2_ID, "app_name": "second", "app_secret": APP2_SECRET}),
        )
        .await;
    assert_eq!(code, 201, "{b}");
    assert!(!b.to_string().contains(APP2_SECRET), "{b}");
    svc.wait_for(|| async { sandbox.connections_of(APP2_ID) == 1 })
        .await;
    assert_eq!(sandbox.connections_of(APP_ID), 1);

    // Two apps active: a request naming none is refused (fail closed).
    let (code, body) = svc
        .post(
            "/api/v1/auth/requests",
            json!({"open_id": "ou_sandbox_alice"}),
        )
        .await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["error"], "app_id_required", "{body}");
    let (code, body) = svc.get("/api/v1/users/ou_sandbox_alice/token").await;
    assert_eq!(code, 400, "{body}");
    assert!(sandbox.messages().is_empty());

    // An event sent to app A is handled by A only: Carol's Authorize card comes from A.
    sandbox
        .push_event_to(
            APP_ID,
            "im.message.receive_v1",
            message_event("ou_sandbox_carol", "om_in_a1", "/authorize"),
        )
        .unwrap();
    svc.wait_for(|| async { cards_from(&sandbox, "ou_sandbox_carol", APP_ID).len() == 1 })
        .await;
    assert!(cards_from(&sandbox, "ou_sandbox_carol", APP2_ID).is_empty());
    let carol_card = cards_from(&sandbox, "ou_sandbox_carol", APP_ID).remove(0);
    assert!(authorize_url(&carol_card).contains(&format!("client_id={APP_ID}")));

    // An authorization for app B's user completes under B.
    let (code, body) = svc
        .post(
            "/api/v1/auth/requests",
            json!({"open_id": "ou_sandbox_alice", "app_id": APP2_ID}),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let alice_session = body["session_id"].as_str().unwrap().to_owned();
    let alice_cards = cards_from(&sandbox, "ou_sandbox_alice", APP2_ID);
    assert_eq!(alice_cards.len(), 1);
    assert!(cards_from(&sandbox, "ou_sandbox_alice", APP_ID).is_empty());
    assert!(authorize_url(&alice_cards[0]).contains(&format!("client_id={APP2_ID}")));
    approve_in_browser(&svc, &sandbox, &alice_cards[0], "ou_sandbox_alice").await;
    let (code, s) = svc
        .get(&format!(
            "/api/v1/auth/sessions/{alice_session}?app_id={APP2_ID}"
        ))
        .await;
    assert_eq!(code, 200, "{s}");
    assert!(s.contains("\"state\":\"completed\""), "{s}");
    // The session is B's: A does not see it.
    let (code, s) = svc
        .get(&format!(
            "/api/v1/auth/sessions/{alice_session}?app_id={APP_ID}"
        ))
        .await;
    assert_eq!(code, 404, "{s}");
    // Her token is readable with app_id=B only, and the platform issued it to B.
    let (code, tok) = svc
        .get(&format!(
            "/api/v1/users/ou_sandbox_alice/token?app_id={APP2_ID}"
        ))
        .await;
    assert_eq!(code, 200, "{tok}");
    let tok: Value = serde_json::from_str(&tok).unwrap();
    let access = tok["access_token"].as_str().unwrap();
    assert_eq!(sandbox.token_app(access), Some(APP2_ID));
    let (code, _) = svc
        .get(&format!(
            "/api/v1/users/ou_sandbox_alice/token?app_id={APP_ID}"
        ))
        .await;
    assert_eq!(code, 404);

    // A card click on B's card goes over B's connection to B's flow: Bob rejects.
    let (code, body) = svc
        .post(
            "/api/v1/auth/requests",
            json!({"open_id": "ou_sandbox_bob", "app_id": APP2_ID}),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let bob_session = body["session_id"].as_str().unwrap().to_owned();
    let bob_card = cards_from(&sandbox, "ou_sandbox_bob", APP2_ID).remove(0);
    let value = find_callback_value(&bob_card.content).expect("a reject button");
    let frame = sandbox
        .click_card_button(&bob_card.message_id, "ou_sandbox_bob", value)
        .unwrap();
    svc.wait_for(|| async {
        sandbox
            .acks()
            .iter()
            .any(|a| a.message_id == frame && a.code == 200)
    })
    .await;
    let (_, s) = svc
        .get(&format!(
            "/api/v1/auth/sessions/{bob_session}?app_id={APP2_ID}"
        ))
        .await;
    assert!(s.contains("\"state\":\"rejected\""), "{s}");

    // A's user authorizes under A: visible under A, not under B.
    approve_in_browser(&svc, &sandbox, &carol_card, "ou_sandbox_carol").await;
    let (code, tok) = svc
        .get(&format!(
            "/api/v1/users/ou_sandbox_carol/token?app_id={APP_ID}"
        ))
        .await;
    assert_eq!(code, 200, "{tok}");
    let tok: Value = serde_json::from_str(&tok).unwrap();
    assert_eq!(
        sandbox.token_app(tok["access_token"].as_str().unwrap()),
        Some(APP_ID)
    );
    let (code, _) = svc
        .get(&format!(
            "/api/v1/users/ou_sandbox_carol/token?app_id={APP2_ID}"
        ))
        .await;
    assert_eq!(code, 404);

    // MCP: `/mcp?app_id=B` is app B's server; its messages go out as B. Without app_id, with
    // two apps active, /mcp is refused.
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    let r = svc
        .client
        .post(format!("http://{}/mcp", svc.admin))
        .header("accept", "application/json, text/event-stream")
        .bearer_auth(MCP_TOKEN)
        .json(&init)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap().contains("app_id_required"));
    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(format!(
            "http://{}/mcp?app_id={APP2_ID}",
            svc.admin
        ))
        .auth_header(MCP_TOKEN),
    );
    let client = ClientConfig::default().serve(transport).await.unwrap();
    let Value::Object(args) =
        json!({"receive_id": "ou_sandbox_carol", "receive_id_type": "open_id", "text": "from B"})
    else {
        unreachable!()
    };
    let r = client
        .call_tool(CallToolRequestParams::new("send_message".to_owned()).with_arguments(args))
        .await
        .unwrap();
    assert_ne!(r.is_error, Some(true), "{r:?}");
    let from_b = cards_from(&sandbox, "ou_sandbox_carol", APP2_ID);
    assert_eq!(from_b.len(), 1, "{from_b:?}");
    assert_eq!(from_b[0].content["text"], "from B");
    let _ = client.cancel().await;

    // The metrics carry B's app_id.
    let text = svc.scrape().await;
    assert!(
        text.contains(&format!("app_id=\"{APP2_ID}\"")),
        "no metric names app B"
    );

    // Disabling B drops its connection, without a restart; A keeps working.
    let r = svc
        .client
        .post(format!(
            "http://{}/api/v1/apps/{APP2_ID}/disable",
            svc.admin
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    svc.wait_for(|| async { sandbox.connections_of(APP2_ID) == 0 })
        .await;
    assert_eq!(sandbox.connections_of(APP_ID), 1);
    let (code, body) = svc
        .get(&format!(
            "/api/v1/users/ou_sandbox_alice/token?app_id={APP2_ID}"
        ))
        .await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("app_not_active"), "{body}");
    // One active app again: it is the default.
    let (code, _) = svc.get("/api/v1/users/ou_sandbox_carol/token").await;
    assert_eq!(code, 200);
    sandbox
        .push_event_to(
            APP_ID,
            "im.message.receive_v1",
            message_event("ou_sandbox_bob", "om_in_a2", "/authorize"),
        )
        .unwrap();
    svc.wait_for(|| async { cards_from(&sandbox, "ou_sandbox_bob", APP_ID).len() == 1 })
        .await;
    // An event for B now finds no connection of B and is not handled by A.
    sandbox
        .push_event_to(
            APP2_ID,
            "im.message.receive_v1",
            message_event("ou_sandbox_carol", "om_in_b9", "/authorize"),
        )
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(cards_from(&sandbox, "ou_sandbox_carol", APP_ID).len(), 1);
    assert_eq!(
        cards_from(&sandbox, "ou_sandbox_carol", APP2_ID).len(),
        1,
        "only the MCP message of before"
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_card_of_app_b_is_updated_by_app_b() {
    let _serial = METRICS_SERIAL.lock().await;
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let svc = Service::start(
        &sandbox,
        &[
            ("AUTH_SESSION_EXPIRY_SECONDS", "10"),
            ("SWEEP_INTERVAL_SECONDS", "1"),
        ],
    )
    .await;
    let (code, b) = svc
        .post(
            "/api/v1/apps",
            json!({"app_id": APP2_ID, "app_name": "second", "app_secret": APP2_SECRET}),
        )
        .await;
    assert_eq!(code, 201, "{b}");
    svc.wait_for(|| async { sandbox.connections_of(APP2_ID) == 1 })
        .await;
    let (code, body) = svc
        .post(
            "/api/v1/auth/requests",
            json!({"open_id": "ou_sandbox_alice", "app_id": APP2_ID}),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let session = body["session_id"].as_str().unwrap().to_owned();
    assert_eq!(cards_from(&sandbox, "ou_sandbox_alice", APP2_ID).len(), 1);
    // The sweep expires it; B's client (the sandbox lets only the sending app update a
    // message) turns the card into its expired form.
    svc.wait_for_within(std::time::Duration::from_secs(30), || async {
        cards_from(&sandbox, "ou_sandbox_alice", APP2_ID)[0]
            .history
            .len()
            == 1
    })
    .await;
    let (_, s) = svc
        .get(&format!("/api/v1/auth/sessions/{session}?app_id={APP2_ID}"))
        .await;
    assert!(s.contains("\"state\":\"expired\""), "{s}");
    let text = svc.scrape().await;
    assert!(
        metric(
            &text,
            "lark_service_auth_session_expired_total",
            &format!("app_id=\"{APP2_ID}\"")
        ) >= 1.0,
        "the expiry is counted under app B"
    );
    svc.stop().await;
}

/// With no app in the configuration (no APP_ID / APP_SECRET, as after `import python` of the
/// Python deployment's app store), the service serves the registry's active app: its long
/// connection opens, it is the default for requests naming none, and an authorization
/// completes under it. Nothing is started for an app the configuration does not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_alone_is_enough_to_serve() {
    let _serial = METRICS_SERIAL.lock().await;
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open_store(dir.path());
        let reg = lark_service::apps::Registry::new(store, None, None);
        reg.add(lark_service::apps::NewApp {
            app_id: APP2_ID.to_owned(),
            app_name: "from the registry".to_owned(),
            app_secret: secrecy::SecretString::from(APP2_SECRET.to_owned()),
            description: None,
            permissions: None,
            created_by: None,
        })
        .unwrap();
    }
    let svc = Service::start_in(dir, &sandbox, &[("APP_ID", ""), ("APP_SECRET", "")]).await;
    svc.wait_for(|| async { sandbox.connections_of(APP2_ID) == 1 })
        .await;
    assert_eq!(sandbox.connections_of(APP_ID), 0);

    // The only active app is the default.
    let (code, body) = svc
        .post(
            "/api/v1/auth/requests",
            json!({"open_id": "ou_sandbox_alice"}),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let cards = cards_from(&sandbox, "ou_sandbox_alice", APP2_ID);
    assert_eq!(cards.len(), 1);
    approve_in_browser(&svc, &sandbox, &cards[0], "ou_sandbox_alice").await;
    let (code, body) = svc.get("/api/v1/users/ou_sandbox_alice/token").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = svc
        .get(&format!(
            "/api/v1/users/ou_sandbox_alice/token?app_id={APP2_ID}"
        ))
        .await;
    assert_eq!(code, 200, "{body}");
    // No worker for a configuration app that does not exist (no failing tenant-token fetch
    // for an empty app id, no second long connection).
    let (code, workers) = svc.get("/workers").await;
    assert_eq!(code, 200, "{workers}");
    assert!(!workers.contains("tenant_token"), "{workers}");
    assert_eq!(sandbox.connections_of(APP_ID), 0);
    assert!(sandbox.messages().iter().all(|m| m.app_id == APP2_ID));
}
