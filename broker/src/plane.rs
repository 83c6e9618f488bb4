//! The forwarding plane: performs the verdicts of
//! [`tether_proto::forward::Router::decide`] on real sessions and devices.
//!
//! A packet is copied once, into a buffer with headroom in front: the
//! destination session's datagram prefix (quarter stream ID and context ID),
//! or the local gateway device's virtio-net header, is written in place.
//! Datagrams from a site are handled in batches ([`SiteBatch`]): packets for
//! the local gateway wait in reusable buffers and are written together,
//! coalesced.
//! Traffic is counted per session and per device only; the Prometheus
//! totals are summed when scraped, so the packet path touches no counter
//! shared between threads.
//!
//! The plane ([`Plane`]) reads the routing state through the core's read
//! guard ([`CoreCell::read`]) and finds sites in the map of live sessions
//! ([`Sessions`]). It owns the devices' receive loops: the device modules
//! ([`crate::local_gateway`], [`crate::wireguard`]) only receive and send,
//! and know nothing of the plane. So does the broker-to-broker link
//! ([`crate::link`]): packets for a destination another broker holds leave
//! through it ([`Verdict::Relay`]) in a frame naming their sender
//! ([`tether_proto::relay_frame`]), and packets arriving on it go only to
//! this broker's own sessions and gateways, once this broker's residency
//! and policy allow them for that sender ([`Plane::attach_link`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use ipnet::IpNet;
use tether_proto::datagram::{self, Payload};
use tether_proto::forward::{DropReason, Ingress, Relay, Verdict};
use tether_proto::ids::{GatewayId, RegionId};
use tether_proto::relay_frame::{self, Sender};
use tether_proto::route::{Route, RouteTarget};
use tether_proto::send_queue::SendPatience;
use tether_shell::quic::Sent;
use tether_shell::tun;

use crate::core_cell::CoreCell;
use crate::link::{Link, LinkPeer};
use crate::local_gateway::LocalGateway;
use crate::metrics::Metrics;
use crate::sessions::{Session, SessionLink, Sessions};
use crate::wireguard::{Peer, Wireguard};

/// Room in front of a packet: enough for the longest datagram prefix (an
/// 8-byte quarter stream ID and the context ID) and for the virtio-net
/// header of an offloading device.
pub const HEADROOM: usize = 16;

/// When the local gateway's reader waits for room in a site's full send
/// queue.
const SEND_PATIENCE: SendPatience = SendPatience::DEFAULT;

/// A packet on its way, with headroom.
struct Buffer {
    bytes: Vec<u8>,
}

impl Buffer {
    fn new(packet: &[u8]) -> Self {
        let mut bytes = Vec::with_capacity(HEADROOM + packet.len());
        bytes.resize(HEADROOM, 0);
        bytes.extend_from_slice(packet);
        Self { bytes }
    }

    fn packet(&self) -> &[u8] {
        self.bytes.get(HEADROOM..).unwrap_or_default()
    }

    fn packet_mut(&mut self) -> &mut [u8] {
        self.bytes.get_mut(HEADROOM..).unwrap_or_default()
    }

    /// The packet preceded by `header`, written into the headroom.
    fn with_header(&mut self, header: &[u8]) -> Option<&[u8]> {
        let start = HEADROOM.checked_sub(header.len())?;
        self.bytes.get_mut(start..HEADROOM)?.copy_from_slice(header);
        self.bytes.get(start..)
    }

    /// The packet behind `header`, without copying the packet again.
    fn into_framed(mut self, header: &[u8]) -> Option<Bytes> {
        let start = HEADROOM.checked_sub(header.len())?;
        self.with_header(header)?;
        Some(Bytes::from(self.bytes).slice(start..))
    }
}

/// Sends an IP packet to a site's session, counting it (and, in `metrics`,
/// an older packet it displaced from a full send queue).
pub fn send_to_site(session: &Session, packet: &[u8], metrics: &Metrics) -> Result<(), DropReason> {
    send_buffer(session, Buffer::new(packet), metrics)
}

fn send_buffer(session: &Session, buffer: Buffer, metrics: &Metrics) -> Result<(), DropReason> {
    send_or_hold(session, buffer, metrics, None)
}

/// A datagram that found its site's send queue full, held for a sender
/// that can wait for room ([`Plane::wait_for_room`]).
pub struct Blocked {
    session: Arc<Session>,
    datagram: Bytes,
    len: usize,
}

/// Sends a packet to a site's session. When `hold` is given, the session
/// runs on HTTP/3 and its send queue is full, the datagram is left in
/// `hold` (counted when it is sent) instead of displacing an older one.
fn send_or_hold(
    session: &Session,
    buffer: Buffer,
    metrics: &Metrics,
    hold: Option<(&Arc<Session>, &mut Option<Blocked>)>,
) -> Result<(), DropReason> {
    let len = buffer.packet().len();
    match &session.link {
        SessionLink::H3 { conn, prefix } => {
            let datagram = buffer.into_framed(prefix).ok_or(DropReason::TooBig)?;
            let datagram = match hold {
                Some((held, slot)) => match tether_shell::quic::try_send_datagram(conn, datagram) {
                    Ok(None) => {
                        session.counters.tx.add(len as u64);
                        return Ok(());
                    }
                    Ok(Some(datagram)) => {
                        let may_wait = session
                            .send_wait
                            .lock()
                            .is_ok_and(|w| w.may_wait(Instant::now()));
                        if !may_wait {
                            // Not waited for now: displace the oldest.
                            datagram
                        } else {
                            *slot = Some(Blocked {
                                session: held.clone(),
                                datagram,
                                len,
                            });
                            return Ok(());
                        }
                    }
                    Err(quinn::SendDatagramError::TooLarge) => return Err(DropReason::TooBig),
                    Err(_) => return Err(DropReason::TargetDown),
                },
                None => datagram,
            };
            match tether_shell::quic::send_datagram(conn, datagram) {
                Ok(false) => {}
                Ok(true) => {
                    metrics.drop(DropReason::TunnelSendQueue);
                    session.drops.add(DropReason::TunnelSendQueue);
                }
                Err(quinn::SendDatagramError::TooLarge) => return Err(DropReason::TooBig),
                Err(_) => return Err(DropReason::TargetDown),
            }
        }
        SessionLink::H2 { capsules, .. } => {
            if len > datagram::STREAM_MTU {
                return Err(DropReason::TooBig);
            }
            let (prefix, n) = datagram::capsule_prefix(len);
            let capsule = buffer.into_framed(&prefix[..n]).ok_or(DropReason::TooBig)?;
            // A full queue means the TCP connection cannot keep up: drop,
            // as a router would, rather than buffer without bound.
            match capsules.try_send(capsule) {
                Ok(()) => {}
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                    return Err(DropReason::QueueFull);
                }
                Err(_) => return Err(DropReason::TargetDown),
            }
        }
    }
    session.counters.tx.add(len as u64);
    Ok(())
}

/// The forwarding plane: performs routing verdicts on sessions and devices.
pub struct Plane {
    core: Arc<CoreCell>,
    sessions: Arc<Sessions>,
    local_gateway: OnceLock<Arc<LocalGateway>>,
    wireguard: OnceLock<Arc<Wireguard>>,
    link: OnceLock<Arc<Link>>,
    metrics: Metrics,
    /// Idle batches for writing to the local gateway.
    batches: BatchPool,
    /// Packets relayed on to the broker a site moved to.
    relayed_on: AtomicU64,
}

impl std::fmt::Debug for Plane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plane")
            .field("local_gateway", &self.local_gateway.get())
            .field("wireguard", &self.wireguard.get())
            .finish_non_exhaustive()
    }
}

impl Plane {
    /// A plane that routes with `core`'s routing state to the sessions in
    /// `sessions`, counting drops in `metrics`. It has no devices yet.
    pub fn new(core: Arc<CoreCell>, sessions: Arc<Sessions>, metrics: Metrics) -> Self {
        Self {
            core,
            sessions,
            local_gateway: OnceLock::new(),
            wireguard: OnceLock::new(),
            link: OnceLock::new(),
            metrics,
            batches: BatchPool::new(BatchPool::default_max()),
            relayed_on: AtomicU64::new(0),
        }
    }

    /// The local gateway, if enabled and started.
    pub fn local_gateway(&self) -> Option<&Arc<LocalGateway>> {
        self.local_gateway.get()
    }

    /// Gateways over WireGuard, if any are configured and started.
    pub fn wireguard(&self) -> Option<&Arc<Wireguard>> {
        self.wireguard.get()
    }

    /// Routes the packets read from the local gateway's device, from now on.
    pub fn attach_local_gateway(self: &Arc<Self>, gw: Arc<LocalGateway>) -> anyhow::Result<()> {
        if self.local_gateway.set(gw.clone()).is_err() {
            anyhow::bail!("local gateway started twice");
        }
        let plane = self.clone();
        tokio::spawn(async move {
            let mut packets = tun::BatchReader::new(tun_rs::IDEAL_BATCH_SIZE, 4096, 0);
            loop {
                match gw.read(&mut packets).await {
                    Ok(_) => {
                        for packet in packets.packets_mut() {
                            if let Some(blocked) = plane.route_local_gateway_packet(&gw, packet) {
                                plane.wait_for_room(blocked).await;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "local gateway device failed; backends can no longer reach sites");
                        break;
                    }
                }
            }
        });
        Ok(())
    }

    /// Routes the packets decrypted from WireGuard peers, from now on: one
    /// loop per socket.
    pub fn attach_wireguard(
        self: &Arc<Self>,
        wg: Arc<Wireguard>,
        receivers: Vec<crate::wireguard::Receiver>,
    ) -> anyhow::Result<()> {
        if self.wireguard.set(wg.clone()).is_err() {
            anyhow::bail!("WireGuard started twice");
        }
        for mut receiver in receivers {
            let (plane, wg) = (self.clone(), wg.clone());
            tokio::spawn(async move {
                loop {
                    wg.receive(&mut receiver, |peer, packet| {
                        plane.route_peer_packet(&wg, peer, packet)
                    })
                    .await;
                }
            });
        }
        Ok(())
    }

    /// The broker-to-broker link, if the broker has one.
    pub fn link(&self) -> Option<&Arc<Link>> {
        self.link.get()
    }

    /// Delivers the packets other brokers relay here, from now on.
    pub fn attach_link(self: &Arc<Self>, link: Arc<Link>) -> anyhow::Result<()> {
        if self.link.set(link.clone()).is_err() {
            anyhow::bail!("broker-to-broker link started twice");
        }
        let plane = self.clone();
        tokio::spawn(async move {
            let (mut buf, mut out) = (vec![0u8; 65_536], vec![0u8; 65_536 + 64]);
            loop {
                link.receive(&mut buf, &mut out, |peer, packet| {
                    plane.route_relayed_packet(&link, peer, packet)
                })
                .await;
            }
        });
        Ok(())
    }

    /// Sends a packet (or its fragments) to the broker that holds its
    /// destination, each followed by the trailer naming its sender.
    fn relay(&self, relay: &Relay, buffer: &Buffer) -> Result<(), DropReason> {
        let link = self.link.get().ok_or(DropReason::PeerUnknown)?;
        let mut trailer = [0u8; relay_frame::MAX_TRAILER];
        let n = relay
            .sender
            .write_trailer(&mut trailer)
            .ok_or(DropReason::Malformed)?;
        let trailer = trailer.get(..n).unwrap_or_default();
        if relay.fragments.is_empty() {
            return link.send(&relay.broker, buffer.packet(), trailer);
        }
        relay
            .fragments
            .iter()
            .try_for_each(|f| link.send(&relay.broker, f, trailer))
    }

    /// Packets other brokers relayed here for sites that had moved on, and
    /// that this broker relayed on to their new broker, since it started.
    pub fn relayed_on(&self) -> u64 {
        self.relayed_on.load(Ordering::Relaxed)
    }

    /// A frame another broker relayed here: its packet is checked for the
    /// sender the frame names, then delivered to a session or gateway of
    /// this broker, or relayed on to the broker its site just moved to
    /// ([`tether_proto::forward::Router::decide_relayed`]). A frame this
    /// broker cannot read is dropped. Every drop is counted under the
    /// relayed drops too.
    fn route_relayed_packet(&self, link: &Link, peer: &LinkPeer, frame: &mut [u8]) {
        let (sender, len) = match relay_frame::parse(frame) {
            Ok(parsed) => parsed,
            // A broker of an older release sends bare packets.
            Err(_) if peer.unproven => (Sender::Unnamed, frame.len()),
            Err(error) => {
                tracing::debug!(broker = %peer.id, %error, "broker-to-broker link: frame dropped");
                self.metrics.drop(DropReason::RelayFrame);
                self.metrics.relayed_drop(DropReason::RelayFrame);
                return;
            }
        };
        let packet = frame.get(..len).unwrap_or_default();
        peer.counters.rx.add(packet.len() as u64);
        let mut buffer = Buffer::new(packet);
        let verdict = {
            let Ok(router) = self.core.read() else {
                return;
            };
            router.decide_relayed(buffer.packet_mut(), &peer.id, &sender, |t| self.mtu_of(t))
        };
        if matches!(verdict, Verdict::Relay(_)) {
            self.relayed_on.fetch_add(1, Ordering::Relaxed);
            self.metrics.relayed_on.increment(1);
        }
        let mut trailer = [0u8; relay_frame::MAX_TRAILER];
        let n = Sender::Router.write_trailer(&mut trailer).unwrap_or(0);
        let dropped = self.perform(
            verdict,
            buffer,
            |icmp| {
                link.send_to(peer, icmp, trailer.get(..n).unwrap_or_default())
                    .is_ok()
            },
            None,
        );
        if let Some(reason) = dropped {
            self.metrics.relayed_drop(reason);
        }
    }

    /// The largest packet a route's target accepts now.
    fn mtu_of(&self, target: &RouteTarget) -> Option<usize> {
        match target {
            RouteTarget::Site(site) => self.sessions.get(site).and_then(|s| s.mtu()),
            RouteTarget::Gateway(id) => match self.local_gateway.get().filter(|g| &g.id == id) {
                Some(g) => Some(g.mtu),
                None => self
                    .wireguard
                    .get()
                    .and_then(|wg| wg.peer(id))
                    .filter(|p| p.endpoint().is_some())
                    .map(|p| p.mtu),
            },
        }
    }

    /// Delivers a packet along its route; with `hold`, a datagram for a
    /// site whose send queue is full is left there ([`send_or_hold`]).
    fn deliver(
        &self,
        route: &Route,
        mut buffer: Buffer,
        hold: Option<&mut Option<Blocked>>,
    ) -> Result<(), DropReason> {
        match &route.target {
            RouteTarget::Site(site) => {
                let session = self.sessions.get(site).ok_or(DropReason::TargetDown)?;
                let hold = hold.map(|slot| (&session, slot));
                send_or_hold(&session, buffer, &self.metrics, hold)
            }
            RouteTarget::Gateway(id) => {
                let Some(gw) = self.local_gateway.get().filter(|g| &g.id == id) else {
                    let wg = self.wireguard.get().ok_or(DropReason::TargetDown)?;
                    let peer = wg.peer(id).ok_or(DropReason::TargetDown)?;
                    return wg.send(peer, buffer.packet());
                };
                let len = buffer.packet().len() as u64;
                let written = if gw.offload {
                    let framed = buffer
                        .with_header(&[0u8; tun::VNET_HDR])
                        .ok_or(DropReason::TooBig)?;
                    gw.write(framed)
                } else {
                    gw.write(buffer.packet())
                };
                written.map_err(|_| DropReason::QueueFull)?;
                gw.counters.tx.add(len);
                Ok(())
            }
        }
    }

    /// Performs a verdict; `reply` sends an ICMP error back to the ingress.
    /// Returns the reason when the packet was dropped (counted already in
    /// the broker's totals). With `hold`, a packet for a site whose send
    /// queue is full may be left there for the caller to wait on.
    fn perform(
        &self,
        verdict: Verdict,
        buffer: Buffer,
        reply: impl FnOnce(&[u8]) -> bool,
        hold: Option<&mut Option<Blocked>>,
    ) -> Option<DropReason> {
        let result = match verdict {
            Verdict::Forward(route) => self.deliver(&route, buffer, hold),
            Verdict::Fragments(route, fragments) => fragments
                .iter()
                .try_for_each(|f| self.deliver(&route, Buffer::new(f), None)),
            Verdict::Reply { icmp, reason } => {
                if reply(&icmp) {
                    self.metrics.icmp_sent.increment(1);
                }
                Err(reason)
            }
            Verdict::Drop(reason) => Err(reason),
            Verdict::Relay(relay) => self.relay(&relay, &buffer),
        };
        if let Err(reason) = result {
            self.metrics.drop(reason);
            tracing::trace!(reason = %reason, "packet dropped");
            return Some(reason);
        }
        None
    }

    /// Counts a drop of a site's packet in the broker's and the site's
    /// totals.
    fn site_drop(&self, session: &Session, reason: DropReason) {
        self.metrics.drop(reason);
        session.drops.add(reason);
    }

    /// Counts `n` drops of a site's packets for the same reason in the
    /// broker's and the site's totals.
    pub fn site_drops(&self, session: &Session, reason: DropReason, n: u64) {
        self.metrics.drops_of(reason, n);
        session.drops.add_n(reason, n);
    }

    /// A batch from the pool, or a new one.
    pub fn take_batch(&self) -> Box<SiteBatch> {
        self.batches.take()
    }

    /// Returns a flushed batch to the pool, which keeps a few
    /// ([`BatchPool`]).
    pub fn give_batch(&self, batch: Box<SiteBatch>) {
        self.batches.give(batch);
    }

    /// A datagram arrived on a site's connection: routed now, and if it goes
    /// to the local gateway, left in `batch` until [`SiteBatch::flush`].
    pub fn route_site_datagram(
        &self,
        session: &Arc<Session>,
        stream_id: u64,
        dgram: &[u8],
        batch: &mut SiteBatch,
    ) {
        let packet = match datagram::parse_h3(dgram) {
            Ok((stream, payload)) if stream == stream_id => {
                match datagram::parse_payload(payload) {
                    Ok(Payload::IpPacket(p)) => p,
                    Ok(Payload::UnknownContext(_)) => {
                        return self.site_drop(session, DropReason::UnknownContext);
                    }
                    Err(_) => return self.site_drop(session, DropReason::Malformed),
                }
            }
            _ => return self.site_drop(session, DropReason::Malformed),
        };
        self.route_site_packet(session, packet, batch);
    }

    /// An IP packet arrived from a site (in a datagram or a DATAGRAM
    /// capsule): routed now, and if it goes to the local gateway or a
    /// gateway over WireGuard, left in `batch` until [`SiteBatch::flush`].
    pub fn route_site_packet(&self, session: &Arc<Session>, packet: &[u8], batch: &mut SiteBatch) {
        session.counters.rx.add(packet.len() as u64);
        let hdr = tun::VNET_HDR;
        let mut b = batch.buffer();
        b.resize(hdr, 0);
        b.extend_from_slice(packet);
        let verdict = {
            let (Ok(router), Ok(allowed)) = (self.core.read(), session.allowed.read()) else {
                return batch.recycle(b);
            };
            let ingress = Ingress::Site {
                site: session.site(),
                region: session.region(),
                allowed: &allowed,
            };
            router.decide(&ingress, b.get_mut(hdr..).unwrap_or_default(), |t| {
                self.mtu_of(t)
            })
        };
        match &verdict {
            Verdict::Forward(route) if matches!(route.target, RouteTarget::Gateway(_)) => {
                match self.local_gateway.get() {
                    Some(gw) if RouteTarget::Gateway(gw.id.clone()) == route.target => {
                        gw.counters.tx.add((b.len() - hdr) as u64);
                        batch.ready.push(b);
                    }
                    _ => {
                        // A gateway over WireGuard: sealed into the batch,
                        // sent with the others of it.
                        let sealed = match (&route.target, self.wireguard.get()) {
                            (RouteTarget::Gateway(id), Some(wg)) => match wg.peer(id) {
                                Some(peer) => wg.seal(
                                    peer,
                                    b.get(hdr..).unwrap_or_default(),
                                    &mut batch.sealed,
                                ),
                                None => Err(DropReason::TargetDown),
                            },
                            _ => Err(DropReason::TargetDown),
                        };
                        batch.recycle(b);
                        if let Err(r) = sealed {
                            self.site_drop(session, r);
                        }
                    }
                }
            }
            _ => {
                let buffer = Buffer::new(b.get(hdr..).unwrap_or_default());
                batch.recycle(b);
                if let Some(r) = self.perform(
                    verdict,
                    buffer,
                    |icmp| send_to_site(session, icmp, &self.metrics).is_ok(),
                    None,
                ) {
                    session.drops.add(r);
                }
            }
        }
    }

    /// An IP packet arrived from the local gateway's device. Returns the
    /// datagram when its site's send queue was full and the reader should
    /// wait for room ([`Plane::wait_for_room`]).
    fn route_local_gateway_packet(&self, gw: &LocalGateway, packet: &[u8]) -> Option<Blocked> {
        gw.counters.rx.add(packet.len() as u64);
        let mut blocked = None;
        self.route_gateway_packet(
            &gw.id,
            &gw.region,
            &gw.prefixes,
            packet,
            |icmp| gw.send(icmp).is_ok(),
            Some(&mut blocked),
        );
        blocked
    }

    /// Waits for room for a datagram whose site's send queue was full: at
    /// most the patience of [`SendPatience`], then it is dropped and
    /// counted. While it waits, the device's reader reads nothing, and
    /// the packets behind wait in the device's queue in the kernel, so a
    /// burst slows the senders down instead of being lost; a site whose
    /// queue drains slowly is not waited for again for a while
    /// ([`tether_proto::send_queue::SendWait`]).
    pub async fn wait_for_room(&self, blocked: Blocked) {
        let Blocked {
            session,
            datagram,
            len,
        } = blocked;
        let SessionLink::H3 { conn, .. } = &session.link else {
            return;
        };
        let started = Instant::now();
        let sent =
            tether_shell::quic::send_datagram_within(conn, datagram, SEND_PATIENCE.patience).await;
        if let Ok(mut wait) = session.send_wait.lock() {
            let queued = matches!(sent, Ok(Sent::Queued));
            wait.waited(&SEND_PATIENCE, started, Instant::now(), queued);
        }
        match sent {
            Ok(Sent::Queued) => session.counters.tx.add(len as u64),
            Ok(Sent::Dropped) => self.site_drop(&session, DropReason::TunnelSendQueue),
            Err(quinn::SendDatagramError::TooLarge) => self.site_drop(&session, DropReason::TooBig),
            Err(_) => self.site_drop(&session, DropReason::TargetDown),
        }
    }

    /// An IP packet arrived from a gateway over WireGuard.
    fn route_peer_packet(&self, wg: &Wireguard, peer: &Peer, packet: &[u8]) {
        peer.counters.rx.add(packet.len() as u64);
        self.route_gateway_packet(
            &peer.id,
            &peer.region,
            &peer.prefixes,
            packet,
            |icmp| wg.send(peer, icmp).is_ok(),
            None,
        );
    }

    /// Routes a packet that entered from gateway `id` (the local device or
    /// a WireGuard peer); `reply` sends an ICMP error back to it.
    fn route_gateway_packet(
        &self,
        id: &GatewayId,
        region: &RegionId,
        prefixes: &[IpNet],
        packet: &[u8],
        reply: impl FnOnce(&[u8]) -> bool,
        hold: Option<&mut Option<Blocked>>,
    ) {
        let mut buffer = Buffer::new(packet);
        let verdict = {
            let Ok(router) = self.core.read() else {
                return;
            };
            let ingress = Ingress::Gateway {
                gateway: id,
                region,
                allowed: prefixes,
            };
            router.decide(&ingress, buffer.packet_mut(), |t| self.mtu_of(t))
        };
        let _ = self.perform(verdict, buffer, reply, hold);
    }
}

/// The batches sessions borrow for a burst of datagrams. Bounded: a batch
/// is held from its first packet until written, so a burst of many sites
/// at once (all reconnecting, or a traffic peak) takes many at the same
/// time, and each returned batch beyond the bound is freed instead of kept
/// for the broker's life (its buffers, up to 128 of 64 KiB, and its
/// coalescing table).
struct BatchPool {
    /// Boxed: a batch taken from here is held by a session's datagram
    /// task, whose future (kept by every idle session) would otherwise
    /// hold the whole batch inline.
    #[allow(clippy::vec_box)]
    idle: Mutex<Vec<Box<SiteBatch>>>,
    /// The most batches kept.
    max: usize,
}

impl BatchPool {
    fn new(max: usize) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            max,
        }
    }

    /// Two batches per core (at least 4): about as many as the broker's
    /// threads write at once.
    fn default_max() -> usize {
        std::thread::available_parallelism().map_or(4, |n| (2 * n.get()).max(4))
    }

    fn take(&self) -> Box<SiteBatch> {
        self.idle
            .lock()
            .ok()
            .and_then(|mut p| p.pop())
            .unwrap_or_default()
    }

    fn give(&self, batch: Box<SiteBatch>) {
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < self.max
        {
            idle.push(batch);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.idle.lock().map_or(0, |p| p.len())
    }
}

/// Reusable buffers for the packets of one batch of datagrams that go to the
/// local gateway. Each buffer has room for a coalesced 64 KiB segment, so
/// writing never reallocates. Batches are not owned by sessions: a session
/// borrows one from the plane's pool for a burst ([`Plane::take_batch`],
/// [`Plane::give_batch`]), so idle sites cost nothing and the pool holds
/// about as many as there are threads.
#[derive(Default)]
pub struct SiteBatch {
    free: Vec<bytes::BytesMut>,
    ready: Vec<bytes::BytesMut>,
    /// The coalescing table of the local gateway's device (about 0.9 MB),
    /// made by the first write to it: a batch whose packets all went
    /// elsewhere (WireGuard, ICMP replies, other sites) has none.
    gro: Option<tun_rs::GROTable>,
    /// Packets sealed for a gateway over WireGuard.
    sealed: crate::wireguard::SealedBatch,
}

/// Capacity of a batch buffer: a virtio-net header and a full 64 KiB
/// coalesced segment.
const BATCH_BUFFER: usize = tun::VNET_HDR + 65_536;

impl SiteBatch {
    fn buffer(&mut self) -> bytes::BytesMut {
        self.free
            .pop()
            .unwrap_or_else(|| bytes::BytesMut::with_capacity(BATCH_BUFFER))
    }

    fn recycle(&mut self, mut b: bytes::BytesMut) {
        b.clear();
        self.free.push(b);
    }

    /// Whether packets wait to be written.
    pub fn is_empty(&self) -> bool {
        self.ready.is_empty() && self.sealed.is_empty()
    }

    /// Writes the waiting packets to the plane's local gateway, and sends
    /// those sealed for a gateway over WireGuard.
    pub async fn flush(&mut self, plane: &Plane) {
        if !self.sealed.is_empty()
            && let Some(wg) = plane.wireguard.get()
        {
            let failed = wg.send_batch(&mut self.sealed).await;
            plane.metrics.drops_of(DropReason::QueueFull, failed as u64);
        }
        if self.ready.is_empty() {
            return;
        }
        if let Some(gw) = plane.local_gateway.get()
            && gw
                .write_batch(self.gro.get_or_insert_default(), &mut self.ready)
                .await
                .is_err()
        {
            for _ in 0..self.ready.len() {
                plane.metrics.drop(DropReason::QueueFull);
            }
        }
        while let Some(b) = self.ready.pop() {
            self.recycle(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_batch_pool_keeps_at_most_its_bound() {
        let pool = BatchPool::new(3);
        // A burst: ten sessions hold a batch at the same time.
        let held: Vec<_> = (0..10).map(|_| pool.take()).collect();
        assert_eq!(pool.len(), 0);
        for batch in held {
            pool.give(batch);
        }
        assert_eq!(pool.len(), 3, "the rest of the burst's batches are freed");
        // The kept ones are used again before new ones are made.
        let again: Vec<_> = (0..2).map(|_| pool.take()).collect();
        assert_eq!(pool.len(), 1);
        for batch in again {
            pool.give(batch);
        }
        assert_eq!(pool.len(), 3);
    }

    #[test]
    fn a_new_batch_has_no_coalescing_table() {
        let batch = SiteBatch::default();
        assert!(batch.gro.is_none());
        assert!(batch.is_empty());
    }
}
