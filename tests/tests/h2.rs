//! CONNECT-IP over HTTP/2 (RFC 8441 extended CONNECT, DATAGRAM capsules)
//! against a real broker on loopback, with the agent's own HTTP/2 client:
//! the same identity rules, the same address, and packets between an
//! HTTP/2 site and an HTTP/3 site.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use tether::dial::Target;
use tether::h3client::quic_config;
use tether::link::{BrokerConn, Dialer, Tunnel, TunnelLink};
use tether_config::Endpoint;
use tether_proto::agent::ClientSession;
use tether_proto::api::{RENEW_PATH, RenewRequest, RenewResponse};
use tether_proto::capsule::{Capsule, CapsuleDecoder};
use tether_proto::datagram::{self, Payload};
use tether_proto::ip::Packet;
use tether_proto::net::Family;
use tether_proto::tunnel::Transport;
use tether_shell::quic::transport_config;
use tether_tests::{TestBroker, TestSite, connect, metric, ping};

fn dialer(site: Option<&TestSite>, ca: &rustls::pki_types::CertificateDer<'static>) -> Dialer {
    let identity = site.map(|s| {
        let (chain, key, _) = s.identity();
        (chain, key)
    });
    let tls = tether_pki::tls::client_config(ca, identity).unwrap();
    let quic = quic_config(
        tls.clone(),
        transport_config(Duration::from_secs(2), Duration::from_secs(10)),
    )
    .unwrap();
    Dialer {
        tls,
        quic,
        proxy: None,
        timeout: Duration::from_secs(5),
        keepalive: Duration::from_secs(2),
        narrow_paths: Default::default(),
    }
}

fn target(broker: &TestBroker) -> Target {
    let addr = broker.addr();
    Target {
        endpoint: Endpoint::parse(&addr.to_string(), 443).unwrap(),
        addr,
        server_name: addr.ip().to_string(),
    }
}

/// A tunnel over HTTP/2 with its capsule state.
struct H2Site {
    conn: BrokerConn,
    tunnel: Tunnel,
    link: TunnelLink,
    session: ClientSession,
    capsules: CapsuleDecoder,
    packets: Vec<Vec<u8>>,
}

impl H2Site {
    async fn open(broker: &TestBroker, site: &TestSite) -> Result<Self, String> {
        let (_, _, ca) = site.identity();
        let conn = dialer(Some(site), &ca)
            .dial(Transport::H2, &target(broker))
            .await
            .map_err(|f| f.message)?;
        assert_eq!(conn.transport(), Transport::H2);
        // Sites announce their services on HTTP/2 as on HTTP/3.
        let services = tether_proto::dns::Service::parse_list("http=8080").unwrap();
        let (tunnel, link) = conn
            .open_tunnel(
                &broker.addr().to_string(),
                Duration::from_secs(5),
                &services,
            )
            .await
            .map_err(|f| f.message)?;
        Ok(Self {
            conn,
            tunnel,
            link,
            session: ClientSession::default(),
            capsules: CapsuleDecoder::default(),
            packets: Vec::new(),
        })
    }

    /// Reads the stream until `done` holds.
    async fn until(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !done(self) {
            let data = tokio::time::timeout_at(deadline, self.tunnel.read())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .unwrap()
                .expect("the broker ended the tunnel");
            self.capsules.push(&data);
            while let Some(raw) = self.capsules.next_capsule().unwrap() {
                match Capsule::parse(raw).unwrap() {
                    Capsule::Datagram(payload) => {
                        if let Ok(Payload::IpPacket(p)) = datagram::parse_payload(&payload) {
                            self.packets.push(p.to_vec());
                        }
                    }
                    other => {
                        self.session.on_capsule(other);
                    }
                }
            }
        }
    }

    fn v4(&self) -> Ipv4Addr {
        match self.session.host_address(Family::V4) {
            Some(IpAddr::V4(a)) => a,
            other => panic!("no IPv4 address: {other:?}"),
        }
    }

    fn send(&self, packet: &[u8]) {
        let headroom = self.link.headroom();
        let mut buf = vec![0u8; headroom];
        buf.extend_from_slice(packet);
        self.link.send(&mut buf).unwrap();
    }
}

#[tokio::test]
async fn a_site_over_http2_keeps_its_address_and_reaches_http3_sites() {
    let broker = TestBroker::start(
        "[[policy.allow]]\nname = \"a-and-b\"\nfrom = [\"site:site-a\", \"site:site-b\"]\nto = [\"site:site-a\", \"site:site-b\"]\n",
    )
    .await;
    let a = TestSite::enroll(&broker, "site-a").await;
    let b = TestSite::enroll(&broker, "site-b").await;

    // Site A over HTTP/3 first, to learn its address.
    let (chain, key, ca) = a.identity();
    let client = connect(broker.addr(), &ca, Some((chain, key)))
        .await
        .unwrap();
    let mut ta = tether_tests::Tunnel::open(client).await.unwrap();
    ta.configured().await;
    let h3_addr = ta.session.host_address(Family::V4).unwrap();
    drop(ta);

    let sessions = |t: &str| metric(&format!("tether_broker_sessions{{transport=\"{t}\"}}"));
    let fallbacks = metric("tether_broker_transport_changes_total{change=\"fallback\"}");
    // The same site over HTTP/2: the same address, the same routes.
    let mut ha = H2Site::open(&broker, &a).await.unwrap();
    ha.until("addresses and routes", |s| {
        !s.session.addresses().is_empty() && !s.session.routes().is_empty()
    })
    .await;
    assert_eq!(IpAddr::V4(ha.v4()), h3_addr);
    assert!(sessions("h2") >= 1.0);
    let announced = broker
        .broker()
        .session(&"site-a".parse().unwrap())
        .unwrap()
        .services
        .clone();
    assert_eq!(
        tether_proto::dns::Service::format_list(&announced),
        "http=8080"
    );
    assert!(
        metric("tether_broker_transport_changes_total{change=\"fallback\"}") >= fallbacks + 1.0,
        "HTTP/3 then HTTP/2 counts as a fallback"
    );
    let info = broker
        .broker()
        .session(&"site-a".parse().unwrap())
        .unwrap()
        .info();
    assert_eq!(info.transport, "h2");

    // Site B over HTTP/3; packets both ways through the broker.
    let (chain, key, ca) = b.identity();
    let client = connect(broker.addr(), &ca, Some((chain, key)))
        .await
        .unwrap();
    let mut tb = tether_tests::Tunnel::open(client).await.unwrap();
    tb.configured().await;
    let addr_b = match tb.session.host_address(Family::V4) {
        Some(IpAddr::V4(a)) => a,
        other => panic!("{other:?}"),
    };
    let addr_a = ha.v4();
    ha.send(&ping(addr_a, addr_b, 1));
    let got = tb
        .recv_packet(Duration::from_secs(5))
        .await
        .expect("HTTP/2 -> HTTP/3");
    let p = Packet::parse(&got).unwrap();
    assert_eq!(
        (p.src, p.dst, p.ttl),
        (IpAddr::V4(addr_a), IpAddr::V4(addr_b), 63)
    );
    tb.send_packet(&ping(addr_b, addr_a, 2));
    ha.until("a packet from site B", |s| !s.packets.is_empty())
        .await;
    let p = Packet::parse(&ha.packets[0]).unwrap();
    assert_eq!((p.src, p.dst), (IpAddr::V4(addr_b), IpAddr::V4(addr_a)));

    // Spoofing over HTTP/2 is dropped like over HTTP/3.
    let before = metric("tether_broker_packets_dropped_total{reason=\"spoofed\"}");
    ha.send(&ping(Ipv4Addr::new(100, 64, 250, 250), addr_b, 3));
    assert!(tb.recv_packet(Duration::from_millis(500)).await.is_none());
    assert!(metric("tether_broker_packets_dropped_total{reason=\"spoofed\"}") >= before + 1.0);

    // Renewal works over HTTP/2 too.
    let (_, csr) = tether_pki::ca::site_key_and_csr("site-a").unwrap();
    let body = serde_json::to_vec(&RenewRequest {
        csr: data_encoding::BASE64.encode(&csr),
    })
    .unwrap();
    let (status, answer) = ha
        .conn
        .request("POST", &broker.addr().to_string(), RENEW_PATH, &body)
        .await
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    let renewed: RenewResponse = serde_json::from_slice(&answer).unwrap();
    assert!(renewed.certificate.contains("BEGIN CERTIFICATE"));
}

#[tokio::test]
async fn a_replaced_http2_connection_carries_the_sites_packets_until_it_has_moved() {
    let broker = TestBroker::start(
        "[[policy.allow]]\nname = \"a-and-b\"\nfrom = [\"site:site-a\", \"site:site-b\"]\nto = [\"site:site-a\", \"site:site-b\"]\n",
    )
    .await;
    let a = TestSite::enroll(&broker, "site-a").await;
    let b = TestSite::enroll(&broker, "site-b").await;
    let tb = tether_tests::tunnel_for(&broker, &b).await;
    let addr_b = tether_tests::v4(&tb);
    let configured = |s: &H2Site| !s.session.addresses().is_empty();
    let mut old = H2Site::open(&broker, &a).await.unwrap();
    old.until("addresses", configured).await;
    let addr_a = old.v4();

    // The site moves its tunnel to a new HTTP/2 connection (as after a
    // renewal): the new session replaces the old and holds the routes.
    let mut new = H2Site::open(&broker, &a).await.unwrap();
    new.until("addresses", configured).await;
    assert_eq!(new.v4(), addr_a);
    tb.send_packet(&ping(addr_b, addr_a, 1));
    new.until("a packet on the new connection", |s| !s.packets.is_empty())
        .await;

    // Until the site has moved, it still sends on the old connection:
    // what it sends there is delivered, not dropped with the connection.
    for seq in 2..5 {
        let mut buf = vec![0u8; old.link.headroom()];
        buf.extend_from_slice(&ping(addr_a, addr_b, seq));
        old.link
            .send(&mut buf)
            .expect("the broker closed the replaced connection at once");
        let p = tb
            .recv_packet(Duration::from_secs(2))
            .await
            .unwrap_or_else(|| panic!("packet {seq} sent on the replaced connection was lost"));
        let p = Packet::parse(&p).unwrap();
        assert_eq!((p.src, p.dst), (IpAddr::V4(addr_a), IpAddr::V4(addr_b)));
    }

    // Then the broker closes it by itself, well before the agent would.
    tokio::time::timeout(
        tether_proto::agent::liveness::RETIRE_AFTER + Duration::from_secs(1),
        old.conn.closed(),
    )
    .await
    .expect("the replaced connection was never closed");
    // The new session is untouched.
    tb.send_packet(&ping(addr_b, addr_a, 9));
    new.until("a packet after the old connection closed", |s| {
        s.packets.len() >= 2
    })
    .await;
}

#[tokio::test]
async fn http2_applies_the_same_identity_rules() {
    let broker = TestBroker::start("").await;
    let site = TestSite::enroll(&broker, "site-c").await;
    let (_, _, ca) = site.identity();

    // No certificate: 401, and nothing is allocated.
    let before = broker
        .broker()
        .store
        .region_leases(&"local".parse().unwrap())
        .unwrap();
    let conn = dialer(None, &ca)
        .dial(Transport::H2, &target(&broker))
        .await
        .unwrap();
    let err = conn
        .open_tunnel(&broker.addr().to_string(), Duration::from_secs(5), &[])
        .await
        .err()
        .expect("refused");
    assert!(err.refused && err.message.contains("HTTP 401"), "{err}");
    let after = broker
        .broker()
        .store
        .region_leases(&"local".parse().unwrap())
        .unwrap();
    assert_eq!(before, after, "a refused request must not allocate");

    // A live HTTP/2 tunnel ends when the site is revoked, and the site
    // cannot come back.
    let mut live = H2Site::open(&broker, &site).await.unwrap();
    live.until("addresses", |s| !s.session.addresses().is_empty())
        .await;
    let b = broker.broker().clone();
    tokio::task::spawn_blocking(move || {
        b.revoke_site(&"site-c".parse().unwrap(), &"local".parse().unwrap())
    })
    .await
    .unwrap()
    .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        while let Ok(Some(_)) = live.tunnel.read().await {}
    })
    .await;
    assert!(ended.is_ok(), "the revoked tunnel must end within 3 s");
    let again = H2Site::open(&broker, &site).await;
    assert!(again.is_err(), "a revoked site must not open a tunnel");
}
