//! A gateway learns the brokers of its region from the brokers: two
//! brokers on a three-member etcd cluster, one site, and a gateway whose
//! configuration names only broker 1 (broker 2 was "added" after it was
//! written), with a backend behind it.
//!
//! ```text
//!  backend 10.32.0.10 ── gwnode (tether-gateway) ── core ──┬─ broker1 203.0.113.6
//!                         198.18.2.2                        ├─ broker2 203.0.113.10
//!                                                           ├─ etcd1..3
//!                                                           └─ site1 (tether up)
//! ```
//!
//! Broker 1 tells the gateway about broker 2, which the gateway then
//! follows (log, metrics, the saved list in its state directory). Broker 1
//! is killed: the backend reaches the site through broker 2, which no
//! configuration names. The gateway is restarted with broker 1 still
//! dead: it reaches broker 2 from its saved list.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use tether_netns_tests::cluster::{BrokerSetup, Cluster, broker_ip};
use tether_netns_tests::topology::{gateway_entry, read};
use tether_netns_tests::{NetNs, Proc, binary, link, require_root, wait_for};

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

/// The gateway's metrics text (its `[metrics] listen` on the node's
/// loopback).
fn gateway_metrics(node: &NetNs) -> String {
    node.command("curl")
        .args(["-s", "-m", "2", "http://127.0.0.1:9469/metrics"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default()
}

/// The sum of a metric's samples whose line starts with `name`.
fn gateway_metric(node: &NetNs, name: &str) -> f64 {
    gateway_metrics(node)
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The broker (1-based) the gateway's log last named as carrying its
/// traffic, if it names one.
fn gateway_broker(log: &str) -> Option<usize> {
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
}

fn start_gateway(node: &NetNs, config: &Path, log: &Path) -> Proc {
    node.spawn(
        &binary("tether-gateway").display().to_string(),
        &["run", "-c", &config.display().to_string()],
        Some(log.to_path_buf()),
    )
    .unwrap()
}

#[test]
fn a_gateway_learns_a_broker_its_configuration_does_not_name() {
    if !require_root() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let gw_key = wg_key(work.path(), "gw-1");
    wg_key(work.path(), "brokers-wg");
    let broker_wg = std::fs::read(work.path().join("brokers-wg").join("wireguard.key")).unwrap();
    let setup = BrokerSetup {
        extra_config: format!(
            "{}\n[[policy.allow]]\nname = \"backends\"\nfrom = [\"gateway:gw-1\"]\nto = [\"sites\"]\n",
            gateway_entry("gw-1", "eu", &gw_key, "10.32.0.0/24"),
        ),
        files: vec![("wireguard.key".into(), broker_wg)],
    };
    let mut cluster = Cluster::with_brokers(2, 1, &setup).unwrap();
    let broker_key = cluster.brokers[0].cli(&["gateway", "key"]).unwrap();

    let node = NetNs::new("gblnode").unwrap();
    let backend = NetNs::new("gblback").unwrap();
    link(
        &cluster.core,
        "g2",
        "198.18.2.1/24",
        &node,
        "eth0",
        "198.18.2.2/24",
    )
    .unwrap();
    link(
        &node,
        "bk",
        "10.32.0.1/24",
        &backend,
        "eth0",
        "10.32.0.10/24",
    )
    .unwrap();
    node.run("ip", &["route", "add", "default", "via", "198.18.2.1"])
        .unwrap();
    backend
        .run("ip", &["route", "add", "default", "via", "10.32.0.1"])
        .unwrap();
    node.run("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"])
        .unwrap();

    cluster.enroll(1, 2).unwrap();
    let addr = cluster.up(1).unwrap();

    // Only broker 1 is configured.
    let state = work.path().join("gw-1");
    let gw_config = work.path().join("gw-1.toml");
    std::fs::write(
        &gw_config,
        format!(
            "id = \"gw-1\"\nregion = \"eu\"\npublished_cidr = \"203.0.113.0/24\"\n\
             brokers = [\"{}:51820\"]\nbroker_public_key = \"{}\"\n\
             state_dir = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:9469\"\n",
            broker_ip(1),
            broker_key.trim(),
            state.display()
        ),
    )
    .unwrap();
    let gw_log = work.path().join("gw-1.log");
    let mut gateway = start_gateway(&node, &gw_config, &gw_log);
    let broker2 = format!("{}:51820", broker_ip(2));

    // The gateway learns broker 2 from broker 1, and follows it.
    assert!(
        wait_for(Duration::from_secs(20), || {
            read(&gw_log)
                .lines()
                .any(|l| l.contains("broker learned") && l.contains(&broker2))
        }),
        "the gateway learns broker 2:\ngateway:\n{}\nbroker 1:\n{}",
        read(&gw_log),
        cluster.broker_log(1)
    );
    assert!(
        wait_for(Duration::from_secs(10), || gateway_metric(
            &node,
            "tether_gateway_brokers_followed{origin=\"learned\"}"
        ) == 1.0
            && gateway_metric(&node, "tether_gateway_brokers_learned_total")
                >= 1.0
            && gateway_metric(&node, "tether_gateway_brokers_up") == 2.0),
        "the metrics count the learned broker, and it answers:\n{}",
        gateway_metrics(&node)
    );
    let saved = std::fs::read_to_string(state.join("brokers")).unwrap_or_default();
    assert!(
        saved.lines().any(|l| l == broker2),
        "the learned broker is saved: {saved:?}"
    );
    assert!(
        wait_for(Duration::from_secs(20), || backend
            .succeeds("ping", &["-c", "1", "-W", "1", &addr])),
        "the backend reaches the site {addr}:\ngateway:\n{}",
        read(&gw_log)
    );
    assert_eq!(gateway_broker(&read(&gw_log)), Some(1));

    // Broker 1, the only one configured, dies: the traffic goes through
    // broker 2, which now holds the site too.
    cluster.brokers[0].proc.as_mut().unwrap().kill();
    cluster.brokers[0].proc = None;
    assert!(
        wait_for(Duration::from_secs(30), || backend
            .succeeds("ping", &["-c", "1", "-W", "1", &addr])
            && cluster.holders("lab-1") == [2]),
        "the backend reaches the site through broker 2 after broker 1 is killed:\ngateway:\n{}\nbroker 2:\n{}",
        read(&gw_log),
        cluster.broker_log(2)
    );
    let log = read(&gw_log);
    assert!(
        log.contains("traffic moved to this broker"),
        "the gateway logs the switch:\n{log}"
    );
    assert_eq!(gateway_broker(&log), Some(2), "{log}");
    assert!(
        !log.contains("broker forgotten"),
        "the configured broker is never forgotten, and broker 2 is listed:\n{log}"
    );
    assert!(!gateway.exited(), "the gateway kept running");

    // A restart with broker 1 still dead: the saved list leads to broker
    // 2.
    gateway.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(gateway.wait_exit(Duration::from_secs(10)));
    let restarted_log = work.path().join("gw-1-restarted.log");
    let mut gateway = start_gateway(&node, &gw_config, &restarted_log);
    assert!(
        wait_for(Duration::from_secs(30), || backend
            .succeeds("ping", &["-c", "1", "-W", "1", &addr])),
        "the restarted gateway reaches the site through the saved broker 2:\ngateway:\n{}",
        read(&restarted_log)
    );
    let log = read(&restarted_log);
    assert!(
        log.lines()
            .any(|l| l.contains("broker learned in an earlier run") && l.contains(&broker2)),
        "{log}"
    );
    assert_eq!(gateway_broker(&log), Some(2), "{log}");
    gateway.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(gateway.wait_exit(Duration::from_secs(10)));
}
