//! The async and OS glue shared by tether's three binaries (`tether-broker`,
//! `tether-gateway`, `tether`): code that owns sockets, streams, devices and
//! tasks and moves bytes between them and the sans-IO core in
//! [`tether_proto`]. Nothing here decides anything about a packet, a site or
//! a route; those decisions are in `tether-proto`.
//!
//! - [`quic`]: the QUIC transport settings of both ends of a tunnel.
//! - [`h3`]: HTTP/3 plumbing around [`tether_proto::h3`]: the peer's
//!   unidirectional streams, connection errors, the datagram prefix of a
//!   request stream, writing responses.
//! - [`h2`]: HTTP/2 plumbing: writing DATAGRAM capsules to a stream as flow
//!   control allows.
//! - [`udp`]: socket buffers and batched (GRO) receiving.
//! - [`tun`]: batched reads and coalescing (GRO) writes of a TUN device.
//! - [`wireguard`]: one datagram through a boringtun peer.
//! - [`dns`]: the authoritative DNS server for the mesh zone (hickory).
//! - [`accept`]: accept loops that pause, not spin, when out of descriptors.
//! - [`operator`]: the admin API client and the tables and traces it prints.
//! - [`logging`]: the binaries' log output.

pub mod accept;
pub mod dns;
pub mod h2;
pub mod h3;
pub mod logging;
pub mod netlink;
#[cfg(any(test, feature = "testing"))]
pub mod netns;
pub mod operator;
pub mod quic;
pub mod tun;
pub mod udp;
pub mod wireguard;
