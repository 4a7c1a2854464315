//! Seen event ids, for de-duplicating redelivered events across restarts.

use super::tables::{SEEN_EVENTS, SEEN_EVENTS_EXPIRY};
use super::{Error, Result, Store};

impl Store {
    /// Records a batch of event ids as seen until `forget_at` (unix ms) in one durable commit
    /// (a group commit: one fsync for the whole batch). Returns, for each id in order, true if
    /// it was new; an id repeated inside the batch is new only the first time.
    /// Refuses the whole batch if any id fails [`valid_event_key`]: callers filter first.
    pub fn mark_events_seen(&self, ids: &[&str], forget_at: u64) -> Result<Vec<bool>> {
        if let Some(bad) = ids.iter().find(|id| !valid_event_key(id)) {
            return Err(Error::Invalid(format!(
                "event id must be 1 to 512 bytes, got {}",
                bad.len()
            )));
        }
        let txn = self.begin_write()?;
        let fresh = {
            let mut seen = txn.open_table(SEEN_EVENTS).map_err(|e| self.err(e))?;
            let mut expiry = txn
                .open_table(SEEN_EVENTS_EXPIRY)
                .map_err(|e| self.err(e))?;
            let mut fresh = Vec::with_capacity(ids.len());
            for id in ids {
                // One descent for a new id (the usual case): insert, and look at what was there.
                let before = seen
                    .insert(*id, forget_at)
                    .map_err(|e| self.err(e))?
                    .map(|v| v.value());
                match before {
                    None => {
                        expiry
                            .insert((forget_at, *id), ())
                            .map_err(|e| self.err(e))?;
                    }
                    // Seen already: the first record stands (its expiry entry matches it).
                    Some(at) => {
                        seen.insert(*id, at).map_err(|e| self.err(e))?;
                    }
                }
                fresh.push(before.is_none());
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

    /// True if the event id has been recorded and not yet forgotten.
    pub fn event_seen(&self, id: &str) -> Result<bool> {
        let txn = self.begin_read()?;
        let seen = txn.open_table(SEEN_EVENTS).map_err(|e| self.err(e))?;
        Ok(seen.get(id).map_err(|e| self.err(e))?.is_some())
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
}

/// Longest seen-event key the store accepts.
pub const MAX_EVENT_KEY_BYTES: usize = 512;

/// Whether the store accepts `id` as a seen-event key (1 to [`MAX_EVENT_KEY_BYTES`] bytes).
#[must_use]
pub fn valid_event_key(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_EVENT_KEY_BYTES
}
