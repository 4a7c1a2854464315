//! The webhook outbox and the users' grants on PostgreSQL ([`Outbox`]), as the redb store keeps
//! them (`storage::outbox`): the same contract, checked by the same conformance suite.
//!
//! - `ls_outbox` holds the live entries, `ls_outbox_dead` the entries out of attempts (moved in
//!   one transaction). The sequence number comes from the PostgreSQL sequence `ls_outbox_seq`,
//!   which never hands a number out twice (not even after a rollback). Two transactions may
//!   commit their entries out of sequence order; the delivery worker reads every live entry in
//!   each unit (no cursor), so a late commit is read at the next unit and nothing is skipped.
//! - The body is the exact bytes delivered, ids and times only (never a secret), so it is kept
//!   as it is, not sealed: the redb store's rule.
//! - The `_with_events` writes append in the transaction of the change (one `with` unit, so a
//!   retry after a serialization failure runs the change and its append again, together).
//! - `ls_grants`: one row per user, `(granted_at, reminded_at or 0)`. A completion storing a
//!   token records a new grant in its transaction (`sessions`).
//!
//! Delivery across a fleet is the worker's business (`daemon`): it runs under the fleet lease
//! `worker/webhooks`, so one instance at a time sends; these calls are each one statement or
//! one transaction and never hold a transaction across an HTTP call.

use tokio_postgres::{GenericClient, Row, Transaction};

use super::rows::id_from;
use super::tokens::write_token;
use super::{api_time, db_time, pg_err, PgStore};
use crate::storage::outbox::validate_event;
use crate::storage::records::SESSIONS_TABLE;
use crate::storage::sessions::validate_ids;
use crate::storage::traits::Outbox;
use crate::storage::{
    AuthSession, ExpiringGrant, OutboxEntry, OutboxEvent, PendingUpdate, Result, SessionId,
    SessionSummary, UserToken,
};

pub(crate) const ENTRY_COLUMNS: &str =
    "seq, event_id, kind, body, created_at, attempts, next_attempt_at, delivered_to, last_error";

pub(crate) fn entry(row: &Row) -> Result<OutboxEntry> {
    let e = |e: tokio_postgres::Error| pg_err(&e);
    let seq: i64 = row.try_get(0).map_err(e)?;
    let attempts: i32 = row.try_get(5).map_err(e)?;
    Ok(OutboxEntry {
        seq: api_time(seq, "outbox")?,
        event_id: row.try_get(1).map_err(e)?,
        kind: row.try_get(2).map_err(e)?,
        body: row.try_get(3).map_err(e)?,
        created_at: api_time(row.try_get(4).map_err(e)?, "outbox")?,
        attempts: u32::try_from(attempts).unwrap_or(0),
        next_attempt_at: api_time(row.try_get(6).map_err(e)?, "outbox")?,
        delivered_to: row.try_get(7).map_err(e)?,
        last_error: row.try_get(8).map_err(e)?,
    })
}

fn attempts_param(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Appends `events` at `now` inside `tx` (nothing when empty). Refuses the whole batch, before
/// writing, if an event id or kind is out of bounds.
pub(crate) async fn append_in(
    tx: &Transaction<'_>,
    events: &[OutboxEvent],
    now: u64,
) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    for e in events {
        validate_event(e)?;
    }
    let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let bodies: Vec<&[u8]> = events.iter().map(|e| e.body.as_slice()).collect();
    // `WITH ORDINALITY` keeps the caller's order in the sequence numbers.
    tx.execute(
        "INSERT INTO ls_outbox (seq, event_id, kind, body, created_at, attempts, next_attempt_at,
                                delivered_to, last_error)
         SELECT nextval('ls_outbox_seq'), e.id, e.kind, e.body, $4, 0, $4, '{}', NULL
         FROM unnest($1::text[], $2::text[], $3::bytea[]) WITH ORDINALITY AS e(id, kind, body, n)
         ORDER BY e.n",
        &[&ids, &kinds, &bodies, &db_time(now)],
    )
    .await
    .map_err(|e| pg_err(&e))?;
    Ok(())
}

/// Records a new grant of `app_id`/`user_id` at `at` inside `tx`, its reminder not sent yet.
pub(crate) async fn record_grant_in(
    tx: &Transaction<'_>,
    app_id: &str,
    user_id: &str,
    at: u64,
) -> Result<()> {
    tx.execute(
        "INSERT INTO ls_grants (app_id, user_id, granted_at, reminded_at) VALUES ($1, $2, $3, 0)
         ON CONFLICT (app_id, user_id) DO UPDATE SET granted_at = EXCLUDED.granted_at,
            reminded_at = 0",
        &[&app_id, &user_id, &db_time(at)],
    )
    .await
    .map_err(|e| pg_err(&e))?;
    Ok(())
}

async fn read_entries(
    c: &impl GenericClient,
    dead: bool,
    limit: usize,
) -> Result<Vec<OutboxEntry>> {
    let table = if dead { "ls_outbox_dead" } else { "ls_outbox" };
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = c
        .query(
            &format!("SELECT {ENTRY_COLUMNS} FROM {table} ORDER BY seq LIMIT $1"),
            &[&limit],
        )
        .await
        .map_err(|e| pg_err(&e))?;
    rows.iter().map(entry).collect()
}

impl PgStore {
    /// Appends `events` in one transaction.
    pub fn outbox_append(&self, events: &[OutboxEvent], now: u64) -> Result<()> {
        for e in events {
            validate_event(e)?;
        }
        self.with(async |c| {
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            append_in(&tx, events, now).await?;
            tx.commit().await.map_err(|e| pg_err(&e))
        })
    }

    /// Up to `limit` live entries, lowest seq first.
    pub fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxEntry>> {
        self.with(async |c| read_entries(&*c, false, limit).await)
    }

    /// Up to `limit` dead entries, lowest seq first.
    pub fn outbox_dead(&self, limit: usize) -> Result<Vec<OutboxEntry>> {
        self.with(async |c| read_entries(&*c, true, limit).await)
    }

    /// Deletes live entry `seq`; true if it was live.
    pub fn outbox_delivered(&self, seq: u64) -> Result<bool> {
        let seq = db_time(seq);
        self.with(async |c| {
            let n = c
                .execute("DELETE FROM ls_outbox WHERE seq = $1", &[&seq])
                .await
                .map_err(|e| pg_err(&e))?;
            Ok(n > 0)
        })
    }

    /// Stores the progress of live entry `entry.seq` (never its event); false if not live.
    pub fn outbox_reschedule(&self, entry: &OutboxEntry) -> Result<bool> {
        self.with(async |c| {
            let n = c
                .execute(
                    "UPDATE ls_outbox SET attempts = $2, next_attempt_at = $3, delivered_to = $4,
                        last_error = $5
                     WHERE seq = $1",
                    &[
                        &db_time(entry.seq),
                        &attempts_param(entry.attempts),
                        &db_time(entry.next_attempt_at),
                        &entry.delivered_to,
                        &entry.last_error,
                    ],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            Ok(n > 0)
        })
    }

    /// Moves live entry `entry.seq` with its final progress to the dead entries, in one
    /// statement (the delete and the insert commit together); false if not live.
    pub fn outbox_bury(&self, entry: &OutboxEntry) -> Result<bool> {
        self.with(async |c| {
            let n = c
                .execute(
                    "WITH gone AS (DELETE FROM ls_outbox WHERE seq = $1 RETURNING *)
                     INSERT INTO ls_outbox_dead (seq, event_id, kind, body, created_at, attempts,
                        next_attempt_at, delivered_to, last_error)
                     SELECT seq, event_id, kind, body, created_at, $2, $3, $4, $5 FROM gone",
                    &[
                        &db_time(entry.seq),
                        &attempts_param(entry.attempts),
                        &db_time(entry.next_attempt_at),
                        &entry.delivered_to,
                        &entry.last_error,
                    ],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            Ok(n > 0)
        })
    }

    /// (live, dead) entry counts. PostgreSQL counts the rows (an outbox is small: entries
    /// leave it once delivered).
    pub fn outbox_counts(&self) -> Result<(u64, u64)> {
        self.with(async |c| {
            let row = c
                .query_one(
                    "SELECT (SELECT count(*) FROM ls_outbox), (SELECT count(*) FROM ls_outbox_dead)",
                    &[],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            let n = |i: usize| -> Result<u64> {
                let v: i64 = row.try_get(i).map_err(|e| pg_err(&e))?;
                Ok(u64::try_from(v).unwrap_or(0))
            };
            Ok((n(0)?, n(1)?))
        })
    }

    /// `(granted_at, reminded_at or 0)` of the user's current grant.
    pub fn grant_of(&self, app_id: &str, user_id: &str) -> Result<Option<(u64, u64)>> {
        self.with(async |c| {
            let row = c
                .query_opt(
                    "SELECT granted_at, reminded_at FROM ls_grants
                     WHERE app_id = $1 AND user_id = $2",
                    &[&app_id, &user_id],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            row.map(|r| {
                Ok((
                    api_time(r.try_get(0).map_err(|e| pg_err(&e))?, "grants")?,
                    api_time(r.try_get(1).map_err(|e| pg_err(&e))?, "grants")?,
                ))
            })
            .transpose()
        })
    }

    /// The users with a refreshable token whose grant was made at or before `granted_before`
    /// and who were not reminded of it yet, oldest grant first, at most `limit`.
    pub fn grants_to_remind(
        &self,
        granted_before: u64,
        limit: usize,
    ) -> Result<Vec<ExpiringGrant>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(async |c| {
            let rows = c
                .query(
                    "SELECT g.app_id, g.user_id, t.open_id, t.session_id, t.scopes, g.granted_at
                     FROM ls_grants AS g
                     JOIN ls_tokens AS t ON t.app_id = g.app_id AND t.user_id = g.user_id
                     WHERE g.reminded_at = 0 AND g.granted_at <= $1
                       AND t.refresh_token IS NOT NULL AND NOT t.needs_reauth
                     ORDER BY g.granted_at, g.app_id, g.user_id LIMIT $2",
                    &[&db_time(granted_before), &limit],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            rows.iter()
                .map(|r| {
                    let e = |e: tokio_postgres::Error| pg_err(&e);
                    let session: Option<Vec<u8>> = r.try_get(3).map_err(e)?;
                    Ok(ExpiringGrant {
                        app_id: r.try_get(0).map_err(e)?,
                        user_id: r.try_get(1).map_err(e)?,
                        open_id: r.try_get(2).map_err(e)?,
                        session_id: session.map(|b| id_from(SESSIONS_TABLE, &b)).transpose()?,
                        scopes: r.try_get(4).map_err(e)?,
                        granted_at: api_time(r.try_get(5).map_err(e)?, "grants")?,
                    })
                })
                .collect()
        })
    }

    /// Records the reminder (at `now`) of the grant made at `granted_at` and appends `events`,
    /// in one transaction; false and nothing written if the user's grant is another one.
    pub fn mark_reminded(
        &self,
        app_id: &str,
        user_id: &str,
        granted_at: u64,
        events: &[OutboxEvent],
        now: u64,
    ) -> Result<bool> {
        validate_ids(app_id, user_id)?;
        for e in events {
            validate_event(e)?;
        }
        self.with(async |c| {
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            let n = tx
                .execute(
                    "UPDATE ls_grants SET reminded_at = $4
                     WHERE app_id = $1 AND user_id = $2 AND granted_at = $3",
                    &[
                        &app_id,
                        &user_id,
                        &db_time(granted_at),
                        &db_time(now.max(1)),
                    ],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            if n == 0 {
                tx.rollback().await.map_err(|e| pg_err(&e))?;
                return Ok(false);
            }
            append_in(&tx, events, now).await?;
            tx.commit().await.map_err(|e| pg_err(&e))?;
            Ok(true)
        })
    }

    /// `put_token` that appends `events` (at `now`) in the same transaction.
    pub fn put_token_with_events(
        &self,
        token: &UserToken,
        events: &[OutboxEvent],
        now: u64,
    ) -> Result<()> {
        for e in events {
            validate_event(e)?;
        }
        self.with(async |c| {
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            write_token(self, &tx, token).await?;
            append_in(&tx, events, now).await?;
            tx.commit().await.map_err(|e| pg_err(&e))
        })
    }

    /// `delete_token` that appends `events` (at `now`) in the same transaction, only when there
    /// was a token.
    pub fn delete_token_with_events(
        &self,
        app_id: &str,
        user_id: &str,
        events: &[OutboxEvent],
        now: u64,
    ) -> Result<bool> {
        for e in events {
            validate_event(e)?;
        }
        self.with(async |c| {
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            let n = tx
                .execute(
                    "DELETE FROM ls_tokens WHERE app_id = $1 AND user_id = $2",
                    &[&app_id, &user_id],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            if n > 0 {
                append_in(&tx, events, now).await?;
            }
            tx.commit().await.map_err(|e| pg_err(&e))?;
            Ok(n > 0)
        })
    }
}

impl Outbox for PgStore {
    fn outbox_append(&self, events: &[OutboxEvent], now: u64) -> Result<()> {
        PgStore::outbox_append(self, events, now)
    }
    fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxEntry>> {
        PgStore::outbox_pending(self, limit)
    }
    fn outbox_dead(&self, limit: usize) -> Result<Vec<OutboxEntry>> {
        PgStore::outbox_dead(self, limit)
    }
    fn outbox_delivered(&self, seq: u64) -> Result<bool> {
        PgStore::outbox_delivered(self, seq)
    }
    fn outbox_reschedule(&self, entry: &OutboxEntry) -> Result<bool> {
        PgStore::outbox_reschedule(self, entry)
    }
    fn outbox_bury(&self, entry: &OutboxEntry) -> Result<bool> {
        PgStore::outbox_bury(self, entry)
    }
    fn outbox_counts(&self) -> Result<(u64, u64)> {
        PgStore::outbox_counts(self)
    }
    fn update_if_pending_with_events(
        &self,
        expect_hash: Option<[u8; 32]>,
        s: &AuthSession,
        token: Option<&UserToken>,
        events: &[OutboxEvent],
    ) -> Result<PendingUpdate> {
        PgStore::update_if_pending_with_events(self, expect_hash, s, token, events)
    }
    fn revoke_session_with_events<F: FnOnce(&SessionSummary) -> Vec<OutboxEvent>>(
        &self,
        id: SessionId,
        now: u64,
        events_for: F,
    ) -> Result<Option<AuthSession>> {
        PgStore::revoke_session_with_events(self, id, now, events_for)
    }
    fn put_token_with_events(
        &self,
        token: &UserToken,
        events: &[OutboxEvent],
        now: u64,
    ) -> Result<()> {
        PgStore::put_token_with_events(self, token, events, now)
    }
    fn delete_token_with_events(
        &self,
        app_id: &str,
        user_id: &str,
        events: &[OutboxEvent],
        now: u64,
    ) -> Result<bool> {
        PgStore::delete_token_with_events(self, app_id, user_id, events, now)
    }
    fn grant_of(&self, app_id: &str, user_id: &str) -> Result<Option<(u64, u64)>> {
        PgStore::grant_of(self, app_id, user_id)
    }
    fn grants_to_remind(&self, granted_before: u64, limit: usize) -> Result<Vec<ExpiringGrant>> {
        PgStore::grants_to_remind(self, granted_before, limit)
    }
    fn mark_reminded(
        &self,
        app_id: &str,
        user_id: &str,
        granted_at: u64,
        events: &[OutboxEvent],
        now: u64,
    ) -> Result<bool> {
        PgStore::mark_reminded(self, app_id, user_id, granted_at, events, now)
    }
}
