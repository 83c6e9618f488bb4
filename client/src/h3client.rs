//! The client side of tether's HTTP/3: connect, exchange SETTINGS, send
//! requests. The protocol logic is in [`tether_proto::h3`]; this moves bytes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use quinn::{Connection, RecvStream, SendStream};
use tether_proto::h3::{self, MessageDecoder, MessageEvent, Request, Response, Settings, frame};
use tether_shell::h3::read_uni_streams_with_goaway;
use tokio::sync::watch;

/// ALPN of HTTP/3.
pub const ALPN_H3: &[u8] = b"h3";
/// Largest field section accepted.
pub const MAX_FIELD_SECTION: usize = 16 * 1024;

/// An HTTP/3 connection to a broker.
pub struct H3Client {
    /// The QUIC connection.
    pub conn: Connection,
    settings: watch::Receiver<Option<Settings>>,
    goaway: watch::Receiver<Option<u64>>,
    /// Our control stream: written once, then by heartbeats.
    control: tokio::sync::Mutex<SendStream>,
}

/// The heartbeat on the control stream: a frame of a reserved type
/// (RFC 9114 section 7.2.8, `0x1f * N + 0x21`) with no payload, which the
/// broker ignores and its QUIC acknowledges.
const HEARTBEAT: [u8; 2] = [0x21, 0x00];

/// An HTTP/3 response with its body.
#[derive(Debug)]
pub struct H3Response {
    /// The head.
    pub head: Response,
    /// The body.
    pub body: Vec<u8>,
}

impl H3Client {
    /// Connects to `addr`, authenticating it as `server_name`, and opens
    /// HTTP/3.
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        config: quinn::ClientConfig,
        addr: SocketAddr,
        server_name: &str,
    ) -> anyhow::Result<Self> {
        let conn = endpoint
            .connect_with(config, addr, server_name)
            .context("invalid broker address")?
            .await?;
        Self::over(conn).await
    }

    /// Opens HTTP/3 on an established connection.
    pub async fn over(conn: Connection) -> anyhow::Result<Self> {
        let state = Arc::new(Mutex::new(h3::Connection::new(
            h3::Role::Client,
            Settings::default(),
        )));
        let preamble = state.lock().map(|c| c.control_stream()).unwrap_or_default();
        let mut control = conn.open_uni().await?;
        control.write_all(&preamble).await?;
        let (tx, rx) = watch::channel(None);
        let (goaway_tx, goaway) = watch::channel(None);
        tokio::spawn(read_uni_streams_with_goaway(
            conn.clone(),
            state,
            tx,
            goaway_tx,
        ));
        Ok(Self {
            conn,
            settings: rx,
            goaway,
            control: tokio::sync::Mutex::new(control),
        })
    }

    /// Resolves when the broker sends GOAWAY (it is going away: move), and
    /// never if the connection ends without one.
    pub async fn goaway(&self) {
        let mut goaway = self.goaway.clone();
        if goaway.wait_for(Option::is_some).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Sends a heartbeat that the broker's QUIC acknowledges.
    pub async fn heartbeat(&self) -> anyhow::Result<()> {
        self.control.lock().await.write_all(&HEARTBEAT).await?;
        Ok(())
    }

    /// The UDP datagrams received on this connection so far.
    pub fn received(&self) -> u64 {
        self.conn.stats().udp_rx.datagrams
    }

    /// Waits for the broker's SETTINGS.
    pub async fn peer_settings(&mut self, timeout: Duration) -> anyhow::Result<Settings> {
        let settings = tokio::time::timeout(timeout, self.settings.wait_for(Option::is_some))
            .await
            .context("the broker sent no HTTP/3 SETTINGS")?
            .context("connection closed")?
            .clone();
        settings.context("no settings")
    }

    /// Sends a request head (and body, unless it is a CONNECT) on a new
    /// stream.
    pub async fn send(
        &self,
        request: &Request,
        body: &[u8],
    ) -> anyhow::Result<(SendStream, RecvStream)> {
        let (mut send, recv) = self.conn.open_bi().await?;
        let mut out = Vec::new();
        frame::encode(frame::HEADERS, &request.encode(), &mut out);
        if !body.is_empty() {
            frame::encode_data_header(body.len(), &mut out);
            out.extend_from_slice(body);
        }
        send.write_all(&out).await?;
        if request.method != "CONNECT" {
            send.finish()?;
        }
        Ok((send, recv))
    }

    /// Sends a request and reads the whole response.
    pub async fn request(&self, request: &Request, body: &[u8]) -> anyhow::Result<H3Response> {
        let (_send, mut recv) = self.send(request, body).await?;
        let mut dec = MessageDecoder::new(MAX_FIELD_SECTION);
        let head = read_head(&mut recv, &mut dec).await?;
        let mut body = Vec::new();
        loop {
            while let Some(event) = dec.next_event()? {
                if let MessageEvent::Data(d) = event {
                    body.extend_from_slice(&d);
                }
            }
            match recv.read_chunk(64 * 1024, true).await? {
                Some(chunk) => dec.push(&chunk.bytes),
                None => break,
            }
        }
        dec.finish()?;
        Ok(H3Response { head, body })
    }
}

/// Reads the final response head (skipping informational ones).
pub async fn read_head(
    recv: &mut RecvStream,
    dec: &mut MessageDecoder,
) -> anyhow::Result<Response> {
    loop {
        while let Some(event) = dec.next_event()? {
            if let MessageEvent::Head(fields) = event {
                let head = Response::from_fields(fields)?;
                if head.status >= 200 {
                    return Ok(head);
                }
                dec.expect_final_head();
            }
        }
        match recv.read_chunk(64 * 1024, true).await? {
            Some(chunk) => dec.push(&chunk.bytes),
            None => anyhow::bail!("the broker closed the stream without answering"),
        }
    }
}

/// A QUIC client configuration from a rustls one.
pub fn quic_config(
    mut tls: rustls::ClientConfig,
    transport: quinn::TransportConfig,
) -> anyhow::Result<quinn::ClientConfig> {
    tls.alpn_protocols = vec![ALPN_H3.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .context("TLS configuration unusable for QUIC")?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport));
    Ok(config)
}
