//! Writes the seed corpora of the fuzz targets: valid inputs of each
//! parser built with tether's own encoders (the values its unit tests use),
//! so fuzzing starts from inputs that reach deep into each parser.
//!
//! Run from `fuzz/`: `cargo run --example seeds` (rewrites `corpus/*/seed-*`).

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use hickory_proto::op::{Edns, Message, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use ipnet::IpNet;
use tether_fuzz::parsed;
use tether_proto::capsule::{Capsule, encode_raw};
use tether_proto::connect_ip::{
    AddressAssign, AddressRequest, AssignedAddress, RequestedAddress, RouteAdvertisement,
    whole_tunnel_path,
};
use tether_proto::datagram::encode_h3_ip_packet;
use tether_proto::dns::{Service, SiteNames, ZoneData};
use tether_proto::gateway::{
    BROKER_CONTROL, GATEWAY_CONTROL, Message as Control, RouteSet, SiteRoute, control_packet,
    zone_chunks,
};
use tether_proto::h3::{self, Request, Response, Settings, frame};
use tether_proto::ip::{self, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
use tether_proto::netmap::Mapping;
use tether_proto::relay_frame::Sender;
use tether_proto::varint;

fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8], df: bool) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).unwrap_or(u16::MAX);
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0x12, 0x34, if df { 0x40 } else { 0 }, 0, 64, proto, 0, 0]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    let sum = ip::checksum(&[&p[..20]]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

fn ipv6(src: &str, dst: &str, next: u8, payload: &[u8]) -> Vec<u8> {
    let src: std::net::Ipv6Addr = parsed(src);
    let dst: std::net::Ipv6Addr = parsed(dst);
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(
        &u16::try_from(payload.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    p.extend_from_slice(&[next, 64]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// A TCP SYN with an MSS option (checksum left 0: the parsers do not
/// check it, the translation adjusts it incrementally).
fn tcp_syn() -> Vec<u8> {
    let mut t = vec![
        0x30, 0x39, 0x01, 0xbb, 0, 0, 0, 1, 0, 0, 0, 0, 0x60, 0x02, 0xff, 0xff,
    ];
    t.extend_from_slice(&[0, 0, 0, 0, 2, 4, 0x05, 0xb4]);
    t
}

fn udp(payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).unwrap_or(u16::MAX);
    let mut u = vec![0x30, 0x39, 0, 53];
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

fn echo(v6: bool) -> Vec<u8> {
    let mut e = vec![if v6 { 128 } else { 8 }, 0, 0, 0, 0x12, 0x34, 0, 1];
    e.extend_from_slice(b"ping payload");
    e
}

/// Packets from the forwarding, ICMP and translation unit tests.
fn packets() -> Vec<Vec<u8>> {
    let mut out = vec![
        ipv4([100, 64, 0, 2], [10, 20, 0, 5], PROTO_TCP, &tcp_syn(), true),
        ipv4(
            [100, 64, 0, 2],
            [100, 64, 0, 3],
            PROTO_ICMP,
            &echo(false),
            false,
        ),
        ipv4(
            [10, 20, 0, 5],
            [100, 64, 0, 2],
            PROTO_UDP,
            &udp(b"query"),
            false,
        ),
        ipv4(
            [100, 64, 0, 2],
            [10, 20, 0, 5],
            PROTO_UDP,
            &udp(&[0x55; 1400]),
            false,
        ),
        ipv4(
            [192, 168, 1, 7],
            [100, 64, 0, 9],
            PROTO_ICMP,
            &echo(false),
            false,
        ),
        ipv4(
            [100, 64, 0, 9],
            [100, 70, 3, 7],
            PROTO_TCP,
            &tcp_syn(),
            true,
        ),
        ipv6("fd00::2", "fd20::5", PROTO_TCP, &tcp_syn()),
        ipv6("fd42:1::7", "fd00::9", PROTO_ICMPV6, &echo(true)),
        ipv6("fd20::5", "fd00:70:3::7", PROTO_UDP, &udp(b"hello")),
    ];
    // An ICMP error about the first packet, as the router builds it.
    if let Ok(p) = ip::Packet::parse(&out[0])
        && let Some(e) = ip::icmp_error(
            &p,
            ip::IcmpError::PacketTooBig { mtu: 1280 },
            parsed("100.64.0.1"),
        )
    {
        out.push(e);
    }
    // A later IPv4 fragment.
    let mut frag = ipv4([100, 64, 0, 2], [10, 20, 0, 5], PROTO_UDP, &[7; 64], false);
    frag[6] = 0x00;
    frag[7] = 0x10;
    out.push(frag);
    out
}

fn capsules() -> Vec<Vec<u8>> {
    let assign = Capsule::AddressAssign(AddressAssign {
        addresses: vec![
            AssignedAddress {
                request_id: 0,
                prefix: parsed("100.64.0.2/32"),
            },
            AssignedAddress {
                request_id: 7,
                prefix: parsed("fd00::2/128"),
            },
        ],
    });
    let request = Capsule::AddressRequest(AddressRequest {
        requests: vec![RequestedAddress {
            request_id: 2,
            prefix: parsed("192.168.1.0/24"),
        }],
    });
    let routes = Capsule::RouteAdvertisement(RouteAdvertisement::from_prefixes([
        parsed::<IpNet>("10.20.0.0/16"),
        parsed("100.64.0.0/16"),
        parsed("fd20::/48"),
    ]));
    let mut dgram = Vec::new();
    let _ = varint::encode(0, &mut dgram);
    dgram.extend_from_slice(&packets()[1]);
    let datagram = Capsule::Datagram(dgram);
    let mut out = Vec::new();
    for c in [assign, request, routes, datagram] {
        let mut bytes = Vec::new();
        let _ = c.encode(&mut bytes);
        out.push(bytes);
    }
    let mut unknown = Vec::new();
    let _ = encode_raw(0x1234, b"skipped", &mut unknown);
    out.push(unknown);
    out.push(out.concat());
    out
}

fn fields_frame(fields: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame::encode(frame::HEADERS, fields, &mut out);
    out
}

fn main() -> std::io::Result<()> {
    let root = Path::new("corpus");
    let write = |target: &str, seeds: Vec<Vec<u8>>| -> std::io::Result<()> {
        let dir = root.join(target);
        fs::create_dir_all(&dir)?;
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
            {
                fs::remove_file(path)?;
            }
        }
        for (i, seed) in seeds.iter().enumerate() {
            fs::write(dir.join(format!("seed-{i:02}")), seed)?;
        }
        Ok(())
    };
    let with = |lead: u8, body: &[u8]| -> Vec<u8> {
        let mut v = vec![lead];
        v.extend_from_slice(body);
        v
    };

    let caps = capsules();
    write("capsule", caps.clone())?;
    // Capsule values (type and length stripped) for connect_ip.
    let value = |c: &Capsule| -> Vec<u8> {
        let mut out = Vec::new();
        match c {
            Capsule::AddressAssign(v) => drop(v.encode(&mut out)),
            Capsule::AddressRequest(v) => drop(v.encode(&mut out)),
            Capsule::RouteAdvertisement(v) => drop(v.encode(&mut out)),
            _ => {}
        }
        out
    };
    let assign = Capsule::AddressAssign(AddressAssign {
        addresses: vec![AssignedAddress {
            request_id: 0,
            prefix: parsed("100.64.0.2/32"),
        }],
    });
    let request = Capsule::AddressRequest(AddressRequest {
        requests: vec![RequestedAddress {
            request_id: 3,
            prefix: parsed("0.0.0.0/24"),
        }],
    });
    let routes = Capsule::RouteAdvertisement(RouteAdvertisement::from_prefixes([
        parsed::<IpNet>("10.20.0.0/16"),
        parsed("fd20::/48"),
    ]));
    write(
        "connect_ip",
        vec![
            with(0, &value(&assign)),
            with(1, &value(&request)),
            with(2, &value(&routes)),
            with(3, whole_tunnel_path().as_bytes()),
            with(3, b"/.well-known/masque/ip/10.20.0.0%2F16/6/"),
            with(3, b"/.well-known/masque/ip/fd20%3A%3A%2F48/%2A/"),
        ],
    )?;
    write(
        "h2_capsule_stream",
        vec![
            with(0x00, &caps.concat()),
            with(0x37, &caps.concat()),
            with(0xf2, &caps[1]),
        ],
    )?;

    // HTTP/3.
    let mut control = Vec::new();
    frame::encode(frame::SETTINGS, &Settings::default().encode(), &mut control);
    let mut goaway = Vec::new();
    frame::encode_goaway(8, &mut goaway);
    let request = Request::new("CONNECT", "broker.example", &whole_tunnel_path())
        .with_header("capsule-protocol", "?1");
    let mut request = request;
    request.protocol = Some("connect-ip".into());
    let enroll = Request::new("POST", "broker.example", "/.well-known/tether/enroll")
        .with_header("content-type", "application/json");
    let response = Response::new(200).with_header("capsule-protocol", "?1");
    let mut stream = fields_frame(&request.encode());
    let mut data = Vec::new();
    frame::encode(frame::DATA, &caps[0], &mut data);
    stream.extend_from_slice(&data);
    write(
        "h3_frames",
        vec![
            with(0x11, &control),
            with(0x00, &[control.clone(), goaway.clone()].concat()),
            with(0xff, &stream),
            with(0x00, &Settings::default().encode()),
        ],
    )?;
    let uni = |stream: u8, bytes: &[u8]| -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in bytes.chunks(255) {
            out.push(stream);
            out.push(u8::try_from(chunk.len()).unwrap_or(255));
            out.extend_from_slice(chunk);
        }
        out
    };
    let conn = h3::Connection::new(h3::Role::Client, Settings::default());
    let control_stream = conn.control_stream();
    write(
        "h3_control",
        vec![
            [vec![0], uni(0, &control_stream), uni(1, &[2]), uni(2, &[3])].concat(),
            [
                vec![1],
                uni(0, &control_stream),
                uni(0, &goaway),
                uni(3, &[0x21, 1, 2]),
            ]
            .concat(),
        ],
    )?;
    let mut response_stream = fields_frame(&Response::new(103).encode());
    response_stream.extend_from_slice(&fields_frame(&response.encode()));
    response_stream.extend_from_slice(&data);
    write(
        "h3_message",
        vec![
            with(0x21, &stream),
            with(0x03, &response_stream),
            with(0x80, &request.encode()),
            with(0x80, &enroll.encode()),
            with(0x80, &response.encode()),
        ],
    )?;

    // Datagrams and packets.
    let pkts = packets();
    write(
        "datagram",
        pkts.iter()
            .take(3)
            .enumerate()
            .map(|(i, p)| {
                let mut out = Vec::new();
                encode_h3_ip_packet(4 * i as u64, p, &mut out);
                out
            })
            .collect(),
    )?;
    write(
        "ip_packet",
        pkts.iter()
            .enumerate()
            .map(|(i, p)| with((i * 37) as u8, p))
            .collect(),
    )?;
    // The same packets relayed by another broker, each behind the
    // trailer naming a sender (the relayed path).
    let senders = [
        Sender::Site {
            site: parsed("a"),
            region: parsed("eu"),
            lan: false,
        },
        Sender::Site {
            site: parsed("c"),
            region: parsed("us"),
            lan: true,
        },
        Sender::Gateway {
            gateway: parsed("local"),
            region: parsed("eu"),
        },
        Sender::Router,
    ];
    write(
        "forward",
        pkts.iter()
            .enumerate()
            .flat_map(|(i, p)| [with(i as u8 & 3, p), with(0x28 | (i as u8 & 3), p)])
            .chain(
                pkts.iter()
                    .enumerate()
                    .map(|(i, p)| with(0x28, &senders[i % senders.len()].frame(p))),
            )
            .collect(),
    )?;
    write(
        "netmap",
        vec![
            with(0, &pkts[4]),
            with(2, &pkts[5]),
            with(0, &pkts[7]),
            with(2, &pkts[8]),
        ],
    )?;

    // The agent's inbound check: the packet after its length, then the
    // site (own addresses and mappings drawn near the packet's destination,
    // given directly or as assigned prefixes).
    let mut inbound = Vec::new();
    for p in [&pkts[4], &pkts[5], &pkts[7], &pkts[8], &pkts[9]] {
        let Ok(len) = u8::try_from(p.len()) else {
            continue;
        };
        for site in [
            &[0x05, 0, 0, 0, 0, 0, 0, 24, 1, 192, 168, 1, 0][..],
            &[0x81, 0, 3, 1, 32],
            &[
                0x86, 2, 0, 0, 20, 0, 0, 0, 24, 0, 0, 0, 24, 1, 10, 0, 0, 0, 1, 11, 0, 0, 0,
            ],
            &[0x00],
        ] {
            let mut input = vec![len];
            input.extend_from_slice(p);
            input.extend_from_slice(site);
            inbound.push(input);
        }
    }
    write("inbound", inbound)?;
    // The zone update: the target draws zones, sites and edits from these
    // bytes; a few patterns of different lengths start it off.
    write(
        "zone_update",
        vec![
            (0u8..=255).collect(),
            (0u8..=255).rev().collect(),
            (0u8..=255).map(|b| b.wrapping_mul(37)).collect(),
            [
                1u8, 0, 2, 0, 0, 0, 7, 5, 1, 2, 3, 1, 1, 2, 1, 4, 1, 0, 2, 1, 0, 1, 3, 3, 3,
            ]
            .repeat(8),
        ],
    )?;

    // The gateway control channel and the zone.
    let zone = ZoneData {
        zone: "tether.internal".into(),
        serial: 7,
        ttl: 5,
        reverse: vec![parsed("100.64.0.0/16"), parsed("fd00:7e7e::/48")],
        sites: vec![
            SiteNames {
                site: parsed("hospital-a"),
                region: parsed("eu"),
                addresses: vec![parsed("100.64.0.2"), parsed("fd00:7e7e::2")],
                services: vec![Service::parse("dicom=104").unwrap_or_else(|e| panic!("{e}"))],
                lans: vec![
                    Mapping::new(parsed("192.168.1.0/24"), parsed("100.64.9.0/24"))
                        .unwrap_or_else(|e| panic!("{e}")),
                ],
            },
            SiteNames {
                site: parsed("lab-b"),
                region: parsed("us"),
                addresses: vec![parsed("100.64.1.9")],
                services: vec![],
                lans: vec![],
            },
        ],
    };
    write("zone_data", vec![zone.encode()])?;
    let set = RouteSet {
        generation: 3,
        routes: vec![
            SiteRoute {
                prefix: parsed("100.64.0.2/32"),
                site: parsed("hospital-a"),
                region: parsed("eu"),
            },
            SiteRoute {
                prefix: parsed("100.70.3.0/24"),
                site: parsed("hospital-a"),
                region: parsed("eu"),
            },
            SiteRoute {
                prefix: parsed("fd00:7e7e::2/128"),
                site: parsed("lab-b"),
                region: parsed("us"),
            },
        ],
    };
    let mut messages: Vec<Vec<u8>> = set.encode().iter().map(Control::encode).collect();
    messages.extend(zone_chunks(&zone).iter().map(Control::encode));
    messages.push(Control::Request.encode());
    let records: Vec<u8> = messages
        .iter()
        .flat_map(|m| {
            let mut r = u16::try_from(m.len())
                .unwrap_or(u16::MAX)
                .to_be_bytes()
                .to_vec();
            r.extend_from_slice(m);
            r
        })
        .collect();
    let packet = control_packet(BROKER_CONTROL, GATEWAY_CONTROL, &messages[0]);
    write("gateway_control", vec![with(0, &records), with(1, &packet)])?;

    // DNS queries.
    let query = |name: &str, qtype: RecordType, edns: Option<u8>| -> Vec<u8> {
        let mut m = Message::new(0x1234, hickory_proto::op::MessageType::Query, OpCode::Query);
        m.add_query(Query::query(
            Name::from_ascii(name).unwrap_or_else(|e| panic!("{e}")),
            qtype,
        ));
        if let Some(version) = edns {
            let mut e = Edns::new();
            e.set_max_payload(1232);
            e.set_version(version);
            m.set_edns(e);
        }
        m.to_vec().unwrap_or_else(|e| panic!("{e}"))
    };
    let reverse = Name::from(IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2)));
    write(
        "dns_query",
        vec![
            query("hospital-a.eu.tether.internal.", RecordType::A, None),
            query("Hospital-A.EU.tether.internal.", RecordType::AAAA, Some(0)),
            query(
                "_dicom._tcp.hospital-a.eu.tether.internal.",
                RecordType::SRV,
                Some(0),
            ),
            query(&reverse.to_ascii(), RecordType::PTR, None),
            query("tether.internal.", RecordType::SOA, Some(1)),
            query("example.com.", RecordType::A, None),
        ],
    )?;

    // JSON bodies and query strings.
    write(
        "api_json",
        vec![
            with(0, br#"{"token":"abc.def","csr":"MIIB"}"#),
            with(1, br#"{"csr":"MIIB"}"#),
            with(2, br#"{"site":"hospital-a","region":"eu","ttl":"24h"}"#),
            with(
                3,
                b"site=hospital-a&region=eu&kind=site-lan&prefix=100.70.0.0%2F16",
            ),
            with(4, b"from=100.64.0.2&traffic=tcp%2F443"),
            with(7, br#"{"error":"invalid token"}"#),
            with(
                12,
                br#"{"site":"hospital-a","region":"eu","closed_session":true}"#,
            ),
        ],
    )?;
    let (key, csr) =
        tether_pki::ca::site_key_and_csr("hospital-a").unwrap_or_else(|e| panic!("{e}"));
    drop(key);
    let csr64 = data_encoding::BASE64.encode(&csr);
    write(
        "enroll",
        vec![
            with(
                0,
                format!(r#"{{"token":"abc.def","csr":"{csr64}"}}"#).as_bytes(),
            ),
            with(1, format!(r#"{{"csr":"{csr64}"}}"#).as_bytes()),
            with(2, &csr),
        ],
    )?;
    Ok(())
}
