//! Copying an embedded store into etcd (`tether-broker store migrate`).

use std::path::Path;
use std::time::SystemTime;

use tether_config::broker::EtcdConfig;
use tether_pki::kek::Kek;
use tether_pki::rotation::CaState;

use super::{EtcdStore, RedbStore, StoreError};

/// What [`migrate`] copied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// The etcd key prefix written.
    pub prefix: String,
    /// Keys deleted first (only with `force`).
    pub replaced: u64,
    /// Regions, with their lease version.
    pub regions: Vec<(String, u64)>,
    /// Leases over all regions.
    pub leases: usize,
    /// Site records.
    pub sites: usize,
    /// Certificate records.
    pub certs: usize,
    /// Revocations.
    pub revocations: usize,
    /// Unexpired enrollment tokens.
    pub tokens: usize,
    /// Expired tokens left behind.
    pub expired_tokens: usize,
    /// The CA state: how many CAs it holds, and the id of the
    /// key-encryption key their keys are sealed with (`None`: in clear, to
    /// be sealed by the first broker on etcd). `None` without a CA.
    pub ca: Option<(usize, Option<String>)>,
    /// Sites' event timelines.
    pub timelines: usize,
    /// Events over all timelines.
    pub events: usize,
}

impl std::fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "Copied into etcd under {}:", self.prefix)?;
        if self.replaced > 0 {
            writeln!(
                f,
                "  (replaced {} keys that were there, --force)",
                self.replaced
            )?;
        }
        for (region, version) in &self.regions {
            writeln!(f, "  region {region}: lease version {version}")?;
        }
        writeln!(f, "  leases        {}", self.leases)?;
        writeln!(f, "  sites         {}", self.sites)?;
        writeln!(f, "  certificates  {}", self.certs)?;
        writeln!(f, "  revocations   {}", self.revocations)?;
        writeln!(
            f,
            "  tokens        {} (skipped {} expired)",
            self.tokens, self.expired_tokens
        )?;
        writeln!(
            f,
            "  timelines     {} ({} events)",
            self.timelines, self.events
        )?;
        match &self.ca {
            None => write!(
                f,
                "  CA            none (the first broker on etcd makes one)"
            ),
            Some((n, Some(kek))) => write!(
                f,
                "  CA            {n} certificates with their keys, encrypted with key-encryption key {kek}"
            ),
            Some((n, None)) => write!(
                f,
                "  CA            {n} certificates with their keys, in clear (the first broker on etcd encrypts them)"
            ),
        }
    }
}

/// Copies everything from the embedded store at `from` into etcd: site
/// records, certificates, leases (same addresses, same region versions),
/// revocations, unexpired tokens and the CA state (certificates, sealed
/// keys, rotation phase), so no site enrolls again, and every site's event
/// timeline, read and written a page at a time. `kek` is the
/// key-encryption key the brokers on etcd will use: the CA keys must open
/// with it, else nothing is written. Refuses a prefix that already holds
/// keys unless `force`, which deletes them first. Stop the broker that
/// uses `from` before (the file is locked while it runs).
pub fn migrate(
    from: &Path,
    to: &EtcdConfig,
    kek: &Kek,
    force: bool,
    now: SystemTime,
) -> Result<MigrationReport, StoreError> {
    let source = RedbStore::open(from)?;
    let mut contents = source.contents()?;
    let ca = contents
        .ca
        .as_deref()
        .map(|raw| check_ca(raw, kek))
        .transpose()?;
    let target = EtcdStore::open(to)?;
    let existing = target.key_count()?;
    let mut report = MigrationReport {
        prefix: target.prefix().to_string(),
        ..MigrationReport::default()
    };
    if existing > 0 {
        if !force {
            return Err(StoreError(format!(
                "etcd prefix {} already holds {existing} keys; refusing to mix two stores (pass --force to delete them and copy anyway)",
                target.prefix()
            )));
        }
        report.replaced = target.clear()?;
    }
    let before = contents.tokens.len();
    contents.tokens.retain(|t| t.expires_at > now);
    report.expired_tokens = before - contents.tokens.len();
    target.write_contents(&contents)?;
    report.regions = contents
        .leases
        .iter()
        .map(|(region, leases)| (region.to_string(), leases.version()))
        .collect();
    report.leases = contents
        .leases
        .iter()
        .map(|(_, leases)| leases.leases().count())
        .sum();
    report.sites = contents.sites.len();
    report.certs = contents.certs.len();
    report.revocations = contents.revocations.len();
    report.tokens = contents.tokens.len();
    report.ca = ca;
    // Timelines last and page by page: all of them at once could be
    // hundreds of MiB at fleet size.
    let page_size = usize::try_from(super::etcd::TIMELINE_PAGE).unwrap_or(32);
    let mut after = None;
    loop {
        let page = source.timelines_after(after.as_ref(), page_size)?;
        let Some((last, _)) = page.last() else {
            break;
        };
        after = Some(last.clone());
        target.write_timelines(&page)?;
        report.timelines += page.len();
        report.events += page.iter().map(|(_, t)| t.len()).sum::<usize>();
    }
    Ok(report)
}

/// Checks that every CA key of the stored state `raw` opens with `kek`
/// (keys in clear need none); returns the CA count and the sealing KEK.
fn check_ca(raw: &str, kek: &Kek) -> Result<(usize, Option<String>), StoreError> {
    let mut state: CaState = serde_json::from_str(raw).map_err(|e| {
        StoreError(format!(
            "the CA state in the embedded store is damaged: {e}"
        ))
    })?;
    let mut sealed_with = None;
    let mut count = 0;
    for ca in state.cas_mut() {
        count += 1;
        kek.reveal(&ca.cert, &ca.key).map_err(|e| {
            StoreError(format!(
                "{e}; the brokers on etcd must use the key-encryption key of the embedded store (its data directory's ca-kek, unless [ca] named another)"
            ))
        })?;
        sealed_with = sealed_with.or(ca.key.kek_id().map(str::to_string));
    }
    Ok((count, sealed_with))
}
