//! Starting and stopping a broker.
//!
//! On first start the data directory gets its CA, store and admin token;
//! later starts load them. [`start`] returns once every listener is bound,
//! so callers (the binary, tests) know the addresses in use.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ipnet::IpNet;
use tether_config::broker::BrokerConfig;
use tether_pki::ca::{create_private_dir, write_new_file};
use tokio::task::JoinHandle;

use tether_proto::broker::CloseReason;

use crate::state::Broker;

/// File holding the admin API token in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// File of the store in the data directory.
pub const STORE_FILE: &str = "store.redb";

/// A running broker.
pub struct Running {
    /// Its state.
    pub broker: Arc<Broker>,
    /// Bound tunnel addresses (UDP for HTTP/3, and TCP for HTTP/2 on the
    /// same port).
    pub tunnel_addrs: Vec<SocketAddr>,
    /// Bound admin API address.
    pub admin_addr: SocketAddr,
    /// Bound DNS addresses (UDP and TCP each), if DNS is served.
    pub dns_addrs: Vec<SocketAddr>,
    dns: Option<tether_shell::dns::DnsServer>,
    /// Whether this start created the data directory's CA.
    pub created: bool,
    endpoints: Vec<quinn::Endpoint>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("tunnel_addrs", &self.tunnel_addrs)
            .field("admin_addr", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

/// File holding the read-only (viewer) token of the admin API and the
/// console in the data directory.
pub const VIEWER_TOKEN_FILE: &str = "viewer.token";

/// Reads the admin token, creating it (mode 0600) on first start.
pub fn load_or_create_admin_token(data_dir: &Path) -> anyhow::Result<String> {
    load_or_create_token(&data_dir.join(ADMIN_TOKEN_FILE))
}

/// Reads the viewer token, creating it (mode 0600) on first start (also
/// in a data directory made before viewers existed).
pub fn load_or_create_viewer_token(data_dir: &Path) -> anyhow::Result<String> {
    load_or_create_token(&data_dir.join(VIEWER_TOKEN_FILE))
}

fn load_or_create_token(path: &Path) -> anyhow::Result<String> {
    let path = path.to_path_buf();
    if path.exists() {
        let token = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        return Ok(token.trim().to_string());
    }
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    let token = data_encoding::BASE32_NOPAD
        .encode(&bytes)
        .to_ascii_lowercase();
    write_new_file(&path, format!("{token}\n").as_bytes(), 0o600)?;
    Ok(token)
}

/// Aborts the tasks it holds when dropped.
struct Tasks(Vec<JoinHandle<()>>);

impl Tasks {
    fn push(&mut self, task: JoinHandle<()>) {
        self.0.push(task);
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// The data directory: the configured one or the default.
pub fn data_dir(config: &BrokerConfig) -> PathBuf {
    config
        .data_dir
        .clone()
        .unwrap_or_else(crate::paths::default_data_dir)
}

/// Opens the local gateway's device and binds WireGuard, whichever are
/// configured; the forwarding plane runs their receive loops.
fn start_gateways(broker: &Arc<Broker>) -> anyhow::Result<()> {
    if let Some(cfg) = &broker.config.local_gateway {
        // The pools of every region whose sites this gateway may reach.
        let reachable: Vec<IpNet> = {
            let router = broker
                .core()
                .read()
                .map_err(|_| anyhow::anyhow!("router lock poisoned"))?;
            broker
                .pools()
                .into_iter()
                .filter(|(site_region, _)| router.residency.permits(site_region, &cfg.region))
                .flat_map(|(_, pools)| pools)
                .collect()
        };
        let gw = crate::local_gateway::open(cfg, &reachable)?;
        broker.plane().attach_local_gateway(Arc::new(gw))?;
    }
    if let Some((wg, receivers)) = crate::wireguard::start(
        &broker.config,
        &broker.data_dir,
        broker.clone(),
        broker.metrics(),
    )? {
        broker.plane().attach_wireguard(wg, receivers)?;
    }
    Ok(())
}

/// Announces the broker to the fleet and ends the sessions that another
/// broker took over.
async fn join_fleet(
    broker: &Arc<Broker>,
    etcd: &tether_config::broker::EtcdConfig,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let link = crate::link::start(&broker.config.peering, &broker.data_dir).await?;
    broker.plane().attach_link(link.clone())?;
    let me = crate::fleet::new_id();
    // The announcement, its link key proven with the broker's link
    // certificate as it is now.
    let announcement = {
        let (broker, link, me) = (broker.clone(), link.clone(), me.clone());
        move || -> anyhow::Result<tether_proto::fleet::Member> {
            let forward = link.advertise().to_string();
            let proof = broker
                .ca
                .link_signer()
                .prove(&me, &forward, &link.public_key())
                .context("cannot prove the link key with the broker's link certificate")?;
            Ok(tether_proto::fleet::Member {
                endpoints: broker.enroll_endpoints(),
                regions: broker.config.regions.keys().cloned().collect(),
                forward: Some(forward),
                link_key: Some(tether_pki::wg::encode(&link.public_key())),
                link_proof: Some(proof),
                gateways: crate::peering::announced_gateways(&broker.config),
                link_keepalive_ms: u32::try_from(tether_proto::peering::LINK_KEEPALIVE.as_millis())
                    .ok(),
                gateway_endpoint: crate::wireguard::gateway_endpoint(&broker.config),
            })
        }
    };
    let mut reissued = broker.ca.link_signer_changes();
    reissued.borrow_and_update();
    let (fleet, mut decisions, task) = crate::fleet::start(etcd, me, announcement()?)
        .await
        .context("cannot join the broker fleet")?;
    broker.set_fleet(fleet.clone());
    // A new link certificate (CA rotation, renewal) is announced with a
    // new proof, long before the old one ends: the only writes of the
    // announcement after joining.
    let reannounce = {
        let fleet = fleet.clone();
        tokio::spawn(async move {
            while reissued.changed().await.is_ok() {
                match announcement() {
                    Ok(member) => {
                        tracing::info!(
                            "link certificate reissued; announcing the link key with its new proof"
                        );
                        fleet.announce(member);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "link certificate reissued, but the link key could not be proven with it; the fleet keeps the earlier proof")
                    }
                }
            }
        })
    };
    let admission = {
        let broker = broker.clone();
        move || crate::link::Admission {
            anchors: broker.ca.bundle_der(),
            allow_unproven: broker.config.peering.allow_unproven_peers,
        }
    };
    let peering = crate::peering::follow(fleet, link, broker.core_cell(), admission);
    let broker = broker.clone();
    let decide = tokio::spawn(async move {
        while let Some(decision) = decisions.recv().await {
            match decision {
                tether_proto::fleet::Decision::EndSession(site) => {
                    if let Some(session) = broker.session(&site) {
                        tracing::info!(%site, "the site connected to another broker; ending its session here");
                        session.request_close(CloseReason::Replaced);
                    }
                }
                tether_proto::fleet::Decision::MoveSites(held) => {
                    tracing::warn!(
                        sites = held.len(),
                        "fleet: this broker's etcd lease ran out, so it can no longer prove it holds its sites; asking every connected site to move to another broker"
                    );
                    crate::metrics::fenced();
                    broker.ask_sites_to_move();
                    // Gateways too: this broker's view of the fleet is
                    // stale now. It answers their pings with "leaving"
                    // while fenced, pongs again under its next lease
                    // (`Fleet::gateways_leave`).
                    if let Some(wg) = broker.plane().wireguard() {
                        tracing::info!(
                            "fleet: telling the gateways to send their traffic to another broker while this one cannot reach etcd"
                        );
                        wg.announce_leaving().await;
                    }
                }
            }
        }
    });
    Ok(vec![task, decide, peering, reannounce])
}

/// Starts a broker: data directory, listeners, local gateway, admin API.
pub async fn start(config: BrokerConfig) -> anyhow::Result<Running> {
    let data_dir = data_dir(&config);
    create_private_dir(&data_dir)?;
    let admin_token = load_or_create_admin_token(&data_dir)?;
    let store = crate::store::open(&config.store, &data_dir)?;
    let (ca, created) = crate::authority::Authority::open(&config, &data_dir, store.clone())
        .context("cannot load the CA")?;
    let slot = ca.server_cert_slot();
    let viewer_token = load_or_create_viewer_token(&data_dir)?;
    let broker = Broker::new(config.clone(), data_dir, ca, store, slot, admin_token)?;
    broker.set_viewer_token(viewer_token);
    // Tasks started so far end with a failed start, so that they do not
    // keep the store and the sockets of a broker that never ran.
    let mut tasks = Tasks(Vec::new());

    // Revocations close live sessions.
    let (revoked_tx, mut revoked_rx) = tokio::sync::mpsc::unbounded_channel();
    broker.revocations.on_revoke(move |entry| {
        let _ = revoked_tx.send(entry.clone());
    });
    {
        let broker = broker.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(entry) = revoked_rx.recv().await {
                broker.on_revoked(&entry);
            }
        }));
    }

    // The store's notices: revocations, re-admissions and allocations made
    // by other brokers sharing the store (and echoes of this one's own,
    // which change nothing). One that cannot be applied, or notices that
    // were lost, lead to a full read of the store, retried until it works.
    tasks.push(tokio::spawn(
        broker.clone().follow_store(broker.store.watch()),
    ));

    // The broker core's one timer: certificate expiry of live sessions.
    {
        let broker = broker.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let deadline = broker.core().next_deadline();
                let sleep = async {
                    match deadline {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = sleep => broker.core().expire(std::time::Instant::now()),
                    _ = broker.core().deadline_moved() => {}
                }
            }
        }));
    }

    let mut endpoints = Vec::new();
    let mut tunnel_addrs = Vec::new();
    let acceptor = crate::h2server::acceptor(&broker)?;
    for addr in &config.listen {
        // HTTP/3 on UDP and HTTP/2 on TCP, on the same port (one free for
        // both when the configuration says port 0).
        let (udp, tcp) = tether_shell::udp::bind_pair(*addr)
            .map_err(|e| crate::server::bind_error(e.protocol, e.addr, &e.error))?;
        let endpoint = crate::server::endpoint(&broker, udp)?;
        let bound = endpoint.local_addr()?;
        tunnel_addrs.push(bound);
        tasks.push(tokio::spawn(crate::server::serve(
            broker.clone(),
            endpoint.clone(),
        )));
        endpoints.push(endpoint);
        let listener = crate::h2server::listener(tcp)?;
        tasks.push(tokio::spawn(crate::h2server::serve(
            broker.clone(),
            listener,
            acceptor.clone(),
        )));
    }
    if let Some(first) = tunnel_addrs.first() {
        broker.set_tunnel_addr(*first);
    }

    start_gateways(&broker)?;

    // With a shared store, the broker joins the fleet once its endpoints
    // are known.
    if let tether_config::broker::StoreConfig::Etcd(etcd) = &config.store {
        for task in join_fleet(&broker, etcd).await? {
            tasks.push(task);
        }
    }

    // Identity DNS: the zone follows every change; the server answers
    // from it.
    crate::names::first_zone(&broker).await?;
    tasks.push(tokio::spawn(crate::names::keep_zone(broker.clone())));
    let dns = crate::names::serve(&broker).await?;
    let dns_addrs = crate::names::addrs(&dns);

    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("cannot listen on {} for the admin API", config.admin_listen))?;
    let admin_addr = admin.local_addr()?;
    let app = crate::admin::router(broker.clone());
    let limits = crate::admin_listener::Limits::new(&config);
    tasks.push(tokio::spawn(crate::admin_listener::serve(
        admin, app, limits,
    )));

    // Release LAN mappings whose grace period ended (the deadline is in
    // the store, so one set before a restart is kept).
    {
        let broker = broker.clone();
        let every = lan_sweep_interval(&config);
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let b = broker.clone();
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || b.release_due_lans()).await
                {
                    tracing::warn!(error = %e, "could not release unused LAN mappings; retrying");
                }
            }
        }));
    }

    // Renew the server certificates well before they expire.
    {
        let broker = broker.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                match broker.ca.renew_server_certs() {
                    Ok(true) => tracing::info!("broker certificate renewed"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "could not renew the broker certificate; retrying in an hour"),
                }
            }
        }));
    }

    Ok(Running {
        broker,
        tunnel_addrs,
        admin_addr,
        dns_addrs,
        dns,
        created,
        endpoints,
        tasks: std::mem::take(&mut tasks.0),
    })
}

/// After its last site moved, a stopping broker stays until no packet for
/// its moved sites has been relayed to it for this long (the other brokers
/// learn of each move from etcd a little later than the site made it;
/// meanwhile this broker relays their packets on to the site's new
/// broker), within the drain time.
pub const HANDOVER_QUIET: Duration = Duration::from_millis(300);

/// What a drain achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Sessions when the drain began.
    pub sessions: usize,
    /// Sessions still here when it ended.
    pub stayed: usize,
    /// How long it took.
    pub took: Duration,
}

impl Running {
    /// Hands the sites to the other brokers, then shuts down: every HTTP/3
    /// and HTTP/2 connection gets a GOAWAY, and the broker waits up to `drain` for its
    /// sessions to end (each site opens its tunnel at another broker, which
    /// takes the site over, and then leaves this one). Then, within the
    /// same time, it relays on what the other brokers still send it for
    /// the moved sites until that stops, and leaves the fleet. A broker
    /// alone in its regions does not wait.
    pub async fn handover(self, drain: Duration) -> Drained {
        let started = std::time::Instant::now();
        let sessions = self.broker.sessions().all().len();
        self.broker.start_draining();
        // Gateways move their traffic to another broker now.
        if let Some(wg) = self.broker.plane().wireguard() {
            wg.announce_leaving().await;
        }
        // With no other broker to go to, sites cannot move: do not wait.
        let others = self
            .broker
            .config
            .regions
            .keys()
            .any(|r| self.broker.site_brokers(r).1.len() > 1);
        let drain = if others { drain } else { Duration::ZERO };
        if sessions > 0 {
            tracing::info!(
                sessions,
                drain_secs = drain.as_secs_f64(),
                "going away: asking every site to move to another broker"
            );
        }
        let deadline = tokio::time::Instant::now() + drain;
        while !self.broker.sessions().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stayed = self.broker.sessions().all().len();
        crate::metrics::handed_over(sessions.saturating_sub(stayed), stayed);
        let drained = Drained {
            sessions,
            stayed,
            took: started.elapsed(),
        };
        if stayed > 0 {
            tracing::warn!(
                stayed,
                of = sessions,
                "drain time over; closing the sessions that did not move"
            );
        } else if sessions > 0 {
            tracing::info!(
                sessions,
                took_ms = drained.took.as_millis() as u64,
                "every site moved to another broker"
            );
        }
        if sessions > stayed {
            self.relay_for_moved_sites(deadline).await;
        }
        self.shutdown().await;
        drained
    }

    /// Keeps relaying, to their new brokers, the packets other brokers
    /// still send here for the sites that moved, until none has come for
    /// [`HANDOVER_QUIET`] or `deadline` passes.
    async fn relay_for_moved_sites(&self, deadline: tokio::time::Instant) {
        let plane = self.broker.plane();
        let started = tokio::time::Instant::now();
        let (mut seen, mut quiet_since) = (plane.relayed_on(), started);
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline || now.duration_since(quiet_since) >= HANDOVER_QUIET {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20).min(deadline - now)).await;
            let n = plane.relayed_on();
            if n != seen {
                (seen, quiet_since) = (n, tokio::time::Instant::now());
            }
        }
        let relayed = plane.relayed_on();
        tracing::info!(
            relayed_on = relayed,
            took_ms = started.elapsed().as_millis() as u64,
            "no packet for a moved site is relayed here any more; leaving"
        );
    }

    /// Leaves the fleet (so that the other brokers drop this one at once),
    /// then closes every session and listener.
    pub async fn shutdown(self) {
        if let Some(fleet) = self.broker.fleet() {
            let _ = tokio::time::timeout(Duration::from_secs(5), fleet.leave()).await;
        }
        for s in self.broker.sessions().all() {
            s.request_close(CloseReason::Shutdown);
        }
        for e in &self.endpoints {
            e.close(quinn::VarInt::from_u32(0x100), b"broker shutting down");
        }
        for e in &self.endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(2), e.wait_idle()).await;
        }
        for t in self.tasks {
            t.abort();
        }
        if let Some(dns) = self.dns {
            dns.shutdown().await;
        }
        // The sessions' last events reach the store before it closes.
        let broker = self.broker.clone();
        let _ = tokio::task::spawn_blocking(move || broker.events().flush(Duration::from_secs(5)))
            .await;
    }
}

/// How often unused LAN mappings are checked for release: a tenth of the
/// shortest grace period, between 1 s and 1 min.
fn lan_sweep_interval(config: &BrokerConfig) -> Duration {
    config
        .regions
        .keys()
        .map(|r| config.ipam.lan_limits(r).release_after / 10)
        .min()
        .unwrap_or(Duration::from_secs(60))
        .clamp(Duration::from_secs(1), Duration::from_secs(60))
}
