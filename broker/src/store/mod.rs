//! The broker's state store.
//!
//! [`Store`] is the interface: compare-and-set commits for address leases
//! (one version per region, see [`tether_proto::ipam`]), an atomic take for
//! enrollment tokens, plain records for sites, issued certificates and
//! revocations, each site's bounded event timeline, and a watch of changes. Two backends implement it:
//!
//! - [`RedbStore`] ([`redb`](self::redb)): an embedded, pure-Rust
//!   transactional database in the data directory, for one broker; every
//!   commit is durable when it returns, so a `kill -9` loses nothing that was
//!   acknowledged and can never hand out an address twice.
//! - [`EtcdStore`] ([`etcd`]): a shared etcd cluster under a key prefix;
//!   every lease commit and every token redemption is one etcd transaction
//!   guarded by a compare, so brokers sharing the cluster never hand out an
//!   address twice nor redeem a token twice. The key layout is described
//!   there and in `docs/architecture.md`.
//!
//! [`open`] picks the backend the configuration names; [`migrate`] copies an
//! embedded store into etcd.

pub mod etcd;
#[cfg(test)]
mod etcd_server;
#[cfg(test)]
mod etcd_tests;
mod group;
mod migrate;
pub mod redb;

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tether_config::broker::StoreConfig;
use tether_pki::token::{TokenHash, TokenLedger, TokenRecord, from_unix_secs, unix_secs};
use tether_pki::{Revoked, SiteIdentity, TrustDomain};
use tether_proto::events::{SiteEvent, Timeline};
use tether_proto::ids::{RegionId, SiteId};
use tether_proto::ipam::{Conflict, RegionLeases, Txn};
use thiserror::Error;
use tokio::sync::broadcast;

pub use self::etcd::EtcdStore;
pub use self::migrate::{MigrationReport, migrate};
pub use self::redb::RedbStore;

/// The store failed (I/O, corruption). Conflicts are not errors.
#[derive(Debug, Error)]
#[error("store: {0}")]
pub struct StoreError(pub String);

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError(format!("corrupt record: {e}"))
    }
}

/// What the store knows about a site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRecord {
    /// The site.
    pub site: SiteId,
    /// Its region.
    pub region: RegionId,
    /// When it was first registered (token created), Unix seconds.
    pub created: u64,
    /// When it last enrolled, Unix seconds.
    pub enrolled: Option<u64>,
    /// Whether it is revoked.
    pub revoked: bool,
    /// When the operator last revoked it, Unix seconds (for the words a
    /// refused site logs; records written before this was kept have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
}

/// A certificate the broker issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    /// Serial number, lowercase hex.
    pub serial: String,
    /// The site.
    pub site: SiteId,
    /// Its region.
    pub region: RegionId,
    /// Expiry, Unix seconds.
    pub not_after: u64,
    /// SHA-256 of the certified key (its subject public key info),
    /// lowercase hex: what a site whose certificate expired proves it
    /// holds to re-attest. Absent in records written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spki_sha256: Option<String>,
}

/// A change, as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// A region's leases changed.
    Leases(RegionId),
    /// A site record changed.
    Site(SiteId),
    /// A revocation was added.
    Revoked(Revoked),
    /// A revocation was removed.
    Reinstated(Revoked),
    /// A site's event timeline changed (etcd only: with the embedded
    /// store, the one broker knows its own events).
    Events(SiteId),
    /// The CA state (rotation phase, trust bundle) changed.
    Ca,
    /// Changes were missed (the store's history since the last one seen
    /// was compacted away): watchers must read the store again
    /// (`Broker::resync_from_store`).
    Lost,
}

/// The broker's state store.
pub trait Store: TokenLedger + Send + Sync + 'static {
    /// A region's leases at its current version.
    fn region_leases(&self, region: &RegionId) -> Result<RegionLeases, StoreError>;
    /// A region's current lease version alone (0 before its first commit):
    /// one key, where [`region_leases`](Self::region_leases) reads every
    /// lease of the region.
    fn lease_version(&self, region: &RegionId) -> Result<u64, StoreError>;
    /// Applies `txn` if the region is still at `txn.expected_version`.
    fn commit_leases(&self, txn: &Txn) -> Result<Result<(), Conflict>, StoreError>;
    /// A site record.
    fn site(&self, site: &SiteId) -> Result<Option<SiteRecord>, StoreError>;
    /// Every site record.
    fn sites(&self) -> Result<Vec<SiteRecord>, StoreError>;
    /// Creates or replaces a site record.
    fn put_site(&self, record: &SiteRecord) -> Result<(), StoreError>;
    /// Records an issued certificate.
    fn put_cert(&self, record: &CertRecord) -> Result<(), StoreError>;
    /// The certificates issued to a site.
    fn certs_of(&self, site: &SiteId) -> Result<Vec<CertRecord>, StoreError>;
    /// Adds a revocation.
    fn revoke(&self, entry: &Revoked) -> Result<(), StoreError>;
    /// Removes a revocation.
    fn reinstate(&self, entry: &Revoked) -> Result<(), StoreError>;
    /// Every revocation.
    fn revocations(&self) -> Result<Vec<Revoked>, StoreError>;
    /// Whether this revocation is stored (one read, where the broker
    /// decides on a single certificate).
    fn is_revoked(&self, entry: &Revoked) -> Result<bool, StoreError>;
    /// Appends an event to a site's timeline, dropping its oldest events
    /// beyond `limit` ([`Timeline::push`]).
    fn append_event(
        &self,
        site: &SiteId,
        event: &SiteEvent,
        limit: usize,
    ) -> Result<(), StoreError>;
    /// A site's timeline (empty when it has none).
    fn timeline(&self, site: &SiteId) -> Result<Timeline, StoreError>;
    /// Every site's timeline (for the broker's summary at start).
    fn timelines(&self) -> Result<Vec<(SiteId, Timeline)>, StoreError>;
    /// The CA state (CA certificates and keys, rotation phase), as the
    /// JSON text of a [`tether_pki::rotation::CaState`], if stored.
    fn ca_state(&self) -> Result<Option<String>, StoreError>;
    /// Replaces the CA state if it still is `expected` (`None`: none
    /// stored). Returns whether it was replaced; brokers sharing the store
    /// thus never overwrite each other's rotation step.
    fn swap_ca_state(&self, expected: Option<&str>, new: &str) -> Result<bool, StoreError>;
    /// Changes from now on.
    fn watch(&self) -> broadcast::Receiver<StoreEvent>;
    /// A consistent snapshot of everything, for `tether-broker backup`.
    /// Only the embedded store makes one; etcd has `etcdctl snapshot`.
    fn snapshot(&self) -> Result<self::redb::Dump, StoreError> {
        Err(StoreError(
            "this broker's state is in etcd: back it up with `etcdctl snapshot save` (see docs/operations.md)".into(),
        ))
    }
}

/// The stored form of a token record.
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredToken {
    site: SiteId,
    region: RegionId,
    created: u64,
    expires: u64,
    /// A newer token exists for the same site.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    replaced: bool,
}

/// The stored form of a revocation.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum StoredRevocation {
    Site {
        identity: String,
        trust_domain: TrustDomain,
    },
    Serial {
        serial: String,
    },
}

pub(crate) fn revocation_key(entry: &Revoked) -> String {
    match entry {
        Revoked::Site(id) => format!("site:{}", id.uri()),
        Revoked::Serial(serial) => format!("serial:{}", data_encoding::HEXLOWER.encode(serial)),
    }
}

impl StoredToken {
    pub(crate) fn from_record(record: &TokenRecord) -> Self {
        Self {
            site: record.site.clone(),
            region: record.region.clone(),
            created: unix_secs(record.created_at),
            expires: unix_secs(record.expires_at),
            replaced: record.replaced,
        }
    }

    pub(crate) fn into_record(self, hash: TokenHash) -> TokenRecord {
        TokenRecord {
            hash,
            site: self.site,
            region: self.region,
            created_at: from_unix_secs(self.created),
            expires_at: from_unix_secs(self.expires),
            replaced: self.replaced,
        }
    }
}

impl StoredRevocation {
    pub(crate) fn from_entry(entry: &Revoked) -> Self {
        match entry {
            Revoked::Site(id) => StoredRevocation::Site {
                identity: id.uri(),
                trust_domain: id.trust_domain.clone(),
            },
            Revoked::Serial(serial) => StoredRevocation::Serial {
                serial: data_encoding::HEXLOWER.encode(serial),
            },
        }
    }

    pub(crate) fn into_entry(self) -> Result<Revoked, StoreError> {
        match self {
            StoredRevocation::Site {
                identity,
                trust_domain,
            } => {
                let id = SiteIdentity::parse(&identity, &trust_domain)
                    .map_err(|e| StoreError(format!("corrupt revocation: {e}")))?;
                Ok(Revoked::Site(id))
            }
            StoredRevocation::Serial { serial } => {
                let bytes = data_encoding::HEXLOWER
                    .decode(serial.as_bytes())
                    .map_err(|e| StoreError(format!("corrupt revocation: {e}")))?;
                Ok(Revoked::Serial(bytes))
            }
        }
    }
}

/// Everything a store holds, as [`migrate`] copies it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreContents {
    /// Every region's leases, with its version.
    pub leases: Vec<(RegionId, RegionLeases)>,
    /// Site records.
    pub sites: Vec<SiteRecord>,
    /// Issued certificates.
    pub certs: Vec<CertRecord>,
    /// Revocations.
    pub revocations: Vec<Revoked>,
    /// Enrollment tokens not yet redeemed (expired ones included; callers
    /// filter).
    pub tokens: Vec<TokenRecord>,
    /// The CA state as stored (its keys sealed), if any.
    pub ca: Option<String>,
}

/// Opens the store the configuration names: the embedded one in
/// `data_dir`, or etcd.
pub fn open(config: &StoreConfig, data_dir: &Path) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match config {
        StoreConfig::Embedded => Arc::new(RedbStore::open(&data_dir.join(EMBEDDED_FILE))?),
        StoreConfig::Etcd(etcd) => Arc::new(EtcdStore::open(etcd)?),
    })
}

/// File of the embedded store in the data directory.
pub const EMBEDDED_FILE: &str = "store.redb";

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> u64 {
    unix_secs(SystemTime::now())
}

/// Checks the CA state's compare-and-swap: the first writer wins, a
/// writer holding a stale value is refused, and nothing is lost.
#[cfg(test)]
pub(crate) fn check_the_ca_state_is_swapped_only_from_what_was_read(store: &dyn Store) {
    assert_eq!(store.ca_state().unwrap(), None);
    assert!(store.swap_ca_state(None, "first").unwrap());
    assert!(!store.swap_ca_state(None, "second").unwrap());
    assert!(!store.swap_ca_state(Some("stale"), "second").unwrap());
    assert_eq!(store.ca_state().unwrap().as_deref(), Some("first"));
    assert!(store.swap_ca_state(Some("first"), "second").unwrap());
    assert_eq!(store.ca_state().unwrap().as_deref(), Some("second"));
}

/// Checks that a ledger keeps one valid code per site: a second token for
/// a site invalidates the first, which then says it was replaced, while
/// other sites' tokens stay valid.
#[cfg(test)]
pub(crate) fn check_a_newer_token_replaces_the_earlier_one(ledger: &dyn TokenLedger) {
    use std::time::Duration;
    use tether_pki::token::{RedeemError, generate, redeem};
    let now = SystemTime::now();
    let (site, other) = (
        SiteId::new("ward-1").unwrap(),
        SiteId::new("ward-2").unwrap(),
    );
    let region = RegionId::new("eu").unwrap();
    let ttl = Duration::from_secs(600);
    let first = generate(site.clone(), region.clone(), now, ttl);
    let neighbour = generate(other, region.clone(), now, ttl);
    ledger.put(first.record.clone()).unwrap();
    ledger.put(neighbour.record.clone()).unwrap();
    let second = generate(site.clone(), region.clone(), now, ttl);
    ledger.put(second.record.clone()).unwrap();
    let third = generate(site, region, now, ttl);
    ledger.put(third.record.clone()).unwrap();
    let err = redeem(ledger, &first.secret, now).unwrap_err();
    assert_eq!(err, RedeemError::Replaced);
    assert!(
        err.to_string()
            .contains("this code was replaced by a newer one for the same site"),
        "{err}"
    );
    assert_eq!(
        redeem(ledger, &second.secret, now).unwrap_err(),
        RedeemError::Replaced
    );
    // A replaced code is consumed like any other: it cannot be retried.
    assert_eq!(
        redeem(ledger, &first.secret, now).unwrap_err(),
        RedeemError::Unknown
    );
    assert_eq!(
        redeem(ledger, &third.secret, now).unwrap().hash,
        third.record.hash
    );
    assert_eq!(
        redeem(ledger, &neighbour.secret, now).unwrap().hash,
        neighbour.record.hash
    );
}

/// Checks that a store keeps each site's newest events up to the limit,
/// in order, apart from other sites' and across concurrent writers (two
/// threads appending to one timeline lose nothing).
#[cfg(test)]
pub(crate) fn check_event_timelines(store: Arc<dyn Store>) {
    use tether_proto::events::{Disconnect, EventKind};
    let (a, b) = (
        SiteId::new("ward-1").unwrap(),
        SiteId::new("ward-2").unwrap(),
    );
    let event = |at| SiteEvent {
        at,
        broker: "b1".into(),
        kind: EventKind::Disconnected {
            reason: Disconnect::ConnectionLost,
            detail: None,
        },
    };
    assert!(store.timeline(&a).unwrap().is_empty());
    for at in 0..12 {
        store.append_event(&a, &event(at), 10).unwrap();
    }
    store.append_event(&b, &event(100), 10).unwrap();
    let ats = |t: &Timeline| t.events().map(|e| e.at).collect::<Vec<_>>();
    assert_eq!(
        ats(&store.timeline(&a).unwrap()),
        (2..12).collect::<Vec<_>>()
    );
    assert_eq!(ats(&store.timeline(&b).unwrap()), [100]);
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (store, b) = (store.clone(), b.clone());
            std::thread::spawn(move || {
                for i in 0..5 {
                    store
                        .append_event(&b, &event(1000 * (w + 1) + i), 100)
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    // More sites than one page of a paged read holds.
    for n in 3..=7 {
        let site = SiteId::new(format!("ward-{n}")).unwrap();
        store.append_event(&site, &event(n), 10).unwrap();
    }
    let mut all = store.timelines().unwrap();
    all.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(all.len(), 7);
    assert_eq!(ats(&all[6].1), [7]);
    assert_eq!(all[0].1.len(), 10);
    let mut seen = ats(&all[1].1);
    assert_eq!(seen.len(), 11, "{seen:?}");
    seen.sort();
    assert_eq!(
        seen,
        [
            100, 1000, 1001, 1002, 1003, 1004, 2000, 2001, 2002, 2003, 2004
        ]
    );
}
