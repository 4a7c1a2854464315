//! The registry's admin API (behind the admin token): what `lark-service app …` calls while
//! the service holds the store.
//!
//! `GET /api/v1/apps[?status=]`, `POST /api/v1/apps`, `GET|PATCH|DELETE /api/v1/apps/{id}`
//! (`DELETE ?force=true&hard=true`), `POST /api/v1/apps/{id}/enable|disable`. Secrets go in,
//! never out. Every change wakes the service's reconciler, which starts or stops that app's
//! long connection.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use axum::Router;
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::json;

use super::{AppChange, AppStatus, AppsError, NewApp, Registry};

/// How long a client is asked to wait (`Retry-After`) when the store cannot answer now.
const STORE_RETRY_AFTER_SECS: &str = "5";

/// The HTTP answer of a refusal.
#[must_use]
pub fn error_response(e: &AppsError) -> Response {
    // The store cannot be reached now, or a delete gave up waiting for token writes in flight:
    // nothing was changed; ask again.
    if let AppsError::Store(crate::storage::Error::Unavailable(_)) = e {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(axum::http::header::RETRY_AFTER, STORE_RETRY_AFTER_SECS)],
            Json(json!({ "error": "store_unavailable", "message": e.to_string() })),
        )
            .into_response();
    }
    let (status, code) = match e {
        AppsError::NotFound(_) => (StatusCode::NOT_FOUND, "app_not_found"),
        AppsError::FromConfig(_) => (StatusCode::CONFLICT, "app_from_config"),
        AppsError::HasTokens { .. } => (StatusCode::CONFLICT, "app_has_tokens"),
        AppsError::BadPermissions(_) | AppsError::Invalid(_) => {
            (StatusCode::BAD_REQUEST, "invalid_request")
        }
        AppsError::Ambiguous(_) => (StatusCode::BAD_REQUEST, "app_id_required"),
        AppsError::NoneActive | AppsError::NotActive(_) => {
            (StatusCode::NOT_FOUND, "app_not_active")
        }
        AppsError::Store(crate::storage::Error::Invalid(_)) => {
            (StatusCode::CONFLICT, "invalid_request")
        }
        AppsError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "store_error"),
    };
    (
        status,
        Json(json!({ "error": code, "message": e.to_string() })),
    )
        .into_response()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AppsError> + Send + 'static,
) -> Result<T, AppsError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AppsError::Store(crate::storage::Error::Join(e.to_string())))?
}

fn answer<T: serde::Serialize>(r: Result<T, AppsError>, ok: StatusCode) -> Response {
    match r {
        Ok(v) => (ok, Json(v)).into_response(),
        Err(e) => error_response(&e),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    status: Option<String>,
}

async fn list(State(reg): State<Registry>, Query(q): Query<ListQuery>) -> Response {
    let status = match q.status.as_deref().map(str::parse::<AppStatus>).transpose() {
        Ok(s) => s,
        Err(e) => return error_response(&AppsError::Invalid(e.to_string())),
    };
    answer(blocking(move || reg.list(status)).await, StatusCode::OK)
}

async fn show(State(reg): State<Registry>, Path(id): Path<String>) -> Response {
    answer(blocking(move || reg.show(&id)).await, StatusCode::OK)
}

#[derive(Deserialize)]
struct AddBody {
    app_id: String,
    app_name: String,
    app_secret: String,
    description: Option<String>,
    permissions: Option<String>,
    created_by: Option<String>,
}

async fn add(State(reg): State<Registry>, Json(b): Json<AddBody>) -> Response {
    let app = NewApp {
        app_id: b.app_id,
        app_name: b.app_name,
        app_secret: SecretString::from(b.app_secret),
        description: b.description,
        permissions: b.permissions,
        created_by: b.created_by,
    };
    answer(blocking(move || reg.add(app)).await, StatusCode::CREATED)
}

#[derive(Deserialize)]
struct UpdateBody {
    app_name: Option<String>,
    app_secret: Option<String>,
    description: Option<String>,
    permissions: Option<String>,
}

async fn update(
    State(reg): State<Registry>,
    Path(id): Path<String>,
    Json(b): Json<UpdateBody>,
) -> Response {
    let change = AppChange {
        app_name: b.app_name,
        app_secret: b.app_secret.map(SecretString::from),
        description: b.description,
        permissions: b.permissions,
    };
    answer(
        blocking(move || reg.update(&id, change)).await,
        StatusCode::OK,
    )
}

#[derive(Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
    #[serde(default)]
    hard: bool,
}

async fn delete(
    State(reg): State<Registry>,
    Path(id): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Response {
    let app_id = id.clone();
    let r = blocking(move || reg.delete(&id, q.force, q.hard)).await;
    answer(
        r.map(|tokens| json!({ "app_id": app_id, "deleted": if q.hard { "hard" } else { "soft" }, "tokens": tokens })),
        StatusCode::OK,
    )
}

async fn enable(State(reg): State<Registry>, Path(id): Path<String>) -> Response {
    answer(
        blocking(move || reg.set_status(&id, AppStatus::Active)).await,
        StatusCode::OK,
    )
}

async fn disable(State(reg): State<Registry>, Path(id): Path<String>) -> Response {
    answer(
        blocking(move || reg.set_status(&id, AppStatus::Inactive)).await,
        StatusCode::OK,
    )
}

/// The registry's admin routes, behind `guard`.
pub fn admin_router(reg: Registry, guard: crate::http::bearer::BearerGuard) -> Router {
    let routes = Router::new()
        .route("/api/v1/apps", get(list).post(add))
        .route("/api/v1/apps/{id}", get(show).patch(update).delete(delete))
        .route("/api/v1/apps/{id}/enable", post(enable))
        .route("/api/v1/apps/{id}/disable", post(disable))
        .with_state(reg);
    guard.protect(routes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store that cannot answer now (or a delete that gave up waiting) is 503 with
    /// `Retry-After`; other store errors stay 500.
    #[test]
    fn an_unavailable_store_is_503_with_retry_after() {
        let r = error_response(&AppsError::Store(crate::storage::Error::Unavailable(
            "busy".into(),
        )));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            r.headers()
                .get(axum::http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()),
            Some("5")
        );
        let r = error_response(&AppsError::Store(crate::storage::Error::Join("x".into())));
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
