//! What the agent watches for in the HTTP/2 frames a broker sends.
//!
//! The HTTP/2 library of the shell does not tell a client that the server
//! sent GOAWAY: it only stops new requests. The agent needs to know at
//! once (the broker is shutting down: move the tunnel), so the shell shows
//! every byte it reads from the TLS connection to a [`FrameWatch`] as
//! well, which follows the frame boundaries (RFC 9113 section 4.1: a
//! 9-byte header with a 24-bit length) and notes a GOAWAY with `NO_ERROR`
//! (section 6.8). It also counts the bytes read, which the liveness check
//! uses as HTTP/3 uses the datagrams received.
//!
//! The watch keeps at most a frame header and the first 8 bytes of a
//! GOAWAY payload: the rest of every frame is skipped by count, whatever
//! its length.

/// Length of an HTTP/2 frame header.
pub const FRAME_HEADER_LEN: usize = 9;
/// Frame type of GOAWAY.
pub const GOAWAY: u8 = 0x7;
/// Error code `NO_ERROR`.
pub const NO_ERROR: u32 = 0x0;

/// Follows the server-to-client byte stream of an HTTP/2 connection
/// (which begins with the server's SETTINGS frame, RFC 9113 section 3.4).
#[derive(Debug, Default, Clone)]
pub struct FrameWatch {
    /// Bytes of the current frame header, or of a GOAWAY's fixed payload.
    head: [u8; FRAME_HEADER_LEN],
    /// How many of `head` are filled.
    filled: usize,
    /// Inside a frame's payload: bytes of it still to skip.
    skip: usize,
    /// Reading the first 8 payload bytes of a GOAWAY.
    in_goaway: bool,
    bytes: u64,
    frames: u64,
    going_away: bool,
}

impl FrameWatch {
    /// A watch at the start of the stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Follows `data`, the next bytes read from the connection.
    pub fn push(&mut self, mut data: &[u8]) {
        self.bytes = self.bytes.saturating_add(data.len() as u64);
        while !data.is_empty() {
            if self.skip > 0 && !self.in_goaway {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = data.get(n..).unwrap_or_default();
                continue;
            }
            let want = if self.in_goaway { 8 } else { FRAME_HEADER_LEN };
            let n = (want - self.filled).min(data.len());
            if let (Some(dst), Some(src)) = (
                self.head.get_mut(self.filled..self.filled + n),
                data.get(..n),
            ) {
                dst.copy_from_slice(src);
            }
            self.filled += n;
            data = data.get(n..).unwrap_or_default();
            if self.filled < want {
                continue;
            }
            self.filled = 0;
            if self.in_goaway {
                // Last-Stream-ID (4 bytes), then the error code.
                let code =
                    u32::from_be_bytes([self.head[4], self.head[5], self.head[6], self.head[7]]);
                if code == NO_ERROR {
                    self.going_away = true;
                }
                self.in_goaway = false;
                self.skip -= 8;
                continue;
            }
            let len = usize::from(self.head[0]) << 16
                | usize::from(self.head[1]) << 8
                | usize::from(self.head[2]);
            self.frames = self.frames.saturating_add(1);
            self.skip = len;
            // A GOAWAY shorter than its fixed part is the library's error
            // to report; it is skipped here.
            self.in_goaway = self.head[3] == GOAWAY && len >= 8;
        }
    }

    /// Bytes read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Frames begun so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Whether the server sent GOAWAY with `NO_ERROR`: it is shutting down
    /// and serves what is open, but the client should go elsewhere. (A
    /// GOAWAY with an error precedes the connection's end, which the
    /// client sees as such.)
    pub fn going_away(&self) -> bool {
        self.going_away
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut out = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            0,
            0,
            0,
            0,
            0,
        ];
        out.extend_from_slice(payload);
        out
    }

    fn goaway(last: u32, code: u32, debug: &[u8]) -> Vec<u8> {
        let mut p = last.to_be_bytes().to_vec();
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(debug);
        frame(GOAWAY, &p)
    }

    #[test]
    fn a_graceful_goaway_is_seen_in_any_split() {
        let mut stream = frame(0x4, &[0; 12]); // SETTINGS
        stream.extend(frame(0x0, &vec![7; 70_000])); // DATA, larger than a read
        stream.extend(frame(0x6, &[0; 8])); // PING
        stream.extend(goaway(0x7fff_ffff, NO_ERROR, b"bye"));
        stream.extend(frame(0x6, &[0; 8]));
        for chunk in [1, 2, 5, 8, 9, 10, 4096, stream.len()] {
            let mut w = FrameWatch::new();
            let mut seen_at = None;
            for (i, c) in stream.chunks(chunk).enumerate() {
                w.push(c);
                if w.going_away() && seen_at.is_none() {
                    seen_at = Some(i);
                }
            }
            assert!(w.going_away(), "chunks of {chunk}");
            assert_eq!(w.frames(), 5, "chunks of {chunk}");
            assert_eq!(w.bytes(), stream.len() as u64);
        }
    }

    #[test]
    fn data_that_looks_like_goaway_is_not_one() {
        // A GOAWAY frame carried inside a DATA frame's payload.
        let inner = goaway(1, NO_ERROR, b"");
        let mut w = FrameWatch::new();
        w.push(&frame(0x0, &inner));
        assert!(!w.going_away());
        assert_eq!(w.frames(), 1);
    }

    #[test]
    fn an_error_goaway_or_a_short_one_is_not_going_away() {
        let mut w = FrameWatch::new();
        w.push(&goaway(0, 0x1, b"protocol error"));
        w.push(&frame(GOAWAY, &[0; 4]));
        assert!(!w.going_away());
        assert_eq!(w.frames(), 2);
        // The stream stays in step afterwards.
        w.push(&goaway(3, NO_ERROR, b""));
        assert!(w.going_away());
        assert_eq!(w.frames(), 3);
    }
}
