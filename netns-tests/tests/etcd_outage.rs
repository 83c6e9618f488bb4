//! etcd failures on a real three-member cluster
//! (`tether_netns_tests::cluster`: every etcd member, broker and site in
//! its own namespace, real `tether` agents):
//!
//! - every etcd member killed (by its PID) while two brokers serve three
//!   sites and one site pings another across the brokers: the ping loses
//!   nothing; an agent killed and started again gets its address back at
//!   the broker that held it; an enrollment is refused with a 503 that
//!   says why (the broker logs it, `tether enroll` prints it); when the
//!   members start again on their data directories, the same code enrolls
//!   a new site, every site has one owner and no address is held twice;
//! - an etcd member cut off from the other two (nftables on the router)
//!   while 200 sites enroll across three brokers: every enrollment
//!   succeeds, at once or on a retry with the same token; no address is
//!   held twice; after the heal all three members hold the same keys at
//!   the same revision;
//! - the mesh DNS zone asked of every broker with `dig`: the same answers
//!   (A, AAAA, PTR, NS, NXDOMAIN) at each, also after a site enrolls at
//!   one broker and after a site is revoked and its addresses given to a
//!   new site.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tether_netns_tests::cluster::{BrokerSetup, Cluster, broker_ip};
use tether_netns_tests::topology::read;
use tether_netns_tests::{binary, lost_pings, ping_summary, require_root, wait_for};

/// Runs `tether enroll` for site `k` at broker `at` with `code`; whether
/// it succeeded and what it printed.
fn tether_enroll(cluster: &Cluster, k: usize, at: usize, code: &str) -> (bool, String) {
    let site = &cluster.sites[k - 1];
    let out = site
        .ns
        .command(&binary("tether").display().to_string())
        .args([
            "enroll",
            "--broker",
            &broker_ip(at),
            "--token",
            code,
            "--state-dir",
            &site.state.display().to_string(),
        ])
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Lets sites `lab-1` to `lab-4` reach each other.
fn four_labs() -> BrokerSetup {
    let labs = "[\"site:lab-1\", \"site:lab-2\", \"site:lab-3\", \"site:lab-4\"]";
    BrokerSetup {
        extra_config: format!(
            "\n[[policy.allow]]\nname = \"all-labs\"\nfrom = {labs}\nto = {labs}\n"
        ),
        files: Vec::new(),
    }
}

#[test]
fn etcd_fully_down_keeps_tunnels_and_held_sites_and_refuses_enrollment_until_it_is_back() {
    if !require_root() {
        return;
    }
    let mut cluster = Cluster::with_brokers(2, 4, &four_labs()).unwrap();
    // lab-1 and lab-3 on broker 1, lab-2 on broker 2.
    let mut before = Vec::new();
    for (k, at) in [(1, 1), (2, 2), (3, 1)] {
        cluster.enroll(k, at).unwrap();
        before.push(cluster.up(k).unwrap());
    }
    assert!(
        wait_for(Duration::from_secs(30), || cluster.one_owner_each().is_ok()),
        "one owner per site: {:?}",
        cluster.one_owner_each()
    );
    let held: Vec<usize> = (1..=3)
        .map(|k| cluster.holders(&format!("lab-{k}"))[0])
        .collect();
    println!("OUTAGE: lab-1..3 held by brokers {held:?}");
    // The code for lab-4 exists before etcd goes away (making it is an
    // etcd write).
    let code = cluster.token(2, "lab-4").unwrap();

    // lab-1 pings lab-2 every 50 ms for the whole outage.
    let log = cluster.path("ping.log");
    let mut ping = cluster.sites[0]
        .ns
        .spawn(
            "ping",
            &["-D", "-O", "-i", "0.05", "-W", "1", "-w", "300", &before[1]],
            Some(log.clone()),
        )
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || read(&log)
            .contains(" bytes from ")),
        "lab-1 reaches lab-2:\n{}",
        read(&log)
    );

    // Every etcd member killed, by its PID.
    let pids: Vec<u32> = cluster
        .members
        .iter()
        .map(|m| m.proc.as_ref().unwrap().id())
        .collect();
    for m in &mut cluster.members {
        m.proc.as_mut().unwrap().kill();
        m.proc = None;
    }
    let down = Instant::now();
    println!("OUTAGE: killed etcd members (pids {pids:?})");
    // Both brokers' leases run out: they are fenced, and their sites stay
    // (the other broker refuses them too).
    assert!(
        wait_for(Duration::from_secs(30), || cluster
            .brokers
            .iter()
            .all(|b| b.metric("tether_broker_fleet_fenced_total") >= 1.0)),
        "both brokers fenced:\n{}\n{}",
        cluster.broker_log(1),
        cluster.broker_log(2)
    );
    println!(
        "OUTAGE: both brokers fenced {:.1?} after the kill",
        down.elapsed()
    );

    // lab-3's agent dies and starts again: it is served again by the broker
    // that held it, with its address.
    let third = cluster.sites[2].agent.as_mut().unwrap();
    third.kill();
    cluster.sites[2].agent = None;
    assert!(
        wait_for(Duration::from_secs(10), || cluster.sites[2]
            .address()
            .is_none()),
        "lab-3's tunnel device went with its agent"
    );
    let again = cluster.up(3);
    let again = again.unwrap_or_else(|e| {
        panic!(
            "lab-3 came back while etcd is down: {e}\nbroker 1:\n{}\nbroker 2:\n{}",
            cluster.broker_log(1),
            cluster.broker_log(2)
        )
    });
    assert_eq!(again, before[2], "lab-3 kept its address");
    assert!(
        wait_for(Duration::from_secs(20), || cluster.holders("lab-3")
            == [held[2]]),
        "lab-3 is back on broker {}: held by {:?}",
        held[2],
        cluster.holders("lab-3")
    );
    assert!(
        cluster.brokers[held[2] - 1]
            .metric("tether_broker_connects_without_store_total{result=\"readmitted\"}")
            >= 1.0,
        "the readmission is counted:\n{}",
        cluster.brokers[held[2] - 1].metrics_text()
    );
    assert!(
        cluster
            .broker_log(held[2])
            .contains("the site is served again from this broker's last view"),
        "broker {} says why it served lab-3:\n{}",
        held[2],
        cluster.broker_log(held[2])
    );
    // And its tunnel forwards: lab-3 reaches lab-1.
    let to = before[0].clone();
    assert!(
        wait_for(Duration::from_secs(20), || cluster.sites[2]
            .ns
            .succeeds("ping", &["-c", "1", "-W", "1", &to])),
        "lab-3 reaches lab-1 while etcd is down"
    );

    // A new site cannot enroll: 503, with the reason, at both brokers.
    for at in [1, 2] {
        let (ok, out) = tether_enroll(&cluster, 4, at, &code);
        assert!(
            !ok,
            "lab-4 enrolled at broker {at} while etcd is down:\n{out}"
        );
        assert!(
            out.contains("the broker's store did not answer; try again"),
            "tether enroll says why (broker {at}):\n{out}"
        );
        println!("OUTAGE: enrollment at broker {at}: {}", out.trim());
        let log = cluster.broker_log(at);
        assert!(
            log.lines()
                .any(|l| l.contains("enrollment refused") && l.contains("503")),
            "broker {at} refused the enrollment with a 503:\n{log}"
        );
    }
    let lost_while_down = lost_pings(&read(&log));
    assert!(
        lost_while_down.is_empty(),
        "pings lost while etcd was down: {lost_while_down:?}"
    );
    println!("OUTAGE: etcd down for {:.1?}", down.elapsed());

    // etcd back on the same data directories.
    for n in 1..=3 {
        cluster.start_member(n).unwrap();
    }
    assert!(
        wait_for(Duration::from_secs(60), || (1..=3)
            .all(|n| cluster.member_healthy(n))),
        "etcd is healthy again"
    );
    // Both brokers join the fleet again and every site has one owner.
    assert!(
        wait_for(Duration::from_secs(60), || cluster
            .broker_numbers()
            .unwrap()
            .values()
            .collect::<BTreeSet<_>>()
            .len()
            == 2),
        "both brokers rejoined:\n{}\n{}",
        cluster.broker_log(1),
        cluster.broker_log(2)
    );
    assert!(
        wait_for(Duration::from_secs(30), || cluster.one_owner_each().is_ok()),
        "one owner per site after etcd is back: {:?}",
        cluster.one_owner_each()
    );
    // The same code enrolls lab-4 now (tried as an operator would: again
    // after a refusal, for up to a minute).
    let mut last = String::new();
    let enrolled = wait_for(Duration::from_secs(60), || {
        let (ok, out) = tether_enroll(&cluster, 4, 2, &code);
        last = out;
        if !ok {
            std::thread::sleep(Duration::from_secs(1));
        }
        ok
    });
    assert!(enrolled, "lab-4 enrolls once etcd is back:\n{last}");
    let fourth = cluster.up(4).unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || cluster.one_owner_each().is_ok()),
        "one owner per site with lab-4: {:?}",
        cluster.one_owner_each()
    );

    ping.signal(nix::sys::signal::Signal::SIGINT);
    assert!(ping.wait_exit(Duration::from_secs(5)));
    let text = ping.log();
    let (sent, _) = ping_summary(&text);
    let lost = lost_pings(&text);
    println!(
        "OUTAGE: {} of {sent} pings lost from before the kill to after etcd was back: {lost:?}",
        lost.len()
    );
    assert!(sent > 100, "the ping ran: {sent} sent");
    assert!(lost.is_empty(), "pings lost: {lost:?}");

    // Every site has the address it had, lab-4 a new one; etcd leases each
    // to one site only.
    let mut now = Vec::new();
    for k in 1..=4 {
        now.push(cluster.sites[k - 1].address().unwrap_or_default());
    }
    assert_eq!(&now[..3], &before[..], "lab-1..3 kept their addresses");
    assert_eq!(now[3], fourth);
    let leases = cluster.assert_no_address_twice().unwrap();
    for (k, addr) in now.iter().enumerate() {
        let name = format!("lab-{}", k + 1);
        let held = leases.get(&name).cloned().unwrap_or_default();
        assert!(
            held.iter()
                .any(|p| p.split('/').next() == Some(addr.as_str())),
            "{name}'s address {addr} is leased to it in etcd: {held:?}"
        );
    }
}

#[test]
fn an_etcd_member_cut_off_during_200_enrollments_loses_none_and_the_store_agrees_after_the_heal() {
    if !require_root() {
        return;
    }
    const SITES: usize = 200;
    let cluster = Cluster::new(3, 0).unwrap();
    let mut load = cluster
        .enroll_load(SITES, 40, Duration::from_secs(240))
        .unwrap();
    // Cut the leader off from the other two once 10 sites are enrolled: it
    // still answers the brokers, but can commit nothing.
    load.wait_enrolled(10);
    let m = cluster.leader().expect("a leader");
    cluster.isolate_member(m).unwrap();
    println!(
        "MEMBER: member {m} (the leader) cut off after {} enrollments",
        load.enrolled
    );
    // Heal it once another 100 have enrolled (or all are done).
    load.wait_enrolled(110);
    cluster.rejoin_member(m).unwrap();
    println!(
        "MEMBER: member {m} back after {} enrollments",
        load.enrolled
    );
    let status = load.finish("MEMBER");
    assert!(status, "every site enrolled:\n{}", load.out.join("\n"));

    // Every site once, one IPv4 address each at most, no address twice.
    let sites = cluster.recorded_sites().unwrap();
    assert_eq!(sites.len(), SITES, "every site is recorded");
    let leases = cluster.assert_no_address_twice().unwrap();
    println!(
        "MEMBER: {} of {SITES} sites got their addresses at enrollment",
        leases.len()
    );
    assert_eq!(
        cluster.keys("tokens/").unwrap().len(),
        0,
        "every token is spent"
    );

    // After the heal the three members converge: each holds the same keys
    // at the same revision (read from its own copy).
    let mut copies = Vec::new();
    let agreed = wait_for(Duration::from_secs(60), || {
        copies = (1..=3).map(|n| cluster.keys_at(n, "")).collect();
        copies.iter().all(Option::is_some) && copies.windows(2).all(|w| w[0] == w[1])
    });
    let revisions: Vec<Option<u64>> = copies.iter().map(|c| c.as_ref().map(|(r, _)| *r)).collect();
    assert!(
        agreed,
        "the members hold the same keys at the same revision: revisions {revisions:?}, keys {:?}",
        copies
            .iter()
            .map(|c| c.as_ref().map(|(_, k)| k.len()))
            .collect::<Vec<_>>()
    );
    println!("MEMBER: the three members agree at revision {revisions:?}");
}

/// The mesh zone's name of site `name`.
fn fqdn(name: &str) -> String {
    format!("{name}.eu.tether.internal")
}

/// Asks broker `n`'s DNS server (`127.0.0.1:8053` in its namespace) with
/// `dig ARGS`: the status and the answer section (one record a line,
/// sorted, blanks collapsed).
fn ask(cluster: &Cluster, n: usize, args: &[&str]) -> String {
    let out = cluster.brokers[n - 1]
        .ns
        .command("dig")
        .args(["@127.0.0.1", "-p", "8053", "+time=2", "+tries=2"])
        .args(args)
        .output()
        .expect("dig (bind9-dnsutils) is needed");
    let text = String::from_utf8_lossy(&out.stdout);
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("(no answer)");
    let mut records: Vec<String> = text
        .lines()
        .skip_while(|l| !l.starts_with(";; ANSWER SECTION:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    records.sort();
    let mut answer = status.to_string();
    for r in records {
        answer.push('\n');
        answer.push_str(&r);
    }
    answer
}

/// The data of the records of an answer from [`ask`] (the last field of
/// each record line).
fn data(answer: &str) -> Vec<String> {
    answer
        .lines()
        .skip(1)
        .filter_map(|l| l.rsplit(' ').next().map(str::to_string))
        .collect()
}

/// The questions asked of every broker: A and AAAA of sites `lab-1` to
/// `lab-4` (enrolled or not), PTR of every address in `addresses`, the
/// zone's NS and a name that does not exist.
fn questions(addresses: &BTreeSet<String>) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for k in 1..=4 {
        for kind in ["A", "AAAA"] {
            out.push(vec![fqdn(&format!("lab-{k}")), kind.to_string()]);
        }
    }
    for a in addresses {
        out.push(vec!["-x".to_string(), a.clone()]);
    }
    out.push(vec!["tether.internal".into(), "NS".into()]);
    out.push(vec![fqdn("nobody"), "A".into()]);
    out
}

/// Every broker's answers to `questions`, by broker.
fn answers(cluster: &Cluster, questions: &[Vec<String>]) -> Vec<Vec<String>> {
    cluster
        .brokers
        .iter()
        .map(|b| {
            questions
                .iter()
                .map(|q| {
                    let args: Vec<&str> = q.iter().map(String::as_str).collect();
                    ask(cluster, b.n, &args)
                })
                .collect()
        })
        .collect()
}

/// Waits up to 30 s until every broker gives the same answers to the
/// questions about `addresses`, and `settled` holds of broker 1's; returns
/// broker 1's answers (question by question) and how long it took. Panics
/// with every broker's answers where they differ.
fn converge(
    cluster: &Cluster,
    what: &str,
    addresses: &BTreeSet<String>,
    settled: impl Fn(&BTreeMap<String, String>) -> bool,
) -> BTreeMap<String, String> {
    let started = Instant::now();
    let qs = questions(addresses);
    let mut last = Vec::new();
    let ok = wait_for(Duration::from_secs(30), || {
        last = answers(cluster, &qs);
        let first: BTreeMap<String, String> = qs
            .iter()
            .map(|q| q.join(" "))
            .zip(last[0].iter().cloned())
            .collect();
        last.windows(2).all(|w| w[0] == w[1]) && settled(&first)
    });
    if !ok {
        let mut report = String::new();
        for (i, q) in qs.iter().enumerate() {
            report.push_str(&format!("{}:\n", q.join(" ")));
            for (b, a) in last.iter().enumerate() {
                report.push_str(&format!(
                    "  broker {}: {}\n",
                    b + 1,
                    a[i].replace('\n', " | ")
                ));
            }
        }
        panic!("{what}: the brokers' answers did not agree within 30 s:\n{report}");
    }
    println!(
        "DNS: {what}: {} questions answered alike by {} brokers after {:.1?}",
        qs.len(),
        cluster.brokers.len(),
        started.elapsed()
    );
    qs.iter()
        .map(|q| q.join(" "))
        .zip(last[0].iter().cloned())
        .collect()
}

#[test]
fn every_broker_answers_the_mesh_zone_alike_also_after_it_changes() {
    if !require_root() {
        return;
    }
    let mut cluster = Cluster::with_brokers(3, 4, &four_labs()).unwrap();
    // lab-1 (announcing a service) on broker 1, lab-2 on broker 2.
    cluster.enroll(1, 1).unwrap();
    let config = cluster.sites[0].state.join("tether.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("services = []"), "{text}");
    std::fs::write(
        &config,
        text.replace("services = []", "services = [\"http=8080\"]"),
    )
    .unwrap();
    let one = cluster.up(1).unwrap();
    cluster.enroll(2, 2).unwrap();
    let two = cluster.up(2).unwrap();

    let mut addresses: BTreeSet<String> = [one.clone(), two.clone()].into();
    let site_a = |k: usize| format!("{} A", fqdn(&format!("lab-{k}")));
    let site_aaaa = |k: usize| format!("{} AAAA", fqdn(&format!("lab-{k}")));
    let got = converge(&cluster, "two sites up", &addresses, |a| {
        data(&a[&site_a(1)]) == [one.clone()] && data(&a[&site_a(2)]) == [two.clone()]
    });
    assert_eq!(
        data(&got[&site_aaaa(1)]).len(),
        1,
        "lab-1 has an IPv6 address"
    );
    for k in [1, 2] {
        addresses.extend(data(&got[&site_aaaa(k)]));
    }
    // Now the PTR of the IPv6 addresses too; each names its site.
    let got = converge(&cluster, "with IPv6 PTR", &addresses, |_| true);
    for (k, a) in [(1, &one), (2, &two)] {
        assert_eq!(
            data(&got[&format!("-x {a}")]),
            [format!("{}.", fqdn(&format!("lab-{k}")))],
            "PTR of {a}"
        );
    }
    assert!(
        got[&format!("{} A", fqdn("nobody"))].starts_with("NXDOMAIN"),
        "{:?}",
        got[&format!("{} A", fqdn("nobody"))]
    );
    assert!(
        got[&site_a(3)].starts_with("NXDOMAIN"),
        "lab-3 is not enrolled yet: {:?}",
        got[&site_a(3)]
    );

    // SRV: the services a site announces in its session travel with its
    // connected event, so every broker answers them alike (docs/dns.md,
    // docs/ha.md "Names").
    let holder = cluster.holders("lab-1");
    assert_eq!(holder.len(), 1, "lab-1 held once: {holder:?}");
    let srv_name = format!("_http._tcp.{}", fqdn("lab-1"));
    let want = [format!("{}.", fqdn("lab-1"))];
    let mut srv: Vec<String> = Vec::new();
    let alike = wait_for(Duration::from_secs(10), || {
        srv = (1..=3)
            .map(|n| ask(&cluster, n, &[&srv_name, "SRV"]))
            .collect();
        srv.iter().all(|a| data(a) == want)
    });
    assert!(
        alike,
        "SRV of lab-1 (held by broker {}) at every broker: {srv:?}",
        holder[0]
    );
    println!(
        "DNS: SRV of lab-1 (held by broker {}), by broker: {srv:?}",
        holder[0]
    );

    // A site enrolled at broker 3 appears at every broker.
    cluster.enroll(3, 3).unwrap();
    let got = converge(&cluster, "lab-3 enrolled at broker 3", &addresses, |a| {
        data(&a[&site_a(3)]).len() == 1 && data(&a[&site_aaaa(3)]).len() == 1
    });
    addresses.extend(data(&got[&site_a(3)]));
    addresses.extend(data(&got[&site_aaaa(3)]));
    converge(&cluster, "with lab-3's PTR", &addresses, |_| true);

    // lab-2 revoked at broker 1 and its addresses released: it is gone
    // from every broker; lab-4, enrolled at broker 2, appears everywhere
    // (and the PTR of lab-2's old addresses follows whoever holds them).
    cluster.brokers[0]
        .cli(&["site", "revoke", "--site", "lab-2", "--region", "eu"])
        .unwrap();
    cluster.brokers[0]
        .cli(&["site", "release", "--site", "lab-2", "--region", "eu"])
        .unwrap();
    let got = converge(&cluster, "lab-2 revoked at broker 1", &addresses, |a| {
        a[&site_a(2)].starts_with("NXDOMAIN")
    });
    assert!(
        got[&format!("-x {two}")].starts_with("NXDOMAIN"),
        "lab-2's old address has no name: {:?}",
        got[&format!("-x {two}")]
    );
    cluster.enroll(4, 2).unwrap();
    let got = converge(&cluster, "lab-4 enrolled at broker 2", &addresses, |a| {
        data(&a[&site_a(4)]).len() == 1 && data(&a[&site_aaaa(4)]).len() == 1
    });
    let four = data(&got[&site_a(4)])[0].clone();
    println!(
        "DNS: lab-4 got {four}; PTR of lab-2's old address {two}: {:?}",
        got[&format!("-x {two}")]
    );
    addresses.insert(four.clone());
    addresses.extend(data(&got[&site_aaaa(4)]));
    let got = converge(&cluster, "with lab-4's PTR", &addresses, |_| true);
    assert_eq!(
        data(&got[&format!("-x {four}")]),
        [format!("{}.", fqdn("lab-4"))],
        "PTR of lab-4's address"
    );
}
