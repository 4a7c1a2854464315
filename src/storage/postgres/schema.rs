//! The embedded, versioned schema of the PostgreSQL store.
//!
//! `lark_service_schema` holds the one version number. At open, under a transaction-scoped
//! advisory lock (so instances starting together migrate once), the steps above the stored
//! version run in the opening transaction; a version above [`SCHEMA_VERSION`] is refused with
//! `Error::NewerDatabaseSchema` before anything is touched. Every table is prefixed `ls_`, apart
//! from the export's `user_auth_sessions`, which this store never touches.
//!
//! Per-state session counts: statement-level triggers on `ls_sessions` append signed deltas
//! (`ls_session_count_deltas`) in the writing transaction, and the sweep folds them into
//! `ls_session_counts`. Appending never waits on another writer (a single counter row per state
//! would serialize every session write of the fleet and could deadlock two multi-row writes),
//! and a count reads six rows plus the deltas since the last sweep, never the sessions.

use tokio_postgres::Transaction;

use super::pg_err;
use crate::storage::{Error, Result, SessionState};

/// The newest schema this build knows.
pub const SCHEMA_VERSION: i32 = 8;

/// The advisory lock key taken while checking and migrating the schema.
const MIGRATION_LOCK: i64 = 0x6c73_5f73_6368_656d; // "ls_schem"

/// Schema version 1.
const V1: &str = r"
CREATE TABLE ls_key_check (
    id integer PRIMARY KEY CHECK (id = 1),
    key_id bigint NOT NULL,
    sealed bytea NOT NULL
);
CREATE TABLE ls_meta (
    key text PRIMARY KEY,
    value bigint NOT NULL
);
INSERT INTO ls_meta (key, value) VALUES ('last_change_seq', 0);
CREATE TABLE ls_sessions (
    id bytea PRIMARY KEY CHECK (length(id) = 16),
    app_id text NOT NULL,
    user_id text NOT NULL,
    open_id text,
    union_id text,
    state text NOT NULL,
    failure_reason text,
    card_message_id text,
    created_at bigint NOT NULL,
    updated_at bigint NOT NULL,
    expires_at bigint NOT NULL,
    access_token bytea,
    access_token_key bigint,
    refresh_token bytea,
    refresh_token_key bigint,
    token_expires_at bigint,
    refresh_token_expires_at bigint,
    scopes text[] NOT NULL,
    user_name text,
    user_email text,
    avatar_url text,
    state_hash bytea,
    pkce_verifier bytea,
    pkce_verifier_key bigint
);
CREATE INDEX ls_sessions_by_user ON ls_sessions (app_id, user_id, created_at);
CREATE INDEX ls_sessions_by_created ON ls_sessions (created_at DESC);
CREATE INDEX ls_sessions_by_state_created ON ls_sessions (state, created_at DESC);
CREATE INDEX ls_sessions_oauth_state ON ls_sessions (state_hash)
    WHERE state = 'pending' AND state_hash IS NOT NULL;
CREATE INDEX ls_sessions_pending_expiry ON ls_sessions (expires_at) WHERE state = 'pending';
CREATE INDEX ls_sessions_terminal_age ON ls_sessions (updated_at) WHERE state <> 'pending';
CREATE TABLE ls_session_counts (
    state text PRIMARY KEY,
    n bigint NOT NULL
);
CREATE TABLE ls_session_count_deltas (
    id bigserial PRIMARY KEY,
    state text NOT NULL,
    delta bigint NOT NULL
);
CREATE FUNCTION ls_count_sessions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO ls_session_count_deltas (state, delta)
            SELECT state, count(*) FROM new_rows GROUP BY state;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO ls_session_count_deltas (state, delta)
            SELECT state, -count(*) FROM old_rows GROUP BY state;
    ELSE
        INSERT INTO ls_session_count_deltas (state, delta)
            SELECT state, sum(d) FROM (
                SELECT state, 1 AS d FROM new_rows
                UNION ALL SELECT state, -1 AS d FROM old_rows) AS x
            GROUP BY state HAVING sum(d) <> 0;
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER ls_sessions_count_insert AFTER INSERT ON ls_sessions
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION ls_count_sessions();
CREATE TRIGGER ls_sessions_count_delete AFTER DELETE ON ls_sessions
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION ls_count_sessions();
CREATE TRIGGER ls_sessions_count_update AFTER UPDATE ON ls_sessions
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION ls_count_sessions();
CREATE TABLE ls_tokens (
    app_id text NOT NULL,
    user_id text NOT NULL,
    open_id text,
    access_token bytea NOT NULL,
    access_token_key bigint NOT NULL,
    refresh_token bytea,
    refresh_token_key bigint,
    expires_at bigint NOT NULL,
    refresh_expires_at bigint,
    refresh_due_at bigint NOT NULL,
    scopes text[] NOT NULL,
    obtained_at bigint NOT NULL,
    session_id bytea,
    needs_reauth boolean NOT NULL,
    refresh_in_doubt_since bigint,
    PRIMARY KEY (app_id, user_id)
);
CREATE INDEX ls_tokens_refresh_due ON ls_tokens (refresh_due_at, app_id, user_id)
    WHERE refresh_token IS NOT NULL AND NOT needs_reauth;
CREATE TABLE ls_users (
    app_id text NOT NULL,
    open_id text NOT NULL,
    user_id text,
    union_id text,
    name text,
    email text,
    avatar_url text,
    updated_at bigint NOT NULL,
    PRIMARY KEY (app_id, open_id)
);
CREATE TABLE ls_seen_events (
    id text PRIMARY KEY,
    forget_at bigint NOT NULL
);
CREATE INDEX ls_seen_events_forget ON ls_seen_events (forget_at);
CREATE TABLE ls_changes (
    seq bigint PRIMARY KEY,
    kind smallint NOT NULL,
    session_id bytea NOT NULL
);
CREATE TABLE ls_cursors (
    name text PRIMARY KEY,
    value bigint NOT NULL
);
CREATE TABLE ls_leases (
    name text PRIMARY KEY,
    holder text NOT NULL,
    expires_at bigint NOT NULL
);
";

/// Schema version 2 (additive): the fleet's instances, each upserting its own row as its
/// heartbeat (`instances`).
const V2: &str = r"
CREATE TABLE ls_instances (
    holder text PRIMARY KEY,
    host text NOT NULL,
    pid bigint NOT NULL,
    version text NOT NULL,
    started_at bigint NOT NULL,
    last_seen bigint NOT NULL
);
CREATE INDEX ls_instances_last_seen ON ls_instances (last_seen);
";

/// Schema version 3 (additive): rate-limit counters per key and fixed window, shared by the
/// fleet (`ratelimit`).
const V3: &str = r"
CREATE TABLE ls_rate_counts (
    key text NOT NULL,
    window_start bigint NOT NULL,
    count bigint NOT NULL,
    forget_at bigint NOT NULL,
    PRIMARY KEY (key, window_start)
);
CREATE INDEX ls_rate_counts_forget ON ls_rate_counts (forget_at);
";

/// Schema version 4 (additive): the webhook outbox (`ls_outbox`, its sequence
/// `ls_outbox_seq`, never reused), its dead entries (`ls_outbox_dead`) and the users' grants
/// (`ls_grants`), as the redb store keeps them (`outbox`). The grants of the tokens already
/// stored are seeded as redb's schema 7 seeded them: the earlier of the token's `obtained_at`
/// and its session's creation, not reminded yet.
const V4: &str = r"
CREATE SEQUENCE ls_outbox_seq AS bigint MINVALUE 1;
CREATE TABLE ls_outbox (
    seq bigint PRIMARY KEY,
    event_id text NOT NULL,
    kind text NOT NULL,
    body bytea NOT NULL,
    created_at bigint NOT NULL,
    attempts integer NOT NULL,
    next_attempt_at bigint NOT NULL,
    delivered_to text[] NOT NULL,
    last_error text
);
CREATE TABLE ls_outbox_dead (LIKE ls_outbox INCLUDING ALL);
CREATE TABLE ls_grants (
    app_id text NOT NULL,
    user_id text NOT NULL,
    granted_at bigint NOT NULL,
    reminded_at bigint NOT NULL,
    PRIMARY KEY (app_id, user_id)
);
INSERT INTO ls_grants (app_id, user_id, granted_at, reminded_at)
    SELECT t.app_id, t.user_id, LEAST(t.obtained_at, COALESCE(s.created_at, t.obtained_at)), 0
    FROM ls_tokens AS t LEFT JOIN ls_sessions AS s ON s.id = t.session_id;
";

/// Schema version 5 (additive): the app registry (`apps`), each app's secret sealed as the
/// redb store seals it, a `version` per row for compare-and-set edits, and one registry
/// version bumped by every write, which every instance polls to pick up the fleet's changes.
const V5: &str = r"
CREATE TABLE ls_apps (
    app_id text PRIMARY KEY,
    app_name text NOT NULL,
    description text,
    status text NOT NULL CHECK (status IN ('active', 'inactive', 'deleted')),
    permissions text,
    created_at bigint NOT NULL,
    updated_at bigint NOT NULL,
    created_by text,
    secret_sealed_with text NOT NULL CHECK (secret_sealed_with IN ('store', 'config')),
    secret bytea NOT NULL,
    secret_key bigint NOT NULL,
    version bigint NOT NULL
);
CREATE UNIQUE INDEX ls_apps_name ON ls_apps (app_name);
CREATE TABLE ls_apps_version (
    id integer PRIMARY KEY CHECK (id = 1),
    version bigint NOT NULL
);
INSERT INTO ls_apps_version (id, version) VALUES (1, 0);
";

/// Schema version 6 (additive): device polls, so that a device session is polled after a
/// restart and by another instance when the one polling it dies (`device`): the device code
/// sealed (nonce || ciphertext, key id), the interval in force, the code's expiry.
const V6: &str = r"
CREATE TABLE ls_device_polls (
    session_id bytea PRIMARY KEY CHECK (length(session_id) = 16),
    app_id text NOT NULL,
    device_code bytea NOT NULL,
    device_code_key bigint NOT NULL,
    interval_ms bigint NOT NULL,
    expires_at bigint NOT NULL
);
CREATE INDEX ls_device_polls_by_app ON ls_device_polls (app_id, session_id);
";

/// Schema version 7 (additive): the key ids each instance holds, written by its heartbeat, so
/// a key rotation can refuse while a live instance could not open what it seals
/// (`keys::PgStore::rotate_keys`). `NULL`: an instance of an older build (it says nothing, so
/// a rotation refuses).
const V7: &str = r"
ALTER TABLE ls_instances ADD COLUMN key_ids bigint[];
ALTER TABLE ls_instances ADD COLUMN active_key bigint;
";

/// Schema version 8: a seen id's claim holds it until `held_until` (`NULL`: a record, held until
/// `forget_at`), so a claim can be made with its record's `forget_at` and becoming that record
/// moves no indexed column: a HOT update, no new index entry (`claims`). Pages keep 30 % free
/// for those updates. Rows of version 7 (`held_until` `NULL`) read as before: held until
/// `forget_at`. The ids compare bytewise (`COLLATE "C"`, the order the statements already
/// lock them in): every claim descends the primary key twice, and a locale's comparison
/// (`strcoll`) cost about a tenth of the claim statement's CPU. Changing the collation keeps
/// the table and rebuilds its primary key (seen ids live a day: a short rebuild).
const V8: &str = r#"
ALTER TABLE ls_seen_events ADD COLUMN held_until bigint;
ALTER TABLE ls_seen_events SET (fillfactor = 70);
ALTER TABLE ls_seen_events ALTER COLUMN id TYPE text COLLATE "C";
"#;

/// The steps, in order: `(version reached, SQL)`.
fn steps() -> Vec<(i32, String)> {
    let counts: Vec<String> = SessionState::ALL
        .iter()
        .map(|s| format!("('{}', 0)", s.as_str()))
        .collect();
    vec![
        (
            1,
            format!(
                "{V1}\nINSERT INTO ls_session_counts (state, n) VALUES {};",
                counts.join(", ")
            ),
        ),
        (2, V2.to_owned()),
        (3, V3.to_owned()),
        (4, V4.to_owned()),
        (5, V5.to_owned()),
        (6, V6.to_owned()),
        (7, V7.to_owned()),
        (8, V8.to_owned()),
    ]
}

/// Brings the schema to [`SCHEMA_VERSION`] inside `tx` (refusing a newer one) and returns the
/// stored key check `(key_id, nonce || ct)`, `None` for a new database.
pub(crate) async fn migrate(tx: &Transaction<'_>) -> Result<Option<(i64, Vec<u8>)>> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(|e| pg_err(&e))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS lark_service_schema (
            id integer PRIMARY KEY CHECK (id = 1),
            version integer NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .map_err(|e| pg_err(&e))?;
    let found: i32 = match tx
        .query_opt("SELECT version FROM lark_service_schema WHERE id = 1", &[])
        .await
        .map_err(|e| pg_err(&e))?
    {
        Some(row) => row.try_get(0).map_err(|e| pg_err(&e))?,
        None => 0,
    };
    if found > SCHEMA_VERSION {
        return Err(Error::NewerDatabaseSchema {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (version, sql) in steps() {
        if version > found {
            tx.batch_execute(&sql).await.map_err(|e| pg_err(&e))?;
        }
    }
    if found < SCHEMA_VERSION {
        tx.execute(
            "INSERT INTO lark_service_schema (id, version) VALUES (1, $1)
             ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, updated_at = now()",
            &[&SCHEMA_VERSION],
        )
        .await
        .map_err(|e| pg_err(&e))?;
    }
    let check = tx
        .query_opt("SELECT key_id, sealed FROM ls_key_check WHERE id = 1", &[])
        .await
        .map_err(|e| pg_err(&e))?;
    match check {
        Some(row) => Ok(Some((
            row.try_get(0).map_err(|e| pg_err(&e))?,
            row.try_get(1).map_err(|e| pg_err(&e))?,
        ))),
        None if found == 0 => Ok(None),
        None => Err(Error::Engine(
            "the PostgreSQL store's key check row is missing; restore the database".to_owned(),
        )),
    }
}
