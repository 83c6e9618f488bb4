//! Which broker a gateway sends its traffic to, and when a broker counts as
//! gone.
//!
//! A gateway holds a WireGuard session with every broker of its region
//! (the `brokers` of its configuration) and sends its packets to one of
//! them, the **active** broker; that broker delivers each packet to the
//! site, over the broker-to-broker link when another broker holds the
//! site. The answers come back from whichever broker holds the site, since
//! every broker the gateway is registered on routes the gateway's prefixes
//! to it directly. So one live broker is enough for every site, and the
//! gateway only has to notice quickly when its active broker is gone.
//!
//! [`Failover`] is sans-IO. The shell calls
//! [`Failover::handle_timeout`] when the timer at
//! [`Failover::poll_timeout`] fires, sends each
//! [`FailoverAction::Ping`] to its broker, reports
//! [`Failover::handle_heard`] for every datagram a broker's WireGuard
//! session authenticates and [`Failover::handle_pong_of`] for each
//! [`super::Message::Pong`] (with the sequence number it echoes) and
//! [`Failover::handle_leaving`] for each [`super::Message::Leaving`] (a
//! "leaving" before the pongs of the same receive), logs each
//! [`FailoverEvent`], and sends its
//! packets to [`Failover::target`].
//!
//! - Every broker gets a ping every [`PING_INTERVAL`], so the sessions to
//!   the standby brokers stay established and a switch costs no
//!   handshake. A broker that is down gets a new handshake initiation
//!   every [`REHANDSHAKE_INTERVAL`] ([`FailoverAction::Handshake`]), so a
//!   restarted broker is back within a second.
//! - A broker that has answered a ping and then is silent for
//!   [`DEAD_AFTER`] is down (it died, or the path to it is cut). A broker
//!   that never answers pings (an older release) is judged by what it
//!   sends at all: down after [`SILENT_BROKER_FRESH`] without a
//!   datagram.
//! - The active broker stays active while it is up. When it goes down the
//!   gateway moves to the first broker of its configuration that is up
//!   (a **failover**, counted), and stays there when the old one returns:
//!   a broker that comes and goes does not pull the traffic back and
//!   forth.
//! - Before any broker has answered, traffic goes to the first configured
//!   one (its packets start the handshake); when every broker is down,
//!   traffic stays where it was.
//! - A broker that says it is stopping ([`super::Message::Leaving`],
//!   [`Failover::handle_leaving`]) is down at once, whatever else it still
//!   sends while it drains, until it answers a ping again (a new process,
//!   or a fenced broker under its next etcd lease). Only a pong that
//!   answers a ping sent after the "leaving" arrived counts: a pong that
//!   the broker sent before it said so, and that arrives late (reordered,
//!   or in the same receive), answers an older ping and changes nothing.
//! - Brokers come and go while the gateway runs ([`super::brokers`]): a
//!   learned broker is followed from then on ([`Failover::follow`]), a
//!   forgotten one is no longer pinged nor chosen
//!   ([`Failover::unfollow`]); the traffic leaves a forgotten active
//!   broker for the first other that is up.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How often each broker is pinged.
pub const PING_INTERVAL: Duration = Duration::from_millis(200);
/// Silence after which a broker that answers pings counts as down: four
/// pings unanswered. Under a second, so that a gateway whose broker dies
/// with the sites it held is moved no later than the sites are (they
/// notice within about 0.8 s).
pub const DEAD_AFTER: Duration = Duration::from_millis(800);
/// Silence after which a broker that never answered a ping counts as down:
/// WireGuard renews a session every two minutes, and a session without a
/// renewal for three minutes is dead.
pub const SILENT_BROKER_FRESH: Duration = Duration::from_secs(180);
/// How often a broker that is down is sent a new handshake initiation: a
/// broker that restarted has forgotten the session, and WireGuard itself
/// would wait 15 s before starting over.
pub const REHANDSHAKE_INTERVAL: Duration = Duration::from_secs(1);
/// The most brokers a gateway follows.
pub const MAX_BROKERS: usize = 32;

/// What the failover asks the shell to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverAction {
    /// Send a [`super::Message::Ping`] with `seq` to broker `broker`.
    Ping {
        /// The broker's index in the configuration.
        broker: usize,
        /// The ping's sequence number.
        seq: u64,
    },
    /// Start a new WireGuard handshake with broker `broker` (it is down: it
    /// may have restarted and forgotten the session).
    Handshake {
        /// The broker's index in the configuration.
        broker: usize,
    },
}

/// What the failover reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverEvent {
    /// Broker `broker` answers (first time, or again after being down).
    Up {
        /// The broker's index in the configuration.
        broker: usize,
    },
    /// Broker `broker` has been silent too long.
    Down {
        /// The broker's index in the configuration.
        broker: usize,
        /// How long it has been silent.
        silent: Duration,
    },
    /// The first broker that answered carries the traffic.
    Selected {
        /// The broker's index in the configuration.
        broker: usize,
    },
    /// The active broker went down; traffic moved to another.
    Switched {
        /// The broker that went down.
        from: usize,
        /// The broker that carries the traffic now.
        to: usize,
    },
    /// A broker said it is stopping: it counts as down until it answers a
    /// ping again.
    Leaving {
        /// The broker's index in the configuration.
        broker: usize,
    },
    /// The active broker went down and no other answers: traffic stays on
    /// it until one does.
    NoneAnswering {
        /// The broker the traffic stays on.
        broker: usize,
    },
}

#[derive(Debug, Clone)]
struct Broker {
    /// Followed (pinged, chosen); a forgotten slot is not.
    followed: bool,
    last_heard: Option<Instant>,
    answers_pings: bool,
    up: bool,
    /// It said it is stopping, and has not answered a ping since.
    leaving: bool,
    /// The last ping sequence number sent (to any broker) when it said it
    /// is stopping: while `leaving`, only a pong of a later ping counts.
    leaving_after: u64,
    next_ping: Instant,
    next_handshake: Instant,
}

impl Broker {
    /// A broker just followed at `now`: pinged at once.
    fn fresh(now: Instant) -> Self {
        Self {
            followed: true,
            last_heard: None,
            answers_pings: false,
            up: false,
            leaving: false,
            leaving_after: 0,
            next_ping: now,
            // The first ping starts the first handshake.
            next_handshake: now + REHANDSHAKE_INTERVAL,
        }
    }

    /// How long it may be silent and still count as up.
    fn allowance(&self) -> Duration {
        if self.answers_pings {
            DEAD_AFTER
        } else {
            SILENT_BROKER_FRESH
        }
    }

    /// When it counts as down if nothing more is heard.
    fn deadline(&self) -> Option<Instant> {
        self.last_heard.map(|t| t + self.allowance())
    }
}

/// The gateway's choice of broker.
#[derive(Debug)]
pub struct Failover {
    brokers: Vec<Broker>,
    active: Option<usize>,
    failovers: u64,
    seq: u64,
    actions: VecDeque<FailoverAction>,
    events: VecDeque<FailoverEvent>,
}

impl Failover {
    /// A gateway with `brokers` brokers (at least one, at most
    /// [`MAX_BROKERS`]; more are ignored), starting at `now`: every broker
    /// is pinged at once.
    pub fn new(brokers: usize, now: Instant) -> Self {
        let n = brokers.clamp(1, MAX_BROKERS);
        Self {
            brokers: vec![Broker::fresh(now); n],
            active: None,
            failovers: 0,
            seq: 0,
            actions: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// How many broker slots there are (followed or not).
    pub fn brokers(&self) -> usize {
        self.brokers.len()
    }

    /// Whether slot `broker` is followed.
    pub fn is_followed(&self, broker: usize) -> bool {
        self.brokers.get(broker).is_some_and(|b| b.followed)
    }

    /// Follows a (new) broker in slot `broker` from `now`: the next slot
    /// after the last, or one not followed (a forgotten broker's, which
    /// starts afresh). Other slots, and slots beyond [`MAX_BROKERS`], are
    /// ignored.
    pub fn follow(&mut self, broker: usize, now: Instant) {
        if broker == self.brokers.len() && broker < MAX_BROKERS {
            self.brokers.push(Broker::fresh(now));
        } else if let Some(b) = self.brokers.get_mut(broker)
            && !b.followed
        {
            *b = Broker::fresh(now);
        }
    }

    /// Stops following broker `broker` (it is forgotten): no more pings,
    /// never chosen. When it was active, the traffic moves to the first
    /// other broker that is up, or, when none is, to the first followed
    /// one until one answers. At least one broker stays followed.
    pub fn unfollow(&mut self, broker: usize) {
        if !self.is_followed(broker) || self.brokers.iter().filter(|b| b.followed).count() < 2 {
            return;
        }
        if let Some(b) = self.brokers.get_mut(broker) {
            b.followed = false;
            b.up = false;
        }
        if self.active == Some(broker) {
            match self.brokers.iter().position(|b| b.up) {
                Some(to) => {
                    self.active = Some(to);
                    self.events
                        .push_back(FailoverEvent::Switched { from: broker, to });
                }
                None => self.active = None,
            }
        }
    }

    /// The broker carrying the traffic, once one has answered.
    pub fn active(&self) -> Option<usize> {
        self.active
    }

    /// Where to send packets now: the active broker, or the first one
    /// before any has answered.
    pub fn target(&self) -> usize {
        self.active
            .or_else(|| self.brokers.iter().position(|b| b.followed))
            .unwrap_or(0)
    }

    /// Whether broker `broker` counts as up.
    pub fn is_up(&self, broker: usize) -> bool {
        self.brokers.get(broker).is_some_and(|b| b.up)
    }

    /// How many times the traffic moved off a broker that went down.
    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    /// When to call [`handle_timeout`](Self::handle_timeout): the next
    /// ping, or the moment an up broker counts as down.
    pub fn poll_timeout(&self) -> Instant {
        self.brokers
            .iter()
            .filter(|b| b.followed)
            .flat_map(|b| {
                [
                    Some(b.next_ping),
                    b.deadline().filter(|_| b.up),
                    Some(b.next_handshake).filter(|_| !b.up),
                ]
            })
            .flatten()
            .min()
            .unwrap_or_else(|| unreachable!("a failover follows at least one broker"))
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<FailoverAction> {
        self.actions.pop_front()
    }

    /// The next thing to report.
    pub fn poll_event(&mut self) -> Option<FailoverEvent> {
        self.events.pop_front()
    }

    /// Whether there is something to report.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Broker `broker`'s WireGuard session authenticated a datagram from
    /// it (a handshake, a keepalive, a packet or a control message).
    pub fn handle_heard(&mut self, broker: usize, now: Instant) {
        let Some(b) = self.brokers.get_mut(broker).filter(|b| b.followed) else {
            return;
        };
        b.last_heard = Some(b.last_heard.map_or(now, |t| t.max(now)));
        if b.leaving {
            // Still draining: what it sends does not make it a target.
            return;
        }
        if !b.up {
            b.up = true;
            self.events.push_back(FailoverEvent::Up { broker });
        }
        self.choose(now);
    }

    /// Broker `broker` answered the ping of sequence number `seq` (the
    /// [`FailoverAction::Ping`]'s, echoed in [`super::Message::Pong`]):
    /// from now on its silence counts after [`DEAD_AFTER`].
    ///
    /// A broker that said it is leaving answers pings with `Leaving` while
    /// it drains or is fenced, so a pong of a ping sent after its "leaving"
    /// arrived is a broker that runs again (a new process, or a new etcd
    /// lease): it counts as up. A pong of an earlier ping (or of one never
    /// sent) was on its way before the "leaving" and is only a datagram
    /// heard ([`handle_heard`](Self::handle_heard)).
    pub fn handle_pong_of(&mut self, broker: usize, seq: u64, now: Instant) {
        let sent = self.seq;
        if let Some(b) = self.brokers.get_mut(broker).filter(|b| b.followed) {
            b.answers_pings = true;
            if b.leaving && seq > b.leaving_after && seq <= sent {
                b.leaving = false;
            }
        }
        self.handle_heard(broker, now);
    }

    /// Broker `broker` answered a ping sent after anything it said before:
    /// for a caller whose pongs cannot be late, such as a model of the
    /// brokers that answers each ping at once. The gateway, whose pongs
    /// can arrive after a "leaving" sent later, uses
    /// [`handle_pong_of`](Self::handle_pong_of) with the echoed sequence
    /// number.
    pub fn handle_pong(&mut self, broker: usize, now: Instant) {
        if let Some(b) = self.brokers.get_mut(broker).filter(|b| b.followed) {
            b.answers_pings = true;
            b.leaving = false;
        }
        self.handle_heard(broker, now);
    }

    /// Broker `broker` said it is stopping: it is down now, and the
    /// traffic moves to another broker that is up (counted as a
    /// failover), without waiting for its silence.
    pub fn handle_leaving(&mut self, broker: usize, now: Instant) {
        let Some(b) = self.brokers.get_mut(broker).filter(|b| b.followed) else {
            return;
        };
        b.last_heard = Some(b.last_heard.map_or(now, |t| t.max(now)));
        if b.leaving {
            return;
        }
        b.leaving = true;
        // Every ping sent so far may have been answered before the broker
        // said it is leaving.
        b.leaving_after = self.seq;
        b.up = false;
        self.events.push_back(FailoverEvent::Leaving { broker });
        let was_active = self.active == Some(broker);
        self.choose(now);
        if was_active && self.active == Some(broker) {
            self.events
                .push_back(FailoverEvent::NoneAnswering { broker });
        }
    }

    /// The timer fired: pings that are due, brokers that went silent.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut active_down = false;
        for i in 0..self.brokers.len() {
            let b = &mut self.brokers[i];
            if !b.followed {
                continue;
            }
            if now >= b.next_ping {
                // A late timer delays the next ping rather than bunching
                // them.
                b.next_ping = now + PING_INTERVAL;
                self.seq = self.seq.wrapping_add(1);
                self.actions.push_back(FailoverAction::Ping {
                    broker: i,
                    seq: self.seq,
                });
            }
            if b.up && b.deadline().is_some_and(|d| now >= d) {
                b.up = false;
                let silent = b
                    .last_heard
                    .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
                self.events
                    .push_back(FailoverEvent::Down { broker: i, silent });
                active_down |= self.active == Some(i);
            }
            if !b.up && now >= b.next_handshake {
                b.next_handshake = now + REHANDSHAKE_INTERVAL;
                self.actions
                    .push_back(FailoverAction::Handshake { broker: i });
            }
        }
        self.choose(now);
        if let Some(a) = self.active
            && active_down
            && !self.is_up(a)
        {
            self.events
                .push_back(FailoverEvent::NoneAnswering { broker: a });
        }
    }

    /// Keeps the active broker while it is up, else moves to the first up
    /// broker of the configuration. When none is up but some still answer
    /// while they say they are leaving (every broker fenced while etcd is
    /// away, or all draining at once), the traffic stays on the active
    /// broker while it answers, and otherwise goes to the first that does:
    /// a broker that is leaving still relays, a silent one does not.
    fn choose(&mut self, now: Instant) {
        if self.active.is_some_and(|a| self.is_up(a)) {
            return;
        }
        let answering = |b: &Broker| b.followed && b.deadline().is_some_and(|d| now < d);
        let next = match self.brokers.iter().position(|b| b.up) {
            Some(next) => next,
            None => {
                if self
                    .active
                    .and_then(|a| self.brokers.get(a))
                    .is_some_and(answering)
                {
                    return;
                }
                let Some(next) = self.brokers.iter().position(answering) else {
                    return;
                };
                next
            }
        };
        if self.active == Some(next) {
            return;
        }
        match self.active.replace(next) {
            None => self
                .events
                .push_back(FailoverEvent::Selected { broker: next }),
            Some(from) => {
                self.failovers += 1;
                self.events
                    .push_back(FailoverEvent::Switched { from, to: next });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gateway and its brokers on a fake clock: brokers answer each ping
    /// at once while alive.
    struct Sim {
        f: Failover,
        now: Instant,
        alive: Vec<bool>,
        /// Brokers that drain: they answer pings with `Leaving`.
        draining: Vec<bool>,
        pongs: bool,
        events: Vec<(Duration, FailoverEvent)>,
        start: Instant,
    }

    impl Sim {
        fn new(n: usize) -> Self {
            let now = Instant::now();
            Self {
                f: Failover::new(n, now),
                now,
                alive: vec![true; n],
                draining: vec![false; n],
                pongs: true,
                events: Vec::new(),
                start: now,
            }
        }

        /// Runs the timer until `d` from now.
        fn run(&mut self, d: Duration) {
            let end = self.now + d;
            loop {
                let t = self.f.poll_timeout();
                if t > end {
                    self.now = end;
                    break;
                }
                self.now = t.max(self.now);
                self.f.handle_timeout(self.now);
                while let Some(action) = self.f.poll_action() {
                    let (broker, seq) = match action {
                        FailoverAction::Ping { broker, seq } => (broker, Some(seq)),
                        FailoverAction::Handshake { broker } => (broker, None),
                    };
                    if self.alive[broker] {
                        if self.draining[broker] {
                            self.f.handle_leaving(broker, self.now);
                        } else if let (true, Some(seq)) = (self.pongs, seq) {
                            self.f.handle_pong_of(broker, seq, self.now);
                        } else {
                            self.f.handle_heard(broker, self.now);
                        }
                    }
                }
                self.drain();
            }
        }

        fn drain(&mut self) {
            while let Some(e) = self.f.poll_event() {
                self.events.push((self.now - self.start, e));
            }
        }

        fn last(&self) -> Option<FailoverEvent> {
            self.events.last().map(|(_, e)| *e)
        }
    }

    #[test]
    fn the_first_configured_broker_that_answers_carries_the_traffic() {
        let mut s = Sim::new(3);
        assert_eq!(s.f.target(), 0);
        assert_eq!(s.f.active(), None);
        s.run(Duration::from_millis(10));
        assert_eq!(s.f.active(), Some(0));
        assert!(s.f.is_up(1) && s.f.is_up(2));
        assert!(
            s.events
                .iter()
                .any(|(_, e)| *e == FailoverEvent::Selected { broker: 0 })
        );
        assert_eq!(s.f.failovers(), 0);
    }

    #[test]
    fn a_silent_first_broker_is_passed_over() {
        let mut s = Sim::new(2);
        s.alive[0] = false;
        s.run(Duration::from_secs(5));
        assert_eq!(s.f.active(), Some(1));
        assert_eq!(s.f.target(), 1);
        assert_eq!(s.f.failovers(), 0, "nothing failed over: 0 never answered");
    }

    #[test]
    fn every_broker_is_pinged_every_interval() {
        let mut f = Failover::new(2, Instant::now());
        let t0 = f.poll_timeout();
        let mut pings = Vec::new();
        let mut now = t0;
        while now < t0 + Duration::from_secs(1) {
            f.handle_timeout(now);
            while let Some(a) = f.poll_action() {
                if let FailoverAction::Ping { broker, seq } = a {
                    pings.push((now - t0, broker, seq));
                }
            }
            now = f.poll_timeout();
        }
        let due: Vec<Duration> = (0..)
            .map(|i| PING_INTERVAL * i)
            .take_while(|t| *t < Duration::from_secs(1))
            .collect();
        assert_eq!(pings.len(), 2 * due.len(), "{pings:?}");
        for b in 0..2 {
            let times: Vec<Duration> = pings.iter().filter(|p| p.1 == b).map(|p| p.0).collect();
            assert_eq!(times, due);
        }
        let seqs: std::collections::BTreeSet<u64> = pings.iter().map(|p| p.2).collect();
        assert_eq!(seqs.len(), pings.len(), "sequence numbers are unique");
    }

    #[test]
    fn a_dead_active_broker_is_left_within_a_second() {
        let mut s = Sim::new(2);
        s.run(Duration::from_secs(3));
        assert_eq!(s.f.active(), Some(0));
        let killed = s.now;
        s.alive[0] = false;
        s.run(Duration::from_secs(3));
        assert_eq!(s.f.active(), Some(1));
        assert_eq!(s.f.failovers(), 1);
        let (at, _) = s
            .events
            .iter()
            .find(|(_, e)| *e == FailoverEvent::Switched { from: 0, to: 1 })
            .copied()
            .unwrap_or_else(|| panic!("no switch: {:?}", s.events));
        let gap = at - (killed - s.start);
        assert!(gap <= DEAD_AFTER, "switched {gap:?} after the kill");
        assert!(
            gap >= DEAD_AFTER - PING_INTERVAL,
            "switched {gap:?} after the kill"
        );
        assert!(s.events.iter().any(|(_, e)| matches!(
            e,
            FailoverEvent::Down { broker: 0, silent } if *silent >= DEAD_AFTER
        )));
    }

    #[test]
    fn a_broker_that_is_down_gets_a_new_handshake_every_second() {
        let t0 = Instant::now();
        let mut f = Failover::new(2, t0);
        f.handle_pong(0, t0);
        let mut handshakes = Vec::new();
        let mut now = t0;
        while now < t0 + Duration::from_millis(3500) {
            f.handle_timeout(now);
            while let Some(a) = f.poll_action() {
                match a {
                    FailoverAction::Handshake { broker } => handshakes.push((now - t0, broker)),
                    FailoverAction::Ping { broker: 0, seq }
                        if now < t0 + Duration::from_secs(2) =>
                    {
                        f.handle_pong_of(0, seq, now)
                    }
                    FailoverAction::Ping { .. } => {}
                }
            }
            now = f.poll_timeout();
        }
        // Broker 1 never answered: from 1 s on, one a second. Broker 0
        // answered the last ping before 2 s and is down DEAD_AFTER later.
        let last_answered = (0..)
            .map(|i| PING_INTERVAL * i)
            .take_while(|t| *t < Duration::from_secs(2))
            .last()
            .unwrap();
        assert_eq!(
            handshakes,
            vec![
                (Duration::from_secs(1), 1),
                (Duration::from_secs(2), 1),
                (last_answered + DEAD_AFTER, 0),
                (Duration::from_secs(3), 1),
            ]
        );
    }

    #[test]
    fn a_returning_broker_does_not_pull_the_traffic_back() {
        let mut s = Sim::new(2);
        s.run(Duration::from_secs(1));
        s.alive[0] = false;
        s.run(Duration::from_secs(2));
        assert_eq!(s.f.active(), Some(1));
        s.alive[0] = true;
        s.run(Duration::from_secs(2));
        assert!(s.f.is_up(0));
        assert_eq!(s.f.active(), Some(1));
        assert_eq!(s.last(), Some(FailoverEvent::Up { broker: 0 }));
        // The one now active dies: back to the first.
        s.alive[1] = false;
        s.run(Duration::from_secs(2));
        assert_eq!(s.f.active(), Some(0));
        assert_eq!(s.f.failovers(), 2);
    }

    #[test]
    fn with_every_broker_down_traffic_stays_and_moves_to_the_first_to_return() {
        let mut s = Sim::new(3);
        s.run(Duration::from_secs(1));
        s.alive = vec![false; 3];
        s.run(Duration::from_secs(2));
        assert_eq!(s.f.active(), Some(0));
        assert_eq!(s.f.target(), 0);
        assert!(
            s.events
                .iter()
                .any(|(_, e)| *e == FailoverEvent::NoneAnswering { broker: 0 })
        );
        assert_eq!(s.f.failovers(), 0);
        s.alive[2] = true;
        s.run(Duration::from_secs(1));
        assert_eq!(s.f.active(), Some(2));
        assert_eq!(s.f.failovers(), 1);
    }

    #[test]
    fn a_broker_that_never_answers_pings_is_judged_by_its_session() {
        let mut s = Sim::new(2);
        // It answers nothing to pings: only its handshakes and keepalives
        // are heard.
        s.pongs = false;
        s.run(Duration::from_millis(10));
        s.alive = vec![false, false];
        s.run(Duration::from_secs(60));
        assert_eq!(s.f.active(), Some(0), "a quiet old broker is not dropped");
        assert!(s.f.is_up(0));
        s.f.handle_heard(1, s.now);
        s.run(SILENT_BROKER_FRESH);
        assert!(!s.f.is_up(0));
        assert_eq!(s.f.active(), Some(1));
    }

    #[test]
    fn unknown_brokers_and_late_reports_change_nothing() {
        let now = Instant::now();
        let mut f = Failover::new(2, now);
        f.handle_heard(7, now);
        f.handle_pong(9, now);
        f.handle_pong_of(9, 1, now);
        assert_eq!(f.active(), None);
        f.handle_pong(1, now + Duration::from_secs(2));
        // A report that arrives out of order does not move time back.
        f.handle_heard(1, now);
        f.handle_timeout(now + Duration::from_secs(2) + DEAD_AFTER - Duration::from_millis(1));
        assert!(f.is_up(1));
        assert_eq!(Failover::new(0, now).brokers(), 1);
        assert_eq!(Failover::new(1000, now).brokers(), MAX_BROKERS);
    }

    #[test]
    fn a_broker_that_says_it_is_leaving_is_left_at_once_and_taken_back_when_it_answers_again() {
        let mut sim = Sim::new(2);
        sim.run(Duration::from_secs(2));
        assert_eq!(sim.f.active(), Some(0));
        // The drain begins: the broker says so once, then answers every
        // ping with `Leaving` and still relays traffic.
        sim.draining[0] = true;
        sim.f.handle_leaving(0, sim.now);
        sim.drain();
        assert_eq!(sim.f.target(), 1, "moved at once, not after its silence");
        assert_eq!(sim.f.failovers(), 1);
        assert!(
            sim.events
                .iter()
                .any(|(_, e)| *e == FailoverEvent::Leaving { broker: 0 })
        );
        assert!(
            sim.events
                .iter()
                .any(|(_, e)| *e == FailoverEvent::Switched { from: 0, to: 1 })
        );
        for _ in 0..12 {
            sim.f.handle_heard(0, sim.now);
            sim.run(Duration::from_millis(250));
        }
        assert!(
            !sim.f.is_up(0),
            "what a draining broker sends keeps it down"
        );
        assert_eq!(sim.f.target(), 1);
        assert_eq!(sim.f.failovers(), 1);
        // It runs again (a new process answers pings): up, but the traffic
        // stays where it is until that broker goes.
        sim.draining[0] = false;
        sim.run(Duration::from_secs(1));
        assert!(sim.f.is_up(0));
        assert_eq!(sim.f.target(), 1);
        sim.alive[1] = false;
        sim.run(Duration::from_secs(2));
        assert_eq!(sim.f.target(), 0);
        assert_eq!(sim.f.failovers(), 2);
    }

    /// Fires the timer at `now` and returns the pings it sends, as
    /// (broker, seq).
    fn pings_at(f: &mut Failover, now: Instant) -> Vec<(usize, u64)> {
        f.handle_timeout(now);
        std::iter::from_fn(|| f.poll_action())
            .filter_map(|a| match a {
                FailoverAction::Ping { broker, seq } => Some((broker, seq)),
                FailoverAction::Handshake { .. } => None,
            })
            .collect()
    }

    /// The sequence number of the ping to `broker` among `pings`.
    fn seq_to(pings: &[(usize, u64)], broker: usize) -> u64 {
        pings
            .iter()
            .find(|(b, _)| *b == broker)
            .map(|(_, s)| *s)
            .unwrap_or_else(|| panic!("no ping to broker {broker} in {pings:?}"))
    }

    #[test]
    fn a_pong_for_a_ping_sent_before_leaving_does_not_bring_the_broker_back() {
        let t0 = Instant::now();
        let mut f = Failover::new(2, t0);
        let first = pings_at(&mut f, t0);
        f.handle_pong_of(0, seq_to(&first, 0), t0);
        f.handle_pong_of(1, seq_to(&first, 1), t0);
        assert_eq!(f.active(), Some(0));
        // The next ping to broker 0 goes out; the broker answers it, then
        // starts its drain and says so, and the "leaving" overtakes the
        // pong (or both arrive in one receive, the "leaving" applied
        // first).
        let t1 = t0 + PING_INTERVAL;
        let before = pings_at(&mut f, t1);
        let late = seq_to(&before, 0);
        f.handle_leaving(0, t1);
        assert_eq!(f.target(), 1);
        while f.poll_event().is_some() {}
        let t2 = t1 + Duration::from_millis(5);
        f.handle_pong_of(0, late, t2);
        f.handle_pong_of(0, seq_to(&first, 0), t2);
        assert!(
            !f.is_up(0),
            "a pong sent before the \"leaving\" is not a broker back"
        );
        assert_eq!(f.target(), 1);
        // A pong naming a ping never sent is no answer either.
        f.handle_pong_of(0, late + 1000, t2);
        assert!(!f.is_up(0));
        assert_eq!(f.poll_event(), None);
        // Nor does it count once more pings went out unanswered: only the
        // answer to one of them does.
        let t3 = t1 + PING_INTERVAL;
        let after = pings_at(&mut f, t3);
        f.handle_pong_of(0, late, t3);
        assert!(!f.is_up(0));
        // The broker answers a ping sent after its "leaving" with a pong:
        // it runs again (a new process, or its next etcd lease).
        f.handle_pong_of(0, seq_to(&after, 0), t3);
        assert!(f.is_up(0));
        assert_eq!(f.poll_event(), Some(FailoverEvent::Up { broker: 0 }));
        assert_eq!(f.target(), 1, "the traffic stays where it went");
    }

    #[test]
    fn a_fenced_broker_that_pongs_again_under_its_next_lease_is_up_again() {
        // Fenced: it says "leaving" once, then answers every ping with
        // "leaving" for a while; a pong of the previous lease arrives
        // late; with its next lease it pongs the next ping.
        let t0 = Instant::now();
        let mut f = Failover::new(2, t0);
        for (b, seq) in pings_at(&mut f, t0) {
            f.handle_pong_of(b, seq, t0);
        }
        let mut now = t0 + PING_INTERVAL;
        let stale = seq_to(&pings_at(&mut f, now), 0);
        f.handle_leaving(0, now);
        for _ in 0..8 {
            now += PING_INTERVAL;
            for (b, seq) in pings_at(&mut f, now) {
                if b == 0 {
                    f.handle_leaving(0, now);
                    f.handle_pong_of(0, stale, now);
                } else {
                    f.handle_pong_of(b, seq, now);
                }
            }
            assert!(!f.is_up(0), "fenced: down");
        }
        assert_eq!(f.target(), 1);
        now += PING_INTERVAL;
        let seq = seq_to(&pings_at(&mut f, now), 0);
        f.handle_pong_of(0, seq, now);
        assert!(f.is_up(0), "its next lease: up again");
    }

    #[test]
    fn a_lone_broker_that_leaves_keeps_the_traffic() {
        let mut sim = Sim::new(1);
        sim.run(Duration::from_secs(1));
        sim.draining[0] = true;
        sim.f.handle_leaving(0, sim.now);
        sim.drain();
        assert_eq!(sim.f.target(), 0, "nowhere else to go");
        assert_eq!(sim.f.failovers(), 0);
        assert_eq!(sim.last(), Some(FailoverEvent::NoneAnswering { broker: 0 }));
    }

    #[test]
    fn with_every_broker_leaving_a_dead_active_one_is_still_left() {
        // Every broker says it is leaving (fenced: etcd away for all) and
        // still relays; then the active one dies. The traffic goes to one
        // that still answers, not nowhere.
        let mut sim = Sim::new(3);
        sim.run(Duration::from_secs(1));
        assert_eq!(sim.f.active(), Some(0));
        sim.draining = vec![true; 3];
        for b in 0..3 {
            sim.f.handle_leaving(b, sim.now);
        }
        sim.run(Duration::from_secs(2));
        // Each left in turn while another was up; the last to leave keeps
        // the traffic, none being up.
        assert_eq!(sim.f.target(), 2, "no broker up: the traffic stays");
        let before = sim.f.failovers();
        sim.run(Duration::from_secs(2));
        assert_eq!((sim.f.target(), sim.f.failovers()), (2, before));
        sim.alive[2] = false;
        sim.run(Duration::from_secs(2));
        assert_eq!(sim.f.target(), 0, "moved off the dead broker");
        assert_eq!(sim.f.failovers(), before + 1);
        assert!(
            sim.events
                .iter()
                .any(|(_, e)| *e == FailoverEvent::Switched { from: 2, to: 0 })
        );
        // And it stays there while broker 0 answers.
        sim.run(Duration::from_secs(3));
        assert_eq!(sim.f.target(), 0);
        assert_eq!(sim.f.failovers(), before + 1);
    }

    #[test]
    fn learned_brokers_are_followed_and_forgotten_ones_left() {
        let mut s = Sim::new(1);
        s.run(Duration::from_millis(10));
        assert_eq!(s.f.active(), Some(0));
        // A second broker is learned: pinged from now on, up at once.
        s.alive.push(true);
        s.draining.push(false);
        s.f.follow(1, s.now);
        assert_eq!(s.f.brokers(), 2);
        s.run(Duration::from_millis(10));
        assert!(s.f.is_up(1));
        // The first dies: the traffic moves to the learned one.
        s.alive[0] = false;
        s.run(Duration::from_secs(2));
        assert_eq!(s.f.active(), Some(1));
        // The learned one is forgotten while active: the traffic goes back
        // to the first followed broker, which is down, until one answers.
        s.f.unfollow(1);
        assert!(!s.f.is_followed(1));
        assert_eq!(s.f.active(), None);
        assert_eq!(s.f.target(), 0);
        s.alive[0] = true;
        s.run(Duration::from_secs(2));
        assert_eq!(s.f.active(), Some(0));
        assert!(!s.f.is_up(1), "a forgotten broker is not pinged");
        // The last followed broker stays followed.
        s.f.unfollow(0);
        assert!(s.f.is_followed(0));
        // A forgotten slot is reused afresh.
        s.f.follow(1, s.now);
        assert!(s.f.is_followed(1));
        s.run(Duration::from_millis(10));
        assert!(s.f.is_up(1));
        // Forgetting an active broker while another is up switches to it.
        s.alive[0] = false;
        s.run(Duration::from_secs(2));
        assert_eq!(s.f.active(), Some(1));
        s.alive[0] = true;
        s.run(Duration::from_secs(2));
        s.f.unfollow(1);
        assert_eq!(s.f.active(), Some(0));
        assert_eq!(
            s.f.poll_event(),
            Some(FailoverEvent::Switched { from: 1, to: 0 })
        );
        // Slots beyond the next one are ignored.
        s.f.follow(7, s.now);
        assert_eq!(s.f.brokers(), 2);
    }
}
