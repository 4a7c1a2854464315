//! `im` API: sending messages as the bot and updating interactive cards
//! (protocol notes §5.1–§5.3).
//!
//! Owns the message request bodies: `content` is always a JSON *string*
//! (the card or text object serialised), the receiver kind goes in the
//! `receive_id_type` query, and every send carries a `uuid` idempotency key
//! so a retried send cannot post twice. Card JSON itself is built in
//! `lark::card`.

use std::fmt;

use rand::RngCore as _;
use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::lark::client::{decode_data, decode_unit, seg, ApiRequest, Auth, LarkClient};
use crate::lark::error::Error;

/// Documented limit for a card PATCH body; also applied to sends.
pub const MAX_CARD_BYTES: usize = 30 * 1024;

/// Kind of id a message is addressed to (`receive_id_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReceiveIdType {
    /// A user's per-app `ou_…` id.
    OpenId,
    /// A user's tenant-internal id.
    UserId,
    /// A user's per-developer `on_…` id.
    UnionId,
    /// A user's email.
    Email,
    /// A chat `oc_…`.
    ChatId,
}

impl ReceiveIdType {
    /// Wire value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenId => "open_id",
            Self::UserId => "user_id",
            Self::UnionId => "union_id",
            Self::Email => "email",
            Self::ChatId => "chat_id",
        }
    }
}

impl fmt::Display for ReceiveIdType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a message goes to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Receiver {
    /// Kind of `id`.
    pub id_type: ReceiveIdType,
    /// The id itself.
    pub id: String,
}

impl Receiver {
    /// A user addressed by `open_id`.
    #[must_use]
    pub fn open_id(id: impl Into<String>) -> Self {
        Self {
            id_type: ReceiveIdType::OpenId,
            id: id.into(),
        }
    }

    /// A chat addressed by `chat_id`.
    #[must_use]
    pub fn chat_id(id: impl Into<String>) -> Self {
        Self {
            id_type: ReceiveIdType::ChatId,
            id: id.into(),
        }
    }
}

/// A message the platform accepted (subset of the message object).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct SentMessage {
    /// `om_…`; keep it to PATCH the card later.
    pub message_id: String,
    /// Chat the message landed in.
    pub chat_id: Option<String>,
    /// `interactive`, `text`, …
    pub msg_type: Option<String>,
    /// Millisecond timestamp string.
    pub create_time: Option<String>,
}

/// A fresh idempotency key (32 hex chars; the platform allows up to 50).
fn new_uuid() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn card_string(card: &Value) -> Result<String, Error> {
    let s = serde_json::to_string(card)
        .map_err(|e| Error::Config(format!("cannot serialize card: {e}")))?;
    if s.len() > MAX_CARD_BYTES {
        return Err(Error::Config(format!(
            "card is {} bytes; the platform limit is {MAX_CARD_BYTES}",
            s.len()
        )));
    }
    Ok(s)
}

impl LarkClient {
    /// `POST /open-apis/im/v1/messages?receive_id_type=…` as the bot (tenant
    /// token). `content` must already be the JSON string for `msg_type`.
    /// `uuid` deduplicates sends for an hour; one is generated if `None`, so
    /// the client's own retries never double-post.
    pub async fn send_message(
        &self,
        to: &Receiver,
        msg_type: &str,
        content: String,
        uuid: Option<&str>,
    ) -> Result<SentMessage, Error> {
        let uuid = uuid.map_or_else(new_uuid, str::to_owned);
        let req = ApiRequest::new(
            Method::POST,
            "/open-apis/im/v1/messages".to_owned(),
            Auth::Tenant,
        )
        .query("receive_id_type", to.id_type.as_str())
        .json(json!({
            "receive_id": to.id,
            "msg_type": msg_type,
            "content": content,
            "uuid": uuid,
        }));
        self.execute(&req, decode_data).await
    }

    /// Sends an interactive card (`msg_type` `interactive`, the card JSON
    /// serialised into `content`).
    pub async fn send_card(&self, to: &Receiver, card: &Value) -> Result<SentMessage, Error> {
        self.send_message(to, "interactive", card_string(card)?, None)
            .await
    }

    /// Sends a plain text message (`{"text": …}`).
    pub async fn send_text(&self, to: &Receiver, text: &str) -> Result<SentMessage, Error> {
        self.send_message(to, "text", json!({ "text": text }).to_string(), None)
            .await
    }

    /// Sends a rich-text `post` message; `post` is the post object, e.g.
    /// `{"zh_cn": {"title": …, "content": [[{"tag": "text", "text": …}]]}}`.
    pub async fn send_post(&self, to: &Receiver, post: &Value) -> Result<SentMessage, Error> {
        self.send_message(to, "post", post.to_string(), None).await
    }

    /// `PATCH /open-apis/im/v1/messages/{message_id}` with
    /// `{"content": "<card JSON string>"}`: replaces a card the bot sent.
    /// The card must keep `config.update_multi = true`.
    pub async fn patch_card(&self, message_id: &str, card: &Value) -> Result<(), Error> {
        let req = ApiRequest::new(
            Method::PATCH,
            format!("/open-apis/im/v1/messages/{}", seg(message_id)?),
            Auth::Tenant,
        )
        .json(json!({ "content": card_string(card)? }));
        self.execute(&req, decode_unit).await
    }

    /// `POST /open-apis/interactive/v1/card/update` with the callback's
    /// `c-…` token and the new card as an *object*. Only after the callback
    /// response went out; the token is valid 30 minutes for 2 uses.
    pub async fn delay_update_card(
        &self,
        callback_token: &SecretString,
        card: &Value,
    ) -> Result<(), Error> {
        card_string(card)?;
        let req = ApiRequest::new(
            Method::POST,
            "/open-apis/interactive/v1/card/update".to_owned(),
            Auth::Tenant,
        )
        .json(json!({ "token": callback_token.expose_secret(), "card": card }));
        self.execute(&req, decode_unit).await
    }
}
