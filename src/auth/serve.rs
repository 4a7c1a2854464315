//! Serving a user's access token, refreshed first when it is due.

use secrecy::SecretString;

use super::error::TokenError;
use super::flow::AuthService;
use super::request::UserRef;
use crate::storage::{self, UserToken};

/// A usable access token.
#[derive(Clone, Debug)]
pub struct AccessToken {
    /// The token.
    pub access_token: SecretString,
    /// When it expires (unix ms).
    pub expires_at: u64,
}

impl AuthService {
    /// The key (store `user_id`) of `user`'s token, trying the other kind of id through the
    /// users table when the token was asked for with it.
    pub(super) async fn token_key(&self, user: &UserRef) -> Result<Option<String>, storage::Error> {
        let app = self.inner.app_id.clone();
        let user = user.clone();
        self.store()
            .run(move |s| {
                if s.get_token(&app, user.id())?.is_some() {
                    return Ok(Some(user.id().to_owned()));
                }
                let other = match &user {
                    UserRef::OpenId(o) => s.get_user(&app, o)?.and_then(|u| u.user_id),
                    UserRef::UserId(u) => s
                        .list_users(&app)?
                        .into_iter()
                        .find(|x| x.user_id.as_deref() == Some(u))
                        .map(|x| x.open_id),
                };
                match other {
                    Some(k) if s.get_token(&app, &k)?.is_some() => Ok(Some(k)),
                    _ => Ok(None),
                }
            })
            .await
    }

    pub(super) async fn load_token(&self, key: &str) -> Result<Option<UserToken>, storage::Error> {
        let app = self.inner.app_id.clone();
        let key = key.to_owned();
        self.store().run(move |s| s.get_token(&app, &key)).await
    }

    /// A valid access token of `user`, refreshed first when it is due (past the refresh
    /// threshold) or expired.
    pub async fn user_token(&self, user: UserRef) -> Result<SecretString, TokenError> {
        self.access_token(user).await.map(|t| t.access_token)
    }

    /// [`Self::user_token`] with the token's expiry.
    pub async fn access_token(&self, user: UserRef) -> Result<AccessToken, TokenError> {
        let key = self.token_key(&user).await?.ok_or(TokenError::NotFound)?;
        let tok = self.load_token(&key).await?.ok_or(TokenError::NotFound)?;
        if tok.needs_reauth {
            return Err(TokenError::NeedsReauth {
                session: tok.session_id,
            });
        }
        let now = self.now();
        if tok.refresh_in_doubt_since.is_none() && now < tok.refresh_due_at && now < tok.expires_at
        {
            return Ok(AccessToken {
                access_token: tok.access_token,
                expires_at: tok.expires_at,
            });
        }
        let tok = self.refresh_if_due(&key).await?;
        Ok(AccessToken {
            access_token: tok.access_token,
            expires_at: tok.expires_at,
        })
    }
}
