//! 1:1 translation between a hospital LAN and the prefix the broker mapped
//! it to.
//!
//! Every hospital numbers its analysers from the same private ranges
//! (192.168.1.0/24, 10.0.0.0/8), so the broker gives each LAN a prefix of
//! the operator's own of the same length, unique in the region, and the
//! site's agent translates between the two: the host part is kept, the
//! network part swapped (IPv4 as Linux's `NETMAP` target does; IPv6 as the
//! stateless 1:1 prefix translation of RFC 6296). Nothing is remembered
//! per flow, so a restart of the agent loses nothing, and both directions
//! are one function of the packet.
//!
//! - [`LanMap::to_lan`]: a packet from the tunnel to a mapped address gets
//!   the real destination.
//! - [`LanMap::from_lan`]: a packet leaving the LAN for the tunnel gets the
//!   mapped source.
//! - [`Inbound::to_device`]: what the site writes to its device from the
//!   tunnel: packets to its own addresses, and packets to its mapped
//!   prefixes translated into the LAN. Anything else is refused with
//!   [`Refused::NotForSite`]: the site forwards nothing the broker was not
//!   told it exposes, even if the broker sent it.
//!
//! The transport checksums that cover the addresses (TCP, UDP, ICMPv6
//! through their pseudo-header) and the IPv4 header checksum are updated
//! incrementally (RFC 1624, equation 3), so the payload is never read.
//! ICMP and ICMPv6 errors quote the packet they are about: the quoted
//! header is translated too (in the other direction: an error travelling
//! to the LAN quotes a packet that came from it), with its checksums, and
//! the error's own checksum is adjusted for the bytes that changed (never
//! recomputed: an error corrupted on the way stays detectably corrupted).
//! Fragments translate like whole
//! packets: the first carries the transport header, later ones only the IP
//! header. IPv6 extension headers before the transport header (hop-by-hop,
//! routing, destination options, fragment) are skipped, their contents
//! unchanged. Protocols whose checksums cover addresses but which tether does
//! not parse (DCCP, UDP-Lite) and AH, which authenticates the addresses,
//! are refused with [`Refused::Protocol`] rather than forwarded broken.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use thiserror::Error;

use crate::ip::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Packet};
use crate::net::Family;

/// IP protocol number of GRE (no checksum over addresses).
const PROTO_GRE: u8 = 47;
/// IP protocol number of ESP (encrypted; addresses not covered).
const PROTO_ESP: u8 = 50;
/// IP protocol number of SCTP (CRC32c over the SCTP packet only).
const PROTO_SCTP: u8 = 132;
/// IP protocol number of AH (authenticates the addresses).
const PROTO_AH: u8 = 51;

/// One LAN prefix and the prefix it appears as in the overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Mapping {
    /// The LAN as the hospital numbers it.
    pub real: IpNet,
    /// The prefix the broker allocated for it.
    pub mapped: IpNet,
}

/// Why a set of mappings cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MappingError {
    /// The two prefixes differ in family or length: 1:1 needs both equal.
    #[error("{real} and {mapped} differ in family or length; a 1:1 mapping needs both equal")]
    Shape {
        /// The LAN prefix.
        real: IpNet,
        /// The mapped prefix.
        mapped: IpNet,
    },
    /// Two prefixes on the same side overlap, or a LAN overlaps a mapped
    /// prefix: an address would translate two ways.
    #[error("{a} overlaps {b}: an address in both would translate two ways")]
    Overlap {
        /// One prefix.
        a: IpNet,
        /// The other.
        b: IpNet,
    },
}

impl Mapping {
    /// A mapping of `real` onto `mapped`; host bits of either are ignored.
    pub fn new(real: IpNet, mapped: IpNet) -> Result<Self, MappingError> {
        let (real, mapped) = (real.trunc(), mapped.trunc());
        let same_family = matches!(
            (real, mapped),
            (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
        );
        if !same_family || real.prefix_len() != mapped.prefix_len() {
            return Err(MappingError::Shape { real, mapped });
        }
        Ok(Self { real, mapped })
    }

    /// The real LAN address behind `mapped`, if the mapped prefix holds it.
    pub fn real_of(&self, mapped: IpAddr) -> Option<IpAddr> {
        swap_prefix(mapped, &self.mapped, &self.real)
    }

    /// The mapped address of the LAN address `real`, if the LAN holds it.
    pub fn mapped_of(&self, real: IpAddr) -> Option<IpAddr> {
        swap_prefix(real, &self.real, &self.mapped)
    }
}

/// Moves `addr` from prefix `from` to the same host in prefix `to`, if it
/// is in `from` (both of one family and length).
fn swap_prefix(addr: IpAddr, from: &IpNet, to: &IpNet) -> Option<IpAddr> {
    if !from.contains(&addr) {
        return None;
    }
    match (addr, to) {
        (IpAddr::V4(a), IpNet::V4(to)) => {
            let host = u32::from(a) & u32::from(to.hostmask());
            Some(IpAddr::V4(Ipv4Addr::from(u32::from(to.network()) | host)))
        }
        (IpAddr::V6(a), IpNet::V6(to)) => {
            let host = u128::from(a) & u128::from(to.hostmask());
            Some(IpAddr::V6(Ipv6Addr::from(u128::from(to.network()) | host)))
        }
        _ => None,
    }
}

/// What became of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An address (outer or quoted) was translated.
    Translated,
    /// Nothing in the packet is mapped: it is the edge host's own traffic.
    Untouched,
}

/// Why a packet from the tunnel or the LAN was not let through; the caller
/// drops it and counts the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Refused {
    /// From the tunnel, to an address that is neither one of the site's
    /// own nor in one of its mapped prefixes: the site exposes nothing
    /// else, whatever the broker sends.
    #[error("the destination is neither this site's address nor in one of its mapped LANs")]
    NotForSite,
    /// Not a well-formed IP packet, or its transport header is cut short.
    #[error("malformed packet")]
    Malformed,
    /// A protocol whose integrity covers the addresses and which tether
    /// does not translate (AH, DCCP, UDP-Lite, …).
    #[error("protocol {0} cannot be translated")]
    Protocol(u8),
}

impl Refused {
    /// One of each kind, in the order of their counters (the protocol
    /// number is not part of the label).
    pub const ALL: [Refused; 3] = [
        Refused::NotForSite,
        Refused::Malformed,
        Refused::Protocol(0),
    ];

    /// The label of the drop counter.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::NotForSite => "not_for_site",
            Refused::Malformed => "lan_map_malformed",
            Refused::Protocol(_) => "lan_map_protocol",
        }
    }
}

/// Which address of a header to translate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Src,
    Dst,
}

/// The LAN mappings of one site.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LanMap {
    mappings: Vec<Mapping>,
}

impl LanMap {
    /// A map of `mappings`, none overlapping another on either side and no
    /// LAN overlapping a mapped prefix.
    pub fn new(mappings: Vec<Mapping>) -> Result<Self, MappingError> {
        let all: Vec<IpNet> = mappings.iter().flat_map(|m| [m.real, m.mapped]).collect();
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                if a.contains(b) || b.contains(a) {
                    return Err(MappingError::Overlap { a: *a, b: *b });
                }
            }
        }
        Ok(Self { mappings })
    }

    /// The mappings.
    pub fn mappings(&self) -> &[Mapping] {
        &self.mappings
    }

    /// Whether there is nothing to translate.
    pub fn is_empty(&self) -> bool {
        self.mappings.is_empty()
    }

    /// The real LAN address behind a mapped one.
    pub fn real_of(&self, mapped: IpAddr) -> Option<IpAddr> {
        self.mappings.iter().find_map(|m| m.real_of(mapped))
    }

    /// The mapped address of a real LAN address.
    pub fn mapped_of(&self, real: IpAddr) -> Option<IpAddr> {
        self.mappings.iter().find_map(|m| m.mapped_of(real))
    }

    /// A packet from the tunnel, on its way into the LAN: a mapped
    /// destination becomes the real one. An ICMP error quotes a packet the
    /// LAN sent, whose mapped source becomes the real one.
    pub fn to_lan(&self, packet: &mut [u8]) -> Result<Outcome, Refused> {
        translate(packet, Field::Dst, &|a| self.real_of(a))
    }

    /// A packet from the LAN, on its way into the tunnel: a real source
    /// becomes the mapped one. An ICMP error quotes a packet sent to the
    /// LAN, whose real destination becomes the mapped one.
    pub fn from_lan(&self, packet: &mut [u8]) -> Result<Outcome, Refused> {
        translate(packet, Field::Src, &|a| self.mapped_of(a))
    }
}

/// What a site writes to its device from the tunnel: the site's own
/// addresses (those the broker assigned as single hosts) and its
/// [`LanMap`]. The broker routes nothing else to the site, so anything
/// else is a broker's fault or a packet left over from a LAN just removed;
/// written to the device, the kernel would forward it on (the agent turns
/// forwarding on for its LANs), into the LAN or back into the tunnel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inbound {
    own: Vec<IpAddr>,
    map: LanMap,
}

impl Inbound {
    /// The site's own addresses and its LAN map.
    pub fn new(own: Vec<IpAddr>, map: LanMap) -> Self {
        Self { own, map }
    }

    /// The same map, with the site's own addresses taken from what the
    /// broker assigned: the single hosts (the shorter prefixes are mapped
    /// LANs, which the map covers).
    pub fn with_assigned(&self, assigned: &[IpNet]) -> Self {
        let own = assigned
            .iter()
            .filter(|p| p.prefix_len() == p.max_prefix_len())
            .map(IpNet::addr)
            .collect();
        Self {
            own,
            map: self.map.clone(),
        }
    }

    /// The same own addresses, with `map`.
    pub fn with_map(&self, map: LanMap) -> Self {
        Self {
            own: self.own.clone(),
            map,
        }
    }

    /// The site's own addresses.
    pub fn own(&self) -> &[IpAddr] {
        &self.own
    }

    /// The LAN map.
    pub fn map(&self) -> &LanMap {
        &self.map
    }

    /// Whether the packet is for the site: its destination (before any
    /// translation) is one of the site's own addresses or in one of its
    /// mapped prefixes. Reads the header only.
    pub fn admits(&self, packet: &[u8]) -> Result<(), Refused> {
        let dst = destination(packet).ok_or(Refused::Malformed)?;
        if self.own.contains(&dst) || self.map.mappings.iter().any(|m| m.mapped.contains(&dst)) {
            Ok(())
        } else {
            Err(Refused::NotForSite)
        }
    }

    /// A packet from the tunnel on its way to the device: refused unless
    /// [`Inbound::admits`] it, then translated into the LAN
    /// ([`LanMap::to_lan`]).
    pub fn to_device(&self, packet: &mut [u8]) -> Result<Outcome, Refused> {
        self.admits(packet)?;
        if self.map.is_empty() {
            return Ok(Outcome::Untouched);
        }
        self.map.to_lan(packet)
    }
}

/// The destination address of an IP packet, if its header is there.
fn destination(packet: &[u8]) -> Option<IpAddr> {
    let family = match packet.first()? >> 4 {
        4 => Family::V4,
        6 => Family::V6,
        _ => return None,
    };
    let bytes = packet.get(address_range(family, Field::Dst))?;
    Some(match family {
        Family::V4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        Family::V6 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
    })
}

fn octets(addr: IpAddr) -> ([u8; 16], usize) {
    let mut out = [0u8; 16];
    match addr {
        IpAddr::V4(a) => {
            out[..4].copy_from_slice(&a.octets());
            (out, 4)
        }
        IpAddr::V6(a) => (a.octets(), 16),
    }
}

/// RFC 1624, equation 3: the checksum `sum` after the 16-bit words `old`
/// became `new` (both of even length).
fn adjust(sum: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut acc = u32::from(!sum);
    for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
        acc += u32::from(!u16::from_be_bytes([o[0], o[1]]));
        acc += u32::from(u16::from_be_bytes([n[0], n[1]]));
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// Adjusts the checksum at `at` in `bytes` for `old` → `new`, if the field
/// is present. `zero_means_none`: UDP over IPv4, where 0 says "no
/// checksum" (left alone) and a computed 0 is sent as 0xffff.
fn adjust_field(bytes: &mut [u8], at: usize, old: &[u8], new: &[u8], zero_means_none: bool) {
    let Some(field) = bytes.get_mut(at..at + 2) else {
        return;
    };
    let sum = u16::from_be_bytes([field[0], field[1]]);
    if zero_means_none && sum == 0 {
        return;
    }
    let mut next = adjust(sum, old, new);
    if zero_means_none && next == 0 {
        next = 0xffff;
    }
    field.copy_from_slice(&next.to_be_bytes());
}

/// Where the addresses of an IP header are.
fn address_range(family: Family, field: Field) -> std::ops::Range<usize> {
    match (family, field) {
        (Family::V4, Field::Src) => 12..16,
        (Family::V4, Field::Dst) => 16..20,
        (Family::V6, Field::Src) => 8..24,
        (Family::V6, Field::Dst) => 24..40,
    }
}

/// Writes `new` over the address `field` of the IP header at the start of
/// `bytes` (which held `old`), fixing the IPv4 header checksum, and the
/// transport checksum at `l4_checksum` if the transport covers addresses.
fn rewrite(
    bytes: &mut [u8],
    family: Family,
    field: Field,
    old: IpAddr,
    new: IpAddr,
    l4_checksum: Option<(usize, bool)>,
) {
    let (old, len) = octets(old);
    let (new, _) = octets(new);
    let (old, new) = (&old[..len], &new[..len]);
    bytes[address_range(family, field)].copy_from_slice(new);
    if family == Family::V4 {
        adjust_field(bytes, 10, old, new, false);
    }
    if let Some((at, zero_means_none)) = l4_checksum {
        adjust_field(bytes, at, old, new, zero_means_none);
    }
}

/// The transport checksum that covers the addresses: its offset from the
/// start of the transport header, and whether 0 means "none".
fn pseudo_checksum(family: Family, protocol: u8) -> Result<Option<(usize, bool)>, Refused> {
    match (family, protocol) {
        (_, PROTO_TCP) => Ok(Some((16, false))),
        (Family::V4, PROTO_UDP) => Ok(Some((6, true))),
        (Family::V6, PROTO_UDP) => Ok(Some((6, false))),
        (Family::V6, PROTO_ICMPV6) => Ok(Some((2, false))),
        (Family::V4, PROTO_ICMP) | (_, PROTO_GRE | PROTO_ESP | PROTO_SCTP) => Ok(None),
        (_, p) => Err(Refused::Protocol(p)),
    }
}

fn translate(
    packet: &mut [u8],
    field: Field,
    map: &dyn Fn(IpAddr) -> Option<IpAddr>,
) -> Result<Outcome, Refused> {
    let p = Packet::parse(packet).map_err(|_| Refused::Malformed)?;
    let (family, protocol, l4, total, later) = (
        p.family,
        p.protocol,
        p.header_len,
        p.total_len,
        p.later_fragment,
    );
    let old = match field {
        Field::Src => p.src,
        Field::Dst => p.dst,
    };
    let is_error = !later && p.is_icmp_error() && total >= l4 + 8;
    let outer = map(old);
    if outer.is_none() && !is_error {
        return Ok(Outcome::Untouched);
    }
    let checksum = pseudo_checksum(family, protocol)?;
    if family == Family::V6 && authenticated_v6(packet, l4) {
        return Err(Refused::Protocol(PROTO_AH));
    }
    let packet = &mut packet[..total];
    if !later {
        let needed = match (protocol, checksum) {
            (PROTO_TCP, _) => 20,
            (_, Some((at, _))) => at + 2,
            _ => 0,
        };
        if total < l4 + needed {
            return Err(Refused::Malformed);
        }
    }
    let mut outcome = Outcome::Untouched;
    // An error's own checksum covers the quote (and, for ICMPv6, the outer
    // addresses): it is adjusted below for exactly the bytes that change,
    // so an error that arrived corrupted stays detectably corrupted.
    let message_before = if is_error {
        packet[l4..].to_vec()
    } else {
        Vec::new()
    };
    if is_error {
        // The quoted packet travelled the other way: translate the other
        // address of its header.
        let inner_field = match field {
            Field::Src => Field::Dst,
            Field::Dst => Field::Src,
        };
        if translate_quoted(&mut packet[l4 + 8..], inner_field, map)? {
            outcome = Outcome::Translated;
        }
    }
    if let Some(new) = outer {
        let l4_checksum = if later || is_error {
            // Later fragments carry no transport header; an error's own
            // checksum is adjusted below.
            None
        } else {
            checksum.map(|(at, z)| (l4 + at, z))
        };
        rewrite(packet, family, field, old, new, l4_checksum);
        outcome = Outcome::Translated;
    }
    if is_error && outcome == Outcome::Translated {
        let at = l4 + 2;
        let mut sum = u16::from_be_bytes([packet[at], packet[at + 1]]);
        sum = adjust_changed(sum, &message_before, &packet[l4..]);
        if family == Family::V6
            && let Some(new) = outer
        {
            let (old, len) = octets(old);
            let (new, _) = octets(new);
            sum = adjust(sum, &old[..len], &new[..len]);
        }
        packet[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    }
    Ok(outcome)
}

/// Whether an AH header is among the IPv6 extension headers before `l4`
/// (the parser walks past it to the transport, but AH authenticates the
/// addresses: the packet cannot be translated).
fn authenticated_v6(packet: &[u8], l4: usize) -> bool {
    let Some(&first) = packet.get(6) else {
        return false;
    };
    let (mut next, mut at) = (first, 40);
    while at < l4 {
        if next == PROTO_AH {
            return true;
        }
        let (Some(&following), Some(&len)) = (packet.get(at), packet.get(at + 1)) else {
            return false;
        };
        at += match next {
            44 => 8,
            _ => (usize::from(len) + 1) * 8,
        };
        next = following;
    }
    false
}

/// Translates the header of a packet quoted in an ICMP error (usually cut
/// short, so read leniently). Returns whether it changed.
fn translate_quoted(
    quoted: &mut [u8],
    field: Field,
    map: &dyn Fn(IpAddr) -> Option<IpAddr>,
) -> Result<bool, Refused> {
    let Some(&first) = quoted.first() else {
        return Ok(false);
    };
    let (family, l4, protocol, later, addr) = match first >> 4 {
        4 => {
            let Some(h) = quoted.get(..20) else {
                return Ok(false);
            };
            let ihl = usize::from(h[0] & 0x0f) * 4;
            let frag = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
            let at = address_range(Family::V4, field).start;
            let a = Ipv4Addr::new(h[at], h[at + 1], h[at + 2], h[at + 3]);
            if ihl < 20 {
                return Err(Refused::Malformed);
            }
            (Family::V4, ihl, h[9], frag != 0, IpAddr::V4(a))
        }
        6 => {
            let Some(h) = quoted.get(..40) else {
                return Ok(false);
            };
            let range = address_range(Family::V6, field);
            let mut a = [0u8; 16];
            a.copy_from_slice(&h[range]);
            (Family::V6, 40, h[6], false, IpAddr::V6(Ipv6Addr::from(a)))
        }
        _ => return Ok(false),
    };
    let Some(new) = map(addr) else {
        return Ok(false);
    };
    // The quote's transport checksum covers the addresses too; keep it
    // consistent where the quote includes it. A protocol tether does not
    // know (or an IPv6 extension header) leaves it as it was.
    let l4_checksum = if later {
        None
    } else {
        pseudo_checksum(family, protocol)
            .ok()
            .flatten()
            .map(|(at, z)| (l4 + at, z))
    };
    rewrite(quoted, family, field, addr, new, l4_checksum);
    Ok(true)
}

/// [`adjust`] for the 16-bit words that differ between `old` and `new`
/// (same length; a trailing odd byte never changes). Unchanged words are
/// skipped: adding one would turn a checksum of 0xffff into 0x0000, and
/// the packet would not come back byte for byte when translated back.
fn adjust_changed(sum: u16, old: &[u8], new: &[u8]) -> u16 {
    old.chunks_exact(2)
        .zip(new.chunks_exact(2))
        .filter(|(o, n)| o != n)
        .fold(sum, |sum, (o, n)| adjust(sum, o, n))
}

#[cfg(test)]
mod tests;
