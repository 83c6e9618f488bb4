//! The authoritative DNS server for the mesh zone (hickory-server), run by
//! the gateway inside the backend network and by the broker.
//!
//! The answers come from [`tether_proto::dns::Zone`]; this shell owns the
//! sockets and swaps in a new zone whenever the data changes. Messages that
//! do not parse get FORMERR from hickory-server itself; anything but one
//! standard query gets FORMERR or REFUSED here.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Edns, Metadata, OpCode, ResponseCode};
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tether_proto::dns::{Zone, ZoneData};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;

/// Largest UDP answer we offer with EDNS (the DNS flag day 2020 size).
const EDNS_PAYLOAD: u16 = 1232;
/// How long a TCP client may stay silent.
const TCP_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers queries from the current zone.
#[derive(Clone)]
pub struct Handler {
    zone: Arc<RwLock<Option<Arc<Zone>>>>,
    /// Counts answers by response code (the broker's metrics); none on the
    /// gateway.
    on_answer: Option<Arc<dyn Fn(ResponseCode) + Send + Sync>>,
}

impl Handler {
    /// The current zone.
    fn zone(&self) -> Option<Arc<Zone>> {
        self.zone.read().ok().and_then(|z| z.clone())
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        // EDNS version 0 is the only one (RFC 6891 section 6.1.3): a query
        // of a higher version gets BADVERS, whose upper bits travel in the
        // answer's OPT record.
        let bad_version = request.edns.as_ref().is_some_and(|e| e.version() > 0);
        let edns = request.edns.as_ref().map(|_| {
            let mut e = Edns::new();
            e.set_max_payload(EDNS_PAYLOAD);
            if bad_version {
                e.set_rcode_high(ResponseCode::BADVERS.high());
            }
            e
        });
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = &edns {
            builder.edns(e);
        }
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = false;
        let zone = self.zone();
        let (code, answer) = if bad_version {
            (ResponseCode::BADVERS, None)
        } else if request.metadata.op_code != OpCode::Query {
            (ResponseCode::Refused, None)
        } else if request.queries.queries().len() != 1 {
            // No recursion, and one question per message (RFC 9619).
            (ResponseCode::FormErr, None)
        } else if let Some(zone) = &zone {
            let q = &request.queries.queries()[0];
            let a = zone.answer(&q.name().into(), q.query_type(), q.query_class());
            (a.code, Some(a))
        } else {
            // No zone yet (a gateway that has not heard from a broker).
            (ResponseCode::ServFail, None)
        };
        if let Some(count) = &self.on_answer {
            count(code);
        }
        metadata.response_code = code;
        let result = match &answer {
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
    /// Where it answers (the bound addresses).
    pub local_addrs: Vec<SocketAddr>,
}

impl DnsServer {
    /// Binds UDP and TCP on every address of `listen` and answers from the
    /// zone `data` holds, re-indexed on every change. `ns_addresses` are
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
        let zone: Arc<RwLock<Option<Arc<Zone>>>> = Arc::new(RwLock::new(None));
        let index = move |data: &Option<Arc<ZoneData>>| -> Option<Arc<Zone>> {
            let data = data.as_ref()?;
            match Zone::new((**data).clone(), &ns) {
                Ok(z) => Some(Arc::new(z)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot serve the mesh zone");
                    None
                }
            }
        };
        let first = index(&data.borrow_and_update());
        if let Ok(mut z) = zone.write() {
            *z = first;
        }
        {
            let zone = zone.clone();
            tokio::spawn(async move {
                while data.changed().await.is_ok() {
                    let next = index(&data.borrow_and_update());
                    if let Some(z) = &next {
                        tracing::debug!(
                            serial = z.data().serial,
                            sites = z.data().sites.len(),
                            "mesh zone updated"
                        );
                    }
                    if let Ok(mut cur) = zone.write() {
                        *cur = next;
                    }
                }
            });
        }
        let mut server = Server::new(Handler { zone, on_answer });
        for (udp, tcp) in server_sockets {
            server.register_socket(udp);
            server.register_listener(tcp, TCP_TIMEOUT, 64 * 1024);
        }
        tracing::info!(listen = ?local_addrs, "serving the mesh zone");
        Ok(Self {
            server,
            local_addrs,
        })
    }

    /// Stops answering.
    pub async fn shutdown(mut self) {
        let _ = self.server.shutdown_gracefully().await;
    }
}
