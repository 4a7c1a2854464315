//! Errors of the store, each saying what happened to which file and what to do.

use std::path::PathBuf;

use super::envelope::KeyId;

/// Everything the store can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another process holds the file.
    #[error("store {path} is locked by {}; stop it or point STORAGE_PATH elsewhere", pid.map_or_else(|| "another process".to_owned(), |p| format!("pid {p}")))]
    Locked {
        /// The store file.
        path: PathBuf,
        /// The holder's pid, when it wrote one.
        pid: Option<u32>,
    },
    /// The file was written by a newer build.
    #[error("store {path} has schema version {found}, newer than this build supports ({supported}); upgrade lark-service or restore a backup")]
    NewerSchema {
        /// The store file.
        path: PathBuf,
        /// Version found in the file.
        found: u32,
        /// Newest version this build knows.
        supported: u32,
    },
    /// The configured keys do not include the key the store was sealed with.
    #[error("token key does not match the store: key id {store_key} (configured: {configured})")]
    WrongKey {
        /// Key id recorded in the store.
        store_key: KeyId,
        /// Key ids configured, comma-separated.
        configured: String,
    },
    /// The file is not a redb store or is damaged.
    #[error(
        "store {path} is damaged or not a lark-service store ({detail}); restore it from a backup"
    )]
    Corrupt {
        /// The store file.
        path: PathBuf,
        /// What the engine said.
        detail: String,
    },
    /// No space left on the device.
    #[error(
        "no space left on the device holding {path}; nothing was written, free space and retry"
    )]
    DiskFull {
        /// The store file.
        path: PathBuf,
    },
    /// Any other I/O error.
    #[error("I/O error on store {path}: {source}")]
    Io {
        /// The store file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A record failed authentication on read.
    #[error("record in table {table} failed to decrypt: {detail}")]
    Decrypt {
        /// Table name.
        table: &'static str,
        /// Why.
        detail: String,
    },
    /// A record's bytes could not be decoded.
    #[error("record in table {table} could not be decoded: {detail}")]
    Decode {
        /// Table name.
        table: &'static str,
        /// Why.
        detail: String,
    },
    /// An argument was not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// Any other engine error.
    #[error("store engine error: {0}")]
    Engine(String),
    /// The PostgreSQL store's database holds a schema newer than this build knows.
    #[error("the PostgreSQL store has schema version {found}, newer than this build supports ({supported}); upgrade lark-service")]
    NewerDatabaseSchema {
        /// Version found in the database.
        found: i32,
        /// Newest version this build knows.
        supported: i32,
    },
    /// The PostgreSQL store's database cannot be reached (retry later); never names a password.
    #[error("the PostgreSQL store is unreachable: {0}")]
    Unavailable(String),
    /// A blocking task died.
    #[error("store worker failed: {0}")]
    Join(String),
}

/// Result with the store's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// True when retrying the same operation later may succeed.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Locked { .. } | Self::DiskFull { .. } | Self::Io { .. } | Self::Unavailable(_)
        )
    }

    pub(crate) fn engine(path: &std::path::Path, e: impl Into<redb::Error>) -> Self {
        let e: redb::Error = e.into();
        match e {
            redb::Error::DatabaseAlreadyOpen => Self::Locked {
                path: path.to_owned(),
                pid: super::read_pid_file(path),
            },
            redb::Error::Io(io) => {
                if io.kind() == std::io::ErrorKind::StorageFull {
                    Self::DiskFull {
                        path: path.to_owned(),
                    }
                } else {
                    Self::Io {
                        path: path.to_owned(),
                        source: io,
                    }
                }
            }
            redb::Error::Corrupted(detail) => Self::Corrupt {
                path: path.to_owned(),
                detail,
            },
            redb::Error::TableTypeMismatch { .. } | redb::Error::UpgradeRequired(_) => {
                Self::Corrupt {
                    path: path.to_owned(),
                    detail: e.to_string(),
                }
            }
            other => Self::Engine(other.to_string()),
        }
    }
}
