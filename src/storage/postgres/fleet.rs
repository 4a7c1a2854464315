//! [`SeenEvents`] and [`Leases`] on PostgreSQL: what instances of a fleet decide together.
//!
//! - Seen ids: `INSERT … ON CONFLICT DO NOTHING RETURNING id`: of instances marking the same
//!   id, the insert that commits wins and only it reports the id new.
//! - Leases: one conditional upsert (`ON CONFLICT (name) DO UPDATE … WHERE` the lease is free at
//!   `now` or already the caller's), so two holders never both get it for the same `now`.

use std::collections::HashSet;

use super::{db_time, pg_err, PgStore};
use crate::storage::traits::{Leases, SeenEvents};
use crate::storage::{valid_event_key, Error, EventClaim, Result};

impl PgStore {
    /// Forgets seen ids whose time has come, in locked batches (`SKIP LOCKED`: instances
    /// sweeping at once neither block nor count one twice).
    pub(crate) fn forget_events(&self, now: i64, batch: i64) -> Result<u64> {
        let mut total = 0;
        loop {
            let n = self.with(async |c| {
                c.execute(
                    "WITH due AS (
                        SELECT id FROM ls_seen_events WHERE forget_at <= $1
                        LIMIT $2 FOR UPDATE SKIP LOCKED)
                     DELETE FROM ls_seen_events AS e USING due WHERE e.id = due.id",
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

impl PgStore {
    /// Claims event id `id` for this instance until `until` (unix ms). `Won`: claimed (it was
    /// free at `now`: never seen, or its claim or record lapsed); `Held(t)`: another handler
    /// holds it until `t` (`0` when the row went meanwhile, a released claim);
    /// `Recorded(t)`: handled, recorded until `t`. The insert that commits first wins, so of
    /// instances given the same event at once exactly one handles it.
    pub(crate) fn claim_event(&self, id: &str, until: u64, now: u64) -> Result<EventClaim> {
        if !valid_event_key(id) {
            return Err(Error::Invalid(format!(
                "event id of {} bytes cannot be claimed",
                id.len()
            )));
        }
        // The claim batcher's statement decides it (through the pool): one definition of
        // when an id is free and what holds it.
        self.claim_batch(&[(id, until)], now)?
            .pop()
            .ok_or_else(|| Error::Engine("the claim went unanswered".to_owned()))
    }

    /// Records ids (their handlers succeeded) as seen until `forget_at`, claimed or not: a
    /// claim becomes a record (one queued with its record's time keeps that time, see
    /// [`PgStore::queue_claims`]), an id already recorded keeps the later time. Returns once
    /// the records are committed.
    pub(crate) fn settle_events(&self, ids: &[&str], forget_at: u64) -> Result<()> {
        // Carried by the claim batcher's next round trip: one commit for the claims and the
        // settles of a batch (`claims`).
        self.settle_queued(ids, forget_at)
    }

    /// Lets ids this instance claimed until `until` go (their handler failed or never ran): a
    /// redelivery, on whichever instance it lands, is handled. Only the claim made with that
    /// `until` is deleted: a claim that lapsed and was taken again (a later `until`), or became
    /// a record, is left to its holder.
    pub(crate) fn release_events(&self, ids: &[&str], until: u64) -> Result<()> {
        let ids: Vec<String> = ids.iter().map(|id| (*id).to_owned()).collect();
        self.with(async |c| release(c, &ids, until).await)
    }
}

/// Deletes the claims of `ids` made until `until` ([`PgStore::release_events`]), on `c`.
pub(super) async fn release(c: &tokio_postgres::Client, ids: &[String], until: u64) -> Result<()> {
    c.execute(
        "DELETE FROM ls_seen_events
         WHERE id = ANY($1::text[]) AND COALESCE(held_until, forget_at) = $2",
        &[&ids, &db_time(until)],
    )
    .await
    .map_err(|e| pg_err(&e))?;
    Ok(())
}

impl SeenEvents for PgStore {
    fn mark_events_seen(&self, ids: &[&str], forget_at: u64) -> Result<Vec<bool>> {
        if let Some(bad) = ids.iter().find(|id| !valid_event_key(id)) {
            return Err(Error::Invalid(format!(
                "event id of {} bytes cannot be recorded",
                bad.len()
            )));
        }
        // Inserted in one order by every instance (sorted, then `ORDER BY`): two batches
        // sharing ids wait on each other's rows in the same order, so they cannot deadlock.
        let mut distinct: Vec<String> = ids.iter().map(|id| (*id).to_owned()).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let fresh: HashSet<String> = self.with(async |c| {
            let rows = c
                .query(
                    "INSERT INTO ls_seen_events (id, forget_at)
                     SELECT u.id, $2 FROM unnest($1::text[]) AS u(id) ORDER BY u.id COLLATE \"C\"
                     ON CONFLICT (id) DO NOTHING RETURNING id",
                    &[&distinct, &db_time(forget_at)],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            rows.iter()
                .map(|r| r.try_get::<_, String>(0).map_err(|e| pg_err(&e)))
                .collect()
        })?;
        let mut reported = HashSet::new();
        Ok(ids
            .iter()
            .map(|id| fresh.contains(*id) && reported.insert(*id))
            .collect())
    }

    fn event_seen(&self, id: &str) -> Result<bool> {
        self.with(async |c| {
            let row = c
                .query_opt("SELECT 1 FROM ls_seen_events WHERE id = $1", &[&id])
                .await
                .map_err(|e| pg_err(&e))?;
            Ok(row.is_some())
        })
    }
}

impl Leases for PgStore {
    fn try_acquire_lease(&self, name: &str, holder: &str, ttl_ms: u64, now: u64) -> Result<bool> {
        let until = db_time(now.saturating_add(ttl_ms));
        self.with(async |c| {
            let row = c
                .query_opt(
                    "INSERT INTO ls_leases AS l (name, holder, expires_at) VALUES ($1, $2, $3)
                     ON CONFLICT (name) DO UPDATE
                        SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
                        WHERE l.expires_at <= $4 OR l.holder = EXCLUDED.holder
                     RETURNING holder",
                    &[&name, &holder, &until, &db_time(now)],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            Ok(row.is_some())
        })
    }

    fn renew_lease(&self, name: &str, holder: &str, ttl_ms: u64, now: u64) -> Result<bool> {
        let until = db_time(now.saturating_add(ttl_ms));
        self.with(async |c| {
            let n = c
                .execute(
                    "UPDATE ls_leases SET expires_at = $3
                     WHERE name = $1 AND holder = $2 AND expires_at > $4",
                    &[&name, &holder, &until, &db_time(now)],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            Ok(n == 1)
        })
    }

    fn release_lease(&self, name: &str, holder: &str) -> Result<bool> {
        self.with(async |c| {
            let n = c
                .execute(
                    "DELETE FROM ls_leases WHERE name = $1 AND holder = $2",
                    &[&name, &holder],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            Ok(n == 1)
        })
    }

    fn lease_holder(&self, name: &str, now: u64) -> Result<Option<String>> {
        self.with(async |c| {
            let row = c
                .query_opt(
                    "SELECT holder FROM ls_leases WHERE name = $1 AND expires_at > $2",
                    &[&name, &db_time(now)],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            row.map(|r| r.try_get(0).map_err(|e| pg_err(&e)))
                .transpose()
        })
    }
}
