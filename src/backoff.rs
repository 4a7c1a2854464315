//! The one backoff schedule of the service: capped exponential, with equal jitter.
//!
//! Pure: the caller brings the attempt number and, for [`Backoff::jittered`], a random draw,
//! so the schedule is tested without a clock or a random source. Used by the Lark client's
//! retries; the worker supervisor (`Backoff::delay`) and the long connection's reconnects
//! (`Backoff::jittered`) follow the same schedule.

use std::time::Duration;

/// Capped exponential backoff: attempt `n` (1-based) waits `min(cap, base · 2^(n−1))`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The wait before the first retry.
    pub base: Duration,
    /// The longest wait.
    pub cap: Duration,
}

impl Backoff {
    /// A schedule from `base` doubling up to `cap`.
    #[must_use]
    pub const fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap }
    }

    /// The wait before attempt `attempt` (1-based): `min(cap, base · 2^(attempt−1))`;
    /// zero for attempt 0 (the first try does not wait).
    #[must_use]
    pub fn delay(&self, attempt: u32) -> Duration {
        if attempt == 0 {
            return Duration::ZERO;
        }
        let factor = 2u32.saturating_pow(attempt - 1);
        self.base
            .checked_mul(factor)
            .unwrap_or(Duration::MAX)
            .min(self.cap)
    }

    /// [`Self::delay`] with equal jitter: half the delay plus `unit` (a random draw in
    /// `[0, 1]`; NaN counts as 0, the rest is clamped) of the other half. Never more than
    /// the delay, never less than half of it.
    #[must_use]
    pub fn jittered(&self, attempt: u32, unit: f64) -> Duration {
        let delay = self.delay(attempt);
        let half = delay / 2;
        let unit = if unit.is_nan() {
            0.0
        } else {
            unit.clamp(0.0, 1.0)
        };
        half.saturating_add(delay.saturating_sub(half).mul_f64(unit))
            .min(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn doubles_from_base_up_to_cap() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let got: Vec<u64> = (0..9).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(got, [0, 1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(60));
        assert_eq!(b.jittered(3, 0.0), Duration::from_secs(2));
        assert_eq!(b.jittered(3, 1.0), Duration::from_secs(4));
        assert_eq!(b.jittered(3, f64::NAN), Duration::from_secs(2));
        assert_eq!(b.jittered(3, 7.0), Duration::from_secs(4));
    }

    proptest! {
        /// Every delay is within `[0, cap]`, never shrinks as attempts grow, and its jittered
        /// form is within `[delay/2, delay]` and grows with the draw.
        #[test]
        fn capped_monotone_and_jitter_within_half(
            base_ms in 0u64..10_000,
            cap_ms in 0u64..600_000,
            attempt in 0u32..80,
            a in 0.0f64..=1.0,
            b in 0.0f64..=1.0,
        ) {
            let s = Backoff::new(Duration::from_millis(base_ms), Duration::from_millis(cap_ms));
            let d = s.delay(attempt);
            prop_assert!(d <= s.cap);
            prop_assert!(s.delay(attempt + 1) >= d);
            if attempt >= 1 {
                prop_assert!(d >= s.base.min(s.cap));
            }
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            let (j_lo, j_hi) = (s.jittered(attempt, lo), s.jittered(attempt, hi));
            prop_assert!(j_lo >= d / 2 && j_hi <= d);
            prop_assert!(j_lo <= j_hi);
        }
    }
}
