//! Background work under one owner.
//!
//! A [`Worker`] is a named, long-lived job the [`Supervisor`] drives: it calls
//! [`Worker::work`] for one unit, and the [`WorkerState`] it answers says what comes next
//! (again at once, after a pause, once [`Worker::wait_for_work`] says there is work, or never).
//! A unit that fails or panics is recorded and retried after a capped exponential backoff;
//! `/workers` shows each worker's state, runs, failures and last error.
//!
//! Cancellation is cooperative: a unit in progress is never dropped by the runner; it receives
//! the supervisor's token (`must_exit`) and ends its unit as it sees fit (an in-flight token
//! refresh stores its result first). Only the pauses between units are cut short.
//!
//! The supervisor also owns the one-off tasks (listeners, slow event handlers, the reload
//! task) on its [`TaskTracker`], and the writers that must outlive them (the seen-id writer)
//! on a second tracker drained after the first, so shutdown runs in order:
//! [`Supervisor::drain`] (cancel, then every task finishes within the grace period), then the
//! writers are told to finish and [`Supervisor::join_writers`] waits for them.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, warn};

use crate::backoff::Backoff;

/// Any error a worker's unit reports; the runner names the worker it came from.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a closure-style worker's one run returns: how long to wait before the next run.
pub type RunResult<E = String> = Result<Duration, E>;

/// A closure-style worker: called again after each run until cancelled. Plugs into the
/// supervisor through [`FnWorker`].
pub type WorkerFn<E = String> =
    Box<dyn FnMut() -> Pin<Box<dyn Future<Output = RunResult<E>> + Send>> + Send>;

/// Wall-clock time for the scheduling the supervisor and its workers do, injectable so tests
/// can set the time instead of waiting for it.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Unix time in milliseconds.
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        crate::storage::now_ms()
    }
}

/// A clock that only moves when told to (tests).
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicU64,
}

impl ManualClock {
    /// A clock reading `now_ms`.
    #[must_use]
    pub fn at(now_ms: u64) -> Self {
        Self {
            now: AtomicU64::new(now_ms),
        }
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.now.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
}

/// The clock shared by the supervisor and its workers.
pub type SharedClock = Arc<dyn Clock>;

/// What a worker says after one unit of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// More work is ready: run again at once.
    Busy,
    /// Run again after this pause.
    Throttled(Duration),
    /// Nothing to do: run again once [`Worker::wait_for_work`] returns.
    Idle,
    /// Finished for good.
    Done,
}

/// A background job driven by the [`Supervisor`].
pub trait Worker: Send + 'static {
    /// The name `/workers`, the logs and the metrics show.
    fn name(&self) -> &'static str;

    /// A short progress note for `/workers` (none by default).
    fn status(&self) -> Option<String> {
        None
    }

    /// Does one unit of work. `must_exit` is cancelled at shutdown: a long unit should look at
    /// it and end early, leaving what it did consistent.
    fn work(
        &mut self,
        must_exit: &CancellationToken,
    ) -> impl Future<Output = Result<WorkerState, BoxError>> + Send;

    /// Returns when there may be work again after [`WorkerState::Idle`] (never, by default:
    /// only shutdown ends the wait).
    fn wait_for_work(&mut self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }
}

/// Adapts a closure-style [`WorkerFn`] to [`Worker`]: `Ok(wait)` is
/// [`WorkerState::Throttled`] (`wait` zero: [`WorkerState::Busy`]). A closure cannot see
/// `must_exit`, so its run is dropped at cancellation: work that must finish (a token
/// refresh) has to keep itself alive, as the authorization flow's refresh tasks do.
pub struct FnWorker<E = String> {
    name: &'static str,
    run: WorkerFn<E>,
}

impl<E> FnWorker<E> {
    /// `run` under `name`.
    #[must_use]
    pub fn new(name: &'static str, run: WorkerFn<E>) -> Self {
        Self { name, run }
    }
}

impl<E> Worker for FnWorker<E>
where
    E: Into<BoxError> + Send + 'static,
{
    fn name(&self) -> &'static str {
        self.name
    }

    async fn work(&mut self, must_exit: &CancellationToken) -> Result<WorkerState, BoxError> {
        let run = (self.run)();
        tokio::select! {
            () = must_exit.cancelled() => Ok(WorkerState::Done),
            r = run => match r {
                Ok(wait) if wait.is_zero() => Ok(WorkerState::Busy),
                Ok(wait) => Ok(WorkerState::Throttled(wait)),
                Err(e) => Err(e.into()),
            },
        }
    }
}

/// Why a unit of work did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The unit returned an error.
    #[error("{0}")]
    Error(BoxError),
    /// The unit panicked.
    #[error("panicked: {0}")]
    Panicked(String),
}

/// A failed unit, with the worker it belongs to.
#[derive(Debug, thiserror::Error)]
#[error("worker {worker}: {failure}")]
pub struct WorkerError {
    /// The worker's name.
    pub worker: &'static str,
    /// What went wrong.
    #[source]
    pub failure: Failure,
}

/// One worker's status.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WorkerInfo {
    /// idle, running, backing_off, stopped.
    pub state: &'static str,
    /// Runs finished.
    pub runs: u64,
    /// Failed runs in a row.
    pub consecutive_failures: u64,
    /// Restarts after a failure or panic.
    pub restarts: u64,
    /// Unix ms of the last finished run.
    pub last_run_at: Option<u64>,
    /// Unix ms of the last successful run.
    pub last_success_at: Option<u64>,
    /// The last error or panic message.
    pub last_error: Option<String>,
    /// The worker's own progress note ([`Worker::status`]), when it gives one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// The table of workers shared with `/workers`.
#[derive(Clone, Debug, Default)]
pub struct Workers {
    inner: Arc<Mutex<BTreeMap<&'static str, WorkerInfo>>>,
}

impl Workers {
    /// A snapshot of every worker's status.
    #[must_use]
    pub fn snapshot(&self) -> BTreeMap<&'static str, WorkerInfo> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn update(&self, name: &'static str, f: impl FnOnce(&mut WorkerInfo)) {
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(g.entry(name).or_default());
    }
}

/// Retry pause after the first failure.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// Default cap of the retry pause.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Owns every background task of the service (cheap to clone; clones share everything).
#[derive(Clone, Debug)]
pub struct Supervisor {
    cancel: CancellationToken,
    tasks: TaskTracker,
    writers: TaskTracker,
    table: Workers,
    clock: SharedClock,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new(Arc::new(SystemClock))
    }
}

impl Supervisor {
    /// A supervisor reading time from `clock`.
    #[must_use]
    pub fn new(clock: SharedClock) -> Self {
        Self {
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
            writers: TaskTracker::new(),
            table: Workers::default(),
            clock,
        }
    }

    /// The status table (`/workers`).
    #[must_use]
    pub fn workers(&self) -> Workers {
        self.table.clone()
    }

    /// The tracker of tasks drained at shutdown (for components that spawn their own tasks).
    #[must_use]
    pub fn tracker(&self) -> TaskTracker {
        self.tasks.clone()
    }

    /// The token cancelled when shutdown begins.
    #[must_use]
    pub fn cancellation(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// The clock.
    #[must_use]
    pub fn clock(&self) -> SharedClock {
        self.clock.clone()
    }

    /// Starts `worker`; a failed unit is retried after 1 s, doubling up to [`MAX_BACKOFF`].
    pub fn start<W: Worker>(&self, worker: W) {
        self.start_with_backoff(worker, MAX_BACKOFF);
    }

    /// Like [`Supervisor::start`], with the retry backoff capped at `max_backoff` (at least
    /// 1 s).
    pub fn start_with_backoff<W: Worker>(&self, worker: W, max_backoff: Duration) {
        let runner = Runner {
            table: self.table.clone(),
            clock: self.clock.clone(),
            cancel: self.cancel.clone(),
            max_backoff: max_backoff.max(FIRST_BACKOFF),
        };
        self.table.update(worker.name(), |w| w.state = "idle");
        self.tasks.spawn(runner.run(worker));
    }

    /// Spawns a one-off task, drained at shutdown (it should watch [`Self::cancellation`]).
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tasks.spawn(task)
    }

    /// Spawns a blocking writer that must outlive the tasks feeding it: it is joined by
    /// [`Self::join_writers`], after [`Self::drain`]. Whoever feeds it tells it to finish.
    pub fn spawn_writer<F>(&self, writer: F) -> tokio::task::JoinHandle<()>
    where
        F: FnOnce() + Send + 'static,
    {
        self.writers.spawn_blocking(writer)
    }

    /// First half of shutdown: cancels, then waits up to `grace` for every task and worker
    /// (and `also`) to finish. False when the grace period ran out first.
    pub async fn drain(&self, grace: Duration, also: impl Future<Output = ()>) -> bool {
        self.cancel.cancel();
        self.tasks.close();
        let tasks = self.tasks.clone();
        let drained = tokio::time::timeout(grace, async move {
            tokio::join!(tasks.wait(), also);
        })
        .await;
        if drained.is_err() {
            warn!(
                grace_s = grace.as_secs(),
                "Shutdown grace period passed with work still running."
            );
        }
        drained.is_ok()
    }

    /// Second half of shutdown: waits for the writers (told to finish by their owners).
    pub async fn join_writers(&self) {
        self.writers.close();
        self.writers.wait().await;
    }
}

/// Drives one worker.
struct Runner {
    table: Workers,
    clock: SharedClock,
    cancel: CancellationToken,
    max_backoff: Duration,
}

impl Runner {
    async fn run<W: Worker>(self, mut worker: W) {
        let name = worker.name();
        let schedule = Backoff::new(FIRST_BACKOFF, self.max_backoff);
        // Failed units in a row; the wait after the n-th is `schedule.delay(n)`.
        let mut failures: u32 = 0;
        while !self.cancel.is_cancelled() {
            self.table.update(name, |w| w.state = "running");
            let unit = std::panic::AssertUnwindSafe(worker.work(&self.cancel))
                .catch_unwind()
                .await;
            let now = self.clock.now_ms();
            let status = worker.status();
            let next = match unit {
                Ok(Ok(state)) => {
                    failures = 0;
                    self.table.update(name, |w| {
                        w.state = "idle";
                        w.runs += 1;
                        w.consecutive_failures = 0;
                        w.last_run_at = Some(now);
                        w.last_success_at = Some(now);
                        w.status = status;
                    });
                    state
                }
                Ok(Err(e)) => {
                    failures = failures.saturating_add(1);
                    let backoff = schedule.delay(failures);
                    WorkerState::Throttled(self.failed(
                        name,
                        Failure::Error(e),
                        backoff,
                        now,
                        status,
                    ))
                }
                Err(p) => {
                    failures = failures.saturating_add(1);
                    let failure = Failure::Panicked(panic_message(p.as_ref()));
                    let backoff = schedule.delay(failures);
                    WorkerState::Throttled(self.failed(name, failure, backoff, now, status))
                }
            };
            match next {
                WorkerState::Busy => tokio::task::yield_now().await,
                WorkerState::Throttled(d) => {
                    tokio::select! {
                        () = self.cancel.cancelled() => break,
                        () = tokio::time::sleep(d) => {}
                    }
                }
                WorkerState::Idle => {
                    tokio::select! {
                        () = self.cancel.cancelled() => break,
                        () = worker.wait_for_work() => {}
                    }
                }
                WorkerState::Done => break,
            }
        }
        self.table.update(name, |w| w.state = "stopped");
    }

    /// Records a failed unit; returns the pause before the retry.
    fn failed(
        &self,
        name: &'static str,
        failure: Failure,
        backoff: Duration,
        now: u64,
        status: Option<String>,
    ) -> Duration {
        let err = WorkerError {
            worker: name,
            failure,
        };
        error!(worker = name, error = %err.failure, retry_in_s = backoff.as_secs(), "Worker run failed; restarting after backoff.");
        crate::metrics::get()
            .worker_restarts
            .get_or_create(&crate::metrics::WorkerLabel { worker: name })
            .inc();
        let msg = err.failure.to_string();
        self.table.update(name, |w| {
            w.state = "backing_off";
            w.runs += 1;
            w.consecutive_failures += 1;
            w.restarts += 1;
            w.last_run_at = Some(now);
            w.last_error = Some(msg);
            w.status = status;
        });
        backoff
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_failing_or_panicking_worker_is_restarted_and_recorded() {
        let sup = Supervisor::default();
        let workers = sup.workers();
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        sup.start(FnWorker::new(
            "flaky",
            Box::new(move || {
                let n = c.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move {
                    match n {
                        0 => Err("first run fails".to_owned()),
                        1 => panic!("second run panics"),
                        _ => Ok(Duration::from_secs(60)),
                    }
                })
            }),
        ));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let info = workers.snapshot()["flaky"].clone();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(info.restarts, 2);
        assert_eq!(info.consecutive_failures, 0);
        assert_eq!(
            info.last_error.as_deref(),
            Some("panicked: second run panics")
        );
        assert_eq!(info.state, "idle");
        assert!(sup.drain(Duration::from_secs(1), async {}).await);
        assert_eq!(workers.snapshot()["flaky"].state, "stopped");
    }

    /// A worker whose unit takes time and counts the units it completed.
    struct Slow {
        started: Arc<tokio::sync::Notify>,
        finished: Arc<AtomicU32>,
        wakes: Arc<tokio::sync::Notify>,
    }

    impl Worker for Slow {
        fn name(&self) -> &'static str {
            "slow"
        }

        fn status(&self) -> Option<String> {
            Some(format!("{} done", self.finished.load(Ordering::SeqCst)))
        }

        async fn work(&mut self, _must_exit: &CancellationToken) -> Result<WorkerState, BoxError> {
            self.started.notify_one();
            tokio::time::sleep(Duration::from_secs(5)).await;
            self.finished.fetch_add(1, Ordering::SeqCst);
            Ok(WorkerState::Idle)
        }

        async fn wait_for_work(&mut self) {
            self.wakes.notified().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_lets_the_unit_in_progress_finish_and_idle_waits_for_work() {
        let sup = Supervisor::default();
        let (started, wakes) = (
            Arc::new(tokio::sync::Notify::new()),
            Arc::new(tokio::sync::Notify::new()),
        );
        let finished = Arc::new(AtomicU32::new(0));
        sup.start(Slow {
            started: started.clone(),
            finished: finished.clone(),
            wakes: wakes.clone(),
        });
        started.notified().await;
        // Idle: no second unit until woken, however long we wait.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(finished.load(Ordering::SeqCst), 1);
        let info = sup.workers().snapshot()["slow"].clone();
        assert_eq!((info.runs, info.state), (1, "idle"));
        assert_eq!(info.status.as_deref(), Some("1 done"));
        wakes.notify_one();
        started.notified().await;
        // Shutdown in the middle of the second unit: it completes, no third one starts.
        assert!(sup.drain(Duration::from_secs(30), async {}).await);
        assert_eq!(finished.load(Ordering::SeqCst), 2);
        assert_eq!(sup.workers().snapshot()["slow"].state, "stopped");
    }

    #[tokio::test(start_paused = true)]
    async fn a_unit_that_outlives_the_grace_period_is_reported() {
        let sup = Supervisor::default();
        let started = Arc::new(tokio::sync::Notify::new());
        sup.start(Slow {
            started: started.clone(),
            finished: Arc::new(AtomicU32::new(0)),
            wakes: Arc::new(tokio::sync::Notify::new()),
        });
        started.notified().await;
        assert!(!sup.drain(Duration::from_secs(1), async {}).await);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_doubling_up_to_the_cap_and_carry_the_worker_name() {
        let clock = Arc::new(ManualClock::at(1_000));
        let sup = Supervisor::new(clock.clone());
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        sup.start_with_backoff(
            FnWorker::new(
                "down",
                Box::new(move || {
                    c.fetch_add(1, Ordering::SeqCst);
                    Box::pin(async { Err(std::io::Error::other("unreachable")) })
                }),
            ),
            Duration::from_secs(4),
        );
        // Runs at 0, 1, 3, 7, 11, 15 s (pauses 1, 2, 4, 4, 4).
        tokio::time::sleep(Duration::from_millis(15_500)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 6);
        let info = sup.workers().snapshot()["down"].clone();
        assert_eq!(info.consecutive_failures, 6);
        assert_eq!(info.last_error.as_deref(), Some("unreachable"));
        // Times come from the injected clock.
        assert_eq!(info.last_run_at, Some(1_000));
        clock.advance(Duration::from_secs(1));
        assert_eq!(clock.now_ms(), 2_000);
        let err = WorkerError {
            worker: "down",
            failure: Failure::Error("unreachable".into()),
        };
        assert_eq!(err.to_string(), "worker down: unreachable");
        assert!(sup.drain(Duration::from_secs(1), async {}).await);
    }

    #[tokio::test]
    async fn writers_are_joined_after_the_tasks_that_feed_them() {
        let sup = Supervisor::default();
        let (tx, rx) = std::sync::mpsc::channel::<u32>();
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        sup.spawn_writer(move || {
            while let Ok(n) = rx.recv() {
                g.lock().unwrap().push(n);
            }
        });
        let cancel = sup.cancellation();
        sup.spawn(async move {
            cancel.cancelled().await;
            // Fed during shutdown: still written.
            tx.send(7).unwrap();
        });
        assert!(sup.drain(Duration::from_secs(5), async {}).await);
        sup.join_writers().await;
        assert_eq!(*got.lock().unwrap(), vec![7]);
    }
}
