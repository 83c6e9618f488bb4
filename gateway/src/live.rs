//! The live route set, as the running gateway last received it, kept in
//! the state directory (`routes.json`) for `tether-gateway cilium` and for
//! operators.

use std::path::Path;
use std::time::SystemTime;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tether_proto::gateway::SiteRoute;
use tether_proto::ids::{GatewayId, RegionId};

/// Name of the file in the state directory.
pub const FILE: &str = "routes.json";

/// The route set with where and when it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveRoutes {
    /// The gateway.
    pub gateway: GatewayId,
    /// Its region.
    pub region: RegionId,
    /// The broker that sent the set (`address:port`).
    pub broker: String,
    /// The set's generation.
    pub generation: u64,
    /// When it was received, seconds since the Unix epoch.
    pub received_at: u64,
    /// The routes installed.
    pub routes: Vec<SiteRoute>,
}

impl LiveRoutes {
    /// Writes the file atomically.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_vec_pretty(self)?;
        tether_pki::ca::replace_file(&dir.join(FILE), &text, 0o644)
            .with_context(|| format!("cannot write {}", dir.join(FILE).display()))
    }

    /// Reads the file.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(FILE);
        let text = std::fs::read(&path).with_context(|| {
            format!(
                "cannot read {} (has `tether-gateway run` received routes from a broker yet?)",
                path.display()
            )
        })?;
        serde_json::from_slice(&text).with_context(|| format!("{} is damaged", path.display()))
    }

    /// Seconds since the set was received.
    pub fn age_secs(&self) -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
            .saturating_sub(self.received_at)
    }
}
