//! What the instances of a fleet share on PostgreSQL, with the real binary on a throw-away
//! PostgreSQL and the sandbox over TLS: the heartbeat (readiness and the gauge count the live
//! instances; a clean stop deletes the row), the per-user rate limit counted once for the
//! fleet, and what the service does while PostgreSQL is down (token reads answer 503 with
//! `Retry-After`, readiness says why) and after it is back (both recover, no restart).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::time::{Duration, Instant};

use common::fleet::Instance;
use common::pg::Pg;
use common::{find_string, free_port, ADMIN};
use lark_service::sandbox::{Sandbox, SandboxOptions};
use serde_json::{json, Value};

/// One instance of the real binary serving from `pg_url` (`common::fleet`), events over signed
/// HTTP callbacks (so readiness does not wait for a long connection), its own redirect URI.
async fn start(sandbox: &Sandbox, pg_url: &str, extra: &[(&str, &str)]) -> Instance {
    let http_port = free_port();
    let redirect = format!("http://127.0.0.1:{http_port}/oauth/callback");
    let mut env = vec![
        ("WEBSOCKET_FALLBACK_TO_HTTP", "true"),
        ("LARK_ENCRYPT_KEY", "fleet-ops-encrypt-key"),
    ];
    env.extend_from_slice(extra);
    Instance::start(sandbox, pg_url, http_port, &redirect, &env).await
}

/// What these tests ask an instance beyond `common::fleet::Instance`.
trait Ops {
    /// `/readyz` as the admin sees it (with the detail): status and body.
    async fn readyz(&self) -> (u16, String);
    /// Polls `/readyz` until `pred` holds (20 s at most); the last answer.
    async fn readyz_until(&self, pred: impl Fn(u16, &str) -> bool) -> (u16, String);
    /// A GET on the admin listener: status, `Retry-After` and body.
    async fn get_with_retry_after(&self, path: &str) -> (u16, Option<String>, Value);
    /// Asks for `open_id`'s authorization: the status.
    async fn ask(&self, open_id: &str) -> u16;
    /// The value of an unlabelled metric family.
    async fn gauge(&self, family: &str) -> Option<f64>;
}

impl Ops for Instance {
    async fn readyz(&self) -> (u16, String) {
        let r = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/readyz", self.http_port))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn readyz_until(&self, pred: impl Fn(u16, &str) -> bool) -> (u16, String) {
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, body) = self.readyz().await;
            if pred(status, &body) || Instant::now() > until {
                return (status, body);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn get_with_retry_after(&self, path: &str) -> (u16, Option<String>, Value) {
        let r = reqwest::Client::new()
            .get(format!("{}{path}", self.admin))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        let retry_after = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let status = r.status().as_u16();
        (status, retry_after, r.json().await.unwrap_or(Value::Null))
    }

    async fn ask(&self, open_id: &str) -> u16 {
        self.post("/api/v1/auth/requests", json!({ "open_id": open_id }))
            .await
            .0
    }

    async fn gauge(&self, family: &str) -> Option<f64> {
        self.scrape()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{family} ")))
            .map(|v| v.trim().parse().unwrap())
    }
}

/// The holders of the heartbeat rows in the database.
async fn heartbeat_rows(url: &str) -> Vec<String> {
    let net = lark_service::net::Net::new(&lark_service::net::NetOptions::default()).unwrap();
    let c = lark_service::net::postgres::connect_pg(url, &net)
        .await
        .unwrap();
    c.query("SELECT holder FROM ls_instances ORDER BY holder", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn sandbox() -> Sandbox {
    Sandbox::start(SandboxOptions::default()).await.unwrap()
}

/// Two instances: each writes its heartbeat, so readiness, `/workers` and the gauge say two
/// are live; the per-user rate limit is one count for both (a user asked on A, B, A with a
/// limit of 2 is refused the third time, which A alone would have allowed); a clean stop
/// deletes the instance's row at once and the other soon counts one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_heartbeats_and_the_rate_limit() {
    let pg = Pg::start();
    let url = pg.url("postgres");
    let sandbox = sandbox().await;
    let limit = [("AUTH_REQUEST_RATE_LIMIT", "2")];
    let a = start(&sandbox, &url, &limit).await;
    let b = start(&sandbox, &url, &limit).await;

    let (status, body) = a
        .readyz_until(|s, b| s == 200 && b.contains("instances_live=2"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body, "ready: serving signed HTTP callbacks; instances_live=2\n",
        "{body}"
    );
    assert_eq!(heartbeat_rows(&url).await.len(), 2);
    assert_eq!(
        a.gauge("lark_service_fleet_instances_live").await,
        Some(2.0)
    );
    let (_, _, workers) = a.get_with_retry_after("/workers").await;
    assert_eq!(
        workers["fleet_heartbeat"]["status"], "instances_live=2",
        "{workers}"
    );

    // The rate limit: A, B, A for one user; the limit is 2 per window for the fleet.
    assert_eq!(a.ask("ou_sandbox_alice").await, 201);
    assert_eq!(b.ask("ou_sandbox_alice").await, 200, "reused, and counted");
    assert_eq!(a.ask("ou_sandbox_alice").await, 429, "the fleet's third");
    assert_eq!(
        b.ask("ou_sandbox_bob").await,
        201,
        "another user is counted apart"
    );

    // A clean stop: B's row is gone when it has exited; A counts one at its next beat.
    b.stop();
    assert_eq!(heartbeat_rows(&url).await.len(), 1);
    let (status, body) = a
        .readyz_until(|s, b| s == 200 && b.contains("instances_live=1"))
        .await;
    assert!(body.contains("instances_live=1"), "{status} {body}");
    assert_eq!(
        a.gauge("lark_service_fleet_instances_live").await,
        Some(1.0)
    );
    a.stop();
    assert!(heartbeat_rows(&url).await.is_empty());
}

/// PostgreSQL stops under a serving instance: a stored token's read answers 503
/// `store_unavailable` with `Retry-After` (never a stale or made-up answer), readiness says
/// `store`, the process keeps running; PostgreSQL starts again: the pool reconnects, the same
/// token is served and readiness comes back, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgres_is_down_token_reads_answer_503_and_recover_after() {
    let pg = Pg::start();
    let url = pg.url("postgres");
    let sandbox = sandbox().await;
    let a = start(&sandbox, &url, &[]).await;
    let before = a.readyz_until(|s, _| s == 200).await;
    assert_eq!(before.0, 200, "{}", before.1);

    // Alice authorizes; her token is served.
    let r = reqwest::Client::new()
        .post(format!("{}/api/v1/auth/requests", a.admin))
        .bearer_auth(ADMIN)
        .json(&json!({ "open_id": "ou_sandbox_alice" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let cards = sandbox.messages_for("ou_sandbox_alice");
    let authorize = find_string(&cards.last().unwrap().content, &|s| {
        s.contains("/open-apis/authen/v1/authorize?")
    })
    .unwrap()
    .to_owned();
    let redirect = sandbox.approve(&authorize, "ou_sandbox_alice").unwrap();
    assert_eq!(reqwest::get(&redirect).await.unwrap().status(), 200);
    let (status, _, token) = a
        .get_with_retry_after("/api/v1/users/ou_sandbox_alice/token")
        .await;
    assert_eq!(status, 200, "{token}");

    pg.stop_immediate();
    let (status, retry_after, body) = a
        .get_with_retry_after("/api/v1/users/ou_sandbox_alice/token")
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "store_unavailable", "{body}");
    assert_eq!(retry_after.as_deref(), Some("5"));
    assert!(body.get("access_token").is_none());
    let (status, reason) = a.readyz().await;
    assert_eq!(status, 503);
    assert!(reason.starts_with("not ready: store"), "{reason}");
    assert_eq!(
        a.ask("ou_sandbox_bob").await,
        503,
        "a new request is refused too"
    );

    pg.start_server();
    let until = Instant::now() + Duration::from_secs(20);
    let again = loop {
        let got = a
            .get_with_retry_after("/api/v1/users/ou_sandbox_alice/token")
            .await;
        if got.0 == 200 || Instant::now() > until {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(again.0, 200, "{}", again.2);
    assert_eq!(again.2["access_token"], token["access_token"]);
    let (status, body) = a.readyz_until(|s, _| s == 200).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("instances_live=1"), "{body}");
    a.stop();
}
