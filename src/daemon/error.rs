//! What can stop the service from starting, one variant per boot step.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::{ConfigError, EX_USAGE};
use crate::storage;

/// Why `serve` (or [`super::run`]) failed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration does not load or lacks what serving needs.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The async runtime did not start.
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// A listener could not be bound.
    #[error("binding the {what} listener on {addr} ({setting}): {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Where.
        addr: SocketAddr,
        /// The settings that choose the address.
        setting: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A bound listener's address could not be read.
    #[error("reading the {what} listener address: {source}")]
    ListenerAddress {
        /// Which listener.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file of `serve --sandbox` (generated secret, sandbox CA) could not be read or written.
    #[error("{action} {}: {source}", path.display())]
    SandboxFile {
        /// What was being done ("reading", "writing the sandbox CA to", …).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A generated secret could not be written (the message names the file).
    #[error("{0}")]
    PrivateFile(#[source] std::io::Error),
    /// A generated secret's file is empty.
    #[error("{} is empty; delete it to generate a new {what}", path.display())]
    EmptySecret {
        /// The file.
        path: PathBuf,
        /// What it should hold.
        what: &'static str,
    },
    /// The sandbox platform did not start.
    #[error("{0}")]
    Sandbox(String),
    /// The store did not open or answer.
    #[error(transparent)]
    Store(#[from] storage::Error),
    /// The task opening the store failed.
    #[error("store open task failed: {0}")]
    StoreTask(#[from] tokio::task::JoinError),
    /// The platform domain is not usable.
    #[error("domain: {0}")]
    Domain(String),
    /// The outgoing network settings (proxy, CAs) are not usable.
    #[error("{0}")]
    Network(String),
    /// The OpenAPI client could not be built.
    #[error("building the Lark client: {0}")]
    LarkClient(String),
    /// The backup schedule is not usable.
    #[error("backup.schedule: {0}")]
    BackupSchedule(#[from] crate::schedule::ScheduleError),
    /// A backup schedule without a directory.
    #[error("backup.schedule is set but backup.dir is not")]
    BackupDir,
    /// Neither the configuration nor the app registry names an app to serve.
    #[error("no app to serve: set APP_ID and APP_SECRET (LARK_APP_ID / LARK_APP_SECRET), or add one with `lark-service app add` (see `lark-service app list`){refused}")]
    NoApp {
        /// Registry apps that are active but cannot be served, and why.
        refused: String,
    },
}

impl DaemonError {
    /// sysexits-style exit code: 64 for configuration, the store's own codes (75 temporary,
    /// 65 data), 1 otherwise.
    #[must_use]
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) | Self::NoApp { .. } => EX_USAGE,
            Self::Store(e) => store_exit_code(e),
            _ => 1,
        }
    }
}

/// The exit code for a store error: 75 when trying again may work (locked, disk full), 64
/// for a bad request, 65 otherwise.
#[must_use]
pub fn store_exit_code(e: &storage::Error) -> i32 {
    if e.is_transient() {
        75
    } else if matches!(e, storage::Error::Invalid(_)) {
        EX_USAGE
    } else {
        65
    }
}
