//! HTTP callback mode ("send events to developer server"), protocol doc §3.
//!
//! Owns: the pure request-processing core the HTTP routes (`http::callbacks`) call —
//! [`verify`] (signature, timestamp window, verification token), [`decrypt`]
//! (AES-256-CBC of the `encrypt` field) and [`body`] (size limit, challenge, event
//! envelopes, card actions, and the HTTP status of every rejection).
//!
//! Must not: do I/O or read the clock, or depend on the event dispatcher (`events` depends on
//! this module; the axum shell that hands events to the dispatcher is `http::callbacks`).

pub mod body;
pub mod decrypt;
mod head;
pub mod verify;

pub use body::{
    challenge_response, parse_callback, parse_event_bytes, parse_event_payload, BodyError,
    Callback, CallbackConfig, CardAction, EventEnvelope, Schema, CARD_ACTION_TRIGGER,
    DEFAULT_MAX_BODY_BYTES,
};
pub use decrypt::{DecryptError, EventCipher};
pub use verify::{
    check_timestamp, signature_hex, verify_request, verify_signature, verify_token,
    SignatureHeaders, VerifyError, DEFAULT_TIMESTAMP_WINDOW, HEADER_NONCE, HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
};
