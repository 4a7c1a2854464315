//! Starting an authorization: a request (admin API, MCP, or the `/authorize` command) opens
//! a pending session and sends the Authorize card.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::RngCore as _;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::error::AuthError;
use super::flow::AuthService;
use super::render::authorize_card;
use super::state::{enter, Phase};
use super::time::{ceil_secs, ms};
use crate::lark::{self, AuthorizeParams, Pkce, ReceiveIdType, Receiver, UserIdType};
use crate::metrics;
use crate::storage::{AuthSession, FailureReason, SessionId};

/// The scope that makes the platform issue a refresh token; always requested.
pub const OFFLINE_ACCESS: &str = lark::oauth::OFFLINE_ACCESS;
/// Most scopes one request may name (the authorize page's limit).
pub(super) const MAX_SCOPES: usize = 50;
/// How long a user's request lease is held at most in a fleet: beyond a card send's timeout
/// and retries, so it never lapses while its holder is still sending.
const REQUEST_LEASE_TTL: Duration = Duration::from_secs(45);
/// How often an instance looks again at a request lease another instance holds.
const REQUEST_LEASE_POLL: Duration = Duration::from_millis(50);
/// How long a request waits for another instance's request for the same user before it is
/// answered busy (`503` + `Retry-After`).
const REQUEST_LEASE_WAIT: Duration = Duration::from_secs(20);

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

    pub(super) fn receiver(&self) -> Receiver {
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
    pub(super) fn of_stored(key: &str, open_id: Option<&str>) -> Self {
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

/// SHA-256 of an OAuth state: the only form of it the store keeps.
#[must_use]
pub fn state_hash(state: &str) -> [u8; 32] {
    Sha256::digest(state.as_bytes()).into()
}

pub(super) fn new_state() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}

pub(super) fn valid_id(field: &'static str, v: &str) -> Result<(), AuthError> {
    if v.is_empty() || v.len() > 256 || v.chars().any(char::is_control) {
        return Err(AuthError::Invalid {
            field,
            reason: "must be 1 to 256 printable characters".to_owned(),
        });
    }
    Ok(())
}

/// Sorted, de-duplicated scopes with `offline_access`.
pub(super) fn normalize_scopes(scopes: &[String]) -> Result<Vec<String>, AuthError> {
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

impl AuthService {
    /// The card of a new session could not be sent: the session fails (`unknown_error`, of
    /// the card or the device flow), written only if still pending with `expect_hash`, and the
    /// platform's error is returned.
    pub(super) async fn card_not_sent(
        &self,
        session: &AuthSession,
        expect_hash: Option<[u8; 32]>,
        device: bool,
        e: lark::Error,
    ) -> Result<RequestOutcome, AuthError> {
        warn!(session = %session.session_id, error = %e, "Sending the authorization card failed.");
        let mut failed = session.clone();
        enter(
            &mut failed,
            Phase::Failed(FailureReason::UnknownError),
            self.now(),
        );
        self.store()
            .run(move |s| s.update_if_pending(expect_hash, &failed, None))
            .await?;
        self.count_failure_of(FailureReason::UnknownError, device);
        Err(AuthError::Lark(e))
    }

    /// Sliding-window rate limit per user: `Err(retry_after)` when over.
    pub(super) fn check_rate(&self, key: &str, now: u64) -> Result<(), Duration> {
        let limit = usize::try_from(self.inner.opts.rate_limit).unwrap_or(usize::MAX);
        self.inner
            .rate
            .acquire(&key.to_owned(), limit, Duration::from_millis(now))
    }

    /// The per-user rate limit as the store backs it: on PostgreSQL counted in the database,
    /// shared by every instance of the fleet (`Ok(Err(retry_after))` when over); on redb in
    /// this process ([`Self::check_rate`]). A store that cannot count refuses (fail closed).
    async fn check_rate_shared(
        &self,
        key: &str,
        now: u64,
    ) -> Result<Result<(), Duration>, AuthError> {
        let crate::storage::Db::Postgres(pg) = self.store() else {
            return Ok(self.check_rate(key, now));
        };
        let (pg, limit, window) = (
            pg.clone(),
            self.inner.opts.rate_limit,
            self.inner.opts.rate_limit_window,
        );
        let key = format!("auth_request/{}/{key}", self.inner.app_id);
        let wait = tokio::task::spawn_blocking(move || pg.rate_acquire(&key, limit, window, now))
            .await
            .map_err(|e| crate::storage::Error::Join(e.to_string()))??;
        Ok(wait.map_or(Ok(()), Err))
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
        if let Err(retry_after) = self.check_rate_shared(&key, now).await? {
            metrics::get().auth_rate_limited.inc();
            return Err(AuthError::RateLimited { retry_after });
        }
        let open_id = self.resolve_open_id(&req.user).await?;
        let _guard = self.inner.request_locks.lock(&key).await;
        let Some(holder) = self.fleet_holder.clone() else {
            return self
                .request_locked(&req.user, key, scopes, open_id, now)
                .await;
        };
        // In a fleet the user's requests are serialized across instances too (the lock above
        // is this process's): without it two instances asked at once would each find no
        // pending session and each send a card.
        let name = format!("request/{}/{key}", self.inner.app_id);
        self.acquire_request_lease(&name, &holder).await?;
        let outcome = self
            .request_locked(&req.user, key, scopes, open_id, self.now())
            .await;
        let (n, h) = (name.clone(), holder);
        if let Err(e) = self.store().run(move |s| s.release_lease(&n, &h)).await {
            // It lapses by itself after its TTL.
            warn!(error = %e, lease = %name, "Letting a request lease go failed.");
        }
        outcome
    }

    /// Takes the lease `name` for this request, waiting while another instance holds it (its
    /// request for the same user is sending a card) at most [`REQUEST_LEASE_WAIT`]; then
    /// [`AuthError::Busy`]. A holder that died lets it go after [`REQUEST_LEASE_TTL`].
    async fn acquire_request_lease(
        &self,
        name: &str,
        holder: &std::sync::Arc<str>,
    ) -> Result<(), AuthError> {
        let give_up = tokio::time::Instant::now() + REQUEST_LEASE_WAIT;
        let ttl = ms(REQUEST_LEASE_TTL);
        loop {
            let (n, h, now) = (name.to_owned(), holder.clone(), self.now());
            if self
                .store()
                .run(move |s| s.try_acquire_lease(&n, &h, ttl, now))
                .await?
            {
                return Ok(());
            }
            if tokio::time::Instant::now() >= give_up {
                return Err(AuthError::Busy {
                    retry_after: REQUEST_LEASE_POLL.saturating_mul(20),
                });
            }
            tokio::time::sleep(REQUEST_LEASE_POLL).await;
        }
    }

    /// [`Self::request`] once the user is resolved and holds the user's request lock (and, in
    /// a fleet, the user's request lease).
    async fn request_locked(
        &self,
        user: &UserRef,
        key: String,
        scopes: Vec<String>,
        open_id: String,
        now: u64,
    ) -> Result<RequestOutcome, AuthError> {
        let app = self.inner.app_id.clone();
        let k = key.clone();
        let existing = self
            .store()
            .run(move |s| s.sessions_for_user(&app, &k))
            .await?;
        if let Some(s) = existing.iter().rev().find(|s| {
            // A session whose card was never recorded as sent (its instance died between
            // storing it and sending the card) is not reused: the user has no card to click.
            matches!(
                Phase::of(s),
                Phase::AwaitingRedirect | Phase::AwaitingDevice
            ) && s.expires_at > now
                && s.scopes == scopes
                && s.card_message_id.is_some()
        }) {
            metrics::get().auth_requests.inc();
            return Ok(RequestOutcome {
                session_id: s.session_id,
                reused: true,
            });
        }

        if self.device_flow() {
            return self.request_device(user, scopes, open_id, now).await;
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
            let card = authorize_card(&opts.card, &scopes, opts.session_expiry, url.as_str(), &sid);
            self.lark().send_card(&user.receiver(), &card).await
        }
        .await;
        match sent {
            Ok(msg) => {
                let mut with_card = session.clone();
                with_card.card_message_id = Some(msg.message_id);
                self.store()
                    .run(move |s| s.update_if_pending(Some(hash), &with_card, None))
                    .await?;
                let m = metrics::get();
                m.auth_requests.inc();
                m.auth_session
                    .get_or_create(&metrics::AuthLabel::card(&self.inner.app_id))
                    .inc();
                info!(session = %session.session_id, "Authorization card sent.");
                Ok(RequestOutcome {
                    session_id: session.session_id,
                    reused: false,
                })
            }
            Err(e) => self.card_not_sent(&session, Some(hash), false, e).await,
        }
    }

    /// The open_id of the user a request is for: an open_id as given; a user_id looked up in
    /// the directory (tenant token). The completion compares it with the open_id of the user
    /// who authorized, so a request whose user cannot be resolved is refused: transient
    /// failures as [`AuthError::Lark`], anything else as [`AuthError::UnresolvedUser`].
    pub(super) async fn resolve_open_id(&self, user: &UserRef) -> Result<String, AuthError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn scopes_are_normalized_with_offline_access() {
        let got = normalize_scopes(&[" b ".into(), "a".into(), "b".into()]).unwrap();
        assert_eq!(got, vec!["a", "b", OFFLINE_ACCESS]);
        assert!(normalize_scopes(&["a b".into()]).is_err());
        let many: Vec<String> = (0..60).map(|i| format!("s{i}")).collect();
        assert!(normalize_scopes(&many).is_err());
    }

    #[test]
    pub(super) fn states_are_random_url_safe_and_long_enough() {
        let a = new_state();
        assert!(a.len() >= 22, "at least 128 bits");
        assert!(a
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_ne!(a, new_state());
        assert_eq!(state_hash(&a), state_hash(&a));
    }
}
