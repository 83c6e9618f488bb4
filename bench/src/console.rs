//! The fleet console with many sites on one broker: `--console N` registers
//! N sites with the broker (a token each, as an operator creating them
//! ahead of installation does), enrolls the first `--console-enrolled K`
//! of them for real and connects those K with `tether-loadgen` (one QUIC
//! endpoint). Then it times the admin API requests the console makes (the
//! first page of the site list, a search, a state filter, the last page,
//! the route table) with curl inside the broker's namespace, and the pages
//! themselves in headless Chromium (`bench/console_load.py`): the first
//! page from navigation to its rendered rows, a search, the last page, a
//! site's page and the route table.

use std::path::Path;
use std::time::Instant;

use tether_netns_tests::topology::{Topology, read};

const CHROMIUM: &str = "/usr/bin/chromium";
const ADMIN: &str = "http://127.0.0.1:7070";

/// `/proc/loadavg`'s first three fields.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `curl` of `path` with `token` in the broker's namespace: (seconds to
/// the first byte, seconds in all, bytes), `rounds` times.
fn curl_times(topo: &Topology, token: &str, path: &str, rounds: usize) -> Vec<(f64, f64, u64)> {
    (0..rounds)
        .map(|_| {
            let out = topo
                .cloud
                .command("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code} %{time_starttransfer} %{time_total} %{size_download}",
                    "-H",
                    &format!("Authorization: Bearer {token}"),
                    &format!("{ADMIN}{path}"),
                ])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            let f: Vec<&str> = text.split_whitespace().collect();
            assert_eq!(f.first(), Some(&"200"), "GET {path}: {text}");
            (
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3].parse().unwrap(),
            )
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs the console measurement: `sites` registered, `enrolled` of them
/// enrolled and connected, `rounds` of each request and page load.
pub(crate) fn run(topo: &Topology, sites: usize, enrolled: usize, rounds: usize) {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is needed (apt-get install chromium)"
    );
    let enrolled = enrolled.min(sites);
    assert!(
        enrolled >= 1,
        "--console-enrolled must be at least 1 (the site page is timed on one)"
    );
    println!("machine load at the start: {}", loadavg());
    let admin = read(&topo.path("broker/admin.token")).trim().to_string();
    let viewer = read(&topo.path("broker/viewer.token")).trim().to_string();
    let dir = topo.path("loadgen");
    let started = Instant::now();
    crate::run_loadgen_enroll(
        &topo.cloud,
        sites,
        &admin,
        "203.0.113.10:443",
        &["--enroll-first", &enrolled.to_string()],
        &dir,
    );
    println!(
        "{sites} sites registered, {enrolled} of them enrolled, in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let _loadgens = if enrolled > 0 {
        let (procs, took) = crate::idle::connect(topo, &dir, 0, enrolled, enrolled, 0);
        println!("{enrolled} sites connected in {:.1} s", took.as_secs_f64());
        procs
    } else {
        Vec::new()
    };
    // Every connected site is in the list as online.
    let online = |t: &Topology| {
        t.admin_get("/v1/site-states?state=online&limit=1")["total"]
            .as_u64()
            .unwrap_or(0)
    };
    assert!(
        tether_netns_tests::wait_for(std::time::Duration::from_secs(60), || online(topo)
            == enrolled as u64),
        "the list shows {} sites online, not {enrolled}",
        online(topo)
    );
    let broker_pid = topo.broker.as_ref().unwrap().id();
    let rss = std::fs::read_to_string(format!("/proc/{broker_pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
        .unwrap_or_default();
    println!(
        "broker VmRSS {rss} KiB; machine load before timing: {}",
        loadavg()
    );

    let last = sites.saturating_sub(1) / 50 * 50;
    // The last connected site; ids are searched as substrings, so others
    // may match too (load-999 is in load-9990).
    let search = format!("load-{}", enrolled - 1);
    let search_rows = (0..sites)
        .filter(|j| format!("load-{j}").contains(&search))
        .count();
    let requests = [
        (
            "first page (what the console asks)",
            "/v1/site-states?offset=0&limit=50".to_string(),
        ),
        (
            "search, one site",
            format!("/v1/site-states?q={search}&offset=0&limit=50"),
        ),
        (
            "state=online",
            "/v1/site-states?state=online&offset=0&limit=50".into(),
        ),
        (
            "state=offline",
            "/v1/site-states?state=offline&offset=0&limit=50".into(),
        ),
        (
            "last page",
            format!("/v1/site-states?offset={last}&limit=50"),
        ),
        ("one site's timeline", format!("/v1/sites/{search}/events")),
        ("route table, unfiltered", "/v1/routes".into()),
        ("route table, one site", format!("/v1/routes?site={search}")),
    ];
    println!();
    println!(
        "{:<36} {:>10} {:>10} {:>10} {:>10}",
        "API request (viewer token)", "first B ms", "median ms", "max ms", "bytes"
    );
    for (name, path) in &requests {
        let t = curl_times(topo, &viewer, path, rounds);
        let max = t.iter().map(|x| x.1).fold(0.0, f64::max);
        println!(
            "{:<36} {:>10.1} {:>10.1} {:>10.1} {:>10}",
            name,
            median(t.iter().map(|x| x.0 * 1e3).collect()),
            median(t.iter().map(|x| x.1 * 1e3).collect()),
            max * 1e3,
            t[0].2
        );
    }

    println!();
    println!("console pages in headless Chromium ({rounds} loads):");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("console_load.py");
    let out = topo
        .cloud
        .command("python3")
        .arg(&script)
        .env("CONSOLE_URL", format!("{ADMIN}/console/"))
        .env("TOKEN", &viewer)
        .env("SEARCH", &search)
        .env("SEARCH_ROWS", search_rows.to_string())
        .env("ROUNDS", rounds.to_string())
        .env("CHROMIUM", CHROMIUM)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser script failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in text.lines().filter_map(|l| l.strip_prefix("RESULT ")) {
        let mut parts = line.splitn(3, ' ');
        let (name, ms, what) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        println!("  {name:<26} {ms:>9} ms  {what}");
    }
    println!("machine load at the end: {}", loadavg());
}
