//! A minimal HTTP/3 (RFC 9114) for CONNECT-IP, sans I/O.
//!
//! Enough of HTTP/3 to carry extended CONNECT (RFC 9220) with HTTP
//! Datagrams (RFC 9297) and ordinary requests such as enrollment: frames,
//! SETTINGS, QPACK with the static table only, request and response heads,
//! and the control streams. The shell owns the QUIC connection and moves
//! bytes: it writes [`Connection::control_stream`] on a unidirectional stream
//! it opens, feeds every unidirectional stream the peer opens to
//! [`Connection::on_uni_data`], and runs a [`message::MessageDecoder`] per
//! request stream.
//!
//! Server push is never enabled (no MAX_PUSH_ID is ever sent), so a push
//! stream or PUSH_PROMISE from the peer is a connection error.

pub mod error;
pub mod frame;
pub mod message;
pub mod qpack;
pub mod settings;

use error::{
    H3_CLOSED_CRITICAL_STREAM, H3_FRAME_UNEXPECTED, H3_ID_ERROR, H3_MISSING_SETTINGS,
    H3_STREAM_CREATION_ERROR, H3Error, QPACK_ENCODER_STREAM_ERROR,
};
use frame::{Frame, FrameDecoder};
pub use message::{MessageDecoder, MessageEvent, Request, Response};
pub use settings::Settings;

use crate::varint;

/// Unidirectional stream type of the control stream.
pub const STREAM_CONTROL: u64 = 0x00;
/// Unidirectional stream type of a push stream.
pub const STREAM_PUSH: u64 = 0x01;
/// Unidirectional stream type of the QPACK encoder stream.
pub const STREAM_QPACK_ENCODER: u64 = 0x02;
/// Unidirectional stream type of the QPACK decoder stream.
pub const STREAM_QPACK_DECODER: u64 = 0x03;

/// Which end of the connection this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The endpoint that opened the connection.
    Client,
    /// The endpoint that accepted it.
    Server,
}

/// What happened on the peer's unidirectional streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The peer's SETTINGS arrived.
    Settings(Settings),
    /// The peer is going away; requests at or above this ID will not be
    /// processed.
    GoAway(u64),
}

/// What the shell should do with a unidirectional stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UniAction {
    /// Keep reading it.
    Continue,
    /// Stop reading it and send STOP_SENDING with this code (unknown stream
    /// types, RFC 9114 section 6.2).
    StopSending(u64),
}

#[derive(Debug)]
enum Uni {
    /// Waiting for the stream type.
    Typeless(Vec<u8>),
    Control {
        frames: FrameDecoder,
        settings_seen: bool,
    },
    QpackEncoder,
    QpackDecoder,
    Ignored,
}

/// The connection-level state of HTTP/3: our settings, the peer's control
/// stream and its settings.
#[derive(Debug)]
pub struct Connection {
    role: Role,
    local: Settings,
    peer: Option<Settings>,
    peer_control: Option<u64>,
    /// The state of each unidirectional stream the peer opened, by stream
    /// ID. A list: a peer has a few (its control stream and the two QPACK
    /// streams), and a map's smallest node (about 800 bytes) would be held
    /// by every connection for its life.
    uni: Vec<(u64, Uni)>,
}

impl Connection {
    /// The state of a new connection.
    pub fn new(role: Role, local: Settings) -> Self {
        Self {
            role,
            local,
            peer: None,
            peer_control: None,
            uni: Vec::new(),
        }
    }

    /// Our settings.
    pub fn local_settings(&self) -> &Settings {
        &self.local
    }

    /// The peer's settings, once received.
    pub fn peer_settings(&self) -> Option<&Settings> {
        self.peer.as_ref()
    }

    /// The bytes to write first on the control stream we open: its type and
    /// our SETTINGS.
    pub fn control_stream(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = varint::encode(STREAM_CONTROL, &mut out);
        frame::encode(frame::SETTINGS, &self.local.encode(), &mut out);
        out
    }

    /// Bytes arrived on a unidirectional stream the peer opened.
    pub fn on_uni_data(
        &mut self,
        stream_id: u64,
        data: &[u8],
    ) -> Result<(UniAction, Vec<Event>), H3Error> {
        let at = match self.uni.iter().position(|(id, _)| *id == stream_id) {
            Some(at) => at,
            None => {
                self.uni.push((stream_id, Uni::Typeless(Vec::new())));
                self.uni.len() - 1
            }
        };
        let state = &mut self.uni[at].1;
        let mut events = Vec::new();
        let mut data = data;
        let mut typed_now = None;
        if let Uni::Typeless(buf) = state {
            buf.extend_from_slice(data);
            let Ok((stream_type, used)) = varint::decode(buf) else {
                return Ok((UniAction::Continue, events));
            };
            typed_now = Some((stream_type, buf.split_off(used)));
        }
        let rest_storage;
        if let Some((stream_type, rest)) = typed_now {
            rest_storage = rest;
            data = &rest_storage;
            let next = match stream_type {
                STREAM_CONTROL => {
                    if self.peer_control.is_some() {
                        return Err(H3Error::connection(
                            H3_STREAM_CREATION_ERROR,
                            "second control stream",
                        ));
                    }
                    self.peer_control = Some(stream_id);
                    Uni::Control {
                        frames: FrameDecoder::new(16 * 1024),
                        settings_seen: false,
                    }
                }
                STREAM_PUSH => {
                    let code = match self.role {
                        Role::Server => H3_STREAM_CREATION_ERROR,
                        Role::Client => H3_ID_ERROR,
                    };
                    return Err(H3Error::connection(
                        code,
                        "push stream, but pushes are not allowed",
                    ));
                }
                STREAM_QPACK_ENCODER => Uni::QpackEncoder,
                STREAM_QPACK_DECODER => Uni::QpackDecoder,
                _ => {
                    self.uni[at].1 = Uni::Ignored;
                    return Ok((UniAction::StopSending(H3_STREAM_CREATION_ERROR), events));
                }
            };
            self.uni[at].1 = next;
        }
        match self.uni.get_mut(at).map(|(_, state)| state) {
            Some(Uni::Control {
                frames,
                settings_seen,
            }) => {
                frames.push(data);
                while let Some(frame) = frames.next_frame()? {
                    match frame {
                        Frame::Settings(payload) if !*settings_seen => {
                            *settings_seen = true;
                            let s = Settings::decode(&payload)?;
                            self.peer = Some(s.clone());
                            events.push(Event::Settings(s));
                        }
                        _ if !*settings_seen => {
                            return Err(H3Error::connection(
                                H3_MISSING_SETTINGS,
                                "control stream must start with SETTINGS",
                            ));
                        }
                        Frame::GoAway(id) => events.push(Event::GoAway(id)),
                        Frame::MaxPushId(_) if self.role == Role::Server => {}
                        Frame::CancelPush(_) => {}
                        _ => {
                            return Err(H3Error::connection(
                                H3_FRAME_UNEXPECTED,
                                "frame not allowed on the control stream",
                            ));
                        }
                    }
                }
            }
            Some(Uni::QpackEncoder) => {
                // With capacity 0 the only valid instruction is Set Dynamic
                // Table Capacity to 0: 0b001 followed by a 5-bit-prefix 0.
                if data.iter().any(|&b| b != 0x20) {
                    return Err(H3Error::connection(
                        QPACK_ENCODER_STREAM_ERROR,
                        "encoder instruction with a zero-capacity table",
                    ));
                }
            }
            Some(Uni::QpackDecoder | Uni::Ignored | Uni::Typeless(_)) | None => {}
        }
        Ok((UniAction::Continue, events))
    }

    /// A unidirectional stream the peer opened has ended.
    pub fn on_uni_finished(&mut self, stream_id: u64) -> Result<(), H3Error> {
        let state = self
            .uni
            .iter()
            .position(|(id, _)| *id == stream_id)
            .map(|at| self.uni.swap_remove(at).1);
        match state {
            Some(Uni::Control { .. } | Uni::QpackEncoder | Uni::QpackDecoder) => Err(
                H3Error::connection(H3_CLOSED_CRITICAL_STREAM, "peer closed a critical stream"),
            ),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_stream_exchange() {
        let client = Connection::new(Role::Client, Settings::default());
        let mut server = Connection::new(Role::Server, Settings::default());
        let bytes = client.control_stream();
        // Fed one byte at a time, the settings arrive exactly once.
        let mut events = Vec::new();
        for b in &bytes {
            let (action, ev) = server.on_uni_data(2, std::slice::from_ref(b)).unwrap();
            assert_eq!(action, UniAction::Continue);
            events.extend(ev);
        }
        assert_eq!(events, vec![Event::Settings(Settings::default())]);
        assert!(server.peer_settings().unwrap().enable_connect_protocol);
        let mut goaway = Vec::new();
        frame::encode_goaway(4, &mut goaway);
        assert_eq!(
            server.on_uni_data(2, &goaway).unwrap().1,
            vec![Event::GoAway(4)]
        );
        assert_eq!(
            server.on_uni_finished(2).unwrap_err().code,
            H3_CLOSED_CRITICAL_STREAM
        );
    }

    #[test]
    fn protocol_violations() {
        let mut s = Connection::new(Role::Server, Settings::default());
        // A control stream that does not start with SETTINGS.
        let mut wire = vec![0x00];
        frame::encode_goaway(0, &mut wire);
        assert_eq!(
            s.on_uni_data(2, &wire).unwrap_err().code,
            H3_MISSING_SETTINGS
        );
        // A second control stream.
        let mut s = Connection::new(Role::Server, Settings::default());
        s.on_uni_data(
            2,
            &Connection::new(Role::Client, Settings::default()).control_stream(),
        )
        .unwrap();
        assert_eq!(
            s.on_uni_data(6, &[0x00]).unwrap_err().code,
            H3_STREAM_CREATION_ERROR
        );
        // A push stream from a client.
        assert_eq!(
            s.on_uni_data(10, &[0x01]).unwrap_err().code,
            H3_STREAM_CREATION_ERROR
        );
        // Unknown (grease) stream types are stopped, not fatal.
        assert_eq!(
            s.on_uni_data(14, &[0x21]).unwrap().0,
            UniAction::StopSending(H3_STREAM_CREATION_ERROR)
        );
        // A QPACK encoder stream inserting into a zero-capacity table.
        assert_eq!(
            s.on_uni_data(18, &[0x02, 0xc1]).unwrap_err().code,
            QPACK_ENCODER_STREAM_ERROR
        );
    }

    /// The peer's streams interleaved, each byte by byte: each keeps its
    /// own state, a finished one is forgotten, and a critical one may not
    /// finish.
    #[test]
    fn interleaved_streams_keep_their_own_state() {
        let mut s = Connection::new(Role::Server, Settings::default());
        let control = Connection::new(Role::Client, Settings::default()).control_stream();
        // Control (2), QPACK encoder (6) with a capacity instruction,
        // QPACK decoder (10), and a grease stream (14) that ends.
        let streams: [(u64, Vec<u8>); 4] = [
            (2, control),
            (6, vec![0x02, 0x20]),
            (10, vec![0x03]),
            (14, vec![0x21]),
        ];
        let mut events = Vec::new();
        let longest = streams.iter().map(|(_, b)| b.len()).max().unwrap();
        for i in 0..longest {
            for (id, bytes) in &streams {
                if let Some(b) = bytes.get(i) {
                    let (_, ev) = s.on_uni_data(*id, std::slice::from_ref(b)).unwrap();
                    events.extend(ev);
                }
            }
        }
        assert_eq!(events, vec![Event::Settings(Settings::default())]);
        assert_eq!(s.uni.len(), 4);
        s.on_uni_finished(14).unwrap();
        assert_eq!(s.uni.len(), 3);
        // A stream never seen finishes without harm.
        s.on_uni_finished(18).unwrap();
        for id in [2, 6, 10] {
            assert_eq!(
                s.on_uni_finished(id).unwrap_err().code,
                H3_CLOSED_CRITICAL_STREAM
            );
        }
        assert!(s.uni.is_empty());
        // The encoder stream is still checked after the others came and went.
        let mut s = Connection::new(Role::Server, Settings::default());
        s.on_uni_data(2, &[0x00]).unwrap();
        s.on_uni_data(6, &[0x02]).unwrap();
        s.on_uni_data(10, &[0x03]).unwrap();
        s.on_uni_data(6, &[0x20]).unwrap();
        assert_eq!(
            s.on_uni_data(6, &[0xc1]).unwrap_err().code,
            QPACK_ENCODER_STREAM_ERROR
        );
    }
}
