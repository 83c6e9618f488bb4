//! What the browser tests of the fleet console need: Debian's Chromium,
//! driven by Playwright from Python (the scripts live in `tests/console/`).
//! Shared by the unprivileged console test and the one in network
//! namespaces.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Debian's Chromium.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Why a browser test cannot run here, if it cannot.
pub fn missing() -> Option<String> {
    if !Path::new(CHROMIUM).exists() {
        return Some(format!(
            "{CHROMIUM} is not installed (apt-get install chromium)"
        ));
    }
    let playwright = Command::new("python3")
        .args(["-c", "import playwright.sync_api"])
        .stderr(Stdio::null())
        .status();
    if !playwright.is_ok_and(|s| s.success()) {
        return Some("python3 cannot import playwright (pip install playwright)".into());
    }
    None
}

/// Whether a browser test can run here. When it cannot, it is skipped
/// with the reason, except in CI (`CI` set), where that is a failure.
pub fn available() -> bool {
    let Some(why) = missing() else {
        return true;
    };
    assert!(
        std::env::var_os("CI").is_none(),
        "the browser test must run in CI: {why}"
    );
    eprintln!("skipped: {why}");
    false
}

/// The repository's root (where `tests/console/` and `docs/` are).
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}
