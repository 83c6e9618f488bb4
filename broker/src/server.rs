//! The tunnel listener: QUIC with HTTP/3, enrollment and CONNECT-IP.
//!
//! The HTTP/3 logic lives in [`tether_proto::h3`]; this module moves bytes
//! between quinn streams and it: our control stream out, the peer's
//! unidirectional streams in, and one task per request stream.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use tether_pki::PeerCert;
use tether_proto::broker::{RequestKind, classify_request};
use tether_proto::h3::error::{H3_MESSAGE_ERROR, H3_NO_ERROR, H3Error, Scope};
use tether_proto::h3::{self, MessageDecoder, MessageEvent, Request, Settings};
use tether_shell::h3::{close_with, read_uni_streams, respond, respond_error};
use tokio::sync::watch;

use crate::state::Broker;

/// Largest field section accepted from peers.
pub const MAX_FIELD_SECTION: usize = 16 * 1024;
/// ALPN of HTTP/3.
pub const ALPN_H3: &[u8] = b"h3";

/// File of the stateless reset key in the data directory.
pub const RESET_KEY_FILE: &str = "quic-reset.key";
/// The least time between two stateless resets the broker sends: none.
/// quinn's pacing (default 20 ms) keeps only the time of the last reset, so
/// any packet arriving within the interval after another one's reset is
/// ignored, at any rate: with 1 ms and sites noticing a restart at 200 a
/// second, about one site in six went unanswered and waited for its next
/// probe, which a site whose round-trip estimate was inflated by a
/// handshake queue sends seconds later. The pacing guards against loops
/// and reflection of garbage; here only a packet carrying a connection ID
/// this broker issued (checked against the keyed signature) draws a reset,
/// and a reset is always smaller than that packet.
pub const STATELESS_RESET_INTERVAL: std::time::Duration = std::time::Duration::ZERO;

/// The QUIC endpoint configuration of the broker, from a secret kept in the
/// data directory: both the stateless reset key and the key connection IDs
/// are validated with survive a restart (even `kill -9`), so the broker
/// recognises the connections of its previous life and resets them, and
/// sites notice within a round trip instead of waiting for their idle
/// timeout.
pub fn endpoint_config(data_dir: &std::path::Path) -> anyhow::Result<quinn::EndpointConfig> {
    let path = data_dir.join(RESET_KEY_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) if b.len() == 40 => b,
        _ => {
            let mut b = vec![0u8; 40];
            rand::fill(&mut b[..]);
            tether_pki::ca::replace_file(&path, &b, 0o600)?;
            b
        }
    };
    let (reset, cid) = bytes.split_at(32);
    let cid_key = u64::from_le_bytes(cid.try_into().context("short key")?);
    let mut config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset,
    )));
    config.cid_generator(move || Box::new(crate::cid::SignedCids::from_key(cid_key)));
    // After a restart every site's next packet draws a stateless reset; at
    // quinn's default pace (one per 20 ms) a thousand sites would learn of
    // the restart over 20 s, and any pace drops packets that arrive close
    // together (see STATELESS_RESET_INTERVAL). A reset is never larger than
    // the packet that caused it, so answering each amplifies nothing.
    config.min_reset_interval(STATELESS_RESET_INTERVAL);
    Ok(config)
}

/// The broker's TLS configuration for a listener speaking `alpn`: its
/// certificate, and the site verifier with the revocation set (a client
/// certificate is optional, for enrollment).
pub fn tls_config(broker: &Broker, alpn: &[u8]) -> anyhow::Result<rustls::ServerConfig> {
    let mut tls = tether_pki::tls::server_config_with_trust(
        broker.ca.anchors(),
        broker.ca.trust_domain(),
        broker.cert.clone(),
        broker.revocations.clone(),
        tether_pki::ClientAuth::Optional,
    )?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// A listener that could not bind, with what to do about it.
pub fn bind_error(protocol: &str, addr: SocketAddr, e: &std::io::Error) -> anyhow::Error {
    let hint = match e.kind() {
        std::io::ErrorKind::PermissionDenied => {
            " (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        }
        std::io::ErrorKind::AddrInUse => " (another process uses this port)",
        _ => "",
    };
    anyhow::anyhow!("cannot listen on {protocol} {addr}: {e}{hint}")
}

/// The broker's QUIC endpoint on a bound socket.
pub fn endpoint(broker: &Broker, socket: std::net::UdpSocket) -> anyhow::Result<quinn::Endpoint> {
    let tls = tls_config(broker, ALPN_H3)?;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .context("TLS configuration unusable for QUIC")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(tether_shell::quic::transport_config(
        broker.config.keepalive,
        broker.config.idle_timeout,
    )));
    tether_shell::udp::tune_socket(&socket);
    let endpoint_config = endpoint_config(&broker.data_dir)?;
    let runtime = tether_shell::quic::runtime().context("no async runtime")?;
    Ok(quinn::Endpoint::new(
        endpoint_config,
        Some(config),
        socket,
        runtime,
    )?)
}

/// Accepts connections until the endpoint closes.
pub async fn serve(broker: Arc<Broker>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(accept(broker.clone(), incoming));
    }
}

/// Completes the handshake of an incoming connection, then serves it on a
/// task of its own: the handshake's state (the incoming packet, among
/// others) is not held for the connection's life in the task's future.
async fn accept(broker: Arc<Broker>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let started = std::time::Instant::now();
    match incoming.await {
        Ok(conn) => {
            crate::metrics::handshake("h3", started.elapsed());
            tokio::spawn(handle_connection(broker, conn));
        }
        // Refused certificates end here, before anything is
        // allocated.
        Err(e) => tracing::info!(%remote, error = %e, "handshake failed"),
    }
}

/// The site identity of a connection, if it presented a valid certificate.
pub fn peer_of(broker: &Broker, conn: &Connection) -> Option<PeerCert> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    tether_pki::tls::peer_identity(&chain, broker.ca.trust_domain()).ok()
}

/// The connection's TLS exporter value that a re-attestation proof signs.
fn exporter(conn: &Connection) -> Option<[u8; tether_pki::reattest::EXPORTER_LEN]> {
    let mut out = [0u8; tether_pki::reattest::EXPORTER_LEN];
    conn.export_keying_material(&mut out, tether_pki::reattest::EXPORTER_LABEL, &[])
        .ok()?;
    Some(out)
}

async fn handle_connection(broker: Arc<Broker>, conn: Connection) {
    let peer = peer_of(&broker, &conn);
    let h3 = Arc::new(Mutex::new(h3::Connection::new(
        h3::Role::Server,
        Settings::default(),
    )));
    let preamble = h3.lock().map(|c| c.control_stream()).unwrap_or_default();
    // Our control stream stays open as long as the connection.
    let mut control = match open_control(&conn, &preamble).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "could not open the control stream");
            return;
        }
    };
    let (settings_tx, settings_rx) = watch::channel(None::<Settings>);
    tokio::spawn(read_uni_streams(conn.clone(), h3.clone(), settings_tx));
    let mut draining = broker.draining();
    // Asked to move only by a request made after the connection opened.
    let mut moves = broker.moves();
    moves.borrow_and_update();
    let mut goaway_sent = false;
    loop {
        let going = async {
            tokio::select! {
                d = draining.wait_for(|d| *d) => d.is_ok(),
                m = moves.changed() => m.is_ok(),
            }
        };
        let accepted = tokio::select! {
            accepted = conn.accept_bi() => accepted,
            going = going, if !goaway_sent => {
                goaway_sent = true;
                if going {
                    // The broker is going away, or cannot prove it holds
                    // the site any more: the site moves its tunnel to
                    // another broker. Requests keep being served until
                    // it has (RFC 9114 section 5.2: the largest ID first).
                    let mut frame = Vec::new();
                    h3::frame::encode_goaway(GOAWAY_ANY, &mut frame);
                    if let Err(e) = control.write_all(&frame).await {
                        tracing::debug!(error = %e, "could not send GOAWAY");
                    }
                }
                continue;
            }
        };
        let (send, recv) = match accepted {
            Ok(s) => s,
            Err(_) => break,
        };
        let (broker, conn, peer, settings) = (
            broker.clone(),
            conn.clone(),
            peer.clone(),
            settings_rx.clone(),
        );
        tokio::spawn(handle_request(broker, conn, peer, settings, send, recv));
    }
}

/// The stream ID of a first GOAWAY: the largest a client request stream
/// can have, so that no request is refused yet.
const GOAWAY_ANY: u64 = (1 << 62) - 4;

async fn open_control(conn: &Connection, preamble: &[u8]) -> anyhow::Result<SendStream> {
    let mut send = conn.open_uni().await?;
    send.write_all(preamble).await?;
    Ok(send)
}

/// Reads the request head.
async fn read_head(recv: &mut RecvStream, dec: &mut MessageDecoder) -> Result<Request, H3Error> {
    loop {
        if let Some(event) = dec.next_event()? {
            return match event {
                MessageEvent::Head(fields) => Request::from_fields(fields),
                _ => Err(H3Error::stream(H3_MESSAGE_ERROR, "request without a head")),
            };
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => dec.push(&chunk.bytes),
            Ok(None) => {
                return Err(dec
                    .finish()
                    .err()
                    .unwrap_or_else(|| H3Error::stream(H3_MESSAGE_ERROR, "empty request")));
            }
            Err(e) => {
                return Err(H3Error::stream(
                    H3_MESSAGE_ERROR,
                    format!("stream failed: {e}"),
                ));
            }
        }
    }
}

/// Reads a request body up to `limit` bytes.
pub async fn read_body(
    recv: &mut RecvStream,
    dec: &mut MessageDecoder,
    limit: usize,
) -> Result<Vec<u8>, H3Error> {
    let mut body = Vec::new();
    loop {
        while let Some(event) = dec.next_event()? {
            if let MessageEvent::Data(data) = event {
                body.extend_from_slice(&data);
                if body.len() > limit {
                    return Err(H3Error::stream(
                        H3_MESSAGE_ERROR,
                        format!("body larger than {limit} bytes"),
                    ));
                }
            }
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => dec.push(&chunk.bytes),
            Ok(None) => {
                dec.finish()?;
                return Ok(body);
            }
            Err(e) => {
                return Err(H3Error::stream(
                    H3_MESSAGE_ERROR,
                    format!("stream failed: {e}"),
                ));
            }
        }
    }
}

/// Answers a body that could not be read: a frame the connection's rules
/// forbid on a request stream (SETTINGS, GOAWAY, ...) closes the connection
/// with its code (RFC 9114 section 7.2.4.1, 9); other errors are a 400.
/// Sends a JSON reply of the site endpoints (enrollment, renewal,
/// re-attestation, broker list, problem reports).
async fn respond_reply(send: &mut SendStream, reply: crate::enroll::Reply) {
    respond(send, reply.status, Some("application/json"), &reply.body).await;
}

async fn refuse_body(conn: &Connection, send: &mut SendStream, e: H3Error) {
    if e.scope == Scope::Connection {
        close_with(conn, &e);
    } else {
        respond_error(send, 400, e.reason).await;
    }
}

async fn handle_request(
    broker: Arc<Broker>,
    conn: Connection,
    peer: Option<PeerCert>,
    settings: watch::Receiver<Option<Settings>>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let mut dec = MessageDecoder::new(MAX_FIELD_SECTION);
    let request = match read_head(&mut recv, &mut dec).await {
        Ok(r) => r,
        Err(e) => {
            if e.scope == Scope::Connection {
                close_with(&conn, &e);
            } else {
                let _ = send.reset(VarInt::from_u64(e.code).unwrap_or(VarInt::from_u32(0x10e)));
            }
            return;
        }
    };
    let kind = classify_request(
        request.method.as_str(),
        request.protocol.as_deref(),
        request.path.as_deref().unwrap_or_default(),
    );
    match kind {
        Ok(RequestKind::ConnectIp) => {
            crate::session::run(broker, conn, peer, settings, request, send, recv, dec).await;
        }
        Ok(kind @ (RequestKind::Enroll | RequestKind::Renew | RequestKind::Reattest)) => {
            let body = match read_body(&mut recv, &mut dec, crate::enroll::MAX_BODY).await {
                Ok(b) => b,
                Err(e) => return refuse_body(&conn, &mut send, e).await,
            };
            let reply = match kind {
                RequestKind::Enroll => crate::enroll::enroll(&broker, &body).await,
                RequestKind::Renew => crate::enroll::renew(&broker, peer, &body).await,
                _ => crate::enroll::reattest(&broker, exporter(&conn), &body).await,
            };
            respond_reply(&mut send, reply).await;
        }
        Ok(RequestKind::Brokers) => {
            let body = match read_body(&mut recv, &mut dec, crate::site_brokers::MAX_BODY).await {
                Ok(b) => b,
                Err(e) => return refuse_body(&conn, &mut send, e).await,
            };
            let reply = crate::site_brokers::brokers(&broker, peer, &body).await;
            respond_reply(&mut send, reply).await;
        }
        Ok(RequestKind::Report) => {
            let body = match read_body(&mut recv, &mut dec, crate::site_report::MAX_BODY).await {
                Ok(b) => b,
                Err(e) => return refuse_body(&conn, &mut send, e).await,
            };
            let reply = crate::site_report::report(&broker, peer, &body);
            respond_reply(&mut send, reply).await;
        }
        Err(refused) => respond_error(&mut send, refused.status, refused.message).await,
    }
    let _ = H3_NO_ERROR;
}

#[cfg(test)]
mod reset_tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// Feeds a broker endpoint (its configuration from a fresh data
    /// directory) one short-header packet of `len` bytes per `(at, from)`,
    /// each with a connection ID the broker issued in a previous life (same
    /// key), and returns how many drew a stateless reset; every reset must
    /// be smaller than its cause.
    fn resets_drawn(packets: impl Iterator<Item = (Instant, SocketAddr)>, len: usize) -> usize {
        let dir = tempfile::tempdir().unwrap();
        let config = Arc::new(endpoint_config(dir.path()).unwrap());
        let mut endpoint = quinn_proto::Endpoint::new(config, None, false, None);
        let key = std::fs::read(dir.path().join(RESET_KEY_FILE)).unwrap();
        let mut ids =
            crate::cid::SignedCids::from_key(u64::from_le_bytes(key[32..40].try_into().unwrap()));
        let mut resets = 0;
        for (at, remote) in packets {
            // A short-header packet: fixed bit, the connection ID, then
            // what looks like an encrypted payload.
            let mut packet = vec![0x41];
            packet.extend_from_slice(&quinn_proto::ConnectionIdGenerator::generate_cid(&mut ids));
            packet.resize(len, 0x5a);
            let mut buf = Vec::new();
            let event = endpoint.handle(
                at,
                remote,
                None,
                None,
                bytes::BytesMut::from(&packet[..]),
                &mut buf,
            );
            if let Some(quinn_proto::DatagramEvent::Response(t)) = event {
                assert!(t.size < packet.len(), "a reset is smaller than its cause");
                resets += 1;
            }
        }
        resets
    }

    /// Packets of connections the broker does not know (its previous life's),
    /// arriving 2 ms apart from different sites: each draws its stateless
    /// reset. At quinn's default pace (20 ms) nine in ten would be ignored
    /// and those sites would wait for a retransmission or their idle
    /// timeout.
    #[test]
    fn every_site_of_a_previous_life_is_reset_without_waiting_its_turn() {
        let start = Instant::now();
        let packets = (0..50u8).map(|i| {
            (
                start + Duration::from_millis(2 * u64::from(i)),
                SocketAddr::from(([192, 0, 2, i], 40_000)),
            )
        });
        assert_eq!(resets_drawn(packets, 120), 50);
    }

    /// Sites whose packets arrive at the same moment (keepalives of
    /// connections opened together, or many sites' traffic) each get their
    /// reset: none is ignored for coming right after another's.
    #[test]
    fn packets_arriving_together_each_draw_a_reset() {
        let now = Instant::now();
        // 200 packets within 200 µs.
        let packets = (0..200u16).map(|i| {
            (
                now + Duration::from_micros(u64::from(i)),
                SocketAddr::from(([192, 0, 2, (i % 250) as u8], 40_000 + i)),
            )
        });
        assert_eq!(resets_drawn(packets, 40), 200);
    }
}

#[cfg(test)]
mod future_sizes {
    //! The futures the broker keeps for each connected site: a Tokio task
    //! allocates its future whole, so every byte of them is held by every
    //! idle site for as long as it stays connected.

    use super::*;

    /// The size of what `f` returns (here: the future of an async fn),
    /// without calling it.
    fn out2<F: FnOnce(A, B) -> R, A, B, R>(_: &F) -> usize {
        std::mem::size_of::<R>()
    }
    fn out3<F: FnOnce(A, B, C) -> R, A, B, C, R>(_: &F) -> usize {
        std::mem::size_of::<R>()
    }
    fn out4<F: FnOnce(A, B, C, D) -> R, A, B, C, D, R>(_: &F) -> usize {
        std::mem::size_of::<R>()
    }
    fn out5<F: FnOnce(A, B, C, D, E) -> R, A, B, C, D, E, R>(_: &F) -> usize {
        std::mem::size_of::<R>()
    }

    /// The most the long-lived futures of one connected site may take
    /// together, in a test (unoptimised) build. Before the session got a
    /// task of its own, its request's future alone took 4,720 bytes here
    /// (about 7 KiB for the five).
    const LIMIT: usize = 4096;

    /// The tasks of an HTTP/3 site's connection that live as long as it:
    /// the connection's (waiting for requests), the reader of the peer's
    /// unidirectional streams and of its control stream, the CONNECT-IP
    /// session, and the session's datagram reader.
    #[test]
    fn a_connected_site_holds_small_futures() {
        let held = [
            ("handle_connection", out2(&handle_connection)),
            (
                "read_uni_streams",
                out3(&tether_shell::h3::read_uni_streams),
            ),
            ("read_uni_stream", out5(&tether_shell::h3::read_uni_stream)),
            ("serve_h3", out5(&crate::session::serve_h3)),
            ("route_datagrams", out4(&crate::session::route_datagrams)),
        ];
        let total: usize = held.iter().map(|(_, size)| size).sum();
        assert!(
            total <= LIMIT,
            "the futures of a connected site take {total} bytes, more than {LIMIT}: {held:?}"
        );
    }

    /// The datagram reader writes its packets to the devices in a future
    /// of its own, boxed while it runs: held inline, that write (the
    /// largest state of the reader's loop) would be kept by every idle
    /// site for as long as it stays connected.
    #[test]
    fn the_datagram_reader_does_not_hold_a_device_write() {
        let reader = out4(&crate::session::route_datagrams);
        let write = out2(&crate::plane::SiteBatch::flush);
        assert!(
            reader < write,
            "the datagram reader's future takes {reader} bytes, a write to the devices {write}"
        );
    }
}
