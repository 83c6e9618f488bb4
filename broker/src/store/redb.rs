//! [`Store`] on redb: an embedded, pure-Rust transactional database in the
//! data directory (one broker).

use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tether_pki::Revoked;
use tether_pki::token::{TokenHash, TokenLedger, TokenRecord};
use tether_proto::events::{SiteEvent, Timeline};
use tether_proto::ids::{RegionId, SiteId};
use tether_proto::ipam::{Conflict, Lease, RegionLeases, Txn};
use tokio::sync::broadcast;

use super::{
    CertRecord, SiteRecord, Store, StoreContents, StoreError, StoreEvent, StoredRevocation,
    StoredToken, revocation_key,
};

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

const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
const LEASE_VERSIONS: TableDefinition<&str, u64> = TableDefinition::new("lease_versions");
const SITES: TableDefinition<&str, &[u8]> = TableDefinition::new("sites");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
/// Each site's latest token (site -> key in [`TOKENS`]), so that a new
/// token replaces the earlier one without reading every token. Derived from
/// [`TOKENS`]: not in backups, rebuilt at every open ([`index_tokens`]).
const TOKEN_SITES: TableDefinition<&str, &str> = TableDefinition::new("token_sites");
const CERTS: TableDefinition<&str, &[u8]> = TableDefinition::new("certs");
const REVOCATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("revocations");
/// Each site's event timeline (JSON), read and rewritten in one write
/// transaction per event.
const EVENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("events");
/// Deployment-wide values: the CA state under [`CA_KEY`].
const DEPLOYMENT: TableDefinition<&str, &str> = TableDefinition::new("deployment");
const CA_KEY: &str = "ca";

fn lease_key(region: &RegionId, lease_prefix: &ipnet::IpNet) -> String {
    format!("{region}/{lease_prefix}")
}

/// Every table of an embedded store, as a backup carries it: keys and
/// values as stored (the values are JSON text, except lease versions).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dump {
    /// Address leases, by `<region>/<prefix>`.
    pub leases: BTreeMap<String, String>,
    /// Each region's lease version.
    pub lease_versions: BTreeMap<String, u64>,
    /// Site records.
    pub sites: BTreeMap<String, String>,
    /// Enrollment tokens, by hash.
    pub tokens: BTreeMap<String, String>,
    /// Issued certificates, by serial.
    pub certs: BTreeMap<String, String>,
    /// Revocations.
    pub revocations: BTreeMap<String, String>,
    /// Deployment-wide values (the CA state).
    pub deployment: BTreeMap<String, String>,
}

/// [`Store`] on redb.
pub struct RedbStore {
    db: Database,
    /// Every write transaction after opening goes through here.
    group: super::group::GroupCommit,
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
        txn.open_table(EVENTS)?;
        txn.open_table(DEPLOYMENT)?;
        index_tokens(&txn)?;
        txn.commit()?;
        let (events, _) = broadcast::channel(1024);
        Ok(Self {
            db,
            group: super::group::GroupCommit::default(),
            events,
        })
    }

    /// Runs `f` in a write transaction shared with concurrent writers
    /// ([`group`](super::group)); returns once it is durable.
    fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnMut(&redb::WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        self.group.write(&self.db, f)
    }

    fn notify(&self, event: StoreEvent) {
        let _ = self.events.send(event);
    }

    /// Every table, read in one transaction: a consistent snapshot.
    pub fn dump(&self) -> Result<Dump, StoreError> {
        let txn = self.db.begin_read()?;
        let text =
            |table: TableDefinition<&str, &[u8]>| -> Result<BTreeMap<String, String>, StoreError> {
                let mut out = BTreeMap::new();
                for entry in txn.open_table(table)?.iter()? {
                    let (k, v) = entry?;
                    let value = String::from_utf8(v.value().to_vec()).map_err(|_| {
                        StoreError(format!("corrupt record {:?}: not UTF-8", k.value()))
                    })?;
                    out.insert(k.value().to_string(), value);
                }
                Ok(out)
            };
        let mut dump = Dump {
            leases: text(LEASES)?,
            sites: text(SITES)?,
            tokens: text(TOKENS)?,
            certs: text(CERTS)?,
            revocations: text(REVOCATIONS)?,
            ..Dump::default()
        };
        for entry in txn.open_table(LEASE_VERSIONS)?.iter()? {
            let (k, v) = entry?;
            dump.lease_versions.insert(k.value().to_string(), v.value());
        }
        for entry in txn.open_table(DEPLOYMENT)?.iter()? {
            let (k, v) = entry?;
            dump.deployment
                .insert(k.value().to_string(), v.value().to_string());
        }
        Ok(dump)
    }

    /// Creates a store at `path` holding exactly `dump`, in one
    /// transaction. Refuses if `path` exists.
    pub fn create_from(path: &Path, dump: &Dump) -> Result<Self, StoreError> {
        if path.exists() {
            return Err(StoreError(format!(
                "{} already exists; restore into an empty data directory",
                path.display()
            )));
        }
        let store = Self::open(path)?;
        let write = store.db.begin_write()?;
        {
            let fill = |table: TableDefinition<&str, &[u8]>,
                        rows: &BTreeMap<String, String>|
             -> Result<(), StoreError> {
                let mut t = write.open_table(table)?;
                for (k, v) in rows {
                    t.insert(k.as_str(), v.as_bytes())?;
                }
                Ok(())
            };
            fill(LEASES, &dump.leases)?;
            fill(SITES, &dump.sites)?;
            fill(TOKENS, &dump.tokens)?;
            fill(CERTS, &dump.certs)?;
            fill(REVOCATIONS, &dump.revocations)?;
            let mut versions = write.open_table(LEASE_VERSIONS)?;
            for (k, v) in &dump.lease_versions {
                versions.insert(k.as_str(), *v)?;
            }
            let mut deployment = write.open_table(DEPLOYMENT)?;
            for (k, v) in &dump.deployment {
                deployment.insert(k.as_str(), v.as_str())?;
            }
        }
        index_tokens(&write)?;
        write.commit()?;
        Ok(store)
    }

    /// Everything the store holds (for [`migrate`](super::migrate)).
    pub fn contents(&self) -> Result<StoreContents, StoreError> {
        let txn = self.db.begin_read()?;
        let mut contents = StoreContents::default();
        let versions = txn.open_table(LEASE_VERSIONS)?;
        let leases = txn.open_table(LEASES)?;
        let mut by_region: std::collections::BTreeMap<String, (u64, Vec<Lease>)> =
            std::collections::BTreeMap::new();
        for entry in versions.iter()? {
            let (region, version) = entry?;
            by_region.entry(region.value().to_string()).or_default().0 = version.value();
        }
        for entry in leases.iter()? {
            let (_, value) = entry?;
            let lease: Lease = serde_json::from_slice(value.value())?;
            by_region
                .entry(lease.region.to_string())
                .or_default()
                .1
                .push(lease);
        }
        for (region, (version, leases)) in by_region {
            let region = RegionId::new(region)
                .map_err(|e| StoreError(format!("corrupt region name: {e}")))?;
            contents
                .leases
                .push((region, RegionLeases::from_parts(version, leases)));
        }
        for entry in txn.open_table(SITES)?.iter()? {
            contents
                .sites
                .push(serde_json::from_slice(entry?.1.value())?);
        }
        for entry in txn.open_table(CERTS)?.iter()? {
            contents
                .certs
                .push(serde_json::from_slice(entry?.1.value())?);
        }
        for entry in txn.open_table(REVOCATIONS)?.iter()? {
            let stored: StoredRevocation = serde_json::from_slice(entry?.1.value())?;
            contents.revocations.push(stored.into_entry()?);
        }
        for entry in txn.open_table(TOKENS)?.iter()? {
            let (key, value) = entry?;
            let hash = TokenHash::from_hex(key.value())
                .ok_or_else(|| StoreError(format!("corrupt token key {:?}", key.value())))?;
            let stored: StoredToken = serde_json::from_slice(value.value())?;
            contents.tokens.push(stored.into_record(hash));
        }
        contents.ca = txn
            .open_table(DEPLOYMENT)?
            .get(CA_KEY)?
            .map(|v| v.value().to_string());
        Ok(contents)
    }
    /// Up to `limit` timelines of sites named after `after` (from the
    /// first without), in site order: [`migrate`](super::migrate) copies
    /// them page by page, never holding every timeline at once.
    pub fn timelines_after(
        &self,
        after: Option<&SiteId>,
        limit: usize,
    ) -> Result<Vec<(SiteId, Timeline)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(EVENTS)?;
        let range = match after {
            Some(site) => table.range::<&str>((
                std::ops::Bound::Excluded(site.as_str()),
                std::ops::Bound::Unbounded,
            ))?,
            None => table.range::<&str>(..)?,
        };
        let mut out = Vec::new();
        for entry in range.take(limit) {
            let (key, value) = entry?;
            let site = SiteId::new(key.value())
                .map_err(|e| StoreError(format!("corrupt event timeline key: {e}")))?;
            out.push((site, serde_json::from_slice(value.value())?));
        }
        Ok(out)
    }
}

impl Store for RedbStore {
    fn lease_version(&self, region: &RegionId) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let versions = txn.open_table(LEASE_VERSIONS)?;
        Ok(versions
            .get(region.as_str())?
            .map(|v| v.value())
            .unwrap_or(0))
    }

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
        // Serialized before the transaction: a write fails before it
        // changes anything.
        let puts = txn
            .put
            .iter()
            .map(|lease| {
                Ok((
                    lease_key(&txn.region, &lease.prefix),
                    serde_json::to_vec(lease)?,
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let deletes: Vec<String> = txn
            .delete
            .iter()
            .map(|prefix| lease_key(&txn.region, prefix))
            .collect();
        let (region, expected) = (txn.region.clone(), txn.expected_version);
        let outcome = self.write(move |write| {
            let mut versions = write.open_table(LEASE_VERSIONS)?;
            let found = versions
                .get(region.as_str())?
                .map(|v| v.value())
                .unwrap_or(0);
            if found != expected {
                return Ok(Err(Conflict { expected, found }));
            }
            versions.insert(region.as_str(), found + 1)?;
            let mut leases = write.open_table(LEASES)?;
            for key in &deletes {
                leases.remove(key.as_str())?;
            }
            for (key, value) in &puts {
                leases.insert(key.as_str(), value.as_slice())?;
            }
            Ok(Ok(()))
        })?;
        if outcome.is_ok() {
            self.notify(StoreEvent::Leases(txn.region.clone()));
        }
        Ok(outcome)
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
        let (key, value) = (record.site.to_string(), serde_json::to_vec(record)?);
        self.write(move |write| {
            let mut table = write.open_table(SITES)?;
            table.insert(key.as_str(), value.as_slice())?;
            Ok(())
        })?;
        self.notify(StoreEvent::Site(record.site.clone()));
        Ok(())
    }

    fn put_cert(&self, record: &CertRecord) -> Result<(), StoreError> {
        let (key, value) = (record.serial.clone(), serde_json::to_vec(record)?);
        self.write(move |write| {
            let mut table = write.open_table(CERTS)?;
            table.insert(key.as_str(), value.as_slice())?;
            Ok(())
        })
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
        let stored = StoredRevocation::from_entry(entry);
        let (key, value) = (revocation_key(entry), serde_json::to_vec(&stored)?);
        self.write(move |write| {
            let mut table = write.open_table(REVOCATIONS)?;
            table.insert(key.as_str(), value.as_slice())?;
            Ok(())
        })?;
        self.notify(StoreEvent::Revoked(entry.clone()));
        Ok(())
    }

    fn reinstate(&self, entry: &Revoked) -> Result<(), StoreError> {
        let key = revocation_key(entry);
        self.write(move |write| {
            let mut table = write.open_table(REVOCATIONS)?;
            table.remove(key.as_str())?;
            Ok(())
        })?;
        self.notify(StoreEvent::Reinstated(entry.clone()));
        Ok(())
    }

    fn revocations(&self) -> Result<Vec<Revoked>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(REVOCATIONS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (_, value) = entry?;
            out.push(serde_json::from_slice::<StoredRevocation>(value.value())?.into_entry()?);
        }
        Ok(out)
    }

    fn is_revoked(&self, entry: &Revoked) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(REVOCATIONS)?;
        Ok(table.get(revocation_key(entry).as_str())?.is_some())
    }

    fn append_event(
        &self,
        site: &SiteId,
        event: &SiteEvent,
        limit: usize,
    ) -> Result<(), StoreError> {
        let (site, event) = (site.clone(), event.clone());
        self.write(move |write| {
            let mut table = write.open_table(EVENTS)?;
            let mut timeline: Timeline = match table.get(site.as_str())? {
                Some(v) => serde_json::from_slice(v.value())?,
                None => Timeline::default(),
            };
            timeline.push(event.clone(), limit);
            let value = serde_json::to_vec(&timeline)?;
            table.insert(site.as_str(), value.as_slice())?;
            Ok(())
        })
    }

    fn timeline(&self, site: &SiteId) -> Result<Timeline, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(EVENTS)?;
        Ok(match table.get(site.as_str())? {
            Some(v) => serde_json::from_slice(v.value())?,
            None => Timeline::default(),
        })
    }

    fn timelines(&self) -> Result<Vec<(SiteId, Timeline)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(EVENTS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            let site = SiteId::new(key.value())
                .map_err(|e| StoreError(format!("corrupt event timeline key: {e}")))?;
            out.push((site, serde_json::from_slice(value.value())?));
        }
        Ok(out)
    }

    fn snapshot(&self) -> Result<Dump, StoreError> {
        self.dump()
    }

    fn ca_state(&self) -> Result<Option<String>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DEPLOYMENT)?;
        Ok(table.get(CA_KEY)?.map(|v| v.value().to_string()))
    }

    fn swap_ca_state(&self, expected: Option<&str>, new: &str) -> Result<bool, StoreError> {
        let (expected, new) = (expected.map(str::to_string), new.to_string());
        let swapped = self.write(move |write| {
            let mut table = write.open_table(DEPLOYMENT)?;
            let found = table.get(CA_KEY)?.map(|v| v.value().to_string());
            if found != expected {
                return Ok(false);
            }
            table.insert(CA_KEY, new.as_str())?;
            Ok(true)
        })?;
        if swapped {
            self.notify(StoreEvent::Ca);
        }
        Ok(swapped)
    }

    fn watch(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }
}

impl TokenLedger for RedbStore {
    fn put(&self, record: TokenRecord) -> Result<(), String> {
        let stored = StoredToken::from_record(&record);
        let run = || -> Result<(), StoreError> {
            let value = serde_json::to_vec(&stored)?;
            let (site, key) = (record.site.to_string(), record.hash.to_hex());
            self.write(move |write| {
                let mut table = write.open_table(TOKENS)?;
                let mut index = write.open_table(TOKEN_SITES)?;
                // Only the latest code of a site stays valid.
                let earlier = index.get(site.as_str())?.map(|v| v.value().to_string());
                if let Some(earlier) = earlier {
                    let found = table.get(earlier.as_str())?.map(|v| v.value().to_vec());
                    if let Some(found) = found {
                        let mut token: StoredToken = serde_json::from_slice(&found)?;
                        token.replaced = true;
                        table.insert(earlier.as_str(), serde_json::to_vec(&token)?.as_slice())?;
                    }
                }
                table.insert(key.as_str(), value.as_slice())?;
                index.insert(site.as_str(), key.as_str())?;
                Ok(())
            })
        };
        run().map_err(|e| e.to_string())
    }

    fn take(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, String> {
        // Writes run one after another (in one transaction or several): of
        // concurrent takers, exactly one sees the record.
        let key = hash.to_hex();
        let removed = self.write(move |write| {
            let mut table = write.open_table(TOKENS)?;
            let removed = match table.remove(key.as_str())? {
                Some(v) => Some(serde_json::from_slice::<StoredToken>(v.value())?),
                None => None,
            };
            if let Some(token) = &removed {
                let mut index = write.open_table(TOKEN_SITES)?;
                let latest = index
                    .get(token.site.as_str())?
                    .is_some_and(|v| v.value() == key);
                if latest {
                    index.remove(token.site.as_str())?;
                }
            }
            Ok(removed)
        });
        removed
            .map(|r| r.map(|t| t.into_record(*hash)))
            .map_err(|e| e.to_string())
    }
}

/// Rebuilds [`TOKEN_SITES`] from [`TOKENS`], at every open: the index is
/// derived, so a store written before it existed, restored from a backup,
/// or written meanwhile by a version that did not keep it gets a true one.
/// Should a site have more than one unreplaced token (a store written by
/// such a version after this one), the latest stays valid and the others
/// are marked replaced, as [`TokenLedger::put`] would have done. One pass
/// over the tokens, once per open.
fn index_tokens(write: &redb::WriteTransaction) -> Result<(), StoreError> {
    write.delete_table(TOKEN_SITES)?;
    let mut index = write.open_table(TOKEN_SITES)?;
    let mut tokens = write.open_table(TOKENS)?;
    // site -> (created, key) of its latest unreplaced token.
    let mut latest: std::collections::HashMap<String, (u64, String)> =
        std::collections::HashMap::new();
    let mut superseded = Vec::new();
    for entry in tokens.iter()? {
        let (key, value) = entry?;
        let token: StoredToken = serde_json::from_slice(value.value())?;
        if token.replaced {
            continue;
        }
        let candidate = (token.created, key.value().to_string());
        match latest.entry(token.site.to_string()) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(candidate);
            }
            std::collections::hash_map::Entry::Occupied(mut o) => {
                if candidate > *o.get() {
                    superseded.push(o.insert(candidate).1);
                } else {
                    superseded.push(candidate.1);
                }
            }
        }
    }
    for key in superseded {
        let found = tokens.get(key.as_str())?.map(|v| v.value().to_vec());
        if let Some(found) = found {
            let mut token: StoredToken = serde_json::from_slice(&found)?;
            token.replaced = true;
            tokens.insert(key.as_str(), serde_json::to_vec(&token)?.as_slice())?;
        }
    }
    for (site, (_, key)) in latest {
        index.insert(site.as_str(), key.as_str())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;
    use std::time::SystemTime;
    use tether_pki::{SiteIdentity, TrustDomain};
    use tether_proto::ipam::{Ipam, Plan};
    use tether_proto::net::Family;

    fn open() -> (tempfile::TempDir, RedbStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("store.redb")).unwrap();
        (dir, store)
    }

    #[test]
    fn event_timelines_are_bounded_per_site() {
        let (_dir, store) = open();
        crate::store::check_event_timelines(Arc::new(store));
    }

    #[test]
    fn the_ca_state_is_swapped_only_from_what_was_read_and_survives_reopen() {
        let (dir, store) = open();
        let mut seen = store.watch();
        crate::store::check_the_ca_state_is_swapped_only_from_what_was_read(&store);
        assert_eq!(seen.try_recv().unwrap(), StoreEvent::Ca);
        drop(store);
        let again = RedbStore::open(&dir.path().join("store.redb")).unwrap();
        assert_eq!(again.ca_state().unwrap().as_deref(), Some("second"));
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
        assert_eq!(store.lease_version(&region).unwrap(), 1);
        assert_eq!(
            store.lease_version(&RegionId::new("us").unwrap()).unwrap(),
            0
        );
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
    fn a_newer_token_replaces_the_earlier_one() {
        let (_dir, store) = open();
        crate::store::check_a_newer_token_replaces_the_earlier_one(&store);
    }

    #[test]
    fn a_store_written_without_the_token_index_still_replaces_earlier_tokens() {
        use tether_pki::token::{RedeemError, generate, redeem};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let (site, region) = (SiteId::new("ward-1").unwrap(), RegionId::new("eu").unwrap());
        let (now, ttl) = (SystemTime::now(), Duration::from_secs(600));
        let first = generate(site.clone(), region.clone(), now, ttl);
        {
            let store = RedbStore::open(&path).unwrap();
            store.put(first.record.clone()).unwrap();
            // As a store from before the index: tokens without it.
            let write = store.db.begin_write().unwrap();
            write.delete_table(TOKEN_SITES).unwrap();
            write.commit().unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        let second = generate(site, region, now, ttl);
        store.put(second.record.clone()).unwrap();
        assert_eq!(
            redeem(&store, &first.secret, now).unwrap_err(),
            RedeemError::Replaced
        );
        assert!(redeem(&store, &second.secret, now).is_ok());
    }

    #[test]
    fn a_store_written_by_a_version_without_the_index_keeps_one_valid_token_per_site() {
        use tether_pki::token::{RedeemError, generate, redeem};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let (site, region) = (SiteId::new("ward-1").unwrap(), RegionId::new("eu").unwrap());
        let (now, ttl) = (SystemTime::now(), Duration::from_secs(600));
        let indexed = generate(site.clone(), region.clone(), now, ttl);
        let older = generate(site.clone(), region.clone(), now, ttl);
        let newer = generate(
            site.clone(),
            region.clone(),
            now + Duration::from_secs(5),
            ttl,
        );
        {
            let store = RedbStore::open(&path).unwrap();
            store.put(indexed.record.clone()).unwrap();
            // Then, as a version without the index would: the earlier
            // token marked replaced, two later ones written straight into
            // the tokens (one of them left unreplaced by mistake), and the
            // index left pointing at the replaced one.
            let write = store.db.begin_write().unwrap();
            {
                let mut tokens = write.open_table(TOKENS).unwrap();
                let mut replaced = StoredToken::from_record(&indexed.record);
                replaced.replaced = true;
                let key = indexed.record.hash.to_hex();
                let value = serde_json::to_vec(&replaced).unwrap();
                tokens.insert(key.as_str(), value.as_slice()).unwrap();
                for t in [&older, &newer] {
                    let key = t.record.hash.to_hex();
                    let value = serde_json::to_vec(&StoredToken::from_record(&t.record)).unwrap();
                    tokens.insert(key.as_str(), value.as_slice()).unwrap();
                }
            }
            write.commit().unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        // Only the latest of the site's codes is valid after the open.
        assert_eq!(
            redeem(&store, &older.secret, now).unwrap_err(),
            RedeemError::Replaced
        );
        // A new code replaces the latest one, which the index now names.
        let fresh = generate(site, region, now + Duration::from_secs(9), ttl);
        store.put(fresh.record.clone()).unwrap();
        assert_eq!(
            redeem(&store, &newer.secret, now).unwrap_err(),
            RedeemError::Replaced
        );
        assert_eq!(
            redeem(&store, &indexed.secret, now).unwrap_err(),
            RedeemError::Replaced
        );
        assert!(redeem(&store, &fresh.secret, now).is_ok());
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
            revoked_at: None,
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
                spki_sha256: None,
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
