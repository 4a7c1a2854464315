//! Settings of the flow.

use std::time::Duration;

use secrecy::SecretString;

use super::render::CardStyle;
use crate::config::Config;
use crate::schedule::Schedule;

/// Path of the OAuth redirect on the HTTP listener.
pub const CALLBACK_PATH: &str = "/oauth/callback";

/// Settings of the flow.
#[derive(Clone, Debug)]
pub struct AuthOptions {
    /// How long a pending session lives.
    pub session_expiry: Duration,
    /// Share of a token's lifetime after which it is refreshed.
    pub refresh_threshold: f64,
    /// Requests per user per window.
    pub rate_limit: u32,
    /// The sliding rate-limit window.
    pub rate_limit_window: Duration,
    /// The OAuth redirect URI (must be registered with the app).
    pub redirect_uri: String,
    /// Scopes of a request a user starts with `/authorize`.
    pub default_scopes: Vec<String>,
    /// Bearer token of the admin routes; `None` disables them.
    pub admin_token: Option<SecretString>,
    /// Tokens refreshed at once.
    pub refresh_concurrency: usize,
    /// Each refresh waits a random time up to this first, so due tokens spread out.
    pub refresh_jitter: Duration,
    /// Send a new card when a refresh token is refused for good.
    pub resend_card_on_reauth: bool,
    /// Schedule of the user-info sync; `None`: off.
    pub user_info_sync: Option<Schedule>,
    /// How the cards look.
    pub card: CardStyle,
}

impl AuthOptions {
    /// The options the configuration asks for.
    #[must_use]
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            session_expiry: cfg.auth.session_expiry,
            refresh_threshold: cfg.auth.token_refresh_threshold,
            rate_limit: cfg.auth.request_rate_limit,
            rate_limit_window: cfg.auth.rate_limit_window,
            redirect_uri: redirect_uri(cfg),
            default_scopes: cfg.auth.default_scopes.clone(),
            admin_token: cfg.admin_token.clone(),
            refresh_concurrency: cfg.auth.refresh_concurrency.max(1),
            refresh_jitter: Duration::from_secs(5),
            resend_card_on_reauth: cfg.auth.resend_card_on_reauth,
            user_info_sync: cfg
                .user_info_sync
                .enabled
                .then(|| Schedule::parse(&cfg.user_info_sync.schedule).ok())
                .flatten(),
            card: CardStyle {
                locale: cfg.auth.card.locale,
                include_description: cfg.auth.card.include_description,
                privacy_policy_url: cfg
                    .auth
                    .card
                    .privacy_policy_url
                    .as_ref()
                    .map(ToString::to_string),
                template_id: cfg.auth.card.template_id.clone(),
            },
        }
    }
}

/// `auth.redirect_uri`, else `http.public_url` + `/oauth/callback`, else the listener's address.
#[must_use]
pub fn redirect_uri(cfg: &Config) -> String {
    if let Some(u) = &cfg.auth.redirect_uri {
        return u.to_string();
    }
    match &cfg.public_url {
        Some(base) => format!("{}{CALLBACK_PATH}", base.as_str().trim_end_matches('/')),
        None => format!("http://{}{CALLBACK_PATH}", cfg.http_listen),
    }
}
