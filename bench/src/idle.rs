//! Idle sites on one broker: one real site, then idle sites connected by
//! `tether-loadgen` in steps up to each count of `--idle` (e.g.
//! `10000,50000`). After each step: the broker's memory (VmRSS, and per
//! site over the one-site figure), its open files, the connect rate of the
//! step, and the CPU the broker and the load generators use while every
//! site is idle (keepalives only) over `--idle-cpu` seconds, next to the
//! whole machine's CPU in the same window (other work on the machine shows
//! there).
//!
//! Each load generator process holds at most `--per-loadgen` sites on its
//! own QUIC endpoint (one UDP socket, one source port).

use std::path::Path;
use std::time::{Duration, Instant};

use tether_netns_tests::topology::{Topology, read};
use tether_netns_tests::{Proc, binary, wait_for};

/// Clock ticks per second of `/proc/*/stat` (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

/// A process's CPU time so far (user + system), in ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(11) + get(12)
}

/// The whole machine's busy and total ticks so far (`/proc/stat`).
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or_default();
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle and iowait.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// A field of `/proc/PID/status` in KiB (`VmRSS`, `RssAnon`, ...).
fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The PID of the process `ip netns exec` started (it execs the program,
/// so the same PID).
fn pid_of(proc: &Proc) -> u32 {
    proc.id()
}

/// The seconds in `connected N in S s, R retries` of a loadgen log.
fn connect_secs(log: &str) -> f64 {
    log.lines()
        .find_map(|l| l.strip_prefix("connected "))
        .and_then(|l| l.split(" in ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The sites a loadgen log reports as failed (`..., F failed`).
fn failed_sites(log: &str) -> usize {
    log.lines()
        .filter(|l| l.starts_with("connected "))
        .filter_map(|l| {
            l.rsplit(", ")
                .next()?
                .strip_suffix(" failed")?
                .parse::<usize>()
                .ok()
        })
        .sum()
}

/// Starts loadgen processes for sites `first .. first + count`, at most
/// `per` each, and waits until all report their sites connected; returns
/// them and the wall time from the first start until the last was done.
pub(crate) fn connect(
    topo: &Topology,
    dir: &Path,
    first: usize,
    count: usize,
    per: usize,
    step: usize,
) -> (Vec<(Proc, std::path::PathBuf)>, Duration) {
    let loadgen = binary("tether-loadgen").display().to_string();
    let dir = dir.display().to_string();
    let started = Instant::now();
    let mut procs = Vec::new();
    let mut at = first;
    while at < first + count {
        let n = per.min(first + count - at);
        let log = topo.path(&format!("idle-{step}-{at}.log"));
        let (n_arg, at_arg) = (n.to_string(), at.to_string());
        let proc = topo
            .site
            .spawn(
                &loadgen,
                &[
                    "connect",
                    "--count",
                    &n_arg,
                    "--first",
                    &at_arg,
                    "--broker",
                    "203.0.113.10:443",
                    "--dir",
                    &dir,
                    "--hold",
                    "3600",
                ],
                Some(log.clone()),
            )
            .unwrap();
        procs.push((proc, log));
        at += n;
    }
    // Generous: the connect rate measured here is 200-500 sites/s.
    let limit = Duration::from_secs(120 + (count / 20) as u64);
    // Ends early when a load generator gave up (it exits).
    wait_for(limit, || {
        procs.iter().all(|(_, log)| read(log).contains("connected"))
            || procs.iter_mut().any(|(p, _)| p.exited())
    });
    let done = procs.iter().all(|(_, log)| read(log).contains("connected"));
    let took = started.elapsed();
    let logs: Vec<String> = procs.iter().map(|(_, log)| read(log)).collect();
    assert!(
        done,
        "load generators did not connect their sites within {} s:\n{}",
        limit.as_secs(),
        logs.join("\n---\n")
    );
    (procs, took)
}

/// How many sites the enrollment kept in `keep` holds (0 if none).
fn kept_sites(keep: &Path) -> usize {
    std::fs::read_to_string(keep.join("enrolled"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|_| keep.join("broker").is_dir() && keep.join("loadgen").is_dir())
        .unwrap_or(0)
}

/// Copies directory `from` to `to` (replacing it) with `cp -a`.
fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cp -a {} {}: {}",
        from.display(),
        to.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Stops the broker with SIGTERM (its store closed cleanly), waiting up to
/// a minute.
fn stop_broker(topo: &mut Topology) {
    if let Some(mut broker) = topo.broker.take() {
        broker.signal(nix::sys::signal::Signal::SIGTERM);
        if !broker.wait_exit(Duration::from_secs(60)) {
            eprintln!("the broker did not stop within 60 s of SIGTERM: killed");
        }
    }
}

/// Runs the idle-sites measurement for each cumulative count in `steps`.
///
/// With `keep`, a directory: if it holds an enrollment of at least the
/// largest count (the broker's data directory, the load generator's site
/// identities and the one real site's state, from an earlier run with the
/// same `keep`), the broker is restarted on a copy of that data directory
/// and only the connect step runs; otherwise the sites are enrolled as
/// usual and the enrollment is saved there at the end. A kept broker starts
/// without the memory the enrollments left behind, so its per-site figure
/// is the connected sites' alone (not comparable with a run that enrolled).
pub(crate) fn run(
    topo: &mut Topology,
    steps: &[usize],
    cpu_secs: u64,
    per: usize,
    keep: Option<&Path>,
) {
    let total = steps.iter().copied().max().unwrap_or(0);
    if let Some(keep) = keep.filter(|k| kept_sites(k) < total) {
        // Enroll and keep the enrollment first, so that a connect step
        // that fails does not cost the enrollment; the figures below then
        // come from a broker restarted on it, as in a later run.
        let started = Instant::now();
        topo.enroll("bench-site", &topo.path("site-state")).unwrap();
        let dir = crate::enroll_load_sites(topo, total);
        eprintln!(
            "enrolled {total} sites in {:.0} s ({:.0} sites/s)",
            started.elapsed().as_secs_f64(),
            total as f64 / started.elapsed().as_secs_f64()
        );
        stop_broker(topo);
        let _ = std::fs::remove_dir_all(keep);
        std::fs::create_dir_all(keep).unwrap();
        copy_dir(&topo.path("broker"), &keep.join("broker"));
        copy_dir(&topo.path("site-state"), &keep.join("site-state"));
        copy_dir(&dir, &keep.join("loadgen"));
        std::fs::write(keep.join("enrolled"), total.to_string()).unwrap();
        eprintln!("kept the enrollment of {total} sites in {}", keep.display());
        topo.start_broker().unwrap();
    }
    let reuse = keep.filter(|k| kept_sites(k) >= total);
    if let Some(keep) = reuse {
        stop_broker(topo);
        copy_dir(&keep.join("broker"), &topo.path("broker"));
        copy_dir(&keep.join("site-state"), &topo.path("site-state"));
        topo.start_broker().unwrap();
        eprintln!(
            "reusing the enrollment of {} sites kept in {}",
            kept_sites(keep),
            keep.display()
        );
    }
    let broker = pid_of(topo.broker.as_ref().unwrap());
    let state = topo.path("site-state");
    if reuse.is_none() {
        topo.enroll("bench-site", &state).unwrap();
    }
    let (agent, _addr) = topo.up(&state, "site.log").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let rss_one = status_kib(broker, "VmRSS");
    let enroll_started = Instant::now();
    let dir = match reuse {
        Some(keep) => keep.join("loadgen"),
        None => crate::enroll_load_sites(topo, total),
    };
    let enroll_secs = enroll_started.elapsed().as_secs_f64();
    if reuse.is_none() {
        eprintln!("enrolled {total} sites in {enroll_secs:.0} s");
    }
    // What the enrollments left in the broker, for the record.
    let rss_base = status_kib(broker, "VmRSS");
    println!();
    if reuse.is_some() {
        println!(
            "idle sites: broker VmRSS {rss_one} KiB with 1 site (the baseline of KiB/site), restarted on an enrollment of {total} kept from an earlier run"
        );
    } else {
        println!(
            "idle sites: broker VmRSS {rss_one} KiB with 1 site (the baseline of KiB/site), {rss_base} KiB after enrolling {total}; enrollment {:.0} sites/s",
            total as f64 / enroll_secs
        );
    }
    println!(
        "{:>7} {:>11} {:>9} {:>10} {:>10} {:>9} {:>11} {:>11} {:>11} {:>6}",
        "sites",
        "broker RSS",
        "KiB/site",
        "connect s",
        "sites/s",
        "broker fd",
        "broker CPU",
        "loadgen CPU",
        "machine",
        "lg RSS"
    );
    let mut loadgens: Vec<(Proc, std::path::PathBuf)> = Vec::new();
    let mut connected = 0;
    for (i, &target) in steps.iter().enumerate() {
        let add = target.saturating_sub(connected);
        let (procs, took) = connect(topo, &dir, connected, add, per, i);
        for (_, log) in &procs {
            eprintln!("{}", read(log).trim());
        }
        let slowest = procs
            .iter()
            .map(|(_, log)| connect_secs(&read(log)))
            .fold(0.0, f64::max);
        let failed: usize = procs.iter().map(|(_, log)| failed_sites(&read(log))).sum();
        loadgens.extend(procs);
        connected = target;
        // Sites that gave up after every retry are not connected: the
        // per-site figures count the connected ones.
        let up = target - failed.min(target);
        // Let the handshakes' leftovers settle: every site has sent a
        // keepalive or two.
        std::thread::sleep(Duration::from_secs(6));
        let pids: Vec<u32> = loadgens.iter().map(|(p, _)| pid_of(p)).collect();
        let (b0, l0, m0) = (
            cpu_ticks(broker),
            pids.iter().map(|&p| cpu_ticks(p)).sum::<u64>(),
            machine_ticks(),
        );
        let window = Instant::now();
        std::thread::sleep(Duration::from_secs(cpu_secs));
        let secs = window.elapsed().as_secs_f64();
        let (b1, l1, m1) = (
            cpu_ticks(broker),
            pids.iter().map(|&p| cpu_ticks(p)).sum::<u64>(),
            machine_ticks(),
        );
        let rss = status_kib(broker, "VmRSS");
        let lg_rss: u64 = pids.iter().map(|&p| status_kib(p, "VmRSS")).sum();
        let lg_mib = format!("{} MiB", lg_rss / 1024);
        let pct = |t0: u64, t1: u64| (t1 - t0) as f64 / TICKS / secs * 100.0;
        // Machine: busy share of all cores, as % of one core.
        let machine = (m1.0 - m0.0) as f64 / (m1.1 - m0.1).max(1) as f64
            * 100.0
            * std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        println!(
            "{:>7} {:>8} KiB {:>9.1} {:>10.1} {:>10.0} {:>9} {:>10.1}% {:>10.1}% {:>10.1}% {:>6}",
            up,
            rss,
            rss.saturating_sub(rss_one) as f64 / up.max(1) as f64,
            slowest,
            add as f64 / took.as_secs_f64(),
            open_files(broker),
            pct(b0, b1),
            pct(l0, l1),
            machine,
            lg_mib,
        );
        eprintln!(
            "step {target}: {add} sites tried, {failed} failed after every retry, in {:.1} s by {} load generators (slowest reported {slowest:.1} s)",
            took.as_secs_f64(),
            loadgens.len()
        );
    }
    println!(
        "(CPU in % of one core over {cpu_secs} s with every site idle; \"machine\" is all processes on the machine, of {} cores)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    drop(loadgens);
    drop(agent);
}
