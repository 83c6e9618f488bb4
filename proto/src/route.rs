//! The route table: longest-prefix match over sites, LAN mappings and gateway
//! prefixes, with explanations.
//!
//! # Structure
//!
//! For each address family there is one hash map per prefix length present,
//! keyed by the masked address. A lookup probes the lengths present from the
//! longest down and stops at the first hit, so its cost is bounded by the
//! number of distinct lengths (typically 3-6: /32 and /128 for site addresses,
//! a few LAN sizes, a few gateway prefixes), not by the number of routes. The
//! maps hold only a slot number; routes live in a slab, so the probed memory
//! stays small and cache-friendly.
//!
//! # Preference
//!
//! The longest matching prefix wins. Between routes for the same prefix, the
//! kind decides (a site's own address, then a site's LAN mapping, then a
//! gateway prefix), then the target's name, so the choice is deterministic
//! and every broker makes the same one.
//!
//! # Explanations
//!
//! [`RouteTable::lookup`] returns a [`Decision`]: the winner, found on the fast
//! path, and [`Decision::explain`], which lists every candidate that matched
//! and why each lost. Explaining costs more than routing, so only operators
//! (`tether trace`) pay for it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::hash::Hash;
use std::net::IpAddr;

use ipnet::IpNet;
use rustc_hash::FxHashMap;

use crate::ids::{GatewayId, RegionId, SiteId};

/// What a route leads to, in order of preference for equal prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum RouteKind {
    /// A site's own overlay address.
    SiteAddress,
    /// The mapped prefix of a LAN behind a site.
    SiteLan,
    /// A backend prefix behind a gateway.
    Gateway,
}

impl RouteKind {
    /// The name used in tables and APIs.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::SiteAddress => "site-address",
            RouteKind::SiteLan => "site-lan",
            RouteKind::Gateway => "gateway",
        }
    }
}

impl fmt::Display for RouteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where packets matching a route are sent.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(
    feature = "serde",
    serde(rename_all = "snake_case", tag = "type", content = "id")
)]
pub enum RouteTarget {
    /// A site's tunnel session.
    Site(SiteId),
    /// A gateway peer.
    Gateway(GatewayId),
}

impl fmt::Display for RouteTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteTarget::Site(s) => write!(f, "site {s}"),
            RouteTarget::Gateway(g) => write!(f, "gateway {g}"),
        }
    }
}

/// One route.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Route {
    /// Destination prefix (host bits zero).
    pub prefix: IpNet,
    /// What the route is for.
    pub kind: RouteKind,
    /// Where it leads.
    pub target: RouteTarget,
    /// The region of the target (data residency).
    pub region: RegionId,
}

impl Route {
    /// Order among routes for the same prefix: smaller is preferred.
    fn preference(&self) -> (RouteKind, &RouteTarget) {
        (self.kind, &self.target)
    }
}

/// An address-family key for the per-length maps.
trait Key: Copy + Eq + Hash {
    const WIDTH: u8;
    fn masked(self, len: u8) -> Self;
}

impl Key for u32 {
    const WIDTH: u8 = 32;
    #[inline]
    fn masked(self, len: u8) -> Self {
        match len {
            0 => 0,
            l => self & (u32::MAX << (32 - u32::from(l.min(32)))),
        }
    }
}

impl Key for u128 {
    const WIDTH: u8 = 128;
    #[inline]
    fn masked(self, len: u8) -> Self {
        match len {
            0 => 0,
            l => self & (u128::MAX << (128 - u32::from(l.min(128)))),
        }
    }
}

/// Per-length maps of one family.
#[derive(Debug, Clone)]
struct LengthIndex<K> {
    /// Lengths with at least one prefix, longest first.
    lengths: Vec<u8>,
    /// Map per length (index = prefix length) from masked key to slot.
    maps: Vec<FxHashMap<K, u32>>,
}

impl<K: Key> Default for LengthIndex<K> {
    fn default() -> Self {
        Self {
            lengths: Vec::new(),
            maps: (0..=K::WIDTH).map(|_| FxHashMap::default()).collect(),
        }
    }
}

impl<K: Key> LengthIndex<K> {
    #[inline]
    fn find(&self, key: K) -> Option<u32> {
        for &len in &self.lengths {
            if let Some(&slot) = self
                .maps
                .get(usize::from(len))
                .and_then(|m| m.get(&key.masked(len)))
            {
                return Some(slot);
            }
        }
        None
    }

    /// Every slot whose prefix contains `key`, longest first.
    fn find_all(&self, key: K) -> Vec<u32> {
        self.lengths
            .iter()
            .filter_map(|&len| {
                self.maps
                    .get(usize::from(len))
                    .and_then(|m| m.get(&key.masked(len)))
                    .copied()
            })
            .collect()
    }

    fn get(&self, key: K, len: u8) -> Option<u32> {
        self.maps.get(usize::from(len))?.get(&key).copied()
    }

    fn insert(&mut self, key: K, len: u8, slot: u32) {
        if let Some(map) = self.maps.get_mut(usize::from(len)) {
            map.insert(key, slot);
            if !self.lengths.contains(&len) {
                self.lengths.push(len);
                self.lengths.sort_unstable_by(|a, b| b.cmp(a));
            }
        }
    }

    fn remove(&mut self, key: K, len: u8) {
        if let Some(map) = self.maps.get_mut(usize::from(len)) {
            map.remove(&key);
            if map.is_empty() {
                self.lengths.retain(|&l| l != len);
                // Give the memory of a drained length back.
                *map = FxHashMap::default();
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Slot {
    prefix: IpNet,
    /// Routes for `prefix`, most preferred first.
    routes: Vec<Route>,
}

/// The route table. See the [module documentation](self).
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    v4: LengthIndex<u32>,
    v6: LengthIndex<u128>,
    by_target: BTreeMap<RouteTarget, BTreeSet<IpNet>>,
    len: usize,
}

enum FamilyKey {
    V4(u32),
    V6(u128),
}

fn key_of(addr: IpAddr) -> FamilyKey {
    match addr {
        IpAddr::V4(a) => FamilyKey::V4(u32::from(a)),
        IpAddr::V6(a) => FamilyKey::V6(u128::from(a)),
    }
}

impl RouteTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table has no routes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn slot_of(&self, prefix: IpNet) -> Option<u32> {
        let len = prefix.prefix_len();
        match key_of(prefix.network()) {
            FamilyKey::V4(k) => self.v4.get(k, len),
            FamilyKey::V6(k) => self.v6.get(k, len),
        }
    }

    fn slot(&self, slot: u32) -> Option<&Slot> {
        self.slots.get(slot as usize).and_then(Option::as_ref)
    }

    /// Adds `route` (its prefix is truncated to its length). A route with the
    /// same prefix, kind and target is replaced. Returns whether the table
    /// changed.
    pub fn insert(&mut self, mut route: Route) -> bool {
        route.prefix = route.prefix.trunc();
        let prefix = route.prefix;
        let slot_id = match self.slot_of(prefix) {
            Some(id) => id,
            None => {
                let slot = Slot {
                    prefix,
                    routes: Vec::new(),
                };
                let id = match self.free.pop() {
                    Some(id) => {
                        if let Some(entry) = self.slots.get_mut(id as usize) {
                            *entry = Some(slot);
                        }
                        id
                    }
                    None => {
                        self.slots.push(Some(slot));
                        (self.slots.len() - 1) as u32
                    }
                };
                let len = prefix.prefix_len();
                match key_of(prefix.network()) {
                    FamilyKey::V4(k) => self.v4.insert(k, len, id),
                    FamilyKey::V6(k) => self.v6.insert(k, len, id),
                }
                id
            }
        };
        let Some(Some(slot)) = self.slots.get_mut(slot_id as usize) else {
            return false;
        };
        if let Some(existing) = slot
            .routes
            .iter_mut()
            .find(|r| r.kind == route.kind && r.target == route.target)
        {
            if *existing == route {
                return false;
            }
            *existing = route;
        } else {
            self.by_target
                .entry(route.target.clone())
                .or_default()
                .insert(prefix);
            // Most prefixes have one route (a site's address): room for one,
            // not the four a first push makes room for, held per site.
            if slot.routes.is_empty() {
                slot.routes.reserve_exact(1);
            }
            slot.routes.push(route);
            self.len += 1;
        }
        slot.routes
            .sort_by(|a, b| a.preference().cmp(&b.preference()));
        true
    }

    /// Removes the routes for `prefix` leading to `target`; returns them.
    pub fn remove(&mut self, prefix: IpNet, target: &RouteTarget) -> Vec<Route> {
        let prefix = prefix.trunc();
        let Some(slot_id) = self.slot_of(prefix) else {
            return Vec::new();
        };
        let Some(Some(slot)) = self.slots.get_mut(slot_id as usize) else {
            return Vec::new();
        };
        let (removed, kept): (Vec<Route>, Vec<Route>) =
            slot.routes.drain(..).partition(|r| &r.target == target);
        slot.routes = kept;
        let now_empty = slot.routes.is_empty();
        self.len -= removed.len();
        if !removed.is_empty()
            && let Some(set) = self.by_target.get_mut(target)
        {
            set.remove(&prefix);
            if set.is_empty() {
                self.by_target.remove(target);
            }
        }
        if now_empty {
            if let Some(entry) = self.slots.get_mut(slot_id as usize) {
                *entry = None;
            }
            self.free.push(slot_id);
            let len = prefix.prefix_len();
            match key_of(prefix.network()) {
                FamilyKey::V4(k) => self.v4.remove(k, len),
                FamilyKey::V6(k) => self.v6.remove(k, len),
            }
        }
        removed
    }

    /// Removes every route leading to `target` (a site going away); returns
    /// them.
    pub fn remove_target(&mut self, target: &RouteTarget) -> Vec<Route> {
        let prefixes: Vec<IpNet> = self
            .by_target
            .get(target)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        prefixes
            .into_iter()
            .flat_map(|p| self.remove(p, target))
            .collect()
    }

    /// The routes leading to `target`.
    pub fn routes_to(&self, target: &RouteTarget) -> Vec<&Route> {
        let Some(prefixes) = self.by_target.get(target) else {
            return Vec::new();
        };
        prefixes
            .iter()
            .filter_map(|p| self.slot_of(*p).and_then(|s| self.slot(s)))
            .flat_map(|s| s.routes.iter().filter(|r| &r.target == target))
            .collect()
    }

    /// The routes for exactly `prefix`, most preferred first.
    pub fn routes_for(&self, prefix: IpNet) -> &[Route] {
        self.slot_of(prefix.trunc())
            .and_then(|s| self.slot(s))
            .map(|s| s.routes.as_slice())
            .unwrap_or_default()
    }

    /// Every route, ordered by prefix then preference.
    pub fn routes(&self) -> Vec<&Route> {
        let mut slots: Vec<&Slot> = self.slots.iter().flatten().collect();
        slots.sort_by_key(|s| s.prefix);
        slots.into_iter().flat_map(|s| s.routes.iter()).collect()
    }

    /// Longest-prefix match for `dst`.
    #[inline]
    pub fn lookup(&self, dst: IpAddr) -> Decision<'_> {
        let slot = match key_of(dst) {
            FamilyKey::V4(k) => self.v4.find(k),
            FamilyKey::V6(k) => self.v6.find(k),
        };
        Decision {
            table: self,
            destination: dst,
            winner: slot
                .and_then(|s| self.slot(s))
                .and_then(|s| s.routes.first()),
        }
    }
}

/// The result of a lookup: the winning route, and the means to explain it.
#[derive(Debug, Clone, Copy)]
pub struct Decision<'a> {
    table: &'a RouteTable,
    destination: IpAddr,
    winner: Option<&'a Route>,
}

impl<'a> Decision<'a> {
    /// The route packets to the destination take, if any.
    #[inline]
    pub fn winner(&self) -> Option<&'a Route> {
        self.winner
    }

    /// Every route whose prefix contains the destination, each with the
    /// reason it won or lost.
    pub fn explain(&self) -> Explanation {
        let slots = match key_of(self.destination) {
            FamilyKey::V4(k) => self.table.v4.find_all(k),
            FamilyKey::V6(k) => self.table.v6.find_all(k),
        };
        let mut candidates = Vec::new();
        let mut winner: Option<Route> = None;
        for slot in slots.iter().filter_map(|&s| self.table.slot(s)) {
            for route in &slot.routes {
                let verdict = match &winner {
                    None => Verdict::Winner,
                    Some(w) if w.prefix.prefix_len() > route.prefix.prefix_len() => {
                        Verdict::ShorterPrefix {
                            winner_len: w.prefix.prefix_len(),
                        }
                    }
                    Some(w) if w.kind < route.kind => Verdict::LessPreferredKind {
                        winner_kind: w.kind,
                    },
                    Some(w) => Verdict::TieBreak {
                        winner: w.target.clone(),
                    },
                };
                if verdict == Verdict::Winner {
                    winner = Some(route.clone());
                }
                candidates.push(Candidate {
                    route: route.clone(),
                    verdict,
                });
            }
        }
        Explanation {
            destination: self.destination,
            winner,
            candidates,
        }
    }
}

/// Why a candidate route won or lost.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case", tag = "verdict"))]
pub enum Verdict {
    /// The longest matching prefix, most preferred among its routes.
    Winner,
    /// A longer prefix matched.
    ShorterPrefix {
        /// The winner's prefix length.
        winner_len: u8,
    },
    /// Same prefix, but the winner's kind is preferred.
    LessPreferredKind {
        /// The winner's kind.
        winner_kind: RouteKind,
    },
    /// Same prefix and kind; the target name broke the tie.
    TieBreak {
        /// The winning target.
        winner: RouteTarget,
    },
}

/// One matching route in an explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Candidate {
    /// The route.
    pub route: Route,
    /// Why it won or lost.
    #[cfg_attr(feature = "serde", serde(flatten))]
    pub verdict: Verdict,
}

/// Every route that matched a destination and the reason for the choice.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Explanation {
    /// The address looked up.
    pub destination: IpAddr,
    /// The winning route, if any matched.
    pub winner: Option<Route>,
    /// Every matching route, longest prefix first.
    pub candidates: Vec<Candidate>,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Winner => f.write_str("chosen: longest matching prefix"),
            Verdict::ShorterPrefix { winner_len } => {
                write!(f, "not chosen: a /{winner_len} matches more specifically")
            }
            Verdict::LessPreferredKind { winner_kind } => {
                write!(
                    f,
                    "not chosen: same prefix, {winner_kind} routes are preferred"
                )
            }
            Verdict::TieBreak { winner } => {
                write!(f, "not chosen: same prefix and kind, {winner} sorts first")
            }
        }
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.winner {
            Some(w) => writeln!(
                f,
                "{} via {} ({} {}, region {})",
                self.destination, w.target, w.kind, w.prefix, w.region
            )?,
            None => writeln!(f, "{}: no route", self.destination)?,
        }
        for c in &self.candidates {
            writeln!(
                f,
                "  {:<22} {:<13} {:<28} region {:<12} {}",
                c.route.prefix.to_string(),
                c.route.kind.as_str(),
                c.route.target.to_string(),
                c.route.region.as_str(),
                c.verdict
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn route(prefix: &str, kind: RouteKind, target: RouteTarget) -> Route {
        Route {
            prefix: prefix.parse().unwrap(),
            kind,
            target,
            region: RegionId::new("eu").unwrap(),
        }
    }
    fn site(s: &str) -> RouteTarget {
        RouteTarget::Site(SiteId::new(s).unwrap())
    }
    fn gw(s: &str) -> RouteTarget {
        RouteTarget::Gateway(GatewayId::new(s).unwrap())
    }

    #[test]
    fn longest_prefix_wins_and_is_explained() {
        let mut t = RouteTable::new();
        t.insert(route("100.64.0.0/10", RouteKind::Gateway, gw("gw-b")));
        t.insert(route(
            "100.64.0.7/32",
            RouteKind::SiteAddress,
            site("hospital-a"),
        ));
        t.insert(route(
            "100.64.1.0/24",
            RouteKind::SiteLan,
            site("hospital-a"),
        ));
        t.insert(route("100.64.0.0/10", RouteKind::Gateway, gw("gw-a")));
        assert_eq!(t.len(), 4);

        let d = t.lookup("100.64.0.7".parse().unwrap());
        assert_eq!(d.winner().unwrap().target, site("hospital-a"));
        let e = d.explain();
        assert_eq!(e.candidates.len(), 3);
        assert_eq!(e.candidates[0].verdict, Verdict::Winner);
        assert_eq!(
            e.candidates[1].verdict,
            Verdict::ShorterPrefix { winner_len: 32 }
        );
        assert_eq!(
            e.candidates[1].route.target,
            gw("gw-a"),
            "gw-a sorts before gw-b"
        );
        let text = e.to_string();
        assert!(text.starts_with("100.64.0.7 via site hospital-a"), "{text}");
        assert!(text.contains("a /32 matches more specifically"), "{text}");

        // Between two gateways for one prefix the name breaks the tie.
        let d = t.lookup("100.65.0.1".parse().unwrap());
        assert_eq!(d.winner().unwrap().target, gw("gw-a"));
        assert_eq!(
            d.explain().candidates[1].verdict,
            Verdict::TieBreak { winner: gw("gw-a") }
        );

        assert!(t.lookup("10.0.0.1".parse().unwrap()).winner().is_none());
        assert!(
            t.lookup("10.0.0.1".parse().unwrap())
                .explain()
                .to_string()
                .contains("no route")
        );
    }

    #[test]
    fn kind_preference_for_equal_prefixes() {
        let mut t = RouteTable::new();
        t.insert(route("10.0.0.0/24", RouteKind::Gateway, gw("a")));
        t.insert(route("10.0.0.0/24", RouteKind::SiteLan, site("z")));
        let e = t.lookup("10.0.0.9".parse().unwrap()).explain();
        assert_eq!(e.winner.unwrap().kind, RouteKind::SiteLan);
        assert_eq!(
            e.candidates[1].verdict,
            Verdict::LessPreferredKind {
                winner_kind: RouteKind::SiteLan
            }
        );
    }

    #[test]
    fn removal_by_target_and_reinsert() {
        let mut t = RouteTable::new();
        t.insert(route("100.64.0.7/32", RouteKind::SiteAddress, site("a")));
        t.insert(route("fd7a::7/128", RouteKind::SiteAddress, site("a")));
        t.insert(route("100.64.1.0/24", RouteKind::SiteLan, site("a")));
        t.insert(route("100.64.0.0/10", RouteKind::Gateway, gw("g")));
        assert_eq!(t.routes_to(&site("a")).len(), 3);
        assert!(
            !t.insert(route("100.64.0.7/32", RouteKind::SiteAddress, site("a"))),
            "duplicate"
        );
        assert_eq!(t.remove_target(&site("a")).len(), 3);
        assert_eq!(t.len(), 1);
        assert_eq!(
            t.lookup("100.64.0.7".parse().unwrap())
                .winner()
                .unwrap()
                .target,
            gw("g")
        );
        assert!(t.lookup("fd7a::7".parse().unwrap()).winner().is_none());
        t.insert(route("100.64.0.7/32", RouteKind::SiteAddress, site("b")));
        assert_eq!(
            t.lookup("100.64.0.7".parse().unwrap())
                .winner()
                .unwrap()
                .target,
            site("b")
        );
        assert_eq!(t.routes().len(), 2);
    }

    /// The reference: scan every route.
    fn naive(routes: &[Route], dst: IpAddr) -> Option<&Route> {
        routes
            .iter()
            .filter(|r| r.prefix.contains(&dst))
            .min_by(|a, b| {
                b.prefix
                    .prefix_len()
                    .cmp(&a.prefix.prefix_len())
                    .then_with(|| a.preference().cmp(&b.preference()))
            })
    }

    fn arb_route() -> impl Strategy<Value = Route> {
        let v4 = (0u32..=0xffff, 8u8..=32).prop_map(|(low, len)| {
            ipnet::Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 | (low << 8) | (low & 0xff)), len)
                .unwrap()
                .trunc()
                .into()
        });
        let v6 = (0u128..=0xffff, 100u8..=128).prop_map(|(low, len)| {
            ipnet::Ipv6Net::new(Ipv6Addr::from((0xfd00u128 << 112) | low), len)
                .unwrap()
                .trunc()
                .into()
        });
        (
            prop_oneof![3 => v4, 1 => v6],
            prop_oneof![
                Just(RouteKind::SiteAddress),
                Just(RouteKind::SiteLan),
                Just(RouteKind::Gateway)
            ],
            0u8..4,
        )
            .prop_map(|(prefix, kind, t): (IpNet, _, _)| Route {
                prefix,
                kind,
                target: if t % 2 == 0 {
                    RouteTarget::Site(SiteId::new(format!("s{t}")).unwrap())
                } else {
                    RouteTarget::Gateway(GatewayId::new(format!("g{t}")).unwrap())
                },
                region: RegionId::new("eu").unwrap(),
            })
    }

    fn arb_dst() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            (0u32..=0xffff_ffff)
                .prop_map(|a| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (a & 0x00ff_ffff)))),
            any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
            (0u128..=0x1ffff).prop_map(|a| IpAddr::V6(Ipv6Addr::from((0xfd00u128 << 112) | a))),
        ]
    }

    proptest! {
        #[test]
        fn agrees_with_linear_scan(
            routes in proptest::collection::vec(arb_route(), 0..80),
            removals in proptest::collection::vec(any::<prop::sample::Index>(), 0..20),
            dsts in proptest::collection::vec(arb_dst(), 1..60),
        ) {
            let mut table = RouteTable::new();
            let mut reference: Vec<Route> = Vec::new();
            for r in routes {
                table.insert(r.clone());
                reference.retain(|x| !(x.prefix == r.prefix && x.kind == r.kind && x.target == r.target));
                reference.push(r);
            }
            for idx in removals {
                if reference.is_empty() { break; }
                let r = reference[idx.index(reference.len())].clone();
                table.remove(r.prefix, &r.target);
                reference.retain(|x| !(x.prefix == r.prefix && x.target == r.target));
            }
            prop_assert_eq!(table.len(), reference.len());
            // Also probe the routes' own first and last addresses.
            let probes: Vec<IpAddr> = dsts.into_iter()
                .chain(reference.iter().flat_map(|r| [r.prefix.network(), r.prefix.broadcast()]))
                .collect();
            for dst in probes {
                let decision = table.lookup(dst);
                let expected = naive(&reference, dst);
                prop_assert_eq!(decision.winner(), expected, "dst {}", dst);
                let explanation = decision.explain();
                let matching = reference.iter().filter(|r| r.prefix.contains(&dst)).count();
                prop_assert_eq!(explanation.candidates.len(), matching);
                prop_assert_eq!(explanation.winner.as_ref(), expected);
            }
        }
    }
}
