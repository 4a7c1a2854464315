//! `im` chats API: the group chats the bot (tenant token) or a user (their user token) is in,
//! `GET /open-apis/im/v1/chats`, and one chat's members,
//! `GET /open-apis/im/v1/chats/{chat_id}/members`.
//!
//! The protocol notes do not document these endpoints; path, query and field names follow the
//! platform's public im v1 reference. Both are token paged (`page_size` at most
//! [`MAX_CHAT_PAGE_SIZE`], `page_token` from the previous page). An empty `page_token` is read
//! as none; a page that says `has_more` without a token is refused as undecodable (the caller
//! could not go on, and must not take the list for complete). Failures keep the platform's
//! code: 232006 (no such chat), 232011 (the caller is not in the chat), 232015 (bad
//! `member_id_type`), 232001 (bad parameter).

use reqwest::Method;
use secrecy::SecretString;
use serde::Deserialize;

use crate::lark::api::contact::UserIdType;
use crate::lark::client::{decode_data, seg, ApiRequest, Auth, LarkClient, RawResponse};
use crate::lark::error::Error;

/// Largest `page_size` both endpoints accept.
pub const MAX_CHAT_PAGE_SIZE: u32 = 100;

/// Which page to read: `page_size` (the platform's default, 20, when `None`) and the
/// `page_token` of the previous page (`None` for the first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageRequest {
    /// Items per page, 1..=[`MAX_CHAT_PAGE_SIZE`].
    pub page_size: Option<u32>,
    /// The previous page's `page_token`.
    pub page_token: Option<String>,
}

impl PageRequest {
    fn apply<'a>(&self, mut req: ApiRequest<'a>) -> Result<ApiRequest<'a>, Error> {
        if let Some(n) = self.page_size {
            if n == 0 || n > MAX_CHAT_PAGE_SIZE {
                return Err(Error::Config(format!(
                    "page_size must be between 1 and {MAX_CHAT_PAGE_SIZE}"
                )));
            }
            req = req.query("page_size", n.to_string());
        }
        if let Some(t) = self.page_token.as_deref().filter(|t| !t.is_empty()) {
            req = req.query("page_token", t);
        }
        Ok(req)
    }
}

/// A group chat (the fields of the list endpoint's items).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct Chat {
    /// `oc_…`.
    pub chat_id: String,
    /// Chat name.
    pub name: String,
    /// Chat description.
    pub description: String,
    /// The owner's id, of kind `owner_id_type` (empty when a bot owns the chat).
    pub owner_id: String,
    /// Kind of `owner_id` (`open_id` as asked here).
    pub owner_id_type: String,
    /// Whether the chat is an external (cross-tenant) chat.
    pub external: bool,
    /// The tenant the chat belongs to.
    pub tenant_key: String,
    /// `normal`, `dissolved` or `dissolved_save`.
    pub chat_status: String,
    /// Avatar URL.
    pub avatar: String,
}

/// One page of chats.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChatPage {
    /// The chats of this page.
    pub items: Vec<Chat>,
    /// Token of the next page (`None` on the last).
    pub page_token: Option<String>,
    /// Whether another page follows.
    pub has_more: bool,
}

/// A chat member (bots are not listed by the platform).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct ChatMember {
    /// Kind of `member_id`, as asked.
    pub member_id_type: String,
    /// The member's id.
    pub member_id: String,
    /// Display name.
    pub name: String,
    /// The member's tenant.
    pub tenant_key: String,
}

/// One page of a chat's members.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChatMemberPage {
    /// The members of this page.
    pub items: Vec<ChatMember>,
    /// Token of the next page (`None` on the last).
    pub page_token: Option<String>,
    /// Whether another page follows.
    pub has_more: bool,
    /// How many members the chat has (bots not counted).
    pub member_total: u64,
}

#[derive(Deserialize)]
struct PageData<T> {
    #[serde(default = "Vec::new")]
    items: Vec<T>,
    #[serde(default)]
    page_token: Option<String>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    member_total: Option<u64>,
}

/// The next page's token; `has_more` without one is an error (the list cannot go on).
fn next_token(
    raw: &RawResponse,
    has_more: bool,
    token: Option<String>,
) -> Result<Option<String>, Error> {
    let token = token.filter(|t| !t.is_empty());
    if has_more && token.is_none() {
        return Err(Error::Decode {
            reason: "`has_more` without a `page_token`".to_owned(),
            status: raw.status,
            log_id: raw.header_log_id(),
        });
    }
    Ok(if has_more { token } else { None })
}

fn decode_chats(raw: &RawResponse) -> Result<ChatPage, Error> {
    let d: PageData<Chat> = decode_data(raw)?;
    Ok(ChatPage {
        page_token: next_token(raw, d.has_more, d.page_token)?,
        has_more: d.has_more,
        items: d.items,
    })
}

fn decode_members(raw: &RawResponse) -> Result<ChatMemberPage, Error> {
    let d: PageData<ChatMember> = decode_data(raw)?;
    let Some(member_total) = d.member_total else {
        return Err(Error::Decode {
            reason: "members page has no `member_total`".to_owned(),
            status: raw.status,
            log_id: raw.header_log_id(),
        });
    };
    Ok(ChatMemberPage {
        page_token: next_token(raw, d.has_more, d.page_token)?,
        has_more: d.has_more,
        member_total,
        items: d.items,
    })
}

fn auth(user_token: Option<&SecretString>) -> Auth<'_> {
    user_token.map_or(Auth::Tenant, Auth::User)
}

impl LarkClient {
    /// `GET /open-apis/im/v1/chats?user_id_type=open_id`: one page of the chats the bot is in
    /// (tenant token), or with `user_token` the chats that user is in. Owners are named by
    /// open_id.
    pub async fn chats(
        &self,
        page: &PageRequest,
        user_token: Option<&SecretString>,
    ) -> Result<ChatPage, Error> {
        let req = ApiRequest::new(
            Method::GET,
            "/open-apis/im/v1/chats".to_owned(),
            auth(user_token),
        )
        .query("user_id_type", UserIdType::OpenId.as_str());
        let req = page.apply(req)?;
        self.execute(&req, decode_chats).await
    }

    /// `GET /open-apis/im/v1/chats/{chat_id}/members?member_id_type=…`: one page of a chat's
    /// members, read as the bot (tenant token) or with `user_token` as that user; the caller
    /// must be in the chat (else 232011), and an unknown chat is 232006.
    pub async fn chat_members(
        &self,
        chat_id: &str,
        member_id_type: UserIdType,
        page: &PageRequest,
        user_token: Option<&SecretString>,
    ) -> Result<ChatMemberPage, Error> {
        let req = ApiRequest::new(
            Method::GET,
            format!("/open-apis/im/v1/chats/{}/members", seg(chat_id)?),
            auth(user_token),
        )
        .query("member_id_type", member_id_type.as_str());
        let req = page.apply(req)?;
        self.execute(&req, decode_members).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use reqwest::header::{HeaderMap, HeaderValue};

    use super::*;

    fn raw(status: u16, body: &str) -> RawResponse {
        let mut headers = HeaderMap::new();
        headers.insert("x-tt-logid", HeaderValue::from_static("LOGC"));
        RawResponse {
            status,
            headers,
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn a_chat_list_page_is_read_with_its_token() {
        let p = decode_chats(&raw(
            200,
            r#"{"code":0,"msg":"success","data":{"items":[
                {"avatar":"https://a/x.png","chat_id":"oc_a","description":"d","external":false,
                 "name":"A","owner_id":"ou_1","owner_id_type":"open_id","tenant_key":"t1",
                 "chat_status":"normal","labels":[]},
                {"chat_id":"oc_b","name":"B","external":true,"owner_id":"","tenant_key":"t2"}
            ],"page_token":"next-1","has_more":true}}"#,
        ))
        .unwrap();
        assert_eq!(p.items.len(), 2);
        assert_eq!(p.items[0].chat_id, "oc_a");
        assert_eq!(p.items[0].owner_id, "ou_1");
        assert_eq!(p.items[0].chat_status, "normal");
        assert!(!p.items[0].external);
        assert_eq!(p.items[1].name, "B");
        assert!(p.items[1].external, "external is read");
        assert_eq!(p.items[1].description, "", "missing fields default");
        assert!(p.has_more);
        assert_eq!(p.page_token.as_deref(), Some("next-1"));
    }

    #[test]
    fn the_last_page_has_no_token_even_if_one_is_sent() {
        let p = decode_chats(&raw(
            200,
            r#"{"code":0,"data":{"items":[],"page_token":"stale","has_more":false}}"#,
        ))
        .unwrap();
        assert!(p.items.is_empty());
        assert!(!p.has_more);
        assert_eq!(p.page_token, None);
        let p = decode_chats(&raw(200, r#"{"code":0,"data":{"has_more":false}}"#)).unwrap();
        assert!(p.items.is_empty(), "no items field: an empty page");
    }

    #[test]
    fn has_more_without_a_token_is_refused() {
        for body in [
            r#"{"code":0,"data":{"items":[],"page_token":"","has_more":true}}"#,
            r#"{"code":0,"data":{"items":[],"has_more":true}}"#,
        ] {
            let e = decode_chats(&raw(200, body)).unwrap_err();
            assert!(matches!(e, Error::Decode { .. }), "{body}: {e:?}");
        }
    }

    #[test]
    fn a_members_page_is_read_with_its_total() {
        let p = decode_members(&raw(
            200,
            r#"{"code":0,"msg":"success","data":{"items":[
                {"member_id_type":"open_id","member_id":"ou_1","name":"Alice","tenant_key":"t1"},
                {"member_id_type":"open_id","member_id":"ou_2","name":"Bob","tenant_key":"t1"}
            ],"page_token":"p2","has_more":true,"member_total":5}}"#,
        ))
        .unwrap();
        assert_eq!(p.member_total, 5);
        assert_eq!(p.items[1].member_id, "ou_2");
        assert_eq!(p.items[1].name, "Bob");
        assert_eq!(p.items[0].member_id_type, "open_id");
        assert_eq!(p.page_token.as_deref(), Some("p2"));
        let e = decode_members(&raw(
            200,
            r#"{"code":0,"data":{"items":[],"has_more":false}}"#,
        ))
        .unwrap_err();
        assert!(matches!(e, Error::Decode { .. }), "no member_total: {e:?}");
    }

    #[test]
    fn platform_errors_keep_their_code() {
        let e = decode_members(&raw(
            400,
            r#"{"code":232006,"msg":"Your request specifies a chat_id which is invalid."}"#,
        ))
        .unwrap_err();
        assert_eq!(e.code(), Some(232_006));
        assert_eq!(e.log_id(), Some("LOGC"));
        let e = decode_chats(&raw(
            400,
            r#"{"code":99991663,"msg":"Invalid access token"}"#,
        ))
        .unwrap_err();
        assert_eq!(e.code(), Some(99_991_663));
    }

    #[test]
    fn page_parameters_are_checked_and_sent() {
        let req = |p: &PageRequest| {
            p.apply(ApiRequest::new(Method::GET, "/x".to_owned(), Auth::Tenant))
                .map(|r| r.query)
        };
        assert_eq!(req(&PageRequest::default()).unwrap(), vec![]);
        assert_eq!(
            req(&PageRequest {
                page_size: Some(100),
                page_token: Some("t".into()),
            })
            .unwrap(),
            vec![
                ("page_size", "100".to_owned()),
                ("page_token", "t".to_owned())
            ]
        );
        assert_eq!(
            req(&PageRequest {
                page_size: None,
                page_token: Some(String::new()),
            })
            .unwrap(),
            vec![],
            "an empty token is the first page"
        );
        for bad in [0, 101] {
            assert!(matches!(
                req(&PageRequest {
                    page_size: Some(bad),
                    page_token: None,
                }),
                Err(Error::Config(_))
            ));
        }
    }
}
