//! The service served from PostgreSQL (`storage.backend = "postgres"`): the real binary, two
//! instances on one throw-away PostgreSQL, the sandbox over TLS. What a fleet must show: a flow
//! started on one instance completes on the other, a token is served by every instance, each
//! single-use refresh token is presented once, and the singleton workers run on one instance.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::time::{Duration, Instant};

use common::fleet::{land_on, role, Instance};
use common::free_port;
use common::pg::Pg;
use lark_service::sandbox::{Sandbox, SandboxOptions};

async fn sandbox(user_token_ttl: u64) -> Sandbox {
    let s = Sandbox::start(SandboxOptions {
        user_token_ttl,
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    assert!(s.base_url().starts_with("https://"));
    s
}

/// One instance completes an authorization (request → card → redirect) and serves the token;
/// a second instance on the same database serves the same token; and an authorization asked
/// on A whose redirect lands on B completes there (the OAuth state is a database row, not a
/// process's memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_started_on_one_instance_completes_on_the_other() {
    let pg = Pg::start();
    let url = pg.url("postgres");
    let sandbox = sandbox(7200).await;
    let (pa, pb) = (free_port(), free_port());
    let redirect = format!("http://127.0.0.1:{pa}/oauth/callback");
    let a = Instance::start(&sandbox, &url, pa, &redirect, &[]).await;
    let b = Instance::start(&sandbox, &url, pb, &redirect, &[]).await;
    let http = reqwest::Client::new();

    // Alice: asked, approved and redirected on A.
    let authorize = a.request(&sandbox, "ou_sandbox_alice").await;
    let to_a = sandbox.approve(&authorize, "ou_sandbox_alice").unwrap();
    assert_eq!(http.get(&to_a).send().await.unwrap().status(), 200);
    let (sa, ta) = a.token("ou_sandbox_alice").await;
    assert_eq!(sa, 200, "{ta}");
    let (sb, tb) = b.token("ou_sandbox_alice").await;
    assert_eq!(sb, 200, "B serves A's token: {tb}");
    assert_eq!(ta["access_token"], tb["access_token"]);
    assert_eq!(
        sandbox
            .token_owner(ta["access_token"].as_str().unwrap())
            .as_deref(),
        Some("ou_sandbox_alice")
    );

    // Bob: asked on A, the redirect lands on B.
    assert_eq!(b.token("ou_sandbox_bob").await.0, 404);
    let authorize = a.request(&sandbox, "ou_sandbox_bob").await;
    let to_a = sandbox.approve(&authorize, "ou_sandbox_bob").unwrap();
    let r = http.get(land_on(&to_a, pa, pb)).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let (sa, ta) = a.token("ou_sandbox_bob").await;
    let (sb, tb) = b.token("ou_sandbox_bob").await;
    assert_eq!((sa, sb), (200, 200), "{ta} {tb}");
    assert_eq!(ta["access_token"], tb["access_token"]);
    // The same redirect again (a replayed code and state) is refused by either instance.
    let again = http.get(&to_a).send().await.unwrap();
    assert_ne!(again.status(), 200);
    assert_eq!(sandbox.hits("oauth_token"), 2, "one code exchange per user");

    a.stop();
    b.stop();
}

/// Two instances asked at once to authorize the same user send one card between them: the
/// request on B waits while A's request for that user is sending its card (held by the
/// sandbox), then reuses A's session. Each instance's own lock could not see the other's
/// request: without the fleet's request lease, B finds no session with a card and sends a
/// second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_asked_at_once_send_one_card() {
    let pg = Pg::start();
    let url = pg.url("postgres");
    let sandbox = sandbox(7200).await;
    let (pa, pb) = (free_port(), free_port());
    let redirect = format!("http://127.0.0.1:{pa}/oauth/callback");
    let a = Instance::start(&sandbox, &url, pa, &redirect, &[]).await;
    let b = Instance::start(&sandbox, &url, pb, &redirect, &[]).await;
    let user = "ou_sandbox_alice";
    let body = serde_json::json!({ "open_id": user });

    sandbox.hold("im");
    let (ra, rb) = tokio::join!(a.post("/api/v1/auth/requests", body.clone()), async {
        // B is asked once A's card is on its way (held by the sandbox).
        let until = Instant::now() + Duration::from_secs(20);
        while sandbox.held("im") == 0 {
            assert!(Instant::now() < until, "A never sent its card");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (rb, ()) = tokio::join!(b.post("/api/v1/auth/requests", body.clone()), async {
            // B waits for A: no second card while A's is held.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert_eq!(
                sandbox.held("im"),
                1,
                "B sent a card while A was sending one"
            );
            sandbox.release("im");
        });
        rb
    });
    assert_eq!(ra.0, 201, "{}", ra.1);
    assert_eq!(rb.0, 200, "B reuses A's session: {}", rb.1);
    assert_eq!(rb.1["reused"], true);
    assert_eq!(ra.1["session_id"], rb.1["session_id"]);
    assert_eq!(sandbox.messages_for(user).len(), 1, "one card");

    // And the other way round, at the same moment: still one card, one session.
    let bob = serde_json::json!({ "open_id": "ou_sandbox_bob" });
    let (ra, rb) = tokio::join!(
        a.post("/api/v1/auth/requests", bob.clone()),
        b.post("/api/v1/auth/requests", bob)
    );
    let mut statuses = [ra.0, rb.0];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 201], "{} {}", ra.1, rb.1);
    assert_eq!(ra.1["session_id"], rb.1["session_id"]);
    assert_eq!(sandbox.messages_for("ou_sandbox_bob").len(), 1, "one card");
    a.stop();
    b.stop();
}

async fn authorize(sandbox: &Sandbox, on: &Instance, open_id: &str) {
    let authorize = on.request(sandbox, open_id).await;
    let redirect = sandbox.approve(&authorize, open_id).unwrap();
    let r = reqwest::get(&redirect).await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// With tokens that live two seconds, both instances refresh (their refresh workers, and the
/// token requests that land on each at once): every single-use refresh token is presented
/// exactly once across the fleet (the sandbox counts reuses), and the token served is live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_refresh_token_is_presented_once_across_two_instances() {
    let pg = Pg::start();
    let url = pg.url("postgres");
    let sandbox = sandbox(2).await;
    let (pa, pb) = (free_port(), free_port());
    let redirect = format!("http://127.0.0.1:{pa}/oauth/callback");
    let a = Instance::start(&sandbox, &url, pa, &redirect, &[]).await;
    let b = Instance::start(&sandbox, &url, pb, &redirect, &[]).await;
    let users = ["ou_sandbox_alice", "ou_sandbox_bob", "ou_sandbox_carol"];
    for u in users {
        authorize(&sandbox, &a, u).await;
    }
    let codes = sandbox.hits("oauth_token");
    assert_eq!(codes, users.len() as u64);

    // Eight seconds of both instances asked for every token at the same moments.
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        for u in users {
            let (ra, rb) = tokio::join!(a.token(u), b.token(u));
            assert_eq!((ra.0, rb.0), (200, 200), "{} {}", ra.1, rb.1);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let refreshes = sandbox.hits("oauth_token") - codes;
    // Each token is due 1.6 s after it is issued: eight seconds make several rounds each.
    assert!(
        refreshes >= 2 * users.len() as u64,
        "too few refreshes to show anything: {refreshes}"
    );
    assert_eq!(
        sandbox.refresh_token_reuses(),
        0,
        "a refresh token was presented twice"
    );
    for u in users {
        let (s, t) = b.token(u).await;
        assert_eq!(s, 200);
        assert_eq!(
            sandbox
                .token_owner(t["access_token"].as_str().unwrap())
                .as_deref(),
            Some(u),
            "the token served is live and {u}'s"
        );
    }
    a.stop();
    b.stop();
}

/// The TTL sweep runs on one instance only: `/workers` shows one leader and one follower;
/// when the leader is killed (`kill -9`: no chance to let its lease go), the lease lapses and
/// the follower becomes the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_runs_on_one_instance_and_passes_on_when_it_dies() {
    let pg = Pg::start();
    let url = pg.url("postgres");
    let sandbox = sandbox(7200).await;
    let (pa, pb) = (free_port(), free_port());
    let redirect = format!("http://127.0.0.1:{pa}/oauth/callback");
    let fast = [("SWEEP_INTERVAL_SECONDS", "1")];
    let a = Instance::start(&sandbox, &url, pa, &redirect, &fast).await;
    let b = Instance::start(&sandbox, &url, pb, &redirect, &fast).await;

    let deadline = Instant::now() + Duration::from_secs(20);
    let (ra, rb) = loop {
        let (wa, wb) = (a.get("/workers").await.1, b.get("/workers").await.1);
        let (ra, rb) = (role(&wa, "ttl_sweep"), role(&wb, "ttl_sweep"));
        if let (Some(ra), Some(rb)) = (ra, rb) {
            break (ra, rb);
        }
        assert!(Instant::now() < deadline, "no sweep status: {wa} {wb}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut roles = [ra.clone(), rb];
    roles.sort();
    assert_eq!(roles, ["follower".to_owned(), "leader".to_owned()]);
    let (mut leader, follower) = if ra == "leader" { (a, b) } else { (b, a) };
    leader.child.kill().unwrap();
    leader.child.wait().unwrap();

    // The lease (10 s: three 1 s units, at least 10 s) lapses; the follower takes it.
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let w = follower.get("/workers").await.1;
        if role(&w, "ttl_sweep").as_deref() == Some("leader") {
            break;
        }
        assert!(Instant::now() < deadline, "the lease never passed on: {w}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    follower.stop();
}

/// One instance on `url` with its long connection up, and another session holding the row of
/// event id `id` uncommitted (so a claim of it waits); an `/authorize` message from Carol.
async fn instance_with_a_held_id(
    sandbox: &Sandbox,
    url: &str,
    id: &str,
) -> (Instance, tokio_postgres::Client, serde_json::Value) {
    let port = free_port();
    let redirect = format!("http://127.0.0.1:{port}/oauth/callback");
    let a = Instance::start(
        sandbox,
        url,
        port,
        &redirect,
        &[("WEBSOCKET_ENABLED", "true")],
    )
    .await;
    let t = Instant::now();
    while sandbox.connections_of(sandbox.app_id()) != 1 {
        assert!(t.elapsed() < Duration::from_secs(30), "not connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (blocker, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    blocker
        .batch_execute(&format!(
            "BEGIN; INSERT INTO ls_seen_events (id, forget_at) VALUES ('{id}', 1)"
        ))
        .await
        .unwrap();
    let message = serde_json::json!({
        "sender": {"sender_id": {"open_id": "ou_sandbox_carol", "user_id": "sandbox_carol", "union_id": "on_sandbox_carol"}, "sender_type": "user", "tenant_key": "sandbox"},
        "message": {"message_id": format!("om_{id}"), "chat_id": "oc_p2p", "chat_type": "p2p", "message_type": "text", "content": "{\"text\":\"/authorize\"}", "create_time": "1"}
    });
    (a, blocker, message)
}

/// An event whose claim is still waiting on PostgreSQL when the long connection drops is still
/// handled: its answer goes on without the session (the platform will redeliver it, as it was
/// never acknowledged), the handler runs once the claim is decided, and the redelivery is then
/// a duplicate. Dropping the waiting answer instead would leave its id marked in flight in
/// memory with no handler ever run, and the redelivery acknowledged as a duplicate: the event
/// lost. The claim is made to wait by a transaction holding its id's row uncommitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_waiting_on_its_claim_when_the_connection_drops_is_still_handled_once() {
    let pg = Pg::start();
    let url = pg.url("postgres");
    let sandbox = sandbox(7200).await;
    // Another session holds the event id's row uncommitted: a claim of it waits.
    let (a, blocker, message) = instance_with_a_held_id(&sandbox, &url, "ev_held_claim").await;
    let until = |what: &'static str, f: &dyn Fn() -> bool| {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(30), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let first = sandbox
        .push_event_as(
            "ev_held_claim",
            "im.message.receive_v1",
            message.clone(),
            lark_service::sandbox::PushOpts::default(),
        )
        .unwrap();
    // The instance's claim is waiting on that row lock (seen from a third session: one inside
    // a transaction keeps the first view of pg_stat_activity it took).
    let (watcher, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let t = Instant::now();
    loop {
        let row = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap();
        if row.get::<_, i64>(0) >= 1 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no claim waits");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The connection drops with the answer waiting. Once the instance has seen the session
    // end (its status gauge falls to 0), the other session lets go: the claim is this
    // instance's, and the handler runs once, though no session is left to carry its ACK.
    // (All of it well within the 2.5 s answer deadline: past it, the claim would be refused.)
    sandbox.close_ws_abruptly();
    let t = Instant::now();
    loop {
        let scrape = a.scrape().await;
        let up = scrape.lines().any(|l| {
            l.starts_with("lark_service_websocket_connection_status{") && l.ends_with(" 1")
        });
        if !up {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the drop not seen");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        sandbox.acks().iter().all(|a| a.message_id != first),
        "not acknowledged while its claim waits"
    );
    blocker.batch_execute("ROLLBACK").await.unwrap();
    until("the card sent", &|| {
        sandbox.messages_for("ou_sandbox_carol").len() == 1
    });
    until("reconnected", &|| {
        sandbox.connections_of(sandbox.app_id()) == 1
    });
    let im_calls = sandbox.hits("im");

    // The platform redelivers the unacknowledged event: a duplicate, not handled again.
    let again = sandbox
        .push_event_as(
            "ev_held_claim",
            "im.message.receive_v1",
            message,
            lark_service::sandbox::PushOpts::default(),
        )
        .unwrap();
    until("the redelivery acknowledged", &|| {
        sandbox.acks().iter().any(|a| a.message_id == again)
    });
    assert!(sandbox
        .acks()
        .iter()
        .any(|a| a.message_id == again && a.code == 200));
    assert_eq!(
        sandbox.hits("im"),
        im_calls,
        "the handler did not run again"
    );
    assert_eq!(sandbox.messages_for("ou_sandbox_carol").len(), 1);
    a.stop();
}

/// A claim PostgreSQL does not decide within the answer deadline (here: its row held by an
/// uncommitted transaction) does not hold the event's ACK: the event is answered as failed in
/// time, its handler not run on a guess, and the platform delivers it again later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_not_decided_in_time_is_answered_as_failed_in_time() {
    let pg = Pg::start();
    let url = pg.url("postgres");
    // No redelivery during the test: the answer seen is the first delivery's.
    let sandbox = Sandbox::start(SandboxOptions {
        redeliver_after: Duration::from_secs(600),
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let (a, blocker, message) = instance_with_a_held_id(&sandbox, &url, "ev_stuck").await;
    let pushed = sandbox
        .push_event_as(
            "ev_stuck",
            "im.message.receive_v1",
            message,
            lark_service::sandbox::PushOpts::default(),
        )
        .unwrap();
    // Answered while the row is still held: as failed, and nothing handled.
    let t = Instant::now();
    let code = loop {
        if let Some(a) = sandbox.acks().iter().find(|a| a.message_id == pushed) {
            break a.code;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_ne!(code, 200, "answered as failed, for redelivery");
    assert_eq!(
        sandbox.deliveries(&pushed),
        1,
        "the first delivery's answer"
    );
    assert!(sandbox.messages_for("ou_sandbox_carol").is_empty());
    let held = blocker
        .query_one(
            "SELECT count(*) FROM ls_seen_events WHERE id = 'ev_stuck'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(held, 1, "the blocking transaction still holds the row");
    blocker.batch_execute("ROLLBACK").await.unwrap();
    a.stop();
}
