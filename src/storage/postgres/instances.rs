//! The fleet's instances (`ls_instances`): each instance upserts its own row every few
//! seconds (its heartbeat) and deletes it when it stops cleanly. An instance is *live* while
//! its row was seen within the caller's window (three heartbeat intervals); a row not seen for
//! [`FORGET_AFTER_MS`] (a crashed instance) is deleted by the next heartbeat of any instance.
//!
//! Times are the callers' clocks (unix ms), as for leases: instances of a fleet are expected to
//! run NTP; a clock skew larger than the live window makes an instance look gone.

use super::{api_time, db_time, pg_err, PgStore};
use crate::storage::Result;

/// A row not seen for this long is deleted (one day): long after any live window, so a
/// crashed instance stays listed for a while, then goes.
pub const FORGET_AFTER_MS: u64 = 24 * 3600 * 1000;

/// One instance of the fleet, as its heartbeat row records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceRow {
    /// Its lease holder id (`host/pid/random`).
    pub holder: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Version of the binary.
    pub version: String,
    /// When it started (unix ms).
    pub started_at: u64,
    /// Its last heartbeat (unix ms).
    pub last_seen: u64,
}

impl PgStore {
    /// Upserts this instance's heartbeat row (`me.last_seen` is the beat's time) and returns
    /// how many instances are live at `me.last_seen`, this one included: those seen within
    /// `live_within_ms`. One statement; it also deletes rows not seen for [`FORGET_AFTER_MS`],
    /// and leases that lapsed that long ago (a lease is deleted by its holder when it lets it
    /// go; one whose holder died, say a user's refresh or request lease, would stay forever).
    pub fn heartbeat(&self, me: &InstanceRow, live_within_ms: u64) -> Result<u64> {
        let now = me.last_seen;
        let live_since = db_time(now.saturating_sub(live_within_ms));
        let forget_before = db_time(now.saturating_sub(FORGET_AFTER_MS));
        // The keys this instance holds (schema 7), so a rotation can tell whether every live
        // instance opens what it seals.
        let key_ids: Vec<i64> = self.ring().ids().iter().map(|k| i64::from(k.0)).collect();
        let active = i64::from(self.active_key_id().0);
        self.with(async |c| {
            // The main query reads the snapshot from before the CTEs' writes: it counts the
            // other live instances, and this one is added.
            let row = c
                .query_one(
                    "WITH up AS (
                        INSERT INTO ls_instances AS i
                            (holder, host, pid, version, started_at, last_seen, key_ids,
                             active_key)
                        VALUES ($1, $2, $3, $4, $5, $6, $9, $10)
                        ON CONFLICT (holder) DO UPDATE SET last_seen = EXCLUDED.last_seen,
                            host = EXCLUDED.host, pid = EXCLUDED.pid, version = EXCLUDED.version,
                            key_ids = EXCLUDED.key_ids, active_key = EXCLUDED.active_key
                        RETURNING 1),
                     gone AS (
                        DELETE FROM ls_instances WHERE last_seen < $8 AND holder <> $1
                        RETURNING 1),
                     lapsed AS (
                        DELETE FROM ls_leases WHERE expires_at < $8
                        RETURNING 1)
                     SELECT count(*) FROM ls_instances WHERE last_seen >= $7 AND holder <> $1",
                    &[
                        &me.holder,
                        &me.host,
                        &i64::from(me.pid),
                        &me.version,
                        &db_time(me.started_at),
                        &db_time(now),
                        &live_since,
                        &forget_before,
                        &key_ids,
                        &active,
                    ],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            let others: i64 = row.try_get(0).map_err(|e| pg_err(&e))?;
            Ok(u64::try_from(others).unwrap_or(0).saturating_add(1))
        })
    }

    /// The instances seen within `live_within_ms` of `now`, oldest first.
    pub fn live_instances(&self, now: u64, live_within_ms: u64) -> Result<Vec<InstanceRow>> {
        let since = db_time(now.saturating_sub(live_within_ms));
        self.with(async |c| {
            let rows = c
                .query(
                    "SELECT holder, host, pid, version, started_at, last_seen FROM ls_instances
                     WHERE last_seen >= $1 ORDER BY started_at, holder",
                    &[&since],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            rows.iter()
                .map(|r| {
                    let pid: i64 = r.try_get(2).map_err(|e| pg_err(&e))?;
                    Ok(InstanceRow {
                        holder: r.try_get(0).map_err(|e| pg_err(&e))?,
                        host: r.try_get(1).map_err(|e| pg_err(&e))?,
                        pid: u32::try_from(pid).unwrap_or(0),
                        version: r.try_get(3).map_err(|e| pg_err(&e))?,
                        started_at: api_time(
                            r.try_get(4).map_err(|e| pg_err(&e))?,
                            "ls_instances",
                        )?,
                        last_seen: api_time(r.try_get(5).map_err(|e| pg_err(&e))?, "ls_instances")?,
                    })
                })
                .collect()
        })
    }

    /// Deletes `holder`'s row (a clean stop); true if it was there.
    pub fn forget_instance(&self, holder: &str) -> Result<bool> {
        self.with(async |c| {
            let n = c
                .execute("DELETE FROM ls_instances WHERE holder = $1", &[&holder])
                .await
                .map_err(|e| pg_err(&e))?;
            Ok(n == 1)
        })
    }

    /// The live instances (seen within `live_within_ms` of `now`) that would not serve what is
    /// sealed under `key`: those whose heartbeat does not list it among their keys, or whose
    /// active key is another (they would keep sealing new secrets under that one), or that say
    /// nothing (an older build). Each as `holder (why)`; empty when every live instance is
    /// ready for `key`.
    pub fn instances_not_ready_for(
        &self,
        key: crate::storage::KeyId,
        now: u64,
        live_within_ms: u64,
    ) -> Result<Vec<String>> {
        let since = db_time(now.saturating_sub(live_within_ms));
        let key = i64::from(key.0);
        self.with(async |c| {
            let rows = c
                .query(
                    "SELECT holder, CASE
                         WHEN key_ids IS NULL THEN 'its build does not report its keys'
                         WHEN NOT ($2 = ANY (key_ids)) THEN 'lacks the key'
                         ELSE 'seals under another active key' END
                     FROM ls_instances
                     WHERE last_seen >= $1
                       AND (key_ids IS NULL OR NOT ($2 = ANY (key_ids))
                            OR active_key IS DISTINCT FROM $2)
                     ORDER BY holder",
                    &[&since, &key],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            rows.iter()
                .map(|r| {
                    let holder: String = r.try_get(0).map_err(|e| pg_err(&e))?;
                    let why: String = r.try_get(1).map_err(|e| pg_err(&e))?;
                    Ok(format!("{holder} ({why})"))
                })
                .collect()
        })
    }
}
