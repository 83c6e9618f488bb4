//! The QUIC transport settings of tunnels, the same at both ends.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::VarInt;
use quinn::congestion::{BbrConfig, Controller, ControllerFactory, ControllerMetrics};

/// The UDP payload size of every tunnel packet (QUIC's "MTU"): fixed, so
/// the tunnel's MTU never changes under a running session. It carries
/// IPv6's minimum of 1280 bytes inside (RFC 9484, section 10.1) and fits
/// paths with an IP MTU of 1428 bytes (IPv4) or 1448 (IPv6) and up.
pub const TUNNEL_UDP_PAYLOAD: u16 = 1400;

/// The QUIC transport settings of both ends of a tunnel: the broker's
/// listener and the agent's (and test clients') connections.
pub fn transport_config(keepalive: Duration, idle_timeout: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(keepalive));
    if let Ok(idle) = quinn::IdleTimeout::try_from(idle_timeout) {
        t.max_idle_timeout(Some(idle));
    }
    // One packet size for the life of the connection. With path MTU
    // discovery on, quinn judges a "black hole" from loss bursts of
    // packets larger than its minimum; a tunnel's packets are all large, so
    // on a path with random loss (1 % is enough) it resets the MTU to 1200
    // bytes, every full-size packet then exceeds the datagram limit and the
    // tunnel stalls until discovery climbs again a minute later. With the
    // minimum at the tunnel's size there is nothing to fall back to.
    t.initial_mtu(TUNNEL_UDP_PAYLOAD);
    t.min_mtu(TUNNEL_UDP_PAYLOAD);
    t.mtu_discovery_config(None);
    t.datagram_receive_buffer_size(Some(4 << 20));
    t.datagram_send_buffer_size(4 << 20);
    t.max_concurrent_uni_streams(VarInt::from_u32(16));
    t.max_concurrent_bidi_streams(VarInt::from_u32(16));
    // Ask the peer (if it supports the ACK frequency extension) to
    // acknowledge every 16th packet, or after 10 ms, instead of every 2nd:
    // a tunnel sends packets in long runs, and each acknowledgement is a
    // packet through every hop.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(VarInt::from_u32(15));
    ack.max_ack_delay(Some(Duration::from_millis(10)));
    t.ack_frequency_config(Some(ack));
    t.congestion_controller_factory(Arc::new(TunnelCongestion::default()));
    t
}

/// Congestion control for a tunnel: BBR (quinn's), told only of
/// persistent congestion, not of every lost packet.
///
/// A tunnel carries traffic that has congestion control of its own (the
/// inner TCP or QUIC), and its datagrams are never retransmitted, so each
/// loss already reaches the inner sender. A loss-based outer controller
/// (Cubic, quinn's default) shrinks its window on every random loss of a
/// lossy uplink as well: at 1 % loss and 50 ms it held the tunnel to about
/// 3 Mbit/s where the same path without a tunnel carried 180, while
/// datagrams queued in front of it. BBR paces at the bottleneck bandwidth
/// it measures and bounds what is in flight by the measured bandwidth-delay
/// product, which is what keeps queues short; its loss recovery
/// (packet conservation while any loss is outstanding) is what collapses
/// it on random loss, so losses are not passed to it. Persistent
/// congestion (everything lost for several round trips: an outage or a
/// path change) still resets it.
#[derive(Debug, Clone, Default)]
pub struct TunnelCongestion {
    bbr: Arc<BbrConfig>,
}

impl ControllerFactory for TunnelCongestion {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(LossTolerant(self.bbr.clone().build(now, current_mtu)))
    }
}

/// A controller that hears only of persistent congestion.
struct LossTolerant(Box<dyn Controller>);

impl Controller for LossTolerant {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.0.on_sent(now, bytes, last_packet_number)
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &quinn_proto::RttEstimator,
    ) {
        self.0.on_ack(now, sent, bytes, app_limited, rtt)
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.0
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked)
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        if is_persistent_congestion {
            self.0
                .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes)
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.0.on_mtu_update(new_mtu)
    }

    fn window(&self) -> u64 {
        self.0.window()
    }

    fn metrics(&self) -> ControllerMetrics {
        self.0.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(LossTolerant(self.0.clone_box()))
    }

    fn initial_window(&self) -> u64 {
        self.0.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts the losses it is told of; its window shrinks with each.
    #[derive(Clone, Default)]
    struct Recorder {
        losses: u64,
        persistent: u64,
    }

    impl Controller for Recorder {
        fn on_congestion_event(&mut self, _: Instant, _: Instant, persistent: bool, _: u64) {
            self.losses += 1;
            self.persistent += u64::from(persistent);
        }
        fn on_mtu_update(&mut self, _: u16) {}
        fn window(&self) -> u64 {
            1_000_000 >> self.losses
        }
        fn clone_box(&self) -> Box<dyn Controller> {
            Box::new(self.clone())
        }
        fn initial_window(&self) -> u64 {
            1_000_000
        }
        fn into_any(self: Box<Self>) -> Box<dyn Any> {
            self
        }
    }

    /// Random losses never reach the inner controller; persistent
    /// congestion does.
    #[test]
    fn only_persistent_congestion_reaches_the_controller() {
        let now = Instant::now();
        let mut cc = LossTolerant(Box::new(Recorder::default()));
        for _ in 0..100 {
            cc.on_congestion_event(now, now, false, 1400);
        }
        assert_eq!(cc.window(), 1_000_000);
        cc.on_congestion_event(now, now, true, 1400);
        assert_eq!(cc.window(), 500_000);
        let inner = cc.0.into_any().downcast::<Recorder>().ok();
        assert_eq!(inner.map(|r| (r.losses, r.persistent)), Some((1, 1)));
    }

    /// The factory builds quinn's BBR behind the filter.
    #[test]
    fn tunnels_use_bbr() {
        let now = Instant::now();
        let cc = Arc::new(TunnelCongestion::default()).build(now, TUNNEL_UDP_PAYLOAD);
        let inner = cc
            .into_any()
            .downcast::<LossTolerant>()
            .ok()
            .and_then(|l| l.0.into_any().downcast::<quinn::congestion::Bbr>().ok());
        assert!(inner.is_some());
    }
}
