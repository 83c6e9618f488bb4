//! Identity DNS on the broker: real UDP and TCP queries against the
//! hickory-server listener, names that follow enrollment and revocation,
//! and bad input that gets an error code instead of a crash.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tether_tests::{TestBroker, TestSite};

fn query(name: &str, qtype: RecordType) -> Message {
    let mut m = Message::new(0x7e7e, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m
}

fn exchange_raw(server: SocketAddr, bytes: &[u8]) -> Option<Message> {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    socket.send_to(bytes, server).unwrap();
    let mut buf = vec![0u8; 65_535];
    let (n, _) = socket.recv_from(&mut buf).ok()?;
    Some(Message::from_vec(&buf[..n]).unwrap())
}

fn ask(server: SocketAddr, name: &str, qtype: RecordType) -> Message {
    exchange_raw(server, &query(name, qtype).to_vec().unwrap()).expect("no DNS answer")
}

fn addresses(m: &Message) -> Vec<IpAddr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_follow_enrollment_and_revocation() {
    let broker = TestBroker::start("").await;
    let dns = broker.running.as_ref().unwrap().dns_addrs[0];
    let name = "hospital-a.local.tether.internal.";

    // Before enrollment the name does not exist; the zone answers with its
    // SOA.
    let m = tokio::task::spawn_blocking(move || ask(dns, name, RecordType::A))
        .await
        .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(m.metadata.authoritative);
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);

    // Enrolled: the name resolves, without the site having connected, to
    // the addresses it will get.
    let enrolled = Instant::now();
    let _site = TestSite::enroll(&broker, "hospital-a").await;
    let m = loop {
        let m = tokio::task::spawn_blocking(move || ask(dns, name, RecordType::A))
            .await
            .unwrap();
        if m.metadata.response_code == ResponseCode::NoError || enrolled.elapsed().as_secs() > 2 {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!("name resolvable {:?} after enrollment", enrolled.elapsed());
    assert!(enrolled.elapsed() < Duration::from_secs(1));
    let v4 = addresses(&m);
    assert_eq!(v4.len(), 1, "{m:?}");
    let leases = broker
        .broker()
        .host_addresses(&"hospital-a".parse().unwrap(), &"local".parse().unwrap());
    assert!(leases.contains(&v4[0]));
    let m = tokio::task::spawn_blocking(move || ask(dns, name, RecordType::AAAA))
        .await
        .unwrap();
    assert_eq!(addresses(&m).len(), 1);

    // PTR of the overlay address.
    let reverse = Name::from(v4[0]).to_string();
    let m = tokio::task::spawn_blocking(move || ask(dns, &reverse, RecordType::PTR))
        .await
        .unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(matches!(&m.answers[0].data, RData::PTR(p) if p.0.to_string() == name));

    // The same over TCP.
    let m = tokio::task::spawn_blocking(move || {
        let mut tcp = std::net::TcpStream::connect(dns).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let q = query(name, RecordType::A).to_vec().unwrap();
        tcp.write_all(&(q.len() as u16).to_be_bytes()).unwrap();
        tcp.write_all(&q).unwrap();
        let mut len = [0u8; 2];
        tcp.read_exact(&mut len).unwrap();
        let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
        tcp.read_exact(&mut buf).unwrap();
        Message::from_vec(&buf).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(addresses(&m), v4);

    // Revoked: the name is gone within a second.
    let revoked = Instant::now();
    let b = broker.broker().clone();
    tokio::task::spawn_blocking(move || {
        b.revoke_site(&"hospital-a".parse().unwrap(), &"local".parse().unwrap())
    })
    .await
    .unwrap()
    .unwrap();
    loop {
        let m = tokio::task::spawn_blocking(move || ask(dns, name, RecordType::A))
            .await
            .unwrap();
        if m.metadata.response_code == ResponseCode::NXDomain {
            break;
        }
        assert!(revoked.elapsed() < Duration::from_secs(1), "still {m:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("name gone {:?} after revocation", revoked.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_names_are_refused_and_bad_queries_get_error_codes() {
    let broker = TestBroker::start("").await;
    let dns = broker.running.as_ref().unwrap().dns_addrs[0];
    tokio::task::spawn_blocking(move || {
        // No recursion: names outside the zone are refused.
        let m = ask(dns, "example.org.", RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        assert!(!m.metadata.recursion_available);
        // Apex records.
        let m = ask(dns, "tether.internal.", RecordType::SOA);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.answers[0].record_type(), RecordType::SOA);
        let m = ask(dns, "tether.internal.", RecordType::NS);
        assert_eq!(m.answers[0].record_type(), RecordType::NS);
        // Zone transfers are refused.
        let m = ask(dns, "tether.internal.", RecordType::AXFR);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);

        // EDNS version 1: BADVERS, with an OPT record of version 0
        // (RFC 6891 section 6.1.3).
        let mut v1 = query("tether.internal.", RecordType::SOA);
        let mut edns = hickory_proto::op::Edns::new();
        edns.set_version(1);
        v1.set_edns(edns);
        let m = exchange_raw(dns, &v1.to_vec().unwrap()).expect("an answer");
        // 16 is BADVERS (hickory names the shared code BADSIG).
        assert_eq!(u16::from(m.metadata.response_code), 16, "{m:?}");
        assert_eq!(m.edns.as_ref().map(|e| e.version()), Some(0));
        assert!(m.answers.is_empty());
        // Version 0 is answered as usual.
        let mut v0 = query("tether.internal.", RecordType::SOA);
        v0.set_edns(hickory_proto::op::Edns::new());
        let m = exchange_raw(dns, &v0.to_vec().unwrap()).expect("an answer");
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);

        // A header followed by garbage: FORMERR.
        let mut junk = query("tether.internal.", RecordType::A).to_vec().unwrap();
        junk.truncate(12);
        junk.extend_from_slice(&[0xff; 40]);
        let m = exchange_raw(dns, &junk).expect("FORMERR expected");
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        // Two questions in one message: FORMERR.
        let mut two = query("tether.internal.", RecordType::A);
        two.add_query(Query::query(
            Name::from_ascii("ns.tether.internal.").unwrap(),
            RecordType::A,
        ));
        let m = exchange_raw(dns, &two.to_vec().unwrap()).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        // An oversized datagram full of questions: FORMERR, not a crash.
        let mut many = query("tether.internal.", RecordType::A);
        for i in 0..300 {
            many.add_query(Query::query(
                Name::from_ascii(format!("n{i}.tether.internal.")).unwrap(),
                RecordType::A,
            ));
        }
        let bytes = many.to_vec().unwrap();
        assert!(bytes.len() > 4096);
        if let Some(m) = exchange_raw(dns, &bytes) {
            assert!(matches!(
                m.metadata.response_code,
                ResponseCode::FormErr | ResponseCode::Refused
            ));
        }
        // An update is refused.
        let mut update = query("tether.internal.", RecordType::SOA);
        update.metadata.op_code = OpCode::Update;
        let m = exchange_raw(dns, &update.to_vec().unwrap()).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        // Too short to be a message: no answer, and the server lives on.
        assert!(exchange_raw(dns, &[0u8; 5]).is_none());
        let m = ask(dns, "tether.internal.", RecordType::SOA);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    })
    .await
    .unwrap();
    // Answers are counted by response code.
    let metrics = tether_broker::metrics::recorder().render();
    for rcode in ["NOERROR", "REFUSED", "FORMERR"] {
        assert!(
            metrics.contains(&format!(
                "tether_broker_dns_queries_total{{rcode=\"{rcode}\"}}"
            )),
            "{rcode} not counted"
        );
    }
}
