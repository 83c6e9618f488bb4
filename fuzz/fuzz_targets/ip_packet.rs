//! IP and ICMP handling of packets from a tunnel or a gateway: header
//! parsing (IPv4 options, IPv6 extension headers, fragments), TTL,
//! TCP MSS clamping, ICMP errors about a packet, IPv4 fragmentation.
//!
//! Properties: no panic; an ICMP error built about a packet parses, is an
//! ICMP error, goes back to the packet's source and fits the minimum MTU;
//! MSS clamping and TTL decrement leave a packet that parses the same;
//! fragments each fit the MTU, parse, and carry the original's payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_fuzz::router_address;
use tether_proto::ip::{
    self, IPV4_MIN_MTU, IPV6_MIN_MTU, IcmpError, Packet, clamp_mss, decrement_ttl, fragment_ipv4,
    icmp_error,
};
use tether_proto::net::Family;

fuzz_target!(|data: &[u8]| {
    let Some((&knob, bytes)) = data.split_first() else {
        return;
    };
    let Ok(packet) = Packet::parse(bytes) else {
        return;
    };
    let v6 = packet.family == Family::V6;
    let _ = packet.is_icmp_error();
    let _ = ip::check_source(&packet, &[]);
    let kinds = [
        IcmpError::PacketTooBig {
            mtu: 1200 + u16::from(knob),
        },
        IcmpError::TimeExceeded,
        IcmpError::NoRoute,
        IcmpError::AdminProhibited,
    ];
    for kind in kinds {
        let Some(error) = icmp_error(&packet, kind, router_address(v6)) else {
            continue;
        };
        let parsed = Packet::parse(&error).expect("an ICMP error parses");
        assert!(parsed.is_icmp_error(), "{kind:?} is not an ICMP error");
        assert_eq!(parsed.dst, packet.src);
        let limit = if v6 { IPV6_MIN_MTU } else { IPV4_MIN_MTU };
        assert!(error.len() <= limit, "ICMP error of {} bytes", error.len());
    }
    // Work on the packet as the header delimits it (the rest is padding).
    let mut copy = packet.bytes.to_vec();
    if decrement_ttl(&mut copy).is_ok() {
        let after = Packet::parse(&copy).expect("a packet parses after its TTL went down");
        assert_eq!(after.ttl, packet.ttl - 1);
        assert_eq!((after.src, after.dst), (packet.src, packet.dst));
    }
    let mut copy = packet.bytes.to_vec();
    if clamp_mss(&mut copy, 536 + u16::from(knob)) {
        let after = Packet::parse(&copy).expect("a packet parses after MSS clamping");
        assert_eq!(
            (after.src, after.dst, after.total_len),
            (packet.src, packet.dst, packet.total_len)
        );
    }
    let mtu = 68 + usize::from(knob) * 8;
    if let Ok(fragments) = fragment_ipv4(packet.bytes, mtu) {
        let mut payload = 0;
        for f in &fragments {
            assert!(
                f.len() <= mtu,
                "a fragment of {} bytes for MTU {mtu}",
                f.len()
            );
            let p = Packet::parse(f).expect("a fragment parses");
            assert_eq!(
                (p.src, p.dst, p.protocol),
                (packet.src, packet.dst, packet.protocol)
            );
            payload += p.total_len - p.header_len;
        }
        assert_eq!(payload, packet.total_len - packet.header_len);
    }
});
