//! Device polls: what the device flow needs to keep polling a session after a restart or on
//! another instance of a fleet (the device code, sealed like a token; the poll interval in
//! force; when the code expires), by session id.
//!
//! A row is written before its session (so a session of this build is never without one) and
//! deleted by whoever ends the polling; a row whose session is gone or no longer pending is
//! deleted by the next instance that looks at it (`auth::device`). Who polls a row at a time is
//! decided by a lease (`device/{session id}`, see [`Leases`](super::traits::Leases)), not here.

use redb::ReadableTable;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::envelope::{KeyId, Keyring, Place, Sealed};
use super::keys::RotationReport;
use super::records::{decode, encode};
use super::sessions::validate_ids;
use super::tables::DEVICE_POLLS;
use super::{Error, Result, SessionId, Store};

/// The table name sealed device codes are bound to (in the associated data).
pub(crate) const DEVICE_POLLS_TABLE: &str = "device_polls";
const DEVICE_POLL_VERSION: u8 = 1;
/// The field sealed device codes are bound to (in the associated data).
pub(crate) const DEVICE_CODE_FIELD: &str = "device_code";

/// One device session's polling state, as callers see it (the code in clear; `Debug`
/// redacts it).
#[derive(Clone, Debug)]
pub struct DevicePoll {
    /// The session polled for.
    pub session_id: SessionId,
    /// The app that asked for the code (only its service polls it).
    pub app_id: String,
    /// The device code (RFC 8628 `device_code`).
    pub device_code: SecretString,
    /// The interval in force (ms): the platform's, plus 5 s for each `slow_down` so far.
    pub interval_ms: u64,
    /// When the code expires (unix ms).
    pub expires_at: u64,
}

/// The stored form: the code sealed under the store's key ring, bound to its row.
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredDevicePoll {
    pub(crate) app_id: String,
    pub(crate) device_code: Sealed,
    pub(crate) interval_ms: u64,
    pub(crate) expires_at: u64,
}

fn place(row: &[u8]) -> Place<'_> {
    Place {
        table: DEVICE_POLLS_TABLE,
        row,
        field: DEVICE_CODE_FIELD,
    }
}

impl StoredDevicePoll {
    /// Seals `p`'s code under the active key.
    pub(crate) fn seal(p: &DevicePoll, ring: &Keyring) -> Result<Self> {
        validate_ids(&p.app_id, "device")?;
        let row = p.session_id.to_bytes();
        Ok(Self {
            app_id: p.app_id.clone(),
            device_code: ring.seal_str(&p.device_code, &place(&row)),
            interval_ms: p.interval_ms,
            expires_at: p.expires_at,
        })
    }

    /// Opens the code of the row of session `id`.
    pub(crate) fn open(self, id: SessionId, ring: &Keyring) -> Result<DevicePoll> {
        let row = id.to_bytes();
        let device_code = ring
            .open_str(&self.device_code, &place(&row))
            .map_err(|e| Error::Decrypt {
                table: DEVICE_POLLS_TABLE,
                detail: format!("field {DEVICE_CODE_FIELD}: {e}"),
            })?;
        Ok(DevicePoll {
            session_id: id,
            app_id: self.app_id,
            device_code,
            interval_ms: self.interval_ms,
            expires_at: self.expires_at,
        })
    }
}

fn decode_poll(bytes: &[u8]) -> Result<StoredDevicePoll> {
    match bytes.split_first() {
        Some((&DEVICE_POLL_VERSION, rest)) => decode(DEVICE_POLLS_TABLE, rest),
        _ => Err(Error::Decode {
            table: DEVICE_POLLS_TABLE,
            detail: "unknown record version".to_owned(),
        }),
    }
}

impl Store {
    /// Creates or replaces the device poll of `p.session_id`, its code sealed. Durable on
    /// return.
    pub fn put_device_poll(&self, p: &DevicePoll) -> Result<()> {
        let stored = StoredDevicePoll::seal(p, self.ring())?;
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(DEVICE_POLLS).map_err(|e| self.err(e))?;
            t.insert(
                p.session_id.0,
                encode(DEVICE_POLL_VERSION, &stored).as_slice(),
            )
            .map_err(|e| self.err(e))?;
        }
        self.commit(txn)
    }

    /// The device poll of session `id`, its code opened, or `None`.
    pub fn get_device_poll(&self, id: SessionId) -> Result<Option<DevicePoll>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(DEVICE_POLLS).map_err(|e| self.err(e))?;
        let Some(v) = t.get(id.0).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        decode_poll(v.value())?.open(id, self.ring()).map(Some)
    }

    /// Deletes the device poll of session `id`; true if there was one. Durable on return.
    pub fn delete_device_poll(&self, id: SessionId) -> Result<bool> {
        let txn = self.begin_write()?;
        let had = {
            let mut t = txn.open_table(DEVICE_POLLS).map_err(|e| self.err(e))?;
            let had = t.remove(id.0).map_err(|e| self.err(e))?.is_some();
            had
        };
        if had {
            self.commit(txn)?;
        } else {
            txn.abort().map_err(|e| self.err(e))?;
        }
        Ok(had)
    }

    /// Session ids of app `app_id`'s device polls, by id, at most `limit` (no code opened).
    pub fn device_polls_of(&self, app_id: &str, limit: usize) -> Result<Vec<SessionId>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(DEVICE_POLLS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| self.err(e))? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = row.map_err(|e| self.err(e))?;
            if decode_poll(v.value())?.app_id == app_id {
                out.push(SessionId(k.value()));
            }
        }
        Ok(out)
    }
}

/// Key rotation of the device codes (called by `Store::rotate_keys`, `key_status` and
/// `rotation_pending`, in `keys`).
impl Store {
    /// The key id of every stored device code (no code opened).
    pub(super) fn device_poll_keys(&self) -> Result<Vec<KeyId>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(DEVICE_POLLS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| self.err(e))? {
            let (_, v) = row.map_err(|e| self.err(e))?;
            out.push(decode_poll(v.value())?.device_code.key_id);
        }
        Ok(out)
    }

    /// True if some device code is sealed under a key other than the active one. Device polls
    /// are few (one per pending device session), so this reads them all.
    pub(super) fn device_polls_under_older_keys(&self) -> Result<bool> {
        let active = self.active_key_id();
        Ok(self.device_poll_keys()?.into_iter().any(|k| k != active))
    }

    /// Re-seals under the active key the device codes of up to `batch` polls after session
    /// `after` (id order), in one write transaction; the last id read and how many were read.
    pub(super) fn rotate_device_polls_batch(
        &self,
        after: Option<u128>,
        batch: usize,
        report: &mut RotationReport,
    ) -> Result<(Option<u128>, usize)> {
        let txn = self.begin_write()?;
        let (last, n) = {
            let mut t = txn.open_table(DEVICE_POLLS).map_err(|e| self.err(e))?;
            let rows = self.rows_after(&t, after, batch)?;
            for (id, bytes) in &rows {
                let mut stored = decode_poll(bytes)?;
                let row = SessionId(*id).to_bytes();
                report.scanned += 1;
                if self.reseal(
                    DEVICE_POLLS_TABLE,
                    &row,
                    DEVICE_CODE_FIELD,
                    &mut stored.device_code,
                )? {
                    t.insert(*id, encode(DEVICE_POLL_VERSION, &stored).as_slice())
                        .map_err(|e| self.err(e))?;
                    report.resealed += 1;
                }
            }
            (rows.last().map(|r| r.0), rows.len())
        };
        self.commit(txn)?;
        Ok((last, n))
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;
    use crate::storage::{Key, StoreOptions};

    fn store() -> Store {
        Store::open_in_memory(
            Keyring::new(Key::from_bytes(&[7u8; 32]), vec![]),
            StoreOptions::default(),
        )
        .unwrap()
    }

    fn poll(app: &str, code: &str) -> DevicePoll {
        DevicePoll {
            session_id: SessionId::random(),
            app_id: app.into(),
            device_code: SecretString::from(code.to_owned()),
            interval_ms: 5_000,
            expires_at: 600_000,
        }
    }

    /// A device poll round-trips with its code opened, is listed under its app only, keeps the
    /// last interval written, and is gone once deleted (deleting twice says so).
    #[test]
    fn device_polls_round_trip_by_app_and_delete() {
        let s = store();
        let a = poll("cli_a", "dc-PLAINTEXT-a");
        let b = poll("cli_b", "dc-PLAINTEXT-b");
        s.put_device_poll(&a).unwrap();
        s.put_device_poll(&b).unwrap();
        let got = s.get_device_poll(a.session_id).unwrap().unwrap();
        assert_eq!(got.device_code.expose_secret(), "dc-PLAINTEXT-a");
        assert_eq!((got.app_id.as_str(), got.expires_at), ("cli_a", 600_000));
        assert_eq!(s.device_polls_of("cli_a", 10).unwrap(), vec![a.session_id]);
        assert_eq!(s.device_polls_of("cli_b", 10).unwrap(), vec![b.session_id]);
        assert_eq!(s.device_polls_of("cli_a", 0).unwrap(), vec![]);
        let mut slower = a.clone();
        slower.interval_ms = 10_000;
        s.put_device_poll(&slower).unwrap();
        assert_eq!(
            s.get_device_poll(a.session_id)
                .unwrap()
                .unwrap()
                .interval_ms,
            10_000
        );
        assert!(s.delete_device_poll(a.session_id).unwrap());
        assert!(!s.delete_device_poll(a.session_id).unwrap());
        assert!(s.get_device_poll(a.session_id).unwrap().is_none());
        assert_eq!(s.device_polls_of("cli_a", 10).unwrap(), vec![]);
    }

    /// The code is sealed: the stored bytes do not hold it, and a sealed code moved to another
    /// session's row does not open (it is bound to its row).
    #[test]
    fn device_codes_are_sealed_and_bound_to_their_row() {
        let s = store();
        let a = poll("cli_a", "dc-PLAINTEXT-sealed");
        s.put_device_poll(&a).unwrap();
        let txn = s.begin_read().unwrap();
        let t = txn.open_table(DEVICE_POLLS).unwrap();
        let raw = t.get(a.session_id.0).unwrap().unwrap().value().to_vec();
        assert!(!raw
            .windows(b"dc-PLAINTEXT-sealed".len())
            .any(|w| w == b"dc-PLAINTEXT-sealed"));
        let stored = decode_poll(&raw).unwrap();
        assert!(stored
            .open(SessionId(a.session_id.0 ^ 1), s.ring())
            .is_err());
        let stored = decode_poll(&raw).unwrap();
        assert_eq!(
            stored
                .open(a.session_id, s.ring())
                .unwrap()
                .device_code
                .expose_secret(),
            "dc-PLAINTEXT-sealed"
        );
    }
}
