//! Lossy and long paths: the hospital topology with loss and delay on the
//! WAN link (between the hospital firewall and the internet), built with
//! `tether-wan` in a namespace of its own since the kernel has no `netem`.
//!
//! ```text
//! fw ─ wan(veth) ═ lossy-a [lossy: tether-wan] lossy-b ═ (veth)hospital ─ wan
//! ```
//!
//! For every path (raw, tether over HTTP/3, over HTTP/2 with UDP blocked,
//! boringtun-cli, wireguard-go, quincy in its `tls` and `noise` modes) and
//! every impairment it runs one iperf3
//! stream backend -> site with BBR and one with Cubic as the inner
//! congestion control, and reports goodput, the inner TCP's mean RTT (as
//! the sender sees it) and retransmits; for tether also reconnects of the
//! agent during the runs; for every impairment the loss the link really
//! applied (its own counters). With `TETHER_BENCH_DEBUG` set, each run
//! also prints iperf3's per-second goodput and congestion window, which is
//! how a stalled tunnel (window stuck at one segment) shows itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tether_netns_tests::NetNs;
use tether_netns_tests::topology::{Egress, SITE_LAN, Topology, read};
use tether_netns_tests::wan::{Faults, ImpairedWan};
use tether_proto::api::{FleetSession, PathInfo, SessionDetail};

use crate::quincy::{Mode, Quincy, QuincyTunnel};
use crate::{WG_SITE, WgTunnel, first_packet, open_raw_path};

/// One impairment of the WAN link, per direction.
#[derive(Clone, Copy)]
pub(crate) struct Impairment {
    /// What `--lossy-path` calls it.
    pub(crate) name: &'static str,
    pub(crate) label: &'static str,
    pub(crate) loss_percent: f64,
    pub(crate) one_way: Duration,
}

impl Impairment {
    fn faults(&self) -> Faults {
        Faults {
            loss_percent: self.loss_percent,
            one_way: self.one_way,
            ..Faults::default()
        }
    }
}

/// The paths of the issue: 1 % loss at 50 ms RTT, 5 % at 200 ms.
pub(crate) const IMPAIRMENTS: [Impairment; 2] = [
    Impairment {
        name: "B",
        label: "1% / 50 ms",
        loss_percent: 1.0,
        one_way: Duration::from_millis(25),
    },
    Impairment {
        name: "C",
        label: "5% / 200 ms",
        loss_percent: 5.0,
        one_way: Duration::from_millis(100),
    },
];

/// Inner congestion controls measured.
const INNER: [&str; 2] = ["bbr", "cubic"];

/// Which cells of the table a run measures (`--lossy-path`, `--inner`);
/// the others print as not measured.
#[derive(Clone, Copy)]
pub(crate) struct Cells {
    impairments: [bool; IMPAIRMENTS.len()],
    inner: [bool; INNER.len()],
}

impl Cells {
    /// From the names given (an impairment's [`Impairment::name`],
    /// `bbr`/`cubic`); empty means all.
    pub(crate) fn new(paths: &[String], inner: &[String]) -> Result<Cells, String> {
        fn pick<const N: usize>(given: &[String], names: [&str; N]) -> Result<[bool; N], String> {
            for g in given {
                if !names.iter().any(|n| n.eq_ignore_ascii_case(g)) {
                    return Err(format!("unknown {g:?}: one of {}", names.join(", ")));
                }
            }
            Ok(names.map(|n| given.is_empty() || given.iter().any(|g| n.eq_ignore_ascii_case(g))))
        }
        Ok(Cells {
            impairments: pick(paths, IMPAIRMENTS.map(|i| i.name))?,
            inner: pick(inner, INNER)?,
        })
    }
}

/// One iperf3 run's result (goodput NaN: not measured).
#[derive(Clone, Copy)]
pub(crate) struct Flow {
    mbps: f64,
    rtt_ms: f64,
    retransmits: u64,
}

impl Flow {
    /// Goodput (inner TCP mean RTT, retransmits), or "not measured".
    fn cell(&self) -> String {
        if self.mbps.is_nan() {
            "not measured".to_string()
        } else {
            format!(
                "{:.1} ({:.0} ms, {} rtx)",
                self.mbps, self.rtt_ms, self.retransmits
            )
        }
    }
}

impl Default for Flow {
    fn default() -> Flow {
        Flow {
            mbps: f64::NAN,
            rtt_ms: f64::NAN,
            retransmits: 0,
        }
    }
}

/// One stream backend -> `server` with the inner congestion control `cc`.
/// iperf3's control connection can fail at the start of a run on a lossy
/// path (the server still closing the previous test): such a run moved no
/// data, so it is tried again, up to three times, and the retry is printed.
fn flow(client: &NetNs, server: &str, cc: &str, secs: u32) -> Flow {
    for attempt in 1..=3 {
        match flow_once(client, server, cc, secs) {
            Ok(f) => return f,
            Err(e) => {
                eprintln!("  iperf3 -C {cc} to {server}, attempt {attempt} of 3: {e}");
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    }
    Flow {
        mbps: 0.0,
        ..Flow::default()
    }
}

/// One iperf3 run; an error iperf3 reports (no data moved) is returned.
fn flow_once(client: &NetNs, server: &str, cc: &str, secs: u32) -> Result<Flow, String> {
    let secs_s = secs.to_string();
    let limit = (secs + 30).to_string();
    let out = client
        .command("timeout")
        .args([
            &limit,
            "iperf3",
            "-c",
            server,
            "-J",
            "-t",
            &secs_s,
            "-C",
            cc,
            "--connect-timeout",
            "10000",
        ])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    if let Some(e) = json["error"].as_str() {
        return Err(e.to_string());
    }
    if json.is_null() {
        return Err(format!(
            "no result ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    if std::env::var_os("TETHER_BENCH_DEBUG").is_some() {
        let iv: Vec<String> = json["intervals"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|i| {
                        format!(
                            "{:.1}/{}",
                            i["sum"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e6,
                            i["streams"][0]["snd_cwnd"].as_u64().unwrap_or(0)
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        eprintln!("  intervals {cc}: {}", iv.join(" "));
    }
    let end = &json["end"];
    Ok(Flow {
        mbps: end["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e6,
        rtt_ms: end["streams"][0]["sender"]["mean_rtt"]
            .as_f64()
            .unwrap_or(f64::NAN)
            / 1000.0,
        retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
    })
}

/// One path's results: per impairment, per inner congestion control.
struct LossyRow {
    name: &'static str,
    flows: Vec<[Flow; 2]>,
    reconnects: Option<u64>,
}

/// The broker's view of the tunnel's QUIC path during one flow, sampled
/// from its admin API (`path` of the session) twice a second: the outer
/// congestion window and the datagrams queued in front of it, which show
/// whether the tunnel held the inner TCP's packets back.
#[derive(Default)]
struct OuterPath {
    samples: Vec<PathInfo>,
}

impl OuterPath {
    /// Samples until `stop` is set.
    fn sample(topo: &Topology, stop: &AtomicBool) -> OuterPath {
        let mut out = OuterPath::default();
        while !stop.load(Ordering::Relaxed) {
            let sessions: Vec<FleetSession> =
                serde_json::from_value(topo.admin_get("/v1/sessions")).unwrap_or_default();
            out.samples
                .extend(sessions.iter().find_map(|s| match &s.session {
                    SessionDetail::Here(info) if s.local => info.path,
                    _ => None,
                }));
            std::thread::sleep(Duration::from_millis(500));
        }
        out
    }

    fn summary(&self) -> String {
        let q = |f: fn(&PathInfo) -> u64| {
            let mut v: Vec<u64> = self.samples.iter().map(|p| f(p) / 1024).collect();
            v.sort_unstable();
            match v.len() {
                0 => "-".to_string(),
                n => format!("{}/{}/{}", v[0], v[n / 2], v[n - 1]),
            }
        };
        // Sent and lost during the flow: the last sample less the first.
        let during = match (self.samples.first(), self.samples.last()) {
            (Some(a), Some(b)) => PathInfo {
                sent_packets: b.sent_packets - a.sent_packets,
                lost_packets: b.lost_packets - a.lost_packets,
                ..*b
            },
            _ => return "no sample".to_string(),
        };
        format!(
            "outer window KiB min/median/max {}, queued KiB {}, {} of {} packets lost ({:.2} %)",
            q(|p| p.cwnd_bytes),
            q(|p| p.queued_bytes),
            during.lost_packets,
            during.sent_packets,
            during.loss_percent()
        )
    }
}

/// Both inner congestion controls to `addr` over impairment `i` (already
/// set on the link). The broker's QUIC path is sampled during each flow and
/// printed where there is one (tether over HTTP/3; every path polls the
/// admin API alike).
fn measure_one(
    topo: &Topology,
    wan: &ImpairedWan,
    i: usize,
    addr: &str,
    secs: u32,
    applied: &mut Applied,
    cells: Cells,
) -> [Flow; 2] {
    let _server = topo.site.spawn("iperf3", &["-s"], None).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut flows = [Flow::default(); 2];
    for ((f, cc), _) in flows
        .iter_mut()
        .zip(INNER)
        .zip(cells.inner)
        .filter(|(_, on)| *on)
    {
        let stop = AtomicBool::new(false);
        let path = std::thread::scope(|s| {
            let sampler = s.spawn(|| OuterPath::sample(topo, &stop));
            *f = flow(&topo.backend, addr, cc, secs);
            stop.store(true, Ordering::Relaxed);
            sampler.join().unwrap_or_default()
        });
        if !path.samples.is_empty() {
            eprintln!("  {cc}: {}", path.summary());
        }
    }
    let c = wan.counters();
    let c = [c.received, c.dropped, c.overflow, c.oversize];
    applied.add(i, c);
    let shown: Vec<String> = INNER
        .iter()
        .zip(&flows)
        .map(|(cc, f)| format!("{cc} {}", f.cell()))
        .collect();
    eprintln!(
        "  {}: {}; link dropped {} of {} frames, {} overflow, {} oversize",
        IMPAIRMENTS[i].label,
        shown.join(", "),
        c[1],
        c[0],
        c[2],
        c[3]
    );
    flows
}

/// A path that stays up across impairments (the raw path, a WireGuard
/// baseline).
fn measure(
    topo: &Topology,
    wan: &mut ImpairedWan,
    addr: &str,
    secs: u32,
    applied: &mut Applied,
    cells: Cells,
) -> Vec<[Flow; 2]> {
    let mut out = Vec::new();
    for (i, imp) in IMPAIRMENTS.iter().enumerate() {
        if !cells.impairments[i] {
            out.push([Flow::default(); 2]);
            continue;
        }
        wan.set(imp.faults(), 7 + i as u64).unwrap();
        out.push(measure_one(topo, wan, i, addr, secs, applied, cells));
    }
    out
}

/// What the link applied over the whole run, per impairment.
#[derive(Default)]
struct Applied([[u64; 4]; IMPAIRMENTS.len()]);

impl Applied {
    fn add(&mut self, i: usize, c: [u64; 4]) {
        for (a, b) in self.0[i].iter_mut().zip(c) {
            *a += b;
        }
    }
}

/// Connections the agent made beyond its first (from its log).
fn reconnects(log: &std::path::Path) -> u64 {
    (read(log).matches("connected to the broker over").count() as u64).saturating_sub(1)
}

/// tether over the current egress: one agent per impairment.
fn tether(
    topo: &Topology,
    wan: &mut ImpairedWan,
    state: &std::path::Path,
    tag: &str,
    secs: u32,
    applied: &mut Applied,
    cells: Cells,
) -> (Vec<[Flow; 2]>, u64) {
    let mut flows = Vec::new();
    let mut again = 0;
    for (i, imp) in IMPAIRMENTS.iter().enumerate() {
        if !cells.impairments[i] {
            flows.push([Flow::default(); 2]);
            continue;
        }
        wan.set(imp.faults(), 7 + i as u64).unwrap();
        let log = format!("lossy-{tag}-{i}.log");
        let started = Instant::now();
        let (agent, addr) = topo.up(state, &log).unwrap();
        assert!(
            first_packet(topo, started).is_some(),
            "no packet through tether over {tag}:\n{}",
            read(&topo.path(&log))
        );
        // The packet size inside, to compare with the baselines' (--wg-mtu).
        let link = topo
            .site
            .transcript("ip", &["-o", "link", "show", "tether0"]);
        let mtu = link
            .split_whitespace()
            .skip_while(|w| *w != "mtu")
            .nth(1)
            .unwrap_or("unknown");
        eprintln!("  tether over {tag}: device MTU {mtu}");
        flows.push(measure_one(topo, wan, i, &addr, secs, applied, cells));
        again += reconnects(&topo.path(&log));
        drop(agent);
    }
    (flows, again)
}

/// The whole lossy run; prints its table.
pub(crate) fn run(
    topo: &mut Topology,
    boringtun: Option<&str>,
    quincy_dir: Option<&std::path::Path>,
    secs: u32,
    only: &[String],
    cells: Cells,
    wg_mtu: u16,
) {
    let want = |p: &str| only.is_empty() || only.iter().any(|o| o == p);
    let mut wan = ImpairedWan::insert(topo).unwrap();
    let mut applied = Applied::default();
    let mut rows = Vec::new();
    // Enrollment on a clean link.
    wan.set(Faults::default(), 1).unwrap();
    let state = topo.path("site-state");
    topo.enroll("bench-site", &state).unwrap();

    if want("h3") {
        eprintln!("tether (HTTP/3)");
        let (flows, again) = tether(topo, &mut wan, &state, "h3", secs, &mut applied, cells);
        rows.push(LossyRow {
            name: "tether (HTTP/3)",
            flows,
            reconnects: Some(again),
        });
    }
    if want("h2") {
        eprintln!("tether (HTTP/2, UDP blocked)");
        topo.set_egress(Egress::TcpOnly).unwrap();
        let (flows, again) = tether(topo, &mut wan, &state, "h2", secs, &mut applied, cells);
        rows.push(LossyRow {
            name: "tether (HTTP/2)",
            flows,
            reconnects: Some(again),
        });
        topo.set_egress(Egress::Open).unwrap();
    }
    if want("raw") {
        eprintln!("raw routed path");
        open_raw_path(topo);
        rows.push(LossyRow {
            name: "raw routed path",
            flows: measure(topo, &mut wan, SITE_LAN, secs, &mut applied, cells),
            reconnects: None,
        });
    }

    // The WireGuard baselines on UDP 443 (the broker stops first).
    if let Some(broker) = topo.broker.as_mut() {
        broker.kill();
    }
    let topo = &*topo;
    for (name, program, extra) in [
        (
            "boringtun",
            boringtun,
            &["--foreground", "--disable-drop-privileges"][..],
        ),
        ("wggo", Some("wireguard-go"), &["-f"][..]),
    ] {
        let Some(program) = program.filter(|_| want(name)) else {
            continue;
        };
        eprintln!("{name}");
        let tunnel = WgTunnel::up(topo, name, program, extra, wg_mtu);
        let flows = measure(topo, &mut wan, WG_SITE, secs, &mut applied, cells);
        drop(tunnel);
        rows.push(LossyRow {
            name: if name == "wggo" {
                "wireguard-go"
            } else {
                "boringtun-cli"
            },
            flows,
            reconnects: None,
        });
        std::thread::sleep(Duration::from_secs(1));
    }
    // quincy in both modes, also on UDP 443.
    let modes: Vec<Mode> = Mode::ALL
        .into_iter()
        .filter(|m| want(m.only_name()))
        .collect();
    if !modes.is_empty() {
        match Quincy::find(quincy_dir) {
            Err(why) => eprintln!("quincy skipped: {why}"),
            Ok(quincy) => {
                for mode in modes {
                    eprintln!("{}", mode.label());
                    // Set up over a clean link, as the site's enrollment.
                    wan.set(Faults::default(), 1).unwrap();
                    let mut tunnel = match QuincyTunnel::up(topo, &quincy, mode) {
                        Ok(t) => t,
                        Err(e) => {
                            eprintln!("{} skipped: {e:#}", mode.label());
                            continue;
                        }
                    };
                    let flows = measure(topo, &mut wan, &tunnel.addr, secs, &mut applied, cells);
                    // quincy does not reconnect: a lost connection ends the
                    // client.
                    if tunnel.client.exited() || tunnel.server.exited() {
                        eprintln!(
                            "  {} lost its connection during the runs:\n{}",
                            mode.label(),
                            tunnel.client.log()
                        );
                    }
                    drop(tunnel);
                    rows.push(LossyRow {
                        name: mode.label(),
                        flows,
                        reconnects: None,
                    });
                }
            }
        }
    }
    drop(wan);

    println!();
    println!(
        "lossy WAN link (loss and one-way delay in each direction), iperf3 1 stream backend -> site, {secs} s per run, Mbit/s (inner TCP mean RTT, retransmits)"
    );
    print!("{:<18}", "path");
    for imp in IMPAIRMENTS {
        for cc in INNER {
            print!(" {:>30}", format!("{} {cc}", imp.label));
        }
    }
    println!(" {:>10}", "reconnects");
    for r in &rows {
        print!("{:<18}", r.name);
        for fl in &r.flows {
            for f in fl {
                print!(" {:>30}", f.cell());
            }
        }
        println!(
            " {:>10}",
            r.reconnects.map(|n| n.to_string()).unwrap_or("-".into())
        );
    }
    let best_wg = |i: usize, c: usize| {
        rows.iter()
            .filter(|r| r.name.contains("boringtun") || r.name.contains("wireguard"))
            .map(|r| r.flows[i][c].mbps)
            .fold(0.0, f64::max)
    };
    let of = |name: &str, i: usize, c: usize| {
        rows.iter()
            .find(|r| r.name == name)
            .map(|r| r.flows[i][c].mbps)
            .unwrap_or(f64::NAN)
    };
    // A ratio of a path left out (`--only`) is not printed.
    let ratio = |name: &str, i: usize, c: usize| {
        let r = of(name, i, c) / best_wg(i, c);
        if r.is_finite() {
            format!("{r:.2}x")
        } else {
            "not measured".to_string()
        }
    };
    for (i, imp) in IMPAIRMENTS.iter().enumerate() {
        for (c, cc) in INNER.iter().enumerate() {
            println!(
                "{} {cc}: tether HTTP/3 / best WireGuard {}, HTTP/2 / best WireGuard {}",
                imp.label,
                ratio("tether (HTTP/3)", i, c),
                ratio("tether (HTTP/2)", i, c)
            );
        }
    }
    if rows.iter().any(|r| r.name == Mode::Tls.label()) {
        for (i, imp) in IMPAIRMENTS.iter().enumerate() {
            for (c, cc) in INNER.iter().enumerate() {
                println!(
                    "{} {cc}: tether HTTP/3 / {} {:.2}x",
                    imp.label,
                    Mode::Tls.label(),
                    of("tether (HTTP/3)", i, c) / of(Mode::Tls.label(), i, c)
                );
            }
        }
    }
    for (i, imp) in IMPAIRMENTS.iter().enumerate() {
        if !cells.impairments[i] {
            continue;
        }
        let [rx, dropped, overflow, oversize] = applied.0[i];
        println!(
            "link at {}: {} of {} frames dropped at random ({:.2} %), {} overflow, {} oversize",
            imp.label,
            dropped,
            rx,
            100.0 * dropped as f64 / rx.max(1) as f64,
            overflow,
            oversize
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cells are picked by the impairments' and controls' own names, in
    /// either case; nothing given picks all; an unknown name is refused
    /// with the names there are.
    #[test]
    fn cells_are_picked_by_name() {
        let c = Cells::new(&["c".into()], &[]).unwrap();
        assert_eq!((c.impairments, c.inner), ([false, true], [true, true]));
        let c = Cells::new(&[], &["CUBIC".into()]).unwrap();
        assert_eq!((c.impairments, c.inner), ([true, true], [false, true]));
        let e = Cells::new(&["D".into()], &[]).err().unwrap();
        assert!(e.contains("one of B, C"), "{e}");
    }
}
