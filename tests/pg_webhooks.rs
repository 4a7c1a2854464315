//! Outgoing webhooks served by a fleet on PostgreSQL (issue 19): two instances of the real
//! binary on one throw-away PostgreSQL, the sandbox over TLS, and a receiver this test serves
//! over TLS (its own CA, trusted with `TLS_CA_FILE` beside the sandbox's).
//!
//! - every event of a change made on either instance reaches the receiver, signed, exactly once
//!   when nothing goes wrong: one instance at a time delivers (the lease `worker/webhooks`);
//! - the instance delivering is `kill -9`'d while a delivery is in flight: the other takes the
//!   lease over and delivers everything, nothing is lost (at least once);
//! - with the expiry reminders on, each grant gets one reminder card and one `token.expiring`
//!   event across the fleet.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::fleet::{land_on, role, Instance};
use common::pg::Pg;
use common::receiver::{receiver_tls, serve_receiver, trust_both, Got, Receiver};
use common::{free_port, ADMIN};
use lark_service::sandbox::{Sandbox, SandboxOptions, APP_ID};
use lark_service::webhooks::verify;

const SECRET: &str = "whsec-fleet-0123456789abcdef0123456789abcdef";

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn user(i: usize) -> String {
    format!("ou_sandbox_user{i:04}")
}

/// The fleet under test: the sandbox, the receiver, a PostgreSQL and the settings every
/// instance is started with.
struct Fleet {
    sandbox: Sandbox,
    receiver: Receiver,
    pg: Pg,
    cas: String,
    hook: String,
    redirect_port: u16,
    _dir: tempfile::TempDir,
}

impl Fleet {
    async fn start(users: usize) -> Self {
        let sandbox = Sandbox::start(SandboxOptions {
            extra_users: users,
            ..SandboxOptions::default()
        })
        .await
        .unwrap();
        let (ca, acceptor) = receiver_tls();
        let dir = tempfile::tempdir().unwrap();
        let cas = trust_both(dir.path(), &sandbox, &ca);
        let port = free_port();
        let receiver = Receiver::default();
        serve_receiver(
            format!("127.0.0.1:{port}").parse().unwrap(),
            acceptor,
            receiver.clone(),
        )
        .await;
        Self {
            sandbox,
            receiver,
            pg: Pg::start(),
            cas,
            hook: format!("https://127.0.0.1:{port}/hook"),
            redirect_port: free_port(),
            _dir: dir,
        }
    }

    /// An instance on `http_port` (the first one on the shared redirect's port).
    async fn instance(&self, http_port: u16, extra: &[(&str, &str)]) -> Instance {
        let redirect = format!("http://127.0.0.1:{}/oauth/callback", self.redirect_port);
        let mut env = vec![
            ("WEBSOCKET_FALLBACK_TO_HTTP", "true"),
            ("LARK_ENCRYPT_KEY", "pg-webhooks-encrypt-key"),
            ("TLS_CA_FILE", self.cas.as_str()),
            ("WEBHOOKS_URLS", self.hook.as_str()),
            ("WEBHOOKS_SECRET", SECRET),
            ("WEBHOOKS_TIMEOUT_SECONDS", "2"),
        ];
        env.extend_from_slice(extra);
        Instance::start(
            &self.sandbox,
            &self.pg.url("postgres"),
            http_port,
            &redirect,
            &env,
        )
        .await
    }

    /// `open_id` asks on `ask`, approves, and the redirect lands on `land` (a load balancer).
    async fn authorize(&self, ask: &Instance, land: &Instance, open_id: &str) {
        let url = ask.request(&self.sandbox, open_id).await;
        let redirect = self.sandbox.approve(&url, open_id).unwrap();
        let to = land_on(&redirect, self.redirect_port, land.http_port);
        let page = reqwest::get(&to).await.unwrap();
        assert_eq!(page.status(), 200, "{to}");
    }

    fn outbox_rows(&self) -> (i64, i64) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let url = self.pg.url("postgres");
        std::thread::spawn(move || {
            rt.block_on(async {
                let net =
                    lark_service::net::Net::new(&lark_service::net::NetOptions::default()).unwrap();
                let c = lark_service::net::postgres::connect_pg(&url, &net)
                    .await
                    .unwrap();
                let r = c
                    .query_one(
                        "SELECT (SELECT count(*) FROM ls_outbox), (SELECT count(*) FROM ls_outbox_dead)",
                        &[],
                    )
                    .await
                    .unwrap();
                (r.get(0), r.get(1))
            })
        })
        .join()
        .unwrap()
    }
}

async fn revoke(on: &Instance, open_id: &str) {
    let r = reqwest::Client::new()
        .delete(format!("{}/api/v1/users/{open_id}/token", on.admin))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
}

/// Which of `instances` leads worker `name` (exactly one must, within 20 s).
async fn leader_of(instances: &[&Instance], name: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut leaders = Vec::new();
        for (i, inst) in instances.iter().enumerate() {
            let (_, w) = inst.get("/workers").await;
            if role(&w, name).as_deref() == Some("leader") {
                leaders.push(i);
            }
        }
        assert!(leaders.len() <= 1, "two leaders of {name}: {leaders:?}");
        if let [one] = leaders[..] {
            return one;
        }
        assert!(Instant::now() < deadline, "no leader of {name}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The deliveries an instance made that its receiver answered 2xx (its `/metrics`).
async fn successes(inst: &Instance) -> u64 {
    inst.scrape()
        .await
        .lines()
        .find_map(|l| l.strip_prefix("lark_service_webhook_deliveries_total{outcome=\"success\"} "))
        .map_or(0, |v| v.trim().parse::<u64>().unwrap())
}

fn check_signed(got: &[Got]) {
    for g in got {
        assert_eq!(
            verify(SECRET.as_bytes(), &g.signature, &g.body, now_s(), 300),
            Ok(())
        );
        let v = g.json();
        assert_eq!(v["event_id"].as_str().unwrap(), g.event_id_header);
        assert_eq!(v["app_id"], APP_ID);
    }
}

/// Two instances: changes made on both (authorizations asked on one and landing on the other,
/// token deletions) each reach the receiver exactly once, from the one instance holding the
/// delivery lease. Then the receiver holds a delivery, the deliverer is `kill -9`'d in the
/// middle of it, and the survivor takes over and delivers everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_delivers_each_event_once_and_a_killed_deliverer_loses_nothing() {
    let fleet = Fleet::start(16).await;
    let (pa, pb) = (fleet.redirect_port, free_port());
    let a = fleet.instance(pa, &[]).await;
    let b = fleet.instance(pb, &[]).await;
    let both = [&a, &b];

    // Normal case: 8 authorizations (asked on one, landing on the other) and 2 deletions.
    let mut expected = Vec::new();
    for i in 0..8 {
        let (ask, land) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        fleet.authorize(ask, land, &user(i)).await;
        expected.push(("authorization.completed".to_owned(), user(i)));
    }
    for i in 0..2 {
        revoke(both[i % 2], &user(i)).await;
        expected.push(("token.revoked".to_owned(), user(i)));
    }
    expected.sort();
    let r = fleet.receiver.clone();
    eventually("every event delivered", Duration::from_secs(30), || {
        r.by_id().len() >= expected.len()
    })
    .await;
    // Room for a second delivery, if one were to happen.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fleet.receiver.kinds(), expected);
    for (id, got) in fleet.receiver.by_id() {
        assert_eq!(got.len(), 1, "{id} delivered {} times", got.len());
    }
    check_signed(&fleet.receiver.all());
    assert_eq!(fleet.outbox_rows(), (0, 0), "delivered entries are deleted");
    let sent = [successes(&a).await, successes(&b).await];
    assert_eq!(
        sent.iter().sum::<u64>(),
        expected.len() as u64,
        "one delivery per event in all: {sent:?}"
    );
    assert_eq!(
        sent.iter().filter(|n| **n > 0).count(),
        1,
        "one instance delivered: {sent:?}"
    );
    let leader = leader_of(&both, "webhooks").await;
    assert_eq!(
        sent[1 - leader],
        0,
        "the follower delivered nothing: {sent:?}"
    );

    // The deliverer is killed while a delivery is in flight.
    fleet.receiver.held.store(true, Ordering::SeqCst);
    let before = fleet.receiver.by_id().len();
    let mut more = Vec::new();
    for i in 8..12 {
        let (ask, land) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        fleet.authorize(ask, land, &user(i)).await;
        more.push(("authorization.completed".to_owned(), user(i)));
    }
    let waiting = fleet.receiver.waiting.clone();
    eventually("a delivery in flight", Duration::from_secs(10), || {
        *waiting.lock().unwrap() > 0
    })
    .await;
    // One instance sends, one entry at a time: a second request in flight would be the other
    // instance (or the same entry twice). The delivery timeout (2 s) has not passed yet.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(*waiting.lock().unwrap(), 1, "one delivery in flight");
    let (mut a, mut b) = (a, b);
    let survivor = if leader == 0 {
        a.kill9();
        b
    } else {
        b.kill9();
        a
    };
    let killed_at = Instant::now();
    fleet.receiver.held.store(false, Ordering::SeqCst);
    let r = fleet.receiver.clone();
    eventually(
        "the survivor delivers what the killed one held",
        Duration::from_secs(40),
        || r.by_id().len() >= before + more.len(),
    )
    .await;
    let took = killed_at.elapsed();
    eprintln!("taken over and delivered {took:?} after the kill");
    expected.extend(more);
    expected.sort();
    assert_eq!(fleet.receiver.kinds(), expected, "nothing lost");
    check_signed(&fleet.receiver.all());
    assert_eq!(leader_of(&[&survivor], "webhooks").await, 0);
    eventually("the outbox drained", Duration::from_secs(10), || {
        fleet.outbox_rows() == (0, 0)
    })
    .await;
    survivor.stop();
}

/// With the expiry reminders on, each user's grant gets one reminder card and one
/// `token.expiring` event across two instances (the lease `worker/expiry_reminders`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_reminds_each_grant_once() {
    let fleet = Fleet::start(8).await;
    // A grant lives 8 s and is reminded 7 s before its end: due 1 s after it is made.
    let reminders = [
        ("WEBHOOKS_GRANT_LIFETIME_SECONDS", "8"),
        ("WEBHOOKS_EXPIRY_REMINDER_LEAD_SECONDS", "7"),
    ];
    let (pa, pb) = (fleet.redirect_port, free_port());
    let a = fleet.instance(pa, &reminders).await;
    let b = fleet.instance(pb, &reminders).await;
    let users: Vec<String> = (0..4).map(user).collect();
    for (i, u) in users.iter().enumerate() {
        let (ask, land) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        fleet.authorize(ask, land, u).await;
    }
    let r = fleet.receiver.clone();
    eventually("a reminder for each grant", Duration::from_secs(30), || {
        r.kinds()
            .iter()
            .filter(|(t, _)| t == "token.expiring")
            .count()
            >= users.len()
    })
    .await;
    // Room for a second reminder, if one were to happen (the reminders look every second).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let expiring: Vec<String> = fleet
        .receiver
        .kinds()
        .into_iter()
        .filter(|(t, _)| t == "token.expiring")
        .map(|(_, u)| u)
        .collect();
    assert_eq!(expiring, users, "one token.expiring per grant");
    for u in &users {
        assert_eq!(
            fleet.sandbox.messages_for(u).len(),
            2,
            "{u}: the Authorize card and one reminder card"
        );
    }
    leader_of(&[&a, &b], "expiry_reminders").await;
    a.stop();
    b.stop();
}
