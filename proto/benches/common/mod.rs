//! The route table of the proto benches: 100,000 routes shaped like a
//! large deployment, from a deterministic generator.
#![allow(dead_code)]

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tether_proto::route::{Route, RouteKind, RouteTarget};
use tether_proto::{GatewayId, RegionId, SiteId};

/// Routes generated (duplicates merge in the table).
pub const ROUTES: usize = 100_000;

/// splitmix64: a deterministic generator, so every run measures the same set.
pub struct Rng(pub u64);
impl Rng {
    /// The next value.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// 80,000 IPv4 and 10,000 IPv6 site addresses, 9,000 LAN mappings of /24
/// to /27, 1,000 gateway prefixes of /8 to /20 (region `eu`).
pub fn build(rng: &mut Rng) -> Vec<Route> {
    let eu = RegionId::new("eu").unwrap();
    let mut routes = Vec::with_capacity(ROUTES);
    let mut push = |prefix: IpNet, kind, target| {
        routes.push(Route {
            prefix: prefix.trunc(),
            kind,
            target,
            region: eu.clone(),
        })
    };
    // 80,000 IPv4 site addresses in 100.64.0.0/10.
    for i in 0..80_000u32 {
        let a = Ipv4Addr::from(0x6440_0000 | (rng.next() as u32 & 0x003f_ffff));
        push(
            IpNet::V4(Ipv4Net::new(a, 32).unwrap()),
            RouteKind::SiteAddress,
            RouteTarget::Site(SiteId::new(format!("site-{i}")).unwrap()),
        );
    }
    // 10,000 IPv6 site addresses in fd7a:115c:a1e0::/48.
    for i in 0..10_000u32 {
        let a = Ipv6Addr::from((0xfd7a_115c_a1e0u128 << 80) | u128::from(rng.next() as u32));
        push(
            IpNet::V6(Ipv6Net::new(a, 128).unwrap()),
            RouteKind::SiteAddress,
            RouteTarget::Site(SiteId::new(format!("site-{i}")).unwrap()),
        );
    }
    // 9,000 LAN mappings of /24 to /27 in 100.64.0.0/10.
    for i in 0..9_000u32 {
        let a = Ipv4Addr::from(0x6440_0000 | (rng.next() as u32 & 0x003f_ffff));
        let len = 24 + (rng.next() % 4) as u8;
        push(
            IpNet::V4(Ipv4Net::new(a, len).unwrap()),
            RouteKind::SiteLan,
            RouteTarget::Site(SiteId::new(format!("site-{i}")).unwrap()),
        );
    }
    // 1,000 gateway prefixes of /8 to /20 anywhere.
    for i in 0..1_000u32 {
        let a = Ipv4Addr::from(rng.next() as u32);
        let len = 8 + (rng.next() % 13) as u8;
        push(
            IpNet::V4(Ipv4Net::new(a, len).unwrap()),
            RouteKind::Gateway,
            RouteTarget::Gateway(GatewayId::new(format!("gw-{}", i % 20)).unwrap()),
        );
    }
    routes
}
