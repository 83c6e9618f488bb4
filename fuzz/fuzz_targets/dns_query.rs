//! A DNS message from the network answered from the mesh zone, end to end
//! without sockets: the wire message parsed (hickory-proto), checked the
//! way the server checks it (EDNS version, opcode, one question), answered
//! from the zone, and the answer encoded.
//!
//! Properties: no panic; every answer encodes, parses back, and keeps the
//! query's ID and question.
#![no_main]

use hickory_proto::op::{Edns, Message, Metadata, OpCode, ResponseCode};
use libfuzzer_sys::fuzz_target;
use tether_fuzz::parsed;
use tether_proto::dns::{Service, SiteNames, Zone, ZoneData};
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
    let Ok(request) = Message::from_vec(data) else {
        return;
    };
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.recursion_available = false;
    let bad_version = request.edns.as_ref().is_some_and(|e| e.version() > 0);
    let answer = if bad_version {
        metadata.response_code = ResponseCode::BADVERS;
        None
    } else if request.metadata.op_code != OpCode::Query {
        metadata.response_code = ResponseCode::Refused;
        None
    } else if request.queries.len() != 1 {
        metadata.response_code = ResponseCode::FormErr;
        None
    } else {
        let q = &request.queries[0];
        let a = ZONE.with(|z| z.answer(q.name(), q.query_type(), q.query_class()));
        metadata.response_code = a.code;
        metadata.authoritative = a.authoritative;
        Some(a)
    };
    let mut response = Message::new(metadata.id, metadata.message_type, metadata.op_code);
    response.metadata = metadata;
    response.add_queries(request.queries.clone());
    if let Some(a) = &answer {
        response.add_answers(a.answers.clone());
        response.add_authorities(a.authority.clone());
        response.add_additionals(a.additionals.clone());
    }
    if request.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        if bad_version {
            e.set_rcode_high(ResponseCode::BADVERS.high());
        }
        response.set_edns(e);
    }
    let bytes = response.to_vec().expect("an answer encodes");
    let back = Message::from_vec(&bytes).expect("an encoded answer parses");
    assert_eq!(back.metadata.id, request.metadata.id);
    assert_eq!(back.queries, request.queries);
    if let Some(a) = &answer {
        assert_eq!(back.answers.len(), a.answers.len());
    }
});
