//! Capsule framing (RFC 9297) and the CONNECT-IP capsules (RFC 9484) as
//! both ends read them from a request stream.
//!
//! Property: no panic; every capsule that parses encodes again, and the
//! encoding decodes to the same capsule (decode(encode(x)) == x).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto::capsule::{Capsule, CapsuleDecoder};

fuzz_target!(|data: &[u8]| {
    let mut decoder = CapsuleDecoder::default();
    decoder.push(data);
    while let Ok(Some(raw)) = decoder.next_capsule() {
        let Ok(capsule) = Capsule::parse(raw) else {
            break;
        };
        if matches!(capsule, Capsule::Unknown { .. }) {
            continue;
        }
        let mut bytes = Vec::new();
        capsule
            .encode(&mut bytes)
            .expect("a parsed capsule encodes");
        let mut again = CapsuleDecoder::default();
        again.push(&bytes);
        let raw = again
            .next_capsule()
            .expect("an encoded capsule decodes")
            .expect("an encoded capsule is complete");
        assert_eq!(Capsule::parse(raw).as_ref(), Ok(&capsule));
        assert_eq!(
            again.next_capsule(),
            Ok(None),
            "one capsule, nothing after it"
        );
    }
    let _ = decoder.finish();
});
