//! A webhook receiver served over TLS (its own throwaway CA, which the service trusts with
//! `TLS_CA_FILE` beside the sandbox's, as an operator trusts a company CA): it records every
//! request it answers, and can be told to answer 503 to the next requests (`fail_next`) or to
//! hold requests until released (`held`). What `webhooks` and `pg_webhooks` deliver to.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use lark_service::sandbox::Sandbox;
use lark_service::webhooks::{EVENT_ID_HEADER, EVENT_TYPE_HEADER, SIGNATURE_HEADER};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::trust_sandbox;

/// One request the receiver answered.
#[derive(Clone, Debug)]
pub struct Got {
    /// What the receiver answered.
    pub status: u16,
    pub signature: String,
    pub event_id_header: String,
    pub event_type_header: String,
    pub body: Vec<u8>,
}

impl Got {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// The receiver's record and its switches; clones share them.
#[derive(Clone, Default)]
pub struct Receiver {
    got: Arc<Mutex<Vec<Got>>>,
    /// Answer 503 to this many requests first.
    pub fail_next: Arc<AtomicU32>,
    /// While set, a request waits (counted in `waiting`) and is answered once released, if
    /// its sender is still there.
    pub held: Arc<AtomicBool>,
    pub waiting: Arc<Mutex<u32>>,
}

impl Receiver {
    /// Every request answered, in order, whatever the answer.
    pub fn all(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// The requests answered 2xx, by the event id of their body.
    pub fn accepted(&self) -> BTreeMap<String, Vec<Got>> {
        let mut m: BTreeMap<String, Vec<Got>> = BTreeMap::new();
        for g in self.all().into_iter().filter(|g| g.status == 200) {
            m.entry(g.json()["event_id"].as_str().unwrap().to_owned())
                .or_default()
                .push(g);
        }
        m
    }

    /// Every request answered, by its event id header.
    pub fn by_id(&self) -> BTreeMap<String, Vec<Got>> {
        let mut m: BTreeMap<String, Vec<Got>> = BTreeMap::new();
        for g in self.all() {
            m.entry(g.event_id_header.clone()).or_default().push(g);
        }
        m
    }

    /// `(type, open_id)` of every distinct event answered, sorted.
    pub fn kinds(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .by_id()
            .values()
            .map(|g| {
                let j = g[0].json();
                (
                    j["type"].as_str().unwrap().to_owned(),
                    j["open_id"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        v.sort();
        v
    }
}

async fn hook(
    State(r): State<Receiver>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    if r.held.load(Ordering::SeqCst) {
        *r.waiting.lock().unwrap() += 1;
        while r.held.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let fail = r
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let status = if fail {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    r.got.lock().unwrap().push(Got {
        status: status.as_u16(),
        signature: h(SIGNATURE_HEADER),
        event_id_header: h(EVENT_ID_HEADER),
        event_type_header: h(EVENT_TYPE_HEADER),
        body: body.to_vec(),
    });
    status
}

/// A throwaway CA (its PEM) and a TLS acceptor for 127.0.0.1 signed by it.
pub fn receiver_tls() -> (String, TlsAcceptor) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf_cert.der().clone()], key)
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    (ca_cert.pem(), TlsAcceptor::from(Arc::new(cfg)))
}

/// Serves `r` over TLS at `https://{addr}/hook` until the returned handle is aborted (or the
/// runtime ends).
pub async fn serve_receiver(
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    r: Receiver,
) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind(addr).await.unwrap();
    let app = axum::Router::new().route("/hook", post(hook)).with_state(r);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let app = app.clone();
                        async move {
                            use tower::ServiceExt;
                            app.oneshot(req.map(axum::body::Body::new)).await
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    })
}

/// Both CAs the service must trust, the sandbox's and the receiver's, in one file in `dir`;
/// returns its path for `TLS_CA_FILE`.
pub fn trust_both(dir: &std::path::Path, sandbox: &Sandbox, receiver_ca: &str) -> String {
    let sandbox_ca = trust_sandbox(dir, sandbox).unwrap();
    let both = dir.join("cas.pem");
    let mut pem = std::fs::read_to_string(sandbox_ca).unwrap();
    pem.push_str(receiver_ca);
    std::fs::write(&both, pem).unwrap();
    both.display().to_string()
}
