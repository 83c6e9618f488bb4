//! The mesh zone: sites by name.
//!
//! Backends reach a site as `<site>.<region>.<zone>` (A/AAAA of its overlay
//! addresses), the TCP services it announces as
//! `_<service>._tcp.<site>.<region>.<zone>` (SRV), and see the name of an
//! overlay address with PTR in the reverse zones of the pools. A host on a
//! hospital LAN mapped into the overlay ([`crate::netmap`]) is
//! `<its LAN address, dashes for dots or colons>.lan.<site>.<region>.<zone>`
//! (e.g. `192-168-1-20.lan.hospital-a.eu.tether.internal`, A of the mapped
//! address), the mapped address has PTR to that name, and
//! `lan.<site>.<region>.<zone>` lists the site's mappings in TXT. The zone
//! apex has SOA and NS records; names that do not exist in the zone are
//! NXDOMAIN, names outside every zone this server holds are REFUSED (it
//! never recurses).
//!
//! [`ZoneData`] is what the broker knows (sites, addresses, services,
//! pools); it has a compact binary encoding so that the broker can hand a
//! copy to its gateways ([`crate::gateway`]). [`Zone`] is the indexed form a
//! server answers from: [`Zone::answer`] is a pure function from a question
//! to an [`Answer`], which the DNS shells (hickory-server) send back.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::ops::Bound;
use std::sync::Arc;

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use ipnet::IpNet;
use thiserror::Error;

use crate::ids::{RegionId, ServiceName, SiteId};
use crate::netmap::Mapping;

/// The zone when none is configured.
pub const DEFAULT_ZONE: &str = "tether.internal";
/// TTL of every record, and the negative-caching time, when none is
/// configured: short, so that caches follow enrollment and revocation.
pub const DEFAULT_TTL: u32 = 5;

/// The encoding with LAN mappings; [`MAGIC_V1`] (without) is still read.
const MAGIC: &[u8; 3] = b"TZ2";
const MAGIC_V1: &[u8; 3] = b"TZ1";
/// The label under a site that holds the names of its LAN hosts.
pub const LAN_LABEL: &str = "lan";
const REFRESH: i32 = 3600;
const RETRY: i32 = 600;
const EXPIRE: i32 = 86_400;

/// A TCP service a site announces.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Service {
    /// Its name (the SRV `_<name>._tcp` label).
    pub name: ServiceName,
    /// The TCP port on the site's overlay address.
    pub port: u16,
}

impl Service {
    /// Parses `name=port`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (name, port) = text
            .trim()
            .split_once('=')
            .ok_or_else(|| format!("{text:?} is not name=port"))?;
        let name = ServiceName::new(name.trim()).map_err(|e| e.to_string())?;
        let port = port
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{port:?} is not a TCP port (1-65535)"))?;
        Ok(Self { name, port })
    }

    /// Parses a comma-separated list of `name=port`.
    pub fn parse_list(text: &str) -> Result<Vec<Self>, String> {
        let mut out: Vec<Self> = text
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(Self::parse)
            .collect::<Result<_, _>>()?;
        out.sort();
        out.dedup_by(|a, b| a.name == b.name);
        Ok(out)
    }

    /// The list as `name=port,name=port`.
    pub fn format_list(services: &[Self]) -> String {
        services
            .iter()
            .map(|s| format!("{}={}", s.name, s.port))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The names of one site.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SiteNames {
    /// The site.
    pub site: SiteId,
    /// Its region.
    pub region: RegionId,
    /// Its overlay addresses (A/AAAA and PTR).
    pub addresses: Vec<IpAddr>,
    /// The services it announces now (SRV).
    pub services: Vec<Service>,
    /// The hospital LANs behind it and the prefixes they are mapped to.
    #[cfg_attr(feature = "serde", serde(default))]
    pub lans: Vec<Mapping>,
}

/// Everything the mesh zone holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneData {
    /// The zone, lowercase, without the trailing dot (e.g. `tether.internal`).
    pub zone: String,
    /// The SOA serial; increases with every change.
    pub serial: u32,
    /// TTL of every record and of negative answers.
    pub ttl: u32,
    /// Prefixes whose reverse names (PTR) this zone answers for: the pools.
    pub reverse: Vec<IpNet>,
    /// The sites, sorted.
    pub sites: Vec<SiteNames>,
}

/// Why a zone could not be built or decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ZoneError {
    /// The zone name is not a DNS name.
    #[error("zone {0:?} is not a valid DNS name")]
    BadZone(String),
    /// Not a zone encoding.
    #[error("not a tether zone encoding")]
    NotZone,
    /// Cut short or inconsistent.
    #[error("malformed zone encoding: {0}")]
    Malformed(&'static str),
}

/// `<site>.<region>.<zone>` without the trailing dot.
pub fn site_name(site: &SiteId, region: &RegionId, zone: &str) -> String {
    format!("{site}.{region}.{zone}")
}

impl ZoneData {
    /// An empty zone.
    pub fn empty(zone: &str, ttl: u32, reverse: Vec<IpNet>) -> Self {
        Self {
            zone: zone.trim_end_matches('.').to_ascii_lowercase(),
            serial: 0,
            ttl,
            reverse,
            sites: Vec::new(),
        }
    }

    /// A copy holding only the sites whose region `keep` accepts (the
    /// copy a gateway of another region may see).
    pub fn filtered(&self, mut keep: impl FnMut(&RegionId) -> bool) -> Self {
        Self {
            sites: self
                .sites
                .iter()
                .filter(|s| keep(&s.region))
                .cloned()
                .collect(),
            ..self.clone()
        }
    }

    /// The site a name denotes, as [`Zone::site`] finds it, without
    /// indexing the zone (the sites must be sorted, as the broker keeps
    /// them).
    pub fn site(&self, name: &str) -> Option<&SiteNames> {
        find_site(&self.sites, &fqdn(&self.zone).ok()?, name)
    }

    /// Whether `other` holds the same names (the serial aside).
    pub fn same_names(&self, other: &Self) -> bool {
        self.zone == other.zone
            && self.ttl == other.ttl
            && self.reverse == other.reverse
            && self.sites == other.sites
    }

    /// The binary encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.sites.len() * 48);
        out.extend_from_slice(MAGIC);
        put_str(&mut out, &self.zone);
        out.extend_from_slice(&self.serial.to_be_bytes());
        out.extend_from_slice(&self.ttl.to_be_bytes());
        out.extend_from_slice(&(self.reverse.len().min(u16::MAX as usize) as u16).to_be_bytes());
        for p in self.reverse.iter().take(u16::MAX as usize) {
            put_addr(&mut out, p.addr());
            out.push(p.prefix_len());
        }
        out.extend_from_slice(&(self.sites.len() as u32).to_be_bytes());
        for s in &self.sites {
            put_str(&mut out, s.site.as_str());
            put_str(&mut out, s.region.as_str());
            out.push(s.addresses.len().min(255) as u8);
            for a in s.addresses.iter().take(255) {
                put_addr(&mut out, *a);
            }
            out.push(s.services.len().min(255) as u8);
            for svc in s.services.iter().take(255) {
                put_str(&mut out, svc.name.as_str());
                out.extend_from_slice(&svc.port.to_be_bytes());
            }
            out.push(s.lans.len().min(255) as u8);
            for m in s.lans.iter().take(255) {
                for p in [m.real, m.mapped] {
                    put_addr(&mut out, p.addr());
                    out.push(p.prefix_len());
                }
            }
        }
        out
    }

    /// Parses [`ZoneData::encode`]'s output.
    pub fn decode(bytes: &[u8]) -> Result<Self, ZoneError> {
        let mut r = Reader(bytes);
        let with_lans = match r.take(3) {
            Ok(m) if m == MAGIC => true,
            Ok(m) if m == MAGIC_V1 => false,
            _ => return Err(ZoneError::NotZone),
        };
        let zone = r.string("zone")?;
        if Name::from_ascii(&zone).is_err() || zone.is_empty() {
            return Err(ZoneError::Malformed("zone name"));
        }
        let serial = r.u32()?;
        let ttl = r.u32()?;
        let n = usize::from(r.u16()?);
        let mut reverse = Vec::with_capacity(n);
        for _ in 0..n {
            reverse.push(r.prefix()?);
        }
        let n = r.u32()? as usize;
        let mut sites = Vec::with_capacity(n.min(bytes.len() / 8));
        for _ in 0..n {
            let site = SiteId::new(r.string("site")?).map_err(|_| ZoneError::Malformed("site"))?;
            let region =
                RegionId::new(r.string("region")?).map_err(|_| ZoneError::Malformed("region"))?;
            let mut addresses = Vec::new();
            for _ in 0..r.u8()? {
                addresses.push(r.addr()?);
            }
            let mut services = Vec::new();
            for _ in 0..r.u8()? {
                let name = ServiceName::new(r.string("service")?)
                    .map_err(|_| ZoneError::Malformed("service"))?;
                let port = r.u16()?;
                services.push(Service { name, port });
            }
            let mut lans = Vec::new();
            if with_lans {
                for _ in 0..r.u8()? {
                    let (real, mapped) = (r.prefix()?, r.prefix()?);
                    lans.push(
                        Mapping::new(real, mapped)
                            .map_err(|_| ZoneError::Malformed("LAN mapping"))?,
                    );
                }
            }
            sites.push(SiteNames {
                site,
                region,
                addresses,
                services,
                lans,
            });
        }
        if !r.0.is_empty() {
            return Err(ZoneError::Malformed("trailing bytes"));
        }
        Ok(Self {
            zone,
            serial,
            ttl,
            reverse,
            sites,
        })
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let s = &s.as_bytes()[..s.len().min(255)];
    out.push(s.len() as u8);
    out.extend_from_slice(s);
}

fn put_addr(out: &mut Vec<u8>, a: IpAddr) {
    match a {
        IpAddr::V4(a) => {
            out.push(4);
            out.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out.push(6);
            out.extend_from_slice(&a.octets());
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ZoneError> {
        if self.0.len() < n {
            return Err(ZoneError::Malformed("cut short"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, ZoneError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ZoneError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, ZoneError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self, what: &'static str) -> Result<String, ZoneError> {
        let n = usize::from(self.u8()?);
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| ZoneError::Malformed(what))
    }
    fn prefix(&mut self) -> Result<IpNet, ZoneError> {
        let addr = self.addr()?;
        let len = self.u8()?;
        IpNet::new(addr, len).map_err(|_| ZoneError::Malformed("prefix length"))
    }
    fn addr(&mut self) -> Result<IpAddr, ZoneError> {
        match self.u8()? {
            4 => {
                let b: [u8; 4] = self.take(4)?.try_into().unwrap_or_default();
                Ok(IpAddr::from(b))
            }
            6 => {
                let b: [u8; 16] = self.take(16)?.try_into().unwrap_or_default();
                Ok(IpAddr::from(b))
            }
            _ => Err(ZoneError::Malformed("address family")),
        }
    }
}

/// What a server sends back for one question.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The response code.
    pub code: ResponseCode,
    /// Whether the answer is authoritative (every answer from inside a
    /// zone).
    pub authoritative: bool,
    /// Answer section.
    pub answers: Vec<Record>,
    /// Authority section (the SOA of negative answers).
    pub authority: Vec<Record>,
    /// Additional section (addresses of SRV and NS targets).
    pub additionals: Vec<Record>,
}

impl Answer {
    fn refused() -> Self {
        Self {
            code: ResponseCode::Refused,
            authoritative: false,
            answers: Vec::new(),
            authority: Vec::new(),
            additionals: Vec::new(),
        }
    }
}

/// The zone indexed for answering.
///
/// A zone follows new [`ZoneData`] incrementally ([`Zone::plan`] and
/// [`Zone::apply`], or [`Zone::update`]): only the records of sites that
/// differ are removed and added, so a site that connects or leaves costs
/// the same in a zone of 50 sites as in one of 50,000 (finding the sites
/// that differ compares the two site lists, which needs no DNS names).
#[derive(Debug, Clone)]
pub struct Zone {
    data: Arc<ZoneData>,
    origin: Name,
    /// The addresses published as `ns.<zone>`.
    ns_addresses: Vec<IpAddr>,
    /// Every owner name and its records; empty non-terminals are not
    /// stored (they are found as names with descendants).
    records: BTreeMap<Name, Vec<Record>>,
    /// Zone apexes (the forward zone and the reverse zones), longest
    /// first.
    apexes: Vec<Name>,
    /// LAN mappings by the first address of the mapped prefix: the site
    /// (site and region) and the mapping. Mapped prefixes come from the
    /// pools and never overlap; where data maps two LANs onto one prefix
    /// anyway, each keeps its entry, in the order of the sites and of
    /// their mappings, and the last one answers, whatever order the sites
    /// were added and removed in.
    lans: BTreeMap<IpAddr, Vec<(SiteId, RegionId, Mapping)>>,
}

/// How a [`Zone`] gets to new [`ZoneData`] ([`Zone::plan`]).
#[derive(Debug, Clone)]
pub enum ZoneUpdate {
    /// Index everything again: the zone's name, TTL or pools changed, or
    /// the new sites are not in order.
    Rebuild(Arc<ZoneData>),
    /// Replace the records of the sites that differ.
    Sites {
        /// The new data.
        data: Arc<ZoneData>,
        /// Positions, in the zone's current sites, of those that are gone
        /// or changed.
        removed: Vec<usize>,
        /// Positions, in the new sites, of those that are new or changed.
        added: Vec<usize>,
    },
}

/// What [`Zone::apply`] did: a count of the work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reindexed {
    /// Whether every record was indexed again.
    pub rebuilt: bool,
    /// Sites whose records were removed or added (a changed site counts
    /// twice).
    pub sites: usize,
    /// Records of sites removed or added (the apexes' SOA aside).
    pub records: usize,
}

/// The site `name` denotes in `sites` (sorted) under `origin`:
/// `<site>.<region>.<zone>` with or without the trailing dot, or
/// `<site>.<region>` relative to the zone.
fn find_site<'a>(sites: &'a [SiteNames], origin: &Name, name: &str) -> Option<&'a SiteNames> {
    let name = fqdn(name).ok()?;
    let name = if origin.zone_of(&name) {
        name
    } else {
        let mut relative = name;
        relative.set_fqdn(false);
        relative.append_domain(origin).ok()?
    };
    site_named(sites, origin, &name)
}

/// The site whose name is `name` (lowercase, fully qualified): its first
/// two labels are the site and the region, found in the sorted `sites`.
/// (A name too long for DNS never parses, so it never gets here.)
fn site_named<'a>(sites: &'a [SiteNames], origin: &Name, name: &Name) -> Option<&'a SiteNames> {
    if name.num_labels() != origin.num_labels() + 2 || !origin.zone_of(name) {
        return None;
    }
    let mut labels = name.iter();
    let site = std::str::from_utf8(labels.next()?).ok()?;
    let region = std::str::from_utf8(labels.next()?).ok()?;
    let i = sites
        .binary_search_by(|s| site_key(s).cmp(&(site, region)))
        .ok()?;
    sites.get(i)
}

/// A site's place in the sorted site list.
fn site_key(s: &SiteNames) -> (&str, &str) {
    (s.site.as_str(), s.region.as_str())
}

fn fqdn(text: &str) -> Result<Name, ZoneError> {
    let mut name = Name::from_ascii(text)
        .map_err(|_| ZoneError::BadZone(text.to_string()))?
        .to_lowercase();
    name.set_fqdn(true);
    Ok(name)
}

/// The reverse zone apex covering `prefix`: whole octets (IPv4) or nibbles
/// (IPv6) of its network part; `None` for prefixes shorter than one.
pub fn reverse_apex(prefix: IpNet) -> Option<Name> {
    let (labels, full) = match prefix {
        IpNet::V4(p) => (usize::from(p.prefix_len() / 8), 4),
        IpNet::V6(p) => (usize::from(p.prefix_len() / 4), 32),
    };
    if labels == 0 {
        return None;
    }
    let name = Name::from(prefix.network());
    debug_assert_eq!(usize::from(name.num_labels()), full + 2);
    Some(name.trim_to(labels + 2).to_lowercase())
}

impl Zone {
    /// Indexes `data`. `ns_addresses` are the addresses this server answers
    /// on, published as the address of `ns.<zone>` (none when it listens on
    /// a wildcard address).
    pub fn new(data: impl Into<Arc<ZoneData>>, ns_addresses: &[IpAddr]) -> Result<Self, ZoneError> {
        let mut data: Arc<ZoneData> = data.into();
        if !data.sites.is_sorted_by(|a, b| site_key(a) <= site_key(b)) {
            Arc::make_mut(&mut data)
                .sites
                .sort_by(|a, b| site_key(a).cmp(&site_key(b)));
        }
        let origin = fqdn(&data.zone)?;
        let ns_name = fqdn(&format!("ns.{}", data.zone))?;
        let hostmaster = fqdn(&format!("hostmaster.{}", data.zone))?;
        let mut apexes = vec![origin.clone()];
        for prefix in &data.reverse {
            if let Some(apex) = reverse_apex(*prefix)
                && !apexes.contains(&apex)
            {
                apexes.push(apex);
            }
        }
        let mut zone = Self {
            data: data.clone(),
            origin,
            ns_addresses: ns_addresses.to_vec(),
            records: BTreeMap::new(),
            apexes,
            lans: BTreeMap::new(),
        };
        let soa = zone.soa_rdata(&ns_name, &hostmaster);
        for apex in zone.apexes.clone() {
            zone.add(apex.clone(), soa.clone());
            zone.add(apex, RData::NS(NS(ns_name.clone())));
        }
        for a in ns_addresses {
            zone.add(ns_name.clone(), address_rdata(*a));
        }
        zone.apexes
            .sort_by_key(|a| std::cmp::Reverse(a.num_labels()));
        for s in &data.sites {
            zone.add_site(s);
        }
        Ok(zone)
    }

    /// The SOA of every apex, for the current serial.
    fn soa_rdata(&self, ns_name: &Name, hostmaster: &Name) -> RData {
        RData::SOA(SOA::new(
            ns_name.clone(),
            hostmaster.clone(),
            self.data.serial,
            REFRESH,
            RETRY,
            EXPIRE,
            self.data.ttl,
        ))
    }

    fn add(&mut self, name: Name, rdata: RData) {
        let ttl = self.data.ttl;
        self.records
            .entry(name.clone())
            .or_default()
            .push(Record::from_rdata(name, ttl, rdata));
    }

    /// The records of one site: owner and data. A name longer than DNS
    /// allows (long labels under a long zone) leaves that site out, not the
    /// whole zone.
    fn site_records(&self, s: &SiteNames) -> Vec<(Name, RData)> {
        let mut out = Vec::new();
        let Ok(name) = fqdn(&site_name(&s.site, &s.region, &self.data.zone)) else {
            return out;
        };
        for a in &s.addresses {
            out.push((name.clone(), address_rdata(*a)));
            let reverse = Name::from(*a).to_lowercase();
            if self.apexes.iter().any(|z| z.zone_of(&reverse)) {
                out.push((reverse, RData::PTR(PTR(name.clone()))));
            }
        }
        for svc in &s.services {
            if let Ok(owner) = fqdn(&format!("_{}._tcp.{name}", svc.name)) {
                out.push((owner, RData::SRV(SRV::new(0, 0, svc.port, name.clone()))));
            }
        }
        if !s.lans.is_empty()
            && let Ok(owner) = fqdn(&format!("{LAN_LABEL}.{name}"))
        {
            for m in &s.lans {
                let text = format!("{} is mapped to {}", m.real, m.mapped);
                out.push((owner.clone(), RData::TXT(TXT::new(vec![text]))));
            }
        }
        out
    }

    /// Indexes one site; the number of records added.
    fn add_site(&mut self, s: &SiteNames) -> usize {
        let records = self.site_records(s);
        let n = records.len();
        if n == 0 {
            return 0;
        }
        for (owner, rdata) in records {
            self.add(owner, rdata);
        }
        let key = site_key(s);
        for m in &s.lans {
            let entries = self.lans.entry(m.mapped.network()).or_default();
            // After the sites before this one and this site's earlier
            // mappings: where a zone built at once puts it.
            let at = entries
                .partition_point(|(site, region, _)| (site.as_str(), region.as_str()) <= key);
            entries.insert(at, (s.site.clone(), s.region.clone(), *m));
        }
        n
    }

    /// Removes what [`Zone::add_site`] added for `s`; the number of records
    /// removed.
    fn remove_site(&mut self, s: &SiteNames) -> usize {
        let mut n = 0;
        for (owner, rdata) in self.site_records(s) {
            let Some(records) = self.records.get_mut(&owner) else {
                continue;
            };
            if let Some(i) = records.iter().position(|r| r.data == rdata) {
                records.remove(i);
                n += 1;
            }
            if records.is_empty() {
                self.records.remove(&owner);
            }
        }
        for m in &s.lans {
            let key = m.mapped.network();
            if let Some(entries) = self.lans.get_mut(&key) {
                entries.retain(|(site, region, _)| site != &s.site || region != &s.region);
                if entries.is_empty() {
                    self.lans.remove(&key);
                }
            }
        }
        n
    }

    /// How to get from this zone to `next`: compares the two site lists
    /// (both sorted), without building a DNS name.
    pub fn plan(&self, next: Arc<ZoneData>) -> ZoneUpdate {
        let (old, new) = (&self.data, &next);
        let strictly_sorted =
            |sites: &[SiteNames]| sites.windows(2).all(|w| site_key(&w[0]) < site_key(&w[1]));
        if old.zone != new.zone
            || old.ttl != new.ttl
            || old.reverse != new.reverse
            || !strictly_sorted(&old.sites)
            || !strictly_sorted(&new.sites)
        {
            return ZoneUpdate::Rebuild(next);
        }
        let (mut removed, mut added) = (Vec::new(), Vec::new());
        let (mut i, mut j) = (0, 0);
        while i < old.sites.len() || j < new.sites.len() {
            match (old.sites.get(i), new.sites.get(j)) {
                (Some(a), Some(b)) => match site_key(a).cmp(&site_key(b)) {
                    std::cmp::Ordering::Less => {
                        removed.push(i);
                        i += 1;
                    }
                    std::cmp::Ordering::Greater => {
                        added.push(j);
                        j += 1;
                    }
                    std::cmp::Ordering::Equal => {
                        if a != b {
                            removed.push(i);
                            added.push(j);
                        }
                        i += 1;
                        j += 1;
                    }
                },
                (Some(_), None) => {
                    removed.push(i);
                    i += 1;
                }
                (None, Some(_)) => {
                    added.push(j);
                    j += 1;
                }
                (None, None) => break,
            }
        }
        ZoneUpdate::Sites {
            data: next,
            removed,
            added,
        }
    }

    /// Carries out a [`Zone::plan`] made on this zone.
    pub fn apply(&mut self, update: ZoneUpdate) -> Result<Reindexed, ZoneError> {
        let (data, removed, added) = match update {
            ZoneUpdate::Rebuild(data) => {
                *self = Self::new(data, &self.ns_addresses.clone())?;
                let records = self
                    .data
                    .sites
                    .iter()
                    .map(|s| self.site_records(s).len())
                    .sum();
                return Ok(Reindexed {
                    rebuilt: true,
                    sites: self.data.sites.len(),
                    records,
                });
            }
            ZoneUpdate::Sites {
                data,
                removed,
                added,
            } => (data, removed, added),
        };
        let mut done = Reindexed {
            rebuilt: false,
            sites: removed.len() + added.len(),
            records: 0,
        };
        let old = std::mem::replace(&mut self.data, data.clone());
        for i in removed {
            if let Some(s) = old.sites.get(i) {
                done.records += self.remove_site(s);
            }
        }
        for j in added {
            if let Some(s) = data.sites.get(j) {
                done.records += self.add_site(s);
            }
        }
        if old.serial != data.serial {
            let ns_name = fqdn(&format!("ns.{}", data.zone))?;
            let hostmaster = fqdn(&format!("hostmaster.{}", data.zone))?;
            let soa = self.soa_rdata(&ns_name, &hostmaster);
            for apex in &self.apexes {
                if let Some(records) = self.records.get_mut(apex) {
                    for r in records.iter_mut() {
                        if r.record_type() == RecordType::SOA {
                            r.data = soa.clone();
                        }
                    }
                }
            }
        }
        Ok(done)
    }

    /// Brings the zone to `next` ([`Zone::plan`], then [`Zone::apply`]).
    pub fn update(&mut self, next: impl Into<Arc<ZoneData>>) -> Result<Reindexed, ZoneError> {
        let plan = self.plan(next.into());
        self.apply(plan)
    }

    /// The data the zone was built from.
    pub fn data(&self) -> &ZoneData {
        &self.data
    }

    /// The forward zone's apex.
    pub fn origin(&self) -> &Name {
        &self.origin
    }

    /// The site a name denotes: `<site>.<region>.<zone>` with or without
    /// the trailing dot, or `<site>.<region>` relative to the zone.
    pub fn site(&self, name: &str) -> Option<&SiteNames> {
        find_site(&self.data.sites, &self.origin, name)
    }

    /// The site whose name is `name` (lowercase, fully qualified).
    fn site_named(&self, name: &Name) -> Option<&SiteNames> {
        site_named(&self.data.sites, &self.origin, name)
    }

    /// Answers one question.
    pub fn answer(&self, qname: &Name, qtype: RecordType, qclass: DNSClass) -> Answer {
        if !matches!(qclass, DNSClass::IN | DNSClass::ANY) {
            return Answer::refused();
        }
        let mut name = qname.to_lowercase();
        name.set_fqdn(true);
        let Some(apex) = self.apexes.iter().find(|a| a.zone_of(&name)) else {
            return Answer::refused();
        };
        if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            // No zone transfers: secondaries get their copy in-band.
            return Answer::refused();
        }
        let soa = || {
            self.records
                .get(apex)
                .into_iter()
                .flatten()
                .filter(|r| r.record_type() == RecordType::SOA)
                .cloned()
                .collect::<Vec<_>>()
        };
        let mut answer = Answer {
            code: ResponseCode::NoError,
            authoritative: true,
            answers: Vec::new(),
            authority: Vec::new(),
            additionals: Vec::new(),
        };
        if let Some(record) = self.lan_host(&name).or_else(|| self.lan_ptr(&name)) {
            if qtype == RecordType::ANY || record.record_type() == qtype {
                answer.answers.push(record);
            } else {
                answer.authority = soa();
            }
            return answer;
        }
        match self.records.get(&name) {
            Some(records) => {
                answer.answers = records
                    .iter()
                    .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype)
                    .cloned()
                    .collect();
                if answer.answers.is_empty() {
                    answer.authority = soa();
                }
                for r in &answer.answers {
                    let target = match &r.data {
                        RData::SRV(srv) => Some(srv.target.clone()),
                        RData::NS(ns) => Some(ns.0.clone()),
                        _ => None,
                    };
                    if let Some(target) = target {
                        answer.additionals.extend(
                            self.records
                                .get(&target)
                                .into_iter()
                                .flatten()
                                .filter(|r| {
                                    matches!(r.record_type(), RecordType::A | RecordType::AAAA)
                                })
                                .cloned(),
                        );
                    }
                }
            }
            None => {
                // A name with descendants exists (an empty non-terminal):
                // in canonical order, descendants follow their ancestor.
                let has_descendants = self
                    .records
                    .range((Bound::Excluded(&name), Bound::Unbounded))
                    .next()
                    .is_some_and(|(next, _)| name.zone_of(next));
                if !has_descendants {
                    answer.code = ResponseCode::NXDomain;
                }
                answer.authority = soa();
            }
        }
        answer
    }
}

impl Zone {
    /// The A/AAAA record of `<lan address>.lan.<site>…`, for an address on
    /// one of the site's mapped LANs.
    fn lan_host(&self, name: &Name) -> Option<Record> {
        if name.num_labels() < 3 {
            return None;
        }
        let lan_apex = name.base_name();
        if !lan_apex
            .iter()
            .next()?
            .eq_ignore_ascii_case(LAN_LABEL.as_bytes())
        {
            return None;
        }
        let site = self.site_named(&lan_apex.base_name())?;
        let real = lan_host_address(std::str::from_utf8(name.iter().next()?).ok()?)?;
        let mapped = site.lans.iter().find_map(|m| m.mapped_of(real))?;
        Some(Record::from_rdata(
            name.clone(),
            self.data.ttl,
            address_rdata(mapped),
        ))
    }

    /// The PTR record of a mapped LAN address: the LAN host's name.
    fn lan_ptr(&self, name: &Name) -> Option<Record> {
        let host = name.parse_arpa_name().ok()?;
        if host.prefix_len() != host.max_prefix_len() {
            return None;
        }
        let addr = host.addr();
        let (_, entries) = self.lans.range(..=addr).next_back()?;
        let (site, region, m) = entries.last()?;
        let real = m.real_of(addr)?;
        let target = fqdn(&lan_host_name_of(real, site, region, &self.data.zone)).ok()?;
        Some(Record::from_rdata(
            name.clone(),
            self.data.ttl,
            RData::PTR(PTR(target)),
        ))
    }
}

/// The name of the host `real` on a LAN behind `site`:
/// `192-168-1-20.lan.<site>.<region>.<zone>`; IPv6 with every group
/// written out (`fd00-1-0-0-0-0-0-20`).
pub fn lan_host_name(real: IpAddr, site: &SiteNames, zone: &str) -> String {
    lan_host_name_of(real, &site.site, &site.region, zone)
}

fn lan_host_name_of(real: IpAddr, site: &SiteId, region: &RegionId, zone: &str) -> String {
    let label = match real {
        IpAddr::V4(a) => a.octets().map(|o| o.to_string()).join("-"),
        IpAddr::V6(a) => a.segments().map(|g| format!("{g:x}")).join("-"),
    };
    format!("{label}.{LAN_LABEL}.{}", site_name(site, region, zone))
}

/// The LAN address a host label names (dashes for the dots of IPv4 or the
/// colons of IPv6; `--` stands for `::`).
fn lan_host_address(label: &str) -> Option<IpAddr> {
    if label.len() > 45 {
        return None;
    }
    let dotted = label.replace('-', ".");
    if let Ok(v4) = dotted.parse::<std::net::Ipv4Addr>() {
        return Some(IpAddr::V4(v4));
    }
    label
        .replace('-', ":")
        .parse::<std::net::Ipv6Addr>()
        .ok()
        .map(IpAddr::V6)
}

fn address_rdata(a: IpAddr) -> RData {
    match a {
        IpAddr::V4(a) => RData::A(A(a)),
        IpAddr::V6(a) => RData::AAAA(AAAA(a)),
    }
}

/// Largest UDP answer a server offers with EDNS (the DNS flag day 2020
/// size).
pub const EDNS_PAYLOAD: u16 = 1232;

/// What a server says to one request, over UDP or TCP.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The response code.
    pub code: ResponseCode,
    /// The OPT record of the answer, when the query had one.
    pub edns: Option<Edns>,
    /// The records, when the zone answered.
    pub answer: Option<Answer>,
}

/// The reply to a request of `op_code` asking `question` (`None`: not
/// exactly one question), from `zone` (`None`: no zone yet, as at a gateway
/// that has not heard from a broker).
pub fn reply(
    zone: Option<&Zone>,
    op_code: OpCode,
    question: Option<(&Name, RecordType, DNSClass)>,
    edns: Option<&Edns>,
) -> Reply {
    // EDNS version 0 is the only one (RFC 6891 section 6.1.3): a query of
    // a higher version gets BADVERS, whose upper bits travel in the
    // answer's OPT record.
    let bad_version = edns.is_some_and(|e| e.version() > 0);
    let edns = edns.map(|_| {
        let mut e = Edns::new();
        e.set_max_payload(EDNS_PAYLOAD);
        if bad_version {
            e.set_rcode_high(ResponseCode::BADVERS.high());
        }
        e
    });
    let (code, answer) = if bad_version {
        (ResponseCode::BADVERS, None)
    } else if op_code != OpCode::Query {
        (ResponseCode::Refused, None)
    } else if let Some((name, qtype, qclass)) = question {
        match zone {
            Some(zone) => {
                let a = zone.answer(name, qtype, qclass);
                (a.code, Some(a))
            }
            None => (ResponseCode::ServFail, None),
        }
    } else {
        // No recursion, and one question per message (RFC 9619).
        (ResponseCode::FormErr, None)
    };
    Reply { code, edns, answer }
}

/// The answer to one DNS message as it came off the wire, encoded; `None`
/// for what gets no answer (a response, or not even a header). A message
/// whose header reads but whose rest does not gets FORMERR. `replied`
/// learns the code of every [`reply`] made (for counting).
pub fn answer_message(
    zone: Option<&Zone>,
    query: &[u8],
    replied: impl FnOnce(ResponseCode),
) -> Option<Vec<u8>> {
    let request = match Message::from_vec(query) {
        Ok(m) => m,
        Err(_) => {
            let header: [u8; 12] = query.get(..12)?.try_into().ok()?;
            if header[2] & 0x80 != 0 {
                return None;
            }
            let id = u16::from_be_bytes([header[0], header[1]]);
            let op_code = OpCode::from_u8((header[2] >> 3) & 0x0f);
            return Message::error_msg(id, op_code, ResponseCode::FormErr)
                .to_vec()
                .ok();
        }
    };
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let question = match request.queries.as_slice() {
        [q] => Some((q.name(), q.query_type(), q.query_class())),
        _ => None,
    };
    let reply = reply(
        zone,
        request.metadata.op_code,
        question,
        request.edns.as_ref(),
    );
    replied(reply.code);
    let mut response = Message::new(
        request.metadata.id,
        MessageType::Response,
        request.metadata.op_code,
    );
    response.metadata = Metadata::response_from_request(&request.metadata);
    response.metadata.recursion_available = false;
    response.metadata.response_code = reply.code;
    response.queries = request.queries;
    if let Some(a) = reply.answer {
        response.metadata.authoritative = a.authoritative;
        response.answers = a.answers;
        response.authorities = a.authority;
        response.additionals = a.additionals;
    }
    if let Some(e) = reply.edns {
        response.set_edns(e);
    }
    response.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> ZoneData {
        ZoneData {
            zone: "tether.internal".into(),
            serial: 7,
            ttl: 5,
            reverse: vec![
                "100.64.0.0/16".parse().unwrap(),
                "fd00:7e7e::/48".parse().unwrap(),
            ],
            sites: vec![
                SiteNames {
                    site: SiteId::new("hospital-a").unwrap(),
                    region: RegionId::new("eu").unwrap(),
                    addresses: vec![
                        "100.64.0.2".parse().unwrap(),
                        "fd00:7e7e::2".parse().unwrap(),
                    ],
                    services: vec![Service::parse("dicom=104").unwrap()],
                    lans: vec![
                        Mapping::new(
                            "192.168.1.0/24".parse().unwrap(),
                            "100.64.9.0/24".parse().unwrap(),
                        )
                        .unwrap(),
                        Mapping::new(
                            "fd00:1::/64".parse().unwrap(),
                            "fd00:7e7e:0:9::/64".parse().unwrap(),
                        )
                        .unwrap(),
                    ],
                },
                SiteNames {
                    site: SiteId::new("lab-b").unwrap(),
                    region: RegionId::new("us").unwrap(),
                    addresses: vec!["100.64.1.9".parse().unwrap()],
                    services: vec![],
                    lans: vec![],
                },
            ],
        }
    }

    fn zone() -> Zone {
        Zone::new(data(), &["127.0.0.1".parse().unwrap()]).unwrap()
    }

    /// A zone of `n` sites `s-<i>` in region `eu`, one address each.
    fn many(n: u32, serial: u32) -> ZoneData {
        let mut d = data();
        d.serial = serial;
        d.sites = (0..n)
            .map(|i| SiteNames {
                site: SiteId::new(format!("s-{i}")).unwrap(),
                region: RegionId::new("eu").unwrap(),
                addresses: vec![IpAddr::from([100, 64, (i >> 8) as u8, i as u8])],
                services: vec![],
                lans: vec![],
            })
            .collect();
        d.sites.sort();
        d
    }

    /// Every record and LAN mapping of a zone, in one order.
    fn contents(z: &Zone) -> (Vec<String>, Vec<String>) {
        let mut records: Vec<String> = z
            .records
            .values()
            .flatten()
            .map(|r| r.to_string())
            .collect();
        records.sort();
        let lans = z.lans.iter().map(|l| format!("{l:?}")).collect();
        (records, lans)
    }

    #[test]
    fn one_site_changing_in_a_large_zone_reindexes_that_site_only() {
        let ns = ["127.0.0.1".parse().unwrap()];
        let mut z = Zone::new(many(2_000, 1), &ns).unwrap();
        // s-7 moves to another address; everything else stays.
        let mut next = many(2_000, 2);
        let i = next
            .sites
            .iter()
            .position(|s| s.site.as_str() == "s-7")
            .unwrap();
        next.sites[i].addresses = vec!["100.64.200.7".parse().unwrap()];
        let done = z.update(next.clone()).unwrap();
        // Its A and PTR out, its A and PTR in: no other site touched.
        assert_eq!(
            done,
            Reindexed {
                rebuilt: false,
                sites: 2,
                records: 4
            }
        );
        let name = Name::from_ascii("s-7.eu.tether.internal.").unwrap();
        let a = z.answer(&name, RecordType::A, DNSClass::IN);
        assert_eq!(a.answers.len(), 1);
        assert_eq!(a.answers[0].data, RData::A(A([100, 64, 200, 7].into())));
        // The old reverse name is gone, the new one answers, the serial moved.
        let old_ptr = Name::from(IpAddr::from([100, 64, 0, 7]));
        assert_eq!(
            z.answer(&old_ptr, RecordType::PTR, DNSClass::IN).code,
            ResponseCode::NXDomain
        );
        let new_ptr = Name::from(IpAddr::from([100, 64, 200, 7]));
        assert_eq!(
            z.answer(&new_ptr, RecordType::PTR, DNSClass::IN).answers[0].data,
            RData::PTR(PTR(name.clone()))
        );
        let soa = z.answer(z.origin(), RecordType::SOA, DNSClass::IN);
        assert!(matches!(&soa.answers[0].data, RData::SOA(s) if s.serial == 2));
        assert_eq!(contents(&z), contents(&Zone::new(next, &ns).unwrap()));
        // One site leaving and one joining: two sites, one A and PTR each.
        let mut next = many(2_000, 3);
        next.sites.retain(|s| s.site.as_str() != "s-1999");
        next.sites.push(SiteNames {
            site: SiteId::new("zz").unwrap(),
            region: RegionId::new("eu").unwrap(),
            addresses: vec!["100.64.201.1".parse().unwrap()],
            services: vec![],
            lans: vec![],
        });
        next.sites.sort();
        let done = z.update(next.clone()).unwrap();
        // s-7 is back at its first address too: 3 removed, 3 added.
        assert_eq!((done.rebuilt, done.sites, done.records), (false, 4, 8));
        assert_eq!(contents(&z), contents(&Zone::new(next, &ns).unwrap()));
        // Only the serial: no site touched.
        let same = many(2_000, 4);
        let mut z = Zone::new(many(2_000, 3), &ns).unwrap();
        assert_eq!(z.update(same).unwrap(), Reindexed::default());
    }

    #[test]
    fn an_updated_zone_answers_as_one_built_from_scratch() {
        let ns = ["127.0.0.1".parse().unwrap()];
        let mut z = Zone::new(data(), &ns).unwrap();
        // Services, LANs and addresses change; a site goes; one comes.
        let mut steps = Vec::new();
        let mut d = data();
        d.serial = 8;
        d.sites[0].services = vec![Service::parse("http=80").unwrap()];
        d.sites[0].lans.truncate(1);
        steps.push(d.clone());
        d.serial = 9;
        d.sites[1].lans = vec![
            Mapping::new(
                "10.1.0.0/24".parse().unwrap(),
                "100.64.10.0/24".parse().unwrap(),
            )
            .unwrap(),
        ];
        d.sites.remove(0);
        steps.push(d.clone());
        d.serial = 10;
        d.sites.insert(0, data().sites[0].clone());
        steps.push(d.clone());
        for (i, step) in steps.into_iter().enumerate() {
            let done = z.update(step.clone()).unwrap();
            assert!(!done.rebuilt, "step {i}");
            let fresh = Zone::new(step, &ns).unwrap();
            assert_eq!(contents(&z), contents(&fresh), "step {i}");
            for q in [
                "hospital-a.eu.tether.internal.",
                "_http._tcp.hospital-a.eu.tether.internal.",
                "_dicom._tcp.hospital-a.eu.tether.internal.",
                "lan.lab-b.us.tether.internal.",
                "10-1-0-5.lan.lab-b.us.tether.internal.",
                "192-168-1-20.lan.hospital-a.eu.tether.internal.",
                "5.10.64.100.in-addr.arpa.",
                "20.9.64.100.in-addr.arpa.",
            ] {
                let q = Name::from_ascii(q).unwrap();
                assert_eq!(
                    z.answer(&q, RecordType::ANY, DNSClass::IN),
                    fresh.answer(&q, RecordType::ANY, DNSClass::IN),
                    "step {i}: {q}"
                );
            }
        }
        // A new TTL re-indexes everything.
        let mut d = data();
        d.ttl = 30;
        let done = z.update(d).unwrap();
        assert!(done.rebuilt);
        assert_eq!(done.sites, 2);
    }

    #[test]
    fn a_wire_message_is_answered_refused_or_left_unanswered_as_the_server_does() {
        let zone = zone();
        let mut query = Message::new(0x4242, MessageType::Query, OpCode::Query);
        query.add_query(hickory_proto::op::Query::query(
            Name::from_ascii("hospital-a.eu.tether.internal.").unwrap(),
            RecordType::A,
        ));
        let bytes = query.to_vec().unwrap();
        let mut code = None;
        let back = answer_message(Some(&zone), &bytes, |c| code = Some(c)).unwrap();
        let back = Message::from_vec(&back).unwrap();
        assert_eq!(back.metadata.id, 0x4242);
        assert_eq!(code, Some(ResponseCode::NoError));
        assert_eq!(back.answers.len(), 1);
        assert!(back.metadata.authoritative && !back.metadata.recursion_available);
        // No zone yet: SERVFAIL.
        let back = answer_message(None, &bytes, |_| {}).unwrap();
        assert_eq!(
            Message::from_vec(&back).unwrap().metadata.response_code,
            ResponseCode::ServFail
        );
        // EDNS version 1: BADVERS, in the OPT record's upper bits.
        let mut edns = Edns::new();
        edns.set_version(1);
        query.set_edns(edns);
        let back = answer_message(Some(&zone), &query.to_vec().unwrap(), |_| {}).unwrap();
        // (16 reads back as BADSIG, which shares the number.)
        assert_eq!(
            u16::from(Message::from_vec(&back).unwrap().metadata.response_code),
            u16::from(ResponseCode::BADVERS)
        );
        // A header followed by garbage: FORMERR for its ID, not counted.
        let mut garbage = bytes[..12].to_vec();
        garbage.extend_from_slice(&[0xff; 7]);
        let mut code = None;
        let back = answer_message(Some(&zone), &garbage, |c| code = Some(c)).unwrap();
        let back = Message::from_vec(&back).unwrap();
        assert_eq!(
            (back.metadata.id, back.metadata.response_code, code),
            (0x4242, ResponseCode::FormErr, None)
        );
        // A response, and less than a header, get nothing.
        let mut response = bytes.clone();
        response[2] |= 0x80;
        assert!(answer_message(Some(&zone), &response, |_| {}).is_none());
        assert!(answer_message(Some(&zone), &bytes[..5], |_| {}).is_none());
    }

    fn ask(zone: &Zone, name: &str, qtype: RecordType) -> Answer {
        zone.answer(&Name::from_ascii(name).unwrap(), qtype, DNSClass::IN)
    }

    #[test]
    fn sites_have_addresses_by_name_in_any_case() {
        let z = zone();
        let a = ask(&z, "hospital-a.eu.tether.internal.", RecordType::A);
        assert_eq!(a.code, ResponseCode::NoError);
        assert!(a.authoritative);
        assert_eq!(a.answers.len(), 1);
        assert_eq!(
            a.answers[0].data,
            RData::A(A("100.64.0.2".parse().unwrap()))
        );
        assert_eq!(a.answers[0].ttl, 5);
        let a = ask(&z, "Hospital-A.EU.tether.internal", RecordType::AAAA);
        assert_eq!(
            a.answers[0].data,
            RData::AAAA(AAAA("fd00:7e7e::2".parse().unwrap()))
        );
        // No AAAA for a site without an IPv6 address: NODATA with the SOA.
        let a = ask(&z, "lab-b.us.tether.internal.", RecordType::AAAA);
        assert_eq!(a.code, ResponseCode::NoError);
        assert!(a.answers.is_empty());
        assert_eq!(a.authority[0].record_type(), RecordType::SOA);
    }

    #[test]
    fn unknown_names_are_nxdomain_and_foreign_names_refused() {
        let z = zone();
        let a = ask(&z, "nobody.eu.tether.internal.", RecordType::A);
        assert_eq!(a.code, ResponseCode::NXDomain);
        assert!(a.authoritative);
        assert_eq!(a.authority[0].record_type(), RecordType::SOA);
        // A site under the wrong region does not exist.
        let a = ask(&z, "hospital-a.us.tether.internal.", RecordType::A);
        assert_eq!(a.code, ResponseCode::NXDomain);
        for outside in [
            "example.org.",
            "internal.",
            ".",
            "tether.internal.evil.com.",
        ] {
            let a = ask(&z, outside, RecordType::A);
            assert_eq!(a.code, ResponseCode::Refused, "{outside}");
            assert!(!a.authoritative && a.answers.is_empty());
        }
        // Reverse names outside the pools are not ours either.
        let a = ask(&z, "1.0.168.192.in-addr.arpa.", RecordType::PTR);
        assert_eq!(a.code, ResponseCode::Refused);
        let mut chaos = z.answer(
            &Name::from_ascii("hospital-a.eu.tether.internal.").unwrap(),
            RecordType::A,
            DNSClass::CH,
        );
        assert_eq!(chaos.code, ResponseCode::Refused);
        chaos = ask(&z, "tether.internal.", RecordType::AXFR);
        assert_eq!(chaos.code, ResponseCode::Refused);
    }

    #[test]
    fn empty_non_terminals_exist() {
        let z = zone();
        for ent in [
            "eu.tether.internal.",
            "_tcp.hospital-a.eu.tether.internal.",
            "64.100.in-addr.arpa.",
        ] {
            let a = ask(&z, ent, RecordType::A);
            assert_eq!(a.code, ResponseCode::NoError, "{ent}");
            assert!(a.answers.is_empty());
        }
        // A region without sites has no names.
        assert_eq!(
            ask(&z, "ap.tether.internal.", RecordType::A).code,
            ResponseCode::NXDomain
        );
    }

    #[test]
    fn services_have_srv_records_with_the_address_alongside() {
        let z = zone();
        let a = ask(
            &z,
            "_dicom._tcp.hospital-a.eu.tether.internal.",
            RecordType::SRV,
        );
        assert_eq!(a.code, ResponseCode::NoError);
        let RData::SRV(srv) = &a.answers[0].data else {
            panic!("not SRV: {:?}", a.answers);
        };
        assert_eq!(srv.port, 104);
        assert_eq!(srv.target.to_string(), "hospital-a.eu.tether.internal.");
        assert_eq!(a.additionals.len(), 2);
        assert_eq!(
            ask(
                &z,
                "_http._tcp.hospital-a.eu.tether.internal.",
                RecordType::SRV
            )
            .code,
            ResponseCode::NXDomain
        );
    }

    #[test]
    fn overlay_addresses_have_ptr_records() {
        let z = zone();
        let a = ask(&z, "2.0.64.100.in-addr.arpa.", RecordType::PTR);
        assert_eq!(a.code, ResponseCode::NoError);
        assert_eq!(
            a.answers[0].data,
            RData::PTR(PTR(
                Name::from_ascii("hospital-a.eu.tether.internal.").unwrap()
            ))
        );
        let v6 = Name::from("fd00:7e7e::2".parse::<IpAddr>().unwrap());
        let a = z.answer(&v6, RecordType::PTR, DNSClass::IN);
        assert_eq!(a.answers.len(), 1);
        // An unassigned pool address: authoritative NXDOMAIN.
        let a = ask(&z, "3.0.64.100.in-addr.arpa.", RecordType::PTR);
        assert_eq!(a.code, ResponseCode::NXDomain);
        assert_eq!(a.authority[0].name.to_string(), "64.100.in-addr.arpa.");
    }

    #[test]
    fn lan_hosts_have_names_under_their_site() {
        let z = zone();
        let a = ask(
            &z,
            "192-168-1-20.lan.hospital-a.eu.tether.internal.",
            RecordType::A,
        );
        assert_eq!(a.code, ResponseCode::NoError);
        assert!(a.authoritative);
        assert_eq!(
            a.answers[0].data,
            RData::A(A("100.64.9.20".parse().unwrap()))
        );
        let a = ask(
            &z,
            "FD00-1-0-0-0-0-0-20.LAN.hospital-a.eu.tether.internal.",
            RecordType::AAAA,
        );
        assert_eq!(
            a.answers[0].data,
            RData::AAAA(AAAA("fd00:7e7e:0:9::20".parse().unwrap()))
        );
        // `--` stands for `::`; the same name.
        let a = ask(
            &z,
            "fd00-1--20.lan.hospital-a.eu.tether.internal.",
            RecordType::AAAA,
        );
        assert_eq!(a.answers.len(), 1);
        // An IPv4 host has no AAAA: NODATA with the SOA.
        let a = ask(
            &z,
            "192-168-1-20.lan.hospital-a.eu.tether.internal.",
            RecordType::AAAA,
        );
        assert_eq!(a.code, ResponseCode::NoError);
        assert!(a.answers.is_empty());
        assert_eq!(a.authority[0].record_type(), RecordType::SOA);
        // Off the LAN, not an address, or a site without LANs: no name.
        for name in [
            "192-168-2-20.lan.hospital-a.eu.tether.internal.",
            "analyser.lan.hospital-a.eu.tether.internal.",
            "192-168-1-20.lan.lab-b.us.tether.internal.",
            "192-168-1-20.lan.nobody.eu.tether.internal.",
            "192-168-1-20.wan.hospital-a.eu.tether.internal.",
        ] {
            assert_eq!(
                ask(&z, name, RecordType::A).code,
                ResponseCode::NXDomain,
                "{name}"
            );
        }
        // The mappings in plain words.
        let a = ask(&z, "lan.hospital-a.eu.tether.internal.", RecordType::TXT);
        let texts: Vec<String> = a.answers.iter().map(|r| r.data.to_string()).collect();
        assert!(
            texts
                .iter()
                .any(|t| t.contains("192.168.1.0/24 is mapped to 100.64.9.0/24")),
            "{texts:?}"
        );
        assert_eq!(
            ask(&z, "lan.lab-b.us.tether.internal.", RecordType::TXT).code,
            ResponseCode::NXDomain
        );
    }

    #[test]
    fn mapped_lan_addresses_have_ptr_records() {
        let z = zone();
        let a = ask(&z, "20.9.64.100.in-addr.arpa.", RecordType::PTR);
        assert_eq!(a.code, ResponseCode::NoError);
        assert_eq!(
            a.answers[0].data,
            RData::PTR(PTR(Name::from_ascii(
                "192-168-1-20.lan.hospital-a.eu.tether.internal."
            )
            .unwrap()))
        );
        let v6 = Name::from("fd00:7e7e:0:9::20".parse::<IpAddr>().unwrap());
        let a = z.answer(&v6, RecordType::PTR, DNSClass::IN);
        assert_eq!(
            a.answers[0].data,
            RData::PTR(PTR(Name::from_ascii(
                "fd00-1-0-0-0-0-0-20.lan.hospital-a.eu.tether.internal."
            )
            .unwrap()))
        );
        // Next to the mapped block: nothing.
        let a = ask(&z, "20.10.64.100.in-addr.arpa.", RecordType::PTR);
        assert_eq!(a.code, ResponseCode::NXDomain);
        // The site's own address keeps its name.
        let a = ask(&z, "2.0.64.100.in-addr.arpa.", RecordType::PTR);
        assert_eq!(a.answers.len(), 1);
    }

    #[test]
    fn zones_without_lans_in_the_older_encoding_still_decode() {
        let mut d = data();
        for s in &mut d.sites {
            s.lans.clear();
        }
        // The older encoding: TZ1 and no LAN count per site.
        let mut enc = Vec::new();
        enc.extend_from_slice(MAGIC_V1);
        put_str(&mut enc, &d.zone);
        enc.extend_from_slice(&d.serial.to_be_bytes());
        enc.extend_from_slice(&d.ttl.to_be_bytes());
        enc.extend_from_slice(&(d.reverse.len() as u16).to_be_bytes());
        for p in &d.reverse {
            put_addr(&mut enc, p.addr());
            enc.push(p.prefix_len());
        }
        enc.extend_from_slice(&(d.sites.len() as u32).to_be_bytes());
        for s in &d.sites {
            put_str(&mut enc, s.site.as_str());
            put_str(&mut enc, s.region.as_str());
            enc.push(s.addresses.len() as u8);
            for a in &s.addresses {
                put_addr(&mut enc, *a);
            }
            enc.push(s.services.len() as u8);
            for svc in &s.services {
                put_str(&mut enc, svc.name.as_str());
                enc.extend_from_slice(&svc.port.to_be_bytes());
            }
        }
        assert_eq!(ZoneData::decode(&enc).unwrap(), d);
    }

    #[test]
    fn apex_has_soa_and_ns_with_glue() {
        let z = zone();
        let a = ask(&z, "tether.internal.", RecordType::SOA);
        let RData::SOA(soa) = &a.answers[0].data else {
            panic!("not SOA");
        };
        assert_eq!(soa.serial, 7);
        assert_eq!(soa.minimum, 5);
        let a = ask(&z, "tether.internal.", RecordType::NS);
        assert_eq!(
            a.answers[0].data,
            RData::NS(NS(Name::from_ascii("ns.tether.internal.").unwrap()))
        );
        assert_eq!(a.additionals.len(), 1);
        assert_eq!(
            ask(&z, "64.100.in-addr.arpa.", RecordType::SOA)
                .answers
                .len(),
            1
        );
    }

    #[test]
    fn sites_are_found_by_full_or_relative_name() {
        let z = zone();
        assert_eq!(
            z.site("hospital-a.eu.tether.internal")
                .unwrap()
                .site
                .as_str(),
            "hospital-a"
        );
        assert_eq!(
            z.site("hospital-a.eu.tether.internal.")
                .unwrap()
                .region
                .as_str(),
            "eu"
        );
        assert_eq!(z.site("lab-b.us").unwrap().site.as_str(), "lab-b");
        assert!(z.site("lab-b.eu").is_none());
        assert!(z.site("not a name").is_none());
    }

    #[test]
    fn encoding_round_trips_and_refuses_garbage() {
        let d = data();
        assert_eq!(ZoneData::decode(&d.encode()).unwrap(), d);
        let bytes = d.encode();
        for cut in 0..bytes.len() {
            assert!(ZoneData::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert_eq!(ZoneData::decode(b"nope"), Err(ZoneError::NotZone));
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(ZoneData::decode(&extra).is_err());
        // Labels that break the rules are refused, not trusted.
        let mut bad = d.clone();
        bad.sites[0].services.clear();
        let mut enc = bad.encode();
        let at = enc.windows(10).position(|w| w == b"hospital-a").unwrap();
        enc[at] = b'H';
        assert!(ZoneData::decode(&enc).is_err());
    }

    #[test]
    fn filtered_copies_keep_only_permitted_regions() {
        let d = data();
        let eu = d.filtered(|r| r.as_str() == "eu");
        assert_eq!(eu.sites.len(), 1);
        assert!(!eu.same_names(&d));
        assert!(d.same_names(&ZoneData {
            serial: 99,
            ..d.clone()
        }));
    }

    #[test]
    fn service_lists_parse_and_name_their_problem() {
        let s = Service::parse_list("http=80, dicom=104,http=8080").unwrap();
        assert_eq!(Service::format_list(&s), "dicom=104,http=80");
        assert!(
            Service::parse_list("http")
                .unwrap_err()
                .contains("name=port")
        );
        assert!(
            Service::parse_list("http=0")
                .unwrap_err()
                .contains("TCP port")
        );
        assert!(
            Service::parse_list("HTTP=80")
                .unwrap_err()
                .contains("uppercase")
        );
        assert!(Service::parse_list("").unwrap().is_empty());
    }

    #[test]
    fn a_site_is_found_by_name_in_the_data_as_in_the_zone() {
        let (d, z) = (data(), zone());
        for name in [
            "lab-b.us",
            "lab-b.us.tether.internal",
            "LAB-B.us.tether.internal.",
            "hospital-a.eu",
            "lab-b.eu",
            "us.tether.internal",
            "x.lab-b.us.tether.internal",
            "lab-b.us.example.org.",
        ] {
            assert_eq!(d.site(name), z.site(name), "{name}");
        }
        assert_eq!(d.site("lab-b.us").unwrap().site.as_str(), "lab-b");
        assert_eq!(d.site("lab-b.eu"), None);
    }

    #[test]
    fn a_name_too_long_for_dns_leaves_out_its_site_only() {
        let mut d = data();
        d.zone = format!(
            "{}.{}.{}.example",
            "a".repeat(60),
            "b".repeat(60),
            "c".repeat(60)
        );
        d.sites[0].site = SiteId::new("s".repeat(63)).unwrap();
        let z = Zone::new(d.clone(), &[]).unwrap();
        assert!(z.site(&format!("lab-b.us.{}", d.zone)).is_some());
        let names = z.records.keys().filter(|n| z.origin.zone_of(n)).count();
        // The apex and lab-b: nothing of the long site.
        assert_eq!(names, 2, "{:?}", z.records.keys().collect::<Vec<_>>());
    }

    #[test]
    fn pools_shorter_than_an_octet_have_no_reverse_zone() {
        assert_eq!(reverse_apex("10.0.0.0/7".parse().unwrap()), None);
        assert_eq!(
            reverse_apex("100.64.0.0/10".parse().unwrap())
                .unwrap()
                .to_string(),
            "100.in-addr.arpa."
        );
        assert_eq!(
            reverse_apex("fd00:7e7e::/48".parse().unwrap())
                .unwrap()
                .to_string(),
            "0.0.0.0.e.7.e.7.0.0.d.f.ip6.arpa."
        );
    }

    #[test]
    fn sites_mapped_onto_one_prefix_answer_after_updates_as_built_from_scratch() {
        // Two sites whose LANs are mapped onto the same prefix (data a
        // broker never sends, but a gateway must answer from consistently).
        let ns = ["127.0.0.1".parse().unwrap()];
        let lan = |real: &str| {
            vec![Mapping::new(real.parse().unwrap(), "100.64.9.0/24".parse().unwrap()).unwrap()]
        };
        let mut both = data();
        both.sites[0].lans = lan("192.168.1.0/24");
        both.sites[1].lans = lan("10.1.0.0/24");
        let mut first_only = both.clone();
        first_only.sites[1].lans.clear();
        let mut second_only = both.clone();
        second_only.sites[0].lans.clear();
        let ptr = Name::from_ascii("20.9.64.100.in-addr.arpa.").unwrap();
        for (from, to) in [
            (&both, &first_only),
            (&both, &second_only),
            (&first_only, &both),
            (&second_only, &both),
            (&first_only, &second_only),
        ] {
            let mut z = Zone::new(from.clone(), &ns).unwrap();
            let done = z.update(to.clone()).unwrap();
            assert!(!done.rebuilt);
            let fresh = Zone::new(to.clone(), &ns).unwrap();
            assert_eq!(contents(&z), contents(&fresh));
            assert_eq!(
                z.answer(&ptr, RecordType::PTR, DNSClass::IN),
                fresh.answer(&ptr, RecordType::PTR, DNSClass::IN)
            );
        }
    }
}
