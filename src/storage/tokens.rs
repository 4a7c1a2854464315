//! User tokens (with their refresh-due index) and user records.

use redb::{ReadableTable, ReadableTableMetadata, WriteTransaction};

use super::records::{encode, StoredToken, USER_VERSION};
use super::sessions::validate_ids;
use super::tables::{TOKENS, TOKEN_REFRESH_DUE, USERS};
use super::{OutboxEvent, Result, Store, UserInfo, UserToken};

impl Store {
    /// Writes a token inside an open transaction, keeping the refresh-due index in step.
    pub(crate) fn write_token_in(&self, txn: &WriteTransaction, token: &UserToken) -> Result<()> {
        validate_ids(&token.app_id, &token.user_id)?;
        let stored = StoredToken::seal(token, self.ring());
        let key = (token.app_id.as_str(), token.user_id.as_str());
        let mut tokens = txn.open_table(TOKENS).map_err(|e| self.err(e))?;
        let mut due = txn.open_table(TOKEN_REFRESH_DUE).map_err(|e| self.err(e))?;
        let old = tokens
            .get(key)
            .map_err(|e| self.err(e))?
            .map(|v| StoredToken::decode(v.value()))
            .transpose()?;
        if let Some(old) = old {
            due.remove((old.refresh_due_at, key.0, key.1))
                .map_err(|e| self.err(e))?;
        }
        tokens
            .insert(key, stored.encode().as_slice())
            .map_err(|e| self.err(e))?;
        if refreshable(&stored) {
            due.insert((stored.refresh_due_at, key.0, key.1), ())
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Creates or replaces a user's current token; durable when it returns.
    pub fn put_token(&self, token: &UserToken) -> Result<()> {
        let txn = self.begin_write()?;
        self.write_token_in(&txn, token)?;
        self.commit(txn)
    }

    /// [`Store::put_token`] that also appends `events` to the webhook outbox (at `now`) in the
    /// same durable transaction.
    pub fn put_token_with_events(
        &self,
        token: &UserToken,
        events: &[OutboxEvent],
        now: u64,
    ) -> Result<()> {
        let txn = self.begin_write()?;
        self.write_token_in(&txn, token)?;
        self.append_outbox_in(&txn, events, now)?;
        self.commit(txn)
    }

    /// [`Store::delete_token`] that also appends `events` (at `now`) when there was a token,
    /// in the same durable transaction.
    pub fn delete_token_with_events(
        &self,
        app_id: &str,
        user_id: &str,
        events: &[OutboxEvent],
        now: u64,
    ) -> Result<bool> {
        let txn = self.begin_write()?;
        let existed = self.delete_token_in(&txn, app_id, user_id)?;
        if existed {
            self.append_outbox_in(&txn, events, now)?;
        }
        self.commit(txn)?;
        Ok(existed)
    }

    /// Reads a user's current token.
    pub fn get_token(&self, app_id: &str, user_id: &str) -> Result<Option<UserToken>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(TOKENS).map_err(|e| self.err(e))?;
        let Some(v) = t.get((app_id, user_id)).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        StoredToken::decode(v.value())?
            .open(app_id, user_id, self.ring())
            .map(Some)
    }

    /// Deletes a user's token; true if there was one.
    pub fn delete_token(&self, app_id: &str, user_id: &str) -> Result<bool> {
        let txn = self.begin_write()?;
        let existed = self.delete_token_in(&txn, app_id, user_id)?;
        self.commit(txn)?;
        Ok(existed)
    }

    fn delete_token_in(&self, txn: &WriteTransaction, app_id: &str, user_id: &str) -> Result<bool> {
        let existed = {
            let mut t = txn.open_table(TOKENS).map_err(|e| self.err(e))?;
            let old = t
                .remove((app_id, user_id))
                .map_err(|e| self.err(e))?
                .map(|v| StoredToken::decode(v.value()))
                .transpose()?;
            if let Some(old) = &old {
                let mut due = txn.open_table(TOKEN_REFRESH_DUE).map_err(|e| self.err(e))?;
                due.remove((old.refresh_due_at, app_id, user_id))
                    .map_err(|e| self.err(e))?;
            }
            old.is_some()
        };
        Ok(existed)
    }

    /// Users whose tokens are due for refresh at `now`, soonest first, at most `limit`:
    /// reads only the due part of the index.
    pub fn tokens_due(&self, now: u64, limit: usize) -> Result<Vec<(String, String, u64)>> {
        let txn = self.begin_read()?;
        let due = txn.open_table(TOKEN_REFRESH_DUE).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in due
            .range(..(now.saturating_add(1), "", ""))
            .map_err(|e| self.err(e))?
            .take(limit)
        {
            let (k, _) = row.map_err(|e| self.err(e))?;
            let (at, app, user) = k.value();
            out.push((app.to_owned(), user.to_owned(), at));
        }
        Ok(out)
    }

    /// Users whose token the service keeps fresh: with a refresh token and not needing a new
    /// authorization. That is the length of the refresh-due index, which redb keeps in the
    /// table's header: no token is read.
    pub fn count_active_tokens(&self) -> Result<u64> {
        let txn = self.begin_read()?;
        let due = txn.open_table(TOKEN_REFRESH_DUE).map_err(|e| self.err(e))?;
        due.len().map_err(|e| self.err(e))
    }

    /// Creates or replaces a user record.
    pub fn put_user(&self, user: &UserInfo) -> Result<()> {
        validate_ids(&user.app_id, &user.open_id)?;
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(USERS).map_err(|e| self.err(e))?;
            t.insert(
                (user.app_id.as_str(), user.open_id.as_str()),
                encode(USER_VERSION, user).as_slice(),
            )
            .map_err(|e| self.err(e))?;
        }
        self.commit(txn)
    }

    /// Reads a user by open_id.
    pub fn get_user(&self, app_id: &str, open_id: &str) -> Result<Option<UserInfo>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(USERS).map_err(|e| self.err(e))?;
        t.get((app_id, open_id))
            .map_err(|e| self.err(e))?
            .map(|v| UserInfo::decode_stored(v.value()))
            .transpose()
    }

    /// Every user of an app, for the user-info sync.
    pub fn list_users(&self, app_id: &str) -> Result<Vec<UserInfo>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(USERS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in t.range((app_id, "")..).map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            if k.value().0 != app_id {
                break;
            }
            out.push(UserInfo::decode_stored(v.value())?);
        }
        Ok(out)
    }
}

pub(crate) fn refreshable(t: &StoredToken) -> bool {
    t.refresh_token.is_some() && !t.needs_reauth
}

#[cfg(test)]
mod tests {
    use crate::storage::{Key, Keyring, Store, StoreOptions, UserToken};

    fn token(user: &str, refresh: bool, needs_reauth: bool) -> UserToken {
        UserToken {
            app_id: "cli_app".into(),
            user_id: user.into(),
            open_id: None,
            access_token: "at".to_owned().into(),
            refresh_token: refresh.then(|| "rt".to_owned().into()),
            expires_at: 10,
            refresh_expires_at: None,
            refresh_due_at: 5,
            scopes: vec![],
            obtained_at: 1,
            session_id: None,
            needs_reauth,
            refresh_in_doubt_since: None,
        }
    }

    /// The active-token count follows writes, re-writes (a token that now needs a new
    /// authorization stops counting) and deletes, and leaves out tokens without a refresh token.
    #[test]
    fn active_tokens_are_the_refreshable_ones() {
        let store = Store::open_in_memory(
            Keyring::new(Key::from_bytes(&[4; 32]), vec![]),
            StoreOptions::default(),
        )
        .unwrap();
        assert_eq!(store.count_active_tokens().unwrap(), 0);
        store.put_token(&token("a", true, false)).unwrap();
        store.put_token(&token("b", true, false)).unwrap();
        store.put_token(&token("c", false, false)).unwrap();
        store.put_token(&token("d", true, true)).unwrap();
        assert_eq!(store.count_active_tokens().unwrap(), 2);
        // Rewriting a token does not count it twice.
        store.put_token(&token("a", true, false)).unwrap();
        assert_eq!(store.count_active_tokens().unwrap(), 2);
        store.put_token(&token("b", true, true)).unwrap();
        assert_eq!(store.count_active_tokens().unwrap(), 1);
        assert!(store.delete_token("cli_app", "a").unwrap());
        assert_eq!(store.count_active_tokens().unwrap(), 0);
    }
}
