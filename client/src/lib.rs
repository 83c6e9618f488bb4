//! The tether edge agent and operator CLI.
//!
//! - [`enroll`]: `tether enroll`, key generation and enrollment, and
//!   certificate renewal.
//! - [`agent`]: `tether up`, the shell of `tether_proto::agent::AgentCore`
//!   (the tunnel and its reconnection); [`pumps`]: its packet pumps.
//! - [`brokers`]: the brokers of the region, learned over the tunnel.
//! - [`report`]: problems sent to the broker for the site's timeline;
//!   [`clock`]: this host's clock against the broker's, reported when wrong.
//! - [`tun`]: the TUN device and routes; [`lan`]: the LANs behind the
//!   site and the site's nftables table; [`expose`]: services forwarded
//!   into the edge cluster.
//! - [`link`]: a connection to a broker on one rung of the transport
//!   ladder, and the tunnel on it; [`h3client`], [`h2client`], [`proxy`]
//!   carry it; [`dial`] resolves endpoints; [`failure`] says how an attempt
//!   ended.
//! - [`doctor`], [`firewall`]: `tether doctor` and `tether firewall-rule`.
//! - [`health`]: the agent's health endpoint (`tether up --health-listen`).
//! - The admin API client and the tables of `tether routes`, `tether
//!   sites`, `tether trace` are `tether_shell::operator` (the broker's CLI
//!   prints them too).
//! - [`state_dir`]: the state directory.

pub mod agent;
pub mod brokers;
pub mod clock;
pub mod dial;
pub mod doctor;
pub mod enroll;
pub mod expose;
pub mod failure;
pub mod firewall;
pub mod h2client;
pub mod h3client;
pub mod health;
pub mod lan;
pub mod link;
pub mod proxy;
pub mod pumps;
pub mod report;
pub mod standby;
pub mod state_dir;
pub mod tun;
