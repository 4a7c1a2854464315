//! Copying a redb store into an empty PostgreSQL store (`lark-service migrate`).
//!
//! Sessions, tokens, users and seen event ids move as they are stored: the sealed values are
//! bound to the same associated data in both stores (table, row, field, key id), so they are
//! copied without being opened or sealed again, and the copy never holds a secret in clear.
//! The redb store is read in one read transaction (a consistent snapshot); the caller opened
//! it, so a store the service still holds is already refused by its lock. The target must be
//! empty (so that the counts compared at the end mean something) and is written in batches,
//! each one transaction; the per-state counts follow through the triggers, and every session
//! is in the target's change feed.

use redb::{ReadableDatabase, ReadableTable};

use super::feed::{append_changes, KIND_UPSERT};
use super::rows::{SessionParams, TokenParams, SESSION_COLUMNS, SESSION_VALUES, TOKEN_COLUMNS};
use super::{db_time, pg_err, PgStore};
use crate::storage::records::{StoredSession, StoredToken};
use crate::storage::tables::{SEEN_EVENTS, SESSIONS, SESSIONS_EXPIRED, TOKENS, USERS};
use crate::storage::traits::SessionStore;
use crate::storage::{Error, Result, SessionId, Store, StoreCounts, UserInfo};

/// Rows per target transaction.
const BATCH: usize = 500;

/// What a copy did: the source's counts and the target's after the copy (equal, or the copy
/// fails).
#[derive(Clone, Debug)]
pub struct CopyReport {
    /// Rows in the redb store.
    pub source: StoreCounts,
    /// Rows in the PostgreSQL store after the copy.
    pub target: StoreCounts,
}

enum Batch {
    Sessions(Vec<SessionParams>),
    Tokens(Vec<TokenParams>),
    Users(Vec<UserInfo>),
    Events(Vec<(String, u64)>),
}

impl PgStore {
    /// Copies every session, token, user and seen event id of `src` into this store, which
    /// must be empty, and checks the counts. See the module notes.
    pub fn copy_from_redb(
        &self,
        src: &Store,
        progress: &mut dyn FnMut(&'static str, u64),
    ) -> Result<CopyReport> {
        let before = self.counts()?;
        if before != StoreCounts::default() {
            return Err(Error::Invalid(format!(
                "the PostgreSQL store is not empty ({} sessions, {} tokens, {} users, {} seen events); migrate only into a new database",
                before.sessions, before.tokens, before.users, before.seen_events
            )));
        }
        let source = src.counts()?;
        let txn = src.db().begin_read().map_err(|e| src.err(e))?;
        let mut n = 0u64;
        let mut batch = Vec::with_capacity(BATCH);
        let expired = txn.open_table(SESSIONS_EXPIRED).map_err(|e| src.err(e))?;
        for row in txn
            .open_table(SESSIONS)
            .map_err(|e| src.err(e))?
            .iter()
            .map_err(|e| src.err(e))?
        {
            let (k, v) = row.map_err(|e| src.err(e))?;
            let at = expired.get(k.value()).map_err(|e| src.err(e))?;
            let stored = StoredSession::decode(v.value())?.overlay(at.map(|a| a.value()));
            batch.push(SessionParams::new(SessionId(k.value()), stored));
            if batch.len() == BATCH {
                n += self.write_batch(Batch::Sessions(std::mem::take(&mut batch)))?;
                progress("sessions", n);
            }
        }
        n += self.write_batch(Batch::Sessions(batch))?;
        progress("sessions", n);
        let mut n = 0u64;
        let mut batch = Vec::with_capacity(BATCH);
        for row in txn
            .open_table(TOKENS)
            .map_err(|e| src.err(e))?
            .iter()
            .map_err(|e| src.err(e))?
        {
            let (k, v) = row.map_err(|e| src.err(e))?;
            let (app, user) = k.value();
            batch.push(TokenParams::new(app, user, StoredToken::decode(v.value())?));
            if batch.len() == BATCH {
                n += self.write_batch(Batch::Tokens(std::mem::take(&mut batch)))?;
                progress("tokens", n);
            }
        }
        n += self.write_batch(Batch::Tokens(batch))?;
        progress("tokens", n);
        let mut n = 0u64;
        let mut batch = Vec::with_capacity(BATCH);
        for row in txn
            .open_table(USERS)
            .map_err(|e| src.err(e))?
            .iter()
            .map_err(|e| src.err(e))?
        {
            let (_, v) = row.map_err(|e| src.err(e))?;
            batch.push(UserInfo::decode_stored(v.value())?);
            if batch.len() == BATCH {
                n += self.write_batch(Batch::Users(std::mem::take(&mut batch)))?;
                progress("users", n);
            }
        }
        n += self.write_batch(Batch::Users(batch))?;
        progress("users", n);
        let mut n = 0u64;
        let mut batch = Vec::with_capacity(BATCH);
        for row in txn
            .open_table(SEEN_EVENTS)
            .map_err(|e| src.err(e))?
            .iter()
            .map_err(|e| src.err(e))?
        {
            let (k, v) = row.map_err(|e| src.err(e))?;
            batch.push((k.value().to_owned(), v.value()));
            if batch.len() == BATCH {
                n += self.write_batch(Batch::Events(std::mem::take(&mut batch)))?;
                progress("seen events", n);
            }
        }
        n += self.write_batch(Batch::Events(batch))?;
        progress("seen events", n);
        let target = self.counts()?;
        if target != source {
            return Err(Error::Invalid(format!(
                "the copy does not match its source: redb {source:?}, PostgreSQL {target:?}"
            )));
        }
        // The per-state counts came through the triggers: they must equal the source's.
        let (want, got) = (
            src.count_sessions_by_state()?,
            self.count_sessions_by_state()?,
        );
        if want != got {
            return Err(Error::Invalid(format!(
                "per-state counts differ after the copy: redb {want:?}, PostgreSQL {got:?}"
            )));
        }
        Ok(CopyReport { source, target })
    }

    fn write_batch(&self, batch: Batch) -> Result<u64> {
        self.with(async |c| {
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            let n = match &batch {
                Batch::Sessions(rows) => {
                    let stmt = tx
                        .prepare(&format!(
                            "INSERT INTO ls_sessions ({SESSION_COLUMNS}) VALUES ({SESSION_VALUES})"
                        ))
                        .await
                        .map_err(|e| pg_err(&e))?;
                    for p in rows {
                        tx.execute(&stmt, &p.params())
                            .await
                            .map_err(|e| pg_err(&e))?;
                    }
                    let changes: Vec<(i16, Vec<u8>)> =
                        rows.iter().map(|p| (KIND_UPSERT, p.id.clone())).collect();
                    append_changes(&tx, self.change_feed_on(), &changes).await?;
                    rows.len()
                }
                Batch::Tokens(rows) => {
                    let stmt = tx
                        .prepare(&format!(
                            "INSERT INTO ls_tokens ({TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, \
                             $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
                        ))
                        .await
                        .map_err(|e| pg_err(&e))?;
                    for p in rows {
                        tx.execute(&stmt, &p.params())
                            .await
                            .map_err(|e| pg_err(&e))?;
                    }
                    rows.len()
                }
                Batch::Users(rows) => {
                    for u in rows {
                        tx.execute(
                            "INSERT INTO ls_users (app_id, open_id, user_id, union_id, name, \
                             email, avatar_url, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                            &[
                                &u.app_id,
                                &u.open_id,
                                &u.user_id,
                                &u.union_id,
                                &u.name,
                                &u.email,
                                &u.avatar_url,
                                &db_time(u.updated_at),
                            ],
                        )
                        .await
                        .map_err(|e| pg_err(&e))?;
                    }
                    rows.len()
                }
                Batch::Events(rows) => {
                    let ids: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
                    let at: Vec<i64> = rows.iter().map(|r| db_time(r.1)).collect();
                    tx.execute(
                        "INSERT INTO ls_seen_events (id, forget_at)
                         SELECT * FROM unnest($1::text[], $2::bigint[])",
                        &[&ids, &at],
                    )
                    .await
                    .map_err(|e| pg_err(&e))?;
                    rows.len()
                }
            };
            tx.commit().await.map_err(|e| pg_err(&e))?;
            Ok(n as u64)
        })
    }
}
