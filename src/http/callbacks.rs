//! HTTP callback routes (the fallback when the long connection cannot be held): the axum
//! shell over the pure core in [`crate::callbacks`]. It lives with the HTTP surfaces, not in
//! `callbacks`, so the arrows go one way: `http::callbacks` → `events` → `callbacks`.
//!
//! `POST /callbacks/event` (also `/callbacks/card`): verify and decrypt the raw body, answer
//! `url_verification`, and hand events and card actions to the same dispatcher the long
//! connection uses, so both paths share one de-duplication. Forged, stale, oversize or
//! malformed bodies get a 4xx and have no side effect.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;

use crate::callbacks::{
    challenge_response, parse_callback, Callback, CallbackConfig, SignatureHeaders,
};
use crate::events::{Dispatcher, EventSource, HandlerReply, Outcome};

#[derive(Clone)]
struct RouteState {
    cfg: Arc<CallbackConfig>,
    dispatcher: Dispatcher,
}

/// The callback router.
pub fn router(cfg: CallbackConfig, dispatcher: Dispatcher) -> Router {
    let limit = cfg.max_body_bytes + 1;
    let state = RouteState {
        cfg: Arc::new(cfg),
        dispatcher,
    };
    Router::new()
        .route("/callbacks/event", post(callback))
        .route("/callbacks/card", post(callback))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

fn json(status: StatusCode, body: Vec<u8>) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

async fn callback(State(s): State<RouteState>, headers: HeaderMap, body: Bytes) -> Response {
    let lookup = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let sig = SignatureHeaders::from_lookup(lookup);
    let cb = match parse_callback(&body, &sig, &s.cfg, std::time::SystemTime::now()) {
        Ok(cb) => cb,
        Err(e) => {
            tracing::warn!(error = %e, "Callback refused.");
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
            return json(
                status,
                serde_json::to_vec(&serde_json::json!({ "error": e.public_message() }))
                    .unwrap_or_default(),
            );
        }
    };
    if let Callback::UrlVerification { challenge } = &cb {
        return json(StatusCode::OK, challenge_response(challenge));
    }
    match s.dispatcher.dispatch(cb, EventSource::Http).await {
        Outcome::Handled(HandlerReply::Respond(v)) => {
            json(StatusCode::OK, serde_json::to_vec(&v).unwrap_or_default())
        }
        Outcome::Handled(HandlerReply::Done) | Outcome::Duplicate | Outcome::Accepted => {
            json(StatusCode::OK, b"{}".to_vec())
        }
        Outcome::Failed => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            b"{\"error\":\"handler failed\"}".to_vec(),
        ),
    }
}
