//! Shutdown of the real binary on SIGTERM: work in flight finishes and is stored, and the
//! store is closed when the process exits.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{find_string, free_port, open_store, trust_sandbox, ADMIN, KEY};
use lark_service::sandbox::{Sandbox, SandboxOptions, APP_ID, APP_SECRET};
use secrecy::ExposeSecret;
use serde_json::{json, Value};

/// Issue 16 / 17: SIGTERM while a token refresh is in flight. The sandbox (over TLS, trusted
/// through `TLS_CA_FILE`) carries the refresh out — rotating the refresh token — and holds its
/// answer; the service gets SIGTERM and stops accepting; the answer is released. The process
/// must exit cleanly with the refreshed tokens stored and the store closed, having presented
/// the old refresh token exactly once. A service that dropped the refresh would keep the spent
/// refresh token (and present it again on its next start: a reuse).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_token_refresh_stores_the_refreshed_token() {
    let sandbox = Sandbox::start(SandboxOptions {
        // Due for refresh 1.6 s after it is issued.
        user_token_ttl: 2,
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    assert!(sandbox.base_url().starts_with("https://"));
    let dir = tempfile::tempdir().unwrap();
    let ca = trust_sandbox(dir.path(), &sandbox).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "").unwrap();
    let (http_port, admin_port) = (free_port(), free_port());
    let mut serve = Command::new(env!("CARGO_BIN_EXE_lark-service"))
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("APP_ID", APP_ID)
        .env("APP_SECRET", APP_SECRET)
        .env("LARK_DOMAIN", sandbox.base_url())
        .env("TLS_CA_FILE", &ca)
        .env("WEBSOCKET_ENABLED", "false")
        .env("LARK_TOKEN_ENCRYPTION_KEY", KEY)
        .env("LARK_SERVICE_ADMIN_TOKEN", ADMIN)
        .env("STORAGE_PATH", dir.path().join("s.redb"))
        .env("HTTP_LISTEN", format!("127.0.0.1:{http_port}"))
        .env("ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .env(
            "AUTH_REDIRECT_URI",
            format!("http://127.0.0.1:{http_port}/oauth/callback"),
        )
        .arg("--config")
        .arg(&config)
        .args(["serve", "--set", "metrics.port=0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = serve.stdout.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        lines.next().unwrap().unwrap()
    })
    .await
    .unwrap();
    assert!(
        ready.starts_with(&format!(
            "lark-service ready: http://127.0.0.1:{http_port}/"
        )),
        "{ready}"
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let admin = format!("http://127.0.0.1:{admin_port}");

    // Alice authorizes.
    let r = http
        .post(format!("{admin}/api/v1/auth/requests"))
        .bearer_auth(ADMIN)
        .json(&json!({"open_id": "ou_sandbox_alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let cards = sandbox.messages_for("ou_sandbox_alice");
    let authorize = find_string(&cards[0].content, &|s| {
        s.contains("/open-apis/authen/v1/authorize?")
    })
    .unwrap()
    .to_owned();
    let redirect = sandbox.approve(&authorize, "ou_sandbox_alice").unwrap();
    assert_eq!(http.get(&redirect).send().await.unwrap().status(), 200);
    let token = |http: reqwest::Client| {
        let admin = admin.clone();
        async move {
            let r = http
                .get(format!("{admin}/api/v1/users/ou_sandbox_alice/token"))
                .bearer_auth(ADMIN)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
            r.json::<Value>().await.unwrap()["access_token"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let old_access = token(http.clone()).await;
    // The code grant was the token endpoint's first request.
    assert_eq!(sandbox.hits("oauth_token"), 1);

    // The refresh worker's refresh reaches the platform, which rotates the refresh token and
    // holds the answer.
    sandbox.hold("oauth_token");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while sandbox.held("oauth_token") < 1 {
        assert!(tokio::time::Instant::now() < deadline, "no refresh came");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // SIGTERM: the listeners stop accepting while the answer is still held.
    let rc = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    assert!(rc.success());
    let health = format!("http://127.0.0.1:{http_port}/healthz");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while matches!(http.get(&health).send().await, Ok(r) if r.status().is_success()) {
        assert!(tokio::time::Instant::now() < deadline, "still accepting");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        sandbox.held("oauth_token"),
        1,
        "the refresh is still in flight"
    );
    // Everything else stops within moments; give it a second (this sets up the scenario,
    // nothing is timed): a service that did not wait for the refresh would have exited by now,
    // its refresh lost.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        serve.try_wait().unwrap().is_none(),
        "the service exited with a token refresh in flight"
    );
    sandbox.release("oauth_token");

    let out = tokio::time::timeout(
        Duration::from_secs(25),
        tokio::task::spawn_blocking(move || serve.wait_with_output().unwrap()),
    )
    .await
    .expect("the service exits within the grace period")
    .unwrap();
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{logs}");
    assert!(logs.contains("Stopped."), "{logs}");

    // The process is gone and so is its lock: the store opens at once, with the new tokens.
    let store = open_store(dir.path());
    let tok = store
        .get_token(APP_ID, "ou_sandbox_alice")
        .unwrap()
        .unwrap();
    let access = tok.access_token.expose_secret();
    assert_ne!(access, old_access, "the refreshed access token is stored");
    assert_eq!(
        sandbox.token_owner(access).as_deref(),
        Some("ou_sandbox_alice")
    );
    let refresh = tok.refresh_token.as_ref().unwrap().expose_secret();
    assert!(
        sandbox.refresh_token_live(refresh),
        "the stored refresh token is spent: the refresh in flight was dropped at shutdown"
    );
    assert!(tok.refresh_in_doubt_since.is_none() && !tok.needs_reauth);
    // The old refresh token was presented once (one refresh request) and never again.
    assert_eq!(sandbox.hits("oauth_token"), 2);
    assert_eq!(sandbox.refresh_token_reuses(), 0);
}

/// The real binary under `SIGHUP` then `SIGTERM`: the reload is read by the supervised reload
/// worker (the process lives on), and the stop is clean with the store lock released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_sigterm_then_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "").unwrap();
    let mut serve = Command::new(env!("CARGO_BIN_EXE_lark-service"))
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("APP_ID", APP_ID)
        .env("APP_SECRET", APP_SECRET)
        .env("LARK_DOMAIN", "http://127.0.0.1:9")
        .env("WEBSOCKET_ENABLED", "false")
        .env("PUBLIC_URL", "https://svc.example.com")
        .env("LARK_TOKEN_ENCRYPTION_KEY", KEY)
        .env("STORAGE_PATH", dir.path().join("s.redb"))
        .env("HTTP_LISTEN", "127.0.0.1:0")
        .env("ADMIN_LISTEN", "127.0.0.1:0")
        .arg("--config")
        .arg(&config)
        .args(["serve", "--set", "metrics.port=0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = serve.stdout.take().unwrap();
    let stderr = serve.stderr.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout).lines().next().unwrap().unwrap()
    })
    .await
    .unwrap();
    assert!(ready.starts_with("lark-service ready: "), "{ready}");
    // Every log line, as it comes.
    let (tx, mut logs) = tokio::sync::mpsc::unbounded_channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let pid = serve.id().to_string();
    let signal = |sig: &str| {
        let rc = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(rc.success());
    };
    signal("-HUP");
    wait_for_line(&mut logs, &mut seen, "SIGHUP: configuration re-read.").await;
    assert!(
        serve.try_wait().unwrap().is_none(),
        "SIGHUP ended the service"
    );
    signal("-TERM");
    wait_for_line(&mut logs, &mut seen, "Stopped.").await;
    let status = tokio::task::spawn_blocking(move || serve.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    reader.join().unwrap();
    drop(open_store(dir.path()));
}

/// Reads log lines (keeping them in `seen`) until one contains `needle`; fails after 20 s.
async fn wait_for_line(
    logs: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    seen: &mut Vec<String>,
    needle: &str,
) {
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(l) = logs.recv().await {
            let hit = l.contains(needle);
            seen.push(l);
            if hit {
                return true;
            }
        }
        false
    })
    .await;
    assert!(matches!(found, Ok(true)), "no {needle:?} in {seen:#?}");
}
