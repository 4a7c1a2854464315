//! The events the long-connection benches push (`benches/longconn.rs`, `benches/fleet.rs`):
//! prepared events of about 1 KiB, every [`FRAGMENT_EVERY`]th in 2 fragments, at most
//! [`WINDOW`] unacknowledged. Included by each bench with `#[path]`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use lark_service::sandbox::{PreparedEvent, PushOpts, Sandbox};
use serde_json::json;

pub const EVENT_TYPE: &str = "bench.event_v1";
/// Events pushed and not yet acknowledged, at most.
pub const WINDOW: usize = 64;
/// Every this many events, one is sent in 2 fragments.
pub const FRAGMENT_EVERY: usize = 10;
/// A hang guard, not a measurement: a client that acknowledges nothing for this long has
/// failed.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Pushes `count` events (numbered from `first`) keeping at most [`WINDOW`] unacknowledged, and
/// returns when all are acknowledged. Returns the frame message ids pushed. `alive` is asked
/// every 100 ms whether the client(s) still run; its error ends the push.
pub fn push_all(
    sandbox: &Sandbox,
    count: usize,
    first: usize,
    mut alive: impl FnMut() -> Result<(), String>,
) -> Result<HashSet<String>, String> {
    // One body for every event, serialized once: the sandbox spends no time building JSON, and
    // each event still differs in its envelope (event id, message id).
    let body = PreparedEvent::new(&json!({ "pad": "x".repeat(900) })).map_err(|e| e.to_string())?;
    let mut ids = HashSet::with_capacity(count);
    let mut pushed = 0;
    let mut last_unacked = usize::MAX;
    let mut last_progress = Instant::now();
    let mut last_check = Instant::now();
    let mut unacked = sandbox.unacked();
    loop {
        while pushed < count && unacked < WINDOW {
            let i = first + pushed;
            let opts = PushOpts {
                fragments: if i.is_multiple_of(FRAGMENT_EVERY) {
                    2
                } else {
                    1
                },
                ..PushOpts::default()
            };
            let id = sandbox
                .push_prepared(EVENT_TYPE, &body, opts)
                .map_err(|e| e.to_string())?;
            ids.insert(id);
            pushed += 1;
            unacked += 1;
        }
        if pushed == count && unacked == 0 {
            return Ok(ids);
        }
        if unacked != last_unacked {
            last_unacked = unacked;
            last_progress = Instant::now();
        }
        if last_check.elapsed() > Duration::from_millis(100) {
            last_check = Instant::now();
            alive()?;
            if last_progress.elapsed() > STALL_TIMEOUT {
                let non_200 = sandbox.acks().iter().filter(|a| a.code != 200).count();
                return Err(format!(
                    "stopped acknowledging: {unacked} events unacknowledged for {} s \
                     ({pushed} of {count} pushed; {non_200} ACKs so far with a code other than 200)",
                    STALL_TIMEOUT.as_secs()
                ));
            }
        }
        // Woken by the next ACK (no polling): the window is refilled as soon as it has room.
        let room_below = if pushed < count { WINDOW } else { 1 };
        unacked = sandbox.wait_unacked_below(room_below, Duration::from_millis(100));
    }
}
