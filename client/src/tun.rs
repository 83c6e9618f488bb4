//! The site's TUN device: assigned addresses, advertised routes, MTU.
//!
//! Routes are installed over netlink (no `ip` binary needed), in the main
//! table, through the device. A route that would cover the broker's own
//! address is never installed: it would send the tunnel into itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use anyhow::Context;
use futures_util::StreamExt;
use ipnet::IpNet;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::route::RouteMessage;
use rtnetlink::proto::ConnectionHandle;
use rtnetlink::sys::SocketAddr;

/// The site's TUN device.
pub struct Tun {
    /// The device (shared with the packet tasks).
    pub dev: Arc<tun_rs::AsyncDevice>,
    /// Whether the device uses segmentation offload: reads may carry many
    /// packets, and every write starts with a virtio-net header.
    pub offload: bool,
    name: String,
    index: u32,
    netlink: ConnectionHandle<RouteNetlinkMessage>,
    addresses: Vec<IpNet>,
    routes: Vec<IpNet>,
    mtu: u16,
    /// Buffers for the first pump that writes to the device, made with
    /// the device: allocating them (a quarter of a megabyte of GRO tables,
    /// a page fault per allocation) is then off a session's way to its
    /// first packet when the device is made ahead.
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
        let (mut conn, netlink, _) =
            rtnetlink::proto::new_connection(rtnetlink::sys::protocols::NETLINK_ROUTE)
                .context("cannot open netlink")?;
        // Every acknowledgement reaches the request, so each route of a
        // batch gets its own answer.
        conn.set_forward_ack(true);
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
        // One batch, one write: the kernel applies the messages in order
        // and acknowledges each, so the whole change costs one wait for the
        // kernel (a session's first routes are on the way to its first
        // packet). Separate requests would each wait for the connection's
        // next turn: netlink-proto sends one request per wake-up.
        let removed: Vec<IpNet> = self
            .routes
            .iter()
            .copied()
            .filter(|old| !wanted.contains(old))
            .collect();
        // Each change with the route it adds (`None` for a removal).
        let mut changes = Vec::with_capacity(removed.len() + wanted.len());
        for old in &removed {
            let message = RouteNetlinkMessage::DelRoute(self.message(*old));
            changes.push((None, request(message, NLM_F_REQUEST | NLM_F_ACK)));
        }
        for new in &wanted {
            let message = RouteNetlinkMessage::NewRoute(self.message(*new));
            let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE | NLM_F_CREATE;
            changes.push((Some(*new), request(message, flags)));
        }
        // A batch is one datagram, and the kernel queues all of its
        // acknowledgements before any is read: a chunk's must fit in the
        // socket's receive buffer (about 830 bytes each against 208 KiB by
        // default), or the ones that do not are lost and the batch never
        // completes. Bounded in size, and in time for a kernel that
        // answers less than asked.
        for chunk in changes.chunks(ROUTE_BATCH) {
            let mut answers = self
                .netlink
                .request_batch(chunk.iter().map(|(_, m)| m.clone()), SocketAddr::new(0, 0))
                .context("the netlink connection is closed")?;
            // One acknowledgement per message, in the order sent. A route
            // that was already gone is not an error; one that cannot be
            // added is.
            let mut answered = 0;
            let read = async {
                while let Some(answer) = answers.next().await {
                    let NetlinkPayload::Error(e) = answer.payload else {
                        continue;
                    };
                    if e.code.is_some()
                        && let Some((Some(route), _)) = chunk.get(answered)
                    {
                        return Err(e.to_io()).with_context(|| {
                            format!("cannot add the route {route} via {}", self.name)
                        });
                    }
                    answered += 1;
                }
                Ok(())
            };
            if let Ok(result) = tokio::time::timeout(ROUTE_ANSWER_TIMEOUT, read).await {
                result?;
            }
            if answered < chunk.len() {
                anyhow::bail!(
                    "netlink answered {answered} of {} route changes via {}",
                    chunk.len(),
                    self.name
                );
            }
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

/// Route changes sent to the kernel in one datagram: their
/// acknowledgements (about 830 bytes each in the receive buffer) take a
/// quarter of a default-sized one.
const ROUTE_BATCH: usize = 64;

/// The longest wait for the kernel's answers to one batch of route changes.
const ROUTE_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A netlink request of `message` with `flags`.
fn request(message: RouteNetlinkMessage, flags: u16) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut request = NetlinkMessage::from(message);
    request.header.flags = flags;
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `ip args` in the network namespace of the calling thread.
    fn ip_here(args: &[&str]) -> String {
        let ns = format!(
            "--net=/proc/{}/task/{}/ns/net",
            std::process::id(),
            nix::unistd::gettid()
        );
        let out = std::process::Command::new("nsenter")
            .arg(ns)
            .arg("ip")
            .args(args)
            .output()
            .expect("nsenter runs");
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// The prefixes routed through `dev`, both families.
    fn routes_via(dev: &str) -> Vec<String> {
        let mut routes: Vec<String> = ["-4", "-6"]
            .iter()
            .flat_map(|family| {
                ip_here(&[family, "-o", "route", "show", "dev", dev])
                    .lines()
                    .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                    .filter(|p| !p.starts_with("fe80") && !p.starts_with("multicast"))
                    .collect::<Vec<_>>()
            })
            .collect();
        routes.sort();
        routes
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|p| p.parse().unwrap()).collect()
    }

    /// The routes go in as one netlink batch: added, replaced, removed as
    /// the set changes, one covering the broker's address skipped, and a
    /// route the kernel refuses reported by name. In a network namespace
    /// of the test's own thread (gone with the thread); needs root.
    #[test]
    fn routes_are_set_in_one_batch_and_refusals_named() {
        if !nix::unistd::geteuid().is_root() {
            assert!(std::env::var_os("CI").is_none(), "CI must run this as root");
            println!("skipped: needs root");
            return;
        }
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let mut tun = Tun::create("tt-routes0", 1360).unwrap();
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
                    routes_via("tt-routes0"),
                    [
                        "10.20.0.0/24",
                        "100.64.0.0/16",
                        "fd20::/64",
                        "fd74:6574:6865::/48"
                    ]
                );
                let second = nets(&["10.20.0.0/24", "10.30.0.0/16", "fd20::/64"]);
                assert!(tun.set_routes(&second, &[broker]).await.unwrap().is_empty());
                assert_eq!(
                    routes_via("tt-routes0"),
                    ["10.20.0.0/24", "10.30.0.0/16", "fd20::/64"]
                );
                // More routes than one batch carries: several batches,
                // every route in, then all but one removed again.
                let many: Vec<IpNet> = (0..300u32)
                    .map(|i| {
                        IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::from(0x0a32_0000 + i), 32).unwrap())
                    })
                    .chain(second.iter().copied())
                    .collect();
                assert!(tun.set_routes(&many, &[broker]).await.unwrap().is_empty());
                assert_eq!(routes_via("tt-routes0").len(), 303);
                assert!(tun.set_routes(&second, &[broker]).await.unwrap().is_empty());
                assert_eq!(
                    routes_via("tt-routes0"),
                    ["10.20.0.0/24", "10.30.0.0/16", "fd20::/64"]
                );
                // A device that is down takes no IPv4 route.
                ip_here(&["link", "set", "tt-routes0", "down"]);
                let refused = nets(&["10.40.0.0/16", "fd20::/64"]);
                let e = tun.set_routes(&refused, &[broker]).await.unwrap_err();
                let text = format!("{e:#}");
                assert!(
                    text.contains("cannot add the route 10.40.0.0/16 via tt-routes0"),
                    "{text}"
                );
            });
        })
        .join()
        .unwrap();
    }
}
