//! Address allocation at fleet size: planning and committing one site
//! address after another, then finding each site's leases, at 10,000 and
//! 50,000 sites in one region.
//!
//! `cargo bench -p tether-proto --bench ipam_scale`
//!
//! The broker's core does this work on every enrollment (plan, then apply
//! the committed transaction to its cache) and `GET /v1/sites` looks up
//! every site's leases. A linear scan of the region's leases per site is
//! printed beside the indexed lookup as the baseline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use tether_proto::ids::{RegionId, SiteId};
use tether_proto::ipam::{Ipam, Plan, RegionLeases};
use tether_proto::net::Family;

fn main() {
    let region: RegionId = "eu".parse().unwrap();
    let pools = BTreeMap::from([(region.clone(), vec!["100.64.0.0/10".parse().unwrap()])]);
    let ipam = Ipam::new(pools).unwrap();
    println!("| sites | allocate all (plan + apply) | per site | indexed lookups | linear scans |");
    println!("|---:|---:|---:|---:|---:|");
    for n in [10_000usize, 50_000] {
        let sites: Vec<SiteId> = (0..n)
            .map(|i| format!("site-{i}").parse().unwrap())
            .collect();
        let mut leases = RegionLeases::default();
        let t = Instant::now();
        for site in &sites {
            match ipam
                .site_address(&leases, site, &region, Family::V4)
                .unwrap()
            {
                Plan::Allocate(txn) => leases.apply(&txn).unwrap(),
                Plan::Existing(_) => unreachable!("a new site"),
            }
        }
        let allocate = t.elapsed();
        assert_eq!(leases.len(), n);

        let t = Instant::now();
        let found: usize = sites.iter().map(|s| leases.of_site(s).count()).sum();
        let indexed = t.elapsed();
        assert_eq!(found, n);

        // The baseline scans the region for a sample of sites and is
        // scaled up (all of them would take minutes at 50,000).
        let sample = 1_000;
        let t = Instant::now();
        let scanned: usize = sites[..sample]
            .iter()
            .map(|s| leases.leases().filter(|l| &l.site == s).count())
            .sum();
        let linear = t.elapsed().mul_f64((n / sample) as f64);
        black_box(scanned);

        println!(
            "| {n} | {:.2} s | {:.1} µs | {:.1} ms | {:.1} s (from {sample}) |",
            allocate.as_secs_f64(),
            allocate.as_secs_f64() * 1e6 / n as f64,
            indexed.as_secs_f64() * 1e3,
            linear.as_secs_f64(),
        );
    }
}
