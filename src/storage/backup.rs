//! Consistent snapshots of the whole store into a byte stream, and restoring one.
//!
//! A snapshot is taken inside one read transaction, so writers keep committing while it runs
//! and the snapshot is exactly the state at its start. Secrets stay sealed: the stream carries
//! the stored bytes. Encryption of the stream (age) is the caller's business (`crate::backup`).
//!
//! Format: `LSBK2\n`, a JSON header line, then per table `T`, name, record count and
//! length-prefixed key/value pairs in redb's own encoding, then `E`, the SHA-256 of every byte
//! before it, and that digest sealed (XChaCha20-Poly1305, the store's own envelope) under the
//! store's active token key: a MAC only a holder of the token key can make. Restore verifies
//! the digest and opens the seal with the configured keys before anything replaces the store,
//! so a file made by someone who has only the backup recipients' public keys is refused.
//! Format 1 (`LSBK1`, checksum only) is refused.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use redb::{
    Database, Key, ReadTransaction, ReadableTable, ReadableTableMetadata, TableDefinition,
    TableHandle, Value, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::tables::{
    CHANGES, CURSORS, LEASES, META, OAUTH_STATES, SCHEMA_VERSION, SEEN_EVENTS, SEEN_EVENTS_EXPIRY,
    SESSIONS, SESSIONS_BY_USER, SESSION_COUNTS, SESSION_DEADLINES, TOKENS, TOKEN_REFRESH_DUE,
    USERS,
};
use super::{now_ms, Error, Keyring, Result, Store, StoreOptions};

const MAGIC: &[u8] = b"LSBK2\n";
/// The unauthenticated format of earlier versions.
const MAGIC_V1: &[u8] = b"LSBK1\n";
/// Where the backup MAC is sealed (its associated data).
const MAC_PLACE: super::envelope::Place<'static> = super::envelope::Place {
    table: "backup",
    row: b"snapshot",
    field: "mac",
};
/// Most bytes one key or value may have in a snapshot (guards restore against garbage).
const MAX_ITEM: u32 = 64 * 1024 * 1024;

/// What a snapshot says about itself.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// Always `lark-service-backup`.
    pub format: String,
    /// Store schema version of the records.
    pub schema_version: u32,
    /// When it was taken (unix ms).
    pub created_at: u64,
    /// Key id of the store's key check: the token key needed to use it.
    pub store_key_id: String,
    /// Records per table.
    pub counts: BTreeMap<String, u64>,
    /// The lark-service version that wrote it.
    pub writer_version: String,
}

impl SnapshotHeader {
    /// Total records.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }
}

struct HashWriter<'a> {
    inner: &'a mut dyn Write,
    hash: Sha256,
}

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

struct HashReader<'a> {
    inner: &'a mut dyn Read,
    hash: Sha256,
}

impl HashReader<'_> {
    fn exact(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0; n];
        self.inner.read_exact(&mut buf).map_err(truncated)?;
        self.hash.update(&buf);
        Ok(buf)
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.exact(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let b = self.exact(8)?;
        let mut a = [0; 8];
        a.copy_from_slice(&b);
        Ok(u64::from_be_bytes(a))
    }
    fn item(&mut self) -> Result<Vec<u8>> {
        let n = self.u32()?;
        if n > MAX_ITEM {
            return Err(bad(format!("an item of {n} bytes")));
        }
        self.exact(n as usize)
    }
}

/// A length as the 4-byte big-endian prefix the format uses; a part of 4 GiB or more (which no
/// table holds) is refused rather than written with a wrapped length.
fn len_prefix(len: usize) -> std::io::Result<[u8; 4]> {
    u32::try_from(len)
        .map(u32::to_be_bytes)
        .map_err(|_| std::io::Error::other(format!("a record part of {len} bytes is too long")))
}

fn truncated(e: std::io::Error) -> Error {
    bad(format!("it ends early or could not be read ({e})"))
}

fn bad(detail: String) -> Error {
    Error::Corrupt {
        path: PathBuf::from("<backup>"),
        detail: format!("the backup is damaged or was tampered with: {detail}"),
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// Progress callback: (records done, records total).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

struct Dumper<'a, 'w> {
    txn: &'a ReadTransaction,
    w: HashWriter<'w>,
    done: u64,
    total: u64,
    progress: Progress<'a>,
}

impl Dumper<'_, '_> {
    fn table<K: Key + 'static, V: Value + 'static>(
        &mut self,
        store: &Store,
        def: TableDefinition<'_, K, V>,
    ) -> Result<()> {
        let t = self.txn.open_table(def).map_err(|e| store.err(e))?;
        let name = def.name().to_owned();
        let count = t.len().map_err(|e| store.err(e))?;
        let w = &mut self.w;
        let wio = |e| Error::Io {
            path: PathBuf::from("<backup output>"),
            source: e,
        };
        w.write_all(b"T").map_err(wio)?;
        w.write_all(&len_prefix(name.len()).map_err(wio)?)
            .map_err(wio)?;
        w.write_all(name.as_bytes()).map_err(wio)?;
        w.write_all(&count.to_be_bytes()).map_err(wio)?;
        for row in t.iter().map_err(|e| store.err(e))? {
            let (k, v) = row.map_err(|e| store.err(e))?;
            let kv = k.value();
            let vv = v.value();
            let kb = K::as_bytes(&kv);
            let vb = V::as_bytes(&vv);
            for part in [kb.as_ref(), vb.as_ref()] {
                let w = &mut self.w;
                w.write_all(&len_prefix(part.len()).map_err(wio)?)
                    .map_err(wio)?;
                w.write_all(part).map_err(wio)?;
            }
            self.done += 1;
            if self.done.is_multiple_of(65_536) {
                (self.progress)(self.done, self.total);
            }
        }
        Ok(())
    }
}

macro_rules! for_each_table {
    ($f:ident, $($arg:expr),*) => {{
        $f($($arg,)* META)?;
        $f($($arg,)* SESSIONS)?;
        $f($($arg,)* SESSIONS_BY_USER)?;
        $f($($arg,)* SESSION_DEADLINES)?;
        $f($($arg,)* TOKENS)?;
        $f($($arg,)* TOKEN_REFRESH_DUE)?;
        $f($($arg,)* USERS)?;
        $f($($arg,)* SEEN_EVENTS)?;
        $f($($arg,)* SEEN_EVENTS_EXPIRY)?;
        $f($($arg,)* CURSORS)?;
        $f($($arg,)* OAUTH_STATES)?;
        $f($($arg,)* CHANGES)?;
        $f($($arg,)* LEASES)?;
        $f($($arg,)* SESSION_COUNTS)?;
        $f($($arg,)* super::tables::APPS)?;
        $f($($arg,)* super::tables::SESSIONS_EXPIRED)?;
        $f($($arg,)* super::tables::OUTBOX)?;
        $f($($arg,)* super::tables::OUTBOX_DEAD)?;
        $f($($arg,)* super::tables::GRANTS)?;
        $f($($arg,)* super::tables::DEVICE_POLLS)?;
        $f($($arg,)* super::tables::SEEN_LOG)?;
    }};
}

fn count_table<K: Key + 'static, V: Value + 'static>(
    store: &Store,
    txn: &ReadTransaction,
    counts: &mut BTreeMap<String, u64>,
    def: TableDefinition<'_, K, V>,
) -> Result<()> {
    let n = txn
        .open_table(def)
        .map_err(|e| store.err(e))?
        .len()
        .map_err(|e| store.err(e))?;
    counts.insert(def.name().to_owned(), n);
    Ok(())
}

impl Store {
    /// Writes a consistent snapshot of every table to `out`. Writers are not blocked.
    pub fn write_snapshot(
        &self,
        out: &mut dyn Write,
        progress: Progress<'_>,
    ) -> Result<SnapshotHeader> {
        self.write_snapshot_sealed_by(out, progress, &self.inner.ring)
    }

    /// [`Store::write_snapshot`] with the MAC sealed under `mac`'s active key: the PostgreSQL
    /// backup writes its scratch copy this way, with the database's keys.
    pub(crate) fn write_snapshot_sealed_by(
        &self,
        out: &mut dyn Write,
        progress: Progress<'_>,
        mac: &Keyring,
    ) -> Result<SnapshotHeader> {
        let txn = self.begin_read()?;
        let mut counts = BTreeMap::new();
        for_each_table!(count_table, self, &txn, &mut counts);
        let header = SnapshotHeader {
            format: "lark-service-backup".to_owned(),
            schema_version: SCHEMA_VERSION,
            created_at: now_ms(),
            store_key_id: self.store_key_id()?.to_string(),
            counts,
            writer_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let total = header.total();
        let mut d = Dumper {
            txn: &txn,
            w: HashWriter {
                inner: out,
                hash: Sha256::new(),
            },
            done: 0,
            total,
            progress,
        };
        let wio = |e| Error::Io {
            path: PathBuf::from("<backup output>"),
            source: e,
        };
        d.w.write_all(MAGIC).map_err(wio)?;
        let line = serde_json::to_vec(&header).map_err(|e| Error::Invalid(e.to_string()))?;
        d.w.write_all(&line).map_err(wio)?;
        d.w.write_all(b"\n").map_err(wio)?;
        for_each_table!(dump_table, &mut d, self);
        d.w.write_all(b"E").map_err(wio)?;
        let digest = d.w.hash.clone().finalize();
        d.w.inner.write_all(&digest).map_err(wio)?;
        let mac = bincode::serde::encode_to_vec(
            mac.seal(&digest, &MAC_PLACE),
            bincode::config::standard(),
        )
        .map_err(|e| Error::Invalid(format!("encoding the backup MAC: {e}")))?;
        let len = u32::try_from(mac.len()).map_err(|_| Error::Invalid("MAC too long".into()))?;
        d.w.inner.write_all(&len.to_be_bytes()).map_err(wio)?;
        d.w.inner.write_all(&mac).map_err(wio)?;
        d.w.flush().map_err(wio)?;
        (d.progress)(total, total);
        Ok(header)
    }
}

fn dump_table<K: Key + 'static, V: Value + 'static>(
    d: &mut Dumper<'_, '_>,
    store: &Store,
    def: TableDefinition<'_, K, V>,
) -> Result<()> {
    d.table(store, def)
}

struct Loader<'a, 'r> {
    txn: &'a WriteTransaction,
    r: HashReader<'r>,
    done: u64,
    total: u64,
    progress: Progress<'a>,
    path: &'a Path,
}

impl Loader<'_, '_> {
    fn rows<K: Key + 'static, V: Value + 'static>(
        &mut self,
        def: TableDefinition<'_, K, V>,
        count: u64,
    ) -> Result<()> {
        load_rows(self, def, count)
    }
}

fn load_rows<K: Key + 'static, V: Value + 'static>(
    l: &mut Loader<'_, '_>,
    def: TableDefinition<'_, K, V>,
    count: u64,
) -> Result<()> {
    let path = l.path;
    let mut t = l.txn.open_table(def).map_err(|e| Error::engine(path, e))?;
    let r = &mut l.r;
    for _ in 0..count {
        let k = r.item()?;
        let v = r.item()?;
        if K::fixed_width().is_some_and(|w| w != k.len())
            || V::fixed_width().is_some_and(|w| w != v.len())
        {
            return Err(bad(format!(
                "a record of table {} has the wrong size",
                def.name()
            )));
        }
        t.insert(K::from_bytes(&k), V::from_bytes(&v))
            .map_err(|e| Error::engine(path, e))?;
        l.done += 1;
        if l.done.is_multiple_of(65_536) {
            (l.progress)(l.done, l.total);
        }
    }
    Ok(())
}

/// Restores a snapshot read from `input` into a new store file at `target`.
///
/// The data is written beside the target, its checksum verified, the result opened with
/// `ring` (so a wrong token key is caught before anything is replaced), fsynced and renamed
/// over the target. An existing target is refused unless `force`; a target held by a running
/// process is always refused. With `force`, the old file is kept as `<target>.before-restore-<ms>`.
pub fn restore_snapshot(
    input: &mut dyn Read,
    target: &Path,
    ring: Keyring,
    opts: StoreOptions,
    force: bool,
    progress: Progress<'_>,
) -> Result<SnapshotHeader> {
    // Refuse a live store (redb's lock tells us if someone holds it), and keep holding the old
    // file's lock until the new one is in place, so no service opens it in between.
    let mut _held = None;
    if target.exists() {
        match Database::open(target) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(Error::Locked {
                    path: target.to_owned(),
                    pid: super::read_pid_file(target),
                });
            }
            _ if !force => {
                return Err(Error::Invalid(format!(
                    "{} exists; pass --force to replace it (the old file is kept beside it)",
                    target.display()
                )));
            }
            Ok(db) => _held = Some(db),
            Err(_) => {}
        }
    }
    // The restored file takes the old one's owner and mode (a restore run as root must not
    // leave the service a file it cannot open).
    let previous = std::fs::metadata(target).ok();
    let mut tmp = target.as_os_str().to_owned();
    tmp.push(".restore-tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let result = restore_into(input, &tmp, &ring, progress);
    let header = match result {
        Ok(h) => h,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    // Open it as the service would: checks schema and key, migrates an older schema.
    if let Err(e) = Store::open(&tmp, ring, opts).map(drop) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Some(m) = &previous {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        std::os::unix::fs::chown(&tmp, Some(m.uid()), Some(m.gid())).map_err(io(&tmp))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(m.mode() & 0o7777))
            .map_err(io(&tmp))?;
    }
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io(&tmp))?;
    if target.exists() {
        let mut old = target.as_os_str().to_owned();
        old.push(format!(".before-restore-{}", now_ms()));
        std::fs::rename(target, PathBuf::from(old)).map_err(io(target))?;
    }
    std::fs::rename(&tmp, target).map_err(io(target))?;
    if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(io(dir))?;
    }
    Ok(header)
}

fn restore_into(
    input: &mut dyn Read,
    tmp: &Path,
    ring: &Keyring,
    progress: Progress<'_>,
) -> Result<SnapshotHeader> {
    let mut r = HashReader {
        inner: input,
        hash: Sha256::new(),
    };
    let magic = r.exact(MAGIC.len())?;
    if magic == MAGIC_V1 {
        return Err(bad("it is a format-1 backup, which is checksummed but not authenticated; restore it with the lark-service version that wrote it, or take a new backup".to_owned()));
    }
    if magic != MAGIC {
        return Err(bad("it is not a lark-service backup (bad magic)".to_owned()));
    }
    let mut line = Vec::new();
    loop {
        let b = r.exact(1)?;
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > 1 << 20 {
            return Err(bad("the header line is too long".to_owned()));
        }
    }
    let header: SnapshotHeader =
        serde_json::from_slice(&line).map_err(|e| bad(format!("bad header ({e})")))?;
    if header.format != "lark-service-backup" {
        return Err(bad(format!("unknown format {:?}", header.format)));
    }
    if header.schema_version > SCHEMA_VERSION {
        return Err(Error::NewerSchema {
            path: PathBuf::from("<backup>"),
            found: header.schema_version,
            supported: SCHEMA_VERSION,
        });
    }
    if let Some(dir) = tmp.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    // Create the file ourselves, exclusively and without following a symlink planted at its
    // path; redb then initializes the empty file.
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(tmp)
            .map_err(io(tmp))?;
    }
    let db = Database::create(tmp).map_err(|e| Error::engine(tmp, e))?;
    let txn = db.begin_write().map_err(|e| Error::engine(tmp, e))?;
    let total = header.total();
    let mut l = Loader {
        txn: &txn,
        r,
        done: 0,
        total,
        progress,
        path: tmp,
    };
    for _ in 0..header.counts.len() {
        if l.r.exact(1)? != b"T" {
            return Err(bad("a table section is missing".to_owned()));
        }
        let n = l.r.u32()?;
        if n > 256 {
            return Err(bad("a table name is too long".to_owned()));
        }
        let name = String::from_utf8(l.r.exact(n as usize)?)
            .map_err(|_| bad("a table name is not UTF-8".to_owned()))?;
        let count = l.r.u64()?;
        if header.counts.get(&name) != Some(&count) {
            return Err(bad(format!("table {name} count does not match the header")));
        }
        match name.as_str() {
            "meta" => l.rows(META, count)?,
            "sessions" => l.rows(SESSIONS, count)?,
            "sessions_by_user" => l.rows(SESSIONS_BY_USER, count)?,
            "session_deadlines" => l.rows(SESSION_DEADLINES, count)?,
            "tokens" => l.rows(TOKENS, count)?,
            "token_refresh_due" => l.rows(TOKEN_REFRESH_DUE, count)?,
            "users" => l.rows(USERS, count)?,
            "seen_events" => l.rows(SEEN_EVENTS, count)?,
            "seen_events_expiry" => l.rows(SEEN_EVENTS_EXPIRY, count)?,
            "cursors" => l.rows(CURSORS, count)?,
            "oauth_states" => l.rows(OAUTH_STATES, count)?,
            "changes" => l.rows(CHANGES, count)?,
            "leases" => l.rows(LEASES, count)?,
            "session_counts" => l.rows(SESSION_COUNTS, count)?,
            "apps" => l.rows(super::tables::APPS, count)?,
            "sessions_expired" => l.rows(super::tables::SESSIONS_EXPIRED, count)?,
            "outbox" => l.rows(super::tables::OUTBOX, count)?,
            "outbox_dead" => l.rows(super::tables::OUTBOX_DEAD, count)?,
            "grants" => l.rows(super::tables::GRANTS, count)?,
            "device_polls" => l.rows(super::tables::DEVICE_POLLS, count)?,
            "seen_log" => l.rows(super::tables::SEEN_LOG, count)?,
            other => return Err(bad(format!("unknown table {other}"))),
        }
    }
    if l.r.exact(1)? != b"E" {
        return Err(bad("the end marker is missing".to_owned()));
    }
    let want = l.r.hash.clone().finalize();
    let mut got = [0u8; 32];
    l.r.inner.read_exact(&mut got).map_err(truncated)?;
    if got[..] != want[..] {
        return Err(bad("checksum mismatch".to_owned()));
    }
    let mut len = [0u8; 4];
    l.r.inner.read_exact(&mut len).map_err(truncated)?;
    let len = u32::from_be_bytes(len);
    if len > 1024 {
        return Err(bad("the MAC is too long".to_owned()));
    }
    let mut mac = vec![0u8; len as usize];
    l.r.inner.read_exact(&mut mac).map_err(truncated)?;
    let (sealed, _): (super::envelope::Sealed, usize) =
        bincode::serde::decode_from_slice(&mac, bincode::config::standard())
            .map_err(|_| bad("the MAC is malformed".to_owned()))?;
    let key_id = sealed.key_id;
    match ring.open(&sealed, &MAC_PLACE) {
        Ok(d) if d[..] == want[..] => {}
        Err(super::envelope::OpenError::UnknownKey(_)) => {
            // The backup was made under a token key that is not configured.
            return Err(Error::WrongKey {
                store_key: key_id,
                configured: ring
                    .ids()
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            });
        }
        _ => {
            return Err(bad(
                "its MAC does not verify: it was not made with this store's token key, or it was altered".to_owned(),
            ));
        }
    }
    let mut extra = [0u8; 1];
    if l.r.inner.read(&mut extra).map_err(truncated)? != 0 {
        return Err(bad("bytes after the end".to_owned()));
    }

    txn.commit().map_err(|e| Error::engine(tmp, e))?;
    drop(db);
    progress(total, total);
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{AuthSession, Key};
    use redb::ReadableDatabase;

    fn store(key: u8) -> Store {
        let s = Store::open_in_memory(
            Keyring::new(Key::from_bytes(&[key; 32]), vec![]),
            StoreOptions::default(),
        )
        .unwrap();
        let sessions: Vec<AuthSession> = (0..5)
            .map(|i| AuthSession::new_pending("cli_app", &format!("u{i}"), vec![], 1_000, 600_000))
            .collect();
        s.put_sessions(&sessions).unwrap();
        s
    }

    fn snapshot(s: &Store) -> Vec<u8> {
        let mut out = Vec::new();
        s.write_snapshot(&mut out, &mut |_, _| {}).unwrap();
        out
    }

    fn restore(bytes: &[u8], key: u8) -> Result<SnapshotHeader> {
        let dir = tempfile::tempdir().unwrap();
        restore_snapshot(
            &mut &bytes[..],
            &dir.path().join("r.redb"),
            Keyring::new(Key::from_bytes(&[key; 32]), vec![]),
            StoreOptions::default(),
            false,
            &mut |_, _| {},
        )
    }

    /// Where the body ends: `E`, the 32-byte digest, a 4-byte length and the sealed MAC follow.
    fn body_len(bytes: &[u8]) -> usize {
        // The MAC's length is the 4 bytes before it: find the one that matches.
        (1..=1024usize)
            .find(|&n| {
                bytes.len() > n + 4 + 32
                    && u32::from_be_bytes(
                        bytes[bytes.len() - n - 4..bytes.len() - n]
                            .try_into()
                            .unwrap(),
                    ) as usize
                        == n
            })
            .map(|n| bytes.len() - n - 4 - 32)
            .unwrap()
    }

    /// Every table the store has is in a backup and comes back from it: a table added to the
    /// store but not to the backup's list would be lost silently by a restore (the webhook
    /// outbox and the grants once were).
    #[test]
    fn a_backup_holds_every_table_of_the_store() {
        let s = store(3);
        let names: std::collections::BTreeSet<String> = s
            .db()
            .begin_read()
            .unwrap()
            .list_tables()
            .unwrap()
            .map(|t| t.name().to_owned())
            .collect();
        assert!(
            names.contains("outbox") && names.contains("grants"),
            "{names:?}"
        );
        let header = restore(&snapshot(&s), 3).unwrap();
        let backed: std::collections::BTreeSet<String> = header.counts.keys().cloned().collect();
        assert_eq!(backed, names, "tables of the store vs tables of its backup");
    }

    #[test]
    fn a_backup_is_authenticated_not_only_checksummed() {
        let s = store(7);
        let good = snapshot(&s);
        assert!(restore(&good, 7).unwrap().total() >= 5);

        // Someone without the token key edits the body and fixes up the SHA-256: refused.
        let body = body_len(&good);
        let mut forged = good[..body].to_vec();
        let marker = b"\"writer_version\":\"";
        let at = forged
            .windows(marker.len())
            .position(|w| w == marker)
            .unwrap()
            + marker.len();
        forged[at] = if forged[at] == b'9' { b'8' } else { b'9' };
        let digest = Sha256::digest(&forged);
        forged.extend_from_slice(&digest);
        forged.extend_from_slice(&good[body + 32..]);
        let err = restore(&forged, 7).unwrap_err().to_string();
        assert!(err.contains("MAC does not verify"), "{err}");

        // Restored with a ring that lacks the key that made it: refused as a wrong key.
        let err = restore(&good, 8).unwrap_err();
        assert!(matches!(err, Error::WrongKey { .. }), "{err}");

        // Format 1 (checksum only) is refused.
        let mut v1 = good.clone();
        v1[..MAGIC_V1.len()].copy_from_slice(MAGIC_V1);
        let err = restore(&v1, 7).unwrap_err().to_string();
        assert!(err.contains("not authenticated"), "{err}");
    }
}
