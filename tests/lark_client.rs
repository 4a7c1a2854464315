//! Integration tests of `lark_service::lark` against a local fake of the
//! Lark OpenAPI (wiremock). Request bodies, paths and codes follow
//! docs/lark-protocol.md §4–§6. No test asserts on wall-clock time; the
//! token-refresh and rate-limit tests move a paused tokio clock while no
//! request is in flight.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use wiremock::matchers::{
    body_json, body_partial_json, header, method, path, query_param, query_param_is_missing,
};
use wiremock::{Match, Mock, MockServer, Request, ResponseTemplate};

use lark_service::lark::card::{self, AuthorizeCard};
use lark_service::lark::oauth::parse_redirect_query;
use lark_service::lark::{
    AuthorizeParams, Domain, Error, LarkClient, LarkConfig, OAuthErrorKind, Pkce, Receiver,
    RecordQuery, RetryPolicy, TableQuery, UserIdType,
};

const APP_ID: &str = "cli_a1b2c3d4e5f60718";
const APP_SECRET: &str = "app-SECRET-9f3c2e";
const TENANT_TOKEN: &str = "t-TENANT-SECRET-0001";
const TENANT_TOKEN_2: &str = "t-TENANT-SECRET-0002";
const USER_ACCESS: &str = "eyJ-USER-ACCESS-SECRET";
const USER_REFRESH: &str = "eyJ-USER-REFRESH-SECRET";
const AUTH_CODE: &str = "CODE-SECRET-77";
const VERIFIER: &str = "VERIFIER-SECRET-abcdefghijklmnopqrstuvwxyz0123456789";
const CARD_TOKEN: &str = "c-CARD-CALLBACK-SECRET";

const TENANT_PATH: &str = "/open-apis/auth/v3/tenant_access_token/internal";
const OAUTH_TOKEN_PATH: &str = "/open-apis/authen/v2/oauth/token";
const MESSAGES_PATH: &str = "/open-apis/im/v1/messages";

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        base: Duration::from_millis(1),
        cap: Duration::from_millis(4),
        max_rate_limit_wait: Duration::from_secs(60),
    }
}

fn config(uri: &str) -> LarkConfig {
    let mut cfg = LarkConfig::new(
        uri.parse::<Domain>()
            .expect("mock server URI is a valid domain"),
        APP_ID,
        SecretString::from(APP_SECRET),
    );
    cfg.request_timeout = Duration::from_secs(10);
    cfg.retry = fast_retry();
    cfg
}

fn client(server: &MockServer) -> LarkClient {
    LarkClient::new(config(&server.uri())).expect("valid config")
}

fn tenant_token_body(token: &str, expire: u64) -> Value {
    json!({"code": 0, "msg": "ok", "tenant_access_token": token, "expire": expire})
}

async fn mount_tenant_token(server: &MockServer, token: &str) {
    Mock::given(method("POST"))
        .and(path(TENANT_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(tenant_token_body(token, 7200)))
        .mount(server)
        .await;
}

fn sent_message(message_id: &str) -> Value {
    json!({"code": 0, "msg": "success", "data": {
        "message_id": message_id, "chat_id": "oc_1", "msg_type": "interactive",
        "create_time": "1700000000000"
    }})
}

async fn requests_to(server: &MockServer, p: &str) -> Vec<Request> {
    server
        .received_requests()
        .await
        .expect("request recording is on")
        .into_iter()
        .filter(|r| r.url.path() == p)
        .collect()
}

/// Fails the test instead of hanging if a retry or paging loop never ends.
async fn bounded<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("the call finished instead of looping")
}

fn body_of(req: &Request) -> Value {
    serde_json::from_slice(&req.body).expect("request body is JSON")
}

// ---------------------------------------------------------------------------
// App-identity token cache
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_concurrent_callers_cause_one_token_request() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(TENANT_PATH))
        .and(header("content-type", "application/json; charset=utf-8"))
        .and(body_json(
            json!({"app_id": APP_ID, "app_secret": APP_SECRET}),
        ))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(tenant_token_body(TENANT_TOKEN, 7200))
                // Keep the fetch in flight while the other callers pile up.
                .set_delay(Duration::from_millis(200)),
        )
        .expect(1)
        .mount(&server)
        .await;
    let lark = client(&server);

    let mut tasks = Vec::new();
    for _ in 0..100 {
        let lark = lark.clone();
        tasks.push(tokio::spawn(async move { lark.tenant_token().await }));
    }
    for task in tasks {
        let token = task.await.unwrap().expect("token");
        assert_eq!(token.expose_secret(), TENANT_TOKEN);
    }
    server.verify().await;
}

#[tokio::test]
async fn token_is_refreshed_once_the_share_of_its_lifetime_has_passed() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(TENANT_PATH))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(tenant_token_body(TENANT_TOKEN, 7200)),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    mount_tenant_token(&server, TENANT_TOKEN_2).await;
    let mut cfg = config(&server.uri());
    cfg.token_refresh_share = 0.8; // refresh after 5760 s of 7200 s
    let lark = LarkClient::new(cfg).unwrap();

    assert_eq!(
        lark.tenant_token().await.unwrap().expose_secret(),
        TENANT_TOKEN
    );
    assert_eq!(requests_to(&server, TENANT_PATH).await.len(), 1);

    // Move the clock only while no request is in flight, so reqwest's own
    // timers cannot fire early.
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(5040)).await; // 0.7 of the lifetime
    tokio::time::resume();
    assert_eq!(
        lark.tenant_token().await.unwrap().expose_secret(),
        TENANT_TOKEN
    );
    assert_eq!(
        requests_to(&server, TENANT_PATH).await.len(),
        1,
        "no refresh before the share has passed"
    );

    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(1080)).await; // now 0.85 of the lifetime
    tokio::time::resume();
    assert_eq!(
        lark.tenant_token().await.unwrap().expose_secret(),
        TENANT_TOKEN_2
    );
    assert_eq!(
        lark.tenant_token().await.unwrap().expose_secret(),
        TENANT_TOKEN_2
    );
    assert_eq!(
        requests_to(&server, TENANT_PATH).await.len(),
        2,
        "exactly one refresh after the share has passed"
    );
}

#[tokio::test]
async fn rejected_tenant_token_is_dropped_and_the_call_retried_once() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(TENANT_PATH))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(tenant_token_body(TENANT_TOKEN, 7200)),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(TENANT_PATH))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(tenant_token_body(TENANT_TOKEN_2, 7200)),
        )
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(MESSAGES_PATH))
        .and(header(
            "authorization",
            format!("Bearer {TENANT_TOKEN}").as_str(),
        ))
        .respond_with(ResponseTemplate::new(400).set_body_json(
            json!({"code": 99_991_663, "msg": "Invalid access token for authorization"}),
        ))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(MESSAGES_PATH))
        .and(header(
            "authorization",
            format!("Bearer {TENANT_TOKEN_2}").as_str(),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(sent_message("om_1")))
        .expect(1)
        .mount(&server)
        .await;

    let sent = client(&server)
        .send_text(&Receiver::open_id("ou_1"), "hi")
        .await
        .expect("second attempt with a fresh token succeeds");
    assert_eq!(sent.message_id, "om_1");
    server.verify().await;
}

#[tokio::test]
async fn token_invalid_retry_happens_only_once() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(TENANT_PATH))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(tenant_token_body(TENANT_TOKEN, 7200)),
        )
        .expect(2)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(MESSAGES_PATH))
        .respond_with(
            ResponseTemplate::new(400)
                .set_body_json(json!({"code": 99_991_663, "msg": "Invalid access token"})),
        )
        .expect(2)
        .mount(&server)
        .await;

    let err = bounded(client(&server).send_text(&Receiver::open_id("ou_1"), "hi"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(99_991_663));
    assert!(err.is_app_token_invalid());
    server.verify().await;
}

#[tokio::test]
async fn user_token_errors_are_reported_not_retried() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/open-apis/authen/v1/user_info"))
        .respond_with(
            ResponseTemplate::new(401)
                .set_body_json(json!({"code": 99_991_677, "msg": "user access token expired"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let err = client(&server)
        .user_info(&SecretString::from(USER_ACCESS))
        .await
        .unwrap_err();
    assert!(err.is_user_token_invalid());
    assert!(!err.is_transient());
    server.verify().await;
}

// ---------------------------------------------------------------------------
// Retry policy
// ---------------------------------------------------------------------------

#[tokio::test]
async fn server_error_is_retried_then_succeeds() {
    let server = MockServer::start().await;
    mount_tenant_token(&server, TENANT_TOKEN).await;
    Mock::given(method("POST"))
        .and(path(MESSAGES_PATH))
        .respond_with(ResponseTemplate::new(503).set_body_string("upstream unavailable"))
        .up_to_n_times(1)
        .with_priority(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(MESSAGES_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(sent_message("om_2")))
        .expect(1)
        .mount(&server)
        .await;

    let sent = client(&server)
        .send_text(&Receiver::open_id("ou_1"), "hi")
        .await
        .unwrap();
    assert_eq!(sent.message_id, "om_2");
    server.verify().await;
}

#[tokio::test]
async fn server_errors_stop_after_max_attempts() {
    let server = MockServer::start().await;
    mount_tenant_token(&server, TENANT_TOKEN).await;
    Mock::given(method("POST"))
        .and(path(MESSAGES_PATH))
        .respond_with(
            ResponseTemplate::new(500)
                .insert_header("x-tt-logid", "LOG-500")
                .set_body_json(json!({"code": 1, "msg": "internal error"})),
        )
        .expect(3) // fast_retry().max_attempts
        .mount(&server)
        .await;
    let err = client(&server)
        .send_text(&Receiver::open_id("ou_1"), "hi")
        .await
        .unwrap_err();
    assert!(err.is_transient());
    assert_eq!((err.status(), err.log_id()), (Some(500), Some("LOG-500")));
    server.verify().await;
}

#[tokio::test]
async fn business_error_is_not_retried() {
    let server = MockServer::start().await;
    mount_tenant_token(&server, TENANT_TOKEN).await;
    Mock::given(method("POST"))
        .and(path(MESSAGES_PATH))
        .respond_with(
            ResponseTemplate::new(400)
                .insert_header("X-Tt-Logid", "20240101-LOGID")
                .set_body_json(
                    json!({"code": 230_002, "msg": "Bot/User can NOT be out of the chat."}),
                ),
        )
        .expect(1)
        .mount(&server)
        .await;
    let err = client(&server)
        .send_text(&Receiver::chat_id("oc_1"), "hi")
        .await
        .unwrap_err();
    match &err {
        Error::Api {
            code,
            msg,
            status,
            log_id,
        } => {
            assert_eq!(*code, 230_002);
            assert_eq!(msg, "Bot/User can NOT be out of the chat.");
            assert_eq!(*status, 400);
            assert_eq!(log_id.as_deref(), Some("20240101-LOGID"));
        }
        other => panic!("expected Error::Api, got {other:?}"),
    }
    assert!(!err.is_transient());
    server.verify().await;
}

#[tokio::test]
async fn log_id_falls_back_to_the_body() {
    let server = MockServer::start().await;
    mount_tenant_token(&server, TENANT_TOKEN).await;
    Mock::given(method("PATCH"))
        .and(path("/open-apis/im/v1/messages/om_9"))
        .respond_with(ResponseTemplate::new(400).set_body_json(
            json!({"code": 230_031, "msg": "card not updatable", "error": {"log_id": "BODY-LOG"}}),
        ))
        .expect(1)
        .mount(&server)
        .await;
    let err = client(&server)
        .patch_card("om_9", &card::expired_card("t", "b"))
        .await
        .unwrap_err();
    assert_eq!(err.log_id(), Some("BODY-LOG"));
}

/// Drives one 429-then-200 exchange where the 429 carries `header_name: 30`.
/// The backoff policy alone would retry within milliseconds, so a client
/// that still waits after a real grace period is honouring the header; the
/// paused clock is then moved past 30 s while nothing is in flight.
async fn check_rate_limit_header_is_honoured(header_name: &str) {
    let server = MockServer::start().await;
    mount_tenant_token(&server, TENANT_TOKEN).await;
    Mock::given(method("POST"))
        .and(path(MESSAGES_PATH))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header(header_name, "30")
                .insert_header("x-ogw-ratelimit-limit", "50")
                .set_body_json(
                    json!({"code": 99_991_400, "msg": "request trigger frequency limit"}),
                ),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(MESSAGES_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(sent_message("om_3")))
        .mount(&server)
        .await;

    let lark = client(&server);
    let call = tokio::spawn(async move { lark.send_text(&Receiver::open_id("ou_1"), "hi").await });

    let mut seen = 0;
    for _ in 0..1000 {
        seen = requests_to(&server, MESSAGES_PATH).await.len();
        if seen > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(seen, 1, "first attempt reached the server");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        requests_to(&server, MESSAGES_PATH).await.len(),
        1,
        "no retry before the rate-limit window resets"
    );
    assert!(!call.is_finished());

    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(31)).await;
    tokio::time::resume();
    let sent = call
        .await
        .unwrap()
        .expect("retry after the window succeeds");
    assert_eq!(sent.message_id, "om_3");
    assert_eq!(requests_to(&server, MESSAGES_PATH).await.len(), 2);
}

#[tokio::test]
async fn rate_limit_reset_header_is_honoured() {
    check_rate_limit_header_is_honoured("x-ogw-ratelimit-reset").await;
}

#[tokio::test]
async fn retry_after_header_is_honoured() {
    check_rate_limit_header_is_honoured("Retry-After").await;
}

#[tokio::test]
async fn rate_limit_wait_beyond_the_policy_is_not_waited_out() {
    let server = MockServer::start().await;
    mount_tenant_token(&server, TENANT_TOKEN).await;
    Mock::given(method("POST"))
        .and(path(MESSAGES_PATH))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("x-ogw-ratelimit-reset", "3600")
                .set_body_json(
                    json!({"code": 99_991_400, "msg": "request trigger frequency limit"}),
                ),
        )
        .expect(1)
        .mount(&server)
        .await;
    let err = client(&server)
        .send_text(&Receiver::open_id("ou_1"), "hi")
        .await
        .unwrap_err();
    assert!(err.is_rate_limited());
    server.verify().await;
}

// ---------------------------------------------------------------------------
// User OAuth
// ---------------------------------------------------------------------------

#[test]
fn authorize_url_carries_the_documented_parameters() {
    let lark = LarkClient::new(LarkConfig::new(
        Domain::Feishu,
        APP_ID,
        SecretString::from(APP_SECRET),
    ))
    .unwrap();
    let pkce = Pkce::generate();
    let url = lark
        .authorize_url(&AuthorizeParams {
            redirect_uri: "https://svc.example/oauth/callback?x=1",
            scopes: &["apaas:record:read", "offline_access"],
            state: "st-1",
            code_challenge: Some(&pkce.challenge),
            force_consent: false,
        })
        .unwrap();
    assert_eq!(
        url.origin().ascii_serialization(),
        "https://accounts.feishu.cn"
    );
    assert_eq!(url.path(), "/open-apis/authen/v1/authorize");
    assert!(
        url.query()
            .unwrap()
            .contains("scope=apaas%3Arecord%3Aread%20offline_access"),
        "{url}"
    );
    let q: std::collections::HashMap<String, String> = url.query_pairs().into_owned().collect();
    assert_eq!(q["client_id"], APP_ID);
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["redirect_uri"], "https://svc.example/oauth/callback?x=1");
    assert_eq!(q["scope"], "apaas:record:read offline_access");
    assert_eq!(q["state"], "st-1");
    assert_eq!(q["code_challenge"], pkce.challenge);
    assert_eq!(q["code_challenge_method"], "S256");
    assert!(!q.contains_key("prompt"));
    assert!(!url.as_str().contains(APP_SECRET));

    let lark_intl = LarkClient::new(LarkConfig::new(
        Domain::Lark,
        APP_ID,
        SecretString::from(APP_SECRET),
    ))
    .unwrap();
    let url = lark_intl
        .authorize_url(&AuthorizeParams {
            redirect_uri: "https://svc.example/cb",
            scopes: &[],
            state: "s",
            code_challenge: None,
            force_consent: true,
        })
        .unwrap();
    assert_eq!(url.host_str(), Some("accounts.larksuite.com"));
    let q: std::collections::HashMap<String, String> = url.query_pairs().into_owned().collect();
    assert_eq!(q["prompt"], "consent");
    assert!(!q.contains_key("code_challenge") && !q.contains_key("scope"));
}

fn user_token_body(access: &str, refresh: Option<&str>) -> Value {
    let mut body = json!({
        "code": 0,
        "access_token": access,
        "expires_in": 7200,
        "scope": "apaas:record:read offline_access",
        "token_type": "Bearer",
    });
    if let Some(r) = refresh {
        body["refresh_token"] = json!(r);
        body["refresh_token_expires_in"] = json!(604_800);
    }
    body
}

#[tokio::test]
async fn code_exchange_sends_the_v2_body_and_returns_the_token() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(OAUTH_TOKEN_PATH))
        .and(body_json(json!({
            "grant_type": "authorization_code",
            "client_id": APP_ID,
            "client_secret": APP_SECRET,
            "code": AUTH_CODE,
            "redirect_uri": "https://svc.example/cb",
            "code_verifier": VERIFIER,
        })))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(user_token_body(USER_ACCESS, Some(USER_REFRESH))),
        )
        .expect(1)
        .mount(&server)
        .await;

    let token = client(&server)
        .exchange_code(
            &SecretString::from(AUTH_CODE),
            "https://svc.example/cb",
            Some(&SecretString::from(VERIFIER)),
        )
        .await
        .unwrap();
    assert_eq!(token.access_token.expose_secret(), USER_ACCESS);
    assert_eq!(
        token.refresh_token.as_ref().unwrap().expose_secret(),
        USER_REFRESH
    );
    assert_eq!(token.expires_in, Duration::from_secs(7200));
    assert_eq!(token.refresh_expires_in, Some(Duration::from_secs(604_800)));
    assert_eq!(
        token.scopes().collect::<Vec<_>>(),
        ["apaas:record:read", "offline_access"]
    );
    assert_eq!(token.token_type, "Bearer");
    // No bearer header on the v2 token endpoint.
    let reqs = requests_to(&server, OAUTH_TOKEN_PATH).await;
    assert!(reqs[0].headers.get("authorization").is_none());
    server.verify().await;
}

struct OAuthCase {
    status: u16,
    body: Value,
    want: OAuthErrorKind,
    want_code: i64,
    attempts: u64,
}

#[tokio::test]
async fn code_exchange_errors_are_typed() {
    let cases = [
        OAuthCase {
            status: 400,
            body: json!({"code": 20004, "error": "invalid_grant", "error_description": "The authorization code has expired."}),
            want: OAuthErrorKind::CodeExpired,
            want_code: 20004,
            attempts: 1,
        },
        OAuthCase {
            status: 400,
            body: json!({"code": 20065, "error": "invalid_grant", "error_description": "code already used"}),
            want: OAuthErrorKind::InvalidGrant,
            want_code: 20065,
            attempts: 1,
        },
        OAuthCase {
            status: 400,
            body: json!({"code": 20049, "error": "invalid_grant", "error_description": "PKCE failed"}),
            want: OAuthErrorKind::InvalidGrant,
            want_code: 20049,
            attempts: 1,
        },
        OAuthCase {
            status: 400,
            body: json!({"code": 20071, "error": "invalid_grant", "error_description": "redirect_uri mismatch"}),
            want: OAuthErrorKind::Misconfigured,
            want_code: 20071,
            attempts: 1,
        },
        OAuthCase {
            status: 500,
            body: json!({"code": 20050, "error": "server_error", "error_description": "internal"}),
            want: OAuthErrorKind::Transient,
            want_code: 20050,
            // Issue 16: the code may have been used up; a one-time grant is not re-sent.
            attempts: 1,
        },
        OAuthCase {
            status: 429,
            body: json!({"code": 99_991_400, "msg": "request trigger frequency limit", "error": {"log_id": "RL-LOG"}}),
            want: OAuthErrorKind::RateLimited,
            want_code: 99_991_400,
            // Refused by the gateway before it was handled: retried.
            attempts: 3,
        },
    ];
    for case in cases {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(OAUTH_TOKEN_PATH))
            .respond_with(ResponseTemplate::new(case.status).set_body_json(case.body.clone()))
            .expect(case.attempts)
            .mount(&server)
            .await;
        let err = client(&server)
            .exchange_code(
                &SecretString::from(AUTH_CODE),
                "https://svc.example/cb",
                None,
            )
            .await
            .unwrap_err();
        assert_eq!(err.oauth_kind(), Some(case.want), "{err}");
        assert_eq!(err.code(), Some(case.want_code));
        assert_eq!(err.status(), Some(case.status));
        assert_eq!(
            err.is_transient(),
            matches!(
                case.want,
                OAuthErrorKind::Transient | OAuthErrorKind::RateLimited
            )
        );
        if case.want == OAuthErrorKind::RateLimited {
            assert_eq!(err.log_id(), Some("RL-LOG"));
        }
        server.verify().await;
    }
}

#[test]
fn denied_consent_is_user_rejected() {
    let err = parse_redirect_query("error=access_denied&state=st-1").unwrap_err();
    assert_eq!(err.oauth_kind(), Some(OAuthErrorKind::UserRejected));
    let ok = parse_redirect_query("code=abc&state=st-1").unwrap();
    assert_eq!(
        (ok.code.expose_secret(), ok.state.as_str()),
        ("abc", "st-1")
    );
}

/// Issue 16: one-time grants are never retried blindly. A 503 (20072) from the token endpoint
/// may come after the code was used up: the exchange is sent once and its outcome reported as
/// unknown. (This replaces a test that asserted the retry.)
#[tokio::test]
async fn code_exchange_is_not_retried_after_a_5xx() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(OAUTH_TOKEN_PATH))
        .respond_with(ResponseTemplate::new(503).set_body_json(
            json!({"code": 20072, "error": "temporarily_unavailable", "error_description": "busy"}),
        ))
        .up_to_n_times(1)
        .with_priority(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(OAUTH_TOKEN_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(user_token_body(USER_ACCESS, None)))
        .expect(0)
        .mount(&server)
        .await;
    let err = client(&server)
        .exchange_code(
            &SecretString::from(AUTH_CODE),
            "https://svc.example/cb",
            None,
        )
        .await
        .unwrap_err();
    assert!(err.outcome_unknown(), "{err}");
    assert_eq!(requests_to(&server, OAUTH_TOKEN_PATH).await.len(), 1);
    server.verify().await;
}

/// Issue 16: a refresh grant is sent once, whether its answer is a 5xx or never comes (the
/// request timeout): the refresh token may have been rotated, so re-sending it is the caller's
/// decision, after a check.
#[tokio::test]
async fn refresh_grant_is_not_retried_after_a_5xx_or_a_timeout() {
    for lost in [
        ResponseTemplate::new(500).set_body_json(json!({"code": 20050, "error": "server_error"})),
        ResponseTemplate::new(200)
            .set_body_json(user_token_body(USER_ACCESS, Some("eyJ-NEXT")))
            .set_delay(Duration::from_secs(5)),
    ] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(OAUTH_TOKEN_PATH))
            .and(body_partial_json(
                json!({"grant_type": "refresh_token", "refresh_token": USER_REFRESH}),
            ))
            .respond_with(lost)
            .mount(&server)
            .await;
        let mut cfg = config(&server.uri());
        cfg.request_timeout = Duration::from_millis(300);
        let err = LarkClient::new(cfg)
            .unwrap()
            .refresh_user_token(&SecretString::from(USER_REFRESH))
            .await
            .unwrap_err();
        assert!(err.outcome_unknown(), "{err}");
        assert_eq!(
            requests_to(&server, OAUTH_TOKEN_PATH).await.len(),
            1,
            "the refresh token was presented more than once"
        );
    }
}

/// Issue 16: a record create that got a 5xx may have created the record; it is not re-sent.
#[tokio::test]
async fn record_create_is_not_retried_after_a_5xx() {
    let server = MockServer::start().await;
    mount_tenant_token(&server, TENANT_TOKEN).await;
    let base = "/open-apis/apaas/v1/applications/package_x__c/objects/task__c/records";
    Mock::given(method("POST"))
        .and(path(base))
        .respond_with(ResponseTemplate::new(502).set_body_string("bad gateway"))
        .mount(&server)
        .await;
    let err = client(&server)
        .create_record("package_x__c", "task__c", &json!({"name": "x"}))
        .await
        .unwrap_err();
    assert!(err.outcome_unknown(), "{err}");
    assert_eq!(requests_to(&server, base).await.len(), 1);
}

#[tokio::test]
async fn refresh_rotates_the_refresh_token() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(OAUTH_TOKEN_PATH))
        .and(body_json(json!({
            "grant_type": "refresh_token",
            "client_id": APP_ID,
            "client_secret": APP_SECRET,
            "refresh_token": USER_REFRESH,
        })))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(user_token_body("eyJ-new-access", Some("eyJ-new-refresh"))),
        )
        .expect(1)
        .mount(&server)
        .await;
    let token = client(&server)
        .refresh_user_token(&SecretString::from(USER_REFRESH))
        .await
        .unwrap();
    assert_eq!(token.access_token.expose_secret(), "eyJ-new-access");
    assert_eq!(
        token.refresh_token.unwrap().expose_secret(),
        "eyJ-new-refresh"
    );
    server.verify().await;
}

#[tokio::test]
async fn refresh_without_a_new_refresh_token_keeps_the_old_one() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(OAUTH_TOKEN_PATH))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(user_token_body("eyJ-new-access", None)),
        )
        .mount(&server)
        .await;
    let token = client(&server)
        .refresh_user_token(&SecretString::from(USER_REFRESH))
        .await
        .unwrap();
    assert_eq!(token.refresh_token.unwrap().expose_secret(), USER_REFRESH);
    assert_eq!(token.refresh_expires_in, None);
}

#[tokio::test]
async fn refresh_errors_are_typed() {
    for (code, want) in [
        (20037, OAuthErrorKind::InvalidGrant), // refresh token expired
        (20064, OAuthErrorKind::InvalidGrant), // revoked
        (20073, OAuthErrorKind::InvalidGrant), // already used
        (20074, OAuthErrorKind::Misconfigured),
    ] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(OAUTH_TOKEN_PATH))
            .respond_with(ResponseTemplate::new(400).set_body_json(
                json!({"code": code, "error": "invalid_grant", "error_description": "no"}),
            ))
            .expect(1)
            .mount(&server)
            .await;
        let err = client(&server)
            .refresh_user_token(&SecretString::from(USER_REFRESH))
            .await
            .unwrap_err();
        assert_eq!(err.oauth_kind(), Some(want), "{code}");
        assert_eq!(err.code(), Some(code));
        server.verify().await;
    }
}

#[tokio::test]
async fn user_info_uses_the_user_token() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/open-apis/authen/v1/user_info"))
        .and(header(
            "authorization",
            format!("Bearer {USER_ACCESS}").as_str(),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "code": 0, "msg": "success",
            "data": {"name": "Ada", "open_id": "ou_ada", "union_id": "on_ada", "tenant_key": "tk1"}
        })))
        .expect(1)
        .mount(&server)
        .await;
    let info = client(&server)
        .user_info(&SecretString::from(USER_ACCESS))
        .await
        .unwrap();
    assert_eq!(info.open_id, "ou_ada");
    assert_eq!(info.union_id.as_deref(), Some("on_ada"));
    assert_eq!(info.name.as_deref(), Some("Ada"));
    // The tenant token was never needed.
    assert!(requests_to(&server, TENANT_PATH).await.is_empty());
    server.verify().await;
}

#[tokio::test]
async fn contact_user_uses_the_tenant_token() {
    let server = MockServer::start().await;
    mount_tenant_token(&server, TENANT_TOKEN).await;
    Mock::given(method("GET"))
        .and(path("/open-apis/contact/v3/users/ou_ada"))
        .and(query_param("user_id_type", "open_id"))
        .and(header(
            "authorization",
            format!("Bearer {TENANT_TOKEN}").as_str(),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "code": 0, "msg": "success",
            "data": {"user": {"open_id": "ou_ada", "name": "Ada", "department_ids": ["od_1"],
                              "status": {"is_frozen": false, "is_resigned": true}}}
        })))
        .expect(1)
        .mount(&server)
        .await;
    let user = client(&server)
        .contact_user("ou_ada", UserIdType::OpenId)
        .await
        .unwrap();
    assert_eq!(user.name.as_deref(), Some("Ada"));
    assert_eq!(user.department_ids, ["od_1"]);
    assert!(user.status.unwrap().is_resigned);
    server.verify().await;
}

#[tokio::test]
async fn user_id_by_email_posts_batch_get_id() {
    let server = MockServer::start().await;
    mount_tenant_token(&server, TENANT_TOKEN).await;
    Mock::given(method("POST"))
        .and(path("/open-apis/contact/v3/users/batch_get_id"))
        .and(query_param("user_id_type", "open_id"))
        .and(header(
            "authorization",
            format!("Bearer {TENANT_TOKEN}").as_str(),
        ))
        .and(wiremock::matchers::body_json(
            json!({"emails": ["ada@example.com"]}),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "code": 0, "msg": "success",
            "data": {"user_list": [{"user_id": "ou_ada", "email": "ada@example.com"}]}
        })))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/open-apis/contact/v3/users/batch_get_id"))
        .and(wiremock::matchers::body_json(
            json!({"emails": ["nobody@example.com"]}),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "code": 0, "msg": "success",
            "data": {"user_list": [{"email": "nobody@example.com"}]}
        })))
        .expect(1)
        .mount(&server)
        .await;
    let c = client(&server);
    assert_eq!(
        c.user_id_by_email("ada@example.com", UserIdType::OpenId)
            .await
            .unwrap()
            .as_deref(),
        Some("ou_ada")
    );
    assert_eq!(
        c.user_id_by_email("nobody@example.com", UserIdType::OpenId)
            .await
            .unwrap(),
        None
    );
    server.verify().await;
}

// ---------------------------------------------------------------------------
// IM: cards
// ---------------------------------------------------------------------------

#[tokio::test]
async fn card_send_patch_and_delayed_update_bodies() {
    let server = MockServer::start().await;
    mount_tenant_token(&server, TENANT_TOKEN).await;
    Mock::given(method("POST"))
        .and(path(MESSAGES_PATH))
        .and(query_param("receive_id_type", "open_id"))
        .and(header(
            "authorization",
            format!("Bearer {TENANT_TOKEN}").as_str(),
        ))
        .and(header("content-type", "application/json; charset=utf-8"))
        .respond_with(ResponseTemplate::new(200).set_body_json(sent_message("om_card")))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("PATCH"))
        .and(path("/open-apis/im/v1/messages/om_card"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"code": 0, "msg": "success"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/open-apis/interactive/v1/card/update"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"code": 0, "msg": "success"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let lark = client(&server);

    let authorize = AuthorizeCard::new(
        "Authorization required",
        "Grant access so the service can read your aPaaS records.",
        "https://accounts.feishu.cn/open-apis/authen/v1/authorize?client_id=cli_x&state=s",
        "sess-1",
    )
    .to_json();
    let sent = lark
        .send_card(&Receiver::open_id("ou_user"), &authorize)
        .await
        .unwrap();
    assert_eq!(sent.message_id, "om_card");

    let send = &requests_to(&server, MESSAGES_PATH).await[0];
    let body = body_of(send);
    assert_eq!(body["receive_id"], "ou_user");
    assert_eq!(body["msg_type"], "interactive");
    let content = body["content"].as_str().expect("content is a JSON string");
    assert_eq!(serde_json::from_str::<Value>(content).unwrap(), authorize);
    assert!(body["uuid"]
        .as_str()
        .is_some_and(|u| !u.is_empty() && u.len() <= 50));

    let done = card::authorized_card("Authorized", "You can close this.");
    lark.patch_card("om_card", &done).await.unwrap();
    let patch = &requests_to(&server, "/open-apis/im/v1/messages/om_card").await[0];
    let body = body_of(patch);
    assert_eq!(body.as_object().unwrap().len(), 1, "only `content`: {body}");
    let content = body["content"].as_str().expect("content is a JSON string");
    assert_eq!(serde_json::from_str::<Value>(content).unwrap(), done);

    let rejected = card::rejected_card("Declined", "Authorization was declined.");
    lark.delay_update_card(&SecretString::from(CARD_TOKEN), &rejected)
        .await
        .unwrap();
    let update = &requests_to(&server, "/open-apis/interactive/v1/card/update").await[0];
    assert_eq!(
        body_of(update),
        json!({"token": CARD_TOKEN, "card": rejected})
    );
    server.verify().await;
}

#[tokio::test]
async fn text_and_post_messages_use_their_content_shapes() {
    let server = MockServer::start().await;
    mount_tenant_token(&server, TENANT_TOKEN).await;
    Mock::given(method("POST"))
        .and(path(MESSAGES_PATH))
        .and(query_param("receive_id_type", "chat_id"))
        .respond_with(ResponseTemplate::new(200).set_body_json(sent_message("om_t")))
        .expect(2)
        .mount(&server)
        .await;
    let lark = client(&server);
    let to = Receiver::chat_id("oc_1");
    lark.send_text(&to, "hello \"world\"").await.unwrap();
    let post = json!({"zh_cn": {"title": "T", "content": [[{"tag": "text", "text": "x"}]]}});
    lark.send_post(&to, &post).await.unwrap();

    let reqs = requests_to(&server, MESSAGES_PATH).await;
    let text = body_of(&reqs[0]);
    assert_eq!(text["msg_type"], "text");
    assert_eq!(text["receive_id"], "oc_1");
    assert_eq!(
        serde_json::from_str::<Value>(text["content"].as_str().unwrap()).unwrap(),
        json!({"text": "hello \"world\""})
    );
    let body = body_of(&reqs[1]);
    assert_eq!(body["msg_type"], "post");
    assert_eq!(
        serde_json::from_str::<Value>(body["content"].as_str().unwrap()).unwrap(),
        post
    );
    assert_ne!(
        text["uuid"], body["uuid"],
        "each send has its own idempotency key"
    );
}

#[tokio::test]
async fn retried_send_reuses_its_idempotency_key() {
    let server = MockServer::start().await;
    mount_tenant_token(&server, TENANT_TOKEN).await;
    Mock::given(method("POST"))
        .and(path(MESSAGES_PATH))
        .respond_with(ResponseTemplate::new(502))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(MESSAGES_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(sent_message("om_r")))
        .mount(&server)
        .await;
    client(&server)
        .send_card(&Receiver::open_id("ou_1"), &card::expired_card("t", "b"))
        .await
        .unwrap();
    let reqs = requests_to(&server, MESSAGES_PATH).await;
    assert_eq!(reqs.len(), 2);
    assert_eq!(body_of(&reqs[0])["uuid"], body_of(&reqs[1])["uuid"]);
}

// ---------------------------------------------------------------------------
// aPaaS
// ---------------------------------------------------------------------------

/// Matches a JSON body without a `page_token` key.
struct NoPageToken;

impl Match for NoPageToken {
    fn matches(&self, request: &Request) -> bool {
        serde_json::from_slice::<Value>(&request.body).is_ok_and(|b| b.get("page_token").is_none())
    }
}

#[tokio::test]
async fn record_query_follows_page_tokens() {
    let server = MockServer::start().await;
    mount_tenant_token(&server, TENANT_TOKEN).await;
    let query_path =
        "/open-apis/apaas/v1/applications/package_x__c/objects/task__c/records/batch_query";
    Mock::given(method("POST"))
        .and(path(query_path))
        .and(NoPageToken)
        .and(body_partial_json(
            json!({"select": ["_id", "name"], "use_page_token": true, "page_size": 2}),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "code": 0, "msg": "success",
            "data": {
                "items": json!([{"_id": 1, "name": "a"}, {"_id": 2, "name": "b"}]).to_string(),
                "total": 3, "has_more": true, "next_page_token": "pt-2"
            }
        })))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(query_path))
        .and(body_partial_json(
            json!({"page_token": "pt-2", "use_page_token": true}),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "code": 0, "msg": "success",
            "data": {
                "items": json!([{"_id": 3, "name": "c"}]).to_string(),
                "total": 3, "has_more": false, "next_page_token": ""
            }
        })))
        .expect(1)
        .mount(&server)
        .await;
    let lark = client(&server);
    let query = RecordQuery::select(["_id", "name"], 2);

    let first = lark
        .query_records("package_x__c", "task__c", &query)
        .await
        .unwrap();
    assert_eq!(first.items.len(), 2);
    assert!(first.has_more);
    assert_eq!(first.next_page_token.as_deref(), Some("pt-2"));
    assert_eq!(first.total, Some(3));

    server.reset().await;
    // Re-mount for the full walk (reset cleared the mocks and expectations).
    mount_tenant_token(&server, TENANT_TOKEN).await;
    Mock::given(method("POST"))
        .and(path(query_path))
        .and(NoPageToken)
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "code": 0, "data": {"items": "[{\"_id\":1},{\"_id\":2}]", "has_more": true, "next_page_token": "pt-2"}
        })))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(query_path))
        .and(body_partial_json(json!({"page_token": "pt-2"})))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "code": 0, "data": {"items": "[{\"_id\":3}]", "has_more": false}
        })))
        .expect(1)
        .mount(&server)
        .await;
    let all = bounded(lark.query_all_records("package_x__c", "task__c", &query))
        .await
        .unwrap();
    assert_eq!(
        all,
        [json!({"_id": 1}), json!({"_id": 2}), json!({"_id": 3})]
    );
    server.verify().await;
}

#[tokio::test]
async fn record_get_create_patch_use_json_strings() {
    let server = MockServer::start().await;
    mount_tenant_token(&server, TENANT_TOKEN).await;
    let base = "/open-apis/apaas/v1/applications/package_x__c/objects/task__c/records";
    Mock::given(method("POST"))
        .and(path(format!("{base}/1790/query")))
        .and(body_json(json!({"select": ["name"]})))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "code": 0, "data": {"item": "{\"_id\":1790,\"name\":\"a\"}"}
        })))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(base))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"code": 0, "data": {"id": 1791}})),
        )
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("PATCH"))
        .and(path(format!("{base}/1791")))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"code": 0, "msg": "success"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let lark = client(&server);

    let item = lark
        .get_record("package_x__c", "task__c", "1790", &["name"])
        .await
        .unwrap();
    assert_eq!(item, Some(json!({"_id": 1790, "name": "a"})));

    let record = json!({"name": "new", "done": false});
    let id = lark
        .create_record("package_x__c", "task__c", &record)
        .await
        .unwrap();
    assert_eq!(id, "1791");
    let create = &requests_to(&server, base).await[0];
    let body = body_of(create);
    let sent = body["record"].as_str().expect("record is a JSON string");
    assert_eq!(serde_json::from_str::<Value>(sent).unwrap(), record);

    lark.patch_record("package_x__c", "task__c", "1791", &json!({"done": true}))
        .await
        .unwrap();
    let patch = &requests_to(&server, &format!("{base}/1791")).await[0];
    assert_eq!(body_of(patch), json!({"record": "{\"done\":true}"}));
    server.verify().await;
}

#[tokio::test]
async fn workspace_table_records_use_the_user_token() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/open-apis/apaas/v1/workspaces/ws_1/tables/orders/records"))
        .and(header("authorization", format!("Bearer {USER_ACCESS}").as_str()))
        .and(query_param("page_size", "50"))
        .and(query_param("page_token", "p1"))
        .and(query_param_is_missing("filter"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "code": 0, "data": {"items": "[{\"id\":\"r1\"}]", "total": 9, "has_more": true, "page_token": "p2"}
        })))
        .expect(1)
        .mount(&server)
        .await;
    let query = TableQuery {
        page_size: Some(50),
        page_token: Some("p1".into()),
        ..TableQuery::default()
    };
    let page = client(&server)
        .list_table_records(&SecretString::from(USER_ACCESS), "ws_1", "orders", &query)
        .await
        .unwrap();
    assert_eq!(page.items, [json!({"id": "r1"})]);
    assert_eq!((page.total, page.has_more), (Some(9), true));
    assert_eq!(page.page_token.as_deref(), Some("p2"));
    assert!(requests_to(&server, TENANT_PATH).await.is_empty());
    server.verify().await;
}

// ---------------------------------------------------------------------------
// Secrets never show in Debug, Display or logs
// ---------------------------------------------------------------------------

/// A `tracing` writer that appends to a shared buffer.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const SECRETS: [&str; 8] = [
    APP_SECRET,
    TENANT_TOKEN,
    TENANT_TOKEN_2,
    USER_ACCESS,
    USER_REFRESH,
    AUTH_CODE,
    VERIFIER,
    CARD_TOKEN,
];

fn assert_no_secret(what: &str, text: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "{what} leaks {secret}: {text}");
    }
}

fn assert_error_is_clean(err: &Error) {
    let mut chain = format!("{err:?}\n{err}");
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        chain.push_str(&format!("\n{s}\n{s:?}"));
        source = s.source();
    }
    assert_no_secret("error", &chain);
}

#[tokio::test]
async fn secrets_never_appear_in_errors_debug_output_or_logs() {
    let logs = LogBuffer::default();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("lark_service=trace"))
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let server = MockServer::start().await;
    // Token endpoint: first a rejection of the credentials, then a token.
    Mock::given(method("POST"))
        .and(path(TENANT_PATH))
        .respond_with(
            ResponseTemplate::new(400)
                .set_body_json(json!({"code": 99_991_543, "msg": "app secret invalid"})),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    mount_tenant_token(&server, TENANT_TOKEN).await;
    Mock::given(method("POST"))
        .and(path(OAUTH_TOKEN_PATH))
        .and(body_partial_json(
            json!({"grant_type": "authorization_code"}),
        ))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(user_token_body(USER_ACCESS, Some(USER_REFRESH))),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(OAUTH_TOKEN_PATH))
        .respond_with(ResponseTemplate::new(400).set_body_json(
            json!({"code": 20064, "error": "invalid_grant", "error_description": "revoked"}),
        ))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/open-apis/authen/v1/user_info"))
        .respond_with(ResponseTemplate::new(404).set_body_string("<html>not here</html>"))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/open-apis/interactive/v1/card/update"))
        .respond_with(ResponseTemplate::new(200).set_body_string("not json"))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(MESSAGES_PATH))
        .respond_with(
            ResponseTemplate::new(400)
                .set_body_json(json!({"code": 99_991_663, "msg": "invalid token"})),
        )
        .mount(&server)
        .await;
    let lark = client(&server);
    let mut errors: Vec<Error> = Vec::new();

    // Api (credentials rejected at the token endpoint).
    errors.push(lark.tenant_token().await.unwrap_err());
    // Api after the token-invalid retry (tenant token in the header).
    errors.push(
        lark.send_text(&Receiver::open_id("ou_1"), "hi")
            .await
            .unwrap_err(),
    );
    // A successful exchange, then OAuth (refresh token revoked).
    let token = lark
        .exchange_code(
            &SecretString::from(AUTH_CODE),
            "https://svc.example/cb",
            Some(&SecretString::from(VERIFIER)),
        )
        .await
        .unwrap();
    errors.push(
        lark.refresh_user_token(token.refresh_token.as_ref().unwrap())
            .await
            .unwrap_err(),
    );
    // Http (non-JSON 404 with the user token in the header).
    errors.push(lark.user_info(&token.access_token).await.unwrap_err());
    // Decode (success status, body not JSON, callback token in the body).
    errors.push(
        lark.delay_update_card(
            &SecretString::from(CARD_TOKEN),
            &card::expired_card("t", "b"),
        )
        .await
        .unwrap_err(),
    );
    // Transport (nothing listens on the port).
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let offline = LarkClient::new(config(&closed)).unwrap();
    errors.push(
        offline
            .exchange_code(
                &SecretString::from(AUTH_CODE),
                "https://svc.example/cb",
                None,
            )
            .await
            .unwrap_err(),
    );
    // Config.
    let mut bad = config(&server.uri());
    bad.token_refresh_share = 1.5;
    errors.push(LarkClient::new(bad).unwrap_err());
    // OAuth from the redirect.
    errors.push(
        parse_redirect_query(&format!("error=access_denied&state={AUTH_CODE}x")).unwrap_err(),
    );

    let kinds: Vec<&str> = errors
        .iter()
        .map(|e| match e {
            Error::Api { .. } => "api",
            Error::OAuth { .. } => "oauth",
            Error::Http { .. } => "http",
            Error::Transport { .. } => "transport",
            Error::Decode { .. } => "decode",
            Error::Config(_) => "config",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "api",
            "api",
            "oauth",
            "http",
            "decode",
            "transport",
            "config",
            "oauth"
        ]
    );
    for err in &errors {
        assert_error_is_clean(err);
    }

    // Debug views of everything that holds a secret.
    let debug_token = format!("{token:?}");
    assert!(debug_token.contains("[REDACTED]") && debug_token.contains("expires_in"));
    let pkce = Pkce::from_verifier(SecretString::from(VERIFIER));
    let code = parse_redirect_query(&format!("code={AUTH_CODE}&state=s")).unwrap();
    let views = [
        debug_token,
        format!("{pkce:?}"),
        format!("{code:?}"),
        format!("{lark:?}"),
        format!("{:?}", config(&server.uri())),
        format!("{:?}", lark.tenant_token().await.unwrap()),
    ];
    for view in &views {
        assert_no_secret("debug view", view);
    }

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("Lark request finished"),
        "logging was captured: {logs}"
    );
    assert_no_secret("logs", &logs);
}
