//! The control channel between a broker and its gateways, inside their
//! WireGuard tunnel.
//!
//! A gateway must know which site prefixes its region may reach right now,
//! to keep the routes in its routing table in step with the broker's. The
//! broker tells it in-band: UDP datagrams from [`BROKER_CONTROL`] to
//! [`GATEWAY_CONTROL`] (link-local addresses, port [`CONTROL_PORT`]) carried
//! by the same WireGuard session as the traffic, so they are authenticated
//! by the peer's key and need no port of their own. Link-local addresses
//! never collide with operator or backend prefixes, and the broker's router
//! never forwards them.
//!
//! - The gateway sends a [`Message::Request`] when it starts and every
//!   [`REQUEST_INTERVAL`]; it doubles as the tunnel's liveness probe.
//! - The broker answers a request, and pushes on every change to gateways
//!   that asked within [`SUBSCRIPTION`], the whole [`RouteSet`] as numbered
//!   chunks of one generation ([`RouteSet::encode`]). The gateway applies a
//!   set once every chunk of a generation newer than its own has arrived
//!   ([`Assembler`]). Whole sets, not deltas: a lost datagram costs one
//!   resend, never a wrong table.
//! - With the route set, the broker sends the gateway its copy of the mesh
//!   zone ([`crate::dns::ZoneData`], the sites its region may see) as
//!   [`Message::Zone`] chunks numbered by the zone's serial
//!   ([`zone_chunks`], [`ZoneAssembler`]), so the gateway answers DNS for
//!   backends even while the broker is away.
//!
//! - A gateway keeps a session with every broker of its region and sends
//!   each a [`Message::Ping`] every [`failover::PING_INTERVAL`]; the broker
//!   answers with a [`Message::Pong`]. A broker that answered once and then
//!   falls silent for [`failover::DEAD_AFTER`] counts as down, and the
//!   gateway moves its traffic to another ([`failover::Failover`]). A
//!   broker that is stopping says so with [`Message::Leaving`] (at the
//!   start of its drain, and in answer to every ping while it drains), and
//!   the gateway moves at once.
//!
//! A stock WireGuard peer never sends a request and so never receives
//! control traffic.
//!
//! - A gateway of this release also sends [`Message::BrokersRequest`] with
//!   each request, naming the version of the broker list it holds; the
//!   broker answers (and pushes on every change, while the gateway is
//!   subscribed) with the gateway endpoints of the live brokers of the
//!   gateway's region as [`Message::Brokers`] chunks whenever that version
//!   is not the current one ([`brokers`]). A broker of an older release
//!   ignores the request, and a gateway of an older release never asks, so
//!   never receives a list.
//!
//! [`control::ControlSchedule`] decides when a gateway runs WireGuard's
//! timers and sends its requests, and when to report the session up.

pub mod brokers;
pub mod control;
pub mod failover;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use thiserror::Error;

use crate::ids::{RegionId, SiteId};
use crate::ip::{self, Packet};

/// The broker's end of the control channel.
pub const BROKER_CONTROL: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 1);
/// The gateway's end of the control channel.
pub const GATEWAY_CONTROL: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 2);
/// UDP port of both ends.
pub const CONTROL_PORT: u16 = 7301;
/// The default MTU inside a WireGuard tunnel: 1500 less WireGuard's 32
/// bytes, UDP's 8 and IPv6's 40.
pub const DEFAULT_MTU: u16 = 1420;
/// How often a gateway asks for the route set.
pub const REQUEST_INTERVAL: Duration = Duration::from_secs(10);
/// How long after its last request a gateway receives pushed changes.
pub const SUBSCRIPTION: Duration = Duration::from_secs(60);
/// Largest control payload in one datagram: with IPv4 and UDP headers it
/// fits any tunnel MTU of 1280 and more.
pub const MAX_PAYLOAD: usize = 1200;

const MAGIC: &[u8; 4] = b"TGC1";
const KIND_REQUEST: u8 = 1;
const KIND_ROUTES: u8 = 2;
const KIND_ZONE: u8 = 3;
const KIND_PING: u8 = 4;
const KIND_PONG: u8 = 5;
const KIND_LEAVING: u8 = 6;
const KIND_BROKERS_REQUEST: u8 = 7;
const KIND_BROKERS: u8 = 8;
/// The layout of a [`Message::Brokers`] payload; a gateway ignores a list
/// of another layout.
const BROKERS_FORMAT: u8 = 1;
/// magic, kind, generation, index, count.
const HEADER: usize = 4 + 1 + 8 + 2 + 2;

/// One route a gateway installs: a site's prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SiteRoute {
    /// The prefix (a site address or a mapped LAN).
    pub prefix: IpNet,
    /// The site behind it.
    pub site: SiteId,
    /// The site's region.
    pub region: RegionId,
}

/// Everything a gateway's region may reach now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct RouteSet {
    /// Increases with every change the broker makes.
    pub generation: u64,
    /// The routes, sorted.
    pub routes: Vec<SiteRoute>,
}

/// A control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Gateway to broker: send me the route set.
    Request,
    /// Broker to gateway: chunk `index` of `count` of a generation.
    Routes {
        /// The set's generation.
        generation: u64,
        /// This chunk's number, from 0.
        index: u16,
        /// How many chunks the generation has.
        count: u16,
        /// The routes in this chunk.
        routes: Vec<SiteRoute>,
    },
    /// Broker to gateway: chunk `index` of `count` of the encoded mesh
    /// zone ([`crate::dns::ZoneData::encode`]) with serial `generation`.
    Zone {
        /// The zone's serial.
        generation: u64,
        /// This chunk's number, from 0.
        index: u16,
        /// How many chunks the zone has.
        count: u16,
        /// The bytes of this chunk.
        bytes: Vec<u8>,
    },
    /// Gateway to broker: are you there? Answered with a
    /// [`Message::Pong`] of the same `seq`; a broker of an older release
    /// ignores it (see [`failover`]).
    Ping {
        /// Chosen by the gateway, echoed in the answer.
        seq: u64,
    },
    /// Broker to gateway: the answer to a [`Message::Ping`].
    Pong {
        /// The `seq` of the ping.
        seq: u64,
    },
    /// Broker to gateway: this broker is stopping (a drain on SIGTERM);
    /// send the traffic to another broker now rather than after its
    /// silence. Sent when the drain begins (a few times, in case one is
    /// lost) and as the answer to every ping while it lasts; a gateway of
    /// an older release ignores it. Only a pong of a ping sent after it
    /// arrived brings the broker back ([`failover`]).
    Leaving,
    /// Gateway to broker: send me the broker list unless its version is
    /// `known` (0: I hold none). A broker of an older release ignores it.
    BrokersRequest {
        /// The version of the list the gateway holds.
        known: u64,
    },
    /// Broker to gateway: chunk `index` of `count` of the gateway
    /// endpoints of the live brokers of the gateway's region, list version
    /// `version` ([`brokers::chunks`], [`brokers::ListAssembler`]).
    Brokers {
        /// The list's version (a digest of its content).
        version: u64,
        /// This chunk's number, from 0.
        index: u16,
        /// How many chunks the list has.
        count: u16,
        /// The endpoints in this chunk.
        endpoints: Vec<SocketAddr>,
    },
}

/// Why a control payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ControlError {
    /// Not a tether control message.
    #[error("not a tether control message")]
    NotControl,
    /// Cut short or inconsistent.
    #[error("malformed control message: {0}")]
    Malformed(&'static str),
    /// A kind this release does not know (a newer peer's): ignored.
    #[error("control message of unknown kind {0}")]
    UnknownKind(u8),
    /// A known kind in a layout this release does not know: ignored.
    #[error("control message in an unknown format: {0}")]
    Unsupported(&'static str),
}

impl ControlError {
    /// Whether the message is simply newer than this release (to ignore
    /// quietly) rather than broken.
    pub fn is_newer(&self) -> bool {
        matches!(self, Self::UnknownKind(_) | Self::Unsupported(_))
    }
}

impl Message {
    /// The message as a UDP payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_PAYLOAD);
        out.extend_from_slice(MAGIC);
        match self {
            Message::Request | Message::Leaving => {
                out.push(if matches!(self, Message::Request) {
                    KIND_REQUEST
                } else {
                    KIND_LEAVING
                });
                out.extend_from_slice(&[0; 12]);
            }
            Message::Routes {
                generation,
                index,
                count,
                routes,
            } => {
                out.push(KIND_ROUTES);
                out.extend_from_slice(&generation.to_be_bytes());
                out.extend_from_slice(&index.to_be_bytes());
                out.extend_from_slice(&count.to_be_bytes());
                for r in routes {
                    encode_route(r, &mut out);
                }
            }
            Message::Zone {
                generation,
                index,
                count,
                bytes,
            } => {
                out.push(KIND_ZONE);
                out.extend_from_slice(&generation.to_be_bytes());
                out.extend_from_slice(&index.to_be_bytes());
                out.extend_from_slice(&count.to_be_bytes());
                out.extend_from_slice(bytes);
            }
            Message::Ping { seq } | Message::Pong { seq } => {
                out.push(if matches!(self, Message::Ping { .. }) {
                    KIND_PING
                } else {
                    KIND_PONG
                });
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(&[0; 4]);
            }
            Message::BrokersRequest { known } => {
                out.push(KIND_BROKERS_REQUEST);
                out.extend_from_slice(&known.to_be_bytes());
                out.extend_from_slice(&[0; 4]);
            }
            Message::Brokers {
                version,
                index,
                count,
                endpoints,
            } => {
                out.push(KIND_BROKERS);
                out.extend_from_slice(&version.to_be_bytes());
                out.extend_from_slice(&index.to_be_bytes());
                out.extend_from_slice(&count.to_be_bytes());
                out.push(BROKERS_FORMAT);
                for e in endpoints {
                    encode_endpoint(e, &mut out);
                }
            }
        }
        out
    }

    /// Parses a UDP payload.
    pub fn decode(bytes: &[u8]) -> Result<Self, ControlError> {
        if bytes.get(..4) != Some(MAGIC.as_slice()) {
            return Err(ControlError::NotControl);
        }
        let header = bytes
            .get(..HEADER)
            .ok_or(ControlError::Malformed("short header"))?;
        let kind = header[4];
        let generation = u64::from_be_bytes(header[5..13].try_into().unwrap_or_default());
        let index = u16::from_be_bytes([header[13], header[14]]);
        let count = u16::from_be_bytes([header[15], header[16]]);
        match kind {
            KIND_REQUEST => Ok(Message::Request),
            KIND_ROUTES => {
                if index >= count {
                    return Err(ControlError::Malformed("chunk index beyond count"));
                }
                let mut rest = bytes.get(HEADER..).unwrap_or_default();
                let mut routes = Vec::new();
                while !rest.is_empty() {
                    routes.push(decode_route(&mut rest)?);
                }
                Ok(Message::Routes {
                    generation,
                    index,
                    count,
                    routes,
                })
            }
            KIND_ZONE => {
                if index >= count {
                    return Err(ControlError::Malformed("chunk index beyond count"));
                }
                Ok(Message::Zone {
                    generation,
                    index,
                    count,
                    bytes: bytes.get(HEADER..).unwrap_or_default().to_vec(),
                })
            }
            KIND_PING => Ok(Message::Ping { seq: generation }),
            KIND_PONG => Ok(Message::Pong { seq: generation }),
            KIND_LEAVING => Ok(Message::Leaving),
            KIND_BROKERS_REQUEST => Ok(Message::BrokersRequest { known: generation }),
            KIND_BROKERS => {
                if index >= count {
                    return Err(ControlError::Malformed("chunk index beyond count"));
                }
                let body = bytes.get(HEADER..).unwrap_or_default();
                let Some((&format, mut rest)) = body.split_first() else {
                    return Err(ControlError::Malformed("broker list without its format"));
                };
                if format != BROKERS_FORMAT {
                    return Err(ControlError::Unsupported("broker list"));
                }
                let mut endpoints = Vec::new();
                while !rest.is_empty() {
                    if endpoints.len() >= brokers::MAX_LISTED {
                        return Err(ControlError::Malformed("too many brokers in a chunk"));
                    }
                    endpoints.push(decode_endpoint(&mut rest)?);
                }
                Ok(Message::Brokers {
                    version: generation,
                    index,
                    count,
                    endpoints,
                })
            }
            other => Err(ControlError::UnknownKind(other)),
        }
    }
}

fn encoded_len(r: &SiteRoute) -> usize {
    let addr = match r.prefix {
        IpNet::V4(_) => 4,
        IpNet::V6(_) => 16,
    };
    2 + addr + 1 + r.site.as_str().len() + 1 + r.region.as_str().len()
}

fn encode_route(r: &SiteRoute, out: &mut Vec<u8>) {
    match r.prefix {
        IpNet::V4(p) => {
            out.push(4);
            out.push(p.prefix_len());
            out.extend_from_slice(&p.network().octets());
        }
        IpNet::V6(p) => {
            out.push(6);
            out.push(p.prefix_len());
            out.extend_from_slice(&p.network().octets());
        }
    }
    for label in [r.site.as_str(), r.region.as_str()] {
        // Ids are DNS labels: at most 63 bytes.
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
}

/// Bytes of one encoded endpoint: family, address, port.
fn endpoint_len(e: &SocketAddr) -> usize {
    1 + if e.is_ipv4() { 4 } else { 16 } + 2
}

fn encode_endpoint(e: &SocketAddr, out: &mut Vec<u8>) {
    match e.ip() {
        IpAddr::V4(a) => {
            out.push(4);
            out.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out.push(6);
            out.extend_from_slice(&a.octets());
        }
    }
    out.extend_from_slice(&e.port().to_be_bytes());
}

fn decode_endpoint(rest: &mut &[u8]) -> Result<SocketAddr, ControlError> {
    let ip = match take(rest, 1)?[0] {
        4 => IpAddr::from(<[u8; 4]>::try_from(take(rest, 4)?).unwrap_or_default()),
        6 => IpAddr::from(<[u8; 16]>::try_from(take(rest, 16)?).unwrap_or_default()),
        _ => return Err(ControlError::Malformed("unknown address family")),
    };
    let port = take(rest, 2)?;
    Ok(SocketAddr::new(ip, u16::from_be_bytes([port[0], port[1]])))
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], ControlError> {
    if rest.len() < n {
        return Err(ControlError::Malformed("route cut short"));
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

fn decode_route(rest: &mut &[u8]) -> Result<SiteRoute, ControlError> {
    let head = take(rest, 2)?;
    let (family, len) = (head[0], head[1]);
    let prefix = match family {
        4 => {
            let a: [u8; 4] = take(rest, 4)?.try_into().unwrap_or_default();
            IpNet::new(IpAddr::from(a), len)
        }
        6 => {
            let a: [u8; 16] = take(rest, 16)?.try_into().unwrap_or_default();
            IpNet::new(IpAddr::from(a), len)
        }
        _ => return Err(ControlError::Malformed("unknown address family")),
    }
    .map_err(|_| ControlError::Malformed("prefix length beyond the address"))?;
    let mut label = |what: &'static str| -> Result<String, ControlError> {
        let n = usize::from(take(rest, 1)?[0]);
        let bytes = take(rest, n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| ControlError::Malformed(what))
    };
    let site = SiteId::new(label("site id")?).map_err(|_| ControlError::Malformed("site id"))?;
    let region =
        RegionId::new(label("region id")?).map_err(|_| ControlError::Malformed("region id"))?;
    Ok(SiteRoute {
        prefix: prefix.trunc(),
        site,
        region,
    })
}

impl RouteSet {
    /// The set as chunk messages, each within [`MAX_PAYLOAD`]; an empty set
    /// is one empty chunk.
    pub fn encode(&self) -> Vec<Message> {
        let mut chunks: Vec<Vec<SiteRoute>> = vec![Vec::new()];
        let mut size = HEADER;
        for r in &self.routes {
            let n = encoded_len(r);
            if size + n > MAX_PAYLOAD && chunks.last().is_some_and(|c| !c.is_empty()) {
                chunks.push(Vec::new());
                size = HEADER;
            }
            size += n;
            if let Some(last) = chunks.last_mut() {
                last.push(r.clone());
            }
        }
        let count = u16::try_from(chunks.len()).unwrap_or(u16::MAX);
        chunks
            .into_iter()
            .take(usize::from(count))
            .enumerate()
            .map(|(i, routes)| Message::Routes {
                generation: self.generation,
                index: i as u16,
                count,
                routes,
            })
            .collect()
    }
}

/// Numbered chunks of one generation, collected until all are in.
#[derive(Debug)]
struct Reassembly<T> {
    applied: Option<u64>,
    pending: Option<(u64, u16, BTreeMap<u16, T>)>,
}

impl<T> Default for Reassembly<T> {
    fn default() -> Self {
        Self {
            applied: None,
            pending: None,
        }
    }
}

impl<T> Reassembly<T> {
    /// Takes a chunk; returns the generation and its parts in order once
    /// this chunk completes a generation other than the one applied last.
    /// The caller marks it applied when it could use it.
    fn push(&mut self, generation: u64, index: u16, count: u16, part: T) -> Option<(u64, Vec<T>)> {
        if self.applied == Some(generation) {
            return None;
        }
        let fresh = match &self.pending {
            Some((g, c, _)) => *g != generation || *c != count,
            None => true,
        };
        if fresh {
            self.pending = Some((generation, count, BTreeMap::new()));
        }
        let (_, _, parts) = self.pending.as_mut()?;
        parts.insert(index, part);
        if parts.len() < usize::from(count) {
            return None;
        }
        let (generation, _, parts) = self.pending.take()?;
        Some((generation, parts.into_values().collect()))
    }
}

/// Collects chunks into route sets on the gateway.
#[derive(Debug, Default)]
pub struct Assembler {
    inner: Reassembly<Vec<SiteRoute>>,
}

impl Assembler {
    /// The generation last completed, if any.
    pub fn applied(&self) -> Option<u64> {
        self.inner.applied
    }

    /// Takes a chunk; returns a complete set when this chunk completes a
    /// generation other than the one applied last. Generations are compared
    /// for equality only, so a restarted broker (counting again from its
    /// start) is followed at once; a stale set that arrives late is
    /// replaced by the answer to the next request.
    pub fn push(&mut self, message: Message) -> Option<RouteSet> {
        let Message::Routes {
            generation,
            index,
            count,
            routes,
        } = message
        else {
            return None;
        };
        let (generation, parts) = self.inner.push(generation, index, count, routes)?;
        self.inner.applied = Some(generation);
        let mut routes: Vec<SiteRoute> = parts.into_iter().flatten().collect();
        routes.sort();
        routes.dedup();
        Some(RouteSet { generation, routes })
    }
}

/// The mesh zone as chunk messages, each within [`MAX_PAYLOAD`], with the
/// zone's serial as their generation.
pub fn zone_chunks(zone: &crate::dns::ZoneData) -> Vec<Message> {
    let bytes = zone.encode();
    let room = MAX_PAYLOAD - HEADER;
    let parts: Vec<&[u8]> = bytes.chunks(room).collect();
    let count = u16::try_from(parts.len()).unwrap_or(u16::MAX);
    parts
        .into_iter()
        .take(usize::from(count))
        .enumerate()
        .map(|(i, part)| Message::Zone {
            generation: u64::from(zone.serial),
            index: i as u16,
            count,
            bytes: part.to_vec(),
        })
        .collect()
}

/// Collects zone chunks into the gateway's copy of the mesh zone.
#[derive(Debug, Default)]
pub struct ZoneAssembler {
    inner: Reassembly<Vec<u8>>,
}

impl ZoneAssembler {
    /// Takes a chunk; returns the zone once this chunk completes a serial
    /// other than the one applied last. A zone whose bytes do not decode is
    /// dropped (the next request brings it again).
    pub fn push(&mut self, message: Message) -> Option<crate::dns::ZoneData> {
        let Message::Zone {
            generation,
            index,
            count,
            bytes,
        } = message
        else {
            return None;
        };
        let (generation, parts) = self.inner.push(generation, index, count, bytes)?;
        let zone = crate::dns::ZoneData::decode(&parts.concat()).ok()?;
        self.inner.applied = Some(generation);
        Some(zone)
    }
}

/// An IPv4/UDP packet from `src` to `dst` (both on [`CONTROL_PORT`])
/// carrying `payload`.
pub fn control_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    // Identification 0, Don't Fragment, TTL 64, UDP.
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, ip::PROTO_UDP, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let sum = ip::checksum(&[&p[..20]]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(&CONTROL_PORT.to_be_bytes());
    p.extend_from_slice(&CONTROL_PORT.to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    let pseudo = [
        &src.octets()[..],
        &dst.octets()[..],
        &[0, ip::PROTO_UDP],
        &(udp_len as u16).to_be_bytes(),
    ]
    .concat();
    let sum = match ip::checksum(&[&pseudo, &p[20..]]) {
        0 => 0xffff,
        s => s,
    };
    p[26..28].copy_from_slice(&sum.to_be_bytes());
    p
}

/// The control payload of `packet` if it is a control datagram from `src`
/// to `dst`; `None` for every other packet (which is traffic).
pub fn control_payload(packet: &[u8], src: Ipv4Addr, dst: Ipv4Addr) -> Option<&[u8]> {
    let parsed = Packet::parse(packet).ok()?;
    if parsed.src != IpAddr::V4(src)
        || parsed.dst != IpAddr::V4(dst)
        || parsed.protocol != ip::PROTO_UDP
        || parsed.later_fragment
    {
        return None;
    }
    let udp = parsed.bytes.get(parsed.header_len..)?;
    let ports = udp.get(..4)?;
    if ports != [CONTROL_PORT.to_be_bytes(), CONTROL_PORT.to_be_bytes()].concat() {
        return None;
    }
    udp.get(8..)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str, site: &str, region: &str) -> SiteRoute {
        SiteRoute {
            prefix: prefix.parse().unwrap(),
            site: SiteId::new(site).unwrap(),
            region: RegionId::new(region).unwrap(),
        }
    }

    #[test]
    fn request_and_routes_round_trip() {
        assert_eq!(
            Message::decode(&Message::Request.encode()),
            Ok(Message::Request)
        );
        let m = Message::Routes {
            generation: 7,
            index: 1,
            count: 2,
            routes: vec![
                route("100.64.0.5/32", "lab-1", "eu"),
                route("2001:db8::5/128", "lab-1", "eu"),
            ],
        };
        assert_eq!(Message::decode(&m.encode()), Ok(m));
    }

    #[test]
    fn ping_and_pong_round_trip() {
        for m in [
            Message::Ping { seq: 0 },
            Message::Ping { seq: u64::MAX },
            Message::Pong { seq: 42 },
            Message::Leaving,
            Message::Request,
        ] {
            assert_eq!(Message::decode(&m.encode()), Ok(m.clone()));
            assert!(m.encode().len() <= MAX_PAYLOAD);
        }
        assert_ne!(
            Message::decode(&Message::Ping { seq: 1 }.encode()),
            Ok(Message::Pong { seq: 1 })
        );
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        assert_eq!(Message::decode(b"hello"), Err(ControlError::NotControl));
        let mut bad = Message::Routes {
            generation: 1,
            index: 0,
            count: 1,
            routes: vec![route("10.0.0.0/8", "a", "eu")],
        }
        .encode();
        bad.truncate(bad.len() - 1);
        assert!(matches!(
            Message::decode(&bad),
            Err(ControlError::Malformed(_))
        ));
        let mut beyond = Message::Routes {
            generation: 1,
            index: 0,
            count: 1,
            routes: vec![],
        }
        .encode();
        beyond[13..15].copy_from_slice(&5u16.to_be_bytes());
        assert!(Message::decode(&beyond).is_err());
        for n in 0..64 {
            let junk: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let _ = Message::decode(&[MAGIC.as_slice(), &junk].concat());
        }
    }

    #[test]
    fn large_sets_split_into_chunks_that_reassemble_in_any_order() {
        let routes: Vec<SiteRoute> = (0..500u32)
            .map(|i| {
                route(
                    &format!("100.64.{}.{}/32", i / 256, i % 256),
                    &format!("site-{i}"),
                    "eu",
                )
            })
            .collect();
        let set = RouteSet {
            generation: 3,
            routes,
        };
        let chunks = set.encode();
        assert!(chunks.len() > 1);
        for c in &chunks {
            assert!(c.encode().len() <= MAX_PAYLOAD);
        }
        let mut asm = Assembler::default();
        let mut out = None;
        for c in chunks.iter().rev() {
            assert!(out.is_none());
            out = asm.push(Message::decode(&c.encode()).unwrap());
        }
        let mut expected = set.routes.clone();
        expected.sort();
        assert_eq!(out.unwrap().routes, expected);
        // The same generation again is not applied twice.
        for c in &chunks {
            assert_eq!(asm.push(c.clone()), None);
        }
    }

    #[test]
    fn zones_travel_in_chunks_and_reassemble_in_any_order() {
        use crate::dns::{SiteNames, ZoneData};
        let mut zone =
            ZoneData::empty("tether.internal", 5, vec!["100.64.0.0/16".parse().unwrap()]);
        zone.serial = 42;
        for i in 0..300u32 {
            zone.sites.push(SiteNames {
                site: SiteId::new(format!("site-{i}")).unwrap(),
                region: RegionId::new("eu").unwrap(),
                addresses: vec![IpAddr::from([100, 64, (i >> 8) as u8, i as u8])],
                services: vec![],
                lans: vec![],
            });
        }
        let mut chunks = zone_chunks(&zone);
        assert!(chunks.len() > 3);
        for c in &chunks {
            assert!(c.encode().len() <= MAX_PAYLOAD);
            assert_eq!(Message::decode(&c.encode()).unwrap(), *c);
        }
        chunks.reverse();
        let mut asm = ZoneAssembler::default();
        let last = chunks.pop().unwrap();
        for c in chunks.clone() {
            assert!(asm.push(c).is_none());
        }
        assert_eq!(asm.push(last.clone()), Some(zone.clone()));
        // The same serial again is not applied twice.
        for c in chunks {
            assert!(asm.push(c).is_none());
        }
        assert!(asm.push(last).is_none());
        // Route chunks are not zone chunks.
        assert!(asm.push(Message::Request).is_none());
    }

    #[test]
    fn a_new_generation_replaces_an_incomplete_one() {
        let a = RouteSet {
            generation: 1,
            routes: (0..200u32)
                .map(|i| route(&format!("10.0.{i}.0/24"), &format!("s{i}"), "eu"))
                .collect(),
        };
        let b = RouteSet {
            generation: 2,
            routes: vec![route("10.9.0.0/24", "s9", "eu")],
        };
        let mut asm = Assembler::default();
        assert_eq!(asm.push(a.encode()[0].clone()), None);
        let got = asm.push(b.encode()[0].clone()).unwrap();
        assert_eq!(got, b);
        assert_eq!(asm.applied(), Some(2));
        // An empty set is a set: every route is gone.
        let empty = RouteSet {
            generation: 3,
            routes: vec![],
        };
        assert_eq!(empty.encode().len(), 1);
        assert_eq!(asm.push(empty.encode()[0].clone()), Some(empty));
    }

    #[test]
    fn control_packets_are_valid_udp_and_recognised_only_between_the_ends() {
        let payload = Message::Request.encode();
        let p = control_packet(GATEWAY_CONTROL, BROKER_CONTROL, &payload);
        let parsed = Packet::parse(&p).unwrap();
        assert_eq!(parsed.protocol, ip::PROTO_UDP);
        assert_eq!(ip::checksum(&[&p[..20]]), 0);
        let pseudo = [
            &GATEWAY_CONTROL.octets()[..],
            &BROKER_CONTROL.octets()[..],
            &[0, ip::PROTO_UDP],
            &((8 + payload.len()) as u16).to_be_bytes(),
        ]
        .concat();
        assert_eq!(ip::checksum(&[&pseudo, &p[20..]]), 0);
        assert_eq!(
            control_payload(&p, GATEWAY_CONTROL, BROKER_CONTROL),
            Some(payload.as_slice())
        );
        assert_eq!(control_payload(&p, BROKER_CONTROL, GATEWAY_CONTROL), None);
        let mut other_port = p.clone();
        other_port[22..24].copy_from_slice(&53u16.to_be_bytes());
        assert_eq!(
            control_payload(&other_port, GATEWAY_CONTROL, BROKER_CONTROL),
            None
        );
    }
}
