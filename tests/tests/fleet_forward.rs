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

#[path = "../../broker/src/store/etcd_server.rs"]
mod etcd_server;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;
use etcd_server::EtcdServer;
use tether_proto::ip::Packet;
use tether_tests::{TestBroker, TestSite, Tunnel, ping, tunnel_for, v4};

/// Deadline of each test body.
const TEST_DEADLINE: Duration = Duration::from_secs(120);

/// The configuration both brokers share: etcd, a link on a port of its
/// own, and a policy that lets site-x and site-y (not site-z) talk.
fn shared_config(server: &EtcdServer, prefix: &str) -> String {
    let config = server.config(prefix);
    format!(
        "{}[store]\nbackend = \"etcd\"\n[store.etcd]\nendpoints = [{:?}]\nprefix = {:?}\n\
         [peering]\nlisten = \"127.0.0.1:0\"\n\
         [[policy.allow]]\nname = \"x-and-y\"\nfrom = [\"site:site-x\", \"site:site-y\"]\nto = [\"site:site-x\", \"site:site-y\"]\n",
        server.ca_toml(),
        config.endpoints[0],
        config.prefix
    )
}

/// Broker B, with the CA of A's data directory (the brokers of a
/// deployment share one).
async fn second_broker(a: &TestBroker, extra: &str) -> TestBroker {
    let ca_dir = a.config.data_dir.clone().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    tether_pki::ca::create_private_dir(&data).unwrap();
    for file in [tether_pki::ca::CA_CERT_FILE, tether_pki::ca::CA_KEY_FILE] {
        // A CA file in the data directory is imported when the store has
        // none (brokers on etcd share the store's CA).
        if ca_dir.join(file).exists() {
            std::fs::copy(ca_dir.join(file), data.join(file)).unwrap();
        }
    }
    let b = TestBroker::start_with(extra, |c| c.data_dir = Some(data.clone())).await;
    // The data directory lives as long as the test process.
    std::mem::forget(dir);
    b
}

/// This broker's fleet id.
fn id_of(b: &TestBroker) -> String {
    b.broker().fleet().unwrap().snapshot().unwrap().me().clone()
}

/// Waits until `b` routes `addr` through another broker: woken by each
/// rebuild of those routes, bounded.
async fn wait_for_remote_route(b: &TestBroker, addr: Ipv4Addr) {
    let broker = b.broker().clone();
    let mut changes = broker.core().remote_route_changes();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let known = broker
                .core()
                .read()
                .unwrap()
                .remote
                .lookup(IpAddr::V4(addr))
                .is_some();
            if known {
                return;
            }
            changes.changed().await.unwrap();
        }
    })
    .await;
    assert!(found.is_ok(), "no route to {addr} through another broker");
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

/// Sends `packet` from `from` until `to` receives a packet matching
/// `expect` (the first may wait for the link's handshake); bounded.
async fn deliver(from: &Tunnel, to: &Tunnel, packet: &[u8], expect: impl Fn(&Packet) -> bool) {
    for _ in 0..10 {
        from.send_packet(packet);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Some(got) = to
            .recv_packet(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await
        {
            if Packet::parse(&got).is_ok_and(|p| expect(&p)) {
                return;
            }
        }
    }
    panic!("the packet did not arrive through the other broker");
}

/// The value of the series starting with `prefix` in `text` (0 if none).
fn value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_on_two_brokers_reach_each_other_over_the_link() {
    let Some(server) = tokio::task::spawn_blocking(|| EtcdServer::start(false))
        .await
        .unwrap()
    else {
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
        while value(&a.scrape().await, drops) < 1.0 {
            assert!(Instant::now() < deadline, "A did not count the policy drop");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            tz.recv_packet(Duration::from_millis(300)).await.is_none(),
            "a packet the policy denies reached site-z"
        );

        // The counters of the link on both sides.
        let a_text = a.scrape().await;
        let out_packets = value(
            &a_text,
            &format!(r#"tether_broker_relayed_packets_total{{broker="{b_id}",direction="to_broker"}}"#),
        );
        let out_bytes = value(
            &a_text,
            &format!(r#"tether_broker_relayed_bytes_total{{broker="{b_id}",direction="to_broker"}}"#),
        );
        let in_packets = value(
            &a_text,
            &format!(r#"tether_broker_relayed_packets_total{{broker="{b_id}",direction="from_broker"}}"#),
        );
        eprintln!("A: {out_packets} packets ({out_bytes} bytes) to B, {in_packets} from B");
        assert!(out_packets >= 2.0 && out_bytes > 0.0, "{a_text}");
        assert!(in_packets >= 2.0, "{a_text}");
        let b_text = b.scrape().await;
        assert!(
            value(
                &b_text,
                &format!(r#"tether_broker_relayed_packets_total{{broker="{a_id}",direction="from_broker"}}"#),
            ) >= 2.0,
            "{b_text}"
        );
        assert!(value(&b_text, "tether_broker_fleet_brokers_alive") >= 2.0, "{b_text}");
        assert_eq!(
            value(
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
    let Some(server) = tokio::task::spawn_blocking(|| EtcdServer::start(false))
        .await
        .unwrap()
    else {
        return;
    };
    let gw_secret = x25519::StaticSecret::from([7u8; 32]);
    let gw_public = x25519::PublicKey::from(&gw_secret);
    let base = shared_config(&server, "/tether/forward-gw/");
    let with_gateway = format!(
        "{base}[wireguard]\nlisten = [\"127.0.0.1:0\"]\n\
         [[gateway]]\nid = \"backend\"\nregion = \"local\"\npublic_key = {:?}\nprefixes = [\"10.20.0.0/16\"]\n",
        tether_pki::wg::encode(gw_public.as_bytes())
    );
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut a = TestBroker::start(&with_gateway).await;
        let mut b = second_broker(&a, &base).await;
        let y = TestSite::enroll(&b, "site-y").await;
        let ty = tunnel_for(&b, &y).await;
        let ya = v4(&ty);
        wait_for_remote_route(&a, ya).await;
        // B learns A's gateway from A's announcement.
        let backend: Ipv4Addr = "10.20.0.10".parse().unwrap();
        wait_for_remote_route(&b, backend).await;

        let wg = a.broker().plane().wireguard().unwrap().clone();
        let a_wg: SocketAddr = wg.local_addrs()[0];
        let mut tunn = Tunn::new(
            gw_secret,
            x25519::PublicKey::from(wg.public_key()),
            None,
            None,
            1,
            None,
        );
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = vec![0u8; 65_536];
        let mut out = vec![0u8; 65_536];

        // The gateway's packet to site-y (the first one waits in boringtun
        // for the handshake, which this loop completes).
        let request = ping(backend, ya, 3);
        let mut arrived = false;
        for _ in 0..10 {
            if let TunnResult::WriteToNetwork(d) = tunn.encapsulate(&request, &mut buf) {
                socket.send_to(d, a_wg).await.unwrap();
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
            loop {
                tokio::select! {
                    r = socket.recv_from(&mut out) => {
                        let (n, _) = r.unwrap();
                        let mut result = tunn.decapsulate(None, &out[..n], &mut buf);
                        while let TunnResult::WriteToNetwork(d) = result {
                            socket.send_to(d, a_wg).await.unwrap();
                            result = tunn.decapsulate(None, &[], &mut buf);
                        }
                    }
                    got = ty.recv_packet(Duration::from_millis(50)) => {
                        if got.and_then(|g| Packet::parse(&g).ok().map(|p| p.src == IpAddr::V4(backend))).unwrap_or(false) {
                            arrived = true;
                            break;
                        }
                    }
                    () = tokio::time::sleep_until(deadline) => break,
                }
            }
            if arrived {
                break;
            }
        }
        assert!(arrived, "the gateway's packet did not reach site-y on B");

        // site-y answers; B relays to A, A sends it to the gateway.
        let mut answer = ping(ya, backend, 3);
        answer[20] = 0;
        let mut back = false;
        for _ in 0..10 {
            ty.send_packet(&answer);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
            while let Ok(Ok((n, _))) =
                tokio::time::timeout_at(deadline, socket.recv_from(&mut out)).await
            {
                if let TunnResult::WriteToTunnelV4(p, _) =
                    tunn.decapsulate(None, &out[..n], &mut buf)
                {
                    let p = Packet::parse(p).unwrap();
                    if (p.src, p.dst) == (IpAddr::V4(ya), IpAddr::V4(backend)) {
                        back = true;
                        break;
                    }
                }
            }
            if back {
                break;
            }
        }
        assert!(back, "site-y's answer did not reach the gateway on A");
        drop(ty);
        b.running.take().unwrap().shutdown().await;
        a.running.take().unwrap().shutdown().await;
    })
    .await
    .expect("test finished in time");
    drop(server);
}
