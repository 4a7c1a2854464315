//! Raw access for tests: tampering, legacy files. Not part of the service's behaviour; kept
//! here so that `redb` stays imported by this module alone. [`conformance`] is the suite every
//! backend of the store traits must pass.

pub mod conformance;
pub mod outbox_conformance;

use std::path::Path;

use redb::{Database, ReadableTable};

use super::envelope::Keyring;
use super::records::{encode, session_from, StoredSession, StoredSessionV1};
use super::tables::{META, SESSIONS, SESSIONS_BY_USER, TOKENS};
use super::{
    key_check_place, AuthSession, Result, SessionId, Store, KEY_CHECK, KEY_CHECK_PLAINTEXT,
};

impl Store {
    /// Copies session `from`'s stored bytes verbatim into row `to` (an attacker's move).
    pub fn testing_copy_session_row(&self, from: SessionId, to: SessionId) -> Result<()> {
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(SESSIONS).map_err(|e| self.err(e))?;
            let bytes = t
                .get(from.0)
                .map_err(|e| self.err(e))?
                .map(|v| v.value().to_vec())
                .unwrap_or_default();
            t.insert(to.0, bytes.as_slice()).map_err(|e| self.err(e))?;
        }
        self.commit(txn)
    }

    /// Copies the token row of (app, from_user) over (app, to_user).
    pub fn testing_copy_token_row(&self, app: &str, from_user: &str, to_user: &str) -> Result<()> {
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(TOKENS).map_err(|e| self.err(e))?;
            let bytes = t
                .get((app, from_user))
                .map_err(|e| self.err(e))?
                .map(|v| v.value().to_vec())
                .unwrap_or_default();
            t.insert((app, to_user), bytes.as_slice())
                .map_err(|e| self.err(e))?;
        }
        self.commit(txn)
    }
}

/// Overwrites the schema version of a closed store file.
pub fn set_schema_version(path: &Path, version: u32) -> Result<()> {
    let db = Database::create(path).map_err(|e| super::Error::engine(path, e))?;
    let txn = db
        .begin_write()
        .map_err(|e| super::Error::engine(path, e))?;
    {
        let mut meta = txn
            .open_table(META)
            .map_err(|e| super::Error::engine(path, e))?;
        meta.insert("schema_version", version.to_be_bytes().as_slice())
            .map_err(|e| super::Error::engine(path, e))?;
    }
    txn.commit().map_err(|e| super::Error::engine(path, e))
}

/// Writes a store in the schema-1 layout (no deadline indexes, session records version 1),
/// as the first release would have, holding `sessions`.
pub fn write_schema_v1(path: &Path, ring: &Keyring, sessions: &[AuthSession]) -> Result<()> {
    let err = |e: redb::Error| super::Error::engine(path, e);
    let db = Database::create(path).map_err(|e| err(e.into()))?;
    let txn = db.begin_write().map_err(|e| err(e.into()))?;
    {
        let mut meta = txn.open_table(META).map_err(|e| err(e.into()))?;
        meta.insert("schema_version", 1u32.to_be_bytes().as_slice())
            .map_err(|e| err(e.into()))?;
        let sealed = ring.seal(KEY_CHECK_PLAINTEXT, &key_check_place());
        meta.insert(KEY_CHECK, encode(1, &sealed).as_slice())
            .map_err(|e| err(e.into()))?;
        let mut t = txn.open_table(SESSIONS).map_err(|e| err(e.into()))?;
        let mut idx = txn
            .open_table(SESSIONS_BY_USER)
            .map_err(|e| err(e.into()))?;
        for s in sessions {
            // Sealed as the current version seals, then cut down to what version 1 held.
            let current = StoredSession::seal(s, ring);
            let v1 = session_from!(StoredSessionV1 {
                access_token: current.access_token.clone(),
                refresh_token: current.refresh_token.clone(),
            } from current);
            t.insert(s.session_id.0, encode(1, &v1).as_slice())
                .map_err(|e| err(e.into()))?;
            idx.insert((s.app_id.as_str(), s.user_id.as_str(), s.session_id.0), ())
                .map_err(|e| err(e.into()))?;
        }
    }
    txn.commit().map_err(|e| err(e.into()))
}
