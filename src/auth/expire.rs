//! Sessions the sweep expired: their cards say so and each counts as a failure.

use tracing::warn;

use super::flow::AuthService;
use super::render::final_card;
use super::state::{transition, Effect, Flow, Input, Phase};
use crate::storage::{AuthSession, SessionId};

impl AuthService {
    /// After a sweep: the expired sessions' cards become "expired" and each counts as
    /// `auth_failure{reason="session_expired"}`. Pass `SweepReport::expired`.
    pub async fn on_sweep_expired(&self, expired: Vec<(SessionId, Option<String>)>) {
        let ids: Vec<SessionId> = expired.iter().map(|(id, _)| *id).collect();
        self.expired_events(&ids).await;
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
                            if let Err(e) = self
                                .lark()
                                .patch_card(mid, &final_card(&self.inner.opts.card, kind, &s))
                                .await
                            {
                                warn!(session = %id, error = %e, "Updating an expired card failed.");
                            }
                        }
                    }
                    Effect::CountFailure(r) => self.count_failure(r),
                    _ => {}
                }
            }
        }
    }
}
