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
    /// The QUIC handshake got no answer while a small QUIC packet did: the
    /// path loses the tunnel's large packets.
    pub path_too_small: bool,
    /// This host refused the broker's certificate as not yet valid or
    /// expired by its own clock: the clock is wrong, in plain words
    /// ([`clock_words`]).
    pub clock: Option<String>,
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
            path_too_small: false,
            clock: None,
        }
    }

    pub(crate) fn refused(message: impl Into<String>) -> Self {
        Self {
            refused: true,
            message: message.into(),
            certificate: None,
            path_too_small: false,
            clock: None,
        }
    }

    pub(crate) fn certificate(refusal: CertRefusal) -> Self {
        Self {
            refused: true,
            message: refusal.explain().into(),
            certificate: Some(refusal),
            path_too_small: false,
            clock: None,
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
    if let Some(words) = clock_words(text) {
        Some(words)
    } else if has("CertificateRevoked") || has("certificate revoked") {
        Some(
            "the broker refused this site's certificate because it was revoked; ask the operator"
                .into(),
        )
    } else if has("CertificateExpired") || has("Expired") || has("NotValidYet") {
        Some("this site's certificate or the broker's is outside its validity period; check the clock, or enroll again with a new token".into())
    } else if has("UnknownIssuer") || has("UnknownCA") || has("BadSignature") {
        Some(
            "the broker and this site do not share a CA (wrong broker, enrolled elsewhere, or the deployment's CA was rotated and the old one retired while this site was away: enroll again with a new code)"
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

/// This host's clock against the broker's, in plain words, when this host
/// found the broker's certificate not yet valid or expired (rustls reports
/// the verification time and the certificate's bound): the broker's
/// certificate is backdated a little and renewed long before it expires, so
/// this is a clock off by at least that much.
pub fn clock_words(text: &str) -> Option<String> {
    let seconds_before = |marker: &str| -> Option<u64> {
        let rest = text.get(text.find(marker)?..)?;
        let head = rest.get(..rest.find(" seconds")?)?;
        head.rsplit('(').next()?.trim().parse().ok()
    };
    let behind = text
        .contains("certificate not valid yet")
        .then(|| seconds_before("not valid before"))
        .flatten();
    let ahead = text
        .contains("certificate expired: verification time")
        .then(|| seconds_before("not valid after"))
        .flatten();
    let (off, direction) = match (behind, ahead) {
        (Some(s), _) => (s, "behind"),
        (None, Some(s)) => (s, "ahead of"),
        _ => return None,
    };
    Some(format!(
        "this host's clock is at least {} {direction} the broker's (the broker's certificate is {} by it); fix the clock (NTP)",
        tether_pki::reattest::plain_duration(std::time::Duration::from_secs(off.max(1))),
        if direction == "behind" {
            "not valid yet"
        } else {
            "expired"
        }
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_certificate_outside_its_validity_by_this_clock_names_the_clock() {
        // rustls's words for a certificate this host judged.
        let behind = "invalid peer certificate: certificate not valid yet: verification time 1764400000 (UNIX), but certificate is not valid before 1764407200 (7200 seconds in future)";
        let words = tls_refusal(behind).unwrap();
        assert_eq!(
            words,
            "this host's clock is at least 2 hours behind the broker's (the broker's certificate is not valid yet by it); fix the clock (NTP)"
        );
        let ahead = "invalid peer certificate: certificate expired: verification time 1764400000 (UNIX), but certificate is not valid after 1764227200 (172800 seconds ago)";
        assert!(
            tls_refusal(ahead)
                .unwrap()
                .starts_with("this host's clock is at least 2 days ahead of the broker's"),
        );
        // The broker's alert about this site's certificate is not a clock.
        assert_eq!(
            clock_words("received fatal alert: CertificateExpired"),
            None
        );
        assert_eq!(
            CertRefusal::from_text("received fatal alert: CertificateExpired"),
            Some(CertRefusal::Expired)
        );
    }
}
