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
use rtnetlink::packet_route::route::RouteMessage;
use tether_shell::netlink::{RouteChange, RouteHandle};

/// The site's TUN device.
pub struct Tun {
    /// The device (shared with the packet tasks).
    pub dev: Arc<tun_rs::AsyncDevice>,
    /// Whether the device uses segmentation offload: reads may carry many
    /// packets, and every write starts with a virtio-net header.
    pub offload: bool,
    name: String,
    index: u32,
    netlink: RouteHandle,
    addresses: Vec<IpNet>,
    routes: Vec<IpNet>,
    mtu: u16,
    /// Buffers for the first pump that writes to the device, made with
    /// the device: allocating them (tun-rs's GRO tables, hundreds of
    /// allocations at a page fault each) is then off a session's way to
    /// its first packet when the device is made ahead.
    spare_batch: std::sync::Mutex<Option<tether_shell::tun::DeviceBatch>>,
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
        let netlink = tether_shell::netlink::connect().context("cannot open netlink")?;
        Ok(Self {
            dev: Arc::new(dev),
            offload,
            name: name.to_string(),
            index,
            netlink,
            addresses: Vec::new(),
            routes: Vec::new(),
            mtu,
            spare_batch: std::sync::Mutex::new(Some(tether_shell::tun::DeviceBatch::new(offload))),
        })
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Buffers for writing to the device in batches: the ones made with
    /// the device the first time, new ones after.
    pub fn write_batch(&self) -> tether_shell::tun::DeviceBatch {
        self.spare_batch
            .lock()
            .ok()
            .and_then(|mut spare| spare.take())
            .unwrap_or_else(|| tether_shell::tun::DeviceBatch::new(self.offload))
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
        // In batches (see `tether_shell::netlink`): a session's first
        // routes are on the way to its first packet. A route that was
        // already gone is not an error; one that cannot be added is.
        let removed = self.routes.iter().filter(|old| !wanted.contains(old));
        let changes: Vec<RouteChange> = removed
            .map(|old| RouteChange::Remove(self.message(*old)))
            .chain(
                wanted
                    .iter()
                    .map(|new| RouteChange::Add(self.message(*new))),
            )
            .collect();
        let removals = changes.len() - wanted.len();
        let outcomes = tether_shell::netlink::apply(&self.netlink, &changes).await;
        if let Some((route, e)) = wanted
            .iter()
            .zip(outcomes.into_iter().skip(removals))
            .find_map(|(route, outcome)| outcome.err().map(|e| (route, e)))
        {
            return Err(e)
                .with_context(|| format!("cannot add the route {route} via {}", self.name));
        }
        self.routes = wanted;
        Ok(skipped)
    }

    fn message(&self, prefix: IpNet) -> RouteMessage {
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

#[cfg(test)]
mod tests {
    use tether_shell::netns;

    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|p| p.parse().unwrap()).collect()
    }

    /// The device's routes follow the broker's set: added, replaced and
    /// removed as the set changes (in batches, more routes than one batch
    /// carries), one covering the broker's address skipped, and a route
    /// the kernel refuses reported by name. In a network namespace of the
    /// test's thread; needs root.
    #[test]
    fn routes_follow_the_set_and_refusals_are_named() {
        netns::run(|| async {
            let mut tun = Tun::create("tt-routes0", 1360).unwrap();
            let via = || netns::routes(&["dev", "tt-routes0"]);
            let broker: IpAddr = "203.0.113.10".parse().unwrap();
            let first = nets(&[
                "10.20.0.0/24",
                "100.64.0.0/16",
                "203.0.113.0/24",
                "fd20::/64",
                "fd74:6574:6865::/48",
            ]);
            let skipped = tun.set_routes(&first, &[broker]).await.unwrap();
            assert_eq!(skipped, nets(&["203.0.113.0/24"]));
            assert_eq!(
                via(),
                [
                    "10.20.0.0/24",
                    "100.64.0.0/16",
                    "fd20::/64",
                    "fd74:6574:6865::/48"
                ]
            );
            let second = nets(&["10.20.0.0/24", "10.30.0.0/16", "fd20::/64"]);
            assert!(tun.set_routes(&second, &[broker]).await.unwrap().is_empty());
            assert_eq!(via(), ["10.20.0.0/24", "10.30.0.0/16", "fd20::/64"]);
            let many: Vec<IpNet> = (0..300u32)
                .map(|i| {
                    IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::from(0x0a32_0000 + i), 32).unwrap())
                })
                .chain(second.iter().copied())
                .collect();
            assert!(tun.set_routes(&many, &[broker]).await.unwrap().is_empty());
            assert_eq!(via().len(), 303);
            assert!(tun.set_routes(&second, &[broker]).await.unwrap().is_empty());
            assert_eq!(via(), ["10.20.0.0/24", "10.30.0.0/16", "fd20::/64"]);
            // A device that is down takes no IPv4 route.
            netns::ip(&["link", "set", "tt-routes0", "down"]);
            let refused = nets(&["10.40.0.0/16", "fd20::/64"]);
            let e = tun.set_routes(&refused, &[broker]).await.unwrap_err();
            let text = format!("{e:#}");
            assert!(
                text.contains("cannot add the route 10.40.0.0/16 via tt-routes0"),
                "{text}"
            );
        });
    }
}
