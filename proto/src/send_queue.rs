//! When a sender may wait for room in a site's full send queue.
//!
//! The broker reads one device for the packets of every site, so a wait for
//! one site's queue holds up the packets of all others. Waiting is what
//! keeps a burst: a connection that sends again within moments frees room
//! for many datagrams, and the packets waiting in the device's queue in
//! the kernel meanwhile are delayed, not lost. A connection that drains
//! slowly (a narrow uplink) or not at all (a dead path) would hold the
//! device's reader at its pace, so a wait that ran out or took longer than
//! the patience, makes the sender drop for that site instead, for a quiet
//! period, after which a full queue is waited for again.

use std::time::{Duration, Instant};

/// The rule for waiting on a full send queue; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendPatience {
    /// The longest wait for room.
    pub patience: Duration,
    /// How long a site whose queue drained slowly is not waited for.
    pub quiet: Duration,
}

impl SendPatience {
    /// 2 ms of patience (quinn's pacer releases its bursts about every
    /// 2 ms, so a connection that sends at all frees room within it), and
    /// 100 ms without waiting after a slow drain: at most 2 % of the
    /// reader's time goes to one slow site.
    pub const DEFAULT: Self = Self {
        patience: Duration::from_millis(2),
        quiet: Duration::from_millis(100),
    };
}

impl Default for SendPatience {
    /// [`SendPatience::DEFAULT`].
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// One site's state of the rule: when it may be waited for again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendWait {
    quiet_until: Option<Instant>,
}

impl SendWait {
    /// Whether a sender that found the queue full at `now` may wait for
    /// room (at most [`SendPatience::patience`]) instead of dropping.
    pub fn may_wait(&self, now: Instant) -> bool {
        self.quiet_until.is_none_or(|until| now >= until)
    }

    /// A wait that began at `started` ended at `now`, with the datagram
    /// `queued` or not (the patience ran out).
    pub fn waited(&mut self, rule: &SendPatience, started: Instant, now: Instant, queued: bool) {
        let slow = !queued || now.saturating_duration_since(started) >= rule.patience;
        self.quiet_until = if slow { Some(now + rule.quiet) } else { None };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_is_waited_for_until_it_drains_slowly() {
        let rule = SendPatience::default();
        let t0 = Instant::now();
        let mut wait = SendWait::default();
        assert!(wait.may_wait(t0));
        // Room within a fraction of the patience: the next full queue is
        // waited for again.
        wait.waited(&rule, t0, t0 + Duration::from_micros(300), true);
        assert!(wait.may_wait(t0 + Duration::from_micros(301)));
        // The patience ran out: no wait for the quiet period.
        let t1 = t0 + Duration::from_millis(10);
        wait.waited(&rule, t1, t1 + rule.patience, false);
        let after = t1 + rule.patience;
        assert!(!wait.may_wait(after));
        assert!(!wait.may_wait(after + rule.quiet - Duration::from_micros(1)));
        assert!(wait.may_wait(after + rule.quiet));
    }

    #[test]
    fn a_wait_as_long_as_the_patience_counts_as_slow() {
        let rule = SendPatience::default();
        let t0 = Instant::now();
        let mut wait = SendWait::default();
        wait.waited(&rule, t0, t0 + rule.patience, true);
        assert!(!wait.may_wait(t0 + rule.patience));
        assert!(wait.may_wait(t0 + rule.patience + rule.quiet));
    }

    /// Reader time one slow site can take is bounded by patience / quiet.
    #[test]
    fn a_slow_site_holds_the_reader_a_bounded_share_of_the_time() {
        let rule = SendPatience::default();
        let start = Instant::now();
        let mut now = start;
        let mut wait = SendWait::default();
        let mut waited = Duration::ZERO;
        // A full queue at every packet, one packet every 10 µs, for 1 s;
        // every wait runs out.
        while now < start + Duration::from_secs(1) {
            if wait.may_wait(now) {
                let began = now;
                now += rule.patience;
                waited += rule.patience;
                wait.waited(&rule, began, now, false);
            } else {
                now += Duration::from_micros(10);
            }
        }
        let share = waited.as_secs_f64() / (now - start).as_secs_f64();
        assert!(share <= 0.021, "{share}");
    }
}
