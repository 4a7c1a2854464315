//! Store benchmark: encrypted session writes vs raw redb writes of the same bytes, reads,
//! the TTL sweep at 100 k and 1 M sessions, and backup time and size. Prints a table.
//!
//! `cargo bench --bench store` (set `STORE_BENCH_MAX=100000` to skip the 1 M run).
//!
//! To measure only the TTL sweeps: `STORE_BENCH_SWEEPS=1000000:off,100000:on` picks the sweep
//! rows (size and change feed; the write, read and backup rows are skipped), and
//! `STORE_BENCH_REPEAT=3` sweeps that many copies of each filled store (each copied from the
//! closed store file, a fresh open each) and prints the median wall time and the median CPU
//! time (user + system of the bench process) of the sweep. `STORE_BENCH_SWEEP_BATCH` sets the
//! sweep's batch (50 000 unless set; the service's sweep worker passes 10 000).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a benchmark stops on the first error

use std::time::{Duration, Instant};

use lark_service::backup::{write_backup, Protection};
use lark_service::storage::{AuthSession, Key, Keyring, Store, StoreOptions};
use redb::{Database, TableDefinition};
use secrecy::SecretString;

const RAW: TableDefinition<'_, u128, &[u8]> = TableDefinition::new("raw");

fn session(i: u64, now: u64) -> AuthSession {
    let mut s = AuthSession::new_pending(
        "cli_bench000000000",
        &format!("user{}", i % 10_000),
        vec!["contact:user.base:readonly".into(), "offline_access".into()],
        now,
        600_000,
    );
    s.access_token = Some(SecretString::from(format!("u-{i:0>60}")));
    s.refresh_token = Some(SecretString::from(format!("ur-{i:0>60}")));
    s.open_id = Some(format!("ou_{i:0>32}"));
    s
}

fn rate(n: u64, d: Duration) -> String {
    format!("{:.0}/s", n as f64 / d.as_secs_f64())
}

/// CPU time of this process so far (user + system, all its threads: the run time the
/// scheduler accounts each thread in `/proc/self/task/*/schedstat`, in nanoseconds).
fn cpu_time() -> Duration {
    let mut ns = 0u64;
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        // A thread that ended since the listing has no file any more.
        if let Ok(stat) = std::fs::read_to_string(task.unwrap().path().join("schedstat")) {
            ns += stat
                .split_whitespace()
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap();
        }
    }
    Duration::from_nanos(ns)
}

/// Copies the store file in 4 KiB writes, as redb writes its pages (a whole-file copy leaves
/// the page cache in large folios, which makes each of the sweep's page writes cost more in
/// the kernel than after a fill), and puts it on disk before the sweep starts (or the sweep's
/// first commit would write the copy).
fn copy_in_pages(from: &std::path::Path, to: &std::path::Path) {
    use std::io::{Read, Write};
    let mut src = std::fs::File::open(from).unwrap();
    let mut dst = std::fs::File::create(to).unwrap();
    let mut page = [0u8; 4096];
    loop {
        let n = src.read(&mut page).unwrap();
        if n == 0 {
            break;
        }
        dst.write_all(&page[..n]).unwrap();
    }
    dst.sync_all().unwrap();
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Durable and batched writes and reads (sections 1 to 3).
fn write_rows(dir: &std::path::Path, now: u64, rows: &mut Vec<(String, String, String)>) {
    let ring = || Keyring::new(Key::from_bytes(&[7; 32]), vec![]);
    // 1. Durable single-record writes: encrypted sessions vs raw redb of the same size.
    let n = 2_000u64;
    let store = Store::open(&dir.join("enc.redb"), ring(), StoreOptions::default()).unwrap();
    let sessions: Vec<AuthSession> = (0..n).map(|i| session(i, now)).collect();
    let t = Instant::now();
    for s in &sessions {
        store.put_session(s).unwrap();
    }
    let enc = t.elapsed();
    let raw_db = Database::create(dir.join("raw.redb")).unwrap();
    let payload = vec![0x5au8; 420];
    let t = Instant::now();
    for i in 0..n {
        let txn = raw_db.begin_write().unwrap();
        {
            let mut tb = txn.open_table(RAW).unwrap();
            // Same index work as a session write: record + two index rows.
            tb.insert(u128::from(i), payload.as_slice()).unwrap();
            tb.insert(u128::from(i) | (1 << 100), [0u8; 1].as_slice())
                .unwrap();
            tb.insert(u128::from(i) | (1 << 101), [0u8; 1].as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let raw = t.elapsed();
    rows.push((
        "durable write, encrypted session (1 txn each)".into(),
        rate(n, enc),
        format!("{:.0} µs each", enc.as_micros() as f64 / n as f64),
    ));
    rows.push((
        "durable write, raw redb same bytes".into(),
        rate(n, raw),
        format!(
            "ratio encrypted/raw = {:.2}",
            raw.as_secs_f64() / enc.as_secs_f64()
        ),
    ));

    // 2. Batched writes (CPU cost of sealing + encoding + indexes), 10 000 per txn.
    let t = Instant::now();
    let batch: Vec<AuthSession> = (n..n + 50_000).map(|i| session(i, now)).collect();
    for chunk in batch.chunks(10_000) {
        store.put_sessions(chunk).unwrap();
    }
    let b = t.elapsed();
    rows.push((
        "batched write, encrypted session".into(),
        rate(50_000, b),
        String::new(),
    ));

    // 3. Reads (open + decrypt 3 fields).
    let t = Instant::now();
    for s in sessions.iter().take(2_000) {
        store.get_session(s.session_id).unwrap().unwrap();
    }
    let r = t.elapsed();
    rows.push((
        "read + decrypt session".into(),
        rate(2_000, r),
        String::new(),
    ));
    drop(store);
}

fn main() {
    let max: u64 = std::env::var("STORE_BENCH_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let ring = || Keyring::new(Key::from_bytes(&[7; 32]), vec![]);
    let now = 1_700_000_000_000u64;
    let mut rows: Vec<(String, String, String)> = Vec::new();
    let picked: Option<Vec<(u64, bool)>> = std::env::var("STORE_BENCH_SWEEPS").ok().map(|v| {
        v.split(',')
            .map(|p| {
                let (n, f) = p
                    .split_once(':')
                    .expect("STORE_BENCH_SWEEPS=SIZE:on|off,...");
                (n.trim().parse().unwrap(), f.trim() == "on")
            })
            .collect()
    });
    let repeat: usize = std::env::var("STORE_BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    if picked.is_none() {
        write_rows(dir.path(), now, &mut rows);
    }

    // 4. TTL sweep of N pending sessions that are all due, and backup of the same store; the
    // sweep once with the change feed on (an exporter is configured: every expiry is appended)
    // and once with it off (the service's default without an exporter).
    let all = [
        (100_000u64, true),
        (100_000, false),
        (1_000_000, true),
        (1_000_000, false),
    ];
    let sweep_batch: usize = std::env::var("STORE_BENCH_SWEEP_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let kept = std::env::var_os("STORE_BENCH_FILLED").map(std::path::PathBuf::from);
    for (total, feed) in picked.clone().unwrap_or_else(|| all.to_vec()) {
        if total > max {
            continue;
        }
        let opts = || StoreOptions {
            change_feed: feed,
            ..StoreOptions::default()
        };
        let label = if feed {
            "change feed on"
        } else {
            "no change feed"
        };
        // The filled store: made here, or (STORE_BENCH_FILLED) one a previous run kept.
        let filled = match &kept {
            Some(d) => d.join(format!("filled{total}-{feed}.redb")),
            None => dir.path().join(format!("filled{total}-{feed}.redb")),
        };
        if !filled.exists() {
            let store = Store::open(&filled, ring(), opts()).unwrap();
            let t = Instant::now();
            let mut i = 0;
            while i < total {
                let chunk: Vec<AuthSession> = (i..(i + 20_000).min(total))
                    .map(|j| session(j, now))
                    .collect();
                store.put_sessions(&chunk).unwrap();
                i += 20_000;
            }
            let fill = t.elapsed();
            let size = std::fs::metadata(&filled).unwrap().len();
            rows.push((
                format!("fill {total} sessions (batched, {label})"),
                rate(total, fill),
                format!("store {:.0} MiB", size as f64 / 1048576.0),
            ));
            if feed && picked.is_none() {
                let out = dir.path().join(format!("b{total}.age"));
                let id = age::x25519::Identity::generate();
                let prot = Protection::recipients(&[id.to_public().to_string()]).unwrap();
                let t = Instant::now();
                write_backup(&store, &out, &prot, &mut |_, _| {}).unwrap();
                let bk = t.elapsed();
                let bsize = std::fs::metadata(&out).unwrap().len();
                std::fs::remove_file(&out).unwrap();
                rows.push((
                    format!("backup {total} sessions (age)"),
                    format!("{:.2} s", bk.as_secs_f64()),
                    format!("{:.0} MiB", bsize as f64 / 1048576.0),
                ));
            }
        }
        let (mut walls, mut cpus) = (Vec::new(), Vec::new());
        let mut idle = Duration::ZERO;
        for r in 0..repeat {
            let path = dir.path().join(format!("sweep{total}-{feed}-{r}.redb"));
            copy_in_pages(&filled, &path);
            let store = Store::open(&path, ring(), opts()).unwrap();
            let (t, c) = (Instant::now(), cpu_time());
            let rep = store.sweep(now + 600_001, sweep_batch).unwrap();
            let (sw, cpu) = (t.elapsed(), cpu_time().saturating_sub(c));
            assert_eq!(rep.expired.len() as u64, total);
            if repeat > 1 {
                eprintln!(
                    "sweep {total} {label} #{r}: {:.2} s, CPU {:.2} s",
                    sw.as_secs_f64(),
                    cpu.as_secs_f64()
                );
            }
            walls.push(sw);
            cpus.push(cpu);
            let t = Instant::now();
            let rep = store.sweep(now + 600_002, 50_000).unwrap();
            idle = t.elapsed();
            assert!(rep.expired.is_empty());
            drop(store);
            std::fs::remove_file(&path).unwrap();
        }
        let (sw, cpu) = (median(walls), median(cpus));
        let of = if repeat > 1 {
            format!(", median of {repeat}")
        } else {
            String::new()
        };
        rows.push((
            format!("TTL sweep, {total} due ({label})"),
            format!("{:.2} s", sw.as_secs_f64()),
            format!("{}, CPU {:.2} s{of}", rate(total, sw), cpu.as_secs_f64()),
        ));
        rows.push((
            format!("TTL sweep, {total} stored, 0 due ({label})"),
            format!("{:.4} s", idle.as_secs_f64()),
            "0 expired".into(),
        ));
        if kept.is_none() {
            std::fs::remove_file(&filled).unwrap();
        }
    }

    println!("\n| store benchmark | result | note |\n|---|---|---|");
    for (a, b, c) in rows {
        println!("| {a} | {b} | {c} |");
    }
}
