//! One site's CONNECT-IP session on the broker.
//!
//! Authorization comes first and allocates nothing when it fails: a
//! verified, non-revoked site certificate (401 without one, 403 when the
//! site is revoked or unknown). Then the site's stable addresses are
//! allocated, the request is answered 200, and the session runs: capsules on
//! the request stream go through [`tether_proto::tunnel::BrokerSession`],
//! IP packets arrive as QUIC datagrams on a task of their own.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use quinn::{Connection, RecvStream, SendStream, VarInt};
use tether_pki::PeerCert;
use tether_proto::capsule::{Capsule, CapsuleDecoder};
use tether_proto::connect_ip::Scope;
use tether_proto::h3::error::{H3_MESSAGE_ERROR, H3_NO_ERROR, H3_REQUEST_REJECTED};
use tether_proto::h3::{MessageDecoder, MessageEvent, Request, Response, Settings};
use tether_proto::tunnel::{BrokerAction, BrokerSession};
use tether_proto::{datagram, varint};
use tokio::sync::watch;

use crate::plane;
use crate::server::{respond_error, send_data, send_head};
use crate::state::{Broker, CloseReason, Counters, Session};

async fn refuse(send: &mut SendStream, status: u16, message: &str) {
    crate::metrics::connect_refused(status);
    tracing::info!(status, reason = message, "CONNECT-IP refused");
    respond_error(send, status, message).await;
}

/// Serves one CONNECT-IP request until the session ends.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    broker: Arc<Broker>,
    conn: Connection,
    peer: Option<PeerCert>,
    mut settings: watch::Receiver<Option<Settings>>,
    request: Request,
    mut send: SendStream,
    mut recv: RecvStream,
    dec: MessageDecoder,
) {
    let Some(peer) = peer else {
        return refuse(
            &mut send,
            401,
            "a site certificate is required: enroll this site first (tether enroll)",
        )
        .await;
    };
    match Scope::from_path(request.path.as_deref().unwrap_or_default()) {
        Ok(scope) if scope.is_any() => {}
        Ok(_) => {
            return refuse(
                &mut send,
                400,
                "tether serves whole tunnels only: /.well-known/masque/ip/*/*/",
            )
            .await;
        }
        Err(e) => return refuse(&mut send, 400, &e.to_string()).await,
    }
    if request
        .header("capsule-protocol")
        .is_some_and(|v| v != "?1")
    {
        return refuse(&mut send, 400, "Capsule-Protocol must be ?1").await;
    }
    let peer_settings =
        tokio::time::timeout(Duration::from_secs(3), settings.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|s| s.clone()));
    if !peer_settings.is_some_and(|s| s.h3_datagram) || conn.max_datagram_size().is_none() {
        return refuse(
            &mut send,
            400,
            "HTTP Datagrams are not enabled (SETTINGS_H3_DATAGRAM and QUIC datagrams are required)",
        )
        .await;
    }

    let site = peer.identity.site.clone();
    let region = peer.identity.region.clone();
    let b = broker.clone();
    let (s, r) = (site.clone(), region.clone());
    let allocated = tokio::task::spawn_blocking(move || {
        let record = b.store.site(&s)?;
        if record
            .as_ref()
            .is_none_or(|rec| rec.revoked || rec.region != r)
        {
            return Ok(None);
        }
        b.site_addresses(&s, &r).map(Some)
    })
    .await;
    let (addresses, lans) = match allocated {
        Ok(Ok(Some(a))) => a,
        Ok(Ok(None)) => {
            return refuse(
                &mut send,
                403,
                "this site is revoked or unknown to the broker",
            )
            .await;
        }
        Ok(Err(e)) => {
            tracing::warn!(%site, error = %e, "no address for site");
            return refuse(&mut send, 503, &format!("no address available: {e}")).await;
        }
        Err(_) => return refuse(&mut send, 500, "internal error").await,
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
    let stream_id = VarInt::from(recv.id()).into_inner();
    let mut prefix = Vec::with_capacity(9);
    let _ = varint::encode(stream_id / 4, &mut prefix);
    prefix.push(datagram::IP_PACKET_CONTEXT as u8);
    let mut core = BrokerSession::new(&addresses, &lans);
    let (close_tx, mut close_rx) = watch::channel(None);
    let session = Arc::new(Session {
        peer: peer.clone(),
        conn: conn.clone(),
        stream_id,
        datagram_prefix: prefix,
        allowed: RwLock::new(core.source_prefixes()),
        since: SystemTime::now(),
        counters: Counters::default(),
        close: close_tx,
    });
    broker.register(session.clone(), &addresses);
    tracing::info!(site = %site, region = %region, remote = %conn.remote_address(), "site connected over HTTP/3");
    tracing::debug!(site = %site, ?addresses, "site addresses");

    let reachable = broker.reachable_from(&region);
    let mut io = SessionIo {
        broker: &broker,
        session: &session,
        send: &mut send,
    };
    let opening = core.open(&reachable);
    let mut ended = io.perform(&mut core, opening).await.err();

    let datagrams = {
        let (broker, session) = (broker.clone(), session.clone());
        tokio::spawn(async move {
            use futures_util::FutureExt;
            // Datagrams that arrived together are routed together, and the
            // packets among them bound for the local gateway are written in
            // one coalesced batch.
            while let Ok(first) = session.conn.read_datagram().await {
                let mut batch = plane::take_batch(&broker);
                plane::from_site_batched(&broker, &session, &first, &mut batch);
                for _ in 1..tun_rs::IDEAL_BATCH_SIZE {
                    match session.conn.read_datagram().now_or_never() {
                        Some(Ok(d)) => plane::from_site_batched(&broker, &session, &d, &mut batch),
                        _ => break,
                    }
                }
                batch.flush(&broker).await;
                plane::give_batch(&broker, batch);
            }
        })
    };
    let mut routes = broker.routes_version.subscribe();
    let expiry = tokio::time::sleep(
        peer.not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    );
    tokio::pin!(expiry);
    let mut dec = dec;
    let mut capsules = CapsuleDecoder::default();
    // Capsules that arrived right behind the request head are already in
    // `dec`.
    if ended.is_none() {
        ended = io
            .read_capsules(&mut core, &mut dec, &mut capsules)
            .await
            .err();
    }
    let reason: Ending = loop {
        if let Some(e) = ended.take() {
            break e;
        }
        tokio::select! {
            chunk = recv.read_chunk(64 * 1024, true) => match chunk {
                Ok(Some(chunk)) => {
                    dec.push(&chunk.bytes);
                    ended = io.read_capsules(&mut core, &mut dec, &mut capsules).await.err();
                }
                Ok(None) => break Ending::Peer("site closed the tunnel"),
                Err(_) => break Ending::Peer("tunnel stream failed"),
            },
            _ = close_rx.changed() => match *close_rx.borrow() {
                Some(r) => break Ending::Closed(r),
                None => continue,
            },
            _ = routes.changed() => {
                let reachable = io.broker.reachable_from(&region);
                let advertisement = core.advertise(&reachable);
                ended = io.perform(&mut core, vec![advertisement]).await.err();
            }
            _ = &mut expiry => break Ending::Closed(CloseReason::CertificateExpired),
            e = conn.closed() => {
                tracing::debug!(site = %site, error = %e, "connection ended");
                break Ending::Peer("connection lost");
            }
        }
    };
    datagrams.abort();
    broker.unregister(&session);
    match reason {
        Ending::Closed(r) => {
            crate::metrics::session_closed(r.as_str());
            tracing::info!(site = %site, reason = r.as_str(), "site disconnected by the broker");
            match r {
                CloseReason::Revoked => conn.close(
                    VarInt::from_u64(H3_REQUEST_REJECTED).unwrap_or_default(),
                    b"site certificate revoked",
                ),
                CloseReason::CertificateExpired => conn.close(
                    VarInt::from_u64(H3_NO_ERROR).unwrap_or_default(),
                    b"site certificate expired",
                ),
                CloseReason::Shutdown => conn.close(
                    VarInt::from_u64(H3_NO_ERROR).unwrap_or_default(),
                    b"broker shutting down",
                ),
                CloseReason::Replaced => {
                    // The site reconnected: close the old connection unless
                    // the new session runs on the same one.
                    let newer = broker.session(&site).map(|s| s.conn.stable_id());
                    if newer != Some(conn.stable_id()) {
                        conn.close(
                            VarInt::from_u64(H3_NO_ERROR).unwrap_or_default(),
                            b"replaced by a newer connection",
                        );
                    } else {
                        let _ = send.reset(VarInt::from_u32(0x10c));
                    }
                }
            }
        }
        Ending::Peer(what) => {
            crate::metrics::session_closed("peer");
            tracing::info!(site = %site, reason = what, "site disconnected");
            let _ = send.finish();
        }
        Ending::Protocol(what) => {
            crate::metrics::session_closed("protocol_error");
            tracing::warn!(site = %site, error = %what, "tunnel protocol error; stream reset");
            let _ = send.reset(VarInt::from_u64(H3_MESSAGE_ERROR).unwrap_or_default());
        }
    }
}

/// Why the session loop ended.
enum Ending {
    Closed(CloseReason),
    Peer(&'static str),
    Protocol(String),
}

struct SessionIo<'a> {
    broker: &'a Arc<Broker>,
    session: &'a Arc<Session>,
    send: &'a mut SendStream,
}

impl SessionIo<'_> {
    async fn read_capsules(
        &mut self,
        core: &mut BrokerSession,
        dec: &mut MessageDecoder,
        capsules: &mut CapsuleDecoder,
    ) -> Result<(), Ending> {
        while let Some(event) = dec
            .next_event()
            .map_err(|e| Ending::Protocol(e.to_string()))?
        {
            if let MessageEvent::Data(data) = event {
                capsules.push(&data);
            }
        }
        while let Some(raw) = capsules
            .next_capsule()
            .map_err(|e| Ending::Protocol(e.to_string()))?
        {
            let capsule = Capsule::parse(raw).map_err(|e| Ending::Protocol(e.to_string()))?;
            let actions = core.on_capsule(capsule);
            self.perform(core, actions).await?;
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
                    send_data(self.send, &bytes)
                        .await
                        .map_err(|_| Ending::Peer("tunnel stream failed"))?;
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
                            tracing::info!(site = %self.session.site(), error = %e, "LAN mapping refused");
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
                    self.broker.set_lan_routes(
                        self.session.site(),
                        self.session.region(),
                        &prefixes,
                    );
                }
                BrokerAction::RejectedRoutes(prefixes) => {
                    tracing::info!(site = %self.session.site(), count = prefixes.len(), "ignored routes the site does not own");
                    tracing::debug!(site = %self.session.site(), ?prefixes, "ignored routes");
                }
                BrokerAction::Datagram(payload) => {
                    if let Ok(datagram::Payload::IpPacket(packet)) =
                        datagram::parse_payload(&payload)
                    {
                        plane::from_site_packet(self.broker, self.session, packet);
                    }
                }
            }
        }
        Ok(())
    }
}
