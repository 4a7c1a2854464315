//! The conformance checks of the [`Outbox`] contract (the webhook outbox and the grants), for
//! every backend that offers it. Same conventions as [`super::conformance`]: each check gets a
//! fresh, empty backend and fails by panicking with the broken contract, or with the backend's
//! error.

use secrecy::SecretString;

use crate::storage::traits::{Backend, Outbox};
use crate::storage::{
    AuthSession, FailureReason, OutboxEvent, PendingUpdate, Result, SessionId, SessionState,
    UserToken,
};

/// A named check.
pub type Check<B> = (&'static str, fn(&B) -> Result<()>);

/// Every check of the outbox contract, by name.
#[must_use]
pub fn checks<B: Backend + Outbox>() -> Vec<Check<B>> {
    vec![
        ("outbox_append_in_order", append_in_order::<B>),
        ("outbox_seq_never_reused", seq_never_reused::<B>),
        ("outbox_append_refuses_bad_ids", append_refuses_bad_ids::<B>),
        (
            "outbox_reschedule_keeps_the_event",
            reschedule_keeps_the_event::<B>,
        ),
        ("outbox_bury_moves_to_dead", bury_moves_to_dead::<B>),
        (
            "outbox_events_only_with_the_written_transition",
            events_only_with_the_written_transition::<B>,
        ),
        (
            "outbox_events_with_token_writes",
            events_with_token_writes::<B>,
        ),
        ("outbox_events_with_revoke", events_with_revoke::<B>),
        ("grants_and_reminders", grants_and_reminders::<B>),
    ]
}

/// Runs every check, each on a fresh backend from `make`.
pub fn run_all<B: Backend + Outbox>(make: impl Fn() -> B) -> Result<()> {
    for (name, check) in checks::<B>() {
        check(&make()).map_err(|e| crate::storage::Error::Invalid(format!("{name}: {e}")))?;
    }
    Ok(())
}

const APP: &str = "cli_outbox";
const T0: u64 = 1_700_000_000_000;

fn event(id: &str) -> OutboxEvent {
    OutboxEvent {
        event_id: id.to_owned(),
        kind: "authorization.completed".to_owned(),
        body: format!("{{\"event_id\":\"{id}\"}}").into_bytes(),
    }
}

fn ids<B: Outbox>(b: &B) -> Result<Vec<String>> {
    Ok(b.outbox_pending(100)?
        .into_iter()
        .map(|e| e.event_id)
        .collect())
}

fn session(user: &str) -> AuthSession {
    let mut s = AuthSession::new_pending(APP, user, vec!["offline_access".into()], T0, 600_000);
    s.open_id = Some(format!("ou_{user}"));
    s.state_hash = Some([7; 32]);
    s
}

fn token(user: &str, session: Option<SessionId>) -> UserToken {
    UserToken {
        app_id: APP.into(),
        user_id: user.into(),
        open_id: Some(format!("ou_{user}")),
        access_token: SecretString::from(format!("u-access-{user}")),
        refresh_token: Some(SecretString::from(format!("ur-refresh-{user}"))),
        expires_at: T0 + 7_200_000,
        refresh_expires_at: Some(T0 + 604_800_000),
        refresh_due_at: T0 + 5_760_000,
        scopes: vec!["offline_access".into()],
        obtained_at: T0,
        session_id: session,
        needs_reauth: false,
        refresh_in_doubt_since: None,
    }
}

fn append_in_order<B: Backend + Outbox>(b: &B) -> Result<()> {
    assert!(
        b.outbox_pending(10)?.is_empty(),
        "a new store has no events"
    );
    b.outbox_append(&[event("e1"), event("e2")], T0)?;
    b.outbox_append(&[event("e3")], T0 + 5)?;
    let got = b.outbox_pending(10)?;
    assert_eq!(got.len(), 3);
    assert!(
        got.windows(2).all(|w| w[0].seq < w[1].seq),
        "entries come in sequence order"
    );
    assert_eq!(ids(b)?, ["e1", "e2", "e3"]);
    let first = &got[0];
    assert_eq!(
        first.body,
        event("e1").body,
        "the body is kept byte for byte"
    );
    assert_eq!(first.kind, "authorization.completed");
    assert_eq!(
        (first.attempts, first.next_attempt_at, first.created_at),
        (0, T0, T0)
    );
    assert!(first.delivered_to.is_empty() && first.last_error.is_none());
    assert_eq!(got[2].created_at, T0 + 5);
    assert_eq!(b.outbox_pending(2)?.len(), 2, "the limit holds");
    assert_eq!(b.outbox_counts()?, (3, 0));
    Ok(())
}

fn seq_never_reused<B: Backend + Outbox>(b: &B) -> Result<()> {
    b.outbox_append(&[event("a"), event("b")], T0)?;
    let last = b.outbox_pending(10)?.last().map_or(0, |e| e.seq);
    assert!(b.outbox_delivered(last)?, "a live entry is deleted");
    assert!(!b.outbox_delivered(last)?, "a second delete finds nothing");
    b.outbox_append(&[event("c")], T0)?;
    let c = b.outbox_pending(10)?;
    assert_eq!(ids(b)?, ["a", "c"]);
    assert!(
        c.last().is_some_and(|e| e.seq > last),
        "a deleted entry's seq is not handed out again"
    );
    Ok(())
}

fn append_refuses_bad_ids<B: Backend + Outbox>(b: &B) -> Result<()> {
    let mut empty = event("x");
    empty.event_id.clear();
    assert!(b.outbox_append(&[event("ok"), empty], T0).is_err());
    let mut long = event("y");
    long.kind = "k".repeat(129);
    assert!(b.outbox_append(&[long], T0).is_err());
    assert!(
        b.outbox_pending(10)?.is_empty(),
        "a refused batch appends nothing, not even its good events"
    );
    Ok(())
}

fn reschedule_keeps_the_event<B: Backend + Outbox>(b: &B) -> Result<()> {
    b.outbox_append(&[event("r")], T0)?;
    let mut e = b.outbox_pending(1)?.remove(0);
    e.attempts = 2;
    e.next_attempt_at = T0 + 4000;
    e.delivered_to = vec!["https://a.example/hook".into()];
    e.last_error = Some("HTTP 503".into());
    e.body = b"tampered".to_vec();
    e.event_id = "other".into();
    assert!(b.outbox_reschedule(&e)?);
    let got = b.outbox_pending(1)?.remove(0);
    assert_eq!(
        (got.attempts, got.next_attempt_at),
        (2, T0 + 4000),
        "progress is stored"
    );
    assert_eq!(got.delivered_to, ["https://a.example/hook"]);
    assert_eq!(got.last_error.as_deref(), Some("HTTP 503"));
    assert_eq!(
        (got.event_id.as_str(), got.body.as_slice()),
        ("r", event("r").body.as_slice()),
        "the event itself never changes"
    );
    let mut gone = got.clone();
    gone.seq += 1000;
    assert!(
        !b.outbox_reschedule(&gone)?,
        "no such entry: nothing written"
    );
    assert_eq!(b.outbox_counts()?, (1, 0));
    Ok(())
}

fn bury_moves_to_dead<B: Backend + Outbox>(b: &B) -> Result<()> {
    b.outbox_append(&[event("d1"), event("d2")], T0)?;
    let mut e = b.outbox_pending(1)?.remove(0);
    e.attempts = 8;
    e.last_error = Some("timeout".into());
    assert!(b.outbox_bury(&e)?);
    assert_eq!(ids(b)?, ["d2"], "a buried entry is no longer live");
    let dead = b.outbox_dead(10)?;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].event_id.as_str(), dead[0].attempts, dead[0].seq),
        ("d1", 8, e.seq)
    );
    assert_eq!(dead[0].last_error.as_deref(), Some("timeout"));
    assert_eq!(b.outbox_counts()?, (1, 1));
    assert!(!b.outbox_bury(&e)?, "burying twice finds nothing live");
    assert!(!b.outbox_delivered(e.seq)?, "a dead entry is not live");
    assert_eq!(b.outbox_counts()?, (1, 1));
    Ok(())
}

fn events_only_with_the_written_transition<B: Backend + Outbox>(b: &B) -> Result<()> {
    let s = session("ada");
    b.put_session(&s)?;
    let mut done = s.clone();
    done.state = SessionState::Completed;
    done.updated_at = T0 + 10;
    let tok = token("ada", Some(s.session_id));
    let w = b.update_if_pending_with_events(s.state_hash, &done, Some(&tok), &[event("won")])?;
    assert!(matches!(w, PendingUpdate::Written));
    let mut failed = s.clone();
    failed.state = SessionState::Failed;
    failed.failure_reason = Some(FailureReason::StateMismatch);
    failed.updated_at = T0 + 11;
    let l = b.update_if_pending_with_events(s.state_hash, &failed, None, &[event("lost")])?;
    assert!(matches!(l, PendingUpdate::Lost(_)));
    let ghost = session("ghost");
    let m = b.update_if_pending_with_events(ghost.state_hash, &ghost, None, &[event("ghost")])?;
    assert!(matches!(m, PendingUpdate::Missing));
    assert_eq!(
        ids(b)?,
        ["won"],
        "only the transition that committed appended its event"
    );
    assert_eq!(
        b.outbox_pending(1)?[0].created_at,
        T0 + 10,
        "the event is stamped with the transition's time"
    );
    assert_eq!(
        b.grant_of(APP, "ada")?,
        Some((T0 + 10, 0)),
        "a completion with a token records the grant"
    );
    Ok(())
}

fn events_with_token_writes<B: Backend + Outbox>(b: &B) -> Result<()> {
    let mut t = token("bo", None);
    b.put_token(&t)?;
    t.needs_reauth = true;
    b.put_token_with_events(&t, &[event("reauth")], T0 + 1)?;
    assert!(b.get_token(APP, "bo")?.is_some_and(|t| t.needs_reauth));
    assert!(b.delete_token_with_events(APP, "bo", &[event("gone")], T0 + 2)?);
    assert!(
        !b.delete_token_with_events(APP, "bo", &[event("nothing")], T0 + 3)?,
        "no token: false"
    );
    assert_eq!(
        ids(b)?,
        ["reauth", "gone"],
        "a delete that found nothing appends nothing"
    );
    Ok(())
}

fn events_with_revoke<B: Backend + Outbox>(b: &B) -> Result<()> {
    let mut s = session("cy");
    s.state = SessionState::Completed;
    b.put_session(&s)?;
    b.put_token(&token("cy", Some(s.session_id)))?;
    let r = b.revoke_session_with_events(s.session_id, T0 + 9, |summary| {
        assert_eq!(
            summary.state, "revoked",
            "the closure sees the revoked session"
        );
        assert!(!summary.has_tokens);
        vec![event(&format!("revoked-{}", summary.user_id))]
    })?;
    assert!(r.is_some_and(|r| r.state == SessionState::Revoked));
    assert!(b.get_token(APP, "cy")?.is_none());
    let none = b.revoke_session_with_events(SessionId(42), T0, |_| vec![event("none")])?;
    assert!(none.is_none());
    assert_eq!(ids(b)?, ["revoked-cy"]);
    assert_eq!(b.outbox_pending(1)?[0].created_at, T0 + 9);
    Ok(())
}

fn grants_and_reminders<B: Backend + Outbox>(b: &B) -> Result<()> {
    let s = session("dee");
    b.put_session(&s)?;
    let mut done = s.clone();
    done.state = SessionState::Completed;
    done.updated_at = T0 + 100;
    b.complete_session(&done, &token("dee", Some(s.session_id)))?;
    assert_eq!(b.grant_of(APP, "dee")?, Some((T0 + 100, 0)));
    assert!(
        b.grants_to_remind(T0 + 99, 10)?.is_empty(),
        "a grant newer than the bound is not due"
    );
    let due = b.grants_to_remind(T0 + 100, 10)?;
    assert_eq!(due.len(), 1);
    assert_eq!(
        (
            due[0].user_id.as_str(),
            due[0].granted_at,
            due[0].session_id
        ),
        ("dee", T0 + 100, Some(s.session_id))
    );
    assert!(
        !b.mark_reminded(APP, "dee", T0 + 1, &[event("stale")], T0 + 200)?,
        "another grant's reminder writes nothing"
    );
    assert!(b.mark_reminded(APP, "dee", T0 + 100, &[event("expiring")], T0 + 200)?);
    assert_eq!(
        ids(b)?,
        ["expiring"],
        "the reminder's event, not the stale one"
    );
    assert!(
        b.grants_to_remind(u64::MAX, 10)?.is_empty(),
        "a reminded grant is not due again"
    );
    // A token that needs a new authorization is not reminded (its grant is already gone).
    let mut t = token("dee", Some(s.session_id));
    t.needs_reauth = true;
    b.put_token(&t)?;
    let s2 = session("eve");
    b.put_session(&s2)?;
    let mut d2 = s2.clone();
    d2.state = SessionState::Completed;
    d2.updated_at = T0;
    let mut t2 = token("eve", Some(s2.session_id));
    t2.needs_reauth = true;
    b.complete_session(&d2, &t2)?;
    assert!(b.grants_to_remind(u64::MAX, 10)?.is_empty());
    // A new authorization is a new grant, to be reminded of in its time.
    let s3 = session("dee");
    b.put_session(&s3)?;
    let mut d3 = s3.clone();
    d3.state = SessionState::Completed;
    d3.updated_at = T0 + 5000;
    b.complete_session(&d3, &token("dee", Some(s3.session_id)))?;
    assert_eq!(b.grant_of(APP, "dee")?, Some((T0 + 5000, 0)));
    assert_eq!(b.grants_to_remind(u64::MAX, 10)?.len(), 1);
    Ok(())
}
