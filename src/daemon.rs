//! The running service: opens the store, binds the listener, runs background work, and shuts
//! down in order on SIGTERM / Ctrl-C.
//!
//! `run` takes the listener and the shutdown future from its caller so tests can inject both.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::cli::{store_options, write_private, CliError, ServeArgs};
use crate::config::{Config, LoadOptions};
use crate::storage::{now_ms, Store};

/// How long shutdown waits for in-flight work.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// `lark-service serve`.
pub fn serve(opts: &LoadOptions, args: &ServeArgs) -> Result<(), CliError> {
    let mut cfg = Config::load(opts)?;
    crate::telemetry::init(&cfg.log);
    if args.sandbox {
        sandbox_defaults(&mut cfg)?;
    }
    cfg.require_serve()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lark-service")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = TcpListener::bind(cfg.http_listen).await.with_context(|| {
            format!(
                "binding the HTTP listener on {} (http.listen / HTTP_LISTEN)",
                cfg.http_listen
            )
        })?;
        run(cfg, listener, shutdown_signal()).await
    })
}

/// Fills what a developer without a Feishu account lacks: sandbox app credentials and a token
/// key kept beside the store (generated on first use, mode 0600).
fn sandbox_defaults(cfg: &mut Config) -> Result<(), CliError> {
    if cfg.app_id.is_none() {
        cfg.app_id = Some("cli_a0000000000000aa".to_owned());
    }
    if cfg.app_secret.is_none() {
        cfg.app_secret = Some(SecretString::from("sandbox-app-secret".to_owned()));
    }
    if cfg.token_key.is_none() {
        let dir = cfg.storage_path.parent().unwrap_or(Path::new("."));
        let key_path = dir.join("sandbox-token.key");
        if !key_path.exists() {
            let (_, text) = crate::storage::Key::generate();
            write_private(&key_path, secrecy::ExposeSecret::expose_secret(&text))?;
            info!(path = %key_path.display(), "Generated a sandbox token key.");
        }
        let text = std::fs::read_to_string(&key_path)
            .with_context(|| format!("reading {}", key_path.display()))?;
        cfg.token_key = Some(SecretString::from(text.trim().to_owned()));
    }
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "Cannot listen for SIGTERM; only Ctrl-C stops the service.");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Runs the service on `listener` until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CliError> {
    let started = Instant::now();
    let ring = cfg.keyring()?;
    let path = cfg.storage_path.clone();
    let opts = store_options(&cfg);
    let store = tokio::task::spawn_blocking(move || Store::open(&path, ring, opts))
        .await
        .map_err(|e| anyhow::anyhow!("store open task failed: {e}"))??;
    let ready = Arc::new(AtomicBool::new(false));
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();

    if store.run(|s| s.rotation_pending()).await? {
        let s = store.clone();
        tracker.spawn(async move {
            info!(key = %s.active_key_id(), "Rotating the store to the active token key in the background.");
            match s.run(|st| st.rotate_keys(1000, &mut |_, _| {})).await {
                Ok(r) => info!(resealed = r.resealed, scanned = r.scanned, "Key rotation complete; previous keys are no longer needed."),
                Err(e) => error!(error = %e, "Key rotation failed; records under previous keys stay readable."),
            }
        });
    }
    tracker.spawn(sweep_loop(
        store.clone(),
        cfg.sweep_interval,
        cancel.clone(),
    ));

    let addr = listener
        .local_addr()
        .context("reading the listener address")?;
    if let Some(schedule) = cfg.backup.schedule.clone() {
        tracker.spawn(backup_loop(
            store.clone(),
            cfg.backup.clone(),
            schedule,
            cancel.clone(),
        ));
    }
    let app = crate::http::router(crate::http::AppState {
        store: store.clone(),
        ready: ready.clone(),
        admin_token: cfg.admin_token.clone(),
        backup: Arc::new(cfg.backup.clone()),
    });
    let server_cancel = cancel.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { server_cancel.cancelled().await })
            .await
    });
    ready.store(true, Ordering::SeqCst);
    info!(
        http = %addr,
        store = %store.path().display(),
        key = %store.active_key_id(),
        startup_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "Service ready."
    );
    println!("lark-service ready: http://{addr}/ (health: http://{addr}/healthz)");

    shutdown.await;
    info!("Shutting down.");
    ready.store(false, Ordering::SeqCst);
    cancel.cancel();
    tracker.close();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let _ = server.await;
        tracker.wait().await;
    })
    .await;
    if drained.is_err() {
        warn!("Shutdown grace period passed with work still running.");
    }
    drop(store);
    info!("Stopped.");
    Ok(())
}

async fn sweep_loop(store: Store, every: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let started = Instant::now();
        match store.run(|s| s.sweep(now_ms(), 10_000)).await {
            Ok(r) => info!(
                expired = r.expired.len(),
                purged = r.purged,
                events_forgotten = r.events_forgotten,
                duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                "Sweep finished."
            ),
            Err(e) => error!(error = %e, "Sweep failed; retrying at the next interval."),
        }
    }
}

async fn backup_loop(
    store: Store,
    cfg: crate::config::BackupConfig,
    schedule: String,
    cancel: CancellationToken,
) {
    let (Ok(sched), Some(dir)) = (crate::schedule::Schedule::parse(&schedule), cfg.dir.clone())
    else {
        error!("Scheduled backups are misconfigured; none will be taken.");
        return;
    };
    loop {
        let now = now_ms();
        let Some(next) = sched.next_after(now) else {
            return;
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(next.saturating_sub(now))) => {}
        }
        let prot = if cfg.recipients.is_empty() {
            cfg.passphrase
                .clone()
                .map(crate::backup::Protection::Passphrase)
                .ok_or_else(|| "no backup.recipients or backup.passphrase".to_owned())
        } else {
            crate::backup::Protection::recipients(&cfg.recipients).map_err(|e| e.to_string())
        };
        let prot = match prot {
            Ok(p) => p,
            Err(e) => {
                error!(error = %e, "Scheduled backup skipped.");
                continue;
            }
        };
        let (s, d, keep) = (store.clone(), dir.clone(), cfg.keep);
        match tokio::task::spawn_blocking(move || crate::http::take_backup_now(&s, &d, &prot, keep))
            .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                error!(error = %e, "Scheduled backup failed; retrying at the next scheduled time.")
            }
            Err(e) => error!(error = %e, "Scheduled backup task failed."),
        }
    }
}
