//! `--busy N`: many busy sites on one broker.
//!
//! `tether-loadgen busy` holds N enrolled sites in the site namespace, each
//! with its own certificate and CONNECT-IP session over HTTP/3 (one QUIC
//! endpoint behind the hospital firewall's NAT). `tether-loadgen backend`
//! on the backend host is the sink of what the sites send and the source
//! of what they receive. Every packet is a real UDP packet with the site's
//! overlay address, routed by the broker the normal way: site tunnel, the
//! local gateway device `tether-gw0`, the cloud host's routing, the
//! backend, and back.
//!
//! Four phases of `--duration` seconds, in one run: site -> backend with
//! site 0 alone, then with all N sites at once; backend -> site with site 0
//! alone, then with all N. The offered load is the same total in the alone
//! and the busy phase: as fast as the senders go by default (each site as
//! fast as its QUIC connection takes datagrams; the backend round-robin as
//! fast as its socket takes them), or `--busy-rate` packets per second over
//! all sending sites. For each phase: what was offered and what arrived,
//! the aggregate goodput (UDP payload), per-site goodput min/median/max
//! over the common arrival window, Jain's fairness index over the per-site
//! goodput, CPU seconds per GB of payload delivered (broker, load
//! generator, backend sink/source, whole machine), and every drop counter
//! that moved (the broker's drop reasons, the gateway device, UDP buffers,
//! the kernel's backlog).

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{ChildStdin, Stdio};
use std::time::{Duration, Instant};

use tether_netns_tests::topology::{BACKEND, Topology, read};
use tether_netns_tests::{NetNs, Proc, binary, wait_for};

/// The sink's port on the backend host (and the sites' receiving port).
const PORT: u16 = 9000;

/// The options of the busy-sites measurement.
#[derive(clap::Args)]
pub(crate) struct Options {
    /// Measure only many busy sites: this many load-generator sites
    /// sending to and receiving from the backend through the broker at
    /// once, next to one site alone in the same run (`--duration` seconds
    /// per phase).
    #[arg(long)]
    pub(crate) busy: Option<usize>,
    /// With --busy: packets per second offered over all sending sites
    /// (0: every sender as fast as it can).
    #[arg(long, default_value_t = 0)]
    pub(crate) busy_rate: u64,
    /// With --busy: UDP payload bytes per packet.
    #[arg(long, default_value_t = 1200)]
    pub(crate) busy_size: usize,
}

/// A load-generator process driven line by line on its standard input.
struct Driven {
    _proc: Proc,
    pid: u32,
    stdin: ChildStdin,
    log: PathBuf,
    serial: u64,
}

impl Driven {
    /// Starts `tether-loadgen args...` in `ns`, logging to `log`, and waits
    /// (up to `timeout`) for its `ready` line.
    fn start(ns: &NetNs, args: &[&str], log: PathBuf, timeout: Duration) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let mut child = ns
            .command(&binary("tether-loadgen").display().to_string())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let pid = child.id();
        let mut proc = Proc::from_child(child, Some(log.clone()));
        let ready = wait_for(timeout, || {
            read(&log).lines().any(|l| l == "ready") || proc.exited()
        });
        assert!(
            ready && !proc.exited(),
            "tether-loadgen {} did not get ready:\n{}",
            args[0],
            read(&log)
        );
        Self {
            _proc: proc,
            pid,
            stdin,
            log,
            serial: 0,
        }
    }

    fn command(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Waits (up to `timeout`) for the line `marker`; returns the lines
    /// after the last line `begin` before it, or all lines before it.
    fn wait(&self, begin: Option<&str>, marker: &str, timeout: Duration) -> Vec<String> {
        let found = wait_for(timeout, || read(&self.log).lines().any(|l| l == marker));
        let text = read(&self.log);
        assert!(found, "no {marker:?} from tether-loadgen:\n{text}");
        let lines: Vec<&str> = text.lines().collect();
        let end = lines.iter().position(|l| *l == marker).unwrap();
        let start = begin
            .and_then(|b| lines[..end].iter().rposition(|l| *l == b))
            .map_or(0, |s| s + 1);
        lines[start..end].iter().map(|l| l.to_string()).collect()
    }

    /// Sends `send <phase> ...` and waits for it to finish; returns its
    /// `sent` lines.
    fn send(&mut self, phase: u32, args: &str, secs: u32) -> Vec<String> {
        self.command(&format!("send {phase} {args}"));
        self.wait(
            None,
            &format!("done send {phase}"),
            Duration::from_secs(u64::from(secs) + 60),
        )
        .into_iter()
        .filter(|l| l.starts_with(&format!("sent {phase} ")))
        .collect()
    }

    /// What arrived of `phase`: the `recv` lines of a fresh report.
    fn report(&mut self, phase: u32) -> Vec<String> {
        self.serial += 1;
        let s = self.serial;
        self.command(&format!("report {phase} {s}"));
        self.wait(
            Some(&format!("begin report {phase} {s}")),
            &format!("done report {phase} {s}"),
            Duration::from_secs(30),
        )
    }

    /// Reports until two in a row, 200 ms apart, hold the same number of
    /// packets (at most 10 s): what was in flight at the end of a phase
    /// has arrived or is lost.
    fn settled_report(&mut self, phase: u32) -> Vec<String> {
        let total = |lines: &[String]| -> u64 { parse_recv(lines).iter().map(|r| r.packets).sum() };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = self.report(phase);
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let next = self.report(phase);
            if total(&next) == total(&last) || Instant::now() > deadline {
                return next;
            }
            last = next;
        }
    }
}

/// One `recv` line: what arrived from (or at) one sender.
#[derive(Debug, Clone, PartialEq)]
struct Recv {
    /// The site index or the source address.
    from: String,
    packets: u64,
    bytes: u64,
    /// First and last arrival, microseconds since the Unix epoch.
    first: u64,
    last: u64,
}

fn parse_recv(lines: &[String]) -> Vec<Recv> {
    lines
        .iter()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                ["recv", _, from, packets, bytes, first, last] => Some(Recv {
                    from: from.to_string(),
                    packets: packets.parse().ok()?,
                    bytes: bytes.parse().ok()?,
                    first: first.parse().ok()?,
                    last: last.parse().ok()?,
                }),
                _ => None,
            }
        })
        .collect()
}

/// The drop counters of `--drops`, and the backend's UDP buffer
/// overflows (its sink's socket).
fn counters(topo: &Topology) -> std::collections::BTreeMap<String, f64> {
    let mut all = crate::drops::snapshot(topo, &crate::drops::Path::direct(topo));
    for (key, v) in crate::drops::udp_errors(&topo.backend) {
        all.insert(format!("backend udp {key}"), v);
    }
    all
}

/// Jain's fairness index of `x`: 1 when all are equal, 1/n when one
/// takes everything.
fn jain(x: &[f64]) -> f64 {
    let sum: f64 = x.iter().sum();
    let squares: f64 = x.iter().map(|v| v * v).sum();
    if squares == 0.0 {
        return f64::NAN;
    }
    sum * sum / (x.len() as f64 * squares)
}

/// Value at quantile `q` of sorted `x`.
fn quantile(x: &[f64], q: f64) -> f64 {
    if x.is_empty() {
        return f64::NAN;
    }
    x[((x.len() as f64 - 1.0) * q).round() as usize]
}

/// CPU time of a process so far (user + system, all its threads).
fn cpu_seconds(pid: u32, tick: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (in parentheses): utime and stime are
    // the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<f64>() / tick
}

/// CPU time the whole machine spent outside idle and I/O wait.
fn machine_cpu_seconds(tick: f64) -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    // user..steal; guest time is already counted in user.
    (v.iter().take(8).sum::<f64>() - idle) / tick
}

/// Clock ticks per second of `/proc` CPU times.
fn clock_tick() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds of the processes that matter, and the whole machine.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    broker: f64,
    loadgen: f64,
    backend: f64,
    machine: f64,
}

impl Cpu {
    /// The CPU times so far of the broker, the load generator and the
    /// backend's sink/source (by process id), and of the machine.
    fn now([broker, loadgen, backend]: [u32; 3], tick: f64) -> Self {
        Self {
            broker: cpu_seconds(broker, tick),
            loadgen: cpu_seconds(loadgen, tick),
            backend: cpu_seconds(backend, tick),
            machine: machine_cpu_seconds(tick),
        }
    }

    /// The CPU time spent since `before`.
    fn since(&self, before: &Self) -> Self {
        Self {
            broker: self.broker - before.broker,
            loadgen: self.loadgen - before.loadgen,
            backend: self.backend - before.backend,
            machine: self.machine - before.machine,
        }
    }
}

/// One phase's figures.
struct Outcome {
    name: &'static str,
    sites: usize,
    offered: u64,
    /// Refused by a full send queue at the sender (site phases).
    refused: u64,
    delivered: u64,
    bytes: u64,
    /// The arrival window (first to last packet of the phase), seconds.
    window: f64,
    /// Per-site goodput over that window, Mbit/s, sorted.
    per_site: Vec<f64>,
    cpu: Cpu,
    drops: Vec<String>,
    wall: f64,
}

impl Outcome {
    fn mbits(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.window / 1e6
    }
}

/// The busy-sites run.
pub(crate) fn run(topo: &Topology, sites: usize, secs: u32, options: &Options) {
    assert!(sites >= 1, "--busy needs at least one site");
    let tick = clock_tick();
    let dir = crate::enroll_load_sites(topo, sites);
    let listen = format!("{BACKEND}:{PORT}");
    let mut backend = Driven::start(
        &topo.backend,
        &["backend", "--listen", &listen],
        topo.path("busy-backend.log"),
        Duration::from_secs(30),
    );
    let (n, dir) = (sites.to_string(), dir.display().to_string());
    let mut site = Driven::start(
        &topo.site,
        &[
            "busy",
            "--count",
            &n,
            "--broker",
            "203.0.113.10:443",
            "--dir",
            &dir,
            "--sink",
            &listen,
        ],
        topo.path("busy-sites.log"),
        Duration::from_secs(300),
    );
    let log = read(&site.log);
    let addrs: Vec<IpAddr> = log
        .lines()
        .filter_map(|l| l.strip_prefix("site "))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    assert_eq!(addrs.len(), sites, "site addresses missing:\n{log}");
    eprintln!("{}", log.lines().next().unwrap_or_default());
    let broker = topo.broker.as_ref().unwrap().id();
    let (rate, size, millis) = (options.busy_rate, options.busy_size, u64::from(secs) * 1000);
    let plan: [(&'static str, bool, usize); 4] = [
        ("site -> backend", true, 1),
        ("site -> backend", true, sites),
        ("backend -> site", false, 1),
        ("backend -> site", false, sites),
    ];
    let mut outcomes = Vec::new();
    for (k, (name, up, n)) in plan.into_iter().enumerate() {
        let phase = k as u32 + 1;
        let before_drops = counters(topo);
        let before = Cpu::now([broker, site.pid, backend.pid], tick);
        let started = Instant::now();
        let (offered, refused, received) = if up {
            let sent = site.send(phase, &format!("0 {n} {millis} {rate} {size}"), secs);
            let (mut queued, mut refused) = (0, 0);
            for l in &sent {
                let w: Vec<u64> = l
                    .split_whitespace()
                    .skip(3)
                    .filter_map(|v| v.parse().ok())
                    .collect();
                queued += w.first().copied().unwrap_or(0);
                refused += w.get(1).copied().unwrap_or(0);
            }
            let recv = parse_recv(&backend.settled_report(phase));
            // By source address, in the sites' order; a site of which
            // nothing arrived counts as zero.
            let by_site = addrs[..n]
                .iter()
                .map(|a| {
                    recv.iter()
                        .find(|r| r.from == a.to_string())
                        .cloned()
                        .unwrap_or(Recv {
                            from: a.to_string(),
                            packets: 0,
                            bytes: 0,
                            first: 0,
                            last: 0,
                        })
                })
                .collect::<Vec<_>>();
            (queued + refused, refused, by_site)
        } else {
            let targets = addrs[..n]
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(",");
            let sent = backend.send(phase, &format!("{millis} {rate} {size} {targets}"), secs);
            let offered = sent
                .first()
                .and_then(|l| l.split_whitespace().nth(2))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let recv = parse_recv(&site.settled_report(phase));
            let by_site = (0..n)
                .map(|i| {
                    recv.iter()
                        .find(|r| r.from == i.to_string())
                        .cloned()
                        .unwrap_or(Recv {
                            from: i.to_string(),
                            packets: 0,
                            bytes: 0,
                            first: 0,
                            last: 0,
                        })
                })
                .collect::<Vec<_>>();
            (offered, 0, by_site)
        };
        let wall = started.elapsed().as_secs_f64();
        let after = Cpu::now([broker, site.pid, backend.pid], tick);
        let after_drops = counters(topo);
        let arrived: Vec<&Recv> = received.iter().filter(|r| r.packets > 0).collect();
        let first = arrived.iter().map(|r| r.first).min().unwrap_or(0);
        let last = arrived.iter().map(|r| r.last).max().unwrap_or(0);
        let window = if last > first {
            (last - first) as f64 / 1e6
        } else {
            f64::from(secs)
        };
        let mut per_site: Vec<f64> = received
            .iter()
            .map(|r| r.bytes as f64 * 8.0 / window / 1e6)
            .collect();
        per_site.sort_by(f64::total_cmp);
        let drops = after_drops
            .iter()
            .filter_map(|(key, a)| {
                let d = a - before_drops.get(key).copied().unwrap_or(0.0);
                (d > 0.0).then(|| format!("{key} +{d}"))
            })
            .collect();
        let outcome = Outcome {
            name,
            sites: n,
            offered,
            refused,
            delivered: received.iter().map(|r| r.packets).sum(),
            bytes: received.iter().map(|r| r.bytes).sum(),
            window,
            per_site,
            cpu: after.since(&before),
            drops,
            wall,
        };
        eprintln!(
            "{name}, {n} site(s): {:.0} Mbit/s, {} of {} packets arrived",
            outcome.mbits(),
            outcome.delivered,
            outcome.offered
        );
        outcomes.push(outcome);
    }
    print_table(sites, secs, options, &outcomes, &read(&site.log));
}

fn print_table(sites: usize, secs: u32, options: &Options, outcomes: &[Outcome], site_log: &str) {
    println!();
    println!(
        "many busy sites: {sites} load-generator sites on one broker (one QUIC endpoint in the site namespace), UDP packets of {} payload bytes, {secs} s per phase, offered {}",
        options.busy_size,
        if options.busy_rate == 0 {
            "as fast as the senders go".to_string()
        } else {
            format!("{} packets/s over all sending sites", options.busy_rate)
        }
    );
    println!(
        "the load generator, the backend's sink/source and the broker share this machine's {} cores: the figures are what the broker carries while they compete with it, not the broker alone; CPU s/GB of payload delivered: broker, load generator, backend sink/source, and the whole machine (anything else running included)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<16} {:>5} {:>10} {:>10} {:>8} {:>8} {:>7} {:>24} {:>6} {:>27}",
        "direction",
        "sites",
        "offered/s",
        "arrived/s",
        "lost",
        "Mbit/s",
        "window",
        "per site min/med/max",
        "Jain",
        "CPU s/GB brk/gen/bk/all"
    );
    for o in outcomes {
        let gb = o.bytes as f64 / 1e9;
        let per_gb = |s: f64| if gb > 0.0 { s / gb } else { f64::NAN };
        println!(
            "{:<16} {:>5} {:>10.0} {:>10.0} {:>7.1}% {:>8.1} {:>6.2}s {:>7.2}/{:>7.2}/{:>7.2} {:>6} {:>6.1}/{:>6.1}/{:>6.1}/{:>6.1}",
            o.name,
            o.sites,
            o.offered as f64 / f64::from(secs),
            o.delivered as f64 / o.window,
            100.0 * (1.0 - o.delivered as f64 / o.offered.max(1) as f64),
            o.mbits(),
            o.window,
            quantile(&o.per_site, 0.0),
            quantile(&o.per_site, 0.5),
            quantile(&o.per_site, 1.0),
            if o.sites > 1 {
                format!("{:.3}", jain(&o.per_site))
            } else {
                "-".into()
            },
            per_gb(o.cpu.broker),
            per_gb(o.cpu.loadgen),
            per_gb(o.cpu.backend),
            per_gb(o.cpu.machine),
        );
    }
    for o in outcomes {
        println!(
            "{}, {} site(s): phase took {:.1} s; broker CPU {:.1} s ({:.0} % of a core over the window); refused by the sites' full send queues {}; drops: {}",
            o.name,
            o.sites,
            o.wall,
            o.cpu.broker,
            100.0 * o.cpu.broker / o.window,
            o.refused,
            if o.drops.is_empty() {
                "none".to_string()
            } else {
                o.drops.join("; ")
            }
        );
    }
    for pair in outcomes.chunks(2) {
        if let [alone, busy] = pair {
            println!(
                "{}: {} sites carry {:.2}x the aggregate of one alone; the median site gets {:.1} % of what the alone site got",
                alone.name,
                busy.sites,
                busy.mbits() / alone.mbits(),
                100.0 * quantile(&busy.per_site, 0.5) / alone.mbits()
            );
        }
    }
    let lost: Vec<&str> = site_log
        .lines()
        .filter(|l| l.starts_with("lost ") || l.starts_with("send error"))
        .collect();
    let dropped = site_log
        .lines()
        .filter_map(|l| l.strip_prefix("dropped "))
        .next_back()
        .unwrap_or("0");
    println!(
        "sites' receive queues dropped {dropped} datagrams; connections lost during the run: {}",
        if lost.is_empty() {
            "none".to_string()
        } else {
            lost.join("; ")
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_is_one_for_equal_shares_and_one_over_n_for_one_taker() {
        assert!((jain(&[5.0; 100]) - 1.0).abs() < 1e-12);
        let mut one = vec![0.0; 100];
        one[7] = 80.0;
        assert!((jain(&one) - 0.01).abs() < 1e-12);
        assert!((jain(&[1.0, 3.0]) - 0.8).abs() < 1e-12);
    }

    #[test]
    fn report_lines_parse() {
        let lines = vec![
            "begin report 2 1".to_string(),
            "recv 2 100.64.0.3 10 12000 5 9".to_string(),
            "recv 2 7 1 1200 6 6".to_string(),
            "dropped 0".to_string(),
        ];
        let r = parse_recv(&lines);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].from, "100.64.0.3");
        assert_eq!(
            (r[1].packets, r[1].bytes, r[1].first, r[1].last),
            (1, 1200, 6, 6)
        );
    }
}
