//! Test support shared by the integration tests: the service in-process against the sandbox.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use lark_service::config::{Config, LoadOptions};
use lark_service::daemon::{run_with_reloads, Listeners};
use lark_service::sandbox::{Sandbox, APP_ID, APP_SECRET};
use serde_json::Value;

pub mod fleet;
pub mod pg;
pub mod receiver;
use tokio::net::TcpListener;

pub const ADMIN: &str = "e2e-admin-token-0123456789abcdef0123";
pub const KEY: &str = "7e57c0de7e57c0de7e57c0de7e57c0de7e57c0de7e57c0de7e57c0de7e57c0de";
pub const ENCRYPT_KEY: &str = "e2e-encrypt-key";
pub const VTOKEN: &str = "e2e-verification-token";

/// Writes the sandbox's CA into `dir` and returns its path for `TLS_CA_FILE` (an operator
/// trusting a company CA); `None` when the sandbox serves plain HTTP.
pub fn trust_sandbox(dir: &std::path::Path, sandbox: &Sandbox) -> Option<String> {
    let pem = sandbox.ca_pem()?;
    let path = dir.join("sandbox-ca.pem");
    std::fs::write(&path, pem).unwrap();
    Some(path.display().to_string())
}

/// The metrics registry is process-wide: tests that assert on metric values (or whose service
/// sets a gauge another test reads, such as the connection status of the one sandbox app id)
/// take this lock so the tests of one binary do not move each other's numbers.
pub static METRICS_SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub struct Service {
    /// The public listener (OAuth redirect, callbacks, health).
    pub http: SocketAddr,
    /// The admin listener (admin API, `/mcp`); `get`/`post` call it with [`ADMIN`].
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
    pub client: reqwest::Client,
    env: HashMap<String, String>,
    cfg_file: std::path::PathBuf,
    reloads: tokio::sync::mpsc::Sender<Config>,
}

impl Service {
    /// The service against `sandbox`, trusting the sandbox's CA through `TLS_CA_FILE` (as an
    /// operator trusts a company CA).
    pub async fn start(sandbox: &Sandbox, extra: &[(&str, &str)]) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), sandbox, extra).await
    }

    pub async fn start_in(
        dir: tempfile::TempDir,
        sandbox: &Sandbox,
        extra: &[(&str, &str)],
    ) -> Self {
        let ca = trust_sandbox(dir.path(), sandbox);
        let mut with_ca: Vec<(&str, &str)> =
            ca.iter().map(|c| ("TLS_CA_FILE", c.as_str())).collect();
        with_ca.extend_from_slice(extra);
        Self::start_with(dir, &sandbox.base_url(), &with_ca).await
    }

    /// The service against any platform at `domain`, with exactly the settings given.
    pub async fn start_with(dir: tempfile::TempDir, domain: &str, extra: &[(&str, &str)]) -> Self {
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(dir, http, domain, extra).await
    }

    /// Starts on a listener bound beforehand (when the sandbox must know the service's address).
    pub async fn start_on(
        dir: tempfile::TempDir,
        http: TcpListener,
        domain: &str,
        extra: &[(&str, &str)],
    ) -> Self {
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on_both(dir, http, admin, domain, extra).await
    }

    /// Starts on public and admin listeners bound beforehand (the sandbox page must know the
    /// admin API's address).
    pub async fn start_on_both(
        dir: tempfile::TempDir,
        http: TcpListener,
        admin: TcpListener,
        domain: &str,
        extra: &[(&str, &str)],
    ) -> Self {
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (ha, ma) = (http.local_addr().unwrap(), metrics.local_addr().unwrap());
        let aa = admin.local_addr().unwrap();
        let cfg_file = dir.path().join("config.toml");
        std::fs::write(&cfg_file, "").unwrap();
        let mut env: HashMap<String, String> = [
            ("APP_ID", APP_ID),
            ("APP_SECRET", APP_SECRET),
            ("LARK_TOKEN_ENCRYPTION_KEY", KEY),
            ("LARK_SERVICE_ADMIN_TOKEN", ADMIN),
            ("LARK_ENCRYPT_KEY", ENCRYPT_KEY),
            ("LARK_VERIFICATION_TOKEN", VTOKEN),
            // The tests read the cards' English texts; Chinese (the default) has its own tests.
            ("CARD_LOCALE", "en"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        env.insert("LARK_DOMAIN".into(), domain.to_owned());
        env.insert(
            "STORAGE_PATH".into(),
            dir.path().join("s.redb").display().to_string(),
        );
        env.insert(
            "AUTH_REDIRECT_URI".into(),
            format!("http://{ha}/oauth/callback"),
        );
        for (k, v) in extra {
            env.insert((*k).to_owned(), (*v).to_owned());
        }
        let cfg = Config::load_with(
            &LoadOptions {
                config_path: Some(cfg_file.clone()),
                overrides: vec![],
            },
            &env,
        )
        .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (reloads, reload_rx) = tokio::sync::mpsc::channel(4);
        let task = tokio::spawn(async move {
            run_with_reloads(
                cfg,
                Listeners {
                    http,
                    admin,
                    metrics: Some(metrics),
                },
                async move {
                    let _ = rx.await;
                },
                reload_rx,
            )
            .await
            .unwrap();
        });
        let s = Self {
            http: ha,
            admin: aa,
            metrics: ma,
            stop: Some(tx),
            task,
            _dir: dir,
            client: reqwest::Client::new(),
            env,
            cfg_file,
            reloads,
        };
        s.wait_for(|| async {
            s.client
                .get(format!("http://{}/healthz", s.http))
                .send()
                .await
                .is_ok()
        })
        .await;
        s
    }

    /// What `SIGHUP` does: the configuration is re-read (the start-up settings with `changes`
    /// over them) and handed to the running service.
    pub async fn reload(&self, changes: &[(&str, &str)]) {
        let mut env = self.env.clone();
        for (k, v) in changes {
            env.insert((*k).to_owned(), (*v).to_owned());
        }
        let cfg = Config::load_with(
            &LoadOptions {
                config_path: Some(self.cfg_file.clone()),
                overrides: vec![],
            },
            &env,
        )
        .unwrap();
        self.reloads.send(cfg).await.unwrap();
    }

    pub async fn wait_for<F, Fut>(&self, mut f: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        for _ in 0..400 {
            if f().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("condition not reached in time");
    }

    /// Polls `f` until it holds; `guard` only keeps a broken run from hanging (conditions that
    /// wait out reconnect backoff need more than [`Service::wait_for`]'s guard).
    pub async fn wait_for_within<F, Fut>(&self, guard: Duration, mut f: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + guard;
        while tokio::time::Instant::now() < deadline {
            if f().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("condition not reached within {guard:?}");
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let r = self
            .client
            .get(format!("http://{}{path}", self.admin))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// GET on the public listener (health, readiness), with [`ADMIN`] so `/readyz` shows
    /// its detail.
    pub async fn public_get(&self, path: &str) -> (u16, String) {
        let r = self
            .client
            .get(format!("http://{}{path}", self.http))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .client
            .post(format!("http://{}{path}", self.admin))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    pub async fn scrape(&self) -> String {
        self.client
            .get(format!("http://{}/metrics", self.metrics))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Sends the shutdown signal without waiting; [`Service::stop_keep_dir`] then waits.
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    pub async fn stop(self) {
        drop(self.stop_keep_dir().await);
    }

    /// Stops the service and hands back its data directory (for a restart).
    pub async fn stop_keep_dir(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(25), &mut self.task)
            .await
            .expect("service stops within the grace period")
            .unwrap();
        // `run` closes the store before it returns: it can be opened at once.
        self._dir
    }
}

/// A loopback port nobody listens on right now (for a process that must be told its
/// address before it binds).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sum of every series of `name` (optionally only those whose labels contain `filter`).
pub fn metric(text: &str, name: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let base = series.split('{').next()?;
            (base == name && series.contains(filter))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

pub fn find_string<'a>(v: &'a Value, pred: &dyn Fn(&str) -> bool) -> Option<&'a str> {
    match v {
        Value::String(s) if pred(s) => Some(s),
        Value::Object(m) => m.values().find_map(|x| find_string(x, pred)),
        Value::Array(a) => a.iter().find_map(|x| find_string(x, pred)),
        _ => None,
    }
}

pub fn find_callback_value(v: &Value) -> Option<Value> {
    match v {
        Value::Object(m) => {
            if m.get("type").and_then(Value::as_str) == Some("callback") {
                return m.get("value").cloned();
            }
            m.values().find_map(find_callback_value)
        }
        Value::Array(a) => a.iter().find_map(find_callback_value),
        _ => None,
    }
}

/// Opens the store a stopped service left in `dir` (the helper's key and file name). The
/// service closed it before `run` returned, so it opens at once: no waiting for a lock.
pub fn open_store(dir: &std::path::Path) -> lark_service::storage::Store {
    use lark_service::storage::{Key, Keyring, Store, StoreOptions};
    let key = Key::from_hex(&secrecy::SecretString::from(KEY.to_owned())).unwrap();
    Store::open(
        &dir.join("s.redb"),
        Keyring::new(key, vec![]),
        StoreOptions::default(),
    )
    .unwrap()
}
