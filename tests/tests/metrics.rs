//! The broker's Prometheus endpoint, scraped over its real port and checked
//! by Prometheus's own `promtool check metrics` (Debian's prometheus
//! package), after traffic, a spoofed packet, a handshake and DNS queries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::{IpAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use tether_tests::{TestBroker, TestSite, Tunnel, connect, ping};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_metrics_endpoint_passes_promtool() {
    let broker = TestBroker::start("").await;
    let site = TestSite::enroll(&broker, "hospital-a").await;
    let (chain, key, ca) = site.identity();
    let client = connect(broker.addr(), &ca, Some((chain, key)))
        .await
        .unwrap();
    let mut tunnel = Tunnel::open(client).await.unwrap();
    tunnel.configured().await;
    let own = broker
        .broker()
        .host_addresses(&"hospital-a".parse().unwrap(), &"local".parse().unwrap())
        .into_iter()
        .find_map(|a| match a {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        })
        .unwrap();
    // A packet with nowhere to go, and a spoofed one: both dropped, both
    // counted against the site.
    tunnel.send_packet(&ping(own, "100.64.200.200".parse().unwrap(), 1));
    tunnel.send_packet(&ping("10.9.9.9".parse().unwrap(), own, 2));
    // DNS answers of two codes.
    let dns = broker.running.as_ref().unwrap().dns_addrs[0];
    tokio::task::spawn_blocking(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        for name in ["hospital-a.local.tether.internal.", "example.org."] {
            let mut m = Message::new(1, MessageType::Query, OpCode::Query);
            m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
            socket.send_to(&m.to_vec().unwrap(), dns).unwrap();
            let mut buf = [0u8; 1500];
            socket.recv_from(&mut buf).unwrap();
        }
    })
    .await
    .unwrap();

    let ca_name = broker.broker().ca.status().bundle[0].name.clone();
    let ca_expiry =
        format!(r#"tether_broker_ca_expiry_seconds{{ca="{ca_name}",signing="true"}} 31"#);
    let needles = [
        r#"tether_broker_site_packets_total{site="hospital-a",region="local",direction="from_site"} 2"#,
        r#"tether_broker_site_bytes_total{site="hospital-a",region="local",direction="to_site"}"#,
        r#"tether_broker_site_packets_dropped_total{site="hospital-a",region="local",reason="spoofed"} 1"#,
        r#"tether_broker_site_packets_dropped_total{site="hospital-a",region="local",reason="no_route"} 1"#,
        r#"tether_broker_sessions{transport="h3"} 1"#,
        r#"tether_broker_handshake_duration_seconds_bucket{transport="h3",le="0.1"}"#,
        r#"tether_broker_handshake_duration_seconds_count{transport="h3"}"#,
        r#"tether_broker_dns_queries_total{rcode="NOERROR"}"#,
        r#"tether_broker_dns_queries_total{rcode="REFUSED"}"#,
        r#"tether_broker_certificates_issued_total{kind="enroll"}"#,
        // Ten years for the CA, 30 days for the broker's own certificate.
        ca_expiry.as_str(),
        "tether_broker_server_cert_expiry_seconds 259",
        r#"tether_broker_ca_rotation_phase{phase="stable"} 1"#,
        "# HELP tether_broker_site_bytes_total",
    ];
    // The datagrams are handled after `send_packet` returns: scrape until
    // the endpoint shows them (or give up after 5 s and report what it has).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let body = loop {
        let body = broker.scrape().await;
        if needles.iter().all(|n| body.contains(n)) || std::time::Instant::now() > deadline {
            break body;
        }
        tokio::task::yield_now().await;
    };
    for needle in needles {
        assert!(body.contains(needle), "missing {needle}:\n{body}");
    }

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool not found: install Debian's prometheus package (.ci/run does)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(tunnel);
}
