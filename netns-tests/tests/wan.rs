//! Faults on the WAN between the hospital and the cloud: loss, delay,
//! reordering and duplication (the tunnel stays up, no reconnection), a
//! full outage of 60 s (the site comes back by itself with its address),
//! and NAT rebinding at the hospital firewall (QUIC migration keeps the
//! tunnel). The kernel has no `netem`: the faults come from `tether-wan`
//! on the link (`tether_netns_tests::wan`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tether_netns_tests::topology::{Egress, Topology, firewall_rules, read};
use tether_netns_tests::wan::{Faults, ImpairedWan};
use tether_netns_tests::{NetNs, require_root, wait_for};

/// Connections the agent made (from its log).
fn connections(topo: &Topology, log: &str) -> usize {
    read(&topo.path(log))
        .matches("connected to the broker over")
        .count()
}

/// Echo requests from the backend to `addr`, 100 ms apart: how many were
/// answered.
fn pings(topo: &Topology, addr: &str, count: u32) -> u32 {
    let out = topo
        .backend
        .command("ping")
        .args(["-q", "-c", &count.to_string(), "-i", "0.1", "-W", "2", addr])
        .output()
        .expect("ping");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split(',')
        .find_map(|part| part.trim().strip_suffix(" received"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Goodput of one TCP stream backend -> `addr` for 3 s, in Mbit/s
/// (reported, not asserted: at 10 % loss a TCP stream may move next to
/// nothing in 3 s over any path; the benchmark measures goodput).
fn goodput(topo: &Topology, addr: &str) -> f64 {
    let out = topo
        .backend
        .command("timeout")
        .args([
            "30",
            "iperf3",
            "-c",
            addr,
            "-J",
            "-t",
            "3",
            "--connect-timeout",
            "5000",
        ])
        .output()
        .expect("iperf3");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    if let Some(e) = json["error"].as_str() {
        eprintln!("iperf3 to {addr}: {e}");
    }
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e6
}

/// A topology with the impaired link in place (clean to start with), a
/// site enrolled and up, and the backend reaching it.
fn site_behind_an_impaired_wan(topo: &Topology) -> (ImpairedWan, tether_netns_tests::Proc, String) {
    let mut wan = ImpairedWan::insert(topo).unwrap();
    wan.set(Faults::default(), 1).unwrap();
    let state = topo.path("site-state");
    topo.enroll("hospital-a", &state).unwrap();
    let (agent, addr) = topo.up(&state, "site.log").unwrap();
    assert!(
        wait_for(Duration::from_secs(15), || topo.backend_pings(&addr)),
        "the backend does not reach the site:\n{}",
        read(&topo.path("site.log"))
    );
    (wan, agent, addr)
}

#[test]
fn loss_delay_reordering_and_duplication_keep_the_tunnel_up() {
    if !require_root() {
        return;
    }
    let topo = Topology::new("").unwrap();
    let (mut wan, _agent, addr) = site_behind_an_impaired_wan(&topo);
    let _iperf = topo.site.spawn("iperf3", &["-s"], None).unwrap();
    let ms = Duration::from_millis;
    let stages = [
        (
            "1 % loss, 50 ms RTT",
            Faults {
                loss_percent: 1.0,
                one_way: ms(25),
                ..Faults::default()
            },
        ),
        (
            "5 % loss, 200 ms RTT",
            Faults {
                loss_percent: 5.0,
                one_way: ms(100),
                ..Faults::default()
            },
        ),
        (
            "10 % loss, 50 ms RTT",
            Faults {
                loss_percent: 10.0,
                one_way: ms(25),
                ..Faults::default()
            },
        ),
        (
            "10 % reordered, 5 % duplicated, 50 ms RTT",
            Faults {
                one_way: ms(25),
                reorder_percent: 10.0,
                duplicate_percent: 5.0,
                ..Faults::default()
            },
        ),
    ];
    const COUNT: u32 = 50;
    for (seed, (label, faults)) in stages.into_iter().enumerate() {
        wan.set(faults, seed as u64 + 2).unwrap();
        let answered = pings(&topo, &addr, COUNT);
        let mbps = goodput(&topo, &addr);
        let c = wan.counters();
        eprintln!(
            "{label}: {answered}/{COUNT} pings answered, {mbps:.1} Mbit/s one TCP stream; link: {} frames, {} dropped, {} reordered, {} duplicated",
            c.received, c.dropped, c.reordered, c.duplicated
        );
        // An echo and its reply each cross the link once: at 10 % loss
        // each way about 81 % come back. Half is far below any loss the
        // link applies, and far above a tunnel that is down.
        assert!(
            answered >= COUNT / 2,
            "{label}: only {answered} of {COUNT} pings answered:\n{}",
            read(&topo.path("site.log"))
        );
        // The faults were really applied.
        assert_eq!(c.dropped > 0, faults.loss_percent > 0.0, "{label}: {c:?}");
        assert_eq!(
            c.reordered > 0,
            faults.reorder_percent > 0.0,
            "{label}: {c:?}"
        );
        assert_eq!(
            c.duplicated > 0,
            faults.duplicate_percent > 0.0,
            "{label}: {c:?}"
        );
    }
    assert_eq!(
        connections(&topo, "site.log"),
        1,
        "the agent reconnected under loss, delay, reordering or duplication:\n{}",
        read(&topo.path("site.log"))
    );
}

#[test]
fn after_a_60_second_wan_outage_the_site_comes_back_by_itself_with_its_address() {
    if !require_root() {
        return;
    }
    let topo = Topology::new("").unwrap();
    let (wan, _agent, addr) = site_behind_an_impaired_wan(&topo);
    wan.set_up(false).unwrap();
    let cut = Instant::now();
    assert!(!topo.backend_pings(&addr), "the link is not cut");
    // The outage itself: nothing to wait for but time.
    std::thread::sleep(Duration::from_secs(60).saturating_sub(cut.elapsed()));
    wan.set_up(true).unwrap();
    let healed = Instant::now();
    let back = wait_for(Duration::from_secs(60), || topo.backend_pings(&addr));
    let took = healed.elapsed();
    assert!(
        back,
        "the site did not come back after the outage:\n{}",
        read(&topo.path("site.log"))
    );
    assert_eq!(
        topo.site_address(4).as_deref(),
        Some(addr.as_str()),
        "the site's address changed"
    );
    eprintln!(
        "60 s WAN outage: the backend reached the site again {:.1} s after the link came back ({} frames dropped while it was down)",
        took.as_secs_f64(),
        wan.counters().blackholed
    );
}

/// The port the hospital firewall maps the site's QUIC flow to (the
/// destination port of the reply direction in its connection tracking).
fn mapped_port(fw: &NetNs) -> Option<String> {
    let out = fw
        .command("conntrack")
        .args(["-L", "-p", "udp", "--orig-port-dst", "443"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines()
        .find(|l| l.contains("dport=443"))?
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("dport="))
        .nth(1)
        .map(str::to_string)
}

#[test]
fn nat_rebinding_at_the_hospital_firewall_keeps_the_tunnel() {
    if !require_root() {
        return;
    }
    let topo = Topology::new("").unwrap();
    let state = topo.path("site-state");
    topo.enroll("hospital-a", &state).unwrap();
    let (_agent, addr) = topo.up(&state, "site.log").unwrap();
    assert!(wait_for(Duration::from_secs(15), || topo.backend_pings(&addr)));
    let before = mapped_port(&topo.fw).expect("the firewall tracks the site's QUIC flow");

    // The firewall forgets its mappings and maps to random ports from now
    // on, as a NAT does after a reboot or a timeout.
    let rules = topo.path("rebinding.nft");
    std::fs::write(
        &rules,
        firewall_rules(Egress::Open).replace(
            "oifname \"wan\" masquerade",
            "oifname \"wan\" masquerade random",
        ),
    )
    .unwrap();
    topo.fw
        .run("nft", &["-f", &rules.display().to_string()])
        .unwrap();
    let mut after = None;
    for _ in 0..3 {
        topo.fw.run("conntrack", &["-F"]).unwrap();
        let rebound = Instant::now();
        assert!(
            wait_for(Duration::from_secs(20), || topo.backend_pings(&addr)),
            "the tunnel did not survive the NAT rebinding:\n{}",
            read(&topo.path("site.log"))
        );
        eprintln!(
            "NAT rebinding: the backend reached the site again after {:.1} s",
            rebound.elapsed().as_secs_f64()
        );
        after = mapped_port(&topo.fw);
        if after.is_some() && after.as_ref() != Some(&before) {
            break;
        }
    }
    assert_ne!(
        after,
        Some(before.clone()),
        "the firewall kept the old port"
    );
    assert!(after.is_some(), "no mapping after the rebinding");
    assert_eq!(
        connections(&topo, "site.log"),
        1,
        "the agent reconnected instead of migrating:\n{}",
        read(&topo.path("site.log"))
    );
}
