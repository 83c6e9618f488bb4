//! Fast loss detection of the active broker, and the standby connection's
//! schedule.
//!
//! While the agent holds a standby connection to a second broker, the
//! active connection carries a heartbeat every [`HEARTBEAT_INTERVAL`] (on
//! HTTP/3 a reserved frame on the control stream, which the broker's QUIC
//! acknowledges; on HTTP/2 a PING, which the broker's HTTP/2 answers), and
//! the shell reports every [`LIVENESS_CHECK`] how much the connection has
//! received so far: UDP datagrams on HTTP/3, bytes read from the TLS
//! connection on HTTP/2 (see [`crate::h2::FrameWatch`]). Anything counts:
//! acknowledgements of the heartbeat, the site's traffic, the broker's
//! capsules. The standby runs on the same transport as the tunnel (the
//! rung of the ladder that works from this site), so on HTTP/2 it is a
//! TLS connection with HTTP/2 SETTINGS exchanged and no request. When nothing arrived for [`Liveness::deadline`] (at least
//! [`LOSS_AFTER`], more on a long path), the broker is taken as lost and
//! the agent moves its tunnel to the standby at once, long before QUIC's
//! idle timeout would have told.
//!
//! Without a standby there is nowhere faster to go, so the agent sends no
//! heartbeat and waits for the idle timeout as before: a site with one
//! broker pays nothing.

use std::time::{Duration, Instant};

/// How often the active connection carries a heartbeat while a standby
/// is ready: about 3.3 packets a second each way on an idle site.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(300);
/// How often the shell reports the received count (no packet is sent).
pub const LIVENESS_CHECK: Duration = Duration::from_millis(100);
/// Silence that means the broker is gone: two heartbeats and their
/// acknowledgements missed, and a margin.
pub const LOSS_AFTER: Duration = Duration::from_millis(700);
/// On a long path the deadline is this many round trips plus a heartbeat
/// interval, when that is more than [`LOSS_AFTER`].
pub const LOSS_AFTER_RTTS: u32 = 3;
/// The wait before dialing a standby again after a failed attempt or a
/// lost standby.
pub const STANDBY_RETRY: Duration = Duration::from_secs(5);
/// How long the old connection is kept after a handover, for packets the
/// old broker still sends while it learns that the site moved.
pub const RETIRE_AFTER: Duration = Duration::from_secs(3);

/// What the agent knows of the active connection's liveness: the received
/// count last reported and when it last grew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    received: u64,
    heard_at: Instant,
}

impl Liveness {
    /// Starts counting from `received` datagrams, heard `now`.
    pub fn new(received: u64, now: Instant) -> Self {
        Self {
            received,
            heard_at: now,
        }
    }

    /// The connection has received `received` datagrams (HTTP/2: bytes)
    /// in all by `now`.
    pub fn handle_received(&mut self, received: u64, now: Instant) {
        if received != self.received {
            self.received = received;
            self.heard_at = now;
        }
    }

    /// When the last datagram was noticed.
    pub fn heard_at(&self) -> Instant {
        self.heard_at
    }

    /// The silence after which the broker is lost, on a path of `rtt`.
    pub fn deadline(rtt: Duration) -> Duration {
        LOSS_AFTER.max(rtt * LOSS_AFTER_RTTS + HEARTBEAT_INTERVAL)
    }

    /// Whether the broker has been silent past the deadline by `now`.
    pub fn is_lost(&self, rtt: Duration, now: Instant) -> bool {
        now.saturating_duration_since(self.heard_at) >= Self::deadline(rtt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn silence_past_the_deadline_is_loss_and_any_datagram_resets_it() {
        let t0 = Instant::now();
        let rtt = ms(10);
        let mut l = Liveness::new(5, t0);
        // The same count: silence.
        l.handle_received(5, t0 + ms(600));
        assert!(!l.is_lost(rtt, t0 + ms(699)));
        assert!(l.is_lost(rtt, t0 + ms(700)));
        // One more datagram: heard again, the deadline moves.
        l.handle_received(6, t0 + ms(650));
        assert_eq!(l.heard_at(), t0 + ms(650));
        assert!(!l.is_lost(rtt, t0 + ms(1300)));
        assert!(l.is_lost(rtt, t0 + ms(1350)));
    }

    #[test]
    fn a_long_path_waits_longer() {
        assert_eq!(Liveness::deadline(ms(1)), ms(700));
        // 3 × 250 ms + 300 ms.
        assert_eq!(Liveness::deadline(ms(250)), ms(1050));
        let t0 = Instant::now();
        let l = Liveness::new(0, t0);
        assert!(!l.is_lost(ms(250), t0 + ms(1000)));
        assert!(l.is_lost(ms(250), t0 + ms(1050)));
    }
}
