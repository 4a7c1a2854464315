//! Metrics: every `lark_service_*` family, registered once, served as OpenMetrics text on the
//! separate `/metrics` listener (`PROMETHEUS_PORT`).
//!
//! Label sets are bounded: no user, session or event ids, only fixed vocabularies (reason,
//! outcome, state, endpoint group) and the one app id.

use std::sync::{LazyLock, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A counter of one label set, looked up once and kept (cheap to clone; it shares its value with
/// the family's entry): hot paths count through it instead of a label lookup per event.
pub type CounterHandle = Counter;
/// A histogram kept by a hot path (shares its buckets with the registered one).
pub type HistogramHandle = Histogram;

/// `{app_id}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppLabel {
    /// The Lark app id.
    pub app_id: String,
}

/// The `auth_method` of the card-initiated flow: an Authorize card, then the OAuth redirect
/// (the Python deployment's name for it).
pub const AUTH_METHOD_WEBSOCKET_CARD: &str = "websocket_card";
/// The `auth_method` of the card-driven device flow: an Authorize card, then the device
/// authorization grant (`auth.flow = "device"`).
pub const AUTH_METHOD_DEVICE: &str = "device";

/// `{app_id, auth_method}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabel {
    /// The Lark app id.
    pub app_id: String,
    /// How the user authorized: [`AUTH_METHOD_WEBSOCKET_CARD`].
    pub auth_method: &'static str,
}

impl AuthLabel {
    /// The card-initiated flow of `app_id`.
    #[must_use]
    pub fn card(app_id: &str) -> Self {
        Self {
            app_id: app_id.to_owned(),
            auth_method: AUTH_METHOD_WEBSOCKET_CARD,
        }
    }

    /// The card-driven device flow of `app_id` (`device` true), else [`Self::card`].
    #[must_use]
    pub fn flow(app_id: &str, device: bool) -> Self {
        Self {
            app_id: app_id.to_owned(),
            auth_method: if device {
                AUTH_METHOD_DEVICE
            } else {
                AUTH_METHOD_WEBSOCKET_CARD
            },
        }
    }
}

/// `{app_id, auth_method, reason}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthFailureLabel {
    /// The Lark app id.
    pub app_id: String,
    /// How the user authorized: [`AUTH_METHOD_WEBSOCKET_CARD`].
    pub auth_method: &'static str,
    /// A failure reason from the fixed list ([`crate::storage::FailureReason`]).
    pub reason: &'static str,
}

impl AuthFailureLabel {
    /// A failure of the card-initiated flow of `app_id`.
    #[must_use]
    pub fn card(app_id: &str, reason: &'static str) -> Self {
        Self {
            app_id: app_id.to_owned(),
            auth_method: AUTH_METHOD_WEBSOCKET_CARD,
            reason,
        }
    }

    /// A failure of the device flow of `app_id` (`device` true), else [`Self::card`].
    #[must_use]
    pub fn flow(app_id: &str, device: bool, reason: &'static str) -> Self {
        Self {
            auth_method: AuthLabel::flow(app_id, device).auth_method,
            app_id: app_id.to_owned(),
            reason,
        }
    }
}

/// `{app_id, outcome}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppOutcomeLabel {
    /// The Lark app id.
    pub app_id: String,
    /// An outcome from the family's fixed list.
    pub outcome: &'static str,
}

impl AppOutcomeLabel {
    /// `outcome` for `app_id`.
    #[must_use]
    pub fn new(app_id: &str, outcome: &'static str) -> Self {
        Self {
            app_id: app_id.to_owned(),
            outcome,
        }
    }
}

/// Outcomes of `websocket_reconnect_total`: a redial started, completed its handshake, or
/// failed.
pub const RECONNECT_OUTCOMES: [&str; 3] = ["attempt", "success", "failure"];

/// Outcomes of `token_refresh_total`: the Python deployment's success and failure, and ours:
/// `reauth_required` (the platform refused the refresh token) and `unknown` (the answer was
/// lost; the refresh is in doubt).
pub const REFRESH_OUTCOMES: [&str; 4] = ["success", "failure", "reauth_required", "unknown"];

/// `{outcome}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// success, failure, reauth_required, unknown (the answer to a refresh was lost), …
    pub outcome: &'static str,
}

/// `{state}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// A session state.
    pub state: &'static str,
}

/// `{kind}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// A frame or event kind, or a sweep removal kind.
    pub kind: &'static str,
}

/// `{surface}`: which bearer-protected surface a request was for.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SurfaceLabel {
    /// admin or mcp.
    pub surface: &'static str,
}

/// `{source}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    /// websocket or http.
    pub source: &'static str,
}

/// `{endpoint, outcome}` for Lark OpenAPI calls.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabel {
    /// Endpoint group: token, oauth, authen, contact, im, apaas, ws_endpoint.
    pub endpoint: &'static str,
    /// success, api_error, transport_error, rate_limited.
    pub outcome: &'static str,
}

/// `{endpoint}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    /// Endpoint group.
    pub endpoint: &'static str,
}

/// `{worker}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    /// Worker name.
    pub worker: &'static str,
}

fn latency() -> Histogram {
    // 0.5 ms … ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Request → completion of an authorization: the Python deployment's buckets.
pub const AUTH_DURATION_BUCKETS: [f64; 7] = [1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0];

fn auth_duration() -> Histogram {
    Histogram::new(AUTH_DURATION_BUCKETS)
}

/// Every metric of the service.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// 1 while the long connection is up.
    pub ws_connection_status: Family<AppLabel, Gauge>,
    /// Reconnect attempts (ours, kept beside `ws_reconnect`).
    pub ws_reconnects: Counter,
    /// Redials by outcome: attempt, success (handshake done), failure.
    pub ws_reconnect: Family<AppOutcomeLabel, Counter>,
    /// 1 while the long connection is degraded (more failures in a row than the retry limit;
    /// still redialing).
    pub ws_degraded: Family<AppLabel, Gauge>,
    /// 1 while the platform refuses the app credentials (dialing paused).
    pub ws_credentials_rejected: Family<AppLabel, Gauge>,
    /// Event handlers running now (bounded by `websocket.max_concurrent_handlers`).
    pub event_handlers_inflight: Gauge,
    /// Events answered as failed (for redelivery) because the handler limit was reached.
    pub events_overloaded: Counter,
    /// Handler failures (within the ACK window: redelivered; after it: lost, logged).
    pub event_handler_failures: Counter,
    /// Frames received by kind (ping, pong, event, card, other).
    pub ws_frames_received: Family<KindLabel, Counter>,
    /// Events received by source.
    pub events_received: Family<SourceLabel, Counter>,
    /// Events dropped as duplicates.
    pub events_deduplicated: Counter,
    /// Events another instance of the fleet was handling: answered "redeliver".
    pub events_claimed_elsewhere: Counter,
    /// Events delivered again while this instance was still handling their first delivery.
    pub events_in_flight: Counter,
    /// Event receipt → ACK sent.
    pub event_ack_duration: Histogram,
    /// Authorization requests accepted (card sent or reused).
    pub auth_requests: Counter,
    /// Authorization requests refused by the rate limit.
    pub auth_rate_limited: Counter,
    /// Authorization sessions created (a card sent).
    pub auth_session: Family<AuthLabel, Counter>,
    /// Pending authorization sessions (from the store's per-state counts).
    pub auth_session_active: Family<AppLabel, Gauge>,
    /// Pending sessions the sweep expired.
    pub auth_session_expired: Family<AppLabel, Counter>,
    /// Completed authorizations.
    pub auth_success: Family<AuthLabel, Counter>,
    /// Failed authorizations by reason.
    pub auth_failure: Family<AuthFailureLabel, Counter>,
    /// Request → completed.
    pub auth_duration: Family<AuthLabel, Histogram, fn() -> Histogram>,
    /// Token refreshes by outcome ([`REFRESH_OUTCOMES`]).
    pub token_refresh: Family<AppOutcomeLabel, Counter>,
    /// Users whose stored token the service keeps fresh (it has a refresh token and does not
    /// need a new authorization).
    pub token_active_count: Family<AppLabel, Gauge>,
    /// Sessions by state (updated by the sweep).
    pub sessions: Family<StateLabel, Gauge>,
    /// Sweep runs.
    pub sweep_runs: Counter,
    /// Records the sweep removed or changed, by kind (expired, purged, events).
    pub sweep_removed: Family<KindLabel, Counter>,
    /// Sweep duration.
    pub sweep_duration: Histogram,
    /// Unix time of the last successful sweep.
    pub sweep_last_success: Gauge,
    /// Lark OpenAPI calls.
    pub lark_api_requests: Family<ApiLabel, Counter>,
    /// Lark OpenAPI latency.
    pub lark_api_duration: Family<EndpointLabel, Histogram, fn() -> Histogram>,
    /// Store file size.
    pub store_size_bytes: Gauge,
    /// Store commit latency.
    pub store_commit_duration: Histogram,
    /// Worker restarts after a failure or panic.
    pub worker_restarts: Family<WorkerLabel, Counter>,
    /// Backups by outcome.
    pub backups: Family<OutcomeLabel, Counter>,
    /// Requests refused for a missing or wrong bearer token, by surface.
    pub bearer_failures: Family<SurfaceLabel, Counter>,
    /// Requests refused because their peer failed the bearer check too often, by surface.
    pub bearer_throttled: Family<SurfaceLabel, Counter>,
    /// Session rows upserted or deleted in PostgreSQL by the export.
    pub export_rows: Counter,
    /// Failed export batches (PostgreSQL unreachable or refusing).
    pub export_errors: Counter,
    /// Changes not yet exported (last change seq minus the export cursor).
    pub export_lag: Gauge,
    /// Webhook deliveries (one event to one URL) by outcome: success, retry (5xx, timeout,
    /// connection error: tried again later), rejected (another 4xx/3xx answer: tried again
    /// later too), dead (an event out of attempts).
    pub webhook_deliveries: Family<OutcomeLabel, Counter>,
    /// Webhook events not yet delivered to every URL.
    pub webhook_outbox_pending: Gauge,
    /// Webhook events kept as dead (out of attempts).
    pub webhook_outbox_dead: Gauge,
    /// On PostgreSQL: instances of the fleet whose heartbeat is live, this one included, as
    /// of this instance's last heartbeat (0 on redb).
    pub fleet_instances_live: Gauge,
    /// PostgreSQL transactions run again after a serialization failure or a deadlock.
    pub store_retries: Counter,
    /// Times the running apps were brought in line with the app registry after it changed
    /// (through this instance, or on PostgreSQL through any instance or the `app` command).
    pub app_registry_reloads: Counter,
}

/// The outcomes of `webhook_deliveries`.
pub const WEBHOOK_OUTCOMES: [&str; 4] = ["success", "retry", "rejected", "dead"];

fn register_fleet_metrics(m: &Metrics, r: &mut Registry) {
    r.register(
        "fleet_instances_live",
        "Instances of the fleet with a live heartbeat (PostgreSQL backend; 0 on redb)",
        m.fleet_instances_live.clone(),
    );
    r.register(
        "store_retries",
        "PostgreSQL transactions run again after a serialization failure or deadlock",
        m.store_retries.clone(),
    );
    r.register(
        "app_registry_reloads",
        "Times the running apps were reconciled with the app registry after it changed",
        m.app_registry_reloads.clone(),
    );
    let _ = m.worker_restarts.get_or_create(&WorkerLabel {
        worker: "fleet_heartbeat",
    });
}

fn register_webhook_metrics(m: &Metrics, r: &mut Registry) {
    r.register(
        "webhook_deliveries",
        "Webhook deliveries (one event to one URL), by outcome",
        m.webhook_deliveries.clone(),
    );
    r.register(
        "webhook_outbox_pending",
        "Webhook events not yet delivered to every URL",
        m.webhook_outbox_pending.clone(),
    );
    r.register(
        "webhook_outbox_dead",
        "Webhook events kept as dead after their last attempt",
        m.webhook_outbox_dead.clone(),
    );
    for outcome in WEBHOOK_OUTCOMES {
        let _ = m
            .webhook_deliveries
            .get_or_create(&OutcomeLabel { outcome });
    }
    for worker in ["webhooks", "expiry_reminders"] {
        let _ = m.worker_restarts.get_or_create(&WorkerLabel { worker });
    }
}

impl Metrics {
    fn new() -> Self {
        let m = Self {
            registry: Mutex::new(Registry::with_prefix("lark_service")),
            ws_connection_status: Family::default(),
            ws_reconnects: Counter::default(),
            ws_reconnect: Family::default(),
            ws_degraded: Family::default(),
            ws_credentials_rejected: Family::default(),
            event_handlers_inflight: Gauge::default(),
            events_overloaded: Counter::default(),
            event_handler_failures: Counter::default(),
            ws_frames_received: Family::default(),
            events_received: Family::default(),
            events_deduplicated: Counter::default(),
            events_claimed_elsewhere: Counter::default(),
            events_in_flight: Counter::default(),
            event_ack_duration: latency(),
            auth_requests: Counter::default(),
            auth_rate_limited: Counter::default(),
            auth_session: Family::default(),
            auth_session_active: Family::default(),
            auth_session_expired: Family::default(),
            auth_success: Family::default(),
            auth_failure: Family::default(),
            auth_duration: Family::new_with_constructor(auth_duration),
            token_refresh: Family::default(),
            token_active_count: Family::default(),
            sessions: Family::default(),
            sweep_runs: Counter::default(),
            sweep_removed: Family::default(),
            sweep_duration: latency(),
            sweep_last_success: Gauge::default(),
            lark_api_requests: Family::default(),
            lark_api_duration: Family::new_with_constructor(latency),
            store_size_bytes: Gauge::default(),
            store_commit_duration: latency(),
            worker_restarts: Family::default(),
            backups: Family::default(),
            bearer_failures: Family::default(),
            bearer_throttled: Family::default(),
            export_rows: Counter::default(),
            export_errors: Counter::default(),
            export_lag: Gauge::default(),
            webhook_deliveries: Family::default(),
            webhook_outbox_pending: Gauge::default(),
            webhook_outbox_dead: Gauge::default(),
            fleet_instances_live: Gauge::default(),
            store_retries: Counter::default(),
            app_registry_reloads: Counter::default(),
        };
        {
            let mut r = m
                .registry
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            r.register(
                "websocket_connection_status",
                "1 while the long connection is up",
                m.ws_connection_status.clone(),
            );
            r.register(
                "websocket_reconnects",
                "Long connection reconnect attempts",
                m.ws_reconnects.clone(),
            );
            r.register(
                "websocket_reconnect",
                "Long connection redials after the first dial, by outcome (attempt, success: handshake done, failure)",
                m.ws_reconnect.clone(),
            );
            r.register(
                "websocket_degraded",
                "1 while the long connection has failed more often in a row than the retry limit (it keeps redialing)",
                m.ws_degraded.clone(),
            );
            r.register(
                "websocket_credentials_rejected",
                "1 while the platform refuses the app credentials and dialing is paused",
                m.ws_credentials_rejected.clone(),
            );
            r.register(
                "event_handlers_inflight",
                "Event handlers running now",
                m.event_handlers_inflight.clone(),
            );
            r.register(
                "events_overloaded",
                "Events answered as failed (the platform redelivers) because the handler limit was reached",
                m.events_overloaded.clone(),
            );
            r.register(
                "event_handler_failures",
                "Event handler failures (inside the ACK window the platform redelivers; after it the event is logged and counted here only)",
                m.event_handler_failures.clone(),
            );
            r.register(
                "websocket_frames_received",
                "Frames received on the long connection, by kind",
                m.ws_frames_received.clone(),
            );
            r.register(
                "events_received",
                "Events received, by source",
                m.events_received.clone(),
            );
            r.register(
                "events_deduplicated",
                "Events dropped because their event id was already seen",
                m.events_deduplicated.clone(),
            );
            r.register(
                "events_claimed_elsewhere",
                "Events another instance of the fleet was handling (shared store), answered as failed so the platform redelivers them",
                m.events_claimed_elsewhere.clone(),
            );
            r.register(
                "events_in_flight",
                "Events delivered again while their first delivery was still being handled here, answered as failed so the platform redelivers them once that handling has ended",
                m.events_in_flight.clone(),
            );
            r.register(
                "event_ack_duration_seconds",
                "From receiving an event frame to sending its ACK",
                m.event_ack_duration.clone(),
            );
            r.register(
                "auth_requests",
                "Authorization requests accepted",
                m.auth_requests.clone(),
            );
            r.register(
                "auth_rate_limited",
                "Authorization requests refused by the per-user rate limit",
                m.auth_rate_limited.clone(),
            );
            r.register(
                "auth_session",
                "Authorization sessions created (a card sent)",
                m.auth_session.clone(),
            );
            r.register(
                "auth_session_active",
                "Pending authorization sessions",
                m.auth_session_active.clone(),
            );
            r.register(
                "auth_session_expired",
                "Pending authorization sessions the sweep expired",
                m.auth_session_expired.clone(),
            );
            r.register(
                "auth_success",
                "Authorizations completed",
                m.auth_success.clone(),
            );
            r.register(
                "auth_failure",
                "Authorizations failed, by reason",
                m.auth_failure.clone(),
            );
            r.register(
                "auth_duration_seconds",
                "From authorization request to completion",
                m.auth_duration.clone(),
            );
            r.register(
                "token_refresh",
                "User token refreshes, by outcome",
                m.token_refresh.clone(),
            );
            r.register(
                "token_active_count",
                "Users with a stored token the service keeps fresh (a refresh token, no new authorization needed)",
                m.token_active_count.clone(),
            );
            r.register(
                "sessions",
                "Sessions in the store, by state",
                m.sessions.clone(),
            );
            r.register("sweep_runs", "TTL sweep runs", m.sweep_runs.clone());
            r.register(
                "sweep_removed",
                "Records the sweep expired or deleted, by kind",
                m.sweep_removed.clone(),
            );
            r.register(
                "sweep_duration_seconds",
                "TTL sweep duration",
                m.sweep_duration.clone(),
            );
            r.register(
                "sweep_last_success_timestamp_seconds",
                "Unix time of the last successful sweep",
                m.sweep_last_success.clone(),
            );
            r.register(
                "lark_api_requests",
                "Lark OpenAPI calls, by endpoint group and outcome",
                m.lark_api_requests.clone(),
            );
            r.register(
                "lark_api_duration_seconds",
                "Lark OpenAPI call latency, by endpoint group",
                m.lark_api_duration.clone(),
            );
            r.register(
                "store_size_bytes",
                "Size of the store file",
                m.store_size_bytes.clone(),
            );
            r.register(
                "store_commit_duration_seconds",
                "Store write transaction commit latency",
                m.store_commit_duration.clone(),
            );
            r.register(
                "worker_restarts",
                "Background worker restarts after a failure",
                m.worker_restarts.clone(),
            );
            r.register("backups", "Backups taken, by outcome", m.backups.clone());
            r.register(
                "auth_bearer_failures",
                "Requests refused for a missing or wrong bearer token, by surface",
                m.bearer_failures.clone(),
            );
            r.register(
                "auth_bearer_throttled",
                "Requests refused 429 because their peer failed the bearer check too often",
                m.bearer_throttled.clone(),
            );
            r.register(
                "export_rows",
                "Session rows exported to PostgreSQL (upserts and deletes)",
                m.export_rows.clone(),
            );
            r.register(
                "export_errors",
                "Failed PostgreSQL export batches",
                m.export_errors.clone(),
            );
            r.register(
                "export_lag",
                "Session changes not yet exported to PostgreSQL",
                m.export_lag.clone(),
            );
            register_webhook_metrics(&m, &mut r);
            register_fleet_metrics(&m, &mut r);
        }
        m.zero_known_labels();
        m
    }

    /// Creates every child of the fixed label vocabularies at zero, so each series exists
    /// from the start and `rate()`/`increase()` see the first event.
    fn zero_known_labels(&self) {
        for kind in ["ping", "pong", "event", "card", "other"] {
            let _ = self.ws_frames_received.get_or_create(&KindLabel { kind });
        }
        for source in ["websocket", "http"] {
            let _ = self.events_received.get_or_create(&SourceLabel { source });
        }
        for s in crate::storage::SessionState::ALL {
            let _ = self
                .sessions
                .get_or_create(&StateLabel { state: s.as_str() });
        }
        for kind in ["expired", "purged", "events"] {
            let _ = self.sweep_removed.get_or_create(&KindLabel { kind });
        }
        for endpoint in [
            "token",
            "ws_endpoint",
            "oauth",
            "authen",
            "contact",
            "im",
            "apaas",
        ] {
            let _ = self
                .lark_api_duration
                .get_or_create(&EndpointLabel { endpoint });
            for outcome in ["success", "api_error", "transport_error", "rate_limited"] {
                let _ = self
                    .lark_api_requests
                    .get_or_create(&ApiLabel { endpoint, outcome });
            }
        }
        for worker in [
            "ttl_sweep",
            "token_refresh",
            "user_sync",
            "backup",
            "long_connection",
        ] {
            let _ = self.worker_restarts.get_or_create(&WorkerLabel { worker });
        }
        for outcome in ["success", "failure"] {
            let _ = self.backups.get_or_create(&OutcomeLabel { outcome });
        }
        for surface in ["admin", "mcp"] {
            let _ = self
                .bearer_failures
                .get_or_create(&SurfaceLabel { surface });
            let _ = self
                .bearer_throttled
                .get_or_create(&SurfaceLabel { surface });
        }
    }

    /// Creates every `{app_id, …}` child of `app_id` (the configured app) at zero, as
    /// [`Self::zero_known_labels`] does for the label sets without an app. Counters keep their
    /// value if they exist; gauges are not reset.
    pub fn zero_app(&self, app_id: &str) {
        let app = AppLabel {
            app_id: app_id.to_owned(),
        };
        let card = AuthLabel::card(app_id);
        for outcome in RECONNECT_OUTCOMES {
            let _ = self
                .ws_reconnect
                .get_or_create(&AppOutcomeLabel::new(app_id, outcome));
        }
        let _ = self.auth_session.get_or_create(&card);
        let _ = self.auth_session_active.get_or_create(&app);
        let _ = self.auth_session_expired.get_or_create(&app);
        let _ = self.auth_success.get_or_create(&card);
        let _ = self.auth_duration.get_or_create(&card);
        for r in crate::storage::FailureReason::ALL {
            let _ = self
                .auth_failure
                .get_or_create(&AuthFailureLabel::card(app_id, r.as_str()));
        }
        for outcome in REFRESH_OUTCOMES {
            let _ = self
                .token_refresh
                .get_or_create(&AppOutcomeLabel::new(app_id, outcome));
        }
        let _ = self.token_active_count.get_or_create(&app);
    }

    /// OpenMetrics text of every family.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let m = Metrics::new();
    crate::storage::set_commit_observer(|secs| get().store_commit_duration.observe(secs));
    crate::storage::postgres::set_retry_observer(|| {
        get().store_retries.inc();
    });
    m
});

/// The process-wide metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

/// Refreshes the gauges that are read from the store (sessions by state, pending sessions and
/// active tokens of `app_id` — the configured app; none if empty — and the file size). Cheap on
/// any store size: the per-state counts are kept by the store as it writes (no session is
/// read), and the active tokens are the length of the refresh-due index.
pub fn refresh_store_gauges(store: &crate::storage::Db, app_id: &str) {
    let m = get();
    let app = (!app_id.is_empty()).then(|| AppLabel {
        app_id: app_id.to_owned(),
    });
    if let Ok(by_state) = store.count_sessions_by_state() {
        for (state, n) in by_state {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            m.sessions
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(n);
            if let (crate::storage::SessionState::Pending, Some(app)) = (state, &app) {
                m.auth_session_active.get_or_create(app).set(n);
            }
        }
    }
    if let Some(app) = &app {
        if let Ok(n) = store.count_active_tokens() {
            m.token_active_count
                .get_or_create(app)
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
    // PostgreSQL has no store file: the gauge is left at zero there.
    if let Some(Ok(meta)) = store.path().map(std::fs::metadata) {
        m.store_size_bytes
            .set(i64::try_from(meta.len()).unwrap_or(i64::MAX));
    }
}

/// Rewrites OpenMetrics text as Prometheus text format 0.0.4, for scrapers and tools (such as
/// `promtool check metrics`) that do not ask for OpenMetrics: counter families are named with
/// their `_total` suffix and the `# EOF` line is dropped.
#[must_use]
pub fn openmetrics_to_text004(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines() {
        if line == "# EOF" {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// The `/metrics` router for the separate listener: OpenMetrics when the scraper accepts it
/// (Prometheus does), Prometheus text 0.0.4 otherwise.
pub fn router() -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(|headers: axum::http::HeaderMap| async move {
            let wants_om = headers
                .get(axum::http::header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.contains("application/openmetrics-text"));
            if wants_om {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    get().encode(),
                )
            } else {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    openmetrics_to_text004(&get().encode()),
                )
            }
        }),
    )
}

/// The exported family names the alert rules and the dashboard rely on.
pub const EXPORTED: &[&str] = &[
    "lark_service_websocket_connection_status",
    "lark_service_websocket_reconnects_total",
    "lark_service_websocket_reconnect_total",
    "lark_service_websocket_degraded",
    "lark_service_websocket_credentials_rejected",
    "lark_service_event_handlers_inflight",
    "lark_service_events_overloaded_total",
    "lark_service_event_handler_failures_total",
    "lark_service_websocket_frames_received_total",
    "lark_service_events_received_total",
    "lark_service_events_deduplicated_total",
    "lark_service_events_claimed_elsewhere_total",
    "lark_service_events_in_flight_total",
    "lark_service_event_ack_duration_seconds",
    "lark_service_auth_requests_total",
    "lark_service_auth_rate_limited_total",
    "lark_service_auth_session_total",
    "lark_service_auth_session_active",
    "lark_service_auth_session_expired_total",
    "lark_service_auth_success_total",
    "lark_service_auth_failure_total",
    "lark_service_auth_duration_seconds",
    "lark_service_token_refresh_total",
    "lark_service_token_active_count",
    "lark_service_sessions",
    "lark_service_sweep_runs_total",
    "lark_service_sweep_removed_total",
    "lark_service_sweep_duration_seconds",
    "lark_service_sweep_last_success_timestamp_seconds",
    "lark_service_lark_api_requests_total",
    "lark_service_lark_api_duration_seconds",
    "lark_service_store_size_bytes",
    "lark_service_store_commit_duration_seconds",
    "lark_service_worker_restarts_total",
    "lark_service_backups_total",
    "lark_service_export_rows_total",
    "lark_service_export_errors_total",
    "lark_service_export_lag",
    "lark_service_fleet_instances_live",
    "lark_service_store_retries_total",
    "lark_service_app_registry_reloads_total",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_family_is_exported_under_its_name() {
        let m = get();
        m.zero_app("cli_x");
        m.auth_failure
            .get_or_create(&AuthFailureLabel::card("cli_x", "code_expired"))
            .inc();
        m.auth_duration
            .get_or_create(&AuthLabel::card("cli_x"))
            .observe(12.0);
        let app = AppLabel {
            app_id: "cli_x".into(),
        };
        m.ws_connection_status.get_or_create(&app).set(1);
        m.ws_degraded.get_or_create(&app).set(0);
        m.ws_credentials_rejected.get_or_create(&app).set(0);
        let text = m.encode();
        for name in EXPORTED {
            let family = name.trim_end_matches("_total");
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{family} missing:\n{text}"
            );
        }
        assert!(
            text.contains(
                "lark_service_auth_failure_total{app_id=\"cli_x\",auth_method=\"websocket_card\",reason=\"code_expired\"} "
            ),
            "{text}"
        );
        // The Python deployment's label sets, present from zero_app on.
        for series in [
            "lark_service_websocket_reconnect_total{app_id=\"cli_x\",outcome=\"attempt\"} ",
            "lark_service_websocket_reconnect_total{app_id=\"cli_x\",outcome=\"success\"} ",
            "lark_service_websocket_reconnect_total{app_id=\"cli_x\",outcome=\"failure\"} ",
            "lark_service_auth_session_total{app_id=\"cli_x\",auth_method=\"websocket_card\"} ",
            "lark_service_auth_session_active{app_id=\"cli_x\"} ",
            "lark_service_auth_session_expired_total{app_id=\"cli_x\"} ",
            "lark_service_auth_success_total{app_id=\"cli_x\",auth_method=\"websocket_card\"} ",
            "lark_service_auth_failure_total{app_id=\"cli_x\",auth_method=\"websocket_card\",reason=\"missing_code\"} ",
            "lark_service_auth_failure_total{app_id=\"cli_x\",auth_method=\"websocket_card\",reason=\"user_rejected\"} ",
            "lark_service_auth_failure_total{app_id=\"cli_x\",auth_method=\"websocket_card\",reason=\"unknown_error\"} ",
            "lark_service_token_refresh_total{app_id=\"cli_x\",outcome=\"success\"} ",
            "lark_service_token_refresh_total{app_id=\"cli_x\",outcome=\"failure\"} ",
            "lark_service_token_active_count{app_id=\"cli_x\"} ",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
        // Exactly the Python deployment's buckets: 12 s lands in le=15, not below.
        let buckets = || {
            text.lines().filter(|l| {
                l.starts_with("lark_service_auth_duration_seconds_bucket{")
                    && l.contains("app_id=\"cli_x\",auth_method=\"websocket_card\"")
            })
        };
        let bucket = |le: &str| {
            buckets()
                .find(|l| l.contains(&format!("le=\"{le}\"")))
                .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        };
        assert_eq!(bucket("10.0"), Some(0), "{text}");
        assert_eq!(bucket("15.0"), Some(1), "{text}");
        let les: Vec<&str> = buckets()
            .filter_map(|l| l.split("le=\"").nth(1)?.split('"').next())
            .collect();
        assert_eq!(
            les,
            ["1.0", "2.5", "5.0", "10.0", "15.0", "30.0", "60.0", "+Inf"]
        );
        assert!(text.ends_with("# EOF\n"));
    }

    /// Pending sessions and active tokens of the configured app come from the store's kept
    /// counts; an empty app id (none configured) sets no app gauge.
    #[test]
    fn store_gauges_count_pending_sessions_and_active_tokens_of_the_app() {
        use crate::storage::{AuthSession, Key, Keyring, SessionState, Store, StoreOptions};
        let store = Store::open_in_memory(
            Keyring::new(Key::from_bytes(&[4; 32]), vec![]),
            StoreOptions::default(),
        )
        .unwrap();
        let mut done = AuthSession::new_pending("cli_gauges", "a", vec![], 0, 100);
        done.state = SessionState::Completed;
        let pending = AuthSession::new_pending("cli_gauges", "b", vec![], 0, 100);
        let pending2 = AuthSession::new_pending("cli_gauges", "c", vec![], 0, 100);
        store.put_sessions(&[done, pending, pending2]).unwrap();
        store
            .put_token(&crate::storage::UserToken {
                app_id: "cli_gauges".into(),
                user_id: "a".into(),
                open_id: None,
                access_token: "at".to_owned().into(),
                refresh_token: Some("rt".to_owned().into()),
                expires_at: 10,
                refresh_expires_at: None,
                refresh_due_at: 5,
                scopes: vec![],
                obtained_at: 1,
                session_id: None,
                needs_reauth: false,
                refresh_in_doubt_since: None,
            })
            .unwrap();
        let app = AppLabel {
            app_id: "cli_gauges".into(),
        };
        refresh_store_gauges(&store.clone().into(), "");
        let text = get().encode();
        assert!(!text.contains("app_id=\"\""), "{text}");
        refresh_store_gauges(&store.clone().into(), "cli_gauges");
        let m = get();
        assert_eq!(m.auth_session_active.get_or_create(&app).get(), 2);
        assert_eq!(m.token_active_count.get_or_create(&app).get(), 1);
    }

    #[test]
    fn text_format_names_counters_with_total() {
        let om =
            "# HELP a_b Things.\n# TYPE a_b counter\na_b_total 3\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_text004(om),
            "# HELP a_b_total Things.\n# TYPE a_b_total counter\na_b_total 3\n# TYPE g gauge\ng 1\n"
        );
    }

    #[test]
    fn the_monitoring_assets_use_only_exported_names() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/monitoring");
        for f in ["alert-rules.yaml", "grafana-dashboard.json"] {
            let text = std::fs::read_to_string(root.join(f)).unwrap();
            let mut used = 0;
            for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                // Alert group names (lark_service_auth_alerts, …) are not metrics.
                if word.ends_with("_alerts") {
                    continue;
                }
                if let Some(rest) = word.strip_prefix("lark_service_") {
                    used += 1;
                    let base = ["_bucket", "_sum", "_count"]
                        .iter()
                        .fold(word, |w, s| w.strip_suffix(s).unwrap_or(w));
                    assert!(
                        EXPORTED.contains(&word) || EXPORTED.contains(&base),
                        "{f} uses {word} ({rest}), which is not exported"
                    );
                }
            }
            assert!(used > 5, "{f} uses too few metrics");
        }
    }
}
