//! The capsule stream of a CONNECT-IP tunnel as it arrives over HTTP/2 (or
//! in HTTP/3 DATA frames): bytes cut at arbitrary points, decoded
//! incrementally, and handed to the broker's half of the session and to
//! the site's.
//!
//! Properties: no panic; the capsules decoded from any chunking are the
//! ones decoded from the whole stream at once; the broker session only
//! ever grants sources it assigned.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_fuzz::{chunked, parsed};
use tether_proto::agent::ClientSession;
use tether_proto::capsule::{Capsule, CapsuleDecoder};
use tether_proto::tunnel::{BrokerAction, BrokerSession};

fn decode_all(chunks: &[&[u8]]) -> (Vec<Capsule>, bool) {
    let mut decoder = CapsuleDecoder::default();
    let mut out = Vec::new();
    for chunk in chunks {
        decoder.push(chunk);
        loop {
            match decoder.next_capsule() {
                Ok(Some(raw)) => match Capsule::parse(raw) {
                    Ok(c) => out.push(c),
                    Err(_) => return (out, false),
                },
                Ok(None) => break,
                Err(_) => return (out, false),
            }
        }
    }
    let complete = decoder.finish().is_ok();
    (out, complete)
}

fuzz_target!(|data: &[u8]| {
    let (chunks, whole) = chunked(data);
    let (capsules, complete) = decode_all(&chunks);
    let (at_once, complete_at_once) = decode_all(&[whole]);
    assert_eq!(capsules, at_once, "chunking changed the capsules");
    assert_eq!(complete, complete_at_once);

    let own = [parsed("100.64.0.2/32"), parsed("fd00::2/128")];
    let lans = [parsed("100.70.3.0/24")];
    let mut broker = BrokerSession::new(&own, &lans);
    let mut client = ClientSession::default();
    let mut granted: Vec<ipnet::IpNet> = Vec::new();
    for capsule in capsules {
        let _ = client.on_capsule(capsule.clone());
        let mut actions = broker.on_capsule(capsule);
        while let Some(action) = actions.pop() {
            if let BrokerAction::AllocateLan { request_id, lan } = action {
                // Grant every other request, from a pool of its own.
                let grant = (request_id % 2 == 0).then(|| {
                    let len = lan.prefix_len();
                    match lan {
                        ipnet::IpNet::V4(_) => parsed(&format!("100.71.0.0/{}", len.max(16))),
                        ipnet::IpNet::V6(_) => parsed(&format!("fd71::/{}", len.max(16))),
                    }
                });
                granted.extend(grant);
                actions.extend(broker.on_allocated(request_id, grant));
            }
        }
        for source in broker.source_prefixes() {
            let known =
                own.contains(&source) || lans.contains(&source) || granted.contains(&source);
            assert!(
                known,
                "the session grants {source}, which the broker never assigned"
            );
        }
    }
});
