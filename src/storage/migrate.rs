//! Schema creation and migration of older files.
//!
//! Schema 1 (the first layout) kept sessions in record version 1 and had no deadline or
//! refresh-due indexes. Schema 2 adds both indexes; migrating rebuilds them from the records in
//! the same transaction that bumps the version, so a crash leaves either the old or the new file.
//! Schema 3 adds the `oauth_states` index, rebuilt from the pending sessions' state hashes.
//! Schema 4 adds the `changes` feed, seeded with one upsert per existing session.
//! Schema 5 adds the (empty) `leases` table.
//! Schema 6 adds `session_counts`, counted once from the records (the only time opening a store
//! decodes every session).
//! Schema 7 adds the (empty) `outbox`, `outbox_dead` and `grants` tables; `grants` is
//! seeded from the tokens: the creation time of the session that produced each, else the token's
//! `obtained_at` (the earliest time known, so a reminder comes early rather than late).
//! Schema 8 adds the (empty) `apps` registry table, created with the others.
//! Schema 9 adds the (empty) `sessions_expired` table (the sweep's expiry marks), created with
//! the others: no session of an older file is marked.
//! Schema 10 adds the (empty) `device_polls` table, created with the others: a device session of
//! an older file has no stored code and is expired at start (`auth::device`).
//! Schema 11 adds the (empty) `seen_log` table (seen event ids not yet moved into
//! `seen_events`), created with the others.

use redb::{ReadableTable, WriteTransaction};

use super::records::{StoredSession, StoredToken};
use super::sessions::{deadline_of, state_index_of};
use super::tables::{
    CHANGES, CHANGE_UPSERT, CURSORS, LEASES, META, OAUTH_STATES, SEEN_EVENTS, SEEN_EVENTS_EXPIRY,
    SESSIONS, SESSIONS_BY_USER, SESSION_COUNTS, SESSION_DEADLINES, TOKENS, TOKEN_REFRESH_DUE,
    USERS,
};
use super::tables::{GRANTS, OUTBOX, OUTBOX_DEAD};
use super::tokens::refreshable;
use super::{Error, Result, Store};

/// Creates every table of the current schema.
pub(crate) fn create_tables(store: &Store, txn: &WriteTransaction) -> Result<()> {
    let e = |e| store.err(e);
    txn.open_table(META).map_err(e)?;
    txn.open_table(SESSIONS).map_err(e)?;
    txn.open_table(SESSIONS_BY_USER).map_err(e)?;
    txn.open_table(SESSION_DEADLINES).map_err(e)?;
    txn.open_table(TOKENS).map_err(e)?;
    txn.open_table(TOKEN_REFRESH_DUE).map_err(e)?;
    txn.open_table(USERS).map_err(e)?;
    txn.open_table(SEEN_EVENTS).map_err(e)?;
    txn.open_table(SEEN_EVENTS_EXPIRY).map_err(e)?;
    txn.open_table(CURSORS).map_err(e)?;
    txn.open_table(OAUTH_STATES).map_err(e)?;
    txn.open_table(CHANGES).map_err(e)?;
    txn.open_table(LEASES).map_err(e)?;
    txn.open_table(SESSION_COUNTS).map_err(e)?;
    txn.open_table(super::tables::APPS).map_err(e)?;
    txn.open_table(super::tables::SESSIONS_EXPIRED).map_err(e)?;
    txn.open_table(super::tables::DEVICE_POLLS).map_err(e)?;
    txn.open_table(super::tables::SEEN_LOG).map_err(e)?;
    create_outbox_tables(store, txn)
}

/// Schema 7: the webhook outbox and the reminders sent (empty when created).
fn create_outbox_tables(store: &Store, txn: &WriteTransaction) -> Result<()> {
    let e = |e| store.err(e);
    txn.open_table(OUTBOX).map_err(e)?;
    txn.open_table(OUTBOX_DEAD).map_err(e)?;
    txn.open_table(GRANTS).map_err(e)?;
    Ok(())
}

/// Brings a file from `from` up to the current schema inside `txn`.
pub(crate) fn migrate(store: &Store, txn: &WriteTransaction, from: u32) -> Result<()> {
    create_tables(store, txn)?;
    if from < 2 {
        v1_to_v2(store, txn)?;
    }
    if from < 3 {
        v2_to_v3(store, txn)?;
    }
    if from < 4 {
        v3_to_v4(store, txn)?;
    }
    if from < 6 {
        store.rebuild_counts_in(txn)?;
    }
    if from < 7 {
        v6_to_v7(store, txn)?;
    }
    if from == 0 {
        return Err(Error::Corrupt {
            path: store.path().to_owned(),
            detail: "schema version 0".to_owned(),
        });
    }
    Ok(())
}

fn v1_to_v2(store: &Store, txn: &WriteTransaction) -> Result<()> {
    let retention = store.retention_ms();
    let mut sessions = txn.open_table(SESSIONS).map_err(|e| store.err(e))?;
    let mut deadlines = txn
        .open_table(SESSION_DEADLINES)
        .map_err(|e| store.err(e))?;
    let rows: Vec<(u128, Vec<u8>)> = sessions
        .iter()
        .map_err(|e| store.err(e))?
        .map(|r| {
            r.map(|(k, v)| (k.value(), v.value().to_vec()))
                .map_err(|e| store.err(e))
        })
        .collect::<Result<_>>()?;
    for (id, bytes) in rows {
        let s = StoredSession::decode(&bytes)?;
        let (due, kind) = deadline_of(&s, retention);
        deadlines
            .insert((due, id), kind)
            .map_err(|e| store.err(e))?;
        sessions
            .insert(id, s.encode().as_slice())
            .map_err(|e| store.err(e))?;
    }
    let tokens = txn.open_table(TOKENS).map_err(|e| store.err(e))?;
    let mut due = txn
        .open_table(TOKEN_REFRESH_DUE)
        .map_err(|e| store.err(e))?;
    for row in tokens.iter().map_err(|e| store.err(e))? {
        let (k, v) = row.map_err(|e| store.err(e))?;
        let t = StoredToken::decode(v.value())?;
        if refreshable(&t) {
            let (app, user) = k.value();
            due.insert((t.refresh_due_at, app, user), ())
                .map_err(|e| store.err(e))?;
        }
    }
    Ok(())
}

fn v2_to_v3(store: &Store, txn: &WriteTransaction) -> Result<()> {
    let sessions = txn.open_table(SESSIONS).map_err(|e| store.err(e))?;
    let mut states = txn.open_table(OAUTH_STATES).map_err(|e| store.err(e))?;
    for row in sessions.iter().map_err(|e| store.err(e))? {
        let (k, v) = row.map_err(|e| store.err(e))?;
        if let Some(h) = state_index_of(&StoredSession::decode(v.value())?) {
            states.insert(h, k.value()).map_err(|e| store.err(e))?;
        }
    }
    Ok(())
}

fn v3_to_v4(store: &Store, txn: &WriteTransaction) -> Result<()> {
    let mut seq = super::changes::last_seq_in(store, txn)?;
    {
        let sessions = txn.open_table(SESSIONS).map_err(|e| store.err(e))?;
        let mut changes = txn.open_table(CHANGES).map_err(|e| store.err(e))?;
        for row in sessions.iter().map_err(|e| store.err(e))? {
            let (k, _) = row.map_err(|e| store.err(e))?;
            seq += 1;
            changes
                .insert(seq, super::changes::encode_change(CHANGE_UPSERT, k.value()))
                .map_err(|e| store.err(e))?;
        }
    }
    super::changes::set_last_seq_in(store, txn, seq)
}

fn v6_to_v7(store: &Store, txn: &WriteTransaction) -> Result<()> {
    let tokens = txn.open_table(TOKENS).map_err(|e| store.err(e))?;
    let sessions = txn.open_table(SESSIONS).map_err(|e| store.err(e))?;
    let mut grants = txn.open_table(GRANTS).map_err(|e| store.err(e))?;
    for row in tokens.iter().map_err(|e| store.err(e))? {
        let (k, v) = row.map_err(|e| store.err(e))?;
        let t = StoredToken::decode(v.value())?;
        let mut granted_at = t.obtained_at;
        if let Some(id) = t.session_id {
            if let Some(sv) = sessions.get(id.0).map_err(|e| store.err(e))? {
                granted_at = granted_at.min(StoredSession::decode(sv.value())?.created_at);
            }
        }
        let (app, user) = k.value();
        grants
            .insert((app, user), (granted_at, 0))
            .map_err(|e| store.err(e))?;
    }
    Ok(())
}
