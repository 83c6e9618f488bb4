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
//!
//! Both run over HTTP/3 and again with every connection on HTTP/2 (the
//! tunnels and the standbys), site-1 through an HTTP proxy in (b). A
//! killed process's TCP connections are closed by the kernel, which a site
//! notices at once; a broker machine that loses power or its network
//! closes nothing, so over HTTP/2 most rounds of (a) freeze X (`SIGSTOP`)
//! instead, and only the heartbeat can tell.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tether::dial::Target;
use tether::link::{BrokerConn, Dialer, Tunnel, TunnelLink};
use tether::proxy::Proxy;
use tether::state_dir::StateDir;
use tether_config::client::{ClientConfig, ClientFile};
use tether_proto::agent::ClientSession;
use tether_proto::agent::liveness::{HEARTBEAT_INTERVAL, LIVENESS_CHECK, Liveness};
use tether_proto::capsule::{Capsule, CapsuleDecoder};
use tether_proto::datagram::{self, Payload};
use tether_proto::net::Family;
use tether_proto::tunnel::Transport;
use tether_tests::child_broker::{ChildBroker, child_config};
use tether_tests::etcd::EtcdServer;
use tether_tests::{TestBroker, ping};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    /// The sender whose pings are reported.
    from: Arc<AtomicU32>,
    /// Over HTTP/3 (over HTTP/2 the reader holds it).
    _tunnel: Option<Tunnel>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Active {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The sequence number of an ICMP echo request from `from` in `payload`.
fn echo_from(payload: &[u8], from: &AtomicU32) -> Option<u16> {
    let Ok(Payload::IpPacket(p)) = datagram::parse_payload(payload) else {
        return None;
    };
    (p.len() >= 28 && p[12..16] == from.load(Ordering::Relaxed).to_be_bytes() && p[20] == 8)
        .then(|| u16::from_be_bytes([p[26], p[27]]))
}

/// The ICMP echo sequence numbers the site receives from `from`: QUIC
/// datagrams of `conn` over HTTP/3, DATAGRAM capsules of `tunnel` (with
/// what `capsules` already holds) over HTTP/2.
fn read_pings(
    conn: &BrokerConn,
    tunnel: Option<(Tunnel, CapsuleDecoder)>,
    from: Arc<AtomicU32>,
    out: mpsc::UnboundedSender<(u16, Instant)>,
) -> tokio::task::JoinHandle<()> {
    match conn {
        BrokerConn::H3 { client, .. } => {
            let conn = client.conn.clone();
            tokio::spawn(async move {
                while let Ok(d) = conn.read_datagram().await {
                    if let Ok((_, payload)) = datagram::parse_h3(&d)
                        && let Some(seq) = echo_from(payload, &from)
                    {
                        let _ = out.send((seq, Instant::now()));
                    }
                }
            })
        }
        BrokerConn::H2(_) => {
            let (mut tunnel, mut capsules) = tunnel.expect("the HTTP/2 tunnel");
            tokio::spawn(async move {
                loop {
                    while let Ok(Some(raw)) = capsules.next_capsule() {
                        if let Ok(Capsule::Datagram(payload)) = Capsule::parse(raw)
                            && let Some(seq) = echo_from(&payload, &from)
                        {
                            let _ = out.send((seq, Instant::now()));
                        }
                    }
                    match tunnel.read().await {
                        Ok(Some(data)) => capsules.push(&data),
                        _ => return,
                    }
                }
            })
        }
    }
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
        while session.host_address(Family::V4).is_none()
            && let Some(raw) = capsules.next_capsule().unwrap()
        {
            session.on_capsule(Capsule::parse(raw).unwrap());
        }
    }
    let Some(IpAddr::V4(address)) = session.host_address(Family::V4) else {
        panic!("no IPv4 address")
    };
    let from = Arc::new(AtomicU32::new(u32::from(pings_from)));
    let (reader, tunnel) = match &*conn {
        BrokerConn::H3 { .. } => (
            read_pings(&conn, None, from.clone(), pings.clone()),
            Some(tunnel),
        ),
        BrokerConn::H2(_) => (
            read_pings(&conn, Some((tunnel, capsules)), from.clone(), pings.clone()),
            None,
        ),
    };
    Active {
        conn,
        target,
        link,
        address,
        from,
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

/// When each ping was sent, by sequence number.
type SentAt = Arc<std::sync::Mutex<std::collections::HashMap<u16, Instant>>>;

/// Sends a ping from `from` to `to` every 10 ms on the current link,
/// numbered from `first`, `count` of them, noting when each left in
/// `sent`.
fn ping_every_10ms(
    link: watch::Receiver<TunnelLink>,
    from: Ipv4Addr,
    to: Ipv4Addr,
    (first, count): (u16, u16),
    sent: SentAt,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        for seq in first..first + count {
            tick.tick().await;
            let link = link.borrow().clone();
            let mut buf = vec![0u8; link.headroom()];
            buf.extend_from_slice(&ping(from, to, seq));
            sent.lock().unwrap().insert(seq, Instant::now());
            let _ = link.send(&mut buf);
        }
    })
}

/// Runs the agent's loss detection on `active` while a standby is ready:
/// a heartbeat every [`HEARTBEAT_INTERVAL`], the received count every
/// [`LIVENESS_CHECK`] (when the transport tells one), and the end of the
/// connection; returns when the broker is lost, with how long it was
/// silent, or `None` when the connection ended.
async fn until_lost(conn: &BrokerConn) -> Option<Duration> {
    let heartbeat = async {
        let mut liveness: Option<Liveness> = None;
        let mut next_heartbeat = Instant::now();
        loop {
            let now = Instant::now();
            if now >= next_heartbeat {
                conn.heartbeat().await;
                next_heartbeat = now + HEARTBEAT_INTERVAL;
            }
            if let Some(received) = conn.received() {
                let l = liveness.get_or_insert(Liveness::new(received, now));
                l.handle_received(received, now);
                if l.is_lost(conn.rtt(), now) {
                    return now.saturating_duration_since(l.heard_at());
                }
            }
            tokio::time::sleep(LIVENESS_CHECK).await;
        }
    };
    tokio::select! {
        silent = heartbeat => Some(silent),
        _ = conn.closed() => None,
        () = tokio::time::sleep(Duration::from_secs(60)) => panic!("no loss noticed in 60 s"),
    }
}

/// An HTTP proxy for CONNECT on loopback: one tunnel per connection.
async fn connect_proxy() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if head.len() > 8192 || client.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head);
                let Some(target) = head
                    .strip_prefix("CONNECT ")
                    .and_then(|r| r.split(' ').next())
                else {
                    return;
                };
                let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                if client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .is_ok()
                {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
        }
    });
    (addr, task)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_fails_over_within_a_second_and_moves_without_loss_on_sigterm() {
    failover_and_handover(Transport::H3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_site_fails_over_within_a_second_and_moves_without_loss_on_sigterm() {
    failover_and_handover(Transport::H2).await;
}

/// How X fails in a round of (a).
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// `kill -9`: its sockets close.
    Kill,
    /// `SIGSTOP`: it answers nothing, and closes nothing (as a machine
    /// that lost power or its network); killed after the round.
    Freeze,
}

/// How X fails in each round of (a) on `transport`.
fn rounds(transport: Transport) -> Vec<Failure> {
    match transport {
        // A killed broker's QUIC connections are silent.
        Transport::H3 => vec![Failure::Kill; KILLS],
        // A killed broker's TCP connections close at once (and did before
        // the heartbeat); a frozen one only stops answering.
        _ => vec![
            Failure::Freeze,
            Failure::Kill,
            Failure::Freeze,
            Failure::Freeze,
            Failure::Kill,
        ],
    }
}

/// Sites on `transport` (HTTP/2: site-1 through an HTTP proxy in the
/// SIGTERM part) through a `kill -9`, a freeze and a SIGTERM of their
/// broker.
async fn failover_and_handover(transport: Transport) {
    let Some(server) = tokio::task::spawn_blocking(|| EtcdServer::start(false))
        .await
        .unwrap()
    else {
        return;
    };
    let extra = format!(
        "[tunnel]\ndrain_timeout = \"10s\"\n\
         {}[[policy.allow]]\nname = \"sites\"\nfrom = [\"site:site-1\", \"site:site-2\"]\nto = [\"site:site-1\", \"site:site-2\"]\n",
        server.broker_toml("/tether/failover/"),
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
        let conn = dialer2.dial(transport, &t).await.unwrap();
        assert_eq!(conn.transport(), transport);
        let two = open_on(conn, t, unspecified, &pings_tx).await;
        let address2 = two.address;

        // (a) kill -9 (or a freeze) of site 1's broker, several times.
        let mut gaps = Vec::new();
        let mut address1 = None;
        for (round, failure) in rounds(transport).into_iter().enumerate() {
            let mut x = ChildBroker::start(CHILD, &extra, &ca_dir);
            let (config1, dialer1) = site(&state1, &[x.addr, b_addr]).await;
            let t = target(&config1, x.addr).await;
            let conn = dialer1.dial(transport, &t).await.unwrap();
            let active = open_on(conn, t, unspecified, &pings_tx).await;
            let address = *address1.get_or_insert(active.address);
            assert_eq!(active.address, address, "the same address at every broker");
            // Site 2 reports pings from site 1 from now on.
            two.from.store(u32::from(address), Ordering::Relaxed);
            let (standby, standby_target) =
                tether::standby::dial(&dialer1, &config1, transport, &[x.addr])
                    .await
                    .unwrap();
            assert_eq!(standby.transport(), transport, "the standby on the same transport");
            assert_eq!(standby_target.addr, b_addr, "the standby is at B");
            // Site 1 pings site 2 every 10 ms: from X across the link
            // between the brokers, then from B. What X had not passed on
            // when it failed is lost; the gap ends with the first ping
            // sent after the failure that arrives.
            let (link_tx, link_rx) = watch::channel(active.link.clone());
            let first = (round as u16 + 1) * 1000;
            let sent = SentAt::default();
            let sender =
                ping_every_10ms(link_rx, address, address2, (first, 900), sent.clone());
            // A healthy second, then the kill.
            let watch_conn = active.conn.clone();
            let lost = tokio::spawn(async move { until_lost(&watch_conn).await });
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(!lost.is_finished(), "a live broker is not taken as lost");
            match failure {
                Failure::Kill => x.kill(),
                Failure::Freeze => x.freeze(),
            }
            // From when X is gone (or stopped): a ping sent before may
            // still have passed it.
            let killed = Instant::now();
            let silent = lost.await.unwrap();
            let noticed = killed.elapsed();
            if let Failure::Freeze = failure {
                assert!(silent.is_some(), "a frozen broker closes nothing");
            }
            let moved = open_on(standby, standby_target, unspecified, &pings_tx).await;
            assert_eq!(moved.address, address, "the same address at B");
            link_tx.send_replace(moved.link.clone());
            let restored = loop {
                let (seq, at) = tokio::time::timeout(Duration::from_secs(10), pings.recv())
                    .await
                    .expect("site 1's pings reach site 2 after the failover")
                    .unwrap();
                let sent_at = sent.lock().unwrap().get(&seq).copied();
                if seq >= first && sent_at.is_some_and(|t| t > killed) {
                    break at.saturating_duration_since(killed);
                }
            };
            sender.abort();
            let how = match silent {
                Some(silent) => format!("silent for {silent:?}"),
                None => "the connection closed".to_string(),
            };
            eprintln!(
                "FAILOVER {} round {} ({failure:?}): loss noticed {noticed:?} after the failure ({how}); pings flow again via B {restored:?} after it",
                transport.as_str(),
                round + 1
            );
            gaps.push(restored);
            drop((active, moved));
            x.kill();
        }
        gaps.sort();
        eprintln!(
            "FAILOVER {} gap over {} failures: p50 {:?}, max {:?}",
            transport.as_str(),
            gaps.len(),
            percentile(&gaps, 0.5),
            gaps[gaps.len() - 1]
        );
        assert!(
            gaps[gaps.len() - 1] < Duration::from_secs(5),
            "far below the idle timeout (12 s; over HTTP/2 three PING intervals, 15 s): {gaps:?}"
        );
        drop(two);

        // (b) SIGTERM of the broker holding both sites while site 1 pings
        // site 2 every 10 ms.
        let y = ChildBroker::start(CHILD, &extra, &ca_dir);
        let address1 = address1.unwrap();
        let mut movers = Vec::new();
        let (link_tx, link_rx) = watch::channel(None::<TunnelLink>);
        let (moved_tx, mut moved_rx) = mpsc::unbounded_channel();
        // Over HTTP/2, site 1 comes through a proxy.
        let (proxy_addr, proxy) = connect_proxy().await;
        for (state, from) in [(&state1, unspecified), (&state2, address1)] {
            let (config, mut dialer) = site(state, &[y.addr, b_addr]).await;
            let transport = match transport {
                Transport::H2 if from == unspecified => {
                    dialer.proxy = Some(Proxy::parse(&proxy_addr.to_string(), "test").unwrap());
                    Transport::H2Proxy
                }
                t => t,
            };
            let t = target(&config, y.addr).await;
            let conn = dialer.dial(transport, &t).await.unwrap();
            assert_eq!(conn.transport(), transport);
            let active = open_on(conn, t, from, &pings_tx).await;
            let (standby, standby_target) =
                tether::standby::dial(&dialer, &config, transport, &[y.addr])
                    .await
                    .unwrap();
            assert_eq!(standby.transport(), transport);
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
        let sender = ping_every_10ms(
            sender_link,
            address1,
            address2,
            (first, SENT),
            SentAt::default(),
        );
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
            "HANDOVER {}: both sites at B {moved_in:?} after SIGTERM; the broker drained in {} ms; {lost} of {SENT} pings (10 ms apart) lost",
            transport.as_str(),
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
        proxy.abort();
        b.running.take().unwrap().shutdown().await;
    })
    .await
    .expect("test finished in time");
    drop(server);
}
