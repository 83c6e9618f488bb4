//! QUIC variable-length integers (RFC 9000, section 16).
//!
//! The two most significant bits of the first byte give the length of the
//! encoding (1, 2, 4 or 8 bytes); the remaining bits hold the value in network
//! byte order. Capsules (RFC 9297), HTTP/3 frames and HTTP Datagrams all use
//! this encoding.
//!
//! Decoding accepts non-minimal encodings, as RFC 9000 requires of receivers
//! unless a protocol says otherwise; encoding is always minimal.

use thiserror::Error;

/// The largest value a QUIC variable-length integer can carry: 2^62 - 1.
pub const MAX: u64 = (1 << 62) - 1;

/// Why a variable-length integer could not be decoded or encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum VarIntError {
    /// The input ends before the integer does; more bytes are needed.
    #[error("input ends inside a variable-length integer ({needed} bytes needed)")]
    Incomplete {
        /// Total length of the encoding that was started.
        needed: usize,
    },
    /// The value does not fit in 62 bits.
    #[error("value {0} exceeds the variable-length integer maximum 2^62-1")]
    TooLarge(u64),
}

/// Number of bytes the minimal encoding of `value` takes, or `None` when it
/// exceeds [`MAX`].
pub const fn encoded_len(value: u64) -> Option<usize> {
    if value < (1 << 6) {
        Some(1)
    } else if value < (1 << 14) {
        Some(2)
    } else if value < (1 << 30) {
        Some(4)
    } else if value <= MAX {
        Some(8)
    } else {
        None
    }
}

/// Decodes one integer from the start of `input`.
///
/// Returns the value and the number of bytes it occupied.
pub fn decode(input: &[u8]) -> Result<(u64, usize), VarIntError> {
    let Some(&first) = input.first() else {
        return Err(VarIntError::Incomplete { needed: 1 });
    };
    let len = 1usize << (first >> 6);
    let Some(bytes) = input.get(..len) else {
        return Err(VarIntError::Incomplete { needed: len });
    };
    let mut value = u64::from(first & 0x3f);
    for &b in bytes.iter().skip(1) {
        value = (value << 8) | u64::from(b);
    }
    Ok((value, len))
}

/// Appends the minimal encoding of `value` to `out`.
pub fn encode(value: u64, out: &mut Vec<u8>) -> Result<(), VarIntError> {
    match encoded_len(value) {
        Some(1) => out.push(value as u8),
        Some(2) => out.extend_from_slice(&((value as u16) | 0x4000).to_be_bytes()),
        Some(4) => out.extend_from_slice(&((value as u32) | 0x8000_0000).to_be_bytes()),
        Some(_) => out.extend_from_slice(&(value | 0xc000_0000_0000_0000).to_be_bytes()),
        None => return Err(VarIntError::TooLarge(value)),
    }
    Ok(())
}

/// A cursor over a byte slice that reads the fields wire formats are made of.
///
/// Every read is bounds-checked and fails with [`Truncated`] instead of
/// panicking, so parsers built on it are safe on attacker-controlled input.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

/// The input ended before a field did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("input ends inside a field")]
pub struct Truncated;

impl<'a> Reader<'a> {
    /// Starts reading at the beginning of `input`.
    pub fn new(input: &'a [u8]) -> Self {
        Self { rest: input }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Whether every byte has been read.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Reads a variable-length integer.
    pub fn varint(&mut self) -> Result<u64, Truncated> {
        let (value, len) = decode(self.rest).map_err(|_| Truncated)?;
        self.rest = self.rest.get(len..).ok_or(Truncated)?;
        Ok(value)
    }

    /// Reads one byte.
    pub fn u8(&mut self) -> Result<u8, Truncated> {
        let (&b, rest) = self.rest.split_first().ok_or(Truncated)?;
        self.rest = rest;
        Ok(b)
    }

    /// Reads exactly `N` bytes.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], Truncated> {
        let (head, rest) = self.rest.split_first_chunk::<N>().ok_or(Truncated)?;
        self.rest = rest;
        Ok(*head)
    }

    /// Reads `len` bytes.
    pub fn bytes(&mut self, len: usize) -> Result<&'a [u8], Truncated> {
        if len > self.rest.len() {
            return Err(Truncated);
        }
        let (head, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(head)
    }

    /// Reads everything that is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc9000_appendix_a1_examples() {
        // The sample encodings from RFC 9000, appendix A.1.
        let cases: [(&[u8], u64); 5] = [
            (
                &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c],
                151_288_809_941_952_652,
            ),
            (&[0x9d, 0x7f, 0x3e, 0x7d], 494_878_333),
            (&[0x7b, 0xbd], 15_293),
            (&[0x25], 37),
            // A non-minimal two-byte encoding of 37 must decode too.
            (&[0x40, 0x25], 37),
        ];
        for (wire, value) in cases {
            assert_eq!(decode(wire), Ok((value, wire.len())));
        }
        let mut out = Vec::new();
        encode(15_293, &mut out).unwrap();
        assert_eq!(out, [0x7b, 0xbd]);
    }

    #[test]
    fn boundaries_use_the_next_length() {
        for (value, len) in [
            (63, 1),
            (64, 2),
            (16_383, 2),
            (16_384, 4),
            ((1 << 30) - 1, 4),
            (1 << 30, 8),
            (MAX, 8),
        ] {
            let mut out = Vec::new();
            encode(value, &mut out).unwrap();
            assert_eq!(out.len(), len, "value {value}");
            assert_eq!(decode(&out), Ok((value, len)));
        }
        assert_eq!(
            encode(MAX + 1, &mut Vec::new()),
            Err(VarIntError::TooLarge(MAX + 1))
        );
    }

    #[test]
    fn truncated_input_asks_for_more() {
        assert_eq!(decode(&[]), Err(VarIntError::Incomplete { needed: 1 }));
        assert_eq!(
            decode(&[0xc0, 0, 0]),
            Err(VarIntError::Incomplete { needed: 8 })
        );
    }

    proptest! {
        #[test]
        fn round_trips(value in 0..=MAX) {
            let mut out = Vec::new();
            encode(value, &mut out).unwrap();
            prop_assert_eq!(Some(out.len()), encoded_len(value));
            prop_assert_eq!(decode(&out), Ok((value, out.len())));
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
            if let Ok((value, len)) = decode(&bytes) {
                prop_assert!(value <= MAX);
                prop_assert!(len <= bytes.len());
            }
        }
    }
}
