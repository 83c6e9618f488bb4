//! Ping through the tunnel next to the raw routed path, with the context
//! switches of the agent's and the broker's threads per ping (how many
//! times a packet's way through the two processes hands it from one thread
//! to another or puts a thread to sleep and wakes it again) and the CPU
//! time each process ran per ping (the work done on the way, wake-ups
//! included).
//!
//! Rounds of 300 pings 10 ms apart from the backend to the site's overlay
//! address, then (the agent stopped, the hospital firewall opened) the same
//! from the backend to the site's LAN address without any tunnel.

use std::collections::BTreeMap;
use std::time::Duration;

use tether_netns_tests::topology::{Egress, SITE_LAN, Topology};

use crate::probe::first_reply;

/// Pings per round.
const PINGS: usize = 300;

/// Context switches (voluntary and not) of each thread of `pid` so far,
/// by thread id, with the thread's name.
fn switches(pid: u32) -> BTreeMap<u32, (String, u64)> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in dir.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        let name = field("Name:").unwrap_or_default().to_string();
        let n: u64 = ["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"]
            .iter()
            .filter_map(|f| field(f).and_then(|v| v.parse::<u64>().ok()))
            .sum();
        out.insert(tid, (name, n));
    }
    out
}

/// Nanoseconds the threads of `pid` have run on a CPU so far (the first
/// field of each thread's `schedstat`; exact, unlike the clock ticks of
/// `stat`, which at 10 ms cannot resolve the work of a ping).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Switches per ping of the threads that switched during a round, by
/// thread name (threads of one name summed), and in total.
fn per_ping(
    before: &BTreeMap<u32, (String, u64)>,
    after: &BTreeMap<u32, (String, u64)>,
    pings: usize,
) -> (f64, String) {
    let mut by_name: BTreeMap<&str, (u64, usize)> = BTreeMap::new();
    for (tid, (name, n)) in after {
        let was = before.get(tid).map_or(0, |b| b.1);
        let d = n.saturating_sub(was);
        if d > 0 {
            let e = by_name.entry(name.as_str()).or_default();
            e.0 += d;
            e.1 += 1;
        }
    }
    let total: u64 = by_name.values().map(|v| v.0).sum();
    let pings = pings.max(1) as f64;
    let detail = by_name
        .iter()
        .map(|(name, (n, threads))| format!("{name}×{threads} {:.2}", *n as f64 / pings))
        .collect::<Vec<_>>()
        .join(", ");
    (total as f64 / pings, detail)
}

/// Round-trip times (ms) of `count` pings 10 ms apart from the backend.
fn ping(topo: &Topology, to: &str, count: usize) -> Vec<f64> {
    let out = topo
        .backend
        .command("ping")
        .args(["-c", &count.to_string(), "-i", "0.01", "-W", "1", to])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next())
        .filter_map(|t| t.parse().ok())
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// p50 and p99 (ms) of `rtts`.
fn stats(mut rtts: Vec<f64>) -> (f64, f64) {
    rtts.sort_by(f64::total_cmp);
    (percentile(&rtts, 0.5), percentile(&rtts, 0.99))
}

/// `rounds` rounds of pings through the tunnel, then as many over the raw
/// routed path; one table.
pub(crate) fn run(topo: &Topology, rounds: usize) {
    let state = topo.path("site-state");
    topo.enroll("bench-site", &state).unwrap();
    let ((agent, addr), _) = first_reply(topo, "first-probe.log", || {
        topo.up(&state, "site.log").unwrap()
    });
    let broker = topo.broker.as_ref().map(|b| b.id()).unwrap_or(0);
    // Warm up: the first pings after the start may meet the agent's and
    // the broker's last start-up work.
    let _ = ping(topo, &addr, 50);
    println!(
        "{:<16} {:>5} {:>9} {:>9} {:>13} {:>14} {:>13} {:>14}  threads that switched (switches per ping)",
        "path",
        "round",
        "p50 ms",
        "p99 ms",
        "agent sw/ping",
        "broker sw/ping",
        "agent µs/ping",
        "broker µs/ping"
    );
    let mut all = Vec::new();
    for round in 0..rounds {
        let (a0, b0) = (switches(agent.id()), switches(broker));
        let (ac0, bc0) = (cpu_ns(agent.id()), cpu_ns(broker));
        let rtts = ping(topo, &addr, PINGS);
        let (ac1, bc1) = (cpu_ns(agent.id()), cpu_ns(broker));
        let (a1, b1) = (switches(agent.id()), switches(broker));
        let n = rtts.len();
        all.extend_from_slice(&rtts);
        let (p50, p99) = stats(rtts);
        let (a, a_detail) = per_ping(&a0, &a1, n);
        let (b, b_detail) = per_ping(&b0, &b1, n);
        let us = |from: u64, to: u64| to.saturating_sub(from) as f64 / 1000.0 / n.max(1) as f64;
        let (ac, bc) = (us(ac0, ac1), us(bc0, bc1));
        println!(
            "{:<16} {round:>5} {p50:>9.3} {p99:>9.3} {a:>13.2} {b:>14.2} {ac:>13.1} {bc:>14.1}  agent: {a_detail}; broker: {b_detail}",
            "tether (HTTP/3)"
        );
    }
    let (tether50, tether99) = stats(all);
    // The agent routes the backend network into the tunnel; stop it so the
    // raw path is really raw.
    drop(agent);
    std::thread::sleep(Duration::from_millis(300));
    topo.set_egress(Egress::Open).unwrap();
    crate::open_raw_path(topo);
    let target = SITE_LAN;
    let _ = ping(topo, target, 50);
    let mut all = Vec::new();
    for round in 0..rounds {
        let rtts = ping(topo, target, PINGS);
        all.extend_from_slice(&rtts);
        let (p50, p99) = stats(rtts);
        println!("{:<16} {round:>5} {p50:>9.3} {p99:>9.3}", "raw routed path");
    }
    let (raw50, raw99) = stats(all);
    println!(
        "all rounds: tether p50 {tether50:.3} p99 {tether99:.3} ms; raw p50 {raw50:.3} p99 {raw99:.3} ms; added p50 {:.0} µs, p99 {:.0} µs",
        (tether50 - raw50) * 1000.0,
        (tether99 - raw99) * 1000.0
    );
}
