//! HTTP/3 plumbing shared by the broker and the agent: the protocol logic
//! is in [`tether_proto::h3`]; this moves bytes between quinn and it
//! (the peer's unidirectional streams, connection errors, the datagram
//! prefix of a request stream, and writing response heads, DATA and whole
//! responses).

use std::sync::{Arc, Mutex};

use quinn::{Connection, RecvStream, SendStream, VarInt};
use tether_proto::api::ApiError;
use tether_proto::h3::error::H3Error;
use tether_proto::h3::{self, Response, Settings, UniAction, frame};
use tokio::sync::watch;

/// Closes the connection for an HTTP/3 connection error.
pub fn close_with(conn: &Connection, error: &H3Error) {
    tracing::debug!(code = error.code, reason = %error.reason, "closing connection");
    conn.close(
        VarInt::from_u64(error.code).unwrap_or(VarInt::from_u32(0x101)),
        error.reason.as_bytes(),
    );
}

/// Feeds every unidirectional stream the peer opens to the HTTP/3 state,
/// and publishes the peer's SETTINGS when they arrive. Runs until the
/// connection closes.
pub async fn read_uni_streams(
    conn: Connection,
    h3: Arc<Mutex<h3::Connection>>,
    settings: watch::Sender<Option<Settings>>,
) {
    read_uni_streams_inner(conn, h3, settings, None).await
}

/// As [`read_uni_streams`], and publishes the stream ID of each GOAWAY the
/// peer sends (RFC 9114 section 5.2: the peer is going away).
pub async fn read_uni_streams_with_goaway(
    conn: Connection,
    h3: Arc<Mutex<h3::Connection>>,
    settings: watch::Sender<Option<Settings>>,
    goaway: watch::Sender<Option<u64>>,
) {
    read_uni_streams_inner(conn, h3, settings, Some(goaway)).await
}

/// The loop of [`read_uni_streams_with_goaway`]; without `goaway`, a GOAWAY
/// from the peer is checked and not published (a watch channel nobody
/// reads would cost every connection about 350 bytes).
async fn read_uni_streams_inner(
    conn: Connection,
    h3: Arc<Mutex<h3::Connection>>,
    settings: watch::Sender<Option<Settings>>,
    goaway: Option<watch::Sender<Option<u64>>>,
) {
    while let Ok(recv) = conn.accept_uni().await {
        let (conn, h3, settings, goaway) =
            (conn.clone(), h3.clone(), settings.clone(), goaway.clone());
        tokio::spawn(read_uni_stream(recv, conn, h3, settings, goaway));
    }
}

/// Feeds one unidirectional stream of the peer to the HTTP/3 state until
/// it ends (the peer's control stream lasts as long as the connection).
pub async fn read_uni_stream(
    mut recv: RecvStream,
    conn: Connection,
    h3: Arc<Mutex<h3::Connection>>,
    settings: watch::Sender<Option<Settings>>,
    goaway: Option<watch::Sender<Option<u64>>>,
) {
    let id = VarInt::from(recv.id()).into_inner();
    loop {
        let chunk = match recv.read_chunk(usize::MAX, true).await {
            Ok(Some(chunk)) => chunk.bytes,
            Ok(None) => {
                let result = h3.lock().map(|mut c| c.on_uni_finished(id));
                if let Ok(Err(e)) = result {
                    close_with(&conn, &e);
                }
                return;
            }
            Err(_) => return,
        };
        let result = match h3.lock() {
            Ok(mut c) => c.on_uni_data(id, &chunk),
            Err(_) => return,
        };
        match result {
            Ok((action, events)) => {
                for event in events {
                    match event {
                        h3::Event::Settings(s) => {
                            let _ = settings.send(Some(s));
                        }
                        h3::Event::GoAway(id) => {
                            if let Some(goaway) = &goaway {
                                let _ = goaway.send(Some(id));
                            }
                        }
                    }
                }
                if let UniAction::StopSending(code) = action {
                    let _ = recv.stop(VarInt::from_u64(code).unwrap_or(VarInt::from_u32(0x103)));
                    return;
                }
            }
            Err(e) => return close_with(&conn, &e),
        }
    }
}

/// The request stream's ID and the bytes in front of every IP packet sent
/// as an HTTP/3 datagram on it ([`tether_proto::datagram::h3_prefix`]).
pub fn datagram_prefix(recv: &RecvStream) -> (u64, Vec<u8>) {
    let stream_id = VarInt::from(recv.id()).into_inner();
    (stream_id, tether_proto::datagram::h3_prefix(stream_id))
}

/// Writes a response head.
pub async fn send_head(
    send: &mut SendStream,
    response: &Response,
) -> Result<(), quinn::WriteError> {
    let mut out = Vec::new();
    frame::encode(frame::HEADERS, &response.encode(), &mut out);
    send.write_all(&out).await
}

/// Writes DATA.
pub async fn send_data(send: &mut SendStream, data: &[u8]) -> Result<(), quinn::WriteError> {
    let mut out = Vec::with_capacity(data.len() + 8);
    frame::encode_data_header(data.len(), &mut out);
    out.extend_from_slice(data);
    send.write_all(&out).await
}

/// Writes a complete response and finishes the stream.
pub async fn respond(send: &mut SendStream, status: u16, content_type: Option<&str>, body: &[u8]) {
    let mut response = Response::new(status);
    if let Some(ct) = content_type {
        response = response.with_header("content-type", ct);
    }
    response = response
        .with_header("content-length", &body.len().to_string())
        // Sites (`tether doctor`) compare their clock with it.
        .with_header(
            "date",
            &httpdate::fmt_http_date(std::time::SystemTime::now()),
        );
    let result = async {
        send_head(send, &response).await?;
        if !body.is_empty() {
            send_data(send, body).await?;
        }
        Ok::<(), quinn::WriteError>(())
    }
    .await;
    if result.is_ok() {
        let _ = send.finish();
    }
}

/// Writes a JSON response.
pub async fn respond_json<T: serde::Serialize>(send: &mut SendStream, status: u16, value: &T) {
    let body = serde_json::to_vec(value).unwrap_or_default();
    respond(send, status, Some("application/json"), &body).await;
}

/// Writes a JSON error response.
pub async fn respond_error(send: &mut SendStream, status: u16, message: impl Into<String>) {
    respond_json(
        send,
        status,
        &ApiError {
            error: message.into(),
        },
    )
    .await;
}
