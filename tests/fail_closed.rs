//! Fail closed on the HTTP callback path: what the network can send without the app's
//! Encrypt Key changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

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

/// A caller of the backup API chooses the recipients, so the backups it asks for must not
/// rotate the operator's own backups away; backups are serialized and never share a name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backup_api_cannot_prune_the_operators_backups() {
    use lark_service::backup::rotation;
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let bdir = scratch.path().join("backups");
    std::fs::create_dir_all(&bdir).unwrap();
    // Two scheduled backups the operator keeps.
    let operators: Vec<_> = [1_600_000_000_000u64, 1_600_000_001_000]
        .iter()
        .map(|ms| {
            let p = bdir.join(rotation::file_name(*ms));
            std::fs::write(&p, b"the operator's backup").unwrap();
            p
        })
        .collect();
    let bdir_text = bdir.display().to_string();
    let svc = Service::start(
        &sandbox,
        &[
            ("WEBSOCKET_ENABLED", "false"),
            ("BACKUP_DIR", &bdir_text),
            ("BACKUP_KEEP", "2"),
            ("BACKUP_PASSPHRASE", "fail-closed-backup-passphrase"),
        ],
    )
    .await;
    let stranger = age::x25519::Identity::generate().to_public().to_string();
    // Asked for together: each answers with a file of its own.
    let asks = (0..3).map(|_| svc.post("/api/v1/backups", json!({"recipients": [stranger]})));
    let answers = futures_util::future::join_all(asks).await;
    let mut paths = std::collections::HashSet::new();
    for (code, body) in answers {
        assert_eq!(code, 200, "{body}");
        assert!(
            paths.insert(body["path"].as_str().unwrap().to_owned()),
            "{body}"
        );
    }
    for p in &operators {
        assert!(p.exists(), "{} was pruned by an API request", p.display());
    }
    // The requested ones are rotated among themselves.
    let requested = rotation::list(&bdir.join("requested")).unwrap();
    assert_eq!(requested.len(), 2, "{requested:?}");
    svc.stop().await;
}

/// Issue 16, end to end: Alice's account at another company (another tenant) approves the card
/// the app sent to its own Alice: the session fails and no token is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_of_another_tenant_cannot_complete_the_authorization() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let svc = Service::start(&sandbox, &[("WEBSOCKET_ENABLED", "false")]).await;
    let (status, body) = svc
        .post(
            "/api/v1/auth/requests",
            json!({"open_id": "ou_sandbox_alice"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let session = body["session_id"].as_str().unwrap().to_owned();
    let card = sandbox.messages_for("ou_sandbox_alice").remove(0);
    let authorize = find_string(&card.content, &|s| {
        s.contains("/open-apis/authen/v1/authorize?")
    })
    .unwrap()
    .to_owned();
    sandbox.set_user_tenant("ou_sandbox_alice", "another-company");
    let redirect = sandbox.approve(&authorize, "ou_sandbox_alice").unwrap();
    let page = svc.client.get(&redirect).send().await.unwrap();
    assert!(page.status().is_client_error(), "{}", page.status());
    let (_, s) = svc.get(&format!("/api/v1/auth/sessions/{session}")).await;
    assert!(s.contains("state_mismatch"), "{s}");
    let (code, _) = svc.get("/api/v1/users/ou_sandbox_alice/token").await;
    assert_eq!(code, 404);
    svc.stop().await;
}
