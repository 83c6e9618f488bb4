//! rustls configurations for brokers and sites.
//!
//! TLS 1.3 only, the ring provider, and trust in exactly one root: the
//! deployment's CA. The broker's client-certificate verifier runs webpki's
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
    let mut store = RootCertStore::empty();
    store.add(ca.clone().into_owned())?;
    Ok(Arc::new(store))
}

/// The broker's verifier of site certificates.
#[derive(Debug)]
struct SiteVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
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
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.webpki
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
}

/// The broker's current certificate, replaceable while it serves: the
/// broker renews its certificate before it expires without a restart.
#[derive(Debug)]
pub struct CertSlot {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertSlot {
    /// A slot holding `chain` and `key`.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, Error> {
        Ok(Self {
            current: RwLock::new(Arc::new(CertifiedKey::from_der(chain, key, &provider())?)),
        })
    }

    /// Replaces the certificate for new handshakes.
    pub fn replace(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<(), Error> {
        let certified = Arc::new(CertifiedKey::from_der(chain, key, &provider())?);
        if let Ok(mut current) = self.current.write() {
            *current = certified;
        }
        Ok(())
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| c.clone())
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
    let provider = provider();
    let mut builder = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider.clone());
    if client_auth == ClientAuth::Optional {
        builder = builder.allow_unauthenticated();
    }
    let webpki = builder.build().map_err(|e| Error::General(e.to_string()))?;
    let verifier = SiteVerifier {
        webpki,
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
    let provider = provider();
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(ca)?, provider.clone())
        .build()
        .map_err(|e| Error::General(e.to_string()))?;
    let builder = ClientConfig::builder_with_details(provider, Arc::new(ShiftedClock(offset_secs)))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(verifier);
    match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key),
        None => Ok(builder.with_no_client_auth()),
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
    provider: Arc<CryptoProvider>,
    /// Where a certificate that does not name the address dialled is noted.
    names: Option<NameMismatchSlot>,
}

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
        let ca = intermediates
            .iter()
            .find(|c| ca_pin(c) == self.pin)
            .ok_or(Error::InvalidCertificate(CertificateError::UnknownIssuer))?;
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
}

/// The client configuration for enrollment: no client certificate, and the
/// broker authenticated through the CA pin of the enrollment code.
pub fn enrollment_client_config(ca_pin: &str) -> Result<ClientConfig, Error> {
    pinned_client_config(ca_pin, None)
}

/// As [`enrollment_client_config`], and notes in the slot returned when a
/// broker's certificate (signed by the pinned CA) does not name the
/// address dialled, so enrollment can say which names it does carry.
pub fn enrollment_client_config_noting_names(
    ca_pin: &str,
) -> Result<(ClientConfig, NameMismatchSlot), Error> {
    let slot = NameMismatchSlot::default();
    Ok((pinned_client_config(ca_pin, Some(slot.clone()))?, slot))
}

fn pinned_client_config(
    ca_pin: &str,
    names: Option<NameMismatchSlot>,
) -> Result<ClientConfig, Error> {
    let provider = provider();
    let verifier = PinnedVerifier {
        pin: ca_pin.to_ascii_lowercase(),
        provider: provider.clone(),
        names,
    };
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}
