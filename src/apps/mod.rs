//! The app registry: which Feishu/Lark apps this service serves.
//!
//! Apps are data: rows of the store's `apps` table (added with `lark-service app add`, or
//! through the admin API while the service runs), their secrets sealed under
//! `LARK_CONFIG_ENCRYPTION_KEY` or, when it is unset, under the store's own key ring. The app
//! of the configuration (`APP_ID` / `APP_SECRET`) is one more app: it is listed with source
//! `config`, is always active, and cannot be edited here (change the configuration instead).
//!
//! [`Registry::active`] is what the service runs: one runtime (long connection, OpenAPI client,
//! authorization flow) per active app. [`Registry::default_app`] picks the app a request that
//! names none is for: the only active app, or a refusal when there are several (fail closed).

pub mod routes;

use std::sync::Arc;

use secrecy::SecretString;
use serde::Serialize;

pub use crate::storage::AppStatus;
use crate::storage::{self, now_ms, AppDeletion, AppRow, Db, Keyring, SecretKey};

/// Why a registry operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum AppsError {
    /// No such app (in the store or the configuration).
    #[error("no app {0} (see `lark-service app list --status deleted` for deleted ones)")]
    NotFound(String),
    /// The configuration's app cannot be changed here.
    #[error("app {0} comes from the configuration (APP_ID / APP_SECRET); change it there")]
    FromConfig(String),
    /// Deleting an app that still has user tokens needs `--force`.
    #[error(
        "app {app_id} still has {tokens} stored user token(s); pass --force to delete it anyway"
    )]
    HasTokens {
        /// The app.
        app_id: String,
        /// How many tokens.
        tokens: u64,
    },
    /// `--permissions` is not JSON.
    #[error("permissions must be JSON: {0}")]
    BadPermissions(String),
    /// An argument is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// A request named no app and several are active.
    #[error("several apps are active ({0}); name one with app_id")]
    Ambiguous(String),
    /// A request named no app and none is active.
    #[error("no app is active; add one with `lark-service app add` or set APP_ID / APP_SECRET")]
    NoneActive,
    /// A request named an app that is not active.
    #[error("app {0} is not active")]
    NotActive(String),
    /// The store refused.
    #[error(transparent)]
    Store(#[from] storage::Error),
}

/// Where an app is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `APP_ID` / `APP_SECRET` in the configuration.
    Config,
    /// The store's registry.
    Store,
}

/// An app as `list` and `show` print it: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppView {
    /// The platform's app id.
    pub app_id: String,
    /// The human name.
    pub app_name: String,
    /// Free text.
    pub description: Option<String>,
    /// `active`, `inactive` or `deleted`.
    pub status: &'static str,
    /// JSON, as given.
    pub permissions: Option<serde_json::Value>,
    /// Unix ms (0 for the configuration's app).
    pub created_at: u64,
    /// Unix ms.
    pub updated_at: u64,
    /// Who added it.
    pub created_by: Option<String>,
    /// `config` or `store`.
    pub source: Source,
    /// What seals the secret: `config_encryption_key`, `token_key`, or `configuration` (the
    /// configuration's app: its secret is not in the store).
    pub secret_sealed_with: &'static str,
}

impl AppView {
    fn from_row(r: AppRow) -> Self {
        Self {
            permissions: r
                .permissions
                .as_deref()
                .and_then(|p| serde_json::from_str(p).ok()),
            app_id: r.app_id,
            app_name: r.app_name,
            description: r.description,
            status: r.status.as_str(),
            created_at: r.created_at,
            updated_at: r.updated_at,
            created_by: r.created_by,
            source: Source::Store,
            secret_sealed_with: match r.secret_key {
                SecretKey::Config => "config_encryption_key",
                SecretKey::Store => "token_key",
            },
        }
    }
}

/// `app add`.
#[derive(Debug, Clone)]
pub struct NewApp {
    /// The platform's app id.
    pub app_id: String,
    /// A unique, human name.
    pub app_name: String,
    /// The app secret.
    pub app_secret: SecretString,
    /// Free text.
    pub description: Option<String>,
    /// JSON text.
    pub permissions: Option<String>,
    /// Who adds it.
    pub created_by: Option<String>,
}

/// An app brought from another store (`import python --apps-db`): as `app add`, plus the
/// status and times it had there.
#[derive(Debug, Clone)]
pub struct ImportedApp {
    /// The app.
    pub app: NewApp,
    /// Its status there.
    pub status: AppStatus,
    /// Created there (unix ms).
    pub created_at: Option<u64>,
    /// Last changed there (unix ms).
    pub updated_at: Option<u64>,
}

/// `app update`: each field given replaces the stored one.
#[derive(Debug, Clone, Default)]
pub struct AppChange {
    /// New name.
    pub app_name: Option<String>,
    /// New secret.
    pub app_secret: Option<SecretString>,
    /// New description.
    pub description: Option<String>,
    /// New permissions (JSON text).
    pub permissions: Option<String>,
}

/// An app the service serves, with its secret (never printed: `SecretString`).
#[derive(Debug, Clone)]
pub struct ActiveApp {
    /// The platform's app id.
    pub app_id: String,
    /// Its secret.
    pub app_secret: SecretString,
    /// Where it is defined.
    pub source: Source,
}

/// Active apps that cannot be served, each with why.
pub type Refused = Vec<(String, AppsError)>;

/// The registry over a store, with the configuration's app and the config encryption key.
#[derive(Clone, Debug)]
pub struct Registry {
    store: Db,
    config_key: Option<Arc<Keyring>>,
    config_app: Option<(String, SecretString)>,
    changed: Arc<tokio::sync::Notify>,
}

fn check_permissions(p: Option<&str>) -> Result<(), AppsError> {
    if let Some(p) = p {
        serde_json::from_str::<serde_json::Value>(p)
            .map_err(|e| AppsError::BadPermissions(e.to_string()))?;
    }
    Ok(())
}

fn check_app_id(id: &str) -> Result<(), AppsError> {
    if id.trim().is_empty()
        || id.len() > 64
        || id.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(AppsError::Invalid(format!(
            "app id must be 1 to 64 characters without spaces, got {id:?}"
        )));
    }
    Ok(())
}

impl Registry {
    /// A registry over `store`. `config_key` seals new secrets (else the store's key ring
    /// does); `config_app` is the configuration's `APP_ID` / `APP_SECRET`, when both are set.
    #[must_use]
    pub fn new(
        store: impl Into<Db>,
        config_key: Option<Keyring>,
        config_app: Option<(String, SecretString)>,
    ) -> Self {
        let store: Db = store.into();
        Self {
            store,
            config_key: config_key.map(Arc::new),
            config_app,
            changed: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// From the configuration: its config key and its app.
    ///
    /// # Errors
    /// A config encryption key that does not parse.
    pub fn from_config(
        store: impl Into<Db>,
        cfg: &crate::config::Config,
    ) -> Result<Self, crate::config::ConfigError> {
        let store: Db = store.into();
        let app = match (&cfg.app_id, &cfg.app_secret) {
            (Some(id), Some(s)) if !id.is_empty() => Some((id.clone(), s.clone())),
            _ => None,
        };
        Ok(Self::new(store, cfg.config_keyring()?, app))
    }

    /// The store it reads and writes.
    #[must_use]
    pub fn store(&self) -> &Db {
        &self.store
    }

    /// Wakes when an app is added, changed or removed through this registry (or a clone).
    #[must_use]
    pub fn changed(&self) -> Arc<tokio::sync::Notify> {
        self.changed.clone()
    }

    fn touched(&self) {
        self.changed.notify_waiters();
        self.changed.notify_one();
    }

    fn key(&self) -> Option<&Keyring> {
        self.config_key.as_deref()
    }

    fn config_view(&self) -> Option<AppView> {
        self.config_app.as_ref().map(|(id, _)| AppView {
            app_id: id.clone(),
            app_name: id.clone(),
            description: Some("from the configuration (APP_ID / APP_SECRET)".to_owned()),
            status: AppStatus::Active.as_str(),
            permissions: None,
            created_at: 0,
            updated_at: 0,
            created_by: None,
            source: Source::Config,
            secret_sealed_with: "configuration",
        })
    }

    fn refuse_config_app(&self, app_id: &str) -> Result<(), AppsError> {
        match &self.config_app {
            Some((id, _)) if id == app_id => Err(AppsError::FromConfig(app_id.to_owned())),
            _ => Ok(()),
        }
    }

    /// Every app, the configuration's first; `status` filters. Without a filter, deleted apps
    /// are left out (as the Python CLI does).
    ///
    /// # Errors
    /// The store's.
    pub fn list(&self, status: Option<AppStatus>) -> Result<Vec<AppView>, AppsError> {
        let mut out: Vec<AppView> = self.config_view().into_iter().collect();
        let config_id = self.config_app.as_ref().map(|(id, _)| id.as_str());
        out.extend(
            self.store
                .list_apps()?
                .into_iter()
                .filter(|r| Some(r.app_id.as_str()) != config_id)
                .map(AppView::from_row),
        );
        out.retain(|a| match status {
            Some(s) => a.status == s.as_str(),
            None => a.status != AppStatus::Deleted.as_str(),
        });
        Ok(out)
    }

    /// One app.
    ///
    /// # Errors
    /// [`AppsError::NotFound`], or the store's.
    pub fn show(&self, app_id: &str) -> Result<AppView, AppsError> {
        if let Some(v) = self.config_view().filter(|v| v.app_id == app_id) {
            return Ok(v);
        }
        self.store
            .get_app(app_id)?
            .map(AppView::from_row)
            .ok_or_else(|| AppsError::NotFound(app_id.to_owned()))
    }

    /// Adds an active app.
    ///
    /// # Errors
    /// A duplicate id or name, bad permissions, the configuration's app id, or the store's.
    pub fn add(&self, app: NewApp) -> Result<AppView, AppsError> {
        check_app_id(&app.app_id)?;
        self.refuse_config_app(&app.app_id)?;
        check_permissions(app.permissions.as_deref())?;
        if secrecy::ExposeSecret::expose_secret(&app.app_secret).is_empty() {
            return Err(AppsError::Invalid("the app secret is empty".to_owned()));
        }
        let now = now_ms();
        let row = AppRow {
            app_id: app.app_id.clone(),
            app_name: app.app_name,
            description: app.description,
            status: AppStatus::Active,
            permissions: app.permissions,
            created_at: now,
            updated_at: now,
            created_by: app.created_by,
            secret_key: SecretKey::Store,
        };
        self.store.insert_app(&row, &app.app_secret, self.key())?;
        self.touched();
        self.show(&app.app_id)
    }

    /// Imports an app kept elsewhere (the Python deployment's app store), with its status and
    /// times as they were there. An app id already in the registry, or the configuration's,
    /// is left as it is: `Ok(None)`. Its secret is sealed as `add` seals it.
    ///
    /// # Errors
    /// A bad app id or permissions, an empty secret, a name another app has, or the store's.
    pub fn import(&self, app: ImportedApp) -> Result<Option<AppView>, AppsError> {
        check_app_id(&app.app.app_id)?;
        if self.refuse_config_app(&app.app.app_id).is_err()
            || self.store.get_app(&app.app.app_id)?.is_some()
        {
            return Ok(None);
        }
        check_permissions(app.app.permissions.as_deref())?;
        if secrecy::ExposeSecret::expose_secret(&app.app.app_secret).is_empty() {
            return Err(AppsError::Invalid(format!(
                "app {}: the app secret is empty",
                app.app.app_id
            )));
        }
        let now = now_ms();
        let created_at = app.created_at.unwrap_or(now);
        let row = AppRow {
            app_id: app.app.app_id.clone(),
            app_name: app.app.app_name,
            description: app.app.description,
            status: app.status,
            permissions: app.app.permissions,
            created_at,
            updated_at: app.updated_at.unwrap_or(created_at),
            created_by: app.app.created_by,
            secret_key: SecretKey::Store,
        };
        self.store
            .insert_app(&row, &app.app.app_secret, self.key())?;
        self.touched();
        self.show(&app.app.app_id).map(Some)
    }

    /// Changes the fields given.
    ///
    /// # Errors
    /// Not found, the configuration's app, a name another app has, or the store's.
    pub fn update(&self, app_id: &str, change: AppChange) -> Result<AppView, AppsError> {
        self.refuse_config_app(app_id)?;
        check_permissions(change.permissions.as_deref())?;
        let AppChange {
            app_name,
            app_secret,
            description,
            permissions,
        } = change;
        let row = self.store.update_app(
            app_id,
            // Applied again to a newer row when another instance edited the app meanwhile
            // (PostgreSQL's compare-and-set): it only sets what was given.
            |r| {
                if let Some(n) = &app_name {
                    r.app_name.clone_from(n);
                }
                if let Some(d) = &description {
                    r.description = Some(d.clone());
                }
                if let Some(p) = &permissions {
                    r.permissions = Some(p.clone());
                }
            },
            app_secret.as_ref(),
            self.key(),
        )?;
        let row = row.ok_or_else(|| AppsError::NotFound(app_id.to_owned()))?;
        self.touched();
        Ok(AppView::from_row(row))
    }

    /// Sets an app's status (`enable`: active, `disable`: inactive).
    ///
    /// # Errors
    /// Not found, the configuration's app, or the store's.
    pub fn set_status(&self, app_id: &str, status: AppStatus) -> Result<AppView, AppsError> {
        self.refuse_config_app(app_id)?;
        let row = self
            .store
            .update_app(app_id, |r| r.status = status, None, self.key())?
            .ok_or_else(|| AppsError::NotFound(app_id.to_owned()))?;
        self.touched();
        Ok(AppView::from_row(row))
    }

    /// Deletes an app: soft (status `deleted`, the row stays) unless `hard` (the row goes).
    /// An app with stored user tokens is refused unless `force`. Returns the number of tokens
    /// it had, counted in the transaction that deletes it.
    ///
    /// # Errors
    /// Not found, the configuration's app, tokens without `force`, or the store's.
    pub fn delete(&self, app_id: &str, force: bool, hard: bool) -> Result<u64, AppsError> {
        self.refuse_config_app(app_id)?;
        // The count and the delete are one transaction (`delete_app`): a token stored
        // meanwhile cannot slip past the refusal, nor be left behind uncounted.
        match self.store.delete_app(app_id, force, hard)? {
            AppDeletion::NotFound => Err(AppsError::NotFound(app_id.to_owned())),
            AppDeletion::HasTokens(tokens) => Err(AppsError::HasTokens {
                app_id: app_id.to_owned(),
                tokens,
            }),
            AppDeletion::Deleted(tokens) => {
                self.touched();
                Ok(tokens)
            }
        }
    }

    /// The apps to serve, with their secrets: the configuration's app, then every active app
    /// of the store. A stored secret that does not open is an error (the service does not
    /// silently drop an app it was told to serve).
    ///
    /// # Errors
    /// The store's, or a secret that does not open.
    pub fn active(&self) -> Result<Vec<ActiveApp>, AppsError> {
        let (ok, refused) = self.active_each()?;
        match refused.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(ok),
        }
    }

    /// Like [`Self::active`], but an app whose secret does not open is set apart with its
    /// error instead of failing the whole list: the service serves the others and refuses
    /// only that one (fail closed for it).
    ///
    /// # Errors
    /// The store's.
    pub fn active_each(&self) -> Result<(Vec<ActiveApp>, Refused), AppsError> {
        let mut refused = Vec::new();
        let mut out: Vec<ActiveApp> = self
            .config_app
            .iter()
            .map(|(id, s)| ActiveApp {
                app_id: id.clone(),
                app_secret: s.clone(),
                source: Source::Config,
            })
            .collect();
        for r in self.store.list_apps()? {
            if r.status != AppStatus::Active || out.iter().any(|a| a.app_id == r.app_id) {
                continue;
            }
            match self.store.app_secret(&r.app_id, self.key()) {
                Ok(Some(secret)) => out.push(ActiveApp {
                    app_id: r.app_id,
                    app_secret: secret,
                    source: Source::Store,
                }),
                Ok(None) => refused.push((r.app_id.clone(), AppsError::NotFound(r.app_id))),
                Err(e) => refused.push((r.app_id, AppsError::Store(e))),
            }
        }
        Ok((out, refused))
    }
}

/// The app a request is for: the one it names (which must be among `active`), or, when it
/// names none, the only active app. Several active and none named is refused (fail closed).
///
/// # Errors
/// [`AppsError::Ambiguous`], [`AppsError::NoneActive`] or [`AppsError::NotActive`].
pub fn pick<'a>(active: &'a [String], named: Option<&str>) -> Result<&'a str, AppsError> {
    match named.map(str::trim).filter(|s| !s.is_empty()) {
        Some(id) => active
            .iter()
            .find(|a| a.as_str() == id)
            .map(String::as_str)
            .ok_or_else(|| AppsError::NotActive(id.to_owned())),
        None => match active {
            [] => Err(AppsError::NoneActive),
            [only] => Ok(only.as_str()),
            many => Err(AppsError::Ambiguous(many.join(", "))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Store;
    use crate::storage::{Key, StoreOptions};

    fn registry(config_app: bool) -> Registry {
        let store = Store::open_in_memory(
            Keyring::new(Key::from_bytes(&[3u8; 32]), vec![]),
            StoreOptions::default(),
        )
        .unwrap();
        Registry::new(
            store,
            None,
            config_app.then(|| {
                (
                    "cli_cfg".to_owned(),
                    SecretString::from("cfg-secret".to_owned()),
                )
            }),
        )
    }

    fn new_app(id: &str) -> NewApp {
        NewApp {
            app_id: id.into(),
            app_name: format!("name of {id}"),
            app_secret: SecretString::from(format!("secret of {id}")),
            description: None,
            permissions: Some(r#"["im:message"]"#.into()),
            created_by: None,
        }
    }

    #[test]
    fn pick_defaults_to_the_only_active_app_and_refuses_when_several() {
        let one = vec!["a".to_owned()];
        let two = vec!["a".to_owned(), "b".to_owned()];
        assert_eq!(pick(&one, None).unwrap(), "a");
        assert_eq!(pick(&two, Some("b")).unwrap(), "b");
        assert!(matches!(pick(&two, None), Err(AppsError::Ambiguous(_))));
        assert!(matches!(
            pick(&two, Some("c")),
            Err(AppsError::NotActive(_))
        ));
        assert!(matches!(pick(&[], None), Err(AppsError::NoneActive)));
    }

    #[test]
    fn the_config_app_is_listed_active_and_not_editable() {
        let r = registry(true);
        r.add(new_app("cli_b")).unwrap();
        let ids: Vec<_> = r
            .list(None)
            .unwrap()
            .into_iter()
            .map(|a| (a.app_id, a.source))
            .collect();
        assert_eq!(
            ids,
            [
                ("cli_cfg".to_owned(), Source::Config),
                ("cli_b".to_owned(), Source::Store)
            ]
        );
        assert!(matches!(
            r.set_status("cli_cfg", AppStatus::Inactive),
            Err(AppsError::FromConfig(_))
        ));
        assert!(matches!(
            r.delete("cli_cfg", true, true),
            Err(AppsError::FromConfig(_))
        ));
        assert!(matches!(
            r.add(new_app("cli_cfg")),
            Err(AppsError::FromConfig(_))
        ));
        let active: Vec<_> = r.active().unwrap().into_iter().map(|a| a.app_id).collect();
        assert_eq!(active, ["cli_cfg", "cli_b"]);
    }

    #[test]
    fn an_app_whose_secret_does_not_open_is_refused_alone() {
        let store = Store::open_in_memory(
            Keyring::new(Key::from_bytes(&[3u8; 32]), vec![]),
            StoreOptions::default(),
        )
        .unwrap();
        let with_key = Registry::new(
            store.clone(),
            Some(Keyring::new(Key::from_bytes(&[4u8; 32]), vec![])),
            None,
        );
        with_key.add(new_app("cli_sealed")).unwrap();
        let without = Registry::new(store, None, None);
        without.add(new_app("cli_plain")).unwrap();
        let (ok, refused) = without.active_each().unwrap();
        let ok: Vec<_> = ok.into_iter().map(|a| a.app_id).collect();
        assert_eq!(ok, ["cli_plain"]);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0, "cli_sealed");
        assert!(without.active().is_err());
        assert_eq!(with_key.active().unwrap().len(), 2);
    }

    #[test]
    fn disable_soft_and_hard_delete_change_what_is_active() {
        let r = registry(false);
        r.add(new_app("cli_a")).unwrap();
        r.add(new_app("cli_b")).unwrap();
        r.set_status("cli_b", AppStatus::Inactive).unwrap();
        let active: Vec<_> = r.active().unwrap().into_iter().map(|a| a.app_id).collect();
        assert_eq!(active, ["cli_a"]);
        r.delete("cli_a", false, false).unwrap();
        assert_eq!(r.show("cli_a").unwrap().status, "deleted");
        assert!(r.list(None).unwrap().iter().all(|a| a.app_id != "cli_a"));
        assert_eq!(r.list(Some(AppStatus::Deleted)).unwrap().len(), 1);
        r.delete("cli_a", false, true).unwrap();
        assert!(matches!(r.show("cli_a"), Err(AppsError::NotFound(_))));
        assert!(r.active().unwrap().is_empty());
        assert!(matches!(
            r.add(NewApp {
                permissions: Some("{not json".into()),
                ..new_app("cli_c")
            }),
            Err(AppsError::BadPermissions(_))
        ));
    }
}
