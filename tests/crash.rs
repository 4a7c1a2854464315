//! Crash safety: a child process writes sessions in a loop and prints each id once its commit
//! has returned; the parent kills it with SIGKILL at random points and checks that every printed
//! id is present and decrypts after reopening.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use lark_service::storage::{AuthSession, Key, Keyring, SessionId, Store, StoreOptions};
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};

const CHILD_ENV: &str = "LARK_CRASH_CHILD_STORE";

fn ring() -> Keyring {
    Keyring::new(Key::from_bytes(&[9; 32]), vec![])
}

/// The child: runs only when started by the parent test below.
#[test]
fn crash_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = Store::open(std::path::Path::new(&path), ring(), StoreOptions::default()).unwrap();
    let mut out = std::io::stdout().lock();
    for i in 0u64.. {
        let mut s = AuthSession::new_pending(
            "cli_crash",
            &format!("u{}", i % 97),
            vec!["offline_access".into()],
            i,
            600_000,
        );
        s.access_token = Some(SecretString::from(format!("tok-{}", s.session_id)));
        store.put_session(&s).unwrap();
        writeln!(out, "ID {}", s.session_id).unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn every_acknowledged_write_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.redb");
    let exe = std::env::current_exe().unwrap();
    let mut acknowledged: Vec<SessionId> = Vec::new();
    let mut rng = rand::rng();
    let rounds = 24;
    for round in 0..rounds {
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        // Kill after a random number of acknowledged writes (sometimes right away).
        let target = if round % 6 == 0 {
            0
        } else {
            rng.random_range(1..300)
        };
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = 0;
        while seen < target {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(id) = line.strip_prefix("ID ") {
                        acknowledged.push(id.parse().unwrap());
                        seen += 1;
                    }
                }
                _ => break,
            }
        }
        child.kill().unwrap(); // SIGKILL
                               // Lines printed before the kill landed are acknowledged too.
        for line in lines.map_while(Result::ok) {
            if let Some(id) = line.strip_prefix("ID ") {
                // A line cut by the kill fails to parse; skip it.
                if let Ok(id) = id.parse() {
                    acknowledged.push(id);
                }
            }
        }
        let status = child.wait().unwrap();
        assert!(!status.success(), "child should have been killed");

        // Reopen and check everything acknowledged so far.
        let store = Store::open(&path, ring(), StoreOptions::default())
            .unwrap_or_else(|e| panic!("round {round}: reopen failed: {e}"));
        for id in &acknowledged {
            let s = store
                .get_session(*id)
                .unwrap_or_else(|e| panic!("round {round}: session {id} unreadable: {e}"))
                .unwrap_or_else(|| panic!("round {round}: acknowledged session {id} is missing"));
            assert_eq!(s.access_token.unwrap().expose_secret(), format!("tok-{id}"));
        }
    }
    assert!(
        acknowledged.len() > 100,
        "too few writes were exercised: {}",
        acknowledged.len()
    );
}
