//! The one bearer-token check of the service: every admin route and `/mcp` go through
//! [`BearerGuard::protect`].
//!
//! A missing or wrong token is answered `401` and counted
//! (`lark_service_auth_bearer_failures_total{surface}`). A peer (IP address) that fails
//! [`FAILURES_ALLOWED`] times within [`FAILURE_WINDOW`] is refused `429` with `Retry-After`,
//! even with the right token, until its oldest failure leaves the window.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::ratelimit::{monotonic_now, RateLimiter};

/// Failed bearer attempts a peer may make within [`FAILURE_WINDOW`].
pub const FAILURES_ALLOWED: usize = 10;
/// The window failed attempts are counted in.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Failed bearer attempts per peer IP, shared by every surface (a peer guessing the admin
/// token is throttled on `/mcp` too).
#[derive(Debug)]
pub struct Throttle {
    failures: RateLimiter<IpAddr>,
}

impl Default for Throttle {
    fn default() -> Self {
        Self {
            failures: RateLimiter::new(FAILURE_WINDOW),
        }
    }
}

impl Throttle {
    /// `Some(wait)` while `ip` has failed [`FAILURES_ALLOWED`] times within the window.
    fn blocked(&self, ip: IpAddr, now: Duration) -> Option<Duration> {
        self.failures.blocked(&ip, FAILURES_ALLOWED, now)
    }

    fn record_failure(&self, ip: IpAddr, now: Duration) {
        self.failures.record(&ip, FAILURES_ALLOWED, now);
    }
}

/// The token of an `Authorization: Bearer <token>` header, if the request has one. The one
/// place the header is read (the check below, the readiness detail, the `/mcp` client key).
#[must_use]
pub fn presented(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// True if the request carries `Authorization: Bearer <token>` matching `want` (constant
/// time); never with `want` `None`.
#[must_use]
pub fn matches(headers: &HeaderMap, want: Option<&SecretString>) -> bool {
    let Some(want) = want else { return false };
    let got = presented(headers).unwrap_or("");
    bool::from(got.as_bytes().ct_eq(want.expose_secret().as_bytes()))
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
    let now = monotonic_now();
    let label = crate::metrics::SurfaceLabel { surface: g.surface };
    if let Some(wait) = g.throttle.blocked(ip, now) {
        crate::metrics::get()
            .bearer_throttled
            .get_or_create(&label)
            .inc();
        return throttled(wait);
    }
    if matches(req.headers(), g.token.as_deref()) {
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
    super::retry_later(
        StatusCode::TOO_MANY_REQUESTS,
        json!({
            "error": "rate_limited",
            "message": format!("too many failed bearer attempts from this address; retry in {secs} s"),
            "retry_after_seconds": secs,
        }),
        secs,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_blocked_after_too_many_failures_until_the_window_passes() {
        let t = Throttle::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let start = Duration::from_secs(1_000);
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

#[cfg(test)]
mod header_tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_matches() {
        let want = SecretString::from("a".repeat(32));
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            h
        };
        let right = with(&format!("Bearer {}", "a".repeat(32)));
        assert!(matches(&right, Some(&want)));
        assert_eq!(presented(&right), Some("a".repeat(32).as_str()));
        assert!(
            !matches(&right, None),
            "no token configured: nothing matches"
        );
        assert!(!matches(
            &with(&format!("bearer {}", "a".repeat(32))),
            Some(&want)
        ));
        assert!(!matches(
            &with(&format!("Bearer {}", "a".repeat(31))),
            Some(&want)
        ));
        assert!(!matches(
            &with(&format!("Bearer {}b", "a".repeat(32))),
            Some(&want)
        ));
        assert!(!matches(&with("Basic abc"), Some(&want)));
        assert_eq!(presented(&with("Basic abc")), None);
        assert!(!matches(&HeaderMap::new(), Some(&want)));
    }
}
