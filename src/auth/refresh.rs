//! Keeping user tokens fresh: the refresh worker, refresh-if-due under the user's lock, and
//! the handling of a refresh whose answer was lost.
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

use std::sync::Arc;
use std::time::Duration;

use rand::Rng as _;
use tracing::{debug, info, warn};

use super::error::{AuthError, TokenError};
use super::flow::AuthService;
use super::request::{AuthRequest, UserRef};
use super::sync::user_record;
use super::time::ms;
use crate::lark::OAuthErrorKind;
use crate::metrics::{self, AppOutcomeLabel};
use crate::storage::UserToken;
use crate::workers::WorkerFn;

/// After a refresh failed for a transient reason, the next attempt waits this long.
pub(super) const REFRESH_RETRY: Duration = Duration::from_secs(60);
/// After a refresh whose answer was lost, the old access token is checked no earlier than
/// this: the platform keeps a superseded access token working about a minute after a refresh,
/// so only a check after that grace tells whether the refresh took effect.
pub const REFRESH_PROBE_AFTER: Duration = Duration::from_secs(120);
/// Most tokens one refresh run reads.
pub(super) const REFRESH_BATCH: usize = 512;
/// Longest wait of the refresh worker between two looks at the due index.
pub(super) const REFRESH_IDLE: Duration = Duration::from_secs(10);
/// How long a user's refresh lease is held at most: well beyond the refresh request's timeout
/// (`lark::DEFAULT_REQUEST_TIMEOUT`, 15 s) and its retries, so a lease never lapses while its
/// holder's refresh is still in flight; a crashed holder's lease passes on after it.
pub const REFRESH_LEASE_TTL: Duration = Duration::from_secs(120);
/// How often an instance looks again at a refresh lease another instance holds.
const REFRESH_LEASE_POLL: Duration = Duration::from_millis(100);
/// How long a caller waits for another instance's refresh of an expired token before it is
/// answered "in doubt" (`503` + `Retry-After`): well inside the HTTP request timeout, so a
/// holder that died never makes readers hang until its lease lapses.
const REFRESH_LEASE_WAIT: Duration = Duration::from_secs(3);

impl AuthService {
    /// `token_refresh{app_id, outcome}` ([`metrics::REFRESH_OUTCOMES`]).
    pub(super) fn count_refresh(&self, outcome: &'static str) {
        metrics::get()
            .token_refresh
            .get_or_create(&AppOutcomeLabel::new(&self.inner.app_id, outcome))
            .inc();
    }
}

impl AuthService {
    /// Under the user's lock: re-reads the token and refreshes it if it is still due. A
    /// failure that surely left the platform untouched leaves a still-valid token usable and
    /// retries after a minute; a lost answer puts the refresh in doubt (module documentation).
    ///
    /// The work runs in a task of its own holding the user's lock, tracked for
    /// [`Self::finish_refreshes`]: if this future is dropped (a cancelled caller, the refresh
    /// worker stopped at shutdown) the refresh still completes and its result is stored.
    pub(super) async fn refresh_if_due(&self, key: &str) -> Result<UserToken, TokenError> {
        let guard = self.inner.token_locks.lock(key).await;
        let me = self.clone();
        let key = key.to_owned();
        let task = self.tasks.spawn(async move {
            let r = match me.fleet_holder.clone() {
                Some(holder) => me.refresh_leased(&key, &holder).await,
                None => me.refresh_locked(&key).await,
            };
            drop(guard);
            r
        });
        match task.await {
            Ok(r) => r,
            Err(e) => Err(TokenError::Interrupted(e.to_string())),
        }
    }

    /// Waits until every refresh in flight has stored its result (and every other task of
    /// the service has ended): closes the service's tracker and waits for it. Call at shutdown
    /// once the workers and the HTTP server have stopped (refreshes started later are still
    /// tracked).
    pub async fn finish_refreshes(&self) {
        self.stop_device_polls();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// In a fleet: takes the user's refresh lease, then re-reads the token and refreshes it if
    /// it is still due ([`Self::refresh_locked`] reads it afresh: another instance may have
    /// refreshed it meanwhile), and lets the lease go once the outcome is stored. Fail closed:
    /// without the lease, the refresh token is not presented. While another instance holds
    /// the lease (refreshing, or dead while refreshing until the lease lapses), the stored
    /// token is served as long as it is valid; an expired one is waited for at most
    /// [`REFRESH_LEASE_WAIT`], then answered "in doubt".
    async fn refresh_leased(&self, key: &str, holder: &Arc<str>) -> Result<UserToken, TokenError> {
        let name = format!("refresh/{}/{key}", self.inner.app_id);
        let ttl = ms(REFRESH_LEASE_TTL);
        let give_up = tokio::time::Instant::now() + REFRESH_LEASE_WAIT;
        loop {
            let (n, h, now) = (name.clone(), holder.clone(), self.now());
            if self
                .store()
                .run(move |s| s.try_acquire_lease(&n, &h, ttl, now))
                .await?
            {
                break;
            }
            let tok = self.load_token(key).await?.ok_or(TokenError::NotFound)?;
            if tok.needs_reauth {
                return Err(TokenError::NeedsReauth {
                    session: tok.session_id,
                });
            }
            if self.now() < tok.expires_at {
                return Ok(tok);
            }
            if tokio::time::Instant::now() >= give_up {
                debug!(lease = %name, "Another instance holds the refresh lease of an expired token.");
                return Err(TokenError::RefreshInDoubt {
                    retry_after: REFRESH_LEASE_WAIT,
                });
            }
            tokio::time::sleep(REFRESH_LEASE_POLL).await;
        }
        let r = self.refresh_locked(key).await;
        let (n, h) = (name.clone(), holder.clone());
        if let Err(e) = self.store().run(move |s| s.release_lease(&n, &h)).await {
            // It lapses by itself after its TTL.
            warn!(error = %e, lease = %name, "Letting a refresh lease go failed.");
        }
        r
    }

    pub(super) async fn refresh_locked(&self, key: &str) -> Result<UserToken, TokenError> {
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
            self.count_refresh("reauth_required");
            return Err(self.needs_reauth(tok).await);
        }
        let sent_at = self.now();
        if self.fleet_holder.is_some() {
            // In a fleet the refresh is in doubt from before the refresh token can reach the
            // platform until its outcome is stored: if this instance dies in between, the
            // doubt is on record and whoever takes the lapsed lease settles it (module
            // documentation) instead of presenting a token that may be spent.
            let mut intent = tok.clone();
            intent.refresh_in_doubt_since = Some(sent_at);
            intent.refresh_due_at = sent_at.saturating_add(ms(REFRESH_PROBE_AFTER));
            self.store().run(move |s| s.put_token(&intent)).await?;
        }
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
                self.count_refresh("success");
                self.update_user_after_refresh(&new);
                Ok(new)
            }
            Err(e)
                if matches!(
                    e.oauth_kind(),
                    Some(OAuthErrorKind::InvalidGrant | OAuthErrorKind::UserNotAllowed)
                ) =>
            {
                warn!(error = %e, "The refresh token was refused; the user must authorize again.");
                self.count_refresh("reauth_required");
                Err(self.needs_reauth(tok).await)
            }
            Err(e) if e.outcome_unknown() => {
                warn!(error = %e, "The answer to a token refresh was lost; the refresh token will not be presented again until a check shows whether the refresh took effect.");
                self.count_refresh("unknown");
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
                self.count_refresh("failure");
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
    pub(super) async fn settle_doubt(
        &self,
        mut tok: UserToken,
    ) -> Result<Result<UserToken, TokenError>, TokenError> {
        let now = self.now();
        if now >= tok.expires_at {
            warn!("A refresh in doubt cannot be checked: the old access token has expired. Failing closed; the user must authorize again.");
            self.count_refresh("reauth_required");
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
                self.count_refresh("reauth_required");
                Ok(Err(self.needs_reauth(tok).await))
            }
            Err(e) if e.is_user_token_invalid() => {
                warn!(error = %e, "The old access token was revoked before its expiry: the lost refresh took effect and its tokens are gone; the user must authorize again.");
                self.count_refresh("reauth_required");
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

    /// After a refresh, the user's record is brought up to date from user info read with the new
    /// token (name, email, avatar), as the Python deployment did. In the background on the
    /// service's tracker, so the refresh answers at once; a failure only logs, and a user info
    /// that names another user changes nothing.
    fn update_user_after_refresh(&self, token: &UserToken) {
        let Some(open_id) = token.open_id.clone() else {
            return;
        };
        let me = self.clone();
        let access = token.access_token.clone();
        let app_id = token.app_id.clone();
        self.tasks.spawn(async move {
            let info = match me.lark().user_info(&access).await {
                Ok(info) if info.open_id == open_id => info,
                Ok(_) => {
                    warn!("User info after a refresh names another user; the user record is left as it was.");
                    return;
                }
                Err(e) => {
                    debug!(error = %e, "Reading user info after a refresh failed; the user record is left as it was.");
                    return;
                }
            };
            let now = me.now();
            let result = me
                .store()
                .run(move |s| {
                    let old = s.get_user(&app_id, &open_id)?;
                    s.put_user(&user_record(app_id, &info, old, now))
                })
                .await;
            if let Err(e) = result {
                warn!(error = %e, "Storing the user record after a refresh failed.");
            }
        });
    }

    /// Marks the token dead (and, if configured, sends a new card). Returns the error to give.
    pub(super) async fn needs_reauth(&self, mut tok: UserToken) -> TokenError {
        let session = tok.session_id;
        tok.needs_reauth = true;
        let t2 = tok.clone();
        let now = self.now();
        let events = self.needs_reauth_events(&tok, now);
        if let Err(e) = self
            .store()
            .run(move |s| s.put_token_with_events(&t2, &events, now))
            .await
        {
            return TokenError::Store(e);
        }
        if self.inner.opts.resend_card_on_reauth {
            let me = self.clone();
            let req = AuthRequest {
                user: UserRef::of_stored(&tok.user_id, tok.open_id.as_deref()),
                scopes: tok.scopes.clone(),
            };
            self.tasks.spawn(async move {
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
        // A JoinSet, so stopping the worker drops the waits that have not started a refresh;
        // each task is also tracked by the service's tracker (a refresh that started runs in
        // a task of its own and completes anyway, see `refresh_if_due`).
        let mut tasks = tokio::task::JoinSet::new();
        for (app, user, _) in due {
            if app != self.inner.app_id {
                continue;
            }
            let me = self.clone();
            let sem = sem.clone();
            let jitter = self.inner.opts.refresh_jitter;
            tasks.spawn(self.tasks.track_future(async move {
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
            }));
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
}
