//! Rows of the PostgreSQL store to and from the records of `storage::records`: secrets sealed
//! exactly as the redb store seals them (`StoredSession::seal`, `StoredToken::seal`: same
//! associated data), each written as `nonce || ciphertext` beside its key id.

use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::{api_time, db_time, pg_err, sealed_bytes};
use crate::storage::envelope::{KeyId, Sealed};
use crate::storage::records::{
    session_from, StoredSession, StoredToken, SESSIONS_TABLE, TOKENS_TABLE,
};
use crate::storage::{Error, FailureReason, Result, SessionId, SessionState, UserInfo};

/// The columns of `ls_sessions`, in the order [`SessionParams::params`] binds them.
pub(crate) const SESSION_COLUMNS: &str = "id, app_id, user_id, open_id, union_id, state, \
     failure_reason, card_message_id, created_at, updated_at, expires_at, access_token, \
     access_token_key, refresh_token, refresh_token_key, token_expires_at, \
     refresh_token_expires_at, scopes, user_name, user_email, avatar_url, state_hash, \
     pkce_verifier, pkce_verifier_key";

/// `$1, …, $24`.
pub(crate) const SESSION_VALUES: &str = "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
     $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24";

/// `col = EXCLUDED.col` for every column but the id.
pub(crate) const SESSION_UPDATE_SET: &str = "app_id = EXCLUDED.app_id, \
     user_id = EXCLUDED.user_id, open_id = EXCLUDED.open_id, union_id = EXCLUDED.union_id, \
     state = EXCLUDED.state, failure_reason = EXCLUDED.failure_reason, \
     card_message_id = EXCLUDED.card_message_id, created_at = EXCLUDED.created_at, \
     updated_at = EXCLUDED.updated_at, expires_at = EXCLUDED.expires_at, \
     access_token = EXCLUDED.access_token, access_token_key = EXCLUDED.access_token_key, \
     refresh_token = EXCLUDED.refresh_token, refresh_token_key = EXCLUDED.refresh_token_key, \
     token_expires_at = EXCLUDED.token_expires_at, \
     refresh_token_expires_at = EXCLUDED.refresh_token_expires_at, scopes = EXCLUDED.scopes, \
     user_name = EXCLUDED.user_name, user_email = EXCLUDED.user_email, \
     avatar_url = EXCLUDED.avatar_url, state_hash = EXCLUDED.state_hash, \
     pkce_verifier = EXCLUDED.pkce_verifier, pkce_verifier_key = EXCLUDED.pkce_verifier_key";

/// A session id as its 16-byte big-endian key (so `bytea` order is id order).
pub(crate) fn id_bytes(id: SessionId) -> Vec<u8> {
    id.to_bytes().to_vec()
}

pub(crate) fn id_from(table: &'static str, b: &[u8]) -> Result<SessionId> {
    <[u8; 16]>::try_from(b)
        .map(|a| SessionId(u128::from_be_bytes(a)))
        .map_err(|_| Error::Decode {
            table,
            detail: format!("session id of {} bytes", b.len()),
        })
}

fn key_of(s: Option<&Sealed>) -> Option<i64> {
    s.map(|s| i64::from(s.key_id.0))
}

/// A sealed column back from `(nonce || ct, key id)`.
pub(crate) fn sealed_from(
    table: &'static str,
    bytes: Option<Vec<u8>>,
    key: Option<i64>,
) -> Result<Option<Sealed>> {
    match (bytes, key) {
        (None, None) => Ok(None),
        (Some(b), Some(k)) if b.len() >= 24 => {
            let key_id = u32::try_from(k).map_err(|_| Error::Decode {
                table,
                detail: format!("key id {k}"),
            })?;
            let mut nonce = [0u8; 24];
            nonce.copy_from_slice(&b[..24]);
            Ok(Some(Sealed {
                key_id: KeyId(key_id),
                nonce,
                ct: b[24..].to_vec(),
            }))
        }
        _ => Err(Error::Decode {
            table,
            detail: "a sealed column without its key id, or too short".to_owned(),
        }),
    }
}

fn opt_time(v: Option<u64>) -> Option<i64> {
    v.map(db_time)
}

/// The bound values of one `ls_sessions` row.
pub(crate) struct SessionParams {
    /// The row key (16 bytes).
    pub(crate) id: Vec<u8>,
    s: StoredSession,
    times: [i64; 3],
    token_times: [Option<i64>; 2],
    access: Option<Vec<u8>>,
    access_key: Option<i64>,
    refresh: Option<Vec<u8>>,
    refresh_key: Option<i64>,
    pkce: Option<Vec<u8>>,
    pkce_key: Option<i64>,
    state: &'static str,
    failure: Option<&'static str>,
    state_hash: Option<Vec<u8>>,
}

impl SessionParams {
    pub(crate) fn new(id: SessionId, s: StoredSession) -> Self {
        Self {
            id: id_bytes(id),
            times: [
                db_time(s.created_at),
                db_time(s.updated_at),
                db_time(s.expires_at),
            ],
            token_times: [
                opt_time(s.token_expires_at),
                opt_time(s.refresh_token_expires_at),
            ],
            access: s.access_token.as_ref().map(sealed_bytes),
            access_key: key_of(s.access_token.as_ref()),
            refresh: s.refresh_token.as_ref().map(sealed_bytes),
            refresh_key: key_of(s.refresh_token.as_ref()),
            pkce: s.pkce_verifier.as_ref().map(sealed_bytes),
            pkce_key: key_of(s.pkce_verifier.as_ref()),
            state: s.state.as_str(),
            failure: s.failure_reason.map(FailureReason::as_str),
            state_hash: s.state_hash.map(|h| h.to_vec()),
            s,
        }
    }

    pub(crate) fn params(&self) -> [&(dyn ToSql + Sync); 24] {
        let s = &self.s;
        [
            &self.id,
            &s.app_id,
            &s.user_id,
            &s.open_id,
            &s.union_id,
            &self.state,
            &self.failure,
            &s.card_message_id,
            &self.times[0],
            &self.times[1],
            &self.times[2],
            &self.access,
            &self.access_key,
            &self.refresh,
            &self.refresh_key,
            &self.token_times[0],
            &self.token_times[1],
            &s.scopes,
            &s.user_name,
            &s.user_email,
            &s.avatar_url,
            &self.state_hash,
            &self.pkce,
            &self.pkce_key,
        ]
    }
}

fn get<'r, T: tokio_postgres::types::FromSql<'r>>(row: &'r Row, col: &str) -> Result<T> {
    row.try_get(col).map_err(|e| pg_err(&e))
}

fn time(row: &Row, col: &str, table: &'static str) -> Result<u64> {
    api_time(get(row, col)?, table)
}

fn time_opt(row: &Row, col: &str, table: &'static str) -> Result<Option<u64>> {
    get::<Option<i64>>(row, col)?
        .map(|v| api_time(v, table))
        .transpose()
}

fn failure_from(s: &str) -> Result<FailureReason> {
    FailureReason::ALL
        .into_iter()
        .find(|f| f.as_str() == s)
        .ok_or_else(|| Error::Decode {
            table: SESSIONS_TABLE,
            detail: format!("unknown failure reason {s:?}"),
        })
}

/// A session row (every column of [`SESSION_COLUMNS`]) as its id and stored (sealed) form.
pub(crate) fn stored_session(row: &Row) -> Result<(SessionId, StoredSession)> {
    let t = SESSIONS_TABLE;
    let id = id_from(t, &get::<Vec<u8>>(row, "id")?)?;
    let state: SessionState = get::<String>(row, "state")?.parse()?;
    let failure_reason = get::<Option<String>>(row, "failure_reason")?
        .map(|f| failure_from(&f))
        .transpose()?;
    let state_hash = get::<Option<Vec<u8>>>(row, "state_hash")?
        .map(|h| {
            <[u8; 32]>::try_from(h.as_slice()).map_err(|_| Error::Decode {
                table: t,
                detail: "state hash is not 32 bytes".to_owned(),
            })
        })
        .transpose()?;
    let sealed =
        |c: &str, k: &str| -> Result<Option<Sealed>> { sealed_from(t, get(row, c)?, get(row, k)?) };
    let plain = PlainSession {
        app_id: get(row, "app_id")?,
        user_id: get(row, "user_id")?,
        open_id: get(row, "open_id")?,
        union_id: get(row, "union_id")?,
        state,
        failure_reason,
        card_message_id: get(row, "card_message_id")?,
        created_at: time(row, "created_at", t)?,
        updated_at: time(row, "updated_at", t)?,
        expires_at: time(row, "expires_at", t)?,
        token_expires_at: time_opt(row, "token_expires_at", t)?,
        refresh_token_expires_at: time_opt(row, "refresh_token_expires_at", t)?,
        scopes: get(row, "scopes")?,
        user_name: get(row, "user_name")?,
        user_email: get(row, "user_email")?,
        avatar_url: get(row, "avatar_url")?,
    };
    let stored = session_from!(StoredSession {
        session_id: (),
        access_token: sealed("access_token", "access_token_key")?,
        refresh_token: sealed("refresh_token", "refresh_token_key")?,
        state_hash: state_hash,
        pkce_verifier: sealed("pkce_verifier", "pkce_verifier_key")?,
    } from plain);
    Ok((id, stored))
}

/// The plain fields of a session row, read once (the source `session_from!` copies from).
struct PlainSession {
    app_id: String,
    user_id: String,
    open_id: Option<String>,
    union_id: Option<String>,
    state: SessionState,
    failure_reason: Option<FailureReason>,
    card_message_id: Option<String>,
    created_at: u64,
    updated_at: u64,
    expires_at: u64,
    token_expires_at: Option<u64>,
    refresh_token_expires_at: Option<u64>,
    scopes: Vec<String>,
    user_name: Option<String>,
    user_email: Option<String>,
    avatar_url: Option<String>,
}

/// The columns of `ls_tokens`, in the order [`TokenParams::params`] binds them.
pub(crate) const TOKEN_COLUMNS: &str = "app_id, user_id, open_id, access_token, \
     access_token_key, refresh_token, refresh_token_key, expires_at, refresh_expires_at, \
     refresh_due_at, scopes, obtained_at, session_id, needs_reauth, refresh_in_doubt_since";

/// The bound values of one `ls_tokens` row.
pub(crate) struct TokenParams {
    app_id: String,
    user_id: String,
    t: StoredToken,
    access: Vec<u8>,
    access_key: i64,
    refresh: Option<Vec<u8>>,
    refresh_key: Option<i64>,
    times: [i64; 3],
    refresh_expires_at: Option<i64>,
    session_id: Option<Vec<u8>>,
    in_doubt: Option<i64>,
}

impl TokenParams {
    pub(crate) fn new(app_id: &str, user_id: &str, t: StoredToken) -> Self {
        Self {
            app_id: app_id.to_owned(),
            user_id: user_id.to_owned(),
            access: sealed_bytes(&t.access_token),
            access_key: i64::from(t.access_token.key_id.0),
            refresh: t.refresh_token.as_ref().map(sealed_bytes),
            refresh_key: key_of(t.refresh_token.as_ref()),
            times: [
                db_time(t.expires_at),
                db_time(t.refresh_due_at),
                db_time(t.obtained_at),
            ],
            refresh_expires_at: opt_time(t.refresh_expires_at),
            session_id: t.session_id.map(id_bytes),
            in_doubt: opt_time(t.refresh_in_doubt_since),
            t,
        }
    }

    pub(crate) fn params(&self) -> [&(dyn ToSql + Sync); 15] {
        [
            &self.app_id,
            &self.user_id,
            &self.t.open_id,
            &self.access,
            &self.access_key,
            &self.refresh,
            &self.refresh_key,
            &self.times[0],
            &self.refresh_expires_at,
            &self.times[1],
            &self.t.scopes,
            &self.times[2],
            &self.session_id,
            &self.t.needs_reauth,
            &self.in_doubt,
        ]
    }
}

/// A token row (every column of [`TOKEN_COLUMNS`]) as its stored (sealed) form.
pub(crate) fn stored_token(row: &Row) -> Result<StoredToken> {
    let t = TOKENS_TABLE;
    let access = sealed_from(t, get(row, "access_token")?, get(row, "access_token_key")?)?
        .ok_or_else(|| Error::Decode {
            table: t,
            detail: "no access token".to_owned(),
        })?;
    Ok(StoredToken {
        open_id: get(row, "open_id")?,
        access_token: access,
        refresh_token: sealed_from(
            t,
            get(row, "refresh_token")?,
            get(row, "refresh_token_key")?,
        )?,
        expires_at: time(row, "expires_at", t)?,
        refresh_expires_at: time_opt(row, "refresh_expires_at", t)?,
        refresh_due_at: time(row, "refresh_due_at", t)?,
        scopes: get(row, "scopes")?,
        obtained_at: time(row, "obtained_at", t)?,
        session_id: get::<Option<Vec<u8>>>(row, "session_id")?
            .map(|b| id_from(t, &b))
            .transpose()?,
        needs_reauth: get(row, "needs_reauth")?,
        refresh_in_doubt_since: time_opt(row, "refresh_in_doubt_since", t)?,
    })
}

/// A user row.
pub(crate) fn user(row: &Row) -> Result<UserInfo> {
    Ok(UserInfo {
        app_id: get(row, "app_id")?,
        open_id: get(row, "open_id")?,
        user_id: get(row, "user_id")?,
        union_id: get(row, "union_id")?,
        name: get(row, "name")?,
        email: get(row, "email")?,
        avatar_url: get(row, "avatar_url")?,
        updated_at: time(row, "updated_at", "users")?,
    })
}
