//! Reconnect policy of the long connection (protocol doc §2.2, §2.3, §2.10).
//!
//! Owns: the backoff schedule (every retry jittered, exponential growth capped by the
//! server's `ReconnectInterval` and our own cap, a degraded report once the retry limit from
//! the server's `ReconnectCount` and `WEBSOCKET_MAX_RECONNECT_RETRIES` is reached — retrying
//! never stops — and a reset after a stable connection),
//! the endpoint-discovery request body and response parsing, and the Retry/Fatal
//! classification of discovery results and handshake rejections.
//!
//! Must not: sleep, read clocks, draw randomness itself or do any I/O. Time arrives as
//! `now: Instant`, randomness as an injected `FnMut() -> f64` returning values in `[0, 1)`,
//! so every decision is deterministic under test.

use std::time::{Duration, Instant};

use super::protocol::{ClientConfig, ClientConfigPatch};
use crate::backoff::Backoff;

/// Discovery `code`: success.
pub const CODE_OK: i64 = 0;
/// Discovery `code`: "system busy" — retry.
pub const CODE_SYSTEM_BUSY: i64 = 1;
/// Discovery / handshake code: forbidden (app banned or not allowed) — fatal.
pub const CODE_FORBIDDEN: i64 = 403;
/// Handshake status: authentication failed — fatal only with [`CODE_EXCEED_CONN_LIMIT`].
pub const CODE_AUTH_FAILED: i64 = 514;
/// Discovery `code`: platform internal error — retry.
pub const CODE_INTERNAL_ERROR: i64 = 1_000_040_343;
/// Discovery `code`: no credential (the Python SDK raises it locally).
pub const CODE_NO_CREDENTIAL: i64 = 1_000_040_344;
/// Handshake auth sub-code: more than 50 connections for this app — fatal.
pub const CODE_EXCEED_CONN_LIMIT: i64 = 1_000_040_350;

/// Response header of a refused WebSocket upgrade: integer status code.
pub const HEADER_HANDSHAKE_STATUS: &str = "Handshake-Status";
/// Response header of a refused WebSocket upgrade: reason text.
pub const HEADER_HANDSHAKE_MSG: &str = "Handshake-Msg";
/// Response header of a refused WebSocket upgrade: auth sub-code (meaningful with 514).
pub const HEADER_HANDSHAKE_AUTH_ERRCODE: &str = "Handshake-Autherrcode";

/// Whether a failure is worth another attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// Transient: wait per the backoff and try discovery + dial again.
    Retry,
    /// The platform refuses our credentials (bad credentials, banned app, connection
    /// limit): fast retries cannot help; pause dialing and report.
    Fatal,
}

// ---------------------------------------------------------------------------------------------
// Backoff
// ---------------------------------------------------------------------------------------------

/// Our own reconnect settings, combined with the server's [`ClientConfig`] at each decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Delay of the second retry of an outage; doubles for each later retry.
    pub initial_backoff: Duration,
    /// Our ceiling on the backoff; the effective ceiling is the smaller of this and the
    /// server's `ReconnectInterval`.
    pub max_backoff: Duration,
    /// Our retry limit per outage (`WEBSOCKET_MAX_RECONNECT_RETRIES`); `None` = unlimited.
    /// The effective limit is the smaller of this and the server's `ReconnectCount`. Past it
    /// the connection is reported degraded, and retries go on at the capped backoff.
    pub max_retries: Option<u32>,
    /// A connection that stayed up at least this long resets the backoff growth when it
    /// drops; a shorter one (flapping) keeps growing it.
    pub stable_after: Duration,
}

impl Default for ReconnectPolicy {
    /// 1 s initial, 60 s cap, unlimited retries, stable after 60 s.
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            max_retries: None,
            stable_after: Duration::from_secs(60),
        }
    }
}

/// Maps the `WEBSOCKET_MAX_RECONNECT_RETRIES` setting to [`ReconnectPolicy::max_retries`]:
/// negative means unlimited.
pub fn max_retries_from_setting(value: i64) -> Option<u32> {
    if value < 0 {
        None
    } else {
        Some(u32::try_from(value).unwrap_or(u32::MAX))
    }
}

/// The retry limit in force: the smaller of the server's `ReconnectCount` (`None` =
/// unlimited) and ours (`None` = unlimited).
pub fn effective_max_retries(server: Option<u32>, ours: Option<u32>) -> Option<u32> {
    match (server, ours) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What to do before the next connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Wait this long, then run discovery and dial.
    Wait(Duration),
    /// The retry limit is reached: report the connection degraded, and still wait this long
    /// and try again (an outage never stops the connection for good).
    Degraded {
        /// The wait before the next attempt.
        wait: Duration,
        /// Retries in this outage, counting this one (more than the limit).
        retries: u32,
    },
}

impl Decision {
    /// The wait before the next attempt.
    #[must_use]
    pub fn wait(&self) -> Duration {
        match *self {
            Self::Wait(w) | Self::Degraded { wait: w, .. } => w,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing tried yet: the first attempt is immediate.
    Initial,
    /// Connected since this instant.
    Connected(Instant),
    /// Not connected; `retries` attempts made since the outage began.
    Down { retries: u32 },
}

/// Reconnect state machine. Call [`Reconnect::next_attempt`] before every connection
/// attempt, [`Reconnect::on_connected`] after a successful handshake and
/// [`Reconnect::on_disconnected`] when an established connection ends. A failed attempt
/// needs no call: the next `next_attempt` counts it. Fatal failures bypass this type.
///
/// Schedule within one outage: retry 1 waits `uniform(0, ReconnectNonce)` (plus the
/// carried-over backoff, jittered, if the previous connection was not stable); retry *n* > 1
/// waits `b/2 + uniform(0, b/2)` with `b = min(initial_backoff · 2^(step−1),
/// min(ReconnectInterval, max_backoff))`, where `step` grows with every retry and resets
/// only after a stable connection. Every wait is jittered and none exceeds the cap (plus the
/// nonce for retry 1). Past the retry limit the decision is [`Decision::Degraded`], with the
/// same schedule.
#[derive(Debug, Clone)]
pub struct Reconnect {
    policy: ReconnectPolicy,
    state: State,
    /// Backoff growth exponent; reset by a stable connection.
    step: u32,
}

impl Reconnect {
    /// A fresh state machine: the first attempt is immediate.
    pub fn new(policy: ReconnectPolicy) -> Self {
        Self {
            policy,
            state: State::Initial,
            step: 0,
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> &ReconnectPolicy {
        &self.policy
    }

    /// Retries made in the current outage (0 while connected or before the first attempt).
    pub fn retries(&self) -> u32 {
        match self.state {
            State::Down { retries } => retries,
            _ => 0,
        }
    }

    /// Decides the wait before the next attempt, using the latest server config (from
    /// discovery or a pong). `random` must return values in `[0, 1)`; values outside are
    /// clamped.
    pub fn next_attempt(
        &mut self,
        server: &ClientConfig,
        random: &mut impl FnMut() -> f64,
    ) -> Decision {
        let retries = match self.state {
            State::Initial => {
                self.state = State::Down { retries: 0 };
                return Decision::Wait(Duration::ZERO);
            }
            // Attempting while "connected" means the caller skipped on_disconnected.
            State::Connected(_) => 0,
            State::Down { retries } => retries,
        };
        let degraded = effective_max_retries(server.reconnect_count, self.policy.max_retries)
            .is_some_and(|limit| retries >= limit);
        let retries = retries.saturating_add(1);
        self.state = State::Down { retries };

        let jitter = if retries == 1 {
            server.reconnect_nonce.mul_f64(unit(random()))
        } else {
            Duration::ZERO
        };
        // The service's one backoff schedule, capped by the server's reconnect interval, with
        // equal jitter (half the backoff, plus a random share of the other half).
        let schedule = Backoff::new(
            self.policy.initial_backoff,
            self.policy.max_backoff.min(server.reconnect_interval),
        );
        let backoff = schedule.jittered(self.step, unit(random()));
        self.step = self.step.saturating_add(1);
        let wait = jitter.saturating_add(backoff);
        if degraded {
            Decision::Degraded { wait, retries }
        } else {
            Decision::Wait(wait)
        }
    }

    /// Records a successful handshake at `now`.
    pub fn on_connected(&mut self, now: Instant) {
        self.state = State::Connected(now);
    }

    /// Records that an established connection ended at `now`. If it had been up for at
    /// least `stable_after`, the backoff growth resets.
    pub fn on_disconnected(&mut self, now: Instant) {
        if let State::Connected(since) = self.state {
            if now.saturating_duration_since(since) >= self.policy.stable_after {
                self.step = 0;
            }
        }
        self.state = State::Down { retries: 0 };
    }
}

/// A random draw made safe for `Duration::mul_f64`: NaN becomes 0, the rest is clamped to
/// `[0, 1]`.
fn unit(x: f64) -> f64 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(0.0, 1.0)
    }
}

// ---------------------------------------------------------------------------------------------
// Endpoint discovery
// ---------------------------------------------------------------------------------------------

/// Path of the discovery endpoint, appended to the OpenAPI base URL.
pub const DISCOVERY_PATH: &str = "/callback/ws/endpoint";

/// JSON body of the discovery POST (PascalCase keys, §2.2). Serialize it with serde.
#[derive(Clone, serde::Serialize)]
pub struct DiscoveryRequest<'a> {
    /// `AppID`.
    #[serde(rename = "AppID")]
    pub app_id: &'a str,
    /// `AppSecret`.
    #[serde(rename = "AppSecret")]
    pub app_secret: &'a str,
}

impl std::fmt::Debug for DiscoveryRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscoveryRequest")
            .field("app_id", &self.app_id)
            .field("app_secret", &"***")
            .finish()
    }
}

/// A successful discovery: where to dial and the server's settings.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The WebSocket URL to dial verbatim (contains credentials: never log it whole).
    pub url: String,
    /// `data.ClientConfig`, to apply over the current [`ClientConfig`].
    pub config: ClientConfigPatch,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The query carries access_key and ticket; print only scheme, host and path.
        let shown = self.url.split('?').next().unwrap_or_default();
        f.debug_struct("Endpoint")
            .field("url", &shown)
            .field("config", &self.config)
            .finish()
    }
}

/// A failed discovery, classified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("endpoint discovery failed ({class:?}): {reason}")]
pub struct DiscoveryError {
    /// Retry or stop.
    pub class: FailureClass,
    /// HTTP status when it was not 200, else the body's `code`, if any.
    pub code: Option<i64>,
    /// Human-readable reason (the body's `msg` when there is one).
    pub reason: String,
}

/// Classifies a discovery body `code` (§2.2): `None` for 0 (success); `1` and
/// `1000040343` retry; every other code is fatal.
pub fn classify_discovery_code(code: i64) -> Option<FailureClass> {
    match code {
        CODE_OK => None,
        CODE_SYSTEM_BUSY | CODE_INTERNAL_ERROR => Some(FailureClass::Retry),
        _ => Some(FailureClass::Fatal),
    }
}

/// Parses the discovery response. Non-200 status, a body that is not the expected JSON,
/// and `code=0` without `data.URL` are retryable (server trouble); a non-zero `code` is
/// classified by [`classify_discovery_code`]. Transport errors never reach this function:
/// the caller treats them as [`FailureClass::Retry`].
pub fn parse_discovery_response(http_status: u16, body: &[u8]) -> Result<Endpoint, DiscoveryError> {
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let msg = json
        .as_ref()
        .and_then(|v| v.get("msg"))
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned);
    let retry = |code: Option<i64>, reason: String| DiscoveryError {
        class: FailureClass::Retry,
        code,
        reason,
    };
    if http_status != 200 {
        return Err(retry(
            Some(i64::from(http_status)),
            msg.unwrap_or_else(|| format!("HTTP status {http_status}")),
        ));
    }
    let Some(json) = json else {
        return Err(retry(None, "response body is not JSON".to_owned()));
    };
    let Some(code) = json.get("code").and_then(serde_json::Value::as_i64) else {
        return Err(retry(None, "response has no integer code".to_owned()));
    };
    if let Some(class) = classify_discovery_code(code) {
        return Err(DiscoveryError {
            class,
            code: Some(code),
            reason: msg.unwrap_or_else(|| "no msg".to_owned()),
        });
    }
    let data = json.get("data");
    let url = data
        .and_then(|d| d.get("URL"))
        .and_then(serde_json::Value::as_str)
        .filter(|u| !u.is_empty());
    let Some(url) = url else {
        return Err(retry(Some(code), "response has no data.URL".to_owned()));
    };
    let config = data
        .and_then(|d| d.get("ClientConfig"))
        .and_then(|c| ClientConfigPatch::from_json_value(c).ok())
        .unwrap_or_default();
    Ok(Endpoint {
        url: url.to_owned(),
        config,
    })
}

// ---------------------------------------------------------------------------------------------
// Handshake rejection
// ---------------------------------------------------------------------------------------------

/// A refused WebSocket upgrade, classified (§2.3).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "websocket handshake refused ({class:?}): status {status}, auth code {auth_code:?}: {message}"
)]
pub struct HandshakeRejection {
    /// Retry or stop.
    pub class: FailureClass,
    /// `Handshake-Status` if present and numeric, else the HTTP status.
    pub status: i64,
    /// `Handshake-Autherrcode`, if present and numeric.
    pub auth_code: Option<i64>,
    /// `Handshake-Msg`, or empty.
    pub message: String,
}

/// Classifies a refused upgrade from its HTTP status and response headers. `header` looks a
/// header up by name; pass a case-insensitive lookup (e.g. `http::HeaderMap::get`).
///
/// `514` with auth code `1000040350` → fatal; other `514` → retry; `403` → fatal; anything
/// else → retry. Without a numeric `Handshake-Status` the HTTP status is used instead (the
/// newest Go SDK's rule), so a bare HTTP 403 is fatal.
pub fn classify_handshake<'a>(
    http_status: u16,
    header: impl Fn(&str) -> Option<&'a str>,
) -> HandshakeRejection {
    let int = |name: &str| header(name).and_then(|v| v.trim().parse::<i64>().ok());
    let status = int(HEADER_HANDSHAKE_STATUS).unwrap_or(i64::from(http_status));
    let auth_code = int(HEADER_HANDSHAKE_AUTH_ERRCODE);
    let class = match (status, auth_code) {
        (CODE_AUTH_FAILED, Some(CODE_EXCEED_CONN_LIMIT)) | (CODE_FORBIDDEN, _) => {
            FailureClass::Fatal
        }
        _ => FailureClass::Retry,
    };
    HandshakeRejection {
        class,
        status,
        auth_code,
        message: header(HEADER_HANDSHAKE_MSG).unwrap_or_default().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn server(count: Option<u32>, interval: u64, nonce: u64) -> ClientConfig {
        ClientConfig {
            reconnect_count: count,
            reconnect_interval: secs(interval),
            reconnect_nonce: secs(nonce),
            ping_interval: secs(120),
        }
    }

    fn half() -> impl FnMut() -> f64 {
        || 0.5
    }

    fn waits(r: &mut Reconnect, cfg: &ClientConfig, n: usize) -> Vec<Decision> {
        let mut rnd = half();
        (0..n).map(|_| r.next_attempt(cfg, &mut rnd)).collect()
    }

    #[test]
    fn first_attempt_is_immediate_then_jitter_then_exponential_with_cap() {
        let cfg = server(None, 10, 30);
        let mut r = Reconnect::new(ReconnectPolicy::default());
        let got = waits(&mut r, &cfg, 7);
        // Retry 1: half the nonce (random 0.5); then ¾ of 1, 2, 4, 8 s and of the 10 s cap.
        let want: Vec<Decision> = [0, 15_000, 750, 1500, 3000, 6000, 7500]
            .into_iter()
            .map(|ms| Decision::Wait(Duration::from_millis(ms)))
            .collect();
        assert_eq!(got, want);
        assert_eq!(r.retries(), 6);
    }

    #[test]
    fn jitter_uses_injected_randomness_and_clamps_it() {
        let cfg = server(None, 120, 30);
        for (x, want) in [
            (0.0, 0),
            (0.1, 3),
            (0.999_999, 29),
            (7.0, 30),
            (-1.0, 0),
            (f64::NAN, 0),
            (f64::INFINITY, 30),
        ] {
            let mut r = Reconnect::new(ReconnectPolicy::default());
            r.on_disconnected(Instant::now());
            let d = r.next_attempt(&cfg, &mut || x);
            match d {
                Decision::Wait(w) => assert_eq!(w.as_secs(), want, "random {x}"),
                Decision::Degraded { .. } => panic!("no limit"),
            }
        }
    }

    #[test]
    fn our_cap_is_lower_than_the_servers_interval() {
        let cfg = server(None, 120, 0);
        let policy = ReconnectPolicy {
            max_backoff: secs(5),
            ..ReconnectPolicy::default()
        };
        let mut r = Reconnect::new(policy);
        let got = waits(&mut r, &cfg, 7);
        let want: Vec<Decision> = [0, 0, 750, 1500, 3000, 3750, 3750]
            .into_iter()
            .map(|ms| Decision::Wait(Duration::from_millis(ms)))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn every_retry_after_the_first_is_jittered_within_half_and_the_whole_backoff() {
        let cfg = server(None, 120, 0);
        let policy = ReconnectPolicy {
            max_backoff: secs(8),
            ..ReconnectPolicy::default()
        };
        for (x, want) in [
            (0.0, [500, 1000, 2000, 4000, 4000]),
            (1.0, [1000, 2000, 4000, 8000, 8000]),
        ] {
            let mut r = Reconnect::new(policy);
            let got: Vec<Duration> = (0..7)
                .map(|_| r.next_attempt(&cfg, &mut || x).wait())
                .collect();
            let want: Vec<Duration> = [0, 0]
                .into_iter()
                .chain(want)
                .map(Duration::from_millis)
                .collect();
            assert_eq!(got, want, "random {x}");
        }
    }

    #[test]
    fn server_count_limits_retries_per_outage() {
        let cfg = server(Some(2), 1, 0);
        let mut r = Reconnect::new(ReconnectPolicy::default());
        let got = waits(&mut r, &cfg, 4);
        assert!(matches!(got[0], Decision::Wait(_)), "initial attempt");
        assert!(matches!(got[1], Decision::Wait(_)));
        assert!(matches!(got[2], Decision::Wait(_)));
        // Past the limit: degraded, but the schedule goes on (capped at 1 s here).
        assert_eq!(
            got[3],
            Decision::Degraded {
                wait: Duration::from_millis(750),
                retries: 3
            }
        );
        for _ in 0..100 {
            let d = r.next_attempt(&cfg, &mut half());
            assert!(matches!(d, Decision::Degraded { .. }), "{d:?}");
            assert!(d.wait() <= secs(1), "{d:?}");
        }
        // A successful connection starts a new outage budget.
        let t = Instant::now();
        r.on_connected(t);
        r.on_disconnected(t);
        assert!(matches!(
            r.next_attempt(&cfg, &mut half()),
            Decision::Wait(_)
        ));
    }

    #[test]
    fn zero_count_means_no_retries() {
        let cfg = server(Some(0), 1, 0);
        let mut r = Reconnect::new(ReconnectPolicy::default());
        r.on_connected(Instant::now());
        r.on_disconnected(Instant::now());
        assert_eq!(
            r.next_attempt(&cfg, &mut half()),
            Decision::Degraded {
                wait: Duration::ZERO,
                retries: 1
            }
        );
    }

    #[test]
    fn our_setting_caps_an_unlimited_server_and_vice_versa() {
        assert_eq!(effective_max_retries(None, None), None);
        assert_eq!(effective_max_retries(None, Some(5)), Some(5));
        assert_eq!(effective_max_retries(Some(3), None), Some(3));
        assert_eq!(effective_max_retries(Some(3), Some(5)), Some(3));
        assert_eq!(effective_max_retries(Some(9), Some(5)), Some(5));
        assert_eq!(max_retries_from_setting(-1), None);
        assert_eq!(max_retries_from_setting(0), Some(0));
        assert_eq!(max_retries_from_setting(7), Some(7));
        assert_eq!(max_retries_from_setting(i64::MAX), Some(u32::MAX));

        let cfg = server(None, 1, 0);
        let policy = ReconnectPolicy {
            max_retries: Some(1),
            ..ReconnectPolicy::default()
        };
        let mut r = Reconnect::new(policy);
        let got = waits(&mut r, &cfg, 3);
        assert!(
            matches!(got[2], Decision::Degraded { retries: 2, .. }),
            "{got:?}"
        );
    }

    #[test]
    fn stable_connection_resets_backoff_but_flapping_does_not() {
        let cfg = server(None, 60, 0);
        let policy = ReconnectPolicy::default();
        let t0 = Instant::now();
        let mut r = Reconnect::new(policy);
        waits(&mut r, &cfg, 5); // 0, 0, 1, 2, 4 → step = 4

        // Flapping: up for 5 s only. The first retry carries the grown backoff.
        r.on_connected(t0);
        r.on_disconnected(t0 + secs(5));
        assert_eq!(r.next_attempt(&cfg, &mut half()), Decision::Wait(secs(6)));

        // Stable: up for 60 s. Growth resets.
        r.on_connected(t0 + secs(10));
        r.on_disconnected(t0 + secs(70));
        let got = waits(&mut r, &cfg, 3);
        assert_eq!(
            got,
            vec![
                Decision::Wait(secs(0)),
                Decision::Wait(Duration::from_millis(750)),
                Decision::Wait(Duration::from_millis(1500))
            ]
        );
    }

    #[test]
    fn huge_steps_do_not_overflow() {
        let cfg = server(None, 1_000_000_000, 0);
        let policy = ReconnectPolicy {
            max_backoff: Duration::MAX,
            ..ReconnectPolicy::default()
        };
        let mut r = Reconnect::new(policy);
        let mut rnd = half();
        let mut last = Duration::ZERO;
        for _ in 0..200 {
            match r.next_attempt(&cfg, &mut rnd) {
                Decision::Wait(w) => {
                    assert!(w >= last);
                    last = w;
                }
                Decision::Degraded { .. } => panic!("unlimited"),
            }
        }
        assert_eq!(last, secs(750_000_000));
    }

    #[test]
    fn discovery_success() {
        let body = br#"{"code":0,"msg":"ok","data":{"URL":"wss://h/ws/v2?device_id=d&service_id=1&ticket=t","ClientConfig":{"ReconnectCount":-1,"ReconnectInterval":120,"ReconnectNonce":30,"PingInterval":120}}}"#;
        let ep = parse_discovery_response(200, body).unwrap();
        assert_eq!(ep.url, "wss://h/ws/v2?device_id=d&service_id=1&ticket=t");
        assert_eq!(ep.config.ping_interval, Some(120));
        assert_eq!(ep.config.reconnect_count, Some(-1));
        let shown = format!("{ep:?}");
        assert!(!shown.contains("ticket"), "{shown}");

        let no_cfg = br#"{"code":0,"data":{"URL":"wss://h/x"}}"#;
        assert!(parse_discovery_response(200, no_cfg)
            .unwrap()
            .config
            .is_empty());
    }

    #[test]
    fn discovery_classification() {
        let class =
            |status: u16, body: &[u8]| parse_discovery_response(status, body).unwrap_err().class;
        use FailureClass::{Fatal, Retry};
        assert_eq!(class(500, br#"{"code":0}"#), Retry);
        assert_eq!(class(403, b""), Retry);
        assert_eq!(class(200, b"<html>"), Retry);
        assert_eq!(class(200, br#"{"msg":"x"}"#), Retry);
        assert_eq!(class(200, br#"{"code":0}"#), Retry);
        assert_eq!(class(200, br#"{"code":0,"data":{"URL":""}}"#), Retry);
        assert_eq!(class(200, br#"{"code":1,"msg":"busy"}"#), Retry);
        assert_eq!(class(200, br#"{"code":1000040343}"#), Retry);
        assert_eq!(class(200, br#"{"code":403}"#), Fatal);
        assert_eq!(class(200, br#"{"code":514}"#), Fatal);
        assert_eq!(class(200, br#"{"code":1000040350}"#), Fatal);
        assert_eq!(
            class(200, br#"{"code":10003,"msg":"invalid app_id"}"#),
            Fatal
        );
        let e =
            parse_discovery_response(200, br#"{"code":10003,"msg":"invalid app_id"}"#).unwrap_err();
        assert_eq!((e.code, e.reason.as_str()), (Some(10003), "invalid app_id"));
        assert_eq!(classify_discovery_code(0), None);
    }

    #[test]
    fn discovery_request_uses_pascal_case_and_hides_the_secret() {
        let req = DiscoveryRequest {
            app_id: "cli_x",
            app_secret: "s3cret",
        };
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"AppID":"cli_x","AppSecret":"s3cret"}"#
        );
        assert!(!format!("{req:?}").contains("s3cret"));
    }

    #[test]
    fn handshake_classification() {
        use FailureClass::{Fatal, Retry};
        fn lookup<'a>(h: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<&'a str> + 'a {
            move |name| {
                h.iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| *v)
            }
        }
        let c = |status: u16, h: &[(&str, &str)]| classify_handshake(status, lookup(h));

        let r = c(
            400,
            &[
                ("handshake-status", "514"),
                ("handshake-msg", "auth"),
                ("handshake-autherrcode", "1000040350"),
            ],
        );
        assert_eq!(
            (r.class, r.status, r.auth_code, r.message.as_str()),
            (Fatal, 514, Some(1_000_040_350), "auth")
        );
        assert_eq!(
            c(
                400,
                &[("Handshake-Status", "514"), ("Handshake-Autherrcode", "1")]
            )
            .class,
            Retry
        );
        assert_eq!(c(400, &[("Handshake-Status", "514")]).class, Retry);
        assert_eq!(c(400, &[("Handshake-Status", "403")]).class, Fatal);
        assert_eq!(c(200, &[("Handshake-Status", "500")]).class, Retry);
        // Header missing: the HTTP status decides.
        assert_eq!(c(403, &[]).class, Fatal);
        assert_eq!(c(502, &[]).class, Retry);
        assert_eq!(c(403, &[("Handshake-Status", "junk")]).class, Fatal);
        // Header wins over HTTP status.
        assert_eq!(c(403, &[("Handshake-Status", "500")]).class, Retry);
    }

    mod props {
        use super::super::*;
        use crate::longconn::protocol::ClientConfigPatch;
        use proptest::option;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn any_server_values_and_randomness_give_a_bounded_wait_without_panicking(
                count in option::of(any::<i64>()),
                interval in option::of(any::<i64>()),
                nonce in option::of(any::<i64>()),
                ping in option::of(any::<i64>()),
                initial_ms in any::<u64>(),
                max_ms in any::<u64>(),
                ours in option::of(any::<u32>()),
                draws in proptest::collection::vec(any::<f64>(), 1..40),
                connect_every in 1usize..10,
            ) {
                let mut cfg = ClientConfig::default();
                cfg.apply(&ClientConfigPatch {
                    reconnect_count: count,
                    reconnect_interval: interval,
                    reconnect_nonce: nonce,
                    ping_interval: ping,
                });
                let policy = ReconnectPolicy {
                    initial_backoff: Duration::from_millis(initial_ms),
                    max_backoff: Duration::from_millis(max_ms),
                    max_retries: ours,
                    stable_after: Duration::from_secs(60),
                };
                let cap = policy.max_backoff.min(cfg.reconnect_interval);
                let mut r = Reconnect::new(policy);
                let t = Instant::now();
                let mut i = 0;
                for (n, x) in draws.iter().enumerate() {
                    let d = r.next_attempt(&cfg, &mut || { i += 1; draws[i % draws.len()] * x });
                    prop_assert!(d.wait() <= cap.saturating_add(cfg.reconnect_nonce), "{:?}", d);
                    if let Decision::Degraded { retries, .. } = d {
                        let limit = effective_max_retries(cfg.reconnect_count, ours);
                        prop_assert!(limit.is_some_and(|l| retries > l));
                    }
                    if n % connect_every == 0 {
                        r.on_connected(t);
                        r.on_disconnected(t);
                    }
                }
            }
        }
    }
}
