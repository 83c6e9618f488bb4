//! Prefix arithmetic shared by IPAM, the route table and the codecs.
//!
//! Addresses of both families are handled as `u128` bit strings together with
//! their [`Family`], so one implementation serves IPv4 and IPv6.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// Address width in bits.
    pub const fn width(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    /// The family of `addr`.
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// The family of an address and its bits, right-aligned in a `u128`.
pub fn bits(addr: IpAddr) -> (Family, u128) {
    match addr {
        IpAddr::V4(a) => (Family::V4, u128::from(u32::from(a))),
        IpAddr::V6(a) => (Family::V6, u128::from(a)),
    }
}

/// Like [`bits`], kept for call sites that match on an option.
pub fn to_bits(addr: IpAddr) -> Option<(Family, u128)> {
    Some(bits(addr))
}

/// The address of `family` whose bits are `value` (truncated to the width).
pub fn from_bits(family: Family, value: u128) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(value as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(value)),
    }
}

/// The prefix of `family` starting at `start` with length `len`.
pub fn prefix(family: Family, start: u128, len: u8) -> IpNet {
    match family {
        Family::V4 => Ipv4Net::new(Ipv4Addr::from(start as u32), len.min(32))
            .map(IpNet::V4)
            .unwrap_or_default(),
        Family::V6 => Ipv6Net::new(Ipv6Addr::from(start), len.min(128))
            .map(IpNet::V6)
            .unwrap_or_else(|_| IpNet::V6(Ipv6Net::default())),
    }
    .trunc()
}

/// Family, first and last address (as bits) of a prefix.
pub fn span(prefix: IpNet) -> (Family, u128, u128) {
    let prefix = prefix.trunc();
    let (family, start) = bits(prefix.network());
    let (_, end) = bits(prefix.broadcast());
    (family, start, end)
}

/// Number of addresses in a block of length `len` in `family`, saturating at
/// `u128::MAX` for the whole IPv6 space.
pub fn block_size(family: Family, len: u8) -> u128 {
    let host_bits = u32::from(family.width().saturating_sub(len));
    1u128.checked_shl(host_bits).unwrap_or(u128::MAX)
}

/// Whether two prefixes share at least one address.
pub fn overlaps(a: IpNet, b: IpNet) -> bool {
    a.contains(&b) || b.contains(&a)
}

/// The smallest list of prefixes covering exactly `start..=end`.
pub fn range_to_prefixes(family: Family, mut start: u128, end: u128) -> Vec<IpNet> {
    let width = u32::from(family.width());
    let mut out = Vec::new();
    while start <= end {
        let span = end - start;
        // Largest block that fits in the remaining range...
        let fit = if span == u128::MAX {
            128
        } else {
            127 - (span + 1).leading_zeros()
        };
        // ...and is aligned at `start`.
        let host_bits = start.trailing_zeros().min(fit).min(width);
        out.push(prefix(family, start, (width - host_bits) as u8));
        let size_minus_one = if host_bits == 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        match start.checked_add(size_minus_one) {
            Some(last) if last < end => start = last + 1,
            _ => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_decompose_into_minimal_prefixes() {
        let (f, s, _) = span(net("10.0.0.1/32"));
        let (_, _, e) = span(net("10.0.0.6/32"));
        assert_eq!(
            range_to_prefixes(f, s, e),
            vec![
                net("10.0.0.1/32"),
                net("10.0.0.2/31"),
                net("10.0.0.4/31"),
                net("10.0.0.6/32")
            ]
        );
        assert_eq!(
            range_to_prefixes(Family::V6, 0, u128::MAX),
            vec![net("::/0")]
        );
        assert_eq!(
            range_to_prefixes(Family::V4, 0, u128::from(u32::MAX)),
            vec![net("0.0.0.0/0")]
        );
    }

    #[test]
    fn block_sizes() {
        assert_eq!(block_size(Family::V4, 24), 256);
        assert_eq!(block_size(Family::V6, 0), u128::MAX);
        assert_eq!(block_size(Family::V6, 127), 2);
    }
}
