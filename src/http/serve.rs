//! Serving a router on a listener, bounded: every listener (public, admin, metrics) goes
//! through [`serve`], which closes connections that do not send a request's headers in time
//! (slow or silent clients, and keep-alive connections left idle), caps how many connections
//! are served at once, limits request bodies, and shuts down gracefully.
//!
//! The per-request timeout is a layer the caller applies per route group
//! ([`with_request_timeout`]): `/mcp` streams long responses (SSE) and is left without it.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::StatusCode;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::{RequestBodyTimeoutLayer, TimeoutLayer};
use tracing::{debug, warn};

pub use crate::config::HttpLimits as Limits;

/// `router` with every request answered `408 Request Timeout` once it takes longer than
/// `timeout`. Not for routes whose responses stream for long (SSE).
pub fn with_request_timeout<S>(router: Router<S>, timeout: Duration) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    router.layer(TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        timeout,
    ))
}

/// Serves `router` on `listener` within `limits` until `shutdown` is cancelled, then stops
/// accepting, lets each connection finish its current request and waits for them.
///
/// Each request carries [`ConnectInfo<std::net::SocketAddr>`] (the peer), which the bearer check keys
/// its throttle by. Upgrades (WebSocket) are supported.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let router = router
        .layer(RequestBodyTimeoutLayer::new(limits.request_timeout))
        .layer(RequestBodyLimitLayer::new(limits.max_body_bytes));
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let conns = TaskTracker::new();
    loop {
        // A slot first, then accept: beyond the cap, connections wait unaccepted.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors (EMFILE) or an aborted handshake: do not spin.
                    warn!(error = %e, "Accepting a connection failed.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                let router = router.clone();
                async move { router.oneshot(req).await }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .keep_alive(true);
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            let outcome = tokio::select! {
                r = conn.as_mut() => r,
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = outcome {
                debug!(peer = %peer, error = %e, "Connection ended with an error.");
            }
        });
    }
    drop(listener);
    conns.close();
    conns.wait().await;
}
