//! Trust: which certificate authorities the service accepts for every outgoing TLS connection.
//!
//! One root store serves the OpenAPI client, the long connection and PostgreSQL. It holds
//! Mozilla's roots compiled into the binary (`webpki-roots`), so the service verifies the
//! platform the same way on every host whatever its `ca-certificates` package holds, plus the
//! operator's CAs: `tls.ca_file` (`TLS_CA_FILE`), `SSL_CERT_FILE` and every file in each
//! `SSL_CERT_DIR` directory (the OpenSSL/curl convention). An operator CA that cannot be read
//! stops the start: trusting less than asked for, silently, would look like a network fault later.
//!
//! Nothing here can turn verification off.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

use super::NetError;

/// Where extra CAs come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustOptions {
    /// PEM files, each holding one or more CA certificates (`tls.ca_file`, `SSL_CERT_FILE`).
    pub ca_files: Vec<PathBuf>,
    /// Directories whose files are PEM CA certificates (`SSL_CERT_DIR`, `:`-separated).
    pub ca_dirs: Vec<PathBuf>,
}

/// The loaded trust: the root store and what it was built from (for messages).
#[derive(Debug, Clone)]
pub struct Trust {
    pub(crate) roots: Arc<RootCertStore>,
    /// Operator CAs added on top of the built-in roots.
    pub extra: usize,
}

impl Trust {
    /// Mozilla's roots plus the operator's CAs.
    pub fn load(opts: &TrustOptions) -> Result<Self, NetError> {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let mut extra = 0;
        // An OpenSSL hashed directory links each certificate twice (`<hash>.0` and its
        // `.pem`): read each real file once.
        let mut read = std::collections::HashSet::new();
        for f in &opts.ca_files {
            extra += add_pem_file(&mut roots, f, true)?;
        }
        for d in &opts.ca_dirs {
            let entries = std::fs::read_dir(d).map_err(|e| NetError::CaFile {
                path: d.clone(),
                reason: format!("cannot read the directory: {e}"),
            })?;
            let mut files: Vec<PathBuf> =
                entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            files.sort();
            for f in files.iter().filter(|f| f.is_file()) {
                if !read.insert(std::fs::canonicalize(f).unwrap_or_else(|_| f.clone())) {
                    continue;
                }
                // An OpenSSL hashed directory also holds CRLs and other files: skip what holds
                // no certificate, but a certificate that does not parse is an error.
                extra += add_pem_file(&mut roots, f, false)?;
            }
        }
        Ok(Self {
            roots: Arc::new(roots),
            extra,
        })
    }

    /// A client configuration on these roots, advertising `alpn`.
    pub(crate) fn client_config(&self, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, NetError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| NetError::Tls(format!("TLS setup: {e}")))?
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(cfg)
    }
}

/// Adds the certificates of one PEM file; returns how many. `required`: a file with no
/// certificate is an error (an explicitly named file), not skipped (a directory entry).
fn add_pem_file(roots: &mut RootCertStore, path: &Path, required: bool) -> Result<usize, NetError> {
    let err = |reason: String| NetError::CaFile {
        path: path.to_owned(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read it: {e}")))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return if required {
            Err(err(
                "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_owned(),
            ))
        } else {
            Ok(0)
        };
    }
    let n = certs.len();
    for c in certs {
        roots
            .add(c)
            .map_err(|e| err(format!("a certificate in it is not a usable CA: {e}")))?;
    }
    Ok(n)
}

/// The advice attached to an untrusted-certificate error.
pub const ADD_CA_HINT: &str = "if a company CA re-signs TLS on this network, add it with tls.ca_file (TLS_CA_FILE) or SSL_CERT_FILE / SSL_CERT_DIR";

/// If `err` (or anything it wraps) is rustls refusing the peer's certificate, says so in words
/// that name `host` and how to add a CA.
#[must_use]
pub fn untrusted_certificate(
    err: &(dyn std::error::Error + 'static),
    host: &str,
) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(rustls::Error::InvalidCertificate(why)) = e.downcast_ref::<rustls::Error>() {
            return Some(format!(
                "the TLS certificate of {host} is not trusted ({}); {ADD_CA_HINT}",
                describe(why)
            ));
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(s) = untrusted_certificate(inner, host) {
                    return Some(s);
                }
            }
        }
        cur = e.source();
    }
    None
}

fn describe(e: &rustls::CertificateError) -> String {
    match e {
        rustls::CertificateError::UnknownIssuer => "issued by an unknown CA".to_owned(),
        rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. } => {
            "expired".to_owned()
        }
        rustls::CertificateError::NotValidForName
        | rustls::CertificateError::NotValidForNameContext { .. } => {
            "not valid for this host name".to_owned()
        }
        other => format!("{other:?}"),
    }
}
