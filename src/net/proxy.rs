//! Which outgoing connections go through an HTTP proxy, by curl's rules.
//!
//! The proxy comes from `network.proxy` or the environment (`https_proxy`, `HTTPS_PROXY`,
//! `all_proxy`, `ALL_PROXY`; see the settings catalogue) and applies to everything the service
//! dials: OpenAPI calls (through reqwest) and the long connection (an HTTP `CONNECT` tunnel,
//! then TLS inside). `NO_PROXY` exempts hosts as curl does: `*` exempts all; each other entry
//! is a host name that matches itself and its subdomains (a leading `.` is ignored), an IP
//! address, or an IP network in CIDR notation; an entry may carry `:port`.
//!
//! Only `http://` proxies are supported (the common corporate case); any other scheme is refused
//! at start rather than ignored. Credentials in the proxy URL are secrets: `Debug` and every
//! message show the proxy without them.

use std::net::IpAddr;

use url::Url;

use super::NetError;

/// The proxy and its exemptions.
#[derive(Clone)]
pub struct ProxyConfig {
    url: Url,
    no_proxy: NoProxy,
}

impl std::fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyConfig")
            .field("proxy", &self.display())
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

impl ProxyConfig {
    /// Parses the proxy URL (`http://[user:password@]host[:port]`; a bare `host:port` is taken
    /// as `http://`) and the `NO_PROXY` list.
    pub fn parse(proxy: &str, no_proxy: Option<&str>) -> Result<Self, NetError> {
        let text = proxy.trim();
        let with_scheme = if text.contains("://") {
            text.to_owned()
        } else {
            format!("http://{text}")
        };
        // Never echo the input: it may hold a password.
        let url = Url::parse(&with_scheme)
            .map_err(|e| NetError::Proxy(format!("the proxy is not a URL ({e})")))?;
        if url.scheme() != "http" {
            return Err(NetError::Proxy(format!(
                "proxy scheme {}:// is not supported; use an http:// proxy (HTTP CONNECT)",
                url.scheme()
            )));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(NetError::Proxy("the proxy URL has no host".to_owned()));
        }
        Ok(Self {
            url,
            no_proxy: NoProxy::parse(no_proxy.unwrap_or("")),
        })
    }

    /// The proxy for a connection to `host:port`, or `None` when `NO_PROXY` exempts it.
    #[must_use]
    pub fn for_target(&self, host: &str, port: u16) -> Option<&Url> {
        (!self.no_proxy.exempts(host, port)).then_some(&self.url)
    }

    /// The proxy's `host:port` to dial.
    #[must_use]
    pub fn authority(&self) -> (String, u16) {
        (
            self.url.host_str().unwrap_or_default().to_owned(),
            self.url.port_or_known_default().unwrap_or(80),
        )
    }

    /// `Proxy-Authorization` header value for credentials in the URL, if any.
    #[must_use]
    pub fn basic_auth(&self) -> Option<String> {
        use base64::Engine as _;
        if self.url.username().is_empty() && self.url.password().is_none() {
            return None;
        }
        let dec = percent_decode;
        let raw = format!(
            "{}:{}",
            dec(self.url.username()),
            dec(self.url.password().unwrap_or(""))
        );
        Some(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        ))
    }

    /// The proxy as shown in logs: scheme, host and port, never credentials.
    #[must_use]
    pub fn display(&self) -> String {
        let (host, port) = self.authority();
        let creds = if self.basic_auth().is_some() {
            "<credentials>@"
        } else {
            ""
        };
        format!("http://{creds}{host}:{port}")
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(Ok(v)) = s.get(i + 1..i + 3).map(|h| u8::from_str_radix(h, 16)) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `NO_PROXY`, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy {
    all: bool,
    rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    /// A host name (lowercase, no leading dot): itself and its subdomains.
    Domain(String, Option<u16>),
    /// One address.
    Ip(IpAddr, Option<u16>),
    /// A network.
    Cidr(IpAddr, u8),
}

impl NoProxy {
    /// Parses a comma- (or space-) separated list.
    #[must_use]
    pub fn parse(list: &str) -> Self {
        let mut out = Self::default();
        for raw in list
            .split([',', ' ', '\t'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            if raw == "*" {
                out.all = true;
                continue;
            }
            if let Some((net, bits)) = raw.split_once('/') {
                if let (Ok(ip), Ok(bits)) = (net.parse::<IpAddr>(), bits.parse::<u8>()) {
                    let max = if ip.is_ipv4() { 32 } else { 128 };
                    if bits <= max {
                        out.rules.push(Rule::Cidr(ip, bits));
                    }
                }
                continue;
            }
            // [v6]:port, [v6], v4:port, host:port, bare v6.
            let (host, port) = split_host_port(raw);
            let host = host.trim_start_matches('.').to_ascii_lowercase();
            if host.is_empty() {
                continue;
            }
            match host.parse::<IpAddr>() {
                Ok(ip) => out.rules.push(Rule::Ip(ip, port)),
                Err(_) => out.rules.push(Rule::Domain(host, port)),
            }
        }
        out
    }

    /// Whether a connection to `host:port` bypasses the proxy.
    #[must_use]
    pub fn exempts(&self, host: &str, port: u16) -> bool {
        if self.all {
            return true;
        }
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let host = host.trim_end_matches('.');
        let ip = host.parse::<IpAddr>().ok();
        let port_ok = |p: &Option<u16>| p.is_none_or(|p| p == port);
        self.rules.iter().any(|r| match r {
            Rule::Domain(d, p) => {
                port_ok(p)
                    && (host == d
                        || (host.len() > d.len()
                            && host.ends_with(d.as_str())
                            && host.as_bytes()[host.len() - d.len() - 1] == b'.'))
            }
            Rule::Ip(a, p) => port_ok(p) && ip == Some(*a),
            Rule::Cidr(net, bits) => ip.is_some_and(|ip| in_network(ip, *net, *bits)),
        })
    }
}

fn split_host_port(s: &str) -> (&str, Option<u16>) {
    if let Some(rest) = s.strip_prefix('[') {
        if let Some((h, after)) = rest.split_once(']') {
            return (h, after.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    if s.matches(':').count() == 1 {
        if let Some((h, p)) = s.split_once(':') {
            if let Ok(p) = p.parse() {
                return (h, Some(p));
            }
        }
    }
    (s, None)
}

fn in_network(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(bits))
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(bits))
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_proxy_follows_curl() {
        let n = NoProxy::parse("localhost, .corp.example.com,10.0.0.0/8 ,192.168.1.5:8443,[::1]");
        assert!(n.exempts("localhost", 443));
        assert!(n.exempts("LOCALHOST", 443));
        assert!(n.exempts("corp.example.com", 443));
        assert!(n.exempts("a.corp.example.com", 443));
        assert!(!n.exempts("xcorp.example.com", 443));
        assert!(n.exempts("10.2.3.4", 80));
        assert!(!n.exempts("11.2.3.4", 80));
        assert!(n.exempts("192.168.1.5", 8443));
        assert!(!n.exempts("192.168.1.5", 443));
        assert!(n.exempts("[::1]", 1));
        assert!(n.exempts("::1", 1));
        assert!(!n.exempts("open.feishu.cn", 443));
        assert!(NoProxy::parse("*").exempts("anything", 1));
        assert!(!NoProxy::parse("").exempts("anything", 1));
        assert!(!NoProxy::parse("feishu.cn").exempts("larksuite.com", 443));
        assert!(NoProxy::parse("feishu.cn").exempts("open.feishu.cn", 443));
    }

    #[test]
    fn proxy_url_forms_and_secrets() {
        let p =
            ProxyConfig::parse("http://u%40x:p%3Ass@proxy.corp:3128", Some("localhost")).unwrap();
        assert_eq!(p.authority(), ("proxy.corp".to_owned(), 3128));
        use base64::Engine as _;
        let auth = p.basic_auth().unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.strip_prefix("Basic ").unwrap())
            .unwrap();
        assert_eq!(raw, b"u@x:p:ss");
        let shown = format!("{p:?} {}", p.display());
        assert!(
            !shown.contains("p%3Ass") && !shown.contains("p:ss"),
            "{shown}"
        );
        assert!(p.for_target("localhost", 1).is_none());
        assert!(p.for_target("open.feishu.cn", 443).is_some());
        let bare = ProxyConfig::parse("proxy:8080", None).unwrap();
        assert_eq!(bare.authority(), ("proxy".to_owned(), 8080));
        assert!(bare.basic_auth().is_none());
        let e = ProxyConfig::parse("socks5://u:secretpw@h:1080", None).unwrap_err();
        assert!(e.to_string().contains("socks5") && !e.to_string().contains("secretpw"));
        let e = ProxyConfig::parse("http://u:secretpw@", None).unwrap_err();
        assert!(!e.to_string().contains("secretpw"), "{e}");
    }
}
