//! The connection task: discovery, dial, ping/pong, read loop, ACKs, reconnect.
//!
//! This is the I/O shell around the pure cores (`protocol`, `reassembly`, `reconnect`). Each
//! event frame is handed to the [`Dispatcher`] on its own task; ACKs come back through a
//! channel, so a slow handler never holds the read loop or other ACKs.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::protocol::{
    build_ack, ping_frame, AckResponse, ClientConfig, ConnParams, Frame, FrameKind,
};
use super::reassembly::{Pushed, Reassembler, ReassemblyLimits};
use super::reconnect::{
    classify_handshake, parse_discovery_response, Decision, DiscoveryRequest, FailureClass,
    Reconnect, ReconnectPolicy, DISCOVERY_PATH,
};
use crate::callbacks::parse_event_payload;
use crate::events::{Dispatcher, EventSource, HandlerReply, Outcome};
use crate::metrics;

/// At most this many ACKs go out in one write.
const ACK_BATCH: usize = 64;

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
}

impl std::fmt::Debug for LongConnConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LongConnConfig")
            .field("base_url", &self.base_url)
            .field("app_id", &self.app_id)
            .finish_non_exhaustive()
    }
}

/// Connection state, published for `/readyz` and the fallback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    /// Not connected yet, or reconnecting.
    Connecting,
    /// Connected.
    Up,
    /// Stopped for good (fatal error or retries exhausted); the reason.
    Stopped(String),
}

/// Why the connection task stopped.
#[derive(Debug, thiserror::Error)]
pub enum LongConnError {
    /// The platform refused us in a way retrying cannot fix (bad credentials, banned app…).
    #[error("long connection stopped: {0}")]
    Fatal(String),
    /// `WEBSOCKET_MAX_RECONNECT_RETRIES` (or the server's ReconnectCount) ran out.
    #[error("long connection gave up after {0} reconnect attempts")]
    GaveUp(u32),
}

/// The long connection.
#[derive(Debug)]
pub struct LongConn {
    cfg: LongConnConfig,
    http: reqwest::Client,
    dispatcher: Dispatcher,
    state: watch::Sender<ConnState>,
}

enum SessionEnd {
    Cancelled,
    Dropped(String),
}

enum AttemptError {
    Retry(String),
    Fatal(String),
}

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
        Self {
            cfg,
            http,
            dispatcher,
            state,
        }
    }

    /// Subscribe to state changes.
    #[must_use]
    pub fn state(&self) -> watch::Receiver<ConnState> {
        self.state.subscribe()
    }

    fn set_state(&self, s: ConnState) {
        let up = i64::from(s == ConnState::Up);
        metrics::get()
            .ws_connection_status
            .get_or_create(&metrics::AppLabel {
                app_id: self.cfg.app_id.clone(),
            })
            .set(up);
        self.state.send_replace(s);
    }

    /// Runs until cancelled (Ok) or stopped for good (Err).
    pub async fn run(&self, cancel: CancellationToken) -> Result<(), LongConnError> {
        let mut reconnect = Reconnect::new(self.cfg.policy);
        let mut server = ClientConfig {
            ping_interval: self.cfg.heartbeat,
            ..ClientConfig::default()
        };
        let mut first = true;
        loop {
            match reconnect.next_attempt(&server, &mut || rand::random::<f64>()) {
                Decision::Wait(d) => {
                    if !first {
                        metrics::get().ws_reconnects.inc();
                        info!(
                            wait_ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
                            "Reconnecting to the long connection."
                        );
                    }
                    first = false;
                    tokio::select! {
                        () = cancel.cancelled() => return Ok(()),
                        () = tokio::time::sleep(d) => {}
                    }
                }
                Decision::GiveUp { retries } => {
                    let e = LongConnError::GaveUp(retries);
                    self.set_state(ConnState::Stopped(e.to_string()));
                    return Err(e);
                }
            }
            let ws = match self.connect(&mut server).await {
                Ok(ws) => ws,
                Err(AttemptError::Retry(why)) => {
                    warn!(reason = %why, "Long connection attempt failed; will retry.");
                    continue;
                }
                Err(AttemptError::Fatal(why)) => {
                    self.set_state(ConnState::Stopped(why.clone()));
                    return Err(LongConnError::Fatal(why));
                }
            };
            let (socket, params) = ws;
            reconnect.on_connected(std::time::Instant::now());
            self.set_state(ConnState::Up);
            let conn_id = params.device_id.clone().unwrap_or_default();
            let span = tracing::info_span!("connection", conn_id = %conn_id);
            let end = self
                .session(socket, &params, &mut server, &cancel)
                .instrument(span)
                .await;
            reconnect.on_disconnected(std::time::Instant::now());
            match end {
                SessionEnd::Cancelled => {
                    self.set_state(ConnState::Connecting);
                    return Ok(());
                }
                SessionEnd::Dropped(why) => {
                    warn!(reason = %why, "Long connection dropped.");
                    self.set_state(ConnState::Connecting);
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
        let body = DiscoveryRequest {
            app_id: &self.cfg.app_id,
            app_secret: self.cfg.app_secret.expose_secret(),
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
        let (mut sink, mut stream) = socket.split();
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<(Frame, Instant)>();
        let mut reasm = Reassembler::new(self.cfg.reassembly);
        let mut last_heard = Instant::now();
        let mut next_ping = Instant::now();
        let m = metrics::get();
        let kind_label = |k| metrics::KindLabel { kind: k };
        info!("Long connection established.");
        loop {
            // Liveness: nothing heard for two ping intervals (plus slack) means a dead link.
            let dead_at = last_heard + server.ping_interval * 2 + Duration::from_secs(5);
            tokio::select! {
                () = cancel.cancelled() => {
                    let _ = sink.send(Message::Close(None)).await;
                    return SessionEnd::Cancelled;
                }
                () = tokio::time::sleep_until(next_ping) => {
                    let ping = ping_frame(params.service_id).to_bytes();
                    if let Err(e) = sink.send(Message::Binary(ping.into())).await {
                        return SessionEnd::Dropped(format!("sending ping: {e}"));
                    }
                    next_ping = Instant::now() + server.ping_interval;
                }
                () = tokio::time::sleep_until(dead_at) => {
                    return SessionEnd::Dropped("no pong or frame within two ping intervals".to_owned());
                }
                Some(first) = ack_rx.recv() => {
                    // Every ACK ready now goes out in one write (feed each, flush once).
                    let mut next = Some(first);
                    let mut batched = 0;
                    while let Some((ack, received)) = next.take() {
                        if let Err(e) = sink.feed(Message::Binary(ack.to_bytes().into())).await {
                            return SessionEnd::Dropped(format!("sending ACK: {e}"));
                        }
                        m.event_ack_duration.observe(received.elapsed().as_secs_f64());
                        batched += 1;
                        if batched < ACK_BATCH {
                            next = ack_rx.try_recv().ok();
                        }
                    }
                    if let Err(e) = sink.flush().await {
                        return SessionEnd::Dropped(format!("sending ACK: {e}"));
                    }
                }
                msg = stream.next() => {
                    let Some(msg) = msg else { return SessionEnd::Dropped("server closed the stream".to_owned()) };
                    let msg = match msg {
                        Ok(m) => m,
                        Err(e) => return SessionEnd::Dropped(format!("read: {e}")),
                    };
                    last_heard = Instant::now();
                    let bytes = match msg {
                        Message::Binary(b) => b,
                        Message::Close(_) => return SessionEnd::Dropped("server sent close".to_owned()),
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                        Message::Text(_) => { debug!("Ignoring a text message."); continue; }
                    };
                    let frame = match Frame::decode_strict(&bytes) {
                        Ok(f) => f,
                        Err(e) => {
                            m.ws_frames_received.get_or_create(&kind_label("other")).inc();
                            warn!(error = %e, "Ignoring an undecodable frame.");
                            continue;
                        }
                    };
                    match frame.kind() {
                        FrameKind::Pong => {
                            m.ws_frames_received.get_or_create(&kind_label("pong")).inc();
                            if let Ok(patch) = super::protocol::parse_pong_config(frame.payload_bytes()) {
                                if !patch.is_empty() {
                                    server.apply(&patch);
                                    next_ping = next_ping.min(Instant::now() + server.ping_interval);
                                }
                            }
                        }
                        FrameKind::Ping => { m.ws_frames_received.get_or_create(&kind_label("ping")).inc(); }
                        FrameKind::Card => {
                            m.ws_frames_received.get_or_create(&kind_label("card")).inc();
                            debug!("Ignoring a legacy card frame (the SDKs do not ACK it).");
                        }
                        FrameKind::Unknown => { m.ws_frames_received.get_or_create(&kind_label("other")).inc(); }
                        FrameKind::Event => {
                            m.ws_frames_received.get_or_create(&kind_label("event")).inc();
                            let received = Instant::now();
                            match reasm.push_frame(&frame, std::time::Instant::now()) {
                                Ok(Pushed::Complete(payload)) => {
                                    self.spawn_dispatch(frame, payload, received, ack_tx.clone());
                                }
                                Ok(Pushed::Pending { .. } | Pushed::Duplicate) => {}
                                Err(e) => warn!(error = %e, "Dropping a bad fragment."),
                            }
                            for id in reasm.expire(std::time::Instant::now()) {
                                warn!(message_id = %id, "Dropped an incomplete fragmented message.");
                            }
                        }
                    }
                }
            }
        }
    }

    fn spawn_dispatch(
        &self,
        frame: Frame,
        payload: Vec<u8>,
        received: Instant,
        acks: mpsc::UnboundedSender<(Frame, Instant)>,
    ) {
        let dispatcher = self.dispatcher.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let response = match parse_event_payload(&payload) {
                Ok(cb) => match dispatcher.dispatch(cb, EventSource::WebSocket).await {
                    Outcome::Handled(HandlerReply::Respond(v)) => {
                        AckResponse::OkWithData(serde_json::to_vec(&v).unwrap_or_default())
                    }
                    Outcome::Handled(HandlerReply::Done)
                    | Outcome::Duplicate
                    | Outcome::Accepted => AckResponse::Ok,
                    Outcome::Failed => AckResponse::Failed,
                },
                Err(e) => {
                    // A payload we cannot read will not improve on redelivery: ACK it.
                    warn!(error = %e, "Unreadable event payload acknowledged and dropped.");
                    AckResponse::Ok
                }
            };
            let ack = build_ack(&frame, started.elapsed(), &response);
            let _ = acks.send((ack, received));
        });
    }
}

/// Shares a connection's state with HTTP handlers.
pub type SharedState = Arc<watch::Receiver<ConnState>>;
