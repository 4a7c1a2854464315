//! Fuzz target: one HTTP callback body through the pure request path.
//! The input is used three ways so the fuzzer reaches code behind the signature and the
//! encryption: as an unsigned raw body, as a correctly signed raw body, and as the plaintext
//! inside a correctly signed `{"encrypt": …}` body. Must never panic; every rejection must be
//! a 4xx.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use lark_service::callbacks::{
    parse_callback, parse_event_payload, signature_hex, CallbackConfig, EventCipher,
    SignatureHeaders,
};
use libfuzzer_sys::fuzz_target;

const KEY: &str = "fuzz-encrypt-key";
const TS: &str = "1700000000";
const NONCE: &str = "n0nce";

fn check(body: &[u8], sig: Option<&str>, config: &CallbackConfig) {
    let headers = SignatureHeaders {
        timestamp: Some(TS),
        nonce: Some(NONCE),
        signature: sig,
    };
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_001);
    if let Err(e) = parse_callback(body, &headers, config, now) {
        assert!((400..500).contains(&e.status()), "{e:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let keyed = CallbackConfig::new(Some("token"), Some(KEY));
    let token_only = CallbackConfig::new(Some("token"), None);

    check(data, None, &keyed);
    check(data, None, &token_only);
    let sig = signature_hex(TS, NONCE, KEY, data);
    check(data, Some(&sig), &keyed);

    let enc = EventCipher::new(KEY).encrypt_with_iv(data, [9; 16]);
    let wrapped = format!("{{\"encrypt\":\"{enc}\"}}");
    let sig = signature_hex(TS, NONCE, KEY, wrapped.as_bytes());
    check(wrapped.as_bytes(), Some(&sig), &keyed);

    let _ = parse_event_payload(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = EventCipher::new(KEY).decrypt(s);
    }
});
