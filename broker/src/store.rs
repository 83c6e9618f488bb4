//! The broker's state store.
//!
//! [`Store`] is the interface: compare-and-set commits for address leases
//! (one version per region, see [`tether_proto::ipam`]), an atomic take for
//! enrollment tokens, plain records for sites, issued certificates and
//! revocations, and a watch of changes. [`RedbStore`] implements it on an
//! embedded, pure-Rust transactional database in the data directory; every
//! commit is durable when it returns, so a `kill -9` loses nothing that was
//! acknowledged and can never hand out an address twice. An etcd
//! implementation maps each method to one etcd transaction (compare the
//! region's version key, then put).

use std::path::Path;
use std::time::SystemTime;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tether_pki::token::{TokenHash, TokenLedger, TokenRecord, from_unix_secs, unix_secs};
use tether_pki::{Revoked, SiteIdentity, TrustDomain};
use tether_proto::ids::{RegionId, SiteId};
use tether_proto::ipam::{Conflict, Lease, RegionLeases, Txn};
use thiserror::Error;
use tokio::sync::broadcast;

/// The store failed (I/O, corruption). Conflicts are not errors.
#[derive(Debug, Error)]
#[error("store: {0}")]
pub struct StoreError(pub String);

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError(e.to_string())
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::from(redb::Error::from(e))
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

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
}

/// The broker's state store.
pub trait Store: TokenLedger + Send + Sync + 'static {
    /// A region's leases at its current version.
    fn region_leases(&self, region: &RegionId) -> Result<RegionLeases, StoreError>;
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
    /// Changes from now on.
    fn watch(&self) -> broadcast::Receiver<StoreEvent>;
}

const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
const LEASE_VERSIONS: TableDefinition<&str, u64> = TableDefinition::new("lease_versions");
const SITES: TableDefinition<&str, &[u8]> = TableDefinition::new("sites");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const CERTS: TableDefinition<&str, &[u8]> = TableDefinition::new("certs");
const REVOCATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("revocations");

/// The stored form of a token record.
#[derive(Serialize, Deserialize)]
struct StoredToken {
    site: SiteId,
    region: RegionId,
    created: u64,
    expires: u64,
}

/// The stored form of a revocation.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum StoredRevocation {
    Site {
        identity: String,
        trust_domain: TrustDomain,
    },
    Serial {
        serial: String,
    },
}

fn revocation_key(entry: &Revoked) -> String {
    match entry {
        Revoked::Site(id) => format!("site:{}", id.uri()),
        Revoked::Serial(serial) => format!("serial:{}", data_encoding::HEXLOWER.encode(serial)),
    }
}

fn lease_key(region: &RegionId, lease_prefix: &ipnet::IpNet) -> String {
    format!("{region}/{lease_prefix}")
}

/// [`Store`] on redb.
pub struct RedbStore {
    db: Database,
    events: broadcast::Sender<StoreEvent>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedbStore")
    }
}

impl RedbStore {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError(format!(
                "{} is in use by another process (is another tether-broker running with the same data directory?)",
                path.display()
            )),
            e => StoreError(format!("{}: {e}", path.display())),
        })?;
        let txn = db.begin_write()?;
        txn.open_table(LEASES)?;
        txn.open_table(LEASE_VERSIONS)?;
        txn.open_table(SITES)?;
        txn.open_table(TOKENS)?;
        txn.open_table(CERTS)?;
        txn.open_table(REVOCATIONS)?;
        txn.commit()?;
        let (events, _) = broadcast::channel(1024);
        Ok(Self { db, events })
    }

    fn notify(&self, event: StoreEvent) {
        let _ = self.events.send(event);
    }
}

impl Store for RedbStore {
    fn region_leases(&self, region: &RegionId) -> Result<RegionLeases, StoreError> {
        let txn = self.db.begin_read()?;
        let versions = txn.open_table(LEASE_VERSIONS)?;
        let version = versions
            .get(region.as_str())?
            .map(|v| v.value())
            .unwrap_or(0);
        let table = txn.open_table(LEASES)?;
        let prefix = format!("{region}/");
        let mut leases = Vec::new();
        for entry in table.range(prefix.as_str()..)? {
            let (key, value) = entry?;
            if !key.value().starts_with(&prefix) {
                break;
            }
            leases.push(serde_json::from_slice::<Lease>(value.value())?);
        }
        Ok(RegionLeases::from_parts(version, leases))
    }

    fn commit_leases(&self, txn: &Txn) -> Result<Result<(), Conflict>, StoreError> {
        let write = self.db.begin_write()?;
        {
            let mut versions = write.open_table(LEASE_VERSIONS)?;
            let found = versions
                .get(txn.region.as_str())?
                .map(|v| v.value())
                .unwrap_or(0);
            if found != txn.expected_version {
                drop(versions);
                write.abort()?;
                return Ok(Err(Conflict {
                    expected: txn.expected_version,
                    found,
                }));
            }
            versions.insert(txn.region.as_str(), found + 1)?;
            let mut leases = write.open_table(LEASES)?;
            for prefix in &txn.delete {
                leases.remove(lease_key(&txn.region, prefix).as_str())?;
            }
            for lease in &txn.put {
                let value = serde_json::to_vec(lease)?;
                leases.insert(
                    lease_key(&txn.region, &lease.prefix).as_str(),
                    value.as_slice(),
                )?;
            }
        }
        write.commit()?;
        self.notify(StoreEvent::Leases(txn.region.clone()));
        Ok(Ok(()))
    }

    fn site(&self, site: &SiteId) -> Result<Option<SiteRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SITES)?;
        let value = table.get(site.as_str())?;
        Ok(match value {
            Some(v) => Some(serde_json::from_slice(v.value())?),
            None => None,
        })
    }

    fn sites(&self) -> Result<Vec<SiteRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SITES)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (_, value) = entry?;
            out.push(serde_json::from_slice(value.value())?);
        }
        Ok(out)
    }

    fn put_site(&self, record: &SiteRecord) -> Result<(), StoreError> {
        let write = self.db.begin_write()?;
        {
            let mut table = write.open_table(SITES)?;
            table.insert(record.site.as_str(), serde_json::to_vec(record)?.as_slice())?;
        }
        write.commit()?;
        self.notify(StoreEvent::Site(record.site.clone()));
        Ok(())
    }

    fn put_cert(&self, record: &CertRecord) -> Result<(), StoreError> {
        let write = self.db.begin_write()?;
        {
            let mut table = write.open_table(CERTS)?;
            table.insert(
                record.serial.as_str(),
                serde_json::to_vec(record)?.as_slice(),
            )?;
        }
        write.commit()?;
        Ok(())
    }

    fn certs_of(&self, site: &SiteId) -> Result<Vec<CertRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CERTS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (_, value) = entry?;
            let record: CertRecord = serde_json::from_slice(value.value())?;
            if &record.site == site {
                out.push(record);
            }
        }
        Ok(out)
    }

    fn revoke(&self, entry: &Revoked) -> Result<(), StoreError> {
        let stored = match entry {
            Revoked::Site(id) => StoredRevocation::Site {
                identity: id.uri(),
                trust_domain: id.trust_domain.clone(),
            },
            Revoked::Serial(serial) => StoredRevocation::Serial {
                serial: data_encoding::HEXLOWER.encode(serial),
            },
        };
        let write = self.db.begin_write()?;
        {
            let mut table = write.open_table(REVOCATIONS)?;
            table.insert(
                revocation_key(entry).as_str(),
                serde_json::to_vec(&stored)?.as_slice(),
            )?;
        }
        write.commit()?;
        self.notify(StoreEvent::Revoked(entry.clone()));
        Ok(())
    }

    fn reinstate(&self, entry: &Revoked) -> Result<(), StoreError> {
        let write = self.db.begin_write()?;
        {
            let mut table = write.open_table(REVOCATIONS)?;
            table.remove(revocation_key(entry).as_str())?;
        }
        write.commit()?;
        Ok(())
    }

    fn revocations(&self) -> Result<Vec<Revoked>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(REVOCATIONS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (_, value) = entry?;
            match serde_json::from_slice::<StoredRevocation>(value.value())? {
                StoredRevocation::Site {
                    identity,
                    trust_domain,
                } => {
                    let id = SiteIdentity::parse(&identity, &trust_domain)
                        .map_err(|e| StoreError(format!("corrupt revocation: {e}")))?;
                    out.push(Revoked::Site(id));
                }
                StoredRevocation::Serial { serial } => {
                    let bytes = data_encoding::HEXLOWER
                        .decode(serial.as_bytes())
                        .map_err(|e| StoreError(format!("corrupt revocation: {e}")))?;
                    out.push(Revoked::Serial(bytes));
                }
            }
        }
        Ok(out)
    }

    fn watch(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }
}

impl TokenLedger for RedbStore {
    fn put(&self, record: TokenRecord) -> Result<(), String> {
        let stored = StoredToken {
            site: record.site,
            region: record.region,
            created: unix_secs(record.created_at),
            expires: unix_secs(record.expires_at),
        };
        let run = || -> Result<(), StoreError> {
            let write = self.db.begin_write()?;
            {
                let mut table = write.open_table(TOKENS)?;
                table.insert(
                    record.hash.to_hex().as_str(),
                    serde_json::to_vec(&stored)?.as_slice(),
                )?;
            }
            write.commit()?;
            Ok(())
        };
        run().map_err(|e| e.to_string())
    }

    fn take(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, String> {
        // redb runs one write transaction at a time: of concurrent takers,
        // exactly one sees the record.
        let run = || -> Result<Option<TokenRecord>, StoreError> {
            let write = self.db.begin_write()?;
            let removed = {
                let mut table = write.open_table(TOKENS)?;
                let removed = table.remove(hash.to_hex().as_str())?;
                match removed {
                    Some(v) => Some(serde_json::from_slice::<StoredToken>(v.value())?),
                    None => None,
                }
            };
            write.commit()?;
            Ok(removed.map(|t| TokenRecord {
                hash: *hash,
                site: t.site,
                region: t.region,
                created_at: from_unix_secs(t.created),
                expires_at: from_unix_secs(t.expires),
            }))
        };
        run().map_err(|e| e.to_string())
    }
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> u64 {
    unix_secs(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;
    use tether_proto::ipam::{Ipam, Plan};
    use tether_proto::net::Family;

    fn open() -> (tempfile::TempDir, RedbStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("store.redb")).unwrap();
        (dir, store)
    }

    #[test]
    fn leases_commit_with_compare_and_set_and_survive_reopen() {
        let (dir, store) = open();
        let region = RegionId::new("eu").unwrap();
        let ipam = Ipam::new(BTreeMap::from([(
            region.clone(),
            vec!["100.64.0.0/24".parse().unwrap()],
        )]))
        .unwrap();
        let site = SiteId::new("a").unwrap();
        let snapshot = store.region_leases(&region).unwrap();
        let Plan::Allocate(txn) = ipam
            .site_address(&snapshot, &site, &region, Family::V4)
            .unwrap()
        else {
            panic!("expected an allocation")
        };
        assert_eq!(store.commit_leases(&txn).unwrap(), Ok(()));
        // The same plan again is stale.
        assert_eq!(
            store.commit_leases(&txn).unwrap(),
            Err(Conflict {
                expected: 0,
                found: 1
            })
        );
        let leased = txn.put[0].prefix;
        drop(store);
        let store = RedbStore::open(&dir.path().join("store.redb")).unwrap();
        let again = store.region_leases(&region).unwrap();
        assert_eq!(again.version(), 1);
        assert_eq!(
            again.leases().map(|l| l.prefix).collect::<Vec<_>>(),
            vec![leased]
        );
        assert_eq!(
            ipam.site_address(&again, &site, &region, Family::V4)
                .unwrap()
                .lease()
                .unwrap()
                .prefix,
            leased
        );
    }

    #[test]
    fn tokens_redeem_once_across_threads() {
        let (_dir, store) = open();
        let store = Arc::new(store);
        let issued = tether_pki::token::generate(
            SiteId::new("a").unwrap(),
            RegionId::new("eu").unwrap(),
            SystemTime::now(),
            Duration::from_secs(60),
        );
        store.put(issued.record.clone()).unwrap();
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (store, secret) = (store.clone(), issued.secret.clone());
                std::thread::spawn(move || {
                    tether_pki::token::redeem(store.as_ref(), &secret, SystemTime::now()).is_ok()
                })
            })
            .collect();
        let wins = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|&ok| ok)
            .count();
        assert_eq!(wins, 1);
    }

    #[test]
    fn records_and_revocations_round_trip() {
        let (_dir, store) = open();
        let mut events = store.watch();
        let site = SiteId::new("a").unwrap();
        let region = RegionId::new("eu").unwrap();
        let record = SiteRecord {
            site: site.clone(),
            region: region.clone(),
            created: 1,
            enrolled: None,
            revoked: false,
        };
        store.put_site(&record).unwrap();
        assert_eq!(store.site(&site).unwrap(), Some(record.clone()));
        assert_eq!(store.sites().unwrap(), vec![record]);
        assert_eq!(events.try_recv().unwrap(), StoreEvent::Site(site.clone()));
        let id = SiteIdentity::new(
            TrustDomain::new("t.example").unwrap(),
            region.clone(),
            site.clone(),
        );
        store.revoke(&Revoked::Site(id.clone())).unwrap();
        store.revoke(&Revoked::Serial(vec![1, 2, 3])).unwrap();
        let mut revs = store.revocations().unwrap();
        revs.sort();
        assert_eq!(
            revs,
            vec![Revoked::Site(id.clone()), Revoked::Serial(vec![1, 2, 3])]
        );
        store.reinstate(&Revoked::Site(id)).unwrap();
        assert_eq!(
            store.revocations().unwrap(),
            vec![Revoked::Serial(vec![1, 2, 3])]
        );
        store
            .put_cert(&CertRecord {
                serial: "0a".into(),
                site: site.clone(),
                region,
                not_after: 5,
            })
            .unwrap();
        assert_eq!(store.certs_of(&site).unwrap().len(), 1);
    }

    #[test]
    fn a_second_process_is_refused_with_a_clear_error() {
        let (dir, _store) = open();
        let err = RedbStore::open(&dir.path().join("store.redb")).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
    }
}
