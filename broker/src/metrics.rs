//! The broker's Prometheus metrics.
//!
//! Names follow `tether_broker_<thing>_<unit>`; every drop carries a
//! `reason`. Counter handles are registered once, so the packet path only
//! does atomic additions.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::SystemTime;

use metrics::{
    Counter, Gauge, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge,
    histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tether_proto::forward::DropReason;
use tether_proto::tunnel::Transport;

/// The process-wide Prometheus recorder (installed once).
pub fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new();
        // Handshakes as a histogram (not a summary), so that quantiles
        // can be aggregated over brokers.
        let builder = builder
            .set_buckets_for_metric(
                Matcher::Full(HANDSHAKE.to_string()),
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ],
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(ETCD_REQUEST.to_string()),
                    &[
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0,
                    ],
                )
            })
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // A second broker in the same process (tests) shares the first
        // recorder; failing to install again is expected then.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

const HANDSHAKE: &str = "tether_broker_handshake_duration_seconds";

const ETCD_REQUEST: &str = "tether_broker_etcd_request_duration_seconds";

/// Help texts of every metric (Prometheus HELP lines).
fn describe() {
    describe_histogram!(
        ETCD_REQUEST,
        Unit::Seconds,
        "Time of each etcd request of this broker, answered or not, by operation (store reads and writes, token transactions, fleet lease, announcements and claims; lease renewals from request to answer)."
    );
    describe_counter!(
        "tether_broker_etcd_errors_total",
        Unit::Count,
        "etcd requests of this broker that failed or got no answer within store.etcd.timeout, by operation."
    );
    describe_counter!(
        "tether_broker_fleet_failovers_total",
        Unit::Count,
        "Sessions this broker registered for a site whose last owner in etcd was another broker: the site failed over or was handed over to this broker."
    );
    describe_counter!(
        "tether_broker_connects_without_store_total",
        Unit::Count,
        "Sites that connected while etcd could not be reached: readmitted (held here last, addresses cached) or refused (held_elsewhere, not_held, left, new_address)."
    );
    describe_counter!(
        "tether_broker_fleet_fenced_total",
        Unit::Count,
        "Times this broker's fleet lease in etcd ran out without a renewal, so that it asked its sites to move to another broker."
    );
    describe_counter!(
        "tether_broker_relayed_on_packets_total",
        Unit::Count,
        "Packets another broker relayed here for a site that had just moved on to a third broker (a handover the sender had not learnt yet), relayed on to that broker."
    );
    describe_counter!(
        "tether_broker_relayed_packets_dropped_total",
        Unit::Count,
        "Packets another broker relayed here that this broker did not deliver, by reason (also counted in tether_broker_packets_dropped_total): residency and policy as this broker's own rules say for the sender the link's frame names, relay_frame for a frame it cannot read (another version), and every other reason a packet is not forwarded."
    );
    describe_counter!(
        "tether_broker_sessions_handed_over_total",
        Unit::Count,
        "Sessions whose site moved to another broker while this one drained on SIGTERM (moved), or were still here when the drain time ran out (stayed)."
    );
    describe_counter!(
        "tether_broker_site_events_dropped_total",
        Unit::Count,
        "Site timeline events not stored (the store failed or did not keep up)."
    );
    describe_counter!(
        "tether_broker_site_problems_total",
        Unit::Count,
        "Problems sites reported for their timelines, by outcome: stored, repeated (a kind stored lately, kept in memory, not stored), dropped (beyond the site's budget), refused (malformed or oversized reports)."
    );
    describe_counter!(
        "tether_broker_packets_total",
        Unit::Count,
        "IP packets forwarded, by direction (from_site, to_site, from_gateway, to_gateway)."
    );
    describe_counter!(
        "tether_broker_bytes_total",
        Unit::Bytes,
        "Bytes of IP packets forwarded, by direction."
    );
    describe_counter!(
        "tether_broker_packets_dropped_total",
        Unit::Count,
        "Packets not forwarded, by reason."
    );
    describe_counter!(
        "tether_broker_icmp_errors_sent_total",
        Unit::Count,
        "ICMP errors the broker sent back (unreachable, too big, time exceeded)."
    );
    describe_gauge!(
        "tether_broker_sessions",
        Unit::Count,
        "Live site sessions by transport (h3, h2, h2-proxy)."
    );
    describe_counter!(
        "tether_broker_transport_changes_total",
        Unit::Count,
        "Sessions that replaced one of the same site on a better (upgrade) or worse (fallback) transport."
    );
    describe_counter!(
        "tether_broker_wireguard_refused_total",
        Unit::Count,
        "WireGuard datagrams refused, by reason."
    );
    describe_counter!(
        "tether_broker_gateway_bytes_total",
        Unit::Bytes,
        "Bytes to and from each WireGuard gateway."
    );
    describe_counter!(
        "tether_broker_site_packets_total",
        Unit::Count,
        "IP packets from and to each site, over all its sessions on this broker."
    );
    describe_counter!(
        "tether_broker_site_bytes_total",
        Unit::Bytes,
        "Bytes from and to each site, over all its sessions on this broker."
    );
    describe_counter!(
        "tether_broker_site_packets_dropped_total",
        Unit::Count,
        "Packets a site sent that were not forwarded, by reason."
    );
    describe_histogram!(
        HANDSHAKE,
        Unit::Seconds,
        "TLS handshake time of accepted site connections, by transport (QUIC for h3, TCP for h2)."
    );
    describe_counter!(
        "tether_broker_dns_queries_total",
        Unit::Count,
        "DNS queries answered for the mesh zone, by response code."
    );
    describe_counter!(
        "tether_broker_enrollments_total",
        Unit::Count,
        "Enrollment attempts by result."
    );
    describe_counter!(
        "tether_broker_sessions_closed_total",
        Unit::Count,
        "Site sessions ended, by reason."
    );
    describe_gauge!(
        "tether_broker_connections_open",
        Unit::Count,
        "TCP connections open, by listener (admin; tunnel: all HTTP/2 connections; tunnel_unauthenticated: those not yet past a client certificate)."
    );
    describe_counter!(
        "tether_broker_connections_refused_total",
        Unit::Count,
        "TCP connections closed at once or cut short, by listener and reason (limit, source_limit, deadline, evicted: the oldest without a certificate, closed for a newer one when the total is held)."
    );
    describe_counter!(
        "tether_broker_accept_failures_total",
        Unit::Count,
        "Failed accepts (out of file descriptors and the like), by listener; each pauses the listener."
    );
    describe_counter!(
        "tether_broker_lan_mappings_refused_total",
        Unit::Count,
        "LAN mappings refused, by reason (site_lan_count, site_lan_space, exhausted, too_large, overlap, other)."
    );
    describe_counter!(
        "tether_broker_routes_refused_total",
        Unit::Count,
        "Prefixes of sites' route advertisements ignored, by reason (not_assigned: not inside what the site was given; protocol: limited to one IP protocol)."
    );
    describe_counter!(
        "tether_broker_lan_mappings_released_total",
        Unit::Count,
        "Unused LAN mappings released after their grace period (lan_release_after)."
    );
    describe_counter!(
        "tether_broker_connect_refused_total",
        Unit::Count,
        "CONNECT-IP requests refused, by HTTP status."
    );
    describe_counter!(
        "tether_broker_certificates_issued_total",
        Unit::Count,
        "Site certificates issued, by kind (enroll, renew, reattest)."
    );
    describe_counter!(
        "tether_broker_renewals_refused_total",
        Unit::Count,
        "Certificate renewals refused, by reason (expired: the certificate on the connection expired, the site re-attests instead; revoked: the site is revoked; certificate_revoked: the certificate on the connection is revoked)."
    );
    describe_counter!(
        "tether_broker_reattestations_total",
        Unit::Count,
        "Re-attestations of sites whose certificate expired, by result (accepted, or the refusal's reason)."
    );
    describe_counter!(
        "tether_broker_peer_refused_total",
        Unit::Count,
        "Datagrams on the broker-to-broker link refused, by reason (unknown_peer: no live broker's key; invalid; bad_mac; under_load), and fleet records refused as peers of the link (unverified: no valid proof of the link key from the deployment's CA; counted once per record and reason)."
    );
    describe_gauge!(
        "tether_broker_fleet_brokers_alive",
        Unit::Count,
        "Live brokers of the fleet (this one included), as the shared store says."
    );
}

/// Counts a failed accept on `listener`.
pub fn accept_failed(listener: &'static str) {
    counter!("tether_broker_accept_failures_total", "listener" => listener).increment(1);
}

/// Counts a connection of `listener` refused or cut short for `reason`.
pub fn connection_refused(listener: &'static str, reason: &'static str) {
    counter!("tether_broker_connections_refused_total", "listener" => listener, "reason" => reason)
        .increment(1);
}

/// An open connection of a listener, counted in
/// `tether_broker_connections_open` while it lives.
#[derive(Debug)]
pub struct OpenConnection(Gauge);

impl OpenConnection {
    /// Counts one more open connection of `listener`.
    pub fn new(listener: &'static str) -> Self {
        let g = gauge!("tether_broker_connections_open", "listener" => listener);
        g.increment(1.0);
        Self(g)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Counts unused LAN mappings released after their grace period.
pub fn lan_mappings_released(count: usize) {
    counter!("tether_broker_lan_mappings_released_total")
        .increment(u64::try_from(count).unwrap_or(u64::MAX));
}

/// Counts a refused LAN mapping.
pub fn lan_mapping_refused(reason: &'static str) {
    counter!("tether_broker_lan_mappings_refused_total", "reason" => reason).increment(1);
}

/// Counts a prefix of a site's route advertisement that was ignored.
pub fn route_refused(reason: &'static str) {
    counter!("tether_broker_routes_refused_total", "reason" => reason).increment(1);
}

/// Records the handshake time of an accepted connection.
pub fn handshake(transport: &'static str, took: std::time::Duration) {
    histogram!(HANDSHAKE, "transport" => transport).record(took.as_secs_f64());
}

/// Pre-registered metric handles. Traffic counters are set from the
/// per-session counters when scraped ([`Metrics::refresh`]).
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Packets received from sites.
    pub from_site_packets: Counter,
    /// Bytes received from sites.
    pub from_site_bytes: Counter,
    /// Packets sent to sites.
    pub to_site_packets: Counter,
    /// Bytes sent to sites.
    pub to_site_bytes: Counter,
    /// Packets received from the local gateway.
    pub from_gateway_packets: Counter,
    /// Packets sent to the local gateway.
    pub to_gateway_packets: Counter,
    /// Drops by reason.
    pub drops: BTreeMap<DropReason, Counter>,
    /// ICMP errors sent.
    pub icmp_sent: Counter,
    /// Packets relayed here for a site that had moved on to another
    /// broker, relayed on to it.
    pub relayed_on: Counter,
    /// Drops of packets relayed here by another broker, by reason.
    pub relayed_drops: BTreeMap<DropReason, Counter>,
    /// Live sessions by transport.
    pub sessions: BTreeMap<Transport, Gauge>,
    /// Sessions that replaced one of the same site on a better transport.
    pub upgrades: Counter,
    /// Sessions that replaced one of the same site on a worse transport.
    pub fallbacks: Counter,
    /// WireGuard datagrams from no registered gateway.
    pub wireguard_unknown: Counter,
    /// WireGuard datagrams a gateway's session refused (bad MAC,
    /// replay, stale index).
    pub wireguard_refused: Counter,
}

/// The broker's traffic totals at one moment, as [`Metrics::refresh`]
/// publishes them: (packets, bytes) pairs, monotonic over sessions.
#[derive(Debug, Default)]
pub struct Traffic {
    /// From all sites.
    pub from_sites: (u64, u64),
    /// To all sites.
    pub to_sites: (u64, u64),
    /// Packets from all gateways (local device and WireGuard peers).
    pub from_gateways: u64,
    /// Packets to all gateways.
    pub to_gateways: u64,
    /// Per WireGuard gateway.
    pub peers: Vec<PeerTraffic>,
    /// Per peer broker of the broker-to-broker link.
    pub brokers: Vec<BrokerTraffic>,
    /// Per site.
    pub sites: Vec<SiteTraffic>,
}

/// One WireGuard gateway's bytes.
#[derive(Debug)]
pub struct PeerTraffic {
    /// The gateway's id.
    pub id: String,
    /// Bytes from it.
    pub rx_bytes: u64,
    /// Bytes to it.
    pub tx_bytes: u64,
}

/// Packets relayed to and from one other broker.
#[derive(Debug)]
pub struct BrokerTraffic {
    /// The broker's fleet id.
    pub id: String,
    /// (packets, bytes) relayed from it.
    pub from_broker: (u64, u64),
    /// (packets, bytes) relayed to it.
    pub to_broker: (u64, u64),
}

/// One site's traffic and drops.
#[derive(Debug)]
pub struct SiteTraffic {
    /// The site.
    pub site: String,
    /// Its region.
    pub region: String,
    /// (packets, bytes) from it.
    pub from_site: (u64, u64),
    /// (packets, bytes) to it.
    pub to_site: (u64, u64),
    /// Its dropped packets, indexed like [`DropReason::ALL`].
    pub drops: [u64; DropReason::ALL.len()],
}

impl Metrics {
    /// Registers the broker's metrics with the global recorder.
    pub fn register() -> Self {
        recorder();
        let drops = DropReason::ALL
            .iter()
            .map(|r| {
                (
                    *r,
                    counter!("tether_broker_packets_dropped_total", "reason" => r.as_str()),
                )
            })
            .collect();
        Self {
            from_site_packets: counter!("tether_broker_packets_total", "direction" => "from_site"),
            from_site_bytes: counter!("tether_broker_bytes_total", "direction" => "from_site"),
            to_site_packets: counter!("tether_broker_packets_total", "direction" => "to_site"),
            to_site_bytes: counter!("tether_broker_bytes_total", "direction" => "to_site"),
            from_gateway_packets: counter!("tether_broker_packets_total", "direction" => "from_gateway"),
            to_gateway_packets: counter!("tether_broker_packets_total", "direction" => "to_gateway"),
            drops,
            icmp_sent: counter!("tether_broker_icmp_errors_sent_total"),
            relayed_on: counter!("tether_broker_relayed_on_packets_total"),
            relayed_drops: DropReason::ALL
                .iter()
                .map(|r| {
                    (
                        *r,
                        counter!("tether_broker_relayed_packets_dropped_total", "reason" => r.as_str()),
                    )
                })
                .collect(),
            sessions: Transport::ALL
                .iter()
                .map(|t| {
                    (
                        *t,
                        gauge!("tether_broker_sessions", "transport" => t.as_str()),
                    )
                })
                .collect(),
            upgrades: counter!("tether_broker_transport_changes_total", "change" => "upgrade"),
            fallbacks: counter!("tether_broker_transport_changes_total", "change" => "fallback"),
            wireguard_unknown: counter!("tether_broker_wireguard_refused_total", "reason" => "unknown_peer"),
            wireguard_refused: counter!("tether_broker_wireguard_refused_total", "reason" => "invalid"),
        }
    }

    /// Sets the traffic counters from a snapshot of the broker's totals.
    pub fn refresh(&self, t: &Traffic) {
        self.from_site_packets.absolute(t.from_sites.0);
        self.from_site_bytes.absolute(t.from_sites.1);
        self.to_site_packets.absolute(t.to_sites.0);
        self.to_site_bytes.absolute(t.to_sites.1);
        self.from_gateway_packets.absolute(t.from_gateways);
        self.to_gateway_packets.absolute(t.to_gateways);
        for peer in &t.peers {
            counter!("tether_broker_gateway_bytes_total", "gateway" => peer.id.clone(), "direction" => "from_gateway")
                .absolute(peer.rx_bytes);
            counter!("tether_broker_gateway_bytes_total", "gateway" => peer.id.clone(), "direction" => "to_gateway")
                .absolute(peer.tx_bytes);
        }
        for site in &t.sites {
            let (name, region) = (site.site.clone(), site.region.clone());
            for (direction, (packets, bytes)) in
                [("from_site", site.from_site), ("to_site", site.to_site)]
            {
                counter!("tether_broker_site_packets_total", "site" => name.clone(), "region" => region.clone(), "direction" => direction)
                    .absolute(packets);
                counter!("tether_broker_site_bytes_total", "site" => name.clone(), "region" => region.clone(), "direction" => direction)
                    .absolute(bytes);
            }
            for (reason, n) in site.drops.iter().enumerate().filter(|(_, n)| **n > 0) {
                if let Some(reason) = DropReason::ALL.get(reason) {
                    counter!("tether_broker_site_packets_dropped_total", "site" => name.clone(), "region" => region.clone(), "reason" => reason.as_str())
                        .absolute(*n);
                }
            }
        }
    }

    /// Counts a new session on `transport`, replacing one on `previous`.
    pub fn session_opened(&self, transport: Transport, previous: Option<Transport>) {
        if let Some(g) = self.sessions.get(&transport) {
            g.increment(1.0);
        }
        match previous {
            Some(p) if transport < p => self.upgrades.increment(1),
            Some(p) if transport > p => self.fallbacks.increment(1),
            _ => {}
        }
    }

    /// Counts a session ending.
    pub fn session_ended(&self, transport: Transport) {
        if let Some(g) = self.sessions.get(&transport) {
            g.decrement(1.0);
        }
    }

    /// Counts a drop.
    pub fn drop(&self, reason: DropReason) {
        self.drops_of(reason, 1);
    }

    /// Counts `n` drops for the same reason.
    pub fn drops_of(&self, reason: DropReason, n: u64) {
        if let Some(c) = self.drops.get(&reason) {
            c.increment(n);
        }
    }

    /// Counts a drop of a packet another broker relayed here (besides
    /// [`Metrics::drop`]).
    pub fn relayed_drop(&self, reason: DropReason) {
        if let Some(c) = self.relayed_drops.get(&reason) {
            c.increment(1);
        }
    }
}

/// Counts an enrollment outcome.
pub fn enrollment(result: &'static str) {
    counter!("tether_broker_enrollments_total", "result" => result).increment(1);
}

/// Counts the sessions of a drain on SIGTERM: those that moved to another
/// broker and those still here at the end.
pub fn handed_over(moved: usize, stayed: usize) {
    counter!("tether_broker_sessions_handed_over_total", "result" => "moved")
        .increment(moved as u64);
    counter!("tether_broker_sessions_handed_over_total", "result" => "stayed")
        .increment(stayed as u64);
}

/// Counts a fence: the fleet lease ran out.
pub fn fenced() {
    counter!("tether_broker_fleet_fenced_total").increment(1);
}

/// Counts a site timeline event that did not reach the store.
pub fn site_event_dropped() {
    counter!("tether_broker_site_events_dropped_total").increment(1);
}

/// Counts problems sites reported, by outcome (`stored`, `repeated` and
/// kept in memory, `dropped` beyond the site's budget, `refused` reports).
pub fn site_problems(outcome: &'static str, n: usize) {
    if n > 0 {
        counter!("tether_broker_site_problems_total", "outcome" => outcome)
            .increment(u64::try_from(n).unwrap_or(u64::MAX));
    }
}

/// Counts a session ending.
pub fn session_closed(reason: &'static str) {
    counter!("tether_broker_sessions_closed_total", "reason" => reason).increment(1);
}

/// Counts a DNS answer by response code.
pub fn dns_answer(code: hickory_proto::op::ResponseCode) {
    let rcode = match code {
        hickory_proto::op::ResponseCode::NoError => "NOERROR",
        hickory_proto::op::ResponseCode::FormErr => "FORMERR",
        hickory_proto::op::ResponseCode::ServFail => "SERVFAIL",
        hickory_proto::op::ResponseCode::NXDomain => "NXDOMAIN",
        hickory_proto::op::ResponseCode::NotImp => "NOTIMP",
        hickory_proto::op::ResponseCode::Refused => "REFUSED",
        _ => "OTHER",
    };
    counter!("tether_broker_dns_queries_total", "rcode" => rcode).increment(1);
}

/// Counts an issued site certificate: `enroll`, `renew` or `reattest`.
pub fn certificate_issued(kind: &'static str) {
    counter!("tether_broker_certificates_issued_total", "kind" => kind).increment(1);
}

/// Counts a refused renewal, by reason.
pub fn renewal_refused(reason: &'static str) {
    counter!("tether_broker_renewals_refused_total", "reason" => reason).increment(1);
}

/// Counts a re-attestation: `accepted`, `checked` (a proof without a
/// CSR, as `tether doctor` sends), or the refusal's reason.
pub fn reattestation(result: &'static str) {
    counter!("tether_broker_reattestations_total", "result" => result).increment(1);
}

/// One CA of the trust bundle, for [`trust_text`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaExpiry {
    /// The CA's name (its certificate's common name).
    pub name: String,
    /// Whether it signs site and broker certificates now.
    pub signing: bool,
    /// When its certificate expires.
    pub not_after: SystemTime,
}

/// What a broker's [`trust_text`] reports: its CA state and certificates.
#[derive(Debug, Clone)]
pub struct Trust {
    /// The rotation phase.
    pub phase: tether_pki::rotation::Phase,
    /// The trust bundle, the signing CA first.
    pub bundle: Vec<CaExpiry>,
    /// When the earliest of the broker's own server certificates expires.
    pub server_not_after: SystemTime,
}

/// Whole seconds from `now` until `t` (rounded down), negative once `t`
/// has passed.
fn seconds_until(t: SystemTime, now: SystemTime) -> i64 {
    let secs = match t.duration_since(now) {
        Ok(left) => left.as_secs_f64(),
        Err(past) => -past.duration().as_secs_f64(),
    };
    // `as` saturates: a date beyond i64 seconds is not a concern here.
    secs.floor() as i64
}

/// A Prometheus label value, escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The CA metrics of one broker as Prometheus text, rendered at each
/// scrape from the broker's own CA state rather than kept in the
/// process-wide recorder: a CA leaves its series when it leaves the bundle
/// (the recorder cannot forget a series), and brokers sharing a process
/// (tests) each report their own.
pub fn trust_text(trust: &Trust, now: SystemTime) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP tether_broker_ca_rotation_phase 1 for the CA rotation phase the deployment is in (stable, prepared or active), 0 for the others.\n\
         # TYPE tether_broker_ca_rotation_phase gauge"
    );
    for p in tether_pki::rotation::Phase::ALL {
        let _ = writeln!(
            out,
            "tether_broker_ca_rotation_phase{{phase=\"{}\"}} {}",
            p.as_str(),
            u8::from(p == trust.phase)
        );
    }
    let _ = writeln!(
        out,
        "# HELP tether_broker_ca_bundle_certificates CA certificates in the trust bundle (two during a rotation).\n\
         # TYPE tether_broker_ca_bundle_certificates gauge\n\
         tether_broker_ca_bundle_certificates {}",
        trust.bundle.len()
    );
    let _ = writeln!(
        out,
        "# HELP tether_broker_ca_expiry_seconds Seconds until each CA of the trust bundle expires (negative once expired), by CA name; signing=\"true\" for the CA that signs now.\n\
         # TYPE tether_broker_ca_expiry_seconds gauge"
    );
    for ca in &trust.bundle {
        let _ = writeln!(
            out,
            "tether_broker_ca_expiry_seconds{{ca=\"{}\",signing=\"{}\"}} {}",
            label(&ca.name),
            ca.signing,
            seconds_until(ca.not_after, now)
        );
    }
    let _ = writeln!(
        out,
        "# HELP tether_broker_server_cert_expiry_seconds Seconds until the earliest of this broker's own server certificates expires (it renews them with a third of their lifetime left).\n\
         # TYPE tether_broker_server_cert_expiry_seconds gauge\n\
         tether_broker_server_cert_expiry_seconds {}",
        seconds_until(trust.server_not_after, now)
    );
    out
}

/// `tether_broker_lease_reads_total{cause}`: reads of a region's every
/// lease from the store, for an allocation (the cache was missing, or a
/// compare-and-set met another writer's change) or on a notice of a change
/// the cache does not hold (another broker's). Steady state and this
/// broker's own allocations read none; a rising rate means brokers of the
/// fleet allocate in the same region at once.
pub fn lease_reads_text(allocation: u64, notice: u64) -> String {
    format!(
        "# HELP tether_broker_lease_reads_total Reads of a region's every address lease from the store, by cause: allocation (cache missing, or another writer committed first), notice (another broker's change).\n\
         # TYPE tether_broker_lease_reads_total counter\n\
         tether_broker_lease_reads_total{{cause=\"allocation\"}} {}\n\
         tether_broker_lease_reads_total{{cause=\"notice\"}} {}\n",
        allocation, notice
    )
}

/// The series labelled with another broker's id, as Prometheus text:
/// `tether_broker_relayed_packets_total` and
/// `tether_broker_relayed_bytes_total` of each peer of the link
/// (`brokers`), and `tether_broker_fleet_sessions` of each live broker of
/// the fleet (`fleet`, absent without a shared store). Rendered at each
/// scrape from the present peers and members, so a broker that left the
/// fleet (ids are random per start) leaves no series behind.
pub fn fleet_text(brokers: &[BrokerTraffic], fleet: Option<&tether_proto::fleet::Fleet>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if !brokers.is_empty() {
        for (name, help, bytes) in [
            (
                "tether_broker_relayed_packets_total",
                "IP packets relayed over the broker-to-broker link, by peer broker and direction (to_broker, from_broker).",
                false,
            ),
            (
                "tether_broker_relayed_bytes_total",
                "Bytes of IP packets relayed over the broker-to-broker link, by peer broker and direction.",
                true,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for b in brokers {
                for (direction, (packets, octets)) in
                    [("from_broker", b.from_broker), ("to_broker", b.to_broker)]
                {
                    let value = if bytes { octets } else { packets };
                    let _ = writeln!(
                        out,
                        "{name}{{broker=\"{}\",direction=\"{direction}\"}} {value}",
                        label(&b.id)
                    );
                }
            }
        }
    }
    if let Some(fleet) = fleet {
        let mut sessions: BTreeMap<&str, u64> =
            fleet.members().keys().map(|id| (id.as_str(), 0)).collect();
        for (_, owner) in fleet.owners() {
            if let Some(n) = sessions.get_mut(owner.broker.as_str()) {
                *n += 1;
            }
        }
        out.push_str(
            "# HELP tether_broker_fleet_sessions Site sessions each live broker of the fleet holds, as the shared store says.\n\
             # TYPE tether_broker_fleet_sessions gauge\n",
        );
        for (id, n) in sessions {
            let _ = writeln!(
                out,
                "tether_broker_fleet_sessions{{broker=\"{}\"}} {n}",
                label(id)
            );
        }
    }
    out
}

/// The windows of `tether_broker_site_certificates_expiring`: label and
/// seconds.
pub const SITE_CERT_WINDOWS: [(&str, u64); 3] = [("1h", 3_600), ("6h", 21_600), ("24h", 86_400)];

/// `tether_broker_site_certificates_expiring{within}` as Prometheus text:
/// `counts[i]` sites whose newest certificate is still valid and expires
/// within [`SITE_CERT_WINDOWS`]`[i]`. Rendered at each scrape from the
/// broker's in-memory summary of every site's events (one pass over it, no
/// store read), like [`trust_text`].
pub fn site_expiry_text(counts: &[usize]) -> String {
    use std::fmt::Write;
    let mut out = String::from(
        "# HELP tether_broker_site_certificates_expiring Sites whose newest certificate is still valid and expires within the window (revoked sites left out), as this broker's copy of the site events tells; every broker of a fleet reports the whole deployment.\n\
         # TYPE tether_broker_site_certificates_expiring gauge\n",
    );
    for ((within, _), n) in SITE_CERT_WINDOWS.iter().zip(counts) {
        let _ = writeln!(
            out,
            "tether_broker_site_certificates_expiring{{within=\"{within}\"}} {n}"
        );
    }
    out
}

/// Counts a site that connected while etcd could not be reached, by what
/// was decided: `readmitted`, or refused as `held_elsewhere`, `not_held`,
/// `left`, `new_address`.
pub fn connect_without_store(result: &str) {
    counter!("tether_broker_connects_without_store_total", "result" => result.to_string())
        .increment(1);
}

/// Records one etcd request of `operation` (a few fixed names, e.g.
/// `read`, `write`, `lease grant`) that took `took` and failed or not.
pub fn etcd_request(operation: &str, took: std::time::Duration, failed: bool) {
    let operation: String = operation
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    histogram!(ETCD_REQUEST, "operation" => operation.clone()).record(took.as_secs_f64());
    if failed {
        counter!("tether_broker_etcd_errors_total", "operation" => operation).increment(1);
    }
}

/// Counts a session taken over from another broker.
pub fn failover() {
    counter!("tether_broker_fleet_failovers_total").increment(1);
}

/// Counts a refused CONNECT-IP request.
pub fn connect_refused(status: u16) {
    counter!("tether_broker_connect_refused_total", "status" => status.to_string()).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tether_pki::rotation::Phase;

    #[test]
    fn the_series_of_a_broker_that_left_the_fleet_are_gone() {
        use tether_proto::fleet::{Fleet, Member};
        let member = |endpoint: &str| Member {
            endpoints: vec![endpoint.into()],
            regions: std::collections::BTreeSet::new(),
            forward: None,
            link_key: None,
            link_proof: None,
            gateways: Vec::new(),
            link_keepalive_ms: None,
            gateway_endpoint: None,
        };
        let mut fleet = Fleet::new("me".into());
        fleet.handle_member("me".into(), member("10.0.0.1:443"), 1);
        fleet.handle_member("gone-7f3a".into(), member("10.0.0.2:443"), 2);
        fleet.handle_owner("ward-1".parse().unwrap(), "gone-7f3a".into(), 3);
        let peer = |id: &str| BrokerTraffic {
            id: id.into(),
            from_broker: (3, 300),
            to_broker: (4, 400),
        };
        // Counted through the broker's usual refresh, then rendered.
        let metrics = Metrics::register();
        let traffic = |brokers| Traffic {
            from_sites: (0, 0),
            to_sites: (0, 0),
            from_gateways: 0,
            to_gateways: 0,
            peers: Vec::new(),
            brokers,
            sites: Vec::new(),
        };
        let before = traffic(vec![peer("gone-7f3a")]);
        metrics.refresh(&before);
        let text = fleet_text(&before.brokers, Some(&fleet));
        for line in [
            r#"tether_broker_relayed_packets_total{broker="gone-7f3a",direction="from_broker"} 3"#,
            r#"tether_broker_relayed_bytes_total{broker="gone-7f3a",direction="to_broker"} 400"#,
            r#"tether_broker_fleet_sessions{broker="gone-7f3a"} 1"#,
            r#"tether_broker_fleet_sessions{broker="me"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
        // The broker leaves: no series names it any more, neither here nor
        // in the recorder's output.
        fleet.handle_member_gone("gone-7f3a");
        let after = traffic(Vec::new());
        metrics.refresh(&after);
        let text = fleet_text(&after.brokers, Some(&fleet)) + &recorder().render();
        assert!(!text.contains("gone-7f3a"), "{text}");
        assert!(text.contains(r#"tether_broker_fleet_sessions{broker="me"} 0"#));
    }

    #[test]
    fn the_expiring_site_certificates_are_one_series_per_window() {
        let text = site_expiry_text(&[0, 3, 7]);
        assert!(text.contains("# TYPE tether_broker_site_certificates_expiring gauge\n"));
        for line in [
            r#"tether_broker_site_certificates_expiring{within="1h"} 0"#,
            r#"tether_broker_site_certificates_expiring{within="6h"} 3"#,
            r#"tether_broker_site_certificates_expiring{within="24h"} 7"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn the_trust_metrics_name_each_ca_of_the_bundle_and_count_down_past_zero() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let trust = Trust {
            phase: Phase::Active,
            bundle: vec![
                CaExpiry {
                    name: "tether CA \"b\"".into(),
                    signing: true,
                    not_after: now + Duration::from_millis(90_500),
                },
                CaExpiry {
                    name: "tether CA a".into(),
                    signing: false,
                    not_after: now - Duration::from_millis(1_500),
                },
            ],
            server_not_after: now + Duration::from_secs(3600),
        };
        let text = trust_text(&trust, now);
        for line in [
            r#"tether_broker_ca_rotation_phase{phase="stable"} 0"#,
            r#"tether_broker_ca_rotation_phase{phase="prepared"} 0"#,
            r#"tether_broker_ca_rotation_phase{phase="active"} 1"#,
            "tether_broker_ca_bundle_certificates 2",
            r#"tether_broker_ca_expiry_seconds{ca="tether CA \"b\"",signing="true"} 90"#,
            r#"tether_broker_ca_expiry_seconds{ca="tether CA a",signing="false"} -2"#,
            "tether_broker_server_cert_expiry_seconds 3600",
            "# TYPE tether_broker_ca_expiry_seconds gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
        }
        // One HELP and one TYPE line per family.
        assert_eq!(text.matches("# TYPE").count(), 4, "{text}");
    }
}
