//! The QUIC transport settings of tunnels, the same at both ends.

use std::time::Duration;

use quinn::VarInt;

/// The QUIC transport settings of both ends of a tunnel: the broker's
/// listener and the agent's (and test clients') connections.
pub fn transport_config(keepalive: Duration, idle_timeout: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(keepalive));
    if let Ok(idle) = quinn::IdleTimeout::try_from(idle_timeout) {
        t.max_idle_timeout(Some(idle));
    }
    // Tunnels carry full-size packets: start near a typical path MTU and let
    // discovery (on by default) find the rest; black-hole detection falls
    // back to 1200 bytes when a path is narrower.
    t.initial_mtu(1400);
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
    t
}
