//! The sandbox platform driven by our own clients: the OpenAPI client (`lark::LarkClient`) for
//! tokens, OAuth, user info, contact, IM and aPaaS, and a raw WebSocket client built from the
//! long-connection codec (`longconn::protocol`, `longconn::reassembly`) for discovery, pings,
//! fragmented events, ACKs, card actions and redelivery.
//!
//! Waits are bounded polls on sandbox state; nothing asserts on wall-clock durations.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use lark_service::lark::error::OAuthErrorKind;
use lark_service::lark::oauth::{parse_redirect_query, OFFLINE_ACCESS};
use lark_service::lark::{
    AuthorizeParams, Domain, LarkClient, LarkConfig, Pkce, Receiver, RecordQuery, RetryPolicy,
    TableQuery, UserIdType,
};
use lark_service::longconn::protocol::{
    build_ack, encode_ping, parse_pong_config, AckResponse, ConnParams, Frame, FrameKind,
};
use lark_service::longconn::reassembly::{Pushed, Reassembler, ReassemblyLimits};
use lark_service::longconn::reconnect::{
    classify_discovery_code, parse_discovery_response, FailureClass,
};
use lark_service::sandbox::{PushOpts, Sandbox, SandboxOptions, APP_ID, APP_SECRET};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const ALICE: &str = "ou_sandbox_alice";
const BOB: &str = "ou_sandbox_bob";
const REDIRECT: &str = "http://127.0.0.1:9/oauth/callback";
/// Upper bound for every wait on the sandbox; a failing test fails after this, a passing
/// one is done as soon as the condition holds.
const PATIENCE: Duration = Duration::from_secs(10);

async fn sandbox() -> Sandbox {
    sandbox_with(SandboxOptions::default()).await
}

async fn sandbox_with(opts: SandboxOptions) -> Sandbox {
    Sandbox::start(opts).await.expect("sandbox starts")
}

/// The sandbox's CA trusted the way an operator trusts a company CA (a CA file).
fn net(sb: &Sandbox) -> lark_service::net::Net {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), sb.ca_pem().expect("the sandbox serves TLS")).unwrap();
    lark_service::net::Net::new(&lark_service::net::NetOptions {
        trust: lark_service::net::TrustOptions {
            ca_files: vec![f.path().to_owned()],
            ca_dirs: vec![],
        },
        ..lark_service::net::NetOptions::default()
    })
    .unwrap()
}

/// A plain HTTP client (no redirects followed) that trusts the sandbox.
fn http(sb: &Sandbox) -> reqwest::Client {
    net(sb)
        .http_client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn client_with(sb: &Sandbox, secret: &str, retry: RetryPolicy) -> LarkClient {
    let mut cfg = LarkConfig::new(
        Domain::Custom(sb.base_url().parse().unwrap()),
        sb.app_id(),
        SecretString::from(secret.to_owned()),
    );
    cfg.retry = retry;
    cfg.net = Some(net(sb));
    LarkClient::new(cfg).unwrap()
}

fn client(sb: &Sandbox) -> LarkClient {
    let retry = RetryPolicy {
        base: Duration::from_millis(10),
        cap: Duration::from_millis(50),
        ..RetryPolicy::default()
    };
    client_with(sb, sb.app_secret(), retry)
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An authorize URL with PKCE and `offline_access`, and the verifier.
fn authorize(c: &LarkClient, state: &str) -> (String, Pkce) {
    let pkce = Pkce::generate();
    let url = c
        .authorize_url(&AuthorizeParams {
            redirect_uri: REDIRECT,
            scopes: &["contact:user.base:readonly", OFFLINE_ACCESS],
            state,
            code_challenge: Some(&pkce.challenge),
            force_consent: false,
        })
        .unwrap();
    (url.to_string(), pkce)
}

fn query_of(url: &str) -> String {
    url::Url::parse(url)
        .unwrap()
        .query()
        .unwrap_or("")
        .to_owned()
}

/// What a browser does on the authorize page: GET it, submit its form with the chosen user
/// and button, and return the `Location` the sandbox redirects to.
async fn browser_decide(sb: &Sandbox, authorize_url: &str, user: &str, decision: &str) -> String {
    let http = http(sb);
    let page = http
        .get(authorize_url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("Approve") && page.contains("Reject"),
        "{page}"
    );
    assert!(page.contains("Alice") && page.contains("Bob"), "{page}");
    // The form's action and hidden inputs, as a browser would read them.
    let action = between(&page, "<form method=post action=\"", "\"").expect("form action");
    let mut form: Vec<(String, String)> = Vec::new();
    let mut rest = page.as_str();
    while let Some(i) = rest.find("<input type=hidden name=\"") {
        rest = &rest[i..];
        let name = between(rest, "name=\"", "\"").unwrap();
        let value = between(rest, "value=\"", "\"").unwrap();
        form.push((unescape(&name), unescape(&value)));
        rest = &rest[1..];
    }
    form.push(("sandbox_user".into(), user.into()));
    form.push(("decision".into(), decision.into()));
    let base = url::Url::parse(authorize_url).unwrap();
    let resp = http
        .post(base.join(&action).unwrap())
        .form(&form)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_redirection(), "{}", resp.status());
    resp.headers()["location"].to_str().unwrap().to_owned()
}

fn between(s: &str, start: &str, end: &str) -> Option<String> {
    let i = s.find(start)? + start.len();
    let j = s[i..].find(end)?;
    Some(s[i..i + j].to_owned())
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Alice authorizes through the sandbox and the code is exchanged: her tokens.
async fn alice_token(sb: &Sandbox, c: &LarkClient) -> lark_service::lark::UserToken {
    let (url, pkce) = authorize(c, "st-helper");
    let redirect = sb.approve(&url, ALICE).unwrap();
    let code = parse_redirect_query(&query_of(&redirect)).unwrap();
    c.exchange_code(&code.code, REDIRECT, Some(&pkce.verifier))
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tokens and discovery
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn tenant_token_is_cached_and_a_wrong_secret_is_refused() {
    let sb = sandbox().await;
    assert_eq!(sb.app_id(), APP_ID);
    assert_eq!(sb.app_secret(), APP_SECRET);
    assert_eq!(sb.users().len(), 3);
    let c = client(&sb);
    let t1 = c.tenant_token().await.unwrap();
    let t2 = c.tenant_token().await.unwrap();
    assert_eq!(t1.expose_secret(), t2.expose_secret());
    let bob = c.contact_user(BOB, UserIdType::OpenId).await.unwrap();
    assert_eq!(bob.open_id.as_deref(), Some(BOB));
    assert_eq!(sb.hits("tenant_token"), 1, "exactly one token request");
    assert_eq!(sb.hits("contact"), 1);

    // A second client gets the same platform token while it has ≥ 30 min left (§4.1).
    let other = client(&sb).tenant_token().await.unwrap();
    assert_eq!(other.expose_secret(), t1.expose_secret());

    // The platform drops its tokens: the client re-fetches once by itself and succeeds.
    sb.expire_tenant_tokens();
    c.contact_user(ALICE, UserIdType::OpenId).await.unwrap();
    assert_eq!(sb.hits("tenant_token"), 3);

    let bad = client_with(&sb, "not-the-secret", RetryPolicy::no_retry());
    let err = bad.tenant_token().await.unwrap_err();
    assert_eq!(err.code(), Some(10014), "{err}");
}

#[tokio::test]
async fn discovery_returns_a_dialable_url_and_fatal_codes_for_bad_credentials() {
    let sb = sandbox().await;
    let http = http(&sb);
    let discover = |secret: &'static str| {
        http.post(format!("{}/callback/ws/endpoint", sb.base_url()))
            .json(&json!({"AppID": APP_ID, "AppSecret": secret}))
            .send()
    };
    let resp = discover(APP_SECRET).await.unwrap();
    let ep = parse_discovery_response(resp.status().as_u16(), &resp.bytes().await.unwrap())
        .expect("discovery succeeds");
    // TLS like the platform, on a second host name (as msg-frontier is beside open).
    let port = sb.base_url().rsplit(':').next().unwrap().to_owned();
    assert!(
        ep.url.starts_with(&format!("wss://localhost:{port}/ws?")),
        "{}",
        ep.url
    );
    let params = ConnParams::from_url(&ep.url).unwrap();
    assert!(params.device_id.is_some());
    for key in ["access_key=", "ticket=", "service_id="] {
        assert!(ep.url.contains(key), "{key}");
    }

    let resp = discover("wrong").await.unwrap();
    let err =
        parse_discovery_response(resp.status().as_u16(), &resp.bytes().await.unwrap()).unwrap_err();
    assert_eq!(err.code, Some(514));
    assert_eq!(err.class, FailureClass::Fatal);

    sb.set_discovery_error(Some(1_000_040_343));
    let body: Value = discover(APP_SECRET).await.unwrap().json().await.unwrap();
    assert_eq!(
        classify_discovery_code(body["code"].as_i64().unwrap()),
        Some(FailureClass::Retry)
    );
    sb.set_discovery_error(None);
    assert_eq!(sb.hits("ws_endpoint"), 3);
}

#[tokio::test]
async fn injected_5xx_and_429_storms_are_retried_and_counted() {
    let sb = sandbox().await;
    let c = client(&sb);
    sb.fail_next("tenant_token", 503, 2);
    c.tenant_token().await.unwrap();
    assert_eq!(sb.hits("tenant_token"), 3);

    sb.fail_next("im", 429, 1);
    c.send_text(&Receiver::open_id(ALICE), "hello")
        .await
        .unwrap();
    assert_eq!(sb.hits("im"), 2);
    assert_eq!(
        sb.messages_for(ALICE).len(),
        1,
        "the retried send is stored once"
    );

    // More failures than attempts: the caller sees the platform's status and code.
    let once = client_with(&sb, APP_SECRET, RetryPolicy::no_retry());
    sb.fail_next("contact", 500, 1);
    let err = once
        .contact_user(ALICE, UserIdType::OpenId)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(500), "{err}");
    assert!(err.is_transient());

    // A business code without an HTTP error.
    sb.fail_next_code("contact", 99_991_672, 1);
    let err = once
        .contact_user(ALICE, UserIdType::OpenId)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(99_991_672), "{err}");
}

// ---------------------------------------------------------------------------------------------
// OAuth
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn oauth_approve_exchange_user_info_refresh_rotation() {
    let sb = sandbox().await;
    let c = client(&sb);
    let (url, pkce) = authorize(&c, "state-1");

    // Through the HTML page, as a browser would.
    let redirect = browser_decide(&sb, &url, ALICE, "approve").await;
    assert!(redirect.starts_with(REDIRECT), "{redirect}");
    let code = parse_redirect_query(&query_of(&redirect)).unwrap();
    assert_eq!(code.state, "state-1");

    let token = c
        .exchange_code(&code.code, REDIRECT, Some(&pkce.verifier))
        .await
        .unwrap();
    assert!(token.scopes().any(|s| s == OFFLINE_ACCESS));
    let me = c.user_info(&token.access_token).await.unwrap();
    assert_eq!(me.open_id, ALICE);
    assert_eq!(me.email.as_deref(), Some("alice@sandbox.example"));

    // Codes are single use.
    let again = c
        .exchange_code(&code.code, REDIRECT, Some(&pkce.verifier))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Some(20065));
    assert_eq!(again.oauth_kind(), Some(OAuthErrorKind::InvalidGrant));

    // Refresh rotates: the new refresh token works, the old one is refused.
    let old_refresh = token.refresh_token.clone().unwrap();
    let refreshed = c.refresh_user_token(&old_refresh).await.unwrap();
    let new_refresh = refreshed.refresh_token.clone().unwrap();
    assert_ne!(new_refresh.expose_secret(), old_refresh.expose_secret());
    assert_eq!(
        refreshed.scope, token.scope,
        "refresh keeps the granted scopes"
    );
    assert_eq!(
        c.user_info(&refreshed.access_token).await.unwrap().open_id,
        ALICE
    );
    let reused = c.refresh_user_token(&old_refresh).await.unwrap_err();
    assert_eq!(reused.code(), Some(20073));
    assert_eq!(reused.oauth_kind(), Some(OAuthErrorKind::InvalidGrant));
    c.refresh_user_token(&new_refresh).await.unwrap();
    assert_eq!(sb.hits("oauth_token"), 5);

    let bogus = c
        .user_info(&SecretString::from("eyJnot-a-token".to_owned()))
        .await
        .unwrap_err();
    assert!(bogus.is_user_token_invalid(), "{bogus}");
}

#[tokio::test]
async fn oauth_pkce_mismatch_reject_and_login_hint() {
    let sb = sandbox().await;
    let c = client(&sb);

    let (url, _pkce) = authorize(&c, "state-2");
    let redirect = sb.approve(&url, BOB).unwrap();
    let code = parse_redirect_query(&query_of(&redirect)).unwrap();
    let wrong = Pkce::generate();
    let err = c
        .exchange_code(&code.code, REDIRECT, Some(&wrong.verifier))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(20049));

    let (url, _) = authorize(&c, "state-3");
    let redirect = browser_decide(&sb, &url, BOB, "reject").await;
    let q = query_of(&redirect);
    assert!(
        q.contains("error=access_denied") && q.contains("state=state-3"),
        "{q}"
    );
    let err = parse_redirect_query(&q).unwrap_err();
    assert_eq!(err.oauth_kind(), Some(OAuthErrorKind::UserRejected));
    assert!(sb
        .reject(&url, BOB)
        .unwrap()
        .contains("error=access_denied"));

    // `login_hint` preselects the user on the page.
    let page = http(&sb)
        .get(format!("{url}&login_hint={BOB}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(&format!("<option value=\"{BOB}\" selected>")),
        "{page}"
    );
}

// ---------------------------------------------------------------------------------------------
// IM
// ---------------------------------------------------------------------------------------------

fn card(title: &str) -> Value {
    json!({
        "schema": "2.0",
        "config": {"update_multi": true},
        "header": {"title": {"tag": "plain_text", "content": title}},
        "body": {"elements": [
            {"tag": "markdown", "content": "Please authorize."},
            {"tag": "button", "text": {"tag": "plain_text", "content": "Reject"},
             "behaviors": [{"type": "callback", "value": {"action": "reject"}}]}
        ]}
    })
}

#[tokio::test]
async fn im_send_patch_and_uuid_dedup_are_recorded() {
    let sb = sandbox().await;
    let c = client(&sb);
    let sent = c
        .send_card(&Receiver::open_id(ALICE), &card("Authorize"))
        .await
        .unwrap();
    c.send_text(&Receiver::open_id(BOB), "hi bob")
        .await
        .unwrap();

    let alice = sb.messages_for(ALICE);
    assert_eq!(alice.len(), 1);
    assert_eq!(alice[0].message_id, sent.message_id);
    assert_eq!(alice[0].msg_type, "interactive");
    assert_eq!(alice[0].content["header"]["title"]["content"], "Authorize");
    assert_eq!(sb.messages_for(BOB)[0].content, json!({"text": "hi bob"}));

    c.patch_card(&sent.message_id, &card("Authorized"))
        .await
        .unwrap();
    let alice = sb.messages_for(ALICE);
    assert_eq!(alice[0].content["header"]["title"]["content"], "Authorized");
    assert_eq!(alice[0].history.len(), 1);
    assert_eq!(
        alice[0].history[0]["header"]["title"]["content"],
        "Authorize"
    );

    // The same uuid twice is one message (the platform de-duplicates retried sends).
    let a = c
        .send_message(
            &Receiver::open_id(BOB),
            "text",
            json!({"text": "x"}).to_string(),
            Some("u-1"),
        )
        .await
        .unwrap();
    let b = c
        .send_message(
            &Receiver::open_id(BOB),
            "text",
            json!({"text": "x"}).to_string(),
            Some("u-1"),
        )
        .await
        .unwrap();
    assert_eq!(a.message_id, b.message_id);
    assert_eq!(sb.messages_for(BOB).len(), 2);

    let err = c
        .send_text(&Receiver::open_id("ou_nobody"), "?")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(230_013));
    let err = c.patch_card("om_missing", &card("x")).await.unwrap_err();
    assert!(err.code().is_some(), "{err}");
}

// ---------------------------------------------------------------------------------------------
// aPaaS
// ---------------------------------------------------------------------------------------------

/// The record calls' preamble, in its order: the hit is counted (an injected failure answers
/// first), then the tenant token is checked, then the record id is read.
#[tokio::test]
async fn apaas_record_calls_count_the_hit_then_check_the_token_then_the_id() {
    let sb = sandbox().await;
    let c = client(&sb);
    let (ns, obj) = ("package_sandbox__c", "task");
    let id = c
        .create_record(ns, obj, &json!({"name": "t"}))
        .await
        .unwrap();
    let token = c.tenant_token().await.unwrap();
    let records = format!(
        "{}/open-apis/apaas/v1/applications/{ns}/objects/{obj}/records",
        sb.base_url()
    );
    let http = http(&sb);
    let patch = |id: &str, bearer: Option<&str>| {
        let r = http
            .patch(format!("{records}/{id}"))
            .json(&json!({"record": "{\"done\": true}"}));
        match bearer {
            Some(b) => r.bearer_auth(b),
            None => r,
        }
    };
    let answer = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        (status, r.json::<Value>().await.unwrap())
    };
    let hits = sb.hits("apaas");

    // No token: refused as unauthorized, before the (bad) id is looked at.
    let (status, v) = answer(patch("not-a-number", None).send().await.unwrap()).await;
    assert_eq!((status, v["code"].as_i64()), (400, Some(99_991_663)), "{v}");
    assert_eq!(sb.hits("apaas"), hits + 1, "the refused call is counted");

    // An injected failure answers before the token is checked.
    sb.fail_next("apaas", 503, 1);
    let (status, _) = answer(patch(&id, None).send().await.unwrap()).await;
    assert_eq!(status, 503);

    // With the token, a bad id is a parameter error; a good one patches.
    let (status, v) = answer(
        patch("not-a-number", Some(token.expose_secret()))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, v["code"].as_i64()), (400, Some(2_320_001)), "{v}");
    assert_eq!(v["msg"], "record id must be a number");
    assert_eq!(sb.records(ns, obj)[0].get("done"), None);
    let (status, v) = answer(
        patch(&id, Some(token.expose_secret()))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, v["code"].as_i64()), (200, Some(0)), "{v}");
    assert_eq!(sb.records(ns, obj)[0]["done"], true);

    // A create without the token is refused and stores nothing.
    let r = http
        .post(&records)
        .json(&json!({"record": "{\"name\": \"x\"}"}))
        .send()
        .await
        .unwrap();
    let (status, v) = answer(r).await;
    assert_eq!((status, v["code"].as_i64()), (400, Some(99_991_663)), "{v}");
    assert_eq!(sb.records(ns, obj).len(), 1);
}

#[tokio::test]
async fn apaas_records_create_get_patch_query_with_paging() {
    let sb = sandbox().await;
    let c = client(&sb);
    let (ns, obj) = ("package_sandbox__c", "task");
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            c.create_record(ns, obj, &json!({"name": format!("t{i}"), "done": false}))
                .await
                .unwrap(),
        );
    }
    let got = c
        .get_record(ns, obj, &ids[2], &["name"])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got["name"], "t2");
    assert!(got.get("done").is_none(), "select limits the fields");

    c.patch_record(ns, obj, &ids[2], &json!({"done": true}))
        .await
        .unwrap();
    let stored = sb.records(ns, obj);
    assert_eq!(stored.len(), 5);
    assert_eq!(stored[2]["done"], true);
    assert_eq!(stored[2]["name"], "t2");

    let first = c
        .query_records(ns, obj, &RecordQuery::select(["name"], 2))
        .await
        .unwrap();
    assert_eq!(first.items.len(), 2);
    assert!(first.has_more && first.next_page_token.is_some());
    let all = c
        .query_all_records(ns, obj, &RecordQuery::select(["name"], 2))
        .await
        .unwrap();
    let names: Vec<&str> = all.iter().filter_map(|r| r["name"].as_str()).collect();
    assert_eq!(names, ["t0", "t1", "t2", "t3", "t4"]);

    c.delete_record(ns, obj, &ids[0]).await.unwrap();
    assert_eq!(sb.records(ns, obj).len(), 4);
    let err = c.get_record(ns, obj, &ids[0], &[]).await.unwrap_err();
    assert_eq!(err.code(), Some(2_320_001));

    // Workspace tables are read with a user token.
    sb.seed_table("ws_1", "notes", (0..3).map(|i| json!({"n": i})).collect());
    let token = alice_token(&sb, &c).await;
    let page = c
        .list_table_records(
            &token.access_token,
            "ws_1",
            "notes",
            &TableQuery {
                page_size: Some(2),
                ..TableQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(page.items, [json!({"n": 0}), json!({"n": 1})]);
    assert!(page.has_more);
    let rest = c
        .list_table_records(
            &token.access_token,
            "ws_1",
            "notes",
            &TableQuery {
                page_size: Some(2),
                page_token: page.page_token.clone(),
                ..TableQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(rest.items, [json!({"n": 2})]);
    assert!(!rest.has_more);
}

// ---------------------------------------------------------------------------------------------
// Long connection
// ---------------------------------------------------------------------------------------------

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A minimal long-connection client: discovery, dial, the codec and the reassembler.
struct RawClient {
    ws: Ws,
    service_id: i32,
    reassembler: Reassembler,
}

impl RawClient {
    async fn connect(sb: &Sandbox) -> (Self, String) {
        let resp = http(sb)
            .post(format!("{}/callback/ws/endpoint", sb.base_url()))
            .json(&json!({"AppID": APP_ID, "AppSecret": APP_SECRET}))
            .send()
            .await
            .unwrap();
        let ep =
            parse_discovery_response(resp.status().as_u16(), &resp.bytes().await.unwrap()).unwrap();
        let params = ConnParams::from_url(&ep.url).unwrap();
        let (ws, _) = lark_service::net::dial_websocket(&net(sb), ep.url.as_str())
            .await
            .unwrap();
        let client = Self {
            ws,
            service_id: params.service_id,
            reassembler: Reassembler::new(ReassemblyLimits::default()),
        };
        (client, ep.url)
    }

    async fn next_frame(&mut self) -> Frame {
        loop {
            let msg = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("a frame in time")
                .expect("socket open")
                .unwrap();
            if let Message::Binary(b) = msg {
                return Frame::decode_strict(&b).expect("a valid frame");
            }
        }
    }

    /// Reads frames until one event message is complete: the frame that completed it, the
    /// envelope and the number of data frames read.
    async fn next_event(&mut self) -> (Frame, Value, usize) {
        let mut frames = 0;
        loop {
            let f = self.next_frame().await;
            if f.kind() != FrameKind::Event {
                continue;
            }
            frames += 1;
            if let Pushed::Complete(bytes) =
                self.reassembler.push_frame(&f, Instant::now()).unwrap()
            {
                return (f, serde_json::from_slice(&bytes).unwrap(), frames);
            }
        }
    }

    async fn ack(&mut self, frame: &Frame, response: &AckResponse) {
        let ack = build_ack(frame, Duration::from_millis(3), response);
        self.ws
            .send(Message::Binary(ack.to_bytes().into()))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn fragmented_event_is_reassembled_acked_and_not_redelivered() {
    // A long timer: redelivery happens only when the test asks for it.
    let sb = sandbox_with(SandboxOptions {
        redeliver_after: Duration::from_secs(3600),
        ..SandboxOptions::default()
    })
    .await;
    let (mut cl, url) = RawClient::connect(&sb).await;
    until("the connection", || sb.connections() == 1).await;

    // Ping → pong carrying the client config.
    cl.ws
        .send(Message::Binary(encode_ping(cl.service_id).into()))
        .await
        .unwrap();
    let pong = cl.next_frame().await;
    assert_eq!(pong.kind(), FrameKind::Pong);
    let cfg = parse_pong_config(pong.payload_bytes()).unwrap();
    assert!(!cfg.is_empty());

    // The ticket was single-use: dialing the same URL again is refused (§2.3).
    let err = lark_service::net::dial_websocket(&net(&sb), url.as_str())
        .await
        .map(|_| ())
        .unwrap_err();
    match err {
        lark_service::net::DialError::Handshake(e)
            if matches!(*e, tokio_tungstenite::tungstenite::Error::Http(_)) =>
        {
            let tokio_tungstenite::tungstenite::Error::Http(resp) = *e else {
                unreachable!()
            };
            assert_eq!(resp.headers()["handshake-status"], "514");
        }
        other => panic!("expected a refused handshake, got {other}"),
    }

    let text = "x".repeat(600);
    let acked = sb
        .push_event(
            "im.message.receive_v1",
            json!({"message": {"message_id": "om_1", "content": json!({"text": text}).to_string()}}),
            PushOpts {
                fragments: 3,
                out_of_order: true,
                duplicate: false,
            },
        )
        .unwrap();
    let (frame, env, frames) = cl.next_event().await;
    assert_eq!(frames, 3, "three fragments");
    assert_eq!(frame.header("message_id"), Some(acked.as_str()));
    assert_eq!(env["schema"], "2.0");
    assert_eq!(env["header"]["event_type"], "im.message.receive_v1");
    assert_eq!(env["header"]["app_id"], APP_ID);
    for key in ["event_id", "create_time", "token", "tenant_key"] {
        assert!(env["header"][key].is_string(), "header.{key}");
    }
    assert!(env["event"]["message"]["content"]
        .as_str()
        .unwrap()
        .contains(&text));
    cl.ack(&frame, &AckResponse::Ok).await;
    until("the ACK", || {
        sb.acks().iter().any(|a| a.message_id == acked)
    })
    .await;
    let ack = sb
        .acks()
        .into_iter()
        .find(|a| a.message_id == acked)
        .unwrap();
    assert_eq!(ack.code, 200);
    assert_eq!(ack.biz_rt.as_deref(), Some("3"));
    assert!(ack.since_push.is_some());
    assert_eq!(sb.unacked(), 0);

    // A second event, not acknowledged; a forced redelivery sends it again, not the first.
    let unacked = sb
        .push_event(
            "im.message.receive_v1",
            json!({"n": 2}),
            PushOpts::default(),
        )
        .unwrap();
    let (f1, _, _) = cl.next_event().await;
    assert_eq!(f1.header("message_id"), Some(unacked.as_str()));
    sb.redeliver_now();
    let (f2, env2, _) = cl.next_event().await;
    assert_eq!(f2.header("message_id"), Some(unacked.as_str()));
    assert_eq!(env2["event"], json!({"n": 2}));
    assert_eq!(
        sb.deliveries(&acked),
        1,
        "an acknowledged event is not redelivered"
    );
    assert_eq!(sb.deliveries(&unacked), 2);
    assert_eq!(sb.unacked(), 1);

    // A failed handler ({"code":500}) keeps it pending; a 200 settles it.
    cl.ack(&f2, &AckResponse::Failed).await;
    until("the 500 ACK", || sb.acks().len() == 2).await;
    assert_eq!(sb.unacked(), 1);
    cl.ack(&f2, &AckResponse::Ok).await;
    until("the 200 ACK", || sb.unacked() == 0).await;
}

#[tokio::test]
async fn unacked_event_is_redelivered_by_the_timer_and_duplicates_are_sent_twice() {
    let sb = sandbox_with(SandboxOptions {
        redeliver_after: Duration::from_millis(200),
        ..SandboxOptions::default()
    })
    .await;
    let (mut cl, _) = RawClient::connect(&sb).await;
    until("the connection", || sb.connections() == 1).await;
    let id = sb
        .push_event(
            "custom.event",
            json!({"k": "v"}),
            PushOpts {
                fragments: 2,
                out_of_order: false,
                duplicate: true,
            },
        )
        .unwrap();
    let (a, _, _) = cl.next_event().await;
    assert_eq!(a.header("message_id"), Some(id.as_str()));
    // The duplicate copy: its fragments fill slots of a message already completed, so the
    // reassembler starts a new buffer and completes it again.
    let (b, _, _) = cl.next_event().await;
    assert_eq!(b.header("message_id"), Some(id.as_str()));
    // Not acknowledged: the timer sends it again.
    let (c, _, _) = cl.next_event().await;
    assert_eq!(c.header("message_id"), Some(id.as_str()));
    assert!(sb.deliveries(&id) >= 2);
    cl.ack(&c, &AckResponse::Ok).await;
    until("the ACK", || sb.unacked() == 0).await;
}

#[tokio::test]
async fn card_click_goes_over_the_long_connection_and_the_answer_updates_the_card() {
    let sb = sandbox().await;
    let c = client(&sb);
    let sent = c
        .send_card(&Receiver::open_id(BOB), &card("Authorize"))
        .await
        .unwrap();
    let (mut cl, _) = RawClient::connect(&sb).await;
    until("the connection", || sb.connections() == 1).await;

    let fid = sb
        .click_card_button(&sent.message_id, BOB, json!({"action": "reject"}))
        .unwrap();
    let (frame, env, _) = cl.next_event().await;
    assert_eq!(frame.header("message_id"), Some(fid.as_str()));
    assert_eq!(env["header"]["event_type"], "card.action.trigger");
    let ev = &env["event"];
    assert_eq!(ev["operator"]["open_id"], BOB);
    assert_eq!(ev["action"]["value"], json!({"action": "reject"}));
    assert_eq!(ev["context"]["open_message_id"], sent.message_id.as_str());
    let token = ev["token"].as_str().unwrap().to_owned();

    let answer = json!({"toast": {"type": "info", "content": "rejected"},
                        "card": {"type": "raw", "data": card("Rejected")}});
    cl.ack(
        &frame,
        &AckResponse::OkWithData(answer.to_string().into_bytes()),
    )
    .await;
    until("the card update", || {
        sb.messages_for(BOB)[0].content["header"]["title"]["content"] == "Rejected"
    })
    .await;
    let ack = sb.acks().into_iter().find(|a| a.message_id == fid).unwrap();
    assert_eq!(ack.data, Some(answer));

    // Delayed update with the callback's token: twice, then refused.
    let token = SecretString::from(token);
    c.delay_update_card(&token, &card("Later")).await.unwrap();
    assert_eq!(
        sb.messages_for(BOB)[0].content["header"]["title"]["content"],
        "Later"
    );
    c.delay_update_card(&token, &card("Later 2")).await.unwrap();
    assert!(c.delay_update_card(&token, &card("Later 3")).await.is_err());
    assert_eq!(sb.messages_for(BOB)[0].history.len(), 3);
    assert!(sb.click_card_button("om_missing", BOB, json!({})).is_err());
}

#[tokio::test]
async fn faults_garbage_stalled_pongs_and_abrupt_close() {
    let sb = sandbox().await;
    let (mut cl, _) = RawClient::connect(&sb).await;
    until("the connection", || sb.connections() == 1).await;

    sb.send_garbage_frame();
    let msg = tokio::time::timeout(PATIENCE, cl.ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Message::Binary(bytes) = msg else {
        panic!("binary garbage expected")
    };
    assert!(Frame::decode_strict(&bytes).is_err());

    // While stalled, a ping gets no pong (the event pushed after it arrives first); after
    // resuming, the next ping does.
    sb.stall_pongs(true);
    cl.ws
        .send(Message::Binary(encode_ping(cl.service_id).into()))
        .await
        .unwrap();
    until("the ping", || sb.hits("ws_ping") == 1).await;
    let id = sb
        .push_event("marker", json!({}), PushOpts::default())
        .unwrap();
    let (f, _, _) = cl.next_event().await;
    assert_eq!(
        f.header("message_id"),
        Some(id.as_str()),
        "no pong before it"
    );
    sb.stall_pongs(false);
    cl.ws
        .send(Message::Binary(encode_ping(cl.service_id).into()))
        .await
        .unwrap();
    assert_eq!(cl.next_frame().await.kind(), FrameKind::Pong);

    sb.close_ws_abruptly();
    let end = tokio::time::timeout(PATIENCE, cl.ws.next()).await.unwrap();
    assert!(
        !matches!(end, Some(Ok(Message::Close(_)))),
        "no close frame: {end:?}"
    );
    until("the drop", || sb.connections() == 0).await;
}

#[tokio::test]
async fn the_page_lists_users_and_messages_and_its_button_sends_a_card_action() {
    let sb = sandbox().await;
    let c = client(&sb);
    let sent = c
        .send_card(&Receiver::open_id(ALICE), &card("Authorize"))
        .await
        .unwrap();
    let http = http(&sb);
    let page = http
        .get(format!("{}/", sb.base_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("http-equiv=refresh content=2"));
    assert!(page.contains("location.reload()},2000)"));
    for u in sb.users() {
        assert!(page.contains(&u.open_id), "{}", u.open_id);
    }
    assert!(page.contains(&sent.message_id) && page.contains("Please authorize."));
    assert!(page.contains("action=/sandbox/click"));

    // The Reject form: the sandbox queues a card.action.trigger for the long connection.
    let resp = http
        .post(format!("{}/sandbox/click", sb.base_url()))
        .form(&[
            ("message_id", sent.message_id.as_str()),
            ("open_id", ALICE),
            ("value", r#"{"action":"reject"}"#),
        ])
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_redirection());
    assert_eq!(sb.unacked(), 1);
    let (mut cl, _) = RawClient::connect(&sb).await;
    let (_, env, _) = cl.next_event().await;
    assert_eq!(env["header"]["event_type"], "card.action.trigger");
    assert_eq!(env["event"]["action"]["value"], json!({"action": "reject"}));
}

// ---------------------------------------------------------------------------------------------
// Issue 16: a refresh whose answer is lost, end to end against the sandbox
// ---------------------------------------------------------------------------------------------

/// The platform carries a refresh out (rotating the refresh token, retiring the old access
/// token at once) but its answer is lost: a 500 after the work was done. The service, with the
/// client's default retry policy, never presents the spent refresh token again: it holds the
/// refresh in doubt, and once the grace is over the old access token is refused, so the user
/// must authorize again. The service's clock is injected; the sandbox's grace is zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_whose_answer_is_lost_never_presents_the_refresh_token_twice() {
    use lark_service::auth::{AuthOptions, AuthService, TokenError, UserRef};
    use lark_service::storage::{Key, Keyring, Store, StoreOptions, UserToken};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    let sb = sandbox().await;
    sb.set_superseded_access_grace(Duration::ZERO);
    let c = client(&sb);
    let t = alice_token(&sb, &c).await;
    let old_refresh = t.refresh_token.as_ref().unwrap().expose_secret().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        &dir.path().join("s.redb"),
        Keyring::new(Key::from_bytes(&[7; 32]), vec![]),
        StoreOptions::default(),
    )
    .unwrap();
    let t0: u64 = 1_700_000_000_000;
    store
        .put_token(&UserToken {
            app_id: APP_ID.into(),
            user_id: ALICE.into(),
            open_id: Some(ALICE.into()),
            access_token: t.access_token.clone(),
            refresh_token: t.refresh_token.clone(),
            expires_at: t0 + 7_200_000,
            refresh_expires_at: None,
            refresh_due_at: t0,
            scopes: vec![OFFLINE_ACCESS.into()],
            obtained_at: t0,
            session_id: None,
            needs_reauth: false,
            refresh_in_doubt_since: None,
        })
        .unwrap();
    let clock = Arc::new(AtomicU64::new(t0));
    let c2 = clock.clone();
    let svc = AuthService::with_clock(
        c.clone(),
        store.clone(),
        AuthOptions {
            session_expiry: Duration::from_secs(600),
            refresh_threshold: 0.8,
            rate_limit: 10,
            rate_limit_window: Duration::from_secs(60),
            redirect_uri: REDIRECT.into(),
            default_scopes: vec![],
            admin_token: None,
            refresh_concurrency: 1,
            refresh_jitter: Duration::ZERO,
            resend_card_on_reauth: false,
            user_info_sync: None,
            card: lark_service::auth::CardStyle::default(),
        },
        Arc::new(move || c2.load(Ordering::SeqCst)),
    );
    let alice = || UserRef::OpenId(ALICE.into());
    let grants_before = sb.hits("oauth_token");

    sb.fail_next_after_processing("oauth_token", 500, 1);
    let r = svc.user_token(alice()).await;
    assert!(matches!(r, Err(TokenError::RefreshInDoubt { .. })), "{r:?}");
    assert!(
        !sb.refresh_token_live(&old_refresh),
        "the platform rotated it"
    );
    assert_eq!(sb.hits("oauth_token"), grants_before + 1, "presented once");

    // Asking again before the grace is over changes nothing and sends nothing.
    let r = svc.user_token(alice()).await;
    assert!(matches!(r, Err(TokenError::RefreshInDoubt { .. })), "{r:?}");
    assert_eq!(sb.hits("oauth_token"), grants_before + 1);

    clock.fetch_add(121_000, Ordering::SeqCst);
    let r = svc.user_token(alice()).await;
    assert!(matches!(r, Err(TokenError::NeedsReauth { .. })), "{r:?}");
    assert_eq!(sb.hits("oauth_token"), grants_before + 1);
    assert_eq!(
        sb.refresh_token_reuses(),
        0,
        "the spent refresh token was presented again"
    );
    assert!(
        store
            .get_token(APP_ID, ALICE)
            .unwrap()
            .unwrap()
            .needs_reauth
    );
}
