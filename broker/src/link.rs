//! The broker-to-broker link: WireGuard (boringtun) over one UDP socket,
//! carrying packets for sites and gateways that another broker of the
//! fleet holds.
//!
//! Each broker has its own link key (`peering.key` in the data directory)
//! and announces the public half with the link's address in its fleet
//! record in etcd ([`tether_proto::fleet::Member`]), with the proof that
//! the deployment's CA vouches for it ([`tether_pki::link`]: a broker
//! certificate's signature over the key, the broker's fleet id and the
//! link's address). The peers of the link are exactly the live members of
//! the fleet that announce a link with a proof that verifies against the
//! trust bundle ([`Link::set_peers`], [`Admission`]): a broker that leaves
//! the fleet (its etcd lease expired) stops being a peer, a record whose
//! proof is missing or wrong is never one, and a datagram from any other
//! key is refused (see `docs/ha.md`).
//!
//! This module only encrypts, sends, receives and decrypts; what to relay
//! is decided in [`tether_proto::forward::Router::decide`], and the
//! forwarding plane runs the receive loop
//! ([`crate::plane::Plane::attach_link`]). What it carries are frames
//! ([`tether_proto::relay_frame`]): an IP packet, then a trailer naming its
//! sender, which the plane reads.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Packet, Tunn, TunnResult, handshake};
use boringtun::x25519;
use rustls::pki_types::CertificateDer;
use tether_config::broker::Peering;
use tether_pki::link::LinkProofError;
use tether_pki::wg::WgKey;
use tether_proto::fleet::{BrokerId, Fleet, Member};
use tether_proto::forward::DropReason;
use tether_proto::peering::{LINK_KEEPALIVE, LinkHealth};
use tether_shell::wireguard::{Gate, HandshakeGate};
use tokio::net::UdpSocket;

use crate::counters::Counters;

/// What a WireGuard data message adds to what it carries: type, receiver
/// index and counter (16 bytes), and the AEAD tag (16 bytes).
const DATA_OVERHEAD: usize = 32;

/// Name of the link key in the data directory.
pub const KEY_FILE: &str = "peering.key";

/// How often peer timers run (handshake retries, keepalives, rekeying):
/// each tick sends a keepalive to every peer that was sent nothing since
/// the last, so that each peer hears from this broker at least every
/// [`LINK_KEEPALIVE`] and can tell it is gone by its silence
/// ([`LinkHealth::is_down`]).
const TIMER_TICK: Duration = LINK_KEEPALIVE;

/// Another broker of the fleet, as a peer of the link.
pub struct LinkPeer {
    /// Its fleet id.
    pub id: BrokerId,
    /// Its link key.
    pub key: [u8; 32],
    /// Where its link listens.
    pub endpoint: SocketAddr,
    /// Packets relayed from it (rx) and to it (tx).
    pub counters: Counters,
    tunn: Mutex<Tunn>,
    index: u32,
    added: Instant,
    /// It announces keepalives: its silence means it is gone.
    paced: bool,
    /// It announces no proof of its key: a broker of an older release,
    /// a peer only by `peering.allow_unproven_peers`, whose packets come
    /// bare, without the frame's trailer naming their sender.
    pub unproven: bool,
    /// When an authenticated datagram last came from it: nanoseconds since
    /// `added`, plus one (0: never).
    heard: AtomicU64,
    /// Something was sent to it since the last timer tick.
    sent: AtomicBool,
}

impl std::fmt::Debug for LinkPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkPeer")
            .field("id", &self.id)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl LinkPeer {
    /// Whether the link to this peer is down ([`LinkHealth::is_down`]): no
    /// session yet a while after it was added, a session far past
    /// rekeying, handshakes given up, or silent for a second.
    pub fn is_down(&self) -> bool {
        let Ok(tunn) = self.tunn.lock() else {
            return true;
        };
        let heard = match self.heard.load(Ordering::Relaxed) {
            0 => None,
            n => Some(self.added + Duration::from_nanos(n - 1)),
        };
        LinkHealth {
            added: self.added,
            heard,
            session_age: tunn.stats().0,
            expired: tunn.is_expired(),
            paced: self.paced,
        }
        .is_down(Instant::now())
    }

    /// An authenticated datagram came from the peer now.
    fn heard_now(&self) {
        let since = u64::try_from(self.added.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        self.heard.store(since + 1, Ordering::Relaxed);
    }
}

/// What makes a live member of the fleet a peer of the link.
#[derive(Debug, Clone, Default)]
pub struct Admission {
    /// The deployment's trust bundle (during a CA rotation, the old and
    /// the new CA): what a link certificate must chain to.
    pub anchors: Vec<CertificateDer<'static>>,
    /// Also make peers of records that carry no proof at all, as brokers
    /// of releases before proofs write them (`peering.allow_unproven_peers`,
    /// for a rolling upgrade). A record with a proof that fails is refused
    /// all the same.
    pub allow_unproven: bool,
}

/// How long a refused record's verdict is kept before it is checked
/// again (a certificate not yet valid by this broker's clock may become
/// valid; a record that changes is checked at once).
const RECHECK_REFUSED: Duration = Duration::from_secs(30);

/// The verdict on one member's record.
struct Check {
    /// The record judged.
    record: Member,
    /// Proven until then (`None`: admitted without a proof), or refused
    /// with the reason.
    outcome: Result<Option<SystemTime>, LinkProofError>,
    checked: SystemTime,
}

/// The verdicts on the fleet's records, under one admission.
#[derive(Default)]
struct Checks {
    admission: Admission,
    by_id: HashMap<BrokerId, Check>,
}

#[derive(Default)]
struct Peers {
    by_id: BTreeMap<BrokerId, Arc<LinkPeer>>,
    by_index: HashMap<u32, Arc<LinkPeer>>,
    by_key: HashMap<[u8; 32], Arc<LinkPeer>>,
}

/// The link's socket, key and peers.
pub struct Link {
    socket: Arc<UdpSocket>,
    private: x25519::StaticSecret,
    public: x25519::PublicKey,
    advertise: SocketAddr,
    mtu: usize,
    peers: RwLock<Peers>,
    next_index: AtomicU32,
    /// Datagrams from no peer's key.
    unknown: metrics::Counter,
    /// Datagrams a peer's session refused.
    refused: metrics::Counter,
    /// Checks every handshake's MAC before any key exchange, and asks
    /// for a cookie past a rate.
    gate: HandshakeGate,
    /// Handshakes refused for a wrong MAC, or answered with a cookie.
    bad_mac: metrics::Counter,
    cookies: metrics::Counter,
    /// Verdicts on the fleet's records, and the records refused (each
    /// counted and logged once per record and reason).
    checks: Mutex<Checks>,
    unverified: metrics::Counter,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("advertise", &self.advertise)
            .finish_non_exhaustive()
    }
}

/// Binds the link's socket (creating the link key on first use) and starts
/// its peers' timers. The link has no peer until [`Link::set_peers`].
pub async fn start(config: &Peering, data_dir: &Path) -> anyhow::Result<Arc<Link>> {
    let path = data_dir.join(KEY_FILE);
    let (key, created) = WgKey::load_or_create(&path)?;
    if created {
        tracing::info!(path = %path.display(), "created the broker-to-broker link key");
    }
    let private = x25519::StaticSecret::from(key.secret_bytes());
    let public = x25519::PublicKey::from(&private);
    let socket = std::net::UdpSocket::bind(config.listen).with_context(|| {
        format!(
            "cannot bind the broker-to-broker link on UDP {} (peering.listen; is another broker on this port?)",
            config.listen
        )
    })?;
    // Relayed traffic arrives in bursts at tunnel rates; with the kernel's
    // default buffer (about 200 KiB) the receiving broker's socket
    // overflowed and the tunnelled TCP saw every overflow as loss.
    tether_shell::udp::tune_socket(&socket);
    socket.set_nonblocking(true)?;
    let socket = UdpSocket::from_std(socket)?;
    let bound = socket.local_addr()?;
    let advertise = config.advertise.unwrap_or(bound);
    anyhow::ensure!(
        !advertise.ip().is_unspecified(),
        "the broker-to-broker link listens on {bound}, which other brokers cannot send to: set peering.advertise"
    );
    let link = Arc::new(Link {
        socket: Arc::new(socket),
        private,
        public,
        advertise,
        mtu: usize::from(config.mtu),
        peers: RwLock::new(Peers::default()),
        next_index: AtomicU32::new(1),
        unknown: metrics::counter!("tether_broker_peer_refused_total", "reason" => "unknown_peer"),
        refused: metrics::counter!("tether_broker_peer_refused_total", "reason" => "invalid"),
        gate: HandshakeGate::new(&public),
        bad_mac: metrics::counter!("tether_broker_peer_refused_total", "reason" => "bad_mac"),
        cookies: metrics::counter!("tether_broker_peer_refused_total", "reason" => "under_load"),
        checks: Mutex::new(Checks::default()),
        unverified: metrics::counter!("tether_broker_peer_refused_total", "reason" => "unverified"),
    });
    let timers = Arc::downgrade(&link);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TIMER_TICK);
        loop {
            tick.tick().await;
            let Some(link) = timers.upgrade() else { return };
            link.run_timers();
        }
    });
    tracing::info!(
        listen = %bound,
        advertise = %advertise,
        public_key = %tether_pki::wg::encode(&link.public_key()),
        "broker-to-broker link up"
    );
    Ok(link)
}

thread_local! {
    /// Room for one encrypted packet.
    static SEAL: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 65_536 + 64]);
    /// Room for one frame (packet and trailer) before it is encrypted.
    static FRAME: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(65_536 + 256));
}

impl Link {
    /// The link's public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    /// Where other brokers send to.
    pub fn advertise(&self) -> SocketAddr {
        self.advertise
    }

    /// The largest frame (IP packet and trailer) the link carries.
    pub fn mtu(&self) -> usize {
        self.mtu
    }

    /// The peer of a broker.
    pub fn peer(&self, id: &str) -> Option<Arc<LinkPeer>> {
        self.peers.read().ok()?.by_id.get(id).cloned()
    }

    /// Every peer, in id order.
    pub fn peers(&self) -> Vec<Arc<LinkPeer>> {
        self.peers
            .read()
            .map(|p| p.by_id.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether `member`'s record makes it a peer: its link key proven by
    /// the deployment's CA (or no proof at all, where `admission` allows
    /// it). A refusal is counted and logged once per record and reason.
    fn admit(
        &self,
        checks: &mut Checks,
        id: &BrokerId,
        member: &Member,
        admission: &Admission,
        now: SystemTime,
    ) -> bool {
        let Some((endpoint, key)) = member.link() else {
            return false;
        };
        // An unusable key or address is reported by `set_peers`.
        let Some(key) = tether_pki::wg::decode(key) else {
            return true;
        };
        let cached = checks.by_id.get(id).filter(|c| {
            c.record == *member
                && match &c.outcome {
                    Ok(Some(until)) => now < *until,
                    Ok(None) => true,
                    Err(_) => now.duration_since(c.checked).unwrap_or_default() < RECHECK_REFUSED,
                }
        });
        if let Some(check) = cached {
            return check.outcome.is_ok();
        }
        let outcome = match &member.link_proof {
            None if admission.allow_unproven => Ok(None),
            None => Err(LinkProofError::Missing),
            Some(proof) => {
                tether_pki::link::verify(proof, id, endpoint, &key, &admission.anchors, now)
                    .map(Some)
            }
        };
        let told = checks
            .by_id
            .get(id)
            .is_some_and(|c| c.record == *member && c.outcome == outcome);
        if outcome == Ok(None) && !told {
            tracing::warn!(
                broker = %id,
                endpoint,
                "fleet: the broker announces its link key without a proof; a peer of the link all the same, as peering.allow_unproven_peers says"
            );
        }
        if let Err(e) = &outcome
            && !told
        {
            self.unverified.increment(1);
            tracing::warn!(
                broker = %id,
                endpoint,
                reason = %e,
                "fleet: the broker's link key is not proven by the deployment's CA; it is not a peer of the link"
            );
        }
        let admitted = outcome.is_ok();
        checks.by_id.insert(
            id.clone(),
            Check {
                record: member.clone(),
                outcome,
                checked: now,
            },
        );
        admitted
    }

    /// Makes the live members of `fleet` that announce a link (other than
    /// this broker) whose key `admission` accepts the peers: new ones are
    /// added and greeted with a handshake, gone ones removed, one whose key
    /// or address changed (restarted with a new data directory) starts
    /// afresh. Returns the ids of the peers.
    pub fn set_peers(&self, fleet: &Fleet, admission: &Admission) -> BTreeSet<BrokerId> {
        let mut wanted: BTreeMap<BrokerId, ([u8; 32], SocketAddr)> = BTreeMap::new();
        // Per peer: it announces keepalives; it announces no proof.
        let mut announces: BTreeMap<BrokerId, (bool, bool)> = BTreeMap::new();
        let mut checks = match self.checks.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Verdicts hold under the trust bundle and setting they were made
        // with, and for the records still announced.
        if checks.admission.anchors != admission.anchors
            || checks.admission.allow_unproven != admission.allow_unproven
        {
            checks.admission = admission.clone();
            checks.by_id.retain(|_, c| c.outcome.is_err());
            for c in checks.by_id.values_mut() {
                c.checked = SystemTime::UNIX_EPOCH;
            }
        }
        checks
            .by_id
            .retain(|id, _| fleet.members().contains_key(id));
        let now = SystemTime::now();
        // One per link key among the admitted: a broker restarted under a
        // new id is reached there, not under the announcement its previous
        // run left; a refused record cannot hide the broker whose key it
        // copied.
        let links = fleet.link_members_admitted(|id, member| {
            self.admit(&mut checks, id, member, admission, now)
        });
        drop(checks);
        for (id, member) in links {
            let Some((endpoint, key)) = member.link() else {
                continue;
            };
            match (endpoint.parse::<SocketAddr>(), tether_pki::wg::decode(key)) {
                (Ok(endpoint), Some(key)) if key != self.public_key() => {
                    wanted.insert(id.clone(), (key, endpoint));
                    announces.insert(
                        id.clone(),
                        (
                            member.link_keepalive_ms.is_some(),
                            member.link_proof.is_none(),
                        ),
                    );
                }
                // This broker's own key, in what its previous run announced
                // (alive after a crash until that run's lease expires).
                (Ok(_), Some(key)) if key == self.public_key() => {
                    tracing::debug!(broker = %id, "fleet: an earlier run of this broker is still announced");
                }
                _ => tracing::warn!(
                    broker = %id,
                    endpoint,
                    "fleet: the broker announces an unusable link address or key; not relaying to it"
                ),
            }
        }
        let ids: BTreeSet<BrokerId> = wanted.keys().cloned().collect();
        let mut added = Vec::new();
        {
            let Ok(mut peers) = self.peers.write() else {
                return ids;
            };
            let gone: Vec<BrokerId> = peers
                .by_id
                .iter()
                .filter(|(id, p)| wanted.get(*id) != Some(&(p.key, p.endpoint)))
                .map(|(id, _)| id.clone())
                .collect();
            for id in gone {
                if let Some(p) = peers.by_id.remove(&id) {
                    peers.by_index.remove(&p.index);
                    peers.by_key.remove(&p.key);
                    tracing::info!(broker = %id, "broker-to-broker link: peer removed");
                }
            }
            for (id, (key, endpoint)) in wanted {
                if peers.by_id.contains_key(&id) || peers.by_key.contains_key(&key) {
                    continue;
                }
                let index = self.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
                let tunn = Tunn::new(
                    self.private.clone(),
                    x25519::PublicKey::from(key),
                    None,
                    None,
                    index,
                    None,
                );
                let peer = Arc::new(LinkPeer {
                    id: id.clone(),
                    key,
                    endpoint,
                    counters: Counters::default(),
                    tunn: Mutex::new(tunn),
                    index,
                    added: Instant::now(),
                    paced: announces.get(&id).is_some_and(|p| p.0),
                    unproven: announces.get(&id).is_some_and(|p| p.1),
                    heard: AtomicU64::new(0),
                    sent: AtomicBool::new(false),
                });
                peers.by_index.insert(index, peer.clone());
                peers.by_key.insert(key, peer.clone());
                peers.by_id.insert(id.clone(), peer.clone());
                tracing::info!(broker = %id, %endpoint, "broker-to-broker link: peer added");
                added.push(peer);
            }
        }
        // A handshake now, so that the first relayed packet finds a session.
        for peer in added {
            SEAL.with_borrow_mut(|buf| {
                let Ok(mut tunn) = peer.tunn.lock() else {
                    return;
                };
                if let TunnResult::WriteToNetwork(out) =
                    tunn.format_handshake_initiation(buf, false)
                {
                    let _ = self.socket.try_send_to(out, peer.endpoint);
                }
            });
        }
        ids
    }

    /// Encrypts the frame of an IP packet (`packet`, then `trailer`) for
    /// broker `to` and sends it.
    pub fn send(&self, to: &str, packet: &[u8], trailer: &[u8]) -> Result<(), DropReason> {
        let peer = self.peer(to).ok_or(DropReason::PeerUnknown)?;
        self.send_to(&peer, packet, trailer)
    }

    /// Encrypts the frame of an IP packet (`packet`, then `trailer`) for
    /// `peer` and sends it. The packet is counted, not the trailer.
    pub fn send_to(
        &self,
        peer: &LinkPeer,
        packet: &[u8],
        trailer: &[u8],
    ) -> Result<(), DropReason> {
        if peer.is_down() {
            return Err(DropReason::PeerDown);
        }
        FRAME.with_borrow_mut(|frame| {
            frame.clear();
            frame.extend_from_slice(packet);
            frame.extend_from_slice(trailer);
            self.seal_and_send(peer, frame)
        })?;
        peer.counters.tx.add(packet.len() as u64);
        Ok(())
    }

    /// Encrypts `frame` for `peer` and sends it.
    fn seal_and_send(&self, peer: &LinkPeer, frame: &[u8]) -> Result<(), DropReason> {
        SEAL.with_borrow_mut(|buf| {
            if buf.len() < frame.len() + 148 {
                buf.resize(frame.len() + 148, 0);
            }
            let mut tunn = peer.tunn.lock().map_err(|_| DropReason::PeerDown)?;
            match tunn.encapsulate(frame, buf) {
                TunnResult::WriteToNetwork(out) => {
                    match self.socket.try_send_to(out, peer.endpoint) {
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            return Err(DropReason::QueueFull);
                        }
                        Err(_) => return Err(DropReason::PeerDown),
                    }
                }
                TunnResult::Err(_) => return Err(DropReason::PeerDown),
                _ => {}
            }
            peer.sent.store(true, Ordering::Relaxed);
            Ok(())
        })
    }

    fn run_timers(&self) {
        for peer in self.peers() {
            SEAL.with_borrow_mut(|buf| {
                let Ok(mut tunn) = peer.tunn.lock() else {
                    return;
                };
                // A keepalive (an empty packet) when nothing else went to
                // the peer since the last tick and there is a session.
                let idle = !peer.sent.swap(false, Ordering::Relaxed);
                if idle
                    && tunn.stats().0.is_some()
                    && let TunnResult::WriteToNetwork(out) = tunn.encapsulate(&[], buf)
                {
                    let _ = self.socket.try_send_to(out, peer.endpoint);
                }
                match tunn.update_timers(buf) {
                    TunnResult::WriteToNetwork(out) => {
                        let _ = self.socket.try_send_to(out, peer.endpoint);
                    }
                    TunnResult::Err(WireGuardError::ConnectionExpired) => {
                        // Handshakes given up: start them again, the peer
                        // is still in the fleet.
                        if let TunnResult::WriteToNetwork(out) =
                            tunn.format_handshake_initiation(buf, false)
                        {
                            let _ = self.socket.try_send_to(out, peer.endpoint);
                        }
                    }
                    _ => {}
                }
            });
        }
    }

    /// Which peer a datagram belongs to.
    fn peer_of(&self, datagram: &[u8]) -> Option<Arc<LinkPeer>> {
        let peers = self.peers.read().ok()?;
        let index = match Tunn::parse_incoming_packet(datagram).ok()? {
            Packet::HandshakeInit(init) => {
                let half =
                    handshake::parse_handshake_anon(&self.private, &self.public, &init).ok()?;
                return peers.by_key.get(&half.peer_static_public).cloned();
            }
            Packet::HandshakeResponse(r) => r.receiver_idx,
            Packet::PacketCookieReply(c) => c.receiver_idx,
            Packet::PacketData(d) => d.receiver_idx,
        };
        peers.by_index.get(&(index >> 8)).cloned()
    }

    /// Receives one datagram and handles it: a frame from a peer goes to
    /// `deliver` (which reads it and counts its packet); handshakes and
    /// keepalives are answered here. `buf` holds the datagram, `out` the
    /// decrypted frame (each 64 KiB).
    ///
    /// boringtun hands over only the IP packet the front of the decrypted
    /// message describes; the frame is the whole message, which it
    /// decrypted in place at the front of `out`: the data message less
    /// its 16-byte header and 16-byte tag.
    pub async fn receive(
        &self,
        buf: &mut [u8],
        out: &mut [u8],
        deliver: impl FnOnce(&LinkPeer, &mut [u8]),
    ) {
        let (n, from) = match self.socket.recv_from(buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "broker-to-broker link: receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                return;
            }
        };
        let datagram = buf.get(..n).unwrap_or_default();
        // A handshake's MAC is checked, and a flood of them asked for a
        // cookie, before `peer_of` spends a key exchange on finding its
        // sender.
        match self.gate.check(from.ip(), datagram, out) {
            Gate::Pass => {}
            Gate::Answer(cookie) => {
                self.cookies.increment(1);
                let _ = self.socket.try_send_to(cookie, from);
                return;
            }
            Gate::Refuse => {
                self.bad_mac.increment(1);
                tracing::debug!(source = %from, "broker-to-broker link: datagram refused before any key exchange");
                return;
            }
        }
        let Some(peer) = self.peer_of(datagram) else {
            self.unknown.increment(1);
            tracing::debug!(source = %from, "broker-to-broker link: datagram from no live broker refused");
            return;
        };
        let mut len = None;
        let result = {
            let Ok(mut tunn) = peer.tunn.lock() else {
                return;
            };
            let mut packet_len = 0usize;
            let mut got = false;
            let r = tether_shell::wireguard::decapsulate(
                &mut tunn,
                from.ip(),
                datagram,
                out,
                |reply| {
                    let _ = self.socket.try_send_to(reply, from);
                },
                |p| {
                    packet_len = p.len();
                    got = true;
                },
            );
            if got {
                len = Some(packet_len);
            }
            r
        };
        match result {
            Ok(()) => peer.heard_now(),
            Err(WireGuardError::DuplicateCounter) => {}
            Err(e) => {
                tracing::debug!(broker = %peer.id, error = ?e, "broker-to-broker link: datagram refused");
                self.refused.increment(1);
                return;
            }
        }
        // The decrypted frame starts at the front of `out`, the packet
        // boringtun checked at its start.
        let frame_len = datagram.len().saturating_sub(DATA_OVERHEAD);
        if len.is_some_and(|l| l > 0 && l <= frame_len)
            && let Some(frame) = out.get_mut(..frame_len)
        {
            deliver(&peer, frame);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A link on loopback with the default MTU.
    fn loopback() -> Peering {
        Peering {
            listen: "127.0.0.1:0".parse().unwrap(),
            advertise: None,
            mtu: 1420,
            allow_unproven_peers: false,
        }
    }

    /// A flood of handshake initiations is asked for cookies once past the
    /// limit, instead of costing a key exchange each; a handshake with a
    /// wrong MAC gets no answer at all.
    #[tokio::test]
    async fn a_handshake_flood_is_asked_for_cookies() {
        let dir = tempfile::tempdir().unwrap();
        let config = loopback();
        let link = start(&config, dir.path()).await.unwrap();
        let to = link.socket.local_addr().unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let (mut buf, mut out) = (vec![0u8; 65_536], vec![0u8; 65_536]);
        let mut init = vec![0u8; 256];
        let mut handshake = |tamper: bool| {
            let stranger = x25519::StaticSecret::from(rand::random::<[u8; 32]>());
            let mut tunn = Tunn::new(stranger, link.public_key().into(), None, None, 1, None);
            let TunnResult::WriteToNetwork(d) = tunn.format_handshake_initiation(&mut init, false)
            else {
                panic!("no handshake initiation");
            };
            let mut d = d.to_vec();
            if tamper {
                // The last 32 bytes are mac1 and mac2.
                let at = d.len() - 20;
                d[at] ^= 0xff;
            }
            d
        };
        let cookie = |sender: &std::net::UdpSocket| {
            let mut reply = [0u8; 256];
            sender.recv(&mut reply).ok().map(|n| (reply[0], n))
        };
        // A wrong MAC: refused before the key exchange, no answer.
        for _ in 0..3 {
            sender.send_to(&handshake(true), to).unwrap();
            link.receive(&mut buf, &mut out, |_, _| {}).await;
        }
        assert_eq!(
            cookie(&sender),
            None,
            "a handshake with a wrong MAC is answered"
        );
        // Within the limit: no cookie (a stranger's handshake is refused).
        let limit = usize::try_from(tether_shell::wireguard::HANDSHAKES_PER_SECOND).unwrap();
        let mut answered = 0;
        for _ in 0..limit + 20 {
            sender.send_to(&handshake(false), to).unwrap();
            link.receive(&mut buf, &mut out, |_, _| {}).await;
        }
        while let Some((kind, len)) = cookie(&sender) {
            assert_eq!((kind, len), (3, 64), "a cookie reply (type 3, 64 bytes)");
            answered += 1;
        }
        assert!(
            (1..=20).contains(&answered),
            "{answered} cookie replies to {} handshakes in a second (limit {limit})",
            limit + 20
        );
    }

    /// A frame crosses the link whole: the packet and the trailer naming
    /// its sender, as large as the link's MTU allows, although boringtun
    /// itself hands over only the IP packet; a bare packet arrives as
    /// sent, and is no frame.
    #[tokio::test]
    async fn a_frame_crosses_the_link_whole() {
        use tether_proto::fleet::Member;
        use tether_proto::relay_frame::{self, Sender};
        let config = loopback();
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = start(&config, dir_a.path()).await.unwrap();
        let b = start(&config, dir_b.path()).await.unwrap();
        let member = |link: &Link| Member {
            endpoints: Vec::new(),
            regions: Default::default(),
            forward: Some(link.advertise().to_string()),
            link_key: Some(tether_pki::wg::encode(&link.public_key())),
            link_proof: None,
            gateways: Vec::new(),
            link_keepalive_ms: None,
            gateway_endpoint: None,
        };
        // The greeting handshakes go out at once: only once the sockets
        // are known writable.
        a.socket.writable().await.unwrap();
        b.socket.writable().await.unwrap();
        // Records without a proof: this test is about frames, not
        // about the link's identities.
        let admission = Admission {
            anchors: Vec::new(),
            allow_unproven: true,
        };
        for (me, link) in [("a", &a), ("b", &b)] {
            let mut fleet = Fleet::new(me.into());
            fleet.handle_member("a".into(), member(&a), 1);
            fleet.handle_member("b".into(), member(&b), 2);
            link.set_peers(&fleet, &admission);
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let receiving = [(a.clone(), None), (b.clone(), Some(tx))].map(|(link, tx)| {
            tokio::spawn(async move {
                let (mut buf, mut out) = (vec![0u8; 65_536], vec![0u8; 65_536 + 64]);
                loop {
                    link.receive(&mut buf, &mut out, |peer, frame| {
                        if let Some(tx) = &tx {
                            let _ = tx.send((peer.id.clone(), frame.to_vec()));
                        }
                    })
                    .await;
                }
            })
        });
        let sender = Sender::Site {
            site: "branch-7".parse().unwrap(),
            region: "eu".parse().unwrap(),
            lan: false,
        };
        let mut trailer = [0u8; relay_frame::MAX_TRAILER];
        let n = sender.write_trailer(&mut trailer).unwrap();
        // The largest packet this sender's frame has room for.
        let len = a.mtu() - n;
        let mut packet = vec![0u8; len];
        packet[0] = 0x45;
        packet[2..4].copy_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                a.send("b", &packet, &trailer[..n]).unwrap();
                if let Ok(Some(got)) =
                    tokio::time::timeout(Duration::from_millis(100), rx.recv()).await
                {
                    return got;
                }
            }
        })
        .await
        .expect("no frame crossed the link");
        assert_eq!(got.0, "a");
        assert_eq!(got.1.len(), a.mtu());
        let (parsed, at) = relay_frame::parse(&got.1).unwrap();
        assert_eq!((parsed, &got.1[..at]), (sender, &packet[..]));
        // Without a trailer: the packet alone, which is no frame. (Copies
        // of the first frame, sent while the handshake ran, may come
        // first.)
        let mut bare = [0u8; 20];
        bare[0] = 0x45;
        bare[3] = 20;
        a.send("b", &bare, &[]).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let got = rx.recv().await.unwrap().1;
                if got.len() != a.mtu() {
                    return got;
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(got, bare);
        assert_eq!(
            relay_frame::parse(&got),
            Err(relay_frame::FrameError::Version(0))
        );
        for task in receiving {
            task.abort();
        }
    }

    /// The link's socket gets the tunnel sockets' buffers: as root beyond
    /// `net.core.rmem_max`, otherwise up to it (the kernel reports twice
    /// the size asked for).
    #[tokio::test]
    async fn the_link_socket_has_room_for_a_burst() {
        let dir = tempfile::tempdir().unwrap();
        let config = loopback();
        let link = start(&config, dir.path()).await.unwrap();
        let got: usize =
            nix::sys::socket::getsockopt(&*link.socket, nix::sys::socket::sockopt::RcvBuf).unwrap();
        let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .map(|s| s.trim().parse().unwrap_or(0))
            .unwrap_or(0);
        let want = if nix::unistd::geteuid().is_root() {
            tether_shell::udp::SOCKET_BUFFER
        } else {
            tether_shell::udp::SOCKET_BUFFER.min(rmem_max)
        };
        assert!(
            got >= want,
            "receive buffer {got} bytes, want at least {want}"
        );
    }

    /// Only records whose link key the deployment's CA vouches for become
    /// peers; records without a proof only when the configuration allows
    /// them, and a record whose proof fails never.
    #[tokio::test]
    async fn only_proven_records_become_peers() {
        use tether_pki::{Ca, TrustDomain};
        use tether_proto::fleet::Member;
        let dir = tempfile::tempdir().unwrap();
        let config = loopback();
        let link = start(&config, dir.path()).await.unwrap();
        let now = std::time::SystemTime::now();
        let td = TrustDomain::new("tether.test").unwrap();
        let ca = Ca::generate(td.clone(), now).unwrap();
        let other = Ca::generate(td, now).unwrap();
        let signer = |ca: &Ca| {
            let (cert, key) = ca
                .issue_server(&["b.test".into()], &[], now, Duration::from_secs(3600))
                .unwrap();
            tether_pki::link::LinkSigner::new(cert.der, &key).unwrap()
        };
        let record = |id: &str, port: u16, ca: Option<&Ca>| {
            let key = tether_pki::wg::WgKey::generate().public();
            let forward = format!("127.0.0.1:{port}");
            Member {
                endpoints: Vec::new(),
                regions: Default::default(),
                link_proof: ca.map(|ca| signer(ca).prove(id, &forward, &key).unwrap()),
                forward: Some(forward),
                link_key: Some(tether_pki::wg::encode(&key)),
                gateways: Vec::new(),
                link_keepalive_ms: None,
                gateway_endpoint: None,
            }
        };
        let mut fleet = Fleet::new("me".into());
        fleet.handle_member("proven".into(), record("proven", 9, Some(&ca)), 1);
        fleet.handle_member("unproven".into(), record("unproven", 9, None), 2);
        fleet.handle_member("foreign".into(), record("foreign", 9, Some(&other)), 3);
        // A proof made for another id.
        fleet.handle_member("renamed".into(), record("someone", 9, Some(&ca)), 4);
        let strict = Admission {
            anchors: vec![ca.cert_der().clone()],
            allow_unproven: false,
        };
        let ids = |set: BTreeSet<BrokerId>| set.into_iter().collect::<Vec<_>>();
        assert_eq!(ids(link.set_peers(&fleet, &strict)), ["proven"]);
        assert_eq!(
            link.peers()
                .iter()
                .map(|p| (p.id.as_str(), p.unproven))
                .collect::<Vec<_>>(),
            [("proven", false)]
        );
        let refused = |link: &Link| {
            let checks = link.checks.lock().unwrap();
            let mut out: Vec<(String, &'static str)> = checks
                .by_id
                .iter()
                .filter_map(|(id, c)| Some((id.clone(), c.outcome.as_ref().err()?.kind())))
                .collect();
            out.sort();
            out
        };
        assert_eq!(
            refused(&link),
            [
                ("foreign".to_string(), "untrusted"),
                ("renamed".to_string(), "bad_signature"),
                ("unproven".to_string(), "missing"),
            ]
        );
        // For a rolling upgrade: records without any proof too, never one
        // whose proof fails.
        let upgrade = Admission {
            allow_unproven: true,
            ..strict.clone()
        };
        assert_eq!(
            ids(link.set_peers(&fleet, &upgrade)),
            ["proven", "unproven"]
        );
        // The unproven one is known as such: its packets come bare.
        let mut peers: Vec<_> = link
            .peers()
            .iter()
            .map(|p| (p.id.clone(), p.unproven))
            .collect();
        peers.sort();
        assert_eq!(
            peers,
            [
                ("proven".to_string(), false),
                ("unproven".to_string(), true)
            ]
        );
        // The CA leaves the trust bundle: its proofs no longer admit.
        let moved = Admission {
            anchors: vec![other.cert_der().clone()],
            allow_unproven: false,
        };
        assert_eq!(ids(link.set_peers(&fleet, &moved)), ["foreign"]);
        assert_eq!(ids(link.set_peers(&fleet, &strict)), ["proven"]);
    }
}
