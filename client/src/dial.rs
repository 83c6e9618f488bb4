//! Finding the broker: endpoints resolved and held to the published CIDR.

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use tether_config::{Endpoint, Host};

/// A resolved broker address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The endpoint as configured.
    pub endpoint: Endpoint,
    /// One of its addresses.
    pub addr: SocketAddr,
    /// The name to authenticate the broker as.
    pub server_name: String,
}

/// Why an endpoint cannot be dialled.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The name did not resolve.
    #[error("cannot resolve {endpoint}: {reason} (check DNS on this site)")]
    Resolve {
        /// The endpoint.
        endpoint: Endpoint,
        /// The resolver's message.
        reason: String,
    },
    /// Every address is outside the published CIDR.
    #[error(
        "{endpoint} resolves to {addrs}, outside the published CIDR {cidr}; hospital firewalls allow only that range, so tether refuses to dial it"
    )]
    OutsideCidr {
        /// The endpoint.
        endpoint: Endpoint,
        /// What it resolved to.
        addrs: String,
        /// The published CIDR.
        cidr: IpNet,
    },
}

/// Resolves an endpoint, keeping only addresses inside `cidr`.
pub async fn resolve(endpoint: &Endpoint, cidr: IpNet) -> Result<Vec<Target>, DialError> {
    let addrs: Vec<SocketAddr> = match &endpoint.host {
        Host::Ip(ip) => vec![SocketAddr::new(*ip, endpoint.port)],
        Host::Name(name) => tokio::net::lookup_host((name.as_str(), endpoint.port))
            .await
            .map_err(|e| DialError::Resolve {
                endpoint: endpoint.clone(),
                reason: e.to_string(),
            })?
            .collect(),
    };
    let inside: Vec<SocketAddr> = addrs
        .iter()
        .copied()
        .filter(|a| cidr.contains(&a.ip()))
        .collect();
    if inside.is_empty() {
        return Err(DialError::OutsideCidr {
            endpoint: endpoint.clone(),
            addrs: addrs
                .iter()
                .map(|a| a.ip().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            cidr,
        });
    }
    if inside.len() < addrs.len() {
        let outside: Vec<String> = addrs
            .iter()
            .filter(|a| !cidr.contains(&a.ip()))
            .map(|a| a.ip().to_string())
            .collect();
        tracing::warn!(
            "{endpoint} also resolves to {}, outside the published CIDR {cidr}: refused, only the addresses inside it are dialled",
            outside.join(", ")
        );
    }
    let server_name = match &endpoint.host {
        Host::Ip(ip) => ip.to_string(),
        Host::Name(n) => n.clone(),
    };
    Ok(inside
        .into_iter()
        .map(|addr| Target {
            endpoint: endpoint.clone(),
            addr,
            server_name: server_name.clone(),
        })
        .collect())
}

/// A local UDP endpoint of the same family as `addr`, with enlarged socket
/// buffers ([`tether_shell::udp::tune_socket`]).
pub fn client_endpoint(addr: &SocketAddr) -> std::io::Result<quinn::Endpoint> {
    client_endpoint_with(addr, quinn::EndpointConfig::default())
}

/// As [`client_endpoint`], for a connection whose packets are at most
/// `udp_payload` bytes: the endpoint says so in its transport parameters
/// (`max_udp_payload_size`), and the broker sends nothing larger on it.
pub fn client_endpoint_sized(
    addr: &SocketAddr,
    udp_payload: u16,
) -> std::io::Result<quinn::Endpoint> {
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(udp_payload)
        .map_err(std::io::Error::other)?;
    client_endpoint_with(addr, config)
}

fn client_endpoint_with(
    addr: &SocketAddr,
    config: quinn::EndpointConfig,
) -> std::io::Result<quinn::Endpoint> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .map_err(std::io::Error::other)?;
    let socket = std::net::UdpSocket::bind(bind)?;
    tether_shell::udp::tune_socket(&socket);
    let runtime =
        tether_shell::quic::runtime().ok_or_else(|| std::io::Error::other("no async runtime"))?;
    quinn::Endpoint::new(config, None, socket, runtime)
}

/// Whether the broker at `addr` answers a QUIC packet of `len` bytes (at
/// least 1200) of an unknown version (with Version Negotiation) within
/// `timeout`: whether the path carries UDP payloads of that size.
pub async fn answers_quic_of(addr: SocketAddr, len: usize, timeout: Duration) -> bool {
    use tether_proto::quic_probe::{is_version_negotiation, version_probe};
    let local: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let Ok(socket) = tokio::net::UdpSocket::bind(local).await else {
        return false;
    };
    // Fragments would cross a path that loses the tunnel's packets: the
    // probe goes whole or not at all, as they do.
    if tether_shell::udp::never_fragment(&socket).is_err() {
        return false;
    }
    let (dcid, scid): ([u8; 8], [u8; 8]) = (rand::random(), rand::random());
    if socket.connect(addr).await.is_err() {
        return false;
    }
    let probe = version_probe(dcid, scid, len);
    let wait = async {
        let mut buf = vec![0u8; 1500];
        // Two tries: one lost packet is not a verdict.
        for _ in 0..2 {
            if socket.send(&probe).await.is_err() {
                return false;
            }
            let answer = tokio::time::timeout(timeout / 2, async {
                loop {
                    match socket.recv(&mut buf).await {
                        Ok(n) if is_version_negotiation(&buf[..n], dcid, scid) => return true,
                        Ok(_) => continue,
                        Err(_) => return false,
                    }
                }
            })
            .await;
            if answer == Ok(true) {
                return true;
            }
        }
        false
    };
    wait.await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn addresses_outside_the_cidr_are_refused() {
        let cidr: IpNet = "203.0.113.0/24".parse().unwrap();
        let inside = Endpoint::parse("203.0.113.5", 443).unwrap();
        assert_eq!(
            resolve(&inside, cidr).await.unwrap()[0].addr,
            "203.0.113.5:443".parse().unwrap()
        );
        let outside = Endpoint::parse("198.51.100.5:443", 443).unwrap();
        let err = resolve(&outside, cidr).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("outside the published CIDR 203.0.113.0/24"),
            "{err}"
        );
        // A name that resolves (localhost) but outside the CIDR is refused too.
        let name = Endpoint::parse("localhost:443", 443).unwrap();
        assert!(matches!(
            resolve(&name, cidr).await,
            Err(DialError::OutsideCidr { .. }) | Err(DialError::Resolve { .. })
        ));
    }
}
