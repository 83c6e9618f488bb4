//! Link identities from the deployment's CA (a real etcd, started per
//! test): a broker relays only to brokers whose fleet record proves its
//! link key with a broker certificate of the deployment's CA. Records
//! written straight into etcd with a key of their own, a copy of a real
//! broker's proof under another id, or a proof signed with a site's
//! certificate are refused and counted, while the two real brokers keep
//! relaying to each other; a CA rotation reissues each broker's link
//! certificate and its record is written again with the new proof.
//!
//! ```text
//!                 etcd (127.0.0.1, per test)
//!            /          |             \
//!      broker A    forged records    broker B
//!         |     ==== WireGuard link ====   |
//!      site-x                           site-y
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use tether_proto::fleet::Member;
use tether_tests::child_broker::data_dir_with_ca;
use tether_tests::etcd::EtcdServer;
use tether_tests::{
    TestBroker, TestSite, deliver, metric_in, ping, tunnel_for, v4, wait_for_remote_route,
};

/// Deadline of the test body.
const TEST_DEADLINE: Duration = Duration::from_secs(120);

/// This broker's fleet id.
fn id_of(b: &TestBroker) -> String {
    b.broker().fleet().unwrap().snapshot().unwrap().me().clone()
}

/// The ids of the peers of `b`'s link.
fn peers_of(b: &TestBroker) -> BTreeSet<String> {
    b.broker()
        .plane()
        .link()
        .unwrap()
        .peers()
        .iter()
        .map(|p| p.id.clone())
        .collect()
}

const UNVERIFIED: &str = r#"tether_broker_peer_refused_total{reason="unverified"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_brokers_proven_by_the_ca_are_peers_of_the_link() {
    let Some(server) = tokio::task::spawn_blocking(|| EtcdServer::start(false))
        .await
        .unwrap()
    else {
        return;
    };
    let prefix = "/tether/link-identity/";
    let extra = format!(
        "{}[peering]\nlisten = \"127.0.0.1:0\"\n\
         [[policy.allow]]\nname = \"x-and-y\"\nfrom = [\"site:site-x\", \"site:site-y\"]\nto = [\"site:site-x\", \"site:site-y\"]\n",
        server.broker_toml(prefix),
    );
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut a = TestBroker::start(&extra).await;
        let data = tempfile::tempdir().unwrap();
        data_dir_with_ca(
            a.config.data_dir.as_ref().unwrap(),
            &data.path().join("data"),
        );
        let mut b = TestBroker::start_with(&extra, |c| {
            c.data_dir = Some(data.path().join("data"));
        })
        .await;
        let (a_id, b_id) = (id_of(&a), id_of(&b));
        eprintln!("brokers: A {a_id}, B {b_id}");

        let x = TestSite::enroll(&a, "site-x").await;
        let tx = tunnel_for(&a, &x).await;
        let y = TestSite::enroll(&b, "site-y").await;
        let ty = tunnel_for(&b, &y).await;
        let (xa, ya) = (v4(&tx), v4(&ty));
        wait_for_remote_route(&a, ya).await;
        wait_for_remote_route(&b, xa).await;

        // A's record as etcd holds it: its key, its proof.
        let mut etcd = etcd_client::Client::connect([server.url()], None)
            .await
            .unwrap();
        let brokers = format!("{prefix}fleet/brokers/");
        let reader = etcd.clone();
        let record = |id: String| {
            let mut etcd = reader.clone();
            let key = format!("{brokers}{id}");
            async move {
                let got = etcd.get(key, None).await.unwrap();
                serde_json::from_slice::<Member>(got.kvs()[0].value()).unwrap()
            }
        };
        let a_record = record(a_id.clone()).await;
        let a_proof = a_record.link_proof.clone().expect("A proves its link key");

        // Where a forged record points its link: a broker that made it a
        // peer would greet it with a handshake at once.
        let trap = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let trap_addr = trap.local_addr().unwrap().to_string();
        let stranger = tether_pki::wg::encode(&rand_key());

        // 1. A key of its own, no proof.
        let forged = Member {
            forward: Some(trap_addr.clone()),
            link_key: Some(stranger.clone()),
            link_proof: None,
            ..a_record.clone()
        };
        // 2. A's key, address and proof, under another id (and newer than
        // A's record: it would be taken for A restarted).
        let copied = a_record.clone();
        // 3. A key of its own, proven with a site's certificate and key.
        let credentials = x.state.credentials().unwrap();
        let site_signer =
            tether_pki::link::LinkSigner::new(credentials.chain[0].clone(), &credentials.key)
                .unwrap();
        let by_site = Member {
            forward: Some(trap_addr.clone()),
            link_key: Some(stranger.clone()),
            link_proof: Some(
                site_signer
                    .prove(
                        "0000000000site01",
                        &trap_addr,
                        &tether_pki::wg::decode(&stranger).unwrap(),
                    )
                    .unwrap(),
            ),
            ..a_record.clone()
        };
        for (id, member) in [
            ("00000000forged01", &forged),
            ("00000000copied01", &copied),
            ("0000000000site01", &by_site),
        ] {
            etcd.put(
                format!("{brokers}{id}"),
                serde_json::to_vec(member).unwrap(),
                None,
            )
            .await
            .unwrap();
        }

        // Both brokers refuse each of the three records, once (the
        // brokers of this test share one metrics registry).
        let deadline = Instant::now() + Duration::from_secs(20);
        while metric_in(&b.scrape().await, UNVERIFIED) < 6.0 {
            assert!(
                Instant::now() < deadline,
                "the forged records were not refused: {}",
                metric_in(&b.scrape().await, UNVERIFIED)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(peers_of(&a), BTreeSet::from([b_id.clone()]));
        assert_eq!(peers_of(&b), BTreeSet::from([a_id.clone()]));

        // The real brokers still relay to each other, both ways.
        deliver(&tx, &ty, &ping(xa, ya, 1), |p| {
            (p.src, p.dst) == (IpAddr::V4(xa), IpAddr::V4(ya))
        })
        .await;
        let mut reply = ping(ya, xa, 1);
        reply[20] = 0; // echo reply
        deliver(&ty, &tx, &reply, |p| {
            (p.src, p.dst) == (IpAddr::V4(ya), IpAddr::V4(xa))
        })
        .await;
        let mut buf = [0u8; 512];
        let greeted = tokio::time::timeout(Duration::from_millis(300), trap.recv(&mut buf)).await;
        assert!(greeted.is_err(), "a broker greeted a forged record's link");

        // A CA rotation: A's link certificate is reissued at each step and
        // its record written again with the new proof; once the new CA
        // signs, A's proof is the new CA's, and B still relays to A.
        let mut before = a_proof.cert.clone();
        for step in ["prepare", "activate"] {
            let ca = a.broker().clone();
            tokio::task::spawn_blocking(move || ca.ca.rotate().unwrap())
                .await
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let proof = record(a_id.clone()).await.link_proof.unwrap();
                if proof.cert != before {
                    before = proof.cert;
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{step}: A's proof was not renewed"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let signing = a.broker().ca.cert_der();
        assert_ne!(
            tether_pki::tls::ca_pin(&signing),
            tether_pki::tls::ca_pin(&a.broker().ca.bundle_der()[1]),
            "the new CA signs"
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let proof = record(a_id.clone()).await.link_proof.unwrap();
            let by_new = tether_pki::link::verify(
                &proof,
                &a_id,
                &a_record.forward.clone().unwrap(),
                &tether_pki::wg::decode(a_record.link_key.as_ref().unwrap()).unwrap(),
                std::slice::from_ref(&signing),
                SystemTime::now(),
            );
            // B has the new proof too.
            let seen = b
                .broker()
                .fleet()
                .unwrap()
                .snapshot()
                .unwrap()
                .members()
                .get(&a_id)
                .and_then(|m| m.link_proof.clone());
            if by_new.is_ok() && seen == Some(proof) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "A's record does not carry a proof of the new CA: {by_new:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(peers_of(&b), BTreeSet::from([a_id.clone()]));
        deliver(&tx, &ty, &ping(xa, ya, 2), |p| {
            (p.src, p.dst) == (IpAddr::V4(xa), IpAddr::V4(ya))
        })
        .await;
        let mut reply = ping(ya, xa, 2);
        reply[20] = 0;
        deliver(&ty, &tx, &reply, |p| {
            (p.src, p.dst) == (IpAddr::V4(ya), IpAddr::V4(xa))
        })
        .await;
        // Each refused record was counted once, not at every change of the
        // fleet.
        assert_eq!(metric_in(&b.scrape().await, UNVERIFIED), 6.0);

        drop((tx, ty));
        b.running.take().unwrap().shutdown().await;
        a.running.take().unwrap().shutdown().await;
    })
    .await
    .expect("test finished in time");
    drop(server);
}

/// A random X25519 public key's bytes (the private half is thrown away).
fn rand_key() -> [u8; 32] {
    tether_pki::wg::WgKey::generate().public()
}
