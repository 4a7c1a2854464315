//! Fail closed on the HTTP callback path: what the network can send without the app's
//! Encrypt Key changes nothing.

mod common;

use common::*;
use lark_service::sandbox::{Sandbox, SandboxOptions, APP_ID};
use serde_json::json;

/// A forged `/authorize` message from Alice, as anyone could POST it.
fn forged_authorize() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schema": "2.0",
        "header": {"event_id": "forged-1", "event_type": "im.message.receive_v1", "create_time": "1",
                   "token": VTOKEN, "app_id": APP_ID, "tenant_key": "sandbox"},
        "event": {
            "sender": {"sender_id": {"open_id": "ou_sandbox_alice"}, "sender_type": "user", "tenant_key": "sandbox"},
            "message": {"message_id": "om_forged_1", "chat_id": "oc_p2p", "chat_type": "p2p",
                        "message_type": "text", "content": "{\"text\":\"/authorize\"}", "create_time": "1"}
        }
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsigned_forged_callback_without_an_encrypt_key_sends_no_card() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    // The README's minimal real config: a verification token at most, no encrypt key.
    let svc = Service::start(&sandbox, &[("LARK_ENCRYPT_KEY", "")]).await;
    let r = svc
        .client
        .post(format!("http://{}/callbacks/event", svc.http))
        .header("content-type", "application/json")
        .body(forged_authorize())
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        404,
        "the callback routes are not mounted"
    );
    // The long connection still works, and nobody was sent a card.
    svc.wait_for(|| async { sandbox.connections() == 1 }).await;
    assert!(sandbox.messages_for("ou_sandbox_alice").is_empty());
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsigned_forged_callback_with_an_encrypt_key_is_refused_with_401() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let svc = Service::start(&sandbox, &[("WEBSOCKET_ENABLED", "false")]).await;
    let url = format!("http://{}/callbacks/event", svc.http);
    // Plain, and encrypted under the right key but unsigned: both the same 401.
    let cipher = lark_service::callbacks::EventCipher::new(ENCRYPT_KEY);
    let mut rng = rand::rng();
    let encrypted =
        serde_json::to_vec(&json!({"encrypt": cipher.encrypt(&forged_authorize(), &mut rng)}))
            .unwrap();
    for body in [
        forged_authorize(),
        encrypted,
        b"{\"encrypt\":\"!!\"}".to_vec(),
    ] {
        let r = svc
            .client
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401);
    }
    assert!(sandbox.messages_for("ou_sandbox_alice").is_empty());
    svc.stop().await;
}
