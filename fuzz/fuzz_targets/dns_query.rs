//! A DNS message from the network answered from the mesh zone, end to end
//! without sockets, by the function the DNS server answers every TCP
//! message with (`tether_proto::dns::answer_message`; over UDP the server
//! makes the same `reply`): the wire message parsed (hickory-proto),
//! checked (EDNS version, opcode, one question), answered from the zone,
//! and the answer encoded.
//!
//! Properties: no panic; every answer parses back as a response without
//! recursion, and keeps the query's ID, question, response code and OPT
//! presence; garbage after a readable header gets FORMERR for its ID.
#![no_main]

use hickory_proto::op::{Message, MessageType, ResponseCode};
use libfuzzer_sys::fuzz_target;
use tether_fuzz::parsed;
use tether_proto::dns::{Service, SiteNames, Zone, ZoneData, answer_message};
use tether_proto::netmap::Mapping;

thread_local! {
    static ZONE: Zone = {
        let data = ZoneData {
            zone: "tether.internal".into(),
            serial: 7,
            ttl: 5,
            reverse: vec![parsed("100.64.0.0/16"), parsed("fd00:7e7e::/48")],
            sites: vec![
                SiteNames {
                    site: parsed("hospital-a"),
                    region: parsed("eu"),
                    addresses: vec![parsed("100.64.0.2"), parsed("fd00:7e7e::2")],
                    services: vec![Service::parse("dicom=104").expect("a service")],
                    lans: vec![
                        Mapping::new(parsed("192.168.1.0/24"), parsed("100.64.9.0/24")).expect("a LAN mapping"),
                    ],
                },
                SiteNames {
                    site: parsed("lab-b"),
                    region: parsed("us"),
                    addresses: vec![parsed("100.64.1.9")],
                    services: vec![],
                    lans: vec![],
                },
            ],
        };
        Zone::new(data, &[parsed("127.0.0.1")]).expect("the fixture zone builds")
    };
}

fuzz_target!(|data: &[u8]| {
    let mut code = None;
    let Some(bytes) = ZONE.with(|z| answer_message(Some(z), data, |c| code = Some(c))) else {
        // No answer: a response, or not even a header.
        if let Ok(m) = Message::from_vec(data) {
            assert_eq!(m.metadata.message_type, MessageType::Response);
        } else {
            assert!(data.len() < 12 || data[2] & 0x80 != 0);
        }
        return;
    };
    let back = Message::from_vec(&bytes).expect("an encoded answer parses");
    assert_eq!(back.metadata.message_type, MessageType::Response);
    assert!(!back.metadata.recursion_available);
    match Message::from_vec(data) {
        Ok(request) => {
            assert_eq!(back.metadata.id, request.metadata.id);
            assert_eq!(back.queries, request.queries);
            // By number: 16 reads back as BADSIG, which shares it with
            // BADVERS.
            let sent = u16::from(back.metadata.response_code);
            assert_eq!(Some(sent), code.map(u16::from));
            assert_eq!(back.edns.is_some(), request.edns.is_some());
            if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
                assert_eq!(sent, u16::from(ResponseCode::BADVERS));
            }
        }
        Err(_) => {
            // Garbage after a header: FORMERR for the header's ID.
            assert_eq!(back.metadata.response_code, ResponseCode::FormErr);
            assert_eq!(back.metadata.id, u16::from_be_bytes([data[0], data[1]]));
            assert!(code.is_none());
        }
    }
});
