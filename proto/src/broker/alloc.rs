//! Address allocation against a store reached only through commands.
//!
//! An allocation plans with [`Ipam`](crate::ipam::Ipam) against the cached
//! leases of its region and asks the shell to commit the plan as a
//! compare-and-set ([`StoreCommand::CompareAndSet`]). On
//! [`StoreResult::Conflict`] another writer (usually another broker) changed
//! the region first: the core reloads the region ([`StoreCommand::LoadLeases`])
//! and plans again from what it read, never by re-sending the old plan under
//! a new version. After [`CoreConfig::max_allocation_attempts`](super::CoreConfig)
//! planned commits it gives up with [`AllocationError::Contention`]. A
//! committed transaction is applied to the cache only when the cache is at
//! the version it was planned against; otherwise the region is reloaded
//! before the next plan. A notice of a change in the store reloads the
//! region only when the cache is not at the store's version
//! ([`BrokerCore::needs_leases`]): the notice of the broker's own commit
//! reads one key, not the region.

use ipnet::IpNet;

use super::{BrokerCore, Event, StoreCommand};
use crate::ids::{RegionId, SiteId};
use crate::ipam::{IpamError, Lease, LeaseKind, Plan, RegionLeases, Txn};
use crate::net::Family;

/// Identifies an allocation in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AllocationId(pub u64);

/// What to allocate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllocationRequest {
    /// The site's stable host addresses, one per family its region has pools
    /// of (found again if it holds them).
    SiteAddresses {
        /// The site.
        site: SiteId,
        /// Its region.
        region: RegionId,
    },
    /// The 1:1 mapping of a LAN behind the site.
    LanMapping {
        /// The site.
        site: SiteId,
        /// Its region.
        region: RegionId,
        /// The LAN as the site numbers it.
        lan: IpNet,
    },
    /// Records which of the site's LAN mappings it uses (the mapped
    /// prefixes of its route advertisement): the others are released after
    /// the region's grace period ([`crate::ipam::LanLimits::release_after`]),
    /// those back in use keep their mapping.
    MarkLans {
        /// The site.
        site: SiteId,
        /// Its region.
        region: RegionId,
        /// The mapped prefixes the site routes.
        in_use: Vec<IpNet>,
        /// Wall clock, seconds since the Unix epoch.
        now: u64,
    },
    /// Releases the region's LAN mappings whose grace period ended.
    ReleaseDue {
        /// The region.
        region: RegionId,
        /// Wall clock, seconds since the Unix epoch.
        now: u64,
    },
    /// Frees every lease of a revoked site (an operator's decision: the
    /// leases of a revoked site are kept until then, so that re-admitting it
    /// gives it its addresses back).
    ReleaseRevoked {
        /// The site.
        site: SiteId,
        /// Its region.
        region: RegionId,
    },
}

/// A finished allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allocated {
    /// For [`AllocationRequest::SiteAddresses`].
    SiteAddresses {
        /// One host prefix per family.
        addresses: Vec<IpNet>,
        /// The site's existing LAN mappings.
        lans: Vec<IpNet>,
    },
    /// For [`AllocationRequest::LanMapping`]: the mapped prefix.
    LanMapping(IpNet),
    /// For [`AllocationRequest::ReleaseRevoked`] and
    /// [`AllocationRequest::ReleaseDue`]: the prefixes freed.
    Released(Vec<IpNet>),
    /// For [`AllocationRequest::MarkLans`]: the site's LAN mappings whose
    /// state changed, as written (`release_at` set: now unused).
    Marked(Vec<Lease>),
}

/// Why an allocation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocationError {
    /// The region is not served.
    #[error("region {0} is not configured on this broker")]
    UnknownRegion(RegionId),
    /// The site is revoked.
    #[error("site {0} is revoked")]
    Revoked(SiteId),
    /// Only a revoked site's leases may be released.
    #[error("site {0} is not revoked; revoke it before releasing its addresses")]
    NotRevoked(SiteId),
    /// IPAM could not plan it (exhausted pool, overlapping LAN, …).
    #[error(transparent)]
    Ipam(#[from] IpamError),
    /// Every attempt conflicted with a concurrent change.
    #[error("address allocation kept conflicting with concurrent changes; try again")]
    Contention,
    /// The store failed.
    #[error("store: {0}")]
    Store(String),
}

/// The answer to a [`StoreCommand`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreResult {
    /// The leases read for [`StoreCommand::LoadLeases`].
    Leases(RegionLeases),
    /// The compare-and-set was applied.
    Committed,
    /// The region was not at the expected version; nothing was written.
    Conflict,
    /// The store failed (the transaction may or may not have been applied).
    Failed(String),
}

#[derive(Debug, Clone)]
enum Step {
    Address(Family),
    Lan(IpNet),
    Release,
    Mark(Vec<IpNet>, u64),
    ReleaseDue(u64),
}

/// An allocation in flight.
#[derive(Debug, Clone)]
pub(crate) struct Allocation {
    request: AllocationRequest,
    steps: Vec<Step>,
    done: Vec<IpNet>,
    marked: Vec<Lease>,
    attempts: u32,
    waiting: Option<Waiting>,
}

#[derive(Debug, Clone)]
enum Waiting {
    Load,
    Commit(Txn),
}

impl AllocationRequest {
    fn site(&self) -> Option<&SiteId> {
        match self {
            AllocationRequest::SiteAddresses { site, .. }
            | AllocationRequest::LanMapping { site, .. }
            | AllocationRequest::MarkLans { site, .. }
            | AllocationRequest::ReleaseRevoked { site, .. } => Some(site),
            AllocationRequest::ReleaseDue { .. } => None,
        }
    }

    fn region(&self) -> &RegionId {
        match self {
            AllocationRequest::SiteAddresses { region, .. }
            | AllocationRequest::LanMapping { region, .. }
            | AllocationRequest::MarkLans { region, .. }
            | AllocationRequest::ReleaseDue { region, .. }
            | AllocationRequest::ReleaseRevoked { region, .. } => region,
        }
    }
}

impl BrokerCore {
    /// Starts an allocation; its commands follow from
    /// [`poll_command`](Self::poll_command) and its outcome arrives as
    /// [`Event::Allocated`] (at once when nothing needs to be written).
    pub fn handle_allocate(&mut self, request: AllocationRequest) -> AllocationId {
        let allocation = AllocationId(self.next_allocation);
        self.next_allocation += 1;
        let region = request.region().clone();
        if !self.regions.contains_key(&region) {
            self.finish(allocation, Err(AllocationError::UnknownRegion(region)));
            return allocation;
        }
        let revoked = request.site().is_some_and(|site| {
            self.revoked.contains(&super::Revocation::Site {
                site: site.clone(),
                region: region.clone(),
            })
        });
        let release = matches!(request, AllocationRequest::ReleaseRevoked { .. });
        if let Some(site) = request.site().filter(|_| revoked != release) {
            let site = site.clone();
            let error = if release {
                AllocationError::NotRevoked(site)
            } else {
                AllocationError::Revoked(site)
            };
            self.finish(allocation, Err(error));
            return allocation;
        }
        let steps = match &request {
            AllocationRequest::SiteAddresses { region, .. } => [Family::V4, Family::V6]
                .into_iter()
                .filter(|f| {
                    self.ipam
                        .pools(region)
                        .iter()
                        .any(|p| Family::of(p.addr()) == *f)
                })
                .map(Step::Address)
                .collect(),
            AllocationRequest::LanMapping { lan, .. } => vec![Step::Lan(*lan)],
            AllocationRequest::ReleaseRevoked { .. } => vec![Step::Release],
            AllocationRequest::MarkLans { in_use, now, .. } => {
                vec![Step::Mark(in_use.clone(), *now)]
            }
            AllocationRequest::ReleaseDue { now, .. } => vec![Step::ReleaseDue(*now)],
        };
        self.allocations.insert(
            allocation,
            Allocation {
                request,
                steps,
                done: Vec::new(),
                marked: Vec::new(),
                attempts: 0,
                waiting: None,
            },
        );
        self.advance(allocation);
        allocation
    }

    /// Leases read outside an allocation: at start, or after another
    /// broker's change. Older than the cache, they are ignored.
    pub fn handle_leases(&mut self, region: RegionId, leases: RegionLeases) {
        if self
            .leases
            .get(&region)
            .is_none_or(|c| c.version() <= leases.version())
        {
            self.leases.insert(region, leases);
            self.rebuild_remote();
        }
    }

    /// The answer to a [`StoreCommand`] of `allocation`.
    pub fn handle_store_result(&mut self, allocation: AllocationId, result: StoreResult) {
        let Some(waiting) = self
            .allocations
            .get_mut(&allocation)
            .and_then(|a| a.waiting.take())
        else {
            return;
        };
        match (waiting, result) {
            (_, StoreResult::Failed(e)) => {
                self.finish(allocation, Err(AllocationError::Store(e)));
                return;
            }
            (Waiting::Load, StoreResult::Leases(leases)) => {
                let region = leases_region(self, allocation);
                if let Some(region) = region {
                    // A load answers a conflict: what it read is newer than
                    // the cache, even at an equal version number after a
                    // store restore.
                    self.leases.insert(region, leases);
                    self.rebuild_remote();
                }
            }
            (Waiting::Commit(txn), StoreResult::Committed) => {
                let cached = self.leases.get_mut(&txn.region);
                match cached {
                    Some(c) if c.version() == txn.expected_version => {
                        if c.apply(&txn).is_err() {
                            self.leases.remove(&txn.region);
                        } else if !self.peers.holders.is_empty() || !self.peers.gateways.is_empty()
                        {
                            // The routes through other brokers follow the
                            // leases (a site held elsewhere may be touched):
                            // the notice of this commit reads nothing.
                            self.rebuild_remote();
                        }
                    }
                    // The store was read after this commit (a notice of it
                    // arrived first): the cache already holds it.
                    Some(c) if c.version() > txn.expected_version => {}
                    // Moved on without this commit: read again.
                    _ => {
                        self.leases.remove(&txn.region);
                    }
                }
                if let Some(a) = self.allocations.get_mut(&allocation) {
                    if let Some(lease) = txn.put.first() {
                        a.done.push(lease.prefix);
                    }
                    match a.request {
                        AllocationRequest::ReleaseRevoked { .. }
                        | AllocationRequest::ReleaseDue { .. } => {
                            a.done.extend(txn.delete.iter().copied());
                        }
                        AllocationRequest::MarkLans { .. } => a.marked = txn.put.clone(),
                        _ => {}
                    }
                    if !a.steps.is_empty() {
                        a.steps.remove(0);
                    }
                }
            }
            (Waiting::Commit(txn), StoreResult::Conflict) => {
                // Plan again from a fresh read, never from the stale plan.
                if let Some(a) = self.allocations.get_mut(&allocation) {
                    a.waiting = Some(Waiting::Load);
                }
                self.commands.push_back(StoreCommand::LoadLeases {
                    allocation,
                    region: txn.region,
                });
                return;
            }
            // An answer that does not fit the command: the shell is broken;
            // fail the allocation rather than guess.
            _ => {
                self.finish(
                    allocation,
                    Err(AllocationError::Store("unexpected store answer".into())),
                );
                return;
            }
        }
        self.advance(allocation);
    }

    /// Plans the next step of an allocation, or finishes it.
    fn advance(&mut self, allocation: AllocationId) {
        loop {
            let Some(a) = self.allocations.get(&allocation) else {
                return;
            };
            let site = a.request.site().cloned();
            let region = a.request.region().clone();
            let Some(step) = a.steps.first().cloned() else {
                let result = match &a.request {
                    AllocationRequest::SiteAddresses { .. } => {
                        let addresses = a.done.clone();
                        let lans = self
                            .leases
                            .get(&region)
                            .map(|l| {
                                l.leases()
                                    .filter(|l| Some(&l.site) == site.as_ref())
                                    .filter(|l| matches!(l.kind, LeaseKind::LanMapping { .. }))
                                    .filter(|l| l.in_use())
                                    .map(|l| l.prefix)
                                    .collect()
                            })
                            .unwrap_or_default();
                        Ok(Allocated::SiteAddresses { addresses, lans })
                    }
                    AllocationRequest::LanMapping { .. } => a
                        .done
                        .first()
                        .map(|p| Allocated::LanMapping(*p))
                        .ok_or(AllocationError::Contention),
                    AllocationRequest::ReleaseRevoked { .. }
                    | AllocationRequest::ReleaseDue { .. } => {
                        Ok(Allocated::Released(a.done.clone()))
                    }
                    AllocationRequest::MarkLans { .. } => Ok(Allocated::Marked(a.marked.clone())),
                };
                self.finish(allocation, result);
                return;
            };
            let Some(leases) = self.leases.get(&region) else {
                if let Some(a) = self.allocations.get_mut(&allocation) {
                    a.waiting = Some(Waiting::Load);
                }
                self.commands
                    .push_back(StoreCommand::LoadLeases { allocation, region });
                return;
            };
            let plan = match (step, &site) {
                (Step::Address(family), Some(site)) => self
                    .ipam
                    .site_address(leases, site, &region, family)
                    .map(Some),
                (Step::Lan(lan), Some(site)) => {
                    self.ipam.lan_mapping(leases, site, &region, lan).map(Some)
                }
                (Step::Release, Some(site)) => {
                    let txn = self.ipam.release_site(leases, site, &region);
                    Ok((!txn.delete.is_empty()).then_some(Plan::Allocate(txn)))
                }
                (Step::Mark(in_use, now), Some(site)) => Ok(self
                    .ipam
                    .mark_lans(leases, site, &region, &in_use, now)
                    .map(Plan::Allocate)),
                (Step::ReleaseDue(now), _) => Ok(self
                    .ipam
                    .release_due(leases, &region, now)
                    .map(Plan::Allocate)),
                (_, None) => Ok(None),
            };
            match plan {
                // Nothing to write: the step is done.
                Ok(None) => {
                    if let Some(a) = self.allocations.get_mut(&allocation) {
                        a.steps.remove(0);
                    }
                }
                Err(e) => {
                    self.finish(allocation, Err(e.into()));
                    return;
                }
                Ok(Some(Plan::Existing(lease))) => {
                    if let Some(a) = self.allocations.get_mut(&allocation) {
                        a.done.push(lease.prefix);
                        a.steps.remove(0);
                    }
                }
                Ok(Some(Plan::Allocate(txn))) => {
                    let max = self.max_attempts;
                    let Some(a) = self.allocations.get_mut(&allocation) else {
                        return;
                    };
                    if a.attempts >= max {
                        self.finish(allocation, Err(AllocationError::Contention));
                        return;
                    }
                    a.attempts += 1;
                    a.waiting = Some(Waiting::Commit(txn.clone()));
                    self.commands
                        .push_back(StoreCommand::CompareAndSet { allocation, txn });
                    return;
                }
            }
        }
    }

    fn finish(&mut self, allocation: AllocationId, result: Result<Allocated, AllocationError>) {
        self.allocations.remove(&allocation);
        self.push_event(Event::Allocated { allocation, result });
    }
}

fn leases_region(core: &BrokerCore, allocation: AllocationId) -> Option<RegionId> {
    core.allocations
        .get(&allocation)
        .map(|a| a.request.region().clone())
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{BrokerCore, Revocation};
    use super::*;
    use crate::ipam::Lease;

    /// A store with compare-and-set, as the shell would drive it.
    #[derive(Default)]
    struct Store(RegionLeases);

    impl Store {
        fn answer(&mut self, command: &StoreCommand) -> (AllocationId, StoreResult) {
            match command {
                StoreCommand::LoadLeases { allocation, .. } => {
                    (*allocation, StoreResult::Leases(self.0.clone()))
                }
                StoreCommand::CompareAndSet { allocation, txn } => (
                    *allocation,
                    match self.0.apply(txn) {
                        Ok(()) => StoreResult::Committed,
                        Err(_) => StoreResult::Conflict,
                    },
                ),
            }
        }
    }

    fn drive(core: &mut BrokerCore, store: &mut Store) -> Vec<Event> {
        while let Some(c) = core.poll_command() {
            let (a, r) = store.answer(&c);
            core.handle_store_result(a, r);
        }
        events(core)
    }

    fn outcome(events: &[Event]) -> Option<Result<Allocated, AllocationError>> {
        events.iter().find_map(|e| match e {
            Event::Allocated { result, .. } => Some(result.clone()),
            _ => None,
        })
    }

    fn addresses(site: &str) -> AllocationRequest {
        AllocationRequest::SiteAddresses {
            site: id(site),
            region: eu(),
        }
    }

    #[test]
    fn allocates_once_and_finds_the_addresses_again() {
        let mut core = BrokerCore::new(config());
        let mut store = Store::default();
        core.handle_allocate(addresses("a"));
        // No cache yet: the first command reads the region.
        assert!(matches!(
            core.poll_command(),
            Some(StoreCommand::LoadLeases { .. })
        ));
        let mut core = BrokerCore::new(config());
        core.handle_allocate(addresses("a"));
        let first = outcome(&drive(&mut core, &mut store)).unwrap().unwrap();
        let Allocated::SiteAddresses { addresses: a, lans } = &first else {
            panic!("{first:?}")
        };
        assert_eq!(a.len(), 2);
        assert!(a[0].addr().is_ipv4() && a[1].addr().is_ipv6());
        assert!(lans.is_empty());
        assert_eq!(store.0.len(), 2);
        // Again: found in the cache, nothing written.
        core.handle_allocate(addresses("a"));
        assert_eq!(core.poll_command(), None);
        assert_eq!(outcome(&events(&mut core)), Some(Ok(first.clone())));
        // A new core (a restarted broker) finds them in the store.
        let mut restarted = BrokerCore::new(config());
        restarted.handle_allocate(addresses("a"));
        assert_eq!(outcome(&drive(&mut restarted, &mut store)), Some(Ok(first)));
        assert_eq!(store.0.len(), 2);
    }

    #[test]
    fn the_notice_of_an_own_commit_needs_no_reload_but_another_writers_does() {
        let mut a = BrokerCore::new(config());
        let mut b = BrokerCore::new(config());
        let mut store = Store::default();
        a.handle_allocate(addresses("a"));
        assert!(outcome(&drive(&mut a, &mut store)).unwrap().is_ok());
        let version = store.0.version();
        assert!(version > 0);
        // The cache applied the commit: its notice reads nothing.
        assert!(!a.needs_leases(&eu(), version));
        // Another writer (a second broker) commits: the region is read again.
        b.handle_allocate(addresses("b"));
        assert!(outcome(&drive(&mut b, &mut store)).unwrap().is_ok());
        assert!(a.needs_leases(&eu(), store.0.version()));
        a.handle_leases(eu(), store.0.clone());
        assert!(!a.needs_leases(&eu(), store.0.version()));
        // A region never read is read.
        assert!(BrokerCore::new(config()).needs_leases(&eu(), 0));
    }

    /// Regression: after a conflict the core re-reads and plans again; it
    /// never re-sends its plan under the new version (which would give an
    /// address another broker just took).
    #[test]
    fn a_conflict_is_answered_by_reading_and_planning_again() {
        let mut a = BrokerCore::new(config());
        let mut b = BrokerCore::new(config());
        let mut store = Store::default();
        // Both brokers read the empty region.
        a.handle_allocate(addresses("a"));
        b.handle_allocate(addresses("b"));
        let (ca, cb) = (a.poll_command().unwrap(), b.poll_command().unwrap());
        let (id_a, r) = store.answer(&ca);
        a.handle_store_result(id_a, r);
        let (id_b, r) = store.answer(&cb);
        b.handle_store_result(id_b, r);
        // A commits first; B's plan conflicts.
        let ca = a.poll_command().unwrap();
        let cb = b.poll_command().unwrap();
        let (_, r) = store.answer(&ca);
        assert_eq!(r, StoreResult::Committed);
        a.handle_store_result(id_a, r);
        let (_, r) = store.answer(&cb);
        assert_eq!(r, StoreResult::Conflict);
        b.handle_store_result(id_b, r);
        let reload = b.poll_command().unwrap();
        assert!(matches!(reload, StoreCommand::LoadLeases { .. }));
        let (_, r) = store.answer(&reload);
        b.handle_store_result(id_b, r);
        // Re-read, re-planned: both hold distinct addresses in the store.
        assert!(outcome(&drive(&mut a, &mut store)).unwrap().is_ok());
        assert!(outcome(&drive(&mut b, &mut store)).unwrap().is_ok());
        let owners: std::collections::BTreeSet<IpNet> =
            store.0.leases().map(|l| l.prefix).collect();
        assert_eq!(owners.len(), store.0.len());
        assert_eq!(store.0.len(), 4);
    }

    /// Regression: the store's notice of a commit (read and handed to
    /// `handle_leases`) may arrive before the commit's own answer; the
    /// cache then already holds the commit and must not be dropped (a
    /// dropped cache left enrolled sites without addresses in the zone).
    #[test]
    fn a_notice_of_the_commit_before_its_answer_keeps_the_cache() {
        let mut core = BrokerCore::new(config());
        let mut store = Store::default();
        core.handle_allocate(addresses("a"));
        let load = core.poll_command().unwrap();
        let (allocation, r) = store.answer(&load);
        core.handle_store_result(allocation, r);
        let commit = core.poll_command().unwrap();
        let (_, r) = store.answer(&commit);
        assert_eq!(r, StoreResult::Committed);
        // The notice first: the region as the store holds it now.
        core.handle_leases(eu(), store.0.clone());
        core.handle_store_result(allocation, r);
        let cached = core.leases(&eu()).expect("the cache stays");
        assert_eq!(cached.of_site(&id("a")).count(), 1);
        assert_eq!(cached.version(), store.0.version());
    }

    #[test]
    fn contention_gives_up_after_the_attempt_limit() {
        let mut config = config();
        config.max_allocation_attempts = 3;
        let mut core = BrokerCore::new(config);
        let id = core.handle_allocate(addresses("a"));
        let mut commits = 0;
        let mut version = 0;
        while let Some(c) = core.poll_command() {
            match c {
                StoreCommand::LoadLeases { .. } => {
                    // Someone else always writes in between.
                    version += 1;
                    core.handle_store_result(
                        id,
                        StoreResult::Leases(RegionLeases::from_parts(version, [])),
                    );
                }
                StoreCommand::CompareAndSet { .. } => {
                    commits += 1;
                    core.handle_store_result(id, StoreResult::Conflict);
                }
            }
        }
        assert_eq!(commits, 3);
        assert_eq!(
            outcome(&events(&mut core)),
            Some(Err(AllocationError::Contention))
        );
    }

    #[test]
    fn store_failures_unknown_regions_and_revoked_sites_fail_the_allocation() {
        let mut core = BrokerCore::new(config());
        let id = core.handle_allocate(addresses("a"));
        assert!(core.poll_command().is_some());
        core.handle_store_result(id, StoreResult::Failed("disk full".into()));
        assert_eq!(
            outcome(&events(&mut core)),
            Some(Err(AllocationError::Store("disk full".into())))
        );
        core.handle_allocate(AllocationRequest::SiteAddresses {
            site: self::id("a"),
            region: self::id("us"),
        });
        assert_eq!(
            outcome(&events(&mut core)),
            Some(Err(AllocationError::UnknownRegion(self::id("us"))))
        );
        core.handle_revocation(
            Revocation::Site {
                site: self::id("a"),
                region: eu(),
            },
            std::time::Instant::now(),
        );
        core.handle_allocate(addresses("a"));
        assert_eq!(core.poll_command(), None);
        assert_eq!(
            outcome(&events(&mut core)),
            Some(Err(AllocationError::Revoked(self::id("a"))))
        );
    }

    #[test]
    fn lan_mappings_are_allocated_and_listed_with_the_addresses() {
        let mut core = BrokerCore::new(config());
        let mut store = Store::default();
        core.handle_allocate(AllocationRequest::LanMapping {
            site: id("a"),
            region: eu(),
            lan: id("192.168.1.0/28"),
        });
        let Some(Ok(Allocated::LanMapping(mapped))) = outcome(&drive(&mut core, &mut store)) else {
            panic!("no mapping")
        };
        assert_eq!(mapped.prefix_len(), 28);
        core.handle_allocate(addresses("a"));
        let Some(Ok(Allocated::SiteAddresses { lans, .. })) =
            outcome(&drive(&mut core, &mut store))
        else {
            panic!("no addresses")
        };
        assert_eq!(lans, vec![mapped]);
        assert_eq!(
            store.0.leases().filter(|l| l.site == id("a")).count(),
            3,
            "{:?}",
            store.0.leases().collect::<Vec<&Lease>>()
        );
    }

    #[test]
    fn a_revoked_sites_leases_are_released_on_request_only() {
        let mut core = BrokerCore::new(config());
        let mut store = Store::default();
        core.handle_allocate(addresses("a"));
        core.handle_allocate(AllocationRequest::LanMapping {
            site: id("a"),
            region: eu(),
            lan: id("192.168.1.0/28"),
        });
        drive(&mut core, &mut store);
        core.handle_allocate(addresses("b"));
        drive(&mut core, &mut store);
        let held = |store: &Store, s: &str| store.0.leases().filter(|l| l.site == id(s)).count();
        assert_eq!(held(&store, "a"), 3);
        let release = AllocationRequest::ReleaseRevoked {
            site: id("a"),
            region: eu(),
        };
        // A site that may still connect keeps its addresses.
        core.handle_allocate(release.clone());
        assert_eq!(
            outcome(&drive(&mut core, &mut store)),
            Some(Err(AllocationError::NotRevoked(id("a"))))
        );
        assert_eq!(held(&store, "a"), 3);
        // Revoked: its leases stay until the operator releases them.
        core.handle_revocation(
            Revocation::Site {
                site: id("a"),
                region: eu(),
            },
            std::time::Instant::now(),
        );
        assert_eq!(held(&store, "a"), 3);
        core.handle_allocate(release.clone());
        let Some(Ok(Allocated::Released(freed))) = outcome(&drive(&mut core, &mut store)) else {
            panic!("nothing released")
        };
        assert_eq!(freed.len(), 3);
        assert_eq!(held(&store, "a"), 0);
        assert_eq!(held(&store, "b"), 2, "other sites keep theirs");
        assert_eq!(
            core.leases(&eu()).map(|l| l.of_site(&id("a")).count()),
            Some(0)
        );
        // Again: nothing left, nothing written.
        core.handle_allocate(release);
        assert_eq!(
            outcome(&drive(&mut core, &mut store)),
            Some(Ok(Allocated::Released(Vec::new())))
        );
    }

    #[test]
    fn stale_leases_from_a_watch_do_not_roll_the_cache_back() {
        let mut core = BrokerCore::new(config());
        core.handle_leases(eu(), RegionLeases::from_parts(5, []));
        core.handle_leases(eu(), RegionLeases::from_parts(3, []));
        assert_eq!(core.leases(&eu()).map(|l| l.version()), Some(5));
    }
}
