//! CA rotation against a real broker on loopback: the trust bundle reaches
//! sites with their certificates, tunnels survive every phase, a site
//! renews into the new CA, a rollback from each phase restores the old
//! state, a site offline through the rotation returns while the old CA is
//! still trusted, the handshake's verdicts at each phase (site
//! certificates of the old and the new CA, expired, revoked; the broker's
//! certificate as a site knowing one CA sees it) agree with `openssl
//! verify`, `/metrics` follows every phase, and a rotation made on one of
//! two brokers sharing a real etcd reaches the other.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../broker/src/store/etcd_server.rs"]
mod etcd_server;

use std::path::Path;
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tether::link::Dialer;
use tether_proto::api::CaStatus;
use tether_proto::tunnel::Transport;
use tether_tests::{TestBroker, TestSite, Tunnel, ping, tunnel_for, v4};

/// One rotation step through the admin API, as `tether-broker ca rotate`
/// does.
async fn admin(broker: &TestBroker, path: &'static str) -> Result<CaStatus, String> {
    let addr = broker.running.as_ref().unwrap().admin_addr;
    let token = broker.broker().admin_token.clone();
    tokio::task::spawn_blocking(move || {
        let client = tether_shell::operator::AdminClient::new(&format!("http://{addr}"), &token);
        if path == "/v1/ca" {
            client.get(path)
        } else {
            client.post(path, &serde_json::json!({}))
        }
        .map_err(|e| e.to_string())
    })
    .await
    .unwrap()
}

async fn rotate(broker: &TestBroker) -> CaStatus {
    admin(broker, "/v1/ca/rotate").await.unwrap()
}

async fn rollback(broker: &TestBroker) -> Result<CaStatus, String> {
    admin(broker, "/v1/ca/rollback").await
}

/// Renews the site's certificate over a connection, as the agent does.
async fn renew(broker: &TestBroker, site: &TestSite) {
    let config = broker.client_config();
    let dialer = Dialer::for_site(&config, &site.state, None).unwrap();
    let (conn, target) = dialer.connect(&config, &[Transport::H3]).await.unwrap();
    tether::enroll::renew(&conn, &site.state, &target)
        .await
        .unwrap();
    conn.close("done");
    conn.drain().await;
}

/// The common name of the CA that signed the site's certificate.
fn issuer_of(site: &TestSite) -> String {
    let c = site.state.credentials().unwrap();
    tether_pki::ca::common_names(&c.chain[0]).unwrap().1
}

/// The names of the CAs of the site's stored trust bundle.
fn bundle_of(site: &TestSite) -> Vec<String> {
    site.state
        .trust_bundle()
        .unwrap()
        .unwrap()
        .iter()
        .map(|c| tether_pki::ca::common_names(c).unwrap().0)
        .collect()
}

fn names(status: &CaStatus) -> Vec<String> {
    status.bundle.iter().map(|c| c.name.clone()).collect()
}

/// A packet from `a` reaches `b` through the broker.
async fn passes(a: &Tunnel, b: &Tunnel, seq: u16) -> bool {
    a.send_packet(&ping(v4(a), v4(b), seq));
    b.recv_packet(Duration::from_secs(5)).await.is_some()
}

/// Sleeps until the Unix second `at` has passed.
async fn sleep_until_unix(at: u64) {
    let at = tether_pki::token::from_unix_secs(at) + Duration::from_millis(200);
    tokio::time::sleep(at.duration_since(SystemTime::now()).unwrap_or_default()).await;
}

/// The wards may reach each other (between sites, everything else is
/// denied).
const WARDS: &str = r#"
[[policy.allow]]
name = "wards"
from = ["site:ward-a", "site:ward-b"]
to = ["site:ward-a", "site:ward-b"]
"#;

#[tokio::test]
async fn a_full_rotation_drops_no_tunnel_and_sites_renew_into_the_new_ca() {
    const LIFETIME: Duration = Duration::from_secs(8);
    let broker = TestBroker::start_with(WARDS, |c| c.site_cert_lifetime = LIFETIME).await;
    let a = TestSite::enroll(&broker, "ward-a").await;
    let b = TestSite::enroll(&broker, "ward-b").await;
    let start = admin(&broker, "/v1/ca").await.unwrap();
    assert_eq!(start.phase, "stable");
    let old = start.bundle[0].name.clone();
    assert_eq!(bundle_of(&a), vec![old.clone()]);
    let (ta, tb) = (tunnel_for(&broker, &a).await, tunnel_for(&broker, &b).await);
    let (addr_a, addr_b) = (v4(&ta), v4(&tb));
    assert!(passes(&ta, &tb, 1).await);

    // Prepared: the new CA is published, the old one still signs.
    let prepared = rotate(&broker).await;
    assert_eq!(prepared.phase, "prepared");
    let new = prepared.bundle[1].name.clone();
    assert_ne!(new, old);
    assert_eq!(names(&prepared), vec![old.clone(), new.clone()]);
    assert!(passes(&ta, &tb, 2).await, "a tunnel dropped at prepare");
    renew(&broker, &a).await;
    assert_eq!(issuer_of(&a), old);
    assert_eq!(bundle_of(&a), vec![old.clone(), new.clone()]);

    // Active: the new CA signs; the tunnels of the old one stay.
    let active = rotate(&broker).await;
    assert_eq!(active.phase, "active");
    assert_eq!(names(&active), vec![new.clone(), old.clone()]);
    assert!(passes(&ta, &tb, 3).await, "a tunnel dropped at activation");
    let retire_after = active.retire_after.unwrap();
    // Too early to retire: site certificates of the old CA are still valid.
    let early = admin(&broker, "/v1/ca/rotate").await.unwrap_err();
    assert!(early.contains("cannot be retired yet"), "{early}");

    // At half their lifetime (as the agent does) both sites renew into the
    // new CA and reconnect with the same addresses; B still knows only the
    // old CA and is served the old CA's broker certificate until then.
    assert_eq!(bundle_of(&b), vec![old.clone()]);
    sleep_until_unix(active.since + LIFETIME.as_secs() / 2).await;
    for site in [&a, &b] {
        renew(&broker, site).await;
        assert_eq!(issuer_of(site), new);
    }
    assert_eq!(bundle_of(&b), vec![new.clone(), old.clone()]);
    drop((ta, tb));
    let (ta, tb) = (tunnel_for(&broker, &a).await, tunnel_for(&broker, &b).await);
    assert_eq!((v4(&ta), v4(&tb)), (addr_a, addr_b));

    // Retired: the old CA leaves the bundle; the renewed tunnels stay.
    sleep_until_unix(retire_after).await;
    let retired = rotate(&broker).await;
    assert_eq!(retired.phase, "stable");
    assert_eq!(names(&retired), vec![new.clone()]);
    assert!(passes(&ta, &tb, 4).await, "a tunnel dropped at retirement");
    renew(&broker, &a).await;
    assert_eq!(bundle_of(&a), vec![new.clone()]);
    let none = rollback(&broker).await.unwrap_err();
    assert!(none.contains("nothing to roll back"), "{none}");
}

#[tokio::test]
async fn a_rollback_from_each_phase_restores_the_old_state() {
    const LIFETIME: Duration = Duration::from_secs(3);
    let broker = TestBroker::start_with("", |c| c.site_cert_lifetime = LIFETIME).await;
    let site = TestSite::enroll(&broker, "ward-r").await;
    let start = admin(&broker, "/v1/ca").await.unwrap();
    let old = start.bundle[0].name.clone();

    // From prepared: straight back to the old CA alone.
    rotate(&broker).await;
    let back = rollback(&broker).await.unwrap();
    assert_eq!(back.phase, "stable");
    assert_eq!(names(&back), vec![old.clone()]);
    renew(&broker, &site).await;
    assert_eq!(bundle_of(&site), vec![old.clone()]);
    assert_eq!(issuer_of(&site), old);

    // From active: the old CA signs again at once, the new one stays
    // trusted until the certificates it signed have expired.
    rotate(&broker).await;
    let active = rotate(&broker).await;
    let new = active.bundle[0].name.clone();
    renew(&broker, &site).await;
    assert_eq!(issuer_of(&site), new);
    let renewed_tunnel = tunnel_for(&broker, &site).await;
    let address = v4(&renewed_tunnel);
    let prepared = rollback(&broker).await.unwrap();
    assert_eq!(prepared.phase, "prepared");
    assert_eq!(names(&prepared), vec![old.clone(), new.clone()]);
    // The site's tunnel with its certificate of the new CA is still
    // accepted on a new connection.
    drop(renewed_tunnel);
    let again = tunnel_for(&broker, &site).await;
    assert_eq!(v4(&again), address);
    drop(again);
    let early = rollback(&broker).await.unwrap_err();
    assert!(early.contains("cannot be dropped yet"), "{early}");
    renew(&broker, &site).await;
    assert_eq!(issuer_of(&site), old);
    // Renewed again at half its lifetime, as the agent does, so that it is
    // valid when the new CA is dropped.
    let drop_next_after = prepared.drop_next_after.unwrap();
    sleep_until_unix(drop_next_after - LIFETIME.as_secs() / 2).await;
    renew(&broker, &site).await;
    sleep_until_unix(drop_next_after).await;
    let stable = rollback(&broker).await.unwrap();
    assert_eq!(stable.phase, "stable");
    assert_eq!(names(&stable), vec![old.clone()]);
    let t = tunnel_for(&broker, &site).await;
    assert_eq!(v4(&t), address);
}

#[tokio::test]
async fn a_site_offline_through_the_rotation_returns_while_the_old_ca_is_trusted() {
    const LIFETIME: Duration = Duration::from_secs(2);
    let broker = TestBroker::start_with("", |c| {
        c.site_cert_lifetime = LIFETIME;
        c.reattest_window = Duration::from_secs(600);
    })
    .await;
    let away = TestSite::enroll(&broker, "lab-away").await;
    let gone = TestSite::enroll(&broker, "lab-gone").await;
    let address = v4(&tunnel_for(&broker, &away).await);
    let old = admin(&broker, "/v1/ca").await.unwrap().bundle[0]
        .name
        .clone();
    rotate(&broker).await;
    let active = rotate(&broker).await;
    let new = active.bundle[0].name.clone();

    // Back after its certificate expired, knowing only the old CA: the
    // broker shows it the old CA's certificate and re-attests it into the
    // new CA.
    let expired =
        tether_pki::token::from_unix_secs(away.state.credentials().unwrap().identity.not_after)
            + Duration::from_millis(500);
    tokio::time::sleep(
        expired
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    )
    .await;
    assert_eq!(bundle_of(&away), vec![old.clone()]);
    let config = broker.client_config();
    let dialer = Dialer::for_reattestation(&config, &away.state, None).unwrap();
    let (conn, target) = dialer.connect(&config, &[Transport::H3]).await.unwrap();
    let answer = tether::enroll::reattest(&conn, &away.state, &target, true)
        .await
        .unwrap();
    assert!(answer.renewed.is_some());
    conn.close("done");
    conn.drain().await;
    assert_eq!(issuer_of(&away), new);
    assert_eq!(bundle_of(&away), vec![new.clone(), old.clone()]);
    assert_eq!(v4(&tunnel_for(&broker, &away).await), address);

    // After retirement a site that knows only the old CA no longer
    // recognises the broker: it must enroll again.
    sleep_until_unix(active.retire_after.unwrap()).await;
    rotate(&broker).await;
    let dialer = Dialer::for_reattestation(&config, &gone.state, None).unwrap();
    let failure = dialer
        .connect(&config, &[Transport::H3])
        .await
        .err()
        .expect("a site that knows only the retired CA must not trust the broker");
    println!("{failure}");
}

/// `openssl verify` of `leaf` against `bundle`, for a TLS client.
fn openssl_accepts(dir: &Path, bundle: &str, leaf: &str) -> bool {
    let (b, l) = (dir.join("bundle.pem"), dir.join("leaf.pem"));
    std::fs::write(&b, bundle).unwrap();
    std::fs::write(&l, leaf).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(&b)
        .arg(&l)
        .output()
        .expect("openssl is installed");
    out.status.success()
}

/// A site certificate for `site` from the CA signing now, with its key.
fn issue(
    broker: &TestBroker,
    site: &str,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>, String) {
    issue_at(broker, site, SystemTime::now())
}

/// As [`issue`], valid for ten minutes from `from` (in the past for an
/// expired certificate).
fn issue_at(
    broker: &TestBroker,
    site: &str,
    from: SystemTime,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>, String) {
    let b = broker.broker();
    let identity = b.identity(&site.parse().unwrap(), &"local".parse().unwrap());
    let (key, csr) = tether_pki::ca::site_key_and_csr(site).unwrap();
    let cert =
        b.ca.issue_site(&csr, &identity, from, Duration::from_secs(600))
            .unwrap();
    b.record_issued(&identity, &cert).unwrap();
    (
        cert.der,
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        cert.pem,
    )
}

/// How a real QUIC handshake of a site with the broker ended: `accept`
/// (the broker opened its HTTP/3 control stream), or which side refused
/// and the TLS alert it sent, e.g. `broker: CertificateExpired` (the
/// broker refused the site's certificate) or `site: UnknownCA` (the site
/// did not recognise the broker's certificate).
async fn handshake(
    broker: &TestBroker,
    trusts: &[CertificateDer<'static>],
    leaf: &(CertificateDer<'static>, PrivateKeyDer<'static>, String),
) -> String {
    let addr = broker.addr();
    let tls = tether_pki::tls::client_config_trusting(
        trusts,
        Some((vec![leaf.0.clone()], leaf.1.clone_key())),
        0,
    )
    .unwrap();
    let config = tether::h3client::quic_config(
        tls,
        tether_shell::quic::transport_config(Duration::from_secs(2), Duration::from_secs(10)),
    )
    .unwrap();
    let endpoint = tether::dial::client_endpoint(&addr).unwrap();
    let connecting = endpoint
        .connect_with(config, addr, &addr.ip().to_string())
        .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        let conn = connecting.await?;
        conn.accept_uni().await.map(|_| conn)
    })
    .await
    .expect("the handshake ended within 10 s");
    let verdict = match outcome {
        Ok(conn) => {
            conn.close(0u32.into(), b"done");
            "accept".to_string()
        }
        Err(e) => {
            let (who, code) = match &e {
                quinn::ConnectionError::ConnectionClosed(c) => ("broker", c.error_code),
                quinn::ConnectionError::TransportError(t) => ("site", t.code),
                other => panic!("the handshake ended without a TLS refusal: {other}"),
            };
            // QUIC carries a TLS alert as the transport error 0x100 + alert.
            let alert = u64::from(code)
                .checked_sub(0x100)
                .and_then(|a| u8::try_from(a).ok())
                .unwrap_or_else(|| panic!("not a TLS alert: {e}"));
            format!("{who}: {:?}", rustls::AlertDescription::from(alert))
        }
    };
    endpoint.wait_idle().await;
    verdict
}

/// The cases of the matrix, its columns.
const CASES: [&str; 6] = [
    "old CA leaf",
    "new CA leaf",
    "expired leaf",
    "revoked site",
    "site knows old CA",
    "site knows new CA",
];

const EXPIRED: &str = "broker: CertificateExpired";
const REVOKED: &str = "broker: CertificateRevoked";
/// A case that does not exist yet (no new CA, or it has not signed).
const NONE: &str = "-";

/// What the handshake must give, per phase and case.
const EXPECTED: [(&str, [&str; 6]); 6] = [
    ("stable", ["accept", NONE, EXPIRED, REVOKED, "accept", NONE]),
    (
        "prepared",
        ["accept", NONE, EXPIRED, REVOKED, "accept", "accept"],
    ),
    (
        "active",
        ["accept", "accept", EXPIRED, REVOKED, "accept", "accept"],
    ),
    (
        "prepared (rollback)",
        ["accept", "accept", EXPIRED, REVOKED, "accept", "accept"],
    ),
    (
        "active (again)",
        ["accept", "accept", EXPIRED, REVOKED, "accept", "accept"],
    ),
    (
        "retired",
        [
            "broker: UnknownCA",
            "accept",
            EXPIRED,
            REVOKED,
            "site: UnknownCA",
            "accept",
        ],
    ),
];

/// The certificates the matrix uses.
struct Leaves {
    /// From the old CA, valid.
    old: (CertificateDer<'static>, PrivateKeyDer<'static>, String),
    /// From the new CA once it signed.
    new: Option<(CertificateDer<'static>, PrivateKeyDer<'static>, String)>,
    old_ca: CertificateDer<'static>,
    new_ca: Option<CertificateDer<'static>>,
}

/// One row of the matrix: each case's handshake at the broker's current
/// phase, the leaf cases checked against `openssl verify` too (which knows
/// nothing of revocations, so not the revoked one).
async fn matrix_row(broker: &TestBroker, dir: &Path, leaves: &Leaves) -> [String; 6] {
    let bundle = broker.broker().ca.bundle_der();
    let bundle_pem = broker.broker().ca.bundle_pem();
    // Made now by the CA that signs now: an hour old, expired for 50 min.
    let expired = issue_at(
        broker,
        "m-expired",
        SystemTime::now() - Duration::from_secs(3600),
    );
    let revoked = issue(broker, "m-revoked");
    let fresh = issue(broker, "m-fresh");
    let mut row: [String; 6] = Default::default();
    row[0] = handshake(broker, &bundle, &leaves.old).await;
    if let Some(new) = &leaves.new {
        row[1] = handshake(broker, &bundle, new).await;
    }
    row[2] = handshake(broker, &bundle, &expired).await;
    row[3] = handshake(broker, &bundle, &revoked).await;
    row[4] = handshake(broker, std::slice::from_ref(&leaves.old_ca), &fresh).await;
    if let Some(new_ca) = &leaves.new_ca {
        row[5] = handshake(broker, std::slice::from_ref(new_ca), &fresh).await;
    }
    for (i, leaf) in [
        (0, Some(&leaves.old)),
        (1, leaves.new.as_ref()),
        (2, Some(&expired)),
    ] {
        if let Some(leaf) = leaf {
            let openssl = openssl_accepts(dir, &bundle_pem, &leaf.2);
            assert_eq!(
                openssl,
                row[i] == "accept",
                "{}: openssl says {openssl}, the broker's handshake {}",
                CASES[i],
                row[i]
            );
        }
    }
    row.map(|v| if v.is_empty() { NONE.to_string() } else { v })
}

#[tokio::test]
async fn the_handshake_matrix_under_two_cas_at_each_phase() {
    const LIFETIME: Duration = Duration::from_secs(2);
    let broker = TestBroker::start_with("", |c| c.site_cert_lifetime = LIFETIME).await;
    let dir = tempfile::tempdir().unwrap();
    // The revoked site was enrolled, then revoked by the operator.
    TestSite::enroll(&broker, "m-revoked").await;
    let b = broker.broker().clone();
    tokio::task::spawn_blocking(move || {
        b.revoke_site(&"m-revoked".parse().unwrap(), &"local".parse().unwrap())
    })
    .await
    .unwrap()
    .unwrap();
    let mut leaves = Leaves {
        old: issue(&broker, "m-old"),
        new: None,
        old_ca: broker.broker().ca.cert_der(),
        new_ca: None,
    };
    let mut matrix = Vec::new();
    matrix.push(matrix_row(&broker, dir.path(), &leaves).await);
    let prepared = rotate(&broker).await;
    assert_eq!(prepared.phase, "prepared");
    leaves.new_ca = Some(broker.broker().ca.bundle_der()[1].clone());
    matrix.push(matrix_row(&broker, dir.path(), &leaves).await);
    assert_eq!(rotate(&broker).await.phase, "active");
    leaves.new = Some(issue(&broker, "m-new"));
    matrix.push(matrix_row(&broker, dir.path(), &leaves).await);
    assert_eq!(rollback(&broker).await.unwrap().phase, "prepared");
    matrix.push(matrix_row(&broker, dir.path(), &leaves).await);
    let active = rotate(&broker).await;
    assert_eq!(active.phase, "active");
    matrix.push(matrix_row(&broker, dir.path(), &leaves).await);
    sleep_until_unix(active.retire_after.unwrap()).await;
    assert_eq!(rotate(&broker).await.phase, "stable");
    matrix.push(matrix_row(&broker, dir.path(), &leaves).await);

    let mut table = format!("{:<20}", "phase");
    for case in CASES {
        table.push_str(&format!(" | {case:<26}"));
    }
    for ((phase, _), row) in EXPECTED.iter().zip(&matrix) {
        table.push_str(&format!("\n{phase:<20}"));
        for v in row {
            table.push_str(&format!(" | {v:<26}"));
        }
    }
    println!("{table}");
    for ((phase, expected), row) in EXPECTED.iter().zip(&matrix) {
        for ((case, want), got) in CASES.iter().zip(expected).zip(row) {
            assert_eq!(got, want, "{phase}, {case}:\n{table}");
        }
    }
}

/// The CA series of a `/metrics` text: each CA's expiry series (labels
/// and value), the phase that is 1, and the bundle size.
fn ca_metrics(text: &str) -> (Vec<(String, i64)>, Vec<String>, String) {
    let mut expiry = Vec::new();
    let mut phases = Vec::new();
    let mut bundle = String::new();
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if let Some(labels) = series.strip_prefix("tether_broker_ca_expiry_seconds") {
            expiry.push((labels.to_string(), value.parse().unwrap()));
        } else if let Some(labels) = series.strip_prefix("tether_broker_ca_rotation_phase") {
            if value == "1" {
                phases.push(labels.to_string());
            }
        } else if series == "tether_broker_ca_bundle_certificates" {
            bundle = value.to_string();
        }
    }
    (expiry, phases, bundle)
}

/// Scrapes the broker's `/metrics` and checks its CA series against the
/// CA state of the admin API: the phase, and one expiry series per CA of
/// the bundle (the signing one marked), counting down to its `not_after`.
async fn metrics_match(broker: &TestBroker, phase: &str) {
    let status = admin(broker, "/v1/ca").await.unwrap();
    assert_eq!(status.phase, phase);
    let text = broker.scrape().await;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (expiry, phases, bundle) = ca_metrics(&text);
    assert_eq!(phases, vec![format!(r#"{{phase="{phase}"}}"#)], "{text}");
    assert_eq!(bundle, status.bundle.len().to_string(), "{text}");
    let expected: Vec<String> = status
        .bundle
        .iter()
        .map(|ca| format!(r#"{{ca="{}",signing="{}"}}"#, ca.name, ca.signing))
        .collect();
    let labels: Vec<String> = expiry.iter().map(|(l, _)| l.clone()).collect();
    assert_eq!(labels, expected, "{phase}: one series per CA of the bundle");
    for ((_, seconds), ca) in expiry.iter().zip(&status.bundle) {
        let left = ca.not_after as i64 - now;
        assert!(
            (seconds - left).abs() <= 2,
            "{}: {seconds} s left by /metrics, {left} s by the admin API",
            ca.name
        );
    }
    let server = text
        .lines()
        .find_map(|l| l.strip_prefix("tether_broker_server_cert_expiry_seconds "))
        .expect("the server certificate's expiry");
    let server: i64 = server.parse().unwrap();
    assert!(
        (29 * 86_400..=30 * 86_400).contains(&server),
        "the broker's certificates live 30 days: {server}"
    );
    println!("{phase}: {expiry:?}");
}

#[tokio::test]
async fn the_metrics_follow_each_phase_and_each_ca_of_the_bundle() {
    const LIFETIME: Duration = Duration::from_secs(2);
    let broker = TestBroker::start_with("", |c| c.site_cert_lifetime = LIFETIME).await;
    metrics_match(&broker, "stable").await;
    // Prepare, and roll back: the new CA's series goes with it.
    rotate(&broker).await;
    metrics_match(&broker, "prepared").await;
    rollback(&broker).await.unwrap();
    metrics_match(&broker, "stable").await;
    // Prepare, issue from the new CA, roll back to prepared, forward again,
    // retire: the old CA's series goes.
    rotate(&broker).await;
    metrics_match(&broker, "prepared").await;
    rotate(&broker).await;
    metrics_match(&broker, "active").await;
    rollback(&broker).await.unwrap();
    metrics_match(&broker, "prepared").await;
    let active = rotate(&broker).await;
    metrics_match(&broker, "active").await;
    sleep_until_unix(active.retire_after.unwrap()).await;
    let retired = rotate(&broker).await;
    assert_eq!(retired.bundle.len(), 1);
    metrics_match(&broker, "stable").await;
}

/// Waits (bounded, polling the admin API) until `broker` is in `phase`
/// with the trust bundle `bundle`: a step made at another broker reaches it
/// through the store's watch.
async fn follows(broker: &TestBroker, phase: &str, bundle: &[String]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = admin(broker, "/v1/ca").await.unwrap();
        if status.phase == phase && names(&status) == bundle {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the other broker is still {} with {:?}, not {phase} with {bundle:?}",
            status.phase,
            names(&status)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Packets pass both ways between two tunnels held by different brokers.
async fn across(ta: &Tunnel, tb: &Tunnel, seq: u16) {
    let (a, b) = (v4(ta), v4(tb));
    tether_tests::deliver(ta, tb, &ping(a, b, seq), |p| {
        p.src == std::net::IpAddr::V4(a)
    })
    .await;
    tether_tests::deliver(tb, ta, &ping(b, a, seq), |p| {
        p.src == std::net::IpAddr::V4(b)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_on_one_broker_reaches_the_other_broker_sharing_etcd() {
    let Some(server) = tokio::task::spawn_blocking(|| etcd_server::EtcdServer::start(false))
        .await
        .unwrap()
    else {
        return;
    };
    let extra = format!(
        "{}[peering]\nlisten = \"127.0.0.1:0\"\n{WARDS}",
        server.broker_toml("/tether/rotation/")
    );
    tokio::time::timeout(Duration::from_secs(120), async {
        // Both brokers use the CA in etcd (A put it there) and the same
        // key-encryption key.
        let a = TestBroker::start(&extra).await;
        let b = TestBroker::start(&extra).await;
        let site_a = TestSite::enroll(&a, "ward-a").await;
        let site_b = TestSite::enroll(&b, "ward-b").await;
        let (ta, tb) = (tunnel_for(&a, &site_a).await, tunnel_for(&b, &site_b).await);
        tether_tests::wait_for_remote_route(&a, v4(&tb)).await;
        tether_tests::wait_for_remote_route(&b, v4(&ta)).await;
        across(&ta, &tb, 1).await;
        let old = admin(&a, "/v1/ca").await.unwrap().bundle[0].name.clone();

        // Prepared at A: B publishes the same bundle.
        let prepared = rotate(&a).await;
        let new = prepared.bundle[1].name.clone();
        follows(&b, "prepared", &[old.clone(), new.clone()]).await;
        across(&ta, &tb, 2).await;

        // Active at A: B signs with the new CA, for a site enrolling there
        // and for one renewing there; the tunnels of both brokers stay.
        rotate(&a).await;
        follows(&b, "active", &[new.clone(), old.clone()]).await;
        let (_, phases, _) = ca_metrics(&b.scrape().await);
        assert_eq!(phases, vec![r#"{phase="active"}"#.to_string()]);
        let site_c = TestSite::enroll(&b, "ward-c").await;
        assert_eq!(issuer_of(&site_c), new, "B enrolls from the new CA");
        renew(&b, &site_b).await;
        assert_eq!(issuer_of(&site_b), new, "B renews from the new CA");
        assert_eq!(bundle_of(&site_b), vec![new.clone(), old.clone()]);
        across(&ta, &tb, 3).await;

        // Rolled back at A: B signs with the old CA again and still
        // accepts the new CA's certificates.
        rollback(&a).await.unwrap();
        follows(&b, "prepared", &[old.clone(), new.clone()]).await;
        renew(&b, &site_b).await;
        assert_eq!(issuer_of(&site_b), old, "B renews from the old CA again");
        let tc = tunnel_for(&b, &site_c).await;
        drop(tc);
        across(&ta, &tb, 4).await;
        assert!(ta.client.conn.close_reason().is_none());
        assert!(tb.client.conn.close_reason().is_none());
        for (broker, site) in [(&a, "ward-a"), (&b, "ward-b")] {
            assert!(broker.broker().session(&site.parse().unwrap()).is_some());
        }
    })
    .await
    .expect("test finished in time");
    drop(server);
}
