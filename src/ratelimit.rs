//! The one rate limiter of the service: sliding-window event counts per key.
//!
//! Used by the per-user authorization rate limit (`auth.request_rate_limit`), the `/mcp`
//! limits (per client and global) and the throttle of failed bearer attempts per peer.
//!
//! Times are [`Duration`]s since an epoch the caller chooses: the authorization flow passes its
//! injectable unix-ms clock, the HTTP surfaces pass [`monotonic_now`]. An event at `t` counts
//! while `now - t < window`.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// Keys tracked before the ones with no event in the window are dropped.
pub const MAX_TRACKED_KEYS: usize = 10_000;

/// Time since the first call in this process, on the monotonic clock: the `now` of limiters
/// that are not driven by an injectable clock.
#[must_use]
pub fn monotonic_now() -> Duration {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed()
}

/// Sliding-window counts of events per key `K`.
#[derive(Debug)]
pub struct RateLimiter<K> {
    window: Duration,
    events: Mutex<HashMap<K, VecDeque<Duration>>>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// A limiter counting events within `window`.
    #[must_use]
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            events: Mutex::new(HashMap::new()),
        }
    }

    /// The window events are counted in.
    #[must_use]
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Admits one event of `key` at `now` if it had fewer than `limit` (at least 1) in the
    /// window, and counts it; else `Err(wait)`: how long until its oldest event leaves the
    /// window (at least 1 ms).
    pub fn acquire(&self, key: &K, limit: usize, now: Duration) -> Result<(), Duration> {
        let limit = limit.max(1);
        let mut g = self.lock(now);
        let q = g.entry(key.clone()).or_default();
        self.expire(q, now);
        if q.len() >= limit {
            return Err(self.wait(q, now));
        }
        q.push_back(now);
        Ok(())
    }

    /// `Some(wait)` while `key` has `limit` (at least 1) events in the window; counts nothing.
    pub fn blocked(&self, key: &K, limit: usize, now: Duration) -> Option<Duration> {
        let limit = limit.max(1);
        let mut g = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        let q = g.get_mut(key)?;
        self.expire(q, now);
        if q.is_empty() {
            g.remove(key);
            return None;
        }
        (q.len() >= limit).then(|| self.wait(q, now))
    }

    /// Counts an event of `key` at `now` unconditionally, keeping at most the latest `limit`
    /// (at least 1): enough for [`Self::blocked`] to answer.
    pub fn record(&self, key: &K, limit: usize, now: Duration) {
        let limit = limit.max(1);
        let mut g = self.lock(now);
        let q = g.entry(key.clone()).or_default();
        self.expire(q, now);
        q.push_back(now);
        while q.len() > limit {
            q.pop_front();
        }
    }

    /// The map, with keys that have no event in the window dropped when it grew too large.
    fn lock(&self, now: Duration) -> std::sync::MutexGuard<'_, HashMap<K, VecDeque<Duration>>> {
        let mut g = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        if g.len() >= MAX_TRACKED_KEYS {
            let window = self.window;
            g.retain(|_, q| q.back().is_some_and(|t| now.saturating_sub(*t) < window));
        }
        g
    }

    fn expire(&self, q: &mut VecDeque<Duration>, now: Duration) {
        while q
            .front()
            .is_some_and(|t| now.saturating_sub(*t) >= self.window)
        {
            q.pop_front();
        }
    }

    fn wait(&self, q: &VecDeque<Duration>, now: Duration) -> Duration {
        q.front()
            .map_or(self.window, |t| {
                self.window.saturating_sub(now.saturating_sub(*t))
            })
            .max(Duration::from_millis(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const W: Duration = Duration::from_secs(60);

    #[test]
    fn each_key_has_its_own_window() {
        let l = RateLimiter::new(W);
        let t = Duration::from_secs(1_000);
        for _ in 0..3 {
            assert!(l.acquire(&"a", 3, t).is_ok());
        }
        assert_eq!(l.acquire(&"a", 3, t), Err(W));
        assert!(l.acquire(&"b", 3, t).is_ok(), "another key is not affected");
        assert_eq!(
            l.acquire(&"a", 3, t + Duration::from_secs(59)),
            Err(Duration::from_secs(1))
        );
        assert!(l.acquire(&"a", 3, t + W).is_ok(), "the window has passed");
    }

    #[test]
    fn blocked_counts_nothing_and_record_keeps_the_latest() {
        let l = RateLimiter::new(W);
        let t = Duration::from_secs(5);
        for _ in 0..9 {
            l.record(&1u8, 10, t);
        }
        assert_eq!(l.blocked(&1, 10, t), None);
        assert_eq!(l.blocked(&1, 10, t), None, "asking does not count");
        l.record(&1, 10, t);
        assert_eq!(l.blocked(&1, 10, t), Some(W));
        for _ in 0..100 {
            l.record(&1, 10, t + Duration::from_secs(30));
        }
        // Only the latest 10 are kept: the block lasts until the newest leave the window.
        assert!(l.blocked(&1, 10, t + W).is_some());
        assert_eq!(l.blocked(&1, 10, t + Duration::from_secs(90)), None);
        assert_eq!(l.blocked(&2, 10, t), None);
    }

    #[test]
    fn a_poisoned_lock_still_limits() {
        let l = std::sync::Arc::new(RateLimiter::new(W));
        let l2 = l.clone();
        let _ = std::thread::spawn(move || {
            let _g = l2.events.lock().unwrap();
            panic!("poison the lock");
        })
        .join();
        assert!(l.acquire(&"a", 1, Duration::ZERO).is_ok());
        assert!(l.acquire(&"a", 1, Duration::ZERO).is_err());
    }

    proptest! {
        /// However events arrive, no window ever admits more than `limit` of a key; a refused
        /// event is admitted once its wait has passed (if nothing else came in between).
        #[test]
        fn never_more_than_limit_in_any_window(
            limit in 1usize..6,
            gaps in proptest::collection::vec(0u64..40_000, 1..120),
        ) {
            let l = RateLimiter::new(W);
            let mut now = Duration::ZERO;
            let mut admitted: Vec<Duration> = Vec::new();
            for g in gaps {
                now += Duration::from_millis(g);
                match l.acquire(&(), limit, now) {
                    Ok(()) => admitted.push(now),
                    Err(wait) => {
                        prop_assert!(wait > Duration::ZERO && wait <= W);
                        let probe = RateLimiter::new(W);
                        for t in admitted.iter().filter(|t| now.saturating_sub(**t) < W) {
                            probe.record(&(), usize::MAX, *t);
                        }
                        prop_assert!(probe.acquire(&(), limit, now + wait).is_ok());
                    }
                }
                let in_window = admitted.iter().filter(|t| now.saturating_sub(**t) < W).count();
                prop_assert!(in_window <= limit);
            }
        }
    }
}
