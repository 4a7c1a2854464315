//! How the service reaches the network: one trust store and one proxy decision for every
//! outgoing connection (OpenAPI over reqwest, the long connection, PostgreSQL).
//!
//! [`Net`] is built once at start from the configuration and handed to each client, so the
//! platform, a company CA and a corporate proxy are treated the same on every path, and the
//! path the tests take (the sandbox over TLS) is the one production takes.

mod dial;
pub mod postgres;
pub mod proxy;
pub mod tls;

use std::path::PathBuf;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};

pub use dial::{dial_websocket, DialError, WsStream};
pub use proxy::{NoProxy, ProxyConfig};
pub use tls::{Trust, TrustOptions};

/// Why the network settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// An operator CA file or directory cannot be used.
    #[error("CA certificates {path}: {reason}")]
    CaFile {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The proxy setting cannot be used (never contains its credentials).
    #[error("proxy: {0}")]
    Proxy(String),
    /// The TLS stack could not be set up.
    #[error("{0}")]
    Tls(String),
}

/// What [`Net`] is built from.
#[derive(Clone, Default)]
pub struct NetOptions {
    /// Extra CAs.
    pub trust: TrustOptions,
    /// Proxy URL (may hold credentials).
    pub proxy: Option<SecretString>,
    /// `NO_PROXY` list.
    pub no_proxy: Option<String>,
}

impl std::fmt::Debug for NetOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetOptions")
            .field("trust", &self.trust)
            .field("proxy", &self.proxy.as_ref().map(|_| "<set>"))
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

struct Inner {
    trust: Trust,
    proxy: Option<ProxyConfig>,
    /// For reqwest: ALPN h2 and HTTP/1.1.
    http_tls: rustls::ClientConfig,
    /// For the WebSocket (HTTP/1.1 upgrade).
    ws_tls: Arc<rustls::ClientConfig>,
}

/// The shared network configuration. Cheap to clone.
#[derive(Clone)]
pub struct Net {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("extra_cas", &self.inner.trust.extra)
            .field(
                "proxy",
                &self.inner.proxy.as_ref().map(ProxyConfig::display),
            )
            .finish()
    }
}

impl Net {
    /// Loads the CAs and parses the proxy.
    pub fn new(opts: &NetOptions) -> Result<Self, NetError> {
        let trust = Trust::load(&opts.trust)?;
        let proxy = opts
            .proxy
            .as_ref()
            .map(|p| p.expose_secret().trim().to_owned())
            .filter(|p| !p.is_empty())
            .map(|p| ProxyConfig::parse(&p, opts.no_proxy.as_deref()))
            .transpose()?;
        Self::with_trust(trust, proxy)
    }

    fn with_trust(trust: Trust, proxy: Option<ProxyConfig>) -> Result<Self, NetError> {
        let http_tls = trust.client_config(&[b"h2", b"http/1.1"])?;
        let ws_tls = Arc::new(trust.client_config(&[b"http/1.1"])?);
        Ok(Self {
            inner: Arc::new(Inner {
                trust,
                proxy,
                http_tls,
                ws_tls,
            }),
        })
    }

    /// Operator CAs on top of the built-in roots.
    #[must_use]
    pub fn extra_cas(&self) -> usize {
        self.inner.trust.extra
    }

    /// The proxy, if one is configured.
    #[must_use]
    pub fn proxy(&self) -> Option<&ProxyConfig> {
        self.inner.proxy.as_ref()
    }

    /// A reqwest builder on this trust and proxy (callers add timeouts and the like).
    pub fn http_client_builder(&self) -> reqwest::ClientBuilder {
        let b = reqwest::Client::builder()
            .use_preconfigured_tls(self.inner.http_tls.clone())
            .no_proxy();
        match self.inner.proxy.clone() {
            Some(p) => b.proxy(reqwest::Proxy::custom(move |url| {
                let host = url.host_str()?;
                let port = url.port_or_known_default()?;
                p.for_target(host, port).cloned()
            })),
            None => b,
        }
    }

    /// A rustls connector for PostgreSQL on this trust.
    pub fn postgres_tls(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, NetError> {
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(
            self.inner.trust.client_config(&[])?,
        ))
    }

    pub(crate) fn ws_tls(&self) -> Arc<rustls::ClientConfig> {
        self.inner.ws_tls.clone()
    }
}

/// If reqwest failed because the server's certificate is not trusted: words naming its host and
/// how to add a CA.
#[must_use]
pub fn untrusted_http_error(e: &reqwest::Error) -> Option<String> {
    let host = e
        .url()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_else(|| "the server".to_owned());
    tls::untrusted_certificate(e, &host)
}

/// Words for a failed HTTP request: an untrusted certificate names the host and how to add a
/// CA; anything else is reqwest's message with the URL (it may carry query secrets) replaced by
/// its host.
#[must_use]
pub fn describe_http_error(e: &reqwest::Error) -> String {
    untrusted_http_error(e).unwrap_or_else(|| {
        let mut msg = e.to_string();
        if let Some(u) = e.url() {
            msg = msg.replace(u.as_str(), u.host_str().unwrap_or("the server"));
        }
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        msg
    })
}
