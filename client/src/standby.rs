//! The standby connection and the moves between brokers.
//!
//! While its tunnel runs on one broker, the agent keeps a second
//! connection, mTLS done and HTTP/3 SETTINGS exchanged, to another broker
//! of its list ([`dial`]). Nothing runs on it: no CONNECT-IP, so that
//! broker holds no session for the site and writes nothing to the store;
//! QUIC's keepalive ([`ClientConfig::keepalive`], 5 s by default) keeps it
//! and the NAT binding up. When the active broker is lost or says it is
//! going away, the tunnel is opened on the standby, which takes
//! one round trip instead of a handshake, and the new broker takes the
//! site's ownership with the same address.
//!
//! When the decisions are made (`tether_proto::agent::liveness`): the
//! agent's core.

use std::net::SocketAddr;

use tether_config::client::ClientConfig;
use tether_proto::tunnel::Transport;

use crate::dial::{self, Target};
use crate::failure::Failure;
use crate::link::{BrokerConn, Dialer};

/// Connects to the first broker of `config.brokers` (in dial order: see
/// [`crate::brokers::dial_config`]) on `transport` whose addresses are not
/// in `avoid` (the active broker, one going away).
pub async fn dial(
    dialer: &Dialer,
    config: &ClientConfig,
    transport: Transport,
    avoid: &[SocketAddr],
) -> Result<(BrokerConn, Target), Failure> {
    let mut targets = Vec::new();
    let mut errors = Vec::new();
    for endpoint in &config.brokers {
        match dial::resolve(endpoint, config.published_cidr).await {
            Ok(t) => targets.extend(t.into_iter().filter(|t| !avoid.contains(&t.addr))),
            Err(e) => errors.push(e.to_string()),
        }
    }
    if targets.is_empty() {
        return Err(Failure::lost(
            "no other broker to hold a standby connection to",
        ));
    }
    dialer.first(&[transport], &targets, errors).await
}
