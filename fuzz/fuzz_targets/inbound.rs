//! What an edge agent writes to its device from the tunnel
//! (`Inbound::admits`, `Inbound::to_device`): packets to the site's own
//! addresses, and packets to its mapped LAN prefixes translated into the
//! LAN; anything else is refused as not for the site.
//!
//! Input: a few bytes choose the site's own addresses (given directly, or
//! as the broker assigns them, where only single hosts are the site's own)
//! and its LAN mappings, each either arbitrary or derived from the
//! packet's destination so that every branch is near; the rest is the
//! packet.
//!
//! Properties, against a reference written here from the rule alone (the
//! destination read from the fixed header offset, prefixes compared with
//! integer masks):
//! - no version 4 or 6 header with a whole destination: `Malformed`;
//! - the destination is one of the own addresses or inside a mapped
//!   prefix: admitted; otherwise `NotForSite`;
//! - a refused packet is left untouched; an admitted one with no mappings
//!   is `Untouched` and unchanged; with mappings, `to_device` does exactly
//!   what `LanMap::to_lan` does, and when it succeeds, a destination
//!   inside a mapped prefix became the same host in the real LAN while any
//!   other destination stayed as it was.
#![no_main]

use std::net::IpAddr;

use ipnet::IpNet;
use libfuzzer_sys::arbitrary::{Result as ArbResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use tether_proto::netmap::{Inbound, LanMap, Mapping, Outcome, Refused};

/// The destination as the rule reads it: the version nibble, then the
/// address at its fixed offset (IPv4 16..20, IPv6 24..40).
fn reference_destination(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => {
            let b: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        6 => {
            let b: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        _ => None,
    }
}

/// An address as a 128-bit number and its width in bits.
fn bits(addr: IpAddr) -> (u128, u8) {
    match addr {
        IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

/// Whether `addr` is inside `net`: same family, and the first
/// `prefix_len` bits agree.
fn reference_contains(net: IpNet, addr: IpAddr) -> bool {
    let ((a, width), (n, net_width)) = (bits(addr), bits(net.addr()));
    if width != net_width {
        return false;
    }
    let host_bits = u32::from(width - net.prefix_len());
    let keep = |x: u128| x.checked_shr(host_bits).unwrap_or(0);
    keep(a) == keep(n)
}

/// `addr` (inside `from`) moved to the same host in `to`.
fn reference_swap(addr: IpAddr, from: IpNet, to: IpNet) -> IpAddr {
    let ((a, width), (t, _)) = (bits(addr), bits(to.addr()));
    let host_bits = u32::from(width - from.prefix_len());
    let host_mask = 1u128.checked_shl(host_bits).map_or(u128::MAX, |m| m - 1);
    let out = (t & !host_mask) | (a & host_mask);
    match addr {
        IpAddr::V4(_) => IpAddr::from((out as u32).to_be_bytes()),
        IpAddr::V6(_) => IpAddr::from(out.to_be_bytes()),
    }
}

/// An address of the packet's family: the packet's destination with a
/// byte changed (or not), or arbitrary bytes.
fn address(u: &mut Unstructured<'_>, dst: Option<IpAddr>) -> ArbResult<IpAddr> {
    let how: u8 = u.arbitrary()?;
    let v6 = match dst {
        Some(d) if how & 1 == 0 => {
            // Near the destination: one byte (maybe) different.
            let (at, xor): (u8, u8) = (u.arbitrary()?, u.arbitrary()?);
            let xor = if how & 2 == 0 { 0 } else { xor };
            return Ok(match d {
                IpAddr::V4(a) => {
                    let mut o = a.octets();
                    o[usize::from(at) % 4] ^= xor;
                    IpAddr::from(o)
                }
                IpAddr::V6(a) => {
                    let mut o = a.octets();
                    o[usize::from(at) % 16] ^= xor;
                    IpAddr::from(o)
                }
            });
        }
        Some(d) => d.is_ipv6() ^ (how & 4 != 0),
        None => how & 4 != 0,
    };
    Ok(if v6 {
        IpAddr::from(u.arbitrary::<[u8; 16]>()?)
    } else {
        IpAddr::from(u.arbitrary::<[u8; 4]>()?)
    })
}

/// A prefix of `addr`'s family holding `addr`, of an arbitrary length.
fn prefix(u: &mut Unstructured<'_>, addr: IpAddr) -> ArbResult<IpNet> {
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = u.int_in_range(0..=max)?;
    Ok(IpNet::new(addr, len).map_or_else(|_| IpNet::from(addr), |p| p.trunc()))
}

struct Site {
    inbound: Inbound,
    own: Vec<IpAddr>,
    mappings: Vec<Mapping>,
}

/// The site the input describes, and the packet; `None` when the input
/// runs out or its mappings are not a valid map.
fn site(data: &[u8]) -> Option<(Site, Vec<u8>)> {
    let mut u = Unstructured::new(data);
    let len = usize::from(u.arbitrary::<u8>().ok()?);
    let packet = u.bytes(len.min(u.len())).ok()?.to_vec();
    let dst = reference_destination(&packet);
    let counts: u8 = u.arbitrary().ok()?;
    let assigned_form = counts & 0x80 != 0;
    let mut own = Vec::new();
    let mut assigned = Vec::new();
    for _ in 0..counts & 3 {
        let a = address(&mut u, dst).ok()?;
        if assigned_form {
            // As the broker assigns: single hosts are the site's own, the
            // shorter prefixes are its mapped LANs (not its own).
            let p = prefix(&mut u, a).ok()?;
            if p.prefix_len() == p.max_prefix_len() {
                own.push(p.addr());
            }
            assigned.push(p);
        } else {
            own.push(a);
        }
    }
    let mut mappings = Vec::new();
    for _ in 0..(counts >> 2) & 3 {
        let near = address(&mut u, dst).ok()?;
        let mapped = prefix(&mut u, near).ok()?;
        let real_addr = address(&mut u, None).ok()?;
        let real = IpNet::new(real_addr, mapped.prefix_len()).ok()?;
        mappings.push(Mapping::new(real, mapped).ok()?);
    }
    let map = LanMap::new(mappings.clone()).ok()?;
    let inbound = if assigned_form {
        Inbound::default().with_map(map).with_assigned(&assigned)
    } else {
        Inbound::new(own.clone(), map)
    };
    Some((
        Site {
            inbound,
            own,
            mappings,
        },
        packet,
    ))
}

fuzz_target!(|data: &[u8]| {
    let Some((site, packet)) = site(data) else {
        return;
    };
    assert_eq!(site.inbound.own(), &site.own[..]);
    assert_eq!(site.inbound.map().mappings(), &site.mappings[..]);

    let dst = reference_destination(&packet);
    let mapping = dst.and_then(|d| {
        site.mappings
            .iter()
            .find(|m| reference_contains(m.mapped, d))
    });
    let expected = match dst {
        None => Err(Refused::Malformed),
        Some(d) if site.own.contains(&d) || mapping.is_some() => Ok(()),
        Some(_) => Err(Refused::NotForSite),
    };
    assert_eq!(site.inbound.admits(&packet), expected, "admits {packet:?}");

    let mut written = packet.clone();
    let outcome = site.inbound.to_device(&mut written);
    match expected {
        Err(e) => {
            assert_eq!(outcome, Err(e));
            assert_eq!(written, packet, "a refused packet was changed");
        }
        Ok(()) if site.mappings.is_empty() => {
            assert_eq!(outcome, Ok(Outcome::Untouched));
            assert_eq!(written, packet, "a packet with nothing to map was changed");
        }
        Ok(()) => {
            let mut by_map = packet.clone();
            assert_eq!(outcome, site.inbound.map().to_lan(&mut by_map));
            assert_eq!(written, by_map);
            if outcome.is_ok() {
                let d = dst.expect("an admitted packet has a destination");
                let want = mapping.map_or(d, |m| reference_swap(d, m.mapped, m.real));
                assert_eq!(
                    reference_destination(&written),
                    Some(want),
                    "destination after translation"
                );
                if mapping.is_some() {
                    assert_eq!(outcome, Ok(Outcome::Translated));
                }
            }
        }
    }
});
