//! The device authorization flow (RFC 8628), card-driven: no inbound port needed.
//!
//! A request in device mode asks the platform for a device code, sends the Authorize card
//! whose button opens the platform's verification page (the complete URI, with the user
//! code), and polls the token endpoint at the platform's interval on the service's task
//! tracker. Each answer becomes an input of the state machine ([`Phase::AwaitingDevice`]):
//! `authorization_pending` waits, `slow_down` adds 5 s to the interval for good
//! ([`PollSchedule`]), `access_denied` rejects, `expired_token` expires; tokens are stored
//! only after the user info of the new token showed the card's user (the same identity and
//! tenant checks as the redirect flow), else the session fails and nothing is stored.
//!
//! **Restarts and fleets.** The device code is stored (sealed, with the interval in force and
//! the code's expiry: `storage::DevicePoll`) before the session, under the session's poll
//! lease `device/{id}`, so the polling survives the process: one instance at a time polls a
//! session, the holder of its lease, renewed before every poll and at least every
//! [`POLL_LEASE_RENEW`]; a poller that cannot renew stops (or, when the store cannot say,
//! waits) without polling. Every [`TAKEOVER_EVERY`] each service takes over its app's stored
//! polls whose lease is free (a stopped run let it go; a dead one's lapsed after
//! [`POLL_LEASE_TTL`]) and resumes them ([`AuthService::resume_device_polls`]). At shutdown the
//! polls stop and their leases are let go ([`AuthService::finish_refreshes`]). Only a pending
//! device session without a stored code (from an older version) is expired at start
//! ([`AuthService::expire_device_sessions_at_start`]). Completion stays one compare-and-set.
//!
//! **No refresh token.** When the grant has no refresh token (it may not, even with
//! `offline_access`), the token is served until it expires, and the user gets a new card
//! when the share `auth.token_refresh_threshold` of its lifetime has passed, so they can
//! authorize again before it runs out.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::error::AuthError;
use super::flow::{AuthService, Run};
use super::render::authorize_card;
use super::request::{AuthRequest, RequestOutcome, UserRef};
use super::state::{Input, Phase};
use super::time::ms;
use crate::lark::DevicePoll;
use crate::metrics;
use crate::storage::{
    AuthSession, DevicePoll as StoredPoll, FailureReason, SessionId, SessionState, UserToken,
};

/// What `slow_down` adds to the interval (RFC 8628 §3.5).
pub(super) const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
/// The shortest interval honoured, whatever the platform says.
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// How long a device poll lease lasts unless renewed: how soon another instance may take over
/// the sessions of one that died.
pub(super) const POLL_LEASE_TTL: Duration = Duration::from_secs(10);
/// The poller renews its lease at least this often (and before every poll).
const POLL_LEASE_RENEW: Duration = Duration::from_secs(3);
/// How often an instance looks for device polls nobody holds.
const TAKEOVER_EVERY: Duration = Duration::from_secs(2);
/// Device polls looked at per look.
const TAKEOVER_BATCH: usize = 1_000;

/// When to poll next: every `interval` after the last poll; each `slow_down` adds 5 s to
/// the interval for the rest of the session. Times are unix ms from the service's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PollSchedule {
    interval_ms: u64,
    next_at: u64,
}

/// An answer to a poll, as the schedule sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PollAnswer {
    /// `authorization_pending`, or an error worth trying again.
    Pending,
    /// `slow_down`.
    SlowDown,
}

impl PollSchedule {
    /// The first poll is one interval after `now` (the user cannot have approved yet).
    pub(super) fn new(interval: Duration, now: u64) -> Self {
        let interval_ms = ms(interval.max(MIN_INTERVAL));
        Self {
            interval_ms,
            next_at: now.saturating_add(interval_ms),
        }
    }

    /// The interval in force.
    pub(super) fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    /// When the next poll may go out (unix ms).
    #[cfg(test)]
    pub(super) fn next_at(&self) -> u64 {
        self.next_at
    }

    /// How long to wait at `now` before the next poll.
    pub(super) fn wait(&self, now: u64) -> Duration {
        Duration::from_millis(self.next_at.saturating_sub(now))
    }

    /// A poll went out at `now` and got `answer`.
    pub(super) fn polled(&mut self, now: u64, answer: PollAnswer) {
        if answer == PollAnswer::SlowDown {
            self.interval_ms = self.interval_ms.saturating_add(ms(SLOW_DOWN_STEP));
        }
        self.next_at = now.saturating_add(self.interval_ms);
    }
}

impl AuthService {
    /// The service authorizing with the device flow (`auth.flow`): requests send a card
    /// that opens the platform's verification page, and the service polls. Set it before
    /// the service is cloned.
    #[must_use]
    pub fn with_device_flow(mut self, on: bool) -> Self {
        self.device.enabled = on;
        self
    }

    /// True when requests use the device flow.
    #[must_use]
    pub fn device_flow(&self) -> bool {
        self.device.enabled
    }

    /// Stops every device poll (at shutdown). A poll whose answer is being handled finishes.
    pub(super) fn stop_device_polls(&self) {
        self.device.stop.cancel();
    }

    /// [`AuthService::request`] in device mode, once the user is resolved and no pending
    /// session can be reused: asks the platform for a device code, takes the session's poll
    /// lease, stores the code (sealed) and then the session, sends the card and starts
    /// polling. The code is stored before the session, under the lease: a session of this
    /// build always has its code, and no other instance touches either meanwhile.
    pub(super) async fn request_device(
        &self,
        user: &UserRef,
        scopes: Vec<String>,
        open_id: String,
        now: u64,
    ) -> Result<RequestOutcome, AuthError> {
        let scope_refs: Vec<&str> = scopes.iter().map(String::as_str).collect();
        let grant = match self.lark().device_authorization(&scope_refs).await {
            Ok(g) => g,
            Err(e) => {
                warn!(error = %e, "Starting a device authorization failed.");
                self.count_failure_of(FailureReason::UnknownError, true);
                return Err(AuthError::Lark(e));
            }
        };
        let opts = &self.inner.opts;
        let lifetime = opts.session_expiry.min(grant.expires_in);
        let mut session = AuthSession::new_pending(
            &self.inner.app_id,
            user.id(),
            scopes.clone(),
            now,
            ms(lifetime),
        );
        session.open_id = Some(open_id);
        let id = session.session_id;
        let poll = StoredPoll {
            session_id: id,
            app_id: self.inner.app_id.clone(),
            device_code: grant.device_code.clone(),
            interval_ms: ms(grant.interval.max(MIN_INTERVAL)),
            expires_at: now.saturating_add(ms(grant.expires_in)),
        };
        // A fresh random id: nobody else can hold its lease.
        let _held = self.take_poll_lease(id).await?;
        let p2 = poll.clone();
        self.store().run(move |s| s.put_device_poll(&p2)).await?;
        let s2 = session.clone();
        self.store().run(move |s| s.put_session(&s2)).await?;
        let sid = session.session_id.to_string();
        let card = authorize_card(
            &opts.card,
            &scopes,
            lifetime,
            &grant.verification_uri_complete,
            &sid,
        );
        match self.lark().send_card(&user.receiver(), &card).await {
            Ok(msg) => {
                let mut with_card = session.clone();
                with_card.card_message_id = Some(msg.message_id);
                self.store()
                    .run(move |s| s.update_if_pending(None, &with_card, None))
                    .await?;
                let m = metrics::get();
                m.auth_requests.inc();
                m.auth_session
                    .get_or_create(&metrics::AuthLabel::flow(&self.inner.app_id, true))
                    .inc();
                info!(session = %session.session_id, interval_s = grant.interval.as_secs(), "Device authorization card sent; polling.");
                self.spawn_device_poll(poll);
                Ok(RequestOutcome {
                    session_id: session.session_id,
                    reused: false,
                })
            }
            Err(e) => {
                let out = self.card_not_sent(&session, None, true, e).await;
                self.end_polling(id).await;
                out
            }
        }
    }

    /// This instance's name on device poll leases: its fleet name, else its own.
    fn poll_holder(&self) -> Arc<str> {
        self.fleet_holder
            .clone()
            .unwrap_or_else(|| self.device.holder.clone())
    }

    /// Takes (or extends) the poll lease of session `id`; true if this instance holds it.
    async fn take_poll_lease(&self, id: SessionId) -> Result<bool, AuthError> {
        let (name, holder, now) = (poll_lease(id), self.poll_holder(), self.now());
        Ok(self
            .store()
            .run(move |s| s.try_acquire_lease(&name, &holder, ms(POLL_LEASE_TTL), now))
            .await?)
    }

    /// Extends the poll lease of session `id` if this instance still holds it (unexpired).
    async fn renew_poll_lease(&self, id: SessionId) -> Result<bool, AuthError> {
        let (name, holder, now) = (poll_lease(id), self.poll_holder(), self.now());
        Ok(self
            .store()
            .run(move |s| s.renew_lease(&name, &holder, ms(POLL_LEASE_TTL), now))
            .await?)
    }

    /// Lets the poll lease of session `id` go (at shutdown, or once the polling ended), so
    /// the next instance, or the next run, resumes without waiting for it to lapse.
    async fn release_poll_lease(&self, id: SessionId) {
        let (name, holder) = (poll_lease(id), self.poll_holder());
        if let Err(e) = self
            .store()
            .run(move |s| s.release_lease(&name, &holder))
            .await
        {
            warn!(session = %id, error = %e, "Letting a device poll lease go failed; it lapses on its own.");
        }
    }

    /// The polling of session `id` is over for good: its code is deleted, then its lease let go.
    async fn end_polling(&self, id: SessionId) {
        if let Err(e) = self.store().run(move |s| s.delete_device_poll(id)).await {
            warn!(session = %id, error = %e, "Deleting a finished device poll failed; the next look at it deletes it.");
        }
        self.release_poll_lease(id).await;
    }

    /// Polls `poll` on the service's tasks, this instance holding its lease; at shutdown the
    /// lease is let go (the code stays stored, so the next run resumes).
    fn spawn_device_poll(&self, poll: StoredPoll) {
        let id = poll.session_id;
        if !self.device.mark_polling(id) {
            return;
        }
        let me = self.clone();
        let stop = self.device.stop.clone();
        self.tasks.spawn(async move {
            let end = tokio::select! {
                () = stop.cancelled() => {
                    info!(session = %id, "Device authorization polling stopped at shutdown; the next run resumes it.");
                    PollEnd::Stopped
                }
                end = me.poll_device(poll) => end,
            };
            match end {
                PollEnd::Ended => me.end_polling(id).await,
                PollEnd::Stopped => me.release_poll_lease(id).await,
                PollEnd::LeaseLost => {}
            }
            me.device.unmark_polling(id);
        });
    }

    /// Runs one step of the polling (a poll in flight, the user check, storing the outcome)
    /// while renewing the lease every [`POLL_LEASE_RENEW`], so that a step slower than the
    /// lease (a request timeout is longer) does not let another instance poll the same code
    /// meanwhile. A step is never cut short: a lost lease stops the polling after it.
    async fn keeping_lease<T>(&self, id: SessionId, step: impl Future<Output = T>) -> T {
        tokio::pin!(step);
        let mut held = true;
        loop {
            tokio::select! {
                out = &mut step => return out,
                () = tokio::time::sleep(POLL_LEASE_RENEW), if held => {
                    match self.renew_poll_lease(id).await {
                        Ok(true) => {}
                        Ok(false) => {
                            held = false;
                            warn!(session = %id, "The device poll lease was lost during a poll; polling stops after it.");
                        }
                        Err(e) => {
                            warn!(session = %id, error = %e, "Renewing a device poll lease during a poll failed.");
                        }
                    }
                }
            }
        }
    }

    /// Polls until the session ends: the platform's answer, the card's reject button, the
    /// sweep or a revoke (each poll first re-reads the session). Before every poll, and at
    /// least every [`POLL_LEASE_RENEW`] while waiting, the lease is renewed: an instance that
    /// lost it (it stalled past the lease, another took over) stops without polling again,
    /// and one that cannot tell (the store is unreachable) does not poll.
    async fn poll_device(&self, poll: StoredPoll) -> PollEnd {
        let id = poll.session_id;
        let mut stored = poll;
        let mut schedule = PollSchedule::new(Duration::from_millis(stored.interval_ms), self.now());
        loop {
            let wait = schedule.wait(self.now());
            tokio::time::sleep(wait.min(POLL_LEASE_RENEW)).await;
            match self.renew_poll_lease(id).await {
                Ok(true) => {}
                Ok(false) => {
                    info!(session = %id, "This instance no longer holds the device poll lease (another instance took the session over); polling stops here.");
                    return PollEnd::LeaseLost;
                }
                Err(e) => {
                    warn!(session = %id, error = %e, "Renewing a device poll lease failed; not polling until it is renewed.");
                    continue;
                }
            }
            if !schedule.wait(self.now()).is_zero() {
                continue;
            }
            let session = match self.store().run(move |s| s.get_session(id)).await {
                Ok(Some(s)) => s,
                Ok(None) => return PollEnd::Ended,
                Err(e) => {
                    warn!(session = %id, error = %e, "Reading a device session failed; polling again later.");
                    schedule.polled(self.now(), PollAnswer::Pending);
                    continue;
                }
            };
            if Phase::of(&session) != Phase::AwaitingDevice {
                return PollEnd::Ended;
            }
            let mut run = Run::new(session);
            let now = self.now();
            let input = if now >= run.session.expires_at {
                Input::DeviceExpired
            } else {
                match self
                    .keeping_lease(id, self.lark().poll_device_token(&stored.device_code))
                    .await
                {
                    Ok(DevicePoll::Pending) => {
                        schedule.polled(self.now(), PollAnswer::Pending);
                        continue;
                    }
                    Ok(DevicePoll::SlowDown) => {
                        schedule.polled(self.now(), PollAnswer::SlowDown);
                        info!(session = %id, interval_s = schedule.interval().as_secs(), "The platform asked to poll more slowly.");
                        // Kept for whoever polls next (a restart, another instance).
                        stored.interval_ms = ms(schedule.interval());
                        let p = stored.clone();
                        if let Err(e) = self.store().run(move |s| s.put_device_poll(&p)).await {
                            warn!(session = %id, error = %e, "Storing the slower device poll interval failed.");
                        }
                        continue;
                    }
                    Ok(DevicePoll::Denied) => Input::DeviceDenied,
                    Ok(DevicePoll::Expired) => Input::DeviceExpired,
                    Ok(DevicePoll::Granted(token)) => {
                        run.token = Some(token);
                        match self.keeping_lease(id, self.identify_user(&mut run)).await {
                            Input::UserIdentified(identity) => Input::DeviceApproved(identity),
                            _ => Input::DeviceFailed,
                        }
                    }
                    Err(e) if e.is_transient() && !e.outcome_unknown() => {
                        warn!(session = %id, error = %e, "A device poll failed; polling again.");
                        schedule.polled(self.now(), PollAnswer::Pending);
                        continue;
                    }
                    Err(e) => {
                        warn!(session = %id, error = %e, "Device authorization polling failed; the session fails.");
                        Input::DeviceFailed
                    }
                }
            };
            if let Err(e) = self.keeping_lease(id, self.drive(&mut run, input)).await {
                warn!(session = %id, error = %e, "Finishing a device authorization failed.");
            }
            if Phase::of(&run.session) == Phase::Completed {
                self.after_device_completion(&run.session).await;
            }
            return PollEnd::Ended;
        }
    }

    /// A device grant without a refresh token: the user is asked again (a new card) once the
    /// share `auth.token_refresh_threshold` of the token's lifetime has passed, if the token
    /// is still the one this session stored by then.
    async fn after_device_completion(&self, session: &AuthSession) {
        if session.refresh_token.is_some() {
            return;
        }
        let app = session.app_id.clone();
        let key = session.user_id.clone();
        let token = match self.store().run(move |s| s.get_token(&app, &key)).await {
            Ok(Some(t)) if t.session_id == Some(session.session_id) => t,
            _ => return,
        };
        info!(session = %session.session_id, "The device grant carried no refresh token: the token is served until it expires and the user will be asked again before that.");
        self.spawn_reask(token);
    }

    fn spawn_reask(&self, token: UserToken) {
        let me = self.clone();
        let stop = self.device.stop.clone();
        self.tasks.spawn(async move {
            let wait = Duration::from_millis(token.refresh_due_at.saturating_sub(me.now()));
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            let app = token.app_id.clone();
            let key = token.user_id.clone();
            let current = me.store().run(move |s| s.get_token(&app, &key)).await;
            let still = matches!(&current, Ok(Some(t)) if t.session_id == token.session_id && t.refresh_token.is_none());
            if !still {
                return;
            }
            info!("A token without a refresh token nears its expiry; asking the user again.");
            let req = AuthRequest {
                user: UserRef::of_stored(&token.user_id, token.open_id.as_deref()),
                scopes: token.scopes.clone(),
            };
            if let Err(e) = me.request(req).await {
                warn!(error = %e, "Asking the user to authorize again failed.");
            }
        });
    }

    /// At start-up: device sessions an earlier run left pending without a stored code (written
    /// by an older version, which kept codes in memory only) cannot be polled, so each is
    /// expired now, its card patched, and the user may ask again. Returns how many. Sessions
    /// with a stored code are left to [`AuthService::resume_device_polls`].
    pub async fn expire_device_sessions_at_start(&self) -> Result<usize, AuthError> {
        let pending = self
            .store()
            .run(|s| s.list_sessions(Some(SessionState::Pending), usize::MAX))
            .await?;
        let mut n = 0;
        for summary in pending {
            let Ok(id) = summary.session_id.parse::<SessionId>() else {
                continue;
            };
            if summary.app_id != self.inner.app_id {
                continue;
            }
            let Some(session) = self.store().run(move |s| s.get_session(id)).await? else {
                continue;
            };
            if session.app_id != self.inner.app_id || Phase::of(&session) != Phase::AwaitingDevice {
                continue;
            }
            if self
                .store()
                .run(move |s| s.get_device_poll(id))
                .await?
                .is_some()
            {
                continue;
            }
            warn!(session = %id, "A device authorization of an earlier version was in flight; its device code was not stored, so the session is expired (the user can ask again).");
            let mut run = Run::new(session);
            self.drive(&mut run, Input::DeviceExpired).await?;
            n += 1;
        }
        Ok(n)
    }

    /// At start-up: expires the device sessions that cannot be polled
    /// ([`AuthService::expire_device_sessions_at_start`]), then, until shutdown, every
    /// [`TAKEOVER_EVERY`], takes over the stored device polls of this app that no instance
    /// holds the lease of (left by an earlier run, or by an instance that died) and resumes
    /// them ([`AuthService::take_over_device_polls`]).
    pub async fn resume_device_polls(&self) {
        match self.expire_device_sessions_at_start().await {
            Ok(0) => {}
            Ok(n) => info!(
                expired = n,
                "Expired device sessions of an earlier version."
            ),
            Err(e) => {
                warn!(error = %e, "Expiring the device sessions of an earlier version failed.");
            }
        }
        let me = self.clone();
        let stop = self.device.stop.clone();
        self.tasks.spawn(async move {
            loop {
                match me.take_over_device_polls().await {
                    Ok(0) => {}
                    Ok(n) => info!(resumed = n, "Resumed device authorizations nobody was polling."),
                    Err(e) => warn!(error = %e, "Looking for device polls to take over failed; trying again."),
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(TAKEOVER_EVERY) => {}
                }
            }
        });
    }

    /// One look at this app's stored device polls: each one this instance does not poll and
    /// whose lease is free is taken (the lease first), then resumed if its session still
    /// awaits the device, else deleted. Returns how many were resumed.
    pub async fn take_over_device_polls(&self) -> Result<usize, AuthError> {
        let app = self.inner.app_id.clone();
        let ids = self
            .store()
            .run(move |s| s.device_polls_of(&app, TAKEOVER_BATCH))
            .await?;
        let mut resumed = 0;
        for id in ids {
            if self.device.is_polling(id) {
                continue;
            }
            let (name, now) = (poll_lease(id), self.now());
            if self
                .store()
                .run(move |s| s.lease_holder(&name, now))
                .await?
                .is_some()
            {
                continue;
            }
            if !self.take_poll_lease(id).await? {
                continue;
            }
            let session = self.store().run(move |s| s.get_session(id)).await?;
            let awaiting = session.as_ref().is_some_and(|s| {
                s.app_id == self.inner.app_id && Phase::of(s) == Phase::AwaitingDevice
            });
            if !awaiting {
                self.end_polling(id).await;
                continue;
            }
            match self.store().run(move |s| s.get_device_poll(id)).await {
                Ok(Some(poll)) => {
                    info!(session = %id, "Resuming a device authorization nobody was polling.");
                    self.spawn_device_poll(poll);
                    resumed += 1;
                }
                Ok(None) => self.release_poll_lease(id).await,
                Err(e) => {
                    // Fail closed: a code that cannot be opened (a key removed) is never
                    // guessed at; the session expires and the user can ask again.
                    warn!(session = %id, error = %e, "A stored device code cannot be read; the session is expired.");
                    if let Some(session) = session {
                        let mut run = Run::new(session);
                        self.drive(&mut run, Input::DeviceExpired).await?;
                    }
                    self.end_polling(id).await;
                }
            }
        }
        Ok(resumed)
    }
}

/// How a poll task ended.
enum PollEnd {
    /// The session ended (or is gone): the code is deleted and the lease let go.
    Ended,
    /// Shutdown: the lease is let go, the code kept for the next run.
    Stopped,
    /// Another instance holds the lease now: nothing to clean up.
    LeaseLost,
}

/// The lease that makes one instance at a time poll a device session.
fn poll_lease(id: SessionId) -> String {
    format!("device/{id}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_first_poll_waits_one_interval_and_slow_down_adds_five_seconds() {
        let mut s = PollSchedule::new(Duration::from_secs(2), 1_000);
        assert_eq!(s.next_at(), 3_000);
        assert_eq!(s.wait(1_000), Duration::from_secs(2));
        assert_eq!(s.wait(5_000), Duration::ZERO);
        s.polled(3_000, PollAnswer::Pending);
        assert_eq!(s.next_at(), 5_000);
        s.polled(5_000, PollAnswer::SlowDown);
        assert_eq!(s.interval(), Duration::from_secs(7));
        assert_eq!(s.next_at(), 12_000);
        s.polled(12_000, PollAnswer::Pending);
        assert_eq!(
            s.next_at(),
            19_000,
            "slow_down holds for the rest of the session"
        );
        // An interval of 0 from the platform is not a busy loop.
        let s = PollSchedule::new(Duration::ZERO, 0);
        assert_eq!(s.interval(), MIN_INTERVAL);
    }

    proptest! {
        /// Whatever the answers and however late each poll goes out, the next poll is never
        /// sooner than the platform's interval plus 5 s for every `slow_down` so far, and the
        /// interval never shrinks.
        #[test]
        fn polls_keep_the_interval_and_honour_every_slow_down(
            base in 0u64..30,
            steps in proptest::collection::vec((any::<bool>(), 0u64..20_000), 1..50)
        ) {
            let mut s = PollSchedule::new(Duration::from_secs(base), 0);
            let mut slow = 0u64;
            let mut at = s.next_at();
            for (slow_down, late) in steps {
                at = at.max(s.next_at()).saturating_add(late);
                let before = s.interval();
                s.polled(at, if slow_down { PollAnswer::SlowDown } else { PollAnswer::Pending });
                if slow_down {
                    slow += 1;
                }
                prop_assert!(s.interval() >= before);
                let want = base.max(1) * 1_000 + slow * 5_000;
                prop_assert_eq!(ms(s.interval()), want);
                prop_assert_eq!(s.next_at() - at, want);
            }
        }
    }
}
