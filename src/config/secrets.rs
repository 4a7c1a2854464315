//! Reading secrets from files: `*_file` keys, `*_FILE` variables and systemd credentials.
//! A file readable by group or others is refused (except systemd's own credentials).

use std::path::{Path, PathBuf};

use secrecy::SecretString;

use super::ConfigError;

/// Reads a secret file (trailing newline trimmed) after checking its mode.
pub(crate) fn read_secret_file(
    key: &str,
    path: &Path,
) -> Result<(SecretString, PathBuf), ConfigError> {
    read_secret(key, path, true)
}

/// Reads a systemd credential. systemd itself protects `$CREDENTIALS_DIRECTORY` (a private
/// directory only the service can read); on file systems with ACLs it grants the service user
/// read access by an ACL entry, which shows as group bits in the mode, so the mode check does
/// not apply here.
pub(crate) fn read_credential(
    key: &str,
    path: &Path,
) -> Result<(SecretString, PathBuf), ConfigError> {
    read_secret(key, path, false)
}

fn read_secret(
    key: &str,
    path: &Path,
    check_mode: bool,
) -> Result<(SecretString, PathBuf), ConfigError> {
    let meta = std::fs::metadata(path).map_err(|e| ConfigError::File {
        path: path.to_owned(),
        detail: format!("secret file for {key}: {e}"),
    })?;
    #[cfg(unix)]
    if check_mode {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(ConfigError::SecretFileMode {
                key: key.to_owned(),
                path: path.to_owned(),
                mode,
            });
        }
    }
    // The file's bytes are wiped from memory once the secret has its own copy.
    let text =
        zeroize::Zeroizing::new(
            std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                path: path.to_owned(),
                detail: format!("secret file for {key}: {e}"),
            })?,
        );
    let secret = text.trim_end_matches(['\n', '\r']).to_owned();
    Ok((SecretString::from(secret), path.to_owned()))
}
