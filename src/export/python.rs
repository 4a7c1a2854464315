//! `import python`: the Python deployment's `user_auth_sessions` table into the store.
//!
//! That table (see the README, "Migrating from the Python deployment") has an integer `id`, a
//! UUID-text `session_id`, a **plaintext** `user_access_token` and no refresh token, naive
//! `timestamp` columns (written in UTC by that service), `message_id`, `mobile`, states
//! `pending|completed|expired` and auth methods `websocket_card|oauth|http_callback`.
//!
//! The import runs in two phases:
//! 1. Read and check **every** row ([`plan`], a pure conversion): a row that cannot be read or
//!    holds an unexpected value is an error naming the row (`id`, `session_id`) and the column,
//!    and nothing at all is written. Checking first is what keeps a bad row from leaving half
//!    an import behind; the store's transactions are per batch, not one for the whole table.
//! 2. Write ([`apply`]): sessions in batches of [`BATCH`](super::postgres::BATCH) (one store
//!    transaction each), then the users and the current tokens. Every write is conditional, so
//!    that running the import again (after a crash, or on purpose) changes nothing it already
//!    did and undoes nothing the service did since: a session already in the store is left
//!    alone, a token is written only while its session is still completed in the store and the
//!    store holds no token of that user obtained as late or later.
//!
//! What becomes of a row:
//! - `completed`: a completed session. Its token becomes the user's current token (sealed by
//!   the store) when it is unexpired, its expiry is known, and it is the user's newest (one
//!   current token per `(app_id, user_id)`). It has no refresh token: it is served until it
//!   expires, then the service marks it needs-reauth (and re-sends the card if configured).
//!   An expired token is not carried over at all.
//! - `expired`: an expired session (history), no token.
//! - `pending`: skipped. Its card's button leads to the Python service's callback with an OAuth
//!   state only that process knows, so it can never complete here; kept as pending it would make
//!   the service believe a card is already waiting. The user is asked again when needed.
//! - A row without a user (`user_id` and `open_id` NULL) is skipped unless it is `completed`
//!   (a token of nobody: an error).
//!
//! `mobile`, `auth_method` and `redirect_uri` have no place in a session here: they are checked
//! but not carried over.

use std::collections::HashMap;

use secrecy::SecretString;

use super::postgres::{ExportError, BATCH};
use crate::net::Net;
use crate::storage::{AuthSession, Db, SessionId, SessionState, UserInfo, UserToken};

type Result<T> = std::result::Result<T, ExportError>;

/// The columns the import needs; a table without one of them is not the Python table.
const REQUIRED: [&str; 10] = [
    "id",
    "session_id",
    "app_id",
    "state",
    "open_id",
    "user_id",
    "user_access_token",
    "token_expires_at",
    "created_at",
    "expires_at",
];

/// Columns read when present (the exact table has them all).
const OPTIONAL_TEXT: [&str; 6] = [
    "auth_method",
    "redirect_uri",
    "union_id",
    "user_name",
    "email",
    "message_id",
];

/// One row of the Python table, as read (nothing decided yet). Times are UTC unix ms.
#[derive(Default)]
pub struct PythonRow {
    /// `id`.
    pub id: i64,
    /// `session_id` (UUID text).
    pub session_id: Option<String>,
    /// `app_id`.
    pub app_id: Option<String>,
    /// `state`.
    pub state: Option<String>,
    /// `auth_method`.
    pub auth_method: Option<String>,
    /// `open_id`.
    pub open_id: Option<String>,
    /// `user_id`.
    pub user_id: Option<String>,
    /// `union_id`.
    pub union_id: Option<String>,
    /// `user_name`.
    pub user_name: Option<String>,
    /// `email`.
    pub email: Option<String>,
    /// `user_access_token` (plaintext in that table).
    pub user_access_token: Option<SecretString>,
    /// `token_expires_at`.
    pub token_expires_at: Option<i64>,
    /// `created_at`.
    pub created_at: Option<i64>,
    /// `expires_at`.
    pub expires_at: Option<i64>,
    /// `completed_at`.
    pub completed_at: Option<i64>,
    /// `message_id`.
    pub message_id: Option<String>,
}

impl std::fmt::Debug for PythonRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PythonRow")
            .field("id", &self.id)
            .field("session_id", &self.session_id)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl PythonRow {
    /// How errors and the report name the row.
    fn label(&self) -> String {
        match &self.session_id {
            Some(s) => format!("row id={} (session_id {s})", self.id),
            None => format!("row id={}", self.id),
        }
    }
}

/// Something not carried over, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    /// The row (`row id=N (session_id …)`).
    pub row: String,
    /// `session` (the row was not imported) or `token` (the session was, its token not).
    pub what: &'static str,
    /// Why.
    pub reason: String,
}

/// What [`plan`] decided: everything to write, nothing written yet.
#[derive(Debug, Default)]
pub struct Plan {
    /// The sessions to write.
    pub sessions: Vec<AuthSession>,
    /// The users' current tokens (one per `(app_id, user_id)`).
    pub tokens: Vec<UserToken>,
    /// What is known of the users of completed sessions.
    pub users: Vec<UserInfo>,
    /// What is not carried over.
    pub skipped: Vec<Skipped>,
    /// Rows read.
    pub rows: u64,
}

/// What an import did.
#[derive(Debug, Default)]
pub struct Report {
    /// Rows read from the table.
    pub rows: u64,
    /// Sessions written.
    pub sessions: u64,
    /// Tokens written (users who get a token served).
    pub tokens: u64,
    /// Users written.
    pub users: u64,
    /// What was not carried over, and why (from the plan and from the store's state).
    pub skipped: Vec<Skipped>,
}

fn bad(row: &PythonRow, column: &'static str, detail: impl Into<String>) -> ExportError {
    ExportError::BadColumn {
        row: row.label(),
        column,
        detail: detail.into(),
    }
}

/// A UUID (`8-4-4-4-12` hex, or 32 hex) as a session id.
fn session_id(row: &PythonRow, text: &str) -> Result<SessionId> {
    let t = text.trim();
    let dashed = t.len() == 36
        && t.char_indices()
            .all(|(i, c)| matches!(i, 8 | 13 | 18 | 23) == (c == '-'));
    let plain = t.len() == 32;
    if !(dashed || plain) {
        return Err(bad(row, "session_id", format!("{t:?} is not a UUID")));
    }
    t.replace('-', "")
        .to_ascii_lowercase()
        .parse()
        .map_err(|_| bad(row, "session_id", format!("{t:?} is not a UUID")))
}

/// A time column: UTC unix ms, not before 1970.
fn time(row: &PythonRow, column: &'static str, v: Option<i64>) -> Result<Option<u64>> {
    v.map(|ms| u64::try_from(ms).map_err(|_| bad(row, column, "a time before 1970")))
        .transpose()
}

/// An id column: NULL or empty is none; longer than the store takes is an error.
fn id_text(row: &PythonRow, column: &'static str, v: Option<&String>) -> Result<Option<String>> {
    match v.map(|s| s.trim()) {
        None | Some("") => Ok(None),
        Some(s) if s.len() > 256 => Err(bad(row, column, "longer than 256 bytes")),
        Some(s) => Ok(Some(s.to_owned())),
    }
}

/// One row, checked; `None` with a reason when it is skipped.
struct Checked {
    session: AuthSession,
    /// The completed session's token and its expiry, when it has one.
    token: Option<(SecretString, u64)>,
    /// When it completed (ms), for choosing the user's newest session.
    completed: u64,
    row: String,
    id: i64,
}

fn check(row: PythonRow, now: u64) -> Result<std::result::Result<Checked, Skipped>> {
    let raw_id = row
        .session_id
        .clone()
        .ok_or_else(|| bad(&row, "session_id", "NULL, and it is required"))?;
    let id = session_id(&row, &raw_id)?;
    let app_id = id_text(&row, "app_id", row.app_id.as_ref())?
        .ok_or_else(|| bad(&row, "app_id", "NULL or empty, and it is required"))?;
    let state_text = row
        .state
        .clone()
        .ok_or_else(|| bad(&row, "state", "NULL, and it is required"))?;
    let state = match state_text.trim() {
        "pending" => SessionState::Pending,
        "completed" => SessionState::Completed,
        "expired" => SessionState::Expired,
        other => {
            return Err(bad(
                &row,
                "state",
                format!("{other:?}: expected pending, completed or expired"),
            ))
        }
    };
    if let Some(m) = row.auth_method.as_deref().map(str::trim) {
        if !matches!(m, "websocket_card" | "oauth" | "http_callback") {
            return Err(bad(
                &row,
                "auth_method",
                format!("{m:?}: expected websocket_card, oauth or http_callback"),
            ));
        }
    }
    let open_id = id_text(&row, "open_id", row.open_id.as_ref())?;
    let user_id = id_text(&row, "user_id", row.user_id.as_ref())?;
    let created_at = time(&row, "created_at", row.created_at)?
        .ok_or_else(|| bad(&row, "created_at", "NULL, and it is required"))?;
    let expires_at = time(&row, "expires_at", row.expires_at)?
        .ok_or_else(|| bad(&row, "expires_at", "NULL, and it is required"))?;
    let completed_at = time(&row, "completed_at", row.completed_at)?;
    let token_expires_at = time(&row, "token_expires_at", row.token_expires_at)?;
    let label = row.label();
    let skip = |reason: &str| {
        Ok(Err(Skipped {
            row: label.clone(),
            what: "session",
            reason: reason.to_owned(),
        }))
    };
    if state == SessionState::Pending {
        return skip("pending: its card links to the Python service's callback, so it cannot complete here (the user is asked again when needed)");
    }
    let Some(user) = user_id.clone().or_else(|| open_id.clone()) else {
        if state == SessionState::Completed {
            return Err(bad(
                &row,
                "user_id",
                "a completed session with neither user_id nor open_id",
            ));
        }
        return skip("no user: user_id and open_id are NULL");
    };
    let plain = row
        .user_access_token
        .clone()
        .filter(|t| !secrecy::ExposeSecret::expose_secret(t).is_empty());
    let token = match (state, plain, token_expires_at) {
        (SessionState::Completed, Some(t), Some(exp)) if exp > now => Some((t, exp)),
        _ => None,
    };
    let completed = completed_at.unwrap_or(created_at);
    let session = AuthSession {
        session_id: id,
        app_id,
        user_id: user,
        open_id,
        union_id: id_text(&row, "union_id", row.union_id.as_ref())?,
        state,
        failure_reason: None,
        card_message_id: row.message_id.clone().filter(|m| !m.is_empty()),
        created_at,
        updated_at: completed.max(created_at),
        expires_at,
        // Only an unexpired token is kept (sealed); an expired one is of no use to anyone.
        access_token: token.as_ref().map(|(t, _)| t.clone()),
        refresh_token: None,
        token_expires_at,
        refresh_token_expires_at: None,
        scopes: Vec::new(),
        user_name: row.user_name.clone().filter(|m| !m.is_empty()),
        user_email: row.email.clone().filter(|m| !m.is_empty()),
        avatar_url: None,
        state_hash: None,
        pkce_verifier: None,
    };
    Ok(Ok(Checked {
        session,
        token,
        completed,
        row: label,
        id: row.id,
    }))
}

/// Checks every row and decides what to write (pure: no store, no database). `now` (unix ms)
/// decides which tokens are still valid.
///
/// # Errors
/// [`ExportError::BadColumn`] for the first row that cannot be imported, naming it and the
/// column; nothing is decided then.
pub fn plan(rows: Vec<PythonRow>, now: u64) -> Result<Plan> {
    let mut out = Plan {
        rows: rows.len() as u64,
        ..Plan::default()
    };
    let mut checked = Vec::with_capacity(rows.len());
    let mut seen: HashMap<SessionId, String> = HashMap::new();
    for row in rows {
        match check(row, now)? {
            Ok(c) => {
                if let Some(first) = seen.insert(c.session.session_id, c.row.clone()) {
                    return Err(ExportError::BadColumn {
                        row: c.row,
                        column: "session_id",
                        detail: format!("the same session as {first}"),
                    });
                }
                checked.push(c);
            }
            Err(s) => out.skipped.push(s),
        }
    }
    // The newest completed session of each user (by completion time, then id) holds the
    // user's current token; an older one's token is superseded.
    let mut newest: HashMap<(String, String), usize> = HashMap::new();
    for (i, c) in checked.iter().enumerate() {
        if c.session.state != SessionState::Completed {
            continue;
        }
        let key = (c.session.app_id.clone(), c.session.user_id.clone());
        let entry = newest.entry(key).or_insert(i);
        let cur = &checked[*entry];
        if (c.completed, c.id) > (cur.completed, cur.id) {
            *entry = i;
        }
    }
    let mut users: HashMap<(String, String), UserInfo> = HashMap::new();
    for (i, c) in checked.iter().enumerate() {
        let s = &c.session;
        if s.state != SessionState::Completed {
            continue;
        }
        let key = (s.app_id.clone(), s.user_id.clone());
        let is_newest = newest.get(&key) == Some(&i);
        if let Some(open_id) = &s.open_id {
            let info = UserInfo {
                app_id: s.app_id.clone(),
                open_id: open_id.clone(),
                user_id: (s.user_id != *open_id).then(|| s.user_id.clone()),
                union_id: s.union_id.clone(),
                name: s.user_name.clone(),
                email: s.user_email.clone(),
                avatar_url: None,
                updated_at: c.completed,
            };
            let k = (s.app_id.clone(), open_id.clone());
            if users
                .get(&k)
                .is_none_or(|u| u.updated_at <= info.updated_at)
            {
                users.insert(k, info);
            }
        }
        let skip_token = |reason: String| Skipped {
            row: c.row.clone(),
            what: "token",
            reason,
        };
        match (&c.token, is_newest) {
            (Some((t, exp)), true) => out.tokens.push(UserToken {
                app_id: s.app_id.clone(),
                user_id: s.user_id.clone(),
                open_id: s.open_id.clone(),
                access_token: t.clone(),
                refresh_token: None,
                expires_at: *exp,
                refresh_expires_at: None,
                // No refresh token: nothing to refresh. At expiry the service marks it
                // needs-reauth (and re-sends the card if configured).
                refresh_due_at: *exp,
                scopes: Vec::new(),
                obtained_at: c.completed,
                session_id: Some(s.session_id),
                needs_reauth: false,
                refresh_in_doubt_since: None,
            }),
            (Some(_), false) => {
                let newer = newest
                    .get(&key)
                    .map_or_else(String::new, |j| checked[*j].row.clone());
                // The newer session goes with the row, so that the reasons group.
                out.skipped.push(Skipped {
                    row: format!("{}, superseded by {newer}", c.row),
                    what: "token",
                    reason: "superseded by a newer session of the same user".to_owned(),
                });
            }
            (None, _) => {
                // Say why there is no token to serve.
                let reason = if s.token_expires_at.is_some_and(|e| e <= now) {
                    "the token has expired (the user is asked again when needed)"
                } else if s.token_expires_at.is_none() {
                    "no token, or no token_expires_at (a token of unknown lifetime is not served)"
                } else {
                    "no user_access_token"
                };
                out.skipped.push(skip_token(reason.to_owned()));
            }
        }
    }
    let mut users: Vec<UserInfo> = users.into_values().collect();
    users.sort_by(|a, b| (&a.app_id, &a.open_id).cmp(&(&b.app_id, &b.open_id)));
    out.users = users;
    out.sessions = checked.into_iter().map(|c| c.session).collect();
    Ok(out)
}

/// Writes a plan (see the module's doc for the conditions). `progress(done, total)` is called
/// after each batch of sessions.
///
/// # Errors
/// The store's.
pub async fn apply(store: &Db, plan: Plan, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<Report> {
    let mut report = Report {
        rows: plan.rows,
        skipped: plan.skipped,
        ..Report::default()
    };
    let total = plan.sessions.len() as u64;
    let mut done = 0u64;
    let mut sessions = plan.sessions;
    while !sessions.is_empty() {
        let rest = sessions.split_off(sessions.len().min(BATCH));
        let batch = std::mem::replace(&mut sessions, rest);
        let n = batch.len() as u64;
        let (written, present) = store
            .run(move |s| {
                let mut fresh = Vec::with_capacity(batch.len());
                let mut present = Vec::new();
                for x in batch {
                    if s.get_session(x.session_id)?.is_some() {
                        present.push(x.session_id);
                    } else {
                        fresh.push(x);
                    }
                }
                s.put_sessions(&fresh)?;
                Ok((fresh.len() as u64, present))
            })
            .await?;
        report.sessions += written;
        for id in present {
            report.skipped.push(Skipped {
                row: format!("session {id}"),
                what: "session",
                reason: "already in the store (imported before?): left as it is".to_owned(),
            });
        }
        done += n;
        progress(done, total);
    }
    let users = plan.users;
    report.users = store
        .run(move |s| {
            let mut n = 0u64;
            for u in users {
                let newer = s
                    .get_user(&u.app_id, &u.open_id)?
                    .is_some_and(|have| have.updated_at >= u.updated_at);
                if !newer {
                    s.put_user(&u)?;
                    n += 1;
                }
            }
            Ok(n)
        })
        .await?;
    let tokens = plan.tokens;
    let (n, skipped) = store
        .run(move |s| {
            let mut n = 0u64;
            let mut skipped = Vec::new();
            for t in tokens {
                let id = t.session_id.map_or_else(String::new, |i| i.to_string());
                let completed = match t.session_id {
                    Some(sid) => s
                        .get_session(sid)?
                        .is_some_and(|x| x.state == SessionState::Completed),
                    None => false,
                };
                let reason = if !completed {
                    Some("its session is no longer completed in the store (revoked?)")
                } else if s
                    .get_token(&t.app_id, &t.user_id)?
                    .is_some_and(|have| have.obtained_at >= t.obtained_at)
                {
                    Some("the store already holds this or a newer token of the user")
                } else {
                    None
                };
                match reason {
                    Some(r) => skipped.push(Skipped {
                        row: format!("session {id}"),
                        what: "token",
                        reason: r.to_owned(),
                    }),
                    None => {
                        s.put_token(&t)?;
                        n += 1;
                    }
                }
            }
            Ok((n, skipped))
        })
        .await?;
    report.tokens = n;
    report.skipped.extend(skipped);
    Ok(report)
}

/// The query over the Python table with columns `present`: every column the import reads,
/// times as UTC unix ms (a naive `timestamp` is taken as UTC, as that service wrote it).
fn select_sql(present: &[String]) -> String {
    let has = |c: &str| present.iter().any(|x| x == c);
    let mut exprs = vec!["id::bigint AS id".to_owned()];
    for c in [
        "session_id",
        "app_id",
        "state",
        "open_id",
        "user_id",
        "user_access_token",
    ] {
        exprs.push(format!("{c}::text AS {c}"));
    }
    for c in OPTIONAL_TEXT {
        exprs.push(if has(c) {
            format!("{c}::text AS {c}")
        } else {
            format!("NULL::text AS {c}")
        });
    }
    for c in [
        "token_expires_at",
        "created_at",
        "expires_at",
        "completed_at",
    ] {
        exprs.push(if has(c) {
            format!("(extract(epoch from {c}) * 1000)::bigint AS {c}")
        } else {
            format!("NULL::bigint AS {c}")
        });
    }
    // A table this service's export migrated in place also holds the export's rows (they have
    // `updated_at`); those are `import postgres`'s, not this import's.
    let filter = if has("access_token_ct") && has("updated_at") {
        " WHERE updated_at IS NULL"
    } else {
        ""
    };
    format!(
        "SELECT {} FROM user_auth_sessions{filter} ORDER BY id",
        exprs.join(", ")
    )
}

fn read_row(r: &tokio_postgres::Row, n: usize) -> Result<PythonRow> {
    let id: i64 = r.try_get("id").map_err(|e| ExportError::BadColumn {
        row: format!("row {n}"),
        column: "id",
        detail: e.to_string(),
    })?;
    let mut row = PythonRow {
        id,
        ..PythonRow::default()
    };
    fn get<'r, T: tokio_postgres::types::FromSql<'r>>(
        r: &'r tokio_postgres::Row,
        row: &PythonRow,
        name: &'static str,
    ) -> Result<T> {
        r.try_get(name).map_err(|e| bad(row, name, e.to_string()))
    }
    row.session_id = get(r, &row, "session_id")?;
    row.app_id = get(r, &row, "app_id")?;
    row.state = get(r, &row, "state")?;
    row.auth_method = get(r, &row, "auth_method")?;
    row.open_id = get(r, &row, "open_id")?;
    row.user_id = get(r, &row, "user_id")?;
    row.union_id = get(r, &row, "union_id")?;
    row.user_name = get(r, &row, "user_name")?;
    row.email = get(r, &row, "email")?;
    row.message_id = get(r, &row, "message_id")?;
    row.user_access_token =
        get::<Option<String>>(r, &row, "user_access_token")?.map(SecretString::from);
    row.token_expires_at = get(r, &row, "token_expires_at")?;
    row.created_at = get(r, &row, "created_at")?;
    row.expires_at = get(r, &row, "expires_at")?;
    row.completed_at = get(r, &row, "completed_at")?;
    Ok(row)
}

/// Reads every row of the Python table at `url`.
///
/// # Errors
/// No such table, not the Python table (a required column is missing), PostgreSQL's errors, or
/// a row that cannot be read ([`ExportError::BadColumn`]).
pub async fn read_rows(url: &str, net: &Net) -> Result<Vec<PythonRow>> {
    let client = super::postgres::connect(url, net).await?;
    let cols = super::postgres::table_columns(&client).await?;
    if cols.is_empty() {
        return Err(ExportError::Import(
            "no table user_auth_sessions in the current schema".to_owned(),
        ));
    }
    if let Some(missing) = REQUIRED.iter().find(|c| !cols.iter().any(|x| x == *c)) {
        return Err(ExportError::Import(format!(
            "user_auth_sessions is not the Python deployment's table: it has no column {missing}"
        )));
    }
    let rows = client.query(select_sql(&cols).as_str(), &[]).await?;
    rows.iter()
        .enumerate()
        .map(|(i, r)| read_row(r, i + 1))
        .collect()
}

/// The whole import: read, check every row, then write. See the module's doc.
///
/// # Errors
/// See [`read_rows`], [`plan`] and [`apply`]; on a read or check error nothing is written.
pub async fn import(
    store: &Db,
    url: &str,
    net: &Net,
    now: u64,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<Report> {
    let rows = read_rows(url, net).await?;
    let plan = plan(rows, now)?;
    apply(store, plan, progress).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    const NOW: u64 = 1_800_000_000_000;

    fn row(id: i64, user: &str, state: &str) -> PythonRow {
        PythonRow {
            id,
            session_id: Some(format!("1b4e28ba-2fa1-11d2-883f-{id:012x}")),
            app_id: Some("cli_a".into()),
            state: Some(state.into()),
            auth_method: Some("websocket_card".into()),
            open_id: Some(format!("ou_{user}")),
            user_id: Some(user.into()),
            created_at: Some(1_799_000_000_000 + id),
            expires_at: Some(1_799_000_600_000),
            ..PythonRow::default()
        }
    }

    fn completed(id: i64, user: &str, token: &str, expires: i64) -> PythonRow {
        PythonRow {
            user_access_token: Some(SecretString::from(token.to_owned())),
            token_expires_at: Some(expires),
            completed_at: Some(1_799_000_100_000 + id),
            message_id: Some(format!("om_{id}")),
            ..row(id, user, "completed")
        }
    }

    fn err(e: ExportError) -> (String, &'static str) {
        match e {
            ExportError::BadColumn { row, column, .. } => (row, column),
            other => (format!("not a BadColumn: {other}"), ""),
        }
    }

    #[test]
    fn the_newest_unexpired_token_of_each_user_becomes_current() {
        let live = 1_800_000_500_000;
        let p = plan(
            vec![
                completed(1, "alice", "old-alice", live),
                completed(2, "alice", "new-alice", live),
                completed(3, "bob", "dead-bob", 1_799_999_999_999),
                row(4, "carol", "pending"),
                row(5, "dave", "expired"),
            ],
            NOW,
        )
        .unwrap();
        assert_eq!(p.rows, 5);
        assert_eq!(p.sessions.len(), 4, "pending is skipped");
        assert_eq!(p.tokens.len(), 1);
        let t = &p.tokens[0];
        assert_eq!((t.app_id.as_str(), t.user_id.as_str()), ("cli_a", "alice"));
        assert_eq!(t.access_token.expose_secret(), "new-alice");
        assert_eq!(t.refresh_token.as_ref().map(|_| ()), None);
        assert_eq!(
            (t.expires_at, t.refresh_due_at),
            (1_800_000_500_000, 1_800_000_500_000)
        );
        assert_eq!(
            t.session_id.map(|s| s.to_string()).as_deref(),
            Some("1b4e28ba2fa111d2883f000000000002")
        );
        let bob = p.sessions.iter().find(|s| s.user_id == "bob").unwrap();
        assert_eq!(bob.state, SessionState::Completed);
        assert!(bob.access_token.is_none(), "an expired token is dropped");
        let dave = p.sessions.iter().find(|s| s.user_id == "dave").unwrap();
        assert_eq!(dave.state, SessionState::Expired);
        let alice1 = p
            .sessions
            .iter()
            .find(|s| s.card_message_id.as_deref() == Some("om_1"))
            .unwrap();
        assert_eq!(alice1.created_at, 1_799_000_000_001);
        let reasons: Vec<(&str, &str)> =
            p.skipped.iter().map(|s| (s.row.as_str(), s.what)).collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(p.skipped.iter().any(|s| s.row.starts_with("row id=4 ")
            && s.what == "session"
            && s.reason.starts_with("pending")));
        assert!(p
            .skipped
            .iter()
            .any(|s| s.row.starts_with("row id=1 ") && s.reason.contains("superseded")));
        assert!(p
            .skipped
            .iter()
            .any(|s| s.row.starts_with("row id=3 ") && s.reason.contains("expired")));
        let users: Vec<&str> = p.users.iter().map(|u| u.open_id.as_str()).collect();
        assert_eq!(users, vec!["ou_alice", "ou_bob"]);
        assert_eq!(p.users[0].user_id.as_deref(), Some("alice"));
    }

    #[test]
    fn a_bad_row_names_the_row_and_the_column_and_nothing_is_planned() {
        let good = || completed(1, "alice", "t", 1_800_000_500_000);
        let cases: Vec<(PythonRow, &str)> = vec![
            (
                PythonRow {
                    session_id: Some("not-a-uuid".into()),
                    ..row(7, "x", "expired")
                },
                "session_id",
            ),
            (
                PythonRow {
                    session_id: None,
                    ..row(7, "x", "expired")
                },
                "session_id",
            ),
            (
                PythonRow {
                    state: Some("sleeping".into()),
                    ..row(7, "x", "expired")
                },
                "state",
            ),
            (
                PythonRow {
                    auth_method: Some("telepathy".into()),
                    ..row(7, "x", "expired")
                },
                "auth_method",
            ),
            (
                PythonRow {
                    app_id: None,
                    ..row(7, "x", "expired")
                },
                "app_id",
            ),
            (
                PythonRow {
                    created_at: None,
                    ..row(7, "x", "expired")
                },
                "created_at",
            ),
            (
                PythonRow {
                    created_at: Some(-5),
                    ..row(7, "x", "expired")
                },
                "created_at",
            ),
            (
                PythonRow {
                    user_id: None,
                    open_id: None,
                    ..completed(7, "x", "t", 1_800_000_500_000)
                },
                "user_id",
            ),
            (
                PythonRow {
                    user_id: Some("u".repeat(300)),
                    ..row(7, "x", "expired")
                },
                "user_id",
            ),
        ];
        for (bad_row, column) in cases {
            let label = bad_row.label();
            let e = plan(vec![good(), bad_row], NOW).unwrap_err();
            let msg = e.to_string();
            assert_eq!(err(e), (label.clone(), column), "{msg}");
            assert!(msg.contains("row id=7") && msg.contains(column), "{msg}");
        }
        // The same session twice.
        let e = plan(vec![good(), good()], NOW).unwrap_err();
        assert_eq!(err(e).1, "session_id");
    }

    #[test]
    fn rows_without_a_user_are_skipped_unless_completed_and_uuids_parse_both_ways() {
        let p = plan(
            vec![PythonRow {
                user_id: None,
                open_id: None,
                ..row(9, "x", "expired")
            }],
            NOW,
        )
        .unwrap();
        assert!(p.sessions.is_empty());
        assert!(p.skipped[0].reason.starts_with("no user"));
        // user_id NULL: the open_id is the user (and the token's key).
        let p = plan(
            vec![PythonRow {
                user_id: None,
                session_id: Some("1B4E28BA2FA111D2883F0016D3CCA427".into()),
                ..completed(2, "zed", "tok", 1_800_000_500_000)
            }],
            NOW,
        )
        .unwrap();
        assert_eq!(p.tokens[0].user_id, "ou_zed");
        assert_eq!(
            p.sessions[0].session_id.to_string(),
            "1b4e28ba2fa111d2883f0016d3cca427"
        );
        assert_eq!(p.users[0].user_id, None);
        // A dash in the wrong place is not a UUID.
        let e = plan(
            vec![PythonRow {
                session_id: Some("1b4e28ba2-fa1-11d2-883f-0016d3cca427".into()),
                ..row(3, "x", "expired")
            }],
            NOW,
        )
        .unwrap_err();
        assert_eq!(err(e).1, "session_id");
    }

    #[test]
    fn the_query_reads_every_column_and_leaves_the_exports_rows_out() {
        let python: Vec<String> = REQUIRED
            .iter()
            .chain(OPTIONAL_TEXT.iter())
            .map(|c| (*c).to_owned())
            .chain(["completed_at".to_owned(), "mobile".to_owned()])
            .collect();
        let sql = select_sql(&python);
        assert!(sql.contains("(extract(epoch from created_at) * 1000)::bigint AS created_at"));
        assert!(sql.contains("message_id::text AS message_id"));
        assert!(!sql.contains("WHERE"));
        let mut migrated = python.clone();
        migrated.extend(["access_token_ct".to_owned(), "updated_at".to_owned()]);
        assert!(select_sql(&migrated).contains(" WHERE updated_at IS NULL "));
        let bare: Vec<String> = REQUIRED.iter().map(|c| (*c).to_owned()).collect();
        assert!(select_sql(&bare).contains("NULL::bigint AS completed_at"));
    }
}
