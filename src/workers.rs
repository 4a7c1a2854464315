//! Supervised background workers.
//!
//! A worker is a named async job run in a loop by the supervisor. A run that fails or panics
//! is recorded and retried with capped exponential backoff; `/workers` shows each worker's
//! state, last run and last error. The supervisor's tick also feeds the systemd watchdog.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::error;

use crate::storage::now_ms;

/// What a worker's one run returns: how long to wait before the next run.
pub type RunResult = Result<Duration, String>;

/// A worker: called again after each run until cancelled.
pub type WorkerFn = Box<dyn FnMut() -> Pin<Box<dyn Future<Output = RunResult> + Send>> + Send>;

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

    /// Starts `work` under supervision on `tracker` until `cancel`. A failed or panicking
    /// run is retried after 1 s, doubling up to 300 s.
    pub fn spawn(
        &self,
        tracker: &TaskTracker,
        cancel: CancellationToken,
        name: &'static str,
        work: WorkerFn,
    ) {
        self.spawn_with_backoff(tracker, cancel, name, Duration::from_secs(300), work);
    }

    /// Like [`Workers::spawn`], with the retry backoff capped at `max_backoff` (at least 1 s).
    pub fn spawn_with_backoff(
        &self,
        tracker: &TaskTracker,
        cancel: CancellationToken,
        name: &'static str,
        max_backoff: Duration,
        mut work: WorkerFn,
    ) {
        let max_backoff = max_backoff.max(Duration::from_secs(1));
        let me = self.clone();
        me.update(name, |w| w.state = "idle");
        tracker.spawn(async move {
            let mut backoff = Duration::from_secs(1);
            loop {
                me.update(name, |w| w.state = "running");
                let run = std::panic::AssertUnwindSafe(work()).catch_unwind();
                let result = tokio::select! {
                    () = cancel.cancelled() => break,
                    r = run => r,
                };
                let now = now_ms();
                let wait = match result {
                    Ok(Ok(next)) => {
                        backoff = Duration::from_secs(1);
                        me.update(name, |w| {
                            w.state = "idle";
                            w.runs += 1;
                            w.consecutive_failures = 0;
                            w.last_run_at = Some(now);
                            w.last_success_at = Some(now);
                        });
                        next
                    }
                    failure => {
                        let msg = match failure {
                            Ok(Err(e)) => e,
                            Err(p) => format!("panicked: {}", panic_message(p.as_ref())),
                            Ok(Ok(_)) => String::new(),
                        };
                        error!(worker = name, error = %msg, retry_in_s = backoff.as_secs(), "Worker run failed; restarting after backoff.");
                        crate::metrics::get().worker_restarts.get_or_create(&crate::metrics::WorkerLabel { worker: name }).inc();
                        me.update(name, |w| {
                            w.state = "backing_off";
                            w.runs += 1;
                            w.consecutive_failures += 1;
                            w.restarts += 1;
                            w.last_run_at = Some(now);
                            w.last_error = Some(msg);
                        });
                        let b = backoff;
                        backoff = backoff.saturating_mul(2).min(max_backoff);
                        b
                    }
                };
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
            }
            me.update(name, |w| w.state = "stopped");
        });
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
        let workers = Workers::default();
        let tracker = TaskTracker::new();
        let cancel = CancellationToken::new();
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        workers.spawn(
            &tracker,
            cancel.clone(),
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
        );
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
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
        assert_eq!(workers.snapshot()["flaky"].state, "stopped");
    }
}
