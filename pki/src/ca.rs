//! The tether certificate authority.
//!
//! One ECDSA P-256 CA per deployment, kept in the broker's data directory as
//! `ca.crt` and `ca.key` (mode 0600). It signs short-lived site certificates
//! from CSRs (the site's key never leaves the site) and the brokers' server
//! certificates. The CA may only sign end-entity certificates (path length 0),
//! which keeps chains at two certificates: small enough for the QUIC
//! handshake to stay within the 3x anti-amplification budget.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use thiserror::Error;
use x509_parser::prelude::FromDer;

use crate::identity::{IdentityError, SiteIdentity, TrustDomain};

/// File name of the CA certificate in a data directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key in a data directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// Default lifetime of a site certificate.
pub const DEFAULT_SITE_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Default lifetime of a broker server certificate.
pub const DEFAULT_SERVER_CERT_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// Lifetime of the CA certificate.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How far `notBefore` is backdated, so a site whose clock runs behind
/// (a hospital host without NTP drifts by minutes a month) still accepts a
/// broker certificate issued just now, as after a renewal or a CA
/// rotation. An hour, as public CAs backdate; it makes a certificate valid
/// an hour earlier than issued, which grants nothing: the holder had no
/// certificate before it was issued.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(3600);

/// Why a PKI operation failed.
#[derive(Debug, Error)]
pub enum PkiError {
    /// `pki init` would overwrite an existing CA.
    #[error("{} already exists; refusing to overwrite an existing CA (move it away first if you really mean to start over)", .0.display())]
    AlreadyExists(PathBuf),
    /// The CA files are missing.
    #[error("no CA in {}: run `tether-broker pki init --data-dir {}` first", .0.display(), .0.display())]
    NoCa(PathBuf),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// The CSR cannot be used.
    #[error("certificate signing request rejected: {0}")]
    BadCsr(String),
    /// The CA certificate or key cannot be used.
    #[error("CA files are not usable: {0}")]
    BadCa(String),
    /// An identity was invalid.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// A certificate the CA issued.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// DER encoding.
    pub der: CertificateDer<'static>,
    /// PEM encoding.
    pub pem: String,
    /// Serial number (DER integer bytes), for revocation.
    pub serial: Vec<u8>,
    /// End of validity.
    pub not_after: SystemTime,
}

/// The certificate authority of one deployment.
pub struct Ca {
    trust_domain: TrustDomain,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    not_after: SystemTime,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn to_offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::fill(&mut bytes);
    // Keep it a positive INTEGER with a non-zero leading byte.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn ca_params(
    trust_domain: &TrustDomain,
    key: &KeyPair,
    now: SystemTime,
) -> Result<CertificateParams, PkiError> {
    use sha2::Digest;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "tether");
    // A key fingerprint in the name keeps successive CAs of one trust domain
    // (after a rollover) apart, for operators and for path building.
    let fingerprint = sha2::Sha256::digest(key.subject_public_key_info());
    let short = data_encoding::HEXLOWER.encode(fingerprint.get(..4).unwrap_or_default());
    dn.push(
        DnType::CommonName,
        format!("tether CA {trust_domain} {short}"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // The trust domain travels in the CA certificate, so `load` recovers it.
    params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{trust_domain}").as_str().try_into()?,
    )];
    params.not_before = to_offset(now - CLOCK_SKEW_ALLOWANCE);
    params.not_after = to_offset(now + CA_LIFETIME);
    params.serial_number = Some(random_serial());
    Ok(params)
}

impl Ca {
    /// Generates a new CA in memory.
    pub fn generate(trust_domain: TrustDomain, now: SystemTime) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(&trust_domain, &key, now)?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            trust_domain,
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            not_after: now + CA_LIFETIME,
            issuer: Issuer::new(params, key),
        })
    }

    /// Creates a CA and writes it to `dir` (created if missing). Refuses if a
    /// CA certificate or key is already there.
    pub fn init(dir: &Path, trust_domain: TrustDomain, now: SystemTime) -> Result<Self, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        for path in [&cert_path, &key_path] {
            if path.exists() {
                return Err(PkiError::AlreadyExists(path.clone()));
            }
        }
        create_private_dir(dir)?;
        let ca = Self::generate(trust_domain, now)?;
        // Key first: a crash between the two writes leaves a key without a
        // certificate, which `init` reports instead of silently replacing.
        write_new_file(&key_path, ca.issuer.key().serialize_pem().as_bytes(), 0o600)?;
        write_new_file(&cert_path, ca.cert_pem.as_bytes(), 0o644)?;
        Ok(ca)
    }

    /// Loads the CA from `dir`.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if !cert_path.exists() || !key_path.exists() {
            return Err(PkiError::NoCa(dir.to_path_buf()));
        }
        warn_if_readable_by_others(&key_path);
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        Self::from_pem(&cert_pem, &key_pem).map_err(|e| match e {
            PkiError::BadCa(m) => PkiError::BadCa(format!(
                "{} / {}: {m}",
                cert_path.display(),
                key_path.display()
            )),
            e => e,
        })
    }

    /// A CA from its certificate and private key in PEM (as the store
    /// keeps a rotated CA).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| PkiError::BadCa(format!("unreadable private key: {e}")))?;
        let cert_der = pem_to_der(cert_pem, "CERTIFICATE")
            .ok_or_else(|| PkiError::BadCa("no PEM certificate".into()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| PkiError::BadCa(format!("unreadable certificate: {e}")))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(PkiError::BadCa(
                "the certificate does not belong to the private key".into(),
            ));
        }
        let trust_domain = spiffe_uris(&parsed)
            .into_iter()
            .find_map(|uri| {
                uri.strip_prefix("spiffe://")
                    .map(|td| td.trim_end_matches('/').to_string())
            })
            .ok_or_else(|| {
                PkiError::BadCa("the certificate carries no spiffe:// trust domain".into())
            })?;
        let trust_domain = TrustDomain::new(trust_domain).map_err(IdentityError::from)?;
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(parsed.validity().not_after.timestamp().max(0) as u64);
        let cert_der = CertificateDer::from(cert_der);
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Self {
            trust_domain,
            cert_der,
            cert_pem: cert_pem.to_string(),
            not_after,
            issuer,
        })
    }

    /// The CA's private key, PKCS#8 PEM: for the store, which shares a
    /// rotated CA between brokers.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Loads the CA from `dir`, or creates it there if there is none.
    /// Returns whether it was created.
    pub fn load_or_init(
        dir: &Path,
        trust_domain: TrustDomain,
        now: SystemTime,
    ) -> Result<(Self, bool), PkiError> {
        if dir.join(CA_CERT_FILE).exists() || dir.join(CA_KEY_FILE).exists() {
            let ca = Self::load(dir)?;
            if ca.trust_domain != trust_domain {
                return Err(PkiError::BadCa(format!(
                    "the CA in {} is for trust domain {:?}, but the configuration says {:?}",
                    dir.display(),
                    ca.trust_domain.as_str(),
                    trust_domain.as_str()
                )));
            }
            Ok((ca, false))
        } else {
            Ok((Self::init(dir, trust_domain, now)?, true))
        }
    }

    /// The deployment's trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// When the CA certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The CA's name (its subject common name, which carries a key
    /// fingerprint that tells successive CAs apart).
    pub fn name(&self) -> String {
        common_names(&self.cert_der)
            .map(|(subject, _)| subject)
            .unwrap_or_default()
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a site certificate for the public key in `csr_der`, with the
    /// identity the enrollment token was bound to. The CSR's own subject and
    /// requested names are ignored: a site cannot choose who it is.
    pub fn issue_site(
        &self,
        csr_der: &[u8],
        identity: &SiteIdentity,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<IssuedCert, PkiError> {
        if identity.trust_domain != self.trust_domain {
            return Err(IdentityError::WrongTrustDomain {
                expected: self.trust_domain.to_string(),
                found: identity.trust_domain.to_string(),
            }
            .into());
        }
        let csr = parse_csr(csr_der)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "tether");
        dn.push(
            DnType::CommonName,
            format!("{}.{}", identity.site, identity.region),
        );
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(identity.uri().as_str().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign_leaf(params, &csr.public_key, now, lifetime)
    }

    /// Issues a server certificate for a broker, for its DNS names and IP
    /// addresses, with a key generated here.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<(IssuedCert, PrivateKeyDer<'static>), PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "tether");
        dn.push(
            DnType::CommonName,
            dns_names
                .first()
                .cloned()
                .or_else(|| ips.first().map(ToString::to_string))
                .unwrap_or_else(|| "tether broker".into()),
        );
        params.distinguished_name = dn;
        for name in dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.as_str().try_into()?));
        }
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = self.sign_leaf(params, &key, now, lifetime)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((cert, key_der))
    }

    /// Signs arbitrary leaf parameters. Exposed for tests that need
    /// deliberately wrong certificates (wrong key usage, odd identities);
    /// production paths use [`issue_site`](Self::issue_site) and
    /// [`issue_server`](Self::issue_server).
    pub fn sign_leaf(
        &self,
        mut params: CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let serial = random_serial();
        let not_after = (now + lifetime).min(self.not_after);
        params.serial_number = Some(serial.clone());
        params.not_before = to_offset(now - CLOCK_SKEW_ALLOWANCE);
        params.not_after = to_offset(not_after);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok(IssuedCert {
            der: cert.der().clone(),
            pem: cert.pem(),
            serial: serial.to_bytes(),
            not_after,
        })
    }
}

/// A new site key and a CSR for it; run on the site, the key stays there.
pub fn site_key_and_csr(site_hint: &str) -> Result<(KeyPair, Vec<u8>), PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, site_hint);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

/// Checks a CSR without issuing anything: well formed, validly signed, an
/// ECDSA P-256 key, no unsupported extensions.
pub fn check_csr(csr_der: &[u8]) -> Result<(), PkiError> {
    parse_csr(csr_der).map(|_| ())
}

fn parse_csr(csr_der: &[u8]) -> Result<CertificateSigningRequestParams, PkiError> {
    check_csr_key(csr_der)?;
    CertificateSigningRequestParams::from_der(&csr_der.into())
        .map_err(|e| PkiError::BadCsr(e.to_string()))
}

/// Requires the CSR's key to be ECDSA P-256, tether's only key type.
fn check_csr_key(csr_der: &[u8]) -> Result<(), PkiError> {
    use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
    let (rest, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(csr_der)
            .map_err(|e| PkiError::BadCsr(format!("not a PKCS#10 request: {e}")))?;
    // A request is one DER value: bytes after it are not part of what was
    // signed, and accepting them would let a mangled body spend a token.
    if !rest.is_empty() {
        return Err(PkiError::BadCsr(format!(
            "{} bytes follow the PKCS#10 request; send the request alone",
            rest.len()
        )));
    }
    let spki = &csr.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY
        || curve.as_ref() != Some(&OID_EC_P256)
    {
        return Err(PkiError::BadCsr("the key must be ECDSA P-256".into()));
    }
    Ok(())
}

/// The `spiffe://` URIs among a certificate's subject alternative names.
pub(crate) fn spiffe_uris(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
                Some(uri.to_string())
            }
            _ => None,
        })
        .collect()
}

/// Decodes the first PEM block with the given label.
pub fn pem_to_der(pem: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin)? + begin.len();
    let stop = start + pem.get(start..)?.find(&end)?;
    let body: String = pem
        .get(start..stop)?
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    data_encoding::BASE64.decode(body.as_bytes()).ok()
}

/// The subject's and the issuer's common names of a certificate (empty
/// when absent), `None` when it does not parse.
pub fn common_names(der: &[u8]) -> Option<(String, String)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = |name: &x509_parser::x509::X509Name<'_>| {
        name.iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok().map(str::to_string))
            .unwrap_or_default()
    };
    Some((cn(cert.subject()), cn(cert.issuer())))
}

/// Every PEM block with the given label, in order (a trust bundle holds
/// several certificates). `None` when a block is damaged.
pub fn pems_to_der(pem: &str, label: &str) -> Option<Vec<Vec<u8>>> {
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = pem;
    while rest.contains(&format!("-----BEGIN {label}-----")) {
        out.push(pem_to_der(rest, label)?);
        let stop = rest.find(&end)? + end.len();
        rest = rest.get(stop..)?;
    }
    Some(out)
}

/// Encodes DER as PEM with the given label.
pub fn der_to_pem(der: &[u8], label: &str) -> String {
    let b64 = data_encoding::BASE64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Creates `dir` (and parents) with mode 0700 if it does not exist.
pub fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PkiError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// Writes a file that must not exist yet, with `mode`, and syncs it.
pub fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::AlreadyExists(path.to_path_buf())
            } else {
                io(e)
            }
        })?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)?;
    if let Some(parent) = path.parent()
        && let Ok(dir) = fs::File::open(parent)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Replaces a file atomically (write to a temporary name, sync, rename).
pub fn replace_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    write_new_file(&tmp, contents, mode)?;
    fs::rename(&tmp, path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "private key is readable by group or others; run chmod 600 on it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use tether_proto::ids::{RegionId, SiteId};

    fn td() -> TrustDomain {
        TrustDomain::new("tether.test").unwrap()
    }

    #[test]
    fn a_ca_survives_its_pem_form_and_a_bundle_reads_back_in_order() {
        let a = Ca::generate(td(), SystemTime::now()).unwrap();
        let b = Ca::generate(td(), SystemTime::now()).unwrap();
        let again = Ca::from_pem(a.cert_pem(), &a.key_pem()).unwrap();
        assert_eq!(again.cert_der(), a.cert_der());
        assert_eq!(again.trust_domain(), a.trust_domain());
        let mismatched = Ca::from_pem(a.cert_pem(), &b.key_pem()).unwrap_err();
        assert!(
            mismatched.to_string().contains("does not belong"),
            "{mismatched}"
        );
        let bundle = format!("{}{}", a.cert_pem(), b.cert_pem());
        let ders = pems_to_der(&bundle, "CERTIFICATE").unwrap();
        assert_eq!(ders, vec![a.cert_der().to_vec(), b.cert_der().to_vec()]);
        assert_eq!(pems_to_der("", "CERTIFICATE").unwrap().len(), 0);
        let truncated = &bundle[..bundle.len() - 40];
        assert!(pems_to_der(truncated, "CERTIFICATE").is_none());
    }

    #[test]
    fn init_writes_private_key_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let ca = Ca::init(&path, td(), SystemTime::now()).unwrap();
        let mode = fs::metadata(path.join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let err = Ca::init(&path, td(), SystemTime::now()).unwrap_err();
        assert!(matches!(err, PkiError::AlreadyExists(_)), "{err}");
        assert!(err.to_string().contains("refusing to overwrite"));
        let loaded = Ca::load(&path).unwrap();
        assert_eq!(loaded.trust_domain(), ca.trust_domain());
        assert_eq!(loaded.cert_der(), ca.cert_der());
        let (_, created) = Ca::load_or_init(&path, td(), SystemTime::now()).unwrap();
        assert!(!created);
        let err = Ca::load_or_init(
            &path,
            TrustDomain::new("other.test").unwrap(),
            SystemTime::now(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("other.test"), "{err}");
        assert!(matches!(Ca::load(dir.path()), Err(PkiError::NoCa(_))));
    }

    #[test]
    fn issued_site_cert_carries_only_the_bound_identity() {
        let ca = Ca::generate(td(), SystemTime::now()).unwrap();
        let (_key, csr) = site_key_and_csr("i-would-like-to-be-admin").unwrap();
        let id = SiteIdentity::new(
            td(),
            RegionId::new("eu").unwrap(),
            SiteId::new("lab-1").unwrap(),
        );
        let now = SystemTime::now();
        let cert = ca
            .issue_site(&csr, &id, now, DEFAULT_SITE_CERT_LIFETIME)
            .unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert.der).unwrap();
        assert_eq!(spiffe_uris(&parsed), vec![id.uri()]);
        let nb = parsed.validity().not_before.timestamp();
        let na = parsed.validity().not_after.timestamp();
        let now_s = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(
            (now_s - nb - 3600).abs() <= 1,
            "notBefore backdated an hour"
        );
        assert!((na - now_s - 86_400).abs() <= 1, "24 h lifetime");
        assert_eq!(parsed.raw_serial(), cert.serial.as_slice());
        assert!(!parsed.is_ca());
        // Garbage is rejected as a CSR.
        assert!(matches!(
            ca.issue_site(b"garbage", &id, now, DEFAULT_SITE_CERT_LIFETIME),
            Err(PkiError::BadCsr(_))
        ));
    }

    #[test]
    fn csr_with_wrong_key_type_is_rejected() {
        let ca = Ca::generate(td(), SystemTime::now()).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .unwrap();
        let id = SiteIdentity::new(
            td(),
            RegionId::new("eu").unwrap(),
            SiteId::new("a").unwrap(),
        );
        let err = ca
            .issue_site(
                csr.der(),
                &id,
                SystemTime::now(),
                DEFAULT_SITE_CERT_LIFETIME,
            )
            .unwrap_err();
        assert!(err.to_string().contains("P-256"), "{err}");
    }

    #[test]
    fn csr_followed_by_junk_is_rejected() {
        let (_, mut csr) = site_key_and_csr("a").unwrap();
        check_csr(&csr).unwrap();
        csr.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3]);
        let err = check_csr(&csr).unwrap_err();
        assert!(err.to_string().contains("8 bytes follow"), "{err}");
    }

    #[test]
    fn pem_round_trip() {
        let der = vec![1u8, 2, 3, 250, 251];
        assert_eq!(pem_to_der(&der_to_pem(&der, "X"), "X"), Some(der));
    }
}
