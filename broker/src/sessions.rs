//! The live sessions: each site's tunnel as the forwarding plane and the
//! admin API see it ([`Session`], reached over a [`SessionLink`]), and the
//! map of the current session of each site ([`Sessions`]), kept in step
//! with the broker core by [`crate::core_cell::CoreCell`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;
use tether_pki::{PeerCert, token};
use tether_proto::api::{PathInfo, SessionInfo};
use tether_proto::broker::{CloseReason, SessionId};
use tether_proto::ids::{RegionId, SiteId};
use tether_proto::send_queue::SendWait;
use tether_proto::tunnel::Transport;
use tokio::sync::Notify;

use crate::counters::{Counters, Drops, SiteTotals};

/// How packets reach a site: the connection under its session.
#[derive(Debug)]
pub enum SessionLink {
    /// QUIC datagrams on an HTTP/3 connection.
    H3 {
        /// The QUIC connection.
        conn: quinn::Connection,
        /// The bytes before each IP packet in a datagram: quarter stream ID
        /// and context ID 0.
        prefix: Vec<u8>,
    },
    /// DATAGRAM capsules on an HTTP/2 request stream, written in order by
    /// the stream's writer task.
    H2 {
        /// Encoded capsules to the writer task.
        capsules: tokio::sync::mpsc::Sender<bytes::Bytes>,
        /// The TCP peer (the proxy's address when the site uses one).
        remote: SocketAddr,
        /// Identifies the TCP connection.
        id: u64,
        /// Latest round-trip time of an HTTP/2 PING, in microseconds.
        rtt_us: Arc<AtomicU64>,
        /// Whether the site came through a proxy (known from the
        /// `tether-transport` request header).
        transport: Transport,
    },
}

/// Identifies the connection under a session: a QUIC connection or a TCP
/// connection of the HTTP/2 listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectionId {
    /// A QUIC connection (its `stable_id`).
    Quic(u64),
    /// A TCP connection of the HTTP/2 listener.
    Tcp(u64),
}

impl SessionLink {
    /// The transport.
    pub fn transport(&self) -> Transport {
        match self {
            SessionLink::H3 { .. } => Transport::H3,
            SessionLink::H2 { transport, .. } => *transport,
        }
    }

    /// The peer's address.
    pub fn remote(&self) -> SocketAddr {
        match self {
            SessionLink::H3 { conn, .. } => conn.remote_address(),
            SessionLink::H2 { remote, .. } => *remote,
        }
    }

    /// The round-trip time.
    pub fn rtt(&self) -> Duration {
        match self {
            SessionLink::H3 { conn, .. } => conn.rtt(),
            SessionLink::H2 { rtt_us, .. } => Duration::from_micros(rtt_us.load(Ordering::Relaxed)),
        }
    }

    /// The QUIC path's state as this side sees it (HTTP/3 only).
    pub fn path(&self) -> Option<PathInfo> {
        match self {
            SessionLink::H3 { conn, .. } => {
                let p = conn.stats().path;
                Some(PathInfo {
                    min_rtt_ms: p.min_rtt.as_secs_f64() * 1000.0,
                    cwnd_bytes: p.cwnd,
                    sent_packets: p.sent_packets,
                    lost_packets: p.lost_packets,
                    queued_bytes: tether_shell::quic::DATAGRAM_SEND_BUFFER
                        .saturating_sub(conn.datagram_send_buffer_space())
                        as u64,
                })
            }
            SessionLink::H2 { .. } => None,
        }
    }

    /// The largest IP packet the link carries now.
    pub fn mtu(&self) -> Option<usize> {
        match self {
            SessionLink::H3 { conn, prefix } => conn
                .max_datagram_size()
                .map(|m| m.saturating_sub(prefix.len())),
            SessionLink::H2 { .. } => Some(tether_proto::datagram::STREAM_MTU),
        }
    }

    /// Identifies the underlying connection.
    pub fn connection_id(&self) -> ConnectionId {
        match self {
            SessionLink::H3 { conn, .. } => ConnectionId::Quic(conn.stable_id() as u64),
            SessionLink::H2 { id, .. } => ConnectionId::Tcp(*id),
        }
    }
}

/// A site's live tunnel.
#[derive(Debug)]
pub struct Session {
    /// Its identifier in the broker core.
    pub id: SessionId,
    /// When its request arrived: of two sessions of one site, the later
    /// one wins.
    pub connected_at: Instant,
    /// The verified peer certificate.
    pub peer: PeerCert,
    /// How packets reach the site.
    pub link: SessionLink,
    /// Prefixes the site may send from.
    pub allowed: RwLock<Vec<IpNet>>,
    /// When it connected.
    pub since: SystemTime,
    /// Traffic counters.
    pub counters: Counters,
    /// Why the broker asked the session to end, once it has.
    close: Mutex<Option<CloseReason>>,
    /// Wakes the session's task when `close` is set. Not a `watch`
    /// channel: that allocates about 340 bytes of its own per session,
    /// held by every idle site.
    close_requested: Notify,
    /// TCP services the site announced when it connected (SRV names).
    pub services: Vec<tether_proto::dns::Service>,
    /// Packets of this site dropped, by reason.
    pub drops: Drops,
    /// Whether a sender may wait for room in its full send queue
    /// (touched only when the queue is full).
    pub send_wait: Mutex<SendWait>,
}

impl Session {
    /// A session of `peer` on `link`, connected now, that may send from
    /// `allowed`; its task waits for the broker's request to end it
    /// ([`Session::request_close`]) with [`Session::closed`].
    pub fn new(
        id: SessionId,
        connected_at: Instant,
        peer: PeerCert,
        link: SessionLink,
        allowed: Vec<IpNet>,
        services: Vec<tether_proto::dns::Service>,
    ) -> Self {
        Self {
            id,
            connected_at,
            peer,
            link,
            allowed: RwLock::new(allowed),
            since: SystemTime::now(),
            counters: Counters::default(),
            close: Mutex::new(None),
            close_requested: Notify::new(),
            services,
            drops: Drops::default(),
            send_wait: Mutex::new(SendWait::default()),
        }
    }

    /// The site.
    pub fn site(&self) -> &SiteId {
        &self.peer.identity.site
    }

    /// The site's region.
    pub fn region(&self) -> &RegionId {
        &self.peer.identity.region
    }

    /// The largest IP packet the tunnel carries right now.
    pub fn mtu(&self) -> Option<usize> {
        self.link.mtu()
    }

    /// Asks the session's task to end it.
    pub fn request_close(&self, reason: CloseReason) {
        if let Ok(mut close) = self.close.lock() {
            *close = Some(reason);
        }
        // A permit if the task is not waiting right now: its next wait
        // returns at once.
        self.close_requested.notify_one();
    }

    /// Resolves with the reason once the broker asked the session to end
    /// ([`Session::request_close`]); the latest reason if asked more than
    /// once. For one task to wait on.
    pub async fn closed(&self) -> CloseReason {
        loop {
            if let Some(reason) = self.close.lock().ok().and_then(|c| *c) {
                return reason;
            }
            self.close_requested.notified().await;
        }
    }

    /// Its traffic and drops so far.
    pub fn totals(&self) -> SiteTotals {
        SiteTotals::of(&self.counters, &self.drops)
    }

    /// The admin API's view of it.
    pub fn info(&self) -> SessionInfo {
        SessionInfo {
            site: self.site().clone(),
            region: self.region().clone(),
            transport: self.link.transport().as_str().into(),
            remote: self.link.remote(),
            since: token::unix_secs(self.since),
            rtt_ms: self.link.rtt().as_secs_f64() * 1000.0,
            rx_packets: self.counters.rx.get().0,
            rx_bytes: self.counters.rx.get().1,
            tx_packets: self.counters.tx.get().0,
            tx_bytes: self.counters.tx.get().1,
            mtu: self.mtu(),
            services: self.services.clone(),
            drops: self
                .drops
                .get()
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(r, n)| (r.as_str().to_string(), n))
                .collect(),
            path: self.link.path(),
        }
    }
}

/// The current session of each site. Only the broker core's decisions
/// ([`crate::core_cell::CoreCell`]) add and remove entries; everything else
/// reads.
#[derive(Debug, Default)]
pub struct Sessions(RwLock<HashMap<SiteId, Arc<Session>>>);

impl Sessions {
    /// The current session of a site.
    pub fn get(&self, site: &SiteId) -> Option<Arc<Session>> {
        self.0.read().ok().and_then(|s| s.get(site).cloned())
    }

    /// Every current session.
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.0
            .read()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether no site has a session.
    pub fn is_empty(&self) -> bool {
        self.0.read().map(|s| s.is_empty()).unwrap_or(true)
    }

    /// Makes `session` its site's current one.
    pub(crate) fn insert(&self, session: Arc<Session>) {
        if let Ok(mut s) = self.0.write() {
            s.insert(session.site().clone(), session);
        }
    }

    /// Removes the current session of `site` if `is_it` says it is the one
    /// meant, and returns it.
    pub(crate) fn remove_if(
        &self,
        site: &SiteId,
        is_it: impl FnOnce(&Arc<Session>) -> bool,
    ) -> Option<Arc<Session>> {
        let mut s = self.0.write().ok()?;
        if s.get(site).is_some_and(is_it) {
            s.remove(site)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    use tether_pki::{SiteIdentity, TrustDomain};

    use super::*;

    /// A session on an HTTP/2 link (no QUIC connection needed).
    fn session() -> Session {
        let identity = SiteIdentity::new(
            TrustDomain::new("tether.example.org").unwrap(),
            RegionId::new("eu").unwrap(),
            SiteId::new("site-a").unwrap(),
        );
        let peer = PeerCert {
            identity,
            serial: vec![1],
            not_after: SystemTime::now() + Duration::from_secs(3600),
        };
        let link = SessionLink::H2 {
            capsules: tokio::sync::mpsc::channel(1).0,
            remote: SocketAddr::from(([192, 0, 2, 1], 443)),
            id: 1,
            rtt_us: Arc::new(AtomicU64::new(0)),
            transport: Transport::H2,
        };
        Session::new(SessionId(1), Instant::now(), peer, link, vec![], vec![])
    }

    /// Polls `f` once.
    fn poll_once<F: Future>(f: std::pin::Pin<&mut F>) -> Poll<F::Output> {
        f.poll(&mut Context::from_waker(Waker::noop()))
    }

    /// A close asked for before the task waits is not lost; one asked for
    /// while it waits wakes it; the latest reason is the one seen.
    #[test]
    fn a_close_request_reaches_the_session_task() {
        let s = session();
        s.request_close(CloseReason::Replaced);
        let mut closed = std::pin::pin!(s.closed());
        assert_eq!(
            poll_once(closed.as_mut()),
            Poll::Ready(CloseReason::Replaced)
        );

        let s = session();
        let mut closed = std::pin::pin!(s.closed());
        assert_eq!(poll_once(closed.as_mut()), Poll::Pending);
        s.request_close(CloseReason::Revoked);
        s.request_close(CloseReason::Shutdown);
        assert_eq!(
            poll_once(closed.as_mut()),
            Poll::Ready(CloseReason::Shutdown)
        );

        // A wait abandoned after the request (a select that took another
        // branch) leaves it for the next one.
        let s = session();
        {
            let mut closed = std::pin::pin!(s.closed());
            assert_eq!(poll_once(closed.as_mut()), Poll::Pending);
            s.request_close(CloseReason::CertificateExpired);
        }
        let mut closed = std::pin::pin!(s.closed());
        assert_eq!(
            poll_once(closed.as_mut()),
            Poll::Ready(CloseReason::CertificateExpired)
        );
    }
}
