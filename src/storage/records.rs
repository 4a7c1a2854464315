//! The records callers read and write, and their stored (versioned, sealed) forms.
//!
//! Callers see plain records with secrets as `SecretString`. The store converts them to a stored
//! form in which every secret is `Sealed`, encodes that with bincode and prefixes a version byte.
//! Each older stored version keeps its decoder here, beside the current one.

use std::fmt;
use std::str::FromStr;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::envelope::{Keyring, OpenError, Place, Sealed};
use super::error::{Error, Result};

/// A random 128-bit session id, shown as 32 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SessionId(pub u128);

impl SessionId {
    /// A fresh random id.
    #[must_use]
    pub fn random() -> Self {
        Self(rand::random::<u128>())
    }

    /// Big-endian bytes: the row key used in associated data.
    #[must_use]
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

impl FromStr for SessionId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.len() != 32 {
            return Err(Error::Invalid(format!(
                "session id must be 32 hex characters, got {} characters",
                s.len()
            )));
        }
        u128::from_str_radix(s, 16)
            .map(Self)
            .map_err(|_| Error::Invalid("session id must be 32 hex characters".to_owned()))
    }
}

/// Where a session is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SessionState {
    /// Card sent, waiting for the user.
    Pending,
    /// Tokens obtained.
    Completed,
    /// Nobody answered in time.
    Expired,
    /// OAuth failed (see the failure reason).
    Failed,
    /// The user said no.
    Rejected,
    /// An operator revoked the authorization; its tokens were deleted.
    Revoked,
}

impl SessionState {
    /// Every state, for listing and metrics.
    pub const ALL: [Self; 6] = [
        Self::Pending,
        Self::Completed,
        Self::Expired,
        Self::Failed,
        Self::Rejected,
        Self::Revoked,
    ];

    /// Lowercase name as operators know it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Completed => "completed",
            Self::Expired => "expired",
            Self::Failed => "failed",
            Self::Rejected => "rejected",
            Self::Revoked => "revoked",
        }
    }

    /// True for every state but pending.
    #[must_use]
    pub fn is_terminal(self) -> bool {
        self != Self::Pending
    }
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SessionState {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown session state {s:?}; expected one of pending, completed, expired, failed, rejected, revoked"
                ))
            })
    }
}

/// Why a session failed, with the names operators already alert on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FailureReason {
    /// The authorization code had expired when exchanged.
    CodeExpired,
    /// The redirect carried no code.
    MissingCode,
    /// The user declined.
    UserRejected,
    /// The redirect's state did not match a live session.
    StateMismatch,
    /// The session expired before completion.
    SessionExpired,
    /// Anything else.
    UnknownError,
}

impl FailureReason {
    /// Every reason, for metrics.
    pub const ALL: [Self; 6] = [
        Self::CodeExpired,
        Self::MissingCode,
        Self::UserRejected,
        Self::StateMismatch,
        Self::SessionExpired,
        Self::UnknownError,
    ];

    /// The label value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CodeExpired => "code_expired",
            Self::MissingCode => "missing_code",
            Self::UserRejected => "user_rejected",
            Self::StateMismatch => "state_mismatch",
            Self::SessionExpired => "session_expired",
            Self::UnknownError => "unknown_error",
        }
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One authorization session (the fields of the Python service's `user_auth_sessions`).
/// Times are unix milliseconds.
#[derive(Clone, Debug)]
pub struct AuthSession {
    /// Random 128-bit id.
    pub session_id: SessionId,
    /// The Lark app.
    pub app_id: String,
    /// The user the card went to (user_id, or open_id when only that is known).
    pub user_id: String,
    /// open_id, once known.
    pub open_id: Option<String>,
    /// union_id, once known.
    pub union_id: Option<String>,
    /// Life-cycle state.
    pub state: SessionState,
    /// Why it failed, for failed/expired/rejected.
    pub failure_reason: Option<FailureReason>,
    /// The card's message id, for patching it.
    pub card_message_id: Option<String>,
    /// Created (ms).
    pub created_at: u64,
    /// Last changed (ms).
    pub updated_at: u64,
    /// A pending session expires at (ms).
    pub expires_at: u64,
    /// Access token obtained on completion.
    pub access_token: Option<SecretString>,
    /// Refresh token obtained on completion.
    pub refresh_token: Option<SecretString>,
    /// Access token expiry (ms).
    pub token_expires_at: Option<u64>,
    /// Refresh token expiry (ms).
    pub refresh_token_expires_at: Option<u64>,
    /// Requested scopes.
    pub scopes: Vec<String>,
    /// Display name from user info.
    pub user_name: Option<String>,
    /// Email from user info.
    pub user_email: Option<String>,
    /// Avatar URL from user info.
    pub avatar_url: Option<String>,
    /// SHA-256 of the OAuth `state` bound to this session (the state itself is never stored).
    pub state_hash: Option<[u8; 32]>,
    /// PKCE code verifier for the OAuth exchange.
    pub pkce_verifier: Option<SecretString>,
}

impl AuthSession {
    /// A new pending session with nothing else known.
    #[must_use]
    pub fn new_pending(
        app_id: &str,
        user_id: &str,
        scopes: Vec<String>,
        now: u64,
        ttl_ms: u64,
    ) -> Self {
        Self {
            session_id: SessionId::random(),
            app_id: app_id.to_owned(),
            user_id: user_id.to_owned(),
            open_id: None,
            union_id: None,
            state: SessionState::Pending,
            failure_reason: None,
            card_message_id: None,
            created_at: now,
            updated_at: now,
            expires_at: now.saturating_add(ttl_ms),
            access_token: None,
            refresh_token: None,
            token_expires_at: None,
            refresh_token_expires_at: None,
            scopes,
            user_name: None,
            user_email: None,
            avatar_url: None,
            state_hash: None,
            pkce_verifier: None,
        }
    }
}

/// The current token of one user.
#[derive(Clone, Debug)]
pub struct UserToken {
    /// The Lark app.
    pub app_id: String,
    /// The user.
    pub user_id: String,
    /// open_id, when known.
    pub open_id: Option<String>,
    /// The access token.
    pub access_token: SecretString,
    /// The refresh token, when granted (`offline_access`).
    pub refresh_token: Option<SecretString>,
    /// Access token expiry (ms).
    pub expires_at: u64,
    /// Refresh token expiry (ms).
    pub refresh_expires_at: Option<u64>,
    /// When the refresh worker should refresh it (ms), set by the caller's policy.
    pub refresh_due_at: u64,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// When obtained (ms).
    pub obtained_at: u64,
    /// The session that produced it.
    pub session_id: Option<SessionId>,
    /// Refresh failed for good: the user must authorize again.
    pub needs_reauth: bool,
}

/// What the service knows of a user (no secrets).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// The Lark app.
    pub app_id: String,
    /// open_id (the key).
    pub open_id: String,
    /// user_id, when known.
    pub user_id: Option<String>,
    /// union_id, when known.
    pub union_id: Option<String>,
    /// Display name.
    pub name: Option<String>,
    /// Email.
    pub email: Option<String>,
    /// Avatar URL.
    pub avatar_url: Option<String>,
    /// Last refreshed (ms).
    pub updated_at: u64,
}

// ---------------------------------------------------------------------------------------------
// Stored forms.

fn bincode_cfg() -> bincode::config::Configuration {
    bincode::config::standard()
}

pub(crate) fn encode<T: Serialize>(version: u8, value: &T) -> Vec<u8> {
    let mut out = vec![version];
    // Serialising plain structs into a Vec cannot fail.
    let body = bincode::serde::encode_to_vec(value, bincode_cfg()).unwrap_or_default();
    out.extend_from_slice(&body);
    out
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    table: &'static str,
    bytes: &[u8],
) -> Result<T> {
    let (v, n) =
        bincode::serde::decode_from_slice(bytes, bincode_cfg()).map_err(|e| Error::Decode {
            table,
            detail: e.to_string(),
        })?;
    if n != bytes.len() {
        return Err(Error::Decode {
            table,
            detail: format!("{} trailing bytes", bytes.len() - n),
        });
    }
    Ok(v)
}

fn split_version<'b>(table: &'static str, bytes: &'b [u8]) -> Result<(u8, &'b [u8])> {
    bytes
        .split_first()
        .map(|(v, rest)| (*v, rest))
        .ok_or(Error::Decode {
            table,
            detail: "empty value".to_owned(),
        })
}

fn open_err(table: &'static str, field: &str, e: &OpenError) -> Error {
    Error::Decrypt {
        table,
        detail: format!("field {field}: {e}"),
    }
}

/// Session as stored, version 2 (current).
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct StoredSession {
    pub app_id: String,
    pub user_id: String,
    pub open_id: Option<String>,
    pub union_id: Option<String>,
    pub state: SessionState,
    pub failure_reason: Option<FailureReason>,
    pub card_message_id: Option<String>,
    pub created_at: u64,
    pub updated_at: u64,
    pub expires_at: u64,
    pub access_token: Option<Sealed>,
    pub refresh_token: Option<Sealed>,
    pub token_expires_at: Option<u64>,
    pub refresh_token_expires_at: Option<u64>,
    pub scopes: Vec<String>,
    pub user_name: Option<String>,
    pub user_email: Option<String>,
    pub avatar_url: Option<String>,
    pub state_hash: Option<[u8; 32]>,
    pub pkce_verifier: Option<Sealed>,
}

/// Session as stored by schema 1 (no OAuth state binding yet).
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredSessionV1 {
    pub app_id: String,
    pub user_id: String,
    pub open_id: Option<String>,
    pub union_id: Option<String>,
    pub state: SessionState,
    pub failure_reason: Option<FailureReason>,
    pub card_message_id: Option<String>,
    pub created_at: u64,
    pub updated_at: u64,
    pub expires_at: u64,
    pub access_token: Option<Sealed>,
    pub refresh_token: Option<Sealed>,
    pub token_expires_at: Option<u64>,
    pub refresh_token_expires_at: Option<u64>,
    pub scopes: Vec<String>,
    pub user_name: Option<String>,
    pub user_email: Option<String>,
    pub avatar_url: Option<String>,
}

impl From<StoredSessionV1> for StoredSession {
    fn from(v: StoredSessionV1) -> Self {
        Self {
            app_id: v.app_id,
            user_id: v.user_id,
            open_id: v.open_id,
            union_id: v.union_id,
            state: v.state,
            failure_reason: v.failure_reason,
            card_message_id: v.card_message_id,
            created_at: v.created_at,
            updated_at: v.updated_at,
            expires_at: v.expires_at,
            access_token: v.access_token,
            refresh_token: v.refresh_token,
            token_expires_at: v.token_expires_at,
            refresh_token_expires_at: v.refresh_token_expires_at,
            scopes: v.scopes,
            user_name: v.user_name,
            user_email: v.user_email,
            avatar_url: v.avatar_url,
            state_hash: None,
            pkce_verifier: None,
        }
    }
}

pub(crate) const SESSION_VERSION: u8 = 2;
pub(crate) const SESSIONS_TABLE: &str = "sessions";

impl StoredSession {
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        let (v, rest) = split_version(SESSIONS_TABLE, bytes)?;
        match v {
            1 => decode::<StoredSessionV1>(SESSIONS_TABLE, rest).map(Into::into),
            2 => decode(SESSIONS_TABLE, rest),
            other => Err(Error::Decode {
                table: SESSIONS_TABLE,
                detail: format!("unknown record version {other}"),
            }),
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        encode(SESSION_VERSION, self)
    }

    pub(crate) fn seal(s: &AuthSession, ring: &Keyring) -> Self {
        let row = s.session_id.to_bytes();
        let seal = |field: &str, v: &Option<SecretString>| {
            v.as_ref().map(|t| {
                ring.seal_str(
                    t,
                    &Place {
                        table: SESSIONS_TABLE,
                        row: &row,
                        field,
                    },
                )
            })
        };
        Self {
            app_id: s.app_id.clone(),
            user_id: s.user_id.clone(),
            open_id: s.open_id.clone(),
            union_id: s.union_id.clone(),
            state: s.state,
            failure_reason: s.failure_reason,
            card_message_id: s.card_message_id.clone(),
            created_at: s.created_at,
            updated_at: s.updated_at,
            expires_at: s.expires_at,
            access_token: seal("access_token", &s.access_token),
            refresh_token: seal("refresh_token", &s.refresh_token),
            token_expires_at: s.token_expires_at,
            refresh_token_expires_at: s.refresh_token_expires_at,
            scopes: s.scopes.clone(),
            user_name: s.user_name.clone(),
            user_email: s.user_email.clone(),
            avatar_url: s.avatar_url.clone(),
            state_hash: s.state_hash,
            pkce_verifier: seal("pkce_verifier", &s.pkce_verifier),
        }
    }

    pub(crate) fn open(self, id: SessionId, ring: &Keyring) -> Result<AuthSession> {
        let row = id.to_bytes();
        let open = |field: &str, v: Option<Sealed>| {
            v.map(|t| {
                ring.open_str(
                    &t,
                    &Place {
                        table: SESSIONS_TABLE,
                        row: &row,
                        field,
                    },
                )
                .map_err(|e| open_err(SESSIONS_TABLE, field, &e))
            })
            .transpose()
        };
        Ok(AuthSession {
            session_id: id,
            access_token: open("access_token", self.access_token)?,
            refresh_token: open("refresh_token", self.refresh_token)?,
            pkce_verifier: open("pkce_verifier", self.pkce_verifier)?,
            app_id: self.app_id,
            user_id: self.user_id,
            open_id: self.open_id,
            union_id: self.union_id,
            state: self.state,
            failure_reason: self.failure_reason,
            card_message_id: self.card_message_id,
            created_at: self.created_at,
            updated_at: self.updated_at,
            expires_at: self.expires_at,
            token_expires_at: self.token_expires_at,
            refresh_token_expires_at: self.refresh_token_expires_at,
            scopes: self.scopes,
            user_name: self.user_name,
            user_email: self.user_email,
            avatar_url: self.avatar_url,
            state_hash: self.state_hash,
        })
    }

    /// Mutable references to every sealed field with its field name.
    pub(crate) fn sealed_fields(&mut self) -> Vec<(&'static str, &mut Sealed)> {
        let mut out = Vec::new();
        if let Some(s) = self.access_token.as_mut() {
            out.push(("access_token", s));
        }
        if let Some(s) = self.refresh_token.as_mut() {
            out.push(("refresh_token", s));
        }
        if let Some(s) = self.pkce_verifier.as_mut() {
            out.push(("pkce_verifier", s));
        }
        out
    }
}

/// Token as stored (version 1).
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct StoredToken {
    pub open_id: Option<String>,
    pub access_token: Sealed,
    pub refresh_token: Option<Sealed>,
    pub expires_at: u64,
    pub refresh_expires_at: Option<u64>,
    pub refresh_due_at: u64,
    pub scopes: Vec<String>,
    pub obtained_at: u64,
    pub session_id: Option<SessionId>,
    pub needs_reauth: bool,
}

pub(crate) const TOKEN_VERSION: u8 = 1;
pub(crate) const TOKENS_TABLE: &str = "tokens";

/// The row key of a token: app id and user id, length-prefixed.
pub(crate) fn token_row(app_id: &str, user_id: &str) -> Vec<u8> {
    let mut row = Vec::with_capacity(app_id.len() + user_id.len() + 8);
    row.extend_from_slice(&(app_id.len() as u32).to_be_bytes());
    row.extend_from_slice(app_id.as_bytes());
    row.extend_from_slice(user_id.as_bytes());
    row
}

impl StoredToken {
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        let (v, rest) = split_version(TOKENS_TABLE, bytes)?;
        match v {
            1 => decode(TOKENS_TABLE, rest),
            other => Err(Error::Decode {
                table: TOKENS_TABLE,
                detail: format!("unknown record version {other}"),
            }),
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        encode(TOKEN_VERSION, self)
    }

    pub(crate) fn seal(t: &UserToken, ring: &Keyring) -> Self {
        let row = token_row(&t.app_id, &t.user_id);
        let place = |field| Place {
            table: TOKENS_TABLE,
            row: &row,
            field,
        };
        Self {
            open_id: t.open_id.clone(),
            access_token: ring.seal_str(&t.access_token, &place("access_token")),
            refresh_token: t
                .refresh_token
                .as_ref()
                .map(|r| ring.seal_str(r, &place("refresh_token"))),
            expires_at: t.expires_at,
            refresh_expires_at: t.refresh_expires_at,
            refresh_due_at: t.refresh_due_at,
            scopes: t.scopes.clone(),
            obtained_at: t.obtained_at,
            session_id: t.session_id,
            needs_reauth: t.needs_reauth,
        }
    }

    pub(crate) fn open(self, app_id: &str, user_id: &str, ring: &Keyring) -> Result<UserToken> {
        let row = token_row(app_id, user_id);
        let open = |field: &'static str, s: &Sealed| {
            ring.open_str(
                s,
                &Place {
                    table: TOKENS_TABLE,
                    row: &row,
                    field,
                },
            )
            .map_err(|e| open_err(TOKENS_TABLE, field, &e))
        };
        Ok(UserToken {
            app_id: app_id.to_owned(),
            user_id: user_id.to_owned(),
            open_id: self.open_id,
            access_token: open("access_token", &self.access_token)?,
            refresh_token: self
                .refresh_token
                .as_ref()
                .map(|s| open("refresh_token", s))
                .transpose()?,
            expires_at: self.expires_at,
            refresh_expires_at: self.refresh_expires_at,
            refresh_due_at: self.refresh_due_at,
            scopes: self.scopes,
            obtained_at: self.obtained_at,
            session_id: self.session_id,
            needs_reauth: self.needs_reauth,
        })
    }

    pub(crate) fn sealed_fields(&mut self) -> Vec<(&'static str, &mut Sealed)> {
        let mut out = vec![("access_token", &mut self.access_token)];
        if let Some(s) = self.refresh_token.as_mut() {
            out.push(("refresh_token", s));
        }
        out
    }
}

pub(crate) const USER_VERSION: u8 = 1;
pub(crate) const USERS_TABLE: &str = "users";

impl UserInfo {
    pub(crate) fn decode_stored(bytes: &[u8]) -> Result<Self> {
        let (v, rest) = split_version(USERS_TABLE, bytes)?;
        match v {
            1 => decode(USERS_TABLE, rest),
            other => Err(Error::Decode {
                table: USERS_TABLE,
                detail: format!("unknown record version {other}"),
            }),
        }
    }
}
