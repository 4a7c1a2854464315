//! The running service, as a boot sequence: open the store → build the clients → start the
//! workers → serve the listeners → ready → wait for the shutdown signal → shut down in order.
//!
//! Every background task belongs to one [`Supervisor`]. Shutdown (SIGTERM / Ctrl-C) runs in
//! order: the listeners stop accepting, the supervisor is cancelled and every worker finishes
//! its current unit (an in-flight token refresh stores its result) within [`SHUTDOWN_GRACE`],
//! the seen-id writer commits what is queued and is joined, and the store is closed (its file
//! lock released) before [`run`] returns.
//!
//! `run` takes the listeners and the shutdown future from its caller so tests can inject both;
//! [`run_with_reloads`] also takes where reloaded configurations come from (`SIGHUP` in
//! production, see [`Reloads`]).

mod error;
mod fleet;
mod handlers;
mod jobs;
mod runtimes;
mod sandbox;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use error::{store_exit_code, DaemonError};
pub use fleet::{scheduled_gate, GateRole, SCHEDULED_LEASE_TTL};
pub use jobs::Reloads;
pub use sandbox::{sandbox_defaults, SandboxFiles};

use crate::config::{Config, LoadOptions};
use crate::storage::{Db, StoreOptions};
use crate::workers::{FnWorker, Supervisor};

/// How long shutdown waits for in-flight work.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// How `serve` runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServeOptions {
    /// Run the platform imitation beside the service (see [`sandbox_defaults`]).
    pub sandbox: bool,
    /// With `sandbox`: serve it over HTTPS and WSS with a generated CA.
    pub sandbox_tls: bool,
}

/// Store options from the configuration.
#[must_use]
pub fn store_options(cfg: &Config) -> StoreOptions {
    StoreOptions {
        terminal_retention: cfg.session_retention,
        // Only an exporter reads the change feed: without one, nothing is appended to it.
        change_feed: cfg.export_postgres_url.is_some(),
        ..StoreOptions::default()
    }
}

/// `lark-service serve`: loads the configuration, starts the runtime and runs the service
/// until SIGTERM / Ctrl-C.
pub fn serve(opts: &LoadOptions, serve: ServeOptions) -> Result<(), DaemonError> {
    let default_config = Path::new(crate::config::DEFAULT_CONFIG_PATH);
    let mut cfg = serve_config(
        opts,
        serve.sandbox,
        &crate::config::ProcessEnv,
        default_config,
    )?;
    crate::telemetry::init(&cfg.log);
    let files = if serve.sandbox {
        sandbox_defaults(&mut cfg)?
    } else {
        SandboxFiles::default()
    };
    cfg.require_serve()?;
    if !serve.sandbox {
        for w in cfg.require_public_redirect()? {
            warn!("{w}");
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lark-service")
        .build()
        .map_err(DaemonError::Runtime)?;
    rt.block_on(async move {
        let mut cfg = cfg;
        let listeners = Listeners::bind(&cfg).await?;
        let _sandbox = if serve.sandbox {
            let http = local_addr(&listeners.http, "HTTP")?;
            let admin = local_addr(&listeners.admin, "admin")?;
            Some(sandbox::start_sandbox(&mut cfg, http, admin, files, serve.sandbox_tls).await?)
        } else {
            None
        };
        // In sandbox mode the sandbox's identity and address survive a reload.
        let pinned = serve.sandbox.then(|| {
            (
                cfg.app_id.clone(),
                cfg.app_secret.clone(),
                cfg.domain.clone(),
            )
        });
        let reloads = Reloads::sighup(
            opts.clone(),
            Box::new(move |c: &mut Config| {
                if let Some((id, secret, domain)) = &pinned {
                    c.app_id.clone_from(id);
                    c.app_secret.clone_from(secret);
                    c.domain.clone_from(domain);
                }
            }),
        );
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
) -> Result<Config, DaemonError> {
    let default_config = (!sandbox).then_some(default_config);
    Ok(Config::load_with_default(opts, env, default_config)?)
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

impl Listeners {
    /// Binds the configured addresses.
    async fn bind(cfg: &Config) -> Result<Self, DaemonError> {
        let bind = |what, addr: SocketAddr, setting| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Bind {
                    what,
                    addr,
                    setting,
                    source,
                })
        };
        Ok(Self {
            http: bind("HTTP", cfg.http_listen, "http.listen / HTTP_LISTEN").await?,
            metrics: Some(
                bind(
                    "metrics",
                    cfg.metrics_addr,
                    "metrics.bind / PROMETHEUS_PORT",
                )
                .await?,
            ),
            admin: bind("admin", cfg.admin_listen, "admin.listen / ADMIN_LISTEN").await?,
        })
    }
}

fn local_addr(l: &TcpListener, what: &'static str) -> Result<SocketAddr, DaemonError> {
    l.local_addr()
        .map_err(|source| DaemonError::ListenerAddress { what, source })
}

/// Runs the service until `shutdown` resolves (no configuration reloads).
pub async fn run(
    cfg: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let (_tx, reloads) = tokio::sync::mpsc::channel(1);
    run_with_reloads(cfg, listeners, shutdown, reloads).await
}

/// Runs the service until `shutdown` resolves. Each configuration from `reloads` hands its
/// app credentials to the long connection, which redials at once if it is waiting (backoff, or
/// paused on refused credentials). Other settings take effect on restart.
///
/// When this returns, every task has ended (or outlived the grace period, which is logged)
/// and the store is closed.
pub async fn run_with_reloads(
    cfg: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    reloads: impl Into<Reloads>,
) -> Result<(), DaemonError> {
    let started = Instant::now();
    let sup = Supervisor::default();
    let store = open_store(&cfg).await?;
    // Everything holding the store lives inside `serve_until`, and is gone when it returns.
    serve_until(
        &cfg,
        &sup,
        store,
        listeners,
        shutdown,
        reloads.into(),
        started,
    )
    .await?;
    info!("Stopped.");
    Ok(())
}

/// Opens the store (off the async threads) and sets the store gauges.
async fn open_store(cfg: &Config) -> Result<Db, DaemonError> {
    // PostgreSQL: the fleet's shared store (never a local file beside it).
    if let crate::config::StorageBackend::Postgres { url } = &cfg.storage_backend {
        let store = fleet::open_postgres(cfg, url).await?;
        crate::metrics::refresh_store_gauges(&store, cfg.app_id.as_deref().unwrap_or_default());
        return Ok(store);
    }
    let ring = cfg.keyring()?;
    let path = cfg.storage_path.clone();
    let opts = store_options(cfg);
    let store: Db =
        tokio::task::spawn_blocking(move || crate::storage::Store::open(&path, ring, opts))
            .await??
            .into();
    crate::metrics::refresh_store_gauges(&store, cfg.app_id.as_deref().unwrap_or_default());
    Ok(store)
}

/// Boots on an open store, serves until `shutdown`, then shuts down in order.
async fn serve_until(
    cfg: &Config,
    sup: &Supervisor,
    store: Db,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    reloads: Reloads,
    started: Instant,
) -> Result<(), DaemonError> {
    let app = build_clients(cfg, sup, &store)?;
    // Checked before anything starts, so a failure leaves nothing running.
    require_an_app(&app).await?;
    let backup = match cfg.backup.schedule.as_deref() {
        Some(schedule) => Some(jobs::BackupWorker::new(
            store.clone(),
            cfg.backup.clone(),
            schedule,
            sup.clock(),
        )?),
        None => None,
    };
    let http_addr = local_addr(&listeners.http, "HTTP")?;
    let admin_addr = local_addr(&listeners.admin, "admin")?;
    start_rotation(sup, &store, &app).await?;
    start_webhooks(cfg, sup, &store, &app)?;
    let switch = runtimes::AppSwitch::default();
    let conn = start_workers(cfg, sup, &store, &app, &switch, backup, reloads);
    let ready = Arc::new(AtomicBool::new(false));
    // Stopping the listeners is the first step of shutdown; the supervisor's cancellation
    // stops them too.
    let stop_accepting = sup.cancellation().child_token();
    // One throttle of failed bearer attempts per peer, for the admin API and /mcp.
    let throttle = Arc::new(crate::http::bearer::Throttle::default());
    let mcp = cfg.mcp_token.clone().map(|token| runtimes::McpSetup {
        token,
        limits: cfg.mcp_limits,
        throttle: throttle.clone(),
        shutdown: stop_accepting.child_token(),
    });
    start_runtimes(cfg, sup, &store, &app, &switch, mcp);
    let metrics_addr = start_listeners(
        cfg,
        sup,
        &store,
        &app,
        &switch,
        throttle,
        conn.as_ref().map(|c| c.state()),
        listeners,
        &ready,
        &stop_accepting,
    );
    announce_ready(&ready, &store, http_addr, admin_addr, metrics_addr, started);

    shutdown.await;
    stop_in_order(sup, &app, &switch, &ready, &stop_accepting).await;
    Ok(())
}

/// The runtimes of every active app: the primary (the configuration's app, whose long
/// connection `start_workers` runs) and, through the reconciler, every active app of the registry.
fn start_runtimes(
    cfg: &Config,
    sup: &Supervisor,
    store: &Db,
    app: &App,
    switch: &runtimes::AppSwitch,
    mcp: Option<runtimes::McpSetup>,
) {
    // The runtimes' own routes sit behind the switch's admin check; this inner check passes
    // the same token.
    let guard = crate::http::bearer::BearerGuard::new(
        cfg.admin_token.clone(),
        "admin",
        Arc::new(crate::http::bearer::Throttle::default()),
    );
    if let Some(p) = &app.primary {
        switch.insert(
            app.app_id.clone(),
            runtimes::Runtime::primary(
                &p.lark,
                &p.auth,
                store,
                p.dispatcher.clone(),
                guard.clone(),
                mcp.as_ref(),
            ),
        );
    }
    let reconciler = runtimes::Reconciler {
        ws: cfg.websocket.clone(),
        auth: runtimes::AuthSetup::from_config(cfg),
        sup: sup.clone(),
        store: store.clone(),
        net: app.net.clone(),
        domain: app.domain.clone(),
        registry: app.registry.clone(),
        switch: switch.clone(),
        guard,
        mcp,
    };
    sup.spawn(reconciler.run());
}

/// The clients and services the workers and listeners share.
struct App {
    net: crate::net::Net,
    /// The configuration's app (`APP_ID` / `APP_SECRET`), when it has one; the registry's
    /// apps run as `runtimes`.
    primary: Option<Primary>,
    domain: crate::lark::Domain,
    app_id: String,
    app_secret: SecretString,
    registry: crate::apps::Registry,
    /// This instance's lease holder id when it serves from a shared PostgreSQL store.
    fleet_holder: Option<String>,
    /// Its heartbeat's last outcome, for readiness (PostgreSQL only).
    fleet_health: Option<crate::http::fleet::FleetHealth>,
}

/// The configuration's app: its OpenAPI client, flow and event dispatcher.
struct Primary {
    lark: crate::lark::LarkClient,
    auth: crate::auth::AuthService,
    dispatcher: crate::events::Dispatcher,
}

/// Builds the network settings, the OpenAPI client, the event dispatcher and the
/// authorization flow.
fn build_clients(cfg: &Config, sup: &Supervisor, store: &Db) -> Result<App, DaemonError> {
    let app_id = cfg.app_id.clone().unwrap_or_default();
    let app_secret = cfg
        .app_secret
        .clone()
        .unwrap_or_else(|| SecretString::from(String::new()));
    if !app_id.is_empty() {
        let m = crate::metrics::get();
        let label = crate::metrics::AppLabel {
            app_id: app_id.clone(),
        };
        m.ws_connection_status.get_or_create(&label).set(0);
        m.ws_degraded.get_or_create(&label).set(0);
        m.ws_credentials_rejected.get_or_create(&label).set(0);
        m.zero_app(&app_id);
    }
    let domain: crate::lark::Domain = cfg
        .domain
        .parse()
        .map_err(|e| DaemonError::Domain(format!("{e}")))?;
    let net = crate::net::Net::new(&cfg.network.net_options())
        .map_err(|e| DaemonError::Network(e.to_string()))?;
    if let Some(p) = net.proxy() {
        info!(proxy = %p.display(), "Outgoing connections go through the proxy (except NO_PROXY hosts).");
    }
    if net.extra_cas() > 0 {
        info!(
            extra_cas = net.extra_cas(),
            "Trusting extra CA certificates besides the built-in roots."
        );
    }
    let fleet_holder = store.is_postgres().then(fleet::holder_id);
    if let Some(h) = &fleet_holder {
        info!(holder = %h, "One instance of a fleet: singleton workers and token refreshes run under leases.");
    }
    let primary = if app_id.is_empty() {
        None
    } else {
        let mut lark_cfg =
            crate::lark::LarkConfig::new(domain.clone(), app_id.clone(), app_secret.clone());
        lark_cfg.net = Some(net.clone());
        let lark = crate::lark::LarkClient::new(lark_cfg)
            .map_err(|e| DaemonError::LarkClient(e.to_string()))?;
        let dispatcher = crate::events::Dispatcher::new(
            store.clone(),
            crate::events::DispatchConfig {
                max_concurrent_handlers: cfg.websocket.max_concurrent_handlers,
                ..crate::events::DispatchConfig::default()
            },
            sup,
        );
        let mut auth =
            runtimes::AuthSetup::from_config(cfg).service(lark.clone(), store.clone(), sup);
        if let Some(h) = &fleet_holder {
            auth = auth.in_fleet(h);
        }
        dispatcher.set_handler(handlers::app_handler(auth.clone()));
        dispatcher.set_late_failure_hook(handlers::late_failure_notice(lark.clone()));
        Some(Primary {
            lark,
            auth,
            dispatcher,
        })
    };
    Ok(App {
        net,
        primary,
        domain,
        app_id,
        app_secret,
        registry: crate::apps::Registry::from_config(store.clone(), cfg)?,
        fleet_health: fleet_holder.as_ref().map(|_| {
            crate::http::fleet::FleetHealth::new(fleet::Heartbeat::live_window(
                fleet::HEARTBEAT_EVERY,
            ))
        }),
        fleet_holder,
    })
}

/// Without the configuration's app (`APP_ID` / `APP_SECRET`), the service serves the
/// registry's active apps; with neither there is nothing to serve, and it says how to add one
/// rather than run idle.
async fn require_an_app(app: &App) -> Result<(), DaemonError> {
    if app.primary.is_some() {
        return Ok(());
    }
    let reg = app.registry.clone();
    let (active, refused) = tokio::task::spawn_blocking(move || reg.active_each())
        .await?
        .map_err(|e| DaemonError::NoApp {
            refused: format!(" (the app registry could not be read: {e})"),
        })?;
    if active.is_empty() {
        let refused = refused
            .iter()
            .map(|(id, e)| format!("{id}: {e}"))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(DaemonError::NoApp {
            refused: if refused.is_empty() {
                String::new()
            } else {
                format!(" (active but not served: {refused})")
            },
        });
    }
    info!(
        apps = active.len(),
        "No app in the configuration: serving the app registry's active apps."
    );
    Ok(())
}

/// Starts a worker only one instance of a fleet may run (`fleet::Leased`); alone (redb), as
/// it is.
fn start_singleton<W: crate::workers::Worker>(
    sup: &Supervisor,
    store: &Db,
    app: &App,
    worker: W,
    every: Duration,
) {
    match &app.fleet_holder {
        Some(h) => sup.start(fleet::Leased::new(
            worker,
            store.clone(),
            h,
            fleet::Leased::<W>::ttl_for(every),
            every,
            sup.clock(),
        )),
        None => sup.start(worker),
    }
}

/// On PostgreSQL: this instance's heartbeat row (`fleet::Heartbeat`), retried at its interval
/// when it cannot be written.
fn start_heartbeat(sup: &Supervisor, store: &Db, app: &App) {
    if let (Db::Postgres(pg), Some(h), Some(health)) = (store, &app.fleet_holder, &app.fleet_health)
    {
        sup.start_with_backoff(
            fleet::Heartbeat::new(
                pg.clone(),
                h,
                fleet::HEARTBEAT_EVERY,
                sup.clock(),
                health.clone(),
            ),
            fleet::HEARTBEAT_EVERY,
        );
    }
}

/// The scheduled backups: alone (redb), each time; in a fleet, each scheduled time on the one
/// instance that takes the lease `worker/backup` (`fleet::scheduled_gate`), `/workers` showing
/// `leader` or `follower`.
fn start_backups(sup: &Supervisor, store: &Db, app: &App, w: jobs::BackupWorker) {
    match &app.fleet_holder {
        Some(h) => {
            let role = fleet::GateRole::default();
            let gate = fleet::scheduled_gate(store.clone(), h, "backup", sup.clock(), role.clone());
            sup.start(fleet::WithRole::new(w.with_gate(gate), role));
        }
        None => sup.start(w),
    }
}

/// Re-seals the store under the active key in the background, when records are sealed under
/// older keys. On PostgreSQL, one instance of the fleet does it, under the lease
/// `worker/key_rotation` (`fleet::KeyRotation`), once every live instance holds the key.
async fn start_rotation(sup: &Supervisor, store: &Db, app: &App) -> Result<(), DaemonError> {
    if !store.run(crate::storage::Db::rotation_pending).await? {
        return Ok(());
    }
    if let (Db::Postgres(pg), true) = (store, app.fleet_holder.is_some()) {
        info!(key = %pg.active_key_id(), "Records are sealed under older keys: one instance of the fleet rotates them to the active key.");
        let every = fleet::KeyRotation::EVERY;
        start_singleton(sup, store, app, fleet::KeyRotation::new(pg.clone()), every);
        return Ok(());
    }
    let s = store.clone();
    sup.spawn(async move {
        info!(key = %s.active_key_id(), "Rotating the store to the active token key in the background.");
        match s.run(|st| st.rotate_keys(1000, &mut |_, _| {})).await {
            Ok(r) => info!(resealed = r.resealed, scanned = r.scanned, "Key rotation complete; previous keys are no longer needed."),
            Err(e) => error!(error = %e, "Key rotation failed; records under previous keys stay readable."),
        }
    });
    Ok(())
}

/// With webhook URLs: changes append their events to the outbox from now on, and the delivery
/// worker (`webhooks`) drains it. The expiry reminder (`expiry_reminders`) runs whenever its
/// lead time is set, with or without URLs: the reminder card is the point, the event a bonus.
fn start_webhooks(
    cfg: &Config,
    sup: &Supervisor,
    store: &Db,
    app: &App,
) -> Result<(), DaemonError> {
    let w = &cfg.webhooks;
    if let (true, Some(secret)) = (w.enabled(), w.secret.clone()) {
        // The flows (this app's and the registry's) append events: `AuthSetup::service`.
        let worker = crate::webhooks::WebhookWorker::new(
            store.clone(),
            &app.net,
            crate::webhooks::WebhookWorkerOptions {
                urls: w.urls.clone(),
                secret,
                timeout: w.timeout,
                max_attempts: w.max_attempts,
                backoff: crate::backoff::Backoff::new(
                    Duration::from_secs(1),
                    Duration::from_secs(600),
                ),
            },
            sup.clock(),
        )
        .map_err(|e| DaemonError::Network(format!("webhook HTTP client: {e}")))?;
        info!(
            receivers = w.urls.len(),
            "Webhook events are recorded and delivered."
        );
        match &app.fleet_holder {
            // A fleet: one instance at a time delivers (the lease `worker/webhooks`).
            Some(h) => {
                let ttl = crate::webhooks::WebhookWorker::lease_ttl(w.timeout);
                sup.start(fleet::Leased::new(
                    worker.with_unit_budget(ttl / 4),
                    store.clone(),
                    h,
                    ttl,
                    crate::webhooks::worker::POLL,
                    sup.clock(),
                ));
            }
            None => sup.start(worker),
        }
    }
    if let (false, Some(p)) = (w.reminder_lead.is_zero(), &app.primary) {
        let auth = p.auth.clone();
        let (lead, lifetime) = (w.reminder_lead, w.grant_lifetime);
        let every = runtimes::reminder_period(lead);
        // One instance of a fleet reminds (the lease `worker/expiry_reminders`).
        start_singleton(
            sup,
            store,
            app,
            FnWorker::new(
                "expiry_reminders",
                Box::new(move || {
                    let auth = auth.clone();
                    Box::pin(async move {
                        auth.remind_expiring(lead, lifetime)
                            .await
                            .map(|_| every)
                            .map_err(|e| e.to_string())
                    })
                }),
            ),
            every,
        );
    }
    Ok(())
}

/// Starts every worker; returns the long connection when it is on.
fn start_workers(
    cfg: &Config,
    sup: &Supervisor,
    store: &Db,
    app: &App,
    switch: &runtimes::AppSwitch,
    backup: Option<jobs::BackupWorker>,
    reloads: Reloads,
) -> Option<Arc<crate::longconn::LongConn>> {
    start_heartbeat(sup, store, app);
    let others = switch.clone();
    start_singleton(
        sup,
        store,
        app,
        jobs::SweepWorker::new(
            store.clone(),
            app.app_id.clone(),
            app.primary.as_ref().map(|p| p.auth.clone()),
            cfg.sweep_interval,
            sup.clock(),
        )
        .with_other_apps(Arc::new(move |id: &str| others.auth_of(id))),
        cfg.sweep_interval,
    );
    // The configuration's app, when there is one (the registry's apps have their own, see
    // `runtimes::start_runtime`).
    let primary = app.primary.as_ref();
    if let Some(p) = primary {
        sup.start(FnWorker::new("token_refresh", p.auth.refresh_worker()));
        // Device sessions of an earlier run, or of a fleet instance that died, are polled
        // again (their codes are stored); those of an older version, without one, expire.
        let auth = p.auth.clone();
        sup.tracker()
            .spawn(async move { auth.resume_device_polls().await });
        sup.start_with_backoff(
            jobs::TenantTokenWorker::new(p.lark.clone()),
            jobs::TENANT_TOKEN_RETRY_CAP,
        );
    }
    if let Some(url) = cfg.export_postgres_url.clone() {
        let every = Duration::from_secs(1);
        start_singleton(
            sup,
            store,
            app,
            FnWorker::new(
                "export_postgres",
                crate::export::postgres::worker(store.clone(), url, app.net.clone(), every),
            ),
            every,
        );
    }
    // In a fleet, each scheduled sync runs on one instance: the one taking its lease.
    let role = fleet::GateRole::default();
    let sync_gate = app
        .fleet_holder
        .as_ref()
        .map(|h| fleet::scheduled_gate(store.clone(), h, "user_sync", sup.clock(), role.clone()));
    if let Some(w) = primary.and_then(|p| p.auth.user_info_sync_worker_gated(sync_gate)) {
        sup.start(fleet::WithRole::new(FnWorker::new("user_sync", w), role));
    }
    let conn = primary.filter(|_| cfg.websocket.enabled).map(|p| {
        let conn = Arc::new(crate::longconn::LongConn::new(
            crate::longconn::LongConnConfig {
                base_url: app.domain.open_base(),
                app_id: app.app_id.clone(),
                app_secret: app.app_secret.clone(),
                policy: crate::longconn::ReconnectPolicy {
                    max_retries: crate::longconn::max_retries_from_setting(
                        cfg.websocket.max_reconnect_retries,
                    ),
                    ..crate::longconn::ReconnectPolicy::default()
                },
                heartbeat: cfg.websocket.heartbeat_interval,
                reassembly: crate::longconn::ReassemblyLimits::default(),
                net: app.net.clone(),
                credential_retry: cfg.websocket.credential_retry,
            },
            p.dispatcher.clone(),
        ));
        sup.start(jobs::LongConnectionWorker::new(conn.clone()));
        conn
    });
    if let Some(w) = jobs::ReloadWorker::new(reloads, conn.clone()) {
        sup.start(w);
    }
    if let Some(w) = backup {
        start_backups(sup, store, app, w);
    }
    if let Some(w) = jobs::WatchdogWorker::new() {
        sup.start(w);
    }
    conn
}

/// Serves the public, admin and metrics listeners until `stop`; returns the metrics address.
#[allow(clippy::too_many_arguments)] // each is one thing the listeners are built from
fn start_listeners(
    cfg: &Config,
    sup: &Supervisor,
    store: &Db,
    app: &App,
    switch: &runtimes::AppSwitch,
    throttle: Arc<crate::http::bearer::Throttle>,
    conn_state: Option<tokio::sync::watch::Receiver<crate::longconn::ConnState>>,
    listeners: Listeners,
    ready: &Arc<AtomicBool>,
    stop: &CancellationToken,
) -> Option<SocketAddr> {
    let limits = cfg.http_limits;
    let state = crate::http::AppState {
        store: store.clone(),
        ready: ready.clone(),
        admin_token: cfg.admin_token.clone(),
        backup: Arc::new(cfg.backup.clone()),
        workers: sup.workers(),
        lark: app.primary.as_ref().map(|p| p.lark.clone()),
        conn_state,
        // Unsigned callbacks could be forged: only signed ones count as an event path.
        http_callbacks: cfg.websocket.fallback_to_http
            && cfg.encrypt_key.is_some()
            && app.primary.is_some(),
        fleet: app.fleet_health.clone(),
    };
    // Public: what Feishu and users' browsers reach.
    let mut public =
        crate::http::public_router(state.clone()).merge(switch.public_router(store.clone()));
    if cfg.websocket.fallback_to_http && cfg.encrypt_key.is_none() {
        warn!("HTTP callbacks are not served: no encrypt_key (LARK_ENCRYPT_KEY) is set, and without it a callback cannot be authenticated (a verification token alone proves nothing).");
    }
    if cfg.websocket.fallback_to_http && cfg.encrypt_key.is_some() && app.primary.is_none() {
        warn!("HTTP callbacks are served for the configuration's app only, and there is none (APP_ID): the registry's apps receive events over their long connections.");
    }
    if let (true, Some(_), Some(p)) = (
        cfg.websocket.fallback_to_http,
        &cfg.encrypt_key,
        &app.primary,
    ) {
        let expose = |s: &Option<SecretString>| {
            s.as_ref()
                .map(|v| secrecy::ExposeSecret::expose_secret(v).to_owned())
        };
        let cb_cfg = crate::callbacks::CallbackConfig::new(
            expose(&cfg.verification_token).as_deref(),
            expose(&cfg.encrypt_key).as_deref(),
        );
        public = public.merge(crate::http::callbacks::router(cb_cfg, p.dispatcher.clone()));
    }
    let public = crate::http::serve::with_request_timeout(public, limits.request_timeout);
    // Admin: the admin API behind the admin token, and /mcp behind the MCP token; one
    // throttle of failed bearer attempts per peer for both.
    let guard =
        crate::http::bearer::BearerGuard::new(cfg.admin_token.clone(), "admin", throttle.clone());
    let admin = crate::http::admin_router(state, guard.clone())
        .merge(crate::apps::routes::admin_router(
            app.registry.clone(),
            guard.clone(),
        ))
        .merge(switch.admin_router(guard));
    let mut admin = crate::http::serve::with_request_timeout(admin, limits.request_timeout);
    if let Some(token) = cfg.mcp_token.clone() {
        // No request timeout: MCP responses stream (SSE) for as long as the client listens.
        // Each app has its own MCP server; `/mcp?app_id=` picks it.
        admin = admin.merge(switch.mcp_router(crate::http::bearer::BearerGuard::new(
            Some(token),
            "mcp",
            throttle,
        )));
    }
    sup.spawn(crate::http::serve::serve(
        listeners.http,
        public,
        limits,
        stop.clone(),
    ));
    sup.spawn(crate::http::serve::serve(
        listeners.admin,
        admin,
        limits,
        stop.clone(),
    ));
    listeners.metrics.and_then(|l| {
        let addr = l.local_addr().ok();
        let metrics = crate::http::serve::with_request_timeout(
            crate::metrics::router(),
            limits.request_timeout,
        );
        sup.spawn(crate::http::serve::serve(l, metrics, limits, stop.clone()));
        addr
    })
}

/// Marks the service ready (readiness probe, systemd) and says where it serves.
fn announce_ready(
    ready: &AtomicBool,
    store: &Db,
    http_addr: SocketAddr,
    admin_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    started: Instant,
) {
    ready.store(true, Ordering::SeqCst);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    info!(
        http = %http_addr,
        admin = %admin_addr,
        metrics = %metrics_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
        store = %store.path().map_or_else(|| store.backend_name().to_owned(), |p| p.display().to_string()),
        key = %store.active_key_id(),
        startup_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "Service ready."
    );
    println!(
        "lark-service ready: http://{http_addr}/ (health: http://{http_addr}/healthz) admin API: http://{admin_addr}/"
    );
}

/// Shutdown, in order: stop accepting; cancel every worker and let each finish its current
/// unit (token refreshes in flight store their result) within the grace period; then the
/// seen-id writer commits what is queued and is joined. The store closes when the caller drops
/// the last handle.
async fn stop_in_order(
    sup: &Supervisor,
    app: &App,
    switch: &runtimes::AppSwitch,
    ready: &AtomicBool,
    stop_accepting: &CancellationToken,
) {
    info!("Shutting down.");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    ready.store(false, Ordering::SeqCst);
    stop_accepting.cancel();
    let auth = app.primary.as_ref().map(|p| p.auth.clone());
    sup.drain(SHUTDOWN_GRACE, async move {
        if let Some(auth) = auth {
            auth.finish_refreshes().await;
        }
    })
    .await;
    if let Some(p) = &app.primary {
        p.dispatcher.close().await;
    }
    switch.close_others().await;
    sup.join_writers().await;
}
#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

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
