//! A WAN path that carries less than the tunnel's 1400-byte QUIC packets.
//!
//! ```text
//!  site ── hospital-fw ══ wan ── cloud: broker ── backend
//!                     MTU 1280 on both ends of fw ═ wan
//! ```
//!
//! The broker's QUIC handshake packets (1400 bytes of UDP payload) do not
//! cross such a path, so the site connects over HTTP/2 (TCP 443), whose
//! segments the kernel sizes for the path. The backend must reach the site
//! with packets that fit the tunnel, a TCP transfer of many segments must
//! complete, and both the agent's log and `tether doctor` must say that the
//! path is too small for HTTP/3 (not that a firewall blocks UDP).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tether_netns_tests::topology::{Topology, read};
use tether_netns_tests::{require_root, wait_for};

/// `ping` from the backend with `args`: whether it succeeded, and its output.
fn ping(topo: &Topology, args: &[&str]) -> (bool, String) {
    let out = topo.backend.command("ping").args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The MTU of `dev` in the site namespace.
fn site_mtu(topo: &Topology, dev: &str) -> String {
    let out = topo
        .site
        .command("cat")
        .arg(format!("/sys/class/net/{dev}/mtu"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_1280_byte_wan_path_is_not_a_black_hole() {
    if !require_root() {
        return;
    }
    let topo = Topology::new("").unwrap();
    assert!(
        topo.fw
            .succeeds("ip", &["link", "set", "wan", "mtu", "1280"])
    );
    assert!(
        topo.wan
            .succeeds("ip", &["link", "set", "hospital", "mtu", "1280"])
    );
    let state = topo.path("site-state");
    topo.enroll("hospital-a", &state).unwrap();
    let (_site, addr) = topo.up(&state, "site.log").unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || topo.backend_pings(&addr)),
        "backend cannot ping {addr}:\n{}",
        read(&topo.path("site.log"))
    );
    let tun_mtu = site_mtu(&topo, "tether0");
    eprintln!("tunnel device MTU: {tun_mtu}");

    let mut observed = Vec::new();
    for size in ["1100", "1200", "1252", "1300"] {
        let (ok, out) = ping(
            &topo,
            &["-c", "2", "-W", "2", "-M", "do", "-s", size, &addr],
        );
        eprintln!("ping -M do -s {size}: ok={ok}\n{out}");
        observed.push((size, ok));
    }

    let page = "x".repeat(200 * 1024);
    let _server = topo.serve_page(&page).unwrap();
    let url = format!("http://{addr}:8080/index.html");
    let fetched = wait_for(Duration::from_secs(30), || {
        let out = topo
            .backend
            .command("curl")
            .args([
                "-s",
                "-m",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{size_download}",
            ])
            .arg(&url)
            .output()
            .unwrap();
        let got = String::from_utf8_lossy(&out.stdout).to_string();
        eprintln!("curl: {got} bytes, status {}", out.status);
        got.trim() == page.len().to_string()
    });

    let state_arg = state.display().to_string();
    let (doctor_ok, report) = topo.tether(&["doctor", "--state-dir", &state_arg], &[]);
    eprintln!("doctor ok={doctor_ok}\n{report}");
    eprintln!("site log:\n{}", read(&topo.path("site.log")));
    eprintln!(
        "tunnel device MTU at the end: {}",
        site_mtu(&topo, "tether0")
    );

    assert!(fetched, "a 200 KiB page did not cross the tunnel");
    // The agent says why it does not use HTTP/3.
    let log = read(&topo.path("site.log"));
    assert!(
        log.contains("the path carries less than the 1400 bytes"),
        "the agent does not say why HTTP/3 is not used:\n{log}"
    );
    // The site connects (over TCP), so doctor passes it, and names the
    // path as the reason HTTP/3 is not used rather than a firewall.
    assert!(doctor_ok, "doctor must exit 0: the site connects\n{report}");
    assert!(
        report.contains("the path carries less than the 1400 bytes"),
        "doctor does not name the small path:\n{report}"
    );
    assert!(
        !report.contains("UDP 443 looks blocked"),
        "doctor blames a firewall for a small path:\n{report}"
    );
    let tun: usize = site_mtu(&topo, "tether0").parse().unwrap();
    for (size, ok) in observed {
        let packet = size.parse::<usize>().unwrap() + 28;
        if packet <= tun {
            assert!(
                ok,
                "a DF ping of {packet} bytes fits the tunnel MTU {tun} but was lost"
            );
        }
    }
}
