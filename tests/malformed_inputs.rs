//! Bad input (issue 11): 1 000 malformed WebSocket frames and 1 000 malformed callback bodies,
//! taken from the committed fuzz corpora (`fuzz/corpus/<target>/`, built by cargo-fuzz; see
//! `fuzz/run-long`) plus mutations of them, are all rejected without harm: no panic, every body
//! answered 4xx (the status the service's own parser gives it), nothing reaches the dispatcher,
//! the long connection stays up, `/readyz` stays 200, and valid events on both paths are still
//! ACKed and handled afterwards.
//!
//! Its own test binary, so the process-wide metrics counters move only because of this test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::collections::HashMap;

use common::*;
use lark_service::callbacks::{
    parse_callback, parse_event_payload, signature_hex, CallbackConfig, EventCipher,
    SignatureHeaders,
};
use lark_service::longconn::{
    parse_pong_config, Frame, FrameKind, Pushed, Reassembler, ReassemblyLimits,
};
use lark_service::sandbox::{PushOpts, Sandbox, SandboxOptions, APP_ID};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// The committed fuzz corpus of `target` (`fuzz/corpus/<target>/`), in name order.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    let inputs: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(
        inputs.len() >= 50,
        "the {target} corpus is missing or tiny ({} files in {})",
        inputs.len(),
        dir.display()
    );
    inputs
}

/// The fuzzer's basic moves, a few at a time: flip a bit, truncate, insert, delete, or put a
/// JSON/protobuf-significant byte somewhere.
fn mutate(input: &[u8], rng: &mut impl Rng) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..rng.random_range(1..=3) {
        if b.is_empty() {
            b.push(rng.random());
            continue;
        }
        let i = rng.random_range(0..b.len());
        match rng.random_range(0..5) {
            0 => b[i] ^= 1 << rng.random_range(0..8),
            1 => b.truncate(i),
            2 => b.insert(i, rng.random()),
            3 => {
                b.remove(i);
            }
            _ => {
                b[i] = [b'"', b'{', b'}', b',', b':', b'\\', 0, 0x0a, 0x12, 0xff]
                    [rng.random_range(0..10)];
            }
        }
    }
    b
}

/// 1 000 inputs: every corpus file (in a shuffled order), then mutations of them until there are
/// enough, keeping only those `keep` accepts.
fn thousand(
    corpus: &[Vec<u8>],
    rng: &mut impl Rng,
    mut keep: impl FnMut(&[u8]) -> bool,
) -> (Vec<Vec<u8>>, usize) {
    let mut order: Vec<usize> = (0..corpus.len()).collect();
    rand::seq::SliceRandom::shuffle(order.as_mut_slice(), rng);
    let mut out = Vec::new();
    let mut from_corpus = 0;
    for &i in &order {
        if out.len() < 1000 && keep(&corpus[i]) {
            out.push(corpus[i].clone());
            from_corpus += 1;
        }
    }
    let mut tries = 0;
    while out.len() < 1000 {
        tries += 1;
        assert!(tries < 100_000, "cannot find enough malformed inputs");
        let m = mutate(&corpus[rng.random_range(0..corpus.len())], rng);
        if keep(&m) {
            out.push(m);
        }
    }
    (out, from_corpus)
}

/// What the service's read loop does with a sequence of frames, modelled with the same pure
/// parts: a frame is harmless if it brings no event to the dispatcher (it does not decode, is
/// not an event, or does not complete a message whose payload is an event).
struct FrameModel {
    reasm: Reassembler,
    kept_events: Vec<Frame>,
    now: std::time::Instant,
}

impl FrameModel {
    fn new() -> Self {
        Self {
            reasm: Reassembler::new(ReassemblyLimits::default()),
            kept_events: Vec::new(),
            now: std::time::Instant::now(),
        }
    }

    fn harmless(&mut self, bytes: &[u8]) -> bool {
        let Ok(frame) = Frame::decode_strict(bytes) else {
            return true;
        };
        match frame.kind() {
            // A pong carrying a valid configuration is not malformed: it would be applied.
            FrameKind::Pong => return parse_pong_config(frame.payload_bytes()).is_err(),
            FrameKind::Event => {}
            // Pings from the server and card/unknown frames are dropped by the service.
            FrameKind::Ping | FrameKind::Card | FrameKind::Unknown => return true,
        }
        if let Ok(Pushed::Complete(p)) = self.reasm.push_frame(&frame, self.now) {
            if parse_event_payload(&p).is_ok() {
                // Left out: rebuild the reassembly state from the frames that stay.
                self.reasm = Reassembler::new(ReassemblyLimits::default());
                for f in &self.kept_events {
                    let _ = self.reasm.push_frame(f, self.now);
                }
                return false;
            }
        }
        self.kept_events.push(frame);
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_malformed_frames_and_bodies_are_rejected_without_harm() {
    // The mutations are random; a failure names the seed, MALFORMED_INPUTS_SEED replays it.
    let seed: u64 = std::env::var("MALFORMED_INPUTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("MALFORMED_INPUTS_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let svc = Service::start(&sandbox, &[]).await;
    svc.wait_for(|| async { sandbox.connections() == 1 }).await;
    svc.wait_for(|| async { svc.public_get("/readyz").await.0 == 200 })
        .await;
    let discoveries = sandbox.hits("ws_endpoint");
    let before = svc.scrape().await;

    // Frames from the ws_frame corpus (and mutations), none of which carries an event.
    let mut model = FrameModel::new();
    let (frames, from_corpus) = thousand(&corpus("ws_frame"), &mut rng, |b| model.harmless(b));
    let decodable = frames
        .iter()
        .filter(|f| Frame::decode_strict(f).is_ok())
        .count();
    for f in frames {
        sandbox.send_raw(f);
    }
    // Read in order on the one socket: once a valid event after them is ACKed, every malformed
    // frame before it was read.
    let fid = sandbox
        .push_event("contact.user.updated_v3", json!({}), PushOpts::default())
        .unwrap();
    svc.wait_for(|| async { acked_ok(&sandbox, &fid) }).await;

    // Bodies from the callback_body corpus (and mutations), each sent as is, signed, or as the
    // plaintext of a signed encrypted body: those the service's own parser refuses.
    let cfg = CallbackConfig::new(Some(VTOKEN), Some(ENCRYPT_KEY));
    let cipher = EventCipher::new(ENCRYPT_KEY);
    let ts = (lark_service::storage::now_ms() / 1000).to_string();
    let form = |data: &[u8], how: usize| -> (Vec<u8>, Option<String>) {
        match how {
            0 => (data.to_vec(), None),
            1 => (
                data.to_vec(),
                Some(signature_hex(&ts, "n0nce", ENCRYPT_KEY, data)),
            ),
            _ => {
                let wrapped =
                    serde_json::to_vec(&json!({"encrypt": cipher.encrypt_with_iv(data, [7; 16])}))
                        .unwrap();
                let sig = signature_hex(&ts, "n0nce", ENCRYPT_KEY, &wrapped);
                (wrapped, Some(sig))
            }
        }
    };
    let expected = |body: &[u8], sig: Option<&str>| -> Option<u16> {
        let headers = SignatureHeaders {
            timestamp: sig.map(|_| ts.as_str()),
            nonce: sig.map(|_| "n0nce"),
            signature: sig,
        };
        parse_callback(body, &headers, &cfg, std::time::SystemTime::now())
            .err()
            .map(|e| e.status())
    };
    let mut n = 0usize;
    let (inputs, bodies_from_corpus) = thousand(&corpus("callback_body"), &mut rng, |data| {
        let (body, sig) = form(data, n % 3);
        let keep = expected(&body, sig.as_deref()).is_some();
        n += usize::from(keep);
        keep
    });
    let mut codes: HashMap<u16, u32> = HashMap::new();
    for (i, data) in inputs.iter().enumerate() {
        let (body, sig) = form(data, i % 3);
        let want = expected(&body, sig.as_deref()).unwrap();
        let path = if i % 2 == 0 { "event" } else { "card" };
        let mut req = svc
            .client
            .post(format!("http://{}/callbacks/{path}", svc.http))
            .header("content-type", "application/json")
            .body(body.clone());
        if let Some(sig) = &sig {
            req = req
                .header("X-Lark-Request-Timestamp", &ts)
                .header("X-Lark-Request-Nonce", "n0nce")
                .header("X-Lark-Signature", sig);
        }
        let got = req.send().await.unwrap().status().as_u16();
        assert_eq!(
            got,
            want,
            "body #{i} (seed {seed}) {:?}",
            String::from_utf8_lossy(&body)
        );
        assert!((400..500).contains(&got), "{got}");
        *codes.entry(got).or_default() += 1;
    }
    // Refused at different stages, not all at the signature check.
    assert!(
        codes.contains_key(&400) && codes.contains_key(&401),
        "{codes:?}"
    );

    // Nothing malformed reached the dispatcher; the link never dropped; still ready and working.
    let after = svc.scrape().await;
    let received = |source: &str| {
        metric(&after, "lark_service_events_received_total", source)
            - metric(&before, "lark_service_events_received_total", source)
    };
    assert_eq!(received("websocket"), 1.0, "only the valid event");
    assert_eq!(received("http"), 0.0);
    assert_eq!(sandbox.hits("ws_endpoint"), discoveries, "the link dropped");
    assert_eq!(sandbox.connections(), 1);
    let (code, body) = svc.public_get("/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("long connection up"), "{body}");
    // Still working on both paths: an `/authorize` message over the long connection and one
    // as a signed, encrypted HTTP callback are ACKed and handled (each user gets a card).
    let ws = sandbox
        .push_event(
            "im.message.receive_v1",
            authorize_message("ou_sandbox_carol", "om_after_1"),
            PushOpts::default(),
        )
        .unwrap();
    svc.wait_for(|| async { acked_ok(&sandbox, &ws) }).await;
    let event = json!({
        "schema": "2.0",
        "header": {"event_id": "ev_after_the_fuzz", "event_type": "im.message.receive_v1",
                   "create_time": "1", "token": VTOKEN, "app_id": APP_ID, "tenant_key": "sandbox"},
        "event": authorize_message("ou_sandbox_bob", "om_after_2"),
    });
    let (body, sig) = form(&serde_json::to_vec(&event).unwrap(), 2);
    let r = svc
        .client
        .post(format!("http://{}/callbacks/event", svc.http))
        .header("X-Lark-Request-Timestamp", &ts)
        .header("X-Lark-Request-Nonce", "n0nce")
        .header("X-Lark-Signature", sig.unwrap())
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    svc.wait_for(|| async {
        sandbox.messages_for("ou_sandbox_carol").len() == 1
            && sandbox.messages_for("ou_sandbox_bob").len() == 1
    })
    .await;
    assert_eq!(svc.public_get("/readyz").await.0, 200);
    println!(
        "seed {seed}: frames {from_corpus} from the corpus + {} mutations ({decodable} decodable); \
         bodies {bodies_from_corpus} from the corpus + {} mutations; answers {codes:?}",
        1000 - from_corpus,
        1000 - bodies_from_corpus
    );
    svc.stop().await;
}

fn authorize_message(open_id: &str, message_id: &str) -> Value {
    json!({
        "sender": {"sender_id": {"open_id": open_id, "user_id": "u", "union_id": "on_u"},
                   "sender_type": "user", "tenant_key": "sandbox"},
        "message": {"message_id": message_id, "chat_id": "oc_p2p", "chat_type": "p2p",
                    "message_type": "text", "content": "{\"text\":\"/authorize\"}",
                    "create_time": "1"}
    })
}

fn acked_ok(sandbox: &Sandbox, message_id: &str) -> bool {
    sandbox
        .acks()
        .iter()
        .any(|a| a.message_id == message_id && a.code == 200)
}
