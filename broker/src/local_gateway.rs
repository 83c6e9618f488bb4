//! The local gateway: a TUN device on the broker host, so hosts of the
//! broker's network reach sites without a remote gateway.
//!
//! The device gets each pool's router address with the pool's prefix
//! length, so the kernel routes every pool the gateway may reach into it.
//! Hosts elsewhere route the pools via the broker host, which must forward
//! (`net.ipv4.ip_forward=1`, `net.ipv6.conf.all.forwarding=1`): the broker
//! itself changes no sysctl.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use tether_proto::ids::{GatewayId, RegionId};
use tether_proto::net::{self, Family};

use crate::state::Broker;

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
    dev: tun_rs::AsyncDevice,
}

impl std::fmt::Debug for LocalGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalGateway")
            .field("id", &self.id)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl LocalGateway {
    /// Writes a packet to the device without waiting; fails when the
    /// device's queue is full.
    pub fn send(&self, packet: &[u8]) -> std::io::Result<usize> {
        self.dev.try_send(packet)
    }
}

/// Creates the device and starts reading it. Needs CAP_NET_ADMIN.
pub fn start(broker: &Arc<Broker>) -> anyhow::Result<Option<Arc<LocalGateway>>> {
    use anyhow::Context;
    let Some(cfg) = broker.config.local_gateway.clone() else {
        return Ok(None);
    };
    // The pools of every region whose sites this gateway may reach.
    let reachable: Vec<IpNet> = {
        let router = broker
            .router
            .read()
            .map_err(|_| anyhow::anyhow!("router lock poisoned"))?;
        broker
            .pools()
            .into_iter()
            .filter(|(site_region, _)| router.residency.permits(site_region, &cfg.region))
            .flat_map(|(_, pools)| pools)
            .collect()
    };
    let router_addr = |pool: &IpNet| {
        let (family, start, _) = net::span(*pool);
        net::from_bits(family, start + 1)
    };
    let mut builder = tun_rs::DeviceBuilder::new()
        .name(&cfg.tun_name)
        .mtu(LOCAL_GATEWAY_MTU as u16);
    let mut extra = Vec::new();
    let mut have_v4 = false;
    for pool in &reachable {
        match (router_addr(pool), Family::of(pool.addr())) {
            (IpAddr::V4(a), Family::V4) if !have_v4 => {
                builder = builder.ipv4(a, pool.prefix_len(), None);
                have_v4 = true;
            }
            (IpAddr::V6(a), Family::V6) => builder = builder.ipv6(a, pool.prefix_len()),
            (addr, _) => extra.push((addr, pool.prefix_len())),
        }
    }
    let dev = builder.build_async().with_context(|| {
        format!(
            "failed to create the local gateway device {} (needs root or CAP_NET_ADMIN)",
            cfg.tun_name
        )
    })?;
    for (addr, len) in extra {
        if let IpAddr::V4(a) = addr {
            dev.add_address_v4(a, len)
                .with_context(|| format!("failed to add {a}/{len} to {}", cfg.tun_name))?;
        }
    }
    let gw = Arc::new(LocalGateway {
        id: cfg.id.clone(),
        region: cfg.region.clone(),
        prefixes: cfg.prefixes.clone(),
        mtu: LOCAL_GATEWAY_MTU,
        dev,
    });
    if broker.local_gateway.set(gw.clone()).is_err() {
        anyhow::bail!("local gateway started twice");
    }
    let reader = gw.clone();
    let broker = broker.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        loop {
            match reader.dev.recv(&mut buf).await {
                Ok(n) => {
                    crate::plane::from_local_gateway(&broker, buf.get(..n).unwrap_or_default())
                }
                Err(e) => {
                    tracing::error!(error = %e, "local gateway device failed; backends can no longer reach sites");
                    break;
                }
            }
        }
    });
    tracing::info!(device = %cfg.tun_name, pools = ?reachable, "local gateway up");
    Ok(Some(gw))
}
