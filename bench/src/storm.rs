//! Reconnect storm: N idle sites (`tether-loadgen storm`, one QUIC endpoint
//! in the site namespace, reconnecting with the agent's backoff) on the
//! broker, which is killed with SIGKILL and restarted, round after round.
//! A round ends when every site has lost its connection and is back. For
//! every round: how long the broker took to answer again, how long
//! until every site was back (from the kill), the handshake rate that
//! implies, per-site gaps, and how many sites came back with a different
//! address (the goal is none).

use std::time::{Duration, Instant};

use tether_netns_tests::topology::{Topology, read};
use tether_netns_tests::wait_for;

/// The value after `key` in a loadgen line (`... p50 0.41 s ...`).
fn field(line: &str, key: &str) -> f64 {
    line.split(key)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.trim_end_matches([',', ';']).parse().ok())
        .unwrap_or(f64::NAN)
}

/// The broker's CPU time so far (user + system), from `/proc`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is
    // the first, utime the 12th, stime the 13th, in clock ticks.
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Duration::from_millis(ticks * 1000 / hz.max(1))
}

/// Runs `rounds` kill-and-restart rounds with `sites` sites (keepalive
/// `keepalive` seconds, else the agent's default); prints a table.
pub(crate) fn run(topo: &mut Topology, sites: usize, rounds: usize, keepalive: Option<f64>) {
    let dir = crate::enroll_load_sites(topo, sites);
    let log = topo.path("storm.log");
    let rounds_arg = rounds.to_string();
    let keepalive = keepalive.unwrap_or_else(|| {
        tether_config::client::TransportFile::default()
            .keepalive
            .trim_end_matches('s')
            .parse()
            .unwrap()
    });
    let keepalive_arg = keepalive.to_string();
    let _loadgen = crate::start_loadgen(
        topo,
        "storm",
        &dir,
        sites,
        &["--rounds", &rounds_arg, "--keepalive", &keepalive_arg],
        &log,
    );
    eprintln!("{}", read(&log).trim());
    // The broker's cost of holding the sites idle: CPU over 30 s, once
    // the connections have settled (two keepalives).
    std::thread::sleep(Duration::from_secs_f64(keepalive * 2.0));
    let pid = topo.broker.as_ref().unwrap().id();
    let (cpu0, t0) = (cpu_time(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(30));
    let idle_cpu = (cpu_time(pid) - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
    println!();
    println!(
        "reconnect storm: {sites} idle sites, keepalive {keepalive} s, broker kill -9 and restart, {rounds} rounds"
    );
    println!(
        "broker CPU holding them idle: {:.2} % of a core",
        idle_cpu * 100.0
    );
    println!(
        "{:>5} {:>12} {:>14} {:>12} {:>12} {:>12} {:>9} {:>7} {:>7} {:>8} {:>9}",
        "round",
        "broker up",
        "all back",
        "handshakes/s",
        "site p50",
        "site max",
        "changed",
        "reset",
        "other",
        "resets",
        "withheld"
    );
    let mut backs = Vec::new();
    for round in 1..=rounds {
        topo.broker.as_mut().unwrap().kill();
        let killed = Instant::now();
        topo.start_broker().unwrap();
        let broker_up = killed.elapsed();
        let tag = format!("round {round}:");
        let done = wait_for(Duration::from_secs(180), || read(&log).contains(&tag));
        let all_back = killed.elapsed();
        assert!(
            done,
            "round {round}: the sites did not all come back:\n{}",
            read(&log)
        );
        let text = read(&log);
        let line = text
            .lines()
            .find(|l| l.starts_with(&tag))
            .unwrap_or_default();
        eprintln!("{line}");
        let rate = sites as f64 / (all_back - broker_up).as_secs_f64().max(1e-3);
        // With `RUST_LOG=info,quinn_proto::endpoint=debug` the broker logs
        // each stateless reset it sends and each one it withholds.
        let broker_log = read(&topo.path("broker.log"));
        let resets = broker_log.matches("sending stateless reset").count();
        let paced = broker_log
            .matches("within minimum stateless reset interval")
            .count();
        let small = broker_log.matches("not larger than minimum").count();
        let invalid = broker_log
            .matches("dropping packet with invalid CID")
            .count();
        let withheld = paced + small + invalid;
        eprintln!(
            "round {round}: broker withheld resets: {paced} paced, {small} too small, {invalid} invalid CID"
        );
        println!(
            "{:>5} {:>10.2} s {:>12.2} s {:>12.0} {:>10.2} s {:>10.2} s {:>9} {:>7} {:>7} {:>8} {:>9}",
            round,
            broker_up.as_secs_f64(),
            all_back.as_secs_f64(),
            rate,
            field(line, "p50 "),
            field(line, "max "),
            field(line, "changed "),
            field(line, "by reset "),
            field(line, "otherwise "),
            resets,
            withheld
        );
        backs.push(all_back.as_secs_f64());
    }
    backs.sort_by(f64::total_cmp);
    let pick = |q: f64| backs[((backs.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "all back after the kill: p50 {:.2} s, p99 {:.2} s, max {:.2} s",
        pick(0.5),
        pick(0.99),
        pick(1.0)
    );
}
