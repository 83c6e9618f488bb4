//! Re-attestation against a real broker on loopback: a site whose
//! certificate expired while it was offline comes back by itself with the
//! same address; one offline past the window, and a revoked one, are
//! refused with the reason in plain words, which `tether doctor` shows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use tether::doctor::{self, Level};
use tether::enroll::ReattestError;
use tether::failure::CertRefusal;
use tether::link::Dialer;
use tether::state_dir::Identity;
use tether_proto::tunnel::Transport;
use tether_tests::{TestBroker, TestSite, tunnel_for, v4};

/// Asks `broker` over `transport`, as the agent does, to re-attest `site`.
async fn reattest(
    broker: &TestBroker,
    site: &TestSite,
    transport: Transport,
    renew: bool,
) -> Result<tether_proto::api::ReattestResponse, ReattestError> {
    let config = broker.client_config();
    let dialer = Dialer::for_reattestation(&config, &site.state, None).unwrap();
    let (conn, target) = dialer.connect(&config, &[transport]).await.unwrap();
    let answer = tether::enroll::reattest(&conn, &site.state, &target, renew).await;
    conn.close("done");
    conn.drain().await;
    answer
}

/// How the broker answers the site's current certificate on a dial.
async fn dial_refusal(broker: &TestBroker, site: &TestSite) -> Option<CertRefusal> {
    let config = broker.client_config();
    let dialer = Dialer::for_site(&config, &site.state, None).unwrap();
    match dialer.connect(&config, &[Transport::H3]).await {
        Ok(_) => None,
        Err(f) => {
            assert!(f.refused, "{f}");
            Some(
                f.certificate
                    .unwrap_or_else(|| panic!("not a certificate refusal: {f}")),
            )
        }
    }
}

/// Replaces the site's certificate with one of `lifetime` issued at
/// `issued` for the same identity, recorded by the broker as issued.
fn reissue(broker: &TestBroker, site: &TestSite, issued: SystemTime, lifetime: Duration) {
    let creds = site.state.credentials().unwrap();
    let b = broker.broker();
    let identity = b.identity(&creds.identity.site, &creds.identity.region);
    let (key, csr) = tether_pki::ca::site_key_and_csr("site").unwrap();
    let cert = b.ca.issue_site(&csr, &identity, issued, lifetime).unwrap();
    b.record_issued(&identity, &cert).unwrap();
    site.state
        .save(
            &key.serialize_der(),
            &cert.pem,
            &b.ca.cert_pem(),
            &Identity {
                not_after: tether_pki::token::unix_secs(cert.not_after),
                issued_at: tether_pki::token::unix_secs(issued),
                ..creds.identity
            },
        )
        .unwrap();
}

fn check<'a>(report: &'a doctor::Report, name: &str) -> &'a doctor::Check {
    report
        .check(name)
        .unwrap_or_else(|| panic!("no {name} check:\n{}", report.render()))
}

#[tokio::test]
async fn a_site_offline_for_three_lifetimes_returns_with_its_address() {
    const LIFETIME: Duration = Duration::from_secs(2);
    let broker = TestBroker::start_with("", |c| {
        c.site_cert_lifetime = LIFETIME;
        c.reattest_window = Duration::from_secs(60);
    })
    .await;
    let site = TestSite::enroll(&broker, "lab-away").await;
    let address = {
        let tunnel = tunnel_for(&broker, &site).await;
        v4(&tunnel)
    };
    let first = site.state.credentials().unwrap();

    // Offline for three lifetimes: the certificate expired two ago.
    let not_after = tether_pki::token::from_unix_secs(first.identity.not_after);
    let back = not_after + 2 * LIFETIME + Duration::from_millis(500);
    tokio::time::sleep(back.duration_since(SystemTime::now()).unwrap_or_default()).await;
    assert_eq!(
        dial_refusal(&broker, &site).await,
        Some(CertRefusal::Expired)
    );

    // Doctor says the site renews itself, without a new code.
    let report = doctor::run(&broker.client_config(), &site.state).await;
    println!("{}", report.render());
    let verdict = check(&report, "re-attestation");
    assert_eq!(verdict.level, Level::Ok, "{}", report.render());
    assert!(
        verdict.detail.contains("no new enrollment is needed"),
        "{}",
        verdict.detail
    );
    assert!(!report.blocked(), "{}", report.render());
    assert!(
        report
            .render()
            .contains("renewed its certificate by re-attestation"),
        "{}",
        report.render()
    );

    // A question over HTTP/2 changes nothing; the renewal over HTTP/3
    // stores a new certificate for a new key.
    let asked = reattest(&broker, &site, Transport::H2, false)
        .await
        .unwrap();
    assert!(asked.renewed.is_none());
    assert!(asked.expired_secs >= 2, "{asked:?}");
    assert_eq!(asked.window_secs, 60);
    assert_eq!(site.state.credentials().unwrap().chain, first.chain);
    let issued =
        || tether_tests::metric(r#"tether_broker_certificates_issued_total{kind="reattest"}"#);
    let before = issued();
    let renewed = reattest(&broker, &site, Transport::H3, true).await.unwrap();
    assert!(renewed.renewed.is_some());
    assert!(issued() > before);
    let second = site.state.credentials().unwrap();
    assert_ne!(second.chain, first.chain);
    assert_ne!(
        tether_pki::reattest::spki_sha256(&second.chain[0]).unwrap(),
        tether_pki::reattest::spki_sha256(&first.chain[0]).unwrap()
    );

    // Back with the same address.
    let tunnel = tunnel_for(&broker, &site).await;
    assert_eq!(v4(&tunnel), address);
    drop(tunnel);

    // The proof cannot be made with the replaced key: the old certificate
    // was superseded only once, so it still counts as recent; a third
    // generation makes the first unusable.
    let saved = (first.chain.clone(), first.key.clone_key());
    let renewed = reattest(&broker, &site, Transport::H3, true).await.unwrap();
    assert!(renewed.renewed.is_some());
    let third = site.state.credentials().unwrap();
    site.state
        .save(
            saved.1.secret_der(),
            &tether_pki::ca::der_to_pem(&saved.0[0], "CERTIFICATE"),
            &broker.broker().ca.cert_pem(),
            &first.identity,
        )
        .unwrap();
    match reattest(&broker, &site, Transport::H3, false).await {
        Err(ReattestError::Refused { reason, message }) => {
            assert_eq!(reason, "superseded", "{message}");
            assert!(message.contains("replaced since"), "{message}");
        }
        other => panic!("an old key re-attested: {other:?}"),
    }
    drop(third);
}

#[tokio::test]
async fn past_the_window_or_revoked_is_refused_in_plain_words() {
    // The defaults: certificates of a day, a window of 90 days.
    let broker = TestBroker::start("").await;
    let site = TestSite::enroll(&broker, "lab-gone").await;
    const DAY: Duration = Duration::from_secs(86_400);

    // Offline for 97 days past the expiry of a certificate the broker
    // issued.
    reissue(&broker, &site, SystemTime::now() - 98 * DAY, DAY);
    assert_eq!(
        dial_refusal(&broker, &site).await,
        Some(CertRefusal::Expired)
    );
    match reattest(&broker, &site, Transport::H3, true).await {
        Err(ReattestError::Refused { reason, message }) => {
            assert_eq!(reason, "past_window");
            assert!(
                message.starts_with("this site has been offline for at least 97 days"),
                "{message}"
            );
            assert!(
                message.contains("longer than the broker's re-attestation window of 90 days"),
                "{message}"
            );
            assert!(
                message.contains("tether-broker token create --site lab-gone --region local"),
                "{message}"
            );
        }
        other => panic!("re-attested past the window: {other:?}"),
    }
    let report = doctor::run(&broker.client_config(), &site.state).await;
    println!("{}", report.render());
    assert!(report.blocked());
    let verdict = check(&report, "re-attestation");
    assert_eq!(verdict.level, Level::Fail);
    assert!(
        verdict.detail.contains("offline for at least 97 days"),
        "{}",
        verdict.detail
    );
    assert!(
        report.render().contains(
            "verdict: this site cannot connect. re-attestation: this site has been offline"
        ),
        "{}",
        report.render()
    );

    // Within the window it would be renewed; revoked, it is not, and the
    // words say when and what to do.
    reissue(&broker, &site, SystemTime::now() - 4 * DAY, DAY);
    assert!(reattest(&broker, &site, Transport::H3, false).await.is_ok());
    let b = broker.broker().clone();
    tokio::task::spawn_blocking(move || {
        b.revoke_site(&"lab-gone".parse().unwrap(), &"local".parse().unwrap())
    })
    .await
    .unwrap()
    .unwrap();
    let today = tether_pki::reattest::utc_date(SystemTime::now());
    let today = &today[..10];
    for transport in [Transport::H3, Transport::H2] {
        match reattest(&broker, &site, transport, true).await {
            Err(ReattestError::Refused { reason, message }) => {
                assert_eq!(reason, "revoked");
                assert!(
                    message
                        .starts_with(&format!("this site was revoked by the operator on {today}")),
                    "{message}"
                );
                assert!(
                    message.contains("enroll it again with a new code"),
                    "{message}"
                );
            }
            other => panic!("a revoked site re-attested over {transport:?}: {other:?}"),
        }
    }
    let report = doctor::run(&broker.client_config(), &site.state).await;
    println!("{}", report.render());
    let verdict = check(&report, "re-attestation");
    assert_eq!(verdict.level, Level::Fail);
    assert!(
        verdict.detail.contains("revoked by the operator on"),
        "{}",
        verdict.detail
    );
    // Counted by reason (the recorder is shared by the tests of this
    // binary: at least this test's).
    let count = |result: &str| {
        tether_tests::metric(&format!(
            "tether_broker_reattestations_total{{result=\"{result}\"}}"
        ))
    };
    assert!(count("past_window") >= 1.0);
    assert!(count("revoked") >= 3.0);
    // The proof without a CSR above (as doctor sends) is a check.
    assert!(count("checked") >= 1.0);
}

#[tokio::test]
async fn a_proof_from_another_connection_or_key_is_refused() {
    let broker = TestBroker::start("").await;
    let site = TestSite::enroll(&broker, "lab-proof").await;
    let config = broker.client_config();
    let dialer = Dialer::for_reattestation(&config, &site.state, None).unwrap();
    let (first, target) = dialer.connect(&config, &[Transport::H3]).await.unwrap();
    let (second, _) = dialer.connect(&config, &[Transport::H3]).await.unwrap();
    let creds = site.state.credentials().unwrap();
    let (_, csr) = tether_pki::ca::site_key_and_csr("x").unwrap();
    // Signed for the first connection, sent on the second: a replay.
    let message = tether_pki::reattest::transcript(
        &first.exporter().unwrap(),
        &csr,
        &creds.identity.identity,
    );
    let signature = tether_pki::reattest::sign(&creds.key, &message).unwrap();
    let body = serde_json::to_vec(&tether_proto::api::ReattestRequest {
        certificate: tether_pki::ca::der_to_pem(&creds.chain[0], "CERTIFICATE"),
        csr: Some(data_encoding::BASE64.encode(&csr)),
        signature: data_encoding::BASE64.encode(&signature),
    })
    .unwrap();
    let (status, answer) = second
        .request(
            "POST",
            &target.endpoint.to_string(),
            tether_proto::api::REATTEST_PATH,
            &body,
        )
        .await
        .unwrap();
    assert_eq!(status, 401, "{}", String::from_utf8_lossy(&answer));
    let refused: tether_proto::api::ReattestRefused = serde_json::from_slice(&answer).unwrap();
    assert_eq!(refused.reason, "bad_proof");
    // On its own connection the same proof is accepted.
    let (status, answer) = first
        .request(
            "POST",
            &target.endpoint.to_string(),
            tether_proto::api::REATTEST_PATH,
            &body,
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    // With a CSR: a re-attestation, counted as accepted.
    assert!(tether_tests::metric("tether_broker_reattestations_total{result=\"accepted\"}") >= 1.0);
}

#[tokio::test]
async fn a_renewal_on_a_connection_that_outlived_its_certificate_is_refused() {
    const LIFETIME: Duration = Duration::from_secs(3);
    let broker = TestBroker::start_with("", |c| {
        c.site_cert_lifetime = LIFETIME;
        c.reattest_window = Duration::from_secs(60);
    })
    .await;
    let site = TestSite::enroll(&broker, "lab-late").await;
    let config = broker.client_config();
    let dialer = Dialer::for_site(&config, &site.state, None).unwrap();
    // Connections made while the certificate is valid, with no tunnel (a
    // tunnel would be ended by the broker at the certificate's expiry).
    let mut conns = Vec::new();
    for transport in [Transport::H3, Transport::H2] {
        conns.push(dialer.connect(&config, &[transport]).await.unwrap());
    }
    let first = site.state.credentials().unwrap();
    let not_after = tether_pki::token::from_unix_secs(first.identity.not_after);
    let expired = not_after + Duration::from_millis(1500);
    tokio::time::sleep(
        expired
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    )
    .await;

    let refused =
        || tether_tests::metric(r#"tether_broker_renewals_refused_total{reason="expired"}"#);
    let before = refused();
    for ((conn, target), transport) in conns.iter().zip([Transport::H3, Transport::H2]) {
        match tether::enroll::renew(conn, &site.state, target).await {
            Err(tether::enroll::RenewError::CertificateRefused(message)) => {
                assert!(
                    message.starts_with("the certificate on this connection expired"),
                    "{message}"
                );
                assert!(
                    message.contains("renewal needs a currently valid certificate"),
                    "{message}"
                );
                assert!(message.contains("re-attestation"), "{message}");
            }
            other => panic!("renewed over {transport:?} with an expired certificate: {other:?}"),
        }
        assert_eq!(site.state.credentials().unwrap().chain, first.chain);
    }
    assert!(refused() >= before + 2.0);
    for (conn, _) in conns {
        conn.close("done");
    }

    // What the agent does next: re-attestation on a new connection renews
    // it, and the site connects again.
    let renewed = reattest(&broker, &site, Transport::H3, true).await.unwrap();
    assert!(renewed.renewed.is_some());
    assert_ne!(site.state.credentials().unwrap().chain, first.chain);
    assert_eq!(dial_refusal(&broker, &site).await, None);
}

#[tokio::test]
async fn a_revoked_site_or_certificate_cannot_renew_on_a_connection_still_open() {
    let broker = TestBroker::start("").await;
    let revoked = TestSite::enroll(&broker, "lab-revoked").await;
    let replaced = TestSite::enroll(&broker, "lab-replaced").await;
    let config = broker.client_config();
    // Connections made before the revocation, with no tunnel: revocation
    // ends a site's tunnel, and nothing else ends these.
    let mut open = Vec::new();
    for site in [&revoked, &replaced] {
        let dialer = Dialer::for_site(&config, &site.state, None).unwrap();
        for transport in [Transport::H3, Transport::H2] {
            let (conn, target) = dialer.connect(&config, &[transport]).await.unwrap();
            open.push((site, transport, conn, target));
        }
    }
    let refused = |reason: &str| {
        tether_tests::metric(&format!(
            "tether_broker_renewals_refused_total{{reason=\"{reason}\"}}"
        ))
    };
    let before = (refused("revoked"), refused("certificate_revoked"));

    // The operator revokes one site. The other one's certificate is
    // revoked in the store only, as another broker sharing the store
    // writes it (this broker learns of it by a notice, maybe later).
    let b = broker.broker().clone();
    tokio::task::spawn_blocking(move || {
        b.revoke_site(&"lab-revoked".parse().unwrap(), &"local".parse().unwrap())
    })
    .await
    .unwrap()
    .unwrap();
    let creds = replaced.state.credentials().unwrap();
    let serial = tether_pki::tls::peer_identity(&creds.chain, broker.broker().ca.trust_domain())
        .unwrap()
        .serial;
    broker
        .broker()
        .store
        .revoke(&tether_pki::Revoked::Serial(serial))
        .unwrap();

    let today = tether_pki::reattest::utc_date(SystemTime::now());
    let today = &today[..10];
    for (site, transport, conn, target) in &open {
        let first = site.state.credentials().unwrap();
        match tether::enroll::renew(conn, &site.state, target).await {
            Err(tether::enroll::RenewError::CertificateRefused(message)) => {
                if std::ptr::eq(*site, &revoked) {
                    assert!(
                        message.starts_with(&format!(
                            "this site was revoked by the operator on {today}"
                        )),
                        "{message}"
                    );
                    assert!(
                        message.contains("tether-broker token create --site lab-revoked"),
                        "{message}"
                    );
                } else {
                    assert!(
                        message.starts_with("this site's certificate was revoked"),
                        "{message}"
                    );
                }
            }
            other => panic!("renewed a revoked certificate over {transport:?}: {other:?}"),
        }
        assert_eq!(site.state.credentials().unwrap().chain, first.chain);
    }
    assert!(refused("revoked") >= before.0 + 2.0);
    assert!(refused("certificate_revoked") >= before.1 + 2.0);
    for (_, _, conn, _) in open {
        conn.close("done");
    }
}
