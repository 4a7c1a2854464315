//! Encrypted backups: a store snapshot inside an age file, written atomically, and restored.
//! Also the scheduled in-process backups with retention.
//!
//! The snapshot itself (consistency, format, checksum, atomic restore) is `storage`'s; this
//! module adds age encryption (to X25519 recipients or a passphrase) and file handling.

use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use age::secrecy::SecretString as AgeSecret;
use secrecy::{ExposeSecret, SecretString};

use crate::storage::{self, Keyring, SnapshotHeader, Store, StoreOptions};

/// How a backup is encrypted, or decrypted.
pub enum Protection {
    /// X25519 recipients (`age1…`) to encrypt to; identities (`AGE-SECRET-KEY-1…`) to decrypt.
    Keys {
        /// Public keys (encrypt).
        recipients: Vec<age::x25519::Recipient>,
        /// Secret identities (decrypt).
        identities: Vec<age::x25519::Identity>,
    },
    /// A passphrase (scrypt).
    Passphrase(SecretString),
}

impl std::fmt::Debug for Protection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Keys {
                recipients,
                identities,
            } => write!(
                f,
                "Keys({} recipients, {} identities)",
                recipients.len(),
                identities.len()
            ),
            Self::Passphrase(_) => f.write_str("Passphrase(<redacted>)"),
        }
    }
}

/// Why a backup could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The snapshot or restore failed in the store.
    #[error(transparent)]
    Store(#[from] storage::Error),
    /// A file could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Bad recipient, identity or passphrase input.
    #[error("{0}")]
    Usage(String),
    /// The file did not decrypt.
    #[error("the backup could not be decrypted: {0}")]
    Decrypt(String),
}

fn ioe(path: &Path) -> impl Fn(std::io::Error) -> BackupError + '_ {
    move |source| BackupError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Protection {
    /// Parses `age1…` recipients.
    pub fn recipients(list: &[String]) -> Result<Self, BackupError> {
        let recipients = list
            .iter()
            .map(|r| {
                age::x25519::Recipient::from_str(r.trim()).map_err(|e| {
                    BackupError::Usage(format!(
                        "recipient {r:?} is not an age X25519 public key (age1…): {e}"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::Keys {
            recipients,
            identities: vec![],
        })
    }

    /// Reads X25519 identities from an age identity file.
    pub fn identity_file(path: &Path) -> Result<Self, BackupError> {
        // Wiped from memory once parsed.
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(ioe(path))?);
        let identities = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                age::x25519::Identity::from_str(l).map_err(|_| {
                    BackupError::Usage(format!(
                        "{} holds a line that is not an age identity (AGE-SECRET-KEY-1…)",
                        path.display()
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::Keys {
            recipients: vec![],
            identities,
        })
    }

    /// Reads a passphrase from a file (first line).
    pub fn passphrase_file(path: &Path) -> Result<Self, BackupError> {
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(ioe(path))?);
        let line = text.lines().next().unwrap_or("").to_owned();
        if line.is_empty() {
            return Err(BackupError::Usage(format!("{} is empty", path.display())));
        }
        Ok(Self::Passphrase(SecretString::from(line)))
    }

    fn encryptor(&self) -> Result<age::Encryptor, BackupError> {
        match self {
            Self::Passphrase(p) => Ok(age::Encryptor::with_user_passphrase(AgeSecret::from(
                p.expose_secret().to_owned(),
            ))),
            Self::Keys { recipients, .. } if recipients.is_empty() => {
                Err(BackupError::Usage("no recipient to encrypt to".to_owned()))
            }
            Self::Keys { recipients, .. } => {
                age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
                    .map_err(|e| BackupError::Usage(e.to_string()))
            }
        }
    }
}

/// Writes an encrypted backup of `store` to `out` atomically (temp file, fsync, rename), mode 0600.
pub fn write_backup(
    store: &Store,
    out: &Path,
    prot: &Protection,
    progress: storage::Progress<'_>,
) -> Result<SnapshotHeader, BackupError> {
    write_encrypted(out, prot, &mut |w| store.write_snapshot(w, progress))
}

/// [`write_backup`] of either backend: the redb file's snapshot, or the PostgreSQL database's
/// in the same format (its scratch copy in a private directory beside `out`).
pub fn write_backup_db(
    store: &storage::Db,
    out: &Path,
    prot: &Protection,
    progress: storage::Progress<'_>,
) -> Result<SnapshotHeader, BackupError> {
    match store {
        storage::Db::Redb(s) => write_backup(s, out, prot, progress),
        storage::Db::Postgres(p) => {
            let dir = out
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            write_encrypted(out, prot, &mut |w| p.write_snapshot_in(dir, w, progress))
        }
    }
}

type Snapshot<'a> = dyn FnMut(&mut dyn Write) -> storage::Result<SnapshotHeader> + 'a;

fn write_encrypted(
    out: &Path,
    prot: &Protection,
    snapshot: &mut Snapshot<'_>,
) -> Result<SnapshotHeader, BackupError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(ioe(&tmp))?;
    let result = (|| {
        let mut w = prot
            .encryptor()?
            .wrap_output(std::io::BufWriter::new(file))
            .map_err(ioe(&tmp))?;
        let header = snapshot(&mut w)?;
        let buf = w.finish().map_err(ioe(&tmp))?;
        let file = buf.into_inner().map_err(|e| ioe(&tmp)(e.into_error()))?;
        file.sync_all().map_err(ioe(&tmp))?;
        Ok(header)
    })();
    match result {
        Ok(h) => {
            std::fs::rename(&tmp, out).map_err(ioe(out))?;
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                let _ = std::fs::File::open(dir).and_then(|f| f.sync_all());
            }
            Ok(h)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Decrypts `from` and restores it over `target` (see [`storage::restore_snapshot`]).
pub fn restore_backup(
    from: &Path,
    prot: &Protection,
    target: &Path,
    ring: Keyring,
    opts: StoreOptions,
    force: bool,
    progress: storage::Progress<'_>,
) -> Result<SnapshotHeader, BackupError> {
    let file = std::fs::File::open(from).map_err(ioe(from))?;
    let dec = age::Decryptor::new(BufReader::new(file)).map_err(|e| {
        BackupError::Decrypt(format!("{} is not an age file ({e})", from.display()))
    })?;
    let mut reader: Box<dyn Read> = match prot {
        Protection::Passphrase(p) => {
            let id = age::scrypt::Identity::new(AgeSecret::from(p.expose_secret().to_owned()));
            Box::new(
                dec.decrypt(std::iter::once(&id as &dyn age::Identity))
                    .map_err(|e| BackupError::Decrypt(e.to_string()))?,
            )
        }
        Protection::Keys { identities, .. } => {
            if identities.is_empty() {
                return Err(BackupError::Usage(
                    "no identity to decrypt with (--identity FILE or --passphrase-file FILE)"
                        .to_owned(),
                ));
            }
            Box::new(
                dec.decrypt(identities.iter().map(|i| i as &dyn age::Identity))
                    .map_err(|e| BackupError::Decrypt(e.to_string()))?,
            )
        }
    };
    Ok(storage::restore_snapshot(
        &mut reader,
        target,
        ring,
        opts,
        force,
        progress,
    )?)
}

/// Names and prunes scheduled backups in a directory.
pub mod rotation {
    use std::path::{Path, PathBuf};

    const PREFIX: &str = "lark-service-";
    const SUFFIX: &str = ".backup.age";

    /// The file name of a backup taken at `ms`.
    #[must_use]
    pub fn file_name(ms: u64) -> String {
        let t = chrono::DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(0))
            .unwrap_or_default();
        format!("{PREFIX}{}{SUFFIX}", t.format("%Y%m%dT%H%M%S%.3fZ"))
    }

    /// A path in `dir` for a backup taken at `ms` that no file has yet: the time, then `-1`,
    /// `-2`… when another backup already took that millisecond.
    #[must_use]
    pub fn unused_name(dir: &Path, ms: u64) -> PathBuf {
        let first = dir.join(file_name(ms));
        if !first.exists() {
            return first;
        }
        let base = file_name(ms);
        let stem = base.strip_suffix(SUFFIX).unwrap_or(&base);
        (1u32..)
            .map(|n| dir.join(format!("{stem}-{n}{SUFFIX}")))
            .find(|p| !p.exists())
            .unwrap_or(first)
    }

    /// Our backups in `dir`, oldest first (names sort by time).
    pub fn list(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(PREFIX) && n.ends_with(SUFFIX))
            })
            .collect();
        v.sort();
        Ok(v)
    }

    /// Deletes all but the newest `keep`; returns what it deleted.
    pub fn prune(dir: &Path, keep: usize) -> std::io::Result<Vec<PathBuf>> {
        let all = list(dir)?;
        let n = all.len().saturating_sub(keep);
        let gone: Vec<PathBuf> = all.into_iter().take(n).collect();
        for p in &gone {
            std::fs::remove_file(p)?;
        }
        Ok(gone)
    }
}

/// Writes a line like `backup: 65536/1000000 records` to stderr at most twice a second.
pub fn progress_line(label: &'static str) -> impl FnMut(u64, u64) {
    let mut last = std::time::Instant::now();
    move |done, total| {
        if last.elapsed().as_millis() >= 500 || done == total {
            eprintln!("{label}: {done}/{total} records");
            let _ = std::io::stderr().flush();
            last = std::time::Instant::now();
        }
    }
}
