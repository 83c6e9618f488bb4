//! The agent core on a fake clock.

use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::*;
use crate::connect_ip::{AddressAssign, AddressRequest, AssignedAddress, RequestedAddress};

const MAX: Duration = Duration::from_secs(30);
/// The schedule pinned here as values, so a changed constant fails a test.
const TEN_MINUTES: Duration = Duration::from_secs(600);
const PROBE_EVERY: Duration = Duration::from_secs(30);
const MTU_EVERY: Duration = Duration::from_secs(2);

fn config(proxy: bool, remembered: Option<Transport>, seed: u64) -> AgentConfig {
    AgentConfig {
        proxy,
        remembered,
        backoff_base: Duration::from_millis(500),
        backoff_max: MAX,
        seed,
        lans: Vec::new(),
    }
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A certificate of `life` seconds, issued `age` seconds ago.
fn lifetime(life: u64, age: u64) -> Lifetime {
    Lifetime {
        issued_at: 1_000_000,
        not_after: 1_000_000 + life,
        unix_now: 1_000_000 + age,
    }
}

/// A core on a fake clock, with what it said so far.
struct Agent {
    core: AgentCore,
    now: Instant,
}

impl Agent {
    fn new(config: AgentConfig) -> Self {
        let now = Instant::now();
        Self {
            core: AgentCore::new(config, now),
            now,
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    fn actions(&mut self) -> Vec<Action> {
        std::iter::from_fn(|| self.core.poll_action()).collect()
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.core.poll_event()).collect()
    }

    /// Fires the timer if it is due by now.
    fn tick(&mut self) {
        if self.core.poll_timeout().is_some_and(|t| t <= self.now) {
            self.core.handle_timeout(self.now);
        }
    }

    /// Moves the clock on in steps of at most `step`, firing the timer
    /// whenever it is due; returns the actions in order.
    fn run_for(&mut self, total: Duration, step: Duration) -> Vec<Action> {
        let end = self.now + total;
        let mut actions = Vec::new();
        while self.now < end {
            let mut next = (self.now + step).min(end);
            if let Some(t) = self.core.poll_timeout()
                && t > self.now
                && t < next
            {
                next = t;
            }
            self.now = next;
            self.tick();
            actions.extend(self.actions());
        }
        actions
    }

    /// Connects on `transport` and opens the tunnel.
    fn connect(&mut self, transport: Transport, life: Option<Lifetime>) {
        self.core.handle_connected(transport, self.now);
        assert_eq!(
            self.actions(),
            [Action::SaveTransport(transport), Action::OpenTunnel]
        );
        self.core.handle_tunnel_opened(life, self.now);
        assert!(self.events().contains(&Event::Connected(transport)));
        // Without LANs it says it routes none. A standby is dialed once per
        // missing standby; left unanswered here (the tests of the standby
        // answer it).
        let none = Action::SendCapsule(Capsule::RouteAdvertisement(
            RouteAdvertisement::from_prefixes(std::iter::empty()),
        ));
        let actions = self.actions();
        assert!(
            actions == [Action::CheckMtu, none.clone()]
                || actions == [Action::CheckMtu, none, Action::DialStandby { transport }],
            "{actions:?}"
        );
    }

    /// The delay of the `Retrying` event just reported.
    fn retry_delay(&mut self) -> Duration {
        let delays: Vec<Duration> = self
            .events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Retrying(d) => Some(d),
                _ => None,
            })
            .collect();
        assert_eq!(delays.len(), 1, "one Retrying event");
        delays[0]
    }

    /// Waits out the backoff; the core dials exactly when it ends.
    fn wait_and_dial(&mut self, delay: Duration) -> Vec<Transport> {
        self.advance(delay - Duration::from_millis(1));
        self.tick();
        assert_eq!(self.actions(), [], "dialled before the backoff ended");
        self.advance(Duration::from_millis(1));
        self.tick();
        match self.actions().as_slice() {
            [Action::Dial { order }] => order.clone(),
            other => panic!("expected a dial, got {other:?}"),
        }
    }
}

fn assign(prefixes: &[&str]) -> Capsule {
    Capsule::AddressAssign(AddressAssign {
        addresses: prefixes
            .iter()
            .map(|p| AssignedAddress {
                request_id: 0,
                prefix: net(p),
            })
            .collect(),
    })
}

/// At start: dial, then prepare the device while the dial runs (the
/// device is there when the broker's addresses arrive).
#[test]
fn dials_at_once_in_ladder_order_and_prepares_the_device() {
    let mut a = Agent::new(config(true, Some(Transport::H2), 1));
    assert_eq!(
        a.actions(),
        [
            Action::Dial {
                order: vec![Transport::H2, Transport::H3, Transport::H2Proxy]
            },
            Action::PrepareTun { mtu: INITIAL_MTU }
        ]
    );
    assert_eq!(a.core.poll_timeout(), None);
}

/// The device is prepared once, at start: not again at a later dial (it
/// stays in place between sessions), nor at a re-attestation's.
#[test]
fn the_device_is_prepared_once() {
    let mut a = Agent::new(config(false, None, 1));
    a.actions();
    a.connect(Transport::H3, None);
    a.core
        .handle_session_ended(Ending::Lost("connection lost".into()), a.now);
    assert_eq!(a.actions(), [Action::EndSession { close: false }]);
    let delay = a.retry_delay();
    // Exactly a dial when the backoff ends.
    a.wait_and_dial(delay);
    a.core
        .handle_dial_failed(Ending::CertificateRefused("expired".into()), a.now);
    a.core.handle_reattest_result(Ok(()), a.now);
    let after = a.actions();
    assert!(
        after.iter().any(|x| matches!(x, Action::Dial { .. })),
        "{after:?}"
    );
    assert!(
        !after.iter().any(|x| matches!(x, Action::PrepareTun { .. })),
        "{after:?}"
    );
}

#[test]
fn renewal_fires_at_half_life_and_retries_after_a_failure() {
    let mut a = Agent::new(config(false, None, 1));
    a.actions();
    // A two-hour certificate issued ten minutes ago: renew in 50 minutes.
    a.connect(Transport::H3, Some(lifetime(7200, 600)));
    let renew_at = a.now + secs(3000);
    let actions = a.run_for(secs(2999), secs(1));
    assert!(!actions.contains(&Action::Renew), "renewed too early");
    assert!(actions.contains(&Action::CheckMtu), "the MTU is checked");
    let actions = a.run_for(secs(1), secs(1));
    assert_eq!(a.now, renew_at);
    assert_eq!(
        actions.iter().filter(|a| **a == Action::Renew).count(),
        1,
        "{actions:?}"
    );
    // No second renewal while one is in flight.
    let actions = a.run_for(secs(700), secs(1));
    assert!(!actions.contains(&Action::Renew));
    // A failure: again ten minutes later.
    a.core
        .handle_renewal_result(Err(Ending::Lost("HTTP 503".into())), a.now);
    assert_eq!(
        a.events(),
        [Event::RenewalFailed {
            error: "HTTP 503".into(),
            retry_in: TEN_MINUTES
        }]
    );
    let actions = a.run_for(TEN_MINUTES - secs(1), secs(1));
    assert!(!actions.contains(&Action::Renew));
    let actions = a.run_for(secs(1), secs(1));
    assert!(actions.contains(&Action::Renew));
    // Success: a second connection with the new certificate, and the
    // tunnel moves to it before the old one is left (make before break).
    a.core.handle_renewal_result(Ok(()), a.now);
    assert_eq!(a.events(), [Event::Renewed]);
    assert_eq!(
        a.actions(),
        [Action::Redial {
            transport: Transport::H3
        }]
    );
    // A second answer, and the timer meanwhile, change nothing: no
    // standby (it would carry the old certificate), no renewal.
    a.core.handle_renewal_result(Ok(()), a.now);
    let actions = a.run_for(secs(60), secs(1));
    assert!(
        actions
            .iter()
            .all(|x| !matches!(x, Action::Renew | Action::DialStandby { .. })),
        "{actions:?}"
    );
    a.events();
    assert!(a.core.handle_redial_result(true, a.now));
    assert_eq!(a.actions(), [Action::Handover]);
    assert!(a.core.transport().is_some(), "the old session still runs");
    a.core
        .handle_handover_result(Ok(()), Some(lifetime(7200, 0)), a.now);
    let events = a.events();
    assert!(
        events.contains(&Event::MovedToRenewed(Transport::H3)),
        "{events:?}"
    );
    assert!(events.contains(&Event::Connected(Transport::H3)));
    assert_eq!(a.core.handovers(), 0, "not a move between brokers");
    let actions = a.actions();
    assert!(
        !actions.contains(&Action::EndSession { close: false }),
        "{actions:?}"
    );
    // The new certificate renews at its own half-life.
    let actions = a.run_for(secs(3599), secs(1));
    assert!(!actions.contains(&Action::Renew));
    assert!(a.run_for(secs(1), secs(1)).contains(&Action::Renew));
}

#[test]
fn a_renewed_site_without_a_second_connection_reconnects_the_plain_way() {
    for handover_fails in [false, true] {
        let mut a = Agent::new(config(false, None, 1));
        a.actions();
        a.connect(Transport::H3, Some(lifetime(7200, 3600)));
        a.tick();
        assert!(a.actions().contains(&Action::Renew));
        a.core.handle_renewal_result(Ok(()), a.now);
        a.actions();
        if handover_fails {
            assert!(a.core.handle_redial_result(true, a.now));
            assert_eq!(a.actions(), [Action::Handover]);
            a.core
                .handle_handover_result(Err(Ending::Refused("HTTP 503".into())), None, a.now);
        } else {
            assert!(!a.core.handle_redial_result(false, a.now));
        }
        assert_eq!(
            a.actions(),
            [
                Action::EndSession { close: false },
                Action::Dial {
                    order: vec![Transport::H3, Transport::H2]
                }
            ]
        );
        // A late answer to the ended session changes nothing.
        assert!(!a.core.handle_redial_result(true, a.now));
        a.core.handle_renewal_result(Ok(()), a.now);
        assert_eq!(a.actions(), vec![]);
    }
}

#[test]
fn a_renewal_refused_for_an_expired_certificate_falls_back_to_reattestation() {
    let mut a = Agent::new(config(false, None, 1));
    a.actions();
    a.connect(Transport::H3, Some(lifetime(7200, 3600)));
    a.tick();
    assert!(a.actions().contains(&Action::Renew));
    let why = "the certificate on this connection expired 3 s ago";
    a.core
        .handle_renewal_result(Err(Ending::CertificateRefused(why.into())), a.now);
    assert_eq!(
        a.events(),
        [
            Event::SessionEnded(Ending::CertificateRefused(why.into())),
            Event::Reattesting
        ]
    );
    assert_eq!(
        a.actions(),
        [Action::EndSession { close: false }, Action::Reattest]
    );
    assert!(a.core.transport().is_none(), "the session ended");
}

#[test]
fn renewal_of_an_expired_half_life_is_immediate_and_unknown_is_an_hour() {
    let mut a = Agent::new(config(false, None, 1));
    a.actions();
    a.connect(Transport::H3, Some(lifetime(7200, 5000)));
    a.tick();
    assert!(a.actions().contains(&Action::Renew));

    let mut b = Agent::new(config(false, None, 1));
    b.actions();
    b.connect(Transport::H3, None);
    assert!(!b.run_for(secs(3599), secs(5)).contains(&Action::Renew));
    assert!(b.run_for(secs(1), secs(1)).contains(&Action::Renew));
}

/// Fails `n` dials in a row; returns the delays.
fn failed_dials(a: &mut Agent, n: usize) -> Vec<Duration> {
    let mut delays = Vec::new();
    for _ in 0..n {
        a.core
            .handle_dial_failed(Ending::Lost("no answer".into()), a.now);
        let d = a.retry_delay();
        a.wait_and_dial(d);
        delays.push(d);
    }
    delays
}

#[test]
fn backoff_grows_is_jittered_from_the_seed_and_resets_after_a_lasting_session() {
    let mut a = Agent::new(config(false, None, 7));
    a.actions();
    let delays = failed_dials(&mut a, 8);
    for (n, d) in delays.iter().enumerate() {
        let ceiling = (Duration::from_millis(500) * 2u32.pow(n as u32)).min(MAX);
        assert!(
            *d >= ceiling / 2 && *d <= ceiling,
            "attempt {n}: {d:?} outside [{:?}, {ceiling:?}]",
            ceiling / 2
        );
    }
    assert!(delays[4] > delays[1]);
    // The same seed gives the same delays; another seed others.
    let mut same = Agent::new(config(false, None, 7));
    same.actions();
    assert_eq!(failed_dials(&mut same, 8), delays);
    let mut other = Agent::new(config(false, None, 8));
    other.actions();
    assert_ne!(failed_dials(&mut other, 8), delays);

    // A session of 29 s refused at its end does not reset the backoff:
    // the next delay is the ninth's, at the cap.
    a.connect(Transport::H3, None);
    a.run_for(secs(29), secs(1));
    a.core
        .handle_session_ended(Ending::Refused("revoked".into()), a.now);
    assert_eq!(a.actions(), [Action::EndSession { close: false }]);
    let d = a.retry_delay();
    assert!(d >= MAX / 2, "{d:?}");
    a.wait_and_dial(d);
    // One of 31 s does: back to the first step.
    a.connect(Transport::H3, None);
    a.run_for(secs(31), secs(1));
    a.core
        .handle_session_ended(Ending::Refused("revoked".into()), a.now);
    let d = a.retry_delay();
    assert!(d <= Duration::from_millis(500), "{d:?}");
}

#[test]
fn a_broker_that_restarts_again_and_again_is_redialled_within_the_first_step() {
    let mut a = Agent::new(config(false, None, 11));
    a.actions();
    // Failed dials while the broker is down grow the backoff ...
    let delays = failed_dials(&mut a, 5);
    assert!(delays[4] > Duration::from_secs(4), "{delays:?}");
    // ... and every time the broker comes back and dies again after 2 s
    // (a stateless reset from its next life), the site dials again within
    // the first step, not later and later.
    for round in 0..10 {
        a.connect(Transport::H3, None);
        a.run_for(secs(2), secs(1));
        a.core
            .handle_session_ended(Ending::Lost("stateless reset".into()), a.now);
        let d = a.retry_delay();
        a.actions();
        assert!(d <= Duration::from_millis(500), "round {round}: {d:?}");
        a.wait_and_dial(d);
    }
    // A tunnel lost within a second of opening (another agent with the
    // same identity replacing it) keeps backing off.
    let mut last = Duration::ZERO;
    for _ in 0..4 {
        a.connect(Transport::H3, None);
        a.advance(Duration::from_millis(300));
        a.core
            .handle_session_ended(Ending::Lost("replaced by a newer connection".into()), a.now);
        last = a.retry_delay();
        a.actions();
        a.wait_and_dial(last);
    }
    assert!(last > Duration::from_secs(2), "{last:?}");
}

#[test]
fn the_ladder_falls_back_and_probes_http3_until_it_answers() {
    let mut a = Agent::new(config(true, Some(Transport::H3), 3));
    assert_eq!(
        a.actions(),
        [
            Action::Dial {
                order: vec![Transport::H3, Transport::H2, Transport::H2Proxy]
            },
            Action::PrepareTun { mtu: INITIAL_MTU }
        ]
    );
    // HTTP/3 is blocked: the shell got through on HTTP/2.
    a.core.handle_connected(Transport::H2, a.now);
    assert_eq!(
        a.events(),
        [Event::Moved {
            transport: Transport::H2,
            moved: Move::Fallback
        }]
    );
    a.actions();
    a.core
        .handle_session_ended(Ending::Lost("reset".into()), a.now);
    let d = a.retry_delay();
    a.actions();
    // The next attempt starts on HTTP/2; only the proxy answers.
    assert_eq!(
        a.wait_and_dial(d),
        [Transport::H2, Transport::H3, Transport::H2Proxy]
    );
    a.core.handle_connected(Transport::H2Proxy, a.now);
    assert_eq!(
        a.events(),
        [Event::Moved {
            transport: Transport::H2Proxy,
            moved: Move::Fallback
        }]
    );
    assert_eq!(
        a.actions(),
        [
            Action::SaveTransport(Transport::H2Proxy),
            Action::OpenTunnel
        ]
    );
    a.core.handle_tunnel_opened(None, a.now);
    a.events();
    a.actions();
    // HTTP/3 is probed every PROBE_EVERY, not before.
    let probes = |actions: &[Action]| {
        actions
            .iter()
            .filter(|a| **a == Action::Probe(Transport::H3))
            .count()
    };
    assert_eq!(probes(&a.run_for(PROBE_EVERY - secs(1), secs(1))), 0);
    assert_eq!(probes(&a.run_for(secs(1), secs(1))), 1);
    // While a probe is out, no other starts.
    assert_eq!(probes(&a.run_for(PROBE_EVERY, secs(1))), 0);
    a.core.handle_probe_result(false, a.now);
    assert_eq!((a.events(), a.actions()), (vec![], vec![]));
    assert_eq!(probes(&a.run_for(PROBE_EVERY, secs(1))), 1);
    // It answers: the tunnel moves up at once.
    a.core.handle_probe_result(true, a.now);
    assert_eq!(a.events(), [Event::Upgrading(Transport::H3)]);
    assert_eq!(
        a.actions(),
        [Action::EndSession { close: false }, Action::UseProbe]
    );
    assert_eq!(a.core.poll_timeout(), None);
    a.core.handle_connected(Transport::H3, a.now);
    assert_eq!(
        a.events(),
        [Event::Moved {
            transport: Transport::H3,
            moved: Move::Upgrade
        }]
    );
    assert_eq!(
        a.actions(),
        [Action::SaveTransport(Transport::H3), Action::OpenTunnel]
    );
    a.core.handle_tunnel_opened(None, a.now);
    a.events();
    a.actions();
    // On the top rung nothing is probed.
    assert_eq!(probes(&a.run_for(PROBE_EVERY * 4, secs(1))), 0);
    assert_eq!(a.core.ladder().last(), Some(Transport::H3));
}

#[test]
fn the_tunnel_mtu_follows_the_link_with_floors() {
    let mut a = Agent::new(config(false, None, 1));
    a.actions();
    a.connect(Transport::H3, None);
    // No device yet: nothing to set, but the limit is remembered for the
    // device's creation.
    a.core.handle_path_mtu(Some(1400), None, a.now);
    assert_eq!(a.actions(), []);
    a.core.handle_capsule(assign(&["100.64.0.7/32"]), a.now);
    assert_eq!(
        a.actions(),
        [Action::ConfigureTun(TunConfig::Addresses {
            addresses: vec![net("100.64.0.7/32")],
            create_mtu: 1400
        })]
    );
    // IPv4 only: down to 576, not below.
    a.core.handle_path_mtu(Some(1200), Some(1400), a.now);
    assert_eq!(a.actions(), [Action::SetTunMtu(1200)]);
    a.core.handle_path_mtu(Some(500), Some(1200), a.now);
    assert_eq!(a.actions(), [Action::SetTunMtu(576)]);
    a.core.handle_path_mtu(Some(500), Some(576), a.now);
    assert_eq!(a.actions(), []);
    a.core.handle_path_mtu(None, Some(576), a.now);
    assert_eq!(a.actions(), []);
    // With an IPv6 address: not below 1280.
    a.core
        .handle_capsule(assign(&["100.64.0.7/32", "fd00::7/128"]), a.now);
    a.actions();
    a.core.handle_path_mtu(Some(1000), Some(576), a.now);
    assert_eq!(a.actions(), [Action::SetTunMtu(1280)]);
    a.core.handle_path_mtu(Some(1452), Some(1280), a.now);
    assert_eq!(a.actions(), [Action::SetTunMtu(1452)]);
    // Checked every MTU_EVERY while the session lasts.
    let checks = a
        .run_for(MTU_EVERY * 5, Duration::from_millis(100))
        .iter()
        .filter(|x| **x == Action::CheckMtu)
        .count();
    assert_eq!(checks, 5);
}

#[test]
fn a_new_device_is_never_below_1280() {
    for (link, want) in [(None, 1280), (Some(1000), 1280), (Some(1350), 1350)] {
        let mut a = Agent::new(config(false, None, 1));
        a.actions();
        a.connect(Transport::H3, None);
        a.core.handle_path_mtu(link, None, a.now);
        a.core.handle_capsule(assign(&["100.64.0.7/32"]), a.now);
        assert_eq!(
            a.actions(),
            [Action::ConfigureTun(TunConfig::Addresses {
                addresses: vec![net("100.64.0.7/32")],
                create_mtu: want
            })]
        );
    }
}

#[test]
fn refusal_and_loss_are_reported_apart_and_both_back_off() {
    for ending in [
        Ending::Lost("timed out".into()),
        Ending::Refused("certificate revoked".into()),
    ] {
        // Before a connection.
        let mut a = Agent::new(config(false, None, 1));
        a.actions();
        a.core.handle_dial_failed(ending.clone(), a.now);
        let events = a.events();
        assert_eq!(events[0], Event::DialFailed(ending.clone()));
        let Some(Event::Retrying(d)) = events.get(1).cloned() else {
            panic!("{events:?}")
        };
        assert_eq!(a.actions(), []);
        a.wait_and_dial(d);
        // The tunnel refused or lost after connecting.
        a.core.handle_connected(Transport::H3, a.now);
        a.actions();
        a.core.handle_session_ended(ending.clone(), a.now);
        assert_eq!(a.events()[0], Event::SessionEnded(ending.clone()));
        assert_eq!(a.actions(), [Action::EndSession { close: false }]);
        assert!(a.core.poll_timeout().is_some_and(|t| t > a.now));
        // Nothing from the ended session counts any more.
        a.core.handle_tunnel_data(&[0x00], a.now);
        a.core
            .handle_session_ended(Ending::Lost("again".into()), a.now);
        assert_eq!((a.events(), a.actions()), (vec![], vec![]));
    }
}

#[test]
fn a_broken_capsule_stream_ends_the_session() {
    let mut a = Agent::new(config(false, None, 1));
    a.actions();
    a.connect(Transport::H3, None);
    // A whole capsule, then a DATAGRAM capsule that carries an IP packet,
    // then a capsule too long to be true.
    let mut bytes = Vec::new();
    assign(&["100.64.0.7/32"]).encode(&mut bytes).unwrap();
    a.core.handle_tunnel_data(&bytes, a.now);
    assert!(matches!(
        a.actions().as_slice(),
        [Action::ConfigureTun(TunConfig::Addresses { .. })]
    ));
    let packet = vec![0x45, 0, 0, 20];
    let mut payload = Vec::new();
    datagram::encode_ip_packet(&packet, &mut payload);
    let mut bytes = Vec::new();
    Capsule::Datagram(payload).encode(&mut bytes).unwrap();
    a.core.handle_tunnel_data(&bytes, a.now);
    assert_eq!(a.actions(), [Action::Deliver(packet)]);
    // Type 0x01, length 2^62 - 1.
    a.core.handle_tunnel_data(
        &[0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        a.now,
    );
    match a.events().as_slice() {
        [Event::SessionEnded(Ending::Lost(why)), Event::Retrying(_)] => {
            assert!(why.starts_with("protocol error from the broker"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(a.actions(), [Action::EndSession { close: false }]);
}

#[test]
fn shutdown_closes_the_session_and_stops() {
    // In a session: close it so the broker hears of it, then stop.
    let mut a = Agent::new(config(true, None, 1));
    a.actions();
    a.connect(Transport::H2, None);
    a.core.handle_shutdown(a.now);
    assert_eq!(
        a.actions(),
        [Action::EndSession { close: true }, Action::Stop]
    );
    assert!(a.core.is_stopped());
    assert_eq!(a.core.poll_timeout(), None);
    // Nothing wakes it again.
    a.advance(secs(3600));
    a.core.handle_timeout(a.now);
    a.core.handle_probe_result(true, a.now);
    a.core.handle_shutdown(a.now);
    assert_eq!((a.events(), a.actions()), (vec![], vec![]));

    // While backing off: just stop.
    let mut b = Agent::new(config(false, None, 1));
    b.actions();
    b.core
        .handle_dial_failed(Ending::Lost("no answer".into()), b.now);
    b.events();
    b.core.handle_shutdown(b.now);
    assert_eq!(b.actions(), [Action::Stop]);
    b.advance(secs(60));
    b.core.handle_timeout(b.now);
    assert_eq!(b.actions(), []);
}

fn lan_config(lans: &[&str]) -> AgentConfig {
    AgentConfig {
        lans: lans.iter().map(|l| net(l)).collect(),
        ..config(false, None, 1)
    }
}

/// An ADDRESS_ASSIGN of `(request_id, prefix)` pairs.
/// The broker's answer to the site's address and two LAN requests: the
/// site's address (ID 0), 192.168.1.0/24 as 100.64.9.0/24 (ID 1) and
/// 10.1.0.0/16 as 100.65.0.0/16 (ID 2).
fn both_lans_assigned() -> Capsule {
    assign_ids(&[
        (0, "100.64.0.7/32"),
        (1, "100.64.9.0/24"),
        (2, "100.65.0.0/16"),
    ])
}

fn assign_ids(entries: &[(u64, &str)]) -> Capsule {
    Capsule::AddressAssign(AddressAssign {
        addresses: entries
            .iter()
            .map(|&(request_id, p)| AssignedAddress {
                request_id,
                prefix: net(p),
            })
            .collect(),
    })
}

impl Agent {
    /// An agent with two LANs in its configuration, connected, its tunnel
    /// open and both LANs mapped (192.168.1.0/24 to 100.64.9.0/24,
    /// 10.1.0.0/16 to 100.65.0.0/16).
    fn with_two_lans_mapped() -> Agent {
        let mut a = Agent::new(lan_config(&["192.168.1.0/24", "10.1.0.0/16"]));
        a.actions();
        a.open_with_lans();
        a.core.handle_capsule(both_lans_assigned(), a.now);
        a.actions();
        a
    }

    /// Connects on HTTP/3 and opens the tunnel; returns the actions that
    /// followed the opening.
    fn open_with_lans(&mut self) -> Vec<Action> {
        self.core.handle_connected(Transport::H3, self.now);
        self.actions();
        self.core.handle_tunnel_opened(None, self.now);
        self.events();
        // The standby dial (on the first session only) is not what these
        // tests look at.
        self.actions()
            .into_iter()
            .filter(|a| !matches!(a, Action::DialStandby { .. }))
            .collect()
    }
}

fn lan_request(lans: &[(u64, &str)]) -> Action {
    Action::SendCapsule(Capsule::AddressRequest(AddressRequest {
        requests: lans
            .iter()
            .map(|&(request_id, p)| RequestedAddress {
                request_id,
                prefix: net(p),
            })
            .collect(),
    }))
}

fn advertisement(prefixes: &[&str]) -> Action {
    Action::SendCapsule(Capsule::RouteAdvertisement(
        RouteAdvertisement::from_prefixes(prefixes.iter().map(|p| net(p))),
    ))
}

#[test]
fn each_lan_is_requested_mapped_and_advertised_the_same_way_every_session() {
    let mut a = Agent::new(lan_config(&["192.168.1.0/24", "10.1.0.0/16"]));
    a.actions();
    // Without LANs configured nothing is requested (the other tests'
    // `connect` pins that); with them, one request naming each LAN.
    let request = lan_request(&[(1, "192.168.1.0/24"), (2, "10.1.0.0/16")]);
    assert_eq!(a.open_with_lans(), [Action::CheckMtu, request.clone()]);

    // The broker answers the first LAN before the second: the map and the
    // advertisement follow what is known.
    a.core.handle_capsule(
        assign_ids(&[(0, "100.64.0.7/32"), (1, "100.64.9.0/24")]),
        a.now,
    );
    let first = Mapping::new(net("192.168.1.0/24"), net("100.64.9.0/24")).unwrap();
    let actions = a.actions();
    assert_eq!(actions[1], advertisement(&["100.64.9.0/24"]));
    assert_eq!(
        actions[2],
        Action::SetLanMap(LanMap::new(vec![first]).unwrap())
    );
    assert_eq!(a.events(), [Event::LanMapped(vec![first])]);

    a.core.handle_capsule(both_lans_assigned(), a.now);
    let second = Mapping::new(net("10.1.0.0/16"), net("100.65.0.0/16")).unwrap();
    let both = LanMap::new(vec![first, second]).unwrap();
    let actions = a.actions();
    assert!(
        actions.contains(&advertisement(&["100.64.9.0/24", "100.65.0.0/16"])),
        "{actions:?}"
    );
    assert!(actions.contains(&Action::SetLanMap(both.clone())));
    // The same answer again changes nothing.
    a.core.handle_capsule(both_lans_assigned(), a.now);
    assert_eq!(a.actions(), []);
    assert_eq!(a.core.lan_map(), &both);

    // The connection is lost: the map stays in force meanwhile, and the new
    // session asks exactly as before.
    a.core
        .handle_session_ended(Ending::Lost("reset".into()), a.now);
    a.actions();
    let delay = a.retry_delay();
    a.wait_and_dial(delay);
    assert_eq!(a.core.lan_map(), &both);
    assert_eq!(a.open_with_lans(), [Action::CheckMtu, request]);
    // The broker opens with the leases it remembers (unsolicited), which
    // do not say which LAN they belong to: nothing is advertised yet.
    a.core.handle_capsule(
        assign_ids(&[
            (0, "100.64.0.7/32"),
            (0, "100.64.9.0/24"),
            (0, "100.65.0.0/16"),
        ]),
        a.now,
    );
    assert!(
        !a.actions()
            .iter()
            .any(|x| matches!(x, Action::SendCapsule(_) | Action::SetLanMap(_)))
    );
    // Its answer to the request: the same prefixes are advertised on the
    // new session; the shell's map is unchanged, so not sent again.
    a.core.handle_capsule(both_lans_assigned(), a.now);
    let actions = a.actions();
    assert!(
        actions.contains(&advertisement(&["100.64.9.0/24", "100.65.0.0/16"])),
        "{actions:?}"
    );
    assert!(!actions.iter().any(|x| matches!(x, Action::SetLanMap(_))));
    assert_eq!(a.events(), []);
}

#[test]
fn a_lan_added_by_a_reload_is_asked_for_on_the_open_session() {
    let mut a = Agent::new(lan_config(&["192.168.1.0/24"]));
    a.actions();
    a.open_with_lans();
    a.core.handle_capsule(
        assign_ids(&[(0, "100.64.0.7/32"), (1, "100.64.9.0/24")]),
        a.now,
    );
    a.actions();
    a.events();

    a.core
        .handle_lans_changed(vec![net("192.168.1.0/24"), net("10.1.0.0/16")], a.now);
    assert_eq!(
        a.events(),
        [Event::LansChanged {
            added: vec![net("10.1.0.0/16")],
            removed: vec![],
        }]
    );
    // Only the new LAN is asked for, under an id of its own; the session
    // goes on (no dial, no new tunnel).
    assert_eq!(a.actions(), [lan_request(&[(2, "10.1.0.0/16")])]);
    a.core.handle_capsule(both_lans_assigned(), a.now);
    let first = Mapping::new(net("192.168.1.0/24"), net("100.64.9.0/24")).unwrap();
    let second = Mapping::new(net("10.1.0.0/16"), net("100.65.0.0/16")).unwrap();
    let actions = a.actions();
    assert!(
        actions.contains(&advertisement(&["100.64.9.0/24", "100.65.0.0/16"])),
        "{actions:?}"
    );
    assert!(actions.contains(&Action::SetLanMap(
        LanMap::new(vec![first, second]).unwrap()
    )));
    assert!(
        !actions
            .iter()
            .any(|x| matches!(x, Action::Dial { .. } | Action::OpenTunnel)),
        "{actions:?}"
    );
    assert_eq!(a.events(), [Event::LanMapped(vec![first, second])]);
    // The same list again changes nothing.
    a.core
        .handle_lans_changed(vec![net("192.168.1.0/24"), net("10.1.0.0/16")], a.now);
    assert_eq!(a.actions(), []);
    assert_eq!(a.events(), []);
}

#[test]
fn a_lan_removed_by_a_reload_is_withdrawn_and_a_readded_one_gets_a_new_id() {
    let mut a = Agent::with_two_lans_mapped();
    a.events();
    let first = Mapping::new(net("192.168.1.0/24"), net("100.64.9.0/24")).unwrap();
    let second = Mapping::new(net("10.1.0.0/16"), net("100.65.0.0/16")).unwrap();

    // The first LAN goes: no longer translated, no longer advertised.
    a.core.handle_lans_changed(vec![net("10.1.0.0/16")], a.now);
    assert_eq!(
        a.events(),
        [
            Event::LansChanged {
                added: vec![],
                removed: vec![net("192.168.1.0/24")],
            },
            Event::LanMapped(vec![second]),
        ]
    );
    assert_eq!(
        a.actions(),
        [
            Action::SetLanMap(LanMap::new(vec![second]).unwrap()),
            advertisement(&["100.65.0.0/16"]),
        ]
    );
    // The broker's next answer still names the old lease (until its grace
    // period ends): it is not taken up again.
    a.core.handle_capsule(both_lans_assigned(), a.now);
    assert_eq!(a.actions(), []);
    assert_eq!(a.core.lan_map(), &LanMap::new(vec![second]).unwrap());

    // Back again: a fresh id, since the broker answers id 1 with what it
    // gave it before.
    a.core
        .handle_lans_changed(vec![net("10.1.0.0/16"), net("192.168.1.0/24")], a.now);
    a.events();
    assert_eq!(a.actions(), [lan_request(&[(3, "192.168.1.0/24")])]);
    a.core.handle_capsule(
        assign_ids(&[
            (0, "100.64.0.7/32"),
            (1, "100.64.9.0/24"),
            (2, "100.65.0.0/16"),
            (3, "100.64.9.0/24"),
        ]),
        a.now,
    );
    assert!(a.actions().contains(&Action::SetLanMap(
        LanMap::new(vec![second, first]).unwrap()
    )));

    // Every LAN goes: an empty map and an empty advertisement.
    a.core.handle_lans_changed(vec![], a.now);
    let actions = a.actions();
    assert!(
        actions.contains(&Action::SetLanMap(LanMap::default())),
        "{actions:?}"
    );
    assert!(actions.contains(&advertisement(&[])), "{actions:?}");
    assert!(a.core.lan_map().is_empty());
}

#[test]
fn a_lan_removed_while_disconnected_is_not_asked_for_again() {
    let mut a = Agent::with_two_lans_mapped();
    a.core
        .handle_session_ended(Ending::Lost("reset".into()), a.now);
    a.actions();
    a.core.handle_lans_changed(vec![net("10.1.0.0/16")], a.now);
    // The map shrinks at once; nothing is sent without a session.
    let second = Mapping::new(net("10.1.0.0/16"), net("100.65.0.0/16")).unwrap();
    assert_eq!(
        a.actions(),
        [Action::SetLanMap(LanMap::new(vec![second]).unwrap())]
    );
    let delay = a.retry_delay();
    a.wait_and_dial(delay);
    assert_eq!(
        a.open_with_lans(),
        [Action::CheckMtu, lan_request(&[(2, "10.1.0.0/16")])]
    );
}

#[test]
fn a_denied_or_misshapen_lan_mapping_is_reported_and_not_used() {
    let mut a = Agent::new(lan_config(&["192.168.1.0/24"]));
    a.actions();
    a.open_with_lans();
    // Denied: the unspecified address with the Request ID.
    a.core.handle_capsule(
        assign_ids(&[(0, "100.64.0.7/32"), (1, "0.0.0.0/32")]),
        a.now,
    );
    assert_eq!(
        a.events(),
        [Event::LanDenied {
            lan: net("192.168.1.0/24")
        }]
    );
    assert!(
        !a.actions()
            .iter()
            .any(|x| matches!(x, Action::SendCapsule(_) | Action::SetLanMap(_)))
    );
    // A prefix of another length cannot be a 1:1 mapping.
    a.core.handle_capsule(
        assign_ids(&[(0, "100.64.0.7/32"), (1, "100.64.8.0/23")]),
        a.now,
    );
    assert!(matches!(
        a.events().as_slice(),
        [Event::LanMapUnusable(MappingError::Shape { .. })]
    ));
    assert!(
        !a.actions()
            .iter()
            .any(|x| matches!(x, Action::SendCapsule(_) | Action::SetLanMap(_)))
    );
    assert!(a.core.lan_map().is_empty());
    // A denied request of another kind keeps its plain report.
    a.core
        .handle_capsule(assign_ids(&[(0, "100.64.0.7/32"), (7, "::/128")]), a.now);
    assert_eq!(a.events(), [Event::Denied { request_id: 7 }]);
}

#[test]
fn a_refused_certificate_is_reattested_then_dialled_with_the_new_one() {
    let mut a = Agent::new(config(false, None, 1));
    a.actions();
    let expired = Ending::CertificateRefused("the broker says the certificate expired".into());
    // Refused at the dial: re-attest instead of backing off.
    a.core.handle_dial_failed(expired.clone(), a.now);
    assert_eq!(
        a.events(),
        [Event::DialFailed(expired.clone()), Event::Reattesting]
    );
    assert_eq!(a.actions(), [Action::Reattest]);
    assert_eq!(a.core.poll_timeout(), None);
    // Renewed: dial at once.
    a.advance(secs(1));
    a.core.handle_reattest_result(Ok(()), a.now);
    assert_eq!(a.events(), [Event::Reattested]);
    assert!(matches!(a.actions().as_slice(), [Action::Dial { .. }]));
    // A refusal right after a renewal is not answered with another
    // re-attestation: it backs off like any refusal.
    a.core.handle_dial_failed(expired.clone(), a.now);
    let d = a.retry_delay();
    assert_eq!(a.actions(), []);
    a.wait_and_dial(d);
    // Long after, a session the broker ends for the same reason
    // re-attests again.
    a.advance(secs(31));
    a.core.handle_connected(Transport::H3, a.now);
    a.actions();
    a.core.handle_session_ended(expired.clone(), a.now);
    assert_eq!(
        a.events(),
        [Event::SessionEnded(expired), Event::Reattesting]
    );
    assert_eq!(
        a.actions(),
        [Action::EndSession { close: false }, Action::Reattest]
    );
}

#[test]
fn a_refused_reattestation_waits_ten_minutes_and_a_lost_one_backs_off() {
    let mut a = Agent::new(config(false, None, 1));
    a.actions();
    let expired = Ending::CertificateRefused("expired".into());
    a.core.handle_dial_failed(expired.clone(), a.now);
    a.events();
    a.actions();
    let why = "this site was revoked by the operator on 2026-11-30 12:00 UTC".to_string();
    a.core
        .handle_reattest_result(Err(ReattestFailure::Refused(why.clone())), a.now);
    assert_eq!(
        a.events(),
        [Event::ReattestFailed {
            failure: ReattestFailure::Refused(why),
            retry_in: TEN_MINUTES
        }]
    );
    assert_eq!(a.actions(), []);
    a.wait_and_dial(TEN_MINUTES);
    // No broker answers the re-attestation: backoff, then dial.
    a.core.handle_dial_failed(expired, a.now);
    a.events();
    assert_eq!(a.actions(), [Action::Reattest]);
    a.core
        .handle_reattest_result(Err(ReattestFailure::Lost("no answer".into())), a.now);
    let events = a.events();
    let [Event::ReattestFailed { retry_in, .. }] = events.as_slice() else {
        panic!("{events:?}")
    };
    assert!(*retry_in <= MAX, "{retry_in:?}");
    a.wait_and_dial(*retry_in);
    // A result nobody waits for any more changes nothing.
    a.core.handle_reattest_result(Ok(()), a.now);
    assert_eq!((a.events(), a.actions()), (vec![], vec![]));
}

#[test]
fn renewal_stays_at_half_life_whatever_this_hosts_clock_says() {
    // The broker issued a day-long certificate at its time T; this host
    // stored it when its own clock read T + offset.
    let t = 1_800_000_000u64;
    for offset in [0i64, 7200, -7200, 172_800, -172_800] {
        let saved = t.saturating_add_signed(offset);
        let life = Lifetime::measured(t, t + 86_400, saved, saved + 600);
        assert_eq!(life.renew_in(), secs(43_200 - 600), "offset {offset}");
    }
    // Read naively, a clock two days ahead puts a new certificate past
    // half-life: renewal at once, again and again.
    let naive = Lifetime {
        issued_at: t + 172_800,
        not_after: t + 86_400,
        unix_now: t + 172_800,
    };
    assert_eq!(naive.renew_in(), Duration::ZERO);
}

/// Connects on `transport` with a standby ready; returns the agent with
/// no pending output.
fn with_standby_on(transport: Transport) -> Agent {
    let mut a = Agent::new(config(true, Some(transport), 7));
    a.actions();
    a.connect(transport, None);
    a.core.handle_standby_result(true, a.now);
    assert_eq!(a.events(), [Event::StandbyReady]);
    assert!(a.core.standby_ready());
    a.tick();
    assert_eq!(
        a.actions(),
        [Action::Heartbeat],
        "the heartbeat starts at once"
    );
    a
}

#[test]
fn a_silent_broker_is_left_for_the_standby_within_a_second() {
    // One policy for every transport: what is counted (datagrams over
    // HTTP/3, bytes over HTTP/2) is the shell's.
    for transport in Transport::ALL {
        silent_broker_is_left_for_the_standby(transport);
    }
}

fn silent_broker_is_left_for_the_standby(transport: Transport) {
    let mut a = with_standby_on(transport);
    let t0 = a.now;
    // The broker answers: the count grows at every check.
    let mut received = 10;
    let mut heartbeats = 0;
    for _ in 0..30 {
        for action in a.run_for(Duration::from_millis(100), Duration::from_millis(100)) {
            match action {
                Action::Heartbeat => heartbeats += 1,
                Action::CheckLiveness => {
                    received += 1;
                    a.core
                        .handle_liveness(Some(received), Duration::from_millis(5), a.now);
                }
                Action::CheckMtu => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    // 3 s: a heartbeat every 300 ms.
    assert_eq!(heartbeats, 10, "one every 300 ms");
    assert_eq!(a.core.failovers(), 0);
    // Then silence: the standby takes over 700 ms after the last datagram.
    let silent_from = a.now;
    let mut moved_at = None;
    for _ in 0..20 {
        for action in a.run_for(Duration::from_millis(100), Duration::from_millis(100)) {
            match action {
                Action::CheckLiveness => {
                    a.core
                        .handle_liveness(Some(received), Duration::from_millis(5), a.now)
                }
                Action::UseStandby => moved_at = Some(a.now),
                _ => {}
            }
        }
        if moved_at.is_some() {
            break;
        }
    }
    let moved_at = moved_at.expect("moved to the standby");
    let took = moved_at - silent_from;
    assert!(took <= Duration::from_millis(800), "{took:?}");
    assert!(took >= Duration::from_millis(700), "{took:?}");
    assert!(a.events().contains(&Event::FailingOver));
    assert_eq!(a.core.failovers(), 1);
    // No backoff: the standby's connection is the session's now.
    a.core.handle_connected(transport, a.now);
    assert_eq!(
        a.actions(),
        [Action::SaveTransport(transport), Action::OpenTunnel]
    );
    a.core.handle_tunnel_opened(None, a.now);
    a.events();
    // And a new standby is dialed, on the same transport.
    assert!(a.actions().contains(&Action::DialStandby { transport }));
    assert!(t0 < moved_at);
}

#[test]
fn a_standby_that_had_been_up_is_replaced_at_once_and_a_short_lived_one_after_the_wait() {
    let dials = |actions: &[Action]| {
        actions
            .iter()
            .filter(|a| matches!(a, Action::DialStandby { .. }))
            .count()
    };
    for transport in Transport::ALL {
        // Up for 10 s, then its broker stops: a new standby is dialed at
        // once, not 5 s later (a loss of the active broker meanwhile would
        // wait for the idle timeout).
        let mut a = with_standby_on(transport);
        a.run_for(secs(10), Duration::from_millis(100));
        a.core.handle_standby_lost(a.now);
        assert_eq!(dials(&a.actions()), 1, "{transport:?}");
        // That dial fails: the next waits STANDBY_RETRY.
        a.core.handle_standby_result(false, a.now);
        assert_eq!(
            dials(&a.run_for(Duration::from_millis(4900), Duration::from_millis(100))),
            0
        );
        assert_eq!(
            dials(&a.run_for(Duration::from_millis(100), Duration::from_millis(100))),
            1
        );

        // Up for 1 s only: dialed again after the wait, not in a loop.
        let mut a = with_standby_on(transport);
        a.run_for(secs(1), Duration::from_millis(100));
        a.core.handle_standby_lost(a.now);
        assert_eq!(dials(&a.actions()), 0, "{transport:?}");
        assert_eq!(
            dials(&a.run_for(Duration::from_millis(4900), Duration::from_millis(100))),
            0
        );
        assert_eq!(
            dials(&a.run_for(Duration::from_millis(100), Duration::from_millis(100))),
            1
        );
    }
}

#[test]
fn without_a_standby_there_is_no_heartbeat_and_loss_backs_off() {
    let mut a = Agent::new(config(false, None, 7));
    a.actions();
    a.connect(Transport::H3, None);
    // The only broker: the standby dial fails, and is retried after 5 s.
    a.core.handle_standby_result(false, a.now);
    let actions = a.run_for(Duration::from_millis(4900), Duration::from_millis(100));
    assert!(
        !actions.iter().any(|a| matches!(
            a,
            Action::Heartbeat | Action::CheckLiveness | Action::DialStandby { .. }
        )),
        "{actions:?}"
    );
    let actions = a.run_for(Duration::from_millis(100), Duration::from_millis(100));
    assert!(actions.contains(&Action::DialStandby {
        transport: Transport::H3
    }));
    // Silence reported anyway changes nothing without a standby.
    a.core
        .handle_liveness(Some(1), Duration::from_millis(5), a.now);
    a.advance(secs(10));
    a.core
        .handle_liveness(Some(1), Duration::from_millis(5), a.now);
    assert!(a.core.transport().is_some(), "still in session");
    // A lost session backs off as before.
    a.core
        .handle_session_ended(Ending::Lost("idle timeout".into()), a.now);
    assert!(!a.events().contains(&Event::FailingOver));
    assert_eq!(a.actions(), [Action::EndSession { close: false }]);
}

#[test]
fn goaway_opens_the_standby_tunnel_before_the_old_one_goes() {
    // HTTP/3 GOAWAY and HTTP/2 GOAWAY alike.
    for transport in Transport::ALL {
        goaway_opens_the_standby_tunnel_first(transport);
    }
}

fn goaway_opens_the_standby_tunnel_first(transport: Transport) {
    let mut a = with_standby_on(transport);
    a.core.handle_goaway(a.now);
    assert_eq!(
        a.events(),
        [Event::GoingAway {
            standby_ready: true
        }]
    );
    // The old session is not ended: the shell opens the new tunnel first.
    assert_eq!(a.actions(), [Action::Handover]);
    assert!(a.core.transport().is_some());
    // A second GOAWAY changes nothing.
    a.core.handle_goaway(a.now);
    assert_eq!(a.actions(), []);
    a.core.handle_handover_result(Ok(()), None, a.now);
    let events = a.events();
    assert!(events.contains(&Event::HandedOver(transport)), "{events:?}");
    assert!(events.contains(&Event::Connected(transport)));
    let actions = a.actions();
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::EndSession { .. }))
    );
    assert!(actions.contains(&Action::DialStandby { transport }));
    assert_eq!(a.core.handovers(), 1);
}

#[test]
fn goaway_without_a_standby_dials_one_and_moves_when_it_answers() {
    let mut a = Agent::new(config(false, None, 7));
    a.actions();
    a.connect(Transport::H3, None);
    a.core.handle_standby_result(false, a.now);
    a.core.handle_goaway(a.now);
    assert_eq!(
        a.events(),
        [Event::GoingAway {
            standby_ready: false
        }]
    );
    // Dialed at once, whatever the retry wait.
    assert_eq!(
        a.actions(),
        [Action::DialStandby {
            transport: Transport::H3
        }]
    );
    a.core.handle_standby_result(true, a.now);
    assert_eq!(a.actions(), [Action::Handover]);
    // The standby's tunnel is refused: the session goes on where it is.
    a.core
        .handle_handover_result(Err(Ending::Refused("HTTP 503".into())), None, a.now);
    assert!(matches!(
        a.events().as_slice(),
        [Event::StandbyReady, Event::HandoverFailed(_)]
    ));
    assert!(a.core.transport().is_some());
    assert_eq!(a.core.handovers(), 0);
}

#[test]
fn the_old_connection_ending_during_a_renewal_handover_is_not_a_loss() {
    for handover_ok in [true, false] {
        let mut a = Agent::new(config(false, None, 1));
        a.actions();
        a.connect(Transport::H3, Some(lifetime(7200, 3600)));
        a.tick();
        assert!(a.actions().contains(&Action::Renew));
        a.core.handle_renewal_result(Ok(()), a.now);
        a.actions();
        assert!(a.core.handle_redial_result(true, a.now));
        assert_eq!(a.actions(), [Action::Handover]);
        a.events();
        // The broker ends the old connection once the new tunnel is open,
        // before the shell has heard the handover's result.
        a.core
            .handle_session_ended(Ending::Lost("replaced by a newer connection".into()), a.now);
        assert_eq!(a.actions(), [Action::EndSession { close: false }]);
        assert_eq!(a.events(), [], "not reported as a loss");
        if handover_ok {
            a.core
                .handle_handover_result(Ok(()), Some(lifetime(7200, 0)), a.now);
            let events = a.events();
            assert!(
                events.contains(&Event::MovedToRenewed(Transport::H3)),
                "{events:?}"
            );
            assert!(events.contains(&Event::Connected(Transport::H3)));
        } else {
            a.core
                .handle_handover_result(Err(Ending::Lost("timed out".into())), None, a.now);
            assert!(
                a.actions().contains(&Action::Dial {
                    order: vec![Transport::H3, Transport::H2]
                }),
                "reconnects"
            );
        }
    }
}
