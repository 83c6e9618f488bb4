//! The HTTP/2 tunnel listener on TCP, for sites whose network blocks UDP.
//!
//! The same CONNECT-IP semantics as over HTTP/3, with HTTP/2 extended
//! CONNECT (RFC 8441, `:protocol connect-ip`): the same identity rules
//! (mutual TLS with the same verifier and revocation set), the same
//! enrollment and renewal routes, and the same site addresses. IP packets
//! travel as DATAGRAM capsules (RFC 9297) on the request stream, written by
//! one task per stream so capsules and packets stay in order and a slow
//! connection drops packets instead of queueing them without bound.
//!
//! When the broker starts draining (SIGTERM), or loses its hold on its
//! sites (its fleet lease ran out), every connection gets a
//! graceful GOAWAY (RFC 9113 section 6.8: first with the largest stream
//! ID, then, after a PING round trip, with the last one processed): what is
//! open keeps being served, and the site moves its tunnel to another
//! broker before it leaves this one, as over HTTP/3.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use tether_pki::PeerCert;
use tether_proto::broker::{CloseAction, RequestKind, classify_request};
use tether_proto::limits::SourceBudget;
use tether_proto::tunnel::Transport;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_rustls::TlsAcceptor;

use crate::enroll::Reply;
use crate::session::{Carrier, Ending, Started, close_action};
use crate::sessions::{ConnectionId, SessionLink};
use crate::state::Broker;

/// ALPN of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// Flow-control windows of a stream and of the connection: room for a
/// Gbit/s tunnel across tens of milliseconds.
pub const WINDOW: u32 = 8 << 20;
/// Capsules waiting for the TCP connection, per session. Beyond this,
/// packets to the site are dropped (counted as `queue_full`).
pub const QUEUE: usize = 1024;

/// The budget of connections not yet past a client certificate, shared by
/// the accept loop and the connections; each admitted connection is held
/// with what tells it that it was evicted.
type Budget = Arc<std::sync::Mutex<SourceBudget<oneshot::Sender<()>>>>;

/// A connection counted against the [`Budget`] until it proves its
/// identity or closes.
struct Unauthenticated {
    budget: Budget,
    id: u64,
    /// Resolves when the budget evicted this connection for a newer one
    /// (taken once it has resolved: a oneshot is polled to completion
    /// only once).
    evicted: Option<oneshot::Receiver<()>>,
    _open: crate::metrics::OpenConnection,
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        if let Ok(mut b) = self.budget.lock() {
            b.release(self.id);
        }
    }
}

/// Resolves when `unauthenticated` (if any) was evicted; never without one.
async fn evicted(unauthenticated: &mut Option<Unauthenticated>) {
    let Some(u) = unauthenticated.as_mut() else {
        return std::future::pending().await;
    };
    let Some(told) = u.evicted.as_mut() else {
        return std::future::pending().await;
    };
    let evicted = told.await.is_ok();
    u.evicted = None;
    // A dropped sender (the budget gone) is not an eviction.
    if !evicted {
        std::future::pending::<()>().await;
    }
}

/// Counts and logs the eviction of a connection without a certificate.
fn log_eviction(remote: SocketAddr) {
    crate::metrics::connection_refused("tunnel", "evicted");
    tracing::debug!(%remote, "closing a TCP connection without a site certificate: the oldest, evicted for a newer one");
}

/// The TLS acceptor of the TCP listener: the broker's certificate and the
/// site verifier, exactly as for QUIC, with ALPN `h2`.
pub fn acceptor(broker: &Broker) -> anyhow::Result<TlsAcceptor> {
    let tls = crate::server::tls_config(broker, ALPN_H2)?;
    Ok(TlsAcceptor::from(Arc::new(tls)))
}

/// Binds the TCP listener.
pub fn listener(socket: std::net::TcpListener) -> anyhow::Result<TcpListener> {
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket).context("cannot register the TCP listener")
}

/// Accepts connections until the task is aborted.
pub async fn serve(broker: Arc<Broker>, listener: TcpListener, acceptor: TlsAcceptor) {
    let ids = Arc::new(AtomicU64::new(1));
    let limits = &broker.config.tunnel_limits;
    let budget: Budget = Arc::new(std::sync::Mutex::new(SourceBudget::new(
        limits.max_unauthenticated_per_source,
        limits.max_unauthenticated,
    )));
    let mut backoff = tether_shell::accept::AcceptBackoff::default();
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(a) => {
                backoff.reset();
                a
            }
            Err(e) => {
                // Out of descriptors and the like: wait, do not spin.
                crate::metrics::accept_failed("tunnel");
                backoff.pause("tunnel", &e).await;
                continue;
            }
        };
        let (tell, evicted) = oneshot::channel();
        let admitted = match budget.lock() {
            Ok(mut b) => b.admit(remote.ip(), tell),
            Err(_) => {
                crate::metrics::connection_refused("tunnel", "limit");
                tracing::error!(%remote, "TCP connection closed at once: the budget's lock is poisoned");
                continue;
            }
        };
        let admission = match admitted {
            Ok(a) => {
                // The oldest, evicted to make room, is told to close.
                if let Some((_, tell)) = a.evicted {
                    let _ = tell.send(());
                }
                a.id
            }
            Err(refusal) => {
                crate::metrics::connection_refused("tunnel", refusal.as_str());
                tracing::debug!(%remote, %refusal, "TCP connection closed at once");
                drop(tcp);
                continue;
            }
        };
        let unauthenticated = Unauthenticated {
            budget: budget.clone(),
            id: admission,
            evicted: Some(evicted),
            _open: crate::metrics::OpenConnection::new("tunnel_unauthenticated"),
        };
        let _ = tcp.set_nodelay(true);
        let (broker, acceptor) = (broker.clone(), acceptor.clone());
        let id = ids.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let _open = crate::metrics::OpenConnection::new("tunnel");
            handle_connection(broker, acceptor, tcp, remote, id, unauthenticated).await;
        });
    }
}

/// What the requests of one connection share.
#[derive(Clone)]
struct Conn {
    broker: Arc<Broker>,
    peer: Option<PeerCert>,
    /// The TLS exporter value a re-attestation proof signs.
    exporter: Option<[u8; tether_pki::reattest::EXPORTER_LEN]>,
    remote: SocketAddr,
    id: u64,
    rtt_us: Arc<AtomicU64>,
    /// Raised when the connection is gone.
    gone: watch::Receiver<bool>,
    /// Raise to close the connection.
    close: Arc<watch::Sender<bool>>,
}

async fn handle_connection(
    broker: Arc<Broker>,
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    id: u64,
    unauthenticated: Unauthenticated,
) {
    let started = std::time::Instant::now();
    let limits = broker.config.tunnel_limits.clone();
    let handshake_timeout = limits.handshake_timeout;
    // Until it shows a site certificate, the budget may evict it.
    let mut unauthenticated = Some(unauthenticated);
    let accepted = tokio::select! {
        a = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)) => a,
        () = evicted(&mut unauthenticated) => return log_eviction(remote),
    };
    let tls = match accepted {
        Ok(Ok(tls)) => {
            crate::metrics::handshake("h2", started.elapsed());
            tls
        }
        // Refused certificates end here, before anything is allocated.
        Ok(Err(e)) => return tracing::info!(%remote, error = %e, "TLS handshake failed (TCP)"),
        Err(_) => {
            crate::metrics::connection_refused("tunnel", "deadline");
            return tracing::info!(%remote, "TLS handshake timed out (TCP)");
        }
    };
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| tether_pki::tls::peer_identity(chain, broker.ca.trust_domain()).ok());
    // With a site certificate the connection no longer counts against the
    // budget (sessions bound it) and cannot be evicted.
    if peer.is_some() {
        unauthenticated = None;
    }
    let exporter = tether_pki::reattest::tls_exporter(tls.get_ref().1);
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .max_concurrent_streams(16)
        .max_frame_size(64 * 1024)
        .max_header_list_size(crate::server::MAX_FIELD_SECTION as u32)
        .enable_connect_protocol();
    let handshake = tokio::select! {
        h = tokio::time::timeout(handshake_timeout, builder.handshake(tls)) => h,
        () = evicted(&mut unauthenticated) => return log_eviction(remote),
    };
    let mut h2 = match handshake {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return tracing::debug!(%remote, error = %e, "HTTP/2 handshake failed"),
        Err(_) => {
            crate::metrics::connection_refused("tunnel", "deadline");
            return tracing::debug!(%remote, "HTTP/2 handshake timed out");
        }
    };
    // Without a site certificate it must send its first request within
    // the handshake deadline and ends after `unauthenticated_lifetime`
    // (enrollment needs one request).
    let mut deadline = unauthenticated
        .as_ref()
        .map(|_| tokio::time::Instant::now() + handshake_timeout);
    let (gone_tx, gone) = watch::channel(false);
    let (close_tx, mut close_rx) = watch::channel(false);
    let conn = Conn {
        broker: broker.clone(),
        peer,
        exporter,
        remote,
        id,
        rtt_us: Arc::new(AtomicU64::new(0)),
        gone,
        close: Arc::new(close_tx),
    };
    // PINGs measure the round trip and notice a silent peer: no answer
    // within the idle timeout closes the connection.
    let pinger = h2.ping_pong().map(|mut ping| {
        let (keepalive, idle) = (broker.config.keepalive, broker.config.idle_timeout);
        let (rtt, close) = (conn.rtt_us.clone(), conn.close.clone());
        tokio::spawn(async move {
            loop {
                let sent = Instant::now();
                match tokio::time::timeout(idle, ping.ping(h2::Ping::opaque())).await {
                    Ok(Ok(_)) => {
                        let us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                        rtt.store(us, Ordering::Relaxed);
                    }
                    Ok(Err(_)) => return,
                    Err(_) => {
                        tracing::info!(%remote, "no answer to HTTP/2 PING; closing the connection");
                        let _ = close.send(true);
                        return;
                    }
                }
                tokio::time::sleep(keepalive).await;
            }
        })
    });
    let mut closing = false;
    // Held by each request of this connection being served.
    let in_flight = Arc::new(());
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
        tokio::select! {
            going = going, if !goaway_sent => {
                goaway_sent = true;
                if going && !closing {
                    // The broker is going away, or cannot prove it holds
                    // the site any more (its fleet lease ran out): the
                    // site moves its tunnel to another broker; the open
                    // streams are served until it has, and the connection
                    // ends when none is left.
                    h2.graceful_shutdown();
                }
            }
            request = h2.accept() => match request {
                Some(Ok((request, respond))) => {
                    if unauthenticated.is_some() {
                        deadline = Some(
                            tokio::time::Instant::from_std(started)
                                + limits.unauthenticated_lifetime,
                        );
                    }
                    let conn = conn.clone();
                    let serving = in_flight.clone();
                    tokio::spawn(async move {
                        handle_request(conn, request, respond).await;
                        drop(serving);
                    });
                }
                Some(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "HTTP/2 connection failed");
                    break;
                }
                None => break,
            },
            () = evicted(&mut unauthenticated) => {
                log_eviction(remote);
                // A request in progress (an enrollment spending its code)
                // is finished and answered first; nothing new is taken.
                if Arc::strong_count(&in_flight) == 1 {
                    break;
                }
                h2.graceful_shutdown();
            }
            () = sleep_until_some(deadline) => {
                crate::metrics::connection_refused("tunnel", "deadline");
                tracing::info!(%remote, "closing a TCP connection without a site certificate: past its deadline");
                break;
            }
            changed = close_rx.changed(), if !closing => {
                if changed.is_err() || *close_rx.borrow() {
                    closing = true;
                    h2.abrupt_shutdown(h2::Reason::NO_ERROR);
                }
            }
        }
    }
    if let Some(p) = pinger {
        p.abort();
    }
    let _ = gone_tx.send(true);
}

/// Sleeps until `deadline`, or for ever without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Answers with a JSON body.
fn reply(mut respond: SendResponse<Bytes>, reply: Reply) {
    let response = Response::builder()
        .status(reply.status)
        .header("content-type", "application/json")
        .header("content-length", reply.body.len())
        // Sites (`tether doctor`) compare their clock with it.
        .header(
            "date",
            httpdate::fmt_http_date(std::time::SystemTime::now()),
        )
        .body(());
    let Ok(response) = response else { return };
    if let Ok(mut send) = respond.send_response(response, false) {
        let _ = send.send_data(Bytes::from(reply.body), true);
    }
}

/// Reads a request body up to `limit` bytes.
async fn read_body(body: &mut h2::RecvStream, limit: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| format!("request failed: {e}"))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
        if out.len() > limit {
            return Err(format!("body larger than {limit} bytes"));
        }
    }
    Ok(out)
}

async fn handle_request(
    conn: Conn,
    request: Request<h2::RecvStream>,
    respond: SendResponse<Bytes>,
) {
    let (parts, mut body) = request.into_parts();
    let protocol = parts
        .extensions
        .get::<h2::ext::Protocol>()
        .map(|p| p.as_str().to_string());
    let path = parts.uri.path().to_string();
    match classify_request(parts.method.as_str(), protocol.as_deref(), &path) {
        Ok(RequestKind::ConnectIp) => {
            let full_path = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or(path);
            let header = |name: &str| {
                parts
                    .headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let transport = match header(tether_proto::tunnel::TRANSPORT_HEADER).as_deref() {
                Some("h2-proxy") => Transport::H2Proxy,
                _ => Transport::H2,
            };
            let services = header(tether_proto::tunnel::SERVICES_HEADER);
            tunnel(
                conn,
                &full_path,
                header("capsule-protocol").as_deref(),
                services.as_deref(),
                transport,
                body,
                respond,
            )
            .await;
        }
        Ok(kind @ (RequestKind::Enroll | RequestKind::Renew | RequestKind::Reattest)) => {
            let data = match read_body(&mut body, crate::enroll::MAX_BODY).await {
                Ok(d) => d,
                Err(e) => return reply(respond, Reply::error(400, e)),
            };
            let answer = match kind {
                RequestKind::Enroll => crate::enroll::enroll(&conn.broker, &data).await,
                RequestKind::Renew => {
                    crate::enroll::renew(&conn.broker, conn.peer.clone(), &data).await
                }
                _ => crate::enroll::reattest(&conn.broker, conn.exporter, &data).await,
            };
            reply(respond, answer);
        }
        Ok(RequestKind::Brokers) => {
            let data = match read_body(&mut body, crate::site_brokers::MAX_BODY).await {
                Ok(d) => d,
                Err(e) => return reply(respond, Reply::error(400, e)),
            };
            let answer = crate::site_brokers::brokers(&conn.broker, conn.peer.clone(), &data).await;
            reply(respond, answer);
        }
        Ok(RequestKind::Report) => {
            let data = match read_body(&mut body, crate::site_report::MAX_BODY).await {
                Ok(d) => d,
                Err(e) => return reply(respond, Reply::error(400, e)),
            };
            let answer = crate::site_report::report(&conn.broker, conn.peer.clone(), &data);
            reply(respond, answer);
        }
        Err(refused) => reply(respond, Reply::error(refused.status, refused.message)),
    }
}

/// Serves one CONNECT-IP request over HTTP/2 until the session ends.
async fn tunnel(
    conn: Conn,
    path: &str,
    capsule_protocol: Option<&str>,
    services: Option<&str>,
    transport: Transport,
    body: h2::RecvStream,
    mut respond: SendResponse<Bytes>,
) {
    let connected_at = Instant::now();
    let peer = match crate::session::check(conn.peer.clone(), path, capsule_protocol) {
        Ok(p) => p,
        Err(r) => return reply(respond, Reply::error(r.status, r.message)),
    };
    let services = match crate::session::services(services) {
        Ok(s) => s,
        Err(r) => return reply(respond, Reply::error(r.status, r.message)),
    };
    let (addresses, lans) = match crate::session::allocate(&conn.broker, &peer).await {
        Ok(a) => a,
        Err(r) => return reply(respond, Reply::error(r.status, r.message)),
    };
    let response = Response::builder()
        .status(StatusCode::OK)
        .header("capsule-protocol", "?1")
        .body(());
    let Ok(response) = response else { return };
    let Ok(send) = respond.send_response(response, false) else {
        return;
    };
    let (capsules, queue) = mpsc::channel::<Bytes>(QUEUE);
    let writer = tokio::spawn(tether_shell::h2::write_capsules(send, queue));
    let site = peer.identity.site.clone();
    let link = SessionLink::H2 {
        capsules: capsules.clone(),
        remote: conn.remote,
        id: conn.id,
        rtt_us: conn.rtt_us.clone(),
        transport,
    };
    let mut carrier = Carrier::H2 {
        recv: body,
        capsules,
        gone: conn.gone.clone(),
    };
    let mut started = Started::new(
        &conn.broker,
        peer,
        &addresses,
        &lans,
        link,
        services,
        connected_at,
    );
    let reason = started.serve(&conn.broker, &mut carrier).await;
    drop(carrier);
    match reason {
        Ending::Closed(r) => {
            match close_action(&conn.broker, &site, r, ConnectionId::Tcp(conn.id)) {
                // HTTP/2 carries no code for the connection: it closes.
                CloseAction::CloseConnection { .. } => {
                    let _ = conn.close.send(true);
                }
                // The site's newer session runs on this connection: only
                // this stream ends (dropped unfinished, it is reset).
                CloseAction::ResetStream { .. } => writer.abort(),
            }
        }
        // The writer ends the stream once the last packet queued for it
        // is written.
        Ending::Peer(_) => {}
        // Dropping the stream unfinished resets it.
        Ending::Protocol(_) | Ending::Framing(_) => writer.abort(),
    }
}
