//! Dialing the long connection: TCP (directly or through an HTTP `CONNECT` tunnel), then TLS
//! for `wss://` with the shared trust, then the WebSocket upgrade.
//!
//! Each phase fails with its own error, so a log line and `/readyz` say whether the proxy, the
//! certificate or the platform refused us. `ws://` stays available for local fakes.

use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::Net;

/// The connected WebSocket.
pub type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long each of TCP connect, proxy tunnel, TLS and upgrade may take.
const PHASE_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest proxy response head we read.
const MAX_PROXY_HEAD: usize = 16 * 1024;

/// Why the dial failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The URL is not a `ws://` / `wss://` URL with a host.
    #[error("websocket URL: {0}")]
    Url(String),
    /// TCP connect to the host or the proxy failed.
    #[error("connecting to {target}: {reason}")]
    Connect {
        /// `host:port` (the proxy's, when one is used).
        target: String,
        /// Cause.
        reason: String,
    },
    /// The proxy refused or broke the tunnel.
    #[error("proxy {proxy} refused the tunnel to {target}: {reason}")]
    Proxy {
        /// The proxy, without credentials.
        proxy: String,
        /// `host:port` asked for.
        target: String,
        /// Status line or cause.
        reason: String,
    },
    /// The server's certificate is not trusted (names the host and how to add a CA).
    #[error("{0}")]
    Untrusted(String),
    /// Another TLS failure.
    #[error("TLS with {host}: {reason}")]
    Tls {
        /// Host.
        host: String,
        /// Cause.
        reason: String,
    },
    /// The WebSocket upgrade failed; `Http` carries the platform's refusal.
    #[error("websocket handshake: {0}")]
    Handshake(#[source] Box<tungstenite::Error>),
    /// A phase took longer than its limit.
    #[error("{phase} timed out after {secs} s")]
    Timeout {
        /// Which phase.
        phase: &'static str,
        /// The limit.
        secs: u64,
    },
}

async fn phase<T>(
    name: &'static str,
    f: impl std::future::Future<Output = Result<T, DialError>>,
) -> Result<T, DialError> {
    tokio::time::timeout(PHASE_TIMEOUT, f)
        .await
        .map_err(|_| DialError::Timeout {
            phase: name,
            secs: PHASE_TIMEOUT.as_secs(),
        })?
}

/// Dials `url` (`ws://` or `wss://`) with `net`'s trust and proxy. Nagle is off: ACKs are
/// small and must leave at once.
pub async fn dial_websocket(
    net: &Net,
    url: &str,
) -> Result<(WsStream, tungstenite::handshake::client::Response), DialError> {
    let parsed = url::Url::parse(url).map_err(|e| DialError::Url(e.to_string()))?;
    let tls = match parsed.scheme() {
        "wss" => true,
        "ws" => false,
        other => {
            return Err(DialError::Url(format!(
                "scheme {other}:// is not ws:// or wss://"
            )))
        }
    };
    let host = parsed
        .host_str()
        .ok_or_else(|| DialError::Url("no host".to_owned()))?
        .to_owned();
    let port = parsed
        .port_or_known_default()
        .ok_or_else(|| DialError::Url("no port".to_owned()))?;
    // The name as it goes on the wire: IPv6 literals keep their brackets in `host:port`.
    let bare_host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let target = if bare_host.contains(':') {
        format!("[{bare_host}]:{port}")
    } else {
        format!("{bare_host}:{port}")
    };
    let proxy = net
        .proxy()
        .filter(|p| p.for_target(&bare_host, port).is_some());
    let tcp = match proxy {
        Some(p) => {
            let (ph, pp) = p.authority();
            let shown = p.display();
            let mut tcp = phase("proxy connect", connect(&ph, pp)).await?;
            phase(
                "proxy tunnel",
                tunnel(&mut tcp, &target, p.basic_auth(), &shown),
            )
            .await?;
            tcp
        }
        None => phase("connect", connect(&bare_host, port)).await?,
    };
    let stream = if tls {
        let name = ServerName::try_from(bare_host.clone()).map_err(|e| {
            DialError::Url(format!("{bare_host} is not a valid TLS server name: {e}"))
        })?;
        let connector = tokio_rustls::TlsConnector::from(net.ws_tls());
        let tls =
            phase("TLS handshake", async {
                connector.connect(name, tcp).await.map_err(|e| {
                    match super::tls::untrusted_certificate(&e, &bare_host) {
                        Some(msg) => DialError::Untrusted(msg),
                        None => DialError::Tls {
                            host: bare_host.clone(),
                            reason: e.to_string(),
                        },
                    }
                })
            })
            .await?;
        MaybeTlsStream::Rustls(tls)
    } else {
        MaybeTlsStream::Plain(tcp)
    };
    phase("websocket upgrade", async {
        tokio_tungstenite::client_async_with_config(url, stream, None)
            .await
            .map_err(|e| DialError::Handshake(Box::new(e)))
    })
    .await
}

async fn connect(host: &str, port: u16) -> Result<TcpStream, DialError> {
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| DialError::Connect {
            target: format!("{host}:{port}"),
            reason: e.to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// `CONNECT target` on an open connection to the proxy; Ok once it answers 2xx.
async fn tunnel(
    tcp: &mut TcpStream,
    target: &str,
    auth: Option<String>,
    shown: &str,
) -> Result<(), DialError> {
    let err = |reason: String| DialError::Proxy {
        proxy: shown.to_owned(),
        target: target.to_owned(),
        reason,
    };
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(a) = auth {
        req.push_str("Proxy-Authorization: ");
        req.push_str(&a);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes())
        .await
        .map_err(|e| err(format!("writing CONNECT: {e}")))?;
    // Read the response head byte by byte: nothing past it may be consumed (TLS follows).
    let mut head = Vec::with_capacity(256);
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_PROXY_HEAD {
            return Err(err("response head too long".to_owned()));
        }
        let n = tcp
            .read(&mut b)
            .await
            .map_err(|e| err(format!("reading the answer: {e}")))?;
        if n == 0 {
            return Err(err("the proxy closed the connection".to_owned()));
        }
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head);
    let status_line = text.lines().next().unwrap_or_default().trim().to_owned();
    let code = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| err(format!("not an HTTP answer: {status_line:?}")))?;
    if (200..300).contains(&code) {
        Ok(())
    } else if code == 407 {
        Err(err(format!(
            "{status_line} (the proxy needs credentials: put them in network.proxy / HTTPS_PROXY as http://user:password@host:port)"
        )))
    } else {
        Err(err(status_line))
    }
}
