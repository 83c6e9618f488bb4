//! Traffic and drop counters: per session, per device, and the totals of
//! ended sessions. The packet path only does relaxed atomic additions on
//! counters of its own session or device; totals are summed when read.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use tether_proto::forward::DropReason;

/// Packets and bytes in one direction, on a cache line of its own so the
/// receiving and sending threads do not contend.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct Direction {
    /// Packets.
    pub packets: AtomicU64,
    /// Bytes.
    pub bytes: AtomicU64,
}

impl Direction {
    /// Counts one packet of `len` bytes.
    #[inline]
    pub fn add(&self, len: u64) {
        self.packets.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(len, Ordering::Relaxed);
    }

    /// (packets, bytes).
    pub fn get(&self) -> (u64, u64) {
        (
            self.packets.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// Traffic counters of a session or device.
#[derive(Debug, Default)]
pub struct Counters {
    /// From the site (or out of the device).
    pub rx: Direction,
    /// To the site (or into the device).
    pub tx: Direction,
}

/// Traffic of sessions that have ended, so totals stay monotonic.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    /// Packets from sites.
    pub rx_packets: u64,
    /// Bytes from sites.
    pub rx_bytes: u64,
    /// Packets to sites.
    pub tx_packets: u64,
    /// Bytes to sites.
    pub tx_bytes: u64,
}

impl Totals {
    /// The counters' values now.
    pub fn of(counters: &Counters) -> Self {
        let ((rx_packets, rx_bytes), (tx_packets, tx_bytes)) =
            (counters.rx.get(), counters.tx.get());
        Self {
            rx_packets,
            rx_bytes,
            tx_packets,
            tx_bytes,
        }
    }

    /// Adds `other` to these totals.
    pub fn add(&mut self, other: &Totals) {
        self.rx_packets += other.rx_packets;
        self.rx_bytes += other.rx_bytes;
        self.tx_packets += other.tx_packets;
        self.tx_bytes += other.tx_bytes;
    }
}

/// A site's traffic and drops.
#[derive(Debug, Clone, Copy, Default)]
pub struct SiteTotals {
    /// Traffic (rx: from the site).
    pub traffic: Totals,
    /// Drops of its packets, indexed like [`DropReason::ALL`].
    pub drops: [u64; DropReason::ALL.len()],
}

impl SiteTotals {
    /// The values of one session's counters now.
    pub fn of(counters: &Counters, dropped: &Drops) -> Self {
        let mut drops = [0; DropReason::ALL.len()];
        for (reason, n) in dropped.get() {
            if let Some(d) = drops.get_mut(reason as usize) {
                *d = n;
            }
        }
        Self {
            traffic: Totals::of(counters),
            drops,
        }
    }

    /// Adds `other` to these totals.
    pub fn add(&mut self, other: &SiteTotals) {
        self.traffic.add(&other.traffic);
        for (a, b) in self.drops.iter_mut().zip(other.drops) {
            *a += b;
        }
    }
}

/// Per-reason drop counters, made by the first drop: most sites never
/// drop a packet, and a counter for every reason (136 bytes) would be
/// held by each connected site.
#[derive(Debug, Default)]
pub struct Drops(OnceLock<Box<[AtomicU64; DropReason::ALL.len()]>>);

impl Drops {
    /// Counts a drop.
    pub fn add(&self, reason: DropReason) {
        self.add_n(reason, 1);
    }

    /// Counts `n` drops for the same reason.
    pub fn add_n(&self, reason: DropReason, n: u64) {
        let counts = self
            .0
            .get_or_init(|| Box::new(std::array::from_fn(|_| AtomicU64::new(0))));
        if let Some(c) = counts.get(reason as usize) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Every reason with its count.
    pub fn get(&self) -> Vec<(DropReason, u64)> {
        let counts = self.0.get();
        DropReason::ALL
            .iter()
            .map(|r| {
                (
                    *r,
                    counts
                        .and_then(|c| c.get(*r as usize))
                        .map_or(0, |c| c.load(Ordering::Relaxed)),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_counters_are_made_by_the_first_drop() {
        let drops = Drops::default();
        assert!(drops.0.get().is_none(), "no counters before a drop");
        assert!(drops.get().iter().all(|(_, n)| *n == 0));
        assert_eq!(drops.get().len(), DropReason::ALL.len());
        drops.add(DropReason::Malformed);
        drops.add_n(DropReason::Malformed, 2);
        drops.add(DropReason::TargetDown);
        let count = |reason| {
            drops
                .get()
                .into_iter()
                .find(|(r, _)| *r == reason)
                .map(|(_, n)| n)
        };
        assert_eq!(count(DropReason::Malformed), Some(3));
        assert_eq!(count(DropReason::TargetDown), Some(1));
        let others = drops.get().into_iter().filter(|(_, n)| *n > 0).count();
        assert_eq!(others, 2);
    }
}
