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
//!   in one scan, purged records are deleted in one scan over their id range, and the marks,
//!   new deadline entries and change-feed entries go in as runs through a cursor.
//! - Expiring a session does not rewrite its record (about a KiB, sealed tokens included, a
//!   whole `sessions` leaf per few sessions): it adds the session to `sessions_expired` (id →
//!   expiry time, 24 bytes), and every reader sees a pending record with such a mark as expired
//!   at that time (`StoredSession::overlay`), as if the record had been rewritten: state
//!   `expired`, reason `session_expired`, `updated_at` the sweep's time, no PKCE verifier. The
//!   record is only read, in one scan of the batch's id range; nothing else is decoded and no
//!   sealed field is opened. The mark goes when the record is next written (any write replaces
//!   what the session is) or purged. The by-user entry of an expired session is not touched.
//!
//! Each batch is one write transaction: a crash keeps whole batches or nothing of them, and the
//! next sweep carries on from the index.

use std::ops::Bound;

use redb::{ReadableTable, ReadableTableMetadata, Table};

use super::counts::CountDelta;
use super::records::{SessionPeek, StoredSession, SESSIONS_TABLE};
use super::sessions::{deadline_for, expired_at};
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

/// What a sweep's batches measured, to size the next transaction.
#[derive(Default)]
struct Measured {
    /// Sessions the last batch judged, and the record bytes it deleted (the only records a
    /// batch writes: an expiry leaves its record as it is).
    sessions: usize,
    deleted_bytes: usize,
}

impl Measured {
    /// Record bytes a batch deleted per session it judged, once a batch has run.
    fn bytes_per_session(&self) -> Option<usize> {
        (self.sessions > 0).then(|| self.deleted_bytes / self.sessions)
    }
}

/// The entries of `todo` (sorted by id) grouped by session: (id, its entries).
fn by_session(todo: &[(u128, u64)]) -> impl Iterator<Item = (u128, &[(u128, u64)])> + '_ {
    todo.chunk_by(|a, b| a.0 == b.0)
        .map(|group| (group[0].0, group))
}

/// What becomes of one session's record.
enum Fate {
    /// Stays as it is (an expired session gets its mark in `sessions_expired` instead).
    Keep,
    /// Deleted.
    Delete,
}

/// What one batch does besides reading `sessions`, gathered so that each table is changed in
/// its own key order afterwards.
struct Effects<'r> {
    now: u64,
    retention: u64,
    report: &'r mut SweepReport,
    new_deadlines: Vec<((u64, u128), u8)>,
    /// Sessions expired by this batch: their marks (id, expiry time), in id order.
    new_marks: Vec<(u128, u64)>,
    /// Marks of the sessions this batch deletes.
    marks_gone: Vec<u128>,
    by_user_gone: Vec<(String, String, u128)>,
    states_gone: Vec<([u8; 32], u128)>,
    changes: Vec<(u8, SessionId)>,
    counts: CountDelta,
}

impl<'r> Effects<'r> {
    fn new(now: u64, retention: u64, capacity: usize, report: &'r mut SweepReport) -> Self {
        Self {
            now,
            retention,
            report,
            new_deadlines: Vec::with_capacity(capacity),
            new_marks: Vec::with_capacity(capacity),
            marks_gone: Vec::new(),
            by_user_gone: Vec::new(),
            states_gone: Vec::new(),
            changes: Vec::with_capacity(capacity),
            counts: CountDelta::default(),
        }
    }

    /// Decides what becomes of session `id`, whose deadline entries (`(id, due time)`) the
    /// batch took, from its stored bytes and its mark in `sessions_expired` (`marked`: the
    /// time an earlier sweep expired it), and notes the index, mark and change-feed entries
    /// that go with it. The session is judged as readers see it: a pending record with a mark
    /// is expired at the mark's time. An entry that does not match the session is stale (it
    /// moved on, or retention changed) and counts as repaired.
    fn decide(
        &mut self,
        id: u128,
        entries: &[(u128, u64)],
        raw: &[u8],
        marked: Option<u64>,
    ) -> Result<Fate> {
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
        let (state, updated_at) = match marked {
            Some(at) if s.state == SessionState::Pending => (SessionState::Expired, at),
            _ => (s.state, s.updated_at),
        };
        let (want_at, want_kind) = deadline_for(state, updated_at, s.expires_at, self.retention);
        let stale = entries.iter().filter(|e| e.1 != want_at).count() as u64;
        self.report.repaired += stale;
        if stale == entries.len() as u64 {
            // Only stale entries: the session keeps its deadline, which goes back in the index.
            self.new_deadlines.push(((want_at, id), want_kind));
            Ok(Fate::Keep)
        } else if state == SessionState::Pending {
            // Expired by a mark: the record (sealed fields and all) is not rewritten.
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
            self.new_marks.push((id, self.now));
            self.changes.push((CHANGE_UPSERT, SessionId(id)));
            self.counts
                .moved(Some(SessionState::Pending), SessionState::Expired);
            self.report
                .expired
                .push((SessionId(id), s.card_message_id.map(str::to_owned)));
            Ok(Fate::Keep)
        } else {
            if marked.is_some() {
                self.marks_gone.push(id);
            }
            self.by_user_gone
                .push((s.app_id.to_owned(), s.user_id.to_owned(), id));
            self.changes.push((CHANGE_DELETE, SessionId(id)));
            self.counts.remove(state);
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
    /// measured as the sweep goes, from the records it deletes (an expiry writes only index
    /// entries and its mark).
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
                let measured = self.sweep_sessions_batch(now, &rest[..end], &mut report)?;
                rest = &rest[end..];
                if let Some(bytes) = measured.bytes_per_session() {
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
    /// alone: the session's current entry says what it needs. An expiry leaves the record as
    /// it is and marks the session in `sessions_expired`; a purge deletes record and mark.
    fn sweep_sessions_batch(
        &self,
        now: u64,
        due: &[Due],
        report: &mut SweepReport,
    ) -> Result<Measured> {
        let txn = self.begin_write()?;
        let mut measured = Measured::default();
        {
            let mut t = self.open_session_tables(&txn)?;
            // 1. Take the entries out of the deadline index: (id, due time) of those still there.
            let todo = self.take_deadlines(&mut t.deadlines, due)?;
            measured.sessions = todo.len();
            // 2. Judge the sessions from their records, which are only read.
            let mut fx = Effects::new(now, self.retention_ms(), todo.len(), report);
            let mut gone: Vec<u128> = Vec::new();
            if let (true, Some(first), Some(last)) = (
                self.dense(&t.sessions, &todo)?,
                todo.first().map(|e| e.0),
                todo.last().map(|e| e.0),
            ) {
                // They are (nearly) all the sessions in their id range, as when many fall due
                // together: read the range and its marks in one scan each.
                let marks: Vec<(u128, u64)> = t
                    .expired
                    .range(first..=last)
                    .map_err(|e| self.err(e))?
                    .map(|r| {
                        r.map(|(k, v)| (k.value(), v.value()))
                            .map_err(|e| self.err(e))
                    })
                    .collect::<Result<_>>()?;
                let mut marks = marks.into_iter().peekable();
                let mut groups = by_session(&todo).peekable();
                for row in t.sessions.range(first..=last).map_err(|e| self.err(e))? {
                    let (k, v) = row.map_err(|e| self.err(e))?;
                    let id = k.value();
                    while let Some((_, ats)) = groups.next_if(|(gid, _)| *gid < id) {
                        fx.report.repaired += ats.len() as u64;
                    }
                    let Some((_, ats)) = groups.next_if(|(gid, _)| *gid == id) else {
                        continue;
                    };
                    while marks.next_if(|m| m.0 < id).is_some() {}
                    let marked = marks.next_if(|m| m.0 == id).map(|m| m.1);
                    if let Fate::Delete = fx.decide(id, ats, v.value(), marked)? {
                        measured.deleted_bytes += v.value().len();
                        gone.push(id);
                    }
                }
                for (_, ats) in groups {
                    fx.report.repaired += ats.len() as u64;
                }
            } else {
                // Scattered among others: one descent each.
                for (id, ats) in by_session(&todo) {
                    let Some(v) = t.sessions.get(id).map_err(|e| self.err(e))? else {
                        fx.report.repaired += ats.len() as u64;
                        continue;
                    };
                    let marked = expired_at(&t.expired, id).map_err(|e| self.err(e))?;
                    if let Fate::Delete = fx.decide(id, ats, v.value(), marked)? {
                        measured.deleted_bytes += v.value().len();
                        gone.push(id);
                    }
                }
            }
            // 3. Every table in its key order.
            self.delete_sessions(&mut t.sessions, &gone)?;
            for id in &fx.marks_gone {
                t.expired.remove(id).map_err(|e| self.err(e))?;
            }
            insert_runs(&mut t.expired, &fx.new_marks).map_err(|e| self.err(e))?;
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
        self.commit(txn)?;
        Ok(measured)
    }

    /// Deletes the records `ids` (sorted, all present) from `sessions`: in one scan over their
    /// id range when they are most of it, else one by one.
    fn delete_sessions(
        &self,
        table: &mut Table<'_, u128, &'static [u8]>,
        ids: &[u128],
    ) -> Result<()> {
        let (Some(&first), Some(&last)) = (ids.first(), ids.last()) else {
            return Ok(());
        };
        let ids_len = ids.len() as u64;
        let stored = table.len().map_err(|e| self.err(e))?;
        #[allow(clippy::cast_precision_loss)]
        let in_range = stored as f64 * ((last - first) as f64 / 2f64.powi(128));
        #[allow(clippy::cast_precision_loss)]
        if ids_len > 64 && in_range <= 1.25 * ids_len as f64 {
            let mut next = 0;
            table
                .retain_in(first..=last, |id, _| {
                    while ids.get(next).is_some_and(|&g| g < id) {
                        next += 1;
                    }
                    ids.get(next) != Some(&id)
                })
                .map_err(|e| self.err(e))?;
        } else {
            for id in ids {
                table.remove(id).map_err(|e| self.err(e))?;
            }
        }
        Ok(())
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
    use crate::storage::tables::{
        CHANGES, META, OAUTH_STATES, SESSIONS, SESSIONS_BY_USER, SESSIONS_EXPIRED,
    };
    use crate::storage::{AuthSession, FailureReason, Key, Keyring, PendingUpdate, StoreOptions};

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
    /// order of changes inside one sweep is not part of its contract, their seqs are). The
    /// sessions are as readers see them: a record with a mark in `sessions_expired` is the
    /// record expired at the mark's time, encoded as a record the sweep had rewritten would be
    /// (the one-at-a-time sweep leaves no marks).
    #[derive(Debug, PartialEq, Eq)]
    struct Dump {
        sessions: Vec<(u128, Vec<u8>)>,
        /// Marks of sessions that are gone (there should be none).
        marks: Vec<u128>,
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
        let marks = txn.open_table(SESSIONS_EXPIRED).unwrap();
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
                    let mark = marks.get(k.value()).unwrap().map(|m| m.value());
                    let bytes = match mark {
                        Some(at) => StoredSession::decode(v.value())
                            .unwrap()
                            .overlay(Some(at))
                            .encode(),
                        None => v.value().to_vec(),
                    };
                    (k.value(), bytes)
                })
                .collect(),
            marks: marks
                .iter()
                .unwrap()
                .map(|r| r.unwrap().0.value())
                .filter(|id| sessions.get(id).unwrap().is_none())
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

    /// The session id a spec stands for.
    fn session_id(sp: &Spec) -> u128 {
        if sp.clustered {
            (7u128 << 100) + (sp.id & 0xffff)
        } else {
            sp.id
        }
    }

    /// Builds a store from the specs; of specs that stand for the same session id (clustered
    /// ids collide), only the first counts, so one spec cannot damage another's session.
    fn build(specs: &[Spec], retention: u64) -> Store {
        let store = store(retention);
        let mut taken = std::collections::HashSet::new();
        let specs: Vec<&Spec> = specs
            .iter()
            .filter(|sp| taken.insert(session_id(sp)))
            .collect();
        let mut sessions = Vec::new();
        for sp in specs.iter().copied() {
            let mut s = AuthSession::new_pending(
                "cli_app",
                &format!("u{}", sp.user),
                vec!["offline_access".into()],
                sp.updated_at,
                0,
            );
            s.session_id = SessionId(session_id(sp));
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
        for (sp, s) in specs.iter().copied().zip(&sessions) {
            damage(&store, s.session_id.0, &sp.stale_at, sp.missing, sp.v1);
        }
        store
    }

    /// Two clustered specs can stand for one session: the first removing it must not leave
    /// the second rewriting a session that is gone (the case a CI run drew).
    #[test]
    fn specs_that_share_a_session_id_build_one_session() {
        let base = Spec {
            clustered: true,
            id: 5,
            state: 0,
            expires_at: 0,
            updated_at: 0,
            user: 0,
            secrets: false,
            card: false,
            stale_at: vec![],
            missing: true,
            v1: false,
        };
        let twin = Spec {
            id: 5 + (1 << 20),
            missing: false,
            v1: true,
            ..base.clone()
        };
        let store = build(&[base, twin], 1);
        let r = store.begin_read().unwrap();
        assert!(r.open_table(SESSIONS).unwrap().is_empty().unwrap());
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
        store.sweep_sessions_batch(now, &due, &mut report).unwrap();
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

    /// The sweep leaves an expired session's record as it was and marks it; every reader
    /// sees it expired all the same (fail closed: never pending), a late completion loses to
    /// the expiry (first wins), a later write replaces the mark, and the purge after retention
    /// removes record and mark.
    #[test]
    fn every_reader_sees_a_marked_session_as_expired() {
        let store = store(1000);
        let mut s = AuthSession::new_pending("cli_app", "u1", vec![], 0, 100);
        s.state_hash = Some([9; 32]);
        s.pkce_verifier = Some(SecretString::from("verifier".to_owned()));
        s.card_message_id = Some("om_1".into());
        let mut r = AuthSession::new_pending("cli_app", "u2", vec![], 0, 100);
        r.state_hash = Some([8; 32]);
        store.put_sessions(&[s.clone(), r.clone()]).unwrap();
        let report = sorted(store.sweep(500, 10).unwrap());
        let mut want = vec![
            (s.session_id, Some("om_1".to_owned())),
            (r.session_id, None),
        ];
        want.sort();
        assert_eq!(report.expired, want);
        let raw = |id: SessionId| {
            let txn = store.begin_read().unwrap();
            let rec = txn
                .open_table(SESSIONS)
                .unwrap()
                .get(id.0)
                .unwrap()
                .map(|v| StoredSession::decode(v.value()).unwrap().state);
            let mark = txn
                .open_table(SESSIONS_EXPIRED)
                .unwrap()
                .get(id.0)
                .unwrap()
                .map(|v| v.value());
            (rec, mark)
        };
        // Not rewritten: the record still says pending, the mark says expired at 500.
        assert_eq!(raw(s.session_id), (Some(SessionState::Pending), Some(500)));
        let got = store.get_session(s.session_id).unwrap().unwrap();
        assert_eq!(got.state, SessionState::Expired);
        assert_eq!(got.failure_reason, Some(FailureReason::SessionExpired));
        assert_eq!(got.updated_at, 500);
        assert!(got.pkce_verifier.is_none());
        let sum = store.get_session_summary(s.session_id).unwrap().unwrap();
        assert_eq!(sum.state, "expired");
        let mine = store.sessions_for_user("cli_app", "u1").unwrap();
        assert_eq!(mine.len(), 1);
        assert_eq!(mine[0].state, SessionState::Expired);
        assert!(store
            .list_sessions(Some(SessionState::Pending), 10)
            .unwrap()
            .is_empty());
        assert_eq!(
            store
                .list_sessions(Some(SessionState::Expired), 10)
                .unwrap()
                .len(),
            2
        );
        assert!(store.session_by_state_hash(&[9; 32]).unwrap().is_none());
        let row = store.export_row(s.session_id).unwrap().unwrap();
        assert_eq!(row.state, SessionState::Expired);
        let after = store.export_rows_after(None, 10).unwrap();
        assert!(after.iter().all(|x| x.state == SessionState::Expired));
        let counts = store.count_sessions_by_state().unwrap();
        assert!(counts.contains(&(SessionState::Expired, 2)));
        assert!(counts.contains(&(SessionState::Pending, 0)));
        let txn = store.begin_write().unwrap();
        let recount = store.recount_in(&txn).unwrap();
        txn.abort().unwrap();
        let kept: Vec<u64> = counts.iter().map(|c| c.1).collect();
        assert_eq!(recount.to_vec(), kept);
        // A late completion of the expired session loses, and sees it expired.
        let mut late = s.clone();
        late.state = SessionState::Completed;
        late.updated_at = 600;
        match store.update_if_pending(Some([9; 32]), &late, None).unwrap() {
            PendingUpdate::Lost(cur) => assert_eq!(cur.state, SessionState::Expired),
            other => panic!("{other:?}"),
        }
        assert_eq!(raw(s.session_id), (Some(SessionState::Pending), Some(500)));
        // A revoke writes the record: the mark goes, the record says revoked.
        store.revoke_session(r.session_id, 700).unwrap().unwrap();
        assert_eq!(raw(r.session_id), (Some(SessionState::Revoked), None));
        // After retention, the purge removes the expired session's record and mark.
        let purge = store.sweep(1_500, 10).unwrap();
        assert_eq!(purge.purged, 1);
        assert_eq!(raw(s.session_id), (None, None));
        assert!(store.get_session(s.session_id).unwrap().is_none());
        assert_eq!(store.sweep(1_700, 10).unwrap().purged, 1);
        assert_eq!(raw(r.session_id), (None, None));
    }
}
