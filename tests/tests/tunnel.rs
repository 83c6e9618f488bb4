//! A real broker on loopback (quinn, rustls, HTTP/3, the redb store) and
//! sites driven through the client library.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use tether_proto::agent::ClientEvent;
use tether_proto::capsule::Capsule;
use tether_proto::connect_ip::{AddressRequest, RequestedAddress, RouteAdvertisement};
use tether_proto::ip::Packet;
use tether_proto::net::Family;
use tether_tests::{TestBroker, TestSite, Tunnel, connect, metric, ping, tunnel_for, v4};

/// Sites a and b may reach each other (between sites, everything else is
/// denied).
const A_AND_B: &str = r#"
[[policy.allow]]
name = "a-and-b"
from = ["site:site-a", "site:site-b"]
to = ["site:site-a", "site:site-b"]
"#;

#[tokio::test]
async fn sites_get_stable_addresses_and_reach_each_other() {
    let mut broker = TestBroker::start(A_AND_B).await;
    let a = TestSite::enroll(&broker, "site-a").await;
    let b = TestSite::enroll(&broker, "site-b").await;
    let mut ta = tunnel_for(&broker, &a).await;
    let tb = tunnel_for(&broker, &b).await;
    let (addr_a, addr_b) = (v4(&ta), v4(&tb));
    assert_ne!(addr_a, addr_b);
    assert!(
        ta.session.host_address(Family::V6).is_some(),
        "the default region has an IPv6 pool"
    );
    assert!(
        ta.session
            .routes()
            .contains(&"100.64.0.0/16".parse().unwrap()),
        "{:?}",
        ta.session.routes()
    );

    // A to B through the broker: TTL decremented, checksum still valid.
    ta.send_packet(&ping(addr_a, addr_b, 1));
    let got = tb
        .recv_packet(Duration::from_secs(5))
        .await
        .expect("packet forwarded to B");
    let p = Packet::parse(&got).unwrap();
    assert_eq!(
        (p.src, p.dst, p.ttl),
        (IpAddr::V4(addr_a), IpAddr::V4(addr_b), 63)
    );
    assert_eq!(tether_proto::ip::checksum(&[&got[..20]]), 0);

    // A spoofed source is dropped and counted, not forwarded.
    let before = metric("tether_broker_packets_dropped_total{reason=\"spoofed\"}");
    ta.send_packet(&ping(Ipv4Addr::new(100, 64, 250, 250), addr_b, 2));
    assert!(
        tb.recv_packet(Duration::from_millis(500)).await.is_none(),
        "spoofed packet must not arrive"
    );
    assert!(metric("tether_broker_packets_dropped_total{reason=\"spoofed\"}") >= before + 1.0);

    // No route: an ICMP destination unreachable comes back to A.
    ta.send_packet(&ping(addr_a, Ipv4Addr::new(192, 0, 2, 1), 3));
    let icmp = ta
        .recv_packet(Duration::from_secs(5))
        .await
        .expect("ICMP error back");
    let p = Packet::parse(&icmp).unwrap();
    assert_eq!(
        (p.protocol, icmp[20], icmp[21]),
        (1, 3, 1),
        "host unreachable"
    );

    // Asking for an address gets the stable one, echoing the request ID.
    ta.send_capsule(&Capsule::AddressRequest(AddressRequest {
        requests: vec![RequestedAddress {
            request_id: 9,
            prefix: "0.0.0.0/32".parse().unwrap(),
        }],
    }))
    .await;
    let (capsule, _) = ta
        .next_capsule(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
    let Capsule::AddressAssign(assign) = capsule else {
        panic!("{capsule:?}")
    };
    assert!(
        assign
            .addresses
            .iter()
            .any(|a| a.request_id == 9 && a.prefix == format!("{addr_a}/32").parse().unwrap()),
        "{assign:?}"
    );

    // A site may advertise only what it owns: nothing here changes routes.
    ta.send_capsule(&Capsule::RouteAdvertisement(
        RouteAdvertisement::from_prefixes(["10.0.0.0/8".parse().unwrap()]),
    ))
    .await;

    // After a broker restart both sites get the same addresses again.
    drop((ta, tb));
    broker.restart().await;
    let ta2 = tunnel_for(&broker, &a).await;
    let tb2 = tunnel_for(&broker, &b).await;
    assert_eq!((v4(&ta2), v4(&tb2)), (addr_a, addr_b));
    broker.running.take().unwrap().shutdown().await;
}

#[tokio::test]
async fn no_certificate_is_refused_and_allocates_nothing() {
    let broker = TestBroker::start("").await;
    let site = TestSite::enroll(&broker, "site-c").await;
    let (_, _, ca) = site.identity();
    let before = broker
        .broker()
        .store
        .region_leases(&"local".parse().unwrap())
        .unwrap();
    let client = connect(broker.addr(), &ca, None).await.unwrap();
    let err = Tunnel::open(client).await.err().expect("refused");
    assert_eq!(err.0, 401, "{err:?}");
    assert!(err.1.contains("enroll"), "{err:?}");
    let after = broker
        .broker()
        .store
        .region_leases(&"local".parse().unwrap())
        .unwrap();
    assert_eq!(before, after, "a refused request must not allocate");
}

#[tokio::test]
async fn a_foreign_ca_cannot_even_handshake() {
    let broker = TestBroker::start("").await;
    let other = TestBroker::start("").await;
    let site = TestSite::enroll(&other, "site-d").await;
    let (chain, key, _) = site.identity();
    // Trust the right broker, but present a certificate from another CA.
    let ca = broker.broker().ca.cert_der().clone();
    let result = connect(broker.addr(), &ca, Some((chain, key))).await;
    let refused = match result {
        Err(_) => true,
        // TLS 1.3: the client may finish first; the refusal then closes the
        // connection before CONNECT-IP can be answered.
        Ok(client) => Tunnel::open(client).await.is_err(),
    };
    assert!(refused);
    assert!(broker.broker().sessions().is_empty());
}

#[tokio::test]
async fn revocation_closes_the_live_tunnel_and_blocks_reconnection() {
    let broker = TestBroker::start("").await;
    let site = TestSite::enroll(&broker, "site-e").await;
    let t = tunnel_for(&broker, &site).await;
    let b = broker.broker().clone();
    let started = std::time::Instant::now();
    let closed = tokio::task::spawn_blocking(move || {
        b.revoke_site(&"site-e".parse().unwrap(), &"local".parse().unwrap())
    })
    .await
    .unwrap()
    .unwrap();
    assert!(closed, "a live session existed");
    let reason = tokio::time::timeout(Duration::from_secs(2), t.client.conn.closed())
        .await
        .expect("closed within 2 s");
    assert!(reason.to_string().contains("revoked"), "{reason}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // Reconnecting with the same certificate fails.
    let (chain, key, ca) = site.identity();
    let refused = match connect(broker.addr(), &ca, Some((chain, key))).await {
        Err(_) => true,
        Ok(client) => Tunnel::open(client).await.is_err(),
    };
    assert!(refused, "a revoked site must not get a tunnel again");
    assert!(
        broker
            .broker()
            .session(&"site-e".parse().unwrap())
            .is_none()
    );
}

/// An ADDRESS_REQUEST for a mapping of each LAN, numbered from 1.
fn lan_requests(lans: &[&str]) -> Capsule {
    Capsule::AddressRequest(AddressRequest {
        requests: lans
            .iter()
            .zip(1..)
            .map(|(lan, id)| RequestedAddress {
                request_id: id,
                prefix: lan.parse().unwrap(),
            })
            .collect(),
    })
}

/// Asks for a mapping of the LAN `prefix` (a /24) and returns the mapped
/// prefix the broker gave.
async fn map_lan(t: &mut Tunnel, prefix: &str) -> ipnet::IpNet {
    t.send_capsule(&lan_requests(&[prefix])).await;
    let events = t
        .pump_events(tokio::time::Instant::now() + Duration::from_secs(5))
        .await;
    let ClientEvent::Addresses(addrs) = &events[0] else {
        panic!("{events:?}")
    };
    *addrs
        .iter()
        .find(|a| a.prefix_len() == 24)
        .expect("a /24 mapping")
}

#[tokio::test]
async fn lan_behind_a_site_is_mapped_and_routed() {
    let broker = TestBroker::start(
        "[[policy.allow]]\nname = \"g-to-f-lan\"\nfrom = [\"site:site-g\"]\nto = [\"lan-of:site:site-f\"]\n",
    )
    .await;
    let a = TestSite::enroll(&broker, "site-f").await;
    let b = TestSite::enroll(&broker, "site-g").await;
    let mut ta = tunnel_for(&broker, &a).await;
    let mut tb = tunnel_for(&broker, &b).await;
    // Both hospitals use 192.168.1.0/24 for their analysers.
    let mut mapped = Vec::new();
    for t in [&mut ta, &mut tb] {
        let lan = map_lan(t, "192.168.1.0/24").await;
        t.send_capsule(&Capsule::RouteAdvertisement(
            RouteAdvertisement::from_prefixes([lan]),
        ))
        .await;
        mapped.push(lan);
    }
    assert_ne!(mapped[0], mapped[1], "overlapping LANs are mapped apart");
    for lan in &mapped {
        broker.wait_for_route(*lan, Duration::from_secs(5)).await;
    }
    // B reaches a host in A's mapped LAN.
    let dst = match mapped[0].network() {
        IpAddr::V4(n) => Ipv4Addr::from(u32::from(n) + 10),
        _ => unreachable!(),
    };
    tb.send_packet(&ping(v4(&tb), dst, 1));
    let got = ta
        .recv_packet(Duration::from_secs(5))
        .await
        .expect("delivered into A's LAN mapping");
    assert_eq!(Packet::parse(&got).unwrap().dst, IpAddr::V4(dst));
}

#[tokio::test]
async fn routes_a_site_was_not_given_are_refused_and_counted() {
    let broker = TestBroker::start("").await;
    let site = TestSite::enroll(&broker, "site-r").await;
    let mut t = tunnel_for(&broker, &site).await;
    let lan = map_lan(&mut t, "192.168.7.0/24").await;
    let not_assigned = "tether_broker_routes_refused_total{reason=\"not_assigned\"}";
    let protocol = "tether_broker_routes_refused_total{reason=\"protocol\"}";
    let before = (metric(not_assigned), metric(protocol));
    // Its own mapping for every protocol, two prefixes it was not given,
    // and its own mapping again for TCP only.
    let mut ad = RouteAdvertisement::from_prefixes([
        lan,
        "10.0.0.0/8".parse().unwrap(),
        "198.51.100.0/24".parse().unwrap(),
    ]);
    let mut tcp_only = tether_proto::connect_ip::IpAddressRange::from_prefix(lan);
    tcp_only.protocol = 6;
    ad.ranges.push(tcp_only);
    t.send_capsule(&Capsule::RouteAdvertisement(ad)).await;
    // The prefix it owns is routed, the rest is counted.
    broker.wait_for_route(lan, Duration::from_secs(5)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while metric(protocol) < before.1 + 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refusal was not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(protocol), before.1 + 1.0);
    // Other tests of this binary may count theirs too: at least these two.
    assert!(
        metric(not_assigned) >= before.0 + 2.0,
        "{} -> {}",
        before.0,
        metric(not_assigned)
    );
    // The metric is on the admin endpoint, with its reason.
    let text = broker.scrape().await;
    assert!(text.contains(protocol), "{text}");
    // The site list pairs the mapped prefix with the real LAN, apart from
    // the site's own addresses.
    let sites = broker.broker().site_infos().unwrap();
    let info = sites.iter().find(|s| s.site.as_str() == "site-r").unwrap();
    assert!(!info.addresses.contains(&lan), "{info:?}");
    assert_eq!(info.lans.len(), 1, "{info:?}");
    assert_eq!(
        (info.lans[0].lan, info.lans[0].mapped),
        ("192.168.7.0/24".parse().unwrap(), lan)
    );
}

#[tokio::test]
async fn sites_are_kept_apart_until_a_reloaded_rule_allows_it() {
    let broker = TestBroker::start("").await;
    let a = TestSite::enroll(&broker, "site-a").await;
    let b = TestSite::enroll(&broker, "site-b").await;
    let ta = tunnel_for(&broker, &a).await;
    let tb = tunnel_for(&broker, &b).await;
    let (addr_a, addr_b) = (v4(&ta), v4(&tb));

    // Default deny between sites: A hears "administratively prohibited"
    // from the broker, B hears nothing, and the drop is counted.
    ta.send_packet(&ping(addr_a, addr_b, 1));
    let refusal = ta
        .recv_packet(Duration::from_secs(5))
        .await
        .expect("an ICMP error back to the sender");
    assert_eq!(
        &refusal[20..22],
        &[3, 13],
        "destination unreachable, prohibited"
    );
    assert!(tb.recv_packet(Duration::from_millis(300)).await.is_none());
    let drops = broker
        .broker()
        .session(&"site-a".parse().unwrap())
        .unwrap()
        .drops
        .get();
    assert!(
        drops.contains(&(tether_proto::forward::DropReason::Policy, 1)),
        "{drops:?}"
    );

    // A broken policy is refused and the one in force stays.
    let bad = broker
        .reload_policy(
            "[[policy.allow]]\nname = \"x\"\nfrom = [\"group:nobody\"]\nto = [\"sites\"]\n",
        )
        .unwrap_err();
    assert!(
        format!("{bad:#}").contains("group \"nobody\" is not defined"),
        "{bad:#}"
    );

    // A rule, reloaded without a restart: the same sessions now talk.
    assert_eq!(broker.reload_policy(A_AND_B).unwrap(), 1);
    ta.send_packet(&ping(addr_a, addr_b, 2));
    let got = tb
        .recv_packet(Duration::from_secs(5))
        .await
        .expect("allowed after the reload");
    assert_eq!(Packet::parse(&got).unwrap().dst, IpAddr::V4(addr_b));
}

#[tokio::test]
async fn a_lan_in_the_overlay_pools_is_refused_and_counted() {
    let broker = TestBroker::start(
        "[[region]]\nname = \"local\"\nipv4_pools = [\"100.64.0.0/16\"]\n\
         ipv6_pools = [\"fd74:6574:6865::/48\"]\n",
    )
    .await;
    let refused = "tether_broker_lan_mappings_refused_total{reason=\"overlay\"}";
    let before = metric(refused);
    let site = TestSite::enroll(&broker, "lab-overlay").await;
    let mut t = tunnel_for(&broker, &site).await;
    t.send_capsule(&lan_requests(&["100.64.200.0/24", "192.168.5.0/24"]))
        .await;
    // The LAN outside the pools is mapped; the one inside is refused,
    // counted, and nothing more arrives for it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mapped = |events: Vec<ClientEvent>| -> Vec<ipnet::IpNet> {
        events
            .into_iter()
            .flat_map(|e| match e {
                ClientEvent::Addresses(addrs) => addrs,
                _ => Vec::new(),
            })
            .filter(|a| a.prefix_len() == 24)
            .collect()
    };
    let mut lans = Vec::new();
    while lans.is_empty() {
        lans = mapped(t.pump_events(deadline).await);
    }
    while metric(refused) < before + 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the LAN inside the overlay pool was not refused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Ok(events) = tokio::time::timeout(
        Duration::from_millis(300),
        t.pump_events(tokio::time::Instant::now() + Duration::from_secs(1)),
    )
    .await
    {
        lans.extend(mapped(events));
    }
    assert_eq!(lans.len(), 1, "{lans:?}");
    assert!(!lans[0].contains(&"100.64.200.1".parse::<IpAddr>().unwrap()));
}

#[tokio::test]
async fn one_site_cannot_take_the_pool_and_a_released_site_frees_it() {
    let broker = TestBroker::start(
        "[[region]]\nname = \"local\"\nipv4_pools = [\"100.64.0.0/16\"]\n\
         ipv6_pools = [\"fd74:6574:6865::/48\"]\nmax_lan_ipv4_addresses_per_site = 512\n",
    )
    .await;
    let before = metric("tether_broker_lan_mappings_refused_total{reason=\"site_lan_space\"}");
    let a = TestSite::enroll(&broker, "greedy").await;
    let mut ta = tunnel_for(&broker, &a).await;
    ta.send_capsule(&lan_requests(&[
        "10.1.0.0/24",
        "10.2.0.0/24",
        "10.3.0.0/24",
    ]))
    .await;
    // The broker answers each request as its allocation completes: read
    // until both mappings have arrived, then wait for the refusal's count.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut lans = Vec::new();
    while lans.len() < 2 {
        for event in ta.pump_events(deadline).await {
            if let ClientEvent::Addresses(addrs) = event {
                for a in addrs.iter().filter(|a| a.prefix_len() == 24) {
                    if !lans.contains(a) {
                        lans.push(*a);
                    }
                }
            }
        }
    }
    let refused = "tether_broker_lan_mappings_refused_total{reason=\"site_lan_space\"}";
    while metric(refused) < before + 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the third /24 was not refused as past the site's space"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing more arrives: the third was not mapped.
    let more = tokio::time::timeout(
        Duration::from_millis(300),
        ta.pump_events(tokio::time::Instant::now() + Duration::from_secs(1)),
    )
    .await;
    if let Ok(events) = more {
        for event in events {
            if let ClientEvent::Addresses(addrs) = event {
                assert_eq!(
                    addrs.iter().filter(|a| a.prefix_len() == 24).count(),
                    2,
                    "{addrs:?}"
                );
            }
        }
    }
    assert_eq!(metric(refused), before + 1.0);

    // Revoked, it keeps its leases until the operator releases them.
    let b = broker.broker().clone();
    let (site, region) = ("greedy".parse().unwrap(), "local".parse().unwrap());
    let refused = tokio::task::spawn_blocking({
        let (b, site, region) = (b.clone(), site, region);
        move || b.release_revoked(&site, &region)
    })
    .await
    .unwrap();
    assert!(
        refused.unwrap_err().to_string().contains("not revoked"),
        "a site that may connect keeps its addresses"
    );
    let (site, region) = ("greedy".parse().unwrap(), "local".parse().unwrap());
    let freed = tokio::task::spawn_blocking(move || {
        b.revoke_site(&site, &region).unwrap();
        b.release_revoked(&site, &region).unwrap()
    })
    .await
    .unwrap();
    // Its IPv4 and IPv6 addresses and its two LAN mappings.
    assert_eq!(freed.len(), 4, "{freed:?}");
    for lan in &lans {
        assert!(freed.contains(lan), "{lan} not freed: {freed:?}");
    }
}

#[tokio::test]
async fn a_replaced_connection_carries_the_sites_packets_until_it_has_moved() {
    let broker = TestBroker::start(A_AND_B).await;
    let a = TestSite::enroll(&broker, "site-a").await;
    let b = TestSite::enroll(&broker, "site-b").await;
    let tb = tunnel_for(&broker, &b).await;
    let old = tunnel_for(&broker, &a).await;
    let (addr_a, addr_b) = (v4(&old), v4(&tb));

    // The site moves its tunnel to a new connection (as after a renewal):
    // the new session replaces the old and holds the routes at once.
    let new = tunnel_for(&broker, &a).await;
    assert_eq!(v4(&new), addr_a);
    tb.send_packet(&ping(addr_b, addr_a, 1));
    let moved = new.recv_packet(Duration::from_secs(2)).await.unwrap();
    assert_eq!(Packet::parse(&moved).unwrap().dst, IpAddr::V4(addr_a));

    // Until the site has moved, it still sends on the old connection:
    // what it sends there is delivered, not dropped with the connection.
    for seq in 2..5 {
        let mut datagram = Vec::new();
        tether_proto::datagram::encode_h3_ip_packet(
            old.stream_id,
            &ping(addr_a, addr_b, seq),
            &mut datagram,
        );
        old.client
            .conn
            .send_datagram(datagram.into())
            .expect("the broker closed the replaced connection at once");
        let p = tb
            .recv_packet(Duration::from_secs(2))
            .await
            .unwrap_or_else(|| panic!("packet {seq} sent on the replaced connection was lost"));
        let p = Packet::parse(&p).unwrap();
        assert_eq!((p.src, p.dst), (IpAddr::V4(addr_a), IpAddr::V4(addr_b)));
    }

    // Then the broker closes it by itself, well before the agent would.
    let closed = tokio::time::timeout(
        tether_proto::agent::liveness::RETIRE_AFTER + Duration::from_secs(1),
        old.client.conn.closed(),
    )
    .await
    .expect("the replaced connection was never closed");
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if &c.reason[..] == b"replaced by a newer connection"),
        "{closed}"
    );
    // The new session is untouched.
    tb.send_packet(&ping(addr_b, addr_a, 9));
    assert!(new.recv_packet(Duration::from_secs(2)).await.is_some());
}
