//! Request authentication of HTTP callbacks (protocol doc §3.4, §3.5).
//!
//! Owns: the `X-Lark-Signature` recipe (lowercase hex of SHA-256 over timestamp ‖ nonce ‖
//! Encrypt Key ‖ raw body — plain SHA-256, not HMAC), its constant-time comparison, the
//! request-timestamp window check against an injected `now`, and the constant-time
//! verification-token comparison.
//!
//! Must not: do I/O, read the clock, or parse the body. The signature is computed over the
//! exact bytes received, before anything interprets them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Request header carrying the signing timestamp (Unix seconds, decimal).
pub const HEADER_TIMESTAMP: &str = "X-Lark-Request-Timestamp";
/// Request header carrying the signing nonce.
pub const HEADER_NONCE: &str = "X-Lark-Request-Nonce";
/// Request header carrying the signature (lowercase hex SHA-256).
pub const HEADER_SIGNATURE: &str = "X-Lark-Signature";

/// Default accepted distance between the request timestamp and now.
pub const DEFAULT_TIMESTAMP_WINDOW: Duration = Duration::from_secs(300);

/// The three signature headers of a request, as received (absent ones `None`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SignatureHeaders<'a> {
    /// `X-Lark-Request-Timestamp`.
    pub timestamp: Option<&'a str>,
    /// `X-Lark-Request-Nonce`.
    pub nonce: Option<&'a str>,
    /// `X-Lark-Signature`.
    pub signature: Option<&'a str>,
}

impl<'a> SignatureHeaders<'a> {
    /// Reads the three headers through a (case-insensitive) lookup function.
    pub fn from_lookup(header: impl Fn(&str) -> Option<&'a str>) -> Self {
        Self {
            timestamp: header(HEADER_TIMESTAMP),
            nonce: header(HEADER_NONCE),
            signature: header(HEADER_SIGNATURE),
        }
    }
}

/// Why a request failed authentication.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A signature header is absent.
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    /// The signature does not match the body.
    #[error("signature mismatch")]
    BadSignature,
    /// The timestamp header is not a decimal integer.
    #[error("request timestamp is not an integer")]
    InvalidTimestamp,
    /// The timestamp is farther from now than the window allows (replay or clock skew).
    #[error("request timestamp is {skew_secs} s away from now, outside the allowed window")]
    StaleTimestamp {
        /// Absolute difference in seconds.
        skew_secs: u64,
    },
    /// The verification token does not match the configured one.
    #[error("verification token mismatch")]
    BadToken,
}

/// The raw 32-byte signature: SHA-256(timestamp ‖ nonce ‖ encrypt_key ‖ body).
pub fn compute_signature(timestamp: &str, nonce: &str, encrypt_key: &str, body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(timestamp.as_bytes());
    h.update(nonce.as_bytes());
    h.update(encrypt_key.as_bytes());
    h.update(body);
    h.finalize().into()
}

/// The `X-Lark-Signature` value (lowercase hex) for a request; for tests and the sandbox.
pub fn signature_hex(timestamp: &str, nonce: &str, encrypt_key: &str, body: &[u8]) -> String {
    hex::encode(compute_signature(timestamp, nonce, encrypt_key, body))
}

/// Checks `signature` (hex, either case) against the body in constant time.
pub fn verify_signature(
    timestamp: &str,
    nonce: &str,
    encrypt_key: &str,
    body: &[u8],
    signature: &str,
) -> Result<(), VerifyError> {
    let expected = compute_signature(timestamp, nonce, encrypt_key, body);
    let mut given = [0u8; 32];
    hex::decode_to_slice(signature.trim(), &mut given).map_err(|_| VerifyError::BadSignature)?;
    if bool::from(expected.ct_eq(&given)) {
        Ok(())
    } else {
        Err(VerifyError::BadSignature)
    }
}

/// Checks that `timestamp` (Unix seconds) is within `window` of `now`, in either direction.
pub fn check_timestamp(
    timestamp: &str,
    now: SystemTime,
    window: Duration,
) -> Result<(), VerifyError> {
    let ts: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| VerifyError::InvalidTimestamp)?;
    let now_secs: i128 = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => i128::from(d.as_secs()),
        Err(e) => -i128::from(e.duration().as_secs()),
    };
    let skew = (now_secs - i128::from(ts)).unsigned_abs();
    let skew_secs = u64::try_from(skew).unwrap_or(u64::MAX);
    if skew_secs > window.as_secs() {
        return Err(VerifyError::StaleTimestamp { skew_secs });
    }
    Ok(())
}

/// Full request check when an Encrypt Key is configured: all three headers present, the
/// signature matches the raw body, and (if `window` is set) the timestamp is fresh.
pub fn verify_request(
    headers: &SignatureHeaders<'_>,
    encrypt_key: &str,
    body: &[u8],
    now: SystemTime,
    window: Option<Duration>,
) -> Result<(), VerifyError> {
    let timestamp = headers
        .timestamp
        .ok_or(VerifyError::MissingHeader(HEADER_TIMESTAMP))?;
    let nonce = headers
        .nonce
        .ok_or(VerifyError::MissingHeader(HEADER_NONCE))?;
    let signature = headers
        .signature
        .ok_or(VerifyError::MissingHeader(HEADER_SIGNATURE))?;
    verify_signature(timestamp, nonce, encrypt_key, body, signature)?;
    if let Some(window) = window {
        check_timestamp(timestamp, now, window)?;
    }
    Ok(())
}

/// Compares a received verification token with the configured one in constant time
/// (the length is not hidden).
pub fn verify_token(received: Option<&str>, expected: &str) -> Result<(), VerifyError> {
    match received {
        Some(t) if bool::from(t.as_bytes().ct_eq(expected.as_bytes())) => Ok(()),
        _ => Err(VerifyError::BadToken),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = r#"{"encrypt":"AAECAwQFBgcICQoLDA0OD/pXnuQjbBOjuCGc9CaoydhrmhJPFb/HVRvdR3Xe4bcGZ2OtDXZ6996piNoH3O63DgxYvaraqv9DZHekCWh2CHPtFRQF/8gWDPjseZ74u+un"}"#;
    const SIG: &str = "d9869fc968e6c03222dfb00e5b92d2c61f4dbb3b8e7ec82063f0158dfb8f862c";
    const KEY: &str = "test-encrypt-key";

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn headers(sig: &str) -> SignatureHeaders<'_> {
        SignatureHeaders {
            timestamp: Some("1700000000"),
            nonce: Some("n0nce"),
            signature: Some(sig),
        }
    }

    #[test]
    fn spec_vector() {
        assert_eq!(
            signature_hex("1700000000", "n0nce", KEY, BODY.as_bytes()),
            SIG
        );
        assert_eq!(
            verify_signature("1700000000", "n0nce", KEY, BODY.as_bytes(), SIG),
            Ok(())
        );
        let upper = SIG.to_uppercase();
        assert_eq!(
            verify_signature("1700000000", "n0nce", KEY, BODY.as_bytes(), &upper),
            Ok(())
        );
    }

    #[test]
    fn any_change_breaks_the_signature() {
        let bad = |ts: &str, nonce: &str, key: &str, body: &str, sig: &str| {
            verify_signature(ts, nonce, key, body.as_bytes(), sig) == Err(VerifyError::BadSignature)
        };
        assert!(bad("1700000001", "n0nce", KEY, BODY, SIG));
        assert!(bad("1700000000", "nonce", KEY, BODY, SIG));
        assert!(bad("1700000000", "n0nce", "other", BODY, SIG));
        assert!(bad("1700000000", "n0nce", KEY, &format!("{BODY} "), SIG));
        assert!(bad("1700000000", "n0nce", KEY, BODY, &SIG[..62]));
        assert!(bad("1700000000", "n0nce", KEY, BODY, "zz"));
        assert!(bad("1700000000", "n0nce", KEY, BODY, ""));
    }

    #[test]
    fn timestamp_window() {
        let w = Duration::from_secs(300);
        assert_eq!(check_timestamp("1700000000", at(1_700_000_000), w), Ok(()));
        assert_eq!(check_timestamp("1700000000", at(1_700_000_300), w), Ok(()));
        assert_eq!(check_timestamp("1700000300", at(1_700_000_000), w), Ok(()));
        assert_eq!(
            check_timestamp("1700000000", at(1_700_000_301), w),
            Err(VerifyError::StaleTimestamp { skew_secs: 301 })
        );
        assert_eq!(
            check_timestamp("1700000400", at(1_700_000_000), w),
            Err(VerifyError::StaleTimestamp { skew_secs: 400 })
        );
        assert_eq!(
            check_timestamp("17e8", at(0), w),
            Err(VerifyError::InvalidTimestamp)
        );
        assert!(check_timestamp("-9223372036854775808", at(1_700_000_000), w).is_err());
        assert!(check_timestamp("0", UNIX_EPOCH - Duration::from_secs(10), w).is_ok());
    }

    #[test]
    fn request_check() {
        let now = at(1_700_000_010);
        let w = Some(DEFAULT_TIMESTAMP_WINDOW);
        assert_eq!(
            verify_request(&headers(SIG), KEY, BODY.as_bytes(), now, w),
            Ok(())
        );
        assert_eq!(
            verify_request(&headers(SIG), KEY, BODY.as_bytes(), at(1_800_000_000), w),
            Err(VerifyError::StaleTimestamp {
                skew_secs: 99_999_999 + 1
            })
        );
        assert_eq!(
            verify_request(&headers(SIG), KEY, BODY.as_bytes(), at(1_800_000_000), None),
            Ok(())
        );
        let mut h = headers(SIG);
        h.nonce = None;
        assert_eq!(
            verify_request(&h, KEY, BODY.as_bytes(), now, w),
            Err(VerifyError::MissingHeader(HEADER_NONCE))
        );
        assert_eq!(
            verify_request(&SignatureHeaders::default(), KEY, BODY.as_bytes(), now, w),
            Err(VerifyError::MissingHeader(HEADER_TIMESTAMP))
        );
    }

    #[test]
    fn headers_from_lookup() {
        let h = SignatureHeaders::from_lookup(|k| match k.to_ascii_lowercase().as_str() {
            "x-lark-request-timestamp" => Some("1"),
            "x-lark-signature" => Some("ab"),
            _ => None,
        });
        assert_eq!(h.timestamp, Some("1"));
        assert_eq!(h.nonce, None);
        assert_eq!(h.signature, Some("ab"));
    }

    #[test]
    fn token() {
        assert_eq!(verify_token(Some("abc"), "abc"), Ok(()));
        assert_eq!(verify_token(Some("abd"), "abc"), Err(VerifyError::BadToken));
        assert_eq!(verify_token(Some("ab"), "abc"), Err(VerifyError::BadToken));
        assert_eq!(verify_token(None, "abc"), Err(VerifyError::BadToken));
    }

    mod props {
        use super::super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn sign_then_verify(ts in "[0-9]{1,12}", nonce in ".{0,16}", key in ".{0,16}", body in vec(any::<u8>(), 0..100), extra in any::<u8>()) {
                let sig = signature_hex(&ts, &nonce, &key, &body);
                prop_assert!(verify_signature(&ts, &nonce, &key, &body, &sig).is_ok());
                let mut longer = body.clone();
                longer.push(extra);
                prop_assert_eq!(verify_signature(&ts, &nonce, &key, &longer, &sig), Err(VerifyError::BadSignature));
            }

            #[test]
            fn arbitrary_headers_never_panic(ts in ".{0,24}", sig in ".{0,70}", now in any::<u32>()) {
                let now = UNIX_EPOCH + Duration::from_secs(u64::from(now));
                let _ = check_timestamp(&ts, now, DEFAULT_TIMESTAMP_WINDOW);
                let _ = verify_signature(&ts, "n", "k", b"{}", &sig);
            }
        }
    }
}
