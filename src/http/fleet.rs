//! What readiness knows of the fleet: the outcome of this instance's last heartbeat (written
//! by the heartbeat worker, `daemon::fleet::Heartbeat`; read by `/readyz`, which never writes
//! or queries anything itself).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The heartbeat's last outcome, shared by the heartbeat worker and `/readyz`. Cheap to clone.
#[derive(Clone, Debug)]
pub struct FleetHealth {
    stale_after: Duration,
    last: Arc<Mutex<Beat>>,
}

#[derive(Debug, Default)]
struct Beat {
    /// When the heartbeat was last written, and how many instances were live then.
    ok: Option<(Instant, u64)>,
    /// Why the latest attempt failed, if it did.
    error: Option<String>,
}

impl FleetHealth {
    /// A heartbeat older than `stale_after` (three intervals) no longer counts.
    #[must_use]
    pub fn new(stale_after: Duration) -> Self {
        Self {
            stale_after,
            last: Arc::new(Mutex::new(Beat::default())),
        }
    }

    /// The heartbeat was written; `live` instances were live, this one included.
    pub fn beat_ok(&self, live: u64) {
        let mut b = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        b.ok = Some((Instant::now(), live));
        b.error = None;
    }

    /// The heartbeat could not be written.
    pub fn beat_failed(&self, why: String) {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .error = Some(why);
    }

    /// `Ok(live instances)` while the last written heartbeat is fresh; else why not. Fail
    /// closed: no heartbeat written yet, or none within `stale_after`, is an error, even if a
    /// later attempt has not failed yet.
    pub fn live(&self) -> Result<u64, String> {
        let b = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let last_error = b
            .error
            .as_deref()
            .map_or_else(String::new, |e| format!("; last attempt: {e}"));
        match b.ok {
            Some((at, live)) if at.elapsed() <= self.stale_after => Ok(live),
            Some((at, _)) => Err(format!(
                "heartbeat last written {} s ago (stale after {} s){last_error}",
                at.elapsed().as_secs(),
                self.stale_after.as_secs()
            )),
            None => Err(format!("heartbeat not written yet{last_error}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_a_fresh_heartbeat() {
        let h = FleetHealth::new(Duration::from_millis(50));
        assert!(h.live().unwrap_err().contains("not written yet"));
        h.beat_failed("store down".into());
        assert!(h.live().unwrap_err().contains("store down"));
        h.beat_ok(3);
        assert_eq!(h.live(), Ok(3));
        // A failure after a fresh beat does not make it stale before its time...
        h.beat_failed("store down".into());
        assert_eq!(h.live(), Ok(3));
        // ...but a beat older than the window is not enough.
        std::thread::sleep(Duration::from_millis(80));
        let e = h.live().unwrap_err();
        assert!(e.contains("stale") && e.contains("store down"), "{e}");
    }
}
