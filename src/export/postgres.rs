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

use crate::net::Net;
use tokio_util::sync::CancellationToken;

use crate::storage::{
    ChangeKind, ExportRow, ExportToken, FailureReason, ImportToken, SessionId, SessionState, Store,
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
    /// The URL or the TLS setup cannot be used (never contains the URL's password).
    #[error("postgresql: {0}")]
    Connect(String),
}

type Result<T> = std::result::Result<T, ExportError>;

/// Embedded migrations, applied in order, each once.
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    "CREATE TABLE IF NOT EXISTS user_auth_sessions (
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
    CREATE INDEX IF NOT EXISTS idx_auth_session_open_id ON user_auth_sessions (open_id);",
)];

/// Connects (TLS per the URL's `sslmode`, verified with `net`'s trust) and drives the
/// connection on a task.
pub async fn connect(url: &str, net: &Net) -> Result<Client> {
    let cfg = pg_config(url)?;
    let tls = net
        .postgres_tls()
        .map_err(|e| ExportError::Connect(e.to_string()))?;
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "the server".to_owned(),
    };
    let (client, conn) = cfg.connect(tls).await.map_err(|e| {
        match crate::net::tls::untrusted_certificate(&e, &host) {
            Some(msg) => ExportError::Connect(msg),
            None => ExportError::Pg(e),
        }
    })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "postgresql connection ended");
        }
    });
    Ok(client)
}

/// Parses a `postgres://` URL or key-value string, mapping libpq's `sslmode=verify-ca` /
/// `verify-full` to `require` (rustls always verifies the chain and the host name).
pub fn pg_config(url: &str) -> Result<tokio_postgres::Config> {
    let text = url
        .replace("sslmode=verify-full", "sslmode=require")
        .replace("sslmode=verify-ca", "sslmode=require");
    text.parse::<tokio_postgres::Config>()
        .map_err(|e| ExportError::Connect(format!("the connection URL cannot be used: {e}")))
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
    for (version, sql) in MIGRATIONS {
        let done = tx
            .query_opt(
                "SELECT 1 FROM lark_service_migrations WHERE version = $1",
                &[version],
            )
            .await?
            .is_some();
        if !done {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO lark_service_migrations (version) VALUES ($1)",
                &[version],
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

const UPSERT: &str = "INSERT INTO user_auth_sessions (
    session_id, app_id, user_id, open_id, union_id, state, failure_reason, card_message_id,
    created_at, updated_at, expires_at, access_token_ct, refresh_token_ct, token_key_id,
    token_expires_at, refresh_token_expires_at, scopes, user_name, user_email, avatar_url,
    exported_at)
  VALUES ($1, $2, $3, $4, $5, $6, $7, $8,
    'epoch'::timestamptz + $9::bigint * interval '1 millisecond',
    'epoch'::timestamptz + $10::bigint * interval '1 millisecond',
    'epoch'::timestamptz + $11::bigint * interval '1 millisecond',
    $12, $13, $14,
    'epoch'::timestamptz + $15::bigint * interval '1 millisecond',
    'epoch'::timestamptz + $16::bigint * interval '1 millisecond',
    $17, $18, $19, $20, now())
  ON CONFLICT (session_id) DO UPDATE SET
    app_id = EXCLUDED.app_id, user_id = EXCLUDED.user_id, open_id = EXCLUDED.open_id,
    union_id = EXCLUDED.union_id, state = EXCLUDED.state,
    failure_reason = EXCLUDED.failure_reason, card_message_id = EXCLUDED.card_message_id,
    created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at,
    expires_at = EXCLUDED.expires_at, access_token_ct = EXCLUDED.access_token_ct,
    refresh_token_ct = EXCLUDED.refresh_token_ct, token_key_id = EXCLUDED.token_key_id,
    token_expires_at = EXCLUDED.token_expires_at,
    refresh_token_expires_at = EXCLUDED.refresh_token_expires_at, scopes = EXCLUDED.scopes,
    user_name = EXCLUDED.user_name, user_email = EXCLUDED.user_email,
    avatar_url = EXCLUDED.avatar_url, exported_at = now()";

/// Upserts `rows` and deletes `deleted` in one transaction. Idempotent.
pub async fn write_batch(
    client: &mut Client,
    rows: &[ExportRow],
    deleted: &[SessionId],
) -> Result<()> {
    let tx = client.transaction().await?;
    let upsert = tx.prepare(UPSERT).await?;
    let mut futs = Vec::with_capacity(rows.len());
    for r in rows {
        let key_id = r
            .access_token
            .as_ref()
            .or(r.refresh_token.as_ref())
            .map(|t| t.key_id.clone());
        let params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> = vec![
            Box::new(r.session_id.to_string()),
            Box::new(r.app_id.clone()),
            Box::new(r.user_id.clone()),
            Box::new(r.open_id.clone()),
            Box::new(r.union_id.clone()),
            Box::new(r.state.as_str()),
            Box::new(r.failure_reason.map(FailureReason::as_str)),
            Box::new(r.card_message_id.clone()),
            Box::new(ms(r.created_at)),
            Box::new(ms(r.updated_at)),
            Box::new(ms(r.expires_at)),
            Box::new(r.access_token.as_ref().map(|t| t.bytes.clone())),
            Box::new(r.refresh_token.as_ref().map(|t| t.bytes.clone())),
            Box::new(key_id),
            Box::new(r.token_expires_at.map(ms)),
            Box::new(r.refresh_token_expires_at.map(ms)),
            Box::new(r.scopes.clone()),
            Box::new(r.user_name.clone()),
            Box::new(r.user_email.clone()),
            Box::new(r.avatar_url.clone()),
        ];
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
pub async fn export_all(store: &Store, url: &str, net: &Net) -> Result<u64> {
    let mut client = connect(url, net).await?;
    migrate(&mut client).await?;
    copy_all(store, &mut client).await
}

/// Copies every session, then moves the cursor to the last change seq seen before the copy
/// began (never back). Returns the number of rows written.
async fn copy_all(store: &Store, client: &mut Client) -> Result<u64> {
    let start_seq = store.run(|s| s.last_change_seq()).await?;
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
pub async fn export_changes_once(store: &Store, client: &mut Client) -> Result<usize> {
    let cursor = store.run(|s| s.cursor(CURSOR)).await?.unwrap_or(0);
    let complete_from = store.run(|s| s.change_feed_complete_from()).await?;
    if cursor < complete_from {
        // The feed was off for a while (no exporter configured): what changed then is not in
        // it. Copy every session once; the cursor then starts where the copy did.
        let n = copy_all(store, client).await?;
        return Ok(usize::try_from(n).unwrap_or(usize::MAX).max(1));
    }
    let changes = store.run(move |s| s.changes_after(cursor, BATCH)).await?;
    let Some(&(last_seq, _, _)) = changes.last() else {
        let last = store.run(|s| s.last_change_seq()).await?;
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
    let last = store.run(|s| s.last_change_seq()).await?;
    m.export_lag
        .set(i64::try_from(last.saturating_sub(last_seq)).unwrap_or(i64::MAX));
    Ok(changes.len())
}

/// One step of the continuous export: (re)connects and migrates if needed, then exports one
/// batch. On error the connection is dropped (the next step reconnects) and the error counted.
pub async fn step(
    store: &Store,
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
pub fn worker(
    store: Store,
    url: SecretString,
    net: Net,
    idle: Duration,
) -> crate::workers::WorkerFn {
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
    store: Store,
    url: SecretString,
    net: Net,
    idle: Duration,
    first_backoff: Duration,
    cancel: CancellationToken,
) {
    let mut backoff = first_backoff;
    let mut client: Option<Client> = None;
    while !cancel.is_cancelled() {
        let wait = match step(&store, &url, &net, &mut client).await {
            Ok(0) => {
                backoff = first_backoff;
                idle
            }
            Ok(_) => {
                backoff = first_backoff;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "postgresql export paused");
                let w = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(60));
                w
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
pub async fn import_all(store: &Store, url: &str, net: &Net) -> Result<u64> {
    let client = connect(url, net).await?;
    let cols: Vec<String> = client
        .query(
            "SELECT column_name::text FROM information_schema.columns
             WHERE table_name = 'user_auth_sessions' AND table_schema = current_schema()",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if cols.is_empty() {
        return Err(ExportError::Import(
            "no table user_auth_sessions in the current schema".to_owned(),
        ));
    }
    let has = |c: &str| cols.iter().any(|x| x == c);
    let text = |c: &str| {
        if has(c) {
            format!("{c}::text")
        } else {
            "NULL::text".to_owned()
        }
    };
    let time = |c: &str| {
        if has(c) {
            format!("(extract(epoch from {c}) * 1000)::bigint")
        } else {
            "NULL::bigint".to_owned()
        }
    };
    let bytes = |c: &str| {
        if has(c) {
            c.to_owned()
        } else {
            "NULL::bytea".to_owned()
        }
    };
    let scopes = if has("scopes") {
        // text[] here; the Python table may hold a JSON or space-separated text.
        "scopes::text".to_owned()
    } else {
        "NULL::text".to_owned()
    };
    let sql = format!(
        "SELECT session_id::text, app_id::text, user_id::text, {}, {}, state::text, {}, {}, \
         {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}",
        text("open_id"),
        text("union_id"),
        text("failure_reason"),
        text("card_message_id"),
        time("created_at"),
        time("updated_at"),
        time("expires_at"),
        bytes("access_token_ct"),
        bytes("refresh_token_ct"),
        text("token_key_id"),
        text("access_token"),
        text("refresh_token"),
        time("token_expires_at"),
        time("refresh_token_expires_at"),
        scopes,
        text("user_name"),
        text("user_email"),
        text("avatar_url"),
    ) + " FROM user_auth_sessions";
    let rows = client.query(sql.as_str(), &[]).await?;
    let mut batch = Vec::with_capacity(BATCH);
    let mut n = 0u64;
    for r in &rows {
        batch.push(import_row(store, r)?);
        if batch.len() == BATCH {
            n += flush(store, &mut batch).await?;
        }
    }
    n += flush(store, &mut batch).await?;
    Ok(n)
}

async fn flush(store: &Store, batch: &mut Vec<crate::storage::AuthSession>) -> Result<u64> {
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

fn import_row(store: &Store, r: &tokio_postgres::Row) -> Result<crate::storage::AuthSession> {
    let bad = |m: String| ExportError::Import(m);
    let raw_id: String = r.get(0);
    let id: SessionId = raw_id
        .replace('-', "")
        .to_ascii_lowercase()
        .parse()
        .map_err(|e| bad(format!("session id {raw_id:?}: {e}")))?;
    let state_s: String = r.get(5);
    let state: SessionState = state_s
        .to_ascii_lowercase()
        .parse()
        .map_err(|e| bad(format!("session {id}: {e}")))?;
    let failure_reason = r.get::<_, Option<String>>(6).and_then(|f| {
        let f = f.to_ascii_lowercase();
        FailureReason::ALL.into_iter().find(|x| x.as_str() == f)
    });
    let t = |i: usize| {
        r.get::<_, Option<i64>>(i)
            .map(|v| u64::try_from(v).unwrap_or(0))
    };
    let key_id: Option<String> = r.get(13);
    let token = |field: &str, ct: Option<Vec<u8>>, plain: Option<String>| -> Result<_> {
        let it = match (ct, plain) {
            (Some(bytes), _) => ImportToken::Sealed(ExportToken {
                key_id: key_id
                    .clone()
                    .ok_or_else(|| bad(format!("session {id}: {field} without token_key_id")))?,
                bytes,
            }),
            (None, Some(p)) if !p.is_empty() => ImportToken::Plain(SecretString::from(p)),
            _ => return Ok(None),
        };
        Ok(Some(store.open_imported_token(id, field, it)?))
    };
    let access_token = token("access_token", r.get(11), r.get(14))?;
    let refresh_token = token("refresh_token", r.get(12), r.get(15))?;
    let created_at = t(8).unwrap_or(0);
    Ok(crate::storage::AuthSession {
        session_id: id,
        app_id: r.get(1),
        user_id: r.get(2),
        open_id: r.get(3),
        union_id: r.get(4),
        state,
        failure_reason,
        card_message_id: r.get(7),
        created_at,
        updated_at: t(9).unwrap_or(created_at),
        expires_at: t(10).unwrap_or(created_at),
        access_token,
        refresh_token,
        token_expires_at: t(16),
        refresh_token_expires_at: t(17),
        scopes: parse_scopes(r.get(18)),
        user_name: r.get(19),
        user_email: r.get(20),
        avatar_url: r.get(21),
        state_hash: None,
        pkce_verifier: None,
    })
}
