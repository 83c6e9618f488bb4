//! Several brokers on one real etcd (started per test, see
//! `broker/src/store/etcd_server.rs`): a site learns the brokers of its
//! region, and when its broker is killed (`SIGKILL`, a real process) it is
//! back on another broker with the same address.
//!
//! Broker A (and later C) runs in a child process: this test binary run
//! again with `FLEET_CHILD_CONFIG` set, executing only
//! [`child_broker`]. Broker B runs in this process. All three share one CA
//! (copied from B's data directory), as the brokers of a deployment do.
//!
//! ```text
//!            etcd (127.0.0.1, per test)
//!          /        |          \
//!   broker A     broker B     broker C (joins later)
//!   (child)      (in-process) (child)
//!      |  kill -9    ^
//!   site-1 ------> site-1 (same address)       site-2 on B
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether::link::{BrokerConn, Dialer, TunnelLink};
use tether::state_dir::StateDir;
use tether_config::client::ClientFile;
use tether_proto::agent::ClientSession;
use tether_proto::capsule::{Capsule, CapsuleDecoder};
use tether_proto::ip::Packet;
use tether_proto::net::Family;
use tether_proto::tunnel::Transport;
use tether_tests::child_broker::{ChildBroker, serve_child};
use tether_tests::etcd::EtcdServer;
use tether_tests::{TestBroker, TestSite, ping, tunnel_for, v4};

/// Deadline of the test body.
const TEST_DEADLINE: Duration = Duration::from_secs(180);

/// Environment variable naming the configuration a child broker runs.
const CHILD: &str = "FLEET_CHILD_CONFIG";

/// Not a test on its own: the body of a child broker process (see the
/// module documentation). Without `FLEET_CHILD_CONFIG` it does nothing.
#[tokio::test]
async fn child_broker() {
    serve_child(CHILD).await;
}

/// A site driven through the agent's own dialing (configured brokers, then
/// the learned ones, the lost one last) and its broker-list follower.
struct Site {
    conn: Arc<BrokerConn>,
    link: TunnelLink,
    session: ClientSession,
    endpoint: String,
    follower: tokio::task::JoinHandle<()>,
    _tunnel: tether::link::Tunnel,
}

impl Site {
    async fn connect(state: &StateDir, lost: Option<&str>) -> Result<Site, String> {
        let config = ClientFile::load(&state.config_path())
            .unwrap()
            .validate("site")
            .unwrap();
        let lost = lost.map(|l| tether_config::Endpoint::parse(l, 443).unwrap());
        let config = tether::brokers::dial_config(&config, state, lost.as_ref());
        let dialer = Dialer::for_site(&config, state, None).unwrap();
        let (conn, target) = dialer
            .connect(&config, &[Transport::H3])
            .await
            .map_err(|f| f.to_string())?;
        let endpoint = target.endpoint.to_string();
        let conn = Arc::new(conn);
        let (mut tunnel, link) = conn
            .open_tunnel(&endpoint, Duration::from_secs(5), &[])
            .await
            .map_err(|f| f.to_string())?;
        // Capsules until the address has arrived.
        let mut session = ClientSession::default();
        let mut capsules = CapsuleDecoder::default();
        while session.host_address(Family::V4).is_none() {
            let data = tokio::time::timeout(Duration::from_secs(5), tunnel.read())
                .await
                .map_err(|_| "no address in time".to_string())??
                .ok_or("the tunnel ended")?;
            capsules.push(&data);
            while let Some(raw) = capsules.next_capsule().map_err(|e| e.to_string())? {
                session.on_capsule(Capsule::parse(raw).map_err(|e| e.to_string())?);
            }
        }
        let follower = tokio::spawn(tether::brokers::follow(
            conn.clone(),
            endpoint.clone(),
            state.clone(),
        ));
        Ok(Site {
            conn,
            link,
            session,
            endpoint,
            follower,
            _tunnel: tunnel,
        })
    }

    fn v4(&self) -> Ipv4Addr {
        match self.session.host_address(Family::V4) {
            Some(IpAddr::V4(a)) => a,
            other => panic!("no IPv4 address: {other:?}"),
        }
    }

    fn send(&self, packet: &[u8]) {
        let mut buf = vec![0u8; self.link.headroom()];
        buf.extend_from_slice(packet);
        self.link.send(&mut buf).unwrap();
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

/// Waits until the site's learned broker list satisfies `ok`.
async fn learned_until(state: &StateDir, what: &str, ok: impl Fn(&[String]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let learned = tether::brokers::learned(state);
        if ok(&learned) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the site did not learn {what}: {learned:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_fails_over_to_another_broker_with_its_address_and_learns_new_brokers() {
    let Some(server) = tokio::task::spawn_blocking(|| EtcdServer::start(false))
        .await
        .unwrap()
    else {
        return;
    };
    let extra = format!(
        "{}[[policy.allow]]\nname = \"sites\"\nfrom = [\"site:site-1\", \"site:site-2\"]\nto = [\"site:site-1\", \"site:site-2\"]\n",
        server.broker_toml("/tether/fleet/"),
    );
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut b = TestBroker::start(&extra).await;
        let ca_dir = b.config.data_dir.clone().unwrap();
        let mut a = ChildBroker::start(CHILD, &extra, &ca_dir);
        let (a_addr, b_addr) = (a.addr.to_string(), b.addr().to_string());
        eprintln!("brokers: A at {a_addr} (child), B at {b_addr}");

        // Site 1 enrolls at A (with a token made at B: tokens are in etcd)
        // and learns both brokers.
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        let code = b.token("site-1").await;
        let enrolled = tether::enroll::enroll(&a_addr, &code, &state, false, None)
            .await
            .unwrap();
        assert_eq!(
            enrolled.response.brokers,
            [a_addr.clone(), b_addr.clone()],
            "A's own endpoint first, then B"
        );
        eprintln!("site-1 enrolled at A");
        let site = Site::connect(&state, None).await.unwrap();
        eprintln!("site-1 connected to {}", site.endpoint);
        assert_eq!(site.endpoint, a_addr, "the configured broker first");
        let address = site.v4();
        learned_until(&state, "A and B", |l| {
            l.contains(&a_addr) && l.contains(&b_addr)
        })
        .await;

        // Site 2 on B.
        let two = TestSite::enroll(&b, "site-2").await;
        let t2 = tunnel_for(&b, &two).await;
        let address2 = v4(&t2);

        // A dies. The site notices (QUIC idle timeout of the agent's
        // configuration) and dials again, A last.
        let killed = Instant::now();
        a.kill();
        let lost = site.conn.closed().await;
        let noticed = killed.elapsed();
        let lost_endpoint = site.endpoint.clone();
        drop(site);
        let site = loop {
            match Site::connect(&state, Some(&lost_endpoint)).await {
                Ok(site) => break site,
                Err(e) => eprintln!("reconnecting: {e}"),
            }
        };
        assert_eq!(site.endpoint, b_addr, "back on B");
        assert_eq!(site.v4(), address, "the same address at B");
        // Traffic flows again: site 1 → site 2 through B.
        b.wait_for_route(format!("{address}/32").parse().unwrap(), Duration::from_secs(10))
            .await;
        site.send(&ping(address, address2, 7));
        let got = t2
            .recv_packet(Duration::from_secs(5))
            .await
            .expect("site 1's packet reaches site 2 after the failover");
        let p = Packet::parse(&got).unwrap();
        assert_eq!((p.src, p.dst), (IpAddr::V4(address), IpAddr::V4(address2)));
        let restored = killed.elapsed();
        eprintln!(
            "FAILOVER: loss noticed after {noticed:?} ({lost}); traffic restored at B after {restored:?}"
        );
        // B counts the session it took over from A (A's owner key had
        // expired by then).
        let scraped = b.scrape().await;
        assert!(
            scraped.contains("tether_broker_fleet_failovers_total 1\n"),
            "one failover counted at B:\n{scraped}"
        );

        // A broker that joins later reaches the site through B, without
        // anyone touching the site; A leaves its list once its lease
        // expires.
        let c = ChildBroker::start(CHILD, &extra, &ca_dir);
        let c_addr = c.addr.to_string();
        learned_until(&state, "C, without A", |l| {
            l.contains(&c_addr) && l.contains(&b_addr) && !l.contains(&a_addr)
        })
        .await;
        assert_eq!(
            tether::brokers::learned(&state).first(),
            Some(&b_addr),
            "the broker it talks to first"
        );
        drop((site, c));
        b.running.take().unwrap().shutdown().await;
    })
    .await
    .expect("test finished in time");
    drop(server);
}
