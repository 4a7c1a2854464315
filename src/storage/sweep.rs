//! The TTL sweep: expires pending sessions, purges old terminal ones and forgets old event ids.
//!
//! It reads only the due part of the deadline indexes, so its cost is O(due), not O(all).

use redb::ReadableTable;

use super::records::StoredSession;
use super::sessions::deadline_of;
use super::tables::{
    CHANGE_DELETE, DEADLINE_EXPIRE, SEEN_EVENTS, SEEN_EVENTS_EXPIRY, SESSION_DEADLINES,
};
use super::{FailureReason, Result, SessionId, SessionState, Store};

/// What one sweep did.
#[derive(Clone, Debug, Default)]
pub struct SweepReport {
    /// Pending sessions that became `expired`, with their card message ids.
    pub expired: Vec<(SessionId, Option<String>)>,
    /// Terminal sessions deleted after retention.
    pub purged: u64,
    /// Seen event ids forgotten.
    pub events_forgotten: u64,
    /// Index entries that no longer matched their record and were repaired.
    pub repaired: u64,
}

impl Store {
    /// Ids of pending sessions whose expiry is at or before `now`, from the index alone.
    pub fn pending_expired(&self, now: u64) -> Result<Vec<SessionId>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(SESSION_DEADLINES).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in t
            .range(..(now.saturating_add(1), 0u128))
            .map_err(|e| self.err(e))?
        {
            let (k, kind) = row.map_err(|e| self.err(e))?;
            if kind.value() == DEADLINE_EXPIRE {
                out.push(SessionId(k.value().1));
            }
        }
        Ok(out)
    }

    /// Runs the sweep at `now`, committing every `batch` items so no transaction grows large.
    pub fn sweep(&self, now: u64, batch: usize) -> Result<SweepReport> {
        let batch = batch.max(1);
        let mut report = SweepReport::default();
        while self.sweep_sessions_batch(now, batch, &mut report)? {}
        while self.sweep_events_batch(now, batch, &mut report)? {}
        Ok(report)
    }

    /// One batch of due session deadlines; true if more may remain.
    fn sweep_sessions_batch(
        &self,
        now: u64,
        batch: usize,
        report: &mut SweepReport,
    ) -> Result<bool> {
        let retention = self.retention_ms();
        let txn = self.begin_write()?;
        let more = {
            let mut t = self.open_session_tables(&txn)?;
            let due: Vec<(u64, u128)> = t
                .deadlines
                .range(..(now.saturating_add(1), 0u128))
                .map_err(|e| self.err(e))?
                .take(batch)
                .map(|r| r.map(|(k, _)| k.value()).map_err(|e| self.err(e)))
                .collect::<Result<_>>()?;
            for (at, id) in &due {
                let stored = t
                    .sessions
                    .get(*id)
                    .map_err(|e| self.err(e))?
                    .map(|v| StoredSession::decode(v.value()))
                    .transpose()?;
                let Some(mut s) = stored else {
                    t.deadlines.remove((*at, *id)).map_err(|e| self.err(e))?;
                    report.repaired += 1;
                    continue;
                };
                let (want_at, _) = deadline_of(&s, retention);
                if want_at != *at {
                    // Stale entry (the record moved on, or retention changed): re-index it.
                    t.deadlines.remove((*at, *id)).map_err(|e| self.err(e))?;
                    let (want_at, kind) = deadline_of(&s, retention);
                    t.deadlines
                        .insert((want_at, *id), kind)
                        .map_err(|e| self.err(e))?;
                    report.repaired += 1;
                } else if s.state == SessionState::Pending {
                    s.state = SessionState::Expired;
                    s.failure_reason = Some(FailureReason::SessionExpired);
                    s.updated_at = now;
                    s.pkce_verifier = None;
                    report
                        .expired
                        .push((SessionId(*id), s.card_message_id.clone()));
                    self.write_stored_session(&mut t, SessionId(*id), &s)?;
                } else {
                    t.deadlines.remove((*at, *id)).map_err(|e| self.err(e))?;
                    t.sessions.remove(*id).map_err(|e| self.err(e))?;
                    t.by_user
                        .remove((s.app_id.as_str(), s.user_id.as_str(), *id))
                        .map_err(|e| self.err(e))?;
                    self.append_change(&mut t, CHANGE_DELETE, SessionId(*id))?;
                    report.purged += 1;
                }
            }
            due.len() == batch
        };
        self.commit(txn)?;
        Ok(more)
    }

    /// One batch of due seen-event ids; true if more may remain.
    fn sweep_events_batch(&self, now: u64, batch: usize, report: &mut SweepReport) -> Result<bool> {
        let txn = self.begin_write()?;
        let more = {
            let mut seen = txn.open_table(SEEN_EVENTS).map_err(|e| self.err(e))?;
            let mut expiry = txn
                .open_table(SEEN_EVENTS_EXPIRY)
                .map_err(|e| self.err(e))?;
            let due: Vec<(u64, String)> = expiry
                .range(..(now.saturating_add(1), ""))
                .map_err(|e| self.err(e))?
                .take(batch)
                .map(|r| {
                    r.map(|(k, _)| {
                        let (at, id) = k.value();
                        (at, id.to_owned())
                    })
                    .map_err(|e| self.err(e))
                })
                .collect::<Result<_>>()?;
            for (at, id) in &due {
                expiry.remove((*at, id.as_str())).map_err(|e| self.err(e))?;
                let current = seen
                    .get(id.as_str())
                    .map_err(|e| self.err(e))?
                    .map(|v| v.value());
                if current == Some(*at) {
                    seen.remove(id.as_str()).map_err(|e| self.err(e))?;
                    report.events_forgotten += 1;
                }
            }
            due.len() == batch
        };
        self.commit(txn)?;
        Ok(more)
    }
}
