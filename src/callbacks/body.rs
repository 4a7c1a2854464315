//! Parsing and authenticating one HTTP callback request body (protocol doc §3.2–§3.8).
//!
//! Owns: the size limit, the `{"encrypt": …}` unwrapping, the `url_verification` challenge,
//! the schema 2.0 and 1.0 event envelopes, the `card.action.trigger` callback, the order of
//! the security checks (signature over the raw bytes, timestamp window, verification token),
//! and the mapping of every failure to an HTTP 4xx status.
//!
//! Must not: do I/O, read the clock (`now` is a parameter), de-duplicate events or dispatch
//! them (the routes and the event layer do that), or put body contents in error messages.
//! The same envelope parser serves the long connection ([`parse_event_payload`]), whose
//! payloads are plaintext and unauthenticated by design (§2.1).

use std::time::{Duration, SystemTime};

use serde_json::Value;
use zeroize::Zeroizing;

use super::decrypt::{DecryptError, EventCipher};
use super::head::{self, take_str, Head};
use super::verify::{self, SignatureHeaders, VerifyError, DEFAULT_TIMESTAMP_WINDOW};

/// Default maximum request body size: 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

/// `header.event_type` of the new card callback.
pub const CARD_ACTION_TRIGGER: &str = "card.action.trigger";

/// The app's callback secrets and limits.
pub struct CallbackConfig {
    verification_token: Option<Zeroizing<String>>,
    encrypt: Option<(Zeroizing<String>, EventCipher)>,
    /// Larger bodies are rejected with 413 before anything else happens.
    pub max_body_bytes: usize,
    /// Accepted distance between `X-Lark-Request-Timestamp` and now for signed requests;
    /// `None` disables the check (the SDKs do not check it).
    pub timestamp_window: Option<Duration>,
}

impl std::fmt::Debug for CallbackConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackConfig")
            .field(
                "verification_token",
                &self.verification_token.as_ref().map(|_| "***"),
            )
            .field("encrypt_key", &self.encrypt.as_ref().map(|_| "***"))
            .field("max_body_bytes", &self.max_body_bytes)
            .field("timestamp_window", &self.timestamp_window)
            .finish()
    }
}

impl CallbackConfig {
    /// Builds the config from the app's Verification Token and Encrypt Key (empty strings
    /// count as not configured), with the default size limit and timestamp window.
    ///
    /// Without an Encrypt Key nothing can be authenticated and [`parse_callback`] refuses every
    /// request (the service does not even mount the routes): a Verification Token alone is
    /// sent in the body and proves nothing.
    pub fn new(verification_token: Option<&str>, encrypt_key: Option<&str>) -> Self {
        let non_empty = |s: Option<&str>| s.filter(|s| !s.is_empty()).map(str::to_owned);
        Self {
            verification_token: non_empty(verification_token).map(Zeroizing::new),
            encrypt: non_empty(encrypt_key).map(|k| {
                let cipher = EventCipher::new(&k);
                (Zeroizing::new(k), cipher)
            }),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            timestamp_window: Some(DEFAULT_TIMESTAMP_WINDOW),
        }
    }

    /// Whether an Encrypt Key is configured.
    pub fn has_encrypt_key(&self) -> bool {
        self.encrypt.is_some()
    }

    /// Whether a Verification Token is configured.
    pub fn has_verification_token(&self) -> bool {
        self.verification_token.is_some()
    }
}

/// Event envelope schema (§3.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// `{"schema":"2.0","header":{…},"event":{…}}`.
    V2,
    /// `{"ts","uuid","token","type":"event_callback","event":{"type":…}}`.
    V1,
}

/// A parsed event (or schema 2.0 callback). `Debug` omits the body.
///
/// From the long connection only the envelope's fields below are read at first (no
/// `serde_json::Value` tree is built); the whole payload is parsed on the first call of
/// [`EventEnvelope::json`] or [`EventEnvelope::event`], by a handler that needs it.
#[derive(Clone)]
pub struct EventEnvelope {
    /// Which envelope shape it came in.
    pub schema: Schema,
    /// `header.event_id` (v2) or `uuid` (v1): the de-duplication key.
    pub event_id: String,
    /// `header.event_type` (v2) or `event.type` (v1).
    pub event_type: String,
    /// `header.create_time` (v2, ms as a string) or `ts` (v1), verbatim.
    pub create_time: Option<String>,
    /// The verification token carried by the payload, if any.
    pub token: Option<String>,
    /// `header.app_id` (v2) or `event.app_id` (v1).
    pub app_id: Option<String>,
    /// `header.tenant_key` (v2) or `event.tenant_key` (v1).
    pub tenant_key: Option<String>,
    /// `event.message.message_id`, when the key is there (then always a valid id: an
    /// envelope with any other value there is refused).
    pub message_id: Option<String>,
    /// `event.sender.sender_id.open_id`, when it is a string.
    pub sender_open_id: Option<String>,
    /// The payload's bytes, parsed on demand into `json` (empty when `json` came parsed).
    raw: std::sync::Arc<[u8]>,
    json: std::sync::OnceLock<Value>,
}

impl PartialEq for EventEnvelope {
    fn eq(&self, other: &Self) -> bool {
        self.schema == other.schema
            && self.event_id == other.event_id
            && self.event_type == other.event_type
            && self.create_time == other.create_time
            && self.token == other.token
            && self.app_id == other.app_id
            && self.tenant_key == other.tenant_key
            && self.message_id == other.message_id
            && self.sender_open_id == other.sender_open_id
            && self.json() == other.json()
    }
}

impl std::fmt::Debug for EventEnvelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventEnvelope")
            .field("schema", &self.schema)
            .field("event_id", &self.event_id)
            .field("event_type", &self.event_type)
            .field("create_time", &self.create_time)
            .field("app_id", &self.app_id)
            .field("tenant_key", &self.tenant_key)
            .finish_non_exhaustive()
    }
}

impl EventEnvelope {
    /// The whole plaintext envelope, parsed on the first call. The bytes were checked when
    /// the envelope was read (by the same parser: see `callbacks::head`), so this parse
    /// cannot fail; if it ever did, the answer is `Null`, which no handler reads as a command.
    pub fn json(&self) -> &Value {
        self.json.get_or_init(|| {
            serde_json::from_slice::<Value>(&self.raw).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "An event read before no longer parses; its body is ignored.");
                Value::Null
            })
        })
    }

    /// The `event` object.
    pub fn event(&self) -> Option<&Value> {
        self.json().get("event")
    }
}

/// A `card.action.trigger` callback (§3.8) with its commonly used fields extracted.
#[derive(Debug, Clone, PartialEq)]
pub struct CardAction {
    /// The full envelope (`event` holds every field).
    pub envelope: EventEnvelope,
    /// `event.operator.open_id`.
    pub operator_open_id: Option<String>,
    /// `event.operator.user_id`.
    pub operator_user_id: Option<String>,
    /// `event.token`: the `c-…` token for a delayed card update (valid 30 min).
    pub update_token: Option<String>,
    /// `event.action.tag`, e.g. `button`.
    pub action_tag: Option<String>,
    /// `event.action.value`: an object, parsed from a JSON string when it arrives as one;
    /// `Null` when absent.
    pub action_value: Value,
    /// `event.context.open_message_id`.
    pub open_message_id: Option<String>,
    /// `event.context.open_chat_id`.
    pub open_chat_id: Option<String>,
}

impl CardAction {
    /// The clicking user: `open_id`, falling back to `user_id` (some cards send only that).
    pub fn operator_id(&self) -> Option<&str> {
        self.operator_open_id
            .as_deref()
            .or(self.operator_user_id.as_deref())
    }

    fn from_envelope(envelope: EventEnvelope) -> Self {
        let ev = envelope.json().get("event");
        let s = |ptr: &str| {
            ev.and_then(|e| e.pointer(ptr))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let action_value = match ev.and_then(|e| e.pointer("/action/value")) {
            Some(Value::String(text)) => {
                serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone()))
            }
            Some(v) => v.clone(),
            None => Value::Null,
        };
        Self {
            operator_open_id: s("/operator/open_id"),
            operator_user_id: s("/operator/user_id"),
            update_token: s("/token"),
            action_tag: s("/action/tag"),
            action_value,
            open_message_id: s("/context/open_message_id"),
            open_chat_id: s("/context/open_chat_id"),
            envelope,
        }
    }
}

/// What a callback request turned out to be.
#[derive(Debug, Clone, PartialEq)]
#[allow(
    clippy::large_enum_variant,
    reason = "events are the common variant: boxing them would allocate once more per event"
)]
pub enum Callback {
    /// `url_verification`: answer 200 `{"challenge": …}` (see [`challenge_response`]).
    UrlVerification {
        /// The value to echo.
        challenge: String,
    },
    /// Any event other than a card action: answer 200 after queueing it.
    Event(EventEnvelope),
    /// `card.action.trigger`: answer 200 with the callback response (toast / card) or `{}`.
    CardAction(Box<CardAction>),
}

/// Why a callback body was rejected. Use [`BodyError::status`] for the HTTP status and do not
/// echo the `Display` text to the peer beyond [`BodyError::public_message`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// The body exceeds the configured limit.
    #[error("request body exceeds {limit} bytes")]
    TooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// The body (or decrypted body) is not a UTF-8 JSON object.
    #[error("request body is not a JSON object")]
    InvalidJson,
    /// No Encrypt Key is configured, so no request can be authenticated.
    #[error("no encrypt key is configured: HTTP callbacks cannot be authenticated")]
    NoEncryptKey,
    /// An event or message id is empty, longer than [`MAX_ID_LEN`] or outside the safe
    /// character set (see [`valid_id`]).
    #[error("{0} is not a valid id")]
    InvalidId(&'static str),
    /// The `encrypt` value could not be decrypted.
    #[error(transparent)]
    Decrypt(#[from] DecryptError),
    /// Signature, timestamp or verification-token check failed.
    #[error(transparent)]
    Unauthorized(#[from] VerifyError),
    /// A required envelope field is missing or not a string.
    #[error("envelope field {0} is missing")]
    MissingField(&'static str),
    /// Neither a challenge nor a schema 2.0/1.0 event (e.g. a legacy card callback).
    #[error("unsupported callback payload")]
    Unsupported,
}

impl BodyError {
    /// The HTTP status to answer with: 413 too large, 401 for every authentication failure
    /// (also an unsigned body whose decryption fails: it is refused for the signature before
    /// its decryption can say anything, so the status is no padding oracle), 400 for a
    /// correctly signed body that is malformed.
    pub fn status(&self) -> u16 {
        match self {
            Self::TooLarge { .. } => 413,
            Self::Unauthorized(_) | Self::NoEncryptKey => 401,
            Self::InvalidJson
            | Self::Decrypt(_)
            | Self::MissingField(_)
            | Self::InvalidId(_)
            | Self::Unsupported => 400,
        }
    }

    /// A short message safe to send to the peer (same for every variant with one status).
    pub fn public_message(&self) -> &'static str {
        match self.status() {
            413 => "payload too large",
            401 => "unauthorized",
            _ => "bad request",
        }
    }
}

/// The JSON body answering a `url_verification` request: `{"challenge":"…"}`.
pub fn challenge_response(challenge: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "challenge": challenge }))
        .unwrap_or_else(|_| b"{}".to_vec())
}

/// Longest event or message id accepted (the platform's are 32–64 characters).
pub const MAX_ID_LEN: usize = 128;

/// Whether `id` is a usable event or message id: 1 to [`MAX_ID_LEN`] bytes of ASCII letters,
/// digits, `-`, `_`, `.` and `:`. Ids become store keys and log fields; anything else is
/// refused when the payload is parsed, on both paths.
#[must_use]
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// Authenticates and parses one HTTP callback request. Fails closed: without an Encrypt Key
/// every request is refused.
///
/// Order of checks: size limit; the signature over the raw bytes and the timestamp window,
/// **before** anything is decrypted or parsed; then JSON, decryption of `encrypt`, and:
/// * a signed `url_verification` is answered (its token must match when a Verification Token
///   is configured);
/// * a signed event is classified, then the verification token is enforced when configured
///   and the payload carries one (the Python SDK's rule with an Encrypt Key);
/// * an unsigned request is refused, with one exception: the platform's `url_verification`
///   challenge, which it sends unsigned (the SDKs accept it so). It is answered only when it
///   decrypts under our Encrypt Key and carries our Verification Token, and all it gets is its
///   challenge echoed. Every other unsigned body gets 401, whatever is wrong with it.
pub fn parse_callback(
    raw: &[u8],
    headers: &SignatureHeaders<'_>,
    config: &CallbackConfig,
    now: SystemTime,
) -> Result<Callback, BodyError> {
    if raw.len() > config.max_body_bytes {
        return Err(BodyError::TooLarge {
            limit: config.max_body_bytes,
        });
    }
    let Some((key, cipher)) = &config.encrypt else {
        return Err(BodyError::NoEncryptKey);
    };
    if let Err(unsigned) = verify::verify_request(headers, key, raw, now, config.timestamp_window) {
        return unsigned_challenge(
            raw,
            cipher,
            config.verification_token.as_deref().map(String::as_str),
        )
        .map(|challenge| Callback::UrlVerification { challenge })
        .ok_or(BodyError::Unauthorized(unsigned));
    }

    let outer = parse_object(raw)?;
    let plain = match outer.get("encrypt") {
        Some(Value::String(enc)) => parse_object(&cipher.decrypt(enc)?)?,
        Some(_) => return Err(BodyError::InvalidJson),
        None => outer,
    };

    if is_url_verification(&plain) {
        if let Some(expected) = &config.verification_token {
            verify::verify_token(str_at(&plain, "/token"), expected)?;
        }
        let challenge = str_at(&plain, "/challenge").ok_or(BodyError::MissingField("challenge"))?;
        return Ok(Callback::UrlVerification {
            challenge: challenge.to_owned(),
        });
    }

    let callback = classify(plain)?;
    if let Some(expected) = &config.verification_token {
        let token = match &callback {
            Callback::Event(e) => e.token.as_deref(),
            Callback::CardAction(c) => c.envelope.token.as_deref(),
            Callback::UrlVerification { .. } => None,
        };
        if token.is_some() {
            verify::verify_token(token, expected)?;
        }
    }
    Ok(callback)
}

/// The challenge of an unsigned `url_verification`, if it decrypts under our key and carries
/// our Verification Token; `None` for anything else (and always without a token configured).
fn unsigned_challenge(raw: &[u8], cipher: &EventCipher, token: Option<&str>) -> Option<String> {
    let expected = token?;
    let outer = parse_object(raw).ok()?;
    let enc = outer.get("encrypt")?.as_str()?;
    let plain = parse_object(&cipher.decrypt(enc).ok()?).ok()?;
    if !is_url_verification(&plain) {
        return None;
    }
    verify::verify_token(str_at(&plain, "/token"), expected).ok()?;
    str_at(&plain, "/challenge").map(str::to_owned)
}

/// Parses a long-connection payload: the same plaintext envelope as HTTP mode, without
/// encryption or authentication (§2.7). A `url_verification` here is [`BodyError::Unsupported`].
pub fn parse_event_payload(json: &[u8]) -> Result<Callback, BodyError> {
    parse_event_bytes(json.into())
}

/// [`parse_event_payload`] of a payload the caller gives away (no copy of its bytes). Reads
/// the envelope's fields without building a `Value` tree; accepts and refuses exactly what
/// the full parse does (see `callbacks::head`).
pub fn parse_event_bytes(json: std::sync::Arc<[u8]>) -> Result<Callback, BodyError> {
    let mut h = Head::read(&json).ok_or(BodyError::InvalidJson)?;
    if !h.schema.present() && h.kind.as_str() == Some("url_verification") {
        return Err(BodyError::Unsupported);
    }
    let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
    let mut event = match std::mem::take(&mut h.event) {
        head::Nested::Object(e) => Some(e),
        _ => None,
    };
    let envelope = if h.schema.present() {
        if !h.header.present() {
            return Err(BodyError::MissingField("header"));
        }
        let mut hd = match std::mem::take(&mut h.header) {
            head::Nested::Object(hd) => hd,
            _ => head::Header::default(),
        };
        let event_id =
            nonempty(take_str(&mut hd.event_id)).ok_or(BodyError::MissingField("event_id"))?;
        let event_type =
            nonempty(take_str(&mut hd.event_type)).ok_or(BodyError::MissingField("event_type"))?;
        EventEnvelope {
            schema: Schema::V2,
            event_id,
            event_type,
            create_time: take_str(&mut hd.create_time),
            token: take_str(&mut hd.token),
            app_id: take_str(&mut hd.app_id),
            tenant_key: take_str(&mut hd.tenant_key),
            message_id: None,
            sender_open_id: None,
            raw: std::sync::Arc::from(&[][..]),
            json: std::sync::OnceLock::new(),
        }
    } else if h.uuid.present() {
        let event_id = nonempty(take_str(&mut h.uuid)).ok_or(BodyError::MissingField("uuid"))?;
        let ev = event.as_mut();
        let event_type = nonempty(ev.and_then(|e| take_str(&mut e.kind)))
            .ok_or(BodyError::MissingField("event.type"))?;
        EventEnvelope {
            schema: Schema::V1,
            event_id,
            event_type,
            create_time: take_str(&mut h.ts),
            token: take_str(&mut h.token),
            app_id: event.as_mut().and_then(|e| take_str(&mut e.app_id)),
            tenant_key: event.as_mut().and_then(|e| take_str(&mut e.tenant_key)),
            message_id: None,
            sender_open_id: None,
            raw: std::sync::Arc::from(&[][..]),
            json: std::sync::OnceLock::new(),
        }
    } else {
        return Err(BodyError::Unsupported);
    };
    let (message_id, sender_open_id) = match event.as_mut() {
        Some(e) => (
            match &mut e.message {
                head::Nested::Object(m) => match std::mem::take(&mut m.message_id) {
                    head::Field::Absent => None,
                    head::Field::Str(id) => Some(Some(id)),
                    head::Field::Other => Some(None),
                },
                _ => None,
            },
            e.sender
                .get()
                .and_then(|s| s.sender_id.get())
                .and_then(|id| id.open_id.as_str())
                .map(str::to_owned),
        ),
        None => (None, None),
    };
    let mut envelope = envelope;
    envelope.sender_open_id = sender_open_id;
    envelope.raw = json;
    finish(envelope, message_id)
}

/// The checks and the card-action split shared by both parses. `message_id`: `None` when
/// `event.message.message_id` is not there, `Some(None)` when it is there but not a string.
fn finish(
    mut envelope: EventEnvelope,
    message_id: Option<Option<String>>,
) -> Result<Callback, BodyError> {
    if !valid_id(&envelope.event_id) {
        return Err(BodyError::InvalidId("event_id"));
    }
    if let Some(message_id) = message_id {
        if !message_id.as_deref().is_some_and(valid_id) {
            return Err(BodyError::InvalidId("message_id"));
        }
        envelope.message_id = message_id;
    }
    if envelope.schema == Schema::V2 && envelope.event_type == CARD_ACTION_TRIGGER {
        Ok(Callback::CardAction(Box::new(CardAction::from_envelope(
            envelope,
        ))))
    } else {
        Ok(Callback::Event(envelope))
    }
}

fn parse_object(bytes: &[u8]) -> Result<Value, BodyError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ => Err(BodyError::InvalidJson),
    }
}

fn str_at<'a>(v: &'a Value, ptr: &str) -> Option<&'a str> {
    v.pointer(ptr).and_then(Value::as_str)
}

fn owned_at(v: &Value, ptr: &str) -> Option<String> {
    str_at(v, ptr).map(str::to_owned)
}

fn is_url_verification(v: &Value) -> bool {
    v.get("schema").is_none() && str_at(v, "/type") == Some("url_verification")
}

/// Classifies a plaintext envelope: `schema` present → v2, else `uuid` present → v1.
fn classify(v: Value) -> Result<Callback, BodyError> {
    let mut envelope = if v.get("schema").is_some() {
        let header = v.get("header").ok_or(BodyError::MissingField("header"))?;
        let field = |name: &'static str| {
            header
                .get(name)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .ok_or(BodyError::MissingField(name))
        };
        EventEnvelope {
            schema: Schema::V2,
            event_id: field("event_id")?,
            event_type: field("event_type")?,
            create_time: owned_at(header, "/create_time"),
            token: owned_at(header, "/token"),
            app_id: owned_at(header, "/app_id"),
            tenant_key: owned_at(header, "/tenant_key"),
            message_id: None,
            sender_open_id: None,
            raw: std::sync::Arc::from(&[][..]),
            json: std::sync::OnceLock::from(v),
        }
    } else if v.get("uuid").is_some() {
        let event_id = owned_at(&v, "/uuid")
            .filter(|s| !s.is_empty())
            .ok_or(BodyError::MissingField("uuid"))?;
        let event_type = owned_at(&v, "/event/type")
            .filter(|s| !s.is_empty())
            .ok_or(BodyError::MissingField("event.type"))?;
        EventEnvelope {
            schema: Schema::V1,
            event_id,
            event_type,
            create_time: owned_at(&v, "/ts"),
            token: owned_at(&v, "/token"),
            app_id: owned_at(&v, "/event/app_id"),
            tenant_key: owned_at(&v, "/event/tenant_key"),
            message_id: None,
            sender_open_id: None,
            raw: std::sync::Arc::from(&[][..]),
            json: std::sync::OnceLock::from(v),
        }
    } else {
        return Err(BodyError::Unsupported);
    };
    let message_id = envelope
        .json()
        .pointer("/event/message/message_id")
        .map(|v| v.as_str().map(str::to_owned));
    envelope.sender_open_id = envelope
        .json()
        .pointer("/event/sender/sender_id/open_id")
        .and_then(Value::as_str)
        .map(str::to_owned);
    finish(envelope, message_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::callbacks::verify::signature_hex;
    use std::time::UNIX_EPOCH;

    /// The long connection's parse before this change: the whole payload as a `Value` tree,
    /// then the same classification as HTTP mode. The header-only parse must agree with it on
    /// every input: the same callback (fields and body) or the same error.
    fn full_parse(json: &[u8]) -> Result<Callback, BodyError> {
        let v = parse_object(json)?;
        if is_url_verification(&v) {
            return Err(BodyError::Unsupported);
        }
        classify(v)
    }

    fn agree(input: &[u8]) {
        let want = full_parse(input);
        let got = parse_event_payload(input);
        assert_eq!(got, want, "input: {}", String::from_utf8_lossy(input));
        if let (Ok(Callback::Event(g)), Ok(Callback::Event(w))) = (&got, &want) {
            assert_eq!(g.json(), w.json());
            assert_eq!(
                g.sender_open_id.as_deref(),
                w.json()
                    .pointer("/event/sender/sender_id/open_id")
                    .and_then(Value::as_str)
            );
        }
    }

    #[test]
    fn the_header_only_parse_accepts_and_refuses_what_the_full_parse_does() {
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        let cases: Vec<String> = vec![
            // Valid, both shapes, with and without the fields read early.
            r#"{"schema":"2.0","header":{"event_id":"e1","event_type":"im.message.receive_v1","create_time":"1","token":"t","app_id":"cli_a","tenant_key":"tk"},"event":{"sender":{"sender_id":{"open_id":"ou_1"}},"message":{"message_id":"om_1","content":"{\"text\":\"hi\"}"}}}"#.into(),
            r#"{"uuid":"u1","ts":"1.0","token":"t","type":"event_callback","event":{"type":"message","app_id":"cli_a","tenant_key":"tk"}}"#.into(),
            r#"{"schema":"2.0","header":{"event_id":"c1","event_type":"card.action.trigger"},"event":{"operator":{"open_id":"ou_1"},"action":{"value":"{\"k\":1}","tag":"button"},"token":"ct"}}"#.into(),
            // A key given twice: the last value counts (at the top and inside).
            r#"{"schema":"2.0","header":{"event_id":"e1","event_type":"a"},"header":{"event_id":"e2","event_type":"b"},"event":{}}"#.into(),
            r#"{"schema":"2.0","header":{"event_id":"e1","event_id":"e3","event_type":"a"},"event":{"message":{"message_id":"om_1"},"message":{"message_id":"bad id"}}}"#.into(),
            r#"{"schema":"2.0","header":{"event_id":"e1","event_type":"a"},"header":5}"#.into(),
            r#"{"schema":"2.0","header":{"event_id":"e1","event_type":"a"},"event":{"message":{"message_id":"om_1"}},"event":[1]}"#.into(),
            // Escaped keys and values.
            r#"{"schema":"2.0","\u0068eader":{"event_\u0069d":"e\u0031","event_type":"a"},"event":{"sender":{"sender_id":{"open_id":"ou_\u00e9"}}}}"#.into(),
            // Wrong types where strings are expected, null schema, empty strings.
            r#"{"schema":null,"header":{"event_id":"e1","event_type":"a"}}"#.into(),
            r#"{"schema":"2.0","header":{"event_id":1,"event_type":"a"}}"#.into(),
            r#"{"schema":"2.0","header":{"event_id":"","event_type":"a"}}"#.into(),
            r#"{"schema":"2.0","header":{"event_id":"e1","event_type":["a"]}}"#.into(),
            r#"{"schema":"2.0","header":{"event_id":"e1","event_type":"a"},"event":{"message":{"message_id":null}}}"#.into(),
            r#"{"schema":"2.0","header":{"event_id":"e1","event_type":"a"},"event":{"message":{"message_id":""}}}"#.into(),
            r#"{"schema":"2.0","header":{"event_id":"e1","event_type":"a"},"event":{"message":"om_1"}}"#.into(),
            r#"{"schema":"2.0","header":{"event_id":"e 1","event_type":"a"}}"#.into(),
            r#"{"schema":"2.0","header":{"event_id":"e1","event_type":"a"},"event":{"sender":{"sender_id":{"open_id":7}}}}"#.into(),
            r#"{"schema":"2.0"}"#.into(),
            r#"{"uuid":"","event":{"type":"x"}}"#.into(),
            r#"{"uuid":"u1","event":{"type":""}}"#.into(),
            r#"{"uuid":"u1","event":"x"}"#.into(),
            r#"{"type":"url_verification","challenge":"c","token":"t"}"#.into(),
            r#"{"schema":"2.0","type":"url_verification","header":{"event_id":"e1","event_type":"a"}}"#.into(),
            r#"{"event":{}}"#.into(),
            // Not JSON objects, or not JSON at all.
            "[]".into(),
            "\"x\"".into(),
            "null".into(),
            String::new(),
            "{".into(),
            r#"{"schema":"2.0","header":{"event_id":"e1","event_type":"a"}} x"#.into(),
            r#"{"schema":"2.0","header":{"event_id":"e1","event_type":"a"},}"#.into(),
            // What only a full check refuses, in a part nobody reads: nesting past the limit,
            // a lone surrogate, a bad escape, a number out of range, a control character.
            format!(r#"{{"schema":"2.0","header":{{"event_id":"e1","event_type":"a"}},"x":{}}}"#, deep(127)),
            format!(r#"{{"schema":"2.0","header":{{"event_id":"e1","event_type":"a"}},"x":{}}}"#, deep(200)),
            r#"{"schema":"2.0","header":{"event_id":"e1","event_type":"a"},"x":"\ud800"}"#.into(),
            r#"{"schema":"2.0","header":{"event_id":"e1","event_type":"a"},"x":"\q"}"#.into(),
            r#"{"schema":"2.0","header":{"event_id":"e1","event_type":"a"},"x":1e999}"#.into(),
            "{\"schema\":\"2.0\",\"header\":{\"event_id\":\"e1\",\"event_type\":\"a\"},\"x\":\"\u{1}\"}".into(),
            r#"{"schema":"2.0","header":{"event_id":"e1","event_type":"a"},"x":{"\ud800":1}}"#.into(),
        ];
        for c in &cases {
            agree(c.as_bytes());
        }
        // Invalid UTF-8 inside a string nobody reads.
        let mut bytes =
            br#"{"schema":"2.0","header":{"event_id":"e1","event_type":"a"},"x":"#.to_vec();
        bytes.extend_from_slice(b"\"\xff\xfe\"}");
        agree(&bytes);
        // The nesting limit holds in the parts that are read too.
        agree(format!(r#"{{"schema":"2.0","header":{{"event_id":"e1","event_type":"a"}},"event":{{"message":{}}}}}"#, deep(200)).as_bytes());
    }

    #[test]
    fn the_header_only_parse_agrees_with_the_full_parse_on_the_fuzz_corpus_and_its_mutations() {
        use rand::{Rng, SeedableRng};
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/callback_body");
        let mut inputs: Vec<Vec<u8>> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        assert!(inputs.len() >= 50, "corpus missing: {}", dir.display());
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let base = inputs.clone();
        for _ in 0..20_000 {
            let mut b = base[rng.random_range(0..base.len())].clone();
            for _ in 0..rng.random_range(1..=3) {
                if b.is_empty() {
                    break;
                }
                let i = rng.random_range(0..b.len());
                match rng.random_range(0..4) {
                    0 => b[i] ^= 1 << rng.random_range(0..8),
                    1 => b.truncate(i),
                    2 => b.insert(i, b"{}[]\",:\\"[rng.random_range(0..8)]),
                    _ => {
                        b.remove(i);
                    }
                }
            }
            inputs.push(b);
        }
        let mut accepted = 0;
        for input in &inputs {
            agree(input);
            accepted += usize::from(full_parse(input).is_ok());
        }
        // The corpus holds valid envelopes too, so both outcomes were compared.
        assert!(
            accepted > 0 && accepted < inputs.len(),
            "{accepted} of {}",
            inputs.len()
        );
    }

    const KEY: &str = "test-encrypt-key";
    const TOKEN: &str = "xxxxxx";
    const IV: [u8; 16] = [7; 16];

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_010)
    }

    fn v2(event_type: &str, token: &str) -> String {
        serde_json::json!({
            "schema": "2.0",
            "header": {
                "event_id": "ev1", "event_type": event_type, "create_time": "1608725989000",
                "token": token, "app_id": "cli_x", "tenant_key": "tk"
            },
            "event": {
                "operator": {"open_id": "ou_1", "user_id": "u1"},
                "token": "c-abc",
                "action": {"tag": "button", "value": {"action": "auth_done", "flow": "f1"}},
                "context": {"open_message_id": "om_1", "open_chat_id": "oc_1"}
            }
        })
        .to_string()
    }

    fn encrypted(plain: &str) -> String {
        let enc = EventCipher::new(KEY).encrypt_with_iv(plain.as_bytes(), IV);
        serde_json::json!({ "encrypt": enc }).to_string()
    }

    /// Signs `body` with the spec's header values.
    fn signed(body: &str) -> (String, String) {
        (
            body.to_owned(),
            signature_hex("1700000000", "n0nce", KEY, body.as_bytes()),
        )
    }

    fn headers(sig: &str) -> SignatureHeaders<'_> {
        SignatureHeaders {
            timestamp: Some("1700000000"),
            nonce: Some("n0nce"),
            signature: Some(sig),
        }
    }

    fn both() -> CallbackConfig {
        CallbackConfig::new(Some(TOKEN), Some(KEY))
    }

    #[test]
    fn spec_vector_challenge_encrypted_without_signature() {
        let body = r#"{"encrypt":"AAECAwQFBgcICQoLDA0OD/pXnuQjbBOjuCGc9CaoydhrmhJPFb/HVRvdR3Xe4bcGZ2OtDXZ6996piNoH3O63DgxYvaraqv9DZHekCWh2CHPtFRQF/8gWDPjseZ74u+un"}"#;
        let got = parse_callback(
            body.as_bytes(),
            &SignatureHeaders::default(),
            &both(),
            now(),
        );
        assert_eq!(
            got,
            Ok(Callback::UrlVerification {
                challenge: "ajls384kdjx98XX".into()
            })
        );
        // And with the spec's signature.
        let sig = "d9869fc968e6c03222dfb00e5b92d2c61f4dbb3b8e7ec82063f0158dfb8f862c";
        assert!(parse_callback(body.as_bytes(), &headers(sig), &both(), now()).is_ok());
        assert_eq!(
            challenge_response("ajls384kdjx98XX"),
            br#"{"challenge":"ajls384kdjx98XX"}"#
        );
    }

    #[test]
    fn without_an_encrypt_key_every_callback_is_refused_even_with_the_right_token() {
        // A verification token travels in the body: anyone who has seen one callback can forge
        // the next. Without an encrypt key nothing is authenticated, so nothing is accepted.
        let cfg = CallbackConfig::new(Some(TOKEN), None);
        let h = SignatureHeaders::default();
        let challenge = r#"{"challenge":"c1","token":"xxxxxx","type":"url_verification"}"#;
        let forged = v2("im.message.receive_v1", TOKEN);
        for body in [challenge, forged.as_str(), "", "{}"] {
            let err = parse_callback(body.as_bytes(), &h, &cfg, now()).unwrap_err();
            assert_eq!(err, BodyError::NoEncryptKey, "{body}");
            assert_eq!(err.status(), 401);
            assert_eq!(err.public_message(), "unauthorized");
        }
        let none = CallbackConfig::new(Some(""), None);
        assert!(!none.has_verification_token() && !none.has_encrypt_key());
        assert_eq!(
            parse_callback(forged.as_bytes(), &h, &none, now()),
            Err(BodyError::NoEncryptKey)
        );
    }

    #[test]
    fn an_unsigned_body_gets_only_the_challenge_and_only_with_our_key_and_token() {
        let h = SignatureHeaders::default();
        let challenge = |token: &str| {
            encrypted(
                &serde_json::json!({"challenge": "c1", "token": token, "type": "url_verification"})
                    .to_string(),
            )
        };
        assert_eq!(
            parse_callback(challenge(TOKEN).as_bytes(), &h, &both(), now()),
            Ok(Callback::UrlVerification {
                challenge: "c1".into()
            })
        );
        // Every other unsigned body gets the same 401, whatever is wrong with it.
        let wrong_token = challenge("yyy");
        let plain_challenge = r#"{"challenge":"c1","token":"xxxxxx","type":"url_verification"}"#;
        let unsigned_event = encrypted(&v2("im.message.receive_v1", TOKEN));
        let other_key = serde_json::json!({
            "encrypt": EventCipher::new("another-key").encrypt_with_iv(
                br#"{"challenge":"c1","token":"xxxxxx","type":"url_verification"}"#, IV)
        })
        .to_string();
        for body in [
            wrong_token.as_str(),
            plain_challenge,
            unsigned_event.as_str(),
            other_key.as_str(),
            r#"{"encrypt":"!!"}"#,
            "not json",
        ] {
            let err = parse_callback(body.as_bytes(), &h, &both(), now()).unwrap_err();
            assert!(
                matches!(err, BodyError::Unauthorized(VerifyError::MissingHeader(_))),
                "{body}: {err:?}"
            );
            assert_eq!(err.status(), 401);
        }
        // Without a verification token even a correct challenge cannot be told from a replay.
        let key_only = CallbackConfig::new(None, Some(KEY));
        assert!(parse_callback(challenge(TOKEN).as_bytes(), &h, &key_only, now()).is_err());
    }

    #[test]
    fn ids_are_bounded_and_safe_on_both_paths() {
        assert!(valid_id("5e3702a84e847582be8db7fb73283c02"));
        assert!(valid_id("om_dc13264520392913993dd051dba21dcf"));
        assert!(valid_id(&"a".repeat(MAX_ID_LEN)));
        for bad in [
            String::new(),
            "a".repeat(MAX_ID_LEN + 1),
            "ev 1".into(),
            "ev/../1".into(),
            "ev\n1".into(),
            "é".into(),
        ] {
            assert!(!valid_id(&bad), "{bad:?}");
            let mut v: Value = serde_json::from_str(&v2("x.y", TOKEN)).unwrap();
            v["header"]["event_id"] = Value::String(bad.clone());
            // An empty id is a missing field; every other bad id is an invalid one.
            let want = if bad.is_empty() {
                BodyError::MissingField("event_id")
            } else {
                BodyError::InvalidId("event_id")
            };
            let ws = parse_event_payload(v.to_string().as_bytes());
            assert_eq!(ws, Err(want.clone()), "{bad:?}");
            let (body, sig) = signed(&v.to_string());
            let http = parse_callback(body.as_bytes(), &headers(&sig), &both(), now());
            assert_eq!(http, Err(want.clone()), "{bad:?}");
            assert_eq!(want.status(), 400);
        }
        let mut v: Value = serde_json::from_str(&v2("im.message.receive_v1", TOKEN)).unwrap();
        v["event"]["message"] = serde_json::json!({"message_id": "om_1/../x"});
        assert_eq!(
            parse_event_payload(v.to_string().as_bytes()),
            Err(BodyError::InvalidId("message_id"))
        );
        v["event"]["message"] = serde_json::json!({"message_id": 7});
        assert_eq!(
            parse_event_payload(v.to_string().as_bytes()),
            Err(BodyError::InvalidId("message_id"))
        );
    }

    #[test]
    fn encrypted_signed_v2_event() {
        let (body, sig) = signed(&encrypted(&v2("im.message.receive_v1", TOKEN)));
        let got = parse_callback(body.as_bytes(), &headers(&sig), &both(), now()).unwrap();
        let Callback::Event(e) = got else {
            panic!("not an event: {got:?}")
        };
        assert_eq!(e.schema, Schema::V2);
        assert_eq!(e.event_id, "ev1");
        assert_eq!(e.event_type, "im.message.receive_v1");
        assert_eq!(e.create_time.as_deref(), Some("1608725989000"));
        assert_eq!(e.app_id.as_deref(), Some("cli_x"));
        assert_eq!(e.tenant_key.as_deref(), Some("tk"));
        assert!(e.event().is_some());
        assert!(
            !format!("{e:?}").contains("ou_1"),
            "Debug must not print the body"
        );
    }

    #[test]
    fn signature_failures_reject_events() {
        let (body, sig) = signed(&encrypted(&v2("im.message.receive_v1", TOKEN)));
        let cfg = both();
        let bad = "0".repeat(64);
        let err = parse_callback(body.as_bytes(), &headers(&bad), &cfg, now()).unwrap_err();
        assert_eq!(err, BodyError::Unauthorized(VerifyError::BadSignature));
        let err =
            parse_callback(body.as_bytes(), &SignatureHeaders::default(), &cfg, now()).unwrap_err();
        assert!(matches!(
            err,
            BodyError::Unauthorized(VerifyError::MissingHeader(_))
        ));
        let late = UNIX_EPOCH + Duration::from_secs(1_700_001_000);
        let err = parse_callback(body.as_bytes(), &headers(&sig), &cfg, late).unwrap_err();
        assert!(matches!(
            err,
            BodyError::Unauthorized(VerifyError::StaleTimestamp { .. })
        ));
        assert_eq!(err.status(), 401);
        assert_eq!(err.public_message(), "unauthorized");
        let mut no_window = both();
        no_window.timestamp_window = None;
        assert!(parse_callback(body.as_bytes(), &headers(&sig), &no_window, late).is_ok());
    }

    #[test]
    fn token_rules() {
        let ok = v2("x.y", TOKEN);
        let bad = v2("x.y", "nope");
        let mut missing: Value = serde_json::from_str(&ok).unwrap();
        missing["header"].as_object_mut().unwrap().remove("token");
        let missing = missing.to_string();
        // Encrypt key + token: a signed payload without a token passes on the signature alone,
        // a signed payload with a wrong token fails.
        let (body, sig) = signed(&ok);
        assert!(parse_callback(body.as_bytes(), &headers(&sig), &both(), now()).is_ok());
        let (body, sig) = signed(&missing);
        assert!(parse_callback(body.as_bytes(), &headers(&sig), &both(), now()).is_ok());
        let (body, sig) = signed(&bad);
        assert_eq!(
            parse_callback(body.as_bytes(), &headers(&sig), &both(), now()),
            Err(BodyError::Unauthorized(VerifyError::BadToken))
        );
        // Encrypt key alone: the signature is what counts.
        let key_only = CallbackConfig::new(None, Some(KEY));
        assert!(parse_callback(body.as_bytes(), &headers(&sig), &key_only, now()).is_ok());
    }

    #[test]
    fn card_action() {
        let (body, sig) = signed(&encrypted(&v2(CARD_ACTION_TRIGGER, TOKEN)));
        let got = parse_callback(body.as_bytes(), &headers(&sig), &both(), now()).unwrap();
        let Callback::CardAction(c) = got else {
            panic!("not a card action: {got:?}")
        };
        assert_eq!(c.operator_id(), Some("ou_1"));
        assert_eq!(c.operator_user_id.as_deref(), Some("u1"));
        assert_eq!(c.update_token.as_deref(), Some("c-abc"));
        assert_eq!(c.action_tag.as_deref(), Some("button"));
        assert_eq!(c.action_value["flow"], "f1");
        assert_eq!(c.open_message_id.as_deref(), Some("om_1"));
        assert_eq!(c.open_chat_id.as_deref(), Some("oc_1"));
        assert_eq!(c.envelope.event_id, "ev1");
    }

    #[test]
    fn card_action_value_as_json_string_and_user_id_fallback() {
        let mut v: Value = serde_json::from_str(&v2(CARD_ACTION_TRIGGER, TOKEN)).unwrap();
        v["event"]["action"]["value"] = Value::String(r#"{"action":"auth_done"}"#.into());
        v["event"]["operator"]
            .as_object_mut()
            .unwrap()
            .remove("open_id");
        let Ok(Callback::CardAction(c)) = parse_event_payload(v.to_string().as_bytes()) else {
            panic!("not a card action")
        };
        assert_eq!(c.action_value["action"], "auth_done");
        assert_eq!(c.operator_id(), Some("u1"));
        v["event"]["action"]["value"] = Value::String("plain text".into());
        let Ok(Callback::CardAction(c)) = parse_event_payload(v.to_string().as_bytes()) else {
            panic!("not a card action")
        };
        assert_eq!(c.action_value, "plain text");
    }

    #[test]
    fn v1_envelope() {
        let body = r#"{"ts":"1502199207.7171419","uuid":"u-1","token":"xxxxxx","type":"event_callback","event":{"type":"message","app_id":"cli_x","tenant_key":"tk"}}"#;
        let (body, sig) = signed(body);
        let got = parse_callback(body.as_bytes(), &headers(&sig), &both(), now()).unwrap();
        let Callback::Event(e) = got else {
            panic!("not an event")
        };
        assert_eq!(e.schema, Schema::V1);
        assert_eq!(e.event_id, "u-1");
        assert_eq!(e.event_type, "message");
        assert_eq!(e.create_time.as_deref(), Some("1502199207.7171419"));
        assert_eq!(e.app_id.as_deref(), Some("cli_x"));
    }

    #[test]
    fn malformed_bodies_map_to_4xx() {
        let h = SignatureHeaders::default();
        let cfg = both();
        // Signed but malformed: 400 (only the platform can sign, so this is no oracle).
        let cases: &[(&[u8], BodyError)] = &[
            (b"", BodyError::InvalidJson),
            (b"[]", BodyError::InvalidJson),
            (b"\xff", BodyError::InvalidJson),
            (
                br#"{"encrypt":"abc"}"#,
                BodyError::Decrypt(DecryptError::Base64),
            ),
            (br#"{"schema":"2.0"}"#, BodyError::MissingField("header")),
            (
                br#"{"schema":"2.0","header":{"event_id":"e"}}"#,
                BodyError::MissingField("event_type"),
            ),
            (
                br#"{"schema":"2.0","header":{"event_id":"","event_type":"t"}}"#,
                BodyError::MissingField("event_id"),
            ),
            (br#"{"uuid":"u"}"#, BodyError::MissingField("event.type")),
            (
                br#"{"open_message_id":"om","action":{}}"#,
                BodyError::Unsupported,
            ),
        ];
        for (body, want) in cases {
            let sig = signature_hex("1700000000", "n0nce", KEY, body);
            let got = parse_callback(body, &headers(&sig), &cfg, now()).unwrap_err();
            assert_eq!(&got, want, "{}", String::from_utf8_lossy(body));
            assert_eq!(got.status(), 400);
            assert_eq!(got.public_message(), "bad request");
        }
        let keyed = both();
        let signed_parse = |body: &[u8]| {
            let sig = signature_hex("1700000000", "n0nce", KEY, body);
            parse_callback(body, &headers(&sig), &keyed, now())
        };
        assert_eq!(
            signed_parse(br#"{"encrypt":5}"#),
            Err(BodyError::InvalidJson)
        );
        let e = signed_parse(br#"{"encrypt":"!!"}"#).unwrap_err();
        assert_eq!(
            (e.clone(), e.status()),
            (BodyError::Decrypt(DecryptError::Base64), 400)
        );
        // Decrypts to non-JSON.
        let enc =
            serde_json::json!({"encrypt": EventCipher::new(KEY).encrypt_with_iv(b"nope", IV)})
                .to_string();
        assert_eq!(signed_parse(enc.as_bytes()), Err(BodyError::InvalidJson));
        // The same bodies unsigned: all one 401.
        for body in [&br#"{"encrypt":"!!"}"#[..], enc.as_bytes(), b"[]"] {
            assert_eq!(
                parse_callback(body, &h, &keyed, now())
                    .unwrap_err()
                    .status(),
                401
            );
        }
    }

    #[test]
    fn size_limit() {
        let mut cfg = CallbackConfig::new(Some(TOKEN), None);
        cfg.max_body_bytes = 10;
        let err =
            parse_callback(&[b' '; 11], &SignatureHeaders::default(), &cfg, now()).unwrap_err();
        assert_eq!(err, BodyError::TooLarge { limit: 10 });
        assert_eq!(err.status(), 413);
    }

    #[test]
    fn ws_payload_rejects_challenge() {
        let body = br#"{"challenge":"c","token":"t","type":"url_verification"}"#;
        assert_eq!(parse_event_payload(body), Err(BodyError::Unsupported));
        assert!(matches!(
            parse_event_payload(v2("im.message.receive_v1", "").as_bytes()),
            Ok(Callback::Event(_))
        ));
    }

    #[test]
    fn config_debug_is_redacted() {
        let s = format!("{:?}", both());
        assert!(!s.contains(KEY) && !s.contains(TOKEN), "{s}");
    }

    mod props {
        use super::super::*;
        use super::{both, headers, KEY};
        use crate::callbacks::verify::signature_hex;
        use proptest::collection::vec;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn arbitrary_bodies_never_panic(body in vec(any::<u8>(), 0..300)) {
                let h = SignatureHeaders::default();
                let _ = parse_callback(&body, &h, &both(), super::now());
                let _ = parse_callback(&body, &h, &CallbackConfig::new(None, None), super::now());
                let _ = parse_event_payload(&body);
            }

            #[test]
            fn arbitrary_signed_encrypted_json_never_panics(inner in ".{0,200}") {
                let enc = EventCipher::new(KEY).encrypt_with_iv(inner.as_bytes(), [1; 16]);
                let body = serde_json::json!({ "encrypt": enc }).to_string();
                let sig = signature_hex("1700000000", "n0nce", KEY, body.as_bytes());
                if let Err(e) = parse_callback(body.as_bytes(), &headers(&sig), &both(), super::now()) {
                    prop_assert!((400..500).contains(&e.status()));
                }
            }
        }
    }
}
