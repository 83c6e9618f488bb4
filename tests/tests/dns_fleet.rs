//! Identity DNS in a fleet (a real etcd, started per test): every broker
//! answers a site's names alike, the SRV records of the services the site
//! announced in its session included, whichever broker holds the session;
//! and the SRV records go everywhere when the session ends, or when the
//! broker holding it dies (`SIGKILL` of a broker in a child process: this
//! test binary run again with `DNS_FLEET_CHILD_CONFIG` set, executing only
//! [`child_broker`]) and its etcd lease expires.
//!
//! ```text
//!                 etcd (127.0.0.1, per test)
//!                /                          \
//!        broker A (in-process,       broker B (in-process)
//!         or a child, kill -9)
//!         |      DNS <- queries ->      DNS
//!      hospital-a (H3, announces its services)
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tether::dial::Target;
use tether::h3client::quic_config;
use tether::link::{BrokerConn, Dialer, Tunnel, TunnelLink};
use tether_config::Endpoint;
use tether_proto::dns::Service;
use tether_proto::tunnel::Transport;
use tether_shell::quic::transport_config;
use tether_tests::child_broker::{ChildBroker, data_dir_with_ca, serve_child};
use tether_tests::etcd::EtcdServer;
use tether_tests::{TestBroker, TestSite};

/// Deadline of the test body.
const TEST_DEADLINE: Duration = Duration::from_secs(120);
/// How long a name may take to look alike everywhere (the fleet's owner
/// record and the site's event reach the other broker through etcd's
/// watch; the zone follows within a second).
const CONVERGE: Duration = Duration::from_secs(30);

/// Environment variable naming the configuration a child broker runs.
const CHILD: &str = "DNS_FLEET_CHILD_CONFIG";

const SITE: &str = "hospital-a.local.tether.internal.";
const DICOM: &str = "_dicom._tcp.hospital-a.local.tether.internal.";
const HTTP: &str = "_http._tcp.hospital-a.local.tether.internal.";

/// Not a test on its own: the body of a broker in a child process (one
/// that can be killed with `kill -9`). Without `DNS_FLEET_CHILD_CONFIG` it
/// does nothing.
#[tokio::test]
async fn child_broker() {
    serve_child(CHILD).await;
}

/// One query over UDP to `server`.
fn ask(server: SocketAddr, name: &str, qtype: RecordType) -> Message {
    let mut m = Message::new(0x5e5e, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    socket.send_to(&m.to_vec().unwrap(), server).unwrap();
    let mut buf = vec![0u8; 65_535];
    let (n, _) = socket.recv_from(&mut buf).expect("no DNS answer");
    Message::from_vec(&buf[..n]).unwrap()
}

/// What an answer says, as a user compares it: the response code, the
/// answers and the additional records.
fn said(m: &Message) -> (ResponseCode, Vec<Record>, Vec<Record>) {
    (
        m.metadata.response_code,
        m.answers.clone(),
        m.additionals.clone(),
    )
}

/// Asks `server` until `ok` holds for the answer; bounded by [`CONVERGE`]
/// after `since` (the change awaited), and printed as time since then.
async fn ask_until(
    server: SocketAddr,
    name: &'static str,
    qtype: RecordType,
    (what, since): (&str, Instant),
    ok: impl Fn(&Message) -> bool,
) -> Message {
    loop {
        let m = tokio::task::spawn_blocking(move || ask(server, name, qtype))
            .await
            .unwrap();
        if ok(&m) {
            eprintln!("{what}: after {:?}", since.elapsed());
            return m;
        }
        assert!(
            since.elapsed() < CONVERGE,
            "{what}: {server} still answers {name} {qtype} with {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asks both brokers the same question and asserts the same answer.
async fn same_at_both(a: SocketAddr, b: SocketAddr, name: &str, qtype: RecordType) -> Message {
    let n = name.to_string();
    let (at_a, at_b) = tokio::task::spawn_blocking(move || (ask(a, &n, qtype), ask(b, &n, qtype)))
        .await
        .unwrap();
    assert_eq!(
        said(&at_a),
        said(&at_b),
        "{name} {qtype}: A and B answer differently"
    );
    at_a
}

/// The SRV records of an answer: (port, target).
fn srv(m: &Message) -> Vec<(u16, String)> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some((s.port, s.target.to_string())),
            _ => None,
        })
        .collect()
}

/// The A and AAAA addresses of a section.
fn addresses(records: &[Record]) -> Vec<IpAddr> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

/// A site's open tunnel.
struct Connected {
    conn: BrokerConn,
    _tunnel: Tunnel,
    _link: TunnelLink,
}

/// The site's tunnel to the broker at `addr` over HTTP/3, announcing
/// `services`, as the agent opens it.
async fn connect_announcing(addr: SocketAddr, site: &TestSite, services: &str) -> Connected {
    let (chain, key, ca) = site.identity();
    let tls = tether_pki::tls::client_config(&ca, Some((chain, key))).unwrap();
    let quic = quic_config(
        tls.clone(),
        transport_config(Duration::from_secs(2), Duration::from_secs(10)),
    )
    .unwrap();
    let dialer = Dialer {
        tls,
        quic,
        proxy: None,
        timeout: Duration::from_secs(5),
        keepalive: Duration::from_secs(2),
        narrow_paths: Default::default(),
    };
    let target = Target {
        endpoint: Endpoint::parse(&addr.to_string(), 443).unwrap(),
        addr,
        server_name: addr.ip().to_string(),
    };
    let conn = dialer
        .dial(Transport::H3, &target)
        .await
        .map_err(|f| f.message)
        .unwrap();
    let services = Service::parse_list(services).unwrap();
    let (tunnel, link) = conn
        .open_tunnel(&addr.to_string(), Duration::from_secs(5), &services)
        .await
        .map_err(|f| f.message)
        .unwrap();
    Connected {
        conn,
        _tunnel: tunnel,
        _link: link,
    }
}

/// An etcd server for brokers sharing `prefix`, and the broker
/// configuration that stores there and peers on loopback; `None` where
/// etcd is not installed (the test then passes without running).
async fn fleet_store(prefix: &str) -> Option<(EtcdServer, String)> {
    let server = tokio::task::spawn_blocking(|| EtcdServer::start(false))
        .await
        .unwrap()?;
    let extra = format!(
        "{}[peering]\nlisten = \"127.0.0.1:0\"\n",
        server.broker_toml(prefix)
    );
    Some((server, extra))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_broker_answers_a_sites_srv_names_alike_while_it_is_connected() {
    let Some((server, extra)) = fleet_store("/tether/dns-fleet/").await else {
        return;
    };
    tokio::time::timeout(TEST_DEADLINE, async {
        let a = TestBroker::start(&extra).await;
        // B shares A's CA, as the brokers of a deployment do.
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        data_dir_with_ca(a.config.data_dir.as_ref().unwrap(), &data);
        let b = TestBroker::start_with(&extra, |c| c.data_dir = Some(data.clone())).await;
        let dns_a = a.running.as_ref().unwrap().dns_addrs[0];
        let dns_b = b.running.as_ref().unwrap().dns_addrs[0];

        // Enrolled, not connected: the site's name everywhere, no SRV.
        let enrolled = Instant::now();
        let site = TestSite::enroll(&a, "hospital-a").await;
        let id: tether_proto::SiteId = "hospital-a".parse().unwrap();
        for dns in [dns_a, dns_b] {
            ask_until(dns, SITE, RecordType::A, ("name enrolled", enrolled), |m| {
                m.metadata.response_code == ResponseCode::NoError
            })
            .await;
            let m = tokio::task::spawn_blocking(move || ask(dns, DICOM, RecordType::SRV))
                .await
                .unwrap();
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{m:?}");
        }

        // Connected at A, announcing two services.
        let connected = Instant::now();
        let site_at_a = connect_announcing(a.addr(), &site, "dicom=104,http=8080").await;
        let holder = a.broker().fleet().unwrap().id().unwrap();
        assert!(a.broker().session(&id).is_some());
        assert!(b.broker().session(&id).is_none());
        for (dns, what) in [(dns_a, "SRV at A (holds the session)"), (dns_b, "SRV at B")] {
            let what = (what, connected);
            ask_until(dns, DICOM, RecordType::SRV, what, |m| !srv(m).is_empty()).await;
            ask_until(dns, HTTP, RecordType::SRV, what, |m| !srv(m).is_empty()).await;
        }
        eprintln!("hospital-a held by {holder}");

        // The same answers from both brokers: SRV with the address in the
        // additional section, A, AAAA, PTR.
        let m = same_at_both(dns_a, dns_b, DICOM, RecordType::SRV).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert_eq!(srv(&m), [(104, SITE.to_string())]);
        let m = same_at_both(dns_a, dns_b, HTTP, RecordType::SRV).await;
        assert_eq!(srv(&m), [(8080, SITE.to_string())]);
        let mut glue = addresses(&m.additionals);
        glue.sort();
        let v4 = same_at_both(dns_a, dns_b, SITE, RecordType::A).await;
        let v6 = same_at_both(dns_a, dns_b, SITE, RecordType::AAAA).await;
        let mut expected = addresses(&v4.answers);
        expected.extend(addresses(&v6.answers));
        expected.sort();
        assert_eq!(expected.len(), 2, "{v4:?} {v6:?}");
        assert_eq!(glue, expected, "the SRV's additional section");
        for addr in &expected {
            let reverse = Name::from(*addr).to_string();
            let m = same_at_both(dns_a, dns_b, &reverse, RecordType::PTR).await;
            assert!(
                matches!(&m.answers[..], [r] if matches!(&r.data, RData::PTR(p) if p.0.to_string() == SITE)),
                "{m:?}"
            );
        }
        // A service the site did not announce is nowhere.
        let m = same_at_both(
            dns_a,
            dns_b,
            "_pacs._tcp.hospital-a.local.tether.internal.",
            RecordType::SRV,
        )
        .await;
        assert!(srv(&m).is_empty(), "{m:?}");

        // Disconnected: the SRV names go at both brokers; the site's own
        // names stay (a site's name is its identity, not its liveness).
        let closed = Instant::now();
        site_at_a.conn.close("the site goes away");
        for (dns, what) in [(dns_a, "SRV gone at A"), (dns_b, "SRV gone at B")] {
            let what = (what, closed);
            ask_until(dns, DICOM, RecordType::SRV, what, |m| {
                m.metadata.response_code == ResponseCode::NXDomain
            })
            .await;
            ask_until(dns, HTTP, RecordType::SRV, what, |m| {
                m.metadata.response_code == ResponseCode::NXDomain
            })
            .await;
        }
        let m = same_at_both(dns_a, dns_b, SITE, RecordType::A).await;
        assert_eq!(addresses(&m.answers), addresses(&v4.answers));

        // Connected again at B, with one service: the new services at both.
        let connected = Instant::now();
        let site_at_b = connect_announcing(b.addr(), &site, "dicom=11112").await;
        assert!(b.broker().session(&id).is_some());
        for (dns, what) in [(dns_a, "new SRV at A"), (dns_b, "new SRV at B (holds it)")] {
            let what = (what, connected);
            ask_until(dns, DICOM, RecordType::SRV, what, |m| {
                srv(m) == [(11112, SITE.to_string())]
            })
            .await;
        }
        let m = same_at_both(dns_a, dns_b, HTTP, RecordType::SRV).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{m:?}");
        drop((site_at_a, site_at_b, dir));
    })
    .await
    .expect("test finished in time");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_srv_names_go_everywhere_when_the_holding_broker_dies() {
    let Some((server, extra)) = fleet_store("/tether/dns-fleet-kill/").await else {
        return;
    };
    tokio::time::timeout(TEST_DEADLINE, async {
        let b = TestBroker::start(&extra).await;
        let mut a = ChildBroker::start(CHILD, &extra, b.config.data_dir.as_ref().unwrap());
        let dns_b = b.running.as_ref().unwrap().dns_addrs[0];
        let site = TestSite::enroll(&b, "hospital-a").await;

        // Connected at A (the child): B answers its SRV.
        let connected = Instant::now();
        let _site_at_a = connect_announcing(a.addr, &site, "dicom=104").await;
        let m = ask_until(
            dns_b,
            DICOM,
            RecordType::SRV,
            ("SRV at B", connected),
            |m| !srv(m).is_empty(),
        )
        .await;
        assert_eq!(srv(&m), [(104, SITE.to_string())]);
        let v4 = tokio::task::spawn_blocking(move || ask(dns_b, SITE, RecordType::A))
            .await
            .unwrap();
        assert_eq!(addresses(&v4.answers).len(), 1, "{v4:?}");

        // A dies without a word: once its lease has expired, B answers
        // NXDOMAIN for the service; the site's name stays.
        let killed = Instant::now();
        a.kill();
        ask_until(
            dns_b,
            DICOM,
            RecordType::SRV,
            ("SRV gone at B after A was killed", killed),
            |m| m.metadata.response_code == ResponseCode::NXDomain,
        )
        .await;
        let m = tokio::task::spawn_blocking(move || ask(dns_b, SITE, RecordType::A))
            .await
            .unwrap();
        assert_eq!(addresses(&m.answers), addresses(&v4.answers));
    })
    .await
    .expect("test finished in time");
    drop(server);
}
