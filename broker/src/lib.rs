//! The tether broker: terminates site tunnels, allocates addresses from the
//! operator's pools, routes packets between sites and gateways, and serves
//! the admin API.

pub mod paths;
