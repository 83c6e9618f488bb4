//! CA rotation against a real broker on loopback: the trust bundle reaches
//! sites with their certificates, tunnels survive every phase, a site
//! renews into the new CA, a rollback from each phase restores the old
//! state, a site offline through the rotation returns while the old CA is
//! still trusted, and the handshake's verdicts agree with `openssl verify`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tether::link::Dialer;
use tether_proto::api::CaStatus;
use tether_proto::tunnel::Transport;
use tether_tests::{TestBroker, TestSite, Tunnel, connect_trusting, ping, tunnel_for, v4};

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

/// Whether the broker accepts `leaf` in a handshake (and opens a tunnel).
async fn broker_accepts(broker: &TestBroker, leaf: &Leaf) -> bool {
    let bundle = broker.broker().ca.bundle_der();
    match connect_trusting(
        broker.addr(),
        &bundle,
        Some((vec![leaf.0.clone()], leaf.1.clone_key())),
    )
    .await
    {
        Ok(client) => Tunnel::open(client).await.is_ok(),
        Err(_) => false,
    }
}

/// A site certificate for `site` from the CA signing now, with its key.
fn issue(
    broker: &TestBroker,
    site: &str,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>, String) {
    let b = broker.broker();
    let identity = b.identity(&site.parse().unwrap(), &"local".parse().unwrap());
    let (key, csr) = tether_pki::ca::site_key_and_csr(site).unwrap();
    let cert =
        b.ca.issue_site(&csr, &identity, SystemTime::now(), Duration::from_secs(600))
            .unwrap();
    b.record_issued(&identity, &cert).unwrap();
    (
        cert.der,
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        cert.pem,
    )
}

type Leaf = (CertificateDer<'static>, PrivateKeyDer<'static>);

/// The verdicts of `openssl verify` and of the broker's handshake on each
/// leaf, against the broker's current bundle; they must agree.
async fn row(
    phase: &str,
    broker: &TestBroker,
    dir: &Path,
    leaves: &[(&str, &String, &Leaf)],
) -> Vec<String> {
    let bundle = broker.broker().ca.bundle_pem();
    let mut out = Vec::new();
    for (which, pem, leaf) in leaves {
        let openssl = openssl_accepts(dir, &bundle, pem);
        let tether = broker_accepts(broker, leaf).await;
        assert_eq!(
            openssl, tether,
            "{phase}, {which} CA leaf: openssl and the broker disagree"
        );
        out.push(format!(
            "{phase:<8} {which} CA leaf: openssl {openssl}, broker {tether}"
        ));
    }
    out
}

#[tokio::test]
async fn handshakes_with_old_and_new_ca_certificates_agree_with_openssl() {
    const LIFETIME: Duration = Duration::from_secs(2);
    let broker = TestBroker::start_with("", |c| c.site_cert_lifetime = LIFETIME).await;
    let dir = tempfile::tempdir().unwrap();
    TestSite::enroll(&broker, "m-old").await;
    TestSite::enroll(&broker, "m-new").await;
    let (old_der, old_key, old_pem) = issue(&broker, "m-old");
    let old_leaf = (old_der, old_key);
    rotate(&broker).await;
    rotate(&broker).await;
    let (new_der, new_key, new_pem) = issue(&broker, "m-new");
    let new_leaf = (new_der, new_key);

    let leaves = [("old", &old_pem, &old_leaf), ("new", &new_pem, &new_leaf)];
    let mut matrix = row("active", &broker, dir.path(), &leaves).await;
    rollback(&broker).await.unwrap();
    matrix.extend(row("prepared", &broker, dir.path(), &leaves).await);
    // Forward again, and retire.
    let active = rotate(&broker).await;
    sleep_until_unix(active.retire_after.unwrap()).await;
    assert_eq!(rotate(&broker).await.phase, "stable");
    matrix.extend(row("retired", &broker, dir.path(), &leaves).await);
    println!("{}", matrix.join("\n"));
    let expect = [
        "active   old CA leaf: openssl true, broker true",
        "active   new CA leaf: openssl true, broker true",
        "prepared old CA leaf: openssl true, broker true",
        "prepared new CA leaf: openssl true, broker true",
        "retired  old CA leaf: openssl false, broker false",
        "retired  new CA leaf: openssl true, broker true",
    ];
    assert_eq!(matrix, expect);
}
