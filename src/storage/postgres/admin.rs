//! What the service asks of a store beyond the traits, where the PostgreSQL store answers the
//! same way as the redb one: `run` for async callers, summaries, the active-token gauge, key
//! ids.

use super::rows::{id_bytes, SESSION_COLUMNS};
use super::sessions::summary;
use super::{pg_err, PgStore};
use crate::storage::envelope::KeyId;
use crate::storage::{Error, KeyStatus, Result, SessionId, SessionSummary};

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

    /// Which key ids seal what (as `Store::key_status`): the sealed columns of sessions,
    /// tokens, device polls and the registry's app secrets sealed under the store's key ring
    /// counted per key id, read from the key id columns without opening anything. A rotation
    /// is pending while the key check or any sealed column is not under the active key
    /// (`keys::PgStore::rotate_keys`).
    pub fn key_status(&self) -> Result<KeyStatus> {
        let rows = self.with(async |c| {
            c.query(
                "SELECT k, count(*) FROM (
                    SELECT access_token_key AS k FROM ls_sessions WHERE access_token IS NOT NULL
                    UNION ALL SELECT refresh_token_key FROM ls_sessions WHERE refresh_token IS NOT NULL
                    UNION ALL SELECT pkce_verifier_key FROM ls_sessions WHERE pkce_verifier IS NOT NULL
                    UNION ALL SELECT access_token_key FROM ls_tokens
                    UNION ALL SELECT refresh_token_key FROM ls_tokens WHERE refresh_token IS NOT NULL
                    UNION ALL SELECT device_code_key FROM ls_device_polls
                    UNION ALL SELECT secret_key FROM ls_apps WHERE secret_sealed_with = 'store'
                 ) s GROUP BY k ORDER BY k",
                &[],
            )
            .await
            .map_err(|e| pg_err(&e))
        })?;
        let mut by_key = std::collections::BTreeMap::new();
        for r in &rows {
            let k: Option<i64> = r.try_get(0).map_err(|e| pg_err(&e))?;
            let n: i64 = r.try_get(1).map_err(|e| pg_err(&e))?;
            let k = k
                .and_then(|k| u32::try_from(k).ok())
                .map(KeyId)
                .ok_or_else(|| Error::Decode {
                    table: "sessions",
                    detail: format!("sealed column without a valid key id ({k:?})"),
                })?;
            by_key.insert(k, u64::try_from(n).unwrap_or(0));
        }
        Ok(KeyStatus::new(
            self.active_key_id(),
            self.store_key_id()?,
            by_key,
        ))
    }
}
