//! Where the authorization flow tells the outgoing webhooks (`crate::webhooks`) what happened,
//! and the reminder of a grant's hard expiry.
//!
//! Each event is built here and appended to the outbox by the store write that makes the
//! change (`*_with_events`), in its transaction: a change that commits has its event, one that
//! does not has none. Without webhook URLs no event is built (nothing would drain the outbox).
//!
//! The only exception is a pending session the sweep expires: the sweep is a store-side batch,
//! so its `authorization.failed` events are appended right after it commits (before the
//! expired cards are updated); a crash between the two loses those events.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{info, warn};

use super::flow::AuthService;
use super::request::{AuthRequest, UserRef};
use super::time::ms;
use crate::storage::{AuthSession, OutboxEvent, SessionId, SessionState, UserToken};
use crate::webhooks::{Event, EventType};

/// Grants looked at per reminder run.
const REMIND_BATCH: usize = 256;

impl AuthService {
    /// From now on, changes append webhook events (call when webhook URLs are configured).
    pub fn enable_webhook_events(&self) {
        self.inner.webhook_events.store(true, Ordering::Release);
    }

    /// Whether changes append webhook events.
    #[must_use]
    pub fn webhook_events_enabled(&self) -> bool {
        self.inner.webhook_events.load(Ordering::Acquire)
    }

    /// `make()` as the one event to append, or none when webhooks are off.
    pub(super) fn event(&self, make: impl FnOnce() -> Event) -> Vec<OutboxEvent> {
        if self.webhook_events_enabled() {
            vec![make().into_outbox()]
        } else {
            Vec::new()
        }
    }

    /// The events of a session's move to `updated`'s state: a completion that stores a token,
    /// or a failure with its reason. None for a move that stays pending.
    pub(super) fn transition_events(
        &self,
        updated: &AuthSession,
        stores_token: bool,
    ) -> Vec<OutboxEvent> {
        let kind = match updated.state {
            SessionState::Completed if stores_token => EventType::AuthorizationCompleted,
            SessionState::Failed | SessionState::Rejected | SessionState::Expired => {
                EventType::AuthorizationFailed
            }
            _ => return Vec::new(),
        };
        self.event(|| {
            let e = Event::new(kind, &updated.app_id, &updated.user_id, updated.updated_at)
                .open_id(updated.open_id.as_deref())
                .session(Some(updated.session_id));
            match updated.failure_reason {
                Some(r) if kind == EventType::AuthorizationFailed => e.reason(r.as_str()),
                _ => e,
            }
        })
    }

    /// `token.needs_reauth` of `tok`.
    pub(super) fn needs_reauth_events(&self, tok: &UserToken, now: u64) -> Vec<OutboxEvent> {
        self.event(|| {
            Event::new(EventType::TokenNeedsReauth, &tok.app_id, &tok.user_id, now)
                .open_id(tok.open_id.as_deref())
                .session(tok.session_id)
        })
    }

    /// `token.revoked` of a user (and the session revoked with it, if any).
    pub(super) fn revoked_events(
        &self,
        user_id: &str,
        open_id: Option<&str>,
        session: Option<SessionId>,
        now: u64,
    ) -> Vec<OutboxEvent> {
        self.event(|| {
            Event::new(EventType::TokenRevoked, &self.inner.app_id, user_id, now)
                .open_id(open_id)
                .session(session)
        })
    }

    /// `authorization.failed` (`session_expired`) of the sessions a sweep expired.
    pub(super) async fn expired_events(&self, ids: &[SessionId]) {
        if !self.webhook_events_enabled() || ids.is_empty() {
            return;
        }
        let ids = ids.to_vec();
        let me = self.clone();
        let r = self
            .store()
            .run(move |s| {
                let mut events = Vec::new();
                for id in ids {
                    let Some(sum) = s.get_session_summary(id)? else {
                        continue;
                    };
                    if sum.state != SessionState::Expired.as_str() {
                        continue;
                    }
                    events.extend(me.event(|| {
                        Event::new(
                            EventType::AuthorizationFailed,
                            &sum.app_id,
                            &sum.user_id,
                            sum.updated_at,
                        )
                        .open_id(sum.open_id.as_deref())
                        .session(Some(id))
                        .reason(crate::storage::FailureReason::SessionExpired.as_str())
                    }));
                }
                let now = me.now();
                s.outbox_append(&events, now)
            })
            .await;
        if let Err(e) = r {
            warn!(error = %e, "Recording the expired sessions' webhook events failed.");
        }
    }

    /// One run of the expiry reminder: each user whose grant (authorized `lifetime` ago, 365
    /// days at the platform) ends within `lead` gets a new Authorize card once, and
    /// `token.expiring` is sent. The reminder is recorded (with the event, in one transaction)
    /// after the card went out, so a restart does not send it again; a card that could not be
    /// sent is tried at the next run. Returns how many users were reminded.
    pub async fn remind_expiring(
        &self,
        lead: Duration,
        lifetime: Duration,
    ) -> Result<usize, crate::storage::Error> {
        if lead.is_zero() {
            return Ok(0);
        }
        let now = self.now();
        // Granted at or before this, the grant ends within `lead`.
        let Some(bound) = now.saturating_add(ms(lead)).checked_sub(ms(lifetime)) else {
            return Ok(0);
        };
        let app = self.inner.app_id.clone();
        let due = self
            .store()
            .run(move |s| s.grants_to_remind(bound, REMIND_BATCH))
            .await?;
        let mut reminded = 0;
        for g in due.into_iter().filter(|g| g.app_id == app) {
            let req = AuthRequest {
                user: UserRef::of_stored(&g.user_id, g.open_id.as_deref()),
                scopes: g.scopes.clone(),
            };
            if let Err(e) = self.request(req).await {
                warn!(user = %g.user_id, error = %e, "Sending the expiry reminder card failed; trying again at the next run.");
                continue;
            }
            let expires = g.granted_at.saturating_add(ms(lifetime));
            let events = self.event(|| {
                Event::new(EventType::TokenExpiring, &g.app_id, &g.user_id, now)
                    .open_id(g.open_id.as_deref())
                    .session(g.session_id)
                    .expires_at(expires)
            });
            let (a, u, at) = (g.app_id.clone(), g.user_id.clone(), g.granted_at);
            if self
                .store()
                .run(move |s| s.mark_reminded(&a, &u, at, &events, now))
                .await?
            {
                reminded += 1;
                info!(user = %g.user_id, "Expiry reminder sent (a new Authorize card).");
            }
        }
        Ok(reminded)
    }
}
