//! Card JSON 2.0 builders for the user-authorization card and its final
//! states (protocol notes §5.4), plus reading the reject button's callback
//! value back.
//!
//! Owns the card shapes only: every card here declares
//! `config.update_multi = true` so it can be PATCHed (§5.2) or updated via a
//! callback token (§5.3). Sending and updating is `api::im`; deciding which
//! state to show is the auth feature's job.

use serde_json::{json, Value};

/// `action` value of the reject button's callback.
pub const ACTION_REJECT: &str = "reject";

/// Header colour of a pending authorization card.
const TEMPLATE_PENDING: &str = "blue";
/// Header colour after a successful authorization.
const TEMPLATE_AUTHORIZED: &str = "green";
/// Header colour when the request expired.
const TEMPLATE_EXPIRED: &str = "orange";
/// Header colour when the user declined.
const TEMPLATE_REJECTED: &str = "grey";

/// The "Authorize" card: a markdown explanation, a primary button that opens
/// the authorize URL (`open_url` behaviour, no callback), and a reject button
/// whose `callback` behaviour sends `{"action":"reject","session_id":…}`.
#[derive(Debug, Clone, Copy)]
pub struct AuthorizeCard<'a> {
    /// Header title.
    pub title: &'a str,
    /// Markdown body.
    pub body: &'a str,
    /// The authorize page URL (see `LarkClient::authorize_url`).
    pub authorize_url: &'a str,
    /// Session the reject callback refers to.
    pub session_id: &'a str,
    /// Label of the authorize button.
    pub authorize_label: &'a str,
    /// Label of the reject button.
    pub reject_label: &'a str,
}

impl<'a> AuthorizeCard<'a> {
    /// A card with English button labels ("Authorize", "Reject").
    #[must_use]
    pub fn new(title: &'a str, body: &'a str, authorize_url: &'a str, session_id: &'a str) -> Self {
        Self {
            title,
            body,
            authorize_url,
            session_id,
            authorize_label: "Authorize",
            reject_label: "Reject",
        }
    }

    /// The card JSON object.
    #[must_use]
    pub fn to_json(&self) -> Value {
        let authorize = json!({
            "tag": "button",
            "text": { "tag": "plain_text", "content": self.authorize_label },
            "type": "primary",
            "behaviors": [{
                "type": "open_url",
                "default_url": self.authorize_url,
                "pc_url": "",
                "ios_url": "",
                "android_url": "",
            }],
        });
        let reject = json!({
            "tag": "button",
            "text": { "tag": "plain_text", "content": self.reject_label },
            "type": "default",
            "behaviors": [{
                "type": "callback",
                "value": reject_value(self.session_id),
            }],
        });
        card(
            self.title,
            TEMPLATE_PENDING,
            vec![markdown(self.body), authorize, reject],
        )
    }
}

/// A card built in the Feishu card builder, sent by its id with its variables (the `content`
/// of an `interactive` message). The template's buttons carry the variables (the authorize URL,
/// and the reject callback's `{"action":"reject","session_id":…}`) as the template author binds
/// them.
#[must_use]
pub fn template_card(template_id: &str, variables: &Value) -> Value {
    json!({
        "type": "template",
        "data": { "template_id": template_id, "template_variable": variables },
    })
}

/// The `value` of the reject button's callback behaviour.
#[must_use]
pub fn reject_value(session_id: &str) -> Value {
    json!({ "action": ACTION_REJECT, "session_id": session_id })
}

/// A card-button callback value as built by this module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardAction {
    /// `action`, e.g. [`ACTION_REJECT`].
    pub action: String,
    /// `session_id`.
    pub session_id: String,
}

impl CardAction {
    /// Reads `event.action.value` of a `card.action.trigger` callback, which
    /// may arrive as an object or as a JSON-encoded string (§2.9). `None` if
    /// it lacks a string `action` or `session_id`.
    #[must_use]
    pub fn from_value(value: &Value) -> Option<Self> {
        let parsed;
        let object = match value {
            Value::String(s) => {
                parsed = serde_json::from_str::<Value>(s).ok()?;
                &parsed
            }
            other => other,
        };
        Some(Self {
            action: object.get("action")?.as_str()?.to_owned(),
            session_id: object.get("session_id")?.as_str()?.to_owned(),
        })
    }
}

/// Final state: the user authorized. No buttons.
#[must_use]
pub fn authorized_card(title: &str, body: &str) -> Value {
    card(title, TEMPLATE_AUTHORIZED, vec![markdown(body)])
}

/// Final state: the authorization request expired. No buttons.
#[must_use]
pub fn expired_card(title: &str, body: &str) -> Value {
    card(title, TEMPLATE_EXPIRED, vec![markdown(body)])
}

/// Final state: the user declined. No buttons.
#[must_use]
pub fn rejected_card(title: &str, body: &str) -> Value {
    card(title, TEMPLATE_REJECTED, vec![markdown(body)])
}

fn markdown(content: &str) -> Value {
    json!({ "tag": "markdown", "content": content })
}

fn card(title: &str, template: &str, elements: Vec<Value>) -> Value {
    json!({
        "schema": "2.0",
        "config": { "update_multi": true },
        "header": {
            "title": { "tag": "plain_text", "content": title },
            "template": template,
        },
        "body": { "elements": elements },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorize_card_shape() {
        let c = AuthorizeCard::new(
            "Authorization required",
            "Grant **access**",
            "https://a/x?y=1",
            "S1",
        )
        .to_json();
        assert_eq!(c["schema"], "2.0");
        assert_eq!(c["config"]["update_multi"], true);
        assert_eq!(c["header"]["title"]["content"], "Authorization required");
        assert_eq!(c["header"]["template"], "blue");
        let els = c["body"]["elements"].as_array().unwrap();
        assert_eq!(els.len(), 3);
        assert_eq!(
            els[0],
            json!({"tag": "markdown", "content": "Grant **access**"})
        );
        assert_eq!(els[1]["tag"], "button");
        assert_eq!(els[1]["type"], "primary");
        assert_eq!(els[1]["behaviors"][0]["type"], "open_url");
        assert_eq!(els[1]["behaviors"][0]["default_url"], "https://a/x?y=1");
        assert_eq!(els[2]["behaviors"][0]["type"], "callback");
        assert_eq!(
            els[2]["behaviors"][0]["value"],
            json!({"action": "reject", "session_id": "S1"})
        );
    }

    #[test]
    fn final_states_keep_update_multi_and_drop_buttons() {
        for (c, template) in [
            (authorized_card("t", "b"), "green"),
            (expired_card("t", "b"), "orange"),
            (rejected_card("t", "b"), "grey"),
        ] {
            assert_eq!(c["config"]["update_multi"], true);
            assert_eq!(c["header"]["template"], template);
            let els = c["body"]["elements"].as_array().unwrap();
            assert!(els.iter().all(|e| e["tag"] != "button"));
        }
    }

    #[test]
    fn card_action_reads_object_and_string_values() {
        let want = Some(CardAction {
            action: "reject".into(),
            session_id: "S1".into(),
        });
        assert_eq!(CardAction::from_value(&reject_value("S1")), want);
        let as_string = Value::String(reject_value("S1").to_string());
        assert_eq!(CardAction::from_value(&as_string), want);
        assert_eq!(CardAction::from_value(&json!({"action": "reject"})), None);
        assert_eq!(CardAction::from_value(&json!("not json")), None);
    }
}
