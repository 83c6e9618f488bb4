//! The mesh zone brought from one zone data to the next in place
//! (`Zone::plan` and `Zone::apply`, what the DNS servers of the broker and
//! of the gateways do on every change) must be the zone built from scratch
//! from the new data.
//!
//! Input: bytes that describe an old zone data (zone name, TTL, pools, a
//! few sites with addresses, services and LAN mappings, drawn from small
//! sets so that sites share addresses, names and mapped prefixes) and the
//! edits that make the new one (sites kept, dropped, changed or added, a
//! new serial, sometimes a new zone name, TTL or pools, sometimes sites out
//! of order or twice).
//!
//! Properties: no panic; the updated zone holds the same data as the one
//! built from scratch, and answers every question about every name either
//! data can produce (sites, services, LAN hosts, reverse names, the apex,
//! empty non-terminals, names that are gone) with the same response code,
//! authority flag and records (for ANY, and for a type the name may lack); the same holds going
//! back from the new data to the old. The records of a section are
//! compared as a set: the order of records in an RRset carries no meaning
//! in DNS (RFC 2181 section 5).
#![no_main]

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::rr::{DNSClass, Name, Record, RecordType};
use ipnet::IpNet;
use libfuzzer_sys::arbitrary::{Result as ArbResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use tether_fuzz::parsed;
use tether_proto::dns::{Answer, Service, SiteNames, Zone, ZoneData, lan_host_name, site_name};
use tether_proto::netmap::Mapping;

/// Zone names: plain, one shorter, one inside the IPv4 reverse tree (site
/// names there can be reverse names too), one long enough that long site
/// names do not fit in DNS.
const ZONES: &[&str] = &[
    "tether.internal",
    "mesh",
    "64.100.in-addr.arpa",
    "a-very-long-label-that-takes-up-a-great-deal-of-the-name-length.\
     another-very-long-label-that-takes-up-much-of-the-name-length.\
     and-a-third-very-long-label-so-that-the-site-names-do-not-fit.example",
];
const POOLS: &[&str] = &[
    "100.64.0.0/16",
    "fd00:7e7e::/48",
    "100.64.0.0/10",
    "100.64.9.0/24",
];
const SITES: &[&str] = &[
    "a",
    "b",
    "hospital-a",
    "5",
    "lab-b",
    "a-site-label-of-sixty-three-characters-the-most-a-dns-label-has",
];
const REGIONS: &[&str] = &["eu", "us", "0"];
const ADDRESSES: &[&str] = &[
    "100.64.0.1",
    "100.64.0.2",
    "100.64.9.5",
    "fd00:7e7e::2",
    "10.0.0.1",
    "fd00:7e7e::9:0:0:0",
];
const SERVICES: &[&str] = &["dicom=104", "dicom=11112", "http=80"];
/// LAN mappings; several share a mapped prefix or overlap one another, as
/// a broker's data never should but a gateway must still survive.
const LANS: &[(&str, &str)] = &[
    ("192.168.1.0/24", "100.64.9.0/24"),
    ("10.1.0.0/24", "100.64.9.0/24"),
    ("10.1.0.0/24", "100.64.10.0/24"),
    ("192.168.1.0/25", "100.64.9.0/25"),
    ("192.168.7.9/32", "100.64.9.7/32"),
    ("fd00:1::/64", "fd00:7e7e:0:9::/64"),
];

fn pick<'a, T>(u: &mut Unstructured<'_>, from: &'a [T]) -> ArbResult<&'a T> {
    u.choose(from)
}

/// Up to `max` picks from `from` (repeats too), in the order drawn.
fn some<T: Clone>(u: &mut Unstructured<'_>, from: &[T], max: u8) -> ArbResult<Vec<T>> {
    let n = u.int_in_range(0..=max)?;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(pick(u, from)?.clone());
    }
    Ok(out)
}

struct Pools {
    addresses: Vec<IpAddr>,
    services: Vec<Service>,
    lans: Vec<Mapping>,
}

fn site(u: &mut Unstructured<'_>, pools: &Pools) -> ArbResult<SiteNames> {
    Ok(SiteNames {
        site: parsed(pick(u, SITES)?),
        region: parsed(pick(u, REGIONS)?),
        addresses: some(u, &pools.addresses, 3)?,
        services: some(u, &pools.services, 2)?,
        lans: some(u, &pools.lans, 2)?,
    })
}

/// Sorted and without two sites of one name, as the broker sends them,
/// unless the input says otherwise.
fn order(u: &mut Unstructured<'_>, sites: &mut Vec<SiteNames>) -> ArbResult<()> {
    if u.ratio(1, 8)? {
        return Ok(());
    }
    sites.sort();
    sites.dedup_by(|a, b| a.site == b.site && a.region == b.region);
    Ok(())
}

fn zone_pair(data: &[u8]) -> ArbResult<(ZoneData, ZoneData)> {
    let mut u = Unstructured::new(data);
    let pools = Pools {
        addresses: ADDRESSES.iter().map(|a| parsed(a)).collect(),
        services: SERVICES
            .iter()
            .map(|s| Service::parse(s).unwrap_or_else(|e| panic!("{e}")))
            .collect(),
        lans: LANS
            .iter()
            .map(|(r, m)| Mapping::new(parsed(r), parsed(m)).unwrap_or_else(|e| panic!("{e}")))
            .collect(),
    };
    let reverse_pools: Vec<IpNet> = POOLS.iter().map(|p| parsed(p)).collect();
    let mut old = ZoneData::empty(pick(&mut u, ZONES)?, 5, some(&mut u, &reverse_pools, 2)?);
    old.serial = u.arbitrary()?;
    let n = u.int_in_range(0..=5)?;
    for _ in 0..n {
        old.sites.push(site(&mut u, &pools)?);
    }
    order(&mut u, &mut old.sites)?;

    let mut new = old.clone();
    new.serial = old.serial.wrapping_add(u.int_in_range(0..=1)?);
    if u.ratio(1, 16)? {
        new.zone = pick(&mut u, ZONES)?.to_string();
    }
    if u.ratio(1, 16)? {
        new.ttl = 30;
    }
    if u.ratio(1, 16)? {
        new.reverse = some(&mut u, &reverse_pools, 2)?;
    }
    let mut sites = Vec::new();
    for s in &old.sites {
        match u.int_in_range(0..=5)? {
            0 => {}
            1 => sites.push(SiteNames {
                addresses: some(&mut u, &pools.addresses, 3)?,
                ..s.clone()
            }),
            2 => sites.push(SiteNames {
                services: some(&mut u, &pools.services, 2)?,
                ..s.clone()
            }),
            3 => sites.push(SiteNames {
                lans: some(&mut u, &pools.lans, 2)?,
                ..s.clone()
            }),
            _ => sites.push(s.clone()),
        }
    }
    let added = u.int_in_range(0..=2)?;
    for _ in 0..added {
        sites.push(site(&mut u, &pools)?);
    }
    order(&mut u, &mut sites)?;
    new.sites = sites;
    Ok((old, new))
}

/// Every name either data can produce, and a few around them.
fn names(datas: &[&ZoneData]) -> Vec<Name> {
    let mut out = BTreeSet::new();
    let mut add = |text: String| {
        if let Ok(name) = Name::from_ascii(format!("{text}.")) {
            out.insert(name);
        }
    };
    add("example.com".into());
    for d in datas {
        let zone = &d.zone;
        add(zone.clone());
        add(format!("ns.{zone}"));
        add(format!("nothing.{zone}"));
        for p in &d.reverse {
            add(Name::from(p.network())
                .to_string()
                .trim_end_matches('.')
                .into());
        }
        for s in &d.sites {
            let name = site_name(&s.site, &s.region, zone);
            add(format!("{}.{zone}", s.region));
            add(name.clone());
            add(format!("_tcp.{name}"));
            add(format!("lan.{name}"));
            add(format!("x.lan.{name}"));
            for svc in SERVICES {
                let svc = svc.split('=').next().unwrap_or_default();
                add(format!("_{svc}._tcp.{name}"));
            }
            for a in &s.addresses {
                add(Name::from(*a).to_string().trim_end_matches('.').into());
            }
            for m in &s.lans {
                for off in [0u8, 7, 130] {
                    for (net, real) in [(m.mapped, false), (m.real, true)] {
                        let addr = nth(net, off);
                        if real {
                            add(lan_host_name(addr, s, zone));
                        } else {
                            add(Name::from(addr).to_string().trim_end_matches('.').into());
                        }
                    }
                }
            }
        }
    }
    out.into_iter().collect()
}

/// The `off`-th address of `net`'s network (wrapping past its end).
fn nth(net: IpNet, off: u8) -> IpAddr {
    match net.network() {
        IpAddr::V4(a) => IpAddr::from((u32::from(a).wrapping_add(u32::from(off))).to_be_bytes()),
        IpAddr::V6(a) => IpAddr::from((u128::from(a).wrapping_add(u128::from(off))).to_be_bytes()),
    }
}

/// An answer with each section as a sorted list.
fn canonical(a: Answer) -> impl PartialEq + std::fmt::Debug {
    let sorted = |records: Vec<Record>| {
        let mut v: Vec<String> = records.iter().map(ToString::to_string).collect();
        v.sort();
        v
    };
    (
        a.code,
        a.authoritative,
        sorted(a.answers),
        sorted(a.authority),
        sorted(a.additionals),
    )
}

/// ANY answers with every record of a name (and the addresses of SRV and
/// NS targets); A, with a type the name may lack (an empty answer with the
/// SOA).
const QTYPES: &[RecordType] = &[RecordType::ANY, RecordType::A];

/// Updates `zone` to `next` and checks it against a zone built from
/// `next`.
fn step(zone: &mut Option<Zone>, next: &ZoneData, names: &[Name], ns: &[IpAddr]) {
    let fresh = Zone::new(next.clone(), ns);
    let Some(z) = zone.as_mut() else {
        *zone = fresh.ok();
        return;
    };
    let plan = z.plan(Arc::new(next.clone()));
    let updated = z.apply(plan);
    let fresh = match (updated, fresh) {
        (Ok(_), Ok(fresh)) => fresh,
        (Err(a), Err(b)) => {
            assert_eq!(a, b);
            *zone = None;
            return;
        }
        (a, b) => panic!("update {a:?}, built from scratch {:?}", b.map(|_| ())),
    };
    assert_eq!(z.data(), fresh.data());
    assert_eq!(z.origin(), fresh.origin());
    for name in names {
        for &qtype in QTYPES {
            let (a, b) = (
                z.answer(name, qtype, DNSClass::IN),
                fresh.answer(name, qtype, DNSClass::IN),
            );
            // Equal as they are (most often), or as sets.
            if a != b {
                assert_eq!(canonical(a), canonical(b), "{qtype} {name}");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok((old, new)) = zone_pair(data) else {
        return;
    };
    let ns: [IpAddr; 1] = [parsed("127.0.0.1")];
    let names = names(&[&old, &new]);
    let mut zone = Zone::new(old.clone(), &ns).ok();
    step(&mut zone, &new, &names, &ns);
    step(&mut zone, &old, &names, &ns);
});
