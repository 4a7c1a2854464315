//! The service's own background workers (see [`crate::workers`]): the TTL sweep, the tenant
//! token, the long connection, scheduled backups, configuration reloads and the systemd
//! watchdog.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, LoadOptions};
use crate::storage::Db;
use crate::workers::{BoxError, SharedClock, Worker, WorkerState};

/// Removes expired sessions, purges old ones and forgets old event ids, every `every`.
pub struct SweepWorker {
    store: Db,
    /// The configured app: the label of the expiry count and the store gauges (none if empty).
    app_id: String,
    auth: Option<crate::auth::AuthService>,
    every: Duration,
    clock: SharedClock,
    /// The flows of the other running apps, by app id (several apps in one service).
    others: Option<OtherApps>,
}

/// Finds the authorization flow of a running app by its id.
pub type OtherApps = Arc<dyn Fn(&str) -> Option<crate::auth::AuthService> + Send + Sync>;

impl SweepWorker {
    /// Sweeps `store` (telling `auth` about the sessions that expired, counted for `app_id`)
    /// every `every`.
    pub fn new(
        store: impl Into<Db>,
        app_id: String,
        auth: Option<crate::auth::AuthService>,
        every: Duration,
        clock: SharedClock,
    ) -> Self {
        let store: Db = store.into();
        Self {
            store,
            app_id,
            auth,
            every,
            clock,
            others: None,
        }
    }

    /// With several apps: each expired session goes to the flow of its own app (found with
    /// `others`), which updates its card with that app's client and counts it under its
    /// `app_id`; a session whose app is not running is expired without a card update.
    #[must_use]
    pub fn with_other_apps(mut self, others: OtherApps) -> Self {
        self.others = Some(others);
        self
    }

    /// Splits expired sessions by app: this worker's app's, and the others' by app id.
    async fn split_by_app(
        &self,
        expired: Vec<(crate::storage::SessionId, Option<String>)>,
    ) -> Result<
        std::collections::BTreeMap<String, Vec<(crate::storage::SessionId, Option<String>)>>,
        crate::storage::Error,
    > {
        self.store
            .run(move |s| {
                let mut by_app: std::collections::BTreeMap<String, Vec<_>> =
                    std::collections::BTreeMap::new();
                for (id, card) in expired {
                    let app = s
                        .get_session_summary(id)?
                        .map(|x| x.app_id)
                        .unwrap_or_default();
                    by_app.entry(app).or_default().push((id, card));
                }
                Ok(by_app)
            })
            .await
    }
}

impl Worker for SweepWorker {
    fn name(&self) -> &'static str {
        "ttl_sweep"
    }

    async fn work(&mut self, _must_exit: &CancellationToken) -> Result<WorkerState, BoxError> {
        let started = Instant::now();
        let now = self.clock.now_ms();
        let r = self.store.run(move |s| s.sweep(now, 10_000)).await?;
        let m = crate::metrics::get();
        m.sweep_runs.inc();
        m.sweep_duration.observe(started.elapsed().as_secs_f64());
        let kind = |k| crate::metrics::KindLabel { kind: k };
        m.sweep_removed
            .get_or_create(&kind("expired"))
            .inc_by(r.expired.len() as u64);
        if self.others.is_none() && !self.app_id.is_empty() {
            m.auth_session_expired
                .get_or_create(&crate::metrics::AppLabel {
                    app_id: self.app_id.clone(),
                })
                .inc_by(r.expired.len() as u64);
        }
        m.sweep_removed
            .get_or_create(&kind("purged"))
            .inc_by(r.purged);
        m.sweep_removed
            .get_or_create(&kind("events"))
            .inc_by(r.events_forgotten);
        m.sweep_last_success
            .set(i64::try_from(self.clock.now_ms() / 1000).unwrap_or(0));
        if let Some(others) = &self.others {
            for (app, expired) in self.split_by_app(r.expired.clone()).await? {
                if !app.is_empty() {
                    m.auth_session_expired
                        .get_or_create(&crate::metrics::AppLabel {
                            app_id: app.clone(),
                        })
                        .inc_by(expired.len() as u64);
                }
                let auth = if app == self.app_id {
                    self.auth.clone()
                } else {
                    others(&app)
                };
                if let Some(auth) = auth {
                    auth.on_sweep_expired(expired).await;
                }
            }
        } else if let Some(auth) = &self.auth {
            auth.on_sweep_expired(r.expired.clone()).await;
        }
        let store = self.store.clone();
        let app_id = self.app_id.clone();
        // The gauges read the store: off the async threads, awaited within this unit.
        let _ = tokio::task::spawn_blocking(move || {
            crate::metrics::refresh_store_gauges(&store, &app_id);
        })
        .await;
        info!(
            expired = r.expired.len(),
            purged = r.purged,
            events_forgotten = r.events_forgotten,
            duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "Sweep finished."
        );
        Ok(WorkerState::Throttled(self.every))
    }
}

/// Longest wait between tenant-token fetch attempts while they fail.
pub const TENANT_TOKEN_RETRY_CAP: Duration = Duration::from_secs(30);

/// Fetches (or keeps) the tenant token, so `/readyz` can read its state instead of fetching:
/// the cache answers from memory until the token is due for refresh, so a unit is cheap.
/// Failures are retried by the supervisor (1 s doubling to [`TENANT_TOKEN_RETRY_CAP`]).
pub struct TenantTokenWorker {
    lark: crate::lark::LarkClient,
}

impl TenantTokenWorker {
    /// Keeps `lark`'s tenant token warm.
    pub fn new(lark: crate::lark::LarkClient) -> Self {
        Self { lark }
    }
}

/// A failed tenant-token fetch.
#[derive(Debug, thiserror::Error)]
#[error("tenant token: {0}")]
pub struct TenantTokenError(#[source] crate::lark::Error);

impl Worker for TenantTokenWorker {
    fn name(&self) -> &'static str {
        "tenant_token"
    }

    async fn work(&mut self, _must_exit: &CancellationToken) -> Result<WorkerState, BoxError> {
        match self.lark.tenant_token().await {
            Ok(_) => Ok(WorkerState::Throttled(Duration::from_secs(30))),
            Err(e) => Err(TenantTokenError(e).into()),
        }
    }
}

/// How long the long connection may take to end its session (send the close frame, abandon a
/// dial in progress) once shutdown begins.
const LONG_CONNECTION_CLOSE: Duration = Duration::from_secs(2);

/// The long connection ended although nobody cancelled it.
#[derive(Debug, thiserror::Error)]
#[error("the long connection task ended unexpectedly")]
pub struct LongConnectionEnded;

/// Holds the long connection. Its one unit only ends at shutdown; any other end (or a panic)
/// is a failure the supervisor restarts with backoff.
pub struct LongConnectionWorker {
    conn: Arc<crate::longconn::LongConn>,
}

impl LongConnectionWorker {
    /// Runs `conn`.
    pub fn new(conn: Arc<crate::longconn::LongConn>) -> Self {
        Self { conn }
    }
}

impl Worker for LongConnectionWorker {
    fn name(&self) -> &'static str {
        "long_connection"
    }

    async fn work(&mut self, must_exit: &CancellationToken) -> Result<WorkerState, BoxError> {
        let closing = async {
            must_exit.cancelled().await;
            tokio::time::sleep(LONG_CONNECTION_CLOSE).await;
        };
        tokio::select! {
            () = self.conn.run(must_exit.clone()) => {}
            () = closing => warn!("The long connection did not end within its close period; abandoning it."),
        }
        if must_exit.is_cancelled() {
            Ok(WorkerState::Done)
        } else {
            Err(LongConnectionEnded.into())
        }
    }
}

/// Why a scheduled backup was not taken.
#[derive(Debug, thiserror::Error)]
pub enum BackupJobError {
    /// The schedule has no next time.
    #[error("the backup schedule never fires")]
    NeverFires,
    /// Neither recipients nor a passphrase are configured.
    #[error("no backup.recipients or backup.passphrase")]
    NoProtection,
    /// The backup failed.
    #[error(transparent)]
    Backup(#[from] crate::backup::BackupError),
    /// The backup task failed.
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
}

/// Takes a backup at each time of `backup.schedule`. A unit waits for the next time (a wait
/// shutdown cuts short), then takes the backup; a failed one is not retried before the next
/// time.
pub struct BackupWorker {
    store: Db,
    cfg: crate::config::BackupConfig,
    schedule: crate::schedule::Schedule,
    dir: std::path::PathBuf,
    clock: SharedClock,
    /// In a fleet: asked at each scheduled time whether this instance takes that backup.
    gate: Option<crate::auth::SyncGate>,
}

impl BackupWorker {
    /// Backups of `store` as `cfg` says; fails when the schedule does not parse or no
    /// directory is set.
    pub fn new(
        store: impl Into<Db>,
        cfg: crate::config::BackupConfig,
        schedule: &str,
        clock: SharedClock,
    ) -> Result<Self, super::DaemonError> {
        let store: Db = store.into();
        let schedule = crate::schedule::Schedule::parse(schedule)?;
        let dir = cfg.dir.clone().ok_or(super::DaemonError::BackupDir)?;
        Ok(Self {
            store,
            cfg,
            schedule,
            dir,
            clock,
            gate: None,
        })
    }

    /// Asks `gate` at each scheduled time whether this instance takes that backup (a fleet on
    /// PostgreSQL: one instance per time, `daemon::fleet::scheduled_gate`); the others skip it.
    #[must_use]
    pub fn with_gate(mut self, gate: crate::auth::SyncGate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// How long until the next scheduled backup.
    pub fn until_next(&self) -> Result<Duration, BackupJobError> {
        let now = self.clock.now_ms();
        let next = self
            .schedule
            .next_after(now)
            .ok_or(BackupJobError::NeverFires)?;
        Ok(Duration::from_millis(next.saturating_sub(now)))
    }

    fn protection(&self) -> Result<crate::backup::Protection, BackupJobError> {
        if self.cfg.recipients.is_empty() {
            self.cfg
                .passphrase
                .clone()
                .map(crate::backup::Protection::Passphrase)
                .ok_or(BackupJobError::NoProtection)
        } else {
            Ok(crate::backup::Protection::recipients(&self.cfg.recipients)?)
        }
    }
}

impl Worker for BackupWorker {
    fn name(&self) -> &'static str {
        "backup"
    }

    async fn work(&mut self, must_exit: &CancellationToken) -> Result<WorkerState, BoxError> {
        let wait = self.until_next()?;
        let fire = self
            .clock
            .now_ms()
            .saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
        tokio::select! {
            () = must_exit.cancelled() => return Ok(WorkerState::Done),
            () = tokio::time::sleep(wait) => {}
        }
        if let Some(gate) = &self.gate {
            if !gate(fire).await {
                // Another instance takes this one (or none could be told: skipped, fail closed).
                return Ok(WorkerState::Busy);
            }
        }
        let prot = self.protection()?;
        let (store, dir, keep) = (self.store.clone(), self.dir.clone(), self.cfg.keep);
        let outcome = tokio::task::spawn_blocking(move || {
            crate::http::take_backup_now(&store, &dir, &prot, keep)
        })
        .await
        .map_err(BackupJobError::from)?;
        let label = |o| crate::metrics::OutcomeLabel { outcome: o };
        let m = crate::metrics::get();
        match outcome {
            Ok(_) => {
                m.backups.get_or_create(&label("success")).inc();
                Ok(WorkerState::Busy)
            }
            Err(e) => {
                m.backups.get_or_create(&label("failure")).inc();
                Err(BackupJobError::from(e).into())
            }
        }
    }
}

/// Where reloaded configurations come from.
pub struct Reloads(ReloadSource);

impl Reloads {
    /// `SIGHUP`: the configuration is re-read from `opts`, then `adjust` is applied. The
    /// handler is installed now (a `SIGHUP` from here on never kills the process); if it
    /// cannot be, reloads are off (logged). Must be called inside the runtime.
    #[must_use]
    pub fn sighup(opts: LoadOptions, adjust: Box<dyn Fn(&mut Config) + Send + Sync>) -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::hangup()) {
                Ok(hup) => Self(ReloadSource::Sighup { hup, opts, adjust }),
                Err(e) => {
                    warn!(error = %e, "Cannot listen for SIGHUP; configuration reloads are off.");
                    Self(ReloadSource::Off)
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = (opts, adjust);
            Self(ReloadSource::Off)
        }
    }
}

impl std::fmt::Debug for Reloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match &self.0 {
            ReloadSource::Channel(_) => "Reloads::Channel",
            #[cfg(unix)]
            ReloadSource::Sighup { .. } => "Reloads::Sighup",
            ReloadSource::Off => "Reloads::Off",
        })
    }
}

/// Configurations sent on a channel (tests, embedders); a closed channel ends reloads.
impl From<tokio::sync::mpsc::Receiver<Config>> for Reloads {
    fn from(rx: tokio::sync::mpsc::Receiver<Config>) -> Self {
        Self(ReloadSource::Channel(rx))
    }
}

/// Where [`ReloadWorker`] waits for the next configuration.
enum ReloadSource {
    Channel(tokio::sync::mpsc::Receiver<Config>),
    #[cfg(unix)]
    Sighup {
        hup: tokio::signal::unix::Signal,
        opts: LoadOptions,
        adjust: Box<dyn Fn(&mut Config) + Send + Sync>,
    },
    Off,
}

/// Hands each reloaded configuration's app credentials to the long connection, which redials
/// at once if it is waiting. Other settings take effect on restart.
pub struct ReloadWorker {
    source: ReloadSource,
    conn: Option<Arc<crate::longconn::LongConn>>,
}

impl ReloadWorker {
    /// Reloads from `reloads` applied to `conn`; `None` when reloads are off.
    pub fn new(reloads: Reloads, conn: Option<Arc<crate::longconn::LongConn>>) -> Option<Self> {
        match reloads.0 {
            ReloadSource::Off => None,
            source => Some(Self { source, conn }),
        }
    }

    /// The next configuration; `None` when no more can come.
    async fn next(&mut self) -> Option<Config> {
        match &mut self.source {
            ReloadSource::Channel(rx) => rx.recv().await,
            ReloadSource::Off => None,
            #[cfg(unix)]
            ReloadSource::Sighup { hup, opts, adjust } => loop {
                hup.recv().await?;
                let opts = opts.clone();
                match tokio::task::spawn_blocking(move || Config::load(&opts)).await {
                    Ok(Ok(mut cfg)) => {
                        adjust(&mut cfg);
                        info!("SIGHUP: configuration re-read.");
                        return Some(cfg);
                    }
                    Ok(Err(e)) => {
                        error!(error = %e, "SIGHUP: the configuration does not load; keeping the current one.");
                    }
                    Err(e) => error!(error = %e, "SIGHUP: reading the configuration failed."),
                }
            },
        }
    }
}

impl Worker for ReloadWorker {
    fn name(&self) -> &'static str {
        "config_reload"
    }

    async fn work(&mut self, must_exit: &CancellationToken) -> Result<WorkerState, BoxError> {
        let new = tokio::select! {
            () = must_exit.cancelled() => return Ok(WorkerState::Done),
            r = self.next() => match r {
                Some(new) => new,
                None => return Ok(WorkerState::Done),
            },
        };
        match (&self.conn, new.app_id, new.app_secret) {
            (Some(conn), Some(id), Some(secret)) => {
                info!(
                    "Configuration reloaded: the long connection uses the re-read app credentials."
                );
                conn.reload_credentials(id, secret);
            }
            (Some(_), _, _) => {
                warn!("Configuration reloaded without app_id/app_secret; keeping the current credentials.");
            }
            (None, _, _) => {
                info!("Configuration reloaded; the long connection is off, nothing to apply.");
            }
        }
        Ok(WorkerState::Busy)
    }
}

/// Pings the systemd watchdog at half its interval while the runtime is responsive.
pub struct WatchdogWorker {
    every: Duration,
}

impl WatchdogWorker {
    /// `None` when systemd asked for no watchdog.
    pub fn new() -> Option<Self> {
        sd_notify::watchdog_enabled().map(|every| Self { every: every / 2 })
    }
}

impl Worker for WatchdogWorker {
    fn name(&self) -> &'static str {
        "watchdog"
    }

    async fn work(&mut self, _must_exit: &CancellationToken) -> Result<WorkerState, BoxError> {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        Ok(WorkerState::Throttled(self.every))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Store;
    use crate::workers::ManualClock;

    fn store() -> Store {
        Store::open_in_memory(
            crate::storage::Keyring::new(crate::storage::Key::from_bytes(&[5; 32]), vec![]),
            crate::storage::StoreOptions::default(),
        )
        .unwrap()
    }

    /// Backups at 02:00 UTC, without protection or a usable directory.
    fn daily_at_two() -> crate::config::BackupConfig {
        crate::config::BackupConfig {
            dir: Some("/nonexistent".into()),
            schedule: Some("0 2 * * *".into()),
            keep: 1,
            recipients: vec![],
            passphrase: None,
        }
    }

    #[test]
    fn the_backup_waits_for_the_next_scheduled_time_on_the_injected_clock() {
        // 2024-01-01T01:59:00Z; the schedule fires at 02:00 UTC.
        let clock = Arc::new(ManualClock::at(1_704_074_340_000));
        let cfg = daily_at_two();
        let w = BackupWorker::new(store(), cfg.clone(), "0 2 * * *", clock.clone()).unwrap();
        assert_eq!(w.until_next().unwrap(), Duration::from_secs(60));
        clock.advance(Duration::from_secs(60));
        // At 02:00 exactly the next time is tomorrow's.
        assert_eq!(w.until_next().unwrap(), Duration::from_secs(24 * 3600));
        assert!(matches!(w.protection(), Err(BackupJobError::NoProtection)));
        let no_dir = crate::config::BackupConfig { dir: None, ..cfg };
        assert!(matches!(
            BackupWorker::new(store(), no_dir.clone(), "0 2 * * *", clock.clone()),
            Err(super::super::DaemonError::BackupDir)
        ));
        assert!(matches!(
            BackupWorker::new(store(), no_dir, "0 2 * *", clock),
            Err(super::super::DaemonError::BackupSchedule(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_during_the_wait_for_the_next_backup_ends_the_worker_at_once() {
        let clock = Arc::new(ManualClock::at(1_704_074_340_000));
        let cfg = daily_at_two();
        let sup = crate::workers::Supervisor::new(clock.clone());
        sup.start(BackupWorker::new(store(), cfg, "0 2 * * *", clock).unwrap());
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(sup.workers().snapshot()["backup"].state, "running");
        assert!(sup.drain(Duration::from_millis(1), async {}).await);
        let info = sup.workers().snapshot()["backup"].clone();
        assert_eq!((info.state, info.runs, info.restarts), ("stopped", 1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweep_reads_the_injected_clock_and_runs_every_interval() {
        let clock = Arc::new(ManualClock::at(1_000_000));
        let sup = crate::workers::Supervisor::new(clock.clone());
        sup.start(SweepWorker::new(
            store(),
            String::new(),
            None,
            Duration::from_secs(60),
            clock.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(125)).await;
        let info = sup.workers().snapshot()["ttl_sweep"].clone();
        assert_eq!(info.runs, 3, "{info:?}");
        assert_eq!(info.last_success_at, Some(1_000_000));
        assert!(sup.drain(Duration::from_secs(5), async {}).await);
    }

    #[tokio::test]
    async fn reloads_end_with_their_channel_and_at_shutdown() {
        let sup = crate::workers::Supervisor::default();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        sup.start(ReloadWorker::new(Reloads::from(rx), None).unwrap());
        let env: std::collections::HashMap<String, String> = std::collections::HashMap::new();
        let cfg = Config::load_with_default(&LoadOptions::default(), &env, None).unwrap();
        tx.send(cfg).await.unwrap();
        drop(tx);
        // The channel closed: the worker is done without a shutdown.
        for _ in 0..100 {
            if sup.workers().snapshot()["config_reload"].state == "stopped" {
                break;
            }
            tokio::task::yield_now().await;
        }
        let info = sup.workers().snapshot()["config_reload"].clone();
        assert_eq!((info.state, info.runs), ("stopped", 2));
        let (_tx, rx) = tokio::sync::mpsc::channel(1);
        sup.start(ReloadWorker::new(Reloads::from(rx), None).unwrap());
        assert!(sup.drain(Duration::from_secs(5), async {}).await);
    }
}
