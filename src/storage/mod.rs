//! The embedded store: one redb file holding sessions, tokens, users and seen event ids.
//!
//! This is the only module that imports `redb`. Every write that changes a session or a token
//! commits durably (fsync) before it returns. Calls are blocking; async callers use
//! [`Store::run`], which moves the work off the executor with `spawn_blocking`.
//!
//! Secrets are sealed by `envelope` before they reach a table; see `records` for the stored
//! forms and `tables` for the schema.

mod apps;
mod backup;
mod changes;
mod counts;
mod db;
mod device;
mod envelope;
mod error;
mod events;
mod keys;
mod leases;
mod migrate;
mod outbox;
pub mod postgres;
mod records;
mod sessions;
mod sweep;
pub mod tables;
#[doc(hidden)]
pub mod testing;
mod tokens;
pub mod traits;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};

pub use apps::{AppDeletion, AppRow, AppStatus, SecretKey};
pub use backup::{restore_snapshot, Progress, SnapshotHeader};
pub use changes::{ChangeKind, ExportRow, ExportToken, ImportToken, EXPORT_CURSOR_PREFIX};
pub use db::{not_on_postgres, Db, EventClaim};
pub use device::DevicePoll;
pub use envelope::{Key, KeyId, KeyParseError, Keyring};
pub use error::{Error, Result};
pub use events::{valid_event_key, SeenSnapshot, MAX_EVENT_KEY_BYTES};
pub use keys::{KeyStatus, RotationReport};
pub use outbox::{ExpiringGrant, OutboxEntry, OutboxEvent};
pub use records::{
    AuthSession, FailureReason, SessionId, SessionRecord, SessionState, UserInfo, UserToken,
};
pub use sessions::{PendingUpdate, SessionSummary};
pub use sweep::SweepReport;
pub use traits::{
    Backend, ChangeFeed, Leases, Outbox, SeenEvents, SessionStore, TokenStore, UserStore,
};

use envelope::{Place, Sealed};
use tables::{META, SCHEMA_VERSION};

/// Tunables of the store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// How long a terminal session is kept before the sweep deletes it.
    pub terminal_retention: Duration,
    /// Page cache size in bytes.
    pub cache_size: usize,
    /// Whether session writes append to the change feed (`changes`), which only an exporter
    /// reads. Off (no exporter configured): nothing is appended and the sweep empties the
    /// feed, so it never grows; the store remembers that the feed has a gap, and when it is
    /// next opened with the feed on, [`Store::change_feed_complete_from`] tells an exporter
    /// behind the gap to copy every session first. On: the sweep prunes the feed up to the
    /// slowest exporter's cursor (the cursors named `export.*`).
    pub change_feed: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            terminal_retention: Duration::from_secs(30 * 24 * 3600),
            cache_size: 16 * 1024 * 1024,
            change_feed: true,
        }
    }
}

/// The store handle. Cheap to clone; the file closes when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    ring: Keyring,
    path: PathBuf,
    pid_file: Option<PathBuf>,
    opts: StoreOptions,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("active_key", &self.ring.active_id())
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(p) = &self.pid_file {
            let _ = std::fs::remove_file(p);
        }
    }
}

static COMMIT_OBSERVER: std::sync::OnceLock<fn(f64)> = std::sync::OnceLock::new();

/// Installs a function told the duration (seconds) of every commit (metrics). First call wins.
pub fn set_commit_observer(f: fn(f64)) {
    let _ = COMMIT_OBSERVER.set(f);
}

const KEY_CHECK: &str = "key_check";
const KEY_CHECK_PLAINTEXT: &[u8] = b"lark-service key check";
const SCHEMA_KEY: &str = "schema_version";
const CREATED_KEY: &str = "created_at";

fn key_check_place() -> Place<'static> {
    Place {
        table: "meta",
        row: KEY_CHECK.as_bytes(),
        field: "canary",
    }
}

/// Writes this process's id beside the store, which it now holds locked. Whatever is at that
/// path (a stale pid file, or a symlink someone planted to make us overwrite another file) is
/// removed, never followed, and the new file is created exclusively with `O_NOFOLLOW`.
fn write_pid_file(p: &Path) -> Option<PathBuf> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(p);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)
        .ok()?;
    writeln!(f, "{}", std::process::id()).ok()?;
    Some(p.to_owned())
}

fn pid_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".pid");
    PathBuf::from(p)
}

pub(crate) fn read_pid_file(path: &Path) -> Option<u32> {
    std::fs::read_to_string(pid_path(path))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Current unix time in milliseconds.
#[must_use]
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Where a new store at `path` is created before it is renamed into place.
fn creating_path(path: &Path) -> std::path::PathBuf {
    let mut name = path
        .file_name()
        .map(std::ffi::OsStr::to_os_string)
        .unwrap_or_default();
    name.push(".creating");
    path.with_file_name(name)
}

/// Makes a rename in `path`'s directory durable.
fn sync_parent(path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| Error::Io {
            path: dir.to_owned(),
            source,
        })
}

impl Store {
    /// Opens (or creates) the store at `path`, checking the schema and the key.
    pub fn open(path: &Path, ring: Keyring, opts: StoreOptions) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        // A zero-length file is what a process killed while creating the store (before this
        // build created it aside) left: nothing was ever committed to it.
        let existed = std::fs::metadata(path).is_ok_and(|m| m.len() > 0);
        // A new store is created and initialized under another name and renamed into place
        // once its tables and key check are committed, so a kill during the creation never
        // leaves a file at `path` that cannot be opened again.
        let creating = creating_path(path);
        let at = if existed { path } else { creating.as_path() };
        if !existed {
            let _ = std::fs::remove_file(&creating);
        }
        let db = Database::builder()
            .set_cache_size(opts.cache_size)
            .create(at)
            .map_err(|e| Error::engine(at, e))?;
        if !existed {
            // The file holds only sealed secrets, but nobody else needs to read it.
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(at, std::fs::Permissions::from_mode(0o600));
        }
        let pid_file = write_pid_file(&pid_path(path));
        let store = Self {
            inner: Arc::new(Inner {
                db,
                ring,
                path: path.to_owned(),
                pid_file,
                opts,
            }),
        };
        store.init()?;
        if !existed {
            std::fs::rename(&creating, path).map_err(|source| Error::Io {
                path: path.to_owned(),
                source,
            })?;
            sync_parent(path)?;
        }
        Ok(store)
    }

    /// Opens a throw-away store in memory (tests and benchmarks).
    pub fn open_in_memory(ring: Keyring, opts: StoreOptions) -> Result<Self> {
        let path = PathBuf::from(":memory:");
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|e| Error::engine(&path, e))?;
        let store = Self {
            inner: Arc::new(Inner {
                db,
                ring,
                path,
                pid_file: None,
                opts,
            }),
        };
        store.init()?;
        Ok(store)
    }

    /// The file this store lives in.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The id new secrets are sealed under.
    #[must_use]
    pub fn active_key_id(&self) -> KeyId {
        self.inner.ring.active_id()
    }

    /// Runs blocking store work off the async executor.
    pub async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T> + Send + 'static,
    {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| Error::Join(e.to_string()))?
    }

    fn db(&self) -> &Database {
        &self.inner.db
    }

    fn ring(&self) -> &Keyring {
        &self.inner.ring
    }

    fn err(&self, e: impl Into<redb::Error>) -> Error {
        Error::engine(&self.inner.path, e)
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction> {
        self.db().begin_write().map_err(|e| self.err(e))
    }

    fn commit(&self, txn: redb::WriteTransaction) -> Result<()> {
        let started = std::time::Instant::now();
        let r = txn.commit().map_err(|e| self.err(e));
        if let Some(observe) = COMMIT_OBSERVER.get() {
            observe(started.elapsed().as_secs_f64());
        }
        r
    }

    fn begin_read(&self) -> Result<redb::ReadTransaction> {
        self.db().begin_read().map_err(|e| self.err(e))
    }

    /// Schema check, migration, first-time setup and key check.
    fn init(&self) -> Result<()> {
        let txn = self.begin_write()?;
        let (version, check) = {
            let meta = txn.open_table(META).map_err(|e| self.err(e))?;
            let version = meta
                .get(SCHEMA_KEY)
                .map_err(|e| self.err(e))?
                .map(|v| parse_u32(v.value()));
            let check = meta
                .get(KEY_CHECK)
                .map_err(|e| self.err(e))?
                .map(|v| v.value().to_vec());
            (version, check)
        };
        match version {
            None => {
                migrate::create_tables(self, &txn)?;
                let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
                let sealed = self.ring().seal(KEY_CHECK_PLAINTEXT, &key_check_place());
                meta.insert(SCHEMA_KEY, SCHEMA_VERSION.to_be_bytes().as_slice())
                    .map_err(|e| self.err(e))?;
                meta.insert(KEY_CHECK, records::encode(1, &sealed).as_slice())
                    .map_err(|e| self.err(e))?;
                meta.insert(CREATED_KEY, now_ms().to_be_bytes().as_slice())
                    .map_err(|e| self.err(e))?;
            }
            Some(Some(v)) if v > SCHEMA_VERSION => {
                return Err(Error::NewerSchema {
                    path: self.inner.path.clone(),
                    found: v,
                    supported: SCHEMA_VERSION,
                });
            }
            Some(Some(v)) => {
                self.check_key(check.as_deref())?;
                if v < SCHEMA_VERSION {
                    migrate::migrate(self, &txn, v)?;
                    let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
                    meta.insert(SCHEMA_KEY, SCHEMA_VERSION.to_be_bytes().as_slice())
                        .map_err(|e| self.err(e))?;
                }
            }
            Some(None) => {
                return Err(Error::Corrupt {
                    path: self.inner.path.clone(),
                    detail: "schema_version is not a 4-byte number".to_owned(),
                })
            }
        }
        changes::note_feed_mode(self, &txn, self.inner.opts.change_feed)?;
        self.commit(txn)?;
        // Seen event ids the last process logged but did not move into `seen_events` before
        // it stopped (a crash): moved now, so every lookup of this process finds them there.
        let moved = self.merge_seen_log()?;
        if moved > 0 {
            tracing::info!(ids = moved, "Seen event ids left in the log were merged.");
        }
        Ok(())
    }

    fn check_key(&self, check: Option<&[u8]>) -> Result<()> {
        let Some(bytes) = check else {
            return Err(Error::Corrupt {
                path: self.inner.path.clone(),
                detail: "the key check record is missing".to_owned(),
            });
        };
        let sealed: Sealed = decode_versioned("meta", bytes)?;
        match self.ring().open(&sealed, &key_check_place()) {
            Ok(p) if p.as_slice() == KEY_CHECK_PLAINTEXT => Ok(()),
            _ => Err(Error::WrongKey {
                store_key: sealed.key_id,
                configured: self
                    .ring()
                    .ids()
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// The key id the store's key check is sealed under (the store's "current" key).
    pub fn store_key_id(&self) -> Result<KeyId> {
        let txn = self.begin_read()?;
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let bytes = meta
            .get(KEY_CHECK)
            .map_err(|e| self.err(e))?
            .map(|v| v.value().to_vec())
            .ok_or_else(|| Error::Corrupt {
                path: self.inner.path.clone(),
                detail: "the key check record is missing".to_owned(),
            })?;
        Ok(decode_versioned::<Sealed>("meta", &bytes)?.key_id)
    }

    /// The schema version stored in the file.
    pub fn schema_version(&self) -> Result<u32> {
        let txn = self.begin_read()?;
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let v = meta.get(SCHEMA_KEY).map_err(|e| self.err(e))?;
        Ok(v.and_then(|v| parse_u32(v.value())).unwrap_or(0))
    }

    /// Reads a named cursor.
    pub fn cursor(&self, name: &str) -> Result<Option<u64>> {
        let txn = self.begin_read()?;
        let t = txn.open_table(tables::CURSORS).map_err(|e| self.err(e))?;
        Ok(t.get(name).map_err(|e| self.err(e))?.map(|v| v.value()))
    }

    /// Writes a named cursor durably.
    pub fn set_cursor(&self, name: &str, value: u64) -> Result<()> {
        let txn = self.begin_write()?;
        {
            let mut t = txn.open_table(tables::CURSORS).map_err(|e| self.err(e))?;
            t.insert(name, value).map_err(|e| self.err(e))?;
        }
        self.commit(txn)
    }

    /// The number of rows in one table as of `txn`.
    fn table_len<K: redb::Key + 'static, V: redb::Value + 'static>(
        &self,
        txn: &redb::ReadTransaction,
        def: redb::TableDefinition<'_, K, V>,
    ) -> Result<u64> {
        txn.open_table(def)
            .map_err(|e| self.err(e))?
            .len()
            .map_err(|e| self.err(e))
    }

    /// Row counts of the main tables: (sessions, tokens, users, seen events). Seen events are
    /// the ids moved into their table: all of them in a store just opened (opening moves what
    /// a crash left in the log), not the ones a running dispatcher has logged since its last
    /// move (`seen_log_len` counts those).
    pub fn counts(&self) -> Result<StoreCounts> {
        let txn = self.begin_read()?;
        Ok(StoreCounts {
            sessions: self.table_len(&txn, tables::SESSIONS)?,
            tokens: self.table_len(&txn, tables::TOKENS)?,
            users: self.table_len(&txn, tables::USERS)?,
            seen_events: self.table_len(&txn, tables::SEEN_EVENTS)?,
        })
    }
}

/// How many records each table holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreCounts {
    /// Auth sessions.
    pub sessions: u64,
    /// User tokens.
    pub tokens: u64,
    /// Users.
    pub users: u64,
    /// Seen event ids.
    pub seen_events: u64,
}

fn parse_u32(b: &[u8]) -> Option<u32> {
    <[u8; 4]>::try_from(b).ok().map(u32::from_be_bytes)
}

fn decode_versioned<T: serde::de::DeserializeOwned>(
    table: &'static str,
    bytes: &[u8],
) -> Result<T> {
    match bytes.split_first() {
        Some((1, rest)) => records::decode(table, rest),
        _ => Err(Error::Decode {
            table,
            detail: "unknown record version".to_owned(),
        }),
    }
}
