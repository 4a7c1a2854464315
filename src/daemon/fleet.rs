//! Serving from PostgreSQL: opening the shared store, refusing at start what only the redb
//! store has, and this instance's name among the fleet's (its lease holder id).

use secrecy::{ExposeSecret, SecretString};
use tracing::info;

use super::error::DaemonError;
use crate::config::Config;
use crate::storage::postgres::{PgOptions, PgStore};
use crate::storage::{Db, Error};

/// What is configured that the PostgreSQL store does not serve in this build, each with what
/// to do instead. Empty when the configuration can be served.
#[must_use]
pub fn redb_only_features(cfg: &Config) -> Vec<&'static str> {
    let mut off = Vec::new();
    if cfg.backup.schedule.is_some() {
        off.push(
            "backup.schedule (BACKUP_SCHEDULE): back the database up with PostgreSQL's own tools \
             (pg_dump, base backups) and unset it",
        );
    }
    if cfg.webhooks.enabled() {
        off.push(
            "webhooks.urls (WEBHOOKS_URLS): the webhook outbox is kept in redb only; unset it",
        );
    }
    if !cfg.webhooks.reminder_lead.is_zero() {
        off.push(
            "webhooks.expiry_reminder_lead_seconds (WEBHOOKS_EXPIRY_REMINDER_LEAD_SECONDS): the \
             grants it reads are kept in redb only; set it to 0",
        );
    }
    off
}

/// Opens the PostgreSQL store at `url` (off the async threads), after refusing a configuration
/// it cannot serve: fail closed, at start, naming every setting, rather than a feature that
/// silently does nothing on a fleet.
///
/// # Errors
/// A redb-only feature configured, a bad key, an unreachable or newer database.
pub async fn open_postgres(cfg: &Config, url: &SecretString) -> Result<Db, DaemonError> {
    let off = redb_only_features(cfg);
    if !off.is_empty() {
        return Err(DaemonError::Store(Error::Invalid(format!(
            "storage.backend = \"postgres\" does not serve these yet: {}",
            off.join("; ")
        ))));
    }
    let ring = cfg.keyring()?;
    let net = crate::net::Net::new(&cfg.network.net_options())
        .map_err(|e| DaemonError::Network(e.to_string()))?;
    let url = url.expose_secret().to_owned();
    let opts = PgOptions {
        terminal_retention: cfg.session_retention,
        change_feed: cfg.export_postgres_url.is_some(),
        ..PgOptions::default()
    };
    let store = tokio::task::spawn_blocking(move || PgStore::open(&url, &net, ring, opts))
        .await
        .map_err(|e| Error::Join(e.to_string()))??;
    info!(
        key = %store.active_key_id(),
        "Serving from PostgreSQL (storage.backend = \"postgres\"); backups, webhooks, the app registry and key rotation are redb only."
    );
    Ok(store.into())
}
