//! Device polls on PostgreSQL (`ls_device_polls`, schema 6): the same rows as the redb store's
//! (`storage::device`), the code sealed under the same key ring and bound to the same place,
//! so either backend opens what the other sealed.

use super::rows::{id_bytes, id_from, sealed_from};
use super::{api_time, db_time, pg_err, PgStore};
use crate::storage::device::{StoredDevicePoll, DEVICE_POLLS_TABLE};
use crate::storage::{DevicePoll, Error, Result, SessionId};

impl PgStore {
    /// Creates or replaces the device poll of `p.session_id`, its code sealed. Durable on
    /// return.
    pub fn put_device_poll(&self, p: &DevicePoll) -> Result<()> {
        let s = StoredDevicePoll::seal(p, self.ring())?;
        let mut code = s.device_code.nonce.to_vec();
        code.extend_from_slice(&s.device_code.ct);
        let key = i64::from(s.device_code.key_id.0);
        let id = id_bytes(p.session_id);
        let (interval, expires) = (db_time(s.interval_ms), db_time(s.expires_at));
        self.with(async |c| {
            c.execute(
                "INSERT INTO ls_device_polls
                    (session_id, app_id, device_code, device_code_key, interval_ms, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (session_id) DO UPDATE SET app_id = EXCLUDED.app_id,
                    device_code = EXCLUDED.device_code,
                    device_code_key = EXCLUDED.device_code_key,
                    interval_ms = EXCLUDED.interval_ms, expires_at = EXCLUDED.expires_at",
                &[&id, &s.app_id, &code, &key, &interval, &expires],
            )
            .await
            .map_err(|e| pg_err(&e))?;
            Ok(())
        })
    }

    /// The device poll of session `id`, its code opened, or `None`.
    pub fn get_device_poll(&self, id: SessionId) -> Result<Option<DevicePoll>> {
        let row = self.with(async |c| {
            c.query_opt(
                "SELECT app_id, device_code, device_code_key, interval_ms, expires_at
                 FROM ls_device_polls WHERE session_id = $1",
                &[&id_bytes(id)],
            )
            .await
            .map_err(|e| pg_err(&e))
        })?;
        let Some(r) = row else {
            return Ok(None);
        };
        let get = |e: tokio_postgres::Error| pg_err(&e);
        let sealed = sealed_from(
            DEVICE_POLLS_TABLE,
            r.try_get(1).map_err(get)?,
            r.try_get(2).map_err(get)?,
        )?
        .ok_or_else(|| Error::Decode {
            table: DEVICE_POLLS_TABLE,
            detail: "a device poll without its code".to_owned(),
        })?;
        let stored = StoredDevicePoll {
            app_id: r.try_get(0).map_err(get)?,
            device_code: sealed,
            interval_ms: api_time(r.try_get(3).map_err(get)?, DEVICE_POLLS_TABLE)?,
            expires_at: api_time(r.try_get(4).map_err(get)?, DEVICE_POLLS_TABLE)?,
        };
        stored.open(id, self.ring()).map(Some)
    }

    /// Deletes the device poll of session `id`; true if there was one. Durable on return.
    pub fn delete_device_poll(&self, id: SessionId) -> Result<bool> {
        self.with(async |c| {
            c.execute(
                "DELETE FROM ls_device_polls WHERE session_id = $1",
                &[&id_bytes(id)],
            )
            .await
            .map(|n| n > 0)
            .map_err(|e| pg_err(&e))
        })
    }

    /// Session ids of app `app_id`'s device polls, by id, at most `limit` (no code read).
    pub fn device_polls_of(&self, app_id: &str, limit: usize) -> Result<Vec<SessionId>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(async |c| {
            let rows = c
                .query(
                    "SELECT session_id FROM ls_device_polls WHERE app_id = $1
                     ORDER BY session_id LIMIT $2",
                    &[&app_id, &limit],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            rows.iter()
                .map(|r| {
                    id_from(
                        DEVICE_POLLS_TABLE,
                        &r.try_get::<_, Vec<u8>>(0).map_err(|e| pg_err(&e))?,
                    )
                })
                .collect()
        })
    }
}
