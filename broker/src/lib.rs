//! The tether broker: terminates site tunnels (CONNECT-IP over HTTP/3),
//! allocates addresses from the operator's pools, routes packets between
//! sites and gateways, and serves the admin API.
//!
//! - [`run`]: start and stop, the composition root; [`state`]: the
//!   [`Broker`](state::Broker) composed of its parts.
//! - [`core_cell`]: the broker core behind its lock, and the decisions
//!   carried out; [`sessions`]: the live sessions; [`counters`]: traffic
//!   and drop counters; [`error`]: errors.
//! - [`server`]: the QUIC/HTTP/3 listener; [`h2server`]: the HTTP/2
//!   listener; [`session`]: a site's CONNECT-IP session over either;
//!   [`enroll`]: enrollment and renewal; [`authority`]: the CA in use,
//!   the trust bundle and CA rotation ([`ca_admin`]: its admin routes);
//!   [`backup`]: backup and restore of the embedded store.
//! - [`plane`]: the forwarding plane and its device loops;
//!   [`local_gateway`]: the TUN device; [`wireguard`]: gateways as
//!   WireGuard peers.
//! - [`names`]: identity DNS (the mesh zone, served and handed to
//!   gateways).
//! - [`admin`]: the admin API (its client is `tether_shell::operator`);
//!   [`admin_listener`]: its bounded listener.
//! - [`fleet`]: the brokers sharing an etcd store (liveness, which broker
//!   holds each site); [`site_brokers`]: how sites learn them; [`link`]:
//!   the encrypted broker-to-broker link for packets of sites held
//!   elsewhere; [`peering`]: keeping the link and the routes through other
//!   brokers in step with the fleet.
//! - [`events`]: each site's event timeline (store and summary);
//!   [`console`]: the web console on the admin listener.
//! - [`store`]: the state store; [`metrics`]: Prometheus metrics.

pub mod access;
pub mod admin;
pub mod admin_listener;
pub mod authority;
pub mod backup;
pub mod bundle;
pub mod ca_admin;
pub mod cid;
pub mod console;
pub mod core_cell;
pub mod counters;
pub mod enroll;
pub mod error;
pub mod events;
pub mod fleet;
pub mod h2server;
pub mod link;
pub mod local_gateway;
pub mod memory;
pub mod metrics;
pub mod names;
pub mod paths;
pub mod peering;
pub mod plane;
pub mod report_memory;
pub mod run;
pub mod server;
pub mod session;
pub mod sessions;
pub mod site_brokers;
pub mod site_report;
pub mod state;
pub mod store;
pub mod wireguard;
