//! ICMP errors reach a backend behind the broker's local gateway (the
//! WireGuard gateway's case is in `gateway.rs`).
//!
//! ```text
//!  site ── hospital-fw ── wan ── cloud: broker + tether-gw0 ── backend 10.20.0.10, fd20::10
//!                                 (the host owns 100.64.0.1 and fd74:6574:6865::1 on tether-gw0)
//! ```
//!
//! A packet larger than the site's tunnel is answered with packet-too-big,
//! one to an address no site holds with destination unreachable. The
//! errors go into `tether-gw0` and the cloud host forwards them to the
//! backend; an error whose source is an address the host itself owns on
//! that device is a martian the kernel drops.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tether_netns_tests::topology::{Topology, read};
use tether_netns_tests::{require_root, wait_for};

/// `ping` from the backend with `args`, its stdout and stderr together.
fn ping(topo: &Topology, args: &[&str]) -> String {
    topo.backend.transcript("ping", args)
}

#[test]
fn backend_behind_the_local_gateway_gets_icmp_errors() {
    if !require_root() {
        return;
    }
    let topo = Topology::new("").unwrap();
    let state = topo.path("site-state");
    topo.enroll("hospital-a", &state).unwrap();
    let (_site, addr) = topo.up(&state, "site.log").unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || topo.backend_pings(&addr)),
        "backend cannot ping {addr}:\n{}",
        read(&topo.path("site.log"))
    );
    let addr6 = topo.site_address(6).expect("an IPv6 overlay address");
    assert!(
        wait_for(Duration::from_secs(10), || topo.backend_pings(&addr6)),
        "backend cannot ping {addr6}"
    );

    // 1399 bytes: fits the local gateway's device (1400), not the site's
    // tunnel. The first echo is answered by the broker with packet-too-big.
    let out = ping(
        &topo,
        &["-c", "1", "-W", "2", "-M", "do", "-s", "1371", &addr],
    );
    assert!(
        out.contains("Frag needed") || out.contains("mtu"),
        "no fragmentation-needed error for a 1399-byte DF packet to {addr}:\n{out}"
    );
    let out = ping(
        &topo,
        &["-6", "-c", "1", "-W", "2", "-M", "do", "-s", "1351", &addr6],
    );
    assert!(
        out.to_lowercase().contains("too big") || out.contains("mtu"),
        "no packet-too-big for a 1399-byte packet to {addr6}:\n{out}"
    );

    // An address of the pool no site holds: destination unreachable.
    let out = ping(&topo, &["-c", "1", "-W", "2", "100.64.200.200"]);
    assert!(
        out.contains("Unreachable"),
        "no destination-unreachable for an address no site holds:\n{out}"
    );
    let out = ping(&topo, &["-6", "-c", "1", "-W", "2", "fd74:6574:6865:ff::1"]);
    assert!(
        out.to_lowercase().contains("unreachable"),
        "no destination-unreachable for an IPv6 address no site holds:\n{out}"
    );
    assert!(topo.metric("tether_broker_icmp_errors_sent_total") >= 4.0);
}
