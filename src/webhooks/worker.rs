//! The delivery worker: drains the outbox to every webhook URL.
//!
//! One unit reads the live entries (oldest first), and sends each entry that is due to every
//! URL that has not yet answered 2xx for it, the URLs of one entry at once. Then, per entry:
//!
//! - every URL answered 2xx: the entry is deleted;
//! - otherwise (a 5xx, another non-2xx status, a timeout, a connection or TLS error): the URLs
//!   that answered 2xx are recorded, and the entry is tried again after the shared
//!   [`Backoff`] for its attempt count — or, once it has had `max_attempts` rounds, moved to the
//!   dead entries (`lark_service_webhook_outbox_dead`, `/workers`).
//!
//! Every body is signed at send time (`sign`), so a retry carries a fresh timestamp over the
//! same bytes. The worker never logs a body or the secret: a failure is logged with the URL's
//! host, the event id and the status or error class.

use std::time::Duration;

use futures_util::future::join_all;
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use url::Url;

use super::sign::{sign, EVENT_ID_HEADER, EVENT_TYPE_HEADER, SIGNATURE_HEADER};
use crate::backoff::Backoff;
use crate::metrics::{self, OutcomeLabel};
use crate::net::Net;
use crate::storage::{Db, OutboxEntry};
use crate::workers::{BoxError, SharedClock, Worker, WorkerState};

/// How often the outbox is looked at when nothing is due sooner.
pub const POLL: Duration = Duration::from_millis(500);

/// Entries read per unit.
const BATCH: usize = 64;

/// What the worker is built from.
#[derive(Clone, Debug)]
pub struct WebhookWorkerOptions {
    /// Receivers.
    pub urls: Vec<Url>,
    /// The signing secret.
    pub secret: SecretString,
    /// Longest one delivery may take.
    pub timeout: Duration,
    /// Rounds before an entry is dead.
    pub max_attempts: u32,
    /// Wait before each retry.
    pub backoff: Backoff,
}

/// The delivery worker (`webhooks` in `/workers`).
pub struct WebhookWorker {
    store: Db,
    http: reqwest::Client,
    opts: WebhookWorkerOptions,
    clock: SharedClock,
    status: Option<String>,
    /// No new entry is started after this long in one unit (`None`: the whole batch).
    unit_budget: Option<Duration>,
}

/// The result of one delivery of one entry to one URL.
enum Sent {
    Ok,
    /// Worth retrying: 5xx, 408/429, timeout, connection or TLS error.
    Retry(String),
    /// Another answer (3xx, 4xx): retried as well, counted apart.
    Rejected(String),
}

impl WebhookWorker {
    /// A worker on `store`, sending through `net`'s trust and proxy.
    pub fn new(
        store: impl Into<Db>,
        net: &Net,
        opts: WebhookWorkerOptions,
        clock: SharedClock,
    ) -> Result<Self, reqwest::Error> {
        let store: Db = store.into();
        let http = net
            .http_client_builder()
            .user_agent(concat!("lark-service/", env!("CARGO_PKG_VERSION")))
            .timeout(opts.timeout)
            .connect_timeout(opts.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            store,
            http,
            opts,
            clock,
            status: None,
            unit_budget: None,
        })
    }

    /// Ends a unit once `budget` has passed (the entry in flight is finished first; one entry
    /// is always sent), so a unit lasts at most `budget` plus one delivery's timeout. Under the fleet lease the
    /// lease is renewed between units, and a unit must end well within the lease.
    #[must_use]
    pub fn with_unit_budget(mut self, budget: Duration) -> Self {
        self.unit_budget = Some(budget);
        self
    }

    /// The TTL of the fleet lease (`worker/webhooks`) for deliveries that may each take
    /// `timeout`: four of them, at least 10 s; the unit budget is a quarter of it, so a unit
    /// (budget plus one delivery) ends within half the lease.
    #[must_use]
    pub fn lease_ttl(timeout: Duration) -> Duration {
        timeout.saturating_mul(4).max(Duration::from_secs(10))
    }

    async fn send(&self, url: &Url, entry: &OutboxEntry) -> Sent {
        let now_s = self.clock.now_ms() / 1000;
        let signature = sign(
            self.opts.secret.expose_secret().as_bytes(),
            now_s,
            &entry.body,
        );
        let r = self
            .http
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature)
            .header(EVENT_ID_HEADER, &entry.event_id)
            .header(EVENT_TYPE_HEADER, &entry.kind)
            .body(entry.body.clone())
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => Sent::Ok,
            Ok(resp) => {
                let s = resp.status();
                let what = format!("HTTP {}", s.as_u16());
                if s.is_server_error()
                    || s == reqwest::StatusCode::REQUEST_TIMEOUT
                    || s == reqwest::StatusCode::TOO_MANY_REQUESTS
                {
                    Sent::Retry(what)
                } else {
                    Sent::Rejected(what)
                }
            }
            Err(e) => Sent::Retry(crate::net::describe_http_error(&e)),
        }
    }

    /// Delivers one due entry to the URLs still owed it; stores the outcome.
    ///
    /// `down` holds the URLs that failed earlier in this unit, with the time their entry
    /// waits until: they are not tried again in this unit (one slow or dead receiver costs one
    /// timeout per unit, not one per entry, and does not hold up the others); an entry owed
    /// only to such URLs waits as long, without counting an attempt.
    async fn deliver(
        &self,
        mut entry: OutboxEntry,
        must_exit: &CancellationToken,
        down: &mut Vec<(Url, u64)>,
    ) -> Result<(), BoxError> {
        let all_owed: Vec<&Url> = self
            .opts
            .urls
            .iter()
            .filter(|u| !entry.delivered_to.iter().any(|d| d == u.as_str()))
            .collect();
        let owed: Vec<&Url> = all_owed
            .iter()
            .copied()
            .filter(|u| !down.iter().any(|(d, _)| d == *u))
            .collect();
        if owed.is_empty() {
            let until = down
                .iter()
                .filter(|(d, _)| all_owed.contains(&d))
                .map(|(_, t)| *t)
                .max()
                .unwrap_or_else(|| self.clock.now_ms());
            if all_owed.is_empty() {
                let seq = entry.seq;
                self.store
                    .clone()
                    .run(move |s| s.outbox_delivered(seq))
                    .await?;
            } else if until > entry.next_attempt_at {
                entry.next_attempt_at = until;
                self.store
                    .clone()
                    .run(move |s| s.outbox_reschedule(&entry))
                    .await?;
            }
            return Ok(());
        }
        let sends = join_all(owed.iter().map(|u| self.send(u, &entry)));
        let results = tokio::select! {
            r = sends => r,
            // Shutdown: the entry stays as it was and is sent again after the restart.
            () = must_exit.cancelled() => return Ok(()),
        };
        let m = metrics::get();
        let mut failure = None;
        let mut failed_urls = Vec::new();
        for (url, r) in owed.iter().zip(results) {
            let (outcome, err) = match r {
                Sent::Ok => {
                    entry.delivered_to.push(url.as_str().to_owned());
                    ("success", None)
                }
                Sent::Retry(e) => ("retry", Some(e)),
                Sent::Rejected(e) => ("rejected", Some(e)),
            };
            m.webhook_deliveries
                .get_or_create(&OutcomeLabel { outcome })
                .inc();
            if let Some(e) = err {
                warn!(
                    event_id = %entry.event_id,
                    host = url.host_str().unwrap_or(""),
                    attempt = entry.attempts.saturating_add(1),
                    error = %e,
                    "Webhook delivery failed; it will be retried."
                );
                failure = Some(format!("{}: {e}", url.host_str().unwrap_or("")));
                failed_urls.push((*url).clone());
            }
        }
        let store = self.store.clone();
        let Some(failure) = failure else {
            let seq = entry.seq;
            store.run(move |s| s.outbox_delivered(seq)).await?;
            return Ok(());
        };
        entry.attempts = entry.attempts.saturating_add(1);
        entry.last_error = Some(failure);
        if entry.attempts >= self.opts.max_attempts {
            m.webhook_deliveries
                .get_or_create(&OutcomeLabel { outcome: "dead" })
                .inc();
            warn!(
                event_id = %entry.event_id,
                kind = %entry.kind,
                attempts = entry.attempts,
                "Webhook event is dead: out of attempts. It is kept in the store (outbox_dead)."
            );
            store.run(move |s| s.outbox_bury(&entry)).await?;
        } else {
            let wait = self.opts.backoff.delay(entry.attempts);
            let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
            entry.next_attempt_at = self.clock.now_ms().saturating_add(wait_ms);
            down.extend(failed_urls.into_iter().map(|u| (u, entry.next_attempt_at)));
            store.run(move |s| s.outbox_reschedule(&entry)).await?;
        }
        Ok(())
    }

    fn set_gauges(&mut self, live: u64, dead: u64) {
        let m = metrics::get();
        m.webhook_outbox_pending
            .set(i64::try_from(live).unwrap_or(i64::MAX));
        m.webhook_outbox_dead
            .set(i64::try_from(dead).unwrap_or(i64::MAX));
        self.status = Some(format!("{live} pending, {dead} dead"));
    }
}

impl Worker for WebhookWorker {
    fn name(&self) -> &'static str {
        "webhooks"
    }

    fn status(&self) -> Option<String> {
        self.status.clone()
    }

    async fn work(&mut self, must_exit: &CancellationToken) -> Result<WorkerState, BoxError> {
        let store = self.store.clone();
        let (entries, (live, dead)) = store
            .run(|s| Ok((s.outbox_pending(BATCH)?, s.outbox_counts()?)))
            .await?;
        self.set_gauges(live, dead);
        let now = self.clock.now_ms();
        let mut sent = 0usize;
        let mut soonest = u64::MAX;
        let mut down = Vec::new();
        let started = std::time::Instant::now();
        for entry in entries {
            if must_exit.is_cancelled() {
                return Ok(WorkerState::Done);
            }
            // At least one entry per unit, so a unit always makes progress.
            if sent > 0 && self.unit_budget.is_some_and(|b| started.elapsed() >= b) {
                break;
            }
            if entry.next_attempt_at > now {
                soonest = soonest.min(entry.next_attempt_at);
                continue;
            }
            self.deliver(entry, must_exit, &mut down).await?;
            sent += 1;
        }
        if sent > 0 {
            let (live, dead) = self.store.clone().run(Db::outbox_counts).await?;
            self.set_gauges(live, dead);
            if live == 0 {
                debug!(sent, "Webhook outbox drained.");
            }
            return Ok(WorkerState::Busy);
        }
        let until_due = Duration::from_millis(soonest.saturating_sub(now));
        Ok(WorkerState::Throttled(until_due.min(POLL)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;

    use super::*;
    use crate::net::NetOptions;
    use crate::storage::Store;
    use crate::storage::{Key, Keyring, OutboxEvent, StoreOptions};
    use crate::workers::ManualClock;

    fn event(id: &str) -> OutboxEvent {
        OutboxEvent {
            event_id: id.to_owned(),
            kind: "token.revoked".to_owned(),
            body: b"{}".to_vec(),
        }
    }

    /// A receiver nobody listens on: the first due entry tries it and counts an attempt; the
    /// others in the same unit do not try it again and wait as long, without an attempt. Once
    /// out of attempts an entry is dead.
    #[tokio::test]
    async fn a_down_receiver_is_tried_once_per_unit_and_entries_end_dead() {
        let store = Store::open_in_memory(
            Keyring::new(Key::from_bytes(&[3; 32]), vec![]),
            StoreOptions::default(),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let clock = Arc::new(ManualClock::at(1_000_000));
        let mut w = WebhookWorker::new(
            store.clone(),
            &Net::new(&NetOptions::default()).unwrap(),
            WebhookWorkerOptions {
                urls: vec![Url::parse(&format!("http://127.0.0.1:{port}/hook")).unwrap()],
                secret: SecretString::from("s".repeat(32)),
                timeout: Duration::from_secs(2),
                max_attempts: 2,
                backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
            },
            clock.clone(),
        )
        .unwrap();
        store
            .outbox_append(&[event("a"), event("b"), event("c")], 1_000_000)
            .unwrap();
        let cancel = CancellationToken::new();
        assert_eq!(w.work(&cancel).await.unwrap(), WorkerState::Busy);
        let got = store.outbox_pending(10).unwrap();
        let attempts: Vec<u32> = got.iter().map(|e| e.attempts).collect();
        assert_eq!(
            attempts,
            [1, 0, 0],
            "only the first entry tried the down URL"
        );
        assert!(
            got.iter().all(|e| e.next_attempt_at == 1_001_000),
            "all wait the first retry's backoff: {got:?}"
        );
        assert!(got[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("127.0.0.1")));
        // Nothing is due: the worker waits (at most its poll interval).
        assert!(matches!(
            w.work(&cancel).await.unwrap(),
            WorkerState::Throttled(_)
        ));
        clock.advance(Duration::from_secs(1));
        w.work(&cancel).await.unwrap();
        assert_eq!(
            store.outbox_dead(10).unwrap().len(),
            1,
            "the first entry is out of attempts"
        );
        let live = store.outbox_pending(10).unwrap();
        assert_eq!(
            live.iter().map(|e| e.attempts).collect::<Vec<_>>(),
            [1, 0],
            "the next one tried once"
        );
        assert_eq!(store.outbox_counts().unwrap(), (2, 1));
    }

    /// With a unit budget, a unit stops starting entries once the budget has passed (the one
    /// in flight is finished): a budget of zero delivers one entry per unit, in order.
    #[tokio::test]
    async fn a_unit_budget_ends_the_unit_between_entries() {
        let store = Store::open_in_memory(
            Keyring::new(Key::from_bytes(&[4; 32]), vec![]),
            StoreOptions::default(),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(|| async { axum::http::StatusCode::OK }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let clock = Arc::new(ManualClock::at(1_000_000));
        let opts = WebhookWorkerOptions {
            urls: vec![Url::parse(&format!("http://127.0.0.1:{port}/hook")).unwrap()],
            secret: SecretString::from("s".repeat(32)),
            timeout: Duration::from_secs(5),
            max_attempts: 3,
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
        };
        let net = Net::new(&NetOptions::default()).unwrap();
        let mut w = WebhookWorker::new(store.clone(), &net, opts, clock.clone())
            .unwrap()
            .with_unit_budget(Duration::ZERO);
        store
            .outbox_append(&[event("a"), event("b"), event("c")], 1_000_000)
            .unwrap();
        let cancel = CancellationToken::new();
        for left in [2u64, 1, 0] {
            assert_eq!(w.work(&cancel).await.unwrap(), WorkerState::Busy);
            assert_eq!(
                store.outbox_counts().unwrap(),
                (left, 0),
                "one entry per unit"
            );
        }
        assert!(WebhookWorker::lease_ttl(Duration::from_secs(10)) >= Duration::from_secs(40));
        assert_eq!(
            WebhookWorker::lease_ttl(Duration::from_secs(1)),
            Duration::from_secs(10)
        );
    }
}
