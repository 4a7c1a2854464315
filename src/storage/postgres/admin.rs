//! What the service asks of a store beyond the traits, where the PostgreSQL store answers the
//! same way as the redb one: `run` for async callers, summaries, the active-token gauge, key
//! ids.

use super::rows::{id_bytes, SESSION_COLUMNS};
use super::sessions::summary;
use super::{pg_err, PgStore};
use crate::storage::envelope::KeyId;
use crate::storage::{Error, Result, SessionId, SessionSummary};

impl PgStore {
    /// Runs blocking store work off the async executor (as `Store::run`).
    pub async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&PgStore) -> Result<T> + Send + 'static,
    {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| Error::Join(e.to_string()))?
    }

    /// The id new secrets are sealed under.
    #[must_use]
    pub fn active_key_id(&self) -> KeyId {
        self.ring().active_id()
    }

    /// The key id the database's key check is sealed under.
    pub fn store_key_id(&self) -> Result<KeyId> {
        self.with(async |c| {
            let row = c
                .query_one("SELECT key_id FROM ls_key_check WHERE id = 1", &[])
                .await
                .map_err(|e| pg_err(&e))?;
            let k: i64 = row.try_get(0).map_err(|e| pg_err(&e))?;
            u32::try_from(k).map(KeyId).map_err(|_| Error::Decode {
                table: "meta",
                detail: format!("key id {k}"),
            })
        })
    }

    /// One session's summary, without opening any secret.
    pub fn get_session_summary(&self, id: SessionId) -> Result<Option<SessionSummary>> {
        self.with(async |c| {
            let row = c
                .query_opt(
                    &format!("SELECT {SESSION_COLUMNS} FROM ls_sessions WHERE id = $1"),
                    &[&id_bytes(id)],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            row.map(|r| summary(&r)).transpose()
        })
    }

    /// Users whose token the service keeps fresh (a refresh token, no new authorization
    /// needed): counted on the refresh queue's partial index (an index-only scan of the
    /// refreshable tokens, not a read of the token rows).
    pub fn count_active_tokens(&self) -> Result<u64> {
        self.with(async |c| {
            let row = c
                .query_one(
                    "SELECT count(*) FROM ls_tokens
                     WHERE refresh_token IS NOT NULL AND NOT needs_reauth",
                    &[],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            let n: i64 = row.try_get(0).map_err(|e| pg_err(&e))?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }
}
