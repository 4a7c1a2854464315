//! Serving from PostgreSQL: opening the shared store, refusing at start what only the redb
//! store has, and this instance's name among the fleet's (its lease holder id).

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::error::DaemonError;
use crate::config::Config;
use crate::http::fleet::FleetHealth;
use crate::storage::postgres::{InstanceRow, PgOptions, PgStore, RotationCursor, RotationStep};
use crate::storage::{Db, Error};
use crate::workers::{BoxError, SharedClock, Worker, WorkerState};

/// Opens the PostgreSQL store at `url` (off the async threads). Every feature of the service
/// is served on PostgreSQL (webhooks, reminders, backups, key rotation, the app registry, the
/// device flow), each shared by the fleet (README "Choosing a backend").
///
/// # Errors
/// A bad key, an unreachable or newer database.
pub async fn open_postgres(cfg: &Config, url: &SecretString) -> Result<Db, DaemonError> {
    let ring = cfg.keyring()?;
    let net = crate::net::Net::new(&cfg.network.net_options())
        .map_err(|e| DaemonError::Network(e.to_string()))?;
    let url = url.expose_secret().to_owned();
    let opts = PgOptions {
        terminal_retention: cfg.session_retention,
        change_feed: cfg.export_postgres_url.is_some(),
        ..PgOptions::default()
    };
    let store = tokio::task::spawn_blocking(move || PgStore::open(&url, &net, ring, opts))
        .await
        .map_err(|e| Error::Join(e.to_string()))??;
    info!(
        key = %store.active_key_id(),
        "Serving from PostgreSQL (storage.backend = \"postgres\"), shared by the fleet."
    );
    Ok(store.into())
}

/// This instance's name among the fleet's, as the leases record it: host name, process id and
/// a random part (two processes of one host, or a pid reused after a restart, differ).
#[must_use]
pub fn holder_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    format!(
        "{host}/{}/{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// A singleton worker of the fleet: its unit runs only on the instance holding the lease
/// named after it (the leader); the others (followers) look again every `every`. The lease
/// lasts a few units (`ttl`), is renewed before each unit, and passes to a follower when its
/// leader stops renewing it (a crash, a partition). `/workers` shows `leader` or `follower`.
pub struct Leased<W> {
    inner: W,
    store: Db,
    holder: String,
    lease: String,
    ttl: Duration,
    every: Duration,
    clock: SharedClock,
    leader: bool,
}

impl<W: Worker> Leased<W> {
    /// `inner` under the lease `worker/{name}`, held `ttl` at a time by `holder`; followers
    /// try again every `every`.
    pub fn new(
        inner: W,
        store: Db,
        holder: &str,
        ttl: Duration,
        every: Duration,
        clock: SharedClock,
    ) -> Self {
        let lease = format!("worker/{}", inner.name());
        Self {
            inner,
            store,
            holder: holder.to_owned(),
            lease,
            ttl,
            every,
            clock,
            leader: false,
        }
    }

    /// The TTL of a singleton worker's lease running every `every`: three units, at least 10 s.
    #[must_use]
    pub fn ttl_for(every: Duration) -> Duration {
        every.saturating_mul(3).max(Duration::from_secs(10))
    }

    /// Renews (as leader) or takes the lease; true if this instance holds it on return.
    fn hold(&self) -> impl std::future::Future<Output = Result<bool, Error>> + Send + 'static {
        let (name, holder) = (self.lease.clone(), self.holder.clone());
        let ttl = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let now = self.clock.now_ms();
        let leader = self.leader;
        let store = self.store.clone();
        async move {
            store
                .run(move |s| {
                    if leader && s.renew_lease(&name, &holder, ttl, now)? {
                        return Ok(true);
                    }
                    s.try_acquire_lease(&name, &holder, ttl, now)
                })
                .await
        }
    }
}

impl<W: Worker> Worker for Leased<W> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn status(&self) -> Option<String> {
        let role = if self.leader { "leader" } else { "follower" };
        Some(match self.inner.status() {
            Some(s) if self.leader => format!("{role}; {s}"),
            _ => role.to_owned(),
        })
    }

    async fn work(&mut self, must_exit: &CancellationToken) -> Result<WorkerState, BoxError> {
        // Fail closed: a store that cannot say who leads makes this instance a follower.
        let held = self.hold().await;
        let was = self.leader;
        self.leader = matches!(held, Ok(true));
        if self.leader != was {
            info!(worker = self.inner.name(), holder = %self.holder, leader = self.leader, "Singleton worker role changed.");
        }
        held?;
        if !self.leader {
            return Ok(WorkerState::Throttled(self.every.min(self.ttl)));
        }
        let state = self.inner.work(must_exit).await?;
        if must_exit.is_cancelled() {
            let (name, holder) = (self.lease.clone(), self.holder.clone());
            let _ = self
                .store
                .run(move |s| s.release_lease(&name, &holder))
                .await;
            self.leader = false;
        }
        // A leader never waits past its lease: it renews before it lapses.
        Ok(match state {
            WorkerState::Throttled(d) => WorkerState::Throttled(d.min(self.ttl / 3)),
            WorkerState::Idle => WorkerState::Throttled(self.ttl / 3),
            other => other,
        })
    }
}

/// How often each instance writes its heartbeat row.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

/// An instance is live while its heartbeat is younger than this many intervals.
pub const LIVE_INTERVALS: u32 = 3;

/// This instance's heartbeat in the fleet's table (`ls_instances`): upserted every `every`,
/// deleted at a clean stop. Each beat also counts the live instances (seen within
/// [`LIVE_INTERVALS`] intervals), for `/readyz`, the `lark_service_fleet_instances_live` gauge
/// and `/workers`.
pub struct Heartbeat {
    store: PgStore,
    me: InstanceRow,
    every: Duration,
    clock: SharedClock,
    health: FleetHealth,
    live: Option<u64>,
    /// A first beat was tried (later units wait an interval first).
    beaten: bool,
}

impl Heartbeat {
    /// The heartbeat of `holder` on `store`, every `every`, reported to `health`.
    #[must_use]
    pub fn new(
        store: PgStore,
        holder: &str,
        every: Duration,
        clock: SharedClock,
        health: FleetHealth,
    ) -> Self {
        let host = holder.split('/').next().unwrap_or_default().to_owned();
        let now = clock.now_ms();
        Self {
            store,
            me: InstanceRow {
                holder: holder.to_owned(),
                host,
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                started_at: now,
                last_seen: now,
            },
            every,
            clock,
            health,
            live: None,
            beaten: false,
        }
    }

    /// The window within which an instance counts as live.
    #[must_use]
    pub fn live_window(every: Duration) -> Duration {
        every.saturating_mul(LIVE_INTERVALS)
    }

    async fn beat(&mut self) -> Result<u64, Error> {
        let mut me = self.me.clone();
        me.last_seen = self.clock.now_ms();
        let within = u64::try_from(Self::live_window(self.every).as_millis()).unwrap_or(u64::MAX);
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.heartbeat(&me, within))
            .await
            .map_err(|e| Error::Join(e.to_string()))?
    }

    async fn leave(&self) {
        let (store, holder) = (self.store.clone(), self.me.holder.clone());
        let gone = tokio::task::spawn_blocking(move || store.forget_instance(&holder));
        // Bounded: a store that does not answer must not hold the shutdown.
        match tokio::time::timeout(Duration::from_secs(2), gone).await {
            Ok(Ok(Ok(_))) => {
                info!(holder = %self.me.holder, "Left the fleet (heartbeat row deleted).");
            }
            _ => {
                warn!(holder = %self.me.holder, "Could not delete this instance's heartbeat row; it ages out.");
            }
        }
    }
}

impl Worker for Heartbeat {
    fn name(&self) -> &'static str {
        "fleet_heartbeat"
    }

    fn status(&self) -> Option<String> {
        self.live.map(|n| format!("instances_live={n}"))
    }

    async fn work(&mut self, must_exit: &CancellationToken) -> Result<WorkerState, BoxError> {
        // Each unit waits, then beats (the first beats at once): the wait is here, not in the
        // supervisor's, so a stop deletes the row at once, and `/workers` shows each beat's
        // count as soon as it is written.
        if self.beaten {
            tokio::select! {
                () = must_exit.cancelled() => {}
                () = tokio::time::sleep(self.every) => {}
            }
        }
        if must_exit.is_cancelled() {
            self.leave().await;
            return Ok(WorkerState::Done);
        }
        self.beaten = true;
        let beat = self.beat().await;
        match &beat {
            Ok(n) => {
                self.live = Some(*n);
                self.health.beat_ok(*n);
                crate::metrics::get()
                    .fleet_instances_live
                    .set(i64::try_from(*n).unwrap_or(i64::MAX));
            }
            Err(e) => {
                self.live = None;
                self.health.beat_failed(e.to_string());
            }
        }
        beat?;
        Ok(WorkerState::Busy)
    }
}

/// How long the instance that runs a scheduled singleton (the user sync) holds its lease: long
/// enough to cover the fleet's clock skew, so a late instance does not run the same scheduled
/// time again; short enough that a follower takes over at the next time when the leader died.
pub const SCHEDULED_LEASE_TTL: Duration = Duration::from_secs(600);

/// The gate of a scheduled singleton worker `name`: at each scheduled time, the instance that
/// takes (or, as the last one to run it, renews) the lease `worker/{name}` runs it; the others
/// skip that time. A store that cannot say skips too (fail closed: a missed sync is retried at
/// the next time, a doubled one cannot be undone). The lease is kept, not released, so an
/// instance whose clock lags cannot run the same time again.
/// What the gate decided at the last scheduled time is kept in `role` (for `/workers`).
pub fn scheduled_gate(
    store: Db,
    holder: &str,
    name: &'static str,
    clock: SharedClock,
    role: GateRole,
) -> crate::auth::SyncGate {
    let holder: std::sync::Arc<str> = std::sync::Arc::from(holder);
    std::sync::Arc::new(move |fire: u64| {
        let (store, holder, now) = (store.clone(), holder.clone(), clock.now_ms());
        let role = role.clone();
        Box::pin(async move {
            let lease = format!("worker/{name}");
            let ttl = u64::try_from(SCHEDULED_LEASE_TTL.as_millis()).unwrap_or(u64::MAX);
            let h = holder.clone();
            let got = store
                .run(move |s| s.try_acquire_lease(&lease, &h, ttl, now))
                .await;
            match got {
                Ok(true) => {
                    info!(worker = name, holder = %holder, fire, "Running the scheduled singleton here (leader).");
                    role.set(true);
                    true
                }
                Ok(false) => {
                    info!(
                        worker = name,
                        fire, "Another instance runs this scheduled time (follower)."
                    );
                    role.set(false);
                    false
                }
                Err(e) => {
                    warn!(worker = name, fire, error = %e, "Cannot tell which instance runs this scheduled time; skipping it.");
                    role.set(false);
                    false
                }
            }
        })
    })
}

/// What a scheduled singleton's gate decided at its last scheduled time on this instance:
/// `leader` (ran it here) or `follower` (another instance did, or none could be told); nothing
/// before the first scheduled time. Shared by the gate and the worker's `/workers` status.
#[derive(Clone, Debug, Default)]
pub struct GateRole(std::sync::Arc<std::sync::Mutex<Option<bool>>>);

impl GateRole {
    fn set(&self, leader: bool) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(leader);
    }

    /// `leader`, `follower`, or `None` before the first scheduled time.
    #[must_use]
    pub fn status(&self) -> Option<&'static str> {
        let leader = *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        leader.map(|l| if l { "leader" } else { "follower" })
    }
}

/// A scheduled singleton worker with its gate's role on `/workers` (as [`Leased`] shows its own).
pub struct WithRole<W> {
    inner: W,
    role: GateRole,
}

impl<W: Worker> WithRole<W> {
    /// `inner`, whose status is prefixed with what `role` says.
    pub fn new(inner: W, role: GateRole) -> Self {
        Self { inner, role }
    }
}

impl<W: Worker> Worker for WithRole<W> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn status(&self) -> Option<String> {
        match (self.role.status(), self.inner.status()) {
            (Some(r), Some(s)) => Some(format!("{r}; {s}")),
            (Some(r), None) => Some(r.to_owned()),
            (None, s) => s,
        }
    }

    async fn work(&mut self, must_exit: &CancellationToken) -> Result<WorkerState, BoxError> {
        self.inner.work(must_exit).await
    }
}

/// Online key rotation of the PostgreSQL store, run by one instance of the fleet (under
/// [`Leased`], lease `worker/key_rotation`). Each unit re-seals at most
/// [`KeyRotation::UNIT_BATCHES`] batches (each one short transaction), so the lease is renewed
/// between units and another instance continues (from the rows themselves) if this one dies.
/// While a live instance lacks the active key, the rotation waits (`/workers` says why).
pub struct KeyRotation {
    store: PgStore,
    cursor: Option<RotationCursor>,
    waiting: Option<String>,
}

impl KeyRotation {
    /// How often followers look at the lease, and the pause after a refusal.
    pub const EVERY: Duration = Duration::from_secs(5);
    /// Rows per transaction.
    pub const BATCH: usize = 500;
    /// Batches per unit.
    pub const UNIT_BATCHES: usize = 20;

    /// The rotation of `store` to its active key.
    #[must_use]
    pub fn new(store: PgStore) -> Self {
        Self {
            store,
            cursor: Some(RotationCursor::default()),
            waiting: None,
        }
    }
}

impl Worker for KeyRotation {
    fn name(&self) -> &'static str {
        "key_rotation"
    }

    fn status(&self) -> Option<String> {
        match (&self.waiting, &self.cursor) {
            (Some(w), _) => Some(format!("waiting: {w}")),
            (None, Some(c)) => Some(format!("resealed={}", c.report.resealed)),
            (None, None) => None,
        }
    }

    async fn work(&mut self, _must_exit: &CancellationToken) -> Result<WorkerState, BoxError> {
        let store = self.store.clone();
        let mut cur = self.cursor.take().unwrap_or_default();
        let (cur, step) = tokio::task::spawn_blocking(move || {
            let mut step = Ok(RotationStep::More);
            for _ in 0..Self::UNIT_BATCHES {
                step = store.rotation_batch(&mut cur, Self::BATCH);
                if !matches!(step, Ok(RotationStep::More)) {
                    break;
                }
            }
            (cur, step)
        })
        .await
        .map_err(|e| Error::Join(e.to_string()))?;
        let resealed = cur.report.resealed;
        self.cursor = Some(cur);
        match step {
            Ok(RotationStep::More) => {
                self.waiting = None;
                info!(resealed, "Key rotation in progress.");
                Ok(WorkerState::Busy)
            }
            Ok(RotationStep::Done) => {
                self.waiting = None;
                info!(resealed, key = %self.store.active_key_id(), "Key rotation complete; previous keys are no longer needed.");
                Ok(WorkerState::Done)
            }
            // Refused (an instance lacks the key): wait for the fleet, fail closed.
            Err(Error::Invalid(why)) => {
                warn!(reason = %why, "Key rotation waits.");
                self.waiting = Some(why);
                Ok(WorkerState::Throttled(Self::EVERY))
            }
            Err(e) => Err(e.into()),
        }
    }
}
