//! A QUIC packet that any QUIC server answers with a small packet, to tell a
//! path that loses large UDP packets from one that blocks UDP altogether.
//!
//! A client Initial must fill a datagram of at least 1200 bytes (RFC 9000,
//! section 14.1). A server that does not speak the packet's version answers
//! with a Version Negotiation packet (section 6), a few dozen bytes, without
//! any handshake. So: a 1200-byte packet of the reserved version
//! `0x?a?a?a?a` (section 15) that gets an answer proves that UDP to the
//! server works and that 1200 bytes cross the path; if a real handshake
//! (whose server packets are as large as the tunnel's) then gets no answer,
//! the path carries less than the tunnel needs.

/// A reserved version that no server supports (RFC 9000, section 15).
pub const PROBE_VERSION: u32 = 0x1a2a_3a4a;

/// The size of the probe: QUIC's minimum for a client's first datagram.
pub const PROBE_LEN: usize = 1200;

/// A long-header packet of [`PROBE_VERSION`], padded to `len` bytes (at
/// least [`PROBE_LEN`]: a server answers only datagrams of a client's
/// minimum size), with destination connection ID `dcid` (8 bytes) and
/// source `scid`. A probe of the size of a tunnel's packets that is
/// answered proves that the path carries packets of that size.
pub fn version_probe(dcid: [u8; 8], scid: [u8; 8], len: usize) -> Vec<u8> {
    let len = len.max(PROBE_LEN);
    let mut p = Vec::with_capacity(len);
    // Long header, fixed bit, type Initial.
    p.push(0xc0);
    p.extend_from_slice(&PROBE_VERSION.to_be_bytes());
    p.push(8);
    p.extend_from_slice(&dcid);
    p.push(8);
    p.extend_from_slice(&scid);
    p.resize(len, 0);
    p
}

/// Whether `reply` is a Version Negotiation packet answering the probe sent
/// with `dcid` and `scid` (the server echoes them swapped).
pub fn is_version_negotiation(reply: &[u8], dcid: [u8; 8], scid: [u8; 8]) -> bool {
    let Some((&first, rest)) = reply.split_first() else {
        return false;
    };
    if first & 0x80 == 0 || rest.get(..4) != Some(&[0, 0, 0, 0]) {
        return false;
    }
    let rest = &rest[4..];
    let Some((&dlen, rest)) = rest.split_first() else {
        return false;
    };
    let Some((echoed_scid, rest)) = rest.split_at_checked(usize::from(dlen)) else {
        return false;
    };
    let Some((&slen, rest)) = rest.split_first() else {
        return false;
    };
    let Some(echoed_dcid) = rest.get(..usize::from(slen)) else {
        return false;
    };
    echoed_scid == scid && echoed_dcid == dcid
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];
    const S: [u8; 8] = [9, 10, 11, 12, 13, 14, 15, 16];

    #[test]
    fn the_probe_is_a_full_size_long_header_of_a_reserved_version() {
        let p = version_probe(D, S, 0);
        assert_eq!(p.len(), 1200);
        assert_eq!(version_probe(D, S, 1320).len(), 1320);
        assert_eq!(p[0] & 0x80, 0x80);
        let version = u32::from_be_bytes([p[1], p[2], p[3], p[4]]);
        assert_eq!(version & 0x0f0f_0f0f, 0x0a0a_0a0a, "reserved version");
        assert_eq!(&p[6..14], &D);
        assert_eq!(&p[15..23], &S);
    }

    #[test]
    fn only_a_matching_version_negotiation_counts() {
        let mut vn = vec![0x80, 0, 0, 0, 0, 8];
        vn.extend_from_slice(&S);
        vn.push(8);
        vn.extend_from_slice(&D);
        vn.extend_from_slice(&1u32.to_be_bytes());
        assert!(is_version_negotiation(&vn, D, S));
        assert!(!is_version_negotiation(&vn, S, D), "other connection IDs");
        let mut other = vn.clone();
        other[4] = 1;
        assert!(!is_version_negotiation(&other, D, S), "not version 0");
        assert!(!is_version_negotiation(&vn[..10], D, S), "truncated");
        assert!(!is_version_negotiation(&[], D, S));
        let mut short = vn.clone();
        short[0] = 0x40;
        assert!(!is_version_negotiation(&short, D, S), "short header");
    }
}
