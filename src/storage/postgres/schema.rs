//! The embedded, versioned schema of the PostgreSQL store.
//!
//! `lark_service_schema` holds the one version number. At open, under a transaction-scoped
//! advisory lock (so instances starting together migrate once), the steps above the stored
//! version run in the opening transaction; a version above [`SCHEMA_VERSION`] is refused with
//! `Error::NewerDatabaseSchema` before anything is touched. Every table is prefixed `ls_`, apart
//! from the export's `user_auth_sessions`, which this store never touches.

use tokio_postgres::Transaction;

use super::pg_err;
use crate::storage::{Error, Result, SessionState};

/// The newest schema this build knows.
pub const SCHEMA_VERSION: i32 = 1;

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
    n bigint NOT NULL CHECK (n >= 0)
);
CREATE FUNCTION ls_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE ls_session_counts SET n = n + 1 WHERE state = NEW.state;
    RETURN NULL;
END $$;
CREATE FUNCTION ls_count_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE ls_session_counts SET n = n - 1 WHERE state = OLD.state;
    RETURN NULL;
END $$;
CREATE FUNCTION ls_count_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE ls_session_counts SET n = n - 1 WHERE state = OLD.state;
    UPDATE ls_session_counts SET n = n + 1 WHERE state = NEW.state;
    RETURN NULL;
END $$;
CREATE TRIGGER ls_sessions_count_insert AFTER INSERT ON ls_sessions
    FOR EACH ROW EXECUTE FUNCTION ls_count_insert();
CREATE TRIGGER ls_sessions_count_delete AFTER DELETE ON ls_sessions
    FOR EACH ROW EXECUTE FUNCTION ls_count_delete();
CREATE TRIGGER ls_sessions_count_update AFTER UPDATE OF state ON ls_sessions
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION ls_count_update();
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

/// The steps, in order: `(version reached, SQL)`.
fn steps() -> Vec<(i32, String)> {
    let counts: Vec<String> = SessionState::ALL
        .iter()
        .map(|s| format!("('{}', 0)", s.as_str()))
        .collect();
    vec![(
        1,
        format!(
            "{V1}\nINSERT INTO ls_session_counts (state, n) VALUES {};",
            counts.join(", ")
        ),
    )]
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
