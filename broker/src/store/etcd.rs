//! [`Store`] on a shared etcd cluster (v3 API).
//!
//! # Key layout
//!
//! Every key starts with the configured prefix `P` (ending in `/`), so
//! several deployments share one cluster without seeing each other:
//!
//! | key | value |
//! | --- | --- |
//! | `P regions/<region>/version` | the region's lease version, decimal |
//! | `P regions/<region>/leases/<prefix>` | a [`Lease`] (JSON), e.g. `…/leases/100.64.0.2/32` |
//! | `P sites/<site>` | a [`SiteRecord`] (JSON) |
//! | `P certs/<site>/<serial>` | a [`CertRecord`] (JSON) |
//! | `P revocations/site:<spiffe uri>` or `P revocations/serial:<hex>` | the revocation (JSON) |
//! | `P tokens/<sha-256 hex>` | an enrollment token record (JSON) |
//! | `P events/<site>` | the site's event [`Timeline`] (JSON), rewritten by a transaction that compares its `mod_revision` |
//! | `P ca` | the CA state (JSON, its private keys sealed under the key-encryption key), replaced by a transaction that compares the value read |
//!
//! # Transactions
//!
//! - A lease commit is one etcd transaction: *if* the region's version key
//!   holds `txn.expected_version` (for version 0: the key does not exist,
//!   `version == 0`), *then* put the version key to `expected + 1`, delete
//!   the released lease keys and put the new ones; *else* read the version
//!   key, which becomes the [`Conflict`]'s `found`. The version is a counter
//!   bumped by exactly one per commit, so the comparison never matches a
//!   stale plan (no ABA), and it is the same number the broker core
//!   expects (it applies its own commits to its cache as `version + 1`).
//!   Comparing the key's own counter rather than its `mod_revision` keeps
//!   the version numbers of a migrated embedded store unchanged.
//! - Reading a region reads the version key, then the region's lease keys
//!   at the revision of that read (in pages, each at that same revision),
//!   so a snapshot is never torn. Every range read is paged that way.
//! - A token redemption reads the token, then is one transaction: *if* the
//!   token key is unchanged since (`mod_revision`), *then* delete it and
//!   put a redemption marker (`tokens-redeemed/<hash>`: a random nonce and
//!   the record). Of any number of brokers racing, exactly one transaction
//!   succeeds. When the answer to that transaction is lost (an etcd member
//!   dies between the commit and the reply), the broker keeps the nonce:
//!   the site's retry then finds the token gone and the marker carrying
//!   that nonce, and is enrolled instead of being told the token was used.
//!   A marker is deleted once its redemption is settled (in the
//!   background; one left behind is harmless and never copied by
//!   `store migrate`). A retry that reaches another broker than the lost
//!   answer's finds the token used.
//! - Site, certificate and revocation records are single-key puts and
//!   deletes (atomic on their own).
//!
//! No locks and no etcd leases are used.
//!
//! # Watch
//!
//! [`Store::watch`] is fed by one etcd watch on the prefix, started at the
//! revision the store opened at: a put of a region's version key is
//! [`StoreEvent::Leases`], a put of a site key [`StoreEvent::Site`], a put
//! or delete of a revocation key [`StoreEvent::Revoked`] or
//! [`StoreEvent::Reinstated`], a put of a timeline [`StoreEvent::Events`]. Changes made through this store arrive the
//! same way as changes made by other brokers (once each, in etcd's order).
//! A broken watch is resumed from the next unseen revision; when that
//! revision was compacted away meanwhile, the changes in between are lost
//! and the watch sends [`StoreEvent::Lost`] (watchers read the store
//! again) before it resumes at the compaction's revision.
//!
//! # Synchronous calls from async code
//!
//! [`Store`] is synchronous and is called from the broker's tasks. The
//! store owns a small tokio runtime of its own; each call is spawned there
//! and the caller waits on a channel (inside `block_in_place` when it is on
//! a multi-threaded runtime's worker, so that other tasks move on). The
//! caller's runtime, whatever its flavour, never runs the etcd future, so
//! nothing nests runtimes. Every call is bounded by the configured timeout.

use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions,
    Identity, KeyValue, TlsOptions, Txn as EtcdTxn, TxnOp, TxnOpResponse, WatchOptions,
};
use tether_config::broker::EtcdConfig;
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

/// Operations per etcd transaction when copying many records (etcd's
/// default `--max-txn-ops` is 128).
const BATCH: usize = 100;

/// Bytes of values per etcd transaction when copying timelines: below
/// etcd's default request limit of 1.5 MiB, with room for the keys.
const TXN_BYTES: usize = 1024 * 1024;

/// Keys per read of a range (small in tests, so that they read many pages).
const PAGE: i64 = if cfg!(test) { 5 } else { 500 };
/// Timelines per page when all are read at start: a timeline holds up to
/// [`tether_proto::events::TIMELINE_LIMIT`] events (tens of KiB), so a page
/// of 32 stays far below gRPC's message limit.
pub(crate) const TIMELINE_PAGE: i64 = if cfg!(test) { 2 } else { 32 };

/// Where the brokers of a deployment announce themselves and their
/// sessions (see `crate::fleet`), under the prefix.
pub const FLEET_DIR: &str = "fleet/";

/// The directory (under the prefix) of the sites' event timelines.
const EVENTS_DIR: &str = "events/";
/// The key of the CA state under the prefix.
const CA_KEY: &str = "ca";
/// The directory (under the prefix) of token redemption markers.
const REDEEMED_DIR: &str = "tokens-redeemed/";

/// How often a redemption re-reads a token that changed between its read
/// and its transaction (a newer token for the site marked it replaced).
const TOKEN_TAKE_ATTEMPTS: usize = 8;

/// What a token redemption leaves until it is settled (see the module
/// documentation).
#[derive(serde::Serialize, serde::Deserialize)]
struct RedeemedMarker {
    /// Chosen by the redeeming broker.
    nonce: u64,
    /// The token's record.
    token: StoredToken,
}

/// How often an event append re-reads a timeline another broker changed
/// in between.
const EVENT_APPEND_ATTEMPTS: usize = 8;

/// How long a broken watch waits before it is resumed.
const WATCH_RETRY: Duration = Duration::from_millis(500);

/// [`Store`] on etcd. See the module documentation for the key layout.
pub struct EtcdStore {
    client: Client,
    keys: Keys,
    endpoints: String,
    timeout: Duration,
    events: broadcast::Sender<StoreEvent>,
    runtime: OwnRuntime,
    /// Redemptions whose transaction's answer was lost: the nonce each
    /// put in its marker. At most one per existing token.
    unsettled: std::sync::Mutex<std::collections::HashMap<TokenHash, u64>>,
    /// Called once a redemption's transaction has been answered, before
    /// the answer is looked at: tests hold a redemption there.
    #[cfg(test)]
    pub(crate) on_redemption_answer:
        std::sync::Mutex<Option<std::sync::Arc<dyn Fn() + Send + Sync>>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.keys.prefix)
            .finish_non_exhaustive()
    }
}

/// The store's own runtime, shut down without blocking when dropped:
/// dropping a runtime the ordinary way blocks, which panics inside another
/// runtime (the broker drops its store from async code).
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// The keys under one prefix.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn region_version(&self, region: &RegionId) -> String {
        format!("{}regions/{region}/version", self.prefix)
    }
    fn region_leases(&self, region: &RegionId) -> String {
        format!("{}regions/{region}/leases/", self.prefix)
    }
    fn lease(&self, region: &RegionId, prefix: &ipnet::IpNet) -> String {
        format!("{}{prefix}", self.region_leases(region))
    }
    fn sites(&self) -> String {
        format!("{}sites/", self.prefix)
    }
    fn site(&self, site: &SiteId) -> String {
        format!("{}{site}", self.sites())
    }
    fn certs(&self) -> String {
        format!("{}certs/", self.prefix)
    }
    fn certs_of(&self, site: &SiteId) -> String {
        format!("{}{site}/", self.certs())
    }
    fn cert(&self, record: &CertRecord) -> String {
        format!("{}{}", self.certs_of(&record.site), record.serial)
    }
    fn revocations(&self) -> String {
        format!("{}revocations/", self.prefix)
    }
    fn events(&self) -> String {
        format!("{}{EVENTS_DIR}", self.prefix)
    }
    fn events_of(&self, site: &SiteId) -> String {
        format!("{}{site}", self.events())
    }
    fn revocation(&self, entry: &Revoked) -> String {
        format!("{}{}", self.revocations(), revocation_key(entry))
    }
    fn tokens(&self) -> String {
        format!("{}tokens/", self.prefix)
    }
    fn ca(&self) -> String {
        format!("{}{CA_KEY}", self.prefix)
    }
    fn token(&self, hash: &TokenHash) -> String {
        format!("{}{}", self.tokens(), hash.to_hex())
    }
    fn redeemed(&self, hash: &TokenHash) -> String {
        format!("{}{REDEEMED_DIR}{}", self.prefix, hash.to_hex())
    }

    /// What a change of `key` means to watchers.
    fn event(&self, kind: EventType, kv: &KeyValue, prev: Option<&KeyValue>) -> Option<StoreEvent> {
        let rest = std::str::from_utf8(kv.key())
            .ok()?
            .strip_prefix(&self.prefix)?;
        if let Some(region) = rest
            .strip_prefix("regions/")
            .and_then(|r| r.strip_suffix("/version"))
        {
            return (kind == EventType::Put)
                .then(|| RegionId::new(region).ok().map(StoreEvent::Leases))
                .flatten();
        }
        if rest == "ca" {
            return Some(StoreEvent::Ca);
        }
        if let Some(site) = rest.strip_prefix("sites/") {
            return SiteId::new(site).ok().map(StoreEvent::Site);
        }
        if let Some(site) = rest.strip_prefix(EVENTS_DIR) {
            return (kind == EventType::Put)
                .then(|| SiteId::new(site).ok().map(StoreEvent::Events))
                .flatten();
        }
        if rest.starts_with("revocations/") {
            let value = match kind {
                EventType::Put => kv.value(),
                EventType::Delete => prev?.value(),
            };
            let entry = serde_json::from_slice::<StoredRevocation>(value)
                .ok()?
                .into_entry()
                .ok()?;
            return Some(match kind {
                EventType::Put => StoreEvent::Revoked(entry),
                EventType::Delete => StoreEvent::Reinstated(entry),
            });
        }
        None
    }
}

fn get_kvs(response: &TxnOpResponse) -> &[KeyValue] {
    match response {
        TxnOpResponse::Get(get) => get.kvs(),
        _ => &[],
    }
}

fn parse_version(kv: Option<&KeyValue>) -> Result<u64, StoreError> {
    match kv {
        None => Ok(0),
        Some(kv) => std::str::from_utf8(kv.value())
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                StoreError(format!(
                    "corrupt region version at {}",
                    String::from_utf8_lossy(kv.key())
                ))
            }),
    }
}

fn read_tls_file(what: &str, path: &std::path::Path) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|e| {
        StoreError(format!(
            "cannot read the etcd {what} {}: {e}",
            path.display()
        ))
    })
}

impl EtcdStore {
    /// Connects to the cluster and checks that it answers (within the
    /// configured timeout); starts the watch on the prefix.
    pub fn open(config: &EtcdConfig) -> Result<Self, StoreError> {
        let endpoints = config.endpoints.join(", ");
        let options = connect_options(config)?;
        let runtime = OwnRuntime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("etcd-store")
                .enable_all()
                .build()
                .map_err(|e| StoreError(format!("cannot start the etcd client runtime: {e}")))?,
        ));
        let (events, _) = broadcast::channel(1024);
        let Some(handle) = runtime.0.as_ref().map(|r| r.handle().clone()) else {
            return Err(StoreError("the etcd client runtime is gone".into()));
        };
        let client = {
            let urls = config.endpoints.clone();
            run_on(&handle, config.timeout, async move {
                Client::connect(urls, Some(options)).await
            })
            .map_err(|e| e.describe(&endpoints, "connect", config.timeout))?
        };
        handle.spawn(follow_member_health(client.clone(), config.clone()));
        let mut store = Self {
            client,
            keys: Keys {
                prefix: config.prefix.clone(),
            },
            endpoints,
            timeout: config.timeout,
            events,
            runtime,
            unsettled: std::sync::Mutex::default(),
            #[cfg(test)]
            on_redemption_answer: std::sync::Mutex::default(),
        };
        // Reachability, and the revision the watch starts after.
        let prefix = store.keys.prefix.clone();
        let revision = store.call("read", move |mut c| async move {
            let r = c
                .get(
                    prefix,
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await?;
            Ok(r.header().map(|h| h.revision()).unwrap_or(0))
        })?;
        store.start_watch(handle, revision + 1);
        Ok(store)
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.keys.prefix
    }

    fn start_watch(&mut self, handle: tokio::runtime::Handle, start: i64) {
        let client = self.client.clone();
        let keys = self.keys.clone();
        let events = self.events.clone();
        let endpoints = self.endpoints.clone();
        handle.spawn(async move {
            let mut next = start;
            loop {
                let options = WatchOptions::new()
                    .with_prefix()
                    .with_prev_key()
                    .with_start_revision(next);
                match client
                    .watch_client()
                    .watch(keys.prefix.clone(), Some(options))
                    .await
                {
                    Ok(mut stream) => loop {
                        match stream.message().await {
                            Ok(Some(response)) => {
                                if response.canceled() {
                                    if response.compact_revision() > 0 {
                                        // The changes between `next` and the
                                        // compaction are gone: watchers
                                        // read the store again.
                                        tracing::warn!(
                                            "etcd at {endpoints}: watch fell behind compaction; changes were missed, the store is read again; resuming at revision {}",
                                            response.compact_revision()
                                        );
                                        next = response.compact_revision();
                                        let _ = events.send(StoreEvent::Lost);
                                    }
                                    break;
                                }
                                for event in response.events() {
                                    let Some(kv) = event.kv() else { continue };
                                    next = next.max(kv.mod_revision() + 1);
                                    if let Some(e) =
                                        keys.event(event.event_type(), kv, event.prev_kv())
                                    {
                                        let _ = events.send(e);
                                    }
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!("etcd at {endpoints}: watch failed: {e}");
                                break;
                            }
                        }
                    },
                    Err(e) => tracing::warn!("etcd at {endpoints}: cannot watch: {e}"),
                }
                tokio::time::sleep(WATCH_RETRY).await;
            }
        });
    }

    /// Runs one etcd call on the store's runtime and waits for it.
    fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let Some(runtime) = &self.runtime.0 else {
            return Err(StoreError("the etcd store is shut down".into()));
        };
        let started = std::time::Instant::now();
        let result = run_on(runtime.handle(), self.timeout, f(self.client.clone()));
        crate::metrics::etcd_request(what, started.elapsed(), result.is_err());
        result.map_err(|e| e.describe(&self.endpoints, what, self.timeout))
    }

    /// Everything under the prefix (for [`migrate`](super::migrate) and
    /// checks).
    pub fn contents(&self) -> Result<StoreContents, StoreError> {
        let kvs = self.range(self.keys.prefix.clone(), None, PAGE)?;
        let mut contents = StoreContents::default();
        let mut regions: std::collections::BTreeMap<RegionId, (u64, Vec<Lease>)> =
            std::collections::BTreeMap::new();
        for kv in &kvs {
            let key = String::from_utf8_lossy(kv.key());
            let Some(rest) = key.strip_prefix(&self.keys.prefix) else {
                continue;
            };
            let corrupt = || StoreError(format!("unexpected key {key}"));
            if rest.starts_with(FLEET_DIR)
                || rest.starts_with(EVENTS_DIR)
                || rest.starts_with(REDEEMED_DIR)
            {
                // Live brokers and their sessions and redemption markers
                // (not copied), and the sites' event timelines (read page
                // by page apart).
                continue;
            }
            if let Some(r) = rest.strip_prefix("regions/") {
                let (region, what) = r.split_once('/').ok_or_else(corrupt)?;
                let region = RegionId::new(region).map_err(|_| corrupt())?;
                let entry = regions.entry(region).or_default();
                if what == "version" {
                    entry.0 = parse_version(Some(kv))?;
                } else {
                    entry.1.push(serde_json::from_slice(kv.value())?);
                }
            } else if rest.starts_with("sites/") {
                contents.sites.push(serde_json::from_slice(kv.value())?);
            } else if rest.starts_with("certs/") {
                contents.certs.push(serde_json::from_slice(kv.value())?);
            } else if rest.starts_with("revocations/") {
                let stored: StoredRevocation = serde_json::from_slice(kv.value())?;
                contents.revocations.push(stored.into_entry()?);
            } else if rest == CA_KEY {
                contents.ca = Some(
                    String::from_utf8(kv.value().to_vec())
                        .map_err(|_| StoreError("corrupt CA state: not UTF-8".into()))?,
                );
            } else if let Some(hex) = rest.strip_prefix("tokens/") {
                let hash = TokenHash::from_hex(hex).ok_or_else(corrupt)?;
                let stored: StoredToken = serde_json::from_slice(kv.value())?;
                contents.tokens.push(stored.into_record(hash));
            } else {
                return Err(corrupt());
            }
        }
        contents.leases = regions
            .into_iter()
            .map(|(region, (version, leases))| (region, RegionLeases::from_parts(version, leases)))
            .collect();
        Ok(contents)
    }

    /// How many keys the prefix holds.
    pub fn key_count(&self) -> Result<u64, StoreError> {
        let prefix = self.keys.prefix.clone();
        self.call("read", move |mut c| async move {
            let r = c
                .get(
                    prefix,
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await?;
            Ok(u64::try_from(r.count()).unwrap_or(0))
        })
    }

    /// Deletes every key under the prefix; returns how many there were.
    pub fn clear(&self) -> Result<u64, StoreError> {
        let prefix = self.keys.prefix.clone();
        self.call("delete", move |mut c| async move {
            let r = c
                .delete(prefix, Some(DeleteOptions::new().with_prefix()))
                .await?;
            Ok(u64::try_from(r.deleted()).unwrap_or(0))
        })
    }

    /// Writes `contents` as they are (versions included), in transactions
    /// of at most [`BATCH`] puts.
    pub(crate) fn write_contents(&self, contents: &StoreContents) -> Result<(), StoreError> {
        let mut ops = Vec::new();
        for (region, leases) in &contents.leases {
            ops.push((
                self.keys.region_version(region),
                leases.version().to_string().into_bytes(),
            ));
            for lease in leases.leases() {
                ops.push((
                    self.keys.lease(region, &lease.prefix),
                    serde_json::to_vec(lease)?,
                ));
            }
        }
        for site in &contents.sites {
            ops.push((self.keys.site(&site.site), serde_json::to_vec(site)?));
        }
        for cert in &contents.certs {
            ops.push((self.keys.cert(cert), serde_json::to_vec(cert)?));
        }
        for entry in &contents.revocations {
            ops.push((
                self.keys.revocation(entry),
                serde_json::to_vec(&StoredRevocation::from_entry(entry))?,
            ));
        }
        for token in &contents.tokens {
            ops.push((
                self.keys.token(&token.hash),
                serde_json::to_vec(&StoredToken::from_record(token))?,
            ));
        }
        if let Some(ca) = &contents.ca {
            ops.push((self.keys.ca(), ca.clone().into_bytes()));
        }
        for chunk in ops.chunks(BATCH) {
            let puts: Vec<TxnOp> = chunk
                .iter()
                .map(|(k, v)| TxnOp::put(k.clone(), v.clone(), None))
                .collect();
            self.call("write", move |mut c| async move {
                c.txn(EtcdTxn::new().and_then(puts)).await?;
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Writes the timelines `page` as they are, in transactions of at most
    /// [`BATCH`] puts and about [`TXN_BYTES`] (etcd refuses a request
    /// above its `--max-request-bytes`, 1.5 MiB by default); for
    /// [`migrate`](super::migrate).
    pub(crate) fn write_timelines(&self, page: &[(SiteId, Timeline)]) -> Result<(), StoreError> {
        let mut puts = Vec::new();
        let mut bytes = 0;
        for (i, (site, timeline)) in page.iter().enumerate() {
            let value = serde_json::to_vec(timeline)?;
            bytes += value.len();
            puts.push(TxnOp::put(self.keys.events_of(site), value, None));
            let last = i + 1 == page.len();
            if last || puts.len() >= BATCH || bytes >= TXN_BYTES {
                let ops = std::mem::take(&mut puts);
                bytes = 0;
                self.call("write", move |mut c| async move {
                    c.txn(EtcdTxn::new().and_then(ops)).await?;
                    Ok(())
                })?;
            }
        }
        Ok(())
    }

    fn put_json<T: serde::Serialize>(&self, key: String, value: &T) -> Result<(), StoreError> {
        let value = serde_json::to_vec(value)?;
        self.call("write", move |mut c| async move {
            c.put(key, value, None).await?;
            Ok(())
        })
    }

    fn get_prefix(&self, prefix: String) -> Result<Vec<KeyValue>, StoreError> {
        self.range(prefix, None, PAGE)
    }

    /// Every key under `prefix` as of revision `at` (default: now), read in
    /// pages of `page` keys, every page at the same revision: a consistent
    /// snapshot of any size, within gRPC's message limit.
    fn range(
        &self,
        prefix: String,
        mut at: Option<i64>,
        page: i64,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.into_bytes();
        let mut out = Vec::new();
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(page);
            if let Some(revision) = at {
                options = options.with_revision(revision);
            }
            let key = from.clone();
            let mut response = self.call("read", move |mut c| async move {
                c.get(key, Some(options)).await
            })?;
            if at.is_none() {
                at = response.header().map(|h| h.revision());
            }
            let more = response.more();
            let kvs = response.take_kvs();
            let next = kvs.last().map(|kv| {
                let mut next = kv.key().to_vec();
                next.push(0);
                next
            });
            out.extend(kvs);
            match next {
                Some(next) if more => from = next,
                _ => return Ok(out),
            }
        }
    }
}

/// How to reach the cluster: timeouts and keep-alive, TLS with the client
/// certificate when configured.
pub(crate) fn connect_options(config: &EtcdConfig) -> Result<ConnectOptions, StoreError> {
    // Calls are bounded by their callers (one deadline, one error message);
    // the keep-alive notices a dead connection under a long watch.
    // A member cut off from the others (no leader) refuses every call at
    // once ("no leader") and ends its streams, instead of holding them
    // until the caller's deadline: the caller tries again on a member
    // that can commit.
    let mut options = ConnectOptions::new()
        .with_connect_timeout(config.timeout)
        .with_keep_alive(Duration::from_secs(10), config.timeout)
        .with_require_leader(true);
    if let Some(tls) = &config.tls {
        let mut tls_options = TlsOptions::new().ca_certificate(Certificate::from_pem(
            read_tls_file("CA certificate (store.etcd.ca_file)", &tls.ca_file)?,
        ));
        if let Some((cert, key)) = &tls.identity {
            tls_options = tls_options.identity(Identity::from_pem(
                read_tls_file("client certificate (store.etcd.cert_file)", cert)?,
                read_tls_file("client key (store.etcd.key_file)", key)?,
            ));
        }
        options = options.with_tls(tls_options);
    }
    Ok(options)
}

/// How often [`follow_member_health`] checks each member.
const HEALTH_EVERY: Duration = Duration::from_millis(500);

/// Keeps `client`'s pool of endpoints to the members that answer: every
/// [`HEALTH_EVERY`] it asks each member of `config` for its status (on a
/// client of its own) and takes a member that does not answer within a
/// second, or answers without knowing a leader (it is cut off from the
/// majority), out of the pool, and puts it back once it answers with one. The pool
/// never becomes empty. Without this, the client's balancer keeps sending
/// a share of the calls to a member that died (`tcp connect error`) until
/// it returns.
pub(crate) async fn follow_member_health(client: Client, config: EtcdConfig) {
    let options = match connect_options(&config) {
        Ok(o) => o.with_connect_timeout(Duration::from_secs(1)),
        Err(_) => return,
    };
    let mut probes = Vec::new();
    for endpoint in &config.endpoints {
        match Client::connect([endpoint.as_str()], Some(options.clone())).await {
            Ok(c) => probes.push((endpoint.clone(), c, true)),
            Err(_) => return,
        }
    }
    if probes.len() < 2 {
        return;
    }
    let mut every = tokio::time::interval(HEALTH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let mut answers = Vec::new();
        for (_, probe, _) in &probes {
            let mut probe = probe.clone();
            answers.push(async move {
                // A member that answers but has no leader (a minority
                // of a partition) can commit nothing: out of the pool too.
                matches!(
                    tokio::time::timeout(Duration::from_secs(1), probe.status()).await,
                    Ok(Ok(status)) if status.leader() != 0
                )
            });
        }
        let answers = futures_util::future::join_all(answers).await;
        for (i, up) in answers.iter().enumerate() {
            let in_pool = probes.iter().filter(|p| p.2).count();
            let (endpoint, _, pooled) = &mut probes[i];
            if *up && !*pooled && client.add_endpoint(endpoint.as_str()).await.is_ok() {
                tracing::info!(%endpoint, "etcd member answers again; back in the pool");
                *pooled = true;
            } else if !*up
                && *pooled
                && in_pool > 1
                && client.remove_endpoint(endpoint.as_str()).await.is_ok()
            {
                tracing::warn!(%endpoint, "etcd member does not answer or has no leader; out of the pool until it answers with one");
                *pooled = false;
            }
        }
    }
}

/// An etcd client on the caller's runtime (for async users such as the
/// fleet), bounded by the configured timeout.
pub(crate) async fn connect(config: &EtcdConfig) -> Result<Client, StoreError> {
    let endpoints = config.endpoints.join(", ");
    let options = connect_options(config)?;
    match tokio::time::timeout(
        config.timeout,
        Client::connect(config.endpoints.clone(), Some(options)),
    )
    .await
    {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(CallError::Etcd(e).describe(&endpoints, "connect", config.timeout)),
        Err(_) => Err(CallError::Timeout.describe(&endpoints, "connect", config.timeout)),
    }
}

/// The end of the key range of everything starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: to the end of the key space.
    vec![0]
}

/// Why a call on the store's runtime failed.
enum CallError {
    Etcd(etcd_client::Error),
    Timeout,
}

impl CallError {
    fn describe(self, endpoints: &str, what: &str, timeout: Duration) -> StoreError {
        match self {
            CallError::Etcd(e) => StoreError(format!("etcd at {endpoints}: {what} failed: {e}")),
            CallError::Timeout => StoreError(format!(
                "etcd at {endpoints}: no answer to {what} within {} (is etcd running and reachable?)",
                humantime::format_duration(timeout)
            )),
        }
    }
}

/// Runs `future` on `handle`'s runtime, bounded by `timeout`, and waits for
/// it from whatever thread (or runtime) the caller is on.
fn run_on<T, Fut>(
    handle: &tokio::runtime::Handle,
    timeout: Duration,
    future: Fut,
) -> Result<T, CallError>
where
    T: Send + 'static,
    Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let result = tokio::time::timeout(timeout, future).await;
        let _ = tx.send(result);
    });
    // The spawned task enforces the timeout; the margin only covers a
    // runtime that is shutting down.
    let wait = || rx.recv_timeout(timeout + Duration::from_secs(1));
    let received = match tokio::runtime::Handle::try_current() {
        Ok(current) if current.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    };
    match received {
        Ok(Ok(Ok(value))) => Ok(value),
        Ok(Ok(Err(e))) => Err(CallError::Etcd(e)),
        Ok(Err(_)) | Err(_) => Err(CallError::Timeout),
    }
}

impl Store for EtcdStore {
    fn lease_version(&self, region: &RegionId) -> Result<u64, StoreError> {
        let version_key = self.keys.region_version(region);
        let response = self.call("read", move |mut c| async move {
            c.get(version_key, None).await
        })?;
        parse_version(response.kvs().first())
    }

    fn region_leases(&self, region: &RegionId) -> Result<RegionLeases, StoreError> {
        let version_key = self.keys.region_version(region);
        let leases_key = self.keys.region_leases(region);
        let response = self.call("read", move |mut c| async move {
            c.get(version_key, None).await
        })?;
        let revision = response.header().map(|h| h.revision());
        let version = parse_version(response.kvs().first())?;
        // The leases as of the revision the version was read at.
        let leases = self
            .range(leases_key, revision, PAGE)?
            .iter()
            .map(|kv| serde_json::from_slice::<Lease>(kv.value()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RegionLeases::from_parts(version, leases))
    }

    fn commit_leases(&self, txn: &Txn) -> Result<Result<(), Conflict>, StoreError> {
        let version_key = self.keys.region_version(&txn.region);
        let guard = if txn.expected_version == 0 {
            Compare::version(version_key.clone(), CompareOp::Equal, 0)
        } else {
            Compare::value(
                version_key.clone(),
                CompareOp::Equal,
                txn.expected_version.to_string(),
            )
        };
        let next = txn
            .expected_version
            .checked_add(1)
            .ok_or_else(|| StoreError("region version overflow".into()))?;
        let mut ops = vec![TxnOp::put(version_key.clone(), next.to_string(), None)];
        for prefix in &txn.delete {
            ops.push(TxnOp::delete(self.keys.lease(&txn.region, prefix), None));
        }
        for lease in &txn.put {
            ops.push(TxnOp::put(
                self.keys.lease(&txn.region, &lease.prefix),
                serde_json::to_vec(lease)?,
                None,
            ));
        }
        let request = EtcdTxn::new()
            .when([guard])
            .and_then(ops)
            .or_else([TxnOp::get(version_key, None)]);
        let response = self.call(
            "lease commit",
            move |mut c| async move { c.txn(request).await },
        )?;
        if response.succeeded() {
            return Ok(Ok(()));
        }
        let responses = response.op_responses();
        let found = parse_version(responses.first().and_then(|r| get_kvs(r).first()))?;
        Ok(Err(Conflict {
            expected: txn.expected_version,
            found,
        }))
    }

    fn site(&self, site: &SiteId) -> Result<Option<SiteRecord>, StoreError> {
        let key = self.keys.site(site);
        let kvs = self.call("read", move |mut c| async move {
            Ok(c.get(key, None).await?.take_kvs())
        })?;
        Ok(match kvs.first() {
            Some(kv) => Some(serde_json::from_slice(kv.value())?),
            None => None,
        })
    }

    fn sites(&self) -> Result<Vec<SiteRecord>, StoreError> {
        self.get_prefix(self.keys.sites())?
            .iter()
            .map(|kv| Ok(serde_json::from_slice(kv.value())?))
            .collect()
    }

    fn put_site(&self, record: &SiteRecord) -> Result<(), StoreError> {
        self.put_json(self.keys.site(&record.site), record)
    }

    fn put_cert(&self, record: &CertRecord) -> Result<(), StoreError> {
        self.put_json(self.keys.cert(record), record)
    }

    fn certs_of(&self, site: &SiteId) -> Result<Vec<CertRecord>, StoreError> {
        self.get_prefix(self.keys.certs_of(site))?
            .iter()
            .map(|kv| Ok(serde_json::from_slice(kv.value())?))
            .collect()
    }

    fn revoke(&self, entry: &Revoked) -> Result<(), StoreError> {
        self.put_json(
            self.keys.revocation(entry),
            &StoredRevocation::from_entry(entry),
        )
    }

    fn reinstate(&self, entry: &Revoked) -> Result<(), StoreError> {
        let key = self.keys.revocation(entry);
        self.call("delete", move |mut c| async move {
            c.delete(key, None).await?;
            Ok(())
        })
    }

    fn revocations(&self) -> Result<Vec<Revoked>, StoreError> {
        self.get_prefix(self.keys.revocations())?
            .iter()
            .map(|kv| serde_json::from_slice::<StoredRevocation>(kv.value())?.into_entry())
            .collect()
    }

    fn is_revoked(&self, entry: &Revoked) -> Result<bool, StoreError> {
        let key = self.keys.revocation(entry);
        let kvs = self.call("read", move |mut c| async move {
            Ok(c.get(key, None).await?.take_kvs())
        })?;
        Ok(!kvs.is_empty())
    }

    fn append_event(
        &self,
        site: &SiteId,
        event: &SiteEvent,
        limit: usize,
    ) -> Result<(), StoreError> {
        // Read, append, and write back if nobody wrote in between (two
        // brokers may see one site's events: its old and its new one).
        let key = self.keys.events_of(site);
        for _ in 0..EVENT_APPEND_ATTEMPTS {
            let k = key.clone();
            let kvs = self.call("read", move |mut c| async move {
                Ok(c.get(k, None).await?.take_kvs())
            })?;
            let (mut timeline, compare) = match kvs.first() {
                Some(kv) => (
                    serde_json::from_slice::<Timeline>(kv.value())?,
                    Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision()),
                ),
                None => (
                    Timeline::default(),
                    Compare::version(key.clone(), CompareOp::Equal, 0),
                ),
            };
            timeline.push(event.clone(), limit);
            let request = EtcdTxn::new().when([compare]).and_then([TxnOp::put(
                key.clone(),
                serde_json::to_vec(&timeline)?,
                None,
            )]);
            let response = self.call("write", move |mut c| async move { c.txn(request).await })?;
            if response.succeeded() {
                return Ok(());
            }
        }
        Err(StoreError(format!(
            "the event timeline of site {site} kept changing during {EVENT_APPEND_ATTEMPTS} attempts to append to it"
        )))
    }

    fn timeline(&self, site: &SiteId) -> Result<Timeline, StoreError> {
        let key = self.keys.events_of(site);
        let kvs = self.call("read", move |mut c| async move {
            Ok(c.get(key, None).await?.take_kvs())
        })?;
        Ok(match kvs.first() {
            Some(kv) => serde_json::from_slice(kv.value())?,
            None => Timeline::default(),
        })
    }

    fn timelines(&self) -> Result<Vec<(SiteId, Timeline)>, StoreError> {
        // Read in small pages: one page of full timelines could otherwise
        // exceed gRPC's message limit where a page of other records does
        // not, and one request per site is slow at start with many sites.
        let dir = self.keys.events();
        self.range(dir.clone(), None, TIMELINE_PAGE)?
            .into_iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let site = key
                    .strip_prefix(&dir)
                    .and_then(|s| SiteId::new(s).ok())
                    .ok_or_else(|| StoreError(format!("unexpected key {key}")))?;
                Ok((site, serde_json::from_slice(kv.value())?))
            })
            .collect()
    }

    fn ca_state(&self) -> Result<Option<String>, StoreError> {
        let key = self.keys.ca();
        let kvs = self.call("read", move |mut c| async move {
            Ok(c.get(key, None).await?.take_kvs())
        })?;
        kvs.first()
            .map(|kv| {
                String::from_utf8(kv.value().to_vec())
                    .map_err(|_| StoreError("corrupt CA state: not UTF-8".into()))
            })
            .transpose()
    }

    fn swap_ca_state(&self, expected: Option<&str>, new: &str) -> Result<bool, StoreError> {
        let key = self.keys.ca();
        let guard = match expected {
            None => Compare::version(key.clone(), CompareOp::Equal, 0),
            Some(old) => Compare::value(key.clone(), CompareOp::Equal, old),
        };
        let request = EtcdTxn::new()
            .when([guard])
            .and_then([TxnOp::put(key, new, None)]);
        let response = self.call("CA state write", move |mut c| async move {
            c.txn(request).await
        })?;
        Ok(response.succeeded())
    }

    fn watch(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }
}

/// How often token creation re-reads the site's tokens when another writer
/// changed them in between.
const TOKEN_PUT_ATTEMPTS: usize = 8;

impl TokenLedger for EtcdStore {
    fn put(&self, record: TokenRecord) -> Result<(), String> {
        // One transaction writes the new token and marks the site's earlier
        // ones replaced, provided none of them changed since they were read
        // (else read again): only the latest code of a site stays valid.
        let run = || -> Result<(), StoreError> {
            let new = serde_json::to_vec(&StoredToken::from_record(&record))?;
            for _ in 0..TOKEN_PUT_ATTEMPTS {
                let mut compares = Vec::new();
                let mut ops = Vec::new();
                for kv in self.get_prefix(self.keys.tokens())? {
                    let mut stored: StoredToken = serde_json::from_slice(kv.value())?;
                    if stored.site == record.site && !stored.replaced {
                        stored.replaced = true;
                        compares.push(Compare::mod_revision(
                            kv.key().to_vec(),
                            CompareOp::Equal,
                            kv.mod_revision(),
                        ));
                        ops.push(TxnOp::put(
                            kv.key().to_vec(),
                            serde_json::to_vec(&stored)?,
                            None,
                        ));
                    }
                }
                ops.push(TxnOp::put(self.keys.token(&record.hash), new.clone(), None));
                let request = EtcdTxn::new().when(compares).and_then(ops);
                let response = self.call("token creation", move |mut c| async move {
                    c.txn(request).await
                })?;
                if response.succeeded() {
                    return Ok(());
                }
            }
            Err(StoreError(format!(
                "the tokens of site {} kept changing during {TOKEN_PUT_ATTEMPTS} attempts to create a new one; retry",
                record.site
            )))
        };
        run().map_err(|e| e.to_string())
    }

    fn take(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, String> {
        let (key, marker) = (self.keys.token(hash), self.keys.redeemed(hash));
        let run = || -> Result<Option<TokenRecord>, StoreError> {
            for _ in 0..TOKEN_TAKE_ATTEMPTS {
                let read = EtcdTxn::new().and_then([
                    TxnOp::get(key.clone(), None),
                    TxnOp::get(marker.clone(), None),
                ]);
                let response =
                    self.call(
                        "token redemption",
                        move |mut c| async move { c.txn(read).await },
                    )?;
                let responses = response.op_responses();
                let found = |i: usize| responses.get(i).and_then(|r| get_kvs(r).first());
                if let Some(kv) = found(1) {
                    let left: RedeemedMarker = serde_json::from_slice(kv.value())?;
                    if self.settle(hash, left.nonce) {
                        // This broker's earlier redemption committed; its
                        // answer was lost.
                        self.forget_marker(marker.clone());
                        return Ok(Some(left.token.into_record(*hash)));
                    }
                }
                let Some(kv) = found(0) else {
                    return Ok(None);
                };
                let token: StoredToken = serde_json::from_slice(kv.value())?;
                let nonce = rand::random::<u64>();
                let value = serde_json::to_vec(&RedeemedMarker { nonce, token })?;
                let take = EtcdTxn::new()
                    .when([Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        kv.mod_revision(),
                    )])
                    .and_then([
                        TxnOp::delete(key.clone(), None),
                        TxnOp::put(marker.clone(), value, None),
                    ]);
                // Only an answer that was lost leaves the nonce behind, for
                // a later attempt here to recognise its own marker: one
                // remembered while the call was in flight would let another
                // thread of this broker claim the marker as its own while
                // this one wins as well.
                let response =
                    match self.call(
                        "token redemption",
                        move |mut c| async move { c.txn(take).await },
                    ) {
                        Ok(response) => response,
                        Err(e) => {
                            self.unsettled_insert(*hash, nonce);
                            return Err(e);
                        }
                    };
                #[cfg(test)]
                if let Some(hook) = self
                    .on_redemption_answer
                    .lock()
                    .ok()
                    .and_then(|h| h.clone())
                {
                    hook();
                }
                if response.succeeded() {
                    self.forget_marker(marker.clone());
                    let token: StoredToken = serde_json::from_slice(kv.value())?;
                    return Ok(Some(token.into_record(*hash)));
                }
            }
            Err(StoreError(format!(
                "the token kept changing during {TOKEN_TAKE_ATTEMPTS} attempts to redeem it; retry"
            )))
        };
        run().map_err(|e| e.to_string())
    }
}

impl EtcdStore {
    /// Remembers the nonce of a redemption about to be sent.
    fn unsettled_insert(&self, hash: TokenHash, nonce: u64) {
        if let Ok(mut unsettled) = self.unsettled.lock() {
            unsettled.insert(hash, nonce);
        }
    }

    /// Forgets the unsettled redemption of `hash` if its nonce is `nonce`;
    /// whether it was.
    fn settle(&self, hash: &TokenHash, nonce: u64) -> bool {
        let Ok(mut unsettled) = self.unsettled.lock() else {
            return false;
        };
        if unsettled.get(hash) == Some(&nonce) {
            unsettled.remove(hash);
            return true;
        }
        false
    }

    /// Deletes a settled redemption's marker, in the background.
    fn forget_marker(&self, marker: String) {
        if let Some(runtime) = &self.runtime.0 {
            let mut client = self.client.clone();
            runtime.spawn(async move {
                let _ = client.delete(marker, None).await;
            });
        }
    }

    /// Redeems `hash` as [`TokenLedger::take`] does, with `nonce`, but
    /// as if the answer were lost: the token is gone, the marker written,
    /// and the caller hears nothing (`remember`: whether this broker keeps
    /// the nonce, as after a lost answer, or another broker sent it).
    #[cfg(test)]
    pub(crate) fn redeem_unheard(&self, hash: &TokenHash, nonce: u64, remember: bool) {
        let (key, marker) = (self.keys.token(hash), self.keys.redeemed(hash));
        let read_key = key.clone();
        let value = self
            .call(
                "read",
                move |mut c| async move { c.get(read_key, None).await },
            )
            .ok()
            .and_then(|r| r.kvs().first().map(|kv| kv.value().to_vec()))
            .unwrap_or_default();
        let token: StoredToken =
            serde_json::from_slice(&value).unwrap_or_else(|_| panic!("no token to redeem"));
        let value = serde_json::to_vec(&RedeemedMarker { nonce, token }).unwrap_or_default();
        let take =
            EtcdTxn::new().and_then([TxnOp::delete(key, None), TxnOp::put(marker, value, None)]);
        let _ = self.call(
            "token redemption",
            move |mut c| async move { c.txn(take).await },
        );
        if remember {
            self.unsettled_insert(*hash, nonce);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn the_range_of_a_prefix_ends_after_its_last_key() {
        assert_eq!(prefix_end(b"/t/"), b"/t0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
    }
}
