//! Small file-system helpers shared by the command line and the service.

use std::io::Write;
use std::path::Path;

/// Writes `text` (and a newline) to a new file readable by its owner only (mode 0600),
/// creating its directory first. An existing file is an error, never overwritten.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let with_path = |what: &str, p: &Path, e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| with_path("creating", dir, e))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| with_path("creating", path, e))?;
    writeln!(f, "{text}").map_err(|e| with_path("writing", path, e))?;
    f.sync_all().map_err(|e| with_path("writing", path, e))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_a_new_owner_only_file_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/secret");
        super::write_private(&path, "s3cret").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "s3cret\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = super::write_private(&path, "other").unwrap_err();
        assert_eq!(again.kind(), std::io::ErrorKind::AlreadyExists);
        assert!(again.to_string().contains("secret"), "{again}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "s3cret\n");
    }
}
