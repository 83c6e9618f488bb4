//! The tether broker: terminates site tunnels (CONNECT-IP over HTTP/3),
//! allocates addresses from the operator's pools, routes packets between
//! sites and gateways, and serves the admin API.
//!
//! - [`run`]: start and stop; [`state`]: the shared state.
//! - [`server`]: the QUIC/HTTP/3 listener; [`tunnel`]: a site's session;
//!   [`enroll`]: enrollment and renewal.
//! - [`plane`]: the forwarding plane; [`local_gateway`]: the TUN device;
//!   [`wireguard`]: gateways as WireGuard peers.
//! - [`names`]: identity DNS (the mesh zone, served and handed to
//!   gateways).
//! - [`admin`]: the admin API (its client is `tether_shell::operator`).
//! - [`store`]: the state store; [`metrics`]: Prometheus metrics.

pub mod access;
pub mod admin;
pub mod enroll;
pub mod h2server;
pub mod local_gateway;
pub mod metrics;
pub mod names;
pub mod paths;
pub mod plane;
pub mod run;
pub mod server;
pub mod state;
pub mod store;
pub mod tunnel;
pub mod wireguard;
