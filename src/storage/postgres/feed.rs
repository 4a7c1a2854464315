//! [`ChangeFeed`] on PostgreSQL: the feed `ls_changes`, the exporters' cursors, export rows.
//!
//! Sequence numbers come from one counter row (`ls_meta.last_change_seq`) incremented in the
//! writing transaction. Its row lock is held to commit, so seqs are handed out in commit
//! order: an exporter that has read up to seq N never later finds a change below N committed
//! behind its back (a `SEQUENCE` would not promise that across instances). Pruning never lowers
//! the counter, so a seq is never reused.

use secrecy::SecretString;
use tokio_postgres::Transaction;

use super::rows::{id_bytes, id_from, stored_session, SESSION_COLUMNS};
use super::{db_time, pg_err, sealed_bytes, PgStore};
use crate::storage::envelope::Sealed;
use crate::storage::records::{session_from, StoredSession};
use crate::storage::traits::ChangeFeed;
use crate::storage::{
    ChangeKind, ExportRow, ExportToken, ImportToken, Result, SessionId, EXPORT_CURSOR_PREFIX,
};

pub(crate) const KIND_UPSERT: i16 = 1;
pub(crate) const KIND_DELETE: i16 = 2;

const LAST_SEQ: &str = "last_change_seq";
const FEED_OFF: &str = "change_feed_off";
const FEED_FROM: &str = "change_feed_complete_from";

async fn meta(tx: &Transaction<'_>, key: &str) -> Result<Option<i64>> {
    let row = tx
        .query_opt("SELECT value FROM ls_meta WHERE key = $1", &[&key])
        .await
        .map_err(|e| pg_err(&e))?;
    row.map(|r| r.try_get(0).map_err(|e| pg_err(&e)))
        .transpose()
}

/// At open: notes a gap in the feed (as the redb store does) when it was off and is now on.
pub(crate) async fn note_feed_mode(tx: &Transaction<'_>, on: bool) -> Result<()> {
    let was_off = meta(tx, FEED_OFF).await?.is_some();
    if on && was_off {
        let from = meta(tx, LAST_SEQ).await?.unwrap_or(0);
        tx.execute(
            "INSERT INTO ls_meta (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[&FEED_FROM, &from],
        )
        .await
        .map_err(|e| pg_err(&e))?;
        tx.execute("DELETE FROM ls_meta WHERE key = $1", &[&FEED_OFF])
            .await
            .map_err(|e| pg_err(&e))?;
    } else if !on && !was_off {
        tx.execute(
            "INSERT INTO ls_meta (key, value) VALUES ($1, 1) ON CONFLICT (key) DO NOTHING",
            &[&FEED_OFF],
        )
        .await
        .map_err(|e| pg_err(&e))?;
    }
    Ok(())
}

/// Appends `(kind, session id bytes)` changes in order inside `tx` (nothing when the feed is
/// off).
pub(crate) async fn append_changes(
    tx: &Transaction<'_>,
    on: bool,
    changes: &[(i16, Vec<u8>)],
) -> Result<()> {
    if !on || changes.is_empty() {
        return Ok(());
    }
    let n = i64::try_from(changes.len()).unwrap_or(i64::MAX);
    let row = tx
        .query_one(
            "UPDATE ls_meta SET value = value + $1 WHERE key = 'last_change_seq' RETURNING value",
            &[&n],
        )
        .await
        .map_err(|e| pg_err(&e))?;
    let last: i64 = row.try_get(0).map_err(|e| pg_err(&e))?;
    let kinds: Vec<i16> = changes.iter().map(|c| c.0).collect();
    let ids: Vec<Vec<u8>> = changes.iter().map(|c| c.1.clone()).collect();
    tx.execute(
        "INSERT INTO ls_changes (seq, kind, session_id)
         SELECT $1 + u.o, u.k, u.id
         FROM unnest($2::smallint[], $3::bytea[]) WITH ORDINALITY AS u(k, id, o)",
        &[&last.saturating_sub(n), &kinds, &ids],
    )
    .await
    .map_err(|e| pg_err(&e))?;
    Ok(())
}

fn export_token(s: Option<&Sealed>) -> Option<ExportToken> {
    s.map(|s| ExportToken {
        key_id: s.key_id.to_string(),
        bytes: sealed_bytes(s),
    })
}

fn export_row(id: SessionId, s: &StoredSession) -> ExportRow {
    session_from!(ExportRow {
        session_id: id,
        access_token: export_token(s.access_token.as_ref()),
        refresh_token: export_token(s.refresh_token.as_ref()),
        state_hash: None,
        pkce_verifier: None,
    } from s)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl PgStore {
    /// The lowest cursor of the exporters (`export.*`), if any.
    pub fn slowest_export_cursor(&self) -> Result<Option<u64>> {
        let pattern = format!("{EXPORT_CURSOR_PREFIX}%");
        self.with(async |c| {
            let row = c
                .query_one(
                    "SELECT min(value) FROM ls_cursors WHERE name LIKE $1",
                    &[&pattern],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            let v: Option<i64> = row.try_get(0).map_err(|e| pg_err(&e))?;
            Ok(v.map(to_u64))
        })
    }

    /// Prunes the feed as far as no exporter needs it (all of it when the feed is off).
    pub fn prune_feed(&self) -> Result<u64> {
        if !self.change_feed_on() {
            return self.prune_changes(u64::MAX);
        }
        match self.slowest_export_cursor()? {
            Some(upto) => self.prune_changes(upto),
            None => Ok(0),
        }
    }
}

impl ChangeFeed for PgStore {
    fn changes_after(&self, seq: u64, limit: usize) -> Result<Vec<(u64, ChangeKind, SessionId)>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(async |c| {
            let rows = c
                .query(
                    "SELECT seq, kind, session_id FROM ls_changes WHERE seq > $1
                     ORDER BY seq LIMIT $2",
                    &[&db_time(seq), &limit],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            rows.iter()
                .map(|r| {
                    let seq: i64 = r.try_get(0).map_err(|e| pg_err(&e))?;
                    let kind: i16 = r.try_get(1).map_err(|e| pg_err(&e))?;
                    let id: Vec<u8> = r.try_get(2).map_err(|e| pg_err(&e))?;
                    let kind = if kind == KIND_DELETE {
                        ChangeKind::Delete
                    } else {
                        ChangeKind::Upsert
                    };
                    Ok((to_u64(seq), kind, id_from("changes", &id)?))
                })
                .collect()
        })
    }

    fn last_change_seq(&self) -> Result<u64> {
        self.with(async |c| {
            let row = c
                .query_one(
                    "SELECT value FROM ls_meta WHERE key = 'last_change_seq'",
                    &[],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            Ok(to_u64(row.try_get(0).map_err(|e| pg_err(&e))?))
        })
    }

    fn prune_changes(&self, upto: u64) -> Result<u64> {
        self.with(async |c| {
            let n = c
                .execute("DELETE FROM ls_changes WHERE seq <= $1", &[&db_time(upto)])
                .await
                .map_err(|e| pg_err(&e))?;
            Ok(n)
        })
    }

    fn change_feed_complete_from(&self) -> Result<u64> {
        self.with(async |c| {
            let row = c
                .query_opt("SELECT value FROM ls_meta WHERE key = $1", &[&FEED_FROM])
                .await
                .map_err(|e| pg_err(&e))?;
            row.map(|r| r.try_get::<_, i64>(0).map(to_u64).map_err(|e| pg_err(&e)))
                .transpose()
                .map(|v| v.unwrap_or(0))
        })
    }

    fn cursor(&self, name: &str) -> Result<Option<u64>> {
        self.with(async |c| {
            let row = c
                .query_opt("SELECT value FROM ls_cursors WHERE name = $1", &[&name])
                .await
                .map_err(|e| pg_err(&e))?;
            row.map(|r| r.try_get::<_, i64>(0).map(to_u64).map_err(|e| pg_err(&e)))
                .transpose()
        })
    }

    fn set_cursor(&self, name: &str, value: u64) -> Result<()> {
        self.with(async |c| {
            c.execute(
                "INSERT INTO ls_cursors (name, value) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
                &[&name, &db_time(value)],
            )
            .await
            .map_err(|e| pg_err(&e))?;
            Ok(())
        })
    }

    fn export_rows(&self, ids: &[SessionId]) -> Result<Vec<Option<ExportRow>>> {
        let keys: Vec<Vec<u8>> = ids.iter().map(|id| id_bytes(*id)).collect();
        self.with(async |c| {
            let rows = c
                .query(
                    &format!("SELECT {SESSION_COLUMNS} FROM ls_sessions WHERE id = ANY($1)"),
                    &[&keys],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            let mut found = std::collections::HashMap::new();
            for r in &rows {
                let (id, s) = stored_session(r)?;
                found.insert(id, export_row(id, &s));
            }
            Ok(ids.iter().map(|id| found.remove(id)).collect())
        })
    }

    fn export_rows_after(&self, after: Option<SessionId>, limit: usize) -> Result<Vec<ExportRow>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let after = after.map(id_bytes);
        self.with(async |c| {
            let rows = c
                .query(
                    &format!(
                        "SELECT {SESSION_COLUMNS} FROM ls_sessions
                         WHERE $1::bytea IS NULL OR id > $1 ORDER BY id LIMIT $2"
                    ),
                    &[&after, &limit],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            rows.iter()
                .map(|r| stored_session(r).map(|(id, s)| export_row(id, &s)))
                .collect()
        })
    }

    fn open_imported_token(
        &self,
        id: SessionId,
        field: &str,
        token: ImportToken,
    ) -> Result<SecretString> {
        token.open(self.ring(), id, field)
    }
}
