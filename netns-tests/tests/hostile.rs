//! Hostile hospital networks, with real binaries and real nftables: UDP
//! blocked (HTTP/2 over TCP), only an HTTP proxy allowed out (tinyproxy),
//! UDP allowed again (back on HTTP/3 with the same address), and
//! `tether doctor` naming the cause each time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tether_netns_tests::topology::{Egress, PROXY, Topology, read};
use tether_netns_tests::{require_root, wait_for};

/// The site's overlay IPv4 address, once the agent has configured it (the
/// broker registers the session a moment before).
fn overlay_address(topo: &Topology) -> String {
    let mut addr = None;
    wait_for(Duration::from_secs(5), || {
        addr = topo.site_address(4);
        addr.is_some()
    });
    addr.expect("overlay address")
}

#[test]
fn udp_blocked_the_site_uses_http2_then_climbs_back_to_http3() {
    if !require_root() {
        return;
    }
    let topo = Topology::new("").unwrap();
    let state = topo.path("site-state");
    let state_arg = state.display().to_string();
    topo.enroll("hospital-udp", &state).unwrap();

    // 1. UDP 443 blocked: the site connects over HTTP/2 within 5 s.
    topo.set_egress(Egress::TcpOnly).unwrap();
    let started = Instant::now();
    let mut site = topo.spawn_up(&state, "site.log", &[]).unwrap();
    assert!(
        topo.wait_for_transport("h2", Duration::from_secs(5)),
        "no HTTP/2 session within 5 s:\n{}",
        read(&topo.path("site.log"))
    );
    println!(
        "UDP blocked: connected over HTTP/2 in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let addr = overlay_address(&topo);
    assert!(
        wait_for(Duration::from_secs(10), || topo.backend_pings(&addr)),
        "backend cannot ping {addr} over HTTP/2:\n{}",
        read(&topo.path("site.log"))
    );
    assert!(topo.metric("tether_broker_transport_changes_total{change=\"fallback\"}") == 0.0);

    // Doctor names the cause, and the site is not blocked (exit 0).
    let (ok, report) = topo.tether(&["doctor", "--state-dir", &state_arg], &[]);
    println!("{report}");
    assert!(ok, "doctor must exit 0 when HTTP/2 works:\n{report}");
    assert!(report.contains("UDP 443 looks blocked"), "{report}");
    assert!(report.contains("can connect, over HTTP/2"), "{report}");

    // 2. The agent remembers the rung: restarted, it is back on HTTP/2
    // without waiting for HTTP/3 first.
    site.kill();
    assert!(wait_for(Duration::from_secs(10), || topo.sessions_on("h2") == 0.0));
    let restarted = Instant::now();
    let mut site = topo.spawn_up(&state, "site2.log", &[]).unwrap();
    assert!(
        topo.wait_for_transport("h2", Duration::from_secs(5)),
        "{}",
        read(&topo.path("site2.log"))
    );
    let again = restarted.elapsed();
    println!(
        "restart on the remembered rung: HTTP/2 in {:.2} s",
        again.as_secs_f64()
    );
    assert!(
        again < Duration::from_millis(2500),
        "the remembered rung was not tried first ({again:?})"
    );

    // 3. UDP allowed again: back on HTTP/3 within 60 s, same address.
    let upgrades = topo.metric("tether_broker_transport_changes_total{change=\"upgrade\"}");
    topo.set_egress(Egress::Open).unwrap();
    let opened = Instant::now();
    assert!(
        topo.wait_for_transport("h3", Duration::from_secs(60)),
        "not back on HTTP/3 within 60 s:\n{}",
        read(&topo.path("site2.log"))
    );
    println!(
        "UDP allowed again: back on HTTP/3 in {:.1} s",
        opened.elapsed().as_secs_f64()
    );
    assert!(
        topo.metric("tether_broker_transport_changes_total{change=\"upgrade\"}") >= upgrades + 1.0
    );
    assert_eq!(topo.site_address(4).as_deref(), Some(addr.as_str()));
    assert!(
        wait_for(Duration::from_secs(10), || topo.backend_pings(&addr)),
        "backend cannot ping {addr} after the move to HTTP/3"
    );
    let (ok, report) = topo.tether(&["doctor", "--state-dir", &state_arg], &[]);
    assert!(ok, "{report}");
    assert!(report.contains("HTTP/3 (QUIC) answers"), "{report}");

    // 4. UDP blocked in the middle of a session: the agent notices the
    // silence (two keepalives and 2 s), falls back to HTTP/2 and keeps its
    // address.
    topo.set_egress(Egress::TcpOnly).unwrap();
    let blocked = Instant::now();
    assert!(
        topo.wait_for_transport("h2", Duration::from_secs(30)),
        "no fallback to HTTP/2 within 30 s of UDP being blocked:\n{}",
        read(&topo.path("site2.log"))
    );
    println!(
        "UDP blocked mid-session: on HTTP/2 after {:.1} s",
        blocked.elapsed().as_secs_f64()
    );
    assert_eq!(topo.site_address(4).as_deref(), Some(addr.as_str()));
    assert!(
        wait_for(Duration::from_secs(10), || topo.backend_pings(&addr)),
        "backend cannot ping {addr} after the fallback"
    );
    site.kill();
}

#[test]
fn only_a_proxy_may_reach_out() {
    if !require_root() {
        return;
    }
    let topo = Topology::new("").unwrap();
    let state = topo.path("site-state");
    let state_arg = state.display().to_string();
    topo.enroll("hospital-proxy", &state).unwrap();
    topo.set_egress(Egress::ProxyOnly).unwrap();
    let _proxy = topo.start_proxy().unwrap();

    // Without the proxy the site is blocked, and doctor says why.
    let (ok, report) = topo.tether(&["doctor", "--state-dir", &state_arg], &[]);
    println!("{report}");
    assert!(!ok, "doctor must fail when nothing gets out:\n{report}");
    assert!(report.contains("UDP 443 looks blocked"), "{report}");
    assert!(report.contains("TCP 443 looks blocked"), "{report}");
    assert!(
        report.contains("no broker answers on UDP 443, TCP 443"),
        "{report}"
    );

    // With HTTPS_PROXY the site connects through tinyproxy.
    let env = [("HTTPS_PROXY", PROXY)];
    let started = Instant::now();
    let mut site = topo.spawn_up(&state, "site.log", &env).unwrap();
    assert!(
        topo.wait_for_transport("h2-proxy", Duration::from_secs(30)),
        "no session through the proxy:\n{}\ntinyproxy:\n{}",
        read(&topo.path("site.log")),
        read(&topo.path("tinyproxy.log"))
    );
    println!(
        "through the proxy in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let addr = overlay_address(&topo);
    assert!(
        wait_for(Duration::from_secs(10), || topo.backend_pings(&addr)),
        "backend cannot ping {addr} through the proxy"
    );
    assert!(
        read(&topo.path("tinyproxy.log")).contains("203.0.113.10"),
        "tinyproxy did not carry the connection:\n{}",
        read(&topo.path("tinyproxy.log"))
    );
    let (ok, report) = topo.tether(&["doctor", "--state-dir", &state_arg], &env);
    println!("{report}");
    assert!(ok, "{report}");
    assert!(report.contains("connects to the broker"), "{report}");
    assert!(
        report.contains("can connect, over HTTP/2 through the HTTP proxy"),
        "{report}"
    );
    site.kill();

    // A new site enrolls through the proxy too (`--proxy`), which keeps the
    // proxy in its configuration: `tether up` then needs no environment.
    let out = topo
        .broker_cli(&[
            "token",
            "create",
            "--site",
            "hospital-proxy-2",
            "--region",
            "eu",
        ])
        .unwrap();
    let code = out
        .split_whitespace()
        .find(|w| w.starts_with("tt1-"))
        .unwrap()
        .to_string();
    let state2 = topo.path("site2-state");
    let state2_arg = state2.display().to_string();
    let (ok, out) = topo.tether(
        &[
            "enroll",
            "--broker",
            tether_netns_tests::topology::BROKER,
            "--token",
            &code,
            "--state-dir",
            &state2_arg,
            "--proxy",
            PROXY,
        ],
        &[],
    );
    assert!(ok, "enrollment through the proxy failed:\n{out}");
    let config = std::fs::read_to_string(state2.join("tether.toml")).unwrap();
    assert!(config.contains(PROXY), "{config}");
    let _site2 = topo.spawn_up(&state2, "site2.log", &[]).unwrap();
    assert!(
        topo.wait_for_transport("h2-proxy", Duration::from_secs(30)),
        "the second site did not connect through the configured proxy:\n{}",
        read(&topo.path("site2.log"))
    );

    // The firewall table tether prints loads into nftables as it is, and
    // its two rules load into a chain of the firewall's own.
    let (ok, table) = topo.tether(
        &[
            "firewall-rule",
            "--format",
            "nftables",
            "--state-dir",
            &state_arg,
        ],
        &[],
    );
    assert!(ok && table.contains("203.0.113.0/24"), "{table}");
    let file = topo.path("table.nft");
    std::fs::write(&file, &table).unwrap();
    assert!(
        topo.fw
            .succeeds("nft", &["-c", "-f", &file.display().to_string()]),
        "nft rejects the printed table:\n{table}"
    );
    let (ok, rule) = topo.tether(
        &[
            "firewall-rule",
            "--format",
            "nftables-rules",
            "--state-dir",
            &state_arg,
        ],
        &[],
    );
    assert!(ok && rule.contains("203.0.113.0/24"), "{rule}");
    let file = topo.path("rule.nft");
    std::fs::write(
        &file,
        format!(
            "table inet tether_check {{\n chain forward {{\n type filter hook forward priority 0; policy drop;\n{rule}\n }}\n}}\n"
        ),
    )
    .unwrap();
    assert!(
        topo.fw
            .succeeds("nft", &["-c", "-f", &file.display().to_string()]),
        "nft rejects the printed rule:\n{rule}"
    );
}
