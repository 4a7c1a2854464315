use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;

use super::*;

const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn opts(path: Option<&Path>) -> LoadOptions {
    LoadOptions {
        config_path: path.map(Path::to_owned),
        overrides: vec![],
    }
}

fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p
}

#[test]
fn defaults_match_the_python_deployment_guide() {
    let c = Config::load_with(&opts(None), &env(&[("CREDENTIALS_DIRECTORY_UNUSED", "")])).unwrap();
    assert_eq!(c.websocket.max_reconnect_retries, 10);
    assert_eq!(c.websocket.heartbeat_interval, Duration::from_secs(30));
    assert!(c.websocket.fallback_to_http);
    assert_eq!(c.auth.session_expiry, Duration::from_secs(600));
    assert!((c.auth.token_refresh_threshold - 0.8).abs() < f64::EPSILON);
    assert_eq!(c.auth.request_rate_limit, 5);
    assert!(!c.user_info_sync.enabled);
    assert_eq!(c.user_info_sync.schedule, "0 2 * * *");
    assert_eq!(c.metrics_addr.port(), 8000);
    assert_eq!(c.domain, "feishu");
    assert_eq!(c.storage_path, PathBuf::from("./data/lark-service.redb"));
}

#[test]
fn env_overrides_file_and_flags_override_env() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "c.toml",
        "app_id = \"cli_file\"\n[auth]\nrequest_rate_limit = 7\nsession_expiry_seconds = 120\n",
        0o600,
    );
    let e = env(&[("APP_ID", "cli_env"), ("AUTH_REQUEST_RATE_LIMIT", "9")]);
    let mut o = opts(Some(&p));
    o.overrides = vec![("auth.request_rate_limit".into(), "11".into())];
    let c = Config::load_with(&o, &e).unwrap();
    assert_eq!(c.app_id.as_deref(), Some("cli_env"));
    assert_eq!(c.auth.request_rate_limit, 11);
    assert_eq!(c.auth.session_expiry, Duration::from_secs(120));
}

#[test]
fn mcp_deployment_names_work_and_app_id_wins_over_lark_app_id() {
    let c = Config::load_with(
        &opts(None),
        &env(&[
            ("LARK_APP_ID", "cli_mcp"),
            ("LARK_APP_SECRET", "s3cr3t-mcp"),
        ]),
    )
    .unwrap();
    assert_eq!(c.app_id.as_deref(), Some("cli_mcp"));
    assert_eq!(c.app_secret.unwrap().expose_secret(), "s3cr3t-mcp");
    let c = Config::load_with(
        &opts(None),
        &env(&[("LARK_APP_ID", "cli_mcp"), ("APP_ID", "cli_main")]),
    )
    .unwrap();
    assert_eq!(c.app_id.as_deref(), Some("cli_main"));
}

#[test]
fn errors_name_key_source_value_and_expectation() {
    let e = Config::load_with(
        &opts(None),
        &env(&[("WEBSOCKET_HEARTBEAT_INTERVAL", "soon")]),
    )
    .unwrap_err();
    let m = e.to_string();
    assert!(m.contains("WEBSOCKET_HEARTBEAT_INTERVAL"), "{m}");
    assert!(m.contains("environment"), "{m}");
    assert!(m.contains("\"soon\""), "{m}");
    assert!(m.contains("whole number of seconds"), "{m}");

    let e = Config::load_with(
        &opts(None),
        &env(&[("AUTH_TOKEN_REFRESH_THRESHOLD", "1.5")]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("between 0 and 1"), "{e}");
    let e = Config::load_with(&opts(None), &env(&[("LARK_DOMAIN", "ftp://x")])).unwrap_err();
    assert!(
        e.to_string().contains("feishu, lark, or an http(s) URL"),
        "{e}"
    );
    let e = Config::load_with(
        &opts(None),
        &env(&[("USER_INFO_SYNC_SCHEDULE", "every day")]),
    )
    .unwrap_err();
    assert!(e.to_string().contains("cron"), "{e}");
}

#[test]
fn a_bad_secret_is_reported_without_its_value() {
    let bad = "zz-not-hex-secret-value-zz";
    let e =
        Config::load_with(&opts(None), &env(&[("LARK_TOKEN_ENCRYPTION_KEY", bad)])).unwrap_err();
    let m = e.to_string();
    assert!(m.contains("LARK_TOKEN_ENCRYPTION_KEY"), "{m}");
    assert!(m.contains("64 hexadecimal"), "{m}");
    assert!(!m.contains(bad), "{m}");
    assert!(!format!("{e:?}").contains(bad));
}

#[test]
fn unknown_toml_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "c.toml",
        "[auth]\nsesion_expiry_seconds = 5\n",
        0o600,
    );
    let e = Config::load_with(&opts(Some(&p)), &env(&[])).unwrap_err();
    assert!(
        matches!(&e, ConfigError::UnknownKey { key, .. } if key == "auth.sesion_expiry_seconds"),
        "{e}"
    );
}

#[test]
fn secrets_from_files_env_files_and_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let sf = write(dir.path(), "secret", "file-secret\n", 0o600);
    let p = write(
        dir.path(),
        "c.toml",
        &format!("app_secret_file = {:?}\n", sf.display().to_string()),
        0o644,
    );
    let c = Config::load_with(&opts(Some(&p)), &env(&[])).unwrap();
    assert_eq!(c.app_secret.unwrap().expose_secret(), "file-secret");

    let kf = write(dir.path(), "key", &format!("{KEY}\n"), 0o400);
    let c = Config::load_with(
        &opts(None),
        &env(&[("LARK_TOKEN_ENCRYPTION_KEY_FILE", kf.to_str().unwrap())]),
    )
    .unwrap();
    assert!(c.keyring().is_ok());

    let creds = tempfile::tempdir().unwrap();
    write(creds.path(), "app_secret", "cred-secret", 0o400);
    let c = Config::load_with(
        &opts(Some(&p)),
        &env(&[("CREDENTIALS_DIRECTORY", creds.path().to_str().unwrap())]),
    )
    .unwrap();
    assert_eq!(
        c.app_secret.as_ref().unwrap().expose_secret(),
        "cred-secret"
    );
    // The environment still wins over a credential.
    let c = Config::load_with(
        &opts(Some(&p)),
        &env(&[
            ("CREDENTIALS_DIRECTORY", creds.path().to_str().unwrap()),
            ("APP_SECRET", "env-secret"),
        ]),
    )
    .unwrap();
    assert_eq!(c.app_secret.unwrap().expose_secret(), "env-secret");
}

#[test]
fn a_secret_file_readable_by_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sf = write(dir.path(), "secret", "leaky", 0o644);
    let e = Config::load_with(
        &opts(None),
        &env(&[("APP_SECRET_FILE", sf.to_str().unwrap())]),
    )
    .unwrap_err();
    assert!(
        matches!(e, ConfigError::SecretFileMode { mode: 0o644, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("chmod 600"), "{e}");
    assert!(!e.to_string().contains("leaky"));
}

#[test]
fn inline_and_file_at_once_is_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let sf = write(dir.path(), "secret", "x", 0o600);
    let p = write(
        dir.path(),
        "c.toml",
        &format!(
            "app_secret = \"inline\"\napp_secret_file = {:?}\n",
            sf.display().to_string()
        ),
        0o600,
    );
    assert!(matches!(
        Config::load_with(&opts(Some(&p)), &env(&[])).unwrap_err(),
        ConfigError::Conflict { .. }
    ));
    let e = Config::load_with(
        &opts(None),
        &env(&[
            ("APP_SECRET", "a"),
            ("APP_SECRET_FILE", sf.to_str().unwrap()),
        ]),
    )
    .unwrap_err();
    assert!(matches!(e, ConfigError::Conflict { .. }), "{e}");
}

#[test]
fn secrets_on_the_command_line_are_refused() {
    let mut o = opts(None);
    o.overrides = vec![("app_secret".into(), "on-the-cmdline".into())];
    let e = Config::load_with(&o, &env(&[])).unwrap_err();
    assert!(e.to_string().contains("app_secret_file"), "{e}");
    assert!(!e.to_string().contains("on-the-cmdline"));
}

#[test]
fn render_redacts_every_secret() {
    let e = env(&[
        ("APP_ID", "cli_x"),
        ("APP_SECRET", "very-secret-app"),
        ("LARK_TOKEN_ENCRYPTION_KEY", KEY),
        ("LARK_VERIFICATION_TOKEN", "vtok-secret"),
    ]);
    let c = Config::load_with(&opts(None), &e).unwrap();
    c.require_serve().unwrap();
    let out = c.render();
    for s in ["very-secret-app", KEY, "vtok-secret"] {
        assert!(!out.contains(s), "{out}");
    }
    assert!(
        out.contains("app_id = \"cli_x\"  # environment APP_ID"),
        "{out}"
    );
    assert!(
        out.contains("app_secret = \"<redacted, 15 characters>\""),
        "{out}"
    );
    assert!(!format!("{c:?}").contains("very-secret-app"));
}

#[test]
fn serve_requires_credentials_and_a_key() {
    let c = Config::load_with(&opts(None), &env(&[("APP_ID", "cli_x")])).unwrap();
    let e = c.require_serve().unwrap_err();
    assert!(
        matches!(&e, ConfigError::Missing { key, .. } if key == "app_secret"),
        "{e}"
    );
    assert!(e.to_string().contains("APP_SECRET"), "{e}");
    let c = Config::load_with(&opts(None), &env(&[("APP_SECRET", "s")])).unwrap();
    let e = c.require_serve().unwrap_err();
    assert!(
        matches!(&e, ConfigError::Missing { key, .. } if key == "app_id"),
        "{e}"
    );
    // No app in the configuration: the registry's apps are served (the daemon refuses to
    // start when there are none); the key is still required.
    let c = Config::load_with(&opts(None), &env(&[])).unwrap();
    assert!(c.require_serve().is_err());
    let c = Config::load_with(&opts(None), &env(&[("LARK_TOKEN_ENCRYPTION_KEY", KEY)])).unwrap();
    c.require_serve().unwrap();
}

#[test]
fn the_packaged_example_is_generated_from_the_catalogue_and_loads() {
    let want = settings::example_toml();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/config.example.toml");
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "packaging/config.example.toml is out of date; regenerate it with `lark-service config example > packaging/config.example.toml`"
    );
    let c = Config::load_with(&opts(Some(&path)), &env(&[])).unwrap();
    assert_eq!(
        c.storage_path,
        PathBuf::from("/var/lib/lark-service/lark-service.redb")
    );
}

#[test]
fn systemd_credentials_are_read_whatever_their_acl_mode_shows() {
    // systemd grants the service user an ACL on its credentials, which shows as 0440.
    let creds = tempfile::tempdir().unwrap();
    write(creds.path(), "app_secret", "cred-secret", 0o440);
    let c = Config::load_with(
        &opts(None),
        &env(&[("CREDENTIALS_DIRECTORY", creds.path().to_str().unwrap())]),
    )
    .unwrap();
    assert_eq!(c.app_secret.unwrap().expose_secret(), "cred-secret");
    // A *_FILE secret with the same mode is still refused.
    let e = Config::load_with(
        &opts(None),
        &env(&[(
            "APP_SECRET_FILE",
            creds.path().join("app_secret").to_str().unwrap(),
        )]),
    )
    .unwrap_err();
    assert!(matches!(e, ConfigError::SecretFileMode { .. }), "{e}");
}

/// Issue 16: `serve` of a real app needs a redirect users' browsers reach, and says so when it
/// is not https://.
#[test]
fn serve_requires_a_public_redirect_and_warns_when_it_is_not_https() {
    let base = [
        ("APP_ID", "cli_x"),
        ("APP_SECRET", "s"),
        ("LARK_TOKEN_ENCRYPTION_KEY", KEY),
    ];
    let c = Config::load_with(&opts(None), &env(&base)).unwrap();
    c.require_serve().unwrap();
    let e = c.require_public_redirect().unwrap_err();
    assert!(
        matches!(&e, ConfigError::Missing { key, .. } if key == "http.public_url"),
        "{e}"
    );
    let text = e.to_string();
    assert!(
        text.contains("PUBLIC_URL") && text.contains("AUTH_REDIRECT_URI"),
        "{text}"
    );

    for (k, v, warned) in [
        ("PUBLIC_URL", "https://svc.example.com", false),
        ("PUBLIC_URL", "http://svc.example.com", true),
        (
            "AUTH_REDIRECT_URI",
            "https://svc.example.com/oauth/callback",
            false,
        ),
        (
            "AUTH_REDIRECT_URI",
            "http://10.0.0.1:8080/oauth/callback",
            true,
        ),
    ] {
        let mut pairs = base.to_vec();
        pairs.push((k, v));
        let c = Config::load_with(&opts(None), &env(&pairs)).unwrap();
        let w = c.require_public_redirect().unwrap();
        assert_eq!(!w.is_empty(), warned, "{k}={v}: {w:?}");
        if warned {
            assert!(w[0].contains("https://"), "{w:?}");
        }
    }
}

#[test]
fn a_config_file_with_an_inline_secret_readable_by_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let text = "app_id = \"cli_x\"\napp_secret = \"inline-leaky-secret\"\n";
    let loose = write(dir.path(), "loose.toml", text, 0o644);
    let e = Config::load_with(&opts(Some(&loose)), &env(&[])).unwrap_err();
    assert!(
        matches!(e, ConfigError::ConfigFileMode { mode: 0o644, ref key, .. } if key == "app_secret"),
        "{e}"
    );
    assert!(e.to_string().contains("app_secret_file"), "{e}");
    assert!(!e.to_string().contains("inline-leaky-secret"));
    // Private, it loads; loose without an inline secret, it loads.
    let private = write(dir.path(), "private.toml", text, 0o600);
    assert!(Config::load_with(&opts(Some(&private)), &env(&[])).is_ok());
    let plain = write(dir.path(), "plain.toml", "app_id = \"cli_x\"\n", 0o644);
    assert!(Config::load_with(&opts(Some(&plain)), &env(&[])).is_ok());
}

#[test]
fn the_python_deployments_names_are_read() {
    let e = env(&[
        (
            "OAUTH_REDIRECT_URI",
            "https://auth.example.com/oauth/callback",
        ),
        ("FEISHU_API_BASE_URL", "https://open.example.com"),
        ("METRICS_PORT", "9100"),
        ("CALLBACK_SERVER_ENABLED", "false"),
        ("CALLBACK_SERVER_HOST", "0.0.0.0"),
        ("CALLBACK_SERVER_PORT", "9000"),
        ("LARK_VERIFICATION_TOKEN", "vt-python"),
        ("LARK_ENCRYPT_KEY", "ek-python"),
    ]);
    let c = Config::load_with(&opts(None), &e).unwrap();
    assert_eq!(
        c.auth.redirect_uri.as_ref().map(url::Url::as_str),
        Some("https://auth.example.com/oauth/callback")
    );
    assert_eq!(c.domain, "https://open.example.com");
    assert_eq!(c.metrics_addr.port(), 9100);
    assert!(!c.websocket.fallback_to_http);
    assert_eq!(c.http_listen, "0.0.0.0:9000".parse().unwrap());
    assert_eq!(
        c.verification_token
            .as_ref()
            .map(|s| s.expose_secret().to_owned()),
        Some("vt-python".to_owned())
    );
    assert!(c.encrypt_key.is_some());
    // Only the port: the default host stays; and HTTP_LISTEN, when set, wins over both.
    let c = Config::load_with(&opts(None), &env(&[("CALLBACK_SERVER_PORT", "9001")])).unwrap();
    assert_eq!(c.http_listen, "127.0.0.1:9001".parse().unwrap());
    let c = Config::load_with(
        &opts(None),
        &env(&[
            ("CALLBACK_SERVER_PORT", "9001"),
            ("HTTP_LISTEN", "127.0.0.1:7000"),
        ]),
    )
    .unwrap();
    assert_eq!(c.http_listen, "127.0.0.1:7000".parse().unwrap());
    let err = Config::load_with(&opts(None), &env(&[("CALLBACK_SERVER_HOST", "nowhere")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("CALLBACK_SERVER_HOST"), "{err}");
}

#[test]
fn cards_default_to_chinese_with_the_detailed_description() {
    let c = Config::load_with(&opts(None), &env(&[])).unwrap();
    assert_eq!(c.auth.card.locale, CardLocale::Zh);
    assert!(c.auth.card.include_description);
    assert!(c.auth.card.privacy_policy_url.is_none() && c.auth.card.template_id.is_none());
    let c = Config::load_with(
        &opts(None),
        &env(&[
            ("CARD_LOCALE", "en-US"),
            ("AUTH_CARD_INCLUDE_DESCRIPTION", "false"),
            ("AUTH_CARD_TEMPLATE_ID", "AAqk1234"),
            (
                "AUTH_CARD_PRIVACY_POLICY_URL",
                "https://example.com/privacy",
            ),
        ]),
    )
    .unwrap();
    assert_eq!(c.auth.card.locale, CardLocale::En);
    assert!(!c.auth.card.include_description);
    assert_eq!(c.auth.card.template_id.as_deref(), Some("AAqk1234"));
    assert_eq!(
        c.auth
            .card
            .privacy_policy_url
            .as_ref()
            .map(url::Url::as_str),
        Some("https://example.com/privacy")
    );
    let err = Config::load_with(&opts(None), &env(&[("CARD_LOCALE", "fr")]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("CARD_LOCALE") && err.contains("zh or en"),
        "{err}"
    );
}

#[test]
fn auth_flow_device_needs_no_public_redirect_and_auto_chooses_by_the_public_url() {
    let base = [
        ("APP_ID", "cli_x"),
        ("APP_SECRET", "s"),
        ("LARK_TOKEN_ENCRYPTION_KEY", KEY),
    ];
    let load = |extra: &[(&'static str, &'static str)]| {
        let mut pairs = base.to_vec();
        pairs.extend_from_slice(extra);
        Config::load_with(&opts(None), &env(&pairs))
    };
    let c = load(&[]).unwrap();
    assert_eq!(c.auth.flow, AuthFlow::Redirect);
    assert!(!c.device_flow());
    let c = load(&[("AUTH_FLOW", "device")]).unwrap();
    assert!(c.device_flow());
    assert!(c.require_public_redirect().unwrap().is_empty());
    let c = load(&[("AUTH_FLOW", "auto")]).unwrap();
    assert!(c.device_flow());
    let c = load(&[
        ("AUTH_FLOW", "auto"),
        ("PUBLIC_URL", "https://svc.example.com"),
    ])
    .unwrap();
    assert!(!c.device_flow());
    let c = load(&[("AUTH_FLOW", "Device")]).unwrap();
    assert_eq!(c.auth.flow, AuthFlow::Device);
    assert!(load(&[("AUTH_FLOW", "poll")]).is_err());
}

#[test]
fn the_config_encryption_key_is_a_fernet_key_or_64_hex() {
    for key in ["TjPs3IL7VF48WI8azL55oGtewjKXD_ILCUIgOEOAMvo=", KEY] {
        let c =
            Config::load_with(&opts(None), &env(&[("LARK_CONFIG_ENCRYPTION_KEY", key)])).unwrap();
        assert_eq!(
            c.config_encryption_key()
                .map(|k| k.expose_secret().to_owned())
                .as_deref(),
            Some(key)
        );
    }
    let e = Config::load_with(
        &opts(None),
        &env(&[("LARK_CONFIG_ENCRYPTION_KEY", "not-a-key")]),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("LARK_CONFIG_ENCRYPTION_KEY") && !e.contains("not-a-key"),
        "{e}"
    );
    let c = Config::load_with(&opts(None), &env(&[])).unwrap();
    assert!(c.config_encryption_key().is_none());
}

#[test]
fn storage_backend_defaults_to_redb_and_reads_postgres_urls() {
    let c = Config::load_with(&opts(None), &env(&[])).unwrap();
    assert!(matches!(c.storage_backend, StorageBackend::Redb));
    let c = Config::load_with(
        &opts(None),
        &env(&[
            ("STORAGE_BACKEND", "postgres"),
            (
                "STORAGE_POSTGRES_URL",
                "postgres://svc:pw@db.internal/ls?sslmode=require",
            ),
        ]),
    )
    .unwrap();
    match &c.storage_backend {
        StorageBackend::Postgres { url } => assert_eq!(
            url.expose_secret(),
            "postgres://svc:pw@db.internal/ls?sslmode=require"
        ),
        other => panic!("{other:?}"),
    }
    // From the parts, user and password percent-encoded.
    let c = Config::load_with(
        &opts(None),
        &env(&[
            ("STORAGE_BACKEND", "postgres"),
            ("POSTGRES_HOST", "10.0.0.5"),
            ("POSTGRES_PORT", "6432"),
            ("POSTGRES_DB", "tokens"),
            ("POSTGRES_USER", "lark svc"),
            ("POSTGRES_PASSWORD", "p@ss:w/rd"),
        ]),
    )
    .unwrap();
    match &c.storage_backend {
        StorageBackend::Postgres { url } => {
            assert_eq!(
                url.expose_secret(),
                "postgres://lark%20svc:p%40ss%3Aw%2Frd@10.0.0.5:6432/tokens"
            );
            // The URL is what the PostgreSQL client reads back to the same parts.
            let cfg: tokio_postgres::Config = url.expose_secret().parse().unwrap();
            assert_eq!(cfg.get_user(), Some("lark svc"));
            assert_eq!(cfg.get_password(), Some(b"p@ss:w/rd".as_slice()));
            assert_eq!(cfg.get_dbname(), Some("tokens"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn storage_backend_postgres_without_a_url_or_host_is_refused() {
    let e = Config::load_with(&opts(None), &env(&[("STORAGE_BACKEND", "postgres")])).unwrap_err();
    assert!(e.to_string().contains("storage.postgres_url"), "{e}");
    let e = Config::load_with(&opts(None), &env(&[("STORAGE_BACKEND", "mysql")])).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("STORAGE_BACKEND") && text.contains("redb or postgres"),
        "{text}"
    );
    // A password given with the parts never shows in an error.
    let e = Config::load_with(
        &opts(None),
        &env(&[
            ("STORAGE_BACKEND", "postgres"),
            ("POSTGRES_HOST", "db"),
            ("POSTGRES_PORT", "99999"),
            ("POSTGRES_PASSWORD", "hunter2-secret"),
        ]),
    )
    .unwrap_err();
    assert!(!e.to_string().contains("hunter2-secret"));
    assert!(e.to_string().contains("POSTGRES_PORT"), "{e}");
}

/// Webhooks: off by default; URLs need a secret of at least 32 bytes (never sent unsigned),
/// which may come from a file; a URL that is not http(s) is refused by name.
#[test]
fn webhooks_need_a_long_enough_secret() {
    let c = Config::load_with(&opts(None), &env(&[])).unwrap();
    assert!(!c.webhooks.enabled());
    assert_eq!(c.webhooks.max_attempts, 12);
    assert_eq!(c.webhooks.reminder_lead, Duration::from_secs(7 * 86400));
    assert_eq!(c.webhooks.grant_lifetime, Duration::from_secs(365 * 86400));
    let url = (
        "WEBHOOKS_URLS",
        "https://a.example/hook, https://b.example/h",
    );
    let e = Config::load_with(&opts(None), &env(&[url])).unwrap_err();
    assert!(
        e.to_string().contains("WEBHOOKS_SECRET") || e.to_string().contains("webhooks.secret"),
        "{e}"
    );
    let short = Config::load_with(&opts(None), &env(&[url, ("WEBHOOKS_SECRET", "short")]));
    let e = short.unwrap_err().to_string();
    assert!(!e.contains("short"), "the secret is never printed: {e}");
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "whsec", &"k".repeat(40), 0o600);
    let c = Config::load_with(
        &opts(None),
        &env(&[url, ("WEBHOOKS_SECRET_FILE", file.to_str().unwrap())]),
    )
    .unwrap();
    assert_eq!(c.webhooks.urls.len(), 2);
    assert_eq!(c.webhooks.secret.unwrap().expose_secret(), "k".repeat(40));
    let bad = Config::load_with(
        &opts(None),
        &env(&[
            ("WEBHOOKS_URLS", "ftp://x"),
            ("WEBHOOKS_SECRET", &"k".repeat(40)),
        ]),
    );
    assert!(bad.unwrap_err().to_string().contains("WEBHOOKS_URLS"));
}
