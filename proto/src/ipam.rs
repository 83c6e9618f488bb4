//! Address management over bring-your-own pools.
//!
//! Operators give each region one or more IPv4 and IPv6 prefixes. From them
//! a site gets one stable host address per family ([`LeaseKind::SiteAddress`])
//! and, for each LAN it exposes, a block of the LAN's size
//! ([`LeaseKind::LanMapping`]) so that overlapping hospital LANs (everyone has
//! 192.168.1.0/24) are mapped apart 1:1.
//!
//! # Allocation as compare-and-set
//!
//! [`Ipam`] never mutates state. It reads a snapshot of a region's leases
//! ([`RegionLeases`], with a version) and returns a [`Plan`]: either the lease
//! the site already holds, or a [`Txn`] — "if the region is still at version
//! *v*, put these leases and delete those". A store applies a `Txn`
//! atomically or rejects it; on [`Conflict`] the caller re-reads and plans
//! again. This is a single compare-and-set per allocation, which the embedded
//! store and etcd (compare `mod_revision`, then put) both provide, and it is
//! why two brokers racing for the last address can never both win it.
//!
//! # Stability
//!
//! A site that holds a lease gets the same lease back. A site that lost its
//! lease (released, or a fresh store) starts searching at a position derived
//! from a hash of its identity, so it usually lands on the address it had.
//!
//! # Reserved addresses
//!
//! In every pool prefix the first address (the network address, or IPv6's
//! subnet-router anycast address) and the second (the region's router
//! address: source of ICMP errors, the local gateway's own overlay address)
//! are never leased, nor is the last address of an IPv4 pool prefix (its
//! broadcast address).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use thiserror::Error;

use crate::ids::{RegionId, SiteId};
use crate::net::{self, Family};

/// Shortest IPv6 pool prefix accepted (keeps block arithmetic in range; no
/// operator brings a shorter one).
pub const MIN_V6_POOL_LEN: u8 = 8;

/// What a lease is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case", tag = "kind"))]
pub enum LeaseKind {
    /// The site's own overlay address (a /32 or /128).
    SiteAddress,
    /// The block a LAN behind the site is mapped to, 1:1.
    LanMapping {
        /// The LAN prefix as the hospital numbers it.
        lan: IpNet,
    },
}

/// One allocated prefix and its owner.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Lease {
    /// The allocated prefix (from a pool of `region`).
    pub prefix: IpNet,
    /// The owning site.
    pub site: SiteId,
    /// The region whose pool it came from.
    pub region: RegionId,
    /// What it is for.
    #[cfg_attr(feature = "serde", serde(flatten))]
    pub kind: LeaseKind,
    /// Set while a LAN mapping is unused (its LAN left the site's
    /// configuration): when the mapping is released, in seconds since the
    /// Unix epoch. Stored with the lease, so a restarted broker keeps the
    /// deadline; cleared when the site maps the LAN again.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub release_at: Option<u64>,
}

impl Lease {
    /// Whether the lease is in use (not waiting to be released).
    pub fn in_use(&self) -> bool {
        self.release_at.is_none()
    }

    fn with_release_at(&self, release_at: Option<u64>) -> Lease {
        Lease {
            release_at,
            ..self.clone()
        }
    }
}

/// Why an allocation cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IpamError {
    /// No pools are configured for the region.
    #[error("region {0} has no address pools")]
    UnknownRegion(RegionId),
    /// The region has no pool of the needed family.
    #[error("region {region} has no {family} pool")]
    NoPool {
        /// The region.
        region: RegionId,
        /// The missing family.
        family: Family,
    },
    /// Every block of the size asked for is taken.
    #[error("region {region}'s {family} pools have no free /{len} left")]
    Exhausted {
        /// The region.
        region: RegionId,
        /// The family.
        family: Family,
        /// Prefix length asked for.
        len: u8,
    },
    /// The LAN is larger than any pool prefix of the region.
    #[error("LAN {lan} is larger than every {family} pool of region {region}")]
    LanTooLarge {
        /// The LAN asked for.
        lan: IpNet,
        /// The region.
        region: RegionId,
        /// The family.
        family: Family,
    },
    /// The LAN overlaps an overlay pool: its hosts' addresses are also
    /// addresses the tunnel routes, so replies to them would go into the
    /// tunnel instead of onto the LAN.
    #[error(
        "LAN {lan} overlaps the overlay pool {pool}: replies to its hosts would be routed into \
         the tunnel; a LAN must not use the overlay's addresses (renumber the overlay pools, or \
         leave this LAN out of the site's lans)"
    )]
    LanOverlapsPool {
        /// The LAN asked for.
        lan: IpNet,
        /// The pool it overlaps.
        pool: IpNet,
    },
    /// The site already maps a LAN overlapping this one.
    #[error("site {site} already maps LAN {existing}, which overlaps {lan}")]
    OverlappingLan {
        /// The site.
        site: SiteId,
        /// The LAN asked for.
        lan: IpNet,
        /// The LAN it overlaps.
        existing: IpNet,
    },
    /// The site holds as many LAN mappings in the region as one site may.
    #[error(
        "site {site} already has {held} LAN mappings in region {region}, the most one site may \
         have (max_lan_mappings_per_site); remove a LAN from the site or raise the region's limit"
    )]
    TooManyLans {
        /// The site.
        site: SiteId,
        /// The region.
        region: RegionId,
        /// How many it holds (the limit).
        held: u32,
    },
    /// Mapping the LAN would take the site's mapped space in the region past
    /// the limit of one site.
    #[error(
        "mapping LAN {lan} would give site {site} {total} {unit} of LAN mappings in region \
         {region}, more than the {limit} one site may have ({field}); map a smaller LAN or raise \
         the region's limit"
    )]
    LanSpaceExceeded {
        /// The site.
        site: SiteId,
        /// The region.
        region: RegionId,
        /// The LAN asked for.
        lan: IpNet,
        /// The site's mapped space with this LAN.
        total: u64,
        /// The limit.
        limit: u64,
        /// What `total` and `limit` count: "IPv4 addresses" or "IPv6 /64 subnets".
        unit: &'static str,
        /// The configuration field that sets the limit.
        field: &'static str,
    },
    /// Pool prefixes overlap each other.
    #[error("pool {a} overlaps pool {b}")]
    OverlappingPools {
        /// One pool.
        a: IpNet,
        /// The other.
        b: IpNet,
    },
    /// An IPv6 pool shorter than [`MIN_V6_POOL_LEN`].
    #[error("IPv6 pool {0} is shorter than /{MIN_V6_POOL_LEN}")]
    PoolTooLarge(IpNet),
    /// A pool has bits set beyond its prefix length.
    #[error("pool {0} has host bits set; write it as {1}")]
    HostBits(IpNet, IpNet),
    /// A pool too small to hold anything beyond its reserved addresses.
    #[error("pool {0} is too small: it has no address beyond the reserved ones")]
    PoolTooSmall(IpNet),
}

impl IpamError {
    /// Why a LAN mapping was refused, as a metric label.
    pub fn lan_refusal_reason(&self) -> &'static str {
        match self {
            IpamError::TooManyLans { .. } => "site_lan_count",
            IpamError::LanSpaceExceeded { .. } => "site_lan_space",
            IpamError::Exhausted { .. } => "exhausted",
            IpamError::LanTooLarge { .. } => "too_large",
            IpamError::OverlappingLan { .. } => "overlap",
            IpamError::LanOverlapsPool { .. } => "overlay",
            _ => "other",
        }
    }
}

/// What one site may map of a region's pools: without limits one site
/// asking for LAN after LAN would take the whole pool from every other
/// site of the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LanLimits {
    /// Most LAN mappings one site may hold in the region.
    pub max_mappings: u32,
    /// Most IPv4 addresses one site's IPv4 LAN mappings may cover together.
    pub max_ipv4_addresses: u64,
    /// Most /64 subnets one site's IPv6 LAN mappings may cover together (a
    /// LAN longer than /64 counts as one).
    pub max_ipv6_subnets: u64,
    /// How long a LAN mapping the site no longer uses is kept for it (so a
    /// LAN removed by mistake and put back gets the same mapping) before it
    /// is released for other sites. Mappings waiting to be released still
    /// count towards the limits above, except that a new LAN of the same
    /// site takes their place, oldest deadline first, when it would not fit
    /// otherwise.
    pub release_after: Duration,
}

impl LanLimits {
    /// Default of [`LanLimits::max_mappings`].
    pub const DEFAULT_MAX_MAPPINGS: u32 = 16;
    /// Default of [`LanLimits::max_ipv4_addresses`]: a /20.
    pub const DEFAULT_MAX_IPV4_ADDRESSES: u64 = 4096;
    /// Default of [`LanLimits::max_ipv6_subnets`]: a /56.
    pub const DEFAULT_MAX_IPV6_SUBNETS: u64 = 256;
    /// Default of [`LanLimits::release_after`]: 7 days.
    pub const DEFAULT_RELEASE_AFTER: Duration = Duration::from_secs(7 * 86_400);
}

impl Default for LanLimits {
    fn default() -> Self {
        Self {
            max_mappings: Self::DEFAULT_MAX_MAPPINGS,
            max_ipv4_addresses: Self::DEFAULT_MAX_IPV4_ADDRESSES,
            max_ipv6_subnets: Self::DEFAULT_MAX_IPV6_SUBNETS,
            release_after: Self::DEFAULT_RELEASE_AFTER,
        }
    }
}

/// The size of a LAN in the unit its family's limit counts.
fn lan_size(lan: IpNet) -> u64 {
    let size = match lan {
        IpNet::V4(_) => net::block_size(Family::V4, lan.prefix_len()),
        IpNet::V6(_) => net::block_size(Family::V6, lan.prefix_len().min(64)) >> 64,
    };
    u64::try_from(size).unwrap_or(u64::MAX)
}

/// A transaction a store applies atomically if the region's version still
/// matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Txn {
    /// The region whose leases change.
    pub region: RegionId,
    /// The version the plan was made against.
    pub expected_version: u64,
    /// Leases to create, or to write over a lease of the same prefix held
    /// by the same site (an update).
    pub put: Vec<Lease>,
    /// Prefixes whose leases to delete. Never also in `put`: a store may
    /// refuse to touch one key twice in a transaction (etcd does).
    pub delete: Vec<IpNet>,
}

/// The outcome of planning an allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The site already holds this lease; nothing to write.
    Existing(Lease),
    /// Commit this transaction to obtain the lease `Txn::put[0]`.
    Allocate(Txn),
}

impl Plan {
    /// The lease the site will hold once the plan is committed.
    pub fn lease(&self) -> Option<&Lease> {
        match self {
            Plan::Existing(lease) => Some(lease),
            Plan::Allocate(txn) => txn.put.first(),
        }
    }
}

/// The transaction was planned against an outdated version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("leases changed since the plan was made (expected version {expected}, found {found})")]
pub struct Conflict {
    /// The version the plan expected.
    pub expected: u64,
    /// The version found.
    pub found: u64,
}

/// The leases of one region at one version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionLeases {
    version: u64,
    // Keyed by (family, first address): leases never overlap, so the first
    // address identifies a lease and orders them for range queries.
    by_start: BTreeMap<(Family, u128), Lease>,
    // The keys of each site's leases, so that a site's leases are found
    // without a scan of the region (tens of thousands of sites).
    by_site: BTreeMap<SiteId, BTreeSet<(Family, u128)>>,
}

impl RegionLeases {
    /// A snapshot read from a store.
    pub fn from_parts(version: u64, leases: impl IntoIterator<Item = Lease>) -> Self {
        let mut out = Self {
            version,
            ..Self::default()
        };
        for lease in leases {
            out.insert(lease);
        }
        out
    }

    /// The version this snapshot was read at.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Every lease, ordered by address.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.by_start.values()
    }

    /// Number of leases.
    pub fn len(&self) -> usize {
        self.by_start.len()
    }

    /// Whether there are no leases.
    pub fn is_empty(&self) -> bool {
        self.by_start.is_empty()
    }

    /// The earliest release deadline of the region's unused LAN mappings,
    /// in seconds since the Unix epoch.
    pub fn next_release(&self) -> Option<u64> {
        self.by_start.values().filter_map(|l| l.release_at).min()
    }

    /// The leases held by `site`, ordered by address.
    pub fn of_site<'a>(&'a self, site: &'a SiteId) -> impl Iterator<Item = &'a Lease> + 'a {
        self.by_site
            .get(site)
            .into_iter()
            .flatten()
            .filter_map(|key| self.by_start.get(key))
    }

    /// The lease covering `addr`, if any.
    pub fn lease_at(&self, addr: IpAddr) -> Option<&Lease> {
        let (family, bits) = net::bits(addr);
        let (_, lease) = self.by_start.range(..=(family, bits)).next_back()?;
        lease.prefix.contains(&addr).then_some(lease)
    }

    /// Adds `lease` under its first address, replacing what was there.
    fn insert(&mut self, lease: Lease) -> Option<Lease> {
        let (family, start, _) = net::span(lease.prefix);
        let key = (family, start);
        self.by_site
            .entry(lease.site.clone())
            .or_default()
            .insert(key);
        let previous = self.by_start.insert(key, lease);
        if let Some(p) = &previous {
            self.unindex(&p.site, key);
        }
        previous
    }

    /// Removes the lease starting at `key`.
    fn remove(&mut self, key: (Family, u128)) -> Option<Lease> {
        let lease = self.by_start.remove(&key)?;
        self.unindex(&lease.site, key);
        Some(lease)
    }

    fn unindex(&mut self, site: &SiteId, key: (Family, u128)) {
        // The key may just have been indexed again for another site.
        if self.by_start.get(&key).is_some_and(|l| &l.site == site) {
            return;
        }
        if let Some(keys) = self.by_site.get_mut(site) {
            keys.remove(&key);
            if keys.is_empty() {
                self.by_site.remove(site);
            }
        }
    }

    /// Applies `txn` if it was planned against this version, and bumps the
    /// version. Also refuses puts that would overlap a lease (defence in
    /// depth: a correct plan never does); a refused transaction changes
    /// nothing. Costs the size of the transaction, not of the region.
    pub fn apply(&mut self, txn: &Txn) -> Result<(), Conflict> {
        let conflict = Conflict {
            expected: txn.expected_version,
            found: self.version,
        };
        if txn.expected_version != self.version {
            return Err(conflict);
        }
        let mut removed = Vec::new();
        for prefix in &txn.delete {
            let (family, start, _) = net::span(*prefix);
            if self
                .by_start
                .get(&(family, start))
                .is_some_and(|l| l.prefix == *prefix)
            {
                removed.extend(self.remove((family, start)));
            }
        }
        let mut added = Vec::new();
        for lease in &txn.put {
            let (family, start, end) = net::span(lease.prefix);
            // A put of a prefix the same site holds updates that lease.
            if self
                .by_start
                .get(&(family, start))
                .is_some_and(|l| l.prefix == lease.prefix && l.site == lease.site)
            {
                removed.extend(self.remove((family, start)));
            }
            if first_conflict(&self.by_start, family, start, end).is_some() {
                // Undo: the puts so far, then the deletes and updates.
                for key in added {
                    self.remove(key);
                }
                for lease in removed {
                    self.insert(lease);
                }
                return Err(conflict);
            }
            self.insert(lease.clone());
            added.push((family, start));
        }
        self.version += 1;
        Ok(())
    }
}

/// End address of the first lease overlapping `start..=end`, if any.
fn first_conflict(
    leases: &BTreeMap<(Family, u128), Lease>,
    family: Family,
    start: u128,
    end: u128,
) -> Option<u128> {
    if let Some((_, lease)) = leases.range(..(family, start)).next_back() {
        let (f, _, lease_end) = net::span(lease.prefix);
        if f == family && lease_end >= start {
            return Some(lease_end);
        }
    }
    leases
        .range((family, start)..=(family, end))
        .next()
        .map(|(_, lease)| net::span(lease.prefix).2)
}

/// The pools of every region and the allocation policy over them.
#[derive(Debug, Clone, Default)]
pub struct Ipam {
    pools: BTreeMap<RegionId, Vec<IpNet>>,
    lan_limits: BTreeMap<RegionId, LanLimits>,
}

impl Ipam {
    /// Validates the pools: no host bits, no overlaps (within or across
    /// regions), usable sizes.
    pub fn new(pools: BTreeMap<RegionId, Vec<IpNet>>) -> Result<Self, IpamError> {
        let mut all: Vec<IpNet> = Vec::new();
        for prefixes in pools.values() {
            for &p in prefixes {
                if p.trunc() != p {
                    return Err(IpamError::HostBits(p, p.trunc()));
                }
                if matches!(p, IpNet::V6(_)) && p.prefix_len() < MIN_V6_POOL_LEN {
                    return Err(IpamError::PoolTooLarge(p));
                }
                let family = Family::of(p.addr());
                let reserved = if family == Family::V4 { 3 } else { 2 };
                if net::block_size(family, p.prefix_len()) <= reserved {
                    return Err(IpamError::PoolTooSmall(p));
                }
                if let Some(&other) = all.iter().find(|&&o| net::overlaps(o, p)) {
                    return Err(IpamError::OverlappingPools { a: other, b: p });
                }
                all.push(p);
            }
        }
        Ok(Self {
            pools,
            lan_limits: BTreeMap::new(),
        })
    }

    /// Sets the per-site LAN limits of `region` (others keep the defaults).
    #[must_use]
    pub fn with_lan_limits(mut self, region: RegionId, limits: LanLimits) -> Self {
        self.lan_limits.insert(region, limits);
        self
    }

    /// The per-site LAN limits of `region`.
    pub fn lan_limits(&self, region: &RegionId) -> LanLimits {
        self.lan_limits.get(region).copied().unwrap_or_default()
    }

    /// The regions that have pools.
    pub fn regions(&self) -> impl Iterator<Item = &RegionId> {
        self.pools.keys()
    }

    /// The pool prefixes of `region`.
    pub fn pools(&self, region: &RegionId) -> &[IpNet] {
        self.pools
            .get(region)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// The region's router address of `family`: the second address of its
    /// first pool of that family.
    pub fn router_address(&self, region: &RegionId, family: Family) -> Option<IpAddr> {
        self.pools(region)
            .iter()
            .find(|p| Family::of(p.addr()) == family)
            .map(|&p| {
                let (family, start, _) = net::span(p);
                net::from_bits(family, start + 1)
            })
    }

    /// The first address of the region's first pool of `family` (the pool
    /// whose second address is the router address): reserved, never leased.
    pub fn network_address(&self, region: &RegionId, family: Family) -> Option<IpAddr> {
        self.pools(region)
            .iter()
            .find(|p| Family::of(p.addr()) == family)
            .map(|&p| {
                let (family, start, _) = net::span(p);
                net::from_bits(family, start)
            })
    }

    /// Plans the site's stable host address of `family`.
    pub fn site_address(
        &self,
        leases: &RegionLeases,
        site: &SiteId,
        region: &RegionId,
        family: Family,
    ) -> Result<Plan, IpamError> {
        let existing = leases
            .of_site(site)
            .find(|l| l.kind == LeaseKind::SiteAddress && Family::of(l.prefix.addr()) == family);
        if let Some(lease) = existing {
            return Ok(Plan::Existing(lease.clone()));
        }
        let seed = stable_hash(&[site.as_str(), region.as_str(), "address"]);
        let prefix = self.find_free(leases, region, family, family.width(), seed)?;
        Ok(Plan::Allocate(Txn {
            region: region.clone(),
            expected_version: leases.version(),
            put: vec![Lease {
                prefix,
                site: site.clone(),
                region: region.clone(),
                kind: LeaseKind::SiteAddress,
                release_at: None,
            }],
            delete: Vec::new(),
        }))
    }

    /// Plans the 1:1 mapping of a LAN behind `site` into the region's pool.
    ///
    /// A LAN whose mapping is waiting to be released gets that mapping back.
    /// A new LAN that would not fit the site's limits, or that overlaps a
    /// LAN the site no longer uses, takes the place of the site's unused
    /// mappings (earliest deadline first) in the same transaction.
    pub fn lan_mapping(
        &self,
        leases: &RegionLeases,
        site: &SiteId,
        region: &RegionId,
        lan: IpNet,
    ) -> Result<Plan, IpamError> {
        let lan = lan.trunc();
        // Any region's pool: the tunnel may route all of them to the site.
        if let Some(pool) = self
            .pools
            .values()
            .flatten()
            .find(|p| net::overlaps(**p, lan))
        {
            return Err(IpamError::LanOverlapsPool { lan, pool: *pool });
        }
        let mut reclaim: Vec<&Lease> = Vec::new();
        for lease in leases.of_site(site) {
            if let LeaseKind::LanMapping { lan: mapped } = lease.kind {
                if mapped == lan {
                    if lease.in_use() {
                        return Ok(Plan::Existing(lease.clone()));
                    }
                    // Put back within its grace period: the same mapping.
                    return Ok(Plan::Allocate(Txn {
                        region: region.clone(),
                        expected_version: leases.version(),
                        put: vec![lease.with_release_at(None)],
                        delete: Vec::new(),
                    }));
                }
                if net::overlaps(mapped, lan) {
                    if lease.in_use() {
                        return Err(IpamError::OverlappingLan {
                            site: site.clone(),
                            lan,
                            existing: mapped,
                        });
                    }
                    reclaim.push(lease);
                }
            }
        }
        let family = Family::of(lan.addr());
        let has_pool = self
            .pools(region)
            .iter()
            .any(|p| Family::of(p.addr()) == family);
        if has_pool && !self.fits(region, family, lan.prefix_len()) {
            return Err(IpamError::LanTooLarge {
                lan,
                region: region.clone(),
                family,
            });
        }
        let mut unused: Vec<&Lease> = leases
            .of_site(site)
            .filter(|l| !l.in_use() && matches!(l.kind, LeaseKind::LanMapping { .. }))
            .filter(|l| !reclaim.contains(l))
            .collect();
        unused.sort_by_key(|l| (l.release_at, l.prefix));
        let mut unused = unused.into_iter();
        loop {
            match self.check_lan_limits(leases, site, region, lan, &reclaim) {
                Ok(()) => break,
                Err(e) => match unused.next() {
                    Some(lease) => reclaim.push(lease),
                    None => return Err(e),
                },
            }
        }
        let view;
        let search = if reclaim.is_empty() {
            leases
        } else {
            view = RegionLeases::from_parts(
                leases.version,
                leases.leases().filter(|l| !reclaim.contains(l)).cloned(),
            );
            &view
        };
        let seed = stable_hash(&[site.as_str(), region.as_str(), &lan.to_string()]);
        let prefix = self
            .find_free(search, region, family, lan.prefix_len(), seed)
            .map_err(|e| match e {
                IpamError::Exhausted { .. } if !self.fits(region, family, lan.prefix_len()) => {
                    IpamError::LanTooLarge {
                        lan,
                        region: region.clone(),
                        family,
                    }
                }
                e => e,
            })?;
        Ok(Plan::Allocate(Txn {
            region: region.clone(),
            expected_version: leases.version(),
            put: vec![Lease {
                prefix,
                site: site.clone(),
                region: region.clone(),
                kind: LeaseKind::LanMapping { lan },
                release_at: None,
            }],
            // The new mapping may land on a block it takes over: that key is
            // written over, not deleted too.
            delete: reclaim
                .iter()
                .map(|l| l.prefix)
                .filter(|p| *p != prefix)
                .collect(),
        }))
    }

    /// Refuses a new mapping of `lan` past the site's limits in the region,
    /// not counting the mappings in `without` (about to be released).
    fn check_lan_limits(
        &self,
        leases: &RegionLeases,
        site: &SiteId,
        region: &RegionId,
        lan: IpNet,
        without: &[&Lease],
    ) -> Result<(), IpamError> {
        let limits = self.lan_limits(region);
        let family = Family::of(lan.addr());
        let mut held: u32 = 0;
        let mut space: u64 = lan_size(lan);
        for lease in leases.of_site(site).filter(|l| !without.contains(l)) {
            if let LeaseKind::LanMapping { lan: mapped } = lease.kind {
                held = held.saturating_add(1);
                if Family::of(mapped.addr()) == family {
                    space = space.saturating_add(lan_size(mapped));
                }
            }
        }
        if held >= limits.max_mappings {
            return Err(IpamError::TooManyLans {
                site: site.clone(),
                region: region.clone(),
                held,
            });
        }
        let (limit, unit, field) = match family {
            Family::V4 => (
                limits.max_ipv4_addresses,
                "IPv4 addresses",
                "max_lan_ipv4_addresses_per_site",
            ),
            Family::V6 => (
                limits.max_ipv6_subnets,
                "IPv6 /64 subnets",
                "max_lan_ipv6_subnets_per_site",
            ),
        };
        if space > limit {
            return Err(IpamError::LanSpaceExceeded {
                site: site.clone(),
                region: region.clone(),
                lan,
                total: space,
                limit,
                unit,
                field,
            });
        }
        Ok(())
    }

    /// Plans recording which of the site's LAN mappings it uses: a mapping
    /// covering a prefix of `in_use` (the mapped prefixes the site routes)
    /// is in use; any other is released the region's
    /// [`LanLimits::release_after`] from `now` (a deadline already set
    /// stays). `now` is the wall clock in seconds since the Unix epoch.
    /// `None` when nothing changes.
    pub fn mark_lans(
        &self,
        leases: &RegionLeases,
        site: &SiteId,
        region: &RegionId,
        in_use: &[IpNet],
        now: u64,
    ) -> Option<Txn> {
        let deadline = now.saturating_add(self.lan_limits(region).release_after.as_secs());
        let put: Vec<Lease> = leases
            .of_site(site)
            .filter(|l| matches!(l.kind, LeaseKind::LanMapping { .. }))
            .filter_map(|l| {
                let used = in_use.iter().any(|p| l.prefix.contains(p));
                match (used, l.release_at) {
                    (true, Some(_)) => Some(l.with_release_at(None)),
                    (false, None) => Some(l.with_release_at(Some(deadline))),
                    _ => None,
                }
            })
            .collect();
        (!put.is_empty()).then(|| Txn {
            region: region.clone(),
            expected_version: leases.version(),
            put,
            delete: Vec::new(),
        })
    }

    /// Plans releasing every lease of the region whose deadline is at or
    /// before `now` (seconds since the Unix epoch). `None` when none is due.
    pub fn release_due(&self, leases: &RegionLeases, region: &RegionId, now: u64) -> Option<Txn> {
        let delete: Vec<IpNet> = leases
            .leases()
            .filter(|l| l.release_at.is_some_and(|at| at <= now))
            .map(|l| l.prefix)
            .collect();
        (!delete.is_empty()).then(|| Txn {
            region: region.clone(),
            expected_version: leases.version(),
            put: Vec::new(),
            delete,
        })
    }

    /// Plans the release of every lease `site` holds in the region.
    pub fn release_site(&self, leases: &RegionLeases, site: &SiteId, region: &RegionId) -> Txn {
        Txn {
            region: region.clone(),
            expected_version: leases.version(),
            put: Vec::new(),
            delete: leases.of_site(site).map(|l| l.prefix).collect(),
        }
    }

    /// Plans the release of one lease.
    pub fn release(&self, leases: &RegionLeases, region: &RegionId, prefix: IpNet) -> Txn {
        Txn {
            region: region.clone(),
            expected_version: leases.version(),
            put: Vec::new(),
            delete: vec![prefix],
        }
    }

    fn fits(&self, region: &RegionId, family: Family, len: u8) -> bool {
        self.pools(region)
            .iter()
            .any(|p| Family::of(p.addr()) == family && p.prefix_len() <= len)
    }

    /// Finds a free, aligned block of length `len`, searching the region's
    /// pools of `family` as one space from a position derived from `seed`.
    fn find_free(
        &self,
        leases: &RegionLeases,
        region: &RegionId,
        family: Family,
        len: u8,
        seed: u64,
    ) -> Result<IpNet, IpamError> {
        let pools = self
            .pools
            .get(region)
            .ok_or_else(|| IpamError::UnknownRegion(region.clone()))?;
        let family_pools: Vec<IpNet> = pools
            .iter()
            .copied()
            .filter(|p| Family::of(p.addr()) == family)
            .collect();
        if family_pools.is_empty() {
            return Err(IpamError::NoPool {
                region: region.clone(),
                family,
            });
        }
        let exhausted = || IpamError::Exhausted {
            region: region.clone(),
            family,
            len,
        };
        let block = net::block_size(family, len);
        // (first address, number of blocks, reserved addresses) of each pool
        // prefix that can hold a block of this size.
        let spaces: Vec<(u128, u128, [Option<u128>; 3])> = family_pools
            .iter()
            .filter(|p| p.prefix_len() <= len)
            .map(|&p| {
                let (_, start, end) = net::span(p);
                // 2^(len - pool_len) blocks of `block` addresses each.
                let blocks = 1u128
                    .checked_shl(u32::from(len - p.prefix_len()))
                    .unwrap_or(u128::MAX);
                let broadcast = (family == Family::V4).then_some(end);
                (start, blocks, [Some(start), Some(start + 1), broadcast])
            })
            .collect();
        let total = spaces
            .iter()
            .fold(0u128, |acc, (_, blocks, _)| acc.saturating_add(*blocks));
        if total == 0 {
            return Err(exhausted());
        }

        let locate = |index: u128| -> Option<(usize, u128)> {
            let mut rest = index;
            for (i, (_, blocks, _)) in spaces.iter().enumerate() {
                if rest < *blocks {
                    return Some((i, rest));
                }
                rest -= blocks;
            }
            None
        };

        let mut index = u128::from(seed) % total;
        let mut visited: u128 = 0;
        while visited < total {
            let (pool, local) = locate(index).ok_or_else(exhausted)?;
            let (pool_start, blocks, reserved) = spaces[pool];
            let start = pool_start + local * block;
            let end = start + (block - 1);
            let conflict_end = reserved
                .iter()
                .flatten()
                .filter(|&&r| start <= r && r <= end)
                .max()
                .copied()
                .or_else(|| first_conflict(&leases.by_start, family, start, end));
            let Some(conflict_end) = conflict_end else {
                return Ok(net::prefix(family, start, len));
            };
            // Jump to the first aligned block after the conflicting lease,
            // staying within this pool prefix.
            let next_local = ((conflict_end.saturating_sub(pool_start)) / block)
                .saturating_add(1)
                .min(blocks);
            let skip = next_local.saturating_sub(local).max(1);
            visited = visited.saturating_add(skip);
            index = (index + skip) % total;
        }
        Err(exhausted())
    }
}

/// FNV-1a over the parts: a hash that stays the same across builds and
/// platforms, unlike std's `DefaultHasher`.
fn stable_hash(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.as_bytes().iter().chain(std::iter::once(&0xff)) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn site(s: &str) -> SiteId {
        SiteId::new(s).unwrap()
    }
    fn region() -> RegionId {
        RegionId::new("eu").unwrap()
    }
    fn ipam(prefixes: &[&str]) -> Ipam {
        let mut pools = BTreeMap::new();
        pools.insert(region(), prefixes.iter().map(|p| net(p)).collect());
        Ipam::new(pools).unwrap()
    }

    /// Plans and commits, as a store would.
    fn commit(
        leases: &mut RegionLeases,
        plan: impl FnOnce(&RegionLeases) -> Result<Plan, IpamError>,
    ) -> Result<Lease, IpamError> {
        let plan = plan(leases)?;
        if let Plan::Allocate(txn) = &plan {
            leases.apply(txn).unwrap();
        }
        Ok(plan.lease().unwrap().clone())
    }

    /// Applies a planned transaction, as a store would.
    fn apply(leases: &mut RegionLeases, plan: impl FnOnce(&RegionLeases) -> Option<Txn>) -> Txn {
        let txn = plan(leases).expect("a transaction");
        leases.apply(&txn).unwrap();
        txn
    }

    #[test]
    fn an_unused_lan_mapping_is_kept_through_its_grace_period_then_released() {
        let day = 86_400;
        let limits = LanLimits {
            release_after: Duration::from_secs(7 * day),
            ..LanLimits::default()
        };
        let ipam = ipam(&["100.64.0.0/16"]).with_lan_limits(region(), limits);
        let mut leases = RegionLeases::default();
        let a = site("a");
        let mapped = commit(&mut leases, |l| {
            ipam.lan_mapping(l, &a, &region(), net("192.168.1.0/24"))
        })
        .unwrap();
        let t0 = 1_000_000;
        // Routed: nothing to write.
        assert_eq!(
            ipam.mark_lans(&leases, &a, &region(), &[mapped.prefix], t0),
            None
        );
        // No longer routed: the deadline is stored with the lease, and a
        // later advertisement without it keeps the first deadline.
        let txn = apply(&mut leases, |l| ipam.mark_lans(l, &a, &region(), &[], t0));
        assert!(txn.delete.is_empty(), "an update, not a delete: {txn:?}");
        let held = leases.lease_at(mapped.prefix.addr()).unwrap().clone();
        assert_eq!(held.release_at, Some(t0 + 7 * day));
        assert!(!held.in_use());
        assert_eq!(leases.next_release(), Some(t0 + 7 * day));
        assert_eq!(ipam.mark_lans(&leases, &a, &region(), &[], t0 + day), None);
        // Not due before its deadline.
        assert_eq!(ipam.release_due(&leases, &region(), t0 + 7 * day - 1), None);
        // Put back within the grace period: the same mapping, in use again.
        let back = commit(&mut leases, |l| {
            ipam.lan_mapping(l, &a, &region(), net("192.168.1.0/24"))
        })
        .unwrap();
        assert_eq!(back.prefix, mapped.prefix);
        assert!(back.in_use());
        assert_eq!(leases.next_release(), None);
        // Removed again, at a later time: a new deadline.
        let t1 = t0 + 3 * day;
        apply(&mut leases, |l| ipam.mark_lans(l, &a, &region(), &[], t1));
        assert_eq!(ipam.release_due(&leases, &region(), t1 + 7 * day - 1), None);
        let txn = apply(&mut leases, |l| {
            ipam.release_due(l, &region(), t1 + 7 * day)
        });
        assert_eq!(txn.delete, vec![mapped.prefix]);
        assert!(leases.lease_at(mapped.prefix.addr()).is_none());
        // Released: the same LAN behind the same site is a new allocation.
        let again = ipam
            .lan_mapping(&leases, &a, &region(), net("192.168.1.0/24"))
            .unwrap();
        assert!(matches!(again, Plan::Allocate(_)), "{again:?}");
    }

    #[test]
    fn a_mapping_routed_again_in_the_same_session_is_in_use_again() {
        let ipam = ipam(&["100.64.0.0/16"]);
        let mut leases = RegionLeases::default();
        let a = site("a");
        let lan = |l: &mut RegionLeases, s: &str| {
            commit(l, |l| ipam.lan_mapping(l, &a, &region(), net(s))).unwrap()
        };
        let one = lan(&mut leases, "192.168.1.0/24");
        let two = lan(&mut leases, "10.0.0.0/24");
        // A sub-prefix of a mapping counts as routing it.
        let sub = net(&format!("{}/25", one.prefix.addr()));
        apply(&mut leases, |l| ipam.mark_lans(l, &a, &region(), &[sub], 5));
        assert!(leases.lease_at(one.prefix.addr()).unwrap().in_use());
        assert!(!leases.lease_at(two.prefix.addr()).unwrap().in_use());
        let txn = apply(&mut leases, |l| {
            ipam.mark_lans(l, &a, &region(), &[one.prefix, two.prefix], 6)
        });
        assert_eq!(txn.put.len(), 1);
        assert!(leases.leases().all(Lease::in_use));
    }

    #[test]
    fn an_unused_mapping_is_reserved_for_its_site_and_freed_for_others_when_released() {
        // A /22 holds two /24s once its first and last are set aside for
        // the network, router and broadcast addresses.
        let ipam = ipam(&["100.64.0.0/22"]);
        let mut leases = RegionLeases::default();
        let a = commit(&mut leases, |l| {
            ipam.lan_mapping(l, &site("a"), &region(), net("192.168.1.0/24"))
        })
        .unwrap();
        let b = commit(&mut leases, |l| {
            ipam.lan_mapping(l, &site("b"), &region(), net("192.168.1.0/24"))
        })
        .unwrap();
        apply(&mut leases, |l| {
            ipam.mark_lans(l, &site("a"), &region(), &[], 0)
        });
        // Waiting to be released, it is still A's: C finds no room.
        assert!(matches!(
            ipam.lan_mapping(&leases, &site("c"), &region(), net("10.0.0.0/24")),
            Err(IpamError::Exhausted { len: 24, .. })
        ));
        apply(&mut leases, |l| {
            ipam.release_due(l, &region(), LanLimits::DEFAULT_RELEASE_AFTER.as_secs())
        });
        let c = commit(&mut leases, |l| {
            ipam.lan_mapping(l, &site("c"), &region(), net("10.0.0.0/24"))
        })
        .unwrap();
        assert_eq!(c.prefix, a.prefix);
        assert_ne!(c.prefix, b.prefix);
        // A putting its LAN back now gets nothing: the pool is full.
        assert!(
            ipam.lan_mapping(&leases, &site("a"), &region(), net("192.168.1.0/24"))
                .is_err()
        );
    }

    #[test]
    fn a_new_lan_takes_the_place_of_unused_ones_when_the_limits_are_reached() {
        let limits = LanLimits {
            max_mappings: 2,
            ..LanLimits::default()
        };
        let ipam = ipam(&["100.64.0.0/16"]).with_lan_limits(region(), limits);
        let mut leases = RegionLeases::default();
        let a = site("a");
        let map = |l: &mut RegionLeases, lan: &str| {
            commit(l, |l| ipam.lan_mapping(l, &a, &region(), net(lan)))
        };
        let old1 = map(&mut leases, "10.1.0.0/24").unwrap();
        apply(&mut leases, |l| ipam.mark_lans(l, &a, &region(), &[], 10));
        let old2 = map(&mut leases, "10.2.0.0/24").unwrap();
        apply(&mut leases, |l| ipam.mark_lans(l, &a, &region(), &[], 20));
        // Both unused (deadlines 10 + 7d and 20 + 7d) and at the limit of
        // two: a new LAN takes the place of the one due first.
        let plan = ipam
            .lan_mapping(&leases, &a, &region(), net("10.3.0.0/24"))
            .unwrap();
        let Plan::Allocate(txn) = &plan else {
            panic!("{plan:?}")
        };
        let new = &txn.put[0];
        if new.prefix == old1.prefix {
            assert!(txn.delete.is_empty(), "{txn:?}");
        } else {
            assert_eq!(txn.delete, vec![old1.prefix]);
        }
        leases.apply(txn).unwrap();
        assert_eq!(leases.of_site(&a).count(), 2);
        assert!(leases.lease_at(old2.prefix.addr()).is_some());
        // A LAN overlapping an unused one replaces it; one overlapping a LAN
        // in use is refused.
        let plan = ipam
            .lan_mapping(&leases, &a, &region(), net("10.2.0.0/25"))
            .unwrap();
        let Plan::Allocate(txn) = plan else {
            panic!("{plan:?}")
        };
        assert!(
            txn.delete.contains(&old2.prefix) || txn.put[0].prefix == old2.prefix,
            "{txn:?}"
        );
        assert!(matches!(
            ipam.lan_mapping(&leases, &a, &region(), net("10.3.0.0/25")),
            Err(IpamError::OverlappingLan { .. })
        ));
        // With nothing unused left to give way, the limit holds.
        let mut in_use = leases.clone();
        let prefixes: Vec<IpNet> = in_use.of_site(&a).map(|l| l.prefix).collect();
        apply(&mut in_use, |l| {
            ipam.mark_lans(l, &a, &region(), &prefixes, 30)
        });
        assert!(matches!(
            ipam.lan_mapping(&in_use, &a, &region(), net("10.9.0.0/24")),
            Err(IpamError::TooManyLans { held: 2, .. })
        ));
    }

    #[test]
    fn an_update_may_not_take_another_sites_lease() {
        let ipam = ipam(&["100.64.0.0/16"]);
        let mut leases = RegionLeases::default();
        let a = commit(&mut leases, |l| {
            ipam.lan_mapping(l, &site("a"), &region(), net("192.168.1.0/24"))
        })
        .unwrap();
        let stolen = Txn {
            region: region(),
            expected_version: leases.version(),
            put: vec![Lease {
                site: site("b"),
                ..a.clone()
            }],
            delete: Vec::new(),
        };
        assert!(leases.apply(&stolen).is_err());
    }

    #[test]
    fn site_address_is_stable_and_skips_reserved() {
        let ipam = ipam(&["100.64.0.0/29", "fd7a::/126"]);
        let mut leases = RegionLeases::default();
        let a = commit(&mut leases, |l| {
            ipam.site_address(l, &site("a"), &region(), Family::V4)
        })
        .unwrap();
        // /29: .0 network, .1 router, .7 broadcast: .2 to .6 are leasable.
        assert!(
            (2..=6).any(|i| a.prefix == net(&format!("100.64.0.{i}/32"))),
            "{}",
            a.prefix
        );
        let again = ipam
            .site_address(&leases, &site("a"), &region(), Family::V4)
            .unwrap();
        assert_eq!(again, Plan::Existing(a.clone()));
        let mut seen = std::collections::BTreeSet::from([a.prefix]);
        for s in ["b", "c", "d", "e"] {
            let lease = commit(&mut leases, |l| {
                ipam.site_address(l, &site(s), &region(), Family::V4)
            })
            .unwrap();
            assert!(seen.insert(lease.prefix), "{} given twice", lease.prefix);
        }
        assert!(matches!(
            ipam.site_address(&leases, &site("f"), &region(), Family::V4),
            Err(IpamError::Exhausted { len: 32, .. })
        ));
        let v6 = commit(&mut leases, |l| {
            ipam.site_address(l, &site("a"), &region(), Family::V6)
        })
        .unwrap();
        assert!(
            v6.prefix != net("fd7a::/128") && v6.prefix != net("fd7a::1/128"),
            "reserved addresses"
        );
        assert_eq!(
            ipam.router_address(&region(), Family::V6),
            Some("fd7a::1".parse().unwrap())
        );
        assert_eq!(
            ipam.router_address(&region(), Family::V4),
            Some("100.64.0.1".parse().unwrap())
        );
    }

    #[test]
    fn same_site_lands_on_the_same_address_after_release() {
        let ipam = ipam(&["100.64.0.0/16"]);
        let mut leases = RegionLeases::default();
        let first = commit(&mut leases, |l| {
            ipam.site_address(l, &site("lab-7"), &region(), Family::V4)
        })
        .unwrap();
        let txn = ipam.release_site(&leases, &site("lab-7"), &region());
        leases.apply(&txn).unwrap();
        assert!(leases.is_empty());
        let second = commit(&mut leases, |l| {
            ipam.site_address(l, &site("lab-7"), &region(), Family::V4)
        })
        .unwrap();
        assert_eq!(first.prefix, second.prefix);
    }

    #[test]
    fn overlapping_hospital_lans_map_apart() {
        let ipam = ipam(&["100.64.0.0/16"]);
        let mut leases = RegionLeases::default();
        let lan = net("192.168.1.0/24");
        let a = commit(&mut leases, |l| {
            ipam.lan_mapping(l, &site("a"), &region(), lan)
        })
        .unwrap();
        let b = commit(&mut leases, |l| {
            ipam.lan_mapping(l, &site("b"), &region(), lan)
        })
        .unwrap();
        assert_eq!(a.prefix.prefix_len(), 24);
        assert_eq!(b.prefix.prefix_len(), 24);
        assert!(!net::overlaps(a.prefix, b.prefix));
        assert!(
            !a.prefix.contains(&"100.64.0.1".parse::<IpAddr>().unwrap()),
            "router address reserved"
        );
        assert!(matches!(
            ipam.lan_mapping(&leases, &site("a"), &region(), net("192.168.0.0/16")),
            Err(IpamError::OverlappingLan { .. })
        ));
        assert!(matches!(
            ipam.lan_mapping(&leases, &site("c"), &region(), net("10.0.0.0/8")),
            Err(IpamError::LanTooLarge { .. })
        ));
        // A LAN in the overlay's own addresses, or holding them.
        for lan in ["100.64.7.0/24", "100.0.0.0/8"] {
            let refused = ipam.lan_mapping(&leases, &site("c"), &region(), net(lan));
            assert!(
                matches!(&refused, Err(e @ IpamError::LanOverlapsPool { pool, .. })
                    if *pool == net("100.64.0.0/16") && e.lan_refusal_reason() == "overlay"),
                "{lan}: {refused:?}"
            );
        }
        assert_eq!(
            leases.lease_at("100.64.0.9".parse().unwrap()).is_some(),
            a.prefix.contains(&"100.64.0.9".parse::<IpAddr>().unwrap())
                || b.prefix.contains(&"100.64.0.9".parse::<IpAddr>().unwrap())
        );
    }

    #[test]
    fn one_site_cannot_take_the_pool() {
        let limits = LanLimits {
            max_mappings: 3,
            max_ipv4_addresses: 1024,
            max_ipv6_subnets: 4,
            ..LanLimits::default()
        };
        let ipam = ipam(&["100.64.0.0/16", "fd7a::/48"]).with_lan_limits(region(), limits);
        let mut leases = RegionLeases::default();
        let map = |leases: &mut RegionLeases, s: &str, lan: &str| {
            commit(leases, |l| {
                ipam.lan_mapping(l, &site(s), &region(), net(lan))
            })
        };
        // Space: 512 + 256 fit, another 512 would make 1280 > 1024.
        map(&mut leases, "a", "10.1.0.0/23").unwrap();
        map(&mut leases, "a", "10.2.0.0/24").unwrap();
        let err = map(&mut leases, "a", "10.3.0.0/23").unwrap_err();
        assert!(
            matches!(
                err,
                IpamError::LanSpaceExceeded {
                    total: 1280,
                    limit: 1024,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.lan_refusal_reason(), "site_lan_space");
        assert!(
            err.to_string().contains("max_lan_ipv4_addresses_per_site"),
            "{err}"
        );
        // IPv6 counts /64s; a /120 counts as one.
        let err = map(&mut leases, "a", "fd00:1::/61").unwrap_err();
        assert!(
            matches!(err, IpamError::LanSpaceExceeded { total: 8, .. }),
            "{err:?}"
        );
        // Count: the third mapping fits, the fourth does not.
        map(&mut leases, "a", "fd00:2::/120").unwrap();
        let err = map(&mut leases, "a", "10.4.0.0/30").unwrap_err();
        assert!(
            matches!(err, IpamError::TooManyLans { held: 3, .. }),
            "{err:?}"
        );
        assert_eq!(err.lan_refusal_reason(), "site_lan_count");
        assert!(
            err.to_string().contains("max_lan_mappings_per_site"),
            "{err}"
        );
        // Asking again for a LAN it holds is not a new mapping.
        assert!(matches!(
            ipam.lan_mapping(&leases, &site("a"), &region(), net("10.1.0.0/23")),
            Ok(Plan::Existing(_))
        ));
        // Another site has its own allowance.
        map(&mut leases, "b", "10.1.0.0/22").unwrap();
        // Defaults apply to regions without limits of their own.
        assert_eq!(
            ipam.lan_limits(&RegionId::new("us").unwrap()),
            LanLimits::default()
        );
    }

    #[test]
    fn concurrent_plans_cannot_both_commit() {
        let ipam = ipam(&["100.64.0.0/29"]);
        let mut store = RegionLeases::default();
        // Two brokers read the same snapshot and plan for different sites.
        let snapshot = store.clone();
        let p1 = ipam
            .site_address(&snapshot, &site("a"), &region(), Family::V4)
            .unwrap();
        let p2 = ipam
            .site_address(&snapshot, &site("b"), &region(), Family::V4)
            .unwrap();
        let (Plan::Allocate(t1), Plan::Allocate(t2)) = (p1, p2) else {
            panic!("expected allocations")
        };
        store.apply(&t1).unwrap();
        assert_eq!(
            store.apply(&t2),
            Err(Conflict {
                expected: 0,
                found: 1
            })
        );
        // The loser re-plans against the new version and gets a different address.
        let Plan::Allocate(t2) = ipam
            .site_address(&store, &site("b"), &region(), Family::V4)
            .unwrap()
        else {
            panic!("expected allocation")
        };
        store.apply(&t2).unwrap();
        let prefixes: Vec<_> = store.leases().map(|l| l.prefix).collect();
        assert_eq!(prefixes.len(), 2);
        assert_ne!(prefixes[0], prefixes[1]);
    }

    #[test]
    fn pool_validation() {
        let eu = region();
        let mut pools = BTreeMap::new();
        pools.insert(eu.clone(), vec![net("10.0.0.0/16"), net("10.0.1.0/24")]);
        assert!(matches!(
            Ipam::new(pools),
            Err(IpamError::OverlappingPools { .. })
        ));
        let mut pools = BTreeMap::new();
        pools.insert(eu.clone(), vec![net("10.0.0.1/16")]);
        assert!(matches!(Ipam::new(pools), Err(IpamError::HostBits(..))));
        let mut pools = BTreeMap::new();
        pools.insert(eu.clone(), vec![net("10.0.0.0/31")]);
        assert!(matches!(Ipam::new(pools), Err(IpamError::PoolTooSmall(_))));
        let mut pools = BTreeMap::new();
        pools.insert(eu, vec![net("fc00::/7")]);
        assert!(matches!(Ipam::new(pools), Err(IpamError::PoolTooLarge(_))));
        let ipam = ipam(&["10.0.0.0/24"]);
        assert!(matches!(
            ipam.site_address(&RegionLeases::default(), &site("a"), &region(), Family::V6),
            Err(IpamError::NoPool { .. })
        ));
        assert!(matches!(
            ipam.site_address(
                &RegionLeases::default(),
                &site("a"),
                &RegionId::new("us").unwrap(),
                Family::V4
            ),
            Err(IpamError::UnknownRegion(_))
        ));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Address(u8, bool),
        Lan(u8, u8, u8),
        Release(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..12, any::<bool>()).prop_map(|(s, v6)| Op::Address(s, v6)),
            (0u8..12, 0u8..4, 26u8..=30).prop_map(|(s, l, len)| Op::Lan(s, l, len)),
            (0u8..12).prop_map(Op::Release),
        ]
    }

    fn check_invariants(ipam: &Ipam, leases: &RegionLeases) -> Result<(), TestCaseError> {
        let all: Vec<&Lease> = leases.leases().collect();
        // The per-site index agrees with a scan of the region.
        let none = site("none");
        let sites: BTreeSet<&SiteId> = all
            .iter()
            .map(|l| &l.site)
            .chain(leases.by_site.keys())
            .chain([&none])
            .collect();
        for s in sites {
            let indexed: Vec<&Lease> = leases.of_site(s).collect();
            let scanned: Vec<&Lease> = all.iter().copied().filter(|l| &l.site == s).collect();
            prop_assert_eq!(indexed, scanned, "leases of {}", s);
        }
        prop_assert!(leases.by_site.values().all(|k| !k.is_empty()));
        for (i, a) in all.iter().enumerate() {
            prop_assert!(
                ipam.pools(&region()).iter().any(|p| p.contains(&a.prefix)),
                "{} outside pools",
                a.prefix
            );
            for pool in ipam.pools(&region()) {
                prop_assert!(
                    !a.prefix.contains(&pool.network()),
                    "{} covers a network address",
                    a.prefix
                );
                let (family, start, _) = net::span(*pool);
                prop_assert!(
                    !a.prefix.contains(&net::from_bits(family, start + 1)),
                    "{} covers a router address",
                    a.prefix
                );
                if matches!(pool, IpNet::V4(_)) {
                    prop_assert!(
                        !a.prefix.contains(&pool.broadcast()),
                        "{} covers broadcast",
                        a.prefix
                    );
                }
            }
            for b in &all[i + 1..] {
                prop_assert!(
                    !net::overlaps(a.prefix, b.prefix),
                    "{} and {} overlap",
                    a.prefix,
                    b.prefix
                );
            }
        }
        Ok(())
    }

    #[test]
    fn a_refused_transaction_changes_nothing() {
        let lease = |p: &str, s: &str| Lease {
            prefix: net(p),
            site: site(s),
            region: region(),
            kind: LeaseKind::SiteAddress,
            release_at: None,
        };
        let mut leases = RegionLeases::default();
        leases
            .apply(&Txn {
                region: region(),
                expected_version: 0,
                put: vec![lease("10.0.0.2/32", "a"), lease("10.0.0.3/32", "b")],
                delete: vec![],
            })
            .unwrap();
        let before = leases.clone();
        // Deletes a's lease, puts one for c, then one overlapping b's.
        let refused = leases.apply(&Txn {
            region: region(),
            expected_version: 1,
            put: vec![lease("10.0.0.4/32", "c"), lease("10.0.0.2/31", "c")],
            delete: vec![net("10.0.0.2/32")],
        });
        assert!(refused.is_err());
        assert_eq!(leases, before);
        assert_eq!(leases.of_site(&site("a")).count(), 1);
        assert_eq!(leases.of_site(&site("c")).count(), 0);
    }

    proptest! {
        #[test]
        fn never_two_owners(ops in proptest::collection::vec(op(), 1..60)) {
            let ipam = ipam(&["10.0.0.0/26", "10.9.0.0/27", "fd00::/120"]);
            let mut leases = RegionLeases::default();
            for op in ops {
                let result = match op {
                    Op::Address(s, v6) => ipam.site_address(&leases, &site(&format!("s{s}")), &region(),
                        if v6 { Family::V6 } else { Family::V4 }),
                    Op::Lan(s, l, len) => ipam.lan_mapping(&leases, &site(&format!("s{s}")), &region(),
                        net::prefix(Family::V4, u128::from(0xc0a8_0000u32 + u32::from(l) * 256), len)),
                    Op::Release(s) => Ok(Plan::Allocate(ipam.release_site(&leases, &site(&format!("s{s}")), &region()))),
                };
                if let Ok(Plan::Allocate(txn)) = result {
                    leases.apply(&txn).unwrap();
                }
                check_invariants(&ipam, &leases)?;
                // At most one address per family per site.
                let mut seen = std::collections::BTreeSet::new();
                for l in leases.leases().filter(|l| l.kind == LeaseKind::SiteAddress) {
                    prop_assert!(seen.insert((l.site.clone(), Family::of(l.prefix.addr()))));
                }
            }
        }

        #[test]
        fn release_restores_capacity(pool_len in 24u8..=29, rounds in 1usize..3) {
            let pool = net::prefix(Family::V4, 0x0a00_0000, pool_len);
            let ipam = Ipam::new([(region(), vec![pool])].into_iter().collect()).unwrap();
            let mut leases = RegionLeases::default();
            let capacity = (net::block_size(Family::V4, pool_len) - 3) as usize;
            for round in 0..rounds {
                for i in 0..capacity {
                    let s = site(&format!("r{round}-s{i}"));
                    commit(&mut leases, |l| ipam.site_address(l, &s, &region(), Family::V4)).unwrap();
                }
                let overflow = site(&format!("r{round}-overflow"));
                prop_assert!(
                    matches!(ipam.site_address(&leases, &overflow, &region(), Family::V4), Err(IpamError::Exhausted { .. })),
                    "pool should be full",
                );
                for i in 0..capacity {
                    let s = site(&format!("r{round}-s{i}"));
                    let txn = ipam.release_site(&leases, &s, &region());
                    leases.apply(&txn).unwrap();
                }
                prop_assert!(leases.is_empty());
            }
        }
    }
}
