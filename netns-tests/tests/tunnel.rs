//! A hospital site dials out through an egress-only firewall, gets its
//! address from the operator's pool, and a backend reaches it. Real
//! binaries, real nftables, real TUN devices; the topology is drawn in
//! `tether_netns_tests::topology`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tether_netns_tests::topology::{BROKER, Egress, SITE_LAN, Topology, read};
use tether_netns_tests::{require_root, stream, wait_for};

#[test]
fn backend_reaches_the_site_through_the_firewall() {
    if !require_root() {
        return;
    }
    let topo = Topology::new("").unwrap();
    let state = topo.path("site-state");
    topo.enroll("hospital-a", &state).unwrap();
    let (mut site, addr) = topo.up(&state, "site.log").unwrap();
    assert!(
        addr.starts_with("100.64."),
        "overlay address from the pool: {addr}"
    );

    // Ping over the tunnel, IPv4 and IPv6.
    assert!(
        wait_for(Duration::from_secs(10), || topo.backend_pings(&addr)),
        "backend cannot ping {addr}:\n{}",
        read(&topo.path("site.log"))
    );
    let addr6 = topo.site_address(6).expect("an IPv6 overlay address");
    assert!(
        wait_for(Duration::from_secs(10), || topo.backend_pings(&addr6)),
        "backend cannot ping {addr6}"
    );

    // A page from the site's web server, through the tunnel.
    let _web = topo.serve_page("hello from hospital-a\n").unwrap();
    let mut page = String::new();
    let fetched = wait_for(Duration::from_secs(10), || {
        let out = topo
            .backend
            .command("curl")
            .args(["-s", "-m", "2", &format!("http://{addr}:8080/index.html")])
            .output();
        page = out
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        page.contains("hello from hospital-a")
    });
    assert!(fetched, "page not fetched through the tunnel: {page:?}");

    // The site's underlay address is not reachable from the backend.
    assert!(!topo.backend_pings(SITE_LAN));
    assert!(!topo.backend.succeeds(
        "curl",
        &[
            "-s",
            "-m",
            "2",
            &format!("http://{SITE_LAN}:8080/index.html")
        ]
    ));
    // Nor the firewall's public side: nothing comes in.
    assert!(
        !topo
            .backend
            .succeeds("curl", &["-s", "-m", "2", "http://198.51.100.2:8080/"])
    );

    // The site reaches nothing outside the published CIDR, and inside it
    // only port 443.
    assert!(
        !topo
            .site
            .succeeds("ping", &["-c", "1", "-W", "1", "198.51.100.1"])
    );
    assert!(
        !topo
            .site
            .succeeds("curl", &["-s", "-m", "2", &format!("http://{BROKER}:80/")])
    );
    assert!(
        topo.site
            .succeeds("ping", &["-c", "1", "-W", "2", "10.20.0.10"]),
        "the backend network is routed to the site"
    );

    // SIGTERM: the agent closes the tunnel and removes its device.
    site.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        site.wait_exit(Duration::from_secs(5)),
        "agent did not stop on SIGTERM:\n{}",
        read(&topo.path("site.log"))
    );
    assert!(
        topo.site_address(4).is_none(),
        "tether0 still present after shutdown"
    );
    assert!(
        wait_for(Duration::from_secs(3), || !topo
            .broker_cli(&["sessions"])
            .unwrap()
            .contains("hospital-a")),
        "the broker still lists the session"
    );
}

#[test]
fn broker_kill_9_and_restart_the_site_comes_back_with_its_address() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::new("").unwrap();
    let state = topo.path("site-state");
    topo.enroll("hospital-b", &state).unwrap();
    let (_site, addr) = topo.up(&state, "site.log").unwrap();
    assert!(wait_for(Duration::from_secs(10), || topo.backend_pings(&addr)));

    topo.broker.as_mut().unwrap().kill(); // SIGKILL
    assert!(!topo.backend_pings(&addr));
    let killed = Instant::now();
    topo.start_broker().unwrap();
    let back = wait_for(Duration::from_secs(30), || topo.backend_pings(&addr));
    let recovery = killed.elapsed();
    assert!(
        back,
        "site did not come back:\n{}",
        read(&topo.path("site.log"))
    );
    assert_eq!(
        topo.site_address(4).as_deref(),
        Some(addr.as_str()),
        "same address after the restart"
    );
    eprintln!(
        "recovery after broker kill -9 and restart: {:.1} s",
        recovery.as_secs_f64()
    );
    // Bounded by the site's keepalive (5 s) plus reconnection.
    assert!(
        recovery < Duration::from_secs(15),
        "recovery took {recovery:?}"
    );
}

#[test]
fn revoked_site_is_cut_off_and_cannot_reconnect() {
    if !require_root() {
        return;
    }
    let topo = Topology::new("").unwrap();
    let state = topo.path("site-state");
    topo.enroll("hospital-c", &state).unwrap();
    let (_site, addr) = topo.up(&state, "site.log").unwrap();
    assert!(wait_for(Duration::from_secs(10), || topo.backend_pings(&addr)));
    let out = topo
        .broker_cli(&["site", "revoke", "--site", "hospital-c", "--region", "eu"])
        .unwrap();
    assert!(out.contains("its tunnel was closed"), "{out}");
    let revoked = Instant::now();
    assert!(
        wait_for(Duration::from_secs(2), || !topo.backend_pings(&addr)),
        "tunnel still up 2 s after revocation"
    );
    assert!(revoked.elapsed() < Duration::from_secs(3));
    // The agent tries again, is refused, asks the broker to re-attest it
    // and is refused with the broker's words; it asks again only every
    // 10 minutes (only the operator can change the answer). Still no
    // traffic.
    assert!(
        wait_for(Duration::from_secs(15), || {
            let log = read(&topo.path("site.log"));
            log.contains("this site was revoked by the operator on")
                && log.contains("asking again in 10 minutes")
        }),
        "the agent did not say why it stays refused after the revocation:\n{}",
        read(&topo.path("site.log"))
    );
    assert!(!topo.backend_pings(&addr));
    let sessions = topo.broker_cli(&["sessions"]).unwrap();
    assert!(!sessions.contains("hospital-c"), "{sessions}");
    let log = read(&topo.path("site.log"));
    assert!(
        log.contains("revoked"),
        "the site log should say it was revoked:\n{log}"
    );
    // `tether doctor` names the cause and exits non-zero.
    let (ok, report) = topo.tether(
        &["doctor", "--state-dir", &state.display().to_string()],
        &[],
    );
    println!("{report}");
    assert!(!ok, "doctor must fail for a revoked site:\n{report}");
    assert!(
        report.contains("FAIL  tls") && report.contains("revoked"),
        "{report}"
    );
}

#[test]
fn spoofed_inner_source_is_dropped_and_counted() {
    if !require_root() {
        return;
    }
    let topo = Topology::new("").unwrap();
    let state = topo.path("site-state");
    topo.enroll("hospital-d", &state).unwrap();
    let (_site, addr) = topo.up(&state, "site.log").unwrap();
    assert!(wait_for(Duration::from_secs(10), || topo.backend_pings(&addr)));
    let before = topo.metric("tether_broker_packets_dropped_total{reason=\"spoofed\"}");
    // A second address the broker never assigned, used as a source.
    topo.site
        .run(
            "ip",
            &["addr", "add", "100.64.250.250/32", "dev", "tether0"],
        )
        .unwrap();
    assert!(!topo.site.succeeds(
        "ping",
        &[
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            "-I",
            "100.64.250.250",
            "10.20.0.10"
        ]
    ));
    let after = topo.metric("tether_broker_packets_dropped_total{reason=\"spoofed\"}");
    assert!(after >= before + 3.0, "spoofed drops {before} -> {after}");
    // The real address still works.
    assert!(
        topo.site
            .succeeds("ping", &["-c", "1", "-W", "2", "10.20.0.10"])
    );
}

#[test]
fn a_site_of_a_foreign_ca_is_refused_and_gets_nothing() {
    if !require_root() {
        return;
    }
    let topo = Topology::new("").unwrap();
    // A second broker (its own CA) on the cloud host's other port.
    let other_cfg = topo.path("other.toml");
    std::fs::write(
        &other_cfg,
        format!(
            "data_dir = \"{}\"\ntrust_domain = \"tether.test\"\npublished_cidr = \"203.0.113.0/24\"\nlisten = [\"203.0.113.10:8443\"]\nadvertised = [\"203.0.113.10\"]\n[admin]\nlisten = \"127.0.0.1:7071\"\n[dns]\nlisten = []\n[[region]]\nname = \"eu\"\nipv4_pools = [\"100.64.0.0/16\"]\n",
            topo.path("other").display()
        ),
    )
    .unwrap();
    let broker = tether_netns_tests::binary("tether-broker")
        .display()
        .to_string();
    let _other = topo
        .cloud
        .spawn(
            &broker,
            &["run", "-c", &other_cfg.display().to_string()],
            Some(topo.path("other.log")),
        )
        .unwrap();
    assert!(wait_for(Duration::from_secs(10), || topo.cloud.succeeds(
        "curl",
        &["-sf", "-m", "1", "http://127.0.0.1:7071/readyz"]
    )));
    let out = topo
        .cloud
        .run(
            &broker,
            &[
                "token",
                "create",
                "--site",
                "impostor",
                "--region",
                "eu",
                "-c",
                &other_cfg.display().to_string(),
            ],
        )
        .unwrap();
    let code = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|w| w.starts_with("tt1-"))
        .unwrap()
        .to_string();
    // The firewall allows 443 only; enroll from the cloud side instead.
    let state = topo.path("impostor-state");
    topo.cloud
        .run(
            &tether_netns_tests::binary("tether").display().to_string(),
            &[
                "enroll",
                "--broker",
                "203.0.113.10:8443",
                "--token",
                &code,
                "--state-dir",
                &state.display().to_string(),
            ],
        )
        .unwrap();
    // Point it at the real broker.
    let config = state.join("tether.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("203.0.113.10:8443", "203.0.113.10:443");
    std::fs::write(
        &config,
        text.replace("\"localhost:8443\"", "\"203.0.113.10:443\""),
    )
    .unwrap();
    let leases_before = topo.broker_cli(&["sites"]).unwrap();
    let proc = topo.site.spawn(
        &tether_netns_tests::binary("tether").display().to_string(),
        &["up", "--state-dir", &state.display().to_string()],
        Some(topo.path("impostor.log")),
    );
    let _proc = proc.unwrap();
    // Its first attempt has been refused once the log names the cause.
    assert!(
        wait_for(Duration::from_secs(10), || read(&topo.path("impostor.log"))
            .contains("do not share a CA")),
        "the site log should name the cause:\n{}",
        read(&topo.path("impostor.log"))
    );
    assert!(topo.site_address(4).is_none(), "an impostor got an address");
    let (ok, report) = topo.tether(
        &["doctor", "--state-dir", &state.display().to_string()],
        &[],
    );
    println!("{report}");
    assert!(!ok, "doctor must fail for a foreign CA:\n{report}");
    assert!(report.contains("do not share a CA"), "{report}");
    assert_eq!(
        topo.broker_cli(&["sites"]).unwrap(),
        leases_before,
        "nothing registered or allocated"
    );
    assert!(!topo.broker_cli(&["sessions"]).unwrap().contains("impostor"));
}

/// Over HTTP/2 (the hospital drops UDP 443) a TCP stream from the backend
/// reaches the site byte for byte, and the agent hands the packets of each
/// read of the stream to its device together, the segments of a flow
/// coalesced: far fewer device writes than segments (the kernel takes a
/// coalesced segment only with consistent lengths and checksums, so a
/// wrong one would stall the stream).
#[test]
fn over_http2_a_tcp_stream_reaches_the_site_whole_and_coalesced() {
    if !require_root() {
        return;
    }
    const BYTES: usize = 24 << 20;
    let topo = Topology::new("").unwrap();
    topo.set_egress(Egress::TcpOnly).unwrap();
    let state = topo.path("site-state");
    topo.enroll("hospital-h2", &state).unwrap();
    let (_site, addr) = topo.up(&state, "site.log").unwrap();
    assert!(
        topo.wait_for_transport("h2", Duration::from_secs(20)),
        "{}",
        read(&topo.path("site.log"))
    );
    assert!(wait_for(Duration::from_secs(10), || topo.backend_pings(&addr)));
    let work = tempfile::tempdir().unwrap();
    let (mut sink, sink_log) = stream::start_sink(&topo.site, work.path(), 9998).unwrap();
    let before = stream::device_writes(&topo.site, "tether0");
    let sent = stream::send(&topo.backend, &addr, 9998, BYTES)
        .unwrap_or_else(|e| panic!("{e}\n{}", read(&topo.path("site.log"))));
    stream::received_whole(&mut sink, &sink_log, BYTES, &sent).unwrap();
    let writes = stream::device_writes(&topo.site, "tether0") - before;
    // At most 1,400 bytes of payload a segment inside the tunnel.
    let segments = BYTES / 1400;
    println!("{BYTES} bytes (at least {segments} segments) in {writes} device writes");
    assert!(
        writes * 4 < segments as u64,
        "{BYTES} bytes took {writes} device writes at the site: not coalesced"
    );
}
