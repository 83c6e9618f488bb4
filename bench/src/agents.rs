//! Real agents through broker restarts: N `tether up` processes (the
//! release binary), each in its own network namespace on the hospital LAN
//! behind the firewall's NAT, enrolled with `tether enroll`, pinged from
//! the backend five times a second; the broker is killed with SIGKILL and
//! started again on the same data directory, round after round.
//!
//! ```text
//!  agent-0 ─┐
//!  agent-1 ─┼─ br-lan (site namespace) ─ hospital-fw (NAT) ─ wan ─ cloud (broker) ─ backend (pinger)
//!  ...     ─┘   172.16.0.0/16, the firewall at 172.16.0.1
//! ```
//!
//! Per round: when the broker answered again, when every agent answered a
//! ping sent after the kill (p50 and max over the agents), how each agent
//! noticed the loss (stateless reset or idle timeout, from its log) and
//! when (p50, max after the kill), and the broker's routes: no address
//! routed to two sites, and no site with another address than before.
//!
//! Every namespace and process the run creates is removed when it ends,
//! also on a panic (drop) and on SIGINT/SIGTERM/SIGHUP (a handler thread
//! that kills the processes inside the run's own namespaces and deletes
//! them).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tether_netns_tests::topology::{BROKER, Topology, read};
use tether_netns_tests::{NetNs, Proc, binary, run as run_cmd, wait_for};

/// The firewall's address on the agents' LAN (172.16.0.0/16, next to the
/// hospital's 192.168.1.0/24).
const AGENT_GW: &str = "172.16.0.1";
/// Time allowed for every agent to come back in one round.
const ROUND_LIMIT: Duration = Duration::from_secs(120);
/// Echo requests per agent per second.
const PINGS_PER_SECOND: u32 = 5;

/// Namespaces of this run, for the signal handler.
static NAMESPACES: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// The run's working directory, for the signal handler.
static WORKDIR: Mutex<Option<PathBuf>> = Mutex::new(None);

/// On SIGINT, SIGTERM or SIGHUP: kill what runs in this run's namespaces
/// (only processes it started: the namespaces are its own), delete them
/// and the working directory, and exit.
fn clean_up_on_signal() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .expect("cannot install the signal handler");
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            eprintln!("signal {sig}: removing the run's namespaces and processes");
            let names = NAMESPACES.lock().map(|n| n.clone()).unwrap_or_default();
            for name in names.iter().rev() {
                remove_namespace(name);
            }
            if let Some(dir) = WORKDIR.lock().ok().and_then(|d| d.clone()) {
                let _ = std::fs::remove_dir_all(dir);
            }
            std::process::exit(128 + sig);
        }
    });
}

/// Kills every process inside namespace `name` and deletes it (what
/// [`NetNs`]'s drop does, for a namespace known only by name).
fn remove_namespace(name: &str) {
    if let Ok(out) = std::process::Command::new("ip")
        .args(["netns", "pids", name])
        .output()
    {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", name])
        .status();
}

/// Removes `namespaces` (and what runs inside) and `dir` on SIGINT,
/// SIGTERM or SIGHUP, as this benchmark does for its own.
pub(crate) fn clean_up_on_signal_for(namespaces: &[&NetNs], dir: &std::path::Path) {
    clean_up_on_signal();
    for ns in namespaces {
        register(ns);
    }
    if let Ok(mut d) = WORKDIR.lock() {
        *d = Some(dir.to_path_buf());
    }
}

fn register(ns: &NetNs) {
    if let Ok(mut n) = NAMESPACES.lock() {
        n.push(ns.name().to_string());
    }
}

/// One agent: its namespace, state directory, log and process.
struct Agent {
    /// Dropped first: the process, then the namespace.
    proc: Option<Proc>,
    ns: NetNs,
    state: PathBuf,
    log: PathBuf,
    site: String,
    /// Its overlay IPv4 address, from its log.
    addr: Option<Ipv4Addr>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.proc.take();
        if let Ok(mut n) = NAMESPACES.lock() {
            n.retain(|x| x != self.ns.name());
        }
    }
}

/// Puts the site namespace's LAN interface on a bridge (the hospital's
/// switch) and gives the firewall an address on the agents' LAN.
fn build_lan(topo: &Topology) {
    tether_netns_tests::lan::bridge_site_lan(&topo.site).unwrap();
    topo.fw
        .run(
            "ip",
            &["addr", "add", &format!("{AGENT_GW}/16"), "dev", "lan"],
        )
        .unwrap();
}

/// The agent's address on the LAN.
fn lan_address(i: usize) -> String {
    let n = i + 2;
    format!("172.16.{}.{}/16", n / 250, n % 250 + 2)
}

/// Creates agent `i`'s namespace, plugged into the LAN.
fn add_agent(topo: &Topology, i: usize) -> Agent {
    let ns = NetNs::new("agent").unwrap();
    register(&ns);
    let port = format!("ag{i}");
    run_cmd(
        "ip",
        &[
            "-n",
            topo.site.name(),
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ],
    )
    .unwrap();
    for args in [
        &[
            "-n",
            topo.site.name(),
            "link",
            "set",
            &port,
            "master",
            "br-lan",
        ][..],
        &["-n", topo.site.name(), "link", "set", &port, "up"],
        &[
            "-n",
            ns.name(),
            "addr",
            "add",
            &lan_address(i),
            "dev",
            "eth0",
        ],
        &["-n", ns.name(), "link", "set", "eth0", "up"],
        &["-n", ns.name(), "route", "add", "default", "via", AGENT_GW],
    ] {
        run_cmd("ip", args).unwrap();
    }
    Agent {
        proc: None,
        state: topo.path(&format!("agent-{i}")),
        log: topo.path(&format!("agent-{i}.log")),
        site: format!("agent-{i}"),
        ns,
        addr: None,
    }
}

/// Creates a token for the agent's site and runs `tether enroll` in its
/// namespace.
fn enroll(topo: &Topology, agent: &Agent) {
    let out = topo
        .broker_cli(&["token", "create", "--site", &agent.site, "--region", "eu"])
        .unwrap();
    let code = out
        .split_whitespace()
        .find(|w| w.starts_with("tt1-"))
        .unwrap_or_else(|| panic!("no token code in: {out}"))
        .to_string();
    let tether = binary("tether").display().to_string();
    let state = agent.state.display().to_string();
    let mut last = String::new();
    // A busy machine may time an enrollment out; the token stays valid
    // until it is used.
    for _ in 0..3 {
        match agent.ns.run(
            &tether,
            &[
                "enroll",
                "--broker",
                BROKER,
                "--token",
                &code,
                "--state-dir",
                &state,
            ],
        ) {
            Ok(_) => return,
            Err(e) => last = e.to_string(),
        }
    }
    panic!("{}: enrollment failed: {last}", agent.site);
}

/// The agent's overlay IPv4 address, from the last "reachable as" line of
/// its log.
fn logged_address(log: &str) -> Option<Ipv4Addr> {
    log.lines()
        .rev()
        .find_map(|l| l.split("this site is reachable as ").nth(1))
        .and_then(|rest| rest.split_whitespace().find_map(|w| w.parse().ok()))
}

/// When a log line was written (its RFC 3339 timestamp).
fn line_time(line: &str) -> Option<SystemTime> {
    line.split_whitespace()
        .next()
        .and_then(|t| humantime::parse_rfc3339(t).ok())
}

/// How an agent noticed the loss of its broker, from its log since
/// `offset`: by stateless reset (`Some(true)`), otherwise (`Some(false)`),
/// and when.
fn noticed(log: &str, offset: usize) -> Option<(bool, SystemTime)> {
    let line = log
        .get(offset..)?
        .lines()
        .find(|l| l.contains("lost the connection to the broker"))?;
    Some((line.contains("stateless reset"), line_time(line)?))
}

/// The broker's routes to sites' own addresses: (prefix, site), from
/// `tether-broker routes` (`PREFIX site-address site NAME REGION`).
fn routes(topo: &Topology) -> Vec<(String, String)> {
    let table = topo.broker_cli(&["routes"]).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.len() >= 4 && cols[1] == "site-address")
                .then(|| (cols[0].to_string(), cols[3].to_string()))
        })
        .collect()
}

/// Echoes answered per agent: for the agents' addresses, the first time
/// an echo sent at or after `epoch` was answered.
struct Answers {
    epoch: Instant,
    first: Vec<Option<Instant>>,
}

/// Pings every address from the backend namespace, `PINGS_PER_SECOND`
/// times a second, until `stop` is set; records answers in `answers`.
/// Each echo carries its send time, so an answer is credited to the
/// moment it was sent in.
fn start_pinger(
    backend: &NetNs,
    addrs: Vec<Ipv4Addr>,
    answers: Arc<Mutex<Answers>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, recvfrom, sendto,
        setsockopt, socket, sockopt,
    };
    use std::sync::atomic::Ordering;
    // The socket is made in the backend's namespace, by a thread that
    // enters it; it stays there for whoever uses it.
    let path = format!("/run/netns/{}", backend.name());
    let fd: OwnedFd = std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).unwrap();
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::empty(),
            SockProtocol::Icmp,
        )
        .unwrap()
    })
    .join()
    .unwrap();
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(0, 200_000),
    )
    .unwrap();
    let fd = Arc::new(fd);
    let base = Instant::now();
    let index: HashMap<Ipv4Addr, usize> = addrs.iter().enumerate().map(|(i, a)| (*a, i)).collect();
    let id: u16 = (std::process::id() & 0xffff) as u16;
    let sender = {
        let (fd, stop) = (fd.clone(), stop.clone());
        std::thread::spawn(move || {
            let period = Duration::from_secs(1) / PINGS_PER_SECOND;
            let mut seq: u16 = 0;
            while !stop.load(Ordering::Relaxed) {
                let tick = Instant::now();
                seq = seq.wrapping_add(1);
                for addr in &addrs {
                    let sent = base.elapsed().as_nanos() as u64;
                    let packet = echo_request(id, seq, sent);
                    let to = SockaddrIn::from(std::net::SocketAddrV4::new(*addr, 0));
                    let _ = sendto(fd.as_raw_fd(), &packet, &to, MsgFlags::empty());
                }
                std::thread::sleep(period.saturating_sub(tick.elapsed()));
            }
        })
    };
    let receiver = std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, Some(from))) = recvfrom::<SockaddrIn>(fd.as_raw_fd(), &mut buf) else {
                continue;
            };
            let now = Instant::now();
            // The IP header, then the ICMP echo reply.
            let ihl = usize::from(buf[0] & 0x0f) * 4;
            let icmp = &buf[ihl.min(n)..n];
            if icmp.len() < 16 || icmp[0] != 0 || icmp[4..6] != id.to_be_bytes() {
                continue;
            }
            let Some(&i) = index.get(&from.ip()) else {
                continue;
            };
            let sent =
                base + Duration::from_nanos(u64::from_be_bytes(icmp[8..16].try_into().unwrap()));
            let mut a = answers.lock().unwrap();
            if sent >= a.epoch && a.first[i].is_none() {
                a.first[i] = Some(now);
            }
        }
    });
    vec![sender, receiver]
}

/// An ICMP echo request carrying `sent` (nanoseconds) as its payload.
fn echo_request(id: u16, seq: u16, sent: u64) -> Vec<u8> {
    let mut p = vec![8u8, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&sent.to_be_bytes());
    p.extend_from_slice(&[0x5a; 48]);
    let mut sum: u32 = p
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

/// Sets the agent's `transport.keepalive` in the configuration `tether
/// enroll` wrote.
fn set_keepalive(agent: &Agent, seconds: f64) {
    let path = agent.state.join(tether::state_dir::CONFIG_FILE);
    let text = read(&path);
    assert!(
        text.contains("\nkeepalive = "),
        "no keepalive in {}",
        path.display()
    );
    let text: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with("keepalive = ") {
                format!("keepalive = \"{}ms\"", (seconds * 1000.0).round())
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(&path, text.join("\n") + "\n").unwrap();
}

/// Runs `rounds` kill-and-restart rounds with `count` real agents, `gap`
/// apart (from all being back to the next kill), with the agents'
/// keepalive set to `keepalive` seconds if given; prints a table.
pub(crate) fn run(
    topo: &mut Topology,
    count: usize,
    rounds: usize,
    gap: Duration,
    keepalive: Option<f64>,
) {
    clean_up_on_signal();
    for ns in [&topo.site, &topo.fw, &topo.wan, &topo.cloud, &topo.backend] {
        register(ns);
    }
    if let Ok(mut d) = WORKDIR.lock() {
        *d = Some(topo.dir.path().to_path_buf());
    }
    let started = Instant::now();
    build_lan(topo);
    let mut agents: Vec<Agent> = (0..count).map(|i| add_agent(topo, i)).collect();
    eprintln!(
        "{count} agent namespaces on the LAN in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    // A few enrollments at once: each is a process and a handshake.
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(agent) = agents.get(i) else { break };
                    enroll(topo, agent);
                }
            });
        }
    });
    eprintln!(
        "{count} agents enrolled in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if let Some(k) = keepalive {
        agents.iter().for_each(|a| set_keepalive(a, k));
    }
    let started = Instant::now();
    let tether = binary("tether").display().to_string();
    for agent in &mut agents {
        let state = agent.state.display().to_string();
        agent.proc = Some(
            agent
                .ns
                .spawn(
                    &tether,
                    &["up", "--state-dir", &state],
                    Some(agent.log.clone()),
                )
                .unwrap(),
        );
    }
    let all_up = wait_for(Duration::from_secs(300), || {
        agents.iter_mut().all(|a| {
            if a.addr.is_none() {
                a.addr = logged_address(&read(&a.log));
            }
            a.addr.is_some()
        })
    });
    if !all_up {
        let missing: Vec<&Agent> = agents.iter().filter(|a| a.addr.is_none()).collect();
        panic!(
            "{} agents did not come up; the first one's log:\n{}",
            missing.len(),
            read(&missing[0].log)
        );
    }
    eprintln!(
        "{count} agents up in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let addrs: Vec<Ipv4Addr> = agents.iter().map(|a| a.addr.unwrap()).collect();
    let mut owners: HashMap<String, String> = HashMap::new();
    for a in &agents {
        owners.insert(format!("{}/32", a.addr.unwrap()), a.site.clone());
    }
    let answers = Arc::new(Mutex::new(Answers {
        epoch: Instant::now(),
        first: vec![None; count],
    }));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pinger = start_pinger(&topo.backend, addrs.clone(), answers.clone(), stop.clone());
    let everyone_answers = |timeout: Duration| {
        wait_for(timeout, || {
            answers.lock().unwrap().first.iter().all(Option::is_some)
        })
    };
    assert!(
        everyone_answers(Duration::from_secs(60)),
        "not every agent answers pings before the first round"
    );

    println!();
    println!(
        "broker kill -9 and restart: {count} agents (tether up) behind the hospital NAT, pinged {PINGS_PER_SECOND}/s each from the backend, keepalive {}, {rounds} rounds, {:.1} s after all were back",
        keepalive.map_or("default".to_string(), |k| format!("{k} s")),
        gap.as_secs_f64()
    );
    println!(
        "{:>5} {:>10} {:>10} {:>10} {:>7} {:>7} {:>11} {:>11} {:>6} {:>7}",
        "round",
        "broker up",
        "back p50",
        "back max",
        "reset",
        "timeout",
        "notice p50",
        "notice max",
        "twice",
        "changed"
    );
    let mut maxima = Vec::new();
    let (mut all_twice, mut all_changed) = (0usize, 0usize);
    for round in 1..=rounds {
        std::thread::sleep(gap);
        let offsets: Vec<usize> = agents.iter().map(|a| read(&a.log).len()).collect();
        let killed_wall = SystemTime::now();
        let killed = Instant::now();
        {
            let mut a = answers.lock().unwrap();
            a.epoch = killed;
            a.first.iter_mut().for_each(|f| *f = None);
        }
        topo.broker.as_mut().unwrap().kill();
        // Echoes sent from now on can only be answered through the new
        // broker.
        answers.lock().unwrap().epoch = Instant::now();
        topo.start_broker().unwrap();
        let broker_up = killed.elapsed();
        let done = everyone_answers(ROUND_LIMIT);
        let firsts = answers.lock().unwrap().first.clone();
        if !done {
            let late: Vec<&str> = agents
                .iter()
                .zip(&firsts)
                .filter(|(_, f)| f.is_none())
                .map(|(a, _)| a.site.as_str())
                .collect();
            panic!(
                "round {round}: {} agents not back after {} s ({:?}...); {}'s log:\n{}",
                late.len(),
                ROUND_LIMIT.as_secs(),
                &late[..late.len().min(5)],
                late[0],
                read(&agents.iter().find(|a| a.site == late[0]).unwrap().log)
            );
        }
        let mut back: Vec<f64> = firsts
            .iter()
            .map(|f| f.unwrap().duration_since(killed).as_secs_f64())
            .collect();
        let (mut by_reset, mut by_timeout) = (0usize, 0usize);
        let mut notice: Vec<f64> = Vec::new();
        for (a, off) in agents.iter().zip(&offsets) {
            if let Some((reset, at)) = noticed(&read(&a.log), *off) {
                if reset {
                    by_reset += 1;
                } else {
                    by_timeout += 1;
                }
                if let Ok(d) = at.duration_since(killed_wall) {
                    notice.push(d.as_secs_f64());
                }
            }
        }
        // Ownership: every agent's /32 routed to that agent alone.
        let table = routes(topo);
        let mut seen: HashMap<&str, Vec<&str>> = HashMap::new();
        for (prefix, site) in &table {
            seen.entry(prefix.as_str()).or_default().push(site.as_str());
        }
        let twice = seen.values().filter(|s| s.len() > 1).count();
        let changed = owners
            .iter()
            .filter(|(prefix, site)| {
                seen.get(prefix.as_str())
                    .is_none_or(|s| s.len() != 1 || s[0] != site.as_str())
            })
            .count()
            + agents
                .iter()
                .filter(|a| logged_address(&read(&a.log)) != a.addr)
                .count();
        all_twice += twice;
        all_changed += changed;
        let max = quantile(&mut back, 1.0);
        println!(
            "{:>5} {:>8.2} s {:>8.2} s {:>8.2} s {:>7} {:>7} {:>9.2} s {:>9.2} s {:>6} {:>7}",
            round,
            broker_up.as_secs_f64(),
            quantile(&mut back, 0.5),
            max,
            by_reset,
            by_timeout,
            quantile(&mut notice, 0.5),
            quantile(&mut notice, 1.0),
            twice,
            changed
        );
        maxima.push(max);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in pinger {
        let _ = t.join();
    }
    println!(
        "every agent back after the kill: p50 of the rounds {:.2} s, max {:.2} s; addresses routed twice {all_twice}, changed {all_changed}",
        quantile(&mut maxima.clone(), 0.5),
        quantile(&mut maxima, 1.0)
    );
    assert_eq!(
        all_twice + all_changed,
        0,
        "an address moved or was owned twice"
    );
}
