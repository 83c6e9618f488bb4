//! The broker's configuration (`tether-broker run --config broker.toml`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tether_proto::ids::{GatewayId, RegionId, TrustDomain};
use tether_proto::ipam::{Ipam, IpamError, LanLimits};
use tether_proto::policy::Policy;

use crate::policy::{Known, PolicyFile};

use crate::{
    ConfigError, Problems, check_in_cidr, is_dns_name, parse_prefix, parse_toml, read_toml,
};

/// The broker configuration file. Every field is optional.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerFile {
    /// Directory for the CA, the store and the admin token. Default:
    /// `/var/lib/tether-broker` when run as root, else
    /// `~/.local/state/tether-broker`.
    pub data_dir: Option<PathBuf>,
    /// SPIFFE trust domain of all site identities, e.g. `tether.example.org`.
    pub trust_domain: String,
    /// The one CIDR hospital IT allows outbound on TCP and UDP 443. Every
    /// listen and advertised broker address must lie inside it.
    pub published_cidr: String,
    /// Socket addresses the tunnel listeners bind, UDP (HTTP/3) and TCP
    /// (HTTP/2) on the same port. An unspecified address (`0.0.0.0:443`)
    /// binds every interface; then `advertised` must name the public ones.
    pub listen: Vec<String>,
    /// Names and IP addresses sites use to reach this broker. They go into
    /// the broker's TLS certificate.
    pub advertised: Vec<String>,
    /// The admin API.
    pub admin: AdminFile,
    /// Tunnel timing and certificate lifetimes.
    pub tunnel: TunnelFile,
    /// Regions and their address pools (`[[region]]`, one or more).
    pub region: Vec<RegionFile>,
    /// A gateway on the broker host itself (a TUN device), for single-machine
    /// deployments.
    pub local_gateway: LocalGatewayFile,
    /// The WireGuard listener for gateways.
    pub wireguard: WireguardFile,
    /// Gateways in backend clouds (`[[gateway]]`), WireGuard peers of the
    /// broker.
    pub gateway: Vec<GatewayPeerFile>,
    /// Identity DNS: the mesh zone.
    pub dns: DnsFile,
    /// Who may reach whom (reloaded on SIGHUP).
    pub policy: PolicyFile,
    /// Where the broker keeps its state: the embedded store in the data
    /// directory (default) or a shared etcd cluster.
    pub store: StoreFile,
    /// `[peering]`: the encrypted link to the other brokers of the fleet,
    /// used with the etcd store.
    pub peering: PeeringFile,
    /// `[ca]`: how the CA's private keys are protected at rest.
    pub ca: CaFile,
}

/// `[ca]`: the key-encryption key (KEK) that seals the CA's private keys
/// in the store and in backups.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaFile {
    /// File holding the KEK: 32 random bytes in base64 on one line
    /// (`tether-broker ca new-kek --out FILE`). Unset with the embedded
    /// store: `<data_dir>/ca-kek`, created (mode 0600) on first start.
    /// Required with etcd, where every broker needs the same key.
    pub key_encryption_key_file: Option<PathBuf>,
}

/// The KEK file's name in the data directory when `[ca]` names none.
pub const DEFAULT_KEK_FILE: &str = "ca-kek";

/// `[peering]`: the broker-to-broker link (WireGuard over UDP) that
/// carries packets for sites and gateways held by another broker. Used
/// only with `store.backend = "etcd"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeeringFile {
    /// UDP socket address of the link. Empty: the IP address of the first
    /// `listen` address on port 51821 (on port 0, a port the system
    /// picks, when that `listen` address has port 0).
    pub listen: String,
    /// The address other brokers send to, announced in the fleet. Empty:
    /// `peering.listen` (with the port the system gave for port 0), or the
    /// first `advertised` IP address when `listen` is a wildcard.
    pub advertise: String,
    /// The largest IP packet the link carries (the path MTU between the
    /// brokers less 80 bytes of WireGuard over IPv6).
    pub mtu: u16,
    /// Also relay to brokers whose fleet record carries no proof of its
    /// link key from the deployment's CA (releases before such proofs),
    /// for a rolling upgrade only. Off: only proven brokers are peers.
    pub allow_unproven_peers: bool,
}

impl Default for PeeringFile {
    fn default() -> Self {
        Self {
            listen: String::new(),
            advertise: String::new(),
            mtu: 1420,
            allow_unproven_peers: false,
        }
    }
}

/// The default UDP port of the broker-to-broker link.
pub const DEFAULT_PEERING_PORT: u16 = 51821;

/// The validated broker-to-broker link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peering {
    /// Where the link's socket binds.
    pub listen: SocketAddr,
    /// What other brokers send to; `None`: the bound address.
    pub advertise: Option<SocketAddr>,
    /// The largest IP packet the link carries.
    pub mtu: u16,
    /// Records without a link proof are peers too (rolling upgrade).
    pub allow_unproven_peers: bool,
}

/// `[store]`: the state store backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreFile {
    /// `"embedded"` (a database file in the data directory, one broker) or
    /// `"etcd"` (a shared etcd cluster, see `[store.etcd]`).
    pub backend: String,
    /// The etcd cluster, used when `backend = "etcd"`.
    pub etcd: EtcdFile,
}

impl Default for StoreFile {
    fn default() -> Self {
        Self {
            backend: "embedded".into(),
            etcd: EtcdFile::default(),
        }
    }
}

/// `[store.etcd]`: a shared etcd cluster (v3 API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdFile {
    /// Client URLs of the etcd members, e.g.
    /// `["https://etcd-1.example.org:2379"]`. `https://` needs `ca_file`;
    /// `http://` (plaintext) is for loopback tests only.
    pub endpoints: Vec<String>,
    /// Every key the broker writes starts with this prefix, so several
    /// deployments can share one cluster. Prefixes of two deployments must
    /// not nest (`/tether/a/` and `/tether/a/b/`).
    pub prefix: String,
    /// Deadline of every etcd call, e.g. `"5s"`.
    pub timeout: String,
    /// CA certificate (PEM) that signed the etcd server certificates.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) the broker presents to etcd
    /// (`--client-cert-auth`); required in production.
    pub cert_file: Option<PathBuf>,
    /// Private key (PEM) of `cert_file`.
    pub key_file: Option<PathBuf>,
}

impl Default for EtcdFile {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            prefix: "/tether/".into(),
            timeout: "5s".into(),
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

/// The validated store backend.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StoreConfig {
    /// The embedded store in the data directory.
    #[default]
    Embedded,
    /// A shared etcd cluster.
    Etcd(EtcdConfig),
}

/// A validated etcd connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs, each `http://host:port` or `https://host:port`.
    pub endpoints: Vec<String>,
    /// Key prefix, ending in `/`.
    pub prefix: String,
    /// Deadline of every call.
    pub timeout: Duration,
    /// TLS, when the endpoints are `https://`.
    pub tls: Option<EtcdTls>,
}

/// TLS towards etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// CA certificate file (PEM).
    pub ca_file: PathBuf,
    /// Client certificate and key files (PEM), if the broker authenticates
    /// with a certificate.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// `[dns]`: the authoritative server for the mesh zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsFile {
    /// UDP and TCP socket addresses to answer on; empty to serve no DNS
    /// from the broker (gateways still get their copy of the zone).
    pub listen: Vec<String>,
    /// The zone: sites are `<site>.<region>.<zone>`.
    pub zone: String,
    /// TTL of answers and of negative answers, e.g. `"5s"`: how long
    /// caches may keep a name after the site is revoked.
    pub ttl: String,
}

impl Default for DnsFile {
    fn default() -> Self {
        Self {
            listen: vec!["127.0.0.1:8053".into()],
            zone: tether_proto::dns::DEFAULT_ZONE.into(),
            ttl: "5s".into(),
        }
    }
}

/// `[wireguard]`: where gateways reach the broker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WireguardFile {
    /// UDP socket addresses for WireGuard. Empty: the IP addresses of
    /// `listen` on port 51820. Bound only when a gateway is configured.
    pub listen: Vec<String>,
    /// A file holding the broker's WireGuard private key (base64, as `wg
    /// genkey` writes it), read and never written: for several brokers
    /// that gateways must find under one key, e.g. one Kubernetes Secret
    /// mounted by every broker. Unset: `wireguard.key` in the data
    /// directory, created on first start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
}

/// `[[gateway]]`: a gateway registered with the broker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayPeerFile {
    /// Gateway id, as shown in routes and traces (a DNS label).
    pub id: String,
    /// Region of the gateway (data residency).
    pub region: String,
    /// The gateway's WireGuard public key (`tether-gateway key` prints it).
    pub public_key: String,
    /// Backend prefixes behind the gateway: the sources it may send from,
    /// routed to it. Empty: any source outside the overlay.
    pub prefixes: Vec<String>,
    /// MTU of the tunnel to the gateway (default 1420, room for WireGuard
    /// over IPv6).
    pub mtu: Option<u16>,
}

/// `[admin]`: the authenticated admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminFile {
    /// Address of the admin API (HTTP, bearer token). Keep it on loopback
    /// unless a firewall guards it.
    pub listen: String,
    /// Longest wait for a complete request header (also between requests
    /// on a kept-alive connection), e.g. `"10s"`.
    pub header_read_timeout: String,
    /// Most admin connections open at once; more wait up to 0.5 s for a
    /// place, then are closed.
    pub max_connections: usize,
    /// DNS names the admin API answers to besides `localhost` (IP
    /// addresses always): a request naming any other name in its `Host`
    /// header is refused, the defence against DNS rebinding.
    pub allowed_hosts: Vec<String>,
    /// Whether `/metrics` (whose series name every site) needs the admin
    /// token, as the `/v1` API does; scrapers then send it.
    pub metrics_require_token: bool,
}

/// `[tunnel]`: timing and lifetimes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelFile {
    /// How often an idle tunnel is probed, e.g. `"10s"`.
    pub keepalive: String,
    /// How long a silent tunnel lives before it is closed; more than twice
    /// `keepalive`.
    pub idle_timeout: String,
    /// Lifetime of site certificates issued at enrollment and renewal
    /// (sites renew at half of it); at least 10 s, though anything under
    /// an hour is meant for tests.
    pub site_cert_lifetime: String,
    /// Default lifetime of enrollment tokens.
    pub token_ttl: String,
    /// Deadline of the TLS and HTTP/2 handshakes of a TCP connection and,
    /// without a client certificate, of its first request.
    pub handshake_timeout: String,
    /// Longest life of a TCP connection without a client certificate
    /// (enrollment needs one request).
    pub unauthenticated_lifetime: String,
    /// Most TCP connections without a client certificate (or still in
    /// their handshake) from one source address.
    pub max_unauthenticated_per_source: usize,
    /// Most TCP connections without a client certificate (or still in
    /// their handshake) in all; past it, the oldest is closed to admit a
    /// new one.
    pub max_unauthenticated: usize,
    /// How long after its certificate expired a site that was offline may
    /// still renew it by proving it holds its key (re-attestation), with no
    /// new enrollment code; `"0s"` turns re-attestation off.
    pub reattest_window: String,
    /// On SIGTERM, how long the broker waits for its sites to move to
    /// other brokers (it tells them with HTTP/3 GOAWAY) before it exits;
    /// `"0s"` exits at once.
    pub drain_timeout: String,
}

/// `[[region]]`: a data-residency region and its pools.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionFile {
    /// Region name (a DNS label), e.g. `eu-central`.
    pub name: String,
    /// IPv4 prefixes of the operator's own address space for this region.
    #[serde(default)]
    pub ipv4_pools: Vec<String>,
    /// IPv6 prefixes of the operator's own address space for this region.
    #[serde(default)]
    pub ipv6_pools: Vec<String>,
    /// Other regions whose gateways may also reach this region's sites
    /// (same region is always allowed).
    #[serde(default)]
    pub allow_gateways_from: Vec<String>,
    /// Most LAN mappings one site may hold in this region.
    #[serde(default = "default_max_lan_mappings")]
    pub max_lan_mappings_per_site: u32,
    /// Most IPv4 addresses one site's LAN mappings may cover together in
    /// this region (4096: a /20).
    #[serde(default = "default_max_lan_ipv4_addresses")]
    pub max_lan_ipv4_addresses_per_site: u64,
    /// Most IPv6 /64 subnets one site's LAN mappings may cover together in
    /// this region (256: a /56; a LAN longer than /64 counts as one).
    #[serde(default = "default_max_lan_ipv6_subnets")]
    pub max_lan_ipv6_subnets_per_site: u64,
    /// How long the mapping of a LAN that left a site's configuration is
    /// kept for the site (a LAN put back within it gets the same mapping)
    /// before it is released for other sites (1m to 3650d).
    #[serde(default = "default_lan_release_after")]
    pub lan_release_after: String,
}

fn default_max_lan_mappings() -> u32 {
    tether_proto::ipam::LanLimits::DEFAULT_MAX_MAPPINGS
}

fn default_max_lan_ipv4_addresses() -> u64 {
    tether_proto::ipam::LanLimits::DEFAULT_MAX_IPV4_ADDRESSES
}

fn default_max_lan_ipv6_subnets() -> u64 {
    tether_proto::ipam::LanLimits::DEFAULT_MAX_IPV6_SUBNETS
}

fn default_lan_release_after() -> String {
    "7d".into()
}

/// `[local_gateway]`: a TUN device on the broker host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalGatewayFile {
    /// Whether the broker creates the TUN device (needs CAP_NET_ADMIN).
    pub enabled: bool,
    /// Gateway id, as shown in routes and traces.
    pub id: String,
    /// Name of the TUN device.
    pub tun_name: String,
    /// Region of the gateway (data residency).
    pub region: String,
    /// Backend prefixes reachable through it, advertised to sites.
    pub prefixes: Vec<String>,
}

impl Default for BrokerFile {
    fn default() -> Self {
        Self {
            data_dir: None,
            trust_domain: "tether.internal".into(),
            published_cidr: "127.0.0.0/8".into(),
            listen: vec!["127.0.0.1:443".into()],
            advertised: vec!["127.0.0.1".into(), "localhost".into()],
            admin: AdminFile::default(),
            tunnel: TunnelFile::default(),
            region: vec![RegionFile {
                name: "local".into(),
                ipv4_pools: vec!["100.64.0.0/16".into()],
                ipv6_pools: vec!["fd74:6574:6865::/48".into()],
                allow_gateways_from: Vec::new(),
                max_lan_mappings_per_site: default_max_lan_mappings(),
                max_lan_ipv4_addresses_per_site: default_max_lan_ipv4_addresses(),
                max_lan_ipv6_subnets_per_site: default_max_lan_ipv6_subnets(),
                lan_release_after: default_lan_release_after(),
            }],
            local_gateway: LocalGatewayFile::default(),
            wireguard: WireguardFile::default(),
            gateway: Vec::new(),
            dns: DnsFile::default(),
            policy: PolicyFile::default(),
            store: StoreFile::default(),
            peering: PeeringFile::default(),
            ca: CaFile::default(),
        }
    }
}

impl Default for AdminFile {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7070".into(),
            header_read_timeout: "10s".into(),
            max_connections: 64,
            allowed_hosts: Vec::new(),
            metrics_require_token: false,
        }
    }
}

impl Default for TunnelFile {
    fn default() -> Self {
        Self {
            keepalive: "5s".into(),
            idle_timeout: "15s".into(),
            site_cert_lifetime: "24h".into(),
            token_ttl: "24h".into(),
            handshake_timeout: "10s".into(),
            unauthenticated_lifetime: "30s".into(),
            max_unauthenticated_per_source: 16,
            max_unauthenticated: 512,
            reattest_window: "90d".into(),
            drain_timeout: "10s".into(),
        }
    }
}

impl Default for LocalGatewayFile {
    fn default() -> Self {
        Self {
            enabled: false,
            id: "local".into(),
            tun_name: "tether-gw0".into(),
            region: "local".into(),
            prefixes: Vec::new(),
        }
    }
}

/// Limits of the admin API's listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminLimits {
    /// Longest wait for a complete request header.
    pub header_read_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
    /// DNS names (lower case, without port) accepted in the `Host` header
    /// besides `localhost`; IP addresses are always accepted.
    pub allowed_hosts: Vec<String>,
    /// Whether `/metrics` needs the admin token.
    pub metrics_require_token: bool,
}

/// Limits of the tunnel's TCP listener on connections that have not shown
/// a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelLimits {
    /// Deadline of the handshakes and, without a client certificate, of the
    /// first request.
    pub handshake_timeout: Duration,
    /// Longest life of a connection without a client certificate.
    pub unauthenticated_lifetime: Duration,
    /// Most such connections from one source address.
    pub max_unauthenticated_per_source: usize,
    /// Most such connections in all.
    pub max_unauthenticated: usize,
}

/// The validated broker configuration.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Data directory, if set in the file.
    pub data_dir: Option<PathBuf>,
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// The published CIDR.
    pub published_cidr: IpNet,
    /// Tunnel listen addresses.
    pub listen: Vec<SocketAddr>,
    /// DNS names in the broker certificate.
    pub advertised_names: Vec<String>,
    /// IP addresses in the broker certificate.
    pub advertised_ips: Vec<IpAddr>,
    /// Admin API address.
    pub admin_listen: SocketAddr,
    /// Limits of the admin API's listener.
    pub admin_limits: AdminLimits,
    /// Limits of the tunnel's TCP listener.
    pub tunnel_limits: TunnelLimits,
    /// Tunnel keepalive interval.
    pub keepalive: Duration,
    /// Tunnel idle timeout.
    pub idle_timeout: Duration,
    /// On SIGTERM, the longest wait for sites to move to other brokers.
    pub drain_timeout: Duration,
    /// Site certificate lifetime.
    pub site_cert_lifetime: Duration,
    /// Default enrollment token lifetime.
    pub token_ttl: Duration,
    /// How long after expiry a site certificate may re-attest.
    pub reattest_window: Duration,
    /// Regions by name.
    pub regions: BTreeMap<RegionId, Region>,
    /// Address management over the regions' pools.
    pub ipam: Ipam,
    /// The local gateway, if enabled.
    pub local_gateway: Option<LocalGateway>,
    /// WireGuard socket addresses (used when `gateways` is not empty).
    pub wireguard_listen: Vec<SocketAddr>,
    /// The broker's WireGuard key file when configured (read only), else
    /// `wireguard.key` in the data directory.
    pub wireguard_key_file: Option<PathBuf>,
    /// Registered gateways.
    pub gateways: Vec<GatewayPeer>,
    /// DNS listen addresses (UDP and TCP).
    pub dns_listen: Vec<SocketAddr>,
    /// The mesh zone, lowercase, without the trailing dot.
    pub dns_zone: String,
    /// TTL of DNS answers, seconds.
    pub dns_ttl: u32,
    /// The access policy.
    pub policy: Arc<Policy>,
    /// The state store backend.
    pub store: StoreConfig,
    /// The broker-to-broker link (used with etcd).
    pub peering: Peering,
    /// The key-encryption key file; `None`: [`DEFAULT_KEK_FILE`] in the
    /// data directory (embedded store only).
    pub ca_kek_file: Option<PathBuf>,
}

/// A validated gateway registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayPeer {
    /// Gateway id.
    pub id: GatewayId,
    /// Region.
    pub region: RegionId,
    /// WireGuard public key.
    pub public_key: [u8; 32],
    /// Backend prefixes behind it.
    pub prefixes: Vec<IpNet>,
    /// Tunnel MTU.
    pub mtu: u16,
}

/// A validated region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// IPv4 and IPv6 pools, in file order.
    pub pools: Vec<IpNet>,
    /// Regions whose gateways may reach this region's sites (besides itself).
    pub allow_gateways_from: BTreeSet<RegionId>,
    /// What one site may map of the pools.
    pub lan_limits: LanLimits,
}

/// A validated local gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalGateway {
    /// Gateway id.
    pub id: GatewayId,
    /// TUN device name.
    pub tun_name: String,
    /// Region.
    pub region: RegionId,
    /// Backend prefixes behind it.
    pub prefixes: Vec<IpNet>,
}

impl BrokerFile {
    /// Reads a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        read_toml(path)
    }

    /// Parses configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        parse_toml(text, origin)
    }

    /// The file as TOML (e.g. to show the effective defaults).
    pub fn to_toml(&self) -> String {
        crate::to_toml(self)
    }

    /// The embedded defaults as a configuration file, every field shown:
    /// `data_dir` as it is for the user running this, which depends on
    /// whether that is root (a comment says so).
    pub fn defaults_toml() -> String {
        let file = BrokerFile {
            data_dir: Some(crate::default_state_dir("tether-broker")),
            ..BrokerFile::default()
        };
        format!(
            "# data_dir: /var/lib/tether-broker when run as root, else $XDG_STATE_HOME/tether-broker\n# (~/.local/state/tether-broker); shown for the user who ran this.\n{}",
            file.to_toml()
        )
    }

    /// Validates into a typed configuration; `origin` names the file in
    /// errors.
    pub fn validate(&self, origin: &str) -> Result<BrokerConfig, ConfigError> {
        let mut p = Problems::default();

        let trust_domain = TrustDomain::new(self.trust_domain.clone()).map_err(|e| {
            p.add(
                "trust_domain",
                e.to_string(),
                "use a lowercase DNS name, e.g. \"tether.example.org\"",
            )
        });

        let published_cidr = parse_prefix(&mut p, "published_cidr", &self.published_cidr);

        let mut listen = Vec::new();
        for (i, text) in self.listen.iter().enumerate() {
            let field = format!("listen[{i}]");
            match text.parse::<SocketAddr>() {
                Ok(addr) => {
                    if let Some(cidr) = published_cidr
                        && !addr.ip().is_unspecified()
                    {
                        check_in_cidr(&mut p, &field, addr.ip(), cidr, "listen address");
                    }
                    listen.push(addr);
                }
                Err(_) => p.add(
                    field,
                    format!("{text:?} is not an address:port"),
                    "write e.g. \"203.0.113.10:443\" or \"[2001:db8::10]:443\"",
                ),
            }
        }
        if self.listen.is_empty() {
            p.add(
                "listen",
                "no listen address",
                "add at least one, e.g. listen = [\"0.0.0.0:443\"]",
            );
        }

        let mut advertised_names = Vec::new();
        let mut advertised_ips = Vec::new();
        for (i, text) in self.advertised.iter().enumerate() {
            let field = format!("advertised[{i}]");
            if let Ok(ip) = text.parse::<IpAddr>() {
                if let Some(cidr) = published_cidr {
                    check_in_cidr(&mut p, &field, ip, cidr, "advertised address");
                }
                advertised_ips.push(ip);
            } else if is_dns_name(text) {
                advertised_names.push(text.to_ascii_lowercase());
            } else {
                p.add(
                    field,
                    format!("{text:?} is neither an IP address nor a DNS name"),
                    "write a name like \"broker.example.org\" or an address",
                );
            }
        }
        if advertised_ips.is_empty() && advertised_names.is_empty() {
            p.add("advertised", "no advertised name or address", "list the names or addresses sites dial, e.g. advertised = [\"broker.example.org\"]");
        }
        if listen.iter().any(|a| a.ip().is_unspecified())
            && advertised_ips.is_empty()
            && advertised_names.is_empty()
        {
            p.add(
                "listen",
                "an unspecified listen address needs advertised addresses",
                "add the public names or addresses to advertised",
            );
        }

        let admin_listen = match self.admin.listen.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                p.add(
                    "admin.listen",
                    format!("{:?} is not an address:port", self.admin.listen),
                    "write e.g. \"127.0.0.1:7070\"",
                );
                None
            }
        };

        let keepalive = p.duration(
            "tunnel.keepalive",
            &self.tunnel.keepalive,
            Duration::from_secs(1),
            Duration::from_secs(300),
        );
        let idle_timeout = p.duration(
            "tunnel.idle_timeout",
            &self.tunnel.idle_timeout,
            Duration::from_secs(3),
            Duration::from_secs(3600),
        );
        let drain_timeout = p.duration(
            "tunnel.drain_timeout",
            &self.tunnel.drain_timeout,
            Duration::ZERO,
            Duration::from_secs(3600),
        );
        if idle_timeout <= keepalive * 2 {
            p.add(
                "tunnel.idle_timeout",
                format!("{} is not more than twice tunnel.keepalive ({})", self.tunnel.idle_timeout, self.tunnel.keepalive),
                "make idle_timeout at least three keepalive intervals, so one lost probe does not end a tunnel",
            );
        }
        let site_cert_lifetime = p.duration(
            "tunnel.site_cert_lifetime",
            &self.tunnel.site_cert_lifetime,
            Duration::from_secs(10),
            Duration::from_secs(30 * 86_400),
        );
        let token_ttl = p.duration(
            "tunnel.token_ttl",
            &self.tunnel.token_ttl,
            Duration::from_secs(300),
            Duration::from_secs(30 * 86_400),
        );

        let (admin_limits, tunnel_limits) = self.validate_connection_limits(&mut p);

        let reattest_window = p.duration(
            "tunnel.reattest_window",
            &self.tunnel.reattest_window,
            Duration::ZERO,
            Duration::from_secs(3650 * 86_400),
        );

        let (dns_listen, dns_zone, dns_ttl) = self.validate_dns(&mut p);
        let regions = self.validate_regions(&mut p);
        let ipam = self.build_ipam(&mut p, &regions);
        let local_gateway = self.validate_local_gateway(&mut p, &regions);
        let gateways = self.validate_gateways(&mut p, &regions, local_gateway.as_ref());
        let wireguard_listen = self.validate_wireguard(&mut p, &listen, published_cidr);
        let policy = {
            let mut gateway_ids: Vec<&GatewayId> = gateways.iter().map(|g| &g.id).collect();
            gateway_ids.extend(local_gateway.as_ref().map(|g| &g.id));
            let known = Known {
                regions: Some(regions.keys().collect()),
                gateways: Some(gateway_ids),
            };
            self.policy.compile(&mut p, &known).map(Arc::new)
        };
        let store = self.store.validate(&mut p);
        if matches!(store, Some(StoreConfig::Etcd(_))) && self.ca.key_encryption_key_file.is_none()
        {
            p.add(
                "ca.key_encryption_key_file",
                "required with store.backend = \"etcd\": the CA keys in etcd are encrypted, and every broker needs the same key-encryption key",
                "make one with `tether-broker ca new-kek --out /etc/tether/ca-kek`, copy it to every broker (mode 0600) and name it here",
            );
        }
        if let Some(path) = &self.ca.key_encryption_key_file
            && !path.is_absolute()
        {
            p.add(
                "ca.key_encryption_key_file",
                format!("{} is a relative path", path.display()),
                "give an absolute path, e.g. \"/etc/tether/ca-kek\"",
            );
        }
        let peering = self.validate_peering(&mut p, &listen, &advertised_ips);

        let (Ok(trust_domain), Some(published_cidr), Some(admin_listen), Some(policy)) =
            (trust_domain, published_cidr, admin_listen, policy)
        else {
            return Err(p.into_error(origin));
        };
        p.finish(
            origin,
            BrokerConfig {
                data_dir: self.data_dir.clone(),
                trust_domain,
                published_cidr,
                listen,
                advertised_names,
                advertised_ips,
                admin_listen,
                admin_limits,
                tunnel_limits,
                keepalive,
                idle_timeout,
                drain_timeout,
                site_cert_lifetime,
                token_ttl,
                reattest_window,
                regions,
                ipam,
                local_gateway,
                wireguard_listen,
                wireguard_key_file: self.wireguard.key_file.as_ref().map(PathBuf::from),
                gateways,
                dns_listen,
                dns_zone,
                dns_ttl,
                policy,
                store: store.unwrap_or_default(),
                peering,
                ca_kek_file: self.ca.key_encryption_key_file.clone(),
            },
        )
    }

    fn validate_connection_limits(&self, p: &mut Problems) -> (AdminLimits, TunnelLimits) {
        let mut count = |field: &str, value: usize| {
            if value == 0 || value > 1_000_000 {
                p.add(
                    field,
                    format!("{value} is out of range"),
                    "use a number between 1 and 1000000",
                );
            }
            value.max(1)
        };
        let max_connections = count("admin.max_connections", self.admin.max_connections);
        let per_source = count(
            "tunnel.max_unauthenticated_per_source",
            self.tunnel.max_unauthenticated_per_source,
        );
        let total = count(
            "tunnel.max_unauthenticated",
            self.tunnel.max_unauthenticated,
        );
        let admin = AdminLimits {
            header_read_timeout: p.duration(
                "admin.header_read_timeout",
                &self.admin.header_read_timeout,
                Duration::from_millis(100),
                Duration::from_secs(300),
            ),
            max_connections,
            allowed_hosts: self
                .admin
                .allowed_hosts
                .iter()
                .map(|h| {
                    h.trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_ascii_lowercase()
                })
                .collect(),
            metrics_require_token: self.admin.metrics_require_token,
        };
        let tunnel = TunnelLimits {
            handshake_timeout: p.duration(
                "tunnel.handshake_timeout",
                &self.tunnel.handshake_timeout,
                Duration::from_millis(100),
                Duration::from_secs(120),
            ),
            unauthenticated_lifetime: p.duration(
                "tunnel.unauthenticated_lifetime",
                &self.tunnel.unauthenticated_lifetime,
                Duration::from_millis(100),
                Duration::from_secs(600),
            ),
            max_unauthenticated_per_source: per_source,
            max_unauthenticated: total,
        };
        (admin, tunnel)
    }

    fn validate_dns(&self, p: &mut Problems) -> (Vec<SocketAddr>, String, u32) {
        let mut listen = Vec::new();
        for (i, text) in self.dns.listen.iter().enumerate() {
            match text.parse::<SocketAddr>() {
                Ok(a) => listen.push(a),
                _ => p.add(
                    format!("dns.listen[{i}]"),
                    format!("{text:?} is not an address:port"),
                    "write e.g. \"127.0.0.1:8053\" or \"10.0.0.5:53\"",
                ),
            }
        }
        let zone = self.dns.zone.trim_end_matches('.').to_string();
        if !is_dns_name(&zone) || zone.bytes().any(|b| b.is_ascii_uppercase()) {
            p.add(
                "dns.zone",
                format!("{:?} is not a lowercase DNS name", self.dns.zone),
                "use a name you own or a reserved one, e.g. \"tether.internal\"",
            );
        }
        let ttl = p.duration(
            "dns.ttl",
            &self.dns.ttl,
            Duration::from_secs(1),
            Duration::from_secs(86_400),
        );
        (listen, zone, ttl.as_secs() as u32)
    }

    fn validate_peering(
        &self,
        p: &mut Problems,
        listen: &[SocketAddr],
        advertised_ips: &[IpAddr],
    ) -> Peering {
        // A broker on an ephemeral tunnel port (tests, several brokers on
        // one host) gets an ephemeral link port too.
        let fallback = match listen.first() {
            Some(a) if a.port() == 0 => SocketAddr::new(a.ip(), 0),
            Some(a) => SocketAddr::new(a.ip(), DEFAULT_PEERING_PORT),
            None => SocketAddr::new(
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                DEFAULT_PEERING_PORT,
            ),
        };
        let mut parse = |field: &str, text: &str| -> Option<SocketAddr> {
            if text.is_empty() {
                return None;
            }
            match text.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    p.add(
                        field,
                        format!("{text:?} is not an address:port"),
                        "write e.g. \"10.0.0.5:51821\"",
                    );
                    None
                }
            }
        };
        let listen_addr = parse("peering.listen", &self.peering.listen).unwrap_or(fallback);
        let mut advertise = parse("peering.advertise", &self.peering.advertise);
        if let Some(a) = advertise
            && (a.ip().is_unspecified() || a.port() == 0)
        {
            p.add(
                "peering.advertise",
                format!("{a} cannot be reached by other brokers"),
                "name the address and port other brokers send to, e.g. \"10.0.0.5:51821\"",
            );
            advertise = None;
        }
        if advertise.is_none() && listen_addr.ip().is_unspecified() {
            advertise = advertised_ips
                .first()
                .map(|ip| SocketAddr::new(*ip, listen_addr.port()));
        }
        if !(576..=65_535 - 80).contains(&self.peering.mtu) {
            p.add(
                "peering.mtu",
                format!("{} is out of range", self.peering.mtu),
                "use the path MTU between the brokers less 80, e.g. 1420 for 1500",
            );
        }
        Peering {
            listen: listen_addr,
            advertise,
            mtu: self.peering.mtu,
            allow_unproven_peers: self.peering.allow_unproven_peers,
        }
    }

    fn validate_wireguard(
        &self,
        p: &mut Problems,
        listen: &[SocketAddr],
        published_cidr: Option<IpNet>,
    ) -> Vec<SocketAddr> {
        if self.wireguard.listen.is_empty() {
            let mut out: Vec<SocketAddr> = listen
                .iter()
                .map(|a| SocketAddr::new(a.ip(), crate::gateway::DEFAULT_WIREGUARD_PORT))
                .collect();
            out.dedup();
            return out;
        }
        let mut out = Vec::new();
        for (i, text) in self.wireguard.listen.iter().enumerate() {
            let field = format!("wireguard.listen[{i}]");
            match text.parse::<SocketAddr>() {
                Ok(addr) => {
                    if let Some(cidr) = published_cidr
                        && !addr.ip().is_unspecified()
                    {
                        check_in_cidr(p, &field, addr.ip(), cidr, "WireGuard address");
                    }
                    out.push(addr);
                }
                Err(_) => p.add(
                    field,
                    format!("{text:?} is not an address:port"),
                    "write e.g. \"0.0.0.0:51820\"",
                ),
            }
        }
        out
    }

    fn validate_gateways(
        &self,
        p: &mut Problems,
        regions: &BTreeMap<RegionId, Region>,
        local: Option<&LocalGateway>,
    ) -> Vec<GatewayPeer> {
        let mut out: Vec<GatewayPeer> = Vec::new();
        let pools: Vec<IpNet> = regions.values().flat_map(|r| r.pools.clone()).collect();
        for (i, g) in self.gateway.iter().enumerate() {
            let field = |f: &str| format!("gateway[{i}].{f}");
            let id = GatewayId::new(g.id.clone())
                .map_err(|e| {
                    p.add(
                        field("id"),
                        e.to_string(),
                        "use a DNS label such as \"gw-eu-1\"",
                    )
                })
                .ok();
            if let Some(id) = &id
                && (out.iter().any(|o| &o.id == id) || local.is_some_and(|l| &l.id == id))
            {
                p.add(
                    field("id"),
                    format!("gateway id {id} is used twice"),
                    "give every gateway (and the local gateway) its own id",
                );
            }
            let region = match RegionId::new(g.region.clone()) {
                Ok(r) if regions.contains_key(&r) => Some(r),
                _ => {
                    p.add(
                        field("region"),
                        format!("unknown region {:?}", g.region),
                        format!(
                            "use one of the configured regions: {}",
                            regions
                                .keys()
                                .map(|r| r.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    );
                    None
                }
            };
            let public_key = crate::parse_wg_key(p, &field("public_key"), &g.public_key);
            if let Some(key) = public_key
                && out.iter().any(|o| o.public_key == key)
            {
                p.add(
                    field("public_key"),
                    "this key is registered for another gateway",
                    "every gateway generates its own key; run `tether-gateway key` on this one",
                );
            }
            let mut prefixes = Vec::new();
            for (j, t) in g.prefixes.iter().enumerate() {
                let f = field(&format!("prefixes[{j}]"));
                if let Some(prefix) = parse_prefix(p, &f, t) {
                    if let Some(pool) = pools.iter().find(|pool| {
                        pool.contains(&prefix.network()) || prefix.contains(&pool.network())
                    }) {
                        p.add(
                            f,
                            format!("{prefix} overlaps the pool {pool}: sites get addresses there"),
                            "list the backend network behind the gateway, outside every pool",
                        );
                    } else {
                        prefixes.push(prefix);
                    }
                }
            }
            let mtu = g.mtu.unwrap_or(tether_proto::gateway::DEFAULT_MTU);
            if !(1280..=9000).contains(&mtu) {
                p.add(
                    field("mtu"),
                    format!("MTU {mtu} is out of range"),
                    "use 1280 to 9000; the default 1420 leaves room for WireGuard over IPv6",
                );
            }
            if let (Some(id), Some(region), Some(public_key)) = (id, region, public_key) {
                out.push(GatewayPeer {
                    id,
                    region,
                    public_key,
                    prefixes,
                    mtu,
                });
            }
        }
        out
    }

    fn validate_regions(&self, p: &mut Problems) -> BTreeMap<RegionId, Region> {
        let mut regions = BTreeMap::new();
        if self.region.is_empty() {
            p.add(
                "region",
                "no region is configured",
                "add a [[region]] with a name and at least one pool",
            );
        }
        let names: BTreeSet<&str> = self.region.iter().map(|r| r.name.as_str()).collect();
        for (i, r) in self.region.iter().enumerate() {
            let id = match RegionId::new(r.name.clone()) {
                Ok(id) => id,
                Err(e) => {
                    p.add(
                        format!("region[{i}].name"),
                        e.to_string(),
                        "use a DNS label such as \"eu-central\"",
                    );
                    continue;
                }
            };
            if regions.contains_key(&id) {
                p.add(
                    format!("region[{i}].name"),
                    format!("region {id} is defined twice"),
                    "merge the two [[region]] entries",
                );
                continue;
            }
            let mut pools = Vec::new();
            for (family, list, want_v4) in [
                ("ipv4_pools", &r.ipv4_pools, true),
                ("ipv6_pools", &r.ipv6_pools, false),
            ] {
                for (j, text) in list.iter().enumerate() {
                    let field = format!("region[{i}].{family}[{j}]");
                    if let Some(prefix) = parse_prefix(p, &field, text) {
                        if matches!(prefix, IpNet::V4(_)) != want_v4 {
                            let other = if want_v4 { "ipv6_pools" } else { "ipv4_pools" };
                            p.add(
                                field,
                                format!(
                                    "{prefix} is not an {} prefix",
                                    if want_v4 { "IPv4" } else { "IPv6" }
                                ),
                                format!("move it to {other}"),
                            );
                        } else {
                            pools.push(prefix);
                        }
                    }
                }
            }
            if r.ipv4_pools.is_empty() && r.ipv6_pools.is_empty() {
                p.add(
                    format!("region[{i}]"),
                    format!("region {id} has no pool"),
                    "add ipv4_pools and/or ipv6_pools from your own address space",
                );
            }
            let mut allow = BTreeSet::new();
            for (j, name) in r.allow_gateways_from.iter().enumerate() {
                let field = format!("region[{i}].allow_gateways_from[{j}]");
                if !names.contains(name.as_str()) {
                    p.add(
                        field,
                        format!("unknown region {name:?}"),
                        format!(
                            "use one of the configured regions: {}",
                            names.iter().copied().collect::<Vec<_>>().join(", ")
                        ),
                    );
                } else if let Ok(other) = RegionId::new(name.clone()) {
                    allow.insert(other);
                }
            }
            let release_after = p.duration(
                &format!("region[{i}].lan_release_after"),
                &r.lan_release_after,
                Duration::from_secs(60),
                Duration::from_secs(3650 * 86_400),
            );
            regions.insert(
                id,
                Region {
                    pools,
                    allow_gateways_from: allow,
                    lan_limits: LanLimits {
                        max_mappings: r.max_lan_mappings_per_site,
                        max_ipv4_addresses: r.max_lan_ipv4_addresses_per_site,
                        max_ipv6_subnets: r.max_lan_ipv6_subnets_per_site,
                        release_after,
                    },
                },
            );
        }
        regions
    }

    /// Builds the IPAM, mapping its pool errors back to field names.
    fn build_ipam(&self, p: &mut Problems, regions: &BTreeMap<RegionId, Region>) -> Ipam {
        let pools = regions
            .iter()
            .map(|(id, r)| (id.clone(), r.pools.clone()))
            .collect();
        match Ipam::new(pools) {
            Ok(ipam) => regions.iter().fold(ipam, |ipam, (id, r)| {
                ipam.with_lan_limits(id.clone(), r.lan_limits)
            }),
            Err(e) => {
                let field =
                    |prefix: IpNet| self.pool_field(prefix).unwrap_or_else(|| "region".into());
                match &e {
                    IpamError::OverlappingPools { a, b } => p.add(
                        field(*b),
                        format!("{b} overlaps {a} ({})", field(*a)),
                        "give every pool, in every region, its own prefix",
                    ),
                    IpamError::PoolTooLarge(x)
                    | IpamError::PoolTooSmall(x)
                    | IpamError::HostBits(x, _) => p.add(
                        field(*x),
                        e.to_string(),
                        "choose a prefix of a usable size (IPv4 /30 or larger, IPv6 /8 or longer)",
                    ),
                    other => p.add("region", other.to_string(), "fix the pools"),
                }
                Ipam::default()
            }
        }
    }

    fn pool_field(&self, prefix: IpNet) -> Option<String> {
        self.region.iter().enumerate().find_map(|(i, r)| {
            [("ipv4_pools", &r.ipv4_pools), ("ipv6_pools", &r.ipv6_pools)]
                .into_iter()
                .find_map(|(family, list)| {
                    list.iter()
                        .position(|t| t.parse::<IpNet>().ok() == Some(prefix))
                        .map(|j| format!("region[{i}].{family}[{j}]"))
                })
        })
    }

    fn validate_local_gateway(
        &self,
        p: &mut Problems,
        regions: &BTreeMap<RegionId, Region>,
    ) -> Option<LocalGateway> {
        let g = &self.local_gateway;
        if !g.enabled {
            return None;
        }
        let id = GatewayId::new(g.id.clone())
            .map_err(|e| {
                p.add(
                    "local_gateway.id",
                    e.to_string(),
                    "use a DNS label such as \"local\"",
                )
            })
            .ok();
        let region = match RegionId::new(g.region.clone()) {
            Ok(r) if regions.contains_key(&r) => Some(r),
            _ => {
                p.add(
                    "local_gateway.region",
                    format!("unknown region {:?}", g.region),
                    format!(
                        "use one of the configured regions: {}",
                        regions
                            .keys()
                            .map(|r| r.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
                None
            }
        };
        crate::check_interface_name(p, "local_gateway.tun_name", &g.tun_name);
        let prefixes = g
            .prefixes
            .iter()
            .enumerate()
            .filter_map(|(i, t)| parse_prefix(p, &format!("local_gateway.prefixes[{i}]"), t))
            .collect();
        Some(LocalGateway {
            id: id?,
            tun_name: g.tun_name.clone(),
            region: region?,
            prefixes,
        })
    }
}

impl StoreFile {
    /// Validates `[store]`; `None` when a problem was recorded.
    fn validate(&self, p: &mut Problems) -> Option<StoreConfig> {
        match self.backend.as_str() {
            "embedded" => Some(StoreConfig::Embedded),
            "etcd" => self.etcd.validate(p).map(StoreConfig::Etcd),
            other => {
                p.add(
                    "store.backend",
                    format!("unknown store backend {other:?}"),
                    "use \"embedded\" (one broker, data directory) or \"etcd\" (shared cluster)",
                );
                None
            }
        }
    }
}

impl EtcdFile {
    fn validate(&self, p: &mut Problems) -> Option<EtcdConfig> {
        let before = p.0.len();
        if self.endpoints.is_empty() {
            p.add(
                "store.etcd.endpoints",
                "no etcd endpoint",
                "list the client URLs of the etcd members, e.g. endpoints = [\"https://etcd-1.example.org:2379\"]",
            );
        }
        let tls_wanted = self.ca_file.is_some();
        for (i, url) in self.endpoints.iter().enumerate() {
            let field = format!("store.etcd.endpoints[{i}]");
            let rest = if let Some(rest) = url.strip_prefix("https://") {
                if !tls_wanted {
                    p.add(
                        &field,
                        format!("{url} is https:// but store.etcd.ca_file is not set"),
                        "set ca_file to the CA certificate that signed the etcd server certificates",
                    );
                }
                rest
            } else if let Some(rest) = url.strip_prefix("http://") {
                if tls_wanted {
                    p.add(
                        &field,
                        format!("{url} is plaintext http:// while TLS files are configured"),
                        "use https:// URLs (etcd's --cert-file/--key-file), or remove the TLS files for a loopback test cluster",
                    );
                }
                rest
            } else {
                p.add(
                    &field,
                    format!("{url:?} is not an http:// or https:// URL"),
                    "write e.g. \"https://etcd-1.example.org:2379\"",
                );
                continue;
            };
            let host_port = rest.trim_end_matches('/');
            let port_ok = host_port
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok || host_port.contains('/') {
                p.add(
                    &field,
                    format!("{url:?} is not a URL of the form scheme://host:port"),
                    "write e.g. \"https://etcd-1.example.org:2379\" (etcd's client port, no path)",
                );
            }
        }
        let mut prefix = self.prefix.clone();
        if prefix.is_empty()
            || prefix == "/"
            || prefix.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            p.add(
                "store.etcd.prefix",
                format!("{:?} is not a usable key prefix", self.prefix),
                "use a non-empty prefix of printable characters naming the deployment, e.g. \"/tether/prod/\"",
            );
        } else if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let timeout = p.duration(
            "store.etcd.timeout",
            &self.timeout,
            Duration::from_millis(100),
            Duration::from_secs(120),
        );
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            (Some(_), None) => {
                p.add(
                    "store.etcd.key_file",
                    "cert_file is set without key_file",
                    "set key_file to the private key of the client certificate",
                );
                None
            }
            (None, Some(_)) => {
                p.add(
                    "store.etcd.cert_file",
                    "key_file is set without cert_file",
                    "set cert_file to the client certificate of the key",
                );
                None
            }
        };
        if identity.is_some() && self.ca_file.is_none() {
            p.add(
                "store.etcd.ca_file",
                "a client certificate is configured without ca_file",
                "set ca_file to the CA certificate that signed the etcd server certificates",
            );
        }
        let tls = self.ca_file.as_ref().map(|ca| EtcdTls {
            ca_file: ca.clone(),
            identity,
        });
        (p.0.len() == before).then(|| EtcdConfig {
            endpoints: self.endpoints.clone(),
            prefix,
            timeout,
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn defaults_show_the_data_dir() {
        let text = BrokerFile::defaults_toml();
        assert!(text.contains("\ndata_dir = "), "{text}");
        let parsed = BrokerFile::parse(&text, "defaults").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            parsed.data_dir,
            Some(crate::default_state_dir("tether-broker"))
        );
        assert_eq!(
            BrokerFile {
                data_dir: None,
                ..parsed
            },
            BrokerFile::default()
        );
    }

    use super::*;

    fn problems(toml: &str) -> Vec<crate::Problem> {
        let file = BrokerFile::parse(toml, "test.toml").unwrap();
        file.validate("test.toml").unwrap_err().problems().to_vec()
    }

    fn has(problems: &[crate::Problem], field: &str, needle: &str) -> bool {
        problems
            .iter()
            .any(|p| p.field == field && (p.message.contains(needle) || p.fix.contains(needle)))
    }

    #[test]
    fn empty_file_is_the_loopback_default() {
        let config = BrokerFile::parse("", "empty")
            .unwrap()
            .validate("empty")
            .unwrap();
        assert_eq!(config.listen, vec!["127.0.0.1:443".parse().unwrap()]);
        assert_eq!(
            config.published_cidr,
            "127.0.0.0/8".parse::<IpNet>().unwrap()
        );
        assert_eq!(config.regions.len(), 1);
        assert!(config.admin_listen.ip().is_loopback());
        assert_eq!(config.keepalive, Duration::from_secs(5));
        // The defaults survive a round trip through TOML.
        let again = BrokerFile::parse(&BrokerFile::default().to_toml(), "round-trip").unwrap();
        assert_eq!(again, BrokerFile::default());
    }

    #[test]
    fn per_site_lan_limits_are_set_per_region() {
        let toml = "[[region]]\nname = \"eu\"\nipv4_pools = [\"100.64.0.0/16\"]\n\
                    max_lan_mappings_per_site = 2\nmax_lan_ipv4_addresses_per_site = 256\n\
                    [[region]]\nname = \"us\"\nipv4_pools = [\"100.65.0.0/16\"]\n";
        let config = BrokerFile::parse(toml, "t").unwrap().validate("t").unwrap();
        let eu = config.ipam.lan_limits(&RegionId::new("eu").unwrap());
        assert_eq!((eu.max_mappings, eu.max_ipv4_addresses), (2, 256));
        assert_eq!(eu.max_ipv6_subnets, LanLimits::DEFAULT_MAX_IPV6_SUBNETS);
        assert_eq!(eu.release_after, Duration::from_secs(7 * 86_400));
        assert_eq!(
            config.ipam.lan_limits(&RegionId::new("us").unwrap()),
            LanLimits::default()
        );
    }

    #[test]
    fn the_lan_grace_period_is_a_checked_duration() {
        let region = |after: &str| {
            format!(
                "[[region]]\nname = \"eu\"\nipv4_pools = [\"100.64.0.0/16\"]\nlan_release_after = \"{after}\"\n"
            )
        };
        let config = BrokerFile::parse(&region("36h"), "t")
            .unwrap()
            .validate("t")
            .unwrap();
        assert_eq!(
            config
                .ipam
                .lan_limits(&RegionId::new("eu").unwrap())
                .release_after,
            Duration::from_secs(36 * 3600)
        );
        for bad in ["10s", "soon"] {
            let err = BrokerFile::parse(&region(bad), "t")
                .unwrap()
                .validate("t")
                .unwrap_err()
                .to_string();
            assert!(err.contains("region[0].lan_release_after"), "{err}");
        }
    }

    #[test]
    fn gateway_registrations_are_checked() {
        let key = "PGczmhJJZDKv8IR1wpKkQZXEh/tJ3wR/3t3WiFAXh3g=";
        let ok = format!(
            "[[gateway]]\nid = \"gw-1\"\nregion = \"local\"\npublic_key = \"{key}\"\nprefixes = [\"10.30.0.0/24\"]\n"
        );
        let config = BrokerFile::parse(&ok, "t").unwrap().validate("t").unwrap();
        assert_eq!(config.gateways.len(), 1);
        assert_eq!(config.gateways[0].mtu, 1420);
        assert_eq!(
            config.wireguard_listen,
            vec!["127.0.0.1:51820".parse::<SocketAddr>().unwrap()]
        );
        let bad = format!(
            "{ok}[[gateway]]\nid = \"gw-1\"\nregion = \"mars\"\npublic_key = \"nope\"\nprefixes = [\"100.64.1.0/24\"]\nmtu = 900\n"
        );
        let p = problems(&bad);
        assert!(has(&p, "gateway[1].id", "used twice"), "{p:?}");
        assert!(has(&p, "gateway[1].region", "unknown region"), "{p:?}");
        assert!(has(&p, "gateway[1].public_key", "WireGuard key"), "{p:?}");
        assert!(
            has(&p, "gateway[1].prefixes[0]", "overlaps the pool"),
            "{p:?}"
        );
        assert!(has(&p, "gateway[1].mtu", "out of range"), "{p:?}");
        let dup_key =
            format!("{ok}[[gateway]]\nid = \"gw-2\"\nregion = \"local\"\npublic_key = \"{key}\"\n");
        assert!(has(
            &problems(&dup_key),
            "gateway[1].public_key",
            "another gateway"
        ));
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_name() {
        let err = BrokerFile::parse("publishd_cidr = \"10.0.0.0/8\"", "x.toml").unwrap_err();
        assert!(err.to_string().contains("publishd_cidr"), "{err}");
        let err = BrokerFile::parse("[tunnel]\nkeepalve = \"1s\"", "x.toml").unwrap_err();
        assert!(err.to_string().contains("keepalve"), "{err}");
    }

    #[test]
    fn addresses_outside_the_published_cidr() {
        let ps = problems(
            r#"published_cidr = "203.0.113.0/24"
               listen = ["198.51.100.1:443", "0.0.0.0:443"]
               advertised = ["203.0.113.9", "198.51.100.2", "broker.example.org"]"#,
        );
        assert!(
            has(
                &ps,
                "listen[0]",
                "outside the published CIDR 203.0.113.0/24"
            ),
            "{ps:?}"
        );
        assert!(
            !ps.iter().any(|p| p.field == "listen[1]"),
            "unspecified bind is allowed"
        );
        assert!(
            has(&ps, "advertised[1]", "outside the published CIDR"),
            "{ps:?}"
        );
        assert!(
            !ps.iter()
                .any(|p| p.field == "advertised[0]" || p.field == "advertised[2]")
        );
    }

    #[test]
    fn the_peering_link_defaults_and_problems() {
        let valid = |toml: &str| {
            BrokerFile::parse(toml, "t")
                .unwrap()
                .validate("t")
                .unwrap_or_else(|e| panic!("{e}"))
                .peering
        };
        let p = valid("listen = [\"127.0.0.1:443\"]");
        assert_eq!(p.listen, "127.0.0.1:51821".parse().unwrap());
        assert_eq!((p.advertise, p.mtu), (None, 1420));
        assert!(!p.allow_unproven_peers, "proofs are required by default");
        let p = valid("[peering]\nallow_unproven_peers = true");
        assert!(p.allow_unproven_peers);
        let p = valid("listen = [\"127.0.0.1:0\"]");
        assert_eq!(p.listen, "127.0.0.1:0".parse().unwrap(), "ephemeral");
        let p = valid("listen = [\"0.0.0.0:443\"]\nadvertised = [\"127.0.0.5\"]");
        assert_eq!(p.advertise, Some("127.0.0.5:51821".parse().unwrap()));
        let ps =
            problems("[peering]\nlisten = \"nowhere\"\nadvertise = \"0.0.0.0:51821\"\nmtu = 100");
        assert!(has(&ps, "peering.listen", "not an address:port"), "{ps:?}");
        assert!(has(&ps, "peering.advertise", "cannot be reached"), "{ps:?}");
        assert!(has(&ps, "peering.mtu", "out of range"), "{ps:?}");
    }

    #[test]
    fn pools_overlapping_or_of_the_wrong_family() {
        let ps = problems(
            r#"[[region]]
               name = "eu"
               ipv4_pools = ["100.64.0.0/16", "fd00::/48"]
               [[region]]
               name = "us"
               ipv4_pools = ["100.64.1.0/24"]"#,
        );
        assert!(
            has(&ps, "region[0].ipv4_pools[1]", "move it to ipv6_pools"),
            "{ps:?}"
        );
        assert!(
            has(
                &ps,
                "region[1].ipv4_pools[0]",
                "overlaps 100.64.0.0/16 (region[0].ipv4_pools[0])"
            ),
            "{ps:?}"
        );
        let ps = problems("[[region]]\nname = \"eu\"\nipv4_pools = [\"100.64.0.1/16\"]");
        assert!(
            has(&ps, "region[0].ipv4_pools[0]", "100.64.0.0/16"),
            "{ps:?}"
        );
    }

    #[test]
    fn unknown_regions_and_bad_names() {
        let ps = problems(
            r#"[[region]]
               name = "eu"
               ipv4_pools = ["100.64.0.0/16"]
               allow_gateways_from = ["us"]
               [[region]]
               name = "EU_2"
               ipv4_pools = ["100.65.0.0/16"]
               [local_gateway]
               enabled = true
               region = "asia""#,
        );
        assert!(
            has(
                &ps,
                "region[0].allow_gateways_from[0]",
                "unknown region \"us\""
            ),
            "{ps:?}"
        );
        assert!(has(&ps, "region[1].name", "uppercase"), "{ps:?}");
        assert!(
            has(&ps, "local_gateway.region", "unknown region \"asia\""),
            "{ps:?}"
        );
    }

    #[test]
    fn bad_durations() {
        let ps = problems(
            r#"[tunnel]
               keepalive = "10 parsecs"
               idle_timeout = "15s"
               site_cert_lifetime = "90d"
               token_ttl = "1s""#,
        );
        assert!(has(&ps, "tunnel.keepalive", "not a duration"), "{ps:?}");
        assert!(
            has(&ps, "tunnel.site_cert_lifetime", "out of range"),
            "{ps:?}"
        );
        assert!(
            has(&ps, "tunnel.token_ttl", "between 5m and 30days"),
            "{ps:?}"
        );
        let ps = problems("[tunnel]\nkeepalive = \"10s\"\nidle_timeout = \"15s\"");
        assert!(has(&ps, "tunnel.idle_timeout", "twice"), "{ps:?}");
    }

    #[test]
    fn store_backends_are_checked_by_field() {
        let config = BrokerFile::parse("", "t").unwrap().validate("t").unwrap();
        assert_eq!(config.store, StoreConfig::Embedded);
        let ok = "[ca]\nkey_encryption_key_file = \"/etc/tether/ca-kek\"\n[store]\nbackend = \"etcd\"\n[store.etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nprefix = \"/tether/test\"\ntimeout = \"2s\"\n";
        let ps = problems(
            "[store]\nbackend = \"etcd\"\n[store.etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n",
        );
        assert!(
            has(
                &ps,
                "ca.key_encryption_key_file",
                "every broker needs the same"
            ),
            "{ps:?}"
        );
        let ps = problems("[ca]\nkey_encryption_key_file = \"ca-kek\"");
        assert!(has(&ps, "ca.key_encryption_key_file", "relative"), "{ps:?}");
        let config = BrokerFile::parse(ok, "t").unwrap().validate("t").unwrap();
        let StoreConfig::Etcd(etcd) = config.store else {
            panic!("expected etcd")
        };
        assert_eq!(etcd.prefix, "/tether/test/");
        assert_eq!(etcd.timeout, Duration::from_secs(2));
        assert_eq!(etcd.tls, None);
        let tls = "[ca]\nkey_encryption_key_file = \"/k\"\n[store]\nbackend = \"etcd\"\n[store.etcd]\nendpoints = [\"https://etcd.example.org:2379\"]\nca_file = \"/ca.pem\"\ncert_file = \"/c.pem\"\nkey_file = \"/k.pem\"\n";
        let config = BrokerFile::parse(tls, "t").unwrap().validate("t").unwrap();
        let StoreConfig::Etcd(etcd) = config.store else {
            panic!("expected etcd")
        };
        assert_eq!(
            etcd.tls,
            Some(EtcdTls {
                ca_file: "/ca.pem".into(),
                identity: Some(("/c.pem".into(), "/k.pem".into()))
            })
        );

        let ps = problems("[store]\nbackend = \"zookeeper\"");
        assert!(has(&ps, "store.backend", "unknown store backend"), "{ps:?}");
        let ps = problems("[store]\nbackend = \"etcd\"\n[store.etcd]\nprefix = \"\"");
        assert!(
            has(&ps, "store.etcd.endpoints", "no etcd endpoint"),
            "{ps:?}"
        );
        assert!(has(&ps, "store.etcd.prefix", "not a usable"), "{ps:?}");
        let ps = problems(
            "[store]\nbackend = \"etcd\"\n[store.etcd]\nendpoints = [\"https://e:2379\", \"e:2379\", \"http://e\"]\ncert_file = \"/c.pem\"\ntimeout = \"forever\"",
        );
        assert!(has(&ps, "store.etcd.endpoints[0]", "ca_file"), "{ps:?}");
        assert!(has(&ps, "store.etcd.endpoints[1]", "not an http"), "{ps:?}");
        assert!(has(&ps, "store.etcd.endpoints[2]", "host:port"), "{ps:?}");
        assert!(
            has(&ps, "store.etcd.key_file", "without key_file"),
            "{ps:?}"
        );
        assert!(has(&ps, "store.etcd.timeout", "not a duration"), "{ps:?}");
        let ps = problems(
            "[store]\nbackend = \"etcd\"\n[store.etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nca_file = \"/ca.pem\"",
        );
        assert!(has(&ps, "store.etcd.endpoints[0]", "plaintext"), "{ps:?}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = BrokerFile::parse(
            "trust_domain = \"Bad Domain\"\npublished_cidr = \"nonsense\"\n[admin]\nlisten = \"x\"",
            "b.toml",
        )
        .unwrap()
        .validate("b.toml")
        .unwrap_err();
        let fields: Vec<&str> = err.problems().iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["trust_domain", "published_cidr", "admin.listen"]);
        let text = err.to_string();
        assert!(
            text.starts_with("b.toml is not a valid configuration:\n  - trust_domain:"),
            "{text}"
        );
    }
}
