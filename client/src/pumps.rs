//! The packet pumps of a session: device to tunnel, and over HTTP/3 tunnel
//! to device (over HTTP/2 packets arrive in capsules on the request stream,
//! which the agent reads).

use std::net::IpAddr;
use std::sync::Arc;

use tether_proto::datagram::{self, Payload};
use tether_proto::ip::{self, IcmpError, Packet};

use crate::lan::LanPath;
use crate::link::TunnelLink;
use crate::tun::Tun;

/// Starts the packet pumps of a session: device to tunnel, and over HTTP/3
/// tunnel to device. One read of an offloading device yields a whole TCP burst, and
/// one write carries the coalesced segments of a batch of datagrams.
/// Packets to and from the LANs are translated through `lan` on the way.
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
                let map = lan.current();
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
                        && !lan.from_lan(&map, packet)
                    {
                        continue;
                    }
                    if link.send(framed).is_err() {
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
    let offload = tun.offload;
    let TunnelLink::H3 {
        conn, stream_id, ..
    } = link.clone()
    else {
        return None;
    };
    let inbound = {
        let (dev, lan) = (tun.dev.clone(), lan.clone());
        tokio::spawn(async move {
            use futures_util::FutureExt;
            // Datagrams that arrived together are written together: with
            // offload, consecutive TCP segments are coalesced into large
            // ones, so the kernel hands the receiving application one packet
            // where it would have handled dozens. The buffers are sized for
            // a coalesced 64 KiB segment and kept across batches.
            let mut batch = tether_shell::tun::WriteBatch::default();
            let mut scratch = Vec::new();
            while let Ok(first) = conn.read_datagram().await {
                let map = lan.current();
                let mut next = Some(first);
                while let Some(d) = next.take() {
                    if let Ok((stream, payload)) = datagram::parse_h3(&d)
                        && stream == stream_id
                        && let Ok(Payload::IpPacket(p)) = datagram::parse_payload(payload)
                    {
                        if map.is_empty() {
                            batch.push(p);
                        } else {
                            scratch.clear();
                            scratch.extend_from_slice(p);
                            if lan.to_lan(&map, &mut scratch) {
                                batch.push(&scratch);
                            }
                        }
                    }
                    if batch.has_room() {
                        next = conn.read_datagram().now_or_never().and_then(Result::ok);
                    }
                }
                let _ = batch.write(&dev, offload).await;
            }
        })
    };
    Some(inbound)
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
