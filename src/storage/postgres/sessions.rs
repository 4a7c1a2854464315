//! [`SessionStore`] on PostgreSQL.
//!
//! Every write is one transaction: the row (its indexes are PostgreSQL's), the per-state counts
//! (triggers, in the same transaction) and the change-feed entry. The compare-and-set of the
//! authorization flow is a conditional `UPDATE … WHERE state = 'pending' AND state_hash = $…`:
//! of two instances racing, the second waits on the row lock, re-checks the condition against
//! the winner's row and updates nothing. The sweep takes due rows in batches with
//! `FOR UPDATE SKIP LOCKED`, so instances sweeping at once split the work instead of blocking
//! or counting an expiry twice.

use tokio_postgres::{GenericClient, Transaction};

use super::feed::{append_changes, KIND_DELETE, KIND_UPSERT};
use super::outbox::{append_in, record_grant_in};
use super::rows::{
    id_bytes, id_from, stored_session, SessionParams, SESSION_COLUMNS, SESSION_UPDATE_SET,
    SESSION_VALUES,
};
use super::tokens::write_token;
use super::{db_time, pg_err, PgStore};
use crate::storage::outbox::validate_event;
use crate::storage::records::{StoredSession, SESSIONS_TABLE};
use crate::storage::sessions::validate_ids;
use crate::storage::traits::SessionStore;
use crate::storage::{
    AuthSession, FailureReason, OutboxEvent, PendingUpdate, Result, SessionId, SessionState,
    SessionSummary, SweepReport, UserToken,
};

impl PgStore {
    fn sealed_params(&self, s: &AuthSession) -> Result<SessionParams> {
        validate_ids(&s.app_id, &s.user_id)?;
        Ok(SessionParams::new(
            s.session_id,
            StoredSession::seal(s, self.ring()),
        ))
    }

    fn open_row(&self, row: &tokio_postgres::Row) -> Result<AuthSession> {
        let (id, stored) = stored_session(row)?;
        stored.open(id, self.ring())
    }

    /// Upserts sealed sessions and appends their changes, inside `tx`.
    async fn upsert(&self, tx: &Transaction<'_>, rows: &[SessionParams]) -> Result<()> {
        let sql = format!(
            "INSERT INTO ls_sessions ({SESSION_COLUMNS}) VALUES ({SESSION_VALUES})
             ON CONFLICT (id) DO UPDATE SET {SESSION_UPDATE_SET}"
        );
        let stmt = tx.prepare(&sql).await.map_err(|e| pg_err(&e))?;
        let mut changes = Vec::with_capacity(rows.len());
        for p in rows {
            tx.execute(&stmt, &p.params())
                .await
                .map_err(|e| pg_err(&e))?;
            changes.push((KIND_UPSERT, p.id.clone()));
        }
        append_changes(tx, self.change_feed_on(), &changes).await
    }

    async fn session_in(
        &self,
        c: &impl GenericClient,
        id: SessionId,
    ) -> Result<Option<AuthSession>> {
        let row = c
            .query_opt(
                &format!("SELECT {SESSION_COLUMNS} FROM ls_sessions WHERE id = $1"),
                &[&id_bytes(id)],
            )
            .await
            .map_err(|e| pg_err(&e))?;
        row.map(|r| self.open_row(&r)).transpose()
    }
}

pub(crate) fn summary(row: &tokio_postgres::Row) -> Result<SessionSummary> {
    let (id, s) = stored_session(row)?;
    Ok(SessionSummary {
        session_id: id.to_string(),
        app_id: s.app_id.clone(),
        user_id: s.user_id.clone(),
        open_id: s.open_id.clone(),
        state: s.state.as_str(),
        failure_reason: s.failure_reason.map(FailureReason::as_str),
        created_at: s.created_at,
        updated_at: s.updated_at,
        expires_at: s.expires_at,
        has_tokens: s.access_token.is_some(),
        token_expires_at: s.token_expires_at,
        scopes: s.scopes,
    })
}

impl PgStore {
    /// Folds the per-state count deltas into the counts, if no other instance is doing it.
    fn fold_count_deltas(&self) -> Result<()> {
        self.with(async |c| {
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            let got: bool = tx
                .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&COUNT_FOLD_LOCK])
                .await
                .and_then(|r| r.try_get(0))
                .map_err(|e| pg_err(&e))?;
            if got {
                tx.execute(
                    "WITH d AS (DELETE FROM ls_session_count_deltas RETURNING state, delta),
                          s AS (SELECT state, sum(delta)::bigint AS n FROM d GROUP BY state)
                     UPDATE ls_session_counts AS c SET n = c.n + s.n FROM s
                     WHERE c.state = s.state",
                    &[],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            }
            tx.commit().await.map_err(|e| pg_err(&e))
        })
    }
}

impl PgStore {
    /// `update_if_pending` that also appends `events` (at the session's `updated_at`) in the
    /// same transaction, only when the transition is written; a token written with it records
    /// the user's new grant.
    pub fn update_if_pending_with_events(
        &self,
        expect_hash: Option<[u8; 32]>,
        s: &AuthSession,
        token: Option<&UserToken>,
        events: &[OutboxEvent],
    ) -> Result<PendingUpdate> {
        for e in events {
            validate_event(e)?;
        }
        let p = self.sealed_params(s)?;
        let expect = expect_hash.map(|h| h.to_vec());
        self.with(async |c| {
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            // The same columns as the upsert, but only over a pending row with the expected
            // hash: the row lock orders racers, and a loser re-checks against the winner.
            let sql = format!(
                "UPDATE ls_sessions AS t SET ({SESSION_COLUMNS}) = ({SESSION_VALUES})
                 WHERE t.id = $1 AND t.state = 'pending' AND t.state_hash IS NOT DISTINCT FROM $25"
            );
            let params = p.params();
            let mut all: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params.to_vec();
            all.push(&expect);
            let n = tx.execute(&sql, &all).await.map_err(|e| pg_err(&e))?;
            if n == 0 {
                tx.rollback().await.map_err(|e| pg_err(&e))?;
                return Ok(match self.session_in(&*c, s.session_id).await? {
                    None => PendingUpdate::Missing,
                    Some(cur) => PendingUpdate::Lost(Box::new(cur)),
                });
            }
            if let Some(token) = token {
                write_token(self, &tx, token).await?;
                record_grant_in(&tx, &token.app_id, &token.user_id, s.updated_at).await?;
            }
            append_changes(
                &tx,
                self.change_feed_on(),
                &[(KIND_UPSERT, id_bytes(s.session_id))],
            )
            .await?;
            append_in(&tx, events, s.updated_at).await?;
            tx.commit().await.map_err(|e| pg_err(&e))?;
            Ok(PendingUpdate::Written)
        })
    }

    /// `revoke_session` that also appends the events `events_for` makes of the revoked session
    /// (no secrets left in it) in the same transaction; nothing without a session.
    /// `events_for` is called once: a transaction run again after a serialization failure
    /// appends the same events.
    pub fn revoke_session_with_events<F: FnOnce(&SessionSummary) -> Vec<OutboxEvent>>(
        &self,
        id: SessionId,
        now: u64,
        events_for: F,
    ) -> Result<Option<AuthSession>> {
        let key = id_bytes(id);
        let mut make = Some(events_for);
        let mut made: Option<Vec<OutboxEvent>> = None;
        self.with(async |c| {
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            let row = tx
                .query_opt(
                    &format!(
                        "UPDATE ls_sessions SET state = 'revoked', updated_at = $2,
                            access_token = NULL, access_token_key = NULL,
                            refresh_token = NULL, refresh_token_key = NULL,
                            pkce_verifier = NULL, pkce_verifier_key = NULL
                         WHERE id = $1 RETURNING {SESSION_COLUMNS}"
                    ),
                    &[&key, &db_time(now)],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            let Some(row) = row else {
                return Ok(None);
            };
            let revoked = self.open_row(&row)?;
            tx.execute(
                "DELETE FROM ls_tokens WHERE app_id = $1 AND user_id = $2 AND session_id = $3",
                &[&revoked.app_id, &revoked.user_id, &key],
            )
            .await
            .map_err(|e| pg_err(&e))?;
            append_changes(&tx, self.change_feed_on(), &[(KIND_UPSERT, key.clone())]).await?;
            let events = match &made {
                Some(e) => e.clone(),
                None => {
                    let e = match make.take() {
                        Some(f) => f(&summary(&row)?),
                        None => Vec::new(),
                    };
                    made = Some(e.clone());
                    e
                }
            };
            append_in(&tx, &events, now).await?;
            tx.commit().await.map_err(|e| pg_err(&e))?;
            Ok(Some(revoked))
        })
    }
}

/// The advisory lock key of folding the count deltas.
const COUNT_FOLD_LOCK: i64 = 0x6c73_5f63_6f75_6e74; // "ls_count"

impl SessionStore for PgStore {
    fn put_session(&self, s: &AuthSession) -> Result<()> {
        self.put_sessions(std::slice::from_ref(s))
    }

    fn put_sessions(&self, sessions: &[AuthSession]) -> Result<()> {
        let mut rows = sessions
            .iter()
            .map(|s| self.sealed_params(s))
            .collect::<Result<Vec<_>>>()?;
        // Rows locked in id order by every writer: two instances writing overlapping batches
        // cannot deadlock. A stable sort keeps the last of one id last (it wins, as in order).
        rows.sort_by(|a, b| a.id.cmp(&b.id));
        self.with(async |c| {
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            self.upsert(&tx, &rows).await?;
            tx.commit().await.map_err(|e| pg_err(&e))
        })
    }

    fn get_session(&self, id: SessionId) -> Result<Option<AuthSession>> {
        self.with(async |c| self.session_in(&*c, id).await)
    }

    fn session_by_state_hash(&self, hash: &[u8; 32]) -> Result<Option<AuthSession>> {
        self.with(async |c| {
            let row = c
                .query_opt(
                    &format!(
                        "SELECT {SESSION_COLUMNS} FROM ls_sessions
                         WHERE state = 'pending' AND state_hash = $1
                         ORDER BY updated_at DESC LIMIT 1"
                    ),
                    &[&hash.to_vec()],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            row.map(|r| self.open_row(&r)).transpose()
        })
    }

    fn update_if_pending(
        &self,
        expect_hash: Option<[u8; 32]>,
        s: &AuthSession,
        token: Option<&UserToken>,
    ) -> Result<PendingUpdate> {
        self.update_if_pending_with_events(expect_hash, s, token, &[])
    }

    fn complete_session(&self, s: &AuthSession, token: &UserToken) -> Result<()> {
        let p = self.sealed_params(s)?;
        self.with(async |c| {
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            self.upsert(&tx, std::slice::from_ref(&p)).await?;
            write_token(self, &tx, token).await?;
            record_grant_in(&tx, &token.app_id, &token.user_id, s.updated_at).await?;
            tx.commit().await.map_err(|e| pg_err(&e))
        })
    }

    fn revoke_session(&self, id: SessionId, now: u64) -> Result<Option<AuthSession>> {
        self.revoke_session_with_events(id, now, |_| Vec::new())
    }

    fn sessions_for_user(&self, app_id: &str, user_id: &str) -> Result<Vec<AuthSession>> {
        self.with(async |c| {
            let rows = c
                .query(
                    &format!(
                        "SELECT {SESSION_COLUMNS} FROM ls_sessions
                         WHERE app_id = $1 AND user_id = $2 ORDER BY created_at, id"
                    ),
                    &[&app_id, &user_id],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            rows.iter().map(|r| self.open_row(r)).collect()
        })
    }

    fn list_sessions(
        &self,
        state: Option<SessionState>,
        limit: usize,
    ) -> Result<Vec<SessionSummary>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let state = state.map(SessionState::as_str);
        self.with(async |c| {
            let rows = c
                .query(
                    &format!(
                        "SELECT {SESSION_COLUMNS} FROM ls_sessions
                         WHERE $1::text IS NULL OR state = $1
                         ORDER BY created_at DESC LIMIT $2"
                    ),
                    &[&state, &limit],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            rows.iter().map(summary).collect()
        })
    }

    fn count_sessions_by_state(&self) -> Result<Vec<(SessionState, u64)>> {
        // Six rows plus the deltas appended since the last sweep folded them: no session is
        // read (see `schema`).
        self.with(async |c| {
            let rows = c
                .query(
                    "SELECT state, sum(n)::bigint FROM (
                        SELECT state, n FROM ls_session_counts
                        UNION ALL SELECT state, delta FROM ls_session_count_deltas) AS x
                     GROUP BY state",
                    &[],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            let mut out: Vec<(SessionState, u64)> =
                SessionState::ALL.iter().map(|s| (*s, 0)).collect();
            for r in rows {
                let state: SessionState =
                    r.try_get::<_, String>(0).map_err(|e| pg_err(&e))?.parse()?;
                let n: i64 = r.try_get(1).map_err(|e| pg_err(&e))?;
                if let Some(slot) = out.iter_mut().find(|(s, _)| *s == state) {
                    slot.1 = u64::try_from(n).unwrap_or(0);
                }
            }
            Ok(out)
        })
    }

    fn pending_expired(&self, now: u64) -> Result<Vec<SessionId>> {
        self.with(async |c| {
            let rows = c
                .query(
                    "SELECT id FROM ls_sessions WHERE state = 'pending' AND expires_at <= $1
                     ORDER BY expires_at, id",
                    &[&db_time(now)],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            rows.iter()
                .map(|r| {
                    id_from(
                        SESSIONS_TABLE,
                        &r.try_get::<_, Vec<u8>>(0).map_err(|e| pg_err(&e))?,
                    )
                })
                .collect()
        })
    }

    fn sweep(&self, now: u64, batch: usize) -> Result<SweepReport> {
        let batch = i64::try_from(batch.max(1)).unwrap_or(i64::MAX);
        let now_db = db_time(now);
        let cutoff = db_time(now.saturating_sub(self.retention_ms()));
        let mut report = SweepReport::default();
        // Expire due pending sessions, one locked batch per transaction.
        loop {
            let (n, expired) = self.with(async |c| {
                let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
                let rows = tx
                    .query(
                        "WITH due AS (
                            SELECT id FROM ls_sessions
                            WHERE state = 'pending' AND expires_at <= $1
                            ORDER BY expires_at, id LIMIT $2
                            FOR UPDATE SKIP LOCKED)
                         UPDATE ls_sessions AS s SET state = 'expired',
                            failure_reason = 'session_expired', updated_at = $1,
                            pkce_verifier = NULL, pkce_verifier_key = NULL
                         FROM due WHERE s.id = due.id
                         RETURNING s.id, s.card_message_id",
                        &[&now_db, &batch],
                    )
                    .await
                    .map_err(|e| pg_err(&e))?;
                let mut expired = Vec::with_capacity(rows.len());
                let mut changes = Vec::with_capacity(rows.len());
                for r in &rows {
                    let id: Vec<u8> = r.try_get(0).map_err(|e| pg_err(&e))?;
                    let card: Option<String> = r.try_get(1).map_err(|e| pg_err(&e))?;
                    expired.push((id_from(SESSIONS_TABLE, &id)?, card));
                    changes.push((KIND_UPSERT, id));
                }
                append_changes(&tx, self.change_feed_on(), &changes).await?;
                tx.commit().await.map_err(|e| pg_err(&e))?;
                Ok((rows.len(), expired))
            })?;
            report.expired.extend(expired);
            if i64::try_from(n).unwrap_or(i64::MAX) < batch {
                break;
            }
        }
        // Delete terminal sessions past retention.
        loop {
            let n = self.with(async |c| {
                let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
                let rows = tx
                    .query(
                        "WITH due AS (
                            SELECT id FROM ls_sessions
                            WHERE state <> 'pending' AND updated_at <= $1
                            ORDER BY updated_at, id LIMIT $2
                            FOR UPDATE SKIP LOCKED)
                         DELETE FROM ls_sessions AS s USING due WHERE s.id = due.id
                         RETURNING s.id",
                        &[&cutoff, &batch],
                    )
                    .await
                    .map_err(|e| pg_err(&e))?;
                let changes = rows
                    .iter()
                    .map(|r| r.try_get::<_, Vec<u8>>(0).map(|id| (KIND_DELETE, id)))
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| pg_err(&e))?;
                append_changes(&tx, self.change_feed_on(), &changes).await?;
                tx.commit().await.map_err(|e| pg_err(&e))?;
                Ok(rows.len())
            })?;
            report.purged += n as u64;
            if i64::try_from(n).unwrap_or(i64::MAX) < batch {
                break;
            }
        }
        report.events_forgotten = self.forget_events(now_db, batch)?;
        self.forget_rate_counts(now_db, batch)?;
        self.fold_count_deltas()?;
        report.changes_pruned = self.prune_feed()?;
        Ok(report)
    }
}
