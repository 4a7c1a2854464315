//! Authorization by card (issue 6): a user gets an interactive "Authorize" card, completes
//! OAuth v2 (with PKCE) in the browser, and the service keeps the tokens fresh.
//!
//! `state` is the pure state machine; `flow` is the shell that carries out its effects with the
//! Lark client and the store, plus the token refresh and user-info sync workers and the HTTP
//! routes.

pub mod flow;
pub mod state;

pub use flow::{
    AccessToken, AuthError, AuthOptions, AuthRequest, AuthService, Clock, RequestOutcome, Revoked,
    SyncReport, TokenError, UserRef,
};
