//! A hospital LAN behind a site, mapped 1:1 into the overlay: a backend
//! fetches a page from a LAN host through the mapped address.
//!
//! ```text
//!  backend 10.20.0.10 ── cloud (broker, local gateway) ── wan ── hospital-fw 192.168.1.1
//!                                                                     │ lan
//!                                              site: bridge br-lan 192.168.1.10, tether up
//!                                                    ├── eth0 (to the firewall)
//!                                                    └── host20 ── lanhost eth0 192.168.1.20/24
//!                                                                  web :8080, also 192.168.1.40
//! ```
//!
//! The rest of the topology (firewall, broker, backend) is
//! `tether_netns_tests::topology`. The second test maps an IPv6 LAN
//! (fd00:1::/64, host fd00:1::20) onto a /64 of the region's pool. The
//! third adds a second hospital,
//! numbered exactly like the first, behind its own firewall:
//!
//! ```text
//!  wan 198.51.100.5/30 ── hospital-fw2 198.51.100.6 | 192.168.1.1 ── site2 192.168.1.10 (br-lan)
//!   (TCP 443 out only: HTTP/2)                                     └── lanhost2 192.168.1.20
//! ```
//!
//! The backend also finds each analyser by name
//! (`192-168-1-20.lan.<site>.eu.tether.internal`, and PTR back). Between
//! the two hospitals the access policy decides: denied by default
//! (counted as `policy`), then allowed by a rule loaded on SIGHUP.
//!
//! The fourth changes a site's `lans` the way an operator does (edit
//! `tether.toml`, restart `tether up`): a removed LAN loses its route and
//! its reachability at once, its mapping stays reserved (`release_at`),
//! and put back it gets the same mapped prefix; a new LAN needs no new
//! enrollment; a LAN past the site's limit is refused, and the agent's
//! report of it appears in the site's event timeline. The fifth changes
//! `lans` with SIGHUP instead, over the same connection, and sends a file
//! that does not validate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::Duration;

use ipnet::{Ipv4Net, Ipv6Net};
use tether_netns_tests::topology::{Egress, Topology, firewall_rules, overlay_address, read};
use tether_netns_tests::{NetNs, Proc, binary, lan, link, require_root, wait_for};

/// Puts the site's LAN interface on a bridge with a new LAN host namespace
/// (192.168.1.20 and 192.168.1.40) and returns that namespace.
fn add_lan_host(site: &NetNs) -> NetNs {
    lan::add_lan_host(site, &["192.168.1.20/24", "192.168.1.40/24"]).unwrap()
}

/// Serves a page from the LAN host on port 8080; its access log (with
/// each client's address) goes to `log`.
fn serve(topo: &Topology, host: &NetNs, content: &str, log: &str) -> Proc {
    topo.serve_http(host, "0.0.0.0", content, log)
}

/// Puts `lines` at the top of the site's configuration (which enrolment
/// wrote).
fn configure(state: &Path, lines: &str) {
    let path = state.join("tether.toml");
    let mut text = read(&path);
    text = text
        .lines()
        .filter(|l| !l.starts_with("lans") && !l.starts_with("lan_source"))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&path, format!("{lines}\n{text}\n")).unwrap();
}

/// The prefix the broker routes to `site` for a LAN of length `len`, once
/// it does (`tether-broker routes` shows it as `site-lan`).
fn mapped_lan(topo: &Topology, site: &str, len: u8) -> Ipv4Net {
    let mut found = None;
    let routed = wait_for(Duration::from_secs(15), || {
        let table = topo.broker_cli(&["routes"]).unwrap_or_default();
        found = table
            .lines()
            .filter(|l| l.contains("site-lan") && l.contains(site))
            .filter_map(|l| l.split_whitespace().next()?.parse::<Ipv4Net>().ok())
            .find(|p| p.prefix_len() == len);
        found.is_some()
    });
    assert!(
        routed,
        "no LAN route for {site}:\n{}\n{}",
        topo.broker_cli(&["routes"]).unwrap_or_default(),
        read(&topo.path("site.log"))
    );
    found.unwrap()
}

fn host_in(net: Ipv4Net, host: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) | host)
}

/// Whether the backend fetches the page at `addr` (one try, 2 s).
fn fetch(topo: &Topology, addr: Ipv4Addr) -> String {
    fetch_from(&topo.backend, addr)
}

/// The client addresses in the web server's access log.
fn clients(topo: &Topology, log: &str) -> Vec<String> {
    read(&topo.path(log))
        .lines()
        .filter(|l| l.contains("GET /index.html"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn site_tables(topo: &Topology) -> String {
    topo.site
        .command("nft")
        .args(["list", "tables"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default()
}

#[test]
fn backend_reaches_a_lan_host_through_the_mapped_prefix() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::new("").unwrap();
    let host = add_lan_host(&topo.site);
    let state = topo.path("site-state");
    topo.enroll("hospital-l", &state).unwrap();
    configure(&state, "lans = [\"192.168.1.0/24\"]");
    let (mut site, _) = topo.up(&state, "site.log").unwrap();
    let _web = serve(&topo, &host, "hello from the analyser\n", "web.log");

    // The LAN appears as a /24 of the operator's pool.
    let mapped = mapped_lan(&topo, "hospital-l", 24);
    assert!(
        "100.64.0.0/16"
            .parse::<Ipv4Net>()
            .unwrap()
            .contains(&mapped),
        "{mapped}"
    );
    let analyser = host_in(mapped, 20);
    let mut page = String::new();
    assert!(
        wait_for(Duration::from_secs(10), || {
            page = fetch(&topo, analyser);
            page.contains("hello from the analyser")
        }),
        "page not fetched through {analyser}: {page:?}\n{}",
        read(&topo.path("site.log"))
    );
    // By default the LAN host sees the edge host's own LAN address.
    let seen = clients(&topo, "web.log");
    assert!(
        !seen.is_empty() && seen.iter().all(|a| a == "192.168.1.10"),
        "{seen:?}"
    );
    assert!(site_tables(&topo).contains("tether_site_tether0"));
    // ICMP too (echo, translated with its checksum).
    assert!(topo.backend_pings(&analyser.to_string()));
    // The operator's trace of the mapped address names the site.
    let token = topo.path("broker").join("admin.token");
    let trace = topo
        .cloud
        .command(&binary("tether").display().to_string())
        .args([
            "trace",
            &analyser.to_string(),
            "--token-file",
            &token.display().to_string(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&trace.stdout).to_string();
    assert!(trace.status.success(), "{text}");
    assert!(text.contains("site hospital-l"), "{text}");
    // ... and the real LAN host behind it, with the mapping.
    assert!(
        text.contains(&format!(
            "{analyser} is 192.168.1.20 on the LAN 192.168.1.0/24 behind site hospital-l (mapped to {mapped})"
        )),
        "{text}"
    );
    // Other hosts of the exposed LAN are reachable the same way.
    assert!(fetch(&topo, host_in(mapped, 40)).contains("hello from the analyser"));
    // The real LAN address is not reachable from the backend.
    assert!(fetch(&topo, Ipv4Addr::new(192, 168, 1, 20)).is_empty());

    // The broker is killed and restarts: the agent reconnects, asks the
    // same way, and the LAN is reachable again at the same mapped prefix.
    topo.restart_broker().unwrap();
    assert_eq!(mapped_lan(&topo, "hospital-l", 24), mapped);
    assert!(
        wait_for(Duration::from_secs(30), || fetch(&topo, analyser)
            .contains("hello from the analyser")),
        "the LAN did not come back after the broker's restart:\n{}",
        read(&topo.path("site.log"))
    );

    // On exit the agent removes its table.
    site.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        site.wait_exit(Duration::from_secs(5)),
        "{}",
        read(&topo.path("site.log"))
    );
    assert!(
        !site_tables(&topo).contains("tether_site_"),
        "{}",
        site_tables(&topo)
    );
    drop(site);

    // A second hospital site on the same edge host (the first one's lease
    // of 192.168.1.0/24 stays with it) exposes only 192.168.1.16/28 and
    // keeps the overlay's source: the LAN host routes the overlay back to
    // the edge host.
    let state = topo.path("site-m-state");
    topo.enroll("hospital-m", &state).unwrap();
    configure(
        &state,
        "lans = [\"192.168.1.16/28\"]\nlan_source = \"original\"",
    );
    for net in ["100.64.0.0/16", "10.20.0.0/24"] {
        host.run("ip", &["route", "add", net, "via", "192.168.1.10"])
            .unwrap();
    }
    let (_site, _) = topo.up(&state, "site2.log").unwrap();
    let narrow = mapped_lan(&topo, "hospital-m", 28);
    assert!(!narrow.contains(&host_in(mapped, 0)) && !mapped.contains(&narrow.network()));
    let analyser = host_in(narrow, 4);
    assert!(
        wait_for(Duration::from_secs(10), || fetch(&topo, analyser)
            .contains("hello from the analyser")),
        "page not fetched through {analyser}:\n{}",
        read(&topo.path("site2.log"))
    );
    let seen = clients(&topo, "web.log");
    let last = seen.last().unwrap();
    assert_ne!(last, "192.168.1.10", "the source was rewritten: {seen:?}");
    assert!(
        last == "10.20.0.10" || last.starts_with("100.64."),
        "the backend's overlay-side address: {seen:?}"
    );
    assert!(!site_tables(&topo).contains("tether_site_"));
    // 192.168.1.40, on the same LAN host but outside the exposed /28, has
    // no mapped address, and its real address is routed nowhere in the
    // overlay: it stays unreachable while the /28 is exposed.
    assert!(fetch(&topo, "192.168.1.40".parse().unwrap()).is_empty());
    assert!(fetch(&topo, "192.168.1.20".parse().unwrap()).is_empty());
    assert!(fetch(&topo, analyser).contains("hello from the analyser"));
    // The first site is gone, and its LAN with it.
    assert!(fetch(&topo, host_in(mapped, 20)).is_empty());
}

#[test]
fn backend_reaches_an_ipv6_lan_host_through_the_mapped_prefix() {
    if !require_root() {
        return;
    }
    let topo = Topology::new("\n[dns]\nlisten = [\"10.20.0.1:53\"]\n").unwrap();
    let host = add_lan_host(&topo.site);
    topo.site
        .run(
            "ip",
            &[
                "-6",
                "addr",
                "add",
                "fd00:1::10/64",
                "dev",
                "br-lan",
                "nodad",
            ],
        )
        .unwrap();
    host.run(
        "ip",
        &["-6", "addr", "add", "fd00:1::20/64", "dev", "eth0", "nodad"],
    )
    .unwrap();
    // A mapped IPv6 LAN needs forwarding on the edge host; the agent
    // checks it and says so, it does not turn it on.
    topo.site
        .run("sysctl", &["-q", "-w", "net.ipv6.conf.all.forwarding=1"])
        .unwrap();
    let state = topo.path("site-state");
    topo.enroll("hospital-v6", &state).unwrap();
    configure(&state, "lans = [\"fd00:1::/64\"]");
    let (_site, _) = topo.up(&state, "site.log").unwrap();
    let _web = topo.serve_http(&host, "::", "analyser on IPv6\n", "web.log");

    // The /64 appears as a /64 of the region's IPv6 pool (NPTv6 style).
    let mut mapped = None;
    assert!(
        wait_for(Duration::from_secs(15), || {
            let table = topo.broker_cli(&["routes"]).unwrap_or_default();
            mapped = table
                .lines()
                .filter(|l| l.contains("site-lan") && l.contains("hospital-v6"))
                .filter_map(|l| l.split_whitespace().next()?.parse::<Ipv6Net>().ok())
                .next();
            mapped.is_some()
        }),
        "no IPv6 LAN route:\n{}\n{}",
        topo.broker_cli(&["routes"]).unwrap_or_default(),
        read(&topo.path("site.log"))
    );
    let mapped = mapped.unwrap();
    assert_eq!(mapped.prefix_len(), 64);
    assert!(
        "fd74:6574:6865::/48"
            .parse::<Ipv6Net>()
            .unwrap()
            .contains(&mapped)
    );
    let analyser = Ipv6Addr::from(u128::from(mapped.network()) | 0x20);
    let url = format!("http://[{analyser}]:8080/index.html");
    let mut page = String::new();
    assert!(
        wait_for(Duration::from_secs(10), || {
            page = topo
                .backend
                .command("curl")
                .args(["-s", "-m", "2", &url])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                .unwrap_or_default();
            page.contains("analyser on IPv6")
        }),
        "page not fetched through {analyser}: {page:?}\n{}",
        read(&topo.path("site.log"))
    );
    // The LAN host saw the edge host's own LAN address.
    let seen = clients(&topo, "web.log");
    assert!(
        !seen.is_empty() && seen.iter().all(|a| a == "fd00:1::10"),
        "{seen:?}"
    );
    assert!(
        topo.backend
            .succeeds("ping", &["-6", "-c", "1", "-W", "1", &analyser.to_string()])
    );
    // Its name resolves to the mapped address.
    let name = "fd00-1-0-0-0-0-0-20.lan.hospital-v6.eu.tether.internal";
    let mut answer = String::new();
    assert!(
        wait_for(Duration::from_secs(10), || {
            answer = dig(&topo, &["+short", name, "AAAA"]);
            answer.trim().parse::<Ipv6Addr>().ok() == Some(analyser)
        }),
        "{name} AAAA: {answer:?}"
    );
}

/// A second hospital behind its own firewall, numbered like the first:
/// site 192.168.1.10 behind firewall 192.168.1.1 on the wan at
/// 198.51.100.6/30. Its firewall lets out only TCP 443, so its site runs
/// over HTTP/2 (capsules and packets on the request stream). Returns
/// (firewall, site).
fn second_hospital(topo: &Topology) -> (NetNs, NetNs) {
    let fw = NetNs::new("fw2").unwrap();
    let site = NetNs::new("site2").unwrap();
    link(
        &site,
        "eth0",
        "192.168.1.10/24",
        &fw,
        "lan",
        "192.168.1.1/24",
    )
    .unwrap();
    link(
        &fw,
        "wan",
        "198.51.100.6/30",
        &topo.wan,
        "hospital2",
        "198.51.100.5/30",
    )
    .unwrap();
    site.run("ip", &["route", "add", "default", "via", "192.168.1.1"])
        .unwrap();
    fw.run("ip", &["route", "add", "default", "via", "198.51.100.5"])
        .unwrap();
    fw.run("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"])
        .unwrap();
    let rules = topo.path("hospital2.nft");
    std::fs::write(&rules, firewall_rules(Egress::TcpOnly)).unwrap();
    fw.run("nft", &["-f", &rules.display().to_string()])
        .unwrap();
    (fw, site)
}

#[test]
fn two_hospitals_with_the_same_lan_are_mapped_apart() {
    if !require_root() {
        return;
    }
    // The broker answers DNS on the backend-facing address.
    let mut topo = Topology::new("\n[dns]\nlisten = [\"10.20.0.1:53\"]\n").unwrap();
    let (_fw2, site2) = second_hospital(&topo);
    let host_a = add_lan_host(&topo.site);
    let host_b = add_lan_host(&site2);
    let _web_a = serve(&topo, &host_a, "analyser of hospital A\n", "web-a.log");
    let _web_b = serve(&topo, &host_b, "analyser of hospital B\n", "web-b.log");

    let (state_a, state_b) = (topo.path("a-state"), topo.path("b-state"));
    topo.enroll("hospital-a", &state_a).unwrap();
    topo.enroll("hospital-b", &state_b).unwrap();
    for state in [&state_a, &state_b] {
        configure(state, "lans = [\"192.168.1.0/24\"]");
    }
    let (_a, _) = topo.up(&state_a, "site.log").unwrap();
    let _b = site2
        .spawn(
            &binary("tether").display().to_string(),
            &["up", "--state-dir", &state_b.display().to_string()],
            Some(topo.path("site-b.log")),
        )
        .unwrap();

    let mapped_a = mapped_lan(&topo, "hospital-a", 24);
    let mapped_b = mapped_lan(&topo, "hospital-b", 24);
    assert_ne!(mapped_a, mapped_b, "the same LAN is mapped apart");
    let sessions = topo.broker_cli(&["sessions"]).unwrap();
    assert!(
        sessions
            .lines()
            .any(|l| l.contains("hospital-b") && l.contains("h2")),
        "hospital B over HTTP/2:\n{sessions}"
    );
    for (mapped, page, log) in [
        (mapped_a, "analyser of hospital A", "site.log"),
        (mapped_b, "analyser of hospital B", "site-b.log"),
    ] {
        let addr = host_in(mapped, 20);
        assert!(
            wait_for(Duration::from_secs(10), || fetch(&topo, addr)
                .contains(page)),
            "{page:?} not fetched through {addr}:\n{}",
            read(&topo.path(log))
        );
    }

    // The backend finds each analyser by name: the LAN address under the
    // site's name resolves to the mapped one, and back.
    for (site, mapped, page) in [
        ("hospital-a", mapped_a, "analyser of hospital A"),
        ("hospital-b", mapped_b, "analyser of hospital B"),
    ] {
        let name = format!("192-168-1-20.lan.{site}.eu.tether.internal");
        let mut answer = String::new();
        assert!(
            wait_for(Duration::from_secs(10), || {
                answer = dig(&topo, &["+short", &name, "A"]);
                answer.trim() == host_in(mapped, 20).to_string()
            }),
            "{name} A: {answer:?}"
        );
        let by_name = topo
            .backend
            .command("curl")
            .args([
                "-s",
                "-m",
                "2",
                "--resolve",
                &format!("{name}:8080:{}", answer.trim()),
                &format!("http://{name}:8080/index.html"),
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        assert!(by_name.contains(page), "{name}: {by_name:?}");
        let ptr = dig(&topo, &["+short", "-x", &host_in(mapped, 20).to_string()]);
        assert_eq!(ptr.trim(), format!("{name}."));
    }

    // Between sites the policy denies by default: hospital A's edge host
    // reaches neither hospital B's LAN nor B's own address, and the broker
    // counts the drops under `policy` for hospital A.
    let analyser_b = host_in(mapped_b, 20);
    let b_own = site_overlay(&site2);
    assert!(fetch_from(&topo.site, analyser_b).is_empty());
    assert!(!topo.site.succeeds("ping", &["-c", "1", "-W", "1", &b_own]));
    assert!(
        wait_for(Duration::from_secs(5), || site_drops(
            &topo,
            "hospital-a",
            "policy"
        ) >= 2.0),
        "policy drops of hospital-a: {}",
        site_drops(&topo, "hospital-a", "policy")
    );

    // A rule lets hospital A's edge host reach B's analysers on port 8080
    // only; the broker reloads its policy on SIGHUP, without a restart.
    let mut config = read(&topo.broker_config());
    config.push_str(
        "\n[[policy.allow]]\nname = \"a-reads-b-analysers\"\nfrom = [\"site:hospital-a\"]\n\
         to = [\"lan-of:site:hospital-b\"]\nports = [\"tcp/8080\"]\n",
    );
    std::fs::write(topo.broker_config(), config).unwrap();
    topo.broker
        .as_ref()
        .unwrap()
        .signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_for(Duration::from_secs(10), || fetch_from(
            &topo.site, analyser_b
        )
        .contains("analyser of hospital B")),
        "hospital A does not reach B's analyser after the reload:\n{}",
        read(&topo.path("broker.log"))
    );
    assert!(read(&topo.path("broker.log")).contains("access policy reloaded"));
    assert!(!topo.broker.as_mut().unwrap().exited(), "the broker exited");
    // The rule opens only what it names: B's own address stays closed to
    // A, and nothing of A opens to B.
    let before = site_drops(&topo, "hospital-a", "policy");
    assert!(!topo.site.succeeds("ping", &["-c", "1", "-W", "1", &b_own]));
    assert!(site_drops(&topo, "hospital-a", "policy") > before);
    assert!(fetch_from(&site2, host_in(mapped_a, 20)).is_empty());
}

/// The LAN mappings of `site` as the admin API's site list shows them:
/// (real LAN, mapped prefix, `release_at`).
fn lan_mappings(topo: &Topology, site: &str) -> Vec<(String, Ipv4Net, Option<u64>)> {
    let page = topo.admin_get(&format!("/v1/site-states?q={site}"));
    let sites = page["sites"].as_array().cloned().unwrap_or_default();
    sites
        .iter()
        .filter(|s| s["site"] == site)
        .flat_map(|s| s["lans"].as_array().cloned().unwrap_or_default())
        .map(|m| {
            (
                m["lan"].as_str().unwrap_or_default().to_string(),
                m["mapped"].as_str().unwrap_or_default().parse().unwrap(),
                m["release_at"].as_u64(),
            )
        })
        .collect()
}

/// The prefix `lan` of `site` is mapped to, once the admin API shows it.
fn mapping_of(topo: &Topology, site: &str, lan: &str) -> (Ipv4Net, Option<u64>) {
    let mut found = None;
    wait_for(Duration::from_secs(15), || {
        found = lan_mappings(topo, site)
            .into_iter()
            .find(|(l, _, _)| l == lan)
            .map(|(_, m, r)| (m, r));
        found.is_some()
    });
    found.unwrap_or_else(|| {
        panic!(
            "no mapping of {lan} for {site}: {:?}",
            lan_mappings(topo, site)
        )
    })
}

/// Whether `tether-broker routes` routes `prefix` to `site` as a LAN.
fn routes_lan(topo: &Topology, site: &str, prefix: Ipv4Net) -> bool {
    topo.broker_cli(&["routes"])
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("site-lan") && l.contains(site))
        .any(|l| l.split_whitespace().next() == Some(prefix.to_string().as_str()))
}

/// Stops the agent with SIGTERM (as a service manager does) and waits
/// until it is gone.
fn stop(topo: &Topology, mut site: Proc, log: &str) {
    site.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        site.wait_exit(Duration::from_secs(10)),
        "{}",
        read(&topo.path(log))
    );
}

#[test]
fn a_lan_removed_from_the_configuration_is_withdrawn_and_keeps_its_mapping() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::new("").unwrap();
    // A site may map 64 IPv4 addresses of LANs: three /28s fit, a /26 more
    // does not.
    let config = read(&topo.broker_config()).replacen(
        "ipv6_pools = ",
        "max_lan_ipv4_addresses_per_site = 64\nipv6_pools = ",
        1,
    );
    std::fs::write(topo.broker_config(), config).unwrap();
    topo.restart_broker().unwrap();
    let host = lan::add_lan_host(
        &topo.site,
        &["192.168.1.20/24", "192.168.1.40/24", "192.168.1.50/24"],
    )
    .unwrap();
    let _web = serve(&topo, &host, "hello from the analyser\n", "web.log");
    let state = topo.path("site-state");
    topo.enroll("hospital-r", &state).unwrap();
    let (kept, removed, added) = ("192.168.1.16/28", "192.168.1.32/28", "192.168.1.48/28");
    let reach = |mapped: Ipv4Net, host: u32| {
        wait_for(Duration::from_secs(15), || {
            fetch(&topo, host_in(mapped, host)).contains("hello from the analyser")
        })
    };

    // Two LANs exposed: both reachable through their mapped prefixes.
    configure(&state, &format!("lans = [\"{kept}\", \"{removed}\"]"));
    let (site, _) = topo.up(&state, "site.log").unwrap();
    let (kept_at, _) = mapping_of(&topo, "hospital-r", kept);
    let (removed_at, release) = mapping_of(&topo, "hospital-r", removed);
    assert_eq!(release, None);
    assert!(routes_lan(&topo, "hospital-r", removed_at));
    assert!(reach(kept_at, 4), "{}", read(&topo.path("site.log")));
    assert!(reach(removed_at, 8), "{}", read(&topo.path("site.log")));

    // The operator removes one LAN and restarts the agent.
    stop(&topo, site, "site.log");
    configure(&state, &format!("lans = [\"{kept}\"]"));
    let (site, _) = topo.up(&state, "site-2.log").unwrap();
    // Its route is withdrawn at the broker, the mapping is reserved with a
    // release time within the default grace period (7 days).
    let mut mapping = None;
    assert!(
        wait_for(Duration::from_secs(15), || {
            mapping = lan_mappings(&topo, "hospital-r")
                .into_iter()
                .find(|(l, _, _)| l == removed);
            mapping.as_ref().is_some_and(|(_, _, r)| r.is_some())
        }),
        "the removed LAN's mapping was not marked for release: {mapping:?}\n{}",
        read(&topo.path("site-2.log"))
    );
    let (_, still, release_at) = mapping.unwrap();
    assert_eq!(still, removed_at);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let release_at = release_at.unwrap();
    assert!(
        release_at > now + 6 * 86_400 && release_at <= now + 7 * 86_400 + 60,
        "release_at {release_at}, now {now}"
    );
    assert!(!routes_lan(&topo, "hospital-r", removed_at));
    assert!(routes_lan(&topo, "hospital-r", kept_at));
    // The removed LAN is unreachable through its old prefix; the kept
    // one still answers.
    assert!(reach(kept_at, 4), "{}", read(&topo.path("site-2.log")));
    assert!(fetch(&topo, host_in(removed_at, 8)).is_empty());
    assert!(!topo.backend_pings(&host_in(removed_at, 8).to_string()));

    // Put back within the grace period, with a new LAN beside it: the
    // same mapped prefix, reachable again; the new LAN gets a prefix of its
    // own without a new enrollment. One more LAN is past the site's limit:
    // the agent reports the refusal, and it shows in the site's timeline.
    stop(&topo, site, "site-2.log");
    configure(
        &state,
        &format!("lans = [\"{kept}\", \"{removed}\", \"{added}\", \"10.77.0.0/26\"]"),
    );
    let (_site, _) = topo.up(&state, "site-3.log").unwrap();
    let mut back = None;
    assert!(
        wait_for(Duration::from_secs(15), || {
            back = lan_mappings(&topo, "hospital-r")
                .into_iter()
                .find(|(l, _, _)| l == removed);
            back.as_ref().is_some_and(|(_, _, r)| r.is_none())
        }),
        "the LAN put back is still marked for release: {back:?}"
    );
    assert_eq!(
        back.unwrap().1,
        removed_at,
        "a new prefix for the LAN put back"
    );
    assert!(reach(removed_at, 8), "{}", read(&topo.path("site-3.log")));
    assert!(routes_lan(&topo, "hospital-r", removed_at));
    let (added_at, release) = mapping_of(&topo, "hospital-r", added);
    assert_eq!(release, None);
    assert!(added_at != kept_at && added_at != removed_at);
    assert!(reach(added_at, 2), "{}", read(&topo.path("site-3.log")));
    assert_eq!(mapping_of(&topo, "hospital-r", kept).0, kept_at);
    let mut events = serde_json::Value::Null;
    assert!(
        wait_for(Duration::from_secs(20), || {
            events = site_events(&topo, "hospital-r");
            events["events"].as_array().is_some_and(|all| {
                all.iter().any(|e| {
                    e["kind"] == "reported"
                        && e["problem"] == "lan_refused"
                        && e["detail"]
                            .as_str()
                            .is_some_and(|d| d.contains("the LAN 10.77.0.0/26"))
                })
            })
        }),
        "the refused LAN is not in the site's timeline: {events}\n{}",
        read(&topo.path("site-3.log"))
    );
    assert!(
        lan_mappings(&topo, "hospital-r")
            .iter()
            .all(|(l, _, _)| l != "10.77.0.0/26")
    );
}

/// `GET /v1/sites/{site}/events` of the admin API.
fn site_events(topo: &Topology, site: &str) -> serde_json::Value {
    topo.admin_get(&format!("/v1/sites/{site}/events"))
}

/// `dig @10.20.0.1` (the broker's DNS) from the backend.
fn dig(topo: &Topology, args: &[&str]) -> String {
    topo.backend
        .command("dig")
        .args(["@10.20.0.1", "+time=1", "+tries=1"])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default()
}

/// What `ns` fetches from the page at `addr` (one try, 2 s).
fn fetch_from(ns: &NetNs, addr: Ipv4Addr) -> String {
    ns.command("curl")
        .args(["-s", "-m", "2", &format!("http://{addr}:8080/index.html")])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default()
}

/// The overlay IPv4 address of the agent in `ns`, once it has one.
fn site_overlay(ns: &NetNs) -> String {
    let mut found = None;
    wait_for(Duration::from_secs(15), || {
        found = overlay_address(ns, 4);
        found.is_some()
    });
    found.expect("the site has no overlay address")
}

/// Packets `site` sent that the broker dropped for `reason`.
fn site_drops(topo: &Topology, site: &str, reason: &str) -> f64 {
    let out = topo.metrics_text();
    out.lines()
        .filter(|l| l.starts_with("tether_broker_site_packets_dropped_total{"))
        .filter(|l| l.contains(&format!("site=\"{site}\"")))
        .filter(|l| l.contains(&format!("reason=\"{reason}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `lans` changes on SIGHUP, without a restart: a LAN added is mapped
/// and reachable, a LAN removed loses its route and is reserved for
/// release, over the same connection; a configuration that does not
/// validate is refused, the running one stays, and the refusal shows in
/// the site's timeline.
#[test]
fn lans_change_on_sighup_over_the_same_connection() {
    if !require_root() {
        return;
    }
    let topo = Topology::new("").unwrap();
    let host = lan::add_lan_host(&topo.site, &["192.168.1.20/24", "192.168.1.40/24"]).unwrap();
    let _web = serve(&topo, &host, "hello from the analyser\n", "web.log");
    let state = topo.path("site-state");
    topo.enroll("hospital-h", &state).unwrap();
    let (first, second) = ("192.168.1.16/28", "192.168.1.32/28");
    let reach = |mapped: Ipv4Net, host: u32| {
        wait_for(Duration::from_secs(15), || {
            fetch(&topo, host_in(mapped, host)).contains("hello from the analyser")
        })
    };
    let log = || read(&topo.path("site.log"));
    let connections = || log().matches("connected to the broker over").count();

    configure(&state, &format!("lans = [\"{first}\"]"));
    let (mut site, _) = topo.up(&state, "site.log").unwrap();
    let (first_at, _) = mapping_of(&topo, "hospital-h", first);
    assert!(reach(first_at, 4), "{}", log());
    assert_eq!(connections(), 1, "{}", log());

    // Added: mapped over the open tunnel, routed and reachable.
    configure(&state, &format!("lans = [\"{first}\", \"{second}\"]"));
    site.signal(nix::sys::signal::Signal::SIGHUP);
    let (second_at, release) = mapping_of(&topo, "hospital-h", second);
    assert_eq!(release, None);
    assert!(second_at != first_at);
    assert!(
        wait_for(Duration::from_secs(15), || routes_lan(
            &topo,
            "hospital-h",
            second_at
        )),
        "{}",
        log()
    );
    assert!(reach(second_at, 8), "{}", log());
    assert!(reach(first_at, 4), "{}", log());

    // Removed: withdrawn at the broker and reserved for release;
    // unreachable through its old prefix.
    configure(&state, &format!("lans = [\"{second}\"]"));
    site.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_for(Duration::from_secs(15), || {
            !routes_lan(&topo, "hospital-h", first_at)
                && lan_mappings(&topo, "hospital-h")
                    .iter()
                    .any(|(l, m, r)| l == first && *m == first_at && r.is_some())
        }),
        "the removed LAN is still routed or not marked for release: {:?}\n{}",
        lan_mappings(&topo, "hospital-h"),
        log()
    );
    assert!(fetch(&topo, host_in(first_at, 4)).is_empty());
    assert!(reach(second_at, 8), "{}", log());

    // A file that does not validate: refused, the running LANs stay, and
    // the refusal is in the site's timeline.
    configure(&state, "lans = [\"192.168.1.300/28\"]");
    site.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_for(Duration::from_secs(10), || log().contains(
            "configuration not reloaded, the running one stays in force"
        )),
        "{}",
        log()
    );
    assert!(log().contains("lans[0]"), "{}", log());
    assert!(reach(second_at, 8), "{}", log());
    let mut events = serde_json::Value::Null;
    assert!(
        wait_for(Duration::from_secs(20), || {
            events = site_events(&topo, "hospital-h");
            events["events"].as_array().is_some_and(|all| {
                all.iter()
                    .any(|e| e["kind"] == "reported" && e["problem"] == "reload")
            })
        }),
        "the refused reload is not in the site's timeline: {events}\n{}",
        log()
    );

    // All of it over the first connection, by the first process.
    assert_eq!(connections(), 1, "{}", log());
    assert!(!site.exited(), "{}", log());
    assert!(!log().contains("lost the connection"), "{}", log());
}
