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

/// One authorization session (the fields of the Python service's `user_auth_sessions`), in
/// any of its forms: the one field list every form shares. Times are unix milliseconds.
///
/// `S` is how a secret is held: [`SecretString`] in the caller's [`AuthSession`], `Sealed` in
/// the stored form, `ExportToken` in an export row (`changes::ExportRow`). `K` is the session
/// id: [`SessionId`], or `()` in the stored form, whose id is its row key (never encoded: the
/// stored bytes hold the other fields in this order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord<S, K = SessionId> {
    /// Random 128-bit id.
    #[serde(skip)]
    pub session_id: K,
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
    pub access_token: Option<S>,
    /// Refresh token obtained on completion.
    pub refresh_token: Option<S>,
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
    pub pkce_verifier: Option<S>,
}

/// One authorization session as callers see it: secrets in the clear (`Debug` redacts them).
pub type AuthSession = SessionRecord<SecretString>;

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
    /// Set (to when it was sent, unix ms) when a refresh of this token went out and its answer
    /// was lost (timeout, dropped connection, 5xx): the platform may have rotated the refresh
    /// token. While set, the refresh token must not be presented again until a check decides
    /// what happened (see `auth::flow`). `None`: the last refresh's outcome is known.
    pub refresh_in_doubt_since: Option<u64>,
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

/// Builds one form of a session record from another (a [`SessionRecord`], or the frozen
/// [`StoredSessionV1`]). The fields that carry over as they are (no secret, nothing derived)
/// are copied; the caller gives the others (`{ field: value, … }`): the id, the secrets and
/// the OAuth binding. A field neither copied nor given does not compile. `from` is read,
/// never moved.
macro_rules! session_from {
    ($target:ident { $($field:ident: $value:expr),* $(,)? } from $src:expr) => {{
        let src = &$src;
        $target {
            app_id: src.app_id.clone(),
            user_id: src.user_id.clone(),
            open_id: src.open_id.clone(),
            union_id: src.union_id.clone(),
            state: src.state,
            failure_reason: src.failure_reason,
            card_message_id: src.card_message_id.clone(),
            created_at: src.created_at,
            updated_at: src.updated_at,
            expires_at: src.expires_at,
            token_expires_at: src.token_expires_at,
            refresh_token_expires_at: src.refresh_token_expires_at,
            scopes: src.scopes.clone(),
            user_name: src.user_name.clone(),
            user_email: src.user_email.clone(),
            avatar_url: src.avatar_url.clone(),
            $($field: $value,)*
        }
    }};
}
pub(crate) use session_from;

/// Session as stored, version 2 (current): every secret sealed, the id left to the row key.
/// (`Debug` shows sealed fields only as key id and length.)
pub(crate) type StoredSession = SessionRecord<Sealed, ()>;

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
        session_from!(StoredSession {
            session_id: (),
            access_token: v.access_token.clone(),
            refresh_token: v.refresh_token.clone(),
            state_hash: None,
            pkce_verifier: None,
        } from v)
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
        session_from!(StoredSession {
            session_id: (),
            access_token: seal("access_token", &s.access_token),
            refresh_token: seal("refresh_token", &s.refresh_token),
            state_hash: s.state_hash,
            pkce_verifier: seal("pkce_verifier", &s.pkce_verifier),
        } from s)
    }

    pub(crate) fn open(self, id: SessionId, ring: &Keyring) -> Result<AuthSession> {
        let row = id.to_bytes();
        let open = |field: &str, v: &Option<Sealed>| {
            v.as_ref()
                .map(|t| {
                    ring.open_str(
                        t,
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
        Ok(session_from!(AuthSession {
            session_id: id,
            access_token: open("access_token", &self.access_token)?,
            refresh_token: open("refresh_token", &self.refresh_token)?,
            pkce_verifier: open("pkce_verifier", &self.pkce_verifier)?,
            state_hash: self.state_hash,
        } from self))
    }

    /// The session as readers see it, given its entry in `sessions_expired` (the time the
    /// sweep expired it, if it did so without rewriting the record): a pending record with an
    /// entry is expired at that time. Fail closed: a pending session the sweep expired is never
    /// read as pending.
    pub(crate) fn overlay(mut self, expired_at: Option<u64>) -> Self {
        if let Some(at) = expired_at {
            if self.state == SessionState::Pending {
                self.expire(at);
            }
        }
        self
    }

    /// What the sweep does to a pending session whose time is up.
    pub(crate) fn expire(&mut self, now: u64) {
        self.state = SessionState::Expired;
        self.failure_reason = Some(FailureReason::SessionExpired);
        self.updated_at = now;
        self.pkce_verifier = None;
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

/// The leading fields of a version-2 session record, borrowed from its bytes.
#[derive(Deserialize)]
struct SessionIds<'a> {
    app_id: &'a str,
    user_id: &'a str,
    _open_id: Option<&'a str>,
    _union_id: Option<&'a str>,
}

/// The status fields that follow [`SessionIds`].
#[derive(Serialize, Deserialize)]
struct SessionStatus<'a> {
    state: SessionState,
    failure_reason: Option<FailureReason>,
    card_message_id: Option<&'a str>,
    created_at: u64,
    updated_at: u64,
    expires_at: u64,
}

/// A sealed field, borrowed: its bytes are carried over as they are.
#[derive(Deserialize)]
struct SealedRef<'a> {
    _key_id: u32,
    _nonce: [u8; 24],
    _ct: &'a [u8],
}

/// The fields after [`SessionStatus`] up to the PKCE verifier, which is last.
#[derive(Deserialize)]
struct SessionMiddle<'a> {
    #[serde(borrow)]
    _access_token: Option<SealedRef<'a>>,
    #[serde(borrow)]
    _refresh_token: Option<SealedRef<'a>>,
    _token_expires_at: Option<u64>,
    _refresh_token_expires_at: Option<u64>,
    _scopes: SkipStrs,
    _user_name: Option<&'a str>,
    _user_email: Option<&'a str>,
    _avatar_url: Option<&'a str>,
    state_hash: Option<[u8; 32]>,
}

/// A sequence of strings, read past without keeping (or allocating) anything.
struct SkipStrs;

impl<'de> Deserialize<'de> for SkipStrs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = SkipStrs;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sequence of strings")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<SkipStrs, A::Error> {
                while seq.next_element::<&'de str>()?.is_some() {}
                Ok(SkipStrs)
            }
        }
        d.deserialize_seq(Visit)
    }
}

fn borrow_part<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<(T, usize)> {
    bincode::serde::borrow_decode_from_slice(bytes, bincode_cfg()).map_err(|e| Error::Decode {
        table: SESSIONS_TABLE,
        detail: e.to_string(),
    })
}

/// What the sweep reads of a stored session, found in its bytes without decoding (allocating)
/// the rest of it (the PKCE verifier and the sealed fields after it are not read).
pub(crate) struct SessionPeek<'a> {
    pub app_id: &'a str,
    pub user_id: &'a str,
    pub state: SessionState,
    pub card_message_id: Option<&'a str>,
    pub updated_at: u64,
    pub expires_at: u64,
    pub state_hash: Option<[u8; 32]>,
}

impl<'a> SessionPeek<'a> {
    /// Reads a stored session record; `None` if it is not of the current version (the caller
    /// then decodes it in full).
    pub(crate) fn new(bytes: &'a [u8]) -> Result<Option<Self>> {
        let (v, _) = split_version(SESSIONS_TABLE, bytes)?;
        if v != SESSION_VERSION {
            return Ok(None);
        }
        let status_at = 1;
        let (ids, n) = borrow_part::<SessionIds<'a>>(&bytes[status_at..])?;
        let status_at = status_at + n;
        let (status, n) = borrow_part::<SessionStatus<'a>>(&bytes[status_at..])?;
        let middle_at = status_at + n;
        let (middle, _) = borrow_part::<SessionMiddle<'a>>(&bytes[middle_at..])?;
        Ok(Some(Self {
            app_id: ids.app_id,
            user_id: ids.user_id,
            state: status.state,
            card_message_id: status.card_message_id,
            updated_at: status.updated_at,
            expires_at: status.expires_at,
            state_hash: middle.state_hash,
        }))
    }
}

/// Token as stored (version 2: version 1 and `refresh_in_doubt_since`).
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
    pub refresh_in_doubt_since: Option<u64>,
}

/// Token as stored by version 1 (read only).
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct StoredTokenV1 {
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

impl From<StoredTokenV1> for StoredToken {
    fn from(v: StoredTokenV1) -> Self {
        Self {
            open_id: v.open_id,
            access_token: v.access_token,
            refresh_token: v.refresh_token,
            expires_at: v.expires_at,
            refresh_expires_at: v.refresh_expires_at,
            refresh_due_at: v.refresh_due_at,
            scopes: v.scopes,
            obtained_at: v.obtained_at,
            session_id: v.session_id,
            needs_reauth: v.needs_reauth,
            refresh_in_doubt_since: None,
        }
    }
}

pub(crate) const TOKEN_VERSION: u8 = 2;
pub(crate) const TOKENS_TABLE: &str = "tokens";

/// The row key of a token: app id and user id, length-prefixed.
pub(crate) fn token_row(app_id: &str, user_id: &str) -> Vec<u8> {
    let mut row = Vec::with_capacity(app_id.len() + user_id.len() + 8);
    // App ids are short (validated at the API); saturating keeps the cast honest.
    row.extend_from_slice(
        &u32::try_from(app_id.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    row.extend_from_slice(app_id.as_bytes());
    row.extend_from_slice(user_id.as_bytes());
    row
}

impl StoredToken {
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        let (v, rest) = split_version(TOKENS_TABLE, bytes)?;
        match v {
            1 => decode::<StoredTokenV1>(TOKENS_TABLE, rest).map(Into::into),
            2 => decode(TOKENS_TABLE, rest),
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
            refresh_in_doubt_since: t.refresh_in_doubt_since,
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
            refresh_in_doubt_since: self.refresh_in_doubt_since,
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::storage::envelope::KeyId;

    fn sealed() -> impl Strategy<Value = Option<Sealed>> {
        proptest::option::of(
            (
                any::<u32>(),
                any::<[u8; 24]>(),
                proptest::collection::vec(any::<u8>(), 0..300),
            )
                .prop_map(|(k, nonce, ct)| Sealed {
                    key_id: KeyId(k),
                    nonce,
                    ct,
                }),
        )
    }

    fn text() -> impl Strategy<Value = String> {
        // Lengths around bincode's one-byte varint limit (250) too.
        prop_oneof!["[a-z_0-9]{0,12}", "\\PC{0,40}", "[a-z]{249,253}"]
    }

    /// Numbers on both sides of bincode's varint size steps.
    fn number() -> impl Strategy<Value = u64> {
        prop_oneof![
            0u64..300,
            Just(250u64),
            Just(251u64),
            Just(u64::from(u16::MAX)),
            Just(u64::from(u16::MAX) + 1),
            Just(u64::from(u32::MAX)),
            Just(u64::from(u32::MAX) + 1),
            Just(u64::MAX),
            any::<u64>(),
        ]
    }

    fn state() -> impl Strategy<Value = SessionState> {
        proptest::sample::select(SessionState::ALL.to_vec())
    }

    prop_compose! {
        fn stored()(
            ids in (text(), text(), proptest::option::of(text()), proptest::option::of(text())),
            status in (state(), proptest::option::of(proptest::sample::select(FailureReason::ALL.to_vec())),
                proptest::option::of(text()), number(), number(), number()),
            tokens in (sealed(), sealed(), proptest::option::of(number()), proptest::option::of(number())),
            rest in (proptest::collection::vec(text(), 0..4), proptest::option::of(text()),
                proptest::option::of(text()), proptest::option::of(text()),
                proptest::option::of(any::<[u8; 32]>()), sealed()),
        ) -> StoredSession {
            StoredSession {
                session_id: (),
                app_id: ids.0,
                user_id: ids.1,
                open_id: ids.2,
                union_id: ids.3,
                state: status.0,
                failure_reason: status.1,
                card_message_id: status.2,
                created_at: status.3,
                updated_at: status.4,
                expires_at: status.5,
                access_token: tokens.0,
                refresh_token: tokens.1,
                token_expires_at: tokens.2,
                refresh_token_expires_at: tokens.3,
                scopes: rest.0,
                user_name: rest.1,
                user_email: rest.2,
                avatar_url: rest.3,
                state_hash: rest.4,
                pkce_verifier: rest.5,
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        /// The sweep's view of a record reads the same fields a full decode does, and a
        /// record read with the sweep's mark is the record expired.
        #[test]
        fn peek_and_expire_agree_with_a_full_decode(s in stored(), now in number()) {
            let bytes = s.encode();
            let peek = SessionPeek::new(&bytes).unwrap().unwrap();
            prop_assert_eq!(peek.app_id, s.app_id.as_str());
            prop_assert_eq!(peek.user_id, s.user_id.as_str());
            prop_assert_eq!(peek.state, s.state);
            prop_assert_eq!(peek.card_message_id, s.card_message_id.as_deref());
            prop_assert_eq!(peek.updated_at, s.updated_at);
            prop_assert_eq!(peek.expires_at, s.expires_at);
            prop_assert_eq!(peek.state_hash, s.state_hash);
            // A mark expires a pending session as the sweep's rewrite did, and changes
            // nothing else; a session that is no longer pending is left as it is.
            let marked = s.clone().overlay(Some(now));
            let unmarked = s.clone().overlay(None);
            prop_assert_eq!(unmarked.encode(), bytes.clone());
            if s.state == SessionState::Pending {
                let mut slow = s.clone();
                slow.expire(now);
                prop_assert_eq!(marked.encode(), slow.encode());
                prop_assert_eq!(marked.state, SessionState::Expired);
                prop_assert_eq!(marked.failure_reason, Some(FailureReason::SessionExpired));
                prop_assert_eq!(marked.updated_at, now);
                prop_assert!(marked.pkce_verifier.is_none());
                prop_assert_eq!(marked.access_token, s.access_token);
            } else {
                prop_assert_eq!(marked.encode(), bytes);
            }
        }
    }

    proptest! {
        /// The stored form encodes no session id (it is the row key) and keeps the schema-1
        /// field order: its body is a version-1 body followed by the two fields version 2
        /// added. The caller's form, sealed and opened again, is the same session.
        #[test]
        fn the_stored_form_is_the_version_1_layout_plus_the_oauth_binding(s in stored()) {
            let v1 = session_from!(StoredSessionV1 {
                access_token: s.access_token.clone(),
                refresh_token: s.refresh_token.clone(),
            } from s);
            let mut want = encode(SESSION_VERSION, &v1);
            want.extend(bincode::serde::encode_to_vec(s.state_hash, bincode_cfg()).unwrap());
            want.extend(bincode::serde::encode_to_vec(&s.pkce_verifier, bincode_cfg()).unwrap());
            prop_assert_eq!(s.encode(), want);
        }
    }

    #[test]
    fn a_session_sealed_and_opened_is_the_same_session() {
        use secrecy::ExposeSecret;
        let ring = Keyring::new(crate::storage::envelope::Key::generate().0, Vec::new());
        let mut a = AuthSession::new_pending("app", "u", vec!["s".into()], 10, 5);
        a.access_token = Some("at".into());
        a.refresh_token = Some("rt".into());
        a.pkce_verifier = Some("pv".into());
        a.state_hash = Some([7; 32]);
        let stored = StoredSession::seal(&a, &ring);
        let back = StoredSession::decode(&stored.encode())
            .unwrap()
            .open(a.session_id, &ring)
            .unwrap();
        assert_eq!(back.session_id, a.session_id);
        assert_eq!(back.app_id, "app");
        assert_eq!(back.expires_at, 15);
        assert_eq!(back.state_hash, Some([7; 32]));
        let secret = |v: &Option<SecretString>| v.as_ref().map(|s| s.expose_secret().to_owned());
        assert_eq!(secret(&back.access_token).as_deref(), Some("at"));
        assert_eq!(secret(&back.refresh_token).as_deref(), Some("rt"));
        assert_eq!(secret(&back.pkce_verifier).as_deref(), Some("pv"));
        // Opened under another id, the sealed fields do not open.
        assert!(StoredSession::seal(&a, &ring)
            .open(SessionId(a.session_id.0 ^ 1), &ring)
            .is_err());
    }

    #[test]
    fn peek_leaves_older_versions_to_the_full_decoder() {
        let v1 = encode(
            1,
            &StoredSessionV1 {
                app_id: "a".into(),
                user_id: "u".into(),
                open_id: None,
                union_id: None,
                state: SessionState::Pending,
                failure_reason: None,
                card_message_id: None,
                created_at: 1,
                updated_at: 1,
                expires_at: 2,
                access_token: None,
                refresh_token: None,
                token_expires_at: None,
                refresh_token_expires_at: None,
                scopes: vec![],
                user_name: None,
                user_email: None,
                avatar_url: None,
            },
        );
        assert!(SessionPeek::new(&v1).unwrap().is_none());
        // A damaged current record is an error, not a panic.
        let mut bad = StoredSession::decode(&v1).unwrap().encode();
        bad.truncate(bad.len() / 2);
        assert!(SessionPeek::new(&bad).is_err());
    }
}
