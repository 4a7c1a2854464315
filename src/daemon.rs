//! The running service: opens the store, binds the listener, runs background work, and shuts
//! down in order on SIGTERM / Ctrl-C.
//!
//! `run` takes the listener and the shutdown future from its caller so tests can inject both;
//! [`run_with_reloads`] also takes the stream of reloaded configurations (`SIGHUP` in
//! production, see [`sighup_reloads`]).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::cli::{store_options, write_private, CliError, ServeArgs};
use crate::config::{Config, LoadOptions};
use crate::storage::{now_ms, Store};
use crate::workers::FnWorker;

/// How long shutdown waits for in-flight work.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// `lark-service serve`.
pub fn serve(opts: &LoadOptions, args: &ServeArgs) -> Result<(), CliError> {
    let default_config = Path::new(crate::config::DEFAULT_CONFIG_PATH);
    let mut cfg = serve_config(
        opts,
        args.sandbox,
        &crate::config::ProcessEnv,
        default_config,
    )?;
    crate::telemetry::init(&cfg.log);
    let files = if args.sandbox {
        sandbox_defaults(&mut cfg)?
    } else {
        SandboxFiles::default()
    };
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
        let admin = TcpListener::bind(cfg.admin_listen).await.with_context(|| {
            format!(
                "binding the admin listener on {} (admin.listen / ADMIN_LISTEN)",
                cfg.admin_listen
            )
        })?;
        let mut cfg = cfg;
        let _sandbox = if args.sandbox {
            let http = listener
                .local_addr()
                .context("reading the listener address")?;
            let admin = admin
                .local_addr()
                .context("reading the admin listener address")?;
            Some(start_sandbox(&mut cfg, http, admin, files, !args.plain).await?)
        } else {
            None
        };
        let listeners = Listeners {
            http: listener,
            admin,
            metrics: Some(metrics),
        };
        // In sandbox mode the sandbox's identity and address survive a reload.
        let pinned = args.sandbox.then(|| {
            (
                cfg.app_id.clone(),
                cfg.app_secret.clone(),
                cfg.domain.clone(),
            )
        });
        let reloads = sighup_reloads(opts.clone(), move |c: &mut Config| {
            if let Some((id, secret, domain)) = &pinned {
                c.app_id.clone_from(id);
                c.app_secret.clone_from(secret);
                c.domain.clone_from(domain);
            }
        });
        run_with_reloads(cfg, listeners, shutdown_signal(), reloads).await
    })
}

/// The configuration `serve` runs with. With `sandbox` the default config file
/// (`default_config`, the packaged `/etc/lark-service/config.toml`) is not read, so the
/// sandbox never picks up a production store, key or token: settings come from the built-in
/// defaults (store `./data/lark-service.redb`, loopback listeners), an explicit `--config`,
/// the environment and `--set` flags.
pub fn serve_config(
    opts: &LoadOptions,
    sandbox: bool,
    env: &dyn crate::config::Env,
    default_config: &Path,
) -> Result<Config, CliError> {
    let default_config = (!sandbox).then_some(default_config);
    Ok(Config::load_with_default(opts, env, default_config)?)
}

/// Re-reads the configuration on every `SIGHUP` and sends it (after `adjust`) on the returned
/// channel. A configuration that fails to load is logged and skipped. Must be called inside the
/// runtime.
pub fn sighup_reloads(
    opts: LoadOptions,
    adjust: impl Fn(&mut Config) + Send + 'static,
) -> tokio::sync::mpsc::Receiver<Config> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        let opts = opts.clone();
                        let loaded = tokio::task::spawn_blocking(move || Config::load(&opts)).await;
                        match loaded {
                            Ok(Ok(mut cfg)) => {
                                adjust(&mut cfg);
                                info!("SIGHUP: configuration re-read.");
                                if tx.send(cfg).await.is_err() {
                                    return;
                                }
                            }
                            Ok(Err(e)) => {
                                error!(error = %e, "SIGHUP: the configuration does not load; keeping the current one.");
                            }
                            Err(e) => {
                                error!(error = %e, "SIGHUP: reading the configuration failed.")
                            }
                        }
                    }
                });
            }
            Err(e) => warn!(error = %e, "Cannot listen for SIGHUP; configuration reloads are off."),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (opts, adjust, &tx);
    }
    rx
}

/// Starts the platform imitation beside the service and points the service at it.
async fn start_sandbox(
    cfg: &mut Config,
    http: std::net::SocketAddr,
    admin_addr: std::net::SocketAddr,
    files: SandboxFiles,
    tls: bool,
) -> Result<crate::sandbox::Sandbox, CliError> {
    let admin = cfg
        .admin_token
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the sandbox has no admin token"))?;
    let service = format!("http://{http}");
    // The sandbox page calls the admin API, which is on the admin listener.
    let admin_url = format!("http://{admin_addr}");
    let sandbox = crate::sandbox::Sandbox::start(crate::sandbox::SandboxOptions {
        request_auth_url: Some(format!("{admin_url}/api/v1/auth/requests")),
        service_url: Some(admin_url.clone()),
        admin_token: Some(secrecy::ExposeSecret::expose_secret(&admin).to_owned()),
        admin_token_file: files.admin_token_file.as_deref().map(absolute),
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
        cfg.auth.redirect_uri = url::Url::parse(&format!("{service}/oauth/callback")).ok();
    }
    println!(
        "sandbox: a local imitation of Feishu runs at {0}/ — open it in a browser, press \"Ask … to authorize\", then the card's Authorize button, and approve",
        sandbox.base_url()
    );
    if let Some(path) = &files.admin_token_file {
        println!(
            "sandbox: the admin token (bearer for {admin_url}/api/v1/…) is in {}",
            absolute(path).display()
        );
    }
    Ok(sandbox)
}

/// `path` made absolute against the working directory (as it is, if that cannot be read).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// Files `serve --sandbox` keeps beside the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxFiles {
    /// The file holding the generated admin token; `None` when `admin_token` was configured.
    pub admin_token_file: Option<PathBuf>,
}

/// Fills what a developer without a Feishu account lacks: sandbox app credentials, a token key
/// and an admin token kept beside the store (each generated on first use, mode 0600). Settings
/// given explicitly are kept.
pub fn sandbox_defaults(cfg: &mut Config) -> Result<SandboxFiles, CliError> {
    // The sandbox platform (started once the listener is bound) supplies the app identity.
    cfg.app_id = Some(crate::sandbox::APP_ID.to_owned());
    cfg.app_secret = Some(SecretString::from(crate::sandbox::APP_SECRET.to_owned()));
    let dir = cfg
        .storage_path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    if cfg.token_key.is_none() {
        cfg.token_key = Some(generated_secret(
            &dir.join("sandbox-token.key"),
            "token key",
        )?);
    }
    let mut files = SandboxFiles::default();
    if cfg.admin_token.is_none() {
        let path = dir.join("sandbox-admin-token");
        cfg.admin_token = Some(generated_secret(&path, "admin token")?);
        files.admin_token_file = Some(path);
    }
    Ok(files)
}

/// Reads the secret in `path`, generating it (mode 0600) first if the file does not exist.
fn generated_secret(path: &Path, what: &str) -> Result<SecretString, CliError> {
    if !path.exists() {
        let (_, text) = crate::storage::Key::generate();
        write_private(path, secrecy::ExposeSecret::expose_secret(&text))?;
        info!(path = %path.display(), "Generated a sandbox {what}.");
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    );
    let text = text.trim();
    if text.is_empty() {
        return Err(anyhow::anyhow!(
            "{} is empty; delete it to generate a new {what}",
            path.display()
        )
        .into());
    }
    Ok(SecretString::from(text.to_owned()))
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
    /// Public HTTP: health, readiness, HTTP callbacks, OAuth redirect.
    pub http: TcpListener,
    /// Admin: the admin API (behind the admin token) and `/mcp` (behind the MCP token).
    pub admin: TcpListener,
    /// `/metrics`; `None` disables it.
    pub metrics: Option<TcpListener>,
}

/// Runs the service until `shutdown` resolves (no configuration reloads).
pub async fn run(
    cfg: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CliError> {
    let (_tx, reloads) = tokio::sync::mpsc::channel(1);
    run_with_reloads(cfg, listeners, shutdown, reloads).await
}

/// Runs the service until `shutdown` resolves. Each configuration received on `reloads`
/// (`SIGHUP`) hands its app credentials to the long connection, which redials at once if it
/// is waiting (backoff, or paused on refused credentials). Other settings take effect on
/// restart.
pub async fn run_with_reloads(
    cfg: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    mut reloads: tokio::sync::mpsc::Receiver<Config>,
) -> Result<(), CliError> {
    let started = Instant::now();
    let ring = cfg.keyring()?;
    let path = cfg.storage_path.clone();
    let opts = store_options(&cfg);
    let store = tokio::task::spawn_blocking(move || Store::open(&path, ring, opts))
        .await
        .map_err(|e| anyhow::anyhow!("store open task failed: {e}"))??;
    let ready = Arc::new(AtomicBool::new(false));
    let sup = crate::workers::Supervisor::default();
    let cancel = sup.cancellation();
    let tracker = sup.tracker();
    let workers = sup.workers();
    crate::metrics::refresh_store_gauges(&store);
    if let Some(app_id) = &cfg.app_id {
        let m = crate::metrics::get();
        let label = crate::metrics::AppLabel {
            app_id: app_id.clone(),
        };
        m.ws_connection_status.get_or_create(&label).set(0);
        m.ws_degraded.get_or_create(&label).set(0);
        m.ws_credentials_rejected.get_or_create(&label).set(0);
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
    let dispatcher = crate::events::Dispatcher::new(
        store.clone(),
        crate::events::DispatchConfig {
            max_concurrent_handlers: cfg.websocket.max_concurrent_handlers,
            ..crate::events::DispatchConfig::default()
        },
    );
    let auth = crate::auth::AuthService::new(
        lark.clone(),
        store.clone(),
        crate::auth::AuthOptions::from_config(&cfg),
    );
    dispatcher.set_handler(app_handler(auth.clone()));
    dispatcher.set_late_failure_hook(late_failure_notice(lark.clone()));
    // Shutdown waits for token refreshes in flight (a rotated refresh token must be stored).
    let auth_refreshes = auth.clone();
    sup.start(FnWorker::new(
        "ttl_sweep",
        sweep_worker(store.clone(), Some(auth.clone()), cfg.sweep_interval),
    ));
    sup.start(FnWorker::new("token_refresh", auth.refresh_worker()));
    // Keeps the tenant token warm, so `/readyz` can read its state instead of fetching.
    sup.start_with_backoff(
        FnWorker::new("tenant_token", tenant_token_worker(lark.clone())),
        TENANT_TOKEN_RETRY_CAP,
    );
    if let Some(url) = cfg.export_postgres_url.clone() {
        sup.start(FnWorker::new(
            "export_postgres",
            crate::export::postgres::worker(
                store.clone(),
                url,
                net.clone(),
                std::time::Duration::from_secs(1),
            ),
        ));
    }
    if let Some(w) = auth.user_info_sync_worker() {
        sup.start(FnWorker::new("user_sync", w));
    }
    let conn = if cfg.websocket.enabled {
        let conn = Arc::new(crate::longconn::LongConn::new(
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
                credential_retry: cfg.websocket.credential_retry,
            },
            dispatcher.clone(),
        ));
        sup.start(FnWorker::new(
            "long_connection",
            long_connection_worker(conn.clone(), cancel.clone()),
        ));
        Some(conn)
    } else {
        None
    };
    let conn_state = conn.as_ref().map(|c| c.state());
    {
        let conn = conn.clone();
        let c = cancel.clone();
        tracker.spawn(async move {
            loop {
                let new = tokio::select! {
                    () = c.cancelled() => return,
                    r = reloads.recv() => match r { Some(new) => new, None => return },
                };
                match (&conn, new.app_id, new.app_secret) {
                    (Some(conn), Some(id), Some(secret)) => {
                        info!("Configuration reloaded: the long connection uses the re-read app credentials.");
                        conn.reload_credentials(id, secret);
                    }
                    (Some(_), _, _) => warn!("Configuration reloaded without app_id/app_secret; keeping the current credentials."),
                    (None, _, _) => info!("Configuration reloaded; the long connection is off, nothing to apply."),
                }
            }
        });
    }
    if let Some(schedule) = cfg.backup.schedule.clone() {
        let w = backup_worker(store.clone(), cfg.backup.clone(), &schedule)?;
        sup.start(FnWorker::new("backup", w));
    }

    let http_addr = listeners
        .http
        .local_addr()
        .context("reading the listener address")?;
    let admin_addr = listeners
        .admin
        .local_addr()
        .context("reading the admin listener address")?;
    let limits = cfg.http_limits;
    let state = crate::http::AppState {
        store: store.clone(),
        ready: ready.clone(),
        admin_token: cfg.admin_token.clone(),
        backup: Arc::new(cfg.backup.clone()),
        workers: workers.clone(),
        lark: Some(lark.clone()),
        conn_state,
        // Unsigned callbacks could be forged: only signed ones count as an event path.
        http_callbacks: cfg.websocket.fallback_to_http && cfg.encrypt_key.is_some(),
    };
    // Public: what Feishu and users' browsers reach.
    let mut public = crate::http::public_router(state.clone()).merge(auth.clone().public_router());
    if cfg.websocket.fallback_to_http && cfg.encrypt_key.is_none() {
        warn!("HTTP callbacks are not served: no encrypt_key (LARK_ENCRYPT_KEY) is set, and without it a callback cannot be authenticated (a verification token alone proves nothing).");
    }
    if cfg.websocket.fallback_to_http && cfg.encrypt_key.is_some() {
        let expose = |s: &Option<SecretString>| {
            s.as_ref()
                .map(|v| secrecy::ExposeSecret::expose_secret(v).to_owned())
        };
        let cb_cfg = crate::callbacks::CallbackConfig::new(
            expose(&cfg.verification_token).as_deref(),
            expose(&cfg.encrypt_key).as_deref(),
        );
        public = public.merge(crate::callbacks::routes::router(cb_cfg, dispatcher.clone()));
    }
    let public = crate::http::serve::with_request_timeout(public, limits.request_timeout);
    // Admin: the admin API behind the admin token, and /mcp behind the MCP token; one
    // throttle of failed bearer attempts per peer for both.
    let throttle = Arc::new(crate::http::bearer::Throttle::default());
    let guard =
        crate::http::bearer::BearerGuard::new(cfg.admin_token.clone(), "admin", throttle.clone());
    let admin =
        crate::http::admin_router(state, guard.clone()).merge(auth.clone().admin_router(guard));
    let mut admin = crate::http::serve::with_request_timeout(admin, limits.request_timeout);
    if let Some(token) = cfg.mcp_token.clone() {
        let server = crate::mcp::McpServer::new(lark.clone(), auth.clone(), store.clone());
        // No request timeout: MCP responses stream (SSE) for as long as the client listens.
        admin = admin.merge(crate::mcp::router(
            server,
            crate::http::bearer::BearerGuard::new(Some(token), "mcp", throttle),
            cancel.child_token(),
            cfg.mcp_limits,
        ));
    }
    let server = tokio::spawn(crate::http::serve::serve(
        listeners.http,
        public,
        limits,
        cancel.clone(),
    ));
    tracker.spawn(crate::http::serve::serve(
        listeners.admin,
        admin,
        limits,
        cancel.clone(),
    ));
    let metrics_addr = match listeners.metrics {
        Some(l) => {
            let addr = l.local_addr().ok();
            let metrics = crate::http::serve::with_request_timeout(
                crate::metrics::router(),
                limits.request_timeout,
            );
            tracker.spawn(crate::http::serve::serve(
                l,
                metrics,
                limits,
                cancel.clone(),
            ));
            addr
        }
        None => None,
    };
    tracker.spawn(watchdog(cancel.clone()));
    ready.store(true, Ordering::SeqCst);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    info!(
        http = %http_addr,
        admin = %admin_addr,
        metrics = %metrics_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
        store = %store.path().display(),
        key = %store.active_key_id(),
        startup_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "Service ready."
    );
    println!(
        "lark-service ready: http://{http_addr}/ (health: http://{http_addr}/healthz) admin API: http://{admin_addr}/"
    );

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

/// Longest wait between tenant-token fetch attempts while they fail.
const TENANT_TOKEN_RETRY_CAP: Duration = Duration::from_secs(30);

/// Runs the long connection; it only ends when cancelled, so any other end (or a panic,
/// which the supervisor catches) is a failure the supervisor restarts with backoff.
fn long_connection_worker(
    conn: Arc<crate::longconn::LongConn>,
    cancel: CancellationToken,
) -> crate::workers::WorkerFn {
    Box::new(move || {
        let (conn, cancel) = (conn.clone(), cancel.clone());
        Box::pin(async move {
            conn.run(cancel.clone()).await;
            if cancel.is_cancelled() {
                Ok(Duration::ZERO)
            } else {
                Err("the long connection task ended unexpectedly".to_owned())
            }
        })
    })
}

/// Fetches (or keeps) the tenant token: the cache answers from memory until the token is due
/// for refresh, so a run is cheap. Failures are retried by the supervisor (1 s doubling to
/// [`TENANT_TOKEN_RETRY_CAP`]); their outcome is what `/readyz` reports.
fn tenant_token_worker(lark: crate::lark::LarkClient) -> crate::workers::WorkerFn {
    Box::new(move || {
        let lark = lark.clone();
        Box::pin(async move {
            match lark.tenant_token().await {
                Ok(_) => Ok(Duration::from_secs(30)),
                Err(e) => Err(format!("tenant token: {e}")),
            }
        })
    })
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

/// What the person hears when their message or click was acknowledged but its work failed
/// afterwards (the platform will not redeliver it): a short text asking them to try again.
fn late_failure_notice(lark: crate::lark::LarkClient) -> crate::events::LateFailureHook {
    Arc::new(move |open_id, event_type| {
        let lark = lark.clone();
        Box::pin(async move {
            let Some(open_id) = open_id else {
                warn!(event_type = %event_type, "An acknowledged event failed afterwards; it has no sender to tell.");
                return;
            };
            let text = "抱歉，刚才的请求没有完成，请稍后再试一次。Sorry, your last request could not be completed; please try again.";
            match lark
                .send_text(&crate::lark::Receiver::open_id(&open_id), text)
                .await
            {
                Ok(_) => {
                    info!(event_type = %event_type, "Told the sender that their acknowledged request failed.")
                }
                Err(e) => {
                    warn!(error = %e, event_type = %event_type, "An acknowledged event failed afterwards and its sender could not be told.")
                }
            }
        })
    })
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A config file at the default path that would point `serve` at a production store.
    fn poisoned_default(dir: &Path) -> PathBuf {
        let p = dir.join("config.toml");
        std::fs::write(
            &p,
            "[storage]\npath = \"/var/lib/lark-service/poisoned.redb\"\n",
        )
        .unwrap();
        p
    }

    #[test]
    fn sandbox_serve_reads_no_default_config_but_plain_serve_does() {
        let dir = tempfile::tempdir().unwrap();
        let default = poisoned_default(dir.path());
        let env: HashMap<String, String> = HashMap::new();
        let opts = LoadOptions::default();

        let plain = serve_config(&opts, false, &env, &default).unwrap();
        assert_eq!(
            plain.storage_path,
            PathBuf::from("/var/lib/lark-service/poisoned.redb"),
            "plain serve reads the default config file"
        );
        let sandbox = serve_config(&opts, true, &env, &default).unwrap();
        assert_eq!(
            sandbox.storage_path,
            PathBuf::from("./data/lark-service.redb")
        );
        assert_eq!(sandbox.http_listen.ip(), std::net::Ipv4Addr::LOCALHOST);
        assert_eq!(sandbox.admin_listen.ip(), std::net::Ipv4Addr::LOCALHOST);
        assert_eq!(sandbox.metrics_addr.ip(), std::net::Ipv4Addr::LOCALHOST);
        assert!(sandbox.admin_token.is_none() && sandbox.token_key.is_none());

        // An explicit --config and the environment are still honoured.
        let explicit = LoadOptions {
            config_path: Some(default.clone()),
            overrides: vec![],
        };
        let c = serve_config(&explicit, true, &env, &default).unwrap();
        assert_eq!(
            c.storage_path,
            PathBuf::from("/var/lib/lark-service/poisoned.redb")
        );
        let env: HashMap<String, String> =
            [("STORAGE_PATH".to_owned(), "/tmp/x/s.redb".to_owned())].into();
        let c = serve_config(&opts, true, &env, &default).unwrap();
        assert_eq!(c.storage_path, PathBuf::from("/tmp/x/s.redb"));
    }

    #[test]
    fn sandbox_defaults_generate_private_key_and_admin_token_files_once() {
        let dir = tempfile::tempdir().unwrap();
        let env: HashMap<String, String> = [(
            "STORAGE_PATH".to_owned(),
            dir.path().join("data/s.redb").display().to_string(),
        )]
        .into();
        let load = || Config::load_with_default(&LoadOptions::default(), &env, None).unwrap();
        let mut cfg = load();
        let files = sandbox_defaults(&mut cfg).unwrap();
        let token_file = dir.path().join("data/sandbox-admin-token");
        assert_eq!(
            files.admin_token_file.as_deref(),
            Some(token_file.as_path())
        );
        for f in [&token_file, &dir.path().join("data/sandbox-token.key")] {
            let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", f.display());
        }
        let token =
            secrecy::ExposeSecret::expose_secret(cfg.admin_token.as_ref().unwrap()).to_owned();
        assert_eq!(std::fs::read_to_string(&token_file).unwrap().trim(), token);
        assert!(cfg.keyring().is_ok());

        // A restart reuses both.
        let mut again = load();
        sandbox_defaults(&mut again).unwrap();
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(again.admin_token.as_ref().unwrap()),
            token
        );

        // A configured admin token is kept and no file is named for it.
        let mut env2 = env.clone();
        env2.insert(
            "LARK_SERVICE_ADMIN_TOKEN".into(),
            "configured-admin-token-of-32-bytes!".into(),
        );
        let mut c = Config::load_with_default(&LoadOptions::default(), &env2, None).unwrap();
        let files = sandbox_defaults(&mut c).unwrap();
        assert_eq!(files.admin_token_file, None);
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(c.admin_token.as_ref().unwrap()),
            "configured-admin-token-of-32-bytes!"
        );
    }
}
