#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use proptest::prelude::*;

use super::*;

fn site(id: &str) -> SiteId {
    id.parse().unwrap()
}

fn region(id: &str) -> RegionId {
    id.parse().unwrap()
}

fn rule(name: &str, from: &[&str], to: &[&str], ports: &[&str]) -> Rule {
    Rule {
        name: name.into(),
        from: from.iter().map(|s| s.parse().unwrap()).collect(),
        to: to.iter().map(|s| s.parse().unwrap()).collect(),
        ports: ports.iter().map(|s| s.parse().unwrap()).collect(),
    }
}

fn groups(list: &[(&str, &[&str])]) -> HashMap<String, HashSet<SiteId>> {
    list.iter()
        .map(|(g, m)| (g.to_string(), m.iter().map(|s| site(s)).collect()))
        .collect()
}

fn tcp(dst: u16) -> Traffic {
    Traffic::Tcp {
        src: 40000,
        dst,
        opens: true,
    }
}

#[test]
fn selectors_and_ports_read_and_print_back() {
    for text in [
        "sites",
        "site:hospital-a",
        "group:labs",
        "region:eu",
        "lan-of:site:hospital-a",
        "lan-of:group:labs",
        "gateways",
        "gateway:gw-eu",
        "prefix:10.31.0.0/24",
    ] {
        let s: Selector = text.parse().unwrap();
        assert_eq!(s.to_string(), text);
    }
    for text in ["tcp/443", "tcp/8000-8100", "udp/53", "tcp", "icmp", "any"] {
        let p: Ports = text.parse().unwrap();
        assert_eq!(p.to_string(), text);
    }
    let e = "host:x".parse::<Selector>().unwrap_err().to_string();
    assert!(e.contains("write sites, site:<id>"), "{e}");
    let e = "site:Hospital".parse::<Selector>().unwrap_err().to_string();
    assert!(e.contains("uppercase"), "{e}");
    for bad in ["tcp/0", "tcp/90-80", "icmp/8", "sctp/1", "tcp/http"] {
        let e = bad.parse::<Ports>().unwrap_err().to_string();
        assert!(e.contains("write tcp/443"), "{bad}: {e}");
    }
}

#[test]
fn building_names_the_broken_rule() {
    let e = Policy::new(
        vec![rule("labs", &["group:labs"], &["sites"], &[])],
        HashMap::new(),
        Backends::Region,
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("rule \"labs\" names group \"labs\""),
        "{e}"
    );
    let e = Policy::new(
        vec![
            rule("a", &["sites"], &["sites"], &[]),
            rule("a", &["sites"], &["sites"], &[]),
        ],
        HashMap::new(),
        Backends::Region,
    )
    .unwrap_err();
    assert_eq!(e, PolicyError::DuplicateName("a".into()));
}

#[test]
fn sites_cannot_reach_each_other_by_default() {
    let (a, b, eu) = (site("hospital-a"), site("hospital-b"), region("eu"));
    let p = Policy::default();
    let from = End {
        party: Party::Site {
            site: &a,
            region: &eu,
            lan: false,
        },
        addr: "100.64.0.2".parse().unwrap(),
    };
    let to = End {
        party: Party::Site {
            site: &b,
            region: &eu,
            lan: false,
        },
        addr: "100.64.0.3".parse().unwrap(),
    };
    assert_eq!(p.check(&from, &to, tcp(443)), Verdict::Denied);
    assert_eq!(
        p.check(&from, &to, Traffic::Icmp { answer: false }),
        Verdict::Denied
    );
}

fn at<'a>(site: &'a SiteId, region: &'a RegionId, addr: &str) -> End<'a> {
    End {
        party: Party::Site {
            site,
            region,
            lan: false,
        },
        addr: addr.parse().unwrap(),
    }
}

#[test]
fn a_group_rule_allows_its_ports_and_the_replies_only() {
    let (a, b, c, eu) = (
        site("lab-1"),
        site("lab-2"),
        site("hospital-c"),
        region("eu"),
    );
    let p = Policy::new(
        vec![rule("labs", &["group:labs"], &["group:labs"], &["tcp/443"])],
        groups(&[("labs", &["lab-1", "lab-2"])]),
        Backends::Region,
    )
    .unwrap();
    let (ea, eb, ec) = (
        at(&a, &eu, "100.64.0.2"),
        at(&b, &eu, "100.64.0.3"),
        at(&c, &eu, "100.64.0.4"),
    );
    assert_eq!(p.check(&ea, &eb, tcp(443)), Verdict::Rule("labs"));
    assert_eq!(p.check(&ea, &eb, tcp(22)), Verdict::Denied);
    assert_eq!(p.check(&ea, &ec, tcp(443)), Verdict::Denied);
    // lab-2 answers lab-1's connection from port 443 …
    let answer = Traffic::Tcp {
        src: 443,
        dst: 40000,
        opens: false,
    };
    assert_eq!(p.check(&eb, &ea, answer), Verdict::Reply("labs"));
    // … but nobody opens a connection from that port to lab-1's others.
    let syn = Traffic::Tcp {
        src: 443,
        dst: 22,
        opens: true,
    };
    assert_eq!(p.check(&eb, &ea, syn), Verdict::Denied);
    // hospital-c is not in the group: not even replies.
    assert_eq!(p.check(&ec, &ea, answer), Verdict::Denied);
}

#[test]
fn replies_pass_without_state_but_cannot_open_connections() {
    let (a, b, eu) = (site("hospital-a"), site("ris"), region("eu"));
    let p = Policy::new(
        vec![rule(
            "ris",
            &["site:hospital-a"],
            &["site:ris"],
            &["tcp/104", "udp/53", "icmp"],
        )],
        HashMap::new(),
        Backends::Region,
    )
    .unwrap();
    let ea = End {
        party: Party::Site {
            site: &a,
            region: &eu,
            lan: false,
        },
        addr: "100.64.0.2".parse().unwrap(),
    };
    let eb = End {
        party: Party::Site {
            site: &b,
            region: &eu,
            lan: false,
        },
        addr: "100.64.0.3".parse().unwrap(),
    };
    let reply = |src, dst, opens| Traffic::Tcp { src, dst, opens };
    assert_eq!(
        p.check(&eb, &ea, reply(104, 40000, false)),
        Verdict::Reply("ris")
    );
    assert_eq!(p.check(&eb, &ea, reply(104, 40000, true)), Verdict::Denied);
    assert_eq!(p.check(&eb, &ea, reply(105, 40000, false)), Verdict::Denied);
    assert_eq!(
        p.check(&eb, &ea, Traffic::Udp { src: 53, dst: 5353 }),
        Verdict::Reply("ris")
    );
    assert_eq!(
        p.check(&eb, &ea, Traffic::Icmp { answer: true }),
        Verdict::Reply("ris")
    );
    assert_eq!(
        p.check(&eb, &ea, Traffic::Icmp { answer: false }),
        Verdict::Denied,
        "a ping from the other side is not a reply"
    );
    assert_eq!(p.check(&eb, &ea, Traffic::Other), Verdict::Denied);
}

#[test]
fn lans_are_their_own_selector() {
    let (a, b, eu) = (site("hospital-a"), site("hospital-b"), region("eu"));
    let p = Policy::new(
        vec![rule(
            "a-lan",
            &["site:hospital-b"],
            &["lan-of:site:hospital-a"],
            &[],
        )],
        HashMap::new(),
        Backends::Region,
    )
    .unwrap();
    let from = End {
        party: Party::Site {
            site: &b,
            region: &eu,
            lan: false,
        },
        addr: "100.64.0.3".parse().unwrap(),
    };
    let lan = End {
        party: Party::Site {
            site: &a,
            region: &eu,
            lan: true,
        },
        addr: "100.70.3.20".parse().unwrap(),
    };
    let host = End {
        party: Party::Site {
            site: &a,
            region: &eu,
            lan: false,
        },
        addr: "100.64.0.2".parse().unwrap(),
    };
    assert!(p.check(&from, &lan, tcp(80)).allows());
    assert_eq!(p.check(&from, &host, tcp(80)), Verdict::Denied);
}

#[test]
fn backends_reach_their_regions_sites_unless_told_otherwise() {
    let (a, gw, eu, us) = (
        site("hospital-a"),
        "gw-eu".parse().unwrap(),
        region("eu"),
        region("us"),
    );
    let backend = End {
        party: Party::Gateway {
            gateway: &gw,
            region: &eu,
        },
        addr: "10.31.0.5".parse().unwrap(),
    };
    let here = End {
        party: Party::Site {
            site: &a,
            region: &eu,
            lan: false,
        },
        addr: "100.64.0.2".parse().unwrap(),
    };
    let abroad = End {
        party: Party::Site {
            site: &a,
            region: &us,
            lan: false,
        },
        addr: "100.80.0.2".parse().unwrap(),
    };
    let open = Policy::default();
    assert_eq!(
        open.check(&backend, &here, tcp(22)),
        Verdict::BackendsOfRegion
    );
    assert_eq!(
        open.check(&here, &backend, tcp(443)),
        Verdict::BackendsOfRegion
    );
    // Residency, checked before the policy, decides about other regions.
    assert_eq!(
        open.check(&backend, &abroad, tcp(22)),
        Verdict::BackendsOfRegion
    );
    let strict = Policy::new(
        vec![rule(
            "pacs",
            &["prefix:10.31.0.0/28"],
            &["region:eu"],
            &["tcp/104"],
        )],
        HashMap::new(),
        Backends::Rules,
    )
    .unwrap();
    assert_eq!(
        strict.check(&backend, &here, tcp(104)),
        Verdict::Rule("pacs")
    );
    assert_eq!(strict.check(&backend, &here, tcp(22)), Verdict::Denied);
    let outside = End {
        addr: "10.31.0.99".parse().unwrap(),
        ..backend
    };
    assert_eq!(strict.check(&outside, &here, tcp(104)), Verdict::Denied);
}

#[test]
fn traffic_is_read_from_packets() {
    let syn = [
        0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 100, 64, 0, 2, 100, 64, 0, 3, 0x9c, 0x40, 0,
        80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
    ];
    let p = Packet::parse(&syn).unwrap();
    assert_eq!(
        Traffic::of(&p),
        Traffic::Tcp {
            src: 40000,
            dst: 80,
            opens: true
        }
    );
    let mut synack = syn;
    synack[33] = 0x12;
    assert_eq!(
        Traffic::of(&Packet::parse(&synack).unwrap()),
        Traffic::Tcp {
            src: 40000,
            dst: 80,
            opens: false
        }
    );
    let mut later = syn;
    later[6..8].copy_from_slice(&[0, 8]);
    assert_eq!(Traffic::of(&Packet::parse(&later).unwrap()), Traffic::Other);
}

// The reference: every rule in order, each selector matched from its
// definition, with no index.

fn naive_names(
    sites: &Sites,
    groups: &HashMap<String, HashSet<SiteId>>,
    s: &SiteId,
    r: &RegionId,
) -> bool {
    match sites {
        Sites::All => true,
        Sites::Site(x) => x == s,
        Sites::Group(g) => groups[g].contains(s),
        Sites::Region(x) => x == r,
    }
}

fn naive_selects(sel: &Selector, groups: &HashMap<String, HashSet<SiteId>>, e: &End<'_>) -> bool {
    match (sel, e.party) {
        (Selector::Sites(x), Party::Site { site, region, lan }) => {
            !lan && naive_names(x, groups, site, region)
        }
        (Selector::LanOf(x), Party::Site { site, region, lan }) => {
            lan && naive_names(x, groups, site, region)
        }
        (Selector::Gateways, Party::Gateway { .. }) => true,
        (Selector::Gateway(g), Party::Gateway { gateway, .. }) => g == gateway,
        (Selector::Prefix(p), Party::Gateway { .. }) => p.contains(&e.addr),
        _ => false,
    }
}

fn naive_traffic(ports: &[Ports], t: Traffic, reply: bool) -> bool {
    let any = ports.is_empty() || ports.iter().any(|p| p.protocol == Protocol::Any);
    let opens = matches!(t, Traffic::Tcp { opens: true, .. });
    if any && !(reply && opens) {
        return true;
    }
    ports.iter().any(|p| {
        let port_ok = |port: u16| p.ports.as_ref().is_none_or(|r| r.contains(&port));
        match (p.protocol, t) {
            (Protocol::Tcp, Traffic::Tcp { src, dst, opens }) => {
                if reply {
                    !opens && port_ok(src)
                } else {
                    port_ok(dst)
                }
            }
            (Protocol::Udp, Traffic::Udp { src, dst }) => port_ok(if reply { src } else { dst }),
            (Protocol::Icmp, Traffic::Icmp { answer }) => !reply || answer,
            (Protocol::Tcp | Protocol::Udp, Traffic::Icmp { answer }) => reply && answer,
            _ => false,
        }
    })
}

fn naive_check<'a>(
    rules: &'a [Rule],
    groups: &HashMap<String, HashSet<SiteId>>,
    backends: Backends,
    from: &End<'_>,
    to: &End<'_>,
    t: Traffic,
) -> Verdict<'a> {
    let matching = |a: &End<'_>, b: &End<'_>, reply: bool| {
        rules.iter().find(|r| {
            r.from.iter().any(|s| naive_selects(s, groups, a))
                && r.to.iter().any(|s| naive_selects(s, groups, b))
                && naive_traffic(&r.ports, t, reply)
        })
    };
    let is_site = |e: &End<'_>| matches!(e.party, Party::Site { .. });
    if !is_site(from) && !is_site(to) {
        return Verdict::NotSites;
    }
    if let Some(r) = matching(from, to, false) {
        return Verdict::Rule(&r.name);
    }
    if is_site(from) != is_site(to) && backends == Backends::Region {
        return Verdict::BackendsOfRegion;
    }
    if let Some(r) = matching(to, from, true) {
        return Verdict::Reply(&r.name);
    }
    Verdict::Denied
}

const SITES: [&str; 5] = ["s-0", "s-1", "s-2", "s-3", "s-4"];
const REGIONS: [&str; 2] = ["eu", "us"];
const GATEWAYS: [&str; 2] = ["gw-0", "gw-1"];
const GROUPS: [&str; 2] = ["g-0", "g-1"];

fn sites_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("sites".to_string()),
        prop::sample::select(&SITES[..]).prop_map(|s| format!("site:{s}")),
        prop::sample::select(&GROUPS[..]).prop_map(|g| format!("group:{g}")),
        prop::sample::select(&REGIONS[..]).prop_map(|r| format!("region:{r}")),
    ]
}

fn selector_strategy() -> impl Strategy<Value = Selector> {
    prop_oneof![
        sites_strategy(),
        sites_strategy().prop_map(|s| format!("lan-of:{s}")),
        Just("gateways".to_string()),
        prop::sample::select(&GATEWAYS[..]).prop_map(|g| format!("gateway:{g}")),
        (0u8..4, 26u8..=30).prop_map(|(n, len)| format!("prefix:10.0.0.{}/{len}", n * 8)),
    ]
    .prop_map(|s| s.parse().unwrap())
}

fn ports_strategy() -> impl Strategy<Value = Ports> {
    prop_oneof![
        Just("any".to_string()),
        Just("icmp".to_string()),
        Just("tcp".to_string()),
        Just("udp".to_string()),
        (prop::sample::select(vec!["tcp", "udp"]), 1u16..6, 0u16..3)
            .prop_map(|(p, lo, w)| format!("{p}/{lo}-{}", lo + w)),
    ]
    .prop_map(|s| s.parse().unwrap())
}

fn rules_strategy() -> impl Strategy<Value = Vec<Rule>> {
    prop::collection::vec(
        (
            prop::collection::vec(selector_strategy(), 1..3),
            prop::collection::vec(selector_strategy(), 1..3),
            prop::collection::vec(ports_strategy(), 0..3),
        ),
        0..12,
    )
    .prop_map(|rules| {
        rules
            .into_iter()
            .enumerate()
            .map(|(i, (from, to, ports))| Rule {
                name: format!("r{i}"),
                from,
                to,
                ports,
            })
            .collect()
    })
}

/// An end: a site (own address or LAN) or a backend, as indices.
#[derive(Debug, Clone, Copy)]
enum EndSpec {
    Site(usize, usize, bool),
    Gateway(usize, usize, u8),
}

fn end_strategy() -> impl Strategy<Value = EndSpec> {
    prop_oneof![
        (0..SITES.len(), 0..REGIONS.len(), any::<bool>())
            .prop_map(|(s, r, l)| EndSpec::Site(s, r, l)),
        (0..GATEWAYS.len(), 0..REGIONS.len(), 0u8..40)
            .prop_map(|(g, r, h)| EndSpec::Gateway(g, r, h)),
    ]
}

fn traffic_strategy() -> impl Strategy<Value = Traffic> {
    prop_oneof![
        (1u16..8, 1u16..8, any::<bool>()).prop_map(|(src, dst, opens)| Traffic::Tcp {
            src,
            dst,
            opens
        }),
        (1u16..8, 1u16..8).prop_map(|(src, dst)| Traffic::Udp { src, dst }),
        any::<bool>().prop_map(|answer| Traffic::Icmp { answer }),
        Just(Traffic::Other),
    ]
}

struct Ids {
    sites: Vec<SiteId>,
    regions: Vec<RegionId>,
    gateways: Vec<GatewayId>,
}

fn end<'a>(ids: &'a Ids, spec: EndSpec) -> End<'a> {
    match spec {
        EndSpec::Site(s, r, lan) => End {
            party: Party::Site {
                site: &ids.sites[s],
                region: &ids.regions[r],
                lan,
            },
            addr: "100.64.0.1".parse().unwrap(),
        },
        EndSpec::Gateway(g, r, host) => End {
            party: Party::Gateway {
                gateway: &ids.gateways[g],
                region: &ids.regions[r],
            },
            addr: IpAddr::from([10, 0, 0, host]),
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The indexed evaluation agrees with the reference on random rule sets,
    /// groups and flows, down to the rule it names.
    #[test]
    fn the_index_agrees_with_the_reference(
        rules in rules_strategy(),
        members in prop::collection::vec(prop::collection::hash_set(0..SITES.len(), 0..4), GROUPS.len()),
        strict in any::<bool>(),
        from in end_strategy(),
        to in end_strategy(),
        traffic in traffic_strategy(),
    ) {
        let groups: HashMap<String, HashSet<SiteId>> = GROUPS
            .iter()
            .zip(&members)
            .map(|(g, m)| (g.to_string(), m.iter().map(|&i| site(SITES[i])).collect()))
            .collect();
        let backends = if strict { Backends::Rules } else { Backends::Region };
        let ids = Ids {
            sites: SITES.iter().map(|s| site(s)).collect(),
            regions: REGIONS.iter().map(|r| region(r)).collect(),
            gateways: GATEWAYS.iter().map(|g| g.parse().unwrap()).collect(),
        };
        let policy = Policy::new(rules.clone(), groups.clone(), backends).unwrap();
        let (from, to) = (end(&ids, from), end(&ids, to));
        prop_assert_eq!(
            policy.check(&from, &to, traffic),
            naive_check(&rules, &groups, backends, &from, &to, traffic)
        );
    }
}

#[test]
fn a_flow_to_ask_about_opens_like_its_first_packet() {
    let first = |text: &str| Traffic::opening(&text.parse().unwrap());
    assert_eq!(
        first("tcp/443"),
        Some(Traffic::Tcp {
            src: 49152,
            dst: 443,
            opens: true
        })
    );
    assert_eq!(
        first("udp/53"),
        Some(Traffic::Udp {
            src: 49152,
            dst: 53
        })
    );
    assert_eq!(first("icmp"), Some(Traffic::Icmp { answer: false }));
    assert_eq!(first("any"), Some(Traffic::Other));
    assert_eq!(first("tcp"), None, "a TCP flow to ask about needs a port");
}
