//! The broker's Prometheus metrics.
//!
//! Names follow `tether_broker_<thing>_<unit>`; every drop carries a
//! `reason`. Counter handles are registered once, so the packet path only
//! does atomic additions.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use metrics::{Counter, Gauge, counter, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tether_proto::forward::DropReason;
use tether_proto::tunnel::Transport;

/// The process-wide Prometheus recorder (installed once).
pub fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // A second broker in the same process (tests) shares the first
        // recorder; failing to install again is expected then.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
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

    /// Sets the traffic counters from the broker's per-session totals.
    pub fn refresh(&self, broker: &crate::state::Broker) {
        let t = broker.totals();
        self.from_site_packets.absolute(t.rx_packets);
        self.from_site_bytes.absolute(t.rx_bytes);
        self.to_site_packets.absolute(t.tx_packets);
        self.to_site_bytes.absolute(t.tx_bytes);
        let (mut rx, mut tx) = (0, 0);
        if let Some(gw) = broker.local_gateway.get() {
            rx += gw.counters.rx.get().0;
            tx += gw.counters.tx.get().0;
        }
        if let Some(wg) = broker.wireguard.get() {
            for peer in wg.peers() {
                rx += peer.counters.rx.get().0;
                tx += peer.counters.tx.get().0;
                counter!("tether_broker_gateway_bytes_total", "gateway" => peer.id.to_string(), "direction" => "from_gateway")
                    .absolute(peer.counters.rx.get().1);
                counter!("tether_broker_gateway_bytes_total", "gateway" => peer.id.to_string(), "direction" => "to_gateway")
                    .absolute(peer.counters.tx.get().1);
            }
        }
        self.from_gateway_packets.absolute(rx);
        self.to_gateway_packets.absolute(tx);
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
        if let Some(c) = self.drops.get(&reason) {
            c.increment(1);
        }
    }
}

/// Counts an enrollment outcome.
pub fn enrollment(result: &'static str) {
    counter!("tether_broker_enrollments_total", "result" => result).increment(1);
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

/// Counts a refused CONNECT-IP request.
pub fn connect_refused(status: u16) {
    counter!("tether_broker_connect_refused_total", "status" => status.to_string()).increment(1);
}
