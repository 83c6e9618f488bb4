//! Several brokers on etcd: three etcd members and three brokers
//! (`tether_netns_tests::cluster`, the real binaries, each in its own
//! namespace), two real agents (`tether up`, which keep a standby
//! connection to a second broker) and idle sites of `tether-loadgen`.
//!
//! 1. Throughput of a path that crosses two brokers (site `lab-1` on one,
//!    `lab-2` on another, relayed over the broker-to-broker link) next to
//!    the same path on one broker: iperf3, one stream each way.
//! 2. The failover gap: `lab-2` sends a numbered UDP probe to an echo on
//!    `lab-1` every 10 ms, and a backend behind a cloud gateway
//!    (`tether-gateway`, registered on the three brokers:
//!    `tether_netns_tests::cluster::gateway`) pings `lab-1` every 10 ms;
//!    the broker holding `lab-1` is killed with SIGKILL. The probe's gap
//!    is from the kill to the first echo of a probe sent after it; the
//!    backend's is its longest wait between two replies from the last one
//!    before the kill on (its outage); with `--ha-kill site-only` the
//!    gateway's traffic goes through another broker, which stays up (see
//!    [`Kill::SiteOnly`]); with `--ha-kill both` it goes through the
//!    killed broker, so the gateway moves too ([`Kill::Both`]). `lab-1`
//!    must keep its address. The
//!    killed broker is started again before the next round, which begins
//!    when every broker counts three live brokers again, the gateway hears
//!    all three and both sites hold a standby.
//! 3. etcd writes in steady state: idle load-generator sites connected to
//!    broker 1; the store's revision and etcd's own write counters over a
//!    quiet interval, and every key written in it (a watch on the prefix).
//! 4. Those sites' broker killed (SIGKILL): when every site was back on
//!    the other two brokers, and with which addresses.
//!
//! Every namespace and process goes when the run ends, also on a panic and
//! on SIGINT/SIGTERM/SIGHUP.

use std::time::{Duration, Instant};

use tether_netns_tests::cluster::gateway::{ClusterGateway, GatewayKeys, replies};
use tether_netns_tests::cluster::{Cluster, broker_ip};
use tether_netns_tests::topology::read;
use tether_netns_tests::{Proc, binary, wait_for};

use crate::probe::{ECHO_PORT, unix_now};

/// Time allowed for `lab-1` to answer again after a kill.
const ROUND_LIMIT: Duration = Duration::from_secs(60);

/// Which brokers a failover round kills.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Kill {
    /// The broker holding `lab-1`, wherever the gateway's traffic goes
    /// (often that same broker: then the gateway's own failover is
    /// measured too).
    Holder,
    /// Only the broker holding `lab-1`: before each kill the gateway's
    /// traffic is moved to another broker if it went through that one
    /// (the node stops hearing it for a moment), so the gateway keeps its
    /// broker and only the site moves.
    SiteOnly,
    /// The broker holding `lab-1` and carrying the gateway's traffic: before
    /// each kill the gateway's traffic is moved onto the holder if it went
    /// through another broker (the node stops hearing the others for a
    /// moment), so the site and the gateway both have to move.
    Both,
}

/// What to measure.
pub(crate) struct Options {
    /// Kill rounds of the failover gap.
    pub rounds: usize,
    /// Which brokers each round kills.
    pub kill: Kill,
    /// Idle load-generator sites (0: skip 3 and 4).
    pub sites: usize,
    /// Seconds of the quiet interval.
    pub quiet: u64,
    /// Seconds per iperf3 run.
    pub duration: u32,
}

/// Runs the measurements and prints their tables.
pub(crate) fn run(opts: &Options) {
    let started = Instant::now();
    // Sites 1 and 2 run the agents; site 3's namespace the load generator;
    // a cloud gateway registered on every broker, its backend behind it.
    let keys = GatewayKeys::new("gw-1").expect("cannot make the gateway's keys");
    let mut cluster =
        Cluster::with_brokers(3, 3, &keys.broker_setup()).expect("cannot build the cluster");
    let mut gw = keys.attach(&cluster).expect("cannot build the gateway");
    {
        let mut all = vec![&cluster.core, &gw.node, &gw.backend];
        all.extend(cluster.members.iter().map(|m| &m.ns));
        all.extend(cluster.brokers.iter().map(|b| &b.ns));
        all.extend(cluster.sites.iter().map(|s| &s.ns));
        crate::agents::clean_up_on_signal_for(&all, cluster.dir.path());
    }
    cluster.enroll(1, 1).unwrap();
    cluster.enroll(2, 2).unwrap();
    let a1 = cluster.up(1).unwrap();
    let a2 = cluster.up(2).unwrap();
    eprintln!(
        "cluster up in {:.1} s: lab-1 {a1}, lab-2 {a2}",
        started.elapsed().as_secs_f64()
    );
    gw.start().unwrap();
    gw.wait_routes(&a1).unwrap();
    throughput(&mut cluster, &a1, opts.duration);
    failover(&mut cluster, &gw, &a1, opts.rounds, opts.kill);
    if opts.sites > 0 {
        idle_sites(&mut cluster, opts.sites, opts.quiet);
    }
}

/// The one broker holding `site`, once it has exactly one (up to 30 s).
fn holder(cluster: &Cluster, site: &str) -> Option<usize> {
    let mut one = None;
    wait_for(Duration::from_secs(30), || {
        one = match cluster.holders(site)[..] {
            [b] => Some(b),
            _ => None,
        };
        one.is_some()
    });
    one
}

/// Waits until every running broker counts `n` live brokers (a killed
/// one's lease expired, a restarted one joined).
fn fleet_of(cluster: &Cluster, n: usize, timeout: Duration) -> bool {
    wait_for(timeout, || {
        cluster
            .brokers
            .iter()
            .filter(|b| b.proc.is_some())
            .all(|b| b.metric("tether_broker_fleet_brokers_alive") == n as f64)
    })
}

/// Whether site `k`'s agent holds a standby connection now (its log's
/// last word on the standby is that one is ready).
fn holds_standby(cluster: &Cluster, k: usize) -> bool {
    let log = read(&cluster.path(&format!("site{k}.log")));
    let last = |what: &str| log.rfind(what);
    let ready = last("standby connection ready");
    let gone = [
        "the standby connection ended",
        "moving the tunnel to the standby",
        "the tunnel moved to this broker",
    ]
    .into_iter()
    .filter_map(last)
    .max();
    ready.is_some() && ready > gone
}

/// One iperf3 stream from `lab-2` to `lab-1` (`addr`) and back, in Gbit/s,
/// with the sender's retransmits.
fn iperf_pair(cluster: &Cluster, addr: &str, secs: u32) -> [(f64, u64); 2] {
    let _server = cluster.sites[0].ns.spawn("iperf3", &["-s"], None).unwrap();
    let client = &cluster.sites[1].ns;
    wait_for(Duration::from_secs(5), || {
        client.succeeds("iperf3", &["-c", addr, "-n", "1K"])
    });
    [
        crate::iperf(client, addr, 1, false, secs),
        crate::iperf(client, addr, 1, true, secs),
    ]
}

/// Throughput across two brokers, then on one.
fn throughput(cluster: &mut Cluster, a1: &str, secs: u32) {
    let h1 = holder(cluster, "lab-1").expect("lab-1 has one broker");
    let h2 = holder(cluster, "lab-2").expect("lab-2 has one broker");
    let mut rows = vec![(h1, h2, iperf_pair(cluster, a1, secs))];
    // Move lab-2 to lab-1's broker: stop its broker cleanly (the agent
    // moves to its standby), start it again, until they share one.
    for _ in 0..6 {
        let (h1, h2) = (
            holder(cluster, "lab-1").unwrap(),
            holder(cluster, "lab-2").unwrap(),
        );
        if h1 == h2 {
            rows.push((h1, h2, iperf_pair(cluster, a1, secs)));
            break;
        }
        let proc = cluster.brokers[h2 - 1].proc.as_mut().unwrap();
        proc.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(
            proc.wait_exit(Duration::from_secs(30)),
            "broker {h2} did not stop on SIGTERM"
        );
        cluster.brokers[h2 - 1].proc = None;
        cluster.start_broker(h2).unwrap();
        assert!(
            fleet_of(cluster, 3, Duration::from_secs(30)),
            "broker {h2} did not rejoin the fleet"
        );
    }
    println!();
    println!(
        "throughput lab-2 -> lab-1 and back, iperf3, 1 stream, {secs} s each (3 brokers on etcd, real agents)"
    );
    println!(
        "{:<22} {:>8} {:>8} {:>12} {:>12} {:>8} {:>8}",
        "path", "lab-1 on", "lab-2 on", "-> Gbit/s", "<- Gbit/s", "retr ->", "retr <-"
    );
    for (h1, h2, [down, up]) in rows {
        let path = if h1 == h2 {
            "one broker"
        } else {
            "two brokers (relayed)"
        };
        println!(
            "{path:<22} {h1:>8} {h2:>8} {:>12.3} {:>12.3} {:>8} {:>8}",
            down.0, up.0, down.1, up.1
        );
    }
}

/// One echo line of the prober: `(seq, sent, received)`.
fn echoes(log: &str) -> impl Iterator<Item = (u64, f64, f64)> + '_ {
    log.lines().filter_map(|l| {
        let mut w = l.strip_prefix("echo ")?.split_whitespace();
        Some((
            w.next()?.parse().ok()?,
            w.next()?.parse().ok()?,
            w.next()?.parse().ok()?,
        ))
    })
}

/// The backend's outage after a kill at `killed_at`, from its `ping -D`
/// log: the longest wait between two replies from the last one before the
/// kill to the last one received, and the requests in between that got no
/// reply.
fn backend_outage(log: &str, killed_at: f64) -> (f64, usize) {
    let seen = replies(log);
    let before = seen.iter().filter(|(t, _)| *t <= killed_at);
    let (t0, s0) = before
        .clone()
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .copied()
        .unwrap_or((killed_at, 0));
    let after: Vec<(f64, u64)> = seen
        .iter()
        .filter(|(t, _)| *t > killed_at)
        .copied()
        .collect();
    let gap = std::iter::once(t0)
        .chain(after.iter().map(|(t, _)| *t))
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(0.0, f64::max);
    let last = after.iter().map(|(_, s)| *s).max().unwrap_or(s0);
    let answered: std::collections::BTreeSet<u64> = after.iter().map(|(_, s)| *s).collect();
    let lost = (s0 + 1..last).filter(|q| !answered.contains(q)).count();
    (gap, lost)
}

/// p50, p99 and max of `gaps` (seconds), in ms.
fn percentiles(gaps: &mut [f64]) -> Option<(f64, f64, f64)> {
    if gaps.is_empty() {
        return None;
    }
    gaps.sort_by(f64::total_cmp);
    let pick = |q: f64| gaps[((gaps.len() as f64 - 1.0) * q).round() as usize] * 1000.0;
    Some((pick(0.5), pick(0.99), pick(1.0)))
}

/// Moves the gateway's traffic off broker `n` without touching the broker:
/// the node stops hearing it until the gateway has moved, then hears it
/// again (the traffic stays where it moved to).
fn move_gateway_off(cluster: &Cluster, gw: &ClusterGateway, n: usize) {
    move_gateway(
        cluster,
        gw,
        &[n],
        |active| active != n,
        &format!("off broker {n}"),
    );
}

/// Moves the gateway's traffic onto broker `n` without touching any
/// broker: the node stops hearing the others until the gateway has moved to
/// `n`, then hears them again (the traffic stays on `n`).
fn move_gateway_onto(cluster: &Cluster, gw: &ClusterGateway, n: usize) {
    let others: Vec<usize> = (1..=cluster.brokers.len()).filter(|&m| m != n).collect();
    move_gateway(
        cluster,
        gw,
        &others,
        |active| active == n,
        &format!("onto broker {n}"),
    );
}

/// Silences `silenced` at the gateway's node until `moved(active broker)`,
/// then lets the gateway hear every broker again.
fn move_gateway(
    cluster: &Cluster,
    gw: &ClusterGateway,
    silenced: &[usize],
    moved: impl Fn(usize) -> bool,
    what: &str,
) {
    let answers = gw.answers();
    for &m in silenced {
        gw.silence(m).unwrap();
    }
    let done = wait_for(Duration::from_secs(30), || moved(gw.active_broker()));
    for &m in silenced {
        gw.unsilence(m).unwrap();
    }
    assert!(done, "the gateway did not move {what}:\n{}", gw.log_text());
    assert!(
        wait_for(Duration::from_secs(30), || gw.answers() > answers
            && gw.metric("tether_gateway_brokers_up")
                == cluster.brokers.len() as f64),
        "the gateway does not hear every broker again:\n{}",
        gw.log_text()
    );
}

/// `rounds` kills of the broker holding `lab-1` while `lab-2` probes it
/// and the gateway's backend pings it; with [`Kill::SiteOnly`] the
/// gateway's traffic goes through another broker, which stays up.
fn failover(cluster: &mut Cluster, gw: &ClusterGateway, a1: &str, rounds: usize, kill: Kill) {
    let bench = binary("tether-bench").display().to_string();
    let _echo = crate::probe::start_echo(&cluster.sites[0].ns, cluster.path("echo.log"));
    let log = cluster.path("probe.log");
    let to = format!("{a1}:{ECHO_PORT}");
    let _prober: Proc = cluster.sites[1]
        .ns
        .spawn(
            &bench,
            &["probe-stream", "--to", &to, "--interval-ms", "10"],
            Some(log.clone()),
        )
        .unwrap();
    let ping_log = gw.path("backend-ping.log");
    let _ping = gw.ping(a1, &ping_log).unwrap();
    println!();
    let killed = match kill {
        Kill::Holder => "the broker holding lab-1 killed with SIGKILL",
        Kill::SiteOnly => {
            "only the broker holding lab-1 killed with SIGKILL (the gateway's traffic goes through another broker, which stays up)"
        }
        Kill::Both => {
            "the broker holding lab-1 and carrying the gateway's traffic killed with SIGKILL"
        }
    };
    println!(
        "failover gap: lab-2 probes lab-1 every 10 ms (UDP echo), and a backend behind the cloud gateway pings lab-1 every 10 ms; {killed}, {rounds} rounds"
    );
    println!(
        "{:>5} {:>7} {:>7} {:>10} {:>9} {:>10} {:>7} {:>12} {:>7} {:>9}",
        "round",
        "killed",
        "gw on",
        "lab-2 on",
        "lab-1 to",
        "gap ms",
        "lost",
        "backend ms",
        "lost",
        "address"
    );
    let mut gaps = Vec::new();
    let mut backend_gaps = Vec::new();
    for round in 1..=rounds {
        // Steady: lab-1 on one broker with a standby, echoes and replies
        // flowing.
        let victim = holder(cluster, "lab-1").expect("lab-1 has one broker");
        if kill == Kill::SiteOnly && gw.active_broker() == victim {
            move_gateway_off(cluster, gw, victim);
        }
        if kill == Kill::Both && gw.active_broker() != victim {
            move_gateway_onto(cluster, gw, victim);
        }
        // Both sites hold a standby: a kill measures a failover, not a
        // dial (a standby whose broker was stopped is replaced at once,
        // but the replacement takes a moment).
        assert!(
            wait_for(Duration::from_secs(30), || holds_standby(cluster, 1)
                && holds_standby(cluster, 2)),
            "no standby before round {round}:\n{}\n{}",
            read(&cluster.path("site1.log")),
            read(&cluster.path("site2.log"))
        );
        let pinger = cluster.holders("lab-2");
        let gw_on = gw.active_broker();
        let flowing = wait_for(Duration::from_secs(30), || {
            let now = unix_now();
            echoes(&read(&log)).any(|(_, _, r)| r > now - 0.5)
                && replies(&read(&ping_log))
                    .iter()
                    .any(|(r, _)| *r > now - 0.5)
        });
        assert!(
            flowing,
            "no echo or no ping reply before round {round}:\n{}\n{}",
            read(&log),
            read(&ping_log)
        );
        let killed_at = unix_now();
        cluster.brokers[victim - 1].proc.take().unwrap().kill();
        let mut first = None;
        let back = wait_for(ROUND_LIMIT, || {
            first = echoes(&read(&log)).find(|(_, s, _)| *s > killed_at);
            first.is_some()
        });
        assert!(
            back,
            "round {round}: lab-1 did not answer within {ROUND_LIMIT:?} of the kill; lab-1:\n{}",
            read(&cluster.path("site1.log"))
        );
        // The backend's pings flow again: ten replies received a second
        // after the kill or later.
        let backend_back = wait_for(ROUND_LIMIT, || {
            replies(&read(&ping_log))
                .iter()
                .filter(|(t, _)| *t > killed_at + 1.0)
                .count()
                > 10
        });
        assert!(
            backend_back,
            "round {round}: the backend got no reply within {ROUND_LIMIT:?} of the kill; gateway:\n{}",
            gw.log_text()
        );
        let (backend_gap, backend_lost) = backend_outage(&read(&ping_log), killed_at);
        if kill == Kill::SiteOnly {
            assert_eq!(
                gw.active_broker(),
                gw_on,
                "round {round}: the gateway's traffic left broker {gw_on}, which was not killed:\n{}",
                gw.log_text()
            );
        }
        let (seq, _, received) = first.unwrap();
        let text = read(&log);
        let last_before = echoes(&text)
            .filter(|(_, s, _)| *s <= killed_at)
            .map(|(q, _, _)| q)
            .max()
            .unwrap_or(0);
        let lost = seq.saturating_sub(last_before + 1);
        let gap = received - killed_at;
        let now_on = cluster.holders("lab-1");
        let address = cluster.sites[0].address();
        let kept = address.as_deref() == Some(a1);
        println!(
            "{round:>5} {victim:>7} {gw_on:>7} {:>10} {:>9} {:>10.0} {lost:>7} {:>12.0} {backend_lost:>7} {:>9}",
            format!("{pinger:?}"),
            format!("{now_on:?}"),
            gap * 1000.0,
            backend_gap * 1000.0,
            if kept { "kept" } else { "CHANGED" }
        );
        assert!(kept, "round {round}: lab-1 had {a1}, now {address:?}");
        gaps.push(gap);
        backend_gaps.push(backend_gap);
        let answers = gw.answers();
        cluster.start_broker(victim).unwrap();
        // The next round starts from the steady state: three live
        // brokers (the killed one's lease expired, its restart joined),
        // the gateway hearing the restarted one (and both sites holding a
        // standby, checked at the round's start).
        assert!(
            fleet_of(cluster, 3, Duration::from_secs(30)),
            "round {round}: the fleet did not settle at three brokers"
        );
        assert!(
            wait_for(Duration::from_secs(30), || gw.answers() > answers
                && gw.metric("tether_gateway_brokers_up") == 3.0),
            "round {round}: the gateway does not hear broker {victim} again:\n{}",
            gw.log_text()
        );
    }
    if let Some((p50, p99, max)) = percentiles(&mut gaps) {
        println!(
            "failover gap (lab-2's probe) over {} kills: p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms",
            gaps.len(),
        );
    }
    if let Some((p50, p99, max)) = percentiles(&mut backend_gaps) {
        println!(
            "failover gap (the backend's ping through the gateway) over {} kills: p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms",
            backend_gaps.len(),
        );
    }
}

/// etcd's write counters, read on the leader (etcd 3.4 and later serve them).
const WRITE_METRICS: [&str; 4] = [
    "etcd_mvcc_put_total",
    "etcd_mvcc_delete_total",
    "etcd_mvcc_txn_total",
    "etcd_server_proposals_committed_total",
];

/// Writes to etcd over `secs` quiet seconds: the revision's growth, each
/// write counter's, and the keys written (a watch on the prefix).
fn quiet_writes(cluster: &Cluster, secs: u64, label: &str) {
    let leader = cluster.leader().unwrap_or(1);
    let watch_log = cluster.path(&format!("watch-{label}.log"));
    let watch = cluster.watch(leader, &watch_log).unwrap();
    // The watch is open once etcd confirmed it (its first line).
    wait_for(Duration::from_secs(5), || {
        read(&watch_log).contains("created")
    });
    let counters = |c: &Cluster| {
        WRITE_METRICS
            .iter()
            .map(|m| c.member_metric(leader, m))
            .collect::<Vec<_>>()
    };
    let (rev0, c0, t0) = (
        cluster.revision().unwrap(),
        counters(cluster),
        Instant::now(),
    );
    std::thread::sleep(Duration::from_secs(secs));
    let (rev1, c1) = (cluster.revision().unwrap(), counters(cluster));
    let took = t0.elapsed().as_secs_f64();
    drop(watch);
    let per = |d: f64| d / took;
    println!(
        "{label}: etcd revision {rev0} -> {rev1} in {took:.0} s: {:.2} writes/s",
        per((rev1 - rev0) as f64)
    );
    for (m, (a, b)) in WRITE_METRICS.iter().zip(c0.iter().zip(&c1)) {
        match (a, b) {
            (Some(a), Some(b)) => {
                println!("  {m} (member {leader}): +{} ({:.2}/s)", b - a, per(b - a))
            }
            _ => println!("  {m}: not served by this etcd"),
        }
    }
    print_watched(&watch_log);
}

/// Prints the keys a watch log saw written, by kind and directory under
/// the prefix.
fn print_watched(watch_log: &std::path::Path) {
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for line in read(watch_log).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        for e in v["result"]["events"].as_array().into_iter().flatten() {
            let key = e["kv"]["key"]
                .as_str()
                .and_then(|k| data_encoding::BASE64.decode(k.as_bytes()).ok())
                .map(|k| String::from_utf8_lossy(&k).to_string())
                .unwrap_or_default();
            let kind = e["type"].as_str().unwrap_or("PUT");
            let dir = key
                .strip_prefix(tether_netns_tests::cluster::PREFIX)
                .unwrap_or(&key)
                .rsplit_once('/')
                .map_or(key.clone(), |(d, _)| d.to_string());
            *seen.entry(format!("{kind} {dir}/")).or_default() += 1;
        }
    }
    if seen.is_empty() {
        println!("  keys written under the prefix: none");
    }
    for (what, n) in seen {
        println!("  keys written under the prefix: {what} x{n}");
    }
}

/// Waits until etcd's revision has not moved for `still` (up to `limit`):
/// the writes of a burst of connections are done. Returns when the last
/// write was seen, from the start, or None if writes never stopped.
fn writes_settle(cluster: &Cluster, still: Duration, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let (mut rev, mut at) = (cluster.revision().ok()?, Instant::now());
    while t0.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(500));
        let now = cluster.revision().ok()?;
        if now != rev {
            (rev, at) = (now, Instant::now());
        } else if at.elapsed() >= still {
            return Some(at - t0);
        }
    }
    None
}

/// Prints when the writes after an event at `since` were done, and the
/// keys written from now until then.
fn settle(cluster: &Cluster, what: &str, since: Instant) {
    let watch_log = cluster.path(&format!("watch-settle-{}.log", since.elapsed().as_millis()));
    let watch = cluster
        .watch(cluster.leader().unwrap_or(1), &watch_log)
        .unwrap();
    wait_for(Duration::from_secs(5), || {
        read(&watch_log).contains("created")
    });
    let start = since.elapsed();
    match writes_settle(cluster, Duration::from_secs(5), Duration::from_secs(300)) {
        Some(t) => println!(
            "  etcd writes after {what} done {:.1} s after it (the revision then still for 5 s)",
            (start + t).as_secs_f64()
        ),
        None => println!("  etcd writes after {what} did not stop within 300 s"),
    }
    drop(watch);
    print_watched(&watch_log);
}

/// Idle load-generator sites on broker 1: etcd writes in steady state,
/// then broker 1 killed and the time until all are on brokers 2 and 3.
fn idle_sites(cluster: &mut Cluster, sites: usize, quiet: u64) {
    let admin_token = std::fs::read_to_string(cluster.path("broker1/admin.token"))
        .expect("broker 1's admin token");
    let dir = cluster.path("loadgen");
    let brokers = (1..=3)
        .map(|b| format!("{}:443", broker_ip(b)))
        .collect::<Vec<_>>()
        .join(",");
    let t = Instant::now();
    crate::run_loadgen_enroll(
        &cluster.brokers[0].ns,
        sites,
        &admin_token,
        &brokers,
        &["--retries", "3"],
        &dir,
    );
    eprintln!(
        "{sites} sites enrolled in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let log = cluster.path("storm.log");
    let keepalive = tether_config::client::TransportFile::default()
        .keepalive
        .trim_end_matches('s')
        .to_string();
    let t = Instant::now();
    let loadgen = binary("tether-loadgen").display().to_string();
    let n = sites.to_string();
    let _loadgen: Proc = cluster.sites[2]
        .ns
        .spawn(
            &loadgen,
            &[
                "storm",
                "--count",
                &n,
                "--broker",
                &brokers,
                "--dir",
                &dir.display().to_string(),
                "--rounds",
                "1",
                "--keepalive",
                &keepalive,
            ],
            Some(log.clone()),
        )
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(300), || read(&log)
            .contains("connected")),
        "load generator failed:\n{}",
        read(&log)
    );
    println!();
    println!(
        "{sites} idle sites (tether-loadgen, keepalive {keepalive} s) connected to broker 1 in {:.1} s; 2 real agents",
        t.elapsed().as_secs_f64()
    );
    // Steady state: the connect burst's writes are done.
    settle(cluster, "the start of the connections", t);
    quiet_writes(cluster, quiet, "steady state, all on broker 1");

    let killed = Instant::now();
    cluster.brokers[0].proc.take().unwrap().kill();
    let done = wait_for(Duration::from_secs(180), || read(&log).contains("round 1:"));
    let all_back = killed.elapsed();
    assert!(
        done,
        "the sites did not all come back on brokers 2 and 3:\n{}",
        read(&log)
    );
    let text = read(&log);
    let line = text
        .lines()
        .find(|l| l.starts_with("round 1:"))
        .unwrap_or_default();
    println!(
        "broker 1 killed (SIGKILL): all {sites} sites back on the other brokers {:.2} s after the kill",
        all_back.as_secs_f64()
    );
    println!("  load generator: {line}");
    settle(cluster, "the kill", killed);
    quiet_writes(cluster, quiet, "steady state, on brokers 2 and 3");
}
