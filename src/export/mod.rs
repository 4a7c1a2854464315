//! Exports of the store to external databases. Only PostgreSQL for now (`postgres`).

pub mod postgres;
