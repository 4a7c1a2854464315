//! The sandbox's OpenAPI endpoints: tokens, discovery, OAuth, user info, contact (also
//! email → id), IM.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, patch, post};
use axum::{Form, Json, Router};
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{Failure, SandboxError, SentMessage, Shared, APP_ID};

/// Lifetime of tenant/app tokens (seconds).
const TENANT_TTL: u64 = 7200;
/// A token request with less than this left gets a new token (§4.1).
const TENANT_RENEW_WITHIN: u64 = 1800;
/// Authorization codes are valid this long (§4.2).
const CODE_TTL: Duration = Duration::from_secs(300);
/// Refresh tokens' announced lifetime (seconds).
const REFRESH_TTL: u64 = 604_800;
/// Card callback tokens: valid 30 min, 2 delayed updates (§5.3).
const CARD_TOKEN_TTL: Duration = Duration::from_secs(1800);
pub(crate) const CARD_TOKEN_USES: u32 = 2;

/// A sandbox user.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SandboxUser {
    /// open_id (`ou_…`).
    pub open_id: String,
    /// user_id.
    pub user_id: String,
    /// union_id (`on_…`).
    pub union_id: String,
    /// Display name.
    pub name: String,
    /// Email.
    pub email: String,
    /// Avatar URL.
    pub avatar_url: String,
}

pub(crate) fn default_users(extra: usize) -> Vec<SandboxUser> {
    let names: Vec<String> = ["alice", "bob", "carol"]
        .iter()
        .map(|n| (*n).to_owned())
        .chain((0..extra).map(|i| format!("user{i:04}")))
        .collect();
    names
        .iter()
        .map(|n| SandboxUser {
            open_id: format!("ou_sandbox_{n}"),
            user_id: format!("sandbox_{n}"),
            union_id: format!("on_sandbox_{n}"),
            name: format!("{}{} (sandbox)", n[..1].to_uppercase(), &n[1..]),
            email: format!("{n}@sandbox.example"),
            avatar_url: format!("https://sandbox.example/avatar/{n}.png"),
        })
        .collect()
}

/// A PKCE challenge from the authorize URL.
#[derive(Clone)]
pub(crate) enum Challenge {
    Plain(String),
    S256(String),
}

pub(crate) struct CodeGrant {
    pub open_id: String,
    pub challenge: Option<Challenge>,
    pub redirect_uri: String,
    pub scope: String,
    pub issued: Instant,
    pub used: bool,
    /// The app (`client_id`) the code was issued to.
    pub app: &'static str,
}

pub(crate) fn router(s: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/open-apis/auth/v3/tenant_access_token/internal",
            post(tenant_token),
        )
        .route(
            "/open-apis/auth/v3/app_access_token/internal",
            post(app_token),
        )
        .route("/callback/ws/endpoint", post(discovery))
        .route("/open-apis/authen/v1/authorize", get(authorize_page))
        .route("/sandbox/authorize", post(authorize_decide))
        .route("/open-apis/authen/v2/oauth/token", post(oauth_token))
        .route("/open-apis/authen/v1/user_info", get(user_info))
        .route("/open-apis/tenant/v2/tenant/query", get(tenant_query))
        .route("/open-apis/contact/v3/users/{id}", get(contact_user))
        .route(
            "/open-apis/contact/v3/users/batch_get_id",
            post(contact_batch_get_id),
        )
        .route("/open-apis/im/v1/messages", post(send_message))
        .route("/open-apis/im/v1/messages/{id}", patch(patch_message))
        .route("/open-apis/interactive/v1/card/update", post(delay_update))
        .with_state(s)
}

/// Counts a hit and applies an injected failure, if any.
/// Waits while `group` is held ([`super::Sandbox::hold`]), counted in `held`.
async fn wait_if_held(s: &Shared, group: &'static str) {
    let mut rx = s.holds.subscribe();
    if !rx.borrow_and_update().contains(group) {
        return;
    }
    *s.lock().held.entry(group).or_default() += 1;
    let _ = rx.wait_for(|h| !h.contains(group)).await;
    if let Some(n) = s.lock().held.get_mut(group) {
        *n = n.saturating_sub(1);
    }
}

pub(crate) fn hit(s: &Shared, group: &'static str) -> Option<Response> {
    let mut g = s.lock();
    *g.hits.entry(group).or_default() += 1;
    let (failure, n) = g.fail_next.get_mut(group)?;
    if *n == 0 {
        return None;
    }
    *n -= 1;
    let failure = *failure;
    drop(g);
    Some(failure_response(failure, group == "oauth_token"))
}

/// The answer of a request carried out whose answer is lost
/// ([`super::Sandbox::fail_next_after_processing`]), if one is due.
fn lost_answer(s: &Shared, group: &'static str) -> Option<Response> {
    let mut g = s.lock();
    let (status, n) = g.lost_answers.get_mut(group)?;
    if *n == 0 {
        return None;
    }
    *n -= 1;
    let status = *status;
    drop(g);
    Some(failure_response(
        Failure::Status(status),
        group == "oauth_token",
    ))
}

fn failure_response(failure: Failure, oauth: bool) -> Response {
    match failure {
        Failure::Code(code) if oauth => {
            oauth_error(code, "invalid_request", "sandbox injected failure")
        }
        Failure::Code(code) => {
            Json(json!({"code": code, "msg": "sandbox injected failure"})).into_response()
        }
        Failure::Status(status) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let body = match (status.as_u16(), oauth) {
                (429, _) => {
                    json!({"code": 99991400, "msg": "request trigger frequency limit"})
                }
                (503, true) => json!({"code": 20072, "error": "temporarily_unavailable",
                                      "error_description": "sandbox injected failure"}),
                (_, true) => json!({"code": 20050, "error": "server_error",
                                    "error_description": "sandbox injected failure"}),
                _ => json!({"code": 1_000_040_343, "msg": "sandbox injected failure"}),
            };
            let mut resp = (status, Json(body)).into_response();
            if status == StatusCode::TOO_MANY_REQUESTS {
                let h = resp.headers_mut();
                h.insert(
                    "x-ogw-ratelimit-limit",
                    axum::http::HeaderValue::from_static("50"),
                );
                h.insert(
                    "x-ogw-ratelimit-reset",
                    axum::http::HeaderValue::from_static("1"),
                );
            }
            resp
        }
    }
}

/// The app whose id and secret `body` carries, when the sandbox knows that pair.
fn creds_app(body: &Value, id_key: &str, secret_key: &str) -> Option<&'static str> {
    super::known_app(
        body[id_key].as_str().unwrap_or_default(),
        Some(body[secret_key].as_str().unwrap_or_default()),
    )
}

/// The app a tenant token (as presented in `h`) was issued to.
pub(crate) fn tenant_app(s: &Shared, h: &HeaderMap) -> &'static str {
    bearer(h)
        .and_then(|t| s.lock().token_apps.get(&t).copied())
        .unwrap_or(APP_ID)
}

/// The current tenant token of `app` and its remaining seconds (see [`issue_tenant`]).
fn issue_tenant_for(s: &Shared, app: &'static str) -> (String, u64) {
    if app == APP_ID {
        return issue_tenant(s);
    }
    let fresh = s.next_id("t-sandbox-");
    let mut g = s.lock();
    if let Some((t, issued)) = g.other_tenants.get(app) {
        let left = TENANT_TTL.saturating_sub(issued.elapsed().as_secs());
        if left >= TENANT_RENEW_WITHIN && g.tenant_tokens.contains(t) {
            return (t.clone(), left);
        }
    }
    g.other_tenants.insert(app, (fresh.clone(), Instant::now()));
    g.tenant_tokens.push(fresh.clone());
    g.token_apps.insert(fresh.clone(), app);
    (fresh, TENANT_TTL)
}

/// The current tenant token and its remaining seconds; a new one when < 30 min remain (§4.1).
fn issue_tenant(s: &Shared) -> (String, u64) {
    let fresh = s.next_id("t-sandbox-");
    let mut g = s.lock();
    if let Some((t, issued)) = &g.current_tenant {
        let left = TENANT_TTL.saturating_sub(issued.elapsed().as_secs());
        if left >= TENANT_RENEW_WITHIN {
            return (t.clone(), left);
        }
    }
    g.current_tenant = Some((fresh.clone(), Instant::now()));
    g.tenant_tokens.push(fresh.clone());
    (fresh, TENANT_TTL)
}

async fn tenant_token(State(s): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    if let Some(r) = hit(&s, "tenant_token") {
        return r;
    }
    let Some(app) = creds_app(&body, "app_id", "app_secret") else {
        return Json(json!({"code": 10014, "msg": "app secret invalid"})).into_response();
    };
    let (t, expire) = issue_tenant_for(&s, app);
    Json(json!({"code": 0, "msg": "ok", "tenant_access_token": t, "expire": expire}))
        .into_response()
}

async fn app_token(State(s): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    if let Some(r) = hit(&s, "app_token") {
        return r;
    }
    let Some(app) = creds_app(&body, "app_id", "app_secret") else {
        return Json(json!({"code": 10014, "msg": "app secret invalid"})).into_response();
    };
    // The app token is accepted wherever the tenant token is (one bot identity per app here).
    let (t, expire) = issue_tenant_for(&s, app);
    Json(json!({"code": 0, "msg": "ok", "app_access_token": t, "tenant_access_token": t, "expire": expire})).into_response()
}

async fn discovery(State(s): State<Arc<Shared>>, Json(body): Json<Value>) -> Response {
    if let Some(r) = hit(&s, "ws_endpoint") {
        return r;
    }
    if let Some(code) = s.lock().discovery_error {
        return Json(json!({"code": code, "msg": "sandbox discovery error"})).into_response();
    }
    let Some(app) = creds_app(&body, "AppID", "AppSecret") else {
        return Json(json!({"code": 514, "msg": "auth failed: app secret invalid"}))
            .into_response();
    };
    let device = s.next_id("sbx-");
    let ticket = s.next_id("tk");
    {
        let mut g = s.lock();
        g.tickets.insert(ticket.clone());
        g.ticket_apps.insert(ticket.clone(), app);
    }
    let url = format!(
        "{}/ws?fpid=1&aid=1&device_id={device}&access_key={}&service_id=42&ticket={ticket}",
        s.ws_base(),
        s.next_id("ak"),
    );
    Json(json!({
        "code": 0, "msg": "ok",
        "data": {"URL": url, "ClientConfig": {"ReconnectCount": -1, "ReconnectInterval": 5, "ReconnectNonce": 1, "PingInterval": s.opts.ping_interval}}
    }))
    .into_response()
}

pub(crate) fn bearer(h: &HeaderMap) -> Option<String> {
    crate::http::bearer::presented(h).map(str::to_owned)
}

pub(crate) fn tenant_ok(s: &Shared, h: &HeaderMap) -> bool {
    bearer(h).is_some_and(|t| s.lock().tenant_tokens.contains(&t))
}

/// An answer sent instead of the one asked for (an injected failure, a bad token, a bad
/// parameter), boxed so that a `Result` carrying it stays small.
pub(crate) struct Refusal(Box<Response>);

impl From<Response> for Refusal {
    fn from(r: Response) -> Self {
        Self(Box::new(r))
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        *self.0
    }
}

/// The preamble of a call made with the tenant token: counts the hit on `group` (which may
/// inject a failure), then checks the token. `Err` is the answer to send instead.
pub(crate) fn tenant_call(s: &Shared, h: &HeaderMap, group: &'static str) -> Result<(), Refusal> {
    if let Some(r) = hit(s, group) {
        return Err(r.into());
    }
    if tenant_ok(s, h) {
        Ok(())
    } else {
        Err(unauthorized().into())
    }
}

pub(crate) fn unauthorized() -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"code": 99991663, "msg": "Invalid access token for authorization. Please make a request with token attached."}))).into_response()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The authorize page: who are you, approve or reject.
async fn authorize_page(
    State(s): State<Arc<Shared>>,
    Query(q): Query<Vec<(String, String)>>,
) -> Response {
    let get = |k: &str| q.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
    if let Some(r) = hit(&s, "authorize") {
        return r;
    }
    if super::known_app(get("client_id").as_deref().unwrap_or_default(), None).is_none() {
        return (
            StatusCode::BAD_REQUEST,
            Html("<h1>Unknown app</h1><p>client_id is not the sandbox app.</p>".to_owned()),
        )
            .into_response();
    }
    let hidden =
        q.iter()
            .filter(|(k, _)| k != "sandbox_user")
            .fold(String::new(), |mut out, (k, v)| {
                use std::fmt::Write as _;
                let _ = write!(
                    out,
                    "<input type=hidden name=\"{}\" value=\"{}\">",
                    esc(k),
                    esc(v)
                );
                out
            });
    // The signed-in user: `sandbox_user` (the page's links) or `login_hint`, by any id.
    let chosen = get("sandbox_user")
        .or_else(|| get("login_hint"))
        .and_then(|id| find_user(&s, &id))
        .map(|u| u.open_id);
    let users = s.lock().users.clone();
    let mut options = String::new();
    for u in &users {
        let sel = if chosen.as_deref() == Some(u.open_id.as_str()) {
            " selected"
        } else {
            ""
        };
        options.push_str(&format!(
            "<option value=\"{}\"{sel}>{}</option>",
            esc(&u.open_id),
            esc(&u.name)
        ));
    }
    let scope = get("scope").unwrap_or_default();
    Html(format!(
        "<!doctype html><html><head><meta charset=utf-8><title>Sandbox · Authorize</title>{css}</head><body>\
         <div class=card><h1>Authorize the app?</h1><p>The app <b>{APP_ID}</b> asks for: <code>{}</code></p>\
         <form method=post action=\"/sandbox/authorize\">{hidden}<p>Signed in as <select name=sandbox_user>{options}</select></p>\
         <button name=decision value=approve class=ok>Approve</button> <button name=decision value=reject class=no>Reject</button></form></div></body></html>",
        esc(&scope),
        css = super::assets::CSS
    ))
    .into_response()
}

async fn authorize_decide(
    State(s): State<Arc<Shared>>,
    Form(f): Form<Vec<(String, String)>>,
) -> Response {
    let get = |k: &str| {
        f.iter()
            .find(|(a, _)| a == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let approve = get("decision") == "approve";
    let Ok(mut url) = url::Url::parse("http://x/open-apis/authen/v1/authorize") else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    {
        let mut qp = url.query_pairs_mut();
        for (k, v) in &f {
            if k != "decision" && k != "sandbox_user" {
                qp.append_pair(k, v);
            }
        }
    }
    match decide(&s, url.as_str(), &get("sandbox_user"), approve) {
        Ok(to) => Redirect::to(&to).into_response(),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Html(format!("<p>{}</p>", esc(&e.to_string()))),
        )
            .into_response(),
    }
}

/// Carries out an approve/reject for `authorize_url` as `open_id`; returns the redirect URL.
pub(crate) fn decide(
    s: &Shared,
    authorize_url: &str,
    open_id: &str,
    approve: bool,
) -> Result<String, SandboxError> {
    let url = url::Url::parse(authorize_url)
        .map_err(|e| SandboxError::Control(format!("bad authorize URL: {e}")))?;
    let get = |k: &str| {
        url.query_pairs()
            .find(|(a, _)| a == k)
            .map(|(_, v)| v.into_owned())
    };
    let Some(app) = super::known_app(get("client_id").as_deref().unwrap_or_default(), None) else {
        return Err(SandboxError::Control(
            "client_id is not a sandbox app".to_owned(),
        ));
    };
    let redirect =
        get("redirect_uri").ok_or_else(|| SandboxError::Control("no redirect_uri".to_owned()))?;
    if get("response_type").as_deref() != Some("code") {
        return Err(SandboxError::Control(
            "response_type must be `code`".to_owned(),
        ));
    }
    let Some(open_id) = find_user(s, open_id).map(|u| u.open_id) else {
        return Err(SandboxError::Control(format!("no sandbox user {open_id}")));
    };
    let challenge = match (
        get("code_challenge"),
        get("code_challenge_method").as_deref(),
    ) {
        (None, _) => None,
        (Some(c), None | Some("plain")) => Some(Challenge::Plain(c)),
        (Some(c), Some("S256")) => Some(Challenge::S256(c)),
        (Some(_), Some(m)) => {
            return Err(SandboxError::Control(format!(
                "unknown code_challenge_method {m}"
            )))
        }
    };
    let mut to = url::Url::parse(&redirect)
        .map_err(|e| SandboxError::Control(format!("bad redirect_uri: {e}")))?;
    {
        let mut qp = to.query_pairs_mut();
        if approve {
            let code = s.next_id("sbxcode");
            s.lock().codes.insert(
                code.clone(),
                CodeGrant {
                    open_id: open_id.clone(),
                    challenge,
                    redirect_uri: redirect.clone(),
                    scope: get("scope").unwrap_or_default(),
                    issued: Instant::now(),
                    used: false,
                    app,
                },
            );
            qp.append_pair("code", &code);
        } else {
            qp.append_pair("error", "access_denied");
        }
        if let Some(state) = get("state") {
            qp.append_pair("state", &state);
        }
    }
    Ok(to.to_string())
}

pub(crate) fn oauth_error(code: i64, error: &str, desc: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"code": code, "error": error, "error_description": desc})),
    )
        .into_response()
}

fn issue_user_tokens(s: &Shared, app: &'static str, open_id: &str, scope: &str) -> Value {
    let access = s.next_id("eyJsandbox.access.");
    let ttl = s.opts.user_token_ttl;
    let mut g = s.lock();
    g.token_apps.insert(access.clone(), app);
    g.access.insert(
        access.clone(),
        (
            open_id.to_owned(),
            Instant::now() + Duration::from_secs(ttl),
        ),
    );
    let mut body = json!({"code": 0, "access_token": access, "expires_in": ttl, "token_type": "Bearer", "scope": scope});
    if scope.split_whitespace().any(|x| x == "offline_access") {
        drop(g);
        let refresh = s.next_id("eyJsandbox.refresh.");
        s.lock().token_apps.insert(refresh.clone(), app);
        s.lock().refresh.insert(
            refresh.clone(),
            (open_id.to_owned(), scope.to_owned(), access.clone()),
        );
        body["refresh_token"] = json!(refresh);
        body["refresh_token_expires_in"] = json!(REFRESH_TTL);
    }
    body
}

/// The v2 token endpoint. The grant is carried out first; then the answer may be held
/// ([`super::Sandbox::hold`]) or replaced by a failure
/// ([`super::Sandbox::fail_next_after_processing`]): either way the work is done.
async fn oauth_token(State(s): State<Arc<Shared>>, Json(b): Json<Value>) -> Response {
    if let Some(r) = hit(&s, "oauth_token") {
        return r;
    }
    let answer = oauth_grant(&s, &b);
    let lost = lost_answer(&s, "oauth_token");
    wait_if_held(&s, "oauth_token").await;
    lost.unwrap_or(answer)
}

fn oauth_grant(s: &Shared, b: &Value) -> Response {
    if super::known_app(b["client_id"].as_str().unwrap_or_default(), None).is_none() {
        return oauth_error(20048, "invalid_client", "app does not exist");
    }
    let Some(app) = creds_app(b, "client_id", "client_secret") else {
        return oauth_error(20002, "invalid_client", "client secret invalid");
    };
    match b["grant_type"].as_str() {
        Some("authorization_code") => {
            let code = b["code"].as_str().unwrap_or_default().to_owned();
            let grant = {
                let mut g = s.lock();
                match g.codes.get_mut(&code) {
                    None => {
                        return oauth_error(20003, "invalid_grant", "authorization code not found")
                    }
                    Some(c) if c.used => {
                        return oauth_error(
                            20065,
                            "invalid_grant",
                            "authorization code already used",
                        )
                    }
                    Some(c) if c.issued.elapsed() > CODE_TTL => {
                        return oauth_error(20004, "invalid_grant", "authorization code expired")
                    }
                    // A code is redeemed only by the app it was issued to.
                    Some(c) if c.app != app => {
                        return oauth_error(20003, "invalid_grant", "authorization code not found")
                    }
                    Some(c) => {
                        // Single use, whether or not the exchange below succeeds.
                        c.used = true;
                        (
                            c.open_id.clone(),
                            c.challenge.clone(),
                            c.redirect_uri.clone(),
                            c.scope.clone(),
                        )
                    }
                }
            };
            let (open_id, challenge, redirect, scope) = grant;
            if b["redirect_uri"].as_str() != Some(redirect.as_str()) {
                return oauth_error(20071, "invalid_grant", "redirect_uri mismatch");
            }
            if let Some(ch) = challenge {
                let Some(verifier) = b["code_verifier"].as_str() else {
                    return oauth_error(20001, "invalid_request", "code_verifier is required");
                };
                let ok = match ch {
                    Challenge::S256(c) => {
                        base64::engine::general_purpose::URL_SAFE_NO_PAD
                            .encode(Sha256::digest(verifier.as_bytes()))
                            == c
                    }
                    Challenge::Plain(c) => verifier == c,
                };
                if !ok {
                    return oauth_error(20049, "invalid_grant", "PKCE verification failed");
                }
            }
            Json(issue_user_tokens(s, app, &open_id, &scope)).into_response()
        }
        Some("refresh_token") => {
            let Some(rt) = b["refresh_token"].as_str().map(str::to_owned) else {
                return oauth_error(20001, "invalid_request", "refresh_token is required");
            };
            if s.lock().token_apps.get(&rt).is_some_and(|a| *a != app) {
                return oauth_error(20026, "invalid_grant", "refresh token invalid");
            }
            let owner = {
                let mut g = s.lock();
                let owner = g.refresh.remove(&rt);
                if let Some((_, _, old_access)) = &owner {
                    g.used_refresh.insert(rt);
                    // The superseded access token keeps working for the grace, then stops.
                    let grace = g.superseded_access_grace.unwrap_or(Duration::from_secs(60));
                    if let Some((_, exp)) = g.access.get_mut(old_access) {
                        *exp = (*exp).min(Instant::now() + grace);
                    }
                    owner
                } else if g.used_refresh.contains(&rt) {
                    g.refresh_reuses += 1;
                    return oauth_error(20073, "invalid_grant", "refresh token already used");
                } else {
                    return oauth_error(20026, "invalid_grant", "refresh token invalid");
                }
            };
            match owner {
                Some((open_id, scope, _)) => {
                    Json(issue_user_tokens(s, app, &open_id, &scope)).into_response()
                }
                None => oauth_error(20026, "invalid_grant", "refresh token invalid"),
            }
        }
        Some(crate::lark::oauth::DEVICE_CODE_GRANT) => {
            let polled = s
                .lock()
                .devices
                .poll(app, b["device_code"].as_str().unwrap_or_default());
            match polled {
                Ok((open_id, scope)) => {
                    Json(issue_user_tokens(s, app, &open_id, &scope)).into_response()
                }
                Err((code, error, desc)) => oauth_error(code, error, desc),
            }
        }
        Some(_) => oauth_error(20036, "unsupported_grant_type", "unsupported grant_type"),
        None => oauth_error(20001, "invalid_request", "grant_type is required"),
    }
}

fn user_json(u: &super::SandboxUser) -> Value {
    json!({"open_id": u.open_id, "union_id": u.union_id, "user_id": u.user_id, "name": u.name, "en_name": u.name, "email": u.email,
           "avatar_url": u.avatar_url, "avatar_thumb": u.avatar_url, "avatar_middle": u.avatar_url, "avatar_big": u.avatar_url, "tenant_key": "sandbox"})
}

async fn user_info(State(s): State<Arc<Shared>>, h: HeaderMap) -> Response {
    if let Some(r) = hit(&s, "user_info") {
        return r;
    }
    let Some(tok) = bearer(&h) else {
        return unauthorized();
    };
    let open_id = match user_token_owner(&s, &tok) {
        Ok(o) => o,
        Err(r) => return *r,
    };
    let g = s.lock();
    let u = g.users.iter().find(|u| u.open_id == open_id).cloned();
    drop(g);
    match u {
        Some(u) => {
            let mut data = user_json(&u);
            // A user moved to another tenant (`Sandbox::set_user_tenant`) says so.
            if let Some(t) = s.lock().user_tenants.get(&u.open_id) {
                data["tenant_key"] = Value::String(t.clone());
            }
            Json(json!({"code": 0, "msg": "success", "data": data})).into_response()
        }
        None => Json(json!({"code": 41050, "msg": "no user"})).into_response(),
    }
}

/// `GET /open-apis/tenant/v2/tenant/query`: the app's tenant (the sandbox's own).
async fn tenant_query(State(s): State<Arc<Shared>>, h: HeaderMap) -> Response {
    if let Err(r) = tenant_call(&s, &h, "tenant_query") {
        return r.into_response();
    }
    Json(json!({"code": 0, "msg": "success", "data": {"tenant": {
        "name": "Sandbox", "display_id": "F000000001", "tenant_tag": 0, "tenant_key": "sandbox",
        "avatar": {}
    }}}))
    .into_response()
}

/// The open_id a user access token belongs to, or the platform's error (99991668 unknown,
/// 99991677 expired).
pub(crate) fn user_token_owner(s: &Shared, tok: &str) -> Result<String, Box<Response>> {
    let g = s.lock();
    let (code, msg) = match g.access.get(tok) {
        Some((o, exp)) if Instant::now() < *exp => return Ok(o.clone()),
        Some(_) => (99_991_677, "user access token expired"),
        None => (99_991_668, "user access token invalid"),
    };
    Err(Box::new(
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"code": code, "msg": msg})),
        )
            .into_response(),
    ))
}

pub(crate) fn find_user(s: &Shared, id: &str) -> Option<super::SandboxUser> {
    s.lock()
        .users
        .iter()
        .find(|u| u.open_id == id || u.user_id == id || u.union_id == id || u.email == id)
        .cloned()
}

async fn contact_user(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = tenant_call(&s, &h, "contact") {
        return r.into_response();
    }
    match find_user(&s, &id) {
        Some(u) => {
            let mut uj = user_json(&u);
            uj["avatar"] = json!({"avatar_72": u.avatar_url, "avatar_240": u.avatar_url, "avatar_640": u.avatar_url, "avatar_origin": u.avatar_url});
            Json(json!({"code": 0, "msg": "success", "data": {"user": uj}})).into_response()
        }
        None => (
            StatusCode::BAD_REQUEST,
            Json(json!({"code": 41050, "msg": "no user authority error"})),
        )
            .into_response(),
    }
}

async fn contact_batch_get_id(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
    Json(b): Json<Value>,
) -> Response {
    if let Err(r) = tenant_call(&s, &h, "contact") {
        return r.into_response();
    }
    let id_type = q
        .iter()
        .find(|(k, _)| k == "user_id_type")
        .map_or("open_id", |(_, v)| v.as_str());
    let users = s.lock().users.clone();
    let list: Vec<Value> = b["emails"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(
            |email| match users.iter().find(|u| u.email.eq_ignore_ascii_case(email)) {
                Some(u) => {
                    let id = match id_type {
                        "user_id" => &u.user_id,
                        "union_id" => &u.union_id,
                        _ => &u.open_id,
                    };
                    json!({"user_id": id, "email": email})
                }
                None => json!({"email": email}),
            },
        )
        .collect();
    Json(json!({"code": 0, "msg": "success", "data": {"user_list": list}})).into_response()
}

async fn send_message(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
    Json(b): Json<Value>,
) -> Response {
    // Held first, then the injected failure: a request released from a hold can still fail,
    // as a platform that hangs and then errors does.
    wait_if_held(&s, "im").await;
    if let Err(r) = tenant_call(&s, &h, "im") {
        return r.into_response();
    }
    let id_type = q
        .iter()
        .find(|(k, _)| k == "receive_id_type")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let receive_id = b["receive_id"].as_str().unwrap_or_default().to_owned();
    if find_user(&s, &receive_id).is_none() && id_type != "chat_id" {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"code": 230013, "msg": "Bot has NO availability to this user."})),
        )
            .into_response();
    }
    let content: Value = b["content"]
        .as_str()
        .and_then(|c| serde_json::from_str(c).ok())
        .unwrap_or(Value::Null);
    if content.is_null() {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"code": 230001, "msg": "content is not a JSON string"})),
        )
            .into_response();
    }
    let uuid = b["uuid"]
        .as_str()
        .filter(|u| !u.is_empty())
        .map(str::to_owned);
    if let Some(u) = &uuid {
        if let Some(id) = s.lock().send_uuids.get(u) {
            // A retried send with the same uuid: the same message, not a second one.
            return Json(json!({"code": 0, "msg": "success", "data": {"message_id": id, "chat_id": "oc_sandbox", "msg_type": b["msg_type"]}})).into_response();
        }
    }
    let message_id = s.next_id("om_sandbox_");
    if let Some(u) = uuid {
        s.lock().send_uuids.insert(u, message_id.clone());
    }
    let msg = SentMessage {
        message_id: message_id.clone(),
        receive_id,
        receive_id_type: id_type,
        msg_type: b["msg_type"].as_str().unwrap_or_default().to_owned(),
        content,
        history: vec![],
        app_id: tenant_app(&s, &h).to_owned(),
    };
    s.lock().messages.push(msg);
    Json(json!({"code": 0, "msg": "success", "data": {"message_id": message_id, "chat_id": "oc_sandbox", "msg_type": b["msg_type"]}})).into_response()
}

pub(crate) fn update_message(s: &Shared, message_id: &str, content: Value) -> bool {
    let mut g = s.lock();
    match g.messages.iter_mut().find(|m| m.message_id == message_id) {
        Some(m) => {
            let old = std::mem::replace(&mut m.content, content);
            m.history.push(old);
            true
        }
        None => false,
    }
}

async fn patch_message(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Path(id): Path<String>,
    Json(b): Json<Value>,
) -> Response {
    if let Err(r) = tenant_call(&s, &h, "im") {
        return r.into_response();
    }
    // A bot updates only the messages its own app sent.
    let app = tenant_app(&s, &h);
    let other_app = s
        .lock()
        .messages
        .iter()
        .any(|m| m.message_id == id && m.app_id != app);
    if other_app {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"code": 230027, "msg": "sandbox: the message was sent by another app"})),
        )
            .into_response();
    }
    let content: Value = b["content"]
        .as_str()
        .and_then(|c| serde_json::from_str(c).ok())
        .unwrap_or(Value::Null);
    if update_message(&s, &id, content) {
        Json(json!({"code": 0, "msg": "success", "data": {}})).into_response()
    } else {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"code": 230002, "msg": "message not found"})),
        )
            .into_response()
    }
}

/// Delayed card update (§5.3): `{"token": "c-…", "card": {…}}` replaces the card of the
/// message whose callback carried the token; 30 min, 2 uses.
async fn delay_update(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Json(b): Json<Value>,
) -> Response {
    if let Err(r) = tenant_call(&s, &h, "card_update") {
        return r.into_response();
    }
    let token = b["token"].as_str().unwrap_or_default();
    let card = b["card"].clone();
    if !card.is_object() {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"code": 200_830, "msg": "card is not a JSON object"})),
        )
            .into_response();
    }
    let target = {
        let mut g = s.lock();
        match g.card_tokens.get_mut(token) {
            Some((msg, issued, uses)) if *uses > 0 && issued.elapsed() < CARD_TOKEN_TTL => {
                *uses -= 1;
                Some(msg.clone())
            }
            _ => None,
        }
    };
    match target {
        Some(msg) if update_message(&s, &msg, card) => {
            Json(json!({"code": 0, "msg": "success"})).into_response()
        }
        _ => (
            StatusCode::BAD_REQUEST,
            Json(json!({"code": 200_750, "msg": "card token invalid, expired or used up"})),
        )
            .into_response(),
    }
}

/// Messages addressed to a user by any of their ids.
pub(crate) fn messages_for(s: &Shared, open_id: &str) -> Vec<SentMessage> {
    let Some(u) = find_user(s, open_id) else {
        return vec![];
    };
    s.lock()
        .messages
        .iter()
        .filter(|m| [&u.open_id, &u.user_id, &u.union_id, &u.email].contains(&&m.receive_id))
        .cloned()
        .collect()
}
