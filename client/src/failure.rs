//! How a connection attempt to a broker ends, in words for the site's
//! operator, and a whole answer to a request: values that [`crate::link`],
//! [`crate::h2client`], the agent and `doctor` share, kept in a module of
//! their own so that the link and its carriers need not import each other.

/// Why a connection attempt, a tunnel or a connection ended.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The broker refused this site (certificate revoked, expired, unknown
    /// CA, or a 4xx answer): trying another transport will not help.
    pub refused: bool,
    /// Plain words.
    pub message: String,
    /// The broker refused this site's certificate (a TLS alert), and why.
    pub certificate: Option<CertRefusal>,
}

/// Why the broker refused this site's certificate, from the TLS alert it
/// sent: re-attestation may renew the certificate, or tells why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertRefusal {
    /// `certificate_expired` (45): expired by the broker's clock.
    Expired,
    /// `certificate_revoked` (44).
    Revoked,
}

impl CertRefusal {
    /// From a TLS alert code.
    pub fn from_alert(code: u64) -> Option<Self> {
        match code {
            45 => Some(CertRefusal::Expired),
            44 => Some(CertRefusal::Revoked),
            _ => None,
        }
    }

    /// From the text of a rustls error reporting an alert the broker sent
    /// (the TCP transport's errors come as text through HTTP/2).
    pub fn from_text(text: &str) -> Option<Self> {
        if text.contains("received fatal alert: CertificateExpired") {
            Some(CertRefusal::Expired)
        } else if text.contains("received fatal alert: CertificateRevoked") {
            Some(CertRefusal::Revoked)
        } else {
            None
        }
    }

    /// Plain words.
    pub fn explain(self) -> &'static str {
        match self {
            CertRefusal::Expired => {
                "the broker refused this site's certificate as expired by its clock"
            }
            CertRefusal::Revoked => {
                "the broker refused this site's certificate because it was revoked; ask the operator"
            }
        }
    }
}

impl Failure {
    pub(crate) fn lost(message: impl Into<String>) -> Self {
        Self {
            refused: false,
            message: message.into(),
            certificate: None,
        }
    }

    pub(crate) fn refused(message: impl Into<String>) -> Self {
        Self {
            refused: true,
            message: message.into(),
            certificate: None,
        }
    }

    pub(crate) fn certificate(refusal: CertRefusal) -> Self {
        Self {
            refused: true,
            message: refusal.explain().into(),
            certificate: Some(refusal),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Whether a TLS failure text means the broker refused this site, and in
/// plain words why.
pub fn tls_refusal(text: &str) -> Option<String> {
    let has = |s: &str| text.contains(s);
    if has("CertificateRevoked") || has("certificate revoked") {
        Some(
            "the broker refused this site's certificate because it was revoked; ask the operator"
                .into(),
        )
    } else if has("CertificateExpired") || has("Expired") || has("NotValidYet") {
        Some("this site's certificate or the broker's is outside its validity period; check the clock, or enroll again with a new token".into())
    } else if has("UnknownIssuer") || has("UnknownCA") || has("BadSignature") {
        Some(
            "the broker and this site do not share a CA (wrong broker, or enrolled elsewhere)"
                .into(),
        )
    } else if has("NotValidForName") {
        Some(
            "the broker's certificate does not name the address dialled (wrong broker address?)"
                .into(),
        )
    } else {
        None
    }
}

/// A whole answer.
#[derive(Debug)]
pub struct Answer {
    /// Status.
    pub status: u16,
    /// The `date` header.
    pub date: Option<String>,
    /// Body.
    pub body: Vec<u8>,
}
