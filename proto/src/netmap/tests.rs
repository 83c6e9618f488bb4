//! The translation against packets built from scratch: a translated packet
//! must be byte for byte the packet the sender would have built had it used
//! the other addresses, checksums included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;

use super::*;
use crate::ip::{self, IcmpError, icmp_error};

/// Fills in every checksum of a packet built with zeros in their place: the
/// IPv4 header's, and the transport's (TCP, UDP, ICMP, ICMPv6) unless the
/// packet is a later fragment. `udp_zero`: leave a UDP-over-IPv4 checksum
/// at 0 ("none").
fn fill_checksums(packet: &mut [u8], udp_zero: bool) {
    let p = Packet::parse(packet).unwrap();
    let (family, protocol, l4, later) = (p.family, p.protocol, p.header_len, p.later_fragment);
    if family == Family::V4 {
        packet[10..12].copy_from_slice(&[0, 0]);
        let sum = ip::checksum(&[&packet[..l4]]);
        packet[10..12].copy_from_slice(&sum.to_be_bytes());
    }
    if later {
        return;
    }
    let at = match protocol {
        PROTO_TCP => 16,
        PROTO_UDP => 6,
        PROTO_ICMP | PROTO_ICMPV6 => 2,
        _ => return,
    };
    if protocol == PROTO_UDP && family == Family::V4 && udp_zero {
        return;
    }
    if packet.len() < l4 + at + 2 {
        // Cut short on purpose: no transport checksum to fill.
        return;
    }
    packet[l4 + at..l4 + at + 2].copy_from_slice(&[0, 0]);
    let sum = transport_sum(packet, family, protocol, l4);
    let sum = if protocol == PROTO_UDP && sum == 0 {
        0xffff
    } else {
        sum
    };
    packet[l4 + at..l4 + at + 2].copy_from_slice(&sum.to_be_bytes());
}

/// The checksum over the transport part with its pseudo-header (none for
/// ICMP); 0 when the stored checksum is right.
fn transport_sum(packet: &[u8], family: Family, protocol: u8, l4: usize) -> u16 {
    let len = u32::try_from(packet.len() - l4).unwrap();
    match (family, protocol) {
        (Family::V4, PROTO_ICMP) => ip::checksum(&[&packet[l4..]]),
        (Family::V4, _) => {
            let mut pseudo = [0u8; 12];
            pseudo[..8].copy_from_slice(&packet[12..20]);
            pseudo[9] = protocol;
            pseudo[10..12].copy_from_slice(&(len as u16).to_be_bytes());
            ip::checksum(&[&pseudo, &packet[l4..]])
        }
        (Family::V6, _) => {
            let mut pseudo = [0u8; 40];
            pseudo[..32].copy_from_slice(&packet[8..40]);
            pseudo[32..36].copy_from_slice(&len.to_be_bytes());
            pseudo[39] = protocol;
            ip::checksum(&[&pseudo, &packet[l4..]])
        }
    }
}

/// Whether every checksum of the packet verifies.
fn checksums_valid(packet: &[u8]) -> bool {
    let p = Packet::parse(packet).unwrap();
    if p.family == Family::V4 && ip::checksum(&[&packet[..p.header_len]]) != 0 {
        return false;
    }
    if p.later_fragment {
        return true;
    }
    let udp_none = p.protocol == PROTO_UDP
        && p.family == Family::V4
        && packet[p.header_len + 6..p.header_len + 8] == [0, 0];
    if udp_none
        || !matches!(
            p.protocol,
            PROTO_TCP | PROTO_UDP | PROTO_ICMP | PROTO_ICMPV6
        )
    {
        return true;
    }
    transport_sum(packet, p.family, p.protocol, p.header_len) == 0
}

/// A transport segment: TCP with `options` (a multiple of 4 bytes), UDP,
/// or an ICMP / ICMPv6 echo request, followed by `payload`; checksum 0.
fn segment(protocol: u8, family: Family, options: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = match protocol {
        PROTO_TCP => {
            let offset = (20 + options.len()) / 4;
            let mut h = vec![0x1f, 0x90, 0xc3, 0x50, 0, 0, 0, 7, 0, 0, 0, 9];
            h.push((offset as u8) << 4);
            h.extend_from_slice(&[0x18, 0xff, 0xff, 0, 0, 0, 0]);
            h.extend_from_slice(options);
            h
        }
        PROTO_UDP => {
            let len = (8 + payload.len()) as u16;
            let mut h = vec![0x13, 0x88, 0x00, 0x35];
            h.extend_from_slice(&len.to_be_bytes());
            h.extend_from_slice(&[0, 0]);
            h
        }
        _ => {
            let kind = if family == Family::V4 { 8 } else { 128 };
            vec![kind, 0, 0, 0, 0x12, 0x34, 0, 1]
        }
    };
    out.extend_from_slice(payload);
    out
}

/// An IPv4 packet with header `options` (a multiple of 4 bytes).
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, options: &[u8], l4: &[u8]) -> Vec<u8> {
    let ihl = (20 + options.len()) / 4;
    let total = (ihl * 4 + l4.len()) as u16;
    let mut out = vec![0x40 | ihl as u8, 0];
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&[0xab, 0xcd, 0x40, 0, 61, protocol, 0, 0]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    out.extend_from_slice(options);
    out.extend_from_slice(l4);
    out
}

/// An IPv6 packet; `options` non-empty puts a hop-by-hop and a
/// destination options header (half of `options` each, padded to 8
/// bytes) before the transport header.
fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, protocol: u8, options: &[u8], l4: &[u8]) -> Vec<u8> {
    let header = |next: u8, data: &[u8]| {
        let len = (2 + data.len()).div_ceil(8) * 8;
        let mut h = vec![next, (len / 8 - 1) as u8];
        h.extend_from_slice(data);
        h.resize(len, 0);
        h
    };
    let (first, extensions) = if options.is_empty() {
        (protocol, Vec::new())
    } else {
        let (hop, dest) = options.split_at(options.len() / 2);
        // Hop-by-hop (0) first, then destination options (60).
        (0, [header(60, hop), header(protocol, dest)].concat())
    };
    let mut out = vec![0x60, 0, 0, 0];
    out.extend_from_slice(&((extensions.len() + l4.len()) as u16).to_be_bytes());
    out.extend_from_slice(&[first, 61]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    out.extend_from_slice(&extensions);
    out.extend_from_slice(l4);
    out
}

/// A packet from `src` to `dst` with every checksum right.
fn packet(
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    ip_options: &[u8],
    tcp_options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut out = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let protocol = if protocol == PROTO_ICMPV6 {
                PROTO_ICMP
            } else {
                protocol
            };
            let l4 = segment(protocol, Family::V4, tcp_options, payload);
            ipv4(s, d, protocol, ip_options, &l4)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let protocol = if protocol == PROTO_ICMP {
                PROTO_ICMPV6
            } else {
                protocol
            };
            let l4 = segment(protocol, Family::V6, tcp_options, payload);
            ipv6(s, d, protocol, ip_options, &l4)
        }
        _ => unreachable!(),
    };
    fill_checksums(&mut out, false);
    out
}

fn map(real: &str, mapped: &str) -> LanMap {
    LanMap::new(vec![
        Mapping::new(real.parse().unwrap(), mapped.parse().unwrap()).unwrap(),
    ])
    .unwrap()
}

#[test]
fn addresses_keep_their_host_part() {
    let m = map("192.168.1.0/24", "100.70.3.0/24");
    assert_eq!(
        m.real_of("100.70.3.20".parse().unwrap()),
        Some("192.168.1.20".parse().unwrap())
    );
    assert_eq!(
        m.mapped_of("192.168.1.20".parse().unwrap()),
        Some("100.70.3.20".parse().unwrap())
    );
    assert_eq!(m.mapped_of("192.168.2.20".parse().unwrap()), None);
    let m6 = map("fd00:1:2:3::/64", "fd7a:115c:a1e0:42::/64");
    assert_eq!(
        m6.real_of("fd7a:115c:a1e0:42::20".parse().unwrap()),
        Some("fd00:1:2:3::20".parse().unwrap())
    );
}

#[test]
fn mappings_must_be_one_to_one() {
    let shape = Mapping::new(
        "192.168.1.0/24".parse().unwrap(),
        "100.70.0.0/16".parse().unwrap(),
    );
    assert!(matches!(shape, Err(MappingError::Shape { .. })));
    let family = Mapping::new(
        "192.168.1.0/24".parse().unwrap(),
        "fd00::/24".parse().unwrap(),
    );
    assert!(matches!(family, Err(MappingError::Shape { .. })));
    let a = Mapping::new(
        "192.168.1.0/24".parse().unwrap(),
        "100.70.3.0/24".parse().unwrap(),
    )
    .unwrap();
    let b = Mapping::new(
        "192.168.0.0/23".parse().unwrap(),
        "100.70.4.0/23".parse().unwrap(),
    )
    .unwrap();
    assert!(matches!(
        LanMap::new(vec![a, b]),
        Err(MappingError::Overlap { .. })
    ));
    // A LAN that is also someone's mapped prefix would translate twice.
    let c = Mapping::new(
        "100.70.3.0/24".parse().unwrap(),
        "100.70.9.0/24".parse().unwrap(),
    )
    .unwrap();
    assert!(matches!(
        LanMap::new(vec![a, c]),
        Err(MappingError::Overlap { .. })
    ));
}

#[test]
fn a_ping_into_the_lan_and_its_reply() {
    let m = map("192.168.1.0/24", "100.70.3.0/24");
    let backend: IpAddr = "100.64.0.9".parse().unwrap();
    let mut ping = packet(
        backend,
        "100.70.3.20".parse().unwrap(),
        PROTO_ICMP,
        &[],
        &[],
        b"hello",
    );
    assert_eq!(m.to_lan(&mut ping), Ok(Outcome::Translated));
    let expected = packet(
        backend,
        "192.168.1.20".parse().unwrap(),
        PROTO_ICMP,
        &[],
        &[],
        b"hello",
    );
    assert_eq!(ping, expected);
    let mut reply = packet(
        "192.168.1.20".parse().unwrap(),
        backend,
        PROTO_UDP,
        &[],
        &[],
        b"pong",
    );
    assert_eq!(m.from_lan(&mut reply), Ok(Outcome::Translated));
    let expected = packet(
        "100.70.3.20".parse().unwrap(),
        backend,
        PROTO_UDP,
        &[],
        &[],
        b"pong",
    );
    assert_eq!(reply, expected);
}

#[test]
fn the_edge_hosts_own_traffic_is_untouched() {
    let m = map("192.168.1.0/24", "100.70.3.0/24");
    let original = packet(
        "100.64.0.9".parse().unwrap(),
        "100.64.1.2".parse().unwrap(),
        PROTO_TCP,
        &[],
        &[],
        b"x",
    );
    let mut p = original.clone();
    assert_eq!(m.to_lan(&mut p), Ok(Outcome::Untouched));
    assert_eq!(m.from_lan(&mut p), Ok(Outcome::Untouched));
    assert_eq!(p, original);
}

#[test]
fn udp_without_a_checksum_stays_without() {
    let m = map("192.168.1.0/24", "100.70.3.0/24");
    let l4 = segment(PROTO_UDP, Family::V4, &[], b"no sum");
    let mut p = ipv4(
        "192.168.1.7".parse().unwrap(),
        "100.64.0.9".parse().unwrap(),
        PROTO_UDP,
        &[],
        &l4,
    );
    fill_checksums(&mut p, true);
    m.from_lan(&mut p).unwrap();
    assert_eq!(&p[26..28], &[0, 0]);
    assert!(checksums_valid(&p));
}

#[test]
fn later_fragments_translate_their_ip_header_only() {
    let m = map("192.168.1.0/24", "100.70.3.0/24");
    let mut p = ipv4(
        "100.64.0.9".parse().unwrap(),
        "100.70.3.20".parse().unwrap(),
        PROTO_UDP,
        &[],
        b"the middle of a datagram",
    );
    p[6..8].copy_from_slice(&0x2003u16.to_be_bytes()); // MF, offset 24
    fill_checksums(&mut p, false);
    let tail = p[20..].to_vec();
    assert_eq!(m.to_lan(&mut p), Ok(Outcome::Translated));
    assert_eq!(&p[16..20], &[192, 168, 1, 20]);
    assert_eq!(
        &p[20..],
        &tail[..],
        "a later fragment's data is not a header"
    );
    assert!(checksums_valid(&p));
}

#[test]
fn protocols_that_cannot_be_translated_are_refused() {
    let m = map("192.168.1.0/24", "100.70.3.0/24");
    // AH authenticates the addresses; DCCP's checksum covers them.
    for protocol in [51, 33, 136] {
        let mut p = ipv4(
            "100.64.0.9".parse().unwrap(),
            "100.70.3.20".parse().unwrap(),
            protocol,
            &[],
            &[0; 24],
        );
        fill_checksums(&mut p, false);
        let before = p.clone();
        assert_eq!(m.to_lan(&mut p), Err(Refused::Protocol(protocol)));
        assert_eq!(p, before, "a refused packet is left as it was");
    }
    // AH among IPv6 extension headers, in front of TCP, is refused the
    // same (the parser walks past it to TCP).
    let m6 = map("fd42:1::/64", "fd00:70:3::/64");
    let tcp = segment(PROTO_TCP, Family::V6, &[], b"payload");
    let mut ah = vec![PROTO_TCP, 4, 0, 0];
    ah.extend_from_slice(&[0; 20]);
    let mut p = ipv6(
        "fd00::9".parse().unwrap(),
        "fd00:70:3::20".parse().unwrap(),
        51,
        &[],
        &[ah, tcp].concat(),
    );
    assert_eq!(Packet::parse(&p).unwrap().protocol, PROTO_TCP);
    let before = p.clone();
    assert_eq!(m6.to_lan(&mut p), Err(Refused::Protocol(51)));
    assert_eq!(p, before);
    assert_eq!(Refused::Protocol(51).as_str(), "lan_map_protocol");
    // GRE, ESP, SCTP: nothing covers the addresses.
    for protocol in [47, 50, 132] {
        let mut p = ipv4(
            "100.64.0.9".parse().unwrap(),
            "100.70.3.20".parse().unwrap(),
            protocol,
            &[],
            &[0; 24],
        );
        fill_checksums(&mut p, false);
        assert_eq!(m.to_lan(&mut p), Ok(Outcome::Translated));
        assert!(checksums_valid(&p));
    }
    // A TCP header cut short.
    let mut p = ipv4(
        "100.64.0.9".parse().unwrap(),
        "100.70.3.20".parse().unwrap(),
        PROTO_TCP,
        &[],
        &[0; 10],
    );
    fill_checksums(&mut p, false);
    assert_eq!(m.to_lan(&mut p), Err(Refused::Malformed));
}

/// The error a router in the cloud sends about a packet a LAN host sent:
/// after `to_lan` it is the error the router would have sent had the LAN
/// host's real address been on the packet.
#[test]
fn errors_about_lan_packets_quote_the_real_address() {
    for (real, mapped, host, remote, router) in [
        (
            "192.168.1.0/24",
            "100.70.3.0/24",
            "192.168.1.20",
            "100.64.0.9",
            "100.64.0.1",
        ),
        (
            "fd00:1:2:3::/64",
            "fd7a:115c:a1e0:42::/64",
            "fd00:1:2:3::20",
            "fd7a:115c:a1e0::9",
            "fd7a:115c:a1e0::1",
        ),
    ] {
        let m = map(real, mapped);
        let host: IpAddr = host.parse().unwrap();
        let remote: IpAddr = remote.parse().unwrap();
        let router: IpAddr = router.parse().unwrap();
        let sent = packet(host, remote, PROTO_TCP, &[], &[1, 1, 1, 1], &[7; 600]);
        let mut seen = sent.clone();
        m.from_lan(&mut seen).unwrap();
        let kind = IcmpError::PacketTooBig { mtu: 1280 };
        let mut error = icmp_error(&Packet::parse(&seen).unwrap(), kind, router).unwrap();
        assert_eq!(m.to_lan(&mut error), Ok(Outcome::Translated));
        let expected = icmp_error(&Packet::parse(&sent).unwrap(), kind, router).unwrap();
        // The quoted TTL and everything else match; compare whole packets.
        assert_eq!(error, expected, "{real}");
        assert!(checksums_valid(&error));
    }
}

/// The error the edge host (or a LAN router) sends about a packet for the
/// LAN: the quoted destination becomes the mapped address the backend used,
/// though the error's own source is not in the LAN.
#[test]
fn errors_from_the_lan_quote_the_mapped_address() {
    let m = map("192.168.1.0/24", "100.70.3.0/24");
    let backend: IpAddr = "100.64.0.9".parse().unwrap();
    let edge: IpAddr = "100.64.1.2".parse().unwrap();
    let used = packet(
        backend,
        "100.70.3.20".parse().unwrap(),
        PROTO_UDP,
        &[],
        &[],
        b"query",
    );
    let mut arrived = used.clone();
    m.to_lan(&mut arrived).unwrap();
    let mut error =
        icmp_error(&Packet::parse(&arrived).unwrap(), IcmpError::NoRoute, edge).unwrap();
    assert_eq!(m.from_lan(&mut error), Ok(Outcome::Translated));
    let expected = icmp_error(&Packet::parse(&used).unwrap(), IcmpError::NoRoute, edge).unwrap();
    assert_eq!(error, expected);
}

fn v4_mapping() -> impl Strategy<Value = (Ipv4Net, Ipv4Net)> {
    (8u8..=30, any::<u32>(), any::<u32>()).prop_filter_map("overlap", |(len, a, b)| {
        let real = Ipv4Net::new(Ipv4Addr::from(a), len).unwrap().trunc();
        let mapped = Ipv4Net::new(Ipv4Addr::from(b), len).unwrap().trunc();
        (!real.contains(&mapped) && !mapped.contains(&real)).then_some((real, mapped))
    })
}

fn v6_mapping() -> impl Strategy<Value = (Ipv6Net, Ipv6Net)> {
    (16u8..=120, any::<u128>(), any::<u128>()).prop_filter_map("overlap", |(len, a, b)| {
        let real = Ipv6Net::new(Ipv6Addr::from(a), len).unwrap().trunc();
        let mapped = Ipv6Net::new(Ipv6Addr::from(b), len).unwrap().trunc();
        (!real.contains(&mapped) && !mapped.contains(&real)).then_some((real, mapped))
    })
}

/// A host inside `net`, from random bits.
fn host_in(net: IpNet, bits: u128) -> IpAddr {
    match net {
        IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(
            u32::from(n.network()) | (bits as u32 & u32::from(n.hostmask())),
        )),
        IpNet::V6(n) => IpAddr::V6(Ipv6Addr::from(
            u128::from(n.network()) | (bits & u128::from(n.hostmask())),
        )),
    }
}

/// A remote address outside both prefixes.
fn remote_outside(m: &Mapping, bits: u128) -> Option<IpAddr> {
    let addr = match m.real {
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(bits as u32)),
        IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(bits)),
    };
    (!m.real.contains(&addr) && !m.mapped.contains(&addr)).then_some(addr)
}

fn mapping() -> impl Strategy<Value = Mapping> {
    prop_oneof![
        v4_mapping().prop_map(|(r, m)| Mapping::new(r.into(), m.into()).unwrap()),
        v6_mapping().prop_map(|(r, m)| Mapping::new(r.into(), m.into()).unwrap()),
    ]
}

/// An ICMP error that arrives with a wrong checksum (corrupted on the
/// way) must not leave with a right one, and translating it back must
/// restore it byte for byte. Found by the `netmap` fuzz target: the
/// error's checksum used to be recomputed from scratch.
#[test]
fn corrupted_icmp_errors_stay_corrupted() {
    for (real, mapped, host, remote) in [
        (
            "192.168.1.0/24",
            "100.70.3.0/24",
            "192.168.1.7",
            "100.64.0.9",
        ),
        ("fd42:1::/64", "fd00:70:3::/64", "fd42:1::7", "fd00::9"),
    ] {
        let (host, remote): (IpAddr, IpAddr) = (host.parse().unwrap(), remote.parse().unwrap());
        let there = map(real, mapped);
        let back = map(mapped, real);
        // The LAN host reports that a packet it received from the remote
        // end could not be delivered: the error quotes that packet.
        let quoted = packet(remote, host, PROTO_UDP, &[], &[], b"quoted");
        let original = Packet::parse(&quoted).unwrap();
        let mut error = icmp_error(&original, IcmpError::NoRoute, host).unwrap();
        let l4 = Packet::parse(&error).unwrap().header_len;
        assert_eq!(transport_sum_of(&error, l4), 0, "built right");
        error[l4 + 2] ^= 0x5a;
        let corrupted = error.clone();

        assert_eq!(there.from_lan(&mut error), Ok(Outcome::Translated));
        assert_ne!(
            transport_sum_of(&error, l4),
            0,
            "the corruption must stay visible"
        );
        assert_eq!(back.from_lan(&mut error), Ok(Outcome::Translated));
        assert_eq!(error, corrupted);
    }
    // The bytes the fuzzer found: an ICMPv6 error (type 100) whose quote
    // is not an IP header, and whose checksum is wrong.
    let mut found: Vec<u8> = vec![
        96, 0, 0, 0, 0, 20, 58, 64, 253, 66, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 189, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 93, 2, 100, 69, 58, 10, 0, 212, 162, 68, 255, 255, 255, 1,
        0, 0, 97, 121, 108, 111, 97, 100,
    ];
    let original = found.clone();
    let there = map("fd42:1::/64", "fd00:70:3::/64");
    let back = map("fd00:70:3::/64", "fd42:1::/64");
    assert_eq!(there.from_lan(&mut found), Ok(Outcome::Translated));
    assert_eq!(back.from_lan(&mut found), Ok(Outcome::Translated));
    assert_eq!(found, original);
}

/// 0 when the ICMP or ICMPv6 checksum of `packet` (transport at `l4`) is
/// right.
fn transport_sum_of(packet: &[u8], l4: usize) -> u16 {
    let p = Packet::parse(packet).unwrap();
    transport_sum(packet, p.family, p.protocol, l4)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Leaving the LAN and coming back: each step yields exactly the packet
    /// built with the other addresses, checksums right, and the reverse
    /// mapping restores the original byte for byte. `ip_options` are IPv4
    /// options, or IPv6 hop-by-hop and destination options headers.
    #[test]
    fn translation_is_exact_and_round_trips(
        m in mapping(),
        host_bits in any::<u128>(),
        remote_bits in any::<u128>(),
        protocol in prop::sample::select(vec![PROTO_TCP, PROTO_UDP, PROTO_ICMP]),
        ip_options in prop::collection::vec(any::<[u8; 4]>(), 0..=10),
        tcp_options in prop::collection::vec(any::<[u8; 4]>(), 0..=10),
        payload in prop::collection::vec(any::<u8>(), 0..1400),
    ) {
        let Some(remote) = remote_outside(&m, remote_bits) else { return Ok(()) };
        let host = host_in(m.real, host_bits);
        let mapped_host = host_in(m.mapped, host_bits);
        let ip_options: Vec<u8> = ip_options.concat();
        let tcp_options: Vec<u8> = tcp_options.concat();
        let map = LanMap::new(vec![m]).unwrap();
        let reverse = LanMap::new(vec![Mapping::new(m.mapped, m.real).unwrap()]).unwrap();

        let original = packet(host, remote, protocol, &ip_options, &tcp_options, &payload);
        let mut out = original.clone();
        prop_assert_eq!(map.from_lan(&mut out), Ok(Outcome::Translated));
        let expected = packet(mapped_host, remote, protocol, &ip_options, &tcp_options, &payload);
        prop_assert_eq!(&out, &expected);
        prop_assert!(checksums_valid(&out));
        prop_assert_eq!(reverse.from_lan(&mut out), Ok(Outcome::Translated));
        prop_assert_eq!(&out, &original);

        let inbound = packet(remote, mapped_host, protocol, &ip_options, &tcp_options, &payload);
        let mut into = inbound.clone();
        prop_assert_eq!(map.to_lan(&mut into), Ok(Outcome::Translated));
        let expected = packet(remote, host, protocol, &ip_options, &tcp_options, &payload);
        prop_assert_eq!(&into, &expected);
        prop_assert!(checksums_valid(&into));
    }

    /// Errors about translated packets, either way, quote what the other
    /// side sent.
    #[test]
    fn icmp_errors_quote_the_translated_header(
        m in mapping(),
        host_bits in any::<u128>(),
        remote_bits in any::<u128>(),
        protocol in prop::sample::select(vec![PROTO_TCP, PROTO_UDP, PROTO_ICMP]),
        payload in prop::collection::vec(any::<u8>(), 0..1400),
        kind in prop::sample::select(vec![
            IcmpError::PacketTooBig { mtu: 1280 },
            IcmpError::TimeExceeded,
            IcmpError::NoRoute,
            IcmpError::AdminProhibited,
        ]),
    ) {
        let Some(remote) = remote_outside(&m, remote_bits) else { return Ok(()) };
        let Some(router) = remote_outside(&m, remote_bits.rotate_left(17)) else { return Ok(()) };
        let host = host_in(m.real, host_bits);
        let mapped_host = host_in(m.mapped, host_bits);
        let map = LanMap::new(vec![m]).unwrap();

        // About a packet from the LAN, coming back through the tunnel.
        let sent = packet(host, remote, protocol, &[], &[], &payload);
        let mut seen = sent.clone();
        map.from_lan(&mut seen).unwrap();
        let about = Packet::parse(&seen).unwrap();
        if let (Some(mut error), Some(expected)) = (
            icmp_error(&about, kind, router),
            icmp_error(&Packet::parse(&sent).unwrap(), kind, router),
        ) {
            prop_assert_eq!(map.to_lan(&mut error), Ok(Outcome::Translated));
            prop_assert_eq!(&error, &expected);
            prop_assert!(checksums_valid(&error));
        }

        // About a packet into the LAN, sent by the edge host or a LAN router.
        let used = packet(remote, mapped_host, protocol, &[], &[], &payload);
        let mut arrived = used.clone();
        map.to_lan(&mut arrived).unwrap();
        for from in [router, host] {
            if let (Some(mut error), Some(expected)) = (
                icmp_error(&Packet::parse(&arrived).unwrap(), kind, from),
                icmp_error(&Packet::parse(&used).unwrap(), kind, map.mapped_of(from).unwrap_or(from)),
            ) {
                prop_assert_eq!(map.from_lan(&mut error), Ok(Outcome::Translated));
                prop_assert_eq!(&error, &expected);
                prop_assert!(checksums_valid(&error));
            }
        }
    }
}

/// The site's own addresses and one mapped LAN, as the broker assigned
/// them.
fn inbound() -> Inbound {
    let assigned: Vec<IpNet> = ["100.64.1.2/32", "fd7a:115c:a1e0::1:2/128", "100.70.3.0/24"]
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();
    Inbound::default()
        .with_map(map("192.168.1.0/24", "100.70.3.0/24"))
        .with_assigned(&assigned)
}

#[test]
fn the_site_takes_its_own_addresses_and_its_mapped_lans_only() {
    let site = inbound();
    assert_eq!(
        site.own(),
        [
            "100.64.1.2".parse::<IpAddr>().unwrap(),
            "fd7a:115c:a1e0::1:2".parse().unwrap()
        ]
    );
    let backend: IpAddr = "100.64.0.9".parse().unwrap();
    let to = |dst: &str| packet(backend, dst.parse().unwrap(), PROTO_TCP, &[], &[], b"x");

    // Its own address: written as it came.
    let original = to("100.64.1.2");
    let mut p = original.clone();
    assert_eq!(site.to_device(&mut p), Ok(Outcome::Untouched));
    assert_eq!(p, original);
    // A mapped address: translated into the LAN.
    let mut p = to("100.70.3.20");
    assert_eq!(site.to_device(&mut p), Ok(Outcome::Translated));
    assert_eq!(
        Packet::parse(&p).unwrap().dst,
        "192.168.1.20".parse::<IpAddr>().unwrap()
    );

    // Anything else is refused, unchanged: a real LAN address (the broker
    // routes only the mapped prefix), another overlay address, a LAN
    // address outside the exposed prefix, another site's IPv6 address.
    for dst in ["192.168.1.20", "192.168.2.40", "100.64.1.3", "100.70.4.1"] {
        let original = to(dst);
        let mut p = original.clone();
        assert_eq!(site.to_device(&mut p), Err(Refused::NotForSite), "{dst}");
        assert_eq!(p, original, "{dst}");
    }
    let v6 = packet(
        "fd7a:115c:a1e0::9".parse().unwrap(),
        "fd7a:115c:a1e0::1:3".parse().unwrap(),
        PROTO_UDP,
        &[],
        &[],
        b"x",
    );
    assert_eq!(site.admits(&v6), Err(Refused::NotForSite));
    assert_eq!(Refused::NotForSite.as_str(), "not_for_site");

    // A site without LANs still takes only its own addresses.
    let plain = Inbound::default().with_assigned(&["100.64.1.2/32".parse().unwrap()]);
    assert_eq!(
        plain.to_device(&mut to("100.64.1.2")),
        Ok(Outcome::Untouched)
    );
    assert_eq!(
        plain.to_device(&mut to("100.70.3.20")),
        Err(Refused::NotForSite)
    );
    // And before the broker assigned anything, nothing.
    assert_eq!(
        Inbound::default().admits(&to("100.64.1.2")),
        Err(Refused::NotForSite)
    );
    // A header cut short has no destination.
    assert_eq!(
        site.admits(&to("100.64.1.2")[..12]),
        Err(Refused::Malformed)
    );
    assert_eq!(site.admits(&[]), Err(Refused::Malformed));
}

#[test]
fn errors_to_the_site_or_its_lan_hosts_are_taken() {
    let site = inbound();
    let router: IpAddr = "100.64.0.1".parse().unwrap();
    // About a packet a LAN host sent (its source mapped): the error comes
    // to the mapped address and is translated, quote included.
    let sent = packet(
        "100.70.3.20".parse().unwrap(),
        "100.64.0.9".parse().unwrap(),
        PROTO_UDP,
        &[],
        &[],
        b"x",
    );
    let mut error = icmp_error(&Packet::parse(&sent).unwrap(), IcmpError::NoRoute, router).unwrap();
    assert_eq!(site.to_device(&mut error), Ok(Outcome::Translated));
    assert_eq!(
        Packet::parse(&error).unwrap().dst,
        "192.168.1.20".parse::<IpAddr>().unwrap()
    );
    // About a packet the edge host sent: to its own address.
    let sent = packet(
        "100.64.1.2".parse().unwrap(),
        "100.64.0.9".parse().unwrap(),
        PROTO_TCP,
        &[],
        &[],
        b"x",
    );
    let mut error = icmp_error(
        &Packet::parse(&sent).unwrap(),
        IcmpError::PacketTooBig { mtu: 1280 },
        router,
    )
    .unwrap();
    assert!(site.to_device(&mut error).is_ok());
}

proptest! {
    /// Against a naive reference: a packet is taken exactly when its
    /// destination is one of the site's addresses or in a mapped prefix,
    /// and what is taken leaves for an own address or a real LAN address.
    #[test]
    fn the_site_takes_what_the_reference_takes(
        m in mapping(),
        own_bits in prop::collection::vec(any::<u128>(), 0..3),
        dst_bits in any::<u128>(),
        pick in 0u8..3,
    ) {
        let map = LanMap::new(vec![m]).unwrap();
        let own: Vec<IpAddr> = own_bits.iter().filter_map(|b| remote_outside(&m, *b)).collect();
        let site = Inbound::new(own.clone(), map);
        let dst = match pick {
            0 => host_in(m.mapped, dst_bits),
            1 => own.first().copied().unwrap_or(host_in(m.real, dst_bits)),
            _ => host_in(m.real, dst_bits),
        };
        let Some(src) = remote_outside(&m, dst_bits.rotate_left(29)) else { return Ok(()) };
        let mut p = packet(src, dst, PROTO_UDP, &[], &[], b"x");
        let expected = own.contains(&dst) || m.mapped.contains(&dst);
        let got = site.to_device(&mut p);
        prop_assert_eq!(got.is_ok(), expected, "{:?} to {}", got, dst);
        if got.is_ok() {
            let now = Packet::parse(&p).unwrap().dst;
            prop_assert!(own.contains(&now) || m.real.contains(&now));
        } else {
            prop_assert_eq!(got, Err(Refused::NotForSite));
        }
    }
}
