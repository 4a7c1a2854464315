//! [`TokenStore`] and [`UserStore`] on PostgreSQL. The refresh queue is a partial index on
//! `refresh_due_at` over the refreshable tokens, so `tokens_due` reads only the due part.

use tokio_postgres::Transaction;

use super::rows::{stored_token, user, TokenParams, TOKEN_COLUMNS};
use super::{db_time, pg_err, PgStore};
use crate::storage::records::StoredToken;
use crate::storage::sessions::validate_ids;
use crate::storage::traits::{TokenStore, UserStore};
use crate::storage::{Result, UserInfo, UserToken};

/// Upserts a user's current token inside `tx`.
pub(crate) async fn write_token(
    store: &PgStore,
    tx: &Transaction<'_>,
    token: &UserToken,
) -> Result<()> {
    validate_ids(&token.app_id, &token.user_id)?;
    let p = TokenParams::new(
        &token.app_id,
        &token.user_id,
        StoredToken::seal(token, store.ring()),
    );
    tx.execute(
        &format!(
            "INSERT INTO ls_tokens ({TOKEN_COLUMNS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
             ON CONFLICT (app_id, user_id) DO UPDATE SET
                open_id = EXCLUDED.open_id, access_token = EXCLUDED.access_token,
                access_token_key = EXCLUDED.access_token_key,
                refresh_token = EXCLUDED.refresh_token,
                refresh_token_key = EXCLUDED.refresh_token_key,
                expires_at = EXCLUDED.expires_at,
                refresh_expires_at = EXCLUDED.refresh_expires_at,
                refresh_due_at = EXCLUDED.refresh_due_at, scopes = EXCLUDED.scopes,
                obtained_at = EXCLUDED.obtained_at, session_id = EXCLUDED.session_id,
                needs_reauth = EXCLUDED.needs_reauth,
                refresh_in_doubt_since = EXCLUDED.refresh_in_doubt_since"
        ),
        &p.params(),
    )
    .await
    .map_err(|e| pg_err(&e))?;
    Ok(())
}

impl TokenStore for PgStore {
    fn put_token(&self, token: &UserToken) -> Result<()> {
        self.with(async |c| {
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            write_token(self, &tx, token).await?;
            tx.commit().await.map_err(|e| pg_err(&e))
        })
    }

    fn get_token(&self, app_id: &str, user_id: &str) -> Result<Option<UserToken>> {
        self.with(async |c| {
            let row = c
                .query_opt(
                    &format!(
                        "SELECT {TOKEN_COLUMNS} FROM ls_tokens WHERE app_id = $1 AND user_id = $2"
                    ),
                    &[&app_id, &user_id],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            row.map(|r| stored_token(&r)?.open(app_id, user_id, self.ring()))
                .transpose()
        })
    }

    fn delete_token(&self, app_id: &str, user_id: &str) -> Result<bool> {
        self.with(async |c| {
            let n = c
                .execute(
                    "DELETE FROM ls_tokens WHERE app_id = $1 AND user_id = $2",
                    &[&app_id, &user_id],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            Ok(n > 0)
        })
    }

    fn tokens_due(&self, now: u64, limit: usize) -> Result<Vec<(String, String, u64)>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(async |c| {
            let rows = c
                .query(
                    "SELECT app_id, user_id, refresh_due_at FROM ls_tokens
                     WHERE refresh_token IS NOT NULL AND NOT needs_reauth
                       AND refresh_due_at <= $1
                     ORDER BY refresh_due_at, app_id, user_id LIMIT $2",
                    &[&db_time(now), &limit],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            rows.iter()
                .map(|r| {
                    let due: i64 = r.try_get(2).map_err(|e| pg_err(&e))?;
                    Ok((
                        r.try_get(0).map_err(|e| pg_err(&e))?,
                        r.try_get(1).map_err(|e| pg_err(&e))?,
                        super::api_time(due, "tokens")?,
                    ))
                })
                .collect()
        })
    }
}

const USER_COLUMNS: &str =
    "app_id, open_id, user_id, union_id, name, email, avatar_url, updated_at";

impl UserStore for PgStore {
    fn put_user(&self, u: &UserInfo) -> Result<()> {
        validate_ids(&u.app_id, &u.open_id)?;
        self.with(async |c| {
            c.execute(
                &format!(
                    "INSERT INTO ls_users ({USER_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                     ON CONFLICT (app_id, open_id) DO UPDATE SET user_id = EXCLUDED.user_id,
                        union_id = EXCLUDED.union_id, name = EXCLUDED.name,
                        email = EXCLUDED.email, avatar_url = EXCLUDED.avatar_url,
                        updated_at = EXCLUDED.updated_at"
                ),
                &[
                    &u.app_id,
                    &u.open_id,
                    &u.user_id,
                    &u.union_id,
                    &u.name,
                    &u.email,
                    &u.avatar_url,
                    &db_time(u.updated_at),
                ],
            )
            .await
            .map_err(|e| pg_err(&e))?;
            Ok(())
        })
    }

    fn get_user(&self, app_id: &str, open_id: &str) -> Result<Option<UserInfo>> {
        self.with(async |c| {
            let row = c
                .query_opt(
                    &format!(
                        "SELECT {USER_COLUMNS} FROM ls_users WHERE app_id = $1 AND open_id = $2"
                    ),
                    &[&app_id, &open_id],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            row.map(|r| user(&r)).transpose()
        })
    }

    fn list_users(&self, app_id: &str) -> Result<Vec<UserInfo>> {
        self.with(async |c| {
            let rows = c
                .query(
                    &format!(
                        "SELECT {USER_COLUMNS} FROM ls_users WHERE app_id = $1 ORDER BY open_id"
                    ),
                    &[&app_id],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            rows.iter().map(user).collect()
        })
    }
}
