//! Packets between ends held by different brokers of one fleet (a real
//! etcd, started per test): each broker relays what it cannot deliver
//! itself over the encrypted broker-to-broker link (WireGuard) to the
//! broker the store names as the destination's holder, which delivers it
//! to its own session.
//!
//! ```text
//!                 etcd (127.0.0.1, per test)
//!                /                          \
//!       broker A  ==== WireGuard link ====  broker B
//!        |     \                              |    \
//!     site-x   gateway "backend"           site-y   site-z
//!              (boringtun peer in          (no policy rule
//!               this test, 10.20/16)        from site-x)
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../broker/src/wireguard/tests/gateway.rs"]
mod gateway;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use boringtun::x25519;
use gateway::TestGateway;
use tether_proto::gateway::{
    Assembler, BROKER_CONTROL, GATEWAY_CONTROL, Message, RouteSet, control_payload,
};
use tether_proto::ip::Packet;
use tether_tests::child_broker::{ChildBroker, data_dir_with_ca, serve_child};
use tether_tests::etcd::{EtcdServer, start_etcd};
use tether_tests::{
    TestBroker, TestSite, Tunnel, connect_trusting, deliver, metric_in, ping, tunnel_for, v4,
    wait_for_remote_route,
};

/// Deadline of each test body.
const TEST_DEADLINE: Duration = Duration::from_secs(120);
/// Environment variable naming the configuration a child broker runs.
const CHILD: &str = "FLEET_FORWARD_CHILD_CONFIG";

/// Not a test on its own: the body of a broker in a child process (one
/// that can be killed with `kill -9`). Without
/// `FLEET_FORWARD_CHILD_CONFIG` it does nothing.
#[tokio::test]
async fn child_broker() {
    serve_child(CHILD).await;
}

/// The configuration both brokers share: etcd, a link on a port of its
/// own, and a policy that lets site-x and site-y (not site-z) talk.
fn shared_config(server: &EtcdServer, prefix: &str) -> String {
    format!(
        "{}[peering]\nlisten = \"127.0.0.1:0\"\n\
         [[policy.allow]]\nname = \"x-and-y\"\nfrom = [\"site:site-x\", \"site:site-y\"]\nto = [\"site:site-x\", \"site:site-y\"]\n",
        server.broker_toml(prefix),
    )
}

/// A host behind the gateway "backend" of [`gateway_brokers`].
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 10);

/// Brokers A and B on `server` under `prefix` ([`shared_config`]), A with
/// a WireGuard listener and the gateway "backend" (10.20.0.0/16) whose key
/// is `secret`'s.
async fn gateway_brokers(
    server: &EtcdServer,
    prefix: &str,
    secret: &x25519::StaticSecret,
) -> (TestBroker, TestBroker) {
    let base = shared_config(server, prefix);
    let public = x25519::PublicKey::from(secret);
    let with_gateway = format!(
        "{base}[wireguard]\nlisten = [\"127.0.0.1:0\"]\n\
         [[gateway]]\nid = \"backend\"\nregion = \"local\"\npublic_key = {:?}\nprefixes = [\"10.20.0.0/16\"]\n",
        tether_pki::wg::encode(public.as_bytes())
    );
    let a = TestBroker::start(&with_gateway).await;
    let b = second_broker(&a, &base).await;
    (a, b)
}

/// Broker B, with the CA of A's data directory (the brokers of a
/// deployment share one).
async fn second_broker(a: &TestBroker, extra: &str) -> TestBroker {
    let ca_dir = a.config.data_dir.clone().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    data_dir_with_ca(&ca_dir, &data);
    let b = TestBroker::start_with(extra, |c| c.data_dir = Some(data.clone())).await;
    // The data directory lives as long as the test process.
    std::mem::forget(dir);
    b
}

/// This broker's fleet id.
fn id_of(b: &TestBroker) -> String {
    b.broker().fleet().unwrap().snapshot().unwrap().me().clone()
}

/// An IPv4 UDP packet (checksum 0: none, allowed for IPv4).
fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let total = (28 + payload.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let sum = tether_proto::ip::checksum(&[&p[..20]]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_on_two_brokers_reach_each_other_over_the_link() {
    let Some(server) = start_etcd().await else {
        return;
    };
    let extra = shared_config(&server, "/tether/forward/");
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut a = TestBroker::start(&extra).await;
        let mut b = second_broker(&a, &extra).await;
        let (a_id, b_id) = (id_of(&a), id_of(&b));
        eprintln!("brokers: A {a_id} at {}, B {b_id} at {}", a.addr(), b.addr());

        let x = TestSite::enroll(&a, "site-x").await;
        let tx = tunnel_for(&a, &x).await;
        let y = TestSite::enroll(&b, "site-y").await;
        let ty = tunnel_for(&b, &y).await;
        let z = TestSite::enroll(&b, "site-z").await;
        let tz = tunnel_for(&b, &z).await;
        let (xa, ya, za) = (v4(&tx), v4(&ty), v4(&tz));
        eprintln!("site-x {xa} on A, site-y {ya} and site-z {za} on B");
        wait_for_remote_route(&a, ya).await;
        wait_for_remote_route(&a, za).await;
        wait_for_remote_route(&b, xa).await;

        // Ping x → y, the answer y → x, then UDP both ways.
        let started = Instant::now();
        deliver(&tx, &ty, &ping(xa, ya, 1), |p| {
            (p.src, p.dst) == (IpAddr::V4(xa), IpAddr::V4(ya))
        })
        .await;
        eprintln!("first packet through the link after {:?}", started.elapsed());
        let mut reply = ping(ya, xa, 1);
        reply[20] = 0; // echo reply
        deliver(&ty, &tx, &reply, |p| {
            (p.src, p.dst) == (IpAddr::V4(ya), IpAddr::V4(xa))
        })
        .await;
        let datagram = udp(xa, ya, 40000, 5353, b"across two brokers");
        deliver(&tx, &ty, &datagram, |p| {
            p.dst == IpAddr::V4(ya) && p.protocol == 17
        })
        .await;
        let back = udp(ya, xa, 5353, 40000, b"and back");
        deliver(&ty, &tx, &back, |p| {
            p.dst == IpAddr::V4(xa) && p.protocol == 17
        })
        .await;

        // The access policy holds across brokers, decided at A where x's
        // packet entered: x may not reach z, nothing arrives at z, and A
        // counts the drop against x.
        tx.send_packet(&ping(xa, za, 9));
        let drops = r#"tether_broker_site_packets_dropped_total{site="site-x",region="local",reason="policy"}"#;
        let deadline = Instant::now() + Duration::from_secs(5);
        while metric_in(&a.scrape().await, drops) < 1.0 {
            assert!(Instant::now() < deadline, "A did not count the policy drop");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            tz.recv_packet(Duration::from_millis(300)).await.is_none(),
            "a packet the policy denies reached site-z"
        );

        // The counters of the link on both sides.
        let a_text = a.scrape().await;
        let out_packets = metric_in(
            &a_text,
            &format!(r#"tether_broker_relayed_packets_total{{broker="{b_id}",direction="to_broker"}}"#),
        );
        let out_bytes = metric_in(
            &a_text,
            &format!(r#"tether_broker_relayed_bytes_total{{broker="{b_id}",direction="to_broker"}}"#),
        );
        let in_packets = metric_in(
            &a_text,
            &format!(r#"tether_broker_relayed_packets_total{{broker="{b_id}",direction="from_broker"}}"#),
        );
        eprintln!("A: {out_packets} packets ({out_bytes} bytes) to B, {in_packets} from B");
        assert!(out_packets >= 2.0 && out_bytes > 0.0, "{a_text}");
        assert!(in_packets >= 2.0, "{a_text}");
        let b_text = b.scrape().await;
        assert!(
            metric_in(
                &b_text,
                &format!(r#"tether_broker_relayed_packets_total{{broker="{a_id}",direction="from_broker"}}"#),
            ) >= 2.0,
            "{b_text}"
        );
        assert!(metric_in(&b_text, "tether_broker_fleet_brokers_alive") >= 2.0, "{b_text}");
        assert_eq!(
            metric_in(
                &b_text,
                &format!(r#"tether_broker_fleet_sessions{{broker="{b_id}"}}"#)
            ),
            2.0,
            "{b_text}"
        );

        // B leaves: its sites are nobody's, and A has no route to them.
        drop((ty, tz));
        b.running.take().unwrap().shutdown().await;
        let mut changes = a.broker().core().remote_route_changes();
        let gone = tokio::time::timeout(Duration::from_secs(20), async {
            while a
                .broker()
                .core()
                .read()
                .unwrap()
                .remote
                .lookup(IpAddr::V4(ya))
                .is_some()
            {
                changes.changed().await.unwrap();
            }
        })
        .await;
        assert!(gone.is_ok(), "A still routes to site-y through the stopped B");
        a.running.take().unwrap().shutdown().await;
    })
    .await
    .expect("test finished in time");
    drop(server);
}

/// A WireGuard gateway of A (played by boringtun in this test) reaches a
/// site on B, and the site's answer comes back through A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_on_one_broker_reaches_a_site_on_another() {
    let Some(server) = start_etcd().await else {
        return;
    };
    let gw_secret = x25519::StaticSecret::from([7u8; 32]);
    tokio::time::timeout(TEST_DEADLINE, async {
        let (mut a, mut b) = gateway_brokers(&server, "/tether/forward-gw/", &gw_secret).await;
        let y = TestSite::enroll(&b, "site-y").await;
        let ty = tunnel_for(&b, &y).await;
        let ya = v4(&ty);
        wait_for_remote_route(&a, ya).await;
        // B learns A's gateway from A's announcement.
        wait_for_remote_route(&b, BACKEND).await;

        // The gateway's ping reaches site-y on B; site-y's answer goes
        // back through B, the link and A to the gateway.
        let mut gw = Gateway::new(gw_secret, &a).await;
        gw.ping_through(BACKEND, &ty, 3).await;
        drop(ty);
        b.running.take().unwrap().shutdown().await;
        a.running.take().unwrap().shutdown().await;
    })
    .await
    .expect("test finished in time");
    drop(server);
}

/// A WireGuard gateway played by boringtun ([`TestGateway`]) that
/// assembles the route sets its broker sends.
struct Gateway {
    peer: TestGateway,
    routes: Assembler,
}

impl Gateway {
    async fn new(secret: x25519::StaticSecret, a: &TestBroker) -> Self {
        let wg = a.broker().plane().wireguard().unwrap().clone();
        Self {
            peer: TestGateway::new(secret, wg.public_key(), wg.local_addrs()[0]).await,
            routes: Assembler::default(),
        }
    }

    /// The next IP packet from the broker within `within`, answering
    /// handshakes on the way; control messages go to `self.routes`, and a
    /// completed route set is returned as `Err`.
    async fn recv(&mut self, within: Duration) -> Option<Result<Vec<u8>, RouteSet>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let packet = self.peer.recv(deadline).await?;
            match control_payload(&packet, BROKER_CONTROL, GATEWAY_CONTROL) {
                Some(payload) => {
                    if let Some(set) = Message::decode(payload)
                        .ok()
                        .and_then(|m| self.routes.push(m))
                    {
                        return Some(Err(set));
                    }
                }
                None => return Some(Ok(packet)),
            }
        }
    }

    /// Asks for the route set until a complete one arrives; bounded.
    async fn route_set(&mut self) -> RouteSet {
        for _ in 0..20 {
            self.peer.send_control(&Message::Request).await;
            let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
            while let Some(got) = self
                .recv(deadline.saturating_duration_since(tokio::time::Instant::now()))
                .await
            {
                if let Err(set) = got {
                    return set;
                }
            }
        }
        panic!("no route set from the broker");
    }

    /// Asks for route sets until one has a route for `addr`; bounded.
    async fn wait_for_site_route(&mut self, addr: Ipv4Addr) -> RouteSet {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let set = self.route_set().await;
            if set
                .routes
                .iter()
                .any(|r| r.prefix.contains(&IpAddr::V4(addr)))
            {
                return set;
            }
            assert!(
                Instant::now() < deadline,
                "the gateway's route set has no route to {addr}: {set:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Pings `site` from `backend` until the site's tunnel sees it, then
    /// answers from the site until the answer comes back here; bounded.
    async fn ping_through(&mut self, backend: Ipv4Addr, site: &Tunnel, seq: u16) {
        let ya = v4(site);
        let request = ping(backend, ya, seq);
        let mut arrived = false;
        'outer: for _ in 0..10 {
            self.peer.send(&request).await;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
            loop {
                tokio::select! {
                    _ = self.recv(Duration::from_millis(20)) => {}
                    got = site.recv_packet(Duration::from_millis(20)) => {
                        if got.and_then(|g| Packet::parse(&g).ok().map(|p| p.src == IpAddr::V4(backend))).unwrap_or(false) {
                            arrived = true;
                            break 'outer;
                        }
                    }
                }
                if tokio::time::Instant::now() > deadline {
                    break;
                }
            }
        }
        assert!(arrived, "the gateway's ping {seq} did not reach the site");
        let mut answer = ping(ya, backend, seq);
        answer[20] = 0;
        for _ in 0..10 {
            site.send_packet(&answer);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
            while let Some(got) = self
                .recv(deadline.saturating_duration_since(tokio::time::Instant::now()))
                .await
            {
                if let Ok(p) = got {
                    let p = Packet::parse(&p).unwrap();
                    if (p.src, p.dst) == (IpAddr::V4(ya), IpAddr::V4(backend)) {
                        return;
                    }
                }
            }
        }
        panic!("the site's answer {seq} did not reach the gateway");
    }
}

/// A WireGuard gateway on A is given the route of a site held by B (and
/// its name), reaches it through A and the link, and keeps reaching it,
/// with the same route, when the site moves to A and back to B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateways_routes_follow_a_site_between_brokers() {
    let Some(server) = start_etcd().await else {
        return;
    };
    let gw_secret = x25519::StaticSecret::from([9u8; 32]);
    tokio::time::timeout(TEST_DEADLINE, async {
        let (mut a, mut b) = gateway_brokers(&server, "/tether/forward-follow/", &gw_secret).await;
        let mut gw = Gateway::new(gw_secret, &a).await;

        // site-y on B: A's gateway is told its route, and its name.
        let y = TestSite::enroll(&b, "site-y").await;
        let ty = tunnel_for(&b, &y).await;
        let ya = v4(&ty);
        let set = gw.wait_for_site_route(ya).await;
        eprintln!("route set at A with site-y on B: {set:?}");
        assert!(
            set.routes
                .iter()
                .any(|r| r.site.as_str() == "site-y" && r.prefix.addr() == IpAddr::V4(ya))
        );
        // A's mesh zone (which its gateways are sent) names site-y.
        let mut zones = a.broker().zone_changes();
        let named = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let named = zones.borrow_and_update().as_ref().is_some_and(|z| {
                    z.sites.iter().any(|s| {
                        s.site.as_str() == "site-y" && s.addresses.contains(&IpAddr::V4(ya))
                    })
                });
                if named {
                    return;
                }
                zones.changed().await.unwrap();
            }
        })
        .await;
        assert!(named.is_ok(), "A's zone has no name for site-y on B");
        wait_for_remote_route(&b, BACKEND).await;
        gw.ping_through(BACKEND, &ty, 1).await;

        // site-y moves to A (its tunnel on B ends, a new one opens on A):
        // same address, same route at the gateway, delivered here.
        drop(ty);
        let ty = tunnel_for(&a, &y).await;
        assert_eq!(v4(&ty), ya, "site-y kept its address");
        gw.wait_for_site_route(ya).await;
        gw.ping_through(BACKEND, &ty, 2).await;

        // And back to B.
        drop(ty);
        let ty = tunnel_for(&b, &y).await;
        assert_eq!(v4(&ty), ya, "site-y kept its address");
        wait_for_remote_route(&a, ya).await;
        gw.wait_for_site_route(ya).await;
        gw.ping_through(BACKEND, &ty, 3).await;

        drop(ty);
        b.running.take().unwrap().shutdown().await;
        a.running.take().unwrap().shutdown().await;
    })
    .await
    .expect("test finished in time");
    drop(server);
}

/// A broker killed with `kill -9` stops sending keepalives on the link:
/// the broker relaying to it holds the link down (packets for its sites
/// counted as `peer_down`) well before the dead broker's store lease
/// expires and it leaves the fleet. Prints both times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_broker_is_held_down_before_its_lease_expires() {
    let Some(server) = start_etcd().await else {
        return;
    };
    let extra = shared_config(&server, "/tether/forward-kill/");
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut a = TestBroker::start(&extra).await;
        let ca_dir = a.config.data_dir.clone().unwrap();
        let child_extra = extra.clone();
        let mut b = tokio::task::spawn_blocking(move || {
            ChildBroker::start(CHILD, &child_extra, &ca_dir)
        })
        .await
        .unwrap();
        let x = TestSite::enroll(&a, "site-x").await;
        let tx = tunnel_for(&a, &x).await;
        let y = TestSite::enroll(&a, "site-y").await;
        let c = y.state.credentials().unwrap();
        let client = connect_trusting(b.addr, &c.bundle, Some((c.chain, c.key)))
            .await
            .unwrap();
        let mut ty = Tunnel::open(client).await.unwrap();
        ty.configured().await;
        let (xa, ya) = (v4(&tx), v4(&ty));
        wait_for_remote_route(&a, ya).await;
        deliver(&tx, &ty, &ping(xa, ya, 1), |p| p.dst == IpAddr::V4(ya)).await;
        let me = id_of(&a);
        let b_id = a
            .broker()
            .fleet()
            .unwrap()
            .snapshot()
            .unwrap()
            .members()
            .keys()
            .find(|id| **id != me)
            .unwrap()
            .clone();
        let link = a.broker().plane().link().unwrap().clone();
        assert!(!link.peer(&b_id).unwrap().is_down(), "the link to B is up");

        // site-x pings site-y every 10 ms while B is killed.
        let sender = {
            let tx = std::sync::Arc::new(tx);
            let t = tx.clone();
            let task = tokio::spawn(async move {
                for seq in 2u16.. {
                    t.send_packet(&ping(xa, ya, seq));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
            (tx, task)
        };
        let killed = Instant::now();
        tokio::task::spawn_blocking(move || {
            b.kill();
            b
        })
        .await
        .unwrap();
        drop(ty);
        let (mut down, mut gone) = (None, None);
        while gone.is_none() && killed.elapsed() < Duration::from_secs(30) {
            match link.peer(&b_id) {
                Some(p) if down.is_none() && p.is_down() => down = Some(killed.elapsed()),
                Some(_) => {}
                None => gone = Some(killed.elapsed()),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sender.1.abort();
        let text = a.scrape().await;
        let peer_down = metric_in(
            &text,
            r#"tether_broker_site_packets_dropped_total{site="site-x",region="local",reason="peer_down"}"#,
        );
        eprintln!(
            "B killed: the link held it down after {down:?}, it left the fleet after {gone:?}; \
             {peer_down} pings of site-x counted as peer_down"
        );
        assert!(gone.is_some(), "B never left the fleet");
        assert!(
            down.is_some(),
            "the link to the killed B was never held down before B left the fleet"
        );
        assert!(peer_down >= 1.0, "no packet counted as peer_down: {text}");
        drop(sender.0);
        a.running.take().unwrap().shutdown().await;
    })
    .await
    .expect("test finished in time");
    drop(server);
}
