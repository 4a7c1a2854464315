//! PostgreSQL connections on the service's trust: the one place a `postgres://` URL becomes a
//! connected client (the session export and the PostgreSQL store both connect through here).
//!
//! TLS follows the URL's `sslmode`: `disable` (plain), `prefer` (the default: TLS when the
//! server offers it), `require`; libpq's `verify-ca` and `verify-full` are taken as `require`.
//! Whenever TLS is used the certificate chain and host name are verified: there is no mode
//! that accepts any certificate.

use tokio_postgres::Client;

use super::Net;

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PgConnectError {
    /// The URL or the TLS setup cannot be used (never contains the URL's password).
    #[error("{0}")]
    Setup(String),
    /// The server refused or is unreachable.
    #[error(transparent)]
    Pg(#[from] tokio_postgres::Error),
}

/// Parses a `postgres://` URL or key-value string, mapping libpq's `sslmode=verify-ca` /
/// `verify-full` to `require` (rustls always verifies the chain and the host name).
pub fn pg_config(url: &str) -> Result<tokio_postgres::Config, PgConnectError> {
    let text = url
        .replace("sslmode=verify-full", "sslmode=require")
        .replace("sslmode=verify-ca", "sslmode=require");
    text.parse::<tokio_postgres::Config>()
        .map_err(|e| PgConnectError::Setup(format!("the connection URL cannot be used: {e}")))
}

/// Connects (TLS per the URL's `sslmode`, verified with `net`'s trust) and drives the
/// connection on the current runtime until the client is dropped.
pub async fn connect_pg(url: &str, net: &Net) -> Result<Client, PgConnectError> {
    let cfg = pg_config(url)?;
    let tls = net
        .postgres_tls()
        .map_err(|e| PgConnectError::Setup(e.to_string()))?;
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "the server".to_owned(),
    };
    let (client, conn) =
        cfg.connect(tls)
            .await
            .map_err(|e| match super::tls::untrusted_certificate(&e, &host) {
                Some(msg) => PgConnectError::Setup(msg),
                None => PgConnectError::Pg(e),
            })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "postgresql connection ended");
        }
    });
    Ok(client)
}
