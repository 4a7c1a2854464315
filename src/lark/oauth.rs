//! User OAuth against the v2 endpoints (protocol notes §4.2–§4.4, §4.8):
//! building the authorize URL (with optional PKCE S256), reading the
//! redirect, exchanging a code for a [`UserToken`], and refreshing it.
//!
//! This module owns the token endpoint's own response shape (top-level
//! fields, RFC 6749 `error`/`error_description`) and its mapping to
//! [`OAuthErrorKind`]. It does not store tokens or sessions, does not bind
//! `state` to a user, and does not serialise concurrent refreshes of one
//! user (refresh tokens rotate; the caller must hold a per-user lock).

use std::fmt;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::RngCore as _;
use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use url::Url;

use super::client::{ApiRequest, Auth, LarkClient, RawResponse};
use super::error::{Error, OAuthErrorKind};

/// Path of the v2 token endpoint (code exchange and refresh).
pub const TOKEN_PATH: &str = "/open-apis/authen/v2/oauth/token";
/// Path of the v2 authorize page on the accounts host.
pub const AUTHORIZE_PATH: &str = "/open-apis/authen/v1/authorize";
/// The device authorization endpoint on the accounts host (compat notes §1).
pub const DEVICE_AUTHORIZATION_PATH: &str = "/oauth/v1/device_authorization";
/// The other observed device authorization path, on the OpenAPI host (protocol notes §4.7).
pub const DEVICE_AUTHORIZATION_FALLBACK_PATH: &str =
    "/open-apis/authen/v2/oauth/device_authorization";
/// The device code grant type (RFC 8628 §3.4).
pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// Seconds between polls when the platform names no `interval` (RFC 8628 §3.2).
pub const DEVICE_DEFAULT_INTERVAL: u64 = 5;
/// Scope that makes the platform issue a refresh token.
pub const OFFLINE_ACCESS: &str = "offline_access";

/// A PKCE verifier and its S256 challenge.
#[derive(Clone)]
pub struct Pkce {
    /// The `code_verifier` to send with the code exchange (43 chars).
    pub verifier: SecretString,
    /// `BASE64URL(SHA256(verifier))`, sent on the authorize URL.
    pub challenge: String,
}

impl Pkce {
    /// A fresh random verifier (32 random bytes, base64url) and its challenge.
    #[must_use]
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self::from_verifier(SecretString::from(URL_SAFE_NO_PAD.encode(bytes)))
    }

    /// Derives the S256 challenge for an existing verifier (e.g. one restored
    /// from storage).
    #[must_use]
    pub fn from_verifier(verifier: SecretString) -> Self {
        let digest = Sha256::digest(verifier.expose_secret().as_bytes());
        Self {
            challenge: URL_SAFE_NO_PAD.encode(digest),
            verifier,
        }
    }
}

impl fmt::Debug for Pkce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkce")
            .field("verifier", &"[REDACTED]")
            .field("challenge", &self.challenge)
            .finish()
    }
}

/// Parameters of the authorize page URL.
#[derive(Debug, Clone, Copy)]
pub struct AuthorizeParams<'a> {
    /// Registered redirect URL; must be repeated verbatim in the exchange.
    pub redirect_uri: &'a str,
    /// Scopes to request; include [`OFFLINE_ACCESS`] to get a refresh token.
    pub scopes: &'a [&'a str],
    /// Opaque CSRF/session value returned verbatim on the redirect.
    pub state: &'a str,
    /// S256 challenge from [`Pkce::challenge`], if using PKCE.
    pub code_challenge: Option<&'a str>,
    /// Add `prompt=consent` to force the consent screen.
    pub force_consent: bool,
}

/// The `code` and `state` read from a successful authorize redirect.
#[derive(Clone)]
pub struct AuthCode {
    /// Single-use authorization code (valid 5 minutes).
    pub code: SecretString,
    /// The `state` passed on the authorize URL.
    pub state: String,
}

impl fmt::Debug for AuthCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthCode")
            .field("code", &"[REDACTED]")
            .field("state", &self.state)
            .finish()
    }
}

/// A user's tokens as returned by the v2 token endpoint.
///
/// Lifetimes are relative to when the response was received; the caller
/// anchors them to its own clock when storing them.
#[derive(Clone)]
pub struct UserToken {
    /// `access_token` (a JWT for v2).
    pub access_token: SecretString,
    /// `refresh_token`; present only if `offline_access` was granted. After a
    /// refresh that returned none, this is the refresh token that was used.
    pub refresh_token: Option<SecretString>,
    /// `expires_in`.
    pub expires_in: Duration,
    /// `refresh_token_expires_in`, when the platform sent it.
    pub refresh_expires_in: Option<Duration>,
    /// Space-separated granted scopes.
    pub scope: String,
    /// `token_type`, normally `Bearer`.
    pub token_type: String,
}

impl UserToken {
    /// The granted scopes, split on whitespace.
    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        self.scope.split_whitespace()
    }
}

impl fmt::Debug for UserToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserToken")
            .field("access_token", &"[REDACTED]")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "[REDACTED]"),
            )
            .field("expires_in", &self.expires_in)
            .field("refresh_expires_in", &self.refresh_expires_in)
            .field("scope", &self.scope)
            .field("token_type", &self.token_type)
            .finish()
    }
}

/// Reads the authorize redirect's query string (without the leading `?`).
///
/// `error=access_denied` becomes [`OAuthErrorKind::UserRejected`]; a missing
/// `code` or `state` becomes [`OAuthErrorKind::InvalidResponse`]. Checking
/// `state` against the session is the caller's job.
pub fn parse_redirect_query(query: &str) -> Result<AuthCode, Error> {
    let mut code = None;
    let mut state = None;
    let mut error = None;
    let mut description = None;
    for (k, v) in url::form_urlencoded::parse(query.trim_start_matches('?').as_bytes()) {
        match &*k {
            "code" => code = Some(v.into_owned()),
            "state" => state = Some(v.into_owned()),
            "error" => error = Some(v.into_owned()),
            "error_description" => description = Some(v.into_owned()),
            _ => {}
        }
    }
    if let Some(error) = error {
        return Err(Error::OAuth {
            kind: OAuthErrorKind::classify(0, Some(&error), None),
            code: 0,
            description: description.unwrap_or_default(),
            error: Some(error),
            status: None,
            log_id: None,
        });
    }
    let invalid = |what: &str| Error::OAuth {
        kind: OAuthErrorKind::InvalidResponse,
        code: 0,
        error: None,
        description: format!("redirect has no `{what}`"),
        status: None,
        log_id: None,
    };
    let code = code
        .filter(|c| !c.is_empty())
        .ok_or_else(|| invalid("code"))?;
    let state = state.ok_or_else(|| invalid("state"))?;
    Ok(AuthCode {
        code: SecretString::from(code),
        state,
    })
}

/// The v2 token endpoint's body: success fields and error fields, all top level.
#[derive(Deserialize)]
struct TokenEndpointBody {
    #[serde(default)]
    code: Option<i64>,
    #[serde(default)]
    msg: Option<String>,
    /// A string (RFC 6749) on this endpoint; the OpenAPI gateway (e.g. on
    /// rate limiting) sends an object with `log_id` instead.
    #[serde(default)]
    error: Option<Value>,
    #[serde(default)]
    error_description: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    refresh_token_expires_in: Option<u64>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    token_type: Option<String>,
}

/// Decodes a v2 token endpoint response into a token or a typed error.
fn decode_token_response(raw: &RawResponse) -> Result<UserToken, Error> {
    let body: Option<TokenEndpointBody> = serde_json::from_slice(&raw.body).ok();
    let body_log_id = body
        .as_ref()
        .and_then(|b| b.error.as_ref())
        .and_then(|e| e.get("log_id"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let log_id = raw.header_log_id().or(body_log_id);
    let Some(body) = body else {
        return Err(Error::OAuth {
            kind: OAuthErrorKind::classify(0, None, Some(raw.status)),
            code: 0,
            error: None,
            description: "token endpoint body is not JSON".to_owned(),
            status: Some(raw.status),
            log_id,
        });
    };
    let code = body.code.unwrap_or(0);
    let error = body
        .error
        .as_ref()
        .and_then(Value::as_str)
        .map(str::to_owned);
    if code != 0 || error.is_some() || !raw.is_success() {
        return Err(Error::OAuth {
            kind: OAuthErrorKind::classify(code, error.as_deref(), Some(raw.status)),
            code,
            error,
            description: body.error_description.or(body.msg).unwrap_or_default(),
            status: Some(raw.status),
            log_id,
        });
    }
    let (Some(access_token), Some(expires_in)) =
        (body.access_token.filter(|t| !t.is_empty()), body.expires_in)
    else {
        return Err(Error::OAuth {
            kind: OAuthErrorKind::InvalidResponse,
            code,
            error: None,
            description: "token response lacks `access_token` or `expires_in`".to_owned(),
            status: Some(raw.status),
            log_id,
        });
    };
    Ok(UserToken {
        access_token: SecretString::from(access_token),
        refresh_token: body
            .refresh_token
            .filter(|t| !t.is_empty())
            .map(SecretString::from),
        expires_in: Duration::from_secs(expires_in),
        refresh_expires_in: body.refresh_token_expires_in.map(Duration::from_secs),
        scope: body.scope.unwrap_or_default(),
        token_type: body.token_type.unwrap_or_else(|| "Bearer".to_owned()),
    })
}

/// A device authorization: what the user opens and what the service polls with.
#[derive(Clone)]
pub struct DeviceGrant {
    /// The code the service polls with (secret: whoever holds it gets the token).
    pub device_code: SecretString,
    /// The code the user sees.
    pub user_code: String,
    /// The verification page.
    pub verification_uri: String,
    /// The verification page with the user code in it: what the card's button opens.
    pub verification_uri_complete: String,
    /// How long the codes live.
    pub expires_in: Duration,
    /// The least time between polls.
    pub interval: Duration,
}

impl fmt::Debug for DeviceGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceGrant")
            .field("device_code", &"[REDACTED]")
            .field("user_code", &self.user_code)
            .field("verification_uri", &self.verification_uri)
            .field("expires_in", &self.expires_in)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

/// One answer of the token endpoint to a device code poll.
#[derive(Debug)]
pub enum DevicePoll {
    /// `authorization_pending`: the user has not answered yet.
    Pending,
    /// `slow_down`: poll less often (5 s more, RFC 8628 §3.5).
    SlowDown,
    /// `access_denied`: the user declined.
    Denied,
    /// `expired_token`: the device code expired.
    Expired,
    /// The user approved: the tokens.
    Granted(UserToken),
}

async fn send_raw(req: reqwest::RequestBuilder) -> Result<RawResponse, Error> {
    let response = req.send().await.map_err(Error::transport)?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.bytes().await.map_err(Error::transport)?.to_vec();
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

fn invalid_response(raw: &RawResponse, description: &str) -> Error {
    Error::OAuth {
        kind: OAuthErrorKind::InvalidResponse,
        code: 0,
        error: None,
        description: description.to_owned(),
        status: Some(raw.status),
        log_id: raw.header_log_id(),
    }
}

/// Decodes the device authorization answer: RFC 8628 fields at the top level or under `data`.
fn decode_device_grant(raw: &RawResponse) -> Result<DeviceGrant, Error> {
    let Ok(body) = serde_json::from_slice::<Value>(&raw.body) else {
        return Err(Error::Http {
            status: raw.status,
            log_id: raw.header_log_id(),
        });
    };
    let code = body.get("code").and_then(Value::as_i64).unwrap_or(0);
    let error = body.get("error").and_then(Value::as_str).map(str::to_owned);
    if code != 0 || error.is_some() || !raw.is_success() {
        return Err(Error::OAuth {
            kind: OAuthErrorKind::classify(code, error.as_deref(), Some(raw.status)),
            code,
            error,
            description: body
                .get("error_description")
                .or_else(|| body.get("msg"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            status: Some(raw.status),
            log_id: raw.header_log_id(),
        });
    }
    let d = body.get("data").filter(|d| d.is_object()).unwrap_or(&body);
    let text = |k: &str| {
        d.get(k)
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    let (Some(device_code), Some(user_code), Some(verification_uri)) = (
        text("device_code"),
        text("user_code"),
        text("verification_uri"),
    ) else {
        return Err(invalid_response(
            raw,
            "device authorization lacks device_code, user_code or verification_uri",
        ));
    };
    let complete = text("verification_uri_complete").unwrap_or_else(|| {
        let sep = if verification_uri.contains('?') {
            '&'
        } else {
            '?'
        };
        format!(
            "{verification_uri}{sep}user_code={}",
            url::form_urlencoded::byte_serialize(user_code.as_bytes()).collect::<String>()
        )
    });
    let Some(expires_in) = d
        .get("expires_in")
        .and_then(Value::as_u64)
        .filter(|e| *e > 0)
    else {
        return Err(invalid_response(
            raw,
            "device authorization lacks expires_in",
        ));
    };
    let interval = d
        .get("interval")
        .and_then(Value::as_u64)
        .filter(|i| *i > 0)
        .unwrap_or(DEVICE_DEFAULT_INTERVAL);
    Ok(DeviceGrant {
        device_code: SecretString::from(device_code),
        user_code,
        verification_uri,
        verification_uri_complete: complete,
        expires_in: Duration::from_secs(expires_in),
        interval: Duration::from_secs(interval),
    })
}

/// Decodes a device code poll: the RFC 8628 §3.5 errors, else a token (or the endpoint's error).
fn decode_device_poll(raw: &RawResponse) -> Result<DevicePoll, Error> {
    let error = serde_json::from_slice::<Value>(&raw.body)
        .ok()
        .and_then(|b| b.get("error").and_then(Value::as_str).map(str::to_owned));
    match error.as_deref() {
        Some("authorization_pending") => Ok(DevicePoll::Pending),
        Some("slow_down") => Ok(DevicePoll::SlowDown),
        Some("access_denied") => Ok(DevicePoll::Denied),
        Some("expired_token") => Ok(DevicePoll::Expired),
        _ => decode_token_response(raw).map(DevicePoll::Granted),
    }
}

impl LarkClient {
    /// The authorize page URL on the accounts host (protocol notes §4.2):
    /// `client_id`, `response_type=code`, `redirect_uri`, `scope`
    /// (space-separated), `state`, and with PKCE `code_challenge` +
    /// `code_challenge_method=S256`.
    pub fn authorize_url(&self, params: &AuthorizeParams<'_>) -> Result<Url, Error> {
        let base = format!("{}{AUTHORIZE_PATH}", self.inner.domain.accounts_base());
        let mut url =
            Url::parse(&base).map_err(|e| Error::Config(format!("bad accounts base URL: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("client_id", &self.inner.app_id)
                .append_pair("response_type", "code")
                .append_pair("redirect_uri", params.redirect_uri);
            if !params.scopes.is_empty() {
                q.append_pair("scope", &params.scopes.join(" "));
            }
            q.append_pair("state", params.state);
            if let Some(challenge) = params.code_challenge {
                q.append_pair("code_challenge", challenge)
                    .append_pair("code_challenge_method", "S256");
            }
            if params.force_consent {
                q.append_pair("prompt", "consent");
            }
        }
        // form_urlencoded writes spaces as `+`; the platform's examples use
        // `%20`, which every decoder accepts, so use that.
        let query = url.query().map(|q| q.replace('+', "%20"));
        url.set_query(query.as_deref());
        Ok(url)
    }

    /// Exchanges an authorization code for a user token (v2,
    /// `grant_type=authorization_code`). Pass the PKCE verifier if the
    /// authorize URL carried a challenge, and the exact `redirect_uri` used there.
    ///
    /// The code is single use: the request is never re-sent after it may have reached the
    /// platform (see `ApiRequest::one_time`).
    pub async fn exchange_code(
        &self,
        code: &SecretString,
        redirect_uri: &str,
        code_verifier: Option<&SecretString>,
    ) -> Result<UserToken, Error> {
        let mut body = self.client_credentials("authorization_code");
        body.insert("code".into(), json!(code.expose_secret()));
        body.insert("redirect_uri".into(), json!(redirect_uri));
        if let Some(verifier) = code_verifier {
            body.insert("code_verifier".into(), json!(verifier.expose_secret()));
        }
        let req = ApiRequest::new(Method::POST, TOKEN_PATH.to_owned(), Auth::None)
            .json(Value::Object(body))
            .one_time();
        self.execute(&req, decode_token_response).await
    }

    /// Refreshes a user token (v2, `grant_type=refresh_token`). Refresh
    /// tokens rotate: persist the returned `refresh_token`. If the platform
    /// returns none, the old one is carried over (protocol notes §4.4).
    ///
    /// The refresh token is single use: the request is never re-sent after it may have reached
    /// the platform. When [`Error::outcome_unknown`] holds for the error, the platform may have
    /// rotated the token and the new pair is lost; the caller must find out before presenting
    /// the same refresh token again (see `auth::flow`).
    pub async fn refresh_user_token(
        &self,
        refresh_token: &SecretString,
    ) -> Result<UserToken, Error> {
        let mut body = self.client_credentials("refresh_token");
        body.insert("refresh_token".into(), json!(refresh_token.expose_secret()));
        let req = ApiRequest::new(Method::POST, TOKEN_PATH.to_owned(), Auth::None)
            .json(Value::Object(body))
            .one_time();
        let mut token = self.execute(&req, decode_token_response).await?;
        if token.refresh_token.is_none() {
            token.refresh_token = Some(refresh_token.clone());
        }
        Ok(token)
    }

    /// Starts a device authorization (RFC 8628, compat notes §1): `POST
    /// {accounts}/oauth/v1/device_authorization` with a form body and the app's credentials as
    /// HTTP Basic; when that path answers 404, the other observed one,
    /// `{open}/open-apis/authen/v2/oauth/device_authorization` (JSON body). Not retried: a new
    /// call only makes a new code.
    pub async fn device_authorization(&self, scopes: &[&str]) -> Result<DeviceGrant, Error> {
        let scope = scopes.join(" ");
        let primary = format!(
            "{}{DEVICE_AUTHORIZATION_PATH}",
            self.inner.domain.accounts_base()
        );
        let req = self
            .inner
            .http
            .post(primary)
            .timeout(self.inner.request_timeout)
            .basic_auth(
                &self.inner.app_id,
                Some(self.inner.app_secret.expose_secret()),
            )
            .form(&[("client_id", self.inner.app_id.as_str()), ("scope", &scope)]);
        let raw = send_raw(req).await?;
        if raw.status != 404 {
            return decode_device_grant(&raw);
        }
        tracing::info!("The device authorization endpoint answered 404; trying the OpenAPI path.");
        let fallback = format!(
            "{}{DEVICE_AUTHORIZATION_FALLBACK_PATH}",
            self.inner.open_base
        );
        let req = self
            .inner
            .http
            .post(fallback)
            .timeout(self.inner.request_timeout)
            .json(&json!({
                "client_id": self.inner.app_id,
                "client_secret": self.inner.app_secret.expose_secret(),
                "scope": scope,
            }));
        decode_device_grant(&send_raw(req).await?)
    }

    /// Polls the v2 token endpoint once for a device code
    /// (`grant_type=urn:ietf:params:oauth:grant-type:device_code`). The grant is single use:
    /// the request is never re-sent blindly.
    pub async fn poll_device_token(&self, device_code: &SecretString) -> Result<DevicePoll, Error> {
        let mut body = self.client_credentials(DEVICE_CODE_GRANT);
        body.insert("device_code".into(), json!(device_code.expose_secret()));
        let req = ApiRequest::new(Method::POST, TOKEN_PATH.to_owned(), Auth::None)
            .json(Value::Object(body))
            .one_time();
        self.execute(&req, decode_device_poll).await
    }

    fn client_credentials(&self, grant_type: &str) -> Map<String, Value> {
        let mut body = Map::new();
        body.insert("grant_type".into(), json!(grant_type));
        body.insert("client_id".into(), json!(self.inner.app_id));
        body.insert(
            "client_secret".into(),
            json!(self.inner.app_secret.expose_secret()),
        );
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_matches_rfc7636_example() {
        // RFC 7636 appendix B.
        let p = Pkce::from_verifier(SecretString::from(
            "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk",
        ));
        assert_eq!(p.challenge, "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
        let fresh = Pkce::generate();
        let v = fresh.verifier.expose_secret();
        assert_eq!(v.len(), 43);
        assert!(v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_ne!(Pkce::generate().verifier.expose_secret(), v);
    }

    fn raw(status: u16, body: &Value) -> RawResponse {
        RawResponse {
            status,
            headers: reqwest::header::HeaderMap::new(),
            body: serde_json::to_vec(body).unwrap(),
        }
    }

    #[test]
    fn device_poll_answers_are_read() {
        for (e, want) in [
            ("authorization_pending", "Pending"),
            ("slow_down", "SlowDown"),
            ("access_denied", "Denied"),
            ("expired_token", "Expired"),
        ] {
            let got = decode_device_poll(&raw(400, &json!({"error": e}))).unwrap();
            assert_eq!(format!("{got:?}"), want);
        }
        let got = decode_device_poll(&raw(
            200,
            &json!({"code": 0, "access_token": "t", "expires_in": 60}),
        ))
        .unwrap();
        assert!(matches!(got, DevicePoll::Granted(t) if t.refresh_token.is_none()));
        assert!(
            decode_device_poll(&raw(400, &json!({"error": "invalid_grant", "code": 20003})))
                .is_err()
        );
    }

    #[test]
    fn device_grants_are_read_with_defaults() {
        let g = decode_device_grant(&raw(
            200,
            &json!({"device_code": "d", "user_code": "AB-CD", "verification_uri": "https://x/v", "expires_in": 600}),
        ))
        .unwrap();
        assert_eq!(g.verification_uri_complete, "https://x/v?user_code=AB-CD");
        assert_eq!(g.interval, Duration::from_secs(DEVICE_DEFAULT_INTERVAL));
        assert!(!format!("{g:?}").contains("\"d\""));
        let g = decode_device_grant(&raw(
            200,
            &json!({"code": 0, "data": {"device_code": "d", "user_code": "u", "verification_uri": "https://x/v",
                    "verification_uri_complete": "https://x/v?c=u", "expires_in": 60, "interval": 2}}),
        ))
        .unwrap();
        assert_eq!(g.verification_uri_complete, "https://x/v?c=u");
        assert_eq!(g.interval, Duration::from_secs(2));
        assert!(decode_device_grant(&raw(200, &json!({"device_code": "d"}))).is_err());
        assert!(decode_device_grant(&raw(400, &json!({"error": "invalid_client"}))).is_err());
    }

    #[test]
    fn redirect_query_parsing() {
        let ok = parse_redirect_query("code=abc-123&state=s%201").unwrap();
        assert_eq!(ok.code.expose_secret(), "abc-123");
        assert_eq!(ok.state, "s 1");
        let rejected = parse_redirect_query("?error=access_denied&state=s1").unwrap_err();
        assert_eq!(rejected.oauth_kind(), Some(OAuthErrorKind::UserRejected));
        let missing = parse_redirect_query("state=s1").unwrap_err();
        assert_eq!(missing.oauth_kind(), Some(OAuthErrorKind::InvalidResponse));
    }
}
