//! `serve --sandbox`: the platform imitation beside the service, and the secrets a developer
//! without a Feishu account lacks.

use std::path::{Path, PathBuf};

use secrecy::SecretString;
use tracing::info;

use super::DaemonError;
use crate::config::Config;

/// Files `serve --sandbox` keeps beside the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxFiles {
    /// The file holding the generated admin token; `None` when `admin_token` was configured.
    pub admin_token_file: Option<PathBuf>,
}

/// Fills what a developer without a Feishu account lacks: sandbox app credentials, a token key
/// and an admin token kept beside the store (each generated on first use, mode 0600). Settings
/// given explicitly are kept.
pub fn sandbox_defaults(cfg: &mut Config) -> Result<SandboxFiles, DaemonError> {
    // The sandbox platform (started once the listener is bound) supplies the app identity.
    cfg.app_id = Some(crate::sandbox::APP_ID.to_owned());
    cfg.app_secret = Some(SecretString::from(crate::sandbox::APP_SECRET.to_owned()));
    let dir = cfg
        .storage_path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    if cfg.token_key.is_none() {
        cfg.token_key = Some(generated_secret(
            &dir.join("sandbox-token.key"),
            "token key",
        )?);
    }
    let mut files = SandboxFiles::default();
    if cfg.admin_token.is_none() {
        let path = dir.join("sandbox-admin-token");
        cfg.admin_token = Some(generated_secret(&path, "admin token")?);
        files.admin_token_file = Some(path);
    }
    Ok(files)
}

/// Reads the secret in `path`, generating it (mode 0600) first if the file does not exist.
fn generated_secret(path: &Path, what: &'static str) -> Result<SecretString, DaemonError> {
    let file_error = |action, source| DaemonError::SandboxFile {
        action,
        path: path.to_owned(),
        source,
    };
    if !path.exists() {
        let (_, text) = crate::storage::Key::generate();
        crate::fsutil::write_private(path, secrecy::ExposeSecret::expose_secret(&text))
            .map_err(DaemonError::PrivateFile)?;
        info!(path = %path.display(), "Generated a sandbox {what}.");
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| file_error("reading", e))?,
    );
    let text = text.trim();
    if text.is_empty() {
        return Err(DaemonError::EmptySecret {
            path: path.to_owned(),
            what,
        });
    }
    Ok(SecretString::from(text.to_owned()))
}

/// Starts the platform imitation beside the service and points the service at it.
pub(super) async fn start_sandbox(
    cfg: &mut Config,
    http: std::net::SocketAddr,
    admin_addr: std::net::SocketAddr,
    files: SandboxFiles,
    tls: bool,
) -> Result<crate::sandbox::Sandbox, DaemonError> {
    let admin = cfg
        .admin_token
        .clone()
        .ok_or_else(|| DaemonError::Sandbox("the sandbox has no admin token".to_owned()))?;
    let service = format!("http://{http}");
    // The sandbox page calls the admin API, which is on the admin listener.
    let admin_url = format!("http://{admin_addr}");
    let sandbox = crate::sandbox::Sandbox::start(crate::sandbox::SandboxOptions {
        request_auth_url: Some(format!("{admin_url}/api/v1/auth/requests")),
        service_url: Some(admin_url.clone()),
        admin_token: Some(secrecy::ExposeSecret::expose_secret(&admin).to_owned()),
        admin_token_file: files.admin_token_file.as_deref().map(absolute),
        tls,
        ..crate::sandbox::SandboxOptions::default()
    })
    .await
    .map_err(|e| DaemonError::Sandbox(e.to_string()))?;
    if let Some(pem) = sandbox.ca_pem() {
        // Trusted the way a company CA is: through tls.ca_file, not a bypass.
        let dir = cfg.storage_path.parent().unwrap_or(Path::new("."));
        let ca_path = dir.join("sandbox-ca.pem");
        std::fs::create_dir_all(dir).map_err(|source| DaemonError::SandboxFile {
            action: "creating",
            path: dir.to_owned(),
            source,
        })?;
        std::fs::write(&ca_path, pem).map_err(|source| DaemonError::SandboxFile {
            action: "writing the sandbox CA to",
            path: ca_path.clone(),
            source,
        })?;
        info!(path = %ca_path.display(), "The sandbox serves HTTPS and WSS; its CA is trusted through tls.ca_file.");
        cfg.network.ca_file = Some(ca_path);
    }
    cfg.domain = sandbox.base_url();
    cfg.app_id = Some(crate::sandbox::APP_ID.to_owned());
    cfg.app_secret = Some(SecretString::from(crate::sandbox::APP_SECRET.to_owned()));
    if cfg.public_url.is_none() && cfg.auth.redirect_uri.is_none() {
        cfg.auth.redirect_uri = url::Url::parse(&format!("{service}/oauth/callback")).ok();
    }
    println!(
        "sandbox: a local imitation of Feishu runs at {0}/ — open it in a browser, press \"Ask … to authorize\", then the card's Authorize button, and approve",
        sandbox.base_url()
    );
    if let Some(path) = &files.admin_token_file {
        println!(
            "sandbox: the admin token (bearer for {admin_url}/api/v1/…) is in {}",
            absolute(path).display()
        );
    }
    Ok(sandbox)
}

/// `path` made absolute against the working directory (as it is, if that cannot be read).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}
