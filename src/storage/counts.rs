//! Sessions per state, kept as they are written: the `session_counts` table is changed in the
//! same write transaction as every session write, expiry and purge, so reading the gauges (on a
//! timer) reads six numbers, never the sessions. Schema 6 built it once from the records.

use redb::{ReadableTable, Table};

use super::records::StoredSession;
use super::tables::{SESSIONS, SESSIONS_EXPIRED, SESSION_COUNTS};
use super::{Result, SessionState, Store};

/// The key of a state in `session_counts`: its place in [`SessionState::ALL`].
pub(crate) fn state_key(state: SessionState) -> u8 {
    match state {
        SessionState::Pending => 0,
        SessionState::Completed => 1,
        SessionState::Expired => 2,
        SessionState::Failed => 3,
        SessionState::Rejected => 4,
        SessionState::Revoked => 5,
    }
}

/// Changes in the per-state counts, gathered and applied once per transaction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CountDelta([i64; 6]);

impl CountDelta {
    /// One session more in `state`.
    pub(crate) fn add(&mut self, state: SessionState) {
        self.0[usize::from(state_key(state))] += 1;
    }

    /// One session fewer in `state`.
    pub(crate) fn remove(&mut self, state: SessionState) {
        self.0[usize::from(state_key(state))] -= 1;
    }

    /// A session moved from `old` (none: it is new) to `new`.
    pub(crate) fn moved(&mut self, old: Option<SessionState>, new: SessionState) {
        if old != Some(new) {
            if let Some(old) = old {
                self.remove(old);
            }
            self.add(new);
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.iter().all(|d| *d == 0)
    }
}

impl Store {
    /// Adds `delta` to the counts inside the caller's transaction (a count never goes below 0).
    pub(crate) fn apply_counts(
        &self,
        table: &mut Table<'_, u8, u64>,
        delta: &CountDelta,
    ) -> Result<()> {
        for (key, d) in (0u8..).zip(delta.0) {
            if d == 0 {
                continue;
            }
            let now = table
                .get(key)
                .map_err(|e| self.err(e))?
                .map_or(0, |v| v.value());
            let next = now.saturating_add_signed(d);
            table.insert(key, next).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Number of sessions in each state, from the counts table (reads no session).
    pub fn count_sessions_by_state(&self) -> Result<Vec<(SessionState, u64)>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(SESSION_COUNTS).map_err(|e| self.err(e))?;
        SessionState::ALL
            .into_iter()
            .map(|s| {
                let n = t.get(state_key(s)).map_err(|e| self.err(e))?;
                Ok((s, n.map_or(0, |v| v.value())))
            })
            .collect()
    }

    /// Counts the sessions by decoding every record (the migration, and tests that check the
    /// kept counts against it).
    pub(crate) fn recount_in(&self, txn: &redb::WriteTransaction) -> Result<[u64; 6]> {
        let sessions = txn.open_table(SESSIONS).map_err(|e| self.err(e))?;
        let expired = txn.open_table(SESSIONS_EXPIRED).map_err(|e| self.err(e))?;
        let mut counts = [0u64; 6];
        for row in sessions.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let at = expired.get(k.value()).map_err(|e| self.err(e))?;
            let s = StoredSession::decode(v.value())?.overlay(at.map(|a| a.value()));
            counts[usize::from(state_key(s.state))] += 1;
        }
        Ok(counts)
    }

    /// Rebuilds the counts table from the records (schema 6 migration).
    pub(crate) fn rebuild_counts_in(&self, txn: &redb::WriteTransaction) -> Result<()> {
        let counts = self.recount_in(txn)?;
        let mut t = txn.open_table(SESSION_COUNTS).map_err(|e| self.err(e))?;
        for (key, n) in (0u8..).zip(counts) {
            t.insert(key, n).map_err(|e| self.err(e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::storage::{
        AuthSession, Key, Keyring, PendingUpdate, SessionId, StoreOptions, UserToken,
    };

    #[derive(Clone, Debug)]
    enum Op {
        /// A new session in a state.
        Create(usize, u64),
        /// Rewrite session #i in a state.
        Put(usize, usize),
        /// Compare-and-set session #i to a state.
        Transition(usize, usize),
        /// Complete session #i with a token.
        Complete(usize),
        /// Revoke session #i.
        Revoke(usize),
        /// Sweep at a time.
        Sweep(u64),
        /// Several new sessions in one transaction.
        Batch(Vec<usize>),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0usize..6, 0u64..1000).prop_map(|(s, e)| Op::Create(s, e)),
            (any::<usize>(), 0usize..6).prop_map(|(i, s)| Op::Put(i, s)),
            (any::<usize>(), 0usize..6).prop_map(|(i, s)| Op::Transition(i, s)),
            any::<usize>().prop_map(Op::Complete),
            any::<usize>().prop_map(Op::Revoke),
            (0u64..3000).prop_map(Op::Sweep),
            proptest::collection::vec(0usize..6, 0..5).prop_map(Op::Batch),
        ]
    }

    fn token(s: &AuthSession) -> UserToken {
        UserToken {
            app_id: s.app_id.clone(),
            user_id: s.user_id.clone(),
            open_id: None,
            access_token: "at".to_owned().into(),
            refresh_token: None,
            expires_at: 10,
            refresh_expires_at: None,
            refresh_due_at: 5,
            scopes: vec![],
            obtained_at: 1,
            session_id: Some(s.session_id),
            needs_reauth: false,
            refresh_in_doubt_since: None,
        }
    }

    fn recount(store: &Store) -> Vec<(SessionState, u64)> {
        let txn = store.begin_write().unwrap();
        let counts = store.recount_in(&txn).unwrap();
        txn.abort().unwrap();
        SessionState::ALL.into_iter().zip(counts).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever the writes, expiries and purges, the kept counts equal a full recount.
        #[test]
        fn kept_counts_equal_a_full_recount(ops in proptest::collection::vec(op(), 1..40)) {
            let store = Store::open_in_memory(
                Keyring::new(Key::from_bytes(&[4; 32]), vec![]),
                StoreOptions { terminal_retention: Duration::from_millis(500), ..StoreOptions::default() },
            ).unwrap();
            let mut ids: Vec<SessionId> = Vec::new();
            let new = |state: usize, expires: u64, n: usize| {
                let mut s = AuthSession::new_pending("cli_app", &format!("u{}", n % 3), vec![], 0, expires);
                s.state = SessionState::ALL[state];
                s.state_hash = Some([u8::try_from(n % 250).unwrap(); 32]);
                s
            };
            for op in ops {
                let pick = |i: usize| (!ids.is_empty()).then(|| ids[i % ids.len()]);
                match op {
                    Op::Create(state, expires) => {
                        let s = new(state, expires, ids.len());
                        store.put_session(&s).unwrap();
                        ids.push(s.session_id);
                    }
                    Op::Batch(states) => {
                        let batch: Vec<AuthSession> = states.iter().enumerate()
                            .map(|(k, st)| new(*st, 100, ids.len() + k)).collect();
                        store.put_sessions(&batch).unwrap();
                        ids.extend(batch.iter().map(|s| s.session_id));
                    }
                    Op::Put(i, state) => if let Some(id) = pick(i) {
                        if let Some(mut s) = store.get_session(id).unwrap() {
                            s.state = SessionState::ALL[state];
                            store.put_session(&s).unwrap();
                        }
                    },
                    Op::Transition(i, state) => if let Some(id) = pick(i) {
                        if let Some(mut s) = store.get_session(id).unwrap() {
                            let h = s.state_hash;
                            s.state = SessionState::ALL[state];
                            let r = store.update_if_pending(h, &s, None).unwrap();
                            prop_assert!(!matches!(r, PendingUpdate::Missing));
                        }
                    },
                    Op::Complete(i) => if let Some(id) = pick(i) {
                        if let Some(mut s) = store.get_session(id).unwrap() {
                            s.state = SessionState::Completed;
                            store.complete_session(&s, &token(&s)).unwrap();
                        }
                    },
                    Op::Revoke(i) => if let Some(id) = pick(i) {
                        store.revoke_session(id, 7).unwrap();
                    },
                    Op::Sweep(now) => {
                        store.sweep(now, 3).unwrap();
                    }
                }
                prop_assert_eq!(store.count_sessions_by_state().unwrap(), recount(&store));
            }
        }
    }

    /// A store written before the counts existed (schema 5) is counted once when opened.
    #[test]
    fn a_schema_5_store_gets_its_counts_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let ring = || Keyring::new(Key::from_bytes(&[4; 32]), vec![]);
        {
            let store = Store::open(&path, ring(), StoreOptions::default()).unwrap();
            let mut done = AuthSession::new_pending("cli_app", "a", vec![], 0, 100);
            done.state = SessionState::Completed;
            let pending = AuthSession::new_pending("cli_app", "b", vec![], 0, 100);
            let pending2 = AuthSession::new_pending("cli_app", "c", vec![], 0, 100);
            store.put_sessions(&[done, pending, pending2]).unwrap();
            // Back to schema 5: no counts table yet.
            let txn = store.begin_write().unwrap();
            txn.delete_table(SESSION_COUNTS).unwrap();
            txn.commit().unwrap();
        }
        crate::storage::testing::set_schema_version(&path, 5).unwrap();
        let store = Store::open(&path, ring(), StoreOptions::default()).unwrap();
        assert_eq!(
            store.schema_version().unwrap(),
            crate::storage::tables::SCHEMA_VERSION
        );
        let counts = store.count_sessions_by_state().unwrap();
        assert_eq!(counts[0], (SessionState::Pending, 2));
        assert_eq!(counts[1], (SessionState::Completed, 1));
        assert_eq!(counts.iter().map(|c| c.1).sum::<u64>(), 3);
    }
}
