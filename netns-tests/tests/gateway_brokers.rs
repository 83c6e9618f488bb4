//! A gateway learns the brokers of its region from the brokers: two
//! brokers on a three-member etcd cluster, one site, and a gateway whose
//! configuration names only broker 1 (broker 2 was "added" after it was
//! written), with a backend behind it.
//!
//! ```text
//!  backend 10.31.0.10 ── gwnode (tether-gateway) ── core ──┬─ broker1 203.0.113.6
//!                         198.18.1.2                        ├─ broker2 203.0.113.10
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

use std::time::Duration;

use tether_netns_tests::cluster::gateway::GatewayKeys;
use tether_netns_tests::cluster::{Cluster, broker_ip};
use tether_netns_tests::{require_root, wait_for};

#[test]
fn a_gateway_learns_a_broker_its_configuration_does_not_name() {
    if !require_root() {
        return;
    }
    let keys = GatewayKeys::new("gw-1").unwrap();
    let mut cluster = Cluster::with_brokers(2, 1, &keys.broker_setup()).unwrap();
    // Only broker 1 is configured.
    let mut gw = keys.attach_listing(&cluster, &[1]).unwrap();

    cluster.enroll(1, 2).unwrap();
    let addr = cluster.up(1).unwrap();

    gw.start().unwrap();
    let broker2 = format!("{}:51820", broker_ip(2));

    // The gateway learns broker 2 from broker 1, and follows it.
    assert!(
        wait_for(Duration::from_secs(20), || {
            gw.log_text()
                .lines()
                .any(|l| l.contains("broker learned") && l.contains(&broker2))
        }),
        "the gateway learns broker 2:\ngateway:\n{}\nbroker 1:\n{}",
        gw.log_text(),
        cluster.broker_log(1)
    );
    assert!(
        wait_for(Duration::from_secs(10), || gw
            .metric("tether_gateway_brokers_followed{origin=\"learned\"}")
            == 1.0
            && gw.metric("tether_gateway_brokers_learned_total") >= 1.0
            && gw.metric("tether_gateway_brokers_up") == 2.0),
        "the metrics count the learned broker, and it answers:\n{}",
        gw.metrics_text()
    );
    let saved = std::fs::read_to_string(gw.path("gw-1").join("brokers")).unwrap_or_default();
    assert!(
        saved.lines().any(|l| l == broker2),
        "the learned broker is saved: {saved:?}"
    );
    assert!(
        wait_for(Duration::from_secs(20), || gw
            .backend
            .succeeds("ping", &["-c", "1", "-W", "1", &addr])),
        "the backend reaches the site {addr}:\ngateway:\n{}",
        gw.log_text()
    );
    assert_eq!(gw.named_broker(), Some(1));

    // Broker 1, the only one configured, dies: the traffic goes through
    // broker 2, which now holds the site too.
    cluster.brokers[0].proc.as_mut().unwrap().kill();
    cluster.brokers[0].proc = None;
    assert!(
        wait_for(Duration::from_secs(30), || gw
            .backend
            .succeeds("ping", &["-c", "1", "-W", "1", &addr])
            && cluster.holders("lab-1") == [2]),
        "the backend reaches the site through broker 2 after broker 1 is killed:\ngateway:\n{}\nbroker 2:\n{}",
        gw.log_text(),
        cluster.broker_log(2)
    );
    let log = gw.log_text();
    assert!(
        log.contains("traffic moved to this broker"),
        "the gateway logs the switch:\n{log}"
    );
    assert_eq!(gw.named_broker(), Some(2), "{log}");
    assert!(
        !log.contains("broker forgotten"),
        "the configured broker is never forgotten, and broker 2 is listed:\n{log}"
    );
    let gateway = gw.proc.as_mut().unwrap();
    assert!(!gateway.exited(), "the gateway kept running");

    // A restart with broker 1 still dead: the saved list leads to broker
    // 2.
    gateway.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(gateway.wait_exit(Duration::from_secs(10)));
    gw.log = gw.path("gw-1-restarted.log");
    gw.start().unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || gw
            .backend
            .succeeds("ping", &["-c", "1", "-W", "1", &addr])),
        "the restarted gateway reaches the site through the saved broker 2:\ngateway:\n{}",
        gw.log_text()
    );
    let log = gw.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("broker learned in an earlier run") && l.contains(&broker2)),
        "{log}"
    );
    assert_eq!(gw.named_broker(), Some(2), "{log}");
    let gateway = gw.proc.as_mut().unwrap();
    gateway.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(gateway.wait_exit(Duration::from_secs(10)));
}
