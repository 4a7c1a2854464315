//! The HTTP surfaces. The public listener ([`public_router`]) carries health and readiness
//! (plus the OAuth redirect and callbacks, added by their modules); the admin listener
//! ([`admin_router`], behind [`bearer::BearerGuard`]) carries the status page, backups and
//! workers (plus the authorization API and `/mcp`). Every listener is served by
//! [`serve::serve`].

pub mod bearer;
pub mod callbacks;
pub mod fleet;
pub mod serve;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Json};
use axum::routing::{get, post};
use axum::Router;
use secrecy::SecretString;

use crate::config::BackupConfig;
use crate::storage::{now_ms, Db};

/// Shared state of the HTTP handlers.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The store.
    pub store: Db,
    /// Set once start-up finished; cleared when shutdown begins.
    pub ready: Arc<AtomicBool>,
    /// Bearer token of the admin API; `None` disables it.
    pub admin_token: Option<SecretString>,
    /// Where and how backups are written.
    pub backup: Arc<BackupConfig>,
    /// Background workers' status.
    pub workers: crate::workers::Workers,
    /// The Lark client (readiness reads its cached tenant-token status; it never fetches).
    pub lark: Option<crate::lark::LarkClient>,
    /// The long connection's state, when it is enabled.
    pub conn_state: Option<tokio::sync::watch::Receiver<crate::longconn::ConnState>>,
    /// Signed HTTP callbacks are served (callbacks on and an encrypt key set): events can
    /// arrive while the long connection is down.
    pub http_callbacks: bool,
    /// On PostgreSQL: this instance's heartbeat in the fleet's table (readiness requires a
    /// fresh one and reports `instances_live`).
    pub fleet: Option<fleet::FleetHealth>,
}

/// `status` with the JSON `body` and `Retry-After: secs`: every "retry later" answer of the
/// service (rate limits, the bearer throttle, a refresh in doubt).
pub fn retry_later(
    status: StatusCode,
    body: serde_json::Value,
    secs: u64,
) -> axum::response::Response {
    let mut r = (status, Json(body)).into_response();
    r.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from(secs),
    );
    r
}

/// The public listener's own routes: `/healthz` and `/readyz`.
pub fn public_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// The admin listener's own routes behind `guard` (the admin bearer check): `GET /`
/// (status), `POST /api/v1/backups` and `GET /workers`.
pub fn admin_router(state: AppState, guard: bearer::BearerGuard) -> Router {
    let routes = Router::new()
        .route("/", get(status))
        .route("/api/v1/backups", post(take_backup))
        .route("/workers", get(workers))
        .with_state(state);
    guard.protect(routes)
}

/// `/readyz`: the store answers, a tenant token is held, and events can arrive (the long
/// connection is up, or signed HTTP callbacks are served).
///
/// Cheap: it reads cached state only (one key of the store, the token cache's last outcome,
/// the connection state); it never fetches a token and never scans the store. Anonymous
/// callers get a short reason; the admin bearer token also gets the internal detail.
async fn readyz(State(s): State<AppState>, headers: HeaderMap) -> impl IntoResponse {
    let detail = bearer::matches(&headers, s.admin_token.as_ref());
    let not_ready = |reason: &str, why: &str| {
        let body = if detail {
            format!("not ready: {reason}: {why}\n")
        } else {
            format!("not ready: {reason}\n")
        };
        (StatusCode::SERVICE_UNAVAILABLE, body)
    };
    if !s.ready.load(Ordering::SeqCst) {
        return not_ready(
            "starting or stopping",
            "the service is not serving yet or any more",
        );
    }
    if let Err(e) = s.store.run(crate::storage::Db::schema_version).await {
        return not_ready("store", &e.to_string());
    }
    // In a fleet, an instance whose heartbeat is not written is invisible to the others and
    // to the operator: not ready until it is (fail closed).
    let fleet = match s.fleet.as_ref().map(fleet::FleetHealth::live) {
        None => String::new(),
        Some(Ok(n)) => format!("; instances_live={n}"),
        Some(Err(e)) => return not_ready("heartbeat", &e),
    };
    if let Some(lark) = &s.lark {
        match lark.tenant_token_status() {
            crate::lark::TokenStatus::Valid => {}
            crate::lark::TokenStatus::Unknown => {
                return not_ready("tenant token", "not obtained yet");
            }
            crate::lark::TokenStatus::Failed(e) => return not_ready("tenant token", &e),
        }
    }
    let ws = s.conn_state.as_ref().map(|rx| rx.borrow().clone());
    match ws {
        Some(crate::longconn::ConnState::Up) => (
            StatusCode::OK,
            format!("ready: long connection up{fleet}\n"),
        ),
        _ if s.http_callbacks => (
            StatusCode::OK,
            format!("ready: serving signed HTTP callbacks{fleet}\n"),
        ),
        Some(state) => not_ready(
            &format!("long connection {}", state.word()),
            &format!("long connection {state:?} and no signed HTTP callbacks"),
        ),
        None => not_ready(
            "no event channel",
            "the long connection is off and no signed HTTP callbacks are served",
        ),
    }
}

/// `GET /` on the admin listener (behind the admin bearer): version and store counts.
async fn status(State(s): State<AppState>) -> impl IntoResponse {
    match s.store.run(crate::storage::Db::counts).await {
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

#[derive(serde::Deserialize, Default)]
struct BackupRequest {
    #[serde(default)]
    recipients: Vec<String>,
}

fn json_error(code: StatusCode, msg: impl Into<String>) -> (StatusCode, Json<serde_json::Value>) {
    (code, Json(serde_json::json!({ "error": msg.into() })))
}

/// `POST /api/v1/backups`: an online backup into `backup.dir` (behind the admin bearer).
async fn take_backup(
    State(s): State<AppState>,
    body: Option<Json<BackupRequest>>,
) -> (StatusCode, Json<serde_json::Value>) {
    let Some(dir) = s.backup.dir.clone() else {
        return json_error(StatusCode::CONFLICT, "backup.dir is not configured");
    };
    let req = body.map(|Json(b)| b).unwrap_or_default();
    let prot = if req.recipients.is_empty() {
        if !s.backup.recipients.is_empty() {
            crate::backup::Protection::recipients(&s.backup.recipients)
        } else if let Some(p) = &s.backup.passphrase {
            Ok(crate::backup::Protection::Passphrase(p.clone()))
        } else {
            return json_error(
                StatusCode::CONFLICT,
                "no backup.recipients or backup.passphrase configured",
            );
        }
    } else {
        crate::backup::Protection::recipients(&req.recipients)
    };
    let prot = match prot {
        Ok(p) => p,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let store = s.store.clone();
    let keep = s.backup.keep;
    // Backups asked for through the API live apart from the scheduled ones, so no caller (who
    // may choose the recipients) can rotate the operator's own backups away.
    let dir = dir.join(REQUESTED_SUBDIR);
    let res = tokio::task::spawn_blocking(move || take_backup_now(&store, &dir, &prot, keep)).await;
    match res {
        Ok(Ok((path, h))) => (
            StatusCode::OK,
            Json(serde_json::json!({ "path": path, "records": h.total(), "header": h })),
        ),
        Ok(Err(e)) => json_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => json_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The subdirectory of `backup.dir` that backups requested through the API go to (pruned to
/// `backup.keep` on their own).
pub const REQUESTED_SUBDIR: &str = "requested";

/// One backup at a time in this process: each gets a name of its own and prunes what it saw.
static BACKUP_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Writes one backup into `dir` and prunes to `keep`. Shared by the API and the scheduler.
/// Backups are serialized and never share a name (a counter follows the time when two fall in
/// the same millisecond).
pub fn take_backup_now(
    store: &Db,
    dir: &std::path::Path,
    prot: &crate::backup::Protection,
    keep: usize,
) -> Result<(std::path::PathBuf, crate::storage::SnapshotHeader), crate::backup::BackupError> {
    let _one_at_a_time = BACKUP_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    std::fs::create_dir_all(dir).map_err(|source| crate::backup::BackupError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let path = crate::backup::rotation::unused_name(dir, now_ms());
    let h = crate::backup::write_backup_db(store, &path, prot, &mut |_, _| {})?;
    let pruned = crate::backup::rotation::prune(dir, keep).map_err(|source| {
        crate::backup::BackupError::Io {
            path: dir.to_owned(),
            source,
        }
    })?;
    tracing::info!(path = %path.display(), records = h.total(), pruned = pruned.len(), "Backup written.");
    Ok((path, h))
}

/// `GET /workers`: each background worker's state, last run and last error (behind the
/// admin bearer).
async fn workers(State(s): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    (
        StatusCode::OK,
        Json(serde_json::json!(s.workers.snapshot())),
    )
}
