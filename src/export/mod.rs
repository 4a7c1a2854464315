//! Exports of the store to external databases (only PostgreSQL: `postgres`), and imports from
//! the Python deployment this service replaces (`python`: its sessions table; `python_apps`:
//! its SQLite app store).

pub mod postgres;
pub mod python;
pub mod python_apps;
