//! The app registry's table: app id → the app's record, its secret sealed.
//!
//! An app secret is sealed either under the store's own key ring (like tokens) or under a
//! separate key ring the caller passes in (`LARK_CONFIG_ENCRYPTION_KEY`); the record says
//! which, so a secret sealed under the config key never opens without it (fail closed). The
//! associated data binds the ciphertext to this table, the app id and the field.

use redb::ReadableTable;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use super::envelope::{Keyring, Place, Sealed};
use super::records::{decode, encode};
use super::tables::{APPS, TOKENS};
use super::{Error, Result, Store};

pub(crate) const APPS_TABLE: &str = "apps";
const APP_VERSION: u8 = 1;
/// The field app secrets are bound to (in the associated data).
pub(crate) const SECRET_FIELD: &str = "app_secret";

/// An app's status, as the Python deployment names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppStatus {
    /// Served: the service holds its long connection.
    Active,
    /// Kept, not served.
    Inactive,
    /// Soft-deleted: kept, not served, hidden from `list` unless asked for.
    Deleted,
}

impl AppStatus {
    /// The lower-case name (`active`, `inactive`, `deleted`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Inactive => "inactive",
            Self::Deleted => "deleted",
        }
    }
}

impl std::str::FromStr for AppStatus {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "active" => Ok(Self::Active),
            "inactive" => Ok(Self::Inactive),
            "deleted" => Ok(Self::Deleted),
            other => Err(Error::Invalid(format!(
                "app status must be active, inactive or deleted, got {other:?}"
            ))),
        }
    }
}

/// Which key ring sealed an app's secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SecretKey {
    /// The store's token key ring.
    Store,
    /// The config encryption key (`LARK_CONFIG_ENCRYPTION_KEY`).
    Config,
}

/// An app as stored, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRow {
    /// The platform's app id (`cli_…`).
    pub app_id: String,
    /// A unique, human name.
    pub app_name: String,
    /// Free text.
    pub description: Option<String>,
    /// Served or not.
    pub status: AppStatus,
    /// JSON text, kept as given (validated as JSON by the caller).
    pub permissions: Option<String>,
    /// Unix ms.
    pub created_at: u64,
    /// Unix ms.
    pub updated_at: u64,
    /// Who added it (the local user name), when known.
    pub created_by: Option<String>,
    /// Which key ring sealed the secret.
    pub secret_key: SecretKey,
}

/// What deleting an app did (either backend's `delete_app`): the token count and the delete
/// are one transaction, so no token stored meanwhile is missed by the count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppDeletion {
    /// No such app; nothing changed.
    NotFound,
    /// Refused (nothing changed): the app has this many user tokens and `force` was not given.
    HasTokens(u64),
    /// Deleted (soft or hard); the app had this many user tokens.
    Deleted(u64),
}

#[derive(Serialize, Deserialize)]
struct StoredApp {
    row: AppRow,
    secret: Sealed,
}

impl Store {
    /// The stored record of `app_id` in `t` (the apps table, in a read or a write transaction).
    fn stored_app(
        &self,
        t: &impl ReadableTable<&'static str, &'static [u8]>,
        app_id: &str,
    ) -> Result<Option<StoredApp>> {
        t.get(app_id)
            .map_err(|e| self.err(e))?
            .map(|v| decode_app(v.value()))
            .transpose()
    }
}

fn decode_app(bytes: &[u8]) -> Result<StoredApp> {
    match bytes.split_first() {
        Some((&APP_VERSION, rest)) => decode(APPS_TABLE, rest),
        _ => Err(Error::Decode {
            table: APPS_TABLE,
            detail: "unknown record version".to_owned(),
        }),
    }
}

/// Where an app's secret is sealed (the same on both backends, so a copy moves it sealed).
pub(crate) fn place(app_id: &str) -> Place<'_> {
    Place {
        table: APPS_TABLE,
        row: app_id.as_bytes(),
        field: SECRET_FIELD,
    }
}

pub(crate) fn validate(app_id: &str, app_name: &str) -> Result<()> {
    super::sessions::validate_key_parts([("app id", app_id), ("app name", app_name)])
}

/// An app's secret sealed under `config_key` when given, else under the store's `ring`, bound
/// to the app's row (the same on both backends, so a copy moves it sealed).
pub(crate) fn seal_app_secret(
    ring: &Keyring,
    app_id: &str,
    secret: &SecretString,
    config_key: Option<&Keyring>,
) -> (Sealed, SecretKey) {
    match config_key {
        Some(k) => (k.seal_str(secret, &place(app_id)), SecretKey::Config),
        None => (ring.seal_str(secret, &place(app_id)), SecretKey::Store),
    }
}

impl Store {
    fn seal_app_secret(
        &self,
        app_id: &str,
        secret: &SecretString,
        config_key: Option<&Keyring>,
    ) -> (Sealed, SecretKey) {
        seal_app_secret(self.ring(), app_id, secret, config_key)
    }

    /// Adds an app. Refuses an app id that exists (in any status) or an app name another app
    /// has. The secret is sealed under `config_key` when given, else under the store's ring.
    /// Durable on return.
    pub fn insert_app(
        &self,
        row: &AppRow,
        secret: &SecretString,
        config_key: Option<&Keyring>,
    ) -> Result<()> {
        validate(&row.app_id, &row.app_name)?;
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(APPS).map_err(|e| self.err(e))?;
            if t.get(row.app_id.as_str())
                .map_err(|e| self.err(e))?
                .is_some()
            {
                return Err(Error::Invalid(format!(
                    "app {} already exists (see `app show {}`)",
                    row.app_id, row.app_id
                )));
            }
            check_name_free(self, &t, &row.app_id, &row.app_name)?;
            let (sealed, key) = self.seal_app_secret(&row.app_id, secret, config_key);
            let mut row = row.clone();
            row.secret_key = key;
            let rec = StoredApp {
                row,
                secret: sealed,
            };
            t.insert(
                rec.row.app_id.as_str(),
                encode(APP_VERSION, &rec).as_slice(),
            )
            .map_err(|e| self.err(e))?;
        }
        self.commit(txn)
    }

    /// Changes an app: `change` edits its row (the app id stays), and `new_secret`, when
    /// given, replaces its secret (sealed as in [`Self::insert_app`]). Returns the new row,
    /// or `None` if there is no such app. Durable on return.
    pub fn update_app(
        &self,
        app_id: &str,
        change: impl FnOnce(&mut AppRow),
        new_secret: Option<&SecretString>,
        config_key: Option<&Keyring>,
    ) -> Result<Option<AppRow>> {
        let txn = self.begin_write()?;
        let row = {
            let mut t = txn.open_table(APPS).map_err(|e| self.err(e))?;
            let current = self.stored_app(&t, app_id)?;
            let Some(mut rec) = current else {
                return Ok(None);
            };
            change(&mut rec.row);
            rec.row.app_id = app_id.to_owned();
            validate(app_id, &rec.row.app_name)?;
            check_name_free(self, &t, app_id, &rec.row.app_name)?;
            if let Some(s) = new_secret {
                let (sealed, key) = self.seal_app_secret(app_id, s, config_key);
                rec.secret = sealed;
                rec.row.secret_key = key;
            }
            rec.row.updated_at = super::now_ms().max(rec.row.updated_at);
            t.insert(app_id, encode(APP_VERSION, &rec).as_slice())
                .map_err(|e| self.err(e))?;
            rec.row
        };
        self.commit(txn)?;
        Ok(Some(row))
    }

    /// One app, without its secret.
    pub fn get_app(&self, app_id: &str) -> Result<Option<AppRow>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(APPS).map_err(|e| self.err(e))?;
        t.get(app_id)
            .map_err(|e| self.err(e))?
            .map(|v| decode_app(v.value()).map(|r| r.row))
            .transpose()
    }

    /// Every app, by app id, without secrets.
    pub fn list_apps(&self) -> Result<Vec<AppRow>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(APPS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for r in t.iter().map_err(|e| self.err(e))? {
            let (_, v) = r.map_err(|e| self.err(e))?;
            out.push(decode_app(v.value())?.row);
        }
        Ok(out)
    }

    /// Removes an app's row (hard delete). True if it was there. Durable on return.
    pub fn remove_app(&self, app_id: &str) -> Result<bool> {
        let txn = self.begin_write()?;
        let removed = {
            let mut t = txn.open_table(APPS).map_err(|e| self.err(e))?;
            let r = t.remove(app_id).map_err(|e| self.err(e))?.is_some();
            r
        };
        self.commit(txn)?;
        Ok(removed)
    }

    /// Opens an app's secret. A secret sealed under the config key needs `config_key`; without
    /// it this refuses ([`Error::Decrypt`]) rather than guessing.
    pub fn app_secret(
        &self,
        app_id: &str,
        config_key: Option<&Keyring>,
    ) -> Result<Option<SecretString>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(APPS).map_err(|e| self.err(e))?;
        let Some(rec) = self.stored_app(&t, app_id)? else {
            return Ok(None);
        };
        let ring = match (rec.row.secret_key, config_key) {
            (SecretKey::Store, _) => self.ring(),
            (SecretKey::Config, Some(k)) => k,
            (SecretKey::Config, None) => {
                return Err(Error::Decrypt {
                    table: APPS_TABLE,
                    detail: format!(
                        "the secret of app {app_id} is sealed under LARK_CONFIG_ENCRYPTION_KEY, which is not set"
                    ),
                })
            }
        };
        ring.open_str(&rec.secret, &place(app_id))
            .map(Some)
            .map_err(|e| Error::Decrypt {
                table: APPS_TABLE,
                detail: format!("app {app_id}: {e}"),
            })
    }

    /// The key ids of the app secrets sealed under the store's key ring (those a rotation
    /// re-seals; secrets under the config key are not the token key's business).
    pub(super) fn store_sealed_app_keys(&self) -> Result<Vec<super::envelope::KeyId>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(APPS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for r in t.iter().map_err(|e| self.err(e))? {
            let (_, v) = r.map_err(|e| self.err(e))?;
            let rec = decode_app(v.value())?;
            if rec.row.secret_key == SecretKey::Store {
                out.push(rec.secret.key_id);
            }
        }
        Ok(out)
    }

    /// Re-seals under the active key the app secrets sealed under an older key of the store's
    /// key ring, in one transaction (apps are few).
    pub(super) fn rotate_apps(&self, report: &mut super::keys::RotationReport) -> Result<()> {
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(APPS).map_err(|e| self.err(e))?;
            let rows: Vec<(String, Vec<u8>)> = t
                .iter()
                .map_err(|e| self.err(e))?
                .map(|r| {
                    r.map(|(k, v)| (k.value().to_owned(), v.value().to_vec()))
                        .map_err(|e| self.err(e))
                })
                .collect::<Result<_>>()?;
            for (app_id, bytes) in rows {
                let mut rec = decode_app(&bytes)?;
                report.scanned += 1;
                if rec.row.secret_key != SecretKey::Store {
                    continue;
                }
                if self.reseal(APPS_TABLE, app_id.as_bytes(), SECRET_FIELD, &mut rec.secret)? {
                    t.insert(app_id.as_str(), encode(APP_VERSION, &rec).as_slice())
                        .map_err(|e| self.err(e))?;
                    report.resealed += 1;
                }
            }
        }
        self.commit(txn)
    }

    /// Every app with its sealed secret, by app id (what a copy to PostgreSQL moves, never
    /// opened).
    pub(crate) fn sealed_apps(&self) -> Result<Vec<(AppRow, Sealed)>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(APPS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for r in t.iter().map_err(|e| self.err(e))? {
            let (_, v) = r.map_err(|e| self.err(e))?;
            let rec = decode_app(v.value())?;
            out.push((rec.row, rec.secret));
        }
        Ok(out)
    }

    /// Adds apps whose secrets are already sealed (a copy from PostgreSQL), in one
    /// transaction; refuses an app id or name already there. Returns how many.
    pub(crate) fn insert_sealed_apps(&self, apps: &[(AppRow, Sealed)]) -> Result<u64> {
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(APPS).map_err(|e| self.err(e))?;
            for (row, secret) in apps {
                validate(&row.app_id, &row.app_name)?;
                if t.get(row.app_id.as_str())
                    .map_err(|e| self.err(e))?
                    .is_some()
                {
                    return Err(Error::Invalid(format!("app {} already exists", row.app_id)));
                }
                check_name_free(self, &t, &row.app_id, &row.app_name)?;
                let rec = StoredApp {
                    row: row.clone(),
                    secret: secret.clone(),
                };
                t.insert(row.app_id.as_str(), encode(APP_VERSION, &rec).as_slice())
                    .map_err(|e| self.err(e))?;
            }
        }
        self.commit(txn)?;
        Ok(apps.len() as u64)
    }

    /// How many user tokens the store holds for `app_id`.
    pub fn app_token_count(&self, app_id: &str) -> Result<u64> {
        let txn = self.begin_read()?;
        let t = txn.open_table(TOKENS).map_err(|e| self.err(e))?;
        count_tokens(self, &t, app_id)
    }

    /// Deletes an app, in one write transaction with the count of its user tokens: an app with
    /// tokens is refused unless `force`; soft (status `deleted`, the row stays) unless `hard`
    /// (the row goes). No token can be stored between the count and the delete (redb has one
    /// writer at a time). Durable on return.
    pub fn delete_app(&self, app_id: &str, force: bool, hard: bool) -> Result<AppDeletion> {
        let txn = self.begin_write()?;
        let outcome = {
            let mut t = txn.open_table(APPS).map_err(|e| self.err(e))?;
            let current = self.stored_app(&t, app_id)?;
            match current {
                None => AppDeletion::NotFound,
                Some(mut rec) => {
                    let tokens = {
                        let tokens = txn.open_table(TOKENS).map_err(|e| self.err(e))?;
                        count_tokens(self, &tokens, app_id)?
                    };
                    if tokens > 0 && !force {
                        AppDeletion::HasTokens(tokens)
                    } else {
                        if hard {
                            t.remove(app_id).map_err(|e| self.err(e))?;
                        } else {
                            rec.row.status = AppStatus::Deleted;
                            rec.row.updated_at = super::now_ms().max(rec.row.updated_at);
                            t.insert(app_id, encode(APP_VERSION, &rec).as_slice())
                                .map_err(|e| self.err(e))?;
                        }
                        AppDeletion::Deleted(tokens)
                    }
                }
            }
        };
        if matches!(outcome, AppDeletion::Deleted(_)) {
            self.commit(txn)?;
        } else {
            txn.abort().map_err(|e| self.err(e))?;
        }
        Ok(outcome)
    }
}

/// The user tokens of `app_id` in `t` (the token table, in a read or a write transaction).
fn count_tokens(
    store: &Store,
    t: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    app_id: &str,
) -> Result<u64> {
    let mut n = 0u64;
    for r in t.range((app_id, "")..).map_err(|e| store.err(e))? {
        let (k, _) = r.map_err(|e| store.err(e))?;
        if k.value().0 != app_id {
            break;
        }
        n = n.saturating_add(1);
    }
    Ok(n)
}

fn check_name_free(
    store: &Store,
    t: &redb::Table<'_, &str, &[u8]>,
    app_id: &str,
    app_name: &str,
) -> Result<()> {
    for r in t.iter().map_err(|e| store.err(e))? {
        let (k, v) = r.map_err(|e| store.err(e))?;
        if k.value() != app_id && decode_app(v.value())?.row.app_name == app_name {
            return Err(Error::Invalid(format!(
                "app name {app_name:?} is already used by app {}",
                k.value()
            )));
        }
    }
    Ok(())
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

    fn row(id: &str, name: &str) -> AppRow {
        AppRow {
            app_id: id.into(),
            app_name: name.into(),
            description: None,
            status: AppStatus::Active,
            permissions: None,
            created_at: 1,
            updated_at: 1,
            created_by: None,
            secret_key: SecretKey::Store,
        }
    }

    /// A key rotation re-seals app secrets under the token key (so the old key can go), and
    /// leaves those under the config key alone.
    #[test]
    fn a_key_rotation_reseals_app_secrets_under_the_store_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let old = || Key::from_bytes(&[1u8; 32]);
        let new = || Key::from_bytes(&[2u8; 32]);
        let cfg = Keyring::new(Key::from_bytes(&[9u8; 32]), vec![]);
        {
            let s =
                Store::open(&path, Keyring::new(old(), vec![]), StoreOptions::default()).unwrap();
            s.insert_app(&row("cli_a", "a"), &"secret-a".to_owned().into(), None)
                .unwrap();
            s.insert_app(
                &row("cli_c", "c"),
                &"secret-c".to_owned().into(),
                Some(&cfg),
            )
            .unwrap();
        }
        {
            let s = Store::open(
                &path,
                Keyring::new(new(), vec![old()]),
                StoreOptions::default(),
            )
            .unwrap();
            let before = s.key_status().unwrap();
            assert!(before.rotation_pending);
            assert_eq!(before.sealed_fields_by_key.values().sum::<u64>(), 1);
            let report = s.rotate_keys(10, &mut |_, _| {}).unwrap();
            assert_eq!(report.resealed, 1);
            let after = s.key_status().unwrap();
            assert!(!after.rotation_pending, "{after:?}");
        }
        // The old key is gone: the secret still opens under the new one alone.
        let s = Store::open(&path, Keyring::new(new(), vec![]), StoreOptions::default()).unwrap();
        assert_eq!(
            s.app_secret("cli_a", None)
                .unwrap()
                .unwrap()
                .expose_secret(),
            "secret-a"
        );
        assert_eq!(
            s.app_secret("cli_c", Some(&cfg))
                .unwrap()
                .unwrap()
                .expose_secret(),
            "secret-c"
        );
    }

    #[test]
    fn app_secret_opens_only_under_the_key_that_sealed_it() {
        let s = store();
        let cfg = Keyring::new(Key::from_bytes(&[9u8; 32]), vec![]);
        s.insert_app(&row("cli_a", "a"), &"secret-a".to_owned().into(), None)
            .unwrap();
        s.insert_app(
            &row("cli_b", "b"),
            &"secret-b".to_owned().into(),
            Some(&cfg),
        )
        .unwrap();
        assert_eq!(
            s.get_app("cli_b").unwrap().unwrap().secret_key,
            SecretKey::Config
        );
        assert_eq!(
            s.app_secret("cli_a", None)
                .unwrap()
                .unwrap()
                .expose_secret(),
            "secret-a"
        );
        assert_eq!(
            s.app_secret("cli_b", Some(&cfg))
                .unwrap()
                .unwrap()
                .expose_secret(),
            "secret-b"
        );
        assert!(matches!(
            s.app_secret("cli_b", None),
            Err(Error::Decrypt { .. })
        ));
        let other = Keyring::new(Key::from_bytes(&[10u8; 32]), vec![]);
        assert!(s.app_secret("cli_b", Some(&other)).is_err());
    }

    #[test]
    fn ids_and_names_are_unique_and_updates_keep_the_id() {
        let s = store();
        s.insert_app(&row("cli_a", "a"), &"x".to_owned().into(), None)
            .unwrap();
        assert!(s
            .insert_app(&row("cli_a", "other"), &"x".to_owned().into(), None)
            .is_err());
        assert!(s
            .insert_app(&row("cli_b", "a"), &"x".to_owned().into(), None)
            .is_err());
        s.insert_app(&row("cli_b", "b"), &"x".to_owned().into(), None)
            .unwrap();
        assert!(s
            .update_app("cli_b", |r| r.app_name = "a".into(), None, None)
            .is_err());
        let r = s
            .update_app(
                "cli_b",
                |r| {
                    r.app_id = "cli_z".into();
                    r.status = AppStatus::Inactive;
                },
                Some(&"y".to_owned().into()),
                None,
            )
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.app_id.as_str(), r.status),
            ("cli_b", AppStatus::Inactive)
        );
        assert_eq!(
            s.app_secret("cli_b", None)
                .unwrap()
                .unwrap()
                .expose_secret(),
            "y"
        );
        assert!(s
            .update_app("cli_none", |_| {}, None, None)
            .unwrap()
            .is_none());
        assert!(s.remove_app("cli_a").unwrap());
        assert!(!s.remove_app("cli_a").unwrap());
        let ids: Vec<_> = s
            .list_apps()
            .unwrap()
            .into_iter()
            .map(|r| r.app_id)
            .collect();
        assert_eq!(ids, ["cli_b"]);
    }
}
