//! Backups of the PostgreSQL store in the redb store's snapshot format (`storage::backup`), so
//! `lark-service restore` gives a redb store, which `migrate --to postgres` can load back.
//!
//! The database is read as one `REPEATABLE READ, READ ONLY` transaction (the serving fleet is
//! not blocked; the backup is the state at its start) and copied, sealed values as they are,
//! never opened, into a scratch redb store in a private directory (mode 0700) beside the
//! backup, through the same loop as `migrate --to redb` (`copy::copy_snapshot`). The scratch
//! store takes the database's key check, the counts of the snapshot and the copy are compared,
//! and its snapshot is written with the MAC sealed under the database's active token key (the
//! scratch store's own key is a throw-away one, which never seals a secret). The scratch
//! directory is removed at the end, whatever happens.
//!
//! What the copy leaves out (leases, cursors, the change feed, the rate-limit counters and the
//! heartbeats) belongs to the running fleet, not to the data a restore brings back.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::copy::{check_counts, copy_snapshot};
use super::{block_on, pg_err, row_counts, rows, PgStore};
use crate::storage::{Error, Key, Keyring, Progress, Result, SnapshotHeader, Store, StoreOptions};

/// A private scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(parent: &Path) -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let path = parent.join(format!(
            ".lark-service-pg-backup-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
        Ok(Self(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl PgStore {
    /// Writes a snapshot of the database to `out` in the redb backup format, using a scratch
    /// directory under the system's temporary directory. See the module notes.
    pub fn write_snapshot(
        &self,
        out: &mut dyn Write,
        progress: Progress<'_>,
    ) -> Result<SnapshotHeader> {
        self.write_snapshot_in(&std::env::temp_dir(), out, progress)
    }

    /// [`PgStore::write_snapshot`] with its scratch copy (as large as the store) under
    /// `scratch_dir`.
    pub fn write_snapshot_in(
        &self,
        scratch_dir: &Path,
        out: &mut dyn Write,
        progress: Progress<'_>,
    ) -> Result<SnapshotHeader> {
        let scratch = Scratch::new(scratch_dir)?;
        let (throwaway, _) = Key::generate();
        let copy = Store::open(
            &scratch.0.join("snapshot.redb"),
            Keyring::new(throwaway, vec![]),
            StoreOptions {
                change_feed: false,
                ..StoreOptions::default()
            },
        )?;
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
        let source = block_on(row_counts(&tx))?;
        let check =
            block_on(tx.query_one("SELECT key_id, sealed FROM ls_key_check WHERE id = 1", &[]))
                .map_err(|e| pg_err(&e))?;
        let check = rows::sealed_from(
            "meta",
            check.try_get(1).map_err(|e| pg_err(&e))?,
            check.try_get(0).map_err(|e| pg_err(&e))?,
        )?
        .ok_or_else(|| Error::Engine("the key check row is empty".to_owned()))?;
        let total = source.sessions
            + source.tokens
            + source.users
            + source.seen_events
            + block_on(other_rows(&tx))?;
        let (mut base, mut table, mut in_table) = (0u64, "", 0u64);
        copy_snapshot(&tx, &copy, &mut |what, n| {
            if what != table {
                base += in_table;
                table = what;
            }
            in_table = n;
            progress(base + n, total);
        })?;
        block_on(tx.commit()).map_err(|e| pg_err(&e))?;
        drop(conn);
        copy.put_key_check(&check)?;
        check_counts(&source, &copy.counts()?, "PostgreSQL", "the backup's copy")?;
        let header = copy.write_snapshot_sealed_by(out, progress, self.ring())?;
        drop(copy);
        drop(scratch);
        Ok(header)
    }
}

/// The rows the copy takes beside those [`row_counts`] counts (grants, live and dead outbox
/// entries, apps), for the progress total.
async fn other_rows(c: &impl tokio_postgres::GenericClient) -> Result<u64> {
    let row = c
        .query_one(
            "SELECT (SELECT count(*) FROM ls_grants) + (SELECT count(*) FROM ls_outbox)
                    + (SELECT count(*) FROM ls_outbox_dead) + (SELECT count(*) FROM ls_apps)",
            &[],
        )
        .await
        .map_err(|e| pg_err(&e))?;
    let n: i64 = row.try_get(0).map_err(|e| pg_err(&e))?;
    Ok(u64::try_from(n).unwrap_or(0))
}
