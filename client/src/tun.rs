//! The site's TUN device: assigned addresses, advertised routes, MTU.
//!
//! Routes are installed over netlink (no `ip` binary needed), in the main
//! table, through the device. A route that would cover the broker's own
//! address is never installed: it would send the tunnel into itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use anyhow::Context;
use ipnet::IpNet;
use rtnetlink::RouteMessageBuilder;

/// The site's TUN device.
pub struct Tun {
    /// The device (shared with the packet tasks).
    pub dev: Arc<tun_rs::AsyncDevice>,
    /// Whether the device uses segmentation offload: reads may carry many
    /// packets, and every write starts with a virtio-net header.
    pub offload: bool,
    name: String,
    index: u32,
    netlink: rtnetlink::Handle,
    addresses: Vec<IpNet>,
    routes: Vec<IpNet>,
    mtu: u16,
}

impl std::fmt::Debug for Tun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tun")
            .field("name", &self.name)
            .field("mtu", &self.mtu)
            .finish_non_exhaustive()
    }
}

impl Tun {
    /// Creates the device, up, without addresses, with segmentation offload
    /// when the kernel supports it. Needs root or CAP_NET_ADMIN.
    pub fn create(name: &str, mtu: u16) -> anyhow::Result<Self> {
        let build = |offload: bool| {
            tun_rs::DeviceBuilder::new()
                .name(name)
                .mtu(mtu)
                .offload(offload)
                .enable(true)
                .build_async()
        };
        // TETHER_TUN_OFFLOAD=0 turns offload off (for kernels where it
        // misbehaves).
        let want = std::env::var("TETHER_TUN_OFFLOAD").map_or(true, |v| v != "0");
        let (dev, offload) = match build(want) {
            Ok(dev) => (dev, true),
            Err(_) => (
                build(false).with_context(|| format!("cannot create the tunnel device {name} (run as root, or with CAP_NET_ADMIN)"))?,
                false,
            ),
        };
        let index = dev.if_index().context("tunnel device has no index")?;
        let (conn, netlink, _) = rtnetlink::new_connection().context("cannot open netlink")?;
        tokio::spawn(conn);
        Ok(Self {
            dev: Arc::new(dev),
            offload,
            name: name.to_string(),
            index,
            netlink,
            addresses: Vec::new(),
            routes: Vec::new(),
            mtu,
        })
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current MTU.
    pub fn mtu(&self) -> u16 {
        self.mtu
    }

    /// Sets the MTU.
    pub fn set_mtu(&mut self, mtu: u16) -> anyhow::Result<()> {
        if mtu != self.mtu {
            self.dev
                .set_mtu(mtu)
                .with_context(|| format!("cannot set the MTU of {} to {mtu}", self.name))?;
            self.mtu = mtu;
        }
        Ok(())
    }

    /// Makes the device's addresses exactly the host addresses in `assigned`
    /// (mapped LAN prefixes are not local addresses).
    pub fn set_addresses(&mut self, assigned: &[IpNet]) -> anyhow::Result<()> {
        let wanted: Vec<IpNet> = assigned
            .iter()
            .copied()
            .filter(|p| p.prefix_len() == p.max_prefix_len())
            .collect();
        for old in self.addresses.clone() {
            if !wanted.contains(&old) {
                let _ = self.dev.remove_address(old.addr());
            }
        }
        for new in &wanted {
            if self.addresses.contains(new) {
                continue;
            }
            match new.addr() {
                IpAddr::V4(a) => self.dev.add_address_v4(a, 32),
                IpAddr::V6(a) => self.dev.add_address_v6(a, 128),
            }
            .with_context(|| format!("cannot add {new} to {}", self.name))?;
        }
        self.addresses = wanted;
        Ok(())
    }

    /// Makes the device's routes exactly `routes`, except any covering one
    /// of `avoid` (the broker's addresses). Returns the skipped routes.
    pub async fn set_routes(
        &mut self,
        routes: &[IpNet],
        avoid: &[IpAddr],
    ) -> anyhow::Result<Vec<IpNet>> {
        let (wanted, skipped): (Vec<IpNet>, Vec<IpNet>) = routes
            .iter()
            .copied()
            .partition(|r| !avoid.iter().any(|a| r.contains(a)));
        // The requests go out together, each answered on its own sequence
        // number: one wait for the kernel instead of one per route (a
        // session's first routes are on the way to its first packet).
        let removed = self
            .routes
            .iter()
            .filter(|old| !wanted.contains(old))
            .map(|old| self.netlink.route().del(self.message(*old)).execute());
        futures_util::future::join_all(removed).await;
        let this = &*self;
        let added = wanted.iter().map(|route| async move {
            this.netlink
                .route()
                .add(this.message(*route))
                .replace()
                .execute()
                .await
                .with_context(|| format!("cannot add the route {route} via {}", this.name))
        });
        futures_util::future::try_join_all(added).await?;
        self.routes = wanted;
        Ok(skipped)
    }

    fn message(&self, prefix: IpNet) -> netlink_route_message::RouteMessage {
        match prefix {
            IpNet::V4(p) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(p.network(), p.prefix_len())
                .output_interface(self.index)
                .build(),
            IpNet::V6(p) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(p.network(), p.prefix_len())
                .output_interface(self.index)
                .build(),
        }
    }
}

mod netlink_route_message {
    pub use rtnetlink::packet_route::route::RouteMessage;
}
