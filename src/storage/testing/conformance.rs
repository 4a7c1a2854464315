//! One conformance suite for every backend of the store traits (`storage::traits`).
//!
//! [`run_all`] takes a factory of fresh, empty backends and runs every check on a backend of
//! its own; [`checks`] lists them by name for a test target that wants them one by one. A
//! check fails by panicking (an assertion that names the broken contract) or by returning the
//! backend's error. What only one backend can show (the redb file holds no plaintext) is
//! checked beside the suite, in that backend's test target.
//!
//! Assumptions about the factory: the store is empty, and its terminal retention is at most
//! [`MAX_RETENTION_MS`] (checks that need a purge sweep at a time past it).

use secrecy::{ExposeSecret, SecretString};

use crate::storage::traits::Backend;
use crate::storage::{
    AuthSession, ChangeKind, FailureReason, PendingUpdate, Result, SessionId, SessionState,
    UserInfo, UserToken,
};

/// The longest terminal retention the suite works with (one year).
pub const MAX_RETENTION_MS: u64 = 365 * 24 * 3600 * 1000;

/// A named check of one contract.
pub type Check<B> = (&'static str, fn(&B) -> Result<()>);

/// Every check, by name.
#[must_use]
pub fn checks<B: Backend>() -> Vec<Check<B>> {
    vec![
        ("session_round_trip", session_round_trip::<B>),
        ("session_ids_are_validated", session_ids_are_validated::<B>),
        ("state_hash_lookup", state_hash_lookup::<B>),
        (
            "first_terminal_transition_wins",
            first_terminal_transition_wins::<B>,
        ),
        (
            "complete_writes_session_and_token",
            complete_writes_session_and_token::<B>,
        ),
        (
            "revoke_drops_only_its_own_token",
            revoke_drops_only_its_own_token::<B>,
        ),
        (
            "sessions_of_a_user_and_listing",
            sessions_of_a_user_and_listing::<B>,
        ),
        ("sweep_expires_and_purges", sweep_expires_and_purges::<B>),
        (
            "state_counts_follow_every_write",
            state_counts_follow_every_write::<B>,
        ),
        (
            "token_round_trip_and_delete",
            token_round_trip_and_delete::<B>,
        ),
        (
            "tokens_due_order_and_limit",
            tokens_due_order_and_limit::<B>,
        ),
        ("users_by_app", users_by_app::<B>),
        (
            "seen_events_dedup_and_expiry",
            seen_events_dedup_and_expiry::<B>,
        ),
        (
            "change_feed_order_and_prune",
            change_feed_order_and_prune::<B>,
        ),
        ("cursors", cursors::<B>),
        (
            "lease_acquire_renew_release",
            lease_acquire_renew_release::<B>,
        ),
        ("lease_expiry_and_steal", lease_expiry_and_steal::<B>),
    ]
}

/// Runs every check, each on a fresh backend from `make`.
pub fn run_all<B: Backend>(make: impl Fn() -> B) -> Result<()> {
    for (name, check) in checks::<B>() {
        check(&make()).map_err(|e| crate::storage::Error::Invalid(format!("{name}: {e}")))?;
    }
    Ok(())
}

const APP: &str = "cli_conformance";
const T0: u64 = 1_700_000_000_000;

fn secret(s: &str) -> SecretString {
    SecretString::from(s.to_owned())
}

fn reveal(s: Option<&SecretString>) -> Option<String> {
    s.map(|x| x.expose_secret().to_owned())
}

/// A pending session with every field set.
fn session(user: &str, now: u64) -> AuthSession {
    let mut s = AuthSession::new_pending(
        APP,
        user,
        vec!["contact:user".into(), "offline_access".into()],
        now,
        600_000,
    );
    s.open_id = Some(format!("ou_{user}"));
    s.union_id = Some(format!("on_{user}"));
    s.card_message_id = Some(format!("om_{user}"));
    s.access_token = Some(secret(&format!("u-access-{user}")));
    s.refresh_token = Some(secret(&format!("ur-refresh-{user}")));
    s.token_expires_at = Some(now + 7_200_000);
    s.refresh_token_expires_at = Some(now + 604_800_000);
    s.user_name = Some(format!("Name {user}"));
    s.user_email = Some(format!("{user}@example.com"));
    s.avatar_url = Some(format!("https://example.com/{user}.png"));
    s.state_hash = Some(hash_of(user));
    s.pkce_verifier = Some(secret(&format!("pkce-{user}")));
    s
}

fn hash_of(text: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(text.as_bytes()).into()
}

fn token(user: &str, due: u64, session: Option<SessionId>) -> UserToken {
    UserToken {
        app_id: APP.into(),
        user_id: user.into(),
        open_id: Some(format!("ou_{user}")),
        access_token: secret(&format!("u-access-{user}")),
        refresh_token: Some(secret(&format!("ur-refresh-{user}"))),
        expires_at: due + 1_440_000,
        refresh_expires_at: Some(due + 604_800_000),
        refresh_due_at: due,
        scopes: vec!["offline_access".into()],
        obtained_at: T0,
        session_id: session,
        needs_reauth: false,
        refresh_in_doubt_since: None,
    }
}

fn assert_same_session(a: &AuthSession, b: &AuthSession) {
    assert_eq!(a.session_id, b.session_id);
    assert_eq!(
        (&a.app_id, &a.user_id, &a.open_id, &a.union_id),
        (&b.app_id, &b.user_id, &b.open_id, &b.union_id)
    );
    assert_eq!(
        (a.state, a.failure_reason, &a.card_message_id),
        (b.state, b.failure_reason, &b.card_message_id)
    );
    assert_eq!(
        (a.created_at, a.updated_at, a.expires_at),
        (b.created_at, b.updated_at, b.expires_at)
    );
    assert_eq!(
        (
            reveal(a.access_token.as_ref()),
            reveal(a.refresh_token.as_ref()),
            reveal(a.pkce_verifier.as_ref())
        ),
        (
            reveal(b.access_token.as_ref()),
            reveal(b.refresh_token.as_ref()),
            reveal(b.pkce_verifier.as_ref())
        )
    );
    assert_eq!(
        (a.token_expires_at, a.refresh_token_expires_at, &a.scopes),
        (b.token_expires_at, b.refresh_token_expires_at, &b.scopes)
    );
    assert_eq!(
        (&a.user_name, &a.user_email, &a.avatar_url, a.state_hash),
        (&b.user_name, &b.user_email, &b.avatar_url, b.state_hash)
    );
}

fn assert_same_token(a: &UserToken, b: &UserToken) {
    assert_eq!(
        (&a.app_id, &a.user_id, &a.open_id),
        (&b.app_id, &b.user_id, &b.open_id)
    );
    assert_eq!(
        (
            a.access_token.expose_secret(),
            reveal(a.refresh_token.as_ref())
        ),
        (
            b.access_token.expose_secret(),
            reveal(b.refresh_token.as_ref())
        )
    );
    assert_eq!(
        (
            a.expires_at,
            a.refresh_expires_at,
            a.refresh_due_at,
            a.obtained_at
        ),
        (
            b.expires_at,
            b.refresh_expires_at,
            b.refresh_due_at,
            b.obtained_at
        )
    );
    assert_eq!(
        (
            &a.scopes,
            a.session_id,
            a.needs_reauth,
            a.refresh_in_doubt_since
        ),
        (
            &b.scopes,
            b.session_id,
            b.needs_reauth,
            b.refresh_in_doubt_since
        )
    );
}

/// The session's current form, which the check expects to exist.
fn current<B: Backend>(b: &B, id: SessionId) -> Result<AuthSession> {
    let got = b.get_session(id)?;
    assert!(got.is_some(), "session {id} should exist");
    Ok(got.unwrap_or_else(|| AuthSession::new_pending("", "", vec![], 0, 0)))
}

fn session_round_trip<B: Backend>(b: &B) -> Result<()> {
    let s = session("alice", T0);
    assert!(b.get_session(s.session_id)?.is_none());
    b.put_session(&s)?;
    assert_same_session(&current(b, s.session_id)?, &s);
    // Replacing keeps one record, the new one.
    let mut s2 = s.clone();
    s2.user_name = Some("Alice".into());
    s2.access_token = None;
    b.put_session(&s2)?;
    assert_same_session(&current(b, s.session_id)?, &s2);
    // Many in one call.
    let more: Vec<AuthSession> = (0..5).map(|i| session(&format!("m{i}"), T0 + i)).collect();
    b.put_sessions(&more)?;
    for m in &more {
        assert_same_session(&current(b, m.session_id)?, m);
    }
    Ok(())
}

fn session_ids_are_validated<B: Backend>(b: &B) -> Result<()> {
    let mut s = session("bob", T0);
    s.app_id = String::new();
    assert!(b.put_session(&s).is_err(), "an empty app id is refused");
    s.app_id = "a".repeat(257);
    assert!(b.put_session(&s).is_err(), "an over-long app id is refused");
    assert!(
        b.get_session(s.session_id)?.is_none(),
        "a refused write wrote nothing"
    );
    let good = session("bob", T0);
    let mut bad = session("", T0);
    bad.user_id = String::new();
    assert!(b.put_sessions(&[good.clone(), bad]).is_err());
    assert!(
        b.get_session(good.session_id)?.is_none(),
        "a refused batch wrote none of its sessions"
    );
    Ok(())
}

fn state_hash_lookup<B: Backend>(b: &B) -> Result<()> {
    let s = session("carol", T0);
    let h = hash_of("carol");
    b.put_session(&s)?;
    let found = b.session_by_state_hash(&h)?;
    assert_eq!(found.map(|f| f.session_id), Some(s.session_id));
    assert!(b.session_by_state_hash(&hash_of("nobody"))?.is_none());
    // Once the session leaves pending its state no longer leads to it.
    let mut done = s.clone();
    done.state = SessionState::Failed;
    done.failure_reason = Some(FailureReason::UserRejected);
    done.updated_at = T0 + 1;
    assert!(matches!(
        b.update_if_pending(Some(h), &done, None)?,
        PendingUpdate::Written
    ));
    assert!(b.session_by_state_hash(&h)?.is_none());
    // A session re-bound to another state is found by the new one only.
    let mut other = session("dave", T0);
    b.put_session(&other)?;
    other.state_hash = Some(hash_of("dave-2"));
    b.put_session(&other)?;
    assert!(b.session_by_state_hash(&hash_of("dave"))?.is_none());
    assert_eq!(
        b.session_by_state_hash(&hash_of("dave-2"))?
            .map(|f| f.session_id),
        Some(other.session_id)
    );
    Ok(())
}

fn first_terminal_transition_wins<B: Backend>(b: &B) -> Result<()> {
    let s = session("erin", T0);
    let h = s.state_hash;
    b.put_session(&s)?;
    let mut completed = s.clone();
    completed.state = SessionState::Completed;
    completed.updated_at = T0 + 10;
    let mut rejected = s.clone();
    rejected.state = SessionState::Rejected;
    rejected.failure_reason = Some(FailureReason::UserRejected);
    rejected.updated_at = T0 + 11;
    let tok = token("erin", T0 + 100, Some(s.session_id));
    assert!(matches!(
        b.update_if_pending(h, &completed, Some(&tok))?,
        PendingUpdate::Written
    ));
    let second = b.update_if_pending(h, &rejected, None)?;
    assert!(
        matches!(&second, PendingUpdate::Lost(w)
            if w.state == SessionState::Completed && w.updated_at == T0 + 10),
        "the second transition must lose and see the winner, got {second:?}"
    );
    assert_eq!(current(b, s.session_id)?.state, SessionState::Completed);
    assert!(
        b.get_token(APP, "erin")?.is_some(),
        "the winner's token is written"
    );
    // The expected hash is part of the comparison.
    let p = session("frank", T0);
    b.put_session(&p)?;
    let mut t = p.clone();
    t.state = SessionState::Failed;
    assert!(matches!(
        b.update_if_pending(Some(hash_of("wrong")), &t, Some(&token("frank", T0, None)))?,
        PendingUpdate::Lost(_)
    ));
    assert_eq!(current(b, p.session_id)?.state, SessionState::Pending);
    assert!(
        b.get_token(APP, "frank")?.is_none(),
        "a lost transition writes no token"
    );
    // No such session.
    let ghost = session("ghost", T0);
    assert!(matches!(
        b.update_if_pending(ghost.state_hash, &ghost, None)?,
        PendingUpdate::Missing
    ));
    assert!(b.get_session(ghost.session_id)?.is_none());
    Ok(())
}

fn complete_writes_session_and_token<B: Backend>(b: &B) -> Result<()> {
    let mut s = session("gina", T0);
    b.put_session(&s)?;
    s.state = SessionState::Completed;
    s.updated_at = T0 + 5;
    let tok = token("gina", T0 + 1000, Some(s.session_id));
    b.complete_session(&s, &tok)?;
    assert_eq!(current(b, s.session_id)?.state, SessionState::Completed);
    let got = b.get_token(APP, "gina")?;
    assert!(got.is_some());
    if let Some(got) = got {
        assert_same_token(&got, &tok);
    }
    Ok(())
}

fn revoke_drops_only_its_own_token<B: Backend>(b: &B) -> Result<()> {
    let mut old = session("hank", T0);
    old.state = SessionState::Completed;
    let mut new = session("hank", T0 + 1);
    new.state = SessionState::Completed;
    b.put_sessions(&[old.clone(), new.clone()])?;
    b.put_token(&token("hank", T0 + 100, Some(new.session_id)))?;
    // Revoking a session that did not produce the current token leaves the token.
    let r = b.revoke_session(old.session_id, T0 + 50)?;
    let r = r.map(|r| {
        (
            r.state,
            r.updated_at,
            r.access_token.is_none() && r.refresh_token.is_none() && r.pkce_verifier.is_none(),
        )
    });
    assert_eq!(r, Some((SessionState::Revoked, T0 + 50, true)));
    assert!(b.get_token(APP, "hank")?.is_some());
    // Revoking the one that did deletes it and takes it off the refresh queue.
    b.revoke_session(new.session_id, T0 + 60)?;
    assert!(b.get_token(APP, "hank")?.is_none());
    assert!(b.tokens_due(u64::MAX, 10)?.is_empty());
    let stored = current(b, new.session_id)?;
    assert_eq!(stored.state, SessionState::Revoked);
    assert!(stored.access_token.is_none() && stored.refresh_token.is_none());
    assert!(b.revoke_session(SessionId(42), T0)?.is_none());
    Ok(())
}

fn sessions_of_a_user_and_listing<B: Backend>(b: &B) -> Result<()> {
    let mut all = Vec::new();
    for i in 0..6u64 {
        let mut s = session(if i % 2 == 0 { "ivy" } else { "jack" }, T0 + 10 * (6 - i));
        if i >= 4 {
            s.state = SessionState::Completed;
        }
        all.push(s);
    }
    b.put_sessions(&all)?;
    let ivy = b.sessions_for_user(APP, "ivy")?;
    let created: Vec<u64> = ivy.iter().map(|s| s.created_at).collect();
    assert_eq!(created, vec![T0 + 20, T0 + 40, T0 + 60], "oldest first");
    assert!(ivy.iter().all(|s| s.user_id == "ivy"));
    assert!(b.sessions_for_user("other_app", "ivy")?.is_empty());
    let listed = b.list_sessions(None, 100)?;
    assert_eq!(listed.len(), 6);
    assert!(
        listed
            .windows(2)
            .all(|w| w[0].created_at >= w[1].created_at),
        "newest first"
    );
    assert_eq!(b.list_sessions(None, 2)?.len(), 2);
    let done = b.list_sessions(Some(SessionState::Completed), 100)?;
    assert_eq!(done.len(), 2);
    assert!(done.iter().all(|s| s.state == "completed"));
    Ok(())
}

fn sweep_expires_and_purges<B: Backend>(b: &B) -> Result<()> {
    let due = session("kate", T0); // expires at T0 + 600 s
    let mut later = session("liam", T0);
    later.expires_at = T0 + 3_600_000;
    b.put_sessions(&[due.clone(), later.clone()])?;
    let now = T0 + 600_000;
    assert_eq!(b.pending_expired(now)?, vec![due.session_id]);
    let report = b.sweep(now, 100)?;
    assert_eq!(
        report.expired,
        vec![(due.session_id, due.card_message_id.clone())]
    );
    let e = current(b, due.session_id)?;
    assert_eq!(
        (e.state, e.failure_reason, e.updated_at),
        (
            SessionState::Expired,
            Some(FailureReason::SessionExpired),
            now
        )
    );
    assert!(
        e.pkce_verifier.is_none(),
        "an expired session drops its verifier"
    );
    assert!(b.session_by_state_hash(&hash_of("kate"))?.is_none());
    assert_eq!(current(b, later.session_id)?.state, SessionState::Pending);
    assert!(b.pending_expired(now)?.is_empty());
    // Long after retention the terminal one is deleted; the pending one expires first.
    let far = now + MAX_RETENTION_MS + 1;
    let r1 = b.sweep(far, 100)?;
    assert_eq!(r1.purged, 1);
    assert!(b.get_session(due.session_id)?.is_none());
    assert_eq!(r1.expired.len(), 1);
    let feed = b.changes_after(0, 100)?;
    assert!(
        feed.iter()
            .any(|(_, k, id)| *k == ChangeKind::Delete && *id == due.session_id),
        "a purge is in the change feed"
    );
    Ok(())
}

/// The per-state counts equal a recount from a listing after every kind of write.
fn state_counts_follow_every_write<B: Backend>(b: &B) -> Result<()> {
    fn check<B: Backend>(b: &B) -> Result<()> {
        let listed = b.list_sessions(None, usize::MAX)?;
        let counted = b.count_sessions_by_state()?;
        assert_eq!(counted.len(), SessionState::ALL.len(), "every state listed");
        for (state, n) in counted {
            let want = listed.iter().filter(|s| s.state == state.as_str()).count() as u64;
            assert_eq!(n, want, "count of {state}");
        }
        Ok(())
    }
    check(b)?;
    let a = session("mia", T0);
    let mut c = session("noah", T0);
    b.put_sessions(&[a.clone(), c.clone()])?;
    check(b)?;
    c.state = SessionState::Completed;
    b.complete_session(&c, &token("noah", T0, Some(c.session_id)))?;
    check(b)?;
    b.put_session(&c)?; // same state again
    check(b)?;
    b.revoke_session(c.session_id, T0 + 1)?;
    check(b)?;
    b.sweep(T0 + 600_000, 10)?;
    check(b)?;
    b.sweep(T0 + 600_000 + MAX_RETENTION_MS + 1, 10)?;
    check(b)?;
    assert!(b.get_session(a.session_id)?.is_none());
    Ok(())
}

fn token_round_trip_and_delete<B: Backend>(b: &B) -> Result<()> {
    let mut t = token("olga", T0 + 500, None);
    b.put_token(&t)?;
    let got = b.get_token(APP, "olga")?;
    assert!(got.is_some());
    if let Some(got) = &got {
        assert_same_token(got, &t);
    }
    // Refresh-in-doubt marking is part of the record.
    t.refresh_in_doubt_since = Some(T0 + 7);
    b.put_token(&t)?;
    assert_eq!(
        b.get_token(APP, "olga")?
            .and_then(|g| g.refresh_in_doubt_since),
        Some(T0 + 7)
    );
    assert!(b.get_token(APP, "nobody")?.is_none());
    assert!(b.delete_token(APP, "olga")?);
    assert!(!b.delete_token(APP, "olga")?);
    assert!(b.get_token(APP, "olga")?.is_none());
    assert!(
        b.tokens_due(u64::MAX, 10)?.is_empty(),
        "deleted tokens leave the queue"
    );
    Ok(())
}

fn tokens_due_order_and_limit<B: Backend>(b: &B) -> Result<()> {
    for (user, due) in [
        ("p3", T0 + 30),
        ("p1", T0 + 10),
        ("p2", T0 + 20),
        ("p9", T0 + 90),
    ] {
        b.put_token(&token(user, due, None))?;
    }
    let mut no_refresh = token("q", T0, None);
    no_refresh.refresh_token = None;
    b.put_token(&no_refresh)?;
    let mut reauth = token("r", T0, None);
    reauth.needs_reauth = true;
    b.put_token(&reauth)?;
    let users = |v: Vec<(String, String, u64)>| -> Vec<(String, u64)> {
        v.into_iter().map(|(_, u, at)| (u, at)).collect()
    };
    assert_eq!(
        users(b.tokens_due(T0 + 30, 100)?),
        vec![
            ("p1".to_owned(), T0 + 10),
            ("p2".to_owned(), T0 + 20),
            ("p3".to_owned(), T0 + 30)
        ],
        "due ones only (at or before now), soonest first, unrefreshable ones never"
    );
    assert_eq!(b.tokens_due(T0 + 1000, 2)?.len(), 2, "at most limit");
    assert!(b.tokens_due(T0 + 9, 10)?.is_empty());
    // Rewriting a token moves it in the queue.
    b.put_token(&token("p1", T0 + 95, None))?;
    assert_eq!(
        users(b.tokens_due(T0 + 1000, 100)?)
            .into_iter()
            .map(|(u, _)| u)
            .collect::<Vec<_>>(),
        vec!["p2", "p3", "p9", "p1"]
    );
    Ok(())
}

fn users_by_app<B: Backend>(b: &B) -> Result<()> {
    let user = |app: &str, open: &str| UserInfo {
        app_id: app.into(),
        open_id: open.into(),
        user_id: Some(format!("u_{open}")),
        union_id: None,
        name: Some(format!("Name {open}")),
        email: None,
        avatar_url: None,
        updated_at: T0,
    };
    let a = user(APP, "ou_a");
    b.put_user(&a)?;
    b.put_user(&user(APP, "ou_b"))?;
    b.put_user(&user("cli_other", "ou_c"))?;
    assert_eq!(b.get_user(APP, "ou_a")?, Some(a.clone()));
    assert!(b.get_user("cli_other", "ou_a")?.is_none());
    let mut renamed = a;
    renamed.name = Some("Renamed".into());
    b.put_user(&renamed)?;
    assert_eq!(b.get_user(APP, "ou_a")?, Some(renamed));
    let mut ids: Vec<String> = b.list_users(APP)?.into_iter().map(|u| u.open_id).collect();
    ids.sort();
    assert_eq!(ids, vec!["ou_a", "ou_b"]);
    Ok(())
}

fn seen_events_dedup_and_expiry<B: Backend>(b: &B) -> Result<()> {
    assert_eq!(
        b.mark_events_seen(&["e1", "e2", "e1"], T0 + 100)?,
        vec![true, true, false]
    );
    assert_eq!(
        b.mark_events_seen(&["e2", "e3"], T0 + 500)?,
        vec![false, true]
    );
    assert!(b.event_seen("e1")? && b.event_seen("e3")?);
    assert!(!b.event_seen("e4")?);
    let too_long = "x".repeat(10_000);
    assert!(b.mark_events_seen(&["e5", too_long.as_str()], T0).is_err());
    assert!(
        !b.event_seen("e5")?,
        "a refused batch records none of its ids"
    );
    // Forgotten only after their time; e2 keeps its first forget time.
    let r = b.sweep(T0 + 99, 100)?;
    assert_eq!(r.events_forgotten, 0);
    let r = b.sweep(T0 + 100, 100)?;
    assert_eq!(r.events_forgotten, 2);
    assert!(!b.event_seen("e1")? && !b.event_seen("e2")? && b.event_seen("e3")?);
    assert_eq!(b.mark_events_seen(&["e1"], T0 + 1000)?, vec![true]);
    Ok(())
}

fn change_feed_order_and_prune<B: Backend>(b: &B) -> Result<()> {
    assert_eq!(b.last_change_seq()?, 0);
    assert_eq!(
        b.change_feed_complete_from()?,
        0,
        "a new store's feed is complete"
    );
    let s: Vec<AuthSession> = (0..4).map(|i| session(&format!("s{i}"), T0)).collect();
    for x in &s {
        b.put_session(x)?;
    }
    let feed = b.changes_after(0, 100)?;
    let ids: Vec<SessionId> = feed.iter().map(|c| c.2).collect();
    assert_eq!(ids, s.iter().map(|x| x.session_id).collect::<Vec<_>>());
    assert!(feed.iter().all(|c| c.1 == ChangeKind::Upsert));
    assert!(feed.windows(2).all(|w| w[0].0 < w[1].0), "seqs grow");
    let last = b.last_change_seq()?;
    assert_eq!(feed.last().map(|c| c.0), Some(last));
    assert_eq!(b.changes_after(feed[1].0, 1)?, vec![feed[2]]);
    // Export rows follow the sessions.
    let rows = b.export_rows(&[s[0].session_id, SessionId(7)])?;
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows[0].as_ref().map(|r| r.session_id),
        Some(s[0].session_id)
    );
    assert!(rows[1].is_none());
    // Pruning drops what is at or before the mark and keeps the rest; seqs are never reused.
    assert_eq!(b.prune_changes(feed[1].0)?, 2);
    let rest = b.changes_after(0, 100)?;
    assert_eq!(rest, feed[2..].to_vec());
    b.prune_changes(last)?;
    assert!(b.changes_after(0, 100)?.is_empty());
    assert_eq!(b.last_change_seq()?, last);
    b.put_session(&s[0])?;
    let after = b.changes_after(0, 100)?;
    assert_eq!(after.len(), 1);
    assert!(after[0].0 > last, "a pruned seq is not reused");
    Ok(())
}

fn cursors<B: Backend>(b: &B) -> Result<()> {
    assert_eq!(b.cursor("export.a")?, None);
    b.set_cursor("export.a", 5)?;
    b.set_cursor("export.b", 9)?;
    b.set_cursor("export.a", 7)?;
    assert_eq!(
        (b.cursor("export.a")?, b.cursor("export.b")?),
        (Some(7), Some(9))
    );
    Ok(())
}

fn lease_acquire_renew_release<B: Backend>(b: &B) -> Result<()> {
    assert_eq!(b.lease_holder("sweep", T0)?, None);
    assert!(b.try_acquire_lease("sweep", "node-a", 1000, T0)?);
    assert!(
        !b.try_acquire_lease("sweep", "node-b", 1000, T0 + 1)?,
        "held by another"
    );
    assert!(
        b.try_acquire_lease("refresh", "node-b", 1000, T0)?,
        "leases are by name"
    );
    assert_eq!(b.lease_holder("sweep", T0 + 1)?, Some("node-a".into()));
    // Only the holder renews.
    assert!(!b.renew_lease("sweep", "node-b", 1000, T0 + 500)?);
    assert!(b.renew_lease("sweep", "node-a", 1000, T0 + 500)?);
    assert_eq!(
        b.lease_holder("sweep", T0 + 1499)?,
        Some("node-a".into()),
        "renewed"
    );
    // Re-acquiring by the holder extends too.
    assert!(b.try_acquire_lease("sweep", "node-a", 1000, T0 + 1000)?);
    assert_eq!(b.lease_holder("sweep", T0 + 1999)?, Some("node-a".into()));
    // Only the holder releases.
    assert!(!b.release_lease("sweep", "node-b")?);
    assert_eq!(b.lease_holder("sweep", T0 + 1001)?, Some("node-a".into()));
    assert!(b.release_lease("sweep", "node-a")?);
    assert_eq!(b.lease_holder("sweep", T0 + 1001)?, None);
    assert!(b.try_acquire_lease("sweep", "node-b", 1000, T0 + 1002)?);
    Ok(())
}

fn lease_expiry_and_steal<B: Backend>(b: &B) -> Result<()> {
    assert!(b.try_acquire_lease("export", "node-a", 1000, T0)?);
    assert_eq!(b.lease_holder("export", T0 + 999)?, Some("node-a".into()));
    assert_eq!(
        b.lease_holder("export", T0 + 1000)?,
        None,
        "expired at its time"
    );
    // An expired lease cannot be renewed; anyone may take it.
    assert!(!b.renew_lease("export", "node-a", 1000, T0 + 1000)?);
    assert!(b.try_acquire_lease("export", "node-b", 1000, T0 + 1000)?);
    assert_eq!(b.lease_holder("export", T0 + 1001)?, Some("node-b".into()));
    // The old holder has lost it: no renew, no release, no re-acquire.
    assert!(!b.renew_lease("export", "node-a", 1000, T0 + 1001)?);
    assert!(!b.release_lease("export", "node-a")?);
    assert!(!b.try_acquire_lease("export", "node-a", 1000, T0 + 1001)?);
    assert_eq!(b.lease_holder("export", T0 + 1001)?, Some("node-b".into()));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Fleet checks: two handles on the same data (two instances on one database; for a backend
// that cannot open its data twice, two clones of one handle), raced from threads.

/// A named check of a contract between two handles on the same data.
pub type FleetCheck<B> = (&'static str, fn(&B, &B) -> Result<()>);

/// Every fleet check, by name.
#[must_use]
pub fn fleet_checks<B: Backend + Sync>() -> Vec<FleetCheck<B>> {
    vec![
        (
            "fleet_one_pending_transition_wins",
            fleet_one_pending_transition_wins::<B>,
        ),
        (
            "fleet_each_event_is_new_once",
            fleet_each_event_is_new_once::<B>,
        ),
        ("fleet_one_lease_holder", fleet_one_lease_holder::<B>),
        (
            "fleet_concurrent_sweeps_count_each_expiry_once",
            fleet_concurrent_sweeps_count_each_expiry_once::<B>,
        ),
    ]
}

/// Runs every fleet check, each on a fresh pair of handles from `make`.
pub fn run_fleet<B: Backend + Sync>(make: impl Fn() -> (B, B)) -> Result<()> {
    for (name, check) in fleet_checks::<B>() {
        let (a, b) = make();
        check(&a, &b).map_err(|e| crate::storage::Error::Invalid(format!("{name}: {e}")))?;
    }
    Ok(())
}

/// Racers per handle in the fleet checks.
const RACERS: usize = 4;

/// Runs `f(handle, racer)` on `RACERS` threads per handle, released together; the results in
/// racer order (the first handle's racers first).
fn race<B: Backend + Sync, T: Send>(
    a: &B,
    b: &B,
    f: impl Fn(&B, usize) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let gate = std::sync::Barrier::new(2 * RACERS);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2 * RACERS)
            .map(|i| {
                let (gate, f) = (&gate, &f);
                let h = if i < RACERS { a } else { b };
                scope.spawn(move || {
                    gate.wait();
                    f(h, i)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(crate::storage::Error::Invalid("a racer panicked".into()))
                })
            })
            .collect()
    })
}

fn fleet_one_pending_transition_wins<B: Backend + Sync>(a: &B, b: &B) -> Result<()> {
    for round in 0..5u64 {
        let s = session(&format!("race{round}"), T0);
        a.put_session(&s)?;
        let outcomes = race(a, b, |h, i| {
            let mut t = s.clone();
            t.state = if i % 2 == 0 {
                SessionState::Completed
            } else {
                SessionState::Rejected
            };
            t.updated_at = T0 + 1 + i as u64;
            let tok = token(
                &format!("race{round}"),
                T0 + 100 + i as u64,
                Some(s.session_id),
            );
            h.update_if_pending(s.state_hash, &t, Some(&tok))
        })?;
        let winners: Vec<usize> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, PendingUpdate::Written))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(winners.len(), 1, "exactly one racer wins, got {winners:?}");
        let w = winners[0];
        let stored = current(b, s.session_id)?;
        assert_eq!(
            stored.updated_at,
            T0 + 1 + w as u64,
            "the winner's write stays"
        );
        for (i, o) in outcomes.iter().enumerate() {
            if i != w {
                assert!(
                    matches!(o, PendingUpdate::Lost(l) if l.updated_at == T0 + 1 + w as u64),
                    "loser {i} sees the winner {w}, got {o:?}"
                );
            }
        }
        let tok = a.get_token(APP, &format!("race{round}"))?;
        assert_eq!(
            tok.map(|t| t.refresh_due_at),
            Some(T0 + 100 + w as u64),
            "only the winner's token is written"
        );
    }
    Ok(())
}

fn fleet_each_event_is_new_once<B: Backend + Sync>(a: &B, b: &B) -> Result<()> {
    let ids: Vec<String> = (0..300).map(|i| format!("ev-{i}")).collect();
    let results = race(a, b, |h, racer| {
        // Each racer marks every id, in its own order and batch size.
        let mut order: Vec<&str> = ids.iter().map(String::as_str).collect();
        let n = order.len();
        order.rotate_left(racer * 37 % n);
        if racer % 2 == 1 {
            order.reverse();
        }
        let mut fresh = Vec::new();
        for chunk in order.chunks(5 + racer * 3) {
            for (id, new) in chunk.iter().zip(h.mark_events_seen(chunk, T0 + 1000)?) {
                if new {
                    fresh.push((*id).to_owned());
                }
            }
        }
        Ok(fresh)
    })?;
    let mut all: Vec<String> = results.into_iter().flatten().collect();
    all.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(all, want, "every id is new exactly once across the handles");
    Ok(())
}

fn fleet_one_lease_holder<B: Backend + Sync>(a: &B, b: &B) -> Result<()> {
    for round in 0..5u64 {
        let name = format!("singleton-{round}");
        let now = T0 + round * 10_000;
        let got = race(a, b, |h, i| {
            h.try_acquire_lease(&name, &format!("node-{i}"), 1000, now)
        })?;
        let holders: Vec<usize> = (0..got.len()).filter(|i| got[*i]).collect();
        assert_eq!(holders.len(), 1, "one holder, got {holders:?}");
        let holder = format!("node-{}", holders[0]);
        assert_eq!(a.lease_holder(&name, now + 1)?, Some(holder.clone()));
        assert_eq!(b.lease_holder(&name, now + 1)?, Some(holder.clone()));
        // After expiry, a racer on either handle steals it; again only one.
        let later = now + 1000;
        let stolen = race(a, b, |h, i| {
            if format!("node-{i}") == holder {
                return Ok(false);
            }
            h.try_acquire_lease(&name, &format!("node-{i}"), 1000, later)
        })?;
        let thieves: Vec<usize> = (0..stolen.len()).filter(|i| stolen[*i]).collect();
        assert_eq!(thieves.len(), 1, "one thief, got {thieves:?}");
        let thief = format!("node-{}", thieves[0]);
        assert_eq!(b.lease_holder(&name, later + 1)?, Some(thief.clone()));
        let on = |racer: usize| if racer < RACERS { a } else { b };
        assert!(
            !on(holders[0]).renew_lease(&name, &holder, 1000, later + 1)?,
            "the old holder lost it"
        );
        assert!(
            on(thieves[0]).renew_lease(&name, &thief, 1000, later + 1)?,
            "the thief renews through its own handle"
        );
    }
    Ok(())
}

fn fleet_concurrent_sweeps_count_each_expiry_once<B: Backend + Sync>(a: &B, b: &B) -> Result<()> {
    let sessions: Vec<AuthSession> = (0..240).map(|i| session(&format!("sw{i}"), T0)).collect();
    a.put_sessions(&sessions)?;
    let now = T0 + 600_000;
    let reports = race(a, b, |h, i| h.sweep(now, 3 + i))?;
    let mut expired: Vec<SessionId> = reports
        .iter()
        .flat_map(|r| r.expired.iter().map(|(id, _)| *id))
        .collect();
    let total = expired.len();
    expired.sort();
    expired.dedup();
    assert_eq!(expired.len(), total, "no expiry is counted twice");
    let mut want: Vec<SessionId> = sessions.iter().map(|s| s.session_id).collect();
    want.sort();
    assert_eq!(
        expired, want,
        "every due session is expired by one of the sweeps"
    );
    let counts = b.count_sessions_by_state()?;
    assert!(
        counts.contains(&(SessionState::Expired, 240))
            && counts.contains(&(SessionState::Pending, 0))
    );
    Ok(())
}
