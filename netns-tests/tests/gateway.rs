//! Backends in another cloud reach sites through a gateway:
//!
//! ```text
//! [backend] -- [gateway node: TUN + routes] == WireGuard == [cloud: broker] == CONNECT-IP == [hospital-fw] -- [site]
//! ```
//!
//! Real binaries (`tether-gateway`, `tether-broker`, `tether`), real TUN
//! devices and routing tables; the stock-peer test runs `wg-quick` with
//! wireguard-go and `wg` from Debian.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use tether_netns_tests::topology::{BROKER, Cloud, Gateway, Topology, gateway_entry, read};
use tether_netns_tests::{binary, require_root, stream, wait_for};

const TABLE: u32 = 7300;

/// The generation of the route set a gateway last applied, from the
/// `routes.json` in its state directory.
fn live_generation(state: &Path) -> Option<u64> {
    let text = std::fs::read(state.join("routes.json")).ok()?;
    serde_json::from_slice::<serde_json::Value>(&text).ok()?["generation"].as_u64()
}

#[test]
fn backend_reaches_a_site_through_its_regions_gateway_and_not_through_another() {
    if !require_root() {
        return;
    }
    // Keys first: the broker's configuration registers them.
    let work = tempfile::tempdir().unwrap();
    let eu_gw = Gateway::new(work.path(), "gw-eu", "eu").unwrap();
    let us_gw = Gateway::new(work.path(), "gw-us", "us").unwrap();
    let extra = format!(
        "\n[[region]]\nname = \"us\"\nipv4_pools = [\"100.80.0.0/16\"]\n{}{}",
        eu_gw.broker_entry("10.31.0.0/24"),
        us_gw.broker_entry("10.32.0.0/24"),
    );
    let topo = Topology::new(&extra).unwrap();
    let broker_key = topo.broker_cli(&["gateway", "key"]).unwrap();
    assert_eq!(broker_key.trim().len(), 44, "broker key: {broker_key:?}");

    let eu = Cloud::new(&topo, 1).unwrap();
    let us = Cloud::new(&topo, 2).unwrap();
    let mut gateways = Vec::new();
    for (cloud, gw) in [(&eu, &eu_gw), (&us, &us_gw)] {
        gw.configure(&topo, "").unwrap();
        // Preflight on a clean node with forwarding on: nothing to report.
        let pre = cloud
            .node
            .command(&binary("tether-gateway").display().to_string())
            .args(["preflight", "-c", &gw.config.display().to_string()])
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&pre.stdout).to_string();
        assert!(pre.status.success(), "preflight on {}:\n{report}", gw.id);
        assert!(report.contains("ok    mtu"), "{report}");
        assert!(report.contains("ok    brokers"), "{report}");
        let (proc, log) = gw
            .start(cloud)
            .unwrap_or_else(|e| panic!("{e}\nbroker:\n{}", read(&topo.path("broker.log"))));
        gateways.push((proc, log, gw.config.clone()));
    }
    // Now the gateway holds its rule at the priority it reported free.
    let rules = eu.node.run("ip", &["rule", "show"]).unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout).to_string();
    assert!(rules.contains("7300:\tfrom all lookup 7300"), "{rules}");
    let gateways_out = topo.broker_cli(&["gateways"]).unwrap();
    assert!(gateways_out.contains("gw-eu"), "{gateways_out}");

    // A site of region eu comes up: its route appears at the eu gateway.
    let state = topo.path("site-state");
    topo.enroll("lab-1", &state).unwrap();
    let started = Instant::now();
    let (mut site, addr) = topo.up(&state, "site.log").unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || eu.table(TABLE).contains(&addr)),
        "route to {addr} missing at gw-eu: {}\n{}",
        eu.table(TABLE),
        read(&gateways[0].1)
    );
    println!(
        "route for {addr} at the gateway {:.2} s after `tether up` started",
        started.elapsed().as_secs_f64()
    );

    // Ping and HTTP from the backend behind gw-eu, by address.
    assert!(
        wait_for(Duration::from_secs(10), || eu.backend_pings(&addr)),
        "backend behind gw-eu cannot ping {addr}:\n{}",
        read(&topo.path("broker.log"))
    );
    let _web = topo.serve_page("hello via the gateway\n").unwrap();
    let mut page = String::new();
    let got = wait_for(Duration::from_secs(10), || {
        page = eu
            .backend
            .command("curl")
            .args(["-s", "-m", "2", &format!("http://{addr}:8080/index.html")])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        page.contains("hello via the gateway")
    });
    assert!(got, "no page through the gateway: {page:?}");
    // The site reaches the backend too (the gateway's prefix is routed).
    assert!(
        topo.site
            .succeeds("ping", &["-c", "1", "-W", "2", &eu.backend_addr]),
        "site cannot ping the backend behind gw-eu"
    );

    // The gateway's device goes down and up (an operator, a network
    // manager): the kernel drops the routes through it and does not bring
    // them back; the gateway adds them again by itself.
    eu.node
        .run("ip", &["link", "set", "tether-gw0", "down"])
        .unwrap();
    assert!(!eu.table(TABLE).contains(&addr), "{}", eu.table(TABLE));
    eu.node
        .run("ip", &["link", "set", "tether-gw0", "up"])
        .unwrap();
    let flapped = Instant::now();
    assert!(
        wait_for(Duration::from_secs(15), || eu.table(TABLE).contains(&addr)),
        "route to {addr} not restored at gw-eu after the device went down and up: {}\n{}",
        eu.table(TABLE),
        read(&gateways[0].1)
    );
    println!(
        "route for {addr} back at the gateway {:.2} s after its device came up again",
        flapped.elapsed().as_secs_f64()
    );
    assert!(
        wait_for(Duration::from_secs(10), || eu.backend_pings(&addr)),
        "backend behind gw-eu cannot ping {addr} after the device flapped"
    );
    assert!(
        read(&gateways[0].1).contains("are added again"),
        "{}",
        read(&gateways[0].1)
    );
    // Written to files, the three programs' logs carry no colour codes.
    for log in [
        gateways[0].1.clone(),
        topo.path("broker.log"),
        topo.path("site.log"),
    ] {
        let text = read(&log);
        assert!(!text.is_empty(), "{} is empty", log.display());
        assert!(
            !text.contains('\u{1b}'),
            "colour codes in {}",
            log.display()
        );
    }

    // The live route set drives the Cilium resources.
    let cilium = eu
        .node
        .command(&binary("tether-gateway").display().to_string())
        .args(["cilium", "-c", &gateways[0].2.display().to_string()])
        .output()
        .unwrap();
    let yaml = String::from_utf8_lossy(&cilium.stdout).to_string();
    assert!(cilium.status.success(), "{yaml}");
    assert!(yaml.contains("name: tether-site-lab-1"), "{yaml}");
    assert!(yaml.contains(&format!("\"{addr}/32\"")), "{yaml}");

    // Region us: no route to the eu site, and forcing one does not help.
    // The broker numbers the route sets of all gateways alike: once gw-us
    // has applied the generation that brought the site to gw-eu, it has
    // seen everything it would ever get for it.
    let eu_generation = live_generation(&work.path().join("gw-eu")).expect("gw-eu's routes.json");
    assert!(
        wait_for(Duration::from_secs(10), || {
            live_generation(&work.path().join("gw-us")).is_some_and(|g| g >= eu_generation)
        }),
        "gw-us never applied route set {eu_generation}:\n{}",
        read(&gateways[1].1)
    );
    assert!(
        !us.table(TABLE).contains(&addr),
        "gw-us got a route to an eu site: {}",
        us.table(TABLE)
    );
    us.node
        .run(
            "ip",
            &[
                "route",
                "add",
                &format!("{addr}/32"),
                "dev",
                "tether-gw0",
                "table",
                &TABLE.to_string(),
            ],
        )
        .unwrap();
    let refused_before = topo.metric("tether_broker_packets_dropped_total{reason=\"residency\"}");
    assert!(
        !us.backend_pings(&addr),
        "a backend in region us reached an eu site"
    );
    assert!(!us.backend_pings(&addr));
    let refused_after = topo.metric("tether_broker_packets_dropped_total{reason=\"residency\"}");
    assert!(
        refused_after >= refused_before + 2.0,
        "the broker did not refuse on residency: {refused_before} -> {refused_after}"
    );

    // The site goes: its route goes from the eu gateway.
    site.kill();
    let gone = Instant::now();
    assert!(
        wait_for(Duration::from_secs(30), || !eu.table(TABLE).contains(&addr)),
        "route to {addr} stayed at gw-eu after the site left: {}",
        eu.table(TABLE)
    );
    println!(
        "route for {addr} removed at the gateway {:.2} s after the site was killed",
        gone.elapsed().as_secs_f64()
    );

    // SIGTERM: the gateway removes its rule.
    let (proc, log, _) = &mut gateways[0];
    proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(proc.wait_exit(Duration::from_secs(10)), "{}", read(log));
    let rules = eu.node.run("ip", &["rule", "show"]).unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout).to_string();
    assert!(!rules.contains("lookup 7300"), "rule left behind: {rules}");
}

#[test]
fn a_stock_wireguard_peer_stands_in_for_the_gateway() {
    if !require_root() {
        return;
    }
    if tether_netns_tests::run(
        "sh",
        &["-c", "command -v wg-quick && command -v wireguard-go"],
    )
    .is_err()
    {
        panic!("wg-quick and wireguard-go are needed (Debian: wireguard-tools wireguard-go)");
    }
    let work = tempfile::tempdir().unwrap();
    let private = work.path().join("stock.key");
    let key = tether_netns_tests::run("wg", &["genkey"]).unwrap();
    std::fs::write(&private, &key.stdout).unwrap();
    let public =
        tether_netns_tests::run("sh", &["-c", &format!("wg pubkey < {}", private.display())])
            .unwrap();
    let public = String::from_utf8_lossy(&public.stdout).trim().to_string();
    let topo = Topology::new(&gateway_entry("gw-stock", "eu", &public, "10.33.0.0/24")).unwrap();
    let cloud = Cloud::new(&topo, 3).unwrap();

    // The broker prints the peer's configuration.
    let conf = topo
        .broker_cli(&[
            "gateway",
            "wg-quick",
            "--id",
            "gw-stock",
            "--private-key-file",
            &private.display().to_string(),
        ])
        .unwrap();
    assert!(conf.contains("[Peer]"), "{conf}");
    let file = work.path().join("tg0.conf");
    std::fs::write(&file, &conf).unwrap();
    let up = cloud
        .node
        .command("wg-quick")
        .args(["up", &file.display().to_string()])
        .env("WG_QUICK_USERSPACE_IMPLEMENTATION", "wireguard-go")
        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "wg-quick up failed:\n{}{}\n{conf}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );
    let show = cloud.node.run("wg", &["show", "tg0"]).unwrap();
    let show = String::from_utf8_lossy(&show.stdout).to_string();
    assert!(show.contains(&format!("public key: {public}")), "{show}");

    // Before any traffic the peer's handshake and keepalive
    // (PersistentKeepalive) show as WireGuard bytes, as `wg show` counts
    // them, while no IP packet came through the tunnel.
    let mut gateway = serde_json::Value::Null;
    assert!(
        wait_for(Duration::from_secs(15), || {
            let all = topo.admin_get("/v1/gateways");
            gateway = all
                .as_array()
                .and_then(|g| g.iter().find(|g| g["id"] == "gw-stock"))
                .cloned()
                .unwrap_or(all);
            gateway["wire_rx_bytes"].as_u64().unwrap_or(0) > 0
                && gateway["wire_tx_bytes"].as_u64().unwrap_or(0) > 0
        }),
        "the stock peer's handshake does not show in the broker's counters: {gateway}"
    );
    assert_eq!(gateway["rx_packets"], 0, "{gateway}");
    assert!(gateway["last_handshake_secs"].is_u64(), "{gateway}");
    let listed = topo.broker_cli(&["gateways"]).unwrap();
    let row = listed
        .lines()
        .find(|l| l.starts_with("gw-stock"))
        .unwrap_or_default();
    assert!(
        row.split_whitespace()
            .rev()
            .take(2)
            .all(|b| b.parse::<u64>().is_ok_and(|b| b > 0)),
        "{listed}"
    );

    let state = topo.path("site-state");
    topo.enroll("lab-2", &state).unwrap();
    let (_site, addr) = topo.up(&state, "site.log").unwrap();
    assert!(
        wait_for(Duration::from_secs(15), || cloud.backend_pings(&addr)),
        "backend behind the stock peer cannot ping {addr}:\n{}\n{}",
        String::from_utf8_lossy(&cloud.node.run("wg", &["show"]).unwrap().stdout),
        read(&topo.path("broker.log"))
    );
    let ok = cloud.backend.succeeds(
        "sh",
        &["-c", &format!("ping -c 3 -i 0.2 -W 1 {addr} >/dev/null")],
    );
    assert!(ok, "pings through the stock peer were lost");
    // The peer's own packets leave from the Address in its prefix, not as
    // spoofed sources.
    let ok = cloud.node.succeeds(
        "sh",
        &["-c", &format!("ping -c 3 -i 0.2 -W 1 {addr} >/dev/null")],
    );
    let spoofed = topo.metric("tether_broker_packets_dropped_total{reason=\"spoofed\"}");
    assert!(
        ok,
        "the stock peer's own pings were lost (spoofed drops {spoofed})\n{conf}"
    );
    let _ = cloud
        .node
        .command("wg-quick")
        .args(["down", &file.display().to_string()])
        .output();
}

/// A broker with one WireGuard gateway of region eu (cloud 1, prefix
/// 10.31.0.0/24) and an enrolled site the gateway's backend pings: the
/// working directory, the topology, the cloud, the gateway process and its
/// log, the site's agent and its address.
fn site_behind_a_gateway() -> (
    tempfile::TempDir,
    Topology,
    Cloud,
    (tether_netns_tests::Proc, std::path::PathBuf),
    tether_netns_tests::Proc,
    String,
) {
    let work = tempfile::tempdir().unwrap();
    let gw = Gateway::new(work.path(), "gw-eu", "eu").unwrap();
    let topo = Topology::new(&gw.broker_entry("10.31.0.0/24")).unwrap();
    let eu = Cloud::new(&topo, 1).unwrap();
    gw.configure(&topo, "").unwrap();
    let (gateway, log) = gw.start(&eu).unwrap();
    let state = topo.path("site-state");
    topo.enroll("lab-1", &state).unwrap();
    let (site, addr) = topo.up(&state, "site.log").unwrap();
    assert!(
        wait_for(Duration::from_secs(15), || eu.backend_pings(&addr)),
        "backend behind gw-eu cannot ping {addr}:\n{}\n{}",
        read(&log),
        read(&topo.path("broker.log"))
    );
    (work, topo, eu, (gateway, log), site, addr)
}

/// ICMP errors the broker makes for a backend behind a WireGuard gateway
/// (packet-too-big for a packet the site's tunnel cannot carry,
/// destination-unreachable for an address no site holds) travel
/// back through the WireGuard session and reach the backend: the gateway
/// node forwards them, it does not drop them as martians.
#[test]
fn backend_behind_a_wireguard_gateway_gets_packet_too_big_and_unreachable() {
    if !require_root() {
        return;
    }
    let (_work, topo, eu, (_gateway, _log), _site, addr) = site_behind_a_gateway();

    // 1399 bytes fit the gateway's WireGuard device (1420) but not the
    // site's tunnel: the broker answers with fragmentation-needed, which
    // must come back through the gateway.
    let sent = topo.metric("tether_broker_icmp_errors_sent_total");
    let out = eu.backend.transcript(
        "ping",
        &["-c", "1", "-W", "2", "-M", "do", "-s", "1371", &addr],
    );
    assert!(
        out.contains("Frag needed") || out.contains("mtu"),
        "no fragmentation-needed error behind the WireGuard gateway for a 1399-byte DF packet to {addr} \
         (broker sent {} errors):\n{out}",
        topo.metric("tether_broker_icmp_errors_sent_total") - sent
    );

    // An address of the site pool that no site holds: the broker answers
    // destination-unreachable, which comes back through the gateway too.
    let sent = topo.metric("tether_broker_icmp_errors_sent_total");
    let out = eu
        .backend
        .transcript("ping", &["-c", "1", "-W", "2", "100.64.200.200"]);
    assert!(
        out.contains("From ") && out.contains("Unreachable"),
        "no destination-unreachable behind the WireGuard gateway for an address no site holds \
         (broker sent {} errors):\n{out}",
        topo.metric("tether_broker_icmp_errors_sent_total") - sent
    );
    assert!(topo.metric("tether_broker_icmp_errors_sent_total") > sent);
}

/// Datagrams that queue up at a gateway while it is off the CPU all reach
/// the backend: one receive can return hundreds of packets (the broker
/// sends them in coalesced runs), more than one device write takes, and
/// the gateway writes as often as it needs to instead of losing the rest.
#[test]
fn a_burst_queued_at_the_gateway_reaches_the_backend_whole() {
    if !require_root() {
        return;
    }
    const COUNT: usize = 2000;
    let (work, topo, eu, (gateway, log), _site, _addr) = site_behind_a_gateway();

    // A sink on the backend: counts datagrams until 2 s without one.
    let (mut sink_proc, sink_log) = stream::start_script(
        &eu.backend,
        work.path(),
        "sink",
        "import socket, sys\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)  # SO_RCVBUFFORCE\n\
         s.bind(('0.0.0.0', 9999))\n\
         print('ready', flush=True)\n\
         n = 0\n\
         s.settimeout(60)\n\
         s.recv(2048); n += 1\n\
         s.settimeout(2)\n\
         try:\n\
         \x20   while True:\n\
         \x20       s.recv(2048); n += 1\n\
         except socket.timeout:\n\
         \x20   pass\n\
         print('received', n, flush=True)\n",
        &[],
    )
    .unwrap();

    // Freeze the gateway, send the burst from the site, and wait until
    // the broker has handed it over (the gateway's socket stops filling).
    gateway.signal(nix::sys::signal::Signal::SIGSTOP);
    // The site's device queue holds the whole burst, so the test sender
    // is not held back by it (it would drop at a full queue).
    topo.site
        .run("ip", &["link", "set", "tether0", "txqueuelen", "10000"])
        .unwrap();
    let send = format!(
        "import socket, time\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for i in range({COUNT}):\n\
         \x20   while True:\n\
         \x20       try:\n\
         \x20           s.sendto(b'x' * 1200, ('{}', 9999)); break\n\
         \x20       except BlockingIOError:\n\
         \x20           time.sleep(0.001)\n",
        eu.backend_addr
    );
    let sent = topo.site.run("python3", &["-c", &send]).unwrap();
    assert!(sent.status.success(), "{sent:?}");
    let queued = || -> u64 {
        eu.node
            .run("ss", &["-uanH"])
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0)
    };
    let mut last = (0, Instant::now());
    let settled = wait_for(Duration::from_secs(20), || {
        let now = queued();
        if now != last.0 {
            last = (now, Instant::now());
        }
        now > 0 && last.1.elapsed() > Duration::from_millis(500)
    });
    gateway.signal(nix::sys::signal::Signal::SIGCONT);
    assert!(settled, "nothing queued at the gateway");
    assert!(
        sink_proc.wait_exit(Duration::from_secs(70)),
        "sink did not finish"
    );
    let received: usize = read(&sink_log)
        .lines()
        .find_map(|l| l.strip_prefix("received ")?.trim().parse().ok())
        .unwrap_or(0);
    println!("{received} of {COUNT} datagrams reached the backend");
    // Where they were lost, if they were: the UDP counters of the gateway
    // node and the backend, and the broker's drop reasons.
    let mut counters = String::new();
    for (name, ns) in [("gateway node", &eu.node), ("backend", &eu.backend)] {
        let snmp = ns.run("cat", &["/proc/net/snmp"]).unwrap();
        for line in String::from_utf8_lossy(&snmp.stdout).lines() {
            if line.starts_with("Udp:") {
                counters.push_str(&format!("{name}: {line}\n"));
            }
        }
    }
    assert_eq!(
        received,
        COUNT,
        "datagrams lost after the gateway's pause\n{counters}broker drops:\n{}\n{}",
        topo.metrics_text()
            .lines()
            .filter(|l| l.starts_with("tether_broker_packets_dropped_total"))
            .collect::<Vec<_>>()
            .join("\n"),
        read(&log)
    );
}

/// A TCP stream from the site reaches the backend through the gateway
/// byte for byte, and the gateway hands its segments to the device
/// coalesced: far fewer device writes than packets it took from the
/// broker (the kernel accepts a coalesced segment only with consistent
/// lengths and checksums, so a wrong one would stall the stream).
#[test]
fn a_tcp_stream_from_the_site_reaches_the_backend_whole_and_coalesced() {
    if !require_root() {
        return;
    }
    const BYTES: usize = 24 << 20;
    let work = tempfile::tempdir().unwrap();
    let gw = Gateway::new(work.path(), "gw-eu", "eu").unwrap();
    let topo = Topology::new(&gw.broker_entry("10.31.0.0/24")).unwrap();
    let eu = Cloud::new(&topo, 1).unwrap();
    gw.configure(&topo, "[metrics]\nlisten = \"127.0.0.1:9469\"\n")
        .unwrap();
    let (_gateway, log) = gw.start(&eu).unwrap();
    let state = topo.path("site-state");
    topo.enroll("lab-1", &state).unwrap();
    let (_site, addr) = topo.up(&state, "site.log").unwrap();
    assert!(
        wait_for(Duration::from_secs(15), || eu.backend_pings(&addr)),
        "backend behind gw-eu cannot ping {addr}:\n{}",
        read(&log)
    );

    // The backend counts and hashes what arrives; the site sends a
    // pseudo-random stream and hashes what it sent.
    let (mut sink, sink_log) = stream::start_sink(&eu.backend, work.path(), 9998).unwrap();
    let device_writes = || stream::device_writes(&eu.node, "tether-gw0");
    let from_broker = "tether_gateway_packets_total{direction=\"from_broker\"}";
    let (writes_before, packets_before) = (device_writes(), gateway_metric(&eu, from_broker));
    let sent = stream::send(&topo.site, &eu.backend_addr, 9998, BYTES)
        .unwrap_or_else(|e| panic!("{e}\n{}", read(&log)));
    stream::received_whole(&mut sink, &sink_log, BYTES, &sent).unwrap();
    let writes = device_writes() - writes_before;
    let packets = gateway_metric(&eu, from_broker) - packets_before;
    println!("{packets} packets from the broker in {writes} device writes");
    assert!(
        packets >= (BYTES / 1500) as f64,
        "{packets} packets counted from the broker for {BYTES} bytes"
    );
    assert!(
        (writes as f64) * 4.0 < packets,
        "{packets} packets from the broker took {writes} device writes: not coalesced"
    );
}

/// The sum of the gateway's metric lines that start with `prefix`, from
/// its `[metrics]` listener on the node's loopback.
fn gateway_metric(cloud: &Cloud, prefix: &str) -> f64 {
    let out = cloud
        .node
        .run("curl", &["-s", "http://127.0.0.1:9469/metrics"])
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    out.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Forged WireGuard datagrams that reach the gateway from the broker's
/// address are refused, counted by reason and logged in plain words;
/// datagrams from any other address are counted as not from the broker.
/// The session with the broker stays up.
#[test]
fn forged_wireguard_datagrams_are_counted_at_the_gateway() {
    if !require_root() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let gw = Gateway::new(work.path(), "gw-eu", "eu").unwrap();
    let topo = Topology::new(&gw.broker_entry("10.31.0.0/24")).unwrap();
    let eu = Cloud::new(&topo, 1).unwrap();
    gw.configure(&topo, "[metrics]\nlisten = \"127.0.0.1:9469\"\n")
        .unwrap();
    let (_gateway, log) = gw.start(&eu).unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || eu
            .node
            .succeeds("curl", &["-sf", "http://127.0.0.1:9469/metrics"])),
        "the gateway's metrics listener does not answer:\n{}",
        read(&log)
    );

    // The gateway's UDP port, from its socket.
    let ss = eu.node.run("ss", &["-uanpH"]).unwrap();
    let ss = String::from_utf8_lossy(&ss.stdout).to_string();
    let port: u16 = ss
        .lines()
        .find(|l| l.contains("tether-gateway"))
        .and_then(|l| {
            l.split_whitespace()
                .nth(3)?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no UDP socket of tether-gateway:\n{ss}"));

    let refused = "tether_gateway_wireguard_refused_total";
    let before = gateway_metric(&eu, refused);
    // From the broker's own address: a handshake initiation not sealed
    // for the gateway's key, and a data packet of no session.
    let forge = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.bind(('{BROKER}', 0))\n\
         s.sendto(bytes([1, 0, 0, 0]) + b'\\x55' * 144, ('198.18.1.2', {port}))\n\
         s.sendto(bytes([4, 0, 0, 0, 9, 9, 9, 9]) + bytes(8) + b'\\xaa' * 48, ('198.18.1.2', {port}))\n"
    );
    let sent = topo.cloud.run("python3", &["-c", &forge]).unwrap();
    assert!(sent.status.success(), "{sent:?}");
    assert!(
        wait_for(Duration::from_secs(5), || gateway_metric(&eu, refused)
            >= before + 2.0),
        "forged datagrams not counted (refused {} before, {} now):\n{}",
        before,
        gateway_metric(&eu, refused),
        read(&log)
    );
    assert!(
        gateway_metric(
            &eu,
            "tether_gateway_wireguard_refused_total{reason=\"invalid_mac\"}"
        ) >= 1.0
    );
    assert!(
        wait_for(Duration::from_secs(5), || read(&log)
            .contains("was not sealed for this gateway's key")),
        "{}",
        read(&log)
    );

    // From a backend host: not the broker, ignored and counted.
    let other = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.sendto(bytes([4, 0, 0, 0]) + bytes(60), ('198.18.1.2', {port}))\n"
    );
    let sent = eu.backend.run("python3", &["-c", &other]).unwrap();
    assert!(sent.status.success(), "{sent:?}");
    assert!(
        wait_for(Duration::from_secs(5), || gateway_metric(
            &eu,
            "tether_gateway_packets_dropped_total{reason=\"not_from_broker\"}"
        ) >= 1.0),
        "{}",
        read(&log)
    );

    // The session with the broker was not disturbed.
    assert!(
        !read(&log).contains("no WireGuard handshake"),
        "{}",
        read(&log)
    );
}
