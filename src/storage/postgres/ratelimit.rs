//! Rate limits counted in the database (`ls_rate_counts`), so a fleet of N instances allows
//! the limit once, not N times.
//!
//! Counters per `(key, window)`: time is cut into fixed windows of the limit's length, and an
//! event is admitted only while the previous window's count plus the current one's is under
//! the limit. Any span of one window's length overlaps at most two consecutive windows, so no
//! such span ever holds more than `limit` admitted events: as strict as the in-memory sliding
//! window (`crate::ratelimit`), at the price of waiting up to one window longer after a burst.
//!
//! One statement decides and counts (`INSERT … SELECT … WHERE` for a new window, `ON CONFLICT
//! DO UPDATE … WHERE` for an existing one; PostgreSQL re-checks the condition on the latest row
//! version under its row lock), so concurrent instances never both take the last slot. Rows
//! carry the time they stop mattering (`forget_at`, two windows after their start); the
//! same statement deletes the key's older rows and the sweep deletes the rest.

use std::time::Duration;

use super::{db_time, pg_err, PgStore};
use crate::storage::Result;

impl PgStore {
    /// Counts one event of `key` at `now` (unix ms) against `limit` (at least 1) per `window`:
    /// `Ok(None)` admitted (and counted), `Ok(Some(wait))` refused (not counted), `wait` being
    /// at least how long until an event can be admitted again.
    pub fn rate_acquire(
        &self,
        key: &str,
        limit: u32,
        window: Duration,
        now: u64,
    ) -> Result<Option<Duration>> {
        let limit = i64::from(limit.max(1));
        let w = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
        let cur = now - now % w;
        let prev = cur.saturating_sub(w);
        let forget_at = cur.saturating_add(w.saturating_mul(2));
        let (admitted, cur_n) = self.with(async |c| {
            let row = c
                .query_one(
                    "WITH prev AS (
                        SELECT coalesce(max(count), 0) AS n FROM ls_rate_counts
                        WHERE key = $1 AND window_start = $2),
                     up AS (
                        INSERT INTO ls_rate_counts AS r (key, window_start, count, forget_at)
                        SELECT $1, $3, 1, $5 FROM prev WHERE prev.n < $4
                        ON CONFLICT (key, window_start) DO UPDATE SET count = r.count + 1
                            WHERE r.count + (SELECT n FROM prev) < $4
                        RETURNING count),
                     gone AS (
                        DELETE FROM ls_rate_counts WHERE key = $1 AND window_start < $2
                        RETURNING 1)
                     SELECT (SELECT count FROM up),
                        (SELECT count FROM ls_rate_counts WHERE key = $1 AND window_start = $3)",
                    &[
                        &key,
                        &db_time(prev),
                        &db_time(cur),
                        &limit,
                        &db_time(forget_at),
                    ],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            let admitted: Option<i64> = row.try_get(0).map_err(|e| pg_err(&e))?;
            let cur_n: Option<i64> = row.try_get(1).map_err(|e| pg_err(&e))?;
            Ok((admitted.is_some(), cur_n.unwrap_or(0)))
        })?;
        if admitted {
            return Ok(None);
        }
        // The previous window leaves at the next boundary; if the current one alone is full,
        // it leaves one window later.
        let boundary = cur.saturating_add(w);
        let free_at = if cur_n >= limit {
            boundary.saturating_add(w)
        } else {
            boundary
        };
        Ok(Some(Duration::from_millis(
            free_at.saturating_sub(now).max(1),
        )))
    }

    /// Deletes rate counters whose time has come (`forget_at <= now`), in batches.
    pub(crate) fn forget_rate_counts(&self, now: i64, batch: i64) -> Result<u64> {
        let mut total = 0;
        loop {
            let n = self.with(async |c| {
                c.execute(
                    "WITH due AS (
                        SELECT key, window_start FROM ls_rate_counts WHERE forget_at <= $1
                        LIMIT $2 FOR UPDATE SKIP LOCKED)
                     DELETE FROM ls_rate_counts AS r USING due
                     WHERE r.key = due.key AND r.window_start = due.window_start",
                    &[&now, &batch],
                )
                .await
                .map_err(|e| pg_err(&e))
            })?;
            total += n;
            if i64::try_from(n).unwrap_or(i64::MAX) < batch {
                return Ok(total);
            }
        }
    }
}
