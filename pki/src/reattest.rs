//! Re-attestation: a site whose certificate has expired proves, with the key
//! of its last certificate, that it is still the enrolled site, and gets a
//! new certificate without a new enrollment code.
//!
//! The site sends its last certificate, a CSR for a new key, and a
//! signature by the old key over [`transcript`]: a fixed context string, a
//! TLS exporter value of the connection that carries the request (RFC 8446
//! section 7.5, label [`EXPORTER_LABEL`]), the SHA-256 of the CSR, and the
//! identity. The exporter is unique to one TLS connection and known only to
//! its two ends (the site authenticates the broker through its CA), so a
//! captured proof is worth nothing on another connection: no broker state,
//! no challenge round trip, and no clock on the site is involved, so a site
//! whose clock is wrong still proves itself. The connection carries no
//! client certificate: the broker's TLS verifier keeps refusing expired
//! certificates, and only this request accepts one.
//!
//! The broker then checks ([`verify_presented`], [`verify_proof`]) that the
//! certificate was signed by its CA for an identity of its trust domain,
//! and decides with [`decide`] from what it keeps on record: whether the
//! site or the certificate is revoked, whether the certificate's key is the
//! one it recorded when it issued the site's latest certificates
//! ([`key_standing`]), and whether the certificate expired less than the
//! re-attestation window ago.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use sha2::Digest;
use thiserror::Error;

use crate::identity::TrustDomain;
use crate::tls::{PeerCert, peer_identity, provider};

/// The label of the TLS exporter value a proof signs.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-tether-reattest";
/// The length of that exporter value.
pub const EXPORTER_LEN: usize = 32;

/// The re-attestation exporter value of a TLS connection (over TCP; QUIC
/// connections export through quinn), once its handshake is done.
pub fn tls_exporter<D>(conn: &rustls::ConnectionCommon<D>) -> Option<[u8; EXPORTER_LEN]> {
    conn.export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, None)
        .ok()
}
/// The context string that opens every signed transcript.
const CONTEXT: &[u8] = b"tether site re-attestation v1\0";
/// How many of a site's latest certificates may re-attest: the newest, and
/// the one before it, whose key a site still holds when the answer to its
/// last renewal was lost on the way.
pub const RECENT_KEYS: usize = 2;

/// Why a presented certificate or proof cannot be used.
#[derive(Debug, Error)]
pub enum ReattestError {
    /// The certificate does not parse, is not signed by the deployment's
    /// CA, or carries no identity of its trust domain.
    #[error("the certificate is not one this broker's CA issued to a site: {0}")]
    NotOurs(String),
    /// The signature does not verify with the certificate's key.
    #[error("the proof of the site key does not verify")]
    BadProof,
    /// Signing failed on the site.
    #[error("cannot sign with the site key: {0}")]
    Sign(String),
}

/// The bytes a site signs: context, exporter, CSR digest, identity.
pub fn transcript(exporter: &[u8], csr: &[u8], identity: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(CONTEXT.len() + exporter.len() + 32 + identity.len());
    out.extend_from_slice(CONTEXT);
    out.extend_from_slice(exporter);
    out.extend_from_slice(&sha2::Sha256::digest(csr));
    out.extend_from_slice(identity.as_bytes());
    out
}

/// Signs `message` with the site key (ECDSA P-256, ASN.1 signature).
pub fn sign(key: &PrivateKeyDer<'_>, message: &[u8]) -> Result<Vec<u8>, ReattestError> {
    use rcgen::SigningKey;
    let pair = rcgen::KeyPair::try_from(key).map_err(|e| ReattestError::Sign(e.to_string()))?;
    pair.sign(message)
        .map_err(|e| ReattestError::Sign(e.to_string()))
}

/// The SHA-256 of a certificate's subject public key info, lowercase hex:
/// what the broker records of each key it certifies.
pub fn spki_sha256(cert: &CertificateDer<'_>) -> Result<String, ReattestError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| ReattestError::NotOurs(format!("unparsable certificate: {e}")))?;
    Ok(data_encoding::HEXLOWER.encode(&sha2::Sha256::digest(parsed.public_key().raw)))
}

/// A presented certificate that the deployment's CA signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    /// Identity, serial and expiry.
    pub peer: PeerCert,
    /// Start of validity.
    pub not_before: SystemTime,
    /// [`spki_sha256`] of its key.
    pub spki_sha256: String,
}

/// Checks that `cert` was signed by `ca` for a site of `trust_domain`, as a
/// client certificate, at a moment of its own validity (webpki's chain
/// validation, with the clock set inside the validity period: expiry is
/// what [`decide`] judges). `now` is used while the certificate is valid.
pub fn verify_presented(
    ca: &CertificateDer<'_>,
    trust_domain: &TrustDomain,
    cert: &CertificateDer<'_>,
    now: SystemTime,
) -> Result<Presented, ReattestError> {
    verify_presented_by(std::slice::from_ref(ca), trust_domain, cert, now)
}

/// As [`verify_presented`], accepting a certificate from any CA of the
/// trust bundle (during a CA rotation, a site may return with a
/// certificate from the CA being retired).
pub fn verify_presented_by(
    bundle: &[CertificateDer<'_>],
    trust_domain: &TrustDomain,
    cert: &CertificateDer<'_>,
    now: SystemTime,
) -> Result<Presented, ReattestError> {
    let not_ours = |e: String| ReattestError::NotOurs(e);
    let (not_before, not_after) =
        crate::tls::validity(cert).map_err(|e| not_ours(e.to_string()))?;
    let latest = not_after
        .checked_sub(Duration::from_secs(1))
        .unwrap_or(not_after);
    let at = now.clamp(not_before.min(latest), latest);
    let mut roots = rustls::RootCertStore::empty();
    for ca in bundle {
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| not_ours(e.to_string()))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| not_ours(e.to_string()))?;
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|e| not_ours(e.to_string()))?;
    verifier
        .verify_client_cert(cert, &[], UnixTime::since_unix_epoch(secs))
        .map_err(|e| not_ours(e.to_string()))?;
    let peer = peer_identity(std::slice::from_ref(cert), trust_domain)
        .map_err(|e| not_ours(e.to_string()))?;
    Ok(Presented {
        peer,
        not_before,
        spki_sha256: spki_sha256(cert)?,
    })
}

/// Checks the site's signature over `message` with the key of `cert`.
pub fn verify_proof(
    cert: &CertificateDer<'_>,
    message: &[u8],
    signature: &[u8],
) -> Result<(), ReattestError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| ReattestError::NotOurs(format!("unparsable certificate: {e}")))?;
    let point = &parsed.public_key().subject_public_key.data;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, point)
        .verify(message, signature)
        .map_err(|_| ReattestError::BadProof)
}

/// A certificate the broker issued to the site, as it recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedKey {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// Expiry, Unix seconds.
    pub not_after: u64,
    /// [`spki_sha256`] of its key, when recorded.
    pub spki_sha256: Option<String>,
}

/// Where a presented certificate's key stands among the site's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStanding {
    /// The key of one of the site's [`RECENT_KEYS`] latest certificates.
    Current,
    /// A key of an older certificate, replaced since.
    Superseded,
    /// No certificate with this serial and key is on record.
    Unknown,
}

/// Where the key `spki_sha256` of the certificate `serial` stands among
/// the certificates `issued` to the site.
pub fn key_standing(issued: &[IssuedKey], serial: &str, spki_sha256: &str) -> KeyStanding {
    let matches = |k: &IssuedKey| {
        k.serial == serial && k.spki_sha256.as_deref().is_some_and(|s| s == spki_sha256)
    };
    let Some(found) = issued.iter().find(|k| matches(k)) else {
        return KeyStanding::Unknown;
    };
    let newer = issued
        .iter()
        .filter(|k| (k.not_after, &k.serial) > (found.not_after, &found.serial))
        .count();
    if newer < RECENT_KEYS {
        KeyStanding::Current
    } else {
        KeyStanding::Superseded
    }
}

/// What the broker knows of a revocation that applies to the certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokedBy {
    /// The operator revoked the site, at this time when recorded.
    Site(Option<SystemTime>),
    /// This certificate's serial is revoked (the site was re-admitted with
    /// a new code since).
    Certificate,
}

impl RevokedBy {
    /// The refusal this revocation makes, for a renewal and a
    /// re-attestation alike.
    pub fn refusal(self) -> Refusal {
        match self {
            RevokedBy::Site(at) => Refusal::SiteRevoked { at },
            RevokedBy::Certificate => Refusal::CertificateRevoked,
        }
    }
}

/// Everything [`decide`] weighs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// The broker's clock.
    pub now: SystemTime,
    /// When the presented certificate expires or expired.
    pub not_after: SystemTime,
    /// How long after expiry a certificate may still re-attest.
    pub window: Duration,
    /// A revocation that applies, if any.
    pub revoked: Option<RevokedBy>,
    /// Where the certificate's key stands.
    pub key: KeyStanding,
}

/// A re-attestation the broker grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    /// How long ago the certificate expired (zero: still valid).
    pub expired_for: Duration,
}

/// Why the broker refuses a re-attestation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The operator revoked the site.
    SiteRevoked {
        /// When, if recorded.
        at: Option<SystemTime>,
    },
    /// The certificate itself is revoked.
    CertificateRevoked,
    /// The certificate expired longer ago than the window.
    PastWindow {
        /// How long ago it expired.
        expired_for: Duration,
        /// The broker's window.
        window: Duration,
    },
    /// The broker has no record of this certificate's key.
    UnknownKey,
    /// The key belongs to an older certificate, replaced since.
    Superseded,
    /// The signature over the transcript does not verify.
    BadProof,
}

impl Refusal {
    /// Every metric label, in a fixed order.
    pub const REASONS: [&'static str; 6] = [
        "revoked",
        "certificate_revoked",
        "past_window",
        "unknown_key",
        "superseded",
        "bad_proof",
    ];

    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::SiteRevoked { .. } => "revoked",
            Refusal::CertificateRevoked => "certificate_revoked",
            Refusal::PastWindow { .. } => "past_window",
            Refusal::UnknownKey => "unknown_key",
            Refusal::Superseded => "superseded",
            Refusal::BadProof => "bad_proof",
        }
    }

    /// Plain words for the site's log and `tether doctor`, with what to do;
    /// `site` and `region` name the site in the command to run.
    pub fn message(&self, site: &str, region: &str) -> String {
        let enroll = format!(
            "enroll it again with a new code (on the broker `tether-broker token create --site {site} --region {region}`, then on the site `tether enroll --force`)"
        );
        match self {
            Refusal::SiteRevoked { at: Some(at) } => format!(
                "this site was revoked by the operator on {}; {enroll}",
                utc_date(*at)
            ),
            Refusal::SiteRevoked { at: None } => {
                format!("this site was revoked by the operator; {enroll}")
            }
            Refusal::CertificateRevoked => "this site's certificate was revoked when the site was re-admitted with a new code; enroll it again with that code (`tether enroll --force`)".to_string(),
            Refusal::PastWindow {
                expired_for,
                window,
            } => format!(
                "this site has been offline for at least {} (its certificate expired then), longer than the broker's re-attestation window of {}; {enroll}",
                plain_duration(*expired_for),
                plain_duration(*window)
            ),
            Refusal::UnknownKey => format!(
                "the broker has no record of this site's key (the certificate was issued before the broker recorded keys, or by another deployment); {enroll}"
            ),
            Refusal::Superseded => format!(
                "this site's key belongs to a certificate the broker has replaced since (is the site's state directory an old copy?); {enroll}"
            ),
            Refusal::BadProof => {
                "the proof made with this site's key does not verify (is site.key the key of site.crt?)"
                    .to_string()
            }
        }
    }
}

/// Whether the broker re-certifies a site that presents a certificate
/// signed by its CA, with a valid proof of the certificate's key.
///
/// A revocation refuses first (the operator's word is final), then a key
/// the broker did not record or has replaced, then an expiry longer ago
/// than the window. A certificate still valid is always granted: that is
/// a renewal.
pub fn decide(facts: &Facts) -> Result<Granted, Refusal> {
    if let Some(revoked) = facts.revoked {
        return Err(revoked.refusal());
    }
    match facts.key {
        KeyStanding::Current => {}
        KeyStanding::Superseded => return Err(Refusal::Superseded),
        KeyStanding::Unknown => return Err(Refusal::UnknownKey),
    }
    let expired_for = facts
        .now
        .duration_since(facts.not_after)
        .unwrap_or_default();
    if expired_for > facts.window {
        return Err(Refusal::PastWindow {
            expired_for,
            window: facts.window,
        });
    }
    Ok(Granted { expired_for })
}

/// "97 days", "5 hours", "40 minutes", "12 seconds": whole units, rounded
/// down.
pub fn plain_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (n, unit) = if s >= 2 * 86_400 {
        (s / 86_400, "day")
    } else if s >= 2 * 3600 {
        (s / 3600, "hour")
    } else if s >= 120 {
        (s / 60, "minute")
    } else {
        (s, "second")
    };
    if n == 1 {
        format!("1 {unit}")
    } else {
        format!("{n} {unit}s")
    }
}

/// "2026-11-30 14:05 UTC".
pub fn utc_date(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    format!(
        "{}-{:02}-{:02} {:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{Ca, DEFAULT_SITE_CERT_LIFETIME, site_key_and_csr};
    use crate::identity::SiteIdentity;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use tether_proto::ids::{RegionId, SiteId};

    const DAY: Duration = Duration::from_secs(86_400);
    const WINDOW: Duration = Duration::from_secs(90 * 86_400);

    fn td() -> TrustDomain {
        TrustDomain::new("tether.test").unwrap()
    }

    fn id() -> SiteIdentity {
        SiteIdentity::new(
            td(),
            RegionId::new("eu").unwrap(),
            SiteId::new("lab-1").unwrap(),
        )
    }

    fn facts(now: SystemTime, not_after: SystemTime) -> Facts {
        Facts {
            now,
            not_after,
            window: WINDOW,
            revoked: None,
            key: KeyStanding::Current,
        }
    }

    #[test]
    fn an_expired_certificate_within_the_window_is_granted() {
        let expiry = SystemTime::UNIX_EPOCH + 20_000 * DAY;
        // Still valid: a renewal.
        assert_eq!(
            decide(&facts(expiry - DAY, expiry)),
            Ok(Granted {
                expired_for: Duration::ZERO
            })
        );
        // Offline for three lifetimes.
        assert_eq!(
            decide(&facts(expiry + 3 * DAY, expiry)),
            Ok(Granted {
                expired_for: 3 * DAY
            })
        );
        // The last second of the window.
        assert!(decide(&facts(expiry + WINDOW, expiry)).is_ok());
    }

    #[test]
    fn past_the_window_is_refused_with_how_long() {
        let expiry = SystemTime::UNIX_EPOCH + 20_000 * DAY;
        let refusal = decide(&facts(expiry + 97 * DAY, expiry)).unwrap_err();
        assert_eq!(
            refusal,
            Refusal::PastWindow {
                expired_for: 97 * DAY,
                window: WINDOW
            }
        );
        let text = refusal.message("lab-1", "eu");
        assert!(
            text.starts_with("this site has been offline for at least 97 days"),
            "{text}"
        );
        assert!(text.contains("re-attestation window of 90 days"), "{text}");
        assert!(
            text.contains("tether-broker token create --site lab-1 --region eu"),
            "{text}"
        );
        assert_eq!(refusal.reason(), "past_window");
    }

    #[test]
    fn revocation_refuses_first_and_names_the_date() {
        let expiry = SystemTime::UNIX_EPOCH + 20_000 * DAY;
        let revoked_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_511_500);
        for key in [
            KeyStanding::Current,
            KeyStanding::Superseded,
            KeyStanding::Unknown,
        ] {
            let refusal = decide(&Facts {
                revoked: Some(RevokedBy::Site(Some(revoked_at))),
                key,
                ..facts(expiry + 200 * DAY, expiry)
            })
            .unwrap_err();
            assert_eq!(
                refusal,
                Refusal::SiteRevoked {
                    at: Some(revoked_at)
                }
            );
            assert_eq!(
                refusal.message("lab-1", "eu"),
                "this site was revoked by the operator on 2025-11-30 14:05 UTC; enroll it again with a new code (on the broker `tether-broker token create --site lab-1 --region eu`, then on the site `tether enroll --force`)"
            );
        }
        // Even a valid certificate.
        assert_eq!(
            decide(&Facts {
                revoked: Some(RevokedBy::Certificate),
                ..facts(expiry - DAY, expiry)
            }),
            Err(Refusal::CertificateRevoked)
        );
    }

    #[test]
    fn only_recorded_recent_keys_may_reattest() {
        let k = |serial: &str, not_after, spki: Option<&str>| IssuedKey {
            serial: serial.into(),
            not_after,
            spki_sha256: spki.map(str::to_string),
        };
        let issued = vec![
            k("01", 100, Some("a")),
            k("02", 200, Some("b")),
            k("03", 300, Some("c")),
            k("04", 400, None),
        ];
        assert_eq!(key_standing(&issued, "03", "c"), KeyStanding::Current);
        // The one before the newest: its successor's answer may have been
        // lost.
        assert_eq!(key_standing(&issued[..3], "02", "b"), KeyStanding::Current);
        assert_eq!(key_standing(&issued, "02", "b"), KeyStanding::Superseded);
        assert_eq!(key_standing(&issued, "01", "a"), KeyStanding::Superseded);
        // Another key under a recorded serial, an unrecorded serial, a
        // record without a key.
        assert_eq!(key_standing(&issued, "03", "x"), KeyStanding::Unknown);
        assert_eq!(key_standing(&issued, "05", "c"), KeyStanding::Unknown);
        assert_eq!(key_standing(&issued, "04", "d"), KeyStanding::Unknown);
        let expiry = SystemTime::UNIX_EPOCH + 20_000 * DAY;
        for (key, refusal) in [
            (KeyStanding::Superseded, Refusal::Superseded),
            (KeyStanding::Unknown, Refusal::UnknownKey),
        ] {
            assert_eq!(
                decide(&Facts {
                    key,
                    ..facts(expiry + DAY, expiry)
                }),
                Err(refusal)
            );
        }
    }

    #[test]
    fn durations_read_as_plain_words() {
        assert_eq!(plain_duration(Duration::from_secs(1)), "1 second");
        assert_eq!(plain_duration(Duration::from_secs(100)), "100 seconds");
        assert_eq!(plain_duration(Duration::from_secs(3 * 3600)), "3 hours");
        assert_eq!(
            plain_duration(36 * 3600 * Duration::from_secs(1)),
            "36 hours"
        );
        assert_eq!(plain_duration(90 * DAY), "90 days");
    }

    #[test]
    fn an_expired_certificate_of_the_ca_verifies_and_a_proof_binds_the_connection() {
        let now = SystemTime::now();
        let ca = Ca::generate(td(), now).unwrap();
        let (key, csr) = site_key_and_csr("lab-1").unwrap();
        // Issued 100 days ago for a day: expired 99 days ago.
        let cert = ca
            .issue_site(&csr, &id(), now - 100 * DAY, DEFAULT_SITE_CERT_LIFETIME)
            .unwrap();
        let presented = verify_presented(ca.cert_der(), &td(), &cert.der, now).unwrap();
        assert_eq!(presented.peer.identity, id());
        assert_eq!(presented.peer.serial, cert.serial);
        assert_eq!(presented.spki_sha256, spki_sha256(&cert.der).unwrap());

        // Another CA's certificate is not ours.
        let other = Ca::generate(td(), now).unwrap();
        let foreign = other
            .issue_site(&csr, &id(), now, DEFAULT_SITE_CERT_LIFETIME)
            .unwrap();
        assert!(matches!(
            verify_presented(ca.cert_der(), &td(), &foreign.der, now),
            Err(ReattestError::NotOurs(_))
        ));

        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let (_, new_csr) = site_key_and_csr("lab-1").unwrap();
        let exporter = [7u8; EXPORTER_LEN];
        let message = transcript(&exporter, &new_csr, &id().uri());
        let signature = sign(&key_der, &message).unwrap();
        verify_proof(&cert.der, &message, &signature).unwrap();
        // Another connection's exporter, another CSR, another identity:
        // the same signature proves nothing.
        for other in [
            transcript(&[8u8; EXPORTER_LEN], &new_csr, &id().uri()),
            transcript(&exporter, &csr, &id().uri()),
            transcript(&exporter, &new_csr, "spiffe://tether.test/region/eu/site/x"),
        ] {
            assert!(matches!(
                verify_proof(&cert.der, &other, &signature),
                Err(ReattestError::BadProof)
            ));
        }
        // Another key's signature.
        let (stranger, _) = site_key_and_csr("x").unwrap();
        let stranger = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(stranger.serialize_der()));
        let forged = sign(&stranger, &message).unwrap();
        assert!(verify_proof(&cert.der, &message, &forged).is_err());
    }
}
