//! `tether doctor` against a real broker on loopback: a healthy site, an
//! expired certificate, a certificate from the future (clock behind), a
//! broker address outside the published CIDR, and the checks of a site
//! exposing a LAN.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use tether::doctor::{self, Level};
use tether::state_dir::Identity;
use tether_config::client::{ClientConfig, ClientFile};
use tether_tests::{TestBroker, TestSite};

fn config(broker: &TestBroker, cidr: &str) -> ClientConfig {
    config_for(broker.addr().to_string(), cidr)
}

fn config_for(endpoint: String, cidr: &str) -> ClientConfig {
    ClientFile {
        published_cidr: cidr.into(),
        brokers: vec![endpoint],
        ..ClientFile::default()
    }
    .validate("test")
    .unwrap()
}

fn level_of(report: &doctor::Report, name: &str) -> Level {
    report
        .check(name)
        .unwrap_or_else(|| panic!("no {name} check:\n{}", report.render()))
        .level
}

/// Replaces the site's certificate with one issued at `issued`.
fn reissue(broker: &TestBroker, site: &TestSite, issued: SystemTime) {
    let creds = site.state.credentials().unwrap();
    let identity = broker
        .broker()
        .identity(&creds.identity.site, &creds.identity.region);
    let (key, csr) = tether_pki::ca::site_key_and_csr("site").unwrap();
    let cert = broker
        .broker()
        .ca
        .issue_site(&csr, &identity, issued, Duration::from_secs(3600))
        .unwrap();
    site.state
        .save(
            &key.serialize_der(),
            &cert.pem,
            &broker.broker().ca.cert_pem(),
            &Identity {
                not_after: tether_pki::token::unix_secs(cert.not_after),
                issued_at: tether_pki::token::unix_secs(issued),
                ..creds.identity
            },
        )
        .unwrap();
}

#[tokio::test]
async fn doctor_explains_what_blocks_a_site() {
    let broker = TestBroker::start("").await;
    let site = TestSite::enroll(&broker, "site-doc").await;

    // Healthy: every check passes, over HTTP/3, and nothing blocks.
    let report = doctor::run(&config(&broker, "127.0.0.0/8"), &site.state).await;
    println!("{}", report.render());
    assert!(!report.blocked(), "{}", report.render());
    assert_eq!(level_of(&report, "tls"), Level::Ok);
    assert_eq!(level_of(&report, "clock"), Level::Ok);
    assert_eq!(level_of(&report, "path mtu"), Level::Ok);
    assert!(report.render().contains("can connect, over HTTP/3"));
    // It opened no tunnel.
    assert!(broker.broker().sessions().is_empty());

    // With a LAN to expose: forwarding and the source rewrite's nft are
    // reported (their levels follow this machine), and neither blocks.
    let with_lan = ClientFile {
        published_cidr: "127.0.0.0/8".into(),
        brokers: vec![broker.addr().to_string()],
        lans: vec!["192.168.1.0/24".into()],
        ..ClientFile::default()
    };
    let report = doctor::run(&with_lan.validate("test").unwrap(), &site.state).await;
    let forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    assert_eq!(
        level_of(&report, "lan 192.168.1.0/24"),
        if forwarding.trim() == "1" {
            Level::Ok
        } else {
            Level::Warn
        },
        "{}",
        report.render()
    );
    let nft = std::process::Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert_eq!(
        level_of(&report, "lan source"),
        if nft { Level::Ok } else { Level::Fail }
    );
    // Keeping the original source needs no nft.
    let original = ClientFile {
        lan_source: "original".into(),
        ..with_lan
    };
    let report = doctor::run(&original.validate("test").unwrap(), &site.state).await;
    assert!(
        !report.render().contains("lan source"),
        "{}",
        report.render()
    );
    assert!(!report.blocked(), "{}", report.render());

    // A broker name that resolves outside the published CIDR is refused,
    // and doctor says so.
    let by_name = config_for(
        format!("localhost:{}", broker.addr().port()),
        "203.0.113.0/24",
    );
    let report = doctor::run(&by_name, &site.state).await;
    assert!(report.blocked());
    assert!(
        report.render().contains("outside the published CIDR"),
        "{}",
        report.render()
    );

    // An expired certificate.
    reissue(
        &broker,
        &site,
        SystemTime::now() - Duration::from_secs(3 * 3600),
    );
    let report = doctor::run(&config(&broker, "127.0.0.0/8"), &site.state).await;
    println!("{}", report.render());
    assert!(report.blocked());
    assert_eq!(level_of(&report, "certificate"), Level::Fail);
    assert!(report.render().contains("expired"), "{}", report.render());

    // A certificate that is not valid yet: this machine's clock is behind.
    // (Issued 10 minutes past the CA's backdating allowance.)
    reissue(
        &broker,
        &site,
        SystemTime::now() + tether_pki::ca::CLOCK_SKEW_ALLOWANCE + Duration::from_secs(600),
    );
    let report = doctor::run(&config(&broker, "127.0.0.0/8"), &site.state).await;
    assert!(report.blocked());
    assert!(
        report.render().contains("clock is behind"),
        "{}",
        report.render()
    );
}

#[tokio::test]
async fn an_unresolvable_endpoint_beside_a_working_one_does_not_block() {
    let broker = TestBroker::start("").await;
    let site = TestSite::enroll(&broker, "site-doc2").await;
    let port = broker.addr().port();
    let config = ClientFile {
        published_cidr: "127.0.0.0/8".into(),
        brokers: vec![
            format!("broker.invalid:{port}"),
            broker.addr().to_string(),
            // The same address again: checked once.
            broker.addr().to_string(),
        ],
        ..ClientFile::default()
    }
    .validate("test")
    .unwrap();
    let report = doctor::run(&config, &site.state).await;
    println!("{}", report.render());
    assert!(!report.blocked(), "{}", report.render());
    assert_eq!(
        level_of(&report, &format!("dns broker.invalid:{port}")),
        Level::Warn
    );
    let udp = format!("udp {}", broker.addr());
    assert_eq!(
        report.checks.iter().filter(|c| c.name == udp).count(),
        1,
        "{}",
        report.render()
    );
    assert!(report.render().contains("can connect"));
}
