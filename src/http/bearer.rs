//! The one bearer-token check of the service: every admin route and `/mcp` go through
//! [`BearerGuard::protect`].
//!
//! A missing or wrong token is answered `401` and counted
//! (`lark_service_auth_bearer_failures_total{surface}`). A peer (IP address) that fails
//! [`FAILURES_ALLOWED`] times within [`FAILURE_WINDOW`] is refused `429` with `Retry-After`,
//! even with the right token, until its oldest failure leaves the window.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use secrecy::SecretString;
use serde_json::json;

/// Failed bearer attempts a peer may make within [`FAILURE_WINDOW`].
pub const FAILURES_ALLOWED: usize = 10;
/// The window failed attempts are counted in.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Peers tracked before stale entries are dropped.
const MAX_TRACKED_PEERS: usize = 10_000;

/// Failed bearer attempts per peer IP, shared by every surface (a peer guessing the admin
/// token is throttled on `/mcp` too).
#[derive(Debug, Default)]
pub struct Throttle {
    failures: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
}

impl Throttle {
    /// `Some(wait)` while `ip` has failed [`FAILURES_ALLOWED`] times within the window.
    fn blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let mut g = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let q = g.get_mut(&ip)?;
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) >= FAILURE_WINDOW)
        {
            q.pop_front();
        }
        if q.is_empty() {
            g.remove(&ip);
            return None;
        }
        (q.len() >= FAILURES_ALLOWED).then(|| {
            q.front().map_or(FAILURE_WINDOW, |t| {
                FAILURE_WINDOW.saturating_sub(now.duration_since(*t))
            })
        })
    }

    fn record_failure(&self, ip: IpAddr, now: Instant) {
        let mut g = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        if g.len() >= MAX_TRACKED_PEERS {
            g.retain(|_, q| {
                q.back()
                    .is_some_and(|t| now.duration_since(*t) < FAILURE_WINDOW)
            });
        }
        let q = g.entry(ip).or_default();
        q.push_back(now);
        while q.len() > FAILURES_ALLOWED {
            q.pop_front();
        }
    }
}

/// A bearer-token check for one surface (`admin`, `mcp`).
#[derive(Clone, Debug)]
pub struct BearerGuard {
    token: Option<Arc<SecretString>>,
    surface: &'static str,
    throttle: Arc<Throttle>,
}

impl BearerGuard {
    /// A check of `token` (`None`: every request is refused) for `surface`, counting failures
    /// in `throttle`.
    #[must_use]
    pub fn new(
        token: Option<SecretString>,
        surface: &'static str,
        throttle: Arc<Throttle>,
    ) -> Self {
        Self {
            token: token.map(Arc::new),
            surface,
            throttle,
        }
    }

    /// `router` with every route behind this check (unknown paths stay 404).
    pub fn protect<S>(self, router: Router<S>) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        router.route_layer(axum::middleware::from_fn_with_state(self, check))
    }
}

async fn check(State(g): State<BearerGuard>, req: Request, next: Next) -> Response {
    // Requests served by `serve` carry their peer; anything else shares one bucket.
    let ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
    let now = Instant::now();
    let label = crate::metrics::SurfaceLabel { surface: g.surface };
    if let Some(wait) = g.throttle.blocked(ip, now) {
        crate::metrics::get()
            .bearer_throttled
            .get_or_create(&label)
            .inc();
        return throttled(wait);
    }
    if super::bearer_ok(req.headers(), g.token.as_deref()) {
        return next.run(req).await;
    }
    g.throttle.record_failure(ip, now);
    crate::metrics::get()
        .bearer_failures
        .get_or_create(&label)
        .inc();
    tracing::info!(peer = %ip, surface = g.surface, "Refused a request with a missing or wrong bearer token.");
    unauthorized(g.surface)
}

/// `401` with `WWW-Authenticate: Bearer`.
fn unauthorized(surface: &str) -> Response {
    let mut r = (
        StatusCode::UNAUTHORIZED,
        Json(json!({
            "error": "unauthorized",
            "message": format!("a valid {surface} bearer token is required"),
        })),
    )
        .into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

fn throttled(wait: Duration) -> Response {
    let secs = wait.as_secs().max(1);
    let mut r = (
        StatusCode::TOO_MANY_REQUESTS,
        Json(json!({
            "error": "rate_limited",
            "message": format!("too many failed bearer attempts from this address; retry in {secs} s"),
            "retry_after_seconds": secs,
        })),
    )
        .into_response();
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_blocked_after_too_many_failures_until_the_window_passes() {
        let t = Throttle::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let start = Instant::now();
        for _ in 0..FAILURES_ALLOWED - 1 {
            t.record_failure(ip, start);
        }
        assert!(t.blocked(ip, start).is_none());
        t.record_failure(ip, start);
        assert!(t.blocked(ip, start).is_some());
        assert!(t.blocked(other, start).is_none());
        assert!(t.blocked(ip, start + FAILURE_WINDOW).is_none());
    }
}
