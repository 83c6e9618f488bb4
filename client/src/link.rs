//! A connection to a broker on one rung of the ladder, and the CONNECT-IP
//! tunnel on it, whichever HTTP version carries it.
//!
//! - [`Dialer`] makes a connection on a given [`Transport`], or to the
//!   first configured broker that answers on a ladder's order.
//! - [`BrokerConn`] sends requests and opens the tunnel on it.
//! - [`Tunnel`] reads the capsules of the tunnel's request stream.
//! - [`TunnelLink`] sends IP packets: QUIC datagrams over HTTP/3, DATAGRAM
//!   capsules on the stream over HTTP/2.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quinn::{Connection, ConnectionError, RecvStream, SendStream, VarInt};
use tether_config::client::ClientConfig;
use tether_proto::api::ApiError;
use tether_proto::connect_ip;
use tether_proto::datagram::{self, MAX_CAPSULE_PREFIX, STREAM_MTU};
use tether_proto::h3::error::H3_REQUEST_REJECTED;
use tether_proto::h3::{MessageDecoder, MessageEvent, Request};
use tether_proto::tunnel::Transport;
use tokio::sync::mpsc;

use crate::dial::{self, Target};
use crate::failure::{Answer, CertRefusal, Failure, tls_refusal};
use crate::h2client::{self, H2Client};
use crate::h3client::{self, H3Client};
use crate::proxy::Proxy;
use crate::state_dir::StateDir;

/// Capsules waiting for the TCP connection (HTTP/2). Beyond this, packets
/// from the site are dropped as a router drops on a full queue.
pub const QUEUE: usize = 1024;

/// Whether the broker closed a QUIC connection because it refuses this
/// site.
fn quic_is_refusal(e: &ConnectionError) -> bool {
    match e {
        // TLS alerts travel as QUIC crypto errors 0x100-0x1ff.
        ConnectionError::TransportError(t) => (0x100..0x200).contains(&u64::from(t.code)),
        ConnectionError::ConnectionClosed(c) => (0x100..0x200).contains(&u64::from(c.error_code)),
        ConnectionError::ApplicationClosed(c) => u64::from(c.error_code) == H3_REQUEST_REJECTED,
        _ => false,
    }
}

/// Explains a failed QUIC handshake or a closed connection in plain words.
pub fn explain_quic(e: &ConnectionError) -> String {
    let text = e.to_string();
    // Alerts the broker sent; this side's own (a transport error) are told
    // by their text, which says what was wrong with the broker's
    // certificate (a clock off, say).
    let alert = |code: u64| matches!(e, ConnectionError::ConnectionClosed(c) if u64::from(c.error_code) == 0x100 + code);
    if alert(44) {
        CertRefusal::Revoked.explain().into()
    } else if alert(45) {
        CertRefusal::Expired.explain().into()
    } else if alert(48) {
        "the broker and this site do not share a CA (wrong broker, enrolled elsewhere, or the deployment's CA was rotated and the old one retired while this site was away: enroll again with a new code)".into()
    } else if let Some(plain) = tls_refusal(&text) {
        plain
    } else if matches!(e, ConnectionError::TimedOut) {
        "no answer (is UDP 443 to the published CIDR allowed by the firewall?)".into()
    } else if let ConnectionError::ApplicationClosed(c) = e {
        String::from_utf8_lossy(&c.reason).to_string()
    } else {
        text
    }
}

/// The broker's refusal of this site's certificate, when the broker closed
/// the QUIC connection with the TLS alert that says so (a transport error
/// is this side's own verdict, on the broker's certificate).
fn quic_cert_refusal(e: &ConnectionError) -> Option<CertRefusal> {
    match e {
        ConnectionError::ConnectionClosed(c) => u64::from(c.error_code)
            .checked_sub(0x100)
            .and_then(CertRefusal::from_alert),
        _ => None,
    }
}

/// A failed QUIC handshake or connection as a [`Failure`].
fn quic_error(e: &ConnectionError) -> Failure {
    Failure {
        refused: quic_is_refusal(e),
        message: explain_quic(e),
        certificate: quic_cert_refusal(e),
        path_too_small: false,
        clock: crate::failure::clock_words(&e.to_string()),
    }
}

/// The failure of an established QUIC connection: its close reason when
/// it has one (a refusal often surfaces first as a failed stream), else
/// `e`.
pub fn quic_failure(conn: &Connection, e: impl std::fmt::Display) -> Failure {
    match conn.close_reason() {
        Some(reason) if quic_is_refusal(&reason) => quic_error(&reason),
        Some(reason) => Failure::lost(explain_lost(&reason)),
        None => Failure::lost(e.to_string()),
    }
}

/// Why a connection that was up ended, in plain words. A timeout here is
/// the broker falling silent, not a firewall that never let the handshake
/// through (the hint [`explain_quic`] gives a failed dial).
fn explain_lost(e: &ConnectionError) -> String {
    match e {
        ConnectionError::TimedOut => "the broker stopped answering: nothing heard from it \
             for the idle timeout (it went away, or the path to it is down)"
            .into(),
        ConnectionError::Reset => "the broker no longer knows this connection \
             (stateless reset): it restarted"
            .into(),
        other => explain_quic(other),
    }
}

/// Makes connections to brokers.
#[derive(Clone)]
pub struct Dialer {
    /// TLS for the site (its certificate, the pinned CA).
    pub tls: rustls::ClientConfig,
    /// QUIC transport settings.
    pub quic: quinn::ClientConfig,
    /// The proxy for [`Transport::H2Proxy`].
    pub proxy: Option<Proxy>,
    /// How long each attempt may take.
    pub timeout: Duration,
    /// Keepalive interval.
    pub keepalive: Duration,
    /// The brokers whose path needed the narrow packets.
    pub narrow_paths: NarrowPaths,
}

/// The brokers whose path carried HTTP/3 only with the narrow packets
/// ([`tether_shell::quic::NARROW_UDP_PAYLOAD`]) at the last dial, shared by
/// the dialers of one agent. The next HTTP/3 dial to one of them starts
/// with the narrow packets instead of waiting out a silent full-size
/// handshake first, and a full-size probe beside it forgets the broker
/// once its path carries the full size again (the next connection then
/// uses it).
#[derive(Debug, Clone, Default)]
pub struct NarrowPaths(Arc<Mutex<HashSet<SocketAddr>>>);

impl NarrowPaths {
    /// The most brokers remembered: more than a site is configured with.
    const MAX: usize = 64;

    fn contains(&self, addr: &SocketAddr) -> bool {
        self.0.lock().is_ok_and(|s| s.contains(addr))
    }

    fn remember(&self, addr: SocketAddr) {
        if let Ok(mut s) = self.0.lock()
            && s.len() < Self::MAX
        {
            s.insert(addr);
        }
    }

    fn forget(&self, addr: &SocketAddr) {
        if let Ok(mut s) = self.0.lock() {
            s.remove(addr);
        }
    }
}

/// Why HTTP/3 to `addr` failed when only the small QUIC probe was answered.
fn path_too_small(addr: std::net::SocketAddr, timeout: Duration) -> String {
    format!(
        "HTTP/3 to {addr}: the QUIC handshake got no answer within {} s, yet the broker answers a {}-byte QUIC packet: the path carries less than the {} bytes of UDP payload the HTTP/3 tunnel needs, and less than the {} of its narrow form (which still carries IPv6's 1280-byte minimum inside), so HTTP/3 is not used on this path (HTTP/2 over TCP adapts to it)",
        timeout.as_secs_f64(),
        tether_proto::quic_probe::PROBE_LEN,
        tether_shell::quic::TUNNEL_UDP_PAYLOAD,
        tether_shell::quic::NARROW_UDP_PAYLOAD,
    )
}

/// What the agent says when HTTP/3 to `addr` runs with the narrow packet
/// size.
fn narrow_path(addr: std::net::SocketAddr) -> String {
    format!(
        "HTTP/3 to {addr}: the path carries less than the {} bytes of UDP payload of the tunnel's full-size packets but carries {}: this connection uses {}-byte packets (a smaller tunnel MTU; something on the path, a VPN or PPPoE link, has a small MTU)",
        tether_shell::quic::TUNNEL_UDP_PAYLOAD,
        tether_shell::quic::NARROW_UDP_PAYLOAD,
        tether_shell::quic::NARROW_UDP_PAYLOAD,
    )
}

/// The QUIC transport of a site's connection with packets of
/// `udp_payload` bytes: silence for two keepalive intervals (and a
/// margin) means the broker is gone; a restarted broker resets the
/// connection sooner.
fn site_transport(keepalive: Duration, udp_payload: u16) -> quinn::TransportConfig {
    tether_shell::quic::transport_config_sized(
        keepalive,
        keepalive * 2 + Duration::from_secs(2),
        udp_payload,
    )
}

/// A path probe running beside a handshake; aborted when dropped.
struct Probe(tokio::task::JoinHandle<bool>);

impl Probe {
    /// Whether the probe was answered (waits for its verdict).
    async fn answered(mut self) -> bool {
        (&mut self.0).await.unwrap_or(false)
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a QUIC handshake ended.
enum Handshake {
    Done(quinn::Connection),
    Failed(ConnectionError),
    /// No answer within the timeout.
    Silent,
}

impl Dialer {
    /// A QUIC handshake with `target` from `endpoint` with `config`.
    async fn handshake(
        &self,
        endpoint: &quinn::Endpoint,
        config: quinn::ClientConfig,
        target: &Target,
    ) -> Result<Handshake, Failure> {
        let connecting = endpoint
            .connect_with(config, target.addr, &target.server_name)
            .map_err(|e| Failure::lost(format!("invalid broker address: {e}")))?;
        Ok(match tokio::time::timeout(self.timeout, connecting).await {
            Ok(Ok(conn)) => Handshake::Done(conn),
            Ok(Err(e)) => Handshake::Failed(e),
            Err(_) => Handshake::Silent,
        })
    }

    /// HTTP/3 on a connection just made: the broker's SETTINGS must offer
    /// CONNECT-IP with HTTP Datagrams.
    async fn h3_over(
        &self,
        conn: quinn::Connection,
        endpoint: quinn::Endpoint,
        narrow: bool,
    ) -> Result<BrokerConn, Failure> {
        let mut client = H3Client::over(conn.clone())
            .await
            .map_err(|e| quic_failure(&conn, e))?;
        match client.peer_settings(self.timeout).await {
            Ok(s) if s.enable_connect_protocol && s.h3_datagram => {}
            Ok(_) => {
                return Err(Failure::refused(
                    "the broker does not offer CONNECT-IP with HTTP Datagrams",
                ));
            }
            Err(e) => return Err(quic_failure(&conn, e)),
        }
        Ok(BrokerConn::H3 {
            client,
            endpoint,
            narrow,
        })
    }

    /// HTTP/3 to `target` with the narrow packets; `None` when the
    /// handshake got no answer.
    async fn narrow_dial(&self, target: &Target) -> Result<Option<BrokerConn>, Failure> {
        use tether_shell::quic::NARROW_UDP_PAYLOAD;
        let config = h3client::quic_config(
            self.tls.clone(),
            site_transport(self.keepalive, NARROW_UDP_PAYLOAD),
        )
        .map_err(|e| Failure::lost(format!("{e:#}")))?;
        let endpoint = dial::client_endpoint_sized(&target.addr, NARROW_UDP_PAYLOAD)
            .map_err(|e| Failure::lost(format!("no UDP socket: {e}")))?;
        match self.handshake(&endpoint, config, target).await? {
            Handshake::Done(conn) => {
                tracing::warn!("{}", narrow_path(target.addr));
                self.h3_over(conn, endpoint, true).await.map(Some)
            }
            Handshake::Failed(e) => Err(quic_error(&e)),
            Handshake::Silent => Ok(None),
        }
    }

    /// Connects to `target` on `transport`.
    pub async fn dial(&self, transport: Transport, target: &Target) -> Result<BrokerConn, Failure> {
        match transport {
            Transport::H3 => {
                use tether_shell::quic::{NARROW_UDP_PAYLOAD, TUNNEL_UDP_PAYLOAD};
                // A QUIC packet of `len` bytes beside the handshake: whether
                // the path carries that size. (Aborted when dropped: a dial
                // given up ends its probes.)
                let probe = |len: usize| {
                    Probe(tokio::spawn(dial::answers_quic_of(
                        target.addr,
                        len,
                        self.timeout,
                    )))
                };
                if self.narrow_paths.contains(&target.addr) {
                    // The path needed the narrow packets last time: dial
                    // with them at once, and see beside it whether it
                    // carries the full size again.
                    tracing::info!(
                        broker = %target.addr,
                        "dialing with {NARROW_UDP_PAYLOAD}-byte packets, which the path needed at the last connection"
                    );
                    let full = probe(usize::from(TUNNEL_UDP_PAYLOAD));
                    if let Some(conn) = self.narrow_dial(target).await? {
                        let (paths, addr) = (self.narrow_paths.clone(), target.addr);
                        tokio::spawn(async move {
                            if full.answered().await {
                                paths.forget(&addr);
                                tracing::info!(
                                    broker = %addr,
                                    "the path carries {TUNNEL_UDP_PAYLOAD}-byte QUIC packets again: the next connection uses them"
                                );
                            }
                        });
                        return Ok(conn);
                    }
                    // Silent: the path changed; look at it afresh.
                    self.narrow_paths.forget(&target.addr);
                }
                let endpoint = dial::client_endpoint(&target.addr)
                    .map_err(|e| Failure::lost(format!("no UDP socket: {e}")))?;
                // Alongside the handshake, two small QUIC packets: QUIC's
                // minimum, and the narrow tunnel's size. If only they are
                // answered, the path loses the tunnel's full-size packets;
                // the narrow one answered, it carries the narrow tunnel.
                let (small, narrow) = (
                    probe(tether_proto::quic_probe::PROBE_LEN),
                    probe(usize::from(NARROW_UDP_PAYLOAD)),
                );
                match self.handshake(&endpoint, self.quic.clone(), target).await? {
                    Handshake::Done(conn) => return self.h3_over(conn, endpoint, false).await,
                    Handshake::Failed(e) => return Err(quic_error(&e)),
                    Handshake::Silent => {}
                }
                if !small.answered().await {
                    return Err(Failure::lost(format!(
                        "no answer within {} s (is UDP 443 to the published CIDR allowed?)",
                        self.timeout.as_secs_f64()
                    )));
                }
                if narrow.answered().await {
                    if let Some(conn) = self.narrow_dial(target).await? {
                        self.narrow_paths.remember(target.addr);
                        return Ok(conn);
                    }
                    tracing::info!(
                        broker = %target.addr,
                        "the path answered a {NARROW_UDP_PAYLOAD}-byte QUIC packet but not a handshake with packets of that size"
                    );
                }
                Err(Failure {
                    path_too_small: true,
                    ..Failure::lost(path_too_small(target.addr, self.timeout))
                })
            }
            Transport::H2 | Transport::H2Proxy => {
                let proxy = match transport {
                    Transport::H2Proxy => Some(
                        self.proxy
                            .as_ref()
                            .ok_or_else(|| Failure::lost("no proxy configured"))?,
                    ),
                    _ => None,
                };
                H2Client::connect(
                    target,
                    self.tls.clone(),
                    proxy,
                    self.timeout,
                    self.keepalive,
                )
                .await
                .map(BrokerConn::H2)
                .map_err(|e| match e {
                    crate::h2client::H2Error::Certificate(refusal, _) => {
                        Failure::certificate(refusal)
                    }
                    crate::h2client::H2Error::Clock(words) => Failure {
                        clock: Some(words.clone()),
                        ..Failure::refused(words)
                    },
                    e => Failure {
                        refused: e.is_refusal(),
                        message: e.to_string(),
                        certificate: None,
                        path_too_small: false,
                        clock: None,
                    },
                })
            }
        }
    }
}

impl Dialer {
    /// The first connection that works: each transport of `order` in turn,
    /// every target on it. A refusal stops the search (another transport
    /// would be refused too). `errors` are earlier problems to report with
    /// the failures.
    pub async fn first(
        &self,
        order: &[Transport],
        targets: &[Target],
        mut errors: Vec<String>,
    ) -> Result<(BrokerConn, Target), Failure> {
        for &transport in order {
            for target in targets {
                match self.dial(transport, target).await {
                    Ok(conn) => return Ok((conn, target.clone())),
                    Err(f) => {
                        if f.path_too_small {
                            tracing::warn!("{f}");
                        }
                        errors.push(format!(
                            "{} over {}: {f}",
                            target.addr,
                            transport.describe()
                        ));
                        if f.refused {
                            return Err(Failure {
                                certificate: f.certificate,
                                clock: f.clock,
                                ..Failure::refused(errors.join("; "))
                            });
                        }
                    }
                }
            }
        }
        Err(Failure::lost(errors.join("; ")))
    }
}

impl Dialer {
    /// A dialer for `tether up`: the site's current certificate, its
    /// configured keepalive and timeout.
    pub fn for_site(
        config: &ClientConfig,
        state: &StateDir,
        proxy: Option<Proxy>,
    ) -> anyhow::Result<Self> {
        Self::with_identity(config, state, proxy, true, 0)
    }

    /// This dialer, remembering narrow paths in `paths` (shared with
    /// the agent's other dialers) instead of its own.
    pub fn remembering(self, paths: NarrowPaths) -> Self {
        Self {
            narrow_paths: paths,
            ..self
        }
    }

    /// As [`for_site`](Self::for_site), judging the broker's certificate
    /// by this host's clock taken as `offset_secs` off its real time: how
    /// the agent dials on a host whose clock is wrong (tests).
    pub fn for_site_with_clock(
        config: &ClientConfig,
        state: &StateDir,
        offset_secs: i64,
    ) -> anyhow::Result<Self> {
        Self::with_identity(config, state, None, true, offset_secs)
    }

    /// As [`for_site`](Self::for_site), but presenting no certificate: for
    /// re-attestation, which the broker serves only without one.
    pub fn for_reattestation(
        config: &ClientConfig,
        state: &StateDir,
        proxy: Option<Proxy>,
    ) -> anyhow::Result<Self> {
        Self::with_identity(config, state, proxy, false, 0)
    }

    fn with_identity(
        config: &ClientConfig,
        state: &StateDir,
        proxy: Option<Proxy>,
        present: bool,
        clock_offset_secs: i64,
    ) -> anyhow::Result<Self> {
        let creds = state.credentials()?;
        let identity = present.then_some((creds.chain, creds.key));
        let tls =
            tether_pki::tls::client_config_trusting(&creds.bundle, identity, clock_offset_secs)?;
        let quic = h3client::quic_config(
            tls.clone(),
            site_transport(config.keepalive, tether_shell::quic::TUNNEL_UDP_PAYLOAD),
        )?;
        Ok(Self {
            tls,
            quic,
            proxy,
            timeout: config.h3_timeout,
            keepalive: config.keepalive,
            narrow_paths: NarrowPaths::default(),
        })
    }

    /// Connects to the first of the configured brokers that answers,
    /// climbing `order`: every broker on one rung before the next rung.
    pub async fn connect(
        &self,
        config: &ClientConfig,
        order: &[Transport],
    ) -> Result<(BrokerConn, Target), Failure> {
        let mut targets = Vec::new();
        let mut errors = Vec::new();
        for endpoint in &config.brokers {
            match dial::resolve(endpoint, config.published_cidr).await {
                Ok(t) => targets.extend(t),
                Err(e) => errors.push(e.to_string()),
            }
        }
        self.first(order, &targets, errors).await
    }
}

/// A connection to a broker.
pub enum BrokerConn {
    /// HTTP/3 over QUIC.
    H3 {
        /// The HTTP/3 client.
        client: H3Client,
        /// Its UDP endpoint.
        endpoint: quinn::Endpoint,
        /// Whether the connection uses the narrow packet size
        /// ([`tether_shell::quic::NARROW_UDP_PAYLOAD`]): the path did not
        /// carry the full size.
        narrow: bool,
    },
    /// HTTP/2 over TCP (maybe through a proxy).
    H2(H2Client),
}

impl BrokerConn {
    /// Its transport.
    pub fn transport(&self) -> Transport {
        match self {
            BrokerConn::H3 { .. } => Transport::H3,
            BrokerConn::H2(c) => c.transport,
        }
    }

    /// The connection's TLS exporter value that a re-attestation proof
    /// signs ([`tether_pki::reattest::EXPORTER_LABEL`]).
    pub fn exporter(&self) -> Option<[u8; tether_pki::reattest::EXPORTER_LEN]> {
        match self {
            BrokerConn::H3 { client, .. } => {
                let mut out = [0u8; tether_pki::reattest::EXPORTER_LEN];
                client
                    .conn
                    .export_keying_material(&mut out, tether_pki::reattest::EXPORTER_LABEL, &[])
                    .ok()?;
                Some(out)
            }
            BrokerConn::H2(c) => c.exporter,
        }
    }

    /// The round-trip time.
    pub fn rtt(&self) -> Duration {
        match self {
            BrokerConn::H3 { client, .. } => client.conn.rtt(),
            BrokerConn::H2(c) => c.rtt(),
        }
    }

    /// Sends a request and reads the whole answer: status and body.
    pub async fn request(
        &self,
        method: &str,
        authority: &str,
        path: &str,
        body: &[u8],
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let answer = self.exchange(method, authority, path, body).await?;
        Ok((answer.status, answer.body))
    }

    /// Sends a request and reads the whole answer.
    pub async fn exchange(
        &self,
        method: &str,
        authority: &str,
        path: &str,
        body: &[u8],
    ) -> anyhow::Result<Answer> {
        match self {
            BrokerConn::H3 { client, .. } => {
                let request = Request::new(method, authority, path)
                    .with_header("content-type", "application/json");
                let answer = client
                    .request(&request, body)
                    .await
                    .map_err(|e| anyhow::anyhow!("{}", quic_failure(&client.conn, e)))?;
                Ok(Answer {
                    status: answer.head.status,
                    date: answer.head.header("date").map(str::to_string),
                    body: answer.body,
                })
            }
            BrokerConn::H2(c) => {
                let method = http::Method::from_bytes(method.as_bytes())?;
                c.request(method, authority, path, body).await
            }
        }
    }

    /// Opens the CONNECT-IP tunnel.
    pub async fn open_tunnel(
        &self,
        authority: &str,
        timeout: Duration,
        services: &[tether_proto::dns::Service],
    ) -> Result<(Tunnel, TunnelLink), Failure> {
        let services =
            (!services.is_empty()).then(|| tether_proto::dns::Service::format_list(services));
        match self {
            BrokerConn::H3 { client, .. } => {
                let conn = &client.conn;
                let mut request = connect_ip::request(authority);
                if let Some(list) = &services {
                    request = request.with_header(tether_proto::tunnel::SERVICES_HEADER, list);
                }
                let (send, mut recv) = client
                    .send(&request, &[])
                    .await
                    .map_err(|e| quic_failure(conn, e))?;
                let mut dec = MessageDecoder::new(h3client::MAX_FIELD_SECTION);
                let head = h3client::read_head(&mut recv, &mut dec)
                    .await
                    .map_err(|e| quic_failure(conn, e))?;
                if head.status != 200 {
                    let mut body = Vec::new();
                    loop {
                        while let Ok(Some(MessageEvent::Data(d))) = dec.next_event() {
                            body.extend_from_slice(&d);
                        }
                        match recv.read_chunk(64 * 1024, true).await {
                            Ok(Some(chunk)) => dec.push(&chunk.bytes),
                            _ => break,
                        }
                    }
                    let message = serde_json::from_slice::<ApiError>(&body)
                        .map(|e| e.error)
                        .unwrap_or_default();
                    return Err(Failure::refused(format!("HTTP {}: {message}", head.status)));
                }
                let (stream_id, prefix) = tether_shell::h3::datagram_prefix(&recv);
                Ok((
                    Tunnel::H3 { send, recv, dec },
                    TunnelLink::H3 {
                        conn: conn.clone(),
                        stream_id,
                        prefix: prefix.into(),
                    },
                ))
            }
            BrokerConn::H2(c) => {
                let (status, body, stream) = c
                    .connect_ip(authority, timeout, services.as_deref())
                    .await
                    .map_err(|e| {
                        let text = format!("{e:#}");
                        match tls_refusal(&text) {
                            Some(plain) => Failure::refused(plain),
                            None => Failure::lost(text),
                        }
                    })?;
                if status != 200 {
                    let message = h2client::read_error(body).await;
                    return Err(Failure::refused(format!("HTTP {status}: {message}")));
                }
                let (capsules, queue) = mpsc::channel(QUEUE);
                let writer = tokio::spawn(tether_shell::h2::write_capsules(stream, queue));
                Ok((
                    Tunnel::H2 { recv: body, writer },
                    TunnelLink::H2 { capsules },
                ))
            }
        }
    }

    /// Sends a heartbeat the broker answers: a reserved frame on the
    /// HTTP/3 control stream, which QUIC acknowledges, or an HTTP/2 PING.
    pub async fn heartbeat(&self) {
        match self {
            BrokerConn::H3 { client, .. } => {
                if let Err(e) = client.heartbeat().await {
                    tracing::debug!("cannot send a heartbeat: {e:#}");
                }
            }
            BrokerConn::H2(c) => c.heartbeat(),
        }
    }

    /// What the connection has received so far: UDP datagrams over
    /// HTTP/3, bytes over HTTP/2.
    pub fn received(&self) -> Option<u64> {
        match self {
            BrokerConn::H3 { client, .. } => Some(client.received()),
            BrokerConn::H2(c) => Some(c.received()),
        }
    }

    /// Resolves when the broker says it is going away (HTTP/3 or HTTP/2
    /// GOAWAY): it still serves the tunnel, but the site should move.
    pub async fn goaway(&self) {
        match self {
            BrokerConn::H3 { client, .. } => client.goaway().await,
            BrokerConn::H2(c) => c.goaway().await,
        }
    }

    /// Closes the connection (the broker ends the session at once).
    pub fn close(&self, reason: &str) {
        match self {
            BrokerConn::H3 { client, .. } => client
                .conn
                .close(VarInt::from_u32(0x100), reason.as_bytes()),
            // Dropping the client closes the TCP connection.
            BrokerConn::H2(_) => {}
        }
    }

    /// Resolves with the reason when the connection is gone.
    pub async fn closed(&self) -> Failure {
        match self {
            BrokerConn::H3 { client, .. } => {
                use tether_shell::quic::PATH_BLACK_HOLE_REASON;
                tokio::select! {
                    e = client.conn.closed() => quic_failure(&client.conn, e),
                    () = tether_shell::quic::path_black_hole(&client.conn) => {
                        Failure::lost(format!(
                            "{PATH_BLACK_HOLE_REASON} (the path's MTU narrowed below what \
                             this connection's packets need?)"
                        ))
                    }
                }
            }
            BrokerConn::H2(c) => {
                let mut gone = c.gone();
                match gone.wait_for(Option::is_some).await {
                    Ok(why) => {
                        let why = why.clone().unwrap_or_default();
                        match tls_refusal(&why) {
                            Some(plain) => Failure::refused(plain),
                            None => Failure::lost(why),
                        }
                    }
                    Err(_) => Failure::lost("the connection ended"),
                }
            }
        }
    }

    /// Waits (up to 2 s) until a close has reached the broker.
    pub async fn drain(&self) {
        if let BrokerConn::H3 { endpoint, .. } = self {
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        }
    }
}

/// The request stream of a tunnel.
pub enum Tunnel {
    /// HTTP/3: frames on a QUIC stream.
    H3 {
        /// The request stream: kept open for the tunnel's lifetime, and
        /// carries the site's capsules.
        send: SendStream,
        /// The response stream.
        recv: RecvStream,
        /// Its HTTP/3 frames, past the head.
        dec: MessageDecoder,
    },
    /// HTTP/2: the response body.
    H2 {
        /// The response body.
        recv: h2::RecvStream,
        /// The task writing capsules to the request stream.
        writer: tokio::task::JoinHandle<()>,
    },
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        if let Tunnel::H2 { writer, .. } = self {
            writer.abort();
        }
    }
}

impl Tunnel {
    /// Sends an encoded capsule on the request stream (over HTTP/2 through
    /// `link`'s writer, which owns the stream).
    pub async fn send_capsule(
        &mut self,
        link: &TunnelLink,
        capsule: Vec<u8>,
    ) -> Result<(), String> {
        match (self, link) {
            (Tunnel::H3 { send, .. }, _) => {
                let mut out = Vec::with_capacity(capsule.len() + 9);
                tether_proto::h3::frame::encode_data_header(capsule.len(), &mut out);
                out.extend_from_slice(&capsule);
                send.write_all(&out).await.map_err(|e| e.to_string())
            }
            (Tunnel::H2 { .. }, TunnelLink::H2 { capsules }) => capsules
                .send(Bytes::from(capsule))
                .await
                .map_err(|_| "the tunnel is closed".to_string()),
            (Tunnel::H2 { .. }, TunnelLink::H3 { .. }) => {
                Err("an HTTP/2 tunnel with an HTTP/3 link".to_string())
            }
        }
    }

    /// Capsule bytes already received, then the next ones; `None` when the
    /// broker ended the tunnel.
    pub async fn read(&mut self) -> Result<Option<Vec<u8>>, String> {
        match self {
            Tunnel::H3 { recv, dec, .. } => loop {
                let data = dec.take_data().map_err(|e| e.to_string())?;
                if !data.is_empty() {
                    return Ok(Some(data));
                }
                match recv.read_chunk(64 * 1024, true).await {
                    Ok(Some(chunk)) => dec.push(&chunk.bytes),
                    Ok(None) => return Ok(None),
                    Err(e) => return Err(e.to_string()),
                }
            },
            Tunnel::H2 { recv, .. } => match recv.data().await {
                Some(Ok(data)) => {
                    let _ = recv.flow_control().release_capacity(data.len());
                    Ok(Some(data.to_vec()))
                }
                Some(Err(e)) => Err(e.to_string()),
                None => Ok(None),
            },
        }
    }
}

/// Sends IP packets into the tunnel.
#[derive(Clone)]
pub enum TunnelLink {
    /// QUIC datagrams.
    H3 {
        /// The connection.
        conn: Connection,
        /// The CONNECT-IP stream.
        stream_id: u64,
        /// Quarter stream ID and context ID.
        prefix: Arc<[u8]>,
    },
    /// DATAGRAM capsules to the stream's writer task.
    H2 {
        /// The writer's queue.
        capsules: mpsc::Sender<Bytes>,
    },
}

/// The link is gone: stop sending.
#[derive(Debug)]
pub struct LinkGone;

impl TunnelLink {
    /// The largest IP packet the link carries now.
    pub fn mtu(&self) -> Option<u16> {
        match self {
            TunnelLink::H3 { conn, prefix, .. } => conn
                .max_datagram_size()
                .map(|m| m.saturating_sub(prefix.len()))
                .and_then(|m| u16::try_from(m).ok()),
            TunnelLink::H2 { .. } => u16::try_from(STREAM_MTU).ok(),
        }
    }

    /// Room to leave in front of a packet for [`TunnelLink::send`].
    pub fn headroom(&self) -> usize {
        match self {
            TunnelLink::H3 { prefix, .. } => prefix.len(),
            TunnelLink::H2 { .. } => MAX_CAPSULE_PREFIX,
        }
    }

    /// Sends the packet at `buf[headroom..]`, writing the framing into the
    /// headroom. A packet the link cannot take now is dropped (over HTTP/3,
    /// a full send queue drops its oldest packet for this one).
    pub fn send(&self, buf: &mut [u8]) -> Result<(), LinkGone> {
        let Some(packet) = self.frame(buf) else {
            return Ok(());
        };
        match self {
            TunnelLink::H3 { conn, .. } => match conn.send_datagram(packet) {
                Err(quinn::SendDatagramError::ConnectionLost(_)) => Err(LinkGone),
                _ => Ok(()),
            },
            TunnelLink::H2 { capsules } => match capsules.try_send(packet) {
                Err(mpsc::error::TrySendError::Closed(_)) => Err(LinkGone),
                _ => Ok(()),
            },
        }
    }

    /// Like [`TunnelLink::send`], but over HTTP/3 a full send queue makes
    /// this wait for room (nothing waiting in it is dropped): the device is
    /// then read no faster than the connection sends, and packets wait in
    /// the kernel's queue of the device, in front of the local senders.
    pub async fn send_wait(&self, buf: &mut [u8]) -> Result<(), LinkGone> {
        match self {
            TunnelLink::H3 { conn, .. } => {
                let Some(packet) = self.frame(buf) else {
                    return Ok(());
                };
                match conn.send_datagram_wait(packet).await {
                    Err(quinn::SendDatagramError::ConnectionLost(_)) => Err(LinkGone),
                    _ => Ok(()),
                }
            }
            TunnelLink::H2 { .. } => self.send(buf),
        }
    }

    /// The packet at `buf[headroom..]` with its framing written into the
    /// headroom, as one datagram or capsule.
    fn frame(&self, buf: &mut [u8]) -> Option<Bytes> {
        let headroom = self.headroom();
        match self {
            TunnelLink::H3 { prefix, .. } => {
                buf.get_mut(..headroom)?.copy_from_slice(prefix);
                Some(Bytes::copy_from_slice(buf))
            }
            TunnelLink::H2 { .. } => {
                let len = buf.len().saturating_sub(headroom);
                let (prefix, n) = datagram::capsule_prefix(len);
                let start = headroom.checked_sub(n)?;
                buf.get_mut(start..headroom)?
                    .copy_from_slice(prefix.get(..n)?);
                Some(Bytes::copy_from_slice(buf.get(start..)?))
            }
        }
    }
}

/// A broker connection for one-off requests (enrollment): HTTP/3, then
/// HTTP/2, then HTTP/2 through `dialer.proxy`.
pub async fn dial_any(dialer: &Dialer, targets: &[Target]) -> anyhow::Result<(BrokerConn, Target)> {
    let order: Vec<Transport> = Transport::ALL
        .into_iter()
        .filter(|t| *t != Transport::H2Proxy || dialer.proxy.is_some())
        .collect();
    dialer
        .first(&order, targets, Vec::new())
        .await
        .map_err(|f| anyhow::anyhow!("cannot reach the broker: {f}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_connection_is_not_blamed_on_the_firewall() {
        // A dial that timed out: the firewall is the likely cause.
        assert!(explain_quic(&ConnectionError::TimedOut).contains("UDP 443"));
        // A connection that was up and fell silent, or was reset by a
        // restarted broker: say so.
        let silent = explain_lost(&ConnectionError::TimedOut);
        assert!(silent.contains("stopped answering"), "{silent}");
        assert!(!silent.contains("firewall"), "{silent}");
        assert!(explain_lost(&ConnectionError::Reset).contains("restarted"));
        // Everything else reads as before.
        assert_eq!(
            explain_lost(&ConnectionError::LocallyClosed),
            explain_quic(&ConnectionError::LocallyClosed)
        );
    }
}
