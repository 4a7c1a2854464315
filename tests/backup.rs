//! Backups: consistent while writers run, restorable, and refused when tampered or wrong.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use lark_service::backup::{restore_backup, write_backup, BackupError, Protection};
use lark_service::storage::{AuthSession, Error, Key, Keyring, SessionId, Store, StoreOptions};
use secrecy::{ExposeSecret, SecretString};

fn ring() -> Keyring {
    Keyring::new(Key::from_bytes(&[3; 32]), vec![])
}

fn session(i: u64) -> AuthSession {
    let mut s = AuthSession::new_pending(
        "cli_b",
        &format!("u{}", i % 50),
        vec!["offline_access".into()],
        i,
        600_000,
    );
    s.access_token = Some(SecretString::from(format!("tok-{}", s.session_id)));
    s
}

fn keys() -> (Protection, Protection) {
    let id = age::x25519::Identity::generate();
    let public = id.to_public().to_string();
    let secret = id.to_string().expose_secret().to_owned();
    let dir = tempfile::tempdir().unwrap().keep();
    let f = dir.join("id.txt");
    std::fs::write(&f, format!("# test identity\n{secret}\n")).unwrap();
    (
        Protection::recipients(&[public]).unwrap(),
        Protection::identity_file(&f).unwrap(),
    )
}

fn ids(store: &Store) -> BTreeSet<SessionId> {
    store
        .list_sessions(None, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|s| s.session_id.parse().unwrap())
        .collect()
}

#[test]
fn a_backup_taken_while_writers_run_restores_to_exactly_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        &dir.path().join("live.redb"),
        ring(),
        StoreOptions::default(),
    )
    .unwrap();
    for i in 0..2000 {
        store.put_session(&session(i)).unwrap();
    }
    let before = ids(&store);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, stop) = (store.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) || n < 200 {
                store.put_session(&session(10_000 + n)).unwrap();
                n += 1;
            }
            n
        })
    };
    let (enc, dec) = keys();
    let out = dir.path().join("b.age");
    let mut calls = 0;
    let header = write_backup(&store, &out, &enc, &mut |_, _| calls += 1).unwrap();
    stop.store(true, Ordering::SeqCst);
    let written = writer.join().unwrap();
    let after = ids(&store);
    assert!(written >= 200 && after.len() as u64 == 2000 + written);
    assert!(calls >= 1);

    let target = dir.path().join("restored.redb");
    let restored_header = restore_backup(
        &out,
        &dec,
        &target,
        ring(),
        StoreOptions::default(),
        false,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(restored_header, header);
    let restored = Store::open(&target, ring(), StoreOptions::default()).unwrap();
    let got = ids(&restored);
    assert_eq!(got.len() as u64, header.counts["sessions"]);
    assert!(
        before.is_subset(&got),
        "records committed before the backup are missing"
    );
    assert!(got.is_subset(&after));
    for id in &got {
        let a = restored.get_session(*id).unwrap().unwrap();
        let b = store.get_session(*id).unwrap().unwrap();
        assert_eq!(
            a.access_token.unwrap().expose_secret(),
            b.access_token.unwrap().expose_secret()
        );
        assert_eq!(
            (a.user_id, a.state, a.expires_at),
            (b.user_id, b.state, b.expires_at)
        );
    }
    // The restored store's indexes work too.
    assert_eq!(
        restored.sessions_for_user("cli_b", "u1").unwrap().len(),
        store_user_count(&got, &store, "u1")
    );
}

fn store_user_count(ids: &BTreeSet<SessionId>, store: &Store, user: &str) -> usize {
    ids.iter()
        .filter(|id| store.get_session(**id).unwrap().unwrap().user_id == user)
        .count()
}

fn small_backup(dir: &Path, enc: &Protection) -> std::path::PathBuf {
    let store = Store::open(&dir.join("src.redb"), ring(), StoreOptions::default()).unwrap();
    for i in 0..20 {
        store.put_session(&session(i)).unwrap();
    }
    let out = dir.join("b.age");
    write_backup(&store, &out, enc, &mut |_, _| {}).unwrap();
    out
}

#[test]
fn a_tampered_backup_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (enc, dec) = keys();
    let out = small_backup(dir.path(), &enc);
    let mut bytes = std::fs::read(&out).unwrap();
    let n = bytes.len();
    bytes[n - 40] ^= 0x01;
    std::fs::write(&out, &bytes).unwrap();
    let target = dir.path().join("t.redb");
    let err = restore_backup(
        &out,
        &dec,
        &target,
        ring(),
        StoreOptions::default(),
        false,
        &mut |_, _| {},
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("damaged or was tampered with") || msg.contains("could not be decrypted"),
        "{msg}"
    );
    assert!(!target.exists());
    assert!(!dir.path().join("t.redb.restore-tmp").exists());
}

#[test]
fn a_wrong_identity_or_passphrase_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let (enc, _) = keys();
    let (_, other) = keys();
    let out = small_backup(dir.path(), &enc);
    let err = restore_backup(
        &out,
        &other,
        &dir.path().join("t.redb"),
        ring(),
        StoreOptions::default(),
        false,
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(matches!(err, BackupError::Decrypt(_)), "{err}");
    assert!(
        err.to_string()
            .starts_with("the backup could not be decrypted"),
        "{err}"
    );

    let pass = Protection::Passphrase(SecretString::from("correct horse".to_owned()));
    let d2 = tempfile::tempdir().unwrap();
    let out = small_backup(d2.path(), &pass);
    let wrong = Protection::Passphrase(SecretString::from("wrong horse".to_owned()));
    let err = restore_backup(
        &out,
        &wrong,
        &d2.path().join("t.redb"),
        ring(),
        StoreOptions::default(),
        false,
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(matches!(err, BackupError::Decrypt(_)), "{err}");
    restore_backup(
        &out,
        &pass,
        &d2.path().join("t.redb"),
        ring(),
        StoreOptions::default(),
        false,
        &mut |_, _| {},
    )
    .unwrap();
}

#[test]
fn restore_checks_the_token_key_and_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let (enc, dec) = keys();
    let out = small_backup(dir.path(), &enc);
    let target = dir.path().join("t.redb");
    let wrong = Keyring::new(Key::from_bytes(&[4; 32]), vec![]);
    let err = restore_backup(
        &out,
        &dec,
        &target,
        wrong,
        StoreOptions::default(),
        false,
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(
        matches!(err, BackupError::Store(Error::WrongKey { .. })),
        "{err}"
    );
    assert!(!target.exists());

    restore_backup(
        &out,
        &dec,
        &target,
        ring(),
        StoreOptions::default(),
        false,
        &mut |_, _| {},
    )
    .unwrap();
    let err = restore_backup(
        &out,
        &dec,
        &target,
        ring(),
        StoreOptions::default(),
        false,
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("pass --force"), "{err}");
    {
        let _live = Store::open(&target, ring(), StoreOptions::default()).unwrap();
        let err = restore_backup(
            &out,
            &dec,
            &target,
            ring(),
            StoreOptions::default(),
            true,
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(
            matches!(err, BackupError::Store(Error::Locked { .. })),
            "{err}"
        );
    }
    restore_backup(
        &out,
        &dec,
        &target,
        ring(),
        StoreOptions::default(),
        true,
        &mut |_, _| {},
    )
    .unwrap();
    let kept = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".before-restore-"))
        .count();
    assert_eq!(kept, 1);
}

#[test]
fn the_cli_backs_up_a_running_service_online_and_restores_offline() {
    const BIN: &str = env!("CARGO_BIN_EXE_lark-service");
    let dir = tempfile::tempdir().unwrap();
    let id = age::x25519::Identity::generate();
    let idf = dir.path().join("id.txt");
    std::fs::write(&idf, id.to_string().expose_secret()).unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    // The CLI asks the running service through its admin listener.
    let admin_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cmd = || {
        let mut c = Command::new(BIN);
        c.current_dir(dir.path())
            .env_clear()
            .env("APP_ID", "cli_a0000000000000aa")
            .env("LARK_DOMAIN", "http://127.0.0.1:9")
            .env("WEBSOCKET_ENABLED", "false")
            .env("APP_SECRET", "x")
            .env("PUBLIC_URL", "https://svc.example.com")
            .env("LARK_TOKEN_ENCRYPTION_KEY", "03".repeat(32))
            .env(
                "LARK_SERVICE_ADMIN_TOKEN",
                "admin-test-token-0123456789abcdef",
            )
            .env("HTTP_LISTEN", format!("127.0.0.1:{port}"))
            .env("ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
            .env("BACKUP_DIR", dir.path().join("backups"))
            .env("PROMETHEUS_PORT", "0")
            .env("BACKUP_RECIPIENTS", id.to_public().to_string())
            .env("STORAGE_PATH", dir.path().join("s.redb"));
        c
    };
    {
        let s = Store::open(&dir.path().join("s.redb"), ring(), StoreOptions::default()).unwrap();
        for i in 0..30 {
            s.put_session(&session(i)).unwrap();
        }
    }
    let mut serve = cmd()
        .arg("serve")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let line = BufReader::new(serve.stdout.take().unwrap())
        .lines()
        .next()
        .unwrap()
        .unwrap();
    assert!(line.contains("ready"), "{line}");
    let o = cmd()
        .args(["backup", "--out"])
        .arg(dir.path().join("online.age"))
        .output()
        .unwrap();
    let t = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("the running service") && t.contains("30 sessions"),
        "{t}"
    );
    // Wrong admin token: refused.
    let o = cmd()
        .env(
            "LARK_SERVICE_ADMIN_TOKEN",
            "nope-nope-nope-nope-nope-nope-nope",
        )
        .args(["backup", "--out"])
        .arg(dir.path().join("x.age"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Restore refuses the live store.
    let o = cmd()
        .args(["restore", "--force", "--identity"])
        .arg(&idf)
        .arg("--from")
        .arg(dir.path().join("online.age"))
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    assert!(serve.wait().unwrap().success());
    // Offline restore into a fresh path.
    let o = cmd()
        .env("STORAGE_PATH", dir.path().join("restored.redb"))
        .args(["restore", "--identity"])
        .arg(&idf)
        .arg("--from")
        .arg(dir.path().join("online.age"))
        .output()
        .unwrap();
    let t = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{t}");
    assert!(t.contains("restored") && t.contains("restore: "), "{t}");
    let r = Store::open(
        &dir.path().join("restored.redb"),
        ring(),
        StoreOptions::default(),
    )
    .unwrap();
    assert_eq!(r.counts().unwrap().sessions, 30);
}

/// Issue 16: a restore (run as root, as operators do) gives the restored store the old file's
/// owner and mode, so the service can still open it.
#[test]
fn restore_keeps_the_previous_files_owner_and_mode() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let (enc, dec) = keys();
    let out = small_backup(dir.path(), &enc);
    let target = dir.path().join("t.redb");
    drop(Store::open(&target, ring(), StoreOptions::default()).unwrap());
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).unwrap();
    let am_root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    let owner = if am_root {
        65534
    } else {
        std::fs::metadata(&target).unwrap().uid()
    };
    if am_root {
        std::os::unix::fs::chown(&target, Some(owner), Some(owner)).unwrap();
    }
    restore_backup(
        &out,
        &dec,
        &target,
        ring(),
        StoreOptions::default(),
        true,
        &mut |_, _| {},
    )
    .unwrap();
    let m = std::fs::metadata(&target).unwrap();
    assert_eq!(m.mode() & 0o777, 0o640);
    assert_eq!(m.uid(), owner);
    assert_eq!(m.gid(), if am_root { owner } else { m.gid() });
}
