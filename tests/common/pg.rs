//! A throw-away PostgreSQL server for tests (`apt-get install postgresql`). Without `initdb`
//! a test that needs one fails: it never passes silently.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A throw-away PostgreSQL cluster in a temp dir, on a free port.
pub struct Pg {
    pub bin: PathBuf,
    pub data: PathBuf,
    pub port: u16,
    pub as_nobody: bool,
    /// Serve TLS with `server.crt` / `server.key` in the data directory.
    pub ssl: bool,
    pub _dir: tempfile::TempDir,
}

/// Where PostgreSQL's server binaries (`initdb`, `pg_ctl`) are: the newest
/// `/usr/lib/postgresql/*/bin` (Debian's layout), else the directory of `initdb` on `PATH`;
/// `None` when neither has them.
pub fn server_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists())
        .collect();
    found.sort();
    if let Some(b) = found.pop() {
        return Some(b);
    }
    let out = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        .ok()?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (!p.is_empty()).then(|| Path::new(&p).parent().unwrap().to_owned())
}

pub fn find_bin() -> PathBuf {
    server_bin().unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin \
             or on PATH: install them with `apt-get install -y postgresql` (CI does, in .ci/run)"
        )
    })
}

impl Pg {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// A cluster that serves TLS with this certificate and key (PEM).
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Self {
        Self::start_with(Some((cert_pem, key_pem)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> Self {
        let bin = find_bin();
        let dir = tempfile::tempdir().unwrap();
        let as_nobody = unsafe_is_root();
        let data = dir.path().join("data");
        if as_nobody {
            // initdb refuses to run as root: the cluster belongs to `nobody`.
            std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = Self {
            bin,
            data,
            port,
            as_nobody,
            ssl: tls.is_some(),
            _dir: dir,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                pg.data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt;
            for (name, text, mode) in [("server.crt", cert, 0o644), ("server.key", key, 0o600)] {
                let p = pg.data.join(name);
                std::fs::write(&p, text).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
                if pg.as_nobody {
                    std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
                }
            }
        }
        pg.start_server();
        pg
    }

    pub fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let out = if self.as_nobody {
            Command::new("runuser")
                .args(["-u", "nobody", "--"])
                .arg(&exe)
                .args(args)
                .current_dir("/")
                .output()
        } else {
            Command::new(&exe).args(args).output()
        }
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn start_server(&self) {
        let mut opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off",
            self.port,
            self.data.to_str().unwrap()
        );
        if self.ssl {
            opts.push_str(" -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key");
        }
        let log = self.data.join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-o",
                &opts,
                "-w",
                "start",
            ],
        );
    }

    pub fn stop_immediate(&self) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let exe = self.bin.join("pg_ctl");
        let args = ["-D", self.data.to_str().unwrap(), "-m", "immediate", "stop"];
        let _ = if self.as_nobody {
            Command::new("runuser")
                .args(["-u", "nobody", "--"])
                .arg(&exe)
                .args(args)
                .output()
        } else {
            Command::new(&exe).args(args).output()
        };
    }
}

fn unsafe_is_root() -> bool {
    // No libc call needed: /proc/self/status tells the effective uid.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// The Python deployment's `user_auth_sessions` table as its migrations leave it (head
/// revision `dfd31b9964f6`, compat §2), with its indexes.
pub const PYTHON_DDL: &str = "
CREATE TABLE user_auth_sessions (
    id SERIAL PRIMARY KEY,
    session_id VARCHAR(64) NOT NULL UNIQUE,
    app_id VARCHAR(64) NOT NULL,
    state VARCHAR(128) NOT NULL,
    auth_method VARCHAR(32) NOT NULL,
    redirect_uri VARCHAR(512),
    open_id VARCHAR(64),
    user_id VARCHAR(64),
    union_id VARCHAR(64),
    user_name VARCHAR(128),
    mobile VARCHAR(32),
    email VARCHAR(128),
    user_access_token TEXT,
    token_expires_at TIMESTAMP WITHOUT TIME ZONE,
    created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    expires_at TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    completed_at TIMESTAMP WITHOUT TIME ZONE,
    message_id VARCHAR(128)
);
CREATE INDEX idx_auth_session_state ON user_auth_sessions (state);
CREATE INDEX idx_auth_session_expires ON user_auth_sessions (expires_at);
CREATE INDEX idx_auth_session_app_user ON user_auth_sessions (app_id, user_id);
CREATE INDEX idx_auth_session_token_expires ON user_auth_sessions (token_expires_at)
    WHERE token_expires_at IS NOT NULL;
CREATE INDEX idx_auth_session_created ON user_auth_sessions (created_at DESC);
";

/// What each schema step of the PostgreSQL store added, undone: `(step, SQL)`, newest first.
/// A new step adds its line here (the `newest_step_is_undone` check in `pg_store` fails until
/// it does).
pub const UNDO_STEPS: &[(i32, &str)] = &[
    (
        8,
        "ALTER TABLE ls_seen_events DROP COLUMN held_until;
         ALTER TABLE ls_seen_events RESET (fillfactor);
         ALTER TABLE ls_seen_events ALTER COLUMN id TYPE text COLLATE \"default\";",
    ),
    (
        7,
        "ALTER TABLE ls_instances DROP COLUMN key_ids, DROP COLUMN active_key;",
    ),
    (6, "DROP TABLE ls_device_polls;"),
    (5, "DROP TABLE ls_apps; DROP TABLE ls_apps_version;"),
    (
        4,
        "DROP TABLE ls_outbox; DROP TABLE ls_outbox_dead; DROP TABLE ls_grants;
         DROP SEQUENCE ls_outbox_seq;",
    ),
    (3, "DROP TABLE ls_rate_counts;"),
    (2, "DROP TABLE ls_instances;"),
];

/// SQL that takes a database at this build's schema back to `version`, as an older release
/// left it: every later step undone, newest first, and the version number set.
pub fn back_to_schema(version: i32) -> String {
    let mut sql = String::new();
    for (_, undo) in UNDO_STEPS.iter().filter(|(step, _)| *step > version) {
        sql.push_str(undo);
        sql.push('\n');
    }
    sql.push_str(&format!(
        "UPDATE lark_service_schema SET version = {version};"
    ));
    sql
}

impl Pg {
    /// A new, empty database on this cluster (a name no earlier call of this process used);
    /// its URL.
    pub fn fresh_db(&self) -> String {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("t{n}");
        let port = self.port.to_string();
        self.run(
            "createdb",
            &["-h", "127.0.0.1", "-p", &port, "-U", "postgres", &name],
        );
        self.url(&name)
    }
}
