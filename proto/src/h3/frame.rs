//! HTTP/3 frames (RFC 9114 section 7): `Type (i) | Length (i) | Payload`.
//!
//! [`FrameDecoder`] hands out DATA payload as it arrives, so a large body
//! never has to be buffered; other frames are buffered whole up to a limit;
//! frames of unknown type (including the reserved "grease" types) are
//! skipped without buffering, as the RFC requires.

use super::error::{H3_EXCESSIVE_LOAD, H3_FRAME_ERROR, H3_FRAME_UNEXPECTED, H3Error};
use crate::varint;

/// DATA.
pub const DATA: u64 = 0x00;
/// HEADERS.
pub const HEADERS: u64 = 0x01;
/// CANCEL_PUSH.
pub const CANCEL_PUSH: u64 = 0x03;
/// SETTINGS.
pub const SETTINGS: u64 = 0x04;
/// PUSH_PROMISE.
pub const PUSH_PROMISE: u64 = 0x05;
/// GOAWAY.
pub const GOAWAY: u64 = 0x07;
/// MAX_PUSH_ID.
pub const MAX_PUSH_ID: u64 = 0x0d;
/// HTTP/2 frame types that must not appear in HTTP/3.
pub const H2_ONLY: [u64; 4] = [0x02, 0x06, 0x08, 0x09];

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Part (or all) of a DATA frame's payload.
    Data(Vec<u8>),
    /// A HEADERS frame's encoded field section.
    Headers(Vec<u8>),
    /// A SETTINGS frame's payload.
    Settings(Vec<u8>),
    /// GOAWAY with its stream or push ID.
    GoAway(u64),
    /// CANCEL_PUSH with its push ID.
    CancelPush(u64),
    /// MAX_PUSH_ID with its push ID.
    MaxPushId(u64),
    /// PUSH_PROMISE (tether never allows pushes).
    PushPromise,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Header,
    Data { remaining: u64 },
    Skip { remaining: u64 },
}

/// Incremental frame decoder for one stream.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    state: State,
    max_frame: usize,
}

impl FrameDecoder {
    /// A decoder that buffers non-DATA frames of at most `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            state: State::Header,
            max_frame,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Whether the stream may end here (not inside a frame).
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Header) && self.start == self.buf.len()
    }

    fn pending(&self) -> &[u8] {
        self.buf.get(self.start..).unwrap_or_default()
    }

    /// The next frame or DATA chunk; `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, H3Error> {
        loop {
            match self.state {
                State::Data { remaining } => {
                    let available = self
                        .pending()
                        .len()
                        .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    if available == 0 {
                        return Ok(None);
                    }
                    let chunk = self.pending().get(..available).unwrap_or_default().to_vec();
                    self.start += available;
                    let remaining = remaining - available as u64;
                    self.state = if remaining == 0 {
                        State::Header
                    } else {
                        State::Data { remaining }
                    };
                    return Ok(Some(Frame::Data(chunk)));
                }
                State::Skip { remaining } => {
                    let available = self
                        .pending()
                        .len()
                        .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    self.start += available;
                    let remaining = remaining - available as u64;
                    if remaining > 0 {
                        self.state = State::Skip { remaining };
                        return Ok(None);
                    }
                    self.state = State::Header;
                }
                State::Header => {
                    let pending = self.pending();
                    let Ok((ty, ty_len)) = varint::decode(pending) else {
                        return Ok(None);
                    };
                    let Ok((len, len_len)) =
                        varint::decode(pending.get(ty_len..).unwrap_or_default())
                    else {
                        return Ok(None);
                    };
                    let header = ty_len + len_len;
                    if H2_ONLY.contains(&ty) {
                        return Err(H3Error::connection(
                            H3_FRAME_UNEXPECTED,
                            format!("HTTP/2 frame type {ty:#x}"),
                        ));
                    }
                    let known = matches!(
                        ty,
                        DATA | HEADERS
                            | CANCEL_PUSH
                            | SETTINGS
                            | PUSH_PROMISE
                            | GOAWAY
                            | MAX_PUSH_ID
                    );
                    if ty == DATA {
                        self.start += header;
                        if len > 0 {
                            self.state = State::Data { remaining: len };
                        }
                        continue;
                    }
                    if !known {
                        self.start += header;
                        self.state = State::Skip { remaining: len };
                        continue;
                    }
                    let len = match usize::try_from(len) {
                        Ok(l) if l <= self.max_frame => l,
                        _ => {
                            return Err(H3Error::connection(
                                H3_EXCESSIVE_LOAD,
                                format!(
                                    "frame type {ty:#x} of {len} bytes exceeds {}",
                                    self.max_frame
                                ),
                            ));
                        }
                    };
                    let Some(payload) = pending.get(header..header + len) else {
                        return Ok(None);
                    };
                    let payload = payload.to_vec();
                    self.start += header + len;
                    return Ok(Some(match ty {
                        HEADERS => Frame::Headers(payload),
                        SETTINGS => Frame::Settings(payload),
                        PUSH_PROMISE => Frame::PushPromise,
                        _ => {
                            let (id, used) = varint::decode(&payload).map_err(|_| {
                                H3Error::connection(
                                    H3_FRAME_ERROR,
                                    format!("frame {ty:#x} without its ID"),
                                )
                            })?;
                            if used != payload.len() {
                                return Err(H3Error::connection(
                                    H3_FRAME_ERROR,
                                    format!("frame {ty:#x} has trailing bytes"),
                                ));
                            }
                            match ty {
                                GOAWAY => Frame::GoAway(id),
                                CANCEL_PUSH => Frame::CancelPush(id),
                                _ => Frame::MaxPushId(id),
                            }
                        }
                    }));
                }
            }
        }
    }
}

/// Appends a whole frame.
pub fn encode(frame_type: u64, payload: &[u8], out: &mut Vec<u8>) {
    let _ = varint::encode(frame_type, out);
    let _ = varint::encode(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// Appends the header of a DATA frame of `len` bytes (the payload follows
/// separately, without copying).
pub fn encode_data_header(len: usize, out: &mut Vec<u8>) {
    let _ = varint::encode(DATA, out);
    let _ = varint::encode(len as u64, out);
}

/// Appends a GOAWAY frame.
pub fn encode_goaway(id: u64, out: &mut Vec<u8>) {
    let mut payload = Vec::new();
    let _ = varint::encode(id, &mut payload);
    encode(GOAWAY, &payload, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn data_is_streamed_and_unknown_frames_skipped() {
        let mut wire = Vec::new();
        encode(0x21, &[9; 1000], &mut wire); // a grease frame
        encode(HEADERS, b"hdr", &mut wire);
        encode_data_header(5, &mut wire);
        wire.extend_from_slice(b"hello");
        encode_goaway(8, &mut wire);
        let mut dec = FrameDecoder::new(64);
        let mut got = Vec::new();
        for byte in &wire {
            dec.push(std::slice::from_ref(byte));
            while let Some(f) = dec.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert!(dec.at_boundary());
        let data: Vec<u8> = got
            .iter()
            .filter_map(|f| {
                if let Frame::Data(d) = f {
                    Some(d.clone())
                } else {
                    None
                }
            })
            .flatten()
            .collect();
        assert_eq!(data, b"hello");
        assert_eq!(got.first(), Some(&Frame::Headers(b"hdr".to_vec())));
        assert_eq!(got.last(), Some(&Frame::GoAway(8)));
    }

    #[test]
    fn limits_and_forbidden_types() {
        let mut dec = FrameDecoder::new(16);
        let mut wire = Vec::new();
        encode(HEADERS, &[0; 17], &mut wire);
        dec.push(&wire);
        assert_eq!(dec.next_frame().unwrap_err().code, H3_EXCESSIVE_LOAD);
        let mut dec = FrameDecoder::new(16);
        dec.push(&[0x06, 0x00]);
        assert_eq!(dec.next_frame().unwrap_err().code, H3_FRAME_UNEXPECTED);
        let mut dec = FrameDecoder::new(16);
        dec.push(&[GOAWAY as u8, 2, 1, 1]);
        assert_eq!(dec.next_frame().unwrap_err().code, H3_FRAME_ERROR);
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256), chunk in 1usize..32) {
            let mut dec = FrameDecoder::new(64);
            for piece in bytes.chunks(chunk) {
                dec.push(piece);
                while let Ok(Some(_)) = dec.next_frame() {}
            }
        }
    }
}
