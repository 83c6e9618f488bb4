//! The forwarding plane: performs the verdicts of
//! [`tether_proto::forward::Router::decide`] on real sessions and devices.
//!
//! A packet is copied once, into a buffer with headroom in front, so the
//! destination session's datagram prefix (quarter stream ID and context ID)
//! can be written in place before the packet leaves as a QUIC datagram.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use tether_proto::datagram::{self, Payload};
use tether_proto::forward::{DropReason, Ingress, Verdict};
use tether_proto::route::{Route, RouteTarget};

use crate::state::{Broker, Session};

/// Room in front of a packet for the longest datagram prefix (an 8-byte
/// quarter stream ID and the context ID).
pub const HEADROOM: usize = 9;

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

    /// The datagram for `session`: its prefix, then the packet, without
    /// copying the packet again.
    fn into_datagram(mut self, session: &Session) -> Option<Bytes> {
        let prefix = &session.datagram_prefix;
        let start = HEADROOM.checked_sub(prefix.len())?;
        self.bytes.get_mut(start..HEADROOM)?.copy_from_slice(prefix);
        Some(Bytes::from(self.bytes).slice(start..))
    }
}

/// Sends an IP packet to a site's session, counting it.
pub fn send_to_site(broker: &Broker, session: &Session, packet: &[u8]) -> Result<(), DropReason> {
    send_buffer(broker, session, Buffer::new(packet))
}

fn send_buffer(broker: &Broker, session: &Session, buffer: Buffer) -> Result<(), DropReason> {
    let len = buffer.packet().len() as u64;
    let datagram = buffer.into_datagram(session).ok_or(DropReason::TooBig)?;
    match session.conn.send_datagram(datagram) {
        Ok(()) => {
            session.counters.tx_packets.fetch_add(1, Ordering::Relaxed);
            session.counters.tx_bytes.fetch_add(len, Ordering::Relaxed);
            broker.metrics.to_site_packets.increment(1);
            broker.metrics.to_site_bytes.increment(len);
            Ok(())
        }
        Err(quinn::SendDatagramError::TooLarge) => Err(DropReason::TooBig),
        Err(_) => Err(DropReason::TargetDown),
    }
}

/// The largest packet a route's target accepts now.
fn mtu_of(broker: &Broker, target: &RouteTarget) -> Option<usize> {
    match target {
        RouteTarget::Site(site) => broker.session(site).and_then(|s| s.mtu()),
        RouteTarget::Gateway(id) => broker
            .local_gateway
            .get()
            .filter(|g| &g.id == id)
            .map(|g| g.mtu),
    }
}

/// Delivers a verdict's packet (or fragments) along its route.
fn deliver(broker: &Broker, route: &Route, buffer: Buffer) -> Result<(), DropReason> {
    match &route.target {
        RouteTarget::Site(site) => {
            let session = broker.session(site).ok_or(DropReason::TargetDown)?;
            send_buffer(broker, &session, buffer)
        }
        RouteTarget::Gateway(id) => {
            let gw = broker
                .local_gateway
                .get()
                .filter(|g| &g.id == id)
                .ok_or(DropReason::TargetDown)?;
            gw.send(buffer.packet())
                .map_err(|_| DropReason::QueueFull)?;
            broker.metrics.to_gateway_packets.increment(1);
            Ok(())
        }
    }
}

/// Performs a verdict; `reply` sends an ICMP error back to the ingress.
fn perform(broker: &Broker, verdict: Verdict, buffer: Buffer, reply: impl FnOnce(&[u8]) -> bool) {
    let result = match verdict {
        Verdict::Forward(route) => deliver(broker, &route, buffer),
        Verdict::Fragments(route, fragments) => fragments
            .iter()
            .try_for_each(|f| deliver(broker, &route, Buffer::new(f))),
        Verdict::Reply { icmp, reason } => {
            if reply(&icmp) {
                broker.metrics.icmp_sent.increment(1);
            }
            Err(reason)
        }
        Verdict::Drop(reason) => Err(reason),
    };
    if let Err(reason) = result {
        broker.metrics.drop(reason);
        tracing::trace!(reason = %reason, "packet dropped");
    }
}

/// A datagram arrived on a site's connection.
pub fn from_site(broker: &Broker, session: &Arc<Session>, dgram: &[u8]) {
    let payload = match datagram::parse_h3(dgram) {
        Ok((stream, payload)) if stream == session.stream_id => payload,
        _ => return broker.metrics.drop(DropReason::Malformed),
    };
    let packet = match datagram::parse_payload(payload) {
        Ok(Payload::IpPacket(p)) => p,
        Ok(Payload::UnknownContext(_)) => return broker.metrics.drop(DropReason::UnknownContext),
        Err(_) => return broker.metrics.drop(DropReason::Malformed),
    };
    from_site_packet(broker, session, packet);
}

/// An IP packet arrived from a site (in a datagram or a DATAGRAM capsule).
pub fn from_site_packet(broker: &Broker, session: &Arc<Session>, packet: &[u8]) {
    session.counters.rx_packets.fetch_add(1, Ordering::Relaxed);
    session
        .counters
        .rx_bytes
        .fetch_add(packet.len() as u64, Ordering::Relaxed);
    broker.metrics.from_site_packets.increment(1);
    broker
        .metrics
        .from_site_bytes
        .increment(packet.len() as u64);
    let mut buffer = Buffer::new(packet);
    let verdict = {
        let Ok(router) = broker.router.read() else {
            return;
        };
        let allowed = session
            .allowed
            .read()
            .map(|a| a.clone())
            .unwrap_or_default();
        let ingress = Ingress::Site {
            site: session.site(),
            region: session.region(),
            allowed: &allowed,
        };
        router.decide(&ingress, buffer.packet_mut(), |t| mtu_of(broker, t))
    };
    perform(broker, verdict, buffer, |icmp| {
        send_to_site(broker, session, icmp).is_ok()
    });
}

/// An IP packet arrived from the local gateway's device.
pub fn from_local_gateway(broker: &Broker, packet: &[u8]) {
    let Some(gw) = broker.local_gateway.get() else {
        return;
    };
    broker.metrics.from_gateway_packets.increment(1);
    let mut buffer = Buffer::new(packet);
    let verdict = {
        let Ok(router) = broker.router.read() else {
            return;
        };
        let ingress = Ingress::Gateway {
            gateway: &gw.id,
            region: &gw.region,
            allowed: &gw.prefixes,
        };
        router.decide(&ingress, buffer.packet_mut(), |t| mtu_of(broker, t))
    };
    perform(broker, verdict, buffer, |icmp| gw.send(icmp).is_ok());
}
