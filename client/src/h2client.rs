//! The client side of HTTP/2 to a broker, over TCP directly or through an
//! HTTP proxy: TLS with ALPN `h2`, extended CONNECT for CONNECT-IP, and
//! plain requests for enrollment and renewal.
//!
//! Every byte read from the broker also passes a
//! [`FrameWatch`](tether_proto::h2::FrameWatch), which tells when the
//! broker sends GOAWAY (it is shutting down) and counts what arrived, for
//! the liveness check; PINGs, every keepalive interval and on each
//! [`H2Client::heartbeat`], measure the round trip.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::{Method, Request};
use rustls::pki_types::ServerName;
use tether_proto::connect_ip;
use tether_proto::h2::FrameWatch;
use tether_proto::tunnel::Transport;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tokio_rustls::TlsConnector;

use crate::dial::Target;
use crate::proxy::Proxy;

/// ALPN of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// Flow-control windows (stream and connection).
pub const WINDOW: u32 = 8 << 20;

/// An HTTP/2 connection to a broker.
pub struct H2Client {
    send: h2::client::SendRequest<Bytes>,
    gone: watch::Receiver<Option<String>>,
    driver: tokio::task::JoinHandle<()>,
    rtt_us: Arc<AtomicU64>,
    /// Bytes read from the broker so far.
    received: Arc<AtomicU64>,
    /// Raised when the broker sent GOAWAY.
    going_away: watch::Receiver<bool>,
    /// Wakes the driver to send a PING now.
    heartbeat: Arc<Notify>,
    /// Direct or through a proxy.
    pub transport: Transport,
    /// The TLS exporter value a re-attestation proof signs.
    pub exporter: Option<[u8; tether_pki::reattest::EXPORTER_LEN]>,
}

impl Drop for H2Client {
    fn drop(&mut self) {
        // The driver owns the socket: stopping it closes the connection.
        self.driver.abort();
    }
}

/// Why an HTTP/2 connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum H2Error {
    /// TCP did not connect.
    #[error("TCP 443: {0}")]
    Tcp(String),
    /// The proxy failed.
    #[error(transparent)]
    Proxy(#[from] crate::proxy::ProxyError),
    /// TLS failed; the text is the explanation.
    #[error("{0}")]
    Tls(String),
    /// The broker refused this site's certificate (expired or revoked).
    #[error("{1}")]
    Certificate(crate::failure::CertRefusal, String),
    /// This host refused the broker's certificate by its own clock, which
    /// is wrong (plain words).
    #[error("{0}")]
    Clock(String),
    /// HTTP/2 failed.
    #[error("HTTP/2: {0}")]
    Http(String),
}

impl H2Error {
    /// Whether the broker refused this site (rather than being unreachable).
    pub fn is_refusal(&self) -> bool {
        matches!(self, H2Error::Tls(t) if crate::failure::tls_refusal(t).is_some())
            || matches!(self, H2Error::Certificate(..) | H2Error::Clock(_))
    }

    /// A TLS failure, with the broker's refusal of this site's certificate
    /// told apart.
    fn tls(e: &dyn std::fmt::Display) -> Self {
        let text = e.to_string();
        if let Some(words) = crate::failure::clock_words(&text) {
            return H2Error::Clock(words);
        }
        match crate::failure::CertRefusal::from_text(&text) {
            Some(refusal) => H2Error::Certificate(refusal, refusal.explain().into()),
            None => H2Error::Tls(explain_tls(&text)),
        }
    }
}

/// Explains a TLS failure in plain words.
fn explain_tls(e: &dyn std::fmt::Display) -> String {
    let text = e.to_string();
    crate::failure::tls_refusal(&text).unwrap_or(text)
}

impl H2Client {
    /// Connects to `target` over TCP (through `proxy` when given), runs TLS
    /// with `tls` and opens HTTP/2.
    pub async fn connect(
        target: &Target,
        mut tls: rustls::ClientConfig,
        proxy: Option<&Proxy>,
        timeout: Duration,
        keepalive: Duration,
    ) -> Result<Self, H2Error> {
        let tcp = match proxy {
            Some(p) => p.connect(target.addr, timeout).await?,
            None => tokio::time::timeout(timeout, TcpStream::connect(target.addr))
                .await
                .map_err(|_| {
                    H2Error::Tcp(format!(
                        "no answer within {} s (is TCP 443 to the published CIDR allowed?)",
                        timeout.as_secs_f64()
                    ))
                })?
                .map_err(|e| H2Error::Tcp(e.to_string()))?,
        };
        let _ = tcp.set_nodelay(true);
        tls.alpn_protocols = vec![ALPN_H2.to_vec()];
        let name = ServerName::try_from(target.server_name.clone())
            .map_err(|e| H2Error::Tls(format!("bad broker name: {e}")))?;
        let tls_stream = tokio::time::timeout(
            timeout,
            TlsConnector::from(Arc::new(tls)).connect(name, tcp),
        )
        .await
        .map_err(|_| H2Error::Tls("no TLS answer in time".into()))?
        .map_err(|e| H2Error::tls(&e))?;
        if tls_stream.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
            return Err(H2Error::Http(
                "the server does not speak HTTP/2 (is this a tether broker?)".into(),
            ));
        }
        let exporter = tether_pki::reattest::tls_exporter(tls_stream.get_ref().1);
        let received = Arc::new(AtomicU64::new(0));
        let (going_tx, going_away) = watch::channel(false);
        let tls_stream = Watched {
            inner: tls_stream,
            watch: FrameWatch::new(),
            received: received.clone(),
            going_away: going_tx,
        };
        let (send, mut conn) = h2::client::Builder::new()
            .initial_window_size(WINDOW)
            .initial_connection_window_size(WINDOW)
            .max_frame_size(64 * 1024)
            .handshake::<_, Bytes>(tls_stream)
            .await
            .map_err(|e| H2Error::tls(&e))?;
        let (gone_tx, gone) = watch::channel(None);
        let rtt_us = Arc::new(AtomicU64::new(0));
        let mut ping = conn.ping_pong();
        let rtt = rtt_us.clone();
        let heartbeat = Arc::new(Notify::new());
        let beat = heartbeat.clone();
        // Drives the connection and PINGs the broker, every keepalive
        // interval and when asked for a heartbeat (one PING at a time:
        // heartbeats asked for meanwhile wait for its answer). No answer
        // within three keepalive intervals means the broker is gone.
        let driver = tokio::spawn(async move {
            let pinger = async {
                let Some(ping) = ping.as_mut() else {
                    return std::future::pending::<String>().await;
                };
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(keepalive) => {}
                        () = beat.notified() => {}
                    }
                    let sent = Instant::now();
                    match tokio::time::timeout(keepalive * 3, ping.ping(h2::Ping::opaque())).await {
                        Ok(Ok(_)) => rtt.store(
                            u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX),
                            Ordering::Relaxed,
                        ),
                        Ok(Err(e)) => return explain_tls(&e),
                        Err(_) => return "the broker stopped answering HTTP/2 PINGs".to_string(),
                    }
                }
            };
            let why = tokio::select! {
                r = &mut conn => match r {
                    Ok(()) => "the broker closed the connection".to_string(),
                    Err(e) => explain_tls(&e),
                },
                why = pinger => why,
            };
            let _ = gone_tx.send(Some(why));
        });
        let client = Self {
            send,
            gone,
            driver,
            rtt_us,
            received,
            going_away,
            heartbeat,
            exporter,
            transport: if proxy.is_some() {
                Transport::H2Proxy
            } else {
                Transport::H2
            },
        };
        Ok(client)
    }

    /// The latest PING round trip.
    pub fn rtt(&self) -> Duration {
        Duration::from_micros(self.rtt_us.load(Ordering::Relaxed))
    }

    /// Sends a PING now (or as soon as the one on its way is answered).
    pub fn heartbeat(&self) {
        self.heartbeat.notify_one();
    }

    /// Bytes read from the broker so far: its answers to PINGs, its own
    /// PINGs, the tunnel's packets and capsules.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Resolves when the broker has sent GOAWAY (it is shutting down; what
    /// is open keeps being served until the site leaves).
    pub async fn goaway(&self) {
        let mut going = self.going_away.clone();
        if going.wait_for(|g| *g).await.is_err() {
            // The connection is gone without a GOAWAY: that is reported
            // as its end.
            std::future::pending::<()>().await;
        }
    }

    /// Resolves with the reason when the connection is gone.
    pub fn gone(&self) -> watch::Receiver<Option<String>> {
        self.gone.clone()
    }

    /// Sends a request with `body` and reads the whole answer.
    pub async fn request(
        &self,
        method: Method,
        authority: &str,
        path: &str,
        body: &[u8],
    ) -> anyhow::Result<crate::failure::Answer> {
        let request = Request::builder()
            .method(method)
            .uri(format!("https://{authority}{path}"))
            .header("content-type", "application/json")
            .body(())?;
        let mut send = self.send.clone().ready().await?;
        let (response, mut stream) = send.send_request(request, body.is_empty())?;
        if !body.is_empty() {
            stream.send_data(Bytes::copy_from_slice(body), true)?;
        }
        let response = response
            .await
            .map_err(|e| anyhow::anyhow!(explain_tls(&e)))?;
        let status = response.status().as_u16();
        let date = response
            .headers()
            .get("date")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut recv = response.into_body();
        let mut out = Vec::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk?;
            let _ = recv.flow_control().release_capacity(chunk.len());
            out.extend_from_slice(&chunk);
            if out.len() > 1 << 20 {
                anyhow::bail!("answer larger than 1 MiB");
            }
        }
        Ok(crate::failure::Answer {
            status,
            date,
            body: out,
        })
    }

    /// Opens CONNECT-IP with extended CONNECT. Returns the status, the
    /// response body stream and, on 200, the request stream to write
    /// capsules on.
    pub async fn connect_ip(
        &self,
        authority: &str,
        timeout: Duration,
        services: Option<&str>,
    ) -> anyhow::Result<(u16, h2::RecvStream, h2::SendStream<Bytes>)> {
        // Extended CONNECT may be used once the broker's SETTINGS allowed
        // it (RFC 8441 section 3); they follow the handshake closely.
        let deadline = Instant::now() + timeout;
        let mut send = self.send.clone().ready().await?;
        while !send.is_extended_connect_protocol_enabled() {
            if Instant::now() > deadline {
                anyhow::bail!(
                    "the broker does not offer extended CONNECT over HTTP/2 (is it a tether broker?)"
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            send = send.ready().await?;
        }
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(format!(
                "https://{authority}{}",
                connect_ip::whole_tunnel_path()
            ))
            .header("capsule-protocol", "?1");
        if let Some(list) = services {
            request = request.header(tether_proto::tunnel::SERVICES_HEADER, list);
        }
        if self.transport == Transport::H2Proxy {
            request = request.header(
                tether_proto::tunnel::TRANSPORT_HEADER,
                self.transport.as_str(),
            );
        }
        let mut request = request.body(())?;
        request
            .extensions_mut()
            .insert(h2::ext::Protocol::from_static(connect_ip::PROTOCOL));
        let (response, stream) = send.send_request(request, false)?;
        let response = tokio::time::timeout(timeout, response)
            .await
            .context("no answer to CONNECT-IP")?
            .map_err(|e| anyhow::anyhow!(explain_tls(&e)))?;
        let status = response.status().as_u16();
        Ok((status, response.into_body(), stream))
    }
}

/// The TLS stream to the broker, with every byte read shown to a
/// [`FrameWatch`].
struct Watched<S> {
    inner: S,
    watch: FrameWatch,
    received: Arc<AtomicU64>,
    going_away: watch::Sender<bool>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && let Some(new) = buf.filled().get(before..)
            && !new.is_empty()
        {
            let this = &mut *self;
            let was_going = this.watch.going_away();
            this.watch.push(new);
            this.received.store(this.watch.bytes(), Ordering::Relaxed);
            if this.watch.going_away() && !was_going {
                this.going_away.send_replace(true);
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads a refusal's body (a JSON error) from an HTTP/2 response.
pub async fn read_error(mut body: h2::RecvStream) -> String {
    let mut out = Vec::new();
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
        if out.len() > 64 * 1024 {
            break;
        }
    }
    serde_json::from_slice::<tether_proto::api::ApiError>(&out)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(&out).to_string())
}
