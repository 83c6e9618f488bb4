//! The broker core behind one lock, and the shell's side of its contract
//! (`docs/architecture.md`, "The broker core"): every decision runs under
//! the lock through [`CoreCell::decide`], whose events are carried out
//! before the lock is released, so the map of live sessions
//! ([`Sessions`]) never disagrees with the core. Packets read the routing
//! state through [`CoreCell::read`].

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Instant, SystemTime};

use ipnet::IpNet;
use tether_proto::broker::{
    Allocated, AllocationError, AllocationId, AllocationRequest, BrokerCore, Event, OpenError,
    SessionOpen, StoreCommand, StoreResult,
};
use tether_proto::forward::Router;
use tether_proto::{RegionId, SiteId};
use tokio::sync::{Notify, watch};

use crate::sessions::{Session, Sessions};
use crate::store::Store;

/// The lock on the core was poisoned by a panic.
#[derive(Debug, thiserror::Error)]
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

/// Reads of a region's every lease from the store, by cause (a full read
/// grows with the region; steady state needs none).
#[derive(Debug, Default)]
pub struct LeaseReads {
    /// For an allocation: the cache was missing, or the compare-and-set
    /// found another writer's change.
    pub allocation: AtomicU64,
    /// On a notice of a change the cache does not hold (another broker's).
    pub notice: AtomicU64,
}

/// The broker core, the live sessions it keeps current, and what its
/// events announce.
#[derive(Debug)]
pub struct CoreCell {
    core: RwLock<BrokerCore>,
    sessions: Arc<Sessions>,
    /// Bumped whenever a site route appears or goes, here or through
    /// another broker (gateways follow it).
    site_routes: watch::Sender<u64>,
    /// Bumped on every change that can alter a name in the mesh zone.
    names: watch::Sender<u64>,
    /// What those changes touched, until the zone task takes it.
    name_marks: Mutex<NameChanges>,
    /// Bumped whenever the routes through other brokers are rebuilt.
    remote_routes: watch::Sender<u64>,
    /// Wakes the certificate-expiry timer when the core's deadline moves.
    timer: Notify,
    /// One allocation at a time, as the store serialises them anyway.
    allocation_gate: Mutex<()>,
    /// Reads of a region's every lease: for an allocation (the cache was
    /// missing, or another writer got there first), and on a notice of a
    /// change this broker did not make.
    lease_reads: LeaseReads,
    /// Outcomes of allocations, picked up by the caller that drives them.
    allocated: Mutex<HashMap<AllocationId, Result<Allocated, AllocationError>>>,
}

impl CoreCell {
    /// Wraps a core; `sessions` is the map it keeps in step.
    pub fn new(core: BrokerCore, sessions: Arc<Sessions>) -> Self {
        Self {
            core: RwLock::new(core),
            sessions,
            site_routes: watch::channel(0).0,
            names: watch::channel(0).0,
            name_marks: Mutex::new(NameChanges::default()),
            remote_routes: watch::channel(0).0,
            timer: Notify::new(),
            allocation_gate: Mutex::new(()),
            lease_reads: LeaseReads::default(),
            allocated: Mutex::new(HashMap::new()),
        }
    }

    /// The routing state, for forwarding and explanations.
    pub fn read(&self) -> Result<RouterRead<'_>, Poisoned> {
        self.core.read().map(RouterRead).map_err(|_| Poisoned)
    }

    /// The whole core, read-only.
    pub fn core(&self) -> Result<RwLockReadGuard<'_, BrokerCore>, Poisoned> {
        self.core.read().map_err(|_| Poisoned)
    }

    fn write(&self) -> Result<RwLockWriteGuard<'_, BrokerCore>, Poisoned> {
        self.core.write().map_err(|_| Poisoned)
    }

    /// Runs `f` on the core, then carries out the events it produced while
    /// still holding the lock.
    pub fn decide<T>(&self, f: impl FnOnce(&mut BrokerCore) -> T) -> Result<T, Poisoned> {
        self.decide_for(None, f)
    }

    /// [`CoreCell::decide`] for a decision about `site` alone: a change of
    /// the live sessions it makes is a change of that site's names (and
    /// of those whose sessions it closes), not of every site's.
    fn decide_for<T>(
        &self,
        site: Option<&SiteId>,
        f: impl FnOnce(&mut BrokerCore) -> T,
    ) -> Result<T, Poisoned> {
        let mut core = self.write()?;
        let out = f(&mut core);
        self.dispatch(&mut core, site);
        Ok(out)
    }

    fn dispatch(&self, core: &mut BrokerCore, about: Option<&SiteId>) {
        let (mut routes, mut names, mut remote) = (false, false, false);
        let mut closed = Vec::new();
        while let Some(event) = core.poll_event() {
            match event {
                Event::CloseSession {
                    session,
                    site,
                    reason,
                } => {
                    closed.push(site.clone());
                    if let Some(closed) = self.sessions.remove_if(&site, |cur| cur.id == session) {
                        closed.request_close(reason);
                    }
                }
                Event::RoutesChanged => routes = true,
                Event::SessionsChanged => names = true,
                Event::RemoteRoutesChanged => remote = true,
                Event::Allocated { allocation, result } => {
                    if let Ok(mut a) = self.allocated.lock() {
                        a.insert(allocation, result);
                    }
                }
            }
        }
        // Gateways get the sites of other brokers too: a rebuild of those
        // routes is a change of the site routes.
        if routes || remote {
            self.site_routes.send_modify(|v| *v += 1);
        }
        if names {
            match about {
                Some(site) => {
                    for site in closed.iter().chain([site]) {
                        self.site_names_changed(site);
                    }
                }
                None => self.names_changed(),
            }
        }
        if remote {
            self.remote_routes.send_modify(|v| *v += 1);
        }
    }

    /// Opens a session in the core and, if the core takes it, makes it its
    /// site's current one (the replaced one is asked to close).
    pub fn open_session(
        &self,
        session: &Arc<Session>,
        addresses: &[IpNet],
    ) -> Result<(), OpenError> {
        let open = SessionOpen {
            id: session.id,
            site: session.site().clone(),
            region: session.region().clone(),
            serial: session.peer.serial.clone(),
            addresses: addresses.to_vec(),
            connected_at: session.connected_at,
            not_after: instant_of(session.peer.not_after),
        };
        let opened = self
            .write()
            .map_err(|_| OpenError::Duplicate)
            .and_then(|mut core| {
                let result = core.handle_session_open(open, Instant::now());
                self.dispatch(&mut core, Some(session.site()));
                if result.is_ok() {
                    self.sessions.insert(session.clone());
                }
                result
            });
        if opened.is_ok() {
            self.timer.notify_one();
        }
        opened
    }

    /// Ends a session in the core, with its routes, if it is still its
    /// site's current one.
    pub fn close_session(&self, session: &Arc<Session>) {
        let site = session.site();
        let _ = self.decide_for(Some(site), |core| {
            if core.handle_session_closed(site, session.id, Instant::now()) {
                self.sessions
                    .remove_if(site, |cur| Arc::ptr_eq(cur, session));
            }
        });
    }

    /// Replaces the LAN routes of a session with `prefixes`, if it is still
    /// its site's current session.
    pub fn set_lan_routes(&self, session: &Session, prefixes: &[IpNet]) {
        let _ = self.decide(|core| core.handle_lan_routes(session.site(), session.id, prefixes));
    }

    /// Runs an allocation to its end: performs the core's store commands
    /// against `store` and feeds their results back. Blocking: call from a
    /// blocking context.
    pub fn allocate(
        &self,
        store: &dyn Store,
        request: AllocationRequest,
    ) -> Result<Allocated, AllocationError> {
        let _gate = self
            .allocation_gate
            .lock()
            .map_err(|_| AllocationError::Contention)?;
        let mut pending = VecDeque::new();
        let id = self
            .decide(|core| {
                let id = core.handle_allocate(request);
                pending.extend(std::iter::from_fn(|| core.poll_command()));
                id
            })
            .map_err(|_| AllocationError::Contention)?;
        loop {
            if let Some(result) = self.allocated.lock().ok().and_then(|mut a| a.remove(&id)) {
                return result;
            }
            let Some(command) = pending.pop_front() else {
                return Err(AllocationError::Contention);
            };
            let (allocation, answer) = match command {
                StoreCommand::LoadLeases { allocation, region } => {
                    self.lease_reads.allocation.fetch_add(1, Ordering::Relaxed);
                    (
                        allocation,
                        match store.region_leases(&region) {
                            Ok(leases) => StoreResult::Leases(leases),
                            Err(e) => StoreResult::Failed(e.0),
                        },
                    )
                }
                StoreCommand::CompareAndSet { allocation, txn } => (
                    allocation,
                    match store.commit_leases(&txn) {
                        Ok(Ok(())) => StoreResult::Committed,
                        Ok(Err(_)) => StoreResult::Conflict,
                        Err(e) => StoreResult::Failed(e.0),
                    },
                ),
            };
            self.decide(|core| {
                core.handle_store_result(allocation, answer);
                pending.extend(std::iter::from_fn(|| core.poll_command()));
            })
            .map_err(|_| AllocationError::Contention)?;
        }
    }

    /// Holds allocations back while the caller compares the cache of
    /// leases with the store: an allocation of this broker that the store
    /// has committed and the core not yet applied would otherwise look like
    /// another writer's change, and cost a read of the region's every
    /// lease.
    pub fn pause_allocations(&self) -> Result<MutexGuard<'_, ()>, Poisoned> {
        self.allocation_gate.lock().map_err(|_| Poisoned)
    }

    /// How often a region's every lease was read, by cause.
    pub fn lease_reads(&self) -> &LeaseReads {
        &self.lease_reads
    }

    /// The earliest certificate expiry of a live session.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.core().ok().and_then(|c| c.poll_timeout())
    }

    /// Ends the sessions whose certificate expired by `now`.
    pub fn expire(&self, now: Instant) {
        let _ = self.decide(|core| core.handle_timeout(now));
    }

    /// Resolves when the next deadline may have moved.
    pub async fn deadline_moved(&self) {
        self.timer.notified().await;
    }

    /// The current generation of the site routes.
    pub fn routes_generation(&self) -> u64 {
        *self.site_routes.borrow()
    }

    /// Changes to the site routes.
    pub fn route_changes(&self) -> watch::Receiver<u64> {
        self.site_routes.subscribe()
    }

    /// Rebuilds of the routes through other brokers.
    pub fn remote_route_changes(&self) -> watch::Receiver<u64> {
        self.remote_routes.subscribe()
    }

    /// Says that any name in the mesh zone may have changed.
    pub fn names_changed(&self) {
        self.mark_names(|m| m.all = true);
    }

    /// Says that the names of `site` may have changed.
    pub fn site_names_changed(&self, site: &SiteId) {
        self.mark_names(|m| {
            m.sites.insert(site.clone());
        });
    }

    /// Says that the leases of `region` changed: the addresses and LAN
    /// mappings of any of its sites may have.
    pub fn region_names_changed(&self, region: &RegionId) {
        self.mark_names(|m| {
            m.regions.insert(region.clone());
        });
    }

    fn mark_names(&self, mark: impl FnOnce(&mut NameChanges)) {
        match self.name_marks.lock() {
            Ok(mut marks) => mark(&mut marks),
            // Without the marks, the zone is read whole.
            Err(p) => p.into_inner().all = true,
        }
        self.names.send_modify(|v| *v += 1);
    }

    /// What changed since the last call (everything, the first time the
    /// lock was poisoned). The marks are made before the generation of
    /// [`CoreCell::name_changes`] moves, so a change marked after this
    /// call wakes its watcher again.
    pub fn take_name_changes(&self) -> NameChanges {
        match self.name_marks.lock() {
            Ok(mut marks) => std::mem::take(&mut *marks),
            Err(p) => {
                let mut marks = p.into_inner();
                self.name_marks.clear_poison();
                *marks = NameChanges::default();
                NameChanges {
                    all: true,
                    ..NameChanges::default()
                }
            }
        }
    }

    /// Changes that can alter a name in the mesh zone.
    pub fn name_changes(&self) -> watch::Receiver<u64> {
        self.names.subscribe()
    }
}

/// `at` on the monotonic clock (`now` if it has passed).
fn instant_of(at: SystemTime) -> Instant {
    let now = Instant::now();
    at.duration_since(SystemTime::now())
        .map(|d| now + d)
        .unwrap_or(now)
}

/// What may have changed in the mesh zone's names since the zone task last
/// looked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameChanges {
    /// Anything: every site is read again.
    pub all: bool,
    /// The sites whose names may have changed.
    pub sites: BTreeSet<SiteId>,
    /// The regions whose leases changed.
    pub regions: BTreeSet<RegionId>,
}
