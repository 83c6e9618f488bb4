//! The local gateway: a TUN device on the broker host, so hosts of the
//! broker's network reach sites without a remote gateway.
//!
//! The device gets each pool's router address with the pool's prefix
//! length, so the kernel routes every pool the gateway may reach into it.
//! Hosts elsewhere route the pools via the broker host, which must forward
//! (`net.ipv4.ip_forward=1`, `net.ipv6.conf.all.forwarding=1`): the broker
//! itself changes no sysctl.
//!
//! The device uses segmentation offload where the kernel supports it: one
//! read carries a whole TCP burst (split here into packets), and the
//! packets of a batch of datagrams are written coalesced into large
//! segments, so the kernel forwards a few big packets instead of many small
//! ones (in the benchmark this halves the broker's CPU per byte).
//!
//! This module only opens the device, reads and writes it: the forwarding
//! plane ([`crate::plane::Plane::attach_local_gateway`]) runs the loop that
//! reads it and routes what it reads.

use std::net::IpAddr;

use anyhow::Context;
use ipnet::IpNet;
use tether_proto::ids::{GatewayId, RegionId};
use tether_proto::net::{self, Family};
use tether_shell::tun;

use crate::counters::Counters;

/// MTU of the local gateway's device: large enough for most tunnels; a
/// packet too large for a site's tunnel is answered with packet-too-big.
pub const LOCAL_GATEWAY_MTU: usize = 1400;

/// A running local gateway.
pub struct LocalGateway {
    /// Its id in routes.
    pub id: GatewayId,
    /// Its region.
    pub region: RegionId,
    /// Backend prefixes behind it (allowed sources).
    pub prefixes: Vec<IpNet>,
    /// Its MTU.
    pub mtu: usize,
    /// Whether the device offloads segmentation (writes carry a virtio-net
    /// header, reads may carry many packets).
    pub offload: bool,
    /// Traffic out of (rx) and into (tx) the device.
    pub counters: Counters,
    dev: tun_rs::AsyncDevice,
}

impl std::fmt::Debug for LocalGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalGateway")
            .field("id", &self.id)
            .field("region", &self.region)
            .field("offload", &self.offload)
            .finish_non_exhaustive()
    }
}

impl LocalGateway {
    /// Writes one packet (an ICMP error), adding the virtio-net header when
    /// the device offloads; fails when the device's queue is full.
    pub fn send(&self, packet: &[u8]) -> std::io::Result<usize> {
        if self.offload {
            self.dev.try_send(&tun::with_vnet_hdr(packet))
        } else {
            self.dev.try_send(packet)
        }
    }

    /// Writes packets framed for the device (each after [`tun::VNET_HDR`]
    /// bytes of room), coalesced ([`tun::write_batch`]).
    pub async fn write_batch(
        &self,
        gro: &mut tun_rs::GROTable,
        batch: &mut [bytes::BytesMut],
    ) -> std::io::Result<()> {
        tun::write_batch(&self.dev, self.offload, gro, batch).await
    }

    /// Writes a packet already framed for the device (with its virtio-net
    /// header when it offloads), without waiting.
    pub fn write(&self, framed: &[u8]) -> std::io::Result<usize> {
        self.dev.try_send(framed)
    }

    /// Reads the next packets out of the device (a whole segmented burst
    /// when it offloads), split up into `packets`.
    pub async fn read(&self, packets: &mut tun::BatchReader) -> std::io::Result<usize> {
        packets.read(&self.dev).await
    }
}

/// The router address of a pool: its second address.
fn router_addr(pool: &IpNet) -> IpAddr {
    let (family, start, _) = net::span(*pool);
    net::from_bits(family, start + 1)
}

/// Creates the device of the local gateway configured as `cfg`, with the
/// router address of each pool in `reachable` (the pools of every region
/// whose sites it may reach). Needs CAP_NET_ADMIN.
pub fn open(
    cfg: &tether_config::broker::LocalGateway,
    reachable: &[IpNet],
) -> anyhow::Result<LocalGateway> {
    let v4: Vec<&IpNet> = reachable
        .iter()
        .filter(|p| Family::of(p.addr()) == Family::V4)
        .collect();
    let v6: Vec<&IpNet> = reachable
        .iter()
        .filter(|p| Family::of(p.addr()) == Family::V6)
        .collect();
    let build = |offload: bool| -> std::io::Result<tun_rs::AsyncDevice> {
        let mut builder = tun_rs::DeviceBuilder::new()
            .name(&cfg.tun_name)
            .mtu(LOCAL_GATEWAY_MTU as u16)
            .offload(offload);
        if let Some(pool) = v4.first()
            && let IpAddr::V4(a) = router_addr(pool)
        {
            builder = builder.ipv4(a, pool.prefix_len(), None);
        }
        for pool in &v6 {
            if let IpAddr::V6(a) = router_addr(pool) {
                builder = builder.ipv6(a, pool.prefix_len());
            }
        }
        builder.build_async()
    };
    // TETHER_TUN_OFFLOAD=0 turns offload off (for kernels where it
    // misbehaves).
    let want = std::env::var("TETHER_TUN_OFFLOAD").map_or(true, |v| v != "0");
    let (dev, offload) = match build(want) {
        Ok(dev) => (dev, true),
        Err(_) => (
            build(false).with_context(|| {
                format!(
                    "failed to create the local gateway device {} (needs root or CAP_NET_ADMIN)",
                    cfg.tun_name
                )
            })?,
            false,
        ),
    };
    // Further IPv4 pools become additional addresses of the device.
    for pool in v4.iter().skip(1) {
        if let IpAddr::V4(a) = router_addr(pool) {
            dev.add_address_v4(a, pool.prefix_len()).with_context(|| {
                format!(
                    "failed to add {a}/{} to {}",
                    pool.prefix_len(),
                    cfg.tun_name
                )
            })?;
        }
    }
    tracing::info!(device = %cfg.tun_name, offload, pools = ?reachable, "local gateway up");
    Ok(LocalGateway {
        id: cfg.id.clone(),
        region: cfg.region.clone(),
        prefixes: cfg.prefixes.clone(),
        mtu: LOCAL_GATEWAY_MTU,
        offload,
        counters: Counters::default(),
        dev,
    })
}
