//! A WAN path that carries less than the tunnel's 1400-byte QUIC packets.
//!
//! ```text
//!  site ── hospital-fw ══ wan ── cloud: broker ── backend
//!                     MTU 1280 on both ends of fw ═ wan
//! ```
//!
//! The broker's QUIC handshake packets (1400 bytes of UDP payload) do not
//! cross such a path, nor its narrow form's (1320 bytes, for a tunnel MTU
//! of 1280), so the site connects over HTTP/2 (TCP 443), whose
//! segments the kernel sizes for the path. The backend must reach the site
//! with packets that fit the tunnel, a TCP transfer of many segments must
//! complete, and both the agent's log and `tether doctor` must say that the
//! path is too small for HTTP/3 (not that a firewall blocks UDP). When the
//! path narrows under a running HTTP/3 session, the site moves to HTTP/2
//! with its address, and back to HTTP/3 when the path is wide again. On a
//! path of 1360 bytes the site runs HTTP/3 with the narrow packets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

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

/// How many bytes the backend fetched of the page the site serves at
/// `addr` (`curl`, at most 10 s).
fn fetched_bytes(topo: &Topology, addr: &str) -> String {
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
        .arg(format!("http://{addr}:8080/index.html"))
        .output()
        .unwrap();
    let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
    eprintln!("curl: {got} bytes, status {}", out.status);
    got
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
    set_wan_mtu(&topo, "1280");
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
    let fetched = wait_for(Duration::from_secs(30), || {
        fetched_bytes(&topo, &addr) == page.len().to_string()
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
    // The narrow probe is never answered here (it is not fragmented), so
    // no narrow handshake is tried in vain.
    assert!(
        !log.contains("but not a handshake with packets of that size"),
        "a narrow handshake was tried on a path that cannot carry it:\n{log}"
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

/// A WAN path narrower than the tunnel's full-size packets but wide enough
/// for its narrow form (an IP MTU of 1360: 1332 bytes of UDP payload,
/// between 1320 and 1400): the site runs HTTP/3 with 1320-byte packets,
/// its tunnel carries IPv6's minimum of 1280 bytes in both directions,
/// and the agent's log and `tether doctor` say so. When the site
/// reconnects it dials the narrow packets at once (no full-size handshake
/// waited out first), and once the path is wide again, the connection
/// after the one that saw it uses the full size.
#[test]
fn a_path_between_the_narrow_and_the_full_size_runs_http3_with_small_packets() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::new("").unwrap();
    set_wan_mtu(&topo, "1360");
    let state = topo.path("site-state");
    topo.enroll("hospital-v", &state).unwrap();
    let (_site, addr) = topo.up(&state, "site.log").unwrap();
    assert!(
        topo.wait_for_transport("h3", Duration::from_secs(20)),
        "not on HTTP/3 over a 1360-byte path:\n{}",
        read(&topo.path("site.log"))
    );
    let tun: usize = site_mtu(&topo, "tether0").parse().unwrap();
    eprintln!("tunnel device MTU on a 1360-byte path: {tun}");
    assert!(
        (1280..1360).contains(&tun),
        "tunnel device MTU {tun} on a narrow path"
    );
    // 1280-byte packets with DF, both IP versions, from the backend and
    // back.
    assert!(
        wait_for(Duration::from_secs(10), || {
            ping(
                &topo,
                &["-c", "1", "-W", "1", "-M", "do", "-s", "1252", &addr],
            )
            .0
        }),
        "a 1280-byte IPv4 packet does not cross the narrow tunnel:\n{}",
        read(&topo.path("site.log"))
    );
    let v6 = topo.site_address(6).expect("the site has an IPv6 address");
    let (ok, out) = ping(
        &topo,
        &["-6", "-c", "1", "-W", "2", "-M", "do", "-s", "1232", &v6],
    );
    assert!(
        ok,
        "a 1280-byte IPv6 packet does not cross the narrow tunnel:\n{out}"
    );
    // A transfer of many full-size segments completes.
    let page = "x".repeat(200 * 1024);
    let _server = topo.serve_page(&page).unwrap();
    assert_eq!(
        fetched_bytes(&topo, &addr),
        page.len().to_string(),
        "a 200 KiB page did not cross the narrow tunnel"
    );
    let log = read(&topo.path("site.log"));
    assert!(
        log.contains("this connection uses 1320-byte packets"),
        "the agent does not say it uses the narrow packets:\n{log}"
    );
    let state_arg = state.display().to_string();
    let (doctor_ok, report) = topo.tether(&["doctor", "--state-dir", &state_arg], &[]);
    eprintln!("doctor ok={doctor_ok}\n{report}");
    assert!(doctor_ok, "doctor must exit 0: the site connects\n{report}");
    assert!(
        report.contains("the site uses HTTP/3 with 1320-byte packets"),
        "doctor does not name the narrow path:\n{report}"
    );

    // The broker restarts: the site dials the narrow packets at once.
    let narrow = |topo: &Topology| {
        read(&topo.path("site.log"))
            .matches("this connection uses 1320-byte packets")
            .count()
    };
    let restarted = Instant::now();
    topo.restart_broker().unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || narrow(&topo) == 2
            && topo.backend_pings(&addr)),
        "no narrow connection after the broker's restart:\n{}",
        read(&topo.path("site.log"))
    );
    eprintln!(
        "back on the narrow path {:.1} s after the broker's restart",
        restarted.elapsed().as_secs_f64()
    );
    let log = read(&topo.path("site.log"));
    assert!(
        log.contains(
            "dialing with 1320-byte packets, which the path needed at the last connection"
        ),
        "the reconnect did not start with the narrow packets:\n{log}"
    );

    // The path is wide again: the next dial still starts narrow and sees
    // the full size answered beside it; the one after uses the full size.
    set_wan_mtu(&topo, "1500");
    topo.restart_broker().unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || read(&topo.path("site.log"))
            .contains("the path carries 1400-byte QUIC packets again")),
        "the widened path went unnoticed:\n{}",
        read(&topo.path("site.log"))
    );
    assert!(wait_for(Duration::from_secs(30), || topo.backend_pings(&addr)));
    let narrowed = narrow(&topo);
    topo.restart_broker().unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || {
            site_mtu(&topo, "tether0").parse::<usize>().unwrap_or(0) > tun
                && topo.backend_pings(&addr)
        }),
        "the full size was not used after the path widened (device MTU {}):\n{}",
        site_mtu(&topo, "tether0"),
        read(&topo.path("site.log"))
    );
    assert_eq!(
        narrow(&topo),
        narrowed,
        "a narrow connection on the widened path"
    );
}

/// Sets the MTU of both ends of the hospital's WAN link.
fn set_wan_mtu(topo: &Topology, mtu: &str) {
    assert!(topo.fw.succeeds("ip", &["link", "set", "wan", "mtu", mtu]));
    assert!(
        topo.wan
            .succeeds("ip", &["link", "set", "hospital", "mtu", mtu])
    );
}

/// The path narrows under a running HTTP/3 session (a VPN concentrator or
/// PPPoE link switched in): every full-size QUIC packet is lost from then
/// on, while keepalives and ACKs still cross, so the connection stays up.
/// The ends must notice that full-size packets are lost, close the
/// connection, and the site move to HTTP/2 with its address, say why, and
/// return to HTTP/3 when the path is wide again.
#[test]
fn a_wan_path_narrowing_mid_session_moves_the_site_to_http2() {
    if !require_root() {
        return;
    }
    let topo = Topology::new("").unwrap();
    let state = topo.path("site-state");
    topo.enroll("hospital-n", &state).unwrap();
    let (_site, addr) = topo.up(&state, "site.log").unwrap();
    assert!(
        topo.wait_for_transport("h3", Duration::from_secs(10)),
        "{}",
        read(&topo.path("site.log"))
    );
    let wide_mtu = site_mtu(&topo, "tether0");

    set_wan_mtu(&topo, "1280");
    let narrowed = Instant::now();
    // Small packets (keepalives, ACKs) still cross: the black hole shows
    // only to traffic of full size, which the backend sends (a burst of
    // large pings per look; each echo is lost until the site has moved).
    let moved = wait_for(Duration::from_secs(30), || {
        let _ = ping(
            &topo,
            &["-c", "10", "-i", "0.05", "-W", "1", "-s", "1200", &addr],
        );
        topo.wait_for_transport("h2", Duration::ZERO)
    });
    assert!(
        moved,
        "no move to HTTP/2 within 30 s of the path narrowing:\n{}",
        read(&topo.path("site.log"))
    );
    eprintln!(
        "path narrowed to 1280 mid-session: on HTTP/2 after {:.1} s",
        narrowed.elapsed().as_secs_f64()
    );
    assert_eq!(topo.site_address(4).as_deref(), Some(addr.as_str()));
    // The large packets that the narrowed path lost over HTTP/3 cross it
    // now.
    assert!(
        wait_for(Duration::from_secs(10), || {
            ping(
                &topo,
                &["-c", "1", "-W", "1", "-M", "do", "-s", "1200", &addr],
            )
            .0
        }),
        "a DF ping of 1228 bytes does not cross the narrowed path over HTTP/2"
    );
    let tun = site_mtu(&topo, "tether0");
    let log = read(&topo.path("site.log"));
    assert!(
        log.contains("the path carries less than the 1400 bytes"),
        "the agent does not say why it left HTTP/3:\n{log}"
    );
    if tun != wide_mtu {
        assert!(
            log.contains("tunnel device MTU changed"),
            "the MTU went from {wide_mtu} to {tun} without a log line:\n{log}"
        );
    }

    // The path is wide again: back on HTTP/3 (the agent retries it while
    // on HTTP/2), with the same address.
    set_wan_mtu(&topo, "1500");
    let widened = Instant::now();
    assert!(
        topo.wait_for_transport("h3", Duration::from_secs(60)),
        "not back on HTTP/3 within 60 s of the path widening:\n{}",
        read(&topo.path("site.log"))
    );
    eprintln!(
        "path wide again: on HTTP/3 after {:.1} s",
        widened.elapsed().as_secs_f64()
    );
    assert_eq!(topo.site_address(4).as_deref(), Some(addr.as_str()));
    assert!(
        wait_for(Duration::from_secs(10), || topo.backend_pings(&addr)),
        "backend cannot ping {addr} after the return to HTTP/3"
    );
}
