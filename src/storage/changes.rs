//! The session change feed, for exporters (`crate::export`).
//!
//! Every session write (`write_stored_session`) and every sweep purge appends one entry to
//! `changes` in the same write transaction, under a sequence number that only grows (the last
//! one is kept in `meta`, so pruning the feed never reuses a number). An exporter reads the
//! entries after its cursor, exports the sessions' current rows and then advances its cursor:
//! at-least-once, and idempotent because the export is an upsert of the current row.
//!
//! Export rows carry the token fields sealed, exactly as stored (`nonce || ct` and the key id);
//! nothing here opens a secret, except [`Store::open_imported_token`] on import.

use redb::{ReadableDatabase, ReadableTable, WriteTransaction};
use secrecy::SecretString;

use super::envelope::{KeyId, Place, Sealed};
use super::records::{session_from, SessionRecord, StoredSession, SESSIONS_TABLE};
use super::sessions::SessionTables;
use super::tables::{CHANGES, CHANGE_DELETE, CURSORS, META, SESSIONS, SESSIONS_EXPIRED};
use super::{Error, Result, SessionId, Store};

/// `meta` key of the last change sequence number (u64 BE).
const LAST_SEQ_KEY: &str = "last_change_seq";
/// `meta` key present while the store is (or was last) open with the feed off: changes made
/// then are missing from the feed.
const FEED_OFF_KEY: &str = "change_feed_off";
/// `meta` key of the seq after which the feed is complete (u64 BE; absent: from the start).
const FEED_FROM_KEY: &str = "change_feed_complete_from";
/// The prefix of exporters' cursor names: the sweep prunes the feed up to the lowest of them.
pub const EXPORT_CURSOR_PREFIX: &str = "export.";

/// Records at open whether the feed is on: opened with it off, the store notes the gap; opened
/// with it on after that, the feed is complete only after the last seq as of now.
pub(crate) fn note_feed_mode(store: &Store, txn: &WriteTransaction, on: bool) -> Result<()> {
    let was_off = {
        let meta = txn.open_table(META).map_err(|e| store.err(e))?;
        let off = meta.get(FEED_OFF_KEY).map_err(|e| store.err(e))?.is_some();
        off
    };
    if on && was_off {
        let from = last_seq_in(store, txn)?;
        let mut meta = txn.open_table(META).map_err(|e| store.err(e))?;
        meta.insert(FEED_FROM_KEY, from.to_be_bytes().as_slice())
            .map_err(|e| store.err(e))?;
        meta.remove(FEED_OFF_KEY).map_err(|e| store.err(e))?;
    } else if !on && !was_off {
        let mut meta = txn.open_table(META).map_err(|e| store.err(e))?;
        meta.insert(FEED_OFF_KEY, [1u8].as_slice())
            .map_err(|e| store.err(e))?;
    }
    Ok(())
}

/// What happened to a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// Written (created or updated): export its current row.
    Upsert,
    /// Deleted by the sweep: delete it downstream.
    Delete,
}

pub(crate) fn encode_change(kind: u8, id: u128) -> [u8; 17] {
    let mut v = [0u8; 17];
    v[0] = kind;
    v[1..].copy_from_slice(&id.to_be_bytes());
    v
}

fn decode_change(v: [u8; 17]) -> (ChangeKind, SessionId) {
    let mut id = [0u8; 16];
    id.copy_from_slice(&v[1..]);
    let kind = if v[0] == CHANGE_DELETE {
        ChangeKind::Delete
    } else {
        ChangeKind::Upsert
    };
    (kind, SessionId(u128::from_be_bytes(id)))
}

fn parse_u64(b: &[u8]) -> u64 {
    <[u8; 8]>::try_from(b).map_or(0, u64::from_be_bytes)
}

/// The last change seq (0: none yet): the one noted in `meta`, or the feed's last key if
/// that is higher.
fn last_seq_of(
    store: &Store,
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    changes: &impl ReadableTable<u64, [u8; 17]>,
) -> Result<u64> {
    let stored = meta
        .get(LAST_SEQ_KEY)
        .map_err(|e| store.err(e))?
        .map_or(0, |v| parse_u64(v.value()));
    let last = changes
        .last()
        .map_err(|e| store.err(e))?
        .map_or(0, |(k, _)| k.value());
    Ok(stored.max(last))
}

/// The last change seq as of `txn` (0: none yet).
pub(crate) fn last_seq_in(store: &Store, txn: &WriteTransaction) -> Result<u64> {
    let meta = txn.open_table(META).map_err(|e| store.err(e))?;
    let changes = txn.open_table(CHANGES).map_err(|e| store.err(e))?;
    last_seq_of(store, &meta, &changes)
}

pub(crate) fn set_last_seq_in(store: &Store, txn: &WriteTransaction, seq: u64) -> Result<()> {
    let mut meta = txn.open_table(META).map_err(|e| store.err(e))?;
    meta.insert(LAST_SEQ_KEY, seq.to_be_bytes().as_slice())
        .map_err(|e| store.err(e))?;
    Ok(())
}

/// A sealed token column as exported: the key id and `nonce || ct`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportToken {
    /// The key that sealed it (8 hex characters).
    pub key_id: String,
    /// The 24-byte nonce followed by the ciphertext and its tag.
    pub bytes: Vec<u8>,
}

/// A token column brought back by an import.
pub enum ImportToken {
    /// Sealed as exported ([`ExportToken`]): opened with the store's key ring, then re-sealed.
    Sealed(ExportToken),
    /// Plaintext (the Python service's table): sealed on import.
    Plain(SecretString),
}

impl ImportToken {
    /// The token of session `id`'s column `field` (`access_token` or `refresh_token`): a
    /// plaintext one as is, a sealed one opened with `ring` (the same sealing every backend
    /// uses, bound to the session's row and field).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad key id or a value too short to be sealed,
    /// [`Error::Decrypt`] when no key of `ring` opens it.
    pub fn open(self, ring: &super::Keyring, id: SessionId, field: &str) -> Result<SecretString> {
        let sealed = match self {
            Self::Plain(s) => return Ok(s),
            Self::Sealed(t) => t,
        };
        let bad = |detail: String| Error::Invalid(format!("session {id} {field}: {detail}"));
        let key_id = u32::from_str_radix(&sealed.key_id, 16)
            .map_err(|_| bad(format!("bad key id {:?}", sealed.key_id)))?;
        if sealed.bytes.len() < 24 + 16 {
            return Err(bad("sealed value too short".to_owned()));
        }
        let mut nonce = [0u8; 24];
        nonce.copy_from_slice(&sealed.bytes[..24]);
        let s = Sealed {
            key_id: KeyId(key_id),
            nonce,
            ct: sealed.bytes[24..].to_vec(),
        };
        let row = id.to_bytes();
        ring.open_str(
            &s,
            &Place {
                table: SESSIONS_TABLE,
                row: &row,
                field,
            },
        )
        .map_err(|e| Error::Decrypt {
            table: SESSIONS_TABLE,
            detail: format!("session {id} field {field}: {e}"),
        })
    }
}

/// One session as exported: every column of the record, tokens still sealed. The OAuth
/// binding of a pending session stays in the store: `state_hash` and `pkce_verifier` are
/// always `None` here.
pub type ExportRow = SessionRecord<ExportToken>;

fn export_token(s: &Option<Sealed>) -> Option<ExportToken> {
    s.as_ref().map(|s| {
        let mut bytes = Vec::with_capacity(s.nonce.len() + s.ct.len());
        bytes.extend_from_slice(&s.nonce);
        bytes.extend_from_slice(&s.ct);
        ExportToken {
            key_id: s.key_id.to_string(),
            bytes,
        }
    })
}

impl ExportRow {
    fn from_stored(id: SessionId, s: &StoredSession) -> Self {
        session_from!(ExportRow {
            session_id: id,
            access_token: export_token(&s.access_token),
            refresh_token: export_token(&s.refresh_token),
            state_hash: None,
            pkce_verifier: None,
        } from s)
    }
}

impl Store {
    /// Appends one change to the feed inside the caller's transaction.
    pub(crate) fn append_change(
        &self,
        t: &mut SessionTables<'_>,
        kind: u8,
        id: SessionId,
    ) -> Result<()> {
        self.append_changes(t, &[(kind, id)])
    }

    /// Appends changes to the feed, in order, inside the caller's transaction; the last seq is
    /// written to `meta` once for all of them.
    pub(crate) fn append_changes(
        &self,
        t: &mut SessionTables<'_>,
        changes: &[(u8, SessionId)],
    ) -> Result<()> {
        if changes.is_empty() || !self.inner.opts.change_feed {
            return Ok(());
        }
        let mut seq = match t.last_seq {
            Some(s) => s,
            None => last_seq_of(self, &t.meta, &t.changes)?,
        };
        // Every new seq is above every key in the table, so one cursor at the end takes them
        // all as one run (packed into full leaves, no descent per change).
        let mut cursor = t
            .changes
            .lower_bound_mut(std::ops::Bound::Included(seq + 1))
            .map_err(|e| self.err(e))?;
        for (kind, id) in changes {
            seq += 1;
            cursor
                .insert_before(seq, encode_change(*kind, id.0))
                .map_err(|e| self.err(e))?;
        }
        cursor.close().map_err(|e| self.err(e))?;
        t.meta
            .insert(LAST_SEQ_KEY, seq.to_be_bytes().as_slice())
            .map_err(|e| self.err(e))?;
        t.last_seq = Some(seq);
        Ok(())
    }

    /// Up to `limit` changes with a seq greater than `seq`, oldest first.
    pub fn changes_after(
        &self,
        seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, ChangeKind, SessionId)>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(CHANGES).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in t
            .range(seq.saturating_add(1)..)
            .map_err(|e| self.err(e))?
            .take(limit)
        {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let (kind, id) = decode_change(v.value());
            out.push((k.value(), kind, id));
        }
        Ok(out)
    }

    /// The seq of the last change ever appended (0: none).
    pub fn last_change_seq(&self) -> Result<u64> {
        let txn = self.begin_read()?;
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let t = txn.open_table(CHANGES).map_err(|e| self.err(e))?;
        last_seq_of(self, &meta, &t)
    }

    /// Deletes the changes with seq ≤ `upto` (those every exporter has passed). Returns how many.
    pub fn prune_changes(&self, upto: u64) -> Result<u64> {
        let mut total = 0;
        loop {
            let txn = self.begin_write()?;
            let n = {
                let mut t = txn.open_table(CHANGES).map_err(|e| self.err(e))?;
                let keys: Vec<u64> = t
                    .range(..=upto)
                    .map_err(|e| self.err(e))?
                    .take(10_000)
                    .map(|r| r.map(|(k, _)| k.value()).map_err(|e| self.err(e)))
                    .collect::<Result<_>>()?;
                for k in &keys {
                    t.remove(*k).map_err(|e| self.err(e))?;
                }
                keys.len()
            };
            if n == 0 {
                txn.abort().map_err(|e| self.err(e))?;
                return Ok(total);
            }
            self.commit(txn)?;
            total += n as u64;
            if n < 10_000 {
                return Ok(total);
            }
        }
    }

    /// The seq after which the change feed holds every change (0: all of them). An exporter
    /// whose cursor is below it missed changes made while the feed was off, and must copy
    /// every session before following the feed again.
    pub fn change_feed_complete_from(&self) -> Result<u64> {
        let txn = self.begin_read()?;
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let v = meta.get(FEED_FROM_KEY).map_err(|e| self.err(e))?;
        Ok(v.map_or(0, |v| parse_u64(v.value())))
    }

    /// The lowest exporter cursor (the cursors named `export.*`), or `None` if no exporter has
    /// stored one yet.
    pub fn slowest_export_cursor(&self) -> Result<Option<u64>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(CURSORS).map_err(|e| self.err(e))?;
        let mut lowest: Option<u64> = None;
        for row in t.range(EXPORT_CURSOR_PREFIX..).map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            if !k.value().starts_with(EXPORT_CURSOR_PREFIX) {
                break;
            }
            lowest = Some(lowest.map_or(v.value(), |l| l.min(v.value())));
        }
        Ok(lowest)
    }

    /// Prunes the feed as far as nobody needs it: with the feed off, all of it; with it on, up
    /// to the slowest exporter's cursor (nothing while no exporter has a cursor: one that has
    /// not run yet starts from the beginning). Returns how many changes were deleted.
    pub fn prune_feed(&self) -> Result<u64> {
        if !self.inner.opts.change_feed {
            return self.prune_changes(u64::MAX);
        }
        match self.slowest_export_cursor()? {
            Some(upto) => self.prune_changes(upto),
            None => Ok(0),
        }
    }

    /// The export row of one session, or `None` if it no longer exists. Opens no secret.
    pub fn export_row(&self, id: SessionId) -> Result<Option<ExportRow>> {
        Ok(self.export_rows(&[id])?.pop().flatten())
    }

    /// The export rows of many sessions in one read transaction (`None` for deleted ones).
    pub fn export_rows(&self, ids: &[SessionId]) -> Result<Vec<Option<ExportRow>>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(SESSIONS).map_err(|e| self.err(e))?;
        let expired = txn.open_table(SESSIONS_EXPIRED).map_err(|e| self.err(e))?;
        ids.iter()
            .map(|id| {
                let Some(v) = t.get(id.0).map_err(|e| self.err(e))? else {
                    return Ok(None);
                };
                let at = expired.get(id.0).map_err(|e| self.err(e))?;
                let s = StoredSession::decode(v.value())?.overlay(at.map(|a| a.value()));
                Ok(Some(ExportRow::from_stored(*id, &s)))
            })
            .collect()
    }

    /// Up to `limit` export rows with an id greater than `after` (all sessions, by id).
    pub fn export_rows_after(
        &self,
        after: Option<SessionId>,
        limit: usize,
    ) -> Result<Vec<ExportRow>> {
        let txn = self.db().begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(SESSIONS).map_err(|e| self.err(e))?;
        let expired = txn.open_table(SESSIONS_EXPIRED).map_err(|e| self.err(e))?;
        let range = match after {
            Some(a) if a.0 == u128::MAX => return Ok(Vec::new()),
            Some(a) => t.range(a.0 + 1..),
            None => t.range(0u128..),
        }
        .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in range.take(limit) {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let at = expired.get(k.value()).map_err(|e| self.err(e))?;
            out.push(ExportRow::from_stored(
                SessionId(k.value()),
                &StoredSession::decode(v.value())?.overlay(at.map(|a| a.value())),
            ));
        }
        Ok(out)
    }

    /// Opens an imported token column for session `id` (`field`: `access_token` or
    /// `refresh_token`): a sealed one with this store's key ring, a plaintext one as is.
    pub fn open_imported_token(
        &self,
        id: SessionId,
        field: &str,
        token: ImportToken,
    ) -> Result<SecretString> {
        token.open(self.ring(), id, field)
    }
}

#[cfg(test)]
mod tests {
    use crate::storage::{AuthSession, Key, Keyring, Store, StoreOptions};

    fn ring() -> Keyring {
        Keyring::new(Key::from_bytes(&[5; 32]), vec![])
    }

    fn open(path: &std::path::Path, change_feed: bool) -> Store {
        let opts = StoreOptions {
            change_feed,
            ..StoreOptions::default()
        };
        Store::open(path, ring(), opts).unwrap()
    }

    fn write(store: &Store, n: usize) {
        for i in 0..n {
            let s = AuthSession::new_pending("cli_app", &format!("u{i}"), vec![], 0, 1_000_000);
            store.put_session(&s).unwrap();
        }
    }

    fn seqs(store: &Store) -> Vec<u64> {
        store
            .changes_after(0, 1000)
            .unwrap()
            .into_iter()
            .map(|c| c.0)
            .collect()
    }

    #[test]
    fn the_sweep_prunes_up_to_the_slowest_exporter_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("s.redb"), true);
        write(&store, 8);
        // No exporter has a cursor yet: nothing is pruned (it will start from the beginning).
        store.set_cursor("not-an-exporter", 0).unwrap();
        assert_eq!(store.sweep(1, 100).unwrap().changes_pruned, 0);
        assert_eq!(seqs(&store), (1..=8).collect::<Vec<_>>());
        store.set_cursor("export.fast", 6).unwrap();
        store.set_cursor("export.slow", 3).unwrap();
        assert_eq!(store.slowest_export_cursor().unwrap(), Some(3));
        assert_eq!(store.sweep(1, 100).unwrap().changes_pruned, 3);
        assert_eq!(
            seqs(&store),
            (4..=8).collect::<Vec<_>>(),
            "all after the slowest kept"
        );
        store.set_cursor("export.slow", 8).unwrap();
        assert_eq!(store.sweep(1, 100).unwrap().changes_pruned, 3);
        assert_eq!(seqs(&store), vec![7, 8]);
        assert_eq!(store.last_change_seq().unwrap(), 8);
        assert_eq!(store.change_feed_complete_from().unwrap(), 0);
    }

    #[test]
    fn without_an_exporter_nothing_accumulates_and_a_later_exporter_knows_the_gap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let store = open(&path, true);
            write(&store, 3);
            assert_eq!(seqs(&store), vec![1, 2, 3]);
        }
        {
            // The feed off: writes append nothing, and the sweep clears what was there.
            let store = open(&path, false);
            write(&store, 5);
            assert_eq!(seqs(&store), vec![1, 2, 3]);
            assert_eq!(store.sweep(1, 100).unwrap().changes_pruned, 3);
            assert!(seqs(&store).is_empty());
            write(&store, 2);
            assert!(seqs(&store).is_empty());
            assert_eq!(store.last_change_seq().unwrap(), 3);
            assert_eq!(store.counts().unwrap().sessions, 10);
        }
        // Back on: complete only after the gap, and appending again.
        let store = open(&path, true);
        assert_eq!(store.change_feed_complete_from().unwrap(), 3);
        write(&store, 1);
        assert_eq!(seqs(&store), vec![4]);
        drop(store);
        // Reopening with the feed on keeps the mark (the gap is still there for a cursor below it).
        let store = open(&path, true);
        assert_eq!(store.change_feed_complete_from().unwrap(), 3);
    }
}
