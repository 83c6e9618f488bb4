//! Copying an embedded store into etcd (`tether-broker store migrate`).

use std::path::Path;
use std::time::SystemTime;

use tether_config::broker::EtcdConfig;

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
        write!(
            f,
            "  tokens        {} (skipped {} expired)",
            self.tokens, self.expired_tokens
        )
    }
}

/// Copies everything from the embedded store at `from` into etcd: site
/// records, certificates, leases (same addresses, same region versions),
/// revocations and unexpired tokens, so no site enrolls again. Refuses a
/// prefix that already holds keys unless `force`, which deletes them
/// first. Stop the broker that uses `from` before (the file is locked
/// while it runs).
pub fn migrate(
    from: &Path,
    to: &EtcdConfig,
    force: bool,
    now: SystemTime,
) -> Result<MigrationReport, StoreError> {
    let source = RedbStore::open(from)?;
    let mut contents = source.contents()?;
    drop(source);
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
    Ok(report)
}
