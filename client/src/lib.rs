//! The tether edge agent and operator CLI.
//!
//! - [`enroll`]: `tether enroll`, key generation and enrollment.
//! - [`agent`]: `tether up`, the tunnel and its reconnection.
//! - [`tun`]: the TUN device and routes.
//! - [`h3client`], [`dial`]: HTTP/3 to the broker, endpoint resolution.
//! - [`state`]: the state directory.

pub mod agent;
pub mod dial;
pub mod enroll;
pub mod h3client;
pub mod state;
pub mod tun;
