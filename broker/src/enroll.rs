//! Enrollment and renewal on the tunnel listener.
//!
//! Enrollment needs no client certificate: the one-time token authenticates
//! the site, and the identity it gets is the one the token was bound to.
//! The CSR is checked before the token is consumed, so a malformed request
//! does not burn a token. Renewal needs the site's current certificate.
//! Re-attestation renews an expired one: the site proves, over a connection
//! without a client certificate, that it holds the key of its last
//! certificate ([`tether_pki::reattest`]).

use std::time::SystemTime;

use tether_pki::PeerCert;
use tether_pki::reattest::{self, Facts, IssuedKey, Refusal};
use tether_pki::token::{self, RedeemError};
use tether_proto::api::{
    ApiError, EnrollRequest, EnrollResponse, REATTEST_PATH, ReattestRefused, ReattestRequest,
    ReattestResponse, RenewRequest, RenewResponse,
};
use tether_proto::events::EventKind;

use crate::state::Broker;

/// Largest enrollment or renewal request body.
pub const MAX_BODY: usize = 64 * 1024;

/// A JSON answer, whichever HTTP version carries it.
#[derive(Debug)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The JSON body.
    pub body: Vec<u8>,
}

impl Reply {
    /// A JSON answer.
    pub fn json<T: serde::Serialize>(status: u16, value: &T) -> Self {
        Self {
            status,
            body: serde_json::to_vec(value).unwrap_or_default(),
        }
    }

    /// A JSON error.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self::json(
            status,
            &ApiError {
                error: message.into(),
            },
        )
    }
}

fn decode_csr(csr: &str) -> Result<Vec<u8>, String> {
    data_encoding::BASE64
        .decode(csr.trim().as_bytes())
        .map_err(|_| "csr is not base64".to_string())
}

/// POST enroll: token + CSR in, certificate chain and CA out.
pub async fn enroll(broker: &std::sync::Arc<Broker>, body: &[u8]) -> Reply {
    let request: EnrollRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return Reply::error(400, format!("invalid enrollment request: {e}")),
    };
    let csr = match decode_csr(&request.csr) {
        Ok(c) => c,
        Err(e) => return Reply::error(400, e),
    };
    let broker2 = broker.clone();
    let result = tokio::task::spawn_blocking(move || issue(&broker2, &request.token, &csr)).await;
    match result {
        Ok(Ok(response)) => {
            crate::metrics::enrollment("ok");
            crate::metrics::certificate_issued("enroll");
            tracing::info!(site = %response.site, region = %response.region, "site enrolled");
            Reply::json(200, &response)
        }
        Ok(Err((status, message))) => {
            crate::metrics::enrollment(if status == 401 {
                "bad_token"
            } else {
                "refused"
            });
            tracing::info!(status, reason = %message, "enrollment refused");
            Reply::error(status, message)
        }
        Err(_) => Reply::error(500, "internal error"),
    }
}

fn issue(broker: &Broker, token_text: &str, csr: &[u8]) -> Result<EnrollResponse, (u16, String)> {
    // Check the CSR first: an unusable request must not consume the token.
    tether_pki::ca::check_csr(csr).map_err(|e| (400, e.to_string()))?;
    let record = token::redeem(broker.store.as_ref(), token_text, SystemTime::now()).map_err(
        |e| match e {
            RedeemError::Ledger(m) => (
                503,
                format!("the broker's store did not answer; try again: {m}"),
            ),
            e => (401, e.to_string()),
        },
    )?;
    // The token is spent from here. If the store fails before the site
    // has its certificate, the token is put back, so that the site's
    // retry enrolls it.
    issue_redeemed(broker, &record, csr).map_err(|(status, message)| {
        if status < 500 {
            return (status, message);
        }
        match put_back(broker, &record) {
            Ok(()) => (
                503,
                format!("{message}; the token is still valid, try again"),
            ),
            Err(e) => (
                503,
                format!(
                    "{message}; the token could not be kept ({e}): ask the operator for a new one"
                ),
            ),
        }
    })
}

/// How often a redeemed token is put back after its enrollment failed on
/// the store, and the pause between the attempts.
const PUT_BACK_ATTEMPTS: u32 = 6;
const PUT_BACK_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Puts a redeemed token back after its enrollment failed on the store,
/// so that the site's retry enrolls it. The store has just failed, and a
/// put tried at once often fails the same way (an etcd leader election, a
/// member cut off and not yet out of the client's pool), which lost the
/// token for good: it is tried again for a few seconds.
fn put_back(broker: &Broker, record: &tether_pki::token::TokenRecord) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 0..PUT_BACK_ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(PUT_BACK_PAUSE);
        }
        match broker.store.put(record.clone()) {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::debug!(attempt, error = %e, "the redeemed token could not be put back yet");
                last = e.to_string();
            }
        }
    }
    Err(last)
}

/// Enrollment after the token was redeemed.
fn issue_redeemed(
    broker: &Broker,
    record: &tether_pki::token::TokenRecord,
    csr: &[u8],
) -> Result<EnrollResponse, (u16, String)> {
    let site = broker
        .store
        .site(&record.site)
        .map_err(|e| (500, e.to_string()))?;
    if site
        .as_ref()
        .is_none_or(|s| s.revoked || s.region != record.region)
    {
        return Err((
            403,
            format!(
                "site {} is revoked or unknown; ask the operator for a new token",
                record.site
            ),
        ));
    }
    let identity = broker.identity(&record.site, &record.region);
    let signer = broker.ca.signer();
    let cert = signer
        .issue_site(
            csr,
            &identity,
            SystemTime::now(),
            broker.config.site_cert_lifetime,
        )
        .map_err(|e| (400, e.to_string()))?;
    // The site's addresses exist from enrollment on, so its name resolves
    // before it first connects. A full pool does not fail enrollment: the
    // first connection reports it.
    if let Err(e) = broker.site_addresses(&record.site, &record.region) {
        tracing::warn!(site = %record.site, error = %e, "no address allocated at enrollment");
    }
    broker
        .record_issued(&identity, &cert)
        .map_err(|e| (500, e.to_string()))?;
    broker.record_event(
        &record.site,
        EventKind::Enrolled {
            not_after: token::unix_secs(cert.not_after),
        },
    );
    // Every live broker of the region, so the site can fail over.
    let brokers = broker.site_brokers(&record.region).1;
    Ok(EnrollResponse {
        identity: identity.uri(),
        site: record.site.clone(),
        region: record.region.clone(),
        certificate: cert.pem,
        ca: signer.cert_pem().to_string(),
        trust_bundle: Some(broker.ca.bundle_pem()),
        not_after: token::unix_secs(cert.not_after),
        brokers,
        published_cidr: broker.config.published_cidr,
    })
}

/// POST renew: a new certificate for the identity of the current one.
pub async fn renew(broker: &std::sync::Arc<Broker>, peer: Option<PeerCert>, body: &[u8]) -> Reply {
    let Some(peer) = peer else {
        return Reply::error(
            401,
            "renewal needs the site's current certificate; a site without a valid one renews by re-attestation",
        );
    };
    // The TLS handshake checked the certificate when the connection was
    // made; a connection can outlive it. An expired certificate is
    // renewed only by re-attestation, which checks revocation and the
    // window.
    if let Some(refusal) = renewal_refusal(&peer, SystemTime::now()) {
        return refuse_renewal(&peer, &Refused::new(401, "expired", refusal));
    }
    let request: RenewRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return Reply::error(400, format!("invalid renewal request: {e}")),
    };
    let csr = match decode_csr(&request.csr) {
        Ok(c) => c,
        Err(e) => return Reply::error(400, e),
    };
    let broker2 = broker.clone();
    let peer2 = peer.clone();
    let result = tokio::task::spawn_blocking(move || renew_blocking(&broker2, &peer2, &csr)).await;
    match result {
        Ok(Ok(response)) => {
            crate::metrics::certificate_issued("renew");
            tracing::info!(site = %peer.identity.site, "site certificate renewed");
            Reply::json(200, &response)
        }
        Ok(Err(refused)) if refused.status == 401 => refuse_renewal(&peer, &refused),
        Ok(Err(failed)) => Reply::error(failed.status, failed.message),
        Err(_) => Reply::error(500, "internal error"),
    }
}

/// Issues the renewed certificate, unless the site or the certificate on
/// the connection was revoked since the connection was made (revocation
/// closes a site's tunnel, but a connection without one, or one whose
/// revocation notice has not arrived yet, may still ask). A refusal has
/// status 401 and a metric label; other errors are not refusals.
fn renew_blocking(broker: &Broker, peer: &PeerCert, csr: &[u8]) -> Result<RenewResponse, Refused> {
    let internal = |e: &dyn std::fmt::Display| Refused::new(500, "internal", e.to_string());
    let identity = &peer.identity;
    let record = broker
        .store
        .site(&identity.site)
        .map_err(|e| internal(&e))?
        .filter(|r| r.region == identity.region);
    if let Some(revoked) = broker
        .revoked_by(identity, &peer.serial, record.as_ref())
        .map_err(|e| internal(&e))?
    {
        let refusal = revoked.refusal();
        return Err(Refused::new(
            401,
            refusal.reason(),
            refusal.message(identity.site.as_str(), identity.region.as_str()),
        ));
    }
    let signer = broker.ca.signer();
    let cert = signer
        .issue_site(
            csr,
            identity,
            SystemTime::now(),
            broker.config.site_cert_lifetime,
        )
        .map_err(|e| Refused::new(400, "malformed", e.to_string()))?;
    broker
        .record_issued(identity, &cert)
        .map_err(|e| internal(&e))?;
    broker.record_event(
        &identity.site,
        EventKind::Renewed {
            not_after: token::unix_secs(cert.not_after),
        },
    );
    Ok(RenewResponse {
        certificate: cert.pem,
        ca: signer.cert_pem().to_string(),
        trust_bundle: Some(broker.ca.bundle_pem()),
        not_after: token::unix_secs(cert.not_after),
    })
}

/// Answers a refused renewal: counted by reason, logged, and the plain
/// words for the site (HTTP 401: the certificate on the connection is
/// refused; the agent then ends the session and re-attests, which gives
/// the same words for a revocation).
fn refuse_renewal(peer: &PeerCert, refused: &Refused) -> Reply {
    crate::metrics::renewal_refused(refused.reason);
    tracing::info!(
        site = %peer.identity.site,
        reason = refused.reason,
        "renewal refused: {}",
        refused.message
    );
    Reply::error(refused.status, refused.message.clone())
}

/// Why a renewal with `peer`'s certificate is refused at `now`, if it is:
/// the certificate on the connection has expired since it was made.
fn renewal_refusal(peer: &PeerCert, now: SystemTime) -> Option<String> {
    let expired = now.duration_since(peer.not_after).ok()?;
    Some(format!(
        "the certificate on this connection expired {} s ago ({}); renewal needs a currently valid certificate: renew it by re-attestation ({REATTEST_PATH}) on a new connection, which the agent does by itself",
        expired.as_secs(),
        reattest::utc_date(peer.not_after),
    ))
}

/// A refused re-attestation: status, words, and the metric label.
struct Refused {
    status: u16,
    message: String,
    reason: &'static str,
}

impl Refused {
    fn new(status: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            reason,
        }
    }
}

/// POST reattest: a site whose certificate expired (or that the broker no
/// longer accepts) proves it holds the key of its last certificate over
/// this connection, whose TLS exporter value (`exporter`) its signature
/// covers, and gets a new certificate.
pub async fn reattest(
    broker: &std::sync::Arc<Broker>,
    exporter: Option<[u8; reattest::EXPORTER_LEN]>,
    body: &[u8],
) -> Reply {
    let Some(exporter) = exporter else {
        return Reply::error(500, "internal error");
    };
    let request: ReattestRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return Reply::error(400, format!("invalid re-attestation request: {e}")),
    };
    let broker2 = broker.clone();
    let result = tokio::task::spawn_blocking(move || {
        reattest_blocking(&broker2, &exporter, &request, SystemTime::now())
    })
    .await;
    match result {
        Ok(Ok((site, response))) => {
            let renewed = response.renewed.is_some();
            // A proof without a CSR (`tether doctor`'s dry run) is a check,
            // not a re-attestation.
            crate::metrics::reattestation(if renewed { "accepted" } else { "checked" });
            if renewed {
                crate::metrics::certificate_issued("reattest");
            }
            tracing::info!(
                site = %site,
                expired_secs = response.expired_secs,
                renewed,
                "site re-attested with the key of its last certificate"
            );
            Reply::json(200, &response)
        }
        Ok(Err(refused)) => {
            crate::metrics::reattestation(refused.reason);
            tracing::info!(
                status = refused.status,
                reason = refused.reason,
                "re-attestation refused: {}",
                refused.message
            );
            Reply::json(
                refused.status,
                &ReattestRefused {
                    error: refused.message,
                    reason: refused.reason.to_string(),
                },
            )
        }
        Err(_) => Reply::error(500, "internal error"),
    }
}

fn reattest_blocking(
    broker: &Broker,
    exporter: &[u8],
    request: &ReattestRequest,
    now: SystemTime,
) -> Result<(tether_proto::ids::SiteId, ReattestResponse), Refused> {
    let malformed = |m: String| Refused::new(400, "malformed", m);
    let internal = |e: &dyn std::fmt::Display| Refused::new(500, "internal", e.to_string());
    let cert = tether_pki::ca::pem_to_der(&request.certificate, "CERTIFICATE")
        .map(rustls::pki_types::CertificateDer::from)
        .ok_or_else(|| malformed("certificate is not a PEM certificate".into()))?;
    let csr = match &request.csr {
        Some(text) => {
            let csr = decode_csr(text).map_err(malformed)?;
            tether_pki::ca::check_csr(&csr).map_err(|e| malformed(e.to_string()))?;
            Some(csr)
        }
        None => None,
    };
    let signature = data_encoding::BASE64
        .decode(request.signature.trim().as_bytes())
        .map_err(|_| malformed("signature is not base64".into()))?;
    let presented = reattest::verify_presented_by(
        &broker.ca.bundle_der(),
        broker.ca.trust_domain(),
        &cert,
        now,
    )
    .map_err(|e| Refused::new(403, "not_ours", e.to_string()))?;
    let identity = presented.peer.identity.clone();
    let message = reattest::transcript(exporter, csr.as_deref().unwrap_or(&[]), &identity.uri());
    let (site, region) = (identity.site.as_str(), identity.region.as_str());
    reattest::verify_proof(&cert, &message, &signature).map_err(|_| {
        Refused::new(
            401,
            Refusal::BadProof.reason(),
            Refusal::BadProof.message(site, region),
        )
    })?;
    let record = broker
        .store
        .site(&identity.site)
        .map_err(|e| internal(&e))?
        .filter(|r| r.region == identity.region);
    let revoked = broker
        .revoked_by(&identity, &presented.peer.serial, record.as_ref())
        .map_err(|e| internal(&e))?;
    let issued: Vec<IssuedKey> = match &record {
        Some(_) => broker
            .store
            .certs_of(&identity.site)
            .map_err(|e| internal(&e))?
            .into_iter()
            .filter(|c| c.region == identity.region)
            .map(|c| IssuedKey {
                serial: c.serial,
                not_after: c.not_after,
                spki_sha256: c.spki_sha256,
            })
            .collect(),
        None => Vec::new(),
    };
    let key = reattest::key_standing(
        &issued,
        &data_encoding::HEXLOWER.encode(&presented.peer.serial),
        &presented.spki_sha256,
    );
    let window = broker.config.reattest_window;
    let granted = reattest::decide(&Facts {
        now,
        not_after: presented.peer.not_after,
        window,
        revoked,
        key,
    })
    .map_err(|refusal| Refused::new(403, refusal.reason(), refusal.message(site, region)))?;
    let renewed = match csr {
        Some(csr) => {
            let signer = broker.ca.signer();
            let cert = signer
                .issue_site(&csr, &identity, now, broker.config.site_cert_lifetime)
                .map_err(|e| malformed(e.to_string()))?;
            broker
                .record_issued(&identity, &cert)
                .map_err(|e| internal(&e))?;
            Some(RenewResponse {
                certificate: cert.pem,
                ca: signer.cert_pem().to_string(),
                trust_bundle: Some(broker.ca.bundle_pem()),
                not_after: token::unix_secs(cert.not_after),
            })
        }
        None => None,
    };
    broker.record_event(
        &identity.site,
        EventKind::Reattested {
            not_after: renewed.as_ref().map(|r| r.not_after),
        },
    );
    Ok((
        identity.site,
        ReattestResponse {
            expired_secs: granted.expired_for.as_secs(),
            window_secs: window.as_secs(),
            renewed,
        },
    ))
}
