//! Errors of the flow.

use std::time::Duration;

use super::time::ceil_secs;
use crate::lark::{self};
use crate::storage::{self, SessionId};

/// Why a request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The user asked too often.
    #[error("too many authorization requests for this user; retry in {} s", ceil_secs(*retry_after))]
    RateLimited {
        /// When the next request will be accepted.
        retry_after: Duration,
    },
    /// A bad argument.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Which field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A request by `user_id` whose user could not be resolved to an open_id in the directory
    /// (no such user, or the app may not read it). Without the open_id the service could not
    /// check who completes the authorization, so it refuses the request.
    #[error("cannot resolve user_id {user_id:?} to an open_id: {reason}")]
    UnresolvedUser {
        /// The user_id asked for.
        user_id: String,
        /// Why it could not be resolved.
        reason: String,
    },
    /// Another instance of the fleet is handling a request for the same user (sending its
    /// card) and did not finish in time: nothing was sent; ask again.
    #[error("another request for this user is in progress; retry in {} s", ceil_secs(*retry_after))]
    Busy {
        /// When to ask again.
        retry_after: Duration,
    },
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] storage::Error),
    /// Lark refused or could not be reached.
    #[error("lark: {0}")]
    Lark(#[from] lark::Error),
}

/// Why no access token can be given.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The user never authorized (or the token was revoked).
    #[error("no token for this user")]
    NotFound,
    /// The refresh token is no longer accepted: the user must authorize again.
    #[error("the user must authorize again")]
    NeedsReauth {
        /// The session that produced the dead token.
        session: Option<SessionId>,
    },
    /// The token is expired and refreshing it failed for a reason that may pass.
    #[error("refreshing the token failed: {0}")]
    Refresh(lark::Error),
    /// The answer to the last refresh was lost and whether it took effect is not settled yet:
    /// no token is handed out until a check decides (see the module documentation).
    #[error("the outcome of the last token refresh is being checked; retry in {} s", ceil_secs(*retry_after))]
    RefreshInDoubt {
        /// When to ask again.
        retry_after: Duration,
    },
    /// The refresh task ended without a result (it panicked or the runtime is stopping).
    #[error("the token refresh was interrupted: {0}")]
    Interrupted(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] storage::Error),
}
