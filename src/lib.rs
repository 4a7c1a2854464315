//! lark-service: holds a Feishu/Lark app's long connection and its users' authorization, with
//! an embedded encrypted store. The binary is a thin shell over this library.

pub mod apps;
pub mod auth;
pub mod backoff;
pub mod backup;
pub mod callbacks;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod events;
pub mod export;
pub mod fsutil;
pub mod http;
pub mod lark;
pub mod longconn;
pub mod manual;
pub mod mcp;
pub mod metrics;
pub mod net;
pub mod ratelimit;
pub mod sandbox;
pub mod schedule;
pub mod storage;
pub mod telemetry;
pub mod webhooks;
pub mod workers;
