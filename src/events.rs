//! The one event dispatcher behind both the long connection and the HTTP callbacks.
//!
//! It de-duplicates on `header.event_id` and, for `im.message.receive_v1`, also on the
//! message's `message_id` (the platform sometimes redelivers a message under a new event id),
//! runs the handler off the ACK path, and records seen ids durably in group commits. Rules:
//! - An id already seen (or being handled) is answered at once as a duplicate; the handler does
//!   not run again.
//! - At most `max_concurrent_handlers` handlers run at once (including slow ones finishing in
//!   the background); an event beyond that is answered as failed so the platform redelivers it
//!   later.
//! - The caller waits for the handler at most `ack_deadline`. A handler that fails inside the
//!   deadline is answered with a failure (the platform redelivers); one that is still running at
//!   the deadline is answered as accepted and finishes in the background.
//! - An id is recorded as seen only once its handler succeeded, so a failed event can be
//!   redelivered. Recording is batched by one writer thread into one write transaction per
//!   batch (one fsync for many events; the writer lets a batch gather for
//!   [`GROUP_COMMIT_LINGER`]) and never delays the answer: the ACK goes out once the handler
//!   is done and its ids are queued for the writer, not once they are committed.
//! - On redb the writer appends each batch to the store's seen-id log (a few pages at the log's
//!   growing edge per commit, where a write into the id-keyed table costs about a page per id:
//!   the ids are random) and moves the log into the id-keyed table every [`MERGE_EVERY`] ids or
//!   [`MERGE_AFTER`]. An id logged but not yet moved is *pinned* in memory: the bounded set of
//!   recent ids never evicts it, so a lookup never has to read the log.
//! - The store is asked about an id not in memory through a snapshot taken after the writer's
//!   last move ([`SEEN_SNAPSHOT_MAX_AGE`] at most), not a read transaction per event. On redb
//!   the dispatcher first loads the store's seen ids into memory (a background thread); once
//!   they are all there and none has been evicted since, memory alone answers (the store holds
//!   no id that memory does not), and a new id costs no B-tree lookup.
//! - On PostgreSQL (a fleet shares the store) an id not in memory is claimed in the database
//!   before the handler runs: the insert that commits first wins, so of instances given the
//!   same event at once one handles it. An instance that finds the id claimed by a handler
//!   still running elsewhere answers "failed" (the platform redelivers, and the redelivery
//!   finds the id recorded); a failed handler lets its claim go; the writer turns claims into
//!   records; a dead claimer's claim lapses after [`CLAIM_TTL`] (or 4 ACK deadlines).
//!
//! Every task the dispatcher starts belongs to the [`Supervisor`] it is built with: slow
//! handlers run on its tracker (drained at shutdown), and the writer is one of its writers,
//! which [`Dispatcher::close`] tells to commit what is queued and let go of the store.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

use crate::callbacks::Callback;
use crate::storage::{now_ms, Db, EventClaim, SeenSnapshot};
use crate::workers::Supervisor;

/// Where an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventSource {
    /// The long connection.
    WebSocket,
    /// An HTTP callback.
    Http,
}

impl EventSource {
    fn label(self) -> &'static str {
        match self {
            Self::WebSocket => "websocket",
            Self::Http => "http",
        }
    }
}

/// What a handler produced.
#[derive(Debug, Clone, PartialEq)]
pub enum HandlerReply {
    /// Handled; nothing to send back.
    Done,
    /// Handled; this JSON goes back to the platform (card callback response).
    Respond(serde_json::Value),
}

/// The answer the transport should give the platform.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Handled within the deadline.
    Handled(HandlerReply),
    /// Seen before (or being handled now): acknowledge, do nothing.
    Duplicate,
    /// Still running at the deadline: acknowledge; it finishes in the background.
    Accepted,
    /// The handler failed: answer with a failure so the platform redelivers.
    Failed,
}

/// A boxed future, for handlers.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The application's event handler.
pub type Handler =
    Arc<dyn Fn(Callback) -> BoxFuture<Result<HandlerReply, HandlerError>> + Send + Sync>;

/// Why a handler failed: the handler's own typed error, boxed (the dispatcher only logs it and
/// answers "failed" so that the platform redelivers).
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// Dispatcher settings.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// How long the transport waits for a handler before acknowledging anyway.
    pub ack_deadline: Duration,
    /// How long a seen id is remembered.
    pub seen_ttl: Duration,
    /// Ids remembered in memory (beyond this, the store answers).
    pub memory_ids: usize,
    /// Bytes the in-memory ids may take, whatever their count (see [`Recent`]).
    pub memory_bytes: usize,
    /// Handlers allowed to run at once; beyond this, events are answered as failed.
    pub max_concurrent_handlers: usize,
}

/// Seen-id records queued for the writer thread; a full queue makes handlers wait.
const SEEN_QUEUE: usize = 16_384;

/// A seen-id snapshot is replaced after each commit of the writer, and when it is this old:
/// what the sweep forgets is forgotten here too within this time. (On a quiet connection the
/// last snapshot stays open until the next event or [`Dispatcher::close`]; the store keeps the
/// pages it sees until then.)
const SEEN_SNAPSHOT_MAX_AGE: Duration = Duration::from_millis(20);

/// How long the seen-id writer lets ids gather after the first one before it commits them.
/// At 30 000 events/s that is about 60 ids a commit instead of a few; an id's record is
/// durable at most this much later (the ACK never waits for it).
const GROUP_COMMIT_LINGER: Duration = Duration::from_millis(2);

/// The redb writer moves its seen-id log into the id-keyed table once this many ids are
/// logged (or [`MERGE_AFTER`] after the first): the more ids one move takes, the more of them
/// share each page it writes (at 150 000 events, moves of 16 384 cost about 10 % more CPU
/// and doubled the ACK p99). Fewer when the dispatcher keeps fewer ids in memory: a quarter
/// of `memory_ids` (50 000 by default), at least 64. The price: that many ids pinned in memory
/// (16 bytes each, with the set's overhead), and a start after a crash moves up to that many.
const MERGE_EVERY: usize = 65_536;

/// …or once the oldest id not yet moved was logged this long ago (checked when the writer
/// commits: on an idle connection the log waits for the next event, or for close; a crash
/// leaves it to the next start, which moves it).
const MERGE_AFTER: Duration = Duration::from_secs(2);

/// Prefix of the de-duplication key made from a message's `message_id` (event ids never
/// start with it).
const MESSAGE_KEY_PREFIX: &str = "msg:";

/// The least time a claim in a shared store holds an event id (see `Dispatcher::claim_ttl`).
const CLAIM_TTL: Duration = Duration::from_secs(30);

/// What [`Dispatcher::claim`] decided about an id.
enum Claim {
    /// This dispatcher handles it.
    Mine,
    /// Handled before: a duplicate.
    Seen,
    /// Still being handled here past the ACK deadline (a delivery again before its first
    /// has ended): answered as failed, so the platform redelivers it and the redelivery finds
    /// it handled, or free if the handling failed. Answered as a duplicate instead, a
    /// handling that then failed would leave the event lost.
    InFlight,
    /// In flight on another instance of the fleet: answered as failed, so the platform
    /// redelivers it and the redelivery finds it handled (or, if that instance died, free).
    Elsewhere,
    /// The store could not answer (down, or a lost connection): not known to be new, so
    /// answered as failed and left to the platform's redelivery, never handled on a guess.
    Undecided,
}

impl Claim {
    /// How a delivery is answered when one of its keys (`what`: its event or its message)
    /// was claimed this way; counted and logged. Never asked of [`Claim::Mine`] (which would
    /// be answered as failed: the platform delivers again).
    fn refusal(self, what: &str) -> Outcome {
        let m = crate::metrics::get();
        let (counted, why, outcome) = match self {
            Claim::Mine | Claim::Undecided => return Outcome::Failed,
            Claim::Seen => (
                &m.events_deduplicated,
                "Duplicate ignored (this event or message was handled).",
                Outcome::Duplicate,
            ),
            Claim::InFlight => (
                &m.events_in_flight,
                "Still being handled here; asking the platform to redeliver.",
                Outcome::Failed,
            ),
            Claim::Elsewhere => (
                &m.events_claimed_elsewhere,
                "Another instance is handling it; asking the platform to redeliver.",
                Outcome::Failed,
            ),
        };
        counted.inc();
        debug!(key = what, "{why}");
        outcome
    }
}

/// What memory alone says of a delivery (see [`Recent::claim`]).
enum Memory {
    New,
    /// Being handled here: resolves when that handling ends.
    InFlight(std::pin::Pin<Box<tokio::sync::futures::OwnedNotified>>),
    Seen,
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Default for DispatchConfig {
    /// 2.5 s ACK deadline; seen ids kept 24 h (the platform's redelivery ladder spans about
    /// 6 h, so this leaves ample margin); 200 000 ids in memory; 256 concurrent handlers.
    fn default() -> Self {
        Self {
            ack_deadline: Duration::from_millis(2500),
            seen_ttl: Duration::from_secs(24 * 3600),
            memory_ids: 200_000,
            memory_bytes: 32 * 1024 * 1024,
            max_concurrent_handlers: 256,
        }
    }
}

/// The dispatcher (cheap to clone).
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher").finish_non_exhaustive()
    }
}

/// Told about a handler that failed after its event was already acknowledged as accepted
/// (the platform will not redeliver it): the open_id of the person who sent it, if known, and
/// the event type. The service sends that person a message, so the failure is not silent.
pub type LateFailureHook = Arc<dyn Fn(Option<String>, String) -> BoxFuture<()> + Send + Sync>;

struct Inner {
    store: Db,
    cfg: DispatchConfig,
    handler: std::sync::RwLock<Option<Handler>>,
    late_failure: std::sync::RwLock<Option<LateFailureHook>>,
    /// Shared with the writer, which unpins ids once they are moved out of the store's log.
    recent: Arc<Mutex<Recent>>,
    seen_tx: mpsc::Sender<SeenMsg>,
    handlers: Arc<Semaphore>,
    /// Where slow handlers (and the long connection's dispatches) run.
    tasks: TaskTracker,
    /// The writer, until [`Dispatcher::close`] joins it.
    /// And the thread loading the store's seen ids (redb), until it is joined there too.
    writer: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The seen ids as of the writer's last commit, for the lookups in [`Dispatcher::claim`]
    /// (one read transaction per commit instead of one per event), with the commit count and
    /// the time it was taken at.
    seen: Mutex<Option<(u64, Instant, Arc<SeenSnapshot>)>>,
    /// Commits the seen-id writer has made (bumped after each).
    commits: Arc<AtomicU64>,
    /// `events_received{source}` for the long connection and for HTTP, looked up once.
    received_ws: crate::metrics::CounterHandle,
    received_http: crate::metrics::CounterHandle,
}

/// A handler slot; counted in the in-flight gauge until dropped.
struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit) -> Self {
        crate::metrics::get().event_handlers_inflight.inc();
        Self { _permit: permit }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        crate::metrics::get().event_handlers_inflight.dec();
    }
}

/// Messages to the seen-id writer.
enum SeenMsg {
    /// Record this id.
    Id(String),
    /// Answer once everything before this message is committed.
    Flush(tokio::sync::oneshot::Sender<()>),
    /// Commit everything before this message, then stop.
    Close,
}

/// Ids seen or in flight, bounded in count and in bytes, oldest evicted first. Each id is
/// held as a 128-bit digest (see [`IdDigest`]), so an entry is a fixed 16 bytes whatever the
/// id's length, and neither a claim nor an eviction allocates. A *pinned* id (in the store's
/// seen-id log, not yet in its id-keyed table, which is all a lookup reads) is never evicted:
/// it stays until the writer has moved it and unpins it. Pins are bounded by the writer's
/// queue and its move interval (tens of thousands of ids at most), beyond the set's bounds.
struct Recent {
    set: HashSet<u128, DigestBuild>,
    pinned: HashSet<u128, DigestBuild>,
    /// Ids claimed here whose handling has not ended (neither recorded nor let go): a second
    /// delivery of one is not a duplicate yet (the handling may still fail), and waits for
    /// the end (told through the `Notify`, made when the first such delivery waits). Never
    /// evicted; bounded by the handlers running at once.
    flying: HashMap<u128, Option<Arc<tokio::sync::Notify>>, DigestBuild>,
    /// Every id the store held when the dispatcher started has been loaded.
    loaded: bool,
    /// An id has left `set` for the bounds (not one released): memory no longer holds every
    /// id the store holds.
    evicted: bool,
    order: VecDeque<u128>,
    /// Estimated bytes held by `set` and `order` (see [`Recent::COST`]).
    bytes: usize,
    digest: IdDigest,
}

impl Default for Recent {
    fn default() -> Self {
        Self {
            set: HashSet::with_hasher(DigestBuild),
            pinned: HashSet::with_hasher(DigestBuild),
            flying: HashMap::with_hasher(DigestBuild),
            loaded: false,
            evicted: false,
            order: VecDeque::new(),
            bytes: 0,
            digest: IdDigest::new(),
        }
    }
}

/// A 128-bit digest of an id: two SipHash-1-3 runs under this process's two random keys
/// (std's `RandomState`). Two ids share a digest with probability about 2^-128 per pair, and
/// the keys are unknown outside the process, so nobody can make them collide on purpose: a
/// collision would answer a new event as a duplicate, so this must not be guessable.
struct IdDigest {
    lo: std::collections::hash_map::RandomState,
    hi: std::collections::hash_map::RandomState,
}

impl IdDigest {
    fn new() -> Self {
        Self {
            lo: std::collections::hash_map::RandomState::new(),
            hi: std::collections::hash_map::RandomState::new(),
        }
    }

    fn of(&self, id: &str) -> u128 {
        use std::hash::BuildHasher;
        (u128::from(self.hi.hash_one(id)) << 64) | u128::from(self.lo.hash_one(id))
    }
}

/// The set's hasher: a digest is already uniformly spread, so its low 64 bits are the hash.
#[derive(Clone, Copy, Default)]
struct DigestBuild;

impl std::hash::BuildHasher for DigestBuild {
    type Hasher = DigestHasher;
    fn build_hasher(&self) -> DigestHasher {
        DigestHasher(0)
    }
}

#[derive(Default)]
struct DigestHasher(u64);

impl std::hash::Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not used by `u128` keys (they call `write_u128`); kept correct for any other input.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, n: u128) {
        // Truncation on purpose: the low half of a uniform digest.
        #[allow(clippy::cast_possible_truncation)]
        let low = n as u64;
        self.0 = low;
    }
}

impl Recent {
    /// `m` locked; a lock poisoned by a panic elsewhere is taken as it is.
    fn lock(m: &Mutex<Recent>) -> std::sync::MutexGuard<'_, Recent> {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What one id costs: its digest twice (set and queue) plus the hash table's slot
    /// overhead, whatever the id's length.
    const COST: usize = 2 * std::mem::size_of::<u128>() + 16;

    fn insert(&mut self, id: &str, cap: usize, max_bytes: usize) -> bool {
        let d = self.digest.of(id);
        self.insert_digest(d, cap, max_bytes)
    }

    fn insert_digest(&mut self, d: u128, cap: usize, max_bytes: usize) -> bool {
        if !self.set.insert(d) {
            return false;
        }
        self.order.push_back(d);
        self.bytes += Self::COST;
        self.evict(cap, max_bytes);
        true
    }

    /// What memory says of a delivery of `id`: new (now held, and in flight until
    /// [`Recent::landed`] or [`Recent::remove`]), still in flight here, or seen.
    fn claim(&mut self, id: &str, cap: usize, max_bytes: usize) -> Memory {
        let d = self.digest.of(id);
        if let Some(waiters) = self.flying.get_mut(&d) {
            let n = waiters.get_or_insert_with(Default::default).clone();
            let mut ended = Box::pin(n.notified_owned());
            // Enabled under the lock that `landed` and `remove` take: no end goes unseen.
            ended.as_mut().enable();
            return Memory::InFlight(ended);
        }
        if !self.insert_digest(d, cap, max_bytes) {
            return Memory::Seen;
        }
        self.flying.insert(d, None);
        Memory::New
    }

    /// The handling of `id` has ended and it stays seen (recorded, or found recorded).
    fn landed(&mut self, id: &str) {
        let d = self.digest.of(id);
        self.end_flight(d);
    }

    /// Tells deliveries waiting on `d`'s handling that it has ended.
    fn end_flight(&mut self, d: u128) {
        if let Some(Some(waiters)) = self.flying.remove(&d) {
            waiters.notify_waiters();
        }
    }

    /// Evicts the oldest ids beyond the bounds, passing over pinned ones (moved to the back).
    fn evict(&mut self, cap: usize, max_bytes: usize) {
        let mut turns = self.order.len();
        while turns > 0
            && (self.order.len() > cap || (self.bytes > max_bytes && self.order.len() > 1))
        {
            turns -= 1;
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if self.pinned.contains(&old) || self.flying.contains_key(&old) {
                self.order.push_back(old);
                continue;
            }
            self.bytes = self.bytes.saturating_sub(Self::COST);
            if self.set.remove(&old) {
                self.evicted = true;
            }
        }
    }

    /// Whether memory holds every id the store holds (see [`Dispatcher::claim`]).
    fn complete(&self) -> bool {
        self.loaded && !self.evicted
    }

    /// Holds `id` (adding it if it was evicted meanwhile) until [`Recent::unpin`].
    #[cfg(test)]
    fn pin(&mut self, id: &str, cap: usize, max_bytes: usize) {
        let d = self.digest.of(id);
        self.pin_digest(d, cap, max_bytes);
    }

    fn pin_digest(&mut self, d: u128, cap: usize, max_bytes: usize) {
        self.pinned.insert(d);
        if self.set.insert(d) {
            self.order.push_back(d);
            self.bytes += Self::COST;
            self.evict(cap, max_bytes);
        }
    }

    /// Lets `id` be evicted again.
    fn unpin(&mut self, id: &str) {
        let d = self.digest.of(id);
        self.pinned.remove(&d);
    }

    fn remove(&mut self, id: &str) {
        let d = self.digest.of(id);
        self.set.remove(&d);
        self.end_flight(d);
        // The order queue may keep a stale entry; it only bounds memory.
    }

    #[cfg(test)]
    fn contains(&self, id: &str) -> bool {
        self.set.contains(&self.digest.of(id))
    }
}

impl Dispatcher {
    /// A dispatcher over `store`, its tasks owned by `sup`. Starts the seen-id writer (one of
    /// `sup`'s writers); it stops at [`Dispatcher::close`] or when the last clone is dropped.
    #[must_use]
    pub fn new(store: impl Into<Db>, cfg: DispatchConfig, sup: &Supervisor) -> Self {
        let store: Db = store.into();
        let (seen_tx, seen_rx) = mpsc::channel(SEEN_QUEUE);
        let handlers = Arc::new(Semaphore::new(
            cfg.max_concurrent_handlers.clamp(1, Semaphore::MAX_PERMITS),
        ));
        let ttl_ms = u64::try_from(cfg.seen_ttl.as_millis()).unwrap_or(u64::MAX);
        let writer_store = store.clone();
        let commits = Arc::new(AtomicU64::new(0));
        let recent = Arc::new(Mutex::new(Recent::default()));
        let w = SeenWriter {
            store: writer_store,
            ttl_ms,
            commits: commits.clone(),
            recent: recent.clone(),
            merge_at: (cfg.memory_ids / 4).clamp(64, MERGE_EVERY),
        };
        let mut writers = vec![sup.spawn_writer(move || w.run(seen_rx))];
        if let Db::Redb(s) = &store {
            let (s, recent, cfg) = (s.clone(), recent.clone(), cfg.clone());
            writers.push(sup.spawn_writer(move || load_seen(&s, &recent, &cfg)));
        }
        Self {
            inner: Arc::new(Inner {
                store,
                cfg,
                handler: std::sync::RwLock::new(None),
                late_failure: std::sync::RwLock::new(None),
                recent,
                seen_tx,
                handlers,
                tasks: sup.tracker(),
                writer: Mutex::new(writers),
                seen: Mutex::new(None),
                commits,
                received_ws: received(EventSource::WebSocket),
                received_http: received(EventSource::Http),
            }),
        }
    }

    /// Installs the hook told about failures after an "accepted" answer.
    pub fn set_late_failure_hook(&self, h: LateFailureHook) {
        *self
            .inner
            .late_failure
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(h);
    }

    /// Installs the application's handler (events before this are answered as failed, so the
    /// platform redelivers them).
    pub fn set_handler(&self, h: Handler) {
        *self
            .inner
            .handler
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(h);
    }

    /// Handles one callback from `source` and says how to answer.
    pub async fn dispatch(&self, cb: Callback, source: EventSource) -> Outcome {
        let m = crate::metrics::get();
        match source {
            EventSource::WebSocket => self.inner.received_ws.inc(),
            EventSource::Http => self.inner.received_http.inc(),
        };
        let sender = match &cb {
            Callback::Event(e) => e.sender_open_id.clone(),
            Callback::CardAction(c) => c.operator_id().map(str::to_owned),
            Callback::UrlVerification { .. } => None,
        };
        let (event_id, event_type, message_key) = match &cb {
            Callback::Event(e) => (e.event_id.clone(), e.event_type.clone(), message_key(e)),
            Callback::CardAction(c) => (
                c.envelope.event_id.clone(),
                c.envelope.event_type.clone(),
                None,
            ),
            Callback::UrlVerification { .. } => return Outcome::Handled(HandlerReply::Done),
        };
        let span = tracing::info_span!("event", event_id = %event_id, event_type = %event_type, source = source.label());
        async move {
            // Every key of this event: its event id, and its message's id when it has one.
            let keys: Vec<String> = std::iter::once(event_id.clone())
                .chain(message_key)
                .collect();
            // One claim time for every key: a release deletes only the claims made with it.
            let now = now_ms();
            let until = now.saturating_add(duration_ms(self.claim_ttl()));
            // One answer deadline for the whole delivery: waiting on a claim and on the handler
            // together never holds its ACK past it.
            let deadline = tokio::time::Instant::now() + self.inner.cfg.ack_deadline;
            if let Err(refused) = self.claim(&keys, until, now, deadline).await {
                return refused;
            }
            let Ok(permit) = self.inner.handlers.clone().try_acquire_owned() else {
                self.release(&keys, until, deadline).await;
                m.events_overloaded.inc();
                warn!(
                    limit = self.inner.cfg.max_concurrent_handlers,
                    "Too many event handlers running; asking the platform to redeliver."
                );
                return Outcome::Failed;
            };
            let slot = Slot::new(permit);
            let handler = self
                .inner
                .handler
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let Some(handler) = handler else {
                self.release(&keys, until, deadline).await;
                warn!("No handler installed yet; asking the platform to redeliver.");
                return Outcome::Failed;
            };
            let me = self.clone();
            let ids = keys.clone();
            // Set once the event has been answered "accepted": a failure after that is late.
            let answered = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let late = answered.clone();
            let late_type = event_type.clone();
            let mut work: BoxFuture<Result<HandlerReply, HandlerError>> = Box::pin(
                async move {
                    // The slot is held until the handler is done, even past the ACK deadline.
                    let _slot = slot;
                    let r = handler(cb).await;
                    match &r {
                        Ok(_) => me.record_seen(ids).await,
                        Err(e) => {
                            me.release(&ids, until, deadline).await;
                            crate::metrics::get().event_handler_failures.inc();
                            warn!(error = %e, "Event handler failed.");
                            if late.load(std::sync::atomic::Ordering::SeqCst) {
                                me.late_failure(sender, late_type).await;
                            }
                        }
                    }
                    r
                }
                .in_current_span(),
            );
            // Most handlers finish without waiting on anything: one poll, no task, no timer.
            // One that is not done goes to its own task, so it never holds the ACK path.
            let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                futures_util::FutureExt::now_or_never(&mut work)
            }));
            match polled {
                Ok(Some(Ok(reply))) => {
                    debug!("Event handled.");
                    return Outcome::Handled(reply);
                }
                Ok(Some(Err(_))) => return Outcome::Failed,
                Err(_) => {
                    self.release(&keys, until, deadline).await;
                    warn!("Event handler panicked.");
                    return Outcome::Failed;
                }
                Ok(None) => {}
            }
            let task = self.inner.tasks.spawn(work);
            match tokio::time::timeout_at(deadline, task).await {
                Ok(Ok(Ok(reply))) => {
                    debug!("Event handled.");
                    Outcome::Handled(reply)
                }
                Ok(Ok(Err(_))) => Outcome::Failed,
                Ok(Err(join)) => {
                    self.release(&keys, until, deadline).await;
                    warn!(error = %join, "Event handler panicked.");
                    Outcome::Failed
                }
                Err(_) => {
                    answered.store(true, std::sync::atomic::Ordering::SeqCst);
                    warn!(
                        deadline_ms = u64::try_from(self.inner.cfg.ack_deadline.as_millis())
                            .unwrap_or(u64::MAX),
                        "Event handler is slow; acknowledging and letting it finish."
                    );
                    Outcome::Accepted
                }
            }
        }
        .instrument(span)
        .await
    }

    /// A handler failed after its event was answered "accepted": the platform will not send it
    /// again, so tell the person (through the hook), or at least say so in the log.
    async fn late_failure(&self, sender: Option<String>, event_type: String) {
        let hook = self
            .inner
            .late_failure
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match hook {
            Some(h) => h(sender, event_type).await,
            None => {
                warn!(event_type = %event_type, "An event acknowledged as accepted failed afterwards and nobody can be told.");
            }
        }
    }

    /// Whether this dispatcher handles the delivery whose keys are `keys` (its event id, and
    /// its message's id when it has one): each neither seen nor in flight here, and (on
    /// PostgreSQL) claimed in the database before any other instance of the fleet; marks them
    /// in flight. Else how the delivery is answered (the event id's refusal counts first), with
    /// every key it took let go again. The keys are claimed in the database together (until
    /// `claim_until`, as of `now`): one statement decides them, so of two instances given the
    /// same event (or the same message) at once, one takes every key; claimed apart, each could
    /// take one and both let the event go. The claim goes through the store's claim batcher
    /// and is awaited; on redb nothing is awaited (ready on first poll).
    async fn claim(
        &self,
        keys: &[String],
        claim_until: u64,
        now: u64,
        deadline: tokio::time::Instant,
    ) -> Result<(), Outcome> {
        let what = |i: usize| if i == 0 { "event" } else { "message" };
        let memory =
            futures_util::future::join_all(keys.iter().map(|k| self.claim_in_memory(k, deadline)))
                .await;
        // A key memory refuses refuses the delivery: the store is not asked, and the keys
        // taken here go back.
        let refused_here = memory.iter().any(Result::is_err);
        // The store is asked about the keys memory cannot answer alone (it holds every stored
        // id only on redb, once loaded: see `load_seen`).
        let ask: Vec<&str> = if refused_here {
            Vec::new()
        } else {
            keys.iter()
                .zip(&memory)
                .filter(|(_, m)| matches!(m, Ok(false)))
                .map(|(k, _)| k.as_str())
                .collect()
        };
        let mut judged = if ask.is_empty() {
            Vec::new()
        } else {
            self.claim_in_store(&ask, claim_until, now, deadline)
                .await
                .ok_or(Outcome::Failed)?
        }
        .into_iter();
        let mut refusal = None;
        let mut won = Vec::new();
        for (i, (k, m)) in keys.iter().zip(memory).enumerate() {
            let c = match m {
                Err(c) => c,
                Ok(_) if refused_here => {
                    self.forget_recent(k);
                    continue;
                }
                Ok(true) => Claim::Mine,
                Ok(false) => judged.next().unwrap_or(Claim::Undecided),
            };
            match c {
                Claim::Mine => won.push(k.clone()),
                c => {
                    refusal.get_or_insert((c, what(i)));
                }
            }
        }
        let Some((c, w)) = refusal else {
            return Ok(());
        };
        // A key won beside a refused one is let go again.
        if !won.is_empty() {
            self.release(&won, claim_until, deadline).await;
        }
        Err(c.refusal(w))
    }

    /// The store's part of a claim of `ids` (new here, not known to memory): one request, so
    /// on PostgreSQL one statement decides them all; each id's answer judged. `None` when the
    /// store cannot say (down, or not within `deadline`): the ids go back, and the delivery
    /// is refused.
    async fn claim_in_store(
        &self,
        ids: &[&str],
        claim_until: u64,
        now: u64,
        deadline: tokio::time::Instant,
    ) -> Option<Vec<Claim>> {
        // Its record's time, were it handled: the claim carries it, so on PostgreSQL the settle
        // turns the claim into the record in place (the record is kept `seen_ttl` from now, the
        // claim's time, rather than from the settle's, a handler's run earlier).
        let keep = now.saturating_add(duration_ms(self.inner.cfg.seen_ttl));
        let claimed = tokio::time::timeout_at(
            deadline,
            self.inner
                .store
                .claim_events_batched(ids, claim_until, keep, now),
        )
        .await
        .unwrap_or_else(|_| {
            // Not decided within the answer deadline (a slow or stuck database): refused, so
            // the ACK still goes out in time. Were the claim won after all, it lapses
            // (`claim_ttl`) and a later redelivery is handled.
            Err(crate::storage::Error::Unavailable(
                "the claim was not decided within the ACK deadline".to_owned(),
            ))
        });
        match claimed {
            Ok(answers) => Some(
                ids.iter()
                    .zip(answers)
                    .map(|(id, a)| self.judge(id, claim_until, a))
                    .collect(),
            ),
            Err(e) => {
                // The store cannot say whether it was handled (or claimed elsewhere): refuse,
                // and the platform delivers it again (at about 15 s, 5 min, 1 h and 6 h).
                for id in ids {
                    self.forget_recent(id);
                }
                warn!(error = %e, "Claiming the event id failed; asking the platform to redeliver.");
                None
            }
        }
    }

    /// Memory's part of a claim of `id`: `Ok` when it is new here (marked in flight now;
    /// `true` when memory holds every stored id, so the store need not be asked), else how
    /// memory refuses it. A delivery of an id being handled here waits (within `deadline`)
    /// for that handling to end.
    async fn claim_in_memory(
        &self,
        id: &str,
        deadline: tokio::time::Instant,
    ) -> Result<bool, Claim> {
        let (cap, max_bytes) = (self.inner.cfg.memory_ids, self.inner.cfg.memory_bytes);
        let mut waited = false;
        loop {
            let ended = {
                let mut recent = Recent::lock(&self.inner.recent);
                match recent.claim(id, cap, max_bytes) {
                    Memory::New => return Ok(recent.complete()),
                    Memory::Seen => return Err(Claim::Seen),
                    Memory::InFlight(_) if waited => return Err(Claim::InFlight),
                    Memory::InFlight(ended) => ended,
                }
            };
            // Delivered again while its first delivery is handled here: wait (within the
            // ACK deadline) for that to end. Handled: a duplicate; let go: this delivery
            // claims it afresh; still running: refused, so the platform delivers it again.
            let _ = tokio::time::timeout_at(deadline, ended).await;
            waited = true;
        }
    }

    /// What the store's answer for `id` (claimed until `claim_until`) means for this
    /// dispatcher; `id` is in flight here until then.
    fn judge(&self, id: &str, claim_until: u64, claimed: EventClaim) -> Claim {
        match claimed {
            EventClaim::Won => return Claim::Mine,
            // A record (handled). A row of schema 7 reads as a record even when it is a
            // claim: one held no longer than this delivery's own claim is refused below, as
            // every held id was before schema 8 told the two apart.
            EventClaim::Recorded(t) if t > claim_until => {
                self.landed(id);
                return Claim::Seen;
            }
            EventClaim::Held(_) | EventClaim::Recorded(_) => {
                // In flight on another instance (whatever its claim's length or its clock),
                // or let go meanwhile, or a record about to lapse: this instance does not
                // handle it now, and the platform's redelivery finds it handled, or free.
                self.forget_recent(id);
                return Claim::Elsewhere;
            }
            EventClaim::NotShared => {}
        }
        // A read of one key in a hot B-tree (redb readers never wait for the writer): cheaper
        // inline than a hop to the blocking pool, which cost more than the lookup itself.
        match self.seen_before(id) {
            Ok(false) => Claim::Mine,
            Ok(true) => {
                self.landed(id);
                Claim::Seen
            }
            Err(e) => {
                // As above: not known to be new, so not handled now.
                self.forget_recent(id);
                warn!(error = %e, "Seen-id lookup failed; asking the platform to redeliver.");
                Claim::Undecided
            }
        }
    }

    /// How long a claim in a shared store keeps other instances off an event: past the ACK
    /// deadline (every live handler is answered by then, and the platform redelivers only what
    /// was not acknowledged), and long enough for a slow handler to finish; a claimer that
    /// died lets its events be handled elsewhere once this passes.
    fn claim_ttl(&self) -> Duration {
        CLAIM_TTL
            .max(self.inner.cfg.ack_deadline.saturating_mul(4))
            .min(self.inner.cfg.seen_ttl)
    }

    /// `id` stays seen, and is no longer in flight here.
    fn landed(&self, id: &str) {
        Recent::lock(&self.inner.recent).landed(id);
    }

    fn forget_recent(&self, id: &str) {
        Recent::lock(&self.inner.recent).remove(id);
    }

    /// Whether the store holds `id`, through a snapshot taken after the writer's last commit
    /// (and at most [`SEEN_SNAPSHOT_MAX_AGE`] ago): every id this process recorded is in it
    /// or still in `recent`, and every id recorded before the process started is in it, so it
    /// answers as a fresh read transaction would, without opening one per event.
    fn seen_before(&self, id: &str) -> crate::storage::Result<bool> {
        if self.inner.seen_tx.is_closed() || self.inner.store.is_postgres() {
            // After close: hold no snapshot (the store is about to be let go of). On
            // PostgreSQL the database is asked: other instances write to it too.
            return self.inner.store.event_seen(id);
        }
        let commits = self.inner.commits.load(Ordering::Acquire);
        let snapshot = {
            let mut cached = self
                .inner
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match &*cached {
                Some((at, taken, s))
                    if *at == commits && taken.elapsed() < SEEN_SNAPSHOT_MAX_AGE =>
                {
                    s.clone()
                }
                _ => {
                    // Drop the old one first (its read transaction) before opening the next.
                    *cached = None;
                    let Some(s) = self.inner.store.seen_snapshot()? else {
                        return self.inner.store.event_seen(id);
                    };
                    let s = Arc::new(s);
                    *cached = Some((commits, Instant::now(), s.clone()));
                    s
                }
            }
        };
        snapshot.contains(id)
    }

    /// Lets ids this dispatcher claimed go (their handler failed or never ran), here and in a
    /// shared store (only the claims made until `until`: not one another holder took since),
    /// so a redelivery is handled wherever it lands. Waits for the shared store at most until
    /// `deadline` (the delivery's answer is not held past it); the release, once asked for,
    /// is carried out even when nobody waits for it any more.
    async fn release(&self, ids: &[String], until: u64, deadline: tokio::time::Instant) {
        {
            let mut recent = Recent::lock(&self.inner.recent);
            for id in ids {
                recent.remove(id);
            }
        }
        if self.inner.store.is_postgres() {
            let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            // Awaited, through the claim batcher: no runtime thread waits on the database.
            let released = self.inner.store.release_events_queued(&refs, until);
            match tokio::time::timeout_at(deadline, released).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    // The claim lapses on its own (`claim_ttl`); until then redeliveries wait.
                    warn!(error = %e, "Letting claimed event ids go failed.");
                }
                Err(_) => debug!(
                    "Letting claimed event ids go is still under way at the answer deadline."
                ),
            }
        }
    }

    async fn record_seen(&self, ids: Vec<String>) {
        {
            let (cap, max_bytes) = (self.inner.cfg.memory_ids, self.inner.cfg.memory_bytes);
            let pin = !self.inner.store.is_postgres();
            let mut recent = Recent::lock(&self.inner.recent);
            for id in &ids {
                let d = recent.digest.of(id);
                // Handled: a delivery from now on is a duplicate.
                recent.end_flight(d);
                if pin {
                    // Kept in memory until the writer has moved it into the store's id-keyed
                    // table (see `Recent`): lookups read only that table.
                    recent.pin_digest(d, cap, max_bytes);
                }
            }
        }
        let mut unsent = Vec::new();
        for id in ids {
            if let Err(mpsc::error::SendError(SeenMsg::Id(id))) =
                self.inner.seen_tx.send(SeenMsg::Id(id)).await
            {
                unsent.push(id);
            }
        }
        // The writer is closed (shutdown). On a shared store a claim must still become a
        // record, or it lapses and another instance handles the event again. Through the
        // claim batcher, awaited: this task's runtime thread does not wait on PostgreSQL.
        let refs = keyable(&unsent);
        if !refs.is_empty() && self.inner.store.is_postgres() {
            let forget_at = now_ms().saturating_add(duration_ms(self.inner.cfg.seen_ttl));
            if let Err(e) = self
                .inner
                .store
                .settle_events_queued(&refs, forget_at)
                .await
            {
                unrecorded(&e, refs.len());
            }
        }
    }

    /// Runs `task` on the supervisor's tracker (drained at shutdown).
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.inner.tasks.spawn(task);
    }

    /// Commits every id recorded so far, stops the writer and waits until it has let go of
    /// the store. Ids recorded afterwards are not kept (their events may be handled again
    /// after a restart: at-least-once). Call once the handlers are done (shutdown).
    pub async fn close(&self) {
        let _ = self.inner.seen_tx.send(SeenMsg::Close).await;
        let writers = std::mem::take(
            &mut *self
                .inner
                .writer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for w in writers {
            if let Err(e) = w.await {
                warn!(error = %e, "The seen-id writer failed.");
            }
        }
        // The snapshot holds a read transaction: let go of it with the store. (The writer has
        // stopped, so no lookup takes another one: see `seen_before`.)
        *self
            .inner
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    /// Waits until every id recorded so far is committed (tests, shutdown).
    pub async fn flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.inner.seen_tx.send(SeenMsg::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// The `events_received` counter of `source`.
fn received(source: EventSource) -> crate::metrics::CounterHandle {
    crate::metrics::get()
        .events_received
        .get_or_create(&crate::metrics::SourceLabel {
            source: source.label(),
        })
        .clone()
}

/// The extra de-duplication key of an `im.message.receive_v1` event: its
/// `event.message.message_id`, prefixed so it cannot collide with an event id.
fn message_key(e: &crate::callbacks::EventEnvelope) -> Option<String> {
    if e.event_type != "im.message.receive_v1" {
        return None;
    }
    e.message_id
        .as_deref()
        .filter(|id| !id.is_empty())
        .map(|id| format!("{MESSAGE_KEY_PREFIX}{id}"))
}

/// Loads the ids a redb store holds into memory, a chunk per lock, and marks memory complete
/// when they all fit: from then on a new id is answered from memory alone. Ids recorded
/// meanwhile are in memory already (claimed, then pinned until moved into the store); the
/// store has nothing that did not pass through here or through this process. A store with
/// more ids than memory keeps evicts some while loading, so it never becomes complete and
/// lookups keep going to the store, as before.
fn load_seen(store: &crate::storage::Store, recent: &Mutex<Recent>, cfg: &DispatchConfig) {
    let started = Instant::now();
    let mut chunk: Vec<String> = Vec::with_capacity(1024);
    let mut total = 0usize;
    let put = |chunk: &mut Vec<String>| {
        let mut r = Recent::lock(recent);
        for id in chunk.drain(..) {
            r.insert(&id, cfg.memory_ids, cfg.memory_bytes);
        }
        r.evicted
    };
    let walked = store.seen_snapshot().and_then(|snap| {
        snap.for_each_id(|id| {
            chunk.push(id.to_owned());
            total += 1;
            // Stop early once memory cannot hold them all: it will never be complete.
            !(chunk.len() == chunk.capacity() && put(&mut chunk))
        })
    });
    if let Err(e) = walked {
        warn!(error = %e, "Loading the seen event ids failed; lookups go to the store.");
        return;
    }
    put(&mut chunk);
    let mut r = Recent::lock(recent);
    r.loaded = true;
    debug!(
        ids = total,
        complete = r.complete(),
        load_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "Seen event ids loaded."
    );
}

/// The ids of `ids` the store can key; those it cannot are logged (by count only) and left
/// out, so one bad id never costs the others their record.
fn keyable(ids: &[String]) -> Vec<&str> {
    let refs: Vec<&str> = ids
        .iter()
        .map(String::as_str)
        .filter(|id| crate::storage::valid_event_key(id))
        .collect();
    if refs.len() < ids.len() {
        warn!(
            skipped = ids.len() - refs.len(),
            "Seen ids the store cannot key were skipped (empty or over {} bytes).",
            crate::storage::MAX_EVENT_KEY_BYTES
        );
    }
    refs
}

/// Records `ids` as seen in one transaction (an id the store would refuse is skipped).
fn commit_seen(store: &Db, ids: &[String], forget_at: u64) {
    let refs = keyable(ids);
    if refs.is_empty() {
        return;
    }
    // `settle_events`: on PostgreSQL the dispatcher's claims become records.
    if let Err(e) = store.settle_events(&refs, forget_at) {
        unrecorded(&e, refs.len());
    }
}

/// Logs that `count` handled ids could not be recorded.
fn unrecorded(e: &crate::storage::Error, count: usize) {
    warn!(error = %e, count, "Recording seen event ids failed; redeliveries may be handled twice.");
}

/// The writer thread's state.
struct SeenWriter {
    store: Db,
    ttl_ms: u64,
    /// Bumped after each commit a lookup must see (see `Dispatcher::seen_before`).
    commits: Arc<AtomicU64>,
    recent: Arc<Mutex<Recent>>,
    /// Logged ids that make the writer move the log (see [`MERGE_EVERY`]).
    merge_at: usize,
}

/// The seen-id writer's nice value (see [`lower_priority`]).
const WRITER_NICE: i32 = 10;

/// Lowers this thread's scheduling priority to [`WRITER_NICE`] (never raises it). No ACK waits
/// for the writer, but its work comes in bursts (a move of the log rewrites many pages at
/// once), and on a machine with few cores a burst at equal priority delays the threads that
/// read frames and send ACKs. With this, under contention, they go first; the writer's work
/// waits (its queue holds back handlers only when full). The writer runs until shutdown, so
/// the pool thread it runs on keeps this priority only for the little work done after it.
fn lower_priority() {
    let tid = rustix::thread::gettid();
    let now = rustix::process::getpriority_process(Some(tid)).unwrap_or(0);
    if now < WRITER_NICE {
        if let Err(e) = rustix::process::setpriority_process(Some(tid), WRITER_NICE) {
            debug!(error = %e, "Could not lower the seen-id writer's priority.");
        }
    }
}

/// Ids in the store's seen-id log that the writer has not moved yet (redb).
#[derive(Default)]
struct Logged {
    ids: Vec<String>,
    since: Option<Instant>,
}

impl SeenWriter {
    /// Drains whatever ids are queued and commits them in one transaction, until closed.
    fn run(&self, mut rx: mpsc::Receiver<SeenMsg>) {
        lower_priority();
        let mut logged = Logged::default();
        let mut open = true;
        while open {
            let Some(first) = rx.blocking_recv() else {
                break;
            };
            let mut ids = Vec::new();
            let mut flushes = Vec::new();
            if matches!(first, SeenMsg::Id(_)) {
                // Let a group gather: under load many more ids arrive in this time, and one
                // commit for all of them costs far less CPU than one each. No answer waits for
                // the commit; a flush or close is not held back.
                std::thread::sleep(GROUP_COMMIT_LINGER);
            }
            let mut next = Some(first);
            while let Some(m) = next.take() {
                match m {
                    SeenMsg::Id(id) => ids.push(id),
                    SeenMsg::Flush(tx) => flushes.push(tx),
                    SeenMsg::Close => open = false,
                }
                if open && ids.len() < 4096 {
                    next = rx.try_recv().ok();
                }
            }
            if !ids.is_empty() {
                self.commit(ids, &mut logged);
            }
            let due = logged.ids.len() >= self.merge_at
                || logged.since.is_some_and(|t| t.elapsed() >= MERGE_AFTER);
            if !open || due {
                self.merge(&mut logged);
            }
            for tx in flushes {
                let _ = tx.send(());
            }
        }
        // Every sender gone without a close: move what is logged all the same.
        self.merge(&mut logged);
    }

    /// One group commit: on redb appended to the store's seen-id log (the ids stay pinned in
    /// memory until moved), on PostgreSQL recorded (claims become records).
    fn commit(&self, ids: Vec<String>, logged: &mut Logged) {
        let started = Instant::now();
        let count = ids.len();
        let forget_at = now_ms().saturating_add(self.ttl_ms);
        match &self.store {
            Db::Redb(store) => {
                let refs = keyable(&ids);
                let r = if refs.is_empty() {
                    Ok(())
                } else {
                    store.log_events_seen(&refs, forget_at)
                };
                drop(refs);
                match r {
                    Ok(()) => {
                        logged.since.get_or_insert(started);
                        logged.ids.extend(ids);
                    }
                    Err(e) => {
                        warn!(error = %e, count = ids.len(), "Recording seen event ids failed; redeliveries may be handled twice.");
                        self.unpin(&ids);
                    }
                }
            }
            Db::Postgres(_) => {
                commit_seen(&self.store, &ids, forget_at);
                // Lookups from now on take a new snapshot, which sees this commit.
                self.commits.fetch_add(1, Ordering::Release);
            }
        }
        debug!(
            count,
            commit_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "Seen ids committed."
        );
    }

    /// Moves the store's seen-id log into its id-keyed table, then lets the moved ids be
    /// evicted from memory: a lookup that misses them there takes a snapshot that has them.
    /// On failure they stay logged and pinned, and the next commit tries again.
    fn merge(&self, logged: &mut Logged) {
        let Db::Redb(store) = &self.store else {
            return;
        };
        if logged.ids.is_empty() {
            return;
        }
        let started = Instant::now();
        match store.merge_seen_log() {
            Ok(moved) => {
                self.commits.fetch_add(1, Ordering::Release);
                self.unpin(&logged.ids);
                debug!(
                    moved,
                    merge_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                    "Seen-id log moved."
                );
                logged.ids.clear();
                logged.since = None;
            }
            Err(e) => {
                warn!(error = %e, count = logged.ids.len(), "Moving the seen-id log failed; will try again.");
            }
        }
    }

    /// Unpins `ids` in chunks, so a dispatch never waits long for the lock.
    fn unpin(&self, ids: &[String]) {
        for chunk in ids.chunks(512) {
            let mut recent = Recent::lock(&self.recent);
            for id in chunk {
                recent.unpin(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::callbacks::parse_event_payload;
    use crate::storage::Store;

    #[test]
    fn one_bad_id_never_spoils_a_group_commit() {
        let store = Store::open_in_memory(
            crate::storage::Keyring::new(crate::storage::Key::from_bytes(&[3; 32]), vec![]),
            crate::storage::StoreOptions::default(),
        )
        .unwrap();
        let ids = vec![
            "ev-good-1".to_owned(),
            "x".repeat(crate::storage::MAX_EVENT_KEY_BYTES + 1),
            String::new(),
            "ev-good-2".to_owned(),
        ];
        commit_seen(&store.clone().into(), &ids, now_ms() + 60_000);
        assert!(store.event_seen("ev-good-1").unwrap());
        assert!(store.event_seen("ev-good-2").unwrap());
    }

    #[test]
    fn recent_ids_are_bounded_in_bytes_not_only_in_count() {
        let mut r = Recent::default();
        let max_bytes = 10_000;
        for i in 0..1_000 {
            let id = format!("{i:0>120}");
            assert!(r.insert(&id, 1_000_000, max_bytes));
            assert!(r.bytes <= max_bytes, "{} bytes after {i}", r.bytes);
        }
        // Each id is a fixed-size digest: the byte bound decides how many are kept.
        assert!(r.set.len() <= max_bytes / Recent::COST && r.order.len() == r.set.len());
        assert!(r.set.len() < 1_000);
        // The newest ids are the ones kept.
        assert!(!r.insert(&format!("{:0>120}", 999), 1_000_000, max_bytes));
        assert!(r.insert(&format!("{:0>120}", 0), 1_000_000, max_bytes));
        // The count bound still holds on its own.
        let mut r = Recent::default();
        for i in 0..50 {
            r.insert(&i.to_string(), 10, usize::MAX);
        }
        assert_eq!(r.set.len(), 10);
    }

    #[test]
    fn recent_ids_are_held_as_digests_and_still_tell_ids_apart() {
        let mut r = Recent::default();
        // A long id costs what a short one does.
        assert!(r.insert(&"y".repeat(512), usize::MAX, usize::MAX));
        assert!(r.insert("e", usize::MAX, usize::MAX));
        assert_eq!(r.bytes, 2 * Recent::COST);
        // Ids that differ in one byte, or are prefixes of each other, are different ids.
        for i in 0..20_000 {
            assert!(
                r.insert(&format!("ev_{i}"), usize::MAX, usize::MAX),
                "ev_{i}"
            );
        }
        assert!(r.insert("ev_", usize::MAX, usize::MAX));
        for i in 0..20_000 {
            assert!(!r.insert(&format!("ev_{i}"), usize::MAX, usize::MAX));
        }
        // Releasing one id frees that id only.
        r.remove("ev_7");
        assert!(!r.contains("ev_7"));
        assert!(r.contains("ev_70") && r.contains("ev_8"));
        assert!(r.insert("ev_7", usize::MAX, usize::MAX));
        // Another dispatcher (another process) digests under other keys.
        assert_ne!(Recent::default().digest.of("ev_1"), r.digest.of("ev_1"));
    }
    use crate::storage::{Key, Keyring, StoreOptions};
    use std::sync::atomic::{AtomicU32, Ordering};

    fn event(id: &str) -> Callback {
        let body = serde_json::json!({
            "schema": "2.0",
            "header": {"event_id": id, "event_type": "im.message.receive_v1", "create_time": "1", "token": "t", "app_id": "cli_x", "tenant_key": "tk"},
            "event": {}
        });
        parse_event_payload(&serde_json::to_vec(&body).unwrap()).unwrap()
    }

    fn store_at(path: &std::path::Path) -> Store {
        Store::open(
            path,
            Keyring::new(Key::from_bytes(&[1; 32]), vec![]),
            StoreOptions::default(),
        )
        .unwrap()
    }

    fn counting(calls: Arc<AtomicU32>, fail_first: u32) -> Handler {
        Arc::new(move |_cb| {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if n < fail_first {
                    Err("boom".into())
                } else {
                    Ok(HandlerReply::Done)
                }
            })
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn duplicates_are_dropped_and_failures_are_redeliverable() {
        let dir = tempfile::tempdir().unwrap();
        let d = Dispatcher::new(
            store_at(&dir.path().join("s.redb")),
            DispatchConfig::default(),
            &Supervisor::default(),
        );
        let calls = Arc::new(AtomicU32::new(0));
        d.set_handler(counting(calls.clone(), 1));
        // First delivery fails: answered as failed, not remembered.
        assert_eq!(
            d.dispatch(event("e1"), EventSource::WebSocket).await,
            Outcome::Failed
        );
        // Redelivery is handled.
        assert_eq!(
            d.dispatch(event("e1"), EventSource::Http).await,
            Outcome::Handled(HandlerReply::Done)
        );
        // Any further copy, from either path, is a duplicate.
        assert_eq!(
            d.dispatch(event("e1"), EventSource::WebSocket).await,
            Outcome::Duplicate
        );
        assert_eq!(
            d.dispatch(event("e1"), EventSource::Http).await,
            Outcome::Duplicate
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_handler_fails_the_event_and_leaves_it_redeliverable() {
        let dir = tempfile::tempdir().unwrap();
        let d = Dispatcher::new(
            store_at(&dir.path().join("s.redb")),
            DispatchConfig::default(),
            &Supervisor::default(),
        );
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        // Call 0 panics on its first poll (the inline path), call 1 after a yield (the task
        // path), call 2 succeeds.
        d.set_handler(Arc::new(move |_cb| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if n == 1 {
                    tokio::task::yield_now().await;
                }
                assert!(n >= 2, "handler panic {n}");
                Ok(HandlerReply::Done)
            })
        }));
        for _ in 0..2 {
            assert_eq!(
                d.dispatch(event("p1"), EventSource::WebSocket).await,
                Outcome::Failed
            );
        }
        assert_eq!(
            d.dispatch(event("p1"), EventSource::WebSocket).await,
            Outcome::Handled(HandlerReply::Done)
        );
        assert_eq!(
            d.dispatch(event("p1"), EventSource::WebSocket).await,
            Outcome::Duplicate
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn seen_ids_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let d = Dispatcher::new(
                store_at(&path),
                DispatchConfig::default(),
                &Supervisor::default(),
            );
            d.set_handler(counting(Arc::new(AtomicU32::new(0)), 0));
            for i in 0..50 {
                assert_eq!(
                    d.dispatch(event(&format!("ev{i}")), EventSource::WebSocket)
                        .await,
                    Outcome::Handled(HandlerReply::Done)
                );
            }
            d.flush().await;
            // Closing joins the writer: once `d` is gone, nothing holds the store.
            d.close().await;
        }
        let store = store_at(&path);
        let d = Dispatcher::new(store, DispatchConfig::default(), &Supervisor::default());
        let calls = Arc::new(AtomicU32::new(0));
        d.set_handler(counting(calls.clone(), 0));
        for i in 0..50 {
            assert_eq!(
                d.dispatch(event(&format!("ev{i}")), EventSource::WebSocket)
                    .await,
                Outcome::Duplicate
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn the_writer_thread_runs_at_a_lower_priority_and_never_raises_it() {
        let nice = |f: fn()| {
            std::thread::spawn(move || {
                f();
                rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
            })
            .join()
            .unwrap()
        };
        assert_eq!(nice(|| ()).max(WRITER_NICE), nice(lower_priority));
        assert!(nice(lower_priority) >= WRITER_NICE);
        // A thread already nicer than that keeps its value.
        let nicest = nice(|| {
            rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19).unwrap();
            lower_priority();
        });
        assert_eq!(nicest, 19);
    }

    #[test]
    fn pinned_ids_are_never_evicted_until_unpinned() {
        let mut r = Recent::default();
        for i in 0..4 {
            assert!(r.insert(&format!("a{i}"), 4, usize::MAX));
        }
        r.pin("a0", 4, usize::MAX);
        r.pin("late", 4, usize::MAX); // evicted meanwhile (or never claimed): added, pinned
        for i in 0..20 {
            assert!(r.insert(&format!("b{i}"), 4, usize::MAX));
        }
        assert!(r.contains("a0") && r.contains("late"));
        assert!(!r.contains("a1") && !r.contains("b0"));
        r.unpin("a0");
        r.unpin("late");
        for i in 20..30 {
            r.insert(&format!("b{i}"), 4, usize::MAX);
        }
        assert!(!r.contains("a0") && !r.contains("late"));
        assert_eq!(r.set.len(), 4);
    }

    /// Waits for the dispatcher's load of the store's seen ids; whether memory is complete.
    async fn loaded(d: &Dispatcher) -> bool {
        for _ in 0..500 {
            {
                let r = d.inner.recent.lock().unwrap();
                if r.loaded {
                    return r.complete();
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the seen ids were never loaded");
    }

    /// A restarted dispatcher loads the store's ids and then answers from memory alone; one
    /// whose store holds more ids than it keeps never does, and still finds every old id.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_answers_alone_only_when_it_holds_every_stored_id() {
        for (memory_ids, complete) in [(1000, true), (50, false)] {
            let dir = tempfile::tempdir().unwrap();
            let store = store_at(&dir.path().join("s.redb"));
            let old: Vec<String> = (0..200).map(|i| format!("old{i}")).collect();
            let refs: Vec<&str> = old.iter().map(String::as_str).collect();
            store.mark_events_seen(&refs, now_ms() + 60_000).unwrap();
            let cfg = DispatchConfig {
                memory_ids,
                ..DispatchConfig::default()
            };
            let d = Dispatcher::new(store.clone(), cfg, &Supervisor::default());
            let calls = Arc::new(AtomicU32::new(0));
            d.set_handler(counting(calls.clone(), 0));
            assert_eq!(loaded(&d).await, complete, "memory_ids {memory_ids}");
            for id in &old {
                let out = d.dispatch(event(id), EventSource::WebSocket).await;
                assert_eq!(out, Outcome::Duplicate, "{id} (memory_ids {memory_ids})");
            }
            for i in 0..20 {
                let out = d.dispatch(event(&format!("new{i}")), EventSource::WebSocket);
                assert_eq!(out.await, Outcome::Handled(HandlerReply::Done));
            }
            assert_eq!(calls.load(Ordering::SeqCst), 20);
            d.close().await;
        }
    }

    #[test]
    fn memory_is_complete_once_loaded_until_an_id_is_evicted() {
        let mut r = Recent::default();
        r.insert("a", 2, usize::MAX);
        assert!(!r.complete(), "not loaded yet");
        r.loaded = true;
        r.insert("b", 2, usize::MAX);
        r.remove("b"); // released (its handler failed): never in the store
        assert!(r.complete());
        r.insert("c", 2, usize::MAX);
        r.insert("d", 2, usize::MAX);
        assert!(
            !r.complete(),
            "a is evicted: the store may hold it, memory does not"
        );
    }

    /// Handled ids sit in the store's seen-id log, where a snapshot lookup does not see them,
    /// until the writer moves them: meanwhile the memory must answer for them even when far
    /// more ids than it keeps have come since.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn logged_ids_are_duplicates_before_they_are_moved_whatever_came_since() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_at(&dir.path().join("s.redb"));
        let cfg = DispatchConfig {
            memory_ids: 8,
            ..DispatchConfig::default()
        };
        let d = Dispatcher::new(store.clone(), cfg, &Supervisor::default());
        let calls = Arc::new(AtomicU32::new(0));
        d.set_handler(counting(calls.clone(), 0));
        for i in 0..20 {
            let out = d.dispatch(event(&format!("ev{i}")), EventSource::WebSocket);
            assert_eq!(out.await, Outcome::Handled(HandlerReply::Done));
        }
        d.flush().await;
        // Logged (durable), not moved: 20 ids are fewer than a move takes (64 here).
        let logged = store.seen_log_len().unwrap();
        // More new ids than the memory keeps (8), fewer than make a move (64 in all): without
        // pins the first 20 are evicted and found nowhere a lookup reads.
        for i in 0..30 {
            let out = d.dispatch(event(&format!("other{i}")), EventSource::WebSocket);
            assert_eq!(out.await, Outcome::Handled(HandlerReply::Done));
        }
        for i in 0..20 {
            let out = d.dispatch(event(&format!("ev{i}")), EventSource::WebSocket);
            assert_eq!(out.await, Outcome::Duplicate, "ev{i} (logged: {logged})");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 50);
        d.close().await;
        assert_eq!(store.seen_log_len().unwrap(), 0, "close moves the log");
        let snap = store.seen_snapshot().unwrap();
        assert!(snap.contains("ev0").unwrap() && snap.contains("other29").unwrap());
    }

    /// A dispatcher on a new store in `dir` whose answer deadline is `deadline`.
    fn answering_within(dir: &tempfile::TempDir, deadline: Duration) -> Dispatcher {
        Dispatcher::new(
            store_at(&dir.path().join("s.redb")),
            DispatchConfig {
                ack_deadline: deadline,
                ..DispatchConfig::default()
            },
            &Supervisor::default(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_handler_is_acknowledged_at_the_deadline_and_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let d = answering_within(&dir, Duration::from_millis(100));
        let release = Arc::new(tokio::sync::Notify::new());
        let done = Arc::new(AtomicU32::new(0));
        let (r, dn) = (release.clone(), done.clone());
        d.set_handler(Arc::new(move |_cb| {
            let (r, dn) = (r.clone(), dn.clone());
            Box::pin(async move {
                r.notified().await;
                dn.fetch_add(1, Ordering::SeqCst);
                Ok(HandlerReply::Done)
            })
        }));
        assert_eq!(
            d.dispatch(event("slow"), EventSource::WebSocket).await,
            Outcome::Accepted
        );
        // While it runs, a redelivery is not handled twice, nor acknowledged as a duplicate
        // (the handling may still fail): refused, so the platform delivers it again later.
        assert_eq!(
            d.dispatch(event("slow"), EventSource::WebSocket).await,
            Outcome::Failed
        );
        release.notify_one();
        for _ in 0..200 {
            if done.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(done.load(Ordering::SeqCst), 1);
        // Once it has been handled, a redelivery is a duplicate.
        for _ in 0..200 {
            let landed = {
                let r = d.inner.recent.lock().unwrap();
                !r.flying.contains_key(&r.digest.of("slow"))
            };
            if landed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            d.dispatch(event("slow"), EventSource::WebSocket).await,
            Outcome::Duplicate
        );
        assert_eq!(done.load(Ordering::SeqCst), 1);
        d.flush().await;
    }

    /// Two deliveries of one event at once: the second waits for the first's handling to end
    /// (within the ACK deadline). Handled: the second is a duplicate. Failed: the second
    /// handles it. Either way the handler runs once per success, and nothing is lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_delivery_at_once_waits_for_the_first_and_follows_its_end() {
        for fail_first in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let d = answering_within(&dir, DispatchConfig::default().ack_deadline);
            let calls = Arc::new(AtomicU32::new(0));
            let c = calls.clone();
            d.set_handler(Arc::new(move |_cb| {
                let c = c.clone();
                Box::pin(async move {
                    let n = c.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if fail_first && n == 0 {
                        return Err(HandlerError::from("the first try fails".to_owned()));
                    }
                    Ok(HandlerReply::Done)
                })
            }));
            let (a, b) = tokio::join!(
                d.dispatch(event("twice"), EventSource::WebSocket),
                d.dispatch(event("twice"), EventSource::WebSocket)
            );
            let handled = Outcome::Handled(HandlerReply::Done);
            if fail_first {
                assert_eq!((a, b), (Outcome::Failed, handled));
                assert_eq!(calls.load(Ordering::SeqCst), 2);
            } else {
                assert_eq!((a, b), (handled, Outcome::Duplicate));
                assert_eq!(calls.load(Ordering::SeqCst), 1);
            }
            d.flush().await;
        }
    }

    /// A redelivery while the first delivery's handler runs is refused (not a duplicate);
    /// when that handler then fails, the next redelivery is handled: nothing is lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redelivery_while_the_first_is_handled_is_refused_and_a_failure_leaves_it_handleable()
    {
        let dir = tempfile::tempdir().unwrap();
        let d = answering_within(&dir, Duration::from_millis(100));
        let release = Arc::new(tokio::sync::Notify::new());
        let calls = Arc::new(AtomicU32::new(0));
        let (r, c) = (release.clone(), calls.clone());
        d.set_handler(Arc::new(move |_cb| {
            let (r, c) = (r.clone(), c.clone());
            Box::pin(async move {
                // The first call waits and fails; later ones succeed at once.
                if c.fetch_add(1, Ordering::SeqCst) == 0 {
                    r.notified().await;
                    return Err(HandlerError::from("the first try fails".to_owned()));
                }
                Ok(HandlerReply::Done)
            })
        }));
        assert_eq!(
            d.dispatch(event("flaky"), EventSource::WebSocket).await,
            Outcome::Accepted
        );
        assert_eq!(
            d.dispatch(event("flaky"), EventSource::WebSocket).await,
            Outcome::Failed,
            "in flight: refused, not a duplicate"
        );
        release.notify_one();
        let mut out = Outcome::Failed;
        for _ in 0..200 {
            out = d.dispatch(event("flaky"), EventSource::WebSocket).await;
            if out != Outcome::Failed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(out, Outcome::Handled(HandlerReply::Done));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        d.flush().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_handler_events_are_refused_for_redelivery() {
        let dir = tempfile::tempdir().unwrap();
        let d = Dispatcher::new(
            store_at(&dir.path().join("s.redb")),
            DispatchConfig::default(),
            &Supervisor::default(),
        );
        assert_eq!(
            d.dispatch(event("x"), EventSource::WebSocket).await,
            Outcome::Failed
        );
        d.set_handler(counting(Arc::new(AtomicU32::new(0)), 0));
        assert_eq!(
            d.dispatch(event("x"), EventSource::WebSocket).await,
            Outcome::Handled(HandlerReply::Done)
        );
    }

    fn message(event_id: &str, message_id: &str) -> Callback {
        let body = serde_json::json!({
            "schema": "2.0",
            "header": {"event_id": event_id, "event_type": "im.message.receive_v1", "create_time": "1", "token": "t", "app_id": "cli_x", "tenant_key": "tk"},
            "event": {"message": {"message_id": message_id, "message_type": "text"}}
        });
        parse_event_payload(&serde_json::to_vec(&body).unwrap()).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_redelivered_under_a_new_event_id_is_a_duplicate_even_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let calls = Arc::new(AtomicU32::new(0));
        {
            let d = Dispatcher::new(
                store_at(&path),
                DispatchConfig::default(),
                &Supervisor::default(),
            );
            d.set_handler(counting(calls.clone(), 0));
            assert_eq!(
                d.dispatch(message("ev-a", "om_1"), EventSource::WebSocket)
                    .await,
                Outcome::Handled(HandlerReply::Done)
            );
            assert_eq!(
                d.dispatch(message("ev-b", "om_1"), EventSource::Http).await,
                Outcome::Duplicate
            );
            // A different message under a fresh event id is handled.
            assert_eq!(
                d.dispatch(message("ev-c", "om_2"), EventSource::WebSocket)
                    .await,
                Outcome::Handled(HandlerReply::Done)
            );
            // The refused copy did not burn its event id: a later event with that id but
            // another message is handled.
            assert_eq!(
                d.dispatch(message("ev-b", "om_3"), EventSource::WebSocket)
                    .await,
                Outcome::Handled(HandlerReply::Done)
            );
            // Both keys are claimed at once: a handled event id with a new message is a
            // duplicate, and its message id, claimed beside it, is let go again (a later event
            // carrying that message is handled, not kept waiting on a claim nobody holds).
            assert_eq!(
                d.dispatch(message("ev-a", "om_4"), EventSource::WebSocket)
                    .await,
                Outcome::Duplicate
            );
            assert_eq!(
                d.dispatch(message("ev-d", "om_4"), EventSource::WebSocket)
                    .await,
                Outcome::Handled(HandlerReply::Done)
            );
            d.flush().await;
            d.close().await;
        }
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        let store = store_at(&path);
        let d = Dispatcher::new(store, DispatchConfig::default(), &Supervisor::default());
        d.set_handler(counting(calls.clone(), 0));
        assert_eq!(
            d.dispatch(message("ev-z", "om_1"), EventSource::WebSocket)
                .await,
            Outcome::Duplicate
        );
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_message_stays_redeliverable_under_either_id() {
        let dir = tempfile::tempdir().unwrap();
        let d = Dispatcher::new(
            store_at(&dir.path().join("s.redb")),
            DispatchConfig::default(),
            &Supervisor::default(),
        );
        let calls = Arc::new(AtomicU32::new(0));
        d.set_handler(counting(calls.clone(), 1));
        assert_eq!(
            d.dispatch(message("ev-1", "om_9"), EventSource::WebSocket)
                .await,
            Outcome::Failed
        );
        assert_eq!(
            d.dispatch(message("ev-2", "om_9"), EventSource::WebSocket)
                .await,
            Outcome::Handled(HandlerReply::Done)
        );
        assert_eq!(
            d.dispatch(message("ev-1", "om_9"), EventSource::WebSocket)
                .await,
            Outcome::Duplicate
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handlers_beyond_the_limit_are_refused_for_redelivery_until_a_slot_frees() {
        let dir = tempfile::tempdir().unwrap();
        let d = Dispatcher::new(
            store_at(&dir.path().join("s.redb")),
            DispatchConfig {
                ack_deadline: Duration::from_millis(20),
                max_concurrent_handlers: 3,
                ..DispatchConfig::default()
            },
            &Supervisor::default(),
        );
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let running = Arc::new(AtomicU32::new(0));
        let peak = Arc::new(AtomicU32::new(0));
        let (r, run, pk) = (release.clone(), running.clone(), peak.clone());
        d.set_handler(Arc::new(move |_cb| {
            let (r, run, pk) = (r.clone(), run.clone(), pk.clone());
            Box::pin(async move {
                let now = run.fetch_add(1, Ordering::SeqCst) + 1;
                pk.fetch_max(now, Ordering::SeqCst);
                let _ = r.acquire().await.map(tokio::sync::SemaphorePermit::forget);
                run.fetch_sub(1, Ordering::SeqCst);
                Ok(HandlerReply::Done)
            })
        }));
        let mut outcomes = Vec::new();
        for i in 0..20 {
            outcomes.push(
                d.dispatch(event(&format!("slow{i}")), EventSource::WebSocket)
                    .await,
            );
        }
        // Three run past their deadline (accepted); the other 17 are refused.
        assert_eq!(
            outcomes.iter().filter(|o| **o == Outcome::Accepted).count(),
            3
        );
        assert_eq!(
            outcomes.iter().filter(|o| **o == Outcome::Failed).count(),
            17
        );
        assert_eq!(peak.load(Ordering::SeqCst), 3);
        // A refused event is not remembered: once the slow ones finish, its redelivery runs.
        release.add_permits(3);
        for _ in 0..400 {
            if running.load(Ordering::SeqCst) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(running.load(Ordering::SeqCst), 0);
        release.add_permits(1);
        let mut handled = false;
        for _ in 0..400 {
            match d.dispatch(event("slow19"), EventSource::WebSocket).await {
                Outcome::Handled(_) => {
                    handled = true;
                    break;
                }
                // The slots free just after the handlers return.
                Outcome::Failed => tokio::time::sleep(Duration::from_millis(5)).await,
                other => panic!("{other:?}"),
            }
        }
        assert!(handled);
        assert!(peak.load(Ordering::SeqCst) <= 3);
    }
}
