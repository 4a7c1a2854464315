//! The connection task: discovery, dial, ping/pong, read loop, ACKs, reconnect.
//!
//! This is the I/O shell around the pure cores (`protocol`, `reassembly`, `reconnect`). The
//! read loop takes the frames already received (up to [`READ_BURST`]) one after the other,
//! hands each complete event to the [`Dispatcher`] and polls it once: an event answered then
//! (a fast handler, a duplicate) costs no task, channel or thread hop, and the ACKs of the
//! burst go out in one write. An event that must wait (a claim in a shared store, a slow
//! handler) joins the session's pending answers, which the session loop polls beside the
//! socket: when a claim batch's answer wakes a few dozen of them, the loop is woken once and
//! their ACKs go out in one write (no task, channel or thread hop per event), and a slow
//! handler never holds the read loop or other ACKs. Answers still pending when the session
//! ends finish on a task on the supervisor's tracker (their ACKs then have no socket: the
//! platform redelivers those events).
//!
//! The task never stops for good on its own: an outage longer than the retry limit is
//! reported as [`ConnState::Degraded`] while redialing goes on at the capped backoff, and
//! credentials the platform refuses pause dialing ([`ConnState::CredentialsRejected`]) until
//! the credential retry timer fires or [`LongConn::reload_credentials`] is called.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::protocol::{
    into_ack, ping_frame, AckResponse, ClientConfig, ConnParams, Frame, FrameKind,
};
use super::reassembly::{Pushed, Reassembler, ReassemblyLimits};
use super::reconnect::{
    classify_handshake, parse_discovery_response, Decision, DiscoveryRequest, FailureClass,
    Reconnect, ReconnectPolicy, DISCOVERY_PATH,
};
use crate::callbacks::parse_event_bytes;
use crate::events::{Dispatcher, EventSource, HandlerReply, Outcome};
use crate::metrics;

/// At most this many ACKs go out in one write.
const ACK_BATCH: usize = 64;
/// Messages already received that are read and handled in one go before the ACKs they
/// produced are written (in one write). Bounds how long the first of them waits for its ACK.
const READ_BURST: usize = 32;

/// Settings of the long connection.
#[derive(Clone)]
pub struct LongConnConfig {
    /// OpenAPI base URL (discovery is `{base}/callback/ws/endpoint`).
    pub base_url: String,
    /// App id.
    pub app_id: String,
    /// App secret.
    pub app_secret: SecretString,
    /// Reconnect policy (our side).
    pub policy: ReconnectPolicy,
    /// Ping interval until the server sends its own.
    pub heartbeat: Duration,
    /// Fragment reassembly limits.
    pub reassembly: ReassemblyLimits,
    /// Trust and proxy (shared with the OpenAPI client).
    pub net: crate::net::Net,
    /// While the platform refuses the credentials, dial again this often (and at once on
    /// [`LongConn::reload_credentials`]).
    pub credential_retry: Duration,
}

impl std::fmt::Debug for LongConnConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LongConnConfig")
            .field("base_url", &self.base_url)
            .field("app_id", &self.app_id)
            .finish_non_exhaustive()
    }
}

/// Connection state, published for `/readyz` and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    /// Not connected yet, or reconnecting.
    Connecting,
    /// Connected.
    Up,
    /// More failures in a row than the retry limit; still redialing at the capped backoff.
    /// The last failure.
    Degraded(String),
    /// The platform refuses the credentials; dialing is paused until the credential retry
    /// timer or a reload. The refusal.
    CredentialsRejected(String),
}

impl ConnState {
    /// One word for the state, safe to show anyone (no internal error text).
    #[must_use]
    pub fn word(&self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Up => "up",
            Self::Degraded(_) => "degraded",
            Self::CredentialsRejected(_) => "credentials_rejected",
        }
    }
}

/// Why a connection attempt failed (what the run loop logs and keeps as the reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LongConnError {
    /// The platform refused us in a way fast retries cannot fix (bad credentials, banned
    /// app…).
    #[error("credentials refused: {0}")]
    Fatal(String),
    /// A transient failure; the backoff schedule retries it.
    #[error("{0}")]
    Retry(String),
}

/// The app credentials the connection dials with (replaceable on reload).
struct Credentials {
    app_id: String,
    app_secret: SecretString,
}

/// The long connection.
pub struct LongConn {
    cfg: LongConnConfig,
    http: reqwest::Client,
    dispatcher: Dispatcher,
    state: watch::Sender<ConnState>,
    creds: RwLock<Credentials>,
    /// Bumped by [`LongConn::reload_credentials`]; waits end early when it changes.
    reloads: watch::Sender<u64>,
}

impl std::fmt::Debug for LongConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LongConn")
            .field("cfg", &self.cfg)
            .field("state", &*self.state.borrow())
            .finish_non_exhaustive()
    }
}

/// Sets the state back to `Connecting` when the run loop ends in any way (cancel, panic), so
/// a dead task never shows as up.
struct StateGuard<'a>(&'a LongConn);

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        self.0.set_state(ConnState::Connecting);
    }
}

enum SessionEnd {
    Cancelled,
    Dropped(String),
}

type AttemptError = LongConnError;

impl LongConn {
    /// A connection that hands events to `dispatcher`.
    #[must_use]
    pub fn new(cfg: LongConnConfig, dispatcher: Dispatcher) -> Self {
        let http = cfg
            .net
            .http_client_builder()
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap_or_default();
        let (state, _) = watch::channel(ConnState::Connecting);
        let creds = RwLock::new(Credentials {
            app_id: cfg.app_id.clone(),
            app_secret: cfg.app_secret.clone(),
        });
        Self {
            cfg,
            http,
            dispatcher,
            state,
            creds,
            reloads: watch::Sender::new(0),
        }
    }

    /// Replaces the credentials the next dial uses and redials now if the connection is
    /// waiting (backoff or a credential pause). An established connection is kept.
    pub fn reload_credentials(&self, app_id: String, app_secret: SecretString) {
        {
            let mut c = self
                .creds
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            c.app_id = app_id;
            c.app_secret = app_secret;
        }
        self.reloads.send_modify(|g| *g = g.wrapping_add(1));
    }

    fn credentials(&self) -> (String, SecretString) {
        let c = self
            .creds
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (c.app_id.clone(), c.app_secret.clone())
    }

    /// Subscribe to state changes.
    #[must_use]
    pub fn state(&self) -> watch::Receiver<ConnState> {
        self.state.subscribe()
    }

    fn set_state(&self, s: ConnState) {
        let m = metrics::get();
        let label = metrics::AppLabel {
            app_id: self.cfg.app_id.clone(),
        };
        m.ws_connection_status
            .get_or_create(&label)
            .set(i64::from(s == ConnState::Up));
        m.ws_degraded
            .get_or_create(&label)
            .set(i64::from(matches!(s, ConnState::Degraded(_))));
        m.ws_credentials_rejected
            .get_or_create(&label)
            .set(i64::from(matches!(s, ConnState::CredentialsRejected(_))));
        self.state.send_replace(s);
    }

    /// `websocket_reconnect_total{app_id, outcome}`.
    fn count_reconnect(&self, outcome: &'static str) {
        metrics::get()
            .ws_reconnect
            .get_or_create(&metrics::AppOutcomeLabel::new(&self.cfg.app_id, outcome))
            .inc();
    }

    /// Runs until cancelled. Outages and refused credentials never end it (see the module
    /// doc); run it under the worker supervisor so a panic restarts it.
    pub async fn run(&self, cancel: CancellationToken) {
        let _guard = StateGuard(self);
        self.set_state(ConnState::Connecting);
        let mut reconnect = Reconnect::new(self.cfg.policy);
        let mut server = ClientConfig {
            ping_interval: self.cfg.heartbeat,
            ..ClientConfig::default()
        }
        .clamped();
        let mut reloads = self.reloads.subscribe();
        reloads.borrow_and_update();
        let mut first = true;
        // Dial without a backoff wait (after a credential pause, which was the wait).
        let mut immediate = false;
        let mut last_failure = String::new();
        // Every dial after the first one of this run is a reconnect.
        let mut redial = false;
        loop {
            if !immediate {
                let decision = reconnect.next_attempt(&server, &mut || rand::random::<f64>());
                if let Decision::Degraded { retries, .. } = decision {
                    if !matches!(*self.state.borrow(), ConnState::Degraded(_)) {
                        warn!(
                            retries,
                            reason = %last_failure,
                            "The long connection is degraded: more failures in a row than the retry limit. Still redialing."
                        );
                    }
                    self.set_state(ConnState::Degraded(last_failure.clone()));
                }
                let d = decision.wait();
                if !first {
                    metrics::get().ws_reconnects.inc();
                    info!(
                        wait_ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
                        "Reconnecting to the long connection."
                    );
                }
                first = false;
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(d) => {}
                    _ = reloads.changed() => info!("Configuration reloaded; redialing now."),
                }
            }
            immediate = false;
            if redial {
                self.count_reconnect("attempt");
            }
            let dialed = self.connect(&mut server).await;
            if redial {
                self.count_reconnect(if dialed.is_ok() { "success" } else { "failure" });
            }
            redial = true;
            let ws = match dialed {
                Ok(ws) => ws,
                Err(LongConnError::Retry(why)) => {
                    warn!(reason = %why, "Long connection attempt failed; will retry.");
                    if matches!(*self.state.borrow(), ConnState::CredentialsRejected(_)) {
                        self.set_state(ConnState::Connecting);
                    }
                    last_failure = why;
                    continue;
                }
                Err(LongConnError::Fatal(why)) => {
                    let pause = self.cfg.credential_retry;
                    warn!(
                        reason = %why,
                        retry_in_s = pause.as_secs(),
                        "The platform refuses the app credentials; the long connection pauses (reload the configuration with SIGHUP to retry now)."
                    );
                    self.set_state(ConnState::CredentialsRejected(why.clone()));
                    last_failure = why;
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(pause) => {}
                        _ = reloads.changed() => info!("Configuration reloaded; redialing now."),
                    }
                    immediate = true;
                    continue;
                }
            };
            let (socket, params) = ws;
            reconnect.on_connected(std::time::Instant::now());
            reloads.borrow_and_update();
            if matches!(*self.state.borrow(), ConnState::Degraded(_)) {
                info!("The long connection is back after a degraded period.");
            }
            self.set_state(ConnState::Up);
            let conn_id = params.device_id.clone().unwrap_or_default();
            let span = tracing::info_span!("connection", conn_id = %conn_id);
            let end = self
                .session(socket, &params, &mut server, &cancel)
                .instrument(span)
                .await;
            reconnect.on_disconnected(std::time::Instant::now());
            match end {
                SessionEnd::Cancelled => return,
                SessionEnd::Dropped(why) => {
                    warn!(reason = %why, "Long connection dropped.");
                    self.set_state(ConnState::Connecting);
                    last_failure = why;
                }
            }
        }
    }

    /// Discovery + dial.
    async fn connect(
        &self,
        server: &mut ClientConfig,
    ) -> Result<
        (
            tokio_tungstenite::WebSocketStream<
                tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
            >,
            ConnParams,
        ),
        AttemptError,
    > {
        let url = format!(
            "{}{DISCOVERY_PATH}",
            self.cfg.base_url.trim_end_matches('/')
        );
        let (app_id, app_secret) = self.credentials();
        let body = DiscoveryRequest {
            app_id: &app_id,
            app_secret: app_secret.expose_secret(),
        };
        let started = std::time::Instant::now();
        let resp = self
            .http
            .post(&url)
            .header("locale", "zh")
            .json(&body)
            .send()
            .await;
        let api = |outcome| metrics::ApiLabel {
            endpoint: "ws_endpoint",
            outcome,
        };
        let m = metrics::get();
        m.lark_api_duration
            .get_or_create(&metrics::EndpointLabel {
                endpoint: "ws_endpoint",
            })
            .observe(started.elapsed().as_secs_f64());
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                m.lark_api_requests
                    .get_or_create(&api("transport_error"))
                    .inc();
                return Err(AttemptError::Retry(format!(
                    "endpoint discovery: {}",
                    crate::net::describe_http_error(&e)
                )));
            }
        };
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap_or_default();
        let endpoint = match parse_discovery_response(status, &bytes) {
            Ok(ep) => {
                m.lark_api_requests.get_or_create(&api("success")).inc();
                ep
            }
            Err(e) => {
                m.lark_api_requests.get_or_create(&api("api_error")).inc();
                return Err(match e.class {
                    FailureClass::Fatal => AttemptError::Fatal(e.to_string()),
                    FailureClass::Retry => AttemptError::Retry(e.to_string()),
                });
            }
        };
        server.apply(&endpoint.config);
        let params = ConnParams::from_url(&endpoint.url)
            .map_err(|e| AttemptError::Retry(format!("discovered URL: {e}")))?;
        // TLS with the shared trust, through the proxy when one applies; Nagle off (ACKs are
        // small and must leave at once: the 3 s window is the platform's).
        match crate::net::dial_websocket(&self.cfg.net, endpoint.url.as_str()).await {
            Ok((ws, _)) => Ok((ws, params)),
            Err(crate::net::DialError::Handshake(e)) => match *e {
                tokio_tungstenite::tungstenite::Error::Http(resp) => {
                    let status = resp.status().as_u16();
                    let h = resp.headers().clone();
                    let rej = classify_handshake(status, |name| {
                        h.get(name).and_then(|v| v.to_str().ok())
                    });
                    Err(match rej.class {
                        FailureClass::Fatal => AttemptError::Fatal(rej.to_string()),
                        FailureClass::Retry => AttemptError::Retry(rej.to_string()),
                    })
                }
                other => Err(AttemptError::Retry(format!("websocket handshake: {other}"))),
            },
            Err(e) => Err(AttemptError::Retry(format!("websocket dial: {e}"))),
        }
    }

    /// One connected session: returns when the socket ends or on cancel.
    async fn session(
        &self,
        socket: tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        params: &ConnParams,
        server: &mut ClientConfig,
        cancel: &CancellationToken,
    ) -> SessionEnd {
        let mut s = Session {
            reasm: Reassembler::new(self.cfg.reassembly),
            last_heard: Instant::now(),
            next_ping: Instant::now(),
            ready: Vec::with_capacity(READ_BURST),
            pending: FuturesUnordered::new(),
            frames: FrameCounters::new(),
        };
        info!("Long connection established.");
        let end = self
            .session_loop(socket, &mut s, params, server, cancel)
            .await;
        if !s.pending.is_empty() {
            // Their handlers and records still run to the end (shutdown waits for them); their
            // ACKs have no socket any more.
            let mut pending = std::mem::take(&mut s.pending);
            self.dispatcher
                .spawn(async move { while pending.next().await.is_some() {} });
        }
        end
    }

    /// The loop of [`Self::session`]: returns when the socket ends or on cancel.
    async fn session_loop(
        &self,
        socket: tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        s: &mut Session,
        params: &ConnParams,
        server: &mut ClientConfig,
        cancel: &CancellationToken,
    ) -> SessionEnd {
        let (mut sink, mut stream) = socket.split();
        let ack_duration = metrics::get().event_ack_duration.clone();
        loop {
            // Liveness: nothing heard for two ping intervals (plus slack) means a dead link.
            let dead_at = s.last_heard + server.ping_interval * 2 + Duration::from_secs(5);
            tokio::select! {
                () = cancel.cancelled() => {
                    let _ = sink.send(Message::Close(None)).await;
                    return SessionEnd::Cancelled;
                }
                () = tokio::time::sleep_until(s.next_ping) => {
                    let ping = ping_frame(params.service_id).to_bytes();
                    if let Err(e) = sink.send(Message::Binary(ping.into())).await {
                        return SessionEnd::Dropped(format!("sending ping: {e}"));
                    }
                    s.next_ping = Instant::now() + server.ping_interval;
                }
                () = tokio::time::sleep_until(dead_at) => {
                    return SessionEnd::Dropped("no pong or frame within two ping intervals".to_owned());
                }
                Some(first) = s.pending.next(), if !s.pending.is_empty() => {
                    // Answers that had to wait: every one ready now goes out in one write.
                    s.ready.extend(first);
                    while s.ready.len() < ACK_BATCH {
                        match futures_util::FutureExt::now_or_never(s.pending.next()) {
                            Some(Some(next)) => s.ready.extend(next),
                            _ => break,
                        }
                    }
                    if let Err(e) = write_acks(&mut sink, &mut s.ready, &ack_duration).await {
                        return SessionEnd::Dropped(format!("sending ACK: {e}"));
                    }
                }
                msg = stream.next() => {
                    // This message, then those already received (up to a burst), each handled
                    // at once; the ACKs they produced go out together in one write.
                    let mut next = Some(msg);
                    let mut read = 0;
                    let mut end = None;
                    while let Some(msg) = next.take() {
                        read += 1;
                        if let Err(e) = self.on_message(msg, s, server) {
                            end = Some(e);
                            break;
                        }
                        if read < READ_BURST {
                            next = futures_util::FutureExt::now_or_never(stream.next());
                        }
                    }
                    if let Err(e) = write_acks(&mut sink, &mut s.ready, &ack_duration).await {
                        return SessionEnd::Dropped(format!("sending ACK: {e}"));
                    }
                    if let Some(end) = end {
                        return end;
                    }
                }
            }
        }
    }

    /// Handles one message read from the socket; `Err` ends the session.
    fn on_message(
        &self,
        msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
        s: &mut Session,
        server: &mut ClientConfig,
    ) -> Result<(), SessionEnd> {
        let Some(msg) = msg else {
            return Err(SessionEnd::Dropped("server closed the stream".to_owned()));
        };
        let msg = msg.map_err(|e| SessionEnd::Dropped(format!("read: {e}")))?;
        s.last_heard = Instant::now();
        #[cfg(feature = "fault-injection")]
        #[allow(clippy::panic, reason = "the test-only fault is a panic on purpose")]
        if fault::take(&self.cfg.base_url) {
            panic!("injected fault: the connection task panics");
        }
        let bytes = match msg {
            Message::Binary(b) => b,
            Message::Close(_) => return Err(SessionEnd::Dropped("server sent close".to_owned())),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Ok(()),
            Message::Text(_) => {
                debug!("Ignoring a text message.");
                return Ok(());
            }
        };
        let mut frame = match Frame::decode_strict(&bytes) {
            Ok(f) => f,
            Err(e) => {
                s.frames.other.inc();
                warn!(error = %e, "Ignoring an undecodable frame.");
                return Ok(());
            }
        };
        match frame.kind() {
            FrameKind::Pong => {
                s.frames.pong.inc();
                if let Ok(patch) = super::protocol::parse_pong_config(frame.payload_bytes()) {
                    if !patch.is_empty() {
                        server.apply(&patch);
                        s.next_ping = s.next_ping.min(Instant::now() + server.ping_interval);
                    }
                }
            }
            FrameKind::Ping => {
                s.frames.ping.inc();
            }
            FrameKind::Card => {
                s.frames.card.inc();
                debug!("Ignoring a legacy card frame (the SDKs do not ACK it).");
            }
            FrameKind::Unknown => {
                s.frames.other.inc();
            }
            FrameKind::Event => {
                s.frames.event.inc();
                let received = Instant::now();
                match s.reasm.take_frame(&mut frame, std::time::Instant::now()) {
                    Ok(Pushed::Complete(payload)) => {
                        // The ACK echoes the frame's headers, not its payload.
                        frame.payload = None;
                        self.dispatch(frame, payload, received, s);
                    }
                    Ok(Pushed::Pending { .. } | Pushed::Duplicate) => {}
                    Err(e) => warn!(error = %e, "Dropping a bad fragment."),
                }
                for id in s.reasm.expire(std::time::Instant::now()) {
                    warn!(message_id = %id, "Dropped an incomplete fragmented message.");
                }
            }
        }
        Ok(())
    }

    /// Hands a complete event to the dispatcher. Most are answered on the first poll (a fast
    /// handler, a duplicate): their ACK joins the session's ready ACKs, with no task, channel or
    /// thread hop. One that must wait (a claim in a shared store, a slow handler) joins the
    /// session's pending answers.
    fn dispatch(&self, frame: Frame, payload: Vec<u8>, received: Instant, s: &mut Session) {
        let mut answer = Box::pin(answer(self.dispatcher.clone(), frame, payload));
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            futures_util::FutureExt::now_or_never(answer.as_mut())
        }));
        match polled {
            Ok(Some(ack)) => s.ready.push((ack, received)),
            Ok(None) => s.pending.push(Box::pin(async move {
                // A panic later on is caught as on the first poll: no ACK, and the session
                // goes on.
                match futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(answer))
                    .await
                {
                    Ok(ack) => Some((ack, received)),
                    Err(_) => {
                        warn!("Dispatching an event panicked; it is not acknowledged.");
                        None
                    }
                }
            })),
            // Not acknowledged: the platform redelivers it.
            Err(_) => warn!("Dispatching an event panicked; it is not acknowledged."),
        }
    }
}

/// A connected session's state, owned by its loop.
struct Session {
    reasm: Reassembler,
    last_heard: Instant,
    next_ping: Instant,
    /// ACKs ready to be written, with when their event was received.
    ready: Vec<(Frame, Instant)>,
    /// Answers that had to wait: each yields its ACK (`None`: the dispatch panicked).
    pending: FuturesUnordered<BoxFuture<'static, Option<(Frame, Instant)>>>,
    frames: FrameCounters,
}

/// `ws_frames_received{kind}`, each label's counter looked up once per connection.
struct FrameCounters {
    event: metrics::CounterHandle,
    pong: metrics::CounterHandle,
    ping: metrics::CounterHandle,
    card: metrics::CounterHandle,
    other: metrics::CounterHandle,
}

impl FrameCounters {
    fn new() -> Self {
        let f = &metrics::get().ws_frames_received;
        let get = |kind| f.get_or_create(&metrics::KindLabel { kind }).clone();
        Self {
            event: get("event"),
            pong: get("pong"),
            ping: get("ping"),
            card: get("card"),
            other: get("other"),
        }
    }
}

/// The ACK of one event: dispatches it and answers with the outcome.
async fn answer(dispatcher: Dispatcher, frame: Frame, payload: Vec<u8>) -> Frame {
    let started = Instant::now();
    let response = match parse_event_bytes(payload.into()) {
        Ok(cb) => match dispatcher.dispatch(cb, EventSource::WebSocket).await {
            Outcome::Handled(HandlerReply::Respond(v)) => {
                AckResponse::OkWithData(serde_json::to_vec(&v).unwrap_or_default())
            }
            Outcome::Handled(HandlerReply::Done) | Outcome::Duplicate | Outcome::Accepted => {
                AckResponse::Ok
            }
            Outcome::Failed => AckResponse::Failed,
        },
        Err(e) => {
            // A payload we cannot read will not improve on redelivery: ACK it.
            warn!(error = %e, "Unreadable event payload acknowledged and dropped.");
            AckResponse::Ok
        }
    };
    into_ack(frame, started.elapsed(), &response)
}

/// Writes the ready ACKs in one write (feed each, flush once) and empties `ready`.
async fn write_acks<S>(
    sink: &mut S,
    ready: &mut Vec<(Frame, Instant)>,
    ack_duration: &metrics::HistogramHandle,
) -> Result<(), S::Error>
where
    S: futures_util::Sink<Message> + Unpin,
{
    if ready.is_empty() {
        return Ok(());
    }
    for (ack, received) in ready.drain(..) {
        sink.feed(Message::Binary(ack.to_bytes().into())).await?;
        ack_duration.observe(received.elapsed().as_secs_f64());
    }
    sink.flush().await
}

/// Shares a connection's state with HTTP handlers.
pub type SharedState = Arc<watch::Receiver<ConnState>>;

/// Test-only fault injection (cargo feature `fault-injection`, enabled only by this crate's
/// dev-dependency on itself): production builds do not contain it.
#[cfg(feature = "fault-injection")]
#[doc(hidden)]
pub mod fault {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    static ARMED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    /// Set once anything was armed: until then a message costs one load, not a lock (the
    /// benchmarks run a binary built with this feature, as `cargo bench` builds it).
    static EVER_ARMED: AtomicBool = AtomicBool::new(false);

    /// The connection task whose base URL starts with `base_url` panics when it next reads a
    /// message from its socket (once).
    pub fn panic_on_next_message(base_url: &str) {
        ARMED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(base_url.to_owned());
        EVER_ARMED.store(true, Ordering::Release);
    }

    /// Whether a panic is armed for `base_url`; disarms it.
    pub(crate) fn take(base_url: &str) -> bool {
        if !EVER_ARMED.load(Ordering::Acquire) {
            return false;
        }
        let mut armed = ARMED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match armed.iter().position(|a| base_url.starts_with(a.as_str())) {
            Some(i) => {
                armed.remove(i);
                true
            }
            None => false,
        }
    }
}
