//! The gateway's configuration (`tether-gateway run --config gateway.toml`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tether_proto::ids::{GatewayId, RegionId};

use crate::{
    ConfigError, Endpoint, Problems, check_interface_name, parse_endpoints, parse_prefix,
    parse_toml, read_toml,
};

/// Default WireGuard port of the brokers.
pub const DEFAULT_WIREGUARD_PORT: u16 = 51820;

/// Routing table ids other software on a Cilium node uses: the kernel's
/// (253-255, and 0), Cilium's (200-202, 2004, 2005) and Tailscale's (52).
pub const RESERVED_TABLES: &[u32] = &[0, 52, 200, 201, 202, 2004, 2005, 253, 254, 255];
/// Rule priorities Cilium uses (1-112), plus the kernel's defaults (0,
/// 32766, 32767).
pub const RESERVED_PRIORITIES: std::ops::RangeInclusive<u32> = 1..=112;

/// The gateway configuration file. Every field is optional.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayFile {
    /// This gateway's id, as routes and traces show it.
    pub id: String,
    /// The region the gateway serves (data residency).
    pub region: String,
    /// The published CIDR; broker addresses must lie inside it.
    pub published_cidr: String,
    /// WireGuard endpoints of the brokers (`host[:port]`, port 51820 by
    /// default): every broker of the region; the gateway holds a session
    /// with each and fails over between them.
    pub brokers: Vec<String>,
    /// The brokers' WireGuard public key (`tether-broker gateway key`
    /// prints it). Required to run.
    pub broker_public_key: String,
    /// Directory for the gateway's private key. Default:
    /// `/var/lib/tether-gateway`.
    pub state_dir: Option<PathBuf>,
    /// The TUN device.
    pub tun: GatewayTunFile,
    /// Policy routing.
    pub routing: RoutingFile,
    /// DNS for the mesh zone inside the backend network, answered from the
    /// copy the broker keeps in step.
    pub dns: GatewayDnsFile,
    /// Prometheus metrics of the gateway's packet path (forwarded packets,
    /// and every packet dropped, by reason).
    pub metrics: GatewayMetricsFile,
}

/// `[metrics]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayMetricsFile {
    /// Address to serve `GET /metrics` on (plain HTTP, no authentication);
    /// empty to disable (the default). Choose an address only the
    /// scraper reaches, e.g. "127.0.0.1:9469" or the node's internal
    /// address.
    pub listen: String,
}

/// `[tun]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayTunFile {
    /// Device name (at most 15 characters).
    pub name: String,
    /// MTU inside the tunnel; TCP MSS is clamped to fit it. The default
    /// 1420 leaves room for WireGuard over IPv6 on a 1500-byte path.
    pub mtu: u16,
}

/// `[routing]`: where site routes are installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingFile {
    /// Routing table for site prefixes; clear of Cilium (200-202, 2004,
    /// 2005), Tailscale (52) and the kernel's tables.
    pub table: u32,
    /// Priority of the rule that sends traffic to `table`; clear of
    /// Cilium's priorities 1-112.
    pub rule_priority: u32,
}

/// `[dns]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayDnsFile {
    /// Address to serve the mesh zone on; empty to disable.
    pub listen: String,
}

impl Default for GatewayFile {
    fn default() -> Self {
        Self {
            id: "gw-1".into(),
            region: "local".into(),
            published_cidr: "127.0.0.0/8".into(),
            brokers: vec!["127.0.0.1:51820".into()],
            broker_public_key: String::new(),
            state_dir: None,
            tun: GatewayTunFile::default(),
            routing: RoutingFile::default(),
            dns: GatewayDnsFile::default(),
            metrics: GatewayMetricsFile::default(),
        }
    }
}

impl Default for GatewayTunFile {
    fn default() -> Self {
        Self {
            name: "tether-gw0".into(),
            mtu: tether_proto::gateway::DEFAULT_MTU,
        }
    }
}

impl Default for RoutingFile {
    fn default() -> Self {
        Self {
            table: 7300,
            rule_priority: 7300,
        }
    }
}

/// The validated gateway configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    /// Gateway id.
    pub id: GatewayId,
    /// Region.
    pub region: RegionId,
    /// Published CIDR.
    pub published_cidr: IpNet,
    /// Broker WireGuard endpoints.
    pub brokers: Vec<Endpoint>,
    /// The brokers' WireGuard public key, if configured.
    pub broker_public_key: Option<[u8; 32]>,
    /// Tunnel MTU.
    pub mtu: u16,
    /// State directory, if set.
    pub state_dir: Option<PathBuf>,
    /// TUN device name.
    pub tun_name: String,
    /// Routing table id.
    pub table: u32,
    /// Rule priority.
    pub rule_priority: u32,
    /// DNS listen address, if enabled.
    pub dns_listen: Option<SocketAddr>,
    /// Metrics listen address, if enabled.
    pub metrics_listen: Option<SocketAddr>,
}

impl GatewayFile {
    /// Reads a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        read_toml(path)
    }

    /// Parses configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        parse_toml(text, origin)
    }

    /// Validates into a typed configuration. `broker_public_key` may be
    /// empty (e.g. to print the gateway's own key before the broker's is
    /// known); [`GatewayFile::validate_for_run`] requires it.
    pub fn validate(&self, origin: &str) -> Result<GatewayConfig, ConfigError> {
        self.checked(origin, false)
    }

    /// Validates a configuration to run the gateway with: as
    /// [`GatewayFile::validate`], and `broker_public_key` must be set.
    pub fn validate_for_run(&self, origin: &str) -> Result<GatewayConfig, ConfigError> {
        self.checked(origin, true)
    }

    fn checked(&self, origin: &str, to_run: bool) -> Result<GatewayConfig, ConfigError> {
        let mut p = Problems::default();
        let id = GatewayId::new(self.id.clone())
            .map_err(|e| p.add("id", e.to_string(), "use a DNS label such as \"gw-eu-1\""))
            .ok();
        let region = RegionId::new(self.region.clone())
            .map_err(|e| {
                p.add(
                    "region",
                    e.to_string(),
                    "use the region name the broker configuration defines",
                )
            })
            .ok();
        let published_cidr = parse_prefix(&mut p, "published_cidr", &self.published_cidr);
        let brokers = parse_endpoints(
            &mut p,
            "brokers",
            &self.brokers,
            DEFAULT_WIREGUARD_PORT,
            published_cidr,
        );
        check_interface_name(&mut p, "tun.name", &self.tun.name);
        let broker_public_key = if self.broker_public_key.is_empty() {
            if to_run {
                p.add(
                    "broker_public_key",
                    "is empty: the gateway cannot authenticate the broker",
                    "set it to the output of `tether-broker gateway key` on the broker",
                );
            }
            None
        } else {
            crate::parse_wg_key(&mut p, "broker_public_key", &self.broker_public_key)
        };
        if !(1280..=9000).contains(&self.tun.mtu) {
            p.add(
                "tun.mtu",
                format!("MTU {} is out of range", self.tun.mtu),
                "use 1280 to 9000; the default 1420 leaves room for WireGuard over IPv6",
            );
        }
        if RESERVED_TABLES.contains(&self.routing.table) {
            p.add(
                "routing.table",
                format!(
                    "table {} is used by the kernel, Cilium or Tailscale",
                    self.routing.table
                ),
                "choose another id, e.g. the default 7300",
            );
        }
        let prio = self.routing.rule_priority;
        if prio == 0 || RESERVED_PRIORITIES.contains(&prio) || prio >= 32766 {
            p.add(
                "routing.rule_priority",
                format!("priority {prio} collides with Cilium's rules (1-112) or the kernel's (0, 32766, 32767)"),
                "choose a priority between 113 and 32765, e.g. the default 7300",
            );
        }
        let dns_listen = if self.dns.listen.is_empty() {
            None
        } else {
            self.dns
                .listen
                .parse()
                .map_err(|_| {
                    p.add(
                        "dns.listen",
                        format!("{:?} is not an address:port", self.dns.listen),
                        "write e.g. \"10.0.0.53:53\", or \"\" to disable",
                    )
                })
                .ok()
        };
        let metrics_listen = if self.metrics.listen.is_empty() {
            None
        } else {
            self.metrics
                .listen
                .parse()
                .map_err(|_| {
                    p.add(
                        "metrics.listen",
                        format!("{:?} is not an address:port", self.metrics.listen),
                        "write e.g. \"127.0.0.1:9469\", or \"\" to disable",
                    )
                })
                .ok()
        };
        let (Some(id), Some(region), Some(published_cidr)) = (id, region, published_cidr) else {
            return Err(p.into_error(origin));
        };
        p.finish(
            origin,
            GatewayConfig {
                id,
                region,
                published_cidr,
                brokers,
                broker_public_key,
                mtu: self.tun.mtu,
                state_dir: self.state_dir.clone(),
                tun_name: self.tun.name.clone(),
                table: self.routing.table,
                rule_priority: self.routing.rule_priority,
                dns_listen,
                metrics_listen,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_needs_the_brokers_key() {
        let file = GatewayFile::parse("", "g").unwrap();
        let problems = file.validate_for_run("g").unwrap_err().problems().to_vec();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, "broker_public_key");
        let key = "broker_public_key = \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"";
        let c = GatewayFile::parse(key, "g")
            .unwrap()
            .validate_for_run("g")
            .unwrap();
        assert_eq!(c.broker_public_key, Some([0; 32]));
    }

    #[test]
    fn defaults_validate() {
        let c = GatewayFile::parse("", "g").unwrap().validate("g").unwrap();
        assert_eq!((c.table, c.rule_priority), (7300, 7300));
        assert_eq!(c.brokers[0].port, 51820);
        assert_eq!(c.metrics_listen, None);
    }

    #[test]
    fn the_metrics_address_is_checked() {
        let c = GatewayFile::parse("[metrics]\nlisten = \"127.0.0.1:9469\"", "g")
            .unwrap()
            .validate("g")
            .unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9469".parse().unwrap()));
        let err = GatewayFile::parse("[metrics]\nlisten = \"9469\"", "g")
            .unwrap()
            .validate("g")
            .unwrap_err();
        assert_eq!(err.problems()[0].field, "metrics.listen");
        assert!(GatewayFile::parse("[metrics]\nport = 1", "g").is_err());
    }

    #[test]
    fn cilium_tables_and_priorities_are_refused() {
        for (table, prio) in [
            (200, 7300),
            (2004, 7300),
            (52, 7300),
            (7300, 100),
            (7300, 32766),
        ] {
            let text = format!("[routing]\ntable = {table}\nrule_priority = {prio}");
            let err = GatewayFile::parse(&text, "g")
                .unwrap()
                .validate("g")
                .unwrap_err();
            assert_eq!(err.problems().len(), 1, "{err}");
        }
        let err = GatewayFile::parse(
            "published_cidr = \"203.0.113.0/24\"\nbrokers = [\"198.51.100.1\"]",
            "g",
        )
        .unwrap()
        .validate("g")
        .unwrap_err();
        assert_eq!(err.problems()[0].field, "brokers[0]");
        assert!(
            err.problems()[0]
                .message
                .contains("outside the published CIDR")
        );
    }
}
