//! Session reads and writes, keeping the user index and the deadline index in step.

use redb::{ReadableTable, Table};

use super::counts::CountDelta;
use super::records::{StoredSession, StoredToken};
use super::tables::{
    CHANGES, CHANGE_UPSERT, DEADLINE_EXPIRE, DEADLINE_PURGE, META, OAUTH_STATES, SESSIONS,
    SESSIONS_BY_USER, SESSIONS_EXPIRED, SESSION_COUNTS, SESSION_DEADLINES, TOKENS,
    TOKEN_REFRESH_DUE,
};
use super::{AuthSession, Error, OutboxEvent, Result, SessionId, SessionState, Store, UserToken};

/// When a stored session next needs the sweep, and for what.
pub(crate) fn deadline_of(s: &StoredSession, retention_ms: u64) -> (u64, u8) {
    deadline_for(s.state, s.updated_at, s.expires_at, retention_ms)
}

/// [`deadline_of`] from the fields it depends on.
pub(crate) fn deadline_for(
    state: SessionState,
    updated_at: u64,
    expires_at: u64,
    retention_ms: u64,
) -> (u64, u8) {
    if state == SessionState::Pending {
        (expires_at, DEADLINE_EXPIRE)
    } else {
        (updated_at.saturating_add(retention_ms), DEADLINE_PURGE)
    }
}

/// The OAuth state index entry a stored session should have: only a pending session whose
/// state has not been used yet is reachable by its state.
pub(crate) fn state_index_of(s: &StoredSession) -> Option<[u8; 32]> {
    s.state_hash.filter(|_| s.state == SessionState::Pending)
}

pub(crate) struct SessionTables<'t> {
    pub sessions: Table<'t, u128, &'static [u8]>,
    pub by_user: Table<'t, (&'static str, &'static str, u128), ()>,
    pub deadlines: Table<'t, (u64, u128), u8>,
    pub states: Table<'t, [u8; 32], u128>,
    pub changes: Table<'t, u64, [u8; 17]>,
    pub meta: Table<'t, &'static str, &'static [u8]>,
    pub counts: Table<'t, u8, u64>,
    /// Sessions the sweep expired without rewriting their record (see [`SESSIONS_EXPIRED`]).
    pub expired: Table<'t, u128, u64>,
    /// The last change seq, read on first use in this transaction.
    pub last_seq: Option<u64>,
}

/// What [`Store::update_if_pending`] did.
#[derive(Clone, Debug)]
pub enum PendingUpdate {
    /// The session was pending with the expected state hash and is now written.
    Written,
    /// Nothing written: the session had moved on (another transition won). Its current form.
    Lost(Box<AuthSession>),
    /// Nothing written: no such session.
    Missing,
}

impl Store {
    pub(crate) fn retention_ms(&self) -> u64 {
        u64::try_from(self.inner.opts.terminal_retention.as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn open_session_tables<'t>(
        &self,
        txn: &'t redb::WriteTransaction,
    ) -> Result<SessionTables<'t>> {
        Ok(SessionTables {
            sessions: txn.open_table(SESSIONS).map_err(|e| self.err(e))?,
            by_user: txn.open_table(SESSIONS_BY_USER).map_err(|e| self.err(e))?,
            deadlines: txn.open_table(SESSION_DEADLINES).map_err(|e| self.err(e))?,
            states: txn.open_table(OAUTH_STATES).map_err(|e| self.err(e))?,
            changes: txn.open_table(CHANGES).map_err(|e| self.err(e))?,
            meta: txn.open_table(META).map_err(|e| self.err(e))?,
            counts: txn.open_table(SESSION_COUNTS).map_err(|e| self.err(e))?,
            expired: txn.open_table(SESSIONS_EXPIRED).map_err(|e| self.err(e))?,
            last_seq: None,
        })
    }

    /// The stored session `id` as of the caller's write transaction, as readers see it (a
    /// session the sweep marked expired is expired).
    fn stored_session_in(
        &self,
        t: &SessionTables<'_>,
        id: SessionId,
    ) -> Result<Option<StoredSession>> {
        let Some(v) = t.sessions.get(id.0).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        let s = StoredSession::decode(v.value())?;
        Ok(Some(s.overlay(
            expired_at(&t.expired, id.0).map_err(|e| self.err(e))?,
        )))
    }

    /// Opens `sessions` and `sessions_expired` of a read transaction.
    fn session_reader(&self, txn: &redb::ReadTransaction) -> Result<SessionReader> {
        Ok(SessionReader {
            sessions: txn.open_table(SESSIONS).map_err(|e| self.err(e))?,
            expired: txn.open_table(SESSIONS_EXPIRED).map_err(|e| self.err(e))?,
        })
    }

    /// Session `id` from `r` as readers see it.
    fn read_stored(&self, r: &SessionReader, id: u128) -> Result<Option<StoredSession>> {
        let Some(v) = r.sessions.get(id).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        let s = StoredSession::decode(v.value())?;
        Ok(Some(s.overlay(
            expired_at(&r.expired, id).map_err(|e| self.err(e))?,
        )))
    }

    /// Writes a stored session and its index entries, replacing the previous version.
    pub(crate) fn write_stored_session(
        &self,
        t: &mut SessionTables<'_>,
        id: SessionId,
        new: &StoredSession,
    ) -> Result<()> {
        let retention = self.retention_ms();
        let old = self.stored_session_in(t, id)?;
        if let Some(old) = &old {
            let (due, _) = deadline_of(old, retention);
            t.deadlines.remove((due, id.0)).map_err(|e| self.err(e))?;
            if let Some(h) = state_index_of(old) {
                let points_here = t
                    .states
                    .get(h)
                    .map_err(|e| self.err(e))?
                    .is_some_and(|v| v.value() == id.0);
                if points_here {
                    t.states.remove(h).map_err(|e| self.err(e))?;
                }
            }
            if old.app_id != new.app_id || old.user_id != new.user_id {
                t.by_user
                    .remove((old.app_id.as_str(), old.user_id.as_str(), id.0))
                    .map_err(|e| self.err(e))?;
            }
        }
        if old.is_some() {
            // The new record says what the session is now.
            t.expired.remove(id.0).map_err(|e| self.err(e))?;
        }
        let mut delta = CountDelta::default();
        delta.moved(old.as_ref().map(|o| o.state), new.state);
        if !delta.is_empty() {
            self.apply_counts(&mut t.counts, &delta)?;
        }
        t.sessions
            .insert(id.0, new.encode().as_slice())
            .map_err(|e| self.err(e))?;
        t.by_user
            .insert((new.app_id.as_str(), new.user_id.as_str(), id.0), ())
            .map_err(|e| self.err(e))?;
        let (due, kind) = deadline_of(new, retention);
        t.deadlines
            .insert((due, id.0), kind)
            .map_err(|e| self.err(e))?;
        if let Some(h) = state_index_of(new) {
            t.states.insert(h, id.0).map_err(|e| self.err(e))?;
        }
        self.append_change(t, CHANGE_UPSERT, id)
    }

    /// Compare-and-set for the authorization flow: writes `s` (and `token`, if any) in one
    /// durable transaction only if the stored session is still pending with state hash
    /// `expect_hash`. Whichever transition commits first wins; the loser gets
    /// [`PendingUpdate::Lost`] with the session as the winner left it.
    pub fn update_if_pending(
        &self,
        expect_hash: Option<[u8; 32]>,
        s: &AuthSession,
        token: Option<&UserToken>,
    ) -> Result<PendingUpdate> {
        self.update_if_pending_with_events(expect_hash, s, token, &[])
    }

    /// [`Store::update_if_pending`] that also appends `events` to the webhook outbox in the
    /// same transaction (at the session's `updated_at`): only when the transition is written.
    pub fn update_if_pending_with_events(
        &self,
        expect_hash: Option<[u8; 32]>,
        s: &AuthSession,
        token: Option<&UserToken>,
        events: &[OutboxEvent],
    ) -> Result<PendingUpdate> {
        validate_ids(&s.app_id, &s.user_id)?;
        let id = s.session_id;
        let stored = StoredSession::seal(s, self.ring());
        let txn = self.begin_write()?;
        let lost = {
            let mut t = self.open_session_tables(&txn)?;
            let current = self.stored_session_in(&t, id)?;
            match current {
                None => Some(PendingUpdate::Missing),
                Some(cur)
                    if cur.state != SessionState::Pending || cur.state_hash != expect_hash =>
                {
                    Some(PendingUpdate::Lost(Box::new(cur.open(id, self.ring())?)))
                }
                Some(_) => {
                    self.write_stored_session(&mut t, id, &stored)?;
                    if let Some(token) = token {
                        self.write_token_in(&txn, token)?;
                        self.record_grant_in(&txn, &token.app_id, &token.user_id, s.updated_at)?;
                    }
                    None
                }
            }
        };
        if let Some(outcome) = lost {
            txn.abort().map_err(|e| self.err(e))?;
            return Ok(outcome);
        }
        self.append_outbox_in(&txn, events, s.updated_at)?;
        self.commit(txn)?;
        Ok(PendingUpdate::Written)
    }

    /// The pending session whose unused OAuth state hashes to `hash`, if any.
    pub fn session_by_state_hash(&self, hash: &[u8; 32]) -> Result<Option<AuthSession>> {
        let txn = self.begin_read()?;
        let idx = txn.open_table(OAUTH_STATES).map_err(|e| self.err(e))?;
        let Some(id) = idx.get(hash).map_err(|e| self.err(e))?.map(|v| v.value()) else {
            return Ok(None);
        };
        let r = self.session_reader(&txn)?;
        let Some(s) = self.read_stored(&r, id)? else {
            return Ok(None);
        };
        if state_index_of(&s) != Some(*hash) {
            return Ok(None);
        }
        s.open(SessionId(id), self.ring()).map(Some)
    }

    /// Creates or replaces a session; durable when it returns.
    pub fn put_session(&self, s: &AuthSession) -> Result<()> {
        validate_ids(&s.app_id, &s.user_id)?;
        let stored = StoredSession::seal(s, self.ring());
        let txn = self.begin_write()?;
        {
            let mut t = self.open_session_tables(&txn)?;
            self.write_stored_session(&mut t, s.session_id, &stored)?;
        }
        self.commit(txn)
    }

    /// Creates or replaces many sessions in one durable transaction (imports, benchmarks).
    pub fn put_sessions(&self, sessions: &[AuthSession]) -> Result<()> {
        let txn = self.begin_write()?;
        {
            let mut t = self.open_session_tables(&txn)?;
            for s in sessions {
                validate_ids(&s.app_id, &s.user_id)?;
                let stored = StoredSession::seal(s, self.ring());
                self.write_stored_session(&mut t, s.session_id, &stored)?;
            }
        }
        self.commit(txn)
    }

    /// Writes a completed session and the user's current token in one durable transaction.
    pub fn complete_session(&self, s: &AuthSession, token: &UserToken) -> Result<()> {
        validate_ids(&s.app_id, &s.user_id)?;
        let stored = StoredSession::seal(s, self.ring());
        let txn = self.begin_write()?;
        {
            let mut t = self.open_session_tables(&txn)?;
            self.write_stored_session(&mut t, s.session_id, &stored)?;
            self.write_token_in(&txn, token)?;
            self.record_grant_in(&txn, &token.app_id, &token.user_id, s.updated_at)?;
        }
        self.commit(txn)
    }

    /// Reads one session.
    pub fn get_session(&self, id: SessionId) -> Result<Option<AuthSession>> {
        let txn = self.begin_read()?;
        let r = self.session_reader(&txn)?;
        let Some(s) = self.read_stored(&r, id.0)? else {
            return Ok(None);
        };
        s.open(id, self.ring()).map(Some)
    }

    /// Reads one session's summary without opening any secret.
    pub fn get_session_summary(&self, id: SessionId) -> Result<Option<SessionSummary>> {
        let txn = self.begin_read()?;
        let r = self.session_reader(&txn)?;
        Ok(self
            .read_stored(&r, id.0)?
            .map(|s| SessionSummary::from_stored(id, &s)))
    }

    /// The sessions of one user, oldest first.
    pub fn sessions_for_user(&self, app_id: &str, user_id: &str) -> Result<Vec<AuthSession>> {
        let txn = self.begin_read()?;
        let idx = txn.open_table(SESSIONS_BY_USER).map_err(|e| self.err(e))?;
        let r = self.session_reader(&txn)?;
        let mut out = Vec::new();
        for row in idx
            .range((app_id, user_id, 0u128)..=(app_id, user_id, u128::MAX))
            .map_err(|e| self.err(e))?
        {
            let (k, _) = row.map_err(|e| self.err(e))?;
            let id = SessionId(k.value().2);
            if let Some(s) = self.read_stored(&r, id.0)? {
                out.push(s.open(id, self.ring())?);
            }
        }
        out.sort_by_key(|s| s.created_at);
        Ok(out)
    }

    /// Lists sessions (optionally of one state), newest first, at most `limit`.
    /// Secrets are not opened: the listing carries none.
    pub fn list_sessions(
        &self,
        state: Option<SessionState>,
        limit: usize,
    ) -> Result<Vec<SessionSummary>> {
        let txn = self.begin_read()?;
        let r = self.session_reader(&txn)?;
        let mut out = Vec::new();
        for row in r.sessions.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let s = StoredSession::decode(v.value())?
                .overlay(expired_at(&r.expired, k.value()).map_err(|e| self.err(e))?);
            if state.is_some_and(|want| want != s.state) {
                continue;
            }
            out.push(SessionSummary::from_stored(SessionId(k.value()), &s));
        }
        out.sort_by_key(|s| std::cmp::Reverse(s.created_at));
        out.truncate(limit);
        Ok(out)
    }

    /// Revokes a session: it becomes `revoked` and, if it produced the user's current token,
    /// that token is deleted. Returns the updated session, or `None` if it does not exist.
    pub fn revoke_session(&self, id: SessionId, now: u64) -> Result<Option<AuthSession>> {
        self.revoke_session_with_events(id, now, |_| Vec::new())
    }

    /// [`Store::revoke_session`] that also appends the events `events_for` makes of the
    /// revoked session (no secrets left in it) to the webhook outbox, in the same transaction.
    pub fn revoke_session_with_events(
        &self,
        id: SessionId,
        now: u64,
        events_for: impl FnOnce(&SessionSummary) -> Vec<OutboxEvent>,
    ) -> Result<Option<AuthSession>> {
        let txn = self.begin_write()?;
        let updated = {
            let mut t = self.open_session_tables(&txn)?;
            let Some(mut s) = self.stored_session_in(&t, id)? else {
                return Ok(None);
            };
            s.state = SessionState::Revoked;
            s.updated_at = now;
            s.access_token = None;
            s.refresh_token = None;
            s.pkce_verifier = None;
            self.write_stored_session(&mut t, id, &s)?;
            let mut tokens = txn.open_table(TOKENS).map_err(|e| self.err(e))?;
            let key = (s.app_id.as_str(), s.user_id.as_str());
            let current = tokens
                .get(key)
                .map_err(|e| self.err(e))?
                .map(|v| StoredToken::decode(v.value()))
                .transpose()?;
            if let Some(tok) = current.filter(|tok| tok.session_id == Some(id)) {
                tokens.remove(key).map_err(|e| self.err(e))?;
                let mut due = txn.open_table(TOKEN_REFRESH_DUE).map_err(|e| self.err(e))?;
                due.remove((tok.refresh_due_at, key.0, key.1))
                    .map_err(|e| self.err(e))?;
            }
            let events = events_for(&SessionSummary::from_stored(id, &s));
            (s, events)
        };
        let (updated, events) = updated;
        self.append_outbox_in(&txn, &events, now)?;
        self.commit(txn)?;
        updated.open(id, self.ring()).map(Some)
    }
}

/// `sessions` and `sessions_expired` of one read transaction.
struct SessionReader {
    sessions: redb::ReadOnlyTable<u128, &'static [u8]>,
    expired: redb::ReadOnlyTable<u128, u64>,
}

/// The `sessions_expired` entry of session `id` (see [`SESSIONS_EXPIRED`]).
pub(crate) fn expired_at(
    t: &impl ReadableTable<u128, u64>,
    id: u128,
) -> std::result::Result<Option<u64>, redb::StorageError> {
    Ok(t.get(id)?.map(|v| v.value()))
}

/// A session without secrets, for listings.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SessionSummary {
    /// Id (hex).
    pub session_id: String,
    /// App.
    pub app_id: String,
    /// User.
    pub user_id: String,
    /// open_id.
    pub open_id: Option<String>,
    /// State.
    pub state: &'static str,
    /// Failure reason.
    pub failure_reason: Option<&'static str>,
    /// Created (ms).
    pub created_at: u64,
    /// Updated (ms).
    pub updated_at: u64,
    /// Expires (ms).
    pub expires_at: u64,
    /// Whether tokens are held.
    pub has_tokens: bool,
    /// Token expiry (ms).
    pub token_expires_at: Option<u64>,
    /// Scopes.
    pub scopes: Vec<String>,
}

impl SessionSummary {
    fn from_stored(id: SessionId, s: &StoredSession) -> Self {
        Self {
            session_id: id.to_string(),
            app_id: s.app_id.clone(),
            user_id: s.user_id.clone(),
            open_id: s.open_id.clone(),
            state: s.state.as_str(),
            failure_reason: s.failure_reason.map(super::records::FailureReason::as_str),
            created_at: s.created_at,
            updated_at: s.updated_at,
            expires_at: s.expires_at,
            has_tokens: s.access_token.is_some(),
            token_expires_at: s.token_expires_at,
            scopes: s.scopes.clone(),
        }
    }
}

pub(crate) fn validate_ids(app_id: &str, user_id: &str) -> Result<()> {
    validate_key_parts([("app_id", app_id), ("user_id", user_id)])
}

/// Refuses a key part (named, for the message) that is empty or longer than 256 bytes.
pub(crate) fn validate_key_parts(parts: [(&str, &str); 2]) -> Result<()> {
    for (name, v) in parts {
        if v.is_empty() || v.len() > 256 {
            return Err(Error::Invalid(format!(
                "{name} must be 1 to 256 bytes, got {}",
                v.len()
            )));
        }
    }
    Ok(())
}
