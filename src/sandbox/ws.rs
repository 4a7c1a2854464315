//! The sandbox's long-connection server: pushes events as `pbbp2` frames, answers pings,
//! records ACKs, redelivers what is not acknowledged.
//!
//! Like the platform (§2.1) it delivers each message to one connected client (cluster
//! mode, not broadcast), accepts a discovery ticket once, and allows at most
//! [`MAX_CONNECTIONS`] connections.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{AckRecord, Pending, PushOpts, SandboxError, Shared, APP_ID};
use crate::longconn::reconnect::{
    CODE_AUTH_FAILED, CODE_EXCEED_CONN_LIMIT, HEADER_HANDSHAKE_AUTH_ERRCODE, HEADER_HANDSHAKE_MSG,
    HEADER_HANDSHAKE_STATUS,
};

/// Connections per app (§2.1).
pub(crate) const MAX_CONNECTIONS: usize = 50;
/// `Handshake-Autherrcode` for a ticket that was not issued or already used (sandbox's
/// choice; any sub-code but 1000040350 is retryable, §2.3).
const AUTHERR_BAD_TICKET: i64 = 1_000_040_351;
use crate::longconn::protocol::{Frame, FrameKind, Header, METHOD_CONTROL, METHOD_DATA};

/// What the server side of a connection is told to do.
#[derive(Debug, Clone)]
pub(crate) enum Out {
    /// Send these bytes as a binary message.
    Bytes(Bytes),
    /// Drop the connection without a close frame.
    Drop,
}

pub(crate) fn router(s: Arc<Shared>) -> Router {
    Router::new().route("/ws", get(upgrade)).with_state(s)
}

async fn upgrade(
    State(s): State<Arc<Shared>>,
    Query(q): Query<Vec<(String, String)>>,
    ws: WebSocketUpgrade,
) -> Response {
    if let Some(r) = super::platform::hit(&s, "ws_connect") {
        return r;
    }
    let get = |k: &str| q.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str());
    if get("access_key").is_none() || get("service_id").is_none() {
        return rejection(403, "missing credentials", None);
    }
    // The ticket from discovery is single-use.
    let app = get("ticket")
        .and_then(|t| s.lock().ticket_apps.remove(t))
        .unwrap_or(APP_ID);
    if !get("ticket").is_some_and(|t| s.lock().tickets.remove(t)) {
        return rejection(
            CODE_AUTH_FAILED,
            "ticket invalid or already used",
            Some(AUTHERR_BAD_TICKET),
        );
    }
    if live_clients(&s) >= MAX_CONNECTIONS {
        return rejection(
            CODE_AUTH_FAILED,
            "exceed connection limit",
            Some(CODE_EXCEED_CONN_LIMIT),
        );
    }
    ws.on_upgrade(move |socket| serve(s, socket, app))
}

/// A refused upgrade with the `Handshake-*` headers (§2.3).
fn rejection(status: i64, msg: &'static str, autherr: Option<i64>) -> Response {
    let http = if status == 403 {
        axum::http::StatusCode::FORBIDDEN
    } else {
        axum::http::StatusCode::UNAUTHORIZED
    };
    let mut r = (http, msg).into_response();
    let h = r.headers_mut();
    let val = |v: String| {
        axum::http::HeaderValue::from_str(&v)
            .unwrap_or_else(|_| axum::http::HeaderValue::from_static("0"))
    };
    h.insert(HEADER_HANDSHAKE_STATUS, val(status.to_string()));
    h.insert(
        HEADER_HANDSHAKE_MSG,
        axum::http::HeaderValue::from_static(msg),
    );
    if let Some(code) = autherr {
        h.insert(HEADER_HANDSHAKE_AUTH_ERRCODE, val(code.to_string()));
    }
    r
}

fn live_clients(s: &Shared) -> usize {
    let mut c = s
        .clients
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    c.retain(|tx| !tx.is_closed());
    c.len()
}

async fn serve(s: Arc<Shared>, mut socket: WebSocket, app: &'static str) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    if app == APP_ID {
        s.clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(tx);
    } else {
        s.other_clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(app)
            .or_default()
            .push(tx);
    }
    // Anything of this app still waiting for an ACK goes to the new connection too.
    let waiting: Vec<Bytes> = s
        .lock()
        .pending
        .values()
        .filter(|p| p.app == app)
        .flat_map(|p| p.frames.clone())
        .collect();
    for f in waiting {
        if socket.send(Message::Binary(f)).await.is_err() {
            return;
        }
    }
    loop {
        tokio::select! {
            out = rx.recv() => {
                // This message and every one queued behind it, in one write.
                let Some(first) = out else { return };
                let mut next = Some(first);
                let mut dropped = false;
                while let Some(out) = next.take() {
                    match out {
                        Out::Bytes(b) => {
                            if futures_util::SinkExt::feed(&mut socket, Message::Binary(b)).await.is_err() {
                                return;
                            }
                        }
                        Out::Drop => {
                            dropped = true;
                            break;
                        }
                    }
                    next = rx.try_recv().ok();
                }
                if dropped {
                    // What was queued before the drop still goes out, as when sent one by one.
                    let _ = futures_util::SinkExt::flush(&mut socket).await;
                    return;
                }
                if futures_util::SinkExt::flush(&mut socket).await.is_err() {
                    return;
                }
            }
            msg = socket.recv() => {
                let Some(Ok(msg)) = msg else { return };
                let Message::Binary(bytes) = msg else { continue };
                let Ok(frame) = Frame::decode_strict(&bytes) else { continue };
                match frame.kind() {
                    FrameKind::Ping => {
                        let stalled = {
                            let mut g = s.lock();
                            *g.hits.entry("ws_ping").or_default() += 1;
                            g.stall_pongs
                        };
                        if stalled {
                            continue;
                        }
                        let pong = Frame {
                            service: frame.service,
                            method: METHOD_CONTROL,
                            headers: vec![Header::new("type", "pong")],
                            payload: Some(format!(r#"{{"PingInterval":{},"ReconnectCount":-1,"ReconnectInterval":5,"ReconnectNonce":1}}"#, s.opts.ping_interval).into_bytes()),
                            ..Frame::default()
                        };
                        if socket.send(Message::Binary(pong.to_bytes().into())).await.is_err() { return; }
                    }
                    FrameKind::Event => record_ack(&s, &frame),
                    _ => {}
                }
            }
        }
    }
}

/// An ACK's JSON payload, read without building a tree (the common case: `{"code":200}`).
#[derive(serde::Deserialize)]
struct AckBody {
    #[serde(default)]
    code: Option<i64>,
    #[serde(default)]
    data: Option<String>,
}

/// `code` and decoded `data` of an ACK payload; `code` 0 when it is missing or not an integer.
fn read_ack_payload(payload: &[u8]) -> (i64, Option<Value>) {
    let decode = |d: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(d)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    };
    if let Ok(body) = serde_json::from_slice::<AckBody>(payload) {
        return (
            body.code.unwrap_or(0),
            body.data.as_deref().and_then(decode),
        );
    }
    // Not the usual shape (a `code` that is not an integer, `data` that is not a string…):
    // read what can be read, as a tree.
    let v: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
    (
        v["code"].as_i64().unwrap_or(0),
        v["data"].as_str().and_then(decode),
    )
}

fn record_ack(s: &Shared, frame: &Frame) {
    let message_id = frame.header("message_id").unwrap_or_default().to_owned();
    let now = Instant::now();
    let (code, data) = read_ack_payload(frame.payload_bytes());
    let card_message = {
        let mut g = s.lock();
        let since_push = g
            .pending
            .get(&message_id)
            .map(|p| now.saturating_duration_since(p.pushed_at));
        let card_message = if code == 200 {
            g.pending.remove(&message_id).and_then(|p| p.card_message)
        } else {
            None
        };
        g.acks.push(AckRecord {
            message_id,
            code,
            data: data.clone(),
            biz_rt: frame.header("biz_rt").map(str::to_owned),
            since_push,
        });
        card_message
    };
    s.acked.notify_all();
    // A card callback answered with a card: the user's client shows it.
    if let (Some(open_message_id), Some(d)) = (card_message, data) {
        if d["card"]["type"] == "raw" {
            super::platform::update_message(s, &open_message_id, d["card"]["data"].clone());
        }
    }
}

pub(crate) fn broadcast(s: &Shared, out: Out) {
    let mut c = s
        .clients
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    c.retain(|tx| tx.send(out.clone()).is_ok());
}

/// Open long connections of `app`.
pub(crate) fn live_clients_of(s: &Shared, app: &str) -> usize {
    if app == APP_ID {
        return live_clients(s);
    }
    let mut all = s
        .other_clients
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    all.get_mut(app).map_or(0, |c| {
        c.retain(|tx| !tx.is_closed());
        c.len()
    })
}

/// Sends a message's frames to one connected client of `app`, chosen at random (cluster
/// mode, §2.1). With no client connected nothing is sent; the redelivery timer or the next
/// connection picks the message up.
fn deliver(s: &Shared, app: &'static str, frames: &[Bytes]) {
    if app != APP_ID {
        let mut all = s
            .other_clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = all.get_mut(app) {
            deliver_one(c, frames);
        }
        return;
    }
    let mut c = s
        .clients
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    deliver_one(&mut c, frames);
}

fn deliver_one(c: &mut Vec<mpsc::UnboundedSender<Out>>, frames: &[Bytes]) {
    c.retain(|tx| !tx.is_closed());
    while !c.is_empty() {
        let i = rand::random_range(0..c.len());
        if frames
            .iter()
            .all(|f| c[i].send(Out::Bytes(f.clone())).is_ok())
        {
            return;
        }
        c.swap_remove(i);
    }
}

fn frames_for(s: &Shared, message_id: &str, payload: &[u8], parts: u32) -> Vec<Bytes> {
    let parts = parts.max(1) as usize;
    let chunk = payload.len().div_ceil(parts).max(1);
    let pieces: Vec<&[u8]> = if payload.is_empty() {
        vec![payload]
    } else {
        payload.chunks(chunk).collect()
    };
    let sum = pieces.len();
    let trace = s.next_id("trace");
    pieces
        .iter()
        .enumerate()
        .map(|(seq, p)| {
            Frame {
                seq_id: rand::random::<u32>().into(),
                log_id: rand::random::<u32>().into(),
                service: 42,
                method: METHOD_DATA,
                headers: vec![
                    Header::new("type", "event"),
                    Header::new("message_id", message_id),
                    Header::new("sum", sum.to_string()),
                    Header::new("seq", seq.to_string()),
                    Header::new("trace_id", trace.clone()),
                ],
                payload: Some(p.to_vec()),
                ..Frame::default()
            }
            .to_bytes()
            .into()
        })
        .collect()
}

/// An event body (the envelope's `event` object) serialized once, to be pushed many times with
/// [`Sandbox::push_prepared`](super::Sandbox::push_prepared).
#[derive(Debug, Clone)]
pub struct PreparedEvent {
    json: Vec<u8>,
}

impl PreparedEvent {
    /// Serializes `event` once.
    pub fn new(event: &Value) -> Result<Self, SandboxError> {
        serde_json::to_vec(event)
            .map(|json| Self { json })
            .map_err(|e| SandboxError::Control(e.to_string()))
    }
}

/// Appends `v` as a JSON string.
fn json_str(out: &mut Vec<u8>, v: &str) -> Result<(), SandboxError> {
    serde_json::to_writer(out, v).map_err(|e| SandboxError::Control(e.to_string()))
}

/// The v2 envelope around an already serialized `event` object, written straight into bytes:
/// `{"schema":"2.0","header":{…},"event":…}`.
fn envelope(
    app: &str,
    event_id: &str,
    event_type: &str,
    event: &[u8],
) -> Result<Vec<u8>, SandboxError> {
    let mut out = Vec::with_capacity(event.len() + 256);
    out.extend_from_slice(br#"{"schema":"2.0","header":{"event_id":"#);
    json_str(&mut out, event_id)?;
    out.extend_from_slice(br#","event_type":"#);
    json_str(&mut out, event_type)?;
    out.extend_from_slice(br#","create_time":""#);
    out.extend_from_slice(crate::storage::now_ms().to_string().as_bytes());
    out.extend_from_slice(br#"","token":"sandbox-verification-token","app_id":"#);
    json_str(&mut out, app)?;
    out.extend_from_slice(br#","tenant_key":"sandbox"},"event":"#);
    out.extend_from_slice(event);
    out.push(b'}');
    Ok(out)
}

fn push(
    s: &Shared,
    app: &'static str,
    event_type: &str,
    event: &[u8],
    opts: PushOpts,
    card_message: Option<String>,
    event_id: Option<&str>,
) -> Result<String, SandboxError> {
    let event_id = event_id.map_or_else(|| s.next_id("ev_sandbox_"), str::to_owned);
    let payload = envelope(app, &event_id, event_type, event)?;
    let message_id = s.next_id("msg_");
    let frames = frames_for(s, &message_id, &payload, opts.fragments);
    {
        let mut g = s.lock();
        g.pending.insert(
            message_id.clone(),
            Pending {
                event_type: event_type.to_owned(),
                frames: frames.clone(),
                pushed_at: Instant::now(),
                deliveries: 1,
                card_message,
                app,
            },
        );
        g.deliveries.insert(message_id.clone(), 1);
        g.event_ids.insert(message_id.clone(), event_id);
    }
    let mut order = frames;
    if opts.out_of_order {
        order.reverse();
    }
    let copies = if opts.duplicate { 2 } else { 1 };
    for _ in 0..copies {
        deliver(s, app, &order);
    }
    Ok(message_id)
}

fn serialized(event: &Value) -> Result<Vec<u8>, SandboxError> {
    serde_json::to_vec(event).map_err(|e| SandboxError::Control(e.to_string()))
}

pub(crate) fn push_prepared(
    s: &Shared,
    event_type: &str,
    event: &PreparedEvent,
    opts: PushOpts,
) -> Result<String, SandboxError> {
    push(s, APP_ID, event_type, &event.json, opts, None, None)
}

pub(crate) fn push_event(
    s: &Shared,
    event_type: &str,
    event: Value,
    opts: PushOpts,
) -> Result<String, SandboxError> {
    push(
        s,
        APP_ID,
        event_type,
        &serialized(&event)?,
        opts,
        None,
        None,
    )
}

pub(crate) fn push_to(
    s: &Shared,
    app: &'static str,
    event_type: &str,
    event: Value,
) -> Result<String, SandboxError> {
    push(
        s,
        app,
        event_type,
        &serialized(&event)?,
        PushOpts::default(),
        None,
        None,
    )
}

pub(crate) fn push_event_as(
    s: &Shared,
    event_id: &str,
    event_type: &str,
    event: Value,
    opts: PushOpts,
) -> Result<String, SandboxError> {
    push(
        s,
        APP_ID,
        event_type,
        &serialized(&event)?,
        opts,
        None,
        Some(event_id),
    )
}

pub(crate) fn click(
    s: &Shared,
    open_message_id: &str,
    operator_open_id: &str,
    value: Value,
) -> Result<String, SandboxError> {
    let u = s
        .lock()
        .users
        .iter()
        .find(|u| u.open_id == operator_open_id)
        .cloned()
        .ok_or_else(|| SandboxError::Control(format!("no sandbox user {operator_open_id}")))?;
    let Some(app) = s
        .lock()
        .messages
        .iter()
        .find(|m| m.message_id == open_message_id)
        .map(|m| super::known_app(&m.app_id, None).unwrap_or(APP_ID))
    else {
        return Err(SandboxError::Control(format!(
            "no message {open_message_id}"
        )));
    };
    let token = s.next_id("c-sandbox-");
    s.lock().card_tokens.insert(
        token.clone(),
        (
            open_message_id.to_owned(),
            Instant::now(),
            super::platform::CARD_TOKEN_USES,
        ),
    );
    let event = json!({
        "operator": {"open_id": u.open_id, "user_id": u.user_id, "union_id": u.union_id, "tenant_key": "sandbox"},
        "token": token,
        "action": {"tag": "button", "value": value},
        "host": "im_message",
        "context": {"open_message_id": open_message_id, "open_chat_id": "oc_sandbox"},
    });
    // The click goes to the long connection of the app that sent the card.
    push(
        s,
        app,
        "card.action.trigger",
        &serialized(&event)?,
        PushOpts::default(),
        Some(open_message_id.to_owned()),
        None,
    )
}

/// Re-sends every event not acknowledged within `redeliver_after`.
pub(crate) async fn redeliver_loop(s: Arc<Shared>, cancel: CancellationToken) {
    let every = (s.opts.redeliver_after / 4).max(Duration::from_millis(50));
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        redeliver(&s, false);
    }
}

/// Re-sends unacknowledged events: those due (`redeliver_after` since their last push), or
/// all of them with `force`.
pub(crate) fn redeliver(s: &Shared, force: bool) {
    let due: Vec<(&'static str, Vec<Bytes>)> = {
        let mut g = s.lock();
        let after = s.opts.redeliver_after;
        let mut ids = Vec::new();
        let mut out = Vec::new();
        for (id, p) in &mut g.pending {
            if force || p.pushed_at.elapsed() >= after {
                p.pushed_at = Instant::now();
                p.deliveries += 1;
                tracing::debug!(message_id = %id, event_type = %p.event_type, deliveries = p.deliveries, "sandbox: redelivering");
                ids.push((id.clone(), p.deliveries));
                out.push((p.app, p.frames.clone()));
            }
        }
        for (id, n) in ids {
            g.deliveries.insert(id, n);
        }
        out
    };
    for (app, frames) in due {
        deliver(s, app, &frames);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::APP2_ID;

    #[test]
    fn the_envelope_written_as_bytes_is_the_v2_envelope() {
        let event = json!({"message": {"text": "quote \" and \\ and 中文"}, "n": 1});
        let bytes = envelope(
            APP_ID,
            "ev_1",
            "im.message.receive_v1",
            &serialized(&event).unwrap(),
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["schema"], "2.0");
        assert_eq!(v["header"]["event_id"], "ev_1");
        assert_eq!(v["header"]["event_type"], "im.message.receive_v1");
        assert_eq!(v["header"]["app_id"], APP_ID);
        assert_eq!(v["header"]["tenant_key"], "sandbox");
        assert_eq!(v["header"]["token"], "sandbox-verification-token");
        assert!(v["header"]["create_time"]
            .as_str()
            .is_some_and(|t| t.parse::<u64>().is_ok()));
        assert_eq!(v["event"], event);
        // A prepared body gives the same envelope.
        let prepared = PreparedEvent::new(&event).unwrap();
        let again: Value =
            serde_json::from_slice(&envelope(APP2_ID, "ev_1", "t", &prepared.json).unwrap())
                .unwrap();
        assert_eq!(again["event"], event);
        assert_eq!(again["header"]["app_id"], APP2_ID);
    }

    #[test]
    fn ack_payloads_are_read_in_every_shape() {
        assert_eq!(read_ack_payload(br#"{"code":200}"#), (200, None));
        assert_eq!(read_ack_payload(br#"{"code":500}"#), (500, None));
        let data =
            base64::engine::general_purpose::STANDARD.encode(br#"{"toast":{"type":"info"}}"#);
        assert_eq!(
            read_ack_payload(format!(r#"{{"code":200,"data":"{data}"}}"#).as_bytes()),
            (200, Some(json!({"toast": {"type": "info"}})))
        );
        // Not the usual shape: what can be read is read, the rest is 0 / none.
        assert_eq!(read_ack_payload(br#"{"code":"200"}"#), (0, None));
        assert_eq!(
            read_ack_payload(format!(r#"{{"code":"x","data":"{data}"}}"#).as_bytes()),
            (0, Some(json!({"toast": {"type": "info"}})))
        );
        assert_eq!(read_ack_payload(br#"{"code":200,"data":7}"#), (200, None));
        assert_eq!(read_ack_payload(b"not json"), (0, None));
        assert_eq!(read_ack_payload(b""), (0, None));
    }
}
