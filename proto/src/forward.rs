//! The forwarding decision of a tether router.
//!
//! [`Router::decide`] takes a packet and where it came from and returns a
//! [`Verdict`]: forward it along a route, answer the sender with an ICMP
//! error, or drop it with a [`DropReason`]. The broker's shell performs the
//! verdict; nothing here touches a socket. The checks, in order:
//!
//! 1. the packet parses as IPv4 or IPv6, and is not link-scoped (link-local
//!    or multicast traffic never leaves its link);
//! 2. anti-spoofing: a site may only send from its assigned prefixes; a
//!    gateway only from its registered prefixes, and never from an overlay
//!    address owned by a site;
//! 3. a route exists (longest prefix match), and does not lead back to the
//!    sender;
//! 4. data residency: traffic between a site and a gateway, or between two
//!    sites, only within regions the [`Residency`] policy permits;
//! 5. the access policy ([`Policy`]): who may reach whom, by identity;
//! 6. the TTL / hop limit does not run out here;
//! 7. the packet fits the next hop's MTU: otherwise an ICMP packet-too-big,
//!    or fragments for an IPv4 packet without Don't Fragment.
//!
//! A destination held by another broker of the fleet (a site whose session
//! is there, a gateway attached there: [`crate::peering::RemoteRoutes`]) is
//! decided the same way here, at the broker where the packet entered, which
//! knows who sent it: the verdict is [`Verdict::Relay`] to that broker,
//! naming the sender ([`crate::relay_frame::Sender`]) in the link's frame.
//! The broker at the other end delivers it with [`Router::decide_relayed`]
//! to its own sessions and gateways after checking residency and the
//! access policy again, with its own rules, for that sender (not the
//! source address, which it cannot tie to a sender as the ingress did:
//! anti-spoofing stays at the ingress). It relays it on only when the
//! destination site has just moved from it to another broker, which the
//! sender has not learnt yet (a handover): never back to the sender, and
//! with the TTL decremented at each hop.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::fleet::BrokerId;
use crate::gateway::SiteRoute;
use crate::ids::{GatewayId, RegionId, SiteId};
use crate::ip::{self, IcmpError, Packet};
use crate::net::Family;
use crate::peering::RemoteRoutes;
use crate::policy::{self, End, Party, Policy, Traffic};
use crate::relay_frame::Sender;
use crate::route::{
    Candidate, Explanation, Route, RouteKind, RouteTable, RouteTarget, Verdict as RouteVerdict,
};

/// Why a packet was not forwarded. Every drop is counted under one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// Not a valid IPv4 or IPv6 packet.
    Malformed,
    /// Source address not assigned to the sender.
    Spoofed,
    /// No route to the destination.
    NoRoute,
    /// The route leads back to the sender.
    Loop,
    /// Data residency policy forbids the path.
    Residency,
    /// TTL or hop limit ran out.
    TtlExpired,
    /// Larger than the next hop's MTU.
    TooBig,
    /// The next hop is gone (session closed while routes were updated).
    TargetDown,
    /// The next hop's queue is full.
    QueueFull,
    /// An HTTP Datagram with a context ID tether does not use.
    UnknownContext,
    /// Link-scoped traffic (IPv6 link-local or multicast, IPv4 link-local),
    /// which never leaves its link.
    LinkLocal,
    /// The access policy does not allow the flow.
    Policy,
    /// The broker holding the destination is not (or no longer) a peer of
    /// the broker-to-broker link.
    PeerUnknown,
    /// The broker-to-broker link to the broker holding the destination is
    /// down (no session, or sending failed).
    PeerDown,
    /// A tunnel connection's queue of datagrams to send was full: the
    /// connection sends slower than packets arrive for it, and the oldest
    /// waiting packet gave way.
    TunnelSendQueue,
    /// Datagrams arrived on a tunnel connection faster than they were
    /// read: the oldest waiting one gave way.
    TunnelReceiveQueue,
    /// A frame of the broker-to-broker link this broker cannot read
    /// ([`crate::relay_frame::parse`]): the other broker runs another
    /// version of the frame, or sent a malformed one.
    RelayFrame,
}

impl DropReason {
    /// Every reason, for pre-registering metrics.
    pub const ALL: [DropReason; 17] = [
        DropReason::Malformed,
        DropReason::Spoofed,
        DropReason::NoRoute,
        DropReason::Loop,
        DropReason::Residency,
        DropReason::TtlExpired,
        DropReason::TooBig,
        DropReason::TargetDown,
        DropReason::QueueFull,
        DropReason::UnknownContext,
        DropReason::LinkLocal,
        DropReason::Policy,
        DropReason::PeerUnknown,
        DropReason::PeerDown,
        DropReason::TunnelSendQueue,
        DropReason::TunnelReceiveQueue,
        DropReason::RelayFrame,
    ];

    /// The label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Spoofed => "spoofed",
            DropReason::NoRoute => "no_route",
            DropReason::Loop => "loop",
            DropReason::Residency => "residency",
            DropReason::TtlExpired => "ttl_expired",
            DropReason::TooBig => "too_big",
            DropReason::TargetDown => "target_down",
            DropReason::QueueFull => "queue_full",
            DropReason::UnknownContext => "unknown_context",
            DropReason::LinkLocal => "link_local",
            DropReason::Policy => "policy",
            DropReason::PeerUnknown => "peer_unknown",
            DropReason::PeerDown => "peer_down",
            DropReason::TunnelSendQueue => "tunnel_send_queue",
            DropReason::TunnelReceiveQueue => "tunnel_receive_queue",
            DropReason::RelayFrame => "relay_frame",
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a packet entered the router.
#[derive(Debug, Clone, Copy)]
pub enum Ingress<'a> {
    /// From a site's tunnel.
    Site {
        /// The site.
        site: &'a SiteId,
        /// Its region.
        region: &'a RegionId,
        /// Prefixes it may send from (its addresses and LAN mappings).
        allowed: &'a [IpNet],
    },
    /// From a gateway.
    Gateway {
        /// The gateway.
        gateway: &'a GatewayId,
        /// Its region.
        region: &'a RegionId,
        /// Prefixes it may send from; empty allows any source outside the
        /// overlay.
        allowed: &'a [IpNet],
    },
}

impl Ingress<'_> {
    fn region(&self) -> &RegionId {
        match self {
            Ingress::Site { region, .. } | Ingress::Gateway { region, .. } => region,
        }
    }

    /// The route target that reaches back where the packet came from.
    fn target(&self) -> RouteTarget {
        match self {
            Ingress::Site { site, .. } => RouteTarget::Site((*site).clone()),
            Ingress::Gateway { gateway, .. } => RouteTarget::Gateway((*gateway).clone()),
        }
    }

    fn is(&self, target: &RouteTarget) -> bool {
        match (self, target) {
            (Ingress::Site { site, .. }, RouteTarget::Site(t)) => *site == t,
            (Ingress::Gateway { gateway, .. }, RouteTarget::Gateway(t)) => *gateway == t,
            _ => false,
        }
    }
}

/// Which regions may exchange traffic. A site and a gateway (or two sites)
/// of the same region always may; across regions only where the site's
/// region explicitly allows the other region.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Residency {
    allow: BTreeMap<RegionId, BTreeSet<RegionId>>,
}

impl Residency {
    /// A policy from each site region's list of other allowed regions.
    pub fn new(allow: BTreeMap<RegionId, BTreeSet<RegionId>>) -> Self {
        Self { allow }
    }

    /// Whether traffic between a site of `site_region` and a peer of
    /// `other_region` is allowed.
    pub fn permits(&self, site_region: &RegionId, other_region: &RegionId) -> bool {
        site_region == other_region
            || self
                .allow
                .get(site_region)
                .is_some_and(|a| a.contains(other_region))
    }

    /// Whether traffic from a site (`from_site`) or a gateway of
    /// `from_region` along a route is allowed.
    fn permits_path(&self, from_site: bool, from_region: &RegionId, route: &Route) -> bool {
        let target_is_site = matches!(route.target, RouteTarget::Site(_));
        match (from_site, target_is_site) {
            (true, true) => {
                self.permits(from_region, &route.region) && self.permits(&route.region, from_region)
            }
            (true, false) => self.permits(from_region, &route.region),
            (false, true) => self.permits(&route.region, from_region),
            // Gateway to gateway is not a tether path.
            (false, false) => false,
        }
    }
}

/// Whether an address belongs to a single link: IPv4 link-local
/// (169.254/16), multicast or broadcast, IPv6 link-local (fe80::/10) or
/// multicast.
fn link_scoped(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.is_link_local() || a.is_multicast() || a.is_broadcast(),
        IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80 || a.is_multicast(),
    }
}

/// What to do with a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Send the packet (TTL already decremented in place) along `route`.
    Forward(Route),
    /// Send these fragments along `route` instead of the packet.
    Fragments(Route, Vec<Vec<u8>>),
    /// Drop the packet and send `icmp` back to the ingress.
    Reply {
        /// The ICMP error.
        icmp: Vec<u8>,
        /// Why the packet was not forwarded.
        reason: DropReason,
    },
    /// Drop silently.
    Drop(DropReason),
    /// Send the packet (TTL already decremented) to the broker that holds
    /// the route's target, over the broker-to-broker link.
    Relay(Relay),
}

/// A packet for a destination held by another broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relay {
    /// The broker holding the destination.
    pub broker: BrokerId,
    /// The route at that broker (residency and policy were checked on it).
    pub route: Route,
    /// Who sent the packet, named in the trailer of the link's frame
    /// behind it (and behind each fragment) for that broker to check
    /// residency and policy again.
    pub sender: Sender,
    /// Fragments to send instead of the packet (IPv4 without Don't
    /// Fragment, larger than the link's MTU); empty to send the packet.
    pub fragments: Vec<Vec<u8>>,
}

/// Where a packet goes once checked: relayed to the broker `via` holding
/// its destination, naming its sender, or to `route` here; as `fragments`
/// when not empty.
fn deliver(route: &Route, via: Option<(&BrokerId, Sender)>, fragments: Vec<Vec<u8>>) -> Verdict {
    match via {
        Some((broker, sender)) => Verdict::Relay(Relay {
            broker: broker.clone(),
            route: route.clone(),
            sender,
            fragments,
        }),
        None if fragments.is_empty() => Verdict::Forward(route.clone()),
        None => Verdict::Fragments(route.clone(), fragments),
    }
}

impl Verdict {
    /// The drop reason, if the packet is not forwarded.
    pub fn drop_reason(&self) -> Option<DropReason> {
        match self {
            Verdict::Forward(_) | Verdict::Fragments(..) | Verdict::Relay(_) => None,
            Verdict::Reply { reason, .. } => Some(*reason),
            Verdict::Drop(reason) => Some(*reason),
        }
    }
}

/// The routing state of a broker: routes, residency policy, access policy,
/// and the router addresses ICMP errors come from.
#[derive(Debug, Clone, Default)]
pub struct Router {
    /// The route table.
    pub table: RouteTable,
    /// The residency policy.
    pub residency: Residency,
    /// The access policy (shared: a reload swaps it whole).
    pub policy: Arc<Policy>,
    /// Per region, the router addresses (one per family) used as the source
    /// of ICMP errors.
    pub router_addresses: BTreeMap<RegionId, Vec<IpAddr>>,
    /// Per gateway, source addresses of ICMP errors sent to it that replace
    /// the region's router address of the same family: the host of the
    /// local gateway owns the router addresses on that very device, and its
    /// kernel drops a packet arriving there from one of its own IPv4
    /// addresses as a martian.
    pub gateway_icmp_sources: BTreeMap<GatewayId, Vec<IpAddr>>,
    /// Routes to sites and gateways held by other brokers (shared: a
    /// change of the fleet or the leases swaps it whole).
    pub remote: Arc<RemoteRoutes>,
}

impl Router {
    /// Decides the fate of `packet`, which entered at `ingress`. `packet` is
    /// modified in place when forwarded (TTL). `mtu_of` gives the largest IP
    /// packet a target accepts, `None` when the target is not reachable.
    pub fn decide(
        &self,
        ingress: &Ingress<'_>,
        packet: &mut [u8],
        mtu_of: impl Fn(&RouteTarget) -> Option<usize>,
    ) -> Verdict {
        let Ok(parsed) = Packet::parse(packet) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        let traffic = Traffic::of(&parsed);
        let (src, dst, len, dont_fragment, syn) = (
            parsed.src,
            parsed.dst,
            parsed.total_len,
            parsed.dont_fragment,
            ip::is_tcp_syn(&parsed),
        );
        if link_scoped(src) || link_scoped(dst) {
            return Verdict::Drop(DropReason::LinkLocal);
        }
        let spoofed = match ingress {
            Ingress::Site { allowed, .. } => ip::check_source(&parsed, allowed).is_err(),
            Ingress::Gateway { allowed, .. } => {
                let owned_by_site = self
                    .table
                    .lookup(src)
                    .winner()
                    .is_some_and(|r| r.kind != RouteKind::Gateway)
                    || self
                        .remote
                        .lookup(src)
                        .is_some_and(|(r, _)| r.kind != RouteKind::Gateway);
                owned_by_site
                    || (!allowed.is_empty() && ip::check_source(&parsed, allowed).is_err())
            }
        };
        if spoofed {
            return Verdict::Drop(DropReason::Spoofed);
        }
        let Some((route, via)) = self.next_hop(dst) else {
            return self.reply(ingress, packet, IcmpError::NoRoute, DropReason::NoRoute);
        };
        if ingress.is(&route.target) {
            return Verdict::Drop(DropReason::Loop);
        }
        if let Some(reason) = self.refusal(self.party_of(ingress, src), src, dst, traffic, route) {
            return self.reply(ingress, packet, IcmpError::AdminProhibited, reason);
        }
        // Through another broker, the frame names the sender behind the
        // packet: the packet has the link's MTU less that trailer.
        let via = via.map(|broker| (broker, self.sender_of(ingress, src)));
        let mtu = match &via {
            Some((_, sender)) => Some(self.remote.mtu().saturating_sub(sender.trailer_len())),
            None => mtu_of(&route.target),
        };
        let Some(mtu) = mtu else {
            return self.reply(ingress, packet, IcmpError::NoRoute, DropReason::TargetDown);
        };
        if ip::decrement_ttl(packet).is_err() {
            return self.reply(
                ingress,
                packet,
                IcmpError::TimeExceeded,
                DropReason::TtlExpired,
            );
        }
        if len > mtu {
            if !dont_fragment && let Ok(fragments) = ip::fragment_ipv4(packet, mtu) {
                return deliver(route, via, fragments);
            }
            let mtu = u16::try_from(mtu).unwrap_or(u16::MAX);
            return self.reply(
                ingress,
                packet,
                IcmpError::PacketTooBig { mtu },
                DropReason::TooBig,
            );
        }
        // A SYN (or SYN-ACK) announces no larger segment than both the
        // target and the tunnel it came from carry: the ends then never
        // send packets that would need fragmentation or an ICMP error to
        // get through, in either direction.
        if syn {
            let back = mtu_of(&ingress.target()).unwrap_or(mtu);
            ip::clamp_mss(packet, ip::mss_for_mtu(mtu.min(back), dst.is_ipv6()));
        }
        deliver(route, via, Vec::new())
    }

    /// The route [`Router::decide`] takes to `dst`, and the broker of the
    /// fleet the packet is relayed to when that route is one through
    /// another broker ([`Router::remote`]). A remote route only where this
    /// broker has nothing as specific: a session here wins over the
    /// store's view of another broker.
    pub fn next_hop(&self, dst: IpAddr) -> Option<(&Route, Option<&BrokerId>)> {
        let local = self.table.lookup(dst).winner();
        let remote = self
            .remote
            .lookup(dst)
            .filter(|(r, _)| local.is_none_or(|l| r.prefix.prefix_len() > l.prefix.prefix_len()));
        match (local, remote) {
            (_, Some((route, broker))) => Some((route, Some(broker))),
            (Some(route), None) => Some((route, None)),
            (None, None) => None,
        }
    }

    /// Every route this router forwards along, with the broker of the
    /// fleet each route through another broker leads to: its own routes,
    /// then the routes through other brokers ([`Router::remote`]) except
    /// those whose prefix one of its own routes has ([`Router::next_hop`]
    /// takes its own there).
    pub fn routes(&self) -> Vec<(&Route, Option<&BrokerId>)> {
        let own = self.table.routes();
        let here: BTreeSet<IpNet> = own.iter().map(|r| r.prefix).collect();
        let mut out: Vec<(&Route, Option<&BrokerId>)> =
            own.into_iter().map(|r| (r, None)).collect();
        out.extend(
            self.remote
                .routes()
                .into_iter()
                .filter(|(r, _)| !here.contains(&r.prefix))
                .map(|(r, b)| (r, Some(b))),
        );
        out
    }

    /// How [`Router::next_hop`] chose the route to `dst`: the explanation
    /// of this broker's own table, and, when a route through another
    /// broker wins, that route as the winner (first among the candidates,
    /// every local one then losing to its longer prefix) with the broker
    /// it leads to.
    pub fn explain(&self, dst: IpAddr) -> (Explanation, Option<BrokerId>) {
        let mut explanation = self.table.lookup(dst).explain();
        let Some((route, Some(broker))) = self.next_hop(dst) else {
            return (explanation, None);
        };
        let winner_len = route.prefix.prefix_len();
        for c in &mut explanation.candidates {
            c.verdict = RouteVerdict::ShorterPrefix { winner_len };
        }
        explanation.candidates.insert(
            0,
            Candidate {
                route: route.clone(),
                verdict: RouteVerdict::Winner,
            },
        );
        explanation.winner = Some(route.clone());
        (explanation, Some(broker.clone()))
    }

    /// The site routes a gateway of `region` is given: every prefix of a
    /// site (its own address or a mapped LAN) that residency lets the
    /// gateway's region reach, whether the site's session is on this
    /// broker or on another broker of the fleet ([`Router::remote`]), so
    /// that a gateway reaches every site wherever it is attached and its
    /// routes follow a site that moves between brokers. A prefix held here
    /// and also named through another broker is listed once, as here
    /// (the route [`Router::decide`] takes). Sorted.
    pub fn gateway_site_routes(&self, region: &RegionId) -> Vec<SiteRoute> {
        let site_route = |r: &Route| match &r.target {
            RouteTarget::Site(site)
                if matches!(r.kind, RouteKind::SiteAddress | RouteKind::SiteLan)
                    && self.residency.permits(&r.region, region) =>
            {
                Some(SiteRoute {
                    prefix: r.prefix,
                    site: site.clone(),
                    region: r.region.clone(),
                })
            }
            _ => None,
        };
        let mut out: Vec<SiteRoute> = self
            .table
            .routes()
            .into_iter()
            .filter_map(site_route)
            .collect();
        let here: BTreeSet<IpNet> = self.table.routes().iter().map(|r| r.prefix).collect();
        out.extend(
            self.remote
                .routes()
                .into_iter()
                .filter(|(r, _)| !here.contains(&r.prefix))
                .filter_map(|(r, _)| site_route(r)),
        );
        out.sort();
        out.dedup();
        out
    }

    /// Decides the fate of `packet`, relayed here by broker `from` of the
    /// fleet, which checked the source against `sender` where the packet
    /// entered and named `sender` in the link's frame
    /// ([`crate::relay_frame`]). Residency and the access policy are
    /// checked again here, with this broker's rules, for `sender` and the
    /// route this broker takes, so that a broker whose rules differ (a
    /// rollout, a bug) cannot deliver what this one forbids; a denial is
    /// dropped and counted as at the ingress, and answered with an ICMP
    /// error over the link. An ICMP error a broker answered a relayed
    /// packet with ([`Sender::Router`]) names nobody and passes unchecked;
    /// anything else under that name is dropped ([`DropReason::Policy`]).
    /// A bare packet from a broker of an older release
    /// ([`Sender::Unnamed`]) passes unchecked, as that release expects.
    /// The source address is not checked: that is the ingress's, which
    /// knew the sender's addresses when this broker's view of them may
    /// lag (after a failover).
    ///
    /// The packet goes to this broker's own sessions and gateways;
    /// `mtu_of` as for [`Router::decide`]. A packet for a site with no
    /// session here that the fleet names at a third broker (the site moved
    /// on, and `from` has not learnt it yet) is relayed on to that broker
    /// ([`Verdict::Relay`], with the same sender); nothing else is. ICMP
    /// errors come from the router address of the route's region and go
    /// back to the relaying broker.
    pub fn decide_relayed(
        &self,
        packet: &mut [u8],
        from: &str,
        sender: &Sender,
        mtu_of: impl Fn(&RouteTarget) -> Option<usize>,
    ) -> Verdict {
        let Ok(parsed) = Packet::parse(packet) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        // The packet ends where the frame's trailer begins: anything
        // between is a frame this broker misread.
        if parsed.total_len != packet.len() {
            return Verdict::Drop(DropReason::Malformed);
        }
        let traffic = Traffic::of(&parsed);
        let (src, dst, len, dont_fragment, syn, icmp_error) = (
            parsed.src,
            parsed.dst,
            parsed.total_len,
            parsed.dont_fragment,
            ip::is_tcp_syn(&parsed),
            parsed.is_icmp_error(),
        );
        if link_scoped(src) || link_scoped(dst) {
            return Verdict::Drop(DropReason::LinkLocal);
        }
        if matches!(sender, Sender::Router) && !icmp_error {
            return Verdict::Drop(DropReason::Policy);
        }
        // The site may have left this broker since the sender looked.
        let local = self
            .table
            .lookup(dst)
            .winner()
            .and_then(|route| Some((route, mtu_of(&route.target)?)));
        let (route, mtu, via) = match (local, self.remote.lookup(dst)) {
            (Some((route, mtu)), _) => (route, mtu, None),
            // Moved on to a third broker: one more hop, never back.
            (None, Some((route, broker)))
                if broker != from && matches!(route.target, RouteTarget::Site(_)) =>
            {
                let mtu = self.remote.mtu().saturating_sub(sender.trailer_len());
                (route, mtu, Some(broker))
            }
            (None, _) if self.table.lookup(dst).winner().is_some() => {
                return Verdict::Drop(DropReason::TargetDown);
            }
            (None, _) => return Verdict::Drop(DropReason::NoRoute),
        };
        let party = match sender {
            Sender::Site { site, region, lan } => Some(Party::Site {
                site,
                region,
                lan: *lan,
            }),
            Sender::Gateway { gateway, region } => Some(Party::Gateway { gateway, region }),
            Sender::Router | Sender::Unnamed => None,
        };
        if let Some(reason) = party.and_then(|party| self.refusal(party, src, dst, traffic, route))
        {
            return self.reply_from(&route.region, packet, IcmpError::AdminProhibited, reason);
        }
        if ip::decrement_ttl(packet).is_err() {
            return self.reply_from(
                &route.region,
                packet,
                IcmpError::TimeExceeded,
                DropReason::TtlExpired,
            );
        }
        let via = via.map(|broker| (broker, sender.clone()));
        if len > mtu {
            if !dont_fragment && let Ok(fragments) = ip::fragment_ipv4(packet, mtu) {
                return deliver(route, via, fragments);
            }
            let mtu = u16::try_from(mtu).unwrap_or(u16::MAX);
            return self.reply_from(
                &route.region,
                packet,
                IcmpError::PacketTooBig { mtu },
                DropReason::TooBig,
            );
        }
        if syn {
            ip::clamp_mss(packet, ip::mss_for_mtu(mtu, dst.is_ipv6()));
        }
        deliver(route, via, Vec::new())
    }

    /// An ICMP error from the router address of `region`, or a silent drop
    /// where it has none.
    fn reply_from(
        &self,
        region: &RegionId,
        packet: &[u8],
        error: IcmpError,
        reason: DropReason,
    ) -> Verdict {
        let icmp = Packet::parse(packet).ok().and_then(|p| {
            let source = self
                .router_addresses
                .get(region)?
                .iter()
                .copied()
                .find(|a| Family::of(*a) == p.family)?;
            ip::icmp_error(&p, error, source)
        });
        match icmp {
            Some(icmp) => Verdict::Reply { icmp, reason },
            None => Verdict::Drop(reason),
        }
    }

    /// What the access policy says of a packet from `src` (entering at
    /// `ingress`) to `dst` along `route`, carrying `traffic`. Whether a
    /// site's address is on one of its LANs is read from the route table,
    /// and only when a rule names LANs.
    pub fn policy_check(
        &self,
        ingress: &Ingress<'_>,
        src: IpAddr,
        dst: IpAddr,
        traffic: Traffic,
        route: &Route,
    ) -> policy::Verdict<'_> {
        self.policy_between(self.party_of(ingress, src), src, dst, traffic, route)
    }

    /// Who sent a packet from `src` that entered at `ingress`, as the
    /// access policy sees it. Whether a site's address is on one of its
    /// LANs is read from the route table, and only when a rule names LANs.
    fn party_of<'a>(&self, ingress: &Ingress<'a>, src: IpAddr) -> Party<'a> {
        match *ingress {
            Ingress::Site { site, region, .. } => Party::Site {
                site,
                region,
                lan: self.policy.names_lans() && self.on_lan_of(site, src),
            },
            Ingress::Gateway {
                gateway, region, ..
            } => Party::Gateway { gateway, region },
        }
    }

    /// Why a packet from `from` (address `src`) to `dst` along `route`
    /// carrying `traffic` may not pass, if it may not: residency first,
    /// then the access policy. The same at the ingress and, for the sender
    /// a relayed frame names, at the broker it was relayed to.
    fn refusal(
        &self,
        from: Party<'_>,
        src: IpAddr,
        dst: IpAddr,
        traffic: Traffic,
        route: &Route,
    ) -> Option<DropReason> {
        let (from_site, region) = match from {
            Party::Site { region, .. } => (true, region),
            Party::Gateway { region, .. } => (false, region),
        };
        if !self.residency.permits_path(from_site, region, route) {
            return Some(DropReason::Residency);
        }
        if !self.policy_between(from, src, dst, traffic, route).allows() {
            return Some(DropReason::Policy);
        }
        None
    }

    /// Whether `src` is on one of `site`'s mapped LANs, as this broker's
    /// route table says.
    fn on_lan_of(&self, site: &SiteId, src: IpAddr) -> bool {
        self.table.lookup(src).winner().is_some_and(|r| {
            r.kind == RouteKind::SiteLan && matches!(&r.target, RouteTarget::Site(s) if s == site)
        })
    }

    /// The sender of a packet from `src` that entered at `ingress`, as the
    /// link's frame names it (a host on one of the site's mapped LANs
    /// whatever this broker's policy names, as another broker's may).
    fn sender_of(&self, ingress: &Ingress<'_>, src: IpAddr) -> Sender {
        match *ingress {
            Ingress::Site { site, region, .. } => Sender::Site {
                site: site.clone(),
                region: region.clone(),
                lan: self.on_lan_of(site, src),
            },
            Ingress::Gateway {
                gateway, region, ..
            } => Sender::Gateway {
                gateway: gateway.clone(),
                region: region.clone(),
            },
        }
    }

    /// What the access policy says of a packet from `from` at `src` to
    /// `dst` along `route`, carrying `traffic`.
    fn policy_between(
        &self,
        from: Party<'_>,
        src: IpAddr,
        dst: IpAddr,
        traffic: Traffic,
        route: &Route,
    ) -> policy::Verdict<'_> {
        let to = match &route.target {
            RouteTarget::Site(site) => Party::Site {
                site,
                region: &route.region,
                lan: route.kind == RouteKind::SiteLan,
            },
            RouteTarget::Gateway(gateway) => Party::Gateway {
                gateway,
                region: &route.region,
            },
        };
        self.policy.check(
            &End {
                party: from,
                addr: src,
            },
            &End {
                party: to,
                addr: dst,
            },
            traffic,
        )
    }

    /// The ICMP error from the ingress region's router address (or the
    /// gateway's own ICMP source, see [`Router::gateway_icmp_sources`]), or a
    /// silent drop where none may be sent.
    fn reply(
        &self,
        ingress: &Ingress<'_>,
        packet: &[u8],
        error: IcmpError,
        reason: DropReason,
    ) -> Verdict {
        let icmp = Packet::parse(packet).ok().and_then(|p| {
            let family = p.family;
            let of_family = |addrs: &Vec<IpAddr>| -> Option<IpAddr> {
                addrs.iter().copied().find(|a| Family::of(*a) == family)
            };
            let gateway_source = match ingress {
                Ingress::Gateway { gateway, .. } => {
                    self.gateway_icmp_sources.get(*gateway).and_then(of_family)
                }
                Ingress::Site { .. } => None,
            };
            let source = gateway_source.or_else(|| {
                self.router_addresses
                    .get(ingress.region())
                    .and_then(of_family)
            })?;
            ip::icmp_error(&p, error, source)
        });
        match icmp {
            Some(icmp) => Verdict::Reply { icmp, reason },
            None => Verdict::Drop(reason),
        }
    }

    /// The prefixes a site of `region` may reach, for its
    /// ROUTE_ADVERTISEMENT: the pools of regions whose sites it may talk to,
    /// and the prefixes of gateways of permitted regions.
    pub fn reachable_from(
        &self,
        region: &RegionId,
        pools: &BTreeMap<RegionId, Vec<IpNet>>,
    ) -> Vec<IpNet> {
        let mut out: BTreeSet<IpNet> = BTreeSet::new();
        for (other, prefixes) in pools {
            if self.residency.permits(region, other) && self.residency.permits(other, region) {
                out.extend(prefixes.iter().copied());
            }
        }
        let remote = self.remote.routes();
        let gateways = self
            .table
            .routes()
            .into_iter()
            .chain(remote.into_iter().map(|(r, _)| r));
        for route in gateways {
            if route.kind == RouteKind::Gateway && self.residency.permits(region, &route.region) {
                out.insert(route.prefix);
            }
        }
        out.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::testing::id;
    use crate::ip::tests::{ipv4, ipv6};
    use crate::ip::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    struct Fixture {
        router: Router,
        a: SiteId,
        b: SiteId,
        us_site: SiteId,
        eu: RegionId,
        us: RegionId,
        gw: GatewayId,
    }

    /// A policy of one rule, `name`: `from` may reach `to` on `ports`.
    fn one_rule(
        name: &str,
        from: &[policy::Selector],
        to: &[policy::Selector],
        ports: &[policy::Ports],
        backends: policy::Backends,
    ) -> Arc<Policy> {
        Arc::new(
            Policy::new(
                vec![policy::Rule {
                    name: name.into(),
                    from: from.to_vec(),
                    to: to.to_vec(),
                    ports: ports.to_vec(),
                }],
                Default::default(),
                backends,
            )
            .unwrap(),
        )
    }

    fn fixture() -> Fixture {
        let (eu, us): (RegionId, RegionId) = (id("eu"), id("us"));
        let (a, b, us_site): (SiteId, SiteId, SiteId) = (id("a"), id("b"), id("c"));
        let gw: GatewayId = id("local");
        let mut router = Router::default();
        for (site, region, addr) in [
            (&a, &eu, "100.64.0.2/32"),
            (&b, &eu, "100.64.0.3/32"),
            (&us_site, &us, "100.80.0.2/32"),
        ] {
            router.table.insert(Route {
                prefix: net(addr),
                kind: RouteKind::SiteAddress,
                target: RouteTarget::Site(site.clone()),
                region: region.clone(),
            });
        }
        router.table.insert(Route {
            prefix: net("fd00::2/128"),
            kind: RouteKind::SiteAddress,
            target: RouteTarget::Site(a.clone()),
            region: eu.clone(),
        });
        router.table.insert(Route {
            prefix: net("10.20.0.0/16"),
            kind: RouteKind::Gateway,
            target: RouteTarget::Gateway(gw.clone()),
            region: eu.clone(),
        });
        router
            .router_addresses
            .insert(eu.clone(), vec![id("100.64.0.1"), id("fd00::1")]);
        // Sites a and b may talk; c may not.
        router.policy = one_rule(
            "a-and-b",
            &[id("site:a"), id("site:b")],
            &[id("site:a"), id("site:b")],
            &[],
            policy::Backends::Region,
        );
        Fixture {
            router,
            a,
            b,
            us_site,
            eu,
            us,
            gw,
        }
    }

    const MTU: usize = 1400;

    #[test]
    fn site_to_gateway_and_back() {
        let f = fixture();
        let allowed = [net("100.64.0.2/32")];
        let ingress = Ingress::Site {
            site: &f.a,
            region: &f.eu,
            allowed: &allowed,
        };
        let mut p = ipv4([100, 64, 0, 2], [10, 20, 0, 10], PROTO_TCP, &[0; 20], true);
        let v = f.router.decide(&ingress, &mut p, |_| Some(MTU));
        assert!(
            matches!(&v, Verdict::Forward(r) if r.target == RouteTarget::Gateway(f.gw.clone())),
            "{v:?}"
        );
        assert_eq!(p[8], 63, "TTL decremented");
        assert_eq!(ip::checksum(&[&p[..20]]), 0);

        let gw_allowed = [net("10.20.0.0/16")];
        let from_gw = Ingress::Gateway {
            gateway: &f.gw,
            region: &f.eu,
            allowed: &gw_allowed,
        };
        let mut back = ipv4([10, 20, 0, 10], [100, 64, 0, 2], PROTO_TCP, &[0; 20], true);
        assert!(
            matches!(f.router.decide(&from_gw, &mut back, |_| Some(MTU)), Verdict::Forward(r) if r.target == RouteTarget::Site(f.a.clone()))
        );
        // Site to site in the same region.
        let mut s2s = ipv4([100, 64, 0, 2], [100, 64, 0, 3], PROTO_UDP, &[0; 8], true);
        assert!(
            matches!(f.router.decide(&ingress, &mut s2s, |_| Some(MTU)), Verdict::Forward(r) if r.target == RouteTarget::Site(f.b.clone()))
        );
    }

    #[test]
    fn syns_toward_a_site_are_clamped_to_its_mtu() {
        use crate::ip::tests::{mss_of, syn_v4_between, tcp_checksum_ok};
        let f = fixture();
        let gw_allowed = [net("10.20.0.0/16")];
        let from_gw = Ingress::Gateway {
            gateway: &f.gw,
            region: &f.eu,
            allowed: &gw_allowed,
        };
        // A backend on a 1500-byte LAN announces MSS 1460; the site's
        // tunnel carries 1228-byte packets.
        let mut syn = syn_v4_between([10, 20, 0, 10], [100, 64, 0, 2], &[2, 4, 0x05, 0xb4]);
        let v = f.router.decide(&from_gw, &mut syn, |_| Some(1228));
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!(mss_of(&syn, 0), 1188);
        assert!(tcp_checksum_ok(&syn), "TCP checksum updated");
        assert_eq!(ip::checksum(&[&syn[..20]]), 0, "IP checksum updated");
        // A SYN that already fits is left as it was (but for the TTL).
        let mut small = syn_v4_between([10, 20, 0, 10], [100, 64, 0, 2], &[2, 4, 0x04, 0x00]);
        let before = small.clone();
        let v = f.router.decide(&from_gw, &mut small, |_| Some(1228));
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!(small[20..], before[20..]);
        // A site's SYN toward a gateway is clamped to the smaller of the
        // two: the gateway's 1400 and the site's own tunnel, 1228.
        let allowed = [net("100.64.0.2/32")];
        let from_site = Ingress::Site {
            site: &f.a,
            region: &f.eu,
            allowed: &allowed,
        };
        let mut out = syn_v4_between([100, 64, 0, 2], [10, 20, 0, 10], &[2, 4, 0x05, 0xb4]);
        let mtus = |t: &RouteTarget| match t {
            RouteTarget::Site(_) => Some(1228),
            _ => Some(1400),
        };
        let v = f.router.decide(&from_site, &mut out, mtus);
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!(mss_of(&out, 0), 1188);
        assert!(tcp_checksum_ok(&out));
    }

    #[test]
    fn spoofed_sources_are_dropped() {
        let f = fixture();
        let allowed = [net("100.64.0.2/32")];
        let ingress = Ingress::Site {
            site: &f.a,
            region: &f.eu,
            allowed: &allowed,
        };
        let mut p = ipv4([100, 64, 0, 3], [10, 20, 0, 10], PROTO_TCP, &[0; 20], true);
        assert_eq!(
            f.router.decide(&ingress, &mut p, |_| Some(MTU)),
            Verdict::Drop(DropReason::Spoofed)
        );
        // A gateway may not claim a site's overlay address.
        let from_gw = Ingress::Gateway {
            gateway: &f.gw,
            region: &f.eu,
            allowed: &[],
        };
        let mut p = ipv4([100, 64, 0, 3], [100, 64, 0, 2], PROTO_TCP, &[0; 20], true);
        assert_eq!(
            f.router.decide(&from_gw, &mut p, |_| Some(MTU)),
            Verdict::Drop(DropReason::Spoofed)
        );
        let mut junk = vec![0x45, 0, 0];
        assert_eq!(
            f.router.decide(&ingress, &mut junk, |_| Some(MTU)),
            Verdict::Drop(DropReason::Malformed)
        );
        // Router solicitations and the like stay on their link.
        let mut rs = ipv6("fe80::1", "ff02::2", 58, &[133, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            f.router.decide(&ingress, &mut rs, |_| Some(MTU)),
            Verdict::Drop(DropReason::LinkLocal)
        );
    }

    #[test]
    fn residency_blocks_other_regions() {
        let f = fixture();
        let allowed = [net("100.80.0.2/32")];
        let us_ingress = Ingress::Site {
            site: &f.us_site,
            region: &f.us,
            allowed: &allowed,
        };
        let mut p = ipv4([100, 80, 0, 2], [10, 20, 0, 10], PROTO_TCP, &[0; 20], true);
        // No router address for "us": a silent drop.
        assert_eq!(
            f.router.decide(&us_ingress, &mut p, |_| Some(MTU)),
            Verdict::Drop(DropReason::Residency)
        );
        // The eu gateway cannot reach the us site either.
        let from_gw = Ingress::Gateway {
            gateway: &f.gw,
            region: &f.eu,
            allowed: &[],
        };
        let mut p = ipv4([10, 20, 0, 10], [100, 80, 0, 2], PROTO_TCP, &[0; 20], true);
        let v = f.router.decide(&from_gw, &mut p, |_| Some(MTU));
        assert_eq!(v.drop_reason(), Some(DropReason::Residency));
        assert!(
            matches!(v, Verdict::Reply { .. }),
            "administratively prohibited is sent back"
        );
        // An explicit policy opens it.
        let mut open = f.router.clone();
        open.residency = Residency::new(BTreeMap::from([(
            f.us.clone(),
            BTreeSet::from([f.eu.clone()]),
        )]));
        let mut p = ipv4([10, 20, 0, 10], [100, 80, 0, 2], PROTO_TCP, &[0; 20], true);
        assert!(matches!(
            open.decide(&from_gw, &mut p, |_| Some(MTU)),
            Verdict::Forward(_)
        ));
    }

    #[test]
    fn errors_come_back_as_icmp() {
        let f = fixture();
        let allowed = [net("100.64.0.2/32"), net("fd00::2/128")];
        let ingress = Ingress::Site {
            site: &f.a,
            region: &f.eu,
            allowed: &allowed,
        };
        // No route: destination unreachable from the router address.
        let mut p = ipv4([100, 64, 0, 2], [192, 0, 2, 1], PROTO_UDP, &[0; 8], true);
        let Verdict::Reply {
            icmp,
            reason: DropReason::NoRoute,
        } = f.router.decide(&ingress, &mut p, |_| Some(MTU))
        else {
            panic!("expected an ICMP reply")
        };
        let reply = Packet::parse(&icmp).unwrap();
        assert_eq!(
            (reply.src, reply.dst, reply.protocol),
            (id("100.64.0.1"), id("100.64.0.2"), PROTO_ICMP)
        );
        // TTL 1: time exceeded.
        let mut p = ipv4([100, 64, 0, 2], [10, 20, 0, 10], PROTO_UDP, &[0; 8], true);
        p[8] = 1;
        p[10..12].copy_from_slice(&[0, 0]);
        let sum = ip::checksum(&[&p[..20]]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        assert_eq!(
            f.router
                .decide(&ingress, &mut p, |_| Some(MTU))
                .drop_reason(),
            Some(DropReason::TtlExpired)
        );
        // Too big with DF: packet too big carrying the next hop's MTU.
        let mut big = ipv4(
            [100, 64, 0, 2],
            [10, 20, 0, 10],
            PROTO_TCP,
            &[0; 1480],
            true,
        );
        let Verdict::Reply {
            icmp,
            reason: DropReason::TooBig,
        } = f.router.decide(&ingress, &mut big, |_| Some(MTU))
        else {
            panic!("expected packet too big")
        };
        assert_eq!(&icmp[20..22], &[3, 4]);
        assert_eq!(u16::from_be_bytes([icmp[26], icmp[27]]), MTU as u16);
        // Without DF: fragments that fit.
        let mut big = ipv4(
            [100, 64, 0, 2],
            [10, 20, 0, 10],
            PROTO_UDP,
            &[0; 3000],
            false,
        );
        let Verdict::Fragments(_, frags) = f.router.decide(&ingress, &mut big, |_| Some(MTU))
        else {
            panic!("expected fragments")
        };
        assert!(frags.len() == 3 && frags.iter().all(|x| x.len() <= MTU));
        // IPv6 too big: ICMPv6 packet too big.
        let mut big6 = ipv6("fd00::2", "fd00::9", PROTO_TCP, &[0; 1400]);
        assert_eq!(
            f.router
                .decide(&ingress, &mut big6, |_| Some(MTU))
                .drop_reason(),
            Some(DropReason::NoRoute)
        );
        // Next hop gone.
        let mut p = ipv4([100, 64, 0, 2], [100, 64, 0, 3], PROTO_UDP, &[0; 8], true);
        assert_eq!(
            f.router.decide(&ingress, &mut p, |_| None).drop_reason(),
            Some(DropReason::TargetDown)
        );
    }

    #[test]
    fn the_access_policy_decides_between_sites() {
        let f = fixture();
        let allowed = [net("100.64.0.2/32")];
        let ingress = Ingress::Site {
            site: &f.a,
            region: &f.eu,
            allowed: &allowed,
        };
        let mut p = ipv4([100, 64, 0, 2], [100, 64, 0, 3], PROTO_TCP, &[0; 20], true);
        assert!(matches!(
            f.router.decide(&ingress, &mut p, |_| Some(MTU)),
            Verdict::Forward(_)
        ));
        // Without the rule: denied, with administratively prohibited sent
        // back and the reason counted.
        let mut closed = f.router.clone();
        closed.policy = Arc::default();
        let mut p = ipv4([100, 64, 0, 2], [100, 64, 0, 3], PROTO_TCP, &[0; 20], true);
        let v = closed.decide(&ingress, &mut p, |_| Some(MTU));
        assert_eq!(v.drop_reason(), Some(DropReason::Policy));
        let Verdict::Reply { icmp, .. } = v else {
            panic!("{v:?}")
        };
        assert_eq!(&icmp[20..22], &[3, 13]);
        // Backends keep reaching the sites of their region.
        let mut p = ipv4([100, 64, 0, 2], [10, 20, 0, 10], PROTO_TCP, &[0; 20], true);
        assert!(matches!(
            closed.decide(&ingress, &mut p, |_| Some(MTU)),
            Verdict::Forward(_)
        ));
    }

    #[test]
    fn lan_hosts_answer_as_the_lan() {
        let mut f = fixture();
        f.router.table.insert(Route {
            prefix: net("100.70.3.0/24"),
            kind: RouteKind::SiteLan,
            target: RouteTarget::Site(f.a.clone()),
            region: f.eu.clone(),
        });
        f.router.policy = one_rule(
            "b-to-a-lan",
            &[id("site:b")],
            &[id("lan-of:site:a")],
            &[id("tcp/104")],
            policy::Backends::Region,
        );
        let b_allowed = [net("100.64.0.3/32")];
        let from_b = Ingress::Site {
            site: &f.b,
            region: &f.eu,
            allowed: &b_allowed,
        };
        let a_allowed = [net("100.64.0.2/32"), net("100.70.3.0/24")];
        let from_a = Ingress::Site {
            site: &f.a,
            region: &f.eu,
            allowed: &a_allowed,
        };
        let tcp = |sport: u16, dport: u16, flags: u8| {
            let mut h = [0u8; 20];
            h[..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            h[12] = 0x50;
            h[13] = flags;
            h
        };
        let mut syn = ipv4(
            [100, 64, 0, 3],
            [100, 70, 3, 20],
            PROTO_TCP,
            &tcp(40000, 104, 0x02),
            true,
        );
        assert!(matches!(
            f.router.decide(&from_b, &mut syn, |_| Some(MTU)),
            Verdict::Forward(_)
        ));
        // The LAN host's answer passes; its own address may not open one.
        let mut answer = ipv4(
            [100, 70, 3, 20],
            [100, 64, 0, 3],
            PROTO_TCP,
            &tcp(104, 40000, 0x12),
            true,
        );
        assert!(matches!(
            f.router.decide(&from_a, &mut answer, |_| Some(MTU)),
            Verdict::Forward(_)
        ));
        let mut from_host = ipv4(
            [100, 64, 0, 2],
            [100, 64, 0, 3],
            PROTO_TCP,
            &tcp(104, 40000, 0x12),
            true,
        );
        assert_eq!(
            f.router
                .decide(&from_a, &mut from_host, |_| Some(MTU))
                .drop_reason(),
            Some(DropReason::Policy)
        );
        let mut other_port = ipv4(
            [100, 64, 0, 3],
            [100, 70, 3, 20],
            PROTO_TCP,
            &tcp(40000, 22, 0x02),
            true,
        );
        assert_eq!(
            f.router
                .decide(&from_b, &mut other_port, |_| Some(MTU))
                .drop_reason(),
            Some(DropReason::Policy)
        );
    }

    #[test]
    fn the_explanation_names_the_route_and_broker_the_decision_takes() {
        use crate::ipam::{Lease, LeaseKind};
        use crate::peering::{PeerView, RemoteRoutes};
        let mut f = fixture();
        // A covering local route, so that the remote one wins on length.
        f.router.table.insert(Route {
            prefix: net("100.64.0.0/24"),
            kind: RouteKind::Gateway,
            target: RouteTarget::Gateway(id("local")),
            region: f.eu.clone(),
        });
        let view = PeerView {
            holders: BTreeMap::from([(id("far"), "b".to_string()), (f.a.clone(), "b".into())]),
            gateways: BTreeMap::new(),
        };
        let lease = |prefix: &str, site: &SiteId| Lease {
            prefix: net(prefix),
            site: site.clone(),
            region: f.eu.clone(),
            kind: LeaseKind::SiteAddress,
            release_at: None,
        };
        let leases = [
            lease("100.64.0.9/32", &id("far")),
            lease("100.64.0.2/32", &f.a),
        ];
        f.router.remote = Arc::new(RemoteRoutes::build(&view, &leases, 1300));
        // Held by broker b: the remote route wins over the covering /24.
        let far = id("100.64.0.9");
        let (e, via) = f.router.explain(far);
        let winner = e.winner.clone().unwrap();
        assert_eq!(
            (&winner.target, via.as_deref()),
            (&RouteTarget::Site(id("far")), Some("b"))
        );
        assert_eq!(e.candidates[0].verdict, RouteVerdict::Winner);
        assert_eq!(
            e.candidates[1].verdict,
            RouteVerdict::ShorterPrefix { winner_len: 32 }
        );
        assert_eq!(
            f.router.next_hop(far).map(|(r, b)| (r.clone(), b.cloned())),
            Some((winner, via))
        );
        // A session of a here wins over the store naming b: no broker.
        let (e, via) = f.router.explain(id("100.64.0.2"));
        assert_eq!(
            (e.winner.map(|w| w.target), via),
            (Some(RouteTarget::Site(f.a.clone())), None)
        );
        // Nothing anywhere.
        let (e, via) = f.router.explain(id("192.0.2.1"));
        assert_eq!((e.winner, via), (None, None));
        // The route list: a's address once (here), far's through b.
        let listed: Vec<(String, Option<&str>)> = f
            .router
            .routes()
            .into_iter()
            .filter(|(r, _)| r.prefix.to_string().starts_with("100.64.0."))
            .map(|(r, b)| (r.prefix.to_string(), b.map(|b| b.as_str())))
            .collect();
        assert_eq!(
            listed,
            [
                ("100.64.0.0/24".to_string(), None),
                ("100.64.0.2/32".to_string(), None),
                ("100.64.0.3/32".to_string(), None),
                ("100.64.0.9/32".to_string(), Some("b")),
            ]
        );
    }

    #[test]
    fn sites_held_by_another_broker_are_relayed_after_the_checks() {
        use crate::ipam::{Lease, LeaseKind};
        use crate::peering::{PeerView, RemoteRoutes};
        let mut f = fixture();
        let far: SiteId = id("far");
        let view = PeerView {
            holders: BTreeMap::from([(far.clone(), "b".to_string())]),
            gateways: BTreeMap::new(),
        };
        let leases = [Lease {
            prefix: net("100.64.0.9/32"),
            site: far.clone(),
            region: f.eu.clone(),
            kind: LeaseKind::SiteAddress,
            release_at: None,
        }];
        f.router.remote = Arc::new(RemoteRoutes::build(&view, &leases, 1300));
        let allowed = [net("100.64.0.2/32")];
        let from_a = Ingress::Site {
            site: &f.a,
            region: &f.eu,
            allowed: &allowed,
        };
        // The access policy is checked here, at the ingress: a may not
        // reach far.
        let mut p = ipv4([100, 64, 0, 2], [100, 64, 0, 9], PROTO_UDP, &[0; 8], true);
        assert_eq!(
            f.router
                .decide(&from_a, &mut p, |_| Some(MTU))
                .drop_reason(),
            Some(DropReason::Policy)
        );
        let mut open = f.router.clone();
        open.policy = one_rule(
            "a-and-far",
            &[id("site:a")],
            &[id("site:far")],
            &[],
            policy::Backends::Region,
        );
        let mut p = ipv4([100, 64, 0, 2], [100, 64, 0, 9], PROTO_UDP, &[0; 8], true);
        let v = open.decide(&from_a, &mut p, |_| None);
        let Verdict::Relay(relay) = v else {
            panic!("expected a relay: {v:?}")
        };
        assert_eq!(relay.broker, "b");
        assert_eq!(relay.route.target, RouteTarget::Site(far.clone()));
        assert!(relay.fragments.is_empty());
        let from_a_sender = Sender::Site {
            site: f.a.clone(),
            region: f.eu.clone(),
            lan: false,
        };
        assert_eq!(relay.sender, from_a_sender, "the frame names the sender");
        assert_eq!(p[8], 63, "TTL decremented at the ingress");
        // Larger than the link: packet too big with the link's MTU less
        // the frame's trailer naming a in eu (4 + 1 + 2 bytes).
        let link_mtu = 1300 - from_a_sender.trailer_len();
        assert_eq!(link_mtu, 1293);
        let mut big = ipv4(
            [100, 64, 0, 2],
            [100, 64, 0, 9],
            PROTO_UDP,
            &[0; 1400],
            true,
        );
        let Verdict::Reply { icmp, .. } = open.decide(&from_a, &mut big, |_| Some(MTU)) else {
            panic!("expected packet too big")
        };
        assert_eq!(
            usize::from(u16::from_be_bytes([icmp[26], icmp[27]])),
            link_mtu
        );
        // A packet of that size fits with its trailer; one byte more does
        // not, and without Don't Fragment goes as fragments that do.
        let mut fits = ipv4(
            [100, 64, 0, 2],
            [100, 64, 0, 9],
            PROTO_UDP,
            &vec![0; link_mtu - 20],
            true,
        );
        assert!(matches!(
            open.decide(&from_a, &mut fits, |_| Some(MTU)),
            Verdict::Relay(_)
        ));
        let mut over = ipv4(
            [100, 64, 0, 2],
            [100, 64, 0, 9],
            PROTO_UDP,
            &vec![0; link_mtu - 19],
            true,
        );
        assert_eq!(
            open.decide(&from_a, &mut over, |_| Some(MTU)).drop_reason(),
            Some(DropReason::TooBig)
        );
        let mut over = ipv4(
            [100, 64, 0, 2],
            [100, 64, 0, 9],
            PROTO_UDP,
            &vec![0; link_mtu - 19],
            false,
        );
        let Verdict::Relay(relay) = open.decide(&from_a, &mut over, |_| Some(MTU)) else {
            panic!("expected fragments relayed")
        };
        assert!(relay.fragments.len() > 1);
        for fragment in &relay.fragments {
            assert!(fragment.len() + relay.sender.trailer_len() <= 1300);
        }
        // Residency holds as for a local site.
        let mut us = open.clone();
        us.remote = Arc::new(RemoteRoutes::build(
            &view,
            &[Lease {
                region: f.us.clone(),
                ..leases[0].clone()
            }],
            1300,
        ));
        let mut p = ipv4([100, 64, 0, 2], [100, 64, 0, 9], PROTO_UDP, &[0; 8], true);
        assert_eq!(
            us.decide(&from_a, &mut p, |_| Some(MTU)).drop_reason(),
            Some(DropReason::Residency)
        );
        // A session here wins over the store's view of another broker.
        let mut here = open.clone();
        here.table.insert(Route {
            prefix: net("100.64.0.9/32"),
            kind: RouteKind::SiteAddress,
            target: RouteTarget::Site(far.clone()),
            region: f.eu.clone(),
        });
        let mut p = ipv4([100, 64, 0, 2], [100, 64, 0, 9], PROTO_UDP, &[0; 8], true);
        assert!(matches!(
            here.decide(&from_a, &mut p, |_| Some(MTU)),
            Verdict::Forward(_)
        ));
        // A relayed packet goes to a session here, never on to another
        // broker; its source is not checked here (site b sends from far's
        // address), only what b may reach.
        let from_b = Sender::Site {
            site: f.b.clone(),
            region: f.eu.clone(),
            lan: false,
        };
        let mut p = ipv4([100, 64, 0, 9], [100, 64, 0, 2], PROTO_UDP, &[0; 8], true);
        let v = f.router.decide_relayed(&mut p, "b", &from_b, |_| Some(MTU));
        assert!(
            matches!(&v, Verdict::Forward(r) if r.target == RouteTarget::Site(f.a.clone())),
            "{v:?}"
        );
        // A site that moved on from here to broker b since broker c
        // relayed its packet: one more hop, to b, with the TTL decremented;
        // never back to b if b is the sender.
        let mut p = ipv4([100, 64, 0, 2], [100, 64, 0, 9], PROTO_UDP, &[0; 8], true);
        let v = open.decide_relayed(&mut p, "c", &from_a_sender, |_| Some(MTU));
        let Verdict::Relay(relay) = v else {
            panic!("expected a relay on: {v:?}")
        };
        assert_eq!(relay.broker, "b");
        assert_eq!(relay.route.target, RouteTarget::Site(far.clone()));
        assert_eq!(relay.sender, from_a_sender, "relayed on naming the sender");
        assert_eq!(p[8], 63, "TTL decremented at each hop");
        let mut p = ipv4([100, 64, 0, 2], [100, 64, 0, 9], PROTO_UDP, &[0; 8], true);
        assert_eq!(
            open.decide_relayed(&mut p, "b", &from_a_sender, |_| Some(MTU)),
            Verdict::Drop(DropReason::NoRoute),
            "never back to the sender"
        );
        let mut p = ipv4(
            [100, 64, 0, 2],
            [100, 64, 0, 9],
            PROTO_UDP,
            &[0; 1400],
            false,
        );
        let Verdict::Relay(relay) = open.decide_relayed(&mut p, "c", &from_a_sender, |_| Some(MTU))
        else {
            panic!("expected fragments relayed on")
        };
        assert!(relay.fragments.len() > 1);
        assert_eq!(relay.sender, from_a_sender);
        for fragment in &relay.fragments {
            assert!(fragment.len() <= link_mtu, "fragments fit with the trailer");
        }
        let mut ttl1 = ipv4([100, 64, 0, 2], [100, 64, 0, 9], PROTO_UDP, &[0; 8], true);
        ttl1[8] = 1;
        assert_eq!(
            open.decide_relayed(&mut ttl1, "c", &from_a_sender, |_| Some(MTU))
                .drop_reason(),
            Some(DropReason::TtlExpired),
            "a relay loop ends with the TTL"
        );
        let mut p = ipv4([100, 64, 0, 9], [100, 64, 0, 2], PROTO_UDP, &[0; 8], true);
        assert_eq!(
            f.router
                .decide_relayed(&mut p, "b", &from_b, |_| None)
                .drop_reason(),
            Some(DropReason::TargetDown)
        );
        // A gateway may not claim a remote site's address either.
        let from_gw = Ingress::Gateway {
            gateway: &f.gw,
            region: &f.eu,
            allowed: &[],
        };
        let mut p = ipv4([100, 64, 0, 9], [100, 64, 0, 2], PROTO_TCP, &[0; 20], true);
        assert_eq!(
            open.decide(&from_gw, &mut p, |_| Some(MTU)),
            Verdict::Drop(DropReason::Spoofed)
        );
    }

    /// Two brokers whose rules differ (a rollout, a bug): what the ingress
    /// relays, the broker holding the destination checks again for the
    /// sender the frame names, with its own residency and policy.
    #[test]
    fn relayed_packets_are_checked_again_with_this_brokers_rules() {
        use crate::ipam::{Lease, LeaseKind};
        use crate::peering::{PeerView, RemoteRoutes};
        use crate::relay_frame;
        let f = fixture();
        let far: SiteId = id("far");
        // Broker a (the ingress) holds site a; its policy lets a reach
        // far, which broker b holds.
        let mut ingress = f.router.clone();
        ingress.policy = one_rule(
            "a-to-far",
            &[id("site:a")],
            &[id("site:far")],
            &[],
            policy::Backends::Region,
        );
        let view = PeerView {
            holders: BTreeMap::from([(far.clone(), "b".to_string())]),
            gateways: BTreeMap::new(),
        };
        let lease = Lease {
            prefix: net("100.64.0.9/32"),
            site: far.clone(),
            region: f.eu.clone(),
            kind: LeaseKind::SiteAddress,
            release_at: None,
        };
        ingress.remote = Arc::new(RemoteRoutes::build(&view, [&lease], 1300));
        let allowed = [net("100.64.0.2/32")];
        let from_a = Ingress::Site {
            site: &f.a,
            region: &f.eu,
            allowed: &allowed,
        };
        let mut p = ipv4([100, 64, 0, 2], [100, 64, 0, 9], PROTO_UDP, &[0; 8], true);
        let Verdict::Relay(relay) = ingress.decide(&from_a, &mut p, |_| Some(MTU)) else {
            panic!("the ingress relays")
        };
        // What crosses the link, and what broker b reads of it.
        let frame = relay.sender.frame(&p);
        let (sender, len) = relay_frame::parse(&frame).unwrap();
        let mut packet = frame[..len].to_vec();
        // Broker b holds far; its policy (the fixture's: a and b only)
        // does not let a reach far. Dropped, counted as policy, answered
        // from b's router address.
        let mut egress = f.router.clone();
        egress.table.insert(Route {
            prefix: net("100.64.0.9/32"),
            kind: RouteKind::SiteAddress,
            target: RouteTarget::Site(far.clone()),
            region: f.eu.clone(),
        });
        let v = egress.decide_relayed(&mut packet.clone(), "a", &sender, |_| Some(MTU));
        let Verdict::Reply { icmp, reason } = &v else {
            panic!("expected prohibited: {v:?}")
        };
        assert_eq!(*reason, DropReason::Policy);
        let icmp = Packet::parse(icmp).unwrap();
        assert_eq!(
            (icmp.src, icmp.dst),
            (id("100.64.0.1"), id("100.64.0.2")),
            "from b's router address to the sender"
        );
        // A packet that does not end where the trailer begins is a frame
        // misread: dropped, whatever the rules.
        let mut longer = packet.clone();
        longer.push(0);
        assert_eq!(
            egress.decide_relayed(&mut longer, "a", &sender, |_| Some(MTU)),
            Verdict::Drop(DropReason::Malformed)
        );
        // The same packet bare, from a broker of an older release (no
        // sender named): checked at its ingress only, delivered.
        let v = egress.decide_relayed(&mut packet.clone(), "a", &Sender::Unnamed, |_| Some(MTU));
        assert!(
            matches!(&v, Verdict::Forward(r) if r.target == RouteTarget::Site(far.clone())),
            "{v:?}"
        );
        // With b's policy allowing it too, it is delivered.
        let mut allowing = egress.clone();
        allowing.policy = ingress.policy.clone();
        let v = allowing.decide_relayed(&mut packet, "a", &sender, |_| Some(MTU));
        assert!(
            matches!(&v, Verdict::Forward(r) if r.target == RouteTarget::Site(far.clone())),
            "{v:?}"
        );
        // Residency at b: far in eu, a sender in us (eu lets no other
        // region in), even with a policy that would allow it.
        let mut everyone = allowing.clone();
        everyone.policy = one_rule(
            "all",
            &[id("sites"), id("gateways")],
            &[id("sites")],
            &[],
            policy::Backends::Rules,
        );
        let us_site = Sender::Site {
            site: f.us_site.clone(),
            region: f.us.clone(),
            lan: false,
        };
        let us_gateway = Sender::Gateway {
            gateway: id("gw-us"),
            region: f.us.clone(),
        };
        for sender in [&us_site, &us_gateway] {
            let mut p = ipv4([100, 80, 0, 2], [100, 64, 0, 9], PROTO_UDP, &[0; 8], true);
            assert_eq!(
                everyone
                    .decide_relayed(&mut p, "a", sender, |_| Some(MTU))
                    .drop_reason(),
                Some(DropReason::Residency),
                "{sender:?}"
            );
            assert_eq!(p[8], 64, "not forwarded: TTL untouched");
        }
        // Once b's residency lets us in (both ways, for sites), the same
        // packets are delivered.
        let mut open = everyone.clone();
        open.residency = Residency::new(BTreeMap::from([
            (f.eu.clone(), BTreeSet::from([f.us.clone()])),
            (f.us.clone(), BTreeSet::from([f.eu.clone()])),
        ]));
        for sender in [&us_site, &us_gateway] {
            let mut p = ipv4([100, 80, 0, 2], [100, 64, 0, 9], PROTO_UDP, &[0; 8], true);
            assert!(matches!(
                open.decide_relayed(&mut p, "a", sender, |_| Some(MTU)),
                Verdict::Forward(_)
            ));
        }
        // A LAN host of a site is the LAN to b's policy, as the frame
        // says: a rule for site b's own address does not admit it.
        let mut lan_rule = egress.clone();
        lan_rule.policy = one_rule(
            "lan-of-b",
            &[id("lan-of:site:b")],
            &[id("site:far")],
            &[],
            policy::Backends::Region,
        );
        for (lan, verdict) in [(true, None), (false, Some(DropReason::Policy))] {
            let sender = Sender::Site {
                site: f.b.clone(),
                region: f.eu.clone(),
                lan,
            };
            let mut p = ipv4([100, 70, 9, 20], [100, 64, 0, 9], PROTO_UDP, &[0; 8], true);
            assert_eq!(
                lan_rule
                    .decide_relayed(&mut p, "a", &sender, |_| Some(MTU))
                    .drop_reason(),
                verdict,
                "lan: {lan}"
            );
        }
        // A broker's own ICMP error names nobody and passes; nothing else
        // may pass under that name.
        let original = ipv4([100, 64, 0, 2], [100, 64, 0, 9], PROTO_UDP, &[0; 8], true);
        let mut error_back = ip::icmp_error(
            &Packet::parse(&original).unwrap(),
            IcmpError::TimeExceeded,
            id("100.64.0.1"),
        )
        .unwrap();
        // Back toward a, at the ingress broker: a is its own site.
        assert!(matches!(
            ingress.decide_relayed(&mut error_back, "b", &Sender::Router, |_| Some(MTU)),
            Verdict::Forward(_)
        ));
        let mut not_error = ipv4([100, 64, 0, 1], [100, 64, 0, 2], PROTO_UDP, &[0; 8], true);
        assert_eq!(
            ingress.decide_relayed(&mut not_error, "b", &Sender::Router, |_| Some(MTU)),
            Verdict::Drop(DropReason::Policy)
        );
        // It goes nowhere a route does not lead.
        let stray = ipv4([192, 0, 2, 1], [100, 64, 0, 9], PROTO_UDP, &[0; 8], true);
        let mut error = ip::icmp_error(
            &Packet::parse(&stray).unwrap(),
            IcmpError::TimeExceeded,
            id("100.64.0.1"),
        )
        .unwrap();
        assert_eq!(
            ingress
                .decide_relayed(&mut error, "b", &Sender::Router, |_| Some(MTU))
                .drop_reason(),
            Some(DropReason::NoRoute)
        );
    }

    #[test]
    fn reachability_follows_residency() {
        let f = fixture();
        let pools = BTreeMap::from([
            (f.eu.clone(), vec![net("100.64.0.0/16")]),
            (f.us.clone(), vec![net("100.80.0.0/16")]),
        ]);
        assert_eq!(
            f.router.reachable_from(&f.eu, &pools),
            vec![net("10.20.0.0/16"), net("100.64.0.0/16")]
        );
        assert_eq!(
            f.router.reachable_from(&f.us, &pools),
            vec![net("100.80.0.0/16")]
        );
    }

    #[test]
    fn gateways_get_the_routes_of_sites_on_every_broker_their_region_may_reach() {
        use crate::ipam::{Lease, LeaseKind};
        use crate::peering::{PeerView, RemoteRoutes};
        let mut f = fixture();
        let routes = |r: &Router, region: &RegionId| -> Vec<(String, String)> {
            r.gateway_site_routes(region)
                .into_iter()
                .map(|s| (s.prefix.to_string(), s.site.to_string()))
                .collect()
        };
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(p, s)| (p.to_string(), s.to_string()))
                .collect()
        };
        // Only this broker's sessions so far; the gateway prefix is no
        // site route, and residency keeps the us site out.
        assert_eq!(
            routes(&f.router, &f.eu),
            pairs(&[
                ("100.64.0.2/32", "a"),
                ("100.64.0.3/32", "b"),
                ("fd00::2/128", "a")
            ])
        );
        // Sites held by broker b: far (address and LAN) in eu, faraway in
        // us; and b's stale view of site a, which is here now.
        let (far, faraway): (SiteId, SiteId) = (id("far"), id("faraway"));
        let view = PeerView {
            holders: BTreeMap::from([
                (far.clone(), "b".to_string()),
                (faraway.clone(), "b".to_string()),
                (f.a.clone(), "b".to_string()),
            ]),
            gateways: BTreeMap::new(),
        };
        let lease = |prefix: &str, site: &SiteId, region: &RegionId, kind| Lease {
            prefix: net(prefix),
            site: site.clone(),
            region: region.clone(),
            kind,
            release_at: None,
        };
        let leases = [
            lease("100.64.0.9/32", &far, &f.eu, LeaseKind::SiteAddress),
            lease(
                "100.70.0.0/24",
                &far,
                &f.eu,
                LeaseKind::LanMapping {
                    lan: net("192.168.1.0/24"),
                },
            ),
            lease("100.80.0.9/32", &faraway, &f.us, LeaseKind::SiteAddress),
            lease("100.64.0.2/32", &f.a, &f.eu, LeaseKind::SiteAddress),
        ];
        f.router.remote = Arc::new(RemoteRoutes::build(&view, &leases, 1300));
        assert_eq!(
            routes(&f.router, &f.eu),
            pairs(&[
                ("100.64.0.2/32", "a"),
                ("100.64.0.3/32", "b"),
                ("100.64.0.9/32", "far"),
                ("100.70.0.0/24", "far"),
                ("fd00::2/128", "a")
            ])
        );
        // A us gateway reaches the us sites, here and on b.
        assert_eq!(
            routes(&f.router, &f.us),
            pairs(&[("100.80.0.2/32", "c"), ("100.80.0.9/32", "faraway")])
        );
        // With eu opened to us gateways, the us gateway gets the eu sites
        // of both brokers too.
        f.router.residency = Residency::new(BTreeMap::from([(
            f.eu.clone(),
            BTreeSet::from([f.us.clone()]),
        )]));
        assert_eq!(routes(&f.router, &f.us).len(), 7);
        // far moves here: one route, now through this broker's session.
        f.router.table.insert(Route {
            prefix: net("100.64.0.9/32"),
            kind: RouteKind::SiteAddress,
            target: RouteTarget::Site(far.clone()),
            region: f.eu.clone(),
        });
        let eu = f.router.gateway_site_routes(&f.eu);
        assert_eq!(
            eu.iter()
                .filter(|r| r.prefix == net("100.64.0.9/32"))
                .count(),
            1
        );
    }
}
