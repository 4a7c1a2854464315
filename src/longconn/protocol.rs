//! The `pbbp2` frame codec of the Feishu/Lark long connection (protocol doc §2.4–§2.8).
//!
//! Owns: the protobuf `Frame`/`Header` types, strict decoding (required fields 1–4 and
//! header key/value must be present), header access, frame classification, the client
//! ping, the pong/discovery client-config payload, the data-frame headers used for
//! reassembly, and the ACK frame sent back for a data message.
//!
//! Must not: do any I/O, read clocks, spawn tasks or log message bodies. Everything here is
//! a pure function of its inputs so it can be unit-tested, property-tested and fuzzed; the
//! connection task owns the socket and the timing.

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use prost::Message as _;

/// `method` value of control frames (ping / pong), protocol doc §2.5.
pub const METHOD_CONTROL: i32 = 0;
/// `method` value of data frames (events, card callbacks and their ACKs), protocol doc §2.5.
pub const METHOD_DATA: i32 = 1;

/// Header key holding the frame type (`ping`, `pong`, `event`, `card`).
pub const HEADER_TYPE: &str = "type";
/// Header key holding the logical message id shared by all fragments.
pub const HEADER_MESSAGE_ID: &str = "message_id";
/// Header key holding the number of fragments (`"1"` when not split).
pub const HEADER_SUM: &str = "sum";
/// Header key holding the 0-based fragment index (`"0"` when not split).
pub const HEADER_SEQ: &str = "seq";
/// Header key holding the platform's trace id.
pub const HEADER_TRACE_ID: &str = "trace_id";
/// Header key the client appends to an ACK: handler time in milliseconds.
pub const HEADER_BIZ_RT: &str = "biz_rt";

/// One `pbbp2.Header`: a `required string key = 1; required string value = 2;` pair.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Header {
    /// Header name, e.g. `type`.
    #[prost(string, required, tag = "1")]
    pub key: String,
    /// Header value; always a string on the wire, numbers are decimal.
    #[prost(string, required, tag = "2")]
    pub value: String,
}

impl Header {
    /// Builds a header from a key and value.
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: value.into(),
        }
    }
}

/// One `pbbp2.Frame` (proto2). Fields 1–4 are `required` and always encoded, even when 0;
/// fields 6–9 are optional and kept as `Option` so a received frame re-encodes with exactly
/// the fields it had (the ACK echoes the incoming frame, §2.8).
///
/// `Debug` prints the payload length only, never the payload (it carries message bodies).
#[derive(Clone, PartialEq, Eq, prost::Message)]
#[prost(skip_debug)]
pub struct Frame {
    /// `SeqID` (tag 1).
    #[prost(uint64, required, tag = "1")]
    pub seq_id: u64,
    /// `LogID` (tag 2).
    #[prost(uint64, required, tag = "2")]
    pub log_id: u64,
    /// `service` (tag 3): the `service_id` from the WebSocket URL.
    #[prost(int32, required, tag = "3")]
    pub service: i32,
    /// `method` (tag 4): [`METHOD_CONTROL`] or [`METHOD_DATA`].
    #[prost(int32, required, tag = "4")]
    pub method: i32,
    /// `headers` (tag 5), in wire order.
    #[prost(message, repeated, tag = "5")]
    pub headers: Vec<Header>,
    /// `payload_encoding` (tag 6), opaque; echoed back unchanged.
    #[prost(string, optional, tag = "6")]
    pub payload_encoding: Option<String>,
    /// `payload_type` (tag 7), opaque; echoed back unchanged.
    #[prost(string, optional, tag = "7")]
    pub payload_type: Option<String>,
    /// `payload` (tag 8); `None` when absent, `Some(vec![])` when present but empty.
    #[prost(bytes = "vec", optional, tag = "8")]
    pub payload: Option<Vec<u8>>,
    /// `LogIDNew` (tag 9), opaque; echoed back unchanged.
    #[prost(string, optional, tag = "9")]
    pub log_id_new: Option<String>,
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("seq_id", &self.seq_id)
            .field("log_id", &self.log_id)
            .field("service", &self.service)
            .field("method", &self.method)
            .field("headers", &self.headers)
            .field("payload_encoding", &self.payload_encoding)
            .field("payload_type", &self.payload_type)
            .field("payload_len", &self.payload.as_ref().map(Vec::len))
            .field("log_id_new", &self.log_id_new)
            .finish()
    }
}

/// Why bytes could not be decoded as a [`Frame`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A `required` field of `Frame` (tags 1–4) is absent.
    #[error("frame is missing required field {0}")]
    MissingField(&'static str),
    /// A `required` field of a `Header` (key or value) is absent.
    #[error("frame header #{index} is missing required field {field}")]
    MissingHeaderField {
        /// 0-based position of the header in the frame.
        index: usize,
        /// `key` or `value`.
        field: &'static str,
    },
    /// The bytes are not well-formed protobuf, or a field has the wrong type.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl Frame {
    /// Decodes one WebSocket binary message. Unlike prost's lenient default this rejects a
    /// frame lacking any of fields 1–4, or a header lacking `key` or `value`, as the Node
    /// and Go SDKs do. Never panics, whatever the input.
    pub fn decode_strict(bytes: &[u8]) -> Result<Self, FrameError> {
        check_required(bytes)?;
        Self::decode(bytes).map_err(|e| FrameError::Malformed(e.to_string()))
    }

    /// Encodes the frame. Fields 1–4 are always written (also when 0), fields 6–9 only when
    /// `Some`, so the output is readable by the Go and Node decoders.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    /// Value of the first header named `key`, if any (the Python SDK's lookup rule).
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.key == key)
            .map(|h| h.value.as_str())
    }

    /// Sets header `key`: replaces the value of the first header with that key, or appends
    /// a new header at the end when there is none.
    pub fn set_header(&mut self, key: &str, value: impl Into<String>) {
        let value = value.into();
        match self.headers.iter_mut().find(|h| h.key == key) {
            Some(h) => h.value = value,
            None => self.headers.push(Header::new(key, value)),
        }
    }

    /// What this frame is, from its `method` and `type` header.
    pub fn kind(&self) -> FrameKind {
        match (self.method, self.header(HEADER_TYPE)) {
            (METHOD_CONTROL, Some("ping")) => FrameKind::Ping,
            (METHOD_CONTROL, Some("pong")) => FrameKind::Pong,
            (METHOD_DATA, Some("event")) => FrameKind::Event,
            (METHOD_DATA, Some("card")) => FrameKind::Card,
            _ => FrameKind::Unknown,
        }
    }

    /// The payload bytes, empty when the field is absent.
    pub fn payload_bytes(&self) -> &[u8] {
        self.payload.as_deref().unwrap_or_default()
    }
}

/// Classification of a received frame (§2.5–§2.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// Control frame `type=ping`. From the server it is ignored (no reply).
    Ping,
    /// Control frame `type=pong`; its payload may carry a new [`ClientConfig`].
    Pong,
    /// Data frame `type=event`: an event or a callback (incl. `card.action.trigger`); ACK it.
    Event,
    /// Data frame `type=card`: legacy; the SDKs drop it without an ACK. Log it.
    Card,
    /// Any other method/type combination: ignore without an ACK.
    Unknown,
}

/// Builds the client ping: control frame, `SeqID=0`, `LogID=0`, `service=<service_id>`, one
/// header `type=ping`, no payload (§2.6).
pub fn ping_frame(service_id: i32) -> Frame {
    Frame {
        service: service_id,
        method: METHOD_CONTROL,
        headers: vec![Header::new(HEADER_TYPE, "ping")],
        ..Frame::default()
    }
}

/// The encoded bytes of [`ping_frame`].
pub fn encode_ping(service_id: i32) -> Vec<u8> {
    ping_frame(service_id).to_bytes()
}

// ---------------------------------------------------------------------------------------------
// Connection URL parameters
// ---------------------------------------------------------------------------------------------

/// The two query parameters the client reads from the discovered WebSocket URL (§2.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnParams {
    /// `device_id`: used only as the connection id in logs (`conn_id`); may be absent.
    pub device_id: Option<String>,
    /// `service_id`: put into the `service` field of every ping.
    pub service_id: i32,
}

/// Why the discovered WebSocket URL is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnUrlError {
    /// The URL does not parse.
    #[error("websocket url does not parse: {0}")]
    InvalidUrl(String),
    /// The `service_id` query parameter is absent.
    #[error("websocket url has no service_id parameter")]
    MissingServiceId,
    /// The `service_id` query parameter is not a decimal int32.
    #[error("websocket url has a non-numeric service_id")]
    InvalidServiceId,
}

impl ConnParams {
    /// Extracts `device_id` and `service_id` from the discovered URL. All other parameters
    /// (`access_key`, `ticket`, …) are credentials and stay opaque. `service_id` is required
    /// (the Python SDK raises without it); `device_id` is optional.
    pub fn from_url(url: &str) -> Result<Self, ConnUrlError> {
        let parsed = url::Url::parse(url).map_err(|e| ConnUrlError::InvalidUrl(e.to_string()))?;
        let mut device_id = None;
        let mut service_id = None;
        for (k, v) in parsed.query_pairs() {
            match k.as_ref() {
                "device_id" if device_id.is_none() => device_id = Some(v.into_owned()),
                "service_id" if service_id.is_none() => service_id = Some(v.into_owned()),
                _ => {}
            }
        }
        let service_id = service_id
            .ok_or(ConnUrlError::MissingServiceId)?
            .trim()
            .parse::<i32>()
            .map_err(|_| ConnUrlError::InvalidServiceId)?;
        Ok(Self {
            device_id,
            service_id,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Client config (discovery `ClientConfig` and pong payload)
// ---------------------------------------------------------------------------------------------

/// The server-controlled connection settings (§2.2, §2.6). Units on the wire are seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientConfig {
    /// `ReconnectCount`: attempts per outage; `None` = unlimited (negative on the wire).
    pub reconnect_count: Option<u32>,
    /// `ReconnectInterval`: wait after a failed attempt (we use it as the backoff cap).
    pub reconnect_interval: Duration,
    /// `ReconnectNonce`: upper bound of the random wait before the first attempt.
    pub reconnect_nonce: Duration,
    /// `PingInterval`: time between client pings.
    pub ping_interval: Duration,
}

impl Default for ClientConfig {
    /// The SDK built-in defaults: count −1, interval 120 s, nonce 30 s, ping 120 s.
    fn default() -> Self {
        Self {
            reconnect_count: None,
            reconnect_interval: Duration::from_secs(120),
            reconnect_nonce: Duration::from_secs(30),
            ping_interval: Duration::from_secs(120),
        }
    }
}

/// A partial [`ClientConfig`] as sent by the server: each key may be missing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientConfigPatch {
    /// `ReconnectCount`, raw (negative = unlimited).
    pub reconnect_count: Option<i64>,
    /// `ReconnectInterval` in seconds.
    pub reconnect_interval: Option<i64>,
    /// `ReconnectNonce` in seconds.
    pub reconnect_nonce: Option<i64>,
    /// `PingInterval` in seconds.
    pub ping_interval: Option<i64>,
}

/// Why a pong / `ClientConfig` payload was not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigPayloadError {
    /// Not JSON.
    #[error("client config payload is not JSON: {0}")]
    NotJson(String),
    /// JSON, but not an object.
    #[error("client config payload is not a JSON object")]
    NotObject,
}

impl ClientConfigPatch {
    /// Reads the PascalCase keys (`PingInterval`, `ReconnectCount`, `ReconnectInterval`,
    /// `ReconnectNonce`) from a JSON object. A key that is absent, `null` or not an integer
    /// is left `None`. Other keys are ignored.
    pub fn from_json_value(v: &serde_json::Value) -> Result<Self, ConfigPayloadError> {
        let obj = v.as_object().ok_or(ConfigPayloadError::NotObject)?;
        let get = |k: &str| obj.get(k).and_then(serde_json::Value::as_i64);
        Ok(Self {
            reconnect_count: get("ReconnectCount"),
            reconnect_interval: get("ReconnectInterval"),
            reconnect_nonce: get("ReconnectNonce"),
            ping_interval: get("PingInterval"),
        })
    }

    /// Whether no key was present.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Parses a pong payload (§2.6). An empty payload means "no change" and yields an empty
/// patch; otherwise it must be a UTF-8 JSON object.
pub fn parse_pong_config(payload: &[u8]) -> Result<ClientConfigPatch, ConfigPayloadError> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(ClientConfigPatch::default());
    }
    let v: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| ConfigPayloadError::NotJson(e.to_string()))?;
    ClientConfigPatch::from_json_value(&v)
}

/// Smallest `PingInterval` honoured; a smaller one from the server is raised to this.
pub const MIN_PING_INTERVAL: Duration = Duration::from_secs(1);
/// Largest `PingInterval` honoured; a larger one from the server is lowered to this.
pub const MAX_PING_INTERVAL: Duration = Duration::from_secs(600);
/// Smallest `ReconnectInterval` honoured (it caps the backoff; zero would mean a tight loop).
pub const MIN_RECONNECT_INTERVAL: Duration = Duration::from_secs(1);
/// Largest `ReconnectInterval` honoured.
pub const MAX_RECONNECT_INTERVAL: Duration = Duration::from_secs(3600);
/// Largest `ReconnectNonce` honoured (the random wait before the first retry).
pub const MAX_RECONNECT_NONCE: Duration = Duration::from_secs(600);
/// Largest `ReconnectCount` honoured; larger counts are as good as unlimited.
pub const MAX_RECONNECT_COUNT: u32 = 1_000_000;

impl ClientConfig {
    /// Applies a patch, keeping the previous value of every key that is absent or negative,
    /// and clamping the rest to sane ranges: `PingInterval` to
    /// [`MIN_PING_INTERVAL`]..=[`MAX_PING_INTERVAL`] (≤ 0 is ignored: it would make the client
    /// ping in a tight loop), `ReconnectInterval` to
    /// [`MIN_RECONNECT_INTERVAL`]..=[`MAX_RECONNECT_INTERVAL`], `ReconnectNonce` to
    /// 0..=[`MAX_RECONNECT_NONCE`], `ReconnectCount` to 0..=[`MAX_RECONNECT_COUNT`]
    /// (< 0 means unlimited).
    pub fn apply(&mut self, patch: &ClientConfigPatch) {
        if let Some(c) = patch.reconnect_count {
            self.reconnect_count = if c < 0 {
                None
            } else {
                Some(
                    u32::try_from(c)
                        .unwrap_or(u32::MAX)
                        .min(MAX_RECONNECT_COUNT),
                )
            };
        }
        if let Some(s) = patch.reconnect_interval.and_then(secs) {
            self.reconnect_interval = s;
        }
        if let Some(s) = patch.reconnect_nonce.and_then(secs) {
            self.reconnect_nonce = s;
        }
        if let Some(s) = patch.ping_interval.and_then(secs).filter(|d| !d.is_zero()) {
            self.ping_interval = s;
        }
        *self = self.clamped();
    }

    /// A copy with every value inside its sane range (see [`ClientConfig::apply`]).
    #[must_use]
    pub fn clamped(self) -> Self {
        Self {
            reconnect_count: self.reconnect_count.map(|c| c.min(MAX_RECONNECT_COUNT)),
            reconnect_interval: self
                .reconnect_interval
                .clamp(MIN_RECONNECT_INTERVAL, MAX_RECONNECT_INTERVAL),
            reconnect_nonce: self.reconnect_nonce.min(MAX_RECONNECT_NONCE),
            ping_interval: self
                .ping_interval
                .clamp(MIN_PING_INTERVAL, MAX_PING_INTERVAL),
        }
    }

    /// Returns a copy with `patch` applied.
    #[must_use]
    pub fn patched(mut self, patch: &ClientConfigPatch) -> Self {
        self.apply(patch);
        self
    }
}

fn secs(v: i64) -> Option<Duration> {
    u64::try_from(v).ok().map(Duration::from_secs)
}

// ---------------------------------------------------------------------------------------------
// Data frame headers
// ---------------------------------------------------------------------------------------------

/// The headers of a data frame that drive reassembly and logging (§2.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataHeaders<'a> {
    /// `message_id`; required only when the message is fragmented.
    pub message_id: Option<&'a str>,
    /// `sum`: number of fragments (≥ 1). Absent → 1.
    pub sum: u32,
    /// `seq`: 0-based fragment index (< `sum`). Absent → 0.
    pub seq: u32,
    /// `trace_id`, for logs.
    pub trace_id: Option<&'a str>,
}

/// Why a data frame's `sum`/`seq`/`message_id` headers are unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DataHeaderError {
    /// `sum` or `seq` is not a decimal u32.
    #[error("data frame header {0} is not a non-negative integer")]
    NotANumber(&'static str),
    /// `sum` is 0.
    #[error("data frame has sum=0")]
    ZeroSum,
    /// `seq` is not in `[0, sum)`.
    #[error("data frame has seq={seq} outside [0, {sum})")]
    SeqOutOfRange {
        /// The `seq` header.
        seq: u32,
        /// The `sum` header.
        sum: u32,
    },
    /// A fragmented message without a `message_id` cannot be reassembled.
    #[error("fragmented data frame has no message_id")]
    MissingMessageId,
}

impl<'a> DataHeaders<'a> {
    /// Reads and validates the reassembly headers of `frame`. Missing `sum`/`seq` mean an
    /// unsplit message (`sum=1`, `seq=0`), as the platform sends for small messages.
    pub fn from_frame(frame: &'a Frame) -> Result<Self, DataHeaderError> {
        let num = |key: &'static str, default: u32| -> Result<u32, DataHeaderError> {
            match frame.header(key) {
                None => Ok(default),
                Some(v) => v
                    .trim()
                    .parse::<u32>()
                    .map_err(|_| DataHeaderError::NotANumber(key)),
            }
        };
        let sum = num(HEADER_SUM, 1)?;
        let seq = num(HEADER_SEQ, 0)?;
        if sum == 0 {
            return Err(DataHeaderError::ZeroSum);
        }
        if seq >= sum {
            return Err(DataHeaderError::SeqOutOfRange { seq, sum });
        }
        let message_id = frame.header(HEADER_MESSAGE_ID);
        if sum > 1 && message_id.is_none() {
            return Err(DataHeaderError::MissingMessageId);
        }
        Ok(Self {
            message_id,
            sum,
            seq,
            trace_id: frame.header(HEADER_TRACE_ID),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// ACK
// ---------------------------------------------------------------------------------------------

/// The outcome reported in an ACK's JSON payload (§2.8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckResponse {
    /// Handled, nothing to return: `{"code":200}`.
    Ok,
    /// Handled with a result (card / URL-preview callbacks): `{"code":200,"data":"<b64>"}`,
    /// where the bytes are the JSON-serialized handler result (e.g. `{"toast":{…}}`); they are
    /// base64-encoded (standard alphabet, padded) here.
    OkWithData(Vec<u8>),
    /// The handler failed: `{"code":500}`, which asks the platform to re-push.
    Failed,
}

#[derive(serde::Serialize)]
struct AckPayload<'a> {
    code: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a str>,
}

impl AckResponse {
    /// The compact JSON payload of the ACK.
    pub fn to_payload(&self) -> Vec<u8> {
        let b64;
        let payload = match self {
            // The common answers need no serializer (`ack_payloads` checks they match it).
            Self::Ok => return br#"{"code":200}"#.to_vec(),
            Self::Failed => return br#"{"code":500}"#.to_vec(),
            Self::OkWithData(json) => {
                b64 = base64::engine::general_purpose::STANDARD.encode(json);
                AckPayload {
                    code: 200,
                    data: Some(&b64),
                }
            }
        };
        // Serializing a struct of a u16 and a &str cannot fail.
        serde_json::to_vec(&payload).unwrap_or_else(|_| b"{\"code\":500}".to_vec())
    }
}

/// Builds the ACK for a data frame (§2.8): the received frame re-encoded with every field
/// kept (`SeqID`, `LogID`, `service`, `method`, headers in order, fields 6/7/9), header
/// `biz_rt` set to the handler time in whole milliseconds, and the payload replaced by the
/// response JSON. For a fragmented message pass the fragment that completed it.
pub fn build_ack(received: &Frame, handler_time: Duration, response: &AckResponse) -> Frame {
    into_ack(received.clone(), handler_time, response)
}

/// [`build_ack`] for a frame the caller no longer needs: the received frame becomes its own
/// ACK, so its headers are not copied (the long connection's path: one allocation per header
/// fewer per event).
pub fn into_ack(mut received: Frame, handler_time: Duration, response: &AckResponse) -> Frame {
    received.set_header(HEADER_BIZ_RT, handler_time.as_millis().to_string());
    received.payload = Some(response.to_payload());
    received
}

// ---------------------------------------------------------------------------------------------
// Required-field presence scan
// ---------------------------------------------------------------------------------------------

const WIRE_VARINT: u64 = 0;
const WIRE_I64: u64 = 1;
const WIRE_LEN: u64 = 2;
const WIRE_I32: u64 = 5;

fn malformed(what: &str) -> FrameError {
    FrameError::Malformed(what.to_owned())
}

/// Reads a base-128 varint at `*pos`, advancing it. Rejects overlong (> 10 byte) varints.
fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, FrameError> {
    let mut value: u64 = 0;
    for i in 0..10 {
        let byte = *buf.get(*pos).ok_or_else(|| malformed("truncated varint"))?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(malformed("varint longer than 10 bytes"))
}

/// Walks the fields of one message, calling `seen(field_number, wire_type, value_bytes)` for
/// each; `value_bytes` is the payload of length-delimited fields and empty otherwise.
fn walk_fields<'a>(
    buf: &'a [u8],
    mut seen: impl FnMut(u64, u64, &'a [u8]) -> Result<(), FrameError>,
) -> Result<(), FrameError> {
    let mut pos = 0;
    while pos < buf.len() {
        let key = read_varint(buf, &mut pos)?;
        let field = key >> 3;
        let wire = key & 7;
        if field == 0 {
            return Err(malformed("field number 0"));
        }
        let mut value: &[u8] = &[];
        match wire {
            WIRE_VARINT => {
                read_varint(buf, &mut pos)?;
            }
            WIRE_I64 | WIRE_I32 => {
                let n = if wire == WIRE_I64 { 8 } else { 4 };
                pos = pos
                    .checked_add(n)
                    .filter(|&end| end <= buf.len())
                    .ok_or_else(|| malformed("truncated fixed-width field"))?;
            }
            WIRE_LEN => {
                let len = usize::try_from(read_varint(buf, &mut pos)?)
                    .map_err(|_| malformed("length does not fit in memory"))?;
                let end = pos
                    .checked_add(len)
                    .filter(|&end| end <= buf.len())
                    .ok_or_else(|| malformed("truncated length-delimited field"))?;
                value = &buf[pos..end];
                pos = end;
            }
            _ => {
                return Err(malformed(
                    "unsupported wire type (groups are not used by pbbp2)",
                ))
            }
        }
        seen(field, wire, value)?;
    }
    Ok(())
}

/// Checks that fields 1–4 are present in the frame and that each header has key and value.
/// Wire-type mismatches and bad UTF-8 are left to prost, which reports them.
fn check_required(bytes: &[u8]) -> Result<(), FrameError> {
    let mut present = [false; 4];
    let mut header_index = 0usize;
    walk_fields(bytes, |field, wire, value| {
        if let Some(seen) = usize::try_from(field)
            .ok()
            .and_then(|f| f.checked_sub(1))
            .and_then(|i| present.get_mut(i))
        {
            *seen = true;
        } else if field == 5 && wire == WIRE_LEN {
            let mut kv = [false; 2];
            walk_fields(value, |f, _, _| {
                if let Some(seen) = usize::try_from(f)
                    .ok()
                    .and_then(|f| f.checked_sub(1))
                    .and_then(|i| kv.get_mut(i))
                {
                    *seen = true;
                }
                Ok(())
            })?;
            for (i, name) in ["key", "value"].into_iter().enumerate() {
                if !kv[i] {
                    return Err(FrameError::MissingHeaderField {
                        index: header_index,
                        field: name,
                    });
                }
            }
            header_index += 1;
        }
        Ok(())
    })?;
    for (i, name) in ["SeqID", "LogID", "service", "method"]
        .into_iter()
        .enumerate()
    {
        if !present[i] {
            return Err(FrameError::MissingField(name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    const PING_42: &str = "08001000182a20002a0c0a0474797065120470696e67";
    const PING_33554678: &str = "0800100018f681801020002a0c0a0474797065120470696e67";
    const PONG_CONFIG: &str = "0800100018f681801020002a0c0a04747970651204706f6e6742547b2250696e67496e74657276616c223a3132302c225265636f6e6e656374436f756e74223a2d312c225265636f6e6e656374496e74657276616c223a3132302c225265636f6e6e6563744e6f6e6365223a33307d";
    const PY_ACK: &str = "080b1016182a20012a0d0a047479706512056576656e742a100a0a6d6573736167655f696412026d312a080a0373756d1201312a080a037365711201302a0e0a0874726163655f6964120274312a0b0a0662697a5f7274120131420d7b22636f6465223a203230307d";
    const NODE_ACK: &str = "080b1016182a20012a0d0a047479706512056576656e742a100a0a6d6573736167655f696412026d312a080a0373756d1201312a080a037365711201302a0e0a0874726163655f6964120274312a0c0a0662697a5f727412022d31420c7b22636f6465223a3230307d";

    fn event_frame() -> Frame {
        Frame {
            seq_id: 11,
            log_id: 22,
            service: 42,
            method: METHOD_DATA,
            headers: vec![
                Header::new("type", "event"),
                Header::new("message_id", "m1"),
                Header::new("sum", "1"),
                Header::new("seq", "0"),
                Header::new("trace_id", "t1"),
            ],
            payload: Some(br#"{"schema":"2.0"}"#.to_vec()),
            ..Frame::default()
        }
    }

    #[test]
    fn ping_matches_official_encoder() {
        assert_eq!(encode_ping(42), unhex(PING_42));
        assert_eq!(encode_ping(33_554_678), unhex(PING_33554678));
        let f = Frame::decode_strict(&unhex(PING_42)).unwrap();
        assert_eq!(f.kind(), FrameKind::Ping);
        assert_eq!(f.payload, None);
    }

    #[test]
    fn pong_with_config_decodes_and_applies() {
        let f = Frame::decode_strict(&unhex(PONG_CONFIG)).unwrap();
        assert_eq!(f.kind(), FrameKind::Pong);
        assert_eq!(f.service, 33_554_678);
        let patch = parse_pong_config(f.payload_bytes()).unwrap();
        assert_eq!(
            patch,
            ClientConfigPatch {
                reconnect_count: Some(-1),
                reconnect_interval: Some(120),
                reconnect_nonce: Some(30),
                ping_interval: Some(120),
            }
        );
        let mut cfg = ClientConfig {
            reconnect_count: Some(3),
            reconnect_interval: Duration::from_secs(5),
            reconnect_nonce: Duration::from_secs(1),
            ping_interval: Duration::from_secs(7),
        };
        cfg.apply(&patch);
        assert_eq!(cfg, ClientConfig::default());
        // Re-encoding a received frame is byte-identical.
        assert_eq!(f.to_bytes(), unhex(PONG_CONFIG));
    }

    #[test]
    fn pong_config_keeps_previous_values_for_missing_or_bad_keys() {
        let mut cfg = ClientConfig::default();
        cfg.apply(&parse_pong_config(br#"{"PingInterval":30,"ReconnectNonce":"x"}"#).unwrap());
        assert_eq!(cfg.ping_interval, Duration::from_secs(30));
        assert_eq!(cfg.reconnect_nonce, Duration::from_secs(30));
        assert_eq!(cfg.reconnect_interval, Duration::from_secs(120));
        assert_eq!(cfg.reconnect_count, None);

        cfg.apply(
            &parse_pong_config(br#"{"PingInterval":0,"ReconnectInterval":-5,"ReconnectCount":4}"#)
                .unwrap(),
        );
        assert_eq!(cfg.ping_interval, Duration::from_secs(30));
        assert_eq!(cfg.reconnect_interval, Duration::from_secs(120));
        assert_eq!(cfg.reconnect_count, Some(4));

        assert!(parse_pong_config(b"").unwrap().is_empty());
        assert!(parse_pong_config(b"{}").unwrap().is_empty());
        assert_eq!(
            parse_pong_config(b"[1]"),
            Err(ConfigPayloadError::NotObject)
        );
        assert!(matches!(
            parse_pong_config(b"{nope"),
            Err(ConfigPayloadError::NotJson(_))
        ));
    }

    #[test]
    fn python_ack_vector_decodes_to_the_expected_frame() {
        let ack = Frame::decode_strict(&unhex(PY_ACK)).unwrap();
        let mut expected = event_frame();
        expected.headers.push(Header::new("biz_rt", "1"));
        expected.payload = Some(br#"{"code": 200}"#.to_vec());
        assert_eq!(ack, expected);
        assert_eq!(ack.to_bytes(), unhex(PY_ACK));
        // Node's ACK differs only in biz_rt and JSON spacing.
        let node = Frame::decode_strict(&unhex(NODE_ACK)).unwrap();
        assert_eq!(node.header("biz_rt"), Some("-1"));
        assert_eq!(node.headers.len(), ack.headers.len());
    }

    #[test]
    fn our_ack_matches_python_ack_up_to_json_spacing() {
        let ack = build_ack(&event_frame(), Duration::from_millis(1), &AckResponse::Ok);
        let mut py = Frame::decode_strict(&unhex(PY_ACK)).unwrap();
        py.payload = Some(br#"{"code":200}"#.to_vec());
        assert_eq!(ack.to_bytes(), py.to_bytes());
        // And the bytes with Python's own payload are identical.
        let mut with_py_payload = ack.clone();
        with_py_payload.payload = Some(br#"{"code": 200}"#.to_vec());
        assert_eq!(with_py_payload.to_bytes(), unhex(PY_ACK));
    }

    #[test]
    fn ack_payloads() {
        assert_eq!(AckResponse::Ok.to_payload(), br#"{"code":200}"#);
        assert_eq!(AckResponse::Failed.to_payload(), br#"{"code":500}"#);
        // The literals are what the serializer writes.
        for (r, code) in [(AckResponse::Ok, 200), (AckResponse::Failed, 500)] {
            let serialized = serde_json::to_vec(&AckPayload { code, data: None }).unwrap();
            assert_eq!(r.to_payload(), serialized);
        }
        let data = br#"{"toast":{"type":"info","content":"ok"}}"#.to_vec();
        assert_eq!(
            AckResponse::OkWithData(data).to_payload(),
            br#"{"code":200,"data":"eyJ0b2FzdCI6eyJ0eXBlIjoiaW5mbyIsImNvbnRlbnQiOiJvayJ9fQ=="}"#
        );
        assert_eq!(
            AckResponse::OkWithData(b"{}".to_vec()).to_payload(),
            br#"{"code":200,"data":"e30="}"#
        );
    }

    #[test]
    fn ack_preserves_optional_fields_and_replaces_existing_biz_rt() {
        let mut f = event_frame();
        f.payload_encoding = Some(String::new());
        f.payload_type = Some("json".into());
        f.log_id_new = Some("lid".into());
        f.headers.push(Header::new("biz_rt", "99"));
        let ack = build_ack(&f, Duration::from_millis(1500), &AckResponse::Failed);
        assert_eq!(ack.payload_encoding.as_deref(), Some(""));
        assert_eq!(ack.payload_type.as_deref(), Some("json"));
        assert_eq!(ack.log_id_new.as_deref(), Some("lid"));
        assert_eq!(ack.headers.iter().filter(|h| h.key == "biz_rt").count(), 1);
        assert_eq!(ack.header("biz_rt"), Some("1500"));
        let back = Frame::decode_strict(&ack.to_bytes()).unwrap();
        assert_eq!(back, ack);
    }

    #[test]
    fn the_received_frame_becomes_its_ack_with_the_python_ack_bytes() {
        // The long connection's path: the frame it read (payload and all) is turned into its
        // own ACK. The event's payload must not survive, and the bytes are the Python SDK's.
        let mut py = Frame::decode_strict(&unhex(PY_ACK)).unwrap();
        py.payload = Some(br#"{"code":200}"#.to_vec());
        let ack = into_ack(event_frame(), Duration::from_millis(1), &AckResponse::Ok);
        assert_eq!(ack.to_bytes(), py.to_bytes());
        // A frame that already had a biz_rt keeps one, with the new value.
        let mut f = event_frame();
        f.headers.push(Header::new("biz_rt", "99"));
        let ack = into_ack(f, Duration::from_millis(7), &AckResponse::Failed);
        assert_eq!(ack.headers.iter().filter(|h| h.key == "biz_rt").count(), 1);
        assert_eq!(ack.header("biz_rt"), Some("7"));
        assert_eq!(ack.payload_bytes(), br#"{"code":500}"#);
    }

    #[test]
    fn zero_required_fields_are_encoded() {
        // A proto3-style encoder would emit nothing for an all-zero frame.
        let bytes = Frame::default().to_bytes();
        assert_eq!(bytes, unhex("0800100018002000"));
        assert_eq!(Frame::decode_strict(&bytes).unwrap(), Frame::default());
    }

    #[test]
    fn missing_required_fields_are_rejected() {
        // Ping without field 1 (SeqID).
        let no_seq = unhex("1000182a20002a0c0a0474797065120470696e67");
        assert_eq!(
            Frame::decode_strict(&no_seq),
            Err(FrameError::MissingField("SeqID"))
        );
        let no_method = unhex("08001000182a2a0c0a0474797065120470696e67");
        assert_eq!(
            Frame::decode_strict(&no_method),
            Err(FrameError::MissingField("method"))
        );
        assert_eq!(
            Frame::decode_strict(&[]),
            Err(FrameError::MissingField("SeqID"))
        );
        // Header without value: 2a 06 0a 04 "type".
        let no_value = unhex("08001000182a20002a060a0474797065");
        assert_eq!(
            Frame::decode_strict(&no_value),
            Err(FrameError::MissingHeaderField {
                index: 0,
                field: "value"
            })
        );
        // prost alone would accept it.
        assert!(Frame::decode(&no_seq[..]).is_ok());
    }

    #[test]
    fn malformed_inputs_are_errors_not_panics() {
        for bad in [
            &b"\x08"[..],
            b"\x08\x80",
            b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
            b"\x2a\xff\xff\xff\xff\x0f",
            b"\x0b\x0c",
            b"\x00",
            b"\x08\x00\x10\x00\x18\x00\x20\x00\x42\x05ab",
            // field 1 with wrong wire type (length-delimited)
            b"\x0a\x00\x10\x00\x18\x00\x20\x00",
            // invalid UTF-8 in a header key
            b"\x08\x00\x10\x00\x18\x00\x20\x00\x2a\x06\x0a\x01\xff\x12\x01a",
        ] {
            assert!(Frame::decode_strict(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn empty_strings_in_optional_fields_are_accepted() {
        // Go always writes fields 6, 7, 9 as empty strings.
        let bytes = unhex("08011002180320012a0c0a0474797065120470696e67320042003a004a00");
        let f = Frame::decode_strict(&bytes).unwrap();
        assert_eq!(f.payload_encoding.as_deref(), Some(""));
        assert_eq!(f.payload_type.as_deref(), Some(""));
        assert_eq!(f.log_id_new.as_deref(), Some(""));
        assert_eq!(f.payload.as_deref(), Some(&b""[..]));
        // Re-encoding keeps every present field (field order is canonical: 6, 7, 8, 9).
        let re = Frame::decode_strict(&f.to_bytes()).unwrap();
        assert_eq!(re, f);
    }

    #[test]
    fn kinds() {
        let mut f = event_frame();
        assert_eq!(f.kind(), FrameKind::Event);
        f.set_header("type", "card");
        assert_eq!(f.kind(), FrameKind::Card);
        f.method = METHOD_CONTROL;
        assert_eq!(f.kind(), FrameKind::Unknown);
        f.set_header("type", "pong");
        assert_eq!(f.kind(), FrameKind::Pong);
        f.headers.clear();
        assert_eq!(f.kind(), FrameKind::Unknown);
    }

    #[test]
    fn data_headers() {
        let f = event_frame();
        let h = DataHeaders::from_frame(&f).unwrap();
        assert_eq!(
            (h.message_id, h.sum, h.seq, h.trace_id),
            (Some("m1"), 1, 0, Some("t1"))
        );

        let mut g = f.clone();
        g.headers.retain(|h| h.key == "type");
        let h = DataHeaders::from_frame(&g).unwrap();
        assert_eq!((h.message_id, h.sum, h.seq), (None, 1, 0));

        let mut g = f.clone();
        g.set_header("sum", "2");
        g.set_header("seq", "2");
        assert_eq!(
            DataHeaders::from_frame(&g),
            Err(DataHeaderError::SeqOutOfRange { seq: 2, sum: 2 })
        );
        g.set_header("sum", "0");
        assert_eq!(DataHeaders::from_frame(&g), Err(DataHeaderError::ZeroSum));
        g.set_header("sum", "-1");
        assert_eq!(
            DataHeaders::from_frame(&g),
            Err(DataHeaderError::NotANumber("sum"))
        );
        g.set_header("sum", "3");
        g.set_header("seq", "1");
        g.headers.retain(|h| h.key != "message_id");
        assert_eq!(
            DataHeaders::from_frame(&g),
            Err(DataHeaderError::MissingMessageId)
        );
    }

    #[test]
    fn conn_params_from_url() {
        let p = ConnParams::from_url(
            "wss://msg-frontier.feishu.cn/ws/v2?fpid=1&aid=2&device_id=dev9&access_key=k&service_id=33554678&ticket=t",
        )
        .unwrap();
        assert_eq!(p.device_id.as_deref(), Some("dev9"));
        assert_eq!(p.service_id, 33_554_678);
        assert_eq!(
            ConnParams::from_url("ws://127.0.0.1:1/ws?device_id=d"),
            Err(ConnUrlError::MissingServiceId)
        );
        assert_eq!(
            ConnParams::from_url("ws://127.0.0.1:1/ws?service_id=abc"),
            Err(ConnUrlError::InvalidServiceId)
        );
        assert!(matches!(
            ConnParams::from_url("not a url"),
            Err(ConnUrlError::InvalidUrl(_))
        ));
    }

    #[test]
    fn debug_does_not_print_payload() {
        let s = format!("{:?}", event_frame());
        assert!(!s.contains("schema"), "{s}");
        assert!(s.contains("payload_len"));
    }

    mod props {
        use super::super::*;
        use proptest::collection::vec;
        use proptest::option;
        use proptest::prelude::*;

        fn arb_header() -> impl Strategy<Value = Header> {
            (".{0,12}", ".{0,12}").prop_map(|(key, value)| Header { key, value })
        }

        prop_compose! {
            fn arb_frame()(
                seq_id in any::<u64>(),
                log_id in any::<u64>(),
                service in any::<i32>(),
                method in any::<i32>(),
                headers in vec(arb_header(), 0..6),
                payload_encoding in option::of(".{0,8}"),
                payload_type in option::of(".{0,8}"),
                payload in option::of(vec(any::<u8>(), 0..64)),
                log_id_new in option::of(".{0,8}"),
            ) -> Frame {
                Frame {
                    seq_id, log_id, service, method, headers,
                    payload_encoding, payload_type, payload, log_id_new,
                }
            }
        }

        proptest! {
            #[test]
            fn round_trip(f in arb_frame()) {
                let bytes = f.to_bytes();
                let back = Frame::decode_strict(&bytes).unwrap();
                prop_assert_eq!(&back, &f);
                prop_assert_eq!(back.to_bytes(), bytes);
            }

            #[test]
            fn ack_round_trip(f in arb_frame(), ms in any::<u32>(), data in option::of(vec(any::<u8>(), 0..32))) {
                let resp = data.map_or(AckResponse::Ok, AckResponse::OkWithData);
                let ack = build_ack(&f, Duration::from_millis(u64::from(ms)), &resp);
                let back = Frame::decode_strict(&ack.to_bytes()).unwrap();
                prop_assert_eq!(back.seq_id, f.seq_id);
                prop_assert_eq!(back.log_id, f.log_id);
                prop_assert_eq!(&back.payload_type, &f.payload_type);
                let rt = ms.to_string();
                prop_assert_eq!(back.header(HEADER_BIZ_RT), Some(rt.as_str()));
                prop_assert_eq!(back.payload, Some(resp.to_payload()));
            }

            #[test]
            fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..256)) {
                if let Ok(f) = Frame::decode_strict(&bytes) {
                    // Whatever decodes strictly re-encodes to something that decodes equal.
                    prop_assert_eq!(Frame::decode_strict(&f.to_bytes()).unwrap(), f);
                }
            }

            #[test]
            fn mutated_frames_never_panic(f in arb_frame(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
                let mut bytes = f.to_bytes();
                let i = pos.index(bytes.len());
                bytes[i] = byte;
                let _ = Frame::decode_strict(&bytes);
                let _ = Frame::decode_strict(&bytes[..i]);
            }

            #[test]
            fn pong_config_never_panics(s in ".{0,64}") {
                let _ = parse_pong_config(s.as_bytes());
            }

            #[test]
            fn applied_config_is_always_in_range(
                count in option::of(any::<i64>()),
                interval in option::of(any::<i64>()),
                nonce in option::of(any::<i64>()),
                ping in option::of(any::<i64>()),
                start_ping in any::<u64>(),
                start_interval in any::<u64>(),
            ) {
                let mut cfg = ClientConfig {
                    ping_interval: Duration::from_secs(start_ping),
                    reconnect_interval: Duration::from_secs(start_interval),
                    ..ClientConfig::default()
                };
                let patch = ClientConfigPatch {
                    reconnect_count: count,
                    reconnect_interval: interval,
                    reconnect_nonce: nonce,
                    ping_interval: ping,
                };
                cfg.apply(&patch);
                prop_assert!((MIN_PING_INTERVAL..=MAX_PING_INTERVAL).contains(&cfg.ping_interval));
                prop_assert!((MIN_RECONNECT_INTERVAL..=MAX_RECONNECT_INTERVAL).contains(&cfg.reconnect_interval));
                prop_assert!(cfg.reconnect_nonce <= MAX_RECONNECT_NONCE);
                prop_assert!(cfg.reconnect_count.is_none_or(|c| c <= MAX_RECONNECT_COUNT));
                prop_assert_eq!(cfg.reconnect_count.is_none(), count.is_none_or(|c| c < 0));
                // The liveness deadline the session computes from it cannot overflow.
                let _ = tokio::time::Instant::now() + cfg.ping_interval * 2 + Duration::from_secs(5);
                // In-range values are taken as they are.
                if let Some(p) = ping.filter(|p| (1..=600).contains(p)) {
                    prop_assert_eq!(cfg.ping_interval, Duration::from_secs(p.unsigned_abs()));
                }
            }
        }
    }
}
