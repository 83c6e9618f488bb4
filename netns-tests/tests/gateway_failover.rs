//! A gateway follows its sites across brokers: two brokers on a
//! three-member etcd cluster, one site, one gateway registered on both
//! brokers, and a backend behind the gateway pinging the site every 10 ms.
//!
//! ```text
//!  backend 10.31.0.10 ── gwnode (tether-gateway) ── core ──┬─ broker1 203.0.113.6
//!                         198.18.1.2                        ├─ broker2 203.0.113.10
//!                                                           ├─ etcd1..3
//!                                                           └─ site1 (tether up)
//! ```
//!
//! The broker the gateway sends its traffic to is killed (`kill -9`), then
//! restarted, then the one it moved to is killed: each time the pings
//! resume without a restart of the gateway, and the site keeps its
//! address. The gap the backend sees is printed (`GATEWAY FAILOVER: ...`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, SystemTime};

use tether_netns_tests::cluster::{BrokerSetup, Cluster, broker_ip};
use tether_netns_tests::topology::{gateway_entry, read};
use tether_netns_tests::{NetNs, Proc, binary, link, require_root, wait_for};

const TABLE: u32 = 7300;

/// Prints the public key of the WireGuard key in `state` (created on
/// first use), with `tether-gateway key`.
fn wg_key(work: &Path, name: &str) -> String {
    let config = work.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!("state_dir = \"{}\"\n", work.join(name).display()),
    )
    .unwrap();
    let out = tether_netns_tests::run(
        &binary("tether-gateway").display().to_string(),
        &["key", "-c", &config.display().to_string()],
    )
    .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The replies in a `ping -D` log: (receive time, icmp_seq).
fn replies(log: &str) -> Vec<(f64, u64)> {
    log.lines()
        .filter(|l| l.contains(" bytes from "))
        .filter_map(|l| {
            let ts = l.strip_prefix('[')?.split(']').next()?.parse().ok()?;
            let seq = l.split("icmp_seq=").nth(1)?.split_whitespace().next()?;
            Some((ts, seq.parse().ok()?))
        })
        .collect()
}

/// The backend's outage around `at`: the longest wait between two replies
/// in `log`, from the last one before `at` on, in seconds.
fn longest_gap(log: &str, at: f64) -> f64 {
    let seen = replies(log);
    let last_before = seen
        .iter()
        .map(|(t, _)| *t)
        .filter(|t| *t <= at)
        .fold(at, f64::max);
    let after = seen.iter().map(|(t, _)| *t).filter(|t| *t > at);
    std::iter::once(last_before)
        .chain(after)
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(0.0, f64::max)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The broker (1-based) the gateway's log last named as carrying its
/// traffic; the first configured one if it names none.
fn gateway_broker(log: &str) -> usize {
    log.lines()
        .rev()
        .filter(|l| {
            l.contains("traffic goes through this broker")
                || l.contains("traffic moved to this broker")
        })
        .find_map(|l| {
            let addr = l.split("broker=").nth(1)?.split(':').next()?;
            (1..=2).find(|n| broker_ip(*n) == addr)
        })
        .unwrap_or(1)
}

/// A metric of the gateway (its `[metrics] listen` on the node's
/// loopback).
fn gateway_metric(node: &NetNs, name: &str) -> f64 {
    node.command("curl")
        .args(["-s", "-m", "2", "http://127.0.0.1:9469/metrics"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_gateway_follows_its_site_when_the_broker_it_uses_is_killed() {
    if !require_root() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    // The gateway's key, and the brokers' gateway key: every broker of the
    // deployment holds the same one.
    let gw_key = wg_key(work.path(), "gw-1");
    wg_key(work.path(), "brokers-wg");
    let broker_wg = std::fs::read(work.path().join("brokers-wg").join("wireguard.key")).unwrap();
    let setup = BrokerSetup {
        extra_config: format!(
            "{}\n[[policy.allow]]\nname = \"backends\"\nfrom = [\"gateway:gw-1\"]\nto = [\"sites\"]\n",
            gateway_entry("gw-1", "eu", &gw_key, "10.31.0.0/24"),
        ),
        files: vec![("wireguard.key".into(), broker_wg)],
    };
    let mut cluster = Cluster::with_brokers(2, 1, &setup).unwrap();
    let broker_key = cluster.brokers[0].cli(&["gateway", "key"]).unwrap();
    assert_eq!(
        broker_key.trim(),
        cluster.brokers[1].cli(&["gateway", "key"]).unwrap().trim(),
        "both brokers have the same gateway key"
    );

    // The gateway node on the core router, its backend behind it.
    let node = NetNs::new("gwnode").unwrap();
    let backend = NetNs::new("gwback").unwrap();
    link(
        &cluster.core,
        "g1",
        "198.18.1.1/24",
        &node,
        "eth0",
        "198.18.1.2/24",
    )
    .unwrap();
    link(
        &node,
        "bk",
        "10.31.0.1/24",
        &backend,
        "eth0",
        "10.31.0.10/24",
    )
    .unwrap();
    node.run("ip", &["route", "add", "default", "via", "198.18.1.1"])
        .unwrap();
    backend
        .run("ip", &["route", "add", "default", "via", "10.31.0.1"])
        .unwrap();
    node.run("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"])
        .unwrap();

    // The site enrolls at broker 2, so that it may well be held by another
    // broker than the one the gateway uses.
    cluster.enroll(1, 2).unwrap();
    let addr = cluster.up(1).unwrap();
    let site_log = cluster.path("site1.log");

    let gw_config = work.path().join("gw-1.toml");
    std::fs::write(
        &gw_config,
        format!(
            "id = \"gw-1\"\nregion = \"eu\"\npublished_cidr = \"203.0.113.0/24\"\n\
             brokers = [\"{}:51820\", \"{}:51820\"]\nbroker_public_key = \"{}\"\n\
             state_dir = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:9469\"\n",
            broker_ip(1),
            broker_ip(2),
            broker_key.trim(),
            work.path().join("gw-1").display()
        ),
    )
    .unwrap();
    // Preflight looks at the way to every configured broker, not only the
    // first one's.
    let pre = node
        .command(&binary("tether-gateway").display().to_string())
        .args(["preflight", "-c", &gw_config.display().to_string()])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&pre.stdout).to_string();
    let brokers_line = report
        .lines()
        .find(|l| l.contains("brokers"))
        .unwrap_or_else(|| panic!("no brokers line:\n{report}"));
    assert!(brokers_line.starts_with("ok"), "{report}");
    for b in [broker_ip(1), broker_ip(2)] {
        assert!(brokers_line.contains(&format!("{b}:51820")), "{report}");
        assert!(
            report
                .lines()
                .any(|l| l.contains(" mtu ") && l.contains(&b.to_string())),
            "no MTU check towards {b}:\n{report}"
        );
    }
    let gw_log = work.path().join("gw-1.log");
    let mut gateway: Proc = node
        .spawn(
            &binary("tether-gateway").display().to_string(),
            &["run", "-c", &gw_config.display().to_string()],
            Some(gw_log.clone()),
        )
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || {
            node.run("ip", &["route", "show", "table", &TABLE.to_string()])
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&addr))
        }),
        "the gateway routes the site {addr}:\n{}",
        read(&gw_log)
    );
    assert!(
        wait_for(Duration::from_secs(20), || backend
            .succeeds("ping", &["-c", "1", "-W", "1", &addr])),
        "the backend reaches the site before any kill:\ngateway:\n{}\nbroker 1:\n{}\nbroker 2:\n{}",
        read(&gw_log),
        cluster.broker_log(1),
        cluster.broker_log(2)
    );

    let ping_log = work.path().join("ping.log");
    let mut ping = backend
        .spawn(
            "ping",
            // A count, not a deadline: with a deadline ping stops at the
            // first ICMP error.
            &["-D", "-O", "-i", "0.01", "-W", "1", "-c", "100000", &addr],
            Some(ping_log.clone()),
        )
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || replies(&read(&ping_log)).len()
            > 20),
        "the ping runs"
    );

    let mut gaps = Vec::new();
    for round in 1..=2 {
        let victim = gateway_broker(&read(&gw_log));
        let holders = cluster.holders("lab-1");
        let case = if holders == [victim] {
            "the broker holding the site"
        } else {
            "the other broker (not holding the site)"
        };
        let failovers_before = gateway_metric(&node, "tether_gateway_failovers_total");
        let standbys = read(&site_log).matches("standby connection ready").count();
        let killed_at = unix_now();
        cluster.brokers[victim - 1].proc.as_mut().unwrap().kill();
        cluster.brokers[victim - 1].proc = None;
        // Pings flow again: replies received a second after the kill and
        // later, ten of them in a row.
        let resumed = wait_for(Duration::from_secs(30), || {
            replies(&read(&ping_log))
                .iter()
                .filter(|(t, _)| *t > killed_at + 1.0)
                .count()
                > 10
        });
        let gap = longest_gap(&read(&ping_log), killed_at);
        println!(
            "GATEWAY FAILOVER: round {round}, killed broker {victim} ({case}; site held by {holders:?}): {}, longest gap {:.0} ms",
            if resumed {
                "pings resumed"
            } else {
                "pings did NOT resume"
            },
            gap * 1000.0
        );
        assert!(
            resumed,
            "round {round}: pings did not resume after broker {victim} was killed\ngateway:\n{}\nother broker:\n{}\nits counters:\n{}\ngateway counters:\n{}\nping:\n{}",
            read(&gw_log),
            cluster.broker_log(3 - victim),
            cluster.brokers[2 - victim]
                .metrics_text()
                .lines()
                .filter(|l| l.contains("dropped") || l.contains("relayed") || l.contains("gateway"))
                .collect::<Vec<_>>()
                .join("\n"),
            node.command("curl")
                .args(["-s", "-m", "2", "http://127.0.0.1:9469/metrics"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                .unwrap_or_default(),
            read(&ping_log)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join("\n"),
        );
        assert!(!gateway.exited(), "the gateway kept running");
        assert_eq!(
            cluster.sites[0].address().as_deref(),
            Some(addr.as_str()),
            "the site kept its address"
        );
        gaps.push(gap);
        let log = read(&gw_log);
        assert!(
            log.contains("traffic moved to this broker"),
            "the gateway logs the switch:\n{log}"
        );
        assert_eq!(gateway_broker(&log), 3 - victim, "{log}");
        assert!(
            wait_for(Duration::from_secs(5), || gateway_metric(
                &node,
                "tether_gateway_failovers_total"
            ) > failovers_before),
            "the failover is counted"
        );
        // The killed broker comes back before the next round, so that
        // there is a broker to fail over to, and the site holds a standby
        // connection to it again (else the site, not the gateway, would
        // set the gap).
        cluster.start_broker(victim).unwrap();
        assert!(
            wait_for(Duration::from_secs(30), || read(&site_log)
                .matches("standby connection ready")
                .count()
                > standbys),
            "the site has a standby connection again:\n{}",
            read(&site_log)
        );
        assert!(
            wait_for(Duration::from_secs(20), || read(&gw_log)
                .matches("broker answers")
                .count()
                >= 2 + round),
            "the gateway hears the restarted broker {victim}:\n{}",
            read(&gw_log)
        );
    }
    // A broker stopped as in a rolling upgrade (SIGTERM: it drains) tells
    // the gateway, which moves its traffic at once instead of after a
    // second of silence.
    let victim = gateway_broker(&read(&gw_log));
    let stopped_at = unix_now();
    let mut stopping = cluster.brokers[victim - 1].proc.take().unwrap();
    stopping.signal(nix::sys::signal::Signal::SIGTERM);
    let resumed = wait_for(Duration::from_secs(30), || {
        replies(&read(&ping_log))
            .iter()
            .filter(|(t, _)| *t > stopped_at + 1.0)
            .count()
            > 10
    });
    assert!(
        stopping.wait_exit(Duration::from_secs(30)),
        "broker {victim} stopped"
    );
    let gap = longest_gap(&read(&ping_log), stopped_at);
    println!(
        "GATEWAY FAILOVER: SIGTERM of broker {victim}, the gateway's: longest gap {:.0} ms",
        gap * 1000.0
    );
    let log = read(&gw_log);
    assert!(
        resumed,
        "pings resumed after broker {victim} stopped:\n{log}"
    );
    assert!(
        log.contains("broker is stopping"),
        "the gateway heard that broker {victim} is stopping:\n{log}"
    );
    assert_eq!(gateway_broker(&log), 3 - victim, "{log}");
    assert!(
        gap < 0.6,
        "the backend waited {:.0} ms for a reply while broker {victim} drained (the gateway should move at once):\n{log}",
        gap * 1000.0
    );
    ping.signal(nix::sys::signal::Signal::SIGINT);
    assert!(ping.wait_exit(Duration::from_secs(5)));
    // Both gaps stay well under the etcd lease (5 s) the brokers would
    // otherwise wait for.
    for gap in &gaps {
        assert!(
            *gap < 4.0,
            "pings resumed {gaps:?} s after the kills:\n{}",
            read(&gw_log)
        );
    }
    gateway.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(gateway.wait_exit(Duration::from_secs(10)));
}
