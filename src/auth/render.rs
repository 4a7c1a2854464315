//! What users see: the cards and the browser pages. Fixed texts only.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::Html;
use serde_json::Value;

use super::state::{CardKind, Page};
use crate::lark::card;
use crate::storage::{AuthSession, FailureReason};

pub(super) const CARD_TITLE: &str = "Authorization required";

pub(super) fn authorize_body(scopes: &[String], expiry: Duration) -> String {
    let list = scopes
        .iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let minutes = expiry.as_secs().div_ceil(60).max(1);
    format!(
        "This app asks to act on your behalf.\n\n**Permissions:** {list}\n\nThe request is valid for {minutes} minute{}.",
        if minutes == 1 { "" } else { "s" }
    )
}

pub(super) fn failure_text(r: FailureReason) -> &'static str {
    match r {
        FailureReason::CodeExpired => "The authorization took too long to complete.",
        FailureReason::MissingCode => "The authorization page did not return a code.",
        FailureReason::UserRejected => "You declined the request.",
        FailureReason::StateMismatch => {
            "This authorization link is no longer valid: it was already used, or it belongs to someone else."
        }
        FailureReason::SessionExpired => "The authorization request expired.",
        FailureReason::UnknownError => "Something went wrong while completing the authorization.",
    }
}

/// The card that replaces the authorize card.
pub(super) fn final_card(kind: CardKind, s: &AuthSession) -> Value {
    match kind {
        CardKind::Authorized => {
            let who = s
                .user_name
                .as_deref()
                .map(|n| format!(", {n}"))
                .unwrap_or_default();
            card::authorized_card(
                "Authorization complete",
                &format!("Thank you{who}. The app can now act with the permissions you granted."),
            )
        }
        CardKind::Rejected => card::rejected_card(
            "Authorization declined",
            "You declined this request. Nothing was granted.",
        ),
        CardKind::Expired => card::expired_card(
            "Authorization request expired",
            "This request is no longer valid. Send `/authorize` to get a new one.",
        ),
        CardKind::Failed(r) => card::expired_card(
            "Authorization failed",
            &format!("{} Send `/authorize` to try again.", failure_text(r)),
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
            failure_text(r),
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
