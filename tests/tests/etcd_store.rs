//! A real broker on loopback keeping its state in a real etcd (started per
//! test, see `broker/src/store/etcd_server.rs`), with sites enrolled and
//! connected through the client library. `#[tokio::test]` runs the broker
//! on a current-thread runtime: the etcd store must not nest runtimes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;
use std::time::{Duration, Instant};

use tether_broker::store::{EtcdStore, Store, StoreEvent};
use tether_pki::Revoked;
use tether_proto::ip::Packet;
use tether_tests::etcd::EtcdServer;
use tether_tests::{TestBroker, TestSite, Tunnel, connect, ping, tunnel_for, v4};

/// Deadline of the test body.
const TEST_DEADLINE: Duration = Duration::from_secs(120);

#[tokio::test]
async fn a_broker_on_etcd_enrolls_routes_and_keeps_addresses_across_restarts() {
    let Some(server) = tokio::task::spawn_blocking(|| EtcdServer::start(false))
        .await
        .unwrap()
    else {
        return;
    };
    let config = server.config("/tether/it/");
    let extra = format!(
        "{}[[policy.allow]]\nname = \"a-and-b\"\nfrom = [\"site:site-a\", \"site:site-b\"]\nto = [\"site:site-a\", \"site:site-b\"]\n",
        server.broker_toml(&config.prefix),
    );
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut broker = TestBroker::start(&extra).await;
        let a = TestSite::enroll(&broker, "site-a").await;
        let b = TestSite::enroll(&broker, "site-b").await;
        let ta = tunnel_for(&broker, &a).await;
        let tb = tunnel_for(&broker, &b).await;
        let (addr_a, addr_b) = (v4(&ta), v4(&tb));
        assert_ne!(addr_a, addr_b);
        ta.send_packet(&ping(addr_a, addr_b, 1));
        let got = tb
            .recv_packet(Duration::from_secs(5))
            .await
            .expect("packet forwarded to B");
        let p = Packet::parse(&got).unwrap();
        assert_eq!((p.src, p.dst), (IpAddr::V4(addr_a), IpAddr::V4(addr_b)));

        // What the broker wrote is in etcd, where another broker reads it.
        let other = EtcdStore::open(&config).unwrap();
        let local = "local".parse().unwrap();
        let leased: Vec<_> = other
            .region_leases(&local)
            .unwrap()
            .leases()
            .map(|l| (l.site.to_string(), l.prefix))
            .collect();
        assert!(
            leased.contains(&(
                "site-a".to_string(),
                format!("{addr_a}/32").parse().unwrap()
            )),
            "{leased:?}"
        );
        assert_eq!(other.sites().unwrap().len(), 2);

        // The enrollment token was redeemed in etcd: it is gone.
        let code = broker.token("site-c").await;
        let state = tempfile::tempdir().unwrap();
        let state = tether::state_dir::StateDir::new(state.path().join("s"));
        tether::enroll::enroll(&broker.addr().to_string(), &code, &state, false, None)
            .await
            .unwrap();
        let again = tether::enroll::enroll(&broker.addr().to_string(), &code, &state, true, None)
            .await
            .expect_err("a token enrolls once");
        assert!(format!("{again:#}").contains("already used"), "{again:#}");

        // A revocation by this broker reaches another store's watch.
        let mut watch = other.watch();
        let b2 = broker.broker().clone();
        tokio::task::spawn_blocking(move || {
            b2.revoke_site(&"site-b".parse().unwrap(), &"local".parse().unwrap())
        })
        .await
        .unwrap()
        .unwrap();
        let revoked = loop {
            match tokio::time::timeout(Duration::from_secs(10), watch.recv())
                .await
                .expect("an event within 10 s")
                .unwrap()
            {
                StoreEvent::Revoked(Revoked::Site(id)) => break id,
                _ => continue,
            }
        };
        assert_eq!(revoked.site.as_str(), "site-b");

        // After a restart (state only in etcd) site A gets its address again.
        drop((ta, tb));
        broker.restart().await;
        let ta2 = tunnel_for(&broker, &a).await;
        assert_eq!(v4(&ta2), addr_a);
        broker.running.take().unwrap().shutdown().await;
    })
    .await
    .expect("test finished in time");
    drop(server);
}

/// Two brokers share one etcd: a revocation made at one ends the site's
/// session at the other (through the store's watch, not a shared process),
/// and an address one broker allocated is known to the other before it
/// allocates.
#[tokio::test]
async fn a_revocation_at_one_broker_ends_the_session_at_another() {
    let Some(server) = tokio::task::spawn_blocking(|| EtcdServer::start(false))
        .await
        .unwrap()
    else {
        return;
    };
    let extra = server.broker_toml("/tether/pair/");
    tokio::time::timeout(TEST_DEADLINE, async {
        let one = TestBroker::start(&extra).await;
        let two = TestBroker::start(&extra).await;
        // Site A at broker two; broker one allocates for site B meanwhile.
        let a = TestSite::enroll(&two, "site-a").await;
        let ta = tunnel_for(&two, &a).await;
        let b = TestSite::enroll(&one, "site-b").await;
        let tb = tunnel_for(&one, &b).await;
        assert_ne!(v4(&ta), v4(&tb), "one address, two owners");

        // Broker one revokes site A, which broker one holds no session of.
        let b1 = one.broker().clone();
        let revoked_at = Instant::now();
        let closed = tokio::task::spawn_blocking(move || {
            b1.revoke_site(&"site-a".parse().unwrap(), &"local".parse().unwrap())
        })
        .await
        .unwrap()
        .unwrap();
        assert!(!closed, "broker one had no session of site A");
        // Broker two hears of it (its watch of the store) and ends the
        // session, with its routes, within 2 s of the revocation: the
        // bound the design promises (the revocation's writes, then one
        // watch event; no polling).
        let reason = tokio::time::timeout(Duration::from_secs(10), ta.client.conn.closed())
            .await
            .expect("the session at broker two ends within 10 s");
        let cut = revoked_at.elapsed();
        eprintln!(
            "REVOCATION: the session at the other broker ended {cut:?} after the revocation began"
        );
        assert!(
            cut < Duration::from_secs(2),
            "revocation cut the site at another broker after {cut:?}, not within 2 s"
        );
        assert!(reason.to_string().contains("revoked"), "{reason}");
        assert!(two.broker().session(&"site-a".parse().unwrap()).is_none());
        // And refuses it from now on.
        let (chain, key, ca) = a.identity();
        let refused = match connect(two.addr(), &ca, Some((chain, key))).await {
            Err(_) => true,
            Ok(client) => Tunnel::open(client).await.is_err(),
        };
        assert!(refused, "a site revoked at another broker must be refused");
        // Broker two's summary of site A has broker one's revocation, read
        // from the shared timeline (the console's state comes from it).
        let site_a = "site-a".parse().unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(10), async {
            while two.broker().events().history(&site_a).revoked_at.is_none() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            seen.is_ok(),
            "broker two never saw broker one's revocation event"
        );
        drop(tb);
    })
    .await
    .expect("test finished in time");
    drop(server);
}

#[tokio::test]
async fn a_site_revoked_at_another_broker_cannot_renew_on_its_open_connection() {
    let Some(server) = tokio::task::spawn_blocking(|| EtcdServer::start(false))
        .await
        .unwrap()
    else {
        return;
    };
    let extra = server.broker_toml("/tether/renew/");
    tokio::time::timeout(TEST_DEADLINE, async {
        let one = TestBroker::start(&extra).await;
        let two = TestBroker::start(&extra).await;
        let a = TestSite::enroll(&two, "site-a").await;
        // A connection to broker two with no tunnel: nothing closes it.
        let config = two.client_config();
        let dialer = tether::link::Dialer::for_site(&config, &a.state, None).unwrap();
        let (conn, target) = dialer
            .connect(&config, &[tether_proto::tunnel::Transport::H3])
            .await
            .unwrap();
        // Broker one revokes the site; broker two is asked at once, before
        // or after the store's notice reaches it: the store decides.
        let b1 = one.broker().clone();
        tokio::task::spawn_blocking(move || {
            b1.revoke_site(&"site-a".parse().unwrap(), &"local".parse().unwrap())
        })
        .await
        .unwrap()
        .unwrap();
        let first = a.state.credentials().unwrap();
        match tether::enroll::renew(&conn, &a.state, &target).await {
            Err(tether::enroll::RenewError::CertificateRefused(message)) => assert!(
                message.starts_with("this site was revoked by the operator on"),
                "{message}"
            ),
            other => panic!("a site revoked at another broker renewed: {other:?}"),
        }
        assert_eq!(a.state.credentials().unwrap().chain, first.chain);
        conn.close("done");
    })
    .await
    .expect("test finished in time");
    drop(server);
}

/// `tether-broker store migrate` moves an embedded broker's deployment to
/// etcd with its CA: the site enrolled before connects to the broker on
/// etcd with the certificate it has, at its address, without enrolling
/// again, and the CA key in etcd is sealed under the key-encryption key
/// the embedded broker made.
#[tokio::test]
async fn a_migrated_deployment_keeps_its_ca_and_no_site_enrolls_again() {
    let Some(server) = tokio::task::spawn_blocking(|| EtcdServer::start(false))
        .await
        .unwrap()
    else {
        return;
    };
    let config = server.config("/tether/migrated/");
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut embedded = TestBroker::start("").await;
        let site = TestSite::enroll(&embedded, "site-m").await;
        let address = v4(&tunnel_for(&embedded, &site).await);
        let pin = embedded.broker().ca.status().bundle[0].pin.clone();
        let data = embedded.config.data_dir.clone().unwrap();
        embedded.running.take().unwrap().shutdown().await;

        let kek_file = data.join(tether_config::broker::DEFAULT_KEK_FILE);
        let kek = tether_pki::kek::Kek::load(&kek_file).unwrap();
        let (from, to) = (
            data.join(tether_broker::store::EMBEDDED_FILE),
            config.clone(),
        );
        // The stopped broker's last tasks may hold the store file a moment
        // longer (as in `TestBroker::restart`).
        let report = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                match tether_broker::store::migrate(
                    &from,
                    &to,
                    &kek,
                    false,
                    std::time::SystemTime::now(),
                ) {
                    Err(e) if e.0.contains("in use") && std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100))
                    }
                    other => return other,
                }
            }
        })
        .await
        .unwrap()
        .unwrap();
        assert!(matches!(report.ca, Some((1, Some(_)))), "{report}");
        let raw = EtcdStore::open(&config)
            .unwrap()
            .ca_state()
            .unwrap()
            .unwrap();
        assert!(!raw.contains("PRIVATE KEY"), "the CA key in etcd is sealed");

        let extra = format!(
            "[ca]\nkey_encryption_key_file = {kek_file:?}\n\
             [store]\nbackend = \"etcd\"\n[store.etcd]\nendpoints = [{:?}]\nprefix = {:?}\n",
            config.endpoints[0], config.prefix
        );
        let on_etcd = TestBroker::start(&extra).await;
        assert!(!on_etcd.running.as_ref().unwrap().created, "no new CA");
        assert_eq!(on_etcd.broker().ca.status().bundle[0].pin, pin);
        let tunnel = tunnel_for(&on_etcd, &site).await;
        assert_eq!(v4(&tunnel), address);
    })
    .await
    .expect("test finished in time");
    drop(server);
}
