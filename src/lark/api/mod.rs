//! One file per OpenAPI area, each an `impl LarkClient` block plus the
//! request/response types of that area: `authen` (user info with a user
//! token), `contact` (directory lookups with the tenant token), `im`
//! (messages and cards), `chats` (group chats and their members), `apaas`
//! (object records and workspace tables).

pub mod apaas;
pub mod authen;
pub mod chats;
pub mod contact;
pub mod im;
