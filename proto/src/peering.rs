//! Routes through other brokers of the fleet: which destinations are held
//! by another live broker, and which broker that is.
//!
//! A broker's own route table ([`crate::route::RouteTable`]) holds the
//! sites whose sessions it terminates and the gateways attached to it. The
//! rest of the deployment is known from the shared store: the address
//! leases say which prefixes belong to which site, the fleet says which
//! broker holds each site's session and which gateways each broker has
//! ([`crate::fleet::Member::gateways`]). [`RemoteRoutes::build`] joins the
//! two into one table of routes, each with the broker that holds its
//! target. The router consults it only when its own table has nothing more
//! specific ([`crate::forward::Router::decide`]), so a session that comes
//! here wins over the store's view of it at once.
//!
//! Only sites held by a *live* broker with a link ([`PeerView`]) get
//! routes: a site whose broker died has none until it is back on a broker,
//! and its packets are dropped as `no_route`, as for a site that is offline.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::fleet::{BrokerId, Fleet};
use crate::ids::{GatewayId, RegionId, SiteId};
use crate::ipam::{Lease, LeaseKind};
use crate::route::{Route, RouteKind, RouteTable, RouteTarget};

/// A gateway attached to another broker, as it announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteGateway {
    /// The gateway.
    pub id: GatewayId,
    /// Its region.
    pub region: RegionId,
    /// The backend prefixes behind it.
    pub prefixes: Vec<IpNet>,
}

/// What the fleet says about other brokers, for routing: who holds which
/// site, and which gateways each broker has. Only live brokers with a
/// broker-to-broker link appear.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerView {
    /// Sites held by another broker, and that broker.
    pub holders: BTreeMap<SiteId, BrokerId>,
    /// Gateways of other brokers, by broker.
    pub gateways: BTreeMap<BrokerId, Vec<RemoteGateway>>,
}

impl PeerView {
    /// The view of `fleet` from its own broker: every site held by another
    /// live broker that announces a link, and those brokers' gateways.
    pub fn of(fleet: &Fleet) -> Self {
        let links: BTreeSet<BrokerId> = fleet.link_members().into_keys().cloned().collect();
        Self::among(fleet, &links)
    }

    /// The view of `fleet` with `links` the other brokers the link has as
    /// peers (those whose link key is proven): sites and gateways of any
    /// other broker get no route.
    pub fn among(fleet: &Fleet, links: &BTreeSet<BrokerId>) -> Self {
        let linked = |broker: &BrokerId| links.contains(broker);
        let holders = fleet
            .owners()
            .filter(|(_, owner)| linked(&owner.broker))
            .map(|(site, owner)| (site.clone(), owner.broker.clone()))
            .collect();
        let gateways = fleet
            .members()
            .iter()
            .filter(|(id, m)| linked(id) && !m.gateways.is_empty())
            .map(|(id, m)| {
                let gateways = m
                    .gateways
                    .iter()
                    .map(|g| RemoteGateway {
                        id: g.id.clone(),
                        region: g.region.clone(),
                        prefixes: g.prefixes.clone(),
                    })
                    .collect();
                (id.clone(), gateways)
            })
            .collect();
        Self { holders, gateways }
    }
}

/// How often the link sends a keepalive to a peer it has sent nothing
/// else to meanwhile (announced as [`crate::fleet::Member::link_keepalive_ms`]).
pub const LINK_KEEPALIVE: Duration = Duration::from_millis(250);

/// A peer that announces keepalives and has been heard from before is down
/// once nothing authenticated came from it for this long: four keepalives
/// missed. Far sooner than its store lease expires (5 s), so that packets
/// for the sites of a broker that died are counted as `peer_down` instead
/// of being sent into the link and lost.
pub const LINK_SILENCE: Duration = Duration::from_secs(1);

/// A peer whose first handshake has not completed this long after it was
/// added is down.
pub const HANDSHAKE_GRACE: Duration = Duration::from_secs(5);

/// A session older than this without a new handshake is down: WireGuard
/// rekeys every two minutes and rejects sessions after three.
pub const STALE_SESSION: Duration = Duration::from_secs(180);

/// What the link knows of one peer, to tell whether it is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkHealth {
    /// When the peer was added to the link.
    pub added: Instant,
    /// When the last authenticated datagram (packet, keepalive or
    /// handshake) came from it.
    pub heard: Option<Instant>,
    /// Time since the current session's handshake, if there is a session.
    pub session_age: Option<Duration>,
    /// WireGuard gave up handshaking.
    pub expired: bool,
    /// The peer announces keepalives ([`LINK_KEEPALIVE`]), so silence
    /// means it is gone.
    pub paced: bool,
}

impl LinkHealth {
    /// Whether the link to the peer is down at `now`: handshakes given up,
    /// no session yet [`HANDSHAKE_GRACE`] after it was added, a session
    /// far past rekeying, or (for a peer that sends keepalives) silent for
    /// [`LINK_SILENCE`] after it had been heard.
    pub fn is_down(&self, now: Instant) -> bool {
        if self.expired {
            return true;
        }
        let Some(age) = self.session_age else {
            return now.saturating_duration_since(self.added) > HANDSHAKE_GRACE;
        };
        if age > STALE_SESSION {
            return true;
        }
        self.paced
            && self
                .heard
                .is_some_and(|h| now.saturating_duration_since(h) > LINK_SILENCE)
    }
}

/// The largest IP packet the broker-to-broker link carries by default:
/// a 1500-byte path less WireGuard's overhead over IPv6 (80 bytes).
pub const DEFAULT_LINK_MTU: usize = 1420;

/// Routes to destinations held by other brokers: a route table whose
/// targets are remote sites and gateways, and the broker behind each.
#[derive(Debug, Clone)]
pub struct RemoteRoutes {
    table: RouteTable,
    /// Keyed by the whole route: two brokers may each have a gateway of
    /// the same id (a local gateway is usually called `local`).
    via: BTreeMap<Route, BrokerId>,
    mtu: usize,
}

impl Default for RemoteRoutes {
    fn default() -> Self {
        Self {
            table: RouteTable::default(),
            via: BTreeMap::new(),
            mtu: DEFAULT_LINK_MTU,
        }
    }
}

impl RemoteRoutes {
    /// The routes of `view` over the leases of every region: each lease of
    /// a site held by another broker becomes a route (its own address or
    /// its LAN mapping), each prefix of another broker's gateway too.
    /// `mtu` is the largest packet the link carries.
    pub fn build<'a>(
        view: &PeerView,
        leases: impl IntoIterator<Item = &'a Lease>,
        mtu: usize,
    ) -> Self {
        let mut out = Self {
            mtu,
            ..Self::default()
        };
        if view.holders.is_empty() && view.gateways.is_empty() {
            return out;
        }
        for lease in leases {
            let Some(broker) = view.holders.get(&lease.site) else {
                continue;
            };
            // A LAN mapping waiting to be released is routed nowhere.
            if !lease.in_use() {
                continue;
            }
            let kind = match lease.kind {
                LeaseKind::SiteAddress => RouteKind::SiteAddress,
                LeaseKind::LanMapping { .. } => RouteKind::SiteLan,
            };
            let route = Route {
                prefix: lease.prefix,
                kind,
                target: RouteTarget::Site(lease.site.clone()),
                region: lease.region.clone(),
            };
            out.table.insert(route.clone());
            out.via.insert(route, broker.clone());
        }
        for (broker, gateways) in &view.gateways {
            for g in gateways {
                for prefix in &g.prefixes {
                    let route = Route {
                        prefix: *prefix,
                        kind: RouteKind::Gateway,
                        target: RouteTarget::Gateway(g.id.clone()),
                        region: g.region.clone(),
                    };
                    // The same route announced by two brokers: the first
                    // in id order keeps it, the same choice everywhere.
                    if out.via.contains_key(&route) {
                        continue;
                    }
                    out.table.insert(route.clone());
                    out.via.insert(route, broker.clone());
                }
            }
        }
        out
    }

    /// The largest IP packet the link carries.
    pub fn mtu(&self) -> usize {
        self.mtu
    }

    /// Whether there is no remote route.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The remote route for `dst` and the broker that holds its target.
    pub fn lookup(&self, dst: IpAddr) -> Option<(&Route, &BrokerId)> {
        let route = self.table.lookup(dst).winner()?;
        let broker = self.via.get(route)?;
        Some((route, broker))
    }

    /// Every remote route with its broker, in table order.
    pub fn routes(&self) -> Vec<(&Route, &BrokerId)> {
        self.table
            .routes()
            .into_iter()
            .filter_map(|r| self.via.get(r).map(|b| (r, b)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::testing::id;
    use crate::fleet::{Member, MemberGateway};

    fn member(link: bool, gateways: Vec<MemberGateway>) -> Member {
        Member {
            endpoints: vec!["127.0.0.1:443".into()],
            regions: [id("eu")].into(),
            forward: link.then(|| "127.0.0.1:51821".into()),
            link_key: link.then(|| "a".repeat(43) + "="),
            link_proof: None,
            gateways,
            link_keepalive_ms: None,
            gateway_endpoint: None,
        }
    }

    fn lease(prefix: &str, site: &str, kind: LeaseKind) -> Lease {
        Lease {
            prefix: id(prefix),
            site: id(site),
            region: id("eu"),
            kind,
            release_at: None,
        }
    }

    #[test]
    fn sites_held_by_a_linked_broker_route_through_it() {
        let mut fleet = Fleet::new("a".into());
        fleet.handle_member("a".into(), member(true, vec![]), 1);
        fleet.handle_member(
            "b".into(),
            member(
                true,
                vec![MemberGateway {
                    id: id("backend"),
                    region: id("eu"),
                    prefixes: vec![id("10.20.0.0/16")],
                }],
            ),
            2,
        );
        fleet.handle_member("nolink".into(), member(false, vec![]), 3);
        fleet.handle_owner(id("here"), "a".into(), 1);
        fleet.handle_owner(id("there"), "b".into(), 2);
        fleet.handle_owner(id("old"), "nolink".into(), 3);
        fleet.handle_owner(id("orphan"), "dead".into(), 4);
        let view = PeerView::of(&fleet);
        assert_eq!(
            view.holders.keys().map(|s| s.as_str()).collect::<Vec<_>>(),
            ["there"]
        );
        let leases = [
            lease("100.64.0.2/32", "here", LeaseKind::SiteAddress),
            lease("100.64.0.3/32", "there", LeaseKind::SiteAddress),
            lease(
                "100.70.0.0/24",
                "there",
                LeaseKind::LanMapping {
                    lan: id("192.168.1.0/24"),
                },
            ),
            lease("100.64.0.4/32", "old", LeaseKind::SiteAddress),
            lease("100.64.0.5/32", "orphan", LeaseKind::SiteAddress),
        ];
        let remote = RemoteRoutes::build(&view, &leases, 1420);
        let (route, broker) = remote.lookup(id("100.64.0.3")).unwrap();
        assert_eq!(
            (&route.target, route.kind, broker.as_str()),
            (&RouteTarget::Site(id("there")), RouteKind::SiteAddress, "b")
        );
        let (route, _) = remote.lookup(id("100.70.0.9")).unwrap();
        assert_eq!(route.kind, RouteKind::SiteLan);
        let (route, broker) = remote.lookup(id("10.20.1.1")).unwrap();
        assert_eq!(
            (&route.target, broker.as_str()),
            (&RouteTarget::Gateway(id("backend")), "b")
        );
        for local_or_gone in ["100.64.0.2", "100.64.0.4", "100.64.0.5", "192.0.2.1"] {
            assert!(
                remote.lookup(id(local_or_gone)).is_none(),
                "{local_or_gone}"
            );
        }
        assert_eq!(remote.routes().len(), 3);
    }

    #[test]
    fn a_silent_peer_that_sends_keepalives_is_down_within_a_second() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut h = LinkHealth {
            added: t0,
            heard: None,
            session_age: None,
            expired: false,
            paced: true,
        };
        // No session yet: up during the handshake's grace.
        assert!(!h.is_down(at(4_000)));
        assert!(h.is_down(at(5_001)));
        // A session, heard from at 100 ms: up while keepalives come.
        h.session_age = Some(Duration::from_millis(100));
        h.heard = Some(at(100));
        assert!(!h.is_down(at(900)));
        assert!(!h.is_down(at(1_100)));
        // Silent for more than a second: down, though the session and the
        // store lease would still say up.
        assert!(h.is_down(at(1_101)));
        // Heard again: up at once.
        h.heard = Some(at(1_500));
        assert!(!h.is_down(at(1_600)));
        // A peer that sends no keepalives is judged by its session only.
        let old = LinkHealth { paced: false, ..h };
        assert!(!old.is_down(at(60_000)));
        let stale = LinkHealth {
            session_age: Some(Duration::from_secs(181)),
            ..old
        };
        assert!(stale.is_down(at(60_000)));
        assert!(LinkHealth { expired: true, ..h }.is_down(at(1_600)));
    }

    #[test]
    fn no_peers_no_routes() {
        let leases = [lease("100.64.0.3/32", "there", LeaseKind::SiteAddress)];
        assert!(RemoteRoutes::build(&PeerView::default(), &leases, 1420).is_empty());
    }
}
