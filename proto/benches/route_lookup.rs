//! Route lookup throughput: tether's table next to two baselines, one run.
//!
//! `cargo bench -p tether-proto --bench route_lookup`
//!
//! Builds a table of 100,000 routes shaped like a large deployment (site
//! addresses, LAN mappings, gateway prefixes; IPv4 and IPv6), then times
//! single-threaded lookups of a fixed, pseudo-random mix of destinations with
//! tether's `RouteTable`, the `prefix-trie` crate (a well-kept LPM trie) and a
//! linear scan. Every lookup's winner is cross-checked between tether and
//! prefix-trie before timing, so both measure the same work.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;
use tether_proto::route::{Route, RouteTable};

const LOOKUPS: usize = 1_000_000;
const ROUNDS: usize = 7;

mod common;
use common::{Rng, build};

fn destinations(rng: &mut Rng, routes: &[Route]) -> Vec<IpAddr> {
    (0..LOOKUPS)
        .map(|_| {
            let pick = rng.next();
            if pick.is_multiple_of(10) {
                // 10% anywhere in IPv4: mostly misses or gateway hits.
                IpAddr::V4(Ipv4Addr::from(rng.next() as u32))
            } else {
                // 90% inside a random route's prefix.
                let r = &routes[(rng.next() % routes.len() as u64) as usize];
                match r.prefix {
                    IpNet::V4(p) => {
                        let host = (rng.next() as u32) & !u32::from(p.netmask());
                        IpAddr::V4(Ipv4Addr::from(u32::from(p.network()) | host))
                    }
                    IpNet::V6(p) => IpAddr::V6(p.network()),
                }
            }
        })
        .collect()
}

fn median_rate(mut f: impl FnMut() -> usize, lookups: usize) -> f64 {
    let mut rates: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            black_box(f());
            lookups as f64 / t.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
    rates[ROUNDS / 2]
}

fn main() {
    let mut rng = Rng(0x7e7e_7e7e);
    let routes = build(&mut rng);
    let dsts = destinations(&mut rng, &routes);

    let mut table = RouteTable::new();
    let mut trie4: PrefixMap<Ipv4Net, u32> = PrefixMap::new();
    let mut trie6: PrefixMap<Ipv6Net, u32> = PrefixMap::new();
    for (i, r) in routes.iter().enumerate() {
        table.insert(r.clone());
        match r.prefix {
            IpNet::V4(p) => {
                trie4.insert(p, i as u32);
            }
            IpNet::V6(p) => {
                trie6.insert(p, i as u32);
            }
        }
    }
    let trie_lookup = |dst: &IpAddr| -> Option<IpNet> {
        match dst {
            IpAddr::V4(a) => trie4
                .get_lpm(&Ipv4Net::new(*a, 32).unwrap())
                .map(|(p, _)| IpNet::V4(p)),
            IpAddr::V6(a) => trie6
                .get_lpm(&Ipv6Net::new(*a, 128).unwrap())
                .map(|(p, _)| IpNet::V6(p)),
        }
    };

    // Cross-check before timing: both must pick the same prefix.
    let mut hits = 0usize;
    for dst in &dsts {
        let ours = table.lookup(*dst).winner().map(|r| r.prefix);
        assert_eq!(ours, trie_lookup(dst), "disagreement for {dst}");
        hits += usize::from(ours.is_some());
    }

    let tether = median_rate(
        || {
            dsts.iter()
                .filter(|d| table.lookup(**d).winner().is_some())
                .count()
        },
        dsts.len(),
    );
    let trie = median_rate(
        || dsts.iter().filter(|d| trie_lookup(d).is_some()).count(),
        dsts.len(),
    );
    let scan_dsts = &dsts[..200];
    let scan = median_rate(
        || {
            scan_dsts
                .iter()
                .filter(|d| {
                    routes
                        .iter()
                        .filter(|r| r.prefix.contains(*d))
                        .max_by_key(|r| r.prefix.prefix_len())
                        .is_some()
                })
                .count()
        },
        scan_dsts.len(),
    );

    println!(
        "route lookup: {} routes in the table ({} generated, duplicates merged), {} destinations ({:.0}% match a route), 1 thread, median of {ROUNDS} rounds",
        table.len(),
        routes.len(),
        dsts.len(),
        100.0 * hits as f64 / dsts.len() as f64
    );
    println!(
        "{:<28} {:>16} {:>12}",
        "implementation", "lookups/s", "vs tether"
    );
    for (name, rate) in [
        ("tether RouteTable", tether),
        ("prefix-trie 0.10 PrefixMap", trie),
        ("linear scan", scan),
    ] {
        println!("{:<28} {:>16.0} {:>11.2}x", name, rate, rate / tether);
    }
}
