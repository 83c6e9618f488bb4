//! The edge agent as a Kubernetes workload would run it, with the real
//! binaries in the topology of `tether_netns_tests::topology`: the
//! operator renders a site bundle (`tether-broker site bundle`); the agent
//! starts with the bundle's configuration and enrollment code as the
//! Deployment passes them (a file from the Secret, environment variables),
//! enrolls on its first start, and its health endpoint follows the real
//! tunnel: ready while up, not ready while the broker is gone, ready again
//! after. A restart keeps the identity without the code; a used code on a
//! site without identity stops the agent with exit status 3 and the
//! reason. And the agent's container image (`deploy/containers/build`,
//! tag `test`) does the same run as the bundle's Deployment describes it
//! (`deploy/containers/manifest-run`: its privileges, every capability
//! dropped but NET_ADMIN, a read-only root file system, /dev/net/tun; its
//! environment, volumes, image and arguments).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use tether_netns_tests::topology::{BROKER, Topology, read};
use tether_netns_tests::{binary, require_root, wait_for};

const HEALTH: &str = "127.0.0.1:8081";

/// `/readyz` in the site namespace: (HTTP status, body).
fn readyz(topo: &Topology) -> (u16, String) {
    let out = topo
        .site
        .command("curl")
        .args([
            "-s",
            "-m",
            "2",
            "-w",
            "\n%{http_code}",
            &format!("http://{HEALTH}/readyz"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The value of `key:` in a bundle file (a JSON-quoted scalar).
fn yaml_value(text: &str, key: &str) -> String {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("no {key} in:\n{text}"));
    let value = line.trim_start()[key.len() + 2..].trim();
    serde_json::from_str(value).unwrap_or_else(|_| value.to_string())
}

/// The agent's configuration from the bundle's ConfigMap.
fn agent_config(configmap: &str) -> String {
    configmap
        .split("  tether.toml: |\n")
        .nth(1)
        .unwrap()
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

fn env<'a>(config: &'a str, code_file: &'a str, broker: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("TETHER_CONFIG", config),
        ("TETHER_ENROLL_TOKEN_FILE", code_file),
        ("TETHER_BROKER", broker),
        ("TETHER_HEALTH_LISTEN", HEALTH),
        ("TETHER_LOG_FORMAT", "json"),
    ]
}

#[test]
fn a_bundled_site_enrolls_on_first_start_and_its_readiness_follows_the_tunnel() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::new("").unwrap();
    let bundle = topo.path("bundle");
    let printed = topo
        .broker_cli(&[
            "site",
            "bundle",
            "--site",
            "clinic-k8s",
            "--region",
            "eu",
            "--out",
            &bundle.display().to_string(),
            "--broker",
            BROKER,
        ])
        .unwrap();
    assert!(printed.contains("Bundle for site clinic-k8s"), "{printed}");
    let secret = std::fs::read_to_string(bundle.join("secret.yaml")).unwrap();
    let configmap = std::fs::read_to_string(bundle.join("configmap.yaml")).unwrap();
    // The Secret and ConfigMap as the pod sees them.
    let code_file = topo.path("enrollment-code");
    std::fs::write(&code_file, yaml_value(&secret, "code")).unwrap();
    let config = topo.path("tether.toml");
    let text = agent_config(&configmap).replace(
        "state_dir = \"/var/lib/tether\"",
        &format!("state_dir = {:?}", topo.path("state").display().to_string()),
    );
    std::fs::write(&config, text).unwrap();
    let broker = yaml_value(&configmap, "broker");
    assert_eq!(broker, BROKER);
    let (config_s, code_s) = (
        config.display().to_string(),
        code_file.display().to_string(),
    );
    let state = topo.path("unused-default-state");

    let mut agent = topo
        .spawn_up(&state, "agent.log", &env(&config_s, &code_s, &broker))
        .unwrap();
    let log = topo.path("agent.log");
    assert!(
        wait_for(Duration::from_secs(20), || readyz(&topo).0 == 200),
        "not ready: {:?}\n{}",
        readyz(&topo),
        read(&log)
    );
    let (_, body) = readyz(&topo);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["state"], "up", "{body}");
    let address = health["addresses"][0].as_str().unwrap().to_string();
    assert!(address.starts_with("100.64."), "{body}");
    assert!(topo.backend_pings(&address));
    let lines = read(&log);
    assert!(
        lines
            .lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "every log line is JSON:\n{lines}"
    );
    assert!(
        lines.contains("enrolled; the key and certificate are kept"),
        "{lines}"
    );

    // The broker goes away: not ready, with the reason; back: ready.
    topo.broker.take().unwrap().kill();
    assert!(
        wait_for(Duration::from_secs(30), || readyz(&topo).0 == 503),
        "still ready without a broker: {:?}",
        readyz(&topo)
    );
    let (_, body) = readyz(&topo);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        health["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{body}"
    );
    topo.start_broker().unwrap();
    assert!(
        wait_for(Duration::from_secs(40), || readyz(&topo).0 == 200),
        "not ready again: {:?}\n{}",
        readyz(&topo),
        read(&log)
    );

    // A restart (the pod on another node, with its volume): the code is
    // used by now, the identity stays, the address too.
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(10)));
    let _agent = topo
        .spawn_up(&state, "agent2.log", &env(&config_s, &code_s, &broker))
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || readyz(&topo).0 == 200),
        "not ready after a restart:\n{}",
        read(&topo.path("agent2.log"))
    );
    let (_, body) = readyz(&topo);
    assert!(body.contains(&format!("\"{address}\"")), "{body}");
    assert!(!read(&topo.path("agent2.log")).contains("enrolling"));

    // The same (used) code for a site without identity: exit status 3 and
    // the reason in plain words.
    let fresh = topo.path("fresh.toml");
    std::fs::write(
        &fresh,
        agent_config(&configmap).replace(
            "state_dir = \"/var/lib/tether\"",
            &format!(
                "state_dir = {:?}",
                topo.path("fresh-state").display().to_string()
            ),
        ),
    )
    .unwrap();
    let out = topo
        .site
        .command(&binary("tether").display().to_string())
        .arg("up")
        .envs(env(&fresh.display().to_string(), &code_s, &broker))
        .env("TETHER_LOG_FORMAT", "text")
        .env("TETHER_HEALTH_LISTEN", "127.0.0.1:8082")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot enroll with the code in {code_s}: the broker refused enrollment: the enrollment token is unknown or was already used; ask the operator for a new one"
        )),
        "{stderr}"
    );
    assert!(
        !Path::new(&topo.path("fresh-state"))
            .join("site.crt")
            .exists()
    );
}

/// The agent's container, removed on drop (killing `podman run` would
/// leave it running).
struct Container {
    name: String,
}

impl Container {
    /// Starts the container `podman run ARGS` describes (detached), named
    /// `name`; removed on drop, also when starting fails.
    fn start(name: String, args: &[String]) -> Self {
        let container = Self { name };
        let started = std::process::Command::new("podman")
            .args(args)
            .output()
            .unwrap();
        assert!(
            started.status.success(),
            "podman run failed: {}",
            String::from_utf8_lossy(&started.stderr)
        );
        container
    }

    /// Its output so far.
    fn logs(&self) -> String {
        let out = std::process::Command::new("podman")
            .args(PODMAN)
            .args(["logs", &self.name])
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = std::process::Command::new("podman")
            .args(PODMAN)
            .args(["rm", "-f", "-t", "2", &self.name])
            .output();
    }
}

/// How `deploy/containers/build` runs podman in CI containers.
const PODMAN: [&str; 4] = ["--runtime", "runc", "--cgroup-manager", "cgroupfs"];

fn have_image(image: &str) -> bool {
    std::process::Command::new("podman")
        .args(PODMAN)
        .args(["image", "exists", image])
        .status()
        .is_ok_and(|s| s.success())
}

/// `deploy/containers/manifest-run FILE QUESTION ARGS...`: one line each.
fn manifest_run(file: &Path, question: &str, args: &[std::path::PathBuf]) -> Vec<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/containers/manifest-run");
    let out = std::process::Command::new(script)
        .arg(file)
        .arg(question)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "manifest-run {question}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn the_agent_image_runs_with_only_net_admin_and_a_read_only_root() {
    if !require_root() {
        return;
    }
    let image = "localhost/tether:test";
    if !have_image(image) {
        // CI builds the images before the tests.
        assert!(
            std::env::var_os("CI").is_none(),
            "no {image}: run deploy/containers/build first"
        );
        eprintln!("skipped: no {image} (deploy/containers/build target/debug)");
        return;
    }
    let topo = Topology::new("").unwrap();
    let bundle = topo.path("bundle");
    topo.broker_cli(&[
        "site",
        "bundle",
        "--site",
        "clinic-image",
        "--region",
        "eu",
        "--out",
        &bundle.display().to_string(),
        "--broker",
        BROKER,
        "--image",
        image,
    ])
    .unwrap();
    // The pod as the bundle's Deployment describes it: its privileges,
    // environment (the broker from the ConfigMap), volumes (the ConfigMap's
    // tether.toml, the Secret's code, the state volume), image and args.
    let deployment = bundle.join("deployment.yaml");
    let resources = [bundle.join("configmap.yaml"), bundle.join("secret.yaml")];
    let pod = topo.path("pod");
    let mut args: Vec<String> = PODMAN.iter().map(|s| s.to_string()).collect();
    let name = format!("tether-agent-{}", std::process::id());
    args.extend(
        [
            "run",
            "-d",
            "--name",
            &name,
            // The site's namespace (`ip netns exec` would hide the
            // cgroup mounts podman needs).
            "--network",
            &format!("ns:/run/netns/{}", topo.site.name()),
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ]
        .map(String::from),
    );
    args.extend(manifest_run(&deployment, "flags", &resources));
    args.extend(manifest_run(
        &deployment,
        "volumes",
        &[std::slice::from_ref(&pod), &resources[..]].concat(),
    ));
    let manifest_image = manifest_run(&deployment, "image", &[]);
    assert_eq!(manifest_image, [image], "the bundle names another image");
    args.push(image.to_string());
    args.extend(manifest_run(&deployment, "args", &[]));
    for (flag, want) in [
        ("--cap-add=NET_ADMIN", true),
        ("--cap-drop=all", true),
        ("--read-only", true),
        ("--device=/dev/net/tun:/dev/net/tun", true),
        (&format!("--env=TETHER_BROKER={BROKER}"), true),
    ] {
        assert_eq!(args.iter().any(|a| a == flag), want, "{flag} in {args:?}");
    }
    // The state volume, by the name the Deployment gives it.
    let state = pod.join("state");
    let container = Container::start(name.clone(), &args);
    let logs = || container.logs();
    assert!(
        wait_for(Duration::from_secs(30), || readyz(&topo).0 == 200),
        "the agent image is not ready: {:?}\n{}",
        readyz(&topo),
        logs()
    );
    let (_, body) = readyz(&topo);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    let address = health["addresses"][0].as_str().unwrap().to_string();
    assert!(
        wait_for(Duration::from_secs(10), || topo.backend_pings(&address)),
        "backend cannot ping {address}\n{}",
        logs()
    );
    // The identity is on the volume, not in the container.
    assert!(state.join("site.crt").exists() && state.join("site.key").exists());
    drop(container);

    // The same pod without NET_ADMIN: the agent cannot create its device
    // and says so, in its log and in /readyz (the site enrolled above, so
    // it connects first).
    let bare_name = format!("{name}-bare");
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            if *a == name {
                bare_name.clone()
            } else {
                a.clone()
            }
        })
        .collect();
    let args: Vec<String> = args
        .into_iter()
        .filter(|a| a != "--cap-add=NET_ADMIN")
        .collect();
    assert!(!args.iter().any(|a| a.contains("NET_ADMIN")));
    let bare = Container::start(bare_name, &args);
    let bare_logs = || bare.logs();
    let said = "cannot create the tunnel device tether0 (run as root, or with CAP_NET_ADMIN)";
    assert!(
        wait_for(Duration::from_secs(30), || bare_logs().contains(said)),
        "the agent without NET_ADMIN did not say why it has no device:\n{}",
        bare_logs()
    );
    // It stays up to retry, and is never ready: the pod would not be.
    let (code, body) = readyz(&topo);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"ready\":false"), "{body}");
}
