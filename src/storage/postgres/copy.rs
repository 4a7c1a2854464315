//! Copying a store between the backends (`lark-service migrate`): a redb store into an empty
//! PostgreSQL store ([`PgStore::copy_from_redb`]) and back ([`PgStore::copy_into_redb`]).
//!
//! Sessions, tokens, users and seen event ids move as they are stored: the sealed values are
//! bound to the same associated data in both stores (table, row, field, key id), so they are
//! copied without being opened or sealed again, and the copy never holds a secret in clear.
//! The webhook outbox (live and dead entries, as they are: their bodies are not secret), the
//! users' grants (with their reminder marks, so nobody is reminded twice) and the app registry
//! (each app's secret sealed as it was: both backends seal it under the same associated data;
//! its rows compared on both sides) are copied too, and the outbox's sequence goes on above the
//! source's. Leases are not copied (they belong to the running instances of one store), nor
//! cursors or the change feed.
//!
//! The source is read as one consistent snapshot: one redb read transaction, or one
//! `REPEATABLE READ, READ ONLY` PostgreSQL transaction whose rows are fetched in pages through
//! portals. The caller holds the redb store it opened, so a store the service still holds is
//! already refused by its lock; a PostgreSQL store some instance still serves from (in either
//! direction) is refused by [`PgStore::serving_holders`], before the copy and, when copying
//! back, after it. The target must be empty (so
//! that the counts compared at the end mean something) and is written in batches of
//! [`BATCH`] rows, each one transaction, through one loop ([`pump`]) in both directions. The
//! per-state counts follow (triggers on PostgreSQL, the kept counts on redb) and are compared,
//! and a sample of sessions and tokens is opened on both sides and compared.

use redb::{ReadableDatabase, ReadableTable};
use secrecy::ExposeSecret;
use tokio_postgres::{Row, Transaction};

use super::feed::{append_changes, KIND_UPSERT};
use super::rows::{
    stored_session, stored_token, user, SessionParams, TokenParams, SESSION_COLUMNS,
    SESSION_VALUES, TOKEN_COLUMNS,
};
use super::{api_time, block_on, db_time, pg_err, row_counts, PgStore};
use crate::storage::outbox::{decode_entry, encode_entry, OUTBOX_SEQ};
use crate::storage::records::{encode, StoredSession, StoredToken, USER_VERSION};
use crate::storage::sessions::validate_ids;
use crate::storage::tables::{
    GRANTS, META, OUTBOX, OUTBOX_DEAD, SEEN_EVENTS, SEEN_EVENTS_EXPIRY, SESSIONS, SESSIONS_EXPIRED,
    TOKENS, TOKEN_REFRESH_DUE, USERS,
};
use crate::storage::tokens::refreshable;
use crate::storage::traits::SessionStore;
use crate::storage::{AppRow, Error, OutboxEntry, Result, SessionId, Store, StoreCounts, UserInfo};

/// Rows per target transaction (and per page read from PostgreSQL).
const BATCH: usize = 500;

/// How many sessions and tokens are opened on both sides after a copy.
const SAMPLE: usize = 16;

/// What a copy did: the source's counts and the target's after the copy (equal, or the copy
/// fails).
#[derive(Clone, Debug)]
pub struct CopyReport {
    /// Rows in the store copied from.
    pub source: StoreCounts,
    /// Rows in the store copied into, after the copy.
    pub target: StoreCounts,
}

/// A batch of rows for the PostgreSQL target.
enum Batch {
    Sessions(Vec<SessionParams>),
    Tokens(Vec<TokenParams>),
    Users(Vec<UserInfo>),
    Events(Vec<(String, u64)>),
    Grants(Vec<Grant>),
    Outbox(bool, Vec<OutboxEntry>),
}

/// A grant row: app, user, granted at, reminded at (0: not yet).
type Grant = (String, String, u64, u64);

/// (grants, live outbox entries, dead outbox entries) of a store: compared after a copy.
type OutboxCounts = (u64, u64, u64);

/// Moves every row of `source` into `sink`, [`BATCH`] rows per call, and reports the running
/// total after each batch as `progress(what, rows)`. Returns the rows written. The one copy loop
/// of both directions.
fn pump<T>(
    what: &'static str,
    source: impl Iterator<Item = Result<T>>,
    sink: &mut dyn FnMut(Vec<T>) -> Result<u64>,
    progress: &mut dyn FnMut(&'static str, u64),
) -> Result<u64> {
    let mut n = 0u64;
    let mut batch = Vec::with_capacity(BATCH);
    for row in source {
        batch.push(row?);
        if batch.len() == BATCH {
            n += sink(std::mem::take(&mut batch))?;
            progress(what, n);
        }
    }
    if !batch.is_empty() {
        n += sink(batch)?;
    }
    progress(what, n);
    Ok(n)
}

/// The rows of one query in a PostgreSQL transaction, fetched [`BATCH`] at a time through a
/// portal (the whole result is never held at once).
struct Pages<'t, 'c> {
    tx: &'t Transaction<'c>,
    portal: tokio_postgres::Portal,
    buf: std::vec::IntoIter<Row>,
    done: bool,
}

impl<'t, 'c> Pages<'t, 'c> {
    fn new(tx: &'t Transaction<'c>, query: &str) -> Result<Self> {
        let portal = block_on(tx.bind(query, &[])).map_err(|e| pg_err(&e))?;
        Ok(Self {
            tx,
            portal,
            buf: Vec::new().into_iter(),
            done: false,
        })
    }
}

impl Iterator for Pages<'_, '_> {
    type Item = Result<Row>;

    fn next(&mut self) -> Option<Result<Row>> {
        loop {
            if let Some(r) = self.buf.next() {
                return Some(Ok(r));
            }
            if self.done {
                return None;
            }
            let page = i32::try_from(BATCH).unwrap_or(i32::MAX);
            match block_on(self.tx.query_portal(&self.portal, page)) {
                Ok(rows) => {
                    self.done = rows.len() < BATCH;
                    self.buf = rows.into_iter();
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(pg_err(&e)));
                }
            }
        }
    }
}

fn not_empty(what: &str, c: &StoreCounts, advice: &str) -> Error {
    Error::Invalid(format!(
        "the {what} store is not empty ({} sessions, {} tokens, {} users, {} seen events); {advice}",
        c.sessions, c.tokens, c.users, c.seen_events
    ))
}

/// Compares the decrypted secrets of a sample read from both stores: the same key ring must
/// open the copied ciphertext to the same plaintext.
fn same_secrets(
    what: &str,
    a: Option<&secrecy::SecretString>,
    b: Option<&secrecy::SecretString>,
) -> Result<()> {
    if a.map(ExposeSecret::expose_secret) == b.map(ExposeSecret::expose_secret) {
        Ok(())
    } else {
        // Never the values themselves: only which record differs.
        Err(Error::Invalid(format!(
            "the copy of {what} does not open to the source's secret"
        )))
    }
}

/// How recent a heartbeat keeps an instance live: three of its 5 s intervals
/// (`daemon::fleet::HEARTBEAT_EVERY`, `LIVE_INTERVALS`).
pub(crate) const HEARTBEAT_LIVE_MS: u64 = 15_000;

impl PgStore {
    /// The instances serving from this database, by holder name: those whose heartbeat is
    /// live (`ls_instances`, seen within three of its 5 s intervals) and those still holding
    /// a lease (`ls_leases`: an instance whose heartbeat row a clean stop deleted, or an
    /// older build without heartbeats, may still be finishing a leased unit). Empty when none.
    pub fn serving_holders(&self, now: u64) -> Result<Vec<String>> {
        let beat_since = db_time(now.saturating_sub(HEARTBEAT_LIVE_MS));
        self.with(async |c| {
            let rows = c
                .query(
                    "SELECT holder FROM ls_leases WHERE expires_at > $1
                     UNION SELECT holder FROM ls_instances WHERE last_seen >= $2
                     ORDER BY holder",
                    &[&db_time(now), &beat_since],
                )
                .await
                .map_err(|e| pg_err(&e))?;
            rows.iter()
                .map(|r| r.try_get::<_, String>(0).map_err(|e| pg_err(&e)))
                .collect()
        })
    }

    /// Refuses while an instance serves from this database.
    fn refuse_live(&self, when: &str) -> Result<()> {
        let live = self.serving_holders(crate::storage::now_ms())?;
        if live.is_empty() {
            return Ok(());
        }
        Err(Error::Invalid(format!(
            "{when}: {} instance(s) still serve from this PostgreSQL database ({}); stop every instance of the fleet (and let their leases lapse) first",
            live.len(),
            live.join(", ")
        )))
    }

    /// Copies every session, token, user and seen event id of `src` into this store, which
    /// must be empty, and checks the counts. See the module notes.
    pub fn copy_from_redb(
        &self,
        src: &Store,
        progress: &mut dyn FnMut(&'static str, u64),
    ) -> Result<CopyReport> {
        let before = self.counts()?;
        if before != StoreCounts::default() {
            return Err(not_empty(
                "PostgreSQL",
                &before,
                "migrate only into a new database",
            ));
        }
        if !self.list_apps()?.is_empty() {
            return Err(Error::Invalid(
                "the PostgreSQL database already holds apps; migrate only into a new database"
                    .to_owned(),
            ));
        }
        // A fleet serving from the empty database would write beside the copy.
        self.refuse_live("refusing to copy")?;
        let source = src.counts()?;
        let txn = src.db().begin_read().map_err(|e| src.err(e))?;
        let sink = |b: Batch| self.write_batch(b);
        let t = txn.open_table(SESSIONS).map_err(|e| src.err(e))?;
        // A session the sweep expired is a pending record with a mark beside it: copied as
        // every reader sees it (expired).
        let expired = txn.open_table(SESSIONS_EXPIRED).map_err(|e| src.err(e))?;
        let rows = t.iter().map_err(|e| src.err(e))?.map(|row| {
            let (k, v) = row.map_err(|e| src.err(e))?;
            let at = expired.get(k.value()).map_err(|e| src.err(e))?;
            Ok(SessionParams::new(
                SessionId(k.value()),
                StoredSession::decode(v.value())?.overlay(at.map(|a| a.value())),
            ))
        });
        pump(
            "sessions",
            rows,
            &mut |b| sink(Batch::Sessions(b)),
            progress,
        )?;
        let t = txn.open_table(TOKENS).map_err(|e| src.err(e))?;
        let rows = t.iter().map_err(|e| src.err(e))?.map(|row| {
            let (k, v) = row.map_err(|e| src.err(e))?;
            let (app, user) = k.value();
            Ok(TokenParams::new(app, user, StoredToken::decode(v.value())?))
        });
        pump("tokens", rows, &mut |b| sink(Batch::Tokens(b)), progress)?;
        let t = txn.open_table(USERS).map_err(|e| src.err(e))?;
        let rows = t.iter().map_err(|e| src.err(e))?.map(|row| {
            let (_, v) = row.map_err(|e| src.err(e))?;
            UserInfo::decode_stored(v.value())
        });
        pump("users", rows, &mut |b| sink(Batch::Users(b)), progress)?;
        let t = txn.open_table(SEEN_EVENTS).map_err(|e| src.err(e))?;
        let rows = t.iter().map_err(|e| src.err(e))?.map(|row| {
            let (k, v) = row.map_err(|e| src.err(e))?;
            Ok((k.value().to_owned(), v.value()))
        });
        pump(
            "seen events",
            rows,
            &mut |b| sink(Batch::Events(b)),
            progress,
        )?;
        let t = txn.open_table(GRANTS).map_err(|e| src.err(e))?;
        let rows = t.iter().map_err(|e| src.err(e))?.map(|row| {
            let (k, v) = row.map_err(|e| src.err(e))?;
            let ((app, usr), (at, reminded)) = (k.value(), v.value());
            Ok((app.to_owned(), usr.to_owned(), at, reminded))
        });
        pump("grants", rows, &mut |b| sink(Batch::Grants(b)), progress)?;
        for (dead, table, what) in [
            (false, OUTBOX, "webhook events"),
            (true, OUTBOX_DEAD, "dead webhook events"),
        ] {
            let t = txn.open_table(table).map_err(|e| src.err(e))?;
            let rows = t.iter().map_err(|e| src.err(e))?.map(|row| {
                let (k, v) = row.map_err(|e| src.err(e))?;
                decode_entry(k.value(), v.value())
            });
            pump(what, rows, &mut |b| sink(Batch::Outbox(dead, b)), progress)?;
        }
        let meta = txn.open_table(META).map_err(|e| src.err(e))?;
        let last_seq = meta
            .get(OUTBOX_SEQ)
            .map_err(|e| src.err(e))?
            .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
            .map_or(0, u64::from_be_bytes);
        self.continue_outbox_seq(last_seq)?;
        drop(txn);
        let apps = src.sealed_apps()?;
        for (row, secret) in &apps {
            self.insert_sealed_app(&super::SealedApp {
                row: row.clone(),
                secret: secret.clone(),
            })?;
        }
        progress("apps", apps.len() as u64);
        same_apps(&src.list_apps()?, &self.list_apps()?, "redb", "PostgreSQL")?;
        let target = self.counts()?;
        check_counts(&source, &target, "redb", "PostgreSQL")?;
        check_outbox(
            &redb_outbox_counts(src)?,
            &self.outbox_counts_all()?,
            "redb",
            "PostgreSQL",
        )?;
        // The per-state counts came through the triggers: they must equal the source's.
        check_states(
            &src.count_sessions_by_state()?,
            &self.count_sessions_by_state()?,
            "redb",
            "PostgreSQL",
        )?;
        sample_opens(src, self)?;
        Ok(CopyReport { source, target })
    }

    /// Copies every session, token, user and seen event id of this store into `dst`, a redb
    /// store that must be empty, and checks the counts. Refused while an instance still holds
    /// a lease here. See the module notes.
    pub fn copy_into_redb(
        &self,
        dst: &Store,
        progress: &mut dyn FnMut(&'static str, u64),
    ) -> Result<CopyReport> {
        let before = dst.counts()?;
        if before != StoreCounts::default() {
            return Err(not_empty(
                "redb",
                &before,
                "migrate only into a new file (move the existing one away first)",
            ));
        }
        if !dst.list_apps()?.is_empty() {
            return Err(Error::Invalid(
                "the redb file already holds apps; migrate only into a new file (move the existing one away first)"
                    .to_owned(),
            ));
        }
        self.refuse_live("refusing to copy")?;
        let mut conn = self.conn()?;
        let client = conn.client()?;
        let tx = block_on(
            client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start(),
        )
        .map_err(|e| pg_err(&e))?;
        // Counted in the snapshot that is copied.
        let source = block_on(row_counts(&tx))?;
        copy_snapshot(&tx, dst, progress)?;
        block_on(tx.commit()).map_err(|e| pg_err(&e))?;
        drop(conn);
        let target = dst.counts()?;
        check_counts(&source, &target, "PostgreSQL", "redb")?;
        // (copy_snapshot compared the grants and the webhook outbox.)
        check_states(
            &self.count_sessions_by_state()?,
            &dst.count_sessions_by_state()?,
            "PostgreSQL",
            "redb",
        )?;
        sample_opens(dst, self)?;
        // An instance that started during the copy may have written after the snapshot.
        self.refuse_live("an instance started during the copy; the redb file may miss its writes")?;
        Ok(CopyReport { source, target })
    }

    fn write_batch(&self, batch: Batch) -> Result<u64> {
        self.with(async |c| {
            let tx = c.transaction().await.map_err(|e| pg_err(&e))?;
            let n = match &batch {
                Batch::Sessions(rows) => {
                    let stmt = tx
                        .prepare(&format!(
                            "INSERT INTO ls_sessions ({SESSION_COLUMNS}) VALUES ({SESSION_VALUES})"
                        ))
                        .await
                        .map_err(|e| pg_err(&e))?;
                    for p in rows {
                        tx.execute(&stmt, &p.params())
                            .await
                            .map_err(|e| pg_err(&e))?;
                    }
                    let changes: Vec<(i16, Vec<u8>)> =
                        rows.iter().map(|p| (KIND_UPSERT, p.id.clone())).collect();
                    append_changes(&tx, self.change_feed_on(), &changes).await?;
                    rows.len()
                }
                Batch::Tokens(rows) => {
                    let stmt = tx
                        .prepare(&format!(
                            "INSERT INTO ls_tokens ({TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, \
                             $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
                        ))
                        .await
                        .map_err(|e| pg_err(&e))?;
                    for p in rows {
                        tx.execute(&stmt, &p.params())
                            .await
                            .map_err(|e| pg_err(&e))?;
                    }
                    rows.len()
                }
                Batch::Users(rows) => {
                    for u in rows {
                        tx.execute(
                            "INSERT INTO ls_users (app_id, open_id, user_id, union_id, name, \
                             email, avatar_url, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                            &[
                                &u.app_id,
                                &u.open_id,
                                &u.user_id,
                                &u.union_id,
                                &u.name,
                                &u.email,
                                &u.avatar_url,
                                &db_time(u.updated_at),
                            ],
                        )
                        .await
                        .map_err(|e| pg_err(&e))?;
                    }
                    rows.len()
                }
                Batch::Events(rows) => {
                    let ids: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
                    let at: Vec<i64> = rows.iter().map(|r| db_time(r.1)).collect();
                    tx.execute(
                        "INSERT INTO ls_seen_events (id, forget_at)
                         SELECT * FROM unnest($1::text[], $2::bigint[])",
                        &[&ids, &at],
                    )
                    .await
                    .map_err(|e| pg_err(&e))?;
                    rows.len()
                }
                Batch::Grants(rows) => {
                    for (app, usr, at, reminded) in rows {
                        tx.execute(
                            "INSERT INTO ls_grants (app_id, user_id, granted_at, reminded_at)
                             VALUES ($1, $2, $3, $4)",
                            &[app, usr, &db_time(*at), &db_time(*reminded)],
                        )
                        .await
                        .map_err(|e| pg_err(&e))?;
                    }
                    rows.len()
                }
                Batch::Outbox(dead, rows) => {
                    let table = if *dead { "ls_outbox_dead" } else { "ls_outbox" };
                    for e in rows {
                        tx.execute(
                            &format!(
                                "INSERT INTO {table} ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                                super::outbox::ENTRY_COLUMNS
                            ),
                            &[
                                &db_time(e.seq),
                                &e.event_id,
                                &e.kind,
                                &e.body,
                                &db_time(e.created_at),
                                &i32::try_from(e.attempts).unwrap_or(i32::MAX),
                                &db_time(e.next_attempt_at),
                                &e.delivered_to,
                                &e.last_error,
                            ],
                        )
                        .await
                        .map_err(|e| pg_err(&e))?;
                    }
                    rows.len()
                }
            };
            tx.commit().await.map_err(|e| pg_err(&e))?;
            Ok(n as u64)
        })
    }

    /// Sets the outbox sequence so the next entry gets a number above `last` and above every
    /// copied entry's (a sequence number is never handed out twice).
    fn continue_outbox_seq(&self, last: u64) -> Result<()> {
        let last = db_time(last);
        self.with(async |c| {
            c.query(
                "SELECT setval('ls_outbox_seq', t.top) FROM (SELECT GREATEST($1::bigint,
                    COALESCE((SELECT max(seq) FROM ls_outbox), 0),
                    COALESCE((SELECT max(seq) FROM ls_outbox_dead), 0)) AS top) AS t
                 WHERE t.top > 0",
                &[&last],
            )
            .await
            .map_err(|e| pg_err(&e))?;
            Ok(())
        })
    }

    fn outbox_counts_all(&self) -> Result<OutboxCounts> {
        self.with(async |c| outbox_counts_in(&*c).await)
    }
}

async fn outbox_counts_in(c: &impl tokio_postgres::GenericClient) -> Result<OutboxCounts> {
    let row = c
        .query_one(
            "SELECT (SELECT count(*) FROM ls_grants), (SELECT count(*) FROM ls_outbox),
                    (SELECT count(*) FROM ls_outbox_dead)",
            &[],
        )
        .await
        .map_err(|e| pg_err(&e))?;
    let n = |i: usize| -> Result<u64> {
        let v: i64 = row.try_get(i).map_err(|e| pg_err(&e))?;
        Ok(u64::try_from(v).unwrap_or(0))
    };
    Ok((n(0)?, n(1)?, n(2)?))
}

fn redb_outbox_counts(s: &Store) -> Result<OutboxCounts> {
    let txn = s.db().begin_read().map_err(|e| s.err(e))?;
    let grants = txn.open_table(GRANTS).map_err(|e| s.err(e))?;
    let n = redb::ReadableTableMetadata::len(&grants).map_err(|e| s.err(e))?;
    let (live, dead) = s.outbox_counts()?;
    Ok((n, live, dead))
}

fn check_outbox(source: &OutboxCounts, target: &OutboxCounts, from: &str, to: &str) -> Result<()> {
    if source == target {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "the copy of the grants and the webhook outbox (grants, live, dead) does not match \
             its source: {from} {source:?}, {to} {target:?}"
        )))
    }
}

/// The app rows of both sides, compared in app id order (PostgreSQL's collation may order
/// them differently from redb's bytes).
fn same_apps(source: &[AppRow], target: &[AppRow], from: &str, to: &str) -> Result<()> {
    let sorted = |v: &[AppRow]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.app_id.cmp(&b.app_id));
        v
    };
    if sorted(source) == sorted(target) {
        Ok(())
    } else {
        Err(Error::Engine(format!(
            "the copy's apps differ: {} in {from}, {} in {to}",
            source.len(),
            target.len()
        )))
    }
}

fn write_redb_grants(dst: &Store, rows: &[Grant]) -> Result<u64> {
    let txn = dst.begin_write()?;
    {
        let mut t = txn.open_table(GRANTS).map_err(|e| dst.err(e))?;
        for (app, usr, at, reminded) in rows {
            validate_ids(app, usr)?;
            t.insert((app.as_str(), usr.as_str()), (*at, *reminded))
                .map_err(|e| dst.err(e))?;
        }
    }
    dst.commit(txn)?;
    Ok(rows.len() as u64)
}

fn write_redb_outbox(dst: &Store, dead: bool, rows: &[OutboxEntry]) -> Result<u64> {
    let txn = dst.begin_write()?;
    {
        let mut t = txn
            .open_table(if dead { OUTBOX_DEAD } else { OUTBOX })
            .map_err(|e| dst.err(e))?;
        for e in rows {
            t.insert(e.seq, encode_entry(e).as_slice())
                .map_err(|e| dst.err(e))?;
        }
    }
    dst.commit(txn)?;
    Ok(rows.len() as u64)
}

/// The redb store's last handed-out outbox number: at least `last` and every copied entry's.
fn set_redb_outbox_seq(dst: &Store, last: u64) -> Result<()> {
    let txn = dst.begin_write()?;
    {
        let live = txn.open_table(OUTBOX).map_err(|e| dst.err(e))?;
        let dead = txn.open_table(OUTBOX_DEAD).map_err(|e| dst.err(e))?;
        let mut top = last;
        for t in [&live, &dead] {
            if let Some((k, _)) = t.last().map_err(|e| dst.err(e))? {
                top = top.max(k.value());
            }
        }
        let mut meta = txn.open_table(META).map_err(|e| dst.err(e))?;
        meta.insert(OUTBOX_SEQ, top.to_be_bytes().as_slice())
            .map_err(|e| dst.err(e))?;
    }
    dst.commit(txn)
}

/// Copies every session, token, user, seen event id, grant, webhook outbox entry (live and
/// dead, and the outbox sequence) and registry app that `tx` (a snapshot) sees into `dst`
/// as they are stored (sealed values never opened), in batches of [`BATCH`] rows: the copy
/// back to redb and the PostgreSQL backup (`backup`).
pub(crate) fn copy_snapshot(
    tx: &Transaction<'_>,
    dst: &Store,
    progress: &mut dyn FnMut(&'static str, u64),
) -> Result<()> {
    let rows = Pages::new(tx, &format!("SELECT {SESSION_COLUMNS} FROM ls_sessions"))?
        .map(|r| r.and_then(|row| stored_session(&row)));
    pump(
        "sessions",
        rows,
        &mut |b| write_redb_sessions(dst, &b),
        progress,
    )?;
    let rows = Pages::new(tx, &format!("SELECT {TOKEN_COLUMNS} FROM ls_tokens"))?.map(|r| {
        r.and_then(|row| {
            let app: String = row.try_get("app_id").map_err(|e| pg_err(&e))?;
            let usr: String = row.try_get("user_id").map_err(|e| pg_err(&e))?;
            Ok((app, usr, stored_token(&row)?))
        })
    });
    pump(
        "tokens",
        rows,
        &mut |b| write_redb_tokens(dst, &b),
        progress,
    )?;
    let rows = Pages::new(
        tx,
        "SELECT app_id, open_id, user_id, union_id, name, email, avatar_url, updated_at \
             FROM ls_users",
    )?
    .map(|r| r.and_then(|row| user(&row)));
    pump("users", rows, &mut |b| write_redb_users(dst, &b), progress)?;
    // A claim is copied as held until its claim's end (as a record of that time), not its
    // record's: its handler may not have succeeded.
    let rows = Pages::new(
        tx,
        "SELECT id, COALESCE(held_until, forget_at) FROM ls_seen_events",
    )?
    .map(|r| {
        r.and_then(|row| {
            let id: String = row.try_get(0).map_err(|e| pg_err(&e))?;
            let at: i64 = row.try_get(1).map_err(|e| pg_err(&e))?;
            Ok((id, api_time(at, "seen_events")?))
        })
    });
    pump(
        "seen events",
        rows,
        &mut |b| write_redb_events(dst, &b),
        progress,
    )?;
    let rows = Pages::new(
        tx,
        "SELECT app_id, user_id, granted_at, reminded_at FROM ls_grants",
    )?
    .map(|r| {
        r.and_then(|row| {
            let e = |e: tokio_postgres::Error| pg_err(&e);
            Ok((
                row.try_get(0).map_err(e)?,
                row.try_get(1).map_err(e)?,
                api_time(row.try_get(2).map_err(e)?, "grants")?,
                api_time(row.try_get(3).map_err(e)?, "grants")?,
            ))
        })
    });
    pump(
        "grants",
        rows,
        &mut |b| write_redb_grants(dst, &b),
        progress,
    )?;
    for (dead, table, what) in [
        (false, "ls_outbox", "webhook events"),
        (true, "ls_outbox_dead", "dead webhook events"),
    ] {
        let rows = Pages::new(
            tx,
            &format!("SELECT {} FROM {table}", super::outbox::ENTRY_COLUMNS),
        )?
        .map(|r| r.and_then(|row| super::outbox::entry(&row)));
        pump(
            what,
            rows,
            &mut |b| write_redb_outbox(dst, dead, &b),
            progress,
        )?;
    }
    let source_outbox = block_on(outbox_counts_in(tx))?;
    let last_seq: i64 = block_on(tx.query_one(
        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM ls_outbox_seq",
        &[],
    ))
    .and_then(|r| r.try_get(0))
    .map_err(|e| pg_err(&e))?;
    set_redb_outbox_seq(dst, api_time(last_seq, "outbox")?)?;
    check_outbox(
        &source_outbox,
        &redb_outbox_counts(dst)?,
        "PostgreSQL",
        "redb",
    )?;
    let apps: Vec<_> = block_on(super::apps::sealed_apps_in(tx))?
        .into_iter()
        .map(|a| (a.row, a.secret))
        .collect();
    let n = dst.insert_sealed_apps(&apps)?;
    progress("apps", n);
    let source_apps: Vec<_> = apps.into_iter().map(|(row, _)| row).collect();
    same_apps(&source_apps, &dst.list_apps()?, "PostgreSQL", "redb")
}

pub(crate) fn check_counts(
    source: &StoreCounts,
    target: &StoreCounts,
    from: &str,
    to: &str,
) -> Result<()> {
    if source == target {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "the copy does not match its source: {from} {source:?}, {to} {target:?}"
        )))
    }
}

fn check_states<T: PartialEq + std::fmt::Debug>(
    source: &T,
    target: &T,
    from: &str,
    to: &str,
) -> Result<()> {
    if source == target {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "per-state counts differ after the copy: {from} {source:?}, {to} {target:?}"
        )))
    }
}

/// Opens the first [`SAMPLE`] sessions and tokens of the redb store and the same records of
/// the PostgreSQL store with the one key ring: each must open on both sides, to the same
/// secrets.
fn sample_opens(redb: &Store, pg: &PgStore) -> Result<()> {
    let (ids, keys) = {
        let txn = redb.db().begin_read().map_err(|e| redb.err(e))?;
        let sessions = txn.open_table(SESSIONS).map_err(|e| redb.err(e))?;
        let mut ids = Vec::with_capacity(SAMPLE);
        for row in sessions.iter().map_err(|e| redb.err(e))?.take(SAMPLE) {
            ids.push(SessionId(row.map_err(|e| redb.err(e))?.0.value()));
        }
        let tokens = txn.open_table(TOKENS).map_err(|e| redb.err(e))?;
        let mut keys = Vec::with_capacity(SAMPLE);
        for row in tokens.iter().map_err(|e| redb.err(e))?.take(SAMPLE) {
            let (k, _) = row.map_err(|e| redb.err(e))?;
            let (app, usr) = k.value();
            keys.push((app.to_owned(), usr.to_owned()));
        }
        (ids, keys)
    };
    for id in ids {
        let missing = || Error::Invalid(format!("session {id} is missing after the copy"));
        let a = redb.get_session(id)?.ok_or_else(missing)?;
        let b = SessionStore::get_session(pg, id)?.ok_or_else(missing)?;
        let what = format!("session {id}");
        same_secrets(&what, a.access_token.as_ref(), b.access_token.as_ref())?;
        same_secrets(&what, a.refresh_token.as_ref(), b.refresh_token.as_ref())?;
        same_secrets(&what, a.pkce_verifier.as_ref(), b.pkce_verifier.as_ref())?;
    }
    for (app, usr) in keys {
        let what = format!("the token of {app}/{usr}");
        let missing = || Error::Invalid(format!("{what} is missing after the copy"));
        let a = redb.get_token(&app, &usr)?.ok_or_else(missing)?;
        let b =
            crate::storage::traits::TokenStore::get_token(pg, &app, &usr)?.ok_or_else(missing)?;
        same_secrets(&what, Some(&a.access_token), Some(&b.access_token))?;
        same_secrets(&what, a.refresh_token.as_ref(), b.refresh_token.as_ref())?;
    }
    Ok(())
}

/// Writes sessions as they are stored, with their index entries and counts, in one durable
/// transaction.
fn write_redb_sessions(dst: &Store, rows: &[(SessionId, StoredSession)]) -> Result<u64> {
    let txn = dst.begin_write()?;
    {
        let mut t = dst.open_session_tables(&txn)?;
        for (id, s) in rows {
            validate_ids(&s.app_id, &s.user_id)?;
            dst.write_stored_session(&mut t, *id, s)?;
        }
    }
    dst.commit(txn)?;
    Ok(rows.len() as u64)
}

/// Writes tokens as they are stored, with the refresh-due index, in one durable transaction.
fn write_redb_tokens(dst: &Store, rows: &[(String, String, StoredToken)]) -> Result<u64> {
    let txn = dst.begin_write()?;
    {
        let mut tokens = txn.open_table(TOKENS).map_err(|e| dst.err(e))?;
        let mut due = txn.open_table(TOKEN_REFRESH_DUE).map_err(|e| dst.err(e))?;
        for (app, usr, t) in rows {
            validate_ids(app, usr)?;
            let key = (app.as_str(), usr.as_str());
            tokens
                .insert(key, t.encode().as_slice())
                .map_err(|e| dst.err(e))?;
            if refreshable(t) {
                due.insert((t.refresh_due_at, key.0, key.1), ())
                    .map_err(|e| dst.err(e))?;
            }
        }
    }
    dst.commit(txn)?;
    Ok(rows.len() as u64)
}

fn write_redb_users(dst: &Store, rows: &[UserInfo]) -> Result<u64> {
    let txn = dst.begin_write()?;
    {
        let mut t = txn.open_table(USERS).map_err(|e| dst.err(e))?;
        for u in rows {
            validate_ids(&u.app_id, &u.open_id)?;
            t.insert(
                (u.app_id.as_str(), u.open_id.as_str()),
                encode(USER_VERSION, u).as_slice(),
            )
            .map_err(|e| dst.err(e))?;
        }
    }
    dst.commit(txn)?;
    Ok(rows.len() as u64)
}

fn write_redb_events(dst: &Store, rows: &[(String, u64)]) -> Result<u64> {
    let txn = dst.begin_write()?;
    {
        let mut seen = txn.open_table(SEEN_EVENTS).map_err(|e| dst.err(e))?;
        let mut expiry = txn.open_table(SEEN_EVENTS_EXPIRY).map_err(|e| dst.err(e))?;
        for (id, at) in rows {
            seen.insert(id.as_str(), *at).map_err(|e| dst.err(e))?;
            expiry
                .insert((*at, id.as_str()), ())
                .map_err(|e| dst.err(e))?;
        }
    }
    dst.commit(txn)?;
    Ok(rows.len() as u64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Every row arrives once, in order, in batches of at most [`BATCH`]; the progress is the
    /// running total after each batch and ends at the total (also for an empty source).
    #[test]
    fn pump_moves_every_row_in_batches_and_reports_running_totals() {
        for n in [0usize, 1, BATCH - 1, BATCH, BATCH + 1, 3 * BATCH + 7] {
            let mut got = Vec::new();
            let mut sizes = Vec::new();
            let mut seen = Vec::new();
            let total = pump(
                "rows",
                (0..n).map(Ok),
                &mut |b: Vec<usize>| {
                    sizes.push(b.len());
                    got.extend(b.iter().copied());
                    Ok(b.len() as u64)
                },
                &mut |what, k| seen.push((what, k)),
            )
            .unwrap();
            assert_eq!(total, n as u64);
            assert_eq!(got, (0..n).collect::<Vec<_>>());
            assert!(sizes.iter().all(|s| (1..=BATCH).contains(s)), "{sizes:?}");
            assert_eq!(sizes.len(), n.div_ceil(BATCH));
            assert_eq!(seen.last(), Some(&("rows", n as u64)));
            assert!(seen
                .windows(2)
                .all(|w| w[0].1 < w[1].1 || w[1].1 == n as u64));
        }
    }

    /// A bad source row stops the copy: nothing after it is written, the error comes back.
    #[test]
    fn pump_stops_at_the_first_bad_row() {
        let mut written = 0usize;
        let rows = (0..BATCH + 10).map(|i| {
            if i == BATCH + 3 {
                Err(Error::Invalid("bad row".to_owned()))
            } else {
                Ok(i)
            }
        });
        let r = pump(
            "rows",
            rows,
            &mut |b: Vec<usize>| {
                written += b.len();
                Ok(b.len() as u64)
            },
            &mut |_, _| {},
        );
        assert!(matches!(r, Err(Error::Invalid(m)) if m == "bad row"));
        assert_eq!(
            written, BATCH,
            "only the batch before the bad row was written"
        );
    }
}
