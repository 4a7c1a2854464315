//! `LARK_CONFIG_ENCRYPTION_KEY`, as the Python deployment holds it, and its Fernet tokens.
//!
//! The Python deployment seals each app secret in its SQLite `applications` table with
//! Fernet (AES-128-CBC with PKCS#7, then HMAC-SHA256 over version, time, IV and ciphertext).
//! Its key is 32 bytes written in URL-safe base64 (44 characters); its guide also suggests
//! `openssl rand -hex 32`, which this module takes too. The first half of the key signs, the
//! second encrypts.
//!
//! Decryption verifies the MAC (in constant time) before it touches the ciphertext; the
//! token's timestamp is not a lifetime here (stored secrets do not age), so no TTL applies.

use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

const VERSION: u8 = 0x80;
const HEADER: usize = 1 + 8 + 16;
const MAC: usize = 32;

/// Why a key or a token was refused. Names no secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FernetError {
    /// The key is neither 44 characters of URL-safe base64 nor 64 hex characters.
    #[error(
        "the config encryption key must be a Fernet key (44 characters of URL-safe base64) \
         or 64 hex characters"
    )]
    BadKey,
    /// The token is not URL-safe base64, or too short, or not version 0x80.
    #[error("not a Fernet token")]
    Malformed,
    /// The MAC does not match: another key, or the token was altered.
    #[error("the Fernet token does not verify under this key (wrong LARK_CONFIG_ENCRYPTION_KEY?)")]
    Unverified,
    /// The MAC matched but the padding did not: should not happen for a genuine token.
    #[error("the Fernet token's ciphertext is invalid")]
    Padding,
}

/// A Fernet key: signing half and encryption half. Zeroized on drop; `Debug` shows nothing.
pub struct FernetKey {
    signing: [u8; 16],
    encryption: [u8; 16],
}

impl std::fmt::Debug for FernetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FernetKey(<redacted>)")
    }
}

impl Drop for FernetKey {
    fn drop(&mut self) {
        self.signing.zeroize();
        self.encryption.zeroize();
    }
}

impl FernetKey {
    /// Parses the key as written in the environment: 44-character URL-safe base64 (padding
    /// optional) or 64 hex characters. Surrounding whitespace is ignored.
    ///
    /// # Errors
    /// [`FernetError::BadKey`] for anything else.
    pub fn parse(text: &str) -> Result<Self, FernetError> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            Zeroizing::new(hex::decode(text).map_err(|_| FernetError::BadKey)?)
        } else {
            let decoded = URL_SAFE
                .decode(text)
                .or_else(|_| URL_SAFE_NO_PAD.decode(text))
                .map_err(|_| FernetError::BadKey)?;
            Zeroizing::new(decoded)
        };
        if bytes.len() != 32 {
            return Err(FernetError::BadKey);
        }
        let mut key = Self {
            signing: [0u8; 16],
            encryption: [0u8; 16],
        };
        key.signing.copy_from_slice(&bytes[..16]);
        key.encryption.copy_from_slice(&bytes[16..]);
        Ok(key)
    }

    /// The 32 key bytes (signing half, then encryption half), for deriving other keys.
    #[must_use]
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        let mut out = Zeroizing::new([0u8; 32]);
        out[..16].copy_from_slice(&self.signing);
        out[16..].copy_from_slice(&self.encryption);
        out
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC pads a short key with zeros to the hash's block size (RFC 2104), so the padded
        // block is the same key, given in the form that cannot fail.
        // SHA-256's block is 64 bytes.
        let mut block = Zeroizing::new([0u8; 64]);
        block[..16].copy_from_slice(&self.signing);
        <Hmac<Sha256> as KeyInit>::new(hmac::digest::Key::<Hmac<Sha256>>::from_slice(&block[..]))
    }

    /// Opens a token.
    ///
    /// # Errors
    /// [`FernetError::Malformed`], [`FernetError::Unverified`] or [`FernetError::Padding`].
    pub fn decrypt(&self, token: &str) -> Result<Zeroizing<Vec<u8>>, FernetError> {
        let raw = URL_SAFE
            .decode(token.trim())
            .or_else(|_| URL_SAFE_NO_PAD.decode(token.trim()))
            .map_err(|_| FernetError::Malformed)?;
        if raw.len() < HEADER + 16 + MAC || raw.first() != Some(&VERSION) {
            return Err(FernetError::Malformed);
        }
        let (signed, tag) = raw.split_at(raw.len() - MAC);
        let mut mac = self.mac();
        mac.update(signed);
        mac.verify_slice(tag).map_err(|_| FernetError::Unverified)?;
        let (header, ciphertext) = signed.split_at(HEADER);
        if ciphertext.len() % 16 != 0 {
            return Err(FernetError::Malformed);
        }
        let mut iv = [0u8; 16];
        iv.copy_from_slice(&header[9..]);
        let dec = cbc::Decryptor::<aes::Aes128>::new(&self.encryption.into(), &iv.into());
        let plain = dec
            .decrypt_padded_vec_mut::<Pkcs7>(ciphertext)
            .map_err(|_| FernetError::Padding)?;
        Ok(Zeroizing::new(plain))
    }

    /// Seals `plaintext` at `unix_seconds` with a random IV, as Python's `Fernet.encrypt`.
    #[must_use]
    pub fn encrypt(&self, plaintext: &[u8], unix_seconds: u64) -> String {
        let iv: [u8; 16] = rand::random();
        let enc = cbc::Encryptor::<aes::Aes128>::new(&self.encryption.into(), &iv.into());
        let ciphertext = enc.encrypt_padded_vec_mut::<Pkcs7>(plaintext);
        let mut out = Vec::with_capacity(HEADER + ciphertext.len() + MAC);
        out.push(VERSION);
        out.extend_from_slice(&unix_seconds.to_be_bytes());
        out.extend_from_slice(&iv);
        out.extend_from_slice(&ciphertext);
        let mut mac = self.mac();
        mac.update(&out);
        out.extend_from_slice(&mac.finalize().into_bytes());
        URL_SAFE.encode(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by Python's `cryptography.fernet.Fernet` (the Python deployment's library).
    const FIXTURE: &str = include_str!("../../tests/fixtures/python/fernet.json");

    #[test]
    fn opens_tokens_written_by_python() {
        let v: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
        let key = FernetKey::parse(v["key"].as_str().unwrap()).unwrap();
        let tokens = v["tokens"].as_array().unwrap();
        assert_eq!(tokens.len(), 3);
        for t in tokens {
            let plain = key.decrypt(t["token"].as_str().unwrap()).unwrap();
            assert_eq!(
                std::str::from_utf8(&plain).unwrap(),
                t["plaintext"].as_str().unwrap()
            );
        }
    }

    #[test]
    fn refuses_another_key_and_altered_tokens() {
        let v: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
        let token = v["tokens"][0]["token"].as_str().unwrap();
        let other = FernetKey::parse(&"ab".repeat(32)).unwrap();
        assert_eq!(other.decrypt(token).unwrap_err(), FernetError::Unverified);
        let key = FernetKey::parse(v["key"].as_str().unwrap()).unwrap();
        let mut raw = URL_SAFE.decode(token).unwrap();
        let mid = raw.len() / 2;
        raw[mid] ^= 1;
        assert_eq!(
            key.decrypt(&URL_SAFE.encode(&raw)).unwrap_err(),
            FernetError::Unverified
        );
        assert_eq!(
            key.decrypt("not base64!").unwrap_err(),
            FernetError::Malformed
        );
        raw[0] = 0x81;
        assert_eq!(
            key.decrypt(&URL_SAFE.encode(&raw)).unwrap_err(),
            FernetError::Malformed
        );
    }

    #[test]
    fn takes_both_key_forms_and_nothing_else() {
        assert!(FernetKey::parse(&"0f".repeat(32)).is_ok());
        assert!(FernetKey::parse("TjPs3IL7VF48WI8azL55oGtewjKXD_ILCUIgOEOAMvo").is_ok());
        for bad in [
            "",
            "short",
            &"0f".repeat(31),
            &"zz".repeat(32),
            &"A".repeat(44),
        ] {
            assert_eq!(
                FernetKey::parse(bad).unwrap_err(),
                FernetError::BadKey,
                "{bad}"
            );
        }
        let key = FernetKey::parse(&"0f".repeat(32)).unwrap();
        assert_eq!(format!("{key:?}"), "FernetKey(<redacted>)");
        assert_eq!(key.to_bytes()[..], [0x0f; 32]);
    }

    proptest::proptest! {
        #[test]
        fn round_trips(plain in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), t in 0u64..4_000_000_000) {
            let key = FernetKey::parse(&"5a".repeat(32)).unwrap();
            let token = key.encrypt(&plain, t);
            proptest::prop_assert_eq!(&key.decrypt(&token).unwrap()[..], &plain[..]);
        }
    }
}
