//! The running gateway: a WireGuard peer of every broker of its
//! configuration (boringtun) between a TUN device and one UDP socket, plus
//! the routes of the sites its region may reach.
//!
//! The gateway holds a session with each broker and sends its traffic to
//! one, the active broker, which relays packets for sites held by other
//! brokers; answers come back from whichever broker holds the site. Which
//! broker is active, and when one counts as gone, is
//! [`Failover`]'s decision: every broker is pinged four times a second, and
//! the traffic moves within a second of the active one falling silent.
//!
//! Device to broker: one read of the offloading device yields a whole TCP
//! burst, split into packets; each is encrypted, and the datagrams, being
//! of equal size, leave in one `sendmsg` with UDP segmentation offload.
//! Broker to device: datagrams arrive coalesced (UDP GRO), are decrypted,
//! and the TCP segments of a flow are joined into large segments as they
//! are added, each packet copied once, so the kernel receives one packet
//! where the broker sent dozens. TCP SYNs are clamped to the tunnel MTU
//! both ways.
//!
//! Control datagrams from the broker ([`tether_proto::gateway`]) carry the
//! route set; the gateway asks the active broker for it at start, every
//! 10 s and on every switch, and the broker pushes changes at once. When to ask, when to run WireGuard's
//! timers and when the session counts as up is
//! [`ControlSchedule`]'s decision; this module carries it out.
//!
//! The configured brokers are the gateway's seed: the active broker also
//! tells it the gateway endpoints of every live broker of its region, and
//! the gateway opens a session to each broker it learns that way and
//! closes the session of a learned one no longer listed
//! ([`BrokerSet`]'s decision). The learned brokers are kept in
//! [`BROKERS_FILE`] in the state directory, so a restart reaches them
//! too. Each broker has a slot (at most [`MAX_BROKERS`]), the index the
//! failover and the sessions use.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;
use ipnet::IpNet;
use tether_config::Host;
use tether_config::gateway::GatewayConfig;
use tether_pki::wg::WgKey;
use tether_proto::dns::ZoneData;
use tether_proto::gateway::brokers::{
    self, Applied, BrokerChange, BrokerList, BrokerSet, ListAssembler, Origin,
};
use tether_proto::gateway::control::{ControlAction, ControlEvent, ControlSchedule};
use tether_proto::gateway::failover::{Failover, FailoverAction, FailoverEvent, MAX_BROKERS};
use tether_proto::gateway::{
    self as control, Assembler, BROKER_CONTROL, GATEWAY_CONTROL, Message, RouteSet, ZoneAssembler,
};
use tokio::net::UdpSocket;
use tokio::sync::{Notify, watch};

use crate::live::LiveRoutes;
use crate::metrics::{Dropped, Metrics};
use crate::routes::Routes;

/// Name of the gateway's WireGuard key in the state directory.
pub const KEY_FILE: &str = "wireguard.key";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tether-gateway";
/// WireGuard's keepalive towards the broker, so NAT state on the way
/// stays open.
const KEEPALIVE_SECS: u16 = 25;

/// How often the gateway reads its routes back from the kernel and adds
/// again what is gone (see [`Routes::refresh`]) or was refused before.
const ROUTE_RESYNC: Duration = Duration::from_secs(5);
/// The mesh zone copy in the state directory.
pub const ZONE_FILE: &str = "zone.bin";
/// The learned brokers in the state directory, one endpoint a line.
pub const BROKERS_FILE: &str = "brokers";

/// The state directory of a configuration.
pub fn state_dir(config: &GatewayConfig) -> PathBuf {
    config
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
}

/// Reads (or creates) the gateway's WireGuard key.
pub fn load_key(dir: &Path) -> anyhow::Result<(WgKey, bool)> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
    Ok(WgKey::load_or_create(&dir.join(KEY_FILE))?)
}

/// What resolving one configured broker endpoint gave: its addresses, or
/// why it did not resolve.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The endpoint as configured (`host:port`).
    pub endpoint: String,
    /// Its addresses, or the resolver's error.
    pub addrs: Result<Vec<SocketAddr>, String>,
}

/// The brokers a gateway talks to, chosen from what their endpoints
/// resolved to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerChoice {
    /// One address per broker, inside the published CIDR, all of the first
    /// usable broker's address family (one socket), in configuration order.
    pub kept: Vec<SocketAddr>,
    /// Each broker left out, and why.
    pub problems: Vec<String>,
}

/// Chooses the brokers from resolved endpoints (at most
/// [`MAX_BROKERS`]): the first address inside the published CIDR of each,
/// duplicates once, and only the first usable broker's address family.
/// `tether-gateway run` and `preflight` decide the same way.
pub fn choose_brokers(published: &IpNet, resolved: &[Resolved]) -> BrokerChoice {
    let mut choice = BrokerChoice::default();
    for r in resolved.iter().take(MAX_BROKERS) {
        let candidates = match &r.addrs {
            Ok(a) => a,
            Err(e) => {
                choice
                    .problems
                    .push(format!("cannot resolve the broker {}: {e}", r.endpoint));
                continue;
            }
        };
        match candidates
            .iter()
            .copied()
            .find(|a| published.contains(&a.ip()))
        {
            Some(a) if !choice.kept.contains(&a) => {
                if choice
                    .kept
                    .first()
                    .is_some_and(|f| f.is_ipv4() != a.is_ipv4())
                {
                    choice.problems.push(format!(
                        "broker {} ({a}) left out: its address family differs from the first broker's",
                        r.endpoint
                    ));
                } else {
                    choice.kept.push(a);
                }
            }
            Some(_) => {}
            None => choice.problems.push(format!(
                "broker {} resolves to {candidates:?}, none inside the published CIDR {published}",
                r.endpoint
            )),
        }
    }
    choice
}

/// Resolves the configured broker endpoints (names with the system
/// resolver), at most [`MAX_BROKERS`].
pub async fn resolve_brokers(config: &GatewayConfig) -> Vec<Resolved> {
    let mut out = Vec::new();
    for endpoint in config.brokers.iter().take(MAX_BROKERS) {
        let addrs = match &endpoint.host {
            Host::Ip(ip) => Ok(vec![SocketAddr::new(*ip, endpoint.port)]),
            Host::Name(name) => tokio::net::lookup_host((name.as_str(), endpoint.port))
                .await
                .map(Iterator::collect)
                .map_err(|e| e.to_string()),
        };
        out.push(Resolved {
            endpoint: endpoint.to_string(),
            addrs,
        });
    }
    out
}

/// Resolves every broker endpoint to an address inside the published
/// CIDR, in the order of the configuration. A broker that does not resolve
/// is left out with a warning; none at all is an error.
async fn broker_addresses(config: &GatewayConfig) -> anyhow::Result<Vec<SocketAddr>> {
    anyhow::ensure!(
        !config.brokers.is_empty(),
        "no broker configured (brokers = [\"<broker>:51820\"])"
    );
    let choice = choose_brokers(&config.published_cidr, &resolve_brokers(config).await);
    if choice.kept.is_empty() {
        anyhow::bail!("no usable broker: {}", choice.problems.join("; "));
    }
    for p in choice.problems {
        tracing::warn!("{p}; the gateway goes on with the other brokers");
    }
    Ok(choice.kept)
}

/// A broker slot: the WireGuard session with the broker in it, if any.
struct BrokerPeer {
    tunn: Mutex<Tunn>,
}

/// What the packet tasks share.
struct Shared {
    /// [`MAX_BROKERS`] slots; those of [`Shared::addrs`] hold a broker.
    brokers: Vec<BrokerPeer>,
    /// Each slot's broker endpoint (`None`: free), replaced as a whole
    /// when brokers are learned or forgotten.
    addrs: RwLock<Arc<Vec<Option<SocketAddr>>>>,
    /// The brokers followed, configured and learned.
    set: Mutex<BrokerSet>,
    /// The gateway's and the brokers' keys, for new sessions.
    private: x25519::StaticSecret,
    broker_key: x25519::PublicKey,
    failover: Mutex<Failover>,
    /// The broker packets go to ([`Failover::target`]).
    target: AtomicUsize,
    /// Bumped whenever the target changes: the control channel starts over
    /// with the new broker.
    switches: AtomicU64,
    /// Wakes the timer task when the failover has something to say.
    wake: Notify,
    socket: UdpSocket,
    udp: quinn_udp::UdpSocketState,
    dev: tun_rs::AsyncDevice,
    offload: bool,
    mtu: u16,
    metrics: Metrics,
}

impl Shared {
    /// Lowers the MSS of TCP SYNs to what the tunnel carries.
    fn clamp(&self, packet: &mut [u8]) {
        let header = match packet.first().map(|b| b >> 4) {
            Some(6) => 60,
            _ => 40,
        };
        tether_proto::ip::clamp_mss(packet, self.mtu.saturating_sub(header));
    }

    /// The broker packets go to now.
    fn target(&self) -> usize {
        self.target.load(Ordering::Relaxed)
    }

    /// Every slot's broker endpoint.
    fn addrs(&self) -> Arc<Vec<Option<SocketAddr>>> {
        self.addrs
            .read()
            .map(|a| a.clone())
            .unwrap_or_else(|_| Arc::new(Vec::new()))
    }

    /// The endpoint of the broker in slot `slot`.
    fn addr(&self, slot: usize) -> Option<SocketAddr> {
        self.addrs
            .read()
            .ok()
            .and_then(|a| a.get(slot).copied().flatten())
    }

    /// A new WireGuard session for slot `slot`.
    fn new_tunn(&self, slot: usize) -> Tunn {
        new_tunn(&self.private, self.broker_key, slot)
    }

    /// Follows learned brokers and forgets unlisted ones, as `applied`
    /// says: sessions, failover, metrics, one log line each; saves the
    /// learned list when it changed.
    fn apply(&self, applied: &Applied, why: &str, dir: &Path) {
        for a in &applied.unusable {
            tracing::debug!(broker = %a, "listed broker left out: outside the published CIDR or of another address family");
        }
        if !applied.no_room.is_empty() {
            tracing::warn!(
                left_out = applied.no_room.len(),
                "more brokers listed than a gateway follows ({MAX_BROKERS}): the first are followed"
            );
        }
        if applied.changes.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut addrs: Vec<Option<SocketAddr>> = self.addrs().as_ref().clone();
        for change in &applied.changes {
            match *change {
                BrokerChange::Forgotten { slot, addr } => {
                    if let Ok(mut f) = self.failover.lock() {
                        f.unfollow(slot);
                        self.retarget(&f);
                    }
                    if let Some(a) = addrs.get_mut(slot) {
                        *a = None;
                    }
                    self.metrics.broker_forgotten(addr);
                    tracing::info!(broker = %addr, slot, "broker forgotten: {why} no longer lists it");
                }
                BrokerChange::Learned { slot, addr } => {
                    let Some(peer) = self.brokers.get(slot) else {
                        continue;
                    };
                    if let Ok(mut t) = peer.tunn.lock() {
                        *t = self.new_tunn(slot);
                    }
                    if addrs.len() <= slot {
                        addrs.resize(slot + 1, None);
                    }
                    addrs[slot] = Some(addr);
                    if let Ok(mut a) = self.addrs.write() {
                        *a = Arc::new(addrs.clone());
                    }
                    if let Ok(mut f) = self.failover.lock() {
                        f.follow(slot, now);
                    }
                    self.metrics.broker_learned();
                    tracing::info!(broker = %addr, slot, "broker learned: {why} lists it; opening a WireGuard session to it");
                }
            }
        }
        if let Ok(mut a) = self.addrs.write() {
            *a = Arc::new(addrs);
        }
        let learned = self.set.lock().map(|s| s.learned()).unwrap_or_default();
        let configured = self.addrs().iter().flatten().count() - learned.len();
        self.metrics.brokers_followed(configured, learned.len());
        save_learned(dir, &learned);
        // The new brokers are pinged at once.
        self.wake.notify_one();
    }

    /// Which broker a datagram from `from` comes from: the one with that
    /// address, else the one with that IP.
    fn broker_of(addrs: &[Option<SocketAddr>], from: SocketAddr) -> Option<usize> {
        let ip = from.ip().to_canonical();
        addrs
            .iter()
            .position(|b| b.is_some_and(|b| b.ip().to_canonical() == ip && b.port() == from.port()))
            .or_else(|| {
                addrs
                    .iter()
                    .position(|b| b.is_some_and(|b| b.ip().to_canonical() == ip))
            })
    }

    /// What one receive heard from the brokers.
    fn heard(&self, heard: &Heard) {
        if heard.heard == 0 {
            return;
        }
        let now = Instant::now();
        let Ok(mut f) = self.failover.lock() else {
            return;
        };
        for i in 0..self.brokers.len() {
            // A "leaving" first: a pong in the same receive answers a ping
            // sent before it, and the failover does not count it.
            if heard.leaving & (1 << i) != 0 {
                f.handle_leaving(i, now);
            }
            if let Some(seq) = heard.ponged.get(i).copied().flatten() {
                f.handle_pong_of(i, seq, now);
            } else if heard.heard & (1 << i) != 0 {
                f.handle_heard(i, now);
            }
        }
        self.retarget(&f);
    }

    /// Follows the failover's choice; wakes the timer task when it has
    /// something to report.
    fn retarget(&self, f: &Failover) {
        let target = f.target();
        if self.target.swap(target, Ordering::Relaxed) != target {
            self.switches.fetch_add(1, Ordering::Relaxed);
            // The new broker's list is asked for afresh.
            if let Ok(mut s) = self.set.lock() {
                s.forget_version();
            }
        }
        if f.has_events() {
            self.wake.notify_one();
        }
    }

    /// Sends datagrams of `lens` laid out back to back in `data` to `to`,
    /// in as few system calls as UDP segmentation offload allows; returns
    /// how many left (those that did not are counted as dropped).
    async fn send_all(&self, to: SocketAddr, data: &[u8], lens: &[usize]) -> usize {
        let failed =
            tether_shell::udp::send_segments(&self.socket, &self.udp, to, data, lens).await;
        self.metrics
            .dropped(Dropped::SendFailed, failed, &format_args!("to {to}"));
        lens.len().saturating_sub(failed)
    }

    /// Encrypts one packet (or a control message) for broker `broker` and
    /// sends it.
    async fn send_one(&self, broker: usize, packet: &[u8]) {
        let (Some(peer), Some(addr)) = (self.brokers.get(broker), self.addr(broker)) else {
            return;
        };
        let mut out = vec![0u8; packet.len() + 148];
        let n = match peer.tunn.lock() {
            Ok(mut t) => match t.encapsulate(packet, &mut out) {
                TunnResult::WriteToNetwork(p) => p.len(),
                TunnResult::Err(e) => {
                    self.metrics
                        .dropped(Dropped::SealFailed, 1, &format_args!("{e:?}"));
                    0
                }
                _ => 0,
            },
            Err(_) => 0,
        };
        if n > 0 {
            self.send_all(addr, &out[..n], &[n]).await;
        }
    }
}

/// Runs the gateway until `shutdown` resolves; removes its rules and routes
/// on the way out.
pub async fn run(
    config: GatewayConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let dir = state_dir(&config);
    let (key, created) = load_key(&dir)?;
    if created {
        tracing::info!(path = %dir.join(KEY_FILE).display(), "created the gateway's WireGuard key");
    }
    let broker_key = config.broker_public_key.context(
        "broker_public_key is not set: add the output of `tether-broker gateway key` to the configuration",
    )?;
    let addrs = broker_addresses(&config).await?;
    let bind: SocketAddr = match addrs[0].ip() {
        IpAddr::V4(_) => "0.0.0.0:0".parse()?,
        IpAddr::V6(_) => "[::]:0".parse()?,
    };
    let std = std::net::UdpSocket::bind(bind).context("cannot open a UDP socket")?;
    std.set_nonblocking(true)?;
    tether_shell::udp::tune_socket(&std);
    let socket = UdpSocket::from_std(std)?;
    let udp = quinn_udp::UdpSocketState::new((&socket).into())?;

    let build = |offload: bool| {
        tun_rs::DeviceBuilder::new()
            .name(&config.tun_name)
            .mtu(config.mtu)
            .offload(offload)
            .enable(true)
            .build_async()
    };
    let want = std::env::var("TETHER_TUN_OFFLOAD").map_or(true, |v| v != "0");
    let (dev, offload) = match build(want) {
        Ok(dev) => (dev, want),
        Err(_) => (
            build(false).with_context(|| {
                format!(
                    "cannot create the device {} (run as root, or with CAP_NET_ADMIN)",
                    config.tun_name
                )
            })?,
            false,
        ),
    };
    let index = dev.if_index().context("the device has no index")?;
    let mut routes = Routes::new(index, config.table, config.rule_priority).await?;

    let private = x25519::StaticSecret::from(key.secret_bytes());
    let broker_key = x25519::PublicKey::from(broker_key);
    // The configured brokers, then those learned in an earlier run.
    let mut set = BrokerSet::new(&addrs, config.published_cidr);
    let restored = set.restore(&load_learned(&dir));
    for change in &restored.changes {
        if let BrokerChange::Learned { addr, .. } = change {
            tracing::info!(broker = %addr, "broker learned in an earlier run");
        }
    }
    // One session per slot; every broker of a deployment has the same
    // gateway key (`broker_public_key`).
    let brokers: Vec<BrokerPeer> = (0..MAX_BROKERS)
        .map(|i| BrokerPeer {
            tunn: Mutex::new(new_tunn(&private, broker_key, i)),
        })
        .collect();
    let metrics = Metrics::default();
    metrics.brokers_followed(
        (0..set.len())
            .filter(|i| set.origin(*i) == Some(Origin::Configured))
            .count(),
        set.learned().len(),
    );
    let all = set.addrs();
    let shared = Arc::new(Shared {
        failover: Mutex::new(Failover::new(set.len(), Instant::now())),
        addrs: RwLock::new(Arc::new(set.addrs())),
        set: Mutex::new(set),
        private,
        broker_key,
        brokers,
        target: AtomicUsize::new(0),
        switches: AtomicU64::new(0),
        wake: Notify::new(),
        socket,
        udp,
        dev,
        offload,
        mtu: config.mtu,
        metrics,
    });
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(crate::metrics::serve(addr).await?),
        None => None,
    };
    // The zone copy last received survives a restart, so backends resolve
    // sites even when the gateway restarts while the broker is away.
    let saved = std::fs::read(dir.join(ZONE_FILE))
        .ok()
        .and_then(|b| ZoneData::decode(&b).ok())
        .map(Arc::new);
    if let Some(z) = &saved {
        tracing::info!(
            serial = z.serial,
            sites = z.sites.len(),
            "mesh zone loaded from the last run"
        );
    }
    // The pools (the prefixes the zone answers PTR for) are routed into
    // the tunnel as a whole, as the stock WireGuard configuration does:
    // an address of a pool that no site holds reaches the broker, which
    // answers destination-unreachable, instead of the node's default
    // route. The live sites' routes are more specific.
    let mut pools: BTreeSet<IpNet> = saved
        .as_ref()
        .map(|z| z.reverse.iter().copied().collect())
        .unwrap_or_default();
    let mut site_prefixes = BTreeSet::new();
    if !pools.is_empty()
        && let Err(e) = routes.set(&pools).await
    {
        tracing::error!(error = format!("{e:#}"), "cannot route the pools");
    }
    let (zones, mut zone_rx) = watch::channel(saved);
    let dns = match config.dns_listen {
        Some(addr) => {
            Some(tether_shell::dns::DnsServer::start(&[addr], zone_rx.clone(), None).await?)
        }
        None => None,
    };
    tracing::info!(
        gateway = %config.id,
        region = %config.region,
        brokers = %all.iter().flatten().map(ToString::to_string).collect::<Vec<_>>().join(","),
        device = %config.tun_name,
        mtu = config.mtu,
        offload,
        table = config.table,
        rule_priority = config.rule_priority,
        public_key = %tether_pki::wg::encode(&key.public()),
        "gateway starting"
    );

    let (sets, mut set_rx) = watch::channel(None::<RouteSet>);
    let (lists, mut list_rx) = watch::channel(None::<BrokerList>);
    let tasks = [
        tokio::spawn(outbound(shared.clone())),
        tokio::spawn(inbound(shared.clone(), sets, zones, lists)),
        tokio::spawn(timers(shared.clone())),
    ];
    tokio::pin!(shutdown);
    let mut resync = tokio::time::interval(ROUTE_RESYNC);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut resync_error = None::<String>;
    let result = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            _ = resync.tick() => {
                let wanted: BTreeSet<IpNet> = site_prefixes.union(&pools).copied().collect();
                let outcome = match routes.refresh().await {
                    Ok(lost) if lost > 0 || routes.installed() != &wanted => {
                        routes.set(&wanted).await.map(|(added, _)| {
                            tracing::warn!(
                                lost, added,
                                "site routes the kernel no longer held (the device went down, or they were deleted by hand) or had refused are added again"
                            );
                        })
                    }
                    Ok(_) => Ok(()),
                    Err(e) => Err(e),
                };
                // Each distinct failure once, not every few seconds.
                match outcome {
                    Ok(()) => resync_error = None,
                    Err(e) => {
                        let e = format!("{e:#}");
                        if resync_error.as_ref() != Some(&e) {
                            tracing::error!(error = %e, "cannot restore the site routes");
                            resync_error = Some(e);
                        }
                    }
                }
            }
            changed = list_rx.changed() => {
                if changed.is_err() {
                    break Err(anyhow::anyhow!("the tunnel stopped"));
                }
                let Some(list) = list_rx.borrow_and_update().clone() else { continue };
                let applied = match shared.set.lock() {
                    Ok(mut s) => s.apply(&list),
                    Err(_) => continue,
                };
                tracing::debug!(brokers = list.endpoints.len(), version = list.version, "broker list received");
                shared.apply(&applied, "the active broker", &dir);
            }
            changed = zone_rx.changed() => {
                if changed.is_err() {
                    break Err(anyhow::anyhow!("the tunnel stopped"));
                }
                let Some(zone) = zone_rx.borrow_and_update().clone() else { continue };
                tracing::info!(serial = zone.serial, sites = zone.sites.len(), "mesh zone updated");
                let zone_pools: BTreeSet<IpNet> = zone.reverse.iter().copied().collect();
                if zone_pools != pools {
                    pools = zone_pools;
                    let wanted: BTreeSet<IpNet> = site_prefixes.union(&pools).copied().collect();
                    match routes.set(&wanted).await {
                        Ok((added, removed)) => tracing::info!(
                            pools = pools.len(), added, removed, "pool routes updated"
                        ),
                        Err(e) => tracing::error!(error = format!("{e:#}"), "cannot route the pools"),
                    }
                }
                let path = dir.join(ZONE_FILE);
                let tmp = path.with_extension("tmp");
                if let Err(e) = std::fs::write(&tmp, zone.encode()).and_then(|_| std::fs::rename(&tmp, &path)) {
                    tracing::warn!(error = %e, path = %path.display(), "cannot keep the mesh zone");
                }
            }
            changed = set_rx.changed() => {
                if changed.is_err() {
                    break Err(anyhow::anyhow!("the tunnel stopped"));
                }
                let Some(set) = set_rx.borrow_and_update().clone() else { continue };
                site_prefixes = set.routes.iter().map(|r| r.prefix).collect();
                let wanted: BTreeSet<IpNet> = site_prefixes.union(&pools).copied().collect();
                match routes.set(&wanted).await {
                    Ok((added, removed)) => tracing::info!(
                        routes = wanted.len(), added, removed, generation = set.generation,
                        "site routes updated"
                    ),
                    Err(e) => tracing::error!(error = format!("{e:#}"), "cannot update site routes"),
                }
                let live = LiveRoutes {
                    gateway: config.id.clone(),
                    region: config.region.clone(),
                    broker: shared.addr(shared.target()).map(|a| a.to_string()).unwrap_or_default(),
                    generation: set.generation,
                    received_at: SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or_default(),
                    routes: set.routes,
                };
                if let Err(e) = live.save(&dir) {
                    tracing::warn!(error = format!("{e:#}"), "cannot record the live routes");
                }
            }
        }
    };
    for t in &tasks {
        t.abort();
    }
    if let Some(dns) = dns {
        dns.shutdown().await;
    }
    if let Some(listener) = metrics_listener {
        listener.abort();
    }
    routes.remove_all().await;
    tracing::info!("gateway stopped; its rules and routes are removed");
    result
}

/// Device to broker.
async fn outbound(shared: Arc<Shared>) {
    let batch = if shared.offload {
        tun_rs::IDEAL_BATCH_SIZE
    } else {
        1
    };
    let mut packets = tether_shell::tun::BatchReader::new(batch, 65_536, 0);
    // Sealed datagrams back to back in the first `used` bytes; grown to
    // the largest batch once, not cleared, so no packet costs a memset.
    let mut sealed: Vec<u8> = vec![0u8; batch * 1600];
    let mut used;
    let mut lens: Vec<usize> = Vec::with_capacity(batch);
    let mut handshakes: Vec<Vec<u8>> = Vec::new();
    loop {
        if let Err(e) = packets.read(&shared.dev).await {
            tracing::error!(error = %e, "the gateway device failed");
            return;
        }
        used = 0;
        lens.clear();
        // The whole batch goes to one broker: the one active as it is
        // sealed.
        let target = shared.target();
        let (Some(peer), Some(addr)) = (shared.brokers.get(target), shared.addr(target)) else {
            // Its broker was just forgotten: the failover moves on.
            continue;
        };
        {
            let Ok(mut tunn) = peer.tunn.lock() else {
                return;
            };
            for packet in packets.packets_mut() {
                let size = packet.len();
                shared.clamp(packet);
                let start = used;
                if sealed.len() < start + size + 148 {
                    sealed.resize(start + size + 148, 0);
                }
                let (len, data) = match tunn.encapsulate(packet, &mut sealed[start..]) {
                    TunnResult::WriteToNetwork(p) => (p.len(), p.first() == Some(&4)),
                    TunnResult::Err(e) => {
                        shared
                            .metrics
                            .dropped(Dropped::SealFailed, 1, &format_args!("{e:?}"));
                        (0, false)
                    }
                    _ => (0, false),
                };
                if data {
                    used = start + len;
                    lens.push(len);
                } else if len > 0 {
                    // No session yet: the packet is queued and this is a
                    // handshake initiation, sent on its own.
                    handshakes.push(sealed[start..start + len].to_vec());
                }
            }
        }
        for h in handshakes.drain(..) {
            shared.send_all(addr, &h, &[h.len()]).await;
        }
        let sent = shared.send_all(addr, &sealed[..used], &lens).await;
        shared.metrics.to_broker(sent);
    }
}

/// Brokers to device, and the control channel.
async fn inbound(
    shared: Arc<Shared>,
    sets: watch::Sender<Option<RouteSet>>,
    zones: watch::Sender<Option<Arc<ZoneData>>>,
    lists: watch::Sender<Option<BrokerList>>,
) {
    let mut receiver = tether_shell::udp::BatchReceiver::default();
    let mut out = vec![0u8; 65_536 + 64];
    let mut batch = tether_shell::tun::DeviceBatch::new(shared.offload);
    let mut replies: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
    // A packet the batch had no room for, until the batch is written.
    let mut overflow: Option<Vec<u8>> = None;
    // Route sets and zones are taken from the active broker only, and
    // assembled afresh after every switch.
    let mut assembler = Assembler::default();
    let mut zone_assembler = ZoneAssembler::default();
    let mut list_assembler = ListAssembler::default();
    let mut switches = shared.switches.load(Ordering::Relaxed);
    loop {
        if let Err(e) = receiver.recv(&shared.socket, &shared.udp).await {
            tracing::warn!(error = %e, "UDP receive failed");
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let now_switches = shared.switches.load(Ordering::Relaxed);
        if now_switches != switches {
            switches = now_switches;
            assembler = Assembler::default();
            zone_assembler = ZoneAssembler::default();
            list_assembler = ListAssembler::default();
        }
        let active = shared.target();
        let addrs = shared.addrs();
        let mut heard = Heard::default();
        for (from, datagram) in receiver.datagrams() {
            let Some(index) = Shared::broker_of(&addrs, from) else {
                shared.metrics.dropped(
                    Dropped::NotFromBroker,
                    1,
                    &format_args!("last from {from}"),
                );
                continue;
            };
            let (Some(peer), Some(peer_addr)) = (
                shared.brokers.get(index),
                addrs.get(index).copied().flatten(),
            ) else {
                continue;
            };
            // One receive holds up to 8 coalesced runs of about 45 packets
            // each, more than a write batch: write what is ready before it
            // fills.
            if !batch.has_room() {
                write(&shared, &mut batch).await;
            }
            // The lock is released before the next await.
            let result = {
                let Ok(mut tunn) = peer.tunn.lock() else {
                    return;
                };
                tether_shell::wireguard::decapsulate(
                    &mut tunn,
                    from.ip(),
                    datagram,
                    &mut out,
                    |reply| replies.push((peer_addr, reply.to_vec())),
                    |p| {
                        if let Some(payload) =
                            control::control_payload(p, BROKER_CONTROL, GATEWAY_CONTROL)
                        {
                            match Message::decode(payload) {
                                Ok(Message::Pong { seq }) => heard.pong(index, seq),
                                Ok(Message::Leaving) => heard.leaving |= 1 << index,
                                Ok(m @ Message::Routes { .. }) if index == active => {
                                    if let Some(set) = assembler.push(m) {
                                        sets.send_replace(Some(set));
                                    }
                                }
                                Ok(m @ Message::Zone { .. }) if index == active => {
                                    if let Some(zone) = zone_assembler.push(m) {
                                        zones.send_replace(Some(Arc::new(zone)));
                                    }
                                }
                                Ok(m @ Message::Brokers { .. }) if index == active => {
                                    if let Some(list) = list_assembler.push(m) {
                                        lists.send_replace(Some(list));
                                    }
                                }
                                Ok(_) => {}
                                // A newer broker's message: ignored.
                                Err(e) if e.is_newer() => {}
                                Err(e) => shared.metrics.dropped(
                                    Dropped::BadControl,
                                    1,
                                    &format_args!("{e}"),
                                ),
                            }
                        } else {
                            shared.clamp(p);
                            if batch.push(p).is_err() {
                                // Kept, and added once the batch is written.
                                overflow = Some(p.to_vec());
                            }
                        }
                    },
                )
            };
            match result {
                Ok(()) => heard.heard |= 1 << index,
                Err(e) => shared.metrics.refused(&e, from),
            }
            if let Some(p) = overflow.take() {
                write(&shared, &mut batch).await;
                let _ = batch.push(&p);
            }
        }
        shared.heard(&heard);
        for (to, r) in replies.drain(..) {
            shared.send_all(to, &r, &[r.len()]).await;
        }
        write(&shared, &mut batch).await;
    }
}

/// What one receive heard from the brokers, by slot.
struct Heard {
    /// Brokers whose sessions authenticated a datagram, a bit each.
    heard: u64,
    /// The highest sequence number among each broker's pongs.
    ponged: [Option<u64>; MAX_BROKERS],
    /// Brokers that said they are stopping, a bit each.
    leaving: u64,
}

impl Default for Heard {
    fn default() -> Self {
        Self {
            heard: 0,
            ponged: [None; MAX_BROKERS],
            leaving: 0,
        }
    }
}

impl Heard {
    /// Broker `slot` answered the ping of sequence number `seq`.
    fn pong(&mut self, slot: usize, seq: u64) {
        if let Some(p) = self.ponged.get_mut(slot) {
            *p = Some(p.map_or(seq, |s| s.max(seq)));
        }
    }
}

/// Writes the packets added to `batch` to the device, counting them as
/// forwarded or dropped.
async fn write(shared: &Shared, batch: &mut tether_shell::tun::DeviceBatch) {
    let n = batch.len();
    if n == 0 {
        return;
    }
    match batch.write(&shared.dev).await {
        Ok(()) => shared.metrics.from_broker(n),
        Err(e) => shared
            .metrics
            .dropped(Dropped::DeviceWrite, n, &format_args!("{e}")),
    }
}

/// Asks broker `broker` for the route set and for the broker list (unless
/// it holds the current one).
async fn send_requests(shared: &Shared, request: &[u8], broker: usize) {
    shared.send_one(broker, request).await;
    let known = shared.set.lock().map(|s| s.version()).unwrap_or(0);
    let ask = control::control_packet(
        GATEWAY_CONTROL,
        BROKER_CONTROL,
        &Message::BrokersRequest { known }.encode(),
    );
    shared.send_one(broker, &ask).await;
}

/// A WireGuard session with a broker for slot `slot`.
fn new_tunn(private: &x25519::StaticSecret, broker_key: x25519::PublicKey, slot: usize) -> Tunn {
    Tunn::new(
        private.clone(),
        broker_key,
        None,
        Some(KEEPALIVE_SECS),
        slot as u32,
        None,
    )
}

/// The learned brokers saved by an earlier run (none when there is no
/// file).
fn load_learned(dir: &Path) -> Vec<SocketAddr> {
    std::fs::read_to_string(dir.join(BROKERS_FILE))
        .map(|t| brokers::decode_saved(&t))
        .unwrap_or_default()
}

/// Saves the learned brokers (replacing the file as a whole).
fn save_learned(dir: &Path, learned: &[SocketAddr]) {
    let path = dir.join(BROKERS_FILE);
    let tmp = path.with_extension("tmp");
    if let Err(e) = std::fs::write(&tmp, brokers::encode_saved(learned))
        .and_then(|_| std::fs::rename(&tmp, &path))
    {
        tracing::warn!(error = %e, path = %path.display(), "cannot keep the learned brokers");
    }
}

/// What the gateway says when no broker has completed a handshake for a
/// while: boringtun itself reports only `HANDSHAKE(REKEY_TIMEOUT)`, and a
/// broker answers a key it does not know with silence.
fn no_handshake(brokers: &[SocketAddr]) -> String {
    let list = brokers
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let port = brokers.first().map_or(51820, SocketAddr::port);
    format!(
        "no WireGuard handshake with any broker ({list}) after 10 s. Likely causes: broker_public_key in this gateway's configuration is not the brokers' key (`tether-broker gateway key` prints it); this gateway's key is not registered in the brokers' [[gateway]] public_key (`tether-gateway key` prints it; a broker logs \"not a registered gateway key\" for it); or UDP {port} towards the brokers is blocked"
    )
}

/// WireGuard timers, route-set requests, pings and connection status, as
/// [`ControlSchedule`] and [`Failover`] decide.
async fn timers(shared: Arc<Shared>) {
    let mut buf = vec![0u8; 256];
    let request =
        control::control_packet(GATEWAY_CONTROL, BROKER_CONTROL, &Message::Request.encode());
    let mut schedule = ControlSchedule::new(Instant::now());
    let mut actions: Vec<FailoverAction> = Vec::new();
    let mut events: Vec<FailoverEvent> = Vec::new();
    loop {
        let deadline = match shared.failover.lock() {
            Ok(f) => schedule.poll_timeout().min(f.poll_timeout()),
            Err(_) => return,
        };
        tokio::select! {
            _ = tokio::time::sleep_until(deadline.into()) => {}
            _ = shared.wake.notified() => {}
        }
        let addrs = shared.addrs();
        let name = |i: usize| {
            addrs
                .get(i)
                .copied()
                .flatten()
                .map_or_else(|| format!("slot {i}"), |a| a.to_string())
        };
        let now = Instant::now();
        schedule.handle_timeout(now);
        while let Some(action) = schedule.poll_action() {
            match action {
                ControlAction::UpdateTimers => {
                    // The freshest handshake of any broker tells whether
                    // the gateway is connected at all.
                    let mut freshest: Option<Duration> = None;
                    for (peer, addr) in shared.brokers.iter().zip(addrs.iter()) {
                        let Some(addr) = *addr else { continue };
                        let (out, since) = match peer.tunn.lock() {
                            Ok(mut t) => {
                                let out = match t.update_timers(&mut buf) {
                                    TunnResult::WriteToNetwork(p) => Some(p.to_vec()),
                                    _ => None,
                                };
                                (out, t.stats().0)
                            }
                            Err(_) => return,
                        };
                        if let Some(p) = out {
                            shared.send_all(addr, &p, &[p.len()]).await;
                        }
                        freshest = match (freshest, since) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        };
                    }
                    schedule.handle_handshake(freshest, Instant::now());
                }
                ControlAction::SendRequest => {
                    send_requests(&shared, &request, shared.target()).await
                }
            }
        }
        {
            let Ok(mut f) = shared.failover.lock() else {
                return;
            };
            f.handle_timeout(now);
            while let Some(a) = f.poll_action() {
                actions.push(a);
            }
            while let Some(e) = f.poll_event() {
                events.push(e);
            }
            shared.retarget(&f);
            let up = (0..f.brokers()).filter(|i| f.is_up(*i)).count();
            shared.metrics.brokers(&addrs, up, f.target());
        }
        for action in actions.drain(..) {
            match action {
                FailoverAction::Ping { broker, seq } => {
                    let ping = control::control_packet(
                        GATEWAY_CONTROL,
                        BROKER_CONTROL,
                        &Message::Ping { seq }.encode(),
                    );
                    shared.send_one(broker, &ping).await;
                }
                FailoverAction::Handshake { broker } => {
                    let (Some(peer), Some(addr)) =
                        (shared.brokers.get(broker), shared.addr(broker))
                    else {
                        continue;
                    };
                    let init = match peer.tunn.lock() {
                        Ok(mut t) => match t.format_handshake_initiation(&mut buf, true) {
                            TunnResult::WriteToNetwork(p) => Some(p.to_vec()),
                            _ => None,
                        },
                        Err(_) => return,
                    };
                    if let Some(p) = init {
                        shared.send_all(addr, &p, &[p.len()]).await;
                    }
                }
            }
        }
        for event in events.drain(..) {
            match event {
                FailoverEvent::Up { broker } => {
                    tracing::info!(broker = %name(broker), "broker answers")
                }
                FailoverEvent::Down { broker, silent } => tracing::warn!(
                    broker = %name(broker),
                    silent_ms = silent.as_millis() as u64,
                    "broker stopped answering"
                ),
                FailoverEvent::Leaving { broker } => tracing::info!(
                    broker = %name(broker),
                    "broker is stopping: it takes no more traffic until it answers again"
                ),
                FailoverEvent::Selected { broker } => {
                    tracing::info!(broker = %name(broker), "traffic goes through this broker");
                    send_requests(&shared, &request, broker).await;
                }
                FailoverEvent::Switched { from, to } => {
                    shared.metrics.failover();
                    let failovers = shared.failover.lock().map(|f| f.failovers()).unwrap_or(0);
                    tracing::info!(
                        from = %name(from),
                        broker = %name(to),
                        failovers,
                        "the active broker stopped answering: traffic moved to this broker"
                    );
                    send_requests(&shared, &request, to).await;
                }
                FailoverEvent::NoneAnswering { broker } => tracing::warn!(
                    broker = %name(broker),
                    "no broker answers: traffic stays on this broker until one does"
                ),
            }
        }
        while let Some(event) = schedule.poll_event() {
            match event {
                ControlEvent::Established => {
                    tracing::info!("WireGuard session with the broker established")
                }
                ControlEvent::NoHandshake => {
                    let followed: Vec<SocketAddr> = addrs.iter().flatten().copied().collect();
                    tracing::warn!("{}", no_handshake(&followed))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_handshake_names_both_keys() {
        let text = no_handshake(&["192.0.2.1:51820".parse().unwrap_or_else(|_| unreachable!())]);
        assert!(text.contains("broker_public_key"), "{text}");
        assert!(text.contains("`tether-broker gateway key`"), "{text}");
        assert!(text.contains("`tether-gateway key`"), "{text}");
        assert!(text.contains("UDP 51820"), "{text}");
    }
}
