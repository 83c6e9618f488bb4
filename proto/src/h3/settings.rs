//! The SETTINGS frame (RFC 9114 section 7.2.4) and the settings CONNECT-IP
//! needs: extended CONNECT (RFC 9220) and HTTP Datagrams (RFC 9297).

use super::error::{H3_SETTINGS_ERROR, H3Error};
use crate::varint::{self, Reader};

/// SETTINGS_QPACK_MAX_TABLE_CAPACITY (RFC 9204).
pub const QPACK_MAX_TABLE_CAPACITY: u64 = 0x01;
/// SETTINGS_MAX_FIELD_SECTION_SIZE.
pub const MAX_FIELD_SECTION_SIZE: u64 = 0x06;
/// SETTINGS_QPACK_BLOCKED_STREAMS (RFC 9204).
pub const QPACK_BLOCKED_STREAMS: u64 = 0x07;
/// SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 9220).
pub const ENABLE_CONNECT_PROTOCOL: u64 = 0x08;
/// SETTINGS_H3_DATAGRAM (RFC 9297).
pub const H3_DATAGRAM: u64 = 0x33;

/// One endpoint's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Largest field section the endpoint accepts; `None` is unlimited.
    pub max_field_section_size: Option<u64>,
    /// Extended CONNECT is allowed.
    pub enable_connect_protocol: bool,
    /// HTTP Datagrams are supported.
    pub h3_datagram: bool,
    /// QPACK dynamic table capacity (tether always uses 0).
    pub qpack_max_table_capacity: u64,
    /// QPACK blocked streams (tether always uses 0).
    pub qpack_blocked_streams: u64,
}

impl Default for Settings {
    /// What tether sends: CONNECT-IP capable, no dynamic QPACK table.
    fn default() -> Self {
        Self {
            max_field_section_size: Some(16 * 1024),
            enable_connect_protocol: true,
            h3_datagram: true,
            qpack_max_table_capacity: 0,
            qpack_blocked_streams: 0,
        }
    }
}

impl Settings {
    /// The values a peer is assumed to have before its SETTINGS arrive.
    pub fn peer_defaults() -> Self {
        Self {
            max_field_section_size: None,
            enable_connect_protocol: false,
            h3_datagram: false,
            qpack_max_table_capacity: 0,
            qpack_blocked_streams: 0,
        }
    }

    /// Decodes a SETTINGS payload, enforcing RFC 9114's rules: no duplicate
    /// identifiers, none of HTTP/2's settings, boolean settings 0 or 1.
    pub fn decode(payload: &[u8]) -> Result<Self, H3Error> {
        let mut s = Self::peer_defaults();
        let mut seen = std::collections::BTreeSet::new();
        let mut r = Reader::new(payload);
        let bad = |m: String| H3Error::connection(H3_SETTINGS_ERROR, m);
        while !r.is_empty() {
            let id = r.varint().map_err(|_| bad("truncated setting".into()))?;
            let value = r.varint().map_err(|_| bad("truncated setting".into()))?;
            if !seen.insert(id) {
                return Err(bad(format!("setting {id:#x} repeated")));
            }
            let boolean = || {
                if value <= 1 {
                    Ok(value == 1)
                } else {
                    Err(bad(format!("setting {id:#x} must be 0 or 1, got {value}")))
                }
            };
            match id {
                0x02..=0x05 => return Err(bad(format!("HTTP/2 setting {id:#x}"))),
                QPACK_MAX_TABLE_CAPACITY => s.qpack_max_table_capacity = value,
                MAX_FIELD_SECTION_SIZE => s.max_field_section_size = Some(value),
                QPACK_BLOCKED_STREAMS => s.qpack_blocked_streams = value,
                ENABLE_CONNECT_PROTOCOL => s.enable_connect_protocol = boolean()?,
                H3_DATAGRAM => s.h3_datagram = boolean()?,
                _ => {} // unknown settings are ignored
            }
        }
        Ok(s)
    }

    /// Encodes as a SETTINGS payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut put = |id: u64, value: u64| {
            let _ = varint::encode(id, &mut out);
            let _ = varint::encode(value, &mut out);
        };
        put(QPACK_MAX_TABLE_CAPACITY, self.qpack_max_table_capacity);
        put(QPACK_BLOCKED_STREAMS, self.qpack_blocked_streams);
        if let Some(size) = self.max_field_section_size {
            put(MAX_FIELD_SECTION_SIZE, size);
        }
        put(
            ENABLE_CONNECT_PROTOCOL,
            u64::from(self.enable_connect_protocol),
        );
        put(H3_DATAGRAM, u64::from(self.h3_datagram));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rules() {
        let s = Settings::default();
        assert_eq!(Settings::decode(&s.encode()), Ok(s));
        // Duplicate id.
        assert!(Settings::decode(&[0x08, 1, 0x08, 1]).is_err());
        // HTTP/2's SETTINGS_ENABLE_PUSH.
        assert!(Settings::decode(&[0x02, 1]).is_err());
        // Boolean out of range.
        assert!(Settings::decode(&[0x33, 2]).is_err());
        // Unknown (grease) settings are ignored.
        assert_eq!(
            Settings::decode(&[0x21, 7]).unwrap(),
            Settings::peer_defaults()
        );
    }
}
