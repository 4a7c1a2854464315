//! The user-info sync: names, emails and avatars from the directory.

use std::time::Duration;

use tracing::{info, warn};

use super::error::AuthError;
use super::flow::AuthService;
use crate::lark::UserIdType;
use crate::storage::UserInfo;
use crate::workers::WorkerFn;

/// Asked at each scheduled sync time (unix ms): true if this instance runs that sync.
pub type SyncGate = std::sync::Arc<
    dyn Fn(u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>> + Send + Sync,
>;

/// The user's record from user info read with their own token (at completion, after a
/// refresh); what `info` lacks is kept from `old`.
pub(super) fn user_record(
    app_id: String,
    info: &crate::lark::UserInfo,
    old: Option<UserInfo>,
    now: u64,
) -> UserInfo {
    let (user_id, union_id, name, email, avatar_url) = match old {
        Some(o) => (o.user_id, o.union_id, o.name, o.email, o.avatar_url),
        None => (None, None, None, None, None),
    };
    UserInfo {
        app_id,
        open_id: info.open_id.clone(),
        user_id: info.user_id.clone().or(user_id),
        union_id: info.union_id.clone().or(union_id),
        name: info.name.clone().or(name),
        email: info
            .email
            .clone()
            .or_else(|| info.enterprise_email.clone())
            .or(email),
        avatar_url: info.avatar_url.clone().or(avatar_url),
        updated_at: now,
    }
}

/// What a user-info sync did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Users whose record changed.
    pub updated: u64,
    /// Users looked up without a change.
    pub unchanged: u64,
    /// Users whose lookup failed.
    pub failed: u64,
}

impl AuthService {
    /// Refreshes every stored user's name, email and avatar from the directory (tenant token).
    pub async fn sync_user_info(&self) -> Result<SyncReport, AuthError> {
        let app = self.inner.app_id.clone();
        let users = self.store().run(move |s| s.list_users(&app)).await?;
        let mut report = SyncReport::default();
        for u in users {
            match self
                .lark()
                .contact_user(&u.open_id, UserIdType::OpenId)
                .await
            {
                Ok(c) => {
                    let avatar = c.avatar.as_ref().and_then(|a| {
                        a.avatar_240
                            .clone()
                            .or_else(|| a.avatar_72.clone())
                            .or_else(|| a.avatar_origin.clone())
                    });
                    let mut n = u.clone();
                    n.name = c.name.or(n.name);
                    n.email = c.email.or(c.enterprise_email).or(n.email);
                    n.avatar_url = avatar.or(n.avatar_url);
                    n.user_id = c.user_id.or(n.user_id);
                    n.union_id = c.union_id.or(n.union_id);
                    if n == u {
                        report.unchanged += 1;
                        continue;
                    }
                    n.updated_at = self.now();
                    self.store().run(move |s| s.put_user(&n)).await?;
                    report.updated += 1;
                }
                Err(e) => {
                    warn!(error = %e, "Looking a user up for the user-info sync failed.");
                    report.failed += 1;
                }
            }
        }
        info!(
            updated = report.updated,
            unchanged = report.unchanged,
            failed = report.failed,
            "User info sync finished."
        );
        Ok(report)
    }

    /// The user-info sync worker (runs on `USER_INFO_SYNC_SCHEDULE`), or `None` when
    /// `USER_INFO_SYNC_ENABLED` is off.
    #[must_use]
    pub fn user_info_sync_worker(&self) -> Option<WorkerFn> {
        self.user_info_sync_worker_gated(None)
    }

    /// [`Self::user_info_sync_worker`], asking `gate` at each scheduled time (unix ms) whether
    /// this instance runs that sync: in a fleet only the instance that takes the sync's lease
    /// does (`daemon::fleet`).
    pub fn user_info_sync_worker_gated(&self, gate: Option<SyncGate>) -> Option<WorkerFn> {
        let sched = self.inner.opts.user_info_sync.clone()?;
        let me = self.clone();
        Some(Box::new(move || {
            let (me, sched, gate) = (me.clone(), sched.clone(), gate.clone());
            Box::pin(async move {
                let now = me.now();
                let next = sched
                    .next_after(now)
                    .ok_or("the user info sync schedule never fires")?;
                tokio::time::sleep(Duration::from_millis(next.saturating_sub(now))).await;
                if let Some(gate) = gate {
                    if !gate(next).await {
                        return Ok(Duration::ZERO);
                    }
                }
                me.sync_user_info().await.map_err(|e| e.to_string())?;
                Ok(Duration::ZERO)
            })
        }))
    }
}
