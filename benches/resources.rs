//! Resources of the release binary: size (as built and stripped), cold start to READY (the
//! systemd `READY=1` notification, timed from `spawn`), idle RSS with the long connection up,
//! and RSS under load (events pushed over the long connection plus authorization requests).
//! Prints a markdown table.
//!
//! `cargo bench --bench resources` (`RESOURCES_BENCH_STARTS`, default 20 starts per case;
//! `RESOURCES_BENCH_EVENTS`, default 30 000 events under load).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark stops on the first error

#[allow(dead_code)]
#[path = "common/host.rs"]
mod host;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use host::{env_or, free_port, pct, status_kb};
use lark_service::sandbox::{PushOpts, Sandbox, SandboxOptions, APP_ID, APP_SECRET};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_lark-service");
const ADMIN: &str = "resources-bench-admin-0123456789abcdef";
const KEY: &str = "5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c";

/// The sandbox's CA file (the sandbox serves TLS, as the platform does).
static SANDBOX_CA: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// The service as systemd would start it: `serve`, config from the environment, a notify socket.
fn spawn(
    dir: &Path,
    sandbox: &str,
    port: u16,
    admin_port: u16,
    websocket: bool,
) -> (Child, UnixDatagram) {
    let sock_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&sock_path);
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let child = Command::new(BIN)
        .current_dir(dir)
        .env_clear()
        .env("NOTIFY_SOCKET", &sock_path)
        .env("APP_ID", APP_ID)
        .env("APP_SECRET", APP_SECRET)
        .env("LARK_DOMAIN", sandbox)
        .env("TLS_CA_FILE", SANDBOX_CA.get().expect("sandbox started"))
        .env("LARK_TOKEN_ENCRYPTION_KEY", KEY)
        .env("LARK_SERVICE_ADMIN_TOKEN", ADMIN)
        .env("STORAGE_PATH", dir.join("s.redb"))
        .env("HTTP_LISTEN", format!("127.0.0.1:{port}"))
        .env("PUBLIC_URL", format!("http://127.0.0.1:{port}"))
        .env("ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .env("PROMETHEUS_PORT", "0")
        .env(
            "WEBSOCKET_ENABLED",
            if websocket { "true" } else { "false" },
        )
        .env("AUTH_REQUEST_RATE_LIMIT", "100000")
        .env("LOG_LEVEL", "warn")
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (child, sock)
}

/// Blocks until the service says `READY=1`.
fn wait_ready(sock: &UnixDatagram) {
    let mut buf = [0u8; 4096];
    loop {
        let n = sock
            .recv(&mut buf)
            .expect("no READY=1 from the service within 20 s");
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "READY=1")
        {
            return;
        }
    }
}

fn stop(mut child: Child) {
    // SIGTERM, as systemd stops it; a clean exit is part of the contract.
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let status = child.wait().unwrap();
    assert!(status.success(), "the service exited with {status}");
}

fn mb(kb: u64) -> String {
    format!("{:.1} MB", kb as f64 / 1000.0)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let starts = env_or("RESOURCES_BENCH_STARTS", 20).max(1);
    let events = env_or("RESOURCES_BENCH_EVENTS", 30_000);
    let mut rows: Vec<(String, String, String)> = Vec::new();

    // 1. Binary size, as built (symbols kept for backtraces) and fully stripped.
    let built = std::fs::metadata(BIN).unwrap().len();
    rows.push((
        "binary size, release as built".into(),
        format!("{:.1} MB", built as f64 / 1e6),
        "symbols kept, debuginfo split off (profile.release strip = \"debuginfo\")".into(),
    ));
    let stripped_path =
        std::env::temp_dir().join(format!("lark-service-stripped-{}", std::process::id()));
    match Command::new("strip")
        .arg("-s")
        .arg("-o")
        .arg(&stripped_path)
        .arg(BIN)
        .status()
    {
        Ok(s) if s.success() => {
            let n = std::fs::metadata(&stripped_path).unwrap().len();
            rows.push((
                "binary size, release stripped".into(),
                format!("{:.1} MB", n as f64 / 1e6),
                "`strip -s`".into(),
            ));
            let _ = std::fs::remove_file(&stripped_path);
        }
        _ => rows.push((
            "binary size, release stripped".into(),
            "not run".into(),
            "`strip` (binutils) not found".into(),
        )),
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sandbox = rt
        .block_on(Sandbox::start(SandboxOptions {
            redeliver_after: Duration::from_secs(60),
            extra_users: 200,
            ..SandboxOptions::default()
        }))
        .unwrap();
    let base = sandbox.base_url();
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_path = ca_dir.path().join("sandbox-ca.pem");
    std::fs::write(&ca_path, sandbox.ca_pem().expect("the sandbox serves TLS")).unwrap();
    SANDBOX_CA.set(ca_path).unwrap();

    // 2. Cold start to READY: a new store (created on first start), then an existing one.
    for (label, fresh) in [("new store", true), ("existing store", false)] {
        let kept = tempfile::tempdir().unwrap();
        let mut times = Vec::with_capacity(starts);
        for _ in 0..starts {
            let fresh_dir = tempfile::tempdir().unwrap();
            let dir = if fresh { fresh_dir.path() } else { kept.path() };
            let t = Instant::now();
            let (child, sock) = spawn(dir, &base, free_port(), free_port(), true);
            wait_ready(&sock);
            times.push(t.elapsed());
            stop(child);
        }
        times.sort();
        rows.push((
            format!("start to READY=1, {label} ({starts} starts)"),
            format!("median {}", ms(pct(&times, 0.5))),
            format!("max {}", ms(*times.last().unwrap())),
        ));
    }

    // 3. Idle RSS: started, long connection up, nothing to do.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // The admin API (authorization requests) is on the admin listener.
    let admin_port = free_port();
    let (child, sock) = spawn(dir.path(), &base, port, admin_port, true);
    wait_ready(&sock);
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    while sandbox.connections() == 0 {
        assert!(Instant::now() < deadline, "no long connection within 20 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_secs(5));
    let idle = status_kb(pid, "VmRSS");
    rows.push((
        "idle RSS (long connection up, 5 s after READY)".into(),
        mb(idle),
        format!(
            "anon {}, file {}, {} threads",
            mb(status_kb(pid, "RssAnon")),
            mb(status_kb(pid, "RssFile")),
            status_kb(pid, "Threads")
        ),
    ));

    // 4. Under load: events over the long connection (64 in flight) while 1 000 authorization
    // requests across 200 users arrive on the API.
    let sampled_peak = rt.block_on(async {
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{admin_port}/api/v1/auth/requests");
        let api = tokio::spawn(async move {
            let mut set = tokio::task::JoinSet::new();
            for i in 0..1000 {
                let (http, url) = (http.clone(), url.clone());
                set.spawn(async move {
                    http.post(&url)
                        .bearer_auth(ADMIN)
                        .json(&json!({"open_id": format!("ou_sandbox_user{:04}", i % 200),
                                      "scopes": [format!("scope{}", i % 5)]}))
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                });
                if set.len() >= 50 {
                    let _ = set.join_next().await;
                }
            }
            let mut codes = Vec::new();
            while let Some(r) = set.join_next().await {
                codes.push(r);
            }
            codes.len()
        });
        let body = "x".repeat(900);
        let mut pushed = 0;
        let mut peak = 0u64;
        let mut last_sample = Instant::now();
        while pushed < events {
            while pushed < events && sandbox.unacked() < 64 {
                let opts = PushOpts {
                    fragments: if pushed % 10 == 0 { 2 } else { 1 },
                    ..PushOpts::default()
                };
                sandbox
                    .push_event("bench.event_v1", json!({ "i": pushed, "pad": body }), opts)
                    .unwrap();
                pushed += 1;
            }
            if last_sample.elapsed() > Duration::from_millis(50) {
                peak = peak.max(status_kb(pid, "VmRSS"));
                last_sample = Instant::now();
            }
            tokio::task::yield_now().await;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while sandbox.unacked() > 0 {
            assert!(Instant::now() < deadline, "events not ACKed within 60 s");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let _ = api.await;
        peak.max(status_kb(pid, "VmRSS"))
    });
    rows.push((
        format!("RSS under load ({events} events + 1 000 auth requests)"),
        mb(sampled_peak),
        format!("peak (VmHWM) {}", mb(status_kb(pid, "VmHWM"))),
    ));
    std::thread::sleep(Duration::from_secs(3));
    rows.push((
        "RSS 3 s after the load".into(),
        mb(status_kb(pid, "VmRSS")),
        String::new(),
    ));
    stop(child);

    println!("\n| resources (release binary) | result | note |\n|---|---|---|");
    for (a, b, c) in rows {
        println!("| {a} | {b} | {c} |");
    }
}
