//! Fleet benchmark: one, two and three instances of the real release binary serving one app
//! from one PostgreSQL, beside one instance on the embedded redb store.
//!
//! Each row starts a fresh sandbox in this process (HTTPS and WSS with its own CA, which the
//! instances trust through `TLS_CA_FILE`, as in production), for the PostgreSQL rows a fresh
//! throw-away PostgreSQL server (Debian's binaries, `tests/common/pg.rs`), then the instances
//! (`serve`, configured from the environment, their long connections up), and measures:
//!
//! - **authorizations/s**: N authorizations, at most [`CONCURRENCY`] at once, each the whole
//!   flow a user goes through: a request on the admin API of instance `k mod n`, the Authorize
//!   card the sandbox received, the approval on the sandbox's consent page, the OAuth redirect
//!   landing on instance `k+1 mod n` (round-robin, as a load balancer in front of the fleet
//!   would spread it; with two or more instances never the one that asked), and the token read
//!   from instance `k+2 mod n`, which must be live and the user's own (the sandbox says whose
//!   token it issued). An authorization that fails at any step, or does not complete within
//!   30 s, is counted and named.
//! - **ACK throughput and latency**: the sandbox pushes prepared events of about 1 KiB (every
//!   10th in 2 fragments), keeping at most [`WINDOW`] unacknowledged, as `benches/longconn.rs`
//!   does; in cluster mode the sandbox gives each event to one random connection of the app, so
//!   the events spread over the instances' long connections. Durable de-duplication is on (the
//!   default): redb's table, or PostgreSQL's `ls_seen_events` shared by the fleet. Every event
//!   must be acknowledged with code 200.
//! - **CPU seconds** (user + system, `/proc/PID/stat`) of the instances and of PostgreSQL (the
//!   postmaster and its backends) over each phase, and where the machine's CPU went.
//!
//! `cargo bench --bench fleet`; `FLEET_BENCH_AUTHS` (default 300), `FLEET_BENCH_EVENTS`
//! (default 10 000), `FLEET_BENCH_WARMUP` (default 500 events). Without PostgreSQL's server
//! binaries (`apt-get install postgresql`) the PostgreSQL rows say "not run". A row that cannot
//! start says so and the others still run. Times are printed, never asserted; the bench exits
//! with status 1 when an authorization did not complete, an event was not acknowledged with
//! code 200, or a row failed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark stops on the first error

#[allow(dead_code)]
#[path = "common/host.rs"]
mod host;
#[allow(dead_code)]
#[path = "../tests/common/pg.rs"]
mod pg;
#[path = "common/push.rs"]
mod push;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use host::{cpu_time, env_or, free_port, loadavg, machine_busy, ms, pct, stat_fields, tail};
use lark_service::sandbox::{Sandbox, SandboxOptions, APP_ID, APP_SECRET};
use push::{push_all, FRAGMENT_EVERY, WINDOW};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_lark-service");
const ADMIN: &str = "fleet-bench-admin-token-0123456789abcdef";
const KEY: &str = "f1ee7f1ef1ee7f1ef1ee7f1ef1ee7f1ef1ee7f1ef1ee7f1ef1ee7f1ef1ee7f1e";
/// Authorizations in flight at once.
const CONCURRENCY: usize = 32;
/// Hang guards, not measurements.
const START_TIMEOUT: Duration = Duration::from_secs(60);
const AUTH_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Redb,
    Postgres,
}

/// What the authorization phase measured.
struct Auths {
    ok: usize,
    failures: Vec<String>,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    service_cpu: Duration,
    pg_cpu: Option<Duration>,
}

/// What the ACK phase measured.
struct Acks {
    events: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    service_cpu: Duration,
    /// Per instance, in start order.
    per_instance_cpu: Vec<Duration>,
    pg_cpu: Option<Duration>,
    /// This process: the sandbox and the pushing thread.
    bench_cpu: Duration,
    machine_cpu: Duration,
}

impl Acks {
    fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
}

struct Done {
    auths: Auths,
    acks: Result<Acks, String>,
}

enum Outcome {
    NotRun(String),
    Failed(String),
    Done(Box<Done>),
}

struct Row {
    name: String,
    backend: Backend,
    outcome: Outcome,
}

fn main() {
    let auths = env_or("FLEET_BENCH_AUTHS", 300).max(1);
    let events = env_or("FLEET_BENCH_EVENTS", 10_000).max(1);
    let warmup = env_or("FLEET_BENCH_WARMUP", 500);
    let load_start = loadavg();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pg_missing = postgres_missing();

    let specs = [
        (Backend::Redb, 1),
        (Backend::Postgres, 1),
        (Backend::Postgres, 2),
        (Backend::Postgres, 3),
    ];
    let mut rows = Vec::new();
    for (backend, n) in specs {
        let name = format!(
            "{}, {n} instance{}",
            match backend {
                Backend::Redb => "redb",
                Backend::Postgres => "postgres",
            },
            if n == 1 { "" } else { "s" }
        );
        let outcome = match (&pg_missing, backend) {
            (Some(why), Backend::Postgres) => Outcome::NotRun(why.clone()),
            _ => {
                eprintln!("fleet: {name} ...");
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_row(&rt, backend, n, auths, events, warmup)
                }));
                match run {
                    Ok(Ok(done)) => Outcome::Done(Box::new(done)),
                    Ok(Err(why)) => Outcome::Failed(why),
                    Err(panic) => Outcome::Failed(
                        panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                            .unwrap_or_else(|| "panicked".into()),
                    ),
                }
            }
        };
        if let Outcome::Failed(why) = &outcome {
            eprintln!("fleet: {name} FAILED: {why}");
        }
        rows.push(Row {
            name,
            backend,
            outcome,
        });
    }
    let failed = print_report(&rows, auths, events, warmup, &load_start);
    if failed {
        std::process::exit(1);
    }
}

/// Prints the table and the notes; returns whether anything was wrong (a failed row, an
/// authorization that did not complete, an event not acknowledged).
fn print_report(rows: &[Row], auths: usize, events: usize, warmup: usize, load: &str) -> bool {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    println!(
        "\n{auths} authorizations per row (at most {CONCURRENCY} at once; request on instance k, \
         OAuth redirect landing on instance k+1, token read on instance k+2, round-robin), then \
         {events} events after {warmup} warm-up events (about 1 KiB each, every \
         {FRAGMENT_EVERY}th in 2 fragments, at most {WINDOW} unacknowledged, each given to one \
         random connection of the app; durable de-duplication on). A fresh sandbox (HTTPS/WSS, \
         in the bench process), a fresh store and, for PostgreSQL, a fresh server per row; \
         everything on the same {cores} cores. CPU s = user + system seconds over the \
         authorizations / over the events. Load average at start: {load}; at the end: {}.\n",
        loadavg()
    );
    println!(
        "| backend, instances | authorizations/s | auth p50 / p99 | auth failures | ACK events/s \
         | ACK p50 | ACK p99 | service CPU s | PostgreSQL CPU s | note |\n\
         |---|---|---|---|---|---|---|---|---|---|"
    );
    let redb_acks = rows.iter().find_map(|r| match (&r.outcome, r.backend) {
        (Outcome::Done(d), Backend::Redb) => d.acks.as_ref().ok(),
        _ => None,
    });
    let mut wrong = false;
    for (i, row) in rows.iter().enumerate() {
        let name = &row.name;
        let d = match &row.outcome {
            Outcome::NotRun(why) => {
                println!("| {name} | not run: {why} | | | | | | | | |");
                continue;
            }
            Outcome::Failed(why) => {
                wrong = true;
                println!(
                    "| {name} | **failed**: {} | | | | | | | | |",
                    why.replace('|', "/").replace('\n', " ")
                );
                continue;
            }
            Outcome::Done(d) => d,
        };
        let a = &d.auths;
        if !a.failures.is_empty() {
            wrong = true;
        }
        let auth_rate = a.ok as f64 / a.elapsed.as_secs_f64();
        let pg_cpu = |c: Option<Duration>| c.map_or("–".to_owned(), secs);
        let mut note = Vec::new();
        match &d.acks {
            Ok(k) => {
                if i == 1 {
                    if let Some(r) = redb_acks {
                        note.push(format!(
                            "ACK vs redb, 1 instance: events/s {:.2}×, p99 {:.2}×",
                            k.rate() / r.rate(),
                            k.p99.as_secs_f64() / r.p99.as_secs_f64().max(1e-9)
                        ));
                    }
                }
                if k.per_instance_cpu.len() > 1 {
                    note.push(format!(
                        "ACK CPU s by instance {}",
                        k.per_instance_cpu
                            .iter()
                            .map(|c| secs(*c))
                            .collect::<Vec<_>>()
                            .join(" / ")
                    ));
                }
                println!(
                    "| {name} | {auth_rate:.0} | {} / {} | {} of {} | {:.0} | {} | {} | {} / {} | {} / {} | {} |",
                    ms(a.p50),
                    ms(a.p99),
                    a.failures.len(),
                    a.ok + a.failures.len(),
                    k.rate(),
                    ms(k.p50),
                    ms(k.p99),
                    secs(a.service_cpu),
                    secs(k.service_cpu),
                    pg_cpu(a.pg_cpu),
                    pg_cpu(k.pg_cpu),
                    note.join("; ")
                );
            }
            Err(why) => {
                wrong = true;
                println!(
                    "| {name} | {auth_rate:.0} | {} / {} | {} of {} | **failed**: {} | | | {} / – | {} / – | |",
                    ms(a.p50),
                    ms(a.p99),
                    a.failures.len(),
                    a.ok + a.failures.len(),
                    why.replace('|', "/"),
                    secs(a.service_cpu),
                    pg_cpu(a.pg_cpu),
                );
            }
        }
    }
    println!();
    for row in rows {
        let Outcome::Done(d) = &row.outcome else {
            continue;
        };
        for f in d.auths.failures.iter().take(10) {
            println!("- {}: authorization failed: {f}", row.name);
        }
        if d.auths.failures.len() > 10 {
            println!(
                "- {}: … and {} more failed authorizations",
                row.name,
                d.auths.failures.len() - 10
            );
        }
        if let Ok(k) = &d.acks {
            let busy = |c: Duration| c.as_secs_f64() / k.elapsed.as_secs_f64();
            let pg = k.pg_cpu.unwrap_or_default();
            println!(
                "- {} during the events: cores busy on average (of {cores}): instances {:.2}, \
                 PostgreSQL {}, sandbox and pushing thread {:.2}, other processes {:.2}; the \
                 whole machine {:.2}",
                row.name,
                busy(k.service_cpu),
                k.pg_cpu
                    .map_or("–".to_owned(), |c| format!("{:.2}", busy(c))),
                busy(k.bench_cpu),
                busy(
                    k.machine_cpu
                        .saturating_sub(k.service_cpu + pg + k.bench_cpu)
                ),
                busy(k.machine_cpu),
            );
        }
    }
    println!(
        "\nWhat limits these numbers here: the instances, PostgreSQL and the sandbox (which also \
         plays every user's browser and the platform) share the {cores} cores, so a second or \
         third instance adds connections and processes but no CPU; the lines above say how busy \
         the machine was in each row. On a fleet each instance has its own cores and PostgreSQL \
         its own machine."
    );
    wrong
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

/// Why the PostgreSQL rows cannot run here, if they cannot: the server binaries
/// `tests/common/pg.rs` starts are missing.
fn postgres_missing() -> Option<String> {
    pg::server_bin()
        .is_none()
        .then(|| "PostgreSQL not installed (`apt-get install postgresql`)".to_owned())
}

/// One instance of the release binary.
struct Instance {
    child: Child,
    http_port: u16,
    admin: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Instance {
    /// Starts an instance and waits for its "ready" line.
    fn start(
        sandbox: &Sandbox,
        store: &Store,
        http_port: u16,
        redirect: &str,
    ) -> Result<Self, String> {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("sandbox-ca.pem");
        std::fs::write(&ca, sandbox.ca_pem().expect("the sandbox serves TLS")).unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(&config, "").unwrap();
        let log = dir.path().join("stderr.log");
        let admin_port = free_port();
        let mut cmd = Command::new(BIN);
        cmd.current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("APP_ID", APP_ID)
            .env("APP_SECRET", APP_SECRET)
            .env("LARK_DOMAIN", sandbox.base_url())
            .env("TLS_CA_FILE", &ca)
            .env("LARK_TOKEN_ENCRYPTION_KEY", KEY)
            .env("LARK_SERVICE_ADMIN_TOKEN", ADMIN)
            .env("HTTP_LISTEN", format!("127.0.0.1:{http_port}"))
            .env("ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
            .env("AUTH_REDIRECT_URI", redirect)
            // Each user is asked once; the limit is not what is measured.
            .env("AUTH_REQUEST_RATE_LIMIT", "100000")
            .env("LOG_LEVEL", "warn");
        match store {
            Store::Redb => {
                cmd.env("STORAGE_PATH", dir.path().join("s.redb"));
            }
            Store::Postgres(url) => {
                cmd.env("STORAGE_BACKEND", "postgres")
                    .env("STORAGE_POSTGRES_URL", url)
                    .env("WEBHOOKS_EXPIRY_REMINDER_LEAD_SECONDS", "0")
                    .env("STORAGE_PATH", dir.path().join("must-not-exist.redb"));
            }
        }
        let mut child = cmd
            .arg("--config")
            .arg(&config)
            .args(["serve", "--set", "metrics.port=0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .map_err(|e| format!("cannot start {BIN}: {e}"))?;
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next().and_then(Result::ok).unwrap_or_default());
            // Keep draining so that the instance never blocks on a full pipe.
            for _ in lines {}
        });
        let mut instance = Self {
            child,
            http_port,
            admin: format!("http://127.0.0.1:{admin_port}"),
            log,
            _dir: dir,
        };
        let ready = rx.recv_timeout(START_TIMEOUT).unwrap_or_default();
        if !ready.starts_with(&format!(
            "lark-service ready: http://127.0.0.1:{http_port}/"
        )) {
            instance.kill();
            return Err(format!(
                "an instance did not start ({ready:?}); its log ends: {}",
                tail(&instance.log, 5, " ⏎ ")
            ));
        }
        Ok(instance)
    }

    fn exited(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Err(format!(
                "an instance exited ({st}); its log ends: {}",
                tail(&self.log, 5, " ⏎ ")
            )),
            Ok(None) => Ok(()),
            Err(e) => Err(format!("cannot wait for an instance: {e}")),
        }
    }

    fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL if it has not exited within 10 s.
    fn stop(mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .arg(self.child.id().to_string())
                .status();
            let t = Instant::now();
            while matches!(self.child.try_wait(), Ok(None)) && t.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }
}

impl Drop for Instance {
    /// A row that fails leaves no instance behind.
    fn drop(&mut self) {
        self.kill();
    }
}

enum Store {
    Redb,
    Postgres(String),
}

fn run_row(
    rt: &tokio::runtime::Runtime,
    backend: Backend,
    n: usize,
    auths: usize,
    events: usize,
    warmup: usize,
) -> Result<Done, String> {
    // Warm-up authorizations (untimed): each instance serves a request, a redirect and a token
    // read before the clock starts.
    let warm_auths = 2 * n;
    let sandbox = rt
        .block_on(Sandbox::start(SandboxOptions {
            // Redelivery would blur the latencies; an instance that does not ACK fails instead.
            redeliver_after: Duration::from_secs(600),
            extra_users: auths + warm_auths,
            ..SandboxOptions::default()
        }))
        .map_err(|e| format!("sandbox: {e}"))?;
    if sandbox.ca_pem().is_none() {
        return Err("the sandbox does not serve TLS".into());
    }
    let server = match backend {
        Backend::Redb => None,
        Backend::Postgres => Some(pg::Pg::start()),
    };
    let store = server
        .as_ref()
        .map_or(Store::Redb, |pg| Store::Postgres(pg.url("postgres")));
    let postmaster = server.as_ref().and_then(|pg| postmaster_pid(&pg.data));

    // One public redirect URI for the fleet (what a load balancer in front of it would be):
    // the first instance's; the bench lands each redirect on the instance of its turn.
    let mut redirect = String::new();
    let mut instances = Vec::with_capacity(n);
    // One after the other: the first creates the schema. Each port is picked just before its
    // instance starts, and picked again if it was taken meanwhile (a free port is free only
    // until some process's outgoing connection gets it as its own local port).
    for k in 0..n {
        let mut tries = 1;
        loop {
            let port = free_port();
            if k == 0 {
                redirect = format!("http://127.0.0.1:{port}/oauth/callback");
            }
            match Instance::start(&sandbox, &store, port, &redirect) {
                Ok(i) => {
                    instances.push(i);
                    break;
                }
                Err(e) if tries < 3 && e.contains("Address already in use") => tries += 1,
                Err(e) => return Err(e),
            }
        }
    }
    let t = Instant::now();
    while sandbox.connections() < n {
        for i in &mut instances {
            i.exited()?;
        }
        if t.elapsed() > START_TIMEOUT {
            return Err(format!(
                "{} of {n} long connections up after {} s",
                sandbox.connections(),
                START_TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    let pids: Vec<u32> = instances.iter().map(|i| i.child.id()).collect();
    let targets: Vec<(String, u16)> = instances
        .iter()
        .map(|i| (i.admin.clone(), i.http_port))
        .collect();

    // Authorizations.
    let warm = rt.block_on(authorize_all(&sandbox, &targets, auths, warm_auths));
    if let Some(f) = warm.1.first() {
        return Err(format!("warm-up authorization failed: {f}"));
    }
    let cpu_before = cpu_of(&pids);
    let pg_before = postmaster.map(pg_cpu);
    let started = Instant::now();
    let (mut lat, failures) = rt.block_on(authorize_all(&sandbox, &targets, 0, auths));
    let elapsed = started.elapsed();
    let service_cpu = sum(&cpu_of(&pids)).saturating_sub(sum(&cpu_before));
    let pg_cpu_auth = postmaster
        .zip(pg_before)
        .map(|(p, b)| pg_cpu(p).saturating_sub(b));
    lat.sort();
    let auth = Auths {
        ok: lat.len(),
        failures,
        elapsed,
        p50: pct(&lat, 0.50),
        p99: pct(&lat, 0.99),
        service_cpu,
        pg_cpu: pg_cpu_auth,
    };

    // Events over the instances' long connections.
    let acks = measure_acks(&sandbox, &mut instances, &pids, postmaster, events, warmup);

    for i in instances {
        i.stop();
    }
    drop(server);
    drop(sandbox);
    Ok(Done { auths: auth, acks })
}

fn sum(v: &[Duration]) -> Duration {
    v.iter().sum()
}

fn cpu_of(pids: &[u32]) -> Vec<Duration> {
    pids.iter().map(|&p| cpu_time(p, false)).collect()
}

/// Runs authorizations `first..first + count` (user `ou_sandbox_user{k}`), at most
/// [`CONCURRENCY`] at once. Returns the latencies of those that completed and why the others
/// failed.
async fn authorize_all(
    sandbox: &Sandbox,
    targets: &[(String, u16)],
    first: usize,
    count: usize,
) -> (Vec<Duration>, Vec<String>) {
    let http = reqwest::Client::builder()
        .timeout(AUTH_TIMEOUT)
        .build()
        .unwrap();
    let mut lat = Vec::with_capacity(count);
    let mut failures = Vec::new();
    let mut running = futures_util::stream::FuturesUnordered::new();
    let mut next = first;
    let end = first + count;
    loop {
        use futures_util::StreamExt as _;
        while next < end && running.len() < CONCURRENCY {
            let k = next;
            next += 1;
            let http = http.clone();
            running.push(async move {
                let t = Instant::now();
                let r = tokio::time::timeout(AUTH_TIMEOUT, authorize(sandbox, &http, targets, k))
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!("not complete within {} s", AUTH_TIMEOUT.as_secs()))
                    });
                (k, r.map(|()| t.elapsed()))
            });
        }
        match running.next().await {
            Some((_, Ok(d))) => lat.push(d),
            Some((k, Err(why))) => failures.push(format!("ou_sandbox_user{k:04}: {why}")),
            None => break,
        }
    }
    (lat, failures)
}

/// One authorization, as a user goes through it: requested on instance `k`, the card found,
/// approved, the redirect landing on instance `k+1`, the token read from instance `k+2`.
async fn authorize(
    sandbox: &Sandbox,
    http: &reqwest::Client,
    targets: &[(String, u16)],
    k: usize,
) -> Result<(), String> {
    let n = targets.len();
    let user = format!("ou_sandbox_user{k:04}");
    let (ask, land, read) = (
        &targets[k % n],
        &targets[(k + 1) % n],
        &targets[(k + 2) % n],
    );
    let r = http
        .post(format!("{}/api/v1/auth/requests", ask.0))
        .bearer_auth(ADMIN)
        .json(&json!({ "open_id": user }))
        .send()
        .await
        .map_err(|e| format!("request: {e}"))?;
    if r.status().as_u16() != 201 {
        return Err(format!(
            "request answered {}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        ));
    }
    let cards = sandbox.messages_for(&user);
    let authorize = cards
        .iter()
        .rev()
        .find_map(|m| find_authorize_url(&m.content))
        .ok_or_else(|| format!("no Authorize card among {} messages", cards.len()))?;
    let redirect = sandbox
        .approve(&authorize, &user)
        .map_err(|e| format!("approve: {e}"))?;
    let from = format!(":{}/", targets[0].1);
    let landed = redirect.replacen(&from, &format!(":{}/", land.1), 1);
    if !redirect.contains(&from) {
        return Err(format!("the redirect is not the fleet's: {redirect}"));
    }
    let r = http
        .get(&landed)
        .send()
        .await
        .map_err(|e| format!("redirect: {e}"))?;
    if r.status().as_u16() != 200 {
        return Err(format!(
            "redirect answered {}: {}",
            r.status(),
            r.text().await.unwrap_or_default()
        ));
    }
    let r = http
        .get(format!("{}/api/v1/users/{user}/token", read.0))
        .bearer_auth(ADMIN)
        .send()
        .await
        .map_err(|e| format!("token: {e}"))?;
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    if status != 200 {
        return Err(format!("token answered {status}: {body}"));
    }
    let token = body["access_token"].as_str().unwrap_or_default();
    match sandbox.token_owner(token) {
        Some(owner) if owner == user => Ok(()),
        other => Err(format!("the token served is {other:?}'s, not the user's")),
    }
}

/// The authorize URL in a card (the button's link).
fn find_authorize_url(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if s.contains("/open-apis/authen/v1/authorize?") => Some(s.clone()),
        Value::String(s) => serde_json::from_str::<Value>(s)
            .ok()
            .filter(|inner| inner.is_object() || inner.is_array())
            .and_then(|inner| find_authorize_url(&inner)),
        Value::Array(a) => a.iter().find_map(find_authorize_url),
        Value::Object(o) => o.values().find_map(find_authorize_url),
        _ => None,
    }
}

/// Every instance still runs (else which one exited, with the end of its log).
fn all_running(instances: &mut [Instance]) -> Result<(), String> {
    instances.iter_mut().try_for_each(Instance::exited)
}

fn measure_acks(
    sandbox: &Sandbox,
    instances: &mut [Instance],
    pids: &[u32],
    postmaster: Option<u32>,
    n: usize,
    warmup: usize,
) -> Result<Acks, String> {
    push_all(sandbox, warmup, 0, || all_running(instances)).map_err(|e| format!("warm-up: {e}"))?;
    let acks_before = sandbox.acks().len();
    let cpu_before = cpu_of(pids);
    let pg_before = postmaster.map(pg_cpu);
    let bench_before = cpu_time(std::process::id(), false);
    let machine_before = machine_busy();
    let started = Instant::now();
    let ids = push_all(sandbox, n, warmup, || all_running(instances))?;
    let elapsed = started.elapsed();
    let per_instance_cpu: Vec<Duration> = cpu_of(pids)
        .iter()
        .zip(&cpu_before)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    let pg_cpu = postmaster
        .zip(pg_before)
        .map(|(p, b)| pg_cpu(p).saturating_sub(b));
    let bench_cpu = cpu_time(std::process::id(), false).saturating_sub(bench_before);
    let machine_cpu = machine_busy().saturating_sub(machine_before);

    let acks = sandbox.acks();
    let mut seen = HashSet::new();
    let mut lat = Vec::with_capacity(n);
    let mut bad = 0;
    for a in &acks[acks_before..] {
        if !ids.contains(&a.message_id) {
            continue;
        }
        if a.code != 200 {
            bad += 1;
        } else if let Some(d) = a.since_push {
            if seen.insert(a.message_id.as_str()) {
                lat.push(d);
            }
        }
    }
    if bad > 0 || lat.len() != n {
        return Err(format!(
            "{} of {n} events acknowledged with code 200 ({bad} ACKs with another code)",
            lat.len()
        ));
    }
    lat.sort();
    Ok(Acks {
        events: n,
        elapsed,
        p50: pct(&lat, 0.50),
        p99: pct(&lat, 0.99),
        service_cpu: sum(&per_instance_cpu),
        per_instance_cpu,
        pg_cpu,
        bench_cpu,
        machine_cpu,
    })
}

/// The postmaster's pid, the first line of `postmaster.pid` in the data directory.
fn postmaster_pid(data: &Path) -> Option<u32> {
    std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// CPU time of PostgreSQL: the postmaster, its live children (the backends, one per pooled
/// connection, and the background processes), and the children it has reaped.
fn pg_cpu(postmaster: u32) -> Duration {
    let mut total = cpu_time(postmaster, true);
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if stat_fields(pid).get(1).and_then(|p| p.parse::<u32>().ok()) == Some(postmaster) {
            total += cpu_time(pid, false);
        }
    }
    total
}
