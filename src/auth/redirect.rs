//! The OAuth redirect: the state is checked, the code exchanged, and the new token's user
//! must be the card's user, of the app's own tenant, before anything is stored.

use axum::http::StatusCode;
use axum::response::Html;
use secrecy::SecretString;
use tracing::warn;

use super::error::AuthError;
use super::flow::{AuthService, Run};
use super::render::{error_page, page_html};
use super::request::state_hash;
use super::state::{ExchangeError, Identity, Input, Page, Phase};
use super::sync::user_record;
use crate::lark::{self, OAuthErrorKind};
use crate::storage::{AuthSession, FailureReason};

/// Who completed the flow, compared with the user the session was asked for.
///
/// Every session made by [`AuthService::request`] knows the open_id of its user (a user_id is
/// resolved when the request is made), and the user info of the new token always names its
/// open_id: they must be equal. A session asked for by user_id also requires the user info's
/// user_id, when it has one, to be that user_id. A session stored by an older version with no
/// open_id is identified by user_id alone; if the user info has none (the app may not read
/// user_ids) the identity is unknown, and the completion is refused.
pub(super) fn identify(s: &AuthSession, info: &lark::UserInfo) -> Identity {
    let by_user_id = s.open_id.as_deref() != Some(s.user_id.as_str());
    match (&s.open_id, &info.user_id) {
        (Some(o), _) if *o != info.open_id => Identity::Mismatch,
        (Some(_), Some(u)) if by_user_id && *u != s.user_id => Identity::Mismatch,
        (Some(_), _) => Identity::Matches,
        (None, Some(u)) if *u == s.user_id => Identity::Matches,
        (None, Some(_)) => Identity::Mismatch,
        (None, None) => Identity::Unknown,
    }
}

impl AuthService {
    /// The app's own `tenant_key` (read once from the tenant query, then kept).
    pub(super) async fn app_tenant(&self) -> Result<String, lark::Error> {
        self.inner
            .tenant
            .get_or_try_init(|| self.lark().app_tenant_key())
            .await
            .cloned()
    }

    /// The completing user must belong to the app's own tenant: a user of another company with
    /// the same open_id (open_ids are per app) is not the card's user. Unknown when either
    /// tenant cannot be read: the completion is refused.
    pub(super) async fn same_tenant(&self, s: &AuthSession, info: &lark::UserInfo) -> Identity {
        let Some(theirs) = info.tenant_key.as_deref().filter(|t| !t.is_empty()) else {
            warn!(session = %s.session_id, "The new token's user info names no tenant; the authorization is refused.");
            return Identity::Unknown;
        };
        match self.app_tenant().await {
            Ok(ours) if ours == theirs => Identity::Matches,
            Ok(_) => {
                warn!(session = %s.session_id, "The authorization was completed by a user of another tenant; refused.");
                Identity::Mismatch
            }
            Err(e) => {
                warn!(session = %s.session_id, error = %e, "The app's tenant could not be read; the authorization is refused.");
                Identity::Unknown
            }
        }
    }

    /// The OAuth redirect (`GET /oauth/callback?…`, the query without `?`): validates the
    /// state, exchanges the code, stores the tokens, updates the card, and answers the
    /// browser with a small page.
    pub async fn oauth_callback(&self, query: &str) -> (StatusCode, Html<String>) {
        match self.oauth_callback_inner(query).await {
            Ok(p) => page_html(p),
            Err(e) => {
                warn!(error = %e, "OAuth callback failed.");
                error_page()
            }
        }
    }

    pub(super) async fn oauth_callback_inner(&self, query: &str) -> Result<Page, AuthError> {
        let mut code = None;
        let mut state = None;
        let mut error = None;
        for (k, v) in url::form_urlencoded::parse(query.trim_start_matches('?').as_bytes()) {
            match &*k {
                "code" => code = Some(v.into_owned()),
                "state" => state = Some(v.into_owned()),
                "error" => error = Some(v.into_owned()),
                _ => {}
            }
        }
        let mismatch = || {
            self.count_failure(FailureReason::StateMismatch);
            Ok(Page::Failed(FailureReason::StateMismatch))
        };
        let Some(state) = state.filter(|s| !s.is_empty() && s.len() <= 512) else {
            return mismatch();
        };
        let hash = state_hash(&state);
        let Some(session) = self
            .store()
            .run(move |s| s.session_by_state_hash(&hash))
            .await?
        else {
            return mismatch();
        };
        let input = match (error.as_deref(), code.as_deref()) {
            (Some("access_denied"), _) => Input::RedirectDenied,
            (Some(_), _) => Input::RedirectError,
            (None, Some(c)) if !c.is_empty() => Input::RedirectWithCode,
            (None, _) => Input::RedirectWithoutCode,
        };
        let mut run = Run::new(session);
        run.code = code.filter(|c| !c.is_empty()).map(SecretString::from);
        self.drive(&mut run, input).await?;
        Ok(run.page.unwrap_or_else(|| Phase::of(&run.session).page()))
    }
    /// [`Effect::ExchangeCode`]: exchanges the redirect's code (with the PKCE verifier).
    pub(super) async fn exchange_code(&self, run: &mut Run) -> Input {
        let Some(code) = run.code.take() else {
            return Input::ExchangeFailed(ExchangeError::Other);
        };
        let r = self
            .lark()
            .exchange_code(
                &code,
                &self.inner.opts.redirect_uri,
                run.session.pkce_verifier.as_ref(),
            )
            .await;
        match r {
            Ok(t) => {
                run.token = Some(t);
                Input::CodeExchanged
            }
            Err(e) => {
                warn!(session = %run.session.session_id, error = %e, "Code exchange failed.");
                Input::ExchangeFailed(if e.oauth_kind() == Some(OAuthErrorKind::CodeExpired) {
                    ExchangeError::CodeExpired
                } else {
                    ExchangeError::Other
                })
            }
        }
    }

    /// [`Effect::FetchUserInfo`]: reads the new token's user and compares it with the card's
    /// user and the app's tenant.
    pub(super) async fn identify_user(&self, run: &mut Run) -> Input {
        let Some(t) = &run.token else {
            return Input::UserIdentified(Identity::Unknown);
        };
        let identity = match self.lark().user_info(&t.access_token).await {
            Ok(info) => {
                let mut id = identify(&run.session, &info);
                if id == Identity::Mismatch {
                    warn!(session = %run.session.session_id, "The authorization was completed by another user than the card's; refused.");
                }
                if id == Identity::Matches {
                    id = self.same_tenant(&run.session, &info).await;
                }
                run.info = Some(info);
                id
            }
            Err(e) => {
                warn!(session = %run.session.session_id, error = %e, "Reading the new token's user failed; the authorization is refused (who completed it is unknown).");
                Identity::Unknown
            }
        };
        Input::UserIdentified(identity)
    }

    /// [`Effect::StoreTokens`]: the token was written with the session; the user record is
    /// not secret and may follow in its own transaction.
    pub(super) async fn store_user(&self, run: &Run, now: u64) {
        let Some(info) = &run.info else {
            return;
        };
        let mut user = user_record(run.session.app_id.clone(), info, None, now);
        // The card went to a user_id when the session's user is not its open_id.
        if user.user_id.is_none() && run.session.open_id.as_deref() != Some(&run.session.user_id) {
            user.user_id = Some(run.session.user_id.clone());
        }
        if let Err(e) = self.store().run(move |s| s.put_user(&user)).await {
            warn!(error = %e, "Storing the user record failed.");
        }
    }
}
