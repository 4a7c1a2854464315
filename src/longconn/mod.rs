//! The Feishu/Lark long connection (WebSocket event channel), protocol doc §2.
//!
//! Owns: the pure cores the connection task is built on —
//! [`protocol`] (the `pbbp2` frame codec, pings, pong config, ACKs),
//! [`reassembly`] (fragment reassembly with bounded memory and a TTL) and
//! [`reconnect`] (backoff schedule, endpoint discovery parsing, Retry/Fatal classification).
//!
//! Must not (in these modules): do I/O, read clocks or draw randomness. The connection task
//! that owns the socket, the timers and the event dispatch will live beside them and feed
//! them bytes, `Instant`s and random numbers.

pub mod conn;
pub mod protocol;
pub mod reassembly;
pub mod reconnect;

pub use conn::{ConnState, LongConn, LongConnConfig, LongConnError};
pub use protocol::{
    build_ack, encode_ping, parse_pong_config, ping_frame, AckResponse, ClientConfig,
    ClientConfigPatch, ConfigPayloadError, ConnParams, ConnUrlError, DataHeaderError, DataHeaders,
    Frame, FrameError, FrameKind, Header, METHOD_CONTROL, METHOD_DATA,
};
pub use reassembly::{Pushed, Reassembler, ReassemblyError, ReassemblyLimits, ReassemblyStats};
pub use reconnect::{
    classify_discovery_code, classify_handshake, effective_max_retries, max_retries_from_setting,
    parse_discovery_response, Decision, DiscoveryError, DiscoveryRequest, Endpoint, FailureClass,
    HandshakeRejection, Reconnect, ReconnectPolicy, DISCOVERY_PATH,
};
