//! Authorization by card (issue 6): a user gets an interactive "Authorize" card, completes
//! OAuth v2 (with PKCE) in the browser, and the service keeps the tokens fresh.
//!
//! `state` is the pure state machine: every phase change of a session is made by it. `flow`
//! is the shell ([`AuthService`]) that carries out its effects with the Lark client and the
//! store; each phase has its own file: `request` (start a session, send the Authorize card),
//! `redirect` (the OAuth redirect: state check, code exchange, identity check), `click` (the
//! card's buttons), `expire` (cards of expired sessions), `serve` (a user's token), `refresh`
//! (the refresh worker and refreshes in doubt), `sync` (user-info sync), `revoke`, and `routes`
//! (the HTTP routes). `render` holds the cards and pages users see.

mod click;
mod device;
mod error;
mod expire;
pub mod flow;
mod hooks;
mod options;
mod redirect;
mod refresh;
mod render;
mod request;
mod revoke;
mod routes;
mod serve;
pub mod state;
mod sync;
mod time;

pub use error::{AuthError, TokenError};
pub use flow::{AuthService, Clock};
pub use options::{redirect_uri, AuthOptions, CALLBACK_PATH};
pub use refresh::REFRESH_PROBE_AFTER;
pub use render::{page_html, CardStyle, Locale};
pub use request::{state_hash, AuthRequest, RequestOutcome, UserRef, OFFLINE_ACCESS};
pub use revoke::Revoked;
pub use serve::AccessToken;
pub use sync::{SyncGate, SyncReport};
