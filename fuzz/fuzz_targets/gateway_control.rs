//! The broker-to-gateway control channel inside WireGuard: the UDP packet
//! around it, route-set and zone chunks, and their reassembly on the
//! gateway.
//!
//! Input: the first byte picks a mode: one IPv4 packet from the tunnel, or
//! a sequence of control payloads (each a 2-byte length and its bytes).
//! Properties: no panic; a message that decodes encodes to one that
//! decodes the same; a completed route set holds only routes that came in
//! chunks of its generation; a completed zone decodes to a zone that
//! encodes and decodes the same.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use tether_proto::dns::ZoneData;
use tether_proto::gateway::{
    Assembler, BROKER_CONTROL, GATEWAY_CONTROL, Message, ZoneAssembler, control_payload,
};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 1 {
        if let Some(payload) = control_payload(rest, BROKER_CONTROL, GATEWAY_CONTROL)
            && let Ok(message) = Message::decode(payload)
        {
            assert_eq!(Message::decode(&message.encode()).as_ref(), Ok(&message));
        }
        return;
    }
    let mut routes = Assembler::default();
    let mut zones = ZoneAssembler::default();
    let mut seen = BTreeSet::new();
    while let [hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (payload, next) = tail.split_at(len);
        rest = next;
        let Ok(message) = Message::decode(payload) else {
            continue;
        };
        assert_eq!(Message::decode(&message.encode()).as_ref(), Ok(&message));
        if let Message::Routes {
            generation,
            routes: r,
            ..
        } = &message
        {
            seen.extend(r.iter().map(|r| (*generation, r.clone())));
        }
        if let Some(set) = routes.push(message.clone()) {
            assert_eq!(routes.applied(), Some(set.generation));
            for r in &set.routes {
                assert!(
                    seen.contains(&(set.generation, r.clone())),
                    "route {r:?} never sent in generation {}",
                    set.generation
                );
            }
        }
        if let Some(zone) = zones.push(message) {
            assert_eq!(ZoneData::decode(&zone.encode()).as_ref(), Ok(&zone));
        }
    }
});
