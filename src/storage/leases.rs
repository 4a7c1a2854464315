//! Named leases (see [`Leases`](super::traits::Leases)): a tiny table of
//! name → (holder, expires at). On one redb file there is one process, so a lease only matters
//! to a backend shared by a fleet; the redb store keeps the same contract so that the worker
//! code and the conformance suite are the same for both.

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::records::{decode, encode};
use super::sessions::validate_key_parts;
use super::tables::LEASES;
use super::{Error, Result, Store};

const LEASES_TABLE: &str = "leases";
const LEASE_VERSION: u8 = 1;

#[derive(Serialize, Deserialize)]
struct StoredLease {
    holder: String,
    expires_at: u64,
}

fn decode_lease(bytes: &[u8]) -> Result<StoredLease> {
    match bytes.split_first() {
        Some((&LEASE_VERSION, rest)) => decode(LEASES_TABLE, rest),
        _ => Err(Error::Decode {
            table: LEASES_TABLE,
            detail: "unknown record version".to_owned(),
        }),
    }
}

fn validate(name: &str, holder: &str) -> Result<()> {
    validate_key_parts([("lease name", name), ("lease holder", holder)])
}

impl Store {
    /// Reads, decides and writes lease `name` in one write transaction: `decide` gets the
    /// current lease (if any) and returns the new one to write, or `None` to leave it.
    fn lease_update(
        &self,
        name: &str,
        decide: impl FnOnce(Option<&StoredLease>) -> Option<Option<StoredLease>>,
    ) -> Result<bool> {
        let txn = self.begin_write()?;
        let changed = {
            let mut t = txn.open_table(LEASES).map_err(|e| self.err(e))?;
            let current = t
                .get(name)
                .map_err(|e| self.err(e))?
                .map(|v| decode_lease(v.value()))
                .transpose()?;
            match decide(current.as_ref()) {
                None => false,
                Some(Some(new)) => {
                    t.insert(name, encode(LEASE_VERSION, &new).as_slice())
                        .map_err(|e| self.err(e))?;
                    true
                }
                Some(None) => {
                    t.remove(name).map_err(|e| self.err(e))?;
                    true
                }
            }
        };
        if changed {
            self.commit(txn)?;
        } else {
            txn.abort().map_err(|e| self.err(e))?;
        }
        Ok(changed)
    }

    /// Takes lease `name` for `holder` until `now + ttl_ms` if it is free (absent or expired)
    /// or already `holder`'s. True if `holder` holds it on return. Durable on return.
    pub fn try_acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl_ms: u64,
        now: u64,
    ) -> Result<bool> {
        validate(name, holder)?;
        self.lease_update(name, |cur| {
            let free = cur.is_none_or(|l| l.expires_at <= now || l.holder == holder);
            free.then(|| {
                Some(StoredLease {
                    holder: holder.to_owned(),
                    expires_at: now.saturating_add(ttl_ms),
                })
            })
        })
    }

    /// Extends lease `name` to `now + ttl_ms` if `holder` holds it and it is unexpired at `now`.
    pub fn renew_lease(&self, name: &str, holder: &str, ttl_ms: u64, now: u64) -> Result<bool> {
        validate(name, holder)?;
        self.lease_update(name, |cur| {
            let held = cur.is_some_and(|l| l.holder == holder && l.expires_at > now);
            held.then(|| {
                Some(StoredLease {
                    holder: holder.to_owned(),
                    expires_at: now.saturating_add(ttl_ms),
                })
            })
        })
    }

    /// Frees lease `name` if `holder` holds it (expired or not); true if it did.
    pub fn release_lease(&self, name: &str, holder: &str) -> Result<bool> {
        validate(name, holder)?;
        self.lease_update(name, |cur| {
            cur.is_some_and(|l| l.holder == holder).then_some(None)
        })
    }

    /// The holder of lease `name` at `now`, if it is held and unexpired.
    pub fn lease_holder(&self, name: &str, now: u64) -> Result<Option<String>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(LEASES).map_err(|e| self.err(e))?;
        let Some(v) = t.get(name).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        let l = decode_lease(v.value())?;
        Ok((l.expires_at > now).then_some(l.holder))
    }
}
