//! The agent's transport ladder and its reconnection backoff.

use std::time::Duration;

use crate::tunnel::Transport;

/// How often an agent on a lower rung tries HTTP/3 again.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(30);

/// What a new connection means for the ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// The first connection, or the same rung as before.
    Stay,
    /// A lower rung than the last one that worked.
    Fallback,
    /// A higher rung than the last one that worked.
    Upgrade,
}

/// The agent's transport ladder: HTTP/3, then HTTP/2 over TCP, then HTTP/2
/// through a proxy when one is configured. It remembers the last rung that
/// worked and starts there; on a lower rung it asks for HTTP/3 probes.
#[derive(Debug, Clone)]
pub struct Ladder {
    rungs: Vec<Transport>,
    last: Option<Transport>,
}

impl Ladder {
    /// A ladder with the proxy rung if `proxy`, starting from `remembered`
    /// (ignored when it is not a rung of this ladder).
    pub fn new(proxy: bool, remembered: Option<Transport>) -> Self {
        let rungs: Vec<Transport> = Transport::ALL
            .into_iter()
            .filter(|t| proxy || *t != Transport::H2Proxy)
            .collect();
        let last = remembered.filter(|t| rungs.contains(t));
        Self { rungs, last }
    }

    /// The rungs of this ladder, best first.
    pub fn rungs(&self) -> &[Transport] {
        &self.rungs
    }

    /// The last rung that worked.
    pub fn last(&self) -> Option<Transport> {
        self.last
    }

    /// The order of the next attempt: the last rung that worked first, then
    /// the others, best first.
    pub fn attempt_order(&self) -> Vec<Transport> {
        let mut order: Vec<Transport> = self.last.into_iter().collect();
        order.extend(self.rungs.iter().copied().filter(|t| Some(*t) != self.last));
        order
    }

    /// Records a connection on `transport` and says what it was.
    pub fn connected(&mut self, transport: Transport) -> Move {
        let moved = match self.last {
            Some(last) if transport > last => Move::Fallback,
            Some(last) if transport < last => Move::Upgrade,
            _ => Move::Stay,
        };
        self.last = Some(transport);
        moved
    }

    /// The rung to probe while connected on `current`: HTTP/3 when below it.
    pub fn probe(&self, current: Transport) -> Option<Transport> {
        (current != Transport::H3).then_some(Transport::H3)
    }
}

/// Exponential backoff with full jitter, capped, from a seeded generator:
/// attempt *n* waits a uniformly random time in `[d/2, d]` where
/// `d = min(max, base * 2^n)`. Reset after a connection that lasted.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    state: u64,
}

impl Backoff {
    /// A backoff starting at `base`, never exceeding `max`, jittered from
    /// `seed`.
    pub fn new(base: Duration, max: Duration, seed: u64) -> Self {
        // splitmix64 spreads nearby seeds apart; xorshift needs a non-zero state.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Self {
            base,
            max,
            attempt: 0,
            state: if z == 0 { 0x2545_f491_4f6c_dd1d } else { z },
        }
    }

    /// The wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        let ceiling = self.base.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64*
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        let r = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let fraction = 0.5 + (r >> 11) as f64 / (1u64 << 53) as f64 / 2.0;
        ceiling.mul_f64(fraction)
    }

    /// Start over (after a successful, lasting connection).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ladder_starts_at_the_last_rung_that_worked() {
        let mut ladder = Ladder::new(true, None);
        assert_eq!(
            ladder.attempt_order(),
            [Transport::H3, Transport::H2, Transport::H2Proxy]
        );
        assert_eq!(ladder.connected(Transport::H2Proxy), Move::Stay);
        assert_eq!(
            ladder.attempt_order(),
            [Transport::H2Proxy, Transport::H3, Transport::H2]
        );
        assert_eq!(ladder.probe(Transport::H2Proxy), Some(Transport::H3));
        assert_eq!(ladder.connected(Transport::H3), Move::Upgrade);
        assert_eq!(ladder.probe(Transport::H3), None);
        assert_eq!(ladder.connected(Transport::H2), Move::Fallback);
        // Without a proxy there is no proxy rung, and a remembered proxy
        // rung is forgotten.
        let ladder = Ladder::new(false, Some(Transport::H2Proxy));
        assert_eq!(ladder.last(), None);
        assert_eq!(ladder.attempt_order(), [Transport::H3, Transport::H2]);
        for t in Transport::ALL {
            assert_eq!(Transport::parse(t.as_str()), Some(t));
        }
        assert_eq!(Transport::parse("h9"), None);
    }

    #[test]
    fn backoff_grows_jittered_and_capped() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30), 42);
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(250) && delays[0] <= Duration::from_millis(500));
        assert!(delays[3] >= Duration::from_secs(2) && delays[3] <= Duration::from_secs(4));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(30)));
        assert!(
            delays[11] >= Duration::from_secs(15),
            "capped range is [max/2, max]"
        );
        // Two agents with different seeds do not retry in lockstep.
        let mut other = Backoff::new(Duration::from_millis(500), Duration::from_secs(30), 43);
        let other_delays: Vec<Duration> = (0..12).map(|_| other.next_delay()).collect();
        assert_ne!(delays, other_delays);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(500));
    }
}
