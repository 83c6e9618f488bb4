//! The mesh zone as the broker sends it to gateways (the bytes inside zone
//! chunks), and the zone a gateway builds from it to answer DNS.
//!
//! Properties: no panic; a zone that decodes encodes to one that decodes
//! the same; a zone that builds answers every name it holds (A, AAAA, SRV,
//! PTR) without panicking.
#![no_main]

use hickory_proto::rr::{DNSClass, Name, RecordType};
use libfuzzer_sys::fuzz_target;
use tether_proto::dns::{Zone, ZoneData, site_name};

fuzz_target!(|data: &[u8]| {
    let Ok(zone) = ZoneData::decode(data) else {
        return;
    };
    assert_eq!(ZoneData::decode(&zone.encode()).as_ref(), Ok(&zone));
    let Ok(built) = Zone::new(zone.clone(), &["127.0.0.1".parse().expect("an address")]) else {
        return;
    };
    for site in &zone.sites {
        let name = site_name(&site.site, &site.region, &zone.zone);
        let Ok(name) = Name::from_ascii(format!("{name}.")) else {
            continue;
        };
        for qtype in [
            RecordType::A,
            RecordType::AAAA,
            RecordType::SRV,
            RecordType::ANY,
        ] {
            let _ = built.answer(&name, qtype, DNSClass::IN);
        }
        for addr in &site.addresses {
            let reverse = Name::from(*addr);
            let _ = built.answer(&reverse, RecordType::PTR, DNSClass::IN);
        }
    }
});
