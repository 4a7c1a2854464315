//! The built-in imitation of the Feishu/Lark platform, on loopback.
//!
//! It lets a person with no Feishu account try the whole service (`serve --sandbox`), and it is
//! what the integration tests run against. It speaks the platform's real paths, JSON keys,
//! error codes and `pbbp2` frames: app tokens, long-connection discovery and a WebSocket server
//! that pushes events (fragmented on request) and redelivers unacknowledged ones, the OAuth
//! authorize page with a user who approves or rejects, the v2 token endpoint with PKCE and
//! rotating refresh tokens, user info, contact lookup, IM send/patch and delayed card update,
//! seeded group chats and their members,
//! and a small in-memory aPaaS store (object records, workspace table records).
//! A small HTML page at `/` shows each sandbox user's messages and lets a person click.
//!
//! State is in memory. Nothing here is used by the service in production.

mod apaas;
mod assets;
mod chats;
mod device;
mod device_codes;
mod page;
mod platform;
mod tls;
mod ws;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use chats::{SandboxChat, CODE_CHAT_NOT_FOUND, CODE_NOT_IN_CHAT};
pub use device_codes::{CodePolls, DeviceSettings};
pub use platform::SandboxUser;
pub use ws::PreparedEvent;

/// The sandbox app's id.
pub const APP_ID: &str = "cli_a0000000000000aa";
/// The sandbox app's secret.
pub const APP_SECRET: &str = "sandbox-app-secret";
/// A second app the sandbox knows (several apps in one service): its id.
pub const APP2_ID: &str = "cli_a0000000000000bb";
/// The second app's secret.
pub const APP2_SECRET: &str = "sandbox-app-secret-b";

/// The app `(id, secret)` names, when it is one the sandbox knows.
pub(crate) fn known_app(id: &str, secret: Option<&str>) -> Option<&'static str> {
    [(APP_ID, APP_SECRET), (APP2_ID, APP2_SECRET)]
        .into_iter()
        .find(|(i, s)| *i == id && secret.is_none_or(|x| x == *s))
        .map(|(i, _)| i)
}

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
    /// Bearer token for `request_auth_url` and `service_url`'s admin API.
    pub admin_token: Option<String>,
    /// The base URL of the service's admin listener (`http://127.0.0.1:8081`): the page asks its admin API for each
    /// user's session state and token, and shows how to call it.
    pub service_url: Option<String>,
    /// The file holding `admin_token`, shown on the page instead of the token itself.
    pub admin_token_file: Option<std::path::PathBuf>,
    /// `PingInterval` (seconds) the sandbox tells clients, in discovery and in pongs.
    pub ping_interval: u64,
    /// Users beyond Alice, Bob and Carol (`ou_sandbox_user0000`, …), for load tests.
    pub extra_users: usize,
    /// Serve HTTPS and WSS with a CA generated at start, as the platform serves TLS (the
    /// default); `false`: plain HTTP and `ws://`, for local benchmarks and plain-mode tests.
    pub tls: bool,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        Self {
            port: 0,
            redeliver_after: Duration::from_secs(5),
            user_token_ttl: 7200,
            request_auth_url: None,
            admin_token: None,
            service_url: None,
            admin_token_file: None,
            ping_interval: 30,
            extra_users: 0,
            tls: true,
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
    /// The app that sent it (by its tenant token).
    pub app_id: String,
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
    /// Time from the (latest) push of this message to its ACK; `None` for an ACK of a
    /// message the sandbox did not push or had already seen acknowledged.
    pub since_push: Option<Duration>,
}

/// How an injected failure answers (see [`Sandbox::fail_next`], [`Sandbox::fail_next_code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// This HTTP status with the platform's body for it.
    Status(u16),
    /// HTTP 200 (400 on the OAuth token endpoint) with this business `code`.
    Code(i64),
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
    pub event_type: String,
    /// Encoded once at push; a redelivery or a new connection sends the same bytes (shared,
    /// not copied).
    pub frames: Vec<axum::body::Bytes>,
    pub pushed_at: std::time::Instant,
    pub deliveries: u32,
    /// For card actions: the message whose card a callback response replaces.
    pub card_message: Option<String>,
    /// The app whose long connections it goes to.
    pub app: &'static str,
}

#[derive(Default)]
pub(crate) struct Inner {
    pub users: Vec<SandboxUser>,
    /// Every tenant token issued and still valid.
    pub tenant_tokens: Vec<String>,
    /// The token `tenant_access_token/internal` hands out while it has ≥ 30 min left.
    pub current_tenant: Option<(String, std::time::Instant)>,
    pub codes: HashMap<String, platform::CodeGrant>,
    pub access: HashMap<String, (String, std::time::Instant)>,
    /// Live refresh token → (open_id, scope, the access token issued with it).
    pub refresh: HashMap<String, (String, String, String)>,
    /// Refresh tokens already rotated away (reuse → 20073).
    pub used_refresh: HashSet<String>,
    /// How often a refresh token already rotated away was presented again.
    pub refresh_reuses: u64,
    /// How long an access token keeps working after the refresh that superseded it
    /// (`None`: 60 s, as the platform).
    pub superseded_access_grace: Option<Duration>,
    /// Per group: the next `n` requests are carried out, then answered with this status.
    pub lost_answers: HashMap<&'static str, (u16, u32)>,
    /// Card callback `c-…` tokens → (message, issued, uses left) for delayed updates.
    pub card_tokens: HashMap<String, (String, std::time::Instant, u32)>,
    /// `uuid` of each send → message_id (the platform de-duplicates sends for an hour).
    pub send_uuids: HashMap<String, String>,
    /// Discovery tickets not yet used for a handshake.
    pub tickets: HashSet<String>,
    /// The app each discovery ticket was issued to.
    pub ticket_apps: HashMap<String, &'static str>,
    /// The app each tenant token, user access token and refresh token was issued to.
    pub token_apps: HashMap<String, &'static str>,
    /// The current tenant token of apps other than [`APP_ID`].
    pub other_tenants: HashMap<&'static str, (String, std::time::Instant)>,
    pub messages: Vec<SentMessage>,
    pub pending: HashMap<String, Pending>,
    /// Frame message_id → deliveries so far (kept after the ACK).
    pub deliveries: HashMap<String, u32>,
    pub acks: Vec<AckRecord>,
    pub hits: HashMap<&'static str, u64>,
    pub fail_next: HashMap<&'static str, (Failure, u32)>,
    /// aPaaS object records: (namespace, object) → id → record.
    pub objects: HashMap<(String, String), BTreeMap<u64, Value>>,
    /// aPaaS workspace tables: (workspace, table) → rows.
    pub tables: HashMap<(String, String), Vec<Value>>,
    pub discovery_error: Option<i64>,
    pub stall_pongs: bool,
    /// Requests waiting in a hold, per endpoint group.
    pub held: HashMap<&'static str, u64>,
    /// Frame message_id → header.event_id of every pushed event.
    pub event_ids: HashMap<String, String>,
    pub next_id: u64,
    pub page_notes: Vec<String>,
    /// Users whose user info names another tenant than `sandbox`.
    pub user_tenants: HashMap<String, String>,
    /// open_id → the last session the page's "Ask … to authorize" started for that user.
    pub page_sessions: HashMap<String, String>,
    /// The device authorization grant.
    pub devices: device_codes::Devices,
}

pub(crate) struct Shared {
    pub inner: Mutex<Inner>,
    pub clients: Mutex<Vec<mpsc::UnboundedSender<ws::Out>>>,
    /// The long connections of apps other than [`APP_ID`] (whose are `clients`).
    pub other_clients: Mutex<HashMap<&'static str, Vec<mpsc::UnboundedSender<ws::Out>>>>,
    pub opts: SandboxOptions,
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    /// Endpoint groups whose requests are held (not answered) until released.
    pub holds: tokio::sync::watch::Sender<HashSet<&'static str>>,
    /// The CA of the sandbox's certificate (PEM), when it serves TLS.
    pub ca_pem: Option<String>,
    /// Notified whenever an ACK is recorded (see [`Sandbox::wait_unacked_below`]).
    pub acked: std::sync::Condvar,
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
        let scheme = if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// The long connection's URL prefix. Under TLS it names the host `localhost` (the OpenAPI
    /// base names `127.0.0.1`): two host names, as the platform has (`open.feishu.cn`,
    /// `msg-frontier.feishu.cn`), so a proxy sees a tunnel to each.
    pub fn ws_base(&self) -> String {
        if self.ca_pem.is_some() {
            format!("wss://localhost:{}", self.addr.port())
        } else {
            format!("ws://{}", self.addr)
        }
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
    /// The TLS certificates could not be made.
    #[error("sandbox: {0}")]
    Tls(String),
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
        let tls = if opts.tls {
            Some(tls::generate().map_err(SandboxError::Tls)?)
        } else {
            None
        };
        let ca_pem = tls.as_ref().map(|t| t.ca_pem.clone());
        let shared = Arc::new(Shared {
            ca_pem,
            acked: std::sync::Condvar::new(),
            inner: Mutex::new(Inner {
                users: platform::default_users(opts.extra_users),
                ..Inner::default()
            }),
            clients: Mutex::new(Vec::new()),
            other_clients: Mutex::new(HashMap::new()),
            opts,
            addr,
            http: reqwest::Client::new(),
            holds: tokio::sync::watch::Sender::new(HashSet::new()),
        });
        let cancel = CancellationToken::new();
        let app = platform::router(shared.clone())
            .merge(apaas::router(shared.clone()))
            .merge(chats::router(shared.clone()))
            .merge(page::router(shared.clone()))
            .merge(device::router(shared.clone()))
            .merge(ws::router(shared.clone()));
        let c = cancel.clone();
        match tls {
            Some(t) => {
                let listener = tls::TlsListener::new(listener, t.acceptor, cancel.clone())
                    .map_err(|source| SandboxError::Bind { port: 0, source })?;
                tokio::spawn(async move {
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async move { c.cancelled().await })
                        .await;
                });
            }
            None => {
                tokio::spawn(async move {
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async move { c.cancelled().await })
                        .await;
                });
            }
        }
        tokio::spawn(ws::redeliver_loop(shared.clone(), cancel.clone()));
        Ok(Self { shared, cancel })
    }

    /// The base URL to configure as the service's `LARK_DOMAIN`.
    #[must_use]
    pub fn base_url(&self) -> String {
        self.shared.base_url()
    }

    /// The CA that signed the sandbox's certificate (PEM), for `tls.ca_file`; `None` in plain
    /// mode.
    #[must_use]
    pub fn ca_pem(&self) -> Option<String> {
        self.shared.ca_pem.clone()
    }

    /// The sandbox app's id ([`APP_ID`]).
    #[must_use]
    pub fn app_id(&self) -> &'static str {
        APP_ID
    }

    /// The sandbox app's secret ([`APP_SECRET`]).
    #[must_use]
    pub fn app_secret(&self) -> &'static str {
        APP_SECRET
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
    /// returns the redirect URL (with `code` and `state`). The page's own Approve button
    /// (`POST /sandbox/authorize`) does the same and answers with this URL as `Location`.
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

    /// Pushes an event whose body was serialized once ([`PreparedEvent`]): the same frames as
    /// [`Sandbox::push_event`] with that body, without building JSON per push (benchmarks).
    /// Returns the frame `message_id`.
    pub fn push_prepared(
        &self,
        event_type: &str,
        event: &PreparedEvent,
        opts: PushOpts,
    ) -> Result<String, SandboxError> {
        ws::push_prepared(&self.shared, event_type, event, opts)
    }

    /// Waits until fewer than `n` pushed events are unacknowledged, or `timeout` passes;
    /// returns how many are unacknowledged then. Woken by each ACK (no polling).
    #[must_use]
    pub fn wait_unacked_below(&self, n: usize, timeout: Duration) -> usize {
        let g = self.shared.lock();
        let (g, _) = self
            .shared
            .acked
            .wait_timeout_while(g, timeout, |g| g.pending.len() >= n)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.pending.len()
    }

    /// Pushes an event with a given `event_id`: the platform delivering an event it already
    /// delivered (as it does when it did not take the ACK). Returns the frame `message_id`.
    pub fn push_event_as(
        &self,
        event_id: &str,
        event_type: &str,
        event: Value,
        opts: PushOpts,
    ) -> Result<String, SandboxError> {
        ws::push_event_as(&self.shared, event_id, event_type, event, opts)
    }

    /// The `header.event_id` of the event pushed as frame `message_id` (while unacknowledged,
    /// or any time for events pushed by [`Sandbox::push_event`]).
    #[must_use]
    pub fn event_id_of(&self, message_id: &str) -> Option<String> {
        self.shared.lock().event_ids.get(message_id).cloned()
    }

    /// Pushes an event over the long connections of app `app_id` ([`APP_ID`] or [`APP2_ID`]).
    pub fn push_event_to(
        &self,
        app_id: &str,
        event_type: &str,
        event: Value,
    ) -> Result<String, SandboxError> {
        let app = known_app(app_id, None)
            .ok_or_else(|| SandboxError::Control(format!("no sandbox app {app_id}")))?;
        ws::push_to(&self.shared, app, event_type, event)
    }

    /// Open long connections of app `app_id`.
    #[must_use]
    pub fn connections_of(&self, app_id: &str) -> usize {
        ws::live_clients_of(&self.shared, app_id)
    }

    /// The app a user access token was issued to.
    #[must_use]
    pub fn token_app(&self, access_token: &str) -> Option<&'static str> {
        self.shared.lock().token_apps.get(access_token).copied()
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

    /// How many times the event pushed as frame `message_id` went out (1 + redeliveries).
    #[must_use]
    pub fn deliveries(&self, message_id: &str) -> u32 {
        self.shared
            .lock()
            .deliveries
            .get(message_id)
            .copied()
            .unwrap_or(0)
    }

    /// Sends every unacknowledged event again now, as the redelivery timer would.
    pub fn redeliver_now(&self) {
        ws::redeliver(&self.shared, true);
    }

    /// The open_id a user access token was issued to (any token ever issued, expired or not).
    #[must_use]
    pub fn token_owner(&self, access_token: &str) -> Option<String> {
        self.shared
            .lock()
            .access
            .get(access_token)
            .map(|(o, _)| o.clone())
    }

    /// The open_id a user access token was issued to, while the token is live (issued and
    /// neither expired nor past its grace after a refresh superseded it).
    #[must_use]
    pub fn live_token_owner(&self, access_token: &str) -> Option<String> {
        platform::user_token_owner(&self.shared, access_token).ok()
    }

    /// How often each endpoint group was hit: `tenant_token`, `app_token`, `ws_endpoint`,
    /// `ws_connect`, `ws_ping`, `authorize`, `oauth_token`, `user_info`, `contact`, `im`, `card_update`,
    /// `apaas`.
    #[must_use]
    pub fn hits(&self, group: &str) -> u64 {
        self.shared.lock().hits.get(group).copied().unwrap_or(0)
    }

    /// Every group's hit count.
    #[must_use]
    pub fn hit_counts(&self) -> HashMap<String, u64> {
        self.shared
            .lock()
            .hits
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect()
    }

    /// Invalidates every tenant/app token issued so far: the next API call with one gets
    /// 99991663, as after a platform-side expiry.
    pub fn expire_tenant_tokens(&self) {
        let mut g = self.shared.lock();
        g.tenant_tokens.clear();
        g.current_tenant = None;
    }

    /// Adds aPaaS object records (`namespace`, `object`); returns their ids.
    pub fn seed_records(&self, namespace: &str, object: &str, records: Vec<Value>) -> Vec<String> {
        apaas::seed(&self.shared, namespace, object, records)
    }

    /// The aPaaS object records stored for (`namespace`, `object`), in id order, with `_id`.
    #[must_use]
    pub fn records(&self, namespace: &str, object: &str) -> Vec<Value> {
        apaas::all(&self.shared, namespace, object)
    }

    /// Replaces the rows of a workspace data table (read with a user token, §6.4).
    pub fn seed_table(&self, workspace: &str, table: &str, rows: Vec<Value>) {
        self.shared
            .lock()
            .tables
            .insert((workspace.to_owned(), table.to_owned()), rows);
    }

    /// How the device grant behaves from now on (codes already issued keep theirs).
    pub fn set_device(&self, settings: DeviceSettings) {
        self.shared.lock().devices.settings = settings;
    }

    /// Device code polls answered so far, and how many of them came sooner than the
    /// interval in force (each answered `slow_down`).
    #[must_use]
    pub fn device_polls(&self) -> (u64, u64) {
        let g = self.shared.lock();
        (g.devices.polls, g.devices.too_fast)
    }

    /// What the token endpoint saw of the device code the user sees as `user_code` (polls,
    /// polls sooner than its interval, polls after it was redeemed), `None` for an unknown code.
    #[must_use]
    pub fn device_code_polls(&self, user_code: &str) -> Option<CodePolls> {
        self.shared.lock().devices.code_polls(user_code)
    }

    /// Approves (as `open_id`) or rejects the device code the user sees as `user_code`, as
    /// the verification page does.
    pub fn decide_device(
        &self,
        user_code: &str,
        open_id: &str,
        approve: bool,
    ) -> Result<(), SandboxError> {
        device::decide(&self.shared, user_code, open_id, approve).map_err(SandboxError::Control)
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

    /// Sends these bytes as one binary message on every long connection.
    pub fn send_raw(&self, bytes: Vec<u8>) {
        ws::broadcast(&self.shared, ws::Out::Bytes(bytes.into()));
    }

    /// Sends bytes that are not a frame on every long connection.
    pub fn send_garbage_frame(&self) {
        ws::broadcast(
            &self.shared,
            ws::Out::Bytes(vec![0xff, 0x01, 0x02, 0x8f, 0x00].into()),
        );
    }

    /// Holds every request to an endpoint group without answering until [`Sandbox::release`]:
    /// a platform that hangs. Supported groups: `im` (the message send: held before it is
    /// carried out, so a handler that calls it runs past the ACK deadline) and `oauth_token`
    /// (the grant is carried out at once and only its answer is held, as when the platform
    /// did the work and the response is still on its way: a client that gives up has lost it).
    pub fn hold(&self, group: &'static str) {
        self.shared.holds.send_modify(|h| {
            h.insert(group);
        });
    }

    /// Lets held requests of `group` (and later ones) through.
    pub fn release(&self, group: &'static str) {
        self.shared.holds.send_modify(|h| {
            h.remove(group);
        });
    }

    /// Requests of `group` being held right now.
    #[must_use]
    pub fn held(&self, group: &str) -> u64 {
        self.shared.lock().held.get(group).copied().unwrap_or(0)
    }

    /// From now on, the user info of `open_id` names `tenant_key` (a user of another company;
    /// the sandbox app's own tenant is `sandbox`).
    pub fn set_user_tenant(&self, open_id: &str, tenant_key: &str) {
        self.shared
            .lock()
            .user_tenants
            .insert(open_id.to_owned(), tenant_key.to_owned());
    }

    /// Stops (or resumes) answering pings.
    pub fn stall_pongs(&self, stall: bool) {
        self.shared.lock().stall_pongs = stall;
    }

    /// The next `n` calls to an endpoint group (see [`Sandbox::hits`]) fail with HTTP
    /// `status` and the platform's body for it (429: code 99991400 and
    /// `x-ogw-ratelimit-reset`; the OAuth token endpoint: 20050 / 20072).
    pub fn fail_next(&self, group: &'static str, status: u16, n: u32) {
        self.shared
            .lock()
            .fail_next
            .insert(group, (Failure::Status(status), n));
    }

    /// The next `n` calls to an endpoint group answer with business `code` (HTTP 200, or
    /// 400 with `error` on the OAuth token endpoint), e.g. 99991400 or 1000040343.
    pub fn fail_next_code(&self, group: &'static str, code: i64, n: u32) {
        self.shared
            .lock()
            .fail_next
            .insert(group, (Failure::Code(code), n));
    }

    /// The next `n` requests to `group` are **carried out, then answered** with HTTP `status`
    /// (the platform's body for it): the work is done but its answer is lost, as after a
    /// timeout or a connection dropped once the request was sent. Only `oauth_token` supports
    /// it: the code is used up, or the refresh token rotated, and the new tokens never reach
    /// the client.
    pub fn fail_next_after_processing(&self, group: &'static str, status: u16, n: u32) {
        self.shared.lock().lost_answers.insert(group, (status, n));
    }

    /// How long an access token keeps working after a refresh superseded it (the platform:
    /// about a minute, the default here). Zero: it stops working at once.
    pub fn set_superseded_access_grace(&self, grace: Duration) {
        self.shared.lock().superseded_access_grace = Some(grace);
    }

    /// Whether `refresh_token` is live: issued and not yet rotated away.
    #[must_use]
    pub fn refresh_token_live(&self, refresh_token: &str) -> bool {
        self.shared.lock().refresh.contains_key(refresh_token)
    }

    /// How many times a refresh token that was already used was presented again (each got
    /// 20073).
    #[must_use]
    pub fn refresh_token_reuses(&self) -> u64 {
        self.shared.lock().refresh_reuses
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
