//! [`Db`]: the store the service holds, either the embedded redb file ([`Store`]) or the
//! shared PostgreSQL database ([`PgStore`]). Cheap to clone (both are handles).
//!
//! Every call the service makes is delegated to the backend as it is: each backend has its
//! own webhook outbox, grants, backups, key rotation and app registry. What only the redb store
//! has (the seen-id snapshot) is
//! refused on PostgreSQL with [`Error::Invalid`] naming the feature, never silently skipped;
//! the daemon refuses to start with such a feature configured (`daemon::open_store`), so the
//! refusals here are a second fence.

use std::path::Path;

use secrecy::SecretString;

use super::postgres::PgStore;
use super::traits::{ChangeFeed, Leases, SeenEvents, SessionStore, TokenStore, UserStore};
use super::DevicePoll;
use super::{
    AppDeletion, AppRow, AuthSession, ChangeKind, Error, ExpiringGrant, ExportRow, ImportToken,
    KeyId, KeyStatus, Keyring, OutboxEntry, OutboxEvent, PendingUpdate, Progress, Result,
    RotationReport, SeenSnapshot, SessionId, SessionState, SessionSummary, SnapshotHeader, Store,
    StoreCounts, SweepReport, UserInfo, UserToken,
};

/// What [`Db::claim_event`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventClaim {
    /// This instance holds the claim: it handles the event.
    Won,
    /// Another claim holds the id (its handler is in flight, or its claimer died) until this
    /// time (unix ms; `0`: a claim let go meanwhile).
    Held(u64),
    /// A record holds the id until this time: its event was handled. A row written before
    /// PostgreSQL schema 8 does not tell a claim from a record and reads as this; such a
    /// record whose time is within a claim's length is better treated as a claim.
    Recorded(u64),
    /// The store is not shared (redb): the dispatcher's own memory decides.
    NotShared,
}

/// The store the service serves from.
#[derive(Clone, Debug)]
pub enum Db {
    /// One redb file on this machine (one instance).
    Redb(Store),
    /// One PostgreSQL database shared by a fleet of instances.
    Postgres(PgStore),
}

impl From<Store> for Db {
    fn from(s: Store) -> Self {
        Self::Redb(s)
    }
}

impl From<PgStore> for Db {
    fn from(s: PgStore) -> Self {
        Self::Postgres(s)
    }
}

/// The refusal of a redb-only feature on PostgreSQL.
#[must_use]
pub fn not_on_postgres(feature: &str) -> Error {
    Error::Invalid(format!(
        "{feature} is not available with storage.backend = \"postgres\" (redb only in this build)"
    ))
}

macro_rules! both {
    ($( fn $name:ident(&self $(, $arg:ident : $ty:ty)*) -> $ret:ty; )*) => {
        impl Db {
            $(
                #[doc = concat!("`", stringify!($name), "` of the backend.")]
                pub fn $name(&self $(, $arg: $ty)*) -> $ret {
                    match self {
                        Self::Redb(s) => s.$name($($arg),*),
                        Self::Postgres(p) => p.$name($($arg),*),
                    }
                }
            )*
        }
    };
}

both! {
    fn put_session(&self, s: &AuthSession) -> Result<()>;
    fn put_sessions(&self, sessions: &[AuthSession]) -> Result<()>;
    fn get_session(&self, id: SessionId) -> Result<Option<AuthSession>>;
    fn session_by_state_hash(&self, hash: &[u8; 32]) -> Result<Option<AuthSession>>;
    fn update_if_pending(&self, expect_hash: Option<[u8; 32]>, s: &AuthSession, token: Option<&UserToken>) -> Result<PendingUpdate>;
    fn complete_session(&self, s: &AuthSession, token: &UserToken) -> Result<()>;
    fn revoke_session(&self, id: SessionId, now: u64) -> Result<Option<AuthSession>>;
    fn sessions_for_user(&self, app_id: &str, user_id: &str) -> Result<Vec<AuthSession>>;
    fn list_sessions(&self, state: Option<SessionState>, limit: usize) -> Result<Vec<SessionSummary>>;
    fn count_sessions_by_state(&self) -> Result<Vec<(SessionState, u64)>>;
    fn pending_expired(&self, now: u64) -> Result<Vec<SessionId>>;
    fn sweep(&self, now: u64, batch: usize) -> Result<SweepReport>;
    fn put_token(&self, token: &UserToken) -> Result<()>;
    fn get_token(&self, app_id: &str, user_id: &str) -> Result<Option<UserToken>>;
    fn delete_token(&self, app_id: &str, user_id: &str) -> Result<bool>;
    fn tokens_due(&self, now: u64, limit: usize) -> Result<Vec<(String, String, u64)>>;
    fn put_user(&self, user: &UserInfo) -> Result<()>;
    fn get_user(&self, app_id: &str, open_id: &str) -> Result<Option<UserInfo>>;
    fn list_users(&self, app_id: &str) -> Result<Vec<UserInfo>>;
    fn mark_events_seen(&self, ids: &[&str], forget_at: u64) -> Result<Vec<bool>>;
    fn event_seen(&self, id: &str) -> Result<bool>;
    fn changes_after(&self, seq: u64, limit: usize) -> Result<Vec<(u64, ChangeKind, SessionId)>>;
    fn last_change_seq(&self) -> Result<u64>;
    fn prune_changes(&self, upto: u64) -> Result<u64>;
    fn change_feed_complete_from(&self) -> Result<u64>;
    fn cursor(&self, name: &str) -> Result<Option<u64>>;
    fn set_cursor(&self, name: &str, value: u64) -> Result<()>;
    fn export_rows(&self, ids: &[SessionId]) -> Result<Vec<Option<ExportRow>>>;
    fn export_rows_after(&self, after: Option<SessionId>, limit: usize) -> Result<Vec<ExportRow>>;
    fn open_imported_token(&self, id: SessionId, field: &str, token: ImportToken) -> Result<SecretString>;
    fn try_acquire_lease(&self, name: &str, holder: &str, ttl_ms: u64, now: u64) -> Result<bool>;
    fn renew_lease(&self, name: &str, holder: &str, ttl_ms: u64, now: u64) -> Result<bool>;
    fn release_lease(&self, name: &str, holder: &str) -> Result<bool>;
    fn lease_holder(&self, name: &str, now: u64) -> Result<Option<String>>;
    fn store_key_id(&self) -> Result<KeyId>;
    fn get_session_summary(&self, id: SessionId) -> Result<Option<SessionSummary>>;
    fn count_active_tokens(&self) -> Result<u64>;
    fn counts(&self) -> Result<StoreCounts>;
    fn key_status(&self) -> Result<KeyStatus>;
    fn slowest_export_cursor(&self) -> Result<Option<u64>>;
    fn prune_feed(&self) -> Result<u64>;
    fn insert_app(&self, row: &AppRow, secret: &SecretString, config_key: Option<&Keyring>) -> Result<()>;
    fn remove_app(&self, app_id: &str) -> Result<bool>;
    fn app_secret(&self, app_id: &str, config_key: Option<&Keyring>) -> Result<Option<SecretString>>;
    fn app_token_count(&self, app_id: &str) -> Result<u64>;
    fn delete_app(&self, app_id: &str, force: bool, hard: bool) -> Result<AppDeletion>;
    fn get_app(&self, app_id: &str) -> Result<Option<AppRow>>;
    fn list_apps(&self) -> Result<Vec<AppRow>>;
    fn put_device_poll(&self, p: &DevicePoll) -> Result<()>;
    fn get_device_poll(&self, id: SessionId) -> Result<Option<DevicePoll>>;
    fn delete_device_poll(&self, id: SessionId) -> Result<bool>;
    fn device_polls_of(&self, app_id: &str, limit: usize) -> Result<Vec<SessionId>>;
    fn rotate_keys(&self, batch: usize, progress: &mut dyn FnMut(u64, u64)) -> Result<RotationReport>;
    fn write_snapshot(&self, out: &mut dyn std::io::Write, progress: Progress<'_>) -> Result<SnapshotHeader>;
    fn outbox_append(&self, events: &[OutboxEvent], now: u64) -> Result<()>;
    fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxEntry>>;
    fn outbox_dead(&self, limit: usize) -> Result<Vec<OutboxEntry>>;
    fn outbox_delivered(&self, seq: u64) -> Result<bool>;
    fn outbox_reschedule(&self, entry: &OutboxEntry) -> Result<bool>;
    fn outbox_bury(&self, entry: &OutboxEntry) -> Result<bool>;
    fn outbox_counts(&self) -> Result<(u64, u64)>;
    fn grant_of(&self, app_id: &str, user_id: &str) -> Result<Option<(u64, u64)>>;
    fn grants_to_remind(&self, granted_before: u64, limit: usize) -> Result<Vec<ExpiringGrant>>;
    fn mark_reminded(&self, app_id: &str, user_id: &str, granted_at: u64, events: &[OutboxEvent], now: u64) -> Result<bool>;
    fn put_token_with_events(&self, token: &UserToken, events: &[OutboxEvent], now: u64) -> Result<()>;
    fn delete_token_with_events(&self, app_id: &str, user_id: &str, events: &[OutboxEvent], now: u64) -> Result<bool>;
    fn update_if_pending_with_events(&self, expect_hash: Option<[u8; 32]>, s: &AuthSession, token: Option<&UserToken>, events: &[OutboxEvent]) -> Result<PendingUpdate>;
}

impl Db {
    /// Runs blocking store work off the async executor.
    pub async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Db) -> Result<T> + Send + 'static,
    {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| Error::Join(e.to_string()))?
    }

    /// The export row of one session.
    pub fn export_row(&self, id: SessionId) -> Result<Option<ExportRow>> {
        Ok(self.export_rows(&[id])?.into_iter().next().flatten())
    }

    /// The redb store, if this is one.
    #[must_use]
    pub fn as_redb(&self) -> Option<&Store> {
        match self {
            Self::Redb(s) => Some(s),
            Self::Postgres(_) => None,
        }
    }

    /// The redb store for `feature`, refused on PostgreSQL.
    pub fn redb_for(&self, feature: &str) -> Result<&Store> {
        self.as_redb().ok_or_else(|| not_on_postgres(feature))
    }

    /// True on PostgreSQL (a fleet may share the database).
    #[must_use]
    pub fn is_postgres(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }

    /// The backend's name, for logs and `/`.
    #[must_use]
    pub fn backend_name(&self) -> &'static str {
        match self {
            Self::Redb(_) => "redb",
            Self::Postgres(_) => "postgres",
        }
    }

    /// The store file (redb only; PostgreSQL has none).
    #[must_use]
    pub fn path(&self) -> Option<&Path> {
        self.as_redb().map(Store::path)
    }

    /// The id new secrets are sealed under.
    #[must_use]
    pub fn active_key_id(&self) -> KeyId {
        match self {
            Self::Redb(s) => s.active_key_id(),
            Self::Postgres(p) => p.active_key_id(),
        }
    }

    /// The schema version of the store.
    pub fn schema_version(&self) -> Result<u32> {
        match self {
            Self::Redb(s) => s.schema_version(),
            Self::Postgres(p) => {
                let v = p.schema_version()?;
                u32::try_from(v).map_err(|_| Error::Engine(format!("schema version {v}")))
            }
        }
    }

    /// Whether a key rotation is due: on redb, the key check is not under the active key; on
    /// PostgreSQL, the key check or any sealed column is not.
    pub fn rotation_pending(&self) -> Result<bool> {
        match self {
            Self::Redb(s) => s.rotation_pending(),
            Self::Postgres(p) => p.rotation_pending(),
        }
    }

    /// The dispatcher's fast seen-id lookup: a read snapshot of the redb table. `None` on
    /// PostgreSQL, where the database's insert-wins dedup is the cross-instance truth.
    pub fn seen_snapshot(&self) -> Result<Option<SeenSnapshot>> {
        match self {
            Self::Redb(s) => s.seen_snapshot().map(Some),
            Self::Postgres(_) => Ok(None),
        }
    }

    /// The fleet-wide claim of an event id (PostgreSQL) until `until`: `Won` when this
    /// instance holds it now, `Held(t)` when another claim holds it until `t`, `Recorded(t)`
    /// when a record does; `NotShared` on redb, where one process is the only reader and its
    /// memory decides.
    pub fn claim_event(&self, id: &str, until: u64, now: u64) -> Result<EventClaim> {
        match self {
            Self::Redb(_) => Ok(EventClaim::NotShared),
            Self::Postgres(p) => p.claim_event(id, until, now),
        }
    }

    /// Records ids (claimed with [`Db::claim_event`] or not) as seen until `forget_at`, as
    /// `mark_events_seen` does, a claim becoming a record.
    pub fn settle_events(&self, ids: &[&str], forget_at: u64) -> Result<()> {
        match self {
            Self::Redb(s) => s.mark_events_seen(ids, forget_at).map(|_| ()),
            Self::Postgres(p) => p.settle_events(ids, forget_at),
        }
    }

    /// The claim of [`Db::claim_event`] without blocking: on PostgreSQL queued for the store's
    /// claim batcher (one statement for many claims) and awaited; on redb `NotShared` at once
    /// (the returned future is ready on its first poll). `keep`: the time its record is kept
    /// until when [`Db::settle_events`] settles it (the settle's own time is not used: the
    /// claim's row carries `keep` already, so settling it updates that row in place).
    pub async fn claim_event_batched(
        &self,
        id: &str,
        until: u64,
        keep: u64,
        now: u64,
    ) -> Result<EventClaim> {
        let mut answers = self.claim_events_batched(&[id], until, keep, now).await?;
        answers
            .pop()
            .ok_or_else(|| Error::Engine("a claim went unanswered".to_owned()))
    }

    /// [`Db::claim_event_batched`] for ids claimed together (an event's id and its message's):
    /// on PostgreSQL one statement decides them all, so of two instances claiming the same
    /// ids one wins them all. The answers are in the order of `ids`.
    pub async fn claim_events_batched(
        &self,
        ids: &[&str],
        until: u64,
        keep: u64,
        now: u64,
    ) -> Result<Vec<EventClaim>> {
        let reply = match self {
            Self::Redb(_) => return Ok(vec![EventClaim::NotShared; ids.len()]),
            Self::Postgres(p) => p.queue_claims(ids, until, keep, now),
        };
        let answers = reply
            .await
            .map_err(|_| Error::Unavailable("the claim batcher stopped".to_owned()))??;
        if answers.len() != ids.len() {
            return Err(Error::Engine("a claim went unanswered".to_owned()));
        }
        Ok(answers)
    }

    /// Lets ids claimed with [`Db::claim_event`] until `until` go (PostgreSQL; a no-op on
    /// redb). A claim of them made since by another holder (a lapsed claim taken again) stays.
    pub fn release_events(&self, ids: &[&str], until: u64) -> Result<()> {
        match self {
            Self::Redb(_) => Ok(()),
            Self::Postgres(p) => p.release_events(ids, until),
        }
    }

    /// [`Db::settle_events`] for async callers: on PostgreSQL through the claim batcher (its
    /// next round trip) and awaited, so no runtime thread waits on the database; on redb the
    /// same write as `settle_events`, on this thread.
    pub async fn settle_events_queued(&self, ids: &[&str], forget_at: u64) -> Result<()> {
        let reply = match self {
            Self::Redb(s) => return s.mark_events_seen(ids, forget_at).map(|_| ()),
            Self::Postgres(p) => p.queue_settle(ids, forget_at),
        };
        reply
            .await
            .map_err(|_| Error::Unavailable("the claim batcher stopped".to_owned()))?
    }

    /// [`Db::release_events`] through PostgreSQL's claim batcher (its connection, ahead of its
    /// next batch), awaited rather than waited for: for async callers (the dispatcher), whose
    /// runtime thread must not wait on the database. A no-op on redb.
    pub async fn release_events_queued(&self, ids: &[&str], until: u64) -> Result<()> {
        let reply = match self {
            Self::Redb(_) => return Ok(()),
            Self::Postgres(p) => p.queue_release(ids, until),
        };
        reply
            .await
            .map_err(|_| Error::Unavailable("the claim batcher stopped".to_owned()))?
    }

    /// `revoke_session` with webhook events in the same transaction.
    pub fn revoke_session_with_events<F: FnOnce(&SessionSummary) -> Vec<OutboxEvent>>(
        &self,
        id: SessionId,
        now: u64,
        events_for: F,
    ) -> Result<Option<AuthSession>> {
        match self {
            Self::Redb(st) => st.revoke_session_with_events(id, now, events_for),
            Self::Postgres(p) => p.revoke_session_with_events(id, now, events_for),
        }
    }

    /// Changes a registry app: `change` edits its row (the app id stays), `new_secret`
    /// replaces its secret. On PostgreSQL the row is locked while `change` runs (`FOR UPDATE`:
    /// another instance's edit of the app waits, so none is lost), and `change` runs again on
    /// the row read anew when PostgreSQL rolls the transaction back for a deadlock or a
    /// serialization failure, so it must only set fields from what it was given.
    pub fn update_app(
        &self,
        app_id: &str,
        change: impl Fn(&mut AppRow),
        new_secret: Option<&SecretString>,
        config_key: Option<&Keyring>,
    ) -> Result<Option<AppRow>> {
        match self {
            Self::Redb(s) => s.update_app(app_id, change, new_secret, config_key),
            Self::Postgres(p) => p.update_app(app_id, &change, new_secret, config_key),
        }
    }

    /// The registry's version on PostgreSQL, bumped by every write to it from any instance
    /// (what each instance polls to follow the fleet's changes); `None` on redb, where one
    /// process holds the store and its own writes wake its reconciler.
    pub fn apps_version(&self) -> Result<Option<u64>> {
        match self {
            Self::Redb(_) => Ok(None),
            Self::Postgres(p) => p.apps_version().map(Some),
        }
    }
}
