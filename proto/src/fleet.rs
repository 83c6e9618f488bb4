//! The broker fleet as one broker sees it: which brokers are alive and
//! where sites dial them ([`Fleet`] membership), which broker holds each
//! site's session (ownership), and what to do when either changes.
//!
//! The shell feeds the fleet what the shared store says (`handle_*`, each
//! with the store revision of the change) and what this broker does with
//! its own sessions (`handle_claim*`, `handle_released`); the fleet answers
//! with [`Decision`]s. It keeps no clock: liveness is the store's business
//! (a broker's keys vanish with its store lease).
//!
//! # Ownership
//!
//! A broker *claims* a site when it registers the site's session: it writes
//! the site's owner key (its own id) and learns the revision of that write.
//! A later owner write by another broker means the site connected there
//! after it connected here: this broker ends its session
//! ([`Decision::EndSession`]), so that no two brokers route to one site.
//! A foreign write older than this broker's own claim is stale (the site
//! came back here since) and changes nothing. While this broker's write is
//! in flight, it cannot yet tell the two apart: the comparison waits for the
//! claim's revision ([`Fleet::handle_claimed`]).
//!
//! # Fencing
//!
//! A broker proves it holds its sites by keeping its store lease alive:
//! the owner keys are bound to it. The shell reports each grant and renewal
//! with the time it *asked* ([`Fleet::handle_granted`],
//! [`Fleet::handle_renewed`]); the lease is held until that
//! time plus the granted time to live, which is never later than the store
//! expires it. When that moment passes without a renewal
//! ([`Fleet::poll`]), the broker is *fenced*: its owner keys are gone or
//! about to go, and another broker may take its sites. It tells every site
//! it holds to move ([`Decision::MoveSites`], once per lost lease); none
//! of its claims is proven any more. Sessions that stay (their site found no other broker that would take it, e.g. when the
//! store is down for every broker) or that open while fenced are claimed
//! again under the next lease only where no other broker holds the site
//! ([`Fleet::handle_claim_refused`] otherwise), so a broker coming back
//! never writes stale ownership over a newer one. While fenced it tells its
//! gateways it is leaving ([`Fleet::gateways_leave`]).
//!
//! # Without the store
//!
//! A site that connects while the store cannot be reached is served from
//! the last view only where this broker held it
//! ([`Fleet::readmit_offline`]), and, once the other brokers have dropped
//! this one ([`Peers::Silent`]: they reach the store), only while its
//! session is still here: a site that left may be held elsewhere now.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::ids::{RegionId, SiteId};

/// A broker's id in the fleet: unique per broker process (its store lease).
pub type BrokerId = String;

/// A live broker as it announces itself.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Member {
    /// Endpoints sites dial (`host:port`), in the broker's order.
    pub endpoints: Vec<String>,
    /// The regions whose sites it serves.
    pub regions: BTreeSet<RegionId>,
    /// Where other brokers forward packets for the sites it holds
    /// (`host:port` of its broker-to-broker link), if it has one.
    #[cfg_attr(feature = "serde", serde(default))]
    pub forward: Option<String>,
    /// The WireGuard public key (base64) of its broker-to-broker link.
    /// Another broker makes it a peer only with a valid
    /// [`Member::link_proof`] (see `docs/ha.md`).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub link_key: Option<String>,
    /// The deployment CA's word for [`Member::link_key`]: a broker
    /// certificate and its signature over the key, this broker's fleet id
    /// and [`Member::forward`] (`tether_pki::link`). Absent in the records
    /// of releases before it.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub link_proof: Option<LinkProof>,
    /// The gateways attached to it (packets for their prefixes are
    /// forwarded to it).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Vec::is_empty")
    )]
    pub gateways: Vec<MemberGateway>,
    /// How often (milliseconds) its link sends a keepalive to every peer
    /// that has heard nothing else from it meanwhile. A broker that
    /// announces it is held down by the others once it has been silent for
    /// [`crate::peering::LINK_SILENCE`]; one that does not (an older
    /// release) only by its WireGuard session's state.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub link_keepalive_ms: Option<u32>,
    /// Where gateways reach its WireGuard (`address:port`), when it serves
    /// gateways; gateways learn the brokers of their region from it.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub gateway_endpoint: Option<String>,
}

impl Member {
    /// The link's endpoint and key, when the broker has a link.
    pub fn link(&self) -> Option<(&str, &str)> {
        Some((self.forward.as_deref()?, self.link_key.as_deref()?))
    }
}

/// A broker's proof that its link key is its own, vouched for by the
/// deployment's CA: made and checked by `tether_pki::link`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct LinkProof {
    /// A broker certificate (DER, base64) the deployment's CA issued.
    pub cert: String,
    /// Until when the proof holds (Unix seconds): the certificate's end.
    pub not_after: u64,
    /// The certificate key's signature (ECDSA P-256 with SHA-256, ASN.1,
    /// base64) over the link key, the fleet id, the link's endpoint and
    /// `not_after`.
    pub signature: String,
}

/// A gateway attached to a broker, as the broker announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct MemberGateway {
    /// The gateway's id.
    pub id: crate::ids::GatewayId,
    /// Its region.
    pub region: RegionId,
    /// The backend prefixes behind it.
    pub prefixes: Vec<ipnet::IpNet>,
}

/// Who holds a site's session, as the store says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The broker.
    pub broker: BrokerId,
    /// The store revision of the owner write.
    pub revision: i64,
}

/// This broker's claim on a site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// Written, revision not yet known.
    Pending,
    /// Written at this revision.
    At(i64),
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Another broker holds the site's newer session: end the one here.
    EndSession(SiteId),
    /// The store lease ran out: this broker can no longer prove it holds
    /// any site. Tell every connected site to move to another broker
    /// (make-before-break); these sites were held.
    MoveSites(Vec<SiteId>),
}

/// Whether a site that connects while the store cannot be reached may be
/// served here ([`Fleet::readmit_offline`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readmit {
    /// This broker's last view of the store names it the site's holder, or
    /// it holds a session of the site now: every broker's last view routes
    /// the site here, and no other broker could have taken it without a
    /// store write this broker would have to lose when the store returns.
    Held,
    /// Another broker held the site last: taking it over needs a store
    /// write.
    HeldElsewhere(BrokerId),
    /// No broker held the site in the last view: placing it needs a store
    /// write.
    NotHeld,
    /// This broker held the site last, but the site's session here ended
    /// while this broker could not reach the store, and the other brokers
    /// have dropped this one ([`Peers::Silent`]): they reach the store,
    /// route nothing here, and may have placed the site elsewhere. It
    /// should connect to one of them.
    Left,
}

/// What the broker-to-broker link says of the other brokers of this
/// broker's last view, when a site connects without the store
/// ([`Fleet::readmit_offline`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peers {
    /// No other broker to ask: this broker is alone in its last view, or
    /// has no link. Nothing says the others moved on.
    Unknown,
    /// At least one other broker still talks to this one over the link:
    /// it still counts this broker in, so its view of the fleet is frozen
    /// too (the store is down for it as well).
    Heard,
    /// Every other broker has gone silent on the link: they dropped this
    /// broker when its store lease expired (they reach the store, and a
    /// site that left here may be held by one of them now), or they are
    /// down.
    Silent,
}

impl Peers {
    /// From whether each other broker on the link is down (silent past
    /// [`crate::peering::LINK_SILENCE`], or never reached): heard when any
    /// is up, silent when all are down, unknown without any.
    pub fn from_down(down: impl IntoIterator<Item = bool>) -> Self {
        let mut out = Peers::Unknown;
        for down in down {
            if !down {
                return Peers::Heard;
            }
            out = Peers::Silent;
        }
        out
    }
}

/// Membership and ownership as one broker sees them.
#[derive(Debug, Clone)]
pub struct Fleet {
    me: BrokerId,
    members: BTreeMap<BrokerId, Member>,
    /// The store revision at which each member's announcement was created.
    announced: BTreeMap<BrokerId, i64>,
    owners: BTreeMap<SiteId, Owner>,
    /// The other broker whose owner key of a site was deleted last (it
    /// released the site, or its lease expired), until an owner is seen
    /// again: what a failover after a broker's death is told by.
    departed: BTreeMap<SiteId, BrokerId>,
    claims: BTreeMap<SiteId, Claim>,
    version: u64,
    generation: u64,
    /// Until when the store lease is surely alive (`None` before the
    /// first grant).
    held_until: Option<Instant>,
    /// When the newest renewal of the current lease the store answered
    /// was asked (`None` until one was, again after each grant).
    renewed_at: Option<Instant>,
    fenced: bool,
}

impl Fleet {
    /// The fleet of broker `me`, before anything is known.
    pub fn new(me: BrokerId) -> Self {
        Self {
            me,
            members: BTreeMap::new(),
            announced: BTreeMap::new(),
            owners: BTreeMap::new(),
            departed: BTreeMap::new(),
            claims: BTreeMap::new(),
            version: 0,
            generation: 0,
            held_until: None,
            renewed_at: None,
            fenced: false,
        }
    }

    /// The store granted this broker a new lease for `ttl`, on a request
    /// sent at `asked_at`. It ends a fence.
    pub fn handle_granted(&mut self, asked_at: Instant, ttl: Duration) {
        self.fenced = false;
        self.held_until = Some(asked_at + ttl);
        self.renewed_at = None;
    }

    /// The store renewed the lease for `ttl`, on a request sent at
    /// `asked_at`. A late answer never shortens the lease, and a lease that
    /// already ran out stays lost (only a new one ends the fence).
    pub fn handle_renewed(&mut self, asked_at: Instant, ttl: Duration) {
        if self.fenced {
            return;
        }
        let until = asked_at + ttl;
        self.held_until = Some(self.held_until.map_or(until, |t| t.max(until)));
        self.renewed_at = Some(self.renewed_at.map_or(asked_at, |t| t.max(asked_at)));
    }

    /// When the newest renewal of the current lease that the store
    /// answered was asked: `None` before the first one after a grant (the
    /// lease is not yet kept alive), and while fenced.
    pub fn last_renewal(&self) -> Option<Instant> {
        if self.fenced { None } else { self.renewed_at }
    }

    /// This broker's lease is lost for sure (the store said it expired).
    pub fn handle_lease_lost(&mut self, now: Instant) -> Vec<Decision> {
        if let Some(t) = self.held_until.as_mut() {
            *t = (*t).min(now);
        }
        self.poll(now)
    }

    /// When [`Fleet::poll`] must be called next: the moment the lease runs
    /// out (`None` while fenced or before the first lease).
    pub fn lease_deadline(&self) -> Option<Instant> {
        if self.fenced { None } else { self.held_until }
    }

    /// Whether the lease ran out and no new one was granted yet.
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// Whether the lease is surely alive at `now`: granted, its end not
    /// reached, not fenced. A new session's claim is written as a plain
    /// owner write (the newest session wins) only then; otherwise the
    /// shell writes nothing under the old lease and claims the site under
    /// the next one, only where no other broker holds it. The end may have
    /// passed before [`Fleet::poll`] noticed: this looks at `now`, so a
    /// write is never made on a lease that may be gone.
    pub fn lease_held(&self, now: Instant) -> bool {
        !self.fenced && self.held_until.is_some_and(|until| now < until)
    }

    /// Whether this broker can prove at `now` that it holds `site`: its
    /// claim was written (revision known), its lease is held
    /// ([`Fleet::lease_held`]), and no newer owner write by another broker
    /// has been seen.
    pub fn holds(&self, site: &SiteId, now: Instant) -> bool {
        let Some(Claim::At(mine)) = self.claims.get(site) else {
            return false;
        };
        let superseded = self
            .owners
            .get(site)
            .is_some_and(|o| o.broker != self.me && o.revision > *mine);
        self.lease_held(now) && !superseded
    }

    /// Checks the lease at `now`: the first call past its end fences the
    /// broker ([`Decision::MoveSites`] with the sites it held).
    pub fn poll(&mut self, now: Instant) -> Vec<Decision> {
        match self.held_until {
            Some(until) if !self.fenced && now >= until => {
                self.fenced = true;
                // No claim is proven any more; those of sessions still
                // here when a new lease comes are written again then.
                for claim in self.claims.values_mut() {
                    *claim = Claim::Pending;
                }
                let held: Vec<SiteId> = self.claims.keys().cloned().collect();
                vec![Decision::MoveSites(held)]
            }
            _ => Vec::new(),
        }
    }

    /// Claiming `site` again under a new lease was refused: `broker`
    /// holds it since `revision`. The session here must end.
    pub fn handle_claim_refused(
        &mut self,
        site: &SiteId,
        broker: BrokerId,
        revision: i64,
    ) -> Vec<Decision> {
        if self.claims.remove(site).is_none() {
            return Vec::new();
        }
        self.handle_owner(site.clone(), broker, revision);
        vec![Decision::EndSession(site.clone())]
    }

    /// This broker's id.
    pub fn me(&self) -> &BrokerId {
        &self.me
    }

    /// Bumped whenever the set of members or their announcements change.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Bumped on every change of members or owners (what routes through
    /// other brokers follow).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Who holds each site, as the store says.
    pub fn owners(&self) -> impl Iterator<Item = (&SiteId, &Owner)> {
        self.owners.iter()
    }

    /// The live brokers.
    pub fn members(&self) -> &BTreeMap<BrokerId, Member> {
        &self.members
    }

    /// The other live brokers to relay to, one per link key: a broker
    /// restarted with its key under a new id while the announcement of its
    /// previous run is still alive (after a crash, until that lease
    /// expires) is reached under the newer announcement (the higher
    /// `created` revision), which is the process listening now.
    pub fn link_members(&self) -> BTreeMap<&BrokerId, &Member> {
        self.link_members_admitted(|_, _| true)
    }

    /// [`Fleet::link_members`] among the members `admit` accepts (those
    /// whose link key is proven): a record it refuses cannot hide another
    /// broker's newer announcement of the same key.
    pub fn link_members_admitted(
        &self,
        mut admit: impl FnMut(&BrokerId, &Member) -> bool,
    ) -> BTreeMap<&BrokerId, &Member> {
        let mut newest: BTreeMap<&str, (i64, &BrokerId)> = BTreeMap::new();
        for (id, member) in &self.members {
            let Some((_, key)) = member.link() else {
                continue;
            };
            if *id == self.me || !admit(id, member) {
                continue;
            }
            let created = self.announced.get(id).copied().unwrap_or(0);
            let entry = newest.entry(key).or_insert((created, id));
            if (created, id) > (entry.0, entry.1) {
                *entry = (created, id);
            }
        }
        newest
            .into_values()
            .filter_map(|(_, id)| Some((id, self.members.get(id)?)))
            .collect()
    }

    /// A broker announced itself (or changed its announcement), in an
    /// announcement the store created at revision `created`.
    pub fn handle_member(&mut self, id: BrokerId, member: Member, created: i64) {
        self.announced.insert(id.clone(), created);
        if self.members.get(&id) != Some(&member) {
            self.members.insert(id, member);
            self.version += 1;
            self.generation += 1;
        }
    }

    /// A broker is gone (its store lease expired or it left).
    pub fn handle_member_gone(&mut self, id: &str) {
        self.announced.remove(id);
        if self.members.remove(id).is_some() {
            self.version += 1;
            self.generation += 1;
        }
    }

    /// Forgets every member and owner, before a full read of the store.
    pub fn handle_reset(&mut self) {
        if !self.members.is_empty() {
            self.version += 1;
        }
        self.members.clear();
        self.announced.clear();
        self.owners.clear();
        self.generation += 1;
    }

    /// The store says `broker` holds `site` since `revision`.
    pub fn handle_owner(&mut self, site: SiteId, broker: BrokerId, revision: i64) -> Vec<Decision> {
        let stale = self
            .owners
            .get(&site)
            .is_some_and(|o| o.revision > revision);
        if stale {
            return Vec::new();
        }
        self.departed.remove(&site);
        self.owners.insert(site.clone(), Owner { broker, revision });
        self.generation += 1;
        self.check(&site)
    }

    /// The owner key of `site` is gone (released, or its broker died).
    pub fn handle_owner_gone(&mut self, site: &SiteId, revision: i64) {
        if self
            .owners
            .get(site)
            .is_some_and(|o| o.revision <= revision)
        {
            if let Some(gone) = self.owners.remove(site)
                && gone.broker != self.me
            {
                self.departed.insert(site.clone(), gone.broker);
            }
            self.generation += 1;
        }
    }

    /// The other broker that held `site` last, as far as this broker saw:
    /// its owner key, or the key deleted last (released, or expired with
    /// its broker's lease). A session of the site registered here then is
    /// a failover (or handover) to this broker.
    pub fn previous_holder(&self, site: &SiteId) -> Option<&BrokerId> {
        match self.owners.get(site) {
            Some(o) if o.broker != self.me => Some(&o.broker),
            Some(_) => None,
            None => self.departed.get(site),
        }
    }

    /// This broker registered a session of `site` and is writing its claim.
    pub fn handle_claim(&mut self, site: SiteId) {
        self.claims.insert(site, Claim::Pending);
    }

    /// This broker's claim on `site` was written at `revision`.
    pub fn handle_claimed(&mut self, site: &SiteId, revision: i64) -> Vec<Decision> {
        match self.claims.get_mut(site) {
            Some(claim) => *claim = Claim::At(revision),
            // Released meanwhile.
            None => return Vec::new(),
        }
        self.check(site)
    }

    /// This broker no longer holds a session of `site`.
    pub fn handle_released(&mut self, site: &SiteId) {
        self.claims.remove(site);
    }

    /// The sites this broker holds (to claim again under a new store
    /// lease).
    pub fn claimed(&self) -> impl Iterator<Item = &SiteId> {
        self.claims.keys()
    }

    /// Whether `site`, connecting while the store cannot be reached (no
    /// read answered, or the lease is not held), may be served here from
    /// what this broker last knew, with `peers` what the link says of the
    /// other brokers. Only where this broker held the site last: the last
    /// owner key it saw names it (or its own newer claim has not come back
    /// through the watch yet), or it saw no owner and holds a session of
    /// the site (a claim waiting to be written). Nothing is written
    /// meanwhile; when the store answers again the claim is made under the
    /// new lease only where no other broker holds the site (see
    /// [`Fleet::poll`] and the shell's re-claim), so a broker that was cut
    /// off alone loses to a takeover the others made meanwhile.
    ///
    /// A site that has no session here any more (it left: it moved when
    /// this broker asked it to, or its connection ended) is not held when
    /// the other brokers have dropped this one ([`Peers::Silent`],
    /// [`Readmit::Left`]): they reach the store, so the site could move to
    /// one of them, and perhaps did; serving it here again would hide it
    /// from every site on those brokers. When they still talk to this
    /// broker ([`Peers::Heard`]) the store is down for them too, nothing can
    /// have moved, and every broker's view still routes the site here: it
    /// is served again (a restarted agent keeps its address). A site whose
    /// session is still here is held either way: it stayed because no
    /// other broker took it.
    pub fn readmit_offline(&self, site: &SiteId, peers: Peers) -> Readmit {
        let session_here = self.claims.contains_key(site);
        let held = match (self.owners.get(site), self.claims.get(site)) {
            (Some(o), _) if o.broker == self.me => Readmit::Held,
            // This broker's own write, newer than the other's, has not come
            // back through the watch yet.
            (Some(o), Some(Claim::At(mine))) if *mine > o.revision => Readmit::Held,
            (Some(o), _) => Readmit::HeldElsewhere(o.broker.clone()),
            (None, Some(_)) => Readmit::Held,
            (None, None) => Readmit::NotHeld,
        };
        match held {
            Readmit::Held if !session_here && peers == Peers::Silent => Readmit::Left,
            other => other,
        }
    }

    /// Whether the broker's gateways must be told it is leaving (their
    /// pings answered with "leaving" rather than a pong): while it is
    /// fenced. Its view of the fleet is stale then (the other brokers may
    /// hold sites it still routes elsewhere, or not at all), so a gateway
    /// should send its traffic to a broker that reaches the store; when
    /// every broker is fenced (the store is down for all) the gateway stays
    /// where it is. Pongs resume with the next lease.
    pub fn gateways_leave(&self) -> bool {
        self.fenced
    }

    /// Who holds `site`: `None` when no live broker does.
    pub fn owner(&self, site: &SiteId) -> Option<&Owner> {
        self.owners.get(site)
    }

    /// The other broker holding `site`, when it is alive: its id and
    /// announcement. An owner key naming a broker that is no member any
    /// more (its announcement is gone, its owner keys go with the same
    /// lease) counts as no holder: the site is offline until it connects
    /// again. What the fleet-wide admin views show as held elsewhere.
    pub fn live_holder_elsewhere(&self, site: &SiteId) -> Option<(&BrokerId, &Member)> {
        let owner = self.owners.get(site)?;
        if owner.broker == self.me {
            return None;
        }
        self.members.get_key_value(&owner.broker)
    }

    /// Every site held by another live broker
    /// ([`Fleet::live_holder_elsewhere`]), in site order.
    pub fn held_elsewhere(&self) -> impl Iterator<Item = (&SiteId, &BrokerId, &Member)> {
        self.owners.keys().filter_map(|site| {
            let (id, member) = self.live_holder_elsewhere(site)?;
            Some((site, id, member))
        })
    }

    /// The forwarding address of the broker holding `site`, when that is
    /// another live broker.
    pub fn forward_to(&self, site: &SiteId) -> Option<(&BrokerId, &str)> {
        let owner = self.owners.get(site)?;
        if owner.broker == self.me {
            return None;
        }
        let member = self.members.get(&owner.broker)?;
        Some((&owner.broker, member.forward.as_deref()?))
    }

    /// The endpoints a site of `region` should know: this broker's own
    /// first (`own`, the one it is talking to), then every other live
    /// broker serving the region, in id order; no endpoint twice.
    pub fn endpoints_for(&self, region: &RegionId, own: &[String]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let others = self
            .members
            .iter()
            .filter(|(id, m)| **id != self.me && m.regions.contains(region))
            .flat_map(|(_, m)| m.endpoints.iter());
        for e in own.iter().chain(others) {
            if !out.contains(e) {
                out.push(e.clone());
            }
        }
        out
    }

    /// Where gateway `gateway` of `region` reaches the WireGuard of every
    /// other live broker serving the region that has it registered, in id
    /// order.
    pub fn gateway_endpoints_for(
        &self,
        region: &RegionId,
        gateway: &crate::ids::GatewayId,
    ) -> Vec<String> {
        self.members
            .iter()
            .filter(|(id, m)| {
                **id != self.me
                    && m.regions.contains(region)
                    && m.gateways.iter().any(|g| g.id == *gateway)
            })
            .filter_map(|(_, m)| m.gateway_endpoint.clone())
            .collect()
    }

    fn check(&self, site: &SiteId) -> Vec<Decision> {
        match (self.claims.get(site), self.owners.get(site)) {
            (Some(Claim::At(mine)), Some(owner))
                if owner.broker != self.me && owner.revision > *mine =>
            {
                vec![Decision::EndSession(site.clone())]
            }
            _ => Vec::new(),
        }
    }
}

/// Maximum number of broker endpoints a site keeps.
pub const MAX_BROKERS: usize = 64;

/// The order a site dials its brokers in: the configured ones first, then
/// those the brokers told it about, with `lost` (the broker whose session
/// just ended) moved last, so that a dead broker does not delay the
/// failover to a live one. At most [`MAX_BROKERS`] endpoints, no endpoint
/// twice.
pub fn dial_order(configured: &[String], learned: &[String], lost: Option<&str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in configured.iter().chain(learned) {
        if !out.contains(e) && out.len() < MAX_BROKERS {
            out.push(e.clone());
        }
    }
    if let Some(lost) = lost
        && let Some(i) = out.iter().position(|e| e == lost)
    {
        let e = out.remove(i);
        out.push(e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(s: &str) -> SiteId {
        s.parse().unwrap_or_else(|_| panic!("bad site {s}"))
    }

    fn region(r: &str) -> RegionId {
        r.parse().unwrap_or_else(|_| panic!("bad region {r}"))
    }

    fn member(endpoint: &str, regions: &[&str]) -> Member {
        Member {
            endpoints: vec![endpoint.into()],
            regions: regions.iter().map(|r| region(r)).collect(),
            forward: Some(format!("fwd-{endpoint}")),
            link_key: None,
            link_proof: None,
            gateways: Vec::new(),
            link_keepalive_ms: None,
            gateway_endpoint: None,
        }
    }

    #[test]
    fn gateways_are_told_the_brokers_of_their_region_that_have_them_registered() {
        let gw: crate::ids::GatewayId = "gw-1".parse().unwrap();
        let with = |endpoint: &str, regions: &[&str], gateway: Option<&str>| Member {
            gateway_endpoint: gateway.map(str::to_string),
            gateways: vec![MemberGateway {
                id: gw.clone(),
                region: region("eu"),
                prefixes: Vec::new(),
            }],
            ..member(endpoint, regions)
        };
        let mut f = Fleet::new("me".into());
        f.handle_member(
            "me".into(),
            with("10.0.0.1:443", &["eu"], Some("10.0.0.1:51820")),
            1,
        );
        f.handle_member(
            "b".into(),
            with("10.0.0.2:443", &["eu"], Some("10.0.0.2:51820")),
            2,
        );
        // Another region, no gateway endpoint (an older release), the
        // gateway not registered: not listed.
        f.handle_member(
            "c".into(),
            with("10.0.0.3:443", &["us"], Some("10.0.0.3:51820")),
            3,
        );
        f.handle_member("d".into(), with("10.0.0.4:443", &["eu"], None), 4);
        f.handle_member(
            "e".into(),
            Member {
                gateway_endpoint: Some("10.0.0.5:51820".into()),
                ..member("10.0.0.5:443", &["eu"])
            },
            5,
        );
        assert_eq!(
            f.gateway_endpoints_for(&region("eu"), &gw),
            ["10.0.0.2:51820"]
        );
        f.handle_member_gone("b");
        assert!(f.gateway_endpoints_for(&region("eu"), &gw).is_empty());
    }

    #[test]
    fn sites_held_elsewhere_are_those_of_other_live_brokers() {
        let mut f = Fleet::new("me".into());
        f.handle_member("me".into(), member("10.0.0.1:443", &["eu"]), 1);
        f.handle_member("b".into(), member("10.0.0.2:443", &["eu"]), 2);
        f.handle_owner(site("here"), "me".into(), 3);
        f.handle_owner(site("there"), "b".into(), 4);
        // The key of a broker whose announcement is gone (not yet deleted
        // itself, or written by a broker that never announced).
        f.handle_owner(site("orphan"), "dead".into(), 5);
        let held: Vec<(&str, &str, &str)> = f
            .held_elsewhere()
            .map(|(s, id, m)| (s.as_str(), id.as_str(), m.endpoints[0].as_str()))
            .collect();
        assert_eq!(held, [("there", "b", "10.0.0.2:443")]);
        assert!(f.live_holder_elsewhere(&site("here")).is_none());
        assert!(f.live_holder_elsewhere(&site("orphan")).is_none());
        assert!(f.live_holder_elsewhere(&site("unknown")).is_none());
        // Its broker dies: the site is held nowhere.
        f.handle_member_gone("b");
        assert_eq!(f.held_elsewhere().count(), 0);
    }

    #[test]
    fn a_broker_restarted_with_its_link_key_is_reached_under_its_newest_announcement() {
        let linked = |key: &str| Member {
            link_key: Some(key.into()),
            ..member("10.0.0.1:443", &["eu"])
        };
        let mut f = Fleet::new("me".into());
        f.handle_member("me".into(), linked("k-me"), 1);
        f.handle_member("old".into(), linked("k1"), 2);
        f.handle_member("other".into(), linked("k2"), 3);
        let ids = |f: &Fleet| f.link_members().into_keys().cloned().collect::<Vec<_>>();
        assert_eq!(ids(&f), ["old", "other"]);
        // Restarted under a new id (an id that sorts first) while the old
        // announcement lives on: the new one is the peer.
        f.handle_member("new".into(), linked("k1"), 9);
        assert_eq!(ids(&f), ["new", "other"]);
        f.handle_member_gone("old");
        assert_eq!(ids(&f), ["new", "other"]);
        // A member without a link is never a peer.
        f.handle_member("plain".into(), member("10.0.0.4:443", &["eu"]), 10);
        assert_eq!(ids(&f), ["new", "other"]);
    }

    #[test]
    fn a_refused_record_with_a_brokers_key_does_not_hide_that_broker() {
        let linked = |key: &str| Member {
            link_key: Some(key.into()),
            ..member("10.0.0.1:443", &["eu"])
        };
        let mut f = Fleet::new("me".into());
        f.handle_member("real".into(), linked("k1"), 2);
        // A newer record announcing the same key, which the link refuses
        // (no valid proof): without the check it would be the peer.
        f.handle_member("forged".into(), linked("k1"), 9);
        let ids = |f: &Fleet, refuse: &str| {
            f.link_members_admitted(|id, _| id != refuse)
                .into_keys()
                .cloned()
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&f, ""), ["forged"]);
        assert_eq!(ids(&f, "forged"), ["real"]);
        assert_eq!(ids(&f, "real"), ["forged"]);
    }

    #[test]
    fn a_claim_is_written_only_while_the_lease_is_surely_held() {
        let t0 = Instant::now();
        let mut f = Fleet::new("a".into());
        assert!(!f.lease_held(t0), "no lease yet");
        f.handle_granted(t0, Duration::from_secs(5));
        assert!(f.lease_held(t0 + Duration::from_secs(4)));
        // Past the end, before the watchdog polled: no plain write.
        assert!(!f.lease_held(t0 + Duration::from_secs(5)));
        assert!(!f.poll(t0 + Duration::from_secs(6)).is_empty());
        // A late renewal does not end the fence; a new lease does.
        f.handle_renewed(t0 + Duration::from_secs(4), Duration::from_secs(5));
        assert!(!f.lease_held(t0 + Duration::from_secs(6)));
        f.handle_granted(t0 + Duration::from_secs(7), Duration::from_secs(5));
        assert!(f.lease_held(t0 + Duration::from_secs(8)));
    }

    #[test]
    fn a_site_is_held_with_a_written_claim_a_live_lease_and_no_newer_owner() {
        let t0 = Instant::now();
        let mut f = Fleet::new("a".into());
        f.handle_granted(t0, Duration::from_secs(5));
        f.handle_claim(site("s1"));
        assert!(!f.holds(&site("s1"), t0), "claim in flight");
        assert!(f.handle_claimed(&site("s1"), 10).is_empty());
        assert!(f.holds(&site("s1"), t0));
        assert!(
            !f.holds(&site("s1"), t0 + Duration::from_secs(5)),
            "lease over"
        );
        assert_eq!(
            f.handle_owner(site("s1"), "b".into(), 11),
            vec![Decision::EndSession(site("s1"))]
        );
        assert!(!f.holds(&site("s1"), t0), "taken over");
    }

    #[test]
    fn a_newer_owner_elsewhere_ends_the_session_here() {
        let mut f = Fleet::new("a".into());
        f.handle_claim(site("s1"));
        assert!(f.handle_claimed(&site("s1"), 10).is_empty());
        assert!(f.handle_owner(site("s1"), "a".into(), 10).is_empty());
        assert_eq!(
            f.handle_owner(site("s1"), "b".into(), 12),
            vec![Decision::EndSession(site("s1"))]
        );
    }

    #[test]
    fn an_owner_write_older_than_the_claim_here_is_stale() {
        let mut f = Fleet::new("a".into());
        f.handle_claim(site("s1"));
        // B's write (revision 7) arrives while A's claim is in flight.
        assert!(f.handle_owner(site("s1"), "b".into(), 7).is_empty());
        // A's claim lands after it: the site is here.
        assert!(f.handle_claimed(&site("s1"), 9).is_empty());
        assert!(f.handle_owner(site("s1"), "a".into(), 9).is_empty());
        assert_eq!(f.owner(&site("s1")).map(|o| o.broker.as_str()), Some("a"));
    }

    #[test]
    fn a_foreign_write_during_the_claim_is_decided_when_the_claim_lands() {
        let mut f = Fleet::new("a".into());
        f.handle_claim(site("s1"));
        assert!(f.handle_owner(site("s1"), "b".into(), 12).is_empty());
        assert_eq!(
            f.handle_claimed(&site("s1"), 9),
            vec![Decision::EndSession(site("s1"))]
        );
    }

    #[test]
    fn a_released_site_is_not_ended_again() {
        let mut f = Fleet::new("a".into());
        f.handle_claim(site("s1"));
        f.handle_released(&site("s1"));
        assert!(f.handle_claimed(&site("s1"), 3).is_empty());
        assert!(f.handle_owner(site("s1"), "b".into(), 5).is_empty());
        assert_eq!(f.claimed().count(), 0);
    }

    #[test]
    fn late_events_do_not_move_ownership_back() {
        let mut f = Fleet::new("c".into());
        f.handle_owner(site("s1"), "b".into(), 12);
        f.handle_owner(site("s1"), "a".into(), 9);
        assert_eq!(f.owner(&site("s1")).map(|o| o.broker.as_str()), Some("b"));
        f.handle_owner_gone(&site("s1"), 8);
        assert!(f.owner(&site("s1")).is_some());
        f.handle_owner_gone(&site("s1"), 13);
        assert!(f.owner(&site("s1")).is_none());
    }

    #[test]
    fn packets_for_a_site_held_elsewhere_go_to_that_broker() {
        let mut f = Fleet::new("a".into());
        f.handle_member("a".into(), member("10.0.0.1:443", &["eu"]), 1);
        f.handle_member("b".into(), member("10.0.0.2:443", &["eu"]), 2);
        f.handle_owner(site("s1"), "b".into(), 4);
        f.handle_owner(site("s2"), "a".into(), 5);
        f.handle_owner(site("s3"), "dead".into(), 6);
        assert_eq!(
            f.forward_to(&site("s1")),
            Some((&"b".to_string(), "fwd-10.0.0.2:443"))
        );
        assert_eq!(f.forward_to(&site("s2")), None, "held here");
        assert_eq!(f.forward_to(&site("s3")), None, "its broker is gone");
    }

    #[test]
    fn sites_learn_the_brokers_of_their_region_own_first() {
        let mut f = Fleet::new("b".into());
        let v0 = f.version();
        f.handle_member("b".into(), member("10.0.0.2:443", &["eu"]), 2);
        f.handle_member("a".into(), member("10.0.0.1:443", &["eu"]), 1);
        f.handle_member("c".into(), member("10.0.0.3:443", &["us"]), 3);
        assert!(f.version() > v0);
        assert_eq!(
            f.endpoints_for(&region("eu"), &["10.0.0.2:443".into()]),
            ["10.0.0.2:443", "10.0.0.1:443"]
        );
        let v1 = f.version();
        f.handle_member("a".into(), member("10.0.0.1:443", &["eu"]), 1);
        assert_eq!(f.version(), v1, "the same announcement changes nothing");
        f.handle_member_gone("a");
        assert!(f.version() > v1);
        assert_eq!(
            f.endpoints_for(&region("eu"), &["10.0.0.2:443".into()]),
            ["10.0.0.2:443"]
        );
    }

    #[test]
    fn a_lease_that_runs_out_moves_every_site_once() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(5);
        let mut f = Fleet::new("a".into());
        assert!(f.poll(t0 + ttl * 10).is_empty(), "no lease, no fence");
        f.handle_granted(t0, ttl);
        assert_eq!(f.last_renewal(), None, "granted, not yet renewed");
        f.handle_claim(site("s1"));
        f.handle_claimed(&site("s1"), 3);
        f.handle_claim(site("s2"));
        // Renewed at 2 s: held until 7 s.
        f.handle_renewed(t0 + Duration::from_secs(2), ttl);
        // A late answer to an older renewal does not shorten it.
        f.handle_renewed(t0 + Duration::from_secs(1), ttl);
        assert_eq!(f.lease_deadline(), Some(t0 + Duration::from_secs(7)));
        assert_eq!(f.last_renewal(), Some(t0 + Duration::from_secs(2)));
        assert!(f.poll(t0 + Duration::from_millis(6999)).is_empty());
        assert!(!f.is_fenced());
        assert_eq!(
            f.poll(t0 + Duration::from_secs(7)),
            vec![Decision::MoveSites(vec![site("s1"), site("s2")])]
        );
        assert!(f.is_fenced());
        // A site that moved ends its session here; one that stays is
        // claimed again under the next lease.
        f.handle_released(&site("s1"));
        assert_eq!(f.claimed().collect::<Vec<_>>(), [&site("s2")]);
        assert_eq!(f.lease_deadline(), None);
        assert!(f.poll(t0 + Duration::from_secs(8)).is_empty(), "once");
        // A renewal of the lost lease answered late does not end the fence.
        f.handle_renewed(t0 + Duration::from_secs(6), ttl);
        assert!(f.is_fenced());
        assert_eq!(f.last_renewal(), None, "fenced");
        // A session that opens while fenced is not moved again.
        f.handle_claim(site("s3"));
        assert!(f.poll(t0 + Duration::from_secs(9)).is_empty());
        // A new lease ends the fence; the next loss fences again.
        let t1 = t0 + Duration::from_secs(20);
        f.handle_granted(t1, ttl);
        assert!(!f.is_fenced());
        assert_eq!(f.lease_deadline(), Some(t1 + ttl));
        assert_eq!(f.last_renewal(), None, "a new lease is not yet renewed");
        assert_eq!(
            f.poll(t1 + ttl),
            vec![Decision::MoveSites(vec![site("s2"), site("s3")])]
        );
    }

    #[test]
    fn a_lease_the_store_says_expired_fences_at_once() {
        let t0 = Instant::now();
        let mut f = Fleet::new("a".into());
        f.handle_granted(t0, Duration::from_secs(5));
        f.handle_claim(site("s1"));
        assert_eq!(
            f.handle_lease_lost(t0 + Duration::from_secs(1)),
            vec![Decision::MoveSites(vec![site("s1")])]
        );
    }

    #[test]
    fn a_claim_refused_under_the_new_lease_ends_the_session() {
        let mut f = Fleet::new("a".into());
        f.handle_claim(site("s1"));
        assert_eq!(
            f.handle_claim_refused(&site("s1"), "b".into(), 40),
            vec![Decision::EndSession(site("s1"))]
        );
        assert_eq!(f.owner(&site("s1")).map(|o| o.broker.as_str()), Some("b"));
        assert_eq!(f.claimed().count(), 0);
        assert!(
            f.handle_claim_refused(&site("s1"), "b".into(), 40)
                .is_empty(),
            "released meanwhile: nothing to end"
        );
    }

    #[test]
    fn the_previous_holder_outlives_its_expired_owner_key() {
        let mut f = Fleet::new("a".into());
        f.handle_owner(site("s1"), "b".into(), 5);
        assert_eq!(f.previous_holder(&site("s1")), Some(&"b".to_string()));
        // b died: its lease expired and etcd deleted its key.
        f.handle_owner_gone(&site("s1"), 6);
        assert_eq!(f.previous_holder(&site("s1")), Some(&"b".to_string()));
        // The site connects here: held here now.
        f.handle_owner(site("s1"), "a".into(), 7);
        assert_eq!(f.previous_holder(&site("s1")), None);
        f.handle_owner_gone(&site("s1"), 8);
        assert_eq!(f.previous_holder(&site("s1")), None);
        assert_eq!(f.previous_holder(&site("s2")), None);
    }

    #[test]
    fn only_a_site_held_here_last_is_readmitted_without_the_store() {
        let mut f = Fleet::new("a".into());
        let t0 = Instant::now();
        f.handle_granted(t0, Duration::from_secs(5));
        // Held here: the owner key this broker wrote, seen in the watch,
        // with the session ended since (the release was not written).
        f.handle_claim(site("s1"));
        f.handle_claimed(&site("s1"), 10);
        f.handle_owner(site("s1"), "a".into(), 10);
        f.handle_released(&site("s1"));
        // A session here whose claim is still to be written.
        f.handle_claim(site("s2"));
        // Held by another broker, and a site no broker held.
        f.handle_owner(site("s3"), "b".into(), 11);
        // Held here once, then taken over by b (newer write).
        f.handle_claim(site("s4"));
        f.handle_claimed(&site("s4"), 12);
        f.handle_owner(site("s4"), "b".into(), 13);
        // The lease runs out: the store is gone.
        assert!(!f.poll(t0 + Duration::from_secs(6)).is_empty());
        for peers in [Peers::Heard, Peers::Unknown] {
            assert_eq!(f.readmit_offline(&site("s1"), peers), Readmit::Held);
            assert_eq!(f.readmit_offline(&site("s2"), peers), Readmit::Held);
            assert_eq!(
                f.readmit_offline(&site("s3"), peers),
                Readmit::HeldElsewhere("b".into())
            );
            assert_eq!(
                f.readmit_offline(&site("s4"), peers),
                Readmit::HeldElsewhere("b".into())
            );
            assert_eq!(f.readmit_offline(&site("s5"), peers), Readmit::NotHeld);
        }
    }

    /// Broker `a` holding `s1` (claim written, seen in the watch) and
    /// `s2` (the same), fenced when its lease runs out.
    fn fenced_with_two_sites() -> Fleet {
        let t0 = Instant::now();
        let mut f = Fleet::new("a".into());
        f.handle_member("a".into(), member("10.0.0.1:443", &["eu"]), 1);
        f.handle_member("b".into(), member("10.0.0.2:443", &["eu"]), 2);
        f.handle_granted(t0, Duration::from_secs(5));
        for (s, rev) in [("s1", 10), ("s2", 11)] {
            f.handle_claim(site(s));
            f.handle_claimed(&site(s), rev);
            f.handle_owner(site(s), "a".into(), rev);
        }
        assert_eq!(
            f.poll(t0 + Duration::from_secs(5)),
            vec![Decision::MoveSites(vec![site("s1"), site("s2")])]
        );
        f
    }

    #[test]
    fn a_site_that_left_a_broker_the_others_dropped_is_not_readmitted_there() {
        // Cut off from the store alone: s1 moved when asked (its session
        // here ended), s2 found no other broker and stayed.
        let mut f = fenced_with_two_sites();
        f.handle_released(&site("s1"));
        // The other brokers reach the store: they dropped this broker
        // (its lease expired there) and went silent on the link. s1 may be
        // held by one of them now; s2 is still here.
        assert_eq!(f.readmit_offline(&site("s1"), Peers::Silent), Readmit::Left);
        assert_eq!(f.readmit_offline(&site("s2"), Peers::Silent), Readmit::Held);
        // A site no broker held, or another held, is refused as before.
        assert_eq!(
            f.readmit_offline(&site("s9"), Peers::Silent),
            Readmit::NotHeld
        );
        // s1 is served here again (a new session opens: the shell found
        // it held when the others could still be heard): it is held.
        f.handle_claim(site("s1"));
        assert_eq!(f.readmit_offline(&site("s1"), Peers::Silent), Readmit::Held);
    }

    /// What a gateway's ping to a broker with `fleet` gets: "leaving" while
    /// the broker's gateways must leave, else a pong.
    fn answer_ping(
        gateway: &mut crate::gateway::failover::Failover,
        broker: usize,
        fleet: &Fleet,
        now: Instant,
    ) {
        if fleet.gateways_leave() {
            gateway.handle_leaving(broker, now);
        } else {
            gateway.handle_pong(broker, now);
        }
    }

    #[test]
    fn a_gateway_leaves_a_fenced_broker_and_counts_it_again_under_its_next_lease() {
        use crate::gateway::failover::Failover;
        let t0 = Instant::now();
        let ttl = Duration::from_secs(5);
        let mut brokers = [Fleet::new("a".into()), Fleet::new("b".into())];
        for b in &mut brokers {
            b.handle_granted(t0, ttl);
        }
        let mut gw = Failover::new(2, t0);
        for (i, b) in brokers.iter().enumerate() {
            answer_ping(&mut gw, i, b, t0);
        }
        assert_eq!(gw.target(), 0);
        // Broker a alone is cut off from the store: fenced, its gateways
        // go to b at once.
        let t1 = t0 + Duration::from_secs(4);
        brokers[1].handle_renewed(t1, ttl);
        assert!(!brokers[0].poll(t0 + ttl).is_empty());
        answer_ping(&mut gw, 0, &brokers[0], t0 + ttl);
        answer_ping(&mut gw, 1, &brokers[1], t0 + ttl);
        assert_eq!(gw.target(), 1);
        assert!(!gw.is_up(0));
        // a reaches the store again: it pongs, the gateway counts it up
        // (traffic stays on b until b goes, no flapping).
        let t2 = t0 + Duration::from_secs(8);
        brokers[0].handle_granted(t2, ttl);
        answer_ping(&mut gw, 0, &brokers[0], t2);
        assert!(gw.is_up(0));
        assert_eq!(gw.target(), 1);
        // Now the store is down for both: both fenced, both say leaving;
        // the gateway has nowhere better to go and stays.
        assert!(!brokers[1].poll(t2 + ttl * 2).is_empty());
        answer_ping(&mut gw, 1, &brokers[1], t2 + ttl * 2);
        assert_eq!(gw.target(), 0, "a is up and not fenced yet");
        assert!(!brokers[0].poll(t2 + ttl * 2).is_empty());
        answer_ping(&mut gw, 0, &brokers[0], t2 + ttl * 2);
        assert_eq!(gw.target(), 0, "every broker fenced: the traffic stays");
    }

    #[test]
    fn the_others_are_silent_only_when_every_one_is_down() {
        assert_eq!(Peers::from_down([]), Peers::Unknown);
        assert_eq!(Peers::from_down([true, true]), Peers::Silent);
        assert_eq!(Peers::from_down([true, false]), Peers::Heard);
        assert_eq!(Peers::from_down([false]), Peers::Heard);
    }

    #[test]
    fn a_site_that_left_while_the_store_is_down_for_every_broker_comes_back_here() {
        // The store is down for all: the move was refused everywhere, and
        // the agent of s1 then died (its session here ended). The others
        // still talk to this broker over the link: their views are frozen
        // too and route s1 here, so it is served again on its return.
        let mut f = fenced_with_two_sites();
        f.handle_released(&site("s1"));
        assert_eq!(f.readmit_offline(&site("s1"), Peers::Heard), Readmit::Held);
        // Alone (or without a link), nothing says the others moved on.
        assert_eq!(
            f.readmit_offline(&site("s1"), Peers::Unknown),
            Readmit::Held
        );
    }

    #[test]
    fn gateways_are_told_to_leave_while_fenced_and_not_after_a_new_lease() {
        let t0 = Instant::now();
        let mut f = Fleet::new("a".into());
        assert!(!f.gateways_leave(), "no lease yet: nothing to leave");
        f.handle_granted(t0, Duration::from_secs(5));
        assert!(!f.gateways_leave());
        assert!(!f.poll(t0 + Duration::from_secs(5)).is_empty());
        assert!(f.gateways_leave(), "fenced");
        // A late renewal of the lost lease changes nothing.
        f.handle_renewed(t0 + Duration::from_secs(4), Duration::from_secs(5));
        assert!(f.gateways_leave());
        f.handle_granted(t0 + Duration::from_secs(9), Duration::from_secs(5));
        assert!(!f.gateways_leave(), "held again: pongs resume");
    }

    #[test]
    fn the_lost_broker_is_dialed_last() {
        let configured = vec!["a:443".to_string()];
        let learned = vec!["a:443".to_string(), "b:443".into(), "c:443".into()];
        assert_eq!(
            dial_order(&configured, &learned, None),
            ["a:443", "b:443", "c:443"]
        );
        assert_eq!(
            dial_order(&configured, &learned, Some("a:443")),
            ["b:443", "c:443", "a:443"]
        );
        let many: Vec<String> = (0..100).map(|i| format!("h{i}:443")).collect();
        assert_eq!(dial_order(&[], &many, None).len(), MAX_BROKERS);
    }
}
