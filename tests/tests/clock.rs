//! A site whose clock is wrong (a hospital host without NTP), 2 hours and
//! 2 days either way, against a real broker on loopback: `tether doctor`
//! names the clock, not the certificate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tether::doctor::{self, Level};
use tether_config::client::ClientFile;
use tether_tests::{TestBroker, TestSite};

const HOUR: i64 = 3600;
const DAY: i64 = 86_400;

fn check<'a>(report: &'a doctor::Report, name: &str) -> &'a doctor::Check {
    report
        .check(name)
        .unwrap_or_else(|| panic!("no {name} check:\n{}", report.render()))
}

#[tokio::test]
async fn doctor_names_a_wrong_clock_two_hours_and_two_days_either_way() {
    let broker = TestBroker::start("").await;
    let site = TestSite::enroll(&broker, "lab-clock").await;
    let config = ClientFile {
        published_cidr: "127.0.0.0/8".into(),
        brokers: vec![broker.addr().to_string()],
        ..ClientFile::default()
    }
    .validate("test")
    .unwrap();

    // Ahead: the broker's certificate is still valid here, so the site
    // connects; the clock is a warning with the measured skew, and a
    // certificate that looks expired here is the clock's doing.
    for (offset, off) in [(2 * HOUR, "2 h ahead of"), (2 * DAY, "2 days ahead of")] {
        let report = doctor::run_with_clock(&config, &site.state, offset).await;
        println!("{}", report.render());
        assert!(!report.blocked(), "{}", report.render());
        let clock = check(&report, "clock");
        assert_eq!(clock.level, Level::Warn);
        assert!(clock.detail.contains(off), "{}", clock.detail);
        assert!(
            clock.detail.contains("fix the clock (NTP)"),
            "{}",
            clock.detail
        );
        let certificate = check(&report, "certificate");
        if offset == 2 * DAY {
            assert_eq!(certificate.level, Level::Warn);
            assert!(
                certificate.detail.contains("no new enrollment is needed"),
                "{}",
                certificate.detail
            );
        } else {
            assert_eq!(certificate.level, Level::Ok);
        }
    }

    // Behind: the broker's fresh certificate is not valid yet by this
    // clock, so TLS fails here; doctor says the clock is behind, not that
    // a certificate is invalid.
    for (offset, off) in [(-2 * HOUR, "minutes behind"), (-2 * DAY, "hours behind")] {
        let report = doctor::run_with_clock(&config, &site.state, offset).await;
        println!("{}", report.render());
        assert!(report.blocked());
        let tls = check(&report, "tls");
        assert_eq!(tls.level, Level::Fail);
        assert!(
            tls.detail.starts_with("this host's clock is at least"),
            "{}",
            tls.detail
        );
        assert!(tls.detail.contains(off), "{}", tls.detail);
        assert!(tls.detail.contains("fix the clock (NTP)"), "{}", tls.detail);
        assert!(!tls.detail.contains("enroll"), "{}", tls.detail);
    }
}
