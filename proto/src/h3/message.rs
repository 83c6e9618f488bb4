//! Request and response heads, and the decoder of a request stream.

use super::error::{H3_FRAME_UNEXPECTED, H3_MESSAGE_ERROR, H3_REQUEST_INCOMPLETE, H3Error};
use super::frame::{Frame, FrameDecoder};
use super::qpack;

/// Connection-specific header fields HTTP/3 forbids (RFC 9114 section 4.2).
const CONNECTION_SPECIFIC: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

fn malformed(reason: impl Into<String>) -> H3Error {
    H3Error::stream(H3_MESSAGE_ERROR, reason)
}

/// Checks a regular field line and turns it into text.
fn regular_field(name: String, value: Vec<u8>) -> Result<(String, String), H3Error> {
    if name.is_empty()
        || name
            .bytes()
            .any(|b| b.is_ascii_uppercase() || b <= b' ' || b == b':' || b >= 0x7f)
    {
        return Err(malformed(format!("invalid field name {name:?}")));
    }
    if CONNECTION_SPECIFIC.contains(&name.as_str()) {
        return Err(malformed(format!("connection-specific field {name}")));
    }
    let value =
        String::from_utf8(value).map_err(|_| malformed(format!("field {name} is not text")))?;
    if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(malformed(format!("field {name} contains CR, LF or NUL")));
    }
    if name == "te" && value != "trailers" {
        return Err(malformed("te other than \"trailers\""));
    }
    Ok((name, value))
}

/// Text field lines.
type TextFields = Vec<(String, String)>;

/// Splits field lines into pseudo-header fields (which must come first) and
/// regular ones.
fn split(fields: Vec<qpack::Field>) -> Result<(TextFields, TextFields), H3Error> {
    let mut pseudo = Vec::new();
    let mut regular = Vec::new();
    for (name, value) in fields {
        if let Some(stripped) = name.strip_prefix(':') {
            if !regular.is_empty() {
                return Err(malformed("pseudo-header after a regular field"));
            }
            if pseudo.iter().any(|(n, _): &(String, String)| n == stripped) {
                return Err(malformed(format!("pseudo-header {name} repeated")));
            }
            let value =
                String::from_utf8(value).map_err(|_| malformed(format!("{name} is not text")))?;
            pseudo.push((stripped.to_string(), value));
        } else {
            regular.push(regular_field(name, value)?);
        }
    }
    Ok((pseudo, regular))
}

/// A request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `:method`.
    pub method: String,
    /// `:scheme` (absent on a plain CONNECT).
    pub scheme: Option<String>,
    /// `:authority`.
    pub authority: Option<String>,
    /// `:path` (absent on a plain CONNECT).
    pub path: Option<String>,
    /// `:protocol` of an extended CONNECT (RFC 9220).
    pub protocol: Option<String>,
    /// Regular fields, in order.
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// A request with the usual pseudo-headers.
    pub fn new(method: &str, authority: &str, path: &str) -> Self {
        Self {
            method: method.to_string(),
            scheme: Some("https".into()),
            authority: Some(authority.to_string()),
            path: Some(path.to_string()),
            protocol: None,
            headers: Vec::new(),
        }
    }

    /// Adds a regular field (name lowercase).
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// The first value of a regular field.
    pub fn header(&self, name: &str) -> Option<&str> {
        first_value(&self.headers, name)
    }

    /// Validates decoded field lines as a request (RFC 9114 sections 4.3.1
    /// and 4.4, RFC 9220).
    pub fn from_fields(fields: Vec<qpack::Field>) -> Result<Self, H3Error> {
        let (pseudo, headers) = split(fields)?;
        let mut req = Request {
            method: String::new(),
            scheme: None,
            authority: None,
            path: None,
            protocol: None,
            headers,
        };
        for (name, value) in pseudo {
            match name.as_str() {
                "method" => req.method = value,
                "scheme" => req.scheme = Some(value),
                "authority" => req.authority = Some(value),
                "path" => req.path = Some(value),
                "protocol" => req.protocol = Some(value),
                other => return Err(malformed(format!("unknown request pseudo-header :{other}"))),
            }
        }
        if req.method.is_empty() {
            return Err(malformed("missing :method"));
        }
        if req.protocol.is_some() && req.method != "CONNECT" {
            return Err(malformed(":protocol on a method other than CONNECT"));
        }
        match (req.method.as_str(), &req.protocol) {
            ("CONNECT", None) => {
                if req.scheme.is_some() || req.path.is_some() || req.authority.is_none() {
                    return Err(malformed(
                        "CONNECT takes :authority and no :scheme or :path",
                    ));
                }
            }
            _ => {
                if req.scheme.is_none() || req.path.as_deref().is_none_or(str::is_empty) {
                    return Err(malformed("missing :scheme or :path"));
                }
                if req.protocol.is_some() && req.authority.is_none() {
                    return Err(malformed("extended CONNECT without :authority"));
                }
            }
        }
        Ok(req)
    }

    /// Encodes as a field section.
    pub fn encode(&self) -> Vec<u8> {
        let mut fields: Vec<(&str, &[u8])> = vec![(":method", self.method.as_bytes())];
        if let Some(p) = &self.protocol {
            fields.push((":protocol", p.as_bytes()));
        }
        if let Some(s) = &self.scheme {
            fields.push((":scheme", s.as_bytes()));
        }
        if let Some(a) = &self.authority {
            fields.push((":authority", a.as_bytes()));
        }
        if let Some(p) = &self.path {
            fields.push((":path", p.as_bytes()));
        }
        for (n, v) in &self.headers {
            fields.push((n, v.as_bytes()));
        }
        qpack::encode(&fields)
    }
}

/// A response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// `:status`.
    pub status: u16,
    /// Regular fields, in order.
    pub headers: Vec<(String, String)>,
}

/// The first value of the regular field `name`.
fn first_value<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

impl Response {
    /// A response with no fields.
    pub fn new(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
        }
    }

    /// Adds a regular field (name lowercase).
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// The first value of a regular field.
    pub fn header(&self, name: &str) -> Option<&str> {
        first_value(&self.headers, name)
    }

    /// Validates decoded field lines as a response.
    pub fn from_fields(fields: Vec<qpack::Field>) -> Result<Self, H3Error> {
        let (pseudo, headers) = split(fields)?;
        let mut status = None;
        for (name, value) in pseudo {
            match name.as_str() {
                "status" => {
                    status = value
                        .parse::<u16>()
                        .ok()
                        .filter(|s| (100..=999).contains(s));
                    if status.is_none() {
                        return Err(malformed(format!("invalid :status {value:?}")));
                    }
                }
                other => {
                    return Err(malformed(format!(
                        "unknown response pseudo-header :{other}"
                    )));
                }
            }
        }
        let status = status.ok_or_else(|| malformed("missing :status"))?;
        Ok(Self { status, headers })
    }

    /// Encodes as a field section.
    pub fn encode(&self) -> Vec<u8> {
        let status = self.status.to_string();
        let mut fields: Vec<(&str, &[u8])> = vec![(":status", status.as_bytes())];
        for (n, v) in &self.headers {
            fields.push((n, v.as_bytes()));
        }
        qpack::encode(&fields)
    }
}

/// What a request or response stream carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageEvent {
    /// The (decoded, not yet validated) head.
    Head(Vec<qpack::Field>),
    /// Body bytes (for CONNECT-IP: capsules).
    Data(Vec<u8>),
    /// Trailing fields.
    Trailers(Vec<qpack::Field>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MessageState {
    Head,
    Body,
    Done,
}

/// Decodes the frames of one request or response stream and enforces their
/// order: HEADERS, then DATA, then optional trailing HEADERS. Informational
/// (1xx) response heads may precede the final one; the caller asks for the
/// next head with [`expect_final_head`](Self::expect_final_head).
#[derive(Debug)]
pub struct MessageDecoder {
    frames: FrameDecoder,
    state: MessageState,
    max_field_section: usize,
}

impl MessageDecoder {
    /// A decoder accepting field sections up to `max_field_section` bytes.
    pub fn new(max_field_section: usize) -> Self {
        Self {
            frames: FrameDecoder::new(max_field_section),
            state: MessageState::Head,
            max_field_section,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.frames.push(data);
    }

    /// After an informational response head, wait for another head.
    pub fn expect_final_head(&mut self) {
        self.state = MessageState::Head;
    }

    /// The body bytes of every DATA frame decoded so far (empty when more
    /// bytes are needed); trailers are skipped. For the capsule stream of
    /// an established tunnel, after the head.
    pub fn take_data(&mut self) -> Result<Vec<u8>, H3Error> {
        let mut data = Vec::new();
        while let Some(event) = self.next_event()? {
            if let MessageEvent::Data(d) = event {
                data.extend_from_slice(&d);
            }
        }
        Ok(data)
    }

    /// The next event; `Ok(None)` when more bytes are needed.
    pub fn next_event(&mut self) -> Result<Option<MessageEvent>, H3Error> {
        let Some(frame) = self.frames.next_frame()? else {
            return Ok(None);
        };
        match (self.state, frame) {
            (MessageState::Head, Frame::Headers(block)) => {
                self.state = MessageState::Body;
                Ok(Some(MessageEvent::Head(qpack::decode(
                    &block,
                    self.max_field_section,
                )?)))
            }
            (MessageState::Body, Frame::Data(data)) => Ok(Some(MessageEvent::Data(data))),
            (MessageState::Body, Frame::Headers(block)) => {
                self.state = MessageState::Done;
                Ok(Some(MessageEvent::Trailers(qpack::decode(
                    &block,
                    self.max_field_section,
                )?)))
            }
            (_, Frame::PushPromise) => Err(H3Error::connection(
                H3_FRAME_UNEXPECTED,
                "PUSH_PROMISE without MAX_PUSH_ID",
            )),
            (state, frame) => Err(H3Error::connection(
                H3_FRAME_UNEXPECTED,
                format!(
                    "{} on a request stream in state {state:?}",
                    frame_name(&frame)
                ),
            )),
        }
    }

    /// Declares the end of the stream: an error if a frame was cut off or no
    /// head arrived.
    pub fn finish(&self) -> Result<(), H3Error> {
        if !self.frames.at_boundary() {
            return Err(H3Error::stream(
                H3_REQUEST_INCOMPLETE,
                "stream ended inside a frame",
            ));
        }
        if self.state == MessageState::Head {
            return Err(H3Error::stream(
                H3_REQUEST_INCOMPLETE,
                "stream ended before the head",
            ));
        }
        Ok(())
    }
}

fn frame_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Data(_) => "DATA",
        Frame::Headers(_) => "HEADERS",
        Frame::Settings(_) => "SETTINGS",
        Frame::GoAway(_) => "GOAWAY",
        Frame::CancelPush(_) => "CANCEL_PUSH",
        Frame::MaxPushId(_) => "MAX_PUSH_ID",
        Frame::PushPromise => "PUSH_PROMISE",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::h3::frame;

    fn fields(list: &[(&str, &str)]) -> Vec<qpack::Field> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn extended_connect_rules() {
        let ok = Request::from_fields(fields(&[
            (":method", "CONNECT"),
            (":protocol", "connect-ip"),
            (":scheme", "https"),
            (":authority", "b"),
            (":path", "/x"),
            ("capsule-protocol", "?1"),
        ]))
        .unwrap();
        assert_eq!(ok.protocol.as_deref(), Some("connect-ip"));
        assert_eq!(ok.header("capsule-protocol"), Some("?1"));
        // Round trip through the wire encoding.
        assert_eq!(
            Request::from_fields(qpack::decode(&ok.encode(), 4096).unwrap()).unwrap(),
            ok
        );

        for bad in [
            vec![
                (":method", "GET"),
                (":protocol", "connect-ip"),
                (":scheme", "https"),
                (":path", "/"),
            ],
            vec![
                (":method", "CONNECT"),
                (":protocol", "connect-ip"),
                (":scheme", "https"),
                (":path", "/"),
            ],
            vec![(":method", "CONNECT"), (":authority", "b"), (":path", "/")],
            vec![
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/"),
                ("Upper", "x"),
            ],
            vec![
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/"),
                ("connection", "close"),
            ],
            vec![
                (":method", "GET"),
                ("x", "y"),
                (":scheme", "https"),
                (":path", "/"),
            ],
            vec![
                (":method", "GET"),
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/"),
            ],
            vec![
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/"),
                (":status", "200"),
            ],
        ] {
            assert_eq!(
                Request::from_fields(fields(&bad)).unwrap_err().code,
                H3_MESSAGE_ERROR,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn stream_order_is_enforced() {
        let mut wire = Vec::new();
        frame::encode(frame::HEADERS, &Response::new(200).encode(), &mut wire);
        frame::encode(frame::DATA, b"body", &mut wire);
        let mut dec = MessageDecoder::new(4096);
        dec.push(&wire);
        let head = match dec.next_event().unwrap() {
            Some(MessageEvent::Head(f)) => Response::from_fields(f).unwrap(),
            other => panic!("{other:?}"),
        };
        assert_eq!(head.status, 200);
        assert_eq!(
            dec.next_event().unwrap(),
            Some(MessageEvent::Data(b"body".to_vec()))
        );
        dec.finish().unwrap();

        let mut dec = MessageDecoder::new(4096);
        let mut wire = Vec::new();
        frame::encode(frame::DATA, b"early", &mut wire);
        dec.push(&wire);
        assert_eq!(dec.next_event().unwrap_err().code, H3_FRAME_UNEXPECTED);

        let dec = MessageDecoder::new(4096);
        assert_eq!(dec.finish().unwrap_err().code, H3_REQUEST_INCOMPLETE);
    }

    #[test]
    fn control_frames_on_a_request_stream_are_connection_errors() {
        use crate::h3::error::Scope;
        let mut head = Vec::new();
        frame::encode(
            frame::HEADERS,
            &qpack::encode(&[(":status", b"200")]),
            &mut head,
        );
        for (ty, payload) in [
            (frame::SETTINGS, &[][..]),
            (frame::GOAWAY, &[0][..]),
            (frame::MAX_PUSH_ID, &[0][..]),
            (frame::CANCEL_PUSH, &[0][..]),
        ] {
            let mut control = Vec::new();
            frame::encode(ty, payload, &mut control);
            // Before the head, and in the body (as a tunnel reads it).
            for before in [&[][..], &head[..]] {
                let mut dec = MessageDecoder::new(4096);
                dec.push(before);
                dec.push(&control);
                let e = dec.take_data().unwrap_err();
                assert_eq!(
                    (e.code, e.scope),
                    (H3_FRAME_UNEXPECTED, Scope::Connection),
                    "frame {ty:#x} after {} bytes: {e}",
                    before.len()
                );
            }
        }
    }
}
