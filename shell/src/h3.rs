//! HTTP/3 plumbing shared by the broker and the agent: the protocol logic
//! is in [`tether_proto::h3`]; this moves bytes between quinn and it.

use std::sync::{Arc, Mutex};

use quinn::{Connection, RecvStream, VarInt};
use tether_proto::h3::error::H3Error;
use tether_proto::h3::{self, Settings, UniAction};
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
    while let Ok(mut recv) = conn.accept_uni().await {
        let (conn, h3, settings) = (conn.clone(), h3.clone(), settings.clone());
        tokio::spawn(async move {
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
                            if let h3::Event::Settings(s) = event {
                                let _ = settings.send(Some(s));
                            }
                        }
                        if let UniAction::StopSending(code) = action {
                            let _ = recv
                                .stop(VarInt::from_u64(code).unwrap_or(VarInt::from_u32(0x103)));
                            return;
                        }
                    }
                    Err(e) => return close_with(&conn, &e),
                }
            }
        });
    }
}

/// The request stream's ID and the bytes in front of every IP packet sent
/// as an HTTP/3 datagram on it ([`tether_proto::datagram::h3_prefix`]).
pub fn datagram_prefix(recv: &RecvStream) -> (u64, Vec<u8>) {
    let stream_id = VarInt::from(recv.id()).into_inner();
    (stream_id, tether_proto::datagram::h3_prefix(stream_id))
}
