//! The real network path: the sandbox serves HTTPS and WSS like the platform, and the service
//! reaches it only through its trust settings (and a proxy, when one is set).
//!
//! - the release binary dials `wss://` on the TLS sandbox and handles an event;
//! - a certificate from a CA the service does not trust is refused on both paths, and `/readyz`
//!   says why, naming the host and how to add a CA;
//! - through an HTTP CONNECT proxy (with credentials) the proxy sees a tunnel to the OpenAPI host
//!   and one to the long-connection host, and an authorization completes; `NO_PROXY` exempts;
//! - plain `http://` / `ws://` still works when asked for explicitly.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use lark_service::net::{dial_websocket, DialError, Net, NetOptions, TrustOptions};
use lark_service::sandbox::{Sandbox, SandboxOptions, APP_ID, APP_SECRET};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_lark-service");
/// The proxy's password: a sentinel CI greps the test log for.
const PROXY_PASSWORD: &str = "proxy-pw-5e171ne1";

/// A CA nobody configured: certificates from it must be refused.
fn stranger_ca_pem() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.self_signed(&key).unwrap().pem()
}

fn message_event(open_id: &str, message_id: &str, text: &str) -> Value {
    json!({
        "sender": {"sender_id": {"open_id": open_id, "user_id": open_id.replace("ou_", ""), "union_id": "on_x"}, "sender_type": "user", "tenant_key": "sandbox"},
        "message": {"message_id": message_id, "chat_id": "oc_p2p", "chat_type": "p2p", "message_type": "text", "content": json!({"text": text}).to_string(), "create_time": "1"}
    })
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn poll<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..800 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("not reached: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_release_binary_dials_wss_on_the_tls_sandbox_and_handles_an_event() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    assert!(sandbox.base_url().starts_with("https://"));
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("sandbox-ca.pem");
    std::fs::write(&ca, sandbox.ca_pem().unwrap()).unwrap();
    let port = free_port();
    let child = Command::new(BIN)
        .current_dir(dir.path())
        .env_clear()
        .env("APP_ID", APP_ID)
        .env("APP_SECRET", APP_SECRET)
        .env("LARK_DOMAIN", sandbox.base_url())
        .env("TLS_CA_FILE", &ca)
        .env("LARK_TOKEN_ENCRYPTION_KEY", KEY)
        .env("LARK_SERVICE_ADMIN_TOKEN", ADMIN)
        .env("STORAGE_PATH", dir.path().join("s.redb"))
        .env("HTTP_LISTEN", format!("127.0.0.1:{port}"))
        .env("ADMIN_LISTEN", "127.0.0.1:0")
        .env(
            "AUTH_REDIRECT_URI",
            format!("http://127.0.0.1:{port}/oauth/callback"),
        )
        .env("PROMETHEUS_PORT", "0")
        .env("LOG_LEVEL", "warn")
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let _child = Proc(child);
    let http = reqwest::Client::new();
    poll("the long connection is up over wss://", || async {
        sandbox.connections() == 1
    })
    .await;
    poll("ready", || async {
        http.get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().as_u16() == 200)
    })
    .await;
    let frame = sandbox
        .push_event(
            "im.message.receive_v1",
            message_event("ou_sandbox_alice", "om_tls_1", "/authorize"),
            lark_service::sandbox::PushOpts::default(),
        )
        .unwrap();
    poll("the event is ACKed", || async {
        sandbox.acks().iter().any(|a| a.message_id == frame)
    })
    .await;
    let ack = sandbox
        .acks()
        .into_iter()
        .find(|a| a.message_id == frame)
        .unwrap();
    assert_eq!(ack.code, 200);
    poll("the Authorize card is sent over HTTPS", || async {
        sandbox.messages_for("ou_sandbox_alice").len() == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_an_untrusted_ca_is_refused_and_readyz_says_why() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    // The service trusts some company CA, but not the one that signed the sandbox.
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("company-ca.pem");
    std::fs::write(&other, stranger_ca_pem()).unwrap();
    let other_text = other.display().to_string();
    let svc = Service::start_with(
        dir,
        &sandbox.base_url(),
        &[
            ("TLS_CA_FILE", &other_text),
            ("WEBSOCKET_FALLBACK_TO_HTTP", "false"),
        ],
    )
    .await;
    let last = Arc::new(Mutex::new(String::new()));
    poll("readyz names the untrusted certificate", || {
        let (svc, last) = (&svc, last.clone());
        async move {
            let (code, body) = svc.public_get("/readyz").await;
            let hit = code == 503 && body.contains("not trusted");
            *last.lock().unwrap() = body;
            hit
        }
    })
    .await;
    let last = last.lock().unwrap().clone();
    assert!(last.contains("127.0.0.1"), "names the host: {last}");
    assert!(last.contains("tls.ca_file"), "says how to add a CA: {last}");
    // Nothing got past TLS: no token was issued, no socket opened.
    assert_eq!(sandbox.hits("tenant_token"), 0);
    assert_eq!(sandbox.hits("ws_endpoint"), 0);
    assert_eq!(sandbox.connections(), 0);

    // The long connection's own dial refuses the same way.
    let opts = NetOptions {
        trust: TrustOptions {
            ca_files: vec![other.clone()],
            ca_dirs: vec![],
        },
        ..NetOptions::default()
    };
    let net = Net::new(&opts).unwrap();
    let port = sandbox.base_url().rsplit(':').next().unwrap().to_owned();
    let err = dial_websocket(&net, &format!("wss://localhost:{port}/ws"))
        .await
        .map(|_| ())
        .unwrap_err();
    match &err {
        DialError::Untrusted(msg) => {
            assert!(
                msg.contains("localhost") && msg.contains("tls.ca_file"),
                "{msg}"
            );
        }
        other => panic!("expected an untrusted-certificate error, got {other}"),
    }
    assert_eq!(sandbox.hits("ws_connect"), 0);
    svc.stop().await;
}

/// A small HTTP CONNECT proxy that requires credentials and records every tunnel.
struct ConnectProxy {
    addr: SocketAddr,
    /// `host:port` of each tunnel opened, in order.
    tunnels: Arc<Mutex<Vec<String>>>,
    /// Requests refused for missing or wrong credentials.
    refused: Arc<Mutex<u32>>,
}

impl ConnectProxy {
    async fn start(user: &'static str, password: &'static str) -> Self {
        use base64::Engine as _;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tunnels = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(0));
        let want = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let (t, r) = (tunnels.clone(), refused.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut c, _)) = listener.accept().await else {
                    return;
                };
                let (t, r, want) = (t.clone(), r.clone(), want.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if c.read(&mut b).await.unwrap_or(0) == 0 || head.len() > 8192 {
                            return;
                        }
                        head.push(b[0]);
                    }
                    let text = String::from_utf8_lossy(&head).into_owned();
                    let mut lines = text.lines();
                    let first: Vec<&str> = lines.next().unwrap_or("").split(' ').collect();
                    let headers: HashMap<String, String> = lines
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                        .collect();
                    if first.first() != Some(&"CONNECT") || first.len() < 2 {
                        let _ = c
                            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                            .await;
                        return;
                    }
                    if headers.get("proxy-authorization") != Some(&want) {
                        *r.lock().unwrap() += 1;
                        let _ = c
                            .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\n\r\n")
                            .await;
                        return;
                    }
                    let target = first[1].to_owned();
                    let Ok(mut up) = TcpStream::connect(target.as_str()).await else {
                        let _ = c.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                        return;
                    };
                    t.lock().unwrap().push(target);
                    if c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut up).await;
                });
            }
        });
        Self {
            addr,
            tunnels,
            refused,
        }
    }

    fn tunnels(&self) -> Vec<String> {
        self.tunnels.lock().unwrap().clone()
    }
}

/// Request → card → approve → redirect → token, through whatever network `svc` uses.
async fn authorize_alice(svc: &Service, sandbox: &Sandbox) {
    let (status, body) = svc
        .post(
            "/api/v1/auth/requests",
            json!({"open_id": "ou_sandbox_alice"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let card = sandbox.messages_for("ou_sandbox_alice").remove(0);
    let authorize = find_string(&card.content, &|s| {
        s.contains("/open-apis/authen/v1/authorize?")
    })
    .unwrap()
    .to_owned();
    let redirect = sandbox.approve(&authorize, "ou_sandbox_alice").unwrap();
    let page = svc.client.get(&redirect).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let (code, tok) = svc.get("/api/v1/users/ou_sandbox_alice/token").await;
    assert_eq!(code, 200, "{tok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_connect_proxy_both_hosts_are_tunnelled_and_the_flow_completes() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let proxy = ConnectProxy::start("lark", PROXY_PASSWORD).await;
    let proxy_url = format!("http://lark:{PROXY_PASSWORD}@{}", proxy.addr);
    let svc = Service::start(&sandbox, &[("HTTPS_PROXY", &proxy_url)]).await;
    svc.wait_for_within(Duration::from_secs(20), || async {
        sandbox.connections() == 1
    })
    .await;
    authorize_alice(&svc, &sandbox).await;
    let port = sandbox.base_url().rsplit(':').next().unwrap().to_owned();
    let tunnels = proxy.tunnels();
    assert!(
        tunnels.contains(&format!("127.0.0.1:{port}")),
        "the OpenAPI host went through the proxy: {tunnels:?}"
    );
    assert!(
        tunnels.contains(&format!("localhost:{port}")),
        "the long-connection host went through the proxy: {tunnels:?}"
    );
    assert_eq!(
        *proxy.refused.lock().unwrap(),
        0,
        "every tunnel carried the credentials"
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_exempts_a_host_and_wrong_proxy_credentials_are_refused() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let proxy = ConnectProxy::start("lark", PROXY_PASSWORD).await;
    let proxy_url = format!("http://lark:{PROXY_PASSWORD}@{}", proxy.addr);
    // The long-connection host bypasses the proxy; the OpenAPI host does not.
    let svc = Service::start(
        &sandbox,
        &[("HTTPS_PROXY", &proxy_url), ("NO_PROXY", "localhost")],
    )
    .await;
    svc.wait_for_within(Duration::from_secs(20), || async {
        sandbox.connections() == 1
    })
    .await;
    authorize_alice(&svc, &sandbox).await;
    let tunnels = proxy.tunnels();
    assert!(!tunnels.is_empty());
    assert!(
        tunnels.iter().all(|t| t.starts_with("127.0.0.1:")),
        "NO_PROXY=localhost keeps the long connection direct: {tunnels:?}"
    );
    svc.stop().await;

    // Wrong credentials: the proxy refuses, nothing reaches the platform, readyz says so.
    let bad = format!("http://lark:not-the-password@{}", proxy.addr);
    let hits_before = sandbox.hits("tenant_token");
    let svc = Service::start(
        &sandbox,
        &[
            ("HTTPS_PROXY", &bad),
            ("WEBSOCKET_FALLBACK_TO_HTTP", "false"),
        ],
    )
    .await;
    svc.wait_for(|| async { *proxy.refused.lock().unwrap() > 0 })
        .await;
    let (code, body) = svc.public_get("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(!body.contains("not-the-password"), "{body}");
    assert_eq!(sandbox.hits("tenant_token"), hits_before);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_and_ws_still_work_when_asked_for() {
    let sandbox = Sandbox::start(SandboxOptions {
        tls: false,
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    assert!(sandbox.base_url().starts_with("http://"));
    assert!(sandbox.ca_pem().is_none());
    let svc = Service::start(&sandbox, &[]).await;
    svc.wait_for(|| async { sandbox.connections() == 1 }).await;
    authorize_alice(&svc, &sandbox).await;
    svc.stop().await;
}
