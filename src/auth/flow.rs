//! The shell around the state machine: [`AuthService`] (its state, its constructors) and the
//! driver that feeds inputs to [`transition`] and carries out the resulting effects with the
//! Lark client and the store.
//!
//! A session's phase is set only by [`super::state::enter`]; every phase change is written with [`Store::update_if_pending`], a compare-and-set on "the
//! session is still pending with the state hash I read". When it loses (the sweep expired the
//! session, the card's reject button or a replayed redirect got there first) the input is
//! re-run on the phase the winner left, which in a terminal phase only yields a response: the
//! first terminal transition wins and nothing is stored or counted twice.
//!
//! Tokens are refreshed under a per-user async lock shared by the refresh worker and
//! [`AuthService::user_token`], so one refresh token (they rotate) is never used twice.
//!
//! The phases live in their own files: `request` (start a session, send the Authorize card),
//! `redirect` (the OAuth redirect: state check, code exchange, identity check), `click` (the
//! card's buttons), `expire` (cards of sessions the sweep expired), `serve` (a user's token),
//! `refresh` (keeping tokens fresh), `sync` (user-info sync), `revoke`, and `routes` (HTTP).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::SecretString;
use serde_json::Value;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::error::AuthError;
use super::options::AuthOptions;
use super::render::final_card;
use super::state::{enter, transition, Effect, Flow, Input, Page, Phase};
use super::time::ms;
use crate::lark::{self, LarkClient};
use crate::metrics::{self, AuthFailureLabel, AuthLabel};
use crate::ratelimit::RateLimiter;
use crate::storage::{now_ms, AuthSession, Db, FailureReason, PendingUpdate, UserToken};

pub use super::render::page_html;

/// Unix-ms clock; injectable so tests can move time.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Async locks by key (a user), so one user's token is refreshed by one task at a time.
#[derive(Default)]
pub(super) struct KeyedLocks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    pub(super) async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
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

pub(super) struct Inner {
    pub(super) lark: LarkClient,
    pub(super) store: Db,
    pub(super) opts: AuthOptions,
    pub(super) clock: Clock,
    pub(super) app_id: String,
    /// Authorization requests per user (`auth.request_rate_limit` per window).
    pub(super) rate: RateLimiter<String>,
    pub(super) token_locks: KeyedLocks,
    pub(super) request_locks: KeyedLocks,
    /// The app's own `tenant_key`, once read (see [`AuthService::app_tenant`]).
    pub(super) tenant: tokio::sync::OnceCell<String>,
    /// Whether the changes append webhook events to the outbox (webhooks configured).
    pub(super) webhook_events: std::sync::atomic::AtomicBool,
}

/// Whether requests use the device flow, the signal that stops its polls, this process's name
/// on their leases (when not in a fleet) and the sessions it polls (see `device.rs`).
#[derive(Clone, Debug)]
pub(super) struct DeviceCtl {
    pub(super) enabled: bool,
    pub(super) stop: tokio_util::sync::CancellationToken,
    pub(super) holder: Arc<str>,
    polling: Arc<std::sync::Mutex<std::collections::HashSet<crate::storage::SessionId>>>,
}

impl Default for DeviceCtl {
    fn default() -> Self {
        Self {
            enabled: false,
            stop: tokio_util::sync::CancellationToken::new(),
            holder: Arc::from(format!(
                "local-{}-{:016x}",
                std::process::id(),
                rand::random::<u64>()
            )),
            polling: Arc::default(),
        }
    }
}

impl DeviceCtl {
    fn polling(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashSet<crate::storage::SessionId>> {
        self.polling
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records that this process polls session `id`; false if it already does.
    pub(super) fn mark_polling(&self, id: crate::storage::SessionId) -> bool {
        self.polling().insert(id)
    }

    /// This process no longer polls session `id`.
    pub(super) fn unmark_polling(&self, id: crate::storage::SessionId) {
        self.polling().remove(&id);
    }

    /// True while this process polls session `id`.
    pub(super) fn is_polling(&self, id: crate::storage::SessionId) -> bool {
        self.polling().contains(&id)
    }
}

/// The authorization service. Cheap to clone.
#[derive(Clone)]
pub struct AuthService {
    pub(super) inner: Arc<Inner>,
    /// Every task the service spawns: refreshes (each in its own task, see
    /// [`AuthService::finish_refreshes`]), the refresh worker's per-token tasks and card
    /// re-sends. Owned by whoever waits for them at shutdown ([`AuthService::with_tasks`]).
    pub(super) tasks: TaskTracker,
    /// The device flow: on or off, and the signal that stops its polls.
    pub(super) device: DeviceCtl,
    /// This instance's lease holder id when it serves in a fleet (a shared PostgreSQL store):
    /// each refresh then runs under the user's refresh lease ([`AuthService::in_fleet`]).
    pub(super) fleet_holder: Option<Arc<str>>,
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
pub(super) struct Run {
    pub(super) session: AuthSession,
    pub(super) code: Option<SecretString>,
    pub(super) token: Option<lark::UserToken>,
    pub(super) info: Option<lark::UserInfo>,
    /// A card click: answer with the card instead of PATCHing it.
    pub(super) card_reply: bool,
    pub(super) reply_card: Option<Value>,
    pub(super) page: Option<Page>,
    /// A device-flow session (counted under `auth_method="device"`).
    pub(super) device: bool,
}

impl Run {
    pub(super) fn new(session: AuthSession) -> Self {
        Self {
            device: Phase::of(&session) == Phase::AwaitingDevice,
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

impl AuthService {
    /// `auth_failure{app_id, auth_method, reason}` of this app's card flow.
    pub(super) fn count_failure(&self, r: FailureReason) {
        self.count_failure_of(r, false);
    }

    /// `auth_failure{app_id, auth_method, reason}` of the card flow, or of the device flow.
    pub(super) fn count_failure_of(&self, r: FailureReason, device: bool) {
        metrics::get()
            .auth_failure
            .get_or_create(&AuthFailureLabel::flow(
                &self.inner.app_id,
                device,
                r.as_str(),
            ))
            .inc();
    }

    /// A service on the wall clock.
    #[must_use]
    pub fn new(lark: LarkClient, store: impl Into<Db>, opts: AuthOptions) -> Self {
        let store: Db = store.into();
        Self::with_clock(lark, store, opts, Arc::new(now_ms))
    }

    /// A service on `clock` (unix ms).
    #[must_use]
    pub fn with_clock(
        lark: LarkClient,
        store: impl Into<Db>,
        opts: AuthOptions,
        clock: Clock,
    ) -> Self {
        let store: Db = store.into();
        Self {
            inner: Arc::new(Inner {
                app_id: lark.app_id().to_owned(),
                lark,
                store,
                rate: RateLimiter::new(opts.rate_limit_window),
                opts,
                clock,
                token_locks: KeyedLocks::default(),
                request_locks: KeyedLocks::default(),
                tenant: tokio::sync::OnceCell::new(),
                webhook_events: std::sync::atomic::AtomicBool::new(false),
            }),
            tasks: TaskTracker::new(),
            device: DeviceCtl::default(),
            fleet_holder: None,
        }
    }

    /// The service as one instance of a fleet sharing its store, known to the others as
    /// `holder`: a user's token is refreshed only under the lease `refresh/{app_id}/{user}`,
    /// so each single-use refresh token is presented by one instance. Set it before the
    /// service is cloned.
    #[must_use]
    pub fn in_fleet(mut self, holder: &str) -> Self {
        self.fleet_holder = Some(Arc::from(holder));
        self
    }

    /// The service with its tasks spawned on `tasks` (by default a tracker of its own), so
    /// the owner of `tasks` (the daemon's supervisor) can wait for them at shutdown. Set it
    /// before the service is cloned: a clone keeps the tracker it was cloned with.
    #[must_use]
    pub fn with_tasks(mut self, tasks: TaskTracker) -> Self {
        self.tasks = tasks;
        self
    }

    /// The tracker of the tasks the service spawns.
    #[must_use]
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// The options in force.
    #[must_use]
    pub fn options(&self) -> &AuthOptions {
        &self.inner.opts
    }

    pub(super) fn now(&self) -> u64 {
        (self.inner.clock)()
    }

    pub(super) fn store(&self) -> &Db {
        &self.inner.store
    }

    pub(super) fn lark(&self) -> &LarkClient {
        &self.inner.lark
    }

    pub(super) fn refresh_due(&self, now: u64, lifetime: Duration) -> u64 {
        let share = self.inner.opts.refresh_threshold.clamp(0.0, 1.0);
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let after = (ms(lifetime) as f64 * share) as u64;
        now.saturating_add(after)
    }

    /// Feeds `input` to the machine for `run.session`, persisting every phase change with a
    /// compare-and-set and carrying out the effects (which may feed further inputs).
    pub(super) async fn drive(&self, run: &mut Run, input: Input) -> Result<(), AuthError> {
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
                let events = self.transition_events(&updated, token.is_some());
                let outcome = store
                    .run(move |s| {
                        s.update_if_pending_with_events(expect, &u2, token.as_ref(), &events)
                    })
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
                        self.count_failure_of(FailureReason::StateMismatch, run.device);
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
    pub(super) fn next_session(
        &self,
        run: &Run,
        phase: Phase,
        complete: bool,
        now: u64,
    ) -> (AuthSession, Option<UserToken>) {
        let mut n = run.session.clone();
        enter(&mut n, phase, now);
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
    pub(super) async fn effect(
        &self,
        run: &mut Run,
        e: Effect,
        now: u64,
    ) -> Result<Option<Input>, AuthError> {
        match e {
            Effect::ExchangeCode => Ok(Some(self.exchange_code(run).await)),
            Effect::FetchUserInfo => Ok(Some(self.identify_user(run).await)),
            Effect::StoreTokens => {
                self.store_user(run, now).await;
                Ok(None)
            }
            Effect::PatchCard(kind) => {
                let card = final_card(&self.inner.opts.card, kind, &run.session);
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
                let label = AuthLabel::flow(&self.inner.app_id, run.device);
                m.auth_success.get_or_create(&label).inc();
                #[allow(clippy::cast_precision_loss)]
                m.auth_duration
                    .get_or_create(&label)
                    .observe(now.saturating_sub(run.session.created_at) as f64 / 1000.0);
                info!(session = %run.session.session_id, "Authorization complete.");
                Ok(None)
            }
            Effect::CountFailure(r) => {
                self.count_failure_of(r, run.device);
                Ok(None)
            }
            Effect::Respond(p) => {
                run.page = Some(p);
                Ok(None)
            }
        }
    }
}
