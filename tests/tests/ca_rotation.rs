//! CA rotation against a real broker on loopback: the trust bundle reaches
//! sites with their certificates, tunnels survive every phase, a site
//! renews into the new CA, a rollback from each phase restores the old
//! state, a site offline through the rotation returns while the old CA is
//! still trusted, the handshake's verdicts at each phase (site
//! certificates of the old and the new CA, expired, not yet valid, of
//! another CA, with a malformed identity or the wrong key usage, revoked,
//! none; the broker's certificate as a site knowing one CA sees it) agree
//! with `openssl verify`, `/metrics` follows every phase, a rotation made
//! on one of two brokers sharing a real etcd reaches the other through
//! retirement, a site on HTTP/2 goes through a whole rotation, enrollment
//! codes made before the new CA signs still enroll, and the metric of
//! site certificates about to expire reads right after an issue.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tether::link::Dialer;
use tether::state_dir::StateDir;
use tether_proto::api::CaStatus;
use tether_proto::tunnel::Transport;
use tether_tests::{TestBroker, TestSite, Tunnel, ping, tunnel_for, v4};

/// One rotation step through the admin API, as `tether-broker ca rotate`
/// does.
async fn admin(broker: &TestBroker, path: &'static str) -> Result<CaStatus, String> {
    let addr = broker.running.as_ref().unwrap().admin_addr;
    let token = broker.broker().admin_token.clone();
    tokio::task::spawn_blocking(move || {
        let client = tether_shell::operator::AdminClient::new(&format!("http://{addr}"), &token);
        if path == "/v1/ca" {
            client.get(path)
        } else {
            client.post(path, &serde_json::json!({}))
        }
        .map_err(|e| e.to_string())
    })
    .await
    .unwrap()
}

async fn rotate(broker: &TestBroker) -> CaStatus {
    admin(broker, "/v1/ca/rotate").await.unwrap()
}

async fn rollback(broker: &TestBroker) -> Result<CaStatus, String> {
    admin(broker, "/v1/ca/rollback").await
}

/// Renews the site's certificate over a connection, as the agent does.
async fn renew(broker: &TestBroker, site: &TestSite) {
    let config = broker.client_config();
    let dialer = Dialer::for_site(&config, &site.state, None).unwrap();
    let (conn, target) = dialer.connect(&config, &[Transport::H3]).await.unwrap();
    tether::enroll::renew(&conn, &site.state, &target)
        .await
        .unwrap();
    conn.close("done");
    conn.drain().await;
}

/// The common name of the CA that signed the site's certificate.
fn issuer_of(site: &TestSite) -> String {
    let c = site.state.credentials().unwrap();
    tether_pki::ca::common_names(&c.chain[0]).unwrap().1
}

/// The names of the CAs of the site's stored trust bundle.
fn bundle_of(site: &TestSite) -> Vec<String> {
    site.state
        .trust_bundle()
        .unwrap()
        .unwrap()
        .iter()
        .map(|c| tether_pki::ca::common_names(c).unwrap().0)
        .collect()
}

fn names(status: &CaStatus) -> Vec<String> {
    status.bundle.iter().map(|c| c.name.clone()).collect()
}

/// A packet from `a` reaches `b` through the broker.
async fn passes(a: &Tunnel, b: &Tunnel, seq: u16) -> bool {
    a.send_packet(&ping(v4(a), v4(b), seq));
    b.recv_packet(Duration::from_secs(5)).await.is_some()
}

/// Sleeps until the Unix second `at` has passed.
async fn sleep_until_unix(at: u64) {
    let at = tether_pki::token::from_unix_secs(at) + Duration::from_millis(200);
    tokio::time::sleep(at.duration_since(SystemTime::now()).unwrap_or_default()).await;
}

/// The wards may reach each other (between sites, everything else is
/// denied).
const WARDS: &str = r#"
[[policy.allow]]
name = "wards"
from = ["site:ward-a", "site:ward-b"]
to = ["site:ward-a", "site:ward-b"]
"#;

#[tokio::test]
async fn a_full_rotation_drops_no_tunnel_and_sites_renew_into_the_new_ca() {
    const LIFETIME: Duration = Duration::from_secs(8);
    let broker = TestBroker::start_with(WARDS, |c| c.site_cert_lifetime = LIFETIME).await;
    let a = TestSite::enroll(&broker, "ward-a").await;
    let b = TestSite::enroll(&broker, "ward-b").await;
    let start = admin(&broker, "/v1/ca").await.unwrap();
    assert_eq!(start.phase, "stable");
    let old = start.bundle[0].name.clone();
    assert_eq!(bundle_of(&a), vec![old.clone()]);
    let (ta, tb) = (tunnel_for(&broker, &a).await, tunnel_for(&broker, &b).await);
    let (addr_a, addr_b) = (v4(&ta), v4(&tb));
    assert!(passes(&ta, &tb, 1).await);

    // Prepared: the new CA is published, the old one still signs.
    let prepared = rotate(&broker).await;
    assert_eq!(prepared.phase, "prepared");
    let new = prepared.bundle[1].name.clone();
    assert_ne!(new, old);
    assert_eq!(names(&prepared), vec![old.clone(), new.clone()]);
    assert!(passes(&ta, &tb, 2).await, "a tunnel dropped at prepare");
    renew(&broker, &a).await;
    assert_eq!(issuer_of(&a), old);
    assert_eq!(bundle_of(&a), vec![old.clone(), new.clone()]);

    // Active: the new CA signs; the tunnels of the old one stay.
    let active = rotate(&broker).await;
    assert_eq!(active.phase, "active");
    assert_eq!(names(&active), vec![new.clone(), old.clone()]);
    assert!(passes(&ta, &tb, 3).await, "a tunnel dropped at activation");
    let retire_after = active.retire_after.unwrap();
    // Too early to retire: site certificates of the old CA are still valid.
    let early = admin(&broker, "/v1/ca/rotate").await.unwrap_err();
    assert!(early.contains("cannot be retired yet"), "{early}");

    // At half their lifetime (as the agent does) both sites renew into the
    // new CA and reconnect with the same addresses; B still knows only the
    // old CA and is served the old CA's broker certificate until then.
    assert_eq!(bundle_of(&b), vec![old.clone()]);
    sleep_until_unix(active.since + LIFETIME.as_secs() / 2).await;
    for site in [&a, &b] {
        renew(&broker, site).await;
        assert_eq!(issuer_of(site), new);
    }
    assert_eq!(bundle_of(&b), vec![new.clone(), old.clone()]);
    drop((ta, tb));
    let (ta, tb) = (tunnel_for(&broker, &a).await, tunnel_for(&broker, &b).await);
    assert_eq!((v4(&ta), v4(&tb)), (addr_a, addr_b));

    // Retired: the old CA leaves the bundle; the renewed tunnels stay.
    sleep_until_unix(retire_after).await;
    let retired = rotate(&broker).await;
    assert_eq!(retired.phase, "stable");
    assert_eq!(names(&retired), vec![new.clone()]);
    assert!(passes(&ta, &tb, 4).await, "a tunnel dropped at retirement");
    renew(&broker, &a).await;
    assert_eq!(bundle_of(&a), vec![new.clone()]);
    let none = rollback(&broker).await.unwrap_err();
    assert!(none.contains("nothing to roll back"), "{none}");
}

#[tokio::test]
async fn a_rollback_from_each_phase_restores_the_old_state() {
    const LIFETIME: Duration = Duration::from_secs(3);
    let broker = TestBroker::start_with("", |c| c.site_cert_lifetime = LIFETIME).await;
    let site = TestSite::enroll(&broker, "ward-r").await;
    let start = admin(&broker, "/v1/ca").await.unwrap();
    let old = start.bundle[0].name.clone();

    // From prepared: straight back to the old CA alone.
    rotate(&broker).await;
    let back = rollback(&broker).await.unwrap();
    assert_eq!(back.phase, "stable");
    assert_eq!(names(&back), vec![old.clone()]);
    renew(&broker, &site).await;
    assert_eq!(bundle_of(&site), vec![old.clone()]);
    assert_eq!(issuer_of(&site), old);

    // From active: the old CA signs again at once, the new one stays
    // trusted until the certificates it signed have expired.
    rotate(&broker).await;
    let active = rotate(&broker).await;
    let new = active.bundle[0].name.clone();
    renew(&broker, &site).await;
    assert_eq!(issuer_of(&site), new);
    let renewed_tunnel = tunnel_for(&broker, &site).await;
    let address = v4(&renewed_tunnel);
    let prepared = rollback(&broker).await.unwrap();
    assert_eq!(prepared.phase, "prepared");
    assert_eq!(names(&prepared), vec![old.clone(), new.clone()]);
    // The site's tunnel with its certificate of the new CA is still
    // accepted on a new connection.
    drop(renewed_tunnel);
    let again = tunnel_for(&broker, &site).await;
    assert_eq!(v4(&again), address);
    drop(again);
    let early = rollback(&broker).await.unwrap_err();
    assert!(early.contains("cannot be dropped yet"), "{early}");
    renew(&broker, &site).await;
    assert_eq!(issuer_of(&site), old);
    // Renewed again at half its lifetime, as the agent does, so that it is
    // valid when the new CA is dropped.
    let drop_next_after = prepared.drop_next_after.unwrap();
    sleep_until_unix(drop_next_after - LIFETIME.as_secs() / 2).await;
    renew(&broker, &site).await;
    sleep_until_unix(drop_next_after).await;
    let stable = rollback(&broker).await.unwrap();
    assert_eq!(stable.phase, "stable");
    assert_eq!(names(&stable), vec![old.clone()]);
    let t = tunnel_for(&broker, &site).await;
    assert_eq!(v4(&t), address);
}

#[tokio::test]
async fn a_site_offline_through_the_rotation_returns_while_the_old_ca_is_trusted() {
    const LIFETIME: Duration = Duration::from_secs(2);
    let broker = TestBroker::start_with("", |c| {
        c.site_cert_lifetime = LIFETIME;
        c.reattest_window = Duration::from_secs(600);
    })
    .await;
    let away = TestSite::enroll(&broker, "lab-away").await;
    let gone = TestSite::enroll(&broker, "lab-gone").await;
    let address = v4(&tunnel_for(&broker, &away).await);
    let old = admin(&broker, "/v1/ca").await.unwrap().bundle[0]
        .name
        .clone();
    rotate(&broker).await;
    let active = rotate(&broker).await;
    let new = active.bundle[0].name.clone();

    // Back after its certificate expired, knowing only the old CA: the
    // broker shows it the old CA's certificate and re-attests it into the
    // new CA.
    let expired =
        tether_pki::token::from_unix_secs(away.state.credentials().unwrap().identity.not_after)
            + Duration::from_millis(500);
    tokio::time::sleep(
        expired
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    )
    .await;
    assert_eq!(bundle_of(&away), vec![old.clone()]);
    let config = broker.client_config();
    let dialer = Dialer::for_reattestation(&config, &away.state, None).unwrap();
    let (conn, target) = dialer.connect(&config, &[Transport::H3]).await.unwrap();
    let answer = tether::enroll::reattest(&conn, &away.state, &target, true)
        .await
        .unwrap();
    assert!(answer.renewed.is_some());
    conn.close("done");
    conn.drain().await;
    assert_eq!(issuer_of(&away), new);
    assert_eq!(bundle_of(&away), vec![new.clone(), old.clone()]);
    assert_eq!(v4(&tunnel_for(&broker, &away).await), address);

    // After retirement a site that knows only the old CA no longer
    // recognises the broker: it must enroll again.
    sleep_until_unix(active.retire_after.unwrap()).await;
    rotate(&broker).await;
    let dialer = Dialer::for_reattestation(&config, &gone.state, None).unwrap();
    let failure = dialer
        .connect(&config, &[Transport::H3])
        .await
        .err()
        .expect("a site that knows only the retired CA must not trust the broker");
    println!("{failure}");
}

/// `openssl verify` of `leaf` against the CAs of `bundle` (PEM) for a TLS
/// client (`sslclient`: a site certificate as the broker judges it) or a
/// TLS server (`sslserver`, and naming 127.0.0.1: the broker's certificate
/// as a site dialling it judges it).
fn openssl_accepts(dir: &Path, purpose: &str, bundle: &str, leaf: &str) -> bool {
    let (b, l) = (dir.join("bundle.pem"), dir.join("leaf.pem"));
    std::fs::write(&b, bundle).unwrap();
    std::fs::write(&l, leaf).unwrap();
    let mut cmd = std::process::Command::new("openssl");
    cmd.args(["verify", "-purpose", purpose]);
    if purpose == "sslserver" {
        cmd.args(["-verify_ip", "127.0.0.1"]);
    }
    let out = cmd
        .arg("-CAfile")
        .arg(&b)
        .arg(&l)
        .output()
        .expect("openssl is installed");
    out.status.success()
}

/// A certificate, its key and its PEM.
type Leaf = (CertificateDer<'static>, PrivateKeyDer<'static>, String);

/// A site certificate for `site` from the CA signing now, with its key.
fn issue(broker: &TestBroker, site: &str) -> Leaf {
    issue_at(broker, site, SystemTime::now())
}

/// As [`issue`], valid for ten minutes from `from` (in the past for an
/// expired certificate, in the future for one not valid yet).
fn issue_at(broker: &TestBroker, site: &str, from: SystemTime) -> Leaf {
    let b = broker.broker();
    let (leaf, identity, cert) = signed_by(&b.ca.signer(), broker, site, from);
    b.record_issued(&identity, &cert).unwrap();
    leaf
}

/// A site certificate for `site` at `broker`'s trust domain signed by
/// `ca`, valid for ten minutes from `from`; the broker keeps no record of
/// it.
fn signed_by(
    ca: &tether_pki::Ca,
    broker: &TestBroker,
    site: &str,
    from: SystemTime,
) -> (Leaf, tether_pki::SiteIdentity, tether_pki::IssuedCert) {
    let identity = broker
        .broker()
        .identity(&site.parse().unwrap(), &"local".parse().unwrap());
    let (key, csr) = tether_pki::ca::site_key_and_csr(site).unwrap();
    let cert = ca
        .issue_site(&csr, &identity, from, Duration::from_secs(600))
        .unwrap();
    let leaf = (
        cert.der.clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        cert.pem.clone(),
    );
    (leaf, identity, cert)
}

/// A certificate signed by `ca` with a SPIFFE URI of its own and the given
/// extended key usage: the leaves no issuing path makes.
fn crafted(ca: &tether_pki::Ca, uri: &str, eku: rcgen::ExtendedKeyUsagePurpose) -> Leaf {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    params.extended_key_usages = vec![eku];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    let cert = ca
        .sign_leaf(params, &key, SystemTime::now(), Duration::from_secs(600))
        .unwrap();
    (
        cert.der,
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        cert.pem,
    )
}

/// The broker's certificate as the site's verifier saw it, passed on to
/// the site's own verifier (so the verdict is the site's).
#[derive(Debug)]
struct Seen {
    inner: std::sync::Arc<dyn rustls::client::danger::ServerCertVerifier>,
    leaf: std::sync::Mutex<Option<CertificateDer<'static>>>,
}

impl rustls::client::danger::ServerCertVerifier for Seen {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.leaf.lock().unwrap() = Some(end_entity.clone().into_owned());
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

/// How a real QUIC handshake of a site (trusting `trusts`, presenting
/// `leaf` if any) with the broker ended: `accept` (the broker opened its
/// HTTP/3 control stream), or which side refused and the TLS alert it
/// sent, e.g. `broker: CertificateExpired` (the broker refused the site's
/// certificate) or `site: UnknownCA` (the site did not recognise the
/// broker's certificate). Also the broker's certificate the site saw.
async fn handshake(
    broker: &TestBroker,
    trusts: &[CertificateDer<'static>],
    leaf: Option<&Leaf>,
) -> (String, CertificateDer<'static>) {
    let addr = broker.addr();
    let mut tls = tether_pki::tls::client_config_trusting(
        trusts,
        leaf.map(|l| (vec![l.0.clone()], l.1.clone_key())),
        0,
    )
    .unwrap();
    let seen = std::sync::Arc::new(Seen {
        inner: tether_pki::tls::broker_verifier(trusts).unwrap(),
        leaf: std::sync::Mutex::new(None),
    });
    tls.dangerous().set_certificate_verifier(seen.clone());
    let config = tether::h3client::quic_config(
        tls,
        tether_shell::quic::transport_config(Duration::from_secs(2), Duration::from_secs(10)),
    )
    .unwrap();
    let endpoint = tether::dial::client_endpoint(&addr).unwrap();
    let connecting = endpoint
        .connect_with(config, addr, &addr.ip().to_string())
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        let conn = connecting.await?;
        conn.accept_uni().await.map(|_| conn)
    })
    .await
    .expect("the handshake ended within 10 s");
    let verdict = match outcome {
        Ok(conn) => {
            conn.close(0u32.into(), b"done");
            "accept".to_string()
        }
        Err(e) => {
            let (who, code) = match &e {
                quinn::ConnectionError::ConnectionClosed(c) => ("broker", c.error_code),
                quinn::ConnectionError::TransportError(t) => ("site", t.code),
                other => panic!("the handshake ended without a TLS refusal: {other}"),
            };
            // QUIC carries a TLS alert as the transport error 0x100 + alert.
            let alert = u64::from(code)
                .checked_sub(0x100)
                .and_then(|a| u8::try_from(a).ok())
                .unwrap_or_else(|| panic!("not a TLS alert: {e}"));
            format!("{who}: {:?}", rustls::AlertDescription::from(alert))
        }
    };
    endpoint.wait_idle().await;
    let shown = seen
        .leaf
        .lock()
        .unwrap()
        .clone()
        .expect("the broker showed a certificate");
    (verdict, shown)
}

/// Without a client certificate the handshake succeeds (the listener also
/// serves enrollment), and the tunnel is refused: its verdict is
/// `tunnel refused: <HTTP status>`.
async fn tunnel_without_certificate(
    broker: &TestBroker,
    trusts: &[CertificateDer<'static>],
) -> String {
    let client = tether_tests::connect_trusting(broker.addr(), trusts, None)
        .await
        .unwrap();
    match Tunnel::open(client).await {
        Ok(_) => "tunnel opened".to_string(),
        Err((status, _)) => format!("tunnel refused: {status}"),
    }
}

/// The cases of the matrix, its columns.
const CASES: [&str; 11] = [
    "old CA leaf",
    "new CA leaf",
    "expired leaf",
    "revoked site",
    "site knows old CA",
    "site knows new CA",
    "leaf not yet valid",
    "leaf of another CA",
    "malformed identity",
    "serverAuth-only EKU",
    "no client cert",
];

const EXPIRED: &str = "broker: CertificateExpired";
const REVOKED: &str = "broker: CertificateRevoked";
const FOREIGN: &str = "broker: UnknownCA";
const MALFORMED: &str = "broker: CertificateUnknown";
const PURPOSE: &str = "broker: UnsupportedCertificate";
const NO_CERT: &str = "tunnel refused: 401";
/// A case that does not exist yet (no new CA, or it has not signed).
const NONE: &str = "-";

/// The columns every phase agrees on: from "expired leaf" to "revoked
/// site", and from "leaf not yet valid" on.
const ALWAYS: [&str; 5] = [EXPIRED, FOREIGN, MALFORMED, PURPOSE, NO_CERT];

/// A row of the matrix: the six phase-dependent columns, then the rest.
const fn row(v: [&'static str; 6]) -> [&'static str; 11] {
    [
        v[0], v[1], v[2], v[3], v[4], v[5], ALWAYS[0], ALWAYS[1], ALWAYS[2], ALWAYS[3], ALWAYS[4],
    ]
}

/// What the handshake must give, per phase and case.
const EXPECTED: [(&str, [&str; 11]); 6] = [
    (
        "stable",
        row(["accept", NONE, EXPIRED, REVOKED, "accept", NONE]),
    ),
    (
        "prepared",
        row(["accept", NONE, EXPIRED, REVOKED, "accept", "accept"]),
    ),
    (
        "active",
        row(["accept", "accept", EXPIRED, REVOKED, "accept", "accept"]),
    ),
    (
        "prepared (rollback)",
        row(["accept", "accept", EXPIRED, REVOKED, "accept", "accept"]),
    ),
    (
        "active (again)",
        row(["accept", "accept", EXPIRED, REVOKED, "accept", "accept"]),
    ),
    (
        "retired",
        row([
            "broker: UnknownCA",
            "accept",
            EXPIRED,
            REVOKED,
            "site: UnknownCA",
            "accept",
        ]),
    ),
];

/// The certificates the matrix uses.
struct Leaves {
    /// From the old CA, valid.
    old: Leaf,
    /// From the new CA once it signed.
    new: Option<Leaf>,
    old_ca: CertificateDer<'static>,
    new_ca: Option<CertificateDer<'static>>,
    /// From a CA of the same trust domain that is not the deployment's.
    foreign: Leaf,
}

/// One row of the matrix: each case's handshake at the broker's current
/// phase. Every verdict `openssl verify` can express is checked against
/// it: each site certificate against the broker's bundle (openssl knows
/// nothing of revocations or of SPIFFE identities, so not the revoked one
/// or the malformed identity), and for every handshake the broker's
/// certificate the site saw against the CAs the site trusts.
async fn matrix_row(broker: &TestBroker, dir: &Path, leaves: &Leaves) -> [String; 11] {
    let bundle = broker.broker().ca.bundle_der();
    let bundle_pem = broker.broker().ca.bundle_pem();
    let signer = broker.broker().ca.signer();
    let uri = |site: &str| {
        broker
            .broker()
            .identity(&site.parse().unwrap(), &"local".parse().unwrap())
            .uri()
    };
    // Made now by the CA that signs now: an hour old, expired for 50 min;
    // and one valid only from an hour on.
    let expired = issue_at(
        broker,
        "m-expired",
        SystemTime::now() - Duration::from_secs(3600),
    );
    // Issued an hour past the CA's backdating allowance: not valid yet.
    let early = issue_at(
        broker,
        "m-early",
        SystemTime::now() + tether_pki::ca::CLOCK_SKEW_ALLOWANCE + Duration::from_secs(3600),
    );
    let revoked = issue(broker, "m-revoked");
    let fresh = issue(broker, "m-fresh");
    let malformed = crafted(
        &signer,
        &uri("m-odd").replace("/site/m-odd", "/site/M_odd"),
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    );
    let server_only = crafted(
        &signer,
        &uri("m-server"),
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    );
    let pem_of = |cas: &[CertificateDer<'static>]| -> String {
        cas.iter()
            .map(|c| tether_pki::ca::der_to_pem(c, "CERTIFICATE"))
            .collect()
    };
    // (column, the CAs the site trusts, its certificate)
    let mut cases: Vec<(usize, Vec<CertificateDer<'static>>, Option<&Leaf>)> = vec![
        (0, bundle.clone(), Some(&leaves.old)),
        (2, bundle.clone(), Some(&expired)),
        (3, bundle.clone(), Some(&revoked)),
        (4, vec![leaves.old_ca.clone()], Some(&fresh)),
        (6, bundle.clone(), Some(&early)),
        (7, bundle.clone(), Some(&leaves.foreign)),
        (8, bundle.clone(), Some(&malformed)),
        (9, bundle.clone(), Some(&server_only)),
        (10, bundle.clone(), None),
    ];
    if let Some(new) = &leaves.new {
        cases.push((1, bundle.clone(), Some(new)));
    }
    if let Some(new_ca) = &leaves.new_ca {
        cases.push((5, vec![new_ca.clone()], Some(&fresh)));
    }
    let mut row: [String; 11] = Default::default();
    for (i, trusts, leaf) in cases {
        let (verdict, shown) = handshake(broker, &trusts, leaf).await;
        // The broker's certificate, as openssl judges it for this site.
        let site_accepts = !verdict.starts_with("site:");
        let shown_pem = tether_pki::ca::der_to_pem(&shown, "CERTIFICATE");
        let openssl = openssl_accepts(dir, "sslserver", &pem_of(&trusts), &shown_pem);
        assert_eq!(
            openssl, site_accepts,
            "{}: openssl says {openssl} of the broker's certificate, the site's handshake {verdict}",
            CASES[i]
        );
        row[i] = if leaf.is_none() && verdict == "accept" {
            tunnel_without_certificate(broker, &trusts).await
        } else {
            verdict
        };
        // The site's certificate, as openssl judges it for the broker.
        if let Some(leaf) = leaf
            && ![3, 8].contains(&i)
            && site_accepts
        {
            let openssl = openssl_accepts(dir, "sslclient", &bundle_pem, &leaf.2);
            assert_eq!(
                openssl,
                row[i] == "accept",
                "{}: openssl says {openssl} of the site's certificate, the broker's handshake {}",
                CASES[i],
                row[i]
            );
        }
    }
    row.map(|v| if v.is_empty() { NONE.to_string() } else { v })
}

#[tokio::test]
async fn the_handshake_matrix_under_two_cas_at_each_phase() {
    const LIFETIME: Duration = Duration::from_secs(2);
    let broker = TestBroker::start_with("", |c| c.site_cert_lifetime = LIFETIME).await;
    let dir = tempfile::tempdir().unwrap();
    // The revoked site was enrolled, then revoked by the operator.
    TestSite::enroll(&broker, "m-revoked").await;
    let b = broker.broker().clone();
    tokio::task::spawn_blocking(move || {
        b.revoke_site(&"m-revoked".parse().unwrap(), &"local".parse().unwrap())
    })
    .await
    .unwrap()
    .unwrap();
    let foreign = {
        let ca =
            tether_pki::Ca::generate(broker.broker().ca.trust_domain().clone(), SystemTime::now())
                .unwrap();
        signed_by(&ca, &broker, "m-foreign", SystemTime::now()).0
    };
    let mut leaves = Leaves {
        old: issue(&broker, "m-old"),
        new: None,
        old_ca: broker.broker().ca.cert_der(),
        new_ca: None,
        foreign,
    };
    let mut matrix = Vec::new();
    matrix.push(matrix_row(&broker, dir.path(), &leaves).await);
    let prepared = rotate(&broker).await;
    assert_eq!(prepared.phase, "prepared");
    leaves.new_ca = Some(broker.broker().ca.bundle_der()[1].clone());
    matrix.push(matrix_row(&broker, dir.path(), &leaves).await);
    assert_eq!(rotate(&broker).await.phase, "active");
    leaves.new = Some(issue(&broker, "m-new"));
    matrix.push(matrix_row(&broker, dir.path(), &leaves).await);
    assert_eq!(rollback(&broker).await.unwrap().phase, "prepared");
    matrix.push(matrix_row(&broker, dir.path(), &leaves).await);
    let active = rotate(&broker).await;
    assert_eq!(active.phase, "active");
    matrix.push(matrix_row(&broker, dir.path(), &leaves).await);
    sleep_until_unix(active.retire_after.unwrap()).await;
    assert_eq!(rotate(&broker).await.phase, "stable");
    matrix.push(matrix_row(&broker, dir.path(), &leaves).await);

    let mut table = String::new();
    for ((phase, _), row) in EXPECTED.iter().zip(&matrix) {
        table.push_str(&format!("\n{phase}:"));
        for (case, v) in CASES.iter().zip(row) {
            table.push_str(&format!("\n    {case:<22} {v}"));
        }
    }
    println!("{table}");
    for ((phase, expected), row) in EXPECTED.iter().zip(&matrix) {
        for ((case, want), got) in CASES.iter().zip(expected).zip(row) {
            assert_eq!(got, want, "{phase}, {case}:\n{table}");
        }
    }
}

/// The CA series of a `/metrics` text: each CA's expiry series (labels
/// and value), the phase that is 1, and the bundle size.
fn ca_metrics(text: &str) -> (Vec<(String, i64)>, Vec<String>, String) {
    let mut expiry = Vec::new();
    let mut phases = Vec::new();
    let mut bundle = String::new();
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if let Some(labels) = series.strip_prefix("tether_broker_ca_expiry_seconds") {
            expiry.push((labels.to_string(), value.parse().unwrap()));
        } else if let Some(labels) = series.strip_prefix("tether_broker_ca_rotation_phase") {
            if value == "1" {
                phases.push(labels.to_string());
            }
        } else if series == "tether_broker_ca_bundle_certificates" {
            bundle = value.to_string();
        }
    }
    (expiry, phases, bundle)
}

/// Scrapes the broker's `/metrics` and checks its CA series against the
/// CA state of the admin API: the phase, and one expiry series per CA of
/// the bundle (the signing one marked), counting down to its `not_after`.
async fn metrics_match(broker: &TestBroker, phase: &str) {
    let status = admin(broker, "/v1/ca").await.unwrap();
    assert_eq!(status.phase, phase);
    let text = broker.scrape().await;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (expiry, phases, bundle) = ca_metrics(&text);
    assert_eq!(phases, vec![format!(r#"{{phase="{phase}"}}"#)], "{text}");
    assert_eq!(bundle, status.bundle.len().to_string(), "{text}");
    let expected: Vec<String> = status
        .bundle
        .iter()
        .map(|ca| format!(r#"{{ca="{}",signing="{}"}}"#, ca.name, ca.signing))
        .collect();
    let labels: Vec<String> = expiry.iter().map(|(l, _)| l.clone()).collect();
    assert_eq!(labels, expected, "{phase}: one series per CA of the bundle");
    for ((_, seconds), ca) in expiry.iter().zip(&status.bundle) {
        let left = ca.not_after as i64 - now;
        assert!(
            (seconds - left).abs() <= 2,
            "{}: {seconds} s left by /metrics, {left} s by the admin API",
            ca.name
        );
    }
    let server = text
        .lines()
        .find_map(|l| l.strip_prefix("tether_broker_server_cert_expiry_seconds "))
        .expect("the server certificate's expiry");
    let server: i64 = server.parse().unwrap();
    assert!(
        (29 * 86_400..=30 * 86_400).contains(&server),
        "the broker's certificates live 30 days: {server}"
    );
    println!("{phase}: {expiry:?}");
}

#[tokio::test]
async fn the_metrics_follow_each_phase_and_each_ca_of_the_bundle() {
    const LIFETIME: Duration = Duration::from_secs(2);
    let broker = TestBroker::start_with("", |c| c.site_cert_lifetime = LIFETIME).await;
    metrics_match(&broker, "stable").await;
    // Prepare, and roll back: the new CA's series goes with it.
    rotate(&broker).await;
    metrics_match(&broker, "prepared").await;
    rollback(&broker).await.unwrap();
    metrics_match(&broker, "stable").await;
    // Prepare, issue from the new CA, roll back to prepared, forward again,
    // retire: the old CA's series goes.
    rotate(&broker).await;
    metrics_match(&broker, "prepared").await;
    rotate(&broker).await;
    metrics_match(&broker, "active").await;
    rollback(&broker).await.unwrap();
    metrics_match(&broker, "prepared").await;
    let active = rotate(&broker).await;
    metrics_match(&broker, "active").await;
    sleep_until_unix(active.retire_after.unwrap()).await;
    let retired = rotate(&broker).await;
    assert_eq!(retired.bundle.len(), 1);
    metrics_match(&broker, "stable").await;
}

/// Waits (bounded, polling the admin API) until `broker` is in `phase`
/// with the trust bundle `bundle`: a step made at another broker reaches it
/// through the store's watch.
async fn follows(broker: &TestBroker, phase: &str, bundle: &[String]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = admin(broker, "/v1/ca").await.unwrap();
        if status.phase == phase && names(&status) == bundle {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the other broker is still {} with {:?}, not {phase} with {bundle:?}",
            status.phase,
            names(&status)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Packets pass both ways between two tunnels held by different brokers.
async fn across(ta: &Tunnel, tb: &Tunnel, seq: u16) {
    let (a, b) = (v4(ta), v4(tb));
    tether_tests::deliver(ta, tb, &ping(a, b, seq), |p| {
        p.src == std::net::IpAddr::V4(a)
    })
    .await;
    tether_tests::deliver(tb, ta, &ping(b, a, seq), |p| {
        p.src == std::net::IpAddr::V4(b)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_on_one_broker_reaches_the_other_broker_sharing_etcd() {
    let Some(server) = tokio::task::spawn_blocking(|| tether_tests::etcd::EtcdServer::start(false))
        .await
        .unwrap()
    else {
        return;
    };
    let extra = format!(
        "{}[peering]\nlisten = \"127.0.0.1:0\"\n{WARDS}",
        server.broker_toml("/tether/rotation/")
    );
    tokio::time::timeout(Duration::from_secs(120), async {
        // Both brokers use the CA in etcd (A put it there) and the same
        // key-encryption key.
        let a = TestBroker::start(&extra).await;
        let b = TestBroker::start(&extra).await;
        let site_a = TestSite::enroll(&a, "ward-a").await;
        let site_b = TestSite::enroll(&b, "ward-b").await;
        let (ta, tb) = (tunnel_for(&a, &site_a).await, tunnel_for(&b, &site_b).await);
        tether_tests::wait_for_remote_route(&a, v4(&tb)).await;
        tether_tests::wait_for_remote_route(&b, v4(&ta)).await;
        across(&ta, &tb, 1).await;
        let old = admin(&a, "/v1/ca").await.unwrap().bundle[0].name.clone();

        // Prepared at A: B publishes the same bundle.
        let prepared = rotate(&a).await;
        let new = prepared.bundle[1].name.clone();
        follows(&b, "prepared", &[old.clone(), new.clone()]).await;
        across(&ta, &tb, 2).await;

        // Active at A: B signs with the new CA, for a site enrolling there
        // and for one renewing there; the tunnels of both brokers stay.
        rotate(&a).await;
        follows(&b, "active", &[new.clone(), old.clone()]).await;
        let (_, phases, _) = ca_metrics(&b.scrape().await);
        assert_eq!(phases, vec![r#"{phase="active"}"#.to_string()]);
        let site_c = TestSite::enroll(&b, "ward-c").await;
        assert_eq!(issuer_of(&site_c), new, "B enrolls from the new CA");
        renew(&b, &site_b).await;
        assert_eq!(issuer_of(&site_b), new, "B renews from the new CA");
        assert_eq!(bundle_of(&site_b), vec![new.clone(), old.clone()]);
        across(&ta, &tb, 3).await;

        // Rolled back at A: B signs with the old CA again and still
        // accepts the new CA's certificates.
        rollback(&a).await.unwrap();
        follows(&b, "prepared", &[old.clone(), new.clone()]).await;
        renew(&b, &site_b).await;
        assert_eq!(issuer_of(&site_b), old, "B renews from the old CA again");
        let tc = tunnel_for(&b, &site_c).await;
        drop(tc);
        across(&ta, &tb, 4).await;
        assert!(ta.client.conn.close_reason().is_none());
        assert!(tb.client.conn.close_reason().is_none());
        for (broker, site) in [(&a, "ward-a"), (&b, "ward-b")] {
            assert!(broker.broker().session(&site.parse().unwrap()).is_some());
        }
    })
    .await
    .expect("test finished in time");
    drop(server);
}

/// Enrolls a site with `code` (made earlier) through the real enrollment
/// path; the error is the agent's own words.
async fn enroll_with(
    broker: &TestBroker,
    code: &str,
) -> Result<(tempfile::TempDir, StateDir), String> {
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path().join("state"));
    tether::enroll::enroll(&broker.addr().to_string(), code, &state, false, None)
        .await
        .map_err(|e| format!("{e:#}"))?;
    Ok((dir, state))
}

fn issuer_in(state: &StateDir) -> String {
    tether_pki::ca::common_names(&state.credentials().unwrap().chain[0])
        .unwrap()
        .1
}

fn bundle_in(state: &StateDir) -> Vec<String> {
    state
        .trust_bundle()
        .unwrap()
        .unwrap()
        .iter()
        .map(|c| tether_pki::ca::common_names(c).unwrap().0)
        .collect()
}

/// A configured tunnel with the credentials of `state`.
async fn tunnel_of(broker: &TestBroker, state: &StateDir) -> Tunnel {
    let c = state.credentials().unwrap();
    let client = tether_tests::connect_trusting(broker.addr(), &c.bundle, Some((c.chain, c.key)))
        .await
        .unwrap();
    let mut t = Tunnel::open(client).await.unwrap();
    t.configured().await;
    t
}

#[tokio::test]
async fn enrollment_codes_made_before_the_new_ca_signs_still_enroll() {
    const LIFETIME: Duration = Duration::from_secs(2);
    let broker = TestBroker::start_with(WARDS, |c| c.site_cert_lifetime = LIFETIME).await;
    let old = admin(&broker, "/v1/ca").await.unwrap().bundle[0]
        .name
        .clone();
    // Codes pin the CA that signs when they are made: the old one in
    // stable and prepared.
    let stable_code = broker.token("ward-a").await;
    let late_code = broker.token("ward-late").await;
    rotate(&broker).await;
    let prepared_code = broker.token("ward-b").await;
    let active = rotate(&broker).await;
    let new = active.bundle[0].name.clone();

    // Used after the new CA signs: the broker shows the enrolling site the
    // certificate of the CA its code pins, and signs it with the new CA.
    let (_a, a) = enroll_with(&broker, &stable_code).await.unwrap();
    let (_b, b) = enroll_with(&broker, &prepared_code).await.unwrap();
    for state in [&a, &b] {
        assert_eq!(issuer_in(state), new);
        assert_eq!(bundle_in(state), vec![new.clone(), old.clone()]);
    }
    let (ta, tb) = (tunnel_of(&broker, &a).await, tunnel_of(&broker, &b).await);
    assert!(passes(&ta, &tb, 1).await);
    // A code made now pins the new CA and enrolls too.
    let (_c, c) = enroll_with(&broker, &broker.token("ward-c").await)
        .await
        .unwrap();
    assert_eq!(issuer_in(&c), new);

    // Once the old CA is retired, a code pinning it cannot authenticate
    // the broker: refused in plain words, and the token is not spent.
    sleep_until_unix(active.retire_after.unwrap()).await;
    assert_eq!(rotate(&broker).await.phase, "stable");
    let refused = enroll_with(&broker, &late_code).await.unwrap_err();
    println!("{refused}");
    assert!(
        refused.contains("the broker showed no certificate of the CA this enrollment code pins")
            && refused.contains("make a new code"),
        "{refused}"
    );
    let (_l, late) = enroll_with(&broker, &broker.token("ward-late").await)
        .await
        .unwrap();
    assert_eq!(bundle_in(&late), vec![new.clone()]);
}

/// The `tether_broker_site_certificates_expiring` series of a scrape, by
/// window.
fn expiring(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("tether_broker_site_certificates_expiring{within=\""))
        .map(|l| {
            let (within, n) = l.split_once("\"} ").unwrap();
            (within.to_string(), n.parse().unwrap())
        })
        .collect()
}

fn windows(counts: [u64; 3]) -> Vec<(String, u64)> {
    ["1h", "6h", "24h"]
        .iter()
        .zip(counts)
        .map(|(w, n)| (w.to_string(), n))
        .collect()
}

#[tokio::test]
async fn the_expiring_site_certificates_metric_reads_right_after_a_leaf_is_issued() {
    // Leaves of two hours: within 6 h and 24 h, not within 1 h.
    let broker =
        TestBroker::start_with("", |c| c.site_cert_lifetime = Duration::from_secs(7_200)).await;
    assert_eq!(expiring(&broker.scrape().await), windows([0, 0, 0]));
    TestSite::enroll(&broker, "ward-x").await;
    assert_eq!(expiring(&broker.scrape().await), windows([0, 1, 1]));
    let y = TestSite::enroll(&broker, "ward-y").await;
    assert_eq!(expiring(&broker.scrape().await), windows([0, 2, 2]));
    // A renewal replaces the site's leaf; it is still one site.
    renew(&broker, &y).await;
    assert_eq!(expiring(&broker.scrape().await), windows([0, 2, 2]));
    // A revoked site is left out.
    let b = broker.broker().clone();
    tokio::task::spawn_blocking(move || {
        b.revoke_site(&"ward-y".parse().unwrap(), &"local".parse().unwrap())
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(expiring(&broker.scrape().await), windows([0, 1, 1]));

    // Leaves of three seconds: within every window, and out of every one
    // once expired.
    let short = TestBroker::start_with("", |c| c.site_cert_lifetime = Duration::from_secs(3)).await;
    let z = TestSite::enroll(&short, "ward-z").await;
    assert_eq!(expiring(&short.scrape().await), windows([1, 1, 1]));
    sleep_until_unix(z.state.credentials().unwrap().identity.not_after).await;
    assert_eq!(expiring(&short.scrape().await), windows([0, 0, 0]));
}

/// A CONNECT-IP tunnel over HTTP/2, as the agent holds one when UDP is
/// blocked, with its capsule state.
struct H2Tunnel {
    conn: tether::link::BrokerConn,
    target: tether::dial::Target,
    tunnel: tether::link::Tunnel,
    link: tether::link::TunnelLink,
    session: tether_proto::agent::ClientSession,
    capsules: tether_proto::capsule::CapsuleDecoder,
    packets: Vec<Vec<u8>>,
}

impl H2Tunnel {
    /// Dials the broker over HTTP/2 only, as the agent does once HTTP/3
    /// failed, with the site's credentials and trust bundle, and opens
    /// the tunnel.
    async fn open(broker: &TestBroker, site: &TestSite) -> Self {
        let config = broker.client_config();
        let dialer = Dialer::for_site(&config, &site.state, None).unwrap();
        let (conn, target) = dialer.connect(&config, &[Transport::H2]).await.unwrap();
        assert_eq!(conn.transport(), Transport::H2);
        let (tunnel, link) = conn
            .open_tunnel(&broker.addr().to_string(), Duration::from_secs(5), &[])
            .await
            .map_err(|f| f.message)
            .unwrap();
        let mut t = Self {
            conn,
            target,
            tunnel,
            link,
            session: Default::default(),
            capsules: Default::default(),
            packets: Vec::new(),
        };
        t.until("an address", |t| !t.session.addresses().is_empty())
            .await;
        t
    }

    /// Reads the stream until `done` holds.
    async fn until(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
        use tether_proto::capsule::Capsule;
        use tether_proto::datagram::{self, Payload};
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !done(self) {
            let data = tokio::time::timeout_at(deadline, self.tunnel.read())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .unwrap()
                .expect("the broker ended the tunnel");
            self.capsules.push(&data);
            while let Some(raw) = self.capsules.next_capsule().unwrap() {
                match Capsule::parse(raw).unwrap() {
                    Capsule::Datagram(payload) => {
                        if let Ok(Payload::IpPacket(p)) = datagram::parse_payload(&payload) {
                            self.packets.push(p.to_vec());
                        }
                    }
                    other => {
                        self.session.on_capsule(other);
                    }
                }
            }
        }
    }

    fn v4(&self) -> std::net::Ipv4Addr {
        match self.session.host_address(tether_proto::net::Family::V4) {
            Some(std::net::IpAddr::V4(a)) => a,
            other => panic!("no IPv4 address: {other:?}"),
        }
    }

    fn send(&self, packet: &[u8]) {
        let mut buf = vec![0u8; self.link.headroom()];
        buf.extend_from_slice(packet);
        self.link.send(&mut buf).unwrap();
    }

    /// Renews the site's certificate over this connection, as the agent
    /// does at half-life.
    async fn renew(&self, site: &TestSite) {
        tether::enroll::renew(&self.conn, &site.state, &self.target)
            .await
            .unwrap();
    }
}

/// Packets pass both ways between the HTTP/2 tunnel and an HTTP/3 one.
async fn exchange(h2: &mut H2Tunnel, h3: &Tunnel, seq: u16) {
    let (a, b) = (h2.v4(), v4(h3));
    h2.send(&ping(a, b, seq));
    let got = h3
        .recv_packet(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("packet {seq}: HTTP/2 -> HTTP/3 lost"));
    let p = tether_proto::ip::Packet::parse(&got).unwrap();
    assert_eq!(p.src, std::net::IpAddr::V4(a));
    h3.send_packet(&ping(b, a, seq));
    let before = h2.packets.len();
    h2.until(&format!("packet {seq} from the HTTP/3 site"), |t| {
        t.packets.len() > before
    })
    .await;
}

#[tokio::test]
async fn a_site_on_http2_stays_connected_through_a_full_rotation() {
    const LIFETIME: Duration = Duration::from_secs(8);
    let broker = TestBroker::start_with(WARDS, |c| c.site_cert_lifetime = LIFETIME).await;
    let a = TestSite::enroll(&broker, "ward-a").await;
    let b = TestSite::enroll(&broker, "ward-b").await;
    let old = admin(&broker, "/v1/ca").await.unwrap().bundle[0]
        .name
        .clone();
    let mut ha = H2Tunnel::open(&broker, &a).await;
    let info = broker
        .broker()
        .session(&"ward-a".parse().unwrap())
        .unwrap()
        .info();
    assert_eq!(info.transport, "h2");
    let address = ha.v4();
    let tb = tunnel_for(&broker, &b).await;
    exchange(&mut ha, &tb, 1).await;

    // Prepared: renewed over the HTTP/2 connection, the site gets the
    // bundle with both CAs; the tunnel carries on.
    let prepared = rotate(&broker).await;
    let new = prepared.bundle[1].name.clone();
    exchange(&mut ha, &tb, 2).await;
    ha.renew(&a).await;
    assert_eq!(issuer_of(&a), old);
    assert_eq!(bundle_of(&a), vec![old.clone(), new.clone()]);

    // Active: at half its lifetime it renews into the new CA over the same
    // connection, whose tunnel still carries packets.
    let active = rotate(&broker).await;
    exchange(&mut ha, &tb, 3).await;
    sleep_until_unix(active.since + LIFETIME.as_secs() / 2).await;
    ha.renew(&a).await;
    assert_eq!(issuer_of(&a), new);
    assert_eq!(bundle_of(&a), vec![new.clone(), old.clone()]);
    exchange(&mut ha, &tb, 4).await;
    renew(&broker, &b).await;

    // The agent then moves the tunnel to a connection with the new
    // certificate, again over HTTP/2 only, and lets the old one go.
    let mut ha2 = H2Tunnel::open(&broker, &a).await;
    assert_eq!(ha2.v4(), address);
    let tb2 = tunnel_for(&broker, &b).await;
    drop((ha, tb));
    exchange(&mut ha2, &tb2, 5).await;

    // Retired: the HTTP/2 tunnel of the new CA stays, and the next renewal
    // brings the bundle of the new CA alone.
    sleep_until_unix(active.retire_after.unwrap()).await;
    assert_eq!(rotate(&broker).await.phase, "stable");
    exchange(&mut ha2, &tb2, 6).await;
    ha2.renew(&a).await;
    assert_eq!(issuer_of(&a), new);
    assert_eq!(bundle_of(&a), vec![new.clone()]);
    exchange(&mut ha2, &tb2, 7).await;
    assert_eq!(
        broker
            .broker()
            .session(&"ward-a".parse().unwrap())
            .unwrap()
            .info()
            .transport,
        "h2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retirement_on_one_broker_reaches_the_other_broker_sharing_etcd() {
    const LIFETIME: Duration = Duration::from_secs(10);
    let Some(server) = tokio::task::spawn_blocking(|| tether_tests::etcd::EtcdServer::start(false))
        .await
        .unwrap()
    else {
        return;
    };
    let extra = format!(
        "{}[peering]\nlisten = \"127.0.0.1:0\"\n{WARDS}",
        server.broker_toml("/tether/retirement/")
    );
    tokio::time::timeout(Duration::from_secs(120), async {
        let a = TestBroker::start_with(&extra, |c| c.site_cert_lifetime = LIFETIME).await;
        let b = TestBroker::start_with(&extra, |c| c.site_cert_lifetime = LIFETIME).await;
        let site_a = TestSite::enroll(&a, "ward-a").await;
        let site_b = TestSite::enroll(&b, "ward-b").await;
        // Enrolled at B before the rotation and away all through it: it
        // knows only the old CA and holds only its certificate.
        let away = TestSite::enroll(&b, "ward-c").await;
        let old = admin(&a, "/v1/ca").await.unwrap().bundle[0].name.clone();
        let old_ca = a.broker().ca.cert_der();
        let old_signer = a.broker().ca.signer();

        let prepared = rotate(&a).await;
        let new = prepared.bundle[1].name.clone();
        follows(&b, "prepared", &[old.clone(), new.clone()]).await;
        let active = rotate(&a).await;
        follows(&b, "active", &[new.clone(), old.clone()]).await;
        let new_ca = b.broker().ca.cert_der();
        assert_eq!(tether_pki::ca::common_names(&new_ca).unwrap().0, new);

        // At half their lifetime both sites renew, each at its broker, into
        // the new CA, and their tunnels move to the renewed certificates.
        sleep_until_unix(active.since + LIFETIME.as_secs() / 2).await;
        renew(&a, &site_a).await;
        renew(&b, &site_b).await;
        assert_eq!(issuer_of(&site_a), new);
        assert_eq!(issuer_of(&site_b), new, "B renews from the new CA");
        let (ta, tb) = (tunnel_for(&a, &site_a).await, tunnel_for(&b, &site_b).await);
        tether_tests::wait_for_remote_route(&a, v4(&tb)).await;
        tether_tests::wait_for_remote_route(&b, v4(&ta)).await;
        across(&ta, &tb, 1).await;

        // Retired at A: B follows with the new CA alone; the tunnels of
        // both brokers stay.
        sleep_until_unix(active.retire_after.unwrap()).await;
        let retired = rotate(&a).await;
        assert_eq!(retired.phase, "stable");
        follows(&b, "stable", std::slice::from_ref(&new)).await;
        let (_, phases, bundle) = ca_metrics(&b.scrape().await);
        assert_eq!(phases, vec![r#"{phase="stable"}"#.to_string()]);
        assert_eq!(bundle, "1");
        across(&ta, &tb, 2).await;

        // B's server certificate is from the new CA: a site knowing only the
        // new CA accepts it; one knowing only the old CA no longer does.
        let fresh = issue(&b, "ward-fresh");
        assert_eq!(
            tether_pki::ca::common_names(&fresh.0).unwrap().1,
            new,
            "B issues from the new CA"
        );
        let (verdict, shown) = handshake(&b, std::slice::from_ref(&new_ca), Some(&fresh)).await;
        assert_eq!(verdict, "accept");
        assert_eq!(tether_pki::ca::common_names(&shown).unwrap().1, new);
        let (verdict, _) = handshake(&b, std::slice::from_ref(&old_ca), Some(&fresh)).await;
        assert_eq!(verdict, "site: UnknownCA");
        // A site holding only the old CA's certificate, as documented: it
        // does not recognise B any more, and B refuses its certificate; it
        // must enroll again, and then has the new CA.
        let config = b.client_config();
        let dialer = Dialer::for_reattestation(&config, &away.state, None).unwrap();
        let failure = dialer
            .connect(&config, &[Transport::H3])
            .await
            .err()
            .expect("a site that knows only the retired CA must not trust the broker");
        println!("{failure}");
        // Its own certificate has run out by now (retirement waits until
        // every leaf of the old CA has), and an expired certificate is
        // refused for its dates before its issuer is looked at: so B's
        // refusal of the old CA itself is shown with a leaf of the old CA
        // that is still within its dates.
        let c = away.state.credentials().unwrap();
        let held = (c.chain[0].clone(), c.key, String::new());
        let (verdict, _) = handshake(&b, std::slice::from_ref(&new_ca), Some(&held)).await;
        assert!(
            ["broker: CertificateExpired", "broker: UnknownCA"].contains(&verdict.as_str()),
            "{verdict}"
        );
        let current = signed_by(&old_signer, &b, "ward-c", SystemTime::now()).0;
        let (verdict, _) = handshake(&b, std::slice::from_ref(&new_ca), Some(&current)).await;
        assert_eq!(verdict, "broker: UnknownCA");
        let again = TestSite::enroll(&b, "ward-c").await;
        assert_eq!(issuer_of(&again), new);
        assert_eq!(bundle_of(&again), vec![new.clone()]);

        // Renewed at B after retirement: the new CA, the new bundle.
        renew(&b, &site_b).await;
        assert_eq!(issuer_of(&site_b), new);
        assert_eq!(bundle_of(&site_b), vec![new.clone()]);
        across(&ta, &tb, 3).await;
        assert!(ta.client.conn.close_reason().is_none());
        assert!(tb.client.conn.close_reason().is_none());
        for (broker, site) in [(&a, "ward-a"), (&b, "ward-b")] {
            assert!(broker.broker().session(&site.parse().unwrap()).is_some());
        }
    })
    .await
    .expect("test finished in time");
    drop(server);
}
