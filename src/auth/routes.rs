//! The flow's HTTP routes: the public OAuth redirect and the admin API.

use axum::body::Bytes;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use axum::Router;
use secrecy::ExposeSecret;
use serde_json::{json, Value};

use super::error::{AuthError, TokenError};
use super::flow::AuthService;
use super::options::CALLBACK_PATH;
use super::request::{AuthRequest, UserRef};
use super::time::ceil_secs;
use crate::http::retry_later;
use crate::storage::{SessionId, SessionSummary};

pub(super) fn api_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({ "error": code, "message": message.into() })),
    )
        .into_response()
}

/// `500 store_error`.
/// How long a client is asked to wait when the store cannot be reached.
const STORE_RETRY_AFTER_SECS: u64 = 5;

/// A store error as an answer: a store that cannot be reached now (PostgreSQL down, a lost
/// connection) is 503 `store_unavailable` with `Retry-After` (nothing was decided; ask again);
/// any other store error is 500 `store_error`.
fn store_failure(transient: bool, shown: &dyn std::fmt::Display) -> Response {
    if transient {
        return retry_later(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "error": "store_unavailable", "message": shown.to_string() }),
            STORE_RETRY_AFTER_SECS,
        );
    }
    store_error(shown)
}

pub(super) fn store_error(e: &dyn std::fmt::Display) -> Response {
    api_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "store_error",
        e.to_string(),
    )
}

pub(super) fn bad_field(field: &str, message: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": "invalid_request", "field": field, "message": message.into() })),
    )
        .into_response()
}

pub(super) fn parse_request_body(
    body: &[u8],
    defaults: &[String],
) -> Result<AuthRequest, (&'static str, String)> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| ("body", format!("the body is not JSON: {e}")))?;
    let Some(obj) = v.as_object() else {
        return Err(("body", "the body must be a JSON object".to_owned()));
    };
    let text = |k: &'static str| match obj.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err((k, format!("{k} must be a string"))),
    };
    let user = match (text("user_id")?, text("open_id")?) {
        (Some(u), None) => UserRef::UserId(u),
        (None, Some(o)) => UserRef::OpenId(o),
        (Some(_), Some(_)) => {
            return Err(("user_id", "give user_id or open_id, not both".to_owned()));
        }
        (None, None) => return Err(("user_id", "user_id or open_id is required".to_owned())),
    };
    let scopes = match obj.get("scopes") {
        None | Some(Value::Null) => defaults.to_vec(),
        Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ("scopes", "scopes must be an array of strings".to_owned()))?,
        Some(_) => {
            return Err((
                "scopes",
                "scopes must be an array of strings or a space-separated string".to_owned(),
            ))
        }
    };
    Ok(AuthRequest { user, scopes })
}

pub(super) async fn http_request(State(svc): State<AuthService>, body: Bytes) -> Response {
    let req = match parse_request_body(&body, &svc.inner.opts.default_scopes) {
        Ok(r) => r,
        Err((field, message)) => return bad_field(field, message),
    };
    request_answer(svc.request(req).await, |o| {
        (
            if o.reused {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            },
            Json(json!({
                "session_id": o.session_id.to_string(),
                "reused": o.reused,
                "state": "pending",
            })),
        )
            .into_response()
    })
}

/// The answer to an authorization request: `sent` for the outcome, the refusals as the
/// request API gives them.
fn request_answer(
    outcome: Result<super::RequestOutcome, AuthError>,
    sent: impl FnOnce(super::RequestOutcome) -> Response,
) -> Response {
    match outcome {
        Ok(o) => sent(o),
        Err(AuthError::RateLimited { retry_after }) => {
            let secs = ceil_secs(retry_after);
            retry_later(
                StatusCode::TOO_MANY_REQUESTS,
                json!({
                    "error": "rate_limited",
                    "message": format!("too many authorization requests for this user; retry in {secs} s"),
                    "retry_after_seconds": secs,
                }),
                secs,
            )
        }
        Err(AuthError::Invalid { field, reason }) => bad_field(field, reason),
        Err(e @ AuthError::UnresolvedUser { .. }) => api_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unresolved_user",
            e.to_string(),
        ),
        Err(e @ AuthError::Lark(_)) => {
            api_error(StatusCode::BAD_GATEWAY, "lark_error", e.to_string())
        }
        Err(e @ AuthError::Busy { retry_after }) => retry_later(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "error": "request_in_progress", "message": e.to_string() }),
            ceil_secs(retry_after),
        ),
        Err(e @ AuthError::Store(_)) => {
            store_failure(matches!(&e, AuthError::Store(s) if s.is_transient()), &e)
        }
    }
}

/// A path or query value the admin API refuses: answered 400 `invalid_request`, naming it.
pub(super) struct BadField {
    field: &'static str,
    message: &'static str,
}

impl IntoResponse for BadField {
    fn into_response(self) -> Response {
        bad_field(self.field, self.message)
    }
}

/// The session id a `/api/v1/sessions/{id}…` path names.
fn path_session(id: &str) -> Result<SessionId, BadField> {
    id.parse::<SessionId>().map_err(|_| BadField {
        field: "id",
        message: "a session id is 32 hex characters",
    })
}

/// The answer naming one session: its summary, 404 when there is none, or the store's error.
fn session_answer(found: crate::storage::Result<Option<SessionSummary>>) -> Response {
    match found {
        Ok(Some(s)) => (StatusCode::OK, Json(json!(s))).into_response(),
        Ok(None) => api_error(StatusCode::NOT_FOUND, "not_found", "no such session"),
        Err(e) => store_error(&e),
    }
}

pub(super) async fn http_session(
    State(svc): State<AuthService>,
    Path(id): Path<String>,
) -> Result<Response, BadField> {
    let id = path_session(&id)?;
    let found = svc.store().run(move |s| s.get_session_summary(id)).await;
    // Another app's session is not there for this one.
    Ok(session_answer(
        found.map(|s| s.filter(|s| s.app_id == svc.inner.app_id)),
    ))
}

#[derive(serde::Deserialize)]
pub(super) struct TokenQuery {
    id_type: Option<String>,
    /// `true`: when the user has no valid token, send the Authorize card (with the default
    /// scopes) and say so, instead of only answering that there is none.
    #[serde(default)]
    request: bool,
}

/// The user a `/api/v1/users/{id}/…` path names: `id_type` says which id, else an `ou_`
/// prefix means an open_id; an unknown `id_type` is refused.
pub(super) fn path_user(id: String, id_type: Option<&str>) -> Result<UserRef, BadField> {
    match id_type {
        Some("open_id") => Ok(UserRef::OpenId(id)),
        Some("user_id") => Ok(UserRef::UserId(id)),
        None if id.starts_with("ou_") => Ok(UserRef::OpenId(id)),
        None => Ok(UserRef::UserId(id)),
        Some(_) => Err(BadField {
            field: "id_type",
            message: "id_type is open_id or user_id",
        }),
    }
}

pub(super) async fn http_token(
    State(svc): State<AuthService>,
    Path(id): Path<String>,
    Query(q): Query<TokenQuery>,
) -> Result<Response, BadField> {
    let user = path_user(id, q.id_type.as_deref())?;
    let found = svc.access_token(user.clone()).await;
    if q.request {
        let reason = match &found {
            Err(TokenError::NotFound) => Some("no_token"),
            Err(TokenError::NeedsReauth { .. }) => Some("needs_reauthorization"),
            _ => None,
        };
        if let Some(reason) = reason {
            let req = super::AuthRequest {
                user,
                scopes: svc.inner.opts.default_scopes.clone(),
            };
            return Ok(request_answer(svc.request(req).await, |o| {
                (
                    StatusCode::ACCEPTED,
                    Json(json!({
                        "error": reason,
                        "authorization_requested": true,
                        "message": if o.reused {
                            "the user has no valid token; an Authorize card is already waiting for them"
                        } else {
                            "the user has no valid token; an Authorize card was sent to them"
                        },
                        "session_id": o.session_id.to_string(),
                        "reused": o.reused,
                    })),
                )
                    .into_response()
            }));
        }
    }
    Ok(match found {
        Ok(t) => (
            StatusCode::OK,
            Json(json!({
                "access_token": t.access_token.expose_secret(),
                "expires_at": t.expires_at,
            })),
        )
            .into_response(),
        Err(TokenError::NotFound) => api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "this user has no token; request an authorization first",
        ),
        Err(TokenError::NeedsReauth { session }) => (
            StatusCode::CONFLICT,
            Json(json!({
                "error": "needs_reauthorization",
                "reason": "needs_reauthorization",
                "message": "the user's authorization is no longer accepted; request a new one",
                "session_id": session.map(|s| s.to_string()),
            })),
        )
            .into_response(),
        Err(e @ TokenError::RefreshInDoubt { retry_after }) => {
            let secs = ceil_secs(retry_after);
            retry_later(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({
                    "error": "refresh_in_doubt",
                    "message": e.to_string(),
                    "retry_after_seconds": secs,
                }),
                secs,
            )
        }
        Err(e @ (TokenError::Refresh(_) | TokenError::Interrupted(_))) => {
            api_error(StatusCode::BAD_GATEWAY, "refresh_failed", e.to_string())
        }
        Err(e @ TokenError::Store(_)) => {
            store_failure(matches!(&e, TokenError::Store(s) if s.is_transient()), &e)
        }
    })
}

/// `POST /api/v1/sessions/{id}/revoke`.
pub(super) async fn http_revoke_session(
    State(svc): State<AuthService>,
    Path(id): Path<String>,
) -> Result<Response, BadField> {
    let id = path_session(&id)?;
    Ok(session_answer(svc.revoke_session(id).await))
}

/// `DELETE /api/v1/users/{id}/token`.
pub(super) async fn http_revoke_user(
    State(svc): State<AuthService>,
    Path(id): Path<String>,
    Query(q): Query<TokenQuery>,
) -> Result<Response, BadField> {
    let user = path_user(id, q.id_type.as_deref())?;
    Ok(match svc.revoke_user(user).await {
        Ok(Some(r)) => (
            StatusCode::OK,
            Json(json!({
                "revoked": true,
                "user_id": r.user_id,
                "session_id": r.session_id.map(|s| s.to_string()),
            })),
        )
            .into_response(),
        Ok(None) => api_error(StatusCode::NOT_FOUND, "not_found", "this user has no token"),
        Err(e) => store_error(&e),
    })
}

pub(super) async fn http_callback(
    State(svc): State<AuthService>,
    RawQuery(q): RawQuery,
) -> Response {
    let (status, html) = svc.oauth_callback(q.as_deref().unwrap_or("")).await;
    let mut resp = (status, html).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.headers_mut().insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

impl AuthService {
    /// The flow's public route: `GET /oauth/callback`.
    pub fn public_router(self) -> Router {
        Router::new()
            .route(CALLBACK_PATH, get(http_callback))
            .with_state(self)
    }

    /// The flow's admin routes behind `guard` (the admin bearer check):
    /// `POST /api/v1/auth/requests`, `GET /api/v1/auth/sessions/{id}`,
    /// `POST /api/v1/sessions/{id}/revoke`, `GET` and `DELETE /api/v1/users/{id}/token`.
    pub fn admin_router(self, guard: crate::http::bearer::BearerGuard) -> Router {
        let routes = Router::new()
            .route("/api/v1/auth/requests", post(http_request))
            .route("/api/v1/auth/sessions/{id}", get(http_session))
            .route("/api/v1/sessions/{id}/revoke", post(http_revoke_session))
            .route(
                "/api/v1/users/{id}/token",
                get(http_token).delete(http_revoke_user),
            )
            .with_state(self);
        guard.protect(routes)
    }
}
