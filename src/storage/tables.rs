//! Every table of the store, in one place, with the schema version.
//!
//! Keys are fixed-width integers or tuples (`redb` orders them by value). Values of record
//! tables are a version byte followed by the bincode encoding of that version's stored form
//! (see `records.rs`). Change a table's key or value type only with a new `SCHEMA_VERSION` and a
//! migration step in `migrate.rs`.

use redb::TableDefinition;

/// The schema this build writes. Version 1 had no deadline indexes; 2 added them; 3 added
/// `oauth_states`; 4 added the `changes` feed; 5 added `leases`; 6 added `session_counts`; 7 added
/// `outbox`, `outbox_dead` and `grants`; 8 added `apps`; 9 added `sessions_expired`; 10 added
/// `device_polls`; 11 added `seen_log`.
pub const SCHEMA_VERSION: u32 = 11;

/// Store metadata: `schema_version` (u32 BE), `key_check` (sealed canary), `created_at`.
pub const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");

/// Auth sessions by session id.
pub const SESSIONS: TableDefinition<'_, u128, &[u8]> = TableDefinition::new("sessions");

/// (app_id, user_id, session_id) → (): the sessions of a user, oldest id first.
pub const SESSIONS_BY_USER: TableDefinition<'_, (&str, &str, u128), ()> =
    TableDefinition::new("sessions_by_user");

/// (due unix ms, session_id) → deadline kind: when a session must be expired or purged.
/// Every session has exactly one entry, so a sweep reads only what is due.
pub const SESSION_DEADLINES: TableDefinition<'_, (u64, u128), u8> =
    TableDefinition::new("session_deadlines");

/// Session id → unix ms the sweep expired it, for pending sessions the sweep expired without
/// rewriting their record (an expiry then writes a few bytes, not the whole sealed record). A
/// record with an entry here is read as expired at that time, whatever it says
/// (`records::StoredSession::overlay`); the entry goes when the record is next written or
/// purged. Written in the sweep's batch transaction with the other effects of the expiry.
pub const SESSIONS_EXPIRED: TableDefinition<'_, u128, u64> =
    TableDefinition::new("sessions_expired");

/// SHA-256 of an OAuth `state` → session id, for the pending sessions whose state is still
/// unused. Written and deleted in the same transaction as the session (see `sessions.rs`).
pub const OAUTH_STATES: TableDefinition<'_, [u8; 32], u128> = TableDefinition::new("oauth_states");

/// Sessions per state: state key (`counts::state_key`) → how many. Changed in the transaction
/// of every session write, expiry and purge (see `counts.rs`).
pub const SESSION_COUNTS: TableDefinition<'_, u8, u64> = TableDefinition::new("session_counts");

/// Current user tokens by (app_id, user_id).
pub const TOKENS: TableDefinition<'_, (&str, &str), &[u8]> = TableDefinition::new("tokens");

/// (refresh due unix ms, app_id, user_id) → (): tokens in the order they need refreshing.
pub const TOKEN_REFRESH_DUE: TableDefinition<'_, (u64, &str, &str), ()> =
    TableDefinition::new("token_refresh_due");

/// Users by (app_id, open_id).
pub const USERS: TableDefinition<'_, (&str, &str), &[u8]> = TableDefinition::new("users");

/// Seen event ids → forget-after unix ms, for de-duplication.
pub const SEEN_EVENTS: TableDefinition<'_, &str, u64> = TableDefinition::new("seen_events");

/// (forget-after unix ms, event_id) → (): the seen-event expiry index.
pub const SEEN_EVENTS_EXPIRY: TableDefinition<'_, (u64, &str), ()> =
    TableDefinition::new("seen_events_expiry");

/// seq → (forget-after unix ms, event_id): seen event ids committed but not yet in
/// [`SEEN_EVENTS`]. The dispatcher's group commits append here (keys only grow, so a commit
/// writes the few pages at the right edge instead of one page per id scattered through
/// `seen_events`) and the log is moved into `seen_events` in large batches (see `events.rs`).
pub const SEEN_LOG: TableDefinition<'_, u64, (u64, &str)> = TableDefinition::new("seen_log");

/// Named cursors (u64), e.g. export positions.
pub const CURSORS: TableDefinition<'_, &str, u64> = TableDefinition::new("cursors");

/// The session change feed: seq → 1 kind byte ([`CHANGE_UPSERT`] or [`CHANGE_DELETE`]) and the
/// 16 big-endian bytes of the session id. Appended in the transaction that writes or purges the
/// session (see `changes.rs`); exporters read it after their cursor.
pub const CHANGES: TableDefinition<'_, u64, [u8; 17]> = TableDefinition::new("changes");

/// Named leases: name → version byte and the bincode of (holder, expires at unix ms).
pub const LEASES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("leases");

/// Outgoing webhook events still to deliver: seq → version byte and the bincode of the entry
/// (see `outbox.rs`). Appended in the transaction of the change that causes the event.
pub const OUTBOX: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("outbox");

/// Webhook events that ran out of delivery attempts, same form as [`OUTBOX`].
pub const OUTBOX_DEAD: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("outbox_dead");

/// (app_id, user_id) → (unix ms the user last authorized, unix ms a reminder of that grant's
/// hard expiry was sent or 0): written with the completion that stores a new grant's token
/// (which clears the reminder), so the hard expiry (365 days after authorizing) survives
/// refreshes and session purges.
pub const GRANTS: TableDefinition<'_, (&str, &str), (u64, u64)> = TableDefinition::new("grants");

/// The app registry: app id → version byte and the bincode of the app's record, its secret
/// sealed (see `apps.rs`).
pub const APPS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("apps");

/// Device polls by session id: version byte and the bincode of the device code (sealed), the
/// interval in force and the code's expiry (see `device.rs`).
pub const DEVICE_POLLS: TableDefinition<'_, u128, &[u8]> = TableDefinition::new("device_polls");

/// Change kind: the session was written.
pub const CHANGE_UPSERT: u8 = 1;
/// Change kind: the session was deleted (tombstone).
pub const CHANGE_DELETE: u8 = 2;

/// Deadline kind: a pending session to mark expired.
pub const DEADLINE_EXPIRE: u8 = 1;
/// Deadline kind: a terminal session to delete.
pub const DEADLINE_PURGE: u8 = 2;

/// Names of the tables whose values hold sealed secrets (for key status and rotation).
pub const SEALED_TABLES: [&str; 2] = ["sessions", "tokens"];
