//! A broker cut off from etcd alone, on a real three-member cluster
//! (`tether_netns_tests::cluster`: every etcd member, broker and site in
//! its own namespace, real `tether` agents):
//!
//! - a site that moved off the cut-off broker (it was asked to when its
//!   lease ran out) and then connects again with that broker first in its
//!   dial order (its agent restarted, then its new broker killed) is not
//!   served from the cut-off broker's stale view: that broker refuses it
//!   (`result="left"`, the other brokers dropped it), the site goes to a
//!   broker that reaches etcd, keeps its address, and a site on another
//!   broker reaches it; after the heal every site has one owner;
//! - a gateway registered on two brokers, the one it uses cut off from
//!   etcd: the fenced broker tells it to leave, so the gateway's traffic
//!   follows the site to the other broker (a backend behind the gateway
//!   reaches the site while the partition lasts); after the heal the
//!   broker answers the gateway's pings again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tether_netns_tests::cluster::gateway::GatewayKeys;
use tether_netns_tests::cluster::{Cluster, broker_ip};
use tether_netns_tests::{require_root, wait_for};

/// The one broker holding `site`, once exactly one does.
fn holder(cluster: &Cluster, site: &str) -> Option<usize> {
    match cluster.holders(site)[..] {
        [b] => Some(b),
        _ => None,
    }
}

/// Stops site `k`'s agent (`kill -9`) and starts it again; its address.
fn restart_agent(cluster: &mut Cluster, k: usize) -> String {
    cluster.sites[k - 1].agent.as_mut().unwrap().kill();
    cluster.sites[k - 1].agent = None;
    assert!(
        wait_for(Duration::from_secs(10), || cluster.sites[k - 1]
            .address()
            .is_none()),
        "lab-{k}'s tunnel device went with its agent"
    );
    cluster.up(k).unwrap_or_else(|e| {
        panic!(
            "lab-{k} came back: {e}\nbroker 1:\n{}",
            cluster.broker_log(1)
        )
    })
}

/// Waits until lab-1 is held by one broker other than broker 1 (and not
/// `not`), and asserts that lab-2 reaches it at `addr`.
fn assert_lab1_off_the_cut_broker(cluster: &Cluster, not: Option<usize>, addr: &str) -> usize {
    let mut at = None;
    let settled = wait_for(Duration::from_secs(30), || {
        at = holder(cluster, "lab-1");
        at.is_some_and(|b| b != 1 && Some(b) != not)
    });
    assert!(
        settled,
        "lab-1 connected to a broker that reaches etcd (held by {:?}); broker 1:\n{}",
        cluster.holders("lab-1"),
        cluster.broker_log(1)
    );
    assert_eq!(
        cluster.brokers[0]
            .metric("tether_broker_connects_without_store_total{result=\"readmitted\"}"),
        0.0,
        "broker 1 served no site from its stale view:\n{}",
        cluster.broker_log(1)
    );
    assert!(
        wait_for(Duration::from_secs(15), || cluster.sites[1]
            .ns
            .succeeds("ping", &["-c", "1", "-W", "1", addr])),
        "lab-2 reaches lab-1 on broker {at:?} (lab-2 on {:?})",
        cluster.holders("lab-2")
    );
    at.unwrap()
}

#[test]
fn a_site_that_left_a_broker_cut_off_from_etcd_is_not_served_there_from_its_stale_view() {
    if !require_root() {
        return;
    }
    // lab-1 on broker 1 (first in its dial order: it enrolled there),
    // lab-2 on broker 3.
    let mut cluster = Cluster::new(3, 2).unwrap();
    let mut before = Vec::new();
    for (k, at) in [(1, 1), (2, 3)] {
        cluster.enroll(k, at).unwrap();
        before.push(cluster.up(k).unwrap());
    }
    assert!(
        wait_for(Duration::from_secs(15), || cluster.one_owner_each().is_ok()
            && holder(&cluster, "lab-1") == Some(1)
            && holder(&cluster, "lab-2") == Some(3)),
        "lab-1 on broker 1, lab-2 on broker 3: {:?}",
        cluster.one_owner_each()
    );

    // Broker 1 alone is cut off from etcd: fenced, it asks lab-1 to move,
    // and lab-1 moves to a broker that reaches etcd.
    cluster.partition(1).unwrap();
    let (moved, holders) = cluster.wait_sites_off(1, Duration::from_secs(30));
    assert!(
        moved,
        "lab-1 left broker 1 (holders {holders:?}):\n{}",
        cluster.broker_log(1)
    );
    assert_eq!(cluster.sites[0].address().as_ref(), Some(&before[0]));

    // lab-1's agent starts again and dials broker 1 first: broker 1 no
    // longer counts it as held (it left, and the other brokers dropped
    // broker 1), so lab-1 goes on to a broker that reaches etcd.
    let again = restart_agent(&mut cluster, 1);
    assert_eq!(again, before[0], "lab-1 kept its address");
    let at = assert_lab1_off_the_cut_broker(&cluster, None, &before[0]);
    assert!(
        cluster.brokers[0].metric("tether_broker_connects_without_store_total{result=\"left\"}")
            >= 1.0,
        "broker 1 counts the refusal:\n{}",
        cluster.brokers[0].metrics_text()
    );
    assert!(
        cluster
            .broker_log(1)
            .contains("the other brokers dropped it, and this site left it since"),
        "broker 1 says why:\n{}",
        cluster.broker_log(1)
    );
    println!("FENCE: restarted lab-1 refused by broker 1, served by broker {at}");

    // Its new broker dies: lab-1 dials broker 1 first again (the lost
    // broker last) and is again sent on, to the broker left.
    cluster.brokers[at - 1].proc.as_mut().unwrap().kill();
    cluster.brokers[at - 1].proc = None;
    let last = assert_lab1_off_the_cut_broker(&cluster, Some(at), &before[0]);
    assert_eq!(cluster.sites[0].address().as_ref(), Some(&before[0]));
    println!("FENCE: broker {at} killed; lab-1 on broker {last}");

    // After the heal broker 1 joins again and every site has one owner.
    cluster.heal(1).unwrap();
    cluster.rejoined(1).unwrap();
}

/// Lines of the gateway's log that say `what` of broker `n`.
fn said_of(log: &str, n: usize, what: &str) -> usize {
    let addr = format!("broker={}:", broker_ip(n));
    log.lines()
        .filter(|l| l.contains(what) && l.contains(&addr))
        .count()
}

#[test]
fn a_gateway_leaves_a_broker_cut_off_from_etcd_and_counts_it_again_after_the_heal() {
    if !require_root() {
        return;
    }
    let keys = GatewayKeys::new("gw-1").unwrap();
    let mut cluster = Cluster::with_brokers(2, 1, &keys.broker_setup()).unwrap();
    // The gateway node on the core router, its backend behind it, and its
    // configuration listing broker 1 only, so that its traffic starts
    // there (with both listed, it takes the first to answer); it learns
    // broker 2 from broker 1.
    let mut gw = keys.attach_listing(&cluster, &[1]).unwrap();

    // The site and the gateway's traffic both on broker 1.
    cluster.enroll(1, 1).unwrap();
    let addr = cluster.up(1).unwrap();
    gw.start().unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || gw
            .backend
            .succeeds("ping", &["-c", "1", "-W", "1", &addr])),
        "the backend reaches the site:\ngateway:\n{}",
        gw.log_text()
    );
    assert!(
        wait_for(Duration::from_secs(15), || holder(&cluster, "lab-1")
            == Some(1)),
        "lab-1 on broker 1: {:?}",
        cluster.holders("lab-1")
    );
    assert_eq!(
        said_of(&gw.log_text(), 1, "traffic goes through this broker"),
        1,
        "the gateway uses broker 1:\n{}",
        gw.log_text()
    );
    assert!(
        wait_for(Duration::from_secs(10), || gw
            .metric("tether_gateway_brokers_up")
            == 2.0),
        "the gateway learnt broker 2 and hears it:\n{}",
        gw.log_text()
    );

    // Broker 1 cut off from etcd: its site moves to broker 2, and the
    // gateway is told to leave broker 1, so its traffic follows.
    cluster.partition(1).unwrap();
    let (moved, holders) = cluster.wait_sites_off(1, Duration::from_secs(30));
    assert!(moved, "lab-1 left broker 1 (holders {holders:?})");
    assert!(
        wait_for(Duration::from_secs(10), || gw
            .backend
            .succeeds("ping", &["-c", "1", "-W", "1", &addr])),
        "the backend reaches the site on broker 2 while broker 1 is cut off:\ngateway:\n{}\nbroker 1:\n{}",
        gw.log_text(),
        cluster.broker_log(1)
    );
    let log = gw.log_text();
    assert!(
        said_of(&log, 1, "broker is stopping") >= 1
            && said_of(&log, 2, "traffic moved to this broker") >= 1,
        "the gateway left the fenced broker:\n{log}"
    );
    assert!(
        cluster
            .broker_log(1)
            .contains("telling the gateways to send their traffic to another broker"),
        "broker 1 says so:\n{}",
        cluster.broker_log(1)
    );

    // After the heal broker 1 holds a lease again and answers the
    // gateway's pings: the gateway counts it up again.
    let answered = said_of(&gw.log_text(), 1, "broker answers");
    cluster.heal(1).unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || said_of(
            &gw.log_text(),
            1,
            "broker answers"
        ) > answered),
        "the gateway counts broker 1 up again:\n{}",
        gw.log_text()
    );
    assert!(
        wait_for(Duration::from_secs(10), || gw
            .backend
            .succeeds("ping", &["-c", "1", "-W", "1", &addr])),
        "the backend still reaches the site"
    );
}
