//! The edge agent's configuration (`tether up --config tether.toml`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    ConfigError, Endpoint, Problems, check_interface_name, parse_endpoints, parse_prefix,
    parse_toml, read_toml,
};

/// The edge agent configuration file. Every field is optional; `tether
/// enroll` writes the broker endpoints and published CIDR it was given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientFile {
    /// Directory for the site key, certificate and CA. Default:
    /// `/var/lib/tether` when run as root, else `~/.local/state/tether`.
    pub state_dir: Option<PathBuf>,
    /// The published CIDR: every broker address must lie inside it.
    pub published_cidr: String,
    /// Broker endpoints (`host[:port]`, port 443 by default), tried in order.
    pub brokers: Vec<String>,
    /// LAN prefixes behind this site to expose (the broker maps each into
    /// its own address space).
    pub lans: Vec<String>,
    /// The source address traffic from the tunnel has on the LANs:
    /// `"edge"` (default) rewrites it to this host's own LAN address, so
    /// LAN hosts answer through their usual default router; `"original"`
    /// keeps the overlay source, for LANs that route the overlay pools
    /// back to this host.
    pub lan_source: String,
    /// Services this site offers on its overlay address: `"name=port"`
    /// (e.g. `"dicom=104"`) for one this host answers itself, or
    /// `{ name = "pacs", port = 104, target = "pacs.imaging.svc.cluster.local:11112" }`
    /// for one the agent forwards to a target in the edge cluster.
    /// Backends find them as SRV records `_<name>._tcp.<site>.<region>.<zone>`.
    pub services: Vec<crate::services::ServiceEntry>,
    /// The TUN device.
    pub tun: ClientTunFile,
    /// Transport behaviour.
    pub transport: TransportFile,
}

/// `[tun]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientTunFile {
    /// Device name (at most 15 characters).
    pub name: String,
}

/// `[transport]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportFile {
    /// How long to wait for an HTTP/3 handshake before trying HTTP/2.
    pub h3_timeout: String,
    /// Keepalive interval on an idle tunnel. It bounds how long a site takes
    /// to notice that its broker restarted (its next packet draws the new
    /// broker's stateless reset) and costs the broker one packet in and
    /// one out per idle site per interval.
    pub keepalive: String,
    /// HTTP proxy for HTTP/2 (`http://[user:pass@]host:port`); empty to use
    /// `HTTPS_PROXY` / `https_proxy` if set.
    pub proxy: String,
    /// Longest wait between reconnection attempts.
    pub max_backoff: String,
}

impl Default for ClientFile {
    fn default() -> Self {
        Self {
            state_dir: None,
            published_cidr: "127.0.0.0/8".into(),
            brokers: vec!["127.0.0.1:443".into()],
            lans: Vec::new(),
            lan_source: "edge".into(),
            services: Vec::new(),
            tun: ClientTunFile::default(),
            transport: TransportFile::default(),
        }
    }
}

impl Default for ClientTunFile {
    fn default() -> Self {
        Self {
            name: "tether0".into(),
        }
    }
}

impl Default for TransportFile {
    fn default() -> Self {
        Self {
            h3_timeout: "3s".into(),
            keepalive: "3s".into(),
            proxy: String::new(),
            max_backoff: "30s".into(),
        }
    }
}

/// The source address tunnel traffic has when it enters a LAN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LanSource {
    /// This host's own address on the LAN (the kernel masquerades).
    Edge,
    /// The overlay address it came from (the LAN routes the overlay back).
    Original,
}

impl LanSource {
    /// Parses the configuration value.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "edge" => Some(LanSource::Edge),
            "original" => Some(LanSource::Original),
            _ => None,
        }
    }
}

/// The validated edge agent configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// State directory, if set.
    pub state_dir: Option<PathBuf>,
    /// Published CIDR.
    pub published_cidr: IpNet,
    /// Broker endpoints.
    pub brokers: Vec<Endpoint>,
    /// LANs to expose.
    pub lans: Vec<IpNet>,
    /// The source address of tunnel traffic on the LANs.
    pub lan_source: LanSource,
    /// Announced TCP services (those forwarded included).
    pub services: Vec<tether_proto::dns::Service>,
    /// The services the agent forwards into the edge cluster.
    pub forwards: Vec<crate::services::Forward>,
    /// TUN device name.
    pub tun_name: String,
    /// HTTP/3 handshake timeout.
    pub h3_timeout: Duration,
    /// Keepalive interval.
    pub keepalive: Duration,
    /// Configured proxy URL, if any.
    pub proxy: Option<String>,
    /// Reconnection backoff cap.
    pub max_backoff: Duration,
}

impl ClientFile {
    /// Reads a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        read_toml(path)
    }

    /// Parses configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        parse_toml(text, origin)
    }

    /// The file as TOML.
    pub fn to_toml(&self) -> String {
        crate::to_toml(self)
    }

    /// Parses `lans` and refuses a LAN that overlaps the published CIDR
    /// or another LAN of this site: the host could not tell which of the
    /// two an address in the overlap belongs to.
    fn validate_lans(&self, p: &mut Problems, published_cidr: Option<IpNet>) -> Vec<IpNet> {
        let mut lans: Vec<IpNet> = Vec::with_capacity(self.lans.len());
        for (i, text) in self.lans.iter().enumerate() {
            let field = format!("lans[{i}]");
            let Some(lan) = parse_prefix(p, &field, text) else {
                continue;
            };
            if let Some(published) = published_cidr
                && overlaps(&lan, &published)
            {
                p.add(
                    &field,
                    format!("{lan} overlaps the published CIDR {published}, where the brokers are"),
                    "remove this LAN, or list only the part of it outside the published CIDR",
                );
            }
            let earlier = self.lans.iter().take(i).enumerate().find_map(|(j, t)| {
                let other = t.parse::<IpNet>().ok()?.trunc();
                overlaps(&lan, &other).then_some((j, other))
            });
            if let Some((j, other)) = earlier {
                p.add(
                    &field,
                    format!("{lan} overlaps lans[{j}] ({other})"),
                    "list each LAN once: keep the larger prefix, or split them so they do not overlap",
                );
            }
            lans.push(lan);
        }
        lans
    }

    /// Validates into a typed configuration.
    pub fn validate(&self, origin: &str) -> Result<ClientConfig, ConfigError> {
        let mut p = Problems::default();
        let published_cidr = parse_prefix(&mut p, "published_cidr", &self.published_cidr);
        let brokers = parse_endpoints(&mut p, "brokers", &self.brokers, 443, published_cidr);
        let lans = self.validate_lans(&mut p, published_cidr);
        let lan_source = LanSource::parse(&self.lan_source).unwrap_or_else(|| {
            p.add(
                "lan_source",
                format!("{:?} is neither \"edge\" nor \"original\"", self.lan_source),
                "write \"edge\" (LAN hosts see this host's address) or \"original\" (the LAN routes the overlay back to this host)",
            );
            LanSource::Edge
        });
        let (services, forwards) = crate::services::validate(&mut p, &self.services);
        check_interface_name(&mut p, "tun.name", &self.tun.name);
        let t = &self.transport;
        let h3_timeout = p.duration(
            "transport.h3_timeout",
            &t.h3_timeout,
            Duration::from_millis(500),
            Duration::from_secs(60),
        );
        let keepalive = p.duration(
            "transport.keepalive",
            &t.keepalive,
            Duration::from_secs(1),
            Duration::from_secs(300),
        );
        let max_backoff = p.duration(
            "transport.max_backoff",
            &t.max_backoff,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        );
        let proxy = (!t.proxy.is_empty()).then(|| t.proxy.clone());
        if let Some(proxy) = &proxy
            && !proxy.starts_with("http://")
        {
            p.add(
                "transport.proxy",
                format!("{proxy:?} is not an http:// proxy URL"),
                "write e.g. \"http://proxy.hospital.local:3128\"",
            );
        }
        let Some(published_cidr) = published_cidr else {
            return Err(p.into_error(origin));
        };
        p.finish(
            origin,
            ClientConfig {
                state_dir: self.state_dir.clone(),
                published_cidr,
                brokers,
                lans,
                lan_source,
                services,
                forwards,
                tun_name: self.tun.name.clone(),
                h3_timeout,
                keepalive,
                proxy,
                max_backoff,
            },
        )
    }
}

/// Whether two prefixes share an address (one contains the other).
fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

/// Refuses a LAN that overlaps a prefix the broker routes through the
/// tunnel (the overlay pools, the backends' prefixes), as the site last
/// learned them: replies to addresses in the overlap would go to the LAN
/// instead of the tunnel. `lans` are a validated configuration's, in the
/// file's order, so `lans[i]` names the field.
pub fn check_lans_against_tunnel(
    lans: &[IpNet],
    tunnel_routes: &[IpNet],
    origin: &str,
) -> Result<(), ConfigError> {
    let mut p = Problems::default();
    for (i, lan) in lans.iter().enumerate() {
        if let Some(route) = tunnel_routes.iter().find(|r| overlaps(lan, r)) {
            p.add(
                format!("lans[{i}]"),
                format!(
                    "{lan} overlaps {route}, which the broker routes through the tunnel (an overlay pool or a backend prefix)"
                ),
                "remove this LAN, or ask the operator which prefixes are free; the LAN must not share addresses with the overlay",
            );
        }
    }
    p.finish(origin, ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_endpoints_are_checked() {
        let c = ClientFile::parse("", "t").unwrap().validate("t").unwrap();
        assert_eq!(c.brokers[0].to_string(), "127.0.0.1:443");
        let err = ClientFile::parse(
            "published_cidr = \"203.0.113.0/24\"\nbrokers = [\"203.0.113.5\", \"10.1.1.1:443\", \"broker.example.org\"]\n[transport]\nproxy = \"socks5://x\"",
            "t",
        )
        .unwrap()
        .validate("t")
        .unwrap_err();
        let fields: Vec<&str> = err.problems().iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["brokers[1]", "transport.proxy"]);
    }

    fn problems(text: &str) -> Vec<(String, String)> {
        match ClientFile::parse(text, "t").unwrap().validate("t") {
            Ok(_) => Vec::new(),
            Err(e) => e
                .problems()
                .iter()
                .map(|p| (p.field.clone(), p.message.clone()))
                .collect(),
        }
    }

    #[test]
    fn a_lan_overlapping_the_published_cidr_or_another_lan_is_refused() {
        let found = problems(
            "published_cidr = \"203.0.113.0/24\"\nbrokers = [\"203.0.113.5\"]\nlans = [\"203.0.113.0/25\", \"10.0.0.0/8\", \"192.168.1.0/24\", \"192.168.1.0/25\", \"192.168.1.0/24\", \"172.16.0.0/12\", \"10.20.0.0/16\"]",
        );
        let fields: Vec<&str> = found.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["lans[0]", "lans[3]", "lans[4]", "lans[6]"]);
        assert!(
            found[0].1.contains("published CIDR 203.0.113.0/24"),
            "{found:?}"
        );
        assert!(found[1].1.contains("lans[2] (192.168.1.0/24)"), "{found:?}");
        assert!(found[3].1.contains("lans[1] (10.0.0.0/8)"), "{found:?}");
        // A LAN holding the whole published CIDR is refused too.
        let found = problems(
            "published_cidr = \"203.0.113.0/24\"\nbrokers = [\"203.0.113.5\"]\nlans = [\"203.0.0.0/16\"]",
        );
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            problems("lans = [\"192.168.1.0/24\", \"192.168.2.0/24\", \"fd00::/64\"]").is_empty()
        );
    }

    #[test]
    fn a_lan_overlapping_a_tunnel_route_is_refused() {
        let net = |t: &str| t.parse::<IpNet>().unwrap();
        let lans = [
            net("192.168.1.0/24"),
            net("100.64.0.0/16"),
            net("fd7a:115c:a1e0:1::/64"),
        ];
        let routes = [
            net("100.64.0.0/10"),
            net("fd7a:115c:a1e0::/48"),
            net("10.9.0.0/16"),
        ];
        let err = check_lans_against_tunnel(&lans, &routes, "t").unwrap_err();
        let fields: Vec<&str> = err.problems().iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["lans[1]", "lans[2]"]);
        assert!(err.problems()[0].message.contains("100.64.0.0/10"));
        assert!(check_lans_against_tunnel(&lans[..1], &routes, "t").is_ok());
        assert!(check_lans_against_tunnel(&lans, &[], "t").is_ok());
    }

    #[test]
    fn lan_source_defaults_to_the_edge_address_and_is_checked() {
        let c = ClientFile::parse("lans = [\"192.168.1.0/24\"]", "t")
            .unwrap()
            .validate("t")
            .unwrap();
        assert_eq!(c.lan_source, LanSource::Edge);
        assert_eq!(c.lans, ["192.168.1.0/24".parse::<IpNet>().unwrap()]);
        let c = ClientFile::parse("lan_source = \"original\"", "t")
            .unwrap()
            .validate("t")
            .unwrap();
        assert_eq!(c.lan_source, LanSource::Original);
        let err = ClientFile::parse("lan_source = \"router\"", "t")
            .unwrap()
            .validate("t")
            .unwrap_err();
        let fields: Vec<&str> = err.problems().iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["lan_source"]);
    }
}
