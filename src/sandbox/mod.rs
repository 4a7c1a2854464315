//! The built-in imitation of the Feishu/Lark platform, on loopback.
//!
//! It lets a person with no Feishu account try the whole service (`serve --sandbox`), and it is
//! what the integration tests run against. It speaks the platform's real paths, JSON keys,
//! error codes and `pbbp2` frames: app tokens, long-connection discovery and a WebSocket server
//! that pushes events (fragmented on request) and redelivers unacknowledged ones, the OAuth
//! authorize page with a user who approves or rejects, the v2 token endpoint with PKCE and
//! rotating refresh tokens, user info, contact lookup, IM send/patch and delayed card update.
//! A small HTML page at `/` shows each sandbox user's messages and lets a person click.
//!
//! State is in memory. Nothing here is used by the service in production.

mod page;
mod platform;
mod ws;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use platform::SandboxUser;

/// The sandbox app's id.
pub const APP_ID: &str = "cli_a0000000000000aa";
/// The sandbox app's secret.
pub const APP_SECRET: &str = "sandbox-app-secret";

/// How the sandbox behaves.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// Port on 127.0.0.1 (0: any free port).
    pub port: u16,
    /// Redeliver an unacknowledged event after this long.
    pub redeliver_after: Duration,
    /// Lifetime of user access tokens it issues (seconds).
    pub user_token_ttl: u64,
    /// Where the page's "ask to authorize" form posts (the service's admin endpoint).
    pub request_auth_url: Option<String>,
    /// Bearer token for `request_auth_url`.
    pub admin_token: Option<String>,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        Self {
            port: 0,
            redeliver_after: Duration::from_secs(5),
            user_token_ttl: 7200,
            request_auth_url: None,
            admin_token: None,
        }
    }
}

/// One message the app sent, as a user's client would show it.
#[derive(Debug, Clone)]
pub struct SentMessage {
    /// `om_…` id.
    pub message_id: String,
    /// The receiver id as sent.
    pub receive_id: String,
    /// `open_id`, `user_id`, …
    pub receive_id_type: String,
    /// `interactive`, `text`, `post`.
    pub msg_type: String,
    /// Current content (the card JSON for `interactive`).
    pub content: Value,
    /// Earlier contents, oldest first (each PATCH or callback update pushes one).
    pub history: Vec<Value>,
}

/// An ACK the client sent for a pushed event.
#[derive(Debug, Clone)]
pub struct AckRecord {
    /// The frame's `message_id` header.
    pub message_id: String,
    /// `code` of the ACK payload.
    pub code: i64,
    /// Decoded `data` (card callback response), if any.
    pub data: Option<Value>,
    /// `biz_rt` header.
    pub biz_rt: Option<String>,
}

/// How to push an event.
#[derive(Debug, Clone, Copy, Default)]
pub struct PushOpts {
    /// Split the payload into this many fragments (0 or 1: not split).
    pub fragments: u32,
    /// Send the fragments in reverse order.
    pub out_of_order: bool,
    /// Send the whole message twice.
    pub duplicate: bool,
}

pub(crate) struct Pending {
    pub frames: Vec<Vec<u8>>,
    pub pushed_at: std::time::Instant,
    pub deliveries: u32,
    /// For card actions: the message whose card a callback response replaces.
    pub card_message: Option<String>,
}

#[derive(Default)]
pub(crate) struct Inner {
    pub users: Vec<SandboxUser>,
    pub tenant_tokens: Vec<String>,
    pub codes: HashMap<String, platform::CodeGrant>,
    pub access: HashMap<String, (String, std::time::Instant)>,
    pub refresh: HashMap<String, String>,
    pub messages: Vec<SentMessage>,
    pub pending: HashMap<String, Pending>,
    pub acks: Vec<AckRecord>,
    pub hits: HashMap<&'static str, u64>,
    pub fail_next: HashMap<&'static str, (u16, u32)>,
    pub discovery_error: Option<i64>,
    pub stall_pongs: bool,
    pub next_id: u64,
    pub page_notes: Vec<String>,
}

pub(crate) struct Shared {
    pub inner: Mutex<Inner>,
    pub clients: Mutex<Vec<mpsc::UnboundedSender<ws::Out>>>,
    pub opts: SandboxOptions,
    pub addr: SocketAddr,
    pub http: reqwest::Client,
}

impl Shared {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn next_id(&self, prefix: &str) -> String {
        let mut g = self.lock();
        g.next_id += 1;
        format!("{prefix}{:016x}{:08x}", rand::random::<u64>(), g.next_id)
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A running sandbox. Dropping it stops the server.
pub struct Sandbox {
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("addr", &self.shared.addr)
            .finish()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Why the sandbox could not start or a control call failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Binding the port failed.
    #[error("sandbox: cannot bind 127.0.0.1:{port}: {source}")]
    Bind {
        /// Port asked for.
        port: u16,
        /// Cause.
        source: std::io::Error,
    },
    /// A control call could not be carried out.
    #[error("sandbox: {0}")]
    Control(String),
}

impl Sandbox {
    /// Starts the sandbox on 127.0.0.1.
    pub async fn start(opts: SandboxOptions) -> Result<Self, SandboxError> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", opts.port))
            .await
            .map_err(|source| SandboxError::Bind {
                port: opts.port,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| SandboxError::Bind {
            port: opts.port,
            source,
        })?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                users: platform::default_users(),
                ..Inner::default()
            }),
            clients: Mutex::new(Vec::new()),
            opts,
            addr,
            http: reqwest::Client::new(),
        });
        let cancel = CancellationToken::new();
        let app = platform::router(shared.clone())
            .merge(page::router(shared.clone()))
            .merge(ws::router(shared.clone()));
        let c = cancel.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { c.cancelled().await })
                .await;
        });
        tokio::spawn(ws::redeliver_loop(shared.clone(), cancel.clone()));
        Ok(Self { shared, cancel })
    }

    /// The base URL to configure as the service's `LARK_DOMAIN`.
    #[must_use]
    pub fn base_url(&self) -> String {
        self.shared.base_url()
    }

    /// The sandbox users.
    #[must_use]
    pub fn users(&self) -> Vec<SandboxUser> {
        self.shared.lock().users.clone()
    }

    /// Messages sent to the user with this open_id (by open_id, user_id or union_id).
    #[must_use]
    pub fn messages_for(&self, open_id: &str) -> Vec<SentMessage> {
        platform::messages_for(&self.shared, open_id)
    }

    /// Every message sent.
    #[must_use]
    pub fn messages(&self) -> Vec<SentMessage> {
        self.shared.lock().messages.clone()
    }

    /// What the browser does when `as_open_id` approves on the authorize page at `url`:
    /// returns the redirect URL (with `code` and `state`).
    pub fn approve(&self, authorize_url: &str, as_open_id: &str) -> Result<String, SandboxError> {
        platform::decide(&self.shared, authorize_url, as_open_id, true)
    }

    /// Like [`Sandbox::approve`], but the user declines (`error=access_denied`).
    pub fn reject(&self, authorize_url: &str, as_open_id: &str) -> Result<String, SandboxError> {
        platform::decide(&self.shared, authorize_url, as_open_id, false)
    }

    /// Pushes an event over every open long connection. Returns the frame `message_id`.
    pub fn push_event(
        &self,
        event_type: &str,
        event: Value,
        opts: PushOpts,
    ) -> Result<String, SandboxError> {
        ws::push_event(&self.shared, event_type, event, opts)
    }

    /// The user clicks a callback button on a message: sends `card.action.trigger`.
    pub fn click_card_button(
        &self,
        message_id: &str,
        operator_open_id: &str,
        value: Value,
    ) -> Result<String, SandboxError> {
        ws::click(&self.shared, message_id, operator_open_id, value)
    }

    /// ACKs received so far.
    #[must_use]
    pub fn acks(&self) -> Vec<AckRecord> {
        self.shared.lock().acks.clone()
    }

    /// Pushed events not yet acknowledged.
    #[must_use]
    pub fn unacked(&self) -> usize {
        self.shared.lock().pending.len()
    }

    /// How often each endpoint group was hit (`tenant_token`, `ws_endpoint`, `oauth_token`, …).
    #[must_use]
    pub fn hits(&self, group: &str) -> u64 {
        self.shared.lock().hits.get(group).copied().unwrap_or(0)
    }

    /// Open long connections.
    #[must_use]
    pub fn connections(&self) -> usize {
        let mut c = self
            .shared
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        c.retain(|tx| !tx.is_closed());
        c.len()
    }

    /// Closes every long connection without a close frame.
    pub fn close_ws_abruptly(&self) {
        ws::broadcast(&self.shared, ws::Out::Drop);
    }

    /// Sends bytes that are not a frame on every long connection.
    pub fn send_garbage_frame(&self) {
        ws::broadcast(
            &self.shared,
            ws::Out::Bytes(vec![0xff, 0x01, 0x02, 0x8f, 0x00]),
        );
    }

    /// Stops (or resumes) answering pings.
    pub fn stall_pongs(&self, stall: bool) {
        self.shared.lock().stall_pongs = stall;
    }

    /// The next `n` calls to an endpoint group fail with HTTP `status`.
    pub fn fail_next(&self, group: &'static str, status: u16, n: u32) {
        self.shared.lock().fail_next.insert(group, (status, n));
    }

    /// Discovery answers with this business code from now on (`None`: normal).
    pub fn set_discovery_error(&self, code: Option<i64>) {
        self.shared.lock().discovery_error = code;
    }

    /// Stops the server.
    pub fn stop(&self) {
        self.cancel.cancel();
    }
}
