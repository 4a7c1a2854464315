//! The webhook events and their payload.
//!
//! ```json
//! {"event_id":"evt_…","type":"authorization.failed","time":"2026-01-02T03:04:05.678Z",
//!  "app_id":"cli_…","user_id":"…","open_id":"ou_…","session_id":"…","reason":"user_rejected"}
//! ```
//!
//! `reason` only in `authorization.failed`; `expires_at` (RFC 3339) only in `token.expiring`.
//! A payload is built from ids, times and reasons: the types here hold no token field, so none
//! can leak into a body.

use rand::RngCore;
use serde::Serialize;

use crate::storage::OutboxEvent;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum EventType {
    /// A user completed an authorization; the token is stored.
    #[serde(rename = "authorization.completed")]
    AuthorizationCompleted,
    /// An authorization ended without a token (rejected, expired, refused); with the reason.
    #[serde(rename = "authorization.failed")]
    AuthorizationFailed,
    /// The platform no longer accepts the user's refresh token: they must authorize again.
    #[serde(rename = "token.needs_reauth")]
    TokenNeedsReauth,
    /// The user's token was revoked here (deleted).
    #[serde(rename = "token.revoked")]
    TokenRevoked,
    /// The user's grant reaches its hard expiry soon (365 days after authorizing).
    #[serde(rename = "token.expiring")]
    TokenExpiring,
}

impl EventType {
    /// The wire name.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::AuthorizationCompleted => "authorization.completed",
            Self::AuthorizationFailed => "authorization.failed",
            Self::TokenNeedsReauth => "token.needs_reauth",
            Self::TokenRevoked => "token.revoked",
            Self::TokenExpiring => "token.expiring",
        }
    }

    /// Every type.
    pub const ALL: [Self; 5] = [
        Self::AuthorizationCompleted,
        Self::AuthorizationFailed,
        Self::TokenNeedsReauth,
        Self::TokenRevoked,
        Self::TokenExpiring,
    ];
}

/// One event, as the payload carries it.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    /// Unique id (`evt_` and 32 hex digits), for the receivers' de-duplication.
    pub event_id: String,
    /// The type.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// When it happened (RFC 3339, UTC, milliseconds).
    pub time: String,
    /// The app.
    pub app_id: String,
    /// The key the service keeps the user under (user id or open id).
    pub user_id: String,
    /// The user's open_id, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_id: Option<String>,
    /// The authorization session, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Why an authorization failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the grant expires (`token.expiring`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// RFC 3339 (UTC, milliseconds) of a unix-ms time.
#[must_use]
pub fn rfc3339(ms: u64) -> String {
    let ms = i64::try_from(ms).unwrap_or(i64::MAX);
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A fresh event id: `evt_` and 128 random bits in hex.
#[must_use]
pub fn new_event_id() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    format!("evt_{}", hex::encode(b))
}

impl Event {
    /// An event of `kind` about `user_id` of `app_id`, now, with a fresh id.
    #[must_use]
    pub fn new(kind: EventType, app_id: &str, user_id: &str, now_ms: u64) -> Self {
        Self {
            event_id: new_event_id(),
            kind,
            time: rfc3339(now_ms),
            app_id: app_id.to_owned(),
            user_id: user_id.to_owned(),
            open_id: None,
            session_id: None,
            reason: None,
            expires_at: None,
        }
    }

    /// With the user's open_id.
    #[must_use]
    pub fn open_id(mut self, open_id: Option<&str>) -> Self {
        self.open_id = open_id.map(str::to_owned);
        self
    }

    /// With the session.
    #[must_use]
    pub fn session(mut self, id: Option<impl ToString>) -> Self {
        self.session_id = id.map(|i| i.to_string());
        self
    }

    /// With the failure reason.
    #[must_use]
    pub fn reason(mut self, reason: &str) -> Self {
        self.reason = Some(reason.to_owned());
        self
    }

    /// With the grant's expiry (unix ms).
    #[must_use]
    pub fn expires_at(mut self, ms: u64) -> Self {
        self.expires_at = Some(rfc3339(ms));
        self
    }

    /// The outbox entry: the id, the type and the JSON body receivers get.
    #[must_use]
    pub fn into_outbox(self) -> OutboxEvent {
        // Serialising a struct of strings cannot fail.
        let body = serde_json::to_vec(&self).unwrap_or_default();
        OutboxEvent {
            event_id: self.event_id,
            kind: self.kind.as_str().to_owned(),
            body,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn payload_has_the_documented_fields() {
        let e = Event::new(
            EventType::AuthorizationFailed,
            "cli_a",
            "u1",
            1_767_323_045_678,
        )
        .open_id(Some("ou_1"))
        .session(Some("abc"))
        .reason("user_rejected")
        .into_outbox();
        let v: serde_json::Value = serde_json::from_slice(&e.body).unwrap();
        assert_eq!(v["type"], "authorization.failed");
        assert_eq!(v["time"], "2026-01-02T03:04:05.678Z");
        assert_eq!(v["app_id"], "cli_a");
        assert_eq!(v["user_id"], "u1");
        assert_eq!(v["open_id"], "ou_1");
        assert_eq!(v["session_id"], "abc");
        assert_eq!(v["reason"], "user_rejected");
        assert_eq!(v["event_id"], e.event_id.as_str());
        assert!(v.get("expires_at").is_none());
        assert_eq!(e.kind, "authorization.failed");
        for t in EventType::ALL {
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        }
    }

    #[test]
    fn event_ids_are_unique() {
        let a = new_event_id();
        let b = new_event_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + 32);
    }
}
