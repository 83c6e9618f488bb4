//! The values of CONNECT-IP's capsules (ADDRESS_ASSIGN, ADDRESS_REQUEST,
//! ROUTE_ADVERTISEMENT) and the request path (URI template variables).
//!
//! Properties: no panic; decode(encode(x)) == x for each capsule value; a
//! route advertisement's prefixes, advertised again for every protocol,
//! cover the same addresses and merge to a fixed point; a scope
//! that parses from a path parses again from the path it prints.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto::connect_ip::{
    AddressAssign, AddressRequest, RouteAdvertisement, Scope, percent_decode,
};

fuzz_target!(|data: &[u8]| {
    let Some((&which, value)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            if let Ok(v) = AddressAssign::decode(value) {
                let mut out = Vec::new();
                v.encode(&mut out)
                    .expect("a decoded ADDRESS_ASSIGN encodes");
                assert_eq!(AddressAssign::decode(&out).as_ref(), Ok(&v));
            }
        }
        1 => {
            if let Ok(v) = AddressRequest::decode(value) {
                let mut out = Vec::new();
                v.encode(&mut out)
                    .expect("a decoded ADDRESS_REQUEST encodes");
                assert_eq!(AddressRequest::decode(&out).as_ref(), Ok(&v));
            }
        }
        2 => {
            if let Ok(v) = RouteAdvertisement::decode(value) {
                let mut out = Vec::new();
                v.encode(&mut out)
                    .expect("a decoded ROUTE_ADVERTISEMENT encodes");
                assert_eq!(RouteAdvertisement::decode(&out).as_ref(), Ok(&v));
                // Ranges of different protocols may overlap; re-advertised
                // for every protocol, they merge, and merging again
                // changes nothing.
                let prefixes = v.prefixes();
                let merged = RouteAdvertisement::from_prefixes(prefixes.iter().copied());
                let covered = merged.prefixes();
                for p in &prefixes {
                    assert!(covered.iter().any(|c| c.contains(p)), "{p} lost");
                }
                assert_eq!(
                    RouteAdvertisement::from_prefixes(covered.iter().copied()),
                    merged
                );
            }
        }
        _ => {
            let Ok(path) = std::str::from_utf8(value) else {
                return;
            };
            let _ = percent_decode(path);
            if let Ok(scope) = Scope::from_path(path) {
                let printed = scope.to_path();
                assert_eq!(Scope::from_path(&printed).as_ref(), Ok(&scope), "{printed}");
            }
        }
    }
});
