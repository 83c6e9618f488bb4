//! A frame only the control stream may carry, sent on a request stream,
//! closes the whole connection with H3_FRAME_UNEXPECTED (RFC 9114 section
//! 7.2.4.1 and 9), on an enrollment request and inside a tunnel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tether::h3client::{H3Client, quic_config};
use tether_proto::api::ENROLL_PATH;
use tether_proto::h3::error::H3_FRAME_UNEXPECTED;
use tether_proto::h3::{Request, frame};
use tether_shell::quic::transport_config;
use tether_tests::{TestBroker, TestSite};

/// Opens HTTP/3 to the broker (with the site's certificate, if any) and
/// sends `request` followed by a SETTINGS frame on one request stream; the
/// code the broker closes the connection with.
async fn settings_on_a_request_stream(
    broker: &TestBroker,
    site: &TestSite,
    client_cert: bool,
    request: &Request,
) -> Option<u64> {
    let (chain, key, ca) = site.identity();
    let identity = client_cert.then_some((chain, key));
    let tls = tether_pki::tls::client_config(&ca, identity).unwrap();
    let config = quic_config(
        tls,
        transport_config(Duration::from_secs(2), Duration::from_secs(10)),
    )
    .unwrap();
    let endpoint = tether::dial::client_endpoint(&broker.addr()).unwrap();
    let conn = endpoint
        .connect_with(config, broker.addr(), &broker.addr().ip().to_string())
        .unwrap()
        .await
        .unwrap();
    let _client = H3Client::over(conn.clone()).await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let mut out = Vec::new();
    frame::encode(frame::HEADERS, &request.encode(), &mut out);
    frame::encode(frame::SETTINGS, &[], &mut out);
    send.write_all(&out).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("the broker kept the connection open");
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => Some(close.error_code.into_inner()),
        other => panic!("not closed by the broker: {other}"),
    }
}

#[tokio::test]
async fn settings_on_a_request_stream_closes_the_connection() {
    let broker = TestBroker::start("").await;
    let site = TestSite::enroll(&broker, "site-frames").await;
    let authority = broker.addr().to_string();

    // An enrollment request (no certificate needed) whose body holds SETTINGS.
    let enroll = Request::new("POST", &authority, ENROLL_PATH);
    assert_eq!(
        settings_on_a_request_stream(&broker, &site, false, &enroll).await,
        Some(H3_FRAME_UNEXPECTED)
    );

    // A tunnel, after its head.
    let tunnel = tether_proto::connect_ip::request(&authority);
    assert_eq!(
        settings_on_a_request_stream(&broker, &site, true, &tunnel).await,
        Some(H3_FRAME_UNEXPECTED)
    );
}
