//! tether's own JSON messages: enrollment and renewal on the tunnel
//! listener, and the broker's admin API. Shared by the broker, the edge
//! agent and the operator CLI, so both ends agree on one definition.

use std::net::SocketAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::ids::{RegionId, SiteId};

/// Path of enrollment on the tunnel listener (POST, no client certificate).
pub const ENROLL_PATH: &str = "/.well-known/tether/enroll";
/// Path of certificate renewal on the tunnel listener (POST, site
/// certificate required).
pub const RENEW_PATH: &str = "/.well-known/tether/renew";
/// Path of re-attestation on the tunnel listener (POST, no client
/// certificate: the site proves it holds the key of its last certificate).
pub const REATTEST_PATH: &str = "/.well-known/tether/reattest";

/// Path a site asks for the brokers of its region (`POST`, with its
/// certificate): a long poll, answered when the list differs from the
/// version the site knows, or after [`BROKERS_HOLD_SECS`].
pub const BROKERS_PATH: &str = "/.well-known/tether/brokers";

/// How long the broker holds a brokers request whose list has not changed
/// before it answers with the same list.
pub const BROKERS_HOLD_SECS: u64 = 50;

/// A site's request for the brokers of its region.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokersRequest {
    /// The version of the list the site has; `None` (or another version
    /// than the broker's) is answered at once.
    #[serde(default)]
    pub known: Option<u64>,
}

/// The brokers of a site's region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokersResponse {
    /// Version of the list at the answering broker (changes whenever a
    /// broker joins, leaves or changes its endpoints).
    pub version: u64,
    /// Endpoints to dial (`host:port`), the answering broker's first.
    pub brokers: Vec<String>,
}

/// An enrollment request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The enrollment token (the code's token part is enough).
    pub token: String,
    /// The site's certificate signing request, DER in standard base64.
    pub csr: String,
}

/// What a site receives when it enrolls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    /// The SPIFFE identity in the certificate.
    pub identity: String,
    /// The site.
    pub site: SiteId,
    /// Its region.
    pub region: RegionId,
    /// The site certificate, PEM.
    pub certificate: String,
    /// The CA certificate that signed `certificate`, PEM.
    pub ca: String,
    /// The trust bundle: every CA certificate the deployment trusts, PEM,
    /// the signing CA first (two during a CA rotation). Absent from brokers
    /// that predate it; then `ca` is the bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_bundle: Option<String>,
    /// Certificate expiry, seconds since the Unix epoch.
    pub not_after: u64,
    /// Broker endpoints the site should dial (`host:port`).
    pub brokers: Vec<String>,
    /// The published CIDR all broker addresses lie in.
    pub published_cidr: IpNet,
}

/// A renewal request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// A CSR for a new key, DER in standard base64.
    pub csr: String,
}

/// A renewed certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewResponse {
    /// The new certificate, PEM.
    pub certificate: String,
    /// The CA certificate that signed `certificate`, PEM.
    pub ca: String,
    /// The trust bundle, as in [`EnrollResponse::trust_bundle`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_bundle: Option<String>,
    /// Certificate expiry, seconds since the Unix epoch.
    pub not_after: u64,
}

/// A re-attestation request: a site whose certificate expired (or that
/// the broker no longer accepts) asks for a new one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReattestRequest {
    /// The site's last certificate, PEM.
    pub certificate: String,
    /// A CSR for a new key, DER in standard base64; without one the broker
    /// only says whether it would re-attest the site (`tether doctor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
    /// The last certificate's key's signature (ECDSA P-256, ASN.1 DER, in
    /// standard base64) over the transcript of `tether_pki::reattest`,
    /// which binds this TLS connection, the CSR and the identity.
    pub signature: String,
}

/// The broker's answer to a re-attestation it grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReattestResponse {
    /// How long ago the certificate expired, by the broker's clock, in
    /// seconds (0: still valid).
    pub expired_secs: u64,
    /// The broker's re-attestation window, in seconds.
    pub window_secs: u64,
    /// The new certificate (absent when no CSR was sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed: Option<RenewResponse>,
}

/// The broker's answer to a re-attestation it refuses (status 403, or 401
/// for a proof that does not verify).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReattestRefused {
    /// What went wrong and what to do, in plain words.
    pub error: String,
    /// A stable label: `revoked`, `certificate_revoked`, `past_window`,
    /// `unknown_key`, `superseded`, `bad_proof`.
    pub reason: String,
}

/// An error body: a message for humans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong and what to do.
    pub error: String,
}

/// Admin API: create an enrollment token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// The site to enroll (unique across the deployment).
    pub site: SiteId,
    /// Its region.
    pub region: RegionId,
    /// Lifetime such as "24h"; the broker's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

/// Admin API: a created enrollment token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenResponse {
    /// The enrollment code to give the field engineer (shown once).
    pub code: String,
    /// The site it enrolls.
    pub site: SiteId,
    /// Its region.
    pub region: RegionId,
    /// Expiry, seconds since the Unix epoch.
    pub expires_at: u64,
    /// The command to run on the site.
    pub enroll_command: String,
    /// The endpoints sites dial (`host[:port]`), as the broker advertises
    /// them; empty from a broker that predates the field.
    #[serde(default)]
    pub brokers: Vec<String>,
    /// The broker's published CIDR, which a site's configuration needs;
    /// empty from a broker that predates the field.
    #[serde(default)]
    pub published_cidr: String,
}

/// Admin API: a site and its state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteInfo {
    /// The site.
    pub site: SiteId,
    /// Its region.
    pub region: RegionId,
    /// Its own overlay addresses.
    pub addresses: Vec<IpNet>,
    /// Its LANs and the prefixes they are mapped to.
    #[serde(default)]
    pub lans: Vec<LanMappingInfo>,
    /// Whether it is revoked.
    pub revoked: bool,
    /// Whether it has enrolled.
    pub enrolled: bool,
    /// Its live session on the broker that answered, if connected there.
    pub session: Option<SessionInfo>,
    /// The broker holding its session, if it is connected to a live broker
    /// of the fleet (this one or another); absent when it is offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<BrokerRef>,
}

/// Admin API: a broker of the fleet, as the admin views name the holder
/// of a session or the broker a route leads through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerRef {
    /// Its id in the fleet (absent for a broker whose store is not shared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Where sites dial it: its first advertised endpoint.
    pub address: String,
}

impl std::fmt::Display for BrokerRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.id {
            Some(id) => write!(f, "{} ({id})", self.address),
            None => f.write_str(&self.address),
        }
    }
}

/// Admin API: one session of the fleet (`GET /v1/sessions`). A session of
/// the broker that answered has every field of [`SessionInfo`]; one held
/// by another live broker only its site and region (what the fleet's
/// records in the store say), with `local: false`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetSession {
    /// The session's fields.
    #[serde(flatten)]
    pub session: SessionDetail,
    /// The broker holding it.
    pub broker: BrokerRef,
    /// Whether the broker that answered holds it.
    pub local: bool,
}

impl FleetSession {
    /// The site.
    pub fn site(&self) -> &SiteId {
        match &self.session {
            SessionDetail::Here(s) => &s.site,
            SessionDetail::Elsewhere { site, .. } => site,
        }
    }

    /// Its region.
    pub fn region(&self) -> &RegionId {
        match &self.session {
            SessionDetail::Here(s) => &s.region,
            SessionDetail::Elsewhere { region, .. } => region,
        }
    }
}

/// Admin API: what the broker that answered knows of a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SessionDetail {
    /// A session of this broker: everything.
    Here(Box<SessionInfo>),
    /// A session of another broker: its site and region.
    Elsewhere {
        /// The site.
        site: SiteId,
        /// Its region.
        region: RegionId,
    },
}

/// Admin API: a route (`GET /v1/routes`), with the broker it leads through
/// when its target is held by another broker of the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteInfo {
    /// The route.
    #[serde(flatten)]
    pub route: crate::route::Route,
    /// The broker the packets are relayed to over the broker-to-broker
    /// link; absent for a route of this broker's own sessions and
    /// gateways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<BrokerRef>,
}

/// Admin API: one site of the fleet's site list (`GET /v1/site-states`),
/// with its state and what the console shows of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteSummary {
    /// The site.
    pub site: SiteId,
    /// Its region.
    pub region: RegionId,
    /// Online, offline, flapping or revoked.
    pub state: crate::events::SiteState,
    /// In that state since, Unix seconds, when known.
    pub since: Option<u64>,
    /// Whether it has enrolled.
    pub enrolled: bool,
    /// The broker holding its tunnel, when online.
    pub broker: Option<String>,
    /// `h3`, `h2` or `h2-proxy`, when online here.
    pub transport: Option<String>,
    /// Its address as the broker sees it, when online here.
    pub remote: Option<SocketAddr>,
    /// Smoothed round-trip time, milliseconds, when online here.
    pub rtt_ms: Option<f64>,
    /// Its own overlay addresses.
    pub addresses: Vec<IpNet>,
    /// Its LANs and the prefixes they are mapped to.
    pub lans: Vec<LanMappingInfo>,
    /// When its newest certificate expires, Unix seconds, when known.
    pub cert_not_after: Option<u64>,
    /// Bytes from the site, through this broker since it started.
    pub rx_bytes: u64,
    /// Bytes to the site, through this broker since it started.
    pub tx_bytes: u64,
    /// The newest event of its timeline.
    pub last_event: Option<crate::events::SiteEvent>,
}

/// A LAN behind a site and the prefix it is mapped to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LanMappingInfo {
    /// The LAN as the hospital numbers it.
    pub lan: IpNet,
    /// The unique prefix it is reached at.
    pub mapped: IpNet,
    /// Set when the site no longer routes the LAN: when the mapping is
    /// released for other sites (Unix seconds) unless the site maps the LAN
    /// again before then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_at: Option<u64>,
}

/// Admin API: a page of the site list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SitePage {
    /// Sites that pass the filter, in all.
    pub total: usize,
    /// Index of the first site of this page among them.
    pub offset: usize,
    /// Sites in each state, of all sites (unfiltered).
    pub counts: std::collections::BTreeMap<String, usize>,
    /// This page, by region and site.
    pub sites: Vec<SiteSummary>,
}

/// Admin API: the filter and page of `GET /v1/site-states`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteListQuery {
    /// Words that must all appear in the site's id, region, addresses,
    /// LANs, remote address or transport.
    pub q: Option<String>,
    /// `online`, `offline`, `flapping` or `revoked`.
    pub state: Option<String>,
    /// Only this region.
    pub region: Option<String>,
    /// Only sites with an event within this duration (e.g. `1h`).
    pub since: Option<String>,
    /// Index of the first site to return.
    pub offset: Option<usize>,
    /// Most sites to return (default 100, at most 500).
    pub limit: Option<usize>,
}

/// Admin API: a site's timeline (`GET /v1/sites/{site}/events`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteEvents {
    /// The site.
    pub site: SiteId,
    /// Its region.
    pub region: RegionId,
    /// Its events, oldest first (the newest ones the broker keeps).
    pub events: Vec<crate::events::SiteEvent>,
}

/// Admin API: what the presented token may do (`GET /v1/whoami`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Whoami {
    /// `admin` (everything) or `viewer` (reads only).
    pub role: String,
}

/// Admin API: a live tunnel session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The site.
    pub site: SiteId,
    /// Its region.
    pub region: RegionId,
    /// `h3` or `h2`.
    pub transport: String,
    /// The site's address as the broker sees it (after hospital NAT).
    pub remote: SocketAddr,
    /// Connected since, seconds since the Unix epoch.
    pub since: u64,
    /// Smoothed round-trip time, milliseconds.
    pub rtt_ms: f64,
    /// Packets and bytes from the site.
    pub rx_packets: u64,
    /// Bytes from the site.
    pub rx_bytes: u64,
    /// Packets to the site.
    pub tx_packets: u64,
    /// Bytes to the site.
    pub tx_bytes: u64,
    /// Largest IP packet the tunnel carries now.
    pub mtu: Option<usize>,
    /// TCP services the site announces (SRV names).
    #[serde(default)]
    pub services: Vec<crate::dns::Service>,
    /// The site's packets dropped in this session, by reason (only reasons
    /// with drops).
    #[serde(default)]
    pub drops: std::collections::BTreeMap<String, u64>,
    /// The QUIC path under an HTTP/3 session as the broker's side sees it
    /// (absent over HTTP/2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathInfo>,
}

/// Admin API: the QUIC path under a session, from the broker's side, which
/// sends everything that goes to the site: how much it may have in flight,
/// what it lost, and what waits in front of the congestion controller.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PathInfo {
    /// The lowest round-trip time seen on the path, milliseconds.
    pub min_rtt_ms: f64,
    /// The congestion window: bytes the broker may have in flight.
    pub cwnd_bytes: u64,
    /// UDP packets sent to the site.
    pub sent_packets: u64,
    /// Of those, packets declared lost.
    pub lost_packets: u64,
    /// Bytes of the site's datagrams waiting to be sent, behind the
    /// congestion window (bounded by the connection's datagram queue).
    pub queued_bytes: u64,
}

impl PathInfo {
    /// The share of sent packets lost, percent (0 before any was sent).
    pub fn loss_percent(&self) -> f64 {
        if self.sent_packets == 0 {
            0.0
        } else {
            self.lost_packets as f64 * 100.0 / self.sent_packets as f64
        }
    }
}

/// Admin API: a gateway and the state of its tunnel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayInfo {
    /// Gateway id.
    pub id: crate::ids::GatewayId,
    /// Its region.
    pub region: RegionId,
    /// `wireguard` or `local` (the broker host's own device).
    pub kind: String,
    /// WireGuard public key (base64), for WireGuard gateways.
    pub public_key: Option<String>,
    /// Backend prefixes behind it.
    pub prefixes: Vec<ipnet::IpNet>,
    /// Where its packets come from, once it has been heard.
    pub endpoint: Option<SocketAddr>,
    /// Seconds since the last WireGuard handshake.
    pub last_handshake_secs: Option<u64>,
    /// IP packets from the gateway, through the tunnel.
    pub rx_packets: u64,
    /// Bytes of IP packets from the gateway.
    pub rx_bytes: u64,
    /// IP packets to the gateway.
    pub tx_packets: u64,
    /// Bytes of IP packets to the gateway.
    pub tx_bytes: u64,
    /// WireGuard bytes received from the gateway on the wire, handshakes
    /// and keepalives included (WireGuard gateways only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wire_rx_bytes: Option<u64>,
    /// WireGuard bytes sent to the gateway on the wire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wire_tx_bytes: Option<u64>,
}

/// Admin API: the outcome of a revocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeResponse {
    /// The site.
    pub site: SiteId,
    /// Its region.
    pub region: RegionId,
    /// Whether a live session was closed.
    pub closed_session: bool,
}

/// Admin API: the addresses freed by releasing a revoked site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseResponse {
    /// The site.
    pub site: SiteId,
    /// Its region.
    pub region: RegionId,
    /// The prefixes freed: its addresses and LAN mappings.
    pub released: Vec<ipnet::IpNet>,
}

/// Admin API: filters of `GET /v1/routes` (all optional, combined with
/// "and").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFilter {
    /// Routes to this site.
    pub site: Option<String>,
    /// Routes of this region.
    pub region: Option<String>,
    /// `site-address`, `site-lan` or `gateway`.
    pub kind: Option<String>,
    /// Routes whose prefix overlaps this prefix (an address is a /32 or
    /// /128).
    pub prefix: Option<String>,
}

/// Admin API: the answer of `GET /v1/trace/{target}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// What was asked: an address or a name.
    pub query: String,
    /// The site the name denotes, when a name was asked.
    pub name: Option<String>,
    /// The broker that answered (its id: the first tunnel address), which
    /// holds the sessions shown.
    pub broker: String,
    /// One path per address the query stands for.
    pub paths: Vec<TracePath>,
}

/// Admin API: how packets to one address travel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TracePath {
    /// The longest-prefix decision with every candidate.
    pub explanation: crate::route::Explanation,
    /// Where the winning route leads, if a route matched.
    pub target: Option<TraceTarget>,
    /// What the access policy says, when the trace names a sender.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyCheck>,
    /// The LAN host a mapped address stands for, when the winning route is
    /// a site's LAN mapping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lan: Option<LanHost>,
    /// The broker the packets are relayed to over the broker-to-broker
    /// link, when the winning route leads through another broker of the
    /// fleet (it holds the target's session or gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<BrokerRef>,
}

/// Admin API: the real host behind a mapped LAN address, and the mapping
/// that translates it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LanHost {
    /// The mapped address traced.
    pub address: std::net::IpAddr,
    /// The same host as the LAN numbers it.
    pub real: std::net::IpAddr,
    /// The site the LAN is behind.
    pub site: SiteId,
    /// The mapping rule: the real LAN and the prefix it is mapped to.
    pub mapping: crate::netmap::Mapping,
}

impl LanHost {
    /// The host `address` stands for among `site`'s LAN mappings, if one
    /// of their mapped prefixes holds it.
    pub fn find(
        address: std::net::IpAddr,
        site: &SiteId,
        mappings: &[crate::netmap::Mapping],
    ) -> Option<Self> {
        mappings.iter().find_map(|m| {
            m.real_of(address).map(|real| LanHost {
                address,
                real,
                site: site.clone(),
                mapping: *m,
            })
        })
    }
}

impl std::fmt::Display for LanHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} is {} on the LAN {} behind site {} (mapped to {})",
            self.address, self.real, self.mapping.real, self.site, self.mapping.mapped
        )
    }
}

/// Admin API: the query of `GET /v1/trace/{target}`: an optional sender
/// (an address, or a site's name) and traffic (`tcp/443`, `udp/53`,
/// `icmp`; default `icmp`) for the access policy's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceQuery {
    /// The sender.
    #[serde(default)]
    pub from: Option<String>,
    /// The traffic.
    #[serde(default)]
    pub traffic: Option<String>,
}

/// Admin API: the access policy's answer for a traced path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyCheck {
    /// The sender's address.
    pub from: std::net::IpAddr,
    /// Who the sender is: `site <id>`, `lan of site <id>`, `gateway <id>`.
    pub sender: String,
    /// The traffic checked, e.g. `tcp/443`.
    pub traffic: String,
    /// Whether it may pass.
    pub allowed: bool,
    /// Why, in words.
    pub verdict: String,
    /// The rule that allowed it, if one did.
    pub rule: Option<String>,
}

/// Admin API: the access policy in force (`GET /v1/policy`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyInfo {
    /// `region` or `rules`.
    pub backends: String,
    /// Groups and their sites.
    pub groups: std::collections::BTreeMap<String, Vec<String>>,
    /// The allow rules, in order.
    pub rules: Vec<PolicyRuleInfo>,
}

/// Admin API: one allow rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRuleInfo {
    /// Its name.
    pub name: String,
    /// Senders.
    pub from: Vec<String>,
    /// Receivers.
    pub to: Vec<String>,
    /// Traffic; empty is any.
    pub ports: Vec<String>,
}

/// Admin API: the next hop of a traced path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceTarget {
    /// `site` or `gateway`.
    pub kind: String,
    /// The site or gateway id.
    pub id: String,
    /// Its region.
    pub region: RegionId,
    /// For a site: its live session on this broker (transport, RTT, byte
    /// counters), or none when it is not connected.
    pub session: Option<SessionInfo>,
    /// For a gateway: its tunnel and counters.
    pub gateway: Option<GatewayInfo>,
    /// The data-residency decision for this target.
    pub residency: Vec<ResidencyCheck>,
}

/// Admin API: whether traffic between a site region and a gateway may flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResidencyCheck {
    /// The gateway.
    pub gateway: crate::ids::GatewayId,
    /// Its region.
    pub gateway_region: RegionId,
    /// The site region concerned.
    pub site_region: RegionId,
    /// Whether the policy lets packets flow between them.
    pub permitted: bool,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn fleet_sessions_keep_the_fields_of_a_session_and_name_their_broker() {
        let info = SessionInfo {
            site: "site-1".parse().unwrap(),
            region: "eu".parse().unwrap(),
            transport: "h3".into(),
            remote: "192.0.2.7:4433".parse().unwrap(),
            since: 1,
            rtt_ms: 1.5,
            rx_packets: 2,
            rx_bytes: 3,
            tx_packets: 4,
            tx_bytes: 5,
            mtu: Some(1350),
            services: Vec::new(),
            drops: Default::default(),
            path: Some(PathInfo {
                min_rtt_ms: 1.2,
                cwnd_bytes: 65_536,
                sent_packets: 200,
                lost_packets: 3,
                queued_bytes: 2_800,
            }),
        };
        let here = FleetSession {
            session: SessionDetail::Here(Box::new(info.clone())),
            broker: BrokerRef {
                id: Some("a1".into()),
                address: "192.0.2.1:443".into(),
            },
            local: true,
        };
        let json = serde_json::to_value(&here).unwrap();
        // A session as before, with two more fields.
        let mut before = serde_json::to_value(&info).unwrap();
        before["broker"] = serde_json::json!({"id": "a1", "address": "192.0.2.1:443"});
        before["local"] = true.into();
        assert_eq!(json, before);
        assert_eq!(serde_json::from_value::<FleetSession>(json).unwrap(), here);
        assert_eq!(info.path.unwrap().loss_percent(), 1.5);
        let there: FleetSession = serde_json::from_str(
            r#"{"site":"site-2","region":"eu","broker":{"id":"b2","address":"192.0.2.2:443"},"local":false}"#,
        )
        .unwrap();
        assert_eq!(
            (there.site().as_str(), there.region().as_str()),
            ("site-2", "eu")
        );
        assert!(matches!(there.session, SessionDetail::Elsewhere { .. }));
    }

    #[test]
    fn requests_with_unknown_fields_are_refused() {
        let e = serde_json::from_str::<EnrollRequest>(r#"{"token":"t","csr":"c","extra":1}"#)
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `extra`"), "{e}");
        let e = serde_json::from_str::<RenewRequest>(r#"{"csr":"c","site":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `site`"), "{e}");
        assert!(serde_json::from_str::<EnrollRequest>(r#"{"token":"t","csr":"c"}"#).is_ok());
    }

    #[test]
    fn a_mapped_address_names_the_real_lan_host_the_site_and_the_mapping() {
        let site = SiteId::new("hospital-a").unwrap();
        let mappings = [
            crate::netmap::Mapping::new(
                "10.0.0.0/16".parse().unwrap(),
                "100.65.0.0/16".parse().unwrap(),
            )
            .unwrap(),
            crate::netmap::Mapping::new(
                "192.168.1.0/24".parse().unwrap(),
                "100.64.9.0/24".parse().unwrap(),
            )
            .unwrap(),
        ];
        let host = LanHost::find("100.64.9.20".parse().unwrap(), &site, &mappings).unwrap();
        assert_eq!(
            host.real,
            "192.168.1.20".parse::<std::net::IpAddr>().unwrap()
        );
        assert_eq!(
            host.to_string(),
            "100.64.9.20 is 192.168.1.20 on the LAN 192.168.1.0/24 behind site hospital-a \
             (mapped to 100.64.9.0/24)"
        );
        // An address outside every mapped prefix stands for no LAN host.
        assert_eq!(
            LanHost::find("100.64.10.20".parse().unwrap(), &site, &mappings),
            None
        );
        // It survives the admin API's JSON.
        let json = serde_json::to_string(&host).unwrap();
        assert_eq!(serde_json::from_str::<LanHost>(&json).unwrap(), host);
    }
}

/// The deployment's CA state, as the admin API reports it
/// (`GET /v1/ca`, and the answer of `POST /v1/ca/rotate` and
/// `POST /v1/ca/rollback`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaStatus {
    /// The rotation phase: `stable`, `prepared` or `active`.
    pub phase: String,
    /// Counts rotation steps.
    pub generation: u64,
    /// When the phase began, Unix seconds.
    pub since: u64,
    /// The trust bundle, the signing CA first.
    pub bundle: Vec<CaInfo>,
    /// During `active`: from when the old CA may be retired, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_after: Option<u64>,
    /// After a rollback from `active`: from when the new CA may be dropped,
    /// Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_next_after: Option<u64>,
    /// What `rotate` would do next, in plain words.
    pub next_step: String,
}

/// One CA of the trust bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaInfo {
    /// The CA's subject common name (it carries a key fingerprint).
    pub name: String,
    /// The CA pin (enrollment codes carry it).
    pub pin: String,
    /// Whether it signs new certificates.
    pub signing: bool,
    /// Expiry, Unix seconds.
    pub not_after: u64,
}
