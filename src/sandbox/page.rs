//! The sandbox's human page: each user's messages, with clickable card buttons.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde_json::Value;

use super::Shared;

pub(crate) const CSS: &str = "<style>body{font-family:system-ui,sans-serif;max-width:980px;margin:24px auto;color:#1f2329;background:#f5f6f7}\
h1{font-size:22px}h2{font-size:17px;margin:18px 0 6px}.card{background:#fff;border:1px solid #dee0e3;border-radius:8px;padding:12px 16px;margin:8px 0}\
.title{font-weight:600;margin-bottom:6px}.muted{color:#8f959e;font-size:12px}button,.btn{display:inline-block;border:1px solid #3370ff;background:#3370ff;color:#fff;border-radius:6px;padding:5px 12px;margin:4px 6px 0 0;text-decoration:none;font-size:14px;cursor:pointer}\
.no{background:#fff;color:#f54a45;border-color:#f54a45}.ok{background:#34c724;border-color:#34c724}form{display:inline}code{background:#eff0f1;padding:1px 4px;border-radius:4px}</style>";

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
                            })
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

async fn index(State(s): State<Arc<Shared>>) -> Html<String> {
    let users = s.lock().users.clone();
    let notes = s.lock().page_notes.clone();
    let mut out = format!(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=2><title>lark-service sandbox</title>{CSS}</head><body>\
         <h1>Feishu sandbox</h1><p class=muted>A local imitation of the Feishu platform at <code>{}</code>. App <code>{}</code>. \
         This page shows what each sandbox user's Feishu client would show; it refreshes every 2 s.</p>",
        esc(&s.base_url()),
        super::APP_ID
    );
    for n in notes.iter().rev().take(3) {
        out.push_str(&format!("<div class=card>{}</div>", esc(n)));
    }
    for u in &users {
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
        let msgs = super::platform::messages_for(&s, &u.open_id);
        if msgs.is_empty() {
            out.push_str("<p class=muted>No messages yet.</p>");
        }
        for m in msgs.iter().rev() {
            let (mut texts, mut buttons) = (Vec::new(), Vec::new());
            walk(&m.content, &mut texts, &mut buttons);
            out.push_str(&format!(
                "<div class=card><div class=muted>{} · {} · {} update(s)</div>",
                esc(&m.message_id),
                esc(&m.msg_type),
                m.history.len()
            ));
            for t in &texts {
                out.push_str(&format!("<div>{}</div>", esc(t)));
            }
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
            format!("The service answered {status}: {body}")
        }
        Err(e) => format!("The service did not answer: {e}"),
    };
    s.lock().page_notes.push(note);
    Redirect::to("/").into_response()
}
