//! QPACK (RFC 9204) with the static table only.
//!
//! tether advertises a dynamic table capacity of 0, so peers may only use
//! static references and literals, and no encoder or decoder streams are
//! needed. The encoder references the static table where it can and writes
//! other strings as plain literals; the decoder accepts every representation
//! that does not touch the dynamic table, including Huffman-coded strings,
//! and rejects the rest with `QPACK_DECOMPRESSION_FAILED`.

use super::error::{H3_EXCESSIVE_LOAD, H3Error, QPACK_DECOMPRESSION_FAILED};

/// A field line: lowercase name and value.
pub type Field = (String, Vec<u8>);

/// The static table (RFC 9204, appendix A), index 0 to 98.
pub const STATIC_TABLE: [(&str, &str); 99] = [
    (":authority", ""),
    (":path", "/"),
    ("age", "0"),
    ("content-disposition", ""),
    ("content-length", "0"),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("referer", ""),
    ("set-cookie", ""),
    (":method", "CONNECT"),
    (":method", "DELETE"),
    (":method", "GET"),
    (":method", "HEAD"),
    (":method", "OPTIONS"),
    (":method", "POST"),
    (":method", "PUT"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "103"),
    (":status", "200"),
    (":status", "304"),
    (":status", "404"),
    (":status", "503"),
    ("accept", "*/*"),
    ("accept", "application/dns-message"),
    ("accept-encoding", "gzip, deflate, br"),
    ("accept-ranges", "bytes"),
    ("access-control-allow-headers", "cache-control"),
    ("access-control-allow-headers", "content-type"),
    ("access-control-allow-origin", "*"),
    ("cache-control", "max-age=0"),
    ("cache-control", "max-age=2592000"),
    ("cache-control", "max-age=604800"),
    ("cache-control", "no-cache"),
    ("cache-control", "no-store"),
    ("cache-control", "public, max-age=31536000"),
    ("content-encoding", "br"),
    ("content-encoding", "gzip"),
    ("content-type", "application/dns-message"),
    ("content-type", "application/javascript"),
    ("content-type", "application/json"),
    ("content-type", "application/x-www-form-urlencoded"),
    ("content-type", "image/gif"),
    ("content-type", "image/jpeg"),
    ("content-type", "image/png"),
    ("content-type", "text/css"),
    ("content-type", "text/html; charset=utf-8"),
    ("content-type", "text/plain"),
    ("content-type", "text/plain;charset=utf-8"),
    ("range", "bytes=0-"),
    ("strict-transport-security", "max-age=31536000"),
    (
        "strict-transport-security",
        "max-age=31536000; includesubdomains",
    ),
    (
        "strict-transport-security",
        "max-age=31536000; includesubdomains; preload",
    ),
    ("vary", "accept-encoding"),
    ("vary", "origin"),
    ("x-content-type-options", "nosniff"),
    ("x-xss-protection", "1; mode=block"),
    (":status", "100"),
    (":status", "204"),
    (":status", "206"),
    (":status", "302"),
    (":status", "400"),
    (":status", "403"),
    (":status", "421"),
    (":status", "425"),
    (":status", "500"),
    ("accept-language", ""),
    ("access-control-allow-credentials", "FALSE"),
    ("access-control-allow-credentials", "TRUE"),
    ("access-control-allow-headers", "*"),
    ("access-control-allow-methods", "get"),
    ("access-control-allow-methods", "get, post, options"),
    ("access-control-allow-methods", "options"),
    ("access-control-expose-headers", "content-length"),
    ("access-control-request-headers", "content-type"),
    ("access-control-request-method", "get"),
    ("access-control-request-method", "post"),
    ("alt-svc", "clear"),
    ("authorization", ""),
    (
        "content-security-policy",
        "script-src 'none'; object-src 'none'; base-uri 'none'",
    ),
    ("early-data", "1"),
    ("expect-ct", ""),
    ("forwarded", ""),
    ("if-range", ""),
    ("origin", ""),
    ("purpose", "prefetch"),
    ("server", ""),
    ("timing-allow-origin", "*"),
    ("upgrade-insecure-requests", "1"),
    ("user-agent", ""),
    ("x-forwarded-for", ""),
    ("x-frame-options", "deny"),
    ("x-frame-options", "sameorigin"),
];

/// Appends an integer with an `n`-bit prefix (RFC 7541 section 5.1);
/// `flags` holds the bits above the prefix.
fn encode_int(value: u64, n: u8, flags: u8, out: &mut Vec<u8>) {
    let max = (1u64 << n) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

fn fail(reason: &str) -> H3Error {
    H3Error::connection(QPACK_DECOMPRESSION_FAILED, reason.to_string())
}

/// Reads an integer with an `n`-bit prefix; returns the value and bytes used.
fn decode_int(input: &[u8], n: u8) -> Result<(u64, usize), H3Error> {
    let first = *input.first().ok_or_else(|| fail("truncated integer"))?;
    let max = (1u64 << n) - 1;
    let mut value = u64::from(first) & max;
    if value < max {
        return Ok((value, 1));
    }
    let mut shift = 0u32;
    for (i, &b) in input.iter().enumerate().skip(1) {
        if shift > 56 {
            return Err(fail("integer too large"));
        }
        value = value
            .checked_add(u64::from(b & 0x7f) << shift)
            .ok_or_else(|| fail("integer too large"))?;
        if b & 0x80 == 0 {
            return Ok((value, i + 1));
        }
        shift += 7;
    }
    Err(fail("truncated integer"))
}

/// Reads a string literal whose length has an `n`-bit prefix and whose
/// Huffman flag is the bit just above it.
fn decode_string(input: &[u8], n: u8) -> Result<(Vec<u8>, usize), H3Error> {
    let first = *input.first().ok_or_else(|| fail("truncated string"))?;
    let huffman = first & (1 << n) != 0;
    let (len, used) = decode_int(input, n)?;
    let len = usize::try_from(len).map_err(|_| fail("string too long"))?;
    let raw = input
        .get(used..used.saturating_add(len))
        .ok_or_else(|| fail("truncated string"))?;
    let value = if huffman {
        loona_hpack::huffman::HuffmanDecoder::new()
            .decode(raw)
            .map_err(|_| fail("invalid Huffman string"))?
    } else {
        raw.to_vec()
    };
    Ok((value, used + len))
}

fn encode_string(value: &[u8], n: u8, flags: u8, out: &mut Vec<u8>) {
    // Huffman flag left clear: plain literals.
    encode_int(value.len() as u64, n, flags, out);
    out.extend_from_slice(value);
}

/// Encodes a field section (the payload of a HEADERS frame).
pub fn encode(fields: &[(&str, &[u8])]) -> Vec<u8> {
    // Required Insert Count 0, Delta Base 0: no dynamic table.
    let mut out = vec![0, 0];
    for &(name, value) in fields {
        let exact = STATIC_TABLE
            .iter()
            .position(|&(n, v)| n == name && v.as_bytes() == value);
        if let Some(index) = exact {
            // Indexed field line, static: 1 T=1 index(6+).
            encode_int(index as u64, 6, 0b1100_0000, &mut out);
            continue;
        }
        if let Some(index) = STATIC_TABLE.iter().position(|&(n, _)| n == name) {
            // Literal with name reference, static: 0 1 N=0 T=1 index(4+).
            encode_int(index as u64, 4, 0b0101_0000, &mut out);
            encode_string(value, 7, 0, &mut out);
        } else {
            // Literal with literal name: 0 0 1 N=0 H=0 len(3+).
            encode_string(name.as_bytes(), 3, 0b0010_0000, &mut out);
            encode_string(value, 7, 0, &mut out);
        }
    }
    out
}

/// Decodes a field section, refusing dynamic-table references and sections
/// larger than `max_size` (counted as RFC 9114 does: name + value + 32 per
/// line).
pub fn decode(input: &[u8], max_size: usize) -> Result<Vec<Field>, H3Error> {
    let (required_insert_count, used) = decode_int(input, 8)?;
    if required_insert_count != 0 {
        return Err(fail("dynamic table reference, but its capacity is 0"));
    }
    let rest = input.get(used..).ok_or_else(|| fail("truncated prefix"))?;
    let (_delta_base, used2) = decode_int(rest, 7)?;
    let mut pos = used + used2;
    let mut fields = Vec::new();
    let mut size = 0usize;
    while let Some(&first) = input.get(pos) {
        let line = input.get(pos..).unwrap_or_default();
        let (name, value, used): (String, Vec<u8>, usize) = if first & 0x80 != 0 {
            // Indexed field line.
            if first & 0x40 == 0 {
                return Err(fail("dynamic table reference"));
            }
            let (index, used) = decode_int(line, 6)?;
            let &(n, v) = static_entry(index)?;
            (n.to_string(), v.as_bytes().to_vec(), used)
        } else if first & 0x40 != 0 {
            // Literal with name reference.
            if first & 0x10 == 0 {
                return Err(fail("dynamic table reference"));
            }
            let (index, used) = decode_int(line, 4)?;
            let &(n, _) = static_entry(index)?;
            let (value, used_v) = decode_string(line.get(used..).unwrap_or_default(), 7)?;
            (n.to_string(), value, used + used_v)
        } else if first & 0x20 != 0 {
            // Literal with literal name.
            let (name, used) = decode_string(line, 3)?;
            let (value, used_v) = decode_string(line.get(used..).unwrap_or_default(), 7)?;
            let name = String::from_utf8(name).map_err(|_| fail("field name is not text"))?;
            (name, value, used + used_v)
        } else {
            // Post-base forms only refer to the dynamic table.
            return Err(fail("dynamic table reference"));
        };
        size = size.saturating_add(name.len() + value.len() + 32);
        if size > max_size {
            return Err(H3Error::stream(
                H3_EXCESSIVE_LOAD,
                format!("field section larger than {max_size} bytes"),
            ));
        }
        fields.push((name, value));
        pos += used;
    }
    Ok(fields)
}

fn static_entry(index: u64) -> Result<&'static (&'static str, &'static str), H3Error> {
    usize::try_from(index)
        .ok()
        .and_then(|i| STATIC_TABLE.get(i))
        .ok_or_else(|| fail("static table index out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn connect_ip_request_round_trips() {
        let fields: Vec<(&str, &[u8])> = vec![
            (":method", b"CONNECT"),
            (":protocol", b"connect-ip"),
            (":scheme", b"https"),
            (":authority", b"broker.example.org"),
            (":path", b"/.well-known/masque/ip/*/*/"),
            ("capsule-protocol", b"?1"),
        ];
        let wire = encode(&fields);
        // :method CONNECT is static index 15: 0b11_001111.
        assert_eq!(wire[2], 0xc0 | 15);
        let decoded = decode(&wire, 4096).unwrap();
        let expect: Vec<Field> = fields
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_vec()))
            .collect();
        assert_eq!(decoded, expect);
    }

    #[test]
    fn rfc7541_integer_examples() {
        // C.1.2: 1337 with a 5-bit prefix is 1f 9a 0a.
        let mut out = Vec::new();
        encode_int(1337, 5, 0, &mut out);
        assert_eq!(out, [0x1f, 0x9a, 0x0a]);
        assert_eq!(decode_int(&out, 5).unwrap(), (1337, 3));
    }

    #[test]
    fn huffman_literals_from_other_encoders_decode() {
        // RFC 7541 C.4.1: "www.example.com" Huffman-coded.
        let huff = [
            0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
        ];
        let mut wire = vec![0, 0, 0x50]; // literal with static name ref :authority (index 0)
        wire.push(0x80 | huff.len() as u8);
        wire.extend_from_slice(&huff);
        assert_eq!(
            decode(&wire, 4096).unwrap(),
            vec![(":authority".to_string(), b"www.example.com".to_vec())]
        );
    }

    #[test]
    fn dynamic_references_and_oversize_are_refused() {
        assert_eq!(
            decode(&[1, 0], 100).unwrap_err().code,
            QPACK_DECOMPRESSION_FAILED
        );
        assert_eq!(
            decode(&[0, 0, 0x80], 100).unwrap_err().code,
            QPACK_DECOMPRESSION_FAILED
        );
        assert_eq!(
            decode(&[0, 0, 0x10], 100).unwrap_err().code,
            QPACK_DECOMPRESSION_FAILED
        );
        assert_eq!(
            decode(&[0, 0, 0xc0 | 63, 100], 4096).unwrap_err().code,
            QPACK_DECOMPRESSION_FAILED
        );
        let big = encode(&[("x-big", &[b'a'; 200])]);
        assert_eq!(decode(&big, 100).unwrap_err().code, H3_EXCESSIVE_LOAD);
    }

    proptest! {
        #[test]
        fn round_trips(fields in proptest::collection::vec(("[a-z][a-z0-9-]{0,20}", proptest::collection::vec(any::<u8>(), 0..40)), 0..8)) {
            let refs: Vec<(&str, &[u8])> = fields.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
            let decoded = decode(&encode(&refs), 1 << 20).unwrap();
            let expect: Vec<Field> = fields.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
            prop_assert_eq!(decoded, expect);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode(&bytes, 4096);
        }
    }
}
