//! Backends find sites by name through the gateway's DNS:
//!
//! ```text
//! [backend: dig, curl by name] -- [gateway node: tether-gateway, DNS on :53] == WireGuard == [cloud: broker] == CONNECT-IP == [site]
//! ```
//!
//! Real binaries, `dig` from Debian's bind9-dnsutils, and the backend's
//! own resolver (glibc, through `/etc/netns/<ns>/resolv.conf`) for
//! connecting by name.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tether_netns_tests::topology::{Cloud, Gateway, Topology, read};
use tether_netns_tests::{NetNs, binary, require_root, wait_for};

/// `/etc/netns/<ns>/resolv.conf`, which `ip netns exec` mounts over
/// `/etc/resolv.conf`; removed on drop.
struct Resolver(PathBuf);

impl Resolver {
    fn new(ns: &NetNs, nameserver: &str) -> Self {
        let dir = Path::new("/etc/netns").join(ns.name());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {nameserver}\noptions timeout:1 attempts:2\n"),
        )
        .unwrap();
        Self(dir)
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `dig +short` output from the backend, one answer per line.
fn dig(backend: &NetNs, server: &str, args: &[&str]) -> String {
    let mut all = vec![format!("@{server}"), "+time=1".into(), "+tries=1".into()];
    all.extend(args.iter().map(|s| s.to_string()));
    let out = backend
        .command("dig")
        .args(&all)
        .output()
        .expect("dig (bind9-dnsutils) is needed");
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn status_of(full: &str) -> String {
    full.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("(no answer)")
        .to_string()
}

#[test]
fn backend_resolves_sites_by_name_through_the_gateway() {
    if !require_root() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let gw = Gateway::new(work.path(), "gw-eu", "eu").unwrap();
    let topo = Topology::new(&gw.broker_entry("10.34.0.0/24")).unwrap();
    let cloud = Cloud::new(&topo, 4).unwrap();
    // The gateway serves the zone on its backend-facing address, port 53.
    let dns = "10.34.0.1";
    gw.configure(&topo, &format!("\n[dns]\nlisten = \"{dns}:53\"\n"))
        .unwrap();
    let (_gateway, gw_log) = gw.start(&cloud).unwrap();

    // Two sites: lab-1 runs and announces a service; lab-2 is enrolled
    // but never connects.
    let state = topo.path("site-state");
    topo.enroll("lab-1", &state).unwrap();
    let config = state.join("tether.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("services = []"), "{text}");
    std::fs::write(
        &config,
        text.replace("services = []", "services = [\"http=8080\"]"),
    )
    .unwrap();
    let (_site, addr) = topo.up(&state, "site.log").unwrap();
    topo.enroll("lab-2", &topo.path("site2-state")).unwrap();

    let name = "lab-1.eu.tether.internal";
    let mut answer = String::new();
    assert!(
        wait_for(Duration::from_secs(10), || {
            answer = dig(&cloud.backend, dns, &["+short", name, "A"]);
            answer.trim() == addr
        }),
        "dig {name} at the gateway gave {answer:?}, want {addr}\ngateway:\n{}",
        read(&gw_log)
    );
    let srv = dig(
        &cloud.backend,
        dns,
        &["+short", &format!("_http._tcp.{name}"), "SRV"],
    );
    assert_eq!(srv.trim(), format!("0 0 8080 {name}."), "SRV: {srv}");
    let ptr = dig(&cloud.backend, dns, &["+short", "-x", &addr]);
    assert_eq!(ptr.trim(), format!("{name}."), "PTR: {ptr}");
    let lab2 = dig(&cloud.backend, dns, &["+short", "lab-2.eu.tether.internal"]);
    assert!(lab2.trim().starts_with("100.64."), "lab-2: {lab2:?}");
    let outside = dig(&cloud.backend, dns, &["example.org"]);
    assert_eq!(status_of(&outside), "REFUSED", "{outside}");
    let unknown = dig(&cloud.backend, dns, &["nobody.eu.tether.internal"]);
    assert_eq!(status_of(&unknown), "NXDOMAIN", "{unknown}");
    assert!(unknown.contains(" aa"), "not authoritative: {unknown}");

    // The backend connects by name with its own resolver.
    let _web = topo.serve_page("hello by name\n").unwrap();
    let _resolver = Resolver::new(&cloud.backend, dns);
    let mut page = String::new();
    assert!(
        wait_for(Duration::from_secs(10), || {
            page = cloud
                .backend
                .command("curl")
                .args(["-s", "-m", "3", &format!("http://{name}:8080/index.html")])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                .unwrap_or_default();
            page.contains("hello by name")
        }),
        "no page from http://{name}:8080: {page:?}"
    );

    // The operator traces the name: decision, site, session, residency.
    let token = topo.path("broker").join("admin.token");
    let trace = topo
        .cloud
        .command(&binary("tether").display().to_string())
        .args(["trace", name, "--token-file", &token.display().to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&trace.stdout).to_string();
    assert!(
        trace.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&trace.stderr)
    );
    println!("tether trace {name}:\n{text}");
    assert!(text.contains(&format!("{addr} via site lab-1")), "{text}");
    assert!(text.contains("over h3"), "{text}");
    assert!(text.contains("gw-eu (eu) permitted"), "{text}");
    assert!(text.contains("chosen: longest matching prefix"), "{text}");
    let routes = topo
        .cloud
        .command(&binary("tether").display().to_string())
        .args([
            "routes",
            "--site",
            "lab-1",
            "--token-file",
            &token.display().to_string(),
        ])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&routes.stdout).to_string();
    assert!(table.starts_with("PREFIX"), "{table}");
    assert!(table.contains(&format!("{addr}/32")), "{table}");
    // Without the token: refused, exit code 1; no broker: exit code 2.
    let refused = topo
        .cloud
        .command(&binary("tether").display().to_string())
        .args(["sites", "--token", "wrong"])
        .status()
        .unwrap();
    assert_eq!(refused.code(), Some(1));
    let unreachable = topo
        .cloud
        .command(&binary("tether").display().to_string())
        .args(["sites", "--token", "x", "--admin-url", "http://127.0.0.1:1"])
        .status()
        .unwrap();
    assert_eq!(unreachable.code(), Some(2));

    // Revoked: the name is gone at the gateway within a second.
    let revoked = Instant::now();
    topo.broker_cli(&["site", "revoke", "--site", "lab-1", "--region", "eu"])
        .unwrap();
    let mut status = String::new();
    assert!(
        wait_for(Duration::from_secs(5), || {
            status = status_of(&dig(&cloud.backend, dns, &[name]));
            status == "NXDOMAIN"
        }),
        "{name} still resolves after revocation: {status}"
    );
    let took = revoked.elapsed();
    println!(
        "{name} gone at the gateway {:.2} s after `tether-broker site revoke` started",
        took.as_secs_f64()
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let gone = topo
        .cloud
        .command(&binary("tether").display().to_string())
        .args(["trace", name, "--token-file", &token.display().to_string()])
        .status()
        .unwrap();
    assert_eq!(gone.code(), Some(1), "trace of a revoked name");

    // The broker goes away: the gateway keeps answering from its copy.
    let mut topo = topo;
    topo.broker.as_mut().unwrap().kill(); // SIGKILL, and reaped
    let lab2_after = dig(&cloud.backend, dns, &["+short", "lab-2.eu.tether.internal"]);
    assert_eq!(
        lab2_after.trim(),
        lab2.trim(),
        "the gateway lost the zone with the broker"
    );
}
