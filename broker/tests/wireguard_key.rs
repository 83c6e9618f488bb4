//! `[wireguard] key_file`: brokers that share one WireGuard key (the file
//! every broker of a fleet mounts, e.g. from one Kubernetes Secret) show
//! gateways that one key, and write none of their own; a configured file
//! that is missing is an error that says what to do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

fn config(dir: &Path, name: &str, key_file: &Path) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "data_dir = {:?}\nlisten = [\"127.0.0.1:0\"]\nadvertised = [\"127.0.0.1\"]\n\n[wireguard]\nkey_file = {:?}\n",
            dir.join(name),
            key_file
        ),
    )
    .unwrap();
    path
}

fn gateway_key(config: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tether-broker"))
        .args(["gateway", "key", "-c"])
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn brokers_sharing_a_key_file_show_gateways_one_key() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared.key");
    let (key, created) = tether_pki::wg::WgKey::load_or_create(&shared).unwrap();
    assert!(created);
    let public = tether_pki::wg::encode(&key.public());

    for name in ["broker-0", "broker-1"] {
        let (ok, stdout, stderr) = gateway_key(&config(dir.path(), name, &shared));
        assert!(ok, "{stderr}");
        assert_eq!(stdout, public, "{name} shows the shared key");
        assert!(
            !dir.path().join(name).join("wireguard.key").exists(),
            "{name} wrote no key of its own"
        );
    }

    let missing = dir.path().join("nowhere.key");
    let (ok, _, stderr) = gateway_key(&config(dir.path(), "broker-2", &missing));
    assert!(!ok);
    assert!(
        stderr.contains("(wireguard.key_file) does not exist") && stderr.contains("wg genkey"),
        "{stderr}"
    );
    assert!(!missing.exists(), "a configured key file is never written");
}
