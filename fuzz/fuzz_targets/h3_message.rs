//! A request or response stream of HTTP/3: frames in order (HEADERS, DATA,
//! trailers), QPACK field sections (static table, Huffman), and the
//! validation of request and response heads (extended CONNECT).
//!
//! Properties: no panic; a head that validates as a request or response
//! encodes to a field section that decodes and validates to the same head;
//! any field section that decodes re-encodes to the same fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_fuzz::chunked;
use tether_proto::h3::qpack;
use tether_proto::h3::{MessageDecoder, MessageEvent, Request, Response};

const MAX_FIELD_SECTION: usize = 16 * 1024;

fn check_head(fields: Vec<qpack::Field>) {
    let lines: Vec<(&str, &[u8])> = fields
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_slice()))
        .collect();
    let again = qpack::decode(&qpack::encode(&lines), usize::MAX)
        .expect("an encoded field section decodes");
    assert_eq!(again, fields);
    if let Ok(req) = Request::from_fields(fields.clone()) {
        let fields = qpack::decode(&req.encode(), usize::MAX).expect("a request encodes");
        assert_eq!(Request::from_fields(fields).as_ref(), Ok(&req));
    }
    if let Ok(resp) = Response::from_fields(fields) {
        let fields = qpack::decode(&resp.encode(), usize::MAX).expect("a response encodes");
        assert_eq!(Response::from_fields(fields).as_ref(), Ok(&resp));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, _)) = data.split_first() else {
        return;
    };
    if which & 0x80 != 0 {
        // A bare field section, as in a HEADERS frame.
        if let Ok(fields) = qpack::decode(&data[1..], MAX_FIELD_SECTION) {
            check_head(fields);
        }
        return;
    }
    let (chunks, _) = chunked(data);
    let mut decoder = MessageDecoder::new(MAX_FIELD_SECTION);
    for chunk in chunks {
        decoder.push(chunk);
        loop {
            match decoder.next_event() {
                Ok(Some(MessageEvent::Head(fields))) => {
                    if Response::from_fields(fields.clone())
                        .is_ok_and(|r| (100..200).contains(&r.status))
                    {
                        decoder.expect_final_head();
                    }
                    check_head(fields);
                }
                Ok(Some(MessageEvent::Trailers(fields))) => check_head(fields),
                Ok(Some(MessageEvent::Data(_))) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = decoder.finish();
});
