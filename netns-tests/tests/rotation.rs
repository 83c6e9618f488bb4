//! A full CA rotation under load, with the real binaries: 100 sites of the
//! load generator and one real `tether up` site stay connected through
//! every phase while the backend pings the real site every 10 ms.
//!
//! ```text
//!  site ns:  tether up (hospital-a) + tether-loadgen renew (100 sites) ─┐
//!  away ns:  tether up (lab-away), offline through prepare and issue  ──┤ wan ── broker
//!  backend:  ping -i 0.01 hospital-a                                    ─┘
//! ```
//!
//! Site certificates live 20 s, so every site renews (at half-life) in
//! each phase: the test checks which CA signed the renewals and which
//! bundle came with them, rolls back from `prepared` and from `active`,
//! retires the old CA, and brings back a site that was offline through
//! `prepared` and `active` while the old CA is still in the bundle.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use tether_netns_tests::topology::{BROKER, Topology, overlay_address, read};
use tether_netns_tests::{NetNs, Proc, binary, link, ping_summary, require_root, wait_for};

/// Sites of the load generator.
const SITES: usize = 100;
/// Site certificate lifetime: sites renew every 10 s.
const LIFETIME: u64 = 20;

/// The broker's rotation state, from the admin API.
fn status(topo: &Topology) -> serde_json::Value {
    let status = topo.admin_get("/v1/ca");
    assert!(!status.is_null(), "no answer from GET /v1/ca");
    status
}

/// The CA names of the bundle, the signing CA first.
fn bundle(status: &serde_json::Value) -> Vec<String> {
    status["bundle"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

/// `tether-broker ca <step>`: its output, or its error.
fn ca(topo: &Topology, step: &str) -> Result<String, String> {
    topo.broker_cli(&["ca", step]).map_err(|e| e.to_string())
}

/// A step that must succeed, landing in `phase`; the new status.
fn step(topo: &Topology, which: &str, phase: &str) -> serde_json::Value {
    let out = ca(topo, which).unwrap_or_else(|e| panic!("ca {which}: {e}"));
    let s = status(topo);
    assert_eq!(s["phase"], phase, "after ca {which}:\n{out}");
    println!("ROTATION: ca {which} -> {phase}, bundle {:?}", bundle(&s));
    s
}

/// The load generator's sites that renewed after `from` (a log offset)
/// with a certificate of `issuer` and exactly the bundle `with`.
fn renewed(log: &str, from: usize, issuer: &str, with: &[String]) -> BTreeSet<usize> {
    let bundle = with.join("+");
    log[from.min(log.len())..]
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("renewed ")?;
            let (i, rest) = rest.split_once(" by ")?;
            let (by, rest) = rest.split_once(" bundle ")?;
            let (b, _) = rest.split_once(" address ")?;
            (by == issuer && b == bundle).then(|| i.parse().ok())?
        })
        .collect()
}

/// Waits until every load site renewed after `from` into `issuer` with
/// `with`; returns the log length when they had.
fn all_renewed(loadgen: &Proc, from: usize, issuer: &str, with: &[String], what: &str) -> usize {
    let started = Instant::now();
    let mut text = String::new();
    let done = wait_for(Duration::from_secs(3 * LIFETIME), || {
        text = loadgen.log();
        renewed(&text, from, issuer, with).len() == SITES
    });
    assert!(
        done,
        "{what}: only {} of {SITES} load sites renewed into {issuer} with {with:?}:\n{}",
        renewed(&text, from, issuer, with).len(),
        tail(&text)
    );
    println!(
        "ROTATION: {what}: all {SITES} load sites renewed into {issuer} in {:.1?}",
        started.elapsed()
    );
    text.len()
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The CA names of a site's trust bundle and the issuer of its
/// certificate, read with openssl from its state directory.
fn site_trust(state: &Path) -> (String, String) {
    let issuer = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-issuer", "-in"])
        .arg(state.join("site.crt"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    let subjects = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl crl2pkcs7 -nocrl -certfile {} | openssl pkcs7 -print_certs -noout",
            state.join("trust-bundle.pem").display()
        ))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    (issuer, subjects)
}

/// Waits until the real site in `state` holds a certificate of `issuer`
/// and a bundle naming exactly `with`.
fn site_renewed(state: &Path, issuer: &str, with: &[String], what: &str) {
    let mut seen = (String::new(), String::new());
    let ok = wait_for(Duration::from_secs(3 * LIFETIME), || {
        seen = site_trust(state);
        seen.0.contains(issuer)
            && with.iter().all(|c| seen.1.contains(c))
            && seen.1.matches("subject=").count() == with.len()
    });
    assert!(
        ok,
        "{what}: the site holds {seen:?}, not {issuer} with {with:?}"
    );
}

/// A namespace on the internet for a second site: `away` ─ wan.
fn away_namespace(topo: &Topology) -> NetNs {
    let ns = NetNs::new("away").unwrap();
    link(
        &topo.wan,
        "away",
        "198.51.100.5/30",
        &ns,
        "eth0",
        "198.51.100.6/30",
    )
    .unwrap();
    ns.run("ip", &["route", "add", "default", "via", "198.51.100.5"])
        .unwrap();
    ns
}

fn agent(ns: &NetNs, state: &Path, log: &Path) -> Proc {
    ns.spawn(
        &binary("tether").display().to_string(),
        &["up", "--state-dir", &state.display().to_string()],
        Some(log.to_path_buf()),
    )
    .unwrap()
}

fn address_of(ns: &NetNs, log: &Path) -> String {
    let mut addr = None;
    wait_for(Duration::from_secs(20), || {
        addr = overlay_address(ns, 4);
        addr.is_some()
    });
    addr.unwrap_or_else(|| panic!("the site did not come up:\n{}", read(log)))
}

/// Echo requests that got no reply although a later one did, from ping's
/// per-reply lines (`icmp_seq=N`): the request in flight when ping was
/// stopped is not a loss.
fn lost_before_last_reply(text: &str) -> u64 {
    let seqs: BTreeSet<u64> = text
        .lines()
        .filter_map(|l| {
            let rest = l.split_once("icmp_seq=")?.1;
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect();
    // Sequence numbers start at 1 (they wrap after 65535, about 11
    // minutes at this rate: longer than the test).
    seqs.last()
        .map_or(0, |last| last.saturating_sub(seqs.len() as u64))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn a_full_rotation_under_load_drops_no_tunnel() {
    if !require_root() {
        return;
    }
    let topo = Topology::new(&format!(
        "\n[tunnel]\nsite_cert_lifetime = \"{LIFETIME}s\"\n"
    ))
    .unwrap();
    let started = Instant::now();

    // The load: 100 enrolled sites holding their tunnels and renewing.
    let dir = topo.path("loadgen");
    let admin_token = std::fs::read_to_string(topo.path("broker/admin.token")).unwrap();
    let enrolled = topo
        .cloud
        .run(
            &binary("tether-loadgen").display().to_string(),
            &[
                "enroll",
                "--count",
                &SITES.to_string(),
                "--admin",
                "http://127.0.0.1:7070",
                "--admin-token",
                admin_token.trim(),
                "--broker",
                &format!("{BROKER}:443"),
                "--region",
                "eu",
                "--dir",
                &dir.display().to_string(),
            ],
        )
        .unwrap();
    let enrolled = String::from_utf8_lossy(&enrolled.stdout).to_string();
    println!("ROTATION: {}", enrolled.lines().last().unwrap_or_default());
    let loadgen = topo
        .site
        .spawn(
            &binary("tether-loadgen").display().to_string(),
            &[
                "renew",
                "--count",
                &SITES.to_string(),
                "--broker",
                &format!("{BROKER}:443"),
                "--dir",
                &dir.display().to_string(),
            ],
            Some(topo.path("loadgen.log")),
        )
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(60), || loadgen
            .log()
            .contains("connected")),
        "the load generator did not connect:\n{}",
        loadgen.log()
    );
    // Losses are counted from here (a site whose certificate expired
    // before it could connect re-attested first).
    let connected = loadgen.log();
    println!(
        "ROTATION: {}",
        connected
            .lines()
            .find(|l| l.starts_with("connected"))
            .unwrap_or_default()
    );
    let connected = connected.len();

    // The site that will be offline: enrolled and connected once, then
    // stopped before the rotation starts.
    let away = away_namespace(&topo);
    let away_state = topo.path("away-state");
    let away_log = topo.path("away.log");
    topo.enroll_in(&away, "lab-away", &away_state).unwrap();
    let mut away_agent = agent(&away, &away_state, &away_log);
    let away_addr = address_of(&away, &away_log);
    away_agent.kill();

    // The real site, pinged every 10 ms from the backend throughout.
    let state = topo.path("site-state");
    topo.enroll("hospital-a", &state).unwrap();
    let (site, addr) = topo.up(&state, "site.log").unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || topo.backend_pings(&addr)),
        "the backend cannot ping the site"
    );
    let ping_log = topo.path("ping.log");
    let mut ping = topo
        .backend
        .spawn(
            "ping",
            &["-i", "0.01", "-W", "1", &addr],
            Some(ping_log.clone()),
        )
        .unwrap();
    println!("ROTATION: set up in {:.1?}", started.elapsed());

    let start = status(&topo);
    assert_eq!(start["phase"], "stable");
    let old = bundle(&start);
    assert_eq!(old.len(), 1);
    let old_ca = old[0].clone();

    // Prepared, rolled back, prepared again: the sites receive the new CA
    // in their bundle with certificates of the old one.
    let prepared = step(&topo, "rotate", "prepared");
    let mark = all_renewed(&loadgen, 0, &old_ca, &bundle(&prepared), "prepared");
    let back = step(&topo, "rollback", "stable");
    assert_eq!(bundle(&back), old);
    let mark = all_renewed(&loadgen, mark, &old_ca, &old, "rolled back to stable");
    let prepared = step(&topo, "rotate", "prepared");
    let both = bundle(&prepared);
    let new_ca = both[1].clone();
    assert_eq!(both, vec![old_ca.clone(), new_ca.clone()]);
    let mark = all_renewed(&loadgen, mark, &old_ca, &both, "prepared again");
    site_renewed(&state, &old_ca, &both, "prepared");

    // Active, rolled back to prepared, active again.
    let active = step(&topo, "rotate", "active");
    let new_first = bundle(&active);
    assert_eq!(new_first, vec![new_ca.clone(), old_ca.clone()]);
    let mark = all_renewed(&loadgen, mark, &new_ca, &new_first, "active");
    site_renewed(&state, &new_ca, &new_first, "active");
    let back = step(&topo, "rollback", "prepared");
    assert_eq!(bundle(&back), both);
    let mark = all_renewed(&loadgen, mark, &old_ca, &both, "rolled back to prepared");
    let active = step(&topo, "rotate", "active");
    let mark = all_renewed(&loadgen, mark, &new_ca, &new_first, "active again");
    site_renewed(&state, &new_ca, &new_first, "active again");

    // The site offline through prepare and issue comes back by itself,
    // with its address, while the old CA is still in the bundle.
    let away_agent = agent(&away, &away_state, &away_log);
    assert_eq!(
        address_of(&away, &away_log),
        away_addr,
        "{}",
        read(&away_log)
    );
    assert!(
        wait_for(Duration::from_secs(10), || topo.backend_pings(&away_addr)),
        "the backend cannot ping the site that was away:\n{}",
        read(&away_log)
    );
    site_renewed(&away_state, &new_ca, &new_first, "back after being away");
    println!("ROTATION: the site away through the rotation is back with its address");

    // Retired, once allowed: the old CA leaves the bundle.
    let retire_after = active["retire_after"].as_u64().unwrap();
    let early = ca(&topo, "rotate");
    if unix_now() < retire_after {
        let early = early.unwrap_err();
        assert!(early.contains("cannot be retired yet"), "{early}");
        std::thread::sleep(Duration::from_secs(retire_after + 1 - unix_now()));
        step(&topo, "rotate", "stable");
    }
    let retired = status(&topo);
    assert_eq!(retired["phase"], "stable");
    let only_new = vec![new_ca.clone()];
    assert_eq!(bundle(&retired), only_new);
    all_renewed(&loadgen, mark, &new_ca, &only_new, "retired");
    site_renewed(&state, &new_ca, &only_new, "retired");
    let none = ca(&topo, "rollback").unwrap_err();
    assert!(none.contains("nothing to roll back"), "{none}");

    // No tunnel dropped, no ping lost.
    ping.signal(nix::sys::signal::Signal::SIGINT);
    assert!(ping.wait_exit(Duration::from_secs(5)));
    let ping_text = ping.log();
    let (sent, received) = ping_summary(&ping_text);
    let lost_pings = lost_before_last_reply(&ping_text);
    let load = loadgen.log()[connected..].to_string();
    let site_log = read(&topo.path("site.log"));
    let dropped = load.lines().filter(|l| l.starts_with("lost ")).count();
    let failed = load.lines().filter(|l| l.starts_with("failed ")).count();
    let changed = load
        .lines()
        .filter(|l| l.ends_with("address changed"))
        .count();
    let renewals = load.lines().filter(|l| l.starts_with("renewed ")).count();
    let site_lost = site_log.matches("lost the connection").count();
    let site_renewals = site_log
        .matches("the tunnel moved to a connection with the renewed certificate")
        .count();
    println!(
        "ROTATION: {lost_pings} of {sent} pings lost ({received} replies); load sites: {renewals} renewals, {dropped} tunnels dropped, {failed} renewals failed, {changed} addresses changed; real site: {site_renewals} renewals, {site_lost} connections lost; {:.1?} in all",
        started.elapsed()
    );
    assert_eq!(dropped, 0, "load tunnels dropped:\n{}", tail(&load));
    assert_eq!(failed, 0, "load renewals failed:\n{}", tail(&load));
    assert_eq!(changed, 0, "load addresses changed:\n{}", tail(&load));
    assert_eq!(site_lost, 0, "the real site lost its tunnel:\n{site_log}");
    assert!(site_renewals >= 4, "the real site renewed:\n{site_log}");
    assert_eq!(
        overlay_address(&topo.site, 4).as_deref(),
        Some(addr.as_str())
    );
    assert!(sent > 1000, "the ping ran: {sent} sent");
    // A renewal moves the tunnel to a new connection before the old one
    // goes, and the broker keeps taking packets on the old one until the
    // site has moved: none is lost.
    assert_eq!(
        lost_pings, 0,
        "{lost_pings} of {sent} pings lost over {site_renewals} renewals"
    );
    drop((site, away_agent, loadgen));
}
