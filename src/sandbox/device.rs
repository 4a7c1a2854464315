//! The device authorization grant (RFC 8628) as the platform serves it (compat notes §1):
//! the device authorization endpoint on both observed paths, the verification page where a
//! person approves or rejects (as any sandbox user), and the token endpoint's device answers
//! (`authorization_pending`, `slow_down` when polled sooner than the interval,
//! `access_denied`, `expired_token`).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::Engine;
use serde_json::{json, Value};

use super::platform::{find_user, hit, oauth_error};
use super::{Shared, APP_ID};

pub(crate) fn router(s: Arc<Shared>) -> Router {
    Router::new()
        .route("/oauth/v1/device_authorization", post(authorize_primary))
        .route(
            "/open-apis/authen/v2/oauth/device_authorization",
            post(authorize_fallback),
        )
        .route("/sandbox/device", get(page).post(decide_form))
        .with_state(s)
}

/// The app whose credentials came as HTTP Basic, if they are a sandbox app's.
fn basic_app(h: &HeaderMap) -> Option<&'static str> {
    let creds = h
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|v| {
            base64::engine::general_purpose::STANDARD
                .decode(v.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok())?;
    let (id, secret) = creds.split_once(':')?;
    super::known_app(id, Some(secret))
}

async fn authorize_primary(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Form(f): Form<Vec<(String, String)>>,
) -> Response {
    if let Some(r) = hit(&s, "device_authorization") {
        return r;
    }
    if s.lock().devices.settings.primary_path_missing {
        return StatusCode::NOT_FOUND.into_response();
    }
    let Some(app) = basic_app(&h) else {
        return oauth_error(20002, "invalid_client", "client credentials invalid");
    };
    let scope = f
        .iter()
        .find(|(k, _)| k == "scope")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    issue(&s, app, &scope)
}

async fn authorize_fallback(State(s): State<Arc<Shared>>, Json(b): Json<Value>) -> Response {
    if let Some(r) = hit(&s, "device_authorization") {
        return r;
    }
    let app = b["client_secret"].as_str().and_then(|secret| {
        super::known_app(b["client_id"].as_str().unwrap_or_default(), Some(secret))
    });
    let Some(app) = app else {
        return oauth_error(20002, "invalid_client", "client credentials invalid");
    };
    issue(&s, app, b["scope"].as_str().unwrap_or_default())
}

fn issue(s: &Shared, app: &'static str, scope: &str) -> Response {
    let device_code = s.next_id("sbxdevice");
    let user_code = format!("{:08X}", rand::random::<u32>());
    let base = s.base_url();
    let settings = s.lock().devices.issue(app, &device_code, &user_code, scope);
    Json(json!({
        "device_code": device_code,
        "user_code": user_code,
        "verification_uri": format!("{base}/sandbox/device"),
        "verification_uri_complete": format!("{base}/sandbox/device?user_code={user_code}"),
        "expires_in": settings.expires_in.as_secs(),
        "interval": settings.interval.as_secs(),
    }))
    .into_response()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The verification page: the code, who is signed in (any sandbox user), approve or reject.
async fn page(State(s): State<Arc<Shared>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let code = q.get("user_code").cloned().unwrap_or_default();
    let g = s.lock();
    let Some(scope) = g.devices.scope_of(&code) else {
        return (
            StatusCode::NOT_FOUND,
            Html("<h1>Unknown code</h1>".to_owned()),
        )
            .into_response();
    };
    let users = g.users.clone();
    drop(g);
    let options = users.iter().fold(String::new(), |mut out, u| {
        use std::fmt::Write as _;
        let _ = write!(
            out,
            "<option value=\"{}\">{}</option>",
            esc(&u.open_id),
            esc(&u.name)
        );
        out
    });
    Html(format!(
        "<!doctype html><html><head><meta charset=utf-8><title>Sandbox · Device authorization</title>{css}</head><body>\
         <div class=card><h1>Authorize a device?</h1><p>Code <b id=user-code>{code}</b>: the app <b>{APP_ID}</b> asks for <code>{scope}</code></p>\
         <form method=post action=\"/sandbox/device\"><input type=hidden name=user_code value=\"{code}\">\
         <p>Signed in as <select name=sandbox_user>{options}</select></p>\
         <button name=decision value=approve class=ok>Approve</button> <button name=decision value=reject class=no>Reject</button></form></div></body></html>",
        code = esc(&code),
        scope = esc(&scope),
        css = super::assets::CSS
    ))
    .into_response()
}

async fn decide_form(
    State(s): State<Arc<Shared>>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let get = |k: &str| f.get(k).cloned().unwrap_or_default();
    match decide(
        &s,
        &get("user_code"),
        &get("sandbox_user"),
        get("decision") == "approve",
    ) {
        Ok(()) => Html(
            "<!doctype html><html><body><h1 id=done>Done</h1><p>You can go back to the app.</p></body></html>"
                .to_owned(),
        )
        .into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, Html(format!("<p>{}</p>", esc(&e)))).into_response(),
    }
}

/// Approves (as `open_id`) or rejects the device code shown as `user_code`.
pub(crate) fn decide(
    s: &Shared,
    user_code: &str,
    open_id: &str,
    approve: bool,
) -> Result<(), String> {
    let user = find_user(s, open_id).ok_or_else(|| format!("no sandbox user {open_id}"))?;
    s.lock().devices.decide(user_code, &user.open_id, approve)
}
