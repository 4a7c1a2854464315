//! The outgoing-webhook outbox (see [`Outbox`](super::traits::Outbox)) and the users' grants
//! (when each authorized, whether the reminder of the grant's hard expiry went out).
//!
//! An event is appended under a sequence number that only grows (kept in `meta`, never reused
//! after a delete). The payload is opaque bytes to the store: it is built by the caller and
//! carries ids only, never a secret, so it is not sealed. Entries that are still to be
//! delivered live in `outbox`; one that ran out of attempts moves to `outbox_dead` in one
//! transaction, so the worker reads only live entries and the gauges read table lengths.
//!
//! The `_with_events` forms of the session and token writes (in `sessions.rs`, `tokens.rs`)
//! append in the transaction that makes the change, so an event is never lost once the change
//! is committed, and never emitted for a change that did not commit.

use redb::{ReadableTable, ReadableTableMetadata, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::records::StoredToken;
use super::records::{decode, encode};
use super::sessions::validate_ids;
use super::tables::{GRANTS, META, OUTBOX, OUTBOX_DEAD, TOKENS};
use super::tokens::refreshable;
use super::{Error, Result, SessionId, Store};

const OUTBOX_TABLE: &str = "outbox";
const OUTBOX_VERSION: u8 = 1;
/// `meta` key of the last outbox sequence number handed out.
pub(crate) const OUTBOX_SEQ: &str = "outbox_seq";
/// Longest event id and kind accepted.
const MAX_ID_BYTES: usize = 128;

/// An event to append: its id (unique, for the receivers' de-duplication), its type and the
/// JSON body every receiver gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEvent {
    /// Unique event id.
    pub event_id: String,
    /// Event type (`authorization.completed`, …).
    pub kind: String,
    /// The exact bytes delivered (the signature covers them).
    pub body: Vec<u8>,
}

/// An event in the outbox with its delivery progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// Sequence number (the table key; grows with every append, never reused).
    #[serde(skip)]
    pub seq: u64,
    /// Unique event id.
    pub event_id: String,
    /// Event type.
    pub kind: String,
    /// The exact bytes delivered.
    pub body: Vec<u8>,
    /// Unix ms of the append.
    pub created_at: u64,
    /// Delivery rounds that failed so far.
    pub attempts: u32,
    /// Not to be tried before this unix ms.
    pub next_attempt_at: u64,
    /// Receivers (URLs) that already answered 2xx: not sent to again.
    pub delivered_to: Vec<String>,
    /// The last failure, for `/workers` and the logs (no secret: a status or an error class).
    pub last_error: Option<String>,
}

pub(crate) fn decode_entry(seq: u64, bytes: &[u8]) -> Result<OutboxEntry> {
    match bytes.split_first() {
        Some((&OUTBOX_VERSION, rest)) => {
            let mut e: OutboxEntry = decode(OUTBOX_TABLE, rest)?;
            e.seq = seq;
            Ok(e)
        }
        _ => Err(Error::Decode {
            table: OUTBOX_TABLE,
            detail: "unknown record version".to_owned(),
        }),
    }
}

/// The stored bytes of an entry (the copy between the backends writes them).
pub(crate) fn encode_entry(e: &OutboxEntry) -> Vec<u8> {
    encode(OUTBOX_VERSION, e)
}

pub(crate) fn validate_event(e: &OutboxEvent) -> Result<()> {
    for (name, v) in [("event id", &e.event_id), ("event kind", &e.kind)] {
        if v.is_empty() || v.len() > MAX_ID_BYTES {
            return Err(Error::Invalid(format!(
                "{name} must be 1 to {MAX_ID_BYTES} bytes, got {}",
                v.len()
            )));
        }
    }
    Ok(())
}

impl Store {
    /// Appends `events` inside the caller's write transaction (nothing when empty).
    pub(crate) fn append_outbox_in(
        &self,
        txn: &WriteTransaction,
        events: &[OutboxEvent],
        now: u64,
    ) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        for e in events {
            validate_event(e)?;
        }
        let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let mut seq = meta
            .get(OUTBOX_SEQ)
            .map_err(|e| self.err(e))?
            .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
            .map_or(0, u64::from_be_bytes);
        let mut t = txn.open_table(OUTBOX).map_err(|e| self.err(e))?;
        for e in events {
            seq = seq.saturating_add(1);
            let entry = OutboxEntry {
                seq,
                event_id: e.event_id.clone(),
                kind: e.kind.clone(),
                body: e.body.clone(),
                created_at: now,
                attempts: 0,
                next_attempt_at: now,
                delivered_to: Vec::new(),
                last_error: None,
            };
            t.insert(seq, encode(OUTBOX_VERSION, &entry).as_slice())
                .map_err(|e| self.err(e))?;
        }
        meta.insert(OUTBOX_SEQ, seq.to_be_bytes().as_slice())
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Appends `events` in one durable transaction.
    pub fn outbox_append(&self, events: &[OutboxEvent], now: u64) -> Result<()> {
        let txn = self.begin_write()?;
        self.append_outbox_in(&txn, events, now)?;
        self.commit(txn)
    }

    /// Up to `limit` live entries, oldest (lowest seq) first.
    pub fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxEntry>> {
        self.read_outbox(false, limit)
    }

    /// Up to `limit` dead entries (out of attempts), oldest first.
    pub fn outbox_dead(&self, limit: usize) -> Result<Vec<OutboxEntry>> {
        self.read_outbox(true, limit)
    }

    fn read_outbox(&self, dead: bool, limit: usize) -> Result<Vec<OutboxEntry>> {
        let txn = self.begin_read()?;
        let t = txn
            .open_table(if dead { OUTBOX_DEAD } else { OUTBOX })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| self.err(e))?.take(limit) {
            let (k, v) = row.map_err(|e| self.err(e))?;
            out.push(decode_entry(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// Deletes live entry `seq` (delivered everywhere); true if it was there.
    pub fn outbox_delivered(&self, seq: u64) -> Result<bool> {
        let txn = self.begin_write()?;
        let existed = {
            let mut t = txn.open_table(OUTBOX).map_err(|e| self.err(e))?;
            let old = t.remove(seq).map_err(|e| self.err(e))?;
            old.is_some()
        };
        self.commit(txn)?;
        Ok(existed)
    }

    /// Writes the progress of live entry `entry.seq` (attempts, next attempt, receivers done,
    /// last error); its event id, kind and body stay as appended. False (nothing written) if
    /// the entry is no longer live.
    pub fn outbox_reschedule(&self, entry: &OutboxEntry) -> Result<bool> {
        self.move_entry(entry, false)
    }

    /// Moves live entry `entry.seq` to the dead entries with its final progress. False if it
    /// was not live.
    pub fn outbox_bury(&self, entry: &OutboxEntry) -> Result<bool> {
        self.move_entry(entry, true)
    }

    fn move_entry(&self, entry: &OutboxEntry, bury: bool) -> Result<bool> {
        let txn = self.begin_write()?;
        let found = {
            let mut t = txn.open_table(OUTBOX).map_err(|e| self.err(e))?;
            let current = t
                .get(entry.seq)
                .map_err(|e| self.err(e))?
                .map(|v| decode_entry(entry.seq, v.value()))
                .transpose()?;
            match current {
                None => false,
                Some(cur) => {
                    let next = OutboxEntry {
                        attempts: entry.attempts,
                        next_attempt_at: entry.next_attempt_at,
                        delivered_to: entry.delivered_to.clone(),
                        last_error: entry.last_error.clone(),
                        ..cur
                    };
                    let bytes = encode(OUTBOX_VERSION, &next);
                    if bury {
                        t.remove(entry.seq).map_err(|e| self.err(e))?;
                        let mut dead = txn.open_table(OUTBOX_DEAD).map_err(|e| self.err(e))?;
                        dead.insert(entry.seq, bytes.as_slice())
                            .map_err(|e| self.err(e))?;
                    } else {
                        t.insert(entry.seq, bytes.as_slice())
                            .map_err(|e| self.err(e))?;
                    }
                    true
                }
            }
        };
        if found {
            self.commit(txn)?;
        } else {
            txn.abort().map_err(|e| self.err(e))?;
        }
        Ok(found)
    }

    /// (live, dead) entry counts, from the tables' headers (no entry is read).
    pub fn outbox_counts(&self) -> Result<(u64, u64)> {
        let txn = self.begin_read()?;
        let live = txn.open_table(OUTBOX).map_err(|e| self.err(e))?;
        let dead = txn.open_table(OUTBOX_DEAD).map_err(|e| self.err(e))?;
        Ok((
            live.len().map_err(|e| self.err(e))?,
            dead.len().map_err(|e| self.err(e))?,
        ))
    }

    /// Records a new grant of `app_id`/`user_id` at `at` inside the caller's transaction (a
    /// completion storing the grant's first token); its reminder is not sent yet.
    pub(crate) fn record_grant_in(
        &self,
        txn: &WriteTransaction,
        app_id: &str,
        user_id: &str,
        at: u64,
    ) -> Result<()> {
        let mut t = txn.open_table(GRANTS).map_err(|e| self.err(e))?;
        t.insert((app_id, user_id), (at, 0))
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// When the user's current grant was made, and when its reminder was sent (0: not yet).
    pub fn grant_of(&self, app_id: &str, user_id: &str) -> Result<Option<(u64, u64)>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(GRANTS).map_err(|e| self.err(e))?;
        Ok(t.get((app_id, user_id))
            .map_err(|e| self.err(e))?
            .map(|v| v.value()))
    }

    /// The users with a live grant (a token with a refresh token, not needing a new
    /// authorization) made at or before `granted_before` and not yet reminded, at most `limit`.
    /// Reads every grant (a grant is one small row per user; the sweep-style index by time is
    /// left for when that matters).
    pub fn grants_to_remind(
        &self,
        granted_before: u64,
        limit: usize,
    ) -> Result<Vec<ExpiringGrant>> {
        let txn = self.begin_read()?;
        let grants = txn.open_table(GRANTS).map_err(|e| self.err(e))?;
        let tokens = txn.open_table(TOKENS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in grants.iter().map_err(|e| self.err(e))? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = row.map_err(|e| self.err(e))?;
            let (granted_at, reminded_at) = v.value();
            if reminded_at != 0 || granted_at > granted_before {
                continue;
            }
            let (app, user) = k.value();
            let Some(tv) = tokens.get((app, user)).map_err(|e| self.err(e))? else {
                continue;
            };
            let t = StoredToken::decode(tv.value())?;
            if !refreshable(&t) {
                continue;
            }
            out.push(ExpiringGrant {
                app_id: app.to_owned(),
                user_id: user.to_owned(),
                open_id: t.open_id.clone(),
                session_id: t.session_id,
                scopes: t.scopes.clone(),
                granted_at,
            });
        }
        Ok(out)
    }

    /// Records that the user was reminded (at `now`) of the grant made at `granted_at`, and
    /// appends `events`, in one durable transaction. False (nothing written) if the user's
    /// grant is no longer that one (a new authorization came in between).
    pub fn mark_reminded(
        &self,
        app_id: &str,
        user_id: &str,
        granted_at: u64,
        events: &[OutboxEvent],
        now: u64,
    ) -> Result<bool> {
        validate_ids(app_id, user_id)?;
        let txn = self.begin_write()?;
        let same = {
            let mut t = txn.open_table(GRANTS).map_err(|e| self.err(e))?;
            let current = t
                .get((app_id, user_id))
                .map_err(|e| self.err(e))?
                .map(|v| v.value());
            if current.is_some_and(|(g, _)| g == granted_at) {
                t.insert((app_id, user_id), (granted_at, now.max(1)))
                    .map_err(|e| self.err(e))?;
                true
            } else {
                false
            }
        };
        if !same {
            txn.abort().map_err(|e| self.err(e))?;
            return Ok(false);
        }
        self.append_outbox_in(&txn, events, now)?;
        self.commit(txn)?;
        Ok(true)
    }
}

/// A user whose grant is old enough to remind them of its hard expiry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpiringGrant {
    /// App.
    pub app_id: String,
    /// The user key the token is stored under.
    pub user_id: String,
    /// The user's open_id, when known.
    pub open_id: Option<String>,
    /// The session that produced the current token.
    pub session_id: Option<SessionId>,
    /// The scopes of the current token (asked again in the reminder).
    pub scopes: Vec<String>,
    /// Unix ms of the authorization.
    pub granted_at: u64,
}
