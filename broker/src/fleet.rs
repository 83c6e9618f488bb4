//! The broker fleet in etcd: liveness of brokers and ownership of sessions.
//!
//! A broker whose store is etcd announces itself under
//! `<prefix>fleet/brokers/<id>` (a [`Member`], JSON: the endpoints sites
//! dial, the regions it serves) with an etcd lease of [`LEASE_TTL`] that it
//! keeps alive, and records each session it registers under
//! `<prefix>fleet/owners/<site>` (its id), bound to the same lease. Keys are
//! written when a session is registered or removed, never by traffic. A
//! broker that dies stops renewing its lease; etcd deletes its keys when the
//! lease expires, and every other broker's watch sees them go.
//!
//! One task per broker owns the etcd side: it grants the lease, writes the
//! announcement, reads the fleet and watches it, and writes and deletes
//! owner keys on [`FleetHandle::claim`] and [`FleetHandle::release`]. What
//! the changes mean is decided in [`tether_proto::fleet::Fleet`]; its
//! [`Decision`]s come out of the receiver [`start`] returns. When etcd is
//! unreachable or the lease is lost, the task starts over (a new lease, the
//! announcement and every current claim written again) once etcd answers.
//!
//! Fencing: a second task watches the lease's end on the clock (each grant
//! and renewal counted from when it was asked, so never later than etcd
//! expires it). When it passes without a renewal the broker can no longer
//! prove it holds its sites, and the fleet decides to move them
//! ([`Decision::MoveSites`]). Claims written again under a new lease are
//! transactions that write only where no other broker holds the site; a
//! site held elsewhere ends its session here ([`Decision::EndSession`]).
//!
//! The announcement is written again, under the same lease, only when the
//! broker changes it ([`FleetHandle::announce`]: a new link certificate,
//! rare), never per renewal.
//!
//! Claims and releases change the view at once ([`FleetHandle::claim`],
//! [`FleetHandle::release`]), also while the task waits for etcd, so that
//! a site deciding to connect without etcd is judged by the sessions the
//! broker has now ([`FleetHandle::readmit_offline_with`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, KeyValue, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use tether_config::broker::EtcdConfig;
use tether_proto::api::BrokerRef;
use tether_proto::fleet::{BrokerId, Decision, Fleet, Member, Peers, Readmit};
use tether_proto::ids::{RegionId, SiteId};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::store::StoreError;
use crate::store::etcd::FLEET_DIR;

/// Time to live of a broker's etcd lease: a broker that stops renewing is
/// gone from the fleet, and its sessions' owner keys with it, this long
/// after its last renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(5);

/// How often the lease is renewed (three times per time to live, so that
/// one lost renewal does not expire it).
const RENEW_EVERY: Duration = Duration::from_millis(LEASE_TTL.as_millis() as u64 / 3);

/// A renewal not answered this long means the keep-alive stream is stuck
/// on a member that cannot renew (answers take milliseconds): it is opened
/// again, well before the lease's end.
const RENEWAL_ANSWER: Duration = Duration::from_secs(1);

/// How long the task waits before it starts over after a failure.
const RETRY: Duration = Duration::from_millis(500);

/// What the fleet task is asked to write.
#[derive(Debug)]
enum Command {
    Claim(SiteId),
    Release(SiteId),
    /// Write this announcement in place of the current one.
    Announce(Box<Member>),
    /// Leave the fleet: revoke the lease (the announcement and every owner
    /// key with it), answer, and stop.
    Leave(oneshot::Sender<()>),
}

/// A broker's handle on the fleet.
#[derive(Debug)]
pub struct FleetHandle {
    fleet: Arc<Mutex<Fleet>>,
    changes: watch::Sender<u64>,
    view: watch::Sender<u64>,
    commands: mpsc::UnboundedSender<Command>,
}

impl FleetHandle {
    /// This broker registered a session of `site`: records that it holds
    /// the site. The view has it at once (what a connecting site is
    /// decided by); the fleet task writes the claim.
    pub fn claim(&self, site: &SiteId) {
        self.with_fleet(|f| f.handle_claim(site.clone()));
        let _ = self.commands.send(Command::Claim(site.clone()));
    }

    /// This broker holds no session of `site` any more. The view has it at
    /// once, also while the fleet task waits for etcd (a site that left is
    /// not taken for one still here); the task deletes the owner key.
    pub fn release(&self, site: &SiteId) {
        self.with_fleet(|f| f.handle_released(site));
        let _ = self.commands.send(Command::Release(site.clone()));
    }

    fn with_fleet<T>(&self, f: impl FnOnce(&mut Fleet) -> T) -> T {
        with_fleet(&self.fleet, &self.changes, &self.view, f)
    }

    /// Announces `member` in place of this broker's announcement (as when
    /// its link certificate was reissued): written under the current
    /// lease, or with the next one while etcd cannot be reached.
    pub fn announce(&self, member: Member) {
        let _ = self.commands.send(Command::Announce(Box::new(member)));
    }

    /// Leaves the fleet now rather than at the lease's expiry: the lease is
    /// revoked, so etcd deletes this broker's announcement and owner keys
    /// at once and the other brokers drop it as a peer (a restart under a
    /// new id is then not shadowed by the old announcement). Returns when
    /// etcd answered, or after the store's timeout.
    pub async fn leave(&self) {
        let (done, answered) = oneshot::channel();
        if self.commands.send(Command::Leave(done)).is_ok() {
            let _ = answered.await;
        }
    }

    /// The membership version and the endpoints a site of `region` should
    /// know, `own` (this broker's) first.
    pub fn endpoints_for(&self, region: &RegionId, own: &[String]) -> (u64, Vec<String>) {
        match self.fleet.lock() {
            Ok(f) => (f.version(), f.endpoints_for(region, own)),
            Err(_) => (0, own.to_vec()),
        }
    }

    /// The membership version and where gateway `gateway` of `region`
    /// reaches the WireGuard of the other live brokers serving the region
    /// that have it registered.
    pub fn gateway_endpoints_for(
        &self,
        region: &RegionId,
        gateway: &tether_proto::ids::GatewayId,
    ) -> (u64, Vec<String>) {
        match self.fleet.lock() {
            Ok(f) => (f.version(), f.gateway_endpoints_for(region, gateway)),
            Err(_) => (0, Vec::new()),
        }
    }

    /// Whether this broker's etcd lease is surely alive now (it renewed it
    /// within the lease's time to live): etcd answered it lately.
    pub fn lease_held(&self) -> bool {
        self.fleet
            .lock()
            .is_ok_and(|f| f.lease_held(Instant::now()))
    }

    /// Whether etcd renewed this broker's current lease at least once: the
    /// lease's keep-alive stream is open and answered.
    pub fn lease_renewed(&self) -> bool {
        self.fleet.lock().is_ok_and(|f| f.last_renewal().is_some())
    }

    /// Whether `site`, connecting while etcd cannot be reached, may be
    /// served here from this broker's last view of the fleet, with `peers`
    /// what the broker-to-broker link says of the other brokers
    /// ([`Fleet::readmit_offline`]).
    pub fn readmit_offline_with(&self, site: &SiteId, peers: Peers) -> Readmit {
        match self.fleet.lock() {
            Ok(f) => f.readmit_offline(site, peers),
            Err(_) => Readmit::NotHeld,
        }
    }

    /// [`FleetHandle::readmit_offline_with`] with nothing known of the
    /// other brokers ([`Peers::Unknown`]).
    pub fn readmit_offline(&self, site: &SiteId) -> Readmit {
        self.readmit_offline_with(site, Peers::Unknown)
    }

    /// Whether gateways are told this broker is leaving (while it is
    /// fenced, [`Fleet::gateways_leave`]).
    pub fn gateways_leave(&self) -> bool {
        self.fleet.lock().is_ok_and(|f| f.gateways_leave())
    }

    /// Whether another broker held `site` last, as far as this broker saw
    /// ([`Fleet::previous_holder`]).
    pub fn held_elsewhere(&self, site: &SiteId) -> bool {
        self.fleet
            .lock()
            .is_ok_and(|f| f.previous_holder(site).is_some())
    }

    /// This broker's id in the fleet.
    pub fn id(&self) -> Option<BrokerId> {
        self.fleet.lock().ok().map(|f| f.me().clone())
    }

    /// A copy of the fleet as this broker sees it.
    pub fn snapshot(&self) -> Option<Fleet> {
        self.fleet.lock().ok().map(|f| f.clone())
    }

    /// Changes of the membership version.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Changes of members or owners (the fleet's generation).
    pub fn view_changes(&self) -> watch::Receiver<u64> {
        self.view.subscribe()
    }
}

/// How the admin views name broker `id` of the fleet: its id and the
/// first endpoint it announces (its link address if it announces none).
pub fn broker_ref(id: &BrokerId, member: &Member) -> BrokerRef {
    BrokerRef {
        id: Some(id.clone()),
        address: member
            .endpoints
            .first()
            .or(member.forward.as_ref())
            .cloned()
            .unwrap_or_default(),
    }
}

/// The keys of the fleet under a deployment's prefix.
#[derive(Debug, Clone)]
struct Keys {
    brokers: String,
    owners: String,
    dir: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        let dir = format!("{prefix}{FLEET_DIR}");
        Self {
            brokers: format!("{dir}brokers/"),
            owners: format!("{dir}owners/"),
            dir,
        }
    }
}

/// A new id in the fleet, for one run of a broker.
pub fn new_id() -> BrokerId {
    format!("{:016x}", rand::random::<u64>())
}

/// Joins the fleet: announces `member` under the id `me` ([`new_id`]) and
/// starts the task that keeps the announcement, the claims and the view
/// current. The receiver yields what the broker must do when ownership
/// moves.
pub async fn start(
    config: &EtcdConfig,
    me: BrokerId,
    member: Member,
) -> Result<
    (
        Arc<FleetHandle>,
        mpsc::UnboundedReceiver<Decision>,
        JoinHandle<()>,
    ),
    StoreError,
> {
    let client = crate::store::etcd::connect(config).await?;
    let health = tokio::spawn(crate::store::etcd::follow_member_health(
        client.clone(),
        config.clone(),
    ));
    let fleet = Arc::new(Mutex::new(Fleet::new(me.clone())));
    let (changes, _) = watch::channel(0);
    let (view, _) = watch::channel(0);
    let (commands, command_rx) = mpsc::unbounded_channel();
    let (decisions, decision_rx) = mpsc::unbounded_channel();
    let handle = Arc::new(FleetHandle {
        fleet: fleet.clone(),
        changes: changes.clone(),
        view: view.clone(),
        commands,
    });
    let watchdog = tokio::spawn(fence_when_the_lease_runs_out(
        fleet.clone(),
        decisions.clone(),
        changes.clone(),
        view.clone(),
    ));
    let mut task = Task {
        client,
        keys: Keys::new(&config.prefix),
        me,
        member,
        fleet,
        changes,
        view,
        decisions,
        commands: command_rx,
        timeout: config.timeout,
        endpoints: config.endpoints.join(", "),
        left: false,
    };
    // The first announcement before the broker serves, so that a broker
    // that cannot join says so at start.
    let mut joined = Some(task.join().await?);
    let join = tokio::spawn(async move {
        let _watchdog = AbortOnDrop(watchdog);
        let _health = AbortOnDrop(health);
        loop {
            let lease = match joined.take() {
                Some(lease) => Ok(lease),
                None => task.join().await,
            };
            let ended = match lease {
                Ok(lease) => task.serve(lease).await,
                Err(e) => Err(e),
            };
            match ended {
                Ok(()) => return,
                Err(_) if task.left => return,
                Err(e) => tracing::warn!(error = %e, "fleet: starting over"),
            }
            tokio::time::sleep(RETRY).await;
        }
    });
    Ok((handle, decision_rx, join))
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Locks the fleet, applies `f`, and publishes the changes of its version
/// and generation.
fn with_fleet<T>(
    fleet: &Mutex<Fleet>,
    changes: &watch::Sender<u64>,
    view: &watch::Sender<u64>,
    f: impl FnOnce(&mut Fleet) -> T,
) -> T {
    let mut fleet = match fleet.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    let out = f(&mut fleet);
    changes.send_if_modified(|v| {
        let changed = *v != fleet.version();
        *v = fleet.version();
        changed
    });
    view.send_if_modified(|v| {
        let changed = *v != fleet.generation();
        *v = fleet.generation();
        changed
    });
    out
}

/// Sleeps until the lease's end and lets the fleet decide whether it ran
/// out (a renewal meanwhile moves the end later: it sleeps again).
async fn fence_when_the_lease_runs_out(
    fleet: Arc<Mutex<Fleet>>,
    decisions: mpsc::UnboundedSender<Decision>,
    changes: watch::Sender<u64>,
    view: watch::Sender<u64>,
) {
    loop {
        let deadline = with_fleet(&fleet, &changes, &view, |f| f.lease_deadline());
        match deadline {
            Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
            // Fenced, or no lease yet: a new lease is checked this often.
            None => tokio::time::sleep(RENEW_EVERY).await,
        }
        let decided = with_fleet(&fleet, &changes, &view, |f| f.poll(Instant::now()));
        for d in decided {
            if decisions.send(d).is_err() {
                return;
            }
        }
    }
}

struct Task {
    client: Client,
    keys: Keys,
    me: BrokerId,
    member: Member,
    fleet: Arc<Mutex<Fleet>>,
    changes: watch::Sender<u64>,
    view: watch::Sender<u64>,
    decisions: mpsc::UnboundedSender<Decision>,
    commands: mpsc::UnboundedReceiver<Command>,
    timeout: Duration,
    endpoints: String,
    /// The broker left the fleet: do not join again.
    left: bool,
}

/// A lease and the revision the view was read at.
struct Joined {
    lease: i64,
    revision: i64,
}

impl Task {
    fn error(&self, what: &str, e: impl std::fmt::Display) -> StoreError {
        StoreError(format!("etcd at {}: {what} failed: {e}", self.endpoints))
    }

    async fn bounded<T>(
        &self,
        what: &str,
        f: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, f).await;
        crate::metrics::etcd_request(what, started.elapsed(), !matches!(result, Ok(Ok(_))));
        match result {
            Ok(r) => r.map_err(|e| self.error(what, e)),
            Err(_) => Err(self.error(what, "no answer in time")),
        }
    }

    fn with_fleet<T>(&self, f: impl FnOnce(&mut Fleet) -> T) -> T {
        with_fleet(&self.fleet, &self.changes, &self.view, f)
    }

    fn decide(&self, decisions: Vec<Decision>) {
        for d in decisions {
            let _ = self.decisions.send(d);
        }
    }

    /// A new lease, the announcement and every claim under it, and a full
    /// read of the fleet.
    async fn join(&mut self) -> Result<Joined, StoreError> {
        let mut c = self.client.clone();
        // Sessions that opened or ended while the task was away (the view
        // has them already): their claims are written below, under the new
        // lease, as re-claims.
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Claim(_) | Command::Release(_) => {}
                // Written below.
                Command::Announce(member) => self.member = *member,
                // No lease to revoke (the last one is gone); stop here.
                Command::Leave(done) => {
                    self.left = true;
                    let _ = done.send(());
                    return Err(StoreError("the broker left the fleet".into()));
                }
            }
        }
        let ttl = i64::try_from(LEASE_TTL.as_secs()).unwrap_or(5);
        let asked = Instant::now();
        let granted = self
            .bounded("lease grant", c.lease_grant(ttl, None))
            .await?;
        let lease = granted.id();
        let granted_ttl = Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(0));
        self.with_fleet(|f| f.handle_granted(asked, granted_ttl));
        self.announce(lease).await?;
        let claimed: Vec<SiteId> = self.with_fleet(|f| f.claimed().cloned().collect());
        for site in claimed {
            self.reclaim(lease, &site).await?;
        }
        let response = self
            .bounded(
                "read fleet",
                c.get(self.keys.dir.clone(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let revision = response.header().map(|h| h.revision()).unwrap_or(0);
        let decisions = self.with_fleet(|f| {
            f.handle_reset();
            let mut out = Vec::new();
            for kv in response.kvs() {
                out.extend(apply(&self.keys, f, EventType::Put, kv));
            }
            out
        });
        self.decide(decisions);
        tracing::info!(broker = %self.me, lease = lease, "joined the broker fleet");
        Ok(Joined { lease, revision })
    }

    /// Writes this broker's announcement under `lease`.
    async fn announce(&self, lease: i64) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        let value = serde_json::to_vec(&self.member).map_err(|e| self.error("announce", e))?;
        let key = format!("{}{}", self.keys.brokers, self.me);
        self.bounded(
            "announce",
            c.put(key, value, Some(PutOptions::new().with_lease(lease))),
        )
        .await?;
        Ok(())
    }

    async fn put_claim(&self, lease: i64, site: &SiteId) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        let key = format!("{}{site}", self.keys.owners);
        let put = self
            .bounded(
                "claim",
                c.put(
                    key,
                    self.me.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
            )
            .await?;
        let revision = put.header().map(|h| h.revision()).unwrap_or(0);
        let decisions = self.with_fleet(|f| f.handle_claimed(site, revision));
        self.decide(decisions);
        Ok(())
    }

    /// Writes this broker's claim on `site` under a new lease only where
    /// no other broker holds the site (its key is absent or already this
    /// broker's); otherwise the session here ends. A broker coming back
    /// after losing its lease never overwrites a newer owner.
    async fn reclaim(&self, lease: i64, site: &SiteId) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        let key = format!("{}{site}", self.keys.owners);
        let put = TxnOp::put(
            key.clone(),
            self.me.clone(),
            Some(PutOptions::new().with_lease(lease)),
        );
        for compare in [
            Compare::version(key.clone(), CompareOp::Equal, 0),
            Compare::value(key.clone(), CompareOp::Equal, self.me.clone()),
        ] {
            let txn = Txn::new()
                .when([compare])
                .and_then([put.clone()])
                .or_else([TxnOp::get(key.clone(), None)]);
            let answer = self.bounded("claim", c.txn(txn)).await?;
            let revision = answer.header().map(|h| h.revision()).unwrap_or(0);
            if answer.succeeded() {
                let decisions = self.with_fleet(|f| f.handle_claimed(site, revision));
                self.decide(decisions);
                return Ok(());
            }
            let held = answer.op_responses().into_iter().find_map(|op| match op {
                etcd_client::TxnOpResponse::Get(get) => get.kvs().first().map(|kv| {
                    (
                        String::from_utf8_lossy(kv.value()).to_string(),
                        kv.mod_revision(),
                    )
                }),
                _ => None,
            });
            match held {
                Some((broker, _)) if broker == self.me => continue,
                Some((broker, at)) => {
                    tracing::info!(%site, holder = %broker, "fleet: another broker holds the site now; ending its session here");
                    let decisions = self.with_fleet(|f| f.handle_claim_refused(site, broker, at));
                    self.decide(decisions);
                    return Ok(());
                }
                // Deleted in between: try again from the start.
                None => return Box::pin(self.reclaim(lease, site)).await,
            }
        }
        Ok(())
    }

    async fn release(&self, site: &SiteId) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        let key = format!("{}{site}", self.keys.owners);
        // Only this broker's own key: another broker may hold the site now.
        let txn = Txn::new()
            .when([Compare::value(
                key.clone(),
                CompareOp::Equal,
                self.me.clone(),
            )])
            .and_then([TxnOp::delete(key, None)]);
        self.bounded("release", c.txn(txn)).await?;
        Ok(())
    }

    /// Keeps the lease alive, writes claims and releases, applies the
    /// watch; returns on a failure (to start over) or when the broker is
    /// gone.
    async fn serve(&mut self, joined: Joined) -> Result<(), StoreError> {
        let mut c = self.client.clone();
        let (mut keeper, mut alive) = self
            .bounded("lease keep-alive", c.lease_keep_alive(joined.lease))
            .await?;
        let mut w = self.client.clone();
        let mut watch = self
            .bounded(
                "watch",
                w.watch(
                    self.keys.dir.clone(),
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(joined.revision + 1),
                    ),
                ),
            )
            .await?;
        let mut renew = tokio::time::interval(RENEW_EVERY);
        // When each renewal not yet answered was asked (answers come in
        // order).
        let mut asked: VecDeque<Instant> = VecDeque::new();
        loop {
            tokio::select! {
                _ = renew.tick() => {
                    if self.with_fleet(|f| f.is_fenced()) {
                        return Err(self.error("lease keep-alive", "no renewal within the lease's time to live"));
                    }
                    // A renewal unanswered for a second: the stream is
                    // stuck on a member that cannot renew
                    // (cut off from the others, or dead). Open it again,
                    // on the members the pool still has (a member without
                    // a leader leaves it); the old stream's answers go
                    // with it, which only makes the lease's end earlier.
                    if asked.front().is_some_and(|at| at.elapsed() >= RENEWAL_ANSWER) {
                        tracing::info!(broker = %self.me, "fleet: no answer to a lease renewal; renewing on another etcd member");
                        // Their answers are given up: failed renewals.
                        for at in asked.drain(..) {
                            crate::metrics::etcd_request("lease renewal", at.elapsed(), true);
                        }
                        (keeper, alive) = self
                            .bounded("lease keep-alive", c.lease_keep_alive(joined.lease))
                            .await?;
                    }
                    // A bounded queue: renewals unanswered for a whole
                    // time to live fence the broker above anyway.
                    if asked.len() >= 16
                        && let Some(at) = asked.pop_front()
                    {
                        crate::metrics::etcd_request("lease renewal", at.elapsed(), true);
                    }
                    asked.push_back(Instant::now());
                    keeper.keep_alive().await.map_err(|e| self.error("lease keep-alive", e))?;
                }
                answer = alive.message() => match answer {
                    Ok(Some(a)) if a.ttl() > 0 => {
                        if let Some(at) = asked.pop_front() {
                            crate::metrics::etcd_request("lease renewal", at.elapsed(), false);
                            let ttl = Duration::from_secs(u64::try_from(a.ttl()).unwrap_or(0));
                            self.with_fleet(|f| f.handle_renewed(at, ttl));
                        }
                    }
                    Ok(Some(_)) => {
                        if let Some(at) = asked.pop_front() {
                            crate::metrics::etcd_request("lease renewal", at.elapsed(), true);
                        }
                        let decisions = self.with_fleet(|f| f.handle_lease_lost(Instant::now()));
                        self.decide(decisions);
                        return Err(self.error("lease keep-alive", "the lease expired"));
                    }
                    Ok(None) => return Err(self.error("lease keep-alive", "stream ended")),
                    Err(e) => return Err(self.error("lease keep-alive", e)),
                },
                command = self.commands.recv() => match command {
                    Some(Command::Claim(site)) => {
                        let held = self.with_fleet(|f| f.lease_held(Instant::now()));
                        if !held {
                            // The lease may be gone: a plain write could
                            // replace a newer owner. Start over; the new
                            // lease claims the site only where no other
                            // broker holds it.
                            return Err(self.error("claim", "the lease ran out before the claim could be written"));
                        }
                        self.put_claim(joined.lease, &site).await?;
                    }
                    Some(Command::Release(site)) => {
                        self.release(&site).await?;
                    }
                    Some(Command::Announce(member)) => {
                        // Kept first, so that a failed write is made with
                        // the next lease.
                        self.member = *member;
                        self.announce(joined.lease).await?;
                    }
                    Some(Command::Leave(done)) => {
                        let revoked = tokio::time::timeout(self.timeout, c.lease_revoke(joined.lease)).await;
                        match revoked {
                            Ok(Ok(_)) => tracing::info!(broker = %self.me, "left the broker fleet"),
                            Ok(Err(e)) => tracing::warn!(error = %e, "could not leave the broker fleet; the others drop this broker when its lease expires"),
                            Err(_) => tracing::warn!("etcd did not answer in time; the other brokers drop this broker when its lease expires"),
                        }
                        let _ = done.send(());
                        return Ok(());
                    }
                    None => {
                        // The broker is gone: leave the fleet now rather
                        // than at the lease's expiry.
                        let _ = tokio::time::timeout(self.timeout, c.lease_revoke(joined.lease)).await;
                        return Ok(());
                    }
                },
                message = watch.message() => match message {
                    Ok(Some(response)) => {
                        if response.canceled() {
                            return Err(self.error("watch", "canceled"));
                        }
                        let decisions = self.with_fleet(|f| {
                            let mut out = Vec::new();
                            for event in response.events() {
                                if let Some(kv) = event.kv() {
                                    out.extend(apply(&self.keys, f, event.event_type(), kv));
                                }
                            }
                            out
                        });
                        self.decide(decisions);
                    }
                    Ok(None) => return Err(self.error("watch", "stream ended")),
                    Err(e) => return Err(self.error("watch", e)),
                },
            }
        }
    }
}

/// Applies one change of a fleet key to the view.
fn apply(keys: &Keys, fleet: &mut Fleet, kind: EventType, kv: &KeyValue) -> Vec<Decision> {
    let Ok(key) = std::str::from_utf8(kv.key()) else {
        return Vec::new();
    };
    let revision = kv.mod_revision();
    if let Some(id) = key.strip_prefix(&keys.brokers) {
        match kind {
            EventType::Put => match serde_json::from_slice::<Member>(kv.value()) {
                Ok(member) => fleet.handle_member(id.to_string(), member, kv.create_revision()),
                Err(e) => tracing::warn!(broker = id, error = %e, "fleet: unreadable announcement"),
            },
            EventType::Delete => fleet.handle_member_gone(id),
        }
    } else if let Some(site) = key.strip_prefix(&keys.owners)
        && let Ok(site) = SiteId::new(site)
    {
        match kind {
            EventType::Put => {
                let broker = String::from_utf8_lossy(kv.value()).to_string();
                return fleet.handle_owner(site, broker, revision);
            }
            EventType::Delete => fleet.handle_owner_gone(&site, revision),
        }
    }
    Vec::new()
}
