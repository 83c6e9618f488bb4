//! 1:1 translation of LAN addresses (192.168.1.0/24 at the site appears as
//! 100.70.3.0/24 in the overlay): packets leaving and entering the LAN,
//! transport checksums adjusted, ICMP errors' quoted headers translated.
//!
//! Input: the first byte picks the mapping and the direction; the rest is
//! the packet. Properties: no panic; a translated packet parses with the
//! translated address; translating back with the inverse mapping restores
//! the packet byte for byte (a checksum of 0xffff may come back as its
//! ones'-complement twin 0x0000), for every packet the inverse map would
//! leave alone.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_fuzz::parsed;
use tether_proto::ip::Packet;
use tether_proto::netmap::{LanMap, Mapping, Outcome};

fn map(pairs: &[(&str, &str)]) -> LanMap {
    let mappings = pairs
        .iter()
        .map(|(r, m)| Mapping::new(parsed(r), parsed(m)).expect("a valid fixture mapping"))
        .collect();
    LanMap::new(mappings).expect("a valid fixture map")
}

thread_local! {
    /// Pairs of a map and its inverse.
    static MAPS: Vec<(LanMap, LanMap)> = vec![
        (
            map(&[("192.168.1.0/24", "100.70.3.0/24"), ("fd42:1::/64", "fd00:70:3::/64")]),
            map(&[("100.70.3.0/24", "192.168.1.0/24"), ("fd00:70:3::/64", "fd42:1::/64")]),
        ),
        (
            map(&[("10.0.0.0/8", "11.0.0.0/8"), ("192.168.7.9/32", "100.70.0.1/32")]),
            map(&[("11.0.0.0/8", "10.0.0.0/8"), ("100.70.0.1/32", "192.168.7.9/32")]),
        ),
    ];
}

/// `back` must be `original` byte for byte, except that a checksum of
/// 0xffff may come back as 0x0000: the same value in ones' complement
/// (RFC 1624 section 3), which incremental updates cannot tell apart.
fn assert_round_trip(back: &[u8], original: &[u8]) {
    assert_eq!(back.len(), original.len());
    let mut i = 0;
    while i < back.len() {
        if back[i] != original[i] {
            let at = i & !1;
            assert!(
                original.get(at..at + 2) == Some(&[0xff, 0xff][..])
                    && back.get(at..at + 2) == Some(&[0, 0][..]),
                "translation does not round trip at byte {i}: {back:?} != {original:?}"
            );
            i = at + 2;
        } else {
            i += 1;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&knob, bytes)) = data.split_first() else {
        return;
    };
    MAPS.with(|maps| {
        let (forward, inverse) = &maps[usize::from(knob & 1)];
        let mut packet = bytes.to_vec();
        if knob & 2 == 0 {
            // From the LAN: the source becomes the mapped address; the
            // inverse map's from_lan turns it back.
            // Where the inverse map would already translate the packet (a
            // quoted header that holds a mapped address), going back is
            // not the inverse of going there.
            if inverse.from_lan(&mut bytes.to_vec()) == Ok(Outcome::Translated) {
                return;
            }
            let Ok(Outcome::Translated) = forward.from_lan(&mut packet) else {
                return;
            };
            let p = Packet::parse(&packet).expect("a translated packet parses");
            assert!(
                forward.real_of(p.src).is_some()
                    || Packet::parse(bytes).is_ok_and(|o| o.src == p.src)
            );
            let mut back = packet.clone();
            assert_eq!(inverse.from_lan(&mut back), Ok(Outcome::Translated));
            assert_round_trip(&back, bytes);
        } else {
            // Into the LAN: the destination becomes the real address.
            if inverse.to_lan(&mut bytes.to_vec()) == Ok(Outcome::Translated) {
                return;
            }
            let Ok(Outcome::Translated) = forward.to_lan(&mut packet) else {
                return;
            };
            let p = Packet::parse(&packet).expect("a translated packet parses");
            assert!(
                forward.mapped_of(p.dst).is_some()
                    || Packet::parse(bytes).is_ok_and(|o| o.dst == p.dst)
            );
            let mut back = packet.clone();
            assert_eq!(inverse.to_lan(&mut back), Ok(Outcome::Translated));
            assert_round_trip(&back, bytes);
        }
    });
});
