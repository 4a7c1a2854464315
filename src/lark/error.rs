//! The one error type of the Lark OpenAPI client, [`Error`], and its
//! classification (transient or not, token-invalid or not, OAuth kinds).
//!
//! This module owns the mapping from the platform's error codes (protocol
//! notes §4.8) to behaviour. It never carries a request body, a header value
//! or a secret: only codes, the platform's `msg`, the HTTP status and the
//! `log_id` used to trace a call with Lark support.

use std::fmt;
use std::sync::Arc;

/// Body `code` of the platform's rate-limit error (HTTP 429, or 400 on old APIs).
pub const CODE_RATE_LIMITED: i64 = 99_991_400;
/// Authorization header missing or empty.
pub const CODE_AUTH_HEADER_MISSING: i64 = 99_991_661;
/// Access token invalid (tenant token, or generic).
pub const CODE_ACCESS_TOKEN_INVALID: i64 = 99_991_663;
/// `app_access_token` invalid.
pub const CODE_APP_TOKEN_INVALID: i64 = 99_991_664;
/// `user_access_token` invalid: refresh once and retry.
pub const CODE_USER_TOKEN_INVALID: i64 = 99_991_668;
/// Token format error.
pub const CODE_TOKEN_FORMAT: i64 = 99_991_671;
/// `user_access_token` expired: refresh and retry.
pub const CODE_USER_TOKEN_EXPIRED: i64 = 99_991_677;
/// The user has not granted a scope the call needs (incremental authorization).
pub const CODE_USER_SCOPE_NOT_GRANTED: i64 = 99_991_679;
/// OAuth v2 token endpoint: server error, retry.
pub const CODE_OAUTH_SERVER_ERROR: i64 = 20_050;
/// OAuth v2 token endpoint: temporarily unavailable, retry.
pub const CODE_OAUTH_TEMPORARILY_UNAVAILABLE: i64 = 20_072;

/// What a failed OAuth step means for the authorization flow.
///
/// Derived from the v2 token endpoint's `code` / `error` (protocol notes
/// §4.3, §4.8) or from the `error` parameter of the authorize redirect (§4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OAuthErrorKind {
    /// The authorization code is older than 5 minutes (20004): restart the flow.
    CodeExpired,
    /// The code or refresh token cannot be used: already used or unknown
    /// (20003, 20065, 20073), revoked (20064), expired including the 365-day
    /// cap (20037), invalid or a v1 token (20026), issued to another client
    /// (20024), or PKCE verification failed (20049). Restart the flow /
    /// re-authorize the user.
    InvalidGrant,
    /// The user declined on the consent page (`error=access_denied`).
    UserRejected,
    /// The platform's rate limit was hit (HTTP 429 or code 99991400).
    RateLimited,
    /// Server error or temporarily unavailable (20050, 20072, HTTP 5xx): retry later.
    Transient,
    /// The user cannot use the app: user missing (20008), app not installed
    /// (20009), no permission (20010), user status invalid (20066).
    UserNotAllowed,
    /// The app or the request is misconfigured: bad secret (20002), redirect
    /// URI mismatch (20071), app missing/disabled (20048, 20069), refresh not
    /// enabled (20074), malformed or conflicting parameters (20001, 20036,
    /// 20063, 20067, 20068, 20070). An operator must act.
    Misconfigured,
    /// The redirect or response did not have the expected shape.
    InvalidResponse,
    /// Any other code.
    Other,
}

impl OAuthErrorKind {
    /// Classify a v2 token endpoint failure from its body `code`, its
    /// `error` string (RFC 6749 style) and the HTTP status.
    #[must_use]
    pub fn classify(code: i64, error: Option<&str>, status: Option<u16>) -> Self {
        match code {
            20_004 => return Self::CodeExpired,
            20_003 | 20_024 | 20_026 | 20_037 | 20_049 | 20_064 | 20_065 | 20_073 => {
                return Self::InvalidGrant;
            }
            CODE_OAUTH_SERVER_ERROR | CODE_OAUTH_TEMPORARILY_UNAVAILABLE => return Self::Transient,
            CODE_RATE_LIMITED => return Self::RateLimited,
            20_008 | 20_009 | 20_010 | 20_066 => return Self::UserNotAllowed,
            20_001 | 20_002 | 20_036 | 20_048 | 20_063 | 20_067 | 20_068 | 20_069 | 20_070
            | 20_071 | 20_074 => return Self::Misconfigured,
            _ => {}
        }
        match status {
            Some(429) => return Self::RateLimited,
            Some(s) if s >= 500 => return Self::Transient,
            _ => {}
        }
        match error {
            Some("access_denied") => Self::UserRejected,
            Some("invalid_grant") => Self::InvalidGrant,
            Some("server_error" | "temporarily_unavailable") => Self::Transient,
            Some("invalid_client" | "unauthorized_client" | "unsupported_grant_type") => {
                Self::Misconfigured
            }
            _ => Self::Other,
        }
    }

    /// Stable snake_case name, e.g. `code_expired`, for logs and metrics.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CodeExpired => "code_expired",
            Self::InvalidGrant => "invalid_grant",
            Self::UserRejected => "user_rejected",
            Self::RateLimited => "rate_limited",
            Self::Transient => "transient",
            Self::UserNotAllowed => "user_not_allowed",
            Self::Misconfigured => "misconfigured",
            Self::InvalidResponse => "invalid_response",
            Self::Other => "other",
        }
    }
}

impl fmt::Display for OAuthErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Renders an optional log id for `Display`.
struct LogId<'a>(&'a Option<String>);

impl fmt::Display for LogId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(id) => write!(f, ", log_id {id}"),
            None => Ok(()),
        }
    }
}

/// Everything that can go wrong talking to the Lark/Feishu OpenAPI.
///
/// Cheap to clone (the transport cause is shared), so one failed token
/// refresh can be handed to every caller that waited on it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The platform answered with a non-zero business `code`.
    #[error("lark api error {code}: {msg} (http {status}{})", LogId(log_id))]
    Api {
        /// Body `code`.
        code: i64,
        /// Body `msg`.
        msg: String,
        /// HTTP status of the response.
        status: u16,
        /// `X-Tt-Logid` header, or body `error.log_id`.
        log_id: Option<String>,
    },
    /// The OAuth v2 token endpoint, or the authorize redirect, reported a failure.
    #[error("lark oauth error ({kind}): code {code}{}{} (http {}{})",
        error.as_deref().map(|e| format!(", error {e}")).unwrap_or_default(),
        if description.is_empty() { String::new() } else { format!(", {description}") },
        status.map_or_else(|| "-".to_owned(), |s| s.to_string()),
        LogId(log_id))]
    OAuth {
        /// What the failure means for the flow.
        kind: OAuthErrorKind,
        /// Body `code` (0 when the failure came from the redirect).
        code: i64,
        /// RFC 6749 `error` string, e.g. `invalid_grant`, `access_denied`.
        error: Option<String>,
        /// `error_description` or `msg`.
        description: String,
        /// HTTP status; `None` for a failure read from the authorize redirect.
        status: Option<u16>,
        /// `X-Tt-Logid` header, or body `error.log_id`.
        log_id: Option<String>,
    },
    /// A non-success HTTP status without a parsable platform error body.
    #[error("lark http status {status}{}", LogId(log_id))]
    Http {
        /// HTTP status.
        status: u16,
        /// `X-Tt-Logid` header, if any.
        log_id: Option<String>,
    },
    /// The request did not complete: connect failure, timeout, broken body.
    #[error("lark request failed{}: {source}", if *timeout { " (timeout)" } else { "" })]
    Transport {
        /// The underlying reqwest error (its URL never carries a secret).
        #[source]
        source: Arc<reqwest::Error>,
        /// Whether the per-request timeout fired.
        timeout: bool,
    },
    /// The server's TLS certificate is not trusted: the message names the host and how to add a
    /// CA. Not transient: retrying cannot help until the operator adds the CA.
    #[error("lark request refused: {0}")]
    Untrusted(String),
    /// A success response whose body did not have the documented shape.
    #[error(
        "lark response could not be decoded: {reason} (http {status}{})",
        LogId(log_id)
    )]
    Decode {
        /// What was wrong (a serde message; never the body itself).
        reason: String,
        /// HTTP status.
        status: u16,
        /// `X-Tt-Logid` header, or body `error.log_id`.
        log_id: Option<String>,
    },
    /// The client configuration or a caller-supplied argument is invalid.
    #[error("lark client configuration invalid: {0}")]
    Config(String),
}

impl Error {
    pub(crate) fn transport(err: reqwest::Error) -> Self {
        if let Some(msg) = crate::net::untrusted_http_error(&err) {
            return Self::Untrusted(msg);
        }
        let timeout = err.is_timeout();
        Self::Transport {
            source: Arc::new(err),
            timeout,
        }
    }

    /// Business `code`, when the platform sent one.
    #[must_use]
    pub fn code(&self) -> Option<i64> {
        match self {
            Self::Api { code, .. } | Self::OAuth { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The platform's message (`msg` or `error_description`).
    #[must_use]
    pub fn msg(&self) -> Option<&str> {
        match self {
            Self::Api { msg, .. } => Some(msg),
            Self::OAuth { description, .. } => Some(description),
            _ => None,
        }
    }

    /// HTTP status of the failed response, if there was one.
    #[must_use]
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } | Self::Http { status, .. } | Self::Decode { status, .. } => {
                Some(*status)
            }
            Self::OAuth { status, .. } => *status,
            Self::Transport { source, .. } => source.status().map(|s| s.as_u16()),
            Self::Config(_) | Self::Untrusted(_) => None,
        }
    }

    /// Trace id of the failed call (`X-Tt-Logid` header or body `error.log_id`).
    #[must_use]
    pub fn log_id(&self) -> Option<&str> {
        match self {
            Self::Api { log_id, .. }
            | Self::OAuth { log_id, .. }
            | Self::Http { log_id, .. }
            | Self::Decode { log_id, .. } => log_id.as_deref(),
            Self::Transport { .. } | Self::Config(_) | Self::Untrusted(_) => None,
        }
    }

    /// The OAuth meaning of this error, for token-endpoint and redirect failures.
    #[must_use]
    pub fn oauth_kind(&self) -> Option<OAuthErrorKind> {
        match self {
            Self::OAuth { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// Whether the platform rate-limited the call (HTTP 429 or code 99991400).
    #[must_use]
    pub fn is_rate_limited(&self) -> bool {
        self.status() == Some(429)
            || self.code() == Some(CODE_RATE_LIMITED)
            || self.oauth_kind() == Some(OAuthErrorKind::RateLimited)
    }

    /// Whether retrying the same request later may succeed: transport
    /// failures, HTTP 429 and 5xx, rate-limit code 99991400, and the OAuth
    /// endpoint's 20050/20072. The client retries these itself (see
    /// `RetryPolicy`); nothing else is retried.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Api { code, status, .. } => {
                *code == CODE_RATE_LIMITED || *status == 429 || *status >= 500
            }
            Self::OAuth { kind, .. } => {
                matches!(
                    kind,
                    OAuthErrorKind::Transient | OAuthErrorKind::RateLimited
                )
            }
            Self::Http { status, .. } => *status == 429 || *status >= 500,
            Self::Decode { .. } | Self::Config(_) | Self::Untrusted(_) => false,
        }
    }

    /// Whether the platform rejected the app's own token (tenant or app
    /// access token: 99991661, 99991663, 99991664, 99991671). The client
    /// drops its cached token and retries such a call once by itself.
    #[must_use]
    pub fn is_app_token_invalid(&self) -> bool {
        matches!(
            self,
            Self::Api {
                code: CODE_AUTH_HEADER_MISSING
                    | CODE_ACCESS_TOKEN_INVALID
                    | CODE_APP_TOKEN_INVALID
                    | CODE_TOKEN_FORMAT,
                ..
            }
        )
    }

    /// Whether a call made with a user access token failed because that
    /// token is invalid or expired (99991668, 99991677): the caller should
    /// refresh the user's token once and retry.
    #[must_use]
    pub fn is_user_token_invalid(&self) -> bool {
        matches!(
            self,
            Self::Api {
                code: CODE_USER_TOKEN_INVALID | CODE_USER_TOKEN_EXPIRED,
                ..
            }
        )
    }

    /// Whether the request surely never reached the server: the connection could not be
    /// made, or the platform's gateway refused it by rate limit before handling it. Only
    /// such failures of a one-time request (a grant, a record create) are retried.
    #[must_use]
    pub fn surely_not_processed(&self) -> bool {
        match self {
            Self::Transport { source, timeout } => source.is_connect() && !*timeout,
            _ => self.is_rate_limited(),
        }
    }

    /// Whether the server may have carried the request out although no usable answer came
    /// back: a timeout or a connection lost after sending, a 5xx (or the OAuth endpoint's
    /// 20050/20072), or a success status whose body could not be read. For a one-time grant
    /// this means its outcome is **unknown**: the grant may be spent and its result lost.
    #[must_use]
    pub fn outcome_unknown(&self) -> bool {
        if self.surely_not_processed() {
            return false;
        }
        match self {
            Self::Transport { .. } => true,
            Self::Api { status, .. } | Self::Http { status, .. } => *status >= 500,
            Self::OAuth { kind, status, .. } => {
                *kind == OAuthErrorKind::Transient || status.is_some_and(|s| s >= 500)
            }
            Self::Decode { status, .. } => (200..300).contains(status) || *status >= 500,
            Self::Config(_) | Self::Untrusted(_) => false,
        }
    }

    /// Whether the user has not granted a scope the call needs (99991679):
    /// send the user through authorization again for the missing scope.
    #[must_use]
    pub fn is_scope_missing(&self) -> bool {
        self.code() == Some(CODE_USER_SCOPE_NOT_GRANTED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: i64, status: u16) -> Error {
        Error::Api {
            code,
            msg: "m".into(),
            status,
            log_id: Some("L1".into()),
        }
    }

    #[test]
    fn transient_classification() {
        assert!(api(CODE_RATE_LIMITED, 400).is_transient());
        assert!(api(1, 429).is_transient());
        assert!(api(1, 502).is_transient());
        assert!(!api(230_001, 400).is_transient());
        assert!(!api(CODE_ACCESS_TOKEN_INVALID, 400).is_transient());
        assert!(Error::Http {
            status: 503,
            log_id: None
        }
        .is_transient());
        assert!(!Error::Http {
            status: 404,
            log_id: None
        }
        .is_transient());
        assert!(!Error::Config("x".into()).is_transient());
    }

    #[test]
    fn token_classification() {
        for code in [99_991_661, 99_991_663, 99_991_664, 99_991_671] {
            assert!(api(code, 400).is_app_token_invalid(), "{code}");
            assert!(!api(code, 400).is_user_token_invalid(), "{code}");
        }
        for code in [99_991_668, 99_991_677] {
            assert!(api(code, 401).is_user_token_invalid(), "{code}");
            assert!(!api(code, 401).is_app_token_invalid(), "{code}");
        }
        assert!(api(99_991_679, 400).is_scope_missing());
    }

    #[test]
    fn oauth_classification_follows_the_code_table() {
        use OAuthErrorKind as K;
        let cases = [
            (20_004, None, Some(400), K::CodeExpired),
            (20_003, None, Some(400), K::InvalidGrant),
            (20_065, None, Some(400), K::InvalidGrant),
            (20_037, None, Some(400), K::InvalidGrant),
            (20_064, None, Some(400), K::InvalidGrant),
            (20_073, None, Some(400), K::InvalidGrant),
            (20_049, None, Some(400), K::InvalidGrant),
            (20_050, Some("server_error"), Some(500), K::Transient),
            (20_072, None, Some(503), K::Transient),
            (99_991_400, None, Some(429), K::RateLimited),
            (0, None, Some(429), K::RateLimited),
            (20_071, None, Some(400), K::Misconfigured),
            (20_002, None, Some(400), K::Misconfigured),
            (20_010, None, Some(400), K::UserNotAllowed),
            (0, Some("access_denied"), None, K::UserRejected),
            (12_345, Some("invalid_grant"), Some(400), K::InvalidGrant),
            (12_345, None, Some(400), K::Other),
        ];
        for (code, error, status, want) in cases {
            assert_eq!(K::classify(code, error, status), want, "{code} {error:?}");
        }
    }

    #[test]
    fn accessors_and_display() {
        let e = api(230_002, 400);
        assert_eq!(e.code(), Some(230_002));
        assert_eq!(e.msg(), Some("m"));
        assert_eq!(e.status(), Some(400));
        assert_eq!(e.log_id(), Some("L1"));
        assert_eq!(
            e.to_string(),
            "lark api error 230002: m (http 400, log_id L1)"
        );
        let o = Error::OAuth {
            kind: OAuthErrorKind::CodeExpired,
            code: 20_004,
            error: Some("invalid_grant".into()),
            description: "expired".into(),
            status: Some(400),
            log_id: None,
        };
        assert_eq!(
            o.to_string(),
            "lark oauth error (code_expired): code 20004, error invalid_grant, expired (http 400)"
        );
        assert_eq!(o.oauth_kind(), Some(OAuthErrorKind::CodeExpired));
    }
}
