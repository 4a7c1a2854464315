//! The MCP endpoint (issue 10): the service in-process against the sandbox platform, driven by
//! the official `rmcp` client over streamable HTTP with a bearer token.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use lark_service::config::{Config, LoadOptions};
use lark_service::daemon::{run, Listeners};
use lark_service::sandbox::{Sandbox, SandboxOptions, APP_ID, APP_SECRET};
use rmcp::model::{CallToolRequestParams, CallToolResult, ClientConfig};
use rmcp::service::RunningService;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{json, Value};
use tokio::net::TcpListener;

const ADMIN: &str = "mcp-admin-token-0123456789abcdef0123";
const MCP_TOKEN: &str = "mcp-test-token-0123456789abcdef012345";
const KEY: &str = "7e57c0de7e57c0de7e57c0de7e57c0de7e57c0de7e57c0de7e57c0de7e57c0de";

const TOOLS: &[&str] = &[
    "send_message",
    "send_card",
    "get_user",
    "apaas_query_records",
    "apaas_get_record",
    "apaas_create_record",
    "apaas_update_record",
    "request_user_authorization",
    "authorization_status",
    "revoke_user_token",
    "get_user_info",
    "health_check",
    "get_chat_list",
    "get_chat_members",
];

struct Service {
    http: SocketAddr,
    admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Service {
    async fn start(sandbox: &Sandbox) -> Self {
        Self::start_with(sandbox, &[]).await
    }

    async fn start_with(sandbox: &Sandbox, extra: &[(&str, &str)]) -> Self {
        let domain = sandbox.base_url();
        let dir = tempfile::tempdir().unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ha = http.local_addr().unwrap();
        let aa = admin.local_addr().unwrap();
        let cfg_file = dir.path().join("config.toml");
        std::fs::write(&cfg_file, "").unwrap();
        let mut env: HashMap<String, String> = [
            ("APP_ID", APP_ID),
            ("APP_SECRET", APP_SECRET),
            ("LARK_TOKEN_ENCRYPTION_KEY", KEY),
            ("LARK_SERVICE_ADMIN_TOKEN", ADMIN),
            ("LARK_SERVICE_MCP_TOKEN", MCP_TOKEN),
            ("WEBSOCKET_ENABLED", "false"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        env.insert("LARK_DOMAIN".into(), domain.clone());
        if let Some(pem) = sandbox.ca_pem() {
            let ca = dir.path().join("sandbox-ca.pem");
            std::fs::write(&ca, pem).unwrap();
            env.insert("TLS_CA_FILE".into(), ca.display().to_string());
        }
        env.insert(
            "STORAGE_PATH".into(),
            dir.path().join("s.redb").display().to_string(),
        );
        env.insert(
            "AUTH_REDIRECT_URI".into(),
            format!("http://{ha}/oauth/callback"),
        );
        for (k, v) in extra {
            env.insert((*k).to_owned(), (*v).to_owned());
        }
        let cfg = Config::load_with(
            &LoadOptions {
                config_path: Some(cfg_file),
                overrides: vec![],
            },
            &env,
        )
        .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            run(
                cfg,
                Listeners {
                    http,
                    admin,
                    metrics: None,
                },
                async move {
                    let _ = rx.await;
                },
            )
            .await
            .unwrap();
        });
        let client = reqwest::Client::new();
        for _ in 0..400 {
            if client
                .get(format!("http://{ha}/healthz"))
                .send()
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Self {
            http: ha,
            admin: aa,
            stop: Some(tx),
            task,
            _dir: dir,
        }
    }

    /// `/mcp` is on the admin listener.
    fn mcp_url(&self) -> String {
        format!("http://{}/mcp", self.admin)
    }

    async fn connect(&self) -> RunningService<RoleClient, ClientConfig> {
        let transport = StreamableHttpClientTransport::from_config(
            StreamableHttpClientTransportConfig::with_uri(self.mcp_url()).auth_header(MCP_TOKEN),
        );
        ClientConfig::default().serve(transport).await.unwrap()
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(25), &mut self.task)
            .await
            .expect("service stops within the grace period")
            .unwrap();
    }
}

async fn call(
    client: &RunningService<RoleClient, ClientConfig>,
    name: &str,
    args: Value,
) -> CallToolResult {
    let Value::Object(args) = args else {
        panic!("arguments must be an object")
    };
    client
        .call_tool(CallToolRequestParams::new(name.to_owned()).with_arguments(args))
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn text(r: &CallToolResult) -> Value {
    let t = r
        .content
        .first()
        .and_then(|c| c.as_text())
        .map(|t| t.text.clone())
        .expect("text content");
    serde_json::from_str(&t).unwrap_or_else(|_| panic!("not JSON: {t}"))
}

/// Calls a tool that must succeed and returns its JSON result.
async fn ok(client: &RunningService<RoleClient, ClientConfig>, name: &str, args: Value) -> Value {
    let r = call(client, name, args).await;
    assert_ne!(r.is_error, Some(true), "{name} failed: {:?}", text(&r));
    text(&r)
}

/// Calls a tool that must fail and returns its JSON error.
async fn err(client: &RunningService<RoleClient, ClientConfig>, name: &str, args: Value) -> Value {
    let r = call(client, name, args).await;
    assert_eq!(r.is_error, Some(true), "{name} should fail: {:?}", text(&r));
    text(&r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mcp_tools_against_the_sandbox() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let svc = Service::start(&sandbox).await;
    let client = svc.connect().await;

    // Every tool is listed with an object input schema naming its properties.
    let tools = client.list_all_tools().await.unwrap();
    for name in TOOLS {
        let t = tools
            .iter()
            .find(|t| t.name == *name)
            .unwrap_or_else(|| panic!("tool {name} listed"));
        assert_eq!(t.input_schema.get("type"), Some(&json!("object")), "{name}");
        assert!(t.input_schema.get("properties").is_some(), "{name}");
        assert!(t.description.is_some(), "{name}");
    }
    let send = tools.iter().find(|t| t.name == "send_message").unwrap();
    let props = send.input_schema["properties"].as_object().unwrap();
    for p in ["receive_id_type", "receive_id", "text"] {
        assert!(props.contains_key(p), "send_message has {p}");
    }

    // send_message: the sandbox records the text.
    let r = ok(
        &client,
        "send_message",
        json!({"receive_id_type": "open_id", "receive_id": "ou_sandbox_alice", "text": "hello from mcp"}),
    )
    .await;
    assert!(r["message_id"].as_str().unwrap().starts_with("om_"));
    let msgs = sandbox.messages_for("ou_sandbox_alice");
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].msg_type, "text");
    assert_eq!(msgs[0].content["text"], "hello from mcp");

    // send_card.
    let card = json!({"header": {"title": {"tag": "plain_text", "content": "Hi"}}, "elements": []});
    let r = ok(
        &client,
        "send_card",
        json!({"receive_id_type": "email", "receive_id": "bob@sandbox.example", "card": card}),
    )
    .await;
    assert!(r["message_id"].is_string());
    let msgs = sandbox.messages_for("ou_sandbox_bob");
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].msg_type, "interactive");
    assert_eq!(msgs[0].content, card);

    // A platform error is a tool error with the Lark code.
    let e = err(
        &client,
        "send_message",
        json!({"receive_id_type": "open_id", "receive_id": "ou_nobody", "text": "x"}),
    )
    .await;
    assert_eq!(e["code"], 230013, "{e}");

    // get_user from the directory, by open_id and user_id.
    let u = ok(&client, "get_user", json!({"id": "ou_sandbox_carol"})).await;
    assert_eq!(u["user_id"], "sandbox_carol");
    assert_eq!(u["email"], "carol@sandbox.example");
    let u = ok(
        &client,
        "get_user",
        json!({"id": "sandbox_bob", "id_type": "user_id"}),
    )
    .await;
    assert_eq!(u["open_id"], "ou_sandbox_bob");
    let u = ok(
        &client,
        "get_user",
        json!({"id": "alice@sandbox.example", "id_type": "email"}),
    )
    .await;
    assert_eq!(u["open_id"], "ou_sandbox_alice");
    let e = err(
        &client,
        "get_user",
        json!({"id": "nobody@sandbox.example", "id_type": "email"}),
    )
    .await;
    assert_eq!(e["field"], "id", "{e}");
    let e = err(&client, "get_user", json!({"id": "ou_nobody"})).await;
    assert_eq!(e["code"], 41050, "{e}");

    // as_user before authorizing: the Authorize card is sent, and the tool error says so.
    let before = sandbox.messages_for("ou_sandbox_carol").len();
    let e = err(
        &client,
        "get_user",
        json!({"id": "ou_sandbox_carol", "as_user": true}),
    )
    .await;
    let msg = e["error"].as_str().unwrap();
    assert!(
        msg.starts_with("user has not authorized: an Authorize card was sent to them (session "),
        "{msg}"
    );
    assert_eq!(e["authorization_requested"], true, "{e}");
    let session = e["session_id"].as_str().unwrap().to_owned();
    assert_eq!(session.len(), 32);
    let cards = sandbox.messages_for("ou_sandbox_carol");
    assert_eq!(cards.len(), before + 1);
    assert_eq!(cards.last().unwrap().msg_type, "interactive");

    // request_user_authorization (same, default scopes) finds that card waiting;
    // authorization_status says pending.
    let r = ok(
        &client,
        "request_user_authorization",
        json!({"id": "ou_sandbox_carol"}),
    )
    .await;
    assert_eq!(r["session_id"], session.as_str());
    assert_eq!(r["reused"], true);
    assert_eq!(
        sandbox.messages_for("ou_sandbox_carol").len(),
        before + 1,
        "no second card"
    );
    // For another user, with other scopes, it sends a new card.
    let before_bob = sandbox.messages_for("ou_sandbox_bob").len();
    let r = ok(
        &client,
        "request_user_authorization",
        json!({"id": "ou_sandbox_bob", "scopes": ["contact:user.base:readonly"]}),
    )
    .await;
    assert_eq!(r["reused"], false, "{r}");
    assert_eq!(r["session_id"].as_str().unwrap().len(), 32);
    let bob = sandbox.messages_for("ou_sandbox_bob");
    assert_eq!(bob.len(), before_bob + 1);
    assert_eq!(bob.last().unwrap().msg_type, "interactive");
    let st = ok(
        &client,
        "authorization_status",
        json!({"session_id": session}),
    )
    .await;
    assert_eq!(st["state"], "pending");
    assert_eq!(st["user_id"], "ou_sandbox_carol");
    let dump = st.to_string();
    assert!(!dump.contains("token\":\""), "no secrets: {dump}");
    // The pending session is named when the user is not yet authorized; no new card.
    let e = err(
        &client,
        "get_user",
        json!({"id": "ou_sandbox_carol", "as_user": true}),
    )
    .await;
    let msg = e["error"].as_str().unwrap();
    assert!(
        msg.starts_with(&format!(
            "user has not authorized: an Authorize card is already waiting for them (session {session}, pending)"
        )),
        "{msg}"
    );
    assert_eq!(sandbox.messages_for("ou_sandbox_carol").len(), before + 1);
    // The user approves; then the session is completed and as_user reads their own profile.
    let authorize = find_string(&cards.last().unwrap().content, &|s| {
        s.contains("/open-apis/authen/v1/authorize?")
    })
    .expect("the card carries the authorize URL")
    .to_owned();
    let redirect = sandbox.approve(&authorize, "ou_sandbox_carol").unwrap();
    let page = reqwest::get(&redirect).await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let st = ok(
        &client,
        "authorization_status",
        json!({"session_id": session}),
    )
    .await;
    assert_eq!(st["state"], "completed", "{st}");
    assert_eq!(st["has_tokens"], true);
    assert!(!st.to_string().contains("eyJsandbox"), "no tokens: {st}");
    let me = ok(
        &client,
        "get_user",
        json!({"id": "ou_sandbox_carol", "as_user": true}),
    )
    .await;
    assert_eq!(me["source"], "user_token");
    assert_eq!(me["open_id"], "ou_sandbox_carol");
    assert_eq!(me["name"], "Carol (sandbox)");
    assert!(!me.to_string().contains("eyJsandbox"), "no tokens: {me}");
    let e = err(
        &client,
        "authorization_status",
        json!({"session_id": "nope"}),
    )
    .await;
    assert_eq!(e["field"], "session_id");

    // revoke_user_token deletes our copy of Carol's tokens: the session shows revoked, her
    // token can no longer be used, and a second revoke finds nothing.
    let r = ok(
        &client,
        "revoke_user_token",
        json!({"id": "ou_sandbox_carol"}),
    )
    .await;
    assert_eq!(r["revoked"], true, "{r}");
    assert_eq!(r["session_id"], session.as_str(), "{r}");
    let st = ok(
        &client,
        "authorization_status",
        json!({"session_id": session}),
    )
    .await;
    assert_eq!(st["state"], "revoked", "{st}");
    assert_eq!(st["has_tokens"], false, "{st}");
    let e = err(
        &client,
        "get_user",
        json!({"id": "ou_sandbox_carol", "as_user": true}),
    )
    .await;
    assert!(
        e["error"].as_str().unwrap().contains("not authorized"),
        "{e}"
    );
    let e = err(
        &client,
        "revoke_user_token",
        json!({"id": "ou_sandbox_carol"}),
    )
    .await;
    assert_eq!(e["field"], "id", "{e}");

    // aPaaS: create, get, update, query with page tokens.
    let (ns, obj) = ("package_sandbox__c", "object_ticket");
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = ok(
            &client,
            "apaas_create_record",
            json!({"namespace": ns, "object": obj, "record": {"title": format!("t{i}"), "n": i}}),
        )
        .await;
        ids.push(r["id"].as_str().unwrap().to_owned());
    }
    let r = ok(
        &client,
        "apaas_get_record",
        json!({"namespace": ns, "object": obj, "id": ids[1], "select": ["title"]}),
    )
    .await;
    assert_eq!(r["found"], true);
    assert_eq!(r["item"]["title"], "t1");
    assert!(r["item"].get("n").is_none(), "select applies: {r}");
    ok(
        &client,
        "apaas_update_record",
        json!({"namespace": ns, "object": obj, "id": ids[1], "record": {"title": "changed"}}),
    )
    .await;
    let r = ok(
        &client,
        "apaas_get_record",
        json!({"namespace": ns, "object": obj, "id": ids[1]}),
    )
    .await;
    assert_eq!(r["item"]["title"], "changed");
    assert_eq!(r["item"]["n"], 1);
    let p1 = ok(
        &client,
        "apaas_query_records",
        json!({"namespace": ns, "object": obj, "select": ["title"], "page_size": 2}),
    )
    .await;
    assert_eq!(p1["items"].as_array().unwrap().len(), 2);
    assert_eq!(p1["has_more"], true);
    let token = p1["next_page_token"].as_str().unwrap();
    let p2 = ok(
        &client,
        "apaas_query_records",
        json!({"namespace": ns, "object": obj, "page_size": 2, "page_token": token}),
    )
    .await;
    assert_eq!(p2["items"].as_array().unwrap().len(), 1);
    assert_eq!(p2["has_more"], false);
    assert_eq!(p2["items"][0]["title"], "t2");
    let e = err(
        &client,
        "apaas_get_record",
        json!({"namespace": ns, "object": obj, "id": "missing"}),
    )
    .await;
    assert!(e["code"].is_i64(), "lark code carried: {e}");
    assert!(e["error"]
        .as_str()
        .unwrap()
        .contains("apaas_get_record failed"));
    // Ids that are dot segments cannot move the request to another path.
    for (field, args) in [
        ("id", json!({"namespace": ns, "object": obj, "id": ".."})),
        ("id", json!({"namespace": ns, "object": obj, "id": "."})),
        (
            "object",
            json!({"namespace": ns, "object": "..", "id": ids[0]}),
        ),
        (
            "namespace",
            json!({"namespace": "..", "object": obj, "id": ids[0]}),
        ),
    ] {
        let e = err(&client, "apaas_get_record", args).await;
        assert!(
            e["error"].as_str().unwrap().contains("not a valid id"),
            "{field}: {e}"
        );
    }

    client.cancel().await.unwrap();
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mcp_rejects_bad_params_naming_the_field() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let svc = Service::start(&sandbox).await;
    let client = svc.connect().await;

    let long = "x".repeat(257);
    let big = "x".repeat(150 * 1024 + 1);
    let cases = [
        (
            "send_message",
            json!({"receive_id_type": "open_id", "receive_id": "", "text": "hi"}),
            "receive_id",
        ),
        (
            "send_message",
            json!({"receive_id_type": "open_id", "receive_id": long, "text": "hi"}),
            "receive_id",
        ),
        (
            "send_message",
            json!({"receive_id_type": "phone", "receive_id": "ou_sandbox_alice", "text": "hi"}),
            "receive_id_type",
        ),
        (
            "send_message",
            json!({"receive_id_type": "open_id", "receive_id": "ou_sandbox_alice", "text": big}),
            "text",
        ),
        (
            "send_card",
            json!({"receive_id_type": "open_id", "receive_id": "ou_sandbox_alice", "card": [1, 2]}),
            "card",
        ),
        (
            "send_card",
            json!({"receive_id_type": "open_id", "receive_id": "ou_sandbox_alice", "card": "{}"}),
            "card",
        ),
        ("get_user", json!({"id": " "}), "id"),
        (
            "get_user",
            json!({"id": "ou_x", "id_type": "email", "as_user": true}),
            "id_type",
        ),
        (
            "apaas_create_record",
            json!({"namespace": "", "object": "o", "record": {}}),
            "namespace",
        ),
        (
            "apaas_update_record",
            json!({"namespace": "n", "object": "o", "id": "1", "record": 5}),
            "record",
        ),
        (
            "apaas_query_records",
            json!({"namespace": "n", "object": "o", "page_size": 0}),
            "page_size",
        ),
        (
            "request_user_authorization",
            json!({"id": "ou_sandbox_alice", "id_type": "chat_id"}),
            "id_type",
        ),
        (
            "authorization_status",
            json!({"session_id": ""}),
            "session_id",
        ),
    ];
    for (tool, args, field) in cases {
        let e = err(&client, tool, args).await;
        assert_eq!(e["field"], field, "{tool}: {e}");
        assert!(e["error"].as_str().unwrap().contains(field), "{tool}: {e}");
    }
    // Nothing reached the platform.
    assert!(sandbox.messages_for("ou_sandbox_alice").is_empty());

    client.cancel().await.unwrap();
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mcp_requires_the_bearer_token() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let svc = Service::start(&sandbox).await;
    let http = reqwest::Client::new();
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    for auth in [None, Some("Bearer wrong"), Some(MCP_TOKEN), Some("Bearer ")] {
        let mut req = http
            .post(svc.mcp_url())
            .header("accept", "application/json, text/event-stream")
            .json(&init);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401, "{auth:?}");
        assert_eq!(
            r.headers()
                .get("www-authenticate")
                .unwrap()
                .to_str()
                .unwrap(),
            "Bearer"
        );
    }
    // The right token gets through to MCP.
    let r = http
        .post(svc.mcp_url())
        .header("accept", "application/json, text/event-stream")
        .bearer_auth(MCP_TOKEN)
        .json(&init)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // The rest of the service is not behind the MCP token.
    let r = http
        .get(format!("http://{}/healthz", svc.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // An rmcp client with a wrong token cannot connect.
    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(svc.mcp_url()).auth_header("wrong"),
    );
    assert!(ClientConfig::default().serve(transport).await.is_err());
    svc.stop().await;
}

/// The MCP rate limit is keyed by bearer token and peer address, not by the MCP session id a
/// client chooses: opening new sessions does not escape it. A global cap bounds all clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mcp_rate_limit_follows_the_client_not_its_sessions() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let svc = Service::start_with(
        &sandbox,
        &[
            ("MCP_CLIENT_REQUESTS_PER_MINUTE", "4"),
            ("MCP_GLOBAL_REQUESTS_PER_MINUTE", "6"),
        ],
    )
    .await;
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let post = |client: &reqwest::Client, body: &Value, session: Option<&str>| {
        let mut r = client
            .post(svc.mcp_url())
            .header("accept", "application/json, text/event-stream")
            .bearer_auth(MCP_TOKEN)
            .json(body);
        if let Some(s) = session {
            r = r.header("mcp-session-id", s);
        }
        r.send()
    };
    let one = reqwest::Client::new();
    // One client opens two sessions (requests 1 and 2) ...
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let r = post(&one, &init, None).await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        sessions.push(r.headers()["mcp-session-id"].to_str().unwrap().to_owned());
    }
    // ... and uses the first (requests 3 and 4).
    for _ in 0..2 {
        let r = post(&one, &initialized, Some(&sessions[0])).await.unwrap();
        assert!(r.status().is_success(), "{}", r.status());
    }
    // Its 5th request is refused, though it names a session that has made one request.
    let r = post(&one, &initialized, Some(&sessions[1])).await.unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let r = post(&one, &init, None).await.unwrap();
    assert_eq!(r.status().as_u16(), 429, "a new session does not escape it");

    // Another client (another address) has its own allowance, up to the global cap (6).
    let other = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    for _ in 0..2 {
        let r = post(&other, &init, None).await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
    }
    let r = post(&other, &init, None).await.unwrap();
    assert_eq!(r.status().as_u16(), 429);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["message"].as_str().unwrap().contains("all MCP clients"),
        "{v}"
    );
    svc.stop().await;
}

/// Agents written for the earlier MCP deployment call `send_message(receive_id, msg_type,
/// content, receive_id_type)`, `get_user_info` and `health_check`: they work here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_earlier_deployments_tool_names_work() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let svc = Service::start(&sandbox).await;
    let client = svc.connect().await;
    // content as the JSON text of a text message, as that deployment sent it.
    let r = ok(
        &client,
        "send_message",
        json!({"receive_id": "ou_sandbox_alice", "receive_id_type": "open_id",
               "msg_type": "text", "content": "{\"text\":\"hello from an old agent\"}"}),
    )
    .await;
    assert!(r["message_id"].as_str().unwrap().starts_with("om_"));
    // content as plain text, msg_type left to its default.
    ok(
        &client,
        "send_message",
        json!({"receive_id": "ou_sandbox_alice", "receive_id_type": "open_id", "content": "plain"}),
    )
    .await;
    let msgs = sandbox.messages_for("ou_sandbox_alice");
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert_eq!(msgs[0].msg_type, "text");
    assert_eq!(msgs[0].content["text"], "hello from an old agent");
    assert_eq!(msgs[1].content["text"], "plain");
    // An interactive card through content.
    ok(
        &client,
        "send_message",
        json!({"receive_id": "ou_sandbox_alice", "receive_id_type": "open_id", "msg_type": "interactive",
               "content": {"elements": [{"tag": "markdown", "content": "a card"}]}}),
    )
    .await;
    let msgs = sandbox.messages_for("ou_sandbox_alice");
    assert_eq!(msgs.len(), 3);
    assert_eq!(msgs[2].msg_type, "interactive");
    assert!(msgs[2].content.to_string().contains("a card"), "{msgs:?}");
    // Bad combinations name the field.
    let e = err(
        &client,
        "send_message",
        json!({"receive_id": "ou_sandbox_alice", "receive_id_type": "open_id", "msg_type": "image", "content": "x"}),
    )
    .await;
    assert!(e.to_string().contains("msg_type"), "{e}");
    let e = err(
        &client,
        "send_message",
        json!({"receive_id": "ou_sandbox_alice", "receive_id_type": "open_id", "text": "a", "content": "b"}),
    )
    .await;
    assert!(e.to_string().contains("content"), "{e}");

    let u = ok(
        &client,
        "get_user_info",
        json!({"open_id": "ou_sandbox_alice"}),
    )
    .await;
    assert_eq!(u["open_id"], "ou_sandbox_alice", "{u}");
    let e = err(&client, "get_user_info", json!({})).await;
    assert!(e.to_string().contains("exactly one"), "{e}");

    let h = ok(&client, "health_check", json!({})).await;
    assert_eq!(h["status"], "ok", "{h}");
    assert!(h["store_schema_version"].as_u64().unwrap() >= 1, "{h}");
    svc.stop().await;
}

/// `get_chat_list` and `get_chat_members` (the earlier MCP deployment's tools) read the
/// sandbox's seeded chats through the client: pages follow `page_token`, an unknown chat or
/// one the bot is not in is a tool error with the platform's code, and `as_user` reads with
/// the user's own token (after the Authorize card when they have none).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_tools_list_chats_and_members() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let svc = Service::start(&sandbox).await;
    let client = svc.connect().await;
    let seeded = sandbox.chats();
    let bots: Vec<&str> = seeded
        .iter()
        .filter(|c| c.bot_member)
        .map(|c| c.chat_id.as_str())
        .collect();
    assert_eq!(bots.len(), 4, "{seeded:?}");

    // The bot's chats, three per page: two pages, in order, the second the last.
    let hits = sandbox.hits("chats");
    let p1 = ok(&client, "get_chat_list", json!({"page_size": 3})).await;
    assert_eq!(p1["source"], "bot", "{p1}");
    assert_eq!(p1["has_more"], true, "{p1}");
    let token = p1["page_token"].as_str().expect("a next page token");
    assert!(!token.is_empty());
    let p2 = ok(
        &client,
        "get_chat_list",
        json!({"page_size": 3, "page_token": token}),
    )
    .await;
    assert_eq!(p2["has_more"], false, "{p2}");
    assert_eq!(p2["page_token"], Value::Null, "{p2}");
    assert_eq!(sandbox.hits("chats"), hits + 2, "one request per page");
    let ids = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["chat_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let (a, b) = (ids(&p1), ids(&p2));
    assert_eq!((a.len(), b.len()), (3, 1), "{p1} {p2}");
    assert_eq!([a, b].concat(), bots, "every chat the bot is in, once");
    let partners = p2["items"][0].clone();
    assert_eq!(partners["chat_id"], "oc_sandbox_partners", "{p2}");
    assert_eq!(partners["name"], "Partners");
    assert_eq!(partners["external"], true);
    assert_eq!(partners["owner_id"], "ou_sandbox_alice");
    assert_eq!(partners["chat_status"], "normal");
    assert_eq!(partners["tenant_key"], "sandbox");
    // Without page_size: one page holds them all.
    let all = ok(&client, "get_chat_list", json!({})).await;
    assert_eq!(ids(&all), bots, "{all}");
    assert_eq!(all["has_more"], false);

    // A failing platform answer is retried as every other call is.
    sandbox.fail_next("chats", 503, 1);
    let again = ok(&client, "get_chat_list", json!({})).await;
    assert_eq!(ids(&again), bots, "{again}");

    // Members of a chat, by open_id (default) and by user_id.
    let m = ok(
        &client,
        "get_chat_members",
        json!({"chat_id": "oc_sandbox_eng"}),
    )
    .await;
    assert_eq!(m["member_total"], 2, "{m}");
    assert_eq!(m["chat_id"], "oc_sandbox_eng");
    let members: Vec<&str> = m["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["member_id"].as_str().unwrap())
        .collect();
    assert_eq!(members, ["ou_sandbox_alice", "ou_sandbox_bob"], "{m}");
    assert_eq!(m["items"][1]["name"], "Bob (sandbox)");
    assert_eq!(m["items"][1]["member_id_type"], "open_id");
    let m = ok(
        &client,
        "get_chat_members",
        json!({"chat_id": "oc_sandbox_ops", "member_id_type": "user_id"}),
    )
    .await;
    assert_eq!(m["items"][0]["member_id"], "sandbox_bob", "{m}");
    assert_eq!(m["items"][1]["member_id"], "sandbox_carol", "{m}");
    // Members page too.
    let m1 = ok(
        &client,
        "get_chat_members",
        json!({"chat_id": "oc_sandbox_general", "page_size": 2}),
    )
    .await;
    assert_eq!(m1["member_total"], 3, "{m1}");
    assert_eq!(m1["items"].as_array().unwrap().len(), 2);
    assert_eq!(m1["has_more"], true);
    let m2 = ok(
        &client,
        "get_chat_members",
        json!({"chat_id": "oc_sandbox_general", "page_size": 2, "page_token": m1["page_token"]}),
    )
    .await;
    assert_eq!(m2["has_more"], false, "{m2}");
    assert_eq!(m2["items"][0]["member_id"], "ou_sandbox_carol", "{m2}");

    // An unknown chat, and a chat the bot is not in: tool errors with the platform's code.
    let e = err(
        &client,
        "get_chat_members",
        json!({"chat_id": "oc_no_such_chat"}),
    )
    .await;
    assert_eq!(e["code"], lark_service::sandbox::CODE_CHAT_NOT_FOUND, "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .starts_with("get_chat_members failed"),
        "{e}"
    );
    let e = err(
        &client,
        "get_chat_members",
        json!({"chat_id": "oc_sandbox_private"}),
    )
    .await;
    assert_eq!(e["code"], lark_service::sandbox::CODE_NOT_IN_CHAT, "{e}");
    // Bad arguments name the field, before any call.
    let before = sandbox.hits("chats");
    for (tool, args, field) in [
        ("get_chat_list", json!({"page_size": 0}), "page_size"),
        ("get_chat_list", json!({"page_size": 101}), "page_size"),
        ("get_chat_list", json!({"page_token": ""}), "page_token"),
        ("get_chat_list", json!({"as_user": ""}), "as_user"),
        (
            "get_chat_list",
            json!({"as_user": "ou_sandbox_alice", "as_user_id_type": "email"}),
            "as_user_id_type",
        ),
        ("get_chat_members", json!({"chat_id": ""}), "chat_id"),
        ("get_chat_members", json!({"chat_id": ".."}), "chat_id"),
        (
            "get_chat_members",
            json!({"chat_id": "oc_sandbox_eng", "member_id_type": "email"}),
            "member_id_type",
        ),
    ] {
        let e = err(&client, tool, args.clone()).await;
        assert_eq!(e["field"], field, "{tool} {args}: {e}");
    }
    assert_eq!(sandbox.hits("chats"), before, "no call for bad arguments");

    // as_user before Alice authorized: the Authorize card is sent and the tool says so.
    let cards = sandbox.messages_for("ou_sandbox_alice").len();
    let e = err(
        &client,
        "get_chat_list",
        json!({"as_user": "ou_sandbox_alice"}),
    )
    .await;
    assert_eq!(e["authorization_requested"], true, "{e}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .starts_with("user has not authorized: an Authorize card was sent to them"),
        "{e}"
    );
    assert_eq!(
        sandbox.hits("chats"),
        before,
        "no chat call without a token"
    );
    let sent = sandbox.messages_for("ou_sandbox_alice");
    assert_eq!(sent.len(), cards + 1);
    let authorize = find_string(&sent.last().unwrap().content, &|s| {
        s.contains("/open-apis/authen/v1/authorize?")
    })
    .expect("the card carries the authorize URL")
    .to_owned();
    let redirect = sandbox.approve(&authorize, "ou_sandbox_alice").unwrap();
    assert_eq!(
        reqwest::get(&redirect).await.unwrap().status().as_u16(),
        200
    );

    // With her token: her chats, among them one the bot is not in, and not Operations.
    let mine = ok(
        &client,
        "get_chat_list",
        json!({"as_user": "ou_sandbox_alice"}),
    )
    .await;
    assert_eq!(mine["source"], "user_token", "{mine}");
    let alice: Vec<&str> = seeded
        .iter()
        .filter(|c| c.members.iter().any(|m| m == "ou_sandbox_alice"))
        .map(|c| c.chat_id.as_str())
        .collect();
    assert_eq!(ids(&mine), alice, "{mine}");
    assert!(ids(&mine).contains(&"oc_sandbox_private".to_owned()));
    assert!(!ids(&mine).contains(&"oc_sandbox_ops".to_owned()));
    // By user_id too, and the members of the chat only she (not the bot) can read.
    let mine2 = ok(
        &client,
        "get_chat_list",
        json!({"as_user": "sandbox_alice", "as_user_id_type": "user_id"}),
    )
    .await;
    assert_eq!(ids(&mine2), alice, "{mine2}");
    let m = ok(
        &client,
        "get_chat_members",
        json!({"chat_id": "oc_sandbox_private", "as_user": "ou_sandbox_alice"}),
    )
    .await;
    assert_eq!(m["source"], "user_token", "{m}");
    assert_eq!(m["member_total"], 2, "{m}");
    assert_eq!(m["items"][1]["member_id"], "ou_sandbox_carol", "{m}");
    // She is not in Operations: as her, that is the platform's "not in the chat".
    let e = err(
        &client,
        "get_chat_members",
        json!({"chat_id": "oc_sandbox_ops", "as_user": "ou_sandbox_alice"}),
    )
    .await;
    assert_eq!(e["code"], lark_service::sandbox::CODE_NOT_IN_CHAT, "{e}");
    assert!(
        !mine.to_string().contains("eyJsandbox"),
        "no tokens: {mine}"
    );
    svc.stop().await;
}

/// The official Python MCP SDK (PyPI `mcp`, run from `LARK_MCP_PYTHON`, which `.ci/run` sets
/// up) initializes, lists the tools, calls `get_user` and the chat tools (paging, an unknown
/// chat) and ends its session without a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_python_mcp_sdk_client_works_end_to_end() {
    let Some(python) = std::env::var_os("LARK_MCP_PYTHON") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must set LARK_MCP_PYTHON (a Python with the `mcp` package)"
        );
        eprintln!("LARK_MCP_PYTHON is not set: the Python MCP SDK check did not run");
        return;
    };
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let svc = Service::start(&sandbox).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mcp/python_client.py");
    let url = svc.mcp_url();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .arg(url)
            .arg(MCP_TOKEN)
            .arg("ou_sandbox_alice")
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python_client.py failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["server"], "lark-service");
    let tools: Vec<&str> = v["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    for t in ["send_message", "get_user", "request_user_authorization"] {
        assert!(tools.contains(&t), "{t} missing from {tools:?}");
    }
    assert_eq!(v["get_user_error"], false, "{v}");
    assert!(
        v["get_user"].to_string().contains("ou_sandbox_alice"),
        "{v}"
    );
    // The chat tools: two pages of one chat each, that chat's members, an unknown chat.
    for t in ["get_chat_list", "get_chat_members"] {
        assert!(tools.contains(&t), "{t} missing from {tools:?}");
    }
    assert_eq!(v["chat_list_error"], false, "{v}");
    let first = &v["chat_list"][0];
    assert_eq!(first["items"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(first["items"][0]["chat_id"], "oc_sandbox_general", "{v}");
    assert_eq!(first["has_more"], true, "{v}");
    assert_eq!(v["chat_list_2_error"], false, "{v}");
    assert_eq!(
        v["chat_list_2"][0]["items"][0]["chat_id"], "oc_sandbox_eng",
        "the second page follows the first: {v}"
    );
    assert_eq!(v["chat_members_error"], false, "{v}");
    assert_eq!(v["chat_members"][0]["member_total"], 3, "{v}");
    assert_eq!(
        v["chat_members"][0]["items"][0]["member_id"], "ou_sandbox_alice",
        "{v}"
    );
    assert_eq!(v["unknown_chat_error"], true, "{v}");
    assert_eq!(
        v["unknown_chat"][0]["code"],
        lark_service::sandbox::CODE_CHAT_NOT_FOUND,
        "{v}"
    );
    assert_eq!(v["warnings"], json!([]), "the SDK logged warnings: {v}");
    svc.stop().await;
}

/// Ending a session with DELETE answers 204 (the Python MCP SDK expects 200 or 204), and the
/// session is gone afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mcp_session_termination_answers_no_content() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let svc = Service::start(&sandbox).await;
    let client = reqwest::Client::new();
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    let r = client
        .post(svc.mcp_url())
        .header("accept", "application/json, text/event-stream")
        .bearer_auth(MCP_TOKEN)
        .json(&init)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let session = r.headers()["mcp-session-id"].to_str().unwrap().to_owned();
    let delete = || {
        client
            .delete(svc.mcp_url())
            .bearer_auth(MCP_TOKEN)
            .header("mcp-session-id", &session)
            .send()
    };
    let r = delete().await.unwrap();
    assert_eq!(r.status().as_u16(), 204);
    // The session no longer exists: using it again is refused.
    let r = client
        .post(svc.mcp_url())
        .header("accept", "application/json, text/event-stream")
        .bearer_auth(MCP_TOKEN)
        .header("mcp-session-id", &session)
        .json(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
    // Without the bearer token, DELETE is refused like every other request.
    let r = client
        .delete(svc.mcp_url())
        .header("mcp-session-id", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_mcp_endpoint_without_a_token() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ha = http.local_addr().unwrap();
    let aa = admin.local_addr().unwrap();
    let cfg_file = dir.path().join("config.toml");
    std::fs::write(&cfg_file, "").unwrap();
    let env: HashMap<String, String> = [
        ("APP_ID", APP_ID.to_owned()),
        ("APP_SECRET", APP_SECRET.to_owned()),
        ("LARK_TOKEN_ENCRYPTION_KEY", KEY.to_owned()),
        ("WEBSOCKET_ENABLED", "false".to_owned()),
        ("LARK_DOMAIN", sandbox.base_url()),
        (
            "STORAGE_PATH",
            dir.path().join("s.redb").display().to_string(),
        ),
        ("AUTH_REDIRECT_URI", format!("http://{ha}/oauth/callback")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let cfg = Config::load_with(
        &LoadOptions {
            config_path: Some(cfg_file),
            overrides: vec![],
        },
        &env,
    )
    .unwrap();
    assert!(cfg.mcp_token.is_none());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        run(
            cfg,
            Listeners {
                http,
                admin,
                metrics: None,
            },
            async move {
                let _ = rx.await;
            },
        )
        .await
        .unwrap();
    });
    let client = reqwest::Client::new();
    for addr in [aa, ha] {
        let mut status = 0;
        for _ in 0..400 {
            if let Ok(r) = client
                .post(format!("http://{addr}/mcp"))
                .body("{}")
                .send()
                .await
            {
                status = r.status().as_u16();
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(status, 404, "{addr}");
    }
    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(25), task)
        .await
        .unwrap()
        .unwrap();
}

/// `lark-service mcp --stdio`: the same tools over standard input/output of the binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mcp_over_stdio() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg_file = dir.path().join("config.toml");
    std::fs::write(&cfg_file, "").unwrap();
    // std::process with the pipes wrapped as tokio files (the tokio `process` feature is off).
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lark-service"))
        .args(["--config", cfg_file.to_str().unwrap(), "mcp", "--stdio"])
        .env_clear()
        .env("APP_ID", APP_ID)
        .env("APP_SECRET", APP_SECRET)
        .env("LARK_TOKEN_ENCRYPTION_KEY", KEY)
        .env("LARK_DOMAIN", sandbox.base_url())
        .env("TLS_CA_FILE", {
            let ca = dir.path().join("sandbox-ca.pem");
            std::fs::write(&ca, sandbox.ca_pem().unwrap()).unwrap();
            ca
        })
        .env("STORAGE_PATH", dir.path().join("s.redb"))
        .env("AUTH_REDIRECT_URI", "http://127.0.0.1:9/oauth/callback")
        .env("LOG_LEVEL", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = tokio::fs::File::from_std(std::fs::File::from(std::os::fd::OwnedFd::from(
        child.stdin.take().unwrap(),
    )));
    let stdout = tokio::fs::File::from_std(std::fs::File::from(std::os::fd::OwnedFd::from(
        child.stdout.take().unwrap(),
    )));
    let client = tokio::time::timeout(
        Duration::from_secs(30),
        ClientConfig::default().serve((stdout, stdin)),
    )
    .await
    .expect("stdio server answers initialize")
    .unwrap();
    let tools = client.list_all_tools().await.unwrap();
    for name in TOOLS {
        assert!(tools.iter().any(|t| t.name == *name), "{name} over stdio");
    }
    ok(
        &client,
        "send_message",
        json!({"receive_id_type": "chat_id", "receive_id": "oc_sandbox", "text": "over stdio"}),
    )
    .await;
    assert!(sandbox
        .messages()
        .iter()
        .any(|m| m.receive_id == "oc_sandbox" && m.content["text"] == "over stdio"));
    client.cancel().await.unwrap();
    // Closing stdin ends the server.
    let mut status = None;
    for _ in 0..400 {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    match status {
        Some(s) => assert!(s.success(), "{s}"),
        None => {
            let _ = child.kill();
            panic!("the stdio server did not exit when its client went");
        }
    }
}

fn find_string<'a>(v: &'a Value, pred: &dyn Fn(&str) -> bool) -> Option<&'a str> {
    match v {
        Value::String(s) if pred(s) => Some(s),
        Value::Object(m) => m.values().find_map(|x| find_string(x, pred)),
        Value::Array(a) => a.iter().find_map(|x| find_string(x, pred)),
        _ => None,
    }
}
