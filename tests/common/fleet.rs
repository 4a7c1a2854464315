//! Instances of the real binary serving one app from one PostgreSQL (`storage.backend =
//! "postgres"`), against the sandbox over TLS: what the fleet tests (`pg_serve`, `pg_fleet`)
//! start, ask and kill.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use lark_service::sandbox::{Sandbox, APP_ID, APP_SECRET};
use serde_json::{json, Value};

use super::{find_string, free_port, trust_sandbox, ADMIN, KEY};

/// One instance of the real binary serving from `pg_url`.
pub struct Instance {
    pub child: Child,
    /// `http://127.0.0.1:PORT` of its admin listener.
    pub admin: String,
    /// Its public HTTP port (the OAuth redirect).
    pub http_port: u16,
    /// `http://127.0.0.1:PORT/metrics`.
    pub metrics: String,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Instance {
    /// Starts an instance with its long connection off (`WEBSOCKET_ENABLED=false`, which
    /// `extra` may override); every instance of a test is given the same public redirect URI
    /// (`redirect`, what a load balancer in front of the fleet would be).
    pub async fn start(
        sandbox: &Sandbox,
        pg_url: &str,
        http_port: u16,
        redirect: &str,
        extra: &[(&str, &str)],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = trust_sandbox(dir.path(), sandbox).unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(&config, "").unwrap();
        let admin_port = free_port();
        let metrics_port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lark-service"));
        cmd.current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("APP_ID", APP_ID)
            .env("APP_SECRET", APP_SECRET)
            .env("LARK_DOMAIN", sandbox.base_url())
            .env("TLS_CA_FILE", &ca)
            .env("WEBSOCKET_ENABLED", "false")
            .env("LARK_TOKEN_ENCRYPTION_KEY", KEY)
            .env("LARK_SERVICE_ADMIN_TOKEN", ADMIN)
            .env("CARD_LOCALE", "en")
            .env("STORAGE_BACKEND", "postgres")
            .env("STORAGE_POSTGRES_URL", pg_url)
            .env("WEBHOOKS_EXPIRY_REMINDER_LEAD_SECONDS", "0")
            // A local file must never be opened beside the shared store.
            .env("STORAGE_PATH", dir.path().join("must-not-exist.redb"))
            .env("HTTP_LISTEN", format!("127.0.0.1:{http_port}"))
            .env("ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
            .env("AUTH_REDIRECT_URI", redirect);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let mut child = cmd
            .arg("--config")
            .arg(&config)
            .args([
                "serve",
                "--set",
                "metrics.bind=127.0.0.1",
                "--set",
                &format!("metrics.port={metrics_port}"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let ready = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().map(|l| l.unwrap()).unwrap_or_default();
            // Keep draining so the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            first
        })
        .await
        .unwrap();
        assert!(
            ready.starts_with(&format!(
                "lark-service ready: http://127.0.0.1:{http_port}/"
            )),
            "{ready}"
        );
        assert!(!dir.path().join("must-not-exist.redb").exists());
        Self {
            child,
            admin: format!("http://127.0.0.1:{admin_port}"),
            http_port,
            metrics: format!("http://127.0.0.1:{metrics_port}/metrics"),
            client: reqwest::Client::new(),
            _dir: dir,
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .client
            .get(format!("{}{path}", self.admin))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}{path}", self.admin))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn token(&self, open_id: &str) -> (u16, Value) {
        self.get(&format!("/api/v1/users/{open_id}/token")).await
    }

    /// The `/metrics` text.
    pub async fn scrape(&self) -> String {
        self.client
            .get(&self.metrics)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Asks for `open_id`'s authorization; returns the authorize URL of the card sent.
    pub async fn request(&self, sandbox: &Sandbox, open_id: &str) -> String {
        let before = sandbox.messages_for(open_id).len();
        let (status, body) = self
            .post("/api/v1/auth/requests", json!({ "open_id": open_id }))
            .await;
        assert_eq!(status, 201, "{body}");
        let cards = sandbox.messages_for(open_id);
        assert_eq!(cards.len(), before + 1, "one card sent");
        authorize_url(&cards[before].content).to_owned()
    }

    /// Kills the process without a chance to clean up (`kill -9`) and reaps it.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let st = self.child.wait().unwrap();
        assert!(st.success(), "instance exited with {st}");
    }
}

impl Drop for Instance {
    /// A failed test leaves no instance behind (`stop` has reaped it already: a no-op then).
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The authorize URL an Authorize card's button opens.
pub fn authorize_url(card: &Value) -> &str {
    find_string(card, &|s| s.contains("/open-apis/authen/v1/authorize?")).unwrap()
}

/// The redirect the sandbox made for the instance on `from` port, sent to the one on `to`.
pub fn land_on(redirect: &str, from: u16, to: u16) -> String {
    if from == to {
        return redirect.to_owned();
    }
    let moved = redirect.replacen(&format!(":{from}/"), &format!(":{to}/"), 1);
    assert_ne!(moved, redirect);
    moved
}

/// A worker's role on `/workers` (`leader`, `follower`, …).
pub fn role(workers: &Value, name: &str) -> Option<String> {
    workers[name]["status"]
        .as_str()
        .map(|s| s.split(';').next().unwrap_or_default().to_owned())
}
