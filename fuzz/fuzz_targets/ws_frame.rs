//! Fuzz target: one WebSocket binary message through the whole pure receive path
//! (strict decode → classify → reassembly → payload parsing → ACK).
//! Must never panic; invariants are asserted.
#![no_main]

use std::time::{Duration, Instant};

use lark_service::callbacks::parse_event_payload;
use lark_service::longconn::{
    build_ack, parse_pong_config, AckResponse, DataHeaders, Frame, FrameKind, Pushed, Reassembler,
    ReassemblyLimits,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = Frame::decode_strict(data) else {
        return;
    };
    // Whatever decodes strictly must survive a re-encode unchanged.
    let re = frame.to_bytes();
    assert_eq!(Frame::decode_strict(&re).as_ref(), Ok(&frame));

    match frame.kind() {
        FrameKind::Pong => {
            let _ = parse_pong_config(frame.payload_bytes());
        }
        FrameKind::Event | FrameKind::Card => {
            let _ = DataHeaders::from_frame(&frame);
            let mut r = Reassembler::new(ReassemblyLimits {
                max_total_bytes: 1 << 16,
                max_messages: 4,
                max_fragments: 64,
                ttl: Duration::from_secs(5),
            });
            let now = Instant::now();
            // Push it twice (duplicate) and once more after expiry.
            for t in [0, 0, 10] {
                if let Ok(Pushed::Complete(payload)) =
                    r.push_frame(&frame, now + Duration::from_secs(t))
                {
                    let _ = parse_event_payload(&payload);
                }
            }
            let ack = build_ack(&frame, Duration::from_millis(3), &AckResponse::Ok);
            let back = Frame::decode_strict(&ack.to_bytes()).expect("our ACK decodes");
            assert_eq!(back.seq_id, frame.seq_id);
            assert_eq!(back.header("biz_rt"), Some("3"));
        }
        FrameKind::Ping | FrameKind::Unknown => {}
    }
});
