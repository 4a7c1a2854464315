//! A real browser drives the sandbox flow: headless Debian Chromium, through chromedriver
//! (WebDriver, `fantoccini`), opens the sandbox page, presses "Ask Alice to authorize", then the
//! card's Authorize button, then Approve on the consent page; the service's token API then hands
//! out Alice's token. A failing step leaves a screenshot and the page source in
//! `target/browser-failures/`.
//!
//! Needs `chromium`, `chromium-driver` and `libnss3-tools` (certutil); `.ci/run` installs them.
//! Without them these tests FAIL, unless `LARK_SKIP_BROWSER_TESTS=1` says to skip them.
//!
//! When the sandbox serves HTTPS, the browser trusts its CA honestly: Chromium runs with a fresh
//! `HOME` whose NSS database (`$HOME/.pki/nssdb`) holds the CA ([`trust_ca`]); no flag that
//! ignores certificate errors is ever passed, and the session asks `acceptInsecureCerts: false`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test fails by panicking

mod common;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::FutureExt;
use lark_service::sandbox::{Sandbox, SandboxOptions};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Set to `1` to skip the browser tests on a machine without Chromium (CI installs it).
const SKIP_ENV: &str = "LARK_SKIP_BROWSER_TESTS";
const ALICE: &str = "ou_sandbox_alice";
/// Bound on any one wait for the browser (a broken run fails instead of hanging).
const STEP: Duration = Duration::from_secs(30);

/// Chromium's flags, besides a fresh `--user-data-dir`.
const CHROMIUM_FLAGS: [&str; 8] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

/// The sandbox's CA certificate (PEM) that the browser must trust (it serves HTTPS).
fn sandbox_ca_pem(sandbox: &Sandbox) -> Option<String> {
    sandbox.ca_pem()
}

/// Whether the browser tests run: `true` when Chromium, chromedriver and certutil are all
/// installed; `false` only when they are not and `LARK_SKIP_BROWSER_TESTS=1`; panics otherwise.
fn browser_tools() -> bool {
    let mut missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if Command::new("certutil")
        .arg("-H")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        missing.push("certutil");
    }
    if missing.is_empty() {
        return true;
    }
    if std::env::var(SKIP_ENV).as_deref() == Ok("1") {
        eprintln!("browser tests SKIPPED ({SKIP_ENV}=1): missing {missing:?}");
        return false;
    }
    panic!(
        "the browser tests need {missing:?}: apt-get install chromium chromium-driver \
         libnss3-tools (.ci/run does), or set {SKIP_ENV}=1 to skip them"
    );
}

fn run_certutil(args: &[&str]) -> Result<String, String> {
    let out = Command::new("certutil")
        .args(args)
        .output()
        .map_err(|e| format!("running certutil: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("certutil {args:?} failed ({}): {text}", out.status))
    }
}

/// Makes a Chromium that runs with `HOME=home` trust `ca_pem` for TLS servers: a new NSS
/// database at `$HOME/.pki/nssdb` (no password) holding the CA, trusted to issue server
/// certificates (`C,,`).
fn trust_ca(home: &Path, ca_pem: &str) -> Result<(), String> {
    let db_dir = home.join(".pki/nssdb");
    std::fs::create_dir_all(&db_dir).map_err(|e| format!("creating {}: {e}", db_dir.display()))?;
    let ca = home.join("sandbox-ca.pem");
    std::fs::write(&ca, ca_pem).map_err(|e| format!("writing {}: {e}", ca.display()))?;
    let db = format!("sql:{}", db_dir.display());
    run_certutil(&["-N", "-d", &db, "--empty-password"])?;
    run_certutil(&[
        "-A",
        "-d",
        &db,
        "-t",
        "C,,",
        "-n",
        "lark-sandbox",
        "-i",
        &ca.display().to_string(),
    ])?;
    Ok(())
}

/// Headless Chromium under chromedriver, with its own `HOME` and profile.
struct Browser {
    client: Option<Client>,
    driver: Child,
    home: PathBuf,
}

impl Browser {
    /// Starts chromedriver with `HOME=home` and opens a session.
    async fn start(home: &Path) -> Self {
        let port = free_port();
        let log = std::fs::File::create(home.join("chromedriver.log")).unwrap();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", home)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting chromedriver");
        let mut b = Self {
            client: None,
            driver,
            home: home.to_owned(),
        };
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + STEP;
        loop {
            let ready = http
                .get(format!("{url}/status"))
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success());
            if ready.is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not answer on {url}: {}",
                b.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|f| (*f).to_owned()).collect();
        args.push(format!(
            "--user-data-dir={}",
            home.join("profile").display()
        ));
        args.push("--window-size=1200,1000".to_owned());
        let caps = json!({
            "browserName": "chrome",
            "acceptInsecureCerts": false,
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("opening a Chromium session: {e}\n{}", b.log()));
        b.client = Some(client);
        b
    }

    fn c(&self) -> &Client {
        self.client.as_ref().expect("a session")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.home.join("chromedriver.log")).unwrap_or_default()
    }

    /// Ends the session (Chromium exits) and stops chromedriver.
    async fn quit(mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.close().await;
        }
    }

    /// Runs `steps`; if they panic, saves a screenshot and the page source to
    /// `target/browser-failures/NAME-*.{png,html}` first, then fails with the panic.
    async fn steps<F: Future<Output = ()>>(&self, name: &str, steps: F) {
        if let Err(panic) = AssertUnwindSafe(steps).catch_unwind().await {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
                .parent()
                .unwrap_or(Path::new("target"))
                .join("browser-failures");
            let _ = std::fs::create_dir_all(&dir);
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let base = dir.join(format!("{name}-{stamp}"));
            if let Ok(png) = self.c().screenshot().await {
                let _ = std::fs::write(base.with_extension("png"), png);
            }
            if let Ok(src) = self.c().source().await {
                let _ = std::fs::write(base.with_extension("html"), src);
            }
            let url = self.c().current_url().await.map(|u| u.to_string());
            eprintln!(
                "browser step failed at {url:?}; screenshot and source: {}.{{png,html}}",
                base.display()
            );
            // End the session so that Chromium exits with the test.
            let _ = self.c().clone().close().await;
            std::panic::resume_unwind(panic);
        }
    }

    /// Finds the element at `xpath` and clicks it, retrying while it is not there (yet).
    async fn click(&self, xpath: &str) {
        let deadline = Instant::now() + STEP;
        loop {
            let err = match self.c().find(Locator::XPath(xpath)).await {
                Ok(e) => match e.click().await {
                    Ok(()) => return,
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            assert!(Instant::now() < deadline, "cannot click {xpath}: {err}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the page's source satisfies `ok`; returns it.
    async fn until_source(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + STEP;
        loop {
            if let Ok(src) = self.c().source().await {
                if ok(&src) {
                    return src;
                }
            }
            assert!(Instant::now() < deadline, "the page never showed {what}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// The sandbox (with its page wired to the service's admin API) and the service beside it.
async fn sandbox_and_service() -> (Sandbox, Service) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    // The page calls the admin API, on the admin listener.
    let service = format!("http://{}", admin.local_addr().unwrap());
    let sandbox = Sandbox::start(SandboxOptions {
        request_auth_url: Some(format!("{service}/api/v1/auth/requests")),
        service_url: Some(service.clone()),
        admin_token: Some(ADMIN.to_owned()),
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = trust_sandbox(dir.path(), &sandbox).expect("the sandbox serves HTTPS");
    let svc = Service::start_on_both(
        dir,
        listener,
        admin,
        &sandbox.base_url(),
        &[("TLS_CA_FILE", &ca)],
    )
    .await;
    (sandbox, svc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_authorizes_alice_through_the_sandbox_page() {
    if !browser_tools() {
        return;
    }
    let (sandbox, svc) = sandbox_and_service().await;
    let home = tempfile::tempdir().unwrap();
    // The page is HTTPS; the browser trusts the sandbox CA as a person's would a company CA.
    assert!(sandbox.base_url().starts_with("https://"));
    let pem = sandbox_ca_pem(&sandbox).expect("the sandbox serves HTTPS");
    trust_ca(home.path(), &pem).unwrap();
    let browser = Browser::start(home.path()).await;
    browser
        .steps("authorize-alice", async {
            let c = browser.c();
            c.goto(&format!("{}/", sandbox.base_url())).await.unwrap();
            browser
                .click("//button[normalize-space(.)='Ask Alice (sandbox) to authorize']")
                .await;
            // The service sends the card; the page shows it with its Authorize button.
            browser
                .click("//div[@class='card'][.//div[@class='title' and .='Authorization required']]//a[normalize-space(.)='Authorize']")
                .await;
            // The consent page, signed in as Alice.
            let consent = browser
                .until_source("the consent page", |s| s.contains("Authorize the app?"))
                .await;
            assert!(
                consent.contains(&format!("<option value=\"{ALICE}\" selected=\"\">")),
                "{consent}"
            );
            browser.click("//button[@value='approve']").await;
            browser
                .until_source("the service's callback page", |s| {
                    s.contains("Authorization complete")
                })
                .await;
            let landed = c.current_url().await.unwrap();
            assert_eq!(landed.path(), "/oauth/callback", "{landed}");
            assert_eq!(
                landed.port(),
                Some(svc.http.port()),
                "the browser landed on the service"
            );

            // The service completed the session: the token API hands out Alice's token.
            let (code, body) = svc.get(&format!("/api/v1/users/{ALICE}/token")).await;
            assert_eq!(code, 200, "{body}");
            let t: Value = serde_json::from_str(&body).unwrap();
            let token = t["access_token"].as_str().unwrap();
            assert_eq!(sandbox.token_owner(token).as_deref(), Some(ALICE));

            // Back on the sandbox page: the session is completed and the token stored.
            c.goto(&format!("{}/", sandbox.base_url())).await.unwrap();
            browser
                .until_source("Alice's completed session and stored token", |s| {
                    s.split("id=\"status-ou_sandbox_alice\"")
                        .nth(1)
                        .and_then(|x| x.split("</div></div>").next())
                        .is_some_and(|x| {
                            x.contains("<b class=\"state\">completed</b>")
                                && x.contains("token stored")
                        })
                })
                .await;
        })
        .await;
    browser.quit().await;
    svc.stop().await;
}

/// A CA generated here: its PEM, and a server certificate for 127.0.0.1 it issued (DER) with
/// that certificate's key (PKCS#8 DER).
fn test_ca() -> (String, Vec<u8>, Vec<u8>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "lark-service browser-test CA");
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(params, &ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "127.0.0.1");
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf.signed_by(&leaf_key, &issuer).unwrap();
    (ca.pem(), leaf.der().to_vec(), leaf_key.serialize_der())
}

/// Serves one small HTML page over HTTPS on 127.0.0.1 with `cert`; returns its URL.
async fn https_page(cert: Vec<u8>, key: Vec<u8>) -> String {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(cert)],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut req = Vec::new();
                let mut buf = [0u8; 2048];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let body = "<!doctype html><title>trusted</title><p id=ok>served over TLS</p>";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    url
}

/// What Chromium with `HOME=home` shows at `url`: the page's title.
async fn title_at(home: &Path, url: &str) -> String {
    let browser = Browser::start(home).await;
    let mut title = String::new();
    browser
        .steps("tls-trust", async {
            browser.c().goto(url).await.unwrap();
            title = browser.c().title().await.unwrap();
        })
        .await;
    browser.quit().await;
    title
}

/// [`trust_ca`] on a CA generated here: certutil validates it as a CA for TLS servers, and
/// Chromium opens an HTTPS page whose certificate it issued, while a Chromium whose `HOME`
/// lacks it refuses the same page (certificate errors are never ignored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_ca_makes_chromium_trust_a_generated_ca_and_only_then() {
    if !browser_tools() {
        return;
    }
    let (ca_pem, cert, key) = test_ca();
    let url = https_page(cert, key).await;

    let home = tempfile::tempdir().unwrap();
    trust_ca(home.path(), &ca_pem).unwrap();
    let db = format!("sql:{}", home.path().join(".pki/nssdb").display());
    let listed = run_certutil(&["-L", "-d", &db]).unwrap();
    let line = listed
        .lines()
        .find(|l| l.starts_with("lark-sandbox"))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(line.trim_end().ends_with("C,,"), "{line}");
    let valid = run_certutil(&["-V", "-d", &db, "-n", "lark-sandbox", "-u", "L"]).unwrap();
    assert!(valid.contains("certificate is valid"), "{valid}");
    assert_eq!(title_at(home.path(), &url).await, "trusted");

    // The same page in a Chromium whose HOME does not hold the CA: an error page, not ours.
    let untrusted = tempfile::tempdir().unwrap();
    let title = title_at(untrusted.path(), &url).await;
    eprintln!("Chromium without the CA shows: {title:?}");
    assert_ne!(
        title, "trusted",
        "Chromium accepted a certificate from an unknown CA"
    );
}

// ---------------------------------------------------------------------------------------------
// The device flow (`auth.flow = "device"`): the card's Authorize button opens the platform's
// verification page (the sandbox's), the person approves or rejects there, and the service,
// which nothing reaches, polls the token endpoint.

const BOB: &str = "ou_sandbox_bob";

/// The sandbox (device grant as `settings`, user tokens living `user_token_ttl` s) and the
/// service beside it in device mode.
async fn device_sandbox_and_service(
    settings: lark_service::sandbox::DeviceSettings,
    user_token_ttl: u64,
) -> (Sandbox, Service) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service = format!("http://{}", admin.local_addr().unwrap());
    let sandbox = Sandbox::start(SandboxOptions {
        request_auth_url: Some(format!("{service}/api/v1/auth/requests")),
        service_url: Some(service.clone()),
        admin_token: Some(ADMIN.to_owned()),
        user_token_ttl,
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    sandbox.set_device(settings);
    let dir = tempfile::tempdir().unwrap();
    let ca = trust_sandbox(dir.path(), &sandbox).expect("the sandbox serves HTTPS");
    let svc = Service::start_on_both(
        dir,
        listener,
        admin,
        &sandbox.base_url(),
        &[("TLS_CA_FILE", &ca), ("AUTH_FLOW", "device")],
    )
    .await;
    (sandbox, svc)
}

fn quick_device() -> lark_service::sandbox::DeviceSettings {
    lark_service::sandbox::DeviceSettings {
        interval: Duration::from_secs(1),
        ..Default::default()
    }
}

/// The verification URLs on the Authorize cards `open_id` got, oldest first.
fn device_card_urls(sandbox: &Sandbox, open_id: &str) -> Vec<String> {
    sandbox
        .messages_for(open_id)
        .iter()
        .filter_map(|m| {
            let first = m.history.first().unwrap_or(&m.content).to_string();
            let at = first.find("/sandbox/device?user_code=")?;
            let start = first[..at].rfind("https://")?;
            let end = at + first[at..].find('"')?;
            Some(first[start..end].to_owned())
        })
        .collect()
}

/// The current card of the message that carried `url`.
fn card_with(sandbox: &Sandbox, open_id: &str, url: &str) -> String {
    sandbox
        .messages_for(open_id)
        .into_iter()
        .find(|m| {
            m.history
                .first()
                .unwrap_or(&m.content)
                .to_string()
                .contains(url)
        })
        .map(|m| m.content.to_string())
        .unwrap()
}

async fn session_of(svc: &Service, id: &str) -> Value {
    let (code, body) = svc.get(&format!("/api/v1/auth/sessions/{id}")).await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn until_session_state(svc: &Service, id: &str, state: &str) -> Value {
    let deadline = Instant::now() + STEP;
    loop {
        let s = session_of(svc, id).await;
        if s["state"] == state {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "session never became {state}: {s}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn request_device(svc: &Service, sandbox: &Sandbox, open_id: &str) -> (String, String) {
    let (code, body) = svc
        .post("/api/v1/auth/requests", json!({"open_id": open_id}))
        .await;
    assert_eq!(code, 201, "{body}");
    let id = body["session_id"].as_str().unwrap().to_owned();
    let url = device_card_urls(sandbox, open_id)
        .pop()
        .expect("a device card");
    (id, url)
}

async fn browser_for(sandbox: &Sandbox) -> (Browser, tempfile::TempDir) {
    let home = tempfile::tempdir().unwrap();
    trust_ca(home.path(), &sandbox_ca_pem(sandbox).unwrap()).unwrap();
    (Browser::start(home.path()).await, home)
}

/// Approve, end to end from the sandbox page: the card's button opens the verification page
/// (no redirect to the service), Alice approves, the service's polls pick the tokens up
/// (honouring a `slow_down`: no poll comes sooner than the interval in force), stores them,
/// and the card turns into "Authorization complete".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_flow_alice_approves_in_the_browser() {
    if !browser_tools() {
        return;
    }
    let (sandbox, svc) = device_sandbox_and_service(
        lark_service::sandbox::DeviceSettings {
            slow_down_next: 1,
            ..quick_device()
        },
        7200,
    )
    .await;
    let (browser, _home) = browser_for(&sandbox).await;
    browser
        .steps("device-approve", async {
            let c = browser.c();
            c.goto(&format!("{}/", sandbox.base_url())).await.unwrap();
            browser
                .click("//button[normalize-space(.)='Ask Alice (sandbox) to authorize']")
                .await;
            browser
                .click("//div[@class='card'][.//div[@class='title' and .='Authorization required']]//a[normalize-space(.)='Authorize']")
                .await;
            browser
                .until_source("the verification page", |s| s.contains("Authorize a device?"))
                .await;
            let at = c.current_url().await.unwrap();
            assert_eq!(at.path(), "/sandbox/device", "{at}");
            browser
                .click(&format!("//select[@name='sandbox_user']/option[@value='{ALICE}']"))
                .await;
            browser.click("//button[@value='approve']").await;
            browser.until_source("the answer", |s| s.contains("id=\"done\"")).await;
        })
        .await;
    browser.quit().await;
    svc.wait_for_within(STEP, || async {
        svc.get(&format!("/api/v1/users/{ALICE}/token")).await.0 == 200
    })
    .await;
    let (_, body) = svc.get(&format!("/api/v1/users/{ALICE}/token")).await;
    let t: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        sandbox
            .token_owner(t["access_token"].as_str().unwrap())
            .as_deref(),
        Some(ALICE)
    );
    let url = device_card_urls(&sandbox, ALICE).pop().unwrap();
    svc.wait_for_within(STEP, || async {
        card_with(&sandbox, ALICE, &url).contains("Authorization complete")
    })
    .await;
    let (polls, too_fast) = sandbox.device_polls();
    assert!(polls >= 2, "a slow_down, then the grant: {polls}");
    assert_eq!(too_fast, 0, "a poll came sooner than the interval");
    assert_eq!(
        sandbox.hits("authorize"),
        0,
        "the OAuth authorize page was never used"
    );
    svc.stop().await;
}

/// Reject on the verification page: the session is rejected, no token, the card says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_flow_alice_rejects_in_the_browser() {
    if !browser_tools() {
        return;
    }
    let (sandbox, svc) = device_sandbox_and_service(quick_device(), 7200).await;
    let (id, url) = request_device(&svc, &sandbox, ALICE).await;
    let (browser, _home) = browser_for(&sandbox).await;
    browser
        .steps("device-reject", async {
            browser.c().goto(&url).await.unwrap();
            browser.click("//button[@value='reject']").await;
            browser
                .until_source("the answer", |s| s.contains("id=\"done\""))
                .await;
        })
        .await;
    browser.quit().await;
    let s = until_session_state(&svc, &id, "rejected").await;
    assert_eq!(s["failure_reason"], "user_rejected");
    assert_eq!(
        svc.get(&format!("/api/v1/users/{ALICE}/token")).await.0,
        404
    );
    svc.wait_for_within(STEP, || async {
        card_with(&sandbox, ALICE, &url).contains("Authorization declined")
    })
    .await;
    svc.stop().await;
}

/// Nobody answers in time: the device code expires, the session is expired and its card says
/// so; approving afterwards is refused by the platform and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_flow_expires_when_nobody_answers() {
    if !browser_tools() {
        return;
    }
    let (sandbox, svc) = device_sandbox_and_service(
        lark_service::sandbox::DeviceSettings {
            expires_in: Duration::from_secs(3),
            ..quick_device()
        },
        7200,
    )
    .await;
    let (id, url) = request_device(&svc, &sandbox, ALICE).await;
    let (browser, _home) = browser_for(&sandbox).await;
    browser
        .steps("device-expiry", async {
            browser.c().goto(&url).await.unwrap();
            browser
                .until_source("the verification page", |s| {
                    s.contains("Authorize a device?")
                })
                .await;
            let s = until_session_state(&svc, &id, "expired").await;
            assert_eq!(s["failure_reason"], "session_expired");
            browser.click("//button[@value='approve']").await;
            browser
                .until_source("the refusal", |s| s.contains("the code has expired"))
                .await;
        })
        .await;
    browser.quit().await;
    assert_eq!(
        svc.get(&format!("/api/v1/users/{ALICE}/token")).await.0,
        404
    );
    svc.wait_for_within(STEP, || async {
        card_with(&sandbox, ALICE, &url).contains("Authorization request expired")
    })
    .await;
    svc.stop().await;
}

/// The owner check: Alice's card, approved by Bob on the verification page. Fail closed: the
/// session fails (`state_mismatch`), and neither Alice nor Bob gets a stored token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_flow_approval_by_another_user_stores_nothing() {
    if !browser_tools() {
        return;
    }
    let (sandbox, svc) = device_sandbox_and_service(quick_device(), 7200).await;
    let (id, url) = request_device(&svc, &sandbox, ALICE).await;
    let (browser, _home) = browser_for(&sandbox).await;
    browser
        .steps("device-owner", async {
            browser.c().goto(&url).await.unwrap();
            browser
                .click(&format!(
                    "//select[@name='sandbox_user']/option[@value='{BOB}']"
                ))
                .await;
            browser.click("//button[@value='approve']").await;
            browser
                .until_source("the answer", |s| s.contains("id=\"done\""))
                .await;
        })
        .await;
    browser.quit().await;
    let s = until_session_state(&svc, &id, "failed").await;
    assert_eq!(s["failure_reason"], "state_mismatch", "{s}");
    assert_eq!(s["has_tokens"], false, "{s}");
    assert_eq!(
        svc.get(&format!("/api/v1/users/{ALICE}/token")).await.0,
        404
    );
    assert_eq!(svc.get(&format!("/api/v1/users/{BOB}/token")).await.0, 404);
    svc.wait_for_within(STEP, || async {
        card_with(&sandbox, ALICE, &url).contains("Authorization failed")
    })
    .await;
    svc.stop().await;
}

/// A device grant without a refresh token (the platform may give none even with
/// `offline_access`): the token is served, and before it expires Alice gets a new Authorize
/// card (at `auth.token_refresh_threshold` of its lifetime).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_flow_without_a_refresh_token_asks_again_before_expiry() {
    if !browser_tools() {
        return;
    }
    let (sandbox, svc) = device_sandbox_and_service(
        lark_service::sandbox::DeviceSettings {
            no_refresh_token: true,
            ..quick_device()
        },
        15,
    )
    .await;
    let (_, url) = request_device(&svc, &sandbox, ALICE).await;
    let (browser, _home) = browser_for(&sandbox).await;
    browser
        .steps("device-no-refresh", async {
            browser.c().goto(&url).await.unwrap();
            browser.click("//button[@value='approve']").await;
            browser
                .until_source("the answer", |s| s.contains("id=\"done\""))
                .await;
        })
        .await;
    browser.quit().await;
    svc.wait_for_within(STEP, || async {
        svc.get(&format!("/api/v1/users/{ALICE}/token")).await.0 == 200
    })
    .await;
    let (_, body) = svc.get(&format!("/api/v1/users/{ALICE}/token")).await;
    let t: Value = serde_json::from_str(&body).unwrap();
    let first = t["access_token"].as_str().unwrap().to_owned();
    let expires_at = t["expires_at"].as_u64().expect("expires_at");
    assert_eq!(sandbox.token_owner(&first).as_deref(), Some(ALICE));
    // A new card arrives while the token is still valid and still served.
    svc.wait_for_within(STEP, || async {
        device_card_urls(&sandbox, ALICE).len() == 2
    })
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    assert!(
        now < u128::from(expires_at),
        "the new card came after the token expired"
    );
    let (code, body) = svc.get(&format!("/api/v1/users/{ALICE}/token")).await;
    assert_eq!(code, 200, "{body}");
    let t: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(t["access_token"].as_str(), Some(first.as_str()));
    svc.stop().await;
}
