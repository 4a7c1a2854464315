//! AES-256-CBC of the HTTP callback `encrypt` field (protocol doc §3.3).
//!
//! Owns: deriving the AES key (SHA-256 of the app's Encrypt Key), decrypting
//! `base64(IV ‖ ciphertext)` with strict PKCS#7 unpadding, and the inverse `encrypt` used by
//! tests and the sandbox.
//!
//! Must not: do I/O, read the clock, or reveal why decryption failed to the HTTP peer in a
//! way that distinguishes padding errors (routes answer every [`DecryptError`] with the same
//! status; see [`DecryptError`]). Key material is zeroized on drop and never printed.

use aes::cipher::block_padding::{NoPadding, Pkcs7};
use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::Engine as _;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

const BLOCK: usize = 16;

type Aes256CbcDec = cbc::Decryptor<aes::Aes256>;
type Aes256CbcEnc = cbc::Encryptor<aes::Aes256>;

/// Why an `encrypt` value could not be decrypted. The HTTP layer must map all variants to the
/// same response, so the peer cannot tell a padding error from a format error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecryptError {
    /// Not standard, padded base64.
    #[error("encrypt field is not valid base64")]
    Base64,
    /// Shorter than one IV plus one block, or not a whole number of blocks.
    #[error("encrypt field has an invalid length")]
    Length,
    /// The PKCS#7 padding is invalid (wrong key, or tampered data).
    #[error("encrypt field has invalid padding")]
    Padding,
}

/// The AES-256 key derived from an app's Encrypt Key.
pub struct EventCipher {
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for EventCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventCipher(***)")
    }
}

impl EventCipher {
    /// Derives the key: SHA-256 of the Encrypt Key's UTF-8 bytes.
    pub fn new(encrypt_key: &str) -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&Sha256::digest(encrypt_key.as_bytes()));
        Self { key }
    }

    /// Decrypts an `encrypt` value: base64 (standard alphabet, padded) of a 16-byte IV followed
    /// by AES-256-CBC ciphertext; the PKCS#7 padding is checked strictly and removed. Returns
    /// the plaintext bytes (JSON, not yet validated as UTF-8). Never panics.
    pub fn decrypt(&self, encrypt_b64: &str) -> Result<Vec<u8>, DecryptError> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(encrypt_b64.trim())
            .map_err(|_| DecryptError::Base64)?;
        if raw.len() < 2 * BLOCK || raw.len() % BLOCK != 0 {
            return Err(DecryptError::Length);
        }
        let (iv, ct) = raw.split_at(BLOCK);
        let mut buf = ct.to_vec();
        let dec = Aes256CbcDec::new_from_slices(self.key.as_slice(), iv)
            .map_err(|_| DecryptError::Length)?;
        let len = dec
            .decrypt_padded_mut::<NoPadding>(&mut buf)
            .map_err(|_| DecryptError::Length)?
            .len();
        buf.truncate(len);
        let unpadded = strict_pkcs7_len(&buf).ok_or(DecryptError::Padding)?;
        buf.truncate(unpadded);
        Ok(buf)
    }

    /// Encrypts `plaintext` with the given IV, returning the `encrypt` value the platform
    /// would send (`base64(IV ‖ AES-256-CBC(PKCS#7(plaintext)))`). For tests and the sandbox;
    /// use a random IV for anything else.
    pub fn encrypt_with_iv(&self, plaintext: &[u8], iv: [u8; BLOCK]) -> String {
        let enc = Aes256CbcEnc::new(self.key.as_slice().into(), &iv.into());
        let ct = enc.encrypt_padded_vec_mut::<Pkcs7>(plaintext);
        let mut out = Vec::with_capacity(BLOCK + ct.len());
        out.extend_from_slice(&iv);
        out.extend_from_slice(&ct);
        base64::engine::general_purpose::STANDARD.encode(out)
    }

    /// Like [`EventCipher::encrypt_with_iv`] with an IV drawn from `rng`.
    pub fn encrypt<R: rand::RngCore + ?Sized>(&self, plaintext: &[u8], rng: &mut R) -> String {
        let mut iv = [0u8; BLOCK];
        rng.fill_bytes(&mut iv);
        self.encrypt_with_iv(plaintext, iv)
    }
}

/// Length of `buf` without its PKCS#7 padding, or `None` if the padding is invalid: the last
/// byte `n` must be 1..=16 and the last `n` bytes must all equal `n`.
fn strict_pkcs7_len(buf: &[u8]) -> Option<usize> {
    let n = usize::from(*buf.last()?);
    if n == 0 || n > BLOCK || n > buf.len() {
        return None;
    }
    let (body, pad) = buf.split_at(buf.len() - n);
    pad.iter()
        .all(|&b| usize::from(b) == n)
        .then_some(body.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "test-encrypt-key";
    const PLAIN: &str =
        r#"{"challenge":"ajls384kdjx98XX","token":"xxxxxx","type":"url_verification"}"#;
    const ENCRYPT: &str = "AAECAwQFBgcICQoLDA0OD/pXnuQjbBOjuCGc9CaoydhrmhJPFb/HVRvdR3Xe4bcGZ2OtDXZ6996piNoH3O63DgxYvaraqv9DZHekCWh2CHPtFRQF/8gWDPjseZ74u+un";
    const IV: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

    #[test]
    fn key_derivation_matches_spec() {
        assert_eq!(
            hex::encode(EventCipher::new(KEY).key.as_slice()),
            "b473453eeddffb75f5d344bebd9533757c9b38fd1778c613cd04dfcb35f56957"
        );
    }

    #[test]
    fn decrypts_spec_vector() {
        let c = EventCipher::new(KEY);
        assert_eq!(c.decrypt(ENCRYPT).unwrap(), PLAIN.as_bytes());
    }

    #[test]
    fn encrypts_spec_vector() {
        assert_eq!(
            EventCipher::new(KEY).encrypt_with_iv(PLAIN.as_bytes(), IV),
            ENCRYPT
        );
    }

    #[test]
    fn wrong_key_or_tampering_fails_cleanly() {
        assert!(EventCipher::new("other").decrypt(ENCRYPT).is_err());
        let c = EventCipher::new(KEY);
        assert_eq!(c.decrypt("not base64!"), Err(DecryptError::Base64));
        assert_eq!(c.decrypt(""), Err(DecryptError::Length));
        // IV only, no ciphertext block.
        let iv_only = base64::engine::general_purpose::STANDARD.encode(IV);
        assert_eq!(c.decrypt(&iv_only), Err(DecryptError::Length));
        // Not block aligned.
        let odd = base64::engine::general_purpose::STANDARD.encode([0u8; 33]);
        assert_eq!(c.decrypt(&odd), Err(DecryptError::Length));
    }

    #[test]
    fn strict_padding() {
        assert_eq!(strict_pkcs7_len(&[1, 2, 3, 1]), Some(3));
        assert_eq!(strict_pkcs7_len(&[16; 16]), Some(0));
        assert_eq!(
            strict_pkcs7_len(&[5, 2, 3, 2]),
            None,
            "inconsistent pad bytes"
        );
        assert_eq!(strict_pkcs7_len(&[1, 2, 3, 0]), None, "zero pad");
        assert_eq!(strict_pkcs7_len(&[17; 32]), None, "pad longer than a block");
        assert_eq!(strict_pkcs7_len(&[4, 4, 4]), None, "pad longer than data");
        assert_eq!(strict_pkcs7_len(&[]), None);

        // A ciphertext whose plaintext ends in an invalid pad is rejected: encrypt a full
        // block ending in 0x02 0x03 with NoPadding and try to decrypt.
        let c = EventCipher::new(KEY);
        let mut block = [b'a'; 16];
        block[14] = 2;
        block[15] = 3;
        let enc = Aes256CbcEnc::new(c.key.as_slice().into(), &IV.into());
        let ct = enc.encrypt_padded_vec_mut::<NoPadding>(&block);
        let mut raw = IV.to_vec();
        raw.extend_from_slice(&ct);
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        assert_eq!(c.decrypt(&b64), Err(DecryptError::Padding));
    }

    #[test]
    fn random_iv_round_trip() {
        let c = EventCipher::new(KEY);
        let mut rng = rand::rng();
        let a = c.encrypt(b"hello", &mut rng);
        let b = c.encrypt(b"hello", &mut rng);
        assert_ne!(a, b);
        assert_eq!(c.decrypt(&a).unwrap(), b"hello");
        assert_eq!(c.decrypt(&b).unwrap(), b"hello");
    }

    #[test]
    fn debug_is_redacted() {
        assert_eq!(format!("{:?}", EventCipher::new(KEY)), "EventCipher(***)");
    }

    mod props {
        use super::super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn decrypt_inverts_encrypt(key in ".{0,40}", plain in vec(any::<u8>(), 0..200), iv in any::<[u8; 16]>()) {
                let c = EventCipher::new(&key);
                prop_assert_eq!(c.decrypt(&c.encrypt_with_iv(&plain, iv)).unwrap(), plain);
            }

            #[test]
            fn corrupted_ciphertext_never_panics(
                plain in vec(any::<u8>(), 0..100),
                pos in any::<prop::sample::Index>(),
                flip in 1u8..=255,
                cut in any::<prop::sample::Index>(),
            ) {
                let c = EventCipher::new("k");
                let b64 = c.encrypt_with_iv(&plain, [3; 16]);
                let mut raw = base64::engine::general_purpose::STANDARD.decode(&b64).unwrap();
                let i = pos.index(raw.len());
                raw[i] ^= flip;
                let tampered = base64::engine::general_purpose::STANDARD.encode(&raw);
                // Either rejected, or (IV / early-block flips) decrypts to something else.
                if let Ok(out) = c.decrypt(&tampered) {
                    prop_assert_ne!(out, plain.clone());
                }
                let _ = c.decrypt(&b64[..cut.index(b64.len())]);
            }

            #[test]
            fn arbitrary_strings_never_panic(s in ".{0,120}") {
                let _ = EventCipher::new("k").decrypt(&s);
            }
        }
    }
}
