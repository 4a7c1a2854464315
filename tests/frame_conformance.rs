//! Conformance of the long-connection frame codec against frames produced by the official
//! `lark-oapi` Python encoder (`tests/fixtures/frames/gen_frames.py`, manifest.json).
//!
//! Decodes every fixture and checks it against the manifest, reassembles the card action
//! that arrives in two out-of-order fragments, builds our ACKs and
//! * always compares them byte for byte with the ACKs the Python encoder built
//!   (`ack_*.bin`), and
//! * when `LARK_OAPI_PYTHON` names a Python with lark-oapi installed, also runs
//!   `check_ack.py`, which decodes our bytes with the SDK's own decoder.
//!
//! Our ACKs are written to `$LARK_ACK_DIR` or `<target tmp>/ack-fixtures/`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lark_service::callbacks::{parse_event_payload, BodyError, Callback};
use lark_service::longconn::{
    build_ack, parse_pong_config, AckResponse, ClientConfigPatch, Frame, FrameKind, Pushed,
    Reassembler,
};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/frames")
}

fn manifest() -> Value {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest is JSON")
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn frame_named(name: &str) -> Frame {
    Frame::decode_strict(&read(&format!("{name}.bin"))).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn opt_str(v: &Value) -> Option<String> {
    v.as_str().map(str::to_owned)
}

fn u64_of(v: &Value) -> u64 {
    v.as_u64().expect("integer")
}

#[test]
fn every_fixture_decodes_to_the_manifest_and_reencodes_identically() {
    let m = manifest();
    let frames = m["frames"].as_array().unwrap();
    assert!(frames.len() >= 7);
    for entry in frames {
        let name = entry["name"].as_str().unwrap();
        let bytes = read(entry["file"].as_str().unwrap());
        let f = Frame::decode_strict(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));

        assert_eq!(f.seq_id, u64_of(&entry["seq_id"]), "{name} SeqID");
        assert_eq!(f.log_id, u64_of(&entry["log_id"]), "{name} LogID");
        assert_eq!(
            i64::from(f.service),
            entry["service"].as_i64().unwrap(),
            "{name} service"
        );
        assert_eq!(
            i64::from(f.method),
            entry["method"].as_i64().unwrap(),
            "{name} method"
        );
        let headers: Vec<(String, String)> = entry["headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|kv| {
                (
                    kv[0].as_str().unwrap().into(),
                    kv[1].as_str().unwrap().into(),
                )
            })
            .collect();
        let got: Vec<(String, String)> = f
            .headers
            .iter()
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect();
        assert_eq!(got, headers, "{name} headers");
        assert_eq!(
            f.payload_encoding,
            opt_str(&entry["payload_encoding"]),
            "{name} field 6"
        );
        assert_eq!(
            f.payload_type,
            opt_str(&entry["payload_type"]),
            "{name} field 7"
        );
        assert_eq!(
            f.log_id_new,
            opt_str(&entry["log_id_new"]),
            "{name} field 9"
        );
        let payload = entry["payload_hex"]
            .as_str()
            .map(|h| hex::decode(h).unwrap());
        assert_eq!(
            f.payload, payload,
            "{name} payload (field 8 presence included)"
        );

        let want_kind = match entry["kind"].as_str().unwrap() {
            "ping" => FrameKind::Ping,
            "pong" => FrameKind::Pong,
            "event" => FrameKind::Event,
            other => panic!("unknown kind {other}"),
        };
        assert_eq!(f.kind(), want_kind, "{name} kind");
        assert_eq!(
            f.to_bytes(),
            bytes,
            "{name}: re-encoding must be byte-identical"
        );
    }
}

#[test]
fn ping_fixture_equals_our_ping() {
    let ping = frame_named("ping");
    assert_eq!(
        lark_service::longconn::encode_ping(ping.service),
        read("ping.bin")
    );
}

#[test]
fn pong_fixture_config() {
    let m = manifest();
    let entry = m["frames"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "pong_config")
        .unwrap();
    let cfg = &entry["pong_config"];
    let patch = parse_pong_config(frame_named("pong_config").payload_bytes()).unwrap();
    assert_eq!(
        patch,
        ClientConfigPatch {
            reconnect_count: cfg["ReconnectCount"].as_i64(),
            reconnect_interval: cfg["ReconnectInterval"].as_i64(),
            reconnect_nonce: cfg["ReconnectNonce"].as_i64(),
            ping_interval: cfg["PingInterval"].as_i64(),
        }
    );
}

/// Delivers each message's fragments in the manifest's order; returns, per message id, the
/// name of the frame that completed it.
fn reassemble_all() -> Vec<(String, String)> {
    let m = manifest();
    let mut r = Reassembler::default();
    let now = Instant::now();
    let mut completed_by = Vec::new();
    for msg in m["messages"].as_array().unwrap() {
        let id = msg["message_id"].as_str().unwrap();
        let delivery: Vec<&str> = msg["delivery"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let want = hex::decode(msg["payload_hex"].as_str().unwrap()).unwrap();
        for (i, name) in delivery.iter().enumerate() {
            let f = frame_named(name);
            let got = r
                .push_frame(&f, now)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            if i + 1 < delivery.len() {
                assert!(matches!(got, Pushed::Pending { .. }), "{name}: {got:?}");
            } else {
                assert_eq!(
                    got,
                    Pushed::Complete(want.clone()),
                    "{id}: reassembled payload"
                );
                completed_by.push((id.to_owned(), (*name).to_owned()));
            }
        }
        match msg["event_type"].as_str() {
            Some(event_type) => {
                let cb = parse_event_payload(&want).unwrap_or_else(|e| panic!("{id}: {e}"));
                let got_type = match &cb {
                    Callback::Event(e) => e.event_type.clone(),
                    Callback::CardAction(c) => c.envelope.event_type.clone(),
                    Callback::UrlVerification { .. } => panic!("{id}: challenge over WS"),
                };
                assert_eq!(got_type, event_type, "{id}");
            }
            None => assert_eq!(parse_event_payload(&want), Err(BodyError::InvalidJson)),
        }
    }
    assert_eq!(r.pending_messages(), 0);
    completed_by
}

#[test]
fn fragmented_card_action_reassembles_out_of_order() {
    let completed = reassemble_all();
    assert!(completed.contains(&("msg-card".into(), "card_action_frag0".into())));
    let payload = {
        let m = manifest();
        let msg = m["messages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["message_id"] == "msg-card")
            .unwrap()
            .clone();
        hex::decode(msg["payload_hex"].as_str().unwrap()).unwrap()
    };
    let Ok(Callback::CardAction(card)) = parse_event_payload(&payload) else {
        panic!("card payload is not a card action")
    };
    assert_eq!(card.operator_id(), Some("ou_42"));
    assert_eq!(card.action_value["flow"], "flow-7");
    assert_eq!(card.open_message_id.as_deref(), Some("om_card"));
}

fn ack_dir() -> PathBuf {
    match std::env::var_os("LARK_ACK_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_TARGET_TMPDIR")).join("ack-fixtures"),
    }
}

#[test]
fn our_acks_match_the_official_encoder() {
    let m = manifest();
    let biz_rt = Duration::from_millis(m["biz_rt"].as_u64().unwrap());
    let completed = reassemble_all();
    let dir = ack_dir();
    std::fs::create_dir_all(&dir).unwrap();

    let acks = m["acks"].as_array().unwrap();
    assert_eq!(acks.len(), completed.len(), "one ACK per logical message");
    for entry in acks {
        let name = entry["name"].as_str().unwrap();
        let source = entry["source"].as_str().unwrap();
        assert!(
            completed.iter().any(|(_, by)| by == source),
            "{name}: ACK source {source} is not the frame that completed its message"
        );
        let response = match entry["response"].as_str().unwrap() {
            "ok" => AckResponse::Ok,
            "failed" => AckResponse::Failed,
            "ok_with_data" => {
                AckResponse::OkWithData(entry["data_json"].as_str().unwrap().as_bytes().to_vec())
            }
            other => panic!("unknown response {other}"),
        };
        let ack = build_ack(&frame_named(source), biz_rt, &response).to_bytes();
        std::fs::write(dir.join(format!("{name}.bin")), &ack).unwrap();

        let expected = read(entry["file"].as_str().unwrap());
        assert_eq!(
            hex::encode(&ack),
            hex::encode(&expected),
            "{name}: our ACK differs from the lark-oapi encoder's"
        );
        let payload: Value =
            serde_json::from_slice(Frame::decode_strict(&ack).unwrap().payload_bytes()).unwrap();
        assert_eq!(payload, entry["payload_json"], "{name}: payload JSON");
    }

    if let Some(python) = std::env::var_os("LARK_OAPI_PYTHON") {
        let out = Command::new(python)
            .arg(fixtures().join("check_ack.py"))
            .arg(&dir)
            .output()
            .expect("run check_ack.py");
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "check_ack.py rejected our ACKs:\n{log}"
        );
        assert!(log.contains("ACKs accepted"), "{log}");
    }
}

#[test]
fn truncated_fixtures_are_rejected_without_panicking() {
    for name in [
        "ping",
        "pong_config",
        "event_plain",
        "optional_fields",
        "empty_payload",
    ] {
        let bytes = read(&format!("{name}.bin"));
        for cut in 0..bytes.len() {
            // Any prefix either fails or decodes to something that re-encodes to that prefix
            // (a prefix ending exactly at a field boundary is a valid, shorter frame).
            if let Ok(f) = Frame::decode_strict(&bytes[..cut]) {
                assert_eq!(f.to_bytes(), &bytes[..cut], "{name} cut at {cut}");
            }
        }
    }
}
