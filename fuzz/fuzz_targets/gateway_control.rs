//! The broker-to-gateway control channel inside WireGuard: the UDP packet
//! around it, route-set, zone and broker-list chunks, their reassembly on
//! the gateway, and the brokers a gateway follows.
//!
//! Input: the first byte picks a mode: one IPv4 packet from the tunnel, or
//! a sequence of control payloads (each a 2-byte length and its bytes).
//! Properties: no panic; a message that decodes encodes to one that
//! decodes the same; a completed route set holds only routes that came in
//! chunks of its generation; a completed zone decodes to a zone that
//! encodes and decodes the same; a completed broker list holds at most
//! `MAX_LISTED` distinct endpoints, each sent in a chunk of its version;
//! applying it keeps the configured broker in its slot, never follows more
//! than `MAX_BROKERS` brokers nor one twice, and a saved learned list
//! restores the same brokers.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use tether_proto::dns::ZoneData;
use tether_proto::gateway::brokers::{self, BrokerSet, ListAssembler, MAX_LISTED};
use tether_proto::gateway::failover::MAX_BROKERS;
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
    let mut lists = ListAssembler::default();
    let mut listed = BTreeSet::new();
    let configured: std::net::SocketAddr = ([10, 0, 0, 1], 51820).into();
    let mut set = BrokerSet::new(&[configured], "10.0.0.0/8".parse().unwrap());
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
        if let Message::Brokers {
            version,
            endpoints,
            ..
        } = &message
        {
            listed.extend(endpoints.iter().map(|e| (*version, *e)));
        }
        if let Some(list) = lists.push(message.clone()) {
            assert!(list.endpoints.len() <= MAX_LISTED);
            let distinct: BTreeSet<_> = list.endpoints.iter().collect();
            assert_eq!(distinct.len(), list.endpoints.len());
            for e in &list.endpoints {
                assert!(listed.contains(&(list.version, *e)), "{e} never sent");
            }
            set.apply(&list);
            assert_eq!(set.addr(0), Some(configured));
            assert!(set.len() <= MAX_BROKERS);
            let followed: Vec<_> = set.addrs().into_iter().flatten().collect();
            let distinct: BTreeSet<_> = followed.iter().collect();
            assert_eq!(distinct.len(), followed.len());
            let mut again = BrokerSet::new(&[configured], "10.0.0.0/8".parse().unwrap());
            again.restore(&brokers::decode_saved(&brokers::encode_saved(&set.learned())));
            assert_eq!(again.learned(), set.learned());
        }
        if let Some(zone) = zones.push(message) {
            assert_eq!(ZoneData::decode(&zone.encode()).as_ref(), Ok(&zone));
        }
    }
});
