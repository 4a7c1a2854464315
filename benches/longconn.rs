//! Long-connection benchmark: lark-service against the official Python and Node SDK clients.
//!
//! One sandbox in this process serves five clients in turn, each a separate OS process on the
//! same machine: the ceiling — a minimal client that only decodes frames, reassembles
//! fragments and ACKs (no store, no de-duplication, no handler; this bench executable started
//! again with `LONGCONN_BENCH_RAW_CLIENT`, built from the service's own codec) —, lark-service
//! (this build's release binary, `serve`, configured from the environment, a temporary store,
//! its durable de-duplication on), lark-service again with PostgreSQL as its store (one
//! instance; a throw-away server started by this bench, a new database each round), the
//! official Python client (`lark_oapi.ws.Client`, `bench/sdk/python_client.py`) and the
//! official Node client (`WSClient`, `bench/sdk/node/client.js`), the SDKs with a no-op
//! handler. For each, the sandbox pushes a warm-up, then N events of about 1 KiB (every 10th in
//! 2 fragments) keeping at most 64 unacknowledged, and records when each ACK arrives. This
//! repeats for a few rounds, each client in turn and in a fresh process, so that load coming
//! and going on the machine falls on all of them alike. Printed, as medians over the rounds:
//! events/s, ACK latency p50/p99 as the sandbox sees it (push to ACK), the client's CPU time
//! over the N events; its peak RSS (VmHWM); where the machine's CPU went in each round
//! (PostgreSQL's server under "other processes"); the ratios.
//!
//! `cargo bench --bench longconn`; `bench/sdk/setup.sh` prints the two variables it needs for
//! the SDK rows:
//! - `LONGCONN_BENCH_PYTHON`: a python with lark-oapi installed (the venv setup.sh makes);
//! - `LONGCONN_BENCH_NODE_DIR`: a directory with `node_modules/@larksuiteoapi/node-sdk`
//!   (`bench/sdk/node` after `npm ci`); `node` comes from `PATH`;
//! - `LONGCONN_BENCH_SERVICE_BIN`: run this lark-service binary instead of this build's (to
//!   compare two builds);
//! - `LONGCONN_BENCH_ONLY`: run only the clients whose row name contains this text (`raw`,
//!   `lark-service`, `PostgreSQL`…);
//! - `LONGCONN_BENCH_EVENTS` (default 20 000), `LONGCONN_BENCH_WARMUP` (default 500),
//!   `LONGCONN_BENCH_ROUNDS` (default 5: on 2 shared cores one round of any client can run
//!   20–30 % off its neighbours, and the median of five moves less than that of three).
//!
//! A client whose variable is not set gets a "not run" row, as does the PostgreSQL row without
//! PostgreSQL's server binaries (`apt-get install postgresql`). A client that does not connect,
//! exits, ACKs with a code other than 200 or stops ACKing is reported with the tail of its
//! output, the other clients still run, and the bench exits with status 1 at the end.

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
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use host::{cpu_time, env_or, free_port, loadavg, machine_busy, ms, status_kb, tail};
use lark_service::sandbox::{Sandbox, SandboxOptions, APP_ID, APP_SECRET};
use push::{push_all, EVENT_TYPE, FRAGMENT_EVERY, WINDOW};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_lark-service");
/// A hang guard, not a measurement: a client that takes longer than this to connect has failed
/// (and one that acknowledges nothing for `push::STALL_TIMEOUT`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// What one client run measured over the N events after the warm-up.
struct Measured {
    events: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    cpu: Duration,
    peak_rss_kb: u64,
    /// CPU time of this process (the sandbox and the pushing thread) over the N events.
    bench_cpu: Duration,
    /// CPU time of the whole machine (all cores) over the N events.
    machine_cpu: Duration,
}

/// A client that cannot be run, or failed.
enum Skip {
    NotRun(String),
    Failed(String),
}

/// A client: how to start it for a round, or why it cannot be run.
struct ClientSpec {
    name: String,
    launch: Result<Box<dyn Fn(usize) -> Command>, Skip>,
}

/// The median over the rounds of each number (the maximum for peak RSS).
struct Summary {
    rate: f64,
    p50: Duration,
    p99: Duration,
    cpu: Duration,
    peak_rss_kb: u64,
}

fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

impl Summary {
    fn of(runs: &[Measured]) -> Self {
        Self {
            rate: median(runs.iter().map(Measured::rate).collect()),
            p50: median(runs.iter().map(|m| m.p50).collect()),
            p99: median(runs.iter().map(|m| m.p99).collect()),
            cpu: median(runs.iter().map(|m| m.cpu).collect()),
            peak_rss_kb: runs.iter().map(|m| m.peak_rss_kb).max().unwrap_or(0),
        }
    }
}

impl Measured {
    fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
}

fn main() {
    if let Ok(base) = std::env::var("LONGCONN_BENCH_RAW_CLIENT") {
        raw_client(&base);
        return;
    }
    let n = env_or("LONGCONN_BENCH_EVENTS", 20_000).max(1);
    let warmup = env_or("LONGCONN_BENCH_WARMUP", 500);
    let rounds = env_or("LONGCONN_BENCH_ROUNDS", 5).max(1);
    let load = loadavg();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sandbox = rt
        .block_on(Sandbox::start(SandboxOptions {
            // Redelivery would blur the latencies; a client that does not ACK fails instead.
            redeliver_after: Duration::from_secs(600),
            // Plain ws://: the official SDK clients run here with their default trust, and the
            // comparison is of the frame path. (TLS costs every client the same per byte.)
            tls: false,
            ..SandboxOptions::default()
        }))
        .unwrap();
    let base = sandbox.base_url();
    let work = tempfile::tempdir().unwrap();

    let only = std::env::var("LONGCONN_BENCH_ONLY").ok();
    let mut clients = [
        raw_ceiling_client(&base),
        lark_service_client(&base, work.path()),
        lark_service_pg_client(&base, work.path(), only.as_deref()),
        python_client(&base),
        node_client(&base),
    ];
    if let Some(only) = &only {
        for spec in &mut clients {
            if spec.launch.is_ok() && !spec.name.contains(only.as_str()) {
                spec.launch = Err(Skip::NotRun(format!("LONGCONN_BENCH_ONLY={only}")));
            }
        }
    }
    let mut runs: Vec<Vec<Measured>> = clients.iter().map(|_| Vec::new()).collect();
    // Rounds, each client in turn within a round, so that load that comes and goes on the
    // machine falls on every client alike.
    for round in 0..rounds {
        for (i, spec) in clients.iter_mut().enumerate() {
            let Ok(launch) = &spec.launch else { continue };
            eprintln!("longconn: round {}/{rounds}: {} ...", round + 1, spec.name);
            let log = work.path().join(format!("client-{i}-{round}.log"));
            match run_client(&sandbox, launch(round), &log, n, warmup) {
                Ok(m) => runs[i].push(m),
                Err(why) => {
                    let tail = tail(&log, 20, "\n");
                    eprintln!(
                        "longconn: {} FAILED: {why}\n--- its output (last 20 lines) ---\n{tail}\n---",
                        spec.name
                    );
                    spec.launch = Err(Skip::Failed(why));
                }
            }
        }
    }
    drop(sandbox);

    println!(
        "\n{n} events per client and round after {warmup} warm-up events, {rounds} rounds (each \
         client in turn, a fresh process each round); each event about 1 KiB of JSON, every \
         {FRAGMENT_EVERY}th in 2 fragments; at most {WINDOW} unacknowledged. One sandbox (in the \
         bench process) serves the clients, each a separate process on the same cores. Medians \
         over the rounds: events/s, ACK latency from push to ACK as the sandbox sees it, the \
         client's user+system CPU time over the {n} events; peak RSS is the highest VmHWM. Load \
         average at start: {load}.\n"
    );
    println!(
        "| client | events/s | ACK p50 | ACK p99 | CPU s | peak RSS |\n|---|---|---|---|---|---|"
    );
    let mut summaries: Vec<Option<Summary>> = Vec::new();
    for (spec, r) in clients.iter().zip(&runs) {
        let name = &spec.name;
        summaries.push(None);
        match &spec.launch {
            Ok(_) => {
                let s = Summary::of(r);
                println!(
                    "| {name} | {:.0} | {} | {} | {:.2} | {:.1} MB |",
                    s.rate,
                    ms(s.p50),
                    ms(s.p99),
                    s.cpu.as_secs_f64(),
                    s.peak_rss_kb as f64 / 1000.0
                );
                *summaries.last_mut().unwrap() = Some(s);
            }
            Err(Skip::NotRun(why)) => println!("| {name} | not run: {why} | | | | |"),
            Err(Skip::Failed(why)) => println!("| {name} | **failed**: {why} | | | | |"),
        }
    }
    println!();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    for (spec, r) in clients.iter().zip(&runs) {
        if r.is_empty() || spec.launch.is_err() {
            continue;
        }
        let by_round =
            |f: &dyn Fn(&Measured) -> String| r.iter().map(f).collect::<Vec<_>>().join(" / ");
        let cores_of =
            |m: &Measured, d: Duration| format!("{:.2}", d.as_secs_f64() / m.elapsed.as_secs_f64());
        println!(
            "- {} by round: events/s {}; CPU in cores busy on average (of {cores}): client {}, \
             sandbox and bench {}, other processes {}",
            spec.name,
            by_round(&|m| format!("{:.0}", m.rate())),
            by_round(&|m| cores_of(m, m.cpu)),
            by_round(&|m| cores_of(m, m.bench_cpu)),
            by_round(&|m| cores_of(m, m.machine_cpu.saturating_sub(m.cpu + m.bench_cpu))),
        );
    }
    // Every client against the ceiling (the raw decode-and-ACK client, row 1); the target for
    // lark-service is events/s >= 0.85x and ACK p99 <= 1.5x of it.
    for (spec, b) in clients.iter().zip(&summaries).skip(1) {
        match (&summaries[0], b) {
            (Some(raw), Some(b)) => println!(
                "- {} / ceiling: events/s = {:.2}×, ACK p99 = {:.2}× ({} vs {}), CPU = {:.2}×",
                spec.name,
                b.rate / raw.rate,
                b.p99.as_secs_f64() / raw.p99.as_secs_f64().max(1e-9),
                ms(b.p99),
                ms(raw.p99),
                b.cpu.as_secs_f64() / raw.cpu.as_secs_f64().max(1e-9),
            ),
            _ => println!(
                "- {} / ceiling: no ratio (a row above did not run)",
                spec.name
            ),
        }
    }
    for (short, b) in ["Python", "Node"].iter().zip(&summaries[3..]) {
        match (&summaries[1], b) {
            (Some(a), Some(b)) => println!(
                "- lark-service / {short} events/s = {:.1}×, p99 = {:.2}× ({} vs {}), CPU = {:.2}×, peak RSS = {:.2}×",
                a.rate / b.rate,
                a.p99.as_secs_f64() / b.p99.as_secs_f64().max(1e-9),
                ms(a.p99),
                ms(b.p99),
                a.cpu.as_secs_f64() / b.cpu.as_secs_f64().max(1e-9),
                a.peak_rss_kb as f64 / (b.peak_rss_kb as f64).max(1.0),
            ),
            _ => println!("- lark-service / {short}: no ratio (a row above did not run)"),
        }
    }
    if clients
        .iter()
        .any(|c| matches!(c.launch, Err(Skip::Failed(_))))
    {
        std::process::exit(1);
    }
}

/// The SDK clients' environment: the sandbox and its app, `PATH`, nothing else (no proxy
/// variables: both SDKs' HTTP clients would honour them).
fn sdk_command(program: impl AsRef<std::ffi::OsStr>, base: &str) -> Command {
    let mut c = Command::new(program);
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LARK_DOMAIN", base)
        .env("APP_ID", APP_ID)
        .env("APP_SECRET", APP_SECRET);
    c
}

/// This build's service, started as in production: `serve`, configuration from the
/// environment, a new store each round (durable de-duplication of event ids on).
/// The ceiling row: this executable again, as the raw client.
fn raw_ceiling_client(base: &str) -> ClientSpec {
    let base = base.to_owned();
    let launch = move |_round: usize| {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.env_clear().env("LONGCONN_BENCH_RAW_CLIENT", &base);
        c
    };
    ClientSpec {
        name: "raw decode-and-ACK client (ceiling)".into(),
        launch: Ok(Box::new(launch)),
    }
}

/// The raw client: discovery, then for each binary frame decode, reassemble and ACK at once —
/// what every client must do at the least, with the service's own codec and nothing else.
fn raw_client(base: &str) {
    use futures_util::{SinkExt as _, StreamExt as _};
    use lark_service::longconn::protocol::{build_ack, AckResponse, Frame, FrameKind};
    use lark_service::longconn::reassembly::{Pushed, Reassembler, ReassemblyLimits};
    use tokio_tungstenite::tungstenite::Message;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let discovery: serde_json::Value = reqwest::Client::new()
            .post(format!("{base}/callback/ws/endpoint"))
            .json(&json!({"AppID": APP_ID, "AppSecret": APP_SECRET}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let url = discovery["data"]["URL"].as_str().unwrap().to_owned();
        let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap();
        // Nagle off, as lark-service does: an ACK goes out when written.
        if let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = ws.get_mut() {
            tcp.set_nodelay(true).unwrap();
        }
        let mut reassembler = Reassembler::new(ReassemblyLimits::default());
        while let Some(msg) = ws.next().await {
            let bytes = match msg {
                Ok(Message::Binary(b)) => b,
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => continue,
            };
            let frame = Frame::decode_strict(&bytes).unwrap();
            if frame.kind() != FrameKind::Event {
                continue;
            }
            if let Pushed::Complete(_payload) = reassembler
                .push_frame(&frame, std::time::Instant::now())
                .unwrap()
            {
                let ack = build_ack(&frame, Duration::ZERO, &AckResponse::Ok);
                ws.send(Message::Binary(ack.to_bytes().into()))
                    .await
                    .unwrap();
            }
        }
    });
}

fn lark_service_client(base: &str, work: &Path) -> ClientSpec {
    let (base, work) = (base.to_owned(), work.to_owned());
    let launch = move |round: usize| {
        let dir = work.join(format!("lark-service-{round}"));
        let mut c = service_command(&base, &dir);
        c.env("STORAGE_PATH", dir.join("s.redb"));
        c
    };
    ClientSpec {
        name: "lark-service (this build, release)".into(),
        launch: Ok(Box::new(launch)),
    }
}

/// The service again, its durable de-duplication in PostgreSQL (the fleet's store: every
/// event id claimed in the database before its handler runs, through the claim batcher) rather
/// than redb: one throw-away server for the bench (Debian's binaries, `tests/common/pg.rs`;
/// started only when this row runs), a new database each round. PostgreSQL's CPU is counted
/// under "other processes".
fn lark_service_pg_client(base: &str, work: &Path, only: Option<&str>) -> ClientSpec {
    let name = "lark-service on PostgreSQL (this build, release; one instance)".to_owned();
    if let Some(o) = only.filter(|o| !name.contains(o)) {
        let why = Skip::NotRun(format!("LONGCONN_BENCH_ONLY={o}"));
        return ClientSpec {
            name,
            launch: Err(why),
        };
    }
    if pg::server_bin().is_none() {
        let why = Skip::NotRun("PostgreSQL not installed (`apt-get install postgresql`)".into());
        return ClientSpec {
            name,
            launch: Err(why),
        };
    }
    let server = pg::Pg::start();
    let (base, work) = (base.to_owned(), work.to_owned());
    let launch = move |round: usize| {
        let dir = work.join(format!("lark-service-pg-{round}"));
        let mut c = service_command(&base, &dir);
        c.env("STORAGE_BACKEND", "postgres")
            .env("STORAGE_POSTGRES_URL", server.fresh_db())
            // Never created: the store is PostgreSQL's.
            .env("STORAGE_PATH", dir.join("must-not-exist.redb"));
        c
    };
    ClientSpec {
        name,
        launch: Ok(Box::new(launch)),
    }
}

/// This build's service (or `LONGCONN_BENCH_SERVICE_BIN`, to compare two builds in one run),
/// started as in production: `serve` in `dir` (made here), configured from the environment;
/// the caller says where its store is.
fn service_command(base: &str, dir: &Path) -> Command {
    std::fs::create_dir_all(dir).unwrap();
    let bin = std::env::var_os("LONGCONN_BENCH_SERVICE_BIN").unwrap_or_else(|| BIN.into());
    let mut c = Command::new(bin);
    c.current_dir(dir)
        .env_clear()
        .env("APP_ID", APP_ID)
        .env("APP_SECRET", APP_SECRET)
        .env("LARK_DOMAIN", base)
        .env("LARK_TOKEN_ENCRYPTION_KEY", "42".repeat(32))
        .env("HTTP_LISTEN", format!("127.0.0.1:{}", free_port()))
        // A real app needs a redirect URI (no OAuth happens in this bench).
        .env("PUBLIC_URL", "https://lark-service.example")
        .env("ADMIN_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("PROMETHEUS_PORT", "0")
        .env("LOG_LEVEL", "warn")
        .arg("serve");
    c
}

fn python_client(base: &str) -> ClientSpec {
    let Some(python) = std::env::var_os("LONGCONN_BENCH_PYTHON") else {
        return ClientSpec {
            name: "Python lark-oapi".into(),
            launch: Err(Skip::NotRun(
                "set LONGCONN_BENCH_PYTHON (bench/sdk/setup.sh)".into(),
            )),
        };
    };
    let version = sdk_command(&python, base)
        .args([
            "-c",
            "from lark_oapi.core.const import VERSION; print(VERSION)",
        ])
        .output();
    let version = match version {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        Ok(o) => {
            return ClientSpec {
                name: "Python lark-oapi".into(),
                launch: Err(Skip::Failed(format!(
                    "LONGCONN_BENCH_PYTHON={} cannot import lark_oapi: {}",
                    python.to_string_lossy(),
                    String::from_utf8_lossy(&o.stderr).trim()
                ))),
            }
        }
        Err(e) => {
            return ClientSpec {
                name: "Python lark-oapi".into(),
                launch: Err(Skip::Failed(format!(
                    "LONGCONN_BENCH_PYTHON={}: {e}",
                    python.to_string_lossy()
                ))),
            }
        }
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/sdk/python_client.py");
    let base = base.to_owned();
    let launch = move |_round: usize| {
        let mut c = sdk_command(&python, &base);
        c.arg(&script).arg(EVENT_TYPE);
        c
    };
    ClientSpec {
        name: format!("Python lark-oapi {version}"),
        launch: Ok(Box::new(launch)),
    }
}

fn node_client(base: &str) -> ClientSpec {
    let Some(dir) = std::env::var_os("LONGCONN_BENCH_NODE_DIR").map(PathBuf::from) else {
        return ClientSpec {
            name: "Node @larksuiteoapi/node-sdk".into(),
            launch: Err(Skip::NotRun(
                "set LONGCONN_BENCH_NODE_DIR (bench/sdk/setup.sh)".into(),
            )),
        };
    };
    let modules = dir.join("node_modules");
    let manifest = modules.join("@larksuiteoapi/node-sdk/package.json");
    let version = std::fs::read(&manifest)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["version"].as_str().map(str::to_owned));
    let Some(version) = version else {
        return ClientSpec {
            name: "Node @larksuiteoapi/node-sdk".into(),
            launch: Err(Skip::Failed(format!(
                "no {} (run bench/sdk/setup.sh)",
                manifest.display()
            ))),
        };
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/sdk/node/client.js");
    let base = base.to_owned();
    let launch = move |_round: usize| {
        let mut c = sdk_command("node", &base);
        c.current_dir(&dir)
            .env("NODE_PATH", &modules)
            .arg(&script)
            .arg(EVENT_TYPE);
        c
    };
    ClientSpec {
        name: format!("Node @larksuiteoapi/node-sdk {version}"),
        launch: Ok(Box::new(launch)),
    }
}

/// Starts the client, waits for its long connection, runs the warm-up and the measured
/// events, stops it.
fn run_client(
    sandbox: &Sandbox,
    mut cmd: Command,
    log: &Path,
    n: usize,
    warmup: usize,
) -> Result<Measured, String> {
    wait_for(Duration::from_secs(10), || sandbox.connections() == 0)
        .map_err(|()| "the previous client's connection is still open".to_owned())?;
    let out = std::fs::File::create(log).unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .map_err(|e| format!("cannot start it: {e}"))?;
    let result = measure(sandbox, &mut child, n, warmup);
    stop(&mut child);
    result
}

fn measure(
    sandbox: &Sandbox,
    child: &mut Child,
    n: usize,
    warmup: usize,
) -> Result<Measured, String> {
    let pid = child.id();
    let t = Instant::now();
    while sandbox.connections() == 0 {
        exited(child)?;
        if t.elapsed() > CONNECT_TIMEOUT {
            return Err(format!(
                "no long connection within {} s",
                CONNECT_TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    push_all(sandbox, warmup, 0, || exited(child)).map_err(|e| format!("warm-up: {e}"))?;

    let acks_before = sandbox.acks().len();
    let cpu_before = cpu_time(pid, false);
    let bench_before = cpu_time(std::process::id(), false);
    let machine_before = machine_busy();
    let started = Instant::now();
    let ids = push_all(sandbox, n, warmup, || exited(child))?;
    let elapsed = started.elapsed();
    let cpu = cpu_time(pid, false).saturating_sub(cpu_before);
    let bench_cpu = cpu_time(std::process::id(), false).saturating_sub(bench_before);
    let machine_cpu = machine_busy().saturating_sub(machine_before);
    let peak_rss_kb = status_kb(pid, "VmHWM");

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
    // An index into the sorted latencies: p in [0, 1], so the product is in [0, len - 1].
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    Ok(Measured {
        events: n,
        elapsed,
        p50: pct(0.50),
        p99: pct(0.99),
        cpu,
        peak_rss_kb,
        bench_cpu,
        machine_cpu,
    })
}

fn exited(child: &mut Child) -> Result<(), String> {
    match child.try_wait() {
        Ok(Some(status)) => Err(format!("the client exited ({status})")),
        Ok(None) => Ok(()),
        Err(e) => Err(format!("cannot wait for the client: {e}")),
    }
}

fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> Result<(), ()> {
    let t = Instant::now();
    while !done() {
        if t.elapsed() > timeout {
            return Err(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// SIGTERM, then SIGKILL if it has not exited within 10 s.
fn stop(child: &mut Child) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    if wait_for(Duration::from_secs(10), || {
        child.try_wait().ok().flatten().is_some()
    })
    .is_err()
    {
        let _ = child.kill();
    }
    let _ = child.wait();
}
