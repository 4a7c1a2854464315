//! The HTTP surfaces fail closed (issue 16): every listener bounds slow, silent and too many
//! connections; the admin API is only on the admin listener and behind a bearer token that is
//! long, counted and throttled; tokens can be revoked while the service runs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::time::Duration;

use common::*;
use lark_service::config::{Config, LoadOptions};
use lark_service::sandbox::{Sandbox, SandboxOptions};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Longest any single step may take before the test is declared hung (a guard, not a
/// measurement).
const GUARD: Duration = Duration::from_secs(30);

/// Reads until the peer closes the connection; fails if the guard passes first.
async fn read_until_eof(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    tokio::time::timeout(GUARD, s.read_to_end(&mut buf))
        .await
        .expect("the server closes the connection")
        .ok();
    buf
}

/// Reads until a whole response head arrived; returns it.
async fn read_head(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before a response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn admin_get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {ADMIN}\r\n\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_disconnected() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let svc = Service::start(&sandbox, &[("HTTP_HEADER_READ_TIMEOUT_SECONDS", "1")]).await;
    for addr in [svc.http, svc.admin, svc.metrics] {
        // Part of a request's headers, then nothing.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: ")
            .await
            .unwrap();
        read_until_eof(&mut slow).await;
        // Connected, never a byte.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        read_until_eof(&mut silent).await;
    }
    // A keep-alive connection left idle after a response is closed too.
    let mut idle = TcpStream::connect(svc.http).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let rest = String::from_utf8(read_until_eof(&mut idle).await).unwrap();
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest}");
    // The service still serves.
    assert_eq!(svc.public_get("/healthz").await.0, 200);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_not_served_until_one_is_released() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let svc = Service::start(&sandbox, &[("HTTP_MAX_CONNECTIONS", "2")]).await;
    // Nothing else talks to the admin listener: two held connections fill it.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(svc.admin).await.unwrap();
        c.write_all(admin_get("/workers").as_bytes()).await.unwrap();
        let head = tokio::time::timeout(GUARD, read_head(&mut c))
            .await
            .unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        held.push(c);
    }
    // The third is accepted by the kernel but not served while both are held.
    let mut third = TcpStream::connect(svc.admin).await.unwrap();
    third
        .write_all(admin_get("/workers").as_bytes())
        .await
        .unwrap();
    let mut b = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut b)).await;
    assert!(early.is_err(), "the connection over the cap was served");
    // Releasing one lets it in.
    drop(held.pop());
    let head = tokio::time::timeout(GUARD, read_head(&mut third))
        .await
        .expect("served once a slot is free");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_paths_are_only_on_the_admin_listener() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let svc = Service::start(&sandbox, &[]).await;
    for path in [
        "/",
        "/workers",
        "/api/v1/users/ou_sandbox_alice/token",
        "/api/v1/auth/sessions/00000000000000000000000000000000",
    ] {
        let r = svc
            .client
            .get(format!("http://{}{path}", svc.http))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 404, "public {path}");
    }
    let r = svc
        .client
        .post(format!("http://{}/api/v1/auth/requests", svc.http))
        .bearer_auth(ADMIN)
        .json(&json!({"open_id": "ou_sandbox_alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert!(sandbox.messages_for("ou_sandbox_alice").is_empty());
    // On the admin listener they work.
    let (code, body) = svc.get("/").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"store\""), "{body}");
    assert_eq!(svc.get("/workers").await.0, 200);
    // The public listener keeps health and readiness; the admin one does not serve them.
    assert_eq!(svc.public_get("/healthz").await.0, 200);
    assert_eq!(svc.get("/healthz").await.0, 404);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_needs_the_admin_token_and_readyz_hides_detail() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let svc = Service::start(
        &sandbox,
        &[
            ("WEBSOCKET_ENABLED", "false"),
            ("WEBSOCKET_FALLBACK_TO_HTTP", "false"),
        ],
    )
    .await;
    let r = svc
        .client
        .get(format!("http://{}/", svc.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert!(!r.text().await.unwrap().contains("store"));
    // Not ready (no event channel with callbacks off): anonymous callers get the short reason.
    let r = svc
        .client
        .get(format!("http://{}/readyz", svc.http))
        .send()
        .await
        .unwrap();
    let anonymous = r.text().await.unwrap();
    let (_, detailed) = svc.public_get("/readyz").await;
    assert!(anonymous.starts_with("not ready"), "{anonymous}");
    assert!(detailed.len() > anonymous.len(), "{detailed} / {anonymous}");
    svc.stop().await;
}

fn load(env: &[(&str, &str)], toml: &str) -> Result<Config, String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.toml");
    std::fs::write(&file, toml).unwrap();
    // Private: a config file with an inline secret must be (see the config tests).
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let env: std::collections::HashMap<String, String> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Config::load_with(
        &LoadOptions {
            config_path: Some(file),
            overrides: vec![],
        },
        &env,
    )
    .map_err(|e| e.to_string())
}

#[test]
fn a_short_admin_or_mcp_token_is_refused_at_start() {
    let e = load(&[], "admin_token = \"short-admin-token\"\n").unwrap_err();
    assert!(e.contains("admin_token") && e.contains("32"), "{e}");
    let e = load(&[("LARK_SERVICE_MCP_TOKEN", "short")], "").unwrap_err();
    assert!(e.contains("MCP_TOKEN") && e.contains("32"), "{e}");
    // Neither value is echoed.
    assert!(!e.contains("short\""), "{e}");
    let long = "0123456789abcdef0123456789abcdef";
    let cfg = load(
        &[
            ("LARK_SERVICE_ADMIN_TOKEN", long),
            ("LARK_SERVICE_MCP_TOKEN", long),
        ],
        "",
    )
    .unwrap();
    assert!(cfg.admin_token.is_some() && cfg.mcp_token.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_wrong_bearers_from_one_peer_are_throttled_and_counted() {
    let mcp_token = "mcp-throttle-token-0123456789abcdef";
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let svc = Service::start(&sandbox, &[("LARK_SERVICE_MCP_TOKEN", mcp_token)]).await;
    let failures = |t: &str| metric(t, "lark_service_auth_bearer_failures_total", "admin");
    let throttled = |t: &str| metric(t, "lark_service_auth_bearer_throttled_total", "admin");
    let before = svc.scrape().await;
    let wrong = |bearer: &'static str| {
        svc.client
            .get(format!("http://{}/workers", svc.admin))
            .bearer_auth(bearer)
            .send()
    };
    // The right token works before.
    assert_eq!(svc.get("/workers").await.0, 200);
    for _ in 0..lark_service::http::bearer::FAILURES_ALLOWED {
        assert_eq!(wrong("wrong-token").await.unwrap().status().as_u16(), 401);
    }
    let r = wrong("wrong-token").await.unwrap();
    assert_eq!(r.status().as_u16(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    // Now even the right token is refused from this peer, on the admin API and on /mcp.
    assert_eq!(svc.get("/workers").await.0, 429);
    let r = svc
        .client
        .post(format!("http://{}/mcp", svc.admin))
        .header("accept", "application/json, text/event-stream")
        .bearer_auth(mcp_token)
        .json(
            &json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-03-26", "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"}}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    // Another peer is not affected.
    let other = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let r = other
        .get(format!("http://{}/workers", svc.admin))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let after = svc.scrape().await;
    assert!(
        failures(&after) - failures(&before) >= lark_service::http::bearer::FAILURES_ALLOWED as f64,
        "{after}"
    );
    assert!(throttled(&after) - throttled(&before) >= 2.0, "{after}");
    svc.stop().await;
}

/// Authorizes `open_id` through the sandbox; returns the session id.
async fn authorize(svc: &Service, sandbox: &Sandbox, open_id: &str) -> String {
    let (status, body) = svc
        .post("/api/v1/auth/requests", json!({"open_id": open_id}))
        .await;
    assert!(status == 201 || status == 200, "{body}");
    let session = body["session_id"].as_str().unwrap().to_owned();
    let cards = sandbox.messages_for(open_id);
    let url = find_string(&cards.last().unwrap().content, &|s| {
        s.contains("/open-apis/authen/v1/authorize?")
    })
    .unwrap()
    .to_owned();
    let redirect = sandbox.approve(&url, open_id).unwrap();
    let page = svc.client.get(&redirect).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let (code, tok) = svc.get(&format!("/api/v1/users/{open_id}/token")).await;
    assert_eq!(code, 200, "{tok}");
    session
}

async fn session_state(svc: &Service, id: &str) -> Value {
    let (code, s) = svc.get(&format!("/api/v1/auth/sessions/{id}")).await;
    assert_eq!(code, 200, "{s}");
    serde_json::from_str(&s).unwrap()
}

async fn delete(svc: &Service, path: &str) -> (u16, Value) {
    let r = svc
        .client
        .delete(format!("http://{}{path}", svc.admin))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_while_running_deletes_our_copy_of_the_tokens() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let svc = Service::start(&sandbox, &[]).await;
    svc.wait_for(|| async { sandbox.connections() == 1 }).await;
    let alice = "ou_sandbox_alice";

    // DELETE /api/v1/users/{id}/token.
    let session = authorize(&svc, &sandbox, alice).await;
    let (code, v) = delete(&svc, &format!("/api/v1/users/{alice}/token")).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["session_id"], session.as_str(), "{v}");
    let (code, body) = svc.get(&format!("/api/v1/users/{alice}/token")).await;
    assert_eq!(code, 404, "{body}");
    let s = session_state(&svc, &session).await;
    assert_eq!(s["state"], "revoked", "{s}");
    assert_eq!(s["has_tokens"], false, "{s}");
    // Nothing left to revoke.
    assert_eq!(
        delete(&svc, &format!("/api/v1/users/{alice}/token"))
            .await
            .0,
        404
    );

    // POST /api/v1/sessions/{id}/revoke.
    let session = authorize(&svc, &sandbox, alice).await;
    let (code, v) = svc
        .post(&format!("/api/v1/sessions/{session}/revoke"), json!({}))
        .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["state"], "revoked", "{v}");
    assert_eq!(
        svc.get(&format!("/api/v1/users/{alice}/token")).await.0,
        404
    );
    // Neither the refresh worker nor a restart brings the token back: it is gone from the store.
    let dir = svc.stop_keep_dir().await;
    let store = open_store(dir.path());
    assert!(store
        .get_token(lark_service::sandbox::APP_ID, alice)
        .unwrap()
        .is_none());
    // Unknown or malformed ids.
    drop(store);
    let svc = Service::start_in(dir, &sandbox, &[]).await;
    let (code, _) = svc
        .post(
            "/api/v1/sessions/00000000000000000000000000000000/revoke",
            json!({}),
        )
        .await;
    assert_eq!(code, 404);
    let (code, _) = svc.post("/api/v1/sessions/nope/revoke", json!({})).await;
    assert_eq!(code, 400);
    // Revoke is an admin route: no token, no revoke.
    let r = svc
        .client
        .delete(format!("http://{}/api/v1/users/{alice}/token", svc.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    svc.stop().await;
}
