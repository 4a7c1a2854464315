//! The claim batcher: event-id claims ([`PgStore::claim_event`]'s semantics) gathered from
//! every dispatcher of one store and decided in one statement per batch.
//!
//! A claim is queued (id, until, now, a one-shot reply) and the caller awaits the reply, so
//! the async thread that asked never blocks on PostgreSQL. One thread per store (started on
//! the first claim, named `pg-claims`) takes what is queued, up to [`MAX_BATCH`], and runs
//! [`PgStore::claim_events`]: one `INSERT … SELECT … FROM unnest(…) ON CONFLICT … RETURNING`
//! whose `SELECT` also reads the held ids' times, ids in one sorted order (one lock order for
//! every instance). While a batch is in flight the next one gathers, so claims cost one round
//! trip per batch, not one per id.
//!
//! The thread holds the store weakly: the queue's sender lives in the store, so when the last
//! handle goes, the queue closes and the thread ends.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::{mpsc, Arc, Weak};

use tokio::sync::oneshot;

use super::{Inner, PgStore};
use crate::storage::{Error, Result};

/// Claims decided in one statement at most.
pub(crate) const MAX_BATCH: usize = 256;

/// The answer to one queued claim: as [`PgStore::claim_event`]'s.
pub type ClaimReply = oneshot::Receiver<Result<Option<u64>>>;

pub(super) struct Request {
    id: String,
    until: u64,
    now: u64,
    reply: oneshot::Sender<Result<Option<u64>>>,
}

/// Starts the batcher thread of `inner`; the sender of its queue.
pub(super) fn start(inner: &Arc<Inner>) -> Result<mpsc::Sender<Request>> {
    let (tx, rx) = mpsc::channel();
    let weak = Arc::downgrade(inner);
    std::thread::Builder::new()
        .name("pg-claims".to_owned())
        .spawn(move || run(&weak, &rx))
        .map_err(|e| Error::Engine(format!("cannot start the claim batcher: {e}")))?;
    Ok(tx)
}

fn run(store: &Weak<Inner>, rx: &mpsc::Receiver<Request>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let answers = match store.upgrade() {
            Some(inner) => decide(&PgStore { inner }, &batch),
            None => Err(Error::Unavailable("the store is closing".to_owned())),
        };
        match answers {
            Ok(answers) => {
                for (r, a) in batch.into_iter().zip(answers) {
                    // The caller may have stopped waiting: nothing to tell then.
                    let _ = r.reply.send(Ok(a));
                }
            }
            Err(e) => {
                // Each asker gets the error's kind (a lost connection stays `Unavailable`).
                for r in batch {
                    let again = match &e {
                        Error::Unavailable(m) => Error::Unavailable(m.clone()),
                        Error::Invalid(m) => Error::Invalid(m.clone()),
                        other => Error::Engine(other.to_string()),
                    };
                    let _ = r.reply.send(Err(again));
                }
            }
        }
    }
}

/// The answers to `batch`, in its order, all decided as of the batch's earliest `now` (a
/// claim lapsed by then is free for every asker; a later `now` would free a claim some asker
/// still saw held).
fn decide(store: &PgStore, batch: &[Request]) -> Result<Vec<Option<u64>>> {
    let claims: Vec<(&str, u64)> = batch.iter().map(|r| (r.id.as_str(), r.until)).collect();
    let now = batch.iter().map(|r| r.now).min().unwrap_or(0);
    store.claim_batch(&claims, now)
}

impl PgStore {
    /// Decides `claims` (id, until) as of `now` in one statement, each answered as
    /// [`PgStore::claim_event`] answers, in the order given. An id asked more than once is
    /// decided for its first asker; a later one finds it held by what the first found, or by
    /// the first's claim when it won (`Some(its until)`): one claim per id wins.
    pub fn claim_batch(&self, claims: &[(&str, u64)], now: u64) -> Result<Vec<Option<u64>>> {
        let mut first: HashMap<&str, u64> = HashMap::with_capacity(claims.len());
        let mut distinct: Vec<(&str, u64)> = Vec::with_capacity(claims.len());
        for (id, until) in claims {
            // The first asker's until is the one claimed with.
            if let Entry::Vacant(v) = first.entry(id) {
                v.insert(*until);
                distinct.push((id, *until));
            }
        }
        let decided: HashMap<&str, Option<u64>> = distinct
            .iter()
            .map(|(id, _)| *id)
            .zip(self.claim_events(&distinct, now)?)
            .collect();
        let mut answered: HashSet<&str> = HashSet::with_capacity(distinct.len());
        claims
            .iter()
            .map(|(id, _)| {
                let d = decided.get(id).copied().ok_or_else(|| {
                    Error::Engine("a claim of the batch went unanswered".to_owned())
                })?;
                if answered.insert(id) {
                    return Ok(d);
                }
                Ok(Some(match d {
                    None => first.get(id).copied().unwrap_or(0),
                    Some(t) => t,
                }))
            })
            .collect()
    }
}

impl PgStore {
    /// Queues a claim of `id` until `until` (as of `now`) for the batcher; the reply says what
    /// [`PgStore::claim_event`] would. An id that cannot be claimed is answered at once.
    pub fn queue_claim(&self, id: &str, until: u64, now: u64) -> ClaimReply {
        let (reply, rx) = oneshot::channel();
        let req = Request {
            id: id.to_owned(),
            until,
            now,
            reply,
        };
        let queue = match self.claim_queue() {
            Ok(q) => q,
            Err(e) => {
                let _ = req.reply.send(Err(e));
                return rx;
            }
        };
        if let Err(mpsc::SendError(req)) = queue.send(req) {
            let _ = req.reply.send(Err(Error::Unavailable(
                "the claim batcher stopped".to_owned(),
            )));
        }
        rx
    }
}
