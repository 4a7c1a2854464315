//! Logging setup: `tracing` to stderr, human or JSON lines, level from `LOG_LEVEL`.
//!
//! Under systemd (`JOURNAL_STREAM` set) timestamps are left to the journal.

use tracing_subscriber::EnvFilter;

use crate::config::LogConfig;

/// Directives appended to every filter, whatever `LOG_LEVEL` says: targets whose most verbose
/// output carries secrets. tungstenite logs the whole handshake request at trace, and its URL
/// holds the long connection's `ticket` and `access_key`.
const SECRET_SAFE: &str = "tungstenite::handshake=debug";

/// Installs the global subscriber. Safe to call once; later calls are ignored.
pub fn init(log: &LogConfig) {
    let filter = EnvFilter::try_new(format!("{},{SECRET_SAFE}", log.level))
        .unwrap_or_else(|_| EnvFilter::new(format!("info,{SECRET_SAFE}")));
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = if log.json {
        builder.json().flatten_event(true).try_init()
    } else if journald {
        builder.without_time().with_ansi(false).try_init()
    } else {
        builder.try_init()
    };
}
