//! Lark/Feishu OpenAPI client: app-identity tokens, user OAuth (v2), user
//! info and directory lookups, IM messages and interactive cards, and aPaaS
//! records, built to `docs/lark-protocol.md` §1, §4, §5 and §6.
//!
//! This module owns everything that speaks HTTP to the platform's OpenAPI
//! and accounts hosts. It does not hold the long connection, store tokens or
//! sessions, or decide authorization policy. Entry point: [`LarkClient::new`]
//! with a [`LarkConfig`]; every endpoint is a method on [`LarkClient`].
//!
//! Layout: `client` (configuration, HTTP, retries), `token` (tenant/app
//! token cache), `error`, `oauth`, `card` (authorize card builders), and
//! `api::{authen, contact, im, chats, apaas}`.

pub mod api;
pub mod card;
mod client;
pub mod error;
pub mod oauth;
mod token;

pub use api::apaas::{RecordPage, RecordQuery, TablePage, TableQuery};
pub use api::authen::UserInfo;
pub use api::chats::{Chat, ChatMember, ChatMemberPage, ChatPage, PageRequest, MAX_CHAT_PAGE_SIZE};
pub use api::contact::{ContactAvatar, ContactUser, ContactUserStatus, UserIdType};
pub use api::im::{ReceiveIdType, Receiver, SentMessage};
pub use card::{AuthorizeCard, CardAction};
pub use client::{
    Domain, LarkClient, LarkConfig, RetryPolicy, DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_TOKEN_REFRESH_SHARE,
};
pub use error::{Error, OAuthErrorKind};
pub use oauth::{AuthCode, AuthorizeParams, DeviceGrant, DevicePoll, Pkce, UserToken};
pub use token::TokenStatus;
