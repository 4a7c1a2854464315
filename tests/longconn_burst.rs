//! The long connection's ACK path under a burst (issue 21): many events arrive before the
//! service has handled the first, so it reads several frames, handles each at once and writes
//! their ACKs together. Every event is still acknowledged, with a valid ACK (code 200, its
//! `message_id` echoed, `biz_rt` set, no data), a redelivered copy is answered as a duplicate
//! without being handled again, every frame and event is counted, and the ids recorded survive
//! a restart: after it, the same events are all duplicates.
//!
//! Asserts counts and outcomes, never durations; waits are polls with generous guards. The
//! metrics are process-wide, so this binary holds one test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::collections::HashMap;

use common::*;
use lark_service::sandbox::{PreparedEvent, PushOpts, Sandbox, SandboxOptions};
use serde_json::json;

const EVENTS: usize = 300;
const EVENT_TYPE: &str = "bench.event_v1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_acknowledged_once_per_delivery_counted_and_deduplicated_across_a_restart() {
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let svc = Service::start(&sandbox, &[]).await;
    svc.wait_for(|| async { sandbox.connections() == 1 }).await;
    let before = svc.scrape().await;

    // All pushed at once (no window): every 7th in 3 fragments sent in reverse order, every
    // 5th delivered twice.
    let body = PreparedEvent::new(&json!({"pad": "x".repeat(600)})).unwrap();
    let mut deliveries: HashMap<String, usize> = HashMap::new();
    let mut frames = 0;
    for i in 0..EVENTS {
        let fragments = if i % 7 == 0 { 3 } else { 1 };
        let copies = if i % 5 == 0 { 2 } else { 1 };
        let id = sandbox
            .push_prepared(
                EVENT_TYPE,
                &body,
                PushOpts {
                    fragments,
                    out_of_order: fragments > 1,
                    duplicate: copies == 2,
                },
            )
            .unwrap();
        deliveries.insert(id, copies);
        frames += fragments as usize * copies;
    }
    let duplicates = deliveries.values().filter(|&&c| c == 2).count();
    let total: usize = deliveries.values().sum();
    // Every delivery is acknowledged (a duplicate too: the platform must stop resending it).
    svc.wait_for(|| async {
        sandbox
            .acks()
            .iter()
            .filter(|a| deliveries.contains_key(&a.message_id))
            .count()
            == total
    })
    .await;
    assert_eq!(sandbox.unacked(), 0);
    let mut acked: HashMap<String, usize> = HashMap::new();
    for a in sandbox.acks() {
        if !deliveries.contains_key(&a.message_id) {
            continue;
        }
        assert_eq!(a.code, 200, "ACK of {}", a.message_id);
        assert!(a.data.is_none(), "no handler answers with data here");
        assert!(
            a.biz_rt
                .as_deref()
                .is_some_and(|v| v.parse::<u64>().is_ok()),
            "biz_rt of {}: {:?}",
            a.message_id,
            a.biz_rt
        );
        *acked.entry(a.message_id).or_default() += 1;
    }
    assert_eq!(acked, deliveries, "one ACK per delivery, for every event");

    let after = svc.scrape().await;
    let moved =
        |name: &str, filter: &str| metric(&after, name, filter) - metric(&before, name, filter);
    // Counted through the handles each connection and the dispatcher keep.
    assert_eq!(
        moved("lark_service_websocket_frames_received_total", "event"),
        frames as f64
    );
    assert_eq!(
        moved("lark_service_events_received_total", "websocket"),
        total as f64
    );
    assert_eq!(
        moved("lark_service_events_deduplicated_total", ""),
        duplicates as f64
    );
    assert_eq!(
        moved("lark_service_event_ack_duration_seconds_count", ""),
        total as f64
    );

    // The same events after a restart (the platform redelivering what it thinks was lost):
    // each is acknowledged and none is handled again.
    let event_ids: Vec<String> = deliveries
        .keys()
        .map(|m| sandbox.event_id_of(m).unwrap())
        .collect();
    let dir = svc.stop_keep_dir().await;
    // The stopped service's connection is gone before the new one opens.
    let guard = std::time::Instant::now();
    while sandbox.connections() != 0 {
        assert!(guard.elapsed() < std::time::Duration::from_secs(30));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let svc = Service::start_in(dir, &sandbox, &[]).await;
    svc.wait_for(|| async { sandbox.connections() == 1 }).await;
    let before = svc.scrape().await;
    let mut again = Vec::new();
    for id in &event_ids {
        again.push(
            sandbox
                .push_event_as(id, EVENT_TYPE, json!({"pad": "y"}), PushOpts::default())
                .unwrap(),
        );
    }
    svc.wait_for(|| async {
        let acks = sandbox.acks();
        again
            .iter()
            .all(|m| acks.iter().any(|a| &a.message_id == m && a.code == 200))
    })
    .await;
    let after = svc.scrape().await;
    assert_eq!(
        metric(&after, "lark_service_events_deduplicated_total", "")
            - metric(&before, "lark_service_events_deduplicated_total", ""),
        EVENTS as f64,
        "every event recorded before the restart is a duplicate after it"
    );
    svc.stop().await;
}
