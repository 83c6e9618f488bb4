//! IP packets as a router in the tunnel sees them.
//!
//! [`Packet::parse`] reads what forwarding decisions need from IPv4 and IPv6
//! headers; [`check_source`] is the anti-spoofing rule (a site may only send
//! from its assigned prefixes); [`icmp_error`] builds the ICMP / ICMPv6 errors
//! a router owes the sender (packet too big, time exceeded, unreachable),
//! following the rules of RFC 1812 section 4.3.2.7 and RFC 4443 section 2.4
//! about when *not* to send one; [`decrement_ttl`] and [`fragment_ipv4`] are
//! the remaining duties of a router on the forwarding path.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use thiserror::Error;

use crate::net::Family;

/// IP protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// IP protocol number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;

/// The minimum MTU every IPv6 link has (RFC 8200).
pub const IPV6_MIN_MTU: usize = 1280;
/// The minimum datagram size every IPv4 host accepts (RFC 791).
pub const IPV4_MIN_MTU: usize = 576;

/// Why bytes are not a usable IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum PacketError {
    /// No bytes at all.
    #[error("empty packet")]
    Empty,
    /// The version nibble is neither 4 nor 6.
    #[error("IP version {0} is neither 4 nor 6")]
    UnknownVersion(u8),
    /// The buffer is shorter than the header says the packet is.
    #[error("packet truncated: {have} bytes, header requires {needed}")]
    Truncated {
        /// Bytes the header requires.
        needed: usize,
        /// Bytes present.
        have: usize,
    },
    /// IPv4 header length below 20 bytes or beyond the total length.
    #[error("invalid IPv4 header length {0}")]
    BadHeaderLength(usize),
    /// IPv6 jumbograms (payload length 0 with a Jumbo option) are not routed.
    #[error("IPv6 jumbograms are not supported")]
    Jumbogram,
}

/// The header fields of an IP packet that forwarding needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// IPv4 or IPv6.
    pub family: Family,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Upper-layer protocol: for IPv6 the header after any extension headers
    /// tether walks (hop-by-hop, routing, fragment, destination options, AH).
    pub protocol: u8,
    /// Offset of the upper-layer header.
    pub header_len: usize,
    /// Total packet length from the header (bytes beyond it are padding).
    pub total_len: usize,
    /// TTL (IPv4) or hop limit (IPv6).
    pub ttl: u8,
    /// IPv4 Don't Fragment flag; always true for IPv6, which routers never
    /// fragment.
    pub dont_fragment: bool,
    /// Whether this is a fragment other than the first (its upper-layer header
    /// is not present).
    pub later_fragment: bool,
    /// The packet, cut to `total_len`.
    pub bytes: &'a [u8],
}

impl<'a> Packet<'a> {
    /// Parses the IP header at the start of `bytes`.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, PacketError> {
        let first = *bytes.first().ok_or(PacketError::Empty)?;
        match first >> 4 {
            4 => Self::parse_v4(bytes),
            6 => Self::parse_v6(bytes),
            v => Err(PacketError::UnknownVersion(v)),
        }
    }

    fn parse_v4(bytes: &'a [u8]) -> Result<Self, PacketError> {
        let header: &[u8; 20] = bytes.first_chunk().ok_or(PacketError::Truncated {
            needed: 20,
            have: bytes.len(),
        })?;
        let header_len = usize::from(header[0] & 0x0f) * 4;
        let total_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        if header_len < 20 || header_len > total_len {
            return Err(PacketError::BadHeaderLength(header_len));
        }
        let bytes = bytes.get(..total_len).ok_or(PacketError::Truncated {
            needed: total_len,
            have: bytes.len(),
        })?;
        let flags_frag = u16::from_be_bytes([header[6], header[7]]);
        Ok(Packet {
            family: Family::V4,
            src: IpAddr::V4(Ipv4Addr::new(
                header[12], header[13], header[14], header[15],
            )),
            dst: IpAddr::V4(Ipv4Addr::new(
                header[16], header[17], header[18], header[19],
            )),
            protocol: header[9],
            header_len,
            total_len,
            ttl: header[8],
            dont_fragment: flags_frag & 0x4000 != 0,
            later_fragment: flags_frag & 0x1fff != 0,
            bytes,
        })
    }

    fn parse_v6(bytes: &'a [u8]) -> Result<Self, PacketError> {
        let header: &[u8; 40] = bytes.first_chunk().ok_or(PacketError::Truncated {
            needed: 40,
            have: bytes.len(),
        })?;
        let payload_len = usize::from(u16::from_be_bytes([header[4], header[5]]));
        let mut next = header[6];
        if payload_len == 0 && next == 0 {
            return Err(PacketError::Jumbogram);
        }
        let total_len = 40 + payload_len;
        let bytes = bytes.get(..total_len).ok_or(PacketError::Truncated {
            needed: total_len,
            have: bytes.len(),
        })?;
        let mut src = [0u8; 16];
        src.copy_from_slice(&header[8..24]);
        let mut dst = [0u8; 16];
        dst.copy_from_slice(&header[24..40]);

        // Walk the extension headers tether knows, a bounded number of times.
        let mut offset = 40;
        let mut later_fragment = false;
        for _ in 0..8 {
            let ext_len = match next {
                // Hop-by-hop, routing, destination options: (len + 1) * 8.
                0 | 43 | 60 => bytes.get(offset + 1).map(|&l| (usize::from(l) + 1) * 8),
                // Fragment header: fixed 8 bytes.
                44 => {
                    if let Some(frag) = bytes.get(offset + 2..offset + 4) {
                        later_fragment = u16::from_be_bytes([frag[0], frag[1]]) & 0xfff8 != 0;
                    }
                    Some(8)
                }
                // Authentication header: (len + 2) * 4.
                51 => bytes.get(offset + 1).map(|&l| (usize::from(l) + 2) * 4),
                _ => break,
            };
            let (Some(ext_len), Some(&following)) = (ext_len, bytes.get(offset)) else {
                break;
            };
            next = following;
            offset += ext_len;
            if later_fragment {
                break;
            }
        }
        Ok(Packet {
            family: Family::V6,
            src: IpAddr::V6(Ipv6Addr::from(src)),
            dst: IpAddr::V6(Ipv6Addr::from(dst)),
            protocol: next,
            header_len: offset.min(total_len),
            total_len,
            ttl: header[7],
            dont_fragment: true,
            later_fragment,
            bytes,
        })
    }

    /// Whether this packet is itself an ICMP / ICMPv6 error message, about
    /// which no further error may be sent.
    pub fn is_icmp_error(&self) -> bool {
        let icmp_type = self.bytes.get(self.header_len).copied();
        match (self.family, self.protocol, icmp_type) {
            // Destination unreachable, source quench, redirect, time exceeded,
            // parameter problem.
            (Family::V4, PROTO_ICMP, Some(t)) => matches!(t, 3 | 4 | 5 | 11 | 12),
            // ICMPv6 types below 128 are errors.
            (Family::V6, PROTO_ICMPV6, Some(t)) => t < 128,
            // Truncated ICMP: treat as an error to stay on the safe side.
            (Family::V4, PROTO_ICMP, None) | (Family::V6, PROTO_ICMPV6, None) => true,
            _ => false,
        }
    }
}

/// A packet whose source is not one of the sender's assigned prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("source address {src} is not assigned to the sender")]
pub struct Spoofed {
    /// The offending source address.
    pub src: IpAddr,
}

/// The anti-spoofing rule: `packet.src` must lie in one of `allowed`.
pub fn check_source(packet: &Packet<'_>, allowed: &[IpNet]) -> Result<(), Spoofed> {
    if allowed.iter().any(|p| p.contains(&packet.src)) {
        Ok(())
    } else {
        Err(Spoofed { src: packet.src })
    }
}

/// The TTL or hop limit ran out on this hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("TTL expired in transit")]
pub struct TtlExpired;

/// Decrements the TTL / hop limit of the packet in place, updating the IPv4
/// header checksum incrementally (RFC 1624). A packet that arrives with TTL 1
/// or 0 must not be forwarded.
pub fn decrement_ttl(packet: &mut [u8]) -> Result<(), TtlExpired> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let Some(header) = packet.get_mut(..20) else {
                return Err(TtlExpired);
            };
            if header[8] <= 1 {
                return Err(TtlExpired);
            }
            let old = u16::from_be_bytes([header[8], header[9]]);
            header[8] -= 1;
            let new = u16::from_be_bytes([header[8], header[9]]);
            let checksum = u16::from_be_bytes([header[10], header[11]]);
            // HC' = ~(~HC + ~m + m')
            let mut sum = u32::from(!checksum) + u32::from(!old) + u32::from(new);
            while sum > 0xffff {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            header[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
            Ok(())
        }
        Some(6) => match packet.get_mut(7) {
            Some(hop_limit) if *hop_limit > 1 => {
                *hop_limit -= 1;
                Ok(())
            }
            _ => Err(TtlExpired),
        },
        _ => Err(TtlExpired),
    }
}

/// Whether `packet` is a TCP segment with the SYN flag (a SYN or SYN-ACK).
pub fn is_tcp_syn(packet: &Packet<'_>) -> bool {
    packet.protocol == PROTO_TCP
        && !packet.later_fragment
        && packet
            .bytes
            .get(packet.header_len + 13)
            .is_some_and(|flags| flags & 0x02 != 0)
}

/// The largest TCP segment (MSS) that fits a path of `mtu` bytes for a
/// packet of IP version 6 (`v6`) or 4: the MTU less the fixed IP header and
/// the TCP header without options (RFC 9293 §3.7.1, RFC 8200 §8.3).
pub fn mss_for_mtu(mtu: usize, v6: bool) -> u16 {
    let headers = if v6 { 60 } else { 40 };
    u16::try_from(mtu.saturating_sub(headers)).unwrap_or(u16::MAX)
}

/// Lowers the MSS option of a TCP SYN (or SYN-ACK) to at most `mss`,
/// updating the TCP checksum incrementally (RFC 1624), so that neither end
/// sends segments larger than the tunnel carries. Returns whether the
/// packet was changed; other packets, and SYNs whose MSS is already small
/// enough, are left alone.
pub fn clamp_mss(packet: &mut [u8], mss: u16) -> bool {
    let Ok(parsed) = Packet::parse(packet) else {
        return false;
    };
    if parsed.protocol != PROTO_TCP || parsed.later_fragment {
        return false;
    }
    let start = parsed.header_len;
    let total = parsed.total_len;
    let Some(tcp) = packet.get_mut(start..total) else {
        return false;
    };
    if tcp.len() < 20 || tcp[13] & 0x02 == 0 {
        return false;
    }
    let data_offset = usize::from(tcp[12] >> 4) * 4;
    if data_offset < 20 || data_offset > tcp.len() {
        return false;
    }
    // Walk the options for kind 2 (MSS, length 4).
    let mut i = 20;
    while i < data_offset {
        match tcp[i] {
            0 => return false,
            1 => i += 1,
            kind => {
                let Some(&len) = tcp.get(i + 1) else {
                    return false;
                };
                let len = usize::from(len);
                if len < 2 || i + len > data_offset {
                    return false;
                }
                if kind == 2 && len == 4 {
                    let old = u16::from_be_bytes([tcp[i + 2], tcp[i + 3]]);
                    if old <= mss {
                        return false;
                    }
                    tcp[i + 2..i + 4].copy_from_slice(&mss.to_be_bytes());
                    if i % 2 == 1 {
                        // The value straddles two checksum words: recompute.
                        return recompute_tcp_checksum(packet, start, total);
                    }
                    let checksum = u16::from_be_bytes([tcp[16], tcp[17]]);
                    let mut sum = u32::from(!checksum) + u32::from(!old) + u32::from(mss);
                    while sum > 0xffff {
                        sum = (sum & 0xffff) + (sum >> 16);
                    }
                    tcp[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
                    return true;
                }
                i += len;
            }
        }
    }
    false
}

/// Recomputes the TCP checksum of `packet` (its segment spans
/// `start..total`) from scratch.
fn recompute_tcp_checksum(packet: &mut [u8], start: usize, total: usize) -> bool {
    let tcp_len = (total - start) as u32;
    let pseudo: Vec<u8> = match packet.first().map(|b| b >> 4) {
        Some(4) => [
            &packet[12..20],
            &[0, PROTO_TCP],
            &(tcp_len as u16).to_be_bytes(),
        ]
        .concat(),
        Some(6) => [
            &packet[8..40],
            &tcp_len.to_be_bytes()[..],
            &[0, 0, 0, PROTO_TCP],
        ]
        .concat(),
        _ => return false,
    };
    let Some(tcp) = packet.get_mut(start..total) else {
        return false;
    };
    tcp[16..18].copy_from_slice(&[0, 0]);
    let sum = checksum(&[&pseudo, tcp]);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    true
}

/// The ICMP errors a tether router sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcmpError {
    /// The packet exceeds the next hop's MTU (IPv4 "fragmentation needed"
    /// with DF set, ICMPv6 "packet too big").
    PacketTooBig {
        /// The MTU the sender must use.
        mtu: u16,
    },
    /// The TTL / hop limit reached zero.
    TimeExceeded,
    /// No route to the destination (e.g. the site is not connected).
    NoRoute,
    /// Policy forbids the path (e.g. data residency).
    AdminProhibited,
}

/// Builds the ICMP or ICMPv6 error about `original`, sent from `router` to
/// the original sender, or `None` where the RFCs forbid sending one: about an
/// ICMP error, a non-first IPv4 fragment, a multicast or broadcast
/// destination (except an IPv6 packet-too-big), or an unusable source; and
/// when `router` is not of the packet's family.
pub fn icmp_error(original: &Packet<'_>, kind: IcmpError, router: IpAddr) -> Option<Vec<u8>> {
    if original.is_icmp_error() || original.later_fragment {
        return None;
    }
    match (original.src, original.dst, router) {
        (IpAddr::V4(src), IpAddr::V4(dst), IpAddr::V4(router)) => {
            let bad_src = src.is_unspecified()
                || src.is_multicast()
                || src.is_broadcast()
                || src.is_loopback();
            if bad_src || dst.is_multicast() || dst.is_broadcast() {
                return None;
            }
            let (icmp_type, code, rest) = match kind {
                IcmpError::PacketTooBig { mtu } => {
                    let [hi, lo] = mtu.to_be_bytes();
                    (3, 4, [0, 0, hi, lo])
                }
                IcmpError::TimeExceeded => (11, 0, [0; 4]),
                IcmpError::NoRoute => (3, 1, [0; 4]),
                IcmpError::AdminProhibited => (3, 13, [0; 4]),
            };
            Some(build_icmpv4(
                router,
                src,
                icmp_type,
                code,
                rest,
                original.bytes,
            ))
        }
        (IpAddr::V6(src), IpAddr::V6(dst), IpAddr::V6(router)) => {
            if src.is_unspecified() || src.is_multicast() || src.is_loopback() {
                return None;
            }
            let too_big = matches!(kind, IcmpError::PacketTooBig { .. });
            if dst.is_multicast() && !too_big {
                return None;
            }
            let (icmp_type, code, rest) = match kind {
                IcmpError::PacketTooBig { mtu } => (2, 0, u32::from(mtu).to_be_bytes()),
                IcmpError::TimeExceeded => (3, 0, [0; 4]),
                IcmpError::NoRoute => (1, 0, [0; 4]),
                IcmpError::AdminProhibited => (1, 1, [0; 4]),
            };
            Some(build_icmpv6(
                router,
                src,
                icmp_type,
                code,
                rest,
                original.bytes,
            ))
        }
        _ => None,
    }
}

fn build_icmpv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
    quote: &[u8],
) -> Vec<u8> {
    // RFC 1812: quote as much as fits in a 576-byte datagram.
    let quote = &quote[..quote.len().min(IPV4_MIN_MTU - 20 - 8)];
    let total = 20 + 8 + quote.len();
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&[0x45, 0xc0]);
    out.extend_from_slice(&(total as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 64, PROTO_ICMP, 0, 0]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    let header_sum = checksum(&[&out[..20]]);
    out[10..12].copy_from_slice(&header_sum.to_be_bytes());
    out.extend_from_slice(&[icmp_type, code, 0, 0]);
    out.extend_from_slice(&rest);
    out.extend_from_slice(quote);
    let icmp_sum = checksum(&[&out[20..]]);
    out[22..24].copy_from_slice(&icmp_sum.to_be_bytes());
    out
}

fn build_icmpv6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    icmp_type: u8,
    code: u8,
    rest: [u8; 4],
    quote: &[u8],
) -> Vec<u8> {
    // RFC 4443: quote as much as fits without exceeding the minimum IPv6 MTU.
    let quote = &quote[..quote.len().min(IPV6_MIN_MTU - 40 - 8)];
    let payload_len = 8 + quote.len();
    let mut out = Vec::with_capacity(40 + payload_len);
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&(payload_len as u16).to_be_bytes());
    out.extend_from_slice(&[PROTO_ICMPV6, 64]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    out.extend_from_slice(&[icmp_type, code, 0, 0]);
    out.extend_from_slice(&rest);
    out.extend_from_slice(quote);
    let pseudo_len = (payload_len as u32).to_be_bytes();
    let pseudo_next = [0, 0, 0, PROTO_ICMPV6];
    let sum = checksum(&[
        &src.octets(),
        &dst.octets(),
        &pseudo_len,
        &pseudo_next,
        &out[40..],
    ]);
    out[42..44].copy_from_slice(&sum.to_be_bytes());
    out
}

/// The Internet checksum (RFC 1071) over the concatenation of `parts`.
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    let mut odd: Option<u8> = None;
    for part in parts {
        let mut bytes = *part;
        if let Some(hi) = odd.take() {
            if let Some((&lo, rest)) = bytes.split_first() {
                sum += u64::from(u16::from_be_bytes([hi, lo]));
                bytes = rest;
            } else {
                odd = Some(hi);
                continue;
            }
        }
        let mut chunks = bytes.chunks_exact(2);
        for pair in &mut chunks {
            sum += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
        }
        odd = chunks.remainder().first().copied();
    }
    if let Some(hi) = odd {
        sum += u64::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Why an IPv4 packet could not be fragmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FragmentError {
    /// The packet has Don't Fragment set: answer with packet-too-big instead.
    #[error("packet has Don't Fragment set")]
    DontFragment,
    /// The MTU leaves no room for 8 bytes of data after the header.
    #[error("MTU {0} is too small to fragment into")]
    MtuTooSmall(usize),
    /// The bytes are not an IPv4 packet.
    #[error("not an IPv4 packet")]
    NotIpv4,
}

/// Splits an IPv4 packet without Don't Fragment into fragments of at most
/// `mtu` bytes (RFC 791). Options are copied into later fragments only when
/// their "copied" flag is set.
pub fn fragment_ipv4(bytes: &[u8], mtu: usize) -> Result<Vec<Vec<u8>>, FragmentError> {
    let packet = Packet::parse(bytes).map_err(|_| FragmentError::NotIpv4)?;
    if packet.family != Family::V4 {
        return Err(FragmentError::NotIpv4);
    }
    if packet.dont_fragment {
        return Err(FragmentError::DontFragment);
    }
    if packet.total_len <= mtu {
        return Ok(vec![packet.bytes.to_vec()]);
    }
    let header = &packet.bytes[..packet.header_len];
    let data = &packet.bytes[packet.header_len..];
    let later_header = copied_options_header(header);
    let flags_frag = u16::from_be_bytes([header[6], header[7]]);
    let base_offset = usize::from(flags_frag & 0x1fff) * 8;
    let original_more = flags_frag & 0x2000 != 0;

    let mut out = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let hdr: &[u8] = if pos == 0 { header } else { &later_header };
        let room = mtu.saturating_sub(hdr.len()) & !7;
        if room == 0 {
            return Err(FragmentError::MtuTooSmall(mtu));
        }
        let end = (pos + room).min(data.len());
        let more = end < data.len() || original_more;
        let mut frag = Vec::with_capacity(hdr.len() + end - pos);
        frag.extend_from_slice(hdr);
        frag.extend_from_slice(&data[pos..end]);
        let total = frag.len() as u16;
        frag[2..4].copy_from_slice(&total.to_be_bytes());
        let offset_units = ((base_offset + pos) / 8) as u16;
        let flags = if more { 0x2000 } else { 0 };
        frag[6..8].copy_from_slice(&(flags | (offset_units & 0x1fff)).to_be_bytes());
        frag[10..12].copy_from_slice(&[0, 0]);
        let sum = checksum(&[&frag[..hdr.len()]]);
        frag[10..12].copy_from_slice(&sum.to_be_bytes());
        out.push(frag);
        pos = end;
    }
    Ok(out)
}

/// The header for non-first fragments: the fixed part plus copied options.
fn copied_options_header(header: &[u8]) -> Vec<u8> {
    let mut out = header.get(..20).unwrap_or_default().to_vec();
    let mut options = header.get(20..).unwrap_or_default();
    while let Some((&kind, rest)) = options.split_first() {
        match kind {
            0 => break,
            1 => options = rest,
            _ => {
                let len = usize::from(rest.first().copied().unwrap_or(0));
                if len < 2 || len > options.len() {
                    break;
                }
                if kind & 0x80 != 0 {
                    out.extend_from_slice(&options[..len]);
                }
                options = &options[len..];
            }
        }
    }
    while out.len() % 4 != 0 {
        out.push(0);
    }
    let ihl = (out.len() / 4) as u8 & 0x0f;
    if let Some(b) = out.first_mut() {
        *b = 0x40 | ihl;
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn syn_v4(options: &[u8]) -> Vec<u8> {
        syn_v4_between([10, 0, 0, 1], [100, 64, 0, 5], options)
    }

    /// An IPv4 TCP SYN from `src` to `dst` with TCP `options`.
    pub(crate) fn syn_v4_between(src: [u8; 4], dst: [u8; 4], options: &[u8]) -> Vec<u8> {
        let tcp_len = 20 + options.len();
        let total = 20 + tcp_len;
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, PROTO_TCP, 0, 0];
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        let sum = checksum(&[&p[..20]]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        tcp[12] = ((tcp_len / 4) as u8) << 4;
        tcp[13] = 0x02;
        tcp.extend_from_slice(options);
        p.extend_from_slice(&tcp);
        assert!(recompute_tcp_checksum(&mut p, 20, total));
        p
    }

    pub(crate) fn tcp_checksum_ok(p: &[u8]) -> bool {
        let tcp = &p[20..];
        let pseudo = [
            &p[12..20],
            &[0, PROTO_TCP],
            &(tcp.len() as u16).to_be_bytes(),
        ]
        .concat();
        checksum(&[&pseudo, tcp]) == 0
    }

    pub(crate) fn mss_of(p: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([p[40 + at + 2], p[40 + at + 3]])
    }

    #[test]
    fn mss_is_clamped_with_a_valid_checksum_aligned_or_not() {
        // Aligned: MSS first.
        let mut p = syn_v4(&[2, 4, 0x05, 0xb4, 1, 1, 1, 1]);
        assert!(clamp_mss(&mut p, 1380));
        assert_eq!(mss_of(&p, 0), 1380);
        assert!(tcp_checksum_ok(&p));
        // Already small enough: untouched.
        assert!(!clamp_mss(&mut p, 1400));
        // Misaligned: one NOP first.
        let mut p = syn_v4(&[1, 2, 4, 0x05, 0xb4, 1, 1, 1]);
        assert!(clamp_mss(&mut p, 1200));
        assert_eq!(mss_of(&p, 1), 1200);
        assert!(tcp_checksum_ok(&p));
        // Not a SYN: untouched.
        let mut p = syn_v4(&[2, 4, 0x05, 0xb4]);
        p[20 + 13] = 0x10;
        assert!(!clamp_mss(&mut p, 1000));
        // Broken options never panic.
        for junk in [
            &[2u8, 9, 0, 0][..],
            &[2, 0, 0, 0],
            &[3, 1, 0, 0],
            &[2, 4, 5, 0],
        ] {
            let mut p = syn_v4(junk);
            let _ = clamp_mss(&mut p, 500);
        }
    }
    use proptest::prelude::*;

    /// A minimal IPv4 packet with a valid header checksum.
    pub(crate) fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8], df: bool) -> Vec<u8> {
        let total = (20 + payload.len()) as u16;
        let mut p = vec![0x45, 0];
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&[0x12, 0x34, if df { 0x40 } else { 0 }, 0, 64, proto, 0, 0]);
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        let sum = checksum(&[&p[..20]]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    pub(crate) fn ipv6(src: &str, dst: &str, next: u8, payload: &[u8]) -> Vec<u8> {
        let src: Ipv6Addr = src.parse().unwrap();
        let dst: Ipv6Addr = dst.parse().unwrap();
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        p.extend_from_slice(&[next, 64]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn parses_ipv4() {
        let bytes = ipv4([10, 0, 0, 1], [10, 0, 0, 2], PROTO_TCP, &[0; 12], true);
        let p = Packet::parse(&bytes).unwrap();
        assert_eq!(p.family, Family::V4);
        assert_eq!(p.src, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(p.dst, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(
            (p.protocol, p.total_len, p.header_len, p.ttl),
            (PROTO_TCP, 32, 20, 64)
        );
        assert!(p.dont_fragment);
        assert_eq!(
            Packet::parse(&bytes[..30]),
            Err(PacketError::Truncated {
                needed: 32,
                have: 30
            })
        );
        let mut bad = bytes.clone();
        bad[0] = 0x44;
        assert_eq!(Packet::parse(&bad), Err(PacketError::BadHeaderLength(16)));
        assert_eq!(Packet::parse(&[0x50]), Err(PacketError::UnknownVersion(5)));
        assert_eq!(Packet::parse(&[]), Err(PacketError::Empty));
    }

    #[test]
    fn parses_ipv6_through_extension_headers() {
        // Hop-by-hop (8 bytes) then UDP.
        let mut payload = vec![PROTO_UDP, 0, 0, 0, 0, 0, 0, 0];
        payload.extend_from_slice(&[0; 8]);
        let bytes = ipv6("fd00::1", "fd00::2", 0, &payload);
        let p = Packet::parse(&bytes).unwrap();
        assert_eq!((p.protocol, p.header_len, p.total_len), (PROTO_UDP, 48, 56));
        // A non-first fragment hides the upper layer.
        let frag = [PROTO_TCP, 0, 0x00, 0x08, 0, 0, 0, 1];
        let p2 = ipv6("fd00::1", "fd00::2", 44, &frag);
        assert!(Packet::parse(&p2).unwrap().later_fragment);
    }

    #[test]
    fn anti_spoofing() {
        let bytes = ipv4([100, 64, 0, 7], [10, 0, 0, 2], PROTO_UDP, &[], true);
        let p = Packet::parse(&bytes).unwrap();
        let assigned: Vec<IpNet> = vec!["100.64.0.7/32".parse().unwrap()];
        assert!(check_source(&p, &assigned).is_ok());
        let other: Vec<IpNet> = vec!["100.64.0.8/32".parse().unwrap()];
        assert_eq!(
            check_source(&p, &other),
            Err(Spoofed {
                src: "100.64.0.7".parse().unwrap()
            })
        );
        assert!(check_source(&p, &[]).is_err());
    }

    #[test]
    fn ttl_decrement_keeps_checksum_valid() {
        let mut bytes = ipv4([10, 0, 0, 1], [10, 0, 0, 2], PROTO_UDP, &[1, 2, 3], true);
        decrement_ttl(&mut bytes).unwrap();
        assert_eq!(bytes[8], 63);
        assert_eq!(
            checksum(&[&bytes[..20]]),
            0,
            "header checksum must still verify"
        );
        bytes[8] = 1;
        assert_eq!(decrement_ttl(&mut bytes), Err(TtlExpired));
        let mut v6 = ipv6("fd00::1", "fd00::2", PROTO_UDP, &[]);
        decrement_ttl(&mut v6).unwrap();
        assert_eq!(v6[7], 63);
    }

    #[test]
    fn packet_too_big_v4() {
        let original = ipv4(
            [100, 64, 0, 7],
            [10, 0, 0, 2],
            PROTO_TCP,
            &[0xaa; 1400],
            true,
        );
        let p = Packet::parse(&original).unwrap();
        let icmp = icmp_error(
            &p,
            IcmpError::PacketTooBig { mtu: 1280 },
            "100.64.0.1".parse().unwrap(),
        )
        .unwrap();
        let reply = Packet::parse(&icmp).unwrap();
        assert_eq!(reply.src, "100.64.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(reply.dst, p.src);
        assert_eq!(reply.protocol, PROTO_ICMP);
        assert!(icmp.len() <= IPV4_MIN_MTU);
        assert_eq!(checksum(&[&icmp[..20]]), 0);
        assert_eq!(checksum(&[&icmp[20..]]), 0);
        assert_eq!(&icmp[20..22], &[3, 4]);
        assert_eq!(u16::from_be_bytes([icmp[26], icmp[27]]), 1280);
        // The quote starts with the original header.
        assert_eq!(&icmp[28..48], &original[..20]);
        // No error about an error.
        assert!(
            icmp_error(
                &reply,
                IcmpError::PacketTooBig { mtu: 1000 },
                "100.64.0.1".parse().unwrap()
            )
            .is_none()
        );
    }

    #[test]
    fn packet_too_big_v6() {
        let original = ipv6("fd00::7", "fd00::2", PROTO_TCP, &[0xbb; 1400]);
        let p = Packet::parse(&original).unwrap();
        let icmp = icmp_error(
            &p,
            IcmpError::PacketTooBig { mtu: 1300 },
            "fd00::1".parse().unwrap(),
        )
        .unwrap();
        assert!(icmp.len() <= IPV6_MIN_MTU);
        let reply = Packet::parse(&icmp).unwrap();
        assert_eq!(reply.protocol, PROTO_ICMPV6);
        assert_eq!(reply.dst, p.src);
        assert_eq!(&icmp[40..42], &[2, 0]);
        assert_eq!(
            u32::from_be_bytes([icmp[44], icmp[45], icmp[46], icmp[47]]),
            1300
        );
        let src: Ipv6Addr = "fd00::1".parse().unwrap();
        let dst: Ipv6Addr = "fd00::7".parse().unwrap();
        let len = ((icmp.len() - 40) as u32).to_be_bytes();
        assert_eq!(
            checksum(&[
                &src.octets(),
                &dst.octets(),
                &len,
                &[0, 0, 0, 58],
                &icmp[40..]
            ]),
            0
        );
        // Wrong router family: nothing.
        assert!(icmp_error(&p, IcmpError::NoRoute, "10.0.0.1".parse().unwrap()).is_none());
        // Multicast destination: only packet-too-big is allowed.
        let mc = ipv6("fd00::7", "ff02::1", PROTO_UDP, &[0; 8]);
        let mc = Packet::parse(&mc).unwrap();
        assert!(icmp_error(&mc, IcmpError::NoRoute, "fd00::1".parse().unwrap()).is_none());
        assert!(
            icmp_error(
                &mc,
                IcmpError::PacketTooBig { mtu: 1280 },
                "fd00::1".parse().unwrap()
            )
            .is_some()
        );
    }

    #[test]
    fn fragments_reassemble_to_the_original() {
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let original = ipv4([10, 0, 0, 1], [10, 0, 0, 2], PROTO_UDP, &payload, false);
        let frags = fragment_ipv4(&original, 1400).unwrap();
        assert_eq!(frags.len(), 3);
        let mut data = vec![0u8; payload.len()];
        for (i, f) in frags.iter().enumerate() {
            assert!(f.len() <= 1400);
            assert_eq!(checksum(&[&f[..20]]), 0);
            let p = Packet::parse(f).unwrap();
            let ff = u16::from_be_bytes([f[6], f[7]]);
            assert_eq!(ff & 0x2000 != 0, i + 1 < frags.len(), "MF flag");
            let off = usize::from(ff & 0x1fff) * 8;
            data[off..off + p.total_len - 20].copy_from_slice(&f[20..]);
        }
        assert_eq!(data, payload);
        let df = ipv4([10, 0, 0, 1], [10, 0, 0, 2], PROTO_UDP, &payload, true);
        assert_eq!(fragment_ipv4(&df, 1400), Err(FragmentError::DontFragment));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            if let Ok(p) = Packet::parse(&bytes) {
                prop_assert!(p.total_len <= bytes.len());
                prop_assert!(p.header_len <= p.total_len);
                let router = match p.family { Family::V4 => "10.0.0.1".parse().unwrap(), Family::V6 => "fd00::1".parse().unwrap() };
                if let Some(icmp) = icmp_error(&p, IcmpError::TimeExceeded, router) {
                    prop_assert!(Packet::parse(&icmp).is_ok());
                }
            }
            let mut copy = bytes.clone();
            let _ = decrement_ttl(&mut copy);
            let _ = fragment_ipv4(&bytes, 68);
        }
    }
}
