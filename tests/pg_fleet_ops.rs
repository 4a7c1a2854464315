//! What the instances of a fleet share on PostgreSQL, with the real binary on a throw-away
//! PostgreSQL and the sandbox over TLS: the heartbeat (readiness and the gauge count the live
//! instances; a clean stop deletes the row), the per-user rate limit counted once for the
//! fleet, and what the service does while PostgreSQL is down (token reads answer 503 with
//! `Retry-After`, readiness says why) and after it is back (both recover, no restart).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::pg::Pg;
use common::{find_string, free_port, trust_sandbox, ADMIN, KEY};
use lark_service::sandbox::{Sandbox, SandboxOptions, APP_ID, APP_SECRET};
use serde_json::{json, Value};

/// One instance of the real binary serving from `pg_url`, events over signed HTTP callbacks
/// (so readiness does not wait for a long connection).
struct Instance {
    child: Child,
    http: String,
    admin: String,
    metrics: String,
    _dir: tempfile::TempDir,
}

impl Instance {
    async fn start(sandbox: &Sandbox, pg_url: &str, extra: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = trust_sandbox(dir.path(), sandbox).unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(&config, "").unwrap();
        let (http_port, admin_port, metrics_port) = (free_port(), free_port(), free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lark-service"));
        cmd.current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("APP_ID", APP_ID)
            .env("APP_SECRET", APP_SECRET)
            .env("LARK_DOMAIN", sandbox.base_url())
            .env("TLS_CA_FILE", &ca)
            .env("WEBSOCKET_ENABLED", "false")
            .env("WEBSOCKET_FALLBACK_TO_HTTP", "true")
            .env("LARK_ENCRYPT_KEY", "fleet-ops-encrypt-key")
            .env("LARK_TOKEN_ENCRYPTION_KEY", KEY)
            .env("LARK_SERVICE_ADMIN_TOKEN", ADMIN)
            .env("CARD_LOCALE", "en")
            .env("STORAGE_BACKEND", "postgres")
            .env("STORAGE_POSTGRES_URL", pg_url)
            .env("WEBHOOKS_EXPIRY_REMINDER_LEAD_SECONDS", "0")
            .env("STORAGE_PATH", dir.path().join("must-not-exist.redb"))
            .env("HTTP_LISTEN", format!("127.0.0.1:{http_port}"))
            .env("ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
            .env("PROMETHEUS_PORT", metrics_port.to_string())
            .env(
                "AUTH_REDIRECT_URI",
                format!("http://127.0.0.1:{http_port}/oauth/callback"),
            );
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let mut child = cmd
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let ready = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().map(|l| l.unwrap()).unwrap_or_default();
            std::thread::spawn(move || for _ in lines {});
            first
        })
        .await
        .unwrap();
        assert!(ready.starts_with("lark-service ready: "), "{ready}");
        Self {
            child,
            http: format!("http://127.0.0.1:{http_port}"),
            admin: format!("http://127.0.0.1:{admin_port}"),
            metrics: format!("http://127.0.0.1:{metrics_port}/metrics"),
            _dir: dir,
        }
    }

    /// `/readyz` as the admin sees it (with the detail): status and body.
    async fn readyz(&self) -> (u16, String) {
        let r = reqwest::Client::new()
            .get(format!("{}/readyz", self.http))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// Polls `/readyz` until `pred` holds (20 s at most); the last answer.
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

    async fn get(&self, path: &str) -> (u16, Option<String>, Value) {
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
        reqwest::Client::new()
            .post(format!("{}/api/v1/auth/requests", self.admin))
            .bearer_auth(ADMIN)
            .json(&json!({ "open_id": open_id }))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    async fn gauge(&self, family: &str) -> Option<f64> {
        let text = reqwest::get(&self.metrics)
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{family} ")))
            .map(|v| v.trim().parse().unwrap())
    }

    fn stop(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let st = self.child.wait().unwrap();
        assert!(st.success(), "instance exited with {st}");
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
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
    let a = Instance::start(&sandbox, &url, &limit).await;
    let b = Instance::start(&sandbox, &url, &limit).await;

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
    let (_, _, workers) = a.get("/workers").await;
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
    let a = Instance::start(&sandbox, &url, &[]).await;
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
    let (status, _, token) = a.get("/api/v1/users/ou_sandbox_alice/token").await;
    assert_eq!(status, 200, "{token}");

    pg.stop_immediate();
    let (status, retry_after, body) = a.get("/api/v1/users/ou_sandbox_alice/token").await;
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
        let got = a.get("/api/v1/users/ou_sandbox_alice/token").await;
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
