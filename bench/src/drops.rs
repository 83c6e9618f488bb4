//! `--drops`: where packets are lost inside tether under load.
//!
//! Runs iperf3 through the HTTP/3 tunnel with 1 and 4 streams in each
//! direction and prints, for each run, the goodput and the tunnelled TCP's
//! retransmits beside every counter a packet can be lost on along the way:
//! the broker's drop reasons, the tunnel devices' drop counters (the
//! kernel drops at a TUN device's queue when its reader falls behind), the
//! UDP receive-buffer overflows of both namespaces, and the kernel's
//! per-CPU backlog drops. Beside them it prints the TCP stack's own view
//! of the same runs in both end hosts (`/proc/net/netstat`): a retransmit
//! after reordering (a late packet, not a lost one) shows up there as
//! `TCPSACKReorder`/`TCPDSACKRecv`/`TCPSpuriousRTOs` with no drop counter
//! moving, which tells loss from reordering inside the tunnel.
//!
//! With `--drops-via-gateway` the same runs go from the backend of a cloud
//! gateway (backend -> tether-gateway == WireGuard == broker == HTTP/3 ==
//! site), and the gateway node's device and UDP counters join the list.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tether_netns_tests::NetNs;
use tether_netns_tests::topology::Topology;

use crate::iperf;

/// Where the probe's traffic enters and leaves: the host running iperf3's
/// client, and the namespaces with a tether device on the path.
pub struct Path<'a> {
    /// The backend host (iperf3 client).
    pub backend: &'a NetNs,
    /// Namespaces with a tether device on the path: label, namespace,
    /// device name.
    pub devices: Vec<(&'static str, &'a NetNs, &'static str)>,
}

impl<'a> Path<'a> {
    /// The direct path: the broker's local gateway in the cloud host.
    pub fn direct(topo: &'a Topology) -> Self {
        Self {
            backend: &topo.backend,
            devices: vec![
                ("site", &topo.site, "tether0"),
                ("cloud", &topo.cloud, "tether-gw0"),
            ],
        }
    }
}

/// The TCP counters (`TcpExt` of `/proc/net/netstat`) that tell loss from
/// reordering and spurious retransmits.
const TCP_COUNTERS: [&str; 9] = [
    "TCPLostRetransmit",
    "TCPSACKReorder",
    "TCPTSReorder",
    "TCPDSACKRecv",
    "TCPDSACKOldSent",
    "TCPSpuriousRTOs",
    "TCPLossProbes",
    "TCPOFOQueue",
    "TCPFastRetrans",
];

/// Every counter of interest, by name.
pub(crate) fn snapshot(topo: &Topology, path: &Path<'_>) -> BTreeMap<String, f64> {
    let mut all = BTreeMap::new();
    for (label, ns) in [("backend", path.backend), ("site", &topo.site)] {
        for (key, v) in tcp_counters(ns) {
            all.insert(format!("{label} tcp {key}"), v);
        }
    }
    for &(label, ns, dev) in &path.devices {
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

/// [`TCP_COUNTERS`] in `ns`.
fn tcp_counters(ns: &NetNs) -> Vec<(String, f64)> {
    let netstat = ns
        .run("cat", &["/proc/net/netstat"])
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    let ext: Vec<&str> = netstat
        .lines()
        .filter(|l| l.starts_with("TcpExt:"))
        .collect();
    let [names, values] = ext.as_slice() else {
        return Vec::new();
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter(|(n, _)| TCP_COUNTERS.contains(n))
        .map(|(n, v)| (n.to_string(), v.parse().unwrap_or(0.0)))
        .collect()
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

/// Runs the probe on an up site at `addr` over `path`, `rounds` times.
pub fn run(topo: &Topology, path: &Path<'_>, addr: &str, secs: u32, rounds: u32) {
    let _server = topo.site.spawn("iperf3", &["-s"], None).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for round in 1..=rounds {
        for (streams, reverse) in [(1, false), (4, false), (1, true), (4, true)] {
            let before = snapshot(topo, path);
            let started = Instant::now();
            let (gbits, retransmits) = iperf(path.backend, addr, streams, reverse, secs);
            let took = started.elapsed();
            let after = snapshot(topo, path);
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
