//! One site's CONNECT-IP session on the broker, whichever HTTP version
//! carries it.
//!
//! Authorization comes first and allocates nothing when it fails: a
//! verified, non-revoked site certificate (401 without one, 403 when the
//! site is revoked or unknown). Then the site's stable addresses are
//! allocated, the request is answered 200, and the session runs: capsules on
//! the request stream go through [`tether_proto::tunnel::BrokerSession`].
//! Over HTTP/3 IP packets arrive as QUIC datagrams on a task of their own;
//! over HTTP/2 they arrive as DATAGRAM capsules on the stream
//! ([`crate::h2server`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ipnet::IpNet;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use tether_pki::PeerCert;
use tether_proto::broker::{CloseAction, CloseReason, Refusal};
use tether_proto::capsule::{Capsule, CapsuleDecoder};
use tether_proto::datagram;
use tether_proto::events::{Disconnect, EventKind, MAX_SERVICES};
use tether_proto::fleet::{Peers, Readmit};
use tether_proto::forward::DropReason;
use tether_proto::h3::error::{H3_MESSAGE_ERROR, H3Error, Scope};
use tether_proto::h3::{MessageDecoder, Request, Response, Settings};
use tether_proto::ids::SiteId;
use tether_proto::tunnel::{BrokerAction, BrokerSession, SERVICES_HEADER};
use tether_shell::h3::{close_with, respond_error, send_data, send_head};
use tokio::sync::watch;

use crate::error::BrokerError;
use crate::plane::SiteBatch;
use crate::sessions::{ConnectionId, Session, SessionLink};
use crate::state::Broker;

/// Refuses a CONNECT-IP request: logged and counted.
fn refuse(status: u16, message: impl Into<String>) -> Refusal {
    let message = message.into();
    crate::metrics::connect_refused(status);
    tracing::info!(status, reason = %message, "CONNECT-IP refused");
    Refusal { status, message }
}

/// Checks a CONNECT-IP request before anything is allocated: the site's
/// certificate, the scope (whole tunnels only) and the Capsule-Protocol
/// header.
pub fn check(
    peer: Option<PeerCert>,
    path: &str,
    capsule_protocol: Option<&str>,
) -> Result<PeerCert, Refusal> {
    tether_proto::broker::authorize(peer.is_some(), path, capsule_protocol)
        .map_err(|r| refuse(r.status, r.message))?;
    peer.ok_or_else(|| refuse(500, "internal error"))
}

/// The services a site announces in its CONNECT-IP request; a list that
/// does not parse, or names more than [`MAX_SERVICES`] services (they
/// travel to every broker in the site's connected event), is refused with
/// 400, before anything is allocated.
pub fn services(header: Option<&str>) -> Result<Vec<tether_proto::dns::Service>, Refusal> {
    let services =
        tether_proto::dns::Service::parse_list(header.unwrap_or_default()).map_err(|e| {
            refuse(
                400,
                format!(
                    "the {SERVICES_HEADER} header is not valid: {e} (write name=port,name=port)"
                ),
            )
        })?;
    if services.len() > MAX_SERVICES {
        return Err(refuse(
            400,
            format!(
                "the {SERVICES_HEADER} header names {} services; a site announces at most {MAX_SERVICES}",
                services.len()
            ),
        ));
    }
    Ok(services)
}

/// How long a connecting site waits for the store's answer about it before
/// a broker on etcd decides from what it last knew
/// ([`allocate_without_the_store`]); shorter than a site's wait for the
/// tunnel (5 s).
const STORE_ANSWER: Duration = Duration::from_secs(2);

/// The site's addresses and LAN mappings, allocated (or found again) for a
/// checked request.
///
/// The site's record is read from the store first (revoked or unknown
/// sites are refused). A broker on etcd that gets no answer in
/// [`STORE_ANSWER`], or whose etcd lease has run out (etcd did not answer
/// its renewals), decides without the store instead.
pub async fn allocate(
    broker: &Arc<Broker>,
    peer: &PeerCert,
) -> Result<(Vec<IpNet>, Vec<IpNet>), Refusal> {
    let site = peer.identity.site.clone();
    let region = peer.identity.region.clone();
    let fleet = broker.fleet().cloned();
    if fleet.as_ref().is_some_and(|f| !f.lease_held()) {
        return allocate_without_the_store(broker, &site, &region, "its lease in etcd ran out")
            .await;
    }
    let b = broker.clone();
    let (s, r) = (site.clone(), region.clone());
    let read = tokio::task::spawn_blocking(move || {
        let record = b.store.site(&s)?;
        Ok::<_, BrokerError>(
            record
                .as_ref()
                .is_some_and(|rec| !rec.revoked && rec.region == r),
        )
    });
    let known = match fleet {
        Some(_) => match tokio::time::timeout(STORE_ANSWER, read).await {
            Ok(Ok(Ok(known))) => known,
            Ok(Ok(Err(e))) => {
                let why = format!("etcd did not answer: {e}");
                return allocate_without_the_store(broker, &site, &region, &why).await;
            }
            Ok(Err(_)) => return Err(refuse(500, "internal error")),
            Err(_) => {
                let why = format!("etcd did not answer within {STORE_ANSWER:?}");
                return allocate_without_the_store(broker, &site, &region, &why).await;
            }
        },
        None => match read.await {
            Ok(Ok(known)) => known,
            Ok(Err(e)) => {
                tracing::warn!(%site, error = %e, "no address for site");
                return Err(refuse(503, format!("no address available: {e}")));
            }
            Err(_) => return Err(refuse(500, "internal error")),
        },
    };
    if !known {
        return Err(refuse(403, "this site is revoked or unknown to the broker"));
    }
    site_addresses(broker, &site, &region).await
}

/// The site's addresses from the broker's cache, for a broker on etcd that
/// cannot reach it (`why`). Only a site this broker held last, as its last
/// view of the fleet says ([`Readmit::Held`]), and whose addresses are in
/// the cached leases, is served: every broker's last view routes it here,
/// nothing is written, and the claim is made when etcd answers again, only
/// where no other broker holds the site meanwhile. A site another broker
/// held, or none, a site that left while the other brokers dropped this
/// one ([`Readmit::Left`]: they reach etcd, it should go to them), and a
/// site that needs a new address, are refused with 503 until etcd answers
/// (see `docs/ha.md`, "When etcd is down").
async fn allocate_without_the_store(
    broker: &Arc<Broker>,
    site: &SiteId,
    region: &tether_proto::ids::RegionId,
    why: &str,
) -> Result<(Vec<IpNet>, Vec<IpNet>), Refusal> {
    let readmit = broker.fleet().map_or(Readmit::NotHeld, |f| {
        f.readmit_offline_with(site, peers(broker))
    });
    let refused = match readmit {
        Readmit::Held if broker.host_addresses(site, region).is_empty() => Some((
            "new_address",
            format!(
                "etcd cannot be reached ({why}) and this site has no address yet; addresses are allocated once etcd answers, try again"
            ),
        )),
        Readmit::Held => None,
        Readmit::HeldElsewhere(holder) => Some((
            "held_elsewhere",
            format!(
                "etcd cannot be reached ({why}) and broker {holder} held this site last; it can move to this broker once etcd answers, try again"
            ),
        )),
        Readmit::NotHeld => Some((
            "not_held",
            format!(
                "etcd cannot be reached ({why}) and this site was not held by this broker; it can connect here once etcd answers, try again"
            ),
        )),
        Readmit::Left => Some((
            "left",
            format!(
                "etcd cannot be reached ({why}) by this broker alone: the other brokers dropped it, and this site left it since; connect to another broker"
            ),
        )),
    };
    crate::metrics::connect_without_store(refused.as_ref().map_or("readmitted", |(r, _)| r));
    if let Some((_, message)) = refused {
        return Err(refuse(503, message));
    }
    tracing::info!(%site, reason = why, "etcd cannot be reached; the site is served again from this broker's last view, where it was held");
    site_addresses(broker, site, region).await
}

/// What the broker-to-broker link says of the other brokers of the last
/// view: whether any still talks to this one.
fn peers(broker: &Broker) -> Peers {
    let peers = broker
        .plane()
        .link()
        .map(|link| link.peers())
        .unwrap_or_default();
    Peers::from_down(peers.iter().map(|p| p.is_down()))
}

/// Allocates (or finds again) the site's addresses in the broker core.
async fn site_addresses(
    broker: &Arc<Broker>,
    site: &SiteId,
    region: &tether_proto::ids::RegionId,
) -> Result<(Vec<IpNet>, Vec<IpNet>), Refusal> {
    let b = broker.clone();
    let (s, r) = (site.clone(), region.clone());
    match tokio::task::spawn_blocking(move || b.site_addresses(&s, &r)).await {
        Ok(Ok(a)) => Ok(a),
        Ok(Err(BrokerError::Revoked(_))) => {
            Err(refuse(403, "this site is revoked or unknown to the broker"))
        }
        Ok(Err(e)) => {
            tracing::warn!(%site, error = %e, "no address for site");
            Err(refuse(503, format!("no address available: {e}")))
        }
        Err(_) => Err(refuse(500, "internal error")),
    }
}

/// Serves one CONNECT-IP request over HTTP/3 until the session ends.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    broker: Arc<Broker>,
    conn: Connection,
    peer: Option<PeerCert>,
    mut settings: watch::Receiver<Option<Settings>>,
    request: Request,
    mut send: SendStream,
    recv: RecvStream,
    dec: MessageDecoder,
) {
    let connected_at = Instant::now();
    let peer = match check(
        peer,
        request.path.as_deref().unwrap_or_default(),
        request.header("capsule-protocol"),
    ) {
        Ok(p) => p,
        Err(r) => return respond_error(&mut send, r.status, r.message).await,
    };
    let peer_settings =
        tokio::time::timeout(Duration::from_secs(3), settings.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|s| s.clone()));
    if !peer_settings.is_some_and(|s| s.h3_datagram) || conn.max_datagram_size().is_none() {
        let r = refuse(
            400,
            "HTTP Datagrams are not enabled (SETTINGS_H3_DATAGRAM and QUIC datagrams are required)",
        );
        return respond_error(&mut send, r.status, r.message).await;
    }
    let services = match services(request.header(SERVICES_HEADER)) {
        Ok(s) => s,
        Err(r) => return respond_error(&mut send, r.status, r.message).await,
    };
    // Read: what follows holds the session for its life, and the request's
    // fields and the peer's SETTINGS need not be held with it.
    drop((request, settings));
    let (addresses, lans) = match allocate(&broker, &peer).await {
        Ok(a) => a,
        Err(r) => return respond_error(&mut send, r.status, r.message).await,
    };
    if send_head(
        &mut send,
        &Response::new(200).with_header("capsule-protocol", "?1"),
    )
    .await
    .is_err()
    {
        return;
    }
    let (stream_id, prefix) = tether_shell::h3::datagram_prefix(&recv);
    let link = SessionLink::H3 {
        conn: conn.clone(),
        prefix,
    };
    let carrier = Carrier::H3 {
        conn: conn.clone(),
        send,
        recv,
        dec,
    };
    let started = Started::new(
        &broker,
        peer,
        &addresses,
        &lans,
        link,
        services,
        connected_at,
    );
    drop((addresses, lans));
    // The session lives on a task of its own: what the request's setup
    // held (the request, the allocation's and the head's futures, this
    // function's arguments) is not carried in the future that every idle
    // site keeps for the session's life.
    tokio::spawn(serve_h3(broker, conn, started, carrier, stream_id));
}

/// Serves an established HTTP/3 session until it ends, then ends its
/// request stream (or the connection) as the ending asks.
pub(crate) async fn serve_h3(
    broker: Arc<Broker>,
    conn: Connection,
    mut started: Started,
    mut carrier: Carrier,
    stream_id: u64,
) {
    let datagrams = tokio::spawn(route_datagrams(
        broker.plane().clone(),
        started.session.clone(),
        conn.clone(),
        stream_id,
    ));
    let reason = started.serve(&broker, &mut carrier).await;
    datagrams.abort();
    let site = started.session.site();
    let Carrier::H3 { mut send, .. } = carrier else {
        return;
    };
    match reason {
        Ending::Closed(r) => {
            match close_action(
                &broker,
                site,
                r,
                ConnectionId::Quic(conn.stable_id() as u64),
            ) {
                CloseAction::CloseConnection { code, reason, .. } => {
                    conn.close(VarInt::from_u64(code).unwrap_or_default(), reason)
                }
                CloseAction::ResetStream { code } => {
                    let _ = send.reset(VarInt::from_u64(code).unwrap_or_default());
                }
            }
        }
        Ending::Peer(_) => {
            let _ = send.finish();
        }
        Ending::Protocol(_) => {
            let _ = send.reset(VarInt::from_u64(H3_MESSAGE_ERROR).unwrap_or_default());
        }
        // A frame that breaks the connection's rules (SETTINGS or another
        // control frame on the request stream) closes the connection with
        // its code (RFC 9114 section 7.2.4.1, 9); others reset the stream.
        Ending::Framing(e) => match e.scope {
            Scope::Connection => close_with(&conn, &e),
            Scope::Stream => {
                let _ = send.reset(VarInt::from_u64(e.code).unwrap_or_default());
            }
        },
    }
}

/// Routes the QUIC datagrams of an HTTP/3 session until its connection
/// ends: its own task, beside the session's loop.
///
/// Datagrams that arrived together are routed together, and the packets
/// among them bound for the local gateway are written in one coalesced
/// batch. The batch's slots are allocated by the first traffic, not up
/// front (4 KiB per session, idle ones included), and its packets are let
/// go once routed, not held until the next batch.
pub async fn route_datagrams(
    plane: Arc<crate::plane::Plane>,
    session: Arc<Session>,
    conn: Connection,
    stream_id: u64,
) {
    let mut reader = tether_shell::quic::DatagramReader::new(conn);
    let mut datagrams = Vec::new();
    while let Ok(dropped) = reader
        .next_batch(&mut datagrams, tun_rs::IDEAL_BATCH_SIZE)
        .await
    {
        if dropped > 0 {
            plane.site_drops(&session, DropReason::TunnelReceiveQueue, dropped);
        }
        let mut batch = plane.take_batch();
        for d in &datagrams {
            plane.route_site_datagram(&session, stream_id, d, &mut batch);
        }
        datagrams.clear();
        if !batch.is_empty() {
            // Boxed: the writes to the devices are the largest state of
            // this loop, which every idle site would otherwise hold in its
            // task for as long as it stays connected.
            Box::pin(batch.flush(&plane)).await;
        }
        plane.give_batch(batch);
    }
}

/// How to end a session the broker closed for `reason`, on the wire: the
/// core's policy ([`CloseReason::action`]), told whether the site's current
/// session runs on `connection` too (a replaced request on a connection the
/// site keeps).
pub fn close_action(
    broker: &Broker,
    site: &SiteId,
    reason: CloseReason,
    connection: ConnectionId,
) -> CloseAction {
    let same_connection = reason == CloseReason::Replaced
        && broker.session(site).map(|s| s.link.connection_id()) == Some(connection);
    reason.action(same_connection)
}

/// The request stream of a session.
pub enum Carrier {
    /// An HTTP/3 request stream; body bytes are HTTP/3 frames.
    H3 {
        /// The connection.
        conn: Connection,
        /// Response side.
        send: SendStream,
        /// Request side.
        recv: RecvStream,
        /// HTTP/3 frames of the request, past the head.
        dec: MessageDecoder,
    },
    /// An HTTP/2 request stream; body bytes are capsules.
    H2 {
        /// The request body.
        recv: h2::RecvStream,
        /// Capsules to the stream's writer task.
        capsules: tokio::sync::mpsc::Sender<Bytes>,
        /// Raised when the TCP connection ends.
        gone: watch::Receiver<bool>,
    },
}

impl Carrier {
    /// Capsule bytes already received, then the next ones; `None` when the
    /// site ended its request.
    async fn read(&mut self) -> Result<Option<Vec<u8>>, Ending> {
        match self {
            Carrier::H3 { recv, dec, .. } => loop {
                let data = dec.take_data().map_err(Ending::Framing)?;
                if !data.is_empty() {
                    return Ok(Some(data));
                }
                match recv.read_chunk(64 * 1024, true).await {
                    Ok(Some(chunk)) => dec.push(&chunk.bytes),
                    Ok(None) => return Ok(None),
                    Err(_) => return Err(Ending::Peer(Disconnect::ConnectionLost)),
                }
            },
            Carrier::H2 { recv, .. } => match recv.data().await {
                Some(Ok(data)) => {
                    let _ = recv.flow_control().release_capacity(data.len());
                    Ok(Some(data.to_vec()))
                }
                Some(Err(_)) => Err(Ending::Peer(Disconnect::ConnectionLost)),
                None => Ok(None),
            },
        }
    }

    /// Writes capsule bytes, in order with the packets.
    async fn write(&mut self, bytes: Vec<u8>) -> Result<(), Ending> {
        match self {
            Carrier::H3 { send, .. } => send_data(send, &bytes)
                .await
                .map_err(|_| Ending::Peer(Disconnect::ConnectionLost)),
            Carrier::H2 { capsules, .. } => capsules
                .send(Bytes::from(bytes))
                .await
                .map_err(|_| Ending::Peer(Disconnect::ConnectionLost)),
        }
    }

    /// What resolves when the connection under the stream is gone.
    fn gone(&self) -> Gone {
        match self {
            Carrier::H3 { conn, .. } => Gone::H3(conn.clone()),
            Carrier::H2 { gone, .. } => Gone::H2(gone.clone()),
        }
    }
}

/// Watches the connection under a session.
enum Gone {
    H3(Connection),
    H2(watch::Receiver<bool>),
}

impl Gone {
    /// Resolves when the connection is gone: why.
    async fn wait(&mut self) -> Disconnect {
        match self {
            Gone::H3(conn) => tokio::select! {
                e = conn.closed() => {
                    tracing::debug!(error = %e, "connection ended");
                    Disconnect::ConnectionLost
                }
                () = tether_shell::quic::path_black_hole(conn) => Disconnect::PathBlackHole,
            },
            Gone::H2(gone) => {
                let _ = gone.wait_for(|g| *g).await;
                Disconnect::ConnectionLost
            }
        }
    }
}

/// A registered session, before its loop runs.
pub struct Started {
    /// The session.
    pub session: Arc<Session>,
    core: BrokerSession,
    /// Whether the broker core took the session (its timeline says it
    /// connected, and will say it disconnected).
    registered: bool,
}

impl Started {
    /// Registers the session of `peer` on `link` with its addresses, for a
    /// request that arrived at `connected_at`. A session the broker core
    /// refuses (revoked meanwhile, or older than the site's current one)
    /// ends as soon as it is served.
    pub fn new(
        broker: &Arc<Broker>,
        peer: PeerCert,
        addresses: &[IpNet],
        lans: &[IpNet],
        link: SessionLink,
        services: Vec<tether_proto::dns::Service>,
        connected_at: Instant,
    ) -> Self {
        let core = BrokerSession::new(addresses, lans);
        let transport = link.transport();
        let remote = link.remote();
        let session = Session::new(
            broker.next_session_id(),
            connected_at,
            peer,
            link,
            core.source_prefixes(),
            services,
        );
        let session = Arc::new(session);
        let registered = match broker.register(session.clone(), addresses) {
            Ok(()) => {
                // The services travel with the event to the other brokers
                // of a fleet, which answer the site's SRV names while the
                // fleet names this broker (`holder`) as the site's owner.
                broker.record_event(
                    session.site(),
                    EventKind::Connected {
                        transport: transport.as_str().into(),
                        remote: remote.to_string(),
                        holder: broker.fleet().and_then(|f| f.id()),
                        services: session.services.clone(),
                    },
                );
                true
            }
            Err(refused) => {
                tracing::info!(site = %session.site(), reason = %refused, "session refused");
                session.request_close(refused.close_reason());
                false
            }
        };
        tracing::info!(
            site = %session.site(),
            region = %session.region(),
            %remote,
            "site connected over {}",
            transport.describe()
        );
        tracing::debug!(site = %session.site(), ?addresses, "site addresses");
        Self {
            session,
            core,
            registered,
        }
    }

    /// Runs the session until it ends; unregisters it and says why.
    pub async fn serve(&mut self, broker: &Arc<Broker>, carrier: &mut Carrier) -> Ending {
        let session = self.session.clone();
        let site = session.site().clone();
        let region = session.region().clone();
        let mut io = SessionIo {
            broker,
            session: &session,
            carrier,
            batch: None,
            routes_refused_logged: None,
        };
        let opening = self.core.open(&broker.reachable_from(&region));
        let mut ended = io.perform(&mut self.core, opening).await.err();
        let mut routes = broker.reachable_changes();
        let mut capsules = CapsuleDecoder::default();
        let mut gone = io.carrier.gone();
        let reason: Ending = loop {
            if let Some(e) = ended.take() {
                break e;
            }
            tokio::select! {
                data = io.carrier.read() => match data {
                    Ok(Some(data)) => {
                        capsules.push(&data);
                        // Boxed: the largest state of the loop, held by
                        // every idle session's future otherwise.
                        ended = Box::pin(io.read_capsules(&mut self.core, &mut capsules))
                            .await
                            .err();
                    }
                    Ok(None) => break Ending::Peer(Disconnect::SiteClosed),
                    Err(e) => break e,
                },
                r = session.closed() => break Ending::Closed(r),
                _ = routes.changed() => {
                    let reachable = io.broker.reachable_from(&region);
                    let advertisement = self.core.advertise(&reachable);
                    ended = io.perform(&mut self.core, vec![advertisement]).await.err();
                }
                why = gone.wait() => {
                    if why == Disconnect::PathBlackHole {
                        tracing::warn!(
                            site = %site,
                            "the site's path stopped carrying full-size packets (its MTU \
                             narrowed below the 1428 bytes HTTP/3 needs?): connection \
                             closed, the site dials again over what the path carries"
                        );
                    }
                    break Ending::Peer(why);
                }
            }
        };
        broker.unregister(&session);
        if self.registered {
            let (reason, detail) = reason.disconnect();
            broker.record_event(&site, EventKind::Disconnected { reason, detail });
        }
        match &reason {
            Ending::Closed(r) => {
                crate::metrics::session_closed(r.as_str());
                tracing::info!(site = %site, reason = r.as_str(), "site disconnected by the broker");
            }
            Ending::Peer(what) => {
                crate::metrics::session_closed(match what {
                    Disconnect::PathBlackHole => "path_black_hole",
                    _ => "peer",
                });
                tracing::info!(site = %site, reason = what.describe(), "site disconnected");
            }
            Ending::Protocol(what) => {
                crate::metrics::session_closed("protocol_error");
                tracing::warn!(site = %site, error = %what, "tunnel protocol error; stream reset");
            }
            Ending::Framing(e) => {
                crate::metrics::session_closed("protocol_error");
                tracing::warn!(site = %site, error = %e, "tunnel stream framing error");
            }
        }
        // Make before break: a session replaced by one on another
        // connection has handed its routes over already; until the site has
        // moved to the newer one (or the drain ends), what it still sends
        // here is routed, and what is queued here is written. The request
        // stream stays open meanwhile, so the site does not take the old
        // tunnel for lost before it has moved. The caller closes the
        // connection afterwards.
        if let Ending::Closed(r) = &reason
            && let CloseAction::CloseConnection { drain, .. } =
                close_action(broker, &site, *r, session.link.connection_id())
            && !drain.is_zero()
        {
            // Boxed: rare, and larger than the session's loop.
            let carried = Box::pin(io.carry_packets(&mut self.core, &mut capsules, &mut gone));
            let _ = tokio::time::timeout(drain, carried).await;
        }
        reason
    }
}

impl Ending {
    /// The reason a site's timeline records, with detail.
    pub fn disconnect(&self) -> (Disconnect, Option<String>) {
        match self {
            Ending::Closed(r) => (Disconnect::from(*r), None),
            Ending::Peer(d) => (*d, None),
            Ending::Protocol(what) => (Disconnect::ProtocolError, Some(what.clone())),
            Ending::Framing(e) => (Disconnect::ProtocolError, Some(e.to_string())),
        }
    }
}

/// Why the session loop ended.
#[derive(Debug)]
pub enum Ending {
    /// The broker ended it.
    Closed(CloseReason),
    /// The site ended it, or its connection was lost.
    Peer(Disconnect),
    /// The site broke the protocol.
    Protocol(String),
    /// The site broke HTTP/3 framing on the request stream; the error says
    /// whether the stream or the whole connection ends.
    Framing(H3Error),
}

struct SessionIo<'a> {
    broker: &'a Arc<Broker>,
    session: &'a Arc<Session>,
    carrier: &'a mut Carrier,
    /// Packets of DATAGRAM capsules bound for a gateway, written together
    /// once every complete capsule of a read is handled.
    batch: Option<Box<SiteBatch>>,
    /// When refused routes of this session were last logged.
    routes_refused_logged: Option<Instant>,
}

/// The least time between two log lines about a session's refused routes.
const ROUTE_REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

impl SessionIo<'_> {
    async fn read_capsules(
        &mut self,
        core: &mut BrokerSession,
        capsules: &mut CapsuleDecoder,
    ) -> Result<(), Ending> {
        self.handle_capsules(core, capsules, false).await
    }

    /// Routes the packets a replaced session's site still sends on its
    /// stream until the connection is gone (over HTTP/2 they are DATAGRAM
    /// capsules on it; over HTTP/3 they are QUIC datagrams, routed by their
    /// own task meanwhile, and the stream carries none). Only packets: the
    /// routes, mappings and answers belong to the newer session now.
    async fn carry_packets(
        &mut self,
        core: &mut BrokerSession,
        capsules: &mut CapsuleDecoder,
        gone: &mut Gone,
    ) {
        let mut reading = true;
        loop {
            tokio::select! {
                data = self.carrier.read(), if reading => match data {
                    Ok(Some(data)) => {
                        capsules.push(&data);
                        reading = self.handle_capsules(core, capsules, true).await.is_ok();
                    }
                    Ok(None) | Err(_) => reading = false,
                },
                _ = gone.wait() => return,
            }
        }
    }

    /// Handles every complete capsule; with `packets_only`, performs only
    /// the routing of their IP packets.
    async fn handle_capsules(
        &mut self,
        core: &mut BrokerSession,
        capsules: &mut CapsuleDecoder,
        packets_only: bool,
    ) -> Result<(), Ending> {
        while let Some(raw) = capsules
            .next_capsule()
            .map_err(|e| Ending::Protocol(e.to_string()))?
        {
            let capsule = Capsule::parse(raw).map_err(|e| Ending::Protocol(e.to_string()))?;
            let mut actions = core.on_capsule(capsule);
            if packets_only {
                actions.retain(|a| matches!(a, BrokerAction::Datagram(_)));
            }
            self.perform(core, actions).await?;
        }
        if let Some(mut batch) = self.batch.take() {
            let plane = self.broker.plane();
            batch.flush(plane).await;
            plane.give_batch(batch);
        }
        Ok(())
    }

    async fn perform(
        &mut self,
        core: &mut BrokerSession,
        actions: Vec<BrokerAction>,
    ) -> Result<(), Ending> {
        let mut queue = std::collections::VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            match action {
                BrokerAction::Send(capsule) => {
                    let mut bytes = Vec::new();
                    capsule
                        .encode(&mut bytes)
                        .map_err(|e| Ending::Protocol(e.to_string()))?;
                    self.carrier.write(bytes).await?;
                }
                BrokerAction::AllocateLan { request_id, lan } => {
                    let (b, site, region) = (
                        self.broker.clone(),
                        self.session.site().clone(),
                        self.session.region().clone(),
                    );
                    let result =
                        tokio::task::spawn_blocking(move || b.map_lan(&site, &region, lan)).await;
                    let mapped = match result {
                        Ok(Ok(prefix)) => Some(prefix),
                        Ok(Err(e)) => {
                            let reason = match &e {
                                crate::error::BrokerError::Ipam(e) => e.lan_refusal_reason(),
                                _ => "other",
                            };
                            crate::metrics::lan_mapping_refused(reason);
                            tracing::info!(site = %self.session.site(), %lan, reason, error = %e, "LAN mapping refused");
                            None
                        }
                        Err(_) => None,
                    };
                    queue.extend(core.on_allocated(request_id, mapped));
                    if let Ok(mut allowed) = self.session.allowed.write() {
                        *allowed = core.source_prefixes();
                    }
                }
                BrokerAction::SetLanRoutes(prefixes) => {
                    self.broker.set_lan_routes(self.session, &prefixes);
                }
                BrokerAction::LansInUse(prefixes) => {
                    let (b, site, region) = (
                        self.broker.clone(),
                        self.session.site().clone(),
                        self.session.region().clone(),
                    );
                    let result =
                        tokio::task::spawn_blocking(move || b.mark_lans(&site, &region, prefixes))
                            .await;
                    if let Ok(Err(e)) = result {
                        tracing::warn!(site = %self.session.site(), error = %e, "could not record which LAN mappings the site uses; it is asked again at its next route advertisement");
                    }
                }
                BrokerAction::RejectedRoutes(refused) => {
                    for (_, reason) in &refused {
                        crate::metrics::route_refused(reason.as_str());
                    }
                    // A site repeating the same advertisement is logged at
                    // most once a minute; the counter has every prefix.
                    let now = Instant::now();
                    if self
                        .routes_refused_logged
                        .is_none_or(|t| now.saturating_duration_since(t) >= ROUTE_REFUSAL_LOG_EVERY)
                    {
                        self.routes_refused_logged = Some(now);
                        if let Some((prefix, reason)) = refused.first() {
                            tracing::info!(
                                site = %self.session.site(),
                                count = refused.len(),
                                "the site advertised routes the broker ignores: {prefix} because {} (and {} more; counted in tether_broker_routes_refused_total, logged at most once a minute)",
                                reason.describe(),
                                refused.len() - 1,
                            );
                        }
                    }
                    tracing::debug!(site = %self.session.site(), ?refused, "ignored routes");
                }
                BrokerAction::Datagram(payload) => {
                    if let Ok(datagram::Payload::IpPacket(packet)) =
                        datagram::parse_payload(&payload)
                    {
                        let plane = self.broker.plane();
                        let batch = self.batch.get_or_insert_with(|| plane.take_batch());
                        plane.route_site_packet(self.session, packet, batch);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_announces_at_most_max_services() {
        let list = |n: usize| {
            (0..n)
                .map(|i| format!("s{i}={}", 1000 + i))
                .collect::<Vec<_>>()
                .join(",")
        };
        assert_eq!(services(None).unwrap(), []);
        assert_eq!(
            services(Some(&list(MAX_SERVICES))).unwrap().len(),
            MAX_SERVICES
        );
        let refused = services(Some(&list(MAX_SERVICES + 1))).unwrap_err();
        assert_eq!(refused.status, 400);
        assert!(
            refused.message.contains("names 33 services"),
            "{}",
            refused.message
        );
        assert_eq!(services(Some("dicom")).unwrap_err().status, 400);
    }
}
