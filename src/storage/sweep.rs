//! The TTL sweep: expires pending sessions, purges old terminal ones, forgets old event ids and
//! prunes the change feed as far as no exporter needs it (`Store::prune_feed`).
//!
//! It reads only the due part of the deadline indexes, so its cost is O(due), not O(all); the
//! per-state session counts change with each expiry and purge in the same batch transaction.
//!
//! A large sweep is bound by how many B-tree pages it copies and writes (redb copies every page
//! a transaction changes) and by how many times it descends a tree, so it is arranged to touch
//! each page once and to work on runs of keys rather than single keys:
//!
//! - It reads a window of due entries, sorts it by session id and cuts it into batches of
//!   consecutive ids. A batch changes one slice of `sessions`, so a leaf of that big table is
//!   copied once per sweep, not once per batch that happens to hold one of its sessions.
//! - In a batch, each table is changed in its own key order: the deadline entries are removed
//!   in one scan, the batch's sessions are taken out of `sessions` in one scan over their id
//!   range and the ones that stay are put back as one sorted run (packed into full leaves),
//!   and the new deadline entries and change-feed entries go in as runs through a cursor.
//! - Expiring a session copies its record with the status fields rewritten and the PKCE
//!   verifier dropped; nothing else is decoded, and no sealed field is opened or sealed again
//!   (their associated data is table, row key, field and key id, which the sweep never changes).
//!   The by-user entry of an expired session is not touched: it does not change.
//!
//! Each batch is one write transaction: a crash keeps whole batches or nothing of them, and the
//! next sweep carries on from the index.

use std::ops::Bound;

use redb::{ReadableTable, ReadableTableMetadata, Table};

use super::counts::CountDelta;
use super::records::{SessionPeek, StoredSession, SESSIONS_TABLE};
use super::sessions::deadline_for;
use super::tables::{
    CHANGE_DELETE, CHANGE_UPSERT, DEADLINE_EXPIRE, SEEN_EVENTS, SEEN_EVENTS_EXPIRY,
    SESSION_DEADLINES,
};
use super::{Error, Result, SessionId, SessionState, Store};

/// Due deadline entries read per pass (32 bytes each: 32 MiB at most, only while that many are
/// due). Sessions due at about the same time are together in the deadline index but anywhere
/// in `sessions`; the larger the window, the more of a batch's sessions share `sessions` leaves
/// (and the more its deadline entries spread over the index, which is much smaller).
const SWEEP_WINDOW: usize = 1 << 20;

/// Bytes a swept session is taken to add to a transaction's copied pages before any batch has
/// measured it: about a session record with an access and a refresh token, and its index entries.
const SESSION_BYTES_GUESS: usize = 1024;

/// Bytes a swept session adds to a transaction besides its record: its deadline entries (out
/// and in), and its share of the branch pages and partly filled leaves.
const SESSION_OVERHEAD_BYTES: usize = 128;

/// What one sweep did.
#[derive(Clone, Debug, Default)]
pub struct SweepReport {
    /// Pending sessions that became `expired`, with their card message ids.
    pub expired: Vec<(SessionId, Option<String>)>,
    /// Terminal sessions deleted after retention.
    pub purged: u64,
    /// Seen event ids forgotten.
    pub events_forgotten: u64,
    /// Index entries that no longer matched their record and were repaired.
    pub repaired: u64,
    /// Change-feed entries deleted (see [`Store::prune_feed`]).
    pub changes_pruned: u64,
}

/// One due deadline entry.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Due {
    id: u128,
    at: u64,
    /// Position in the window as read, i.e. in deadline order.
    pos: usize,
}

/// Session records of one batch, sorted by id, their bytes back to back in one buffer.
#[derive(Default)]
struct Rows {
    index: Vec<(u128, usize, usize)>,
    buf: Vec<u8>,
}

impl Rows {
    fn push(&mut self, id: u128, bytes: &[u8]) {
        self.push_with(id, |buf| buf.extend_from_slice(bytes));
    }

    fn push_with(&mut self, id: u128, write: impl FnOnce(&mut Vec<u8>)) {
        let start = self.buf.len();
        write(&mut self.buf);
        self.index.push((id, start, self.buf.len()));
    }

    /// Empties it, keeping its memory for the next batch.
    fn clear(&mut self) {
        self.index.clear();
        self.buf.clear();
    }

    fn iter(&self) -> impl Iterator<Item = (u128, &[u8])> + '_ {
        self.index
            .iter()
            .map(|&(id, start, end)| (id, &self.buf[start..end]))
    }
}

/// Buffers a sweep's batches reuse: a batch of 50 000 sessions holds tens of MiB of records,
/// and allocating that afresh for each batch costs more than the work on it (the allocator
/// hands such sizes back to the kernel on free, and every page faults in zeroed again).
#[derive(Default)]
struct Buffers {
    /// The records a batch took out of `sessions`.
    taken: Rows,
    /// The records that go back.
    keep: Rows,
}

impl Buffers {
    /// Record bytes per session of the last batch that took its sessions in one scan.
    fn bytes_per_session(&self) -> Option<usize> {
        let n = self.taken.index.len();
        (n > 0).then(|| self.taken.buf.len() / n)
    }
}

/// The entries of `todo` (sorted by id) grouped by session: (id, its entries).
fn by_session(todo: &[(u128, u64)]) -> impl Iterator<Item = (u128, &[(u128, u64)])> + '_ {
    todo.chunk_by(|a, b| a.0 == b.0)
        .map(|group| (group[0].0, group))
}

/// What becomes of one session's record.
enum Fate {
    /// Stays as it is.
    Keep,
    /// Replaced by [`Effects::scratch`].
    Rewrite,
    /// Deleted.
    Delete,
}

/// What one batch does besides changing `sessions`, gathered so that each table is changed in
/// its own key order afterwards.
struct Effects<'r> {
    now: u64,
    retention: u64,
    report: &'r mut SweepReport,
    new_deadlines: Vec<((u64, u128), u8)>,
    by_user_gone: Vec<(String, String, u128)>,
    states_gone: Vec<([u8; 32], u128)>,
    changes: Vec<(u8, SessionId)>,
    counts: CountDelta,
    /// The new record of the last [`Fate::Rewrite`].
    scratch: Vec<u8>,
}

impl<'r> Effects<'r> {
    fn new(now: u64, retention: u64, capacity: usize, report: &'r mut SweepReport) -> Self {
        Self {
            now,
            retention,
            report,
            new_deadlines: Vec::with_capacity(capacity),
            by_user_gone: Vec::new(),
            states_gone: Vec::new(),
            changes: Vec::with_capacity(capacity),
            counts: CountDelta::default(),
            scratch: Vec::new(),
        }
    }

    /// Decides what becomes of session `id`, whose deadline entries (`(id, due time)`) the
    /// batch took, from its stored bytes, and notes the index and change-feed entries that go with
    /// it. An entry that does not match the record is stale (the record moved on, or retention
    /// changed) and counts as repaired.
    fn decide(&mut self, id: u128, entries: &[(u128, u64)], raw: &[u8]) -> Result<Fate> {
        // A record of an older version is read as the current version.
        let upgraded;
        let s = match SessionPeek::new(raw)? {
            Some(s) => s,
            None => {
                upgraded = StoredSession::decode(raw)?.encode();
                SessionPeek::new(&upgraded)?.ok_or_else(|| Error::Decode {
                    table: SESSIONS_TABLE,
                    detail: "re-encoded session is not of the current version".into(),
                })?
            }
        };
        let (want_at, want_kind) =
            deadline_for(s.state, s.updated_at, s.expires_at, self.retention);
        let stale = entries.iter().filter(|e| e.1 != want_at).count() as u64;
        self.report.repaired += stale;
        if stale == entries.len() as u64 {
            // Only stale entries: the record keeps its deadline, which goes back in the index.
            self.new_deadlines.push(((want_at, id), want_kind));
            Ok(Fate::Keep)
        } else if s.state == SessionState::Pending {
            if let Some(h) = s.state_hash {
                self.states_gone.push((h, id));
            }
            let (next_at, next_kind) = deadline_for(
                SessionState::Expired,
                self.now,
                s.expires_at,
                self.retention,
            );
            self.new_deadlines.push(((next_at, id), next_kind));
            self.changes.push((CHANGE_UPSERT, SessionId(id)));
            self.counts
                .moved(Some(SessionState::Pending), SessionState::Expired);
            self.report
                .expired
                .push((SessionId(id), s.card_message_id.map(str::to_owned)));
            self.scratch.clear();
            s.expire_into(self.now, &mut self.scratch);
            Ok(Fate::Rewrite)
        } else {
            self.by_user_gone
                .push((s.app_id.to_owned(), s.user_id.to_owned(), id));
            self.changes.push((CHANGE_DELETE, SessionId(id)));
            self.counts.remove(s.state);
            self.report.purged += 1;
            Ok(Fate::Delete)
        }
    }
}

impl Store {
    /// Ids of pending sessions whose expiry is at or before `now`, from the index alone.
    pub fn pending_expired(&self, now: u64) -> Result<Vec<SessionId>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(SESSION_DEADLINES).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in t
            .range(..(now.saturating_add(1), 0u128))
            .map_err(|e| self.err(e))?
        {
            let (k, kind) = row.map_err(|e| self.err(e))?;
            if kind.value() == DEADLINE_EXPIRE {
                out.push(SessionId(k.value().1));
            }
        }
        Ok(out)
    }

    /// Runs the sweep at `now`, committing every `batch` sessions so no transaction grows
    /// large, and sooner if a batch's copied pages would not fit in the write buffer (half the
    /// cache): a transaction whose pages fit in it writes each page once, at commit; one that
    /// overflows it writes pages early and reads back those it changes again. The fit is
    /// measured as the sweep goes, from the records it takes.
    pub fn sweep(&self, now: u64, batch: usize) -> Result<SweepReport> {
        self.sweep_with_window(now, batch, SWEEP_WINDOW)
    }

    pub(crate) fn sweep_with_window(
        &self,
        now: u64,
        batch: usize,
        window: usize,
    ) -> Result<SweepReport> {
        let batch = batch.max(1);
        let window = window.max(batch);
        let mut report = SweepReport::default();
        let mut buffers = Buffers::default();
        let mut per_txn = batch.min(self.sessions_per_txn(SESSION_BYTES_GUESS));
        loop {
            let mut due = self.due_sessions(now, window)?;
            due.sort_unstable();
            let mut rest = due.as_slice();
            while !rest.is_empty() {
                // A session's entries (there is more than one only if the index needs repair)
                // stay in one batch.
                let mut end = per_txn.min(rest.len());
                while end < rest.len() && rest[end].id == rest[end - 1].id {
                    end += 1;
                }
                self.sweep_sessions_batch(now, &rest[..end], &mut report, &mut buffers)?;
                rest = &rest[end..];
                if let Some(bytes) = buffers.bytes_per_session() {
                    per_txn = batch.min(self.sessions_per_txn(bytes));
                }
            }
            // A full window may have left more; entries the batches re-indexed to a time that
            // is still due (a zero retention) are taken by the next pass too.
            if due.len() < window {
                break;
            }
        }
        while self.sweep_events_batch(now, batch, &mut report)? {}
        report.changes_pruned = self.prune_feed()?;
        Ok(report)
    }

    /// How many sessions of `bytes` each one transaction can change with its copied pages in
    /// the write buffer (half the cache), keeping a quarter of it for the pages around them.
    fn sessions_per_txn(&self, bytes: usize) -> usize {
        let room = self.inner.opts.cache_size / 2 / 4 * 3;
        (room / bytes.saturating_add(SESSION_OVERHEAD_BYTES)).max(1)
    }

    /// Up to `limit` session deadline entries due at `now`, in deadline order.
    fn due_sessions(&self, now: u64, limit: usize) -> Result<Vec<Due>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(SESSION_DEADLINES).map_err(|e| self.err(e))?;
        t.range(..(now.saturating_add(1), 0u128))
            .map_err(|e| self.err(e))?
            .take(limit)
            .enumerate()
            .map(|(pos, r)| {
                r.map(|(k, _)| {
                    let (at, id) = k.value();
                    Due { id, at, pos }
                })
                .map_err(|e| self.err(e))
            })
            .collect()
    }

    /// Expires or purges the sessions of `due` (sorted by id) in one transaction. An entry that
    /// is no longer in the index (its session was written since the window was read) is left
    /// alone: the session's current entry says what it needs.
    fn sweep_sessions_batch(
        &self,
        now: u64,
        due: &[Due],
        report: &mut SweepReport,
        buffers: &mut Buffers,
    ) -> Result<()> {
        let txn = self.begin_write()?;
        {
            let mut t = self.open_session_tables(&txn)?;
            // 1. Take the entries out of the deadline index: (id, due time) of those still there.
            let todo = self.take_deadlines(&mut t.deadlines, due)?;
            // 2. The sessions.
            let mut fx = Effects::new(now, self.retention_ms(), todo.len(), report);
            if self.dense(&t.sessions, &todo)? {
                // They are (nearly) all the sessions in their id range, as when many fall due
                // together: take them out in one scan and put back what stays as one run,
                // packed into full leaves.
                let Buffers { taken, keep } = buffers;
                let alone = self.take_sessions(&mut t.sessions, &todo, taken)?;
                let mut taken = taken.iter().peekable();
                keep.clear();
                for (id, ats) in by_session(&todo) {
                    let Some((_, raw)) = taken.next_if(|(rid, _)| *rid == id) else {
                        fx.report.repaired += ats.len() as u64;
                        continue;
                    };
                    match fx.decide(id, ats, raw)? {
                        Fate::Keep => keep.push(id, raw),
                        Fate::Rewrite => keep.push(id, &fx.scratch),
                        Fate::Delete => {}
                    }
                }
                self.put_sorted_sessions(&mut t.sessions, keep, alone)?;
            } else {
                // Scattered among others: change each in place (one descent each).
                for (id, ats) in by_session(&todo) {
                    let Some(mut guard) = t.sessions.get_mut(id).map_err(|e| self.err(e))? else {
                        fx.report.repaired += ats.len() as u64;
                        continue;
                    };
                    let fate = fx.decide(id, ats, guard.value())?;
                    match fate {
                        Fate::Keep => {}
                        Fate::Rewrite => guard
                            .insert(fx.scratch.as_slice())
                            .map_err(|e| self.err(e))?,
                        Fate::Delete => {
                            drop(guard);
                            t.sessions.remove(id).map_err(|e| self.err(e))?;
                        }
                    }
                }
            }
            // 3. The other indexes, each in its key order.
            fx.states_gone.sort_unstable();
            for (h, id) in &fx.states_gone {
                let points_here = t
                    .states
                    .get(h)
                    .map_err(|e| self.err(e))?
                    .is_some_and(|v| v.value() == *id);
                if points_here {
                    t.states.remove(h).map_err(|e| self.err(e))?;
                }
            }
            fx.by_user_gone.sort_unstable();
            for (app, user, id) in &fx.by_user_gone {
                t.by_user
                    .remove((app.as_str(), user.as_str(), *id))
                    .map_err(|e| self.err(e))?;
            }
            fx.new_deadlines.sort_unstable();
            insert_runs(&mut t.deadlines, &fx.new_deadlines).map_err(|e| self.err(e))?;
            self.append_changes(&mut t, &fx.changes)?;
            self.apply_counts(&mut t.counts, &fx.counts)?;
        }
        self.commit(txn)
    }

    /// True if the sessions of `todo` (sorted by id) are about all that `sessions` holds in
    /// their id range. Ids are random, so the range holds about `len * width / 2^128`.
    fn dense(&self, table: &Table<'_, u128, &'static [u8]>, todo: &[(u128, u64)]) -> Result<bool> {
        let (Some(first), Some(last)) = (todo.first(), todo.last()) else {
            return Ok(false);
        };
        let stored = table.len().map_err(|e| self.err(e))?;
        #[allow(clippy::cast_precision_loss)]
        let in_range = stored as f64 * ((last.0 - first.0) as f64 / 2f64.powi(128));
        #[allow(clippy::cast_precision_loss)]
        Ok(in_range <= 1.25 * todo.len() as f64)
    }

    /// Removes the deadline entries of `due` and returns (id, due time) of those that were
    /// there, sorted by id. When the batch is (nearly) a run of the index, as when many
    /// sessions fall due together, one scan removes it.
    fn take_deadlines(
        &self,
        table: &mut Table<'_, (u64, u128), u8>,
        due: &[Due],
    ) -> Result<Vec<(u128, u64)>> {
        let mut by_deadline: Vec<(u64, u128, usize)> = due
            .iter()
            .enumerate()
            .map(|(i, d)| (d.at, d.id, i))
            .collect();
        by_deadline.sort_unstable();
        let mut there = vec![false; due.len()];
        let (Some(first), Some(last)) = (by_deadline.first(), by_deadline.last()) else {
            return Ok(Vec::new());
        };
        let lowest = due.iter().map(|d| d.pos).min().unwrap_or(0);
        let span = due.iter().map(|d| d.pos).max().unwrap_or(0) - lowest + 1;
        if span <= 4 * due.len() {
            let mut next = 0;
            table
                .retain_in((first.0, first.1)..=(last.0, last.1), |key, _| {
                    while by_deadline
                        .get(next)
                        .is_some_and(|&(at, id, _)| (at, id) < key)
                    {
                        next += 1;
                    }
                    match by_deadline.get(next) {
                        Some(&(at, id, i)) if (at, id) == key => {
                            there[i] = true;
                            next += 1;
                            false
                        }
                        _ => true,
                    }
                })
                .map_err(|e| self.err(e))?;
        } else {
            for &(at, id, i) in &by_deadline {
                there[i] = table.remove((at, id)).map_err(|e| self.err(e))?.is_some();
            }
        }
        Ok(due
            .iter()
            .zip(there)
            .filter(|(_, there)| *there)
            .map(|(d, _)| (d.id, d.at))
            .collect())
    }

    /// Takes the records of `todo` (sorted by id) out of `sessions` in one scan over their id
    /// range, into `out` (emptied first); a missing one is simply not returned. Also says whether the range held nothing
    /// else (then the records that stay go back as one run).
    fn take_sessions(
        &self,
        table: &mut Table<'_, u128, &'static [u8]>,
        todo: &[(u128, u64)],
        out: &mut Rows,
    ) -> Result<bool> {
        out.clear();
        let (Some(first), Some(last)) = (todo.first(), todo.last()) else {
            return Ok(true);
        };
        let mut alone = true;
        let mut next = 0;
        let taken = table
            .extract_from_if(first.0..=last.0, |id, _| {
                while todo.get(next).is_some_and(|t| t.0 < id) {
                    next += 1;
                }
                let take = todo.get(next).is_some_and(|t| t.0 == id);
                alone &= take;
                take
            })
            .map_err(|e| self.err(e))?;
        for row in taken {
            let (k, v) = row.map_err(|e| self.err(e))?;
            out.push(k.value(), v.value());
        }
        Ok(alone)
    }

    /// Puts records (sorted by id, none of them in the table) into `sessions`. A run that
    /// falls into one gap goes through one cursor, which packs it into full leaves.
    fn put_sorted_sessions(
        &self,
        table: &mut Table<'_, u128, &'static [u8]>,
        rows: &Rows,
        one_gap: bool,
    ) -> Result<()> {
        if !one_gap {
            // Others are interleaved: a run would break at each of them.
            for (id, bytes) in rows.iter() {
                table.insert(id, bytes).map_err(|e| self.err(e))?;
            }
            return Ok(());
        }
        let rows: Vec<(u128, &[u8])> = rows.iter().collect();
        insert_runs(table, &rows).map_err(|e| self.err(e))
    }

    /// One batch of due seen-event ids; true if more may remain.
    fn sweep_events_batch(&self, now: u64, batch: usize, report: &mut SweepReport) -> Result<bool> {
        let txn = self.begin_write()?;
        let more = {
            let mut seen = txn.open_table(SEEN_EVENTS).map_err(|e| self.err(e))?;
            let mut expiry = txn
                .open_table(SEEN_EVENTS_EXPIRY)
                .map_err(|e| self.err(e))?;
            let due: Vec<(u64, String)> = expiry
                .range(..(now.saturating_add(1), ""))
                .map_err(|e| self.err(e))?
                .take(batch)
                .map(|r| {
                    r.map(|(k, _)| {
                        let (at, id) = k.value();
                        (at, id.to_owned())
                    })
                    .map_err(|e| self.err(e))
                })
                .collect::<Result<_>>()?;
            for (at, id) in &due {
                expiry.remove((*at, id.as_str())).map_err(|e| self.err(e))?;
                let current = seen
                    .get(id.as_str())
                    .map_err(|e| self.err(e))?
                    .map(|v| v.value());
                if current == Some(*at) {
                    seen.remove(id.as_str()).map_err(|e| self.err(e))?;
                    report.events_forgotten += 1;
                }
            }
            due.len() == batch
        };
        self.commit(txn)?;
        Ok(more)
    }
}

/// Inserts `rows` (sorted by key, distinct) into `table`: each run of them that falls into one
/// gap between existing keys through one cursor (buffered and spliced in as full leaves, with
/// no descent per key); a key already in the table gets the new value.
fn insert_runs<'a, K: redb::Key + 'static, V: redb::Value + 'static>(
    table: &mut Table<'_, K, V>,
    rows: &[(K::SelfType<'a>, V::SelfType<'a>)],
) -> std::result::Result<(), redb::Error> {
    let mut i = 0;
    while i < rows.len() {
        let start = i;
        let mut cursor = table.lower_bound_mut(Bound::Included(&rows[i].0))?;
        while let Some((key, value)) = rows.get(i) {
            match cursor.insert_before(key, value) {
                Ok(()) => i += 1,
                Err(redb::CursorError::UnorderedKey) => break,
                Err(e) => return Err(e.into()),
            }
        }
        cursor.close()?;
        if i == start {
            // The key is already there (the run could not start): replace its value.
            let (key, value) = &rows[i];
            table.insert(key, value)?;
            i += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;
    use redb::ReadableTable;
    use secrecy::SecretString;

    use super::*;
    use crate::storage::records::{encode, session_from, StoredSessionV1};
    use crate::storage::sessions::deadline_of;
    use crate::storage::tables::{CHANGES, META, OAUTH_STATES, SESSIONS, SESSIONS_BY_USER};
    use crate::storage::{AuthSession, FailureReason, Key, Keyring, StoreOptions};

    fn store(retention_ms: u64) -> Store {
        Store::open_in_memory(
            Keyring::new(Key::from_bytes(&[3; 32]), vec![]),
            StoreOptions {
                terminal_retention: Duration::from_millis(retention_ms),
                ..StoreOptions::default()
            },
        )
        .unwrap()
    }

    /// The sweep as it was first written: one due entry at a time, in deadline order, each
    /// session decoded, changed and written back with `write_stored_session`. The batched
    /// sweep must leave the store exactly as this does.
    fn reference_sweep(store: &Store, now: u64) -> SweepReport {
        let retention = store.retention_ms();
        let mut report = SweepReport::default();
        let txn = store.begin_write().unwrap();
        {
            let mut t = store.open_session_tables(&txn).unwrap();
            let due: Vec<(u64, u128)> = t
                .deadlines
                .range(..(now.saturating_add(1), 0u128))
                .unwrap()
                .map(|r| r.unwrap().0.value())
                .collect();
            for (at, id) in due {
                let stored = t
                    .sessions
                    .get(id)
                    .unwrap()
                    .map(|v| StoredSession::decode(v.value()).unwrap());
                let Some(mut s) = stored else {
                    t.deadlines.remove((at, id)).unwrap();
                    report.repaired += 1;
                    continue;
                };
                let (want_at, kind) = deadline_of(&s, retention);
                if want_at != at {
                    t.deadlines.remove((at, id)).unwrap();
                    t.deadlines.insert((want_at, id), kind).unwrap();
                    report.repaired += 1;
                } else if s.state == SessionState::Pending {
                    s.state = SessionState::Expired;
                    s.failure_reason = Some(FailureReason::SessionExpired);
                    s.updated_at = now;
                    s.pkce_verifier = None;
                    report
                        .expired
                        .push((SessionId(id), s.card_message_id.clone()));
                    store
                        .write_stored_session(&mut t, SessionId(id), &s)
                        .unwrap();
                } else {
                    t.deadlines.remove((at, id)).unwrap();
                    t.sessions.remove(id).unwrap();
                    t.by_user
                        .remove((s.app_id.as_str(), s.user_id.as_str(), id))
                        .unwrap();
                    store
                        .append_change(&mut t, CHANGE_DELETE, SessionId(id))
                        .unwrap();
                    report.purged += 1;
                }
            }
        }
        txn.commit().unwrap();
        report
    }

    /// Every table the sweep touches, as plain values (the change feed as a sorted list: the
    /// order of changes inside one sweep is not part of its contract, their seqs are).
    #[derive(Debug, PartialEq, Eq)]
    struct Dump {
        sessions: Vec<(u128, Vec<u8>)>,
        by_user: Vec<(String, String, u128)>,
        deadlines: Vec<((u64, u128), u8)>,
        states: Vec<([u8; 32], u128)>,
        changes: Vec<(u8, u128)>,
        last_seq: u64,
    }

    fn dump(store: &Store) -> Dump {
        let txn = store.begin_read().unwrap();
        let sessions = txn.open_table(SESSIONS).unwrap();
        let by_user = txn.open_table(SESSIONS_BY_USER).unwrap();
        let deadlines = txn.open_table(SESSION_DEADLINES).unwrap();
        let states = txn.open_table(OAUTH_STATES).unwrap();
        let changes = txn.open_table(CHANGES).unwrap();
        let mut feed: Vec<(u8, u128)> = changes
            .iter()
            .unwrap()
            .map(|r| {
                let v = r.unwrap().1.value();
                (v[0], u128::from_be_bytes(v[1..].try_into().unwrap()))
            })
            .collect();
        feed.sort_unstable();
        Dump {
            sessions: sessions
                .iter()
                .unwrap()
                .map(|r| {
                    let (k, v) = r.unwrap();
                    (k.value(), v.value().to_vec())
                })
                .collect(),
            by_user: by_user
                .iter()
                .unwrap()
                .map(|r| {
                    let k = r.unwrap().0;
                    let (a, u, id) = k.value();
                    (a.to_owned(), u.to_owned(), id)
                })
                .collect(),
            deadlines: deadlines
                .iter()
                .unwrap()
                .map(|r| {
                    let (k, v) = r.unwrap();
                    (k.value(), v.value())
                })
                .collect(),
            states: states
                .iter()
                .unwrap()
                .map(|r| {
                    let (k, v) = r.unwrap();
                    (k.value(), v.value())
                })
                .collect(),
            changes: feed,
            last_seq: store.last_change_seq().unwrap(),
        }
    }

    /// Copies every session table and `meta` of `from` into `to`, byte for byte (sealed
    /// fields have random nonces, so writing the same sessions twice would not compare).
    fn copy_store(from: &Store, to: &Store) {
        let r = from.begin_read().unwrap();
        let w = to.begin_write().unwrap();
        {
            let src = r.open_table(SESSIONS).unwrap();
            let mut dst = w.open_table(SESSIONS).unwrap();
            for row in src.iter().unwrap() {
                let (k, v) = row.unwrap();
                dst.insert(k.value(), v.value()).unwrap();
            }
            let src = r.open_table(SESSIONS_BY_USER).unwrap();
            let mut dst = w.open_table(SESSIONS_BY_USER).unwrap();
            for row in src.iter().unwrap() {
                dst.insert(row.unwrap().0.value(), ()).unwrap();
            }
            let src = r.open_table(SESSION_DEADLINES).unwrap();
            let mut dst = w.open_table(SESSION_DEADLINES).unwrap();
            for row in src.iter().unwrap() {
                let (k, v) = row.unwrap();
                dst.insert(k.value(), v.value()).unwrap();
            }
            let src = r.open_table(OAUTH_STATES).unwrap();
            let mut dst = w.open_table(OAUTH_STATES).unwrap();
            for row in src.iter().unwrap() {
                let (k, v) = row.unwrap();
                dst.insert(k.value(), v.value()).unwrap();
            }
            let src = r.open_table(CHANGES).unwrap();
            let mut dst = w.open_table(CHANGES).unwrap();
            for row in src.iter().unwrap() {
                let (k, v) = row.unwrap();
                dst.insert(k.value(), v.value()).unwrap();
            }
            let src = r.open_table(META).unwrap();
            let mut dst = w.open_table(META).unwrap();
            for row in src.iter().unwrap() {
                let (k, v) = row.unwrap();
                dst.insert(k.value(), v.value()).unwrap();
            }
        }
        w.commit().unwrap();
    }

    /// Raw changes to a store that only damage or old files have: a stale extra deadline
    /// entry, a deadline entry whose session is gone, a record in the schema-1 encoding.
    fn damage(store: &Store, id: u128, stale_at: &[u64], missing: bool, v1: bool) {
        let w = store.begin_write().unwrap();
        {
            let mut sessions = w.open_table(SESSIONS).unwrap();
            let mut d = w.open_table(SESSION_DEADLINES).unwrap();
            for at in stale_at {
                d.insert((*at, id), DEADLINE_EXPIRE).unwrap();
            }
            if missing {
                sessions.remove(id).unwrap();
            } else if v1 {
                let s = StoredSession::decode(sessions.get(id).unwrap().unwrap().value()).unwrap();
                let old = session_from!(StoredSessionV1 {
                    access_token: s.access_token.clone(),
                    refresh_token: s.refresh_token.clone(),
                } from s);
                sessions.insert(id, encode(1, &old).as_slice()).unwrap();
            }
        }
        w.commit().unwrap();
    }

    #[derive(Clone, Debug)]
    struct Spec {
        /// Clustered ids sit close together (a dense id range); others are spread out.
        clustered: bool,
        id: u128,
        state: usize,
        expires_at: u64,
        updated_at: u64,
        user: u8,
        secrets: bool,
        card: bool,
        /// Extra deadline entries that match nothing.
        stale_at: Vec<u64>,
        missing: bool,
        v1: bool,
    }

    fn spec() -> impl Strategy<Value = Spec> {
        (
            (
                any::<bool>(),
                any::<u128>(),
                0usize..6,
                0u64..2000,
                0u64..2000,
            ),
            (0u8..4, any::<bool>(), any::<bool>()),
            (
                proptest::collection::vec(0u64..2000, 0..3),
                prop::bool::weighted(0.05),
                prop::bool::weighted(0.1),
            ),
        )
            .prop_map(|(a, b, c)| Spec {
                clustered: a.0,
                id: a.1,
                state: a.2,
                expires_at: a.3,
                updated_at: a.4,
                user: b.0,
                secrets: b.1,
                card: b.2,
                stale_at: c.0,
                missing: c.1,
                v1: c.2,
            })
    }

    fn build(specs: &[Spec], retention: u64) -> Store {
        let store = store(retention);
        let mut sessions = Vec::new();
        for sp in specs {
            let mut s = AuthSession::new_pending(
                "cli_app",
                &format!("u{}", sp.user),
                vec!["offline_access".into()],
                sp.updated_at,
                0,
            );
            s.session_id = SessionId(if sp.clustered {
                (7u128 << 100) + (sp.id & 0xffff)
            } else {
                sp.id
            });
            s.state = SessionState::ALL[sp.state];
            s.expires_at = sp.expires_at;
            s.updated_at = sp.updated_at;
            if sp.card {
                s.card_message_id = Some(format!("om_{}", sp.id % 1000));
            }
            if sp.secrets && !sp.v1 {
                s.state_hash = Some(
                    u64::try_from(sp.id & u128::from(u64::MAX))
                        .unwrap()
                        .to_be_bytes()
                        .repeat(4)
                        .try_into()
                        .unwrap(),
                );
                s.pkce_verifier = Some(SecretString::from("verifier".to_owned()));
                s.access_token = Some(SecretString::from("u-token".to_owned()));
            }
            sessions.push(s);
        }
        store.put_sessions(&sessions).unwrap();
        for (sp, s) in specs.iter().zip(&sessions) {
            damage(&store, s.session_id.0, &sp.stale_at, sp.missing, sp.v1);
        }
        store
    }

    fn sorted(mut r: SweepReport) -> SweepReport {
        r.expired.sort();
        r
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// Whatever the batch and window sizes, whichever way a batch takes its sessions (one
        /// scan of a dense id range, or one at a time), the sweep leaves every table as the
        /// one-entry-at-a-time sweep does and reports the same.
        #[test]
        fn batched_sweep_matches_the_one_at_a_time_sweep(
            specs in proptest::collection::vec(spec(), 1..80),
            now in 0u64..2000,
            retention in 1u64..1500,
            batch in 1usize..12,
            window in 1usize..40,
        ) {
            let fast = build(&specs, retention);
            let slow = store(retention);
            copy_store(&fast, &slow);
            prop_assert_eq!(dump(&fast), dump(&slow));
            let got = fast.sweep_with_window(now, batch, window).unwrap();
            let want = reference_sweep(&slow, now);
            let (got, want) = (sorted(got), sorted(want));
            prop_assert_eq!(&got.expired, &want.expired);
            prop_assert_eq!(got.purged, want.purged);
            prop_assert_eq!(got.repaired, want.repaired);
            prop_assert_eq!(dump(&fast), dump(&slow));
        }
    }

    /// With a write buffer that holds a few dozen sessions, a sweep asked for one large batch
    /// cuts it into transactions that fit (sizing them from the records it took) and leaves
    /// the store as the one-at-a-time sweep does.
    #[test]
    fn a_batch_larger_than_the_write_buffer_is_cut_and_sweeps_the_same() {
        let specs: Vec<Spec> = (0..600u128)
            .map(|i| Spec {
                clustered: false,
                id: i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835),
                state: usize::from(i % 3 == 0), // pending, or completed (purged)
                expires_at: 100,
                updated_at: 50,
                user: u8::try_from(i % 4).unwrap(),
                secrets: true,
                card: i % 2 == 0,
                stale_at: vec![],
                missing: false,
                v1: false,
            })
            .collect();
        let built = build(&specs, 10);
        let small = Store::open_in_memory(
            Keyring::new(Key::from_bytes(&[3; 32]), vec![]),
            StoreOptions {
                terminal_retention: Duration::from_millis(10),
                cache_size: 64 * 1024,
                ..StoreOptions::default()
            },
        )
        .unwrap();
        let slow = store(10);
        copy_store(&built, &small);
        copy_store(&built, &slow);
        let per_txn = small.sessions_per_txn(SESSION_BYTES_GUESS);
        assert!(
            per_txn < specs.len() / 4,
            "{per_txn} sessions per transaction"
        );
        let got = sorted(small.sweep(1_000, 10_000).unwrap());
        let want = sorted(reference_sweep(&slow, 1_000));
        assert_eq!(got.expired.len(), 400);
        assert_eq!(got.purged, 200);
        assert_eq!(got.expired, want.expired);
        assert_eq!((got.purged, got.repaired), (want.purged, want.repaired));
        assert_eq!(dump(&small), dump(&slow));
        assert_eq!(
            small.count_sessions_by_state().unwrap(),
            slow.count_sessions_by_state().unwrap()
        );
    }

    /// A session written between reading the window and its batch is judged by what it is
    /// then: one whose deadline moved is left alone, one rewritten with the same deadline is
    /// still expired.
    #[test]
    fn a_session_written_after_the_window_was_read_is_judged_as_it_is_now() {
        let store = store(1000);
        let now = 5_000;
        let mut moved = AuthSession::new_pending("cli_app", "a", vec![], 0, 100);
        let mut same = AuthSession::new_pending("cli_app", "b", vec![], 0, 100);
        store.put_sessions(&[moved.clone(), same.clone()]).unwrap();
        let mut due = store.due_sessions(now, 100).unwrap();
        due.sort_unstable();
        assert_eq!(due.len(), 2);
        moved.expires_at = now + 10_000;
        same.card_message_id = Some("om_new".into());
        store.put_session(&moved).unwrap();
        store.put_session(&same).unwrap();
        let mut report = SweepReport::default();
        store
            .sweep_sessions_batch(now, &due, &mut report, &mut Buffers::default())
            .unwrap();
        assert_eq!(
            report.expired,
            vec![(same.session_id, Some("om_new".into()))]
        );
        assert_eq!(report.repaired, 0);
        let m = store.get_session(moved.session_id).unwrap().unwrap();
        assert_eq!(m.state, SessionState::Pending);
        assert_eq!(
            store.pending_expired(now + 10_000).unwrap(),
            vec![moved.session_id]
        );
        let s = store.get_session(same.session_id).unwrap().unwrap();
        assert_eq!(s.state, SessionState::Expired);
        assert_eq!(s.failure_reason, Some(FailureReason::SessionExpired));
    }
}
