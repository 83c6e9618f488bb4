//! `--drops`: where packets are lost inside tether under load.
//!
//! Runs iperf3 through the HTTP/3 tunnel with 1 and 4 streams in each
//! direction and prints, for each run, the goodput and the tunnelled TCP's
//! retransmits beside every counter a packet can be lost on along the way:
//! the broker's drop reasons, the tunnel devices' drop counters (the
//! kernel drops at a TUN device's queue when its reader falls behind), the
//! UDP receive-buffer overflows of both namespaces, and the kernel's
//! per-CPU backlog drops.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tether_netns_tests::NetNs;
use tether_netns_tests::topology::Topology;

use crate::iperf;

/// Every counter of interest, by name.
pub(crate) fn snapshot(topo: &Topology) -> BTreeMap<String, f64> {
    let mut all = BTreeMap::new();
    for (ns, label, dev) in [
        (&topo.site, "site", "tether0"),
        (&topo.cloud, "cloud", "tether-gw0"),
    ] {
        for stat in ["tx_dropped", "rx_dropped", "tx_errors"] {
            let v = ns
                .run("cat", &[&format!("/sys/class/net/{dev}/statistics/{stat}")])
                .ok()
                .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
                .unwrap_or(0.0);
            all.insert(format!("{label} {dev} {stat}"), v);
        }
        for (key, v) in udp_errors(ns) {
            all.insert(format!("{label} udp {key}"), v);
        }
    }
    let metrics = topo.metrics_text();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("tether_broker_packets_dropped_total{reason=\"")
            && let Some((reason, value)) = rest.split_once("\"} ")
        {
            all.insert(
                format!("broker drop {reason}"),
                value.trim().parse().unwrap_or(0.0),
            );
        }
    }
    let softnet = std::fs::read_to_string("/proc/net/softnet_stat").unwrap_or_default();
    let backlog: u64 = softnet
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|h| u64::from_str_radix(h, 16).ok())
        .sum();
    all.insert("kernel backlog drops".into(), backlog as f64);
    all
}

/// `RcvbufErrors` and `SndbufErrors` of UDP in `ns`.
pub(crate) fn udp_errors(ns: &NetNs) -> Vec<(String, f64)> {
    let snmp = ns
        .run("cat", &["/proc/net/snmp"])
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
    let [names, values] = udp.as_slice() else {
        return Vec::new();
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter(|(n, _)| matches!(*n, "RcvbufErrors" | "SndbufErrors"))
        .map(|(n, v)| (n.to_string(), v.parse().unwrap_or(0.0)))
        .collect()
}

/// Runs the probe on an up site at `addr`, `rounds` times.
pub fn run(topo: &Topology, addr: &str, secs: u32, rounds: u32) {
    let _server = topo.site.spawn("iperf3", &["-s"], None).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for round in 1..=rounds {
        for (streams, reverse) in [(1, false), (4, false), (1, true), (4, true)] {
            let before = snapshot(topo);
            let started = Instant::now();
            let (gbits, retransmits) = iperf(&topo.backend, addr, streams, reverse, secs);
            let took = started.elapsed();
            let after = snapshot(topo);
            let dir = if reverse { "<-" } else { "->" };
            let mut line = format!(
                "round {round} {streams} stream(s) {dir}: {gbits:.2} Gbit/s, {retransmits} retransmits ({:.1} s)",
                took.as_secs_f64()
            );
            for (key, b) in &after {
                let d = b - before.get(key).copied().unwrap_or(0.0);
                if d > 0.0 {
                    line.push_str(&format!("; {key} +{d}"));
                }
            }
            println!("{line}");
        }
    }
}
