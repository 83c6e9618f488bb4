//! The broker's shared state: configuration, CA, store, routes and sessions.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;
use tether_config::broker::BrokerConfig;
use tether_pki::token::{self, EnrollmentCode};
use tether_pki::{Ca, CertSlot, PeerCert, RevocationSet, Revoked, SiteIdentity};
use tether_proto::api::{SessionInfo, SiteInfo, TokenResponse};
use tether_proto::broker::{
    Allocated, AllocationError, AllocationId, AllocationRequest, BrokerCore, CoreConfig, Event,
    GatewaySpec, MAX_ALLOCATION_ATTEMPTS, OpenError, RegionPolicy, Revocation, SessionId,
    SessionOpen, SiteRecordAction, StoreCommand, StoreResult, TokenError, TokenPolicy,
};
use tether_proto::forward::Router;
use tether_proto::ids::{GatewayId, RegionId, SiteId};
use tether_proto::ipam::IpamError;
use thiserror::Error;
use tokio::sync::watch;

use crate::local_gateway::LocalGateway;
use crate::metrics::Metrics;
use crate::store::{CertRecord, SiteRecord, Store, StoreError, now_unix};

pub use tether_proto::broker::CloseReason;

/// Packets and bytes in one direction, on a cache line of its own so the
/// receiving and sending threads do not contend.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct Direction {
    /// Packets.
    pub packets: AtomicU64,
    /// Bytes.
    pub bytes: AtomicU64,
}

impl Direction {
    /// Counts one packet of `len` bytes.
    #[inline]
    pub fn add(&self, len: u64) {
        self.packets.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(len, Ordering::Relaxed);
    }

    /// (packets, bytes).
    pub fn get(&self) -> (u64, u64) {
        (
            self.packets.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// Traffic counters of a session or device.
#[derive(Debug, Default)]
pub struct Counters {
    /// From the site (or out of the device).
    pub rx: Direction,
    /// To the site (or into the device).
    pub tx: Direction,
}

/// Traffic of sessions that have ended, so totals stay monotonic.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    /// Packets from sites.
    pub rx_packets: u64,
    /// Bytes from sites.
    pub rx_bytes: u64,
    /// Packets to sites.
    pub tx_packets: u64,
    /// Bytes to sites.
    pub tx_bytes: u64,
}

/// How packets reach a site.
#[derive(Debug)]
pub enum Link {
    /// QUIC datagrams on an HTTP/3 connection.
    H3 {
        /// The QUIC connection.
        conn: quinn::Connection,
        /// The bytes before each IP packet in a datagram: quarter stream ID
        /// and context ID 0.
        prefix: Vec<u8>,
    },
    /// DATAGRAM capsules on an HTTP/2 request stream, written in order by
    /// the stream's writer task.
    H2 {
        /// Encoded capsules to the writer task.
        capsules: tokio::sync::mpsc::Sender<bytes::Bytes>,
        /// The TCP peer (the proxy's address when the site uses one).
        remote: SocketAddr,
        /// Identifies the TCP connection.
        id: u64,
        /// Latest round-trip time of an HTTP/2 PING, in microseconds.
        rtt_us: Arc<AtomicU64>,
        /// Whether the site came through a proxy (known from the
        /// `tether-transport` request header).
        transport: tether_proto::tunnel::Transport,
    },
}

impl Link {
    /// The transport.
    pub fn transport(&self) -> tether_proto::tunnel::Transport {
        match self {
            Link::H3 { .. } => tether_proto::tunnel::Transport::H3,
            Link::H2 { transport, .. } => *transport,
        }
    }

    /// The peer's address.
    pub fn remote(&self) -> SocketAddr {
        match self {
            Link::H3 { conn, .. } => conn.remote_address(),
            Link::H2 { remote, .. } => *remote,
        }
    }

    /// The round-trip time.
    pub fn rtt(&self) -> Duration {
        match self {
            Link::H3 { conn, .. } => conn.rtt(),
            Link::H2 { rtt_us, .. } => Duration::from_micros(rtt_us.load(Ordering::Relaxed)),
        }
    }

    /// The largest IP packet the link carries now.
    pub fn mtu(&self) -> Option<usize> {
        match self {
            Link::H3 { conn, prefix } => conn
                .max_datagram_size()
                .map(|m| m.saturating_sub(prefix.len())),
            Link::H2 { .. } => Some(tether_proto::datagram::STREAM_MTU),
        }
    }

    /// Identifies the underlying connection (QUIC or TCP).
    pub fn connection_id(&self) -> (bool, u64) {
        match self {
            Link::H3 { conn, .. } => (true, conn.stable_id() as u64),
            Link::H2 { id, .. } => (false, *id),
        }
    }
}

/// A site's live tunnel.
#[derive(Debug)]
pub struct Session {
    /// Its identifier in the broker core.
    pub id: SessionId,
    /// When its request arrived: of two sessions of one site, the later
    /// one wins.
    pub connected_at: Instant,
    /// The verified peer certificate.
    pub peer: PeerCert,
    /// How packets reach the site.
    pub link: Link,
    /// Prefixes the site may send from.
    pub allowed: RwLock<Vec<IpNet>>,
    /// When it connected.
    pub since: SystemTime,
    /// Traffic counters.
    pub counters: Counters,
    /// Raised to end the session.
    pub close: watch::Sender<Option<CloseReason>>,
    /// TCP services the site announced when it connected (SRV names).
    pub services: Vec<tether_proto::dns::Service>,
    /// Packets of this site dropped, by reason.
    pub drops: Drops,
}

impl Totals {
    fn add(&mut self, other: &Totals) {
        self.rx_packets += other.rx_packets;
        self.rx_bytes += other.rx_bytes;
        self.tx_packets += other.tx_packets;
        self.tx_bytes += other.tx_bytes;
    }
}

/// A site's traffic and drops.
#[derive(Debug, Clone, Copy, Default)]
pub struct SiteTotals {
    /// Traffic (rx: from the site).
    pub traffic: Totals,
    /// Drops of its packets, indexed like [`DropReason::ALL`](tether_proto::forward::DropReason::ALL).
    pub drops: [u64; tether_proto::forward::DropReason::ALL.len()],
}

impl SiteTotals {
    /// The counters of one session.
    pub fn of(session: &Session) -> Self {
        let ((rp, rb), (tp, tb)) = (session.counters.rx.get(), session.counters.tx.get());
        let mut drops = [0; tether_proto::forward::DropReason::ALL.len()];
        for (reason, n) in session.drops.get() {
            if let Some(d) = drops.get_mut(reason as usize) {
                *d = n;
            }
        }
        Self {
            traffic: Totals {
                rx_packets: rp,
                rx_bytes: rb,
                tx_packets: tp,
                tx_bytes: tb,
            },
            drops,
        }
    }

    fn add(&mut self, other: &SiteTotals) {
        self.traffic.add(&other.traffic);
        for (a, b) in self.drops.iter_mut().zip(other.drops) {
            *a += b;
        }
    }
}

/// Per-reason drop counters.
#[derive(Debug, Default)]
pub struct Drops([AtomicU64; tether_proto::forward::DropReason::ALL.len()]);

impl Drops {
    /// Counts a drop.
    pub fn add(&self, reason: tether_proto::forward::DropReason) {
        if let Some(c) = self.0.get(reason as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Every reason with its count.
    pub fn get(&self) -> Vec<(tether_proto::forward::DropReason, u64)> {
        tether_proto::forward::DropReason::ALL
            .iter()
            .map(|r| {
                (
                    *r,
                    self.0
                        .get(*r as usize)
                        .map_or(0, |c| c.load(Ordering::Relaxed)),
                )
            })
            .collect()
    }
}

impl Session {
    /// The site.
    pub fn site(&self) -> &SiteId {
        &self.peer.identity.site
    }

    /// The site's region.
    pub fn region(&self) -> &RegionId {
        &self.peer.identity.region
    }

    /// The largest IP packet the tunnel carries right now.
    pub fn mtu(&self) -> Option<usize> {
        self.link.mtu()
    }

    /// Asks the session's task to end it.
    pub fn request_close(&self, reason: CloseReason) {
        let _ = self.close.send(Some(reason));
    }

    /// The admin API's view of it.
    pub fn info(&self) -> SessionInfo {
        SessionInfo {
            site: self.site().clone(),
            region: self.region().clone(),
            transport: self.link.transport().as_str().into(),
            remote: self.link.remote(),
            since: token::unix_secs(self.since),
            rtt_ms: self.link.rtt().as_secs_f64() * 1000.0,
            rx_packets: self.counters.rx.get().0,
            rx_bytes: self.counters.rx.get().1,
            tx_packets: self.counters.tx.get().0,
            tx_bytes: self.counters.tx.get().1,
            mtu: self.mtu(),
            services: self.services.clone(),
            drops: self
                .drops
                .get()
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(r, n)| (r.as_str().to_string(), n))
                .collect(),
        }
    }
}

/// Errors an operator or a site can act on.
#[derive(Debug, Error)]
pub enum BrokerError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No address could be allocated.
    #[error(transparent)]
    Ipam(#[from] IpamError),
    /// The region is not configured.
    #[error("region {0} is not configured on this broker")]
    UnknownRegion(RegionId),
    /// The site id is taken in another region.
    #[error("site {site} already exists in region {existing}; site ids are unique across regions")]
    SiteInOtherRegion {
        /// The site.
        site: SiteId,
        /// Where it exists.
        existing: RegionId,
    },
    /// No such site.
    #[error("no site {site} in region {region}")]
    UnknownSite {
        /// The site.
        site: SiteId,
        /// The region.
        region: RegionId,
    },
    /// A bad duration.
    #[error("{0}")]
    BadInput(String),
    /// Allocation kept conflicting.
    #[error("address allocation kept conflicting with concurrent changes; try again")]
    Contention,
    /// The site is revoked.
    #[error("site {0} is revoked")]
    Revoked(SiteId),
    /// Certificate issuance failed.
    #[error(transparent)]
    Pki(#[from] tether_pki::PkiError),
}

/// The broker.
pub struct Broker {
    /// The validated configuration.
    pub config: BrokerConfig,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The CA.
    pub ca: Ca,
    /// The store.
    pub store: Arc<dyn Store>,
    /// Revoked identities and serials.
    pub revocations: Arc<RevocationSet>,
    /// The server certificate in use.
    pub cert: Arc<CertSlot>,
    /// The admin API bearer token.
    pub admin_token: String,
    /// The broker core: sessions, routes and policy, revocations, lease
    /// cache. `router.read()` gives the routing state for packets.
    pub router: CoreCell,
    /// Live sessions by site.
    pub sessions: RwLock<HashMap<SiteId, Arc<Session>>>,
    /// The local gateway, if enabled and started.
    pub local_gateway: OnceLock<Arc<LocalGateway>>,
    /// Metric handles.
    pub metrics: Metrics,
    /// The tunnel listener's bound address (for enrollment responses).
    pub tunnel_addr: OnceLock<SocketAddr>,
    /// Bumped whenever the set of reachable prefixes changes.
    pub routes_version: watch::Sender<u64>,
    /// Bumped whenever a site route appears or goes (gateways follow it).
    pub site_routes: watch::Sender<u64>,
    /// Bumped on every change that can alter a name in the mesh zone
    /// (enrollment, sessions, revocation).
    pub names: watch::Sender<u64>,
    /// The mesh zone, rebuilt after each change of `names`.
    pub zone: watch::Sender<Option<Arc<tether_proto::dns::ZoneData>>>,
    /// Gateways over WireGuard, if any are configured and started.
    pub wireguard: OnceLock<Arc<crate::wireguard::Wireguard>>,
    /// Traffic of ended sessions.
    pub closed: Mutex<Totals>,
    /// The transport of each site's latest session, to count upgrades and
    /// fallbacks.
    pub last_transport: Mutex<HashMap<SiteId, tether_proto::tunnel::Transport>>,
    /// Traffic and drops of each site's ended sessions.
    pub site_closed: Mutex<HashMap<(SiteId, RegionId), SiteTotals>>,
    /// Idle batches for writing to the local gateway.
    pub batches: Mutex<Vec<crate::plane::SiteBatch>>,
    /// Wakes the certificate-expiry timer when the core's deadline moves.
    pub timer: tokio::sync::Notify,
    /// One allocation at a time, as the store serialises them anyway.
    allocation_gate: Mutex<()>,
    /// Outcomes of allocations, picked up by the caller that drives them.
    allocated: Mutex<HashMap<AllocationId, Result<Allocated, AllocationError>>>,
    next_session: AtomicU64,
}

/// The broker core behind one lock. Packets read the routing state through
/// [`CoreCell::read`]; decisions take [`Broker::decide`].
#[derive(Debug)]
pub struct CoreCell(RwLock<BrokerCore>);

/// The lock on the core was poisoned by a panic.
#[derive(Debug, Error)]
#[error("the broker core lock is poisoned")]
pub struct Poisoned;

/// A read guard on the core that derefs to its [`Router`].
pub struct RouterRead<'a>(RwLockReadGuard<'a, BrokerCore>);

impl std::ops::Deref for RouterRead<'_> {
    type Target = Router;
    fn deref(&self) -> &Router {
        self.0.router()
    }
}

impl CoreCell {
    /// The routing state, for forwarding and explanations.
    pub fn read(&self) -> Result<RouterRead<'_>, Poisoned> {
        self.0.read().map(RouterRead).map_err(|_| Poisoned)
    }

    /// The whole core, read-only.
    pub fn core(&self) -> Result<RwLockReadGuard<'_, BrokerCore>, Poisoned> {
        self.0.read().map_err(|_| Poisoned)
    }

    fn write(&self) -> Result<RwLockWriteGuard<'_, BrokerCore>, Poisoned> {
        self.0.write().map_err(|_| Poisoned)
    }
}

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

/// `at` on the monotonic clock (`now` if it has passed).
fn instant_of(at: SystemTime) -> Instant {
    let now = Instant::now();
    at.duration_since(SystemTime::now())
        .map(|d| now + d)
        .unwrap_or(now)
}

impl From<AllocationError> for BrokerError {
    fn from(e: AllocationError) -> Self {
        match e {
            AllocationError::UnknownRegion(r) => BrokerError::UnknownRegion(r),
            AllocationError::Revoked(s) => BrokerError::Revoked(s),
            AllocationError::Ipam(e) => BrokerError::Ipam(e),
            AllocationError::Contention => BrokerError::Contention,
            AllocationError::Store(e) => BrokerError::Store(StoreError(e)),
        }
    }
}

impl From<TokenError> for BrokerError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::UnknownRegion(r) => BrokerError::UnknownRegion(r),
            TokenError::BadTtl => BrokerError::BadInput(e.to_string()),
            TokenError::SiteInOtherRegion { site, existing } => {
                BrokerError::SiteInOtherRegion { site, existing }
            }
        }
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
        ca: Ca,
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
                max_ttl: tether_proto::broker::policy::MAX_TOKEN_TTL,
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
        let (routes_version, _) = watch::channel(0);
        let (site_routes, _) = watch::channel(0);
        let (names, _) = watch::channel(0);
        let (zone, _) = watch::channel(None);
        Ok(Arc::new(Self {
            config,
            data_dir,
            ca,
            store,
            revocations,
            cert,
            admin_token,
            router: CoreCell(RwLock::new(core)),
            sessions: RwLock::new(HashMap::new()),
            local_gateway: OnceLock::new(),
            metrics: Metrics::register(),
            tunnel_addr: OnceLock::new(),
            routes_version,
            site_routes,
            names,
            zone,
            wireguard: OnceLock::new(),
            closed: Mutex::new(Totals::default()),
            site_closed: Mutex::new(HashMap::new()),
            last_transport: Mutex::new(HashMap::new()),
            batches: Mutex::new(Vec::new()),
            timer: tokio::sync::Notify::new(),
            allocation_gate: Mutex::new(()),
            allocated: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(0),
        }))
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
        self.router
            .read()
            .map(|r| r.reachable_from(region, &self.pools()))
            .unwrap_or_default()
    }

    /// Runs an allocation to its end: performs the core's store commands
    /// and feeds their results back. Blocking: call from a blocking context.
    fn allocate(&self, request: AllocationRequest) -> Result<Allocated, BrokerError> {
        let _gate = self
            .allocation_gate
            .lock()
            .map_err(|_| BrokerError::Contention)?;
        let mut pending = std::collections::VecDeque::new();
        let id = self.decide(|core| {
            let id = core.handle_allocate(request);
            pending.extend(std::iter::from_fn(|| core.poll_command()));
            id
        })?;
        loop {
            if let Some(result) = self.allocated.lock().ok().and_then(|mut a| a.remove(&id)) {
                return result.map_err(BrokerError::from);
            }
            let Some(command) = pending.pop_front() else {
                return Err(BrokerError::Contention);
            };
            let (allocation, answer) = match command {
                StoreCommand::LoadLeases { allocation, region } => (
                    allocation,
                    match self.store.region_leases(&region) {
                        Ok(leases) => StoreResult::Leases(leases),
                        Err(e) => StoreResult::Failed(e.0),
                    },
                ),
                StoreCommand::CompareAndSet { allocation, txn } => (
                    allocation,
                    match self.store.commit_leases(&txn) {
                        Ok(Ok(())) => StoreResult::Committed,
                        Ok(Err(_)) => StoreResult::Conflict,
                        Err(e) => StoreResult::Failed(e.0),
                    },
                ),
            };
            self.decide(|core| {
                core.handle_store_result(allocation, answer);
                pending.extend(std::iter::from_fn(|| core.poll_command()));
            })?;
        }
    }

    /// Runs `f` on the core, then carries out the events it produced while
    /// still holding the lock, so the session map never disagrees with the
    /// core.
    pub fn decide<T>(&self, f: impl FnOnce(&mut BrokerCore) -> T) -> Result<T, BrokerError> {
        let mut core = self.router.write().map_err(|_| BrokerError::Contention)?;
        let out = f(&mut core);
        self.dispatch(&mut core);
        Ok(out)
    }

    fn dispatch(&self, core: &mut BrokerCore) {
        let (mut routes, mut names) = (false, false);
        while let Some(event) = core.poll_event() {
            match event {
                Event::CloseSession {
                    session,
                    site,
                    reason,
                } => {
                    let closed = self.sessions.write().ok().and_then(|mut s| {
                        if s.get(&site).is_some_and(|cur| cur.id == session) {
                            s.remove(&site)
                        } else {
                            None
                        }
                    });
                    if let Some(closed) = closed {
                        closed.request_close(reason);
                    }
                }
                Event::RoutesChanged => routes = true,
                Event::SessionsChanged => names = true,
                Event::Allocated { allocation, result } => {
                    if let Ok(mut a) = self.allocated.lock() {
                        a.insert(allocation, result);
                    }
                }
            }
        }
        if routes {
            self.site_routes.send_modify(|v| *v += 1);
        }
        if names {
            self.names_changed();
        }
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
            Allocated::SiteAddresses { addresses, lans } => Ok((addresses, lans)),
            Allocated::LanMapping(_) => Err(BrokerError::Contention),
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
            Allocated::LanMapping(prefix) => Ok(prefix),
            Allocated::SiteAddresses { .. } => Err(BrokerError::Contention),
        }
    }

    /// The site's own overlay addresses (not its LAN mappings).
    pub fn host_addresses(&self, site: &SiteId, region: &RegionId) -> Vec<IpAddr> {
        self.router
            .core()
            .map(|c| c.host_addresses(site, region))
            .unwrap_or_default()
    }

    /// Says that a name in the mesh zone may have changed.
    pub fn names_changed(&self) {
        self.names.send_modify(|v| *v += 1);
    }

    /// The leases a site holds.
    pub fn leases_of(&self, site: &SiteId, region: &RegionId) -> Vec<IpNet> {
        self.router
            .core()
            .ok()
            .and_then(|c| {
                c.leases(region)
                    .map(|l| l.of_site(site).map(|l| l.prefix).collect())
            })
            .unwrap_or_default()
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
        let open = SessionOpen {
            id: session.id,
            site: site.clone(),
            region: session.region().clone(),
            serial: session.peer.serial.clone(),
            addresses: addresses.to_vec(),
            connected_at: session.connected_at,
            not_after: instant_of(session.peer.not_after),
        };
        let registered = self
            .router
            .write()
            .map_err(|_| OpenError::Duplicate)
            .and_then(|mut core| {
                let result = core.handle_session_open(open, Instant::now());
                self.dispatch(&mut core);
                if result.is_ok()
                    && let Ok(mut sessions) = self.sessions.write()
                {
                    sessions.insert(site.clone(), session.clone());
                }
                result
            });
        if registered.is_ok() {
            self.timer.notify_one();
        }
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
        registered
    }

    /// Removes a session if it is still the current one for its site, with
    /// its routes.
    pub fn unregister(&self, session: &Arc<Session>) {
        let site = session.site().clone();
        let _ = self.decide(|core| {
            if core.handle_session_closed(&site, session.id, Instant::now())
                && let Ok(mut s) = self.sessions.write()
                && s.get(&site).is_some_and(|cur| Arc::ptr_eq(cur, session))
            {
                s.remove(&site);
            }
        });
        let ended = SiteTotals::of(session);
        if let Ok(mut closed) = self.closed.lock() {
            closed.add(&ended.traffic);
        }
        if let Ok(mut per_site) = self.site_closed.lock() {
            per_site
                .entry((site.clone(), session.region().clone()))
                .or_default()
                .add(&ended);
        }
        self.metrics.session_ended(session.link.transport());
    }

    /// Replaces the LAN routes of a session with `prefixes`, if it is still
    /// its site's current session.
    pub fn set_lan_routes(&self, session: &Session, prefixes: &[IpNet]) {
        let _ = self.decide(|core| core.handle_lan_routes(session.site(), session.id, prefixes));
    }

    /// The earliest certificate expiry of a live session.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.router.core().ok().and_then(|c| c.poll_timeout())
    }

    /// Ends the sessions whose certificate expired by `now`.
    pub fn expire(&self, now: Instant) {
        let _ = self.decide(|core| core.handle_timeout(now));
    }

    /// The session of a site.
    pub fn session(&self, site: &SiteId) -> Option<Arc<Session>> {
        self.sessions.read().ok().and_then(|s| s.get(site).cloned())
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
            let core = self.router.core().map_err(|_| BrokerError::Contention)?;
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
            .router
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
                self.store.put_site(&existing)?;
            }
            (SiteRecordAction::Create, _) => self.store.put_site(&SiteRecord {
                site: site.clone(),
                region: region.clone(),
                created: now_unix(),
                enrolled: None,
                revoked: false,
            })?,
            _ => {}
        }
        let issued = token::generate(site.clone(), region.clone(), SystemTime::now(), ttl);
        self.store.put(issued.record.clone()).map_err(StoreError)?;
        let code =
            EnrollmentCode::format(&issued.secret, &tether_pki::tls::ca_pin(self.ca.cert_der()));
        let broker = self
            .enroll_endpoints()
            .into_iter()
            .next()
            .unwrap_or_else(|| "<broker>".into());
        Ok(TokenResponse {
            enroll_command: format!("tether enroll --broker {broker} --token {code}"),
            code,
            site: site.clone(),
            region: region.clone(),
            expires_at: token::unix_secs(issued.record.expires_at),
        })
    }

    /// Endpoints sites dial, `host:port`.
    pub fn enroll_endpoints(&self) -> Vec<String> {
        let port = self
            .tunnel_addr
            .get()
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
        record.revoked = true;
        self.store.put_site(&record)?;
        let entry = Revoked::Site(self.identity(site, region));
        self.store.revoke(&entry)?;
        // Whether it was connected is read first: the revocation listener
        // closes the session, and may be done before `revoke` returns.
        let connected = self.session(site).is_some();
        self.revocations.revoke(entry);
        self.names_changed();
        Ok(connected)
    }

    /// Records an issued site certificate and the enrollment time. Blocking.
    pub fn record_issued(
        &self,
        identity: &SiteIdentity,
        serial: &[u8],
        not_after: SystemTime,
    ) -> Result<(), BrokerError> {
        self.store.put_cert(&CertRecord {
            serial: data_encoding::HEXLOWER.encode(serial),
            site: identity.site.clone(),
            region: identity.region.clone(),
            not_after: token::unix_secs(not_after),
        })?;
        if let Some(mut record) = self.store.site(&identity.site)? {
            record.enrolled = Some(now_unix());
            self.store.put_site(&record)?;
        }
        self.names_changed();
        Ok(())
    }

    /// Every site, with addresses and live session.
    pub fn site_infos(&self) -> Result<Vec<SiteInfo>, BrokerError> {
        let mut out: Vec<SiteInfo> = self
            .store
            .sites()?
            .into_iter()
            .map(|r| SiteInfo {
                addresses: self.leases_of(&r.site, &r.region),
                session: self.session(&r.site).map(|s| s.info()),
                enrolled: r.enrolled.is_some(),
                revoked: r.revoked,
                site: r.site,
                region: r.region,
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
        if let Ok(sessions) = self.sessions.read() {
            for s in sessions.values() {
                all.entry((s.site().clone(), s.region().clone()))
                    .or_default()
                    .add(&SiteTotals::of(s));
            }
        }
        let mut out: Vec<_> = all.into_iter().map(|((s, r), t)| (s, r, t)).collect();
        out.sort_by(|a, b| (&a.1, &a.0).cmp(&(&b.1, &b.0)));
        out
    }

    /// The traffic totals for the metrics endpoint.
    pub fn traffic(&self) -> crate::metrics::Traffic {
        let t = self.totals();
        let (mut from_gateways, mut to_gateways) = (0, 0);
        if let Some(gw) = self.local_gateway.get() {
            from_gateways += gw.counters.rx.get().0;
            to_gateways += gw.counters.tx.get().0;
        }
        let mut peers = Vec::new();
        if let Some(wg) = self.wireguard.get() {
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
            sites,
        }
    }

    /// Traffic totals of all sessions, ended and live.
    pub fn totals(&self) -> Totals {
        let mut t = self.closed.lock().map(|c| *c).unwrap_or_default();
        if let Ok(sessions) = self.sessions.read() {
            for s in sessions.values() {
                let ((rp, rb), (tp, tb)) = (s.counters.rx.get(), s.counters.tx.get());
                t.rx_packets += rp;
                t.rx_bytes += rb;
                t.tx_packets += tp;
                t.tx_bytes += tb;
            }
        }
        t
    }
}
