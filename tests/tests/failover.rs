//! Fast failover and graceful handover between brokers on one real etcd
//! (started per test, see `broker/src/store/etcd_server.rs`).
//!
//! The sites are driven by the agent's own parts: [`Dialer`], the standby
//! dial ([`tether::standby::dial`]), the heartbeat and received count of
//! [`BrokerConn`], the loss deadline of [`Liveness`] and the GOAWAY watch,
//! in the order the agent's core decides them (`tether_proto::agent`).
//!
//! ```text
//!                  etcd (127.0.0.1, per test)
//!               /            |
//!   broker X (child:        broker B (in-process)
//!   killed, or SIGTERM)        |
//!      |   site-1 ---standby-->|
//!      |   (site-2 on B, or on X with a standby on B)
//! ```
//!
//! (a) `kill -9` of X, a few times: site-1 notices the silence within a
//! second and opens its tunnel on the standby at B with the same address;
//! the gap from the kill to the first packet from site-1 at site-2 is
//! printed. (b) SIGTERM of X while site-1 pings site-2 every 10 ms, both on
//! X: X sends GOAWAY, both sites open their tunnels at B before leaving X,
//! X exits once they did; the lost pings are printed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../broker/src/store/etcd_server.rs"]
mod etcd_server;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_server::EtcdServer;
use tether::dial::Target;
use tether::link::{BrokerConn, Dialer, Tunnel, TunnelLink};
use tether::state_dir::StateDir;
use tether_config::client::{ClientConfig, ClientFile};
use tether_proto::agent::ClientSession;
use tether_proto::agent::liveness::{HEARTBEAT_INTERVAL, LIVENESS_CHECK, Liveness};
use tether_proto::capsule::{Capsule, CapsuleDecoder};
use tether_proto::datagram::{self, Payload};
use tether_proto::net::Family;
use tether_proto::tunnel::Transport;
use tether_tests::child_broker::{ChildBroker, child_config};
use tether_tests::{TestBroker, ping};
use tokio::sync::{mpsc, watch};

/// Deadline of the test body.
const TEST_DEADLINE: Duration = Duration::from_secs(240);
/// Environment variable naming the configuration a child broker runs.
const CHILD: &str = "FAILOVER_CHILD_CONFIG";
/// `kill -9` rounds.
const KILLS: usize = 5;

/// Not a test on its own: the body of a child broker process. It serves
/// until SIGTERM, then hands its sites over as `tether-broker` does and
/// reports the drain. Without `FAILOVER_CHILD_CONFIG` it does nothing.
#[tokio::test]
async fn child_broker() {
    let Some(config) = child_config(CHILD) else {
        return;
    };
    let drain = config.drain_timeout;
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    let running = tether_broker::run::start(config).await.unwrap();
    println!("READY {}", running.tunnel_addrs[0]);
    term.recv().await;
    let drained = running.handover(drain).await;
    println!(
        "DRAINED {} {} {}",
        drained.sessions,
        drained.stayed,
        drained.took.as_millis()
    );
    std::process::exit(0);
}

/// A site's tunnel on one broker.
struct Active {
    conn: Arc<BrokerConn>,
    target: Target,
    link: TunnelLink,
    address: Ipv4Addr,
    _tunnel: Tunnel,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Active {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The ICMP echo sequence numbers `conn` receives from `from`.
fn read_pings(
    conn: &BrokerConn,
    from: Ipv4Addr,
    out: mpsc::UnboundedSender<(u16, Instant)>,
) -> tokio::task::JoinHandle<()> {
    let BrokerConn::H3 { client, .. } = conn else {
        panic!("HTTP/3 expected")
    };
    let conn = client.conn.clone();
    tokio::spawn(async move {
        while let Ok(d) = conn.read_datagram().await {
            let Ok((_, payload)) = datagram::parse_h3(&d) else {
                continue;
            };
            if let Ok(Payload::IpPacket(p)) = datagram::parse_payload(payload)
                && p.len() >= 28
                && p[12..16] == from.octets()
                && p[20] == 8
            {
                let _ = out.send((u16::from_be_bytes([p[26], p[27]]), Instant::now()));
            }
        }
    })
}

/// Opens the tunnel on `conn` and waits for the site's address.
async fn open_on(
    conn: BrokerConn,
    target: Target,
    pings_from: Ipv4Addr,
    pings: &mpsc::UnboundedSender<(u16, Instant)>,
) -> Active {
    let conn = Arc::new(conn);
    let (mut tunnel, link) = conn
        .open_tunnel(&target.endpoint.to_string(), Duration::from_secs(5), &[])
        .await
        .unwrap();
    let mut session = ClientSession::default();
    let mut capsules = CapsuleDecoder::default();
    while session.host_address(Family::V4).is_none() {
        let data = tokio::time::timeout(Duration::from_secs(5), tunnel.read())
            .await
            .expect("the address in time")
            .unwrap()
            .expect("the tunnel stays open");
        capsules.push(&data);
        while let Some(raw) = capsules.next_capsule().unwrap() {
            session.on_capsule(Capsule::parse(raw).unwrap());
        }
    }
    let Some(IpAddr::V4(address)) = session.host_address(Family::V4) else {
        panic!("no IPv4 address")
    };
    let reader = read_pings(&conn, pings_from, pings.clone());
    Active {
        conn,
        target,
        link,
        address,
        _tunnel: tunnel,
        reader,
    }
}

/// A site's configuration, its dialer, and the target of `addr`.
async fn site(state: &StateDir, brokers: &[SocketAddr]) -> (ClientConfig, Dialer) {
    let mut config = ClientFile::load(&state.config_path())
        .unwrap()
        .validate("site")
        .unwrap();
    config.brokers = brokers
        .iter()
        .map(|a| tether_config::Endpoint::parse(&a.to_string(), 443).unwrap())
        .collect();
    let dialer = Dialer::for_site(&config, state, None).unwrap();
    (config, dialer)
}

async fn target(config: &ClientConfig, addr: SocketAddr) -> Target {
    let endpoint = tether_config::Endpoint::parse(&addr.to_string(), 443).unwrap();
    tether::dial::resolve(&endpoint, config.published_cidr)
        .await
        .unwrap()
        .remove(0)
}

/// Sends a ping from `from` to `to` every 10 ms on the current link,
/// numbered from `first`, `count` of them.
fn ping_every_10ms(
    link: watch::Receiver<TunnelLink>,
    from: Ipv4Addr,
    to: Ipv4Addr,
    first: u16,
    count: u16,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        for seq in first..first + count {
            tick.tick().await;
            let link = link.borrow().clone();
            let mut buf = vec![0u8; link.headroom()];
            buf.extend_from_slice(&ping(from, to, seq));
            let _ = link.send(&mut buf);
        }
    })
}

/// Runs the agent's loss detection on `active` while a standby is ready:
/// a heartbeat every [`HEARTBEAT_INTERVAL`], the received count every
/// [`LIVENESS_CHECK`]; returns when the broker is lost.
async fn until_lost(conn: &BrokerConn) -> Duration {
    let start = Instant::now();
    let mut liveness: Option<Liveness> = None;
    let mut next_heartbeat = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next_heartbeat {
            conn.heartbeat().await;
            next_heartbeat = now + HEARTBEAT_INTERVAL;
        }
        let received = conn.received().unwrap();
        let l = liveness.get_or_insert(Liveness::new(received, now));
        l.handle_received(received, now);
        if l.is_lost(conn.rtt(), now) {
            return now.saturating_duration_since(l.heard_at());
        }
        assert!(start.elapsed() < Duration::from_secs(30), "loss detected");
        tokio::time::sleep(LIVENESS_CHECK).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_fails_over_within_a_second_and_moves_without_loss_on_sigterm() {
    let Some(server) = tokio::task::spawn_blocking(|| EtcdServer::start(false))
        .await
        .unwrap()
    else {
        return;
    };
    let config = server.config("/tether/failover/");
    let extra = format!(
        "[tunnel]\ndrain_timeout = \"10s\"\n\
         {}[store]\nbackend = \"etcd\"\n[store.etcd]\nendpoints = [{:?}]\nprefix = {:?}\n\
         [[policy.allow]]\nname = \"sites\"\nfrom = [\"site:site-1\", \"site:site-2\"]\nto = [\"site:site-1\", \"site:site-2\"]\n",
        server.ca_toml(),
        config.endpoints[0],
        config.prefix
    );
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut b = TestBroker::start(&extra).await;
        let ca_dir = b.config.data_dir.clone().unwrap();
        let b_addr = b.addr();

        // Both sites enroll at B.
        let dir = tempfile::tempdir().unwrap();
        let (state1, state2) = (
            StateDir::new(dir.path().join("site-1")),
            StateDir::new(dir.path().join("site-2")),
        );
        for (state, name) in [(&state1, "site-1"), (&state2, "site-2")] {
            let code = b.token(name).await;
            tether::enroll::enroll(&b_addr.to_string(), &code, state, false, None)
                .await
                .unwrap();
        }
        let (pings_tx, mut pings) = mpsc::unbounded_channel();
        let unspecified = Ipv4Addr::UNSPECIFIED;

        // Site 2 on B, receiving; site 1's address is learned below.
        let (config2, dialer2) = site(&state2, &[b_addr]).await;
        let t = target(&config2, b_addr).await;
        let conn = dialer2.dial(Transport::H3, &t).await.unwrap();
        let (site1_tx, site1_rx) = mpsc::unbounded_channel();
        drop(site1_rx);
        let mut two = open_on(conn, t, unspecified, &site1_tx).await;
        let address2 = two.address;

        // (a) kill -9 of site 1's broker, several times.
        let mut gaps = Vec::new();
        let mut address1 = None;
        for round in 0..KILLS {
            let mut x = ChildBroker::start(CHILD, &extra, &ca_dir);
            let (config1, dialer1) = site(&state1, &[x.addr, b_addr]).await;
            let t = target(&config1, x.addr).await;
            let conn = dialer1.dial(Transport::H3, &t).await.unwrap();
            let active = open_on(conn, t, unspecified, &pings_tx).await;
            let address = *address1.get_or_insert(active.address);
            assert_eq!(active.address, address, "the same address at every broker");
            // Site 2 reads pings from site 1 from now on.
            two.reader.abort();
            two.reader = read_pings(&two.conn, address, pings_tx.clone());
            let (standby, standby_target) =
                tether::standby::dial(&dialer1, &config1, Transport::H3, &[x.addr])
                    .await
                    .unwrap();
            assert_eq!(standby_target.addr, b_addr, "the standby is at B");
            // Site 1 pings site 2 every 10 ms; at X, site 2 is unknown
            // (no route between the brokers here), so nothing arrives
            // until site 1 is at B.
            let (link_tx, link_rx) = watch::channel(active.link.clone());
            let first = (round as u16 + 1) * 1000;
            let sender = ping_every_10ms(link_rx, address, address2, first, 900);
            // A healthy second, then the kill.
            let watch_conn = active.conn.clone();
            let lost = tokio::spawn(async move { until_lost(&watch_conn).await });
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(!lost.is_finished(), "a live broker is not taken as lost");
            let killed = Instant::now();
            x.kill();
            let silent = lost.await.unwrap();
            let noticed = killed.elapsed();
            let moved = open_on(standby, standby_target, unspecified, &pings_tx).await;
            assert_eq!(moved.address, address, "the same address at B");
            link_tx.send_replace(moved.link.clone());
            let restored = loop {
                let (seq, at) = tokio::time::timeout(Duration::from_secs(10), pings.recv())
                    .await
                    .expect("site 1's pings reach site 2 after the failover")
                    .unwrap();
                if seq >= first {
                    break at.saturating_duration_since(killed);
                }
            };
            sender.abort();
            eprintln!(
                "FAILOVER round {}: loss noticed {noticed:?} after the kill (silent for {silent:?}); pings flow again via B {restored:?} after the kill",
                round + 1
            );
            gaps.push(restored);
            drop((active, moved));
        }
        gaps.sort();
        eprintln!(
            "FAILOVER gap over {KILLS} kills: p50 {:?}, max {:?}",
            percentile(&gaps, 0.5),
            gaps[gaps.len() - 1]
        );
        assert!(
            gaps[gaps.len() - 1] < Duration::from_secs(5),
            "far below the 12 s idle timeout: {gaps:?}"
        );
        drop(two);

        // (b) SIGTERM of the broker holding both sites while site 1 pings
        // site 2 every 10 ms.
        let y = ChildBroker::start(CHILD, &extra, &ca_dir);
        let address1 = address1.unwrap();
        let mut movers = Vec::new();
        let (link_tx, link_rx) = watch::channel(None::<TunnelLink>);
        let (moved_tx, mut moved_rx) = mpsc::unbounded_channel();
        for (state, from) in [(&state1, unspecified), (&state2, address1)] {
            let (config, dialer) = site(state, &[y.addr, b_addr]).await;
            let t = target(&config, y.addr).await;
            let conn = dialer.dial(Transport::H3, &t).await.unwrap();
            let active = open_on(conn, t, from, &pings_tx).await;
            let (standby, standby_target) =
                tether::standby::dial(&dialer, &config, Transport::H3, &[y.addr])
                    .await
                    .unwrap();
            if from == unspecified {
                link_tx.send_replace(Some(active.link.clone()));
            }
            let (pings_tx, link_tx, moved_tx) =
                (pings_tx.clone(), link_tx.clone(), moved_tx.clone());
            // The agent on GOAWAY: the tunnel at the standby first, then
            // the device's packets to it, then the old connection goes.
            movers.push(tokio::spawn(async move {
                active.conn.goaway().await;
                let moved = open_on(standby, standby_target, from, &pings_tx).await;
                if from == unspecified {
                    link_tx.send_replace(Some(moved.link.clone()));
                }
                let _ = moved_tx.send((moved.address, moved.target.addr));
                // The old connection is kept until the old broker closes it.
                let _ = tokio::time::timeout(Duration::from_secs(3), active.conn.closed()).await;
                drop(active);
                moved
            }));
        }
        let (sender_link_tx, sender_link) = watch::channel(link_tx.borrow().clone().unwrap());
        let follow = tokio::spawn({
            let mut link_rx = link_rx.clone();
            async move {
                while link_rx.changed().await.is_ok() {
                    if let Some(l) = link_rx.borrow().clone() {
                        sender_link_tx.send_replace(l);
                    }
                }
            }
        });
        const SENT: u16 = 300;
        let first = 10_000;
        // Drop what earlier rounds left.
        while pings.try_recv().is_ok() {}
        let sender = ping_every_10ms(sender_link, address1, address2, first, SENT);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let term = Instant::now();
        y.terminate();
        let mut places = Vec::new();
        for _ in 0..2 {
            let (address, broker) = tokio::time::timeout(Duration::from_secs(10), moved_rx.recv())
                .await
                .expect("both sites move within 10 s")
                .unwrap();
            places.push((address, broker));
        }
        let moved_in = term.elapsed();
        places.sort();
        let mut expected = vec![(address1, b_addr), (address2, b_addr)];
        expected.sort();
        assert_eq!(places, expected, "both sites at B with their addresses");
        let drained = y.line("DRAINED ", Duration::from_secs(20));
        let fields: Vec<u64> = drained.split(' ').map(|f| f.parse().unwrap()).collect();
        assert_eq!(fields[0], 2, "two sessions when the drain began");
        assert_eq!(fields[1], 0, "no session left at the end of the drain");
        sender.await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut got = std::collections::BTreeSet::new();
        while let Ok((seq, _)) = pings.try_recv() {
            if (first..first + SENT).contains(&seq) {
                got.insert(seq);
            }
        }
        let lost = SENT as usize - got.len();
        eprintln!(
            "HANDOVER: both sites at B {moved_in:?} after SIGTERM; the broker drained in {} ms; {lost} of {SENT} pings (10 ms apart) lost",
            fields[2]
        );
        assert!(
            got.len() > SENT as usize / 2,
            "pings flow through the handover: {} of {SENT}",
            got.len()
        );
        follow.abort();
        for m in movers {
            drop(m.await.unwrap());
        }
        drop(y);
        b.running.take().unwrap().shutdown().await;
    })
    .await
    .expect("test finished in time");
    drop(server);
}
