//! Revoking a session or a user's token.
//!
//! Feishu has no public API to revoke a user's grant: revoking deletes our copy of the
//! access and refresh tokens (the refresh token is forgotten, so nothing can renew the
//! grant from here) and marks the session revoked. Under the user's token lock, so a refresh
//! in flight finishes first and none starts from a deleted token.

use tracing::info;

use super::flow::AuthService;
use super::request::UserRef;
use crate::storage::{self, SessionId};

/// What [`AuthService::revoke_user`] deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revoked {
    /// The store key (user id or open id) the token was kept under.
    pub user_id: String,
    /// The session that produced the token, now revoked.
    pub session_id: Option<SessionId>,
}

impl AuthService {
    /// Revokes the authorization session `id` of this app: it becomes `revoked` and the token
    /// it produced (if still current) is deleted. `None` if there is no such session.
    pub async fn revoke_session(
        &self,
        id: SessionId,
    ) -> Result<Option<storage::SessionSummary>, storage::Error> {
        let Some(summary) = self
            .store()
            .run(move |s| s.get_session_summary(id))
            .await?
            .filter(|s| s.app_id == self.inner.app_id)
        else {
            return Ok(None);
        };
        let _guard = self.inner.token_locks.lock(&summary.user_id).await;
        let now = self.now();
        let me = self.clone();
        self.store()
            .run(move |s| {
                s.revoke_session_with_events(id, now, |r| {
                    me.revoked_events(&r.user_id, r.open_id.as_deref(), Some(id), now)
                })?;
                s.get_session_summary(id)
            })
            .await
            .inspect(
                |_| info!(session = %id, "Session revoked; its token (if current) was deleted."),
            )
    }

    /// Revokes `user`'s authorization: deletes the stored access and refresh tokens and marks
    /// the session that produced them revoked. `None` if the user has no token.
    pub async fn revoke_user(&self, user: UserRef) -> Result<Option<Revoked>, storage::Error> {
        let Some(key) = self.token_key(&user).await? else {
            return Ok(None);
        };
        let _guard = self.inner.token_locks.lock(&key).await;
        let app = self.inner.app_id.clone();
        let now = self.now();
        let k = key.clone();
        let me = self.clone();
        let revoked = self
            .store()
            .run(move |s| {
                let Some(tok) = s.get_token(&app, &k)? else {
                    return Ok(None);
                };
                let events = me.revoked_events(&k, tok.open_id.as_deref(), tok.session_id, now);
                // With a session, the event goes with the session's revocation (which deletes
                // the token it produced); without one, with the token's deletion.
                let revoked_session = match tok.session_id {
                    Some(id) => s
                        .revoke_session_with_events(id, now, |_| events.clone())?
                        .is_some(),
                    None => false,
                };
                if revoked_session {
                    s.delete_token(&app, &k)?;
                } else {
                    s.delete_token_with_events(&app, &k, &events, now)?;
                }
                Ok(Some(Revoked {
                    user_id: k,
                    session_id: tok.session_id,
                }))
            })
            .await?;
        if revoked.is_some() {
            info!(user = %key, "User's tokens revoked (deleted from the store).");
        }
        Ok(revoked)
    }
}
