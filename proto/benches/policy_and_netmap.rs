//! The access policy's and the LAN translation's cost per packet, one core.
//!
//! `cargo bench -p tether-proto --bench policy_and_netmap`
//!
//! Policy: 10,000 rules over 20,000 sites in 4 regions and 200 groups
//! (site to site on a port, group to group, region to a site's LANs,
//! gateway prefixes to regions), and 10,000 checks per case and round: a
//! flow a rule allows, a reply to one, and a flow nothing allows, each
//! with 10,000 distinct flows spread over the sites (the index does not
//! stay in cache) and with 100 flows repeated. Median of 7 rounds.
//!
//! LAN translation: 10,000 distinct 1,400-byte TCP packets from the tunnel
//! to hosts of a mapped /24 (`to_lan`), translated back by the reverse
//! mapping after each round so every round does the same work.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::hint::black_box;
use std::net::IpAddr;
use std::time::Instant;

use tether_proto::netmap::{LanMap, Mapping};
use tether_proto::policy::{Backends, End, Party, Policy, Rule, Traffic};
use tether_proto::{RegionId, SiteId};

mod common;
use common::Rng;

const RULES: usize = 10_000;
const SITES: usize = 20_000;
const GROUPS: usize = 200;
const FLOWS: usize = 10_000;
const ROUNDS: usize = 7;

fn site_name(i: usize) -> String {
    format!("site-{i}")
}

fn region_of(i: usize) -> usize {
    i % 4
}

fn policy(rng: &mut Rng) -> Policy {
    let mut groups: HashMap<String, HashSet<SiteId>> = HashMap::new();
    for g in 0..GROUPS {
        let members = (0..50)
            .map(|_| {
                site_name((rng.next() % SITES as u64) as usize)
                    .parse()
                    .unwrap()
            })
            .collect();
        groups.insert(format!("group-{g}"), members);
    }
    let mut rules = Vec::with_capacity(RULES);
    for i in 0..RULES {
        let (from, to, ports) = match i % 4 {
            0 | 1 => (
                format!("site:{}", site_name((rng.next() % SITES as u64) as usize)),
                format!("site:{}", site_name((rng.next() % SITES as u64) as usize)),
                vec![format!("tcp/{}", 1000 + (rng.next() % 1000))],
            ),
            2 => (
                format!("group:group-{}", (rng.next() % GROUPS as u64)),
                format!("group:group-{}", (rng.next() % GROUPS as u64)),
                vec!["tcp/443".to_string(), "icmp".to_string()],
            ),
            _ => (
                format!("region:r{}", (rng.next() % 4)),
                format!(
                    "lan-of:site:{}",
                    site_name((rng.next() % SITES as u64) as usize)
                ),
                vec!["udp/53".to_string()],
            ),
        };
        rules.push(Rule {
            name: format!("rule-{i}"),
            from: vec![from.parse().unwrap()],
            to: vec![to.parse().unwrap()],
            ports: ports.iter().map(|p| p.parse().unwrap()).collect(),
        });
    }
    Policy::new(rules, groups, Backends::Region).unwrap()
}

/// The `k`th flow of a case: from, to, traffic.
type FlowOf<'a> = Box<dyn Fn(usize) -> (usize, usize, Traffic) + 'a>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut rng = Rng(7);
    let built = Instant::now();
    let policy = policy(&mut rng);
    println!(
        "policy: {RULES} rules, {SITES} sites, {GROUPS} groups, compiled in {:.1} ms",
        built.elapsed().as_secs_f64() * 1e3
    );
    let sites: Vec<SiteId> = (0..SITES).map(|i| site_name(i).parse().unwrap()).collect();
    let regions: Vec<RegionId> = (0..4).map(|r| format!("r{r}").parse().unwrap()).collect();
    let end = |i: usize| End {
        party: Party::Site {
            site: &sites[i],
            region: &regions[region_of(i)],
            lan: false,
        },
        addr: IpAddr::from([100, 64, (i >> 8) as u8, i as u8]),
    };
    // Flows a rule allows: the site-to-site rules, read back.
    let mut allowed = Vec::new();
    for rule in policy.rules().iter().step_by(4).take(FLOWS) {
        let (from, to) = (rule.from[0].to_string(), rule.to[0].to_string());
        let index = |s: &str| s.trim_start_matches("site:site-").parse::<usize>().unwrap();
        let port = rule.ports[0].ports.clone().unwrap();
        allowed.push((index(&from), index(&to), *port.start()));
    }
    let cases: [(&str, FlowOf); 3] = [
        (
            "allowed by a rule",
            Box::new(|k| {
                let (a, b, port) = allowed[k % allowed.len()];
                (
                    a,
                    b,
                    Traffic::Tcp {
                        src: 40000,
                        dst: port,
                        opens: true,
                    },
                )
            }),
        ),
        (
            "reply to a rule",
            Box::new(|k| {
                let (a, b, port) = allowed[k % allowed.len()];
                (
                    b,
                    a,
                    Traffic::Tcp {
                        src: port,
                        dst: 40000,
                        opens: false,
                    },
                )
            }),
        ),
        (
            "denied (no rule)",
            Box::new(|k| {
                let a = (k * 7919) % SITES;
                let b = (k * 104_729 + 1) % SITES;
                (
                    a,
                    b,
                    Traffic::Tcp {
                        src: 40000,
                        dst: 22,
                        opens: true,
                    },
                )
            }),
        ),
    ];
    // Cold: 10,000 different flows per round, spread over the sites (the
    // maps do not stay in cache). Warm: 100 flows repeated, as a broker
    // sees a busy hospital's few conversations.
    for ((name, flow), distinct) in cases.iter().flat_map(|c| [(c, FLOWS), (c, 100)]) {
        let flows: Vec<(usize, usize, Traffic)> = (0..FLOWS).map(|k| flow(k % distinct)).collect();
        let name = format!("{name}, {distinct} flows");
        let mut rates = Vec::new();
        let mut passed = 0;
        for _ in 0..ROUNDS {
            passed = 0;
            let start = Instant::now();
            for &(a, b, t) in &flows {
                if black_box(policy.check(&end(a), &end(b), t)).allows() {
                    passed += 1;
                }
            }
            rates.push(FLOWS as f64 / start.elapsed().as_secs_f64());
        }
        println!(
            "policy check, {name:<30} {:>6.2} M checks/s  ({passed} of {FLOWS} passed)",
            median(rates) / 1e6
        );
    }

    // LAN translation.
    let map = LanMap::new(vec![
        Mapping::new(
            "192.168.1.0/24".parse().unwrap(),
            "100.70.3.0/24".parse().unwrap(),
        )
        .unwrap(),
    ])
    .unwrap();
    let back = LanMap::new(vec![
        Mapping::new(
            "100.70.3.0/24".parse().unwrap(),
            "192.168.1.0/24".parse().unwrap(),
        )
        .unwrap(),
    ])
    .unwrap();
    let mut packets: Vec<Vec<u8>> = (0..FLOWS)
        .map(|i| tcp4([100, 64, 0, 9], [100, 70, 3, (i % 250) as u8 + 1], i as u16))
        .collect();
    let mut rates = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for p in &mut packets {
            black_box(map.to_lan(p).unwrap());
        }
        rates.push(FLOWS as f64 / start.elapsed().as_secs_f64());
        // Back to the mapped destination (as the mirror image: the reverse
        // mapping translates destinations the same way).
        for p in &mut packets {
            back.to_lan(p).unwrap();
        }
    }
    println!(
        "LAN translation (to_lan), 1,400-byte TCP  {:>6.2} M packets/s",
        median(rates) / 1e6
    );
}

/// A 1,400-byte IPv4 TCP segment with valid checksums.
fn tcp4(src: [u8; 4], dst: [u8; 4], port: u16) -> Vec<u8> {
    const LEN: usize = 1400;
    let mut p = vec![0u8; LEN];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(LEN as u16).to_be_bytes());
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    let header = tether_proto::ip::checksum(&[&p[..20]]);
    p[10..12].copy_from_slice(&header.to_be_bytes());
    p[20..22].copy_from_slice(&port.to_be_bytes());
    p[22..24].copy_from_slice(&443u16.to_be_bytes());
    p[32] = 0x50;
    p[33] = 0x10;
    let mut pseudo = [0u8; 12];
    pseudo[..8].copy_from_slice(&p[12..20]);
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&((LEN - 20) as u16).to_be_bytes());
    let sum = tether_proto::ip::checksum(&[&pseudo, &p[20..]]);
    p[36..38].copy_from_slice(&sum.to_be_bytes());
    p
}
