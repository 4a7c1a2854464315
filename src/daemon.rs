//! The running service: opens the store, binds the listener, runs background work, and shuts
//! down in order on SIGTERM / Ctrl-C.
//!
//! `run` takes the listener and the shutdown future from its caller so tests can inject both.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::cli::{store_options, write_private, CliError, ServeArgs};
use crate::config::{Config, LoadOptions};
use crate::storage::{now_ms, Store};

/// How long shutdown waits for in-flight work.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// `lark-service serve`.
pub fn serve(opts: &LoadOptions, args: &ServeArgs) -> Result<(), CliError> {
    let mut cfg = Config::load(opts)?;
    crate::telemetry::init(&cfg.log);
    if args.sandbox {
        sandbox_defaults(&mut cfg)?;
    }
    cfg.require_serve()?;
    if !args.sandbox {
        for w in cfg.require_public_redirect()? {
            warn!("{w}");
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lark-service")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = TcpListener::bind(cfg.http_listen).await.with_context(|| {
            format!(
                "binding the HTTP listener on {} (http.listen / HTTP_LISTEN)",
                cfg.http_listen
            )
        })?;
        let metrics = TcpListener::bind(cfg.metrics_addr).await.with_context(|| {
            format!(
                "binding the metrics listener on {} (metrics.bind / PROMETHEUS_PORT)",
                cfg.metrics_addr
            )
        })?;
        let mut cfg = cfg;
        let _sandbox = if args.sandbox {
            let http = listener
                .local_addr()
                .context("reading the listener address")?;
            Some(start_sandbox(&mut cfg, http, !args.plain).await?)
        } else {
            None
        };
        let listeners = Listeners {
            http: listener,
            metrics: Some(metrics),
        };
        run(cfg, listeners, shutdown_signal()).await
    })
}

/// Starts the platform imitation beside the service and points the service at it.
async fn start_sandbox(
    cfg: &mut Config,
    http: std::net::SocketAddr,
    tls: bool,
) -> Result<crate::sandbox::Sandbox, CliError> {
    let admin = cfg.admin_token.clone().unwrap_or_else(|| {
        let (_, t) = crate::storage::Key::generate();
        t
    });
    cfg.admin_token = Some(admin.clone());
    let sandbox = crate::sandbox::Sandbox::start(crate::sandbox::SandboxOptions {
        request_auth_url: Some(format!("http://{http}/api/v1/auth/requests")),
        admin_token: Some(secrecy::ExposeSecret::expose_secret(&admin).to_owned()),
        tls,
        ..crate::sandbox::SandboxOptions::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(pem) = sandbox.ca_pem() {
        // Trusted the way a company CA is: through tls.ca_file, not a bypass.
        let dir = cfg.storage_path.parent().unwrap_or(Path::new("."));
        let ca_path = dir.join("sandbox-ca.pem");
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(&ca_path, pem)
            .with_context(|| format!("writing the sandbox CA to {}", ca_path.display()))?;
        info!(path = %ca_path.display(), "The sandbox serves HTTPS and WSS; its CA is trusted through tls.ca_file.");
        cfg.network.ca_file = Some(ca_path);
    }
    cfg.domain = sandbox.base_url();
    cfg.app_id = Some(crate::sandbox::APP_ID.to_owned());
    cfg.app_secret = Some(SecretString::from(crate::sandbox::APP_SECRET.to_owned()));
    if cfg.public_url.is_none() && cfg.auth.redirect_uri.is_none() {
        cfg.auth.redirect_uri = url::Url::parse(&format!("http://{http}/oauth/callback")).ok();
    }
    println!(
        "sandbox: a local imitation of Feishu runs at {0}/ — open it in a browser, press \"Ask … to authorize\", then the card's Authorize button, and approve",
        sandbox.base_url()
    );
    Ok(sandbox)
}

/// Fills what a developer without a Feishu account lacks: sandbox app credentials and a token
/// key kept beside the store (generated on first use, mode 0600).
fn sandbox_defaults(cfg: &mut Config) -> Result<(), CliError> {
    // The sandbox platform (started once the listener is bound) supplies the app identity.
    cfg.app_id = Some(crate::sandbox::APP_ID.to_owned());
    cfg.app_secret = Some(SecretString::from(crate::sandbox::APP_SECRET.to_owned()));
    if cfg.token_key.is_none() {
        let dir = cfg.storage_path.parent().unwrap_or(Path::new("."));
        let key_path = dir.join("sandbox-token.key");
        if !key_path.exists() {
            let (_, text) = crate::storage::Key::generate();
            write_private(&key_path, secrecy::ExposeSecret::expose_secret(&text))?;
            info!(path = %key_path.display(), "Generated a sandbox token key.");
        }
        let text = std::fs::read_to_string(&key_path)
            .with_context(|| format!("reading {}", key_path.display()))?;
        cfg.token_key = Some(SecretString::from(text.trim().to_owned()));
    }
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
///
/// The handlers are installed when this is called, not when the future is first polled: the
/// service polls it only after READY, and a SIGTERM in between must stop it cleanly rather than
/// kill it with the default action. Must be called inside the runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {},
                        _ = int.recv() => {},
                    }
                }
                (term, int) => {
                    if let Some(e) = term.as_ref().err().or(int.as_ref().err()) {
                        warn!(error = %e, "Cannot listen for SIGTERM/SIGINT; falling back to Ctrl-C only.");
                    }
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Listeners the service serves on.
#[derive(Debug)]
pub struct Listeners {
    /// HTTP: health, callbacks, OAuth redirect, admin API.
    pub http: TcpListener,
    /// `/metrics`; `None` disables it.
    pub metrics: Option<TcpListener>,
}

/// Runs the service until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CliError> {
    let started = Instant::now();
    let ring = cfg.keyring()?;
    let path = cfg.storage_path.clone();
    let opts = store_options(&cfg);
    let store = tokio::task::spawn_blocking(move || Store::open(&path, ring, opts))
        .await
        .map_err(|e| anyhow::anyhow!("store open task failed: {e}"))??;
    let ready = Arc::new(AtomicBool::new(false));
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let workers = crate::workers::Workers::default();
    crate::metrics::refresh_store_gauges(&store);
    if let Some(app_id) = &cfg.app_id {
        let status = &crate::metrics::get().ws_connection_status;
        status
            .get_or_create(&crate::metrics::AppLabel {
                app_id: app_id.clone(),
            })
            .set(0);
    }

    if store.run(|s| s.rotation_pending()).await? {
        let s = store.clone();
        tracker.spawn(async move {
            info!(key = %s.active_key_id(), "Rotating the store to the active token key in the background.");
            match s.run(|st| st.rotate_keys(1000, &mut |_, _| {})).await {
                Ok(r) => info!(resealed = r.resealed, scanned = r.scanned, "Key rotation complete; previous keys are no longer needed."),
                Err(e) => error!(error = %e, "Key rotation failed; records under previous keys stay readable."),
            }
        });
    }
    let app_id = cfg.app_id.clone().unwrap_or_default();
    let app_secret = cfg
        .app_secret
        .clone()
        .unwrap_or_else(|| SecretString::from(String::new()));
    let domain: crate::lark::Domain = cfg
        .domain
        .parse()
        .map_err(|e| anyhow::anyhow!("domain: {e}"))?;
    let net =
        crate::net::Net::new(&cfg.network.net_options()).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(p) = net.proxy() {
        info!(proxy = %p.display(), "Outgoing connections go through the proxy (except NO_PROXY hosts).");
    }
    if net.extra_cas() > 0 {
        info!(
            extra_cas = net.extra_cas(),
            "Trusting extra CA certificates besides the built-in roots."
        );
    }
    let mut lark_cfg =
        crate::lark::LarkConfig::new(domain.clone(), app_id.clone(), app_secret.clone());
    lark_cfg.net = Some(net.clone());
    let lark = crate::lark::LarkClient::new(lark_cfg)
        .map_err(|e| anyhow::anyhow!("building the Lark client: {e}"))?;
    let dispatcher =
        crate::events::Dispatcher::new(store.clone(), crate::events::DispatchConfig::default());
    let auth = crate::auth::AuthService::new(
        lark.clone(),
        store.clone(),
        crate::auth::AuthOptions::from_config(&cfg),
    );
    dispatcher.set_handler(app_handler(auth.clone()));
    // Shutdown waits for token refreshes in flight (a rotated refresh token must be stored).
    let auth_refreshes = auth.clone();
    workers.spawn(
        &tracker,
        cancel.clone(),
        "ttl_sweep",
        sweep_worker(store.clone(), Some(auth.clone()), cfg.sweep_interval),
    );
    workers.spawn(
        &tracker,
        cancel.clone(),
        "token_refresh",
        auth.refresh_worker(),
    );
    if let Some(url) = cfg.export_postgres_url.clone() {
        workers.spawn(
            &tracker,
            cancel.clone(),
            "export_postgres",
            crate::export::postgres::worker(
                store.clone(),
                url,
                net.clone(),
                std::time::Duration::from_secs(1),
            ),
        );
    }
    if let Some(w) = auth.user_info_sync_worker() {
        workers.spawn(&tracker, cancel.clone(), "user_sync", w);
    }
    let conn_state = if cfg.websocket.enabled {
        let conn = crate::longconn::LongConn::new(
            crate::longconn::LongConnConfig {
                base_url: domain.open_base(),
                app_id: app_id.clone(),
                app_secret: app_secret.clone(),
                policy: crate::longconn::ReconnectPolicy {
                    max_retries: crate::longconn::max_retries_from_setting(
                        cfg.websocket.max_reconnect_retries,
                    ),
                    ..crate::longconn::ReconnectPolicy::default()
                },
                heartbeat: cfg.websocket.heartbeat_interval,
                reassembly: crate::longconn::ReassemblyLimits::default(),
                net: net.clone(),
            },
            dispatcher.clone(),
        );
        let state = conn.state();
        let c = cancel.clone();
        tracker.spawn(async move {
            if let Err(e) = conn.run(c).await {
                error!(error = %e, "The long connection stopped; events arrive only through HTTP callbacks if they are enabled.");
            }
        });
        Some(state)
    } else {
        None
    };
    if let Some(schedule) = cfg.backup.schedule.clone() {
        let w = backup_worker(store.clone(), cfg.backup.clone(), &schedule)?;
        workers.spawn(&tracker, cancel.clone(), "backup", w);
    }

    let http_addr = listeners
        .http
        .local_addr()
        .context("reading the listener address")?;
    let mut app = crate::http::router(crate::http::AppState {
        store: store.clone(),
        ready: ready.clone(),
        admin_token: cfg.admin_token.clone(),
        backup: Arc::new(cfg.backup.clone()),
        workers: workers.clone(),
        lark: Some(lark.clone()),
        conn_state,
        http_callbacks: cfg.websocket.fallback_to_http,
    });
    if cfg.websocket.fallback_to_http {
        let expose = |s: &Option<SecretString>| {
            s.as_ref()
                .map(|v| secrecy::ExposeSecret::expose_secret(v).to_owned())
        };
        let cb_cfg = crate::callbacks::CallbackConfig::new(
            expose(&cfg.verification_token).as_deref(),
            expose(&cfg.encrypt_key).as_deref(),
        );
        app = app.merge(crate::callbacks::routes::router(cb_cfg, dispatcher.clone()));
    }
    app = app.merge(auth.clone().router());
    if let Some(token) = cfg.mcp_token.clone() {
        let server = crate::mcp::McpServer::new(lark.clone(), auth.clone(), store.clone());
        app = app.merge(crate::mcp::router_with_shutdown(
            server,
            token,
            cancel.child_token(),
        ));
    }
    let server_cancel = cancel.clone();
    let server = tokio::spawn(async move {
        axum::serve(listeners.http, app)
            .with_graceful_shutdown(async move { server_cancel.cancelled().await })
            .await
    });
    let metrics_addr = match listeners.metrics {
        Some(l) => {
            let addr = l.local_addr().ok();
            let c = cancel.clone();
            tracker.spawn(async move {
                let _ = axum::serve(l, crate::metrics::router())
                    .with_graceful_shutdown(async move { c.cancelled().await })
                    .await;
            });
            addr
        }
        None => None,
    };
    tracker.spawn(watchdog(cancel.clone()));
    ready.store(true, Ordering::SeqCst);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    info!(
        http = %http_addr,
        metrics = %metrics_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
        store = %store.path().display(),
        key = %store.active_key_id(),
        startup_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "Service ready."
    );
    println!("lark-service ready: http://{http_addr}/ (health: http://{http_addr}/healthz)");

    shutdown.await;
    info!("Shutting down.");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    ready.store(false, Ordering::SeqCst);
    cancel.cancel();
    tracker.close();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let _ = server.await;
        tracker.wait().await;
        auth_refreshes.finish_refreshes().await;
    })
    .await;
    if drained.is_err() {
        warn!("Shutdown grace period passed with work still running.");
    }
    // Commit the seen event ids still queued, then close the store.
    dispatcher.flush().await;
    drop(store);
    info!("Stopped.");
    Ok(())
}

/// Pings the systemd watchdog at half its interval while the runtime is responsive.
async fn watchdog(cancel: CancellationToken) {
    let Some(every) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut tick = tokio::time::interval(every / 2);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => { let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]); }
        }
    }
}

fn sweep_worker(
    store: Store,
    auth: Option<crate::auth::AuthService>,
    every: Duration,
) -> crate::workers::WorkerFn {
    Box::new(move || {
        let store = store.clone();
        let auth = auth.clone();
        Box::pin(async move {
            let started = Instant::now();
            let r = store
                .run(|s| s.sweep(now_ms(), 10_000))
                .await
                .map_err(|e| e.to_string())?;
            let m = crate::metrics::get();
            let secs = started.elapsed().as_secs_f64();
            m.sweep_runs.inc();
            m.sweep_duration.observe(secs);
            let kind = |k| crate::metrics::KindLabel { kind: k };
            m.sweep_removed
                .get_or_create(&kind("expired"))
                .inc_by(r.expired.len() as u64);
            m.sweep_removed
                .get_or_create(&kind("purged"))
                .inc_by(r.purged);
            m.sweep_removed
                .get_or_create(&kind("events"))
                .inc_by(r.events_forgotten);
            m.sweep_last_success
                .set(i64::try_from(now_ms() / 1000).unwrap_or(0));
            if let Some(auth) = &auth {
                auth.on_sweep_expired(r.expired.clone()).await;
            }
            let s2 = store.clone();
            let _ = tokio::task::spawn_blocking(move || crate::metrics::refresh_store_gauges(&s2))
                .await;
            info!(
                expired = r.expired.len(),
                purged = r.purged,
                events_forgotten = r.events_forgotten,
                duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                "Sweep finished."
            );
            Ok(every)
        })
    })
}

fn backup_worker(
    store: Store,
    cfg: crate::config::BackupConfig,
    schedule: &str,
) -> Result<crate::workers::WorkerFn, CliError> {
    let sched = crate::schedule::Schedule::parse(schedule)
        .map_err(|e| anyhow::anyhow!("backup.schedule: {e}"))?;
    let dir = cfg
        .dir
        .clone()
        .ok_or_else(|| anyhow::anyhow!("backup.schedule is set but backup.dir is not"))?;
    Ok(Box::new(move || {
        let (store, cfg, sched, dir) = (store.clone(), cfg.clone(), sched.clone(), dir.clone());
        Box::pin(async move {
            let now = now_ms();
            let next = sched
                .next_after(now)
                .ok_or("the backup schedule never fires")?;
            tokio::time::sleep(Duration::from_millis(next.saturating_sub(now))).await;
            let prot = if cfg.recipients.is_empty() {
                cfg.passphrase
                    .clone()
                    .map(crate::backup::Protection::Passphrase)
                    .ok_or("no backup.recipients or backup.passphrase")?
            } else {
                crate::backup::Protection::recipients(&cfg.recipients).map_err(|e| e.to_string())?
            };
            let keep = cfg.keep;
            let outcome = tokio::task::spawn_blocking(move || {
                crate::http::take_backup_now(&store, &dir, &prot, keep)
            })
            .await
            .map_err(|e| e.to_string())?;
            let label = |o| crate::metrics::OutcomeLabel { outcome: o };
            match outcome {
                Ok(_) => {
                    crate::metrics::get()
                        .backups
                        .get_or_create(&label("success"))
                        .inc();
                    Ok(Duration::ZERO)
                }
                Err(e) => {
                    crate::metrics::get()
                        .backups
                        .get_or_create(&label("failure"))
                        .inc();
                    Err(e.to_string())
                }
            }
        })
    }))
}

/// The application's event handler: card actions and message commands go to the
/// authorization flow; other events are logged and acknowledged.
fn app_handler(auth: crate::auth::AuthService) -> crate::events::Handler {
    Arc::new(move |cb| {
        let auth = auth.clone();
        Box::pin(async move {
            match cb {
                crate::callbacks::Callback::CardAction(c) => {
                    let operator = c.operator_id().unwrap_or_default().to_owned();
                    match auth.card_action(&c.action_value, &operator).await {
                        Ok(Some(resp)) => Ok(crate::events::HandlerReply::Respond(resp)),
                        Ok(None) => Ok(crate::events::HandlerReply::Done),
                        Err(e) => Err(e.to_string()),
                    }
                }
                crate::callbacks::Callback::Event(e) if e.event_type == "im.message.receive_v1" => {
                    match auth.message_command(&e.json).await {
                        Ok(_) => Ok(crate::events::HandlerReply::Done),
                        // A redelivery would be refused the same way: acknowledge it.
                        Err(
                            err @ (crate::auth::AuthError::RateLimited { .. }
                            | crate::auth::AuthError::Invalid { .. }),
                        ) => {
                            info!(error = %err, "Authorization command refused.");
                            Ok(crate::events::HandlerReply::Done)
                        }
                        Err(err) => Err(err.to_string()),
                    }
                }
                crate::callbacks::Callback::Event(e) => {
                    debug!(event_id = %e.event_id, event_type = %e.event_type, "Event received; no handler for its type.");
                    Ok(crate::events::HandlerReply::Done)
                }
                crate::callbacks::Callback::UrlVerification { .. } => {
                    Ok(crate::events::HandlerReply::Done)
                }
            }
        })
    })
}
