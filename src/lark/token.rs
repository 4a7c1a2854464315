//! App-identity tokens: `tenant_access_token` and `app_access_token` for a
//! self-built app (protocol notes §4.1), cached in memory.
//!
//! This module owns [`TokenCache`]: a token is refreshed once a configured
//! share of its `expire` lifetime has passed, only one fetch is in flight at
//! a time however many callers wait (single-flight; waiters share the
//! outcome, success or failure), a due-but-still-valid token keeps serving
//! other callers while one of them refreshes, and a token the platform
//! rejected is dropped by generation so a newer one is never discarded.
//! Expiry uses `tokio::time::Instant` so tests can pause the clock.
//! User tokens are not cached here; the auth feature owns them.
//!
//! The cache knows nothing of HTTP: [`TokenCache::get`] takes the fetch as an argument (the
//! client's call to the token endpoint), so this module depends on no other of the client.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use secrecy::SecretString;
use tokio::time::Instant;

use super::error::Error;

/// Longest safety margin taken off a token's lifetime before it counts as expired.
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);

/// What a token cache knows about its token, without fetching (for readiness probes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenStatus {
    /// No fetch has finished yet.
    Unknown,
    /// A token is cached and not expired.
    Valid,
    /// No usable token: the last fetch failed, with this error.
    Failed(String),
}

/// Which app-identity token a cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenKind {
    /// `tenant_access_token` (bot identity for most APIs).
    Tenant,
    /// `app_access_token`.
    App,
}

impl TokenKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Tenant => "tenant_access_token",
            Self::App => "app_access_token",
        }
    }

    pub(crate) fn path(self) -> &'static str {
        match self {
            Self::Tenant => "/open-apis/auth/v3/tenant_access_token/internal",
            Self::App => "/open-apis/auth/v3/app_access_token/internal",
        }
    }
}

/// A token handed out by the cache, tagged with the generation it belongs to
/// so a later rejection can invalidate exactly that token.
pub(crate) struct Issued {
    pub(crate) token: SecretString,
    pub(crate) generation: u64,
}

struct Cached {
    token: SecretString,
    generation: u64,
    refresh_at: Instant,
    expires_at: Instant,
}

impl Cached {
    fn issued(&self) -> Issued {
        Issued {
            token: self.token.clone(),
            generation: self.generation,
        }
    }
}

#[derive(Default)]
struct State {
    current: Option<Cached>,
    next_generation: u64,
    /// Number of fetches finished (success or failure).
    fetches: u64,
    /// Outcome of the last fetch if it failed.
    last_failure: Option<Error>,
}

/// In-memory cache of one app-identity token with single-flight refresh.
pub(crate) struct TokenCache {
    kind: TokenKind,
    refresh_share: f64,
    state: Mutex<State>,
    /// Held for the whole of a fetch: at most one fetch in flight.
    refresh: tokio::sync::Mutex<()>,
}

impl TokenCache {
    /// `refresh_share` in `(0, 1]`: the share of the lifetime after which the
    /// token is refreshed.
    pub(crate) fn new(kind: TokenKind, refresh_share: f64) -> Self {
        Self {
            kind,
            refresh_share,
            state: Mutex::new(State::default()),
            refresh: tokio::sync::Mutex::new(()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this short, non-async lock cannot leave the
        // state half-updated in a harmful way; keep serving.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Returns a usable token, fetching one with `fetch` when none is cached,
    /// the cached one has expired, or its refresh point has passed.
    pub(crate) async fn get<F, Fut>(&self, fetch: F) -> Result<Issued, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(SecretString, Duration), Error>>,
    {
        let (still_valid, fetches_seen) = {
            let state = self.state();
            let now = Instant::now();
            match &state.current {
                Some(c) if now < c.refresh_at => return Ok(c.issued()),
                Some(c) if now < c.expires_at => (Some(c.issued()), state.fetches),
                _ => (None, state.fetches),
            }
        };

        if let Some(valid) = still_valid {
            // Due for refresh but usable: one caller refreshes, the rest keep
            // using the current token instead of queueing.
            let Ok(_guard) = self.refresh.try_lock() else {
                return Ok(valid);
            };
            if let Some(fresh) = self.fresh() {
                return Ok(fresh);
            }
            return match self.fetch_locked(fetch).await {
                Ok(issued) => Ok(issued),
                Err(err) => {
                    tracing::warn!(
                        token = self.kind.name(),
                        error = %err,
                        "Refreshing the Lark token failed; using the current one until it expires."
                    );
                    Ok(valid)
                }
            };
        }

        let _guard = self.refresh.lock().await;
        {
            let state = self.state();
            if let Some(c) = &state.current {
                if Instant::now() < c.expires_at {
                    return Ok(c.issued());
                }
            }
            if state.fetches != fetches_seen {
                if let Some(err) = &state.last_failure {
                    // The fetch we waited on failed: share its outcome rather
                    // than hammering the endpoint once per waiter.
                    return Err(err.clone());
                }
            }
        }
        self.fetch_locked(fetch).await
    }

    /// The cached token's status, from memory only (never fetches).
    pub(crate) fn status(&self) -> TokenStatus {
        let state = self.state();
        if state
            .current
            .as_ref()
            .is_some_and(|c| Instant::now() < c.expires_at)
        {
            return TokenStatus::Valid;
        }
        match &state.last_failure {
            Some(e) => TokenStatus::Failed(e.to_string()),
            // Never fetched, or the token expired / was invalidated and not fetched again yet.
            None => TokenStatus::Unknown,
        }
    }

    /// The cached token if it is before its refresh point.
    fn fresh(&self) -> Option<Issued> {
        let state = self.state();
        state
            .current
            .as_ref()
            .filter(|c| Instant::now() < c.refresh_at)
            .map(Cached::issued)
    }

    /// Runs `fetch` and records the outcome. Caller holds `self.refresh`.
    async fn fetch_locked<F, Fut>(&self, fetch: F) -> Result<Issued, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(SecretString, Duration), Error>>,
    {
        let result = fetch().await;
        let now = Instant::now();
        let mut state = self.state();
        state.fetches += 1;
        match result {
            Ok((token, lifetime)) => {
                let margin = EXPIRY_MARGIN.min(lifetime / 10);
                let expires_at = now + lifetime.saturating_sub(margin);
                let refresh_at = (now + lifetime.mul_f64(self.refresh_share)).min(expires_at);
                state.next_generation += 1;
                let cached = Cached {
                    token,
                    generation: state.next_generation,
                    refresh_at,
                    expires_at,
                };
                let issued = cached.issued();
                state.current = Some(cached);
                state.last_failure = None;
                tracing::debug!(
                    token = self.kind.name(),
                    lifetime_s = lifetime.as_secs(),
                    "Fetched a new Lark token."
                );
                Ok(issued)
            }
            Err(err) => {
                state.last_failure = Some(err.clone());
                Err(err)
            }
        }
    }

    /// Drops the cached token if it is still the one of `generation`.
    pub(crate) fn invalidate(&self, generation: u64) {
        let mut state = self.state();
        if state
            .current
            .as_ref()
            .is_some_and(|c| c.generation == generation)
        {
            state.current = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    fn ok_fetch(
        calls: &Arc<AtomicU32>,
        lifetime: u64,
    ) -> impl Future<Output = Result<(SecretString, Duration), Error>> {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            Ok((
                SecretString::from(format!("t-{n}")),
                Duration::from_secs(lifetime),
            ))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_point_and_expiry_follow_the_share() {
        let cache = TokenCache::new(TokenKind::Tenant, 0.5);
        let calls = Arc::new(AtomicU32::new(0));
        let t = cache.get(|| ok_fetch(&calls, 100)).await.unwrap();
        assert_eq!(t.token.expose_secret(), "t-1");
        tokio::time::advance(Duration::from_secs(49)).await;
        let t = cache.get(|| ok_fetch(&calls, 100)).await.unwrap();
        assert_eq!(
            (t.token.expose_secret(), calls.load(Ordering::SeqCst)),
            ("t-1", 1)
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        let t = cache.get(|| ok_fetch(&calls, 100)).await.unwrap();
        assert_eq!(
            (t.token.expose_secret(), calls.load(Ordering::SeqCst)),
            ("t-2", 2)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failed_refresh_keeps_serving_a_valid_token() {
        let cache = TokenCache::new(TokenKind::Tenant, 0.5);
        let calls = Arc::new(AtomicU32::new(0));
        cache.get(|| ok_fetch(&calls, 100)).await.unwrap();
        tokio::time::advance(Duration::from_secs(60)).await;
        let t = cache
            .get(|| async { Err(Error::Config("down".into())) })
            .await
            .unwrap();
        assert_eq!(t.token.expose_secret(), "t-1");
        // Past the hard expiry (lifetime minus margin) the failure surfaces.
        tokio::time::advance(Duration::from_secs(35)).await;
        let err = cache
            .get(|| async { Err(Error::Config("down".into())) })
            .await
            .err()
            .expect("expired token must not be served");
        assert!(matches!(err, Error::Config(_)));
    }

    #[tokio::test]
    async fn invalidate_only_drops_the_matching_generation() {
        let cache = TokenCache::new(TokenKind::App, 0.8);
        let calls = Arc::new(AtomicU32::new(0));
        let first = cache.get(|| ok_fetch(&calls, 7200)).await.unwrap();
        cache.invalidate(first.generation);
        let second = cache.get(|| ok_fetch(&calls, 7200)).await.unwrap();
        assert_eq!(second.token.expose_secret(), "t-2");
        cache.invalidate(first.generation); // stale: must not drop t-2
        let again = cache.get(|| ok_fetch(&calls, 7200)).await.unwrap();
        assert_eq!(again.token.expose_secret(), "t-2");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn waiters_share_a_failed_fetch() {
        let cache = Arc::new(TokenCache::new(TokenKind::Tenant, 0.8));
        let calls = Arc::new(AtomicU32::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (cache, calls, gate) = (cache.clone(), calls.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get(|| async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        gate.notified().await;
                        Err::<(SecretString, Duration), _>(Error::Config("boom".into()))
                    })
                    .await
            }));
        }
        // Let every task reach the cache before the single fetch fails.
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        for t in tasks {
            assert!(t.await.unwrap().is_err());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
