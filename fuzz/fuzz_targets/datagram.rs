//! HTTP Datagrams (RFC 9297) as they arrive in QUIC DATAGRAM frames: the
//! Quarter Stream ID, the context ID and the IP packet.
//!
//! Properties: no panic; an IP packet payload re-encoded for the same
//! stream parses back to the same stream and packet; the prefix and
//! overhead helpers agree with the encoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto::datagram::{
    Payload, encode_h3_ip_packet, h3_overhead, h3_prefix, parse_h3, parse_payload,
};

fuzz_target!(|data: &[u8]| {
    let Ok((stream_id, payload)) = parse_h3(data) else {
        let _ = parse_payload(data);
        return;
    };
    let Ok(Payload::IpPacket(packet)) = parse_payload(payload) else {
        return;
    };
    let mut out = Vec::new();
    encode_h3_ip_packet(stream_id, packet, &mut out);
    let prefix = h3_prefix(stream_id);
    assert_eq!(prefix.len(), h3_overhead(stream_id));
    assert!(out.starts_with(&prefix));
    let (again_id, again) = parse_h3(&out).expect("an encoded datagram parses");
    assert_eq!(again_id, stream_id);
    assert_eq!(parse_payload(again), Ok(Payload::IpPacket(packet)));
});
