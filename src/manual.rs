//! The man pages and shell completions, generated from the command line's own definition.
//!
//! `lark-service manual --out DIR` writes `lark-service.1` and one page per subcommand
//! (`lark-service-serve.1`, `lark-service-keys-rotate.1`, …), plus completions for bash, zsh
//! and fish. The package build runs it on the release binary, so what `man lark-service` says
//! is what that binary parses.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use clap_complete::Shell;

/// The files [`write`] produced, by kind.
#[derive(Debug, Default)]
pub struct Written {
    /// Man pages (section 1), top command first.
    pub pages: Vec<PathBuf>,
    /// Completion scripts: bash, zsh, fish.
    pub completions: Vec<PathBuf>,
}

/// Writes every page and completion for `cmd` into `dir` (created if missing).
///
/// # Errors
/// Any I/O error, naming the file.
pub fn write(cmd: clap::Command, dir: &Path) -> io::Result<Written> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd;
    cmd.build();
    let mut out = Written::default();
    pages(&cmd, &mut Vec::new(), dir, &mut out.pages)?;
    let name = cmd.get_name().to_owned();
    for (shell, file) in [
        (Shell::Bash, format!("{name}.bash")),
        (Shell::Zsh, format!("_{name}")),
        (Shell::Fish, format!("{name}.fish")),
    ] {
        let path = dir.join(file);
        let mut f = create(&path)?;
        clap_complete::generate(shell, &mut cmd.clone(), name.clone(), &mut f);
        out.completions.push(path);
    }
    Ok(out)
}

/// One page for `cmd` (its name joined to its parents' with `-`), then its subcommands'.
fn pages(
    cmd: &clap::Command,
    parents: &mut Vec<String>,
    dir: &Path,
    out: &mut Vec<PathBuf>,
) -> io::Result<()> {
    if cmd.is_hide_set() {
        return Ok(());
    }
    parents.push(cmd.get_name().to_owned());
    let full = parents.join("-");
    // A subcommand's page is titled with its full name (`lark-service-keys-rotate`), so that
    // `man lark-service-keys-rotate` finds it and the page says what to type.
    let page_cmd = cmd.clone().name(full.clone()).bin_name(parents.join(" "));
    let path = dir.join(format!("{full}.1"));
    let mut f = create(&path)?;
    clap_mangen::Man::new(page_cmd)
        .section("1")
        .manual("lark-service manual")
        .source(format!("lark-service {}", env!("CARGO_PKG_VERSION")))
        .render(&mut f)?;
    if parents.len() == 1 {
        f.write_all(TOP_PAGE_SECTIONS.as_bytes())?;
    }
    f.flush()?;
    out.push(path);
    for sub in cmd.get_subcommands() {
        if sub.get_name() != "help" {
            pages(sub, parents, dir, out)?;
        }
    }
    parents.pop();
    Ok(())
}

/// Sections clap does not know of, for the top page.
const TOP_PAGE_SECTIONS: &str = r#".SH FILES
.TP
\fI/etc/lark-service/config.toml\fR
The configuration. Every setting also has an environment variable; \fBlark\-service config check \-\-list\fR prints them all, \fBlark\-service config example\fR a commented file.
.TP
\fI/etc/lark-service/credentials/\fR
Secret files (app secret, token encryption key, bearer tokens), read through the \fI*_FILE\fR settings or systemd credentials.
.TP
\fI/var/lib/lark-service/\fR
The encrypted store (\fIlark-service.redb\fR) and its backups.
.TP
\fI/usr/share/lark-service/monitoring/\fR
Prometheus alert rules (with their promtool unit tests) and the Grafana dashboard.
.SH SEE ALSO
\fBsystemctl\fR(1), \fBjournalctl\fR(1), and /usr/share/doc/lark-service/README.md.
"#;

fn create(path: &Path) -> io::Result<io::BufWriter<std::fs::File>> {
    std::fs::File::create(path)
        .map(io::BufWriter::new)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn writes_a_page_per_command_and_three_completions() {
        let dir = tempfile::tempdir().unwrap();
        let w = write(crate::cli::Cli::command(), dir.path()).unwrap();
        let names: Vec<String> = w
            .pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names[0], "lark-service.1");
        for page in [
            "lark-service-serve.1",
            "lark-service-keys.1",
            "lark-service-backup.1",
        ] {
            assert!(
                names.iter().any(|n| n == page),
                "{page} missing from {names:?}"
            );
        }
        let top = std::fs::read_to_string(&w.pages[0]).unwrap();
        assert!(
            top.starts_with(".ie"),
            "not roff: {}",
            &top[..40.min(top.len())]
        );
        assert!(top.contains(".TH lark-service 1"), "{top}");
        assert!(top.contains("serve"), "the top page lists the subcommands");
        assert!(top.contains(".SH FILES") && top.contains("/etc/lark-service/config.toml"));
        let serve = std::fs::read_to_string(dir.path().join("lark-service-serve.1")).unwrap();
        assert!(
            serve.contains("\\-\\-sandbox"),
            "serve's page documents --sandbox"
        );
        assert_eq!(w.completions.len(), 3);
        let bash = std::fs::read_to_string(dir.path().join("lark-service.bash")).unwrap();
        assert!(bash.contains("complete -F") && bash.contains("serve"));
        let zsh = std::fs::read_to_string(dir.path().join("_lark-service")).unwrap();
        assert!(zsh.starts_with("#compdef lark-service"));
        let fish = std::fs::read_to_string(dir.path().join("lark-service.fish")).unwrap();
        assert!(fish.contains("complete -c lark-service"));
    }
}
