//! rustls configurations for brokers and sites.
//!
//! TLS 1.3 only, the ring provider, and trust in the deployment's CAs: one,
//! or two during a CA rotation (the trust bundle). The broker's client-certificate verifier runs webpki's
//! chain validation (signature, validity period, `clientAuth` extended key
//! usage) and then tether's own rules: exactly one SPIFFE identity of the
//! deployment's trust domain, not revoked.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};

use crate::ca::spiffe_uris;
use crate::identity::{IdentityError, SiteIdentity, TrustDomain};
use crate::revocation::RevocationSet;

/// The crypto provider tether uses everywhere.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Whether a listener demands a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// The handshake fails without a valid site certificate.
    Required,
    /// A certificate is requested and verified if sent, but not required:
    /// for listeners that also serve enrollment, where the HTTP layer then
    /// refuses every other route to an unauthenticated peer.
    Optional,
}

/// What the broker learns from a verified site certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// The site's identity.
    pub identity: SiteIdentity,
    /// The certificate's serial number.
    pub serial: Vec<u8>,
    /// When the certificate expires (a session must end then).
    pub not_after: SystemTime,
}

/// Reads the identity from the end-entity certificate of a peer chain that
/// the TLS stack has already verified.
pub fn peer_identity(
    chain: &[CertificateDer<'_>],
    trust_domain: &TrustDomain,
) -> Result<PeerCert, IdentityError> {
    let end_entity = chain.first().ok_or(IdentityError::SpiffeCount(0))?;
    let (_, cert) = x509_parser::parse_x509_certificate(end_entity)
        .map_err(|e| IdentityError::NotSpiffe(format!("unparsable certificate: {e}")))?;
    let uris = spiffe_uris(&cert);
    let [uri] = uris.as_slice() else {
        return Err(IdentityError::SpiffeCount(uris.len()));
    };
    let identity = SiteIdentity::parse(uri, trust_domain)?;
    let not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);
    Ok(PeerCert {
        identity,
        serial: cert.raw_serial().to_vec(),
        not_after,
    })
}

/// The validity period (not before, not after) of a certificate.
pub fn validity(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| IdentityError::NotSpiffe(format!("unparsable certificate: {e}")))?;
    let at = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    Ok((
        at(cert.validity().not_before.timestamp()),
        at(cert.validity().not_after.timestamp()),
    ))
}

fn roots(ca: &CertificateDer<'_>) -> Result<Arc<RootCertStore>, Error> {
    roots_of(std::slice::from_ref(ca))
}

fn roots_of(cas: &[CertificateDer<'_>]) -> Result<Arc<RootCertStore>, Error> {
    let mut store = RootCertStore::empty();
    for ca in cas {
        store.add(ca.clone().into_owned())?;
    }
    if store.is_empty() {
        return Err(Error::General("an empty trust bundle".into()));
    }
    Ok(Arc::new(store))
}

/// The subject of a CA certificate as TLS names it (the `certificate
/// authorities` extension of RFC 8446 section 4.2.4).
fn subject_of(ca: &CertificateDer<'_>) -> Result<DistinguishedName, Error> {
    roots(ca)?
        .subjects()
        .into_iter()
        .next()
        .ok_or_else(|| Error::General("a CA certificate without a subject".into()))
}

/// The CAs a broker trusts for site certificates: the deployment's trust
/// bundle, replaceable while it serves (a CA rotation changes it without
/// a restart and without touching established connections).
#[derive(Debug)]
pub struct TrustAnchors {
    current: RwLock<Arc<dyn ClientCertVerifier>>,
}

impl TrustAnchors {
    /// Anchors trusting every CA in `cas`.
    pub fn new(cas: &[CertificateDer<'_>]) -> Result<Self, Error> {
        Ok(Self {
            current: RwLock::new(Self::verifier(cas)?),
        })
    }

    fn verifier(cas: &[CertificateDer<'_>]) -> Result<Arc<dyn ClientCertVerifier>, Error> {
        // Optional at this layer: `SiteVerifier` decides whether a
        // certificate is mandatory.
        WebPkiClientVerifier::builder_with_provider(roots_of(cas)?, provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| Error::General(e.to_string()))
            .map(|v| v as Arc<dyn ClientCertVerifier>)
    }

    /// Trusts exactly `cas` from the next handshake on.
    pub fn replace(&self, cas: &[CertificateDer<'_>]) -> Result<(), Error> {
        let verifier = Self::verifier(cas)?;
        if let Ok(mut current) = self.current.write() {
            *current = verifier;
        }
        Ok(())
    }

    fn get(&self) -> Result<Arc<dyn ClientCertVerifier>, Error> {
        self.current
            .read()
            .map(|v| v.clone())
            .map_err(|_| Error::General("trust anchors lock poisoned".into()))
    }
}

/// The broker's verifier of site certificates.
#[derive(Debug)]
struct SiteVerifier {
    anchors: Arc<TrustAnchors>,
    provider: Arc<CryptoProvider>,
    trust_domain: TrustDomain,
    revocations: Arc<RevocationSet>,
    mandatory: bool,
}

impl ClientCertVerifier for SiteVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // A site holds one certificate: no hint is needed to choose it.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.anchors
            .get()?
            .verify_client_cert(end_entity, intermediates, now)?;
        let peer =
            peer_identity(std::slice::from_ref(end_entity), &self.trust_domain).map_err(|e| {
                Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
            })?;
        if self.revocations.is_revoked(&peer.identity, &peer.serial) {
            tracing::info!(identity = %peer.identity, "refused a revoked site certificate");
            return Err(Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The broker's current certificates, replaceable while it serves: the
/// broker renews its certificate before it expires without a restart.
///
/// During a CA rotation it holds one certificate per trusted CA. A client
/// that names the CAs it trusts (TLS 1.3 `certificate_authorities`, which
/// tether's agents send) gets the certificate from a CA it knows, so a
/// site that was offline while a new CA took over still recognises the
/// broker. A site enrolling knows its CA only by the pin of its
/// enrollment code and names it by [`pin_hint`], so a code made before a
/// new CA took over still finds the broker certificate of the CA it pins.
/// Any other client gets the first (the signing CA's).
#[derive(Debug)]
pub struct CertSlot {
    current: RwLock<Vec<IssuedBy>>,
}

/// A server certificate with the subject of the CA that issued it and
/// that CA's [`pin_hint`] (none for a chain without its CA).
#[derive(Debug)]
struct IssuedBy {
    issuer: Option<(DistinguishedName, DistinguishedName)>,
    cert: Arc<CertifiedKey>,
}

impl IssuedBy {
    fn named_in(&self, known: &[DistinguishedName]) -> bool {
        self.issuer.as_ref().is_some_and(|(subject, pin)| {
            known
                .iter()
                .any(|k| k.as_ref() == subject.as_ref() || k.as_ref() == pin.as_ref())
        })
    }
}

/// DER: a tag and its contents (lengths under 128 bytes only, which is all
/// [`pin_hint`] needs).
fn der(tag: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = vec![tag, u8::try_from(contents.len()).unwrap_or(0x7f)];
    out.extend_from_slice(contents);
    out
}

/// How an enrolling site names the CA its enrollment code pins in the TLS
/// `certificate_authorities` extension: a distinguished name with the
/// single common name `tether CA pin <pin>`. The site does not know the
/// CA's own subject yet; brokers match this name against the pins of their
/// CAs (other servers ignore it as a CA they do not have).
pub fn pin_hint(pin: &str) -> DistinguishedName {
    // 2.5.4.3, the common name.
    const CN: [u8; 5] = [0x06, 0x03, 0x55, 0x04, 0x03];
    let value = format!("tether CA pin {}", pin.to_ascii_lowercase());
    let mut attribute = CN.to_vec();
    attribute.extend(der(0x0c, value.as_bytes()));
    DistinguishedName::in_sequence(&der(0x31, &der(0x30, &attribute)))
}

/// One server certificate: the chain (leaf first, its CA last) and key.
pub type ServerCert = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

impl CertSlot {
    /// A slot holding `chain` and `key`.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, Error> {
        Ok(Self {
            current: RwLock::new(Self::entries(vec![(chain, key)])?),
        })
    }

    fn entries(certs: Vec<ServerCert>) -> Result<Vec<IssuedBy>, Error> {
        let mut out = Vec::new();
        for (chain, key) in certs {
            // The issuer is the CA at the end of the chain; a chain of one
            // certificate matches no hint.
            let issuer = match chain.get(1..).and_then(<[_]>::last) {
                Some(ca) => Some((subject_of(ca)?, pin_hint(&ca_pin(ca)))),
                None => None,
            };
            out.push(IssuedBy {
                issuer,
                cert: Arc::new(CertifiedKey::from_der(chain, key, &provider())?),
            });
        }
        if out.is_empty() {
            return Err(Error::General("no server certificate".into()));
        }
        Ok(out)
    }

    /// Replaces the certificate for new handshakes.
    pub fn replace(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), Error> {
        self.replace_all(vec![(chain, key)])
    }

    /// Replaces the certificates for new handshakes: one per trusted CA,
    /// the default (for clients that name no CA) first.
    pub fn replace_all(&self, certs: Vec<ServerCert>) -> Result<(), Error> {
        let entries = Self::entries(certs)?;
        if let Ok(mut current) = self.current.write() {
            *current = entries;
        }
        Ok(())
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self.current.read().ok()?;
        if let Some(known) = hello.certificate_authorities()
            && let Some(entry) = current.iter().find(|e| e.named_in(known))
        {
            return Some(entry.cert.clone());
        }
        current.first().map(|e| e.cert.clone())
    }
}

/// A broker's server configuration: its certificate chain and key, site
/// certificates verified against `ca` with `revocations` consulted at every
/// handshake.
pub fn server_config(
    ca: &CertificateDer<'_>,
    trust_domain: &TrustDomain,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    revocations: Arc<RevocationSet>,
    client_auth: ClientAuth,
) -> Result<ServerConfig, Error> {
    let slot = Arc::new(CertSlot::new(chain, key)?);
    server_config_with_cert(ca, trust_domain, slot, revocations, client_auth)
}

/// Like [`server_config`], with the certificate taken from `cert` at each
/// handshake.
pub fn server_config_with_cert(
    ca: &CertificateDer<'_>,
    trust_domain: &TrustDomain,
    cert: Arc<dyn ResolvesServerCert>,
    revocations: Arc<RevocationSet>,
    client_auth: ClientAuth,
) -> Result<ServerConfig, Error> {
    let anchors = Arc::new(TrustAnchors::new(std::slice::from_ref(ca))?);
    server_config_with_trust(anchors, trust_domain, cert, revocations, client_auth)
}

/// Like [`server_config_with_cert`], trusting the CAs of `anchors` as they
/// are at each handshake.
pub fn server_config_with_trust(
    anchors: Arc<TrustAnchors>,
    trust_domain: &TrustDomain,
    cert: Arc<dyn ResolvesServerCert>,
    revocations: Arc<RevocationSet>,
    client_auth: ClientAuth,
) -> Result<ServerConfig, Error> {
    let provider = provider();
    let verifier = SiteVerifier {
        anchors,
        provider: provider.clone(),
        trust_domain: trust_domain.clone(),
        revocations,
        mandatory: client_auth == ClientAuth::Required,
    };
    Ok(ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(cert))
}

/// A site's (or operator tool's) client configuration: trusts only `ca`,
/// and presents `identity` (certificate chain and key) when given.
pub fn client_config(
    ca: &CertificateDer<'_>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, Error> {
    client_config_with_clock(ca, identity, 0)
}

/// The wall clock moved by a number of seconds: the clock of a host whose
/// time is wrong, for `tether doctor`'s checks under a shifted clock.
#[derive(Debug, Clone, Copy)]
pub struct ShiftedClock(pub i64);

impl ShiftedClock {
    /// The shifted time now.
    pub fn now(&self) -> SystemTime {
        let now = SystemTime::now();
        let by = Duration::from_secs(self.0.unsigned_abs());
        if self.0 >= 0 { now + by } else { now - by }
    }
}

impl rustls::time_provider::TimeProvider for ShiftedClock {
    fn current_time(&self) -> Option<UnixTime> {
        self.now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()
            .map(UnixTime::since_unix_epoch)
    }
}

/// As [`client_config`], judging the broker's certificate by a clock
/// shifted by `offset_secs` (0: the host's own).
pub fn client_config_with_clock(
    ca: &CertificateDer<'_>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    offset_secs: i64,
) -> Result<ClientConfig, Error> {
    client_config_trusting(std::slice::from_ref(ca), identity, offset_secs)
}

/// A site's client configuration trusting every CA of a trust bundle,
/// which it names to the broker (`certificate_authorities`) so the broker
/// presents a certificate from one of them; the broker's certificate is
/// judged by a clock shifted by `offset_secs` (0: the host's own).
pub fn client_config_trusting(
    bundle: &[CertificateDer<'_>],
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    offset_secs: i64,
) -> Result<ClientConfig, Error> {
    let provider = provider();
    let verifier = broker_verifier(bundle)?;
    let builder = ClientConfig::builder_with_details(provider, Arc::new(ShiftedClock(offset_secs)))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// How a site verifies brokers (as in [`client_config_trusting`]): webpki
/// against every CA of `bundle`, naming them in the ClientHello.
pub fn broker_verifier(
    bundle: &[CertificateDer<'_>],
) -> Result<Arc<dyn ServerCertVerifier>, Error> {
    let roots = roots_of(bundle)?;
    let subjects = roots.subjects();
    let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| Error::General(e.to_string()))?;
    Ok(Arc::new(NamingVerifier { webpki, subjects }))
}

/// webpki's verification of the broker, naming the trusted CAs in the
/// ClientHello.
#[derive(Debug)]
struct NamingVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    subjects: Vec<DistinguishedName>,
}

impl ServerCertVerifier for NamingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        Some(&self.subjects)
    }
}

/// The pin of a CA certificate: the first 128 bits of the SHA-256 of its
/// DER encoding, in lowercase base32 (26 characters).
pub fn ca_pin(ca: &CertificateDer<'_>) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(ca.as_ref());
    data_encoding::BASE32_NOPAD
        .encode(digest.get(..16).unwrap_or_default())
        .to_ascii_lowercase()
}

/// Verifies a broker before enrollment: its chain must contain a CA
/// certificate whose pin matches, and the broker's certificate must chain to
/// that CA and name the broker.
#[derive(Debug)]
struct PinnedVerifier {
    pin: String,
    /// The pinned CA named to the broker ([`pin_hint`]).
    hint: Vec<DistinguishedName>,
    provider: Arc<CryptoProvider>,
    /// Where a certificate that does not name the address dialled is noted.
    names: Option<NameMismatchSlot>,
    /// Set when the broker showed no certificate of the pinned CA.
    unserved: Option<PinNotServedSlot>,
}

/// Set by the verifier of [`enrollment_client_config_noting`] when the
/// broker showed no certificate of the pinned CA ([`PinNotServed`]).
pub type PinNotServedSlot = Arc<std::sync::atomic::AtomicBool>;

/// The broker showed no certificate of the CA an enrollment code pins:
/// the code was made before that CA was retired by a CA rotation, or the
/// broker is not the deployment's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the broker showed no certificate of the CA this enrollment code pins: \
     either the code was made before a CA rotation retired that CA (make a new code: \
     `tether-broker token create`), or this is not the deployment's broker"
)]
pub struct PinNotServed;

/// A broker certificate that did not name the address dialled, as the
/// enrollment verifier saw it (rustls's `CertificateError::NotValidForName`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameMismatch {
    /// The name or address dialled.
    pub dialled: String,
    /// The names and addresses the certificate carries, when rustls reports
    /// them.
    pub presented: Vec<String>,
}

/// A subject name as rustls reports it (`DnsName("broker.example")`,
/// `IpAddress(203.0.113.10)`) in plain words; other kinds of name are left
/// out.
fn plain_name(reported: &str) -> Option<String> {
    if let Some(dns) = reported
        .strip_prefix("DnsName(\"")
        .and_then(|r| r.strip_suffix("\")"))
    {
        Some(dns.to_string())
    } else {
        reported
            .strip_prefix("IpAddress(")
            .and_then(|r| r.strip_suffix(')'))
            .map(str::to_string)
    }
}

/// Where [`enrollment_client_config_noting_names`] notes a [`NameMismatch`].
pub type NameMismatchSlot = Arc<std::sync::Mutex<Option<NameMismatch>>>;

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let Some(ca) = intermediates.iter().find(|c| ca_pin(c) == self.pin) else {
            if let Some(slot) = &self.unserved {
                slot.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            return Err(Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(PinNotServed)),
            )));
        };
        let verdict =
            WebPkiServerVerifier::builder_with_provider(roots(ca)?, self.provider.clone())
                .build()
                .map_err(|e| Error::General(e.to_string()))?
                .verify_server_cert(end_entity, &[], server_name, ocsp_response, now);
        if let (Err(Error::InvalidCertificate(e)), Some(slot)) = (&verdict, &self.names) {
            let presented = match e {
                CertificateError::NotValidForNameContext { presented, .. } => {
                    Some(presented.iter().filter_map(|n| plain_name(n)).collect())
                }
                CertificateError::NotValidForName => Some(Vec::new()),
                _ => None,
            };
            if let Some(presented) = presented
                && let Ok(mut noted) = slot.lock()
            {
                *noted = Some(NameMismatch {
                    dialled: server_name.to_str().into_owned(),
                    presented,
                });
            }
        }
        verdict
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        Some(&self.hint)
    }
}

/// The client configuration for enrollment: no client certificate, and the
/// broker authenticated through the CA pin of the enrollment code.
pub fn enrollment_client_config(ca_pin: &str) -> Result<ClientConfig, Error> {
    pinned_client_config(ca_pin, None, None)
}

/// As [`enrollment_client_config`], and notes in the slot returned when a
/// broker's certificate (signed by the pinned CA) does not name the
/// address dialled, so enrollment can say which names it does carry.
pub fn enrollment_client_config_noting_names(
    ca_pin: &str,
) -> Result<(ClientConfig, NameMismatchSlot), Error> {
    let slot = NameMismatchSlot::default();
    Ok((
        pinned_client_config(ca_pin, Some(slot.clone()), None)?,
        slot,
    ))
}

/// As [`enrollment_client_config_noting_names`], and also notes when the
/// broker showed no certificate of the pinned CA at all, so enrollment can
/// say that plainly ([`PinNotServed`]).
pub fn enrollment_client_config_noting(
    ca_pin: &str,
) -> Result<(ClientConfig, NameMismatchSlot, PinNotServedSlot), Error> {
    let names = NameMismatchSlot::default();
    let unserved = PinNotServedSlot::default();
    let config = pinned_client_config(ca_pin, Some(names.clone()), Some(unserved.clone()))?;
    Ok((config, names, unserved))
}

fn pinned_client_config(
    ca_pin: &str,
    names: Option<NameMismatchSlot>,
    unserved: Option<PinNotServedSlot>,
) -> Result<ClientConfig, Error> {
    let provider = provider();
    let verifier = PinnedVerifier {
        pin: ca_pin.to_ascii_lowercase(),
        hint: vec![pin_hint(ca_pin)],
        provider: provider.clone(),
        names,
        unserved,
    };
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}
