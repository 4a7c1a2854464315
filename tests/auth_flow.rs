//! The authorization flow end to end against a wiremock stand-in for Lark: card, redirect,
//! exchange, storage, card updates, refresh, rate limit, HTTP routes.
//!
//! Time is an injected clock (`AtomicU64`), never the wall clock. Metrics are process-global,
//! so every test holds `SERIAL` and compares deltas.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use wiremock::matchers::{body_partial_json, header, method, path, path_regex};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use lark_service::auth::state::Page;
use lark_service::auth::{
    AuthError, AuthOptions, AuthRequest, AuthService, CardStyle, Locale, TokenError, UserRef,
};
use lark_service::lark::{Domain, LarkClient, LarkConfig, RetryPolicy};
use lark_service::metrics::{self, AppOutcomeLabel, AuthFailureLabel, AuthLabel};
use lark_service::storage::{
    FailureReason, Key, Keyring, SessionState, Store, StoreOptions, UserInfo, UserToken,
};

const APP_ID: &str = "cli_a1b2c3d4e5f60718";
const APP_SECRET: &str = "app-SECRET-9f3c2e";
const TENANT_PATH: &str = "/open-apis/auth/v3/tenant_access_token/internal";
const OAUTH_TOKEN_PATH: &str = "/open-apis/authen/v2/oauth/token";
const MESSAGES_PATH: &str = "/open-apis/im/v1/messages";
const USER_INFO_PATH: &str = "/open-apis/authen/v1/user_info";
const TENANT_KEY: &str = "tenant-of-the-app";
const ACCESS_1: &str = "eyJ-AUTH-ACCESS-SECRET-1";
const REFRESH_1: &str = "eyJ-AUTH-REFRESH-SECRET-1";
const ACCESS_2: &str = "eyJ-AUTH-ACCESS-SECRET-2";
const REFRESH_2: &str = "eyJ-AUTH-REFRESH-SECRET-2";
const CODE: &str = "AUTH-CODE-SECRET-42";
const ADMIN: &str = "admin-AUTH-SECRET-7";
const REDIRECT: &str = "https://svc.example.com/oauth/callback";
const ALICE: &str = "ou_alice";
const T0: u64 = 1_700_000_000_000;
const EXPIRY_MS: u64 = 600_000;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn ring() -> Keyring {
    Keyring::new(Key::from_bytes(&[0x42; 32]), vec![])
}

fn options() -> AuthOptions {
    AuthOptions {
        session_expiry: Duration::from_millis(EXPIRY_MS),
        refresh_threshold: 0.8,
        rate_limit: 3,
        rate_limit_window: Duration::from_secs(60),
        redirect_uri: REDIRECT.to_owned(),
        default_scopes: vec!["contact:user.base:readonly".to_owned()],
        admin_token: Some(SecretString::from(ADMIN)),
        refresh_concurrency: 4,
        refresh_jitter: Duration::ZERO,
        resend_card_on_reauth: false,
        user_info_sync: None,
        // These tests read the English texts; the Chinese default has tests of its own.
        card: CardStyle {
            locale: Locale::En,
            ..CardStyle::default()
        },
    }
}

struct H {
    server: MockServer,
    svc: AuthService,
    store: Store,
    clock: Arc<AtomicU64>,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

fn client(server: &MockServer) -> LarkClient {
    let mut cfg = LarkConfig::new(
        server.uri().parse::<Domain>().unwrap(),
        APP_ID,
        SecretString::from(APP_SECRET),
    );
    cfg.retry = RetryPolicy::no_retry();
    cfg.request_timeout = Duration::from_secs(10);
    LarkClient::new(cfg).unwrap()
}

fn service(
    server: &MockServer,
    store: &Store,
    clock: &Arc<AtomicU64>,
    opts: AuthOptions,
) -> AuthService {
    let c = clock.clone();
    AuthService::with_clock(
        client(server),
        store.clone(),
        opts,
        Arc::new(move || c.load(Ordering::SeqCst)),
    )
}

async fn harness_with(opts: AuthOptions) -> H {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(TENANT_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"code": 0, "msg": "ok", "tenant_access_token": "t-TENANT", "expire": 7200}),
        ))
        .mount(&server)
        .await;
    // The app's own tenant: completing users must belong to it.
    Mock::given(method("GET"))
        .and(path("/open-apis/tenant/v2/tenant/query"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"code": 0, "msg": "success", "data": {"tenant": {"name": "T", "tenant_key": TENANT_KEY}}}),
        ))
        .mount(&server)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let store = Store::open(&path, ring(), StoreOptions::default()).unwrap();
    let clock = Arc::new(AtomicU64::new(T0));
    let svc = service(&server, &store, &clock, opts);
    H {
        server,
        svc,
        store,
        clock,
        _dir: dir,
        path,
    }
}

async fn harness() -> H {
    harness_with(options()).await
}

impl H {
    fn advance(&self, ms: u64) {
        self.clock.fetch_add(ms, Ordering::SeqCst);
    }

    fn now(&self) -> u64 {
        self.clock.load(Ordering::SeqCst)
    }

    async fn mount_send_card(&self, message_id: &str, times: u64) {
        Mock::given(method("POST"))
            .and(path(MESSAGES_PATH))
            .and(body_partial_json(json!({"msg_type": "interactive"})))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "code": 0, "msg": "success",
                "data": {"message_id": message_id, "chat_id": "oc_1", "msg_type": "interactive"}
            })))
            .expect(times)
            .mount(&self.server)
            .await;
    }

    async fn mount_patch(&self) {
        Mock::given(method("PATCH"))
            .and(path_regex(r"^/open-apis/im/v1/messages/om_.*$"))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(json!({"code": 0, "msg": "success"})),
            )
            .mount(&self.server)
            .await;
    }

    async fn mount_exchange(&self, times: u64) {
        Mock::given(method("POST"))
            .and(path(OAUTH_TOKEN_PATH))
            .and(body_partial_json(
                json!({"grant_type": "authorization_code", "code": CODE}),
            ))
            .respond_with(ResponseTemplate::new(200).set_body_json(token_body(ACCESS_1, REFRESH_1)))
            .expect(times)
            .mount(&self.server)
            .await;
    }

    async fn mount_user_info(&self, open_id: &str) {
        self.mount_user_info_in(open_id, TENANT_KEY).await;
    }

    async fn mount_user_info_in(&self, open_id: &str, tenant_key: &str) {
        Mock::given(method("GET"))
            .and(path(USER_INFO_PATH))
            .and(header(
                "authorization",
                format!("Bearer {ACCESS_1}").as_str(),
            ))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "code": 0, "msg": "success",
                "data": {"open_id": open_id, "union_id": "on_alice", "name": "Alice", "tenant_key": tenant_key,
                         "email": "alice@example.com", "avatar_url": "https://a.example/alice.png"}
            })))
            .mount(&self.server)
            .await;
    }

    async fn requests(&self, m: &str, p: &str) -> Vec<Request> {
        self.server
            .received_requests()
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.method.as_str() == m && r.url.path().starts_with(p))
            .collect()
    }

    /// The cards sent so far, parsed from the message `content` strings.
    async fn sent_cards(&self) -> Vec<Value> {
        self.requests("POST", MESSAGES_PATH)
            .await
            .iter()
            .map(body)
            .filter(|b| b["msg_type"] == "interactive")
            .map(|b| serde_json::from_str(b["content"].as_str().unwrap()).unwrap())
            .collect()
    }

    async fn patched_cards(&self) -> Vec<Value> {
        self.requests("PATCH", MESSAGES_PATH)
            .await
            .iter()
            .map(|r| serde_json::from_str(body(r)["content"].as_str().unwrap()).unwrap())
            .collect()
    }

    async fn request_alice(&self) -> lark_service::auth::RequestOutcome {
        self.svc
            .request(AuthRequest {
                user: UserRef::OpenId(ALICE.into()),
                scopes: vec!["contact:user.base:readonly".into()],
            })
            .await
            .unwrap()
    }
}

fn body(r: &Request) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

fn token_body(access: &str, refresh: &str) -> Value {
    json!({"code": 0, "access_token": access, "expires_in": 7200, "refresh_token": refresh,
           "refresh_token_expires_in": 604_800,
           "scope": "contact:user.base:readonly offline_access", "token_type": "Bearer"})
}

/// The authorize URL of a card.
fn authorize_url(card: &Value) -> url::Url {
    url::Url::parse(
        card["body"]["elements"][1]["behaviors"][0]["default_url"]
            .as_str()
            .unwrap(),
    )
    .unwrap()
}

fn query_param(u: &url::Url, k: &str) -> Option<String> {
    u.query_pairs()
        .find(|(n, _)| n == k)
        .map(|(_, v)| v.into_owned())
}

fn state_of(card: &Value) -> String {
    query_param(&authorize_url(card), "state").unwrap()
}

fn success() -> u64 {
    metrics::get()
        .auth_success
        .get_or_create(&AuthLabel::card(APP_ID))
        .get()
}

fn sessions_created() -> u64 {
    metrics::get()
        .auth_session
        .get_or_create(&AuthLabel::card(APP_ID))
        .get()
}

fn failures(r: FailureReason) -> u64 {
    metrics::get()
        .auth_failure
        .get_or_create(&AuthFailureLabel::card(APP_ID, r.as_str()))
        .get()
}

fn refreshes(outcome: &'static str) -> u64 {
    metrics::get()
        .token_refresh
        .get_or_create(&AppOutcomeLabel::new(APP_ID, outcome))
        .get()
}

fn duration_count() -> u64 {
    metrics::get()
        .encode()
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "lark_service_auth_duration_seconds_count{{app_id=\"{APP_ID}\",auth_method=\"websocket_card\"}} "
            ))
        })
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn page_title(html: &str) -> &str {
    let start = html.find("<h1>").unwrap() + 4;
    let end = html.find("</h1>").unwrap();
    &html[start..end]
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_card_callback_stores_encrypted_tokens_and_patches_the_card() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    h.mount_send_card("om_1", 1).await;
    h.mount_patch().await;
    h.mount_exchange(1).await;
    h.mount_user_info(ALICE).await;
    let (ok0, req0, dur0, ses0) = (
        success(),
        metrics::get().auth_requests.get(),
        duration_count(),
        sessions_created(),
    );

    let out = h.request_alice().await;
    assert!(!out.reused);
    assert_eq!(metrics::get().auth_requests.get(), req0 + 1);
    assert_eq!(sessions_created(), ses0 + 1);

    // The card: to Alice by open_id, the documented shape, an authorize URL with PKCE.
    let sends = h.requests("POST", MESSAGES_PATH).await;
    assert_eq!(sends[0].url.query(), Some("receive_id_type=open_id"));
    assert_eq!(body(&sends[0])["receive_id"], ALICE);
    let card = &h.sent_cards().await[0];
    assert_eq!(card["schema"], "2.0");
    assert_eq!(card["config"]["update_multi"], true);
    assert_eq!(card["header"]["title"]["content"], "Authorization required");
    let els = card["body"]["elements"].as_array().unwrap();
    assert_eq!(els[0]["tag"], "markdown");
    assert!(els[0]["content"]
        .as_str()
        .unwrap()
        .contains("`contact:user.base:readonly`"));
    assert_eq!(els[1]["behaviors"][0]["type"], "open_url");
    assert_eq!(
        els[2]["behaviors"][0]["value"],
        json!({"action": "reject", "session_id": out.session_id.to_string()})
    );
    let url = authorize_url(card);
    assert_eq!(url.path(), "/open-apis/authen/v1/authorize");
    assert_eq!(query_param(&url, "client_id").as_deref(), Some(APP_ID));
    assert_eq!(query_param(&url, "redirect_uri").as_deref(), Some(REDIRECT));
    assert_eq!(
        query_param(&url, "scope").as_deref(),
        Some("contact:user.base:readonly offline_access")
    );
    assert_eq!(
        query_param(&url, "code_challenge_method").as_deref(),
        Some("S256")
    );
    let challenge = query_param(&url, "code_challenge").unwrap();
    let state = state_of(card);
    assert!(state.len() >= 22);

    // The session stores only the state's hash, and the card's message id.
    let s = h.store.get_session(out.session_id).unwrap().unwrap();
    assert_eq!(s.state, SessionState::Pending);
    assert_eq!(s.card_message_id.as_deref(), Some("om_1"));
    assert_eq!(
        s.state_hash,
        Some(<[u8; 32]>::from(Sha256::digest(state.as_bytes())))
    );

    h.advance(30_000);
    let (status, html) = h
        .svc
        .oauth_callback(&format!("code={CODE}&state={state}"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(page_title(&html.0), "Authorization complete");
    assert!(!html.0.contains(ACCESS_1) && !html.0.contains(CODE));

    // The exchange carried the PKCE verifier matching the challenge and the same redirect URI.
    let ex = body(&h.requests("POST", OAUTH_TOKEN_PATH).await[0]);
    assert_eq!(ex["redirect_uri"], REDIRECT);
    let verifier = ex["code_verifier"].as_str().unwrap();
    assert_eq!(base64_url(&Sha256::digest(verifier.as_bytes())), challenge);

    // Tokens stored, readable through the store, sealed in the file.
    let now = h.now();
    let tok = h.store.get_token(APP_ID, ALICE).unwrap().unwrap();
    assert_eq!(tok.access_token.expose_secret(), ACCESS_1);
    assert_eq!(
        tok.refresh_token.as_ref().unwrap().expose_secret(),
        REFRESH_1
    );
    assert_eq!(tok.expires_at, now + 7_200_000);
    assert_eq!(tok.refresh_due_at, now + 5_760_000);
    assert_eq!(tok.session_id, Some(out.session_id));
    let s = h.store.get_session(out.session_id).unwrap().unwrap();
    assert_eq!(s.state, SessionState::Completed);
    assert_eq!(s.user_name.as_deref(), Some("Alice"));
    assert_eq!(s.user_email.as_deref(), Some("alice@example.com"));
    assert!(s.pkce_verifier.is_none() && s.state_hash.is_none());
    let user = h.store.get_user(APP_ID, ALICE).unwrap().unwrap();
    assert_eq!(user.name.as_deref(), Some("Alice"));
    let raw = std::fs::read(&h.path).unwrap();
    for secret in [ACCESS_1, REFRESH_1, verifier] {
        assert!(
            !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "a secret is stored in clear"
        );
    }

    // The card became the authorized card.
    let patches = h.patched_cards().await;
    assert_eq!(patches.len(), 1);
    assert_eq!(patches[0]["header"]["template"], "green");
    assert!(
        h.requests("PATCH", "/open-apis/im/v1/messages/om_1")
            .await
            .len()
            == 1
    );

    assert_eq!(success(), ok0 + 1);
    assert_eq!(duration_count(), dur0 + 1);

    // Replaying the redirect: state_mismatch, the completed session untouched, no 2nd exchange.
    let sm = failures(FailureReason::StateMismatch);
    let (status, html) = h
        .svc
        .oauth_callback(&format!("code={CODE}&state={state}"))
        .await;
    assert_eq!(status, 400);
    assert_eq!(page_title(&html.0), "Authorization failed");
    assert_eq!(failures(FailureReason::StateMismatch), sm + 1);
    assert_eq!(
        h.store.get_session(out.session_id).unwrap().unwrap().state,
        SessionState::Completed
    );
    assert_eq!(success(), ok0 + 1);
}

fn base64_url(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_state_is_state_mismatch() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    h.mount_send_card("om_1", 1).await;
    h.mount_exchange(0).await;
    let out = h.request_alice().await;
    let sm = failures(FailureReason::StateMismatch);
    for q in [
        format!("code={CODE}&state=not-the-state"),
        format!("code={CODE}"),
        String::new(),
    ] {
        let (status, html) = h.svc.oauth_callback(&q).await;
        assert_eq!(status, 400);
        assert!(html.0.contains("no longer valid"));
    }
    assert_eq!(failures(FailureReason::StateMismatch), sm + 3);
    assert_eq!(
        h.store.get_session(out.session_id).unwrap().unwrap().state,
        SessionState::Pending
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_code_and_access_denied_end_the_session() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    h.mount_send_card("om_1", 2).await;
    h.mount_patch().await;
    h.mount_exchange(0).await;

    let a = h.request_alice().await;
    let state = state_of(&h.sent_cards().await[0]);
    let mc = failures(FailureReason::MissingCode);
    let (status, html) = h.svc.oauth_callback(&format!("state={state}")).await;
    assert_eq!(status, 400);
    assert_eq!(page_title(&html.0), "Authorization failed");
    let s = h.store.get_session(a.session_id).unwrap().unwrap();
    assert_eq!(
        (s.state, s.failure_reason),
        (SessionState::Failed, Some(FailureReason::MissingCode))
    );
    assert_eq!(failures(FailureReason::MissingCode), mc + 1);

    let b = h
        .svc
        .request(AuthRequest {
            user: UserRef::OpenId(ALICE.into()),
            scopes: vec!["other:scope".into()],
        })
        .await
        .unwrap();
    let state = state_of(&h.sent_cards().await[1]);
    let ur = failures(FailureReason::UserRejected);
    let (status, html) = h
        .svc
        .oauth_callback(&format!("error=access_denied&state={state}"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(page_title(&html.0), "Authorization declined");
    let s = h.store.get_session(b.session_id).unwrap().unwrap();
    assert_eq!(
        (s.state, s.failure_reason),
        (SessionState::Rejected, Some(FailureReason::UserRejected))
    );
    assert_eq!(failures(FailureReason::UserRejected), ur + 1);
    let patches = h.patched_cards().await;
    assert_eq!(patches.len(), 2);
    assert_eq!(
        patches[0]["header"]["title"]["content"],
        "Authorization failed"
    );
    assert_eq!(patches[1]["header"]["template"], "grey");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_expired_at_the_token_endpoint_fails_the_session() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    h.mount_send_card("om_1", 1).await;
    h.mount_patch().await;
    Mock::given(method("POST"))
        .and(path(OAUTH_TOKEN_PATH))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({
            "code": 20004, "error": "invalid_grant", "error_description": "code expired"
        })))
        .expect(1)
        .mount(&h.server)
        .await;
    let out = h.request_alice().await;
    let state = state_of(&h.sent_cards().await[0]);
    let ce = failures(FailureReason::CodeExpired);
    let (status, html) = h
        .svc
        .oauth_callback(&format!("code={CODE}&state={state}"))
        .await;
    assert_eq!(status, 400);
    assert!(html.0.contains("took too long"));
    let s = h.store.get_session(out.session_id).unwrap().unwrap();
    assert_eq!(
        (s.state, s.failure_reason),
        (SessionState::Failed, Some(FailureReason::CodeExpired))
    );
    assert_eq!(failures(FailureReason::CodeExpired), ce + 1);
    assert!(h.store.get_token(APP_ID, ALICE).unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_by_the_card_owner_returns_the_rejected_card() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    h.mount_send_card("om_1", 1).await;
    let out = h.request_alice().await;
    let value = json!({"action": "reject", "session_id": out.session_id.to_string()});
    let ur = failures(FailureReason::UserRejected);

    // Not ours: None. Someone else's click: refused, nothing changes.
    assert!(h
        .svc
        .card_action(&json!({"action": "other", "session_id": "x"}), ALICE)
        .await
        .unwrap()
        .is_none());
    let r = h
        .svc
        .card_action(&value, "ou_mallory")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r["toast"]["type"], "error");
    assert!(r.get("card").is_none());
    assert_eq!(
        h.store.get_session(out.session_id).unwrap().unwrap().state,
        SessionState::Pending
    );

    // The owner, with the value as a JSON string (§2.9).
    let r = h
        .svc
        .card_action(&Value::String(value.to_string()), ALICE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r["toast"]["type"], "info");
    assert_eq!(r["card"]["type"], "raw");
    assert_eq!(r["card"]["data"]["header"]["template"], "grey");
    assert_eq!(r["card"]["data"]["config"]["update_multi"], true);
    let s = h.store.get_session(out.session_id).unwrap().unwrap();
    assert_eq!(
        (s.state, s.failure_reason),
        (SessionState::Rejected, Some(FailureReason::UserRejected))
    );
    assert_eq!(failures(FailureReason::UserRejected), ur + 1);
    // The card is answered in the callback response, not PATCHed.
    assert!(h.patched_cards().await.is_empty());

    // A second click (cancel) changes nothing and counts nothing.
    let again = json!({"action": "cancel", "session_id": out.session_id.to_string()});
    let r = h.svc.card_action(&again, ALICE).await.unwrap().unwrap();
    assert!(r["toast"]["content"].as_str().unwrap().contains("rejected"));
    assert_eq!(failures(FailureReason::UserRejected), ur + 1);

    // The redirect after the rejection is refused.
    let state = state_of(&h.sent_cards().await[0]);
    let (status, _) = h
        .svc
        .oauth_callback(&format!("code={CODE}&state={state}"))
        .await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_expiry_patches_cards_and_later_redirects_are_refused() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    h.mount_send_card("om_1", 1).await;
    h.mount_patch().await;
    h.mount_exchange(0).await;
    let out = h.request_alice().await;
    let state = state_of(&h.sent_cards().await[0]);
    let se = failures(FailureReason::SessionExpired);

    h.advance(EXPIRY_MS);
    let report = h.store.sweep(h.now(), 100).unwrap();
    assert_eq!(
        report.expired,
        vec![(out.session_id, Some("om_1".to_owned()))]
    );
    h.svc.on_sweep_expired(report.expired).await;
    assert_eq!(failures(FailureReason::SessionExpired), se + 1);
    let patches = h.patched_cards().await;
    assert_eq!(patches.len(), 1);
    assert_eq!(patches[0]["header"]["template"], "orange");

    let sm = failures(FailureReason::StateMismatch);
    let (status, _) = h
        .svc
        .oauth_callback(&format!("code={CODE}&state={state}"))
        .await;
    assert_eq!(status, 400);
    assert_eq!(failures(FailureReason::StateMismatch), sm + 1);
    assert_eq!(failures(FailureReason::SessionExpired), se + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_after_expiry_but_before_the_sweep_expires_the_session() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    h.mount_send_card("om_1", 1).await;
    h.mount_patch().await;
    h.mount_exchange(0).await;
    let out = h.request_alice().await;
    let state = state_of(&h.sent_cards().await[0]);
    let se = failures(FailureReason::SessionExpired);
    h.advance(EXPIRY_MS + 1);
    let (status, html) = h
        .svc
        .oauth_callback(&format!("code={CODE}&state={state}"))
        .await;
    assert_eq!(status, 410);
    assert_eq!(page_title(&html.0), "Authorization request expired");
    let s = h.store.get_session(out.session_id).unwrap().unwrap();
    assert_eq!(
        (s.state, s.failure_reason),
        (SessionState::Expired, Some(FailureReason::SessionExpired))
    );
    assert_eq!(failures(FailureReason::SessionExpired), se + 1);
    // The sweep finds nothing left to expire: counted once.
    assert!(h.store.sweep(h.now(), 100).unwrap().expired.is_empty());
    assert_eq!(h.patched_cards().await.len(), 1);
}

/// Expiry committed by the sweep while the code is being exchanged wins; the completion is
/// dropped. The other order (completion first) leaves nothing for the sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_racing_completion_first_commit_wins_both_orders() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    h.mount_send_card("om_1", 2).await;
    h.mount_patch().await;
    h.mount_user_info(ALICE).await;
    Mock::given(method("POST"))
        .and(path(OAUTH_TOKEN_PATH))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(token_body(ACCESS_1, REFRESH_1))
                .set_delay(Duration::from_millis(1500)),
        )
        .expect(2)
        .mount(&h.server)
        .await;

    // Order 1: the redirect is in time; the sweep expires the session during the exchange.
    let out = h.request_alice().await;
    let state = state_of(&h.sent_cards().await[0]);
    let ok0 = success();
    let se = failures(FailureReason::SessionExpired);
    h.advance(EXPIRY_MS - 1);
    let svc = h.svc.clone();
    let q = format!("code={CODE}&state={state}");
    let cb = tokio::spawn(async move { svc.oauth_callback(&q).await });
    while h.requests("POST", OAUTH_TOKEN_PATH).await.is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    h.advance(10);
    let report = h.store.sweep(h.now(), 100).unwrap();
    assert_eq!(report.expired.len(), 1);
    h.svc.on_sweep_expired(report.expired).await;
    let (status, html) = cb.await.unwrap();
    assert_eq!(status, 410);
    assert_eq!(page_title(&html.0), "Authorization request expired");
    let s = h.store.get_session(out.session_id).unwrap().unwrap();
    assert_eq!(s.state, SessionState::Expired);
    assert!(h.store.get_token(APP_ID, ALICE).unwrap().is_none());
    assert_eq!(success(), ok0);
    assert_eq!(failures(FailureReason::SessionExpired), se + 1);

    // Order 2: the completion commits first; the sweep afterwards expires nothing.
    let out2 = h
        .svc
        .request(AuthRequest {
            user: UserRef::OpenId(ALICE.into()),
            scopes: vec!["contact:user.base:readonly".into()],
        })
        .await
        .unwrap();
    assert!(!out2.reused);
    let state = state_of(&h.sent_cards().await[1]);
    h.advance(EXPIRY_MS - 1);
    let (status, _) = h
        .svc
        .oauth_callback(&format!("code={CODE}&state={state}"))
        .await;
    assert_eq!(status, 200);
    h.advance(10);
    assert!(h.store.sweep(h.now(), 100).unwrap().expired.is_empty());
    assert_eq!(
        h.store.get_session(out2.session_id).unwrap().unwrap().state,
        SessionState::Completed
    );
    assert_eq!(success(), ok0 + 1);
    assert_eq!(failures(FailureReason::SessionExpired), se + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn someone_else_completing_the_flow_is_refused() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    h.mount_send_card("om_1", 1).await;
    h.mount_patch().await;
    h.mount_exchange(1).await;
    h.mount_user_info("ou_mallory").await;
    let out = h.request_alice().await;
    let state = state_of(&h.sent_cards().await[0]);
    let (status, _) = h
        .svc
        .oauth_callback(&format!("code={CODE}&state={state}"))
        .await;
    assert_eq!(status, 400);
    let s = h.store.get_session(out.session_id).unwrap().unwrap();
    assert_eq!(
        (s.state, s.failure_reason),
        (SessionState::Failed, Some(FailureReason::StateMismatch))
    );
    assert!(h.store.get_token(APP_ID, ALICE).unwrap().is_none());
}

const CONTACT_ALICE_PATH: &str = "/open-apis/contact/v3/users/u_alice";

impl H {
    /// The directory knows `u_alice` as Alice (`ou_alice`).
    async fn mount_contact_alice(&self) {
        Mock::given(method("GET"))
            .and(path(CONTACT_ALICE_PATH))
            .and(wiremock::matchers::query_param("user_id_type", "user_id"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "code": 0, "msg": "success",
                "data": {"user": {"open_id": ALICE, "user_id": "u_alice", "name": "Alice"}}
            })))
            .mount(&self.server)
            .await;
    }

    async fn request_u_alice(&self) -> Result<lark_service::auth::RequestOutcome, AuthError> {
        self.svc
            .request(AuthRequest {
                user: UserRef::UserId("u_alice".into()),
                scopes: vec!["contact:user.base:readonly".into()],
            })
            .await
    }

    /// The session failed for `reason`, no token is stored for the card's user by either id,
    /// and the card became the "Authorization failed" card.
    async fn assert_failed_without_token(
        &self,
        id: lark_service::storage::SessionId,
        reason: FailureReason,
    ) {
        let s = self.store.get_session(id).unwrap().unwrap();
        assert_eq!(
            (s.state, s.failure_reason),
            (SessionState::Failed, Some(reason))
        );
        assert!(s.access_token.is_none() && s.refresh_token.is_none());
        assert!(self.store.get_token(APP_ID, "u_alice").unwrap().is_none());
        assert!(self.store.get_token(APP_ID, ALICE).unwrap().is_none());
        let patches = self.patched_cards().await;
        assert_eq!(patches.len(), 1);
        assert_eq!(
            patches[0]["header"]["title"]["content"],
            "Authorization failed"
        );
    }
}

/// Issue 16 (fail closed): a request by user_id, approved on the consent page by someone else
/// whose user info carries no user_id (the app may not read user_ids), fails as
/// `state_mismatch`: the user_id was resolved to Alice's open_id when the card went out, and
/// the open_ids differ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_id_request_approved_by_another_user_fails() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    h.mount_contact_alice().await;
    h.mount_send_card("om_1", 1).await;
    h.mount_patch().await;
    h.mount_exchange(1).await;
    h.mount_user_info("ou_mallory").await;
    let (ok0, sm0) = (success(), failures(FailureReason::StateMismatch));
    let out = h.request_u_alice().await.unwrap();
    let state = state_of(&h.sent_cards().await[0]);
    let (status, html) = h
        .svc
        .oauth_callback(&format!("code={CODE}&state={state}"))
        .await;
    assert_eq!(status, 400);
    assert_eq!(page_title(&html.0), "Authorization failed");
    h.assert_failed_without_token(out.session_id, FailureReason::StateMismatch)
        .await;
    assert_eq!(success(), ok0);
    assert_eq!(failures(FailureReason::StateMismatch), sm0 + 1);
}

/// The same request approved by Alice herself completes (her open_id matches), and the token
/// is kept under the user_id it was asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_id_request_approved_by_its_user_completes() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    h.mount_contact_alice().await;
    h.mount_send_card("om_1", 1).await;
    h.mount_patch().await;
    h.mount_exchange(1).await;
    h.mount_user_info(ALICE).await;
    let out = h.request_u_alice().await.unwrap();
    let s = h.store.get_session(out.session_id).unwrap().unwrap();
    assert_eq!(s.open_id.as_deref(), Some(ALICE));
    let state = state_of(&h.sent_cards().await[0]);
    let (status, _) = h
        .svc
        .oauth_callback(&format!("code={CODE}&state={state}"))
        .await;
    assert_eq!(status, 200);
    let tok = h.store.get_token(APP_ID, "u_alice").unwrap().unwrap();
    assert_eq!(tok.open_id.as_deref(), Some(ALICE));
    assert_eq!(tok.access_token.expose_secret(), ACCESS_1);
}

/// A user_id the directory cannot resolve is refused at once: no session is left pending and
/// no card goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_id_request_that_cannot_be_resolved_is_refused() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    Mock::given(method("GET"))
        .and(path(CONTACT_ALICE_PATH))
        .respond_with(
            ResponseTemplate::new(400)
                .set_body_json(json!({"code": 41050, "msg": "no user authority error"})),
        )
        .mount(&h.server)
        .await;
    h.mount_send_card("om_1", 0).await;
    let err = h.request_u_alice().await.unwrap_err();
    assert!(
        matches!(&err, AuthError::UnresolvedUser { user_id, .. } if user_id == "u_alice"),
        "{err:?}"
    );
    assert!(err.to_string().contains("u_alice"), "{err}");
    assert!(h.sent_cards().await.is_empty());
    assert!(h
        .store
        .sessions_for_user(APP_ID, "u_alice")
        .unwrap()
        .iter()
        .all(|s| s.state != SessionState::Pending));
}

/// Issue 16 (fail closed): when the new token's user info cannot be read, who completed the
/// flow is unknown: the session fails (`unknown_error`), no token is stored, the card says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_info_failing_fails_the_session_and_stores_no_token() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    h.mount_contact_alice().await;
    h.mount_send_card("om_1", 1).await;
    h.mount_patch().await;
    h.mount_exchange(1).await;
    Mock::given(method("GET"))
        .and(path(USER_INFO_PATH))
        .respond_with(ResponseTemplate::new(500).set_body_string("upstream broke"))
        .mount(&h.server)
        .await;
    let (ok0, ue0) = (success(), failures(FailureReason::UnknownError));
    let out = h.request_u_alice().await.unwrap();
    let state = state_of(&h.sent_cards().await[0]);
    let (status, html) = h
        .svc
        .oauth_callback(&format!("code={CODE}&state={state}"))
        .await;
    assert_eq!(status, 502);
    assert_eq!(page_title(&html.0), "Authorization failed");
    assert!(!h.requests("GET", USER_INFO_PATH).await.is_empty());
    h.assert_failed_without_token(out.session_id, FailureReason::UnknownError)
        .await;
    assert_eq!(success(), ok0);
    assert_eq!(failures(FailureReason::UnknownError), ue0 + 1);
}

/// Issue 16: the completing user must belong to the app's own tenant; a user info that names
/// another tenant (or none) fails the session and stores no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorization_completed_by_a_user_of_another_tenant_fails() {
    let _s = SERIAL.lock().await;
    for (tenant, reason, status) in [
        ("another-company", FailureReason::StateMismatch, 400),
        ("", FailureReason::UnknownError, 502),
    ] {
        let h = harness().await;
        h.mount_contact_alice().await;
        h.mount_send_card("om_1", 1).await;
        h.mount_patch().await;
        h.mount_exchange(1).await;
        h.mount_user_info_in(ALICE, tenant).await;
        let out = h.request_u_alice().await.unwrap();
        let state = state_of(&h.sent_cards().await[0]);
        let (got, html) = h
            .svc
            .oauth_callback(&format!("code={CODE}&state={state}"))
            .await;
        assert_eq!(got, status, "tenant {tenant:?}");
        assert_eq!(page_title(&html.0), "Authorization failed");
        h.assert_failed_without_token(out.session_id, reason).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_refuses_the_n_plus_first_request_without_a_card() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    // Three cards within the window, then one more after it slides.
    h.mount_send_card("om_1", 4).await;
    let rl = metrics::get().auth_rate_limited.get();
    for i in 0..3 {
        h.advance(1_000);
        let o = h
            .svc
            .request(AuthRequest {
                user: UserRef::OpenId(ALICE.into()),
                scopes: vec![format!("scope:{i}")],
            })
            .await
            .unwrap();
        assert!(!o.reused);
    }
    let err = h
        .svc
        .request(AuthRequest {
            user: UserRef::OpenId(ALICE.into()),
            scopes: vec!["scope:3".into()],
        })
        .await
        .unwrap_err();
    match err {
        // The oldest request was at T0+1s; the window is 60 s; now is T0+3s.
        AuthError::RateLimited { retry_after } => {
            assert_eq!(retry_after, Duration::from_secs(58));
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    assert_eq!(metrics::get().auth_rate_limited.get(), rl + 1);
    assert_eq!(h.sent_cards().await.len(), 3);
    // Once the oldest request leaves the window, the next one is accepted.
    h.advance(58_000);
    h.svc
        .request(AuthRequest {
            user: UserRef::OpenId(ALICE.into()),
            scopes: vec!["scope:3".into()],
        })
        .await
        .unwrap();
    assert_eq!(h.sent_cards().await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_session_for_the_same_scopes_is_reused() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    h.mount_send_card("om_1", 1).await;
    let a = h.request_alice().await;
    let created = sessions_created();
    h.advance(1_000);
    let b = h
        .svc
        .request(AuthRequest {
            user: UserRef::OpenId(ALICE.into()),
            // Same set, other order, offline_access spelled out.
            scopes: vec!["offline_access".into(), "contact:user.base:readonly".into()],
        })
        .await
        .unwrap();
    assert!(b.reused);
    assert_eq!(a.session_id, b.session_id);
    assert_eq!(h.sent_cards().await.len(), 1);
    // A reused session is no new session.
    assert_eq!(sessions_created(), created);
}

/// A pending session whose card was never recorded as sent (its instance died between storing
/// it and sending the card) is not reused: the user would wait for a card that never came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_session_without_a_card_is_not_reused() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    h.mount_send_card("om_1", 2).await;
    let a = h.request_alice().await;
    let mut cardless = h.store.get_session(a.session_id).unwrap().unwrap();
    cardless.card_message_id = None;
    h.store.put_session(&cardless).unwrap();
    h.advance(1_000);
    let b = h.request_alice().await;
    assert!(!b.reused, "a session with no card sent was reused");
    assert_ne!(a.session_id, b.session_id);
    assert_eq!(h.sent_cards().await.len(), 2, "a card for the new session");
}

fn put_due_token(h: &H, user: &str) {
    let now = h.now();
    h.store
        .put_token(&UserToken {
            app_id: APP_ID.into(),
            user_id: user.into(),
            open_id: Some(user.into()),
            access_token: SecretString::from(ACCESS_1),
            refresh_token: Some(SecretString::from(REFRESH_1)),
            expires_at: now + 1_000_000,
            refresh_expires_at: Some(now + 100_000_000),
            refresh_due_at: now - 1,
            scopes: vec!["offline_access".into()],
            obtained_at: now - 6_000_000,
            session_id: None,
            needs_reauth: false,
            refresh_in_doubt_since: None,
        })
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_due_token_is_refreshed_exactly_once_under_concurrent_callers() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    put_due_token(&h, ALICE);
    Mock::given(method("POST"))
        .and(path(OAUTH_TOKEN_PATH))
        .and(body_partial_json(
            json!({"grant_type": "refresh_token", "refresh_token": REFRESH_1}),
        ))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(token_body(ACCESS_2, REFRESH_2))
                .set_delay(Duration::from_millis(200)),
        )
        .expect(1)
        .mount(&h.server)
        .await;
    let ok = refreshes("success");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let svc = h.svc.clone();
        tasks.push(tokio::spawn(async move {
            svc.user_token(UserRef::OpenId(ALICE.into())).await
        }));
    }
    let worker = h.svc.refresh_due_tokens();
    let (next, results) = tokio::join!(worker, futures_join(tasks));
    next.unwrap();
    for r in results {
        assert_eq!(r.unwrap().expose_secret(), ACCESS_2);
    }
    assert_eq!(refreshes("success"), ok + 1);
    let tok = h.store.get_token(APP_ID, ALICE).unwrap().unwrap();
    assert_eq!(tok.refresh_token.unwrap().expose_secret(), REFRESH_2);
    assert_eq!(tok.refresh_due_at, h.now() + 5_760_000);
    // Nothing is due any more.
    assert!(h.store.tokens_due(h.now(), 10).unwrap().is_empty());
}

/// A refresh runs on the tracker the service was given: when its caller is dropped, the
/// tracker still holds it, and waiting for the tracker (what the daemon's supervisor does at
/// shutdown) waits until the rotated token is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_runs_on_the_given_tracker_and_is_stored_after_its_caller_is_dropped() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    put_due_token(&h, ALICE);
    Mock::given(method("POST"))
        .and(path(OAUTH_TOKEN_PATH))
        .and(body_partial_json(
            json!({"grant_type": "refresh_token", "refresh_token": REFRESH_1}),
        ))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(token_body(ACCESS_2, REFRESH_2))
                .set_delay(Duration::from_millis(300)),
        )
        .expect(1)
        .mount(&h.server)
        .await;
    let tracker = tokio_util::task::TaskTracker::new();
    let svc = h.svc.clone().with_tasks(tracker.clone());
    assert!(tracker.is_empty());
    let caller = tokio::spawn(async move { svc.user_token(UserRef::OpenId(ALICE.into())).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(tracker.len(), 1, "the refresh runs on the given tracker");
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());
    tracker.close();
    tokio::time::timeout(Duration::from_secs(10), tracker.wait())
        .await
        .unwrap();
    let tok = h.store.get_token(APP_ID, ALICE).unwrap().unwrap();
    assert_eq!(tok.access_token.expose_secret(), ACCESS_2);
    assert_eq!(tok.refresh_token.unwrap().expose_secret(), REFRESH_2);
}

async fn futures_join(
    tasks: Vec<tokio::task::JoinHandle<Result<SecretString, TokenError>>>,
) -> Vec<Result<SecretString, TokenError>> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

async fn serve(h: &H) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let guard = lark_service::http::bearer::BearerGuard::new(
        Some(SecretString::from(ADMIN)),
        "admin",
        std::sync::Arc::default(),
    );
    let app = h
        .svc
        .clone()
        .public_router()
        .merge(h.svc.clone().admin_router(guard));
    tokio::spawn(lark_service::http::serve::serve(
        listener,
        app,
        lark_service::http::serve::Limits::default(),
        tokio_util::sync::CancellationToken::new(),
    ));
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_marks_the_token_for_reauthorization_and_the_api_says_409() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    put_due_token(&h, ALICE);
    Mock::given(method("POST"))
        .and(path(OAUTH_TOKEN_PATH))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({
            "code": 20064, "error": "invalid_grant", "error_description": "revoked"
        })))
        .expect(1)
        .mount(&h.server)
        .await;
    let reauth = refreshes("reauth_required");
    h.svc.refresh_due_tokens().await.unwrap();
    assert_eq!(refreshes("reauth_required"), reauth + 1);
    let tok = h.store.get_token(APP_ID, ALICE).unwrap().unwrap();
    assert!(tok.needs_reauth);
    assert!(h.store.tokens_due(u64::MAX - 1, 10).unwrap().is_empty());
    assert!(matches!(
        h.svc.user_token(UserRef::OpenId(ALICE.into())).await,
        Err(TokenError::NeedsReauth { .. })
    ));

    let base = serve(&h).await;
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{base}/api/v1/users/{ALICE}/token"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["reason"], "needs_reauthorization");
    let r = http
        .get(format!("{base}/api/v1/users/ou_nobody/token"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http
        .get(format!("{base}/api/v1/users/{ALICE}/token"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// The admin routes that name a session or a user refuse a malformed name as a 400 naming the
/// field, and answer 404 for a session that is not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_refuse_bad_ids_and_answer_missing_sessions() {
    let h = harness().await;
    let base = serve(&h).await;
    let http = reqwest::Client::new();
    let call = |m: reqwest::Method, path: &str| {
        http.request(m, format!("{base}{path}"))
            .bearer_auth(ADMIN)
            .send()
    };
    let missing = "0123456789abcdef0123456789abcdef";
    for (m, path, status, field) in [
        (
            reqwest::Method::GET,
            "/api/v1/auth/sessions/xyz".to_owned(),
            400,
            Some("id"),
        ),
        (
            reqwest::Method::POST,
            "/api/v1/sessions/xyz/revoke".to_owned(),
            400,
            Some("id"),
        ),
        (
            reqwest::Method::GET,
            format!("/api/v1/auth/sessions/{missing}"),
            404,
            None,
        ),
        (
            reqwest::Method::POST,
            format!("/api/v1/sessions/{missing}/revoke"),
            404,
            None,
        ),
        (
            reqwest::Method::GET,
            format!("/api/v1/users/{ALICE}/token?id_type=email"),
            400,
            Some("id_type"),
        ),
        (
            reqwest::Method::DELETE,
            format!("/api/v1/users/{ALICE}/token?id_type=email"),
            400,
            Some("id_type"),
        ),
    ] {
        let r = call(m.clone(), &path).await.unwrap();
        assert_eq!(r.status(), status, "{m} {path}");
        let v: Value = r.json().await.unwrap();
        match field {
            Some(f) => {
                assert_eq!(v["error"], "invalid_request", "{m} {path}: {v}");
                assert_eq!(v["field"], f, "{m} {path}: {v}");
            }
            None => assert_eq!(v["error"], "not_found", "{m} {path}: {v}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_routes_request_session_callback_and_token() {
    let _s = SERIAL.lock().await;
    let h = harness_with(AuthOptions {
        rate_limit: 2,
        ..options()
    })
    .await;
    h.mount_send_card("om_1", 1).await;
    h.mount_patch().await;
    h.mount_exchange(1).await;
    h.mount_user_info(ALICE).await;
    let base = serve(&h).await;
    let http = reqwest::Client::new();
    let post = |b: Value| {
        http.post(format!("{base}/api/v1/auth/requests"))
            .bearer_auth(ADMIN)
            .json(&b)
    };

    let r = http
        .post(format!("{base}/api/v1/auth/requests"))
        .json(&json!({"open_id": ALICE}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    for (b, field) in [
        (json!({}), "user_id"),
        (json!({"open_id": 5}), "open_id"),
        (json!({"open_id": ALICE, "user_id": "u1"}), "user_id"),
        (json!({"open_id": ALICE, "scopes": 3}), "scopes"),
        (json!({"open_id": ALICE, "scopes": ["a b"]}), "scopes"),
        (json!([1]), "body"),
    ] {
        let r = post(b).send().await.unwrap();
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["field"], field);
    }

    let r = post(json!({"open_id": ALICE})).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    let id = v["session_id"].as_str().unwrap().to_owned();
    let r = post(json!({"open_id": ALICE, "scopes": "contact:user.base:readonly"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["reused"], true);
    let r = post(json!({"open_id": ALICE})).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "60");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "rate_limited");

    let session = |id: String| {
        http.get(format!("{base}/api/v1/auth/sessions/{id}"))
            .bearer_auth(ADMIN)
            .send()
    };
    let v: Value = session(id.clone()).await.unwrap().json().await.unwrap();
    assert_eq!(v["state"], "pending");
    assert_eq!(session("nope".into()).await.unwrap().status(), 400);
    assert_eq!(session("0".repeat(32)).await.unwrap().status(), 404);

    let state = state_of(&h.sent_cards().await[0]);
    let r = http
        .get(format!("{base}/oauth/callback?code={CODE}&state={state}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert!(r.text().await.unwrap().contains("Authorization complete"));

    let r = session(id).await.unwrap();
    let text = r.text().await.unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["state"], "completed");
    assert_eq!(v["has_tokens"], true);
    assert!(!text.contains(ACCESS_1) && !text.contains(REFRESH_1));

    let r = http
        .get(format!("{base}/api/v1/users/{ALICE}/token"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["access_token"], ACCESS_1);
    assert_eq!(v["expires_at"], h.now() + 7_200_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_flow_survives_a_restart() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    h.mount_send_card("om_1", 1).await;
    h.mount_patch().await;
    h.mount_exchange(1).await;
    h.mount_user_info(ALICE).await;
    let out = h.request_alice().await;
    let state = state_of(&h.sent_cards().await[0]);

    let H {
        server,
        svc,
        store,
        clock,
        _dir,
        path,
    } = h;
    drop(svc);
    drop(store);
    let store = Store::open(&path, ring(), StoreOptions::default()).unwrap();
    let svc = service(&server, &store, &clock, options());
    let (status, _) = svc
        .oauth_callback(&format!("code={CODE}&state={state}"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        store.get_session(out.session_id).unwrap().unwrap().state,
        SessionState::Completed
    );
    assert_eq!(
        store
            .get_token(APP_ID, ALICE)
            .unwrap()
            .unwrap()
            .access_token
            .expose_secret(),
        ACCESS_1
    );
}

fn message_event(chat_type: &str, text: &str) -> Value {
    json!({
        "schema": "2.0",
        "header": {"event_type": "im.message.receive_v1", "app_id": APP_ID},
        "event": {
            "sender": {"sender_id": {"open_id": ALICE, "user_id": "u_alice"}, "sender_type": "user"},
            "message": {"chat_type": chat_type, "message_type": "text",
                        "content": json!({"text": text}).to_string(), "chat_id": "oc_1"}
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_command_in_a_p2p_chat_starts_a_request() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    h.mount_send_card("om_1", 1).await;
    assert!(h
        .svc
        .message_command(&message_event("group", "/authorize"))
        .await
        .unwrap()
        .is_none());
    assert!(h
        .svc
        .message_command(&message_event("p2p", "hello"))
        .await
        .unwrap()
        .is_none());
    let out = h
        .svc
        .message_command(&message_event("p2p", " /authorize "))
        .await
        .unwrap()
        .unwrap();
    let s = h.store.get_session(out.session_id).unwrap().unwrap();
    assert_eq!(s.user_id, ALICE);
    assert_eq!(
        s.scopes,
        vec!["contact:user.base:readonly", "offline_access"]
    );
    let sends = h.requests("POST", MESSAGES_PATH).await;
    assert_eq!(body(&sends[0])["receive_id"], ALICE);
    // "authorize" without the slash reuses the pending request.
    let again = h
        .svc
        .message_command(&message_event("p2p", "Authorize"))
        .await
        .unwrap()
        .unwrap();
    assert!(again.reused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_info_sync_refreshes_names_and_avatars() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    h.store
        .put_user(&UserInfo {
            app_id: APP_ID.into(),
            open_id: ALICE.into(),
            user_id: None,
            union_id: None,
            name: Some("Old Name".into()),
            email: None,
            avatar_url: None,
            updated_at: 1,
        })
        .unwrap();
    Mock::given(method("GET"))
        .and(path(format!("/open-apis/contact/v3/users/{ALICE}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "code": 0, "msg": "success",
            "data": {"user": {"open_id": ALICE, "user_id": "u_alice", "name": "Alice",
                              "email": "alice@example.com",
                              "avatar": {"avatar_240": "https://a.example/240.png"}}}
        })))
        .expect(1)
        .mount(&h.server)
        .await;
    let r = h.svc.sync_user_info().await.unwrap();
    assert_eq!((r.updated, r.failed), (1, 0));
    let u = h.store.get_user(APP_ID, ALICE).unwrap().unwrap();
    assert_eq!(u.name.as_deref(), Some("Alice"));
    assert_eq!(u.user_id.as_deref(), Some("u_alice"));
    assert_eq!(u.avatar_url.as_deref(), Some("https://a.example/240.png"));
    assert_eq!(u.updated_at, h.now());
}

#[test]
fn page_kinds_have_distinct_titles() {
    use lark_service::auth::flow::page_html;
    let titles: Vec<String> = [
        Page::Authorized,
        Page::Rejected,
        Page::Expired,
        Page::Failed(FailureReason::CodeExpired),
    ]
    .into_iter()
    .map(|p| page_title(&page_html(p).1 .0).to_owned())
    .collect();
    assert_eq!(
        titles,
        [
            "Authorization complete",
            "Authorization declined",
            "Authorization request expired",
            "Authorization failed"
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Issue 16: a refresh whose answer is lost.

async fn mount_refresh_lost(h: &H, times: Option<u64>) {
    let mut m = Mock::given(method("POST"))
        .and(path(OAUTH_TOKEN_PATH))
        .and(body_partial_json(
            json!({"grant_type": "refresh_token", "refresh_token": REFRESH_1}),
        ))
        .respond_with(ResponseTemplate::new(503).set_body_json(
            json!({"code": 20072, "error": "temporarily_unavailable", "error_description": "busy"}),
        ))
        .with_priority(1);
    if let Some(n) = times {
        m = m.up_to_n_times(n);
    }
    m.mount(&h.server).await;
}

/// The paths of the token endpoint and user info calls, in the order they were made.
/// The refresh requests and the probes: user-info reads with the old access token (a
/// successful refresh also reads user info with the new token, to update the user's record;
/// that is not a probe).
async fn refresh_and_probe_calls(h: &H) -> Vec<String> {
    let probe = format!("Bearer {ACCESS_1}");
    h.server
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| {
            let p = r.url.path();
            p == OAUTH_TOKEN_PATH
                || (p == USER_INFO_PATH
                    && r.headers
                        .get("authorization")
                        .is_some_and(|v| v.as_bytes() == probe.as_bytes()))
        })
        .map(|r| r.url.path().to_owned())
        .collect()
}

/// A lost answer puts the refresh in doubt: persisted on the token, no token handed out, the
/// refresh token not presented again. After the grace, the old access token is refused by the
/// platform: the refresh took effect and its result is lost, so the user must authorize again,
/// and the spent refresh token was presented exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_refresh_is_not_presented_again_when_the_old_token_shows_it_took_effect() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    put_due_token(&h, ALICE);
    mount_refresh_lost(&h, None).await;

    h.svc.refresh_due_tokens().await.unwrap();
    let tok = h.store.get_token(APP_ID, ALICE).unwrap().unwrap();
    assert!(
        tok.refresh_in_doubt_since.is_some(),
        "the doubt is persisted"
    );
    assert!(!tok.needs_reauth);
    assert!(matches!(
        h.svc.user_token(UserRef::OpenId(ALICE.into())).await,
        Err(TokenError::RefreshInDoubt { .. })
    ));
    // Before the check can tell anything, nothing is sent again.
    h.advance(60_000);
    h.svc.refresh_due_tokens().await.unwrap();
    assert_eq!(refresh_and_probe_calls(&h).await, vec![OAUTH_TOKEN_PATH]);

    // Past the grace: the old access token is refused although it has not expired.
    h.advance(61_000);
    Mock::given(method("GET"))
        .and(path(USER_INFO_PATH))
        .and(header(
            "authorization",
            format!("Bearer {ACCESS_1}").as_str(),
        ))
        .respond_with(
            ResponseTemplate::new(400)
                .set_body_json(json!({"code": 99991668, "msg": "user access token invalid"})),
        )
        .mount(&h.server)
        .await;
    h.svc.refresh_due_tokens().await.unwrap();
    assert_eq!(
        refresh_and_probe_calls(&h).await,
        vec![OAUTH_TOKEN_PATH, USER_INFO_PATH],
        "checked with the old access token; the refresh token is not presented twice"
    );
    assert!(
        h.store
            .get_token(APP_ID, ALICE)
            .unwrap()
            .unwrap()
            .needs_reauth
    );
    assert!(matches!(
        h.svc.user_token(UserRef::OpenId(ALICE.into())).await,
        Err(TokenError::NeedsReauth { .. })
    ));
}

/// The old access token still works past the grace: the lost refresh did not take effect, so
/// the refresh token is presented again (after the check) and the user has a working token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_refresh_is_retried_once_the_old_token_shows_it_did_not_take_effect() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    put_due_token(&h, ALICE);
    mount_refresh_lost(&h, Some(1)).await;
    Mock::given(method("POST"))
        .and(path(OAUTH_TOKEN_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body(ACCESS_2, REFRESH_2)))
        .mount(&h.server)
        .await;
    h.mount_user_info(ALICE).await;

    h.svc.refresh_due_tokens().await.unwrap();
    assert!(h
        .store
        .get_token(APP_ID, ALICE)
        .unwrap()
        .unwrap()
        .refresh_in_doubt_since
        .is_some());
    h.advance(121_000);
    h.svc.refresh_due_tokens().await.unwrap();
    assert_eq!(
        refresh_and_probe_calls(&h).await,
        vec![OAUTH_TOKEN_PATH, USER_INFO_PATH, OAUTH_TOKEN_PATH]
    );
    let tok = h.store.get_token(APP_ID, ALICE).unwrap().unwrap();
    assert_eq!(tok.access_token.expose_secret(), ACCESS_2);
    assert_eq!(tok.refresh_token.unwrap().expose_secret(), REFRESH_2);
    assert!(tok.refresh_in_doubt_since.is_none() && !tok.needs_reauth);
    assert_eq!(
        h.svc
            .user_token(UserRef::OpenId(ALICE.into()))
            .await
            .unwrap()
            .expose_secret(),
        ACCESS_2
    );
}

/// When the old access token expires before the check can run, the check cannot tell what
/// happened: fail closed (authorize again), without presenting the refresh token again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_refresh_that_cannot_be_checked_fails_closed() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    put_due_token(&h, ALICE);
    mount_refresh_lost(&h, None).await;
    h.mount_user_info(ALICE).await;
    h.svc.refresh_due_tokens().await.unwrap();
    // The old access token expires (put_due_token: in 1000 s) before anyone looks again.
    h.advance(1_000_000);
    assert!(matches!(
        h.svc.user_token(UserRef::OpenId(ALICE.into())).await,
        Err(TokenError::NeedsReauth { .. })
    ));
    assert_eq!(refresh_and_probe_calls(&h).await, vec![OAUTH_TOKEN_PATH]);
}

/// `GET /api/v1/users/{id}/token?request=true` for a user without a token sends the Authorize
/// card and says so (202, the session); asked again, it points at the card already waiting; the
/// per-user rate limit still applies; without `request=true` it only answers 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_call_with_request_true_sends_the_card_when_there_is_no_token() {
    let _s = SERIAL.lock().await;
    let h = harness_with(AuthOptions {
        rate_limit: 2,
        ..options()
    })
    .await;
    h.mount_send_card("om_1", 1).await;
    let base = serve(&h).await;
    let http = reqwest::Client::new();
    let get = |q: &str| {
        http.get(format!("{base}/api/v1/users/{ALICE}/token{q}"))
            .bearer_auth(ADMIN)
            .send()
    };
    let r = get("").await.unwrap();
    assert_eq!(r.status(), 404, "without request=true nothing is sent");
    assert_eq!(h.sent_cards().await.len(), 0);

    let r = get("?request=true").await.unwrap();
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "no_token", "{v}");
    assert_eq!(v["authorization_requested"], true, "{v}");
    assert_eq!(v["reused"], false, "{v}");
    let sid = v["session_id"].as_str().unwrap().to_owned();
    assert_eq!(h.sent_cards().await.len(), 1, "the card was sent");
    let id: lark_service::storage::SessionId = sid.parse().unwrap();
    let s = h.store.get_session(id).unwrap().unwrap();
    assert_eq!(s.card_message_id.as_deref(), Some("om_1"));
    assert!(v.get("access_token").is_none());

    // Asked again: the same pending session, no second card.
    let v: Value = get("?request=true").await.unwrap().json().await.unwrap();
    assert_eq!(v["reused"], true, "{v}");
    assert_eq!(v["session_id"], sid.as_str());
    assert_eq!(h.sent_cards().await.len(), 1, "no second card");
    // The per-user rate limit (2) holds for this path too.
    let r = get("?request=true").await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
}

/// A refresh also brings the user's record up to date from user info read with the new token
/// (as the Python deployment did); a user info that names someone else changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_also_updates_the_users_info() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    put_due_token(&h, ALICE);
    h.store
        .put_user(&lark_service::storage::UserInfo {
            app_id: APP_ID.into(),
            open_id: ALICE.into(),
            user_id: Some("u_alice".into()),
            union_id: None,
            name: Some("Alice Old".into()),
            email: None,
            avatar_url: None,
            updated_at: 1,
        })
        .unwrap();
    Mock::given(method("POST"))
        .and(path(OAUTH_TOKEN_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body(ACCESS_2, REFRESH_2)))
        .expect(1)
        .mount(&h.server)
        .await;
    Mock::given(method("GET"))
        .and(path(USER_INFO_PATH))
        .and(header(
            "authorization",
            format!("Bearer {ACCESS_2}").as_str(),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "code": 0, "msg": "success",
            "data": {"open_id": ALICE, "union_id": "on_alice", "name": "Alice Renamed",
                     "email": "alice.new@example.com", "avatar_url": "https://a.example/new.png"}
        })))
        .expect(1)
        .mount(&h.server)
        .await;
    let tracker = tokio_util::task::TaskTracker::new();
    let svc = h.svc.clone().with_tasks(tracker.clone());
    svc.refresh_due_tokens().await.unwrap();
    tracker.close();
    tokio::time::timeout(Duration::from_secs(10), tracker.wait())
        .await
        .unwrap();
    let u = h.store.get_user(APP_ID, ALICE).unwrap().unwrap();
    assert_eq!(u.name.as_deref(), Some("Alice Renamed"));
    assert_eq!(u.email.as_deref(), Some("alice.new@example.com"));
    assert_eq!(u.avatar_url.as_deref(), Some("https://a.example/new.png"));
    assert_eq!(u.union_id.as_deref(), Some("on_alice"));
    assert_eq!(
        u.user_id.as_deref(),
        Some("u_alice"),
        "what user info lacks is kept"
    );
    assert_eq!(u.updated_at, h.now());
    let tok = h.store.get_token(APP_ID, ALICE).unwrap().unwrap();
    assert_eq!(tok.access_token.expose_secret(), ACCESS_2);
}

/// A user info after a refresh that names another user leaves the record as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_leaves_the_user_record_when_user_info_names_someone_else() {
    let _s = SERIAL.lock().await;
    let h = harness().await;
    put_due_token(&h, ALICE);
    Mock::given(method("POST"))
        .and(path(OAUTH_TOKEN_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body(ACCESS_2, REFRESH_2)))
        .mount(&h.server)
        .await;
    Mock::given(method("GET"))
        .and(path(USER_INFO_PATH))
        .and(header(
            "authorization",
            format!("Bearer {ACCESS_2}").as_str(),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "code": 0, "msg": "success",
            "data": {"open_id": "ou_mallory", "name": "Mallory"}
        })))
        .expect(1)
        .mount(&h.server)
        .await;
    let tracker = tokio_util::task::TaskTracker::new();
    let svc = h.svc.clone().with_tasks(tracker.clone());
    svc.refresh_due_tokens().await.unwrap();
    tracker.close();
    tokio::time::timeout(Duration::from_secs(10), tracker.wait())
        .await
        .unwrap();
    assert!(h.store.get_user(APP_ID, ALICE).unwrap().is_none());
    assert!(h.store.get_user(APP_ID, "ou_mallory").unwrap().is_none());
}
