//! The gateway's schedule: when it runs WireGuard's timers, when it asks the
//! broker for the route set, and what it says about the WireGuard session.
//!
//! [`ControlSchedule`] is sans-IO. The gateway's shell owns the WireGuard
//! peer and the socket; it calls [`ControlSchedule::handle_timeout`] when
//! the timer at [`ControlSchedule::poll_timeout`] fires, carries out each
//! [`ControlAction`] from [`ControlSchedule::poll_action`] in order, answers
//! [`ControlAction::UpdateTimers`] with
//! [`ControlSchedule::handle_handshake`], and logs each [`ControlEvent`]
//! from [`ControlSchedule::poll_event`]. Then it re-arms its timer.
//!
//! - WireGuard's timers (handshake retries, keepalives) run every
//!   [`TIMER_TICK`].
//! - A [`super::Message::Request`] goes out at start and every
//!   [`super::REQUEST_INTERVAL`] after, on a fixed cadence.
//! - The session counts as established once a handshake is younger than
//!   [`HANDSHAKE_FRESH`]; without any handshake [`HANDSHAKE_WARNING`]
//!   after start, the operator is told once what to check.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::REQUEST_INTERVAL;

/// How often WireGuard's timers run.
pub const TIMER_TICK: Duration = Duration::from_millis(250);
/// A handshake younger than this means the session is up.
pub const HANDSHAKE_FRESH: Duration = Duration::from_secs(180);
/// No handshake this long after start is worth a warning.
pub const HANDSHAKE_WARNING: Duration = Duration::from_secs(10);

/// What the schedule asks the shell to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlAction {
    /// Run WireGuard's timers, send what they produce, and answer with
    /// [`ControlSchedule::handle_handshake`].
    UpdateTimers,
    /// Send a route-set request to the broker.
    SendRequest,
}

/// What the schedule reports, once each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlEvent {
    /// The WireGuard session with the broker is established.
    Established,
    /// No handshake with the broker yet, [`HANDSHAKE_WARNING`] after start.
    NoHandshake,
}

/// The gateway's timer schedule.
#[derive(Debug)]
pub struct ControlSchedule {
    started: Instant,
    next_tick: Instant,
    next_request: Instant,
    established: bool,
    warned: bool,
    actions: VecDeque<ControlAction>,
    events: VecDeque<ControlEvent>,
}

impl ControlSchedule {
    /// A schedule starting at `now`: the first tick and the first request
    /// are due at once.
    pub fn new(now: Instant) -> Self {
        Self {
            started: now,
            next_tick: now,
            next_request: now,
            established: false,
            warned: false,
            actions: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// When to call [`handle_timeout`](Self::handle_timeout).
    pub fn poll_timeout(&self) -> Instant {
        self.next_tick.min(self.next_request)
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<ControlAction> {
        self.actions.pop_front()
    }

    /// The next thing to report.
    pub fn poll_event(&mut self) -> Option<ControlEvent> {
        self.events.pop_front()
    }

    /// The timer fired.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_tick {
            // A late tick delays the next rather than bunching them.
            self.next_tick = now + TIMER_TICK;
            self.actions.push_back(ControlAction::UpdateTimers);
        }
        if now >= self.next_request {
            // Requests keep their cadence; a long stall sends one, not a
            // burst.
            while self.next_request <= now {
                self.next_request += REQUEST_INTERVAL;
            }
            self.actions.push_back(ControlAction::SendRequest);
        }
    }

    /// The age of the last WireGuard handshake (`None`: none yet).
    pub fn handle_handshake(&mut self, age: Option<Duration>, now: Instant) {
        match age {
            Some(age) if !self.established && age < HANDSHAKE_FRESH => {
                self.established = true;
                self.events.push_back(ControlEvent::Established);
            }
            None if !self.warned
                && now.saturating_duration_since(self.started) > HANDSHAKE_WARNING =>
            {
                self.warned = true;
                self.events.push_back(ControlEvent::NoHandshake);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What happened when.
    type Log<T> = Vec<(Instant, T)>;

    /// Runs the schedule from `start` to `end` firing the timer when due;
    /// the times of each action.
    fn run(
        s: &mut ControlSchedule,
        start: Instant,
        end: Instant,
        age: impl Fn(Instant) -> Option<Duration>,
    ) -> (Log<ControlAction>, Log<ControlEvent>) {
        let (mut actions, mut events) = (Vec::new(), Vec::new());
        let mut now = start;
        while now <= end {
            s.handle_timeout(now);
            while let Some(a) = s.poll_action() {
                if a == ControlAction::UpdateTimers {
                    s.handle_handshake(age(now), now);
                }
                actions.push((now, a));
            }
            events.extend(std::iter::from_fn(|| s.poll_event()).map(|e| (now, e)));
            let next = s.poll_timeout();
            assert!(next > now, "the timer moves on");
            now = next;
        }
        (actions, events)
    }

    #[test]
    fn timers_tick_and_requests_keep_their_cadence() {
        let t0 = Instant::now();
        let mut s = ControlSchedule::new(t0);
        assert_eq!(s.poll_timeout(), t0);
        let (actions, _) = run(&mut s, t0, t0 + Duration::from_secs(30), |_| None);
        let requests: Vec<Instant> = actions
            .iter()
            .filter(|(_, a)| *a == ControlAction::SendRequest)
            .map(|(t, _)| *t)
            .collect();
        assert_eq!(
            requests,
            [0, 10, 20, 30].map(|s| t0 + Duration::from_secs(s))
        );
        let ticks = actions
            .iter()
            .filter(|(_, a)| *a == ControlAction::UpdateTimers)
            .count();
        assert_eq!(ticks, 121, "every 250 ms over 30 s, both ends");
    }

    #[test]
    fn a_late_wakeup_sends_one_request_and_keeps_the_cadence() {
        let t0 = Instant::now();
        let mut s = ControlSchedule::new(t0);
        s.handle_timeout(t0);
        while s.poll_action().is_some() {}
        // The gateway stalls for 35 s.
        s.handle_timeout(t0 + Duration::from_secs(35));
        let actions: Vec<ControlAction> = std::iter::from_fn(|| s.poll_action()).collect();
        assert_eq!(
            actions,
            [ControlAction::UpdateTimers, ControlAction::SendRequest]
        );
        assert_eq!(s.poll_timeout(), t0 + Duration::from_millis(35_250));
        s.handle_timeout(t0 + Duration::from_millis(39_999));
        assert!(!std::iter::from_fn(|| s.poll_action()).any(|a| a == ControlAction::SendRequest));
        s.handle_timeout(t0 + Duration::from_secs(40));
        assert!(std::iter::from_fn(|| s.poll_action()).any(|a| a == ControlAction::SendRequest));
    }

    #[test]
    fn no_handshake_warns_once_after_ten_seconds() {
        let t0 = Instant::now();
        let mut s = ControlSchedule::new(t0);
        let (_, events) = run(&mut s, t0, t0 + Duration::from_secs(60), |_| None);
        assert_eq!(events.len(), 1, "{events:?}");
        let (at, event) = events[0];
        assert_eq!(event, ControlEvent::NoHandshake);
        assert!(at > t0 + HANDSHAKE_WARNING && at <= t0 + HANDSHAKE_WARNING + TIMER_TICK);
    }

    #[test]
    fn a_fresh_handshake_is_reported_once_and_prevents_the_warning() {
        let t0 = Instant::now();
        let mut s = ControlSchedule::new(t0);
        let up = t0 + Duration::from_secs(3);
        let (_, events) = run(&mut s, t0, t0 + Duration::from_secs(60), |now| {
            (now >= up).then(|| now - up)
        });
        assert_eq!(events, [(up, ControlEvent::Established)]);
        // A handshake too old to count is not an established session.
        let mut s = ControlSchedule::new(t0);
        s.handle_handshake(Some(HANDSHAKE_FRESH), t0);
        assert_eq!(s.poll_event(), None);
        s.handle_handshake(Some(HANDSHAKE_FRESH - Duration::from_secs(1)), t0);
        assert_eq!(s.poll_event(), Some(ControlEvent::Established));
    }
}
