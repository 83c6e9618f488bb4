//! Where the broker keeps its state when the configuration does not say.

use std::path::PathBuf;

/// `/var/lib/tether-broker` for root, else `~/.local/state/tether-broker`.
pub fn default_data_dir() -> PathBuf {
    tether_config::default_state_dir("tether-broker")
}
