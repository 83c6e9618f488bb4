//! The tether gateway: runs in a backend cloud cluster next to Cilium and
//! connects the backend network to the brokers over WireGuard.
//!
//! - [`wireguard`]: the running gateway (boringtun, TUN device, control
//!   channel); [`routes`]: its routing table and rule.
//! - The mesh zone's DNS server is `tether_shell::dns` (the broker runs it
//!   too).
//! - [`live`]: the route set last received, kept for operators.
//! - [`cilium`]: CiliumCIDRGroup resources from the route set.
//! - [`preflight`]: conflicts on the node.
//! - [`metrics`]: counters of the packet path, served on `[metrics] listen`.

pub mod cilium;
pub mod live;
pub mod metrics;
pub mod preflight;
pub mod routes;
pub mod wireguard;
