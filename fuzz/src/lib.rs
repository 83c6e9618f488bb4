//! Helpers shared by tether's fuzz targets: cutting one input into the
//! pieces a stream delivers, and the fixtures the targets run against.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use tether_proto::forward::Router;
use tether_proto::policy::{self, Policy};
use tether_proto::route::{Route, RouteKind, RouteTarget};
use tether_proto::{GatewayId, RegionId, SiteId};

/// Splits `data` into the chunks a stream could deliver it in: the first
/// byte chooses two chunk sizes (1 to 16 bytes) used in turn, so the
/// fuzzer explores every boundary a decoder must resume at.
pub fn chunked(data: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let Some((&control, rest)) = data.split_first() else {
        return (Vec::new(), data);
    };
    let sizes = [
        usize::from(control & 0x0f) + 1,
        usize::from(control >> 4) + 1,
    ];
    let mut chunks = Vec::new();
    let mut at = 0;
    let mut turn = 0;
    while at < rest.len() {
        let end = (at + sizes[turn % 2]).min(rest.len());
        chunks.push(&rest[at..end]);
        at = end;
        turn += 1;
    }
    (chunks, rest)
}

/// Parses a value the fixtures spell out; they are constants, so failing
/// here is a bug in the fixture.
pub fn parsed<T: std::str::FromStr>(text: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    match text.parse() {
        Ok(v) => v,
        Err(e) => panic!("fixture value {text:?} does not parse: {e:?}"),
    }
}

/// A broker's router with two sites and a gateway in region `eu`, a site
/// in `us`, IPv4 and IPv6 routes, a LAN mapping and an access policy
/// (the forwarding unit tests' fixture).
pub struct RouterFixture {
    /// The router.
    pub router: Router,
    /// Site `a` in `eu` (100.64.0.2, fd00::2, LAN 100.70.3.0/24).
    pub a: SiteId,
    /// Site `c` in `us` (100.80.0.2).
    pub c: SiteId,
    /// Region `eu`.
    pub eu: RegionId,
    /// Region `us`.
    pub us: RegionId,
    /// The gateway in `eu` (10.20.0.0/16, fd20::/48).
    pub gw: GatewayId,
    /// What site `a` may send from.
    pub a_allowed: Vec<IpNet>,
    /// What site `c` may send from.
    pub c_allowed: Vec<IpNet>,
}

impl RouterFixture {
    /// Builds the fixture.
    pub fn new() -> Self {
        let (eu, us): (RegionId, RegionId) = (parsed("eu"), parsed("us"));
        let (a, b, c): (SiteId, SiteId, SiteId) = (parsed("a"), parsed("b"), parsed("c"));
        let gw: GatewayId = parsed("local");
        let mut router = Router::default();
        let routes = [
            (
                "100.64.0.2/32",
                RouteKind::SiteAddress,
                RouteTarget::Site(a.clone()),
                &eu,
            ),
            (
                "fd00::2/128",
                RouteKind::SiteAddress,
                RouteTarget::Site(a.clone()),
                &eu,
            ),
            (
                "100.70.3.0/24",
                RouteKind::SiteLan,
                RouteTarget::Site(a.clone()),
                &eu,
            ),
            (
                "100.64.0.3/32",
                RouteKind::SiteAddress,
                RouteTarget::Site(b.clone()),
                &eu,
            ),
            (
                "100.80.0.2/32",
                RouteKind::SiteAddress,
                RouteTarget::Site(c.clone()),
                &us,
            ),
            (
                "10.20.0.0/16",
                RouteKind::Gateway,
                RouteTarget::Gateway(gw.clone()),
                &eu,
            ),
            (
                "fd20::/48",
                RouteKind::Gateway,
                RouteTarget::Gateway(gw.clone()),
                &eu,
            ),
        ];
        for (prefix, kind, target, region) in routes {
            router.table.insert(Route {
                prefix: parsed(prefix),
                kind,
                target,
                region: region.clone(),
            });
        }
        router
            .router_addresses
            .insert(eu.clone(), vec![parsed("100.64.0.1"), parsed("fd00::1")]);
        router
            .router_addresses
            .insert(us.clone(), vec![parsed("100.80.0.1")]);
        let rules = vec![policy::Rule {
            name: "a-and-b".into(),
            from: vec![parsed("site:a"), parsed("site:b")],
            to: vec![parsed("site:a"), parsed("site:b")],
            ports: vec![],
        }];
        if let Ok(p) = Policy::new(rules, HashMap::new(), policy::Backends::Region) {
            router.policy = Arc::new(p);
        }
        Self {
            router,
            a,
            c,
            eu,
            us,
            gw,
            a_allowed: vec![
                parsed("100.64.0.2/32"),
                parsed("fd00::2/128"),
                parsed("100.70.3.0/24"),
            ],
            c_allowed: vec![parsed("100.80.0.2/32")],
        }
    }
}

impl Default for RouterFixture {
    fn default() -> Self {
        Self::new()
    }
}

/// The router address of `packet`'s family, as the broker would use.
pub fn router_address(v6: bool) -> IpAddr {
    if v6 {
        parsed("fd00::1")
    } else {
        parsed("100.64.0.1")
    }
}
