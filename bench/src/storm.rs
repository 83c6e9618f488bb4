//! Reconnect storm: N idle sites (`tether-loadgen storm`, one QUIC endpoint
//! in the site namespace, reconnecting with the agent's backoff) on the
//! broker, which is killed with SIGKILL and restarted, round after round.
//! For every round: how long the broker took to answer again, how long
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

/// Runs `rounds` kill-and-restart rounds with `sites` sites; prints a table.
pub(crate) fn run(topo: &mut Topology, sites: usize, rounds: usize) {
    let dir = crate::enroll_load_sites(topo, sites);
    let log = topo.path("storm.log");
    let rounds_arg = rounds.to_string();
    let _loadgen =
        crate::start_loadgen(topo, "storm", &dir, sites, &["--rounds", &rounds_arg], &log);
    eprintln!("{}", read(&log).trim());
    println!();
    println!("reconnect storm: {sites} idle sites, broker kill -9 and restart, {rounds} rounds");
    println!(
        "{:>5} {:>12} {:>14} {:>12} {:>12} {:>12} {:>9}",
        "round", "broker up", "all back", "handshakes/s", "site p50", "site max", "changed"
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
        let rate = sites as f64 / (all_back - broker_up).as_secs_f64().max(1e-3);
        println!(
            "{:>5} {:>10.2} s {:>12.2} s {:>12.0} {:>10.2} s {:>10.2} s {:>9}",
            round,
            broker_up.as_secs_f64(),
            all_back.as_secs_f64(),
            rate,
            field(line, "p50 "),
            field(line, "max "),
            field(line, "changed ")
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
