//! `tether-broker site bundle` against a running broker: the bundle holds
//! a fresh enrollment code for a site the broker now knows, and every
//! manifest in it validates against the Kubernetes schemas
//! (`deploy/check-manifests`, with the PyPI package kubernetes-validate;
//! where it is missing the schema check is skipped, except in CI).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

struct Broker {
    child: Child,
    config: PathBuf,
    /// The admin API's URL.
    admin: String,
    dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A broker on loopback, serving once its banner is printed.
fn broker() -> Broker {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\npublished_cidr = \"127.0.0.0/16\"\nlisten = [\"127.0.0.1:0\"]\nadvertised = [\"127.0.0.1\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n[dns]\nlisten = [\"127.0.0.1:0\"]\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether-broker"))
        .args(["run", "-c"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut admin = None;
    loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            panic!("the broker stopped before serving");
        }
        // "  admin API     http://127.0.0.1:PORT (token in …)"
        if let Some(rest) = line.trim().strip_prefix("admin API") {
            admin = rest.split_whitespace().next().map(str::to_string);
        }
        if line.contains("tether up") {
            break;
        }
    }
    // The CLI finds the admin API by the configuration: name the port the
    // broker took instead of 0.
    let admin = admin.expect("the banner names the admin API");
    Broker {
        child,
        admin: admin.clone(),
        config: {
            let text = std::fs::read_to_string(&config).unwrap().replace(
                "[admin]\nlisten = \"127.0.0.1:0\"",
                &format!(
                    "[admin]\nlisten = \"{}\"",
                    admin.trim_start_matches("http://")
                ),
            );
            std::fs::write(&config, text).unwrap();
            config
        },
        dir,
    }
}

fn cli(broker: &Broker, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tether-broker"))
        .args(args)
        .arg("-c")
        .arg(&broker.config)
        .output()
        .unwrap()
}

/// Runs deploy/check-manifests on `path`; false when kubernetes-validate
/// is not installed outside CI.
fn check_manifests(path: &Path) -> bool {
    let have = Command::new("python3")
        .args(["-c", "import kubernetes_validate"])
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs kubernetes-validate (pip install kubernetes-validate)"
        );
        eprintln!("skipped: kubernetes-validate is not installed");
        return false;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/check-manifests");
    let bin = Path::new(env!("CARGO_BIN_EXE_tether-broker"))
        .parent()
        .unwrap();
    let mut cmd = Command::new(script);
    // The configuration checks need the agent's binary next to the broker's.
    if bin.join("tether").exists() {
        cmd.arg("--bin").arg(bin);
    }
    let out = cmd.arg(path).output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

#[test]
fn a_site_bundle_holds_a_fresh_code_and_valid_manifests() {
    let broker = broker();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("clinic");
    let done = cli(
        &broker,
        &[
            "site",
            "bundle",
            "--site",
            "clinic-7",
            "--region",
            "local",
            "--out",
            &out.display().to_string(),
        ],
    );
    let printed = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(
        printed.contains("Bundle for site clinic-7 in region local"),
        "{printed}"
    );
    assert!(printed.contains("brokers      127.0.0.1:"), "{printed}");

    let secret = std::fs::read_to_string(out.join("secret.yaml")).unwrap();
    assert!(secret.contains("  code: \"tt1-"), "{secret}");
    let config = std::fs::read_to_string(out.join("configmap.yaml")).unwrap();
    assert!(
        config.contains("published_cidr = \"127.0.0.0/16\""),
        "{config}"
    );
    // The code registered the site, as `token create` does.
    let sites = cli(&broker, &["sites"]);
    assert!(String::from_utf8_lossy(&sites.stdout).contains("clinic-7"));

    // The same directory again: refused, nothing overwritten.
    let again = Command::new(env!("CARGO_BIN_EXE_tether-broker"))
        .args([
            "site", "bundle", "--site", "clinic-8", "--region", "local", "--out",
        ])
        .arg(&out)
        .arg("-c")
        .arg(&broker.config)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("is not empty"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(out.join("secret.yaml")).unwrap(),
        secret
    );

    // One file of manifests.
    let single = dir.path().join("single");
    let done = cli(
        &broker,
        &[
            "site",
            "bundle",
            "--site",
            "clinic-9",
            "--region",
            "local",
            "--format",
            "manifests",
            "--broker",
            "broker.example.org",
            "--out",
            &single.display().to_string(),
        ],
    );
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let all = std::fs::read_to_string(single.join("tether-site.yaml")).unwrap();
    assert!(all.contains("  broker: \"broker.example.org\"\n"), "{all}");

    check_manifests(&out);
    check_manifests(&single.join("tether-site.yaml"));
}

/// Off-cluster, the operator has the admin API (a port-forward) and a token,
/// not the broker's configuration: the bundle takes the broker's endpoints
/// and published CIDR from the broker itself.
#[test]
fn a_site_bundle_needs_only_the_admin_api() {
    let broker = broker();
    // In a pod without a shell, `kubectl exec` runs this to get the tokens.
    let printed = cli(&broker, &["admin-token"]);
    assert!(printed.status.success());
    let token = String::from_utf8(printed.stdout).unwrap();
    assert_eq!(
        token.trim(),
        std::fs::read_to_string(broker.dir.path().join("data/admin.token"))
            .unwrap()
            .trim()
    );
    let viewer = cli(&broker, &["admin-token", "--viewer"]);
    assert_eq!(
        String::from_utf8(viewer.stdout).unwrap().trim(),
        std::fs::read_to_string(broker.dir.path().join("data/viewer.token"))
            .unwrap()
            .trim()
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("remote");
    let done = Command::new(env!("CARGO_BIN_EXE_tether-broker"))
        .args(["site", "bundle", "--site", "clinic-10", "--region", "local"])
        .arg("--out")
        .arg(&out)
        .env_remove("TETHER_BROKER_CONFIG")
        .env("TETHER_ADMIN_URL", &broker.admin)
        .env("TETHER_ADMIN_TOKEN", token.trim())
        // No configuration of any kind on this side.
        .env("HOME", dir.path())
        .current_dir(dir.path())
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let port = broker_port(&broker);
    assert!(
        printed.contains(&format!("brokers      127.0.0.1:{port}")),
        "{printed}"
    );
    let config = std::fs::read_to_string(out.join("configmap.yaml")).unwrap();
    assert!(
        config.contains("published_cidr = \"127.0.0.0/16\""),
        "the broker's published CIDR, not the defaults': {config}"
    );
    assert!(config.contains(&format!("127.0.0.1:{port}")), "{config}");
    let secret = std::fs::read_to_string(out.join("secret.yaml")).unwrap();
    assert!(secret.contains("  code: \"tt1-"), "{secret}");
}

/// The tunnel port the broker took, from its site list's enroll hint.
fn broker_port(broker: &Broker) -> u16 {
    let made = cli(
        broker,
        &["token", "create", "--site", "probe", "--region", "local"],
    );
    let text = String::from_utf8_lossy(&made.stdout).to_string();
    let at =
        text.find("--broker 127.0.0.1:").expect("enroll command") + "--broker 127.0.0.1:".len();
    text[at..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}
