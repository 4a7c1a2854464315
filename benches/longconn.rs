//! Long-connection benchmark: the sandbox pushes 1 KiB events over the long connection with up
//! to 64 unacknowledged, the service (in-process, real dispatcher with durable de-duplication)
//! ACKs them; prints events/s and ACK latency p50/p99 as the platform side sees it.
//!
//! `cargo bench --bench longconn` (`LONGCONN_BENCH_EVENTS`, default 20 000). Both sides share
//! the machine's cores, as the official SDKs would in the same setup. The comparison with the
//! official Python and Node clients is still to be written (issue 11).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lark_service::config::{Config, LoadOptions};
use lark_service::daemon::{run, Listeners};
use lark_service::sandbox::{PushOpts, Sandbox, SandboxOptions, APP_ID, APP_SECRET};
use serde_json::json;

fn main() {
    let n: usize = std::env::var("LONGCONN_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let sandbox = Sandbox::start(SandboxOptions {
            redeliver_after: Duration::from_secs(60),
            ..SandboxOptions::default()
        })
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cfg_file = dir.path().join("c.toml");
        std::fs::write(&cfg_file, "").unwrap();
        let env: HashMap<String, String> = [
            ("APP_ID", APP_ID.to_owned()),
            ("APP_SECRET", APP_SECRET.to_owned()),
            ("LARK_TOKEN_ENCRYPTION_KEY", "42".repeat(32)),
            ("LARK_DOMAIN", sandbox.base_url()),
            (
                "STORAGE_PATH",
                dir.path().join("s.redb").display().to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let cfg = Config::load_with(
            &LoadOptions {
                config_path: Some(cfg_file),
                overrides: vec![],
            },
            &env,
        )
        .unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let svc = tokio::spawn(async move {
            let _ = run(
                cfg,
                Listeners {
                    http,
                    metrics: None,
                },
                async move {
                    let _ = stop_rx.await;
                },
            )
            .await;
        });
        while sandbox.connections() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let body = "x".repeat(900);
        let started = Instant::now();
        let mut pushed = 0;
        while pushed < n {
            while pushed < n && sandbox.unacked() < 64 {
                sandbox
                    .push_event(
                        "bench.event_v1",
                        json!({ "i": pushed, "pad": body }),
                        PushOpts::default(),
                    )
                    .unwrap();
                pushed += 1;
            }
            tokio::task::yield_now().await;
        }
        while sandbox.unacked() > 0 {
            tokio::task::yield_now().await;
        }
        let elapsed = started.elapsed();
        let mut lat: Vec<Duration> = sandbox.acks().iter().filter_map(|a| a.since_push).collect();
        lat.sort();
        let pct = |p: f64| {
            lat.get(((lat.len() as f64 - 1.0) * p) as usize)
                .copied()
                .unwrap_or_default()
        };
        println!(
            "\n| long connection (lark-service, 1 KiB events, 64 in flight) | result |\n|---|---|"
        );
        println!("| events | {n} |");
        println!("| events/s | {:.0} |", n as f64 / elapsed.as_secs_f64());
        println!(
            "| ACK latency p50 | {:.2} ms |",
            pct(0.50).as_secs_f64() * 1000.0
        );
        println!(
            "| ACK latency p99 | {:.2} ms |",
            pct(0.99).as_secs_f64() * 1000.0
        );
        let _ = stop_tx.send(());
        let _ = svc.await;
    });
}
