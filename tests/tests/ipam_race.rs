//! Several brokers allocate from one pool at once through a compare-and-set
//! store; no address ever has two owners, and every site keeps its address.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Barrier};

use tether_proto::ipam::{Ipam, Plan};
use tether_proto::net::Family;
use tether_proto::{RegionId, SiteId};
use tether_tests::CasStore;

/// Plans and commits with retries, as a broker does.
fn allocate(
    ipam: &Ipam,
    store: &CasStore,
    site: &SiteId,
    region: &RegionId,
) -> (ipnet::IpNet, usize) {
    let mut conflicts = 0;
    loop {
        let snapshot = store.snapshot();
        match ipam
            .site_address(&snapshot, site, region, Family::V4)
            .unwrap()
        {
            Plan::Existing(lease) => return (lease.prefix, conflicts),
            Plan::Allocate(txn) => match store.commit(&txn) {
                Ok(()) => return (txn.put[0].prefix, conflicts),
                Err(_) => conflicts += 1,
            },
        }
    }
}

#[test]
fn racing_brokers_never_double_allocate() {
    let region = RegionId::new("eu").unwrap();
    // A /23 holds 510 sites; 4 brokers enroll 480 between them, and every
    // site connects to two brokers at once (failover), which must agree.
    let ipam = Arc::new(
        Ipam::new(BTreeMap::from([(
            region.clone(),
            vec!["100.64.0.0/23".parse().unwrap()],
        )]))
        .unwrap(),
    );
    let store = Arc::new(CasStore::default());
    let brokers = 4;
    let sites_per_broker = 120;
    let barrier = Arc::new(Barrier::new(brokers));
    let handles: Vec<_> = (0..brokers)
        .map(|b| {
            let (ipam, store, barrier, region) =
                (ipam.clone(), store.clone(), barrier.clone(), region.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let mut got = Vec::new();
                let mut conflicts = 0;
                for i in 0..sites_per_broker {
                    // Each site is handled by broker b and broker (b+1).
                    for owner in [b, (b + brokers - 1) % brokers] {
                        let site = SiteId::new(format!("site-{owner}-{i}")).unwrap();
                        let (prefix, c) = allocate(&ipam, &store, &site, &region);
                        conflicts += c;
                        got.push((site, prefix));
                    }
                }
                (got, conflicts)
            })
        })
        .collect();

    let mut by_site: BTreeMap<SiteId, BTreeSet<ipnet::IpNet>> = BTreeMap::new();
    let mut total_conflicts = 0;
    for h in handles {
        let (got, conflicts) = h.join().unwrap();
        total_conflicts += conflicts;
        for (site, prefix) in got {
            by_site.entry(site).or_default().insert(prefix);
        }
    }
    // Every site saw one address, whichever broker it asked.
    assert_eq!(by_site.len(), brokers * sites_per_broker);
    for (site, prefixes) in &by_site {
        assert_eq!(
            prefixes.len(),
            1,
            "{site} got several addresses: {prefixes:?}"
        );
    }
    // No address has two owners.
    let addresses: BTreeSet<_> = by_site.values().flatten().collect();
    assert_eq!(addresses.len(), by_site.len());
    let snapshot = store.snapshot();
    assert_eq!(snapshot.len(), by_site.len());
    eprintln!(
        "{} allocations, {total_conflicts} compare-and-set conflicts retried",
        by_site.len()
    );
}
