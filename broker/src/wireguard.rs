//! Gateways as WireGuard peers (boringtun).
//!
//! Each registered gateway (`[[gateway]]`) is a peer with its own
//! [`boringtun::noise::Tunn`]; all share the broker's key and UDP sockets
//! (port 51820 on the listen addresses by default). A peer's endpoint is
//! learned from its last authenticated packet, so gateways behind NAT work
//! as long as they send first (`tether-gateway` asks for routes at once;
//! stock peers need `PersistentKeepalive`).
//!
//! Packets decrypted from a peer enter the forwarding plane as gateway
//! ingress (its region and backend prefixes); packets routed to a peer are
//! encrypted and sent. Control datagrams between the link-local control
//! addresses ([`tether_proto::gateway`]) never reach the plane: a request
//! is answered with the route set of the peer's region (the sites of every
//! broker of the fleet it may reach,
//! [`tether_proto::forward::Router::gateway_site_routes`]), and every change
//! to the site routes, here or through another broker, is pushed to the
//! peers that asked recently. A ping is answered with a pong, so a gateway
//! that follows several brokers notices within a second when this one is
//! gone ([`tether_proto::gateway::failover`]). A gateway that asks for
//! the broker list is sent the gateway endpoints of the live brokers of its
//! region (this broker's first, the others' from the fleet) whenever the
//! version it holds is not the current one, on its request and on every
//! change to the fleet while it is subscribed
//! ([`tether_proto::gateway::brokers`]).
//!
//! This module knows nothing of the broker around it: the routes and the
//! zone come through [`GatewayControl`], and the forwarding plane runs the
//! receive loops ([`crate::plane::Plane::attach_wireguard`]), handing each
//! socket's [`Receiver`] to [`Wireguard::receive`].

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use boringtun::noise::{Packet, Tunn, TunnResult, errors::WireGuardError, handshake};
use boringtun::x25519;
use ipnet::IpNet;
use tether_config::broker::GatewayPeer;
use tether_pki::wg::WgKey;
use tether_proto::forward::DropReason;
use tether_proto::gateway::brokers::{self, BrokerList};
use tether_proto::gateway::{
    self as control, BROKER_CONTROL, GATEWAY_CONTROL, Message, RouteSet, SiteRoute,
};
use tether_proto::ids::{GatewayId, RegionId};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::counters::Counters;
use crate::metrics::Metrics;

/// What a gateway's control messages carry, from the rest of the broker.
pub trait GatewayControl: Send + Sync + 'static {
    /// The generation of the site routes, and the site routes a gateway of
    /// `region` may reach, sorted.
    fn site_routes(&self, region: &RegionId) -> (u64, Vec<SiteRoute>);
    /// The mesh zone as a gateway of `region` may see it, once there is
    /// one.
    fn zone(&self, region: &RegionId) -> Option<tether_proto::dns::ZoneData>;
    /// Bumped whenever a site route appears or goes.
    fn route_changes(&self) -> watch::Receiver<u64>;
    /// Changes to the mesh zone.
    fn zone_changes(&self) -> watch::Receiver<Option<Arc<tether_proto::dns::ZoneData>>>;
    /// Whether the broker is stopping (draining on SIGTERM): gateways are
    /// told to send their traffic to another broker.
    fn draining(&self) -> bool {
        false
    }
    /// Where gateway `gateway` of `region` reaches the live brokers of the
    /// region that have it registered, this broker first; empty when the
    /// broker knows none.
    fn gateway_brokers(&self, region: &RegionId, gateway: &GatewayId) -> Vec<SocketAddr> {
        let _ = (region, gateway);
        Vec::new()
    }
    /// Bumped whenever the brokers of the fleet change, once the broker
    /// is part of a fleet (`None` before, and without one).
    fn broker_changes(&self) -> Option<watch::Receiver<u64>> {
        None
    }
}

/// Name of the broker's WireGuard key in the data directory.
pub const KEY_FILE: &str = "wireguard.key";

/// How often peer timers run (handshake retries, keepalives, rekeying).
const TIMER_TICK: Duration = Duration::from_millis(250);

/// How many times a stopping broker tells each gateway that it is
/// leaving ([`Wireguard::announce_leaving`]): a lost datagram does not
/// leave the gateway waiting for a second of silence. The gateway takes
/// the repeats as one.
pub const LEAVING_NOTICES: usize = 3;
/// The time between two of those notices: apart enough that a short burst
/// of loss does not take them all, short enough not to delay a stopping
/// broker noticeably (10 ms in all).
pub const LEAVING_SPACING: Duration = Duration::from_millis(5);

/// A registered gateway.
pub struct Peer {
    /// Its id in routes.
    pub id: GatewayId,
    /// Its region.
    pub region: RegionId,
    /// Backend prefixes behind it (allowed sources).
    pub prefixes: Vec<IpNet>,
    /// Tunnel MTU.
    pub mtu: usize,
    /// Its public key.
    pub public_key: [u8; 32],
    /// IP packets from (rx) and to (tx) the gateway, through the tunnel.
    pub counters: Counters,
    /// WireGuard datagrams from and to the gateway on the wire, handshakes,
    /// cookies and keepalives included (what `wg show … transfer` counts).
    pub wire: Counters,
    tunn: Mutex<Tunn>,
    /// Socket index and address of its last authenticated packet.
    endpoint: Mutex<Option<(usize, SocketAddr)>>,
    last_request: Mutex<Option<Instant>>,
    /// The version of the broker list the gateway holds, once it asked
    /// for one (0: none).
    brokers_known: Mutex<Option<u64>>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("id", &self.id)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// What the admin API shows of a peer.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    /// Where its packets come from.
    pub endpoint: Option<SocketAddr>,
    /// Time since the last completed handshake.
    pub since_handshake: Option<Duration>,
    /// Round-trip time of the last handshake.
    pub rtt_ms: Option<u32>,
}

impl Peer {
    /// The peer's endpoint, once it has sent an authenticated packet.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint.lock().ok().and_then(|e| e.map(|(_, a)| a))
    }

    /// Handshake state for the admin API.
    pub fn status(&self) -> PeerStatus {
        let (since, _, _, _, rtt) = self
            .tunn
            .lock()
            .map(|t| t.stats())
            .unwrap_or((None, 0, 0, 0.0, None));
        PeerStatus {
            endpoint: self.endpoint(),
            since_handshake: since,
            rtt_ms: rtt,
        }
    }

    fn subscribed(&self) -> bool {
        self.last_request
            .lock()
            .ok()
            .and_then(|l| *l)
            .is_some_and(|t| t.elapsed() < control::SUBSCRIPTION)
    }
}

thread_local! {
    /// Room for one encrypted packet.
    static SEAL: RefCell<Vec<u8>> = RefCell::new(vec![0u8; 65_536 + 64]);
}

/// Packets sealed for one peer, waiting to be sent together
/// ([`Wireguard::seal`], [`Wireguard::send_batch`]); its buffers are kept
/// from one batch to the next.
#[derive(Default)]
pub struct SealedBatch {
    peer: Option<Arc<Peer>>,
    /// The sealed datagrams back to back in the first `used` bytes; grown
    /// to the largest batch, never cleared, so no packet costs a memset.
    data: Vec<u8>,
    used: usize,
    lens: Vec<usize>,
}

impl SealedBatch {
    /// Whether packets wait to be sent.
    pub fn is_empty(&self) -> bool {
        self.peer.is_none()
    }
}

/// One socket's receiving side, driven by [`Wireguard::receive`].
pub struct Receiver {
    index: usize,
    socket: Arc<UdpSocket>,
    state: Arc<quinn_udp::UdpSocketState>,
    batch: tether_shell::udp::BatchReceiver,
    out: Vec<u8>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// The broker's WireGuard side.
pub struct Wireguard {
    sockets: Vec<Arc<UdpSocket>>,
    /// The quinn-udp state of each socket (for sends with segmentation
    /// offload).
    states: Vec<Arc<quinn_udp::UdpSocketState>>,
    control: Arc<dyn GatewayControl>,
    /// Datagrams from no registered gateway.
    unknown: metrics::Counter,
    /// Datagrams a gateway's session refused.
    refused: metrics::Counter,
    /// Which refusals of unknown peers are logged.
    refusals: RefusalLog,
    /// Checks a handshake's MAC before any key exchange, and asks for a
    /// cookie past a rate: the port faces the internet.
    gate: tether_shell::wireguard::HandshakeGate,
    /// Handshakes answered with a cookie.
    under_load: metrics::Counter,
    private: x25519::StaticSecret,
    public: x25519::PublicKey,
    peers: Vec<Arc<Peer>>,
    by_id: HashMap<GatewayId, usize>,
    by_key: HashMap<[u8; 32], usize>,
    generation_base: u64,
}

impl std::fmt::Debug for Wireguard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wireguard")
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

impl Wireguard {
    /// The peer of a gateway id.
    pub fn peer(&self, id: &GatewayId) -> Option<&Arc<Peer>> {
        self.by_id.get(id).and_then(|&i| self.peers.get(i))
    }

    /// Every peer.
    pub fn peers(&self) -> &[Arc<Peer>] {
        &self.peers
    }

    /// The broker's public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    /// The bound socket addresses.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.sockets
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }

    /// Encrypts an IP packet for a peer and sends it.
    pub fn send(&self, peer: &Peer, packet: &[u8]) -> Result<(), DropReason> {
        let (socket, to) = peer
            .endpoint
            .lock()
            .ok()
            .and_then(|e| *e)
            .ok_or(DropReason::TargetDown)?;
        let socket = self.sockets.get(socket).ok_or(DropReason::TargetDown)?;
        SEAL.with_borrow_mut(|buf| {
            if buf.len() < packet.len() + 148 {
                buf.resize(packet.len() + 148, 0);
            }
            let mut tunn = peer.tunn.lock().map_err(|_| DropReason::TargetDown)?;
            match tunn.encapsulate(packet, buf) {
                TunnResult::WriteToNetwork(out) => match socket.try_send_to(out, to) {
                    Ok(_) => peer.wire.tx.add(out.len() as u64),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        return Err(DropReason::QueueFull);
                    }
                    Err(_) => return Err(DropReason::TargetDown),
                },
                TunnResult::Err(_) => return Err(DropReason::TargetDown),
                _ => {}
            }
            peer.counters.tx.add(packet.len() as u64);
            Ok(())
        })
    }

    /// Encrypts an IP packet for `peer` into `batch`, to be sent with the
    /// others of the batch by [`Wireguard::send_batch`]. A packet for
    /// another peer than the batch's is sent at once.
    pub fn seal(
        &self,
        peer: &Arc<Peer>,
        packet: &[u8],
        batch: &mut SealedBatch,
    ) -> Result<(), DropReason> {
        match &batch.peer {
            Some(p) if !Arc::ptr_eq(p, peer) => return self.send(peer, packet),
            Some(_) => {}
            None => batch.peer = Some(peer.clone()),
        }
        let start = batch.used;
        if batch.data.len() < start + packet.len() + 148 {
            batch.data.resize(start + packet.len() + 148, 0);
        }
        let out = batch.data.get_mut(start..).unwrap_or_default();
        let sealed = match peer.tunn.lock() {
            Ok(mut tunn) => match tunn.encapsulate(packet, out) {
                TunnResult::WriteToNetwork(p) => Ok(p.len()),
                TunnResult::Err(_) => Err(DropReason::TargetDown),
                // No session yet: the packet waits in the tunnel's queue
                // for the handshake.
                _ => Ok(0),
            },
            Err(_) => Err(DropReason::TargetDown),
        };
        let n = sealed?;
        batch.used = start + n;
        if n > 0 {
            batch.lens.push(n);
        }
        peer.counters.tx.add(packet.len() as u64);
        Ok(())
    }

    /// Sends the packets sealed into `batch`, in as few system calls as
    /// UDP segmentation offload allows, and empties it. Returns how many
    /// could not be sent.
    pub async fn send_batch(&self, batch: &mut SealedBatch) -> usize {
        let Some(peer) = batch.peer.take() else {
            return 0;
        };
        let count = batch.lens.len();
        let endpoint = peer.endpoint.lock().ok().and_then(|e| *e);
        let failed = match endpoint
            .and_then(|(i, to)| Some((self.sockets.get(i)?, self.states.get(i)?, to)))
        {
            Some((socket, state, to)) => {
                let data = batch.data.get(..batch.used).unwrap_or_default();
                tether_shell::udp::send_segments(socket, state, to, data, &batch.lens).await
            }
            None => count,
        };
        // Segments go out in order: the ones that failed are the last.
        for len in batch.lens.iter().take(count.saturating_sub(failed)) {
            peer.wire.tx.add(*len as u64);
        }
        batch.used = 0;
        batch.lens.clear();
        failed
    }

    /// Sends a control message to a peer.
    fn send_control(&self, peer: &Peer, message: &Message) {
        let packet = control::control_packet(BROKER_CONTROL, GATEWAY_CONTROL, &message.encode());
        if let Err(reason) = self.send(peer, &packet) {
            tracing::debug!(gateway = %peer.id, %reason, "control message not sent");
        }
    }

    /// Tells every gateway with a session that this broker is stopping, so
    /// that it moves its traffic to another broker now: [`LEAVING_NOTICES`]
    /// times, [`LEAVING_SPACING`] apart, since a broker that stops without
    /// a drain exits right after, and a gateway that lost a single notice
    /// would wait for the broker's silence. (A gateway that misses every
    /// copy of a broker that drains hears the same in answer to its next
    /// ping.) Returns once the last copy is sent.
    pub async fn announce_leaving(&self) {
        for notice in 0..LEAVING_NOTICES {
            if notice > 0 {
                tokio::time::sleep(LEAVING_SPACING).await;
            }
            for peer in &self.peers {
                let established = peer.endpoint.lock().is_ok_and(|e| e.is_some());
                if established {
                    self.send_control(peer, &Message::Leaving);
                }
            }
        }
    }

    /// Sends the current route set of the peer's region.
    fn send_routes(&self, peer: &Peer) {
        let (generation, routes) = self.control.site_routes(&peer.region);
        let set = RouteSet {
            generation: self.generation_base | generation,
            routes,
        };
        for chunk in set.encode() {
            self.send_control(peer, &chunk);
        }
    }

    /// Sends the broker list of the peer's region unless it holds its
    /// version already (or the broker knows no broker to list).
    fn send_brokers(&self, peer: &Peer) {
        let Ok(mut known) = peer.brokers_known.lock() else {
            return;
        };
        let Some(held) = *known else {
            return;
        };
        let list = BrokerList::new(self.control.gateway_brokers(&peer.region, &peer.id));
        if list.endpoints.is_empty() || list.version == held {
            return;
        }
        *known = Some(list.version);
        drop(known);
        tracing::debug!(
            gateway = %peer.id,
            brokers = list.endpoints.len(),
            version = list.version,
            "broker list sent"
        );
        for chunk in brokers::chunks(&list) {
            self.send_control(peer, &chunk);
        }
    }

    /// Sends the mesh zone as the peer's region may see it.
    fn send_zone(&self, peer: &Peer) {
        let Some(copy) = self.control.zone(&peer.region) else {
            return;
        };
        for chunk in control::zone_chunks(&copy) {
            self.send_control(peer, &chunk);
        }
    }
}

/// The broker's WireGuard key, its file, and whether it was just created:
/// `wireguard.key_file` when configured (read, never written: it must
/// exist), else `wireguard.key` in `data_dir`, created if missing.
pub fn load_key(
    config: &tether_config::broker::BrokerConfig,
    data_dir: &std::path::Path,
) -> anyhow::Result<(WgKey, std::path::PathBuf, bool)> {
    match &config.wireguard_key_file {
        Some(path) => {
            anyhow::ensure!(
                path.exists(),
                "the broker's WireGuard key file {} (wireguard.key_file) does not exist: \
                 write one with `wg genkey > {}` (or copy a broker's wireguard.key), \
                 or remove the setting to keep the key in the data directory",
                path.display(),
                path.display()
            );
            let (key, _) = WgKey::load_or_create(path)?;
            Ok((key, path.clone(), false))
        }
        None => {
            std::fs::create_dir_all(data_dir)
                .with_context(|| format!("cannot create {}", data_dir.display()))?;
            let path = data_dir.join(KEY_FILE);
            let (key, created) = WgKey::load_or_create(&path)?;
            Ok((key, path, created))
        }
    }
}

/// Binds the WireGuard sockets and starts the peers' timers and the
/// pushes of route and zone changes, when gateways are configured. The
/// receivers of the sockets are returned for the forwarding plane to run.
pub fn start(
    config: &tether_config::broker::BrokerConfig,
    data_dir: &std::path::Path,
    control: Arc<dyn GatewayControl>,
    metrics: &Metrics,
) -> anyhow::Result<Option<(Arc<Wireguard>, Vec<Receiver>)>> {
    if config.gateways.is_empty() {
        return Ok(None);
    }
    let (key, path, created) = load_key(config, data_dir)?;
    if created {
        tracing::info!(path = %path.display(), "created the broker's WireGuard key");
    }
    let private = x25519::StaticSecret::from(key.secret_bytes());
    let public = x25519::PublicKey::from(&private);
    let mut sockets = Vec::new();
    for addr in &config.wireguard_listen {
        let std = std::net::UdpSocket::bind(addr).with_context(|| {
            format!("cannot bind the WireGuard socket {addr} (is another WireGuard on this port?)")
        })?;
        std.set_nonblocking(true)?;
        tether_shell::udp::tune_socket(&std);
        let socket = UdpSocket::from_std(std)?;
        let state = quinn_udp::UdpSocketState::new((&socket).into())?;
        sockets.push((Arc::new(socket), Arc::new(state)));
    }
    let peers: Vec<Arc<Peer>> = config
        .gateways
        .iter()
        .enumerate()
        .map(|(i, g)| Arc::new(new_peer(g, &private, i as u32)))
        .collect();
    let wg = Arc::new(Wireguard {
        sockets: sockets.iter().map(|(s, _)| s.clone()).collect(),
        states: sockets.iter().map(|(_, s)| s.clone()).collect(),
        control,
        unknown: metrics.wireguard_unknown.clone(),
        refused: metrics.wireguard_refused.clone(),
        refusals: RefusalLog::default(),
        gate: tether_shell::wireguard::HandshakeGate::new(&public),
        under_load: metrics::counter!("tether_broker_wireguard_refused_total", "reason" => "under_load"),
        private,
        public,
        by_id: peers
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id.clone(), i))
            .collect(),
        by_key: peers
            .iter()
            .enumerate()
            .map(|(i, p)| (p.public_key, i))
            .collect(),
        peers,
        generation_base: u64::from(rand::random::<u32>()) << 32,
    });
    let receivers = sockets
        .into_iter()
        .enumerate()
        .map(|(index, (socket, state))| Receiver {
            index,
            socket,
            state,
            batch: tether_shell::udp::BatchReceiver::default(),
            out: vec![0u8; 65_536 + 64],
        })
        .collect();
    let timers = wg.clone();
    tokio::spawn(async move { run_timers(timers).await });
    let pusher = wg.clone();
    tokio::spawn(async move { push_changes(pusher).await });
    let pusher = wg.clone();
    tokio::spawn(async move { push_broker_lists(pusher).await });
    tracing::info!(
        listen = ?wg.local_addrs(),
        public_key = %tether_pki::wg::encode(&wg.public_key()),
        gateways = wg.peers.len(),
        "WireGuard up for gateways"
    );
    Ok(Some((wg, receivers)))
}

fn new_peer(g: &GatewayPeer, private: &x25519::StaticSecret, index: u32) -> Peer {
    let tunn = Tunn::new(
        private.clone(),
        x25519::PublicKey::from(g.public_key),
        None,
        None,
        index,
        None,
    );
    Peer {
        id: g.id.clone(),
        region: g.region.clone(),
        prefixes: g.prefixes.clone(),
        mtu: usize::from(g.mtu),
        public_key: g.public_key,
        counters: Counters::default(),
        wire: Counters::default(),
        tunn: Mutex::new(tunn),
        endpoint: Mutex::new(None),
        last_request: Mutex::new(None),
        brokers_known: Mutex::new(None),
    }
}

/// Which peer a datagram belongs to.
fn peer_of(wg: &Wireguard, datagram: &[u8]) -> Option<usize> {
    let index = match Tunn::parse_incoming_packet(datagram).ok()? {
        Packet::HandshakeInit(init) => {
            let half = handshake::parse_handshake_anon(&wg.private, &wg.public, &init).ok()?;
            return wg.by_key.get(&half.peer_static_public).copied();
        }
        Packet::HandshakeResponse(r) => r.receiver_idx,
        Packet::PacketCookieReply(c) => c.receiver_idx,
        Packet::PacketData(d) => d.receiver_idx,
    };
    Some((index >> 8) as usize)
}

impl Wireguard {
    /// Receives datagrams on `rx`'s socket (several per system call,
    /// coalesced by GRO where the kernel offers it) and handles each: IP
    /// packets from a peer go to `deliver`, control requests are answered
    /// here.
    pub async fn receive(&self, rx: &mut Receiver, mut deliver: impl FnMut(&Peer, &[u8])) {
        if let Err(e) = rx.batch.recv(&rx.socket, &rx.state).await {
            tracing::warn!(error = %e, "WireGuard socket receive failed");
            tokio::time::sleep(Duration::from_millis(10)).await;
            return;
        }
        for (from, datagram) in rx.batch.datagrams() {
            if let Some((peer, packet)) = self.handle(rx.index, from, datagram, &mut rx.out) {
                deliver(peer, packet);
            }
        }
    }

    /// Handles one datagram from the network; returns the IP packet in it
    /// (decrypted into `out`, not copied again) and its peer, unless it was
    /// a control message or nothing to pass on.
    fn handle<'o>(
        &self,
        socket: usize,
        from: SocketAddr,
        datagram: &[u8],
        out: &'o mut [u8],
    ) -> Option<(&Arc<Peer>, &'o [u8])> {
        // A handshake's MAC is checked, and a flood of them asked for a
        // cookie, before `peer_of` spends a key exchange on its sender.
        let gate = self.gate.check(from.ip(), datagram, out);
        if let tether_shell::wireguard::Gate::Answer(cookie) = gate {
            self.under_load.increment(1);
            if let Some(sock) = self.sockets.get(socket) {
                let _ = sock.try_send_to(cookie, from);
            }
            return None;
        }
        let passed = matches!(gate, tether_shell::wireguard::Gate::Pass);
        let Some(peer) = passed
            .then(|| peer_of(self, datagram))
            .flatten()
            .and_then(|i| self.peers.get(i))
        else {
            self.unknown.increment(1);
            if self.refusals.should_log(from.ip(), Instant::now()) {
                tracing::warn!(
                    source = %from,
                    "WireGuard packet from {from} refused: not a registered gateway key, or sealed for another broker key (compare the gateway's broker_public_key with `tether-broker gateway key`, and its `tether-gateway key` with the [[gateway]] public_key); at most one line per source a minute"
                );
            }
            return None;
        };
        let sock = self.sockets.get(socket)?;
        let mut tunn = peer.tunn.lock().ok()?;
        // Where in `out` the decrypted packet is.
        let base = out.as_ptr() as usize;
        let mut packet_at: Option<(usize, usize)> = None;
        let result = tether_shell::wireguard::decapsulate(
            &mut tunn,
            from.ip(),
            datagram,
            &mut *out,
            // Handshake responses, cookies, and packets queued while the
            // session was being set up.
            |reply| {
                if sock.try_send_to(reply, from).is_ok() {
                    peer.wire.tx.add(reply.len() as u64);
                }
            },
            |p| packet_at = Some(((p.as_ptr() as usize).wrapping_sub(base), p.len())),
        );
        match result {
            Ok(()) | Err(WireGuardError::DuplicateCounter) => {}
            Err(e) => {
                tracing::debug!(gateway = %peer.id, error = ?e, "WireGuard packet refused");
                self.refused.increment(1);
                return None;
            }
        }
        drop(tunn);
        peer.wire.rx.add(datagram.len() as u64);
        // Authenticated: this is where the peer is now.
        if let Ok(mut ep) = peer.endpoint.lock() {
            *ep = Some((socket, from));
        }
        let (at, len) = packet_at?;
        let packet = out.get(at..at + len)?;
        if let Some(payload) = control::control_payload(packet, GATEWAY_CONTROL, BROKER_CONTROL) {
            match Message::decode(payload) {
                Ok(Message::Request) => {
                    if let Ok(mut last) = peer.last_request.lock() {
                        *last = Some(Instant::now());
                    }
                    self.send_routes(peer);
                    self.send_zone(peer);
                }
                // Sent with every request by a gateway that follows the
                // region's brokers: the list, unless it holds it.
                Ok(Message::BrokersRequest { known }) => {
                    if let Ok(mut k) = peer.brokers_known.lock() {
                        *k = Some(known);
                    }
                    self.send_brokers(peer);
                }
                // The gateway's liveness probe: one small answer per
                // authenticated ping; while draining, "leaving" instead.
                Ok(Message::Ping { seq }) => {
                    if self.control.draining() {
                        self.send_control(peer, &Message::Leaving);
                    } else {
                        self.send_control(peer, &Message::Pong { seq });
                    }
                }
                _ => {}
            }
            return None;
        }
        Some((peer, packet))
    }
}

/// Runs every peer's timers: handshake retries, keepalives, rekeying.
async fn run_timers(wg: Arc<Wireguard>) {
    let mut buf = vec![0u8; 256];
    let mut tick = tokio::time::interval(TIMER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for peer in &wg.peers {
            if let Some((socket, to, p)) = tick_peer(peer, &mut buf)
                && let Some(s) = wg.sockets.get(socket)
                && s.try_send_to(p, to).is_ok()
            {
                peer.wire.tx.add(p.len() as u64);
            }
        }
    }
}

/// One timer tick of `peer`: what to send, and where, once it has an
/// endpoint. The timers run before that too: boringtun stamps a completed
/// handshake with the time of the last tick, and a peer never ticked would
/// show the broker's uptime as its handshake's age.
fn tick_peer<'a>(peer: &Peer, buf: &'a mut [u8]) -> Option<(usize, SocketAddr, &'a [u8])> {
    let mut tunn = peer.tunn.lock().ok()?;
    let result = tunn.update_timers(buf);
    drop(tunn);
    let (socket, to) = peer.endpoint.lock().ok().and_then(|e| *e)?;
    match result {
        TunnResult::WriteToNetwork(p) => Some((socket, to, p)),
        _ => None,
    }
}

/// Which refused datagrams are logged: at most one line per source address
/// a minute.
#[derive(Debug, Default)]
struct RefusalLog {
    last: Mutex<HashMap<std::net::IpAddr, Instant>>,
}

impl RefusalLog {
    const EVERY: Duration = Duration::from_secs(60);
    /// Sources remembered at most (a flood of spoofed sources forgets the
    /// oldest rather than growing).
    const SOURCES: usize = 4096;

    /// Whether a refusal from `source` at `now` gets a log line.
    fn should_log(&self, source: std::net::IpAddr, now: Instant) -> bool {
        let Ok(mut last) = self.last.lock() else {
            return false;
        };
        if last
            .get(&source)
            .is_some_and(|t| now.saturating_duration_since(*t) < Self::EVERY)
        {
            return false;
        }
        if last.len() >= Self::SOURCES {
            last.retain(|_, t| now.saturating_duration_since(*t) < Self::EVERY);
            if last.len() >= Self::SOURCES {
                return false;
            }
        }
        last.insert(source, now);
        true
    }
}

/// Pushes the route set to subscribed peers whenever site routes change,
/// and the mesh zone whenever it changes.
async fn push_changes(wg: Arc<Wireguard>) {
    let mut changes = wg.control.route_changes();
    let mut zones = wg.control.zone_changes();
    loop {
        let (routes, zone) = tokio::select! {
            r = changes.changed() => (r.is_ok(), false),
            z = zones.changed() => (false, z.is_ok()),
        };
        if !routes && !zone {
            return;
        }
        // Sites often come and go in bursts (a broker restart): one push
        // per burst.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let routes = routes || changes.has_changed().unwrap_or(false);
        let zone = zone || zones.has_changed().unwrap_or(false);
        changes.borrow_and_update();
        zones.borrow_and_update();
        for peer in &wg.peers {
            if peer.subscribed() {
                if routes {
                    wg.send_routes(peer);
                }
                if zone {
                    wg.send_zone(peer);
                }
            }
        }
    }
}

/// Pushes the broker list to subscribed peers that asked for it whenever
/// the brokers of the fleet change (once the broker has joined the fleet,
/// which it does after its gateways are up).
async fn push_broker_lists(wg: Arc<Wireguard>) {
    let mut changes = loop {
        match wg.control.broker_changes() {
            Some(c) => break c,
            None => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    };
    while changes.changed().await.is_ok() {
        // Brokers often come and go together: one push per burst.
        tokio::time::sleep(Duration::from_millis(50)).await;
        changes.borrow_and_update();
        for peer in &wg.peers {
            if peer.subscribed() {
                wg.send_brokers(peer);
            }
        }
    }
}

/// What a broker announces to the fleet as its gateway endpoint: where
/// gateways reach its WireGuard as an address and port (a listen address,
/// else the first advertised IP on the WireGuard port), when it serves
/// gateways. A broker advertised only by name is not announced: gateways
/// use addresses.
pub fn gateway_endpoint(config: &tether_config::broker::BrokerConfig) -> Option<String> {
    if config.gateways.is_empty() {
        return None;
    }
    let first = config.wireguard_listen.first()?;
    if !first.ip().is_unspecified() {
        return Some(first.to_string());
    }
    config
        .advertised_ips
        .first()
        .map(|ip| SocketAddr::new(*ip, first.port()).to_string())
}

/// Where gateways reach the broker's WireGuard: a listen address, or an
/// advertised address or name on the WireGuard port when the listener
/// binds every interface.
pub fn endpoint(config: &tether_config::broker::BrokerConfig) -> Option<String> {
    let first = config.wireguard_listen.first()?;
    if !first.ip().is_unspecified() {
        return Some(first.to_string());
    }
    let port = first.port();
    config
        .advertised_ips
        .first()
        .map(|ip| SocketAddr::new(*ip, port).to_string())
        .or_else(|| {
            config
                .advertised_names
                .first()
                .map(|n| format!("{n}:{port}"))
        })
}

/// One host address (`/32` or `/128`, so no route comes with it) in the
/// first IPv4 and the first IPv6 of `prefixes`: the first address after the
/// network's, or the only one.
fn interface_addresses(prefixes: &[IpNet]) -> Vec<IpNet> {
    let first = |p: &IpNet| -> IpNet {
        let host = match p {
            IpNet::V4(n) if n.prefix_len() < 31 => {
                std::net::IpAddr::V4(std::net::Ipv4Addr::from(n.network().to_bits() + 1))
            }
            IpNet::V6(n) if n.prefix_len() < 128 => {
                std::net::IpAddr::V6(std::net::Ipv6Addr::from(n.network().to_bits() + 1))
            }
            _ => p.network(),
        };
        IpNet::from(host)
    };
    let v4 = prefixes.iter().find(|p| matches!(p, IpNet::V4(_)));
    let v6 = prefixes.iter().find(|p| matches!(p, IpNet::V6(_)));
    v4.into_iter().chain(v6).map(first).collect()
}

/// A wg-quick configuration that lets a stock WireGuard peer stand in for
/// `tether-gateway` as the registered gateway `id`: the pools of every
/// region its region may reach go into the gateway's own table, with the
/// same rule as `tether-gateway` installs, and the private key is read from
/// `private_key_file` (it never appears in the file).
pub fn wg_quick_config(
    config: &tether_config::broker::BrokerConfig,
    id: &GatewayId,
    broker_public_key: &[u8; 32],
    private_key_file: &std::path::Path,
    table: u32,
    priority: u32,
) -> anyhow::Result<String> {
    use std::fmt::Write;
    let gw = config
        .gateways
        .iter()
        .find(|g| &g.id == id)
        .with_context(|| {
            format!(
                "no [[gateway]] with id {id} in the broker configuration; register its public key first"
            )
        })?;
    let endpoint = endpoint(config).context("the broker has no WireGuard listen address")?;
    let residency = tether_proto::forward::Residency::new(
        config
            .regions
            .iter()
            .map(|(r, c)| (r.clone(), c.allow_gateways_from.clone()))
            .collect(),
    );
    let pools: Vec<IpNet> = config
        .regions
        .iter()
        .filter(|(site_region, _)| residency.permits(site_region, &gw.region))
        .flat_map(|(_, r)| r.pools.clone())
        .collect();
    let has_v6 = pools.iter().any(|p| matches!(p, IpNet::V6(_)));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Stock WireGuard peer standing in for tether gateway {id} (region {}).",
        gw.region
    );
    let _ = writeln!(
        out,
        "# Its public key must be the one registered for {id}: {}",
        tether_pki::wg::encode(&gw.public_key)
    );
    let _ = writeln!(
        out,
        "# Routes go to table {table}, looked up at rule priority {priority}, clear of Cilium's;"
    );
    let _ = writeln!(
        out,
        "# routes follow the pools, not the live sites (tether-gateway keeps them per site)."
    );
    let addresses = interface_addresses(&gw.prefixes);
    if !addresses.is_empty() {
        let _ = writeln!(
            out,
            "# The peer's own packets (a ping from this host) must come from its registered"
        );
        let _ = writeln!(
            out,
            "# prefixes ({}): the broker drops any other source as spoofed. Address gives",
            gw.prefixes
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(
            out,
            "# the interface the first address of each; use this host's own address in them if it has one."
        );
    }
    out.push_str("[Interface]\n");
    if !addresses.is_empty() {
        let _ = writeln!(
            out,
            "Address = {}",
            addresses
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(out, "MTU = {}", gw.mtu);
    let _ = writeln!(out, "Table = {table}");
    let _ = writeln!(
        out,
        "PostUp = wg set %i private-key {}",
        private_key_file.display()
    );
    let _ = writeln!(
        out,
        "PostUp = ip -4 rule add priority {priority} lookup {table}"
    );
    let _ = writeln!(
        out,
        "PreDown = ip -4 rule del priority {priority} lookup {table}"
    );
    if has_v6 {
        let _ = writeln!(
            out,
            "PostUp = ip -6 rule add priority {priority} lookup {table}"
        );
        let _ = writeln!(
            out,
            "PreDown = ip -6 rule del priority {priority} lookup {table}"
        );
    }
    out.push_str("\n[Peer]\n");
    let _ = writeln!(
        out,
        "PublicKey = {}",
        tether_pki::wg::encode(broker_public_key)
    );
    let _ = writeln!(out, "Endpoint = {endpoint}");
    let _ = writeln!(
        out,
        "AllowedIPs = {}",
        pools
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    out.push_str("PersistentKeepalive = 25\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_peers_are_logged_once_a_minute_per_source() {
        let log = RefusalLog::default();
        let a: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let b: std::net::IpAddr = "192.0.2.2".parse().unwrap();
        let t = Instant::now();
        assert!(log.should_log(a, t));
        assert!(!log.should_log(a, t + Duration::from_secs(30)));
        assert!(log.should_log(b, t + Duration::from_secs(30)));
        assert!(log.should_log(a, t + Duration::from_secs(61)));
    }

    /// What the broker around [`Wireguard`] tells it, for a test: no
    /// routes, no zone, and a drain switched on by the test.
    #[derive(Default)]
    struct Control {
        draining: std::sync::atomic::AtomicBool,
        routes: std::sync::OnceLock<watch::Sender<u64>>,
        zones: std::sync::OnceLock<watch::Sender<Option<Arc<tether_proto::dns::ZoneData>>>>,
    }

    impl GatewayControl for Control {
        fn site_routes(&self, _: &RegionId) -> (u64, Vec<SiteRoute>) {
            (1, Vec::new())
        }
        fn zone(&self, _: &RegionId) -> Option<tether_proto::dns::ZoneData> {
            None
        }
        fn route_changes(&self) -> watch::Receiver<u64> {
            self.routes.get_or_init(|| watch::channel(0).0).subscribe()
        }
        fn zone_changes(&self) -> watch::Receiver<Option<Arc<tether_proto::dns::ZoneData>>> {
            self.zones
                .get_or_init(|| watch::channel(None).0)
                .subscribe()
        }
        fn draining(&self) -> bool {
            self.draining.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    /// A gateway played by boringtun on a loopback socket.
    mod gateway;
    use gateway::TestGateway;

    /// A broker's WireGuard side on a loopback socket, its receive loop
    /// running, and a gateway with a session to it (it answered a ping).
    async fn broker_and_gateway() -> (Arc<Wireguard>, Arc<Control>, TestGateway) {
        let gateway = x25519::StaticSecret::from(tether_pki::wg::WgKey::generate().secret_bytes());
        let text = format!(
            "[wireguard]\nlisten = [\"127.0.0.1:0\"]\n\
             [[gateway]]\nid = \"gw\"\nregion = \"local\"\npublic_key = {:?}\nprefixes = [\"10.20.0.0/16\"]\n",
            tether_pki::wg::encode(x25519::PublicKey::from(&gateway).as_bytes())
        );
        let config = tether_config::broker::BrokerFile::parse(&text, "t")
            .unwrap()
            .validate("t")
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let control = Arc::new(Control::default());
        let (wg, receivers) = start(&config, dir.path(), control.clone(), &Metrics::register())
            .unwrap()
            .unwrap();
        for mut rx in receivers {
            let wg = wg.clone();
            tokio::spawn(async move {
                loop {
                    wg.receive(&mut rx, |_, _| {}).await;
                }
            });
        }
        let mut gw = TestGateway::new(gateway, wg.public_key(), wg.local_addrs()[0]).await;
        for seq in 1..=20 {
            gw.send_control(&Message::Ping { seq }).await;
            let got = gw.messages(Duration::from_millis(250)).await;
            if got.contains(&Message::Pong { seq }) {
                return (wg, control, gw);
            }
        }
        panic!("the broker never answered a ping");
    }

    #[tokio::test]
    async fn a_ping_is_answered_with_its_sequence_number_and_with_leaving_during_a_drain() {
        let (_wg, control, mut gw) = broker_and_gateway().await;
        gw.send_control(&Message::Ping { seq: 77 }).await;
        assert_eq!(
            gw.messages(Duration::from_millis(300)).await,
            [Message::Pong { seq: 77 }]
        );
        control
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        gw.send_control(&Message::Ping { seq: 78 }).await;
        assert_eq!(
            gw.messages(Duration::from_millis(300)).await,
            [Message::Leaving]
        );
    }

    /// What a test's tracing subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    /// A gateway whose key the broker does not know is named in the
    /// broker's log with the likely causes, once a minute per source
    /// address, and counted each time. (A current-thread runtime: the
    /// broker's receive loop logs on the test's thread.)
    #[tokio::test]
    async fn an_unregistered_gateway_key_is_logged_once_a_minute_per_source() {
        let (wg, _control, _gw) = broker_and_gateway().await;
        let captured = Captured::default();
        let writer = captured.clone();
        let _log = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish(),
        );
        // The broker's count (process-wide: no other test sends unknown
        // keys).
        let refused = || {
            crate::metrics::recorder()
                .render()
                .lines()
                .find(|l| {
                    l.starts_with(r#"tether_broker_wireguard_refused_total{reason="unknown_peer"}"#)
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(0.0) as u64
        };
        let before = refused();
        for n in 1..=2u64 {
            let stranger =
                x25519::StaticSecret::from(tether_pki::wg::WgKey::generate().secret_bytes());
            let mut gw = TestGateway::new(stranger, wg.public_key(), wg.local_addrs()[0]).await;
            gw.send_control(&Message::Ping { seq: 1 }).await;
            let deadline = Instant::now() + Duration::from_secs(5);
            while refused() < before + n && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(refused(), before + n, "handshake {n} not refused");
        }
        let text = captured.text();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("not a registered gateway key"))
            .collect();
        assert_eq!(lines.len(), 1, "{text}");
        assert!(lines[0].contains("127.0.0.1:"), "{text}");
        assert!(lines[0].contains("tether-broker gateway key"), "{text}");
    }

    #[tokio::test]
    async fn a_stopping_broker_tells_each_gateway_it_is_leaving_several_times() {
        let (wg, control, mut gw) = broker_and_gateway().await;
        control
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let started = Instant::now();
        wg.announce_leaving().await;
        let took = started.elapsed();
        // Spaced, and still quick: the broker exits right after.
        assert!(
            took >= LEAVING_SPACING * (LEAVING_NOTICES as u32 - 1),
            "{took:?}"
        );
        assert!(took < Duration::from_secs(1), "{took:?}");
        // Three notices: a gateway that loses one (or two) still hears it.
        let got = gw.messages(Duration::from_millis(300)).await;
        assert_eq!(got, vec![Message::Leaving; 3]);
    }

    #[test]
    fn a_first_handshake_is_as_old_as_it_is() {
        let broker = x25519::StaticSecret::from(tether_pki::wg::WgKey::generate().secret_bytes());
        let gateway = x25519::StaticSecret::from(tether_pki::wg::WgKey::generate().secret_bytes());
        let peer = new_peer(
            &GatewayPeer {
                id: GatewayId::new("gw").unwrap(),
                region: RegionId::new("eu").unwrap(),
                public_key: x25519::PublicKey::from(&gateway).to_bytes(),
                prefixes: Vec::new(),
                mtu: 1420,
            },
            &broker,
            0,
        );
        // The broker has been up a while when the gateway first shakes
        // hands; the timers have ticked all along (no endpoint yet).
        let mut buf = vec![0u8; 2048];
        for _ in 0..4 {
            assert!(tick_peer(&peer, &mut buf).is_none());
            std::thread::sleep(Duration::from_millis(300));
        }
        tick_peer(&peer, &mut buf);
        let mut gw = Tunn::new(
            gateway,
            x25519::PublicKey::from(&broker),
            None,
            None,
            1,
            None,
        );
        let init = match gw.format_handshake_initiation(&mut buf, false) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("no handshake initiation: {other:?}"),
        };
        let mut out = vec![0u8; 2048];
        let gw_ip = Some("192.0.2.1".parse().unwrap());
        let response = match peer
            .tunn
            .lock()
            .unwrap()
            .decapsulate(gw_ip, &init, &mut out)
        {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("no handshake response: {other:?}"),
        };
        // The gateway completes it with a keepalive, which makes the new
        // session the broker's current one.
        let keepalive = match gw.decapsulate(None, &response, &mut buf) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("no keepalive: {other:?}"),
        };
        let _ = peer
            .tunn
            .lock()
            .unwrap()
            .decapsulate(gw_ip, &keepalive, &mut out);
        let age = peer.status().since_handshake.expect("a session");
        assert!(age < Duration::from_millis(500), "handshake age {age:?}");
    }

    #[test]
    fn wg_quick_config_lists_the_reachable_pools_and_reads_the_key_from_a_file() {
        let key = tether_pki::wg::WgKey::generate();
        let text = format!(
            r#"published_cidr = "203.0.113.0/24"
listen = ["203.0.113.10:443"]
advertised = ["203.0.113.10"]
[[region]]
name = "eu"
ipv4_pools = ["100.64.0.0/16"]
ipv6_pools = ["fd74::/48"]
[[region]]
name = "us"
ipv4_pools = ["100.80.0.0/16"]
[[gateway]]
id = "gw-eu"
region = "eu"
public_key = "{}"
prefixes = ["10.30.0.0/24"]
"#,
            tether_pki::wg::encode(&key.public())
        );
        let config = tether_config::broker::BrokerFile::parse(&text, "t")
            .unwrap()
            .validate("t")
            .unwrap();
        let id = GatewayId::new("gw-eu").unwrap();
        let conf = wg_quick_config(
            &config,
            &id,
            &[7; 32],
            std::path::Path::new("/etc/wireguard/gw-eu.key"),
            7300,
            7300,
        )
        .unwrap();
        assert!(conf.contains("Endpoint = 203.0.113.10:51820\n"), "{conf}");
        assert!(
            conf.contains("AllowedIPs = 100.64.0.0/16, fd74::/48\n"),
            "{conf}"
        );
        assert!(
            !conf.contains("100.80.0.0/16"),
            "another region's pool: {conf}"
        );
        assert!(conf.contains("PostUp = wg set %i private-key /etc/wireguard/gw-eu.key\n"));
        assert!(conf.contains("Table = 7300\n"));
        // Its own packets need a source inside its registered prefix.
        assert!(conf.contains("\nAddress = 10.30.0.1/32\n"), "{conf}");
        assert_eq!(
            interface_addresses(&[
                "10.30.0.0/24".parse().unwrap(),
                "fd00:1::/64".parse().unwrap(),
                "10.40.0.7/32".parse().unwrap()
            ]),
            vec![
                "10.30.0.1/32".parse::<IpNet>().unwrap(),
                "fd00:1::1/128".parse().unwrap()
            ]
        );
        assert!(!conf.contains(&tether_pki::wg::encode(&key.secret_bytes())));
        assert!(
            wg_quick_config(
                &config,
                &GatewayId::new("nope").unwrap(),
                &[7; 32],
                std::path::Path::new("/k"),
                7300,
                7300
            )
            .is_err()
        );
    }
}
