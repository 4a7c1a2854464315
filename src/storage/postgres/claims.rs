//! The claim batcher: event-id claims ([`PgStore::claim_event`]'s semantics) and settles
//! ([`PgStore::settle_events`]) gathered from every dispatcher of one store and decided in one
//! statement, one round trip and one commit per batch.
//!
//! A claim is queued (its ids: an event's id and its message's id go together, so one
//! statement decides both; until, the record's time, now, a one-shot reply) and the caller
//! awaits the reply, so the async task that asked never blocks on PostgreSQL. A settle (ids,
//! forget_at) is queued the same way and its caller (the dispatcher's seen-id writer, a plain thread) waits until
//! the batch that carried it has committed: a settle returns once its records are durable, as
//! before. One task per store (started on the first claim or settle, on the store's runtime)
//! takes what is queued, up to [`MAX_BATCH`] claims and every settle queued meanwhile, and
//! runs [`ROUND`] on its own connection, where that statement is prepared once: it settles the
//! ids handled since the last batch and claims the new ones, each set inserted in one sorted
//! order (one lock order for every instance), and reads the held ids' times. While one batch
//! is in flight the next gathers and is sent behind it on the same connection (pipelined:
//! PostgreSQL runs them one after the other), so claims and settles together cost one round
//! trip and one commit per batch, not one per id, nor one for the claims and another for the
//! settles.
//!
//! The batcher's connection is its own, one beyond the pool's `max_connections` (a batcher
//! that took its connection from the pool could starve the pool's other users). A lost
//! connection fails the batches it was running (their askers are told `Unavailable`: they may
//! have committed) and the next batch opens a new one.
//!
//! A release ([`PgStore::queue_release`]: claims let go when their handler failed or never
//! ran) rides the same queue and is sent on the same connection just before its batch's
//! statement, so the dispatcher awaits it rather than holding a runtime thread on a pooled
//! connection while PostgreSQL deletes.
//!
//! The task holds the store weakly between batches: the queue's sender lives in the store, so
//! when the last handle goes, the queue closes and the task ends.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use futures_util::stream::{FuturesUnordered, StreamExt};

use tokio::sync::oneshot;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Statement};

use super::{block_on, db_time, pg_err, Inner, PgStore};
use crate::storage::{valid_event_key, Error, EventClaim, Result};

/// Claims decided in one statement at most (settles queued meanwhile ride along, whatever
/// their number: the seen-id writer already bounds its groups).
pub(crate) const MAX_BATCH: usize = 256;

/// The answers to one queued claim of some ids, in their order: each as
/// [`PgStore::claim_event`]'s.
pub type ClaimReply = oneshot::Receiver<Result<Vec<EventClaim>>>;

/// One batch's statement. `$1`, `$2`, `$6`: the claimed ids (distinct, sorted), their untils
/// and their records' times; `$3`: now; `$4`, `$5`: the settled ids (distinct, sorted, none of
/// them claimed in this batch) and their times. A claim wins when its id is free at `$3`
/// (never seen, or its claim or record lapsed): its row is held until `held_until` and carries
/// its record's time as `forget_at` already. The settles become records (an upsert): a claim
/// made with its record's time keeps it, so becoming a record changes `held_until` alone, no
/// indexed column, and PostgreSQL updates the row in place (HOT: no index entry written, where
/// moving `forget_at` wrote two); any other row keeps the later time. The
/// held ids' times are read by the same statement (its snapshot: an id held by a claim that
/// committed while it ran is read again after it, see `round`), one primary-key lookup per
/// held id: a subquery, not a join, since the batcher's statement is prepared once and its
/// generic plan, costed when the table was small, joined by scanning the whole table (every
/// batch read every row: 14 ms a batch at 96 000 rows).
const ROUND: &str = "WITH req AS (
        SELECT * FROM unnest($1::text[], $2::bigint[], $6::bigint[]) AS r(id, until, keep)),
     settled AS (
        INSERT INTO ls_seen_events AS e (id, forget_at)
        SELECT id, at FROM unnest($4::text[], $5::bigint[]) AS s(id, at) ORDER BY id COLLATE \"C\"
        ON CONFLICT (id) DO UPDATE SET held_until = NULL,
           forget_at = CASE WHEN e.held_until < e.forget_at THEN e.forget_at
                            ELSE GREATEST(e.forget_at, EXCLUDED.forget_at) END),
     won AS (
        INSERT INTO ls_seen_events AS e (id, forget_at, held_until)
        SELECT id, keep, until FROM req ORDER BY id COLLATE \"C\"
        ON CONFLICT (id) DO UPDATE
           SET forget_at = EXCLUDED.forget_at, held_until = EXCLUDED.held_until
           WHERE COALESCE(e.held_until, e.forget_at) <= $3
        RETURNING e.id)
     SELECT r.id, w.id IS NOT NULL,
            CASE WHEN w.id IS NULL
                 THEN (SELECT ARRAY[s.held_until, s.forget_at]
                       FROM ls_seen_events AS s WHERE s.id = r.id) END
     FROM req AS r
     LEFT JOIN won AS w ON w.id = r.id";

const ROUND_TYPES: [Type; 6] = [
    Type::TEXT_ARRAY,
    Type::INT8_ARRAY,
    Type::INT8,
    Type::TEXT_ARRAY,
    Type::INT8_ARRAY,
    Type::INT8_ARRAY,
];

pub(super) enum Request {
    /// Ids claimed together: always in one batch, so one statement decides them all.
    Claim {
        ids: Vec<String>,
        until: u64,
        /// The record's time were the claim won and its handler succeeded.
        keep: u64,
        now: u64,
        reply: oneshot::Sender<Result<Vec<EventClaim>>>,
    },
    Settle {
        ids: Vec<String>,
        forget_at: u64,
        /// Awaited by async settlers; a blocking one waits with the store's own `block_on`,
        /// which works on any thread (tokio's `blocking_recv` would panic inside a runtime).
        reply: oneshot::Sender<Result<()>>,
    },
    /// [`PgStore::release_events`], queued: its asker awaits the reply (a handler's task, a
    /// dispatcher refusing an event), so no runtime thread waits on PostgreSQL for it.
    Release {
        ids: Vec<String>,
        until: u64,
        reply: oneshot::Sender<Result<()>>,
    },
}

impl Request {
    /// Tells its asker `e`: the batcher did not take it.
    fn refuse(self, e: Error) {
        match self {
            Self::Claim { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Self::Settle { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Self::Release { reply, .. } => {
                let _ = reply.send(Err(e));
            }
        }
    }
}

/// Batches in flight at once on the batcher's connection: while PostgreSQL runs one, the next
/// is already sent (pipelined on the same connection, so still run one after the other there:
/// no two batches of one instance ever wait on each other's locks). With one, the
/// connection sat idle while each answer travelled back and the next batch gathered.
const IN_FLIGHT: usize = 2;

/// The sending end of the batcher's queue.
pub(super) type Queue = tokio::sync::mpsc::UnboundedSender<Request>;

/// Starts the batcher of `inner`: a task on the store's runtime, beside the connections' own
/// tasks (a claim batch's answer wakes no thread of its own); the sender of its queue.
pub(super) fn start(inner: &Arc<Inner>) -> Result<Queue> {
    let rt = inner
        .rt
        .as_ref()
        .ok_or_else(|| Error::Unavailable("the store is closing".to_owned()))?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    rt.spawn(run(Arc::downgrade(inner), rx));
    Ok(tx)
}

/// The batcher's own connection and its prepared [`ROUND`].
struct Line {
    client: Client,
    round: Statement,
    /// Set when a statement on it failed as `Unavailable`: the server said it is ending the
    /// connection (or the socket went) before the client noticed the close, so the next batch
    /// connects anew instead of failing on this one too.
    lost: AtomicBool,
}

impl Line {
    fn usable(&self) -> bool {
        !self.client.is_closed() && !self.lost.load(Ordering::Relaxed)
    }

    /// Notes `r`'s failure, if it says the connection is gone, and passes `r` on.
    fn check<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(Error::Unavailable(_)) = &r {
            self.lost.store(true, Ordering::Relaxed);
        }
        r
    }
}

/// Where one claim's answers go.
type ClaimTx = oneshot::Sender<Result<Vec<EventClaim>>>;

/// What one batch holds.
#[derive(Default)]
struct Batch {
    /// (ids, until, the record's time, now, where the answers go).
    claims: Vec<(Vec<String>, u64, u64, u64, ClaimTx)>,
    /// The ids of `claims`, all told.
    claimed: usize,
    settles: Vec<(Vec<String>, u64, oneshot::Sender<Result<()>>)>,
    /// (ids, until, where the answer goes): each its own statement, sent before the batch's
    /// round (a claim of a released id in the same batch finds it free).
    releases: Vec<(Vec<String>, u64, oneshot::Sender<Result<()>>)>,
}

impl Batch {
    /// Tells every asker: each claim its answer (in order), each settle that it committed; or
    /// each of them the error's kind (a lost connection stays `Unavailable`). An asker that
    /// stopped waiting is not told.
    fn answer(self, answers: Result<Vec<EventClaim>>) {
        match answers {
            Ok(answers) => {
                let mut answers = answers.into_iter();
                for r in self.claims {
                    let mine: Vec<EventClaim> = answers.by_ref().take(r.0.len()).collect();
                    let _ = r.4.send(Ok(mine));
                }
                for s in self.settles {
                    let _ = s.2.send(Ok(()));
                }
            }
            Err(e) => {
                for r in self.claims {
                    let _ = r.4.send(Err(again(&e)));
                }
                for s in self.settles {
                    let _ = s.2.send(Err(again(&e)));
                }
                for r in self.releases {
                    let _ = r.2.send(Err(again(&e)));
                }
            }
        }
    }

    fn push(&mut self, r: Request) {
        match r {
            Request::Claim {
                ids,
                until,
                keep,
                now,
                reply,
            } => {
                self.claimed += ids.len();
                self.claims.push((ids, until, keep, now, reply));
            }
            Request::Settle {
                ids,
                forget_at,
                reply,
            } => self.settles.push((ids, forget_at, reply)),
            Request::Release { ids, until, reply } => self.releases.push((ids, until, reply)),
        }
    }
}

/// The batcher: takes what is queued as one batch whenever fewer than [`IN_FLIGHT`] are in
/// flight, and sends it on its connection; each batch answers its askers when it is decided.
/// Ends when the queue closes (the store's last handle went) and nothing is in flight.
async fn run(store: Weak<Inner>, mut rx: tokio::sync::mpsc::UnboundedReceiver<Request>) {
    let mut line: Option<Arc<Line>> = None;
    let mut flying = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            Some(()) = flying.next(), if !flying.is_empty() => {}
            r = rx.recv(), if open && flying.len() < IN_FLIGHT => {
                let Some(first) = r else {
                    open = false;
                    continue;
                };
                let mut batch = Batch::default();
                batch.push(first);
                while batch.claimed < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                let Some(inner) = store.upgrade() else {
                    batch.answer(Err(Error::Unavailable("the store is closing".to_owned())));
                    continue;
                };
                let store = PgStore { inner };
                let l = match current_line(&store, &mut line).await {
                    Ok(l) => l,
                    Err(e) => {
                        batch.answer(Err(e));
                        continue;
                    }
                };
                flying.push(async move {
                    for (ids, until, reply) in std::mem::take(&mut batch.releases) {
                        let released = store
                            .retrying("a release of claims", || {
                                super::fleet::release(&l.client, &ids, until)
                            })
                            .await;
                        let _ = reply.send(l.check(released));
                    }
                    if batch.claims.is_empty() && batch.settles.is_empty() {
                        return;
                    }
                    let answers = l.check(decide(&store, &l, &batch).await);
                    batch.answer(answers);
                });
            }
            else => return,
        }
    }
}

/// The batcher's connection: the one it has while that is open, else a new one (connected,
/// its statement prepared). A lost connection fails the batches it was running; the next
/// batch comes here and gets a new one.
async fn current_line(store: &PgStore, line: &mut Option<Arc<Line>>) -> Result<Arc<Line>> {
    if let Some(l) = line.as_ref().filter(|l| l.usable()) {
        return Ok(l.clone());
    }
    *line = None;
    let client = super::connect_pg(&store.inner.url, &store.inner.net)
        .await
        .map_err(super::connect_err)?;
    let round = client
        .prepare_typed(ROUND, &ROUND_TYPES)
        .await
        .map_err(|e| pg_err(&e))?;
    let l = Arc::new(Line {
        client,
        round,
        lost: AtomicBool::new(false),
    });
    *line = Some(l.clone());
    Ok(l)
}

/// A copy of `e` of the same kind, for one more asker.
fn again(e: &Error) -> Error {
    match e {
        Error::Unavailable(m) => Error::Unavailable(m.clone()),
        Error::Invalid(m) => Error::Invalid(m.clone()),
        other => Error::Engine(other.to_string()),
    }
}

/// The answers to the batch's claims, in its order, all decided as of the batch's earliest
/// `now` (a claim lapsed by then is free for every asker; a later `now` would free a claim
/// some asker still saw held), its settles committed with them.
async fn decide(store: &PgStore, line: &Line, batch: &Batch) -> Result<Vec<EventClaim>> {
    let claims: Vec<(&str, u64, u64)> = batch
        .claims
        .iter()
        .flat_map(|r| r.0.iter().map(move |id| (id.as_str(), r.1, r.2)))
        .collect();
    let now = batch.claims.iter().map(|r| r.3).min().unwrap_or(0);
    let settles: Vec<(&str, u64)> = batch
        .settles
        .iter()
        .flat_map(|(ids, at, _)| ids.iter().map(move |id| (id.as_str(), *at)))
        .collect();
    store
        .claim_and_settle(&claims, &settles, now, async |claims, settles, now| {
            store
                .retrying("a claim batch", || {
                    round(&line.client, Some(&line.round), claims, settles, now)
                })
                .await
        })
        .await
}

/// Distinct settles, sorted by id, as [`ROUND`] takes them: ids and times.
type Sorted = (Vec<String>, Vec<i64>);

/// Distinct claims, sorted by id, as [`ROUND`] takes them: ids, untils and records' times.
type SortedClaims = (Vec<String>, Vec<i64>, Vec<i64>);

/// Runs [`ROUND`] on `c` (prepared as `stmt`, or sent with its types when `None`): the
/// claims' answers by id (`Won`; `Held(t)`: a claim until `t`, `0` when the row went
/// meanwhile; `Recorded(t)`: a record until `t`). An id held by a claim not in the
/// statement's snapshot is read again.
async fn round(
    c: &Client,
    stmt: Option<&Statement>,
    claims: &SortedClaims,
    settles: &Sorted,
    now: i64,
) -> Result<HashMap<String, EventClaim>> {
    let params: [&(dyn ToSql + Sync); 6] = [
        &claims.0, &claims.1, &now, &settles.0, &settles.1, &claims.2,
    ];
    let rows = match stmt {
        Some(s) => c.query(s, &params).await,
        None => {
            let typed: Vec<(&(dyn ToSql + Sync), Type)> =
                params.iter().copied().zip(ROUND_TYPES).collect();
            c.query_typed(ROUND, &typed).await
        }
    }
    .map_err(|e| pg_err(&e))?;
    let mut decided: HashMap<String, EventClaim> = HashMap::with_capacity(rows.len());
    let mut unseen: Vec<String> = Vec::new();
    for r in &rows {
        let id: String = r.try_get(0).map_err(|e| pg_err(&e))?;
        let won: bool = r.try_get(1).map_err(|e| pg_err(&e))?;
        let row: Option<Vec<Option<i64>>> = r.try_get(2).map_err(|e| pg_err(&e))?;
        match (won, row) {
            (true, _) => {
                decided.insert(id, EventClaim::Won);
            }
            (false, Some(row)) => {
                let (held_until, forget_at) = match row[..] {
                    [held_until, forget_at] => (held_until, forget_at.unwrap_or(0)),
                    _ => return Err(Error::Engine("a held id's row came back malformed".into())),
                };
                decided.insert(id, holder(held_until, forget_at));
            }
            (false, None) => unseen.push(id),
        }
    }
    if !unseen.is_empty() {
        let rows = c
            .query(
                "SELECT id, held_until, forget_at FROM ls_seen_events
                 WHERE id = ANY($1::text[])",
                &[&unseen],
            )
            .await
            .map_err(|e| pg_err(&e))?;
        let mut held: HashMap<String, EventClaim> = HashMap::with_capacity(rows.len());
        for r in &rows {
            held.insert(
                r.try_get(0).map_err(|e| pg_err(&e))?,
                holder(
                    r.try_get(1).map_err(|e| pg_err(&e))?,
                    r.try_get(2).map_err(|e| pg_err(&e))?,
                ),
            );
        }
        for id in unseen {
            // Gone meanwhile (a released claim): `Held(0)`, as `claim_event` says.
            let h = held.get(&id).copied().unwrap_or(EventClaim::Held(0));
            decided.insert(id, h);
        }
    }
    Ok(decided)
}

/// What holds an id whose row has `held_until` and `forget_at`: a claim until `held_until`
/// when it is set; else a record until `forget_at` (a row of schema 7 does not tell a claim
/// from a record and reads as a record; see [`EventClaim::Recorded`]).
fn holder(held_until: Option<i64>, forget_at: i64) -> EventClaim {
    let t = |v: i64| u64::try_from(v).unwrap_or(0);
    match held_until {
        Some(h) => EventClaim::Held(t(h)),
        None => EventClaim::Recorded(t(forget_at)),
    }
}

/// Claims made without a record's time: their row carries `until` as its `forget_at` too, and
/// a settle of one sets the settle's time (as `claim_event`'s).
fn held_as_recorded<'a>(claims: &[(&'a str, u64)]) -> Vec<(&'a str, u64, u64)> {
    claims
        .iter()
        .map(|(id, until)| (*id, *until, *until))
        .collect()
}

impl PgStore {
    /// Decides `claims` (id, until) as of `now` in one statement, each answered as
    /// [`PgStore::claim_event`] answers, in the order given. An id asked more than once is
    /// decided for its first asker; a later one finds it held by what the first found, or by
    /// the first's claim when it won (`Held(its until)`): one claim per id wins.
    pub fn claim_batch(&self, claims: &[(&str, u64)], now: u64) -> Result<Vec<EventClaim>> {
        let claims = held_as_recorded(claims);
        block_on(
            self.claim_and_settle(&claims, &[], now, async |claims, settles, now| {
                self.with(async |c| round(c, None, claims, settles, now).await)
            }),
        )
    }

    /// Settles `settles` (id, forget_at) and decides `claims` in one statement, as the batcher
    /// decides one batch (through the pool, not the batcher's own connection): the claims
    /// answered as [`PgStore::claim_batch`] answers them, a claim of an id settled here finding
    /// its record. Returns once both are committed.
    pub fn settle_and_claim_batch(
        &self,
        settles: &[(&str, u64)],
        claims: &[(&str, u64)],
        now: u64,
    ) -> Result<Vec<EventClaim>> {
        let claims = held_as_recorded(claims);
        block_on(
            self.claim_and_settle(&claims, settles, now, async |claims, settles, now| {
                self.with(async |c| round(c, None, claims, settles, now).await)
            }),
        )
    }

    /// `claim_batch` with settles (id, forget_at) carried by the same statement: the settles
    /// become records (an id settled twice keeps the later time) and a claim of a settled id
    /// finds it recorded. `exec` runs [`ROUND`] (through the pool, or the batcher's line).
    async fn claim_and_settle(
        &self,
        claims: &[(&str, u64, u64)],
        settles: &[(&str, u64)],
        now: u64,
        exec: impl AsyncFnOnce(&SortedClaims, &Sorted, i64) -> Result<HashMap<String, EventClaim>>,
    ) -> Result<Vec<EventClaim>> {
        if let Some(bad) = claims
            .iter()
            .map(|c| c.0)
            .chain(settles.iter().map(|s| s.0))
            .find(|id| !valid_event_key(id))
        {
            return Err(Error::Invalid(format!(
                "event id of {} bytes cannot be claimed or recorded",
                bad.len()
            )));
        }
        let mut settled: HashMap<&str, u64> = HashMap::with_capacity(settles.len());
        for (id, at) in settles {
            let t = settled.entry(id).or_insert(*at);
            *t = (*t).max(*at);
        }
        let mut first: HashMap<&str, u64> = HashMap::with_capacity(claims.len());
        let mut distinct: Vec<(&str, u64, u64)> = Vec::with_capacity(claims.len());
        for (id, until, keep) in claims {
            // The first asker's until is the one claimed with; an id settled by this batch is
            // not claimed (it is answered with its record's time).
            if let Entry::Vacant(v) = first.entry(id) {
                v.insert(*until);
                if !settled.contains_key(id) {
                    distinct.push((id, *until, (*keep).max(*until)));
                }
            }
        }
        // One order for every instance (as in `mark_events_seen`): no deadlock between two
        // batches sharing ids.
        distinct.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut settled_sorted: Vec<(&str, u64)> = settled.iter().map(|(k, v)| (*k, *v)).collect();
        settled_sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let c: SortedClaims = (
            distinct.iter().map(|c| c.0.to_owned()).collect(),
            distinct.iter().map(|c| db_time(c.1)).collect(),
            distinct.iter().map(|c| db_time(c.2)).collect(),
        );
        let s: Sorted = (
            settled_sorted
                .iter()
                .map(|(id, _)| (*id).to_owned())
                .collect(),
            settled_sorted.iter().map(|(_, t)| db_time(*t)).collect(),
        );
        let decided = if c.0.is_empty() && s.0.is_empty() {
            HashMap::new()
        } else {
            exec(&c, &s, db_time(now)).await?
        };
        let mut answered: HashSet<&str> = HashSet::with_capacity(first.len());
        claims
            .iter()
            .map(|(id, _, _)| {
                let d = match settled.get(id) {
                    Some(t) => EventClaim::Recorded(*t),
                    None => decided.get(*id).copied().ok_or_else(|| {
                        Error::Engine("a claim of the batch went unanswered".to_owned())
                    })?,
                };
                if answered.insert(id) {
                    return Ok(d);
                }
                Ok(match d {
                    EventClaim::Won => EventClaim::Held(first.get(id).copied().unwrap_or(0)),
                    held => held,
                })
            })
            .collect()
    }
}

impl PgStore {
    /// For tests: the plan PostgreSQL keeps for the claim batcher's statement once it stops
    /// planning each run anew (the generic plan, forced here), as `EXPLAIN` prints it.
    pub fn testing_claim_round_plan(&self) -> Result<String> {
        self.with(async |c| {
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            tx.batch_execute(&format!(
                "SET LOCAL plan_cache_mode = force_generic_plan;
                 PREPARE lark_claim_round(text[], bigint[], bigint, text[], bigint[], bigint[])
                 AS {ROUND}"
            ))
            .await
            .map_err(|e| pg_err(&e))?;
            let rows = tx
                .query(
                    "EXPLAIN EXECUTE lark_claim_round('{}', '{}', 0, '{}', '{}', '{}')",
                    &[],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            tx.batch_execute("DEALLOCATE lark_claim_round")
                .await
                .map_err(|e| pg_err(&e))?;
            tx.commit().await.map_err(|e| pg_err(&e))?;
            rows.iter()
                .map(|r| r.try_get::<_, String>(0).map_err(|e| pg_err(&e)))
                .collect::<Result<Vec<_>>>()
                .map(|lines| lines.join("\n"))
        })
    }

    /// Queues a claim of `ids` until `until` (as of `now`) for the batcher; the reply says, for
    /// each id in order, what [`PgStore::claim_event`] would. The ids go into one batch, so
    /// one statement decides them all: of two instances claiming the same ids (an event's id
    /// and its message's), one wins them all, since the statement takes them in one order and
    /// the other waits for its rows (claimed in two batches, each could win a part and both
    /// let the event go). `keep`: the time a record would be kept until, were it settled
    /// (the claim's row carries it already, so settling it is an update in place); a settle of
    /// the id keeps this time rather than its own. Ids that cannot be claimed are answered at
    /// once.
    pub fn queue_claims(&self, ids: &[&str], until: u64, keep: u64, now: u64) -> ClaimReply {
        let (reply, rx) = oneshot::channel();
        if let Some(bad) = ids.iter().find(|id| !valid_event_key(id)) {
            let _ = reply.send(Err(Error::Invalid(format!(
                "event id of {} bytes cannot be claimed",
                bad.len()
            ))));
            return rx;
        }
        if ids.is_empty() {
            let _ = reply.send(Ok(Vec::new()));
            return rx;
        }
        let req = Request::Claim {
            ids: ids.iter().map(|id| (*id).to_owned()).collect(),
            until,
            keep,
            now,
            reply,
        };
        self.enqueue(req);
        rx
    }

    /// Queues `ids` to be recorded as seen until `forget_at` by the batcher's next round trip
    /// (with the claims queued meanwhile); the reply comes once that batch has committed.
    pub fn queue_settle(&self, ids: &[&str], forget_at: u64) -> oneshot::Receiver<Result<()>> {
        let (reply, rx) = oneshot::channel();
        if let Some(bad) = ids.iter().find(|id| !valid_event_key(id)) {
            let _ = reply.send(Err(Error::Invalid(format!(
                "event id of {} bytes cannot be recorded",
                bad.len()
            ))));
            return rx;
        }
        if ids.is_empty() {
            let _ = reply.send(Ok(()));
            return rx;
        }
        let req = Request::Settle {
            ids: ids.iter().map(|id| (*id).to_owned()).collect(),
            forget_at,
            reply,
        };
        self.enqueue(req);
        rx
    }

    /// [`PgStore::queue_settle`], waited for on this thread.
    pub(crate) fn settle_queued(&self, ids: &[&str], forget_at: u64) -> Result<()> {
        block_on(self.queue_settle(ids, forget_at))
            .map_err(|_| Error::Unavailable("the claim batcher stopped".to_owned()))?
    }

    /// Queues [`PgStore::release_events`] for the batcher, sent on its connection ahead of its
    /// next round; the reply says when it is done (or why not).
    pub fn queue_release(&self, ids: &[&str], until: u64) -> oneshot::Receiver<Result<()>> {
        let (reply, rx) = oneshot::channel();
        if ids.is_empty() {
            let _ = reply.send(Ok(()));
            return rx;
        }
        let req = Request::Release {
            ids: ids.iter().map(|id| (*id).to_owned()).collect(),
            until,
            reply,
        };
        self.enqueue(req);
        rx
    }

    /// Sends `req` to the batcher; one it cannot take is answered with why not.
    fn enqueue(&self, req: Request) {
        match self.claim_queue() {
            Ok(queue) => {
                if let Err(tokio::sync::mpsc::error::SendError(req)) = queue.send(req) {
                    req.refuse(Error::Unavailable("the claim batcher stopped".to_owned()));
                }
            }
            Err(e) => req.refuse(e),
        }
    }
}
