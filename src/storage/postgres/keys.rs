//! Online key rotation on PostgreSQL: every sealed column (sessions' tokens and PKCE
//! verifiers, users' tokens, device codes, the registry's app secrets sealed under the store's
//! key ring) not under the active key is opened with the key ring and sealed
//! again under the active key, then the key check row, last.
//!
//! - **Short transactions, serving not blocked.** Each batch is one transaction that takes its
//!   rows with `FOR UPDATE SKIP LOCKED` in primary-key order after a cursor: a row a serving
//!   instance holds (a refresh in flight) is skipped, never waited for, and picked up by a
//!   later pass. Only the sealed columns and their key ids are rewritten; a re-sealed session
//!   is appended to the change feed (its sealed columns changed), as on redb.
//! - **Resumable.** Which rows are left is in the rows themselves (their key id columns), so an
//!   interrupted rotation, run again, continues where it stopped; nothing else is recorded.
//! - **Finished once, truthfully.** When a pass finds nothing left, one transaction locks the
//!   key check row, counts the columns not under the active key and, only if there are none,
//!   re-seals the key check under the active key. Until then `keys status` and
//!   [`PgStore::rotation_pending`] say pending.
//! - **Every instance first.** A row sealed under the new key can only be served by an instance
//!   that holds it. Each instance's heartbeat (`ls_instances`, schema 7) records its key ids and
//!   active key; before every batch and before the finishing transaction, the rotation refuses
//!   while a live instance lacks the active key, seals under another one (it would keep writing
//!   rows the rotation must redo), or does not say (an older build). Fail closed.

use std::time::Duration;

use tokio_postgres::Transaction;

use super::copy::HEARTBEAT_LIVE_MS as LIVE_MS;
use super::feed::{append_changes, KIND_UPSERT};
use super::rows::{id_from, sealed_from};
use super::{pg_err, sealed_bytes, PgStore};
use crate::storage::apps::{APPS_TABLE, SECRET_FIELD as APP_SECRET_FIELD};
use crate::storage::device::{DEVICE_CODE_FIELD, DEVICE_POLLS_TABLE};
use crate::storage::envelope::{Keyring, Place, Sealed};
use crate::storage::records::{token_row, SESSIONS_TABLE, TOKENS_TABLE};
use crate::storage::{Error, KeyId, Result, RotationReport};

/// Passes over the tables after which a rotation that still finds rows left (held by other
/// transactions each time) gives up; run it again later.
const MAX_PASSES: u32 = 50;

/// The pause between two passes (rows skipped while locked get time to be let go).
const PASS_PAUSE: Duration = Duration::from_millis(100);

/// The rows with a sealed column not under `$1`.
const SESSIONS_LEFT: &str = "access_token_key <> $1 OR refresh_token_key <> $1 \
     OR pkce_verifier_key <> $1";
const TOKENS_LEFT: &str = "access_token_key <> $1 OR refresh_token_key <> $1";
const DEVICE_POLLS_LEFT: &str = "device_code_key <> $1";
/// Registry apps whose secret is sealed under the store's key ring, not under `$1` (a secret
/// under the config key is not the token key's business).
const APPS_LEFT: &str = "secret_sealed_with = 'store' AND secret_key <> $1";

/// Where a rotation is (kept by its caller between batches; a new one starts over, which is
/// safe: only rows still under older keys are taken).
#[derive(Debug, Default)]
pub struct RotationCursor {
    sessions_after: Option<Vec<u8>>,
    sessions_done: bool,
    tokens_after: Option<(String, String)>,
    tokens_done: bool,
    device_after: Option<Vec<u8>>,
    device_done: bool,
    apps_done: bool,
    passes: u32,
    /// Rows re-sealed so far.
    pub report: RotationReport,
}

/// What [`PgStore::rotation_batch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationStep {
    /// More to do.
    More,
    /// Every sealed column and the key check are under the active key.
    Done,
}

fn reseal(
    ring: &Keyring,
    table: &'static str,
    row: &[u8],
    field: &'static str,
    s: &Sealed,
) -> Result<Option<Sealed>> {
    if s.key_id == ring.active_id() {
        return Ok(None);
    }
    let place = Place { table, row, field };
    let plain = ring.open(s, &place).map_err(|e| Error::Decrypt {
        table,
        detail: format!("field {field}: {e}"),
    })?;
    Ok(Some(ring.seal(&plain, &place)))
}

/// A sealed column's values: `(nonce || ct, key id)`, both `NULL` for no value.
type Column = (Option<Vec<u8>>, Option<i64>);

/// A re-sealed column, or the column as it was.
fn column(new: Option<Sealed>, old: Option<&Sealed>) -> Column {
    match new.as_ref().or(old) {
        Some(s) => (Some(sealed_bytes(s)), Some(i64::from(s.key_id.0))),
        None => (None, None),
    }
}

fn key_param(k: KeyId) -> i64 {
    i64::from(k.0)
}

impl PgStore {
    /// Whether a rotation is due: the key check or any sealed column is not under the active
    /// key (one statement; the `EXISTS` stop at the first such row).
    pub fn rotation_pending(&self) -> Result<bool> {
        let active = key_param(self.active_key_id());
        self.with(async |c| {
            let row = c
                .query_one(
                    &format!(
                        "SELECT (SELECT key_id FROM ls_key_check WHERE id = 1) IS DISTINCT FROM $1
                            OR EXISTS (SELECT 1 FROM ls_sessions WHERE {SESSIONS_LEFT})
                            OR EXISTS (SELECT 1 FROM ls_tokens WHERE {TOKENS_LEFT})
                            OR EXISTS (SELECT 1 FROM ls_device_polls WHERE {DEVICE_POLLS_LEFT})
                            OR EXISTS (SELECT 1 FROM ls_apps WHERE {APPS_LEFT})"
                    ),
                    &[&active],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            row.try_get(0).map_err(|e| pg_err(&e))
        })
    }

    /// Rows (sessions, tokens, device polls, registry apps) with a sealed column not under the
    /// active key.
    pub fn rows_to_reseal(&self) -> Result<u64> {
        let active = key_param(self.active_key_id());
        self.with(async |c| rows_left(c, active).await)
    }

    /// Refuses while a live instance of the fleet would not serve rows sealed under the active
    /// key (see the module notes).
    pub fn refuse_unready_instances(&self) -> Result<()> {
        let key = self.active_key_id();
        let off = self.instances_not_ready_for(key, crate::storage::now_ms(), LIVE_MS)?;
        if off.is_empty() {
            return Ok(());
        }
        Err(Error::Invalid(format!(
            "refusing to rotate to key {key}: {} live instance(s) would not serve what it seals: {}; give every instance the key as its active key (keeping the older ones as previous keys) and restart it first",
            off.len(),
            off.join(", ")
        )))
    }

    /// Re-seals every sealed column under the active key, `batch` rows per transaction,
    /// calling `progress(done, total)` after each batch; then the key check. Safe while the
    /// fleet serves; refused while a live instance lacks the key (checked before every batch).
    pub fn rotate_keys(
        &self,
        batch: usize,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<RotationReport> {
        self.refuse_unready_instances()?;
        let total = self.rows_to_reseal()?;
        let mut cur = RotationCursor::default();
        loop {
            let step = self.rotation_batch(&mut cur, batch)?;
            progress(cur.report.resealed, total.max(cur.report.resealed));
            if step == RotationStep::Done {
                return Ok(cur.report);
            }
        }
    }

    /// One batch of a rotation from `cur` (one transaction), or, at the end of a pass, the
    /// finishing transaction (another pass when rows are left).
    pub fn rotation_batch(&self, cur: &mut RotationCursor, batch: usize) -> Result<RotationStep> {
        let batch = i64::try_from(batch.max(1)).unwrap_or(i64::MAX);
        self.refuse_unready_instances()?;
        if !cur.sessions_done {
            match self.reseal_sessions(cur.sessions_after.as_deref(), batch, &mut cur.report)? {
                Some(last) => cur.sessions_after = Some(last),
                None => cur.sessions_done = true,
            }
            return Ok(RotationStep::More);
        }
        if !cur.tokens_done {
            match self.reseal_tokens(cur.tokens_after.as_ref(), batch, &mut cur.report)? {
                Some(last) => cur.tokens_after = Some(last),
                None => cur.tokens_done = true,
            }
            return Ok(RotationStep::More);
        }
        if !cur.device_done {
            match self.reseal_device_polls(cur.device_after.as_deref(), batch, &mut cur.report)? {
                Some(last) => cur.device_after = Some(last),
                None => cur.device_done = true,
            }
            return Ok(RotationStep::More);
        }
        if !cur.apps_done {
            self.reseal_apps(&mut cur.report)?;
            cur.apps_done = true;
            return Ok(RotationStep::More);
        }
        if self.finish_rotation()? {
            return Ok(RotationStep::Done);
        }
        // Rows were skipped while another transaction held them, or written meanwhile.
        cur.passes += 1;
        if cur.passes >= MAX_PASSES {
            return Err(Error::Unavailable(format!(
                "key rotation: rows under older keys were still held by other transactions after {MAX_PASSES} passes; run it again"
            )));
        }
        cur.sessions_after = None;
        cur.sessions_done = false;
        cur.tokens_after = None;
        cur.tokens_done = false;
        cur.device_after = None;
        cur.device_done = false;
        cur.apps_done = false;
        std::thread::sleep(PASS_PAUSE);
        Ok(RotationStep::More)
    }

    /// Re-seals up to `batch` sessions after `after` (id order) in one transaction; the last
    /// id taken, `None` when none was left after `after`.
    fn reseal_sessions(
        &self,
        after: Option<&[u8]>,
        batch: i64,
        report: &mut RotationReport,
    ) -> Result<Option<Vec<u8>>> {
        let ring = self.ring();
        let active = key_param(ring.active_id());
        let feed = self.change_feed_on();
        let after = after.map(<[u8]>::to_vec).unwrap_or_default();
        let (last, n) = self.with(async |c| {
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            let rows = tx
                .query(
                    &format!(
                        "SELECT id, access_token, access_token_key, refresh_token,
                            refresh_token_key, pkce_verifier, pkce_verifier_key
                         FROM ls_sessions WHERE id > $2 AND ({SESSIONS_LEFT})
                         ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED"
                    ),
                    &[&active, &after, &batch],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            let mut changes = Vec::with_capacity(rows.len());
            let mut cols: [Vec<Column>; 3] = Default::default();
            let mut ids = Vec::with_capacity(rows.len());
            for r in &rows {
                let id: Vec<u8> = r.try_get(0).map_err(|e| pg_err(&e))?;
                let row = id_from(SESSIONS_TABLE, &id)?.to_bytes();
                for (n, (i, field)) in [
                    (1, "access_token"),
                    (3, "refresh_token"),
                    (5, "pkce_verifier"),
                ]
                .into_iter()
                .enumerate()
                {
                    let old = sealed_from(
                        SESSIONS_TABLE,
                        r.try_get(i).map_err(|e| pg_err(&e))?,
                        r.try_get(i + 1).map_err(|e| pg_err(&e))?,
                    )?;
                    let new = match &old {
                        Some(s) => reseal(ring, SESSIONS_TABLE, &row, field, s)?,
                        None => None,
                    };
                    cols[n].push(column(new, old.as_ref()));
                }
                changes.push((KIND_UPSERT, id.clone()));
                ids.push(id);
            }
            let [a, r, p] = cols.map(|c| c.into_iter().unzip::<_, _, Vec<_>, Vec<_>>());
            // One statement for the batch.
            tx.execute(
                "UPDATE ls_sessions AS s SET access_token = u.a, access_token_key = u.ak,
                    refresh_token = u.r, refresh_token_key = u.rk,
                    pkce_verifier = u.p, pkce_verifier_key = u.pk
                 FROM unnest($1::bytea[], $2::bytea[], $3::bigint[], $4::bytea[], $5::bigint[],
                             $6::bytea[], $7::bigint[]) AS u(id, a, ak, r, rk, p, pk)
                 WHERE s.id = u.id",
                &[&ids, &a.0, &a.1, &r.0, &r.1, &p.0, &p.1],
            )
            .await
            .map_err(|e| pg_err(&e))?;
            let last = ids.last().cloned();
            // The sealed columns changed (new key ids): exporters re-export the rows.
            append_changes(&tx, feed, &changes).await?;
            tx.commit().await.map_err(|e| pg_err(&e))?;
            Ok((last, rows.len() as u64))
        })?;
        report.scanned += n;
        report.resealed += n;
        Ok(last)
    }

    /// Re-seals up to `batch` tokens after `after` (key order) in one transaction; the last
    /// key taken, `None` when none was left after `after`.
    fn reseal_tokens(
        &self,
        after: Option<&(String, String)>,
        batch: i64,
        report: &mut RotationReport,
    ) -> Result<Option<(String, String)>> {
        let ring = self.ring();
        let active = key_param(ring.active_id());
        let (after_app, after_user) = after.cloned().unwrap_or_default();
        let (last, n) = self.with(async |c| {
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            let rows = tx
                .query(
                    &format!(
                        "SELECT app_id, user_id, access_token, access_token_key, refresh_token,
                            refresh_token_key
                         FROM ls_tokens WHERE (app_id, user_id) > ($2, $3) AND ({TOKENS_LEFT})
                         ORDER BY app_id, user_id LIMIT $4 FOR UPDATE SKIP LOCKED"
                    ),
                    &[&active, &after_app, &after_user, &batch],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            let mut cols: [Vec<Column>; 2] = Default::default();
            let (mut apps, mut users) = (Vec::with_capacity(rows.len()), Vec::new());
            for r in &rows {
                let app: String = r.try_get(0).map_err(|e| pg_err(&e))?;
                let user: String = r.try_get(1).map_err(|e| pg_err(&e))?;
                let row = token_row(&app, &user);
                for (n, (i, field)) in [(2, "access_token"), (4, "refresh_token")]
                    .into_iter()
                    .enumerate()
                {
                    let old = sealed_from(
                        TOKENS_TABLE,
                        r.try_get(i).map_err(|e| pg_err(&e))?,
                        r.try_get(i + 1).map_err(|e| pg_err(&e))?,
                    )?;
                    let new = match &old {
                        Some(s) => reseal(ring, TOKENS_TABLE, &row, field, s)?,
                        None => None,
                    };
                    cols[n].push(column(new, old.as_ref()));
                }
                apps.push(app);
                users.push(user);
            }
            let [a, r] = cols.map(|c| c.into_iter().unzip::<_, _, Vec<_>, Vec<_>>());
            // One statement for the batch.
            tx.execute(
                "UPDATE ls_tokens AS t SET access_token = u.a, access_token_key = u.ak,
                    refresh_token = u.r, refresh_token_key = u.rk
                 FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bigint[], $5::bytea[],
                             $6::bigint[]) AS u(app_id, user_id, a, ak, r, rk)
                 WHERE t.app_id = u.app_id AND t.user_id = u.user_id",
                &[&apps, &users, &a.0, &a.1, &r.0, &r.1],
            )
            .await
            .map_err(|e| pg_err(&e))?;
            let last = apps.last().cloned().zip(users.last().cloned());
            tx.commit().await.map_err(|e| pg_err(&e))?;
            Ok((last, rows.len() as u64))
        })?;
        report.scanned += n;
        report.resealed += n;
        Ok(last)
    }

    /// Re-seals the device codes of up to `batch` device polls after session `after` (id
    /// order) in one transaction; the last id taken, `None` when none was left after `after`.
    /// Device polls are not in the change feed (they are not exported).
    fn reseal_device_polls(
        &self,
        after: Option<&[u8]>,
        batch: i64,
        report: &mut RotationReport,
    ) -> Result<Option<Vec<u8>>> {
        let ring = self.ring();
        let active = key_param(ring.active_id());
        let after = after.map(<[u8]>::to_vec).unwrap_or_default();
        let (last, n) = self.with(async |c| {
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            let rows = tx
                .query(
                    &format!(
                        "SELECT session_id, device_code, device_code_key FROM ls_device_polls
                         WHERE session_id > $2 AND ({DEVICE_POLLS_LEFT})
                         ORDER BY session_id LIMIT $3 FOR UPDATE SKIP LOCKED"
                    ),
                    &[&active, &after, &batch],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            let (mut ids, mut codes, mut keys) = (Vec::with_capacity(rows.len()), vec![], vec![]);
            for r in &rows {
                let id: Vec<u8> = r.try_get(0).map_err(|e| pg_err(&e))?;
                let row = id_from(DEVICE_POLLS_TABLE, &id)?.to_bytes();
                let old = sealed_from(
                    DEVICE_POLLS_TABLE,
                    r.try_get(1).map_err(|e| pg_err(&e))?,
                    r.try_get(2).map_err(|e| pg_err(&e))?,
                )?
                .ok_or_else(|| Error::Decode {
                    table: DEVICE_POLLS_TABLE,
                    detail: "a device poll without its code".to_owned(),
                })?;
                let new = reseal(ring, DEVICE_POLLS_TABLE, &row, DEVICE_CODE_FIELD, &old)?;
                let (code, key) = column(new, Some(&old));
                codes.push(code);
                keys.push(key);
                ids.push(id);
            }
            // One statement for the batch.
            tx.execute(
                "UPDATE ls_device_polls AS d SET device_code = u.c, device_code_key = u.k
                 FROM unnest($1::bytea[], $2::bytea[], $3::bigint[]) AS u(id, c, k)
                 WHERE d.session_id = u.id",
                &[&ids, &codes, &keys],
            )
            .await
            .map_err(|e| pg_err(&e))?;
            let last = ids.last().cloned();
            tx.commit().await.map_err(|e| pg_err(&e))?;
            Ok((last, rows.len() as u64))
        })?;
        report.scanned += n;
        report.resealed += n;
        Ok(last)
    }

    /// Re-seals the registry's app secrets sealed under an older key of the store's ring, in
    /// one transaction (apps are few). Only the secret and its key id change: the secret is
    /// the same, so the registry's version is not bumped (no instance needs to reload).
    fn reseal_apps(&self, report: &mut RotationReport) -> Result<()> {
        let ring = self.ring();
        let active = key_param(ring.active_id());
        let n = self.with(async |c| {
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            let rows = tx
                .query(
                    &format!(
                        "SELECT app_id, secret, secret_key FROM ls_apps WHERE {APPS_LEFT}
                         ORDER BY app_id FOR UPDATE SKIP LOCKED"
                    ),
                    &[&active],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            for r in &rows {
                let app_id: String = r.try_get(0).map_err(|e| pg_err(&e))?;
                let old = sealed_from(
                    APPS_TABLE,
                    r.try_get(1).map_err(|e| pg_err(&e))?,
                    r.try_get(2).map_err(|e| pg_err(&e))?,
                )?
                .ok_or_else(|| Error::Decode {
                    table: APPS_TABLE,
                    detail: format!("app {app_id} without its secret"),
                })?;
                let new = reseal(ring, APPS_TABLE, app_id.as_bytes(), APP_SECRET_FIELD, &old)?;
                let (secret, key) = column(new, Some(&old));
                tx.execute(
                    "UPDATE ls_apps SET secret = $2, secret_key = $3 WHERE app_id = $1",
                    &[&app_id, &secret, &key],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            }
            tx.commit().await.map_err(|e| pg_err(&e))?;
            Ok(rows.len() as u64)
        })?;
        report.scanned += n;
        report.resealed += n;
        Ok(())
    }

    /// In one transaction: with the key check row locked, if no sealed column is left under
    /// an older key (and every live instance is still ready), the key check is re-sealed under
    /// the active key. False when rows are left.
    fn finish_rotation(&self) -> Result<bool> {
        let ring = self.ring();
        let active = key_param(ring.active_id());
        let done = self.with(async |c| {
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            tx.execute("SELECT 1 FROM ls_key_check WHERE id = 1 FOR UPDATE", &[])
                .await
                .map_err(|e| pg_err(&e))?;
            if rows_left(&tx, active).await? > 0 {
                tx.rollback().await.map_err(|e| pg_err(&e))?;
                return Ok(false);
            }
            write_key_check(&tx, ring).await?;
            tx.commit().await.map_err(|e| pg_err(&e))?;
            Ok(true)
        })?;
        Ok(done)
    }
}

/// Rows with a sealed column not under `active`, as `c` sees them.
async fn rows_left(c: &impl tokio_postgres::GenericClient, active: i64) -> Result<u64> {
    let row = c
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM ls_sessions WHERE {SESSIONS_LEFT})
                      + (SELECT count(*) FROM ls_tokens WHERE {TOKENS_LEFT})
                      + (SELECT count(*) FROM ls_device_polls WHERE {DEVICE_POLLS_LEFT})
                      + (SELECT count(*) FROM ls_apps WHERE {APPS_LEFT})"
            ),
            &[&active],
        )
        .await
        .map_err(|e| pg_err(&e))?;
    let n: i64 = row.try_get(0).map_err(|e| pg_err(&e))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Re-seals the key check under the active key inside `tx`.
async fn write_key_check(tx: &Transaction<'_>, ring: &Keyring) -> Result<()> {
    let sealed = ring.seal(super::KEY_CHECK_PLAINTEXT, &super::key_check_place());
    tx.execute(
        "UPDATE ls_key_check SET key_id = $1, sealed = $2 WHERE id = 1",
        &[&key_param(sealed.key_id), &sealed_bytes(&sealed)],
    )
    .await
    .map_err(|e| pg_err(&e))?;
    Ok(())
}
