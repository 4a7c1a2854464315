//! The authorization state machine: pure, no I/O.
//!
//! [`transition`] takes where a session is ([`Flow`]), what happened ([`Input`]) and the time,
//! and returns where it is now and what the shell must do ([`Effect`]s, in order). The shell
//! (`flow.rs`) persists every phase change with a compare-and-set on the stored session and
//! carries out the effects.
//!
//! Rules:
//! - The OAuth `state` is single use: the first redirect that carries it moves the session out
//!   of [`Phase::AwaitingRedirect`]; any later redirect (a replay) is `state_mismatch` and
//!   changes nothing.
//! - A redirect at or after `expires_at` expires the session (`session_expired`).
//! - Terminal phases are absorbing. The only exit is an operator's revoke of a completed session
//!   (`Completed → Revoked`); `Revoked` is absorbing too.
//! - **Expiry racing completion: the first terminal transition that commits wins.** Validity is
//!   judged when the redirect arrives; once the code is being exchanged, only an expiry that
//!   the sweep *committed* first can beat the completion. In the shell both writes are
//!   compare-and-sets on "still pending", so if the sweep commits first the completion loses
//!   (the tokens are discarded, the browser is told the request expired, nothing is counted
//!   twice); if the completion commits first the sweep no longer sees a pending session. The
//!   shell re-runs the losing input on the winner's phase, which yields only a response.
//! - Late results (an exchange result or user info arriving for a terminal session) only answer
//!   with the page of the phase the session is in.
//! - **The device flow** ([`Phase::AwaitingDevice`]): the card opens the platform's
//!   verification page and the shell polls. Its results are inputs like any other: approval
//!   (with the identity of the approving user, read before the input is fed), denial, expiry
//!   of the device code, or a poll that failed for good. An approval at or after `expires_at`
//!   expires the session (validity is judged when the result arrives). Redirect inputs never
//!   apply to a device session (it has no OAuth state), and device inputs never apply to a
//!   redirect session.
//! - **Only a proven identity completes.** Tokens are stored only after the user info of the new
//!   token showed the card's user ([`Identity::Matches`]); someone else is `state_mismatch`, and
//!   an identity that cannot be established is `unknown_error`.

use crate::storage::{AuthSession, FailureReason, SessionState};

/// Where a session is in the flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Pending; the card is out and the OAuth `state` has not been used.
    AwaitingRedirect,
    /// Pending; a redirect with a code used the `state`; the code is being exchanged.
    Exchanging,
    /// Pending; a device-flow card is out and the service polls the platform.
    AwaitingDevice,
    /// Tokens obtained.
    Completed,
    /// Nobody finished in time.
    Expired,
    /// The user declined (card button or consent page).
    Rejected,
    /// Failed for the reason given.
    Failed(FailureReason),
    /// An operator revoked it.
    Revoked,
}

impl Phase {
    /// True for every phase but the two pending ones.
    #[must_use]
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            Self::AwaitingRedirect | Self::Exchanging | Self::AwaitingDevice
        )
    }

    /// The stored state and failure reason of this phase.
    #[must_use]
    pub fn stored(self) -> (SessionState, Option<FailureReason>) {
        match self {
            Self::AwaitingRedirect | Self::Exchanging | Self::AwaitingDevice => {
                (SessionState::Pending, None)
            }
            Self::Completed => (SessionState::Completed, None),
            Self::Expired => (SessionState::Expired, Some(FailureReason::SessionExpired)),
            Self::Rejected => (SessionState::Rejected, Some(FailureReason::UserRejected)),
            Self::Failed(r) => (SessionState::Failed, Some(r)),
            Self::Revoked => (SessionState::Revoked, None),
        }
    }

    /// The phase a stored session is in. A pending session whose state hash is gone has had
    /// its state used by a redirect: it is exchanging (it keeps its PKCE verifier until it
    /// ends). A pending session with neither is a device-flow session: it never had an OAuth
    /// state or a verifier.
    #[must_use]
    pub fn of(s: &AuthSession) -> Self {
        match s.state {
            SessionState::Pending if s.state_hash.is_some() => Self::AwaitingRedirect,
            SessionState::Pending if s.pkce_verifier.is_some() => Self::Exchanging,
            SessionState::Pending => Self::AwaitingDevice,
            SessionState::Completed => Self::Completed,
            SessionState::Expired => Self::Expired,
            SessionState::Rejected => Self::Rejected,
            SessionState::Failed => {
                Self::Failed(s.failure_reason.unwrap_or(FailureReason::UnknownError))
            }
            SessionState::Revoked => Self::Revoked,
        }
    }

    /// What a browser (or a card click) is told about a session in this phase.
    #[must_use]
    pub fn page(self) -> Page {
        match self {
            Self::Completed => Page::Authorized,
            Self::Expired => Page::Expired,
            Self::Rejected => Page::Rejected,
            Self::Failed(r) => Page::Failed(r),
            // A used or revoked state is no longer valid.
            Self::AwaitingRedirect | Self::Exchanging | Self::AwaitingDevice | Self::Revoked => {
                Page::Failed(FailureReason::StateMismatch)
            }
        }
    }
}

/// A session as the machine sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// Where it is.
    pub phase: Phase,
    /// When a pending session expires (unix ms).
    pub expires_at: u64,
}

impl Flow {
    /// The flow of a stored session.
    #[must_use]
    pub fn of(s: &AuthSession) -> Self {
        Self {
            phase: Phase::of(s),
            expires_at: s.expires_at,
        }
    }
}

/// Who the exchanged token belongs to, compared with the user the card went to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// The token's user is the card's user.
    Matches,
    /// Could not be established (user info unavailable, or no comparable id). Fail closed: the
    /// session fails (`unknown_error`) and no token is stored.
    Unknown,
    /// Someone else completed the OAuth flow with this session's state.
    Mismatch,
}

/// Why a code exchange failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExchangeError {
    /// The code was older than its 5 minutes.
    CodeExpired,
    /// Anything else.
    Other,
}

/// Something that happened to a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    /// The OAuth redirect arrived with this session's state and a code.
    RedirectWithCode,
    /// The OAuth redirect arrived with this session's state but no code and no error.
    RedirectWithoutCode,
    /// The OAuth redirect said `error=access_denied`.
    RedirectDenied,
    /// The OAuth redirect carried another `error`.
    RedirectError,
    /// The code was exchanged for tokens.
    CodeExchanged,
    /// The code exchange failed.
    ExchangeFailed(ExchangeError),
    /// The user info of the new token was read (or could not be).
    UserIdentified(Identity),
    /// The card's owner pressed "reject" (or "cancel").
    CardRejected,
    /// The sweep found the session past its expiry.
    Expire,
    /// An operator revoked the session.
    Revoke,
    /// Device flow: the platform granted tokens; the approving user, compared with the card's.
    DeviceApproved(Identity),
    /// Device flow: the user declined on the platform's page (`access_denied`).
    DeviceDenied,
    /// Device flow: the device code expired (`expired_token`).
    DeviceExpired,
    /// Device flow: polling failed for good (any other error).
    DeviceFailed,
}

/// Which final card replaces the authorize card.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CardKind {
    /// Authorized.
    Authorized,
    /// Declined.
    Rejected,
    /// Expired (also used when an operator revokes a pending request).
    Expired,
    /// Failed for this reason.
    Failed(FailureReason),
}

/// What the browser (or the card click) is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Page {
    /// Authorization complete.
    Authorized,
    /// The request expired.
    Expired,
    /// The user declined.
    Rejected,
    /// Failed for this reason (`state_mismatch`: the link is not valid any more).
    Failed(FailureReason),
}

/// Work for the shell, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Effect {
    /// Exchange the redirect's code (with the PKCE verifier); answer with `CodeExchanged` or
    /// `ExchangeFailed`.
    ExchangeCode,
    /// Read the new token's user; answer with `UserIdentified`.
    FetchUserInfo,
    /// Store the tokens and user info, in the same transaction as the `Completed` session.
    StoreTokens,
    /// Replace the card (or, for a card click, answer with this card).
    PatchCard(CardKind),
    /// `auth_success` + `auth_duration` (created → now).
    CountSuccess,
    /// `auth_failure{reason}`.
    CountFailure(FailureReason),
    /// Answer the browser (or the card click) with this page.
    Respond(Page),
}

fn fail(r: FailureReason) -> (Phase, Vec<Effect>) {
    (
        Phase::Failed(r),
        vec![
            Effect::PatchCard(CardKind::Failed(r)),
            Effect::CountFailure(r),
            Effect::Respond(Page::Failed(r)),
        ],
    )
}

fn expire() -> (Phase, Vec<Effect>) {
    (
        Phase::Expired,
        vec![
            Effect::PatchCard(CardKind::Expired),
            Effect::CountFailure(FailureReason::SessionExpired),
            Effect::Respond(Page::Expired),
        ],
    )
}

fn reject() -> (Phase, Vec<Effect>) {
    (
        Phase::Rejected,
        vec![
            Effect::PatchCard(CardKind::Rejected),
            Effect::CountFailure(FailureReason::UserRejected),
            Effect::Respond(Page::Rejected),
        ],
    )
}

fn mismatch() -> Vec<Effect> {
    vec![
        Effect::CountFailure(FailureReason::StateMismatch),
        Effect::Respond(Page::Failed(FailureReason::StateMismatch)),
    ]
}

fn is_redirect(i: Input) -> bool {
    matches!(
        i,
        Input::RedirectWithCode
            | Input::RedirectWithoutCode
            | Input::RedirectDenied
            | Input::RedirectError
    )
}

fn is_device(i: Input) -> bool {
    matches!(
        i,
        Input::DeviceApproved(_) | Input::DeviceDenied | Input::DeviceExpired | Input::DeviceFailed
    )
}

/// The transition function. `now` is unix ms.
#[must_use]
pub fn transition(flow: Flow, input: Input, now: u64) -> (Flow, Vec<Effect>) {
    use Phase as P;
    let (phase, effects) = match (flow.phase, input) {
        // --- Terminal phases never change, except Completed → Revoked.
        (P::Completed, Input::Revoke) => (P::Revoked, vec![]),
        (p, i) if p.is_terminal() && is_redirect(i) => (p, mismatch()),
        (p, Input::Expire | Input::Revoke) if p.is_terminal() => (p, vec![]),
        (p, _) if p.is_terminal() => (p, vec![Effect::Respond(p.page())]),

        // --- Either pending phase.
        (_, Input::CardRejected) => reject(),
        (_, Input::Expire) => {
            let (p, mut e) = expire();
            e.retain(|e| !matches!(e, Effect::Respond(_)));
            (p, e)
        }
        (_, Input::Revoke) => (P::Revoked, vec![Effect::PatchCard(CardKind::Expired)]),

        // --- The device flow.
        (P::AwaitingDevice, i) if is_redirect(i) => (P::AwaitingDevice, mismatch()),
        (P::AwaitingDevice, Input::DeviceApproved(_)) if now >= flow.expires_at => expire(),
        (P::AwaitingDevice, Input::DeviceApproved(Identity::Matches)) => (
            P::Completed,
            vec![
                Effect::StoreTokens,
                Effect::PatchCard(CardKind::Authorized),
                Effect::CountSuccess,
                Effect::Respond(Page::Authorized),
            ],
        ),
        // Someone else approved with this card's code: nothing is stored.
        (P::AwaitingDevice, Input::DeviceApproved(Identity::Mismatch)) => {
            fail(FailureReason::StateMismatch)
        }
        (P::AwaitingDevice, Input::DeviceApproved(Identity::Unknown) | Input::DeviceFailed) => {
            fail(FailureReason::UnknownError)
        }
        (P::AwaitingDevice, Input::DeviceDenied) => reject(),
        (P::AwaitingDevice, Input::DeviceExpired) => expire(),
        // Redirect-flow results never apply to a device session.
        (P::AwaitingDevice, _) => (P::AwaitingDevice, vec![]),
        // Device results never apply to a redirect session.
        (p @ (P::AwaitingRedirect | P::Exchanging), i) if is_device(i) => (p, vec![]),

        // --- Waiting for the redirect: the state is being used now.
        (P::AwaitingRedirect, i) if is_redirect(i) && now >= flow.expires_at => expire(),
        (P::AwaitingRedirect, Input::RedirectWithCode) => {
            (P::Exchanging, vec![Effect::ExchangeCode])
        }
        (P::AwaitingRedirect, Input::RedirectWithoutCode) => fail(FailureReason::MissingCode),
        (P::AwaitingRedirect, Input::RedirectDenied) => reject(),
        (P::AwaitingRedirect, Input::RedirectError) => fail(FailureReason::UnknownError),
        // Exchange results cannot arrive before a redirect: ignore.
        (P::AwaitingRedirect, _) => (P::AwaitingRedirect, vec![]),

        // --- Exchanging: the state is used up.
        (P::Exchanging, i) if is_redirect(i) => (P::Exchanging, mismatch()),
        (P::Exchanging, Input::CodeExchanged) => (P::Exchanging, vec![Effect::FetchUserInfo]),
        (P::Exchanging, Input::ExchangeFailed(ExchangeError::CodeExpired)) => {
            fail(FailureReason::CodeExpired)
        }
        (P::Exchanging, Input::ExchangeFailed(ExchangeError::Other)) => {
            fail(FailureReason::UnknownError)
        }
        (P::Exchanging, Input::UserIdentified(Identity::Mismatch)) => {
            fail(FailureReason::StateMismatch)
        }
        // Who completed the flow is not known: refuse rather than hand the card's user a token
        // that may be someone else's.
        (P::Exchanging, Input::UserIdentified(Identity::Unknown)) => {
            fail(FailureReason::UnknownError)
        }
        (P::Exchanging, Input::UserIdentified(Identity::Matches)) => (
            P::Completed,
            vec![
                Effect::StoreTokens,
                Effect::PatchCard(CardKind::Authorized),
                Effect::CountSuccess,
                Effect::Respond(Page::Authorized),
            ],
        ),
        // Every (pending phase, input) pair is covered above; this arm is unreachable but
        // keeps the match total without listing pairs twice.
        (p, _) => (p, vec![]),
    };
    (
        Flow {
            phase,
            expires_at: flow.expires_at,
        },
        effects,
    )
}

/// Moves a stored session into `phase` at `now`: its stored state and failure reason, and
/// drops what the phase no longer needs (the OAuth state hash once a redirect used it, the PKCE
/// verifier once the session is over). The shell writes every phase change through this, so
/// [`Phase::of`] of the result is `phase` (for [`Phase::AwaitingRedirect`]: if the session
/// still has its state hash).
pub fn enter(s: &mut AuthSession, phase: Phase, now: u64) {
    let (state, reason) = phase.stored();
    s.state = state;
    s.failure_reason = reason;
    s.updated_at = now;
    if phase != Phase::AwaitingRedirect {
        s.state_hash = None;
    }
    if phase.is_terminal() || phase == Phase::AwaitingDevice {
        s.pkce_verifier = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use secrecy::SecretString;
    use FailureReason as R;

    const EXP: u64 = 1_000;

    fn flow(phase: Phase) -> Flow {
        Flow {
            phase,
            expires_at: EXP,
        }
    }

    fn fail_effects(r: FailureReason) -> Vec<Effect> {
        vec![
            Effect::PatchCard(CardKind::Failed(r)),
            Effect::CountFailure(r),
            Effect::Respond(Page::Failed(r)),
        ]
    }

    fn mismatch_effects() -> Vec<Effect> {
        vec![
            Effect::CountFailure(R::StateMismatch),
            Effect::Respond(Page::Failed(R::StateMismatch)),
        ]
    }

    #[test]
    fn every_transition_from_the_pending_phases() {
        use Effect as E;
        use Input as I;
        use Phase as P;
        let expired_page = vec![
            E::PatchCard(CardKind::Expired),
            E::CountFailure(R::SessionExpired),
            E::Respond(Page::Expired),
        ];
        let rejected = vec![
            E::PatchCard(CardKind::Rejected),
            E::CountFailure(R::UserRejected),
            E::Respond(Page::Rejected),
        ];
        let expired_sweep = vec![
            E::PatchCard(CardKind::Expired),
            E::CountFailure(R::SessionExpired),
        ];
        let completed = vec![
            E::StoreTokens,
            E::PatchCard(CardKind::Authorized),
            E::CountSuccess,
            E::Respond(Page::Authorized),
        ];
        #[rustfmt::skip]
        let table: Vec<(Phase, Input, u64, Phase, Vec<Effect>)> = vec![
            // Awaiting the redirect, in time.
            (P::AwaitingRedirect, I::RedirectWithCode, 10, P::Exchanging, vec![E::ExchangeCode]),
            (P::AwaitingRedirect, I::RedirectWithoutCode, 10, P::Failed(R::MissingCode), fail_effects(R::MissingCode)),
            (P::AwaitingRedirect, I::RedirectDenied, 10, P::Rejected, rejected.clone()),
            (P::AwaitingRedirect, I::RedirectError, 10, P::Failed(R::UnknownError), fail_effects(R::UnknownError)),
            // Awaiting the redirect, too late (at and after expires_at).
            (P::AwaitingRedirect, I::RedirectWithCode, EXP, P::Expired, expired_page.clone()),
            (P::AwaitingRedirect, I::RedirectWithoutCode, EXP + 1, P::Expired, expired_page.clone()),
            (P::AwaitingRedirect, I::RedirectDenied, EXP + 1, P::Expired, expired_page.clone()),
            (P::AwaitingRedirect, I::RedirectError, EXP + 1, P::Expired, expired_page.clone()),
            // Card, sweep, revoke.
            (P::AwaitingRedirect, I::CardRejected, 10, P::Rejected, rejected.clone()),
            (P::AwaitingRedirect, I::Expire, EXP, P::Expired, expired_sweep.clone()),
            (P::AwaitingRedirect, I::Revoke, 10, P::Revoked, vec![E::PatchCard(CardKind::Expired)]),
            // Stray results before any redirect change nothing.
            (P::AwaitingRedirect, I::CodeExchanged, 10, P::AwaitingRedirect, vec![]),
            (P::AwaitingRedirect, I::ExchangeFailed(ExchangeError::Other), 10, P::AwaitingRedirect, vec![]),
            (P::AwaitingRedirect, I::UserIdentified(Identity::Matches), 10, P::AwaitingRedirect, vec![]),
            // Exchanging: replays are state_mismatch, even after expiry.
            (P::Exchanging, I::RedirectWithCode, 10, P::Exchanging, mismatch_effects()),
            (P::Exchanging, I::RedirectWithoutCode, 10, P::Exchanging, mismatch_effects()),
            (P::Exchanging, I::RedirectDenied, EXP + 5, P::Exchanging, mismatch_effects()),
            (P::Exchanging, I::RedirectError, 10, P::Exchanging, mismatch_effects()),
            (P::Exchanging, I::CodeExchanged, 10, P::Exchanging, vec![E::FetchUserInfo]),
            // Validity was judged at the redirect: a completion after expires_at still completes.
            (P::Exchanging, I::CodeExchanged, EXP + 5, P::Exchanging, vec![E::FetchUserInfo]),
            (P::Exchanging, I::ExchangeFailed(ExchangeError::CodeExpired), 10, P::Failed(R::CodeExpired), fail_effects(R::CodeExpired)),
            (P::Exchanging, I::ExchangeFailed(ExchangeError::Other), 10, P::Failed(R::UnknownError), fail_effects(R::UnknownError)),
            (P::Exchanging, I::UserIdentified(Identity::Matches), 10, P::Completed, completed.clone()),
            (P::Exchanging, I::UserIdentified(Identity::Matches), EXP + 5, P::Completed, completed.clone()),
            (P::Exchanging, I::UserIdentified(Identity::Unknown), 10, P::Failed(R::UnknownError), fail_effects(R::UnknownError)),
            (P::Exchanging, I::UserIdentified(Identity::Mismatch), 10, P::Failed(R::StateMismatch), fail_effects(R::StateMismatch)),
            (P::Exchanging, I::CardRejected, 10, P::Rejected, rejected.clone()),
            (P::Exchanging, I::Expire, EXP, P::Expired, expired_sweep.clone()),
            (P::Exchanging, I::Revoke, 10, P::Revoked, vec![E::PatchCard(CardKind::Expired)]),
            // Device results never apply to a redirect session.
            (P::AwaitingRedirect, I::DeviceApproved(Identity::Matches), 10, P::AwaitingRedirect, vec![]),
            (P::AwaitingRedirect, I::DeviceDenied, 10, P::AwaitingRedirect, vec![]),
            (P::Exchanging, I::DeviceApproved(Identity::Matches), 10, P::Exchanging, vec![]),
            (P::Exchanging, I::DeviceExpired, 10, P::Exchanging, vec![]),
            // The device flow.
            (P::AwaitingDevice, I::DeviceApproved(Identity::Matches), 10, P::Completed, completed.clone()),
            (P::AwaitingDevice, I::DeviceApproved(Identity::Matches), EXP, P::Expired, expired_page.clone()),
            (P::AwaitingDevice, I::DeviceApproved(Identity::Mismatch), 10, P::Failed(R::StateMismatch), fail_effects(R::StateMismatch)),
            (P::AwaitingDevice, I::DeviceApproved(Identity::Unknown), 10, P::Failed(R::UnknownError), fail_effects(R::UnknownError)),
            (P::AwaitingDevice, I::DeviceFailed, 10, P::Failed(R::UnknownError), fail_effects(R::UnknownError)),
            (P::AwaitingDevice, I::DeviceDenied, 10, P::Rejected, rejected.clone()),
            (P::AwaitingDevice, I::DeviceExpired, 10, P::Expired, expired_page.clone()),
            (P::AwaitingDevice, I::CardRejected, 10, P::Rejected, rejected.clone()),
            (P::AwaitingDevice, I::Expire, EXP, P::Expired, expired_sweep.clone()),
            (P::AwaitingDevice, I::Revoke, 10, P::Revoked, vec![E::PatchCard(CardKind::Expired)]),
            // Redirects cannot name a device session; if one did, it is a mismatch.
            (P::AwaitingDevice, I::RedirectWithCode, 10, P::AwaitingDevice, mismatch_effects()),
            (P::AwaitingDevice, I::RedirectDenied, 10, P::AwaitingDevice, mismatch_effects()),
            // Redirect-flow results change nothing.
            (P::AwaitingDevice, I::CodeExchanged, 10, P::AwaitingDevice, vec![]),
            (P::AwaitingDevice, I::UserIdentified(Identity::Matches), 10, P::AwaitingDevice, vec![]),
            (P::AwaitingDevice, I::ExchangeFailed(ExchangeError::Other), 10, P::AwaitingDevice, vec![]),
        ];
        for (from, input, now, to, effects) in table {
            let (got, eff) = transition(flow(from), input, now);
            assert_eq!(
                (got.phase, &eff),
                (to, &effects),
                "{from:?} --{input:?}@{now}-->"
            );
            assert_eq!(got.expires_at, EXP);
        }
    }

    fn all_inputs() -> Vec<Input> {
        vec![
            Input::RedirectWithCode,
            Input::RedirectWithoutCode,
            Input::RedirectDenied,
            Input::RedirectError,
            Input::CodeExchanged,
            Input::ExchangeFailed(ExchangeError::CodeExpired),
            Input::ExchangeFailed(ExchangeError::Other),
            Input::UserIdentified(Identity::Matches),
            Input::UserIdentified(Identity::Unknown),
            Input::UserIdentified(Identity::Mismatch),
            Input::CardRejected,
            Input::Expire,
            Input::Revoke,
            Input::DeviceApproved(Identity::Matches),
            Input::DeviceApproved(Identity::Unknown),
            Input::DeviceApproved(Identity::Mismatch),
            Input::DeviceDenied,
            Input::DeviceExpired,
            Input::DeviceFailed,
        ]
    }

    fn terminal_phases() -> Vec<Phase> {
        let mut v = vec![
            Phase::Completed,
            Phase::Expired,
            Phase::Rejected,
            Phase::Revoked,
        ];
        v.extend(FailureReason::ALL.map(Phase::Failed));
        v
    }

    #[test]
    fn every_transition_from_the_terminal_phases() {
        for p in terminal_phases() {
            for i in all_inputs() {
                let (got, eff) = transition(flow(p), i, EXP + 100);
                let want_phase = if p == Phase::Completed && i == Input::Revoke {
                    Phase::Revoked
                } else {
                    p
                };
                assert_eq!(got.phase, want_phase, "{p:?} --{i:?}-->");
                let want: Vec<Effect> = match i {
                    // A replayed or late redirect: state_mismatch, the session untouched.
                    _ if is_redirect(i) => mismatch_effects(),
                    Input::Expire | Input::Revoke => vec![],
                    // A late exchange result or card click: only the current page.
                    _ => vec![Effect::Respond(p.page())],
                };
                assert_eq!(eff, want, "{p:?} --{i:?}-->");
            }
        }
    }

    /// The race of the issue, both orders: expiry commits first, then the completion's input
    /// is re-run on the expired session; or the completion commits first and the sweep's
    /// expiry comes after.
    #[test]
    fn expiry_racing_completion_first_terminal_transition_wins() {
        // Expiry first.
        let (f, _) = transition(flow(Phase::Exchanging), Input::Expire, EXP);
        assert_eq!(f.phase, Phase::Expired);
        let (f, eff) = transition(f, Input::UserIdentified(Identity::Matches), EXP + 1);
        assert_eq!(f.phase, Phase::Expired);
        assert_eq!(eff, vec![Effect::Respond(Page::Expired)]);
        // Completion first.
        let (f, eff) = transition(
            flow(Phase::Exchanging),
            Input::UserIdentified(Identity::Matches),
            EXP + 1,
        );
        assert_eq!(f.phase, Phase::Completed);
        assert!(eff.contains(&Effect::StoreTokens));
        let (f, eff) = transition(f, Input::Expire, EXP + 2);
        assert_eq!(f.phase, Phase::Completed);
        assert!(eff.is_empty());
    }

    #[test]
    fn phases_round_trip_through_stored_sessions() {
        let mut s = AuthSession::new_pending("cli_a", "u", vec![], 0, 1_000);
        assert_eq!(Phase::of(&s), Phase::AwaitingDevice);
        s.pkce_verifier = Some(SecretString::from("v"));
        s.state_hash = Some([1; 32]);
        assert_eq!(Phase::of(&s), Phase::AwaitingRedirect);
        s.state_hash = None;
        assert_eq!(Phase::of(&s), Phase::Exchanging);
        for p in terminal_phases() {
            let (state, reason) = p.stored();
            s.state = state;
            s.failure_reason = reason;
            assert_eq!(Phase::of(&s), p);
        }
    }

    fn input_strategy() -> impl Strategy<Value = Input> {
        proptest::sample::select(all_inputs())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// No sequence of inputs leaves a terminal phase (other than Completed → Revoked),
        /// completes twice, or counts a session's outcome twice.
        #[test]
        fn no_sequence_leaves_a_terminal_phase_or_completes_twice(
            steps in proptest::collection::vec((input_strategy(), 0u64..2 * EXP), 1..40)
        ) {
            let mut f = flow(Phase::AwaitingRedirect);
            let mut first_terminal: Option<Phase> = None;
            let mut stores = 0;
            let mut successes = 0;
            let mut outcomes = 0;
            for (input, now) in steps {
                let before = f.phase;
                let (next, eff) = transition(f, input, now);
                if before.is_terminal() {
                    let allowed = next.phase == before
                        || (before == Phase::Completed && next.phase == Phase::Revoked);
                    prop_assert!(allowed, "{:?} left for {:?} on {:?}", before, next.phase, input);
                    prop_assert!(!eff.iter().any(|e| matches!(e, Effect::StoreTokens | Effect::CountSuccess | Effect::PatchCard(_) | Effect::ExchangeCode | Effect::FetchUserInfo)));
                }
                if !before.is_terminal() && next.phase.is_terminal() {
                    prop_assert!(first_terminal.is_none());
                    first_terminal = Some(next.phase);
                    outcomes += 1;
                }
                for e in &eff {
                    match e {
                        Effect::StoreTokens => {
                            stores += 1;
                            prop_assert_eq!(next.phase, Phase::Completed);
                            // Fail closed: only a proven identity stores tokens.
                            prop_assert_eq!(input, Input::UserIdentified(Identity::Matches));
                        }
                        Effect::CountSuccess => successes += 1,
                        _ => {}
                    }
                }
                // The pending phases only move forward: a used state is never reusable.
                prop_assert!(!(before == Phase::Exchanging && next.phase == Phase::AwaitingRedirect));
                f = next;
            }
            prop_assert!(stores <= 1);
            prop_assert!(successes <= 1);
            prop_assert!(outcomes <= 1);
        }
    }

    fn all_phases() -> Vec<Phase> {
        let mut v = vec![
            Phase::AwaitingRedirect,
            Phase::Exchanging,
            Phase::AwaitingDevice,
        ];
        v.extend(terminal_phases());
        v
    }

    fn pending_session() -> AuthSession {
        let mut s = AuthSession::new_pending("cli_a", "u", vec![], 0, EXP);
        s.state_hash = Some([1; 32]);
        s.pkce_verifier = Some(SecretString::from("verifier"));
        s
    }

    #[test]
    fn entering_a_phase_stores_it_and_drops_what_it_no_longer_needs() {
        for p in all_phases() {
            let mut s = pending_session();
            enter(&mut s, p, 7);
            assert_eq!(Phase::of(&s), p, "{p:?}");
            assert_eq!(s.updated_at, 7);
            assert_eq!(
                s.state_hash.is_some(),
                p == Phase::AwaitingRedirect,
                "{p:?}"
            );
            assert_eq!(
                s.pkce_verifier.is_some(),
                !p.is_terminal() && p != Phase::AwaitingDevice,
                "{p:?}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// A stored session moved with [`enter`] on every phase change of the machine is always
        /// read back in the machine's phase; a used state hash never comes back, and a session
        /// that ended keeps no PKCE verifier.
        #[test]
        fn stored_sessions_follow_the_machine(
            steps in proptest::collection::vec((input_strategy(), 0u64..2 * EXP), 1..40)
        ) {
            let mut s = pending_session();
            let mut f = Flow::of(&s);
            prop_assert_eq!(f.phase, Phase::AwaitingRedirect);
            for (input, now) in steps {
                let (next, _) = transition(f, input, now);
                if next.phase != f.phase {
                    let had_hash = s.state_hash.is_some();
                    enter(&mut s, next.phase, now);
                    prop_assert!(had_hash || s.state_hash.is_none());
                }
                prop_assert_eq!(Phase::of(&s), next.phase);
                prop_assert_eq!(Flow::of(&s), next);
                if next.phase.is_terminal() {
                    prop_assert!(s.pkce_verifier.is_none());
                    prop_assert!(s.state_hash.is_none());
                }
                f = next;
            }
        }
    }

    fn device_session() -> AuthSession {
        AuthSession::new_pending("cli_a", "u", vec![], 0, EXP)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// A device session: no sequence of inputs stores tokens except an approval by the
        /// card's user before expiry, none stores twice or leaves a terminal phase, redirect
        /// inputs never move it, and the stored session follows the machine.
        #[test]
        fn device_sessions_complete_only_for_the_cards_user(
            steps in proptest::collection::vec((input_strategy(), 0u64..2 * EXP), 1..40)
        ) {
            let mut s = device_session();
            let mut f = Flow::of(&s);
            prop_assert_eq!(f.phase, Phase::AwaitingDevice);
            let mut stores = 0;
            let mut outcomes = 0;
            for (input, now) in steps {
                let before = f.phase;
                let (next, eff) = transition(f, input, now);
                if before == Phase::AwaitingDevice && is_redirect(input) {
                    prop_assert_eq!(next.phase, Phase::AwaitingDevice);
                }
                prop_assert!(next.phase != Phase::AwaitingRedirect && next.phase != Phase::Exchanging);
                if before.is_terminal() {
                    prop_assert!(next.phase == before || (before == Phase::Completed && next.phase == Phase::Revoked));
                    prop_assert!(!eff.iter().any(|e| matches!(e, Effect::StoreTokens | Effect::CountSuccess | Effect::PatchCard(_))));
                } else if next.phase.is_terminal() {
                    outcomes += 1;
                }
                if eff.contains(&Effect::StoreTokens) {
                    stores += 1;
                    prop_assert_eq!(input, Input::DeviceApproved(Identity::Matches));
                    prop_assert!(now < EXP);
                    prop_assert_eq!(next.phase, Phase::Completed);
                }
                if next.phase != f.phase {
                    enter(&mut s, next.phase, now);
                }
                prop_assert_eq!(Phase::of(&s), next.phase);
                prop_assert!(s.state_hash.is_none() && s.pkce_verifier.is_none());
                f = next;
            }
            prop_assert!(stores <= 1);
            prop_assert!(outcomes <= 1);
        }
    }
}
