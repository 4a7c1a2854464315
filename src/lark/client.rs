//! The shared HTTP side of the Lark OpenAPI client: configuration
//! ([`LarkConfig`], [`Domain`], [`RetryPolicy`]), the [`LarkClient`] handle,
//! and the one request loop every endpoint goes through.
//!
//! This module owns: the single `reqwest` client (rustls, per-request
//! timeout, no redirects), attaching the bearer token, reading `X-Tt-Logid`,
//! decoding the standard `{code, msg, data}` envelope, retrying transient
//! failures with capped, jittered exponential backoff that honours
//! `x-ogw-ratelimit-reset` / `Retry-After`, and retrying once after dropping
//! an app token the platform rejected. It never logs bodies, headers or
//! secrets. Endpoint methods live in `api/*` and `oauth.rs`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;
use url::Url;

use super::error::Error;
use super::token::{Issued, TokenCache, TokenKind, TokenStatus};

/// Default per-request timeout.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Default share of a token's lifetime after which it is refreshed.
pub const DEFAULT_TOKEN_REFRESH_SHARE: f64 = 0.8;

/// Which Lark deployment to talk to (protocol notes §1).
#[derive(Clone, PartialEq, Eq)]
pub enum Domain {
    /// Feishu (China): `https://open.feishu.cn`, `https://accounts.feishu.cn`.
    Feishu,
    /// Lark (international): `https://open.larksuite.com`, `https://accounts.larksuite.com`.
    Lark,
    /// Any base URL (tests, proxies). Serves as both the OpenAPI and the
    /// accounts (authorize page) base.
    Custom(Url),
}

impl Domain {
    /// Base of the OpenAPI and token endpoints, without a trailing slash.
    #[must_use]
    pub fn open_base(&self) -> String {
        match self {
            Self::Feishu => "https://open.feishu.cn".to_owned(),
            Self::Lark => "https://open.larksuite.com".to_owned(),
            Self::Custom(url) => url.as_str().trim_end_matches('/').to_owned(),
        }
    }

    /// Base of the OAuth authorize page, without a trailing slash.
    #[must_use]
    pub fn accounts_base(&self) -> String {
        match self {
            Self::Feishu => "https://accounts.feishu.cn".to_owned(),
            Self::Lark => "https://accounts.larksuite.com".to_owned(),
            Self::Custom(url) => url.as_str().trim_end_matches('/').to_owned(),
        }
    }
}

impl fmt::Debug for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Feishu => f.write_str("Feishu"),
            Self::Lark => f.write_str("Lark"),
            Self::Custom(url) => write!(f, "Custom({url})"),
        }
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Feishu => f.write_str("feishu"),
            Self::Lark => f.write_str("lark"),
            Self::Custom(url) => write!(f, "{url}"),
        }
    }
}

impl FromStr for Domain {
    type Err = Error;

    /// `feishu`, `lark` (case-insensitive), or an `http(s)://` URL without
    /// query, fragment or credentials.
    fn from_str(s: &str) -> Result<Self, Error> {
        let trimmed = s.trim();
        if trimmed.eq_ignore_ascii_case("feishu") {
            return Ok(Self::Feishu);
        }
        if trimmed.eq_ignore_ascii_case("lark") || trimmed.eq_ignore_ascii_case("larksuite") {
            return Ok(Self::Lark);
        }
        let url = Url::parse(trimmed).map_err(|e| {
            Error::Config(format!(
                "domain must be `feishu`, `lark` or an http(s) URL: {e}"
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::Config(format!(
                "domain URL scheme must be http or https, not `{}`",
                url.scheme()
            )));
        }
        if url.cannot_be_a_base()
            || url.host().is_none()
            || url.query().is_some()
            || url.fragment().is_some()
            || !url.username().is_empty()
            || url.password().is_some()
        {
            return Err(Error::Config(
                "domain URL must be a plain base URL (host and optional path only)".to_owned(),
            ));
        }
        Ok(Self::Custom(url))
    }
}

/// How transient failures are retried.
///
/// The delay before retry `n` (1-based) is `min(cap, base * 2^(n-1))`, jittered
/// to a uniform value in `[delay/2, delay]`. When the response carries
/// `x-ogw-ratelimit-reset` or `Retry-After` (seconds), that wait is used
/// instead (plus up to `base` of jitter); if it exceeds `max_rate_limit_wait`
/// the error is returned rather than waited out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts including the first (1 = never retry).
    pub max_attempts: u32,
    /// Backoff before the first retry.
    pub base: Duration,
    /// Upper bound of the exponential backoff.
    pub cap: Duration,
    /// Longest server-requested wait the client will honour.
    pub max_rate_limit_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            base: Duration::from_millis(250),
            cap: Duration::from_secs(8),
            max_rate_limit_wait: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries.
    #[must_use]
    pub fn no_retry() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Delay before retry number `retry` (1-based), given a server hint.
    /// `None` means: do not retry (the hint asks for more than we wait).
    pub(crate) fn delay(&self, retry: u32, server_hint: Option<Duration>) -> Option<Duration> {
        let mut rng = rand::rng();
        if let Some(hint) = server_hint {
            if hint > self.max_rate_limit_wait {
                return None;
            }
            let jitter_ms = u64::try_from(self.base.as_millis()).unwrap_or(u64::MAX);
            return Some(hint + Duration::from_millis(rng.random_range(0..=jitter_ms)));
        }
        let unit: f64 = rng.random_range(0.0..=1.0);
        Some(crate::backoff::Backoff::new(self.base, self.cap).jittered(retry.max(1), unit))
    }
}

/// Reads the server's requested wait from `x-ogw-ratelimit-reset` or
/// `Retry-After` (delta-seconds; HTTP dates are ignored). Takes the larger.
pub(crate) fn rate_limit_hint(headers: &HeaderMap) -> Option<Duration> {
    let secs = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    match (secs("x-ogw-ratelimit-reset"), secs("retry-after")) {
        (None, None) => None,
        (a, b) => Some(Duration::from_secs(a.unwrap_or(0).max(b.unwrap_or(0)))),
    }
}

/// Everything needed to build a [`LarkClient`].
#[derive(Debug, Clone)]
pub struct LarkConfig {
    /// Which deployment (or fake) to talk to.
    pub domain: Domain,
    /// App ID (`cli_…`), used as OAuth `client_id` too.
    pub app_id: String,
    /// App secret; never logged.
    pub app_secret: SecretString,
    /// Timeout applied to every HTTP request.
    pub request_timeout: Duration,
    /// Share of a tenant/app token's lifetime after which it is refreshed:
    /// 0.8 refreshes once 80 % of `expire` has passed (20 % remains).
    /// Must be in `(0, 1]`.
    pub token_refresh_share: f64,
    /// Retry policy for transient failures.
    pub retry: RetryPolicy,
    /// Trust and proxy; `None`: the built-in roots and no proxy.
    pub net: Option<crate::net::Net>,
}

impl LarkConfig {
    /// A configuration with default timeout, refresh share and retry policy.
    #[must_use]
    pub fn new(domain: Domain, app_id: impl Into<String>, app_secret: SecretString) -> Self {
        Self {
            domain,
            app_id: app_id.into(),
            app_secret,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            token_refresh_share: DEFAULT_TOKEN_REFRESH_SHARE,
            retry: RetryPolicy::default(),
            net: None,
        }
    }
}

/// Which credential a request carries.
#[derive(Clone, Copy)]
pub(crate) enum Auth<'a> {
    /// No `Authorization` header (token endpoints).
    None,
    /// `Bearer <tenant_access_token>` from the cache.
    Tenant,
    /// `Bearer <user_access_token>` supplied by the caller.
    User(&'a SecretString),
}

/// One logical API request (retries re-send it).
pub(crate) struct ApiRequest<'a> {
    pub(crate) method: Method,
    /// Path starting with `/open-apis/`, dynamic segments already escaped.
    pub(crate) path: String,
    pub(crate) query: Vec<(&'static str, String)>,
    pub(crate) body: Option<serde_json::Value>,
    pub(crate) auth: Auth<'a>,
    /// A one-time request (see [`ApiRequest::one_time`]).
    pub(crate) one_time: bool,
}

impl<'a> ApiRequest<'a> {
    pub(crate) fn new(method: Method, path: String, auth: Auth<'a>) -> Self {
        Self {
            method,
            path,
            query: Vec::new(),
            body: None,
            auth,
            one_time: false,
        }
    }

    /// Marks a request that must not be sent twice blindly: an authorization-code exchange,
    /// a refresh grant (refresh tokens are single use), a record create. [`LarkClient::execute`]
    /// retries it only after a failure that surely left the server untouched
    /// ([`Error::surely_not_processed`]: no connection, rate limited) or after the platform
    /// refused the app's cached token; after anything else (a timeout, a lost connection, a
    /// 5xx) the error is returned, and [`Error::outcome_unknown`] tells the caller that the
    /// request may have been carried out.
    pub(crate) fn one_time(mut self) -> Self {
        self.one_time = true;
        self
    }

    pub(crate) fn query(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.query.push((key, value.into()));
        self
    }

    pub(crate) fn json(mut self, body: serde_json::Value) -> Self {
        self.body = Some(body);
        self
    }
}

/// A response as read off the wire.
pub(crate) struct RawResponse {
    pub(crate) status: u16,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Vec<u8>,
}

impl RawResponse {
    /// `X-Tt-Logid` header, if present.
    pub(crate) fn header_log_id(&self) -> Option<String> {
        self.headers
            .get("x-tt-logid")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    pub(crate) fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// The error-relevant head of the standard envelope.
#[derive(Deserialize)]
struct EnvelopeHead {
    #[serde(default)]
    code: Option<i64>,
    #[serde(default)]
    msg: Option<String>,
    #[serde(default)]
    error: Option<ErrorDetail>,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    log_id: Option<String>,
}

#[derive(Deserialize)]
struct EnvelopeData<T> {
    data: Option<T>,
}

/// Decodes the error head shared by every OpenAPI response and turns a
/// non-zero `code` or a failed status into an [`Error`]. Returns the log id
/// on success so decoders can attach it.
pub(crate) fn check_envelope(raw: &RawResponse) -> Result<Option<String>, Error> {
    let header_log_id = raw.header_log_id();
    let Ok(head) = serde_json::from_slice::<EnvelopeHead>(&raw.body) else {
        if raw.is_success() {
            return Err(Error::Decode {
                reason: "body is not a JSON object".to_owned(),
                status: raw.status,
                log_id: header_log_id,
            });
        }
        return Err(Error::Http {
            status: raw.status,
            log_id: header_log_id,
        });
    };
    let log_id = header_log_id.or_else(|| head.error.and_then(|e| e.log_id));
    match head.code {
        Some(code) if code != 0 => Err(Error::Api {
            code,
            msg: head.msg.unwrap_or_default(),
            status: raw.status,
            log_id,
        }),
        _ if !raw.is_success() => Err(Error::Http {
            status: raw.status,
            log_id,
        }),
        Some(_) => Ok(log_id),
        None => Err(Error::Decode {
            reason: "response has no `code`".to_owned(),
            status: raw.status,
            log_id,
        }),
    }
}

/// Decodes a standard `{code, msg, data}` response into `data`.
pub(crate) fn decode_data<T: DeserializeOwned>(raw: &RawResponse) -> Result<T, Error> {
    let log_id = check_envelope(raw)?;
    let env: EnvelopeData<T> = serde_json::from_slice(&raw.body).map_err(|e| Error::Decode {
        reason: format!("unexpected `data`: {e}"),
        status: raw.status,
        log_id: log_id.clone(),
    })?;
    env.data.ok_or_else(|| Error::Decode {
        reason: "response has no `data`".to_owned(),
        status: raw.status,
        log_id,
    })
}

/// Decodes a standard response whose `data` is irrelevant.
pub(crate) fn decode_unit(raw: &RawResponse) -> Result<(), Error> {
    check_envelope(raw).map(|_| ())
}

/// Decodes a response whose fields sit at the top level (token endpoints).
pub(crate) fn decode_top_level<T: DeserializeOwned>(raw: &RawResponse) -> Result<T, Error> {
    let log_id = check_envelope(raw)?;
    serde_json::from_slice(&raw.body).map_err(|e| Error::Decode {
        reason: format!("unexpected body: {e}"),
        status: raw.status,
        log_id,
    })
}

/// Percent-encodes one path segment (everything but RFC 3986 unreserved) of a caller-supplied
/// id. An empty id, `.` or `..` is refused rather than escaped: URL parsers (WHATWG, the `url`
/// crate under reqwest) treat `%2E` and `%2E%2E` as dot segments too, so no escaping keeps
/// them from changing the path.
pub(crate) fn seg(s: &str) -> Result<String, Error> {
    if matches!(s, "" | "." | "..") {
        return Err(Error::Config(format!(
            "{s:?} is not a valid id (it would change the request path)"
        )));
    }
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Ok(out)
}

pub(crate) struct Inner {
    pub(crate) http: reqwest::Client,
    pub(crate) domain: Domain,
    pub(crate) open_base: String,
    pub(crate) app_id: String,
    pub(crate) app_secret: SecretString,
    pub(crate) request_timeout: Duration,
    pub(crate) retry: RetryPolicy,
    pub(crate) tenant_token: TokenCache,
    pub(crate) app_token: TokenCache,
}

/// Handle to the Lark OpenAPI. Cheap to clone; clones share the HTTP
/// connection pool and the token caches.
#[derive(Clone)]
pub struct LarkClient {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for LarkClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LarkClient")
            .field("domain", &self.inner.domain)
            .field("app_id", &self.inner.app_id)
            .field("app_secret", &"[REDACTED]")
            .finish_non_exhaustive()
    }
}

impl LarkClient {
    /// Builds the client. Fails on an empty app id/secret, a refresh share
    /// outside `(0, 1]`, a zero timeout or attempt count, or if the TLS
    /// backend cannot be initialised.
    pub fn new(config: LarkConfig) -> Result<Self, Error> {
        if config.app_id.trim().is_empty() {
            return Err(Error::Config("app_id is empty".to_owned()));
        }
        if config.app_secret.expose_secret().is_empty() {
            return Err(Error::Config("app_secret is empty".to_owned()));
        }
        let share = config.token_refresh_share;
        if !(share > 0.0 && share <= 1.0) {
            return Err(Error::Config(format!(
                "token_refresh_share must be in (0, 1], got {share}"
            )));
        }
        if config.request_timeout.is_zero() {
            return Err(Error::Config("request_timeout must be positive".to_owned()));
        }
        if config.retry.max_attempts == 0 {
            return Err(Error::Config(
                "retry.max_attempts must be at least 1".to_owned(),
            ));
        }
        let net = match config.net {
            Some(n) => n,
            None => crate::net::Net::new(&crate::net::NetOptions::default())
                .map_err(|e| Error::Config(e.to_string()))?,
        };
        let http = net
            .http_client_builder()
            .user_agent(concat!("lark-service/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Config(format!("cannot build HTTP client: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                open_base: config.domain.open_base(),
                domain: config.domain,
                app_id: config.app_id,
                app_secret: config.app_secret,
                request_timeout: config.request_timeout,
                retry: config.retry,
                tenant_token: TokenCache::new(TokenKind::Tenant, share),
                app_token: TokenCache::new(TokenKind::App, share),
            }),
        })
    }

    /// The configured deployment.
    #[must_use]
    pub fn domain(&self) -> &Domain {
        &self.inner.domain
    }

    /// The app id (OAuth `client_id`).
    #[must_use]
    pub fn app_id(&self) -> &str {
        &self.inner.app_id
    }

    /// Sends one request, retrying per the policy, and decodes it with `decode`.
    pub(crate) async fn execute<T>(
        &self,
        req: &ApiRequest<'_>,
        decode: impl Fn(&RawResponse) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let policy = self.inner.retry;
        let mut failures: u32 = 0;
        let mut token_retried = false;
        loop {
            let (bearer, cached) = match req.auth {
                Auth::None => (None, None),
                Auth::User(token) => (Some(token.clone()), None),
                Auth::Tenant => {
                    let t = self.cached_token(TokenKind::Tenant).await?;
                    (Some(t.token), Some((TokenKind::Tenant, t.generation)))
                }
            };
            let (err, hint) = match self.send_once(req, bearer.as_ref()).await {
                Ok(raw) => match decode(&raw) {
                    Ok(value) => return Ok(value),
                    Err(e) => {
                        let hint = rate_limit_hint(&raw.headers);
                        (e, hint)
                    }
                },
                Err(e) => (e, None),
            };
            if let Some((kind, generation)) = cached {
                if err.is_app_token_invalid() && !token_retried {
                    token_retried = true;
                    tracing::warn!(
                        path = %req.path,
                        code = err.code(),
                        log_id = err.log_id(),
                        "Lark rejected the cached {} token; fetching a new one and retrying once.",
                        kind.name()
                    );
                    self.cache(kind).invalidate(generation);
                    continue;
                }
            }
            failures += 1;
            if !err.is_transient() || failures >= policy.max_attempts {
                return Err(err);
            }
            if req.one_time && !err.surely_not_processed() {
                tracing::warn!(
                    path = %req.path,
                    status = err.status(),
                    code = err.code(),
                    log_id = err.log_id(),
                    "A one-time request failed in a way that may have reached the server; not retried."
                );
                return Err(err);
            }
            let Some(delay) = policy.delay(failures, hint) else {
                tracing::warn!(path = %req.path, wait_s = hint.map(|h| h.as_secs()),
                    "Lark asked to wait longer than the retry policy allows; giving up.");
                return Err(err);
            };
            tracing::debug!(
                path = %req.path,
                attempt = failures,
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                status = err.status(),
                code = err.code(),
                log_id = err.log_id(),
                "Transient Lark error; retrying."
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// One HTTP round trip, no retries.
    async fn send_once(
        &self,
        req: &ApiRequest<'_>,
        bearer: Option<&SecretString>,
    ) -> Result<RawResponse, Error> {
        let url = format!("{}{}", self.inner.open_base, req.path);
        let mut builder = self
            .inner
            .http
            .request(req.method.clone(), url)
            .timeout(self.inner.request_timeout);
        if !req.query.is_empty() {
            builder = builder.query(&req.query);
        }
        if let Some(token) = bearer {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose_secret()))
                .map_err(|_| {
                    Error::Config("access token is not a valid header value".to_owned())
                })?;
            value.set_sensitive(true);
            builder = builder.header(AUTHORIZATION, value);
        }
        if let Some(body) = &req.body {
            let bytes = serde_json::to_vec(body)
                .map_err(|e| Error::Config(format!("cannot serialize request body: {e}")))?;
            builder = builder
                .header(CONTENT_TYPE, "application/json; charset=utf-8")
                .body(bytes);
        }
        let response = builder.send().await.map_err(Error::transport)?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(Error::transport)?.to_vec();
        tracing::debug!(
            method = %req.method,
            path = %req.path,
            status,
            log_id = headers.get("x-tt-logid").and_then(|v| v.to_str().ok()),
            "Lark request finished."
        );
        Ok(RawResponse {
            status,
            headers,
            body,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// App-identity tokens: fetched here, cached by `token::TokenCache`.

/// Body of the internal token endpoints (not wrapped in `data`).
#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    tenant_access_token: Option<String>,
    #[serde(default)]
    app_access_token: Option<String>,
    #[serde(default)]
    expire: Option<i64>,
}

impl LarkClient {
    /// The current `tenant_access_token`, fetched or refreshed as needed.
    pub async fn tenant_token(&self) -> Result<SecretString, Error> {
        Ok(self.cached_token(TokenKind::Tenant).await?.token)
    }

    /// What the tenant-token cache knows right now: never fetches, so it is cheap enough for a
    /// readiness probe. The outcome of the last fetch is kept until the next one.
    #[must_use]
    pub fn tenant_token_status(&self) -> TokenStatus {
        self.cache(TokenKind::Tenant).status()
    }

    /// The current `app_access_token`, fetched or refreshed as needed.
    pub async fn app_token(&self) -> Result<SecretString, Error> {
        Ok(self.cached_token(TokenKind::App).await?.token)
    }

    pub(crate) fn cache(&self, kind: TokenKind) -> &TokenCache {
        match kind {
            TokenKind::Tenant => &self.inner.tenant_token,
            TokenKind::App => &self.inner.app_token,
        }
    }

    /// The cached token of `kind`, fetched if needed.
    ///
    /// Returns a boxed `Send` future: fetching goes through `execute`, which
    /// itself awaits `cached_token` for authenticated calls, and naming the
    /// type here breaks that type-level cycle (the fetch is unauthenticated,
    /// so there is no recursion at run time).
    pub(crate) fn cached_token(
        &self,
        kind: TokenKind,
    ) -> Pin<Box<dyn Future<Output = Result<Issued, Error>> + Send + '_>> {
        Box::pin(async move {
            self.cache(kind)
                .get(|| self.fetch_app_identity_token(kind))
                .await
        })
    }

    async fn fetch_app_identity_token(
        &self,
        kind: TokenKind,
    ) -> Result<(SecretString, Duration), Error> {
        let req = ApiRequest::new(Method::POST, kind.path().to_owned(), Auth::None).json(json!({
            "app_id": self.inner.app_id,
            "app_secret": self.inner.app_secret.expose_secret(),
        }));
        self.execute(&req, |raw| {
            let body: TokenResponse = decode_top_level(raw)?;
            let token = match kind {
                TokenKind::Tenant => body.tenant_access_token,
                TokenKind::App => body.app_access_token,
            };
            let bad = |reason: &str| Error::Decode {
                reason: format!("{}: {reason}", kind.name()),
                status: raw.status,
                log_id: raw.header_log_id(),
            };
            let token = token
                .filter(|t| !t.is_empty())
                .ok_or_else(|| bad("missing token"))?;
            let expire = body
                .expire
                .and_then(|e| u64::try_from(e).ok())
                .filter(|e| *e > 0)
                .ok_or_else(|| bad("missing or non-positive `expire`"))?;
            Ok((SecretString::from(token), Duration::from_secs(expire)))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_parses_names_and_urls() {
        let feishu: Domain = "feishu".parse().unwrap();
        assert_eq!(feishu.open_base(), "https://open.feishu.cn");
        assert_eq!(feishu.accounts_base(), "https://accounts.feishu.cn");
        let lark: Domain = "LARK".parse().unwrap();
        assert_eq!(lark.open_base(), "https://open.larksuite.com");
        assert_eq!(lark.accounts_base(), "https://accounts.larksuite.com");
        let custom: Domain = "http://127.0.0.1:8080/".parse().unwrap();
        assert_eq!(custom.open_base(), "http://127.0.0.1:8080");
        assert_eq!(custom.accounts_base(), "http://127.0.0.1:8080");
        let prefixed: Domain = "https://proxy.example/lark".parse().unwrap();
        assert_eq!(prefixed.open_base(), "https://proxy.example/lark");
        for bad in [
            "",
            "open.feishu.cn",
            "ftp://x",
            "https://u:p@x",
            "https://x/?a=1",
        ] {
            assert!(bad.parse::<Domain>().is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let p = RetryPolicy {
            max_attempts: 10,
            base: Duration::from_millis(100),
            cap: Duration::from_millis(1000),
            max_rate_limit_wait: Duration::from_secs(30),
        };
        for _ in 0..200 {
            let d1 = p.delay(1, None).unwrap();
            assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
            let d3 = p.delay(3, None).unwrap();
            assert!(d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400));
            let d20 = p.delay(20, None).unwrap();
            assert!(d20 >= Duration::from_millis(500) && d20 <= Duration::from_millis(1000));
        }
        let hinted = p.delay(1, Some(Duration::from_secs(7))).unwrap();
        assert!(hinted >= Duration::from_secs(7) && hinted <= Duration::from_millis(7100));
        assert_eq!(p.delay(1, Some(Duration::from_secs(31))), None);
    }

    #[test]
    fn rate_limit_headers_are_read() {
        let mut h = HeaderMap::new();
        assert_eq!(rate_limit_hint(&h), None);
        h.insert("x-ogw-ratelimit-reset", HeaderValue::from_static("3"));
        assert_eq!(rate_limit_hint(&h), Some(Duration::from_secs(3)));
        h.insert("retry-after", HeaderValue::from_static("5"));
        assert_eq!(rate_limit_hint(&h), Some(Duration::from_secs(5)));
        let mut d = HeaderMap::new();
        d.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(rate_limit_hint(&d), None);
    }

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(seg("om_abc-1.2~").unwrap(), "om_abc-1.2~");
        assert_eq!(seg("a/b c").unwrap(), "a%2Fb%20c");
        assert_eq!(seg("?#%").unwrap(), "%3F%23%25");
        assert_eq!(seg("...").unwrap(), "...");
        assert_eq!(seg(".%2e").unwrap(), ".%252e");
    }

    #[test]
    fn dot_segment_ids_cannot_change_the_path() {
        for id in ["", ".", ".."] {
            assert!(matches!(seg(id), Err(Error::Config(_))), "{id:?}");
        }
        // Why they are refused, not escaped: an escaped dot segment is still one to the URL
        // parser that reqwest uses.
        let u = Url::parse("https://open.feishu.cn/open-apis/contact/v3/users/%2E%2E").unwrap();
        assert_eq!(u.path(), "/open-apis/contact/v3/");
        // Every id that passes stays one segment under its parent.
        for id in ["...", ".a", "a.", "%2e%2e", ".%2E", "a/../b"] {
            let path = format!("/open-apis/contact/v3/users/{}", seg(id).unwrap());
            let u = Url::parse(&format!("https://open.feishu.cn{path}")).unwrap();
            assert_eq!(u.path(), path, "{id:?}");
        }
    }

    fn raw(status: u16, body: &str) -> RawResponse {
        let mut headers = HeaderMap::new();
        headers.insert("x-tt-logid", HeaderValue::from_static("LOG1"));
        RawResponse {
            status,
            headers,
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn envelope_decoding() {
        #[derive(Deserialize, Debug, PartialEq)]
        struct D {
            x: u32,
        }
        assert_eq!(
            decode_data::<D>(&raw(200, r#"{"code":0,"msg":"ok","data":{"x":3}}"#)).unwrap(),
            D { x: 3 }
        );
        let e = decode_data::<D>(&raw(
            400,
            r#"{"code":230002,"msg":"no","error":{"log_id":"B"}}"#,
        ))
        .unwrap_err();
        assert!(matches!(
            e,
            Error::Api {
                code: 230_002,
                status: 400,
                ..
            }
        ));
        assert_eq!(e.log_id(), Some("LOG1"), "header log id wins");
        let mut no_header = raw(400, r#"{"code":1,"msg":"no","error":{"log_id":"B"}}"#);
        no_header.headers.clear();
        assert_eq!(decode_unit(&no_header).unwrap_err().log_id(), Some("B"));
        assert!(matches!(
            decode_unit(&raw(502, "<html>bad gateway</html>")).unwrap_err(),
            Error::Http { status: 502, .. }
        ));
        assert!(matches!(
            decode_data::<D>(&raw(200, r#"{"code":0,"data":{"y":1}}"#)).unwrap_err(),
            Error::Decode { .. }
        ));
        assert!(matches!(
            decode_unit(&raw(200, "not json")).unwrap_err(),
            Error::Decode { .. }
        ));
    }
}
