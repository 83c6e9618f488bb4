//! `--lan`: a host on the hospital LAN through the site's LAN mapping,
//! next to the site's own overlay address, in the same run.
//!
//! The site exposes `192.168.1.0/24`; a LAN host namespace
//! (`192.168.1.20`, on a bridge with the site's LAN interface) runs an
//! iperf3 server, as does the site itself. From the backend the run
//! measures the site's own address (the tunnel ends in the agent) and
//! the LAN host's mapped address (the agent translates 1:1 and the kernel
//! forwards onto the LAN, with the source rewritten to the edge host's LAN
//! address), alternating the two `rounds` times, and prints them side by
//! side with the LAN path as a share of the own-address path.

use std::time::Duration;

use tether_netns_tests::lan::add_lan_host;
use tether_netns_tests::topology::{Topology, read};
use tether_netns_tests::wait_for;

use crate::{iperf, ping_stats};

/// One path's figures: Gbit/s one stream each way, four streams down, and
/// ping p50 / p99 in ms.
#[derive(Default, Clone, Copy)]
struct Figures {
    down1: f64,
    up1: f64,
    down4: f64,
    p50: f64,
    p99: f64,
}

/// The mapped prefix the broker routes to `site` for its /24 LAN.
fn mapped_lan(topo: &Topology, site: &str) -> String {
    let mut found = None;
    let routed = wait_for(Duration::from_secs(30), || {
        let table = topo.broker_cli(&["routes"]).unwrap_or_default();
        found = table
            .lines()
            .filter(|l| l.contains("site-lan") && l.contains(site))
            .filter_map(|l| l.split_whitespace().next())
            .find(|p| p.ends_with("/24"))
            .map(str::to_string);
        found.is_some()
    });
    assert!(
        routed,
        "no LAN route for {site}:\n{}",
        read(&topo.path("site.log"))
    );
    found.unwrap()
}

fn measure(topo: &Topology, addr: &str, secs: u32) -> Figures {
    let (p50, p99) = ping_stats(&topo.backend, addr);
    Figures {
        down1: iperf(&topo.backend, addr, 1, false, secs).0,
        up1: iperf(&topo.backend, addr, 1, true, secs).0,
        down4: iperf(&topo.backend, addr, 4, false, secs).0,
        p50,
        p99,
    }
}

fn mean(runs: &[Figures]) -> Figures {
    let n = runs.len() as f64;
    let avg = |f: fn(&Figures) -> f64| runs.iter().map(f).sum::<f64>() / n;
    Figures {
        down1: avg(|r| r.down1),
        up1: avg(|r| r.up1),
        down4: avg(|r| r.down4),
        p50: avg(|r| r.p50),
        p99: avg(|r| r.p99),
    }
}

/// Runs the comparison on a fresh topology.
pub fn run_lan(topo: &mut Topology, secs: u32, rounds: usize) {
    let host = add_lan_host(&topo.site, &["192.168.1.20/24"]).unwrap();
    let state = topo.path("site-state");
    topo.enroll("bench-lan", &state).unwrap();
    let config = state.join("tether.toml");
    // Enrolment wrote `lans = []`: replace it.
    let text: Vec<String> = read(&config)
        .lines()
        .filter(|l| !l.starts_with("lans"))
        .map(str::to_string)
        .collect();
    std::fs::write(
        &config,
        format!("lans = [\"192.168.1.0/24\"]\n{}\n", text.join("\n")),
    )
    .unwrap();
    let (_agent, own) = topo.up(&state, "site.log").unwrap();
    let mapped = mapped_lan(topo, "bench-lan");
    let net = mapped.trim_end_matches("/24");
    let lan = format!("{}.20", net.rsplit_once('.').unwrap().0);
    let _site_server = topo.site.spawn("iperf3", &["-s"], None).unwrap();
    let _lan_server = host.spawn("iperf3", &["-s"], None).unwrap();
    for (ns, addr) in [(&topo.site, own.as_str()), (&host, lan.as_str())] {
        assert!(
            wait_for(Duration::from_secs(10), || ns
                .succeeds("sh", &["-c", "ss -ltn | grep -q ':5201'"])),
            "iperf3 server for {addr} did not start"
        );
    }
    assert!(
        wait_for(Duration::from_secs(30), || topo.backend_pings(&lan)),
        "the LAN host {lan} is not reachable through {mapped}:\n{}",
        read(&topo.path("site.log"))
    );
    let (mut own_runs, mut lan_runs) = (Vec::new(), Vec::new());
    for round in 0..rounds.max(1) {
        // Alternate which path goes first, so drift in the machine's load
        // does not favour one.
        let order: [(&str, bool); 2] = if round % 2 == 0 {
            [(own.as_str(), false), (lan.as_str(), true)]
        } else {
            [(lan.as_str(), true), (own.as_str(), false)]
        };
        for (addr, is_lan) in order {
            let f = measure(topo, addr, secs);
            eprintln!(
                "round {round} {}: {:.2} / {:.2} / {:.2} Gbit/s, ping {:.3} / {:.3} ms",
                if is_lan { "LAN host" } else { "own address" },
                f.down1,
                f.up1,
                f.down4,
                f.p50,
                f.p99
            );
            if is_lan {
                lan_runs.push(f);
            } else {
                own_runs.push(f);
            }
        }
    }
    let (o, l) = (mean(&own_runs), mean(&lan_runs));
    println!();
    println!(
        "backend -> site over HTTP/3: the site's own address and a LAN host through the mapping,"
    );
    println!(
        "iperf3 TCP {secs} s per run, mean of {} rounds, Gbit/s",
        own_runs.len()
    );
    println!(
        "{:<36} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "path", "1 str ->", "1 str <-", "4 str ->", "ping p50", "ping p99"
    );
    for (name, f) in [
        (format!("site's own address {own}"), o),
        (format!("LAN host {lan} (192.168.1.20)"), l),
    ] {
        println!(
            "{:<36} {:>10.2} {:>10.2} {:>10.2} {:>8.3}ms {:>8.3}ms",
            name, f.down1, f.up1, f.down4, f.p50, f.p99
        );
    }
    let share = |a: f64, b: f64| 100.0 * a / b;
    println!(
        "{:<36} {:>9.0}% {:>9.0}% {:>9.0}% {:>9.0}% {:>9.0}%",
        "LAN / own address",
        share(l.down1, o.down1),
        share(l.up1, o.up1),
        share(l.down4, o.down4),
        share(l.p50, o.p50),
        share(l.p99, o.p99)
    );
}
