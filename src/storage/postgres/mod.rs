//! The PostgreSQL backend of the store traits (`storage::traits`): [`PgStore`], for a fleet
//! of instances sharing one database.
//!
//! Same encryption at rest as the redb store: every secret (tokens, PKCE verifiers) is sealed
//! with the store's [`Keyring`] under the same associated data (table, row, field, key id) and
//! written as `nonce || ciphertext` into a `bytea` column beside its key id; PostgreSQL never
//! sees a plaintext secret. The schema is embedded and versioned (`schema`).
//!
//! Cross-instance correctness comes from PostgreSQL itself: `INSERT … ON CONFLICT DO NOTHING
//! RETURNING` for seen events, a conditional `UPDATE` for the pending compare-and-set, a
//! conditional upsert for leases, triggers that keep the per-state counts in the writing
//! transaction, and `FOR UPDATE SKIP LOCKED` batches for the sweep.
//!
//! ## Calling PostgreSQL from synchronous traits
//!
//! The traits are synchronous (async callers go through `spawn_blocking`). A `PgStore` owns a
//! small dedicated tokio runtime whose threads drive the sockets (each connection's
//! `Connection` future is spawned there), and a bounded pool of `tokio_postgres::Client`s. A
//! trait call takes a client from the pool and drives the client's futures to completion on
//! the *calling* thread with a minimal park/unpark executor ([`block_on`]): a client future only
//! exchanges messages with its connection task over channels, so it needs no runtime of its
//! own. Nothing here calls `Runtime::block_on` or enters a runtime, so a call is safe from a
//! plain `#[test]`, from a `spawn_blocking` thread inside another runtime, and from any
//! thread; it never panics with "cannot start a runtime from within a runtime". (Like any
//! blocking call it must not be made on an async worker thread: use `Store::run`'s pattern.)
//! The runtime is shut down in the background when the last handle is dropped, which is safe
//! in any context.

mod admin;
mod apps;
mod backup;
mod claims;
mod copy;
mod device;
mod feed;
mod fleet;
mod instances;
mod keys;
mod outbox;
mod ratelimit;
mod rows;
mod schema;
mod sessions;
mod tokens;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use tokio_postgres::Client;

use super::envelope::{Keyring, Place, Sealed};
use super::{Error, Result};
use crate::net::postgres::{connect_pg, PgConnectError};
use crate::net::Net;

pub use apps::SealedApp;
pub use claims::ClaimReply;
pub use copy::CopyReport;
pub use instances::{InstanceRow, FORGET_AFTER_MS};
pub use keys::{RotationCursor, RotationStep};
pub use schema::SCHEMA_VERSION;

/// Tunables of the PostgreSQL store.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// How long a terminal session is kept before the sweep deletes it.
    pub terminal_retention: Duration,
    /// Whether session writes append to the change feed (as `StoreOptions::change_feed`).
    pub change_feed: bool,
    /// Connections this handle keeps open at most.
    pub max_connections: usize,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            terminal_retention: Duration::from_secs(30 * 24 * 3600),
            change_feed: true,
            max_connections: 8,
        }
    }
}

/// A handle on the PostgreSQL store. Cheap to clone; every clone shares one pool.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("active_key", &self.inner.ring.active_id())
            .finish_non_exhaustive()
    }
}

struct Inner {
    ring: Keyring,
    opts: PgOptions,
    url: String,
    net: Net,
    rt: Option<tokio::runtime::Runtime>,
    pool: Mutex<PoolState>,
    freed: Condvar,
    /// Units run again after a serialization failure or deadlock.
    retries: AtomicU64,
    /// The claim batcher's queue (`claims`), once the first claim started it.
    claims: Mutex<Option<claims::Queue>>,
}

#[derive(Default)]
struct PoolState {
    idle: Vec<Client>,
    open: usize,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            // Never blocks: safe even when the last handle is dropped inside an async task.
            rt.shutdown_background();
        }
    }
}

/// A pooled client, back to the pool on drop (or forgotten if its connection ended).
pub(crate) struct Conn<'a> {
    store: &'a PgStore,
    client: Option<Client>,
}

impl Conn<'_> {
    pub(crate) fn client(&mut self) -> Result<&mut Client> {
        self.client
            .as_mut()
            .ok_or_else(|| Error::Unavailable("no connection".to_owned()))
    }

    /// Keeps the connection out of the pool after `r`, if `r` failed as `Unavailable`: the
    /// server may have said it is ending the connection before the client saw it close, and
    /// the next unit must not be handed that connection.
    fn check<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(Error::Unavailable(_)) = &r {
            self.client = None;
        }
        r
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        let inner = &self.store.inner;
        let mut pool = inner
            .pool
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match self.client.take() {
            Some(c) if !c.is_closed() => pool.idle.push(c),
            _ => pool.open = pool.open.saturating_sub(1),
        }
        drop(pool);
        inner.freed.notify_one();
    }
}

/// Drives `fut` to completion on this thread, parking between wake-ups. See the module notes.
pub(crate) fn block_on<F: Future>(fut: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// A PostgreSQL error as a store error: a lost or refused connection is `Unavailable` (worth a
/// retry), anything else an engine error. The text never holds a parameter's value.
pub(crate) fn pg_err(e: &tokio_postgres::Error) -> Error {
    match e.as_db_error() {
        // The server's message and code only: its `detail` may quote a row's values.
        Some(db) => {
            let code = db.code().code();
            let msg = format!("postgresql: {} ({code})", db.message());
            if connection_lost(code) {
                Error::Unavailable(msg)
            } else {
                Error::Engine(msg)
            }
        }
        None if e.is_closed() || e.code().is_none() => Error::Unavailable(e.to_string()),
        None => Error::Engine(format!("postgresql: {e}")),
    }
}

/// Whether the server's SQLSTATE says it is ending this connection or cannot serve one now:
/// class 08 (connection exception), `admin_shutdown` (57P01, e.g. `pg_terminate_backend` or a
/// fast shutdown), `crash_shutdown` (57P02) and `cannot_connect_now` (57P03, starting up or in
/// recovery). Such an error is the same event as a dropped socket, which one reports first is
/// a race, so both are `Unavailable`.
fn connection_lost(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
}

/// SQLSTATEs after which PostgreSQL has rolled the transaction back and running it again may
/// succeed: `serialization_failure` and `deadlock_detected`.
const RETRYABLE_CODES: [&str; 2] = ["40001", "40P01"];

/// A unit is run at most this many times (the first run and three retries).
pub const MAX_ATTEMPTS: u32 = 4;

/// Whether `e` (made by [`pg_err`], whose engine errors end with `(SQLSTATE)`) is one of
/// [`RETRYABLE_CODES`].
fn retryable(e: &Error) -> bool {
    match e {
        Error::Engine(msg) => RETRYABLE_CODES
            .iter()
            .any(|code| msg.ends_with(&format!("({code})"))),
        _ => false,
    }
}

/// The pause before retry `attempt` (1-based): 10-40 ms times the attempt, at random, so two
/// transactions that collided do not collide again in step.
fn retry_pause(attempt: u32) -> Duration {
    let base = 10 * u64::from(attempt);
    Duration::from_millis(base + rand::random::<u64>() % (3 * base + 1))
}

static RETRY_OBSERVER: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Registers the function told of every retried unit (the metrics registry's counter), once
/// per process.
pub fn set_retry_observer(f: fn()) {
    let _ = RETRY_OBSERVER.set(f);
}

fn connect_err(e: PgConnectError) -> Error {
    match e {
        PgConnectError::Setup(msg) => Error::Unavailable(msg),
        PgConnectError::Pg(e) => Error::Unavailable(e.to_string()),
    }
}

/// Times are unix ms (`u64`) in the API and `bigint` in the database: saturated at
/// `i64::MAX` (the year 292 million) on the way in.
pub(crate) fn db_time(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// A `bigint` time back to unix ms; a negative one is damage.
pub(crate) fn api_time(v: i64, table: &'static str) -> Result<u64> {
    u64::try_from(v).map_err(|_| Error::Decode {
        table,
        detail: format!("negative time {v}"),
    })
}

/// The sealed bytes of a column: `nonce || ciphertext`.
pub(crate) fn sealed_bytes(s: &Sealed) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.nonce.len() + s.ct.len());
    out.extend_from_slice(&s.nonce);
    out.extend_from_slice(&s.ct);
    out
}

const KEY_CHECK_PLAINTEXT: &[u8] = b"lark-service key check";

fn key_check_place() -> Place<'static> {
    Place {
        table: "meta",
        row: b"key_check",
        field: "canary",
    }
}

impl PgStore {
    /// Connects to the database at `url` (TLS per its `sslmode`, on `net`'s trust), applies the
    /// embedded schema in one transaction (refusing a newer one) and checks the key.
    pub fn open(url: &str, net: &Net, ring: Keyring, opts: PgOptions) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pg-store")
            .enable_all()
            .build()
            .map_err(|e| Error::Engine(format!("cannot start the PostgreSQL runtime: {e}")))?;
        let store = Self {
            inner: Arc::new(Inner {
                ring,
                opts,
                url: url.to_owned(),
                net: net.clone(),
                rt: Some(rt),
                pool: Mutex::new(PoolState::default()),
                freed: Condvar::new(),
                retries: AtomicU64::new(0),
                claims: Mutex::new(None),
            }),
        };
        store.init()?;
        Ok(store)
    }

    fn init(&self) -> Result<()> {
        let mut conn = self.conn()?;
        let ring = self.ring();
        let feed = self.inner.opts.change_feed;
        let client = conn.client()?;
        block_on(async move {
            let tx = client.transaction().await.map_err(|e| pg_err(&e))?;
            let check = schema::migrate(&tx).await?;
            match check {
                None => {
                    let sealed = ring.seal(KEY_CHECK_PLAINTEXT, &key_check_place());
                    tx.execute(
                        "INSERT INTO ls_key_check (id, key_id, sealed) VALUES (1, $1, $2)",
                        &[&i64::from(sealed.key_id.0), &sealed_bytes(&sealed)],
                    )
                    .await
                    .map_err(|e| pg_err(&e))?;
                }
                Some((key_id, bytes)) => {
                    let sealed = rows::sealed_from("meta", Some(bytes), Some(key_id))?
                        .ok_or_else(|| Error::Engine("key check missing".to_owned()))?;
                    match ring.open(&sealed, &key_check_place()) {
                        Ok(p) if p.as_slice() == KEY_CHECK_PLAINTEXT => {}
                        _ => {
                            return Err(Error::WrongKey {
                                store_key: sealed.key_id,
                                configured: ring
                                    .ids()
                                    .iter()
                                    .map(ToString::to_string)
                                    .collect::<Vec<_>>()
                                    .join(", "),
                            })
                        }
                    }
                }
            }
            feed::note_feed_mode(&tx, feed).await?;
            tx.commit().await.map_err(|e| pg_err(&e))
        })
    }

    /// A client from the pool, connecting a new one while under `max_connections`.
    pub(crate) fn conn(&self) -> Result<Conn<'_>> {
        let inner = &self.inner;
        let mut pool = inner
            .pool
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if let Some(c) = pool.idle.pop() {
                if c.is_closed() {
                    pool.open = pool.open.saturating_sub(1);
                    continue;
                }
                return Ok(Conn {
                    store: self,
                    client: Some(c),
                });
            }
            if pool.open < inner.opts.max_connections.max(1) {
                pool.open += 1;
                drop(pool);
                let made = self.connect();
                if made.is_err() {
                    let mut pool = inner
                        .pool
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    pool.open = pool.open.saturating_sub(1);
                    drop(pool);
                    inner.freed.notify_one();
                }
                return made.map(|c| Conn {
                    store: self,
                    client: Some(c),
                });
            }
            pool = inner
                .freed
                .wait(pool)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    fn connect(&self) -> Result<Client> {
        let rt = self
            .inner
            .rt
            .as_ref()
            .ok_or_else(|| Error::Unavailable("the store is closing".to_owned()))?;
        let url = self.inner.url.clone();
        let net = self.inner.net.clone();
        // The connect and the connection task run on the store's runtime; this thread waits.
        let task = rt.spawn(async move { connect_pg(&url, &net).await });
        block_on(task)
            .map_err(|e| Error::Join(e.to_string()))?
            .map_err(connect_err)
    }

    /// Runs `f` with a pooled client on this thread, again (at most [`MAX_ATTEMPTS`] in all,
    /// after a short random pause) when PostgreSQL aborted it for a serialization failure or a
    /// deadlock (`40001`, `40P01`). That is safe because every `f` here is one whole unit:
    /// a single statement, or one transaction it begins and commits itself, and PostgreSQL has
    /// rolled that unit back when it answers either code. Nothing else is retried (a lost
    /// connection may have committed: its caller decides).
    pub(crate) fn with<T>(&self, mut f: impl AsyncFnMut(&mut Client) -> Result<T>) -> Result<T> {
        let mut attempt = 1;
        loop {
            let mut conn = self.conn()?;
            let client = conn.client()?;
            let r = block_on(f(client));
            match conn.check(r) {
                Err(e) if attempt < MAX_ATTEMPTS && retryable(&e) => {
                    drop(conn);
                    std::thread::sleep(self.retry_noted(attempt, &e, "a transaction"));
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// [`PgStore::with`]'s retry for a unit an async caller runs on a connection of its own
    /// (the claim batcher's): `f` again, at most [`MAX_ATTEMPTS`] in all, while PostgreSQL
    /// aborts it for a serialization failure or a deadlock. `what` names the unit in the log.
    pub(crate) async fn retrying<T, F: Future<Output = Result<T>>>(
        &self,
        what: &'static str,
        mut f: impl FnMut() -> F,
    ) -> Result<T> {
        let mut attempt = 1;
        loop {
            match f().await {
                Err(e) if attempt < MAX_ATTEMPTS && retryable(&e) => {
                    tokio::time::sleep(self.retry_noted(attempt, &e, what)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Counts and logs the retry of `what` after attempt `attempt` failed with `e`, and
    /// returns the pause before the next attempt.
    fn retry_noted(&self, attempt: u32, e: &Error, what: &'static str) -> Duration {
        let pause = retry_pause(attempt);
        self.inner.retries.fetch_add(1, Ordering::Relaxed);
        if let Some(observe) = RETRY_OBSERVER.get() {
            observe();
        }
        tracing::warn!(attempt, unit = what, pause_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX), error = %e, "PostgreSQL aborted a unit (serialization failure or deadlock); running it again.");
        pause
    }

    /// The claim batcher's queue, starting the batcher on first use.
    fn claim_queue(&self) -> Result<claims::Queue> {
        let mut q = self
            .inner
            .claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(tx) = &*q {
            return Ok(tx.clone());
        }
        let tx = claims::start(&self.inner)?;
        *q = Some(tx.clone());
        Ok(tx)
    }

    /// Units run again after a serialization failure or deadlock, since this handle opened.
    #[must_use]
    pub fn retried(&self) -> u64 {
        self.inner.retries.load(Ordering::Relaxed)
    }

    pub(crate) fn ring(&self) -> &Keyring {
        &self.inner.ring
    }

    pub(crate) fn retention_ms(&self) -> u64 {
        u64::try_from(self.inner.opts.terminal_retention.as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn change_feed_on(&self) -> bool {
        self.inner.opts.change_feed
    }

    /// The schema version the database holds.
    pub fn schema_version(&self) -> Result<i32> {
        self.with(async |c| {
            let row = c
                .query_one("SELECT version FROM lark_service_schema WHERE id = 1", &[])
                .await
                .map_err(|e| pg_err(&e))?;
            row.try_get(0).map_err(|e| pg_err(&e))
        })
    }

    /// Row counts of the main tables (sessions, tokens, users, seen events).
    pub fn counts(&self) -> Result<super::StoreCounts> {
        self.with(async |c| row_counts(&*c).await)
    }
}

/// Row counts of the main tables as `c` sees them (a client, or a transaction's snapshot).
pub(crate) async fn row_counts(
    c: &impl tokio_postgres::GenericClient,
) -> Result<super::StoreCounts> {
    let row = c
        .query_one(
            "SELECT (SELECT count(*) FROM ls_sessions), (SELECT count(*) FROM ls_tokens),
                    (SELECT count(*) FROM ls_users), (SELECT count(*) FROM ls_seen_events)",
            &[],
        )
        .await
        .map_err(|e| pg_err(&e))?;
    let n = |i: usize| -> Result<u64> {
        let v: i64 = row.try_get(i).map_err(|e| pg_err(&e))?;
        Ok(u64::try_from(v).unwrap_or(0))
    };
    Ok(super::StoreCounts {
        sessions: n(0)?,
        tokens: n(1)?,
        users: n(2)?,
        seen_events: n(3)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_ending_the_connection_is_unavailable_not_an_engine_error() {
        for code in ["08000", "08003", "08006", "57P01", "57P02", "57P03"] {
            assert!(connection_lost(code), "{code}");
        }
        for code in ["57014", "55P03", "40001", "23505", "53300", "XX000"] {
            assert!(!connection_lost(code), "{code}");
        }
    }

    #[test]
    fn only_serialization_failures_and_deadlocks_are_retried() {
        let e = |code: &str| Error::Engine(format!("postgresql: some message ({code})"));
        assert!(retryable(&e("40001")));
        assert!(retryable(&e("40P01")));
        assert!(!retryable(&e("23505")));
        assert!(!retryable(&Error::Unavailable("closed (40001)".into())));
        for attempt in 1..MAX_ATTEMPTS {
            let p = retry_pause(attempt).as_millis();
            let base = 10 * u128::from(attempt);
            assert!((base..=4 * base).contains(&p), "{p}");
        }
    }
}
