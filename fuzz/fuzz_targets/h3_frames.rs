//! HTTP/3 frames (RFC 9114 section 7) read incrementally from a stream, and
//! the SETTINGS frame's payload.
//!
//! Properties: no panic; any chunking yields the frames (and the error)
//! of the stream decoded at once, with DATA payloads concatenated; a
//! SETTINGS payload that decodes encodes to one that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_fuzz::chunked;
use tether_proto::h3::Settings;
use tether_proto::h3::frame::{Frame, FrameDecoder};

/// The frames of a stream, DATA merged (its payload may arrive in parts),
/// and whether the stream broke.
fn frames(chunks: &[&[u8]]) -> (Vec<Frame>, bool) {
    let mut decoder = FrameDecoder::new(4096);
    let mut out: Vec<Frame> = Vec::new();
    for chunk in chunks {
        decoder.push(chunk);
        loop {
            match decoder.next_frame() {
                Ok(Some(Frame::Data(d))) => match out.last_mut() {
                    Some(Frame::Data(prev)) => prev.extend_from_slice(&d),
                    _ => out.push(Frame::Data(d)),
                },
                Ok(Some(f)) => out.push(f),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

fuzz_target!(|data: &[u8]| {
    let (chunks, whole) = chunked(data);
    let (mut parts, broke) = frames(&chunks);
    let (mut at_once, broke_at_once) = frames(&[whole]);
    // Empty DATA payloads carry nothing: compare without them.
    parts.retain(|f| !matches!(f, Frame::Data(d) if d.is_empty()));
    at_once.retain(|f| !matches!(f, Frame::Data(d) if d.is_empty()));
    assert_eq!(
        broke, broke_at_once,
        "chunking changed whether the stream breaks"
    );
    if !broke {
        assert_eq!(parts, at_once, "chunking changed the frames");
    }
    for frame in at_once {
        if let Frame::Settings(payload) = frame
            && let Ok(settings) = Settings::decode(&payload)
        {
            assert_eq!(Settings::decode(&settings.encode()).as_ref(), Ok(&settings));
        }
    }
    if let Ok(settings) = Settings::decode(whole) {
        assert_eq!(Settings::decode(&settings.encode()).as_ref(), Ok(&settings));
    }
});
