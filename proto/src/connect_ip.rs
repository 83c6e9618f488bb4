//! CONNECT-IP (RFC 9484): capsule values and the request URI template.
//!
//! The three capsules are decoded and encoded with the RFC's validation rules:
//! IP Version is 4 or 6; a prefix length is at most the address length and the
//! address bits it does not cover are zero (section 4.7.1); an ADDRESS_REQUEST
//! is not empty and its Request IDs are non-zero (section 4.7.2); the ranges
//! of a ROUTE_ADVERTISEMENT are well formed, ordered by IP version, then IP
//! protocol, then address, and do not overlap (section 4.7.3). A violation is
//! a [`ConnectIpError`]; RFC 9484 says the receiver then aborts the stream.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use thiserror::Error;

use crate::net;
use crate::varint::{self, Reader, Truncated};

/// The default CONNECT-IP URI template: `/.well-known/masque/ip/{target}/{ipproto}/`.
pub const DEFAULT_URI_TEMPLATE: &str = "/.well-known/masque/ip/{target}/{ipproto}/";
/// Path prefix of [`DEFAULT_URI_TEMPLATE`].
pub const WELL_KNOWN_PREFIX: &str = "/.well-known/masque/ip/";
/// The `:protocol` pseudo-header value of a CONNECT-IP extended CONNECT.
pub const PROTOCOL: &str = "connect-ip";

/// A CONNECT-IP capsule value that breaks RFC 9484's rules.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConnectIpError {
    /// The value ended inside a field.
    #[error("value ends inside a field")]
    Truncated,
    /// IP Version was neither 4 nor 6.
    #[error("IP version {0} is neither 4 nor 6")]
    UnknownIpVersion(u8),
    /// The prefix length exceeds the address length.
    #[error("prefix length {len} is longer than an IPv{version} address")]
    PrefixTooLong {
        /// 4 or 6.
        version: u8,
        /// The offending length.
        len: u8,
    },
    /// Address bits beyond the prefix length are not zero.
    #[error("address {0} has bits set beyond its prefix length")]
    HostBitsSet(IpNet),
    /// A Request ID was 0 in an ADDRESS_REQUEST.
    #[error("ADDRESS_REQUEST with Request ID 0")]
    ZeroRequestId,
    /// Two requested addresses share a Request ID.
    #[error("ADDRESS_REQUEST repeats Request ID {0}")]
    DuplicateRequestId(u64),
    /// An ADDRESS_REQUEST listed no addresses.
    #[error("ADDRESS_REQUEST without any requested address")]
    EmptyAddressRequest,
    /// A range starts after it ends.
    #[error("range {start}-{end} starts after it ends")]
    RangeStartAfterEnd {
        /// Start address.
        start: IpAddr,
        /// End address.
        end: IpAddr,
    },
    /// Ranges are not ordered by version, protocol and address, or overlap.
    #[error("ranges out of order or overlapping at {start}-{end} (protocol {protocol})")]
    RangesOutOfOrder {
        /// Start of the offending range.
        start: IpAddr,
        /// End of the offending range.
        end: IpAddr,
        /// Its IP protocol.
        protocol: u8,
    },
    /// A Request ID too large for a variable-length integer.
    #[error("Request ID {0} exceeds 2^62-1")]
    RequestIdTooLarge(u64),
}

impl From<Truncated> for ConnectIpError {
    fn from(_: Truncated) -> Self {
        ConnectIpError::Truncated
    }
}

/// One entry of an ADDRESS_ASSIGN capsule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AssignedAddress {
    /// The Request ID this answers, or 0 for an unsolicited assignment.
    pub request_id: u64,
    /// The assigned address or prefix (host bits zero).
    pub prefix: IpNet,
}

/// ADDRESS_ASSIGN: the complete set of addresses the receiver may use as
/// source. An empty set withdraws every earlier assignment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressAssign {
    /// The assigned addresses.
    pub addresses: Vec<AssignedAddress>,
}

/// One entry of an ADDRESS_REQUEST capsule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestedAddress {
    /// Non-zero identifier the answering ADDRESS_ASSIGN echoes.
    pub request_id: u64,
    /// The requested prefix; the unspecified address asks for any address of
    /// that family and length.
    pub prefix: IpNet,
}

/// ADDRESS_REQUEST: addresses the sender would like to be assigned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressRequest {
    /// The requests (at least one).
    pub requests: Vec<RequestedAddress>,
}

/// One entry of a ROUTE_ADVERTISEMENT: an inclusive address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpAddressRange {
    /// First address of the range.
    pub start: IpAddr,
    /// Last address of the range (same family as `start`).
    pub end: IpAddr,
    /// IP protocol number the route is limited to; 0 means every protocol.
    pub protocol: u8,
}

/// ROUTE_ADVERTISEMENT: the complete set of ranges the sender routes. It
/// replaces any earlier advertisement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteAdvertisement {
    /// Ranges, ordered and non-overlapping as RFC 9484 requires.
    pub ranges: Vec<IpAddressRange>,
}

fn read_prefix(r: &mut Reader<'_>) -> Result<IpNet, ConnectIpError> {
    let version = r.u8()?;
    let addr = read_addr(r, version)?;
    let len = r.u8()?;
    let prefix = match addr {
        IpAddr::V4(a) => Ipv4Net::new(a, len)
            .map(IpNet::V4)
            .map_err(|_| ConnectIpError::PrefixTooLong { version, len })?,
        IpAddr::V6(a) => Ipv6Net::new(a, len)
            .map(IpNet::V6)
            .map_err(|_| ConnectIpError::PrefixTooLong { version, len })?,
    };
    if prefix.trunc() != prefix {
        return Err(ConnectIpError::HostBitsSet(prefix));
    }
    Ok(prefix)
}

fn read_addr(r: &mut Reader<'_>, version: u8) -> Result<IpAddr, ConnectIpError> {
    match version {
        4 => Ok(IpAddr::V4(Ipv4Addr::from(r.array::<4>()?))),
        6 => Ok(IpAddr::V6(Ipv6Addr::from(r.array::<16>()?))),
        other => Err(ConnectIpError::UnknownIpVersion(other)),
    }
}

fn write_addr(addr: IpAddr, out: &mut Vec<u8>) {
    match addr {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

fn version_of(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 4,
        IpAddr::V6(_) => 6,
    }
}

fn write_prefix(request_id: u64, prefix: IpNet, out: &mut Vec<u8>) -> Result<(), ConnectIpError> {
    if prefix.trunc() != prefix {
        return Err(ConnectIpError::HostBitsSet(prefix));
    }
    varint::encode(request_id, out).map_err(|_| ConnectIpError::RequestIdTooLarge(request_id))?;
    out.push(version_of(prefix.addr()));
    write_addr(prefix.addr(), out);
    out.push(prefix.prefix_len());
    Ok(())
}

impl AddressAssign {
    /// Decodes and validates an ADDRESS_ASSIGN value.
    pub fn decode(value: &[u8]) -> Result<Self, ConnectIpError> {
        let mut r = Reader::new(value);
        let mut addresses = Vec::new();
        while !r.is_empty() {
            let request_id = r.varint()?;
            let prefix = read_prefix(&mut r)?;
            addresses.push(AssignedAddress { request_id, prefix });
        }
        Ok(Self { addresses })
    }

    /// Appends the capsule value (without capsule header) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), ConnectIpError> {
        for a in &self.addresses {
            write_prefix(a.request_id, a.prefix, out)?;
        }
        Ok(())
    }
}

impl AddressRequest {
    /// Decodes and validates an ADDRESS_REQUEST value.
    pub fn decode(value: &[u8]) -> Result<Self, ConnectIpError> {
        let mut r = Reader::new(value);
        let mut requests: Vec<RequestedAddress> = Vec::new();
        while !r.is_empty() {
            let request_id = r.varint()?;
            let prefix = read_prefix(&mut r)?;
            requests.push(RequestedAddress { request_id, prefix });
        }
        let request = Self { requests };
        request.validate()?;
        Ok(request)
    }

    /// Appends the capsule value to `out`, refusing what RFC 9484 forbids.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), ConnectIpError> {
        self.validate()?;
        for r in &self.requests {
            write_prefix(r.request_id, r.prefix, out)?;
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConnectIpError> {
        if self.requests.is_empty() {
            return Err(ConnectIpError::EmptyAddressRequest);
        }
        let mut seen = std::collections::BTreeSet::new();
        for r in &self.requests {
            if r.request_id == 0 {
                return Err(ConnectIpError::ZeroRequestId);
            }
            if !seen.insert(r.request_id) {
                return Err(ConnectIpError::DuplicateRequestId(r.request_id));
            }
        }
        Ok(())
    }
}

impl IpAddressRange {
    /// The range covering exactly `prefix`, for every protocol.
    pub fn from_prefix(prefix: IpNet) -> Self {
        let prefix = prefix.trunc();
        Self {
            start: prefix.network(),
            end: prefix.broadcast(),
            protocol: 0,
        }
    }

    /// The smallest set of prefixes covering exactly this range.
    pub fn to_prefixes(&self) -> Vec<IpNet> {
        let (Some((family, start)), Some((end_family, end))) =
            (net::to_bits(self.start), net::to_bits(self.end))
        else {
            return Vec::new();
        };
        if family != end_family || start > end {
            return Vec::new();
        }
        net::range_to_prefixes(family, start, end)
    }

    fn key(&self) -> (u8, u8) {
        (version_of(self.start), self.protocol)
    }
}

impl RouteAdvertisement {
    /// An advertisement of `prefixes` for every protocol: sorted, with
    /// overlapping and adjacent prefixes merged into ranges.
    pub fn from_prefixes(prefixes: impl IntoIterator<Item = IpNet>) -> Self {
        let mut spans: Vec<(net::Family, u128, u128)> = prefixes
            .into_iter()
            .map(|p| {
                let (family, start, end) = net::span(p);
                (family, start, end)
            })
            .collect();
        spans.sort_unstable();
        let mut ranges: Vec<IpAddressRange> = Vec::new();
        let mut current: Option<(net::Family, u128, u128)> = None;
        for (family, start, end) in spans {
            match &mut current {
                Some((f, _, e)) if *f == family && start <= e.saturating_add(1) => {
                    *e = (*e).max(end);
                }
                _ => {
                    if let Some((f, s, e)) = current.take() {
                        ranges.push(range_of(f, s, e));
                    }
                    current = Some((family, start, end));
                }
            }
        }
        if let Some((f, s, e)) = current {
            ranges.push(range_of(f, s, e));
        }
        Self { ranges }
    }

    /// Every prefix covered by the advertisement, ignoring protocol limits.
    pub fn prefixes(&self) -> Vec<IpNet> {
        self.ranges.iter().flat_map(|r| r.to_prefixes()).collect()
    }

    /// Decodes and validates a ROUTE_ADVERTISEMENT value.
    pub fn decode(value: &[u8]) -> Result<Self, ConnectIpError> {
        let mut r = Reader::new(value);
        let mut ranges = Vec::new();
        while !r.is_empty() {
            let version = r.u8()?;
            let start = read_addr(&mut r, version)?;
            let end = read_addr(&mut r, version)?;
            let protocol = r.u8()?;
            ranges.push(IpAddressRange {
                start,
                end,
                protocol,
            });
        }
        let ad = Self { ranges };
        ad.validate()?;
        Ok(ad)
    }

    /// Appends the capsule value to `out`, refusing what RFC 9484 forbids.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), ConnectIpError> {
        self.validate()?;
        for range in &self.ranges {
            out.push(version_of(range.start));
            write_addr(range.start, out);
            write_addr(range.end, out);
            out.push(range.protocol);
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConnectIpError> {
        let mut previous: Option<&IpAddressRange> = None;
        for range in &self.ranges {
            let ordered_ends = match (range.start, range.end) {
                (IpAddr::V4(s), IpAddr::V4(e)) => s <= e,
                (IpAddr::V6(s), IpAddr::V6(e)) => s <= e,
                _ => false,
            };
            if !ordered_ends {
                return Err(ConnectIpError::RangeStartAfterEnd {
                    start: range.start,
                    end: range.end,
                });
            }
            if let Some(prev) = previous {
                let in_order = match prev.key().cmp(&range.key()) {
                    std::cmp::Ordering::Less => true,
                    std::cmp::Ordering::Equal => prev.end < range.start,
                    std::cmp::Ordering::Greater => false,
                };
                if !in_order {
                    return Err(ConnectIpError::RangesOutOfOrder {
                        start: range.start,
                        end: range.end,
                        protocol: range.protocol,
                    });
                }
            }
            previous = Some(range);
        }
        Ok(())
    }
}

fn range_of(family: net::Family, start: u128, end: u128) -> IpAddressRange {
    IpAddressRange {
        start: net::from_bits(family, start),
        end: net::from_bits(family, end),
        protocol: 0,
    }
}

/// The `{target}` variable of a CONNECT-IP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `*`: any destination.
    Any,
    /// An address or prefix.
    Prefix(IpNet),
    /// A host name to resolve.
    Host(String),
}

/// The `{ipproto}` variable of a CONNECT-IP request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpProto {
    /// `*`: every protocol.
    Any,
    /// One IP protocol number.
    Number(u8),
}

/// What a CONNECT-IP request asked for, read from its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The requested target.
    pub target: Target,
    /// The requested protocol.
    pub ipproto: IpProto,
}

/// Why a request path is not a CONNECT-IP path of the default template.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PathError {
    /// The path does not follow `/.well-known/masque/ip/{target}/{ipproto}/`.
    #[error("path does not follow the CONNECT-IP template {DEFAULT_URI_TEMPLATE}")]
    NotConnectIp,
    /// `{target}` is neither `*`, an address, a prefix, nor a host name.
    #[error("invalid CONNECT-IP target {0:?}")]
    BadTarget(String),
    /// `{ipproto}` is neither `*` nor a number 0-255.
    #[error("invalid CONNECT-IP ipproto {0:?}")]
    BadIpProto(String),
}

impl Scope {
    /// Parses a request path against [`DEFAULT_URI_TEMPLATE`].
    pub fn from_path(path: &str) -> Result<Self, PathError> {
        let path = path.split('?').next().unwrap_or_default();
        let rest = path
            .strip_prefix(WELL_KNOWN_PREFIX)
            .ok_or(PathError::NotConnectIp)?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let mut parts = rest.split('/');
        let (Some(target), Some(ipproto), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(PathError::NotConnectIp);
        };
        let target_text =
            percent_decode(target).ok_or_else(|| PathError::BadTarget(target.into()))?;
        let target = parse_target(&target_text).ok_or(PathError::BadTarget(target_text))?;
        let ipproto = match ipproto {
            "*" => IpProto::Any,
            n => IpProto::Number(n.parse().map_err(|_| PathError::BadIpProto(n.into()))?),
        };
        Ok(Self { target, ipproto })
    }

    /// Whether this is the whole-tunnel scope (`*` and `*`).
    pub fn is_any(&self) -> bool {
        self.target == Target::Any && self.ipproto == IpProto::Any
    }

    /// The request path for this scope under the default template.
    pub fn to_path(&self) -> String {
        let target = match &self.target {
            Target::Any => "*".to_string(),
            Target::Prefix(p) if p.prefix_len() == p.max_prefix_len() => {
                percent_encode(&p.addr().to_string())
            }
            Target::Prefix(p) => percent_encode(&p.to_string()),
            Target::Host(h) => percent_encode(h),
        };
        let proto = match self.ipproto {
            IpProto::Any => "*".to_string(),
            IpProto::Number(n) => n.to_string(),
        };
        format!("{WELL_KNOWN_PREFIX}{target}/{proto}/")
    }
}

/// The path of the whole-tunnel scope (`*`, `*`), the one tether serves.
pub fn whole_tunnel_path() -> String {
    Scope {
        target: Target::Any,
        ipproto: IpProto::Any,
    }
    .to_path()
}

/// The CONNECT-IP request for the whole-tunnel scope (`*`, `*`) at
/// `authority`, announcing the capsule protocol.
pub fn request(authority: &str) -> crate::h3::Request {
    let mut request = crate::h3::Request::new("CONNECT", authority, &whole_tunnel_path())
        .with_header("capsule-protocol", "?1");
    request.protocol = Some(PROTOCOL.to_string());
    request
}

fn parse_target(text: &str) -> Option<Target> {
    if text == "*" {
        return Some(Target::Any);
    }
    if let Ok(addr) = text.parse::<IpAddr>() {
        return Some(Target::Prefix(IpNet::from(addr)));
    }
    if let Ok(prefix) = text.parse::<IpNet>() {
        return (prefix.trunc() == prefix).then_some(Target::Prefix(prefix));
    }
    let valid_host = !text.is_empty()
        && text.len() <= 253
        && text.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    valid_host.then(|| Target::Host(text.to_ascii_lowercase()))
}

/// Decodes `%XX` escapes (RFC 3986 section 2.1); `None` for a malformed
/// escape or a result that is not UTF-8.
pub fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capsule::{Capsule, CapsuleDecoder};
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn address_assign_wire_format_matches_rfc_layout() {
        let assign = AddressAssign {
            addresses: vec![AssignedAddress {
                request_id: 0,
                prefix: net("192.0.2.7/32"),
            }],
        };
        let mut wire = Vec::new();
        Capsule::AddressAssign(assign.clone())
            .encode(&mut wire)
            .unwrap();
        // Type 0x01, length 7, Request ID 0, IP Version 4, address, prefix length 32.
        assert_eq!(wire, [0x01, 0x07, 0x00, 0x04, 192, 0, 2, 7, 32]);
        let mut dec = CapsuleDecoder::default();
        dec.push(&wire);
        let raw = dec.next_capsule().unwrap().unwrap();
        assert_eq!(Capsule::parse(raw).unwrap(), Capsule::AddressAssign(assign));
    }

    #[test]
    fn prefix_rules_are_enforced() {
        // IPv4 with prefix length 33.
        assert_eq!(
            AddressAssign::decode(&[0, 4, 10, 0, 0, 0, 33]),
            Err(ConnectIpError::PrefixTooLong {
                version: 4,
                len: 33
            })
        );
        // Host bits set beyond /24.
        assert!(matches!(
            AddressAssign::decode(&[0, 4, 10, 0, 0, 1, 24]),
            Err(ConnectIpError::HostBitsSet(_))
        ));
        assert_eq!(
            AddressAssign::decode(&[0, 5, 10, 0, 0, 1, 24]),
            Err(ConnectIpError::UnknownIpVersion(5))
        );
        assert_eq!(
            AddressAssign::decode(&[0, 4, 10, 0]),
            Err(ConnectIpError::Truncated)
        );
        // An empty ADDRESS_ASSIGN is legal: it withdraws all addresses.
        assert_eq!(AddressAssign::decode(&[]), Ok(AddressAssign::default()));
    }

    #[test]
    fn address_request_rules_are_enforced() {
        assert_eq!(
            AddressRequest::decode(&[]),
            Err(ConnectIpError::EmptyAddressRequest)
        );
        assert_eq!(
            AddressRequest::decode(&[0, 4, 0, 0, 0, 0, 32]),
            Err(ConnectIpError::ZeroRequestId)
        );
        assert_eq!(
            AddressRequest::decode(&[1, 4, 0, 0, 0, 0, 32, 1, 4, 0, 0, 0, 0, 32]),
            Err(ConnectIpError::DuplicateRequestId(1))
        );
        let ok =
            AddressRequest::decode(&[1, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 128])
                .unwrap();
        assert_eq!(ok.requests[0].prefix, net("::/128"));
    }

    #[test]
    fn route_advertisement_order_rules() {
        let r = |s: &str, e: &str, p: u8| IpAddressRange {
            start: s.parse().unwrap(),
            end: e.parse().unwrap(),
            protocol: p,
        };
        let good = RouteAdvertisement {
            ranges: vec![
                r("10.0.0.0", "10.0.0.255", 0),
                r("10.0.1.0", "10.0.1.255", 0),
                r("10.0.0.0", "10.255.255.255", 6),
                r("fd00::", "fd00::ffff", 0),
            ],
        };
        let mut wire = Vec::new();
        good.encode(&mut wire).unwrap();
        assert_eq!(RouteAdvertisement::decode(&wire), Ok(good));

        for bad in [
            // Overlapping ranges of the same version and protocol.
            vec![r("10.0.0.0", "10.0.1.0", 0), r("10.0.1.0", "10.0.2.0", 0)],
            // IPv6 before IPv4.
            vec![r("fd00::", "fd00::1", 0), r("10.0.0.0", "10.0.0.1", 0)],
            // Protocol 17 before protocol 6.
            vec![r("10.0.0.0", "10.0.0.1", 17), r("10.0.0.0", "10.0.0.1", 6)],
        ] {
            let mut wire = Vec::new();
            for range in &bad {
                wire.push(version_of(range.start));
                write_addr(range.start, &mut wire);
                write_addr(range.end, &mut wire);
                wire.push(range.protocol);
            }
            assert!(matches!(
                RouteAdvertisement::decode(&wire),
                Err(ConnectIpError::RangesOutOfOrder { .. })
            ));
        }
        let backwards = [4, 10, 0, 0, 9, 10, 0, 0, 1, 0];
        assert!(matches!(
            RouteAdvertisement::decode(&backwards),
            Err(ConnectIpError::RangeStartAfterEnd { .. })
        ));
    }

    #[test]
    fn prefixes_merge_into_ranges_and_back() {
        let ad = RouteAdvertisement::from_prefixes([
            net("10.0.1.0/24"),
            net("10.0.0.0/24"),
            net("10.0.0.128/25"),
            net("fd00::/64"),
            net("192.168.0.0/16"),
        ]);
        assert_eq!(ad.ranges.len(), 3);
        assert_eq!(
            ad.prefixes(),
            vec![net("10.0.0.0/23"), net("192.168.0.0/16"), net("fd00::/64")]
        );
    }

    #[test]
    fn whole_tunnel_request() {
        let r = request("broker.example.org:443");
        assert_eq!(r.method, "CONNECT");
        assert_eq!(r.protocol.as_deref(), Some(PROTOCOL));
        assert_eq!(r.path.as_deref(), Some("/.well-known/masque/ip/*/*/"));
        assert_eq!(r.header("capsule-protocol"), Some("?1"));
        // It passes the server's own validation.
        let fields = crate::h3::qpack::decode(&r.encode(), 4096).unwrap();
        assert_eq!(crate::h3::Request::from_fields(fields).unwrap(), r);
    }

    #[test]
    fn template_paths() {
        let scope = Scope::from_path("/.well-known/masque/ip/*/*/").unwrap();
        assert!(scope.is_any());
        assert_eq!(scope.to_path(), "/.well-known/masque/ip/*/*/");
        let scope = Scope::from_path("/.well-known/masque/ip/2001%3Adb8%3A%3A%2F32/17/").unwrap();
        assert_eq!(scope.target, Target::Prefix(net("2001:db8::/32")));
        assert_eq!(scope.ipproto, IpProto::Number(17));
        assert_eq!(Scope::from_path(&scope.to_path()), Ok(scope));
        assert_eq!(Scope::from_path("/other"), Err(PathError::NotConnectIp));
        assert!(matches!(
            Scope::from_path("/.well-known/masque/ip/*/300/"),
            Err(PathError::BadIpProto(_))
        ));
        assert!(matches!(
            Scope::from_path("/.well-known/masque/ip/a%2/*/"),
            Err(PathError::BadTarget(_))
        ));
    }

    fn arb_prefix() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<u32>(), 0u8..=32)
                .prop_map(|(a, l)| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), l).unwrap().trunc())),
            (any::<u128>(), 0u8..=128)
                .prop_map(|(a, l)| IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), l).unwrap().trunc())),
        ]
    }

    proptest! {
        #[test]
        fn assign_round_trips(entries in proptest::collection::vec((0..=varint::MAX, arb_prefix()), 0..10)) {
            let assign = AddressAssign {
                addresses: entries.into_iter().map(|(request_id, prefix)| AssignedAddress { request_id, prefix }).collect(),
            };
            let mut wire = Vec::new();
            assign.encode(&mut wire).unwrap();
            prop_assert_eq!(AddressAssign::decode(&wire), Ok(assign));
        }

        #[test]
        fn request_round_trips(prefixes in proptest::collection::vec(arb_prefix(), 1..10)) {
            let request = AddressRequest {
                requests: prefixes.into_iter().enumerate()
                    .map(|(i, prefix)| RequestedAddress { request_id: i as u64 + 1, prefix }).collect(),
            };
            let mut wire = Vec::new();
            request.encode(&mut wire).unwrap();
            prop_assert_eq!(AddressRequest::decode(&wire), Ok(request));
        }

        #[test]
        fn advertisement_round_trips_and_covers_its_prefixes(prefixes in proptest::collection::vec(arb_prefix(), 0..12)) {
            let ad = RouteAdvertisement::from_prefixes(prefixes.clone());
            let mut wire = Vec::new();
            ad.encode(&mut wire).unwrap();
            prop_assert_eq!(RouteAdvertisement::decode(&wire), Ok(ad.clone()));
            let covered = ad.prefixes();
            for p in prefixes {
                prop_assert!(covered.iter().any(|c| c.contains(&p)), "{} not covered", p);
            }
        }

        #[test]
        fn arbitrary_values_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = AddressAssign::decode(&bytes);
            let _ = AddressRequest::decode(&bytes);
            let _ = RouteAdvertisement::decode(&bytes);
        }

        #[test]
        fn arbitrary_paths_never_panic(path in "\\PC*") {
            let _ = Scope::from_path(&path);
            let _ = Scope::from_path(&format!("{WELL_KNOWN_PREFIX}{path}"));
        }
    }
}
