//! Enrollment and renewal on the tunnel listener.
//!
//! Enrollment needs no client certificate: the one-time token authenticates
//! the site, and the identity it gets is the one the token was bound to.
//! The CSR is checked before the token is consumed, so a malformed request
//! does not burn a token. Renewal needs the site's current certificate.

use std::time::SystemTime;

use tether_pki::PeerCert;
use tether_pki::token::{self, RedeemError};
use tether_proto::api::{ApiError, EnrollRequest, EnrollResponse, RenewRequest, RenewResponse};

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
            RedeemError::Ledger(m) => (500, m),
            e => (401, e.to_string()),
        },
    )?;
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
    let cert = broker
        .ca
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
        .record_issued(&identity, &cert.serial, cert.not_after)
        .map_err(|e| (500, e.to_string()))?;
    // Every live broker of the region, so the site can fail over.
    let brokers = broker.site_brokers(&record.region).1;
    Ok(EnrollResponse {
        identity: identity.uri(),
        site: record.site,
        region: record.region,
        certificate: cert.pem,
        ca: broker.ca.cert_pem().to_string(),
        not_after: token::unix_secs(cert.not_after),
        brokers,
        published_cidr: broker.config.published_cidr,
    })
}

/// POST renew: a new certificate for the identity of the current one.
pub async fn renew(broker: &std::sync::Arc<Broker>, peer: Option<PeerCert>, body: &[u8]) -> Reply {
    let Some(peer) = peer else {
        return Reply::error(401, "renewal needs the site's current certificate");
    };
    let request: RenewRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return Reply::error(400, format!("invalid renewal request: {e}")),
    };
    let csr = match decode_csr(&request.csr) {
        Ok(c) => c,
        Err(e) => return Reply::error(400, e),
    };
    let broker2 = broker.clone();
    let identity = peer.identity.clone();
    let result = tokio::task::spawn_blocking(move || {
        let cert = broker2
            .ca
            .issue_site(
                &csr,
                &identity,
                SystemTime::now(),
                broker2.config.site_cert_lifetime,
            )
            .map_err(|e| (400, e.to_string()))?;
        broker2
            .record_issued(&identity, &cert.serial, cert.not_after)
            .map_err(|e| (500, e.to_string()))?;
        Ok::<_, (u16, String)>(RenewResponse {
            certificate: cert.pem,
            ca: broker2.ca.cert_pem().to_string(),
            not_after: token::unix_secs(cert.not_after),
        })
    })
    .await;
    match result {
        Ok(Ok(response)) => {
            tracing::info!(site = %peer.identity.site, "site certificate renewed");
            Reply::json(200, &response)
        }
        Ok(Err((status, message))) => Reply::error(status, message),
        Err(_) => Reply::error(500, "internal error"),
    }
}
