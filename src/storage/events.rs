//! Seen event ids, for de-duplicating redelivered events across restarts.
//!
//! Two ways in. [`Store::mark_events_seen`] writes ids straight into `seen_events` (and its
//! expiry index). The dispatcher's group commits use [`Store::log_events_seen`] instead: event
//! ids are random, so a commit of k ids into `seen_events` copies and writes about one page per
//! id, while an append to `seen_log` (keys only grow) writes the few pages at its right edge.
//! [`Store::merge_seen_log`] then moves the log into `seen_events` in one transaction per large
//! batch, where many ids share each page written. Until it has, a logged id is found by
//! [`Store::event_seen`] (which also reads the log) but not by a [`SeenSnapshot`]: the
//! dispatcher keeps its logged ids in memory until they are merged. Opening a store merges
//! whatever a crash left in the log, so a restarted process finds every id in `seen_events`.

use redb::{ReadableTable, ReadableTableMetadata};

use super::tables::{SEEN_EVENTS, SEEN_EVENTS_EXPIRY, SEEN_LOG};
use super::{Error, Result, Store};

/// Refuses `ids` if any fails [`valid_event_key`].
fn check_event_keys(ids: &[&str]) -> Result<()> {
    match ids.iter().find(|id| !valid_event_key(id)) {
        Some(bad) => Err(Error::Invalid(format!(
            "event id must be 1 to 512 bytes, got {}",
            bad.len()
        ))),
        None => Ok(()),
    }
}

impl Store {
    /// Appends a batch of event ids, seen until `forget_at` (unix ms), to the seen-id log in
    /// one durable commit. Cheaper than [`Store::mark_events_seen`] for random ids (the log's
    /// keys only grow), and says nothing about whether an id was new. The ids count as seen for
    /// [`Store::event_seen`] at once, and for a [`SeenSnapshot`] once [`Store::merge_seen_log`]
    /// has moved them. Refuses the whole batch if any id fails [`valid_event_key`].
    pub fn log_events_seen(&self, ids: &[&str], forget_at: u64) -> Result<()> {
        check_event_keys(ids)?;
        let txn = self.begin_write()?;
        {
            let mut log = txn.open_table(SEEN_LOG).map_err(|e| self.err(e))?;
            let mut next = log
                .last()
                .map_err(|e| self.err(e))?
                .map_or(0, |(k, _)| k.value().saturating_add(1));
            for id in ids {
                log.insert(next, (forget_at, *id))
                    .map_err(|e| self.err(e))?;
                next = next.saturating_add(1);
            }
        }
        self.commit(txn)
    }

    /// Moves every id of the seen-id log into `seen_events` (and its expiry index) in one
    /// transaction, as [`Store::mark_events_seen`] would have recorded them in log order (an
    /// id seen already keeps its first record). Returns how many log entries were moved.
    pub fn merge_seen_log(&self) -> Result<usize> {
        let txn = self.begin_write()?;
        let moved = {
            let log = txn.open_table(SEEN_LOG).map_err(|e| self.err(e))?;
            let mut rows: Vec<(String, u64)> = log
                .iter()
                .map_err(|e| self.err(e))?
                .map(|r| {
                    r.map(|(_, v)| {
                        let (at, id) = v.value();
                        (id.to_owned(), at)
                    })
                    .map_err(|e| self.err(e))
                })
                .collect::<Result<_>>()?;
            let moved = rows.len();
            // The log goes whole (its pages freed at once, no row-by-row deletes), and is
            // made again, empty.
            drop(log);
            txn.delete_table(SEEN_LOG).map_err(|e| self.err(e))?;
            txn.open_table(SEEN_LOG).map_err(|e| self.err(e))?;
            // In key order, so each page of `seen_events` is copied once; the sort is stable
            // and `dedup` keeps the first of equal ids: the earliest record in the log.
            rows.sort_by(|a, b| a.0.cmp(&b.0));
            rows.dedup_by(|later, first| later.0 == first.0);
            let mut seen = txn.open_table(SEEN_EVENTS).map_err(|e| self.err(e))?;
            let mut expiry = txn
                .open_table(SEEN_EVENTS_EXPIRY)
                .map_err(|e| self.err(e))?;
            for (id, at) in &rows {
                record_seen(&mut seen, &mut expiry, id, *at).map_err(|e| self.err(e))?;
            }
            moved
        };
        if moved == 0 {
            // Nothing to move: no commit (and no fsync) for an empty log.
            txn.abort().map_err(|e| self.err(e))?;
        } else {
            self.commit(txn)?;
        }
        Ok(moved)
    }

    /// How many ids the seen-id log holds (not yet in `seen_events`).
    pub fn seen_log_len(&self) -> Result<u64> {
        let txn = self.begin_read()?;
        let log = txn.open_table(SEEN_LOG).map_err(|e| self.err(e))?;
        log.len().map_err(|e| self.err(e))
    }

    /// Records a batch of event ids as seen until `forget_at` (unix ms) in one durable commit
    /// (a group commit: one fsync for the whole batch). Returns, for each id in order, true if
    /// it was new; an id repeated inside the batch is new only the first time.
    /// Refuses the whole batch if any id fails [`valid_event_key`]: callers filter first.
    pub fn mark_events_seen(&self, ids: &[&str], forget_at: u64) -> Result<Vec<bool>> {
        check_event_keys(ids)?;
        let txn = self.begin_write()?;
        let fresh = {
            let mut seen = txn.open_table(SEEN_EVENTS).map_err(|e| self.err(e))?;
            let mut expiry = txn
                .open_table(SEEN_EVENTS_EXPIRY)
                .map_err(|e| self.err(e))?;
            let mut fresh = Vec::with_capacity(ids.len());
            for id in ids {
                fresh.push(
                    record_seen(&mut seen, &mut expiry, id, forget_at).map_err(|e| self.err(e))?,
                );
            }
            fresh
        };
        self.commit(txn)?;
        Ok(fresh)
    }

    /// A snapshot of the seen ids as committed now, for many lookups without a transaction
    /// each (see [`SeenSnapshot`]).
    pub fn seen_snapshot(&self) -> Result<SeenSnapshot> {
        let txn = self.begin_read()?;
        let table = txn.open_table(SEEN_EVENTS).map_err(|e| self.err(e))?;
        Ok(SeenSnapshot {
            table,
            store: self.clone(),
        })
    }

    /// True if the event id has been recorded and not yet forgotten (in `seen_events`, or
    /// still in the seen-id log: a scan of the log, which holds at most the dispatcher's few
    /// thousand ids not yet merged).
    pub fn event_seen(&self, id: &str) -> Result<bool> {
        let txn = self.begin_read()?;
        let seen = txn.open_table(SEEN_EVENTS).map_err(|e| self.err(e))?;
        if seen.get(id).map_err(|e| self.err(e))?.is_some() {
            return Ok(true);
        }
        let log = txn.open_table(SEEN_LOG).map_err(|e| self.err(e))?;
        for row in log.iter().map_err(|e| self.err(e))? {
            let (_, v) = row.map_err(|e| self.err(e))?;
            if v.value().1 == id {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Records `id` as seen until `forget_at` unless it is already: true if it was new. One
/// descent for a new id (the usual case): insert, and look at what was there; an id seen
/// already keeps its first record (which its expiry entry matches).
fn record_seen(
    seen: &mut redb::Table<'_, &'static str, u64>,
    expiry: &mut redb::Table<'_, (u64, &'static str), ()>,
    id: &str,
    forget_at: u64,
) -> std::result::Result<bool, redb::StorageError> {
    let before = seen.insert(id, forget_at)?.map(|v| v.value());
    match before {
        None => {
            expiry.insert((forget_at, id), ())?;
            Ok(true)
        }
        Some(at) => {
            seen.insert(id, at)?;
            Ok(false)
        }
    }
}

/// The seen ids as they were when [`Store::seen_snapshot`] was called: a lookup here answers
/// as [`Store::event_seen`] did then, and misses what was committed since. Its holder replaces
/// it after each commit it must see. While it is held, the store keeps the pages it reads.
pub struct SeenSnapshot {
    table: redb::ReadOnlyTable<&'static str, u64>,
    store: Store,
}

impl std::fmt::Debug for SeenSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeenSnapshot").finish_non_exhaustive()
    }
}

impl SeenSnapshot {
    /// True if the event id was recorded (and not forgotten) when the snapshot was taken.
    pub fn contains(&self, id: &str) -> Result<bool> {
        Ok(self.table.get(id).map_err(|e| self.store.err(e))?.is_some())
    }

    /// Calls `f` with each id of the snapshot, in key order, while `f` returns true.
    pub fn for_each_id(&self, mut f: impl FnMut(&str) -> bool) -> Result<()> {
        for row in self.table.iter().map_err(|e| self.store.err(e))? {
            let (k, _) = row.map_err(|e| self.store.err(e))?;
            if !f(k.value()) {
                break;
            }
        }
        Ok(())
    }
}

/// Longest seen-event key the store accepts.
pub const MAX_EVENT_KEY_BYTES: usize = 512;

/// Whether the store accepts `id` as a seen-event key (1 to [`MAX_EVENT_KEY_BYTES`] bytes).
#[must_use]
pub fn valid_event_key(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_EVENT_KEY_BYTES
}
