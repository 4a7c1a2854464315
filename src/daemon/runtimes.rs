//! One runtime per active app: its OpenAPI client, its authorization flow, its event
//! dispatcher and its long connection, all on the supervisor.
//!
//! The configuration's app is the primary runtime (built by the boot sequence, it lives as
//! long as the service). Every other active app of the registry gets a runtime from the
//! [`Reconciler`], which runs at start and again whenever the registry changes (an `app`
//! command through the admin API): apps that became active get a long connection, apps that
//! were disabled or deleted lose theirs, without a restart.
//!
//! The admin API's authorization routes and the public OAuth redirect go through
//! [`AppSwitch`], which hands each request to the runtime of the app it is for: the `app_id`
//! it names (query parameter, or field of a JSON body), else the only active app. With several
//! active apps and none named, it refuses (fail closed). The OAuth redirect finds its app from
//! the session its `state` belongs to. `/mcp` takes the app as the endpoint's query parameter
//! (`/mcp?app_id=cli_…`): an MCP client is configured with one URL per app, and each app has
//! its own MCP server (tools, sessions) over its client and flow.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;
use tracing::{error, info, warn};

use super::{handlers, DaemonError};
use crate::apps::{AppsError, Registry};
use crate::config::WebsocketConfig;
use crate::storage::Db;
use crate::workers::Supervisor;

/// The largest JSON body read to find an `app_id` in it.
const MAX_PEEK_BODY: usize = 1 << 20;
/// How often the reconciler looks at the registry even when nothing woke it.
const RECONCILE_EVERY: Duration = Duration::from_secs(30);
/// On PostgreSQL, how often each instance reads the registry's version (one row) to pick up
/// what other instances or the `app` command changed.
const REGISTRY_POLL: Duration = Duration::from_secs(2);

/// One app's running parts.
pub(super) struct Runtime {
    auth: crate::auth::AuthService,
    dispatcher: crate::events::Dispatcher,
    /// Cancelled when the app stops being active (`None`: the primary, which never stops).
    pub stop: Option<CancellationToken>,
    /// The secret it runs with (`None`: the primary's, from the configuration): a registry
    /// edit that changes it restarts the runtime.
    secret: Option<SecretString>,
    admin: Router,
    public: Router,
    mcp: Option<Router>,
}

/// What each app's `/mcp` is built with (when `mcp_token` is set).
#[derive(Clone)]
pub(super) struct McpSetup {
    pub token: SecretString,
    pub limits: crate::config::McpLimits,
    /// The one throttle of failed bearer attempts (admin and MCP).
    pub throttle: Arc<crate::http::bearer::Throttle>,
    /// Cancelled when the listeners stop (closes the primary app's open MCP streams).
    pub shutdown: CancellationToken,
}

impl McpSetup {
    /// The app's `/mcp`; its streams end when `end` is cancelled.
    fn router(
        &self,
        lark: &crate::lark::LarkClient,
        auth: &crate::auth::AuthService,
        store: &Db,
        end: CancellationToken,
    ) -> Router {
        let server = crate::mcp::McpServer::new(lark.clone(), auth.clone(), store.clone());
        crate::mcp::router(
            server,
            crate::http::bearer::BearerGuard::new(
                Some(self.token.clone()),
                "mcp",
                self.throttle.clone(),
            ),
            end,
            self.limits,
        )
    }
}

impl Runtime {
    /// The primary runtime: the boot sequence's clients for the configuration's app.
    pub fn primary(
        lark: &crate::lark::LarkClient,
        auth: &crate::auth::AuthService,
        store: &Db,
        dispatcher: crate::events::Dispatcher,
        guard: crate::http::bearer::BearerGuard,
        mcp: Option<&McpSetup>,
    ) -> Self {
        Self {
            admin: auth.clone().admin_router(guard),
            public: auth.clone().public_router(),
            // Its streams end when the listeners stop.
            mcp: mcp.map(|m| m.router(lark, auth, store, m.shutdown.child_token())),
            auth: auth.clone(),
            dispatcher,
            stop: None,
            secret: None,
        }
    }
}

/// The running runtimes, by app id.
#[derive(Clone, Default)]
pub(super) struct AppSwitch {
    runtimes: Arc<RwLock<BTreeMap<String, Runtime>>>,
}

fn read<'a>(
    l: &'a RwLock<BTreeMap<String, Runtime>>,
) -> std::sync::RwLockReadGuard<'a, BTreeMap<String, Runtime>> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<'a>(
    l: &'a RwLock<BTreeMap<String, Runtime>>,
) -> std::sync::RwLockWriteGuard<'a, BTreeMap<String, Runtime>> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn query_param(req: &Request, name: &str) -> Option<String> {
    req.uri().query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    })
}

/// `req` as it came off the wire, without what the outer router added (its path
/// parameters), for the runtime's own router; the peer address stays.
fn fresh(req: Request) -> Request {
    let (mut parts, body) = req.into_parts();
    let peer = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .cloned();
    parts.extensions = axum::http::Extensions::new();
    if let Some(p) = peer {
        parts.extensions.insert(p);
    }
    Request::from_parts(parts, body)
}

fn refusal(e: &AppsError) -> Response {
    crate::apps::routes::error_response(e)
}

impl AppSwitch {
    /// Adds a runtime (replacing none: the caller checks).
    pub fn insert(&self, app_id: String, rt: Runtime) {
        write(&self.runtimes).insert(app_id, rt);
    }

    /// The authorization flow of running app `app_id`.
    pub fn auth_of(&self, app_id: &str) -> Option<crate::auth::AuthService> {
        read(&self.runtimes).get(app_id).map(|r| r.auth.clone())
    }

    /// The ids of the running apps.
    pub fn ids(&self) -> Vec<String> {
        read(&self.runtimes).keys().cloned().collect()
    }

    fn pick(&self, named: Option<&str>, which: Surface) -> Result<Router, AppsError> {
        let g = read(&self.runtimes);
        let ids: Vec<String> = g.keys().cloned().collect();
        let id = crate::apps::pick(&ids, named)?;
        g.get(id)
            .and_then(|r| match which {
                Surface::Public => Some(r.public.clone()),
                Surface::Admin => Some(r.admin.clone()),
                Surface::Mcp => r.mcp.clone(),
            })
            .ok_or_else(|| AppsError::NotActive(id.to_owned()))
    }

    /// `/mcp` (behind `guard`, the MCP bearer check), handed to the MCP server of the app the
    /// `app_id` query parameter names (or the only active app).
    pub fn mcp_router(&self, guard: crate::http::bearer::BearerGuard) -> Router {
        let routes = Router::new()
            .route("/mcp", any(dispatch_mcp))
            .route("/mcp/{*rest}", any(dispatch_mcp))
            .with_state(self.clone());
        guard.protect(routes)
    }

    /// The authorization admin routes (`/api/v1/auth/…`, `/api/v1/sessions/…/revoke`,
    /// `/api/v1/users/…/token`), each handed to the runtime of its app, behind `guard`.
    pub fn admin_router(&self, guard: crate::http::bearer::BearerGuard) -> Router {
        let routes = Router::new()
            .route("/api/v1/auth/requests", any(dispatch_admin))
            .route("/api/v1/auth/sessions/{id}", any(dispatch_admin))
            .route("/api/v1/sessions/{id}/revoke", any(dispatch_admin))
            .route("/api/v1/users/{id}/token", any(dispatch_admin))
            .with_state(self.clone());
        guard.protect(routes)
    }

    /// The public OAuth redirect, handed to the runtime of the app whose session its `state`
    /// names.
    pub fn public_router(&self, store: Db) -> Router {
        Router::new()
            .route(crate::auth::CALLBACK_PATH, any(dispatch_callback))
            .with_state((self.clone(), store))
    }

    /// Stops every runtime but the primary and closes their dispatchers (shutdown).
    pub async fn close_others(&self) {
        let others: Vec<Runtime> = {
            let mut g = write(&self.runtimes);
            let ids: Vec<String> = g
                .iter()
                .filter(|(_, r)| r.stop.is_some())
                .map(|(k, _)| k.clone())
                .collect();
            ids.iter().filter_map(|k| g.remove(k)).collect()
        };
        for r in others {
            if let Some(s) = &r.stop {
                s.cancel();
            }
            // The flow's tasks are the supervisor's: shutdown's drain waits for them.
            r.dispatcher.close().await;
        }
    }
}

async fn dispatch_admin(State(sw): State<AppSwitch>, req: Request) -> Response {
    let mut named = query_param(&req, "app_id");
    let req = if named.is_none() && req.method() == axum::http::Method::POST {
        let (parts, body) = req.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, MAX_PEEK_BODY).await else {
            return (StatusCode::PAYLOAD_TOO_LARGE, "body too large\n").into_response();
        };
        named = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("app_id").and_then(|a| a.as_str()).map(str::to_owned));
        Request::from_parts(parts, Body::from(bytes))
    } else {
        req
    };
    match sw.pick(named.as_deref(), Surface::Admin) {
        Ok(router) => match router.oneshot(fresh(req)).await {
            Ok(r) => r,
            Err(never) => match never {},
        },
        Err(e) => refusal(&e),
    }
}

#[derive(Clone, Copy)]
enum Surface {
    Public,
    Admin,
    Mcp,
}

async fn dispatch_mcp(State(sw): State<AppSwitch>, req: Request) -> Response {
    let named = query_param(&req, "app_id");
    match sw.pick(named.as_deref(), Surface::Mcp) {
        Ok(router) => match router.oneshot(fresh(req)).await {
            Ok(r) => r,
            Err(never) => match never {},
        },
        Err(e) => refusal(&e),
    }
}

async fn dispatch_callback(State((sw, store)): State<(AppSwitch, Db)>, req: Request) -> Response {
    // The session the state belongs to names its app; an unknown state goes to any runtime,
    // which answers it as unknown.
    let app = match query_param(&req, "state") {
        Some(state) => {
            let hash = crate::auth::state_hash(&state);
            match store.run(move |s| s.session_by_state_hash(&hash)).await {
                Ok(s) => s.map(|s| s.app_id),
                Err(e) => {
                    error!(error = %e, "Cannot look up the OAuth state's session.");
                    return (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n")
                        .into_response();
                }
            }
        }
        None => None,
    };
    let router = match app {
        Some(a) => sw.pick(Some(&a), Surface::Public),
        None => {
            let first = sw.ids().into_iter().next();
            sw.pick(first.as_deref(), Surface::Public)
        }
    };
    match router {
        Ok(router) => match router.oneshot(fresh(req)).await {
            Ok(r) => r,
            Err(never) => match never {},
        },
        Err(e) => refusal(&e),
    }
}

/// How every app's authorization flow is set up (the same for the config app and the
/// registry's apps).
#[derive(Clone)]
pub(super) struct AuthSetup {
    pub opts: crate::auth::AuthOptions,
    /// `auth.flow` resolved: the device flow instead of the redirect.
    pub device_flow: bool,
    /// Webhook URLs are configured: changes append their events to the outbox.
    pub webhook_events: bool,
    /// `(lead, grant lifetime)` of the expiry reminder cards, when on.
    pub reminders: Option<(Duration, Duration)>,
}

impl AuthSetup {
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        let w = &cfg.webhooks;
        Self {
            opts: crate::auth::AuthOptions::from_config(cfg),
            device_flow: cfg.device_flow(),
            webhook_events: w.enabled() && w.secret.is_some(),
            reminders: (!w.reminder_lead.is_zero()).then_some((w.reminder_lead, w.grant_lifetime)),
        }
    }

    /// The flow of one app, set up.
    pub fn service(
        &self,
        lark: crate::lark::LarkClient,
        store: Db,
        sup: &Supervisor,
    ) -> crate::auth::AuthService {
        let auth = crate::auth::AuthService::new(lark, store, self.opts.clone())
            // Refreshes, their worker's per-token tasks and card re-sends are the
            // supervisor's tasks: shutdown waits for them.
            .with_tasks(sup.tracker())
            .with_device_flow(self.device_flow);
        if self.webhook_events {
            auth.enable_webhook_events();
        }
        auth
    }
}

/// How often the expiry reminders look for grants near their end: an eighth of the lead
/// time, 1 s to 10 min.
pub(super) fn reminder_period(lead: Duration) -> Duration {
    (lead / 8).clamp(Duration::from_secs(1), Duration::from_secs(600))
}

/// Builds and starts the runtime of a registry app: client, flow, dispatcher, and (when the
/// long connection is on) the connection, as a task of the supervisor that `stop` ends.
#[allow(clippy::too_many_arguments)] // each is one thing a runtime is built from
pub(super) fn start_runtime(
    ws: &WebsocketConfig,
    setup: &AuthSetup,
    sup: &Supervisor,
    store: &Db,
    net: &crate::net::Net,
    domain: &crate::lark::Domain,
    app_id: &str,
    app_secret: SecretString,
    guard: crate::http::bearer::BearerGuard,
    mcp: Option<&McpSetup>,
) -> Result<Runtime, DaemonError> {
    let m = crate::metrics::get();
    let label = crate::metrics::AppLabel {
        app_id: app_id.to_owned(),
    };
    m.ws_connection_status.get_or_create(&label).set(0);
    m.ws_degraded.get_or_create(&label).set(0);
    m.ws_credentials_rejected.get_or_create(&label).set(0);
    m.zero_app(app_id);
    let mut lark_cfg =
        crate::lark::LarkConfig::new(domain.clone(), app_id.to_owned(), app_secret.clone());
    lark_cfg.net = Some(net.clone());
    let lark = crate::lark::LarkClient::new(lark_cfg)
        .map_err(|e| DaemonError::LarkClient(e.to_string()))?;
    let secret_kept = app_secret.clone();
    let dispatcher = crate::events::Dispatcher::new(
        store.clone(),
        crate::events::DispatchConfig {
            max_concurrent_handlers: ws.max_concurrent_handlers,
            ..crate::events::DispatchConfig::default()
        },
        sup,
    );
    let auth = setup.service(lark.clone(), store.clone(), sup);
    dispatcher.set_handler(handlers::app_handler(auth.clone()));
    dispatcher.set_late_failure_hook(handlers::late_failure_notice(lark.clone()));
    let stop = sup.cancellation().child_token();
    // Device sessions of an earlier run, or of a fleet instance that died, are polled again
    // (their codes are stored); those of an older version, without one, expire.
    {
        let auth = auth.clone();
        sup.tracker()
            .spawn(async move { auth.resume_device_polls().await });
    }
    // The app's expiry reminders, until the app stops.
    if let Some((lead, lifetime)) = setup.reminders {
        let auth = auth.clone();
        let stop = stop.clone();
        let every = reminder_period(lead);
        sup.spawn(async move {
            loop {
                if let Err(e) = auth.remind_expiring(lead, lifetime).await {
                    warn!(error = %e, "Expiry reminders failed; trying again later.");
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
            }
        });
    }
    // The app's token refreshes, until the app stops.
    {
        let mut refresh = auth.refresh_worker();
        let stop = stop.clone();
        let app = app_id.to_owned();
        sup.spawn(async move {
            loop {
                let wait = tokio::select! {
                    () = stop.cancelled() => return,
                    r = refresh() => match r {
                        Ok(w) => w.max(Duration::from_millis(200)),
                        Err(e) => {
                            warn!(app_id = %app, error = %e, "Token refresh pass failed; retrying.");
                            Duration::from_secs(5)
                        }
                    },
                };
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        });
    }
    if ws.enabled {
        let conn = Arc::new(crate::longconn::LongConn::new(
            crate::longconn::LongConnConfig {
                base_url: domain.open_base(),
                app_id: app_id.to_owned(),
                app_secret,
                policy: crate::longconn::ReconnectPolicy {
                    max_retries: crate::longconn::max_retries_from_setting(
                        ws.max_reconnect_retries,
                    ),
                    ..crate::longconn::ReconnectPolicy::default()
                },
                heartbeat: ws.heartbeat_interval,
                reassembly: crate::longconn::ReassemblyLimits::default(),
                net: net.clone(),
                credential_retry: ws.credential_retry,
            },
            dispatcher.clone(),
        ));
        let s = stop.clone();
        sup.spawn(async move { conn.run(s).await });
    }
    Ok(Runtime {
        admin: auth.clone().admin_router(guard),
        // Its streams end when the app stops being active, or at shutdown (a child of the
        // supervisor's cancellation).
        mcp: mcp.map(|m| m.router(&lark, &auth, store, stop.child_token())),
        public: auth.clone().public_router(),
        auth,
        dispatcher,
        stop: Some(stop),
        secret: Some(secret_kept),
    })
}

/// Keeps the running runtimes equal to the registry's active apps.
pub(super) struct Reconciler {
    pub ws: WebsocketConfig,
    pub auth: AuthSetup,
    pub sup: Supervisor,
    pub store: Db,
    pub net: crate::net::Net,
    pub domain: crate::lark::Domain,
    pub registry: Registry,
    pub switch: AppSwitch,
    pub guard: crate::http::bearer::BearerGuard,
    pub mcp: Option<McpSetup>,
}

impl Reconciler {
    /// One pass: starts the runtimes of newly active apps, stops those of apps no longer
    /// active. The primary is never stopped.
    pub async fn reconcile(&self) -> Result<(), AppsError> {
        let reg = self.registry.clone();
        let (active, refused) = tokio::task::spawn_blocking(move || reg.active_each())
            .await
            .map_err(|e| AppsError::Store(crate::storage::Error::Join(e.to_string())))??;
        for (app_id, e) in &refused {
            error!(app_id = %app_id, error = %e, "App is active but cannot be served: its secret does not open (LARK_CONFIG_ENCRYPTION_KEY?).");
        }
        // An app whose secret was changed (here or, on PostgreSQL, elsewhere) runs again with
        // the new one: its old runtime stops first.
        let stale: Vec<Runtime> = {
            let mut g = write(&self.switch.runtimes);
            let ids: Vec<String> = g
                .iter()
                .filter(|(id, r)| {
                    r.secret.as_ref().is_some_and(|old| {
                        active.iter().any(|a| {
                            &a.app_id == *id && a.app_secret.expose_secret() != old.expose_secret()
                        })
                    })
                })
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter()
                .filter_map(|id| g.remove(id).map(|r| (id.clone(), r)))
                .map(|(id, r)| {
                    info!(app_id = %id, "App's secret changed: its long connection restarts.");
                    r
                })
                .collect()
        };
        self.stop_runtimes(stale);
        let running = self.switch.ids();
        for a in &active {
            if running.contains(&a.app_id) {
                continue;
            }
            match start_runtime(
                &self.ws,
                &self.auth,
                &self.sup,
                &self.store,
                &self.net,
                &self.domain,
                &a.app_id,
                a.app_secret.clone(),
                self.guard.clone(),
                self.mcp.as_ref(),
            ) {
                Ok(rt) => {
                    info!(app_id = %a.app_id, "App is active: its long connection starts.");
                    self.switch.insert(a.app_id.clone(), rt);
                }
                Err(e) => error!(app_id = %a.app_id, error = %e, "Cannot start the app's runtime."),
            }
        }
        let gone: Vec<Runtime> = {
            let mut g = write(&self.switch.runtimes);
            let ids: Vec<String> = g
                .iter()
                .filter(|(id, r)| r.stop.is_some() && !active.iter().any(|a| &a.app_id == *id))
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter()
                .filter_map(|id| g.remove(id).map(|r| (id.clone(), r)))
                .map(|(id, r)| {
                    info!(app_id = %id, "App is no longer active: its long connection stops.");
                    r
                })
                .collect()
        };
        self.stop_runtimes(gone);
        Ok(())
    }

    fn stop_runtimes(&self, gone: Vec<Runtime>) {
        for r in gone {
            if let Some(s) = &r.stop {
                s.cancel();
            }
            // The flow's tasks are the supervisor's (shutdown waits for them); the app's
            // seen-id writer commits what it has and ends.
            let dispatcher = r.dispatcher.clone();
            self.sup.spawn(async move {
                dispatcher.close().await;
            });
        }
    }

    /// The registry's version in the shared store (`None` on redb, or when it cannot be read
    /// now: the next poll tries again, and running apps are kept as they are meanwhile). Warns
    /// once when reading starts failing (not every poll of an outage) and says when it recovers.
    async fn registry_version(&self, failing: &mut bool) -> Option<u64> {
        match self.store.run(Db::apps_version).await {
            Ok(v) => {
                if std::mem::take(failing) {
                    info!("The app registry's version can be read again.");
                }
                v
            }
            Err(e) => {
                if !std::mem::replace(failing, true) {
                    warn!(error = %e, "Cannot read the app registry's version; running apps are kept as they are until it can.");
                }
                None
            }
        }
    }

    /// Reconciles now, then whenever the registry changes (and every [`RECONCILE_EVERY`]),
    /// until shutdown.
    ///
    /// On PostgreSQL the registry is the fleet's: every [`REGISTRY_POLL`] this instance reads
    /// the registry's version (one row, bumped by every write from any instance or the `app`
    /// command) and reconciles when it moved, so each instance opens and closes its own long
    /// connection of an app within a few seconds of the change. A poll rather than
    /// LISTEN/NOTIFY: it needs no dedicated connection and no reconnect logic, a missed
    /// notification cannot exist, and one indexed single-row read per instance every 2 s costs
    /// nothing next to the rest of the fleet's traffic.
    pub async fn run(self) {
        let changed = self.registry.changed();
        let cancel = self.sup.cancellation();
        // Whether this pass follows a change (not the first pass nor the periodic one).
        let mut after_change = false;
        let mut failing = false;
        loop {
            // Read before the pass, so a write made during it is seen by the next poll.
            let seen = self.registry_version(&mut failing).await;
            match self.reconcile().await {
                Ok(()) if after_change => {
                    crate::metrics::get().app_registry_reloads.inc();
                }
                Ok(()) => {}
                Err(e) => {
                    error!(error = %e, "Cannot read the app registry; running apps are kept as they are.");
                }
            }
            after_change = false;
            let since = tokio::time::Instant::now();
            loop {
                let poll = if self.store.is_postgres() {
                    REGISTRY_POLL
                } else {
                    RECONCILE_EVERY
                };
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = changed.notified() => {
                        after_change = true;
                        break;
                    }
                    () = tokio::time::sleep(poll) => {}
                }
                if since.elapsed() >= RECONCILE_EVERY {
                    break;
                }
                if self.store.is_postgres() {
                    let now = self.registry_version(&mut failing).await;
                    if now.is_some() && now != seen {
                        info!(
                            version = now.unwrap_or(0),
                            "The app registry changed in the shared store; reconciling."
                        );
                        after_change = true;
                        break;
                    }
                }
            }
        }
    }
}
