//! Revocation across brokers on a real three-member etcd cluster
//! (`tether_netns_tests::cluster`), with real `tether` agents: a site
//! revoked at one broker loses its session at the broker that holds it,
//! within the two seconds the design promises, and no broker of the fleet
//! takes it back afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tether_netns_tests::cluster::Cluster;
use tether_netns_tests::topology::read;
use tether_netns_tests::{require_root, wait_for};

/// The bound the design gives for a revocation to reach every broker.
const REVOCATION_BOUND: Duration = Duration::from_secs(2);

/// The time (Unix seconds) of each echo reply in a `ping -D` log.
fn replies(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains(" bytes from "))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect()
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn a_revocation_at_one_broker_ends_the_session_at_the_broker_holding_the_site() {
    if !require_root() {
        return;
    }
    let mut cluster = Cluster::new(3, 2).unwrap();
    // Both sites enroll at broker 2; lab-2 stays up throughout, to show
    // that only the revoked site is cut.
    let mut addresses = Vec::new();
    for k in 1..=2 {
        cluster.enroll(k, 2).unwrap();
        addresses.push(cluster.up(k).unwrap());
    }
    let mut holder = Vec::new();
    assert!(
        wait_for(Duration::from_secs(20), || {
            holder = cluster.holders("lab-1");
            holder.len() == 1
        }),
        "lab-1 is held by one broker: {holder:?}"
    );
    let holder = holder[0];
    // lab-1 pings lab-2 every 10 ms: the last reply tells when lab-1's
    // session ended, to within 10 ms, with no polling in the way.
    let ping_log = cluster.path("revoke-ping.log");
    let mut ping = cluster.sites[0]
        .ns
        .spawn(
            "ping",
            &["-D", "-i", "0.01", "-W", "1", "-c", "100000", &addresses[1]],
            Some(ping_log.clone()),
        )
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || replies(&read(&ping_log)).len()
            > 20),
        "lab-1 reaches lab-2 before the revocation:\n{}",
        read(&ping_log)
    );
    // Revoked at a broker that does not hold the site.
    let at = if holder == 1 { 2 } else { 1 };
    let revoked_at = unix_now();
    cluster.brokers[at - 1]
        .cli(&["site", "revoke", "--site", "lab-1", "--region", "eu"])
        .unwrap();
    let asked = unix_now() - revoked_at;
    // No reply for a whole second: the session is gone.
    assert!(
        wait_for(Duration::from_secs(15), || {
            replies(&read(&ping_log))
                .last()
                .is_some_and(|t| unix_now() - t > 1.0)
        }),
        "lab-1 still reaches lab-2 after its revocation at broker {at}:\nbroker {holder}:\n{}",
        cluster.broker_log(holder)
    );
    let last = replies(&read(&ping_log)).last().copied().unwrap();
    let took = (last - revoked_at).max(0.0);
    println!(
        "REVOCATION: lab-1 revoked at broker {at} (the command took {:.0} ms); the last reply through broker {holder} came {:.0} ms after the command started",
        asked * 1000.0,
        took * 1000.0
    );
    assert!(
        took <= REVOCATION_BOUND.as_secs_f64(),
        "lab-1 still reached lab-2 {:.0} ms after its revocation at broker {at} (bound {} ms):\n{}",
        took * 1000.0,
        REVOCATION_BOUND.as_millis(),
        cluster.broker_log(holder)
    );
    ping.signal(nix::sys::signal::Signal::SIGINT);
    assert!(ping.wait_exit(Duration::from_secs(5)));
    // The agent keeps dialing; no broker admits it again, and lab-2 is
    // still connected.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        cluster.holders("lab-1"),
        Vec::<usize>::new(),
        "a broker took the revoked site back"
    );
    assert_eq!(
        cluster.holders("lab-2").len(),
        1,
        "lab-2, not revoked, is still connected"
    );
}
