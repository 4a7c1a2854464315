//! `kill -9` of the service, at least 50 times (more on a slow machine, until at least 20
//! acknowledged completions were exercised), while users complete authorizations and the worker
//! refreshes tokens: every completion the service acknowledged (the browser saw "Authorization
//! complete") is present after the restart, and every token the API hands out belongs to the
//! right user (nothing decrypts wrong or crosses users).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lark_service::sandbox::{Sandbox, SandboxOptions, APP_ID, APP_SECRET};
use rand::Rng;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_lark-service");
const ADMIN: &str = "kill9-admin-token-0123456789abcdef";
const KEY: &str = "9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a9a";

fn find_authorize(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if s.contains("/open-apis/authen/v1/authorize?") => Some(s.clone()),
        Value::Object(m) => m.values().find_map(find_authorize),
        Value::Array(a) => a.iter().find_map(find_authorize),
        _ => None,
    }
}

fn spawn(dir: &std::path::Path, sandbox: &str, port: u16, admin_port: u16) -> Child {
    Command::new(BIN)
        .current_dir(dir)
        .env_clear()
        .env("APP_ID", APP_ID)
        .env("APP_SECRET", APP_SECRET)
        .env("PUBLIC_URL", format!("http://127.0.0.1:{port}"))
        .env("LARK_DOMAIN", sandbox)
        .env("TLS_CA_FILE", dir.join("sandbox-ca.pem"))
        .env("LARK_TOKEN_ENCRYPTION_KEY", KEY)
        .env("LARK_SERVICE_ADMIN_TOKEN", ADMIN)
        .env("STORAGE_PATH", dir.join("s.redb"))
        .env("HTTP_LISTEN", format!("127.0.0.1:{port}"))
        .env("ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .env("PROMETHEUS_PORT", "0")
        .env("WEBSOCKET_ENABLED", "false")
        .env("AUTH_REQUEST_RATE_LIMIT", "100000")
        .env("LOG_LEVEL", "error")
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits (bounded) until the restarted service answers `/healthz`.
async fn wait_up(http: &reqwest::Client, base: &str, round: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "round {round}: the service did not come back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every acknowledged completion is a completed session, and the token API hands out a token
/// of the right user (or says plainly that the user must authorize again). Returns how many
/// tokens were checked and how many answered `needs_reauthorization`.
async fn check_acknowledged(
    http: &reqwest::Client,
    base: &str,
    sandbox: &Sandbox,
    acknowledged: &[(String, String)],
    round: usize,
) -> (usize, usize) {
    let (mut tokens, mut reauth) = (0, 0);
    for (session, user) in acknowledged {
        let r = http
            .get(format!("{base}/api/v1/auth/sessions/{session}"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        let s: Value = r.json().await.unwrap();
        assert_eq!(
            s["state"], "completed",
            "round {round}: acknowledged session {session} is {s}"
        );
        let r = http
            .get(format!("{base}/api/v1/users/{user}/token"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            200 => {
                let t: Value = r.json().await.unwrap();
                let owner = sandbox.token_owner(t["access_token"].as_str().unwrap());
                assert_eq!(
                    owner.as_deref(),
                    Some(user.as_str()),
                    "round {round}: a token of the wrong user"
                );
                tokens += 1;
            }
            // A refresh token rotated by the platform just before a kill is lost with it:
            // the user must authorize again, which the API says plainly.
            409 => reauth += 1,
            other => panic!("round {round}: token API answered {other} for {user}"),
        }
    }
    (tokens, reauth)
}

/// At least this many kill -9 restarts, whatever the machine's speed.
const MIN_KILLS: usize = 50;
/// At least this many acknowledged completions must have been exercised (checked after a kill).
const TARGET_COMPLETIONS: usize = 20;
/// Guards so that a broken service fails the test instead of looping forever.
const MAX_ROUNDS: usize = 200;
const MAX_TOTAL: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_completions_survive_50_kills() {
    let sandbox = Sandbox::start(SandboxOptions {
        extra_users: 40,
        user_token_ttl: 2,
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sandbox-ca.pem"), sandbox.ca_pem().unwrap()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let public = format!("http://127.0.0.1:{port}");
    // The admin API, on the admin listener.
    let base = format!("http://127.0.0.1:{admin_port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let started_at = std::time::Instant::now();
    let mut acknowledged: Vec<(String, String)> = Vec::new();
    let mut rng = rand::rng();
    // The kill lands at a random point in 0..window after the completions start. The window
    // follows the machine's speed: it widens while rounds end before any completion was
    // acknowledged and narrows while every completion finishes before the kill, so kills keep
    // landing in the middle of the load on fast and slow machines alike.
    let mut window_ms: u64 = 60;
    let (mut rounds, mut tokens_checked, mut reauth_needed) = (0usize, 0usize, 0usize);
    let mut cut_short = 0usize;
    while rounds < MIN_KILLS || acknowledged.len() < TARGET_COMPLETIONS {
        assert!(
            rounds < MAX_ROUNDS && started_at.elapsed() < MAX_TOTAL,
            "kill9 gave up after {rounds} rounds in {:?} with {} acknowledged completions \
             (needs {MIN_KILLS} kills and {TARGET_COMPLETIONS} completions; kill window {window_ms} ms): \
             the service completes too few authorizations",
            started_at.elapsed(),
            acknowledged.len()
        );
        let round = rounds;
        rounds += 1;
        let mut child = spawn(dir.path(), &sandbox.base_url(), port, admin_port);
        wait_up(&http, &public, round).await;

        // Everything acknowledged so far is there, and tokens belong to the right user.
        let (ok, reauth) = check_acknowledged(&http, &base, &sandbox, &acknowledged, round).await;
        tokens_checked += ok;
        reauth_needed += reauth;

        // Load: concurrent completions while the refresh worker runs; kill at a random point.
        let mut tasks = tokio::task::JoinSet::new();
        for k in 0..6 {
            let user = format!("ou_sandbox_user{:04}", (round * 6 + k) % 40);
            let (http, base) = (http.clone(), base.clone());
            let sb = sandbox.base_url();
            tasks.spawn(async move {
                let r = http
                    .post(format!("{base}/api/v1/auth/requests"))
                    .bearer_auth(ADMIN)
                    .json(&json!({"open_id": user, "scopes": [format!("s{round}")]}))
                    .send()
                    .await
                    .ok()?;
                let session = r.json::<Value>().await.ok()?["session_id"]
                    .as_str()?
                    .to_owned();
                Some((session, user, sb))
            });
        }
        let mut started = Vec::new();
        while let Some(r) = tasks.join_next().await {
            if let Ok(Some(x)) = r {
                started.push(x);
            }
        }
        let mut completions = tokio::task::JoinSet::new();
        for (session, user, _) in started {
            let card = sandbox
                .messages_for(&user)
                .into_iter()
                .rev()
                .find_map(|m| find_authorize(&m.content));
            let Some(url) = card else { continue };
            let Ok(redirect) = sandbox.approve(&url, &user) else {
                continue;
            };
            let http = http.clone();
            completions.spawn(async move {
                let r = http.get(&redirect).send().await.ok()?;
                let ok = r.status().as_u16() == 200
                    && r.text().await.ok()?.contains("Authorization complete");
                ok.then_some((session, user))
            });
        }
        let in_flight = completions.len();
        let kill_after = Duration::from_millis(rng.random_range(0..window_ms));
        let killer = tokio::spawn(async move {
            tokio::time::sleep(kill_after).await;
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
        });
        let mut done_here = 0usize;
        while let Some(r) = completions.join_next().await {
            if let Ok(Some(done)) = r {
                acknowledged.push(done);
                done_here += 1;
            }
        }
        killer.await.unwrap();
        if in_flight > 0 && done_here == 0 {
            window_ms = (window_ms * 2).min(5_000);
        } else if done_here == in_flight {
            window_ms = (window_ms * 3 / 4).max(20);
        }
        if done_here < in_flight {
            cut_short += 1;
        }
    }
    // The last round's completions are checked after one more restart.
    let mut child = spawn(dir.path(), &sandbox.base_url(), port, admin_port);
    wait_up(&http, &public, rounds).await;
    let (ok, reauth) = check_acknowledged(&http, &base, &sandbox, &acknowledged, rounds).await;
    tokens_checked += ok;
    reauth_needed += reauth;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        acknowledged.len() >= TARGET_COMPLETIONS && rounds >= MIN_KILLS,
        "too few completions were exercised: {} in {rounds} rounds",
        acknowledged.len()
    );
    assert!(
        cut_short > 0,
        "no kill landed while completions were in flight in {rounds} rounds"
    );
    eprintln!(
        "kill9: {} acknowledged completions checked across {rounds} kill -9 restarts \
         ({cut_short} kills cut completions short; token API: {tokens_checked} right-owner tokens, \
         {reauth_needed} needs_reauthorization; final kill window {window_ms} ms; {:.1} s)",
        acknowledged.len(),
        started_at.elapsed().as_secs_f64()
    );
}
