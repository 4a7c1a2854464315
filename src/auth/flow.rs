//! The shell around the state machine: [`AuthService`] carries out its effects with the Lark
//! client and the store, keeps user tokens fresh, and serves the HTTP routes of the flow.
//!
//! Every phase change is written with [`Store::update_if_pending`], a compare-and-set on "the
//! session is still pending with the state hash I read". When it loses (the sweep expired the
//! session, the card's reject button or a replayed redirect got there first) the input is
//! re-run on the phase the winner left, which in a terminal phase only yields a response: the
//! first terminal transition wins and nothing is stored or counted twice.
//!
//! Tokens are refreshed under a per-user async lock shared by the refresh worker and
//! [`AuthService::user_token`], so one refresh token (they rotate) is never used twice.
//!
//! **A refresh whose answer is lost** (a timeout or dropped connection after the request went
//! out, a 5xx: [`lark::Error::outcome_unknown`]) may have rotated the refresh token on the
//! platform, so the one we hold may be spent and its successor lost. Refresh tokens are single
//! use and are never re-sent blindly (the client does not retry grants), so the service:
//! 1. persists the doubt on the token record (`refresh_in_doubt_since`) and hands out no
//!    token for this user until it is settled ([`TokenError::RefreshInDoubt`]);
//! 2. once the platform's grace for a superseded access token is over (it keeps working about
//!    a minute after a refresh; we wait [`REFRESH_PROBE_AFTER`]), asks user info with the
//!    **old access token**:
//!    - it is still accepted: no refresh took effect, so the refresh token was not used and
//!      is presented again (once, under the same rules);
//!    - it is refused as invalid while it had not expired yet: the refresh took effect and its
//!      result is lost; the user must authorize again (`needs_reauth`), without presenting the
//!      spent refresh token a second time;
//!    - the old access token expired by itself before the check could run, or it now belongs
//!      to someone else: the check cannot tell, and the service fails closed (`needs_reauth`);
//!    - the check itself fails (user info unreachable): still in doubt, checked again later.
//!
//! Each refresh (from presenting the refresh token to storing its result) runs in a task that
//! outlives its caller: cancelling a caller or the refresh worker (shutdown) does not drop a
//! rotated token on the floor. [`AuthService::finish_refreshes`] waits for those tasks.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::{Rng as _, RngCore as _};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::state::{
    transition, CardKind, Effect, ExchangeError, Flow, Identity, Input, Page, Phase,
};
use crate::config::Config;
use crate::lark::{
    self, card, AuthorizeParams, LarkClient, OAuthErrorKind, Pkce, ReceiveIdType, Receiver,
    UserIdType,
};
use crate::metrics::{self, OutcomeLabel, ReasonLabel};
use crate::schedule::Schedule;
use crate::storage::{
    self, now_ms, AuthSession, FailureReason, PendingUpdate, SessionId, Store, UserInfo, UserToken,
};
use crate::workers::WorkerFn;

/// Path of the OAuth redirect on the HTTP listener.
pub const CALLBACK_PATH: &str = "/oauth/callback";
/// The scope that makes the platform issue a refresh token; always requested.
pub const OFFLINE_ACCESS: &str = lark::oauth::OFFLINE_ACCESS;
/// After a refresh failed for a transient reason, the next attempt waits this long.
const REFRESH_RETRY: Duration = Duration::from_secs(60);
/// After a refresh whose answer was lost, the old access token is checked no earlier than
/// this: the platform keeps a superseded access token working about a minute after a refresh,
/// so only a check after that grace tells whether the refresh took effect.
pub const REFRESH_PROBE_AFTER: Duration = Duration::from_secs(120);
/// Most tokens one refresh run reads.
const REFRESH_BATCH: usize = 512;
/// Longest wait of the refresh worker between two looks at the due index.
const REFRESH_IDLE: Duration = Duration::from_secs(10);
/// Most scopes one request may name (the authorize page's limit).
const MAX_SCOPES: usize = 50;

/// Unix-ms clock; injectable so tests can move time.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// A user, by the kind of id the caller has.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum UserRef {
    /// Per-app `ou_…` id.
    OpenId(String),
    /// Tenant-internal user id.
    UserId(String),
}

impl UserRef {
    /// The id itself. Sessions and tokens are keyed by it (the store's `user_id` column).
    #[must_use]
    pub fn id(&self) -> &str {
        match self {
            Self::OpenId(s) | Self::UserId(s) => s,
        }
    }

    fn receiver(&self) -> Receiver {
        match self {
            Self::OpenId(s) => Receiver::open_id(s.clone()),
            Self::UserId(s) => Receiver {
                id_type: ReceiveIdType::UserId,
                id: s.clone(),
            },
        }
    }

    /// The reference a stored session or token was created with: keyed by its open_id means
    /// it was asked for by open_id.
    fn of_stored(key: &str, open_id: Option<&str>) -> Self {
        if open_id == Some(key) {
            Self::OpenId(key.to_owned())
        } else {
            Self::UserId(key.to_owned())
        }
    }
}

/// A request to authorize a user.
#[derive(Clone, Debug)]
pub struct AuthRequest {
    /// Who gets the card.
    pub user: UserRef,
    /// Scopes to ask for; `offline_access` is always added.
    pub scopes: Vec<String>,
}

/// What [`AuthService::request`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestOutcome {
    /// The (new or reused) pending session.
    pub session_id: SessionId,
    /// True if a pending session for the same user and scopes was reused (no new card).
    pub reused: bool,
}

/// Why a request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The user asked too often.
    #[error("too many authorization requests for this user; retry in {} s", ceil_secs(*retry_after))]
    RateLimited {
        /// When the next request will be accepted.
        retry_after: Duration,
    },
    /// A bad argument.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Which field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A request by `user_id` whose user could not be resolved to an open_id in the directory
    /// (no such user, or the app may not read it). Without the open_id the service could not
    /// check who completes the authorization, so it refuses the request.
    #[error("cannot resolve user_id {user_id:?} to an open_id: {reason}")]
    UnresolvedUser {
        /// The user_id asked for.
        user_id: String,
        /// Why it could not be resolved.
        reason: String,
    },
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] storage::Error),
    /// Lark refused or could not be reached.
    #[error("lark: {0}")]
    Lark(#[from] lark::Error),
}

/// Why no access token can be given.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The user never authorized (or the token was revoked).
    #[error("no token for this user")]
    NotFound,
    /// The refresh token is no longer accepted: the user must authorize again.
    #[error("the user must authorize again")]
    NeedsReauth {
        /// The session that produced the dead token.
        session: Option<SessionId>,
    },
    /// The token is expired and refreshing it failed for a reason that may pass.
    #[error("refreshing the token failed: {0}")]
    Refresh(lark::Error),
    /// The answer to the last refresh was lost and whether it took effect is not settled yet:
    /// no token is handed out until a check decides (see the module documentation).
    #[error("the outcome of the last token refresh is being checked; retry in {} s", ceil_secs(*retry_after))]
    RefreshInDoubt {
        /// When to ask again.
        retry_after: Duration,
    },
    /// The refresh task ended without a result (it panicked or the runtime is stopping).
    #[error("the token refresh was interrupted: {0}")]
    Interrupted(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] storage::Error),
}

/// A usable access token.
#[derive(Clone, Debug)]
pub struct AccessToken {
    /// The token.
    pub access_token: SecretString,
    /// When it expires (unix ms).
    pub expires_at: u64,
}

/// What [`AuthService::revoke_user`] deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revoked {
    /// The store key (user id or open id) the token was kept under.
    pub user_id: String,
    /// The session that produced the token, now revoked.
    pub session_id: Option<SessionId>,
}

/// What a user-info sync did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Users whose record changed.
    pub updated: u64,
    /// Users looked up without a change.
    pub unchanged: u64,
    /// Users whose lookup failed.
    pub failed: u64,
}

/// Settings of the flow.
#[derive(Clone, Debug)]
pub struct AuthOptions {
    /// How long a pending session lives.
    pub session_expiry: Duration,
    /// Share of a token's lifetime after which it is refreshed.
    pub refresh_threshold: f64,
    /// Requests per user per window.
    pub rate_limit: u32,
    /// The sliding rate-limit window.
    pub rate_limit_window: Duration,
    /// The OAuth redirect URI (must be registered with the app).
    pub redirect_uri: String,
    /// Scopes of a request a user starts with `/authorize`.
    pub default_scopes: Vec<String>,
    /// Bearer token of the admin routes; `None` disables them.
    pub admin_token: Option<SecretString>,
    /// Tokens refreshed at once.
    pub refresh_concurrency: usize,
    /// Each refresh waits a random time up to this first, so due tokens spread out.
    pub refresh_jitter: Duration,
    /// Send a new card when a refresh token is refused for good.
    pub resend_card_on_reauth: bool,
    /// Schedule of the user-info sync; `None`: off.
    pub user_info_sync: Option<Schedule>,
}

impl AuthOptions {
    /// The options the configuration asks for.
    #[must_use]
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            session_expiry: cfg.auth.session_expiry,
            refresh_threshold: cfg.auth.token_refresh_threshold,
            rate_limit: cfg.auth.request_rate_limit,
            rate_limit_window: cfg.auth.rate_limit_window,
            redirect_uri: redirect_uri(cfg),
            default_scopes: cfg.auth.default_scopes.clone(),
            admin_token: cfg.admin_token.clone(),
            refresh_concurrency: cfg.auth.refresh_concurrency.max(1),
            refresh_jitter: Duration::from_secs(5),
            resend_card_on_reauth: cfg.auth.resend_card_on_reauth,
            user_info_sync: cfg
                .user_info_sync
                .enabled
                .then(|| Schedule::parse(&cfg.user_info_sync.schedule).ok())
                .flatten(),
        }
    }
}

/// `auth.redirect_uri`, else `http.public_url` + `/oauth/callback`, else the listener's address.
#[must_use]
pub fn redirect_uri(cfg: &Config) -> String {
    if let Some(u) = &cfg.auth.redirect_uri {
        return u.to_string();
    }
    match &cfg.public_url {
        Some(base) => format!("{}{CALLBACK_PATH}", base.as_str().trim_end_matches('/')),
        None => format!("http://{}{CALLBACK_PATH}", cfg.http_listen),
    }
}

/// Async locks by key (a user), so one user's token is refreshed by one task at a time.
#[derive(Default)]
struct KeyedLocks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut map = self
                .map
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if map.len() > 4096 {
                map.retain(|_, l| Arc::strong_count(l) > 1);
            }
            map.entry(key.to_owned()).or_default().clone()
        };
        m.lock_owned().await
    }
}

struct Inner {
    lark: LarkClient,
    store: Store,
    opts: AuthOptions,
    clock: Clock,
    app_id: String,
    rate: Mutex<HashMap<String, VecDeque<u64>>>,
    token_locks: KeyedLocks,
    request_locks: KeyedLocks,
    /// Refreshes in flight, each in its own task (see [`AuthService::finish_refreshes`]).
    refreshes: tokio_util::task::TaskTracker,
    /// The app's own `tenant_key`, once read (see [`AuthService::app_tenant`]).
    tenant: tokio::sync::OnceCell<String>,
}

/// The authorization service. Cheap to clone.
#[derive(Clone)]
pub struct AuthService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AuthService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthService")
            .field("app_id", &self.inner.app_id)
            .field("redirect_uri", &self.inner.opts.redirect_uri)
            .finish_non_exhaustive()
    }
}

/// One run of the machine over a session: what the effects need and what they produced.
struct Run {
    session: AuthSession,
    code: Option<SecretString>,
    token: Option<lark::UserToken>,
    info: Option<lark::UserInfo>,
    /// A card click: answer with the card instead of PATCHing it.
    card_reply: bool,
    reply_card: Option<Value>,
    page: Option<Page>,
}

impl Run {
    fn new(session: AuthSession) -> Self {
        Self {
            session,
            code: None,
            token: None,
            info: None,
            card_reply: false,
            reply_card: None,
            page: None,
        }
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_millis()
        .div_ceil(1000)
        .max(1)
        .try_into()
        .unwrap_or(u64::MAX)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// SHA-256 of an OAuth state: the only form of it the store keeps.
#[must_use]
pub fn state_hash(state: &str) -> [u8; 32] {
    Sha256::digest(state.as_bytes()).into()
}

fn new_state() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}

fn count_failure(r: FailureReason) {
    metrics::get()
        .auth_failure
        .get_or_create(&ReasonLabel { reason: r.as_str() })
        .inc();
}

fn count_refresh(outcome: &'static str) {
    metrics::get()
        .token_refresh
        .get_or_create(&OutcomeLabel { outcome })
        .inc();
}

fn valid_id(field: &'static str, v: &str) -> Result<(), AuthError> {
    if v.is_empty() || v.len() > 256 || v.chars().any(char::is_control) {
        return Err(AuthError::Invalid {
            field,
            reason: "must be 1 to 256 printable characters".to_owned(),
        });
    }
    Ok(())
}

/// Sorted, de-duplicated scopes with `offline_access`.
fn normalize_scopes(scopes: &[String]) -> Result<Vec<String>, AuthError> {
    let mut out: Vec<String> = scopes
        .iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    for s in &out {
        if s.len() > 200 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(AuthError::Invalid {
                field: "scopes",
                reason: format!("{s:?} is not a scope name"),
            });
        }
    }
    out.push(OFFLINE_ACCESS.to_owned());
    out.sort();
    out.dedup();
    if out.len() > MAX_SCOPES {
        return Err(AuthError::Invalid {
            field: "scopes",
            reason: format!("at most {MAX_SCOPES} scopes per request"),
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Cards and pages.

const CARD_TITLE: &str = "Authorization required";

fn authorize_body(scopes: &[String], expiry: Duration) -> String {
    let list = scopes
        .iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let minutes = expiry.as_secs().div_ceil(60).max(1);
    format!(
        "This app asks to act on your behalf.\n\n**Permissions:** {list}\n\nThe request is valid for {minutes} minute{}.",
        if minutes == 1 { "" } else { "s" }
    )
}

fn failure_text(r: FailureReason) -> &'static str {
    match r {
        FailureReason::CodeExpired => "The authorization took too long to complete.",
        FailureReason::MissingCode => "The authorization page did not return a code.",
        FailureReason::UserRejected => "You declined the request.",
        FailureReason::StateMismatch => {
            "This authorization link is no longer valid: it was already used, or it belongs to someone else."
        }
        FailureReason::SessionExpired => "The authorization request expired.",
        FailureReason::UnknownError => "Something went wrong while completing the authorization.",
    }
}

/// The card that replaces the authorize card.
fn final_card(kind: CardKind, s: &AuthSession) -> Value {
    match kind {
        CardKind::Authorized => {
            let who = s
                .user_name
                .as_deref()
                .map(|n| format!(", {n}"))
                .unwrap_or_default();
            card::authorized_card(
                "Authorization complete",
                &format!("Thank you{who}. The app can now act with the permissions you granted."),
            )
        }
        CardKind::Rejected => card::rejected_card(
            "Authorization declined",
            "You declined this request. Nothing was granted.",
        ),
        CardKind::Expired => card::expired_card(
            "Authorization request expired",
            "This request is no longer valid. Send `/authorize` to get a new one.",
        ),
        CardKind::Failed(r) => card::expired_card(
            "Authorization failed",
            &format!("{} Send `/authorize` to try again.", failure_text(r)),
        ),
    }
}

/// The small page the browser gets after the redirect. Fixed texts only: nothing from the
/// request, no error detail, no secret.
pub fn page_html(p: Page) -> (StatusCode, Html<String>) {
    let (status, title, text) = match p {
        Page::Authorized => (
            StatusCode::OK,
            "Authorization complete",
            "You can close this page and return to Feishu/Lark.",
        ),
        Page::Rejected => (
            StatusCode::OK,
            "Authorization declined",
            "Nothing was granted. You can close this page.",
        ),
        Page::Expired => (
            StatusCode::GONE,
            "Authorization request expired",
            "Send /authorize to the app to get a new request.",
        ),
        Page::Failed(r) => (
            match r {
                FailureReason::UnknownError => StatusCode::BAD_GATEWAY,
                _ => StatusCode::BAD_REQUEST,
            },
            "Authorization failed",
            failure_text(r),
        ),
    };
    let html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
         <title>{title}</title></head>\n<body style=\"font-family:sans-serif;max-width:32em;margin:4em auto\">\
         <h1>{title}</h1>\n<p>{text}</p></body></html>\n"
    );
    (status, Html(html))
}

fn error_page() -> (StatusCode, Html<String>) {
    let (_, html) = page_html(Page::Failed(FailureReason::UnknownError));
    (StatusCode::INTERNAL_SERVER_ERROR, html)
}

/// Who completed the flow, compared with the user the session was asked for.
///
/// Every session made by [`AuthService::request`] knows the open_id of its user (a user_id is
/// resolved when the request is made), and the user info of the new token always names its
/// open_id: they must be equal. A session asked for by user_id also requires the user info's
/// user_id, when it has one, to be that user_id. A session stored by an older version with no
/// open_id is identified by user_id alone; if the user info has none (the app may not read
/// user_ids) the identity is unknown, and the completion is refused.
fn identify(s: &AuthSession, info: &lark::UserInfo) -> Identity {
    let by_user_id = s.open_id.as_deref() != Some(s.user_id.as_str());
    match (&s.open_id, &info.user_id) {
        (Some(o), _) if *o != info.open_id => Identity::Mismatch,
        (Some(_), Some(u)) if by_user_id && *u != s.user_id => Identity::Mismatch,
        (Some(_), _) => Identity::Matches,
        (None, Some(u)) if *u == s.user_id => Identity::Matches,
        (None, Some(_)) => Identity::Mismatch,
        (None, None) => Identity::Unknown,
    }
}

fn toast(kind: &str, content: &str) -> Value {
    json!({ "type": kind, "content": content })
}

// ---------------------------------------------------------------------------------------------
// The service.

impl AuthService {
    /// A service on the wall clock.
    #[must_use]
    pub fn new(lark: LarkClient, store: Store, opts: AuthOptions) -> Self {
        Self::with_clock(lark, store, opts, Arc::new(now_ms))
    }

    /// A service on `clock` (unix ms).
    #[must_use]
    pub fn with_clock(lark: LarkClient, store: Store, opts: AuthOptions, clock: Clock) -> Self {
        Self {
            inner: Arc::new(Inner {
                app_id: lark.app_id().to_owned(),
                lark,
                store,
                opts,
                clock,
                rate: Mutex::new(HashMap::new()),
                token_locks: KeyedLocks::default(),
                request_locks: KeyedLocks::default(),
                refreshes: tokio_util::task::TaskTracker::new(),
                tenant: tokio::sync::OnceCell::new(),
            }),
        }
    }

    /// The app's own `tenant_key` (read once from the tenant query, then kept).
    async fn app_tenant(&self) -> Result<String, lark::Error> {
        self.inner
            .tenant
            .get_or_try_init(|| self.lark().app_tenant_key())
            .await
            .cloned()
    }

    /// The completing user must belong to the app's own tenant: a user of another company with
    /// the same open_id (open_ids are per app) is not the card's user. Unknown when either
    /// tenant cannot be read: the completion is refused.
    async fn same_tenant(&self, s: &AuthSession, info: &lark::UserInfo) -> Identity {
        let Some(theirs) = info.tenant_key.as_deref().filter(|t| !t.is_empty()) else {
            warn!(session = %s.session_id, "The new token's user info names no tenant; the authorization is refused.");
            return Identity::Unknown;
        };
        match self.app_tenant().await {
            Ok(ours) if ours == theirs => Identity::Matches,
            Ok(_) => {
                warn!(session = %s.session_id, "The authorization was completed by a user of another tenant; refused.");
                Identity::Mismatch
            }
            Err(e) => {
                warn!(session = %s.session_id, error = %e, "The app's tenant could not be read; the authorization is refused.");
                Identity::Unknown
            }
        }
    }

    /// The options in force.
    #[must_use]
    pub fn options(&self) -> &AuthOptions {
        &self.inner.opts
    }

    fn now(&self) -> u64 {
        (self.inner.clock)()
    }

    fn store(&self) -> &Store {
        &self.inner.store
    }

    fn lark(&self) -> &LarkClient {
        &self.inner.lark
    }

    fn refresh_due(&self, now: u64, lifetime: Duration) -> u64 {
        let share = self.inner.opts.refresh_threshold.clamp(0.0, 1.0);
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let after = (ms(lifetime) as f64 * share) as u64;
        now.saturating_add(after)
    }

    /// Sliding-window rate limit per user: `Err(retry_after)` when over.
    fn check_rate(&self, key: &str, now: u64) -> Result<(), Duration> {
        let window = ms(self.inner.opts.rate_limit_window);
        let limit = self.inner.opts.rate_limit.max(1) as usize;
        let mut m = self
            .inner
            .rate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.len() > 10_000 {
            m.retain(|_, q| q.back().is_some_and(|t| t.saturating_add(window) > now));
        }
        let q = m.entry(key.to_owned()).or_default();
        while q.front().is_some_and(|t| t.saturating_add(window) <= now) {
            q.pop_front();
        }
        if q.len() >= limit {
            let oldest = q.front().copied().unwrap_or(now);
            return Err(Duration::from_millis(
                oldest.saturating_add(window).saturating_sub(now).max(1),
            ));
        }
        q.push_back(now);
        Ok(())
    }

    /// Asks a user to authorize: sends the Authorize card, or reuses the user's pending
    /// session for the same scopes. Refused with [`AuthError::RateLimited`] beyond
    /// `auth.request_rate_limit` requests per user per window (reused ones count too).
    pub async fn request(&self, req: AuthRequest) -> Result<RequestOutcome, AuthError> {
        let field = match req.user {
            UserRef::OpenId(_) => "open_id",
            UserRef::UserId(_) => "user_id",
        };
        valid_id(field, req.user.id())?;
        let scopes = normalize_scopes(&req.scopes)?;
        let key = req.user.id().to_owned();
        let now = self.now();
        if let Err(retry_after) = self.check_rate(&key, now) {
            metrics::get().auth_rate_limited.inc();
            return Err(AuthError::RateLimited { retry_after });
        }
        let open_id = self.resolve_open_id(&req.user).await?;
        let _guard = self.inner.request_locks.lock(&key).await;
        let app = self.inner.app_id.clone();
        let k = key.clone();
        let existing = self
            .store()
            .run(move |s| s.sessions_for_user(&app, &k))
            .await?;
        if let Some(s) = existing.iter().rev().find(|s| {
            Phase::of(s) == Phase::AwaitingRedirect && s.expires_at > now && s.scopes == scopes
        }) {
            metrics::get().auth_requests.inc();
            return Ok(RequestOutcome {
                session_id: s.session_id,
                reused: true,
            });
        }

        let opts = &self.inner.opts;
        let state = new_state();
        let hash = state_hash(&state);
        let pkce = Pkce::generate();
        let mut session = AuthSession::new_pending(
            &self.inner.app_id,
            &key,
            scopes.clone(),
            now,
            ms(opts.session_expiry),
        );
        session.open_id = Some(open_id);
        session.state_hash = Some(hash);
        session.pkce_verifier = Some(pkce.verifier.clone());
        let s2 = session.clone();
        self.store().run(move |s| s.put_session(&s2)).await?;

        let scope_refs: Vec<&str> = scopes.iter().map(String::as_str).collect();
        let sent = async {
            let url = self.lark().authorize_url(&AuthorizeParams {
                redirect_uri: &opts.redirect_uri,
                scopes: &scope_refs,
                state: &state,
                code_challenge: Some(&pkce.challenge),
                force_consent: false,
            })?;
            let sid = session.session_id.to_string();
            let body = authorize_body(&scopes, opts.session_expiry);
            let card = card::AuthorizeCard::new(CARD_TITLE, &body, url.as_str(), &sid).to_json();
            self.lark().send_card(&req.user.receiver(), &card).await
        }
        .await;
        match sent {
            Ok(msg) => {
                let mut with_card = session.clone();
                with_card.card_message_id = Some(msg.message_id);
                self.store()
                    .run(move |s| s.update_if_pending(Some(hash), &with_card, None))
                    .await?;
                metrics::get().auth_requests.inc();
                info!(session = %session.session_id, "Authorization card sent.");
                Ok(RequestOutcome {
                    session_id: session.session_id,
                    reused: false,
                })
            }
            Err(e) => {
                warn!(session = %session.session_id, error = %e, "Sending the authorization card failed.");
                let mut failed = session.clone();
                let (state, reason) = Phase::Failed(FailureReason::UnknownError).stored();
                failed.state = state;
                failed.failure_reason = reason;
                failed.state_hash = None;
                failed.pkce_verifier = None;
                failed.updated_at = self.now();
                self.store()
                    .run(move |s| s.update_if_pending(Some(hash), &failed, None))
                    .await?;
                count_failure(FailureReason::UnknownError);
                Err(AuthError::Lark(e))
            }
        }
    }

    /// The open_id of the user a request is for: an open_id as given; a user_id looked up in
    /// the directory (tenant token). The completion compares it with the open_id of the user
    /// who authorized, so a request whose user cannot be resolved is refused: transient
    /// failures as [`AuthError::Lark`], anything else as [`AuthError::UnresolvedUser`].
    async fn resolve_open_id(&self, user: &UserRef) -> Result<String, AuthError> {
        let user_id = match user {
            UserRef::OpenId(o) => return Ok(o.clone()),
            UserRef::UserId(u) => u,
        };
        let unresolved = |reason: String| AuthError::UnresolvedUser {
            user_id: user_id.clone(),
            reason,
        };
        match self.lark().contact_user(user_id, UserIdType::UserId).await {
            Ok(c) => match c.open_id.filter(|o| !o.is_empty()) {
                Some(o) if c.user_id.as_deref().is_none_or(|u| u == user_id) => Ok(o),
                Some(_) => Err(unresolved(
                    "the directory answered with another user".to_owned(),
                )),
                None => Err(unresolved("the directory entry has no open_id".to_owned())),
            },
            Err(e) if e.is_transient() => Err(AuthError::Lark(e)),
            Err(e) => Err(unresolved(e.to_string())),
        }
    }

    /// Feeds `input` to the machine for `run.session`, persisting every phase change with a
    /// compare-and-set and carrying out the effects (which may feed further inputs).
    async fn drive(&self, run: &mut Run, input: Input) -> Result<(), AuthError> {
        let mut queue = VecDeque::from([input]);
        let mut rounds = 0;
        while let Some(input) = queue.pop_front() {
            rounds += 1;
            if rounds > 16 {
                warn!(session = %run.session.session_id, "Authorization flow did not settle.");
                break;
            }
            let now = self.now();
            let flow = Flow::of(&run.session);
            let (next, effects) = transition(flow, input, now);
            if next.phase != flow.phase && !flow.phase.is_terminal() {
                let stores = effects.contains(&Effect::StoreTokens);
                let (updated, token) = self.next_session(run, next.phase, stores, now);
                let expect = run.session.state_hash;
                let store = self.store().clone();
                let guard = match &token {
                    Some(t) => Some(self.inner.token_locks.lock(&t.user_id).await),
                    None => None,
                };
                let u2 = updated.clone();
                let outcome = store
                    .run(move |s| s.update_if_pending(expect, &u2, token.as_ref()))
                    .await?;
                drop(guard);
                match outcome {
                    PendingUpdate::Written => run.session = updated,
                    PendingUpdate::Lost(current) => {
                        info!(session = %run.session.session_id, now = %current.state, "Another transition finished the session first.");
                        run.session = *current;
                        queue.push_front(input);
                        continue;
                    }
                    PendingUpdate::Missing => {
                        run.page = Some(Page::Failed(FailureReason::StateMismatch));
                        count_failure(FailureReason::StateMismatch);
                        return Ok(());
                    }
                }
            }
            for e in effects {
                if let Some(next_input) = self.effect(run, e, now).await? {
                    queue.push_back(next_input);
                }
            }
        }
        Ok(())
    }

    /// The session after moving to `phase` (and, on completion, the token to store with it).
    fn next_session(
        &self,
        run: &Run,
        phase: Phase,
        complete: bool,
        now: u64,
    ) -> (AuthSession, Option<UserToken>) {
        let mut n = run.session.clone();
        let (state, reason) = phase.stored();
        n.state = state;
        n.failure_reason = reason;
        n.updated_at = now;
        if phase != Phase::AwaitingRedirect {
            n.state_hash = None;
        }
        if phase.is_terminal() {
            n.pkce_verifier = None;
        }
        if !complete {
            return (n, None);
        }
        let Some(t) = &run.token else {
            return (n, None);
        };
        if let Some(info) = &run.info {
            if n.open_id.is_none() {
                n.open_id = Some(info.open_id.clone());
            }
            n.union_id = info.union_id.clone().or(n.union_id);
            n.user_name = info.name.clone().or(n.user_name);
            n.user_email = info
                .email
                .clone()
                .or_else(|| info.enterprise_email.clone())
                .or(n.user_email);
            n.avatar_url = info.avatar_url.clone().or(n.avatar_url);
        }
        let expires_at = now.saturating_add(ms(t.expires_in));
        let refresh_expires_at = t.refresh_expires_in.map(|d| now.saturating_add(ms(d)));
        n.access_token = Some(t.access_token.clone());
        n.refresh_token = t.refresh_token.clone();
        n.token_expires_at = Some(expires_at);
        n.refresh_token_expires_at = refresh_expires_at;
        let granted: Vec<String> = t.scopes().map(str::to_owned).collect();
        let token = UserToken {
            app_id: n.app_id.clone(),
            user_id: n.user_id.clone(),
            open_id: n.open_id.clone(),
            access_token: t.access_token.clone(),
            refresh_token: t.refresh_token.clone(),
            expires_at,
            refresh_expires_at,
            refresh_due_at: self.refresh_due(now, t.expires_in),
            scopes: if granted.is_empty() {
                n.scopes.clone()
            } else {
                granted
            },
            obtained_at: now,
            session_id: Some(n.session_id),
            needs_reauth: false,
            refresh_in_doubt_since: None,
        };
        (n, Some(token))
    }

    /// Carries out one effect; returns the input it produced, if any.
    async fn effect(&self, run: &mut Run, e: Effect, now: u64) -> Result<Option<Input>, AuthError> {
        match e {
            Effect::ExchangeCode => {
                let Some(code) = run.code.take() else {
                    return Ok(Some(Input::ExchangeFailed(ExchangeError::Other)));
                };
                let r = self
                    .lark()
                    .exchange_code(
                        &code,
                        &self.inner.opts.redirect_uri,
                        run.session.pkce_verifier.as_ref(),
                    )
                    .await;
                Ok(Some(match r {
                    Ok(t) => {
                        run.token = Some(t);
                        Input::CodeExchanged
                    }
                    Err(e) => {
                        warn!(session = %run.session.session_id, error = %e, "Code exchange failed.");
                        Input::ExchangeFailed(
                            if e.oauth_kind() == Some(OAuthErrorKind::CodeExpired) {
                                ExchangeError::CodeExpired
                            } else {
                                ExchangeError::Other
                            },
                        )
                    }
                }))
            }
            Effect::FetchUserInfo => {
                let Some(t) = &run.token else {
                    return Ok(Some(Input::UserIdentified(Identity::Unknown)));
                };
                let identity = match self.lark().user_info(&t.access_token).await {
                    Ok(info) => {
                        let mut id = identify(&run.session, &info);
                        if id == Identity::Mismatch {
                            warn!(session = %run.session.session_id, "The authorization was completed by another user than the card's; refused.");
                        }
                        if id == Identity::Matches {
                            id = self.same_tenant(&run.session, &info).await;
                        }
                        run.info = Some(info);
                        id
                    }
                    Err(e) => {
                        warn!(session = %run.session.session_id, error = %e, "Reading the new token's user failed; the authorization is refused (who completed it is unknown).");
                        Identity::Unknown
                    }
                };
                Ok(Some(Input::UserIdentified(identity)))
            }
            Effect::StoreTokens => {
                // The token was written with the session; the user record is not secret and
                // may follow in its own transaction.
                if let Some(info) = &run.info {
                    let user = UserInfo {
                        app_id: run.session.app_id.clone(),
                        open_id: info.open_id.clone(),
                        user_id: info.user_id.clone().or_else(|| {
                            (run.session.open_id.as_deref() != Some(&run.session.user_id))
                                .then(|| run.session.user_id.clone())
                        }),
                        union_id: info.union_id.clone(),
                        name: info.name.clone(),
                        email: info.email.clone().or_else(|| info.enterprise_email.clone()),
                        avatar_url: info.avatar_url.clone(),
                        updated_at: now,
                    };
                    if let Err(e) = self.store().run(move |s| s.put_user(&user)).await {
                        warn!(error = %e, "Storing the user record failed.");
                    }
                }
                Ok(None)
            }
            Effect::PatchCard(kind) => {
                let card = final_card(kind, &run.session);
                if run.card_reply {
                    run.reply_card = Some(card);
                } else if let Some(mid) = run.session.card_message_id.clone() {
                    if let Err(e) = self.lark().patch_card(&mid, &card).await {
                        warn!(session = %run.session.session_id, error = %e, "Updating the authorization card failed.");
                    }
                }
                Ok(None)
            }
            Effect::CountSuccess => {
                let m = metrics::get();
                m.auth_success.inc();
                #[allow(clippy::cast_precision_loss)]
                m.auth_duration
                    .observe(now.saturating_sub(run.session.created_at) as f64 / 1000.0);
                info!(session = %run.session.session_id, "Authorization complete.");
                Ok(None)
            }
            Effect::CountFailure(r) => {
                count_failure(r);
                Ok(None)
            }
            Effect::Respond(p) => {
                run.page = Some(p);
                Ok(None)
            }
        }
    }

    /// The OAuth redirect (`GET /oauth/callback?…`, the query without `?`): validates the
    /// state, exchanges the code, stores the tokens, updates the card, and answers the
    /// browser with a small page.
    pub async fn oauth_callback(&self, query: &str) -> (StatusCode, Html<String>) {
        match self.oauth_callback_inner(query).await {
            Ok(p) => page_html(p),
            Err(e) => {
                warn!(error = %e, "OAuth callback failed.");
                error_page()
            }
        }
    }

    async fn oauth_callback_inner(&self, query: &str) -> Result<Page, AuthError> {
        let mut code = None;
        let mut state = None;
        let mut error = None;
        for (k, v) in url::form_urlencoded::parse(query.trim_start_matches('?').as_bytes()) {
            match &*k {
                "code" => code = Some(v.into_owned()),
                "state" => state = Some(v.into_owned()),
                "error" => error = Some(v.into_owned()),
                _ => {}
            }
        }
        let mismatch = || {
            count_failure(FailureReason::StateMismatch);
            Ok(Page::Failed(FailureReason::StateMismatch))
        };
        let Some(state) = state.filter(|s| !s.is_empty() && s.len() <= 512) else {
            return mismatch();
        };
        let hash = state_hash(&state);
        let Some(session) = self
            .store()
            .run(move |s| s.session_by_state_hash(&hash))
            .await?
        else {
            return mismatch();
        };
        let input = match (error.as_deref(), code.as_deref()) {
            (Some("access_denied"), _) => Input::RedirectDenied,
            (Some(_), _) => Input::RedirectError,
            (None, Some(c)) if !c.is_empty() => Input::RedirectWithCode,
            (None, _) => Input::RedirectWithoutCode,
        };
        let mut run = Run::new(session);
        run.code = code.filter(|c| !c.is_empty()).map(SecretString::from);
        self.drive(&mut run, input).await?;
        Ok(run.page.unwrap_or_else(|| Phase::of(&run.session).page()))
    }

    /// A `card.action.trigger` callback's `action.value` and the clicking user's open_id. For
    /// `{"action":"reject"|"cancel","session_id":…}` from the card's owner the session becomes
    /// `rejected` (`user_rejected`). Returns the card callback response (toast + the new card),
    /// or `None` if the value is not this feature's.
    pub async fn card_action(
        &self,
        value: &Value,
        operator_open_id: &str,
    ) -> Result<Option<Value>, AuthError> {
        let Some(action) = card::CardAction::from_value(value) else {
            return Ok(None);
        };
        if !matches!(action.action.as_str(), card::ACTION_REJECT | "cancel") {
            return Ok(None);
        }
        let gone = || {
            Ok(Some(json!({
                "toast": toast("info", "This authorization request no longer exists."),
            })))
        };
        let Ok(id) = action.session_id.parse::<SessionId>() else {
            return gone();
        };
        let Some(session) = self.store().run(move |s| s.get_session(id)).await? else {
            return gone();
        };
        if session.app_id != self.inner.app_id {
            return gone();
        }
        if !self.is_owner(&session, operator_open_id).await {
            return Ok(Some(json!({
                "toast": toast("error", "Only the person this card was sent to can answer it."),
            })));
        }
        let mut run = Run::new(session);
        run.card_reply = true;
        self.drive(&mut run, Input::CardRejected).await?;
        let phase = Phase::of(&run.session);
        let mut reply = match (run.reply_card.take(), phase) {
            (Some(card), _) => json!({
                "toast": toast("info", "Authorization declined."),
                "card": { "type": "raw", "data": card },
            }),
            (None, Phase::Completed) => json!({
                "toast": toast("info", "This request was already authorized."),
            }),
            (None, p) => json!({
                "toast": toast("info", &format!("This request is already {}.", p.stored().0)),
            }),
        };
        if phase.is_terminal() && phase != Phase::Rejected {
            // Show the final state of a card that is out of date.
            if let Some(kind) = match phase {
                Phase::Completed => Some(CardKind::Authorized),
                Phase::Expired | Phase::Revoked => Some(CardKind::Expired),
                Phase::Failed(r) => Some(CardKind::Failed(r)),
                _ => None,
            } {
                reply["card"] = json!({ "type": "raw", "data": final_card(kind, &run.session) });
            }
        }
        Ok(Some(reply))
    }

    async fn is_owner(&self, s: &AuthSession, operator_open_id: &str) -> bool {
        if operator_open_id.is_empty() {
            return false;
        }
        if let Some(o) = &s.open_id {
            return o == operator_open_id;
        }
        // Asked for by user_id: look the clicker's user up in the directory.
        match self
            .lark()
            .contact_user(&s.user_id, UserIdType::UserId)
            .await
        {
            Ok(c) => c.open_id.as_deref() == Some(operator_open_id),
            Err(e) => {
                warn!(error = %e, "Looking the card's owner up failed; the click is refused.");
                false
            }
        }
    }

    /// An `im.message.receive_v1` event (the whole envelope or its `event`): the text
    /// `/authorize` or `authorize` in a p2p chat starts a request for the sender, with
    /// `auth.default_scopes` plus any scopes named after the command. `Ok(None)` if it is not
    /// such a message. When the sender is rate limited they get a short text reply.
    pub async fn message_command(
        &self,
        event: &Value,
    ) -> Result<Option<RequestOutcome>, AuthError> {
        let ev = event.get("event").unwrap_or(event);
        let Some(msg) = ev.get("message") else {
            return Ok(None);
        };
        let field = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        if field(msg, "chat_type").as_deref() != Some("p2p")
            || field(msg, "message_type").as_deref() != Some("text")
        {
            return Ok(None);
        }
        if field(&ev["sender"], "sender_type").is_some_and(|t| t != "user") {
            return Ok(None);
        }
        let Some(text) = field(msg, "content")
            .and_then(|c| serde_json::from_str::<Value>(&c).ok())
            .and_then(|c| field(&c, "text"))
        else {
            return Ok(None);
        };
        let mut words = text.split_whitespace();
        let Some(cmd) = words.next() else {
            return Ok(None);
        };
        if !cmd.eq_ignore_ascii_case("/authorize") && !cmd.eq_ignore_ascii_case("authorize") {
            return Ok(None);
        }
        let Some(open_id) = field(&ev["sender"]["sender_id"], "open_id") else {
            return Ok(None);
        };
        let mut scopes = self.inner.opts.default_scopes.clone();
        scopes.extend(words.map(str::to_owned));
        let r = self
            .request(AuthRequest {
                user: UserRef::OpenId(open_id.clone()),
                scopes,
            })
            .await;
        if let Err(AuthError::RateLimited { retry_after }) = &r {
            let text = format!(
                "You asked for authorization too often. Try again in {} seconds.",
                ceil_secs(*retry_after)
            );
            if let Err(e) = self
                .lark()
                .send_text(&Receiver::open_id(open_id), &text)
                .await
            {
                warn!(error = %e, "Telling a rate-limited user failed.");
            }
        }
        r.map(Some)
    }

    /// After a sweep: the expired sessions' cards become "expired" and each counts as
    /// `auth_failure{reason="session_expired"}`. Pass `SweepReport::expired`.
    pub async fn on_sweep_expired(&self, expired: Vec<(SessionId, Option<String>)>) {
        for (id, card_message_id) in expired {
            let flow = Flow {
                phase: Phase::AwaitingRedirect,
                expires_at: 0,
            };
            let (_, effects) = transition(flow, Input::Expire, self.now());
            for e in effects {
                match e {
                    Effect::PatchCard(kind) => {
                        if let Some(mid) = &card_message_id {
                            let mut s = AuthSession::new_pending("", "", vec![], 0, 0);
                            s.session_id = id;
                            if let Err(e) = self.lark().patch_card(mid, &final_card(kind, &s)).await
                            {
                                warn!(session = %id, error = %e, "Updating an expired card failed.");
                            }
                        }
                    }
                    Effect::CountFailure(r) => count_failure(r),
                    _ => {}
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Tokens.

    /// The key (store `user_id`) of `user`'s token, trying the other kind of id through the
    /// users table when the token was asked for with it.
    async fn token_key(&self, user: &UserRef) -> Result<Option<String>, storage::Error> {
        let app = self.inner.app_id.clone();
        let user = user.clone();
        self.store()
            .run(move |s| {
                if s.get_token(&app, user.id())?.is_some() {
                    return Ok(Some(user.id().to_owned()));
                }
                let other = match &user {
                    UserRef::OpenId(o) => s.get_user(&app, o)?.and_then(|u| u.user_id),
                    UserRef::UserId(u) => s
                        .list_users(&app)?
                        .into_iter()
                        .find(|x| x.user_id.as_deref() == Some(u))
                        .map(|x| x.open_id),
                };
                match other {
                    Some(k) if s.get_token(&app, &k)?.is_some() => Ok(Some(k)),
                    _ => Ok(None),
                }
            })
            .await
    }

    async fn load_token(&self, key: &str) -> Result<Option<UserToken>, storage::Error> {
        let app = self.inner.app_id.clone();
        let key = key.to_owned();
        self.store().run(move |s| s.get_token(&app, &key)).await
    }

    /// A valid access token of `user`, refreshed first when it is due (past the refresh
    /// threshold) or expired.
    pub async fn user_token(&self, user: UserRef) -> Result<SecretString, TokenError> {
        self.access_token(user).await.map(|t| t.access_token)
    }

    /// [`Self::user_token`] with the token's expiry.
    pub async fn access_token(&self, user: UserRef) -> Result<AccessToken, TokenError> {
        let key = self.token_key(&user).await?.ok_or(TokenError::NotFound)?;
        let tok = self.load_token(&key).await?.ok_or(TokenError::NotFound)?;
        if tok.needs_reauth {
            return Err(TokenError::NeedsReauth {
                session: tok.session_id,
            });
        }
        let now = self.now();
        if tok.refresh_in_doubt_since.is_none() && now < tok.refresh_due_at && now < tok.expires_at
        {
            return Ok(AccessToken {
                access_token: tok.access_token,
                expires_at: tok.expires_at,
            });
        }
        let tok = self.refresh_if_due(&key).await?;
        Ok(AccessToken {
            access_token: tok.access_token,
            expires_at: tok.expires_at,
        })
    }

    /// Under the user's lock: re-reads the token and refreshes it if it is still due. A
    /// failure that surely left the platform untouched leaves a still-valid token usable and
    /// retries after a minute; a lost answer puts the refresh in doubt (module documentation).
    ///
    /// The work runs in a task of its own holding the user's lock, tracked for
    /// [`Self::finish_refreshes`]: if this future is dropped (a cancelled caller, the refresh
    /// worker stopped at shutdown) the refresh still completes and its result is stored.
    async fn refresh_if_due(&self, key: &str) -> Result<UserToken, TokenError> {
        let guard = self.inner.token_locks.lock(key).await;
        let me = self.clone();
        let key = key.to_owned();
        let task = self.inner.refreshes.spawn(async move {
            let r = me.refresh_locked(&key).await;
            drop(guard);
            r
        });
        match task.await {
            Ok(r) => r,
            Err(e) => Err(TokenError::Interrupted(e.to_string())),
        }
    }

    /// Waits until every refresh in flight has stored its result. Call at shutdown once the
    /// workers and the HTTP server have stopped (refreshes started later are still tracked).
    pub async fn finish_refreshes(&self) {
        self.inner.refreshes.close();
        self.inner.refreshes.wait().await;
    }

    async fn refresh_locked(&self, key: &str) -> Result<UserToken, TokenError> {
        let mut tok = self.load_token(key).await?.ok_or(TokenError::NotFound)?;
        if tok.needs_reauth {
            return Err(TokenError::NeedsReauth {
                session: tok.session_id,
            });
        }
        let now = self.now();
        if let Some(since) = tok.refresh_in_doubt_since {
            let probe_at = since.saturating_add(ms(REFRESH_PROBE_AFTER));
            if now < probe_at {
                return Err(TokenError::RefreshInDoubt {
                    retry_after: Duration::from_millis(probe_at - now),
                });
            }
            match self.settle_doubt(tok).await? {
                Ok(settled) => tok = settled,
                Err(e) => return Err(e),
            }
        } else if now < tok.refresh_due_at && now < tok.expires_at {
            return Ok(tok);
        }
        let Some(refresh) = tok.refresh_token.clone() else {
            if now < tok.expires_at {
                return Ok(tok);
            }
            return Err(self.needs_reauth(tok).await);
        };
        if tok.refresh_expires_at.is_some_and(|e| e <= now) {
            count_refresh("reauth_required");
            return Err(self.needs_reauth(tok).await);
        }
        let sent_at = self.now();
        match self.lark().refresh_user_token(&refresh).await {
            Ok(t) => {
                let now = self.now();
                let granted: Vec<String> = t.scopes().map(str::to_owned).collect();
                let new = UserToken {
                    access_token: t.access_token.clone(),
                    refresh_token: t.refresh_token.clone(),
                    expires_at: now.saturating_add(ms(t.expires_in)),
                    refresh_expires_at: t
                        .refresh_expires_in
                        .map(|d| now.saturating_add(ms(d)))
                        .or(tok.refresh_expires_at),
                    refresh_due_at: self.refresh_due(now, t.expires_in),
                    scopes: if granted.is_empty() {
                        tok.scopes.clone()
                    } else {
                        granted
                    },
                    obtained_at: now,
                    needs_reauth: false,
                    refresh_in_doubt_since: None,
                    ..tok
                };
                let n2 = new.clone();
                self.store().run(move |s| s.put_token(&n2)).await?;
                count_refresh("success");
                Ok(new)
            }
            Err(e)
                if matches!(
                    e.oauth_kind(),
                    Some(OAuthErrorKind::InvalidGrant | OAuthErrorKind::UserNotAllowed)
                ) =>
            {
                warn!(error = %e, "The refresh token was refused; the user must authorize again.");
                count_refresh("reauth_required");
                Err(self.needs_reauth(tok).await)
            }
            Err(e) if e.outcome_unknown() => {
                warn!(error = %e, "The answer to a token refresh was lost; the refresh token will not be presented again until a check shows whether the refresh took effect.");
                count_refresh("unknown");
                let mut doubt = tok;
                doubt.refresh_in_doubt_since = Some(sent_at);
                doubt.refresh_due_at = sent_at.saturating_add(ms(REFRESH_PROBE_AFTER));
                self.store().run(move |s| s.put_token(&doubt)).await?;
                Err(TokenError::RefreshInDoubt {
                    retry_after: REFRESH_PROBE_AFTER,
                })
            }
            Err(e) => {
                warn!(error = %e, "Refreshing a user token failed; retrying later.");
                count_refresh("failure");
                let mut later = tok.clone();
                later.refresh_due_at = now.saturating_add(ms(REFRESH_RETRY));
                self.store().run(move |s| s.put_token(&later)).await?;
                if now < tok.expires_at {
                    Ok(tok)
                } else {
                    Err(TokenError::Refresh(e))
                }
            }
        }
    }

    /// Settles a refresh in doubt by asking user info with the old access token (the rule is
    /// in the module documentation). `Ok(Ok(token))`: the refresh did not take effect and the
    /// refresh token may be presented again (the doubt is cleared in the returned token, and
    /// stored only with the next refresh's outcome); `Ok(Err(_))`: what to answer instead.
    async fn settle_doubt(
        &self,
        mut tok: UserToken,
    ) -> Result<Result<UserToken, TokenError>, TokenError> {
        let now = self.now();
        if now >= tok.expires_at {
            warn!("A refresh in doubt cannot be checked: the old access token has expired. Failing closed; the user must authorize again.");
            count_refresh("reauth_required");
            return Ok(Err(self.needs_reauth(tok).await));
        }
        match self.lark().user_info(&tok.access_token).await {
            Ok(info) if tok.open_id.as_deref().is_none_or(|o| o == info.open_id) => {
                info!("The old access token still works past the refresh grace: the lost refresh did not take effect; refreshing again.");
                tok.refresh_in_doubt_since = None;
                Ok(Ok(tok))
            }
            Ok(_) => {
                warn!("The old access token now names another user; failing closed: the user must authorize again.");
                count_refresh("reauth_required");
                Ok(Err(self.needs_reauth(tok).await))
            }
            Err(e) if e.is_user_token_invalid() => {
                warn!(error = %e, "The old access token was revoked before its expiry: the lost refresh took effect and its tokens are gone; the user must authorize again.");
                count_refresh("reauth_required");
                Ok(Err(self.needs_reauth(tok).await))
            }
            Err(e) => {
                warn!(error = %e, "Checking a refresh in doubt failed; checking again later.");
                let mut later = tok;
                later.refresh_due_at = now.saturating_add(ms(REFRESH_RETRY));
                self.store().run(move |s| s.put_token(&later)).await?;
                Ok(Err(TokenError::RefreshInDoubt {
                    retry_after: REFRESH_RETRY,
                }))
            }
        }
    }

    /// Marks the token dead (and, if configured, sends a new card). Returns the error to give.
    async fn needs_reauth(&self, mut tok: UserToken) -> TokenError {
        let session = tok.session_id;
        tok.needs_reauth = true;
        let t2 = tok.clone();
        if let Err(e) = self.store().run(move |s| s.put_token(&t2)).await {
            return TokenError::Store(e);
        }
        if self.inner.opts.resend_card_on_reauth {
            let me = self.clone();
            let req = AuthRequest {
                user: UserRef::of_stored(&tok.user_id, tok.open_id.as_deref()),
                scopes: tok.scopes.clone(),
            };
            tokio::spawn(async move {
                if let Err(e) = me.request(req).await {
                    warn!(error = %e, "Sending a new authorization card failed.");
                }
            });
        }
        TokenError::NeedsReauth { session }
    }

    /// One run of the refresh worker: refreshes every due token (with jitter, at most
    /// `auth.refresh_concurrency` at once). Returns how long to wait before the next run.
    pub async fn refresh_due_tokens(&self) -> Result<Duration, AuthError> {
        let now = self.now();
        let due = self
            .store()
            .run(move |s| s.tokens_due(now, REFRESH_BATCH))
            .await?;
        let sem = Arc::new(tokio::sync::Semaphore::new(
            self.inner.opts.refresh_concurrency.max(1),
        ));
        let mut tasks = tokio::task::JoinSet::new();
        for (app, user, _) in due {
            if app != self.inner.app_id {
                continue;
            }
            let me = self.clone();
            let sem = sem.clone();
            let jitter = self.inner.opts.refresh_jitter;
            tasks.spawn(async move {
                if !jitter.is_zero() {
                    let wait = rand::rng().random_range(0..=ms(jitter));
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                let Ok(_permit) = sem.acquire().await else {
                    return;
                };
                match me.refresh_if_due(&user).await {
                    Ok(_)
                    | Err(
                        TokenError::NeedsReauth { .. }
                        | TokenError::NotFound
                        | TokenError::RefreshInDoubt { .. },
                    ) => {}
                    Err(e) => warn!(error = %e, "Token refresh failed."),
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        let now = self.now();
        let next = self
            .store()
            .run(|s| s.tokens_due(u64::MAX - 1, 1))
            .await?
            .first()
            .map(|(_, _, at)| Duration::from_millis(at.saturating_sub(now)));
        // Look again at least every 10 s: tokens stored since this run (new authorizations)
        // are found without a wake-up channel, and the look costs one read of the due index.
        Ok(next
            .unwrap_or(REFRESH_IDLE)
            .clamp(Duration::from_secs(1), REFRESH_IDLE))
    }

    /// The token refresh worker, for `Workers::spawn`.
    #[must_use]
    pub fn refresh_worker(&self) -> WorkerFn {
        let me = self.clone();
        Box::new(move || {
            let me = me.clone();
            Box::pin(async move { me.refresh_due_tokens().await.map_err(|e| e.to_string()) })
        })
    }

    // -----------------------------------------------------------------------------------------
    // User info sync.

    /// Refreshes every stored user's name, email and avatar from the directory (tenant token).
    pub async fn sync_user_info(&self) -> Result<SyncReport, AuthError> {
        let app = self.inner.app_id.clone();
        let users = self.store().run(move |s| s.list_users(&app)).await?;
        let mut report = SyncReport::default();
        for u in users {
            match self
                .lark()
                .contact_user(&u.open_id, UserIdType::OpenId)
                .await
            {
                Ok(c) => {
                    let avatar = c.avatar.as_ref().and_then(|a| {
                        a.avatar_240
                            .clone()
                            .or_else(|| a.avatar_72.clone())
                            .or_else(|| a.avatar_origin.clone())
                    });
                    let mut n = u.clone();
                    n.name = c.name.or(n.name);
                    n.email = c.email.or(c.enterprise_email).or(n.email);
                    n.avatar_url = avatar.or(n.avatar_url);
                    n.user_id = c.user_id.or(n.user_id);
                    n.union_id = c.union_id.or(n.union_id);
                    if n == u {
                        report.unchanged += 1;
                        continue;
                    }
                    n.updated_at = self.now();
                    self.store().run(move |s| s.put_user(&n)).await?;
                    report.updated += 1;
                }
                Err(e) => {
                    warn!(error = %e, "Looking a user up for the user-info sync failed.");
                    report.failed += 1;
                }
            }
        }
        info!(
            updated = report.updated,
            unchanged = report.unchanged,
            failed = report.failed,
            "User info sync finished."
        );
        Ok(report)
    }

    /// The user-info sync worker (runs on `USER_INFO_SYNC_SCHEDULE`), or `None` when
    /// `USER_INFO_SYNC_ENABLED` is off.
    #[must_use]
    pub fn user_info_sync_worker(&self) -> Option<WorkerFn> {
        let sched = self.inner.opts.user_info_sync.clone()?;
        let me = self.clone();
        Some(Box::new(move || {
            let (me, sched) = (me.clone(), sched.clone());
            Box::pin(async move {
                let now = me.now();
                let next = sched
                    .next_after(now)
                    .ok_or("the user info sync schedule never fires")?;
                tokio::time::sleep(Duration::from_millis(next.saturating_sub(now))).await;
                me.sync_user_info().await.map_err(|e| e.to_string())?;
                Ok(Duration::ZERO)
            })
        }))
    }

    // -----------------------------------------------------------------------------------------
    // Revoke.
    //
    // Feishu has no public API to revoke a user's grant: revoking deletes our copy of the
    // access and refresh tokens (the refresh token is forgotten, so nothing can renew the
    // grant from here) and marks the session revoked. Under the user's token lock, so a refresh
    // in flight finishes first and none starts from a deleted token.

    /// Revokes the authorization session `id` of this app: it becomes `revoked` and the token
    /// it produced (if still current) is deleted. `None` if there is no such session.
    pub async fn revoke_session(
        &self,
        id: SessionId,
    ) -> Result<Option<storage::SessionSummary>, storage::Error> {
        let Some(summary) = self
            .store()
            .run(move |s| s.get_session_summary(id))
            .await?
            .filter(|s| s.app_id == self.inner.app_id)
        else {
            return Ok(None);
        };
        let _guard = self.inner.token_locks.lock(&summary.user_id).await;
        let now = self.now();
        self.store()
            .run(move |s| {
                s.revoke_session(id, now)?;
                s.get_session_summary(id)
            })
            .await
            .inspect(
                |_| info!(session = %id, "Session revoked; its token (if current) was deleted."),
            )
    }

    /// Revokes `user`'s authorization: deletes the stored access and refresh tokens and marks
    /// the session that produced them revoked. `None` if the user has no token.
    pub async fn revoke_user(&self, user: UserRef) -> Result<Option<Revoked>, storage::Error> {
        let Some(key) = self.token_key(&user).await? else {
            return Ok(None);
        };
        let _guard = self.inner.token_locks.lock(&key).await;
        let app = self.inner.app_id.clone();
        let now = self.now();
        let k = key.clone();
        let revoked = self
            .store()
            .run(move |s| {
                let Some(tok) = s.get_token(&app, &k)? else {
                    return Ok(None);
                };
                if let Some(id) = tok.session_id {
                    s.revoke_session(id, now)?;
                }
                s.delete_token(&app, &k)?;
                Ok(Some(Revoked {
                    user_id: k,
                    session_id: tok.session_id,
                }))
            })
            .await?;
        if revoked.is_some() {
            info!(user = %key, "User's tokens revoked (deleted from the store).");
        }
        Ok(revoked)
    }

    // -----------------------------------------------------------------------------------------
    // HTTP.

    /// The flow's public route: `GET /oauth/callback`.
    pub fn public_router(self) -> Router {
        Router::new()
            .route(CALLBACK_PATH, get(http_callback))
            .with_state(self)
    }

    /// The flow's admin routes behind `guard` (the admin bearer check):
    /// `POST /api/v1/auth/requests`, `GET /api/v1/auth/sessions/{id}`,
    /// `POST /api/v1/sessions/{id}/revoke`, `GET` and `DELETE /api/v1/users/{id}/token`.
    pub fn admin_router(self, guard: crate::http::bearer::BearerGuard) -> Router {
        let routes = Router::new()
            .route("/api/v1/auth/requests", post(http_request))
            .route("/api/v1/auth/sessions/{id}", get(http_session))
            .route("/api/v1/sessions/{id}/revoke", post(http_revoke_session))
            .route(
                "/api/v1/users/{id}/token",
                get(http_token).delete(http_revoke_user),
            )
            .with_state(self);
        guard.protect(routes)
    }
}

fn api_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({ "error": code, "message": message.into() })),
    )
        .into_response()
}

fn bad_field(field: &str, message: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": "invalid_request", "field": field, "message": message.into() })),
    )
        .into_response()
}

fn parse_request_body(
    body: &[u8],
    defaults: &[String],
) -> Result<AuthRequest, (&'static str, String)> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| ("body", format!("the body is not JSON: {e}")))?;
    let Some(obj) = v.as_object() else {
        return Err(("body", "the body must be a JSON object".to_owned()));
    };
    let text = |k: &'static str| match obj.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err((k, format!("{k} must be a string"))),
    };
    let user = match (text("user_id")?, text("open_id")?) {
        (Some(u), None) => UserRef::UserId(u),
        (None, Some(o)) => UserRef::OpenId(o),
        (Some(_), Some(_)) => {
            return Err(("user_id", "give user_id or open_id, not both".to_owned()));
        }
        (None, None) => return Err(("user_id", "user_id or open_id is required".to_owned())),
    };
    let scopes = match obj.get("scopes") {
        None | Some(Value::Null) => defaults.to_vec(),
        Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ("scopes", "scopes must be an array of strings".to_owned()))?,
        Some(_) => {
            return Err((
                "scopes",
                "scopes must be an array of strings or a space-separated string".to_owned(),
            ))
        }
    };
    Ok(AuthRequest { user, scopes })
}

async fn http_request(State(svc): State<AuthService>, body: Bytes) -> Response {
    let req = match parse_request_body(&body, &svc.inner.opts.default_scopes) {
        Ok(r) => r,
        Err((field, message)) => return bad_field(field, message),
    };
    match svc.request(req).await {
        Ok(o) => (
            if o.reused {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            },
            Json(json!({
                "session_id": o.session_id.to_string(),
                "reused": o.reused,
                "state": "pending",
            })),
        )
            .into_response(),
        Err(AuthError::RateLimited { retry_after }) => {
            let secs = ceil_secs(retry_after);
            let mut resp = (
                StatusCode::TOO_MANY_REQUESTS,
                Json(json!({
                    "error": "rate_limited",
                    "message": format!("too many authorization requests for this user; retry in {secs} s"),
                    "retry_after_seconds": secs,
                })),
            )
                .into_response();
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            resp
        }
        Err(AuthError::Invalid { field, reason }) => bad_field(field, reason),
        Err(e @ AuthError::UnresolvedUser { .. }) => api_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unresolved_user",
            e.to_string(),
        ),
        Err(e @ AuthError::Lark(_)) => {
            api_error(StatusCode::BAD_GATEWAY, "lark_error", e.to_string())
        }
        Err(e @ AuthError::Store(_)) => api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store_error",
            e.to_string(),
        ),
    }
}

async fn http_session(State(svc): State<AuthService>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<SessionId>() else {
        return bad_field("id", "a session id is 32 hex characters");
    };
    match svc.store().run(move |s| s.get_session_summary(id)).await {
        Ok(Some(s)) if s.app_id == svc.inner.app_id => {
            (StatusCode::OK, Json(json!(s))).into_response()
        }
        Ok(_) => api_error(StatusCode::NOT_FOUND, "not_found", "no such session"),
        Err(e) => api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store_error",
            e.to_string(),
        ),
    }
}

#[derive(serde::Deserialize)]
struct TokenQuery {
    id_type: Option<String>,
}

/// The user a `/api/v1/users/{id}/…` path names: `id_type` says which id, else an `ou_`
/// prefix means an open_id. `None` for an unknown `id_type`.
fn path_user(id: String, id_type: Option<&str>) -> Option<UserRef> {
    match id_type {
        Some("open_id") => Some(UserRef::OpenId(id)),
        Some("user_id") => Some(UserRef::UserId(id)),
        None if id.starts_with("ou_") => Some(UserRef::OpenId(id)),
        None => Some(UserRef::UserId(id)),
        Some(_) => None,
    }
}

async fn http_token(
    State(svc): State<AuthService>,
    Path(id): Path<String>,
    Query(q): Query<TokenQuery>,
) -> Response {
    let Some(user) = path_user(id, q.id_type.as_deref()) else {
        return bad_field("id_type", "id_type is open_id or user_id");
    };
    match svc.access_token(user).await {
        Ok(t) => (
            StatusCode::OK,
            Json(json!({
                "access_token": t.access_token.expose_secret(),
                "expires_at": t.expires_at,
            })),
        )
            .into_response(),
        Err(TokenError::NotFound) => api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "this user has no token; request an authorization first",
        ),
        Err(TokenError::NeedsReauth { session }) => (
            StatusCode::CONFLICT,
            Json(json!({
                "error": "needs_reauthorization",
                "reason": "needs_reauthorization",
                "message": "the user's authorization is no longer accepted; request a new one",
                "session_id": session.map(|s| s.to_string()),
            })),
        )
            .into_response(),
        Err(e @ TokenError::RefreshInDoubt { retry_after }) => {
            let secs = ceil_secs(retry_after);
            let mut resp = (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({
                    "error": "refresh_in_doubt",
                    "message": e.to_string(),
                    "retry_after_seconds": secs,
                })),
            )
                .into_response();
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            resp
        }
        Err(e @ (TokenError::Refresh(_) | TokenError::Interrupted(_))) => {
            api_error(StatusCode::BAD_GATEWAY, "refresh_failed", e.to_string())
        }
        Err(e @ TokenError::Store(_)) => api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store_error",
            e.to_string(),
        ),
    }
}

/// `POST /api/v1/sessions/{id}/revoke`.
async fn http_revoke_session(State(svc): State<AuthService>, Path(id): Path<String>) -> Response {
    let Ok(id) = id.parse::<SessionId>() else {
        return bad_field("id", "a session id is 32 hex characters");
    };
    match svc.revoke_session(id).await {
        Ok(Some(s)) => (StatusCode::OK, Json(json!(s))).into_response(),
        Ok(None) => api_error(StatusCode::NOT_FOUND, "not_found", "no such session"),
        Err(e) => api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store_error",
            e.to_string(),
        ),
    }
}

/// `DELETE /api/v1/users/{id}/token`.
async fn http_revoke_user(
    State(svc): State<AuthService>,
    Path(id): Path<String>,
    Query(q): Query<TokenQuery>,
) -> Response {
    let Some(user) = path_user(id, q.id_type.as_deref()) else {
        return bad_field("id_type", "id_type is open_id or user_id");
    };
    match svc.revoke_user(user).await {
        Ok(Some(r)) => (
            StatusCode::OK,
            Json(json!({
                "revoked": true,
                "user_id": r.user_id,
                "session_id": r.session_id.map(|s| s.to_string()),
            })),
        )
            .into_response(),
        Ok(None) => api_error(StatusCode::NOT_FOUND, "not_found", "this user has no token"),
        Err(e) => api_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store_error",
            e.to_string(),
        ),
    }
}

async fn http_callback(State(svc): State<AuthService>, RawQuery(q): RawQuery) -> Response {
    let (status, html) = svc.oauth_callback(q.as_deref().unwrap_or("")).await;
    let mut resp = (status, html).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp.headers_mut().insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_normalized_with_offline_access() {
        let got = normalize_scopes(&[" b ".into(), "a".into(), "b".into()]).unwrap();
        assert_eq!(got, vec!["a", "b", OFFLINE_ACCESS]);
        assert!(normalize_scopes(&["a b".into()]).is_err());
        let many: Vec<String> = (0..60).map(|i| format!("s{i}")).collect();
        assert!(normalize_scopes(&many).is_err());
    }

    #[test]
    fn states_are_random_url_safe_and_long_enough() {
        let a = new_state();
        assert!(a.len() >= 22, "at least 128 bits");
        assert!(a
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_ne!(a, new_state());
        assert_eq!(state_hash(&a), state_hash(&a));
    }

    #[test]
    fn pages_say_nothing_secret() {
        for p in [
            Page::Authorized,
            Page::Rejected,
            Page::Expired,
            Page::Failed(FailureReason::UnknownError),
            Page::Failed(FailureReason::StateMismatch),
        ] {
            let (_, Html(body)) = page_html(p);
            assert!(body.starts_with("<!doctype html>"));
            assert!(!body.contains("Error:"));
        }
    }
}
