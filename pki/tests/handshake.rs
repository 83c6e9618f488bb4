//! The accept/reject matrix of site certificates, through real rustls
//! handshakes in memory, plus a cross-check with `openssl verify`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{
    CertificateError, ClientConfig, ClientConnection, Connection, Error, ServerConfig,
    ServerConnection,
};
use tether_pki::ca::{DEFAULT_SERVER_CERT_LIFETIME, DEFAULT_SITE_CERT_LIFETIME, site_key_and_csr};
use tether_pki::tls::{
    ca_pin, client_config, enrollment_client_config, enrollment_client_config_noting_names,
    peer_identity, server_config,
};
use tether_pki::{Ca, ClientAuth, PeerCert, RevocationSet, Revoked, SiteIdentity, TrustDomain};
use tether_proto::ids::{RegionId, SiteId};

const BROKER_NAME: &str = "broker.tether.test";

fn td() -> TrustDomain {
    TrustDomain::new("tether.test").unwrap()
}

fn identity(site: &str) -> SiteIdentity {
    SiteIdentity::new(
        td(),
        RegionId::new("eu").unwrap(),
        SiteId::new(site).unwrap(),
    )
}

struct Deployment {
    ca: Ca,
    revocations: Arc<RevocationSet>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivateKeyDer<'static>,
}

impl Deployment {
    fn new() -> Self {
        let ca = Ca::generate(td(), SystemTime::now()).unwrap();
        let (cert, key) = ca
            .issue_server(
                &[BROKER_NAME.into()],
                &["127.0.0.1".parse().unwrap()],
                SystemTime::now(),
                DEFAULT_SERVER_CERT_LIFETIME,
            )
            .unwrap();
        Self {
            ca,
            revocations: Arc::new(RevocationSet::new()),
            server_chain: vec![cert.der],
            server_key: key,
        }
    }

    fn server(&self, auth: ClientAuth) -> ServerConfig {
        server_config(
            self.ca.cert_der(),
            &td(),
            self.server_chain.clone(),
            self.server_key.clone_key(),
            self.revocations.clone(),
            auth,
        )
        .unwrap()
    }

    /// A site certificate issued through the production path (CSR).
    fn site(
        &self,
        site: &str,
        now: SystemTime,
    ) -> (tether_pki::IssuedCert, PrivateKeyDer<'static>) {
        let (key, csr) = site_key_and_csr(site).unwrap();
        let cert = self
            .ca
            .issue_site(&csr, &identity(site), now, DEFAULT_SITE_CERT_LIFETIME)
            .unwrap();
        (cert, key_der(&key))
    }

    fn client(
        &self,
        cert: Option<(&CertificateDer<'static>, PrivateKeyDer<'static>)>,
    ) -> ClientConfig {
        client_config(self.ca.cert_der(), cert.map(|(c, k)| (vec![c.clone()], k))).unwrap()
    }
}

fn key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

/// Runs a handshake in memory. Returns the site identity the broker verified
/// (None without a client certificate), or the first error either side hit.
fn handshake(
    client: ClientConfig,
    server: ServerConfig,
    name: &str,
) -> Result<Option<PeerCert>, Error> {
    let name = ServerName::try_from(name.to_string()).unwrap();
    let mut c = Connection::Client(ClientConnection::new(Arc::new(client), name).unwrap());
    let mut s = Connection::Server(ServerConnection::new(Arc::new(server)).unwrap());
    for _ in 0..10 {
        pump(&mut c, &mut s)?;
        pump(&mut s, &mut c)?;
        if !c.is_handshaking() && !s.is_handshaking() {
            // TLS 1.3: the server judges the client certificate after the
            // client finished; one more flight surfaces its verdict.
            pump(&mut c, &mut s)?;
            let chain = s.peer_certificates().map(|c| c.to_vec());
            return Ok(chain.map(|chain| peer_identity(&chain, &td()).unwrap()));
        }
    }
    panic!("handshake did not finish");
}

fn pump(from: &mut Connection, to: &mut Connection) -> Result<(), Error> {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).unwrap();
    }
    let mut slice = buf.as_slice();
    while !slice.is_empty() {
        to.read_tls(&mut slice).unwrap();
        to.process_new_packets()?;
    }
    Ok(())
}

fn assert_cert_error(
    result: Result<Option<PeerCert>, Error>,
    pred: impl Fn(&CertificateError) -> bool,
    case: &str,
) {
    match result {
        Err(Error::InvalidCertificate(e)) if pred(&e) => {}
        other => panic!("{case}: expected a certificate error, got {other:?}"),
    }
}

#[test]
fn valid_site_certificate_is_accepted_with_its_identity() {
    let d = Deployment::new();
    let (cert, key) = d.site("lab-1", SystemTime::now());
    let peer = handshake(
        d.client(Some((&cert.der, key))),
        d.server(ClientAuth::Required),
        BROKER_NAME,
    )
    .unwrap()
    .unwrap();
    assert_eq!(peer.identity, identity("lab-1"));
    assert_eq!(peer.serial, cert.serial);
    // Also when the broker is dialled by IP address.
    let (cert, key) = d.site("lab-1", SystemTime::now());
    assert!(
        handshake(
            d.client(Some((&cert.der, key))),
            d.server(ClientAuth::Required),
            "127.0.0.1"
        )
        .is_ok()
    );
}

#[test]
fn expired_and_not_yet_valid_are_rejected() {
    let d = Deployment::new();
    let (cert, key) = d.site("lab-1", SystemTime::now() - Duration::from_secs(3 * 86_400));
    assert_cert_error(
        handshake(
            d.client(Some((&cert.der, key))),
            d.server(ClientAuth::Required),
            BROKER_NAME,
        ),
        |e| {
            matches!(
                e,
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            )
        },
        "expired",
    );
    let (cert, key) = d.site("lab-1", SystemTime::now() + Duration::from_secs(86_400));
    assert_cert_error(
        handshake(
            d.client(Some((&cert.der, key))),
            d.server(ClientAuth::Required),
            BROKER_NAME,
        ),
        |e| {
            matches!(
                e,
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }
            )
        },
        "not yet valid",
    );
}

#[test]
fn backdated_not_before_absorbs_small_clock_skew() {
    // Issued "now" by a broker whose clock runs 2 minutes ahead of ours.
    let d = Deployment::new();
    let (cert, key) = d.site("lab-1", SystemTime::now() + Duration::from_secs(120));
    assert!(
        handshake(
            d.client(Some((&cert.der, key))),
            d.server(ClientAuth::Required),
            BROKER_NAME
        )
        .is_ok()
    );
}

#[test]
fn certificate_from_another_ca_is_rejected() {
    let d = Deployment::new();
    let other = Deployment::new();
    let (cert, key) = other.site("lab-1", SystemTime::now());
    assert_cert_error(
        handshake(
            d.client(Some((&cert.der, key))),
            d.server(ClientAuth::Required),
            BROKER_NAME,
        ),
        |e| matches!(e, CertificateError::UnknownIssuer),
        "foreign CA",
    );
}

#[test]
fn revoked_site_and_revoked_serial_are_rejected() {
    let d = Deployment::new();
    let (cert, key) = d.site("lab-1", SystemTime::now());
    d.revocations.revoke(Revoked::Site(identity("lab-1")));
    assert_cert_error(
        handshake(
            d.client(Some((&cert.der, key.clone_key()))),
            d.server(ClientAuth::Required),
            BROKER_NAME,
        ),
        |e| matches!(e, CertificateError::Revoked),
        "revoked site",
    );
    d.revocations.reinstate(&Revoked::Site(identity("lab-1")));
    assert!(
        handshake(
            d.client(Some((&cert.der, key.clone_key()))),
            d.server(ClientAuth::Required),
            BROKER_NAME
        )
        .is_ok()
    );
    d.revocations.revoke(Revoked::Serial(cert.serial.clone()));
    assert_cert_error(
        handshake(
            d.client(Some((&cert.der, key))),
            d.server(ClientAuth::Required),
            BROKER_NAME,
        ),
        |e| matches!(e, CertificateError::Revoked),
        "revoked serial",
    );
    // A new certificate for the same site is not affected by the serial.
    let (fresh, key) = d.site("lab-1", SystemTime::now());
    assert!(
        handshake(
            d.client(Some((&fresh.der, key))),
            d.server(ClientAuth::Required),
            BROKER_NAME
        )
        .is_ok()
    );
}

/// A certificate signed by the right CA with hand-made parameters.
fn crafted(
    d: &Deployment,
    sans: Vec<SanType>,
    eku: Vec<ExtendedKeyUsagePurpose>,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.extended_key_usages = eku;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.is_ca = IsCa::ExplicitNoCa;
    let cert =
        d.ca.sign_leaf(params, &key, SystemTime::now(), DEFAULT_SITE_CERT_LIFETIME)
            .unwrap();
    (cert.der, key_der(&key))
}

#[test]
fn malformed_identities_are_rejected() {
    let d = Deployment::new();
    let uri = |s: &str| SanType::URI(s.try_into().unwrap());
    for (case, sans) in [
        ("no SAN", vec![]),
        (
            "DNS name only",
            vec![SanType::DnsName("lab-1.example".try_into().unwrap())],
        ),
        ("bad path", vec![uri("spiffe://tether.test/region/eu")]),
        (
            "foreign trust domain",
            vec![uri("spiffe://evil.test/region/eu/site/lab-1")],
        ),
        (
            "invalid site id",
            vec![uri("spiffe://tether.test/region/eu/site/Lab_1")],
        ),
        (
            "two identities",
            vec![
                uri("spiffe://tether.test/region/eu/site/a"),
                uri("spiffe://tether.test/region/eu/site/b"),
            ],
        ),
    ] {
        let (cert, key) = crafted(&d, sans, vec![ExtendedKeyUsagePurpose::ClientAuth]);
        assert_cert_error(
            handshake(
                d.client(Some((&cert, key))),
                d.server(ClientAuth::Required),
                BROKER_NAME,
            ),
            |e| matches!(e, CertificateError::Other(_)),
            case,
        );
    }
}

#[test]
fn wrong_key_usage_is_rejected() {
    let d = Deployment::new();
    let san = vec![SanType::URI(
        identity("lab-1").uri().as_str().try_into().unwrap(),
    )];
    // A server-auth certificate presented as a client certificate.
    let (cert, key) = crafted(&d, san, vec![ExtendedKeyUsagePurpose::ServerAuth]);
    assert_cert_error(
        handshake(
            d.client(Some((&cert, key))),
            d.server(ClientAuth::Required),
            BROKER_NAME,
        ),
        |e| {
            matches!(
                e,
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. }
            )
        },
        "serverAuth-only EKU",
    );
}

#[test]
fn missing_client_certificate() {
    let d = Deployment::new();
    let required = handshake(d.client(None), d.server(ClientAuth::Required), BROKER_NAME);
    assert!(
        matches!(required, Err(Error::NoCertificatesPresented)),
        "{required:?}"
    );
    // The enrollment listener accepts the handshake but learns no identity.
    let optional = handshake(d.client(None), d.server(ClientAuth::Optional), BROKER_NAME);
    assert_eq!(optional.unwrap(), None);
    // And still refuses bad certificates when one is presented.
    let other = Deployment::new();
    let (cert, key) = other.site("lab-1", SystemTime::now());
    assert_cert_error(
        handshake(
            d.client(Some((&cert.der, key))),
            d.server(ClientAuth::Optional),
            BROKER_NAME,
        ),
        |e| matches!(e, CertificateError::UnknownIssuer),
        "optional auth, foreign CA",
    );
}

#[test]
fn site_refuses_brokers_it_should_not_trust() {
    let d = Deployment::new();
    let impostor = Deployment::new();
    let (cert, key) = d.site("lab-1", SystemTime::now());
    // A broker certificate from another CA.
    assert_cert_error(
        handshake(
            d.client(Some((&cert.der, key.clone_key()))),
            impostor.server(ClientAuth::Required),
            BROKER_NAME,
        ),
        |e| matches!(e, CertificateError::UnknownIssuer),
        "impostor broker",
    );
    // The right CA, but a name the certificate does not cover.
    assert_cert_error(
        handshake(
            d.client(Some((&cert.der, key))),
            d.server(ClientAuth::Required),
            "other.tether.test",
        ),
        |e| {
            matches!(
                e,
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            )
        },
        "wrong broker name",
    );
}

/// `openssl verify` is an independent implementation of X.509 path
/// validation: it must agree that tether's certificates are valid for their
/// purposes, and that an expired one is not.
#[test]
fn openssl_verifies_issued_certificates() {
    if Command::new("openssl").arg("version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "openssl is required in CI (.ci/run installs it)"
        );
        eprintln!("skipped: openssl not installed");
        return;
    }
    let d = Deployment::new();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let ca = write("ca.pem", d.ca.cert_pem());
    let (site, _) = d.site("lab-1", SystemTime::now());
    let site = write("site.pem", &site.pem);
    let server = write(
        "server.pem",
        &tether_pki::ca::der_to_pem(&d.server_chain[0], "CERTIFICATE"),
    );
    let (expired, _) = d.site("lab-1", SystemTime::now() - Duration::from_secs(3 * 86_400));
    let expired = write("expired.pem", &expired.pem);

    let verify = |purpose: &str, cert: &std::path::Path| {
        let out = Command::new("openssl")
            .args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
            .arg(&ca)
            .arg(cert)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = verify("sslclient", &site);
    assert!(ok && text.contains(": OK"), "site certificate: {text}");
    let (ok, text) = verify("sslserver", &server);
    assert!(ok && text.contains(": OK"), "server certificate: {text}");
    let (ok, text) = verify("sslclient", &expired);
    assert!(
        !ok && text.contains("expired"),
        "expired certificate must fail: {text}"
    );
    // A site certificate is not a server certificate.
    let (ok, _) = verify("sslserver", &site);
    assert!(!ok, "site certificate must not verify for server use");
}

#[test]
fn enrollment_trusts_only_the_pinned_ca() {
    let d = Deployment::new();
    // Brokers send their CA after their certificate, so a new site can check
    // the pin from its enrollment code.
    let mut chain = d.server_chain.clone();
    chain.push(d.ca.cert_der().clone());
    let server = server_config(
        d.ca.cert_der(),
        &td(),
        chain.clone(),
        d.server_key.clone_key(),
        d.revocations.clone(),
        ClientAuth::Optional,
    )
    .unwrap();
    let pin = ca_pin(d.ca.cert_der());
    assert_eq!(pin.len(), 26);
    assert_eq!(
        handshake(enrollment_client_config(&pin).unwrap(), server, BROKER_NAME).unwrap(),
        None
    );

    // A name the broker's certificate does not carry: refused, and noted
    // with the names it does carry.
    let server = server_config(
        d.ca.cert_der(),
        &td(),
        chain.clone(),
        d.server_key.clone_key(),
        d.revocations.clone(),
        ClientAuth::Optional,
    )
    .unwrap();
    let (client, names) = enrollment_client_config_noting_names(&pin).unwrap();
    assert_cert_error(
        handshake(client, server, "other.example"),
        |e| {
            matches!(
                e,
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            )
        },
        "name not in the certificate",
    );
    let noted = names
        .lock()
        .unwrap()
        .clone()
        .expect("a name mismatch noted");
    assert_eq!(noted.dialled, "other.example");
    assert!(
        noted.presented.iter().any(|n| n == BROKER_NAME),
        "{noted:?}"
    );

    // A different pin: refused.
    let other = Deployment::new();
    let server = server_config(
        d.ca.cert_der(),
        &td(),
        chain.clone(),
        d.server_key.clone_key(),
        d.revocations.clone(),
        ClientAuth::Optional,
    )
    .unwrap();
    assert_cert_error(
        handshake(
            enrollment_client_config(&ca_pin(other.ca.cert_der())).unwrap(),
            server,
            BROKER_NAME,
        ),
        |e| matches!(e, CertificateError::Other(o) if o.to_string().contains("no certificate of the CA this enrollment code pins")),
        "wrong pin",
    );
    // An impostor that sends the real CA certificate but signs its own leaf.
    let mut forged = other.server_chain.clone();
    forged.push(d.ca.cert_der().clone());
    let impostor = server_config(
        other.ca.cert_der(),
        &td(),
        forged,
        other.server_key.clone_key(),
        other.revocations.clone(),
        ClientAuth::Optional,
    )
    .unwrap();
    assert!(
        handshake(
            enrollment_client_config(&pin).unwrap(),
            impostor,
            BROKER_NAME
        )
        .is_err()
    );
}

/// During a CA rotation the broker holds a certificate from each CA; an
/// enrolling site names the CA its code pins (by its pin), so a code made
/// before the new CA took over still authenticates the broker, and a code
/// made after it too. A CA the broker does not hold is refused, and noted.
#[test]
fn enrollment_finds_the_pinned_ca_among_the_brokers_certificates() {
    let old = Deployment::new();
    let new = Deployment::new();
    let foreign = Deployment::new();
    // As a broker in phase active: the new CA's certificate first (the
    // default), the old CA's second.
    let slot = Arc::new(
        tether_pki::CertSlot::new(old.server_chain.clone(), old.server_key.clone_key()).unwrap(),
    );
    slot.replace_all(vec![
        (
            vec![new.server_chain[0].clone(), new.ca.cert_der().clone()],
            new.server_key.clone_key(),
        ),
        (
            vec![old.server_chain[0].clone(), old.ca.cert_der().clone()],
            old.server_key.clone_key(),
        ),
    ])
    .unwrap();
    let anchors = Arc::new(
        tether_pki::TrustAnchors::new(&[new.ca.cert_der().clone(), old.ca.cert_der().clone()])
            .unwrap(),
    );
    let server = || {
        tether_pki::tls::server_config_with_trust(
            anchors.clone(),
            &td(),
            slot.clone(),
            old.revocations.clone(),
            ClientAuth::Optional,
        )
        .unwrap()
    };
    for (case, d) in [("code of the old CA", &old), ("code of the new CA", &new)] {
        let (client, names, unserved) =
            tether_pki::tls::enrollment_client_config_noting(&ca_pin(d.ca.cert_der())).unwrap();
        assert_eq!(
            handshake(client, server(), BROKER_NAME).unwrap(),
            None,
            "{case}"
        );
        assert!(names.lock().unwrap().is_none(), "{case}");
        assert!(
            !unserved.load(std::sync::atomic::Ordering::Relaxed),
            "{case}"
        );
    }
    let (client, _, unserved) =
        tether_pki::tls::enrollment_client_config_noting(&ca_pin(foreign.ca.cert_der())).unwrap();
    assert_cert_error(
        handshake(client, server(), BROKER_NAME),
        |e| matches!(e, CertificateError::Other(_)),
        "a CA the broker does not hold",
    );
    assert!(unserved.load(std::sync::atomic::Ordering::Relaxed));
}
