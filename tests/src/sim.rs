//! A deterministic simulation of several brokers and many sites.
//!
//! Each broker is a [`BrokerCore`] with a thin model of its shell (the
//! session handles it keeps, its in-flight CONNECT-IP requests, the store
//! commands it still has to perform, the connection losses and store watch
//! notices it has not seen yet). The brokers share one store model with
//! compare-and-set leases (version check, then put: what the embedded store
//! and etcd do) and a revocation log they learn through a watch. Sites are
//! agent models that enroll, connect, reconnect, move, renew and get
//! revoked. One fake clock; one seeded random schedule.
//!
//! After every step the invariants are checked ([`Sim::check`]); at the end
//! of a case every partition heals, everything in flight is delivered, every
//! site that may connect does, and each connected site must then have
//! exactly one session ([`Sim::settle`]). A failure names the seed and the
//! steps that led to it; `SIM_SEED=<seed>` replays one case.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tether_proto::broker::{
    Allocated, AllocationError, AllocationId, AllocationRequest, BrokerCore, CoreConfig, Event,
    GatewaySpec, MAX_ALLOCATION_ATTEMPTS, RegionPolicy, Revocation, SessionId, SessionOpen,
    StoreCommand, StoreResult, TokenPolicy,
};
use tether_proto::forward::{Ingress, Verdict};
use tether_proto::ids::{GatewayId, RegionId, SiteId};
use tether_proto::ipam::{Ipam, Lease, RegionLeases};
use tether_proto::route::{RouteKind, RouteTarget};

/// How long a site certificate lives in the simulation.
pub const CERT_LIFETIME: Duration = Duration::from_secs(3600);
/// A connected site renews when less than this is left.
const RENEW_BEFORE: Duration = Duration::from_secs(1200);

/// A small deterministic generator (SplitMix64): the simulation needs
/// reproducible choices, not cryptographic ones.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x5eed_7e7e_0000_0001)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// One entry of the store's revocation log, as a watch delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Notice {
    Revoke(Revocation),
    Reinstate(Revocation),
}

/// The shared store: leases under one version (compare-and-set), site
/// records, issued serials and the revocation log.
#[derive(Debug, Default)]
struct Store {
    version: u64,
    leases: BTreeMap<IpNet, Lease>,
    revoked_sites: BTreeSet<SiteId>,
    serials: BTreeMap<SiteId, Vec<Vec<u8>>>,
    log: Vec<Notice>,
    /// Leases a put replaced while another site held them.
    taken: Vec<(Lease, SiteId)>,
}

impl Store {
    fn snapshot(&self) -> RegionLeases {
        RegionLeases::from_parts(self.version, self.leases.values().cloned())
    }

    /// What a store does: compare the version, then delete and put. A put
    /// over an existing key replaces it, as in etcd.
    fn perform(&mut self, command: &StoreCommand) -> (AllocationId, StoreResult) {
        match command {
            StoreCommand::LoadLeases { allocation, .. } => {
                (*allocation, StoreResult::Leases(self.snapshot()))
            }
            StoreCommand::CompareAndSet { allocation, txn } => {
                if txn.expected_version != self.version {
                    return (*allocation, StoreResult::Conflict);
                }
                self.version += 1;
                for prefix in &txn.delete {
                    self.leases.remove(prefix);
                }
                for lease in &txn.put {
                    if let Some(old) = self.leases.insert(lease.prefix, lease.clone())
                        && old.site != lease.site
                    {
                        self.taken.push((lease.clone(), old.site));
                    }
                }
                (*allocation, StoreResult::Committed)
            }
        }
    }

    /// Revocations in force after the first `upto` log entries.
    fn in_force(&self, upto: usize) -> BTreeSet<Revocation> {
        let mut set = BTreeSet::new();
        for notice in self.log.iter().take(upto) {
            match notice {
                Notice::Revoke(r) => {
                    set.insert(r.clone());
                }
                Notice::Reinstate(r) => {
                    set.remove(r);
                }
            }
        }
        set
    }

    fn owner(&self, addr: IpAddr) -> Option<&SiteId> {
        self.leases
            .values()
            .find(|l| l.prefix.contains(&addr))
            .map(|l| &l.site)
    }
}

/// A site's connection to a broker.
#[derive(Debug, Clone)]
struct Conn {
    id: u64,
    broker: usize,
    session: Option<SessionId>,
}

/// A site's agent.
#[derive(Debug, Clone)]
struct Agent {
    site: SiteId,
    enrolled: bool,
    serial: Vec<u8>,
    not_after: Instant,
    partitioned: bool,
    conn: Option<Conn>,
    addresses: Option<Vec<IpNet>>,
}

/// A CONNECT-IP request between its checks and its registration.
#[derive(Debug, Clone)]
struct Pending {
    agent: usize,
    conn: u64,
    connected_at: Instant,
    serial: Vec<u8>,
    not_after: Instant,
    allocation: AllocationId,
    result: Option<Result<Allocated, AllocationError>>,
}

/// What the broker's shell keeps of a session.
#[derive(Debug, Clone)]
struct Handle {
    id: SessionId,
    agent: usize,
    conn: u64,
    connected_at: Instant,
    serial: Vec<u8>,
}

/// One broker: its core and its shell's state.
#[derive(Debug)]
struct Node {
    core: BrokerCore,
    partitioned: bool,
    cursor: usize,
    commands: Vec<StoreCommand>,
    pending: Vec<Pending>,
    sessions: BTreeMap<SiteId, Handle>,
    losses: Vec<u64>,
}

/// What a case exercised, to show the schedule reaches the interesting
/// interleavings.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Steps run.
    pub steps: usize,
    /// Sessions registered.
    pub sessions: usize,
    /// Sessions replaced by a newer one.
    pub replaced: usize,
    /// Registrations refused as older than the current session.
    pub superseded: usize,
    /// Registrations refused because the core knew of a revocation.
    pub refused_revoked: usize,
    /// Compare-and-set conflicts.
    pub conflicts: usize,
    /// Sessions ended by a revocation sweep.
    pub swept: usize,
    /// Sessions ended by certificate expiry.
    pub expired: usize,
    /// Broker restarts.
    pub restarts: usize,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Self) {
        self.steps += o.steps;
        self.sessions += o.sessions;
        self.replaced += o.replaced;
        self.superseded += o.superseded;
        self.refused_revoked += o.refused_revoked;
        self.conflicts += o.conflicts;
        self.swept += o.swept;
        self.expired += o.expired;
        self.restarts += o.restarts;
    }
}

/// A broken invariant.
#[derive(Debug, Clone)]
pub struct Violation {
    /// The case's seed.
    pub seed: u64,
    /// What broke.
    pub message: String,
    /// The steps up to it.
    pub trace: Vec<String>,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {}: {} (replay with SIM_SEED={})",
            self.seed, self.message, self.seed
        )?;
        for (i, step) in self.trace.iter().enumerate() {
            writeln!(f, "  {i:>3} {step}")?;
        }
        Ok(())
    }
}

/// The simulated world.
#[derive(Debug)]
pub struct Sim {
    seed: u64,
    rng: Rng,
    now: Instant,
    store: Store,
    nodes: Vec<Node>,
    agents: Vec<Agent>,
    next_conn: u64,
    next_session: u64,
    next_serial: u64,
    trace: Vec<String>,
    stats: Stats,
}

fn region() -> RegionId {
    RegionId::new("eu").unwrap_or_else(|_| unreachable!())
}

fn config(revoked: Vec<Revocation>) -> CoreConfig {
    let pools: Vec<IpNet> = ["100.64.0.0/28", "fd7a::/124"]
        .iter()
        .filter_map(|p| p.parse().ok())
        .collect();
    let mut regions = BTreeMap::new();
    regions.insert(
        region(),
        RegionPolicy {
            pools: pools.clone(),
            allow_gateways_from: BTreeSet::new(),
        },
    );
    let ipam = Ipam::new(BTreeMap::from([(region(), pools)])).unwrap_or_default();
    CoreConfig {
        regions,
        ipam,
        gateways: vec![GatewaySpec {
            id: GatewayId::new("backend").unwrap_or_else(|_| unreachable!()),
            region: region(),
            prefixes: "10.20.0.0/16".parse().into_iter().collect(),
            local: false,
        }],
        tokens: TokenPolicy {
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(86_400),
        },
        revoked,
        max_allocation_attempts: MAX_ALLOCATION_ATTEMPTS,
        access_policy: Default::default(),
    }
}

/// An IPv4/UDP packet from a backend behind the gateway to `dst`.
fn packet_to(dst: std::net::Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&28u16.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 20, 0, 5]);
    p[16..20].copy_from_slice(&dst.octets());
    p
}

impl Sim {
    /// A world of 2-3 brokers and 3-8 sites for `seed`.
    pub fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let brokers = 2 + rng.below(2);
        let sites = 3 + rng.below(6);
        let now = Instant::now();
        let nodes = (0..brokers)
            .map(|_| Node {
                core: BrokerCore::new(config(Vec::new())),
                partitioned: false,
                cursor: 0,
                commands: Vec::new(),
                pending: Vec::new(),
                sessions: BTreeMap::new(),
                losses: Vec::new(),
            })
            .collect();
        let agents = (0..sites)
            .map(|i| Agent {
                site: SiteId::new(format!("site-{i}")).unwrap_or_else(|_| unreachable!()),
                enrolled: false,
                serial: Vec::new(),
                not_after: now,
                partitioned: false,
                conn: None,
                addresses: None,
            })
            .collect();
        let mut sim = Self {
            seed,
            rng,
            now,
            store: Store::default(),
            nodes,
            agents,
            next_conn: 0,
            next_session: 0,
            next_serial: 0,
            trace: Vec::new(),
            stats: Stats::default(),
        };
        // Most sites start enrolled.
        for a in 0..sites {
            if sim.rng.below(4) != 0 {
                sim.enroll(a);
            }
        }
        sim
    }

    fn fail(&self, message: String) -> Violation {
        Violation {
            seed: self.seed,
            message,
            trace: self.trace.clone(),
        }
    }

    /// Runs `steps` random steps, checking after each, then settles.
    pub fn run(mut self, steps: usize) -> Result<Stats, Violation> {
        for _ in 0..steps {
            self.step()?;
            self.stats.steps += 1;
            self.check()?;
        }
        self.settle()?;
        Ok(self.stats)
    }

    fn step(&mut self) -> Result<(), Violation> {
        let a = self.rng.below(self.agents.len());
        let b = self.rng.below(self.nodes.len());
        match self.rng.below(48) {
            0..=3 => {
                self.enroll(a);
                Ok(())
            }
            4..=11 => self.connect(a, b),
            12..=13 => self.disconnect(a),
            14..=21 => self.store_step(b),
            22..=28 => self.finish_connect(b),
            29..=31 => self.deliver_watch(b),
            32..=34 => self.deliver_losses(b),
            35 => self.partition_broker(b),
            36 => self.heal_broker(b),
            37 => self.partition_site(a),
            38 => self.heal_site(a),
            39 => self.restart(b),
            40..=41 => self.revoke(a),
            42..=45 => {
                let secs = 1 + self.rng.below(120) as u64;
                self.advance(Duration::from_secs(secs))
            }
            _ => {
                let secs = 600 + self.rng.below(5400) as u64;
                self.advance(Duration::from_secs(secs))
            }
        }
    }

    fn log(&mut self, line: String) {
        self.trace.push(line);
    }

    fn enroll(&mut self, a: usize) {
        let site = self.agents[a].site.clone();
        let revoked = self.store.revoked_sites.contains(&site);
        let agent = &self.agents[a];
        if agent.enrolled && !revoked && agent.not_after > self.now {
            return;
        }
        if revoked {
            // Re-admission: earlier certificates stay revoked, the site
            // identity works again.
            for serial in self.store.serials.get(&site).cloned().unwrap_or_default() {
                self.store
                    .log
                    .push(Notice::Revoke(Revocation::Serial(serial)));
            }
            self.store.log.push(Notice::Reinstate(Revocation::Site {
                site: site.clone(),
                region: region(),
            }));
            self.store.revoked_sites.remove(&site);
        }
        let serial = self.fresh_serial();
        self.store
            .serials
            .entry(site.clone())
            .or_default()
            .push(serial.clone());
        let agent = &mut self.agents[a];
        agent.enrolled = true;
        agent.serial = serial;
        agent.not_after = self.now + CERT_LIFETIME;
        self.log(format!("enroll {site}"));
    }

    fn fresh_serial(&mut self) -> Vec<u8> {
        self.next_serial += 1;
        self.next_serial.to_be_bytes().to_vec()
    }

    /// The agent drops its connection (the broker hears of it later).
    fn drop_conn(&mut self, a: usize) {
        if let Some(conn) = self.agents[a].conn.take() {
            self.nodes[conn.broker].losses.push(conn.id);
        }
    }

    fn connect(&mut self, a: usize, b: usize) -> Result<(), Violation> {
        let agent = &self.agents[a];
        if !agent.enrolled
            || agent.partitioned
            || agent.not_after <= self.now
            || self.nodes[b].partitioned
        {
            return Ok(());
        }
        let site = agent.site.clone();
        // The shell's check of the site record before anything is
        // allocated (403 when revoked).
        if self.store.revoked_sites.contains(&site) {
            self.log(format!("connect {site} -> b{b}: refused, revoked in store"));
            return Ok(());
        }
        // A reconnect or a move abandons the previous connection.
        self.drop_conn(a);
        self.next_conn += 1;
        let conn = self.next_conn;
        let agent = &mut self.agents[a];
        agent.conn = Some(Conn {
            id: conn,
            broker: b,
            session: None,
        });
        let (serial, not_after) = (agent.serial.clone(), agent.not_after);
        let node = &mut self.nodes[b];
        let allocation = node.core.handle_allocate(AllocationRequest::SiteAddresses {
            site: site.clone(),
            region: region(),
        });
        node.pending.push(Pending {
            agent: a,
            conn,
            connected_at: self.now,
            serial,
            not_after,
            allocation,
            result: None,
        });
        self.log(format!("connect {site} -> b{b} (conn {conn})"));
        self.drain(b)
    }

    fn disconnect(&mut self, a: usize) -> Result<(), Violation> {
        if self.agents[a].conn.is_some() {
            self.log(format!("disconnect {}", self.agents[a].site));
            self.drop_conn(a);
        }
        Ok(())
    }

    fn store_step(&mut self, b: usize) -> Result<(), Violation> {
        if self.nodes[b].partitioned || self.nodes[b].commands.is_empty() {
            return Ok(());
        }
        // Commands of concurrent requests complete in any order.
        let i = self.rng.below(self.nodes[b].commands.len());
        let command = self.nodes[b].commands.remove(i);
        let (allocation, result) = self.store.perform(&command);
        if result == StoreResult::Conflict {
            self.stats.conflicts += 1;
        }
        let what = match (&command, &result) {
            (StoreCommand::LoadLeases { .. }, _) => format!("load v{}", self.store.version),
            (StoreCommand::CompareAndSet { txn, .. }, r) => format!(
                "cas v{} put {:?}: {r:?}",
                txn.expected_version,
                txn.put.iter().map(|l| l.prefix).collect::<Vec<_>>()
            ),
        };
        self.log(format!("b{b} store {what}"));
        self.nodes[b].core.handle_store_result(allocation, result);
        self.drain(b)
    }

    fn finish_connect(&mut self, b: usize) -> Result<(), Violation> {
        let ready: Vec<usize> = self.nodes[b]
            .pending
            .iter()
            .enumerate()
            .filter(|(_, p)| p.result.is_some())
            .map(|(i, _)| i)
            .collect();
        if ready.is_empty() {
            return Ok(());
        }
        let i = ready[self.rng.below(ready.len())];
        let p = self.nodes[b].pending.remove(i);
        let site = self.agents[p.agent].site.clone();
        let current = |sim: &Self| {
            sim.agents[p.agent]
                .conn
                .as_ref()
                .is_some_and(|c| c.id == p.conn)
        };
        let addresses = match p.result {
            Some(Ok(Allocated::SiteAddresses { addresses, .. })) => addresses,
            other => {
                self.log(format!("b{b} conn {} of {site}: {other:?}", p.conn));
                if current(self) {
                    self.agents[p.agent].conn = None;
                }
                return Ok(());
            }
        };
        self.next_session += 1;
        let id = SessionId(self.next_session);
        let open = SessionOpen {
            id,
            site: site.clone(),
            region: region(),
            serial: p.serial.clone(),
            addresses: addresses.clone(),
            connected_at: p.connected_at,
            not_after: p.not_after,
        };
        let result = self.nodes[b].core.handle_session_open(open, self.now);
        self.log(format!(
            "b{b} register {site} conn {} as {id:?}: {result:?}",
            p.conn
        ));
        // A replaced session must be older than the one replacing it.
        let replaced_at = self.nodes[b]
            .sessions
            .get(&site)
            .map(|h| (h.id, h.connected_at));
        self.drain(b)?;
        match result {
            Ok(()) => {
                self.stats.sessions += 1;
                if let Some((old, at)) = replaced_at {
                    self.stats.replaced += 1;
                    if at > p.connected_at {
                        return Err(self.fail(format!(
                            "b{b}: {old:?} of {site}, connected later, was replaced by the older {id:?}"
                        )));
                    }
                }
                self.nodes[b].sessions.insert(
                    site.clone(),
                    Handle {
                        id,
                        agent: p.agent,
                        conn: p.conn,
                        connected_at: p.connected_at,
                        serial: p.serial,
                    },
                );
                if current(self) {
                    let agent = &mut self.agents[p.agent];
                    if let Some(conn) = agent.conn.as_mut() {
                        conn.session = Some(id);
                    }
                    match &agent.addresses {
                        None => agent.addresses = Some(addresses),
                        Some(before) if *before != addresses => {
                            let msg = format!("{site} had {before:?} and now got {addresses:?}");
                            return Err(self.fail(msg));
                        }
                        Some(_) => {}
                    }
                } else {
                    // The site left this connection meanwhile.
                    self.nodes[b].losses.push(p.conn);
                }
            }
            Err(e) => {
                match e {
                    tether_proto::broker::OpenError::Revoked => self.stats.refused_revoked += 1,
                    tether_proto::broker::OpenError::Superseded { .. } => {
                        self.stats.superseded += 1
                    }
                    _ => {}
                }
                if current(self) {
                    self.agents[p.agent].conn = None;
                }
            }
        }
        Ok(())
    }

    fn deliver_watch(&mut self, b: usize) -> Result<(), Violation> {
        let node = &self.nodes[b];
        if node.partitioned || node.cursor >= self.store.log.len() {
            return Ok(());
        }
        let notice = self.store.log[node.cursor].clone();
        self.log(format!("b{b} watch {notice:?}"));
        let now = self.now;
        let node = &mut self.nodes[b];
        node.cursor += 1;
        match notice {
            Notice::Revoke(r) => node.core.handle_revocation(r, now),
            Notice::Reinstate(r) => node.core.handle_reinstatement(&r),
        }
        self.drain(b)
    }

    fn deliver_losses(&mut self, b: usize) -> Result<(), Violation> {
        if self.nodes[b].partitioned {
            return Ok(());
        }
        let losses = std::mem::take(&mut self.nodes[b].losses);
        for conn in losses {
            let node = &mut self.nodes[b];
            if node.pending.iter().any(|p| p.conn == conn) {
                // Noticed once the request is served.
                node.losses.push(conn);
                continue;
            }
            let Some((site, handle)) = node
                .sessions
                .iter()
                .find(|(_, h)| h.conn == conn)
                .map(|(s, h)| (s.clone(), h.clone()))
            else {
                continue;
            };
            let current = node.core.handle_session_closed(&site, handle.id, self.now);
            node.sessions.remove(&site);
            self.trace.push(format!(
                "b{b} conn {conn} of {site} lost (current: {current})"
            ));
            self.drain(b)?;
        }
        Ok(())
    }

    fn partition_broker(&mut self, b: usize) -> Result<(), Violation> {
        if self.nodes[b].partitioned {
            return Ok(());
        }
        self.log(format!("partition b{b}"));
        self.nodes[b].partitioned = true;
        for a in 0..self.agents.len() {
            if self.agents[a].conn.as_ref().is_some_and(|c| c.broker == b) {
                self.drop_conn(a);
            }
        }
        Ok(())
    }

    fn heal_broker(&mut self, b: usize) -> Result<(), Violation> {
        if self.nodes[b].partitioned {
            self.log(format!("heal b{b}"));
            self.nodes[b].partitioned = false;
        }
        Ok(())
    }

    fn partition_site(&mut self, a: usize) -> Result<(), Violation> {
        if !self.agents[a].partitioned {
            self.log(format!("partition {}", self.agents[a].site));
            self.agents[a].partitioned = true;
            self.drop_conn(a);
        }
        Ok(())
    }

    fn heal_site(&mut self, a: usize) -> Result<(), Violation> {
        if self.agents[a].partitioned {
            self.log(format!("heal {}", self.agents[a].site));
            self.agents[a].partitioned = false;
        }
        Ok(())
    }

    /// The broker restarts: its memory is gone, the store is not.
    fn restart(&mut self, b: usize) -> Result<(), Violation> {
        self.log(format!("restart b{b}"));
        self.stats.restarts += 1;
        let in_force = self.store.in_force(self.store.log.len());
        let mut core = BrokerCore::new(config(in_force.into_iter().collect()));
        // Half the time the shell preloads the leases, as the broker does.
        if self.rng.below(2) == 0 {
            core.handle_leases(region(), self.store.snapshot());
        }
        for a in 0..self.agents.len() {
            if self.agents[a].conn.as_ref().is_some_and(|c| c.broker == b) {
                self.agents[a].conn = None;
            }
        }
        self.nodes[b] = Node {
            core,
            partitioned: self.nodes[b].partitioned,
            cursor: self.store.log.len(),
            commands: Vec::new(),
            pending: Vec::new(),
            sessions: BTreeMap::new(),
            losses: Vec::new(),
        };
        Ok(())
    }

    fn revoke(&mut self, a: usize) -> Result<(), Violation> {
        let site = self.agents[a].site.clone();
        if !self.agents[a].enrolled || self.store.revoked_sites.contains(&site) {
            return Ok(());
        }
        self.log(format!("revoke {site}"));
        self.store.revoked_sites.insert(site.clone());
        self.store.log.push(Notice::Revoke(Revocation::Site {
            site,
            region: region(),
        }));
        Ok(())
    }

    /// Time passes: connected sites renew in time, certificates of the
    /// others expire, brokers' timers fire.
    fn advance(&mut self, by: Duration) -> Result<(), Violation> {
        self.log(format!("advance {}s", by.as_secs()));
        let end = self.now + by;
        while self.now < end {
            let stride = Duration::from_secs(300).min(end - self.now);
            self.now += stride;
            for a in 0..self.agents.len() {
                self.renew(a);
            }
            for b in 0..self.nodes.len() {
                while let Some(at) = self.nodes[b].core.poll_timeout() {
                    if at > self.now {
                        break;
                    }
                    self.nodes[b].core.handle_timeout(self.now);
                    self.drain(b)?;
                }
            }
        }
        Ok(())
    }

    fn renew(&mut self, a: usize) {
        let agent = &self.agents[a];
        let Some(conn) = agent.conn.clone() else {
            return;
        };
        if agent.partitioned
            || self.nodes[conn.broker].partitioned
            || agent.not_after <= self.now
            || agent.not_after - self.now > RENEW_BEFORE
            || self.store.revoked_sites.contains(&agent.site)
        {
            return;
        }
        let site = agent.site.clone();
        let serial = self.fresh_serial();
        self.store
            .serials
            .entry(site.clone())
            .or_default()
            .push(serial.clone());
        let not_after = self.now + CERT_LIFETIME;
        let agent = &mut self.agents[a];
        agent.serial = serial.clone();
        agent.not_after = not_after;
        if let Some(id) = conn.session {
            let node = &mut self.nodes[conn.broker];
            node.core
                .handle_certificate_renewed(&site, id, serial.clone(), not_after);
            if let Some(h) = node.sessions.get_mut(&site).filter(|h| h.id == id) {
                h.serial = serial;
            }
        }
        self.log(format!("{site} renewed"));
    }

    /// Carries out a broker's events and collects its store commands.
    fn drain(&mut self, b: usize) -> Result<(), Violation> {
        while let Some(command) = self.nodes[b].core.poll_command() {
            self.nodes[b].commands.push(command);
        }
        while let Some(event) = self.nodes[b].core.poll_event() {
            match event {
                Event::CloseSession {
                    session,
                    site,
                    reason,
                } => {
                    let node = &mut self.nodes[b];
                    let Some(handle) = node.sessions.get(&site).filter(|h| h.id == session) else {
                        let msg = format!("b{b} closes {session:?} of {site} it does not hold");
                        return Err(self.fail(msg));
                    };
                    let agent = handle.agent;
                    let conn = handle.conn;
                    node.sessions.remove(&site);
                    match reason {
                        tether_proto::broker::CloseReason::Revoked => self.stats.swept += 1,
                        tether_proto::broker::CloseReason::CertificateExpired => {
                            self.stats.expired += 1
                        }
                        _ => {}
                    }
                    self.trace
                        .push(format!("b{b} closes {session:?} of {site}: {reason:?}"));
                    if self.agents[agent]
                        .conn
                        .as_ref()
                        .is_some_and(|c| c.id == conn)
                    {
                        self.agents[agent].conn = None;
                    }
                }
                Event::Allocated { allocation, result } => {
                    if let Some(p) = self.nodes[b]
                        .pending
                        .iter_mut()
                        .find(|p| p.allocation == allocation)
                    {
                        p.result = Some(result);
                    }
                }
                Event::RoutesChanged | Event::SessionsChanged | Event::RemoteRoutesChanged => {}
            }
        }
        Ok(())
    }

    /// The invariants that hold after every step.
    pub fn check(&self) -> Result<(), Violation> {
        // Never two owners: no commit takes a lease another site holds, the
        // addresses agents were given are theirs in the store, and no two
        // agents share one.
        if let Some((lease, from)) = self.store.taken.first() {
            return Err(self.fail(format!("{} took {} from {from}", lease.site, lease.prefix)));
        }
        let mut seen: BTreeMap<IpNet, &SiteId> = BTreeMap::new();
        for agent in &self.agents {
            for addr in agent.addresses.iter().flatten() {
                if let Some(other) = seen.insert(*addr, &agent.site) {
                    return Err(
                        self.fail(format!("{addr} was given to {other} and to {}", agent.site))
                    );
                }
                match self.store.leases.get(addr) {
                    Some(l) if l.site == agent.site => {}
                    other => {
                        return Err(self.fail(format!(
                            "{} lost {addr}: the store has {:?}",
                            agent.site,
                            other.map(|l| &l.site)
                        )));
                    }
                }
            }
        }
        for (b, node) in self.nodes.iter().enumerate() {
            self.check_node(b, node)?;
        }
        Ok(())
    }

    fn check_node(&self, b: usize, node: &Node) -> Result<(), Violation> {
        let core = &node.core;
        let fail = |m: String| Err(self.fail(format!("b{b}: {m}")));
        // The shell's handles and the core agree.
        let core_sessions: BTreeMap<&SiteId, SessionId> = core.sessions().collect();
        let shell: BTreeMap<&SiteId, SessionId> =
            node.sessions.iter().map(|(s, h)| (s, h.id)).collect();
        if core_sessions != shell {
            return fail(format!("core {core_sessions:?} != shell {shell:?}"));
        }
        // Routes follow sessions exactly.
        let mut routed: BTreeMap<SiteId, BTreeSet<IpNet>> = BTreeMap::new();
        for route in core.router().table.routes() {
            if let RouteTarget::Site(site) = &route.target
                && route.kind == RouteKind::SiteAddress
            {
                routed.entry(site.clone()).or_default().insert(route.prefix);
            }
        }
        for (site, _) in core.sessions() {
            let given: BTreeSet<IpNet> = core.session_addresses(site).iter().copied().collect();
            if routed.remove(site).unwrap_or_default() != given {
                return fail(format!("routes of {site} differ from its session's"));
            }
        }
        if !routed.is_empty() {
            return fail(format!("routes to sites without a session: {routed:?}"));
        }
        // Revocations this broker knows of hold.
        let in_force = self.store.in_force(node.cursor);
        for r in &in_force {
            match r {
                Revocation::Site { site, .. } => {
                    if core.session(site).is_some() {
                        return fail(format!("revoked {site} has a session"));
                    }
                    let target = RouteTarget::Site(site.clone());
                    if !core.router().table.routes_to(&target).is_empty() {
                        return fail(format!("revoked {site} has routes"));
                    }
                }
                Revocation::Serial(serial) => {
                    if let Some((site, _)) = node.sessions.iter().find(|(_, h)| &h.serial == serial)
                    {
                        return fail(format!("{site} has a session with a revoked certificate"));
                    }
                }
            }
        }
        // No packet reaches a site that does not own its destination.
        for agent in &self.agents {
            for addr in agent.addresses.iter().flatten() {
                let IpAddr::V4(dst) = addr.addr() else {
                    continue;
                };
                let mut packet = packet_to(dst);
                let gateway = GatewayId::new("backend").unwrap_or_else(|_| unreachable!());
                let ingress = Ingress::Gateway {
                    gateway: &gateway,
                    region: &region(),
                    allowed: &[],
                };
                let verdict = core.router().decide(&ingress, &mut packet, |t| match t {
                    RouteTarget::Site(s) => node.sessions.contains_key(s).then_some(1400),
                    RouteTarget::Gateway(_) => Some(1400),
                });
                if let Verdict::Forward(route) = verdict
                    && let RouteTarget::Site(to) = &route.target
                {
                    let owner = self.store.owner(IpAddr::V4(dst));
                    if owner != Some(to) {
                        return fail(format!(
                            "a packet for {dst} goes to {to}, the store says {owner:?}"
                        ));
                    }
                    if in_force.contains(&Revocation::Site {
                        site: to.clone(),
                        region: region(),
                    }) {
                        return fail(format!("a packet for {dst} goes to revoked {to}"));
                    }
                }
            }
        }
        Ok(())
    }

    /// Heals everything and delivers everything in flight, then has every
    /// site that may connect connect; each connected site must then have
    /// exactly one session, on its own connection.
    pub fn settle(&mut self) -> Result<(), Violation> {
        self.log("settle".into());
        for b in 0..self.nodes.len() {
            self.nodes[b].partitioned = false;
        }
        for a in 0..self.agents.len() {
            self.agents[a].partitioned = false;
        }
        self.quiesce()?;
        // Sites retry until connected (an attempt can lose to contention).
        for _ in 0..3 {
            for a in 0..self.agents.len() {
                let agent = &self.agents[a];
                if agent.conn.is_none()
                    && agent.enrolled
                    && agent.not_after > self.now
                    && !self.store.revoked_sites.contains(&agent.site)
                {
                    let b = self.rng.below(self.nodes.len());
                    self.connect(a, b)?;
                }
            }
            self.quiesce()?;
        }
        self.check()?;
        for agent in &self.agents {
            let holders: Vec<(usize, SessionId)> = self
                .nodes
                .iter()
                .enumerate()
                .filter_map(|(b, n)| n.core.session(&agent.site).map(|id| (b, id)))
                .collect();
            let may_connect = agent.enrolled
                && agent.not_after > self.now
                && !self.store.revoked_sites.contains(&agent.site);
            let expected: Vec<(usize, SessionId)> = match &agent.conn {
                Some(Conn {
                    broker,
                    session: Some(id),
                    ..
                }) => vec![(*broker, *id)],
                _ => Vec::new(),
            };
            if holders != expected || (may_connect && expected.is_empty()) {
                return Err(self.fail(format!(
                    "after settling, {} (may connect: {may_connect}) has sessions {holders:?}, expected {expected:?}",
                    agent.site
                )));
            }
        }
        Ok(())
    }

    /// Delivers watches, store commands, losses and registrations until
    /// nothing is left.
    fn quiesce(&mut self) -> Result<(), Violation> {
        for _ in 0..1000 {
            let mut busy = false;
            for b in 0..self.nodes.len() {
                while self.nodes[b].cursor < self.store.log.len() {
                    self.deliver_watch(b)?;
                    busy = true;
                }
                while !self.nodes[b].commands.is_empty() {
                    self.store_step(b)?;
                    busy = true;
                }
                while self.nodes[b].pending.iter().any(|p| p.result.is_some()) {
                    self.finish_connect(b)?;
                    busy = true;
                }
                let losses = self.nodes[b].losses.len();
                self.deliver_losses(b)?;
                busy |= self.nodes[b].losses.len() != losses;
            }
            self.check()?;
            if !busy {
                return Ok(());
            }
        }
        Err(self.fail("the world does not settle".into()))
    }
}

/// Runs one case of `steps` steps for `seed`.
pub fn run_case(seed: u64, steps: usize) -> Result<Stats, Violation> {
    Sim::new(seed).run(steps)
}
