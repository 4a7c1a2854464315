//! The device authorization grant (RFC 8628) as the platform serves it (compat notes §1):
//! the device authorization endpoint on both observed paths, the verification page where a
//! person approves or rejects (as any sandbox user), and the token endpoint's device answers
//! (`authorization_pending`, `slow_down` when polled sooner than the interval,
//! `access_denied`, `expired_token`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::Engine;
use serde_json::{json, Value};

use super::platform::{find_user, hit, issue_user_tokens, oauth_error};
use super::{Shared, APP_ID, APP_SECRET};

/// How the sandbox's device grant behaves ([`super::Sandbox::set_device`]).
#[derive(Debug, Clone, Copy)]
pub struct DeviceSettings {
    /// `expires_in` of new device codes.
    pub expires_in: Duration,
    /// `interval` of new device codes.
    pub interval: Duration,
    /// Grant tokens without a refresh token, even with `offline_access`.
    pub no_refresh_token: bool,
    /// The accounts path answers 404 (only the OpenAPI path works).
    pub primary_path_missing: bool,
    /// Answer this many polls `slow_down` (then as usual), to see the client honour it.
    pub slow_down_next: u32,
}

impl Default for DeviceSettings {
    fn default() -> Self {
        Self {
            expires_in: Duration::from_secs(600),
            interval: Duration::from_secs(5),
            no_refresh_token: false,
            primary_path_missing: false,
            slow_down_next: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    Pending,
    Approved(String),
    Denied,
}

/// One device code.
#[derive(Debug)]
pub(crate) struct DeviceCode {
    scope: String,
    issued: Instant,
    expires_in: Duration,
    interval: Duration,
    last_poll: Option<Instant>,
    decision: Decision,
    used: bool,
}

/// Device grant state.
#[derive(Debug, Default)]
pub(crate) struct Devices {
    pub settings: DeviceSettings,
    codes: HashMap<String, DeviceCode>,
    by_user_code: HashMap<String, String>,
    /// Polls that came sooner than the interval in force.
    pub too_fast: u64,
    /// Polls answered.
    pub polls: u64,
}

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

fn basic_ok(h: &HeaderMap) -> bool {
    let Some(v) = h
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
    else {
        return false;
    };
    base64::engine::general_purpose::STANDARD
        .decode(v.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .is_some_and(|creds| creds == format!("{APP_ID}:{APP_SECRET}"))
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
    if !basic_ok(&h) {
        return oauth_error(20002, "invalid_client", "client credentials invalid");
    }
    let scope = f
        .iter()
        .find(|(k, _)| k == "scope")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    issue(&s, &scope)
}

async fn authorize_fallback(State(s): State<Arc<Shared>>, Json(b): Json<Value>) -> Response {
    if let Some(r) = hit(&s, "device_authorization") {
        return r;
    }
    if b["client_id"].as_str() != Some(APP_ID) || b["client_secret"].as_str() != Some(APP_SECRET) {
        return oauth_error(20002, "invalid_client", "client credentials invalid");
    }
    issue(&s, b["scope"].as_str().unwrap_or_default())
}

fn issue(s: &Shared, scope: &str) -> Response {
    let device_code = s.next_id("sbxdevice");
    let user_code = format!("{:08X}", rand::random::<u32>());
    let base = s.base_url();
    let mut g = s.lock();
    let settings = g.devices.settings;
    g.devices
        .by_user_code
        .insert(user_code.clone(), device_code.clone());
    g.devices.codes.insert(
        device_code.clone(),
        DeviceCode {
            scope: scope.to_owned(),
            issued: Instant::now(),
            expires_in: settings.expires_in,
            interval: settings.interval,
            last_poll: None,
            decision: Decision::Pending,
            used: false,
        },
    );
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
    let Some(dc) = g
        .devices
        .by_user_code
        .get(&code)
        .and_then(|d| g.devices.codes.get(d))
    else {
        return (
            StatusCode::NOT_FOUND,
            Html("<h1>Unknown code</h1>".to_owned()),
        )
            .into_response();
    };
    let scope = dc.scope.clone();
    let users = g.users.clone();
    drop(g);
    let options: String = users
        .iter()
        .map(|u| {
            format!(
                "<option value=\"{}\">{}</option>",
                esc(&u.open_id),
                esc(&u.name)
            )
        })
        .collect();
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
    let mut g = s.lock();
    let device = g
        .devices
        .by_user_code
        .get(user_code)
        .cloned()
        .ok_or_else(|| "unknown code".to_owned())?;
    let dc = g
        .devices
        .codes
        .get_mut(&device)
        .ok_or_else(|| "unknown code".to_owned())?;
    if dc.issued.elapsed() >= dc.expires_in {
        return Err("the code has expired".to_owned());
    }
    if dc.decision != Decision::Pending {
        return Err("the code was already answered".to_owned());
    }
    dc.decision = if approve {
        Decision::Approved(user.open_id)
    } else {
        Decision::Denied
    };
    Ok(())
}

/// The token endpoint's answer to `grant_type=urn:ietf:params:oauth:grant-type:device_code`.
pub(crate) fn grant(s: &Shared, b: &Value) -> Response {
    let code = b["device_code"].as_str().unwrap_or_default().to_owned();
    let (open_id, scope, no_refresh) = {
        let mut g = s.lock();
        g.devices.polls += 1;
        let force_slow = g.devices.settings.slow_down_next > 0;
        if force_slow {
            g.devices.settings.slow_down_next -= 1;
        }
        let no_refresh = g.devices.settings.no_refresh_token;
        let mut too_fast = false;
        let Some(dc) = g.devices.codes.get_mut(&code) else {
            return oauth_error(20003, "invalid_grant", "device code not found");
        };
        if dc.used {
            return oauth_error(20065, "invalid_grant", "device code already used");
        }
        if dc.issued.elapsed() >= dc.expires_in {
            return oauth_error(20004, "expired_token", "the device code has expired");
        }
        let now = Instant::now();
        if let Some(last) = dc.last_poll {
            too_fast = now.duration_since(last) < dc.interval;
        }
        dc.last_poll = Some(now);
        if too_fast || force_slow {
            dc.interval += Duration::from_secs(5);
        }
        let answer = match (&dc.decision, too_fast || force_slow) {
            (_, true) => Err(("slow_down", "poll less often")),
            (Decision::Pending, false) => {
                Err(("authorization_pending", "the user has not answered"))
            }
            (Decision::Denied, false) => Err(("access_denied", "the user declined")),
            (Decision::Approved(o), false) => {
                dc.used = true;
                Ok((o.clone(), dc.scope.clone()))
            }
        };
        if too_fast {
            g.devices.too_fast += 1;
        }
        match answer {
            Err((error, desc)) => return oauth_error(0, error, desc),
            Ok((o, sc)) => (o, sc, no_refresh),
        }
    };
    let scope = if no_refresh {
        scope
            .split_whitespace()
            .filter(|x| *x != "offline_access")
            .collect::<Vec<_>>()
            .join(" ")
    } else {
        scope
    };
    Json(issue_user_tokens(s, &open_id, &scope)).into_response()
}
