//! The standby connection and the moves between brokers.
//!
//! While its tunnel runs on one broker, the agent keeps a second
//! connection to another broker of its list ([`dial`]), on the same
//! transport as the tunnel: the rung of the ladder that works from this
//! site (a network that blocks UDP would refuse an HTTP/3 standby). Over
//! HTTP/3 it is QUIC with mTLS done and SETTINGS exchanged; over HTTP/2
//! (directly or through the proxy) TCP and mTLS with the HTTP/2 SETTINGS
//! exchanged. Nothing runs on it: no CONNECT-IP, so that broker holds no
//! session for the site and writes nothing to the store; the transport's
//! keepalive ([`ClientConfig::keepalive`], 5 s by default: QUIC's, or
//! HTTP/2 PINGs both ways) keeps it and the NAT binding up. When the
//! active broker is lost or says it is going away, the tunnel is opened on
//! the standby, which takes one round trip instead of a handshake, and the
//! new broker takes the site's ownership with the same address.
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
