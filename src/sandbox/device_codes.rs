//! The sandbox's device codes (RFC 8628): issued, answered on the verification page, polled
//! on the token endpoint. State only; the HTTP side is `device.rs` (the device endpoints and
//! the page) and `platform.rs` (the token endpoint).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How the sandbox's device grant behaves ([`super::Sandbox::set_device`]).
#[derive(Debug, Clone, Copy)]
pub struct DeviceSettings {
    /// `expires_in` of new device codes.
    pub expires_in: Duration,
    /// `interval` of new device codes.
    pub interval: Duration,
    /// Grant tokens without a refresh token, even with `offline_access`.
    pub no_refresh_token: bool,
    /// The accounts path answers 404 (only the OpenAPI path works).
    pub primary_path_missing: bool,
    /// Answer this many polls `slow_down` (then as usual), to see the client honour it.
    pub slow_down_next: u32,
}

impl Default for DeviceSettings {
    fn default() -> Self {
        Self {
            expires_in: Duration::from_secs(600),
            interval: Duration::from_secs(5),
            no_refresh_token: false,
            primary_path_missing: false,
            slow_down_next: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    Pending,
    Approved(String),
    Denied,
}

/// One device code.
#[derive(Debug)]
struct DeviceCode {
    /// The app the code was issued to: only it may redeem the code.
    app: &'static str,
    scope: String,
    issued: Instant,
    expires_in: Duration,
    interval: Duration,
    last_poll: Option<Instant>,
    decision: Decision,
    used: bool,
    /// What this code saw ([`Devices::code_polls`]).
    seen: CodePolls,
}

/// What the token endpoint saw of one device code: how many polls, how many came sooner than
/// the interval in force (two pollers of one code show here), how many came after the code was
/// redeemed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CodePolls {
    /// Polls with this code.
    pub polls: u64,
    /// Polls sooner than the interval in force.
    pub too_fast: u64,
    /// Polls after the code was redeemed (each answered "already used").
    pub after_redeemed: u64,
}

/// Device grant state.
#[derive(Debug, Default)]
pub(crate) struct Devices {
    pub settings: DeviceSettings,
    codes: HashMap<String, DeviceCode>,
    by_user_code: HashMap<String, String>,
    /// Polls that came sooner than the interval in force.
    pub too_fast: u64,
    /// Polls answered.
    pub polls: u64,
}

impl Devices {
    /// Records a new device code; returns the settings it was issued with.
    pub(crate) fn issue(
        &mut self,
        app: &'static str,
        device_code: &str,
        user_code: &str,
        scope: &str,
    ) -> DeviceSettings {
        let settings = self.settings;
        self.by_user_code
            .insert(user_code.to_owned(), device_code.to_owned());
        self.codes.insert(
            device_code.to_owned(),
            DeviceCode {
                app,
                scope: scope.to_owned(),
                issued: Instant::now(),
                expires_in: settings.expires_in,
                interval: settings.interval,
                last_poll: None,
                decision: Decision::Pending,
                used: false,
                seen: CodePolls::default(),
            },
        );
        settings
    }

    /// The scope asked for with the code the user sees as `user_code`.
    pub(crate) fn scope_of(&self, user_code: &str) -> Option<String> {
        self.by_user_code
            .get(user_code)
            .and_then(|d| self.codes.get(d))
            .map(|c| c.scope.clone())
    }

    /// What the token endpoint saw of the code the user sees as `user_code`.
    pub(crate) fn code_polls(&self, user_code: &str) -> Option<CodePolls> {
        self.by_user_code
            .get(user_code)
            .and_then(|d| self.codes.get(d))
            .map(|c| c.seen)
    }

    /// Approves (as `open_id`) or rejects the code the user sees as `user_code`.
    pub(crate) fn decide(
        &mut self,
        user_code: &str,
        open_id: &str,
        approve: bool,
    ) -> Result<(), String> {
        let dc = self
            .by_user_code
            .get(user_code)
            .and_then(|d| self.codes.get_mut(d))
            .ok_or_else(|| "unknown code".to_owned())?;
        if dc.issued.elapsed() >= dc.expires_in {
            return Err("the code has expired".to_owned());
        }
        if dc.decision != Decision::Pending {
            return Err("the code was already answered".to_owned());
        }
        dc.decision = if approve {
            Decision::Approved(open_id.to_owned())
        } else {
            Decision::Denied
        };
        Ok(())
    }

    /// One poll of the token endpoint by `app` with `device_code`: the approving user and the
    /// scope to grant, or the error (`code`, `error`, description) to answer. A code issued to
    /// another app is unknown to this one.
    pub(crate) fn poll(
        &mut self,
        app: &'static str,
        device_code: &str,
    ) -> Result<(String, String), (i64, &'static str, &'static str)> {
        self.polls += 1;
        let force_slow = self.settings.slow_down_next > 0;
        if force_slow {
            self.settings.slow_down_next -= 1;
        }
        let no_refresh = self.settings.no_refresh_token;
        let Some(dc) = self.codes.get_mut(device_code).filter(|dc| dc.app == app) else {
            return Err((20003, "invalid_grant", "device code not found"));
        };
        dc.seen.polls += 1;
        if dc.used {
            dc.seen.after_redeemed += 1;
            return Err((20065, "invalid_grant", "device code already used"));
        }
        if dc.issued.elapsed() >= dc.expires_in {
            return Err((20004, "expired_token", "the device code has expired"));
        }
        let now = Instant::now();
        let too_fast = dc
            .last_poll
            .is_some_and(|last| now.duration_since(last) < dc.interval);
        dc.last_poll = Some(now);
        if too_fast {
            self.too_fast += 1;
            dc.seen.too_fast += 1;
        }
        if too_fast || force_slow {
            dc.interval += Duration::from_secs(5);
            return Err((0, "slow_down", "poll less often"));
        }
        match &dc.decision {
            Decision::Pending => Err((0, "authorization_pending", "the user has not answered")),
            Decision::Denied => Err((0, "access_denied", "the user declined")),
            Decision::Approved(open_id) => {
                dc.used = true;
                let scope = if no_refresh {
                    dc.scope
                        .split_whitespace()
                        .filter(|x| *x != "offline_access")
                        .collect::<Vec<_>>()
                        .join(" ")
                } else {
                    dc.scope.clone()
                };
                Ok((open_id.clone(), scope))
            }
        }
    }
}
