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
}

impl Failure {
    pub(crate) fn lost(message: impl Into<String>) -> Self {
        Self {
            refused: false,
            message: message.into(),
        }
    }

    pub(crate) fn refused(message: impl Into<String>) -> Self {
        Self {
            refused: true,
            message: message.into(),
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
