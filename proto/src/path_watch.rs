//! Noticing that a QUIC path stopped carrying full-size packets.
//!
//! A tunnel sends every packet at one fixed size (see the transport
//! settings in the shell). When the path under a running connection
//! narrows (a backup link, a VPN concentrator or PPPoE switched in), every
//! full-size packet is lost from then on, while the small ones — ACKs,
//! keepalive PINGs — still cross: the connection stays up, and the tunnel
//! is a black hole for anything but small packets. Nothing in QUIC ends
//! such a connection.
//!
//! The sender sees it in its own loss statistics: under random loss, the
//! bytes it declares lost are a small fraction of the bytes it sends; on a
//! black hole they are nearly all of them (the rest being the small packets
//! that do cross). [`BlackHoleWatch`] compares the two over windows of
//! [`WINDOW`] and reports a black hole after [`WINDOWS`] windows in a row
//! in which at least half of the bytes sent were lost, and at least
//! [`MIN_LOST_PACKETS`] packets: a lossy but working path (hospital
//! uplinks lose 1–10 %) never comes near it, an idle tunnel (nothing lost)
//! never trips it. The connection is then closed, so the site dials again
//! and the transport ladder finds what the path carries (HTTP/2 over TCP,
//! which the kernel sizes for the path).

use std::time::{Duration, Instant};

/// The length of one observation window.
pub const WINDOW: Duration = Duration::from_secs(2);

/// Windows in a row with most bytes lost before the path counts as a black
/// hole.
pub const WINDOWS: u32 = 2;

/// Packets a window must have lost to count: a few lost keepalives of an
/// idle tunnel are not a black hole.
pub const MIN_LOST_PACKETS: u64 = 8;

/// Counters of the connection's path since it opened (quinn's path and UDP
/// statistics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathSample {
    /// UDP payload bytes sent.
    pub sent_bytes: u64,
    /// Bytes of packets declared lost.
    pub lost_bytes: u64,
    /// Packets declared lost.
    pub lost_packets: u64,
}

/// Watches one connection's loss for a black hole; see the module docs.
#[derive(Debug, Clone)]
pub struct BlackHoleWatch {
    start: Option<(Instant, PathSample)>,
    lossy_windows: u32,
}

impl Default for BlackHoleWatch {
    fn default() -> Self {
        Self::new()
    }
}

impl BlackHoleWatch {
    /// A watch with no observation yet.
    pub fn new() -> Self {
        Self {
            start: None,
            lossy_windows: 0,
        }
    }

    /// Takes the counters at `now`; true once the path counts as a black
    /// hole (and from then on). Call it at least once per [`WINDOW`].
    pub fn observe(&mut self, now: Instant, sample: PathSample) -> bool {
        let Some((since, base)) = self.start else {
            self.start = Some((now, sample));
            return false;
        };
        // A timer of one window may fire a little early.
        if now.saturating_duration_since(since) < WINDOW * 3 / 4 {
            return self.tripped();
        }
        let sent = sample.sent_bytes.saturating_sub(base.sent_bytes);
        let lost = sample.lost_bytes.saturating_sub(base.lost_bytes);
        let lost_packets = sample.lost_packets.saturating_sub(base.lost_packets);
        // Lost bytes were sent in this window or the one before (loss is
        // declared about one round trip after the send): against the bytes
        // sent in the window, a black hole is near or above 1.
        let most_lost = lost_packets >= MIN_LOST_PACKETS && lost.saturating_mul(2) >= sent;
        if most_lost {
            self.lossy_windows = self.lossy_windows.saturating_add(1);
        } else if !self.tripped() {
            self.lossy_windows = 0;
        }
        self.start = Some((now, sample));
        self.tripped()
    }

    /// Whether the path counts as a black hole.
    pub fn tripped(&self) -> bool {
        self.lossy_windows >= WINDOWS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `windows` windows in which `sent` packets of `size` bytes
    /// and `small` packets of 60 bytes are sent, and `lost` of the large
    /// ones lost; returns whether the watch tripped after each.
    fn run(
        watch: &mut BlackHoleWatch,
        t0: Instant,
        windows: u32,
        sent: u64,
        small: u64,
        lost: u64,
        size: u64,
    ) -> Vec<bool> {
        let mut s = PathSample::default();
        watch.observe(t0, s);
        (1..=windows)
            .map(|i| {
                s.sent_bytes += sent * size + small * 60;
                s.lost_bytes += lost * size;
                s.lost_packets += lost;
                watch.observe(t0 + WINDOW * i, s)
            })
            .collect()
    }

    #[test]
    fn a_path_losing_every_full_size_packet_is_a_black_hole() {
        let mut w = BlackHoleWatch::new();
        // Under congestion control the sender sends few large packets, all
        // lost, and keepalives and ACKs that cross.
        let trips = run(&mut w, Instant::now(), 3, 20, 30, 20, 1400);
        assert_eq!(trips, [false, true, true]);
    }

    #[test]
    fn random_loss_is_not_a_black_hole() {
        for percent in [1, 5, 10, 30] {
            let mut w = BlackHoleWatch::new();
            let trips = run(&mut w, Instant::now(), 20, 10_000, 100, 100 * percent, 1400);
            assert!(
                trips.iter().all(|t| !t),
                "{percent} % loss tripped the watch"
            );
        }
    }

    #[test]
    fn an_idle_tunnel_losing_a_few_keepalives_is_not_a_black_hole() {
        let mut w = BlackHoleWatch::new();
        let trips = run(&mut w, Instant::now(), 10, 0, 2, 1, 60);
        assert!(trips.iter().all(|t| !t));
        // Nothing sent, nothing lost.
        let mut w = BlackHoleWatch::new();
        let trips = run(&mut w, Instant::now(), 10, 0, 0, 0, 0);
        assert!(trips.iter().all(|t| !t));
    }

    #[test]
    fn one_bad_window_between_good_ones_is_not_a_black_hole() {
        let t0 = Instant::now();
        let mut w = BlackHoleWatch::new();
        let mut s = PathSample::default();
        w.observe(t0, s);
        for (i, lost) in [20u64, 0, 20, 0, 20].into_iter().enumerate() {
            s.sent_bytes += 20 * 1400;
            s.lost_bytes += lost * 1400;
            s.lost_packets += lost;
            let at = t0 + WINDOW * (i as u32 + 1);
            assert!(!w.observe(at, s), "window {i}");
        }
    }

    #[test]
    fn samples_within_a_window_wait_for_its_end() {
        let t0 = Instant::now();
        let mut w = BlackHoleWatch::new();
        w.observe(t0, PathSample::default());
        let s = PathSample {
            sent_bytes: 28_000,
            lost_bytes: 28_000,
            lost_packets: 20,
        };
        // Half a window: not judged yet.
        assert!(!w.observe(t0 + WINDOW / 2, s));
        assert!(!w.observe(t0 + WINDOW, s));
        let s2 = PathSample {
            sent_bytes: 56_000,
            lost_bytes: 56_000,
            lost_packets: 40,
        };
        assert!(w.observe(t0 + WINDOW * 2, s2));
        assert!(w.tripped());
    }
}
