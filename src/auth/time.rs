//! Durations as the flow stores and shows them.

use std::time::Duration;

/// Whole seconds, rounded up, at least 1 (a `Retry-After`).
pub(super) fn ceil_secs(d: Duration) -> u64 {
    d.as_millis()
        .div_ceil(1000)
        .max(1)
        .try_into()
        .unwrap_or(u64::MAX)
}

/// Milliseconds, saturating (the store's unit).
pub(super) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
