//! The sandbox's group chats: `GET /open-apis/im/v1/chats` (the chats the caller is in: the
//! bot with the tenant token, a user with their user token) and
//! `GET /open-apis/im/v1/chats/{chat_id}/members`.
//!
//! The chats are seeded from the sandbox users (see [`seeded`]): four the bot is in, one
//! (`oc_sandbox_private`) it is not. Both endpoints page with `page_size` (1..=100, default
//! 20) and an opaque `page_token`. Errors, as the platform answers them (HTTP 400):
//! - 232006 "Your request specifies a chat_id which is invalid." — no such chat;
//! - 232011 "Operator can NOT be out of the chat." — the caller is not a member;
//! - 232015 — a `member_id_type` other than open_id, user_id, union_id;
//! - 232001 — a bad `page_size` or `page_token`;
//! - 99991663 / 99991668 / 99991677 — a bad tenant or user token, as elsewhere.
//!
//! Bots are not listed among members, as on the platform. Endpoint group for
//! [`super::Sandbox::fail_next`]: `chats`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::platform::{bearer, hit, tenant_ok, unauthorized, user_token_owner, Refusal};
use super::{SandboxUser, Shared};

/// Largest `page_size`.
const MAX_PAGE_SIZE: usize = 100;
/// `page_size` when none is given.
const DEFAULT_PAGE_SIZE: usize = 20;
/// No such chat.
pub const CODE_CHAT_NOT_FOUND: i64 = 232_006;
/// The caller is not in the chat.
pub const CODE_NOT_IN_CHAT: i64 = 232_011;
/// A bad `member_id_type`.
const CODE_BAD_ID_TYPE: i64 = 232_015;
/// A bad parameter.
const CODE_PARAM_INVALID: i64 = 232_001;
/// The prefix of this sandbox's page tokens (an offset follows).
const TOKEN_PREFIX: &str = "sbx-chat-page-";

/// A seeded group chat.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SandboxChat {
    /// `oc_…`.
    pub chat_id: String,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Owner's open_id.
    pub owner_open_id: String,
    /// A cross-tenant chat.
    pub external: bool,
    /// Whether the app's bot is a member.
    pub bot_member: bool,
    /// The members' open_ids (bots are not members here).
    pub members: Vec<String>,
}

/// The seeded chats over `users` (alice, bob, carol first, then any extra users):
/// - `oc_sandbox_general` "Sandbox General": everyone, owned by alice;
/// - `oc_sandbox_eng` "Engineering": alice, bob;
/// - `oc_sandbox_ops` "Operations": bob, carol;
/// - `oc_sandbox_partners` "Partners": alice, carol, external;
/// - `oc_sandbox_private` "Alice and Carol": alice, carol, without the bot.
#[must_use]
pub fn seeded(users: &[SandboxUser]) -> Vec<SandboxChat> {
    let id = |i: usize| users.get(i).map(|u| u.open_id.clone());
    let pick = |idx: &[usize]| idx.iter().filter_map(|&i| id(i)).collect::<Vec<_>>();
    let chat = |chat_id: &str, name: &str, owner: usize, external, bot, members: Vec<String>| {
        SandboxChat {
            chat_id: chat_id.to_owned(),
            name: name.to_owned(),
            description: format!("{name} (sandbox chat)"),
            owner_open_id: id(owner).unwrap_or_default(),
            external,
            bot_member: bot,
            members,
        }
    };
    vec![
        chat(
            "oc_sandbox_general",
            "Sandbox General",
            0,
            false,
            true,
            users.iter().map(|u| u.open_id.clone()).collect(),
        ),
        chat(
            "oc_sandbox_eng",
            "Engineering",
            1,
            false,
            true,
            pick(&[0, 1]),
        ),
        chat(
            "oc_sandbox_ops",
            "Operations",
            2,
            false,
            true,
            pick(&[1, 2]),
        ),
        chat(
            "oc_sandbox_partners",
            "Partners",
            0,
            true,
            true,
            pick(&[0, 2]),
        ),
        chat(
            "oc_sandbox_private",
            "Alice and Carol",
            0,
            false,
            false,
            pick(&[0, 2]),
        ),
    ]
}

pub(crate) fn router(s: Arc<Shared>) -> Router {
    Router::new()
        .route("/open-apis/im/v1/chats", get(list_chats))
        .route(
            "/open-apis/im/v1/chats/{chat_id}/members",
            get(list_members),
        )
        .with_state(s)
}

/// Who is asking.
enum Caller {
    Bot,
    User(String),
}

impl Caller {
    fn is_in(&self, c: &SandboxChat) -> bool {
        match self {
            Self::Bot => c.bot_member,
            Self::User(open_id) => c.members.contains(open_id),
        }
    }
}

/// Counts the hit (which may inject a failure), then reads the token: a user access token
/// this sandbox issued names its user; anything else must be a live tenant token (else
/// 99991663, which makes the client fetch a new one).
fn caller(s: &Shared, h: &HeaderMap) -> Result<Caller, Refusal> {
    if let Some(r) = hit(s, "chats") {
        return Err(r.into());
    }
    let Some(tok) = bearer(h) else {
        return Err(unauthorized().into());
    };
    if s.lock().access.contains_key(&tok) {
        return user_token_owner(s, &tok)
            .map(Caller::User)
            .map_err(|r| Refusal::from(*r));
    }
    if tenant_ok(s, h) {
        Ok(Caller::Bot)
    } else {
        Err(unauthorized().into())
    }
}

fn refuse(code: i64, msg: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"code": code, "msg": msg})),
    )
        .into_response()
}

/// Reads `page_size` and `page_token` and cuts `all` into the page they ask for:
/// `(items, next page_token or "", has_more)`.
fn page<T: Clone>(q: &[(String, String)], all: &[T]) -> Result<(Vec<T>, String, bool), Refusal> {
    let get = |k: &str| q.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str());
    let size = match get("page_size").map(str::parse::<usize>) {
        None => DEFAULT_PAGE_SIZE,
        Some(Ok(n)) if (1..=MAX_PAGE_SIZE).contains(&n) => n,
        Some(_) => {
            return Err(refuse(CODE_PARAM_INVALID, "page_size must be between 1 and 100").into())
        }
    };
    let start = match get("page_token").filter(|t| !t.is_empty()) {
        None => 0,
        Some(t) => match t
            .strip_prefix(TOKEN_PREFIX)
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) if n <= all.len() => n,
            _ => return Err(refuse(CODE_PARAM_INVALID, "page_token is invalid").into()),
        },
    };
    let items: Vec<T> = all.iter().skip(start).take(size).cloned().collect();
    let end = start.saturating_add(items.len());
    let has_more = end < all.len();
    let token = if has_more {
        format!("{TOKEN_PREFIX}{end}")
    } else {
        String::new()
    };
    Ok((items, token, has_more))
}

async fn list_chats(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Query(q): Query<Vec<(String, String)>>,
) -> Response {
    let who = match caller(&s, &h) {
        Ok(c) => c,
        Err(r) => return r.into_response(),
    };
    let users = s.lock().users.clone();
    let mine: Vec<SandboxChat> = seeded(&users)
        .into_iter()
        .filter(|c| who.is_in(c))
        .collect();
    let (items, page_token, has_more) = match page(&q, &mine) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let items: Vec<Value> = items
        .iter()
        .map(|c| {
            json!({
                "avatar": format!("https://sandbox.example/chat/{}.png", c.chat_id),
                "chat_id": c.chat_id,
                "name": c.name,
                "description": c.description,
                "owner_id": c.owner_open_id,
                "owner_id_type": "open_id",
                "external": c.external,
                "tenant_key": "sandbox",
                "chat_status": "normal",
            })
        })
        .collect();
    Json(json!({"code": 0, "msg": "success", "data": {
        "items": items, "page_token": page_token, "has_more": has_more,
    }}))
    .into_response()
}

async fn list_members(
    State(s): State<Arc<Shared>>,
    h: HeaderMap,
    Path(chat_id): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
) -> Response {
    let who = match caller(&s, &h) {
        Ok(c) => c,
        Err(r) => return r.into_response(),
    };
    let id_type = q
        .iter()
        .find(|(k, _)| k == "member_id_type")
        .map_or("open_id", |(_, v)| v.as_str());
    if !matches!(id_type, "open_id" | "user_id" | "union_id") {
        return refuse(
            CODE_BAD_ID_TYPE,
            "Your request specifies a member_id_type which is NOT supported.",
        );
    }
    let users = s.lock().users.clone();
    let Some(chat) = seeded(&users).into_iter().find(|c| c.chat_id == chat_id) else {
        return refuse(
            CODE_CHAT_NOT_FOUND,
            "Your request specifies a chat_id which is invalid.",
        );
    };
    if !who.is_in(&chat) {
        return refuse(CODE_NOT_IN_CHAT, "Operator can NOT be out of the chat.");
    }
    let members: Vec<&SandboxUser> = chat
        .members
        .iter()
        .filter_map(|m| users.iter().find(|u| &u.open_id == m))
        .collect();
    let (items, page_token, has_more) = match page(&q, &members) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let items: Vec<Value> = items
        .iter()
        .map(|u| {
            let id = match id_type {
                "user_id" => &u.user_id,
                "union_id" => &u.union_id,
                _ => &u.open_id,
            };
            json!({"member_id_type": id_type, "member_id": id, "name": u.name, "tenant_key": "sandbox"})
        })
        .collect();
    Json(json!({"code": 0, "msg": "success", "data": {
        "items": items, "page_token": page_token, "has_more": has_more,
        "member_total": members.len(),
    }}))
    .into_response()
}

impl super::Sandbox {
    /// The seeded group chats (see [`seeded`]), as the chat endpoints serve them.
    #[must_use]
    pub fn chats(&self) -> Vec<SandboxChat> {
        seeded(&self.shared.lock().users)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn pages_follow_their_tokens_to_the_end() {
        let all: Vec<u32> = (0..5).collect();
        let (a, t, more) = page(&q(&[("page_size", "2")]), &all).ok().unwrap();
        assert_eq!((a, more), (vec![0, 1], true));
        let (b, t, more) = page(&q(&[("page_size", "2"), ("page_token", &t)]), &all)
            .ok()
            .unwrap();
        assert_eq!((b, more), (vec![2, 3], true));
        let (c, t, more) = page(&q(&[("page_size", "2"), ("page_token", &t)]), &all)
            .ok()
            .unwrap();
        assert_eq!((c, more, t.as_str()), (vec![4], false, ""));
        let (d, _, more) = page(&q(&[]), &all).ok().unwrap();
        assert_eq!((d.len(), more), (5, false), "default size 20");
    }

    #[test]
    fn bad_page_parameters_are_refused() {
        let all: Vec<u32> = (0..3).collect();
        for bad in [
            q(&[("page_size", "0")]),
            q(&[("page_size", "101")]),
            q(&[("page_size", "x")]),
            q(&[("page_token", "nope")]),
            q(&[("page_token", "sbx-chat-page-4")]),
        ] {
            assert!(page(&bad, &all).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_bot_is_not_in_the_private_chat_and_members_are_users() {
        let users = crate::sandbox::platform::default_users(1);
        let chats = seeded(&users);
        let private = chats
            .iter()
            .find(|c| c.chat_id == "oc_sandbox_private")
            .unwrap();
        assert!(!private.bot_member);
        assert!(!Caller::Bot.is_in(private));
        assert!(Caller::User("ou_sandbox_alice".into()).is_in(private));
        let general = &chats[0];
        assert_eq!(general.members.len(), 4, "every user, extras too");
        for c in &chats {
            for m in &c.members {
                assert!(users.iter().any(|u| &u.open_id == m), "{m}");
            }
        }
    }
}
