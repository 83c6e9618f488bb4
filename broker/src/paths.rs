//! Where the broker keeps its state when the configuration does not say.

use std::path::PathBuf;

/// `/var/lib/tether-broker` for root, else `~/.local/state/tether-broker`.
pub fn default_data_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/tether-broker");
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("tether-broker")
}
