//! Request limits of the listeners and of `/mcp`, as settings: defined here so that the
//! configuration depends on no serving module (those import them from here).

use std::time::Duration;

/// Bounds every listener is served with (`http.*` settings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections served at once per listener; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Time a connection has to send a request's headers: from its start, and from the end of
    /// the previous response on a keep-alive connection (so it is also the idle limit).
    pub header_read_timeout: Duration,
    /// Time a request may take (routes that apply `http::serve::with_request_timeout`); also the longest
    /// gap between the frames of a request body.
    pub request_timeout: Duration,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_body_bytes: 1 << 20,
        }
    }
}

/// Request limits of `/mcp` (`mcp.*` settings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct McpLimits {
    /// Requests per minute from one client: one bearer token from one peer address, however
    /// many MCP sessions it opens.
    pub client_per_minute: usize,
    /// Requests per minute from everyone together.
    pub global_per_minute: usize,
}

impl Default for McpLimits {
    fn default() -> Self {
        Self {
            client_per_minute: CLIENT_REQUESTS_PER_MINUTE,
            global_per_minute: GLOBAL_REQUESTS_PER_MINUTE,
        }
    }
}

/// Default requests per minute of one MCP client (bearer token and peer address).
pub const CLIENT_REQUESTS_PER_MINUTE: usize = 600;
/// Default requests per minute to `/mcp` from everyone together.
pub const GLOBAL_REQUESTS_PER_MINUTE: usize = 3000;
