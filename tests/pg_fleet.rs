//! A fleet of three: three instances of the real binary on one throw-away PostgreSQL, each
//! holding its own long connection to the cluster-mode sandbox (over TLS), the OAuth redirects
//! spread round-robin over their HTTP ports as a load balancer would. Over 300 users authorize
//! (asked through the admin API or by an "/authorize" message), some reject with the card's
//! button, tokens live a few seconds so every instance refreshes, and one instance is killed
//! with `kill -9` halfway through. What must hold: every authorization completes, each user gets
//! one card, every event is handled once across the fleet, every token is served by every live
//! instance, no refresh token is presented twice, nothing committed is lost, and the killed
//! instance's singleton lease passes to a survivor.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::fleet::{authorize_url, land_on, role, Instance};
use common::pg::Pg;
use common::{find_callback_value, free_port, metric};
use futures_util::StreamExt;
use lark_service::sandbox::{PushOpts, Sandbox, SandboxOptions, APP_ID};
use serde_json::{json, Value};

/// Users driven through the run; one in twelve rejects, the rest must complete (> 300).
const USERS: usize = 336;
/// Authorizations in flight at once.
const PARALLEL: usize = 16;
/// Lifetime of the sandbox's user access tokens: each is due for refresh after 80 %.
const TOKEN_TTL: u64 = 5;

/// Token reads answered 503 (`refresh_in_doubt`, a refresh lease held elsewhere) and retried.
static RETRIED_503: AtomicUsize = AtomicUsize::new(0);

fn open_id(i: usize) -> String {
    format!("ou_sandbox_user{i:04}")
}

/// How user `i` asks and answers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Plan {
    /// Through the admin API of instance `i % live`, approved, redirect round-robin.
    Admin,
    /// Through the admin API, then the card's reject button (a click on a random connection).
    Reject,
    /// A pushed "/authorize" message; `dup`: the same event pushed again (same event_id).
    Message(Dup),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dup {
    No,
    /// Pushed again at once: the redelivery races the first delivery.
    AtOnce,
    /// Pushed again once the card is there: a late redelivery.
    Late,
}

fn plan(i: usize) -> Plan {
    match (i % 2, i % 12, i % 8) {
        (0, 0, _) => Plan::Reject,
        (0, _, _) => Plan::Admin,
        (_, _, 1) => Plan::Message(Dup::AtOnce),
        (_, _, 3) => Plan::Message(Dup::Late),
        _ => Plan::Message(Dup::No),
    }
}

/// What the run records: frames pushed (their frame `message_id`s), duplicates pushed,
/// users completed.
#[derive(Default)]
struct Record {
    frames: Mutex<Vec<String>>,
    duplicates: AtomicUsize,
    distinct_events: AtomicUsize,
    completed: Mutex<Vec<String>>,
    rejected: Mutex<Vec<String>>,
}

/// The live part of the fleet, and the round-robin counter of the "load balancer".
struct Fleet<'a> {
    live: Vec<&'a Instance>,
    rr: AtomicUsize,
}

impl Fleet<'_> {
    /// The next instance in round-robin order.
    fn next(&self) -> &Instance {
        self.live[self.rr.fetch_add(1, Ordering::Relaxed) % self.live.len()]
    }
}

async fn wait_until<F: FnMut() -> bool>(what: &str, within: Duration, mut f: F) {
    let until = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The user's only card, once it is there.
async fn the_card(sandbox: &Sandbox, user: &str) -> lark_service::sandbox::SentMessage {
    wait_until(&format!("{user}'s card"), Duration::from_secs(30), || {
        !sandbox.messages_for(user).is_empty()
    })
    .await;
    let cards = sandbox.messages_for(user);
    assert_eq!(cards.len(), 1, "{user} got more than one card");
    cards.into_iter().next().unwrap()
}

fn message_event(i: usize) -> Value {
    let user = open_id(i);
    json!({
        "sender": {"sender_id": {"open_id": user, "user_id": format!("sandbox_user{i:04}"), "union_id": format!("on_sandbox_user{i:04}")}, "sender_type": "user", "tenant_key": "sandbox"},
        "message": {"message_id": format!("om_fleet_{i}"), "chat_id": format!("oc_p2p_{i}"), "chat_type": "p2p", "message_type": "text", "content": "{\"text\":\"/authorize\"}", "create_time": "1"}
    })
}

/// Token of `user` from `on` (a 503 `refresh_in_doubt` is retried after its Retry-After, as
/// the API asks callers to); must be 200 and a live token of `user`.
async fn served_live(sandbox: &Sandbox, on: &Instance, user: &str) -> String {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, t) = on.token(user).await;
        if s == 503 && Instant::now() < until {
            RETRIED_503.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        assert_eq!(s, 200, "{user} on {}: {t}", on.admin);
        let tok = t["access_token"].as_str().unwrap().to_owned();
        assert_eq!(
            sandbox.live_token_owner(&tok).as_deref(),
            Some(user),
            "the token served for {user} by {} is live and theirs",
            on.admin
        );
        return tok;
    }
}

/// One user's whole authorization on the live fleet.
async fn authorize(sandbox: &Sandbox, fleet: &Fleet<'_>, rec: &Record, i: usize) {
    let user = open_id(i);
    let asked_on = fleet.live[i % fleet.live.len()];
    let mut session = None;
    match plan(i) {
        Plan::Admin | Plan::Reject => {
            let (status, body) = asked_on
                .post("/api/v1/auth/requests", json!({ "open_id": user }))
                .await;
            assert_eq!(status, 201, "{user}: {body}");
            session = Some(body["session_id"].as_str().unwrap().to_owned());
        }
        Plan::Message(dup) => {
            let ev = format!("ev_fleet_{i}");
            let push = || {
                sandbox
                    .push_event_as(
                        &ev,
                        "im.message.receive_v1",
                        message_event(i),
                        PushOpts::default(),
                    )
                    .unwrap()
            };
            rec.frames.lock().unwrap().push(push());
            rec.distinct_events.fetch_add(1, Ordering::Relaxed);
            if dup == Dup::AtOnce {
                rec.frames.lock().unwrap().push(push());
                rec.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            the_card(sandbox, &user).await;
            if dup == Dup::Late {
                let frame = push();
                rec.frames.lock().unwrap().push(frame.clone());
                rec.duplicates.fetch_add(1, Ordering::Relaxed);
                wait_until("the late duplicate's ACK", Duration::from_secs(30), || {
                    sandbox.acks().iter().any(|a| a.message_id == frame)
                })
                .await;
            }
        }
    }
    let card = the_card(sandbox, &user).await;
    if plan(i) == Plan::Reject {
        let value = find_callback_value(&card.content).expect("the card has a reject button");
        let frame = sandbox
            .click_card_button(&card.message_id, &user, value)
            .unwrap();
        rec.frames.lock().unwrap().push(frame.clone());
        rec.distinct_events.fetch_add(1, Ordering::Relaxed);
        wait_until("the click's ACK", Duration::from_secs(30), || {
            sandbox.acks().iter().any(|a| a.message_id == frame)
        })
        .await;
        // Seen from another instance than the one that was asked.
        let other = fleet.live[(i + 1) % fleet.live.len()];
        let session = session.unwrap();
        let (s, body) = other.get(&format!("/api/v1/auth/sessions/{session}")).await;
        assert_eq!(s, 200, "{body}");
        assert_eq!(body["state"], "rejected", "{user}: {body}");
        rec.rejected.lock().unwrap().push(user);
        return;
    }
    let redirect = sandbox
        .approve(authorize_url(&card.content), &user)
        .unwrap();
    // The sandbox redirects to the one public redirect URI; the load balancer picks the port.
    let from = url::Url::parse(&redirect).unwrap().port().unwrap();
    let lands = fleet.next();
    let r = reqwest::get(land_on(&redirect, from, lands.http_port))
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{user}: {}", r.text().await.unwrap());
    // Served at once by another instance.
    served_live(sandbox, fleet.next(), &user).await;
    rec.completed.lock().unwrap().push(user);
}

async fn run_batch(
    sandbox: &Sandbox,
    fleet: &Fleet<'_>,
    rec: &Record,
    users: std::ops::Range<usize>,
) {
    futures_util::stream::iter(users)
        .map(|i| authorize(sandbox, fleet, rec, i))
        .buffer_unordered(PARALLEL)
        .collect::<Vec<()>>()
        .await;
}

/// Rows of a query on the fleet's database (`psql`), one line each, columns `|`-separated.
fn psql(pg: &Pg, query: &str) -> Vec<String> {
    let out = std::process::Command::new(pg.bin.join("psql"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
        ])
        .args(["-d", "postgres", "-At", "-c", query])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A user whose token a killed instance was refreshing (it held the user's refresh lease):
/// the survivors serve the stored token while it is valid, then answer 503 `refresh_in_doubt`
/// until the lease lapses and the doubt is settled (`needs_reauthorization`, 409, when the old
/// token can no longer tell): never a spent refresh token presented again, never a dead token.
async fn in_doubt_answer(sandbox: &Sandbox, on: &Instance, user: &str) -> u16 {
    let (s, t) = on.token(user).await;
    match s {
        200 => {
            let tok = t["access_token"].as_str().unwrap();
            assert_eq!(sandbox.live_token_owner(tok).as_deref(), Some(user), "{t}");
        }
        503 => assert_eq!(t["error"], "refresh_in_doubt", "{t}"),
        409 => assert_eq!(t["error"], "needs_reauthorization", "{t}"),
        _ => panic!("{user} on {}: {s} {t}", on.admin),
    }
    s
}

/// Sum of a metric over `/metrics` texts.
fn total(scrapes: &[String], name: &str, filter: &str) -> f64 {
    scrapes.iter().map(|s| metric(s, name, filter)).sum()
}

async fn sweep_roles(fleet: &[&Instance]) -> Vec<Option<String>> {
    let mut roles = Vec::new();
    for i in fleet {
        roles.push(role(&i.get("/workers").await.1, "ttl_sweep"));
    }
    roles
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_serve_one_app_and_lose_nothing_when_one_is_killed() {
    let started = Instant::now();
    let pg = Pg::start();
    let url = pg.url("postgres");
    let sandbox = Sandbox::start(SandboxOptions {
        user_token_ttl: TOKEN_TTL,
        extra_users: USERS,
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    assert!(sandbox.base_url().starts_with("https://"));
    let ports = [free_port(), free_port(), free_port()];
    let redirect = format!("http://127.0.0.1:{}/oauth/callback", ports[0]);
    let env = [
        ("WEBSOCKET_ENABLED", "true"),
        ("SWEEP_INTERVAL_SECONDS", "1"),
    ];
    let mut instances = Vec::new();
    for p in ports {
        instances.push(Instance::start(&sandbox, &url, p, &redirect, &env).await);
    }
    // Each instance holds its own long connection.
    wait_until("three long connections", Duration::from_secs(30), || {
        sandbox.connections_of(APP_ID) == 3
    })
    .await;
    let rec = Record::default();

    // The first half on all three.
    let half = USERS / 2;
    {
        let fleet = Fleet {
            live: instances.iter().collect(),
            rr: AtomicUsize::new(0),
        };
        run_batch(&sandbox, &fleet, &rec, 0..half).await;
    }
    let before_kill: Vec<String> = rec.completed.lock().unwrap().clone();
    assert!(before_kill.len() > half * 4 / 5, "{}", before_kill.len());
    // Every pushed event is answered before the kill: the killed instance's counters below
    // are final.
    assert_eq!(sandbox.wait_unacked_below(1, Duration::from_secs(30)), 0);
    let mut scrapes = Vec::new();
    // Tokens live TOKEN_TTL seconds: by now every instance refreshes (its worker, and the
    // token reads that land on it).
    let deadline = Instant::now() + Duration::from_secs(30);
    for on in &instances {
        loop {
            let s = on.scrape().await;
            if metric(
                &s,
                "lark_service_token_refresh_total",
                "outcome=\"success\"",
            ) > 0.0
            {
                break;
            }
            assert!(Instant::now() < deadline, "{} never refreshed", on.admin);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    // Kill the sweep's leader: its lease must pass on.
    let deadline = Instant::now() + Duration::from_secs(20);
    let leader = loop {
        let roles = sweep_roles(&instances.iter().collect::<Vec<_>>()).await;
        if let Some(k) = roles.iter().position(|r| r.as_deref() == Some("leader")) {
            assert_eq!(
                roles
                    .iter()
                    .filter(|r| r.as_deref() == Some("leader"))
                    .count(),
                1,
                "one sweep leader: {roles:?}"
            );
            break k;
        }
        assert!(Instant::now() < deadline, "no sweep leader: {roles:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut killed = instances.remove(leader);
    let sweep_holder = psql(
        &pg,
        "SELECT holder FROM ls_leases WHERE name = 'worker/ttl_sweep'",
    );
    let dead = sweep_holder.first().unwrap().replace('\'', "''");
    let held_by_dead = || {
        psql(
            &pg,
            &format!(
                "SELECT name FROM ls_leases WHERE holder = '{dead}' AND name LIKE 'refresh/%'"
            ),
        )
    };
    scrapes.push(killed.scrape().await);
    // Killed in the middle of a refresh: the platform carries each refresh out but holds its
    // answer, until the instance to be killed holds a refresh lease (its refresh token spent,
    // the new one on its way to a process about to die).
    sandbox.hold("oauth_token");
    let deadline = Instant::now() + Duration::from_secs(20);
    while held_by_dead().is_empty() {
        assert!(
            Instant::now() < deadline,
            "no refresh in flight on the leader"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    killed.kill9();
    sandbox.release("oauth_token");
    let killed_at = Instant::now();
    // The refreshes it had in flight: its refresh leases (a finished refresh lets its go).
    let held = held_by_dead();
    let in_doubt: HashSet<String> = before_kill
        .iter()
        .filter(|u| held.iter().any(|n| n.ends_with(&u["ou_".len()..])))
        .cloned()
        .collect();
    assert_eq!(in_doubt.len(), held.len(), "{held:?}");
    assert!(!in_doubt.is_empty());
    wait_until("the dead connection to go", Duration::from_secs(30), || {
        sandbox.connections_of(APP_ID) == 2
    })
    .await;

    // Nothing it committed is lost: every token stored before is served by the survivors
    // (those it was refreshing at the kill as `in_doubt_answer` says).
    for user in &before_kill {
        for on in &instances {
            if in_doubt.contains(user) {
                in_doubt_answer(&sandbox, on, user).await;
            } else {
                served_live(&sandbox, on, user).await;
            }
        }
    }

    // The rest of the run on the two survivors (redirects to live ports only).
    {
        let fleet = Fleet {
            live: instances.iter().collect(),
            rr: AtomicUsize::new(0),
        };
        run_batch(&sandbox, &fleet, &rec, half..USERS).await;
    }

    // The sweep's lease passed to a survivor.
    let deadline = killed_at + Duration::from_secs(40);
    loop {
        let roles = sweep_roles(&instances.iter().collect::<Vec<_>>()).await;
        let leaders = roles
            .iter()
            .filter(|r| r.as_deref() == Some("leader"))
            .count();
        if leaders == 1 {
            break;
        }
        assert!(leaders <= 1, "two sweep leaders: {roles:?}");
        assert!(
            Instant::now() < deadline,
            "the lease never passed on: {roles:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Every authorization completed, and each user got one card.
    let completed: Vec<String> = rec.completed.lock().unwrap().clone();
    let rejected: Vec<String> = rec.rejected.lock().unwrap().clone();
    let expected_rejects = (0..USERS).filter(|i| plan(*i) == Plan::Reject).count();
    assert_eq!(rejected.len(), expected_rejects);
    assert_eq!(completed.len(), USERS - expected_rejects);
    assert!(completed.len() >= 300, "{}", completed.len());
    for i in 0..USERS {
        let user = open_id(i);
        assert_eq!(sandbox.messages_for(&user).len(), 1, "{user}: one card");
    }

    // Every token from every live instance, live and the user's own.
    let mut in_doubt_answers = Vec::new();
    for user in &completed {
        for on in &instances {
            if in_doubt.contains(user) {
                in_doubt_answers.push(in_doubt_answer(&sandbox, on, user).await);
            } else {
                served_live(&sandbox, on, user).await;
            }
        }
    }
    for user in &rejected {
        for on in &instances {
            assert_eq!(on.token(user).await.0, 404, "{user} rejected: no token");
        }
    }

    // Refreshes happened on every instance, and no refresh token was presented twice.
    for on in &instances {
        let s = on.scrape().await;
        assert!(
            metric(
                &s,
                "lark_service_token_refresh_total",
                "outcome=\"success\""
            ) > 0.0,
            "{} never refreshed",
            on.admin
        );
        scrapes.push(s);
    }
    let refreshes = total(
        &scrapes,
        "lark_service_token_refresh_total",
        "outcome=\"success\"",
    );
    assert!(
        refreshes >= completed.len() as f64,
        "too few refreshes to show anything: {refreshes}"
    );
    assert_eq!(
        sandbox.refresh_token_reuses(),
        0,
        "a refresh token was presented twice"
    );

    // Every event handled once across the fleet. Each delivery is received once; a
    // delivery is handled, dropped as a duplicate, or (while another instance holds the
    // event) answered "redeliver": exactly one delivery of each event is handled, each
    // duplicate push ends dropped, and every redelivery was asked for by such an answer.
    assert_eq!(sandbox.wait_unacked_below(1, Duration::from_secs(30)), 0);
    let frames: Vec<String> = rec.frames.lock().unwrap().clone();
    let deliveries: u32 = frames.iter().map(|f| sandbox.deliveries(f)).sum();
    let redelivered = f64::from(deliveries) - frames.len() as f64;
    let received = total(&scrapes, "lark_service_events_received_total", "websocket");
    let deduplicated = total(&scrapes, "lark_service_events_deduplicated_total", "");
    let elsewhere = total(&scrapes, "lark_service_events_claimed_elsewhere_total", "");
    let failed = total(&scrapes, "lark_service_event_handler_failures_total", "")
        + total(&scrapes, "lark_service_events_overloaded_total", "");
    assert_eq!(received, f64::from(deliveries), "received = delivered");
    assert_eq!(failed, 0.0, "no handler failed or was turned away");
    assert_eq!(
        deduplicated,
        rec.duplicates.load(Ordering::Relaxed) as f64,
        "every duplicate (and nothing else) dropped"
    );
    assert_eq!(elsewhere, redelivered, "each redelivery asked for");
    assert_eq!(
        received - deduplicated - elsewhere,
        rec.distinct_events.load(Ordering::Relaxed) as f64,
        "each event handled once"
    );
    // One ACK per delivery; each frame's last one accepts it, and the others are the
    // "redeliver" answers counted above.
    let acks = sandbox.acks();
    let ours: HashSet<&str> = frames.iter().map(String::as_str).collect();
    let mut refused = 0;
    for f in &frames {
        let of: Vec<_> = acks.iter().filter(|a| &a.message_id == f).collect();
        assert_eq!(
            u32::try_from(of.len()).unwrap(),
            sandbox.deliveries(f),
            "ACKs of {f}"
        );
        assert_eq!(of.last().unwrap().code, 200, "ACKs of {f}: {of:?}");
        refused += of.iter().filter(|a| a.code != 200).count();
    }
    assert_eq!(refused as f64, elsewhere);
    assert!(acks.iter().all(|a| ours.contains(a.message_id.as_str())));

    eprintln!(
        "pg_fleet: {} completed, {} rejected, {} frames ({} duplicates, {elsewhere} answered \
         redeliver), {refreshes} refreshes, {} oauth_token hits, {} token reads retried after 503, \
         {} refreshes in flight at the kill (answers {in_doubt_answers:?}), {:.1} s",
        completed.len(),
        rejected.len(),
        frames.len(),
        rec.duplicates.load(Ordering::Relaxed),
        sandbox.hits("oauth_token"),
        RETRIED_503.load(Ordering::Relaxed),
        in_doubt.len(),
        started.elapsed().as_secs_f64()
    );
    for i in instances {
        i.stop();
    }
}
