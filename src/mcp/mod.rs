//! MCP endpoint (issue 10): the service's Lark operations as Model Context Protocol tools,
//! built on the official Rust SDK `rmcp`.
//!
//! [`McpServer`] is the `rmcp` server handler; its tools send messages and cards, look users
//! up, list group chats and their members, read and write aPaaS records, and start / inspect
//! card authorization. It is served over streamable HTTP at `/mcp` by [`router`] (behind a
//! bearer token, checked before any MCP handling) and over stdio by `lark-service mcp --stdio`.
//!
//! Every failure a tool meets is returned as a tool error (`isError: true`) whose text is a
//! JSON object with `error` and, for platform errors, the Lark `code` and `log_id`. Inputs are
//! validated before any call and a bad one is named in the error. No token or secret is ever
//! put into a result.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{schemars, tool, tool_handler, tool_router, ErrorData, ServerHandler};
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthError, AuthRequest, AuthService, TokenError, UserRef};
use crate::lark::{
    self, LarkClient, PageRequest, ReceiveIdType, Receiver, RecordQuery, UserIdType,
};
use crate::storage::{Db, SessionId};

/// Longest id (receive id, user id, namespace, object, record id) a tool accepts, in chars.
pub const MAX_ID_CHARS: usize = 256;
/// Largest message text a tool accepts, in bytes.
pub const MAX_TEXT_BYTES: usize = 150 * 1024;
/// Most fields an aPaaS `select` may name.
const MAX_SELECT: usize = 200;

/// The MCP server: the service's Lark client, authorization service and store.
#[derive(Clone)]
pub struct McpServer {
    lark: LarkClient,
    auth: AuthService,
    store: Db,
    tool_router: ToolRouter<Self>,
}

impl std::fmt::Debug for McpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpServer")
            .field("app_id", &self.lark.app_id())
            .finish_non_exhaustive()
    }
}

type ToolResult = Result<CallToolResult, ErrorData>;

/// A tool failure, rendered as a tool error.
struct Failure(Value);

impl Failure {
    fn invalid(field: &str, reason: impl Into<String>) -> Self {
        let reason = reason.into();
        Self(json!({
            "error": format!("invalid {field}: {reason}"),
            "field": field,
        }))
    }

    fn lark(op: &str, e: &lark::Error) -> Self {
        let mut v = json!({ "error": format!("{op} failed: {e}") });
        if let Some(code) = e.code() {
            v["code"] = json!(code);
        }
        if let Some(msg) = e.msg() {
            v["msg"] = json!(msg);
        }
        if let Some(log_id) = e.log_id() {
            v["log_id"] = json!(log_id);
        }
        Self(v)
    }

    fn other(msg: impl Into<String>) -> Self {
        Self(json!({ "error": msg.into() }))
    }
}

fn ok(v: &Value) -> ToolResult {
    Ok(CallToolResult::success(vec![ContentBlock::text(
        v.to_string(),
    )]))
}

fn finish(r: Result<Value, Failure>) -> ToolResult {
    match r {
        Ok(v) => ok(&v),
        Err(Failure(v)) => Ok(CallToolResult::error(vec![ContentBlock::text(
            v.to_string(),
        )])),
    }
}

fn check_id(field: &str, v: &str) -> Result<(), Failure> {
    if v.trim().is_empty() {
        return Err(Failure::invalid(field, "must not be empty"));
    }
    if v.chars().count() > MAX_ID_CHARS {
        return Err(Failure::invalid(
            field,
            format!("longer than {MAX_ID_CHARS} characters"),
        ));
    }
    Ok(())
}

fn check_object(field: &str, v: &Value) -> Result<(), Failure> {
    if v.is_object() {
        Ok(())
    } else {
        Err(Failure::invalid(field, "must be a JSON object"))
    }
}

fn receive_id_type(v: &str) -> Result<ReceiveIdType, Failure> {
    Ok(match v {
        "open_id" => ReceiveIdType::OpenId,
        "user_id" => ReceiveIdType::UserId,
        "union_id" => ReceiveIdType::UnionId,
        "email" => ReceiveIdType::Email,
        "chat_id" => ReceiveIdType::ChatId,
        _ => {
            return Err(Failure::invalid(
                "receive_id_type",
                "one of open_id, user_id, union_id, email, chat_id",
            ))
        }
    })
}

fn receiver(id_type: &str, id: &str) -> Result<Receiver, Failure> {
    let id_type = receive_id_type(id_type)?;
    check_id("receive_id", id)?;
    Ok(Receiver {
        id_type,
        id: id.to_owned(),
    })
}

fn user_ref(field: &str, id_type: &str, id: &str) -> Result<UserRef, Failure> {
    check_id("id", id)?;
    match id_type {
        "open_id" => Ok(UserRef::OpenId(id.to_owned())),
        "user_id" => Ok(UserRef::UserId(id.to_owned())),
        _ => Err(Failure::invalid(field, "one of open_id, user_id")),
    }
}

fn check_select(select: &[String]) -> Result<(), Failure> {
    if select.len() > MAX_SELECT {
        return Err(Failure::invalid(
            "select",
            format!("at most {MAX_SELECT} fields"),
        ));
    }
    for f in select {
        check_id("select", f)?;
    }
    Ok(())
}

fn check_object_ref(namespace: &str, object: &str) -> Result<(), Failure> {
    check_id("namespace", namespace)?;
    check_id("object", object)
}

fn sent(m: &lark::SentMessage) -> Value {
    json!({
        "message_id": m.message_id,
        "chat_id": m.chat_id,
        "msg_type": m.msg_type,
        "create_time": m.create_time,
    })
}

fn default_open_id() -> String {
    "open_id".to_owned()
}

/// `send_message` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct SendMessageParams {
    /// Kind of `receive_id`: open_id, user_id, union_id, email or chat_id (default chat_id, as
    /// the earlier MCP deployment's tool).
    #[serde(default = "default_chat_id")]
    pub receive_id_type: String,
    /// The user's or chat's id (at most 256 characters).
    pub receive_id: String,
    /// The message text (at most 150 KB). Or, as the earlier MCP deployment's tool:
    /// `msg_type` and `content`.
    #[serde(default)]
    pub text: Option<String>,
    /// With `content`: text (default), post or interactive.
    #[serde(default)]
    pub msg_type: Option<String>,
    /// With `msg_type`: for text, the text or its JSON `{"text": …}`; for post and interactive,
    /// the JSON object (or its JSON text).
    #[serde(default)]
    pub content: Option<Value>,
}

fn default_chat_id() -> String {
    "chat_id".to_owned()
}

/// `get_user_info` arguments (the earlier MCP deployment's tool): one of the ids.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct GetUserInfoParams {
    /// The user's open_id.
    #[serde(default)]
    pub open_id: Option<String>,
    /// The user's user_id.
    #[serde(default)]
    pub user_id: Option<String>,
    /// The user's union_id.
    #[serde(default)]
    pub union_id: Option<String>,
    /// The user's email.
    #[serde(default)]
    pub email: Option<String>,
}

/// What `send_message` sends, from its arguments.
#[derive(Debug, PartialEq)]
enum Outgoing {
    Text(String),
    Post(Value),
    Card(Value),
}

/// Reads `send_message`'s arguments: `text`, or `msg_type` + `content`.
fn outgoing(p: &SendMessageParams) -> Result<Outgoing, Failure> {
    let text = |t: &str| {
        if t.is_empty() {
            return Err(Failure::invalid("text", "must not be empty"));
        }
        if t.len() > MAX_TEXT_BYTES {
            return Err(Failure::invalid(
                "text",
                format!("longer than {MAX_TEXT_BYTES} bytes"),
            ));
        }
        Ok(Outgoing::Text(t.to_owned()))
    };
    let object = |field: &str, v: &Value| -> Result<Value, Failure> {
        let v = match v {
            Value::String(s) => serde_json::from_str(s)
                .map_err(|_| Failure::invalid(field, "must be a JSON object (or its text)"))?,
            v => v.clone(),
        };
        check_object(field, &v)?;
        Ok(v)
    };
    match (&p.text, &p.content) {
        (Some(_), Some(_)) => Err(Failure::invalid(
            "content",
            "give text or content, not both",
        )),
        (Some(t), None) => text(t),
        (None, None) => Err(Failure::invalid("text", "must not be empty")),
        (None, Some(c)) => match p.msg_type.as_deref().unwrap_or("text") {
            "text" => {
                // The JSON `{"text": …}` (an object, or its text), else the text itself.
                let parsed;
                let json = match c {
                    Value::String(s) => match serde_json::from_str::<Value>(s) {
                        Ok(v @ Value::Object(_)) => {
                            parsed = v;
                            &parsed
                        }
                        _ => return text(s),
                    },
                    v => v,
                };
                match json {
                    Value::Object(o) => match o.get("text") {
                        Some(Value::String(t)) => text(t),
                        _ => Err(Failure::invalid(
                            "content",
                            "a text message's JSON has a \"text\" string",
                        )),
                    },
                    _ => Err(Failure::invalid("content", "the text, or {\"text\": …}")),
                }
            }
            "post" => Ok(Outgoing::Post(object("content", c)?)),
            "interactive" => Ok(Outgoing::Card(object("content", c)?)),
            _ => Err(Failure::invalid("msg_type", "text, post or interactive")),
        },
    }
}

/// `send_card` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct SendCardParams {
    /// Kind of `receive_id`: open_id, user_id, union_id, email or chat_id.
    pub receive_id_type: String,
    /// The user's or chat's id (at most 256 characters).
    pub receive_id: String,
    /// The interactive card JSON (an object; at most 30 KB serialised).
    pub card: Value,
}

/// `get_user` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct GetUserParams {
    /// The user's id.
    pub id: String,
    /// Kind of `id`: open_id (default), user_id, union_id or email. With `as_user`, open_id or
    /// user_id.
    #[serde(default = "default_open_id")]
    pub id_type: String,
    /// Read the user's own profile with their authorized token instead of the directory.
    #[serde(default)]
    pub as_user: bool,
}

/// `apaas_query_records` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ApaasQueryParams {
    /// The aPaaS application namespace.
    pub namespace: String,
    /// The object API name.
    pub object: String,
    /// Field API names to return.
    #[serde(default)]
    pub select: Vec<String>,
    /// Filter object (`{"conditions": [...], "logic_expression": ...}`), as documented.
    #[serde(default)]
    pub filter: Option<Value>,
    /// Page size (at most 500; default 100).
    #[serde(default)]
    pub page_size: Option<u32>,
    /// `next_page_token` of the previous page.
    #[serde(default)]
    pub page_token: Option<String>,
}

/// `apaas_get_record` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ApaasGetParams {
    /// The aPaaS application namespace.
    pub namespace: String,
    /// The object API name.
    pub object: String,
    /// The record id.
    pub id: String,
    /// Field API names to return.
    #[serde(default)]
    pub select: Vec<String>,
}

/// `apaas_create_record` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ApaasCreateParams {
    /// The aPaaS application namespace.
    pub namespace: String,
    /// The object API name.
    pub object: String,
    /// The record: an object of field API name to value.
    pub record: Value,
}

/// `apaas_update_record` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ApaasUpdateParams {
    /// The aPaaS application namespace.
    pub namespace: String,
    /// The object API name.
    pub object: String,
    /// The record id.
    pub id: String,
    /// Fields to change: an object of field API name to value.
    pub record: Value,
}

/// `request_user_authorization` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct RequestAuthorizationParams {
    /// The user's id.
    pub id: String,
    /// Kind of `id`: open_id (default) or user_id.
    #[serde(default = "default_open_id")]
    pub id_type: String,
    /// Scopes to ask for (offline_access is always added).
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// `revoke_user_token` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct RevokeUserTokenParams {
    /// The user's id.
    pub id: String,
    /// Kind of `id`: open_id (default) or user_id.
    #[serde(default = "default_open_id")]
    pub id_type: String,
}

/// `authorization_status` arguments.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct AuthorizationStatusParams {
    /// Session id returned by request_user_authorization (32 hex characters).
    pub session_id: String,
}

/// `get_chat_list` arguments (the earlier MCP deployment's tool).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct GetChatListParams {
    /// Chats per page (1 to 100; the platform's default, 20, when not given).
    #[serde(default)]
    pub page_size: Option<u32>,
    /// `page_token` of the previous page (none for the first page).
    #[serde(default)]
    pub page_token: Option<String>,
    /// List the chats this user is in, with their authorized token (their open_id, or their
    /// user_id with `as_user_id_type`), instead of the chats the bot is in.
    #[serde(default)]
    pub as_user: Option<String>,
    /// Kind of `as_user`: open_id (default) or user_id.
    #[serde(default = "default_open_id")]
    pub as_user_id_type: String,
}

/// `get_chat_members` arguments (the earlier MCP deployment's tool).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct GetChatMembersParams {
    /// The chat's id (`oc_…`).
    pub chat_id: String,
    /// Kind of the member ids returned: open_id (default), user_id or union_id.
    #[serde(default = "default_open_id")]
    pub member_id_type: String,
    /// Members per page (1 to 100; the platform's default, 20, when not given).
    #[serde(default)]
    pub page_size: Option<u32>,
    /// `page_token` of the previous page (none for the first page).
    #[serde(default)]
    pub page_token: Option<String>,
    /// Read the members as this user, with their authorized token (their open_id, or their
    /// user_id with `as_user_id_type`); they must be in the chat. Without it, as the bot.
    #[serde(default)]
    pub as_user: Option<String>,
    /// Kind of `as_user`: open_id (default) or user_id.
    #[serde(default = "default_open_id")]
    pub as_user_id_type: String,
}

/// Reads a chat tool's `page_size` and `page_token`.
fn chat_page(page_size: Option<u32>, page_token: Option<String>) -> Result<PageRequest, Failure> {
    if let Some(n) = page_size {
        if n == 0 || n > lark::MAX_CHAT_PAGE_SIZE {
            return Err(Failure::invalid(
                "page_size",
                format!("between 1 and {}", lark::MAX_CHAT_PAGE_SIZE),
            ));
        }
    }
    if let Some(t) = &page_token {
        check_id("page_token", t)?;
    }
    Ok(PageRequest {
        page_size,
        page_token,
    })
}

fn member_id_type(v: &str) -> Result<UserIdType, Failure> {
    match v {
        "open_id" => Ok(UserIdType::OpenId),
        "user_id" => Ok(UserIdType::UserId),
        "union_id" => Ok(UserIdType::UnionId),
        _ => Err(Failure::invalid(
            "member_id_type",
            "one of open_id, user_id, union_id",
        )),
    }
}

fn chat_json(c: &lark::Chat) -> Value {
    json!({
        "chat_id": c.chat_id,
        "name": c.name,
        "description": c.description,
        "owner_id": c.owner_id,
        "owner_id_type": c.owner_id_type,
        "external": c.external,
        "tenant_key": c.tenant_key,
        "chat_status": c.chat_status,
        "avatar": c.avatar,
    })
}

fn member_json(m: &lark::ChatMember) -> Value {
    json!({
        "member_id_type": m.member_id_type,
        "member_id": m.member_id,
        "name": m.name,
        "tenant_key": m.tenant_key,
    })
}

impl McpServer {
    /// With `as_user`, that user's access token (or the tool error that sends them the
    /// Authorize card); without, `None`: the call is made as the bot.
    async fn acting_user(
        &self,
        as_user: Option<&str>,
        id_type: &str,
    ) -> Result<Option<SecretString>, Failure> {
        let Some(id) = as_user else {
            return Ok(None);
        };
        check_id("as_user", id)?;
        let user = user_ref("as_user_id_type", id_type, id)?;
        match self.auth.user_token(user.clone()).await {
            Ok(t) => Ok(Some(t)),
            Err(e) => Err(self.not_authorized(&user, e).await),
        }
    }

    async fn do_get_chat_list(&self, p: GetChatListParams) -> Result<Value, Failure> {
        let page = chat_page(p.page_size, p.page_token)?;
        let token = self
            .acting_user(p.as_user.as_deref(), &p.as_user_id_type)
            .await?;
        let got = self
            .lark
            .chats(&page, token.as_ref())
            .await
            .map_err(|e| Failure::lark("get_chat_list", &e))?;
        Ok(json!({
            "source": if token.is_some() { "user_token" } else { "bot" },
            "items": got.items.iter().map(chat_json).collect::<Vec<_>>(),
            "page_token": got.page_token,
            "has_more": got.has_more,
        }))
    }

    async fn do_get_chat_members(&self, p: GetChatMembersParams) -> Result<Value, Failure> {
        check_id("chat_id", &p.chat_id)?;
        let id_type = member_id_type(&p.member_id_type)?;
        let page = chat_page(p.page_size, p.page_token)?;
        let token = self
            .acting_user(p.as_user.as_deref(), &p.as_user_id_type)
            .await?;
        let got = self
            .lark
            .chat_members(&p.chat_id, id_type, &page, token.as_ref())
            .await
            .map_err(|e| match e {
                lark::Error::Config(reason) => Failure::invalid("chat_id", reason),
                e => Failure::lark("get_chat_members", &e),
            })?;
        Ok(json!({
            "source": if token.is_some() { "user_token" } else { "bot" },
            "chat_id": p.chat_id,
            "items": got.items.iter().map(member_json).collect::<Vec<_>>(),
            "member_total": got.member_total,
            "page_token": got.page_token,
            "has_more": got.has_more,
        }))
    }
}

impl McpServer {
    /// A server over the service's client, authorization service and store.
    #[must_use]
    pub fn new(lark: LarkClient, auth: AuthService, store: impl Into<Db>) -> Self {
        let store: Db = store.into();
        Self {
            lark,
            auth,
            store,
            tool_router: Self::tool_router(),
        }
    }

    async fn do_get_user(&self, p: GetUserParams) -> Result<Value, Failure> {
        if p.as_user {
            let user = user_ref("id_type", &p.id_type, &p.id)?;
            let token = match self.auth.user_token(user.clone()).await {
                Ok(t) => t,
                Err(e) => return Err(self.not_authorized(&user, e).await),
            };
            let u = self
                .lark
                .user_info(&token)
                .await
                .map_err(|e| Failure::lark("user_info", &e))?;
            return Ok(json!({
                "source": "user_token",
                "open_id": u.open_id,
                "union_id": u.union_id,
                "user_id": u.user_id,
                "tenant_key": u.tenant_key,
                "name": u.name,
                "en_name": u.en_name,
                "email": u.email,
                "enterprise_email": u.enterprise_email,
                "mobile": u.mobile,
                "employee_no": u.employee_no,
                "avatar_url": u.avatar_url,
            }));
        }
        check_id("id", &p.id)?;
        let (id, id_type) = match p.id_type.as_str() {
            "open_id" => (p.id.clone(), UserIdType::OpenId),
            "user_id" => (p.id.clone(), UserIdType::UserId),
            "union_id" => (p.id.clone(), UserIdType::UnionId),
            "email" => {
                let found = self
                    .lark
                    .user_id_by_email(&p.id, UserIdType::OpenId)
                    .await
                    .map_err(|e| Failure::lark("contact batch_get_id", &e))?;
                match found {
                    Some(open_id) => (open_id, UserIdType::OpenId),
                    None => {
                        return Err(Failure(json!({
                            "error": "no user with this email in the directory (or the app cannot see them)",
                            "field": "id",
                        })))
                    }
                }
            }
            _ => {
                return Err(Failure::invalid(
                    "id_type",
                    "one of open_id, user_id, union_id, email",
                ))
            }
        };
        let u = self
            .lark
            .contact_user(&id, id_type)
            .await
            .map_err(|e| Failure::lark("contact_user", &e))?;
        Ok(json!({
            "source": "directory",
            "open_id": u.open_id,
            "union_id": u.union_id,
            "user_id": u.user_id,
            "name": u.name,
            "en_name": u.en_name,
            "email": u.email,
            "enterprise_email": u.enterprise_email,
            "employee_no": u.employee_no,
            "department_ids": u.department_ids,
            "avatar_url": u.avatar.as_ref().and_then(|a| a.avatar_240.clone()),
            "status": u.status.as_ref().map(|s| json!({
                "is_frozen": s.is_frozen,
                "is_resigned": s.is_resigned,
                "is_activated": s.is_activated,
                "is_exited": s.is_exited,
                "is_unjoin": s.is_unjoin,
            })),
        }))
    }

    /// "user has not authorized: session …", naming the user's latest session and its state.
    /// The tool error for a user without a valid token. When there is none (or it is no longer
    /// accepted), the Authorize card is sent with the default scopes (or the one already
    /// waiting is named), and the error says which.
    async fn not_authorized(&self, user: &UserRef, e: TokenError) -> Failure {
        match e {
            TokenError::NotFound | TokenError::NeedsReauth { .. } => {
                let why = if matches!(e, TokenError::NeedsReauth { .. }) {
                    "; their earlier authorization is no longer accepted"
                } else {
                    ""
                };
                let req = AuthRequest {
                    user: user.clone(),
                    scopes: self.auth.options().default_scopes.clone(),
                };
                match self.auth.request(req).await {
                    Ok(o) => {
                        let sent = if o.reused {
                            "an Authorize card is already waiting for them"
                        } else {
                            "an Authorize card was sent to them"
                        };
                        Failure(json!({
                            "error": format!("user has not authorized{why}: {sent} (session {}, pending); try again once they approve", o.session_id),
                            "session_id": o.session_id.to_string(),
                            "state": "pending",
                            "authorization_requested": true,
                        }))
                    }
                    Err(AuthError::RateLimited { retry_after }) => Failure(json!({
                        "error": format!("user has not authorized{why}; no new Authorize card: too many requests for this user, retry in {} s", retry_after.as_secs().max(1)),
                        "authorization_requested": false,
                    })),
                    Err(e) => Failure(json!({
                        "error": format!("user has not authorized{why}; sending the Authorize card failed: {e}"),
                        "authorization_requested": false,
                    })),
                }
            }
            TokenError::Refresh(e) => Failure::lark("refreshing the user token", &e),
            e @ (TokenError::RefreshInDoubt { .. } | TokenError::Interrupted(_)) => {
                Failure::other(e.to_string())
            }
            TokenError::Store(e) => Failure::other(format!("store: {e}")),
        }
    }
}

#[tool_router]
impl McpServer {
    /// Sends a text message as the bot.
    #[tool(
        description = "Send a message as the bot to a user or a chat: `text`, or `msg_type` (text, post, interactive) with `content`, as the earlier MCP deployment's tool."
    )]
    pub async fn send_message(&self, Parameters(p): Parameters<SendMessageParams>) -> ToolResult {
        finish(
            async {
                let to = receiver(&p.receive_id_type, &p.receive_id)?;
                let sent_message = match outgoing(&p)? {
                    Outgoing::Text(t) => self.lark.send_text(&to, &t).await,
                    Outgoing::Post(v) => self.lark.send_post(&to, &v).await,
                    Outgoing::Card(v) => self.lark.send_card(&to, &v).await,
                };
                let m = sent_message.map_err(|e| match e {
                    lark::Error::Config(reason) => Failure::invalid("content", reason),
                    e => Failure::lark("send_message", &e),
                })?;
                Ok(sent(&m))
            }
            .await,
        )
    }

    /// The earlier MCP deployment's name for `get_user`.
    #[tool(
        description = "Look a user up in the tenant directory by open_id, user_id, union_id or email (give one); the earlier MCP deployment's name for get_user."
    )]
    pub async fn get_user_info(&self, Parameters(p): Parameters<GetUserInfoParams>) -> ToolResult {
        let given: Vec<(&str, String)> = [
            ("open_id", p.open_id),
            ("user_id", p.user_id),
            ("union_id", p.union_id),
            ("email", p.email),
        ]
        .into_iter()
        .filter_map(|(kind, v)| v.map(|v| (kind, v)))
        .collect();
        let [(id_type, id)] = given.as_slice() else {
            return finish(Err(Failure::invalid(
                "open_id",
                "give exactly one of open_id, user_id, union_id, email",
            )));
        };
        finish(
            self.do_get_user(GetUserParams {
                id: id.clone(),
                id_type: (*id_type).to_owned(),
                as_user: false,
            })
            .await,
        )
    }

    /// The chats the bot (or, with `as_user`, a user) is in.
    #[tool(
        description = "List the group chats the bot is in (or, with as_user, the chats that user is in, with their authorized token): one page of items (chat_id, name, description, owner_id, external, tenant_key, chat_status) with page_token and has_more. The earlier MCP deployment's tool."
    )]
    pub async fn get_chat_list(&self, Parameters(p): Parameters<GetChatListParams>) -> ToolResult {
        finish(self.do_get_chat_list(p).await)
    }

    /// One page of a chat's members.
    #[tool(
        description = "List a group chat's members (member_id_type open_id, user_id or union_id): one page of items (member_id, name, tenant_key) with member_total, page_token and has_more. Read as the bot, or with as_user as that user; the reader must be in the chat. The earlier MCP deployment's tool."
    )]
    pub async fn get_chat_members(
        &self,
        Parameters(p): Parameters<GetChatMembersParams>,
    ) -> ToolResult {
        finish(self.do_get_chat_members(p).await)
    }

    /// Whether the service can serve: its store answers and it knows its app.
    #[tool(
        description = "Whether lark-service is up: the store answers, the app id, the version. No secrets."
    )]
    pub async fn health_check(&self) -> ToolResult {
        finish(
            async {
                let schema = self
                    .store
                    .run(Db::schema_version)
                    .await
                    .map_err(|e| Failure::other(format!("store: {e}")))?;
                Ok(json!({
                    "status": "ok",
                    "app_id": self.lark.app_id(),
                    "store_schema_version": schema,
                    "version": env!("CARGO_PKG_VERSION"),
                }))
            }
            .await,
        )
    }

    /// Sends an interactive card as the bot.
    #[tool(
        description = "Send an interactive card (card JSON object) as the bot to a user or a chat."
    )]
    pub async fn send_card(&self, Parameters(p): Parameters<SendCardParams>) -> ToolResult {
        finish(
            async {
                let to = receiver(&p.receive_id_type, &p.receive_id)?;
                check_object("card", &p.card)?;
                let m = self
                    .lark
                    .send_card(&to, &p.card)
                    .await
                    .map_err(|e| match e {
                        lark::Error::Config(reason) => Failure::invalid("card", reason),
                        e => Failure::lark("send_card", &e),
                    })?;
                Ok(sent(&m))
            }
            .await,
        )
    }

    /// Looks a user up.
    #[tool(
        description = "Look a user up in the tenant directory by open_id, user_id, union_id or email; with as_user, read the user's own profile with their authorized token."
    )]
    pub async fn get_user(&self, Parameters(p): Parameters<GetUserParams>) -> ToolResult {
        finish(self.do_get_user(p).await)
    }

    /// One page of aPaaS object records.
    #[tool(
        description = "Query one page of aPaaS object records (select, filter, page_size, page_token). Returns items, has_more and next_page_token."
    )]
    pub async fn apaas_query_records(
        &self,
        Parameters(p): Parameters<ApaasQueryParams>,
    ) -> ToolResult {
        finish(
            async {
                check_object_ref(&p.namespace, &p.object)?;
                check_select(&p.select)?;
                if let Some(f) = &p.filter {
                    check_object("filter", f)?;
                }
                let page_size = match p.page_size {
                    None => 100,
                    Some(n @ 1..=lark::api::apaas::MAX_PAGE_SIZE) => n,
                    Some(_) => {
                        return Err(Failure::invalid(
                            "page_size",
                            format!("between 1 and {}", lark::api::apaas::MAX_PAGE_SIZE),
                        ))
                    }
                };
                if let Some(t) = &p.page_token {
                    check_id("page_token", t)?;
                }
                let mut q = RecordQuery::select(p.select, page_size);
                q.filter = p.filter;
                q.page_token = p.page_token;
                let page = self
                    .lark
                    .query_records(&p.namespace, &p.object, &q)
                    .await
                    .map_err(|e| Failure::lark("apaas_query_records", &e))?;
                Ok(json!({
                    "items": page.items,
                    "total": page.total,
                    "has_more": page.has_more,
                    "next_page_token": page.next_page_token,
                }))
            }
            .await,
        )
    }

    /// One aPaaS record by id.
    #[tool(description = "Get one aPaaS object record by id.")]
    pub async fn apaas_get_record(&self, Parameters(p): Parameters<ApaasGetParams>) -> ToolResult {
        finish(
            async {
                check_object_ref(&p.namespace, &p.object)?;
                check_id("id", &p.id)?;
                check_select(&p.select)?;
                let select: Vec<&str> = p.select.iter().map(String::as_str).collect();
                let item = self
                    .lark
                    .get_record(&p.namespace, &p.object, &p.id, &select)
                    .await
                    .map_err(|e| Failure::lark("apaas_get_record", &e))?;
                Ok(json!({ "found": item.is_some(), "item": item }))
            }
            .await,
        )
    }

    /// Creates an aPaaS record.
    #[tool(description = "Create an aPaaS object record. Returns its id.")]
    pub async fn apaas_create_record(
        &self,
        Parameters(p): Parameters<ApaasCreateParams>,
    ) -> ToolResult {
        finish(
            async {
                check_object_ref(&p.namespace, &p.object)?;
                check_object("record", &p.record)?;
                let id = self
                    .lark
                    .create_record(&p.namespace, &p.object, &p.record)
                    .await
                    .map_err(|e| Failure::lark("apaas_create_record", &e))?;
                Ok(json!({ "id": id }))
            }
            .await,
        )
    }

    /// Updates fields of an aPaaS record.
    #[tool(description = "Update fields of an aPaaS object record by id.")]
    pub async fn apaas_update_record(
        &self,
        Parameters(p): Parameters<ApaasUpdateParams>,
    ) -> ToolResult {
        finish(
            async {
                check_object_ref(&p.namespace, &p.object)?;
                check_id("id", &p.id)?;
                check_object("record", &p.record)?;
                self.lark
                    .patch_record(&p.namespace, &p.object, &p.id, &p.record)
                    .await
                    .map_err(|e| Failure::lark("apaas_update_record", &e))?;
                Ok(json!({ "id": p.id, "updated": true }))
            }
            .await,
        )
    }

    /// Sends the user an authorization card.
    #[tool(
        description = "Ask a user to authorize the app: sends them an Authorize card and returns the session id (a pending session for the same scopes is reused)."
    )]
    pub async fn request_user_authorization(
        &self,
        Parameters(p): Parameters<RequestAuthorizationParams>,
    ) -> ToolResult {
        finish(
            async {
                let user = user_ref("id_type", &p.id_type, &p.id)?;
                for s in &p.scopes {
                    check_id("scopes", s)?;
                }
                match self
                    .auth
                    .request(AuthRequest {
                        user,
                        scopes: p.scopes,
                    })
                    .await
                {
                    Ok(o) => Ok(json!({
                        "session_id": o.session_id.to_string(),
                        "reused": o.reused,
                    })),
                    Err(AuthError::Invalid { field, reason }) => {
                        Err(Failure::invalid(field, reason))
                    }
                    Err(AuthError::Lark(e)) => Err(Failure::lark("request_user_authorization", &e)),
                    Err(e) => Err(Failure::other(e.to_string())),
                }
            }
            .await,
        )
    }

    /// Deletes the user's stored tokens.
    #[tool(
        description = "Revoke a user's authorization here: deletes the service's copy of their access and refresh tokens and marks the session revoked (Feishu has no public API to revoke the grant itself). The user must authorize again."
    )]
    pub async fn revoke_user_token(
        &self,
        Parameters(p): Parameters<RevokeUserTokenParams>,
    ) -> ToolResult {
        finish(
            async {
                let user = user_ref("id_type", &p.id_type, &p.id)?;
                match self.auth.revoke_user(user).await {
                    Ok(Some(r)) => Ok(json!({
                        "revoked": true,
                        "user_id": r.user_id,
                        "session_id": r.session_id.map(|s| s.to_string()),
                    })),
                    Ok(None) => Err(Failure::invalid("id", "this user has no token")),
                    Err(e) => Err(Failure::other(format!("store: {e}"))),
                }
            }
            .await,
        )
    }

    /// A session's state, without secrets.
    #[tool(
        description = "State of an authorization session (pending, completed, expired, failed, rejected, revoked). No secrets."
    )]
    pub async fn authorization_status(
        &self,
        Parameters(p): Parameters<AuthorizationStatusParams>,
    ) -> ToolResult {
        finish(
            async {
                let id: SessionId = p.session_id.trim().parse().map_err(|_| {
                    Failure::invalid("session_id", "a session id is 32 hex characters")
                })?;
                let s = self
                    .store
                    .run(move |s| s.get_session_summary(id))
                    .await
                    .map_err(|e| Failure::other(format!("store: {e}")))?;
                match s {
                    Some(s) if s.app_id == self.lark.app_id() => Ok(json!({
                        "session_id": s.session_id,
                        "state": s.state,
                        "failure_reason": s.failure_reason,
                        "user_id": s.user_id,
                        "open_id": s.open_id,
                        "scopes": s.scopes,
                        "has_tokens": s.has_tokens,
                        "created_at": s.created_at,
                        "updated_at": s.updated_at,
                        "expires_at": s.expires_at,
                        "token_expires_at": s.token_expires_at,
                    })),
                    _ => Err(Failure::invalid("session_id", "no such session")),
                }
            }
            .await,
        )
    }
}

#[tool_handler(
    router = self.tool_router,
    name = "lark-service",
    instructions = "Feishu/Lark tools of lark-service: send messages and cards as the bot, look users up, list group chats and their members, read and write aPaaS records, and ask users to authorize the app."
)]
impl ServerHandler for McpServer {}

pub use crate::config::{McpLimits, CLIENT_REQUESTS_PER_MINUTE, GLOBAL_REQUESTS_PER_MINUTE};

/// The window of the `/mcp` limits.
const LIMIT_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// Requests per client key (and `""`: everyone together) within [`LIMIT_WINDOW`].
type ClientLimiter = crate::ratelimit::RateLimiter<String>;

/// `None` if a request of `key` is allowed (and counted), else how long to wait.
fn over_limit(l: &ClientLimiter, key: &str, limit: usize) -> Option<std::time::Duration> {
    l.acquire(&key.to_owned(), limit, crate::ratelimit::monotonic_now())
        .err()
}

/// The rate-limit key of a request: a digest of its bearer token and its peer's address (the
/// MCP session id is chosen by the client, so a client opening new sessions would escape a
/// limit keyed by it).
fn client_key(req: &Request) -> String {
    use sha2::Digest as _;
    let bearer = crate::http::bearer::presented(req.headers()).unwrap_or_default();
    let digest = sha2::Sha256::digest(bearer.as_bytes());
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "-".to_owned(), |c| c.0.ip().to_string());
    format!("{}@{peer}", hex::encode(&digest[..8]))
}

/// `/mcp` (streamable HTTP) behind `guard` (the MCP bearer token), limited per client and
/// globally by `limits`; open MCP sessions and streams end when `shutdown` is cancelled.
pub fn router(
    server: McpServer,
    guard: crate::http::bearer::BearerGuard,
    shutdown: CancellationToken,
    limits: McpLimits,
) -> Router {
    let config = StreamableHttpServerConfig::default()
        .with_cancellation_token(shutdown)
        // The bearer token, not the Host header, is what keeps other sites out (a DNS-rebinding
        // page cannot attach it); the service usually sits behind a proxy with its own hostname.
        .disable_allowed_hosts();
    let service: StreamableHttpService<McpServer, LocalSessionManager> = StreamableHttpService::new(
        move || Ok(server.clone()),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    let limiter = Arc::new(ClientLimiter::new(LIMIT_WINDOW));
    let limited = Router::new()
        .nest_service("/mcp", service)
        .layer(axum::middleware::from_fn(
            move |req: Request, next: Next| {
                let limiter = limiter.clone();
                async move {
                    if let Some(wait) =
                        over_limit(&limiter, &client_key(&req), limits.client_per_minute)
                    {
                        return rate_limited(wait, "this MCP client");
                    }
                    if let Some(wait) = over_limit(&limiter, "", limits.global_per_minute) {
                        return rate_limited(wait, "all MCP clients together");
                    }
                    let terminating = req.method() == axum::http::Method::DELETE;
                    let mut response = next.run(req).await;
                    // A session ended by DELETE: the transport answers 202, where clients (the
                    // official Python SDK among them) expect 200 or 204 and log a failure
                    // otherwise. Nothing follows, so 204.
                    if terminating && response.status() == StatusCode::ACCEPTED {
                        *response.status_mut() = StatusCode::NO_CONTENT;
                    }
                    response
                }
            },
        ));
    guard.protect(limited)
}

fn rate_limited(wait: std::time::Duration, whom: &str) -> Response {
    let secs = wait.as_secs().max(1);
    crate::http::retry_later(
        StatusCode::TOO_MANY_REQUESTS,
        json!({"error": "rate_limited", "message": format!("too many requests from {whom}; retry in {secs} s")}),
        secs,
    )
}

/// Serves `server` over stdin/stdout until the client disconnects.
pub async fn serve_stdio(server: McpServer) -> anyhow::Result<()> {
    use rmcp::ServiceExt as _;
    let running = server
        .serve(rmcp::transport::stdio())
        .await
        .map_err(|e| anyhow::anyhow!("starting the MCP stdio server: {e}"))?;
    running
        .waiting()
        .await
        .map_err(|e| anyhow::anyhow!("MCP stdio server: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod limiter_tests {
    use super::{over_limit, ClientLimiter, LIMIT_WINDOW};

    #[test]
    fn each_client_gets_its_own_window() {
        let l = ClientLimiter::new(LIMIT_WINDOW);
        for _ in 0..5 {
            assert!(over_limit(&l, "a", 5).is_none());
        }
        assert!(
            over_limit(&l, "a", 5).is_some(),
            "the 6th request in the window is refused"
        );
        assert!(
            over_limit(&l, "b", 5).is_none(),
            "another client is not affected"
        );
    }
}
