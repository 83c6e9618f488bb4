//! File-descriptor exhaustion: an attacker who opens idle TCP connections
//! to every port the broker listens on (the tunnel's TCP 443, DNS over
//! TCP, the admin API) until the broker runs out of descriptors. The broker
//! must not spin on the failing accepts, must close the idle connections
//! after their deadlines, and must serve real clients again afterwards.
//! The broker runs with a limit of 128 descriptors, below what its
//! connection caps allow, so that a small attack runs it out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tether_netns_tests::topology::{BROKER, Topology, read};
use tether_netns_tests::{binary, require_root, wait_for};

const DESCRIPTORS: u32 = 128;

/// Opens `count` TCP connections to each of `targets` and holds them,
/// silent, until killed; prints how many it opened.
const ATTACKER: &str = r#"
import socket, sys, time
count = int(sys.argv[1])
held = []
for target in sys.argv[2:]:
    host, port = target.rsplit(":", 1)
    for _ in range(count):
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect((host, int(port)))
            held.append(s)
        except OSError:
            s.close()
print(len(held), flush=True)
time.sleep(600)
"#;

/// The broker's CPU time (user + system), from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|t| t.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

/// Descriptors the process holds.
fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn a_descriptor_exhaustion_attack_neither_spins_the_broker_nor_locks_out_sites() {
    if !require_root() {
        return;
    }
    let dns = format!("{BROKER}:53");
    let mut topo = Topology::new(&format!("[dns]\nlisten = [\"{dns}\"]\n")).unwrap();
    // Again under a small descriptor limit (soft and hard: the broker
    // raises its soft limit to the hard one).
    topo.broker.take();
    let cfg = topo.broker_config().display().to_string();
    let broker = topo
        .cloud
        .spawn(
            "prlimit",
            &[
                &format!("--nofile={DESCRIPTORS}:{DESCRIPTORS}"),
                &binary("tether-broker").display().to_string(),
                "run",
                "-c",
                &cfg,
            ],
            Some(topo.path("broker.log")),
        )
        .unwrap();
    let pid = broker.id();
    assert!(
        wait_for(Duration::from_secs(15), || topo.cloud.succeeds(
            "curl",
            &["-sf", "-m", "1", "http://127.0.0.1:7070/readyz"]
        )),
        "the broker did not start:\n{}",
        read(&topo.path("broker.log"))
    );

    std::fs::write(topo.path("attacker.py"), ATTACKER).unwrap();
    let attacker = topo
        .wan
        .spawn(
            "python3",
            &[
                &topo.path("attacker.py").display().to_string(),
                &DESCRIPTORS.to_string(),
                &format!("{BROKER}:443"),
                &dns,
            ],
            Some(topo.path("attacker.log")),
        )
        .unwrap();
    let admin = topo
        .cloud
        .spawn(
            "python3",
            &[
                &topo.path("attacker.py").display().to_string(),
                &DESCRIPTORS.to_string(),
                "127.0.0.1:7070",
            ],
            Some(topo.path("attacker-admin.log")),
        )
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(60), || !read(
            &topo.path("attacker.log")
        )
        .trim()
        .is_empty()
            && !read(&topo.path("attacker-admin.log")).trim().is_empty()),
        "the attacker did not finish connecting"
    );
    eprintln!(
        "attacker holds {} + {} connections; the broker has {} descriptors open (limit {DESCRIPTORS})",
        read(&topo.path("attacker.log")).trim(),
        read(&topo.path("attacker-admin.log")).trim(),
        open_descriptors(pid)
    );

    // Under attack: the broker idles, it does not retry failing accepts
    // in a loop.
    let (cpu, at) = (cpu_seconds(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let busy = (cpu_seconds(pid) - cpu) / at.elapsed().as_secs_f64();
    eprintln!("broker CPU under attack: {:.0} % of a core", busy * 100.0);
    assert!(
        busy < 0.15,
        "the broker used {:.0} % of a core while out of descriptors:\n{}",
        busy * 100.0,
        read(&topo.path("broker.log"))
    );

    // The idle connections are closed after their deadlines; the attacker
    // keeps its side open, so this is the broker's doing.
    let freed = wait_for(Duration::from_secs(60), || {
        open_descriptors(pid) < DESCRIPTORS as usize / 2
    });
    assert!(
        freed,
        "the broker still holds {} descriptors for idle connections",
        open_descriptors(pid)
    );
    drop((attacker, admin));

    // Real clients get through again: the admin API, DNS over TCP, and a
    // site that enrolls and connects.
    let out = topo
        .cloud
        .command("curl")
        .args(["-sSf", "-m", "5", "http://127.0.0.1:7070/readyz"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the admin API did not answer after the attack ({}):\n{}",
        String::from_utf8_lossy(&out.stderr),
        read(&topo.path("broker.log"))
    );
    let out = topo
        .wan
        .command("dig")
        .args([
            "+tcp",
            "+time=5",
            "+tries=1",
            &format!("@{BROKER}"),
            "ns.tether.internal",
            "A",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("status:"), "no DNS answer over TCP:\n{text}");
    let state = topo.path("site-state");
    topo.enroll("hospital-a", &state).unwrap();
    let (_site, addr) = topo.up(&state, "site.log").unwrap();
    assert!(wait_for(Duration::from_secs(15), || topo.backend_pings(&addr)));
    drop(broker);
}
