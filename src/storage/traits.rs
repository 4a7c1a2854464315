//! The store as its consumers see it: one trait per consumer, so that a second backend (a
//! PostgreSQL one for a fleet) can be written against the same contracts and checked by the
//! same suite (`testing::conformance`).
//!
//! The calls are synchronous: the redb store is blocking and async callers go through
//! [`Store::run`](super::Store::run). A networked backend would implement them on a blocking
//! client or behind its own runtime handle.
//!
//! Contracts every backend keeps (each method repeats the ones that concern it):
//!
//! - **Durable on return.** A write that returns `Ok` is committed and survives a crash or a
//!   power loss (fsync, or a synchronous commit); one that returns `Err` wrote nothing.
//! - **Atomic.** Each call is one transaction: a session and the token written with it, a
//!   session and its index entries, a batch of seen ids, appear together or not at all.
//! - **First terminal transition wins.** A pending session leaves `pending` once. Of two
//!   transitions raced through [`SessionStore::update_if_pending`] with the same expected
//!   state hash, exactly one commits; the other writes nothing and is told what the winner left.
//! - **Sealed at rest.** Secrets (tokens, PKCE verifiers) never reach the medium in clear.
//! - Times are unix milliseconds, passed in by the caller (the store never reads a clock for a
//!   decision), so tests and a fleet agree on "now".

use secrecy::SecretString;

use super::{
    AuthSession, ChangeKind, ExportRow, ImportToken, PendingUpdate, Result, SessionId,
    SessionState, SessionSummary, Store, SweepReport, UserInfo, UserToken,
};
use super::{ExpiringGrant, OutboxEntry, OutboxEvent};

/// Auth sessions and their OAuth states (the authorization flow, the HTTP API, the sweep).
pub trait SessionStore {
    /// Creates or replaces a session with its indexes (user, deadline, unused OAuth state).
    /// Atomic and durable on return. Refuses empty or over-long app and user ids.
    fn put_session(&self, s: &AuthSession) -> Result<()>;

    /// Creates or replaces many sessions in one atomic, durable transaction.
    fn put_sessions(&self, sessions: &[AuthSession]) -> Result<()>;

    /// One session with its secrets opened, or `None`.
    fn get_session(&self, id: SessionId) -> Result<Option<AuthSession>>;

    /// The **pending** session whose unused OAuth state hashes to `hash`. A session that has
    /// left `pending` is no longer reachable by its state (a state is good for one redirect).
    fn session_by_state_hash(&self, hash: &[u8; 32]) -> Result<Option<AuthSession>>;

    /// Compare-and-set: writes `s` (and `token`, in the same transaction) only if the stored
    /// session is still pending with state hash `expect_hash`. The first transition to commit
    /// wins; a later one writes nothing and gets [`PendingUpdate::Lost`] with the session as
    /// the winner left it, or [`PendingUpdate::Missing`]. Durable on `Written`.
    fn update_if_pending(
        &self,
        expect_hash: Option<[u8; 32]>,
        s: &AuthSession,
        token: Option<&UserToken>,
    ) -> Result<PendingUpdate>;

    /// Writes a completed session and the user's current token in one durable transaction.
    fn complete_session(&self, s: &AuthSession, token: &UserToken) -> Result<()>;

    /// Marks a session revoked (dropping its secrets) and, if it produced the user's current
    /// token, deletes that token, atomically. `None` if there is no such session.
    fn revoke_session(&self, id: SessionId, now: u64) -> Result<Option<AuthSession>>;

    /// The sessions of one user, oldest first.
    fn sessions_for_user(&self, app_id: &str, user_id: &str) -> Result<Vec<AuthSession>>;

    /// Summaries (no secrets), optionally of one state, newest first, at most `limit`.
    fn list_sessions(
        &self,
        state: Option<SessionState>,
        limit: usize,
    ) -> Result<Vec<SessionSummary>>;

    /// How many sessions are in each state, every state listed. Must not read every session
    /// (gauges call it on a timer): a backend keeps the counts as it writes.
    fn count_sessions_by_state(&self) -> Result<Vec<(SessionState, u64)>>;

    /// Ids of the pending sessions whose expiry is at or before `now` (from an index).
    fn pending_expired(&self, now: u64) -> Result<Vec<SessionId>>;

    /// Expires the pending sessions due at `now`, deletes terminal ones past retention and
    /// forgets seen ids past their time, reading only what is due, in transactions of at most
    /// `batch` sessions. Each expiry or deletion is recorded in the change feed.
    fn sweep(&self, now: u64, batch: usize) -> Result<SweepReport>;
}

/// Users' current tokens and the refresh queue (the refresh worker, the token API).
///
/// A token's `refresh_in_doubt_since` (a refresh went out and its answer was lost) is part of
/// the record: it is set and cleared by writing the token with [`TokenStore::put_token`].
pub trait TokenStore {
    /// Creates or replaces a user's current token, keeping the refresh queue in step: a token
    /// with a refresh token and not `needs_reauth` is queued at `refresh_due_at`, any other is
    /// not queued. Durable on return.
    fn put_token(&self, token: &UserToken) -> Result<()>;

    /// A user's current token, opened, or `None`.
    fn get_token(&self, app_id: &str, user_id: &str) -> Result<Option<UserToken>>;

    /// Deletes a user's token and its queue entry; true if there was one. Durable on return.
    fn delete_token(&self, app_id: &str, user_id: &str) -> Result<bool>;

    /// `(app_id, user_id, due)` of the queued tokens due at or before `now`, soonest first
    /// (ties by app and user), at most `limit`. Reads only the due part of the queue.
    fn tokens_due(&self, now: u64, limit: usize) -> Result<Vec<(String, String, u64)>>;
}

/// What is known of users (the user-info sync).
pub trait UserStore {
    /// Creates or replaces a user by `(app_id, open_id)`. Durable on return.
    fn put_user(&self, user: &UserInfo) -> Result<()>;

    /// One user, or `None`.
    fn get_user(&self, app_id: &str, open_id: &str) -> Result<Option<UserInfo>>;

    /// Every user of one app (no other app's), by open_id.
    fn list_users(&self, app_id: &str) -> Result<Vec<UserInfo>>;
}

/// Seen event ids, for de-duplicating redelivered events (the event dispatcher).
pub trait SeenEvents {
    /// Records ids as seen until `forget_at` in one atomic, durable commit. For each id in
    /// order, true if it was new; an id repeated in the batch is new only the first time. An id
    /// already seen keeps its first `forget_at`. Refuses the whole batch if any id is invalid.
    fn mark_events_seen(&self, ids: &[&str], forget_at: u64) -> Result<Vec<bool>>;

    /// True if the id was recorded and not yet forgotten by a sweep.
    fn event_seen(&self, id: &str) -> Result<bool>;
}

/// The session change feed and the exporters' cursors (`crate::export`).
///
/// Appending is internal: every session write and every sweep expiry or purge appends, in the
/// transaction that makes the change, one entry under a sequence number that only grows and is
/// never reused, even after pruning.
pub trait ChangeFeed {
    /// Up to `limit` changes with a seq above `seq`, in seq order.
    fn changes_after(&self, seq: u64, limit: usize) -> Result<Vec<(u64, ChangeKind, SessionId)>>;

    /// The seq of the last change ever appended (0: none), pruned or not.
    fn last_change_seq(&self) -> Result<u64>;

    /// Deletes the changes with seq ≤ `upto`; returns how many. Later seqs are untouched.
    fn prune_changes(&self, upto: u64) -> Result<u64>;

    /// The seq after which the feed holds every change (0: all). Appending can be switched
    /// off (no exporter configured); an exporter whose cursor is below this missed changes and
    /// must copy every session before following the feed.
    fn change_feed_complete_from(&self) -> Result<u64>;

    /// A named cursor (an exporter's position), or `None` if never set.
    fn cursor(&self, name: &str) -> Result<Option<u64>>;

    /// Sets a named cursor; durable on return.
    fn set_cursor(&self, name: &str, value: u64) -> Result<()>;

    /// The export rows of `ids` (tokens still sealed), `None` for sessions that are gone.
    fn export_rows(&self, ids: &[SessionId]) -> Result<Vec<Option<ExportRow>>>;

    /// Up to `limit` export rows with an id above `after`, by id (a full copy, page by page).
    fn export_rows_after(&self, after: Option<SessionId>, limit: usize) -> Result<Vec<ExportRow>>;

    /// Opens an imported token column of session `id` (`field`: `access_token` or
    /// `refresh_token`) with this store's keys, or passes a plaintext one through.
    fn open_imported_token(
        &self,
        id: SessionId,
        field: &str,
        token: ImportToken,
    ) -> Result<SecretString>;
}

/// Named leases, so that a singleton worker runs once across processes sharing a backend.
///
/// A lease is `(name, holder, expires_at)`. It is free when absent or when `expires_at <= now`.
/// Every call is one atomic transaction (on a shared database: a conditional update), durable
/// on return, so two holders never both get `true` for the same name at the same `now`.
pub trait Leases {
    /// Takes lease `name` for `holder` until `now + ttl_ms` if it is free, or already held by
    /// `holder` (which extends it). True if `holder` holds it on return.
    fn try_acquire_lease(&self, name: &str, holder: &str, ttl_ms: u64, now: u64) -> Result<bool>;

    /// Extends lease `name` to `now + ttl_ms` only if `holder` holds it and it has not expired
    /// at `now`. False otherwise (an expired lease must be acquired again, and may be lost).
    fn renew_lease(&self, name: &str, holder: &str, ttl_ms: u64, now: u64) -> Result<bool>;

    /// Frees lease `name` if `holder` holds it; true if it did. Another holder's lease stays.
    fn release_lease(&self, name: &str, holder: &str) -> Result<bool>;

    /// Who holds lease `name` at `now` (`None`: free or expired).
    fn lease_holder(&self, name: &str, now: u64) -> Result<Option<String>>;
}

/// The outgoing-webhook outbox and the users' grants (the webhook worker, the reminders).
///
/// Events are appended by the store's `_with_events` writes in the transaction of the change
/// that causes them (or by [`Outbox::outbox_append`] alone). An entry stays live until it is
/// delivered (deleted) or buried (moved to the dead entries); both survive a restart.
pub trait Outbox {
    /// Appends `events` (at `now`, due at once) in one atomic, durable transaction, each under
    /// a sequence number above every earlier one (never reused, even after a delete). Refuses
    /// the whole batch if an event id or kind is empty or over 128 bytes.
    fn outbox_append(&self, events: &[OutboxEvent], now: u64) -> Result<()>;

    /// Up to `limit` live entries in sequence order.
    fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxEntry>>;

    /// Up to `limit` dead entries in sequence order.
    fn outbox_dead(&self, limit: usize) -> Result<Vec<OutboxEntry>>;

    /// Deletes live entry `seq`; true if it was live. Durable on return.
    fn outbox_delivered(&self, seq: u64) -> Result<bool>;

    /// Stores the progress fields of live entry `entry.seq` (attempts, next attempt, receivers
    /// done, last error; the event itself is never changed). False if it is not live.
    fn outbox_reschedule(&self, entry: &OutboxEntry) -> Result<bool>;

    /// Moves live entry `entry.seq`, with its final progress, to the dead entries, atomically.
    /// False if it is not live.
    fn outbox_bury(&self, entry: &OutboxEntry) -> Result<bool>;

    /// (live, dead) entry counts, without reading the entries.
    fn outbox_counts(&self) -> Result<(u64, u64)>;

    /// [`SessionStore::update_if_pending`] that appends `events` (at the session's
    /// `updated_at`) in the same transaction, only when the transition is written.
    fn update_if_pending_with_events(
        &self,
        expect_hash: Option<[u8; 32]>,
        s: &AuthSession,
        token: Option<&UserToken>,
        events: &[OutboxEvent],
    ) -> Result<PendingUpdate>;

    /// [`SessionStore::revoke_session`] that appends the events `events_for` makes of the
    /// revoked session (no secrets in it) in the same transaction; nothing without a session.
    fn revoke_session_with_events<F: FnOnce(&SessionSummary) -> Vec<OutboxEvent>>(
        &self,
        id: SessionId,
        now: u64,
        events_for: F,
    ) -> Result<Option<AuthSession>>;

    /// [`TokenStore::put_token`] that appends `events` (at `now`) in the same transaction.
    fn put_token_with_events(
        &self,
        token: &UserToken,
        events: &[OutboxEvent],
        now: u64,
    ) -> Result<()>;

    /// [`TokenStore::delete_token`] that appends `events` (at `now`) in the same transaction,
    /// only when there was a token.
    fn delete_token_with_events(
        &self,
        app_id: &str,
        user_id: &str,
        events: &[OutboxEvent],
        now: u64,
    ) -> Result<bool>;

    /// `(granted_at, reminded_at or 0)` of a user's current grant. A completion that stores a
    /// token records a new grant at the session's `updated_at` and clears its reminder.
    fn grant_of(&self, app_id: &str, user_id: &str) -> Result<Option<(u64, u64)>>;

    /// Users with a refreshable token whose grant was made at or before `granted_before` and
    /// who were not reminded of it yet, at most `limit`.
    fn grants_to_remind(&self, granted_before: u64, limit: usize) -> Result<Vec<ExpiringGrant>>;

    /// Records the reminder of the grant made at `granted_at` and appends `events`, in one
    /// durable transaction; false and nothing written if the current grant is another one.
    fn mark_reminded(
        &self,
        app_id: &str,
        user_id: &str,
        granted_at: u64,
        events: &[OutboxEvent],
        now: u64,
    ) -> Result<bool>;
}

/// Everything a backend of the service provides: what the conformance suite checks.
pub trait Backend:
    SessionStore + TokenStore + UserStore + SeenEvents + ChangeFeed + Leases
{
}

impl<T: SessionStore + TokenStore + UserStore + SeenEvents + ChangeFeed + Leases> Backend for T {}

// ---------------------------------------------------------------------------------------------
// The redb store: every method is its inherent method of the same name (callers that hold a
// `Store` need no `use` of these traits).

impl SessionStore for Store {
    fn put_session(&self, s: &AuthSession) -> Result<()> {
        Store::put_session(self, s)
    }
    fn put_sessions(&self, sessions: &[AuthSession]) -> Result<()> {
        Store::put_sessions(self, sessions)
    }
    fn get_session(&self, id: SessionId) -> Result<Option<AuthSession>> {
        Store::get_session(self, id)
    }
    fn session_by_state_hash(&self, hash: &[u8; 32]) -> Result<Option<AuthSession>> {
        Store::session_by_state_hash(self, hash)
    }
    fn update_if_pending(
        &self,
        expect_hash: Option<[u8; 32]>,
        s: &AuthSession,
        token: Option<&UserToken>,
    ) -> Result<PendingUpdate> {
        Store::update_if_pending(self, expect_hash, s, token)
    }
    fn complete_session(&self, s: &AuthSession, token: &UserToken) -> Result<()> {
        Store::complete_session(self, s, token)
    }
    fn revoke_session(&self, id: SessionId, now: u64) -> Result<Option<AuthSession>> {
        Store::revoke_session(self, id, now)
    }
    fn sessions_for_user(&self, app_id: &str, user_id: &str) -> Result<Vec<AuthSession>> {
        Store::sessions_for_user(self, app_id, user_id)
    }
    fn list_sessions(
        &self,
        state: Option<SessionState>,
        limit: usize,
    ) -> Result<Vec<SessionSummary>> {
        Store::list_sessions(self, state, limit)
    }
    fn count_sessions_by_state(&self) -> Result<Vec<(SessionState, u64)>> {
        Store::count_sessions_by_state(self)
    }
    fn pending_expired(&self, now: u64) -> Result<Vec<SessionId>> {
        Store::pending_expired(self, now)
    }
    fn sweep(&self, now: u64, batch: usize) -> Result<SweepReport> {
        Store::sweep(self, now, batch)
    }
}

impl TokenStore for Store {
    fn put_token(&self, token: &UserToken) -> Result<()> {
        Store::put_token(self, token)
    }
    fn get_token(&self, app_id: &str, user_id: &str) -> Result<Option<UserToken>> {
        Store::get_token(self, app_id, user_id)
    }
    fn delete_token(&self, app_id: &str, user_id: &str) -> Result<bool> {
        Store::delete_token(self, app_id, user_id)
    }
    fn tokens_due(&self, now: u64, limit: usize) -> Result<Vec<(String, String, u64)>> {
        Store::tokens_due(self, now, limit)
    }
}

impl UserStore for Store {
    fn put_user(&self, user: &UserInfo) -> Result<()> {
        Store::put_user(self, user)
    }
    fn get_user(&self, app_id: &str, open_id: &str) -> Result<Option<UserInfo>> {
        Store::get_user(self, app_id, open_id)
    }
    fn list_users(&self, app_id: &str) -> Result<Vec<UserInfo>> {
        Store::list_users(self, app_id)
    }
}

impl SeenEvents for Store {
    fn mark_events_seen(&self, ids: &[&str], forget_at: u64) -> Result<Vec<bool>> {
        Store::mark_events_seen(self, ids, forget_at)
    }
    fn event_seen(&self, id: &str) -> Result<bool> {
        Store::event_seen(self, id)
    }
}

impl ChangeFeed for Store {
    fn changes_after(&self, seq: u64, limit: usize) -> Result<Vec<(u64, ChangeKind, SessionId)>> {
        Store::changes_after(self, seq, limit)
    }
    fn last_change_seq(&self) -> Result<u64> {
        Store::last_change_seq(self)
    }
    fn prune_changes(&self, upto: u64) -> Result<u64> {
        Store::prune_changes(self, upto)
    }
    fn change_feed_complete_from(&self) -> Result<u64> {
        Store::change_feed_complete_from(self)
    }
    fn cursor(&self, name: &str) -> Result<Option<u64>> {
        Store::cursor(self, name)
    }
    fn set_cursor(&self, name: &str, value: u64) -> Result<()> {
        Store::set_cursor(self, name, value)
    }
    fn export_rows(&self, ids: &[SessionId]) -> Result<Vec<Option<ExportRow>>> {
        Store::export_rows(self, ids)
    }
    fn export_rows_after(&self, after: Option<SessionId>, limit: usize) -> Result<Vec<ExportRow>> {
        Store::export_rows_after(self, after, limit)
    }
    fn open_imported_token(
        &self,
        id: SessionId,
        field: &str,
        token: ImportToken,
    ) -> Result<SecretString> {
        Store::open_imported_token(self, id, field, token)
    }
}

impl Leases for Store {
    fn try_acquire_lease(&self, name: &str, holder: &str, ttl_ms: u64, now: u64) -> Result<bool> {
        Store::try_acquire_lease(self, name, holder, ttl_ms, now)
    }
    fn renew_lease(&self, name: &str, holder: &str, ttl_ms: u64, now: u64) -> Result<bool> {
        Store::renew_lease(self, name, holder, ttl_ms, now)
    }
    fn release_lease(&self, name: &str, holder: &str) -> Result<bool> {
        Store::release_lease(self, name, holder)
    }
    fn lease_holder(&self, name: &str, now: u64) -> Result<Option<String>> {
        Store::lease_holder(self, name, now)
    }
}

impl Outbox for Store {
    fn outbox_append(&self, events: &[OutboxEvent], now: u64) -> Result<()> {
        Store::outbox_append(self, events, now)
    }
    fn outbox_pending(&self, limit: usize) -> Result<Vec<OutboxEntry>> {
        Store::outbox_pending(self, limit)
    }
    fn outbox_dead(&self, limit: usize) -> Result<Vec<OutboxEntry>> {
        Store::outbox_dead(self, limit)
    }
    fn outbox_delivered(&self, seq: u64) -> Result<bool> {
        Store::outbox_delivered(self, seq)
    }
    fn outbox_reschedule(&self, entry: &OutboxEntry) -> Result<bool> {
        Store::outbox_reschedule(self, entry)
    }
    fn outbox_bury(&self, entry: &OutboxEntry) -> Result<bool> {
        Store::outbox_bury(self, entry)
    }
    fn outbox_counts(&self) -> Result<(u64, u64)> {
        Store::outbox_counts(self)
    }
    fn update_if_pending_with_events(
        &self,
        expect_hash: Option<[u8; 32]>,
        s: &AuthSession,
        token: Option<&UserToken>,
        events: &[OutboxEvent],
    ) -> Result<PendingUpdate> {
        Store::update_if_pending_with_events(self, expect_hash, s, token, events)
    }
    fn revoke_session_with_events<F: FnOnce(&SessionSummary) -> Vec<OutboxEvent>>(
        &self,
        id: SessionId,
        now: u64,
        events_for: F,
    ) -> Result<Option<AuthSession>> {
        Store::revoke_session_with_events(self, id, now, events_for)
    }
    fn put_token_with_events(
        &self,
        token: &UserToken,
        events: &[OutboxEvent],
        now: u64,
    ) -> Result<()> {
        Store::put_token_with_events(self, token, events, now)
    }
    fn delete_token_with_events(
        &self,
        app_id: &str,
        user_id: &str,
        events: &[OutboxEvent],
        now: u64,
    ) -> Result<bool> {
        Store::delete_token_with_events(self, app_id, user_id, events, now)
    }
    fn grant_of(&self, app_id: &str, user_id: &str) -> Result<Option<(u64, u64)>> {
        Store::grant_of(self, app_id, user_id)
    }
    fn grants_to_remind(&self, granted_before: u64, limit: usize) -> Result<Vec<ExpiringGrant>> {
        Store::grants_to_remind(self, granted_before, limit)
    }
    fn mark_reminded(
        &self,
        app_id: &str,
        user_id: &str,
        granted_at: u64,
        events: &[OutboxEvent],
        now: u64,
    ) -> Result<bool> {
        Store::mark_reminded(self, app_id, user_id, granted_at, events, now)
    }
}
