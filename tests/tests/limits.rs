//! Idle and half-open connections cannot hold the broker's descriptors:
//! the admin API and the tunnel's TCP port close them after their
//! deadlines, refuse them past their caps, and real clients still get
//! through. Small limits come from the configuration.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tether::dial::Target;
use tether::h3client::quic_config;
use tether::link::Dialer;
use tether_config::Endpoint;
use tether_proto::tunnel::Transport;
use tether_shell::quic::transport_config;
use tether_tests::{TestBroker, TestSite, metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The extra configuration: it continues the test broker's `[admin]`
/// table (so it names `[dns]` itself).
const LIMITS: &str = "header_read_timeout = \"1s\"\nmax_connections = 4\n\
    [dns]\nlisten = [\"127.0.0.1:0\"]\n\
    [tunnel]\nhandshake_timeout = \"1s\"\nunauthenticated_lifetime = \"3s\"\n\
    max_unauthenticated_per_source = 3\nmax_unauthenticated = 100\n";

/// Waits until the peer closes `s` (read returns 0 or an error); how long
/// that took, or `None` after `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
    .map(|()| start.elapsed())
}

/// `GET /healthz` naming `host` over a fresh connection: the status line.
async fn healthz(addr: SocketAddr, host: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn the_admin_api_closes_half_sent_headers_and_caps_connections() {
    let broker = TestBroker::start(LIMITS).await;
    let admin = broker.running.as_ref().unwrap().admin_addr;
    let refused = "tether_broker_connections_refused_total{listener=\"admin\",reason=\"limit\"}";
    let before = metric(refused);

    // Four connections each send half a request header and stop.
    let mut idle = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(admin).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHo").await.unwrap();
        idle.push(s);
    }
    // Wait until the listener holds all four.
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric("tether_broker_connections_open{listener=\"admin\"}") < 4.0 {
        assert!(
            Instant::now() < deadline,
            "the admin connections were not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A fifth is closed at once.
    let mut fifth = TcpStream::connect(admin).await.unwrap();
    assert!(
        closed_within(&mut fifth, Duration::from_secs(2))
            .await
            .is_some(),
        "a connection past max_connections must be closed"
    );
    assert_eq!(metric(refused), before + 1.0);
    // The half-sent headers are cut after header_read_timeout (1 s).
    for s in &mut idle {
        let took = closed_within(s, Duration::from_secs(5)).await;
        assert!(
            took.is_some(),
            "a half-sent header kept its connection open past 5 s"
        );
    }
    // An operator's request goes through.
    assert_eq!(healthz(admin, &admin.to_string()).await, "HTTP/1.1 200 OK");
    assert_eq!(healthz(admin, "localhost:7070").await, "HTTP/1.1 200 OK");
    // A page whose own name was pointed at the broker (DNS rebinding)
    // names itself in Host: refused.
    assert_eq!(
        healthz(admin, "rebind.example.com").await,
        "HTTP/1.1 421 Misdirected Request"
    );
}

#[tokio::test]
async fn the_tunnel_port_bounds_connections_without_a_certificate() {
    let broker = TestBroker::start(LIMITS).await;
    let addr = broker.addr();
    let refused =
        "tether_broker_connections_refused_total{listener=\"tunnel\",reason=\"source_limit\"}";
    let cut = "tether_broker_connections_refused_total{listener=\"tunnel\",reason=\"deadline\"}";
    let (before_refused, before_cut) = (metric(refused), metric(cut));

    // Three TCP connections that never start TLS: the per-source cap.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric("tether_broker_connections_open{listener=\"tunnel_unauthenticated\"}") < 3.0 {
        assert!(
            Instant::now() < deadline,
            "the connections were not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A fourth from the same address is closed at once.
    let mut fourth = TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_within(&mut fourth, Duration::from_secs(2))
            .await
            .is_some()
    );
    assert_eq!(metric(refused), before_refused + 1.0);
    // The three are closed after the handshake deadline (1 s).
    for s in &mut silent {
        assert!(
            closed_within(s, Duration::from_secs(5)).await.is_some(),
            "a connection that never started TLS stayed open"
        );
    }
    assert!(metric(cut) >= before_cut + 3.0);

    // TLS without a client certificate, then nothing: closed after the
    // first-request deadline although it answers HTTP/2 PINGs.
    let site = TestSite::enroll(&broker, "limits-a").await;
    let (_, _, ca) = site.identity();
    let tls = tether_pki::tls::client_config(&ca, None).unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(addr.ip().to_string()).unwrap();
    let stream = connector.connect(name, tcp).await.unwrap();
    let (_send, conn) = h2::client::handshake(stream).await.unwrap();
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(
        ended.is_ok(),
        "an HTTP/2 connection without a certificate and without a request stayed open"
    );
    assert!(started.elapsed() < Duration::from_secs(3));

    // A site with its certificate still gets its tunnel over HTTP/2 (and
    // is not counted against the budget).
    h2_tunnel(&site, addr).await.unwrap();
}

/// Dials the broker at `addr` over HTTP/2 with `site`'s certificate and
/// opens its tunnel.
async fn h2_tunnel(site: &TestSite, addr: SocketAddr) -> Result<(), String> {
    let (chain, key, ca) = site.identity();
    let tls = tether_pki::tls::client_config(&ca, Some((chain, key))).unwrap();
    let dialer = Dialer {
        quic: quic_config(
            tls.clone(),
            transport_config(Duration::from_secs(2), Duration::from_secs(10)),
        )
        .unwrap(),
        tls,
        proxy: None,
        timeout: Duration::from_secs(5),
        keepalive: Duration::from_secs(2),
        narrow_paths: Default::default(),
    };
    let target = Target {
        endpoint: Endpoint::parse(&addr.to_string(), 443).unwrap(),
        addr,
        server_name: addr.ip().to_string(),
    };
    let conn = dialer
        .dial(Transport::H2, &target)
        .await
        .map_err(|e| e.to_string())?;
    conn.open_tunnel(&addr.to_string(), Duration::from_secs(5), &[])
        .await
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
}

/// A TCP connection to `addr` from the loopback address `from`.
async fn connect_from(from: &str, addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Held by the tests that make the broker evict, so that each counts its
/// own evictions (the metric is the process's).
static EVICTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Small caps of connections without a certificate, and deadlines far
/// enough not to interfere.
const FULL: &str = "[tunnel]\nhandshake_timeout = \"30s\"\nunauthenticated_lifetime = \"30s\"\n\
    max_unauthenticated_per_source = 2\nmax_unauthenticated = 4\n";

/// When connections without a certificate from several sources hold the
/// whole budget, a site still gets its tunnel over HTTP/2: the oldest idle
/// connection is closed to make room, not the newcomer refused.
#[tokio::test]
async fn a_full_budget_evicts_the_oldest_idle_connection_for_a_site() {
    let _alone = EVICTING.lock().await;
    let broker = TestBroker::start(FULL).await;
    let addr = broker.addr();
    let site = TestSite::enroll(&broker, "limits-full").await;
    let evicted = "tether_broker_connections_refused_total{listener=\"tunnel\",reason=\"evicted\"}";
    let before = metric(evicted);
    // Four idle connections from two other sources fill the budget, one
    // at a time so that their order is known.
    let mut idle = Vec::new();
    // (The broker accepts connections in the order they were made.)
    for from in ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"] {
        idle.push(connect_from(from, addr).await);
    }
    // The site comes in from a third source: admitted, the oldest idle
    // connection closed, the tunnel opened.
    h2_tunnel(&site, addr).await.unwrap();
    assert!(
        closed_within(&mut idle[0], Duration::from_secs(5))
            .await
            .is_some(),
        "the oldest idle connection was not evicted"
    );
    assert_eq!(metric(evicted), before + 1.0);
    // The others are still open (their deadlines are 30 s away).
    for s in &mut idle[1..] {
        assert!(closed_within(s, Duration::from_millis(200)).await.is_none());
    }
}

/// Connections whose clients have just gone still hold their places until
/// their tasks notice: a client arriving right after a wave of closes must
/// be served, not refused for capacity that is already free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_right_after_the_holders_leave_is_served() {
    let broker = TestBroker::start(LIMITS).await;
    let admin = broker.running.as_ref().unwrap().admin_addr;
    let mut refused = 0;
    for _ in 0..30 {
        let mut held = Vec::new();
        for _ in 0..4 {
            let mut s = TcpStream::connect(admin).await.unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHo").await.unwrap();
            held.push(s);
        }
        // Time for the broker to take all four (the open-connection gauge
        // is shared with the other tests of this binary).
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(held);
        if healthz(admin, &admin.to_string()).await != "HTTP/1.1 200 OK" {
            refused += 1;
        }
    }
    assert_eq!(
        refused, 0,
        "{refused} of 30 clients were refused after the holders left"
    );
}

/// A connection the full budget evicts while it serves an enrollment
/// finishes that request and answers it (the code is spent by then),
/// instead of being cut off with the code spent and no certificate sent.
#[tokio::test]
async fn an_evicted_connection_finishes_the_enrollment_it_serves() {
    let _alone = EVICTING.lock().await;
    use tether_proto::api::{ENROLL_PATH, EnrollRequest};
    let broker = TestBroker::start(FULL).await;
    let addr = broker.addr();
    let code = broker.token("limits-enroll").await;
    let (_, csr) = tether_pki::ca::site_key_and_csr("limits-enroll").unwrap();
    let body = serde_json::to_vec(&EnrollRequest {
        token: code,
        csr: data_encoding::BASE64.encode(&csr),
    })
    .unwrap();
    let evicted = "tether_broker_connections_refused_total{listener=\"tunnel\",reason=\"evicted\"}";

    // The enrollment starts: TLS without a certificate, HTTP/2, the
    // request's headers and half of its body.
    let ca = broker.broker().ca.cert_der();
    let tls = tether_pki::tls::client_config(&ca, None).unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let tcp = connect_from("127.0.0.4", addr).await;
    let name = rustls::pki_types::ServerName::try_from(addr.ip().to_string()).unwrap();
    let stream = connector.connect(name, tcp).await.unwrap();
    let (mut requests, connection) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(connection);
    let request = axum::http::Request::post(format!("https://{addr}{ENROLL_PATH}"))
        .body(())
        .unwrap();
    let (response, mut upload) = requests.send_request(request, false).unwrap();
    let half = body.len() / 2;
    upload
        .send_data(bytes::Bytes::copy_from_slice(&body[..half]), false)
        .unwrap();
    // Time for the broker to take the request up.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Four idle connections from other sources fill the budget; the
    // enrolling connection, the oldest, is evicted.
    let before = metric(evicted);
    let mut idle = Vec::new();
    for from in ["127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3"] {
        idle.push(connect_from(from, addr).await);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(evicted) < before + 1.0 {
        assert!(Instant::now() < deadline, "nothing was evicted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The rest of the body: the enrollment is answered with the
    // certificate.
    upload
        .send_data(bytes::Bytes::copy_from_slice(&body[half..]), true)
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("an answer within 10 s")
        .expect("the enrollment was answered, not cut off");
    assert_eq!(response.status(), 200);
    let mut answer = response.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = answer.data().await {
        let chunk = chunk.unwrap();
        let _ = answer.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("limits-enroll"), "{text}");
}
