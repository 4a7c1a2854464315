//! Clicks on the Authorize card's buttons (reject / cancel).

use serde_json::{json, Value};
use tracing::warn;

use super::error::AuthError;
use super::flow::{AuthService, Run};
use super::render::{final_card, rejected_toast};
use super::state::{CardKind, Input, Phase};
use crate::lark::{card, UserIdType};
use crate::storage::{AuthSession, SessionId};

pub(super) fn toast(kind: &str, content: &str) -> Value {
    json!({ "type": kind, "content": content })
}

impl AuthService {
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
                "toast": toast("info", rejected_toast(self.inner.opts.card.locale)),
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
                reply["card"] = json!({ "type": "raw", "data": final_card(&self.inner.opts.card, kind, &run.session) });
            }
        }
        Ok(Some(reply))
    }

    pub(super) async fn is_owner(&self, s: &AuthSession, operator_open_id: &str) -> bool {
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
}
