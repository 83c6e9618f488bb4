//! HTTP Datagrams (RFC 9297) as CONNECT-IP uses them (RFC 9484, section 6).
//!
//! An HTTP Datagram payload is `Context ID (i) | Payload (..)`. Context ID 0
//! carries a full IP packet; other context IDs are extensions that must be
//! dropped when not negotiated. On HTTP/3 the payload travels in a QUIC
//! DATAGRAM frame prefixed with the Quarter Stream ID (the request stream ID
//! divided by four); on HTTP/2 it travels in a DATAGRAM capsule.

use thiserror::Error;

use crate::varint;

/// Context ID whose payload is a full IP packet.
pub const IP_PACKET_CONTEXT: u64 = 0;

/// Why a datagram could not be interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DatagramError {
    /// The datagram ended inside a variable-length integer.
    #[error("datagram ends inside a variable-length integer")]
    Truncated,
    /// The Quarter Stream ID does not belong to a client-initiated
    /// bidirectional stream.
    #[error("quarter stream ID {0} is out of range")]
    BadQuarterStreamId(u64),
}

/// The content of an HTTP Datagram payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload<'a> {
    /// Context ID 0: an IP packet.
    IpPacket(&'a [u8]),
    /// Another context ID, not negotiated by tether: drop it.
    UnknownContext(u64),
}

/// Interprets an HTTP Datagram payload (context ID and content).
pub fn parse_payload(datagram: &[u8]) -> Result<Payload<'_>, DatagramError> {
    let (context, len) = varint::decode(datagram).map_err(|_| DatagramError::Truncated)?;
    let rest = datagram.get(len..).ok_or(DatagramError::Truncated)?;
    Ok(match context {
        IP_PACKET_CONTEXT => Payload::IpPacket(rest),
        other => Payload::UnknownContext(other),
    })
}

/// Appends an HTTP Datagram payload carrying `packet` to `out`.
pub fn encode_ip_packet(packet: &[u8], out: &mut Vec<u8>) {
    out.reserve(1 + packet.len());
    out.push(IP_PACKET_CONTEXT as u8);
    out.extend_from_slice(packet);
}

/// Splits an HTTP/3 datagram into the request stream ID and the payload.
pub fn parse_h3(datagram: &[u8]) -> Result<(u64, &[u8]), DatagramError> {
    let (quarter, len) = varint::decode(datagram).map_err(|_| DatagramError::Truncated)?;
    // Quarter Stream IDs above 2^60-1 cannot name a stream (RFC 9297 section 2.1).
    if quarter > (1 << 60) - 1 {
        return Err(DatagramError::BadQuarterStreamId(quarter));
    }
    let rest = datagram.get(len..).ok_or(DatagramError::Truncated)?;
    Ok((quarter * 4, rest))
}

/// Appends the HTTP/3 datagram for request stream `stream_id` carrying `packet`.
pub fn encode_h3_ip_packet(stream_id: u64, packet: &[u8], out: &mut Vec<u8>) {
    // A stream ID is below 2^62, so its quarter always fits.
    let _ = varint::encode(stream_id / 4, out);
    encode_ip_packet(packet, out);
}

/// The bytes in front of every IP packet sent as an HTTP/3 datagram on
/// request stream `stream_id`: its Quarter Stream ID and context ID 0.
pub fn h3_prefix(stream_id: u64) -> Vec<u8> {
    let mut prefix = Vec::with_capacity(9);
    // A stream ID is below 2^62, so its quarter always fits.
    let _ = varint::encode(stream_id / 4, &mut prefix);
    prefix.push(IP_PACKET_CONTEXT as u8);
    prefix
}

/// Bytes an HTTP/3 datagram adds in front of an IP packet on `stream_id`.
pub fn h3_overhead(stream_id: u64) -> usize {
    varint::encoded_len(stream_id / 4).unwrap_or(8) + 1
}

/// Largest IP packet a tunnel carries in DATAGRAM capsules on a stream
/// (HTTP/2): streams have no datagram size limit, so the usual Ethernet
/// MTU.
pub const STREAM_MTU: usize = 1500;

/// Longest prefix [`capsule_prefix`] writes.
pub const MAX_CAPSULE_PREFIX: usize = 1 + 8 + 1;

/// The bytes in front of an IP packet of `packet_len` bytes carried on the
/// request stream in a DATAGRAM capsule (RFC 9297 section 3.5), as HTTP/2
/// carries it: capsule type 0, capsule length, context ID 0. Returns the
/// buffer and how many of its bytes are the prefix.
pub fn capsule_prefix(packet_len: usize) -> ([u8; MAX_CAPSULE_PREFIX], usize) {
    let mut out = [0u8; MAX_CAPSULE_PREFIX];
    out[0] = crate::capsule::DATAGRAM as u8;
    let len = packet_len as u64 + 1;
    // The capsule length as a QUIC varint (RFC 9000 section 16), written in
    // place: this runs once per packet.
    let width = match len {
        0..=63 => 1,
        64..=16_383 => 2,
        16_384..=1_073_741_823 => 4,
        _ => 8,
    };
    let tag: u64 = match width {
        1 => 0,
        2 => 0x40 << 8,
        4 => 0x80 << 24,
        _ => 0xc0 << 56,
    };
    let encoded = (len | tag).to_be_bytes();
    out[1..1 + width].copy_from_slice(&encoded[8 - width..]);
    out[1 + width] = IP_PACKET_CONTEXT as u8;
    let n = 2 + width;
    (out, n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn context_zero_is_an_ip_packet() {
        let mut out = Vec::new();
        encode_h3_ip_packet(8, &[0x45, 0, 0, 20], &mut out);
        assert_eq!(out, [2, 0, 0x45, 0, 0, 20]);
        let (stream, payload) = parse_h3(&out).unwrap();
        assert_eq!(stream, 8);
        assert_eq!(
            parse_payload(payload),
            Ok(Payload::IpPacket(&[0x45, 0, 0, 20]))
        );
        assert_eq!(h3_overhead(8), 2);
        assert_eq!(
            parse_payload(&[0x40, 0x25, 1]),
            Ok(Payload::UnknownContext(37))
        );
        assert_eq!(parse_payload(&[]), Err(DatagramError::Truncated));
    }

    #[test]
    fn h3_prefix_is_what_a_datagram_carries_in_front_of_the_packet() {
        for stream_id in [0u64, 8, 252, 256, 1 << 40] {
            let mut whole = Vec::new();
            encode_h3_ip_packet(stream_id, &[0x45, 0, 0, 20], &mut whole);
            let prefix = h3_prefix(stream_id);
            assert_eq!(prefix.len(), h3_overhead(stream_id));
            assert_eq!(whole.get(..prefix.len()), Some(&prefix[..]));
        }
    }

    #[test]
    fn capsule_prefix_frames_a_datagram_capsule() {
        use crate::capsule::{Capsule, CapsuleDecoder};
        for len in [0usize, 1, 62, 63, 1500, 16_382, 16_383, 65_535] {
            let packet = vec![0x45u8; len];
            let (prefix, n) = capsule_prefix(len);
            let mut bytes = prefix[..n].to_vec();
            bytes.extend_from_slice(&packet);
            let mut dec = CapsuleDecoder::default();
            dec.push(&bytes);
            let raw = dec.next_capsule().unwrap().unwrap();
            let Capsule::Datagram(payload) = Capsule::parse(raw).unwrap() else {
                panic!("not a DATAGRAM capsule");
            };
            assert_eq!(parse_payload(&payload), Ok(Payload::IpPacket(&packet[..])));
            assert_eq!(dec.buffered(), 0);
        }
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            if let Ok((_, rest)) = parse_h3(&bytes) {
                let _ = parse_payload(rest);
            }
        }
    }
}
