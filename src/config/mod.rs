//! Configuration: defaults < `config.toml` < systemd credentials < environment < `--set` flags.
//!
//! Owns reading, layering and validating every setting (see `settings.rs` for the catalogue).
//! Errors name the key, where the value came from, the bad value (never a secret's) and what
//! was expected; the binary exits with 64 (EX_USAGE) on any of them.

pub mod fernet;
mod limits;
pub use limits::{HttpLimits, McpLimits, CLIENT_REQUESTS_PER_MINUTE, GLOBAL_REQUESTS_PER_MINUTE};
mod secrets;
pub(crate) use secrets::read_secret_file;
pub mod settings;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use url::Url;

use crate::storage::{Key, Keyring};
use settings::{Setting, SETTINGS};

/// The packaged config path, used when `--config` is not given and the file exists.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/lark-service/config.toml";

/// Exit code for configuration errors (sysexits EX_USAGE).
pub const EX_USAGE: i32 = 64;

/// Shortest `admin_token` / `mcp_token` accepted, in bytes: a bearer token guards tokens and
/// messaging, so it must not be guessable.
pub const MIN_BEARER_BYTES: usize = 32;

/// Reads environment variables. Tests pass a map instead of touching the process environment.
pub trait Env {
    /// The variable's value, if set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Built-in default.
    Default,
    /// The TOML file.
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// A `--set` flag.
    Flag,
    /// A secret read from this file (named by `*_file`, `*_FILE` or a systemd credential).
    SecretFile(PathBuf),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => f.write_str("default"),
            Self::File(p) => write!(f, "file {}", p.display()),
            Self::Env(n) if n.is_empty() => f.write_str("environment"),
            Self::Env(n) => write!(f, "environment {n}"),
            Self::Flag => f.write_str("--set flag"),
            Self::SecretFile(p) => write!(f, "secret file {}", p.display()),
        }
    }
}

/// A configuration error. Never carries a secret's value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value did not parse or is out of range.
    #[error("config error: {key} ({origin}){}: expected {expected}", value.as_ref().map(|v| format!(" = {v:?}")).unwrap_or_default())]
    Invalid {
        /// The key as the user wrote it (TOML key or environment name).
        key: String,
        /// Where the value came from.
        origin: Source,
        /// The value, absent for secrets.
        value: Option<String>,
        /// What would have been accepted.
        expected: String,
    },
    /// A required setting is not set anywhere.
    #[error(
        "config error: {key} is not set: {expected} (set `{key}` in the config file, or {env})"
    )]
    Missing {
        /// TOML key.
        key: String,
        /// How to set it through the environment.
        env: String,
        /// What it must hold.
        expected: String,
    },
    /// An unknown key in the TOML file.
    #[error("config error: unknown key `{key}` in {file}; `lark-service config check --list` shows every key")]
    UnknownKey {
        /// The key.
        key: String,
        /// The file.
        file: PathBuf,
    },
    /// The config or a secret file could not be read or parsed.
    #[error("config error: cannot use {path}: {detail}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// A secret file is readable by group or others.
    #[error("config error: secret file {path} for {key} is readable by group or others (mode {mode:04o}); run `chmod 600 {path}`")]
    SecretFileMode {
        /// The setting.
        key: String,
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The config file holds a secret inline and is readable by group or others.
    #[error("config error: {path} holds {key} inline and is readable by group or others (mode {mode:04o}); move the secret to {key}_file (a file of mode 0600) or run `chmod 600 {path}`")]
    ConfigFileMode {
        /// The first secret found inline.
        key: String,
        /// The config file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A secret set both inline and as a file at the same level.
    #[error("config error: {key} is set both inline and as a file in {origin}; keep one")]
    Conflict {
        /// The setting.
        key: String,
        /// The layer.
        origin: Source,
    },
}

/// A resolved value and where it came from.
#[derive(Clone, Debug)]
pub(crate) enum Value {
    Plain(String),
    Secret(SecretString),
}

/// The validated configuration.
#[derive(Debug)]
pub struct Config {
    /// App id.
    pub app_id: Option<String>,
    /// App secret.
    pub app_secret: Option<SecretString>,
    /// `feishu`, `lark` or a base URL.
    pub domain: String,
    /// Token key (hex).
    pub token_key: Option<SecretString>,
    /// Older token keys (hex).
    pub previous_keys: Vec<SecretString>,
    /// Event encrypt key.
    pub encrypt_key: Option<SecretString>,
    /// Event verification token.
    pub verification_token: Option<SecretString>,
    /// Admin API bearer token.
    pub admin_token: Option<SecretString>,
    /// MCP endpoint bearer token; `None` disables `/mcp`.
    pub mcp_token: Option<SecretString>,
    /// PostgreSQL URL of the continuous session export; `None`: no export.
    pub export_postgres_url: Option<SecretString>,
    /// The store file.
    pub storage_path: PathBuf,
    /// Which store backs the service (`storage.backend`).
    pub storage_backend: StorageBackend,
    /// Retention of finished sessions.
    pub session_retention: Duration,
    /// Sweep interval.
    pub sweep_interval: Duration,
    /// Backups.
    pub backup: BackupConfig,
    /// Long connection.
    pub websocket: WebsocketConfig,
    /// Authorization.
    pub auth: AuthConfig,
    /// User info sync.
    pub user_info_sync: UserInfoSyncConfig,
    /// Logging.
    pub log: LogConfig,
    /// `/metrics` listener.
    pub metrics_addr: SocketAddr,
    /// Public HTTP listener (OAuth redirect, callbacks, health).
    pub http_listen: SocketAddr,
    /// Admin listener (admin API, `/mcp`).
    pub admin_listen: SocketAddr,
    /// Bounds of every listener.
    pub http_limits: HttpLimits,
    /// Request limits of `/mcp`.
    pub mcp_limits: McpLimits,
    /// Public base URL of the HTTP listener.
    pub public_url: Option<Url>,
    /// Trust and proxy for outgoing connections.
    pub network: NetworkConfig,
    /// Outgoing webhooks and expiry reminders.
    pub webhooks: WebhooksConfig,
    resolved: BTreeMap<&'static str, (Value, Source)>,
}

/// Trust and proxy settings for outgoing connections (see [`crate::net`]).
#[derive(Debug, Clone, Default)]
pub struct NetworkConfig {
    /// `tls.ca_file`.
    pub ca_file: Option<PathBuf>,
    /// `SSL_CERT_FILE`.
    pub ssl_cert_file: Option<PathBuf>,
    /// `SSL_CERT_DIR` entries.
    pub ssl_cert_dirs: Vec<PathBuf>,
    /// Proxy URL (may hold credentials).
    pub proxy: Option<SecretString>,
    /// `NO_PROXY`.
    pub no_proxy: Option<String>,
}

impl NetworkConfig {
    /// The options [`crate::net::Net::new`] takes.
    #[must_use]
    pub fn net_options(&self) -> crate::net::NetOptions {
        crate::net::NetOptions {
            trust: crate::net::TrustOptions {
                ca_files: self
                    .ca_file
                    .iter()
                    .chain(self.ssl_cert_file.iter())
                    .cloned()
                    .collect(),
                ca_dirs: self.ssl_cert_dirs.clone(),
            },
            proxy: self.proxy.clone(),
            no_proxy: self.no_proxy.clone(),
        }
    }
}

/// Backup settings.
#[derive(Debug, Clone)]
pub struct BackupConfig {
    /// Directory of scheduled backups.
    pub dir: Option<PathBuf>,
    /// Cron schedule; `None`: no scheduled backups.
    pub schedule: Option<String>,
    /// Backups kept.
    pub keep: usize,
    /// age recipients.
    pub recipients: Vec<String>,
    /// Passphrase.
    pub passphrase: Option<SecretString>,
}

/// Long connection settings.
#[derive(Debug, Clone)]
pub struct WebsocketConfig {
    /// Hold the long connection at all.
    pub enabled: bool,
    /// Reconnect attempts before giving up; negative: no limit.
    pub max_reconnect_retries: i64,
    /// Ping interval until the server sends one.
    pub heartbeat_interval: Duration,
    /// Serve HTTP callbacks while the socket is down.
    pub fallback_to_http: bool,
    /// While the platform refuses the credentials, dial again this often.
    pub credential_retry: Duration,
    /// Event handlers allowed to run at once.
    pub max_concurrent_handlers: usize,
}

/// Authorization settings.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// Pending session lifetime.
    pub session_expiry: Duration,
    /// Share of token lifetime after which to refresh.
    pub token_refresh_threshold: f64,
    /// Requests per user per window.
    pub request_rate_limit: u32,
    /// Rate-limit window.
    pub rate_limit_window: Duration,
    /// OAuth redirect URI.
    pub redirect_uri: Option<Url>,
    /// Scopes of a request a user starts with `/authorize`.
    pub default_scopes: Vec<String>,
    /// Tokens refreshed at once by the refresh worker.
    pub refresh_concurrency: usize,
    /// Send a new card when a refresh token is refused for good.
    pub resend_card_on_reauth: bool,
    /// How the card's Authorize button authorizes (`auth.flow`).
    pub flow: AuthFlow,
    /// How the cards look.
    pub card: CardConfig,
}

/// How a user authorizes (`auth.flow`, env `AUTH_FLOW`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuthFlow {
    /// The OAuth redirect to `/oauth/callback` (needs a URL users' browsers reach); the
    /// default.
    #[default]
    Redirect,
    /// The device authorization grant: the user approves on the platform's page and the
    /// service polls; nothing needs to reach the service.
    Device,
    /// Device when neither `http.public_url` nor `auth.redirect_uri` is set, else redirect.
    Auto,
}

impl AuthFlow {
    /// `redirect`, `device` or `auto`; `None` for anything else.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "redirect" => Some(Self::Redirect),
            "device" => Some(Self::Device),
            "auto" => Some(Self::Auto),
            _ => None,
        }
    }
}

/// The language of the cards users get (`card.locale`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CardLocale {
    /// 简体中文 (the default, as the Python deployment's cards).
    #[default]
    Zh,
    /// English.
    En,
}

impl CardLocale {
    /// `zh` (also `zh-CN`, `zh_cn`) or `en` (also `en-US`, …); `None` for anything else.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        let t = text.trim().to_ascii_lowercase();
        if t == "zh" || t.starts_with("zh-") || t.starts_with("zh_") {
            Some(Self::Zh)
        } else if t == "en" || t.starts_with("en-") || t.starts_with("en_") {
            Some(Self::En)
        } else {
            None
        }
    }
}

/// Card settings (`card.*`).
#[derive(Debug, Clone)]
pub struct CardConfig {
    /// Language of every card.
    pub locale: CardLocale,
    /// Detailed (true) or short description on the Authorize card.
    pub include_description: bool,
    /// Privacy-policy link on the Authorize card.
    pub privacy_policy_url: Option<Url>,
    /// Card template id for the Authorize card.
    pub template_id: Option<String>,
}

/// User info sync settings.
#[derive(Debug, Clone)]
pub struct UserInfoSyncConfig {
    /// On or off.
    pub enabled: bool,
    /// Cron expression.
    pub schedule: String,
}

/// Logging settings.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Level or filter.
    pub level: String,
    /// JSON lines.
    pub json: bool,
}

/// What to load.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// `--config`; when `None`, [`DEFAULT_CONFIG_PATH`] is read if it exists.
    pub config_path: Option<PathBuf>,
    /// `--set key=value` pairs (TOML keys), highest precedence.
    pub overrides: Vec<(String, String)>,
}

impl Config {
    /// `config_encryption_key` (`LARK_CONFIG_ENCRYPTION_KEY`), the key of the Python
    /// deployment's app store, checked at load to be a Fernet key or 64 hex characters.
    #[must_use]
    pub fn config_encryption_key(&self) -> Option<SecretString> {
        match self.resolved.get("config_encryption_key") {
            Some((Value::Secret(v), _)) => {
                Some(v.clone()).filter(|v| !v.expose_secret().trim().is_empty())
            }
            _ => None,
        }
    }

    /// Loads from the process environment and files.
    pub fn load(opts: &LoadOptions) -> Result<Self, ConfigError> {
        Self::load_with(opts, &ProcessEnv)
    }

    /// Loads with an explicit environment (tests).
    pub fn load_with(opts: &LoadOptions, env: &dyn Env) -> Result<Self, ConfigError> {
        Self::load_with_default(opts, env, Some(Path::new(DEFAULT_CONFIG_PATH)))
    }

    /// Loads with an explicit environment and default config file: `default_config` is read
    /// when `--config` is not given and it exists; `None` reads no file unless `--config` names
    /// one (`serve --sandbox` keeps away from the production config this way).
    pub fn load_with_default(
        opts: &LoadOptions,
        env: &dyn Env,
        default_config: Option<&Path>,
    ) -> Result<Self, ConfigError> {
        let mut layers = Layers::default();
        let path = match &opts.config_path {
            Some(p) => Some(p.clone()),
            None => default_config.map(Path::to_owned).filter(|p| p.exists()),
        };
        if let Some(path) = path {
            layers.read_toml(&path)?;
        }
        if let Some(dir) = env.var("CREDENTIALS_DIRECTORY") {
            layers.read_credentials(Path::new(&dir))?;
        }
        layers.read_env(env)?;
        layers.read_flags(&opts.overrides)?;
        Self::from_resolved(layers.values)
    }

    fn from_resolved(
        resolved: BTreeMap<&'static str, (Value, Source)>,
    ) -> Result<Self, ConfigError> {
        let r = Reader { r: &resolved };
        let domain = r.plain("domain").unwrap_or_default();
        r.check(
            "domain",
            &domain,
            valid_domain,
            "feishu, lark, or an http(s) URL",
        )?;
        let sync_schedule = r.plain("user_info_sync.schedule").unwrap_or_default();
        r.check(
            "user_info_sync.schedule",
            &sync_schedule,
            |s| crate::schedule::Schedule::parse(s).is_ok(),
            "a 5-field cron expression such as \"0 2 * * *\"",
        )?;
        let previous_keys = r
            .secret("token_encryption_previous_keys")
            .map(|s| {
                s.expose_secret()
                    .split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(|k| SecretString::from(k.to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let cfg = Self {
            app_id: r.plain("app_id").filter(|s| !s.is_empty()),
            app_secret: r.secret("app_secret"),
            domain,
            token_key: r.secret("token_encryption_key"),
            previous_keys,
            encrypt_key: r.secret("encrypt_key"),
            verification_token: r.secret("verification_token"),
            admin_token: r.secret("admin_token"),
            mcp_token: r.secret("mcp_token"),
            export_postgres_url: r.secret("export.postgres_url"),
            storage_path: PathBuf::from(r.plain("storage.path").unwrap_or_default()),
            storage_backend: storage_backend(&r)?,
            session_retention: r.secs("storage.session_retention_seconds", 1, 10 * 365 * 86400)?,
            sweep_interval: r.secs("storage.sweep_interval_seconds", 1, 86400)?,
            backup: BackupConfig {
                dir: r
                    .plain("backup.dir")
                    .filter(|d| !d.trim().is_empty())
                    .map(PathBuf::from),
                schedule: r.plain("backup.schedule").filter(|d| !d.trim().is_empty()),
                keep: usize::try_from(r.int(
                    "backup.keep",
                    1,
                    10_000,
                    "a whole number from 1 to 10000",
                )?)
                .unwrap_or(7),
                recipients: r
                    .plain("backup.recipients")
                    .map(|l| {
                        l.split(',')
                            .map(str::trim)
                            .filter(|x| !x.is_empty())
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default(),
                passphrase: r.secret("backup.passphrase"),
            },
            websocket: WebsocketConfig {
                enabled: r.boolean("websocket.enabled")?,
                max_reconnect_retries: r.int(
                    "websocket.max_reconnect_retries",
                    -1,
                    1_000_000,
                    "a whole number, -1 for no limit",
                )?,
                heartbeat_interval: r.secs("websocket.heartbeat_interval", 1, 3600)?,
                fallback_to_http: r.boolean("websocket.fallback_to_http")?,
                credential_retry: r.secs("websocket.credential_retry_seconds", 1, 86_400)?,
                max_concurrent_handlers: usize::try_from(r.int(
                    "websocket.max_concurrent_handlers",
                    1,
                    100_000,
                    "a whole number from 1 to 100000",
                )?)
                .unwrap_or(256),
            },
            auth: AuthConfig {
                session_expiry: r.secs("auth.session_expiry_seconds", 10, 7 * 86400)?,
                token_refresh_threshold: r.fraction("auth.token_refresh_threshold")?,
                request_rate_limit: u32::try_from(r.int(
                    "auth.request_rate_limit",
                    1,
                    100_000,
                    "a whole number from 1 to 100000",
                )?)
                .unwrap_or(1),
                rate_limit_window: r.secs("auth.rate_limit_window_seconds", 1, 86400)?,
                redirect_uri: r.url("auth.redirect_uri")?,
                default_scopes: r
                    .plain("auth.default_scopes")
                    .unwrap_or_default()
                    .split(|c: char| c == ',' || c.is_whitespace())
                    .filter(|x| !x.is_empty())
                    .map(str::to_owned)
                    .collect(),
                refresh_concurrency: usize::try_from(r.int(
                    "auth.refresh_concurrency",
                    1,
                    64,
                    "a whole number from 1 to 64",
                )?)
                .unwrap_or(4),
                resend_card_on_reauth: r.boolean("auth.resend_card_on_reauth")?,
                flow: {
                    let text = r.plain("auth.flow").unwrap_or_default();
                    AuthFlow::parse(&text).ok_or_else(|| {
                        r.invalid("auth.flow", Some(&text), "redirect, device or auto")
                    })?
                },
                card: CardConfig {
                    locale: {
                        let text = r.plain("card.locale").unwrap_or_default();
                        CardLocale::parse(&text)
                            .ok_or_else(|| r.invalid("card.locale", Some(&text), "zh or en"))?
                    },
                    include_description: r.boolean("card.include_description")?,
                    privacy_policy_url: r.url("card.privacy_policy_url")?,
                    template_id: r
                        .plain("card.template_id")
                        .map(|t| t.trim().to_owned())
                        .filter(|t| !t.is_empty()),
                },
            },
            user_info_sync: UserInfoSyncConfig {
                enabled: r.boolean("user_info_sync.enabled")?,
                schedule: sync_schedule,
            },
            log: LogConfig {
                level: r.plain("log.level").unwrap_or_default(),
                json: r.boolean("log.json_format")?,
            },
            metrics_addr: SocketAddr::new(
                r.parse::<IpAddr>("metrics.bind", "an IP address such as 127.0.0.1")?,
                u16::try_from(r.int("metrics.port", 0, 65535, "a port number from 0 to 65535")?)
                    .unwrap_or(0),
            ),
            http_listen: http_listen(&r)?,
            admin_listen: r.parse("admin.listen", "an address such as 127.0.0.1:8081")?,
            mcp_limits: McpLimits {
                client_per_minute: usize::try_from(r.int(
                    "mcp.client_requests_per_minute",
                    1,
                    1_000_000,
                    "a whole number from 1 to 1000000",
                )?)
                .unwrap_or(CLIENT_REQUESTS_PER_MINUTE),
                global_per_minute: usize::try_from(r.int(
                    "mcp.global_requests_per_minute",
                    1,
                    10_000_000,
                    "a whole number from 1 to 10000000",
                )?)
                .unwrap_or(GLOBAL_REQUESTS_PER_MINUTE),
            },
            http_limits: HttpLimits {
                max_connections: usize::try_from(r.int(
                    "http.max_connections",
                    1,
                    1_000_000,
                    "a whole number from 1 to 1000000",
                )?)
                .unwrap_or(1024),
                header_read_timeout: r.secs("http.header_read_timeout_seconds", 1, 3600)?,
                request_timeout: r.secs("http.request_timeout_seconds", 1, 3600)?,
                max_body_bytes: usize::try_from(r.int(
                    "http.max_body_bytes",
                    1024,
                    1 << 30,
                    "a whole number of bytes from 1024 to 1073741824",
                )?)
                .unwrap_or(1 << 20),
            },
            public_url: r.url("http.public_url")?,
            network: NetworkConfig {
                ca_file: r.path("tls.ca_file"),
                ssl_cert_file: r.path("tls.ssl_cert_file"),
                ssl_cert_dirs: r
                    .plain("tls.ssl_cert_dir")
                    .map(|d| {
                        d.split(':')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(PathBuf::from)
                            .collect()
                    })
                    .unwrap_or_default(),
                proxy: r.secret("network.proxy"),
                no_proxy: r.plain("network.no_proxy").filter(|s| !s.trim().is_empty()),
            },
            webhooks: webhooks_config(&r)?,
            resolved: resolved.clone(),
        };
        r.check(
            "log.level",
            &cfg.log.level,
            |l| tracing_subscriber::EnvFilter::try_new(l).is_ok(),
            "error, warn, info, debug, trace or a tracing filter",
        )?;
        if let Some(v) = cfg.token_key.clone() {
            Key::from_hex(&v)
                .map_err(|e| r.invalid("token_encryption_key", None, &e.to_string()))?;
        }
        // The Python deployment's key: a Fernet key (44 characters) or 64 hex characters.
        if let Some(v) = r.secret("config_encryption_key") {
            fernet::FernetKey::parse(v.expose_secret())
                .map_err(|e| r.invalid("config_encryption_key", None, &e.to_string()))?;
        }
        for (key, v) in [
            ("admin_token", &cfg.admin_token),
            ("mcp_token", &cfg.mcp_token),
        ] {
            if let Some(v) = v {
                if v.expose_secret().len() < MIN_BEARER_BYTES {
                    return Err(r.invalid(
                        key,
                        None,
                        &format!(
                            "a bearer token of at least {MIN_BEARER_BYTES} bytes (it is {} bytes); generate one with `openssl rand -hex 32`",
                            v.expose_secret().len()
                        ),
                    ));
                }
            }
        }
        for k in &cfg.previous_keys {
            Key::from_hex(k).map_err(|e| {
                r.invalid(
                    "token_encryption_previous_keys",
                    None,
                    &format!("a comma-separated list of keys, each of {e}"),
                )
            })?;
        }
        Ok(cfg)
    }

    /// The key ring from the configured keys. Fails if no token key is set.
    pub fn keyring(&self) -> Result<Keyring, ConfigError> {
        let active = self
            .token_key
            .as_ref()
            .ok_or_else(|| missing("token_encryption_key"))?;
        let parse = |s: &SecretString| {
            Key::from_hex(s).map_err(|e| ConfigError::Invalid {
                key: "token_encryption_key".to_owned(),
                origin: Source::Default,
                value: None,
                expected: e.to_string(),
            })
        };
        let prev = self
            .previous_keys
            .iter()
            .map(parse)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Keyring::new(parse(active)?, prev))
    }

    /// The key ring app secrets in the store are sealed under: `LARK_CONFIG_ENCRYPTION_KEY`
    /// (a 44-character Fernet key or 64 hex characters), or `None` when it is unset (the store's
    /// own token key ring seals them then).
    pub fn config_keyring(&self) -> Result<Option<Keyring>, ConfigError> {
        let Some((Value::Secret(v), origin)) = self.resolved.get("config_encryption_key") else {
            return Ok(None);
        };
        let key =
            fernet::FernetKey::parse(v.expose_secret()).map_err(|e| ConfigError::Invalid {
                key: "config_encryption_key".to_owned(),
                origin: origin.clone(),
                value: None,
                expected: e.to_string(),
            })?;
        Ok(Some(Keyring::new(Key::from_bytes(&key.to_bytes()), vec![])))
    }

    /// Checks that everything `serve` needs is present.
    pub fn require_serve(&self) -> Result<(), ConfigError> {
        // The configuration's app is whole or absent: without it the service serves the app
        // registry's active apps (`lark-service app add`), and refuses at start if there are
        // none.
        match (&self.app_id, &self.app_secret) {
            (Some(_), None) => return Err(missing("app_secret")),
            (None, Some(_)) => return Err(missing("app_id")),
            _ => {}
        }
        self.keyring().map(drop)
    }

    /// What `serve` of a real app (not the sandbox) needs beyond [`Self::require_serve`]: the
    /// OAuth redirect must be one users' browsers can reach, so `http.public_url` or
    /// `auth.redirect_uri` must be set (the listener's own address is only right on the
    /// operator's machine). Returns the warnings to log: a redirect that is not `https://`
    /// carries the authorization code in clear.
    pub fn require_public_redirect(&self) -> Result<Vec<String>, ConfigError> {
        if self.device_flow() {
            // Nothing reaches the service: the device flow polls the platform.
            return Ok(Vec::new());
        }
        let effective = match (&self.auth.redirect_uri, &self.public_url) {
            (Some(u), _) => ("auth.redirect_uri", u),
            (None, Some(u)) => ("http.public_url", u),
            (None, None) => {
                return Err(ConfigError::Missing {
                    key: "http.public_url".to_owned(),
                    env: "`PUBLIC_URL`, or set `auth.redirect_uri` / `AUTH_REDIRECT_URI`, or \
                          authorize with the device flow (`AUTH_FLOW=device` or `auto`)"
                        .to_owned(),
                    expected: "the https:// URL users' browsers reach this service at (the \
                               OAuth redirect is built from it); required by `serve` unless \
                               --sandbox"
                        .to_owned(),
                });
            }
        };
        let mut warnings = Vec::new();
        if effective.1.scheme() != "https" {
            warnings.push(format!(
                "{} is {}, not https://: the OAuth authorization code crosses the network in \
                 clear; use an https:// URL (a TLS-terminating proxy in front of the listener)",
                effective.0, effective.1
            ));
        }
        Ok(warnings)
    }

    /// True when users authorize with the device flow: `auth.flow = "device"`, or `"auto"`
    /// with neither `http.public_url` nor `auth.redirect_uri` set.
    #[must_use]
    pub fn device_flow(&self) -> bool {
        match self.auth.flow {
            AuthFlow::Device => true,
            AuthFlow::Redirect => false,
            AuthFlow::Auto => self.public_url.is_none() && self.auth.redirect_uri.is_none(),
        }
    }

    /// The effective configuration as TOML-like lines, secrets redacted, each with its source.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        for s in SETTINGS {
            let line = match self.resolved.get(s.key) {
                Some((Value::Plain(v), src)) => format!("{} = {:?}  # {src}", s.key, v),
                Some((Value::Secret(v), src)) => format!(
                    "{} = \"<redacted, {} characters>\"  # {src}",
                    s.key,
                    v.expose_secret().chars().count()
                ),
                None => match s.default {
                    Some(d) => format!("{} = {:?}  # default", s.key, d),
                    None => format!("# {} is not set", s.key),
                },
            };
            out.push_str(&line);
            out.push('\n');
        }
        out
    }
}

fn missing(key: &str) -> ConfigError {
    let s = settings::find(key);
    ConfigError::Missing {
        key: key.to_owned(),
        env: s.map_or_else(String::new, |s| {
            let mut e = s.env.join(" or ");
            if s.secret {
                e.push_str(&format!(
                    ", {}_FILE, or the systemd credential `{}`",
                    s.env[0],
                    settings::credential_name(s)
                ));
            }
            e
        }),
        expected: s.map_or("", |s| s.help).to_owned(),
    }
}

fn valid_domain(d: &str) -> bool {
    d.parse::<crate::lark::Domain>().is_ok()
}

/// Collects values layer by layer; later layers replace earlier ones.
#[derive(Default)]
struct Layers {
    values: BTreeMap<&'static str, (Value, Source)>,
}

impl Layers {
    fn set(&mut self, s: &'static Setting, v: Value, src: Source) {
        self.values.insert(s.key, (v, src));
    }

    fn read_toml(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::File {
                path: path.to_owned(),
                detail: format!("not valid TOML: {}", e.message()),
            })?;
        let mut flat = Vec::new();
        for (k, v) in table {
            match v {
                toml::Value::Table(t) => {
                    for (k2, v2) in t {
                        flat.push((format!("{k}.{k2}"), v2));
                    }
                }
                v => flat.push((k, v)),
            }
        }
        let src = Source::File(path.to_owned());
        let mut inline_secrets = Vec::new();
        for (key, v) in flat {
            let text = match v {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Array(a) => a
                    .iter()
                    .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
                    .collect::<Vec<_>>()
                    .join(","),
                other => {
                    return Err(ConfigError::Invalid {
                        key,
                        origin: src,
                        value: Some(other.to_string()),
                        expected: "a string, number or boolean".to_owned(),
                    })
                }
            };
            if let Some(s) = settings::find(&key) {
                if s.secret {
                    inline_secrets.push(s.key);
                    self.set(s, Value::Secret(SecretString::from(text)), src.clone());
                } else {
                    self.set(s, Value::Plain(text), src.clone());
                }
            } else if let Some(s) = key
                .strip_suffix("_file")
                .and_then(settings::find)
                .filter(|s| s.secret)
            {
                if inline_secrets.contains(&s.key) {
                    return Err(ConfigError::Conflict {
                        key: s.key.to_owned(),
                        origin: src,
                    });
                }
                let (v, p) = secrets::read_secret_file(s.key, Path::new(&text))?;
                self.set(s, Value::Secret(v), Source::SecretFile(p));
            } else {
                return Err(ConfigError::UnknownKey {
                    key,
                    file: path.to_owned(),
                });
            }
        }
        #[cfg(unix)]
        if let Some(key) = inline_secrets.first() {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .map_err(|e| ConfigError::File {
                    path: path.to_owned(),
                    detail: e.to_string(),
                })?
                .permissions()
                .mode()
                & 0o777;
            if mode & 0o077 != 0 {
                return Err(ConfigError::ConfigFileMode {
                    key: (*key).to_owned(),
                    path: path.to_owned(),
                    mode,
                });
            }
        }
        Ok(())
    }

    fn read_credentials(&mut self, dir: &Path) -> Result<(), ConfigError> {
        for s in SETTINGS.iter().filter(|s| s.secret) {
            let p = dir.join(settings::credential_name(s));
            if p.is_file() {
                let (v, p) = secrets::read_credential(s.key, &p)?;
                self.set(s, Value::Secret(v), Source::SecretFile(p));
            }
        }
        Ok(())
    }

    fn read_env(&mut self, env: &dyn Env) -> Result<(), ConfigError> {
        for s in SETTINGS {
            // The first name wins over later aliases; so apply aliases first.
            for name in s.env.iter().rev() {
                let inline = env.var(name);
                let file = if s.secret {
                    env.var(&format!("{name}_FILE"))
                } else {
                    None
                };
                match (inline, file) {
                    (Some(_), Some(_)) => {
                        return Err(ConfigError::Conflict {
                            key: (*name).to_owned(),
                            origin: Source::Env(format!("{name} and {name}_FILE")),
                        })
                    }
                    (Some(v), None) => {
                        let v = if s.secret {
                            Value::Secret(SecretString::from(v))
                        } else {
                            Value::Plain(v)
                        };
                        self.set(s, v, Source::Env((*name).to_owned()));
                    }
                    (None, Some(path)) => {
                        let (v, p) = secrets::read_secret_file(name, Path::new(&path))?;
                        self.set(s, Value::Secret(v), Source::SecretFile(p));
                    }
                    (None, None) => {}
                }
            }
        }
        Ok(())
    }

    fn read_flags(&mut self, overrides: &[(String, String)]) -> Result<(), ConfigError> {
        for (key, v) in overrides {
            if let Some(s) = settings::find(key) {
                if s.secret {
                    return Err(ConfigError::Invalid {
                        key: key.clone(),
                        origin: Source::Flag,
                        value: None,
                        expected: format!("a file: a secret on the command line is visible to every user; use --set {key}_file=PATH"),
                    });
                }
                self.set(s, Value::Plain(v.clone()), Source::Flag);
            } else if let Some(s) = key
                .strip_suffix("_file")
                .and_then(settings::find)
                .filter(|s| s.secret)
            {
                let (val, p) = secrets::read_secret_file(s.key, Path::new(v))?;
                self.set(s, Value::Secret(val), Source::SecretFile(p));
            } else {
                return Err(ConfigError::Invalid {
                    key: key.clone(),
                    origin: Source::Flag,
                    value: Some(v.clone()),
                    expected: "a known key; `lark-service config check --list` shows every key"
                        .to_owned(),
                });
            }
        }
        Ok(())
    }
}

/// Typed reads of resolved values, with errors that name the key and source.
/// `http.listen`, or, when it is not set, the Python deployment's `CALLBACK_SERVER_HOST` and
/// `CALLBACK_SERVER_PORT` over the default's host and port.
fn http_listen(r: &Reader<'_>) -> Result<SocketAddr, ConfigError> {
    let listen: SocketAddr = r.parse("http.listen", "an address such as 127.0.0.1:8080")?;
    if r.source("http.listen") != Source::Default {
        return Ok(listen);
    }
    let ip = match r.plain("http.callback_host") {
        Some(_) => r.parse::<IpAddr>("http.callback_host", "an IP address such as 0.0.0.0")?,
        None => listen.ip(),
    };
    let port = match r.plain("http.callback_port") {
        Some(_) => u16::try_from(r.int("http.callback_port", 0, 65535, "a port number")?)
            .unwrap_or(listen.port()),
        None => listen.port(),
    };
    Ok(SocketAddr::new(ip, port))
}

/// Which store backs the service.
#[derive(Clone, Debug)]
pub enum StorageBackend {
    /// The embedded redb file at `storage.path` (one VM).
    Redb,
    /// A PostgreSQL database shared by the instances of a fleet.
    Postgres {
        /// The connection URL (may hold a password: a secret).
        url: SecretString,
    },
}

impl StorageBackend {
    /// `redb` or `postgres`.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Self::Redb => "redb",
            Self::Postgres { .. } => "postgres",
        }
    }
}

/// `storage.backend` and, for `postgres`, its URL: `storage.postgres_url`, or one built from the
/// `POSTGRES_*` parts (user and password percent-encoded). `postgres` without a URL or a host
/// is refused.
fn storage_backend(r: &Reader<'_>) -> Result<StorageBackend, ConfigError> {
    let backend = r.plain("storage.backend").unwrap_or_default();
    match backend.trim() {
        "redb" => Ok(StorageBackend::Redb),
        "postgres" | "postgresql" => {
            if let Some(url) = r.secret("storage.postgres_url") {
                return Ok(StorageBackend::Postgres { url });
            }
            let host = r
                .plain("storage.postgres_host")
                .filter(|h| !h.trim().is_empty())
                .ok_or_else(|| {
                    r.invalid(
                        "storage.postgres_url",
                        None,
                        "a postgres://… URL, or POSTGRES_HOST (with POSTGRES_DB, POSTGRES_USER, POSTGRES_PASSWORD), when storage.backend is postgres",
                    )
                })?;
            let port = r.int("storage.postgres_port", 1, 65535, "a port number")?;
            let db = r.plain("storage.postgres_db").unwrap_or_default();
            let user = r.plain("storage.postgres_user").unwrap_or_default();
            let mut url =
                url::Url::parse(&format!("postgres://{}:{port}/", host.trim())).map_err(|_| {
                    r.invalid(
                        "storage.postgres_host",
                        Some(&host),
                        "a host name or address",
                    )
                })?;
            url.set_path(&db);
            url.set_username(&user)
                .map_err(|()| r.invalid("storage.postgres_user", Some(&user), "a user name"))?;
            if let Some(pw) = r.secret("storage.postgres_password") {
                url.set_password(Some(pw.expose_secret()))
                    .map_err(|()| r.invalid("storage.postgres_password", None, "a password"))?;
            }
            Ok(StorageBackend::Postgres {
                url: SecretString::from(String::from(url)),
            })
        }
        _ => Err(r.invalid("storage.backend", Some(&backend), "redb or postgres")),
    }
}

/// Outgoing webhooks (`[webhooks]`), see `crate::webhooks`.
#[derive(Debug, Clone)]
pub struct WebhooksConfig {
    /// Receivers; empty: no webhooks (no event is recorded).
    pub urls: Vec<Url>,
    /// The signing secret (required with `urls`).
    pub secret: Option<SecretString>,
    /// Longest one delivery may take.
    pub timeout: Duration,
    /// Delivery rounds before an event is kept as dead.
    pub max_attempts: u32,
    /// Lead time of the expiry reminder; zero: none.
    pub reminder_lead: Duration,
    /// How long a grant lasts at the platform.
    pub grant_lifetime: Duration,
}

impl WebhooksConfig {
    /// True when events are recorded and delivered.
    #[must_use]
    pub fn enabled(&self) -> bool {
        !self.urls.is_empty()
    }
}

/// The shortest webhook secret accepted.
pub const MIN_WEBHOOK_SECRET_BYTES: usize = 32;

fn webhooks_config(r: &Reader<'_>) -> Result<WebhooksConfig, ConfigError> {
    let mut urls = Vec::new();
    if let Some(list) = r.plain("webhooks.urls") {
        for item in list.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            let u = Url::parse(item)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
                .ok_or_else(|| {
                    r.invalid("webhooks.urls", Some(item), "comma-separated http(s) URLs")
                })?;
            urls.push(u);
        }
    }
    let secret = r.secret("webhooks.secret");
    if !urls.is_empty() {
        match &secret {
            None => {
                return Err(r.invalid(
                    "webhooks.secret",
                    None,
                    "a secret of at least 32 bytes (webhooks.urls is set; events are never sent unsigned)",
                ))
            }
            Some(s) if s.expose_secret().trim().len() < MIN_WEBHOOK_SECRET_BYTES => {
                return Err(r.invalid(
                    "webhooks.secret",
                    None,
                    "a secret of at least 32 bytes (openssl rand -hex 32)",
                ))
            }
            Some(_) => {}
        }
    }
    Ok(WebhooksConfig {
        urls,
        secret,
        timeout: r.secs("webhooks.timeout_seconds", 1, 600)?,
        max_attempts: u32::try_from(r.int(
            "webhooks.max_attempts",
            1,
            1000,
            "a whole number from 1 to 1000",
        )?)
        .unwrap_or(12),
        reminder_lead: r.secs("webhooks.expiry_reminder_lead_seconds", 0, 365 * 86400)?,
        grant_lifetime: r.secs("webhooks.grant_lifetime_seconds", 1, 10 * 365 * 86400)?,
    })
}

struct Reader<'a> {
    r: &'a BTreeMap<&'static str, (Value, Source)>,
}

impl Reader<'_> {
    fn source(&self, key: &str) -> Source {
        self.r.get(key).map_or(Source::Default, |(_, s)| s.clone())
    }

    /// The name the user wrote: the env var name for env values, the TOML key otherwise.
    fn shown_key(&self, key: &str) -> String {
        match self.source(key) {
            Source::Env(n) => n,
            _ => key.to_owned(),
        }
    }

    fn invalid(&self, key: &str, value: Option<&str>, expected: &str) -> ConfigError {
        let origin = match self.source(key) {
            Source::Env(_) => Source::Env(String::new()),
            other => other,
        };
        ConfigError::Invalid {
            key: self.shown_key(key),
            origin,
            value: value.map(str::to_owned),
            expected: expected.to_owned(),
        }
    }

    fn plain(&self, key: &str) -> Option<String> {
        match self.r.get(key) {
            Some((Value::Plain(v), _)) => Some(v.clone()),
            Some((Value::Secret(_), _)) => None,
            None => settings::find(key)
                .and_then(|s| s.default)
                .map(str::to_owned),
        }
    }

    fn secret(&self, key: &str) -> Option<SecretString> {
        match self.r.get(key) {
            Some((Value::Secret(v), _)) => {
                Some(v.clone()).filter(|v| !v.expose_secret().trim().is_empty())
            }
            _ => None,
        }
    }

    fn check(
        &self,
        key: &str,
        v: &str,
        ok: impl Fn(&str) -> bool,
        expected: &str,
    ) -> Result<(), ConfigError> {
        if ok(v) {
            Ok(())
        } else {
            Err(self.invalid(key, Some(v), expected))
        }
    }

    fn int(&self, key: &str, min: i64, max: i64, expected: &str) -> Result<i64, ConfigError> {
        let v = self.plain(key).unwrap_or_default();
        v.trim()
            .parse::<i64>()
            .ok()
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| self.invalid(key, Some(&v), expected))
    }

    fn secs(&self, key: &str, min: i64, max: i64) -> Result<Duration, ConfigError> {
        let n = self.int(
            key,
            min,
            max,
            &format!("a whole number of seconds from {min} to {max}"),
        )?;
        Ok(Duration::from_secs(n.unsigned_abs()))
    }

    fn fraction(&self, key: &str) -> Result<f64, ConfigError> {
        let v = self.plain(key).unwrap_or_default();
        v.trim()
            .parse::<f64>()
            .ok()
            .filter(|f| *f > 0.0 && *f < 1.0)
            .ok_or_else(|| {
                self.invalid(
                    key,
                    Some(&v),
                    "a number between 0 and 1 (exclusive), such as 0.8",
                )
            })
    }

    fn boolean(&self, key: &str) -> Result<bool, ConfigError> {
        let v = self.plain(key).unwrap_or_default();
        match v.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(self.invalid(key, Some(&v), "true or false")),
        }
    }

    fn parse<T: std::str::FromStr>(&self, key: &str, expected: &str) -> Result<T, ConfigError> {
        let v = self.plain(key).unwrap_or_default();
        v.trim()
            .parse()
            .map_err(|_| self.invalid(key, Some(&v), expected))
    }

    fn path(&self, key: &str) -> Option<PathBuf> {
        self.plain(key)
            .filter(|v| !v.trim().is_empty())
            .map(|v| PathBuf::from(v.trim()))
    }

    fn url(&self, key: &str) -> Result<Option<Url>, ConfigError> {
        let Some(v) = self.plain(key).filter(|v| !v.trim().is_empty()) else {
            return Ok(None);
        };
        Url::parse(v.trim())
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .map(Some)
            .ok_or_else(|| self.invalid(key, Some(&v), "an http(s) URL"))
    }
}

#[cfg(test)]
mod tests;
