//! A deterministic simulation of site ownership in a broker fleet.
//!
//! Several brokers share one etcd model: leases with a time to live,
//! owner keys bound to a lease (deleted with it), revisions, compare-and-set
//! transactions and a watch. Each broker runs the ownership decisions the
//! real broker runs ([`tether_proto::fleet::Fleet`]) behind a model of its
//! shell (`broker/src/fleet.rs`): join (grant, claim again by
//! compare-and-set, read everything), then serve (renew the lease, write
//! claims and releases, apply the watch), starting over on any failure; a
//! watchdog that polls the lease's end. Requests and answers travel in
//! order on one connection per broker and take as long as the schedule
//! says. Sites connect, move make-before-break (their old session closes
//! later, when the schedule delivers the close) and follow `GOAWAY`.
//!
//! The schedule kills and restarts brokers, cuts them off from etcd and
//! heals them, steps their clocks forward (a pause the monotonic clock
//! counts) and lets time pass; one seeded random choice per step. After
//! every step [`FleetSim::check`] holds:
//!
//! - **fencing**: a broker that, by its own clock, can prove it holds a site
//!   ([`Fleet::holds`]) has its lease alive in etcd;
//! - **one owner believed**: of the brokers that can prove they hold a
//!   site, at most one has seen every owner write newer than its own claim
//!   (the others are only waiting for their watch to tell them);
//! - **no write without the lease**: an owner write made when the writer
//!   could not prove its lease ([`Fleet::lease_held`]) never replaces
//!   another broker's owner (that would take a site back from the broker
//!   it moved to).
//!
//! At the end every cut heals, clocks run, everything in flight arrives and
//! every site connects; then each site has exactly one session, at the
//! broker etcd names, and every broker's view names that broker.
//! [`Rules`] can break the shell's fencing rules, to show the checks catch
//! it.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use tether_proto::fleet::{BrokerId, Decision, Fleet};
use tether_proto::ids::SiteId;

use crate::sim::{Rng, Violation};

/// The lease's time to live (as the broker's).
const TTL: Duration = Duration::from_secs(5);

/// How the modelled shell applies the fleet's rules; [`Rules::default`] is
/// the broker's.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rules {
    /// Count a renewal from when its answer arrived instead of when it was
    /// asked (breaks fencing: the broker believes its lease outlives
    /// etcd's).
    pub renewal_from_answer: bool,
    /// Write a new session's claim without checking the lease first (the
    /// shell before [`Fleet::lease_held`]).
    pub claim_without_lease: bool,
}

/// What a case exercised.
#[derive(Debug, Default, Clone, Copy)]
pub struct FleetStats {
    /// Steps run.
    pub steps: usize,
    /// Sessions opened.
    pub sessions: usize,
    /// Brokers fenced (their lease ran out by their clock).
    pub fenced: usize,
    /// Sessions ended because another broker holds the site.
    pub ended: usize,
    /// Claims under a new lease refused (another broker held the site).
    pub refused: usize,
    /// Owner keys deleted by lease expiry.
    pub expired_keys: usize,
    /// Sites that moved on a `GOAWAY`.
    pub moved: usize,
    /// Broker kills.
    pub kills: usize,
}

impl std::ops::AddAssign for FleetStats {
    fn add_assign(&mut self, o: Self) {
        self.steps += o.steps;
        self.sessions += o.sessions;
        self.fenced += o.fenced;
        self.ended += o.ended;
        self.refused += o.refused;
        self.expired_keys += o.expired_keys;
        self.moved += o.moved;
        self.kills += o.kills;
    }
}

/// An owner key in etcd.
#[derive(Debug, Clone)]
struct Key {
    broker: BrokerId,
    lease: i64,
    revision: i64,
}

/// A change of an owner key, as the watch delivers it.
#[derive(Debug, Clone)]
enum Change {
    Put {
        site: SiteId,
        broker: BrokerId,
        revision: i64,
    },
    Delete {
        site: SiteId,
        revision: i64,
    },
}

impl Change {
    fn revision(&self) -> i64 {
        match self {
            Change::Put { revision, .. } | Change::Delete { revision, .. } => *revision,
        }
    }
}

/// The etcd model: leases (their expiry on the true clock), owner keys and
/// the history of their changes.
#[derive(Debug, Default)]
struct Etcd {
    revision: i64,
    next_lease: i64,
    leases: BTreeMap<i64, Instant>,
    owners: BTreeMap<SiteId, Key>,
    history: Vec<Change>,
}

impl Etcd {
    fn alive(&self, lease: i64, now: Instant) -> bool {
        self.leases.get(&lease).is_some_and(|end| now < *end)
    }

    fn put(&mut self, site: &SiteId, broker: &BrokerId, lease: i64) -> i64 {
        self.revision += 1;
        self.owners.insert(
            site.clone(),
            Key {
                broker: broker.clone(),
                lease,
                revision: self.revision,
            },
        );
        self.history.push(Change::Put {
            site: site.clone(),
            broker: broker.clone(),
            revision: self.revision,
        });
        self.revision
    }

    fn delete(&mut self, site: &SiteId) {
        self.revision += 1;
        self.owners.remove(site);
        self.history.push(Change::Delete {
            site: site.clone(),
            revision: self.revision,
        });
    }

    /// Deletes the expired leases and their keys; returns how many keys.
    fn expire(&mut self, now: Instant) -> usize {
        let gone: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, end)| now >= **end)
            .map(|(l, _)| *l)
            .collect();
        let mut keys = 0;
        for lease in gone {
            self.leases.remove(&lease);
            let sites: Vec<SiteId> = self
                .owners
                .iter()
                .filter(|(_, k)| k.lease == lease)
                .map(|(s, _)| s.clone())
                .collect();
            for site in sites {
                self.delete(&site);
                keys += 1;
            }
        }
        keys
    }
}

/// A request on a broker's connection to etcd.
#[derive(Debug, Clone)]
enum Request {
    Grant {
        asked: Instant,
    },
    KeepAlive {
        lease: i64,
        asked: Instant,
    },
    /// A new session's claim: a plain write under the lease. `sure` says
    /// whether the writer could prove its lease when it sent it.
    Put {
        site: SiteId,
        lease: i64,
        sure: bool,
    },
    /// A claim under a new lease: only where the key is absent or the
    /// broker's own.
    Reclaim {
        site: SiteId,
        lease: i64,
    },
    /// Delete the key only if it is the broker's own.
    Release {
        site: SiteId,
    },
    ReadAll,
}

/// An answer from etcd.
#[derive(Debug, Clone)]
enum Answer {
    Granted {
        lease: i64,
        asked: Instant,
    },
    Renewed {
        asked: Instant,
        alive: bool,
    },
    Put {
        site: SiteId,
        revision: Option<i64>,
    },
    Reclaimed {
        site: SiteId,
        outcome: Result<i64, (BrokerId, i64)>,
    },
    Done,
    Read {
        owners: Vec<(SiteId, BrokerId, i64)>,
        revision: i64,
    },
}

/// Where a broker's fleet task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The process is dead.
    Down,
    /// Between attempts: the next step starts a join.
    Idle,
    /// Waiting for a lease.
    Granting,
    /// Lease granted; claims and the full read on their way.
    Reading,
    /// Watching and renewing.
    Serving,
}

#[derive(Debug, Clone)]
enum Command {
    Claim(SiteId),
    Release(SiteId),
}

/// A broker process and its shell.
#[derive(Debug)]
struct Node {
    id: BrokerId,
    generation: u32,
    phase: Phase,
    fleet: Fleet,
    /// The last lease granted (the one its fleet's view is about).
    lease: Option<i64>,
    /// The attempt answers belong to (older answers are dropped, as the
    /// real task drops its streams when it starts over).
    attempt: u64,
    requests: VecDeque<(u64, Request)>,
    answers: VecDeque<(u64, Answer)>,
    commands: VecDeque<Command>,
    /// The revision its view is complete up to (watch position).
    seen: i64,
    /// Cut off from etcd.
    cut: bool,
    /// How far its clock runs ahead of the true one.
    skew: Duration,
    /// Its sessions: site → session number.
    sessions: BTreeMap<SiteId, u64>,
    /// The revision of each claim it wrote (as its fleet learned it).
    claim_revision: BTreeMap<SiteId, i64>,
}

impl Node {
    fn new(n: usize, generation: u32) -> Self {
        let id = format!("b{n}.{generation}");
        Self {
            fleet: Fleet::new(id.clone()),
            id,
            generation,
            phase: Phase::Idle,
            lease: None,
            attempt: 0,
            requests: VecDeque::new(),
            answers: VecDeque::new(),
            commands: VecDeque::new(),
            seen: 0,
            cut: false,
            skew: Duration::ZERO,
            sessions: BTreeMap::new(),
            claim_revision: BTreeMap::new(),
        }
    }

    fn live(&self) -> bool {
        self.phase != Phase::Down
    }
}

/// A site: its current session and the closes of old ones still on their
/// way.
#[derive(Debug, Default)]
struct SiteModel {
    current: Option<(usize, u64)>,
    closing: VecDeque<(usize, u64)>,
}

/// The simulated fleet.
#[derive(Debug)]
pub struct FleetSim {
    seed: u64,
    rng: Rng,
    rules: Rules,
    now: Instant,
    etcd: Etcd,
    nodes: Vec<Node>,
    sites: Vec<(SiteId, SiteModel)>,
    next_session: u64,
    trace: Vec<String>,
    stats: FleetStats,
}

impl FleetSim {
    /// Three brokers and four sites for `seed`, under `rules`.
    pub fn new(seed: u64, rules: Rules) -> Self {
        let sites = (1..=4)
            .map(|i| {
                let id: SiteId = format!("s{i}").parse().unwrap_or_else(|_| unreachable!());
                (id, SiteModel::default())
            })
            .collect();
        Self {
            seed,
            rng: Rng::new(seed),
            rules,
            now: Instant::now(),
            etcd: Etcd::default(),
            nodes: (0..3).map(|n| Node::new(n, 0)).collect(),
            sites,
            next_session: 1,
            trace: Vec::new(),
            stats: FleetStats::default(),
        }
    }

    fn fail(&self, message: String) -> Violation {
        Violation {
            seed: self.seed,
            message,
            trace: self.trace.clone(),
        }
    }

    fn log(&mut self, step: String) {
        self.trace.push(step);
    }

    fn local_now(&self, b: usize) -> Instant {
        self.now + self.nodes[b].skew
    }

    fn live(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|b| self.nodes[*b].live())
            .collect()
    }

    fn site_index(&self, site: &SiteId) -> Option<usize> {
        self.sites.iter().position(|(s, _)| s == site)
    }

    // ---- the shell of broker `b` ----

    fn send(&mut self, b: usize, request: Request) {
        let node = &mut self.nodes[b];
        let attempt = node.attempt;
        node.requests.push_back((attempt, request));
    }

    /// The task fails and starts over (a timeout, an error, a fence).
    fn start_over(&mut self, b: usize) {
        let node = &mut self.nodes[b];
        if node.phase == Phase::Down {
            return;
        }
        // The last lease stays what the fleet's view is about until a
        // new one is granted.
        node.phase = Phase::Idle;
        node.attempt += 1;
    }

    /// The join's first step: pending commands into the fleet, a lease.
    fn begin_join(&mut self, b: usize) {
        let node = &mut self.nodes[b];
        while let Some(command) = node.commands.pop_front() {
            match command {
                Command::Claim(site) => node.fleet.handle_claim(site),
                Command::Release(site) => {
                    node.fleet.handle_released(&site);
                    node.claim_revision.remove(&site);
                }
            }
        }
        node.phase = Phase::Granting;
        let asked = self.local_now(b);
        self.send(b, Request::Grant { asked });
    }

    /// The renewal tick of a serving broker.
    fn tick(&mut self, b: usize) {
        match self.nodes[b].phase {
            Phase::Idle => self.begin_join(b),
            Phase::Serving => {
                if self.nodes[b].fleet.is_fenced() {
                    self.start_over(b);
                    return;
                }
                if let Some(lease) = self.nodes[b].lease {
                    let asked = self.local_now(b);
                    self.send(b, Request::KeepAlive { lease, asked });
                }
            }
            _ => {}
        }
    }

    /// One command of a serving broker.
    fn command(&mut self, b: usize) {
        if self.nodes[b].phase != Phase::Serving {
            return;
        }
        let Some(command) = self.nodes[b].commands.pop_front() else {
            return;
        };
        let now = self.local_now(b);
        let lease = self.nodes[b].lease.unwrap_or_default();
        match command {
            Command::Claim(site) => {
                let node = &mut self.nodes[b];
                node.fleet.handle_claim(site.clone());
                let sure = node.fleet.lease_held(now);
                if !sure && !self.rules.claim_without_lease {
                    self.log(format!(
                        "{}: lease not held, starts over to claim {site}",
                        self.nodes[b].id
                    ));
                    self.start_over(b);
                    return;
                }
                self.send(b, Request::Put { site, lease, sure });
            }
            Command::Release(site) => {
                let node = &mut self.nodes[b];
                node.fleet.handle_released(&site);
                node.claim_revision.remove(&site);
                self.send(b, Request::Release { site });
            }
        }
    }

    fn decide(&mut self, b: usize, decisions: Vec<Decision>) {
        for d in decisions {
            match d {
                Decision::EndSession(site) => {
                    if self.nodes[b].sessions.remove(&site).is_some() {
                        self.stats.ended += 1;
                        self.log(format!("{}: ends its session of {site}", self.nodes[b].id));
                        self.nodes[b]
                            .commands
                            .push_back(Command::Release(site.clone()));
                        if let Some(i) = self.site_index(&site)
                            && self.sites[i].1.current.is_some_and(|(at, _)| at == b)
                        {
                            self.sites[i].1.current = None;
                        }
                    }
                }
                Decision::MoveSites(_) => {
                    self.stats.fenced += 1;
                    self.log(format!("{}: fenced; GOAWAY to its sites", self.nodes[b].id));
                    let held: Vec<SiteId> = self.nodes[b].sessions.keys().cloned().collect();
                    for site in held {
                        let others: Vec<usize> =
                            self.live().into_iter().filter(|o| *o != b).collect();
                        if let Some(i) = self.site_index(&site)
                            && self.sites[i].1.current.is_some_and(|(at, _)| at == b)
                            && !others.is_empty()
                        {
                            let to = others[self.rng.below(others.len())];
                            self.stats.moved += 1;
                            self.connect(i, to);
                        }
                    }
                }
            }
        }
    }

    /// An answer from etcd reaches broker `b`.
    fn answer(&mut self, b: usize, answer: Answer) {
        let now = self.local_now(b);
        match answer {
            Answer::Granted { lease, asked } => {
                self.log(format!("{}: granted lease {lease}", self.nodes[b].id));
                let node = &mut self.nodes[b];
                node.fleet.handle_granted(asked, TTL);
                node.lease = Some(lease);
                node.phase = Phase::Reading;
                let claimed: Vec<SiteId> = node.fleet.claimed().cloned().collect();
                for site in claimed {
                    self.send(b, Request::Reclaim { site, lease });
                }
                self.send(b, Request::ReadAll);
            }
            Answer::Renewed { asked, alive } => {
                if !alive {
                    self.log(format!("{}: etcd says its lease is gone", self.nodes[b].id));
                }
                if alive {
                    let at = if self.rules.renewal_from_answer {
                        now
                    } else {
                        asked
                    };
                    self.nodes[b].fleet.handle_renewed(at, TTL);
                } else {
                    let decisions = self.nodes[b].fleet.handle_lease_lost(now);
                    self.decide(b, decisions);
                    self.start_over(b);
                }
            }
            Answer::Put { site, revision } => match revision {
                Some(revision) => {
                    self.nodes[b].claim_revision.insert(site.clone(), revision);
                    let decisions = self.nodes[b].fleet.handle_claimed(&site, revision);
                    self.decide(b, decisions);
                }
                None => self.start_over(b),
            },
            Answer::Reclaimed { site, outcome } => match outcome {
                Ok(revision) => {
                    self.nodes[b].claim_revision.insert(site.clone(), revision);
                    let decisions = self.nodes[b].fleet.handle_claimed(&site, revision);
                    self.decide(b, decisions);
                }
                Err((holder, revision)) => {
                    self.stats.refused += 1;
                    self.nodes[b].claim_revision.remove(&site);
                    let decisions = self.nodes[b]
                        .fleet
                        .handle_claim_refused(&site, holder, revision);
                    self.decide(b, decisions);
                }
            },
            Answer::Done => {}
            Answer::Read { owners, revision } => {
                let node = &mut self.nodes[b];
                node.fleet.handle_reset();
                let mut decisions = Vec::new();
                for (site, broker, rev) in owners {
                    decisions.extend(node.fleet.handle_owner(site, broker, rev));
                }
                node.seen = revision;
                node.phase = Phase::Serving;
                self.decide(b, decisions);
            }
        }
    }

    /// etcd serves broker `b`'s next request.
    fn serve_request(&mut self, b: usize) -> Result<(), Violation> {
        let Some((attempt, request)) = self.nodes[b].requests.pop_front() else {
            return Ok(());
        };
        let now = self.now;
        let me = self.nodes[b].id.clone();
        let answer = match request {
            Request::Grant { asked } => {
                self.etcd.next_lease += 1;
                let lease = self.etcd.next_lease;
                self.etcd.leases.insert(lease, now + TTL);
                Answer::Granted { lease, asked }
            }
            Request::KeepAlive { lease, asked } => {
                let alive = self.etcd.alive(lease, now);
                if alive {
                    self.etcd.leases.insert(lease, now + TTL);
                }
                Answer::Renewed { asked, alive }
            }
            Request::Put { site, lease, sure } => {
                if self.etcd.alive(lease, now) {
                    let before = self.etcd.owners.get(&site).map(|k| k.broker.clone());
                    if !sure && before.as_ref().is_some_and(|o| *o != me) {
                        let revision = self.etcd.put(&site, &me, lease);
                        self.log(format!(
                            "etcd: {me} writes owner of {site} at {revision} over {}",
                            before.unwrap_or_default()
                        ));
                        return Err(self.fail(format!(
                            "{me} could not prove its lease when it wrote the owner of {site}, and the write replaced another broker's owner"
                        )));
                    }
                    let revision = self.etcd.put(&site, &me, lease);
                    self.log(format!("etcd: owner of {site} = {me} at {revision}"));
                    Answer::Put {
                        site,
                        revision: Some(revision),
                    }
                } else {
                    Answer::Put {
                        site,
                        revision: None,
                    }
                }
            }
            Request::Reclaim { site, lease } => {
                let held = self.etcd.owners.get(&site).cloned();
                match held {
                    Some(k) if k.broker != me => Answer::Reclaimed {
                        site,
                        outcome: Err((k.broker, k.revision)),
                    },
                    _ if self.etcd.alive(lease, now) => {
                        let revision = self.etcd.put(&site, &me, lease);
                        self.log(format!(
                            "etcd: owner of {site} = {me} at {revision} (again)"
                        ));
                        Answer::Reclaimed {
                            site,
                            outcome: Ok(revision),
                        }
                    }
                    _ => Answer::Put {
                        site,
                        revision: None,
                    },
                }
            }
            Request::Release { site } => {
                if self.etcd.owners.get(&site).is_some_and(|k| k.broker == me) {
                    self.etcd.delete(&site);
                }
                Answer::Done
            }
            Request::ReadAll => Answer::Read {
                owners: self
                    .etcd
                    .owners
                    .iter()
                    .map(|(s, k)| (s.clone(), k.broker.clone(), k.revision))
                    .collect(),
                revision: self.etcd.revision,
            },
        };
        self.nodes[b].answers.push_back((attempt, answer));
        Ok(())
    }

    /// Broker `b`'s next answer arrives.
    fn deliver_answer(&mut self, b: usize) {
        let Some((attempt, answer)) = self.nodes[b].answers.pop_front() else {
            return;
        };
        if attempt == self.nodes[b].attempt {
            self.answer(b, answer);
        }
    }

    /// The next change broker `b`'s watch has not delivered.
    fn deliver_watch(&mut self, b: usize) {
        if self.nodes[b].phase != Phase::Serving {
            return;
        }
        let seen = self.nodes[b].seen;
        let Some(change) = self
            .etcd
            .history
            .iter()
            .find(|c| c.revision() > seen)
            .cloned()
        else {
            return;
        };
        self.nodes[b].seen = change.revision();
        let decisions = match change {
            Change::Put {
                site,
                broker,
                revision,
            } => self.nodes[b].fleet.handle_owner(site, broker, revision),
            Change::Delete { site, revision } => {
                self.nodes[b].fleet.handle_owner_gone(&site, revision);
                Vec::new()
            }
        };
        self.decide(b, decisions);
    }

    /// The watchdog of broker `b` looks at the lease.
    fn poll(&mut self, b: usize) {
        if !self.nodes[b].live() {
            return;
        }
        let now = self.local_now(b);
        let decisions = self.nodes[b].fleet.poll(now);
        self.decide(b, decisions);
    }

    // ---- sites ----

    /// Site `i` opens a session at broker `to` (make-before-break: its old
    /// session closes later).
    fn connect(&mut self, i: usize, to: usize) {
        let session = self.next_session;
        self.next_session += 1;
        self.stats.sessions += 1;
        let site = self.sites[i].0.clone();
        if let Some(old) = self.sites[i].1.current.replace((to, session)) {
            self.sites[i].1.closing.push_back(old);
        }
        self.log(format!(
            "{site}: session {session} at {}",
            self.nodes[to].id
        ));
        self.nodes[to].sessions.insert(site.clone(), session);
        self.nodes[to].commands.push_back(Command::Claim(site));
    }

    /// The close of site `i`'s oldest replaced session arrives.
    fn deliver_close(&mut self, i: usize) {
        let Some((b, session)) = self.sites[i].1.closing.pop_front() else {
            return;
        };
        let site = self.sites[i].0.clone();
        if self.nodes[b].sessions.get(&site) == Some(&session) {
            self.nodes[b].sessions.remove(&site);
            self.nodes[b].commands.push_back(Command::Release(site));
        }
    }

    // ---- the schedule ----

    fn kill(&mut self, b: usize) {
        self.stats.kills += 1;
        self.log(format!("kill {}", self.nodes[b].id));
        let node = &mut self.nodes[b];
        node.phase = Phase::Down;
        node.sessions.clear();
        node.requests.clear();
        node.answers.clear();
        node.commands.clear();
        for (_, site) in &mut self.sites {
            if site.current.is_some_and(|(at, _)| at == b) {
                site.current = None;
            }
            site.closing.retain(|(at, _)| *at != b);
        }
    }

    fn restart(&mut self, b: usize) {
        let generation = self.nodes[b].generation + 1;
        let cut = self.nodes[b].cut;
        let skew = self.nodes[b].skew;
        self.nodes[b] = Node::new(b, generation);
        self.nodes[b].cut = cut;
        self.nodes[b].skew = skew;
        self.log(format!("start {}", self.nodes[b].id));
    }

    fn cut(&mut self, b: usize, cut: bool) {
        self.nodes[b].cut = cut;
        self.log(format!(
            "{} {} etcd",
            self.nodes[b].id,
            if cut { "cut off from" } else { "reaches" }
        ));
        if cut {
            // What was on the wire is lost; the call waiting for it times
            // out and the task starts over.
            let node = &mut self.nodes[b];
            let waiting = !node.requests.is_empty()
                || !node.answers.is_empty()
                || matches!(node.phase, Phase::Granting | Phase::Reading);
            node.requests.clear();
            node.answers.clear();
            if waiting {
                self.start_over(b);
            }
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        let keys = self.etcd.expire(self.now);
        if keys > 0 {
            self.log(format!("etcd: {keys} owner keys expire with their lease"));
        }
        self.stats.expired_keys += keys;
    }

    /// One random step.
    fn step(&mut self) -> Result<(), Violation> {
        self.stats.steps += 1;
        let n = self.nodes.len();
        let b = self.rng.below(n);
        let reachable = self.nodes[b].live() && !self.nodes[b].cut;
        match self.rng.below(16) {
            0 | 1 => {
                let ms = self.rng.below(1500) as u64;
                self.log(format!("{ms} ms pass"));
                self.advance(Duration::from_millis(ms));
            }
            2 => {
                let i = self.rng.below(self.sites.len());
                let live = self.live();
                if !live.is_empty() && self.sites[i].1.current.is_none() {
                    let to = live[self.rng.below(live.len())];
                    self.connect(i, to);
                }
            }
            3 => {
                // A site moves on its own (a network change).
                let i = self.rng.below(self.sites.len());
                let live = self.live();
                if let Some((at, _)) = self.sites[i].1.current {
                    let others: Vec<usize> = live.into_iter().filter(|o| *o != at).collect();
                    if !others.is_empty() {
                        let to = others[self.rng.below(others.len())];
                        self.connect(i, to);
                    }
                }
            }
            4 => {
                let i = self.rng.below(self.sites.len());
                self.deliver_close(i);
            }
            5 if self.nodes[b].live() => self.tick(b),
            6 if self.nodes[b].live() => self.command(b),
            7 if reachable => self.serve_request(b)?,
            8 if reachable => self.deliver_answer(b),
            9 if reachable => self.deliver_watch(b),
            10 => self.poll(b),
            11 => {
                if !self.nodes[b].live() {
                    self.restart(b);
                } else if self.live().len() > 1 && self.rng.below(3) == 0 {
                    self.kill(b);
                }
            }
            12 if self.nodes[b].live() => {
                let cut = !self.nodes[b].cut;
                self.cut(b, cut);
            }
            13 if self.nodes[b].live() => {
                let ms = self.rng.below(8000) as u64;
                self.nodes[b].skew += Duration::from_millis(ms);
                self.log(format!("{}: clock steps {ms} ms forward", self.nodes[b].id));
            }
            14 if self.nodes[b].live() && self.nodes[b].cut => {
                // A call timed out.
                self.start_over(b);
            }
            _ => {
                // Everything on the wire of one broker arrives.
                if reachable {
                    while !self.nodes[b].requests.is_empty() {
                        self.serve_request(b)?;
                    }
                    while !self.nodes[b].answers.is_empty() {
                        self.deliver_answer(b);
                    }
                }
            }
        }
        self.check()
    }

    /// The invariants that hold after every step.
    pub fn check(&self) -> Result<(), Violation> {
        for (site, _) in &self.sites {
            let mut up_to_date = Vec::new();
            for (b, node) in self.nodes.iter().enumerate() {
                if !node.live() || !node.fleet.holds(site, self.local_now(b)) {
                    continue;
                }
                // Fencing: what it can prove, etcd agrees with.
                let alive = node.lease.is_some_and(|l| self.etcd.alive(l, self.now));
                if !alive {
                    return Err(self.fail(format!(
                        "{} believes it holds {site} but etcd has expired its lease",
                        node.id
                    )));
                }
                let mine = node.claim_revision.get(site).copied().unwrap_or(i64::MAX);
                let newer_unseen = self.etcd.history.iter().any(|c| match c {
                    Change::Put {
                        site: s,
                        broker,
                        revision,
                    } => s == site && *broker != node.id && *revision > mine,
                    Change::Delete { .. } => false,
                });
                if !newer_unseen {
                    up_to_date.push(node.id.clone());
                }
            }
            if up_to_date.len() > 1 {
                return Err(self.fail(format!(
                    "{up_to_date:?} all believe they hold {site}, none has a newer owner to learn of"
                )));
            }
        }
        Ok(())
    }

    /// Heals every cut, lets the clocks run and delivers everything until
    /// the world is quiet; then every site has one session, at the broker
    /// etcd names, and every broker's view agrees.
    pub fn settle(&mut self) -> Result<(), Violation> {
        self.log("settle".into());
        for b in 0..self.nodes.len() {
            if !self.nodes[b].live() {
                self.restart(b);
            }
            if self.nodes[b].cut {
                self.cut(b, false);
            }
        }
        for _ in 0..200 {
            self.advance(Duration::from_millis(500));
            for b in 0..self.nodes.len() {
                self.poll(b);
                self.tick(b);
                while self.nodes[b].phase == Phase::Serving && !self.nodes[b].commands.is_empty() {
                    self.command(b);
                }
                while !self.nodes[b].requests.is_empty() || !self.nodes[b].answers.is_empty() {
                    self.serve_request(b)?;
                    self.deliver_answer(b);
                }
                while self.nodes[b].phase == Phase::Serving
                    && self.etcd.revision > self.nodes[b].seen
                {
                    self.deliver_watch(b);
                }
            }
            for i in 0..self.sites.len() {
                while !self.sites[i].1.closing.is_empty() {
                    self.deliver_close(i);
                }
                if self.sites[i].1.current.is_none() {
                    let live = self.live();
                    let to = live[self.rng.below(live.len())];
                    self.connect(i, to);
                }
            }
            self.check()?;
            if self.quiet() {
                return self.check_settled();
            }
        }
        Err(self.fail("the fleet does not settle".into()))
    }

    fn quiet(&self) -> bool {
        let top = self.etcd.revision;
        self.nodes.iter().all(|n| {
            n.phase == Phase::Serving
                && n.requests.is_empty()
                && n.answers.is_empty()
                && n.commands.is_empty()
                && n.seen == top
        }) && self
            .sites
            .iter()
            .all(|(_, s)| s.current.is_some() && s.closing.is_empty())
    }

    fn check_settled(&self) -> Result<(), Violation> {
        for (site, model) in &self.sites {
            let holders: Vec<&BrokerId> = self
                .nodes
                .iter()
                .filter(|n| n.sessions.contains_key(site))
                .map(|n| &n.id)
                .collect();
            let Some((at, _)) = model.current else {
                return Err(self.fail(format!("{site} has no session")));
            };
            let at = &self.nodes[at];
            let owner = self.etcd.owners.get(site).map(|k| &k.broker);
            if holders != [&at.id] || owner != Some(&at.id) {
                return Err(self.fail(format!(
                    "{site}: sessions at {holders:?}, etcd owner {owner:?}, the site uses {}",
                    at.id
                )));
            }
            if !at.fleet.holds(site, self.now + at.skew) {
                return Err(self.fail(format!("{}: cannot prove it holds {site}", at.id)));
            }
            for n in &self.nodes {
                let seen = n.fleet.owner(site).map(|o| &o.broker);
                if seen != Some(&at.id) {
                    return Err(self.fail(format!(
                        "{} thinks {site} is held by {seen:?}, not {}",
                        n.id, at.id
                    )));
                }
            }
        }
        Ok(())
    }

    /// Runs `steps` random steps, then settles.
    pub fn run(mut self, steps: usize) -> Result<FleetStats, Violation> {
        for _ in 0..steps {
            self.step()?;
        }
        self.settle()?;
        Ok(self.stats)
    }
}

/// Runs one case of `steps` steps for `seed` under `rules`.
pub fn run_case(seed: u64, steps: usize, rules: Rules) -> Result<FleetStats, Violation> {
    FleetSim::new(seed, rules).run(steps)
}
