//! The command line: `serve`, `config check`, `keys`, `sessions`, `mcp --stdio`.
//!
//! Commands that read the store open it directly; redb allows one process at a time, so while
//! the service runs they fail with "store … is locked by pid N".

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use secrecy::ExposeSecret;

use crate::config::{Config, ConfigError, LoadOptions, EX_USAGE};
use crate::daemon::store_options;
use crate::storage::{self, now_ms, Key, SessionId, SessionState, Store};

/// lark-service: holds a Feishu/Lark app's long connection and its users' authorization.
#[derive(Debug, Parser)]
#[command(name = "lark-service", version, about, propagate_version = true)]
pub struct Cli {
    /// Config file (default: /etc/lark-service/config.toml when it exists; `serve --sandbox`
    /// reads no default file, only one named here).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Override a setting by its TOML key, e.g. `--set auth.request_rate_limit=10`.
    /// Secrets only as `--set app_secret_file=PATH`.
    #[arg(long = "set", global = true, value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub set: Vec<(String, String)>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service.
    Serve(ServeArgs),
    /// The apps this service serves (secrets are sealed in the store and never printed).
    /// While the service runs, the command goes through its admin API (admin_token).
    #[command(subcommand)]
    App(AppCmd),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Token encryption keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Authorization sessions in the store (no secrets are printed).
    #[command(subcommand)]
    Sessions(SessionsCmd),
    /// Write a consistent, age-encrypted backup of the store. While the service runs, the
    /// service itself takes it (through the admin API) and keeps serving.
    Backup(BackupArgs),
    /// Restore a backup into the store file (the service must be stopped).
    Restore(RestoreArgs),
    /// Export sessions to an external database (tokens stay sealed).
    #[command(subcommand)]
    Export(ExportCmd),
    /// Import sessions from an external database into the store (the service must be stopped).
    #[command(subcommand)]
    Import(ImportCmd),
    /// Copy the store into another backend: `--from redb --to postgres` copies every session,
    /// token, user and seen event id (still sealed) into an empty PostgreSQL store, prints the
    /// counts and checks them; `--from postgres --to redb` copies them back into a new (or
    /// empty) redb file at storage.path. The service must be stopped (a live store, or a fleet
    /// still holding leases on the database, is refused).
    Migrate(MigrateArgs),
    /// Serve the MCP tools (send messages and cards, users, aPaaS records, authorization) to
    /// one client over standard input/output. Opens the store, so the service must be stopped.
    Mcp {
        /// Use the stdio transport (the only one here; the service serves HTTP at /mcp).
        #[arg(long, required = true)]
        stdio: bool,
    },
    /// Run only the local imitation of the Feishu platform (for tests and demos).
    Sandbox {
        /// Port on 127.0.0.1 (0: any free port).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Serve plain HTTP and ws:// instead of HTTPS and wss://.
        #[arg(long)]
        plain: bool,
        /// Where to write the sandbox's CA certificate (PEM) for a service's tls.ca_file.
        #[arg(long, default_value = "sandbox-ca.pem")]
        ca_out: PathBuf,
    },
    /// Write the man pages and the bash, zsh and fish completions (the package build runs it).
    #[command(hide = true)]
    Manual {
        /// Directory to write into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// `export` subcommands.
#[derive(Debug, Subcommand)]
pub enum ExportCmd {
    /// One-shot full export of every session to PostgreSQL (table user_auth_sessions), then
    /// sets the continuous export's cursor so EXPORT_POSTGRES_URL resumes from there.
    Postgres {
        /// A file (mode 0600) holding the postgres://… URL; default: export.postgres_url
        /// (EXPORT_POSTGRES_URL, EXPORT_POSTGRES_URL_FILE or a systemd credential). Never
        /// given on the command line: a password there is visible to every local user.
        #[arg(long, value_name = "PATH")]
        url_file: Option<PathBuf>,
    },
}

/// `import` subcommands.
#[derive(Debug, Subcommand)]
pub enum ImportCmd {
    /// Import every row of PostgreSQL's user_auth_sessions (this service's export, or the
    /// Python service's table with plaintext tokens), sealing tokens under the store's key.
    Postgres {
        /// A file (mode 0600) holding the postgres://… URL; default: export.postgres_url
        /// (EXPORT_POSTGRES_URL, EXPORT_POSTGRES_URL_FILE or a systemd credential).
        #[arg(long, value_name = "PATH")]
        url_file: Option<PathBuf>,
    },
    /// Import the Python deployment's data: its PostgreSQL user_auth_sessions table (sessions,
    /// and each user's current token, sealed under the store's key) and, with --apps-db, read
    /// its SQLite app store and list the apps found. The service must be stopped. Every row is
    /// checked before anything is written; a bad row is named and nothing is imported.
    Python(ImportPythonArgs),
}

/// `import python` options.
#[derive(Debug, Args)]
pub struct ImportPythonArgs {
    /// The Python deployment's database, postgres://… without a password (the command line
    /// is visible to every local user; a URL with a password goes in --postgres-url-file).
    #[arg(long, value_name = "URL", conflicts_with = "postgres_url_file")]
    pub postgres_url: Option<String>,
    /// A file (mode 0600) holding the postgres://… URL.
    #[arg(long, value_name = "PATH")]
    pub postgres_url_file: Option<PathBuf>,
    /// The Python deployment's SQLite app store (its LARK_CONFIG_DB_PATH, by default
    /// data/lark_config.db); app secrets are opened with LARK_CONFIG_ENCRYPTION_KEY.
    #[arg(long, value_name = "PATH")]
    pub apps_db: Option<PathBuf>,
}

/// `backup` options.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Where to write the backup.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Encrypt to this age public key (age1…); repeatable. Default: backup.recipients.
    #[arg(long = "recipient", value_name = "AGE_PUBKEY")]
    pub recipients: Vec<String>,
    /// Encrypt with the passphrase in this file instead. Default: backup.passphrase.
    #[arg(long, value_name = "FILE", conflicts_with = "recipients")]
    pub passphrase_file: Option<PathBuf>,
}

/// A store backend, for `migrate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendName {
    /// The embedded redb file (storage.path).
    Redb,
    /// A PostgreSQL database.
    Postgres,
}

/// `migrate` options.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The store to copy from.
    #[arg(long, value_enum)]
    pub from: BackendName,
    /// The store to copy into.
    #[arg(long, value_enum)]
    pub to: BackendName,
    /// A file (mode 0600) holding the PostgreSQL database's postgres://… URL (the target, or
    /// with --from postgres the source); default: the configured storage.postgres_url (or
    /// POSTGRES_* parts) with storage.backend = "postgres".
    #[arg(long, value_name = "PATH")]
    pub url_file: Option<PathBuf>,
}

/// `restore` options.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The backup file.
    #[arg(long, value_name = "FILE")]
    pub from: PathBuf,
    /// age identity file (AGE-SECRET-KEY-1…) to decrypt with.
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// Decrypt with the passphrase in this file.
    #[arg(long, value_name = "FILE", conflicts_with = "identity")]
    pub passphrase_file: Option<PathBuf>,
    /// Replace an existing store file (it is kept beside as `<file>.before-restore-<ms>`).
    #[arg(long)]
    pub force: bool,
}

/// `serve` options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Development mode with no Feishu account: runs a local imitation of Feishu beside the
    /// service. Reads no default config file (only an explicit --config, the environment and
    /// --set), keeps the store in ./data/lark-service.redb and generates a token key
    /// (./data/sandbox-token.key) and an admin token (./data/sandbox-admin-token), mode 0600.
    #[arg(long)]
    pub sandbox: bool,
    /// With --sandbox: serve the sandbox over plain HTTP and ws:// instead of HTTPS and wss://
    /// with a generated CA (which the service trusts through tls.ca_file).
    #[arg(long, requires = "sandbox")]
    pub plain: bool,
}

impl From<&ServeArgs> for crate::daemon::ServeOptions {
    fn from(a: &ServeArgs) -> Self {
        Self {
            sandbox: a.sandbox,
            sandbox_tls: !a.plain,
        }
    }
}

/// `app` subcommands.
#[derive(Debug, Subcommand)]
pub enum AppCmd {
    /// Add an active app.
    Add {
        /// The platform's app id (cli_…).
        #[arg(long)]
        app_id: String,
        /// A unique name.
        #[arg(long)]
        app_name: String,
        /// The app secret (visible to local users in the process list: prefer --app-secret-file).
        #[arg(
            long,
            conflicts_with = "app_secret_file",
            required_unless_present = "app_secret_file"
        )]
        app_secret: Option<String>,
        /// A file holding the app secret.
        #[arg(long, value_name = "PATH")]
        app_secret_file: Option<PathBuf>,
        /// Free text.
        #[arg(long)]
        description: Option<String>,
        /// Permissions, as JSON.
        #[arg(long)]
        permissions: Option<String>,
    },
    /// List apps (without --status: all but deleted ones).
    List {
        /// active, inactive or deleted.
        #[arg(long)]
        status: Option<String>,
        /// A JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one app.
    Show {
        /// The app id.
        app_id: String,
        /// JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Change an app's name, secret, description or permissions.
    Update {
        /// The app id.
        app_id: String,
        /// New name.
        #[arg(long)]
        app_name: Option<String>,
        /// New secret (prefer --app-secret-file).
        #[arg(long, conflicts_with = "app_secret_file")]
        app_secret: Option<String>,
        /// A file holding the new secret.
        #[arg(long, value_name = "PATH")]
        app_secret_file: Option<PathBuf>,
        /// New description.
        #[arg(long)]
        description: Option<String>,
        /// New permissions, as JSON.
        #[arg(long)]
        permissions: Option<String>,
    },
    /// Delete an app: soft (status deleted) unless --hard (the row is removed).
    Delete {
        /// The app id.
        app_id: String,
        /// Delete even though users' tokens of this app are stored.
        #[arg(long)]
        force: bool,
        /// Remove the row instead of marking it deleted.
        #[arg(long)]
        hard: bool,
    },
    /// Mark an app active: the service opens its long connection.
    Enable {
        /// The app id.
        app_id: String,
    },
    /// Mark an app inactive: the service drops its long connection.
    Disable {
        /// The app id.
        app_id: String,
    },
}

/// `config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Validate and print the effective configuration, secrets redacted.
    Check {
        /// List every key with its environment names and meaning instead.
        #[arg(long)]
        list: bool,
    },
    /// Print the documented example config file.
    Example,
}

/// `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Which key ids seal what, and whether a rotation is pending.
    Status,
    /// Re-seal every secret under the active key (LARK_TOKEN_ENCRYPTION_KEY), reading older
    /// records with LARK_TOKEN_ENCRYPTION_PREVIOUS_KEYS.
    Rotate {
        /// Records per transaction.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
    /// Print a new random key (64 hex characters).
    Generate {
        /// Write it to this file (mode 0600) instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// `sessions` subcommands.
#[derive(Debug, Subcommand)]
pub enum SessionsCmd {
    /// List sessions, newest first.
    List {
        /// Only this state (pending, completed, expired, failed, rejected, revoked).
        #[arg(long)]
        state: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one session (no secrets).
    Show {
        /// Session id (32 hex characters).
        id: String,
    },
    /// Revoke a session and delete the token it produced.
    Revoke {
        /// Session id (32 hex characters).
        id: String,
    },
    /// Run the TTL sweep once now.
    Sweep,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// A failed command, with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad configuration (exit 64).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store refused (exit 65 for data problems, 75 for temporary ones).
    #[error(transparent)]
    Store(#[from] storage::Error),
    /// A backup could not be written or restored.
    #[error(transparent)]
    Backup(#[from] crate::backup::BackupError),
    /// The service did not start or stopped with an error.
    #[error(transparent)]
    Daemon(#[from] crate::daemon::DaemonError),
    /// Anything else (exit 1).
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

impl CliError {
    /// sysexits-style exit code.
    #[must_use]
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) => EX_USAGE,
            Self::Store(e) => crate::daemon::store_exit_code(e),
            Self::Backup(crate::backup::BackupError::Store(e)) => {
                Self::Store(clone_kind(e)).exit_code()
            }
            Self::Backup(crate::backup::BackupError::Usage(_)) => EX_USAGE,
            Self::Backup(_) => 65,
            Self::Daemon(e) => e.exit_code(),
            Self::Other(_) => 1,
        }
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<(), CliError> {
    let opts = LoadOptions {
        config_path: cli.config.clone(),
        overrides: cli.set.clone(),
    };
    match cli.command {
        Command::Serve(args) => Ok(crate::daemon::serve(&opts, (&args).into())?),
        Command::App(cmd) => app(&opts, cmd),
        Command::Config(ConfigCmd::Check { list }) => config_check(&opts, list),
        Command::Config(ConfigCmd::Example) => {
            print!("{}", crate::config::settings::example_toml());
            Ok(())
        }
        Command::Keys(cmd) => keys(&opts, cmd),
        Command::Sessions(cmd) => sessions(&opts, cmd),
        Command::Backup(args) => backup(&opts, &args),
        Command::Restore(args) => restore(&opts, &args),
        Command::Export(ExportCmd::Postgres { url_file }) => {
            pg_export(&opts, url_file.as_deref(), false)
        }
        Command::Import(ImportCmd::Postgres { url_file }) => {
            pg_export(&opts, url_file.as_deref(), true)
        }
        Command::Import(ImportCmd::Python(args)) => import_python(&opts, &args),
        Command::Migrate(args) => migrate(&opts, &args),
        Command::Mcp { stdio: _ } => mcp_stdio(&opts),
        Command::Sandbox {
            port,
            plain,
            ca_out,
        } => sandbox(port, plain, &ca_out),
        Command::Manual { out } => {
            use clap::CommandFactory as _;
            let w = crate::manual::write(Cli::command(), &out)
                .map_err(|e| anyhow::anyhow!("writing the manual: {e}"))?;
            println!(
                "wrote {} man pages and {} completion scripts into {}",
                w.pages.len(),
                w.completions.len(),
                out.display()
            );
            Ok(())
        }
    }
}

fn config_check(opts: &LoadOptions, list: bool) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    if list {
        for s in crate::config::settings::SETTINGS {
            let env = if s.secret {
                format!(
                    "{} (or {}_FILE, or credential `{}`)",
                    s.env.join(", "),
                    s.env[0],
                    s.key
                )
            } else {
                s.env.join(", ")
            };
            let _ = writeln!(
                out,
                "{}\n    env: {env}\n    default: {}\n    {}",
                s.key,
                s.default.unwrap_or("(none)"),
                s.help
            );
        }
        return Ok(());
    }
    let cfg = Config::load(opts)?;
    let _ = write!(out, "{}", cfg.render());
    cfg.require_serve()?;
    let ring = cfg.keyring()?;
    let _ = writeln!(
        out,
        "# token key ids: {}",
        ring.ids()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(out, "# configuration is valid");
    Ok(())
}

fn pg_export(opts: &LoadOptions, url_file: Option<&Path>, import: bool) -> Result<(), CliError> {
    let cfg = Config::load(opts)?;
    let url = match url_file {
        Some(p) => crate::config::read_secret_file("export.postgres_url", p)?.0,
        None => cfg.export_postgres_url.clone().ok_or_else(|| {
            anyhow::anyhow!("no PostgreSQL URL: give --url-file PATH, or set export.postgres_url (EXPORT_POSTGRES_URL / EXPORT_POSTGRES_URL_FILE)")
        })?,
    };
    let url = secrecy::ExposeSecret::expose_secret(&url);
    let store = open_store(&cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)?;
    let net =
        crate::net::Net::new(&cfg.network.net_options()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let started = Instant::now();
    let n = rt
        .block_on(async {
            if import {
                crate::export::postgres::import_all(&store, url, &net).await
            } else {
                crate::export::postgres::export_all(&store, url, &net).await
            }
        })
        .map_err(anyhow::Error::from)?;
    let verb = if import { "imported" } else { "exported" };
    println!(
        "{verb} {n} sessions in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `import python`: the apps first (reading only), then the sessions and tokens.
fn import_python(opts: &LoadOptions, args: &ImportPythonArgs) -> Result<(), CliError> {
    use crate::export::{python, python_apps};
    let cfg = Config::load(opts)?;
    let url = match (&args.postgres_url, &args.postgres_url_file) {
        (Some(u), _) => {
            // A password on the command line is visible to every local user (issue 16): only
            // a URL without one is taken here.
            let has_password = crate::export::postgres::pg_config(u)
                .map_err(anyhow::Error::from)?
                .get_password()
                .is_some();
            if has_password {
                return Err(ConfigError::Invalid {
                    key: "--postgres-url".to_owned(),
                    origin: crate::config::Source::Flag,
                    value: None,
                    expected: "a URL without a password (every local user can read the command line): put it in a file of mode 0600 and give --postgres-url-file".to_owned(),
                }
                .into());
            }
            Some(secrecy::SecretString::from(u.clone()))
        }
        (None, Some(p)) => Some(crate::config::read_secret_file("postgres_url", p)?.0),
        (None, None) => None,
    };
    if url.is_none() && args.apps_db.is_none() {
        return Err(anyhow::anyhow!(
            "import python: give --postgres-url URL (or --postgres-url-file PATH), --apps-db PATH, or both"
        )
        .into());
    }
    let mut out = std::io::stdout().lock();
    if let Some(db) = &args.apps_db {
        let key = cfg.config_encryption_key().ok_or_else(|| {
            anyhow::anyhow!("--apps-db: set LARK_CONFIG_ENCRYPTION_KEY (the Python deployment's key) to open its app secrets")
        })?;
        let apps = python_apps::read_apps(db, &key).map_err(anyhow::Error::from)?;
        // Read whole and checked before anything is written: a bad row imports nothing.
        let mut planned = Vec::with_capacity(apps.len());
        for a in apps {
            let status = a.status.parse::<crate::apps::AppStatus>().map_err(|e| {
                anyhow::anyhow!("{}: app {}: column status: {e}", db.display(), a.app_id)
            })?;
            planned.push(crate::apps::ImportedApp {
                app: crate::apps::NewApp {
                    app_id: a.app_id,
                    app_name: a.app_name,
                    app_secret: a.app_secret,
                    description: a.description,
                    permissions: a.permissions.map(|p| p.to_string()),
                    created_by: Some("import python".to_owned()),
                },
                status,
                created_at: a.created_at,
                updated_at: a.updated_at,
            });
        }
        let store = open_store(&cfg)?;
        let reg = crate::apps::Registry::from_config(store, &cfg)?;
        let _ = writeln!(out, "apps in {}: {}", db.display(), planned.len());
        let (mut imported, mut kept) = (0, 0);
        for a in planned {
            let (id, name) = (a.app.app_id.clone(), a.app.app_name.clone());
            let status = a.status;
            match reg.import(a).map_err(anyhow::Error::from)? {
                Some(_) => {
                    imported += 1;
                    let _ = writeln!(
                        out,
                        "  app {id} \"{name}\" {}: imported (secret sealed)",
                        status.as_str()
                    );
                }
                None => {
                    kept += 1;
                    let _ = writeln!(
                        out,
                        "  app {id} \"{name}\": skipped (already in the registry or the configuration's app)"
                    );
                }
            }
        }
        let _ = writeln!(out, "apps: {imported} imported, {kept} skipped");
    }
    let Some(url) = url else { return Ok(()) };
    let store = open_store(&cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)?;
    let net =
        crate::net::Net::new(&cfg.network.net_options()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let started = Instant::now();
    let progress = |done: u64, total: u64| {
        if total > crate::export::postgres::BATCH as u64 {
            eprintln!("import python: {done}/{total} sessions written");
        }
    };
    let report = rt
        .block_on(python::import(
            &store,
            url.expose_secret(),
            &net,
            now_ms(),
            &progress,
        ))
        .map_err(anyhow::Error::from)?;
    let _ = writeln!(
        out,
        "read {} rows; imported {} sessions, {} tokens, {} users in {:.1}s; skipped {}",
        report.rows,
        report.sessions,
        report.tokens,
        report.users,
        started.elapsed().as_secs_f64(),
        report.skipped.len()
    );
    // Skipped rows grouped by what and why, with the first rows of each group.
    let mut groups: Vec<((&str, &str), Vec<&str>)> = Vec::new();
    for s in &report.skipped {
        let key = (s.what, s.reason.as_str());
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, rows)) => rows.push(&s.row),
            None => groups.push((key, vec![&s.row])),
        }
    }
    for ((what, reason), rows) in &groups {
        let _ = writeln!(out, "  skipped {} {what}(s): {reason}", rows.len());
        for r in rows.iter().take(10) {
            let _ = writeln!(out, "    {r}");
        }
        if rows.len() > 10 {
            let _ = writeln!(out, "    … and {} more", rows.len() - 10);
        }
    }
    Ok(())
}

fn migrate(opts: &LoadOptions, args: &MigrateArgs) -> Result<(), CliError> {
    let back = match (args.from, args.to) {
        (BackendName::Redb, BackendName::Postgres) => false,
        (BackendName::Postgres, BackendName::Redb) => true,
        _ => {
            return Err(storage::Error::Invalid(
                "migrate copies between the two backends: --from redb --to postgres, or --from postgres --to redb".to_owned(),
            )
            .into())
        }
    };
    let cfg = Config::load(opts)?;
    let url = match (&args.url_file, &cfg.storage_backend) {
        (Some(p), _) => crate::config::read_secret_file("storage.postgres_url", p)?.0,
        (None, crate::config::StorageBackend::Postgres { url }) => url.clone(),
        (None, crate::config::StorageBackend::Redb) => {
            return Err(anyhow::anyhow!(
                "no PostgreSQL URL: give --url-file PATH, or set storage.backend = \"postgres\" with storage.postgres_url (STORAGE_POSTGRES_URL) or POSTGRES_HOST…"
            )
            .into())
        }
    };
    if back {
        return migrate_back(&cfg, &url);
    }
    // Opening the redb store takes its lock: a store the service still holds is refused here.
    let store = open_redb(&cfg)?;
    let pg = open_pg(&cfg, &url)?;
    let started = Instant::now();
    let redb = store
        .as_redb()
        .ok_or_else(|| storage::Error::Invalid("migrate copies from a redb store".to_owned()))?;
    let report = pg.copy_from_redb(redb, &mut |what, n| {
        eprintln!("migrate: {n} {what} copied");
    })?;
    let c = report.target;
    println!(
        "migrated {} sessions, {} tokens, {} users, {} seen event ids from {} to PostgreSQL in {:.1}s; counts verified",
        c.sessions,
        c.tokens,
        c.users,
        c.seen_events,
        cfg.storage_path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `migrate --from postgres --to redb`: copies the PostgreSQL store at `url` into the redb file
/// at storage.path, which must be new or empty. A file this run created is removed again when
/// the copy fails or is refused, so no half copy is left to be served.
fn migrate_back(cfg: &Config, url: &secrecy::SecretString) -> Result<(), CliError> {
    let pg = open_pg(cfg, url)?;
    let path = cfg.storage_path.clone();
    let existed = path.exists();
    // Opening the redb store takes its lock: a file a service still holds is refused here.
    let store = open_redb(cfg)?;
    let redb = store
        .as_redb()
        .ok_or_else(|| storage::Error::Invalid("migrate copies into a redb store".to_owned()))?;
    let started = Instant::now();
    let copied = pg.copy_into_redb(redb, &mut |what, n| {
        eprintln!("migrate: {n} {what} copied");
    });
    let report = match copied {
        Ok(r) => r,
        Err(e) => {
            drop(store);
            if !existed && std::fs::remove_file(&path).is_ok() {
                eprintln!(
                    "migrate: removed {}, which this run had created",
                    path.display()
                );
            }
            return Err(e.into());
        }
    };
    let c = report.target;
    println!(
        "migrated {} sessions, {} tokens, {} users, {} seen event ids from PostgreSQL to {} in {:.1}s; counts verified",
        c.sessions,
        c.tokens,
        c.users,
        c.seen_events,
        path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The PostgreSQL store at `url`, opened as the service opens it (schema applied, key checked).
fn open_pg(
    cfg: &Config,
    url: &secrecy::SecretString,
) -> Result<crate::storage::postgres::PgStore, CliError> {
    let net =
        crate::net::Net::new(&cfg.network.net_options()).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(crate::storage::postgres::PgStore::open(
        secrecy::ExposeSecret::expose_secret(url),
        &net,
        cfg.keyring()?,
        crate::storage::postgres::PgOptions {
            terminal_retention: cfg.session_retention,
            change_feed: cfg.export_postgres_url.is_some(),
            ..crate::storage::postgres::PgOptions::default()
        },
    )?)
}

/// The configured store, either backend: for the commands that work on both (`sessions`,
/// `keys status`, `app`).
fn open_db(cfg: &Config) -> Result<storage::Db, CliError> {
    match &cfg.storage_backend {
        crate::config::StorageBackend::Postgres { url } => Ok(open_pg(cfg, url)?.into()),
        crate::config::StorageBackend::Redb => open_store(cfg),
    }
}

/// Refuses `what` when the configured store is PostgreSQL, saying what to do `instead`
/// (exit 64, before anything is opened).
fn refuse_on_postgres(cfg: &Config, what: &str, instead: &str) -> Result<(), CliError> {
    match cfg.storage_backend {
        crate::config::StorageBackend::Postgres { .. } => Err(storage::Error::Invalid(format!(
            "{what} is not available with storage.backend = \"postgres\": {instead}"
        ))
        .into()),
        crate::config::StorageBackend::Redb => Ok(()),
    }
}

/// The configured redb store. Refused when storage.backend = "postgres": a command that works
/// on the redb file only must not open a local file the fleet does not serve from.
fn open_store(cfg: &Config) -> Result<storage::Db, CliError> {
    refuse_on_postgres(
        cfg,
        "this command",
        &format!(
            "it works on the local redb store ({}) only in this build",
            cfg.storage_path.display()
        ),
    )?;
    open_redb(cfg)
}

/// The redb file at storage.path, whatever the configured backend (for `migrate`).
fn open_redb(cfg: &Config) -> Result<storage::Db, CliError> {
    refuse_root_on_foreign_store(&cfg.storage_path)?;
    let ring = cfg.keyring()?;
    Ok(Store::open(&cfg.storage_path, ring, store_options(cfg))?.into())
}

/// The effective user id, from `/proc/self/status` (no `unsafe` call needed).
fn effective_uid() -> Option<u32> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Uid:"))?
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

/// Store commands run as root on a store another user owns would leave root-owned files
/// beside it (the pid file, a restored or rotated file) that lock the service out: refuse.
fn refuse_root_on_foreign_store(path: &Path) -> Result<(), CliError> {
    use std::os::unix::fs::MetadataExt;
    if effective_uid() != Some(0) {
        return Ok(());
    }
    match std::fs::metadata(path) {
        Ok(m) if m.uid() != 0 => Err(anyhow::anyhow!(
            "refusing to use {} as root: it belongs to uid {}; run the command as its owner (e.g. `sudo -u lark-service lark-service …`)",
            path.display(),
            m.uid()
        )
        .into()),
        _ => Ok(()),
    }
}

fn keys(opts: &LoadOptions, cmd: KeysCmd) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match cmd {
        KeysCmd::Generate { out: None } => {
            let (_, text) = Key::generate();
            let _ = writeln!(out, "{}", text.expose_secret());
        }
        KeysCmd::Generate { out: Some(path) } => {
            let (key, text) = Key::generate();
            crate::fsutil::write_private(&path, text.expose_secret())
                .map_err(anyhow::Error::from)?;
            let _ = writeln!(out, "wrote key id {} to {}", key.id(), path.display());
        }
        KeysCmd::Status => {
            let cfg = Config::load(opts)?;
            let store = open_db(&cfg)?;
            let st = store.key_status()?;
            let _ = writeln!(out, "active key id:      {}", st.active);
            let _ = writeln!(out, "store key-check id: {}", st.store_key);
            for (k, n) in &st.sealed_fields_by_key {
                let _ = writeln!(out, "sealed fields under {k}: {n}");
            }
            let _ = writeln!(
                out,
                "rotation pending:   {}",
                if st.rotation_pending {
                    "yes (run `lark-service keys rotate`)"
                } else {
                    "no"
                }
            );
        }
        KeysCmd::Rotate { batch } => {
            let cfg = Config::load(opts)?;
            // On PostgreSQL, online: refused while a live instance lacks the active key.
            let store = open_db(&cfg)?;
            let started = Instant::now();
            let mut last = Instant::now();
            let report = store.rotate_keys(batch, &mut |done, total| {
                if last.elapsed().as_millis() >= 500 || done == total {
                    eprintln!("rotating: {done}/{total} records");
                    last = Instant::now();
                }
            })?;
            let _ = writeln!(
                out,
                "rotation complete in {:.1}s: {} records read, {} re-sealed under key {}; the previous keys are no longer needed",
                started.elapsed().as_secs_f64(),
                report.scanned,
                report.resealed,
                store.active_key_id()
            );
        }
    }
    Ok(())
}

fn fmt_ms(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX)).map_or_else(
        || ms.to_string(),
        |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
    )
}

fn sessions(opts: &LoadOptions, cmd: SessionsCmd) -> Result<(), CliError> {
    let cfg = Config::load(opts)?;
    // Either backend: on PostgreSQL revoke is a conditional update and the sweep takes its
    // rows with SKIP LOCKED, so both are safe beside a running fleet.
    let store = open_db(&cfg)?;
    let mut out = std::io::stdout().lock();
    match cmd {
        SessionsCmd::List { state, limit, json } => {
            let state = state.map(|s| s.parse::<SessionState>()).transpose()?;
            let rows = store.list_sessions(state, limit)?;
            if json {
                for r in rows {
                    let _ = writeln!(out, "{}", serde_json::to_string(&r).unwrap_or_default());
                }
            } else {
                let _ = writeln!(
                    out,
                    "{:<32}  {:<9}  {:<24}  {:<20}  {:<20}  TOKENS",
                    "SESSION", "STATE", "USER", "CREATED", "EXPIRES"
                );
                for r in rows {
                    let _ = writeln!(
                        out,
                        "{:<32}  {:<9}  {:<24}  {:<20}  {:<20}  {}",
                        r.session_id,
                        r.state,
                        r.user_id,
                        fmt_ms(r.created_at),
                        fmt_ms(r.expires_at),
                        if r.has_tokens { "yes" } else { "no" }
                    );
                }
            }
        }
        SessionsCmd::Show { id } => {
            let id: SessionId = id.parse()?;
            match store.get_session_summary(id)? {
                Some(s) => {
                    let _ = writeln!(
                        out,
                        "{}",
                        serde_json::to_string_pretty(&s).unwrap_or_default()
                    );
                }
                None => return Err(anyhow::anyhow!("no session {id}").into()),
            }
        }
        SessionsCmd::Revoke { id } => {
            let id: SessionId = id.parse()?;
            match store.revoke_session(id, now_ms())? {
                Some(_) => {
                    let _ = writeln!(
                        out,
                        "revoked session {id}; its token (if current) was deleted"
                    );
                }
                None => return Err(anyhow::anyhow!("no session {id}").into()),
            }
        }
        SessionsCmd::Sweep => {
            let started = Instant::now();
            let r = store.sweep(now_ms(), 10_000)?;
            let _ = writeln!(
                out,
                "sweep: {} sessions expired, {} purged, {} event ids forgotten, {} index entries repaired in {:.3}s",
                r.expired.len(),
                r.purged,
                r.events_forgotten,
                r.repaired,
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

fn clone_kind(e: &storage::Error) -> storage::Error {
    match e {
        storage::Error::Locked { path, pid } => storage::Error::Locked {
            path: path.clone(),
            pid: *pid,
        },
        storage::Error::DiskFull { path } => storage::Error::DiskFull { path: path.clone() },
        storage::Error::Invalid(m) => storage::Error::Invalid(m.clone()),
        other => storage::Error::Engine(other.to_string()),
    }
}

fn backup_protection(
    cfg: &Config,
    recipients: &[String],
    passphrase_file: Option<&std::path::Path>,
) -> Result<crate::backup::Protection, CliError> {
    use crate::backup::Protection;
    Ok(if let Some(f) = passphrase_file {
        Protection::passphrase_file(f)?
    } else if !recipients.is_empty() {
        Protection::recipients(recipients)?
    } else if !cfg.backup.recipients.is_empty() {
        Protection::recipients(&cfg.backup.recipients)?
    } else if let Some(p) = &cfg.backup.passphrase {
        Protection::Passphrase(p.clone())
    } else {
        return Err(anyhow::anyhow!("say how to encrypt the backup: --recipient AGE_PUBKEY, --passphrase-file FILE, or backup.recipients / BACKUP_PASSPHRASE in the config").into());
    })
}

fn backup(opts: &LoadOptions, args: &BackupArgs) -> Result<(), CliError> {
    let cfg = Config::load(opts)?;
    let prot = backup_protection(&cfg, &args.recipients, args.passphrase_file.as_deref())?;
    let started = Instant::now();
    // On PostgreSQL, a snapshot of the database in the same format (online; `pg_dump` stays
    // the database-level backup).
    let store = match open_db(&cfg) {
        Ok(s) => s,
        Err(CliError::Store(storage::Error::Locked { pid, .. })) => {
            return backup_through_service(&cfg, args, pid);
        }
        Err(e) => return Err(e),
    };
    let mut progress = crate::backup::progress_line("backup");
    let h = crate::backup::write_backup_db(&store, &args.out, &prot, &mut progress)?;
    println!(
        "wrote {} in {:.1}s: {} records, {} sessions, {} tokens (schema {}, token key {}), {} bytes",
        args.out.display(),
        started.elapsed().as_secs_f64(),
        h.total(),
        h.counts.get("sessions").copied().unwrap_or(0),
        h.counts.get("tokens").copied().unwrap_or(0),
        h.schema_version,
        h.store_key_id,
        std::fs::metadata(&args.out).map_or(0, |m| m.len())
    );
    Ok(())
}

/// The store is held by the running service: ask it to take the backup.
fn backup_through_service(
    cfg: &Config,
    args: &BackupArgs,
    pid: Option<u32>,
) -> Result<(), CliError> {
    let holder = pid.map_or_else(|| "another process".to_owned(), |p| format!("pid {p}"));
    let Some(token) = cfg.admin_token.clone() else {
        return Err(anyhow::anyhow!("the store is held by {holder} (the running service?); set admin_token so the CLI can ask the service for an online backup, or stop it").into());
    };
    if args.passphrase_file.is_some() {
        return Err(anyhow::anyhow!("the service is running and takes the backup itself: use --recipient, or its configured backup.recipients / backup.passphrase").into());
    }
    let url = format!("http://{}/api/v1/backups", cfg.admin_listen);
    let body = serde_json::json!({ "recipients": args.recipients });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)?;
    let resp: serde_json::Value = rt.block_on(async {
        // The service on loopback: never through a proxy.
        let r = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(|e| anyhow::anyhow!("HTTP client: {e}"))?
            .post(&url)
            .bearer_auth(token.expose_secret())
            .json(&body)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("asking the service at {url}: {e}"))?;
        let status = r.status();
        let v: serde_json::Value = r
            .json()
            .await
            .map_err(|e| anyhow::anyhow!("reading the service's answer: {e}"))?;
        if !status.is_success() {
            anyhow::bail!(
                "the service refused the backup ({status}): {}",
                v["error"].as_str().unwrap_or("no reason given")
            );
        }
        Ok(v)
    })?;
    let path = PathBuf::from(resp["path"].as_str().unwrap_or_default());
    std::fs::copy(&path, &args.out).map_err(|e| {
        anyhow::anyhow!("copying {} to {}: {e}", path.display(), args.out.display())
    })?;
    println!(
        "the running service ({holder}) wrote {}; copied to {}: {} records, {} sessions, {} tokens",
        path.display(),
        args.out.display(),
        resp["records"].as_u64().unwrap_or(0),
        resp["header"]["counts"]["sessions"].as_u64().unwrap_or(0),
        resp["header"]["counts"]["tokens"].as_u64().unwrap_or(0)
    );
    Ok(())
}

fn restore(opts: &LoadOptions, args: &RestoreArgs) -> Result<(), CliError> {
    use crate::backup::Protection;
    let cfg = Config::load(opts)?;
    refuse_on_postgres(
        &cfg,
        "restore",
        "a backup holds a redb store: restore it with storage.backend = \"redb\", then copy it into an empty database with `lark-service migrate --from redb --to postgres`; a pg_dump is restored with pg_restore",
    )?;
    let prot = match (&args.identity, &args.passphrase_file) {
        (Some(i), _) => Protection::identity_file(i)?,
        (None, Some(p)) => Protection::passphrase_file(p)?,
        (None, None) => match &cfg.backup.passphrase {
            Some(p) => Protection::Passphrase(p.clone()),
            None => {
                return Err(anyhow::anyhow!(
                    "say how to decrypt the backup: --identity FILE or --passphrase-file FILE"
                )
                .into())
            }
        },
    };
    let started = Instant::now();
    let mut progress = crate::backup::progress_line("restore");
    let h = crate::backup::restore_backup(
        &args.from,
        &prot,
        &cfg.storage_path,
        cfg.keyring()?,
        store_options(&cfg),
        args.force,
        &mut progress,
    )?;
    println!(
        "restored {} records taken at {} into {} in {:.1}s",
        h.total(),
        fmt_ms(h.created_at),
        cfg.storage_path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn sandbox(port: u16, plain: bool, ca_out: &Path) -> Result<(), CliError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)?;
    rt.block_on(async {
        let sb = crate::sandbox::Sandbox::start(crate::sandbox::SandboxOptions {
            port,
            tls: !plain,
            ..crate::sandbox::SandboxOptions::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        println!("sandbox platform: {}/", sb.base_url());
        let trust = match sb.ca_pem() {
            Some(pem) => {
                std::fs::write(ca_out, pem)
                    .map_err(|e| anyhow::anyhow!("writing {}: {e}", ca_out.display()))?;
                format!(" TLS_CA_FILE={}", ca_out.display())
            }
            None => String::new(),
        };
        println!(
            "  LARK_DOMAIN={} APP_ID={} APP_SECRET={}{trust}",
            sb.base_url(),
            crate::sandbox::APP_ID,
            crate::sandbox::APP_SECRET
        );
        crate::daemon::shutdown_signal().await;
        Ok::<(), CliError>(())
    })
}

/// `mcp --stdio`: the MCP server over standard input/output (logs go to stderr).
fn mcp_stdio(opts: &LoadOptions) -> Result<(), CliError> {
    let cfg = Config::load(opts)?;
    crate::telemetry::init(&cfg.log);
    cfg.require_serve()?;
    if cfg.app_id.is_none() {
        return Err(anyhow::anyhow!(
            "mcp --stdio serves the configuration's app: set APP_ID and APP_SECRET (the app registry's apps are served over /mcp?app_id= by `serve`)"
        )
        .into());
    }
    let store = open_store(&cfg)?;
    let domain: crate::lark::Domain = cfg
        .domain
        .parse()
        .map_err(|e| anyhow::anyhow!("domain: {e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)?;
    rt.block_on(async move {
        let net =
            crate::net::Net::new(&cfg.network.net_options()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut lark_cfg = crate::lark::LarkConfig::new(
            domain,
            cfg.app_id.clone().unwrap_or_default(),
            cfg.app_secret
                .clone()
                .unwrap_or_else(|| secrecy::SecretString::from(String::new())),
        );
        lark_cfg.net = Some(net);
        let lark = crate::lark::LarkClient::new(lark_cfg)
            .map_err(|e| anyhow::anyhow!("building the Lark client: {e}"))?;
        let auth = crate::auth::AuthService::new(
            lark.clone(),
            store.clone(),
            crate::auth::AuthOptions::from_config(&cfg),
        );
        crate::mcp::serve_stdio(crate::mcp::McpServer::new(lark, auth, store)).await?;
        Ok::<(), CliError>(())
    })
}

// ---------------------------------------------------------------------------------------------
// `app`: the registry, in the store directly or, while the service holds it, through its
// admin API (as `backup` does), so an operator can add or disable an app without stopping the
// service, as the Python CLI allowed.

/// One `app` command, in the form both paths take.
enum AppOp {
    Add(serde_json::Value),
    List(Option<String>),
    Show(String),
    Update(String, serde_json::Value),
    Delete {
        app_id: String,
        force: bool,
        hard: bool,
    },
    Status(String, bool),
}

fn read_secret(inline: Option<String>, file: Option<&Path>) -> Result<Option<String>, CliError> {
    if let Some(f) = file {
        let s = std::fs::read_to_string(f)
            .map_err(|e| anyhow::anyhow!("reading the app secret from {}: {e}", f.display()))?;
        let s = s.trim().to_owned();
        if s.is_empty() {
            return Err(anyhow::anyhow!("{} holds no app secret", f.display()).into());
        }
        return Ok(Some(s));
    }
    Ok(inline)
}

fn app(opts: &LoadOptions, cmd: AppCmd) -> Result<(), CliError> {
    let cfg = Config::load(opts)?;
    let (op, json_out) = match cmd {
        AppCmd::Add {
            app_id,
            app_name,
            app_secret,
            app_secret_file,
            description,
            permissions,
        } => {
            let secret = read_secret(app_secret, app_secret_file.as_deref())?
                .ok_or_else(|| anyhow::anyhow!("give --app-secret-file or --app-secret"))?;
            (
                AppOp::Add(serde_json::json!({
                    "app_id": app_id, "app_name": app_name, "app_secret": secret,
                    "description": description, "permissions": permissions,
                    "created_by": std::env::var("USER").ok(),
                })),
                false,
            )
        }
        AppCmd::List { status, json } => (AppOp::List(status), json),
        AppCmd::Show { app_id, json } => (AppOp::Show(app_id), json),
        AppCmd::Update {
            app_id,
            app_name,
            app_secret,
            app_secret_file,
            description,
            permissions,
        } => {
            let secret = read_secret(app_secret, app_secret_file.as_deref())?;
            (
                AppOp::Update(
                    app_id,
                    serde_json::json!({
                        "app_name": app_name, "app_secret": secret,
                        "description": description, "permissions": permissions,
                    }),
                ),
                false,
            )
        }
        AppCmd::Delete {
            app_id,
            force,
            hard,
        } => (
            AppOp::Delete {
                app_id,
                force,
                hard,
            },
            false,
        ),
        AppCmd::Enable { app_id } => (AppOp::Status(app_id, true), false),
        AppCmd::Disable { app_id } => (AppOp::Status(app_id, false), false),
    };
    // On PostgreSQL the registry is the fleet's table: written directly (never locked by a
    // running instance), and every instance picks the change up within a few seconds.
    let result = match open_db(&cfg) {
        Ok(store) => app_local(&cfg, store, &op)?,
        Err(CliError::Store(storage::Error::Locked { pid, .. })) => {
            app_through_service(&cfg, &op, pid)?
        }
        Err(e) => return Err(e),
    };
    print_app_result(&op, &result, json_out);
    Ok(())
}

fn str_field(v: &serde_json::Value, k: &str) -> Option<String> {
    v[k].as_str().map(str::to_owned)
}

fn app_local(cfg: &Config, store: storage::Db, op: &AppOp) -> Result<serde_json::Value, CliError> {
    use crate::apps::{AppChange, AppStatus, NewApp, Registry};
    let reg = Registry::from_config(store, cfg)?;
    let r: Result<serde_json::Value, crate::apps::AppsError> = match op {
        AppOp::Add(b) => reg
            .add(NewApp {
                app_id: str_field(b, "app_id").unwrap_or_default(),
                app_name: str_field(b, "app_name").unwrap_or_default(),
                app_secret: secrecy::SecretString::from(str_field(b, "app_secret").unwrap_or_default()),
                description: str_field(b, "description"),
                permissions: str_field(b, "permissions"),
                created_by: str_field(b, "created_by"),
            })
            .map(|v| json_of(&v)),
        AppOp::List(status) => {
            let status = status
                .as_deref()
                .map(str::parse::<AppStatus>)
                .transpose()?;
            reg.list(status).map(|v| json_of(&v))
        }
        AppOp::Show(id) => reg.show(id).map(|v| json_of(&v)),
        AppOp::Update(id, b) => reg
            .update(
                id,
                AppChange {
                    app_name: str_field(b, "app_name"),
                    app_secret: str_field(b, "app_secret").map(secrecy::SecretString::from),
                    description: str_field(b, "description"),
                    permissions: str_field(b, "permissions"),
                },
            )
            .map(|v| json_of(&v)),
        AppOp::Delete { app_id, force, hard } => reg.delete(app_id, *force, *hard).map(|tokens| {
            serde_json::json!({ "app_id": app_id, "deleted": if *hard { "hard" } else { "soft" }, "tokens": tokens })
        }),
        AppOp::Status(id, on) => reg
            .set_status(id, if *on { AppStatus::Active } else { AppStatus::Inactive })
            .map(|v| json_of(&v)),
    };
    r.map_err(|e| CliError::Other(anyhow::anyhow!("{e}")))
}

fn json_of<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

fn app_through_service(
    cfg: &Config,
    op: &AppOp,
    pid: Option<u32>,
) -> Result<serde_json::Value, CliError> {
    let holder = pid.map_or_else(|| "another process".to_owned(), |p| format!("pid {p}"));
    let Some(token) = cfg.admin_token.clone() else {
        return Err(anyhow::anyhow!("the store is held by {holder} (the running service?); set admin_token so `app` can go through the service's admin API, or stop the service").into());
    };
    let base = format!("http://{}/api/v1/apps", cfg.admin_listen);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)?;
    let v = rt.block_on(async {
        // The service on loopback: never through a proxy.
        let c = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(|e| anyhow::anyhow!("HTTP client: {e}"))?;
        let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let req = match op {
            AppOp::Add(b) => c.post(&base).json(b),
            AppOp::List(status) => match status {
                Some(s) => c.get(format!("{base}?status={}", enc(s))),
                None => c.get(&base),
            },
            AppOp::Show(id) => c.get(format!("{base}/{}", enc(id))),
            AppOp::Update(id, b) => c.patch(format!("{base}/{}", enc(id))).json(b),
            AppOp::Delete {
                app_id,
                force,
                hard,
            } => c.delete(format!("{base}/{}?force={force}&hard={hard}", enc(app_id))),
            AppOp::Status(id, on) => c.post(format!(
                "{base}/{}/{}",
                enc(id),
                if *on { "enable" } else { "disable" }
            )),
        };
        let r = req
            .bearer_auth(token.expose_secret())
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("asking the service at {base}: {e}"))?;
        let status = r.status();
        let v: serde_json::Value = r
            .json()
            .await
            .map_err(|e| anyhow::anyhow!("reading the service's answer ({status}): {e}"))?;
        if !status.is_success() {
            anyhow::bail!(
                "{}",
                v["message"]
                    .as_str()
                    .unwrap_or("the service refused, giving no reason")
            );
        }
        Ok(v)
    })?;
    Ok(v)
}

fn print_app_result(op: &AppOp, v: &serde_json::Value, json: bool) {
    if json {
        println!("{v}");
        return;
    }
    let line = |a: &serde_json::Value| {
        format!(
            "{:<24} {:<24} {:<9} {:<7} {}",
            a["app_id"].as_str().unwrap_or_default(),
            a["app_name"].as_str().unwrap_or_default(),
            a["status"].as_str().unwrap_or_default(),
            a["source"].as_str().unwrap_or_default(),
            a["description"].as_str().unwrap_or_default()
        )
    };
    match op {
        AppOp::List(_) => {
            println!(
                "{:<24} {:<24} {:<9} {:<7} DESCRIPTION",
                "APP_ID", "NAME", "STATUS", "SOURCE"
            );
            for a in v.as_array().into_iter().flatten() {
                println!("{}", line(a));
            }
        }
        AppOp::Show(_) => {
            if let Some(o) = v.as_object() {
                for (k, val) in o {
                    match val {
                        serde_json::Value::String(s) => println!("{k}: {s}"),
                        serde_json::Value::Null => println!("{k}: -"),
                        other => println!("{k}: {other}"),
                    }
                }
            }
        }
        AppOp::Delete { .. } => println!(
            "app {} deleted ({}); it had {} stored user token(s)",
            v["app_id"].as_str().unwrap_or_default(),
            v["deleted"].as_str().unwrap_or_default(),
            v["tokens"]
        ),
        AppOp::Add(_) => println!(
            "app {} added (active; secret sealed with {})",
            v["app_id"].as_str().unwrap_or_default(),
            v["secret_sealed_with"].as_str().unwrap_or_default()
        ),
        AppOp::Update(..) | AppOp::Status(..) => println!("{}", line(v)),
    }
}
