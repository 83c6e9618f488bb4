//! Admission, without state: what a request to the tunnel listener asks
//! for, who may open a tunnel, how long tokens live, what happens to a
//! site's record when it gets a token, and how a session's end is told to
//! the site on the wire.

use std::time::Duration;

use super::BrokerCore;
use crate::api::{BROKERS_PATH, ENROLL_PATH, REATTEST_PATH, RENEW_PATH};
use crate::connect_ip::{self, Scope};
use crate::h3::error::{H3_NO_ERROR, H3_REQUEST_CANCELLED, H3_REQUEST_REJECTED};
use crate::ids::{RegionId, SiteId};
use crate::report::REPORT_PATH;

/// Why a session ended (or must end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The site's certificate or identity was revoked.
    Revoked,
    /// The same site connected again.
    Replaced,
    /// The site's certificate expired.
    CertificateExpired,
    /// The broker is shutting down.
    Shutdown,
}

/// How long a connection whose session was replaced by one on another
/// connection keeps carrying the site's packets: longer than a site takes
/// to move its tunnel once the newer session is open (a round trip and its
/// own work), shorter than the agent keeps a connection it left
/// (`agent::liveness::RETIRE_AFTER`), so the broker closes it first.
pub const REPLACED_DRAIN: Duration = Duration::from_secs(2);

/// How the shell ends a session's tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseAction {
    /// Close the whole connection with this HTTP/3 error code and reason
    /// (HTTP/2: close the TCP connection).
    CloseConnection {
        /// The application error code.
        code: u64,
        /// The reason phrase.
        reason: &'static [u8],
        /// How long to keep taking the site's packets on the connection
        /// before closing it (sooner if the site closes it): a site moves
        /// its tunnel to its newer connection only once the broker has, so
        /// what it sends on this one meanwhile, and what the broker queued
        /// on it, is still delivered. Zero: close now.
        drain: Duration,
    },
    /// Reset only the request stream with this code: the connection carries
    /// the site's newer session.
    ResetStream {
        /// The stream error code.
        code: u64,
    },
}

impl CloseReason {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Revoked => "revoked",
            CloseReason::Replaced => "replaced",
            CloseReason::CertificateExpired => "certificate_expired",
            CloseReason::Shutdown => "shutdown",
        }
    }

    /// How to end the tunnel; `newer_on_same_connection` says whether the
    /// site's current session runs on the same connection (it reconnected
    /// its request, not its connection).
    pub fn action(self, newer_on_same_connection: bool) -> CloseAction {
        match self {
            // Refused, as the TLS handshake would refuse it now.
            CloseReason::Revoked => CloseAction::CloseConnection {
                code: H3_REQUEST_REJECTED,
                reason: b"site certificate revoked",
                drain: Duration::ZERO,
            },
            CloseReason::CertificateExpired => CloseAction::CloseConnection {
                code: H3_NO_ERROR,
                reason: b"site certificate expired",
                drain: Duration::ZERO,
            },
            CloseReason::Shutdown => CloseAction::CloseConnection {
                code: H3_NO_ERROR,
                reason: b"broker shutting down",
                drain: Duration::ZERO,
            },
            CloseReason::Replaced if newer_on_same_connection => CloseAction::ResetStream {
                code: H3_REQUEST_CANCELLED,
            },
            CloseReason::Replaced => CloseAction::CloseConnection {
                code: H3_NO_ERROR,
                reason: b"replaced by a newer connection",
                drain: REPLACED_DRAIN,
            },
        }
    }
}

/// A refused CONNECT-IP request: HTTP status and what the site should know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// The message for the site.
    pub message: String,
}

/// Checks a CONNECT-IP request before anything is allocated: a site
/// certificate (401 without), a whole-tunnel scope and the Capsule-Protocol
/// header (400).
pub fn authorize(
    has_certificate: bool,
    path: &str,
    capsule_protocol: Option<&str>,
) -> Result<(), Refusal> {
    let refuse = |status, message: String| Err(Refusal { status, message });
    if !has_certificate {
        return refuse(
            401,
            "a site certificate is required: enroll this site first (tether enroll)".into(),
        );
    }
    match Scope::from_path(path) {
        Ok(scope) if scope.is_any() => {}
        Ok(_) => {
            return refuse(
                400,
                "tether serves whole tunnels only: /.well-known/masque/ip/*/*/".into(),
            );
        }
        Err(e) => return refuse(400, e.to_string()),
    }
    if capsule_protocol.is_some_and(|v| v != "?1") {
        return refuse(400, "Capsule-Protocol must be ?1".into());
    }
    Ok(())
}

/// What a request to the tunnel listener asks for, over HTTP/3 or HTTP/2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// A CONNECT-IP tunnel (extended CONNECT, `:protocol connect-ip`).
    ConnectIp,
    /// Enrollment with a token (`POST` to [`ENROLL_PATH`]).
    Enroll,
    /// Renewal of a site certificate (`POST` to [`RENEW_PATH`]).
    Renew,
    /// Renewal of an expired site certificate with a proof of its key
    /// (`POST` to [`REATTEST_PATH`]).
    Reattest,
    /// The brokers of the site's region (`POST` to [`BROKERS_PATH`]).
    Brokers,
    /// Problems the site reports for its timeline (`POST` to
    /// [`REPORT_PATH`]).
    Report,
}

/// Classifies a request by its method, `:protocol` and path; anything else
/// is refused: 501 for another CONNECT, 404 for the rest.
pub fn classify_request(
    method: &str,
    protocol: Option<&str>,
    path: &str,
) -> Result<RequestKind, Refusal> {
    match (method, protocol, path) {
        ("CONNECT", Some(connect_ip::PROTOCOL), _) => Ok(RequestKind::ConnectIp),
        ("POST", None, ENROLL_PATH) => Ok(RequestKind::Enroll),
        ("POST", None, RENEW_PATH) => Ok(RequestKind::Renew),
        ("POST", None, REATTEST_PATH) => Ok(RequestKind::Reattest),
        ("POST", None, BROKERS_PATH) => Ok(RequestKind::Brokers),
        ("POST", None, REPORT_PATH) => Ok(RequestKind::Report),
        ("CONNECT", _, _) => Err(Refusal {
            status: 501,
            message: "only CONNECT-IP (:protocol connect-ip) is served here".into(),
        }),
        _ => Err(Refusal {
            status: 404,
            message: format!("nothing at {path}"),
        }),
    }
}

/// How long enrollment tokens live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenPolicy {
    /// When the operator does not say.
    pub default_ttl: Duration,
    /// The longest an operator may ask for.
    pub max_ttl: Duration,
}

/// Longest token lifetime an operator may ask for.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 86_400);

/// What becomes of a site's record when it gets a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SiteRecordAction {
    /// A new site: create its record.
    Create,
    /// A known site: keep its record.
    Keep,
    /// A revoked site is re-admitted: its identity works again, but every
    /// certificate issued before stays revoked (revoke each serial, then
    /// lift the site revocation and clear the record's flag).
    Readmit,
}

/// Why no token is issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The region is not served.
    #[error("region {0} is not configured on this broker")]
    UnknownRegion(RegionId),
    /// The lifetime is out of bounds.
    #[error("ttl must be between 1s and 30 days")]
    BadTtl,
    /// Site ids are unique across regions.
    #[error("site {site} already exists in region {existing}; site ids are unique across regions")]
    SiteInOtherRegion {
        /// The site.
        site: SiteId,
        /// Where it exists.
        existing: RegionId,
    },
}

impl BrokerCore {
    /// Checks the region of a token request.
    pub fn token_region(&self, region: &RegionId) -> Result<(), TokenError> {
        if self.regions.contains_key(region) {
            Ok(())
        } else {
            Err(TokenError::UnknownRegion(region.clone()))
        }
    }

    /// The lifetime of a token: `requested`, or the default; within bounds.
    pub fn token_ttl(&self, requested: Option<Duration>) -> Result<Duration, TokenError> {
        let ttl = requested.unwrap_or(self.tokens.default_ttl);
        if ttl.is_zero() || ttl > self.tokens.max_ttl {
            return Err(TokenError::BadTtl);
        }
        Ok(ttl)
    }

    /// What to do with the site's record, given the record's region and
    /// revocation flag if it exists.
    pub fn token_record(
        &self,
        site: &SiteId,
        region: &RegionId,
        existing: Option<(&RegionId, bool)>,
    ) -> Result<SiteRecordAction, TokenError> {
        match existing {
            Some((existing, _)) if existing != region => Err(TokenError::SiteInOtherRegion {
                site: site.clone(),
                existing: existing.clone(),
            }),
            Some((_, true)) => Ok(SiteRecordAction::Readmit),
            Some((_, false)) => Ok(SiteRecordAction::Keep),
            None => Ok(SiteRecordAction::Create),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    #[test]
    fn close_reasons_map_to_wire_codes() {
        assert_eq!(
            CloseReason::Revoked.action(false),
            CloseAction::CloseConnection {
                code: H3_REQUEST_REJECTED,
                reason: b"site certificate revoked",
                drain: Duration::ZERO,
            }
        );
        for r in [CloseReason::CertificateExpired, CloseReason::Shutdown] {
            assert!(matches!(
                r.action(true),
                CloseAction::CloseConnection {
                    code: H3_NO_ERROR,
                    ..
                }
            ));
        }
        assert_eq!(
            CloseReason::Replaced.action(true),
            CloseAction::ResetStream {
                code: H3_REQUEST_CANCELLED
            }
        );
        assert!(matches!(
            CloseReason::Replaced.action(false),
            CloseAction::CloseConnection {
                code: H3_NO_ERROR,
                drain: REPLACED_DRAIN,
                ..
            }
        ));
        assert!(REPLACED_DRAIN < crate::agent::liveness::RETIRE_AFTER);
        assert_eq!(
            CloseReason::CertificateExpired.as_str(),
            "certificate_expired"
        );
    }

    #[test]
    fn authorization_needs_a_certificate_a_whole_tunnel_and_capsules() {
        let any = "/.well-known/masque/ip/*/*/";
        assert_eq!(authorize(false, any, None).unwrap_err().status, 401);
        assert_eq!(
            authorize(true, "/.well-known/masque/ip/10.0.0.1/*/", None)
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(authorize(true, "/nope", None).unwrap_err().status, 400);
        assert_eq!(authorize(true, any, Some("?0")).unwrap_err().status, 400);
        assert_eq!(authorize(true, any, Some("?1")), Ok(()));
        assert_eq!(authorize(true, any, None), Ok(()));
    }

    #[test]
    fn token_policy() {
        let core = BrokerCore::new(config());
        assert_eq!(core.token_region(&eu()), Ok(()));
        assert_eq!(
            core.token_region(&id("us")),
            Err(TokenError::UnknownRegion(id("us")))
        );
        assert_eq!(core.token_ttl(None), Ok(Duration::from_secs(3600)));
        assert_eq!(
            core.token_ttl(Some(Duration::from_secs(60))),
            Ok(Duration::from_secs(60))
        );
        assert_eq!(
            core.token_ttl(Some(Duration::ZERO)),
            Err(TokenError::BadTtl)
        );
        assert_eq!(
            core.token_ttl(Some(MAX_TOKEN_TTL + Duration::from_secs(1))),
            Err(TokenError::BadTtl)
        );
        let site: SiteId = id("a");
        assert_eq!(
            core.token_record(&site, &eu(), None),
            Ok(SiteRecordAction::Create)
        );
        assert_eq!(
            core.token_record(&site, &eu(), Some((&eu(), false))),
            Ok(SiteRecordAction::Keep)
        );
        assert_eq!(
            core.token_record(&site, &eu(), Some((&eu(), true))),
            Ok(SiteRecordAction::Readmit)
        );
        assert!(matches!(
            core.token_record(&site, &eu(), Some((&id("us"), false))),
            Err(TokenError::SiteInOtherRegion { .. })
        ));
    }

    #[test]
    fn requests_are_classified_the_same_for_every_listener() {
        let tunnel = "/.well-known/masque/ip/*/*/";
        assert_eq!(
            classify_request("CONNECT", Some("connect-ip"), tunnel),
            Ok(RequestKind::ConnectIp)
        );
        assert_eq!(
            classify_request("POST", None, ENROLL_PATH),
            Ok(RequestKind::Enroll)
        );
        assert_eq!(
            classify_request("POST", None, RENEW_PATH),
            Ok(RequestKind::Renew)
        );
        assert_eq!(
            classify_request("POST", None, REATTEST_PATH),
            Ok(RequestKind::Reattest)
        );
        assert_eq!(
            classify_request("POST", None, BROKERS_PATH),
            Ok(RequestKind::Brokers)
        );
        assert_eq!(
            classify_request("POST", None, REPORT_PATH),
            Ok(RequestKind::Report)
        );
        // Another extended CONNECT, or a plain one: not served.
        for protocol in [Some("connect-udp"), None] {
            let refused = classify_request("CONNECT", protocol, tunnel).unwrap_err();
            assert_eq!(refused.status, 501);
            assert!(refused.message.contains("CONNECT-IP"), "{refused:?}");
        }
        // Enrollment with a :protocol, another method, another path.
        for (method, protocol, path) in [
            ("POST", Some("connect-ip"), ENROLL_PATH),
            ("GET", None, ENROLL_PATH),
            ("GET", None, BROKERS_PATH),
            ("GET", None, REPORT_PATH),
            ("POST", None, "/elsewhere"),
        ] {
            let refused = classify_request(method, protocol, path).unwrap_err();
            assert_eq!(refused.status, 404, "{method} {protocol:?} {path}");
            assert_eq!(refused.message, format!("nothing at {path}"));
        }
    }
}
