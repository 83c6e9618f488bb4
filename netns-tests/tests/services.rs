//! A site's announced services answered inside its edge cluster: the agent
//! forwards a port of the site's overlay address to a target named like a
//! Kubernetes Service, and a backend reaches it by the site's address and
//! by its SRV name.
//!
//! ```text
//!  backend 10.20.0.10 ── cloud (broker, DNS 10.20.0.1:53) ── wan ── hospital-fw ── site (tether up, tether0)
//!                                                                                    └── svc0 10.96.0.1
//!                                                                                          │
//!                                                           cluster eth0 10.96.0.10  web :8080 "pacs A"
//!                                                                        10.96.0.11  web :8080 "pacs B"
//! ```
//!
//! The cluster namespace has no route back to the backend: its answers
//! reach the backend only because the agent makes the forwarded traffic
//! come from its own address (10.96.0.1). The site resolves
//! `pacs.imaging.svc.cluster.local` through its hosts file
//! (`/etc/netns/<site>/hosts`), which the test changes, then sends SIGHUP:
//! the agent resolves the name again and the service moves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use tether_netns_tests::topology::{Topology, read};
use tether_netns_tests::{NetNs, link, require_root, wait_for};

/// Files `ip netns exec` mounts over `/etc` for one namespace
/// (`/etc/netns/<ns>/`); removed on drop.
struct EtcFiles(PathBuf);

impl EtcFiles {
    fn new(ns: &NetNs) -> Self {
        let dir = Path::new("/etc/netns").join(ns.name());
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) {
        // In place: the file is bind-mounted into running processes'
        // view of /etc, so it must keep its inode.
        let path = self.0.join(name);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)
            .unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
    }
}

impl Drop for EtcFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the backend fetches from `url` (one try, 2 s); empty on failure.
fn fetch(topo: &Topology, url: &str) -> String {
    topo.backend
        .command("curl")
        .args(["-s", "-m", "2", url])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default()
}

#[test]
fn announced_services_reach_their_targets_in_the_edge_cluster() {
    if !require_root() {
        return;
    }
    let topo = Topology::new("\n[dns]\nlisten = [\"10.20.0.1:53\"]\n").unwrap();
    let cluster = NetNs::new("cluster").unwrap();
    link(
        &topo.site,
        "svc0",
        "10.96.0.1/24",
        &cluster,
        "eth0",
        "10.96.0.10/24",
    )
    .unwrap();
    cluster
        .run("ip", &["addr", "add", "10.96.0.11/24", "dev", "eth0"])
        .unwrap();
    let _a = topo.serve_http(&cluster, "10.96.0.10", "pacs A\n", "pacs-a.log");
    let _b = topo.serve_http(&cluster, "10.96.0.11", "pacs B\n", "pacs-b.log");
    let etc = EtcFiles::new(&topo.site);
    etc.write("hosts", "10.96.0.10 pacs.imaging.svc.cluster.local\n");

    let state = topo.path("site-state");
    topo.enroll("lab-1", &state).unwrap();
    let config = state.join("tether.toml");
    let text = read(&config);
    assert!(text.contains("services = []"), "{text}");
    std::fs::write(
        &config,
        text.replace(
            "services = []",
            "services = [\"ssh=22\", { name = \"pacs\", port = 104, target = \"pacs.imaging.svc.cluster.local:8080\" }, { name = \"viewer\", port = 8000, target = \"10.96.0.10:8080\" }]",
        ),
    )
    .unwrap();
    let (mut site, addr) = topo.up(&state, "site.log").unwrap();
    let log = topo.path("site.log");
    assert!(
        wait_for(Duration::from_secs(10), || read(&log)
            .contains("104 -> 10.96.0.10:8080")),
        "the agent did not forward the service:\n{}",
        read(&log)
    );

    // By the site's overlay address: both forwarded ports land on the
    // cluster's service, from the agent's address.
    let mut page = String::new();
    assert!(
        wait_for(Duration::from_secs(10), || {
            page = fetch(&topo, &format!("http://{addr}:104/index.html"));
            page == "pacs A\n"
        }),
        "http://{addr}:104 gave {page:?}\nsite:\n{}",
        read(&log)
    );
    assert_eq!(
        fetch(&topo, &format!("http://{addr}:8000/index.html")),
        "pacs A\n"
    );
    let access = read(&topo.path("pacs-a.log"));
    assert!(
        access.contains("10.96.0.1 - -"),
        "the service sees the agent's address: {access}"
    );
    assert!(!access.contains("10.20.0.10"), "{access}");
    // A port nobody announced is not forwarded (8080 is the target's
    // port, not the site's).
    assert_eq!(fetch(&topo, &format!("http://{addr}:8080/index.html")), "");

    // By name: the SRV record announces the port on the overlay address.
    let name = "lab-1.eu.tether.internal";
    let srv = topo
        .backend
        .command("dig")
        .args([
            "@10.20.0.1",
            "+time=1",
            "+tries=1",
            "+short",
            &format!("_pacs._tcp.{name}"),
            "SRV",
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    assert_eq!(srv.trim(), format!("0 0 104 {name}."), "SRV: {srv}");
    let backend_etc = EtcFiles::new(&topo.backend);
    backend_etc.write(
        "resolv.conf",
        "nameserver 10.20.0.1\noptions timeout:1 attempts:2\n",
    );
    assert_eq!(
        fetch(&topo, &format!("http://{name}:104/index.html")),
        "pacs A\n"
    );

    // The Service moves; SIGHUP makes the agent resolve the name again.
    etc.write("hosts", "10.96.0.11 pacs.imaging.svc.cluster.local\n");
    site.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_for(Duration::from_secs(10), || {
            page = fetch(&topo, &format!("http://{name}:104/index.html"));
            page == "pacs B\n"
        }),
        "after SIGHUP http://{name}:104 gave {page:?}\nsite:\n{}",
        read(&log)
    );
    // The service given by address stays where it was.
    assert_eq!(
        fetch(&topo, &format!("http://{addr}:8000/index.html")),
        "pacs A\n"
    );

    // Stopped, the agent removes its table.
    site.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(site.wait_exit(Duration::from_secs(10)));
    let tables = topo
        .site
        .run("nft", &["list", "tables"])
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap();
    assert!(!tables.contains("tether_site"), "{tables}");
}
