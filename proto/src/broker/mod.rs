//! The broker's decisions as one sans-IO state machine: [`BrokerCore`].
//!
//! The broker's shell owns sockets, timers and the store; it tells the core
//! what happened (`handle_*`, with `now`) and carries out what the core
//! decided (`poll_command`, `poll_event`, `poll_timeout`). The core owns:
//!
//! - the session registry: which session of a site is current, and which of
//!   two sessions of one site wins ([`sessions`]);
//! - the routing state ([`Router`]): gateway routes and residency from the
//!   configuration, site routes installed and withdrawn with sessions;
//! - what is revoked, and the sweep that ends revoked sessions;
//! - address allocation as compare-and-set transactions against a store it
//!   reaches only through [`StoreCommand`]s, with its retry policy
//!   ([`alloc`]);
//! - certificate-expiry deadlines;
//! - admission, without state: request classification, token lifetimes,
//!   CONNECT-IP authorization, close reasons and their wire codes
//!   ([`admission`]);
//! - the access policy (who may reach whom, [`crate::policy`]), swapped
//!   whole on a reload ([`BrokerCore::handle_access_policy`]).
//!
//! Nothing here reads a clock, spawns a task or touches a socket, so the
//! simulation in `tests/` runs many cores against one store model on a fake
//! clock.

pub mod admission;
pub mod alloc;
pub mod sessions;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use ipnet::IpNet;

use crate::forward::{Residency, Router};
use crate::ids::{GatewayId, RegionId, SiteId};
use crate::ipam::{Ipam, RegionLeases};
use crate::net::{self, Family};
use crate::policy::Policy as AccessPolicy;
use crate::route::{Route, RouteKind, RouteTarget};

pub use admission::{
    CloseAction, CloseReason, Refusal, RequestKind, SiteRecordAction, TokenError, TokenPolicy,
    authorize, classify_request,
};
pub use alloc::{Allocated, AllocationError, AllocationId, AllocationRequest, StoreResult};
pub use sessions::{OpenError, SessionId, SessionOpen};

/// A region as the broker serves it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionPolicy {
    /// Address pools (bring your own IP).
    pub pools: Vec<IpNet>,
    /// Regions whose gateways may reach this region's sites (data
    /// residency; the region itself always may).
    pub allow_gateways_from: BTreeSet<RegionId>,
}

/// A gateway and the backend prefixes behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewaySpec {
    /// The gateway.
    pub id: GatewayId,
    /// Its region.
    pub region: RegionId,
    /// Backend prefixes behind it.
    pub prefixes: Vec<IpNet>,
    /// Whether it is the broker's own device, which also answers for the
    /// router address of every pool it may reach.
    pub local: bool,
}

/// What a revocation names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Revocation {
    /// Every certificate of a site identity.
    Site {
        /// The site.
        site: SiteId,
        /// Its region.
        region: RegionId,
    },
    /// One certificate, by serial number.
    Serial(Vec<u8>),
}

/// The configuration a core starts from.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// The regions served.
    pub regions: BTreeMap<RegionId, RegionPolicy>,
    /// The address pools as validated IPAM.
    pub ipam: Ipam,
    /// Gateways, local or remote.
    pub gateways: Vec<GatewaySpec>,
    /// Token lifetimes.
    pub tokens: TokenPolicy,
    /// Revocations known at start (read from the store).
    pub revoked: Vec<Revocation>,
    /// Compare-and-set attempts per allocation before giving up with
    /// [`AllocationError::Contention`].
    pub max_allocation_attempts: u32,
    /// Who may reach whom ([`crate::policy`]); replaced by
    /// [`BrokerCore::handle_access_policy`].
    pub access_policy: Arc<AccessPolicy>,
}

/// Default for [`CoreConfig::max_allocation_attempts`].
pub const MAX_ALLOCATION_ATTEMPTS: u32 = 8;

/// A store operation the core needs; the shell performs it and answers with
/// [`BrokerCore::handle_store_result`] for the same allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreCommand {
    /// Read the region's leases at their current version; answer
    /// [`StoreResult::Leases`].
    LoadLeases {
        /// The allocation waiting for it.
        allocation: AllocationId,
        /// The region.
        region: RegionId,
    },
    /// Apply `txn` atomically if the region is still at
    /// `txn.expected_version`; answer [`StoreResult::Committed`] or
    /// [`StoreResult::Conflict`].
    CompareAndSet {
        /// The allocation waiting for it.
        allocation: AllocationId,
        /// The transaction.
        txn: crate::ipam::Txn,
    },
}

/// Something the shell must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// End this session's tunnel with `reason`. The core has already
    /// forgotten it and withdrawn its routes.
    CloseSession {
        /// The session.
        session: SessionId,
        /// Its site.
        site: SiteId,
        /// Why.
        reason: CloseReason,
    },
    /// Site routes appeared or went: gateways and advertisements follow.
    RoutesChanged,
    /// The set of live sessions changed (names in the mesh zone follow).
    SessionsChanged,
    /// The routes through other brokers were rebuilt (after a change of
    /// the fleet or of the leases).
    RemoteRoutesChanged,
    /// An allocation finished.
    Allocated {
        /// Which one.
        allocation: AllocationId,
        /// Its outcome.
        result: Result<Allocated, AllocationError>,
    },
}

/// The broker's decisions: sessions, routes, revocations, allocation.
///
/// # Inputs
///
/// - [`handle_session_open`](Self::handle_session_open): a site's CONNECT-IP
///   request was accepted and its addresses allocated; the core decides
///   whether it becomes the site's current session (replacing an older one)
///   or is refused (revoked, or older than the current one).
/// - [`handle_session_closed`](Self::handle_session_closed): the tunnel
///   ended on its own (peer, protocol error, shutdown).
/// - [`handle_lan_routes`](Self::handle_lan_routes): a session's accepted
///   ROUTE_ADVERTISEMENT.
/// - [`handle_revocation`](Self::handle_revocation) /
///   [`handle_reinstatement`](Self::handle_reinstatement): the store's
///   revocation list changed.
/// - [`handle_allocate`](Self::handle_allocate) starts an allocation;
///   [`handle_store_result`](Self::handle_store_result) answers each
///   [`StoreCommand`]; [`handle_leases`](Self::handle_leases) feeds leases
///   read outside an allocation (at start, or from a watch).
/// - [`handle_timeout`](Self::handle_timeout): the deadline returned by
///   [`poll_timeout`](Self::poll_timeout) passed.
///
/// # Outputs, and the order to poll them
///
/// After every `handle_*` call the shell:
///
/// 1. performs each [`StoreCommand`] from [`poll_command`](Self::poll_command)
///    (in any order, possibly later and concurrently, each answered exactly
///    once with `handle_store_result`);
/// 2. acts on each [`Event`] from [`poll_event`](Self::poll_event), in order
///    (a `CloseSession` before the `RoutesChanged` that follows it);
/// 3. re-arms its single timer at [`poll_timeout`](Self::poll_timeout).
///
/// The routing state is read with [`router`](Self::router) for every packet.
///
/// # Invariants
///
/// - A site has at most one current session; routes to a site exist only
///   while it has one, and only for prefixes that session was given.
/// - A session of a revoked site or certificate is never current once the
///   core knows of the revocation, whichever arrives first.
/// - An allocation commits only transactions planned against the version it
///   read; a conflict is never retried blindly.
#[derive(Debug)]
pub struct BrokerCore {
    router: Router,
    ipam: Ipam,
    regions: BTreeMap<RegionId, RegionPolicy>,
    tokens: TokenPolicy,
    sessions: BTreeMap<SiteId, sessions::Current>,
    revoked: BTreeSet<Revocation>,
    leases: BTreeMap<RegionId, RegionLeases>,
    peers: crate::peering::PeerView,
    link_mtu: usize,
    allocations: BTreeMap<AllocationId, alloc::Allocation>,
    next_allocation: u64,
    max_attempts: u32,
    commands: VecDeque<StoreCommand>,
    events: VecDeque<Event>,
}

impl BrokerCore {
    /// A core with no sessions and no cached leases; gateway routes,
    /// residency and router addresses are set up from `config`.
    pub fn new(config: CoreConfig) -> Self {
        let router = initial_router(&config);
        Self {
            router,
            ipam: config.ipam,
            regions: config.regions,
            tokens: config.tokens,
            sessions: BTreeMap::new(),
            revoked: config.revoked.into_iter().collect(),
            leases: BTreeMap::new(),
            peers: crate::peering::PeerView::default(),
            link_mtu: crate::peering::DEFAULT_LINK_MTU,
            allocations: BTreeMap::new(),
            next_allocation: 0,
            max_attempts: config.max_allocation_attempts.max(1),
            commands: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The routing state, for forwarding decisions.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// A new access policy (a reload): every packet from now on is
    /// checked against it; flows it no longer allows stop at their next
    /// packet.
    pub fn handle_access_policy(&mut self, policy: Arc<AccessPolicy>) {
        self.router.policy = policy;
    }

    /// The regions served.
    pub fn regions(&self) -> &BTreeMap<RegionId, RegionPolicy> {
        &self.regions
    }

    /// The next store operation to perform.
    pub fn poll_command(&mut self) -> Option<StoreCommand> {
        self.commands.pop_front()
    }

    /// The next event to act on.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called:
    /// the earliest certificate expiry of a current session.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.sessions.values().map(|s| s.not_after).min()
    }

    /// Ends every session whose certificate expired at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<SiteId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.not_after <= now)
            .map(|(site, _)| site.clone())
            .collect();
        for site in expired {
            self.end(&site, Some(CloseReason::CertificateExpired));
        }
    }

    /// Whether `revocation` is known.
    pub fn is_revoked(&self, site: &SiteId, region: &RegionId, serial: &[u8]) -> bool {
        self.revoked.contains(&Revocation::Site {
            site: site.clone(),
            region: region.clone(),
        }) || self.revoked.contains(&Revocation::Serial(serial.to_vec()))
    }

    /// A revocation became known: sessions it names end now, with their
    /// routes, and later sessions it names are refused.
    pub fn handle_revocation(&mut self, revocation: Revocation, _now: Instant) {
        let hit: Vec<SiteId> = self
            .sessions
            .iter()
            .filter(|(site, s)| match &revocation {
                Revocation::Site { site: r, region } => r == *site && region == &s.region,
                Revocation::Serial(serial) => serial == &s.serial,
            })
            .map(|(site, _)| site.clone())
            .collect();
        self.revoked.insert(revocation);
        for site in hit {
            self.end(&site, Some(CloseReason::Revoked));
        }
    }

    /// A revocation was lifted (a site re-admitted with a new token).
    pub fn handle_reinstatement(&mut self, revocation: &Revocation) {
        self.revoked.remove(revocation);
    }

    /// The region's leases as last read or committed, if cached.
    pub fn leases(&self, region: &RegionId) -> Option<&RegionLeases> {
        self.leases.get(region)
    }

    /// Whether the region's leases must be read again after a notice that
    /// the store holds them at `stored_version`: not when the cache is at
    /// that version already (the notice of this broker's own commit, which
    /// the cache applied). The cache is only ever a plan's starting point:
    /// every commit compares the region's version in the store, so a cache
    /// another writer made stale costs a conflict and a reload, never a
    /// wrong lease.
    pub fn needs_leases(&self, region: &RegionId, stored_version: u64) -> bool {
        self.leases
            .get(region)
            .is_none_or(|c| c.version() != stored_version)
    }

    /// The site's own overlay addresses (not its LAN mappings), as cached.
    pub fn host_addresses(&self, site: &SiteId, region: &RegionId) -> Vec<IpAddr> {
        self.leases
            .get(region)
            .map(|l| {
                l.of_site(site)
                    .filter(|l| l.kind == crate::ipam::LeaseKind::SiteAddress)
                    .map(|l| l.prefix.addr())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// What the fleet says of the other brokers changed (sites held there,
    /// their gateways); `link_mtu` is the largest packet the
    /// broker-to-broker link carries. The routes through other brokers are
    /// rebuilt from it and the cached leases.
    pub fn handle_peers(&mut self, view: crate::peering::PeerView, link_mtu: usize) {
        if self.peers != view || self.link_mtu != link_mtu {
            self.peers = view;
            self.link_mtu = link_mtu;
            self.rebuild_remote();
        }
    }

    /// Rebuilds the routes through other brokers (after a change of the
    /// fleet or of the cached leases).
    fn rebuild_remote(&mut self) {
        let leases = self.leases.values().flat_map(|l| l.leases());
        self.router.remote = Arc::new(crate::peering::RemoteRoutes::build(
            &self.peers,
            leases,
            self.link_mtu,
        ));
        self.push_event(Event::RemoteRoutesChanged);
    }

    fn push_event(&mut self, event: Event) {
        self.events.push_back(event);
    }
}

/// The routes and residency a broker starts with: backend prefixes of every
/// gateway, and for the local gateway the router address of every pool it
/// may reach (the broker host talks to sites from them).
fn initial_router(config: &CoreConfig) -> Router {
    let mut router = Router {
        residency: Residency::new(
            config
                .regions
                .iter()
                .map(|(r, c)| (r.clone(), c.allow_gateways_from.clone()))
                .collect(),
        ),
        policy: config.access_policy.clone(),
        ..Router::default()
    };
    for region in config.regions.keys() {
        let addrs: Vec<IpAddr> = [Family::V4, Family::V6]
            .into_iter()
            .filter_map(|f| config.ipam.router_address(region, f))
            .collect();
        router.router_addresses.insert(region.clone(), addrs);
    }
    for gw in config.gateways.iter().filter(|g| g.local) {
        // The host owns the router addresses on the local gateway's device,
        // so IPv4 errors into it come from the pool's first address (a
        // unicast address since Linux 5.14, never leased). IPv6 has no such
        // martian check, and RFC 4443 wants a unicast source, which the
        // subnet-router anycast address is not: those keep the router
        // address.
        let sources: Vec<IpAddr> = config
            .ipam
            .network_address(&gw.region, Family::V4)
            .into_iter()
            .chain(config.ipam.router_address(&gw.region, Family::V6))
            .collect();
        router.gateway_icmp_sources.insert(gw.id.clone(), sources);
        for (site_region, region) in &config.regions {
            if !router.residency.permits(site_region, &gw.region) {
                continue;
            }
            for pool in &region.pools {
                let (family, start, _) = net::span(*pool);
                router.table.insert(Route {
                    prefix: net::prefix(family, start + 1, family.width()),
                    kind: RouteKind::Gateway,
                    target: RouteTarget::Gateway(gw.id.clone()),
                    region: gw.region.clone(),
                });
            }
        }
    }
    for gw in &config.gateways {
        for prefix in &gw.prefixes {
            router.table.insert(Route {
                prefix: *prefix,
                kind: RouteKind::Gateway,
                target: RouteTarget::Gateway(gw.id.clone()),
                region: gw.region.clone(),
            });
        }
    }
    router
}

#[cfg(test)]
pub(crate) mod testing {
    //! A small configuration shared by the unit tests.

    use super::*;
    use std::time::Duration;

    pub fn id<T: std::str::FromStr>(s: &str) -> T
    where
        T::Err: std::fmt::Debug,
    {
        s.parse().unwrap()
    }

    pub fn eu() -> RegionId {
        id("eu")
    }

    pub fn config() -> CoreConfig {
        let mut pools = BTreeMap::new();
        pools.insert(eu(), vec![id("100.64.0.0/24"), id("fd7a::/64")]);
        let mut regions = BTreeMap::new();
        regions.insert(
            eu(),
            RegionPolicy {
                pools: pools[&eu()].clone(),
                allow_gateways_from: BTreeSet::new(),
            },
        );
        CoreConfig {
            regions,
            ipam: Ipam::new(pools).unwrap(),
            gateways: vec![GatewaySpec {
                id: id("local"),
                region: eu(),
                prefixes: vec![id("10.20.0.0/16")],
                local: true,
            }],
            tokens: TokenPolicy {
                default_ttl: Duration::from_secs(3600),
                max_ttl: Duration::from_secs(30 * 86_400),
            },
            revoked: Vec::new(),
            max_allocation_attempts: MAX_ALLOCATION_ATTEMPTS,
            access_policy: Arc::default(),
        }
    }

    pub fn events(core: &mut BrokerCore) -> Vec<Event> {
        std::iter::from_fn(|| core.poll_event()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn gateway_routes_residency_and_router_addresses_come_from_the_config() {
        let core = BrokerCore::new(config());
        let router = core.router();
        let to_gw = router.table.lookup(id("10.20.1.1")).winner().cloned();
        assert_eq!(
            to_gw.map(|r| r.target),
            Some(RouteTarget::Gateway(id("local")))
        );
        // The local gateway answers for the pool's router address.
        let router_addr = router.table.lookup(id("100.64.0.1")).winner().cloned();
        assert_eq!(
            router_addr.map(|r| r.prefix),
            Some(id::<IpNet>("100.64.0.1/32"))
        );
        assert_eq!(
            router.router_addresses[&eu()],
            vec![id::<IpAddr>("100.64.0.1"), id::<IpAddr>("fd7a::1")]
        );
        assert!(router.residency.permits(&eu(), &eu()));
        assert!(!router.residency.permits(&eu(), &id("us")));
    }

    /// The host of the local gateway owns the router addresses on its device
    /// and drops an IPv4 packet from one of them arriving there: errors to
    /// it come from the pool's first address. A site's errors keep the router
    /// address, and IPv6 keeps it everywhere.
    #[test]
    fn icmp_errors_into_the_local_gateway_come_from_an_address_the_host_does_not_own() {
        use crate::forward::{Ingress, Verdict};
        use crate::ip::Packet;
        use crate::ip::tests::{ipv4, ipv6};
        let core = BrokerCore::new(config());
        let router = core.router();
        let source_of = |ingress: &Ingress<'_>, mut packet: Vec<u8>| -> IpAddr {
            match router.decide(ingress, &mut packet, |_| Some(1400)) {
                Verdict::Reply { icmp, .. } => Packet::parse(&icmp).unwrap().src,
                other => panic!("expected an ICMP error, got {other:?}"),
            }
        };
        let gateway = id("local");
        let from_gateway = Ingress::Gateway {
            gateway: &gateway,
            region: &eu(),
            allowed: &[],
        };
        // To a pool address no site holds: unreachable.
        let v4 = ipv4([10, 20, 0, 10], [100, 64, 0, 200], 17, &[0; 8], true);
        assert_eq!(source_of(&from_gateway, v4), id::<IpAddr>("100.64.0.0"));
        let v6 = ipv6("fd20::10", "fd7a::c8", 17, &[0; 8]);
        assert_eq!(source_of(&from_gateway, v6), id::<IpAddr>("fd7a::1"));
        let site = id("a");
        let allowed = [id("100.64.0.2/32")];
        let from_site = Ingress::Site {
            site: &site,
            region: &eu(),
            allowed: &allowed,
        };
        let v4 = ipv4([100, 64, 0, 2], [100, 64, 0, 200], 17, &[0; 8], true);
        assert_eq!(source_of(&from_site, v4), id::<IpAddr>("100.64.0.1"));
    }
}
