//! Identity DNS on the broker: the mesh zone kept in step with enrollment,
//! sessions and revocation, served by hickory-server and handed to
//! gateways.
//!
//! Every change that can alter a name bumps a generation
//! ([`crate::core_cell::CoreCell::names_changed`]); one task rebuilds the
//! [`ZoneData`] from the store and the live sessions, and publishes it
//! ([`Broker::publish_zone`]) with a new serial when the names differ. The
//! DNS server and the gateway push follow the published zone.
//!
//! A site's services (SRV) are those of its session here, or, for a site
//! another broker of the fleet holds, those its latest "connected" event
//! announced at that broker ([`held_elsewhere`]): every broker answers
//! alike. They go when the fleet's owner record of the site goes (the
//! session ended, or its broker's lease expired). The task follows the
//! fleet's view and the events' announcements, and reads again only the
//! sites whose services they change.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use tether_proto::dns::{Service, SiteNames, ZoneData};
use tether_proto::netmap::Mapping;
use tether_proto::{RegionId, SiteId};
use tether_shell::dns::DnsServer;
use tokio::sync::watch;

use crate::core_cell::NameChanges;
use crate::error::BrokerError;
use crate::state::Broker;
use crate::store::SiteRecord;

/// How long changes are gathered before the zone is rebuilt (a burst of
/// reconnecting sites makes one new serial, not hundreds).
const SETTLE: Duration = Duration::from_millis(20);

/// Changes are also gathered for this many times as long as the last
/// rebuild took, so that rebuilding a large zone takes at most about a
/// fifth of a core during a burst of enrollments (each one a change).
const SETTLE_PER_REBUILD: u32 = 4;

/// The longest changes are gathered: a name changed during a burst is
/// published at most this long, plus the rebuild under way and its own,
/// after its change.
const SETTLE_MAX: Duration = Duration::from_secs(1);

/// How long to gather changes after a rebuild that took `rebuild`.
fn settle_after(rebuild: Duration) -> Duration {
    (rebuild * SETTLE_PER_REBUILD).clamp(SETTLE, SETTLE_MAX)
}

/// Where the names of the sites come from: the store's site records, the
/// leases, the live sessions and the services of sites held elsewhere
/// ([`BrokerNames`]), or a fleet in memory in tests.
pub trait NameSource {
    /// The names of every site the zone lists (enrolled and not revoked),
    /// in any order. Blocking.
    fn all_sites(&self) -> Result<Vec<SiteNames>, BrokerError>;
    /// The names of one site now; `None` when the zone does not list it.
    /// Blocking.
    fn site_names(&self, site: &SiteId) -> Result<Option<SiteNames>, BrokerError>;
    /// A site's overlay addresses and LAN mappings, as its leases hold
    /// them now (no store read).
    fn leased(&self, site: &SiteId, region: &RegionId) -> (Vec<IpAddr>, Vec<Mapping>);
}

/// The names the zone lists for the site of `record` (none when it is not
/// enrolled or revoked): its leased addresses and LAN mappings from
/// `source`, and `services`.
fn names_of(
    source: &impl NameSource,
    record: SiteRecord,
    services: impl FnOnce(&SiteRecord) -> Vec<tether_proto::dns::Service>,
) -> Option<SiteNames> {
    if record.revoked || record.enrolled.is_none() {
        return None;
    }
    let (addresses, lans) = source.leased(&record.site, &record.region);
    let services = services(&record);
    Some(SiteNames {
        site: record.site,
        region: record.region,
        addresses,
        services,
        lans,
    })
}

/// The services of the sites that another broker of the fleet holds, by
/// site: those the latest "connected" event of the site announced, while
/// the fleet names the broker that recorded it as the site's owner and
/// that broker is a live member (its lease has not expired).
pub type HeldElsewhere = BTreeMap<SiteId, Vec<Service>>;

/// What [`HeldElsewhere`] is now, from this broker's view of the fleet and
/// its summaries of the sites' events (in memory, no store read). Empty
/// without a fleet.
pub fn held_elsewhere(broker: &Broker) -> HeldElsewhere {
    let Some(fleet) = broker.fleet().and_then(|f| f.snapshot()) else {
        return HeldElsewhere::new();
    };
    broker
        .events()
        .announcements()
        .into_iter()
        .filter_map(|(site, announced)| {
            let (holder, _) = fleet.live_holder_elsewhere(&site)?;
            let services = announced.held_by(holder)?.to_vec();
            Some((site, services))
        })
        .collect()
}

/// The sites whose services differ between `old` and `new`.
fn differing<'a>(old: &'a HeldElsewhere, new: &'a HeldElsewhere) -> Vec<&'a SiteId> {
    let gone = old.keys().filter(|site| !new.contains_key(*site));
    let changed = new
        .iter()
        .filter(|(site, services)| old.get(*site) != Some(*services))
        .map(|(site, _)| site);
    gone.chain(changed).collect()
}

/// The broker's names: its store's site records, its leases, its sessions
/// and the services of the sites held elsewhere.
pub struct BrokerNames<'a> {
    /// The broker.
    pub broker: &'a Broker,
    /// The services of sites held by other brokers.
    pub elsewhere: &'a HeldElsewhere,
}

impl BrokerNames<'_> {
    /// The names of a site whose record is `record`; its services are
    /// those of its session here, or those announced where it is held.
    fn names_of(&self, record: SiteRecord) -> Option<SiteNames> {
        names_of(self, record, |r| match self.broker.session(&r.site) {
            Some(s) if s.region() == &r.region => s.services.clone(),
            Some(_) => Vec::new(),
            None => self.elsewhere.get(&r.site).cloned().unwrap_or_default(),
        })
    }
}

impl NameSource for BrokerNames<'_> {
    fn all_sites(&self) -> Result<Vec<SiteNames>, BrokerError> {
        Ok(self
            .broker
            .store
            .sites()?
            .into_iter()
            .filter_map(|r| self.names_of(r))
            .collect())
    }

    fn site_names(&self, site: &SiteId) -> Result<Option<SiteNames>, BrokerError> {
        Ok(self.broker.store.site(site)?.and_then(|r| self.names_of(r)))
    }

    fn leased(&self, site: &SiteId, region: &RegionId) -> (Vec<IpAddr>, Vec<Mapping>) {
        (
            self.broker.host_addresses(site, region),
            self.broker.lan_mappings(site, region),
        )
    }
}

/// The zone as the store, the sessions and the fleet describe it now.
/// Blocking.
pub fn zone_data(broker: &Broker, serial: u32) -> Result<ZoneData, BrokerError> {
    let elsewhere = held_elsewhere(broker);
    let source = BrokerNames {
        broker,
        elsewhere: &elsewhere,
    };
    let mut zone = empty_zone(broker);
    zone.serial = serial;
    zone.sites = source.all_sites()?;
    zone.sites.sort();
    Ok(zone)
}

/// The zone without sites: its name, TTL and pools from the configuration.
fn empty_zone(broker: &Broker) -> ZoneData {
    let config = &broker.config;
    let reverse = config
        .regions
        .values()
        .flat_map(|r| r.pools.clone())
        .collect();
    ZoneData::empty(&config.dns_zone, config.dns_ttl, reverse)
}

/// The zone data the broker keeps, brought up to date site by site.
#[derive(Debug, Clone)]
pub struct Names {
    /// The sites sorted, as [`zone_data`] makes them (a site id is one
    /// site, whatever its region).
    data: ZoneData,
}

/// What one update cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Work {
    /// Every site was read again.
    pub rebuilt: bool,
    /// Sites read from the source ([`NameSource::site_names`], or every
    /// site of a rebuild).
    pub sites_read: usize,
    /// Sites whose leases were compared with the zone, after a change of
    /// their region's leases (in memory, no store read).
    pub leases_compared: usize,
    /// Whether the names changed.
    pub changed: bool,
}

impl Names {
    /// Every site read from `source` into `base` (a zone without sites).
    pub fn rebuild(source: &impl NameSource, base: ZoneData) -> Result<(Self, Work), BrokerError> {
        let mut data = base;
        data.sites = source.all_sites()?;
        data.sites.sort();
        let work = Work {
            rebuilt: true,
            sites_read: data.sites.len(),
            leases_compared: 0,
            changed: true,
        };
        Ok((Self { data }, work))
    }

    /// The zone data.
    pub fn data(&self) -> &ZoneData {
        &self.data
    }

    /// Sets the serial.
    pub fn set_serial(&mut self, serial: u32) {
        self.data.serial = serial;
    }

    /// Applies `changes`: every site again when `all` is set; otherwise
    /// the sites named, and those of the regions named whose leases differ
    /// from their names in the zone. The result is the zone
    /// [`Names::rebuild`] would read now, if every change was marked.
    pub fn apply(
        &mut self,
        source: &impl NameSource,
        changes: &NameChanges,
    ) -> Result<Work, BrokerError> {
        if changes.all {
            let mut base = self.data.clone();
            base.sites.clear();
            let (next, mut work) = Self::rebuild(source, base)?;
            work.changed = !next.data.same_names(&self.data);
            *self = next;
            return Ok(work);
        }
        let mut work = Work::default();
        let mut sites = changes.sites.clone();
        for s in &self.data.sites {
            if changes.regions.contains(&s.region) && !sites.contains(&s.site) {
                work.leases_compared += 1;
                let (addresses, lans) = source.leased(&s.site, &s.region);
                if addresses != s.addresses || lans != s.lans {
                    sites.insert(s.site.clone());
                }
            }
        }
        for site in &sites {
            work.sites_read += 1;
            let names = source.site_names(site)?;
            let at = self.data.sites.binary_search_by(|s| s.site.cmp(site));
            match (at, names) {
                (Ok(i), Some(n)) => {
                    if self.data.sites[i] != n {
                        self.data.sites[i] = n;
                        work.changed = true;
                    }
                }
                (Ok(i), None) => {
                    self.data.sites.remove(i);
                    work.changed = true;
                }
                (Err(i), Some(n)) => {
                    self.data.sites.insert(i, n);
                    work.changed = true;
                }
                (Err(_), None) => {}
            }
        }
        Ok(work)
    }
}

/// A serial that grows across restarts: seconds since 2020, or one more
/// than the last.
fn next_serial(last: u32) -> u32 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().saturating_sub(1_577_836_800))
        .unwrap_or_default() as u32;
    now.max(last.wrapping_add(1))
}

/// Builds the first zone, so that the DNS server answers from the start.
pub async fn first_zone(broker: &Arc<Broker>) -> anyhow::Result<()> {
    let b = broker.clone();
    let zone = tokio::task::spawn_blocking(move || zone_data(&b, next_serial(0))).await??;
    broker.publish_zone(Arc::new(zone));
    Ok(())
}

/// A counter another part of the broker moves on each change of
/// something the zone reads (the fleet's view, the events'
/// announcements), and the value the zone was last made with.
struct Followed {
    changes: Option<watch::Receiver<u64>>,
    used: Option<u64>,
}

impl Followed {
    fn new(changes: Option<watch::Receiver<u64>>) -> Self {
        Self {
            changes,
            used: None,
        }
    }

    /// Whether the counter moved since the last call (or this is the
    /// first): read before what it counts is read, so that a later change
    /// is seen by the next call.
    fn moved(&mut self) -> bool {
        let Some(rx) = &mut self.changes else {
            return false;
        };
        let now = *rx.borrow_and_update();
        let moved = self.used != Some(now);
        self.used = Some(now);
        moved
    }

    /// Waits for the counter to move; forever without one (or when it
    /// closed: it is then dropped).
    async fn changed(&mut self) {
        match &mut self.changes {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    self.changes = None;
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }
}

/// Follows every change; runs until the broker is dropped. The first
/// round reads every site; later ones only the sites the changes name
/// ([`Names::apply`]) and those whose services held elsewhere changed
/// (after a change of the fleet's view or of the events' announcements),
/// or every site again after a change that names none.
pub async fn keep_zone(broker: Arc<Broker>) {
    let mut changes = broker.core().name_changes();
    let mut fleet_view = Followed::new(broker.fleet().map(|f| f.view_changes()));
    let mut announced = Followed::new(Some(broker.events().announcement_changes()));
    let mut last_serial = broker.zone().map_or(0, |z| z.serial);
    let mut names: Option<Names> = None;
    let mut elsewhere = Arc::new(HeldElsewhere::new());
    loop {
        let serial = next_serial(last_serial);
        let b = broker.clone();
        let mut marks = broker.core().take_name_changes();
        // The counters are read before what they count, so that a change
        // after this point makes the next round read again.
        let moved = fleet_view.moved() | announced.moved();
        if moved || names.is_none() {
            let now = held_elsewhere(&broker);
            marks
                .sites
                .extend(differing(&elsewhere, &now).into_iter().cloned());
            elsewhere = Arc::new(now);
        }
        let held = elsewhere.clone();
        let current = names.take();
        let published = broker.zone();
        let started = std::time::Instant::now();
        // Reading the store and comparing sites grow with the changes (or
        // the fleet, for a full read): off the runtime's workers.
        let updated = tokio::task::spawn_blocking(move || {
            let source = BrokerNames {
                broker: &b,
                elsewhere: &held,
            };
            match current {
                Some(mut n) => n.apply(&source, &marks).map(|work| (n, work)),
                None => Names::rebuild(&source, empty_zone(&b)).map(|(n, mut work)| {
                    work.changed = !published.as_ref().is_some_and(|p| p.same_names(n.data()));
                    (n, work)
                }),
            }
        })
        .await;
        let settle = settle_after(started.elapsed());
        match updated {
            Ok(Ok((mut n, work))) => {
                if work.changed {
                    n.set_serial(serial);
                    last_serial = serial;
                    tracing::debug!(
                        serial,
                        sites = n.data().sites.len(),
                        rebuilt = work.rebuilt,
                        sites_read = work.sites_read,
                        leases_compared = work.leases_compared,
                        "mesh zone updated"
                    );
                    broker.publish_zone(Arc::new(n.data().clone()));
                }
                names = Some(n);
            }
            Ok(Err(e)) => {
                // The marks taken are lost with the zone: the next round
                // reads every site.
                tracing::warn!(error = %e, "cannot update the mesh zone; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(_) => return,
        }
        // A change made while the zone was updated or while changes are
        // gathered is not lost: it marks `changes` seen only here, before
        // the next round takes the marks, so a change after this point
        // wakes the loop again (and a mark is made before its generation
        // moves). The fleet's view and the announcements are compared
        // with the values the zone was made with at the start of a round.
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = fleet_view.changed() => {}
            () = announced.changed() => {}
        }
        tokio::time::sleep(settle).await;
        changes.borrow_and_update();
    }
}

/// Starts the DNS server on the configured addresses, if any.
pub async fn serve(broker: &Arc<Broker>) -> anyhow::Result<Option<DnsServer>> {
    if broker.config.dns_listen.is_empty() {
        return Ok(None);
    }
    let count = Arc::new(|code: ResponseCode| crate::metrics::dns_answer(code));
    let server = DnsServer::start(
        &broker.config.dns_listen,
        broker.zone_changes(),
        Some(count),
    )
    .await?;
    Ok(Some(server))
}

/// The DNS addresses of a running server, for logs and tests.
pub fn addrs(server: &Option<DnsServer>) -> Vec<SocketAddr> {
    server
        .as_ref()
        .map(|s| s.local_addrs.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::collections::BTreeMap;

    use ipnet::IpNet;
    use tether_proto::dns::Service;

    use super::*;

    /// A fleet in memory: each site's names and whether the zone lists it
    /// (enrolled and not revoked), counting what is read.
    #[derive(Default)]
    struct Fleet {
        sites: BTreeMap<SiteId, (SiteNames, bool)>,
        full_reads: Cell<usize>,
        site_reads: Cell<usize>,
    }

    impl NameSource for Fleet {
        fn all_sites(&self) -> Result<Vec<SiteNames>, BrokerError> {
            self.full_reads.set(self.full_reads.get() + 1);
            // In the store's order, not the zone's.
            Ok(self
                .sites
                .values()
                .rev()
                .filter(|(_, listed)| *listed)
                .map(|(n, _)| n.clone())
                .collect())
        }

        fn site_names(&self, site: &SiteId) -> Result<Option<SiteNames>, BrokerError> {
            self.site_reads.set(self.site_reads.get() + 1);
            Ok(self
                .sites
                .get(site)
                .filter(|(_, listed)| *listed)
                .map(|(n, _)| n.clone()))
        }

        fn leased(&self, site: &SiteId, _region: &RegionId) -> (Vec<IpAddr>, Vec<Mapping>) {
            self.sites
                .get(site)
                .map(|(n, _)| (n.addresses.clone(), n.lans.clone()))
                .unwrap_or_default()
        }
    }

    fn id(i: u32) -> SiteId {
        SiteId::new(format!("site-{i}")).unwrap()
    }

    fn region(i: u32) -> RegionId {
        RegionId::new(if i.is_multiple_of(3) { "us" } else { "eu" }).unwrap()
    }

    fn site(i: u32, generation: u32) -> SiteNames {
        SiteNames {
            site: id(i),
            region: region(i),
            addresses: vec![IpAddr::from([
                100,
                64 + (generation % 4) as u8,
                (i >> 8) as u8,
                i as u8,
            ])],
            services: if i.is_multiple_of(5) {
                vec![Service::parse("dicom=104").unwrap()]
            } else {
                vec![]
            },
            lans: vec![],
        }
    }

    fn fleet(n: u32) -> Fleet {
        let mut f = Fleet::default();
        for i in 0..n {
            f.sites.insert(id(i), (site(i, 0), true));
        }
        f
    }

    fn base() -> ZoneData {
        ZoneData::empty("tether.internal", 5, vec!["100.64.0.0/10".parse().unwrap()])
    }

    fn rebuilt(f: &Fleet) -> ZoneData {
        Names::rebuild(f, base()).unwrap().0.data().clone()
    }

    #[test]
    fn a_zone_updated_site_by_site_is_the_zone_read_whole() {
        let mut f = fleet(300);
        let (mut names, _) = Names::rebuild(&f, base()).unwrap();
        // A small deterministic generator of changes.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |m: u32| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % u64::from(m)) as u32
        };
        for round in 0..400 {
            let mut marks = NameChanges::default();
            for _ in 0..=next(3) {
                let i = next(340);
                match next(6) {
                    // Enrolled (a new site, or one back), or revoked.
                    0 => {
                        let listed = f.sites.get(&id(i)).is_none_or(|(_, l)| !l);
                        f.sites.insert(id(i), (site(i, round), listed));
                        marks.sites.insert(id(i));
                    }
                    // A new address or a LAN mapped, from its leases:
                    // only the region is marked.
                    1 | 2 => {
                        if let Some((n, _)) = f.sites.get_mut(&id(i)) {
                            if next(2) == 0 {
                                n.addresses = site(i, round + 1).addresses;
                            } else {
                                n.lans = vec![
                                    Mapping::new(
                                        "192.168.1.0/24".parse().unwrap(),
                                        IpNet::new(IpAddr::from([100, 70, next(250) as u8, 0]), 24)
                                            .unwrap(),
                                    )
                                    .unwrap(),
                                ];
                            }
                            marks.regions.insert(n.region.clone());
                        }
                    }
                    // A session opens with other services.
                    3 => {
                        if let Some((n, _)) = f.sites.get_mut(&id(i)) {
                            n.services =
                                vec![Service::parse(&format!("http={}", 80 + round)).unwrap()];
                            marks.sites.insert(id(i));
                        }
                    }
                    // A change of no name at all.
                    4 => {
                        marks.sites.insert(id(i));
                    }
                    // Something that names no site.
                    _ => marks.all |= next(8) == 0,
                }
            }
            let before = names.data().clone();
            let work = names.apply(&f, &marks).unwrap();
            let whole = rebuilt(&f);
            assert_eq!(names.data(), &whole, "round {round}");
            assert_eq!(work.changed, !before.same_names(&whole), "round {round}");
            assert_eq!(work.rebuilt, marks.all, "round {round}");
        }
    }

    #[test]
    fn one_change_in_a_large_fleet_reads_that_site_only() {
        let mut f = fleet(2_000);
        let (mut names, work) = Names::rebuild(&f, base()).unwrap();
        assert_eq!(work.sites_read, 2_000);
        f.full_reads.set(0);
        // One site enrolls, one moves to another address (its record
        // marked), one is revoked.
        f.sites.insert(id(5_000), (site(5_000, 0), true));
        f.sites.get_mut(&id(7)).unwrap().0.addresses = site(7, 1).addresses;
        f.sites.get_mut(&id(1_999)).unwrap().1 = false;
        for s in [5_000, 7, 1_999] {
            let marks = NameChanges {
                sites: [id(s)].into(),
                ..NameChanges::default()
            };
            let work = names.apply(&f, &marks).unwrap();
            assert_eq!(
                (work.rebuilt, work.sites_read, work.changed),
                (false, 1, true)
            );
        }
        assert_eq!((f.full_reads.get(), f.site_reads.get()), (0, 3));
        // A LAN mapped, known from the region's leases: the region's
        // leases are compared in memory, one site is read.
        f.sites.get_mut(&id(10)).unwrap().0.lans = vec![
            Mapping::new(
                "192.168.1.0/24".parse().unwrap(),
                "100.70.0.0/24".parse().unwrap(),
            )
            .unwrap(),
        ];
        let marks = NameChanges {
            regions: [region(10)].into(),
            ..NameChanges::default()
        };
        let work = names.apply(&f, &marks).unwrap();
        assert_eq!((work.rebuilt, work.sites_read), (false, 1));
        assert_eq!(f.full_reads.get(), 0);
        assert_eq!(names.data(), &rebuilt(&f));
    }

    #[test]
    fn the_sites_whose_services_held_elsewhere_changed_are_read_again() {
        let held = |list: &[(u32, &str)]| -> HeldElsewhere {
            list.iter()
                .map(|(i, services)| (id(*i), Service::parse_list(services).unwrap()))
                .collect()
        };
        let old = held(&[(1, "dicom=104"), (2, "http=80"), (3, "pacs=4242")]);
        // Site 1 disconnected, site 2 announced other services, site 3 is
        // unchanged, site 4 connected elsewhere.
        let new = held(&[(2, "http=8080"), (3, "pacs=4242"), (4, "dicom=104")]);
        let mut changed: Vec<_> = differing(&old, &new).into_iter().cloned().collect();
        changed.sort();
        assert_eq!(changed, [id(1), id(2), id(4)]);
        assert!(differing(&new, &new).is_empty());
    }

    #[test]
    fn changes_are_gathered_longer_after_a_long_rebuild_but_never_past_the_bound() {
        assert_eq!(settle_after(Duration::ZERO), SETTLE);
        assert_eq!(
            settle_after(Duration::from_millis(100)),
            Duration::from_millis(400)
        );
        // A zone that takes seconds to rebuild still publishes a change
        // within the bound the docs give.
        assert_eq!(settle_after(Duration::from_secs(3)), SETTLE_MAX);
    }

    /// The names read from a real store (redb), with addresses from a map
    /// in memory as the core's leases give them.
    struct Stored<'a> {
        store: &'a dyn crate::store::Store,
        leased: &'a BTreeMap<SiteId, Vec<IpAddr>>,
    }

    impl Stored<'_> {
        fn names_of(&self, record: SiteRecord) -> Option<SiteNames> {
            super::names_of(self, record, |_| Vec::new())
        }
    }

    impl NameSource for Stored<'_> {
        fn all_sites(&self) -> Result<Vec<SiteNames>, BrokerError> {
            Ok(self
                .store
                .sites()?
                .into_iter()
                .filter_map(|r| self.names_of(r))
                .collect())
        }

        fn site_names(&self, site: &SiteId) -> Result<Option<SiteNames>, BrokerError> {
            Ok(self.store.site(site)?.and_then(|r| self.names_of(r)))
        }

        fn leased(&self, site: &SiteId, _region: &RegionId) -> (Vec<IpAddr>, Vec<Mapping>) {
            (
                self.leased.get(site).cloned().unwrap_or_default(),
                Vec::new(),
            )
        }
    }

    /// What one change costs, with every site read again (as before) and
    /// site by site, on an embedded store of `TETHER_ZONE_SITES` sites
    /// (50,000 when unset). Prints the figures; asserts none.
    /// `cargo test --release -p tether-broker --lib zone_update_cost -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement: run it by hand"]
    fn zone_update_cost() {
        use std::time::Instant;

        use crate::store::{RedbStore, Store, redb::Dump};

        let n: u32 = std::env::var("TETHER_ZONE_SITES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(50_000);
        let dir = tempfile::tempdir().unwrap();
        let mut dump = Dump::default();
        let mut leased = BTreeMap::new();
        for i in 0..n {
            let record = SiteRecord {
                site: id(i),
                region: region(i),
                created: 1_700_000_000,
                enrolled: Some(1_700_000_100),
                revoked: false,
                revoked_at: None,
            };
            dump.sites.insert(
                record.site.to_string(),
                serde_json::to_string(&record).unwrap(),
            );
            leased.insert(id(i), site(i, 0).addresses);
        }
        let store = RedbStore::create_from(&dir.path().join("store.redb"), &dump).unwrap();
        let source = Stored {
            store: &store,
            leased: &leased,
        };
        let (mut names, _) = Names::rebuild(&source, base()).unwrap();
        let rounds = 20;
        let mut full = std::time::Duration::ZERO;
        let mut one = std::time::Duration::ZERO;
        let mut publish = std::time::Duration::ZERO;
        for r in 0..rounds {
            // One site enrolls.
            let new = id(n + r);
            store
                .put_site(&SiteRecord {
                    site: new.clone(),
                    region: region(n + r),
                    created: 1_700_000_000,
                    enrolled: Some(1_700_000_200),
                    revoked: false,
                    revoked_at: None,
                })
                .unwrap();
            leased.insert(new.clone(), site(n + r, 0).addresses);
            let source = Stored {
                store: &store,
                leased: &leased,
            };
            let t = Instant::now();
            let (whole, _) = Names::rebuild(&source, base()).unwrap();
            full += t.elapsed();
            let t = Instant::now();
            let marks = NameChanges {
                sites: [new].into(),
                ..NameChanges::default()
            };
            let work = names.apply(&source, &marks).unwrap();
            one += t.elapsed();
            assert_eq!(work.sites_read, 1);
            assert_eq!(names.data(), whole.data());
            let t = Instant::now();
            let published = Arc::new(names.data().clone());
            publish += t.elapsed();
            drop(published);
        }
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3 / f64::from(rounds);
        println!(
            "{n} sites, {rounds} enrollments: every site read again {:.2} ms per change, \
             the changed site only {:.3} ms, copy of the zone data to publish {:.2} ms",
            ms(full),
            ms(one),
            ms(publish)
        );
    }
}
