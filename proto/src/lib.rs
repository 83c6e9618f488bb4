//! tether's sans-IO core.
//!
//! Everything here is pure: no sockets, no async runtime, no clock reads and
//! no ambient randomness. Time enters as a `now` argument, randomness as a
//! seed, and results leave as values, so the same code runs under the
//! broker, the gateway and the edge agent, and under deterministic tests.
//!
//! - [`varint`], [`capsule`], [`connect_ip`], [`datagram`]: the wire formats
//!   of CONNECT-IP (RFC 9000 varints, RFC 9297 capsules and HTTP Datagrams,
//!   RFC 9484 capsules and URI template).
//! - [`h2`]: what the agent watches for in a broker's HTTP/2 frames
//!   (GOAWAY, bytes received).
//! - [`h3`]: a minimal HTTP/3 (frames, SETTINGS, static-table QPACK,
//!   message heads, control streams) for extended CONNECT.
//! - [`ip`]: IP header parsing for forwarding, anti-spoofing, ICMP errors.
//! - [`ipam`]: address allocation over bring-your-own pools, expressed as
//!   compare-and-set transactions.
//! - [`route`]: the longest-prefix-match route table with explanations.
//! - [`forward`]: the forwarding decision (anti-spoofing, routing, data
//!   residency, TTL, MTU) as a value.
//! - [`gateway`]: the broker-to-gateway control channel inside WireGuard
//!   (the route set a gateway installs).
//! - [`dns`]: the mesh zone (sites by name, SRV, PTR) and how a server
//!   answers from it.
//! - [`broker`]: the broker's decisions (sessions, routes, revocation,
//!   allocation retries, token policy, close codes) as one state machine.
//! - [`events`]: each site's timeline of session and trust events, its
//!   state (online, offline, flapping), and the site list's filter.
//! - [`report`]: problems an agent reports for its site's timeline, and
//!   the bounds and rate a broker stores them within; [`skew`]: a host's
//!   clock against the broker's, and the words for a wrong one.
//! - [`fleet`]: the brokers of a deployment as one broker sees them
//!   (membership, which broker holds each site) and what follows when
//!   either changes.
//! - [`peering`]: routes to sites and gateways held by other brokers of
//!   the fleet, from the store's leases and the fleet's owners;
//!   [`relay_frame`]: the broker-to-broker link's frame, naming the sender
//!   of a relayed packet.
//! - [`agent`]: the edge agent's decisions (transport ladder, reconnection
//!   backoff, certificate renewal, tunnel MTU, the site's half of the
//!   CONNECT-IP session) as one state machine.
//! - [`tunnel`]: the broker's half of the CONNECT-IP session, and the
//!   transports both ends name.
//! - `api`: tether's own JSON messages (enrollment, admin API).
//! - [`send_queue`]: when a sender waits for room in a site's full send
//!   queue instead of dropping.
//! - [`limits`]: admission of unauthenticated connections per source.
//! - [`ids`], [`net`]: identifiers and prefix arithmetic shared by the above.

#![warn(missing_docs)]

pub mod agent;
#[cfg(feature = "serde")]
pub mod api;
pub mod broker;
pub mod capsule;
pub mod connect_ip;
pub mod datagram;
pub mod dns;
pub mod events;
pub mod fleet;
pub mod forward;
pub mod gateway;
pub mod h2;
pub mod h3;
pub mod ids;
pub mod ip;
pub mod ipam;
pub mod limits;
pub mod net;
pub mod netmap;
pub mod path_watch;
pub mod peering;
pub mod policy;
pub mod quic_probe;
pub mod relay_frame;
pub mod report;
pub mod route;
pub mod send_queue;
pub mod skew;
pub mod tunnel;
pub mod varint;

pub use ids::{GatewayId, RegionId, SiteId, TrustDomain};
