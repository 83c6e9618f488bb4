//! The broker's forwarding decision on a packet from a site or a gateway:
//! anti-spoofing, longest-prefix match, data residency, access policy,
//! TTL, MTU (fragment or packet-too-big), ICMP errors back to the sender.
//!
//! Input: the first byte picks the ingress and the next hop's MTU; the
//! rest is the packet. Properties: no panic; a forwarded packet parses
//! with the same addresses and one hop less, and fits the MTU; fragments
//! fit the MTU; an ICMP reply parses and goes back to the sender; a
//! packet from a site with a source it does not own is never forwarded.
//!
//! When the rest reads as a frame of the broker-to-broker link (a packet
//! and a trailer naming its sender), the packet takes the relayed path
//! instead (`Router::decide_relayed`) for that sender: the frame is the
//! only encoding of its sender and packet, the same properties hold for
//! what is forwarded, and nothing but an ICMP error passes as a broker's
//! own answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_fuzz::RouterFixture;
use tether_proto::forward::{DropReason, Ingress, Verdict};
use tether_proto::ip::{self, Packet};
use tether_proto::relay_frame::{self, Sender};
use tether_proto::route::RouteTarget;

thread_local! {
    static FIXTURE: RouterFixture = RouterFixture::new();
}

fuzz_target!(|data: &[u8]| {
    let Some((&knob, bytes)) = data.split_first() else {
        return;
    };
    FIXTURE.with(|f| {
        let ingress = match knob & 3 {
            0 => Ingress::Site {
                site: &f.a,
                region: &f.eu,
                allowed: &f.a_allowed,
            },
            1 => Ingress::Site {
                site: &f.c,
                region: &f.us,
                allowed: &f.c_allowed,
            },
            2 => Ingress::Gateway {
                gateway: &f.gw,
                region: &f.eu,
                allowed: &[],
            },
            _ => Ingress::Gateway {
                gateway: &f.gw,
                region: &f.us,
                allowed: &f.c_allowed,
            },
        };
        let mtu = 576 + usize::from(knob >> 2) * 32;
        let relayed = relay_frame::parse(bytes).ok();
        let bytes = match &relayed {
            Some((sender, len)) => {
                let packet = &bytes[..*len];
                assert_eq!(sender.frame(packet), bytes, "a frame has one encoding");
                packet
            }
            None => bytes,
        };
        let original = Packet::parse(bytes).ok();
        let mut packet = bytes.to_vec();
        let mtu_of = |_: &RouteTarget| (knob & 0x80 == 0).then_some(mtu);
        let verdict = match &relayed {
            Some((sender, _)) => f.router.decide_relayed(&mut packet, "b", sender, mtu_of),
            None => f.router.decide(&ingress, &mut packet, mtu_of),
        };
        let Some(original) = original else {
            assert_eq!(verdict, Verdict::Drop(DropReason::Malformed));
            return;
        };
        if let Some((Sender::Router, _)) = relayed
            && !original.is_icmp_error()
        {
            assert!(
                verdict.drop_reason().is_some(),
                "a broker's answer that is no ICMP error was forwarded"
            );
        }
        if relayed.is_none()
            && let Ingress::Site { allowed, .. } = ingress
            && ip::check_source(&original, allowed).is_err()
        {
            assert!(
                verdict.drop_reason().is_some(),
                "a spoofed packet was forwarded"
            );
        }
        match verdict {
            Verdict::Forward(_) => {
                let after = Packet::parse(&packet).expect("a forwarded packet parses");
                assert_eq!((after.src, after.dst), (original.src, original.dst));
                assert_eq!(after.ttl + 1, original.ttl);
                assert!(after.total_len <= mtu);
            }
            Verdict::Fragments(_, fragments) => {
                for fragment in fragments {
                    assert!(fragment.len() <= mtu);
                    let p = Packet::parse(&fragment).expect("a fragment parses");
                    assert_eq!((p.src, p.dst), (original.src, original.dst));
                }
            }
            Verdict::Reply { icmp, .. } => {
                let p = Packet::parse(&icmp).expect("an ICMP reply parses");
                assert!(p.is_icmp_error());
                assert_eq!(p.dst, original.src);
            }
            Verdict::Drop(_) => {}
            Verdict::Relay(_) => panic!("relayed with no other broker in the fleet"),
        }
    });
});
