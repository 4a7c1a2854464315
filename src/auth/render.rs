//! What users see: the cards and the browser pages. Fixed texts only.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::Html;
use serde_json::Value;

use super::state::{CardKind, Page};
use crate::lark::card;
use crate::storage::{AuthSession, FailureReason};

pub use crate::config::CardLocale as Locale;

/// How the Authorize card looks (`card.*` settings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CardStyle {
    /// Language of every card.
    pub locale: Locale,
    /// The detailed description (what the app asks, the permissions) or a short one.
    pub include_description: bool,
    /// A privacy-policy link shown under the description.
    pub privacy_policy_url: Option<String>,
    /// A card template built in the Feishu card builder: the Authorize card is sent as that
    /// template with its variables (`title`, `body`, `authorize_url`, `session_id`,
    /// `authorize_label`, `reject_label`).
    pub template_id: Option<String>,
}

impl Default for CardStyle {
    fn default() -> Self {
        Self {
            locale: Locale::Zh,
            include_description: true,
            privacy_policy_url: None,
            template_id: None,
        }
    }
}

/// The fixed texts of one language.
struct Texts {
    title: &'static str,
    authorize: &'static str,
    reject: &'static str,
    authorized_title: &'static str,
    rejected_title: &'static str,
    rejected_body: &'static str,
    expired_title: &'static str,
    expired_body: &'static str,
    failed_title: &'static str,
    retry: &'static str,
    privacy: &'static str,
}

const ZH: Texts = Texts {
    title: "用户授权请求",
    authorize: "授权",
    reject: "取消",
    authorized_title: "授权成功",
    rejected_title: "已取消授权",
    rejected_body: "你已拒绝此请求，未授予任何权限。",
    expired_title: "授权请求已过期",
    expired_body: "此请求已失效。发送 `/authorize` 获取新的授权请求。",
    failed_title: "授权失败",
    retry: "发送 `/authorize` 重试。",
    privacy: "隐私政策",
};

const EN: Texts = Texts {
    title: "Authorization required",
    authorize: "Authorize",
    reject: "Reject",
    authorized_title: "Authorization complete",
    rejected_title: "Authorization declined",
    rejected_body: "You declined this request. Nothing was granted.",
    expired_title: "Authorization request expired",
    expired_body: "This request is no longer valid. Send `/authorize` to get a new one.",
    failed_title: "Authorization failed",
    retry: "Send `/authorize` to try again.",
    privacy: "Privacy policy",
};

fn texts(locale: Locale) -> &'static Texts {
    match locale {
        Locale::Zh => &ZH,
        Locale::En => &EN,
    }
}

/// The Authorize card's markdown: the detailed or the short description, then the privacy link.
pub(super) fn authorize_body(style: &CardStyle, scopes: &[String], expiry: Duration) -> String {
    let list = scopes
        .iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let minutes = expiry.as_secs().div_ceil(60).max(1);
    let plural = if minutes == 1 { "" } else { "s" };
    let mut body = match (style.locale, style.include_description) {
        (Locale::Zh, true) => format!(
            "应用请求以你的身份访问飞书数据。\n\n**权限：** {list}\n\n此请求在 {minutes} 分钟内有效。"
        ),
        (Locale::Zh, false) => format!("请授权应用以你的身份访问。此请求在 {minutes} 分钟内有效。"),
        (Locale::En, true) => format!(
            "This app asks to act on your behalf.\n\n**Permissions:** {list}\n\nThe request is valid for {minutes} minute{plural}."
        ),
        (Locale::En, false) => format!(
            "Authorize the app to act on your behalf. The request is valid for {minutes} minute{plural}."
        ),
    };
    if let Some(url) = &style.privacy_policy_url {
        body.push_str(&format!("\n\n[{}]({url})", texts(style.locale).privacy));
    }
    body
}

/// The Authorize card (or, with a template id, the template and its variables).
pub(super) fn authorize_card(
    style: &CardStyle,
    scopes: &[String],
    expiry: Duration,
    authorize_url: &str,
    session_id: &str,
) -> Value {
    let t = texts(style.locale);
    let body = authorize_body(style, scopes, expiry);
    let mut c = card::AuthorizeCard::new(t.title, &body, authorize_url, session_id);
    c.authorize_label = t.authorize;
    c.reject_label = t.reject;
    match &style.template_id {
        Some(id) => card::template_card(
            id,
            &serde_json::json!({
                "title": t.title,
                "body": body,
                "authorize_url": authorize_url,
                "session_id": session_id,
                "authorize_label": t.authorize,
                "reject_label": t.reject,
            }),
        ),
        None => c.to_json(),
    }
}

/// The toast a reject answers with.
pub(super) fn rejected_toast(locale: Locale) -> &'static str {
    match locale {
        Locale::Zh => "已取消授权",
        Locale::En => "Authorization declined.",
    }
}

pub(super) fn failure_text(locale: Locale, r: FailureReason) -> &'static str {
    match (locale, r) {
        (Locale::En, FailureReason::CodeExpired) => "The authorization took too long to complete.",
        (Locale::En, FailureReason::MissingCode) => "The authorization page did not return a code.",
        (Locale::En, FailureReason::UserRejected) => "You declined the request.",
        (Locale::En, FailureReason::StateMismatch) => {
            "This authorization link is no longer valid: it was already used, or it belongs to someone else."
        }
        (Locale::En, FailureReason::SessionExpired) => "The authorization request expired.",
        (Locale::En, FailureReason::UnknownError) => {
            "Something went wrong while completing the authorization."
        }
        (Locale::Zh, FailureReason::CodeExpired) => "授权耗时过长，未能完成。",
        (Locale::Zh, FailureReason::MissingCode) => "授权页面没有返回授权码。",
        (Locale::Zh, FailureReason::UserRejected) => "你拒绝了此请求。",
        (Locale::Zh, FailureReason::StateMismatch) => "此授权链接已失效：它已被使用，或属于其他用户。",
        (Locale::Zh, FailureReason::SessionExpired) => "授权请求已过期。",
        (Locale::Zh, FailureReason::UnknownError) => "完成授权时出错。",
    }
}

/// The card that replaces the authorize card.
pub(super) fn final_card(style: &CardStyle, kind: CardKind, s: &AuthSession) -> Value {
    let t = texts(style.locale);
    match kind {
        CardKind::Authorized => {
            let body = match (style.locale, s.user_name.as_deref()) {
                (Locale::Zh, Some(n)) => format!("谢谢，{n}。应用现在可以使用你授予的权限。"),
                (Locale::Zh, None) => "谢谢。应用现在可以使用你授予的权限。".to_owned(),
                (Locale::En, Some(n)) => {
                    format!("Thank you, {n}. The app can now act with the permissions you granted.")
                }
                (Locale::En, None) => {
                    "Thank you. The app can now act with the permissions you granted.".to_owned()
                }
            };
            card::authorized_card(t.authorized_title, &body)
        }
        CardKind::Rejected => card::rejected_card(t.rejected_title, t.rejected_body),
        CardKind::Expired => card::expired_card(t.expired_title, t.expired_body),
        CardKind::Failed(r) => card::expired_card(
            t.failed_title,
            &format!("{} {}", failure_text(style.locale, r), t.retry),
        ),
    }
}

/// The small page the browser gets after the redirect. Fixed texts only: nothing from the
/// request, no error detail, no secret.
pub fn page_html(p: Page) -> (StatusCode, Html<String>) {
    let (status, title, text) = match p {
        Page::Authorized => (
            StatusCode::OK,
            "Authorization complete",
            "You can close this page and return to Feishu/Lark.",
        ),
        Page::Rejected => (
            StatusCode::OK,
            "Authorization declined",
            "Nothing was granted. You can close this page.",
        ),
        Page::Expired => (
            StatusCode::GONE,
            "Authorization request expired",
            "Send /authorize to the app to get a new request.",
        ),
        Page::Failed(r) => (
            match r {
                FailureReason::UnknownError => StatusCode::BAD_GATEWAY,
                _ => StatusCode::BAD_REQUEST,
            },
            "Authorization failed",
            failure_text(Locale::En, r),
        ),
    };
    let html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
         <title>{title}</title></head>\n<body style=\"font-family:sans-serif;max-width:32em;margin:4em auto\">\
         <h1>{title}</h1>\n<p>{text}</p></body></html>\n"
    );
    (status, Html(html))
}

pub(super) fn error_page() -> (StatusCode, Html<String>) {
    let (_, html) = page_html(Page::Failed(FailureReason::UnknownError));
    (StatusCode::INTERNAL_SERVER_ERROR, html)
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::json;

    /// The parts of Card JSON 2.0 the platform checks on send and on update, as the cards here
    /// use them: schema, header, body elements, buttons and their behaviours, size.
    fn check_card(card: &Value) -> Result<(), String> {
        let text = card.to_string();
        if text.len() > 30 * 1024 {
            return Err(format!("{} bytes: over the 30 KB card limit", text.len()));
        }
        if card["schema"] != "2.0" {
            return Err("schema is not \"2.0\"".into());
        }
        if card["config"]["update_multi"] != true {
            return Err("config.update_multi must be true to update the card".into());
        }
        let title = &card["header"]["title"];
        if title["tag"] != "plain_text" || title["content"].as_str().is_none_or(str::is_empty) {
            return Err(format!(
                "header.title must be non-empty plain_text: {title}"
            ));
        }
        let colours = [
            "blue",
            "wathet",
            "turquoise",
            "green",
            "yellow",
            "orange",
            "red",
            "carmine",
            "violet",
            "purple",
            "indigo",
            "grey",
            "default",
        ];
        if !card["header"]["template"]
            .as_str()
            .is_some_and(|t| colours.contains(&t))
        {
            return Err(format!(
                "header.template {} is not a card colour",
                card["header"]["template"]
            ));
        }
        let elements = card["body"]["elements"]
            .as_array()
            .ok_or("body.elements must be an array")?;
        if elements.is_empty() {
            return Err("body.elements is empty".into());
        }
        for e in elements {
            match e["tag"].as_str() {
                Some("markdown") => {
                    if e["content"].as_str().is_none_or(str::is_empty) {
                        return Err("a markdown element needs content".into());
                    }
                }
                Some("button") => {
                    if e["text"]["tag"] != "plain_text"
                        || e["text"]["content"].as_str().is_none_or(str::is_empty)
                    {
                        return Err(format!("a button needs plain_text text: {e}"));
                    }
                    if !matches!(
                        e["type"].as_str(),
                        Some("primary" | "default" | "danger" | "text" | "laser")
                    ) {
                        return Err(format!("button type {}", e["type"]));
                    }
                    let behaviours = e["behaviors"]
                        .as_array()
                        .ok_or("a button needs behaviors")?;
                    for b in behaviours {
                        match b["type"].as_str() {
                            Some("open_url") => {
                                let url = b["default_url"].as_str().unwrap_or_default();
                                if !(url.starts_with("https://") || url.starts_with("http://")) {
                                    return Err(format!(
                                        "open_url needs an http(s) default_url: {b}"
                                    ));
                                }
                            }
                            Some("callback") => {
                                if !b["value"].is_object() {
                                    return Err(format!("a callback's value is an object: {b}"));
                                }
                            }
                            other => return Err(format!("behaviour type {other:?}")),
                        }
                    }
                }
                other => return Err(format!("element tag {other:?} is not used by these cards")),
            }
        }
        Ok(())
    }

    fn session(name: Option<&str>) -> AuthSession {
        let mut s = AuthSession::new_pending("cli_a", "u1", vec!["offline_access".into()], 1, 2);
        s.user_name = name.map(str::to_owned);
        s
    }

    fn styles() -> Vec<CardStyle> {
        let mut out = Vec::new();
        for locale in [Locale::Zh, Locale::En] {
            for include_description in [true, false] {
                for privacy_policy_url in [None, Some("https://example.com/privacy".to_owned())] {
                    out.push(CardStyle {
                        locale,
                        include_description,
                        privacy_policy_url,
                        template_id: None,
                    });
                }
            }
        }
        out
    }

    #[test]
    fn every_card_in_every_style_is_a_valid_card() {
        let scopes = vec![
            "offline_access".to_owned(),
            "contact:user.base:readonly".to_owned(),
        ];
        for style in styles() {
            let card = authorize_card(
                &style,
                &scopes,
                Duration::from_secs(600),
                "https://open.feishu.cn/authorize?x=1",
                "s1",
            );
            check_card(&card).unwrap_or_else(|e| panic!("{style:?}: {e}\n{card}"));
            for kind in [
                CardKind::Authorized,
                CardKind::Rejected,
                CardKind::Expired,
                CardKind::Failed(FailureReason::StateMismatch),
                CardKind::Failed(FailureReason::UnknownError),
            ] {
                for name in [None, Some("Alice")] {
                    let c = final_card(&style, kind, &session(name));
                    check_card(&c).unwrap_or_else(|e| panic!("{style:?} {kind:?}: {e}\n{c}"));
                }
            }
        }
        // The checker itself refuses what the platform refuses.
        let good = authorize_card(
            &CardStyle::default(),
            &scopes,
            Duration::from_secs(60),
            "https://x/",
            "s",
        );
        for broken in [
            json!({"schema": "1.0"}),
            {
                let mut c = good.clone();
                c["config"]["update_multi"] = json!(false);
                c
            },
            {
                let mut c = good.clone();
                c["header"]["title"]["content"] = json!("");
                c
            },
            {
                let mut c = good.clone();
                c["body"]["elements"][1]["behaviors"][0]["default_url"] = json!("javascript:x");
                c
            },
            {
                let mut c = good.clone();
                c["body"]["elements"][2]["behaviors"][0]["value"] = json!("s");
                c
            },
        ] {
            assert!(check_card(&broken).is_err(), "{broken}");
        }
    }

    #[test]
    fn cards_are_in_chinese_by_default() {
        let style = CardStyle::default();
        assert_eq!(style.locale, Locale::Zh);
        assert!(style.include_description);
        let card = authorize_card(
            &style,
            &["offline_access".to_owned()],
            Duration::from_secs(600),
            "https://x/",
            "s1",
        );
        assert_eq!(card["header"]["title"]["content"], "用户授权请求");
        let elements = card["body"]["elements"].as_array().unwrap();
        assert_eq!(elements[1]["text"]["content"], "授权");
        assert_eq!(elements[2]["text"]["content"], "取消");
        let body = elements[0]["content"].as_str().unwrap();
        assert!(
            body.contains("`offline_access`") && body.contains("10 分钟"),
            "{body}"
        );
        let done = final_card(&style, CardKind::Authorized, &session(Some("小明")));
        assert_eq!(done["header"]["title"]["content"], "授权成功");
        assert!(done.to_string().contains("小明"));
        assert_eq!(rejected_toast(Locale::Zh), "已取消授权");
        let english = CardStyle {
            locale: Locale::En,
            ..CardStyle::default()
        };
        let card = authorize_card(&english, &[], Duration::from_secs(60), "https://x/", "s1");
        assert_eq!(card["header"]["title"]["content"], "Authorization required");
        assert!(card.to_string().contains("1 minute."), "{card}");
    }

    #[test]
    fn short_description_privacy_link_and_template() {
        let scopes = vec!["offline_access".to_owned()];
        let short = CardStyle {
            include_description: false,
            ..CardStyle::default()
        };
        let body = authorize_body(&short, &scopes, Duration::from_secs(120));
        assert!(
            !body.contains("offline_access"),
            "the short text lists no permissions: {body}"
        );
        assert!(body.contains("2 分钟"), "{body}");
        let with_link = CardStyle {
            locale: Locale::En,
            privacy_policy_url: Some("https://example.com/privacy".into()),
            ..CardStyle::default()
        };
        let body = authorize_body(&with_link, &scopes, Duration::from_secs(120));
        assert!(
            body.ends_with("[Privacy policy](https://example.com/privacy)"),
            "{body}"
        );
        let template = CardStyle {
            template_id: Some("AAqk1234".into()),
            ..CardStyle::default()
        };
        let card = authorize_card(
            &template,
            &scopes,
            Duration::from_secs(600),
            "https://x/auth",
            "s9",
        );
        assert_eq!(card["type"], "template");
        assert_eq!(card["data"]["template_id"], "AAqk1234");
        let vars = &card["data"]["template_variable"];
        assert_eq!(vars["authorize_url"], "https://x/auth");
        assert_eq!(vars["session_id"], "s9");
        assert_eq!(vars["title"], "用户授权请求");
        assert_eq!(vars["authorize_label"], "授权");
    }

    #[test]
    pub(super) fn pages_say_nothing_secret() {
        for p in [
            Page::Authorized,
            Page::Rejected,
            Page::Expired,
            Page::Failed(FailureReason::UnknownError),
            Page::Failed(FailureReason::StateMismatch),
        ] {
            let (_, Html(body)) = page_html(p);
            assert!(body.starts_with("<!doctype html>"));
            assert!(!body.contains("Error:"));
        }
    }
}
