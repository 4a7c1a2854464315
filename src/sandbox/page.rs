//! The sandbox's human page: each user's messages, with clickable card buttons.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde_json::Value;

use super::assets::CSS;
use super::Shared;

/// Reloads the page every 2 s, except once a button or link was pressed (a reload then would
/// cancel the navigation it started) or while the tab is hidden.
const RELOAD: &str = "<noscript><meta http-equiv=refresh content=2></noscript><script>\
let leaving=false;addEventListener('submit',()=>leaving=true);\
addEventListener('click',e=>{if(e.target.closest('a'))leaving=true});\
setInterval(()=>{if(!leaving&&!document.hidden)location.reload()},2000)</script>";

pub(crate) fn router(s: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/sandbox/click", post(click))
        .route("/sandbox/request", post(request))
        .with_state(s)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

struct Button {
    label: String,
    url: Option<String>,
    value: Option<Value>,
}

/// Text and buttons of a card, whatever its layout.
fn walk(v: &Value, texts: &mut Vec<String>, buttons: &mut Vec<Button>) {
    match v {
        Value::Object(m) => {
            if m.get("tag").and_then(Value::as_str) == Some("button") {
                let label = m
                    .get("text")
                    .and_then(|t| t.get("content"))
                    .and_then(Value::as_str)
                    .unwrap_or("button")
                    .to_owned();
                let mut url = m.get("url").and_then(Value::as_str).map(str::to_owned);
                url = url.or_else(|| {
                    m.get("multi_url")
                        .and_then(|u| u.get("url"))
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                });
                let mut value = m.get("value").cloned();
                for b in m
                    .get("behaviors")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    match b.get("type").and_then(Value::as_str) {
                        Some("open_url") => {
                            url = url.or_else(|| {
                                b.get("default_url")
                                    .and_then(Value::as_str)
                                    .map(str::to_owned)
                            });
                        }
                        Some("callback") => value = value.or_else(|| b.get("value").cloned()),
                        _ => {}
                    }
                }
                buttons.push(Button { label, url, value });
                return;
            }
            for (k, child) in m {
                if k == "content" {
                    if let Some(t) = child.as_str() {
                        texts.push(t.to_owned());
                        continue;
                    }
                }
                walk(child, texts, buttons);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| walk(x, texts, buttons)),
        _ => {}
    }
}

/// Paired `delim`s around non-empty text become `open`…`close`; any unpaired `delim` left is
/// dropped, so no raw markdown marker reaches the page.
fn pairs(s: &str, delim: &str, open: &str, close: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(delim) {
        let after = &rest[i + delim.len()..];
        match after.find(delim) {
            Some(j) if j > 0 => {
                out.push_str(&rest[..i]);
                out.push_str(open);
                out.push_str(&after[..j]);
                out.push_str(close);
                rest = &after[j + delim.len()..];
            }
            _ => {
                out.push_str(&rest[..i]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// `[text](http…)` links in already escaped text.
fn links(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('[') {
        let tail = &rest[i + 1..];
        let parsed = tail.find("](").and_then(|j| {
            let url_part = &tail[j + 2..];
            let k = url_part.find(')')?;
            Some((&tail[..j], &url_part[..k], &url_part[k + 1..]))
        });
        match parsed {
            Some((text, url, after))
                if url.starts_with("http://") || url.starts_with("https://") =>
            {
                out.push_str(&rest[..i]);
                out.push_str(&format!("<a href=\"{url}\">{text}</a>"));
                rest = after;
            }
            _ => {
                out.push_str(&rest[..=i]);
                rest = tail;
            }
        }
    }
    out.push_str(rest);
    out
}

/// A card's markdown as the Feishu client shows it: bold, italic, strike-through, inline code,
/// links and line breaks become HTML; everything else is escaped text.
pub(crate) fn markdown_html(md: &str) -> String {
    // Code spans first, so markers inside them stay literal.
    let mut out = String::new();
    for (i, part) in esc(md).split('`').enumerate() {
        if i % 2 == 1 {
            out.push_str(&format!("<code>{part}</code>"));
        } else {
            let t = pairs(part, "**", "<b>", "</b>");
            let t = pairs(&t, "~~", "<s>", "</s>");
            let t = pairs(&t, "*", "<i>", "</i>");
            out.push_str(&links(&t));
        }
    }
    out.replace("\n\n", "<br><br>").replace('\n', "<br>")
}

/// What the page knows about one user from the service's admin API.
#[derive(Default)]
struct UserStatus {
    /// The session the page last started for the user and its state, if any.
    session: Option<String>,
    /// Token stored or not, and when it expires.
    token: String,
}

async fn admin_get(s: &Shared, url: &str) -> Result<(u16, Value), String> {
    let mut req = s.http.get(url).timeout(std::time::Duration::from_secs(3));
    if let Some(t) = &s.opts.admin_token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.map_err(|e| e.to_string())?;
    let status = r.status().as_u16();
    let v = r.json::<Value>().await.unwrap_or(Value::Null);
    Ok((status, v))
}

fn utc(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX)).map_or_else(
        || ms.to_string(),
        |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    )
}

async fn user_status(s: &Shared, service: &str, open_id: &str) -> UserStatus {
    let mut st = UserStatus::default();
    let session = s.lock().page_sessions.get(open_id).cloned();
    if let Some(id) = session {
        st.session = Some(
            match admin_get(s, &format!("{service}/api/v1/auth/sessions/{id}")).await {
                Ok((200, v)) => {
                    let state = v["state"].as_str().unwrap_or("unknown").to_owned();
                    let reason = v["failure_reason"]
                        .as_str()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default();
                    format!(
                        "session <code>{}</code>: <b class=state>{}</b>{}",
                        esc(&id),
                        esc(&state),
                        esc(&reason)
                    )
                }
                Ok((code, _)) => format!(
                    "session <code>{}</code>: the service answered {code}",
                    esc(&id)
                ),
                Err(e) => format!(
                    "session <code>{}</code>: the service did not answer: {}",
                    esc(&id),
                    esc(&e)
                ),
            },
        );
    }
    st.token = match admin_get(s, &format!("{service}/api/v1/users/{open_id}/token")).await {
        Ok((200, v)) => {
            let exp = v["expires_at"].as_u64().unwrap_or(0);
            format!(
                "<b class=token-stored>token stored</b>, expires {}",
                esc(&utc(exp))
            )
        }
        Ok((404, _)) => "<span class=token-none>no token stored</span>".to_owned(),
        Ok((409, _)) => {
            "<span class=token-none>token no longer accepted: needs a new authorization</span>"
                .to_owned()
        }
        Ok((code, v)) => format!(
            "token: the service answered {code} {}",
            esc(v["error"].as_str().unwrap_or(""))
        ),
        Err(e) => format!("token: the service did not answer: {}", esc(&e)),
    };
    st
}

/// How to call the service's token API, for the top of the page.
fn service_help(s: &Shared, service: &str) -> String {
    let bearer = match &s.opts.admin_token_file {
        Some(p) => format!("$(cat {})", p.display()),
        None => "$ADMIN_TOKEN".to_owned(),
    };
    let where_token = match &s.opts.admin_token_file {
        Some(p) => format!(
            "The admin token is in <code id=admin-token-file>{}</code> (mode 0600).",
            esc(&p.display().to_string())
        ),
        None => "The admin token is the one you configured (<code>admin_token</code> / <code>LARK_SERVICE_ADMIN_TOKEN</code>).".to_owned(),
    };
    format!(
        "<div class=card><div class=title>The service</div>lark-service runs at <code>{svc}</code>. {where_token} \
         Once a user has authorized, get their token with:<br>\
         <code>curl -H \"Authorization: Bearer {bearer}\" {svc}/api/v1/users/ou_sandbox_alice/token</code></div>",
        svc = esc(service),
        bearer = esc(&bearer),
    )
}

/// Writes a message's title and text to `out`; returns its buttons.
fn render_card(content: &Value, out: &mut String) -> Vec<Button> {
    let title = content
        .get("header")
        .and_then(|h| h.get("title"))
        .and_then(|t| t.get("content"))
        .and_then(Value::as_str);
    if let Some(t) = title {
        out.push_str(&format!("<div class=title>{}</div>", esc(t)));
    }
    let (mut texts, mut buttons) = (Vec::new(), Vec::new());
    for (k, v) in content.as_object().into_iter().flatten() {
        if k != "header" {
            walk(v, &mut texts, &mut buttons);
        }
    }
    // Non-card contents (text messages) are a JSON object with `text`.
    if let Some(t) = content.get("text").and_then(Value::as_str) {
        texts.push(t.to_owned());
    }
    for t in &texts {
        out.push_str(&format!("<div class=md>{}</div>", markdown_html(t)));
    }
    buttons
}

async fn index(State(s): State<Arc<Shared>>) -> Html<String> {
    let users = s.lock().users.clone();
    let notes = s.lock().page_notes.clone();
    let mut out = format!(
        "<!doctype html><html><head><meta charset=utf-8><title>lark-service sandbox</title>{CSS}{RELOAD}</head><body>\
         <h1>Feishu sandbox</h1><p class=muted>A local imitation of the Feishu platform at <code>{}</code>. App <code>{}</code>. \
         This page shows what each sandbox user's Feishu client would show; it refreshes every 2 s.</p>",
        esc(&s.base_url()),
        super::APP_ID
    );
    let service = s.opts.service_url.clone();
    if let Some(svc) = &service {
        out.push_str(&service_help(&s, svc));
    }
    for n in notes.iter().rev().take(3) {
        out.push_str(&format!("<div class=card>{}</div>", esc(n)));
    }
    let statuses: Vec<Option<UserStatus>> = match &service {
        Some(svc) => {
            futures_util::future::join_all(users.iter().map(|u| {
                let s = s.clone();
                let (svc, id) = (svc.clone(), u.open_id.clone());
                async move { Some(user_status(&s, &svc, &id).await) }
            }))
            .await
        }
        None => users.iter().map(|_| None).collect(),
    };
    for (u, st) in users.iter().zip(statuses) {
        out.push_str(&format!(
            "<h2>{} <span class=muted>{}</span></h2>",
            esc(&u.name),
            esc(&u.open_id)
        ));
        if s.opts.request_auth_url.is_some() {
            out.push_str(&format!(
                "<form method=post action=/sandbox/request><input type=hidden name=open_id value=\"{}\"><button>Ask {} to authorize</button></form>",
                esc(&u.open_id),
                esc(&u.name)
            ));
        }
        if let Some(st) = st {
            out.push_str(&format!(
                "<div class=status id=\"status-{}\">",
                esc(&u.open_id)
            ));
            if let Some(sess) = &st.session {
                out.push_str(&format!("<div>Authorization {sess}</div>"));
            }
            out.push_str(&format!("<div>{}</div></div>", st.token));
        }
        let msgs = super::platform::messages_for(&s, &u.open_id);
        if msgs.is_empty() {
            out.push_str("<p class=muted>No messages yet.</p>");
        }
        for m in msgs.iter().rev() {
            out.push_str(&format!(
                "<div class=card><div class=muted>{} · {} · {} update(s)</div>",
                esc(&m.message_id),
                esc(&m.msg_type),
                m.history.len()
            ));
            let buttons = render_card(&m.content, &mut out);
            for b in &buttons {
                if let Some(url) = &b.url {
                    // The person using this page is the card's receiver.
                    let sep = if url.contains('?') { '&' } else { '?' };
                    out.push_str(&format!(
                        "<a class=btn href=\"{}{sep}sandbox_user={}\">{}</a>",
                        esc(url),
                        esc(&u.open_id),
                        esc(&b.label)
                    ));
                } else if let Some(v) = &b.value {
                    out.push_str(&format!(
                        "<form method=post action=/sandbox/click><input type=hidden name=message_id value=\"{}\"><input type=hidden name=open_id value=\"{}\">\
                         <input type=hidden name=value value=\"{}\"><button class=no>{}</button></form>",
                        esc(&m.message_id),
                        esc(&u.open_id),
                        esc(&v.to_string()),
                        esc(&b.label)
                    ));
                }
            }
            out.push_str("</div>");
        }
    }
    out.push_str("</body></html>");
    Html(out)
}

#[derive(serde::Deserialize)]
struct ClickForm {
    message_id: String,
    open_id: String,
    value: String,
}

async fn click(State(s): State<Arc<Shared>>, Form(f): Form<ClickForm>) -> Response {
    let value: Value = serde_json::from_str(&f.value).unwrap_or(Value::String(f.value.clone()));
    if let Err(e) = super::ws::click(&s, &f.message_id, &f.open_id, value) {
        s.lock().page_notes.push(e.to_string());
    }
    Redirect::to("/").into_response()
}

/// Scopes the page's "Ask … to authorize" form requests.
const REQUEST_SCOPES: [&str; 2] = ["contact:user.base:readonly", "offline_access"];

#[derive(serde::Deserialize)]
struct RequestForm {
    open_id: String,
}

async fn request(State(s): State<Arc<Shared>>, Form(f): Form<RequestForm>) -> Response {
    let Some(url) = s.opts.request_auth_url.clone() else {
        return Redirect::to("/").into_response();
    };
    let mut req = s.http.post(&url).json(&serde_json::json!({
        "open_id": f.open_id,
        "scopes": REQUEST_SCOPES,
    }));
    if let Some(t) = &s.opts.admin_token {
        req = req.bearer_auth(t);
    }
    let note = match req.send().await {
        Ok(r) => {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            if status.is_success() {
                let session = serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|v| v["session_id"].as_str().map(str::to_owned));
                if let Some(id) = session {
                    s.lock().page_sessions.insert(f.open_id.clone(), id);
                }
            }
            format!("The service answered {status}: {body}")
        }
        Err(e) => format!("The service did not answer: {e}"),
    };
    s.lock().page_notes.push(note);
    Redirect::to("/").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_markdown_becomes_html_without_raw_markers() {
        let md = "This app asks to act on your behalf.\n\n**Permissions:** `a:b`, `offline_access`\n\nSee [docs](https://x.example/d?a=1&b=2) *now* ~~old~~ <script>";
        let html = markdown_html(md);
        assert_eq!(
            html,
            "This app asks to act on your behalf.<br><br><b>Permissions:</b> <code>a:b</code>, \
             <code>offline_access</code><br><br>See <a href=\"https://x.example/d?a=1&amp;b=2\">docs</a> \
             <i>now</i> <s>old</s> &lt;script&gt;"
        );
        // Unpaired markers are dropped, ids with underscores are left alone, code stays literal.
        assert_eq!(markdown_html("**open"), "open");
        assert_eq!(markdown_html("ou_sandbox_alice"), "ou_sandbox_alice");
        assert_eq!(markdown_html("`**x**`"), "<code>**x**</code>");
        assert_eq!(
            markdown_html("[x](javascript:alert(1))"),
            "[x](javascript:alert(1))"
        );
    }

    #[test]
    fn the_card_title_text_and_buttons_are_rendered() {
        let card = serde_json::json!({
            "schema": "2.0",
            "header": {"title": {"tag": "plain_text", "content": "Authorization required"}},
            "body": {"elements": [
                {"tag": "markdown", "content": "**Permissions:** `x`"},
                {"tag": "button", "text": {"tag": "plain_text", "content": "Authorize"},
                 "behaviors": [{"type": "open_url", "default_url": "http://h/a?x=1"}]},
                {"tag": "button", "text": {"tag": "plain_text", "content": "Reject"},
                 "behaviors": [{"type": "callback", "value": {"action": "reject"}}]},
            ]},
        });
        let mut out = String::new();
        let buttons = render_card(&card, &mut out);
        assert_eq!(
            out,
            "<div class=title>Authorization required</div><div class=md><b>Permissions:</b> <code>x</code></div>"
        );
        assert_eq!(buttons.len(), 2);
        assert_eq!(buttons[0].url.as_deref(), Some("http://h/a?x=1"));
        assert_eq!(
            buttons[1].value,
            Some(serde_json::json!({"action": "reject"}))
        );
    }
}
