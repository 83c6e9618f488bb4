//! The broker: the composition of its parts. Configuration, CA, store and
//! revocations; the broker core with the live sessions it keeps current
//! ([`CoreCell`], [`Sessions`]); the forwarding plane with its devices
//! ([`Plane`]); metrics, the mesh zone, and the totals of ended sessions.
//! The operations that span several parts (registering a session,
//! allocating addresses, tokens, revocation) are its methods.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime};

use ipnet::IpNet;
use tether_config::broker::BrokerConfig;
use tether_pki::reattest::RevokedBy;
use tether_pki::token::{self, EnrollmentCode};
use tether_pki::{CertSlot, RevocationSet, Revoked, SiteIdentity};
use tether_proto::api::{LanMappingInfo, SiteInfo, TokenResponse};
use tether_proto::broker::{
    Allocated, AllocationRequest, BrokerCore, CoreConfig, GatewaySpec, MAX_ALLOCATION_ATTEMPTS,
    OpenError, RegionPolicy, Revocation, SessionId, SiteRecordAction, TokenPolicy,
};
use tether_proto::dns::ZoneData;
use tether_proto::events::EventKind;
use tether_proto::gateway::SiteRoute;
use tether_proto::ids::{GatewayId, RegionId, SiteId};
use tether_proto::ipam::LeaseKind;
use tether_proto::netmap::Mapping;
use tokio::sync::{broadcast, watch};

use crate::core_cell::CoreCell;
use crate::counters::{SiteTotals, Totals};
use crate::error::BrokerError;
use crate::events::EventLog;
use crate::metrics::Metrics;
use crate::plane::Plane;
use crate::sessions::{Session, Sessions};
use crate::store::{CertRecord, SiteRecord, Store, StoreError, StoreEvent, now_unix};

/// The broker.
pub struct Broker {
    /// The validated configuration.
    pub config: BrokerConfig,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The CA: which one signs, which are trusted, rotation.
    pub ca: crate::authority::Authority,
    /// The store.
    pub store: Arc<dyn Store>,
    /// Revoked identities and serials.
    pub revocations: Arc<RevocationSet>,
    /// The server certificate in use.
    pub cert: Arc<CertSlot>,
    /// The admin API bearer token.
    pub admin_token: String,
    /// The read-only bearer token, once set.
    viewer_token: OnceLock<String>,
    /// The broker core: sessions, routes and policy, revocations, lease
    /// cache.
    core: Arc<CoreCell>,
    /// The current session of each site, kept in step with the core.
    sessions: Arc<Sessions>,
    /// The forwarding plane and its devices.
    plane: Arc<Plane>,
    /// Metric handles.
    metrics: Metrics,
    /// The tunnel listener's bound address (for enrollment responses).
    tunnel_addr: OnceLock<SocketAddr>,
    /// Bumped whenever the set of reachable prefixes changes.
    routes_version: watch::Sender<u64>,
    /// The mesh zone, rebuilt after each change of the names.
    zone: watch::Sender<Option<Arc<ZoneData>>>,
    /// Traffic of ended sessions.
    closed: Mutex<Totals>,
    /// The transport of each site's latest session, to count upgrades and
    /// fallbacks.
    last_transport: Mutex<HashMap<SiteId, tether_proto::tunnel::Transport>>,
    /// Traffic and drops of each site's ended sessions.
    site_closed: Mutex<HashMap<(SiteId, RegionId), SiteTotals>>,
    next_session: AtomicU64,
    /// The broker fleet, when the store is shared (etcd).
    fleet: OnceLock<Arc<crate::fleet::FleetHandle>>,
    /// Raised when the broker is going away (SIGTERM): every HTTP/3
    /// connection gets a GOAWAY, so its site moves to another broker.
    draining: watch::Sender<bool>,
    /// Bumped when the broker lost its hold on its sites (its fleet lease
    /// ran out): every HTTP/3 and HTTP/2 connection open at that moment
    /// gets a GOAWAY, so its site moves to a broker that can hold it.
    moves: watch::Sender<u64>,
    /// Each site's event timeline.
    events: EventLog,
    /// How many more problems each site may report now.
    report_budgets: Mutex<HashMap<SiteId, tether_proto::report::ReportBudget>>,
    /// The problems each site reported lately, stored or not.
    site_reports: crate::report_memory::ReportMemory,
}

/// The first wait before the store is read again after a failed read of
/// missed notices ([`Broker::follow_store`]).
pub const RESYNC_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(500);
/// The longest wait between two such reads.
pub const RESYNC_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// The core's name for a revocation entry.
fn revocation(entry: &Revoked) -> Revocation {
    match entry {
        Revoked::Site(id) => Revocation::Site {
            site: id.site.clone(),
            region: id.region.clone(),
        },
        Revoked::Serial(serial) => Revocation::Serial(serial.clone()),
    }
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Assembles the broker from its parts; loads revocations and leases
    /// from the store.
    pub fn new(
        config: BrokerConfig,
        data_dir: PathBuf,
        ca: crate::authority::Authority,
        store: Arc<dyn Store>,
        cert: Arc<CertSlot>,
        admin_token: String,
    ) -> Result<Arc<Self>, BrokerError> {
        let entries = store.revocations()?;
        let core = BrokerCore::new(CoreConfig {
            regions: config
                .regions
                .iter()
                .map(|(r, c)| {
                    (
                        r.clone(),
                        RegionPolicy {
                            pools: c.pools.clone(),
                            allow_gateways_from: c.allow_gateways_from.clone(),
                        },
                    )
                })
                .collect(),
            ipam: config.ipam.clone(),
            // The backend networks behind every gateway, local or over
            // WireGuard.
            gateways: config
                .local_gateway
                .iter()
                .map(|g| GatewaySpec {
                    id: g.id.clone(),
                    region: g.region.clone(),
                    prefixes: g.prefixes.clone(),
                    local: true,
                })
                .chain(config.gateways.iter().map(|g| GatewaySpec {
                    id: g.id.clone(),
                    region: g.region.clone(),
                    prefixes: g.prefixes.clone(),
                    local: false,
                }))
                .collect(),
            tokens: TokenPolicy {
                default_ttl: config.token_ttl,
                max_ttl: tether_proto::broker::admission::MAX_TOKEN_TTL,
            },
            revoked: entries.iter().map(revocation).collect(),
            max_allocation_attempts: MAX_ALLOCATION_ATTEMPTS,
            access_policy: config.policy.clone(),
        });
        let mut core = core;
        for region in config.regions.keys() {
            core.handle_leases(region.clone(), store.region_leases(region)?);
        }
        let revocations = Arc::new(RevocationSet::from_entries(entries));
        let events = EventLog::open(store.clone())?;
        let sessions = Arc::new(Sessions::default());
        let core = Arc::new(CoreCell::new(core, sessions.clone()));
        let metrics = Metrics::register();
        let plane = Arc::new(Plane::new(core.clone(), sessions.clone(), metrics.clone()));
        Ok(Arc::new(Self {
            config,
            data_dir,
            ca,
            store,
            revocations,
            cert,
            admin_token,
            viewer_token: OnceLock::new(),
            core,
            sessions,
            plane,
            metrics,
            tunnel_addr: OnceLock::new(),
            routes_version: watch::channel(0).0,
            zone: watch::channel(None).0,
            closed: Mutex::new(Totals::default()),
            site_closed: Mutex::new(HashMap::new()),
            last_transport: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(0),
            fleet: OnceLock::new(),
            draining: watch::channel(false).0,
            moves: watch::channel(0).0,
            events,
            report_budgets: Mutex::new(HashMap::new()),
            site_reports: crate::report_memory::ReportMemory::default(),
        }))
    }

    /// The broker core, with the routing state for packets
    /// ([`CoreCell::read`]).
    pub fn core(&self) -> &CoreCell {
        &self.core
    }

    /// The broker core, shared (for tasks that outlive a borrow).
    pub fn core_cell(&self) -> Arc<CoreCell> {
        self.core.clone()
    }

    /// Whether the broker is going away, as it changes.
    pub fn draining(&self) -> watch::Receiver<bool> {
        self.draining.subscribe()
    }

    /// Tells every connection that the broker is going away.
    pub fn start_draining(&self) {
        self.draining.send_replace(true);
    }

    /// Bumped each time the sites connected now are asked to move.
    pub fn moves(&self) -> watch::Receiver<u64> {
        self.moves.subscribe()
    }

    /// Asks every connection open now to move to another broker (HTTP/3
    /// or HTTP/2 GOAWAY); the broker keeps serving those that cannot.
    pub fn ask_sites_to_move(&self) {
        self.moves.send_modify(|m| *m += 1);
    }

    /// The current session of each site.
    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    /// The forwarding plane and its devices.
    pub fn plane(&self) -> &Arc<Plane> {
        &self.plane
    }

    /// Metric handles.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The read-only token of the admin API, if one is set.
    pub fn viewer_token(&self) -> Option<&str> {
        self.viewer_token.get().map(String::as_str)
    }

    /// Sets the read-only token (the first one counts).
    pub fn set_viewer_token(&self, token: String) {
        let _ = self.viewer_token.set(token);
    }

    /// Each site's event timeline.
    pub fn events(&self) -> &EventLog {
        &self.events
    }

    /// Records that `kind` happened to `site`, as seen by this broker
    /// (named by the first endpoint sites dial).
    pub fn record_event(&self, site: &SiteId, kind: EventKind) {
        let name = self.event_name();
        self.events.record(site, name, kind);
    }

    /// This broker's name in the events it records: the first endpoint
    /// sites dial, else its tunnel address.
    fn event_name(&self) -> String {
        self.enroll_endpoints()
            .into_iter()
            .next()
            .or_else(|| self.tunnel_addr().map(|a| a.to_string()))
            .unwrap_or_else(|| "broker".into())
    }

    /// The problems each site reported lately: what was stored, and the
    /// repeats kept in memory instead.
    pub fn site_reports(&self) -> &crate::report_memory::ReportMemory {
        &self.site_reports
    }

    /// A site's events as operators see them at this broker: the newest
    /// `n` stored ones, then the problems it reported since that were kept
    /// in memory, not stored.
    pub fn site_events_view(
        &self,
        site: &SiteId,
        timeline: &tether_proto::events::Timeline,
        n: usize,
    ) -> Vec<tether_proto::events::SiteEvent> {
        let name = self.event_name();
        let mut events = timeline.newest(n);
        events.extend(self.site_reports.unstored(site, &name));
        let skip = events.len().saturating_sub(n);
        events.drain(..skip);
        events
    }

    /// How many of `wanted` problems `site` may have stored now
    /// ([`tether_proto::report::ReportBudget`]). Sites whose budget is
    /// full again are forgotten once many are kept, so the map holds
    /// about the sites that reported lately.
    pub fn admit_reports(&self, site: &SiteId, wanted: usize) -> usize {
        let now = std::time::Instant::now();
        let Ok(mut budgets) = self.report_budgets.lock() else {
            return 0;
        };
        if budgets.len() >= 4096 && !budgets.contains_key(site) {
            budgets.retain(|_, b| !b.is_full(now));
        }
        budgets
            .entry(site.clone())
            .or_insert_with(|| tether_proto::report::ReportBudget::new(now))
            .admit(wanted, now)
    }

    /// The broker fleet, when the store is shared.
    pub fn fleet(&self) -> Option<&Arc<crate::fleet::FleetHandle>> {
        self.fleet.get()
    }

    /// Joins the fleet (once).
    pub fn set_fleet(&self, fleet: Arc<crate::fleet::FleetHandle>) {
        let _ = self.fleet.set(fleet);
    }

    /// The broker endpoints a site of `region` should know, with the
    /// version of the fleet's membership: this broker's own first, then
    /// every other live broker serving the region.
    pub fn site_brokers(&self, region: &RegionId) -> (u64, Vec<String>) {
        let own = self.enroll_endpoints();
        match self.fleet() {
            Some(fleet) => fleet.endpoints_for(region, &own),
            None => (0, own),
        }
    }

    /// The tunnel listener's bound address, once it is bound.
    pub fn tunnel_addr(&self) -> Option<SocketAddr> {
        self.tunnel_addr.get().copied()
    }

    /// Records the tunnel listener's bound address (the first one counts).
    pub fn set_tunnel_addr(&self, addr: SocketAddr) {
        let _ = self.tunnel_addr.set(addr);
    }

    /// Changes to the set of prefixes sites may reach.
    pub fn reachable_changes(&self) -> watch::Receiver<u64> {
        self.routes_version.subscribe()
    }

    /// The mesh zone, once it has been built.
    pub fn zone(&self) -> Option<Arc<ZoneData>> {
        self.zone.borrow().clone()
    }

    /// Publishes a new mesh zone.
    pub fn publish_zone(&self, zone: Arc<ZoneData>) {
        self.zone.send_replace(Some(zone));
    }

    /// Each mesh zone as it is published.
    pub fn zone_changes(&self) -> watch::Receiver<Option<Arc<ZoneData>>> {
        self.zone.subscribe()
    }

    /// The pools of every region.
    pub fn pools(&self) -> BTreeMap<RegionId, Vec<IpNet>> {
        self.config
            .regions
            .iter()
            .map(|(r, c)| (r.clone(), c.pools.clone()))
            .collect()
    }

    /// What a site of `region` may reach.
    pub fn reachable_from(&self, region: &RegionId) -> Vec<IpNet> {
        self.core
            .read()
            .map(|r| r.reachable_from(region, &self.pools()))
            .unwrap_or_default()
    }

    /// Runs an allocation to its end against the store. Blocking: call
    /// from a blocking context.
    fn allocate(&self, request: AllocationRequest) -> Result<Allocated, BrokerError> {
        Ok(self.core.allocate(self.store.as_ref(), request)?)
    }

    /// Runs `f` on the core and carries out its events
    /// ([`CoreCell::decide`]).
    pub fn decide<T>(&self, f: impl FnOnce(&mut BrokerCore) -> T) -> Result<T, BrokerError> {
        self.core.decide(f).map_err(|_| BrokerError::Contention)
    }

    /// The site's stable addresses (one per family with pools) and existing
    /// LAN mappings, allocating addresses as needed. Blocking.
    pub fn site_addresses(
        &self,
        site: &SiteId,
        region: &RegionId,
    ) -> Result<(Vec<IpNet>, Vec<IpNet>), BrokerError> {
        match self.allocate(AllocationRequest::SiteAddresses {
            site: site.clone(),
            region: region.clone(),
        })? {
            Allocated::SiteAddresses { addresses, lans } => {
                // Its addresses have names in the zone.
                self.core.site_names_changed(site);
                Ok((addresses, lans))
            }
            Allocated::LanMapping(_) | Allocated::Released(_) | Allocated::Marked(_) => {
                Err(BrokerError::Contention)
            }
        }
    }

    /// Frees every address and LAN mapping of a revoked site, for other
    /// sites to take; returns the prefixes freed. Blocking.
    pub fn release_revoked(
        &self,
        site: &SiteId,
        region: &RegionId,
    ) -> Result<Vec<IpNet>, BrokerError> {
        let Some(record) = self.store.site(site)?.filter(|r| &r.region == region) else {
            return Err(BrokerError::UnknownSite {
                site: site.clone(),
                region: region.clone(),
            });
        };
        if !record.revoked {
            return Err(BrokerError::NotRevoked(site.clone()));
        }
        // The store's record is the authority: the core may not have seen
        // the revocation's notice yet.
        self.on_revoked(&Revoked::Site(self.identity(site, region)));
        match self.allocate(AllocationRequest::ReleaseRevoked {
            site: site.clone(),
            region: region.clone(),
        })? {
            Allocated::Released(freed) => Ok(freed),
            Allocated::SiteAddresses { .. } | Allocated::LanMapping(_) | Allocated::Marked(_) => {
                Err(BrokerError::Contention)
            }
        }
    }

    /// Maps a LAN behind a site. Blocking.
    pub fn map_lan(
        &self,
        site: &SiteId,
        region: &RegionId,
        lan: IpNet,
    ) -> Result<IpNet, BrokerError> {
        match self.allocate(AllocationRequest::LanMapping {
            site: site.clone(),
            region: region.clone(),
            lan,
        })? {
            Allocated::LanMapping(prefix) => {
                // The LAN's hosts have names in the zone.
                self.core.site_names_changed(site);
                Ok(prefix)
            }
            Allocated::SiteAddresses { .. } | Allocated::Released(_) | Allocated::Marked(_) => {
                Err(BrokerError::Contention)
            }
        }
    }

    /// Records which of a connected site's LAN mappings it uses: `in_use`
    /// are the mapped prefixes it routes. A mapping it no longer routes is
    /// kept for the region's `lan_release_after`, then released; one it
    /// routes again keeps its prefix. Blocking.
    pub fn mark_lans(
        &self,
        site: &SiteId,
        region: &RegionId,
        in_use: Vec<IpNet>,
    ) -> Result<(), BrokerError> {
        let marked = match self.allocate(AllocationRequest::MarkLans {
            site: site.clone(),
            region: region.clone(),
            in_use,
            now: now_unix(),
        })? {
            Allocated::Marked(marked) => marked,
            _ => return Err(BrokerError::Contention),
        };
        for lease in &marked {
            let LeaseKind::LanMapping { lan } = lease.kind else {
                continue;
            };
            match lease.release_at {
                Some(at) => tracing::info!(
                    %site, %lan, mapped = %lease.prefix,
                    release_at = %humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(at)),
                    "LAN no longer routed by the site; its mapping is kept until then for the site to map the LAN again"
                ),
                None => {
                    tracing::info!(%site, %lan, mapped = %lease.prefix, "LAN routed again; it keeps its mapping")
                }
            }
        }
        if !marked.is_empty() {
            // Names of unused LANs leave the zone, those back in use return.
            self.core.site_names_changed(site);
        }
        Ok(())
    }

    /// Releases, in every region, the LAN mappings whose grace period
    /// ended; returns the prefixes freed. Reads the cache first and writes
    /// only when something is due. Blocking.
    pub fn release_due_lans(&self) -> Result<Vec<IpNet>, BrokerError> {
        let now = now_unix();
        let due: Vec<RegionId> = match self.core.core() {
            Ok(core) => self
                .config
                .regions
                .keys()
                .filter(|r| {
                    core.leases(r)
                        .and_then(|l| l.next_release())
                        .is_some_and(|at| at <= now)
                })
                .cloned()
                .collect(),
            Err(_) => return Err(BrokerError::Contention),
        };
        let mut freed = Vec::new();
        for region in due {
            match self.allocate(AllocationRequest::ReleaseDue {
                region: region.clone(),
                now,
            })? {
                Allocated::Released(prefixes) => {
                    for prefix in &prefixes {
                        tracing::info!(%region, %prefix, "unused LAN mapping released");
                    }
                    crate::metrics::lan_mappings_released(prefixes.len());
                    freed.extend(prefixes);
                }
                _ => return Err(BrokerError::Contention),
            }
        }
        if !freed.is_empty() {
            self.names_changed();
        }
        Ok(freed)
    }

    /// The site's own overlay addresses (not its LAN mappings).
    pub fn host_addresses(&self, site: &SiteId, region: &RegionId) -> Vec<IpAddr> {
        self.core
            .core()
            .map(|c| c.host_addresses(site, region))
            .unwrap_or_default()
    }

    /// Says that a name in the mesh zone may have changed.
    pub fn names_changed(&self) {
        self.core.names_changed();
    }

    /// The LANs mapped behind a site, as its leases record them.
    pub fn lan_mappings(&self, site: &SiteId, region: &RegionId) -> Vec<Mapping> {
        self.core
            .core()
            .ok()
            .and_then(|c| {
                c.leases(region).map(|l| {
                    l.of_site(site)
                        .filter(|l| l.in_use())
                        .filter_map(|l| match l.kind {
                            LeaseKind::LanMapping { lan } => Mapping::new(lan, l.prefix).ok(),
                            LeaseKind::SiteAddress => None,
                        })
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// Every site's own addresses and LAN mappings (the real LAN with the
    /// prefix it is mapped to), from one pass over the leases.
    pub fn addresses_by_site(&self) -> HashMap<SiteId, (Vec<IpNet>, Vec<LanMappingInfo>)> {
        let mut out: HashMap<SiteId, (Vec<IpNet>, Vec<LanMappingInfo>)> = HashMap::new();
        let Ok(core) = self.core.core() else {
            return out;
        };
        for region in self.config.regions.keys() {
            let Some(leases) = core.leases(region) else {
                continue;
            };
            for lease in leases.leases() {
                let entry = out.entry(lease.site.clone()).or_default();
                match lease.kind {
                    LeaseKind::SiteAddress => entry.0.push(lease.prefix),
                    LeaseKind::LanMapping { lan } => entry.1.push(LanMappingInfo {
                        lan,
                        mapped: lease.prefix,
                        release_at: lease.release_at,
                    }),
                }
            }
        }
        out
    }

    /// A fresh session identifier.
    pub fn next_session_id(&self) -> SessionId {
        SessionId(self.next_session.fetch_add(1, Ordering::Relaxed))
    }

    /// Registers a session and installs its routes, replacing (and closing)
    /// an older one of the same site, unless the core refuses it (revoked
    /// meanwhile, or older than the site's current session).
    pub fn register(&self, session: Arc<Session>, addresses: &[IpNet]) -> Result<(), OpenError> {
        let site = session.site().clone();
        let registered = self.core.open_session(&session, addresses);
        let transport = session.link.transport();
        let previous = self
            .last_transport
            .lock()
            .ok()
            .and_then(|mut last| last.insert(site.clone(), transport));
        if previous.is_some_and(|p| p != transport) {
            tracing::info!(%site, from = %previous.map(|p| p.as_str()).unwrap_or_default(), to = %transport, "site changed transport");
        }
        self.metrics.session_opened(transport, previous);
        if registered.is_ok()
            && let Some(fleet) = self.fleet()
        {
            if fleet.held_elsewhere(&site) {
                crate::metrics::failover();
            }
            fleet.claim(&site);
        }
        registered
    }

    /// Removes a session if it is still the current one for its site, with
    /// its routes.
    pub fn unregister(&self, session: &Arc<Session>) {
        self.core.close_session(session);
        if let Some(fleet) = self.fleet()
            && self.sessions.get(session.site()).is_none()
        {
            fleet.release(session.site());
        }
        let ended = session.totals();
        if let Ok(mut closed) = self.closed.lock() {
            closed.add(&ended.traffic);
        }
        if let Ok(mut per_site) = self.site_closed.lock() {
            per_site
                .entry((session.site().clone(), session.region().clone()))
                .or_default()
                .add(&ended);
        }
        self.metrics.session_ended(session.link.transport());
    }

    /// Replaces the LAN routes of a session with `prefixes`, if it is still
    /// its site's current session.
    pub fn set_lan_routes(&self, session: &Session, prefixes: &[IpNet]) {
        self.core.set_lan_routes(session, prefixes);
    }

    /// The session of a site.
    pub fn session(&self, site: &SiteId) -> Option<Arc<Session>> {
        self.sessions.get(site)
    }

    /// The identity of a site.
    pub fn identity(&self, site: &SiteId, region: &RegionId) -> SiteIdentity {
        SiteIdentity::new(self.ca.trust_domain().clone(), region.clone(), site.clone())
    }

    /// Creates an enrollment token for a site, registering the site (or
    /// re-admitting it after a revocation). Blocking.
    pub fn create_token(
        &self,
        site: &SiteId,
        region: &RegionId,
        ttl: Option<&str>,
    ) -> Result<TokenResponse, BrokerError> {
        let ttl = {
            let core = self.core.core().map_err(|_| BrokerError::Contention)?;
            core.token_region(region)?;
            let requested = match ttl {
                Some(text) => Some(humantime::parse_duration(text).map_err(|e| {
                    BrokerError::BadInput(format!(
                        "ttl {text:?} is not a duration ({e}); write e.g. \"24h\""
                    ))
                })?),
                None => None,
            };
            core.token_ttl(requested)?
        };
        // The store is read without holding the core.
        let existing = self.store.site(site)?;
        let action = self
            .core
            .core()
            .map_err(|_| BrokerError::Contention)?
            .token_record(
                site,
                region,
                existing.as_ref().map(|r| (&r.region, r.revoked)),
            )?;
        match (action, existing) {
            (SiteRecordAction::Readmit, Some(mut existing)) => {
                // Re-admission: the identity works again, but the
                // certificates issued before the revocation stay revoked.
                for cert in self.store.certs_of(site)? {
                    if let Ok(serial) = data_encoding::HEXLOWER.decode(cert.serial.as_bytes()) {
                        let entry = Revoked::Serial(serial);
                        self.store.revoke(&entry)?;
                        self.revocations.revoke(entry);
                    }
                }
                let entry = Revoked::Site(self.identity(site, region));
                self.store.reinstate(&entry)?;
                self.revocations.reinstate(&entry);
                self.decide(|core| core.handle_reinstatement(&revocation(&entry)))?;
                existing.revoked = false;
                existing.revoked_at = None;
                self.store.put_site(&existing)?;
                self.record_event(site, EventKind::Readmitted);
            }
            (SiteRecordAction::Create, _) => self.store.put_site(&SiteRecord {
                site: site.clone(),
                region: region.clone(),
                created: now_unix(),
                enrolled: None,
                revoked: false,
                revoked_at: None,
            })?,
            _ => {}
        }
        let issued = token::generate(site.clone(), region.clone(), SystemTime::now(), ttl);
        self.store.put(issued.record.clone()).map_err(StoreError)?;
        let code = EnrollmentCode::format(
            &issued.secret,
            &tether_pki::tls::ca_pin(&self.ca.cert_der()),
        );
        let brokers = self.enroll_endpoints();
        let broker = brokers
            .first()
            .cloned()
            .unwrap_or_else(|| "<broker>".into());
        Ok(TokenResponse {
            enroll_command: format!("tether enroll --broker {broker} --token {code}"),
            brokers,
            published_cidr: self.config.published_cidr.to_string(),
            code,
            site: site.clone(),
            region: region.clone(),
            expires_at: token::unix_secs(issued.record.expires_at),
        })
    }

    /// Endpoints sites dial, `host:port`.
    pub fn enroll_endpoints(&self) -> Vec<String> {
        let port = self
            .tunnel_addr()
            .map(|a| a.port())
            .or_else(|| self.config.listen.first().map(|a| a.port()))
            .unwrap_or(443);
        let mut out: Vec<String> = self
            .config
            .advertised_ips
            .iter()
            .map(|ip| SocketAddr::new(*ip, port).to_string())
            .collect();
        out.extend(
            self.config
                .advertised_names
                .iter()
                .map(|n| format!("{n}:{port}")),
        );
        out
    }

    /// Revokes a site: refuses its certificates from now on and closes its
    /// live tunnel. Returns whether a session was closed. Blocking.
    pub fn revoke_site(&self, site: &SiteId, region: &RegionId) -> Result<bool, BrokerError> {
        let Some(mut record) = self.store.site(site)?.filter(|r| &r.region == region) else {
            return Err(BrokerError::UnknownSite {
                site: site.clone(),
                region: region.clone(),
            });
        };
        // Whether it was connected is read first: once the revocation is in
        // the store, its notice (or the listener of `revocations.revoke`)
        // may close the session before this function goes on.
        let connected = self.session(site).is_some();
        record.revoked = true;
        record.revoked_at = Some(now_unix());
        self.store.put_site(&record)?;
        let entry = Revoked::Site(self.identity(site, region));
        self.store.revoke(&entry)?;
        self.record_event(site, EventKind::Revoked);
        self.revocations.revoke(entry);
        self.core.site_names_changed(site);
        Ok(connected)
    }

    /// Which revocation, if any, applies to the certificate `serial` of
    /// `identity`, whose site record (in its region) is `record`: the one
    /// decision renewal and re-attestation share. It weighs what the TLS
    /// verifier checks at every handshake (the revocation set) and the
    /// store itself, so a revocation another broker wrote, whose notice has
    /// not arrived yet, already counts. Blocking.
    pub fn revoked_by(
        &self,
        identity: &SiteIdentity,
        serial: &[u8],
        record: Option<&SiteRecord>,
    ) -> Result<Option<RevokedBy>, BrokerError> {
        if let Some(r) = record.filter(|r| r.revoked) {
            return Ok(Some(RevokedBy::Site(
                r.revoked_at.map(token::from_unix_secs),
            )));
        }
        let site = Revoked::Site(identity.clone());
        if self.revocations.is_revoked(identity, &[]) || self.store.is_revoked(&site)? {
            return Ok(Some(RevokedBy::Site(None)));
        }
        let certificate = Revoked::Serial(serial.to_vec());
        if self.revocations.is_revoked(identity, serial) || self.store.is_revoked(&certificate)? {
            return Ok(Some(RevokedBy::Certificate));
        }
        Ok(None)
    }

    /// Records an issued site certificate, with the hash of its key (which
    /// re-attestation checks), and the enrollment time. Blocking.
    pub fn record_issued(
        &self,
        identity: &SiteIdentity,
        cert: &tether_pki::IssuedCert,
    ) -> Result<(), BrokerError> {
        let spki_sha256 = tether_pki::reattest::spki_sha256(&cert.der)
            .map_err(|e| BrokerError::BadInput(e.to_string()))?;
        self.store.put_cert(&CertRecord {
            serial: data_encoding::HEXLOWER.encode(&cert.serial),
            site: identity.site.clone(),
            region: identity.region.clone(),
            not_after: token::unix_secs(cert.not_after),
            spki_sha256: Some(spki_sha256),
        })?;
        if let Some(mut record) = self.store.site(&identity.site)? {
            record.enrolled = Some(now_unix());
            self.store.put_site(&record)?;
        }
        self.core.site_names_changed(&identity.site);
        Ok(())
    }

    /// Every site, with addresses and live session.
    pub fn site_infos(&self) -> Result<Vec<SiteInfo>, BrokerError> {
        let mut leases = self.addresses_by_site();
        let mut out: Vec<SiteInfo> = self
            .store
            .sites()?
            .into_iter()
            .map(|r| {
                let (addresses, lans) = leases.remove(&r.site).unwrap_or_default();
                SiteInfo {
                    addresses,
                    lans,
                    session: self.session(&r.site).map(|s| s.info()),
                    broker: None,
                    enrolled: r.enrolled.is_some(),
                    revoked: r.revoked,
                    site: r.site,
                    region: r.region,
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.region, &a.site).cmp(&(&b.region, &b.site)));
        Ok(out)
    }

    /// Ends sessions whose identity or certificate was revoked, with their
    /// routes, and refuses later ones. An entry lifted meanwhile (the site
    /// was re-admitted before this notice arrived) is ignored.
    pub fn on_revoked(&self, entry: &Revoked) {
        let _ = self.decide(|core| {
            if self.revocations.entries().contains(entry) {
                core.handle_revocation(revocation(entry), Instant::now());
            }
        });
    }

    /// A change in the store, made by this broker or another one sharing
    /// the store: revocations and re-admissions reach the TLS verifier and
    /// the core, other brokers' allocations the core's cache of leases,
    /// site records the mesh zone. Each notice is checked against the
    /// store's present state before it is applied, so a notice that arrives
    /// late (a revocation already lifted, a re-admission already revoked
    /// again) changes nothing. Blocking.
    pub fn on_store_event(&self, event: StoreEvent) -> Result<(), BrokerError> {
        match event {
            StoreEvent::Revoked(entry) => self.apply_revocation(entry, &self.store.revocations()?),
            StoreEvent::Reinstated(entry) => {
                self.apply_reinstatement(&entry, &self.store.revocations()?)
            }
            StoreEvent::Leases(region) => {
                if self.config.regions.contains_key(&region) {
                    // Reading every lease of the region is skipped when
                    // the cache is at the store's version (this broker's
                    // own commit): one key instead of the whole region on
                    // every allocation. Compared between allocations: one
                    // committed but not yet applied would look like
                    // another writer's.
                    let _paused = self
                        .core
                        .pause_allocations()
                        .map_err(|_| BrokerError::Contention)?;
                    let version = self.store.lease_version(&region)?;
                    let stale = self
                        .core
                        .core()
                        .map_err(|_| BrokerError::Contention)?
                        .needs_leases(&region, version);
                    if stale {
                        self.core
                            .lease_reads()
                            .notice
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let leases = self.store.region_leases(&region)?;
                        self.decide(|core| core.handle_leases(region.clone(), leases))?;
                    }
                    self.core.region_names_changed(&region);
                }
                Ok(())
            }
            StoreEvent::Site(site) => {
                self.core.site_names_changed(&site);
                Ok(())
            }
            // Another broker's events of a site (or the echo of this
            // broker's): the site's summary follows the store.
            StoreEvent::Events(site) => Ok(self.events.refresh(&site)?),
            StoreEvent::Ca => {
                if let Err(e) = self.ca.reload() {
                    tracing::error!(error = %e, "cannot apply the changed CA state; the previous one stays in use");
                }
                Ok(())
            }
            StoreEvent::Lost => self.resync_from_store(),
        }
    }

    /// Applies the store's notices (`events`, from [`Store::watch`]) until
    /// the store closes the channel. A notice that cannot be applied (the
    /// store did not answer the read that checks it), notices lost because
    /// this receiver lagged, and changes the store's watch missed
    /// ([`StoreEvent::Lost`]) all lead to a full read of the store
    /// ([`resync_from_store`](Self::resync_from_store)), retried with a
    /// backoff ([`RESYNC_RETRY_FIRST`] doubling to [`RESYNC_RETRY_MAX`])
    /// until it succeeds: no revocation is dropped because etcd failed
    /// once, and no site's event another broker recorded meanwhile is
    /// missing here (every timeline is read again).
    pub async fn follow_store(self: Arc<Self>, mut events: broadcast::Receiver<StoreEvent>) {
        use tokio::sync::broadcast::error::RecvError;
        let mut owed = false;
        let mut retry = RESYNC_RETRY_FIRST;
        loop {
            if owed {
                let broker = self.clone();
                let read = tokio::task::spawn_blocking(move || {
                    broker.resync_from_store()?;
                    broker.events.reload()?;
                    Ok::<_, BrokerError>(())
                })
                .await;
                match read {
                    Ok(Ok(())) => {
                        tracing::info!("the store was read again; its missed notices are applied");
                        owed = false;
                        retry = RESYNC_RETRY_FIRST;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, retry_in = ?retry, "cannot read the store again after missed notices; retrying");
                        // Notices arriving meanwhile are read after the
                        // wait (a lag only means another full read).
                        tokio::time::sleep(retry).await;
                        retry = (retry * 2).min(RESYNC_RETRY_MAX);
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "store re-read task failed");
                        tokio::time::sleep(retry).await;
                        continue;
                    }
                }
            }
            let event = match events.recv().await {
                Ok(event) => event,
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "store notices lost; reading the store again");
                    owed = true;
                    continue;
                }
                Err(RecvError::Closed) => return,
            };
            if event == StoreEvent::Lost {
                tracing::warn!("the store's watch missed changes; reading the store again");
                owed = true;
                continue;
            }
            let broker = self.clone();
            let applied = tokio::task::spawn_blocking(move || broker.on_store_event(event)).await;
            let failed = match applied {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            };
            tracing::warn!(error = %failed, "cannot apply a store notice; reading the store again");
            owed = true;
        }
    }

    /// A revocation the store holds (`stored`), new here: the listener of
    /// `revocations` ends the sessions it names. An echo of one this broker
    /// made changes nothing.
    fn apply_revocation(&self, entry: Revoked, stored: &[Revoked]) -> Result<(), BrokerError> {
        if stored.contains(&entry) {
            let site = match &entry {
                Revoked::Site(identity) => Some(identity.site.clone()),
                Revoked::Serial(_) => None,
            };
            if self.revocations.revoke(entry) {
                match site {
                    Some(site) => self.core.site_names_changed(&site),
                    None => self.names_changed(),
                }
            }
        }
        Ok(())
    }

    /// A re-admission the store confirms (the entry is not in `stored`),
    /// not yet applied here.
    fn apply_reinstatement(&self, entry: &Revoked, stored: &[Revoked]) -> Result<(), BrokerError> {
        if !stored.contains(entry) && self.revocations.reinstate(entry) {
            self.decide(|core| core.handle_reinstatement(&revocation(entry)))?;
            self.names_changed();
        }
        Ok(())
    }

    /// Reads everything the store's notices would have said, after notices
    /// were lost (the receiver lagged, the store's watch missed changes, a
    /// notice could not be applied): every revocation (read once), every
    /// region's leases, the CA state; the mesh zone is rebuilt. Blocking.
    pub fn resync_from_store(&self) -> Result<(), BrokerError> {
        let stored = self.store.revocations()?;
        for entry in self.revocations.entries() {
            self.apply_reinstatement(&entry, &stored)?;
        }
        for entry in stored.clone() {
            self.apply_revocation(entry, &stored)?;
        }
        for region in self.config.regions.keys() {
            self.on_store_event(StoreEvent::Leases(region.clone()))?;
        }
        // Site records (the mesh zone) and the CA state may have changed
        // too.
        self.names_changed();
        if let Err(e) = self.ca.reload() {
            tracing::error!(error = %e, "cannot apply the CA state read again; the previous one stays in use");
        }
        Ok(())
    }

    /// The gateway id of the local gateway, if any.
    pub fn local_gateway_id(&self) -> Option<&GatewayId> {
        self.config.local_gateway.as_ref().map(|g| &g.id)
    }
}

impl Broker {
    /// Traffic and drops of every site that had a session, ended and live.
    pub fn site_totals(&self) -> Vec<(SiteId, RegionId, SiteTotals)> {
        let mut all = self
            .site_closed
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default();
        for s in self.sessions.all() {
            all.entry((s.site().clone(), s.region().clone()))
                .or_default()
                .add(&s.totals());
        }
        let mut out: Vec<_> = all.into_iter().map(|((s, r), t)| (s, r, t)).collect();
        out.sort_by(|a, b| (&a.1, &a.0).cmp(&(&b.1, &b.0)));
        out
    }

    /// The traffic totals for the metrics endpoint.
    pub fn traffic(&self) -> crate::metrics::Traffic {
        let t = self.totals();
        let (mut from_gateways, mut to_gateways) = (0, 0);
        if let Some(gw) = self.plane.local_gateway() {
            from_gateways += gw.counters.rx.get().0;
            to_gateways += gw.counters.tx.get().0;
        }
        let mut peers = Vec::new();
        if let Some(wg) = self.plane.wireguard() {
            for peer in wg.peers() {
                from_gateways += peer.counters.rx.get().0;
                to_gateways += peer.counters.tx.get().0;
                peers.push(crate::metrics::PeerTraffic {
                    id: peer.id.to_string(),
                    rx_bytes: peer.counters.rx.get().1,
                    tx_bytes: peer.counters.tx.get().1,
                });
            }
        }
        let brokers = self
            .plane
            .link()
            .map(|link| {
                link.peers()
                    .iter()
                    .map(|p| crate::metrics::BrokerTraffic {
                        id: p.id.clone(),
                        from_broker: p.counters.rx.get(),
                        to_broker: p.counters.tx.get(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let sites = self
            .site_totals()
            .into_iter()
            .map(|(site, region, t)| crate::metrics::SiteTraffic {
                site: site.to_string(),
                region: region.to_string(),
                from_site: (t.traffic.rx_packets, t.traffic.rx_bytes),
                to_site: (t.traffic.tx_packets, t.traffic.tx_bytes),
                drops: t.drops,
            })
            .collect();
        crate::metrics::Traffic {
            from_sites: (t.rx_packets, t.rx_bytes),
            to_sites: (t.tx_packets, t.tx_bytes),
            from_gateways,
            to_gateways,
            peers,
            brokers,
            sites,
        }
    }

    /// Traffic totals of all sessions, ended and live.
    pub fn totals(&self) -> Totals {
        let mut t = self.closed.lock().map(|c| *c).unwrap_or_default();
        for s in self.sessions.all() {
            t.add(&Totals::of(&s.counters));
        }
        t
    }
}

/// What gateways over WireGuard are told: the site routes their region may
/// reach, on this broker and on the others of the fleet, and the mesh zone
/// as their region may see it.
impl crate::wireguard::GatewayControl for Broker {
    fn site_routes(&self, region: &RegionId) -> (u64, Vec<SiteRoute>) {
        let generation = self.core.routes_generation();
        match self.core.read() {
            Ok(router) => (generation, router.gateway_site_routes(region)),
            Err(_) => (generation, Vec::new()),
        }
    }

    fn zone(&self, region: &RegionId) -> Option<ZoneData> {
        let zone = self.zone()?;
        let router = self.core.read().ok()?;
        Some(zone.filtered(|site_region| router.residency.permits(site_region, region)))
    }

    fn route_changes(&self) -> watch::Receiver<u64> {
        self.core.route_changes()
    }

    fn zone_changes(&self) -> watch::Receiver<Option<Arc<ZoneData>>> {
        self.zone_changes()
    }

    fn draining(&self) -> bool {
        // Stopping, or fenced (until the next etcd lease).
        *self.draining.borrow() || self.fleet().is_some_and(|f| f.gateways_leave())
    }

    fn gateway_brokers(&self, region: &RegionId, gateway: &GatewayId) -> Vec<SocketAddr> {
        let own = crate::wireguard::gateway_endpoint(&self.config);
        let others = self
            .fleet()
            .map(|f| f.gateway_endpoints_for(region, gateway).1)
            .unwrap_or_default();
        own.into_iter()
            .chain(others)
            .filter_map(|e| e.parse().ok())
            .collect()
    }

    fn broker_changes(&self) -> Option<watch::Receiver<u64>> {
        self.fleet().map(|f| f.changes())
    }
}
