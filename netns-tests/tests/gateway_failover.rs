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

use std::time::Duration;

use tether_netns_tests::cluster::gateway::{GatewayKeys, longest_gap, replies, unix_now};
use tether_netns_tests::cluster::{Cluster, broker_ip};
use tether_netns_tests::topology::read;
use tether_netns_tests::{require_root, wait_for};

#[test]
fn a_gateway_follows_its_site_when_the_broker_it_uses_is_killed() {
    if !require_root() {
        return;
    }
    // The gateway's key, and the brokers' gateway key: every broker of the
    // deployment holds the same one (checked when the gateway is attached).
    let keys = GatewayKeys::new("gw-1").unwrap();
    let mut cluster = Cluster::with_brokers(2, 1, &keys.broker_setup()).unwrap();
    // The gateway node on the core router, its backend behind it.
    let mut gw = keys.attach(&cluster).unwrap();

    // The site enrolls at broker 2, so that it may well be held by another
    // broker than the one the gateway uses.
    cluster.enroll(1, 2).unwrap();
    let addr = cluster.up(1).unwrap();
    let site_log = cluster.path("site1.log");

    // Preflight looks at the way to every configured broker, not only the
    // first one's.
    let report = gw.preflight().unwrap();
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
    let gw_log = gw.log.clone();
    gw.start().unwrap();
    gw.wait_routes(&addr).unwrap_or_else(|e| {
        panic!(
            "before any kill: {e}\nbroker 1:\n{}\nbroker 2:\n{}",
            cluster.broker_log(1),
            cluster.broker_log(2)
        )
    });

    let ping_log = gw.path("ping.log");
    let mut ping = gw.ping(&addr, &ping_log).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || replies(&read(&ping_log)).len()
            > 20),
        "the ping runs"
    );

    let mut gaps = Vec::new();
    for round in 1..=2 {
        let victim = gw.active_broker();
        let holders = cluster.holders("lab-1");
        let case = if holders == [victim] {
            "the broker holding the site"
        } else {
            "the other broker (not holding the site)"
        };
        let failovers_before = gw.metric("tether_gateway_failovers_total");
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
            gw.metrics_text(),
            read(&ping_log)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join("\n"),
        );
        assert!(
            !gw.proc.as_mut().unwrap().exited(),
            "the gateway kept running"
        );
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
        assert_eq!(gw.active_broker(), 3 - victim, "{log}");
        assert!(
            wait_for(Duration::from_secs(5), || gw
                .metric("tether_gateway_failovers_total")
                > failovers_before),
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
    let victim = gw.active_broker();
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
    assert_eq!(gw.active_broker(), 3 - victim, "{log}");
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
    let gateway = gw.proc.as_mut().unwrap();
    gateway.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(gateway.wait_exit(Duration::from_secs(10)));
}
