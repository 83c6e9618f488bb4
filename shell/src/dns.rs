//! The authoritative DNS server for the mesh zone (hickory-server), run by
//! the gateway inside the backend network and by the broker.
//!
//! The answers come from [`tether_proto::dns::Zone`]; this shell owns the
//! sockets and brings the zone up to date whenever the data changes: only
//! the records of the sites that differ are replaced, on a blocking thread
//! (not a runtime worker), while queries go on being answered. Messages that
//! do not parse get FORMERR (over UDP from hickory-server itself); anything
//! but one standard query gets FORMERR or REFUSED here. DNS over TCP is
//! served here rather than by hickory-server, whose accept loop retries
//! failed accepts at once and caps no connections.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use hickory_proto::op::{Metadata, ResponseCode};
use hickory_proto::rr::Name;
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tether_proto::dns::{self, Zone, ZoneData, ZoneUpdate};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::accept::{AcceptBackoff, ConnectionLimit};

/// How long a TCP client may stay silent.
const TCP_TIMEOUT: Duration = Duration::from_secs(10);
/// Most DNS-over-TCP connections open at once per address (clients only
/// use TCP after a truncated answer, or for large answers).
const TCP_MAX_CONNECTIONS: usize = 128;

/// The zone queries are answered from (`None` until the first one).
type ZoneCell = Arc<RwLock<Option<Zone>>>;

/// Brings `cell` to `next`: the sites that differ are re-indexed while
/// queries are answered from the zone as it was, then applied under the
/// write lock (a few records); a zone whose name, TTL or pools changed is
/// built beside the current one and swapped in. Blocking: it compares
/// every site of the two lists.
fn refresh(cell: &RwLock<Option<Zone>>, next: Option<Arc<ZoneData>>, ns: &[IpAddr]) {
    let Some(next) = next else {
        *cell.write().unwrap_or_else(PoisonError::into_inner) = None;
        return;
    };
    // A panic while a zone was changed leaves it half changed: build anew.
    let poisoned = cell.is_poisoned();
    cell.clear_poison();
    let plan = match &*cell.read().unwrap_or_else(PoisonError::into_inner) {
        Some(zone) if !poisoned => zone.plan(next.clone()),
        _ => ZoneUpdate::Rebuild(next.clone()),
    };
    let done = match plan {
        ZoneUpdate::Rebuild(data) => match Zone::new(data, ns) {
            Ok(zone) => {
                *cell.write().unwrap_or_else(PoisonError::into_inner) = Some(zone);
                Ok(None)
            }
            Err(e) => Err(e),
        },
        plan => {
            let mut zone = cell.write().unwrap_or_else(PoisonError::into_inner);
            match zone.as_mut() {
                Some(z) => z.apply(plan).map(Some),
                None => Ok(None),
            }
        }
    };
    match done {
        Ok(done) => tracing::debug!(
            serial = next.serial,
            sites = next.sites.len(),
            reindexed_sites = done.map_or(next.sites.len(), |d| d.sites),
            "mesh zone updated"
        ),
        Err(e) => {
            tracing::error!(error = %e, "cannot serve the mesh zone");
            *cell.write().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }
}

/// Answers queries from the current zone.
#[derive(Clone)]
pub struct Handler {
    zone: ZoneCell,
    /// Counts answers by response code (the broker's metrics); none on the
    /// gateway.
    on_answer: Option<Arc<dyn Fn(ResponseCode) + Send + Sync>>,
}

impl Handler {
    /// Runs `f` with the current zone (under its read lock: never held
    /// across an await).
    fn with_zone<T>(&self, f: impl FnOnce(Option<&Zone>) -> T) -> T {
        let zone = self.zone.read().unwrap_or_else(PoisonError::into_inner);
        f(zone.as_ref())
    }

    /// Counts an answer's code.
    fn count(&self, code: ResponseCode) {
        if let Some(count) = &self.on_answer {
            count(code);
        }
    }

    /// The answer to one DNS message received over TCP, encoded; `None`
    /// for what gets no answer (not a query, or not even a header).
    fn answer_bytes(&self, query: &[u8]) -> Option<Vec<u8>> {
        self.with_zone(|zone| dns::answer_message(zone, query, |code| self.count(code)))
    }

    /// Answers the DNS messages of one TCP connection (RFC 7766: each
    /// message after its two-byte length) until the client closes it, stays
    /// silent for [`TCP_TIMEOUT`], or sends something that gets no answer.
    async fn answer_tcp(&self, mut stream: TcpStream) -> std::io::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let timed_out = || std::io::Error::from(std::io::ErrorKind::TimedOut);
        loop {
            let mut len = [0u8; 2];
            match tokio::time::timeout(TCP_TIMEOUT, stream.read_exact(&mut len)).await {
                Err(_) => return Ok(()),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Ok(r) => r?,
            };
            let mut query = vec![0; usize::from(u16::from_be_bytes(len))];
            tokio::time::timeout(TCP_TIMEOUT, stream.read_exact(&mut query))
                .await
                .map_err(|_| timed_out())??;
            let Some(answer) = self.answer_bytes(&query) else {
                return Ok(());
            };
            let Ok(len) = u16::try_from(answer.len()) else {
                return Ok(());
            };
            let mut out = Vec::with_capacity(2 + answer.len());
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&answer);
            tokio::time::timeout(TCP_TIMEOUT, stream.write_all(&out))
                .await
                .map_err(|_| timed_out())??;
        }
    }
}

/// Serves DNS over TCP on `listener`: at most [`TCP_MAX_CONNECTIONS`] at
/// once (more are closed after a short wait for a place), each closed after [`TCP_TIMEOUT`] of
/// silence, and failed accepts (out of descriptors) paused, not retried in
/// a loop. Ends, with its connections, when its task is aborted.
async fn serve_tcp(listener: TcpListener, handler: Handler) {
    let places = ConnectionLimit::new(TCP_MAX_CONNECTIONS);
    let mut backoff = AcceptBackoff::default();
    let mut connections = JoinSet::new();
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(a) => {
                backoff.reset();
                a
            }
            Err(e) => {
                backoff.pause("dns", &e).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let Some(permit) = places.admit().await else {
            tracing::debug!(%remote, "DNS over TCP refused: too many connections open");
            continue;
        };
        let handler = handler.clone();
        connections.spawn(async move {
            let _permit = permit;
            if let Err(error) = handler.answer_tcp(stream).await {
                tracing::debug!(%remote, %error, "DNS over TCP connection ended");
            }
        });
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let queries = request.queries.queries();
        let name: Option<Name> = match queries {
            [q] => Some(q.name().into()),
            _ => None,
        };
        let question = match (queries, &name) {
            ([q], Some(name)) => Some((name, q.query_type(), q.query_class())),
            _ => None,
        };
        let reply = self.with_zone(|zone| {
            dns::reply(
                zone,
                request.metadata.op_code,
                question,
                request.edns.as_ref(),
            )
        });
        self.count(reply.code);
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = &reply.edns {
            builder.edns(e);
        }
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = false;
        metadata.response_code = reply.code;
        let result = match &reply.answer {
            Some(a) => {
                metadata.authoritative = a.authoritative;
                let response = builder.build(
                    metadata,
                    a.answers.iter(),
                    a.authority.iter(),
                    std::iter::empty(),
                    a.additionals.iter(),
                );
                response_handle.send_response(response).await
            }
            None => {
                response_handle
                    .send_response(builder.build_no_records(metadata))
                    .await
            }
        };
        match result {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "cannot send a DNS answer");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                hickory_proto::op::Header {
                    metadata,
                    counts: Default::default(),
                }
                .into()
            }
        }
    }
}

/// A running DNS server.
pub struct DnsServer {
    server: Server<Handler>,
    /// The TCP listeners and their connections (aborted on drop).
    tcp: JoinSet<()>,
    /// Where it answers (the bound addresses).
    pub local_addrs: Vec<SocketAddr>,
}

impl DnsServer {
    /// Binds UDP and TCP on every address of `listen` and answers from the
    /// zone `data` holds, brought up to date on every change (the sites
    /// that changed are re-indexed, on a blocking thread). `ns_addresses` are
    /// published as `ns.<zone>` (wildcard addresses are left out).
    pub async fn start(
        listen: &[SocketAddr],
        mut data: watch::Receiver<Option<Arc<ZoneData>>>,
        on_answer: Option<Arc<dyn Fn(ResponseCode) + Send + Sync>>,
    ) -> anyhow::Result<Self> {
        let mut server_sockets = Vec::new();
        let mut local_addrs = Vec::new();
        for addr in listen {
            // TCP on the same port as UDP, also when the port is 0 (then a
            // port free for both is found, never a collision by chance).
            let (udp, tcp) = crate::udp::bind_pair(*addr).map_err(|e| {
                anyhow::anyhow!(
                    "cannot bind DNS on {} {}: {} (port in use, or below 1024 without CAP_NET_BIND_SERVICE?)",
                    e.protocol.to_lowercase(),
                    e.addr,
                    e.error
                )
            })?;
            udp.set_nonblocking(true)?;
            tcp.set_nonblocking(true)?;
            let (udp, tcp) = (UdpSocket::from_std(udp)?, TcpListener::from_std(tcp)?);
            let bound = udp.local_addr()?;
            local_addrs.push(bound);
            server_sockets.push((udp, tcp));
        }
        let ns: Vec<IpAddr> = local_addrs
            .iter()
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified())
            .collect();
        let zone: ZoneCell = Arc::new(RwLock::new(None));
        let ns: Arc<[IpAddr]> = ns.into();
        {
            let (zone, ns) = (zone.clone(), ns.clone());
            let first = data.borrow_and_update().clone();
            tokio::task::spawn_blocking(move || refresh(&zone, first, &ns)).await?;
        }
        {
            let zone = zone.clone();
            tokio::spawn(async move {
                while data.changed().await.is_ok() {
                    let next = data.borrow_and_update().clone();
                    let (zone, ns) = (zone.clone(), ns.clone());
                    // Changes published while this runs are taken
                    // together by the next round.
                    // (A panic poisons the zone, which the next round
                    // builds anew; a cancelled task means shutdown.)
                    if let Err(e) =
                        tokio::task::spawn_blocking(move || refresh(&zone, next, &ns)).await
                        && e.is_cancelled()
                    {
                        return;
                    }
                }
            });
        }
        let handler = Handler { zone, on_answer };
        let mut server = Server::new(handler.clone());
        let mut tcp_tasks = JoinSet::new();
        for (udp, tcp) in server_sockets {
            server.register_socket(udp);
            // hickory-server's own TCP accept loop retries a failed accept
            // at once (a busy loop when out of descriptors) and has no
            // connection cap: TCP is served here.
            tcp_tasks.spawn(serve_tcp(tcp, handler.clone()));
        }
        tracing::info!(listen = ?local_addrs, "serving the mesh zone");
        Ok(Self {
            server,
            tcp: tcp_tasks,
            local_addrs,
        })
    }

    /// Stops answering.
    pub async fn shutdown(mut self) {
        self.tcp.abort_all();
        let _ = self.server.shutdown_gracefully().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, MessageType, OpCode};
    use hickory_proto::rr::RecordType;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn server() -> DnsServer {
        let data = ZoneData::empty("tether.internal", 60, Vec::new());
        let (_tx, rx) = watch::channel(Some(Arc::new(data)));
        DnsServer::start(&["127.0.0.1:0".parse().unwrap()], rx, None)
            .await
            .unwrap()
    }

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.add_query(hickory_proto::op::Query::query(
            Name::from_ascii(name).unwrap(),
            RecordType::SOA,
        ));
        m.to_vec().unwrap()
    }

    async fn send(tcp: &mut TcpStream, message: &[u8]) {
        let mut out = (message.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(message);
        tcp.write_all(&out).await.unwrap();
    }

    async fn receive(tcp: &mut TcpStream) -> Message {
        let mut len = [0u8; 2];
        tcp.read_exact(&mut len).await.unwrap();
        let mut buf = vec![0; usize::from(u16::from_be_bytes(len))];
        tcp.read_exact(&mut buf).await.unwrap();
        Message::from_vec(&buf).unwrap()
    }

    #[tokio::test]
    async fn tcp_answers_every_message_of_a_connection_and_formerr_for_garbage() {
        let dns = server().await;
        let mut tcp = TcpStream::connect(dns.local_addrs[0]).await.unwrap();
        // Two queries sent back to back, answered in order (RFC 7766).
        send(&mut tcp, &query(7, "tether.internal.")).await;
        send(&mut tcp, &query(8, "example.org.")).await;
        let (a, b) = (receive(&mut tcp).await, receive(&mut tcp).await);
        assert_eq!(
            (a.metadata.id, a.metadata.response_code),
            (7, ResponseCode::NoError)
        );
        assert!(a.metadata.authoritative);
        assert_eq!(a.answers.len(), 1, "{a:?}");
        assert_eq!(a.queries.len(), 1);
        assert_eq!(
            (b.metadata.id, b.metadata.response_code),
            (8, ResponseCode::Refused)
        );
        // A header followed by junk: FORMERR with the query's id.
        let mut junk = query(9, "tether.internal.");
        junk.truncate(14);
        send(&mut tcp, &junk).await;
        let c = receive(&mut tcp).await;
        assert_eq!(
            (c.metadata.id, c.metadata.response_code),
            (9, ResponseCode::FormErr)
        );
        // Less than a header: no answer, the connection is closed.
        send(&mut tcp, &[1, 2, 3]).await;
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0);
        dns.shutdown().await;
    }

    #[tokio::test]
    async fn tcp_connections_past_the_cap_are_closed_at_once() {
        let dns = server().await;
        let addr = dns.local_addrs[0];
        let mut held = Vec::new();
        for _ in 0..TCP_MAX_CONNECTIONS {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        // The held connections get answers; one more is closed unanswered.
        send(&mut held[0], &query(1, "tether.internal.")).await;
        assert_eq!(receive(&mut held[0]).await.metadata.id, 1);
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
        // Once one is gone, a new one is served.
        held.pop();
        let mut next = None;
        for _ in 0..50 {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            send(&mut tcp, &query(2, "tether.internal.")).await;
            let mut len = [0u8; 2];
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(1), tcp.read_exact(&mut len)).await
            {
                next = Some(());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(next.is_some(), "no connection served after one closed");
        dns.shutdown().await;
    }
}
