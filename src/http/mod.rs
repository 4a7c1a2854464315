//! The HTTP listener: health, readiness and a small status page. Later issues add the OAuth
//! redirect, callbacks and the admin API to the same router.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use axum::Router;

use crate::storage::Store;

/// Shared state of the HTTP handlers.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The store.
    pub store: Store,
    /// Set once start-up finished; cleared when shutdown begins.
    pub ready: Arc<AtomicBool>,
}

/// The router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/", get(status))
        .with_state(state)
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if !s.ready.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: starting or stopping\n".to_owned(),
        );
    }
    match s.store.run(|st| st.counts()).await {
        Ok(_) => (StatusCode::OK, "ready\n".to_owned()),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: store: {e}\n"),
        ),
    }
}

async fn status(State(s): State<AppState>) -> impl IntoResponse {
    match s.store.run(|st| st.counts()).await {
        Ok(c) => (
            StatusCode::OK,
            Json(serde_json::json!({
                "service": "lark-service",
                "version": env!("CARGO_PKG_VERSION"),
                "store": c,
            })),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "error": e.to_string() })),
        ),
    }
}
