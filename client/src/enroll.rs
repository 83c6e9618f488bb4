//! The site's certificate: `tether enroll` generates its key, sends a CSR
//! with the one-time code, and stores what it gets back; [`renew`] does the
//! same with the current certificate over the tunnel's connection, and
//! [`reattest`] renews a certificate the broker no longer accepts (expired
//! while the site was offline) on the proof of its key.

use std::time::{Duration, SystemTime};

use anyhow::Context;
use rustls::pki_types::CertificateDer;
use tether_config::Endpoint;
use tether_config::client::ClientFile;
use tether_pki::ca::pem_to_der;
use tether_pki::tls::{NameMismatch, PinNotServed, ca_pin, enrollment_client_config_noting};
use tether_pki::token::EnrollmentCode;
use tether_proto::api::{
    ApiError, ENROLL_PATH, EnrollRequest, EnrollResponse, REATTEST_PATH, RENEW_PATH,
    ReattestRefused, ReattestRequest, ReattestResponse, RenewRequest, RenewResponse,
};

use crate::dial;
use crate::dial::Target;
use crate::h3client::quic_config;
use crate::link::{BrokerConn, Dialer, dial_any};
use crate::proxy::Proxy;
use crate::state_dir::{Identity, StateDir};
use tether_shell::quic::transport_config;

/// Why enrollment failed when the broker's certificate (signed by the
/// pinned CA, so the right broker) does not carry the name dialled.
fn name_not_served(m: &NameMismatch) -> String {
    let names = if m.presented.is_empty() {
        "other names".to_string()
    } else {
        m.presented.join(", ")
    };
    format!(
        "{} is not a name this broker serves: its certificate names {names}. Enroll with one of them, or have the operator add {} to the broker's `advertised` and restart it",
        m.dialled, m.dialled
    )
}

/// The broker refused the enrollment code (unknown, already used or
/// expired): trying again with the same code cannot succeed.
#[derive(Debug, thiserror::Error)]
#[error("the broker refused enrollment: {message}")]
pub struct EnrollmentRefused {
    /// The HTTP status of the refusal.
    pub status: u16,
    /// The broker's reason, in plain words.
    pub message: String,
}

/// The broker could not enroll sites at the moment (HTTP 503 or another
/// server error, or 429): its store did not answer, it is overloaded or
/// starting. The code was not spent; the same code works later.
#[derive(Debug, thiserror::Error)]
#[error(
    "the broker cannot enroll sites right now: {message} (HTTP {status}); the code was not used: try again"
)]
pub struct EnrollmentUnavailable {
    /// The HTTP status.
    pub status: u16,
    /// The broker's reason, in plain words.
    pub message: String,
}

/// What enrollment produced.
#[derive(Debug)]
pub struct Enrolled {
    /// The broker's answer.
    pub response: EnrollResponse,
}

/// Enrolls this site with the broker at `broker` using `code`.
pub async fn enroll(
    broker: &str,
    code: &str,
    state: &StateDir,
    force: bool,
    proxy: Option<&str>,
) -> anyhow::Result<Enrolled> {
    let code = EnrollmentCode::parse(code).map_err(|e| anyhow::anyhow!("{e}"))?;
    let pin = code.ca_pin.clone().context(
        "this token has no CA pin (the part after the second '-'); copy the whole code that `tether-broker token create` printed",
    )?;
    if state.is_enrolled() && !force {
        anyhow::bail!(
            "this site is already enrolled ({}); to enroll again with a new token, add --force",
            state.path.display()
        );
    }
    let endpoint = Endpoint::parse(broker, 443)
        .with_context(|| format!("{broker:?} is not a broker address (host or host:port)"))?;
    // Before enrollment the published CIDR is not known yet: the operator
    // chose this address, and the CA pin authenticates whoever answers.
    let any: ipnet::IpNet = if matches!(
        endpoint.host,
        tether_config::Host::Ip(std::net::IpAddr::V6(_))
    ) {
        "::/0".parse()?
    } else {
        "0.0.0.0/0".parse()?
    };
    let targets = dial::resolve(&endpoint, any).await?;
    let (key, csr) = tether_pki::ca::site_key_and_csr("tether-site")?;
    let (tls, names, unserved) = enrollment_client_config_noting(&pin)?;
    let quic = quic_config(
        tls.clone(),
        transport_config(Duration::from_secs(5), Duration::from_secs(20)),
    )?;
    let proxy_setting = proxy.map(str::to_string);
    let dialer = Dialer {
        tls,
        quic,
        proxy: Proxy::from_config_or_env(proxy)?,
        timeout: Duration::from_secs(5),
        keepalive: Duration::from_secs(5),
        narrow_paths: Default::default(),
    };
    let (client, target) = match dial_any(&dialer, &targets).await {
        Ok(found) => found,
        Err(e) => match names.lock().ok().and_then(|n| n.clone()) {
            Some(mismatch) => anyhow::bail!("{}", name_not_served(&mismatch)),
            None if unserved.load(std::sync::atomic::Ordering::Relaxed) => {
                anyhow::bail!("{PinNotServed} (the code pins CA {pin})")
            }
            None => return Err(e),
        },
    };
    tracing::info!(broker = %target.addr, "enrolling over {}", client.transport().describe());
    let body = serde_json::to_vec(&EnrollRequest {
        token: code.secret.clone(),
        csr: data_encoding::BASE64.encode(&csr),
    })?;
    let (status, answer) = client
        .request("POST", &endpoint.to_string(), ENROLL_PATH, &body)
        .await?;
    client.close("enrolled");
    client.drain().await;
    if status != 200 {
        let message = serde_json::from_slice::<ApiError>(&answer)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&answer).to_string());
        if status == 429 || status >= 500 {
            return Err(EnrollmentUnavailable { status, message }.into());
        }
        return Err(EnrollmentRefused { status, message }.into());
    }
    let response: EnrollResponse =
        serde_json::from_slice(&answer).context("unexpected enrollment answer")?;
    pem_to_der(&response.ca, "CERTIFICATE").context("the broker sent no CA certificate")?;
    // The connection was authenticated by the pinned CA; during a CA
    // rotation a newer CA signs, and the bundle names both.
    let bundle = response.trust_bundle.as_deref().unwrap_or(&response.ca);
    if !tether_pki::ca::pems_to_der(bundle, "CERTIFICATE")
        .unwrap_or_default()
        .into_iter()
        .any(|c| ca_pin(&CertificateDer::from(c)) == pin)
    {
        anyhow::bail!(
            "the trust bundle the broker sent does not hold the token's pinned CA; refusing it"
        );
    }
    let now = tether_pki::token::unix_secs(std::time::SystemTime::now());
    state.save(
        &key.serialize_der(),
        &response.certificate,
        &response.ca,
        &Identity {
            identity: response.identity.clone(),
            site: response.site.clone(),
            region: response.region.clone(),
            not_after: response.not_after,
            issued_at: now,
        },
    )?;
    // The bundle comes over the connection authenticated by the pin.
    state.save_trust_bundle(response.trust_bundle.as_deref().unwrap_or(&response.ca))?;
    // The broker the engineer typed first, then the ones the broker lists.
    let mut brokers = vec![endpoint.to_string()];
    for b in &response.brokers {
        if !brokers.contains(b) {
            brokers.push(b.clone());
        }
    }
    let mut file = ClientFile {
        published_cidr: response.published_cidr.to_string(),
        brokers,
        ..ClientFile::default()
    };
    if let Some(proxy) = proxy_setting {
        file.transport.proxy = proxy;
    }
    state.save_config(&format!(
        "# Written by `tether enroll` for site {} in region {}.\n{}",
        response.site,
        response.region,
        file.to_toml()
    ))?;
    Ok(Enrolled { response })
}

/// Where `tether up` finds a one-time enrollment code for a site that has
/// no identity yet (a Kubernetes Secret mounted as a file, or an
/// environment variable).
#[derive(Debug, Clone, Default)]
pub struct FirstStart {
    /// The broker to enroll with (`host[:port]`).
    pub broker: Option<String>,
    /// The code itself.
    pub code: Option<String>,
    /// A file holding the code.
    pub code_file: Option<std::path::PathBuf>,
    /// The HTTP proxy setting to enroll through and keep.
    pub proxy: Option<String>,
}

/// The longest wait between two enrollment attempts of `tether up` while
/// the broker cannot enroll.
const ENROLL_RETRY_MAX: Duration = Duration::from_secs(30);

/// Enrolls on the first start: when `state` holds no identity yet and
/// `first` names a code, enrolls with it and returns what the broker
/// answered. A site already enrolled keeps its identity and never reads the
/// code again (it has been used; it may have expired since). Without a
/// code, returns `None` and the caller reports that the site is not
/// enrolled.
pub async fn enroll_on_first_start(
    state: &StateDir,
    first: &FirstStart,
) -> anyhow::Result<Option<Enrolled>> {
    if state.is_enrolled() {
        if first.code.is_some() || first.code_file.is_some() {
            tracing::debug!("already enrolled: the enrollment code is not needed");
        }
        return Ok(None);
    }
    let code = match (&first.code, &first.code_file) {
        (Some(code), _) => code.trim().to_string(),
        (None, Some(path)) => match std::fs::read_to_string(path) {
            Ok(text) => text.trim().to_string(),
            // No file: nothing to enroll with (e.g. an optional Secret).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "cannot read the enrollment code {}: {e}",
                    path.display()
                ));
            }
        },
        (None, None) => return Ok(None),
    };
    if code.is_empty() {
        return Ok(None);
    }
    let broker = first.broker.as_deref().context(
        "this site is not enrolled and has an enrollment code, but no broker to enroll with: set TETHER_BROKER (or --broker) to the broker's name or address",
    )?;
    tracing::info!(
        broker,
        "not enrolled yet: enrolling with the enrollment code"
    );
    // A broker that cannot enroll right now (its store is away) is asked
    // again, 1 s doubling up to 30 s apart: a site installed while etcd
    // is down comes up when it returns, without a restart.
    let mut wait = Duration::from_secs(1);
    let enrolled = loop {
        match enroll(broker, &code, state, false, first.proxy.as_deref()).await {
            Err(e) if e.downcast_ref::<EnrollmentUnavailable>().is_some() => {
                tracing::warn!("{e}; trying again in {} s", wait.as_secs());
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(ENROLL_RETRY_MAX);
            }
            other => break other?,
        }
    };
    let r = &enrolled.response;
    tracing::info!(
        site = %r.site,
        region = %r.region,
        identity = %r.identity,
        state = %state.path.display(),
        "enrolled; the key and certificate are kept in the state directory and the code is not needed again"
    );
    Ok(Some(enrolled))
}

/// How a renewal failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenewError {
    /// The broker refused the certificate on the connection (HTTP 401: it
    /// expired since the connection was made): only re-attestation renews
    /// it now. The broker's words.
    #[error("{0}")]
    CertificateRefused(String),
    /// Anything else: the request failed or the broker refused the request
    /// itself; a later renewal may succeed.
    #[error("{0}")]
    Failed(String),
}

/// Renews the site certificate over the tunnel connection.
pub async fn renew(conn: &BrokerConn, state: &StateDir, target: &Target) -> Result<(), RenewError> {
    let failed = |e: &dyn std::fmt::Display| RenewError::Failed(format!("{e:#}"));
    let creds = state.credentials().map_err(|e| failed(&e))?;
    let (key, csr) =
        tether_pki::ca::site_key_and_csr(creds.identity.site.as_str()).map_err(|e| failed(&e))?;
    let body = serde_json::to_vec(&RenewRequest {
        csr: data_encoding::BASE64.encode(&csr),
    })
    .map_err(|e| failed(&e))?;
    let (status, answer) = conn
        .request("POST", &target.endpoint.to_string(), RENEW_PATH, &body)
        .await
        .map_err(|e| failed(&e))?;
    if status != 200 {
        let message = serde_json::from_slice::<ApiError>(&answer)
            .map(|e| e.error)
            .unwrap_or_default();
        return Err(if status == 401 {
            RenewError::CertificateRefused(message)
        } else {
            RenewError::Failed(format!("HTTP {status}: {message}"))
        });
    }
    let renewed: RenewResponse = serde_json::from_slice(&answer).map_err(|e| failed(&e))?;
    save_renewal(state, &key.serialize_der(), creds.identity, &renewed).map_err(|e| failed(&e))?;
    tracing::info!("certificate renewed");
    Ok(())
}

/// Keeps a renewal's certificate, CA and trust bundle with the new key
/// (DER) in the state directory, the site's identity otherwise unchanged.
pub fn save_renewal(
    state: &StateDir,
    key_der: &[u8],
    identity: Identity,
    renewed: &RenewResponse,
) -> anyhow::Result<()> {
    state.save(
        key_der,
        &renewed.certificate,
        &renewed.ca,
        &Identity {
            not_after: renewed.not_after,
            issued_at: tether_pki::token::unix_secs(SystemTime::now()),
            ..identity
        },
    )?;
    state.save_trust_bundle(renewed.trust_bundle.as_deref().unwrap_or(&renewed.ca))?;
    Ok(())
}

/// How a re-attestation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReattestError {
    /// The broker refused, in its words; `reason` is its stable label
    /// (`revoked`, `past_window`, ...).
    #[error("{message}")]
    Refused {
        /// The label.
        reason: String,
        /// The broker's words.
        message: String,
    },
    /// The request did not get an answer, or this site cannot make one.
    #[error("{0}")]
    Failed(String),
}

/// Asks the broker on `conn` (a connection without a client certificate)
/// to re-attest this site: signs, with the key of the site's current
/// certificate, the connection's TLS exporter value, a CSR for a new key
/// (with `renew`; without, the broker only says whether it would) and the
/// identity. With `renew`, stores the new certificate and key.
pub async fn reattest(
    conn: &BrokerConn,
    state: &StateDir,
    target: &Target,
    renew: bool,
) -> Result<ReattestResponse, ReattestError> {
    let failed = |e: &dyn std::fmt::Display| ReattestError::Failed(e.to_string());
    let creds = state.credentials().map_err(|e| failed(&format!("{e:#}")))?;
    let leaf = creds
        .chain
        .first()
        .ok_or_else(|| failed(&"site.crt holds no certificate"))?;
    let fresh = if renew {
        Some(
            tether_pki::ca::site_key_and_csr(creds.identity.site.as_str())
                .map_err(|e| failed(&e))?,
        )
    } else {
        None
    };
    let csr = fresh.as_ref().map(|(_, csr)| csr.as_slice());
    let exporter = conn
        .exporter()
        .ok_or_else(|| failed(&"the connection has no TLS exporter"))?;
    let message =
        tether_pki::reattest::transcript(&exporter, csr.unwrap_or(&[]), &creds.identity.identity);
    let signature = tether_pki::reattest::sign(&creds.key, &message).map_err(|e| failed(&e))?;
    let body = serde_json::to_vec(&ReattestRequest {
        certificate: tether_pki::ca::der_to_pem(leaf, "CERTIFICATE"),
        csr: csr.map(|c| data_encoding::BASE64.encode(c)),
        signature: data_encoding::BASE64.encode(&signature),
    })
    .map_err(|e| failed(&e))?;
    let (status, answer) = conn
        .request("POST", &target.endpoint.to_string(), REATTEST_PATH, &body)
        .await
        .map_err(|e| failed(&format!("{e:#}")))?;
    if status != 200 {
        return Err(match serde_json::from_slice::<ReattestRefused>(&answer) {
            Ok(r) if (400..500).contains(&status) => ReattestError::Refused {
                reason: r.reason,
                message: r.error,
            },
            Ok(r) => ReattestError::Failed(format!("HTTP {status}: {}", r.error)),
            Err(_) => ReattestError::Failed(format!(
                "HTTP {status}: {}",
                serde_json::from_slice::<ApiError>(&answer)
                    .map(|e| e.error)
                    .unwrap_or_else(|_| String::from_utf8_lossy(&answer).to_string())
            )),
        });
    }
    let response: ReattestResponse = serde_json::from_slice(&answer)
        .map_err(|e| failed(&format!("unexpected re-attestation answer: {e}")))?;
    if let (Some((key, _)), Some(renewed)) = (fresh, &response.renewed) {
        state
            .save(
                &key.serialize_der(),
                &renewed.certificate,
                &renewed.ca,
                &Identity {
                    not_after: renewed.not_after,
                    issued_at: tether_pki::token::unix_secs(SystemTime::now()),
                    ..creds.identity
                },
            )
            .map_err(|e| failed(&format!("{e:#}")))?;
        state
            .save_trust_bundle(renewed.trust_bundle.as_deref().unwrap_or(&renewed.ca))
            .map_err(|e| failed(&format!("{e:#}")))?;
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_the_broker_does_not_serve_is_named_with_the_ones_it_does() {
        let text = name_not_served(&NameMismatch {
            dialled: "broker.example".into(),
            presented: vec!["127.0.0.1".into(), "localhost".into()],
        });
        assert!(
            text.starts_with("broker.example is not a name this broker serves"),
            "{text}"
        );
        assert!(text.contains("names 127.0.0.1, localhost"), "{text}");
        assert!(text.contains("`advertised`"), "{text}");
        assert!(!text.contains("cannot reach"), "{text}");
    }
}
