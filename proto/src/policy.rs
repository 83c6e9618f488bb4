//! Who may reach whom: the access policy between sites, their LANs and the
//! backends behind gateways.
//!
//! A policy is a list of **allow** rules and one setting for backends;
//! everything else is denied. Rules name identities, not addresses:
//!
//! | selector | matches |
//! |---|---|
//! | `sites` | every site's own overlay address |
//! | `site:<id>` | that site's own address |
//! | `group:<name>` | the sites the policy's group lists |
//! | `region:<name>` | the sites of that region |
//! | `lan-of:<site selector>` | the mapped LANs behind those sites |
//! | `gateways` | everything behind any gateway |
//! | `gateway:<id>` | everything behind that gateway |
//! | `prefix:<cidr>` | backend addresses (behind a gateway) in that prefix |
//!
//! and a rule may narrow the traffic with `ports`: `tcp/443`,
//! `tcp/8000-8100`, `udp/53`, `tcp` (every TCP port), `icmp`, or `any`.
//!
//! **Between sites, the default is deny.** Between backends and sites,
//! [`Backends::Region`] (the default) allows both directions wherever data
//! residency does (the sites of the gateway's region, and regions the
//! residency settings open), as tether always has; [`Backends::Rules`]
//! leaves them to the rules too. Residency is checked before the policy
//! and no rule overrides it.
//!
//! **Replies** pass without state: a packet is a reply of an allowed flow
//! when some rule allows the opposite direction with the packet's source
//! port, and it cannot open a connection (a TCP segment other than a bare
//! SYN; UDP from the allowed port; ICMP echo replies and errors). The
//! brokers keep no connection table because the two directions of one
//! flow may cross different brokers (each site's packets enter at the
//! broker that holds its session); the price, as with any stateless
//! filter, is that a UDP packet from an allowed port is taken for a
//! reply.
//!
//! Evaluation indexes the rules by the pair of ends they name (see
//! [`Policy`]), so its cost grows with the rules that name both ends of a
//! packet, not with the whole list; the first matching rule (in file
//! order) is the one reported.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::str::FromStr;

use ipnet::IpNet;
use rustc_hash::FxHashMap;
use thiserror::Error;

use crate::ids::{GatewayId, RegionId, SiteId};
use crate::ip::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Packet};

/// Which sites a selector names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Sites {
    /// Every site.
    All,
    /// One site.
    Site(SiteId),
    /// The sites of a group of the policy.
    Group(String),
    /// The sites of a region.
    Region(RegionId),
}

/// One side of a rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector {
    /// The sites' own overlay addresses.
    Sites(Sites),
    /// The mapped LANs behind the sites.
    LanOf(Sites),
    /// Everything behind every gateway.
    Gateways,
    /// Everything behind one gateway.
    Gateway(GatewayId),
    /// Backend addresses in a prefix.
    Prefix(IpNet),
}

/// A selector that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "{text:?} is not a selector: {problem} (write sites, site:<id>, group:<name>, region:<name>, lan-of:<one of those>, gateways, gateway:<id> or prefix:<cidr>)"
)]
pub struct SelectorError {
    /// The text.
    pub text: String,
    /// What is wrong.
    pub problem: String,
}

impl FromStr for Sites {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, SelectorError> {
        let err = |problem: String| SelectorError {
            text: s.to_string(),
            problem,
        };
        if s == "sites" {
            return Ok(Sites::All);
        }
        let (kind, value) = s
            .split_once(':')
            .ok_or_else(|| err("no kind before ':'".into()))?;
        match kind {
            "site" => value
                .parse()
                .map(Sites::Site)
                .map_err(|e| err(format!("{e}"))),
            "group" => {
                if value.is_empty() {
                    Err(err("the group name is empty".into()))
                } else {
                    Ok(Sites::Group(value.to_string()))
                }
            }
            "region" => value
                .parse()
                .map(Sites::Region)
                .map_err(|e| err(format!("{e}"))),
            other => Err(err(format!("{other:?} does not name sites"))),
        }
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, SelectorError> {
        let err = |problem: String| SelectorError {
            text: s.to_string(),
            problem,
        };
        if s == "gateways" {
            return Ok(Selector::Gateways);
        }
        if let Some(inner) = s.strip_prefix("lan-of:") {
            return inner
                .parse()
                .map(Selector::LanOf)
                .map_err(|e| err(e.problem));
        }
        if let Some(id) = s.strip_prefix("gateway:") {
            return id
                .parse()
                .map(Selector::Gateway)
                .map_err(|e| err(format!("{e}")));
        }
        if let Some(prefix) = s.strip_prefix("prefix:") {
            return prefix
                .parse::<IpNet>()
                .map(|p| Selector::Prefix(p.trunc()))
                .map_err(|e| err(format!("{e}")));
        }
        s.parse().map(Selector::Sites)
    }
}

impl fmt::Display for Sites {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sites::All => f.write_str("sites"),
            Sites::Site(s) => write!(f, "site:{s}"),
            Sites::Group(g) => write!(f, "group:{g}"),
            Sites::Region(r) => write!(f, "region:{r}"),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Sites(s) => s.fmt(f),
            Selector::LanOf(s) => write!(f, "lan-of:{s}"),
            Selector::Gateways => f.write_str("gateways"),
            Selector::Gateway(g) => write!(f, "gateway:{g}"),
            Selector::Prefix(p) => write!(f, "prefix:{p}"),
        }
    }
}

/// A protocol a rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Any protocol.
    Any,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP or ICMPv6.
    Icmp,
}

/// Traffic a rule allows: a protocol and, for TCP and UDP, destination
/// ports.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ports {
    /// The protocol.
    pub protocol: Protocol,
    /// The destination ports (TCP and UDP only); `None` is every port.
    pub ports: Option<RangeInclusive<u16>>,
}

/// A port specification that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "{text:?} is not a port specification: {problem} (write tcp/443, tcp/8000-8100, udp/53, tcp, udp, icmp or any)"
)]
pub struct PortsError {
    /// The text.
    pub text: String,
    /// What is wrong.
    pub problem: String,
}

impl FromStr for Ports {
    type Err = PortsError;
    fn from_str(s: &str) -> Result<Self, PortsError> {
        let err = |problem: &str| PortsError {
            text: s.to_string(),
            problem: problem.to_string(),
        };
        let (protocol, ports) = match s.split_once('/') {
            Some((p, ports)) => (p, Some(ports)),
            None => (s, None),
        };
        let protocol = match protocol {
            "any" => Protocol::Any,
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "icmp" => Protocol::Icmp,
            _ => return Err(err("the protocol is none of tcp, udp, icmp, any")),
        };
        let ports = match ports {
            None => None,
            Some(_) if !matches!(protocol, Protocol::Tcp | Protocol::Udp) => {
                return Err(err("only tcp and udp have ports"));
            }
            Some(text) => {
                let (lo, hi) = text.split_once('-').unwrap_or((text, text));
                let lo: u16 = lo.parse().map_err(|_| err("a port is 1-65535"))?;
                let hi: u16 = hi.parse().map_err(|_| err("a port is 1-65535"))?;
                if lo == 0 || hi < lo {
                    return Err(err("a range is low-high with 1 <= low <= high"));
                }
                Some(lo..=hi)
            }
        };
        Ok(Ports { protocol, ports })
    }
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = match self.protocol {
            Protocol::Any => "any",
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        };
        match &self.ports {
            None => f.write_str(p),
            Some(r) if r.start() == r.end() => write!(f, "{p}/{}", r.start()),
            Some(r) => write!(f, "{p}/{}-{}", r.start(), r.end()),
        }
    }
}

/// One allow rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Its name, shown by `tether trace` and counted in metrics.
    pub name: String,
    /// Where the traffic comes from (any of these).
    pub from: Vec<Selector>,
    /// Where it goes (any of these).
    pub to: Vec<Selector>,
    /// What it may be; empty is anything.
    pub ports: Vec<Ports>,
}

/// Backends and sites.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backends {
    /// Allowed both ways wherever residency allows (the sites of the
    /// gateway's region), as without a policy.
    #[default]
    Region,
    /// Only what the rules allow.
    Rules,
}

/// A policy that cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PolicyError {
    /// A rule names a group the policy does not define.
    #[error(
        "rule {rule:?} names group {group:?}, which is not defined (add it under [policy.groups])"
    )]
    UnknownGroup {
        /// The rule.
        rule: String,
        /// The group.
        group: String,
    },
    /// Two rules share a name.
    #[error("two rules are named {0:?}; give each rule its own name")]
    DuplicateName(String),
    /// A rule has no source or no destination.
    #[error("rule {0:?} needs at least one entry in from and in to")]
    Empty(String),
}

/// One end of a flow as the broker knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Party<'a> {
    /// A site: its own address (`lan` false) or a host on one of its
    /// mapped LANs.
    Site {
        /// The site.
        site: &'a SiteId,
        /// Its region.
        region: &'a RegionId,
        /// Whether the address is on a mapped LAN.
        lan: bool,
    },
    /// A backend behind a gateway.
    Gateway {
        /// The gateway.
        gateway: &'a GatewayId,
        /// Its region.
        region: &'a RegionId,
    },
}

/// One end of a flow: who, and which address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct End<'a> {
    /// Who.
    pub party: Party<'a>,
    /// The address on the packet.
    pub addr: IpAddr,
}

/// What a packet carries, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    /// TCP; `opens` for a SYN without ACK.
    Tcp {
        /// Source port.
        src: u16,
        /// Destination port.
        dst: u16,
        /// Whether it opens a connection.
        opens: bool,
    },
    /// UDP.
    Udp {
        /// Source port.
        src: u16,
        /// Destination port.
        dst: u16,
    },
    /// ICMP or ICMPv6; `answer` for echo replies and errors.
    Icmp {
        /// Whether it answers something (echo reply, error).
        answer: bool,
    },
    /// Another protocol, or a later fragment.
    Other,
}

impl Traffic {
    /// The first packet of a flow `ports` describes (a TCP SYN, a UDP
    /// datagram, an echo request; any other protocol for `any`), for
    /// asking the policy about a flow before it exists. `None` when a TCP
    /// or UDP specification names no port.
    pub fn opening(ports: &Ports) -> Option<Self> {
        let port = ports.ports.as_ref().map(|r| *r.start());
        Some(match (ports.protocol, port) {
            (Protocol::Tcp, Some(dst)) => Traffic::Tcp {
                src: 49152,
                dst,
                opens: true,
            },
            (Protocol::Udp, Some(dst)) => Traffic::Udp { src: 49152, dst },
            (Protocol::Tcp | Protocol::Udp, None) => return None,
            (Protocol::Icmp, _) => Traffic::Icmp { answer: false },
            (Protocol::Any, _) => Traffic::Other,
        })
    }

    /// What `packet` carries. A later fragment has no ports: it is
    /// [`Traffic::Other`], allowed only by rules without ports.
    pub fn of(packet: &Packet<'_>) -> Self {
        let l4 = packet.bytes.get(packet.header_len..).unwrap_or_default();
        if packet.later_fragment {
            return Traffic::Other;
        }
        let ports = || {
            let src = u16::from_be_bytes([*l4.first()?, *l4.get(1)?]);
            let dst = u16::from_be_bytes([*l4.get(2)?, *l4.get(3)?]);
            Some((src, dst))
        };
        match packet.protocol {
            PROTO_TCP => match (ports(), l4.get(13)) {
                (Some((src, dst)), Some(&flags)) => Traffic::Tcp {
                    src,
                    dst,
                    opens: flags & 0x12 == 0x02,
                },
                _ => Traffic::Other,
            },
            PROTO_UDP => match ports() {
                Some((src, dst)) => Traffic::Udp { src, dst },
                None => Traffic::Other,
            },
            PROTO_ICMP | PROTO_ICMPV6 => Traffic::Icmp {
                answer: packet.is_icmp_error()
                    || matches!(
                        (packet.protocol, l4.first()),
                        (PROTO_ICMP, Some(0)) | (PROTO_ICMPV6, Some(129))
                    ),
            },
            _ => Traffic::Other,
        }
    }
}

/// Why a flow passes or not; a rule is named by borrowing from the policy,
/// so a check allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// A rule allows it.
    Rule(&'a str),
    /// It answers a flow a rule allows.
    Reply(&'a str),
    /// Backends and sites residency lets meet ([`Backends::Region`]).
    BackendsOfRegion,
    /// Neither end is a site: not the policy's business.
    NotSites,
    /// Nothing allows it.
    Denied,
}

impl Verdict<'_> {
    /// Whether the packet may pass.
    pub fn allows(&self) -> bool {
        !matches!(self, Verdict::Denied)
    }
}

impl fmt::Display for Verdict<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Rule(r) => write!(f, "allowed by rule {r:?}"),
            Verdict::Reply(r) => write!(f, "allowed as a reply to rule {r:?}"),
            Verdict::BackendsOfRegion => f.write_str(
                "allowed: backends and the sites of their region (policy.backends = \"region\")",
            ),
            Verdict::NotSites => f.write_str("allowed: no site involved"),
            Verdict::Denied => {
                f.write_str("denied: no rule allows it (default deny between sites)")
            }
        }
    }
}

/// Which kind of end a key names: a site's own address, a site's LAN, or
/// what is behind a gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Site = 0,
    Lan = 1,
    Gateway = 2,
}

/// Key kinds.
const ALL: u64 = 0;
const SITE: u64 = 1;
const GROUP: u64 = 2;
const REGION: u64 = 3;
const GATEWAY: u64 = 4;
const PREFIX: u64 = 5;

/// An index key: what a selector names, as a number.
fn key(kind: u64, source: Source, id: u32) -> u64 {
    kind << 40 | (source as u64) << 32 | u64::from(id)
}

/// A compiled policy.
///
/// Every rule is indexed under each pair of (a key of one of its sources, a
/// key of one of its destinations); a key names every site, one site, a
/// group, a region, every gateway or one gateway. A check looks up the
/// pairs of the packet's two ends (each end has a handful of keys: all,
/// itself, its region, its groups), so it tries only rules that name both
/// ends, however long the list.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<Rule>,
    backends: Backends,
    /// Group name → its sites.
    groups: HashMap<String, HashSet<SiteId>>,
    site_ids: FxHashMap<String, u32>,
    gateway_ids: FxHashMap<String, u32>,
    region_ids: FxHashMap<RegionId, u32>,
    group_ids: FxHashMap<String, u32>,
    /// Site number → the groups it is in.
    groups_of: FxHashMap<u32, Vec<u32>>,
    /// Whether any rule names site LANs.
    names_lans: bool,
    /// Source key → destination key → rules naming both, ascending.
    pairs: FxHashMap<u64, FxHashMap<u64, Vec<u32>>>,
}

fn intern<K: std::hash::Hash + Eq>(map: &mut FxHashMap<K, u32>, k: K) -> u32 {
    let next = u32::try_from(map.len()).unwrap_or(u32::MAX);
    *map.entry(k).or_insert(next)
}

impl Policy {
    /// Compiles `rules` with `groups`.
    pub fn new(
        rules: Vec<Rule>,
        groups: HashMap<String, HashSet<SiteId>>,
        backends: Backends,
    ) -> Result<Self, PolicyError> {
        let mut names = HashSet::new();
        let mut policy = Policy {
            backends,
            ..Policy::default()
        };
        for (name, members) in &groups {
            let g = intern(&mut policy.group_ids, name.clone());
            for m in members {
                let s = intern(&mut policy.site_ids, m.to_string());
                policy.groups_of.entry(s).or_default().push(g);
            }
        }
        policy.groups = groups;
        for (index, rule) in rules.iter().enumerate() {
            if !names.insert(rule.name.as_str()) {
                return Err(PolicyError::DuplicateName(rule.name.clone()));
            }
            if rule.from.is_empty() || rule.to.is_empty() {
                return Err(PolicyError::Empty(rule.name.clone()));
            }
            for selector in rule.from.iter().chain(&rule.to) {
                if let Selector::Sites(Sites::Group(g)) | Selector::LanOf(Sites::Group(g)) =
                    selector
                    && !policy.groups.contains_key(g)
                {
                    return Err(PolicyError::UnknownGroup {
                        rule: rule.name.clone(),
                        group: g.clone(),
                    });
                }
            }
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            let from: Vec<u64> = rule.from.iter().map(|s| policy.selector_key(s)).collect();
            let to: Vec<u64> = rule.to.iter().map(|s| policy.selector_key(s)).collect();
            for &f in &from {
                for &t in &to {
                    let list = policy.pairs.entry(f).or_default().entry(t).or_default();
                    if list.last() != Some(&index) {
                        list.push(index);
                    }
                }
            }
        }
        policy.names_lans = rules
            .iter()
            .flat_map(|r| r.from.iter().chain(&r.to))
            .any(|s| matches!(s, Selector::LanOf(_)));
        policy.rules = rules;
        Ok(policy)
    }

    /// The key of what `selector` names.
    fn selector_key(&mut self, selector: &Selector) -> u64 {
        let (source, sites) = match selector {
            Selector::Sites(s) => (Source::Site, s),
            Selector::LanOf(s) => (Source::Lan, s),
            // One key for every prefix: the address is checked against
            // the rule's prefixes once the rule is found.
            Selector::Gateways => return key(ALL, Source::Gateway, 0),
            Selector::Prefix(_) => return key(PREFIX, Source::Gateway, 0),
            Selector::Gateway(g) => {
                return key(
                    GATEWAY,
                    Source::Gateway,
                    intern(&mut self.gateway_ids, g.to_string()),
                );
            }
        };
        match sites {
            Sites::All => key(ALL, source, 0),
            Sites::Site(s) => key(SITE, source, intern(&mut self.site_ids, s.to_string())),
            Sites::Group(g) => key(GROUP, source, intern(&mut self.group_ids, g.clone())),
            Sites::Region(r) => key(REGION, source, intern(&mut self.region_ids, r.clone())),
        }
    }

    /// Calls `f` with every key naming `end`.
    fn end_keys(&self, end: &End<'_>, mut f: impl FnMut(u64)) {
        match end.party {
            Party::Site { site, region, lan } => {
                let source = if lan { Source::Lan } else { Source::Site };
                f(key(ALL, source, 0));
                if let Some(&r) = self.region_ids.get(region) {
                    f(key(REGION, source, r));
                }
                if let Some(&s) = self.site_ids.get(site.as_str()) {
                    f(key(SITE, source, s));
                    for &g in self.groups_of.get(&s).into_iter().flatten() {
                        f(key(GROUP, source, g));
                    }
                }
            }
            Party::Gateway { gateway, .. } => {
                f(key(ALL, Source::Gateway, 0));
                f(key(PREFIX, Source::Gateway, 0));
                if let Some(&g) = self.gateway_ids.get(gateway.as_str()) {
                    f(key(GATEWAY, Source::Gateway, g));
                }
            }
        }
    }

    /// Whether a rule names site LANs (so the router must tell a site's
    /// LAN hosts from the site itself).
    pub fn names_lans(&self) -> bool {
        self.names_lans
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The backends setting.
    pub fn backends(&self) -> Backends {
        self.backends
    }

    /// The groups.
    pub fn groups(&self) -> &HashMap<String, HashSet<SiteId>> {
        &self.groups
    }

    /// Whether `sites` names the site `site` of `region`.
    fn names_site(&self, sites: &Sites, site: &SiteId, region: &RegionId) -> bool {
        match sites {
            Sites::All => true,
            Sites::Site(s) => s == site,
            Sites::Group(g) => self.groups.get(g).is_some_and(|m| m.contains(site)),
            Sites::Region(r) => r == region,
        }
    }

    /// Whether `selector` names the end `end`.
    pub fn selects(&self, selector: &Selector, end: &End<'_>) -> bool {
        match (selector, end.party) {
            (Selector::Sites(s), Party::Site { site, region, lan }) => {
                !lan && self.names_site(s, site, region)
            }
            (Selector::LanOf(s), Party::Site { site, region, lan }) => {
                lan && self.names_site(s, site, region)
            }
            (Selector::Gateways, Party::Gateway { .. }) => true,
            (Selector::Gateway(g), Party::Gateway { gateway, .. }) => g == gateway,
            (Selector::Prefix(p), Party::Gateway { .. }) => p.contains(&end.addr),
            _ => false,
        }
    }

    /// Whether `rule` allows `traffic`, or (`reply`) allows `traffic` as an
    /// answer to what the rule allows; the ends are checked by the index.
    fn traffic_allows(rule: &Rule, traffic: Traffic, reply: bool) -> bool {
        // No ports: any traffic, like `any`.
        let opens = matches!(traffic, Traffic::Tcp { opens: true, .. });
        if rule.ports.is_empty() {
            return !(reply && opens);
        }
        rule.ports.iter().any(|p| match (p.protocol, traffic) {
            (Protocol::Any, _) => !(reply && opens),
            (Protocol::Tcp, Traffic::Tcp { src, dst, opens }) => {
                let port = if reply { src } else { dst };
                !(reply && opens) && p.ports.as_ref().is_none_or(|r| r.contains(&port))
            }
            (Protocol::Udp, Traffic::Udp { src, dst }) => {
                let port = if reply { src } else { dst };
                p.ports.as_ref().is_none_or(|r| r.contains(&port))
            }
            (Protocol::Icmp, Traffic::Icmp { answer }) => !reply || answer,
            // An ICMP error about an allowed TCP or UDP flow.
            (Protocol::Tcp | Protocol::Udp, Traffic::Icmp { answer }) => reply && answer,
            _ => false,
        })
    }

    /// The first rule (in file order) allowing `from` → `to` (or, for a
    /// reply, `to` → `from`).
    fn first_rule(
        &self,
        from: &End<'_>,
        to: &End<'_>,
        traffic: Traffic,
        reply: bool,
    ) -> Option<&Rule> {
        let (source, dest) = if reply { (to, from) } else { (from, to) };
        let mut best: Option<u32> = None;
        self.end_keys(source, |f| {
            // Most keys of an end name no rule's source: one lookup skips
            // them.
            let Some(by_dest) = self.pairs.get(&f) else {
                return;
            };
            self.end_keys(dest, |t| {
                for &i in by_dest.get(&t).into_iter().flatten() {
                    if best.is_some_and(|b| i >= b) {
                        break;
                    }
                    let rule = &self.rules[i as usize];
                    // The keys matched the ends, but a prefix key stands
                    // for every backend: the address must be in one.
                    let in_prefix = |selectors: &[Selector], end: &End<'_>| {
                        selectors
                            .iter()
                            .any(|s| matches!(s, Selector::Prefix(p) if p.contains(&end.addr)))
                    };
                    if (f >> 40 == PREFIX && !in_prefix(&rule.from, source))
                        || (t >> 40 == PREFIX && !in_prefix(&rule.to, dest))
                    {
                        continue;
                    }
                    if Self::traffic_allows(rule, traffic, reply) {
                        best = Some(i);
                        break;
                    }
                }
            })
        });
        best.map(|i| &self.rules[i as usize])
    }

    /// Whether a packet from `from` to `to` carrying `traffic` may pass,
    /// and why.
    pub fn check(&self, from: &End<'_>, to: &End<'_>, traffic: Traffic) -> Verdict<'_> {
        let sites = match (from.party, to.party) {
            (Party::Gateway { .. }, Party::Gateway { .. }) => return Verdict::NotSites,
            (Party::Site { .. }, Party::Site { .. }) => true,
            _ => false,
        };
        if let Some(rule) = self.first_rule(from, to, traffic, false) {
            return Verdict::Rule(&rule.name);
        }
        if !sites && self.backends == Backends::Region {
            return Verdict::BackendsOfRegion;
        }
        if let Some(rule) = self.first_rule(from, to, traffic, true) {
            return Verdict::Reply(&rule.name);
        }
        Verdict::Denied
    }
}

#[cfg(test)]
mod tests;
