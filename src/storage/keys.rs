//! Key status and online key rotation.
//!
//! Rotation re-seals every secret that is not under the active key, in small batches, each its
//! own write transaction, so the service keeps serving while it runs. The key check record is
//! re-sealed last; until then the store reports the rotation as pending. After it, the previous
//! keys are no longer needed.

use std::collections::BTreeMap;
use std::ops::Bound;

use redb::{ReadableTable, ReadableTableMetadata};

use super::envelope::{Place, Sealed};
use super::records::{token_row, StoredSession, StoredToken, SESSIONS_TABLE, TOKENS_TABLE};
use super::tables::{META, SESSIONS, TOKENS};
use super::{
    key_check_place, Error, KeyId, Result, SessionId, Store, KEY_CHECK, KEY_CHECK_PLAINTEXT,
};

/// Which keys seal what.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KeyStatus {
    /// The configured active key.
    pub active: String,
    /// The key the store's key check is sealed under.
    pub store_key: String,
    /// Sealed fields per key id.
    pub sealed_fields_by_key: BTreeMap<String, u64>,
    /// True while some secret or the key check is not under the active key.
    pub rotation_pending: bool,
}

impl KeyStatus {
    /// The status of a store whose key check is sealed under `store_key`, holding
    /// `by_key` sealed fields per key, with `active` configured (either backend).
    pub(crate) fn new(active: KeyId, store_key: KeyId, by_key: BTreeMap<KeyId, u64>) -> Self {
        Self {
            active: active.to_string(),
            store_key: store_key.to_string(),
            rotation_pending: store_key != active || by_key.keys().any(|k| *k != active),
            sealed_fields_by_key: by_key
                .into_iter()
                .map(|(k, n)| (k.to_string(), n))
                .collect(),
        }
    }
}

/// What a rotation did.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct RotationReport {
    /// Records read.
    pub scanned: u64,
    /// Records re-sealed.
    pub resealed: u64,
}

/// Runs `step` from the start of a table until a batch comes back short: each call gets the
/// cursor the previous one returned (the last key it read) and says how many rows it read.
fn in_batches<C>(
    batch: usize,
    mut step: impl FnMut(Option<C>) -> Result<(Option<C>, usize)>,
) -> Result<()> {
    let mut after = None;
    loop {
        let (last, n) = step(after)?;
        if n < batch {
            return Ok(());
        }
        after = last;
    }
}

impl Store {
    /// Up to `batch` rows of a session-keyed table after the rotation cursor `after`, copied
    /// out (the session and device-poll rotations read their pages this way).
    pub(super) fn rows_after(
        &self,
        t: &impl ReadableTable<u128, &'static [u8]>,
        after: Option<u128>,
        batch: usize,
    ) -> Result<Vec<(u128, Vec<u8>)>> {
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        t.range::<u128>((lower, Bound::Unbounded))
            .map_err(|e| self.err(e))?
            .take(batch)
            .map(|r| {
                r.map(|(k, v)| (k.value(), v.value().to_vec()))
                    .map_err(|e| self.err(e))
            })
            .collect()
    }
}

impl Store {
    /// Counts sealed fields per key id (reads every record; for the CLI, not a hot path).
    pub fn key_status(&self) -> Result<KeyStatus> {
        let txn = self.begin_read()?;
        let mut by_key: BTreeMap<KeyId, u64> = BTreeMap::new();
        let sessions = txn.open_table(SESSIONS).map_err(|e| self.err(e))?;
        let expired = txn
            .open_table(super::tables::SESSIONS_EXPIRED)
            .map_err(|e| self.err(e))?;
        for row in sessions.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let at = expired.get(k.value()).map_err(|e| self.err(e))?;
            let mut s = StoredSession::decode(v.value())?.overlay(at.map(|a| a.value()));
            for (_, s) in s.sealed_fields() {
                *by_key.entry(s.key_id).or_default() += 1;
            }
        }
        let tokens = txn.open_table(TOKENS).map_err(|e| self.err(e))?;
        for row in tokens.iter().map_err(|e| self.err(e))? {
            let (_, v) = row.map_err(|e| self.err(e))?;
            for (_, s) in StoredToken::decode(v.value())?.sealed_fields() {
                *by_key.entry(s.key_id).or_default() += 1;
            }
        }
        drop(txn);
        for k in self.store_sealed_app_keys()? {
            *by_key.entry(k).or_default() += 1;
        }
        for k in self.device_poll_keys()? {
            *by_key.entry(k).or_default() += 1;
        }
        Ok(KeyStatus::new(
            self.active_key_id(),
            self.store_key_id()?,
            by_key,
        ))
    }

    /// True if the key check or a device code is not under the active key (a rotation is
    /// pending). A rotation re-seals the key check last, so an unfinished one reads as pending;
    /// the device codes are read too, because a rotation by an older build finished without
    /// them (they are few: one per pending device session).
    pub fn rotation_pending(&self) -> Result<bool> {
        Ok(self.store_key_id()? != self.active_key_id() || self.device_polls_under_older_keys()?)
    }

    /// Re-seals every secret under the active key, `batch` records per transaction, calling
    /// `progress(done, total)` after each batch. Safe to run while the service serves.
    pub fn rotate_keys(
        &self,
        batch: usize,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<RotationReport> {
        let batch = batch.max(1);
        let total = {
            let txn = self.begin_read()?;
            let s = txn.open_table(SESSIONS).map_err(|e| self.err(e))?.len();
            let t = txn.open_table(TOKENS).map_err(|e| self.err(e))?.len();
            let a = txn
                .open_table(super::tables::APPS)
                .map_err(|e| self.err(e))?
                .len();
            let d = txn
                .open_table(super::tables::DEVICE_POLLS)
                .map_err(|e| self.err(e))?
                .len();
            s.map_err(|e| self.err(e))?
                + t.map_err(|e| self.err(e))?
                + a.map_err(|e| self.err(e))?
                + d.map_err(|e| self.err(e))?
        };
        let mut report = RotationReport::default();
        in_batches(batch, |after: Option<u128>| {
            let r = self.rotate_sessions_batch(after, batch, &mut report);
            progress(report.scanned, total);
            r
        })?;
        in_batches(batch, |after: Option<(String, String)>| {
            let r = self.rotate_tokens_batch(after.as_ref(), batch, &mut report);
            progress(report.scanned, total);
            r
        })?;
        self.rotate_apps(&mut report)?;
        progress(report.scanned, total);
        in_batches(batch, |after: Option<u128>| {
            let r = self.rotate_device_polls_batch(after, batch, &mut report);
            progress(report.scanned, total);
            r
        })?;
        // Last: the key check, so an interrupted rotation still reads as pending.
        self.put_key_check(&self.ring().seal(KEY_CHECK_PLAINTEXT, &key_check_place()))?;
        Ok(report)
    }

    /// Replaces the key check with `sealed`: a copy of another store's key check, made by the
    /// same keys (the PostgreSQL backup's scratch store takes the database's).
    pub(crate) fn put_key_check(&self, sealed: &Sealed) -> Result<()> {
        let txn = self.begin_write()?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            meta.insert(KEY_CHECK, super::records::encode(1, sealed).as_slice())
                .map_err(|e| self.err(e))?;
        }
        self.commit(txn)
    }

    pub(super) fn reseal(
        &self,
        table: &'static str,
        row: &[u8],
        field: &str,
        s: &mut Sealed,
    ) -> Result<bool> {
        if s.key_id == self.active_key_id() {
            return Ok(false);
        }
        let place = Place { table, row, field };
        let plain = self.ring().open(s, &place).map_err(|e| Error::Decrypt {
            table,
            detail: format!("field {field}: {e}"),
        })?;
        *s = self.ring().seal(&plain, &place);
        Ok(true)
    }

    fn rotate_sessions_batch(
        &self,
        after: Option<u128>,
        batch: usize,
        report: &mut RotationReport,
    ) -> Result<(Option<u128>, usize)> {
        let txn = self.begin_write()?;
        let (last, n) = {
            let mut t = self.open_session_tables(&txn)?;
            let rows = self.rows_after(&t.sessions, after, batch)?;
            for (id, bytes) in &rows {
                // A session the sweep marked expired is re-sealed as it reads (without its
                // PKCE verifier), and its record then says so itself.
                let at = t
                    .expired
                    .get(*id)
                    .map_err(|e| self.err(e))?
                    .map(|a| a.value());
                let mut s = StoredSession::decode(bytes)?.overlay(at);
                let row = id.to_be_bytes();
                let mut changed = false;
                for (field, sealed) in s.sealed_fields() {
                    changed |= self.reseal(SESSIONS_TABLE, &row, field, sealed)?;
                }
                report.scanned += 1;
                if changed {
                    t.sessions
                        .insert(*id, s.encode().as_slice())
                        .map_err(|e| self.err(e))?;
                    if at.is_some() {
                        t.expired.remove(*id).map_err(|e| self.err(e))?;
                    }
                    // The sealed columns changed (new key id): exporters re-export the row.
                    self.append_change(&mut t, super::tables::CHANGE_UPSERT, SessionId(*id))?;
                    report.resealed += 1;
                }
            }
            (rows.last().map(|r| r.0), rows.len())
        };
        self.commit(txn)?;
        Ok((last, n))
    }

    fn rotate_tokens_batch(
        &self,
        after: Option<&(String, String)>,
        batch: usize,
        report: &mut RotationReport,
    ) -> Result<(Option<(String, String)>, usize)> {
        let txn = self.begin_write()?;
        let (last, n) = {
            let mut t = txn.open_table(TOKENS).map_err(|e| self.err(e))?;
            let lower = after.map_or(Bound::Unbounded, |(a, u)| {
                Bound::Excluded((a.as_str(), u.as_str()))
            });
            let rows: Vec<((String, String), Vec<u8>)> = t
                .range::<(&str, &str)>((lower, Bound::Unbounded))
                .map_err(|e| self.err(e))?
                .take(batch)
                .map(|r| {
                    r.map(|(k, v)| {
                        let (a, u) = k.value();
                        ((a.to_owned(), u.to_owned()), v.value().to_vec())
                    })
                    .map_err(|e| self.err(e))
                })
                .collect::<Result<_>>()?;
            for ((app, user), bytes) in &rows {
                let mut s = StoredToken::decode(bytes)?;
                let row = token_row(app, user);
                let mut changed = false;
                for (field, sealed) in s.sealed_fields() {
                    changed |= self.reseal(TOKENS_TABLE, &row, field, sealed)?;
                }
                report.scanned += 1;
                if changed {
                    t.insert((app.as_str(), user.as_str()), s.encode().as_slice())
                        .map_err(|e| self.err(e))?;
                    report.resealed += 1;
                }
            }
            (rows.last().map(|r| r.0.clone()), rows.len())
        };
        self.commit(txn)?;
        Ok((last, n))
    }
}
