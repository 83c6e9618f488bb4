//! `tether-bench`: tether against baselines on the hospital topology, one
//! run, one table.
//!
//! Run as root after `cargo build --release --workspace --bins` (the
//! script `bench/run.sh` does both). On the topology of the netns tests it
//! measures, from the backend to the site and back:
//!
//! - iperf3 TCP throughput, 1 stream each way and 4 streams;
//! - ping round-trip p50 and p99 (`--ping` alone: with the tunnel ends'
//!   context switches and CPU time per ping);
//! - connect-to-first-packet: from starting the agent until a packet gets
//!   through;
//! - CPU seconds per GB moved over the 1-stream backend -> site run: the
//!   whole machine, and each tunnel end's process;
//!
//! through tether, through tether from a backend behind a cloud gateway
//! (`tether-gateway`, WireGuard to the broker), through the same paths
//! routed without any tunnel, through
//! boringtun-cli, through wireguard-go and through quincy in its `tls` and
//! `noise` modes (all on UDP 443 of the published CIDR, so the hospital
//! firewall lets them through as it lets tether).
//! Then it connects 1,000 idle sites with `tether-loadgen` and reports the
//! broker's memory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;

mod agents;
mod busy;
mod console;
mod cpu;
mod drops;
mod ha;
mod idle;
mod lan;
mod lossy;
mod ping;
mod probe;
mod quincy;
mod storm;
use probe::first_reply;
use tether_netns_tests::topology::{Cloud, Egress, SITE_LAN, Topology, read};
use tether_netns_tests::{NetNs, Proc, binary, require_root, wait_for};

#[derive(Parser)]
struct Args {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 10)]
    duration: u32,
    /// Idle sites for the memory measurement (0 to skip).
    #[arg(long, default_value_t = 1000)]
    sites: usize,
    /// Measure only tether and the path through a cloud gateway.
    #[arg(long)]
    gateway_only: bool,
    /// Measure only the lossy and long paths (loss and delay on the WAN
    /// link): tether over HTTP/3 and HTTP/2, the raw path and the WireGuard
    /// baselines.
    #[arg(long)]
    lossy: bool,
    /// Measure only the reconnect storm: this many idle sites, the broker
    /// killed with SIGKILL and restarted `--rounds` times.
    #[arg(long)]
    storm: Option<usize>,
    /// Measure only broker restarts with this many real agents (`tether
    /// up`, each in its own namespace behind the hospital NAT, pinged from
    /// the backend), the broker killed with SIGKILL and restarted
    /// `--rounds` times, `--gap` seconds after all are back.
    #[arg(long)]
    agents: Option<usize>,
    /// With --storm or --agents: the sites' keepalive interval, seconds
    /// (the agent's `transport.keepalive`; default: the agent's default).
    #[arg(long)]
    keepalive: Option<f64>,
    /// With --agents: seconds from every agent being back to the next kill.
    #[arg(long, default_value_t = 3.0)]
    gap: f64,
    /// With --storm or --agents: kill-and-restart rounds.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// With --lossy: only these paths (h3, h2, raw, boringtun, wggo,
    /// quincy-tls, quincy-noise).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// With --lossy: only these impairments (B = 1 % / 50 ms, C = 5 % /
    /// 200 ms).
    #[arg(long, value_delimiter = ',')]
    lossy_path: Vec<String>,
    /// With --lossy: only these inner congestion controls (bbr, cubic).
    #[arg(long, value_delimiter = ',')]
    inner: Vec<String>,
    /// With --lossy: the MTU of the WireGuard baselines' interfaces (1420,
    /// WireGuard's usual: a 1500-byte path less its overhead over IPv6).
    /// The tether row prints its own device's MTU; this gives the
    /// baselines the same packet size inside, to compare at equal MTU.
    #[arg(long, default_value_t = WG_MTU)]
    wg_mtu: u16,
    /// Measure only where packets are lost inside tether under load: HTTP/3
    /// with 1 and 4 iperf3 streams each way, with the tunnelled TCP's
    /// retransmits and every drop counter along the path, this many rounds.
    #[arg(long)]
    drops: Option<u32>,
    /// With --drops: run the probe from the backend of a cloud gateway
    /// (WireGuard to the broker, then HTTP/3 to the site).
    #[arg(long, requires = "drops")]
    drops_via_gateway: bool,
    /// Measure only a host on the hospital LAN through the site's LAN
    /// mapping next to the site's own address, alternating them this many
    /// rounds.
    #[arg(long)]
    lan: Option<usize>,
    #[command(flatten)]
    busy: busy::Options,
    /// Measure only idle sites on one broker: connect idle sites in steps
    /// up to each of these cumulative counts (e.g. 10000,50000) and report
    /// the broker's memory, CPU at idle and the connect rate after each.
    #[arg(long, value_delimiter = ',')]
    idle: Vec<usize>,
    /// With --idle: seconds over which CPU at idle is measured.
    #[arg(long, default_value_t = 30)]
    idle_cpu: u64,
    /// With --idle: sites per load generator process (each its own QUIC
    /// endpoint).
    #[arg(long, default_value_t = 25_000)]
    per_loadgen: usize,
    /// With --idle: keep the enrollment (the broker's data directory and
    /// the sites' identities) in this directory, or, if it already holds
    /// one of at least the largest count, restart the broker on it and
    /// time only the connect step.
    #[arg(long)]
    idle_keep: Option<PathBuf>,
    /// Measure only the fleet console with this many sites registered at
    /// the broker: its API requests (curl) and its pages in headless
    /// Chromium.
    #[arg(long)]
    console: Option<usize>,
    /// With --console: how many of the sites enroll and connect (the rest
    /// are registered only).
    #[arg(long, default_value_t = 1000)]
    console_enrolled: usize,
    /// With --console: rounds of each request and page load.
    #[arg(long, default_value_t = 5)]
    console_rounds: usize,
    /// Path of boringtun-cli (default: from PATH or ~/.cargo/bin).
    #[arg(long)]
    boringtun: Option<PathBuf>,
    /// Directory of quincy-server, quincy-client and quincy-identity
    /// (default: PATH, then ~/.cargo/bin); quincy is skipped without them.
    #[arg(long)]
    quincy_dir: Option<PathBuf>,
    /// Measure only the agent's start: this many starts of the site's
    /// agent, each with the time of every step until the first packet
    /// (from the agent's and broker's logs).
    #[arg(long)]
    first_packet: Option<usize>,
    /// Measure only ping through the tunnel, this many rounds of 300, with
    /// the agent's and the broker's context switches and CPU time per ping,
    /// then as many rounds over the raw routed path.
    #[arg(long)]
    ping: Option<usize>,
    /// With --first-packet: the agent's RUST_LOG.
    #[arg(long, default_value = "info,tether=debug")]
    agent_log: String,
    /// With --first-packet: keep the last agent up this many seconds
    /// (for a profiler).
    #[arg(long)]
    hold: Option<u64>,
    /// Measure only several brokers on a three-member etcd cluster (real
    /// binaries): throughput across two brokers next to one, the failover
    /// gap over this many SIGKILLs of the broker holding a site (real
    /// agents with a standby), etcd writes per second with `--ha-sites`
    /// idle sites, and the time for them to be back on the other brokers
    /// after their broker is killed (`--ha` alone: 20 kills).
    #[arg(long, num_args = 0..=1, default_missing_value = "20")]
    ha: Option<usize>,
    /// With --ha: idle load-generator sites (0 to skip those two
    /// measurements).
    #[arg(long, default_value_t = 1000)]
    ha_sites: usize,
    /// With --ha: seconds of each quiet interval over which etcd writes
    /// are counted.
    #[arg(long, default_value_t = 30)]
    ha_quiet: u64,
    /// With --ha: which brokers each failover round kills: `holder` (the
    /// broker holding the site, which may carry the gateway's traffic
    /// too) or `site-only` (the gateway's traffic goes through another
    /// broker, which stays up).
    #[arg(long, value_enum, default_value = "holder")]
    ha_kill: ha::Kill,
    #[command(subcommand)]
    probe: Option<probe::Probe>,
}

/// Starts `tether-loadgen COMMAND` on the site for the `count` sites
/// enrolled in `dir` (see [`enroll_load_sites`]) with `extra` arguments,
/// logging to `log`, and waits (up to 300 s) until it reports them
/// connected.
pub(crate) fn start_loadgen(
    topo: &Topology,
    command: &str,
    dir: &std::path::Path,
    count: usize,
    extra: &[&str],
    log: &std::path::Path,
) -> Proc {
    let (n, dir) = (count.to_string(), dir.display().to_string());
    let mut args = vec![
        command,
        "--count",
        &n,
        "--broker",
        "203.0.113.10:443",
        "--dir",
        &dir,
    ];
    args.extend_from_slice(extra);
    let proc = topo
        .site
        .spawn(
            &binary("tether-loadgen").display().to_string(),
            &args,
            Some(log.to_path_buf()),
        )
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(300), || read(log).contains("connected")),
        "load generator failed:\n{}",
        read(log)
    );
    proc
}

/// Enrolls `n` sites `load-<i>` with `tether-loadgen enroll`; returns
/// their directory.
pub(crate) fn enroll_load_sites(topo: &Topology, n: usize) -> PathBuf {
    let admin_token = std::fs::read_to_string(topo.path("broker/admin.token")).unwrap();
    let dir = topo.path("loadgen");
    run_loadgen_enroll(&topo.cloud, n, &admin_token, "203.0.113.10:443", &[], &dir);
    dir
}

/// `tether-loadgen enroll` in `ns`: `n` sites through the admin API on
/// 127.0.0.1:7070 with `admin_token`, for `brokers` (comma-separated), in
/// region eu, their state directories under `dir`; `extra` arguments
/// appended.
pub(crate) fn run_loadgen_enroll(
    ns: &NetNs,
    n: usize,
    admin_token: &str,
    brokers: &str,
    extra: &[&str],
    dir: &std::path::Path,
) {
    let loadgen = binary("tether-loadgen").display().to_string();
    let (n, dir) = (n.to_string(), dir.display().to_string());
    let mut args = vec![
        "enroll",
        "--count",
        &n,
        "--admin",
        "http://127.0.0.1:7070",
        "--admin-token",
        admin_token.trim(),
        "--broker",
        brokers,
        "--region",
        "eu",
        "--dir",
        &dir,
    ];
    args.extend_from_slice(extra);
    let out = ns.run(&loadgen, &args).unwrap();
    // The token step and the enrollment rate per 1,000, for the record.
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let one_site = line
            .strip_prefix("enrolled ")
            .is_some_and(|rest| rest.chars().all(|c| c.is_ascii_digit()));
        let summary = ["tokens ", "progress ", "enrolled "]
            .iter()
            .any(|p| line.starts_with(p));
        if summary && !one_site {
            eprintln!("loadgen: {line}");
        }
    }
}

struct Row {
    name: &'static str,
    down1: f64,
    up1: f64,
    down4: f64,
    p50: f64,
    p99: f64,
    setup: Option<Duration>,
    /// CPU per GB over the 1-stream -> run, with the names of the
    /// processes sampled.
    cpu: cpu::PerGb,
    procs: Vec<&'static str>,
}

/// One iperf3 run: goodput in Gbit/s and the sender's retransmits.
pub(crate) fn iperf(
    client: &NetNs,
    server: &str,
    streams: u32,
    reverse: bool,
    secs: u32,
) -> (f64, u64) {
    let (gbits, retransmits, _) = iperf_bytes(client, server, streams, reverse, secs);
    (gbits, retransmits)
}

/// [`iperf`], also returning the bytes received.
fn iperf_bytes(
    client: &NetNs,
    server: &str,
    streams: u32,
    reverse: bool,
    secs: u32,
) -> (f64, u64, u64) {
    let mut args = vec![
        "-c".to_string(),
        server.to_string(),
        "-J".into(),
        "-t".into(),
        secs.to_string(),
        "-P".into(),
        streams.to_string(),
    ];
    if reverse {
        args.push("-R".into());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = client.command("iperf3").args(&refs).output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let gbits = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9;
    let retransmits = json["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    let bytes = json["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    (gbits, retransmits, bytes)
}

fn ping_stats(from: &NetNs, to: &str) -> (f64, f64) {
    let out = from
        .command("ping")
        .args(["-c", "300", "-i", "0.01", "-W", "1", to])
        .output()
        .unwrap();
    let mut rtts: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next())
        .filter_map(|t| t.parse().ok())
        .collect();
    if rtts.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    rtts.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| rtts[((rtts.len() as f64 - 1.0) * p).round() as usize];
    (pct(0.50), pct(0.99))
}

fn measure(
    topo: &Topology,
    name: &'static str,
    addr: &str,
    secs: u32,
    setup: Option<Duration>,
) -> Row {
    measure_from(topo, &topo.backend, name, addr, secs, setup)
}

/// Like [`measure`], from another backend host.
fn measure_from(
    topo: &Topology,
    client: &NetNs,
    name: &'static str,
    addr: &str,
    secs: u32,
    setup: Option<Duration>,
) -> Row {
    measure_procs(topo, client, name, addr, secs, setup, &[])
}

/// Like [`measure_from`], with the CPU of the processes `procs` (name,
/// pid) per GB moved besides the whole machine's.
fn measure_procs(
    topo: &Topology,
    client: &NetNs,
    name: &'static str,
    addr: &str,
    secs: u32,
    setup: Option<Duration>,
    procs: &[(&'static str, u32)],
) -> Row {
    let _server = topo.site.spawn("iperf3", &["-s"], None).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pids: Vec<u32> = procs.iter().map(|p| p.1).collect();
    let before = cpu::sample(&pids);
    let (down1, _, bytes) = iperf_bytes(client, addr, 1, false, secs);
    let cpu = cpu::per_gb(&before, &cpu::sample(&pids), bytes);
    let up1 = iperf(client, addr, 1, true, secs).0;
    let down4 = iperf(client, addr, 4, false, secs).0;
    let (p50, p99) = ping_stats(client, addr);
    let per_process: Vec<String> = procs
        .iter()
        .zip(&cpu.procs)
        .map(|((n, _), s)| format!("{n} {s:.2}"))
        .collect();
    eprintln!(
        "{name}: {down1:.2} / {up1:.2} / {down4:.2} Gbit/s, ping {p50:.3} / {p99:.3} ms, {:.2} CPU s/GB ({})",
        cpu.machine,
        per_process.join(", ")
    );
    Row {
        name,
        down1,
        up1,
        down4,
        p50,
        p99,
        setup,
        cpu,
        procs: procs.iter().map(|p| p.0).collect(),
    }
}

/// Time until the site reaches the backend.
fn first_packet(topo: &Topology, started: Instant) -> Option<Duration> {
    wait_for(Duration::from_secs(30), || {
        topo.site
            .succeeds("ping", &["-c", "1", "-W", "1", "10.20.0.10"])
    })
    .then(|| started.elapsed())
}

fn wg_key(ns: &NetNs) -> (String, String) {
    let private = String::from_utf8(ns.run("wg", &["genkey"]).unwrap().stdout)
        .unwrap()
        .trim()
        .to_string();
    let mut child = ns
        .command("wg")
        .arg("pubkey")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(private.as_bytes())
        .unwrap();
    let public = String::from_utf8(child.wait_with_output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_string();
    (private, public)
}

/// A WireGuard tunnel between site and cloud with a userspace
/// implementation, up until dropped; the site reaches it at [`WG_SITE`].
pub(crate) struct WgTunnel<'a> {
    topo: &'a Topology,
    site_if: String,
    /// From starting the site's side to the first packet through.
    pub(crate) setup: Option<Duration>,
    _procs: [Proc; 2],
}

/// The site's address inside a WireGuard baseline tunnel.
pub(crate) const WG_SITE: &str = "10.99.0.2";

/// The MTU of a WireGuard baseline's interfaces, unless told otherwise.
pub(crate) const WG_MTU: u16 = 1420;

impl<'a> WgTunnel<'a> {
    /// Starts `program args... <name>-c` on the cloud host and
    /// `program args... <name>-s` on the site, on the broker's UDP 443,
    /// their interfaces at `mtu`.
    pub(crate) fn up(
        topo: &'a Topology,
        name: &str,
        program: &str,
        extra: &[&str],
        mtu: u16,
    ) -> Self {
        let mtu = mtu.to_string();
        let (site_if, cloud_if) = (format!("{name}-s"), format!("{name}-c"));
        let socket = |i: &str| PathBuf::from(format!("/var/run/wireguard/{i}.sock"));
        // UAPI sockets live in the shared filesystem: clear leftovers of an
        // earlier run, or `wg` would talk to a dead process.
        for i in [&site_if, &cloud_if] {
            let _ = std::fs::remove_file(socket(i));
        }
        let mut args: Vec<&str> = extra.to_vec();
        args.push(&cloud_if);
        let cloud = topo
            .cloud
            .spawn(program, &args, Some(topo.path(&format!("{cloud_if}.log"))))
            .unwrap();
        assert!(
            wait_for(Duration::from_secs(10), || socket(&cloud_if).exists()),
            "{name} did not start:\n{}",
            read(&topo.path(&format!("{cloud_if}.log")))
        );
        let (cloud_priv, cloud_pub) = wg_key(&topo.cloud);
        let (site_priv, site_pub) = wg_key(&topo.site);
        let key_file = |k: &str, n: &str| {
            let p = topo.path(n);
            std::fs::write(&p, k).unwrap();
            p.display().to_string()
        };
        let cloud_key = key_file(&cloud_priv, &format!("{cloud_if}.key"));
        let allowed_site = format!("{WG_SITE}/32");
        topo.cloud
            .run(
                "wg",
                &[
                    "set",
                    &cloud_if,
                    "listen-port",
                    "443",
                    "private-key",
                    &cloud_key,
                    "peer",
                    &site_pub,
                    "allowed-ips",
                    &allowed_site,
                ],
            )
            .unwrap();
        topo.cloud
            .run("ip", &["addr", "add", "10.99.0.1/24", "dev", &cloud_if])
            .unwrap();
        topo.cloud
            .run("ip", &["link", "set", &cloud_if, "mtu", &mtu, "up"])
            .unwrap();
        topo.backend
            .run(
                "ip",
                &["route", "replace", "10.99.0.0/24", "via", "10.20.0.1"],
            )
            .unwrap();
        // The site side: time from starting it to the first packet through.
        let (site, setup) = first_reply(topo, &format!("{site_if}-first-probe.log"), || {
            let mut args: Vec<&str> = extra.to_vec();
            args.push(&site_if);
            let site = topo
                .site
                .spawn(program, &args, Some(topo.path(&format!("{site_if}.log"))))
                .unwrap();
            assert!(wait_for(Duration::from_secs(10), || socket(&site_if).exists()));
            let site_key = key_file(&site_priv, &format!("{site_if}.key"));
            topo.site
                .run(
                    "wg",
                    &[
                        "set",
                        &site_if,
                        "private-key",
                        &site_key,
                        "peer",
                        &cloud_pub,
                        "endpoint",
                        "203.0.113.10:443",
                        "allowed-ips",
                        "10.99.0.0/24,10.20.0.0/24",
                        "persistent-keepalive",
                        "25",
                    ],
                )
                .unwrap();
            topo.site
                .run("ip", &["addr", "add", &allowed_site, "dev", &site_if])
                .unwrap();
            topo.site
                .run("ip", &["link", "set", &site_if, "mtu", &mtu, "up"])
                .unwrap();
            topo.site
                .run("ip", &["route", "add", "10.99.0.0/24", "dev", &site_if])
                .unwrap();
            topo.site
                .run("ip", &["route", "add", "10.20.0.0/24", "dev", &site_if])
                .unwrap();
            site
        });
        Self {
            topo,
            site_if,
            setup,
            _procs: [cloud, site],
        }
    }
}

impl WgTunnel<'_> {
    /// The process ids of the cloud's and the site's end.
    pub(crate) fn pids(&self) -> [u32; 2] {
        [self._procs[0].id(), self._procs[1].id()]
    }
}

impl Drop for WgTunnel<'_> {
    fn drop(&mut self) {
        let _ = self.topo.site.run(
            "ip",
            &["route", "del", "10.20.0.0/24", "dev", &self.site_if],
        );
    }
}

/// The WireGuard baseline `name` measured like tether.
fn wireguard(topo: &Topology, name: &'static str, program: &str, extra: &[&str], secs: u32) -> Row {
    let tunnel = WgTunnel::up(topo, name, program, extra, WG_MTU);
    let [cloud, site] = tunnel.pids();
    measure_procs(
        topo,
        &topo.backend,
        name,
        WG_SITE,
        secs,
        tunnel.setup,
        &[("cloud end", cloud), ("site end", site)],
    )
}

/// Opens the hospital firewall towards the site and routes the hospital
/// LAN and the backend network through the WAN: the path without a tunnel.
pub(crate) fn open_raw_path(topo: &Topology) {
    topo.fw
        .run(
            "nft",
            &[
                "insert", "rule", "inet", "hospital", "forward", "ip", "daddr", SITE_LAN, "accept",
            ],
        )
        .unwrap();
    topo.wan
        .run(
            "ip",
            &["route", "add", "192.168.1.0/24", "via", "198.51.100.2"],
        )
        .unwrap();
    topo.wan
        .run(
            "ip",
            &["route", "add", "10.20.0.0/24", "via", "203.0.113.10"],
        )
        .unwrap();
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let mut args = Args::parse();
    if let Some(probe) = args.probe.take() {
        if let Err(e) = probe.run() {
            eprintln!("probe: {e}");
            std::process::exit(1);
        }
        return;
    }
    if !require_root() {
        return;
    }
    if let Some(rounds) = args.ha {
        ha::run(&ha::Options {
            rounds,
            kill: args.ha_kill,
            sites: args.ha_sites,
            quiet: args.ha_quiet,
            duration: args.duration,
        });
        return;
    }
    if let Some(rounds) = args.first_packet {
        let topo = Topology::new("").unwrap();
        probe::timeline(&topo, rounds, &args.agent_log, args.hold);
        return;
    }
    if let Some(rounds) = args.ping {
        let topo = Topology::new("").unwrap();
        ping::run(&topo, rounds.max(1));
        return;
    }
    if let Some(count) = args.agents {
        let mut topo = Topology::new("").unwrap();
        agents::run(
            &mut topo,
            count,
            args.rounds,
            Duration::from_secs_f64(args.gap),
            args.keepalive,
        );
        return;
    }
    if let Some(sites) = args.console {
        let topo = Topology::new("").unwrap();
        console::run(
            &topo,
            sites,
            args.console_enrolled,
            args.console_rounds.max(1),
        );
        return;
    }
    if !args.idle.is_empty() {
        let mut topo = Topology::new("").unwrap();
        idle::run(
            &mut topo,
            &args.idle,
            args.idle_cpu,
            args.per_loadgen.max(1),
            args.idle_keep.as_deref(),
        );
        return;
    }
    if let Some(rounds) = args.lan {
        let mut topo = Topology::new("").unwrap();
        lan::run_lan(&mut topo, args.duration, rounds);
        return;
    }
    if let Some(sites) = args.busy.busy {
        let topo = Topology::new("").unwrap();
        busy::run(&topo, sites, args.duration, &args.busy);
        return;
    }
    let boringtun = args
        .boringtun
        .clone()
        .or_else(|| which("boringtun-cli"))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/boringtun-cli"))
        })
        .filter(|p| p.exists());
    if boringtun.is_none() {
        eprintln!(
            "boringtun-cli not found (--boringtun, PATH or ~/.cargo/bin; `cargo install --locked boringtun-cli`): its rows are skipped"
        );
    }
    let boringtun = boringtun.map(|p| p.display().to_string());
    if let Some(sites) = args.storm {
        let mut topo = Topology::new("").unwrap();
        storm::run(&mut topo, sites, args.rounds, args.keepalive);
        return;
    }
    if args.lossy {
        let cells = lossy::Cells::new(&args.lossy_path, &args.inner).unwrap_or_else(|e| {
            eprintln!("tether-bench: {e}");
            std::process::exit(2)
        });
        let mut topo = Topology::new("").unwrap();
        lossy::run(
            &mut topo,
            boringtun.as_deref(),
            args.quincy_dir.as_deref(),
            args.duration,
            &args.only,
            cells,
            args.wg_mtu,
        );
        return;
    }
    // A cloud gateway's key, registered in the broker's configuration.
    let work = std::env::temp_dir().join(format!("tether-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let gw_config = work.join("gateway.toml");
    std::fs::write(
        &gw_config,
        format!("state_dir = \"{}\"\n", work.join("gw").display()),
    )
    .unwrap();
    let gw_key = Command::new(binary("tether-gateway"))
        .args(["key", "-c", &gw_config.display().to_string()])
        .output()
        .unwrap();
    let gw_key = String::from_utf8_lossy(&gw_key.stdout).trim().to_string();
    let mut topo = Topology::new(&format!(
        "\n[[gateway]]\nid = \"gw-bench\"\nregion = \"eu\"\npublic_key = \"{gw_key}\"\nprefixes = [\"10.31.0.0/24\"]\n"
    ))
    .unwrap();
    let mut rows = Vec::new();

    // tether.
    let state = topo.path("site-state");
    topo.enroll("bench-site", &state).unwrap();
    let ((agent, addr), setup) = first_reply(&topo, "first-probe.log", || {
        topo.up(&state, "site.log").unwrap()
    });
    if let Some(rounds) = args.drops
        && !args.drops_via_gateway
    {
        drops::run(
            &topo,
            &drops::Path::direct(&topo),
            &addr,
            args.duration,
            rounds,
        );
        let _ = std::fs::remove_dir_all(&work);
        return;
    }
    let broker_pid = topo.broker.as_ref().unwrap().id();
    rows.push(measure_procs(
        &topo,
        &topo.backend,
        "tether (HTTP/3)",
        &addr,
        args.duration,
        setup,
        &[("broker", broker_pid), ("agent", agent.id())],
    ));

    // Through a cloud gateway: backend -> tether-gateway == WireGuard ==
    // broker == HTTP/3 == site.
    let cloud = Cloud::new(&topo, 1).unwrap();
    let broker_key = topo.broker_cli(&["gateway", "key"]).unwrap();
    std::fs::write(
        &gw_config,
        format!(
            "id = \"gw-bench\"\nregion = \"eu\"\npublished_cidr = \"203.0.113.0/24\"\nbrokers = [\"203.0.113.10:51820\"]\nbroker_public_key = \"{}\"\nstate_dir = \"{}\"\n",
            broker_key.trim(),
            work.join("gw").display()
        ),
    )
    .unwrap();
    let started = Instant::now();
    let gateway = cloud
        .node
        .spawn(
            &binary("tether-gateway").display().to_string(),
            &["run", "-c", &gw_config.display().to_string()],
            Some(work.join("gateway.log")),
        )
        .unwrap();
    let reached = wait_for(Duration::from_secs(30), || cloud.backend_pings(&addr));
    assert!(
        reached,
        "gateway path down:\n{}",
        read(&work.join("gateway.log"))
    );
    rows.push(measure_procs(
        &topo,
        &cloud.backend,
        "tether via gateway (WG+H3)",
        &addr,
        args.duration,
        Some(started.elapsed()),
        &[
            ("gateway", gateway.id()),
            ("broker", broker_pid),
            ("agent", agent.id()),
        ],
    ));
    if let Some(rounds) = args.drops {
        let path = drops::Path {
            backend: &cloud.backend,
            devices: vec![
                ("site", &topo.site, "tether0"),
                ("gateway node", &cloud.node, "tether-gw0"),
            ],
        };
        drops::run(&topo, &path, &addr, args.duration, rounds);
        drop(gateway);
        let _ = std::fs::remove_dir_all(&work);
        return;
    }
    drop(gateway);
    if args.gateway_only {
        let _ = std::fs::remove_dir_all(&work);
        return;
    }

    // Broker memory: idle with one site, then with N more idle sites.
    let rss_one = rss_kib(broker_pid);
    let mut rss_many = None;
    let mut _loadgen: Option<Proc> = None;
    if args.sites > 0 {
        let dir = enroll_load_sites(&topo, args.sites);
        let log = topo.path("loadgen.log");
        _loadgen = Some(start_loadgen(
            &topo,
            "connect",
            &dir,
            args.sites,
            &["--hold", "600"],
            &log,
        ));
        std::thread::sleep(Duration::from_secs(3));
        rss_many = Some(rss_kib(broker_pid));
        eprintln!("{}", read(&log).trim());
    }
    drop(_loadgen);
    drop(agent);

    // tether when the hospital blocks UDP: HTTP/2 over TCP 443, packets in
    // DATAGRAM capsules on the stream.
    topo.set_egress(Egress::TcpOnly).unwrap();
    let ((agent_h2, addr_h2), setup) = first_reply(&topo, "first-probe-h2.log", || {
        topo.up(&state, "site-h2.log").unwrap()
    });
    rows.push(measure_procs(
        &topo,
        &topo.backend,
        "tether (HTTP/2, UDP blocked)",
        &addr_h2,
        args.duration,
        setup,
        &[("broker", broker_pid), ("agent", agent_h2.id())],
    ));
    // The agent routes the backend network into the tunnel; stop it so the
    // raw path is really raw.
    drop(agent_h2);
    topo.set_egress(Egress::Open).unwrap();

    // The same path without a tunnel.
    open_raw_path(&topo);
    rows.push(measure(
        &topo,
        "raw routed path",
        SITE_LAN,
        args.duration,
        None,
    ));
    // And from the gateway's backend, routed through its node.
    topo.wan
        .run("ip", &["route", "add", "10.31.0.0/24", "via", "198.18.1.2"])
        .unwrap();
    rows.push(measure_from(
        &topo,
        &cloud.backend,
        "raw path (gateway cloud)",
        SITE_LAN,
        args.duration,
        None,
    ));

    // The WireGuard baselines, on the broker's UDP 443 (broker stopped).
    topo.broker.as_mut().unwrap().kill();
    if let Some(boringtun) = &boringtun {
        rows.push(wireguard(
            &topo,
            "boringtun",
            boringtun,
            &["--foreground", "--disable-drop-privileges"],
            args.duration,
        ));
        std::thread::sleep(Duration::from_secs(1));
    }
    rows.push(wireguard(
        &topo,
        "wggo",
        "wireguard-go",
        &["-f"],
        args.duration,
    ));
    rows.extend(quincy::rows(
        &topo,
        args.quincy_dir.as_deref(),
        args.duration,
    ));

    let raw_of = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .map(|r| r.down1)
            .unwrap_or(f64::NAN)
    };
    let (raw, raw_gw) = (
        raw_of("raw routed path"),
        raw_of("raw path (gateway cloud)"),
    );
    println!();
    println!(
        "backend <-> site on the hospital topology, iperf3 TCP {} s per run, Gbit/s",
        args.duration
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>9} {:>10} {:>10} {:>12} {:>9}",
        "path",
        "1 str ->",
        "1 str <-",
        "4 str ->",
        "vs raw",
        "ping p50",
        "ping p99",
        "first pkt",
        "CPU s/GB"
    );
    for r in &rows {
        println!(
            "{:<28} {:>10.2} {:>10.2} {:>10.2} {:>8.0}% {:>8.3}ms {:>8.3}ms {:>12} {:>9.2}",
            r.name,
            r.down1,
            r.up1,
            r.down4,
            100.0 * r.down1
                / if r.name.contains("gateway") {
                    raw_gw
                } else {
                    raw
                },
            r.p50,
            r.p99,
            r.setup
                .map(|d| format!("{:.0} ms", d.as_secs_f64() * 1000.0))
                .unwrap_or_else(|| "-".into()),
            r.cpu.machine
        );
    }
    println!(
        "CPU s/GB: whole-machine CPU seconds (/proc/stat) per GB moved in the 1-stream -> run; per process:"
    );
    for r in rows.iter().filter(|r| !r.procs.is_empty()) {
        let procs: Vec<String> = r
            .procs
            .iter()
            .zip(&r.cpu.procs)
            .map(|(n, c)| format!("{n} {c:.2}"))
            .collect();
        println!("  {:<28} {}", r.name, procs.join(", "));
    }
    let tether = rows[0].down1;
    if let Some(bt) = rows.iter().find(|r| r.name == "boringtun") {
        println!(
            "tether / boringtun-cli, 1 stream: {:.2}x",
            tether / bt.down1
        );
    }
    for q in rows.iter().filter(|r| r.name.starts_with("quincy")) {
        println!(
            "tether / {}, 1 stream: {:.2}x ->, {:.2}x <-",
            q.name,
            tether / q.down1,
            rows[0].up1 / q.up1
        );
    }
    println!();
    println!("broker memory (VmRSS): {} KiB with 1 site", rss_one);
    if let Some(m) = rss_many {
        println!(
            "broker memory (VmRSS): {} KiB with {} more idle sites ({:.1} KiB per site)",
            m,
            args.sites,
            (m.saturating_sub(rss_one)) as f64 / args.sites as f64
        );
    }
    let _ = std::fs::remove_dir_all(&work);
}

fn which(name: &str) -> Option<PathBuf> {
    let out = Command::new("which").arg(name).output().ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}
