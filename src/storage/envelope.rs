//! Encryption of secret fields at rest.
//!
//! Owns the token key ring and the sealed form of a secret. Every secret that reaches the store
//! (access and refresh tokens, PKCE verifiers) is sealed with XChaCha20-Poly1305 under the
//! active key. The associated data binds a ciphertext to its table, its row key, its field and
//! its key id, so a ciphertext copied into another row, field or table fails authentication.
//!
//! Keys never leave this file in clear: `Key` has no `Clone`, no `Serialize` and a redacted
//! `Debug`, and its bytes are zeroed on drop.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Domain-separation prefix of every associated-data string.
const AAD_PREFIX: &[u8] = b"lark-service/aead/v1";

/// A 32-bit identifier derived from a key's bytes (not secret: a truncated hash).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyId(pub u32);

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

/// One 256-bit token key.
pub struct Key {
    id: KeyId,
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({}, <redacted>)", self.id)
    }
}

/// Why a key could not be built from its text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyParseError {
    /// Not 64 hexadecimal characters.
    #[error("64 hexadecimal characters (32 bytes), got {len} characters")]
    BadLength {
        /// Characters seen (after trimming).
        len: usize,
    },
    /// Right length, but a character is not hexadecimal.
    #[error("64 hexadecimal characters (32 bytes), found a non-hex character")]
    NotHex,
}

impl Key {
    /// Builds a key from its 32 raw bytes.
    #[must_use]
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        let digest = Sha256::new_with_prefix(b"lark-service key id\0")
            .chain_update(bytes)
            .finalize();
        let id = KeyId(u32::from_be_bytes([
            digest[0], digest[1], digest[2], digest[3],
        ]));
        Self {
            id,
            cipher: XChaCha20Poly1305::new(bytes.into()),
        }
    }

    /// Parses a key written as 64 hex characters (surrounding white space ignored).
    pub fn from_hex(text: &SecretString) -> Result<Self, KeyParseError> {
        let t = text.expose_secret().trim();
        if t.len() != 64 {
            return Err(KeyParseError::BadLength { len: t.len() });
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(t, bytes.as_mut()).map_err(|_| KeyParseError::NotHex)?;
        Ok(Self::from_bytes(&bytes))
    }

    /// Generates a fresh random key and returns it with its hex text.
    #[must_use]
    pub fn generate() -> (Self, SecretString) {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rand::rng().fill_bytes(bytes.as_mut());
        let text = SecretString::from(hex::encode(bytes.as_ref()));
        (Self::from_bytes(&bytes), text)
    }

    /// This key's id.
    #[must_use]
    pub fn id(&self) -> KeyId {
        self.id
    }
}

/// The active key plus older keys still accepted for reading.
#[derive(Debug)]
pub struct Keyring {
    active: Key,
    previous: Vec<Key>,
}

impl Keyring {
    /// A ring with one active key and any number of previous (read-only) keys.
    #[must_use]
    pub fn new(active: Key, previous: Vec<Key>) -> Self {
        let previous = previous.into_iter().filter(|k| k.id != active.id).collect();
        Self { active, previous }
    }

    /// The id new records are sealed under.
    #[must_use]
    pub fn active_id(&self) -> KeyId {
        self.active.id
    }

    /// Ids of every key in the ring, active first.
    #[must_use]
    pub fn ids(&self) -> Vec<KeyId> {
        std::iter::once(self.active.id)
            .chain(self.previous.iter().map(|k| k.id))
            .collect()
    }

    fn find(&self, id: KeyId) -> Option<&Key> {
        std::iter::once(&self.active)
            .chain(self.previous.iter())
            .find(|k| k.id == id)
    }

    /// Seals `plaintext` for (table, row, field) under the active key.
    pub fn seal(&self, plaintext: &[u8], place: &Place<'_>) -> Sealed {
        let mut nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        let aad = place.aad(self.active.id);
        let ct = self
            .active
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            // Encryption only fails for messages beyond 256 GiB; a token is never that long.
            .unwrap_or_default();
        Sealed {
            key_id: self.active.id,
            nonce,
            ct,
        }
    }

    /// Opens a sealed value written for the same (table, row, field).
    pub fn open(
        &self,
        sealed: &Sealed,
        place: &Place<'_>,
    ) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        let key = self
            .find(sealed.key_id)
            .ok_or(OpenError::UnknownKey(sealed.key_id))?;
        let aad = place.aad(sealed.key_id);
        key.cipher
            .decrypt(
                XNonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ct,
                    aad: &aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| OpenError::Authentication)
    }

    /// Seals a secret string.
    pub fn seal_str(&self, secret: &SecretString, place: &Place<'_>) -> Sealed {
        self.seal(secret.expose_secret().as_bytes(), place)
    }

    /// Opens a sealed secret string.
    pub fn open_str(&self, sealed: &Sealed, place: &Place<'_>) -> Result<SecretString, OpenError> {
        let bytes = self.open(sealed, place)?;
        let s = std::str::from_utf8(&bytes).map_err(|_| OpenError::Authentication)?;
        Ok(SecretString::from(s.to_owned()))
    }
}

/// Where a sealed value lives: it is authenticated together with the ciphertext.
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    /// Table name.
    pub table: &'a str,
    /// The row's key bytes.
    pub row: &'a [u8],
    /// The field within the record.
    pub field: &'a str,
}

impl Place<'_> {
    fn aad(&self, key_id: KeyId) -> Vec<u8> {
        let mut aad = Vec::with_capacity(AAD_PREFIX.len() + self.table.len() + self.row.len() + 32);
        aad.extend_from_slice(AAD_PREFIX);
        for part in [self.table.as_bytes(), self.row, self.field.as_bytes()] {
            // No part comes near 4 GiB (names and row keys); saturating keeps the cast honest.
            aad.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
            aad.extend_from_slice(part);
        }
        aad.extend_from_slice(&key_id.0.to_be_bytes());
        aad
    }
}

/// A secret as stored: key id, nonce and ciphertext (with its tag).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// The key that sealed it.
    pub key_id: KeyId,
    /// Random 192-bit nonce.
    pub nonce: [u8; 24],
    /// Ciphertext followed by the 16-byte tag.
    pub ct: Vec<u8>,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealed(key {}, {} bytes)", self.key_id, self.ct.len())
    }
}

/// Why a sealed value did not open.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    /// Sealed under a key that is not in the ring.
    #[error("sealed under key id {0}, which is not configured")]
    UnknownKey(KeyId),
    /// Tag mismatch: wrong key, tampered bytes, or moved to another row/field/table.
    #[error("authentication failed (wrong key, tampered, or moved record)")]
    Authentication,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place<'a>(row: &'a [u8], field: &'a str) -> Place<'a> {
        Place {
            table: "t",
            row,
            field,
        }
    }

    #[test]
    fn seal_open_round_trip_and_binding() {
        let (k, _) = Key::generate();
        let ring = Keyring::new(k, vec![]);
        let s = ring.seal(b"secret", &place(b"r1", "f"));
        assert_eq!(&ring.open(&s, &place(b"r1", "f")).unwrap()[..], b"secret");
        assert_eq!(
            ring.open(&s, &place(b"r2", "f")).unwrap_err(),
            OpenError::Authentication
        );
        assert_eq!(
            ring.open(&s, &place(b"r1", "g")).unwrap_err(),
            OpenError::Authentication
        );
        let other = Place {
            table: "u",
            row: b"r1",
            field: "f",
        };
        assert_eq!(
            ring.open(&s, &other).unwrap_err(),
            OpenError::Authentication
        );
    }

    #[test]
    fn hex_parse_errors_do_not_echo_the_value() {
        let bad = SecretString::from("zz".repeat(32));
        let e = Key::from_hex(&bad).unwrap_err();
        assert!(!e.to_string().contains("zz"));
        assert_eq!(
            Key::from_hex(&SecretString::from("ab".to_owned())).unwrap_err(),
            KeyParseError::BadLength { len: 2 }
        );
        let good = SecretString::from("0f".repeat(32));
        let k = Key::from_hex(&good).unwrap();
        assert!(!format!("{k:?}").contains("0f0f"));
    }
}
