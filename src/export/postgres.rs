//! Session export to PostgreSQL (table `user_auth_sessions`), and import back.
//!
//! One-shot ([`export_all`]) copies every session and moves the cursor to the last change seen
//! before the copy began. Continuous ([`run_continuous`]) follows the store's change feed after
//! the cursor `export.postgres`: it reads a batch of changes, upserts the sessions' current rows
//! (or deletes purged ones) in one PostgreSQL transaction, and only then stores the cursor. A
//! crash or an outage between the two repeats the batch, which is harmless: rows are upserted
//! by `session_id`. The auth path never waits for PostgreSQL: it only appends to the feed.
//!
//! Token columns hold the sealed bytes (`nonce || ciphertext`) and the key id, never plaintext.
//! TLS: connections go through rustls with the service's trust (`crate::net`), honouring the
//! URL's `sslmode`: `disable` (plain), `prefer` (the default: TLS when the server offers it),
//! `require`; libpq's `verify-ca` and `verify-full` are taken as `require`. Whenever TLS is used
//! the certificate chain and host name are verified: there is no mode that accepts any
//! certificate.

use std::collections::HashMap;
use std::time::Duration;

use secrecy::SecretString;
use tokio_postgres::Client;

use crate::backoff::Backoff;
use crate::net::Net;
use tokio_util::sync::CancellationToken;

use crate::storage::{
    ChangeKind, Db, ExportRow, ExportToken, FailureReason, ImportToken, SessionId, SessionState,
};

/// The store cursor of the continuous export.
pub const CURSOR: &str = "export.postgres";
/// Rows per PostgreSQL transaction.
pub const BATCH: usize = 500;

/// Errors of the export.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// PostgreSQL refused or is unreachable.
    #[error("postgresql: {0}")]
    Pg(#[from] tokio_postgres::Error),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::storage::Error),
    /// A row could not be imported.
    #[error("import: {0}")]
    Import(String),
    /// A column of an imported row is missing, NULL where a value is required, or of a type
    /// that cannot be read.
    #[error("import: {row}: column {column}: {detail}")]
    BadColumn {
        /// The row: `session <id>` once the id is read, else `row <n>` (from 1).
        row: String,
        /// The column.
        column: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The URL or the TLS setup cannot be used (never contains the URL's password).
    #[error("postgresql: {0}")]
    Connect(String),
    /// The database holds a table the export cannot take over (nothing was changed).
    #[error("postgresql: {0}")]
    Schema(String),
}

type Result<T> = std::result::Result<T, ExportError>;

/// A value bound to a statement parameter.
type Param = Box<dyn tokio_postgres::types::ToSql + Sync + Send>;

/// How a column is written and read back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `text`: bound as is, read as `::text`.
    Text,
    /// `timestamptz`: bound as unix ms, read back as unix ms.
    Time,
    /// `timestamp` (no time zone; UTC, as the Python deployment's table has it), since
    /// migration 2: bound as unix ms, read back as unix ms.
    NaiveTime,
    /// `bytea`.
    Bytes,
    /// `text[]`: read back as text (the Python service's table may hold JSON or words).
    Scopes,
}

/// One column of `user_auth_sessions`.
struct Column {
    name: &'static str,
    /// Its type and constraints in the table.
    ddl: &'static str,
    kind: Kind,
    /// Its value in an export row.
    value: fn(&ExportRow) -> Param,
}

/// The key id of a row's sealed tokens (both are sealed under the same key).
fn token_key_id(r: &ExportRow) -> Option<String> {
    r.access_token
        .as_ref()
        .or(r.refresh_token.as_ref())
        .map(|t| t.key_id.clone())
}

const fn col(
    name: &'static str,
    ddl: &'static str,
    kind: Kind,
    value: fn(&ExportRow) -> Param,
) -> Column {
    Column {
        name,
        ddl,
        kind,
        value,
    }
}

/// The columns of `user_auth_sessions`, in table order: the one list from which the table,
/// the upsert and the import's query are written. (`exported_at`, which is not a session
/// field, follows them.)
const COLUMNS: &[Column] = &[
    col("session_id", "text PRIMARY KEY", Kind::Text, |r| {
        Box::new(r.session_id.to_string())
    }),
    col("app_id", "text NOT NULL", Kind::Text, |r| {
        Box::new(r.app_id.clone())
    }),
    col("user_id", "text NOT NULL", Kind::Text, |r| {
        Box::new(r.user_id.clone())
    }),
    col("open_id", "text", Kind::Text, |r| {
        Box::new(r.open_id.clone())
    }),
    col("union_id", "text", Kind::Text, |r| {
        Box::new(r.union_id.clone())
    }),
    col("state", "text NOT NULL", Kind::Text, |r| {
        Box::new(r.state.as_str())
    }),
    col("failure_reason", "text", Kind::Text, |r| {
        Box::new(r.failure_reason.map(FailureReason::as_str))
    }),
    col("card_message_id", "text", Kind::Text, |r| {
        Box::new(r.card_message_id.clone())
    }),
    col("created_at", "timestamptz NOT NULL", Kind::NaiveTime, |r| {
        Box::new(ms(r.created_at))
    }),
    col("updated_at", "timestamptz NOT NULL", Kind::Time, |r| {
        Box::new(ms(r.updated_at))
    }),
    col("expires_at", "timestamptz NOT NULL", Kind::NaiveTime, |r| {
        Box::new(ms(r.expires_at))
    }),
    col("access_token_ct", "bytea", Kind::Bytes, |r| {
        Box::new(r.access_token.as_ref().map(|t| t.bytes.clone()))
    }),
    col("refresh_token_ct", "bytea", Kind::Bytes, |r| {
        Box::new(r.refresh_token.as_ref().map(|t| t.bytes.clone()))
    }),
    col("token_key_id", "text", Kind::Text, |r| {
        Box::new(token_key_id(r))
    }),
    col("token_expires_at", "timestamptz", Kind::NaiveTime, |r| {
        Box::new(r.token_expires_at.map(ms))
    }),
    col("refresh_token_expires_at", "timestamptz", Kind::Time, |r| {
        Box::new(r.refresh_token_expires_at.map(ms))
    }),
    col(
        "scopes",
        "text[] NOT NULL DEFAULT '{}'",
        Kind::Scopes,
        |r| Box::new(r.scopes.clone()),
    ),
    col("user_name", "text", Kind::Text, |r| {
        Box::new(r.user_name.clone())
    }),
    col("user_email", "text", Kind::Text, |r| {
        Box::new(r.user_email.clone())
    }),
    col("avatar_url", "text", Kind::Text, |r| {
        Box::new(r.avatar_url.clone())
    }),
];

/// The plaintext token columns of the Python service's table, read by the import only.
const PLAIN_TOKEN_COLUMNS: [&str; 2] = ["access_token", "refresh_token"];

/// Migration 1: the table and its indexes.
fn create_table_sql() -> String {
    let cols: Vec<String> = COLUMNS
        .iter()
        .map(|c| format!("        {} {},\n", c.name, c.ddl))
        .collect();
    format!(
        "CREATE TABLE IF NOT EXISTS user_auth_sessions (\n{}        exported_at timestamptz NOT NULL DEFAULT now()\n    );
    CREATE INDEX IF NOT EXISTS idx_auth_session_user ON user_auth_sessions (app_id, user_id);
    CREATE INDEX IF NOT EXISTS idx_auth_session_token_expires ON user_auth_sessions (token_expires_at);
    CREATE INDEX IF NOT EXISTS idx_auth_session_open_id ON user_auth_sessions (open_id);",
        cols.concat()
    )
}

/// Migration 2: the table becomes a superset of the Python deployment's `user_auth_sessions`
/// (so its guide's SQL and operators' reports keep working), whichever of the two it was.
///
/// - This export's older table gains the Python columns: `id` (serial), `auth_method`,
///   `redirect_uri`, `mobile`, `email`, `user_access_token` (always NULL: plaintext is never
///   exported), `completed_at`, `message_id`; its `created_at`, `expires_at` and
///   `token_expires_at` become `timestamp` (UTC) like the Python table's.
/// - The Python table gains this export's columns (nullable: its own rows have no value), its
///   `varchar(n)` columns become `text` (no rewrite; this service's ids may be longer), the
///   columns this export may leave NULL lose `NOT NULL`, `id` gets a default if it has none,
///   and `session_id` a unique index if it has none (the upsert's conflict target).
/// - Both get the guide's indexes, `idx_auth_session_open_id` included.
///
/// It runs in the migration transaction: all of it or nothing.
const MIGRATION_2: &str = r"
ALTER TABLE user_auth_sessions
    ADD COLUMN IF NOT EXISTS user_id text,
    ADD COLUMN IF NOT EXISTS failure_reason text,
    ADD COLUMN IF NOT EXISTS card_message_id text,
    ADD COLUMN IF NOT EXISTS updated_at timestamptz,
    ADD COLUMN IF NOT EXISTS access_token_ct bytea,
    ADD COLUMN IF NOT EXISTS refresh_token_ct bytea,
    ADD COLUMN IF NOT EXISTS token_key_id text,
    ADD COLUMN IF NOT EXISTS refresh_token_expires_at timestamptz,
    ADD COLUMN IF NOT EXISTS scopes text[] DEFAULT '{}',
    ADD COLUMN IF NOT EXISTS user_name text,
    ADD COLUMN IF NOT EXISTS user_email text,
    ADD COLUMN IF NOT EXISTS avatar_url text,
    ADD COLUMN IF NOT EXISTS exported_at timestamptz DEFAULT now(),
    ADD COLUMN IF NOT EXISTS auth_method text,
    ADD COLUMN IF NOT EXISTS redirect_uri text,
    ADD COLUMN IF NOT EXISTS mobile text,
    ADD COLUMN IF NOT EXISTS email text,
    ADD COLUMN IF NOT EXISTS user_access_token text,
    ADD COLUMN IF NOT EXISTS token_expires_at timestamp,
    ADD COLUMN IF NOT EXISTS completed_at timestamp,
    ADD COLUMN IF NOT EXISTS message_id text;
DO $$
DECLARE
    c record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema()
            AND table_name = 'user_auth_sessions' AND column_name = 'id') THEN
        ALTER TABLE user_auth_sessions ADD COLUMN id serial;
    END IF;
    IF (SELECT column_default FROM information_schema.columns WHERE table_schema = current_schema()
            AND table_name = 'user_auth_sessions' AND column_name = 'id') IS NULL THEN
        CREATE SEQUENCE IF NOT EXISTS user_auth_sessions_id_seq OWNED BY user_auth_sessions.id;
        PERFORM setval('user_auth_sessions_id_seq',
            COALESCE((SELECT max(id) FROM user_auth_sessions), 0) + 1, false);
        ALTER TABLE user_auth_sessions ALTER COLUMN id SET DEFAULT nextval('user_auth_sessions_id_seq');
    END IF;
    FOR c IN SELECT column_name, data_type, is_nullable FROM information_schema.columns
            WHERE table_schema = current_schema() AND table_name = 'user_auth_sessions' LOOP
        IF c.data_type = 'character varying' THEN
            EXECUTE format('ALTER TABLE user_auth_sessions ALTER COLUMN %I TYPE text', c.column_name);
        END IF;
        IF c.data_type = 'timestamp with time zone'
                AND c.column_name IN ('created_at', 'expires_at', 'token_expires_at', 'completed_at') THEN
            EXECUTE format('ALTER TABLE user_auth_sessions ALTER COLUMN %I TYPE timestamp USING %I AT TIME ZONE ''UTC''',
                c.column_name, c.column_name);
        END IF;
        IF c.is_nullable = 'NO' AND c.column_name NOT IN
                ('id', 'session_id', 'app_id', 'user_id', 'state', 'created_at', 'updated_at', 'expires_at', 'scopes', 'exported_at') THEN
            EXECUTE format('ALTER TABLE user_auth_sessions ALTER COLUMN %I DROP NOT NULL', c.column_name);
        END IF;
    END LOOP;
    IF NOT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a
            ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
            WHERE i.indrelid = 'user_auth_sessions'::regclass AND i.indisunique
            AND i.indnatts = 1 AND a.attname = 'session_id') THEN
        CREATE UNIQUE INDEX idx_auth_session_session_id ON user_auth_sessions (session_id);
    END IF;
END $$;
CREATE INDEX IF NOT EXISTS idx_auth_session_open_id ON user_auth_sessions (open_id);
CREATE INDEX IF NOT EXISTS idx_auth_session_state ON user_auth_sessions (state);
CREATE INDEX IF NOT EXISTS idx_auth_session_expires ON user_auth_sessions (expires_at);
CREATE INDEX IF NOT EXISTS idx_auth_session_created ON user_auth_sessions (created_at DESC);
";

/// Embedded migrations, applied in order, each once.
fn migrations() -> Vec<(i32, String)> {
    vec![(1, create_table_sql()), (2, MIGRATION_2.to_owned())]
}

/// The columns a table named `user_auth_sessions` must have for the export to take it over (it
/// is this export's or the Python deployment's); any other table is left alone.
const TAKEN_OVER_NEEDS: [&str; 3] = ["session_id", "app_id", "state"];

/// Stops before migrating a `user_auth_sessions` that is neither this export's table nor the
/// Python deployment's.
async fn check_existing_table(tx: &tokio_postgres::Transaction<'_>) -> Result<()> {
    let cols: Vec<String> = tx
        .query(
            "SELECT column_name::text FROM information_schema.columns
             WHERE table_name = 'user_auth_sessions' AND table_schema = current_schema()",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.try_get::<_, String>(0))
        .collect::<std::result::Result<_, _>>()?;
    if cols.is_empty() {
        return Ok(());
    }
    let ours_or_python = cols
        .iter()
        .any(|c| c == "access_token_ct" || c == "user_access_token");
    let missing = TAKEN_OVER_NEEDS
        .iter()
        .find(|n| !cols.iter().any(|c| c == *n));
    match (ours_or_python, missing) {
        (true, None) => Ok(()),
        (_, Some(m)) => Err(ExportError::Schema(format!(
            "a table user_auth_sessions exists that is neither this service's export nor the \
             Python deployment's (it has no column {m}); nothing was changed: export into another \
             database or schema, or rename that table"
        ))),
        (false, None) => Err(ExportError::Schema(
            "a table user_auth_sessions exists that is neither this service's export nor the \
             Python deployment's (no access_token_ct or user_access_token column); nothing was \
             changed: export into another database or schema, or rename that table"
                .to_owned(),
        )),
    }
}

/// Connects (TLS per the URL's `sslmode`, verified with `net`'s trust) and drives the
/// connection on a task.
pub async fn connect(url: &str, net: &Net) -> Result<Client> {
    crate::net::postgres::connect_pg(url, net)
        .await
        .map_err(pg_connect_error)
}

fn pg_connect_error(e: crate::net::postgres::PgConnectError) -> ExportError {
    match e {
        crate::net::postgres::PgConnectError::Setup(msg) => ExportError::Connect(msg),
        crate::net::postgres::PgConnectError::Pg(e) => ExportError::Pg(e),
    }
}

/// Parses a `postgres://` URL or key-value string, mapping libpq's `sslmode=verify-ca` /
/// `verify-full` to `require` (rustls always verifies the chain and the host name).
pub fn pg_config(url: &str) -> Result<tokio_postgres::Config> {
    crate::net::postgres::pg_config(url).map_err(pg_connect_error)
}

/// Applies the embedded migrations not yet applied (under an advisory lock).
pub async fn migrate(client: &mut Client) -> Result<()> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(7482917301)", &[])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS lark_service_migrations (
            version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let applied = tx
        .query_opt(
            "SELECT 1 FROM lark_service_migrations WHERE version = 2",
            &[],
        )
        .await?
        .is_some();
    if !applied {
        check_existing_table(&tx).await?;
    }
    for (version, sql) in migrations() {
        let done = tx
            .query_opt(
                "SELECT 1 FROM lark_service_migrations WHERE version = $1",
                &[&version],
            )
            .await?
            .is_some();
        if !done {
            tx.batch_execute(&sql).await?;
            tx.execute(
                "INSERT INTO lark_service_migrations (version) VALUES ($1)",
                &[&version],
            )
            .await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The upsert of one export row: every column of [`COLUMNS`], in order, as `$1`, `$2`, ….
fn upsert_sql() -> String {
    let names: Vec<&str> = COLUMNS.iter().map(|c| c.name).collect();
    let values: Vec<String> = (1..)
        .zip(COLUMNS)
        .map(|(i, c)| match c.kind {
            Kind::Time => format!("'epoch'::timestamptz + ${i}::bigint * interval '1 millisecond'"),
            Kind::NaiveTime => {
                format!("'epoch'::timestamp + ${i}::bigint * interval '1 millisecond'")
            }
            Kind::Text | Kind::Bytes | Kind::Scopes => format!("${i}"),
        })
        .collect();
    let mut updates: Vec<String> = COLUMNS
        .iter()
        .filter(|c| c.name != "session_id")
        .map(|c| format!("{0} = EXCLUDED.{0}", c.name))
        .collect();
    // The Python deployment's columns (migration 2), from the same parameters.
    let param = |name: &str| {
        (1..)
            .zip(COLUMNS)
            .find(|(_, c)| c.name == name)
            .map_or_else(|| "NULL".to_owned(), |(i, _)| format!("${i}"))
    };
    let python = [
        ("email", param("user_email")),
        ("message_id", param("card_message_id")),
        (
            "completed_at",
            format!(
                "CASE WHEN {}::text = 'completed' THEN 'epoch'::timestamp + {}::bigint * interval '1 millisecond' END",
                param("state"),
                param("updated_at")
            ),
        ),
        // Never plaintext.
        ("user_access_token", "NULL".to_owned()),
    ];
    let mut names = names;
    let mut values = values;
    for (name, value) in python {
        names.push(name);
        values.push(value);
        updates.push(format!("{name} = EXCLUDED.{name}"));
    }
    format!(
        "INSERT INTO user_auth_sessions ({}, exported_at) VALUES ({}, now()) \
         ON CONFLICT (session_id) DO UPDATE SET {}, exported_at = now()",
        names.join(", "),
        values.join(", "),
        updates.join(", ")
    )
}

/// A session id as the Python deployment wrote its ids (`8-4-4-4-12`).
fn dashed_uuid(id: SessionId) -> String {
    let h = id.to_string();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Upserts `rows` and deletes `deleted` in one transaction. Idempotent.
pub async fn write_batch(
    client: &mut Client,
    rows: &[ExportRow],
    deleted: &[SessionId],
) -> Result<()> {
    let tx = client.transaction().await?;
    let upsert = tx.prepare(&upsert_sql()).await?;
    let mut futs = Vec::with_capacity(rows.len());
    for r in rows {
        let params: Vec<Param> = COLUMNS.iter().map(|c| (c.value)(r)).collect();
        let tx = &tx;
        let upsert = &upsert;
        futs.push(async move {
            let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                .iter()
                .map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect();
            tx.execute(upsert, &refs).await
        });
    }
    // The Python deployment's row of a session (its id written as a dashed UUID, imported by
    // `import python`) is replaced by this export's: one row per session, no plaintext left.
    let dashed: Vec<String> = rows
        .iter()
        .map(|r| r.session_id)
        .chain(deleted.iter().copied())
        .map(dashed_uuid)
        .collect();
    tx.execute(
        "DELETE FROM user_auth_sessions WHERE session_id = ANY($1)",
        &[&dashed],
    )
    .await?;
    // Pipelined: the statements go out together.
    futures_util::future::try_join_all(futs).await?;
    if !deleted.is_empty() {
        let ids: Vec<String> = deleted.iter().map(ToString::to_string).collect();
        tx.execute(
            "DELETE FROM user_auth_sessions WHERE session_id = ANY($1)",
            &[&ids],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// One-shot export of every session; then the cursor is set to the last change seq seen
/// before the copy began (so a continuous export resumes without missing anything).
/// Returns the number of rows written.
pub async fn export_all(store: &Db, url: &str, net: &Net) -> Result<u64> {
    let mut client = connect(url, net).await?;
    migrate(&mut client).await?;
    copy_all(store, &mut client).await
}

/// Copies every session, then moves the cursor to the last change seq seen before the copy
/// began (never back). Returns the number of rows written.
async fn copy_all(store: &Db, client: &mut Client) -> Result<u64> {
    let start_seq = store.run(crate::storage::Db::last_change_seq).await?;
    let mut after = None;
    let mut n = 0u64;
    loop {
        let rows = store
            .run(move |s| s.export_rows_after(after, BATCH))
            .await?;
        let Some(last) = rows.last() else { break };
        after = Some(last.session_id);
        write_batch(client, &rows, &[]).await?;
        n += rows.len() as u64;
    }
    let cur = store.run(|s| s.cursor(CURSOR)).await?.unwrap_or(0);
    if start_seq > cur {
        store.run(move |s| s.set_cursor(CURSOR, start_seq)).await?;
    }
    Ok(n)
}

/// One batch of the continuous export: reads changes after the cursor, writes them, stores the
/// cursor. Returns how many changes it handled (0: caught up).
pub async fn export_changes_once(store: &Db, client: &mut Client) -> Result<usize> {
    let cursor = store.run(|s| s.cursor(CURSOR)).await?.unwrap_or(0);
    let complete_from = store
        .run(crate::storage::Db::change_feed_complete_from)
        .await?;
    if cursor < complete_from {
        // The feed was off for a while (no exporter configured): what changed then is not in
        // it. Copy every session once; the cursor then starts where the copy did.
        let n = copy_all(store, client).await?;
        return Ok(usize::try_from(n).unwrap_or(usize::MAX).max(1));
    }
    let changes = store.run(move |s| s.changes_after(cursor, BATCH)).await?;
    let Some(&(last_seq, _, _)) = changes.last() else {
        let last = store.run(crate::storage::Db::last_change_seq).await?;
        crate::metrics::get()
            .export_lag
            .set(i64::try_from(last.saturating_sub(cursor)).unwrap_or(i64::MAX));
        return Ok(0);
    };
    // The newest kind of each session wins within the batch.
    let mut latest: HashMap<SessionId, ChangeKind> = HashMap::new();
    for (_, kind, id) in &changes {
        latest.insert(*id, *kind);
    }
    let upsert_ids: Vec<SessionId> = latest
        .iter()
        .filter(|(_, k)| **k == ChangeKind::Upsert)
        .map(|(id, _)| *id)
        .collect();
    let mut deleted: Vec<SessionId> = latest
        .iter()
        .filter(|(_, k)| **k == ChangeKind::Delete)
        .map(|(id, _)| *id)
        .collect();
    let ids = upsert_ids.clone();
    let rows = store.run(move |s| s.export_rows(&ids)).await?;
    let mut present = Vec::with_capacity(rows.len());
    for (id, row) in upsert_ids.iter().zip(rows) {
        match row {
            Some(r) => present.push(r),
            // Gone since (purged later in the feed, or before we read it): delete downstream.
            None => deleted.push(*id),
        }
    }
    write_batch(client, &present, &deleted).await?;
    store.run(move |s| s.set_cursor(CURSOR, last_seq)).await?;
    let m = crate::metrics::get();
    m.export_rows.inc_by((present.len() + deleted.len()) as u64);
    let last = store.run(crate::storage::Db::last_change_seq).await?;
    m.export_lag
        .set(i64::try_from(last.saturating_sub(last_seq)).unwrap_or(i64::MAX));
    Ok(changes.len())
}

/// One step of the continuous export: (re)connects and migrates if needed, then exports one
/// batch. On error the connection is dropped (the next step reconnects) and the error counted.
pub async fn step(
    store: &Db,
    url: &SecretString,
    net: &Net,
    client: &mut Option<Client>,
) -> Result<usize> {
    use secrecy::ExposeSecret;
    let r = async {
        if client.as_ref().is_none_or(Client::is_closed) {
            let mut c = connect(url.expose_secret(), net).await?;
            migrate(&mut c).await?;
            *client = Some(c);
        }
        match client.as_mut() {
            Some(c) => export_changes_once(store, c).await,
            None => Ok(0),
        }
    }
    .await;
    if r.is_err() {
        crate::metrics::get().export_errors.inc();
        *client = None;
    }
    r
}

/// The continuous export as a supervised worker (`crate::workers`): each run exports one batch;
/// a failed run (PostgreSQL down) makes the supervisor back off and retry. `idle` is the poll
/// interval once caught up.
pub fn worker(store: Db, url: SecretString, net: Net, idle: Duration) -> crate::workers::WorkerFn {
    let state = std::sync::Arc::new(tokio::sync::Mutex::new(None::<Client>));
    Box::new(move || {
        let (store, url, net, state) = (store.clone(), url.clone(), net.clone(), state.clone());
        Box::pin(async move {
            let mut client = state.lock().await;
            match step(&store, &url, &net, &mut client).await {
                Ok(0) => Ok(idle),
                Ok(_) => Ok(Duration::ZERO),
                Err(e) => Err(format!("postgresql export paused: {e}")),
            }
        })
    })
}

/// The continuous export until `cancel`, with its own capped exponential backoff
/// (`backoff` … 60 s) while PostgreSQL is unreachable (the daemon uses [`worker`] instead).
pub async fn run_continuous(
    store: Db,
    url: SecretString,
    net: Net,
    idle: Duration,
    first_backoff: Duration,
    cancel: CancellationToken,
) {
    let schedule = Backoff::new(first_backoff, Duration::from_secs(60));
    let mut failures: u32 = 0;
    let mut client: Option<Client> = None;
    while !cancel.is_cancelled() {
        let wait = match step(&store, &url, &net, &mut client).await {
            Ok(0) => {
                failures = 0;
                idle
            }
            Ok(_) => {
                failures = 0;
                continue;
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let backoff = schedule.delay(failures);
                tracing::warn!(error = %e, retry_in = ?backoff, "postgresql export paused");
                backoff
            }
        };
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Imports every row of `user_auth_sessions` at `url` into `store`: sealed token columns (this
/// export's shape) are opened with the store's key ring and re-sealed under its active key;
/// plaintext `access_token` / `refresh_token` columns (the Python service's shape) are sealed.
/// Returns the number of sessions imported.
pub async fn import_all(store: &Db, url: &str, net: &Net) -> Result<u64> {
    let client = connect(url, net).await?;
    let cols = table_columns(&client).await?;
    if cols.is_empty() {
        return Err(ExportError::Import(
            "no table user_auth_sessions in the current schema".to_owned(),
        ));
    }
    let has = |c: &str| cols.iter().any(|x| x == c);
    if is_python_table(&cols) {
        return Err(ExportError::Import(PYTHON_TABLE.to_owned()));
    }
    let mut sql = import_sql(&cols);
    if has("user_access_token") && has("updated_at") {
        // The Python table migrated in place by the export: its own rows (no `updated_at`)
        // are `import python`'s; the export's rows are this import's.
        sql.push_str(" WHERE updated_at IS NOT NULL");
    }
    let rows = client.query(sql.as_str(), &[]).await?;
    let mut batch = Vec::with_capacity(BATCH);
    let mut n = 0u64;
    for (i, r) in rows.iter().enumerate() {
        let fields = ImportFields::read(r, i + 1)?;
        batch.push(import_session(store, fields)?);
        if batch.len() == BATCH {
            n += flush(store, &mut batch).await?;
        }
    }
    n += flush(store, &mut batch).await?;
    Ok(n)
}

/// The column names of `user_auth_sessions` in the current schema (empty: no such table).
pub(super) async fn table_columns(client: &Client) -> Result<Vec<String>> {
    Ok(client
        .query(
            "SELECT column_name::text FROM information_schema.columns
             WHERE table_name = 'user_auth_sessions' AND table_schema = current_schema()",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.try_get::<_, String>(0))
        .collect::<std::result::Result<Vec<String>, _>>()?)
}

/// What `import postgres` says of the Python deployment's own table.
const PYTHON_TABLE: &str = "this is the Python deployment's table (integer id, plaintext \
    user_access_token, no sealed token columns): use `lark-service import python`";

/// The Python deployment's table, not migrated by this export: it has the plaintext
/// `user_access_token` and none of the sealed token columns.
fn is_python_table(cols: &[String]) -> bool {
    let has = |c: &str| cols.iter().any(|x| x == c);
    has("user_access_token") && !has("access_token_ct")
}

/// The import's query over a table that has the columns `present`: every column of
/// [`COLUMNS`] and the plaintext token columns, each under its own name, `NULL` when absent.
fn import_sql(present: &[String]) -> String {
    let has = |c: &str| present.iter().any(|x| x == c);
    let mut exprs: Vec<String> = COLUMNS
        .iter()
        .map(|c| {
            let expr = match (has(c.name), c.kind) {
                (false, Kind::Time | Kind::NaiveTime) => "NULL::bigint".to_owned(),
                (false, Kind::Bytes) => "NULL::bytea".to_owned(),
                (false, Kind::Text | Kind::Scopes) => "NULL::text".to_owned(),
                // A naive `timestamp`'s epoch is taken as UTC, as it was written.
                (true, Kind::Time | Kind::NaiveTime) => {
                    format!("(extract(epoch from {}) * 1000)::bigint", c.name)
                }
                (true, Kind::Bytes) => c.name.to_owned(),
                // text[] here; the Python table may hold a JSON or space-separated text.
                (true, Kind::Text | Kind::Scopes) => format!("{}::text", c.name),
            };
            format!("{expr} AS {}", c.name)
        })
        .collect();
    for c in PLAIN_TOKEN_COLUMNS {
        let expr = if has(c) {
            format!("{c}::text")
        } else {
            "NULL::text".to_owned()
        };
        exprs.push(format!("{expr} AS {c}"));
    }
    format!("SELECT {} FROM user_auth_sessions", exprs.join(", "))
}

/// Reads one column of an imported row by name; a value of the wrong type is an error naming
/// the row and the column (never a panic).
fn column<'r, T: tokio_postgres::types::FromSql<'r>>(
    r: &'r tokio_postgres::Row,
    row: &str,
    name: &'static str,
) -> Result<T> {
    r.try_get(name).map_err(|e| ExportError::BadColumn {
        row: row.to_owned(),
        column: name,
        detail: e.to_string(),
    })
}

/// The columns of one imported row, as read from PostgreSQL (nothing decided yet).
#[derive(Debug, Default)]
struct ImportFields {
    /// `row <n>` (from 1), for errors before the session id is known.
    row: String,
    session_id: Option<String>,
    app_id: Option<String>,
    user_id: Option<String>,
    open_id: Option<String>,
    union_id: Option<String>,
    state: Option<String>,
    failure_reason: Option<String>,
    card_message_id: Option<String>,
    created_at: Option<i64>,
    updated_at: Option<i64>,
    expires_at: Option<i64>,
    access_token_ct: Option<Vec<u8>>,
    refresh_token_ct: Option<Vec<u8>>,
    token_key_id: Option<String>,
    token_expires_at: Option<i64>,
    refresh_token_expires_at: Option<i64>,
    scopes: Option<String>,
    user_name: Option<String>,
    user_email: Option<String>,
    avatar_url: Option<String>,
    access_token: Option<String>,
    refresh_token: Option<String>,
}

impl ImportFields {
    /// Reads row number `n` (from 1) of the import query ([`import_sql`]).
    fn read(r: &tokio_postgres::Row, n: usize) -> Result<Self> {
        let row = format!("row {n}");
        let c = |name| column::<Option<String>>(r, &row, name);
        let t = |name| column::<Option<i64>>(r, &row, name);
        let b = |name| column::<Option<Vec<u8>>>(r, &row, name);
        Ok(Self {
            session_id: c("session_id")?,
            app_id: c("app_id")?,
            user_id: c("user_id")?,
            open_id: c("open_id")?,
            union_id: c("union_id")?,
            state: c("state")?,
            failure_reason: c("failure_reason")?,
            card_message_id: c("card_message_id")?,
            created_at: t("created_at")?,
            updated_at: t("updated_at")?,
            expires_at: t("expires_at")?,
            access_token_ct: b("access_token_ct")?,
            refresh_token_ct: b("refresh_token_ct")?,
            token_key_id: c("token_key_id")?,
            token_expires_at: t("token_expires_at")?,
            refresh_token_expires_at: t("refresh_token_expires_at")?,
            scopes: c("scopes")?,
            user_name: c("user_name")?,
            user_email: c("user_email")?,
            avatar_url: c("avatar_url")?,
            access_token: c("access_token")?,
            refresh_token: c("refresh_token")?,
            row,
        })
    }
}

async fn flush(store: &Db, batch: &mut Vec<crate::storage::AuthSession>) -> Result<u64> {
    let b = std::mem::take(batch);
    let n = b.len() as u64;
    if n > 0 {
        store.run(move |s| s.put_sessions(&b)).await?;
    }
    Ok(n)
}

fn parse_scopes(s: Option<String>) -> Vec<String> {
    let Some(s) = s else { return Vec::new() };
    let t = s.trim();
    if let Ok(v) = serde_json::from_str::<Vec<String>>(t) {
        return v;
    }
    let t = t.trim_start_matches('{').trim_end_matches('}');
    t.split([',', ' '])
        .map(|x| x.trim().trim_matches('"').to_owned())
        .filter(|x| !x.is_empty())
        .collect()
}

/// A required column's value, or an error naming the row and the column.
fn required(v: Option<String>, row: &str, column: &'static str) -> Result<String> {
    v.ok_or_else(|| ExportError::BadColumn {
        row: row.to_owned(),
        column,
        detail: "missing or NULL, and it is required".to_owned(),
    })
}

/// The session of one imported row: a pure conversion (no PostgreSQL), apart from opening
/// sealed token columns with the store's keys.
fn import_session(store: &Db, f: ImportFields) -> Result<crate::storage::AuthSession> {
    let raw_id = required(f.session_id, &f.row, "session_id")?;
    let id: SessionId = raw_id
        .replace('-', "")
        .to_ascii_lowercase()
        .parse()
        .map_err(|e| ExportError::BadColumn {
            row: f.row.clone(),
            column: "session_id",
            detail: format!("{raw_id:?}: {e}"),
        })?;
    let row = format!("session {id}");
    let state_s = required(f.state, &row, "state")?;
    let state: SessionState =
        state_s
            .to_ascii_lowercase()
            .parse()
            .map_err(|e: crate::storage::Error| ExportError::BadColumn {
                row: row.clone(),
                column: "state",
                detail: e.to_string(),
            })?;
    let failure_reason = f.failure_reason.and_then(|r| {
        let r = r.to_ascii_lowercase();
        FailureReason::ALL.into_iter().find(|x| x.as_str() == r)
    });
    let t = |v: Option<i64>| v.map(|v| u64::try_from(v).unwrap_or(0));
    let key_id = f.token_key_id;
    let token = |field: &'static str, ct: Option<Vec<u8>>, plain: Option<String>| -> Result<_> {
        let it = match (ct, plain) {
            (Some(bytes), _) => ImportToken::Sealed(ExportToken {
                key_id: key_id.clone().ok_or_else(|| ExportError::BadColumn {
                    row: row.clone(),
                    column: "token_key_id",
                    detail: format!("NULL while {field}_ct is set"),
                })?,
                bytes,
            }),
            (None, Some(p)) if !p.is_empty() => ImportToken::Plain(SecretString::from(p)),
            _ => return Ok(None),
        };
        Ok(Some(store.open_imported_token(id, field, it)?))
    };
    let access_token = token("access_token", f.access_token_ct, f.access_token)?;
    let refresh_token = token("refresh_token", f.refresh_token_ct, f.refresh_token)?;
    let created_at = t(f.created_at).unwrap_or(0);
    Ok(crate::storage::AuthSession {
        session_id: id,
        app_id: required(f.app_id, &row, "app_id")?,
        user_id: required(f.user_id, &row, "user_id")?,
        open_id: f.open_id,
        union_id: f.union_id,
        state,
        failure_reason,
        card_message_id: f.card_message_id,
        created_at,
        updated_at: t(f.updated_at).unwrap_or(created_at),
        expires_at: t(f.expires_at).unwrap_or(created_at),
        access_token,
        refresh_token,
        token_expires_at: t(f.token_expires_at),
        refresh_token_expires_at: t(f.refresh_token_expires_at),
        scopes: parse_scopes(f.scopes),
        user_name: f.user_name,
        user_email: f.user_email,
        avatar_url: f.avatar_url,
        state_hash: None,
        pkce_verifier: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Store;
    use crate::storage::{Key, Keyring, StoreOptions};

    /// The table as migration 1 created it in every released version: generating it from
    /// [`COLUMNS`] must not change it (it runs once per database).
    const RELEASED_MIGRATION_1: &str = "CREATE TABLE IF NOT EXISTS user_auth_sessions (
        session_id text PRIMARY KEY,
        app_id text NOT NULL,
        user_id text NOT NULL,
        open_id text,
        union_id text,
        state text NOT NULL,
        failure_reason text,
        card_message_id text,
        created_at timestamptz NOT NULL,
        updated_at timestamptz NOT NULL,
        expires_at timestamptz NOT NULL,
        access_token_ct bytea,
        refresh_token_ct bytea,
        token_key_id text,
        token_expires_at timestamptz,
        refresh_token_expires_at timestamptz,
        scopes text[] NOT NULL DEFAULT '{}',
        user_name text,
        user_email text,
        avatar_url text,
        exported_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX IF NOT EXISTS idx_auth_session_user ON user_auth_sessions (app_id, user_id);
    CREATE INDEX IF NOT EXISTS idx_auth_session_token_expires ON user_auth_sessions (token_expires_at);
    CREATE INDEX IF NOT EXISTS idx_auth_session_open_id ON user_auth_sessions (open_id);";

    #[test]
    fn the_generated_table_is_the_released_migration_1() {
        assert_eq!(create_table_sql(), RELEASED_MIGRATION_1);
    }

    #[test]
    fn the_upsert_binds_every_column_once_in_order() {
        let sql = upsert_sql();
        for (i, c) in (1..).zip(COLUMNS) {
            assert!(
                sql.contains(&format!("${i}")),
                "{} has no parameter",
                c.name
            );
            if c.name != "session_id" {
                assert!(
                    sql.contains(&format!("{0} = EXCLUDED.{0}", c.name)),
                    "{}",
                    c.name
                );
            }
        }
        assert!(!sql.contains(&format!("${}", COLUMNS.len() + 1)));
        let row = ExportRow {
            session_id: SessionId(1),
            app_id: "a".into(),
            user_id: "u".into(),
            open_id: None,
            union_id: None,
            state: SessionState::Pending,
            failure_reason: None,
            card_message_id: None,
            created_at: 1,
            updated_at: 2,
            expires_at: 3,
            access_token: None,
            refresh_token: None,
            token_expires_at: None,
            refresh_token_expires_at: None,
            scopes: vec![],
            user_name: None,
            user_email: None,
            avatar_url: None,
            state_hash: None,
            pkce_verifier: None,
        };
        let bound: Vec<(&str, String)> = COLUMNS
            .iter()
            .map(|c| (c.name, format!("{:?}", (c.value)(&row))))
            .collect();
        assert_eq!(bound.len(), 20);
        for (name, want) in [
            ("session_id", "\"00000000000000000000000000000001\""),
            ("app_id", "\"a\""),
            ("user_id", "\"u\""),
            ("state", "\"pending\""),
            ("created_at", "1"),
            ("updated_at", "2"),
            ("expires_at", "3"),
            ("access_token_ct", "None"),
            ("token_key_id", "None"),
            ("scopes", "[]"),
        ] {
            assert!(
                bound.contains(&(name, want.to_owned())),
                "{name}: {bound:?}"
            );
        }
    }

    #[test]
    fn the_import_query_names_every_column_and_nulls_the_absent_ones() {
        let sql = import_sql(&[
            "session_id".into(),
            "created_at".into(),
            "access_token".into(),
        ]);
        assert!(sql.contains("session_id::text AS session_id"));
        assert!(sql.contains("(extract(epoch from created_at) * 1000)::bigint AS created_at"));
        assert!(sql.contains("NULL::bytea AS access_token_ct"));
        assert!(sql.contains("access_token::text AS access_token"));
        assert!(sql.contains("NULL::text AS refresh_token"));
        for c in COLUMNS {
            assert!(sql.contains(&format!(" AS {}", c.name)), "{}", c.name);
        }
    }

    fn store() -> Db {
        Store::open_in_memory(
            Keyring::new(Key::from_bytes(&[2; 32]), vec![]),
            StoreOptions::default(),
        )
        .unwrap()
        .into()
    }

    fn fields() -> ImportFields {
        ImportFields {
            row: "row 3".into(),
            session_id: Some("0123456789abcdef0123456789ABCDEF".into()),
            app_id: Some("cli_a".into()),
            user_id: Some("u1".into()),
            state: Some("COMPLETED".into()),
            created_at: Some(5),
            scopes: Some("{a,b}".into()),
            access_token: Some("plain-token".into()),
            ..ImportFields::default()
        }
    }

    fn bad_column(e: ExportError) -> (String, &'static str) {
        match e {
            ExportError::BadColumn { row, column, .. } => (row, column),
            other => (format!("not a BadColumn: {other}"), ""),
        }
    }

    #[test]
    fn an_imported_row_becomes_a_session() {
        let s = import_session(&store(), fields()).unwrap();
        assert_eq!(s.session_id.to_string(), "0123456789abcdef0123456789abcdef");
        assert_eq!((s.app_id.as_str(), s.user_id.as_str()), ("cli_a", "u1"));
        assert_eq!(s.state, SessionState::Completed);
        assert_eq!((s.created_at, s.updated_at, s.expires_at), (5, 5, 5));
        assert_eq!(s.scopes, vec!["a", "b"]);
        assert_eq!(
            s.access_token
                .as_ref()
                .map(secrecy::ExposeSecret::expose_secret),
            Some("plain-token")
        );
    }

    #[test]
    fn a_bad_imported_row_names_the_row_and_the_column() {
        let st = store();
        let e = import_session(
            &st,
            ImportFields {
                session_id: None,
                ..fields()
            },
        )
        .unwrap_err();
        assert_eq!(bad_column(e), ("row 3".into(), "session_id"));
        let e = import_session(
            &st,
            ImportFields {
                session_id: Some("nope".into()),
                ..fields()
            },
        )
        .unwrap_err();
        assert_eq!(bad_column(e), ("row 3".into(), "session_id"));
        let id = "session 0123456789abcdef0123456789abcdef".to_owned();
        let e = import_session(
            &st,
            ImportFields {
                app_id: None,
                ..fields()
            },
        )
        .unwrap_err();
        assert_eq!(bad_column(e), (id.clone(), "app_id"));
        let e = import_session(
            &st,
            ImportFields {
                user_id: None,
                ..fields()
            },
        )
        .unwrap_err();
        assert_eq!(bad_column(e), (id.clone(), "user_id"));
        let e = import_session(
            &st,
            ImportFields {
                state: Some("sleeping".into()),
                ..fields()
            },
        )
        .unwrap_err();
        assert_eq!(bad_column(e), (id.clone(), "state"));
        let e = import_session(
            &st,
            ImportFields {
                access_token_ct: Some(vec![0; 64]),
                token_key_id: None,
                ..fields()
            },
        )
        .unwrap_err();
        assert_eq!(bad_column(e), (id, "token_key_id"));
        let msg = import_session(
            &st,
            ImportFields {
                app_id: None,
                ..fields()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("session 0123456789abcdef0123456789abcdef") && msg.contains("app_id"),
            "{msg}"
        );
    }
}
