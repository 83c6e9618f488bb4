//! The gateway's Prometheus metrics: packets forwarded each way, every
//! packet of the packet path that is dropped (by reason) and every
//! datagram WireGuard refuses (by kind), with a log line per reason at
//! most once a minute. Served on `[metrics] listen` when it is set.
//!
//! Names follow `tether_gateway_<thing>_<unit>`, like the broker's
//! `tether_broker_…`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use boringtun::noise::errors::WireGuardError;
use metrics::{Counter, Unit, counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tether_shell::accept::{HttpLimits, ListenerEvents, serve_http1};

const FORWARDED: &str = "tether_gateway_packets_total";
const DROPPED: &str = "tether_gateway_packets_dropped_total";
const REFUSED: &str = "tether_gateway_wireguard_refused_total";
const ACCEPT_FAILED: &str = "tether_gateway_accept_failures_total";
const CONNECTIONS_REFUSED: &str = "tether_gateway_connections_refused_total";
const FAILOVERS: &str = "tether_gateway_failovers_total";
const BROKERS_UP: &str = "tether_gateway_brokers_up";
const BROKER_ACTIVE: &str = "tether_gateway_broker_active";
const BROKERS_FOLLOWED: &str = "tether_gateway_brokers_followed";
const BROKERS_LEARNED: &str = "tether_gateway_brokers_learned_total";
const BROKERS_FORGOTTEN: &str = "tether_gateway_brokers_forgotten_total";

/// The process-wide Prometheus recorder (installed once).
pub fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Installing fails only when a recorder is already installed
        // (tests running several gateways in one process).
        let _ = metrics::set_global_recorder(recorder);
        describe_counter!(
            FORWARDED,
            Unit::Count,
            "IP packets forwarded, by direction: to_broker (read from the device, sealed and sent), from_broker (received, opened and written to the device)."
        );
        describe_counter!(
            DROPPED,
            Unit::Count,
            "Packets of the gateway's packet path that were not forwarded, by reason: not_from_broker (a datagram from an address that is none of the configured brokers'), bad_control (a control message from the broker that does not decode), device_write (the device refused a write), send_failed (the UDP send to the broker failed), seal_failed (WireGuard could not seal a packet)."
        );
        describe_counter!(
            ACCEPT_FAILED,
            Unit::Count,
            "Failed accepts of a TCP listener (the metrics listener), by listener: out of file descriptors, most likely; the listener pauses."
        );
        describe_counter!(
            CONNECTIONS_REFUSED,
            Unit::Count,
            "Connections of a TCP listener closed at once, by listener and reason (limit: the listener holds its most connections already)."
        );
        describe_counter!(
            FAILOVERS,
            Unit::Count,
            "Times the gateway moved its traffic off a broker that stopped answering to another broker it follows."
        );
        describe_gauge!(
            BROKERS_FOLLOWED,
            Unit::Count,
            "Brokers the gateway follows, by origin: configured (its configuration's brokers) or learned (listed by the brokers of its region)."
        );
        describe_counter!(
            BROKERS_LEARNED,
            Unit::Count,
            "Brokers the gateway started to follow because a broker of its region listed them."
        );
        describe_counter!(
            BROKERS_FORGOTTEN,
            Unit::Count,
            "Learned brokers the gateway stopped following because the brokers of its region no longer list them."
        );
        describe_gauge!(
            BROKERS_UP,
            Unit::Count,
            "Brokers the gateway follows (configured and learned) that answer now."
        );
        describe_gauge!(
            BROKER_ACTIVE,
            Unit::Count,
            "1 for the broker (label broker: its WireGuard endpoint) that carries the gateway's traffic, 0 for the others."
        );
        describe_counter!(
            REFUSED,
            Unit::Count,
            "Datagrams from the broker's address that WireGuard refused, by reason (boringtun's error: invalid_mac for a datagram not sealed for this gateway's key, invalid_aead_tag for a forged or corrupted data packet, duplicate_counter for a replayed one, ...)."
        );
        handle
    })
}

/// Why a packet of the packet path was dropped (other than WireGuard
/// refusing it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dropped {
    /// A datagram from an address that is none of the brokers'.
    NotFromBroker,
    /// A control message from the broker that does not decode.
    BadControl,
    /// The device refused a write.
    DeviceWrite,
    /// The UDP send to the broker failed.
    SendFailed,
    /// WireGuard could not seal a packet.
    SealFailed,
}

impl Dropped {
    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotFromBroker => "not_from_broker",
            Self::BadControl => "bad_control",
            Self::DeviceWrite => "device_write",
            Self::SendFailed => "send_failed",
            Self::SealFailed => "seal_failed",
        }
    }

    /// What happened, in plain words.
    fn explain(self) -> &'static str {
        match self {
            Self::NotFromBroker => {
                "datagrams from an address that is none of the configured brokers' were ignored (the gateway talks only to the brokers it resolved at start)"
            }
            Self::BadControl => {
                "control messages from the broker could not be decoded (is the broker a newer version?)"
            }
            Self::DeviceWrite => "packets from the broker could not be written to the device",
            Self::SendFailed => "packets could not be sent to the broker over UDP",
            Self::SealFailed => "packets could not be sealed for the broker by WireGuard",
        }
    }
}

/// The `reason` label of a WireGuard refusal.
pub fn refusal_reason(e: &WireGuardError) -> &'static str {
    match e {
        WireGuardError::DestinationBufferTooSmall => "destination_buffer_too_small",
        WireGuardError::IncorrectPacketLength => "incorrect_packet_length",
        WireGuardError::UnexpectedPacket => "unexpected_packet",
        WireGuardError::WrongPacketType => "wrong_packet_type",
        WireGuardError::WrongIndex => "wrong_index",
        WireGuardError::WrongKey => "wrong_key",
        WireGuardError::InvalidTai64nTimestamp => "invalid_tai64n_timestamp",
        WireGuardError::WrongTai64nTimestamp => "wrong_tai64n_timestamp",
        WireGuardError::InvalidMac => "invalid_mac",
        WireGuardError::InvalidAeadTag => "invalid_aead_tag",
        WireGuardError::InvalidCounter => "invalid_counter",
        WireGuardError::DuplicateCounter => "duplicate_counter",
        WireGuardError::InvalidPacket => "invalid_packet",
        WireGuardError::NoCurrentSession => "no_current_session",
        WireGuardError::LockFailed => "lock_failed",
        WireGuardError::ConnectionExpired => "connection_expired",
        WireGuardError::UnderLoad => "under_load",
    }
}

/// A WireGuard refusal in plain words.
fn explain_refusal(e: &WireGuardError) -> &'static str {
    match e {
        WireGuardError::InvalidMac | WireGuardError::WrongKey => {
            "a handshake from the broker's address was not sealed for this gateway's key: forged, or the broker uses another key for this gateway"
        }
        WireGuardError::InvalidAeadTag => {
            "a data packet from the broker's address did not authenticate: forged or corrupted on the way"
        }
        WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter => {
            "a data packet from the broker's address was a replay or arrived too late"
        }
        WireGuardError::WrongIndex | WireGuardError::NoCurrentSession => {
            "a data packet from the broker's address names no session of this gateway: from an old session, or forged"
        }
        WireGuardError::InvalidPacket
        | WireGuardError::IncorrectPacketLength
        | WireGuardError::WrongPacketType => {
            "a datagram from the broker's address is not a WireGuard message"
        }
        WireGuardError::UnderLoad => {
            "a handshake was refused while WireGuard is under load (cookie challenge)"
        }
        _ => "WireGuard refused a datagram from the broker's address",
    }
}

/// Counters of the packet path; the forwarded ones are registered once so
/// the per-packet cost is an atomic addition.
pub struct Metrics {
    to_broker: Counter,
    from_broker: Counter,
    log: LogBudget,
}

impl Default for Metrics {
    fn default() -> Self {
        recorder();
        Self {
            to_broker: counter!(FORWARDED, "direction" => "to_broker"),
            from_broker: counter!(FORWARDED, "direction" => "from_broker"),
            log: LogBudget::default(),
        }
    }
}

impl Metrics {
    /// Packets sealed and sent to the broker.
    pub fn to_broker(&self, n: usize) {
        self.to_broker.increment(n as u64);
    }

    /// Packets received from the broker and written to the device.
    pub fn from_broker(&self, n: usize) {
        self.from_broker.increment(n as u64);
    }

    /// The traffic moved off a broker that stopped answering.
    pub fn failover(&self) {
        counter!(FAILOVERS).increment(1);
    }

    /// Which brokers answer, and which carries the traffic.
    pub fn brokers(&self, endpoints: &[Option<SocketAddr>], up: usize, active: usize) {
        gauge!(BROKERS_UP).set(up as f64);
        for (i, e) in endpoints.iter().enumerate() {
            let Some(e) = e else { continue };
            gauge!(BROKER_ACTIVE, "broker" => e.to_string()).set(if i == active {
                1.0
            } else {
                0.0
            });
        }
    }

    /// How many brokers are followed, by origin.
    pub fn brokers_followed(&self, configured: usize, learned: usize) {
        gauge!(BROKERS_FOLLOWED, "origin" => "configured").set(configured as f64);
        gauge!(BROKERS_FOLLOWED, "origin" => "learned").set(learned as f64);
    }

    /// A broker was learned.
    pub fn broker_learned(&self) {
        counter!(BROKERS_LEARNED).increment(1);
    }

    /// A learned broker was forgotten: it carries no traffic.
    pub fn broker_forgotten(&self, endpoint: SocketAddr) {
        counter!(BROKERS_FORGOTTEN).increment(1);
        gauge!(BROKER_ACTIVE, "broker" => endpoint.to_string()).set(0.0);
    }

    /// `n` packets dropped for `reason`; logged at most once a minute per
    /// reason.
    pub fn dropped(&self, reason: Dropped, n: usize, detail: &dyn std::fmt::Display) {
        if n == 0 {
            return;
        }
        counter!(DROPPED, "reason" => reason.as_str()).increment(n as u64);
        if let Some(total) = self.log.count(reason.as_str(), n as u64, Instant::now()) {
            tracing::warn!(
                reason = reason.as_str(),
                dropped = total,
                "{}: {detail} ({total} since the last line; at most one line a minute per reason)",
                reason.explain(),
            );
        }
    }

    /// A datagram from `from` that WireGuard refused with `e`.
    pub fn refused(&self, e: &WireGuardError, from: SocketAddr) {
        let reason = refusal_reason(e);
        counter!(REFUSED, "reason" => reason).increment(1);
        if let Some(total) = self.log.count(reason, 1, Instant::now()) {
            tracing::warn!(
                reason,
                source = %from,
                refused = total,
                "{} (last from {from}; {total} since the last line; at most one line a minute per reason)",
                explain_refusal(e),
            );
        }
    }
}

/// Log lines per reason: at most one a minute, each with the count since
/// the previous one. Time is an input.
#[derive(Debug, Default)]
pub struct LogBudget {
    last: Mutex<HashMap<&'static str, (Option<Instant>, u64)>>,
}

impl LogBudget {
    /// The least time between two lines of one reason.
    pub const EVERY: Duration = Duration::from_secs(60);

    /// Counts `n` events of `reason` at `now`; returns the count since the
    /// last line when this one gets a line.
    pub fn count(&self, reason: &'static str, n: u64, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().ok()?;
        let (at, pending) = last.entry(reason).or_insert((None, 0));
        *pending += n;
        if at.is_some_and(|t| now.saturating_duration_since(t) < Self::EVERY) {
            return None;
        }
        *at = Some(now);
        Some(std::mem::take(pending))
    }
}

/// Limits of the metrics listener: the broker's admin-listener defaults.
/// A scraper sends one short request at a time; anyone else who reaches the
/// address must not hold the gateway's file descriptors.
pub const LIMITS: HttpLimits = HttpLimits {
    header_read_timeout: Duration::from_secs(10),
    max_connections: 16,
};

/// The metrics listener's counts.
struct MetricsEvents;

impl ListenerEvents for MetricsEvents {
    type Open = ();

    fn accept_failed(&self) {
        counter!(ACCEPT_FAILED, "listener" => "metrics").increment(1);
    }

    fn refused_at_limit(&self, _remote: SocketAddr) {
        counter!(CONNECTIONS_REFUSED, "listener" => "metrics", "reason" => "limit").increment(1);
    }

    fn opened(&self) {}
}

/// Serves `GET /metrics` on `addr` until the task is aborted.
pub async fn serve(addr: SocketAddr) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr} ([metrics] listen)"))?;
    tracing::info!(listen = %addr, "serving metrics on http://{addr}/metrics");
    Ok(tokio::spawn(serve_on(listener, LIMITS)))
}

/// Serves `GET /metrics` on `listener` within `limits`.
async fn serve_on(listener: tokio::net::TcpListener, limits: HttpLimits) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                recorder().render(),
            )
        }),
    );
    serve_http1("metrics", listener, app, limits, MetricsEvents).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads until the server closes the connection (an end or a reset),
    /// within `within`; what was read.
    async fn until_closed(tcp: &mut tokio::net::TcpStream, within: Duration) -> Vec<u8> {
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(within, tcp.read_to_end(&mut buf))
            .await
            .expect("the connection is still open");
        buf
    }

    #[tokio::test]
    async fn a_half_sent_request_header_is_closed_after_the_timeout_and_connections_are_capped() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = HttpLimits {
            header_read_timeout: Duration::from_secs(2),
            max_connections: 1,
        };
        let server = tokio::spawn(serve_on(listener, limits));

        // A scraper's request is answered.
        let mut scrape = tokio::net::TcpStream::connect(addr).await.unwrap();
        scrape
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = until_closed(&mut scrape, Duration::from_secs(5)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");

        // Half a request header holds the only place until the timeout.
        let started = tokio::time::Instant::now();
        let mut half = tokio::net::TcpStream::connect(addr).await.unwrap();
        half.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            .await
            .unwrap();
        // Meanwhile another connection finds no place: closed unanswered.
        let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = extra
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await;
        assert!(
            until_closed(&mut extra, Duration::from_secs(5))
                .await
                .is_empty()
        );
        let _ = until_closed(&mut half, Duration::from_secs(10)).await;
        assert!(started.elapsed() >= limits.header_read_timeout);
        server.abort();
    }

    #[test]
    fn a_reason_is_logged_once_a_minute_with_what_it_missed() {
        let log = LogBudget::default();
        let t = Instant::now();
        assert_eq!(log.count("invalid_mac", 1, t), Some(1));
        assert_eq!(
            log.count("invalid_mac", 1, t + Duration::from_secs(10)),
            None
        );
        assert_eq!(
            log.count("invalid_mac", 3, t + Duration::from_secs(20)),
            None
        );
        // Another reason has its own budget.
        assert_eq!(
            log.count("not_from_broker", 2, t + Duration::from_secs(20)),
            Some(2)
        );
        assert_eq!(
            log.count("invalid_mac", 1, t + Duration::from_secs(61)),
            Some(5)
        );
    }

    #[test]
    fn every_refusal_has_its_own_label() {
        use WireGuardError as E;
        let all = [
            E::DestinationBufferTooSmall,
            E::IncorrectPacketLength,
            E::UnexpectedPacket,
            E::WrongPacketType,
            E::WrongIndex,
            E::WrongKey,
            E::InvalidTai64nTimestamp,
            E::WrongTai64nTimestamp,
            E::InvalidMac,
            E::InvalidAeadTag,
            E::InvalidCounter,
            E::DuplicateCounter,
            E::InvalidPacket,
            E::NoCurrentSession,
            E::LockFailed,
            E::ConnectionExpired,
            E::UnderLoad,
        ];
        let labels: std::collections::BTreeSet<_> = all.iter().map(refusal_reason).collect();
        assert_eq!(labels.len(), all.len());
    }

    #[test]
    fn counters_show_in_the_rendered_text() {
        let m = Metrics::default();
        m.dropped(Dropped::NotFromBroker, 2, &"test");
        m.refused(
            &WireGuardError::InvalidMac,
            "192.0.2.1:51820".parse().unwrap_or_else(|_| unreachable!()),
        );
        let text = recorder().render();
        assert!(
            text.contains("tether_gateway_packets_dropped_total{reason=\"not_from_broker\"}"),
            "{text}"
        );
        assert!(
            text.contains("tether_gateway_wireguard_refused_total{reason=\"invalid_mac\"}"),
            "{text}"
        );
    }
}
