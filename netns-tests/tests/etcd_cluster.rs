//! No single point of failure: brokers on a real three-member etcd
//! cluster, each etcd member, broker and site in its own namespace
//! (`tether_netns_tests::cluster`), with real `tether` agents.
//!
//! - the etcd leader killed (`kill -9`) while 200 sites enroll across the
//!   brokers, all 200 in flight at once: every enrollment succeeds, at once or on a retry with the
//!   same token; every site is recorded, none holds two IPv4 addresses
//!   and no address is held twice;
//! - a broker cut off from etcd (nftables on the router): its fleet lease
//!   runs out, it asks its sites to move (GOAWAY over HTTP/3 and over
//!   HTTP/2), they come back on another broker
//!   with the same addresses; after the heal it writes no stale ownership
//!   and no site is held by two brokers. Every broker's own sessions and
//!   etcd's owner records are read over and over (every 50 ms at most, a
//!   thread each) from the cut to after the heal: a site's owner record
//!   never names the cut-off broker again once it named another (no stale
//!   re-claim), no site has sessions at two brokers for longer than a
//!   handover takes, and the cut-off broker keeps no session of a site
//!   etcd gave another broker (so it forwards nothing for it);
//! - an etcd member cut off from the other two, with a broker that reaches
//!   only that member: the broker's lease runs out and its sites move to
//!   the brokers on the majority side, which are not fenced although the
//!   minority member still answers them; one owner per site throughout
//!   and after the heal;
//! - a rolling restart of every broker (SIGTERM, wait, start again, next)
//!   while one site pings another every 10 ms: no ping is lost, every
//!   site keeps its address, and each broker has left the fleet (its
//!   etcd lease revoked) by the time it exits;
//! - the same rolling restart with a cloud gateway registered on every
//!   broker (`tether_netns_tests::cluster::gateway`) while its backend
//!   pings a site every 10 ms and the site pings the backend: the pings
//!   resume after each step, the site keeps its address; the pings lost
//!   and the longest gap of each step are printed (`ROLLING VIA GATEWAY`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tether_netns_tests::cluster::Cluster;
use tether_netns_tests::cluster::gateway::{
    BACKEND_ADDR, ClusterGateway, GatewayKeys, longest_gap_between, lost_between, replies, unix_now,
};
use tether_netns_tests::topology::read;
use tether_netns_tests::{lost_pings, ping_summary, require_root, wait_for};

/// Three brokers and two sites up, site `k` enrolled at broker `at(k)`;
/// with the sites' IPv4 overlay addresses.
fn two_sites(at: impl Fn(usize) -> usize) -> (Cluster, Vec<String>) {
    let mut cluster = Cluster::new(3, 2).unwrap();
    let mut addresses = Vec::new();
    for k in 1..=2 {
        cluster.enroll(k, at(k)).unwrap();
        addresses.push(cluster.up(k).unwrap());
    }
    (cluster, addresses)
}

/// How often the samplers read each broker's sessions and etcd's owners
/// at most (each reading is a `curl` in a namespace: on a loaded machine
/// they come less often).
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// How long a site may have sessions at two brokers, or a session at a
/// broker etcd does not name, while it moves: the agent keeps the old
/// connection for packets the old broker still sends until that broker
/// closes it or 3 s pass (`tether_proto::agent::liveness::RETIRE_AFTER`);
/// a broker cut off from etcd never learns of the move, so it is the
/// 3 s, and 2 s more for the readings of a loaded machine.
const HANDOVER: Duration = Duration::from_secs(5);

/// Packets from and to a site over one session.
type Packets = (u64, u64);

/// What the samplers saw, each reading with when it was taken.
#[derive(Default)]
struct Seen {
    /// Broker `n`'s own sessions: site -> packets.
    sessions: Vec<(Instant, usize, BTreeMap<String, Packets>)>,
    /// etcd's owner records: site -> broker number (0: no broker's id).
    owners: Vec<(Instant, BTreeMap<String, usize>)>,
}

/// Sets the flag when dropped (also on a panic), so that the samplers end.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Runs `body` while every broker's own sessions and etcd's owner records
/// are read every [`SAMPLE_EVERY`] (a thread each); `ids` names the
/// brokers by their fleet ids. Returns what `body` returned and what was
/// read.
fn sampled<R>(
    cluster: &Cluster,
    ids: &BTreeMap<String, usize>,
    body: impl FnOnce() -> R,
) -> (R, Seen) {
    let stop = AtomicBool::new(false);
    let seen = Mutex::new(Seen::default());
    let out = std::thread::scope(|scope| {
        let _stop = StopOnDrop(&stop);
        for n in 1..=cluster.brokers.len() {
            let (stop, seen) = (&stop, &seen);
            scope.spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let at = Instant::now();
                    if let Some(own) = cluster.own_sessions(n) {
                        seen.lock().unwrap().sessions.push((at, n, own));
                    }
                    std::thread::sleep(SAMPLE_EVERY.saturating_sub(at.elapsed()));
                }
            });
        }
        let (stop, seen) = (&stop, &seen);
        scope.spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let at = Instant::now();
                if let Ok(keys) = cluster.keys("fleet/owners/") {
                    let owners = keys
                        .into_iter()
                        .filter_map(|(key, id)| {
                            let site = key.rsplit('/').next()?.to_string();
                            Some((site, ids.get(&id).copied().unwrap_or(0)))
                        })
                        .collect();
                    seen.lock().unwrap().owners.push((at, owners));
                }
                std::thread::sleep(SAMPLE_EVERY.saturating_sub(at.elapsed()));
            }
        });
        body()
    });
    (out, seen.into_inner().unwrap())
}

/// The stretches of time over which broker `n`'s readings list a session
/// of `site` in a row (from the first such reading to the last).
fn runs(seen: &Seen, n: usize, site: &str) -> Vec<(Instant, Instant)> {
    let mut out = Vec::new();
    let mut current: Option<(Instant, Instant)> = None;
    let mut readings: Vec<_> = seen.sessions.iter().filter(|(_, b, _)| *b == n).collect();
    readings.sort_by_key(|(at, _, _)| *at);
    for (at, _, own) in readings {
        match (own.contains_key(site), current.as_mut()) {
            (true, Some(run)) => run.1 = *at,
            (true, None) => current = Some((*at, *at)),
            (false, _) => out.extend(current.take()),
        }
    }
    out.extend(current);
    out
}

/// Checks what the samplers saw while broker `cut` was cut off from etcd
/// and after the heal: no site's owner record names `cut` again once it
/// named another broker (no stale re-claim); no site has sessions at two
/// brokers for longer than [`HANDOVER`]; and `cut` has no session of a
/// site (so carries no packet of it) longer than [`HANDOVER`] after etcd
/// named another broker for it.
fn assert_one_owner_throughout(seen: &Seen, cut: usize, sites: &[String], brokers: usize) {
    assert!(
        seen.owners.len() > 20 && seen.sessions.len() > 20 * brokers,
        "the samplers read: {} owner readings, {} session readings",
        seen.owners.len(),
        seen.sessions.len()
    );
    let mut owners: Vec<_> = seen.owners.iter().collect();
    owners.sort_by_key(|(at, _)| *at);
    let start = owners[0].0;
    for site in sites {
        // The owner record never goes back to the cut-off broker.
        let mut moved: Option<(Instant, usize)> = None;
        for (at, record) in &owners {
            match (record.get(site).copied(), moved) {
                (Some(b), None) if b != cut && b != 0 => moved = Some((*at, b)),
                (Some(b), Some((since, other))) if b == cut => panic!(
                    "{site}: etcd named broker {other} {:?} into the sampling, then broker {cut} again {:?} into it (a stale re-claim)",
                    since - start,
                    *at - start
                ),
                _ => {}
            }
        }
        // Never at two brokers for longer than a handover.
        for a in 1..=brokers {
            for b in a + 1..=brokers {
                for (a0, a1) in runs(seen, a, site) {
                    for (b0, b1) in runs(seen, b, site) {
                        let (from, to) = (a0.max(b0), a1.min(b1));
                        assert!(
                            to.saturating_duration_since(from) <= HANDOVER,
                            "{site}: sessions at brokers {a} and {b} together for {:?}, from {:?} into the sampling",
                            to - from,
                            from.saturating_duration_since(start)
                        );
                    }
                }
            }
        }
        // The cut-off broker lets go of a site that etcd gave another
        // broker.
        if let Some((since, other)) = moved {
            let stale: Vec<_> = seen
                .sessions
                .iter()
                .filter(|(at, b, own)| {
                    *b == cut && *at > since + HANDOVER && own.contains_key(site)
                })
                .map(|(at, _, own)| (at.duration_since(since), own[site]))
                .collect();
            assert!(
                stale.is_empty(),
                "{site}: broker {cut} still had a session after etcd named broker {other} (time since, packets from/to the site): {stale:?}"
            );
        }
    }
}

/// Every site still has the address it had in `before`.
fn assert_addresses_kept(cluster: &Cluster, before: &[String]) {
    for (site, addr) in cluster.sites.iter().zip(before) {
        assert_eq!(
            site.address().as_ref(),
            Some(addr),
            "{} kept its address",
            site.name
        );
    }
}

#[test]
fn a_broker_cut_off_from_etcd_hands_its_sites_over_and_writes_no_stale_owner() {
    if !require_root() {
        return;
    }
    // Site 1 speaks HTTP/3; UDP is blocked for site 2, so it speaks HTTP/2.
    let mut cluster = Cluster::new(3, 2).unwrap();
    cluster.block_udp(2).unwrap();
    let mut before = Vec::new();
    for k in 1..=2 {
        cluster.enroll(k, 1).unwrap();
        before.push(cluster.up(k).unwrap());
    }
    // Both sites dial the broker they enrolled at first.
    assert!(
        wait_for(Duration::from_secs(15), || cluster.one_owner_each().is_ok()
            && cluster.owners().unwrap().values().all(|b| *b == 1)),
        "both sites on broker 1: {:?}",
        cluster.one_owner_each()
    );
    assert_eq!(cluster.transports("lab-1"), [(1, "h3".to_string())]);
    assert_eq!(cluster.transports("lab-2"), [(1, "h2".to_string())]);

    let to = before[1].clone();
    assert!(
        wait_for(Duration::from_secs(10), || cluster.sites[0]
            .ns
            .succeeds("ping", &["-c", "1", "-W", "1", &to])),
        "site 1 reaches site 2 on broker 1"
    );

    // Every broker's sessions and etcd's owner records are read every
    // 50 ms from here until a while after the heal.
    let ids = cluster.broker_numbers().unwrap();
    assert_eq!(ids.len(), 3, "three brokers in the fleet: {ids:?}");
    let ((), seen) = sampled(&cluster, &ids, || {
        let cut = Instant::now();
        cluster.partition(1).unwrap();
        // Within the lease's 5 s and a handover, both sites are on another
        // broker, with their addresses.
        let (moved, holders) = cluster.wait_sites_off(1, Duration::from_secs(30));
        let took = cut.elapsed();
        assert!(
            moved,
            "the sites left the broker cut off from etcd (holders {holders:?}); broker 1:\n{}",
            cluster.broker_log(1)
        );
        println!("PARTITION: both sites on other brokers {took:.1?} after the cut");
        assert!(
            cluster
                .broker_log(1)
                .contains("lease ran out, so it can no longer prove it holds its sites"),
            "broker 1 says why:\n{}",
            cluster.broker_log(1)
        );
        assert_addresses_kept(&cluster, &before);
        assert!(
            matches!(&cluster.transports("lab-2")[..], [(_, t)] if t == "h2"),
            "site 2 moved over HTTP/2: {:?}",
            cluster.transports("lab-2")
        );
        let etcd_owners = cluster.owners().unwrap();
        for site in &cluster.sites {
            let owner = etcd_owners.get(&site.name).copied();
            assert!(
                matches!(owner, Some(b) if b == 2 || b == 3),
                "{}: etcd names broker {owner:?}",
                site.name
            );
        }
        // The sites reach each other through their new brokers.
        assert!(
            wait_for(Duration::from_secs(10), || cluster.sites[0]
                .ns
                .succeeds("ping", &["-c", "1", "-W", "1", &to])),
            "site 1 reaches site 2 after the move (holders {holders:?}); broker 2:\n{}\nbroker 3:\n{}",
            cluster.broker_log(2),
            cluster.broker_log(3)
        );

        cluster.heal(1).unwrap();
        // Broker 1 joins the fleet again under a new lease, and then every
        // site has one holder, the one etcd names.
        cluster.rejoined(1).unwrap();
        // A while longer: a stale re-claim would come right after the
        // rejoin.
        std::thread::sleep(Duration::from_secs(3));
    });
    let names: Vec<String> = cluster.sites.iter().map(|s| s.name.clone()).collect();
    assert_one_owner_throughout(&seen, 1, &names, 3);
    println!(
        "PARTITION: {} readings of etcd's owners and {} of the brokers' sessions, one owner per site throughout",
        seen.owners.len(),
        seen.sessions.len()
    );
    assert_addresses_kept(&cluster, &before);
    assert!(
        cluster.brokers[0].metric("tether_broker_fleet_fenced_total") >= 1.0,
        "the fence is counted"
    );
}

#[test]
fn a_broker_left_with_a_minority_etcd_member_hands_its_sites_to_the_majority_side() {
    if !require_root() {
        return;
    }
    let (cluster, before) = two_sites(|_| 3);
    assert!(
        wait_for(Duration::from_secs(15), || cluster.one_owner_each().is_ok()
            && cluster.owners().unwrap().values().all(|b| *b == 3)),
        "both sites on broker 3: {:?}",
        cluster.one_owner_each()
    );
    // The member cut off is the leader: it leads a minority of one until
    // it notices, and the other two elect a new leader.
    let m = cluster.leader().unwrap_or(3);
    let cut = Instant::now();
    cluster.partition_member(m, 3).unwrap();
    // Broker 3 reaches only member `m`, which can commit nothing: its
    // lease runs out and its sites move to brokers 1 and 2, which reach
    // the majority (and still the minority member too).
    let (moved, holders) = cluster.wait_sites_off(3, Duration::from_secs(30));
    let took = cut.elapsed();
    assert!(
        moved,
        "the sites left the broker on the minority side (holders {holders:?}); broker 3:\n{}\nbroker 1:\n{}\nbroker 2:\n{}\nsite 1:\n{}",
        cluster.broker_log(3),
        cluster.broker_log(1),
        cluster.broker_log(2),
        std::fs::read_to_string(cluster.path("site1.log")).unwrap_or_default()
    );
    println!("MINORITY: member {m} cut off; both sites on brokers 1/2 {took:.1?} after the cut");
    assert!(
        cluster
            .broker_log(3)
            .contains("lease ran out, so it can no longer prove it holds its sites"),
        "broker 3 says why:\n{}",
        cluster.broker_log(3)
    );
    assert_addresses_kept(&cluster, &before);
    // etcd (the majority) names the broker that holds each site.
    assert!(
        wait_for(Duration::from_secs(10), || cluster.one_owner_each().is_ok()),
        "one owner per site on the majority side: {:?}",
        cluster.one_owner_each()
    );
    let to = before[1].clone();
    assert!(
        wait_for(Duration::from_secs(10), || cluster.sites[0]
            .ns
            .succeeds("ping", &["-c", "1", "-W", "1", &to])),
        "site 1 reaches site 2 on the majority side (holders {holders:?})"
    );
    // The brokers that reach the majority kept their leases, although the
    // minority member still answers them.
    for n in [1, 2] {
        assert_eq!(
            cluster.brokers[n - 1].metric("tether_broker_fleet_fenced_total"),
            0.0,
            "broker {n} was never fenced:\n{}",
            cluster.broker_log(n)
        );
    }

    cluster.heal_member(m).unwrap();
    cluster.rejoined(3).unwrap();
    assert_addresses_kept(&cluster, &before);
}

#[test]
fn a_rolling_restart_of_every_broker_keeps_the_sites_and_their_addresses() {
    if !require_root() {
        return;
    }
    let (mut cluster, before) = two_sites(|k| k);
    assert!(
        wait_for(Duration::from_secs(15), || cluster.one_owner_each().is_ok()),
        "{:?}",
        cluster.one_owner_each()
    );
    // Site 1 pings site 2 every 10 ms for the whole restart (with
    // timestamps, and a line for each reply not there when the next ping
    // goes: the log says which ones were lost, and when).
    let log = cluster.path("ping.log");
    let mut ping = cluster.sites[0]
        .ns
        .spawn(
            "ping",
            &["-D", "-O", "-i", "0.01", "-W", "1", "-w", "170", &before[1]],
            Some(log.clone()),
        )
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || std::fs::read_to_string(&log)
            .is_ok_and(|t| t.contains("icmp_seq"))),
        "the ping runs"
    );
    for n in 1..=3 {
        let started = Instant::now();
        let proc = cluster.brokers[n - 1].proc.as_mut().unwrap();
        proc.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(
            proc.wait_exit(Duration::from_secs(20)),
            "broker {n} exits after SIGTERM"
        );
        cluster.brokers[n - 1].proc = None;
        // It revoked its lease on the way out: the other brokers dropped
        // it at once, and do not take its old announcement (same link key)
        // for its next run.
        assert!(
            !cluster.broker_numbers().unwrap().values().any(|b| *b == n),
            "broker {n} left the fleet before it exited:\n{}",
            cluster.broker_log(n)
        );
        cluster.start_broker(n).unwrap();
        // Back in the fleet before the next one goes.
        assert!(
            wait_for(Duration::from_secs(15), || cluster
                .broker_numbers()
                .unwrap()
                .values()
                .any(|b| *b == n)),
            "broker {n} rejoined"
        );
        // Every site settled (on one broker, the one etcd names) before
        // the next broker goes.
        assert!(
            wait_for(Duration::from_secs(15), || cluster.one_owner_each().is_ok()),
            "{:?}",
            cluster.one_owner_each()
        );
        println!("ROLLING: broker {n} restarted in {:.1?}", started.elapsed());
    }
    assert!(
        wait_for(Duration::from_secs(15), || cluster.one_owner_each().is_ok()),
        "{:?}",
        cluster.one_owner_each()
    );
    ping.signal(nix::sys::signal::Signal::SIGINT);
    assert!(ping.wait_exit(Duration::from_secs(5)));
    let text = ping.log();
    let (sent, _) = ping_summary(&text);
    let lost = lost_pings(&text);
    println!(
        "ROLLING: {} of {sent} pings lost over a restart of every broker: {lost:?}",
        lost.len()
    );
    assert_addresses_kept(&cluster, &before);
    assert!(sent > 100, "the ping ran: {sent} sent");
    // Each site moved make-before-break, and each stopping broker relayed
    // on what the others still sent it for its moved sites until they
    // learnt of the move.
    assert!(lost.is_empty(), "pings lost: {lost:?}\n{text}");
    let to = before[1].clone();
    assert!(
        cluster.sites[0]
            .ns
            .succeeds("ping", &["-c", "1", "-W", "2", &to]),
        "site 1 reaches site 2 after the restarts"
    );
}

#[test]
fn the_etcd_leader_killed_during_200_enrollments_loses_none() {
    if !require_root() {
        return;
    }
    const SITES: usize = 200;
    let mut cluster = Cluster::new(3, 0).unwrap();
    let mut load = cluster
        .enroll_load(SITES, 20, Duration::from_secs(150))
        .unwrap();
    // Kill the leader once the tokens exist and 10 sites are enrolled.
    load.wait_enrolled(10);
    let leader = cluster.leader().expect("a leader");
    cluster.members[leader - 1].proc.as_mut().unwrap().kill();
    println!(
        "LEADER: killed etcd member {leader} after {} enrollments",
        load.enrolled
    );
    let status = load.finish("LEADER");
    assert!(status, "every site enrolled:\n{}", load.out.join("\n"));

    // The store, read from the two members left: every site once, one
    // IPv4 address each at most (an address is allocated at enrollment
    // when the store answers, else at the site's first connection), no
    // address twice.
    let sites = cluster.recorded_sites().unwrap();
    assert_eq!(sites.len(), SITES, "every site is recorded");
    let leases = cluster.assert_no_address_twice().unwrap();
    println!(
        "LEADER: {} of {SITES} sites got their address at enrollment",
        leases.len()
    );
    // Every token was redeemed (a redemption deletes it).
    assert_eq!(
        cluster.keys("tokens/").unwrap().len(),
        0,
        "every token is spent"
    );
}

#[test]
fn a_rolling_restart_of_every_broker_keeps_a_backend_reaching_its_site_through_the_gateway() {
    if !require_root() {
        return;
    }
    let keys = GatewayKeys::new("gw-1").unwrap();
    let mut cluster = Cluster::with_brokers(3, 1, &keys.broker_setup_both_ways()).unwrap();
    let mut gw = keys.attach(&cluster).unwrap();
    cluster.enroll(1, 2).unwrap();
    let addr = cluster.up(1).unwrap();
    gw.start().unwrap();
    gw.wait_routes(&addr).unwrap();
    let settled = |cluster: &Cluster, gw: &ClusterGateway| {
        cluster.one_owner_each().is_ok()
            && gw.metric("tether_gateway_brokers_up") == 3.0
            && cluster
                .brokers
                .iter()
                .all(|b| b.metric("tether_broker_fleet_brokers_alive") == 3.0)
    };
    assert!(
        wait_for(Duration::from_secs(20), || settled(&cluster, &gw)),
        "settled before the restarts: {:?}, gateway:\n{}",
        cluster.one_owner_each(),
        gw.log_text()
    );
    // The backend pings the site, and the site the backend, every 10 ms
    // for the whole restart (`-D -O`: timestamps, and a line for each
    // reply not there when the next ping goes).
    let to_site = gw.path("to-site.log");
    let to_backend = gw.path("to-backend.log");
    let mut pings = [
        gw.ping(&addr, &to_site).unwrap(),
        cluster.sites[0]
            .ns
            .spawn(
                "ping",
                &[
                    "-D",
                    "-O",
                    "-i",
                    "0.01",
                    "-W",
                    "1",
                    "-c",
                    "1000000",
                    BACKEND_ADDR,
                ],
                Some(to_backend.clone()),
            )
            .unwrap(),
    ];
    for log in [&to_site, &to_backend] {
        assert!(
            wait_for(Duration::from_secs(10), || replies(&read(log)).len() > 20),
            "the ping runs: {}",
            read(log)
        );
    }
    for n in 1..=3 {
        let started = Instant::now();
        let from = unix_now();
        let (active, holders) = (gw.active_broker(), cluster.holders("lab-1"));
        let proc = cluster.brokers[n - 1].proc.as_mut().unwrap();
        proc.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(
            proc.wait_exit(Duration::from_secs(20)),
            "broker {n} exits after SIGTERM"
        );
        cluster.brokers[n - 1].proc = None;
        cluster.start_broker(n).unwrap();
        // Settled before the next one goes: one holder for the site, the
        // one etcd names; every broker counts three live brokers (links
        // up), and the gateway hears all three.
        assert!(
            wait_for(Duration::from_secs(30), || settled(&cluster, &gw)),
            "step {n} settled: {:?}, gateway:\n{}",
            cluster.one_owner_each(),
            gw.log_text()
        );
        let until = unix_now();
        // Pings flow after the step: ten replies each way since it
        // settled.
        for log in [&to_site, &to_backend] {
            assert!(
                wait_for(Duration::from_secs(10), || replies(&read(log))
                    .iter()
                    .filter(|(t, _)| *t > until)
                    .count()
                    > 10),
                "pings resumed after broker {n} restarted ({}):\ngateway:\n{}\nping:\n{}",
                log.display(),
                gw.log_text(),
                read(log)
            );
        }
        assert_eq!(
            cluster.sites[0].address().as_deref(),
            Some(addr.as_str()),
            "the site kept its address"
        );
        let (site_log, backend_log) = (read(&to_site), read(&to_backend));
        println!(
            "ROLLING VIA GATEWAY: broker {n} restarted in {:.1?} (gateway on {active}, site on {holders:?}; now on {}, {:?}): backend -> site lost {:?}, longest gap {:.0} ms; site -> backend lost {:?}, longest gap {:.0} ms",
            started.elapsed(),
            gw.active_broker(),
            cluster.holders("lab-1"),
            lost_between(&site_log, from, until),
            longest_gap_between(&site_log, from, until) * 1000.0,
            lost_between(&backend_log, from, until),
            longest_gap_between(&backend_log, from, until) * 1000.0,
        );
    }
    let mut lost = Vec::new();
    for (ping, what) in pings.iter_mut().zip(["backend -> site", "site -> backend"]) {
        ping.signal(nix::sys::signal::Signal::SIGINT);
        assert!(ping.wait_exit(Duration::from_secs(5)));
        let text = ping.log();
        let (sent, _) = ping_summary(&text);
        assert!(sent > 100, "{what}: the ping ran: {sent} sent");
        let l = lost_pings(&text);
        println!(
            "ROLLING VIA GATEWAY: {what}: {} of {sent} pings lost over a restart of every broker: {l:?}",
            l.len()
        );
        lost.push((what, l, text));
    }
    assert_eq!(
        cluster.sites[0].address().as_deref(),
        Some(addr.as_str()),
        "the site kept its address"
    );
    assert!(
        gw.backend.succeeds("ping", &["-c", "1", "-W", "2", &addr]),
        "the backend reaches the site after the restarts"
    );
    for (what, l, text) in lost {
        assert!(l.is_empty(), "{what}: pings lost: {l:?}\n{text}");
    }
}
