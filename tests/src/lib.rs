//! Cross-crate tests without privileges: simulations and loopback
//! integration tests. The tests live in `tests/`; this library holds what
//! they share: a compare-and-set store for simulations, a real broker
//! on loopback with sites driven through the client library (no TUN device
//! needed), the real `tether-broker` binary run as an operator runs it
//! ([`real_broker`]), and a real etcd for the brokers of a fleet
//! ([`etcd`]).

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod child_broker;
pub mod etcd;
pub mod fleet_sim;
pub mod real_broker;
pub mod sim;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::{RecvStream, SendStream, VarInt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tether::h3client::{self, H3Client, quic_config};
use tether::state_dir::StateDir;
use tether_broker::run::Running;
use tether_broker::state::Broker;
use tether_config::broker::{BrokerConfig, BrokerFile};
use tether_proto::agent::{ClientEvent, ClientSession};
use tether_proto::capsule::{Capsule, CapsuleDecoder};
use tether_proto::datagram;
use tether_proto::h3::{MessageDecoder, MessageEvent};
use tether_proto::ipam::{Conflict, RegionLeases, Txn};
use tether_shell::quic::transport_config;

/// A compare-and-set store of one region's leases, shared by simulated
/// brokers: the contract the embedded store and etcd both provide.
#[derive(Debug, Default)]
pub struct CasStore {
    leases: Mutex<RegionLeases>,
}

impl CasStore {
    /// A consistent snapshot.
    pub fn snapshot(&self) -> RegionLeases {
        self.leases.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Applies `txn` if its expected version is current.
    pub fn commit(&self, txn: &Txn) -> Result<(), Conflict> {
        let mut leases = self.leases.lock().map_err(|_| Conflict {
            expected: txn.expected_version,
            found: u64::MAX,
        })?;
        leases.apply(txn)
    }
}

/// A broker on loopback with its own data directory.
pub struct TestBroker {
    /// The running broker (None while stopped).
    pub running: Option<Running>,
    /// Its configuration.
    pub config: BrokerConfig,
    /// The configuration's text.
    pub text: String,
    _dir: tempfile::TempDir,
}

impl TestBroker {
    /// Waits until the broker's route table holds a route for `prefix`:
    /// woken by the broker's route-change signal, not by a timer. Panics
    /// after `timeout`.
    pub async fn wait_for_route(&self, prefix: ipnet::IpNet, timeout: Duration) {
        let broker = self.broker().clone();
        // Subscribe before looking, so a change in between is not missed.
        let mut changes = broker.core().route_changes();
        let installed = tokio::time::timeout(timeout, async {
            loop {
                if !broker
                    .core()
                    .read()
                    .unwrap()
                    .table
                    .routes_for(prefix)
                    .is_empty()
                {
                    return;
                }
                if changes.changed().await.is_err() {
                    panic!("the broker stopped");
                }
            }
        })
        .await;
        assert!(installed.is_ok(), "no route for {prefix} after {timeout:?}");
    }

    /// Writes the configuration with `policy` appended to a file and has
    /// the running broker reload its access policy from it (as on SIGHUP).
    pub fn reload_policy(&self, policy: &str) -> anyhow::Result<usize> {
        let path = self._dir.path().join("broker.toml");
        std::fs::write(&path, format!("{}\n{policy}", self.text))?;
        tether_broker::access::reload(self.broker(), &path)
    }

    /// Starts a broker with `extra` appended to a loopback configuration.
    pub async fn start(extra: &str) -> Self {
        Self::start_with(extra, |_| {}).await
    }

    /// As [`start`](Self::start), with the validated configuration changed
    /// by `adjust` first (for values validation keeps out of production,
    /// such as certificate lifetimes of seconds).
    pub async fn start_with(extra: &str, adjust: impl FnOnce(&mut BrokerConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // DNS on a port of its own, so that brokers of parallel tests do
        // not collide on the default.
        let dns = if extra.contains("[dns]") {
            ""
        } else {
            "[dns]\nlisten = [\"127.0.0.1:0\"]\n"
        };
        let text = format!(
            "data_dir = {:?}\nlisten = [\"127.0.0.1:0\"]\nadvertised = [\"127.0.0.1\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n{dns}{extra}",
            dir.path().join("data")
        );
        let mut config = BrokerFile::parse(&text, "test")
            .unwrap()
            .validate("test")
            .unwrap();
        adjust(&mut config);
        let running = tether_broker::run::start(config.clone()).await.unwrap();
        Self {
            text,
            running: Some(running),
            config,
            _dir: dir,
        }
    }

    /// The broker state.
    pub fn broker(&self) -> &Arc<Broker> {
        &self.running.as_ref().unwrap().broker
    }

    /// The tunnel address.
    pub fn addr(&self) -> SocketAddr {
        self.running.as_ref().unwrap().tunnel_addrs[0]
    }

    /// A site's configuration pointing at this broker only.
    pub fn client_config(&self) -> tether_config::client::ClientConfig {
        tether_config::client::ClientFile {
            published_cidr: "127.0.0.0/8".into(),
            brokers: vec![self.addr().to_string()],
            ..tether_config::client::ClientFile::default()
        }
        .validate("test")
        .unwrap()
    }

    /// The Prometheus text of this broker's admin `/metrics`.
    pub async fn scrape(&self) -> String {
        let url = format!(
            "http://{}/metrics",
            self.running.as_ref().unwrap().admin_addr
        );
        tokio::task::spawn_blocking(move || {
            ureq::get(&url)
                .call()
                .unwrap()
                .body_mut()
                .read_to_string()
                .unwrap()
        })
        .await
        .unwrap()
    }

    /// Stops and starts again with the same data directory (and port).
    pub async fn restart(&mut self) {
        let addr = self.addr();
        self.running.take().unwrap().shutdown().await;
        let mut config = self.config.clone();
        config.listen = vec![addr];
        // The old socket may linger a moment.
        for _ in 0..50 {
            match tether_broker::run::start(config.clone()).await {
                Ok(r) => {
                    self.running = Some(r);
                    return;
                }
                Err(e) => {
                    eprintln!("restart: {e:#}");
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
            }
        }
        panic!("broker did not restart");
    }

    /// An enrollment code for a site of region `local`.
    pub async fn token(&self, site: &str) -> String {
        let broker = self.broker().clone();
        let site = site.parse().unwrap();
        tokio::task::spawn_blocking(move || {
            broker.create_token(&site, &"local".parse().unwrap(), None)
        })
        .await
        .unwrap()
        .unwrap()
        .code
    }
}

/// An enrolled site's state directory.
pub struct TestSite {
    /// Its state.
    pub state: StateDir,
    _dir: tempfile::TempDir,
}

impl TestSite {
    /// Enrolls `site` with `broker` through the real enrollment path.
    pub async fn enroll(broker: &TestBroker, site: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path().join("state"));
        let code = broker.token(site).await;
        tether::enroll::enroll(&broker.addr().to_string(), &code, &state, false, None)
            .await
            .unwrap();
        Self { state, _dir: dir }
    }

    /// Its certificate chain and key.
    pub fn identity(
        &self,
    ) -> (
        Vec<CertificateDer<'static>>,
        PrivateKeyDer<'static>,
        CertificateDer<'static>,
    ) {
        let c = self.state.credentials().unwrap();
        (c.chain, c.key, c.ca)
    }
}

/// Connects to the broker with an optional client identity.
/// The tunnel's own IPv4 address (panics without one).
pub fn v4(t: &Tunnel) -> std::net::Ipv4Addr {
    match t.session.host_address(tether_proto::net::Family::V4) {
        Some(std::net::IpAddr::V4(a)) => a,
        other => panic!("no IPv4 address: {other:?}"),
    }
}

/// A configured CONNECT-IP tunnel of `site` at `broker`.
pub async fn tunnel_for(broker: &TestBroker, site: &TestSite) -> Tunnel {
    let c = site.state.credentials().unwrap();
    let client = connect_trusting(broker.addr(), &c.bundle, Some((c.chain, c.key)))
        .await
        .unwrap();
    let mut t = Tunnel::open(client).await.unwrap();
    t.configured().await;
    t
}

pub async fn connect(
    broker: SocketAddr,
    ca: &CertificateDer<'static>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> anyhow::Result<H3Client> {
    connect_trusting(broker, std::slice::from_ref(ca), identity).await
}

/// As [`connect`], trusting every CA of a trust bundle and naming them to
/// the broker, as the agent does.
pub async fn connect_trusting(
    broker: SocketAddr,
    bundle: &[CertificateDer<'static>],
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> anyhow::Result<H3Client> {
    let tls = tether_pki::tls::client_config_trusting(bundle, identity, 0)?;
    let config = quic_config(
        tls,
        transport_config(Duration::from_secs(2), Duration::from_secs(10)),
    )?;
    let endpoint = tether::dial::client_endpoint(&broker)?;
    let mut client = H3Client::connect(&endpoint, config, broker, &broker.ip().to_string()).await?;
    client.peer_settings(Duration::from_secs(5)).await?;
    Ok(client)
}

/// Waits until `b` routes `addr` through another broker: woken by each
/// rebuild of those routes, bounded.
pub async fn wait_for_remote_route(b: &TestBroker, addr: std::net::Ipv4Addr) {
    let broker = b.broker().clone();
    let mut changes = broker.core().remote_route_changes();
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let known = broker
                .core()
                .read()
                .unwrap()
                .remote
                .lookup(std::net::IpAddr::V4(addr))
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

/// Sends `packet` from `from` until `to` receives a packet matching
/// `expect` (the first may wait for the link's handshake); bounded.
pub async fn deliver(
    from: &Tunnel,
    to: &Tunnel,
    packet: &[u8],
    expect: impl Fn(&tether_proto::ip::Packet) -> bool,
) {
    for _ in 0..10 {
        from.send_packet(packet);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Some(got) = to
            .recv_packet(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await
        {
            if tether_proto::ip::Packet::parse(&got).is_ok_and(|p| expect(&p)) {
                return;
            }
        }
    }
    panic!("the packet did not arrive through the other broker");
}

/// The path of a workspace binary (`tether-broker`, `tether`) next to the
/// test's own directory: `TETHER_BIN_DIR` if set, else the parent of the
/// test executable's `deps/`. Panics with the command to build it if it is
/// missing (`scripts/test` builds the binaries first).
pub fn binary(name: &str) -> std::path::PathBuf {
    let dir = match std::env::var_os("TETHER_BIN_DIR") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().unwrap();
            let dir = exe.parent().unwrap().to_path_buf();
            if dir.file_name().is_some_and(|n| n == "deps") {
                dir.parent().unwrap().to_path_buf()
            } else {
                dir
            }
        }
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`)",
        path.display()
    );
    path
}

/// A CONNECT-IP tunnel driven by hand.
pub struct Tunnel {
    /// The HTTP/3 connection.
    pub client: H3Client,
    /// The request stream.
    pub stream_id: u64,
    /// The site's session state (addresses, routes).
    pub session: ClientSession,
    _send: SendStream,
    recv: RecvStream,
    dec: MessageDecoder,
    capsules: CapsuleDecoder,
}

impl Tunnel {
    /// Sends CONNECT-IP; `Err((status, body))` when refused.
    pub async fn open(client: H3Client) -> Result<Tunnel, (u16, String)> {
        let authority = client.conn.remote_address().to_string();
        let (send, mut recv) = client
            .send(&tether_proto::connect_ip::request(&authority), &[])
            .await
            .map_err(|e| (0, e.to_string()))?;
        let mut dec = MessageDecoder::new(h3client::MAX_FIELD_SECTION);
        let head = h3client::read_head(&mut recv, &mut dec)
            .await
            .map_err(|e| (0, e.to_string()))?;
        if head.status != 200 {
            let mut body = Vec::new();
            loop {
                while let Ok(Some(MessageEvent::Data(d))) = dec.next_event() {
                    body.extend_from_slice(&d);
                }
                match recv.read_chunk(65536, true).await {
                    Ok(Some(chunk)) => dec.push(&chunk.bytes),
                    _ => break,
                }
            }
            return Err((head.status, String::from_utf8_lossy(&body).to_string()));
        }
        let stream_id = VarInt::from(recv.id()).into_inner();
        Ok(Tunnel {
            client,
            stream_id,
            session: ClientSession::default(),
            _send: send,
            recv,
            dec,
            capsules: CapsuleDecoder::default(),
        })
    }

    /// Reads capsules until both addresses and routes have arrived.
    pub async fn configured(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.session.addresses().is_empty() || self.session.routes().is_empty() {
            self.pump_events(deadline).await;
        }
    }

    /// The next capsule from the broker (applied to the session state too).
    pub async fn next_capsule(
        &mut self,
        deadline: tokio::time::Instant,
    ) -> (Capsule, Vec<ClientEvent>) {
        loop {
            while let Some(ev) = self.dec.next_event().unwrap() {
                if let MessageEvent::Data(d) = ev {
                    self.capsules.push(&d);
                }
            }
            if let Some(raw) = self.capsules.next_capsule().unwrap() {
                let capsule = Capsule::parse(raw).unwrap();
                let events = self.session.on_capsule(capsule.clone());
                return (capsule, events);
            }
            match tokio::time::timeout_at(deadline, self.recv.read_chunk(65536, true)).await {
                Ok(Ok(Some(chunk))) => self.dec.push(&chunk.bytes),
                _ => panic!("no capsule from the broker in time"),
            }
        }
    }

    /// Reads capsules until one changes the session; returns the events.
    pub async fn pump_events(&mut self, deadline: tokio::time::Instant) -> Vec<ClientEvent> {
        loop {
            let (_, events) = self.next_capsule(deadline).await;
            if !events.is_empty() {
                return events;
            }
        }
    }

    /// Sends a capsule on the request stream.
    pub async fn send_capsule(&mut self, capsule: &Capsule) {
        let mut bytes = Vec::new();
        capsule.encode(&mut bytes).unwrap();
        let mut out = Vec::new();
        tether_proto::h3::frame::encode_data_header(bytes.len(), &mut out);
        out.extend_from_slice(&bytes);
        self._send.write_all(&out).await.unwrap();
    }

    /// Sends an IP packet as a datagram.
    pub fn send_packet(&self, packet: &[u8]) {
        let mut out = Vec::new();
        datagram::encode_h3_ip_packet(self.stream_id, packet, &mut out);
        self.client.conn.send_datagram(out.into()).unwrap();
    }

    /// The next IP packet from the broker.
    pub async fn recv_packet(&self, timeout: Duration) -> Option<Vec<u8>> {
        let d = tokio::time::timeout(timeout, self.client.conn.read_datagram())
            .await
            .ok()?
            .ok()?;
        let (stream, payload) = datagram::parse_h3(&d).ok()?;
        assert_eq!(stream, self.stream_id);
        match datagram::parse_payload(payload).ok()? {
            datagram::Payload::IpPacket(p) => Some(p.to_vec()),
            datagram::Payload::UnknownContext(_) => None,
        }
    }
}

/// A metric's current value from the broker's Prometheus output.
pub fn metric(line_prefix: &str) -> f64 {
    metric_in(&tether_broker::metrics::recorder().render(), line_prefix)
}

/// The value of the first series in the Prometheus text `text` whose
/// line starts with `line_prefix` (0 if none).
pub fn metric_in(text: &str, line_prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// An ICMP echo request (IPv4) with a valid checksum.
pub fn ping(src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr, seq: u16) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34];
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(b"tether test payload");
    let sum = tether_proto::ip::checksum(&[&icmp]);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 1, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let sum = tether_proto::ip::checksum(&[&p[..20]]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(&icmp);
    p
}
