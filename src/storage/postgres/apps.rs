//! The app registry on PostgreSQL (`ls_apps`): the same rows as the redb store's `apps`
//! table, each app's secret sealed as the redb store seals it (under the config key ring when
//! the caller passes one, else under the store's ring; same associated data), so the database
//! never sees a plaintext secret and a copy between the backends moves it sealed.
//!
//! An edit reads its row `FOR UPDATE`, applies the change and writes it back with the row's
//! `version` bumped, in one transaction: two instances editing one app wait for each other and
//! lose neither edit. (A first version compared and set the version without the lock, reading
//! again when it lost; two writers hammering one app made one of them lose 16 times in a row.)
//! Every write also bumps the one registry version (`ls_apps_version`) in its transaction: what
//! every instance of the fleet polls to pick up changes made elsewhere.

use secrecy::SecretString;

use super::{api_time, db_time, pg_err, rows::sealed_from, sealed_bytes, PgStore};
use crate::storage::apps::{place, validate, APPS_TABLE};
use crate::storage::envelope::{Keyring, Sealed};
use crate::storage::{now_ms, AppDeletion, AppRow, AppStatus, Error, Result, SecretKey};

const COLUMNS: &str = "app_id, app_name, description, status, permissions, created_at, \
                       updated_at, created_by, secret_sealed_with, version";

/// One app as stored, with its sealed secret (what a copy between the backends moves).
#[derive(Debug, Clone)]
pub struct SealedApp {
    /// The row.
    pub row: AppRow,
    /// Its secret, sealed under the key ring `row.secret_key` names.
    pub secret: Sealed,
}

fn key_name(k: SecretKey) -> &'static str {
    match k {
        SecretKey::Store => "store",
        SecretKey::Config => "config",
    }
}

fn decode_err(detail: String) -> Error {
    Error::Decode {
        table: APPS_TABLE,
        detail,
    }
}

fn app_row(r: &tokio_postgres::Row) -> Result<(AppRow, i64)> {
    let status: String = r.try_get(3).map_err(|e| pg_err(&e))?;
    let sealed_with: String = r.try_get(8).map_err(|e| pg_err(&e))?;
    let row = AppRow {
        app_id: r.try_get(0).map_err(|e| pg_err(&e))?,
        app_name: r.try_get(1).map_err(|e| pg_err(&e))?,
        description: r.try_get(2).map_err(|e| pg_err(&e))?,
        status: status.parse::<AppStatus>()?,
        permissions: r.try_get(4).map_err(|e| pg_err(&e))?,
        created_at: api_time(r.try_get(5).map_err(|e| pg_err(&e))?, "ls_apps")?,
        updated_at: api_time(r.try_get(6).map_err(|e| pg_err(&e))?, "ls_apps")?,
        created_by: r.try_get(7).map_err(|e| pg_err(&e))?,
        secret_key: match sealed_with.as_str() {
            "store" => SecretKey::Store,
            "config" => SecretKey::Config,
            other => return Err(decode_err(format!("secret sealed with {other:?}"))),
        },
    };
    Ok((row, r.try_get(9).map_err(|e| pg_err(&e))?))
}

/// A unique-index violation (`23505`) of an insert or edit: the id or the name is taken.
fn taken(e: Error, app_id: &str, app_name: &str) -> Error {
    match e {
        Error::Engine(m) if m.ends_with("(23505)") => Error::Invalid(format!(
            "app {app_id} already exists or app name {app_name:?} is already used by another app"
        )),
        other => other,
    }
}

const BUMP: &str = "UPDATE ls_apps_version SET version = version + 1 WHERE id = 1";

/// How long a delete waits for the token writes in flight to finish (`lock_timeout`) before
/// it gives up, unchanged; past it, the caller is told to try again.
const DELETE_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '5s'";

impl PgStore {
    fn seal_app_secret(
        &self,
        app_id: &str,
        secret: &SecretString,
        config_key: Option<&Keyring>,
    ) -> (Sealed, SecretKey) {
        crate::storage::apps::seal_app_secret(self.ring(), app_id, secret, config_key)
    }

    /// Adds an app (as the redb store's `insert_app`): refuses an app id that exists (in any
    /// status) or an app name another app has; the secret is sealed under `config_key` when
    /// given, else under the store's ring.
    pub fn insert_app(
        &self,
        row: &AppRow,
        secret: &SecretString,
        config_key: Option<&Keyring>,
    ) -> Result<()> {
        validate(&row.app_id, &row.app_name)?;
        let (sealed, key) = self.seal_app_secret(&row.app_id, secret, config_key);
        let mut row = row.clone();
        row.secret_key = key;
        self.insert_sealed_app(&SealedApp {
            row,
            secret: sealed,
        })
    }

    /// Adds an app whose secret is already sealed (a copy from the other backend).
    pub fn insert_sealed_app(&self, app: &SealedApp) -> Result<()> {
        let row = &app.row;
        validate(&row.app_id, &row.app_name)?;
        let secret = sealed_bytes(&app.secret);
        let key_id = i64::from(app.secret.key_id.0);
        let inserted = self
            .with(async |c| {
                let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
                let n = tx
                    .execute(
                        "INSERT INTO ls_apps (app_id, app_name, description, status, permissions,
                            created_at, updated_at, created_by, secret_sealed_with, secret,
                            secret_key, version)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 1)
                         ON CONFLICT (app_id) DO NOTHING",
                        &[
                            &row.app_id,
                            &row.app_name,
                            &row.description,
                            &row.status.as_str(),
                            &row.permissions,
                            &db_time(row.created_at),
                            &db_time(row.updated_at),
                            &row.created_by,
                            &key_name(row.secret_key),
                            &secret,
                            &key_id,
                        ],
                    )
                    .await
                    .map_err(|e| pg_err(&e))?;
                if n == 1 {
                    tx.execute(BUMP, &[]).await.map_err(|e| pg_err(&e))?;
                }
                tx.commit().await.map_err(|e| pg_err(&e))?;
                Ok(n == 1)
            })
            .map_err(|e| taken(e, &row.app_id, &row.app_name))?;
        if inserted {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "app {} already exists (see `app show {}`)",
                row.app_id, row.app_id
            )))
        }
    }

    /// One app and its row version.
    fn app_versioned(&self, app_id: &str) -> Result<Option<(AppRow, i64)>> {
        self.with(async |c| {
            let r = c
                .query_opt(
                    &format!("SELECT {COLUMNS} FROM ls_apps WHERE app_id = $1"),
                    &[&app_id],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            r.as_ref().map(app_row).transpose()
        })
    }

    /// Changes an app (as the redb store's `update_app`) in one transaction that reads the
    /// row `FOR UPDATE`, applies `change` to it and writes it back with its version bumped:
    /// two instances editing one app wait for each other and lose neither edit (a transaction
    /// PostgreSQL aborts for a deadlock runs again, `change` applied to the row as it is then).
    /// Returns the new row, or `None` if there is no such app.
    pub fn update_app(
        &self,
        app_id: &str,
        change: &dyn Fn(&mut AppRow),
        new_secret: Option<&SecretString>,
        config_key: Option<&Keyring>,
    ) -> Result<Option<AppRow>> {
        let sealed = new_secret.map(|s| self.seal_app_secret(app_id, s, config_key));
        let secret = sealed.as_ref().map(|(s, _)| sealed_bytes(s));
        let secret_key = sealed.as_ref().map(|(s, _)| i64::from(s.key_id.0));
        let mut name = None;
        self.with(async |c| {
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            let Some(r) = tx
                .query_opt(
                    &format!("SELECT {COLUMNS} FROM ls_apps WHERE app_id = $1 FOR UPDATE"),
                    &[&app_id],
                )
                .await
                .map_err(|e| pg_err(&e))?
            else {
                return Ok(None);
            };
            let (mut row, _) = app_row(&r)?;
            change(&mut row);
            row.app_id = app_id.to_owned();
            validate(app_id, &row.app_name)?;
            if let Some((_, key)) = &sealed {
                row.secret_key = *key;
            }
            row.updated_at = now_ms().max(row.updated_at);
            name = Some(row.app_name.clone());
            tx.execute(
                "UPDATE ls_apps SET app_name = $2, description = $3, status = $4,
                    permissions = $5, updated_at = $6, created_by = $7,
                    secret_sealed_with = $8,
                    secret = COALESCE($9, secret),
                    secret_key = COALESCE($10, secret_key),
                    version = version + 1
                 WHERE app_id = $1",
                &[
                    &app_id,
                    &row.app_name,
                    &row.description,
                    &row.status.as_str(),
                    &row.permissions,
                    &db_time(row.updated_at),
                    &row.created_by,
                    &key_name(row.secret_key),
                    &secret,
                    &secret_key,
                ],
            )
            .await
            .map_err(|e| pg_err(&e))?;
            tx.execute(BUMP, &[]).await.map_err(|e| pg_err(&e))?;
            tx.commit().await.map_err(|e| pg_err(&e))?;
            Ok(Some(row))
        })
        .map_err(|e| match e {
            Error::Engine(m) if m.ends_with("(23505)") => Error::Invalid(format!(
                "app name {:?} is already used by another app",
                name.unwrap_or_default()
            )),
            other => other,
        })
    }

    /// One app, without its secret.
    pub fn get_app(&self, app_id: &str) -> Result<Option<AppRow>> {
        Ok(self.app_versioned(app_id)?.map(|(r, _)| r))
    }

    /// Every app, by app id, without secrets.
    pub fn list_apps(&self) -> Result<Vec<AppRow>> {
        self.with(async |c| {
            let rows = c
                .query(
                    &format!("SELECT {COLUMNS} FROM ls_apps ORDER BY app_id"),
                    &[],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            rows.iter().map(|r| app_row(r).map(|(a, _)| a)).collect()
        })
    }

    /// Every app with its sealed secret, by app id (what a copy moves; never opened here).
    pub fn sealed_apps(&self) -> Result<Vec<SealedApp>> {
        self.with(async |c| sealed_apps_in(&*c).await)
    }

    /// Removes an app's row (hard delete). True if it was there.
    pub fn remove_app(&self, app_id: &str) -> Result<bool> {
        self.with(async |c| {
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            let n = tx
                .execute("DELETE FROM ls_apps WHERE app_id = $1", &[&app_id])
                .await
                .map_err(|e| pg_err(&e))?;
            if n == 1 {
                tx.execute(BUMP, &[]).await.map_err(|e| pg_err(&e))?;
            }
            tx.commit().await.map_err(|e| pg_err(&e))?;
            Ok(n == 1)
        })
    }

    /// Opens an app's secret (as the redb store's `app_secret`): one sealed under the config
    /// key needs `config_key`; without it this refuses ([`Error::Decrypt`]).
    pub fn app_secret(
        &self,
        app_id: &str,
        config_key: Option<&Keyring>,
    ) -> Result<Option<SecretString>> {
        let found = self.with(async |c| {
            let r = c
                .query_opt(
                    "SELECT secret_sealed_with, secret, secret_key FROM ls_apps WHERE app_id = $1",
                    &[&app_id],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            r.map(|r| -> Result<(String, Option<Sealed>)> {
                Ok((
                    r.try_get(0).map_err(|e| pg_err(&e))?,
                    sealed_from(
                        APPS_TABLE,
                        Some(r.try_get(1).map_err(|e| pg_err(&e))?),
                        Some(r.try_get(2).map_err(|e| pg_err(&e))?),
                    )?,
                ))
            })
            .transpose()
        })?;
        let Some((with, sealed)) = found else {
            return Ok(None);
        };
        let sealed = sealed.ok_or_else(|| decode_err("no secret".to_owned()))?;
        let ring = match (with.as_str(), config_key) {
            ("store", _) => self.ring(),
            ("config", Some(k)) => k,
            ("config", None) => {
                return Err(Error::Decrypt {
                    table: APPS_TABLE,
                    detail: format!(
                        "the secret of app {app_id} is sealed under LARK_CONFIG_ENCRYPTION_KEY, which is not set"
                    ),
                })
            }
            (other, _) => return Err(decode_err(format!("secret sealed with {other:?}"))),
        };
        ring.open_str(&sealed, &place(app_id))
            .map(Some)
            .map_err(|e| Error::Decrypt {
                table: APPS_TABLE,
                detail: format!("app {app_id}: {e}"),
            })
    }

    /// Deletes an app (as the redb store's `delete_app`) in one transaction: the app's row
    /// locked `FOR UPDATE` (edits and other deletes of it wait), then the token table locked
    /// in `SHARE` mode, which waits for the token writes in flight to commit and holds back new
    /// ones (of any app) until this transaction ends; reads and row claims go on. So the count
    /// is every token the app has, none can be stored between the count and the delete, and an
    /// app with tokens is refused unless `force`. Soft (status `deleted`) unless `hard`.
    /// Deletes are rare admin operations and the transaction is a few statements, so the
    /// pause of token writes is short; when it cannot get the lock within 5 s, nothing changes
    /// and it answers [`Error::Unavailable`].
    pub fn delete_app(&self, app_id: &str, force: bool, hard: bool) -> Result<AppDeletion> {
        let now = db_time(now_ms());
        self.with(async |c| {
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            tx.execute(DELETE_LOCK_TIMEOUT, &[])
                .await
                .map_err(|e| pg_err(&e))?;
            let found = tx
                .query_opt(
                    "SELECT 1 FROM ls_apps WHERE app_id = $1 FOR UPDATE",
                    &[&app_id],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            if found.is_none() {
                tx.rollback().await.map_err(|e| pg_err(&e))?;
                return Ok(AppDeletion::NotFound);
            }
            tx.execute("LOCK TABLE ls_tokens IN SHARE MODE", &[])
                .await
                .map_err(|e| pg_err(&e))?;
            let r = tx
                .query_one(
                    "SELECT count(*) FROM ls_tokens WHERE app_id = $1",
                    &[&app_id],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            let n: i64 = r.try_get(0).map_err(|e| pg_err(&e))?;
            let tokens = u64::try_from(n).unwrap_or(0);
            if tokens > 0 && !force {
                tx.rollback().await.map_err(|e| pg_err(&e))?;
                return Ok(AppDeletion::HasTokens(tokens));
            }
            if hard {
                tx.execute("DELETE FROM ls_apps WHERE app_id = $1", &[&app_id])
                    .await
                    .map_err(|e| pg_err(&e))?;
            } else {
                tx.execute(
                    "UPDATE ls_apps SET status = $2, updated_at = GREATEST(updated_at, $3),
                        version = version + 1
                     WHERE app_id = $1",
                    &[&app_id, &AppStatus::Deleted.as_str(), &now],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            }
            tx.execute(BUMP, &[]).await.map_err(|e| pg_err(&e))?;
            tx.commit().await.map_err(|e| pg_err(&e))?;
            Ok(AppDeletion::Deleted(tokens))
        })
        .map_err(|e| match e {
            Error::Engine(m) if m.ends_with("(55P03)") => Error::Unavailable(format!(
                "deleting app {app_id}: token writes in flight did not finish within 5 s; nothing was changed, try again"
            )),
            other => other,
        })
    }

    /// How many user tokens the store holds for `app_id`.
    pub fn app_token_count(&self, app_id: &str) -> Result<u64> {
        self.with(async |c| {
            let r = c
                .query_one(
                    "SELECT count(*) FROM ls_tokens WHERE app_id = $1",
                    &[&app_id],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            let n: i64 = r.try_get(0).map_err(|e| pg_err(&e))?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }

    /// The registry's version: bumped by every write to the registry, from any instance.
    pub fn apps_version(&self) -> Result<u64> {
        self.with(async |c| {
            let r = c
                .query_one("SELECT version FROM ls_apps_version WHERE id = 1", &[])
                .await
                .map_err(|e| pg_err(&e))?;
            let v: i64 = r.try_get(0).map_err(|e| pg_err(&e))?;
            Ok(u64::try_from(v).unwrap_or(0))
        })
    }
}

/// Every app with its sealed secret as `c` sees them (a client, or a copy's snapshot).
pub(crate) async fn sealed_apps_in(
    c: &impl tokio_postgres::GenericClient,
) -> Result<Vec<SealedApp>> {
    let rows = c
        .query(
            &format!("SELECT {COLUMNS}, secret, secret_key FROM ls_apps ORDER BY app_id"),
            &[],
        )
        .await
        .map_err(|e| pg_err(&e))?;
    rows.iter()
        .map(|r| {
            let (row, _) = app_row(r)?;
            let secret = sealed_from(
                APPS_TABLE,
                Some(r.try_get(10).map_err(|e| pg_err(&e))?),
                Some(r.try_get(11).map_err(|e| pg_err(&e))?),
            )?
            .ok_or_else(|| decode_err("no secret".to_owned()))?;
            Ok(SealedApp { row, secret })
        })
        .collect()
}
