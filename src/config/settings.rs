//! The catalogue of settings: TOML key, environment names, default, whether it is a secret.
//!
//! This table is the single source of truth for `config check`, the environment overlay and
//! the documented example config.

/// One setting.
#[derive(Debug)]
pub struct Setting {
    /// Dotted TOML key (`auth.session_expiry_seconds`).
    pub key: &'static str,
    /// Environment variable names, preferred first.
    pub env: &'static [&'static str],
    /// Default as text, if any.
    pub default: Option<&'static str>,
    /// A secret: never printed, may come from a file or systemd credential.
    pub secret: bool,
    /// One line for humans.
    pub help: &'static str,
}

macro_rules! s {
    ($key:literal, [$($env:literal),*], $default:expr, $secret:literal, $help:literal) => {
        Setting { key: $key, env: &[$($env),*], default: $default, secret: $secret, help: $help }
    };
}

/// Every setting the service reads.
pub const SETTINGS: &[Setting] = &[
    s!("app_id", ["APP_ID", "LARK_APP_ID"], None, false, "The Feishu/Lark app id (cli_...)."),
    s!("app_secret", ["APP_SECRET", "LARK_APP_SECRET"], None, true, "The app secret."),
    s!("domain", ["LARK_DOMAIN", "FEISHU_API_BASE_URL"], Some("feishu"), false, "feishu, lark, or a base URL (the sandbox or a proxy)."),
    s!("token_encryption_key", ["LARK_TOKEN_ENCRYPTION_KEY"], None, true, "64 hex characters (32 bytes): seals tokens at rest."),
    s!("token_encryption_previous_keys", ["LARK_TOKEN_ENCRYPTION_PREVIOUS_KEYS"], None, true, "Comma-separated older token keys, still accepted for reading until rotation completes."),
    s!("config_encryption_key", ["LARK_CONFIG_ENCRYPTION_KEY"], None, true, "Seals app secrets in the store (`lark-service app`) and opens the Python deployment's app store (`import python --apps-db`): a 44-character Fernet key as the Python deployment holds it, or 64 hex characters; unset: the token key seals app secrets."),
    s!("encrypt_key", ["LARK_ENCRYPT_KEY"], None, true, "The app's event Encrypt Key, for HTTP callbacks."),
    s!("verification_token", ["LARK_VERIFICATION_TOKEN"], None, true, "The app's Verification Token, for HTTP callbacks."),
    s!("admin_token", ["LARK_SERVICE_ADMIN_TOKEN", "ADMIN_TOKEN"], None, true, "Bearer token for the admin API (at least 32 bytes)."),
    s!("mcp_token", ["LARK_SERVICE_MCP_TOKEN"], None, true, "Bearer token of the MCP endpoint at /mcp on the admin listener (at least 32 bytes); unset: no MCP endpoint."),
    s!("storage.path", ["STORAGE_PATH"], Some("./data/lark-service.redb"), false, "The redb store file."),
    s!("storage.session_retention_seconds", ["SESSION_RETENTION_SECONDS"], Some("2592000"), false, "How long finished sessions are kept before the sweep deletes them."),
    s!("storage.sweep_interval_seconds", ["SWEEP_INTERVAL_SECONDS"], Some("60"), false, "How often the TTL sweep runs."),
    s!("storage.backend", ["STORAGE_BACKEND"], Some("redb"), false, "redb (the embedded file at storage.path, one VM) or postgres (a PostgreSQL database several instances share)."),
    s!("storage.postgres_url", ["STORAGE_POSTGRES_URL"], None, true, "postgres://… URL of the store when storage.backend = \"postgres\" (TLS per its sslmode); or give the POSTGRES_* parts below."),
    s!("storage.postgres_host", ["POSTGRES_HOST"], None, false, "PostgreSQL host of the store, when storage.postgres_url is not set."),
    s!("storage.postgres_port", ["POSTGRES_PORT"], Some("5432"), false, "PostgreSQL port of the store."),
    s!("storage.postgres_db", ["POSTGRES_DB"], Some("lark_service"), false, "PostgreSQL database of the store."),
    s!("storage.postgres_user", ["POSTGRES_USER"], Some("lark_service"), false, "PostgreSQL user of the store."),
    s!("storage.postgres_password", ["POSTGRES_PASSWORD"], None, true, "PostgreSQL password of the store."),
    s!("backup.dir", ["BACKUP_DIR"], None, false, "Directory of scheduled backups (and of backups requested through the admin API)."),
    s!("backup.schedule", ["BACKUP_SCHEDULE"], None, false, "Cron schedule (5 fields, UTC) of in-process backups; unset: none."),
    s!("backup.keep", ["BACKUP_KEEP"], Some("7"), false, "How many scheduled backups to keep."),
    s!("backup.recipients", ["BACKUP_RECIPIENTS"], None, false, "Comma-separated age X25519 public keys (age1...) backups are encrypted to."),
    s!("backup.passphrase", ["BACKUP_PASSPHRASE"], None, true, "Passphrase backups are encrypted with, when no recipient is set."),
    s!("export.postgres_url", ["EXPORT_POSTGRES_URL"], None, true, "postgres://… URL: export sessions continuously to PostgreSQL (table user_auth_sessions, tokens still sealed); unset: no export."),
    s!("websocket.enabled", ["WEBSOCKET_ENABLED"], Some("true"), false, "Hold the long connection (false: HTTP callbacks only)."),
    s!("websocket.max_reconnect_retries", ["WEBSOCKET_MAX_RECONNECT_RETRIES"], Some("10"), false, "Failed reconnect attempts in a row before the long connection is reported degraded (it keeps redialing; -1: never report)."),
    s!("websocket.heartbeat_interval", ["WEBSOCKET_HEARTBEAT_INTERVAL"], Some("30"), false, "Seconds between pings until the server sends its own interval."),
    s!("websocket.fallback_to_http", ["WEBSOCKET_FALLBACK_TO_HTTP", "CALLBACK_SERVER_ENABLED"], Some("true"), false, "Serve HTTP callbacks while the long connection is down."),
    s!("websocket.credential_retry_seconds", ["WEBSOCKET_CREDENTIAL_RETRY_SECONDS"], Some("300"), false, "While the platform refuses the app credentials, dial again this often (SIGHUP: now)."),
    s!("websocket.max_concurrent_handlers", ["WEBSOCKET_MAX_CONCURRENT_HANDLERS"], Some("256"), false, "Event handlers allowed to run at once; beyond this, events are answered as failed and the platform redelivers them."),
    s!("auth.session_expiry_seconds", ["AUTH_SESSION_EXPIRY_SECONDS"], Some("600"), false, "How long a user has to answer an authorization card."),
    s!("auth.token_refresh_threshold", ["AUTH_TOKEN_REFRESH_THRESHOLD"], Some("0.8"), false, "Share of a token's lifetime after which it is refreshed."),
    s!("auth.request_rate_limit", ["AUTH_REQUEST_RATE_LIMIT"], Some("5"), false, "New authorization requests per user per window."),
    s!("auth.rate_limit_window_seconds", ["AUTH_RATE_LIMIT_WINDOW_SECONDS"], Some("60"), false, "The rate-limit window."),
    s!("auth.redirect_uri", ["AUTH_REDIRECT_URI", "OAUTH_REDIRECT_URI"], None, false, "OAuth redirect URI registered with the app (default: http.public_url + /oauth/callback)."),
    s!("auth.default_scopes", ["AUTH_DEFAULT_SCOPES"], Some("offline_access"), false, "Space- or comma-separated scopes requested when a user sends /authorize (offline_access is always added)."),
    s!("auth.refresh_concurrency", ["AUTH_REFRESH_CONCURRENCY"], Some("4"), false, "How many user tokens the refresh worker refreshes at once."),
    s!("auth.flow", ["AUTH_FLOW"], Some("redirect"), false, "How users authorize: redirect (OAuth redirect to /oauth/callback), device (device authorization grant: the service polls, nothing reaches it) or auto (device when no public URL is set)."),
    s!("auth.resend_card_on_reauth", ["AUTH_RESEND_CARD_ON_REAUTH"], Some("false"), false, "Send a new Authorize card when a user's refresh token is no longer accepted."),
    s!("card.locale", ["CARD_LOCALE"], Some("zh"), false, "Language of the cards users get: zh (简体中文) or en."),
    s!("card.include_description", ["AUTH_CARD_INCLUDE_DESCRIPTION"], Some("true"), false, "The Authorize card's detailed description (what the app asks, the permissions); false: a short one."),
    s!("card.privacy_policy_url", ["AUTH_CARD_PRIVACY_POLICY_URL"], None, false, "A privacy-policy link shown on the Authorize card."),
    s!("card.template_id", ["AUTH_CARD_TEMPLATE_ID"], None, false, "A card template (Feishu card builder) sent as the Authorize card, with the variables title, body, authorize_url, session_id, authorize_label, reject_label."),
    s!("user_info_sync.enabled", ["USER_INFO_SYNC_ENABLED"], Some("false"), false, "Refresh stored users' name, email and avatar on a schedule."),
    s!("user_info_sync.schedule", ["USER_INFO_SYNC_SCHEDULE"], Some("0 2 * * *"), false, "Cron schedule (5 fields, UTC) of the user info sync."),
    s!("log.level", ["LOG_LEVEL"], Some("info"), false, "error, warn, info, debug, trace, or a tracing filter."),
    s!("log.json_format", ["LOG_JSON_FORMAT"], Some("false"), false, "JSON log lines."),
    s!("metrics.port", ["PROMETHEUS_PORT", "METRICS_PORT"], Some("8000"), false, "Port of the /metrics listener."),
    s!("metrics.bind", ["METRICS_BIND"], Some("127.0.0.1"), false, "Address of the /metrics listener."),
    s!("tls.ca_file", ["TLS_CA_FILE"], None, false, "PEM file of extra CAs to trust (a company CA that re-signs TLS); added to the built-in Mozilla roots."),
    s!("tls.ssl_cert_file", ["SSL_CERT_FILE"], None, false, "The OpenSSL/curl convention: a PEM file of extra CAs, added like tls.ca_file."),
    s!("tls.ssl_cert_dir", ["SSL_CERT_DIR"], None, false, "The OpenSSL/curl convention: colon-separated directories of PEM CA files, added to the trusted roots."),
    s!("network.proxy", ["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"], None, true, "HTTP proxy for every outgoing connection (OpenAPI and the long connection, by CONNECT): http://[user:password@]host:port."),
    s!("network.no_proxy", ["no_proxy", "NO_PROXY"], None, false, "Hosts that bypass the proxy, by curl's rules: host names (and their subdomains), IPs, CIDR networks, or *."),
    s!("http.listen", ["HTTP_LISTEN"], Some("127.0.0.1:8080"), false, "Address of the public HTTP listener (OAuth redirect, HTTP callbacks, /healthz, /readyz)."),
    s!("http.callback_host", ["CALLBACK_SERVER_HOST"], None, false, "The Python deployment's name for the host of http.listen; used only when http.listen is not set."),
    s!("http.callback_port", ["CALLBACK_SERVER_PORT"], None, false, "The Python deployment's name for the port of http.listen; used only when http.listen is not set."),
    s!("http.public_url", ["PUBLIC_URL"], None, false, "How users' browsers reach the HTTP listener (for the OAuth redirect)."),
    s!("http.max_connections", ["HTTP_MAX_CONNECTIONS"], Some("1024"), false, "Connections each listener (public, admin, metrics) serves at once; more wait in the kernel's backlog."),
    s!("http.header_read_timeout_seconds", ["HTTP_HEADER_READ_TIMEOUT_SECONDS"], Some("10"), false, "A connection that does not send a request's headers within this time is closed; also the longest a keep-alive connection may sit idle."),
    s!("http.request_timeout_seconds", ["HTTP_REQUEST_TIMEOUT_SECONDS"], Some("30"), false, "Longest a request may take before it is answered 408 (not applied to /mcp, whose responses stream)."),
    s!("http.max_body_bytes", ["HTTP_MAX_BODY_BYTES"], Some("1048576"), false, "Largest request body accepted on any listener; larger ones are answered 413."),
    s!("mcp.client_requests_per_minute", ["MCP_CLIENT_REQUESTS_PER_MINUTE"], Some("600"), false, "Requests per minute to /mcp from one client (one bearer token from one address, however many MCP sessions it opens)."),
    s!("mcp.global_requests_per_minute", ["MCP_GLOBAL_REQUESTS_PER_MINUTE"], Some("3000"), false, "Requests per minute to /mcp from all clients together."),
    s!("admin.listen", ["ADMIN_LISTEN"], Some("127.0.0.1:8081"), false, "Address of the admin listener: the admin API (tokens, sessions, revoke, backups, workers, GET /) and /mcp. Keep it private."),
    s!("webhooks.urls", ["WEBHOOKS_URLS"], None, false, "Comma-separated http(s) URLs that get every webhook event (authorization.completed, authorization.failed, token.needs_reauth, token.revoked, token.expiring); unset: no webhooks."),
    s!("webhooks.secret", ["WEBHOOKS_SECRET"], None, true, "Shared secret (at least 32 bytes) the webhook bodies are signed with (HMAC-SHA256, header X-Lark-Service-Signature); required when webhooks.urls is set."),
    s!("webhooks.timeout_seconds", ["WEBHOOKS_TIMEOUT_SECONDS"], Some("10"), false, "How long one webhook delivery may take before it counts as failed and is retried."),
    s!("webhooks.max_attempts", ["WEBHOOKS_MAX_ATTEMPTS"], Some("12"), false, "Delivery rounds of one event before it is kept as dead (visible in /workers and the metrics)."),
    s!("webhooks.expiry_reminder_lead_seconds", ["WEBHOOKS_EXPIRY_REMINDER_LEAD_SECONDS"], Some("604800"), false, "How long before a grant's hard expiry (365 days after the user authorized) the user gets a reminder card and token.expiring is sent; 0: no reminders."),
    s!("webhooks.grant_lifetime_seconds", ["WEBHOOKS_GRANT_LIFETIME_SECONDS"], Some("31536000"), false, "How long the platform keeps a user's grant before the user must authorize again (365 days, error 20037)."),
];

/// Looks a setting up by its TOML key.
#[must_use]
pub fn find(key: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.key == key)
}

/// The systemd credential name of a secret (`app_secret` → `app_secret`).
#[must_use]
pub fn credential_name(s: &Setting) -> &'static str {
    s.key
}

/// The documented example config (`packaging/config.example.toml`), generated from the
/// catalogue so the two never drift apart. Secrets appear only as `*_file` comments.
#[must_use]
pub fn example_toml() -> String {
    let mut out = String::from(
        "# lark-service configuration: /etc/lark-service/config.toml\n\
         #\n\
         # Every key can also be set by the environment variable named beside it; the environment\n\
         # wins over this file. Secrets never go in this file: give them as files (mode 0600)\n\
         # with `<key>_file`, as `<ENV>_FILE`, or as systemd credentials (LoadCredential=) named\n\
         # after the key. `lark-service config check` shows the effective configuration.\n",
    );
    let mut section = "";
    for s in SETTINGS {
        let (sec, name) = s.key.split_once('.').unwrap_or(("", s.key));
        if sec != section {
            out.push_str(&format!("\n[{sec}]\n"));
            section = sec;
        }
        out.push_str(&format!("\n# {}\n# env: {}\n", s.help, s.env.join(", ")));
        if s.secret {
            out.push_str(&format!(
                "# {name}_file = \"/etc/lark-service/secrets/{name}\"\n"
            ));
        } else {
            let packaged = match s.key {
                "storage.path" => Some("/var/lib/lark-service/lark-service.redb"),
                _ => s.default,
            };
            match packaged {
                Some(d) if d.parse::<f64>().is_ok() || d == "true" || d == "false" => {
                    out.push_str(&format!("{name} = {d}\n"));
                }
                Some(d) => out.push_str(&format!("{name} = {d:?}\n")),
                None => out.push_str(&format!("# {name} = \"\"\n")),
            }
        }
    }
    out
}
