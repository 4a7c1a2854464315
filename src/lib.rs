//! lark-service: the library behind the `lark-service` binary.

pub mod lark;
