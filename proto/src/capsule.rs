//! The Capsule Protocol (RFC 9297, section 3): framing on a request stream.
//!
//! A capsule is `Type (i) | Length (i) | Value (..)`. [`CapsuleDecoder`] takes
//! the stream's bytes in whatever pieces they arrive and yields whole capsules;
//! a length over the configured maximum is an error as soon as the header is
//! read, so a peer cannot make the decoder buffer more than that. After any
//! error the decoder stays failed: RFC 9297 section 3.3 says the stream must be
//! aborted, and nothing after a framing error can be trusted.
//!
//! [`Capsule`] is the typed view of the capsules tether understands: the
//! DATAGRAM capsule (RFC 9297) and the three CONNECT-IP capsules (RFC 9484).
//! Unknown capsule types are reported, not rejected: RFC 9297 requires
//! receivers to skip them.

use thiserror::Error;

use crate::connect_ip::{AddressAssign, AddressRequest, ConnectIpError, RouteAdvertisement};
use crate::varint;

/// Capsule type of the DATAGRAM capsule (RFC 9297, section 3.5).
pub const DATAGRAM: u64 = 0x00;
/// Capsule type of ADDRESS_ASSIGN (RFC 9484, section 4.7.1).
pub const ADDRESS_ASSIGN: u64 = 0x01;
/// Capsule type of ADDRESS_REQUEST (RFC 9484, section 4.7.2).
pub const ADDRESS_REQUEST: u64 = 0x02;
/// Capsule type of ROUTE_ADVERTISEMENT (RFC 9484, section 4.7.3).
pub const ROUTE_ADVERTISEMENT: u64 = 0x03;

/// Default largest capsule value the decoder accepts: room for a DATAGRAM
/// capsule carrying a 64 KiB IP packet, and for thousands of routes.
pub const DEFAULT_MAX_CAPSULE_LEN: usize = 65_535 + 64;

/// Why a capsule stream could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CapsuleError {
    /// A capsule announced a value longer than the decoder accepts.
    #[error(
        "capsule of type {capsule_type:#x} announces {len} bytes, more than the limit of {max}"
    )]
    TooLarge {
        /// The capsule's type.
        capsule_type: u64,
        /// The length it announced.
        len: u64,
        /// The decoder's limit.
        max: usize,
    },
    /// The stream ended in the middle of a capsule.
    #[error("stream ended inside a capsule ({buffered} bytes of an incomplete capsule)")]
    Truncated {
        /// How many bytes of the unfinished capsule had arrived.
        buffered: usize,
    },
    /// An earlier error already failed this stream.
    #[error("the capsule stream already failed")]
    Failed,
    /// A CONNECT-IP capsule's value broke RFC 9484's rules.
    #[error("malformed capsule: {0}")]
    ConnectIp(#[from] ConnectIpError),
    /// A value is too large for a variable-length integer.
    #[error(transparent)]
    VarInt(#[from] varint::VarIntError),
}

/// One framed capsule whose value has not been interpreted yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawCapsule {
    /// The capsule type.
    pub capsule_type: u64,
    /// The capsule value.
    pub value: Vec<u8>,
}

/// Incremental decoder for a stream of capsules.
///
/// Feed stream bytes with [`push`](Self::push), take capsules with
/// [`next_capsule`](Self::next_capsule) until it returns `Ok(None)`, and call
/// [`finish`](Self::finish) when the stream ends to detect a truncated capsule.
#[derive(Debug)]
pub struct CapsuleDecoder {
    buf: Vec<u8>,
    start: usize,
    max_len: usize,
    failed: bool,
}

impl Default for CapsuleDecoder {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_CAPSULE_LEN)
    }
}

impl CapsuleDecoder {
    /// A decoder that rejects capsule values longer than `max_len` bytes.
    pub fn new(max_len: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            max_len,
            failed: false,
        }
    }

    /// Appends bytes received on the stream.
    pub fn push(&mut self, data: &[u8]) {
        if self.failed {
            return;
        }
        // Reclaim consumed space before growing, so the buffer stays bounded by
        // one capsule plus one read.
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet returned as capsules.
    pub fn buffered(&self) -> usize {
        self.buf.len().saturating_sub(self.start)
    }

    /// The next complete capsule, `Ok(None)` if more bytes are needed.
    pub fn next_capsule(&mut self) -> Result<Option<RawCapsule>, CapsuleError> {
        if self.failed {
            return Err(CapsuleError::Failed);
        }
        let pending = self.buf.get(self.start..).unwrap_or_default();
        let (capsule_type, type_len) = match varint::decode(pending) {
            Ok(v) => v,
            Err(varint::VarIntError::Incomplete { .. }) => return Ok(None),
            Err(e) => return Err(self.fail(e.into())),
        };
        let (len, len_len) = match varint::decode(pending.get(type_len..).unwrap_or_default()) {
            Ok(v) => v,
            Err(varint::VarIntError::Incomplete { .. }) => return Ok(None),
            Err(e) => return Err(self.fail(e.into())),
        };
        let value_len = match usize::try_from(len) {
            Ok(l) if l <= self.max_len => l,
            _ => {
                return Err(self.fail(CapsuleError::TooLarge {
                    capsule_type,
                    len,
                    max: self.max_len,
                }));
            }
        };
        let header = type_len + len_len;
        let Some(value) = pending.get(header..header + value_len) else {
            return Ok(None);
        };
        let capsule = RawCapsule {
            capsule_type,
            value: value.to_vec(),
        };
        self.start += header + value_len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(capsule))
    }

    /// Declares the end of the stream: an error if a capsule was cut off.
    pub fn finish(&self) -> Result<(), CapsuleError> {
        match self.buffered() {
            0 => Ok(()),
            buffered => Err(CapsuleError::Truncated { buffered }),
        }
    }

    fn fail(&mut self, error: CapsuleError) -> CapsuleError {
        self.failed = true;
        self.buf = Vec::new();
        self.start = 0;
        error
    }
}

/// Appends one capsule with the given type and value to `out`.
pub fn encode_raw(capsule_type: u64, value: &[u8], out: &mut Vec<u8>) -> Result<(), CapsuleError> {
    varint::encode(capsule_type, out)?;
    varint::encode(value.len() as u64, out)?;
    out.extend_from_slice(value);
    Ok(())
}

/// A capsule tether understands, decoded and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capsule {
    /// DATAGRAM: an HTTP Datagram payload carried on the stream (used when the
    /// transport has no unreliable datagrams, e.g. HTTP/2).
    Datagram(Vec<u8>),
    /// ADDRESS_ASSIGN: the addresses the sender assigns to the receiver.
    AddressAssign(AddressAssign),
    /// ADDRESS_REQUEST: the addresses the sender asks to be assigned.
    AddressRequest(AddressRequest),
    /// ROUTE_ADVERTISEMENT: the address ranges the sender can route.
    RouteAdvertisement(RouteAdvertisement),
    /// A capsule type tether does not know; RFC 9297 says to skip it.
    Unknown {
        /// The capsule type.
        capsule_type: u64,
        /// Length of the skipped value.
        len: usize,
    },
}

impl Capsule {
    /// Interprets a framed capsule, validating CONNECT-IP values.
    pub fn parse(raw: RawCapsule) -> Result<Self, CapsuleError> {
        Ok(match raw.capsule_type {
            DATAGRAM => Capsule::Datagram(raw.value),
            ADDRESS_ASSIGN => Capsule::AddressAssign(AddressAssign::decode(&raw.value)?),
            ADDRESS_REQUEST => Capsule::AddressRequest(AddressRequest::decode(&raw.value)?),
            ROUTE_ADVERTISEMENT => {
                Capsule::RouteAdvertisement(RouteAdvertisement::decode(&raw.value)?)
            }
            capsule_type => Capsule::Unknown {
                capsule_type,
                len: raw.value.len(),
            },
        })
    }

    /// Appends the framed capsule to `out`.
    ///
    /// `Unknown` capsules carry no value and cannot be encoded; they are
    /// skipped.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), CapsuleError> {
        let mut value = Vec::new();
        let capsule_type = match self {
            Capsule::Datagram(payload) => return encode_raw(DATAGRAM, payload, out),
            Capsule::AddressAssign(c) => {
                c.encode(&mut value)?;
                ADDRESS_ASSIGN
            }
            Capsule::AddressRequest(c) => {
                c.encode(&mut value)?;
                ADDRESS_REQUEST
            }
            Capsule::RouteAdvertisement(c) => {
                c.encode(&mut value)?;
                ROUTE_ADVERTISEMENT
            }
            Capsule::Unknown { .. } => return Ok(()),
        };
        encode_raw(capsule_type, &value, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_across_arbitrary_splits() {
        let mut wire = Vec::new();
        encode_raw(DATAGRAM, b"hello", &mut wire).unwrap();
        encode_raw(0x2a, &[], &mut wire).unwrap();
        encode_raw(0x1234_5678, &[7; 300], &mut wire).unwrap();
        for split in 0..wire.len() {
            let mut dec = CapsuleDecoder::default();
            let mut got = Vec::new();
            for chunk in [&wire[..split], &wire[split..]] {
                dec.push(chunk);
                while let Some(c) = dec.next_capsule().unwrap() {
                    got.push(c);
                }
            }
            dec.finish().unwrap();
            assert_eq!(got.len(), 3, "split at {split}");
            assert_eq!(got[0].value, b"hello");
            assert_eq!(got[1].capsule_type, 0x2a);
            assert_eq!(got[2].capsule_type, 0x1234_5678);
            assert_eq!(got[2].value.len(), 300);
        }
    }

    #[test]
    fn oversize_length_fails_before_buffering_the_value() {
        let mut dec = CapsuleDecoder::new(1024);
        let mut wire = Vec::new();
        varint::encode(DATAGRAM, &mut wire).unwrap();
        varint::encode(1 << 40, &mut wire).unwrap();
        dec.push(&wire);
        assert!(matches!(
            dec.next_capsule(),
            Err(CapsuleError::TooLarge { len, max: 1024, .. }) if len == 1 << 40
        ));
        // The stream stays failed: later bytes are not interpreted.
        dec.push(&[0, 0]);
        assert_eq!(dec.next_capsule(), Err(CapsuleError::Failed));
    }

    #[test]
    fn truncated_stream_is_reported() {
        let mut dec = CapsuleDecoder::default();
        let mut wire = Vec::new();
        encode_raw(DATAGRAM, b"abcdef", &mut wire).unwrap();
        dec.push(&wire[..4]);
        assert_eq!(dec.next_capsule(), Ok(None));
        assert_eq!(dec.finish(), Err(CapsuleError::Truncated { buffered: 4 }));
    }

    #[test]
    fn unknown_types_are_skipped_not_rejected() {
        let raw = RawCapsule {
            capsule_type: 0x17,
            value: vec![1, 2, 3],
        };
        assert_eq!(
            Capsule::parse(raw),
            Ok(Capsule::Unknown {
                capsule_type: 0x17,
                len: 3
            })
        );
    }

    proptest! {
        #[test]
        fn framing_round_trips(
            capsules in proptest::collection::vec(
                (0..=varint::MAX, proptest::collection::vec(any::<u8>(), 0..200)), 0..8),
            chunk in 1usize..64,
        ) {
            let mut wire = Vec::new();
            for (ty, value) in &capsules {
                encode_raw(*ty, value, &mut wire).unwrap();
            }
            let mut dec = CapsuleDecoder::default();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                dec.push(piece);
                while let Some(c) = dec.next_capsule().unwrap() {
                    got.push((c.capsule_type, c.value));
                }
            }
            prop_assert!(dec.finish().is_ok());
            prop_assert_eq!(got, capsules);
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            chunk in 1usize..64,
        ) {
            let mut dec = CapsuleDecoder::new(256);
            for piece in bytes.chunks(chunk) {
                dec.push(piece);
                while let Ok(Some(raw)) = dec.next_capsule() {
                    prop_assert!(raw.value.len() <= 256);
                    let _ = Capsule::parse(raw);
                }
            }
            let _ = dec.finish();
        }
    }
}
