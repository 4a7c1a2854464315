//! lark-service: the library behind the `lark-service` binary.
pub mod config;
pub mod schedule;
pub mod storage;
