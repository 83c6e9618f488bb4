//! The forwarding decision's cost per packet, one core.
//!
//! `cargo bench -p tether-proto --bench forward_decision`
//!
//! `Router::decide` over the 100,000-route table of the route-lookup bench
//! (`common`), for 1,400-byte IPv4 UDP packets: from a site to a backend
//! behind a gateway, from a gateway to a site, and from a site spoofing
//! another site's address (dropped). 10,000 distinct packets per case,
//! every one decided once per round; the TTL and header checksum the
//! decision rewrites in place are restored after each (4 bytes), so every
//! round decides the same packets. Median of 7 rounds. Later features
//! (policy, NAT) show their cost here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::net::IpAddr;
use std::time::Instant;

use ipnet::IpNet;
use tether_proto::forward::{Ingress, Router, Verdict};
use tether_proto::route::{RouteKind, RouteTable, RouteTarget};
use tether_proto::{GatewayId, RegionId, SiteId};

mod common;
use common::{Rng, build};

const PACKETS: usize = 10_000;
const ROUNDS: usize = 7;
const LEN: usize = 1400;

/// An IPv4 UDP packet of [`LEN`] bytes with a valid header checksum.
fn udp4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0u8; LEN];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(LEN as u16).to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    let mut sum: u32 = p[..20]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..22].copy_from_slice(&4000u16.to_be_bytes());
    p[22..24].copy_from_slice(&443u16.to_be_bytes());
    p[24..26].copy_from_slice(&((LEN - 20) as u16).to_be_bytes());
    p
}

fn v4(a: IpAddr) -> [u8; 4] {
    match a {
        IpAddr::V4(a) => a.octets(),
        IpAddr::V6(_) => unreachable!("IPv4 only"),
    }
}

/// A host inside `prefix` (IPv4).
fn host(rng: &mut Rng, prefix: &IpNet) -> [u8; 4] {
    match prefix {
        IpNet::V4(p) => {
            let bits = (rng.next() as u32) & !u32::from(p.netmask());
            (u32::from(p.network()) | bits).to_be_bytes()
        }
        IpNet::V6(_) => unreachable!("IPv4 only"),
    }
}

/// Decisions per second over `cases` (ingress index, packet), median of
/// [`ROUNDS`]; also returns how many were forwarded in the last round.
fn rate(
    router: &Router,
    ingresses: &[Ingress<'_>],
    cases: &mut [(usize, Vec<u8>)],
) -> (f64, usize) {
    let mut rates = Vec::new();
    let mut forwarded = 0;
    for _ in 0..ROUNDS {
        forwarded = 0;
        let t = Instant::now();
        for (i, packet) in cases.iter_mut() {
            let saved: [u8; 4] = packet[8..12].try_into().unwrap();
            let verdict = router.decide(&ingresses[*i], packet, |_| Some(1500));
            forwarded += usize::from(matches!(black_box(&verdict), Verdict::Forward(_)));
            packet[8..12].copy_from_slice(&saved);
        }
        rates.push(cases.len() as f64 / t.elapsed().as_secs_f64());
    }
    rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (rates[ROUNDS / 2], forwarded)
}

fn main() {
    let mut rng = Rng(0x7e7e_7e7e);
    let routes = build(&mut rng);
    let mut table = RouteTable::new();
    for r in &routes {
        table.insert(r.clone());
    }
    let router = Router {
        table,
        ..Router::default()
    };
    let eu = RegionId::new("eu").unwrap();
    let sites: Vec<(SiteId, IpNet)> = routes
        .iter()
        .filter(|r| r.kind == RouteKind::SiteAddress && r.prefix.addr().is_ipv4())
        .filter(|r| {
            router
                .table
                .lookup(r.prefix.addr())
                .winner()
                .map(|w| w.prefix)
                == Some(r.prefix)
        })
        .filter_map(|r| match &r.target {
            RouteTarget::Site(s) => Some((s.clone(), r.prefix)),
            RouteTarget::Gateway(_) => None,
        })
        .take(PACKETS)
        .collect();
    let gateways: Vec<IpNet> = routes
        .iter()
        .filter(|r| r.kind == RouteKind::Gateway)
        // Not multicast, broadcast or link-local space, where no host
        // crosses a router.
        .filter(|r| match r.prefix {
            IpNet::V4(p) => {
                let o = p.network().octets();
                o[0] < 224 && !(o[0] == 169 && o[1] == 254)
            }
            IpNet::V6(_) => false,
        })
        // Only prefixes whose hosts are not also inside a site route.
        .filter(|r| {
            let h = r.prefix.network();
            router.table.lookup(h).winner().map(|w| w.kind) == Some(RouteKind::Gateway)
        })
        .map(|r| r.prefix)
        .collect();
    let allowed: Vec<[IpNet; 1]> = sites.iter().map(|(_, p)| [*p]).collect();
    let gw = GatewayId::new("gw-0").unwrap();
    let mut ingresses: Vec<Ingress<'_>> = sites
        .iter()
        .zip(&allowed)
        .map(|((site, _), allowed)| Ingress::Site {
            site,
            region: &eu,
            allowed,
        })
        .collect();
    let from_gateway = ingresses.len();
    ingresses.push(Ingress::Gateway {
        gateway: &gw,
        region: &eu,
        allowed: &[],
    });

    // Site -> backend behind a gateway.
    let mut up: Vec<(usize, Vec<u8>)> = (0..sites.len())
        .map(|i| {
            let g = &gateways[(rng.next() % gateways.len() as u64) as usize];
            let dst = loop {
                let d = host(&mut rng, g);
                // Not link-local: it never crosses a router.
                let scoped = d[0] == 169 && d[1] == 254;
                if !scoped
                    && router
                        .table
                        .lookup(IpAddr::from(d))
                        .winner()
                        .map(|w| w.kind)
                        == Some(RouteKind::Gateway)
                {
                    break d;
                }
            };
            (i, udp4(v4(sites[i].1.addr()), dst))
        })
        .collect();
    // Gateway -> site.
    let mut down: Vec<(usize, Vec<u8>)> = (0..sites.len())
        .map(|i| (from_gateway, udp4([10, 20, 0, 10], v4(sites[i].1.addr()))))
        .collect();
    // A site sending from another site's address.
    let mut spoofed: Vec<(usize, Vec<u8>)> = (0..sites.len())
        .map(|i| {
            let other = v4(sites[(i + 1) % sites.len()].1.addr());
            (i, udp4(other, v4(sites[(i + 7) % sites.len()].1.addr())))
        })
        .collect();

    println!(
        "forwarding decision: {} routes in the table, {} packets of {LEN} bytes per case, 1 thread, median of {ROUNDS} rounds",
        router.table.len(),
        sites.len()
    );
    println!(
        "{:<34} {:>14} {:>10} {:>10}",
        "case", "decisions/s", "ns each", "forwarded"
    );
    for (name, cases) in [
        ("site -> backend (gateway route)", &mut up),
        ("gateway -> site", &mut down),
        ("site spoofing another site", &mut spoofed),
    ] {
        let (r, fwd) = rate(&router, &ingresses, cases);
        println!("{name:<34} {r:>14.0} {:>10.1} {fwd:>10}", 1e9 / r);
    }
}
