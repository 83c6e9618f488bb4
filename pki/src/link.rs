//! Link identities of brokers, vouched for by the deployment's CA.
//!
//! A broker's broker-to-broker link key is an X25519 (WireGuard) key, which
//! no certificate of the deployment carries. The broker binds it to its
//! place in the fleet with a *link certificate*: a broker certificate the
//! deployment's CA issued (`serverAuth`, [`crate::Ca::issue_server`]) with
//! a key of its own, used for nothing else. Its key signs the statement
//! ([`statement`]): the link key, the broker's fleet id, the link's
//! endpoint and the proof's end. The certificate and the signature
//! travel in the broker's fleet record ([`LinkProof`]).
//!
//! Another broker makes the record a peer of its link only when
//! [`verify`] accepts it: the certificate chains to one of the CAs of its
//! trust bundle (during a rotation, the old and the new CA), it is valid
//! now, it is a broker's (extended key usage `serverAuth`, which site
//! certificates never have, and no site identity), and its key signed
//! exactly the key, id and endpoint the record announces. A record copied
//! under another id, or with another key or endpoint, does not verify.

use std::time::{Duration, SystemTime};

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tether_proto::fleet::LinkProof;
use thiserror::Error;

use crate::ca::{PkiError, spiffe_uris};

/// What every statement starts with, so that the key's signature over it
/// can be taken for nothing else.
pub const STATEMENT_CONTEXT: &[u8] = b"tether broker link key v1\0";

/// The object identifier of the `serverAuth` extended key usage
/// (1.3.6.1.5.5.7.3.1), DER content bytes.
const EKU_SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];

/// The bytes a link certificate's key signs: [`STATEMENT_CONTEXT`], then
/// the fleet id and the endpoint (each as a 2-byte big-endian length and
/// its bytes), the 32 bytes of the link key, and `not_after` (Unix
/// seconds, 8 bytes big-endian).
pub fn statement(fleet_id: &str, endpoint: &str, link_key: &[u8; 32], not_after: u64) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(STATEMENT_CONTEXT.len() + fleet_id.len() + endpoint.len() + 48);
    out.extend_from_slice(STATEMENT_CONTEXT);
    for field in [fleet_id, endpoint] {
        let len = u16::try_from(field.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(field.as_bytes().get(..usize::from(len)).unwrap_or_default());
    }
    out.extend_from_slice(link_key);
    out.extend_from_slice(&not_after.to_be_bytes());
    out
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A broker's link certificate and its key: makes [`LinkProof`]s.
pub struct LinkSigner {
    cert: CertificateDer<'static>,
    key: EcdsaKeyPair,
    not_after: SystemTime,
}

impl std::fmt::Debug for LinkSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkSigner")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl LinkSigner {
    /// The signer of a broker certificate (as [`crate::Ca::issue_server`]
    /// makes it: an ECDSA P-256 key, PKCS#8).
    pub fn new(cert: CertificateDer<'static>, key: &PrivateKeyDer<'_>) -> Result<Self, PkiError> {
        let PrivateKeyDer::Pkcs8(pkcs8) = key else {
            return Err(PkiError::BadCa(
                "the link certificate's key is not PKCS#8".into(),
            ));
        };
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8.secret_pkcs8_der(),
            &SystemRandom::new(),
        )
        .map_err(|e| PkiError::BadCa(format!("the link certificate's key: {e}")))?;
        let (_, not_after) = crate::tls::validity(&cert)
            .map_err(|e| PkiError::BadCa(format!("the link certificate: {e}")))?;
        Ok(Self {
            cert,
            key,
            not_after,
        })
    }

    /// When the certificate, and every proof made with it, expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The proof that broker `fleet_id`, whose link listens at `endpoint`,
    /// holds `link_key`; it holds until the certificate expires.
    pub fn prove(
        &self,
        fleet_id: &str,
        endpoint: &str,
        link_key: &[u8; 32],
    ) -> Result<LinkProof, PkiError> {
        let not_after = unix(self.not_after);
        let signature = self
            .key
            .sign(
                &SystemRandom::new(),
                &statement(fleet_id, endpoint, link_key, not_after),
            )
            .map_err(|e| PkiError::BadCa(format!("signing the link key: {e}")))?;
        Ok(LinkProof {
            cert: data_encoding::BASE64.encode(&self.cert),
            not_after,
            signature: data_encoding::BASE64.encode(signature.as_ref()),
        })
    }
}

/// Why a fleet record's link key is not proven.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LinkProofError {
    /// The record carries no proof (a broker of an earlier release, or a
    /// record not written by a broker).
    #[error("the record carries no proof of its link key")]
    Missing,
    /// The certificate or the signature cannot be read.
    #[error("the proof cannot be read: {0}")]
    Malformed(String),
    /// The certificate does not chain to a CA of the trust bundle.
    #[error("the certificate is not from a CA of the deployment's trust bundle ({0})")]
    Untrusted(String),
    /// The certificate is not a broker's (a site's, or without
    /// `serverAuth`).
    #[error("the certificate is not a broker certificate ({0})")]
    NotABroker(String),
    /// The certificate or the proof is past its end, or not yet valid.
    #[error("the proof is not valid now ({0})")]
    Expired(String),
    /// The signature does not cover this key, id and endpoint.
    #[error("the signature does not cover the announced link key, fleet id and endpoint")]
    BadSignature,
}

impl LinkProofError {
    /// A short word for logs and tests.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed(_) => "malformed",
            Self::Untrusted(_) => "untrusted",
            Self::NotABroker(_) => "not_a_broker",
            Self::Expired(_) => "expired",
            Self::BadSignature => "bad_signature",
        }
    }
}

/// Checks that `proof` makes `link_key` the key of broker `fleet_id`
/// whose link listens at `endpoint`, under the CAs of `anchors` (the trust
/// bundle) at `now`. Returns when the proof ends.
pub fn verify(
    proof: &LinkProof,
    fleet_id: &str,
    endpoint: &str,
    link_key: &[u8; 32],
    anchors: &[CertificateDer<'_>],
    now: SystemTime,
) -> Result<SystemTime, LinkProofError> {
    let cert = data_encoding::BASE64
        .decode(proof.cert.as_bytes())
        .map_err(|e| LinkProofError::Malformed(format!("certificate: {e}")))?;
    let signature = data_encoding::BASE64
        .decode(proof.signature.as_bytes())
        .map_err(|e| LinkProofError::Malformed(format!("signature: {e}")))?;
    let ends = SystemTime::UNIX_EPOCH + Duration::from_secs(proof.not_after);
    if now >= ends {
        return Err(LinkProofError::Expired(format!(
            "it ended at Unix time {}",
            proof.not_after
        )));
    }
    let cert = CertificateDer::from(cert);
    let ee = webpki::EndEntityCert::try_from(&cert)
        .map_err(|e| LinkProofError::Malformed(format!("certificate: {e}")))?;
    let anchors: Vec<_> = anchors
        .iter()
        .filter_map(|ca| webpki::anchor_from_trusted_cert(ca).ok())
        .collect();
    let at = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    ee.verify_for_usage(
        &[webpki::ring::ECDSA_P256_SHA256],
        &anchors,
        &[],
        at,
        webpki::KeyUsage::required(EKU_SERVER_AUTH),
        None,
        None,
    )
    .map_err(|e| match e {
        // Without the time of the check, so that one record's reason stays
        // the same from one check to the next.
        webpki::Error::CertExpired { not_after, .. } => LinkProofError::Expired(format!(
            "the certificate ended at Unix time {}",
            not_after.as_secs()
        )),
        webpki::Error::CertNotValidYet { not_before, .. } => LinkProofError::Expired(format!(
            "the certificate starts at Unix time {}",
            not_before.as_secs()
        )),
        webpki::Error::RequiredEkuNotFoundContext(_) | webpki::Error::EmptyEkuExtension => {
            LinkProofError::NotABroker("no serverAuth extended key usage".into())
        }
        e => LinkProofError::Untrusted(e.to_string()),
    })?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert)
        .map_err(|e| LinkProofError::Malformed(format!("certificate: {e}")))?;
    // Site certificates carry a SPIFFE identity; broker certificates none.
    if !spiffe_uris(&parsed).is_empty() {
        return Err(LinkProofError::NotABroker(
            "it carries a site identity".into(),
        ));
    }
    // A proof ends with its certificate at the latest.
    let cert_ends = u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0);
    if proof.not_after > cert_ends {
        return Err(LinkProofError::Malformed(format!(
            "it claims to hold until {} past its certificate's end {cert_ends}",
            proof.not_after
        )));
    }
    ee.verify_signature(
        webpki::ring::ECDSA_P256_SHA256,
        &statement(fleet_id, endpoint, link_key, proof.not_after),
        &signature,
    )
    .map_err(|_| LinkProofError::BadSignature)?;
    Ok(ends)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{Ca, DEFAULT_SERVER_CERT_LIFETIME, site_key_and_csr};
    use crate::identity::{SiteIdentity, TrustDomain};
    use tether_proto::ids::{RegionId, SiteId};

    fn td() -> TrustDomain {
        TrustDomain::new("tether.test").unwrap()
    }

    fn signer_of(ca: &Ca, now: SystemTime, lifetime: Duration) -> LinkSigner {
        let (cert, key) = ca
            .issue_server(&["broker.test".into()], &[], now, lifetime)
            .unwrap();
        LinkSigner::new(cert.der, &key).unwrap()
    }

    const ID: &str = "00000000000000a1";
    const ENDPOINT: &str = "10.0.0.5:51821";
    const KEY: [u8; 32] = [7u8; 32];

    fn check(
        proof: &LinkProof,
        anchors: &[&Ca],
        now: SystemTime,
    ) -> Result<SystemTime, LinkProofError> {
        let ders: Vec<CertificateDer<'static>> =
            anchors.iter().map(|ca| ca.cert_der().clone()).collect();
        verify(proof, ID, ENDPOINT, &KEY, &ders, now)
    }

    #[test]
    fn a_proof_from_the_deployments_ca_verifies_and_holds_until_its_certificate_ends() {
        let now = SystemTime::now();
        let ca = Ca::generate(td(), now).unwrap();
        let signer = signer_of(&ca, now, DEFAULT_SERVER_CERT_LIFETIME);
        let proof = signer.prove(ID, ENDPOINT, &KEY).unwrap();
        let ends = check(&proof, &[&ca], now).unwrap();
        assert_eq!(unix(ends), unix(signer.not_after()));
        assert_eq!(proof.not_after, unix(signer.not_after()));
        // It survives the fleet record's JSON.
        let json = serde_json::to_string(&proof).unwrap();
        let again: LinkProof = serde_json::from_str(&json).unwrap();
        assert_eq!(check(&again, &[&ca], now).unwrap(), ends);
    }

    #[test]
    fn a_proof_from_another_ca_is_untrusted() {
        let now = SystemTime::now();
        let ours = Ca::generate(td(), now).unwrap();
        // Another deployment's CA, even of the same trust domain.
        let other = Ca::generate(td(), now).unwrap();
        let proof = signer_of(&other, now, DEFAULT_SERVER_CERT_LIFETIME)
            .prove(ID, ENDPOINT, &KEY)
            .unwrap();
        let err = check(&proof, &[&ours], now).unwrap_err();
        assert_eq!(err.kind(), "untrusted", "{err}");
        // A self-signed certificate is no better.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["broker.test".into()]).unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.self_signed(&key).unwrap();
        let pkcs8 = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signer = LinkSigner::new(cert.der().clone(), &pkcs8).unwrap();
        let err = check(&signer.prove(ID, ENDPOINT, &KEY).unwrap(), &[&ours], now).unwrap_err();
        assert_eq!(err.kind(), "untrusted", "{err}");
    }

    #[test]
    fn a_site_certificate_is_not_a_broker_certificate() {
        let now = SystemTime::now();
        let ca = Ca::generate(td(), now).unwrap();
        // A real site certificate, signing with the site's own key.
        let (site_key, csr) = site_key_and_csr("lab-1").unwrap();
        let identity = SiteIdentity::new(
            td(),
            RegionId::new("eu").unwrap(),
            SiteId::new("lab-1").unwrap(),
        );
        let cert = ca
            .issue_site(&csr, &identity, now, Duration::from_secs(3600))
            .unwrap();
        let pkcs8 = PrivateKeyDer::Pkcs8(site_key.serialize_der().into());
        let signer = LinkSigner::new(cert.der, &pkcs8).unwrap();
        let proof = signer.prove(ID, ENDPOINT, &KEY).unwrap();
        let err = check(&proof, &[&ca], now).unwrap_err();
        assert_eq!(err.kind(), "not_a_broker", "{err}");

        // Nor is one without any extended key usage, or one naming a site
        // next to serverAuth.
        for (ekus, sans) in [
            (vec![], vec![]),
            (
                vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth],
                vec![rcgen::SanType::URI(
                    identity.uri().as_str().try_into().unwrap(),
                )],
            ),
        ] {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = rcgen::CertificateParams::default();
            params.extended_key_usages = ekus;
            params.subject_alt_names = sans;
            let cert = ca
                .sign_leaf(params, &key, now, Duration::from_secs(3600))
                .unwrap();
            let pkcs8 = PrivateKeyDer::Pkcs8(key.serialize_der().into());
            let signer = LinkSigner::new(cert.der, &pkcs8).unwrap();
            let err = check(&signer.prove(ID, ENDPOINT, &KEY).unwrap(), &[&ca], now).unwrap_err();
            assert_eq!(err.kind(), "not_a_broker", "{err}");
        }
    }

    #[test]
    fn an_expired_proof_or_certificate_is_refused() {
        let now = SystemTime::now();
        let ca = Ca::generate(td(), now).unwrap();
        let signer = signer_of(&ca, now, Duration::from_secs(600));
        let proof = signer.prove(ID, ENDPOINT, &KEY).unwrap();
        assert!(check(&proof, &[&ca], now + Duration::from_secs(590)).is_ok());
        let err = check(&proof, &[&ca], now + Duration::from_secs(601)).unwrap_err();
        assert_eq!(err.kind(), "expired", "{err}");
        // A proof claiming a later end than its certificate's: the
        // signature covers the end it claims, so it cannot be stretched,
        // and the certificate's end decides.
        let mut stretched = proof.clone();
        stretched.not_after += 86_400;
        let err = check(&stretched, &[&ca], now).unwrap_err();
        assert_eq!(err.kind(), "malformed", "{err}");
        let err = check(&stretched, &[&ca], now + Duration::from_secs(700)).unwrap_err();
        assert_eq!(err.kind(), "expired", "{err}");
        // Before the certificate's start (backdated an hour).
        let err = check(&proof, &[&ca], now - Duration::from_secs(7200)).unwrap_err();
        assert_eq!(err.kind(), "expired", "{err}");
    }

    #[test]
    fn a_proof_binds_the_key_the_id_and_the_endpoint() {
        let now = SystemTime::now();
        let ca = Ca::generate(td(), now).unwrap();
        let signer = signer_of(&ca, now, DEFAULT_SERVER_CERT_LIFETIME);
        let proof = signer.prove(ID, ENDPOINT, &KEY).unwrap();
        let anchors = [ca.cert_der().clone()];
        let verify_as = |id: &str, endpoint: &str, key: &[u8; 32], proof: &LinkProof| {
            verify(proof, id, endpoint, key, &anchors, now)
        };
        assert!(verify_as(ID, ENDPOINT, &KEY, &proof).is_ok());
        let mut other_key = KEY;
        other_key[31] ^= 1;
        for (id, endpoint, key) in [
            ("00000000000000a2", ENDPOINT, &KEY),
            (ID, "10.0.0.6:51821", &KEY),
            (ID, ENDPOINT, &other_key),
        ] {
            let err = verify_as(id, endpoint, key, &proof).unwrap_err();
            assert_eq!(err, LinkProofError::BadSignature, "{id} {endpoint}");
        }
        // The field boundaries are part of what is signed.
        assert_ne!(statement("ab", "c", &KEY, 1), statement("a", "bc", &KEY, 1));
        // A tampered signature, or another broker's valid signature.
        let mut tampered = proof.clone();
        let mut sig = data_encoding::BASE64
            .decode(tampered.signature.as_bytes())
            .unwrap();
        let last = sig.len() - 1;
        sig[last] ^= 1;
        tampered.signature = data_encoding::BASE64.encode(&sig);
        assert!(verify_as(ID, ENDPOINT, &KEY, &tampered).is_err());
        let other = signer_of(&ca, now, DEFAULT_SERVER_CERT_LIFETIME);
        let mut swapped = proof.clone();
        swapped.signature = other.prove(ID, ENDPOINT, &KEY).unwrap().signature;
        assert_eq!(
            verify_as(ID, ENDPOINT, &KEY, &swapped).unwrap_err(),
            LinkProofError::BadSignature
        );
        // Garbage.
        let mut garbage = proof.clone();
        garbage.cert = "not base64!".into();
        assert_eq!(
            verify_as(ID, ENDPOINT, &KEY, &garbage).unwrap_err().kind(),
            "malformed"
        );
    }

    #[test]
    fn during_a_rotation_proofs_of_the_old_and_the_new_ca_verify() {
        let now = SystemTime::now();
        let old = Ca::generate(td(), now).unwrap();
        let new = Ca::generate(td(), now).unwrap();
        let by_old = signer_of(&old, now, DEFAULT_SERVER_CERT_LIFETIME)
            .prove(ID, ENDPOINT, &KEY)
            .unwrap();
        let by_new = signer_of(&new, now, DEFAULT_SERVER_CERT_LIFETIME)
            .prove(ID, ENDPOINT, &KEY)
            .unwrap();
        // Prepared (old signs, new trusted) and active (new signs, old
        // still trusted): the bundle holds both, the signing CA first.
        for bundle in [[&old, &new], [&new, &old]] {
            assert!(check(&by_old, &bundle, now).is_ok());
            assert!(check(&by_new, &bundle, now).is_ok());
        }
        // Once the old CA is retired, its proofs no longer verify.
        assert_eq!(
            check(&by_old, &[&new], now).unwrap_err().kind(),
            "untrusted"
        );
        assert!(check(&by_new, &[&new], now).is_ok());
    }
}
