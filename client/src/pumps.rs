//! The packet pumps of a session: device to tunnel, and over HTTP/3 tunnel
//! to device (over HTTP/2 packets arrive in capsules on the request stream,
//! which the agent reads).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tether_proto::datagram::{self, Payload};
use tether_proto::forward::DropReason;
use tether_proto::ip::{self, IcmpError, Packet};

use crate::lan::LanPath;
use crate::link::TunnelLink;
use crate::tun::Tun;

/// Starts the packet pumps of a session: device to tunnel, and over HTTP/3
/// tunnel to device. One read of an offloading device yields a whole TCP burst, and
/// one write carries the coalesced segments of a batch of datagrams.
/// Packets to and from the LANs are translated through `lan` on the way,
/// and packets from the tunnel that are not for the site are dropped.
pub fn start_pumps(
    tun: &Tun,
    link: &TunnelLink,
    lan: &Arc<LanPath>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let offload = tun.offload;
    let outbound = {
        let (dev, link, lan) = (tun.dev.clone(), link.clone(), lan.clone());
        tokio::spawn(async move {
            let offset = link.headroom();
            let mut packets =
                tether_shell::tun::BatchReader::new(tun_rs::IDEAL_BATCH_SIZE, 4096, offset);
            loop {
                if let Err(e) = packets.read(&dev).await {
                    tracing::error!(error = %e, "tunnel device failed");
                    return;
                }
                let mtu = link.mtu().map(usize::from).unwrap_or(1200);
                let inbound = lan.current();
                for framed in packets.framed_mut() {
                    let Some(packet) = framed.get(offset..) else {
                        continue;
                    };
                    if packet.len() > mtu {
                        // Tell the local sender the tunnel's MTU.
                        if let Some(icmp) = too_big(packet, mtu) {
                            let _ = tether_shell::tun::write_one(&dev, offload, &icmp).await;
                        }
                        continue;
                    }
                    if let Some(packet) = framed.get_mut(offset..)
                        && !lan.from_lan(&inbound, packet)
                    {
                        continue;
                    }
                    if link.send_wait(framed).await.is_err() {
                        return;
                    }
                }
            }
        })
    };
    let mut pumps = vec![outbound];
    pumps.extend(start_inbound(tun, link, lan));
    pumps
}

/// Starts the pump from an HTTP/3 tunnel to the device (`None` over
/// HTTP/2, where packets arrive in capsules on the stream and are written
/// by the session itself).
pub fn start_inbound(
    tun: &Tun,
    link: &TunnelLink,
    lan: &Arc<LanPath>,
) -> Option<tokio::task::JoinHandle<()>> {
    let TunnelLink::H3 {
        conn, stream_id, ..
    } = link.clone()
    else {
        return None;
    };
    let inbound = {
        let (dev, lan) = (tun.dev.clone(), lan.clone());
        let mut batch = tun.write_batch();
        let drops = TunnelDrops::default();
        tokio::spawn(async move {
            // Datagrams that arrived together are written together: with
            // offload, consecutive TCP segments are coalesced into large
            // ones as they are added (each packet copied once), so the
            // kernel hands the receiving application one packet where it
            // would have handled dozens. The buffers are sized for a
            // coalesced 64 KiB segment and kept across batches.
            let mut scratch = Vec::new();
            let mut reader = tether_shell::quic::DatagramReader::new(conn);
            let mut datagrams = Vec::with_capacity(tun_rs::IDEAL_BATCH_SIZE);
            while let Ok(dropped) = reader
                .next_batch(&mut datagrams, tun_rs::IDEAL_BATCH_SIZE)
                .await
            {
                drops.count(dropped);
                let inbound = lan.current();
                for d in &datagrams {
                    if let Ok((stream, payload)) = datagram::parse_h3(d)
                        && stream == stream_id
                        && let Ok(Payload::IpPacket(p)) = datagram::parse_payload(payload)
                    {
                        // Only what is for the site goes to the device;
                        // only a packet into a LAN is changed (copied).
                        let packet = if inbound.map().is_empty() {
                            if !lan.admits(&inbound, p) {
                                continue;
                            }
                            p
                        } else {
                            scratch.clear();
                            scratch.extend_from_slice(p);
                            if !lan.to_device(&inbound, &mut scratch) {
                                continue;
                            }
                            &scratch[..]
                        };
                        // A full batch is written first, so no packet is
                        // left out.
                        let _ = batch.push_or_write(&dev, packet).await;
                    }
                }
                let _ = batch.write(&dev).await;
            }
        })
    };
    Some(inbound)
}

/// The least time between two warnings about packets dropped in the
/// tunnel's queues.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Packets of a session that arrived faster than the agent read them and
/// were dropped by the connection's receive queue (the broker counts its
/// own drops in `tether_broker_packets_dropped_total`; towards the broker
/// the agent waits for room instead of dropping); logged at most once a
/// minute.
#[derive(Default)]
struct TunnelDrops {
    receive_queue: AtomicU64,
    last_warn: Mutex<Option<Instant>>,
}

impl TunnelDrops {
    fn count(&self, n: u64) {
        if n == 0 {
            return;
        }
        let total = self.receive_queue.fetch_add(n, Ordering::Relaxed) + n;
        let now = Instant::now();
        if let Ok(mut last) = self.last_warn.lock()
            && last.is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
        {
            *last = Some(now);
            tracing::warn!(
                reason = DropReason::TunnelReceiveQueue.as_str(),
                dropped = total,
                "packets from the broker were dropped this session: they arrived faster than the agent wrote them to the device"
            );
        }
    }
}

/// A packet-too-big for a packet the tunnel cannot carry, as if from the
/// packet's destination (the local stack accepts it for path MTU).
fn too_big(packet: &[u8], mtu: usize) -> Option<Vec<u8>> {
    let p = Packet::parse(packet).ok()?;
    let from: IpAddr = p.dst;
    ip::icmp_error(
        &p,
        IcmpError::PacketTooBig {
            mtu: u16::try_from(mtu).unwrap_or(u16::MAX),
        },
        from,
    )
}
