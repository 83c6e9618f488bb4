//! The README's walk-through (`scripts/demo`) runs as documented.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use tether_netns_tests::{bin_dir, require_root};

#[test]
fn the_walkthrough_script_works() {
    if !require_root() {
        return;
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/demo");
    let out = Command::new("timeout")
        .arg("120")
        .arg(&script)
        .env("TETHER_BIN_DIR", bin_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("-> hello from hospital-a"), "{stdout}");
    assert!(stdout.contains("== done"), "{stdout}");
}
