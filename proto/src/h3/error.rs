//! HTTP/3 error codes (RFC 9114 section 8.1, RFC 9204 section 6, RFC 9297).

use thiserror::Error;

/// No error: graceful shutdown.
pub const H3_NO_ERROR: u64 = 0x100;
/// Peer violated the protocol in a way no more specific code covers.
pub const H3_GENERAL_PROTOCOL_ERROR: u64 = 0x101;
/// An internal error.
pub const H3_INTERNAL_ERROR: u64 = 0x102;
/// A stream was created in a way the peer does not accept.
pub const H3_STREAM_CREATION_ERROR: u64 = 0x103;
/// A stream required by the connection was closed.
pub const H3_CLOSED_CRITICAL_STREAM: u64 = 0x104;
/// A frame arrived where it is not permitted.
pub const H3_FRAME_UNEXPECTED: u64 = 0x105;
/// A frame is malformed.
pub const H3_FRAME_ERROR: u64 = 0x106;
/// The peer is generating excessive load.
pub const H3_EXCESSIVE_LOAD: u64 = 0x107;
/// A stream or push ID was used incorrectly.
pub const H3_ID_ERROR: u64 = 0x108;
/// SETTINGS contained an error.
pub const H3_SETTINGS_ERROR: u64 = 0x109;
/// No SETTINGS frame at the start of the control stream.
pub const H3_MISSING_SETTINGS: u64 = 0x10a;
/// The request was rejected before processing.
pub const H3_REQUEST_REJECTED: u64 = 0x10b;
/// The request or response was cancelled.
pub const H3_REQUEST_CANCELLED: u64 = 0x10c;
/// The stream ended before the message was complete.
pub const H3_REQUEST_INCOMPLETE: u64 = 0x10d;
/// The message was malformed.
pub const H3_MESSAGE_ERROR: u64 = 0x10e;
/// The CONNECT target was reset or closed.
pub const H3_CONNECT_ERROR: u64 = 0x10f;
/// QPACK could not interpret a field section.
pub const QPACK_DECOMPRESSION_FAILED: u64 = 0x200;
/// The encoder stream could not be interpreted.
pub const QPACK_ENCODER_STREAM_ERROR: u64 = 0x201;
/// HTTP Datagram or capsule protocol violation (RFC 9297).
pub const H3_DATAGRAM_ERROR: u64 = 0x33;

/// Whether an error ends the connection or one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Close the whole connection with the code.
    Connection,
    /// Reset the stream with the code.
    Stream,
}

/// An HTTP/3 protocol error with the code to send.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("HTTP/3 error {code:#x}: {reason}")]
pub struct H3Error {
    /// The error code.
    pub code: u64,
    /// What happened, for logs.
    pub reason: String,
    /// Its reach.
    pub scope: Scope,
}

impl H3Error {
    /// A connection error.
    pub fn connection(code: u64, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            scope: Scope::Connection,
        }
    }

    /// A stream error.
    pub fn stream(code: u64, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            scope: Scope::Stream,
        }
    }
}
