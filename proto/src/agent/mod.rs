//! The edge agent's decisions as one sans-IO state machine: [`AgentCore`].
//!
//! The agent (`tether up`) keeps one site connected to a broker. Its shell
//! owns the sockets, the TUN device, the state directory, one timer and the
//! tasks that dial, open the tunnel, renew and probe; it tells the core what
//! happened (`handle_*`, with `now`) and carries out what the core decided
//! (`poll_event`, `poll_action`, `poll_timeout`). The core owns:
//!
//! - the transport ladder ([`Ladder`]): the order of each attempt, what a
//!   connection means (fallback, upgrade), and the HTTP/3 probes every
//!   [`PROBE_INTERVAL`] while on a lower rung;
//! - reconnection: jittered exponential backoff ([`Backoff`], seeded by the
//!   shell), reset after an attempt that lasted longer than
//!   [`HEALTHY_SESSION`], and which endings wait for it (a lost connection,
//!   a refusal) and which reconnect at once (a renewed certificate, a better
//!   transport);
//! - certificate renewal at half the certificate's lifetime, the move of
//!   the tunnel to a connection made with the new certificate before the
//!   old one goes ([`Action::Redial`], then [`Action::Handover`]), and the
//!   retry [`RENEWAL_RETRY`] after a failed renewal;
//! - re-attestation: when the broker refuses the site's certificate as
//!   expired or revoked (a site that was offline longer than its
//!   certificate lives), it asks the broker to renew the certificate on
//!   the proof of its key, dials again with the new one, and, when the
//!   broker refuses, reports why and asks again only after
//!   [`REATTEST_RETRY`];
//! - the tunnel MTU: the link's datagram limit, checked every
//!   [`MTU_CHECK_INTERVAL`], never below [`MIN_MTU_V6`] once the site has an
//!   IPv6 address and never below [`MIN_MTU_V4`] otherwise;
//! - the site's half of the CONNECT-IP session ([`ClientSession`]): the
//!   broker's capsules become the device's addresses and routes;
//! - the hospital LANs behind the site: on every session it asks for a
//!   mapping of each configured LAN (an ADDRESS_REQUEST naming the LAN,
//!   Request ID `i + 1` for the `i`-th LAN, so that it asks the same way on
//!   every reconnection and the broker's lease stays the same), learns the
//!   mapped prefixes from ADDRESS_ASSIGN, hands the shell the [`LanMap`]
//!   that translates packets, and advertises the mapped prefixes
//!   (ROUTE_ADVERTISEMENT) so the broker routes them to this site.
//!
//! - fast failover and handover ([`liveness`]): once a tunnel is open it
//!   keeps a standby connection to a second broker (no tunnel on it, so the
//!   broker keeps no session and writes nothing for it); while the standby
//!   is ready the active connection carries a heartbeat, and silence past
//!   [`Liveness::deadline`] or the end of the connection moves the tunnel
//!   to the standby at once, without backoff. When the broker says it is
//!   going away (HTTP/3 or HTTP/2 GOAWAY), the tunnel is opened on the standby first
//!   and the old one dropped after (make-before-break).
//!
//! Nothing here reads a clock, draws randomness, spawns a task or touches a
//! socket, so the tests below run the agent on a fake clock.

mod ladder;
pub mod liveness;
mod session;
#[cfg(test)]
mod tests;

pub use ladder::{Backoff, Ladder, Move, PROBE_INTERVAL};
pub use liveness::Liveness;
use liveness::{HEARTBEAT_INTERVAL, LIVENESS_CHECK, STANDBY_RETRY};
pub use session::{ClientEvent, ClientSession};

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::capsule::{Capsule, CapsuleDecoder};
use crate::connect_ip::{AddressRequest, RequestedAddress, RouteAdvertisement};
use crate::datagram::{self, Payload};
use crate::net::Family;
use crate::netmap::{LanMap, Mapping, MappingError};
use crate::tunnel::Transport;

/// The first reconnection delay (before jitter).
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// An attempt that lasted longer than this resets the backoff.
pub const HEALTHY_SESSION: Duration = Duration::from_secs(30);
/// A tunnel the broker accepted and kept open this long, then lost (the
/// broker restarted or went away, not a refusal), resets the backoff too:
/// its broker was healthy a moment ago, so the site dials again within the
/// first step (0.25–0.5 s) however often that broker restarts. Shorter
/// sessions (two agents with one identity replacing each other) keep
/// backing off.
pub const SETTLED_SESSION: Duration = Duration::from_secs(1);
/// The wait before renewing again after a failed renewal.
pub const RENEWAL_RETRY: Duration = Duration::from_secs(600);
/// The wait before asking again after the broker refused a
/// re-attestation (the site was revoked, or offline past the window): only
/// the operator can change that.
pub const REATTEST_RETRY: Duration = Duration::from_secs(600);
/// When to renew if the certificate's lifetime is unknown.
pub const RENEWAL_UNKNOWN: Duration = Duration::from_secs(3600);
/// How often the tunnel MTU follows the link's datagram limit.
pub const MTU_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// The least tunnel MTU of a site with an IPv6 address (RFC 8200).
pub const MIN_MTU_V6: u16 = 1280;
/// The least tunnel MTU of an IPv4-only site (RFC 791).
pub const MIN_MTU_V4: u16 = 576;
/// The MTU a new device gets when the link's limit is unknown, and its
/// least MTU (the first addresses may include IPv6).
pub const INITIAL_MTU: u16 = 1280;

/// What an [`AgentCore`] starts from.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Whether an HTTP proxy is available (the ladder's last rung).
    pub proxy: bool,
    /// The rung that worked last time (the state file), if any.
    pub remembered: Option<Transport>,
    /// The first reconnection delay ([`BACKOFF_BASE`]).
    pub backoff_base: Duration,
    /// The longest reconnection delay.
    pub backoff_max: Duration,
    /// The seed of the backoff's jitter; each agent draws its own.
    pub seed: u64,
    /// The LANs behind the site to expose, in configuration order.
    pub lans: Vec<IpNet>,
}

/// The Request ID of the ADDRESS_REQUEST for the `index`-th LAN of the
/// configuration the agent started with. LANs added later
/// ([`AgentCore::handle_lans_changed`]) get the next unused ids: an id
/// never names two LANs, since the broker answers a repeated id with what
/// it gave that id before.
pub fn lan_request_id(index: usize) -> u64 {
    index as u64 + 1
}

/// A configured LAN and the Request ID it is asked for with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lan {
    prefix: IpNet,
    request_id: u64,
}

/// The site certificate's lifetime, read together with the wall clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    /// When it was issued (Unix seconds).
    pub issued_at: u64,
    /// When it expires (Unix seconds).
    pub not_after: u64,
    /// The wall clock when this was read (Unix seconds).
    pub unix_now: u64,
}

impl Lifetime {
    /// The lifetime on this host's clock, whatever its error: the broker
    /// stamped `issued` and `not_after` (Unix seconds) with its own clock,
    /// and this host stored the certificate at `saved_at` by its clock. The
    /// certificate's span, counted from `saved_at`, keeps renewal at
    /// half-life when the two clocks disagree (a clock two days ahead
    /// would otherwise find every new certificate past half-life at once,
    /// and renew in a loop).
    pub fn measured(issued: u64, not_after: u64, saved_at: u64, unix_now: u64) -> Self {
        Self {
            issued_at: saved_at,
            not_after: saved_at.saturating_add(not_after.saturating_sub(issued)),
            unix_now,
        }
    }

    /// The time until half-way through the lifetime (zero when past it).
    pub fn renew_in(&self) -> Duration {
        let midpoint = self.issued_at + self.not_after.saturating_sub(self.issued_at) / 2;
        Duration::from_secs(midpoint.saturating_sub(self.unix_now))
    }
}

/// How a connection attempt, a tunnel or a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The connection was lost, or no broker answered.
    Lost(String),
    /// The broker refused this site (unknown CA, a 4xx answer).
    Refused(String),
    /// The broker refused this site's certificate as expired or revoked:
    /// re-attestation may renew it, or says why not.
    CertificateRefused(String),
}

impl Ending {
    /// The reason in plain words.
    pub fn message(&self) -> &str {
        match self {
            Ending::Lost(m) | Ending::Refused(m) | Ending::CertificateRefused(m) => m,
        }
    }
}

/// How a re-attestation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReattestFailure {
    /// No broker answered, or the connection failed: retry with backoff.
    Lost(String),
    /// The broker refused, with its reason in plain words (revoked, offline
    /// past the window, unknown key): retry after [`REATTEST_RETRY`].
    Refused(String),
}

/// A change to the TUN device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunConfig {
    /// Make these the device's addresses; create the device first, with
    /// MTU `create_mtu`, if there is none yet.
    Addresses {
        /// The addresses (and mapped LAN prefixes) the broker assigned.
        addresses: Vec<IpNet>,
        /// The MTU of a new device.
        create_mtu: u16,
    },
    /// Make these the routes through the device.
    Routes(Vec<IpNet>),
}

/// What the core asks its shell to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Connect to the first broker that answers, trying each transport of
    /// `order` in turn on every broker; answer
    /// [`AgentCore::handle_connected`] or [`AgentCore::handle_dial_failed`].
    Dial {
        /// The transports, first to try first.
        order: Vec<Transport>,
    },
    /// Create the device now, up and without addresses, so that it exists
    /// by the time the broker assigns them: asked once, with the first
    /// [`Action::Dial`], and carried out while that connection's handshake
    /// runs. [`TunConfig::Addresses`] then takes this device (with its
    /// `create_mtu`) instead of creating one; if this failed, it creates
    /// the device itself and reports why it cannot.
    PrepareTun {
        /// The device's MTU until the broker's addresses arrive.
        mtu: u16,
    },
    /// Remember this rung for the next start (the state file).
    SaveTransport(Transport),
    /// Open CONNECT-IP on the connection; answer
    /// [`AgentCore::handle_tunnel_opened`] or
    /// [`AgentCore::handle_session_ended`].
    OpenTunnel,
    /// Report the link's datagram limit and the device's MTU with
    /// [`AgentCore::handle_path_mtu`].
    CheckMtu,
    /// Set the device's MTU.
    SetTunMtu(u16),
    /// Change the device.
    ConfigureTun(TunConfig),
    /// Write this IP packet (carried in a DATAGRAM capsule) to the device
    /// if it is for the site, translated into the LAN like every packet
    /// from the tunnel ([`crate::netmap::Inbound::to_device`]).
    Deliver(Vec<u8>),
    /// Send this capsule on the tunnel's request stream.
    SendCapsule(Capsule),
    /// Translate packets between the LANs and their mapped prefixes with
    /// this map from now on (and make the LANs reachable from the device).
    SetLanMap(LanMap),
    /// Renew the certificate over the connection; answer
    /// [`AgentCore::handle_renewal_result`].
    Renew,
    /// Connect again to the current session's broker on `transport`, with
    /// the certificate just renewed, without opening a tunnel; answer
    /// [`AgentCore::handle_redial_result`]. The tunnel then moves to that
    /// connection ([`Action::Handover`]) before the old one is let go.
    Redial {
        /// The transport of the current session.
        transport: Transport,
    },
    /// Renew an expired (or refused) certificate by re-attestation, over a
    /// connection of its own without a client certificate; answer
    /// [`AgentCore::handle_reattest_result`].
    Reattest,
    /// Dial this transport to the same broker in the background, keeping
    /// the current session; answer [`AgentCore::handle_probe_result`], and
    /// keep the connection if it answered.
    Probe(Transport),
    /// End the session: stop its tasks and drop its connection. With
    /// `close`, close the connection first and let the close reach the
    /// broker, so it ends the session at once.
    EndSession {
        /// Close explicitly and drain (shutdown).
        close: bool,
    },
    /// Continue on the connection the last probe made; answer
    /// [`AgentCore::handle_connected`] with its transport.
    UseProbe,
    /// Connect to another broker than the current session's on
    /// `transport`, without opening a tunnel, and keep the connection as
    /// the standby; answer [`AgentCore::handle_standby_result`], and
    /// [`AgentCore::handle_standby_lost`] when it ends.
    DialStandby {
        /// The transport of the current session.
        transport: Transport,
    },
    /// Drop the standby connection (its certificate is outdated, or the
    /// broker refused this site).
    DropStandby,
    /// Send a heartbeat on the current connection (a reserved HTTP/3 frame
    /// on the control stream, which the broker acknowledges; an HTTP/2
    /// PING, which the broker answers).
    Heartbeat,
    /// Report the current connection's received datagram count (HTTP/2:
    /// bytes) and round
    /// trip with [`AgentCore::handle_liveness`] (may be answered at once).
    CheckLiveness,
    /// Continue on the standby connection; answer
    /// [`AgentCore::handle_connected`] with its transport (or
    /// [`AgentCore::handle_dial_failed`] when it is gone).
    UseStandby,
    /// Open the tunnel on the standby connection while the current one
    /// runs; once it is open make it the session's (the device's packets go
    /// to it), then let the old connection go after
    /// [`liveness::RETIRE_AFTER`]. Answer
    /// [`AgentCore::handle_handover_result`].
    Handover,
    /// Stop: remove the device and return.
    Stop,
}

/// What the core reports (for logs); nothing to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A connection on a different rung than the last that worked.
    Moved {
        /// The new rung.
        transport: Transport,
        /// [`Move::Fallback`] or [`Move::Upgrade`].
        moved: Move,
    },
    /// The tunnel is open on `transport`.
    Connected(Transport),
    /// No broker could be reached.
    DialFailed(Ending),
    /// The session ended (including a tunnel that could not be opened).
    SessionEnded(Ending),
    /// The certificate was renewed; the tunnel moves to a connection made
    /// with it.
    Renewed,
    /// The broker refused the certificate; asking it to re-attest.
    Reattesting,
    /// Re-attestation renewed the certificate; dialling with it.
    Reattested,
    /// Re-attestation failed; the next attempt is in `retry_in`.
    ReattestFailed {
        /// Why, in plain words (the broker's, when it refused).
        failure: ReattestFailure,
        /// When the next attempt is.
        retry_in: Duration,
    },
    /// Renewal failed; it is tried again in `retry_in`.
    RenewalFailed {
        /// Why.
        error: String,
        /// When the next attempt is.
        retry_in: Duration,
    },
    /// The probe answered; the tunnel moves to `Transport`.
    Upgrading(Transport),
    /// The broker denied an address request.
    Denied {
        /// Its Request ID.
        request_id: u64,
    },
    /// The broker denied the mapping of a LAN (its pool is full, or the
    /// LAN's length cannot be mapped).
    LanDenied {
        /// The LAN.
        lan: IpNet,
    },
    /// The LANs are mapped as listed (logged whenever the mapping changes).
    LanMapped(Vec<Mapping>),
    /// The configured LANs changed ([`AgentCore::handle_lans_changed`]):
    /// mappings are requested for the added ones, the removed ones are
    /// translated no more and withdrawn from the broker.
    LansChanged {
        /// LANs now exposed.
        added: Vec<IpNet>,
        /// LANs no longer exposed.
        removed: Vec<IpNet>,
    },
    /// The broker's answers cannot be used as a mapping; the previous map
    /// stays in force.
    LanMapUnusable(MappingError),
    /// The next attempt is in this long.
    Retrying(Duration),
    /// The session was lost and continues on the standby connection.
    FailingOver,
    /// The broker is going away; the tunnel moves to the standby (or to
    /// the first standby that answers, when none is ready).
    GoingAway {
        /// Whether a standby is ready.
        standby_ready: bool,
    },
    /// The tunnel moved to the standby's broker before the old one was
    /// dropped.
    HandedOver(Transport),
    /// The tunnel moved to a connection made with the renewed certificate
    /// before the old connection was dropped.
    MovedToRenewed(Transport),
    /// Opening the tunnel on the standby failed; the current session goes
    /// on.
    HandoverFailed(Ending),
    /// A standby connection is ready.
    StandbyReady,
}

/// One connection's session.
#[derive(Debug)]
struct Session {
    transport: Transport,
    /// The tunnel is open.
    open: bool,
    /// Since when.
    opened_at: Option<Instant>,
    client: ClientSession,
    capsules: CapsuleDecoder,
    /// The link's datagram limit last reported.
    link_mtu: Option<u16>,
    next_mtu_check: Option<Instant>,
    /// When to renew; `None` while a renewal is in flight.
    renew_at: Option<Instant>,
    /// The rung to probe, if below it.
    probe: Option<Transport>,
    next_probe: Option<Instant>,
    probing: bool,
    /// The mapped prefixes advertised on this session, once known.
    advertised: Option<Vec<IpNet>>,
    /// The heartbeat and liveness checks, while a standby is ready.
    next_heartbeat: Option<Instant>,
    next_check: Option<Instant>,
    liveness: Option<Liveness>,
    /// The broker asked the site to move and no standby was ready.
    move_requested: bool,
    /// A [`Action::Handover`] is under way.
    handing_over: bool,
    /// The certificate was renewed: the tunnel is moving to a connection
    /// made with the new one ([`Action::Redial`]).
    renewing: bool,
    /// The connection ended during a handover (the broker ends it once the
    /// tunnel is open on the new connection): the handover's result
    /// decides what follows.
    lost_meanwhile: bool,
}

impl Session {
    fn new(transport: Transport) -> Self {
        Self {
            transport,
            open: false,
            opened_at: None,
            client: ClientSession::default(),
            capsules: CapsuleDecoder::default(),
            link_mtu: None,
            next_mtu_check: None,
            renew_at: None,
            probe: None,
            next_probe: None,
            probing: false,
            advertised: None,
            next_heartbeat: None,
            next_check: None,
            liveness: None,
            move_requested: false,
            handing_over: false,
            renewing: false,
            lost_meanwhile: false,
        }
    }

    /// Starts (at `now`) or stops the heartbeat and the liveness checks.
    fn watch_liveness(&mut self, on: bool, now: Instant) {
        self.next_heartbeat = on.then_some(now);
        self.next_check = on.then_some(now + LIVENESS_CHECK);
        self.liveness = None;
    }
}

/// The standby connection, as the core knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standby {
    /// None; dial one at the session's next timer after this instant (at
    /// once when `None`).
    Absent(Option<Instant>),
    /// A dial on this transport is under way.
    Dialing(Transport),
    /// Connected on this transport.
    Ready(Transport),
}

#[derive(Debug)]
enum Phase {
    /// A dial (or the switch to a probe's connection) is under way.
    Dialing,
    /// Connected; the tunnel is opening or open.
    Session(Box<Session>),
    /// A re-attestation is under way.
    Reattesting,
    /// Backing off until then.
    Waiting(Instant),
    /// Done.
    Stopped,
}

/// The agent's state machine.
///
/// Inputs, each with `now`:
///
/// - [`handle_connected`](Self::handle_connected) /
///   [`handle_dial_failed`](Self::handle_dial_failed) answer
///   [`Action::Dial`] (and [`Action::UseProbe`]);
/// - [`handle_tunnel_opened`](Self::handle_tunnel_opened) answers
///   [`Action::OpenTunnel`], with the certificate's [`Lifetime`];
/// - [`handle_tunnel_data`](Self::handle_tunnel_data) takes the bytes of the
///   tunnel's request stream ([`handle_capsule`](Self::handle_capsule) one
///   parsed capsule);
/// - [`handle_path_mtu`](Self::handle_path_mtu) answers [`Action::CheckMtu`];
/// - [`handle_renewal_result`](Self::handle_renewal_result),
///   [`handle_probe_result`](Self::handle_probe_result) answer
///   [`Action::Renew`], [`Action::Probe`];
/// - [`handle_reattest_result`](Self::handle_reattest_result) answers
///   [`Action::Reattest`], asked for when a dial or a session ended with
///   [`Ending::CertificateRefused`];
/// - [`handle_session_ended`](Self::handle_session_ended): the tunnel could
///   not be opened, or the connection or its tunnel ended;
/// - [`handle_shutdown`](Self::handle_shutdown): the site is stopping;
/// - [`handle_timeout`](Self::handle_timeout): the timer fired.
///
/// After creating the core and after every `handle_*` call, a shell:
///
/// 1. reports each [`Event`] from [`poll_event`](Self::poll_event), in
///    order (the session they name is still in place);
/// 2. carries out each [`Action`] from [`poll_action`](Self::poll_action),
///    in order. Answers to actions (the result of a dial, a renewal, a
///    probe) come back later as inputs; [`Action::CheckMtu`] may be answered
///    at once;
/// 3. re-arms its single timer at [`poll_timeout`](Self::poll_timeout)
///    (none: wait for an input).
///
/// Results of work the core no longer waits for (a probe or a renewal of a
/// session that has ended) are ignored.
#[derive(Debug)]
pub struct AgentCore {
    ladder: Ladder,
    backoff: Backoff,
    phase: Phase,
    /// When the current attempt began (its dial, or the switch to a
    /// probe's connection): the backoff resets when it lasted.
    attempt_started: Instant,
    actions: VecDeque<Action>,
    events: VecDeque<Event>,
    /// The configured LANs.
    lans: Vec<Lan>,
    /// The Request ID the next LAN added is asked for with.
    next_lan_id: u64,
    /// The map the shell translates with (kept across sessions: the
    /// broker's lease does not change).
    lan_map: LanMap,
    /// When re-attestation last renewed the certificate: a refusal soon
    /// after is not answered with another at once.
    reattested_at: Option<Instant>,
    standby: Standby,
    /// When the standby last became ready: one that ends after it had been
    /// up for [`STANDBY_RETRY`] is replaced at once (its broker left);
    /// one that ends sooner waits that long, so a standby that keeps
    /// failing is not dialed in a loop.
    standby_ready_at: Option<Instant>,
    /// Sessions moved to the standby after a loss, and by handover.
    failovers: u64,
    handovers: u64,
}

impl AgentCore {
    /// A core that dials at once, and has the device prepared meanwhile
    /// ([`Action::PrepareTun`]).
    pub fn new(config: AgentConfig, now: Instant) -> Self {
        let mut core = Self {
            ladder: Ladder::new(config.proxy, config.remembered),
            backoff: Backoff::new(config.backoff_base, config.backoff_max, config.seed),
            phase: Phase::Dialing,
            attempt_started: now,
            actions: VecDeque::new(),
            events: VecDeque::new(),
            next_lan_id: lan_request_id(config.lans.len()),
            lans: config
                .lans
                .iter()
                .enumerate()
                .map(|(i, &prefix)| Lan {
                    prefix,
                    request_id: lan_request_id(i),
                })
                .collect(),
            lan_map: LanMap::default(),
            reattested_at: None,
            standby: Standby::Absent(None),
            standby_ready_at: None,
            failovers: 0,
            handovers: 0,
        };
        core.dial(now);
        // After the dial: its first packet goes out before the device is
        // made.
        core.actions
            .push_back(Action::PrepareTun { mtu: INITIAL_MTU });
        core
    }

    /// The ladder.
    pub fn ladder(&self) -> &Ladder {
        &self.ladder
    }

    /// The current session's capsule state, while connected.
    pub fn session(&self) -> Option<&ClientSession> {
        match &self.phase {
            Phase::Session(s) => Some(&s.client),
            _ => None,
        }
    }

    /// The current session's transport, while connected.
    pub fn transport(&self) -> Option<Transport> {
        match &self.phase {
            Phase::Session(s) => Some(s.transport),
            _ => None,
        }
    }

    /// The LAN map the shell was last told to translate with.
    pub fn lan_map(&self) -> &LanMap {
        &self.lan_map
    }

    /// Sessions moved to the standby after the broker was lost.
    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    /// Sessions handed over to the standby when the broker went away.
    pub fn handovers(&self) -> u64 {
        self.handovers
    }

    /// Whether a standby connection is ready.
    pub fn standby_ready(&self) -> bool {
        matches!(self.standby, Standby::Ready(_))
    }

    /// Whether the core has stopped.
    pub fn is_stopped(&self) -> bool {
        matches!(self.phase, Phase::Stopped)
    }

    /// The next thing to carry out.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next thing to report.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When to call [`handle_timeout`](Self::handle_timeout).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Waiting(until) => Some(*until),
            Phase::Session(s) if s.open => {
                let standby = match self.standby {
                    Standby::Absent(at) => at,
                    _ => None,
                };
                [
                    s.next_mtu_check,
                    s.renew_at,
                    s.next_probe,
                    s.next_heartbeat,
                    s.next_check,
                    standby,
                ]
                .into_iter()
                .flatten()
                .min()
            }
            _ => None,
        }
    }

    fn dial(&mut self, now: Instant) {
        self.phase = Phase::Dialing;
        self.attempt_started = now;
        self.actions.push_back(Action::Dial {
            order: self.ladder.attempt_order(),
        });
    }

    /// Backs off after a failed attempt or a lost session.
    fn retry(&mut self, now: Instant) {
        if now.saturating_duration_since(self.attempt_started) > HEALTHY_SESSION {
            self.backoff.reset();
        }
        let delay = self.backoff.next_delay();
        self.events.push_back(Event::Retrying(delay));
        self.phase = Phase::Waiting(now + delay);
    }

    fn session_mut(&mut self) -> Option<&mut Session> {
        match &mut self.phase {
            Phase::Session(s) => Some(s),
            _ => None,
        }
    }

    fn open_session_mut(&mut self) -> Option<&mut Session> {
        self.session_mut().filter(|s| s.open)
    }

    /// A connection on `transport` is up (after [`Action::Dial`] or
    /// [`Action::UseProbe`]).
    pub fn handle_connected(&mut self, transport: Transport, _now: Instant) {
        if !matches!(self.phase, Phase::Dialing) {
            return;
        }
        let moved = self.ladder.connected(transport);
        if moved != Move::Stay {
            self.events.push_back(Event::Moved { transport, moved });
        }
        self.actions.push_back(Action::SaveTransport(transport));
        self.actions.push_back(Action::OpenTunnel);
        self.phase = Phase::Session(Box::new(Session::new(transport)));
    }

    /// No broker could be reached on any rung.
    pub fn handle_dial_failed(&mut self, ending: Ending, now: Instant) {
        if !matches!(self.phase, Phase::Dialing) {
            return;
        }
        let reattest = self.wants_reattest(&ending, now);
        self.events.push_back(Event::DialFailed(ending));
        if reattest {
            self.reattest();
        } else {
            self.retry(now);
        }
    }

    /// Whether `ending` calls for re-attestation: the broker refused the
    /// certificate, and no re-attestation renewed it within the last
    /// [`HEALTHY_SESSION`] (else the refusal has another cause, and asking
    /// again at once would loop).
    fn wants_reattest(&self, ending: &Ending, now: Instant) -> bool {
        matches!(ending, Ending::CertificateRefused(_))
            && self
                .reattested_at
                .is_none_or(|at| now.saturating_duration_since(at) > HEALTHY_SESSION)
    }

    fn reattest(&mut self) {
        self.phase = Phase::Reattesting;
        self.events.push_back(Event::Reattesting);
        self.actions.push_back(Action::Reattest);
    }

    /// The outcome of [`Action::Reattest`].
    pub fn handle_reattest_result(&mut self, result: Result<(), ReattestFailure>, now: Instant) {
        if !matches!(self.phase, Phase::Reattesting) {
            return;
        }
        match result {
            Ok(()) => {
                self.reattested_at = Some(now);
                self.events.push_back(Event::Reattested);
                self.dial(now);
            }
            Err(ReattestFailure::Refused(why)) => {
                self.events.push_back(Event::ReattestFailed {
                    failure: ReattestFailure::Refused(why),
                    retry_in: REATTEST_RETRY,
                });
                self.phase = Phase::Waiting(now + REATTEST_RETRY);
            }
            Err(lost) => {
                if now.saturating_duration_since(self.attempt_started) > HEALTHY_SESSION {
                    self.backoff.reset();
                }
                let delay = self.backoff.next_delay();
                self.events.push_back(Event::ReattestFailed {
                    failure: lost,
                    retry_in: delay,
                });
                self.phase = Phase::Waiting(now + delay);
            }
        }
    }

    /// The tunnel is open; `lifetime` is the certificate's, when it could
    /// be read.
    pub fn handle_tunnel_opened(&mut self, lifetime: Option<Lifetime>, now: Instant) {
        let probe = match &self.phase {
            Phase::Session(s) if !s.open => self.ladder.probe(s.transport),
            _ => return,
        };
        let renew_in = lifetime.map_or(RENEWAL_UNKNOWN, |l| l.renew_in());
        let Some(s) = self.session_mut() else {
            return;
        };
        s.open = true;
        s.opened_at = Some(now);
        s.renew_at = Some(now + renew_in);
        s.probe = probe;
        s.next_probe = probe.map(|_| now + PROBE_INTERVAL);
        s.next_mtu_check = Some(now + MTU_CHECK_INTERVAL);
        let transport = s.transport;
        self.events.push_back(Event::Connected(transport));
        self.actions.push_back(Action::CheckMtu);
        if matches!(self.standby, Standby::Ready(_))
            && let Some(s) = self.session_mut()
        {
            s.watch_liveness(true, now);
        }
        if !self.lans.is_empty() {
            let lans = self.lans.clone();
            self.request_lans(&lans);
        } else {
            // It routes no LAN: an empty advertisement tells the broker, so
            // that mappings of LANs removed from the configuration are
            // released after their grace period.
            self.actions
                .push_back(Action::SendCapsule(Capsule::RouteAdvertisement(
                    RouteAdvertisement::from_prefixes(std::iter::empty()),
                )));
        }
        self.maybe_dial_standby(now);
    }

    /// Asks the broker for a mapping of each of `lans`.
    fn request_lans(&mut self, lans: &[Lan]) {
        let requests = lans
            .iter()
            .map(|lan| RequestedAddress {
                request_id: lan.request_id,
                prefix: lan.prefix.trunc(),
            })
            .collect();
        self.actions
            .push_back(Action::SendCapsule(Capsule::AddressRequest(
                AddressRequest { requests },
            )));
    }

    /// The configured LANs are now `lans` (the configuration was
    /// reloaded). A LAN removed is translated no more at once and, on an
    /// open session, withdrawn from the broker's routes by a new
    /// advertisement (the broker releases its mapping after the grace
    /// period). A LAN added is asked for over the open session, and mapped
    /// and advertised when the broker answers; without an open session,
    /// the next session asks for every LAN as usual. The connection is
    /// kept either way.
    pub fn handle_lans_changed(&mut self, lans: Vec<IpNet>, _now: Instant) {
        let mut kept = Vec::with_capacity(lans.len());
        let mut added = Vec::new();
        for prefix in lans {
            if kept.iter().any(|l: &Lan| l.prefix == prefix) {
                continue;
            }
            match self.lans.iter().find(|l| l.prefix == prefix) {
                Some(lan) => kept.push(*lan),
                None => {
                    let lan = Lan {
                        prefix,
                        request_id: self.next_lan_id,
                    };
                    self.next_lan_id += 1;
                    kept.push(lan);
                    added.push(lan);
                }
            }
        }
        let removed: Vec<IpNet> = self
            .lans
            .iter()
            .map(|l| l.prefix)
            .filter(|p| !kept.iter().any(|l| l.prefix == *p))
            .collect();
        self.lans = kept;
        if added.is_empty() && removed.is_empty() {
            return;
        }
        self.events.push_back(Event::LansChanged {
            added: added.iter().map(|l| l.prefix).collect(),
            removed: removed.clone(),
        });
        if !removed.is_empty() {
            let mappings: Vec<Mapping> = self
                .lan_map
                .mappings()
                .iter()
                .filter(|m| !removed.contains(&m.real))
                .copied()
                .collect();
            if mappings.len() != self.lan_map.mappings().len() {
                match LanMap::new(mappings.clone()) {
                    Ok(map) => {
                        self.lan_map = map.clone();
                        self.events.push_back(Event::LanMapped(mappings));
                        self.actions.push_back(Action::SetLanMap(map));
                    }
                    Err(e) => self.events.push_back(Event::LanMapUnusable(e)),
                }
            }
            let still: Vec<IpNet> = self.lan_map.mappings().iter().map(|m| m.mapped).collect();
            let none_left = self.lans.is_empty();
            if let Some(s) = self.open_session_mut() {
                let advertised = match &s.advertised {
                    Some(old) => Some(
                        old.iter()
                            .copied()
                            .filter(|p| still.contains(p))
                            .collect::<Vec<_>>(),
                    ),
                    // Nothing advertised yet on this session: only "none"
                    // is known to be right.
                    None if none_left => Some(Vec::new()),
                    None => None,
                };
                if let Some(advertised) = advertised
                    && s.advertised.as_ref() != Some(&advertised)
                {
                    s.advertised = Some(advertised.clone());
                    self.actions
                        .push_back(Action::SendCapsule(Capsule::RouteAdvertisement(
                            RouteAdvertisement::from_prefixes(advertised),
                        )));
                }
            }
        }
        if !added.is_empty() && self.open_session_mut().is_some() {
            self.request_lans(&added);
        }
    }

    /// After an ADDRESS_ASSIGN: the mappings of the LANs it answered, a new
    /// map for the shell if they changed, and an advertisement of the
    /// mapped prefixes once per session (and again if they changed).
    fn update_lans(&mut self) {
        let Phase::Session(s) = &mut self.phase else {
            return;
        };
        let mut mappings = Vec::new();
        for lan in &self.lans {
            let Some(mapped) = s.client.assigned_for(lan.request_id) else {
                continue;
            };
            match Mapping::new(lan.prefix, mapped) {
                Ok(m) => mappings.push(m),
                Err(e) => {
                    self.events.push_back(Event::LanMapUnusable(e));
                    return;
                }
            }
        }
        if mappings.is_empty() {
            return;
        }
        let map = match LanMap::new(mappings.clone()) {
            Ok(map) => map,
            Err(e) => {
                self.events.push_back(Event::LanMapUnusable(e));
                return;
            }
        };
        let mapped: Vec<IpNet> = mappings.iter().map(|m| m.mapped).collect();
        if s.advertised.as_ref() != Some(&mapped) {
            s.advertised = Some(mapped.clone());
            self.actions
                .push_back(Action::SendCapsule(Capsule::RouteAdvertisement(
                    RouteAdvertisement::from_prefixes(mapped),
                )));
        }
        if map != self.lan_map {
            self.lan_map = map.clone();
            self.events.push_back(Event::LanMapped(mappings));
            self.actions.push_back(Action::SetLanMap(map));
        }
    }

    /// Bytes read from the tunnel's request stream.
    pub fn handle_tunnel_data(&mut self, data: &[u8], now: Instant) {
        let Some(s) = self.open_session_mut() else {
            return;
        };
        s.capsules.push(data);
        let mut capsules = Vec::new();
        let failure = loop {
            match s.capsules.next_capsule() {
                Ok(Some(raw)) => match Capsule::parse(raw) {
                    Ok(c) => capsules.push(c),
                    Err(e) => break Some(e.to_string()),
                },
                Ok(None) => break None,
                Err(e) => break Some(e.to_string()),
            }
        };
        // A stream that breaks ends the session; what came before the break
        // is not applied.
        if let Some(f) = failure {
            self.handle_session_ended(
                Ending::Lost(format!("protocol error from the broker: {f}")),
                now,
            );
            return;
        }
        for c in capsules {
            self.handle_capsule(c, now);
        }
    }

    /// One capsule from the broker.
    pub fn handle_capsule(&mut self, capsule: Capsule, _now: Instant) {
        let Some(s) = self.open_session_mut() else {
            return;
        };
        let create_mtu = s.link_mtu.unwrap_or(INITIAL_MTU).max(INITIAL_MTU);
        let assigned = matches!(capsule, Capsule::AddressAssign(_));
        for event in s.client.on_capsule(capsule) {
            match event {
                ClientEvent::Addresses(addresses) => {
                    self.actions
                        .push_back(Action::ConfigureTun(TunConfig::Addresses {
                            addresses,
                            create_mtu,
                        }));
                }
                ClientEvent::Routes(routes) => {
                    self.actions
                        .push_back(Action::ConfigureTun(TunConfig::Routes(routes)));
                }
                ClientEvent::Denied { request_id } => {
                    let lan = self
                        .lans
                        .iter()
                        .find(|l| l.request_id == request_id)
                        .map(|l| l.prefix);
                    self.events.push_back(match lan {
                        Some(lan) => Event::LanDenied { lan },
                        None => Event::Denied { request_id },
                    });
                }
                ClientEvent::Datagram(mut payload) => {
                    if let Ok(Payload::IpPacket(p)) = datagram::parse_payload(&payload) {
                        let start = payload.len() - p.len();
                        payload.drain(..start);
                        self.actions.push_back(Action::Deliver(payload));
                    }
                }
            }
        }
        if assigned && !self.lans.is_empty() {
            self.update_lans();
        }
    }

    /// The link's datagram limit now (`None`: unknown) and the device's MTU
    /// (`None`: no device yet).
    pub fn handle_path_mtu(&mut self, link: Option<u16>, tun: Option<u16>, _now: Instant) {
        let Some(s) = self.open_session_mut() else {
            return;
        };
        s.link_mtu = link;
        let (Some(link), Some(tun)) = (link, tun) else {
            return;
        };
        let floor = if s.client.host_address(Family::V6).is_some() {
            MIN_MTU_V6
        } else {
            MIN_MTU_V4
        };
        let mtu = link.max(floor);
        if mtu != tun {
            self.actions.push_back(Action::SetTunMtu(mtu));
        }
    }

    /// The outcome of [`Action::Renew`].
    pub fn handle_renewal_result(&mut self, result: Result<(), Ending>, now: Instant) {
        let Some(s) = self
            .open_session_mut()
            .filter(|s| s.renew_at.is_none() && !s.renewing)
        else {
            return;
        };
        match result {
            Ok(()) if !s.handing_over => {
                // Make before break: a second connection with the new
                // certificate, and the tunnel moves to it (the standby,
                // made with the old certificate, is dropped).
                s.renewing = true;
                let transport = s.transport;
                self.events.push_back(Event::Renewed);
                self.drop_standby();
                self.actions.push_back(Action::Redial { transport });
            }
            Ok(()) => {
                self.events.push_back(Event::Renewed);
                self.actions.push_back(Action::EndSession { close: false });
                self.drop_standby();
                self.dial(now);
            }
            Err(ending @ Ending::CertificateRefused(_)) => {
                // The certificate expired under this connection: only
                // re-attestation renews it now, on a new connection.
                self.handle_session_ended(ending, now);
            }
            Err(failure) => {
                s.renew_at = Some(now + RENEWAL_RETRY);
                self.events.push_back(Event::RenewalFailed {
                    error: failure.message().to_string(),
                    retry_in: RENEWAL_RETRY,
                });
            }
        }
    }

    /// The outcome of [`Action::Redial`]: whether the connection with the
    /// renewed certificate is up. Returns whether the core takes it (the
    /// shell keeps it as the connection to hand over to); if not, the
    /// shell drops it. Without it the site reconnects with the new
    /// certificate the plain way: the session ends, then a dial.
    pub fn handle_redial_result(&mut self, connected: bool, now: Instant) -> bool {
        let Some(s) = self
            .open_session_mut()
            .filter(|s| s.renewing && !s.handing_over)
        else {
            return false;
        };
        if connected {
            s.handing_over = true;
            let transport = s.transport;
            self.standby = Standby::Ready(transport);
            self.standby_ready_at = Some(now);
            self.actions.push_back(Action::Handover);
            return true;
        }
        self.actions.push_back(Action::EndSession { close: false });
        self.dial(now);
        false
    }

    /// The outcome of [`Action::Probe`]: whether the better rung answered.
    pub fn handle_probe_result(&mut self, answered: bool, now: Instant) {
        let Some(s) = self.open_session_mut().filter(|s| s.probing) else {
            return;
        };
        s.probing = false;
        let Some(better) = s.probe.filter(|_| answered) else {
            return;
        };
        self.events.push_back(Event::Upgrading(better));
        self.actions.push_back(Action::EndSession { close: false });
        self.actions.push_back(Action::UseProbe);
        self.phase = Phase::Dialing;
        self.attempt_started = now;
    }

    /// The session ended: its tunnel could not be opened, or the connection
    /// or the tunnel ended.
    pub fn handle_session_ended(&mut self, ending: Ending, now: Instant) {
        let Phase::Session(s) = &mut self.phase else {
            return;
        };
        if s.open && s.handing_over && matches!(ending, Ending::Lost(_)) {
            // The tunnel is opening on the other connection, and a broker
            // ends this one as soon as it has: not a loss yet.
            s.lost_meanwhile = true;
            self.actions.push_back(Action::EndSession { close: false });
            return;
        }
        let settled = s
            .opened_at
            .is_some_and(|t| now.saturating_duration_since(t) >= SETTLED_SESSION);
        if settled && matches!(ending, Ending::Lost(_)) {
            self.backoff.reset();
        }
        if let (Ending::Lost(_), Standby::Ready(_)) = (&ending, self.standby) {
            self.events.push_back(Event::SessionEnded(ending));
            self.events.push_back(Event::FailingOver);
            self.actions.push_back(Action::EndSession { close: false });
            self.actions.push_back(Action::UseStandby);
            self.standby = Standby::Absent(None);
            self.failovers += 1;
            self.phase = Phase::Dialing;
            self.attempt_started = now;
            return;
        }
        let reattest = self.wants_reattest(&ending, now);
        if !matches!(ending, Ending::Lost(_)) {
            // The standby would be refused the same way.
            self.drop_standby();
        }
        self.events.push_back(Event::SessionEnded(ending));
        self.actions.push_back(Action::EndSession { close: false });
        if reattest {
            self.reattest();
        } else {
            self.retry(now);
        }
    }

    /// The site is stopping.
    pub fn handle_shutdown(&mut self, _now: Instant) {
        match self.phase {
            Phase::Stopped => return,
            Phase::Session(_) => self.actions.push_back(Action::EndSession { close: true }),
            Phase::Dialing | Phase::Reattesting | Phase::Waiting(_) => {}
        }
        self.phase = Phase::Stopped;
        self.actions.push_back(Action::Stop);
    }

    /// Forgets the standby and asks the shell to drop it (the result of a
    /// dial under way is ignored, and the shell drops what it brings).
    fn drop_standby(&mut self) {
        if matches!(self.standby, Standby::Ready(_)) {
            self.actions.push_back(Action::DropStandby);
        }
        self.standby = Standby::Absent(None);
    }

    /// Dials a standby if none is there or on the way and the retry wait
    /// (if any) is over.
    fn maybe_dial_standby(&mut self, now: Instant) {
        let Phase::Session(s) = &self.phase else {
            return;
        };
        if !s.open || s.handing_over || s.renewing {
            return;
        }
        if let Standby::Absent(at) = self.standby
            && at.is_none_or(|t| now >= t)
        {
            self.standby = Standby::Dialing(s.transport);
            self.actions.push_back(Action::DialStandby {
                transport: s.transport,
            });
        }
    }

    /// The outcome of [`Action::DialStandby`]: whether a standby connection
    /// is up.
    pub fn handle_standby_result(&mut self, connected: bool, now: Instant) {
        let Standby::Dialing(transport) = self.standby else {
            return;
        };
        if !connected {
            self.standby = Standby::Absent(Some(now + STANDBY_RETRY));
            return;
        }
        self.standby = Standby::Ready(transport);
        self.standby_ready_at = Some(now);
        self.events.push_back(Event::StandbyReady);
        let Some(s) = self.open_session_mut() else {
            return;
        };
        s.watch_liveness(true, now);
        if s.move_requested {
            s.move_requested = false;
            s.handing_over = true;
            self.actions.push_back(Action::Handover);
        }
    }

    /// The standby connection ended. A standby that had been up for
    /// [`STANDBY_RETRY`] or more is replaced at once (its broker stopped or
    /// left the region: until a new one is up, a loss of the active broker
    /// would wait for QUIC's idle timeout); one that ended sooner is
    /// dialed again after [`STANDBY_RETRY`].
    pub fn handle_standby_lost(&mut self, now: Instant) {
        if !matches!(self.standby, Standby::Ready(_)) {
            return;
        }
        let held = self
            .standby_ready_at
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        let retry_at = (held < STANDBY_RETRY).then(|| now + STANDBY_RETRY);
        self.standby = Standby::Absent(retry_at);
        if let Some(s) = self.open_session_mut() {
            s.watch_liveness(false, now);
        }
        self.maybe_dial_standby(now);
    }

    /// The answer to [`Action::CheckLiveness`]: the datagrams the current
    /// connection has received in all (`None` when its transport cannot
    /// tell) and its round-trip time. Silence past the deadline ends the
    /// session as lost, which moves it to the standby.
    pub fn handle_liveness(&mut self, received: Option<u64>, rtt: Duration, now: Instant) {
        let Some(received) = received else {
            return;
        };
        if !matches!(self.standby, Standby::Ready(_)) {
            return;
        }
        let Some(s) = self.open_session_mut() else {
            return;
        };
        let liveness = s.liveness.get_or_insert(Liveness::new(received, now));
        liveness.handle_received(received, now);
        if liveness.is_lost(rtt, now) {
            let silent = now.saturating_duration_since(liveness.heard_at());
            self.handle_session_ended(
                Ending::Lost(format!(
                    "nothing heard from the broker for {} ms",
                    silent.as_millis()
                )),
                now,
            );
        }
    }

    /// The broker is going away (HTTP/3 or HTTP/2 GOAWAY): move the tunnel to the
    /// standby before dropping this one, or dial a standby first.
    pub fn handle_goaway(&mut self, now: Instant) {
        let ready = matches!(self.standby, Standby::Ready(_));
        let Some(s) = self.open_session_mut() else {
            return;
        };
        if s.handing_over || s.move_requested {
            return;
        }
        if ready {
            s.handing_over = true;
        } else {
            s.move_requested = true;
        }
        self.events.push_back(Event::GoingAway {
            standby_ready: ready,
        });
        if ready {
            self.actions.push_back(Action::Handover);
            return;
        }
        // A standby that is on its way answers the request; otherwise dial
        // one now, whatever the retry wait.
        if let Standby::Absent(_) = self.standby {
            self.standby = Standby::Absent(None);
            self.maybe_dial_standby(now);
        }
    }

    /// The outcome of [`Action::Handover`]: on success the tunnel runs on
    /// the former standby (`lifetime` is the certificate's), and a new
    /// standby is dialed.
    pub fn handle_handover_result(
        &mut self,
        result: Result<(), Ending>,
        lifetime: Option<Lifetime>,
        now: Instant,
    ) {
        let Standby::Ready(transport) = self.standby else {
            return;
        };
        let Some(renewing) = self
            .open_session_mut()
            .filter(|s| s.handing_over)
            .map(|s| s.renewing)
        else {
            return;
        };
        self.standby = Standby::Absent(None);
        match result {
            Err(ending) if renewing => {
                // Reconnect with the new certificate the plain way.
                self.events.push_back(Event::HandoverFailed(ending));
                self.actions.push_back(Action::EndSession { close: false });
                self.dial(now);
            }
            Ok(()) => {
                if renewing {
                    self.events.push_back(Event::MovedToRenewed(transport));
                } else {
                    self.handovers += 1;
                    self.events.push_back(Event::HandedOver(transport));
                }
                let moved = self.ladder.connected(transport);
                if moved != Move::Stay {
                    self.events.push_back(Event::Moved { transport, moved });
                }
                self.phase = Phase::Session(Box::new(Session::new(transport)));
                self.attempt_started = now;
                self.handle_tunnel_opened(lifetime, now);
            }
            Err(ending) => {
                self.events.push_back(Event::HandoverFailed(ending));
                self.standby = Standby::Absent(Some(now + STANDBY_RETRY));
                let lost = self.open_session_mut().is_some_and(|s| {
                    s.handing_over = false;
                    s.watch_liveness(false, now);
                    s.lost_meanwhile
                });
                if lost {
                    self.retry(now);
                }
            }
        }
    }

    /// The timer fired.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::Waiting(until) if now >= *until => self.dial(now),
            Phase::Session(s) if s.open => {
                if s.next_mtu_check.is_some_and(|t| now >= t) {
                    s.next_mtu_check = Some(now + MTU_CHECK_INTERVAL);
                    self.actions.push_back(Action::CheckMtu);
                }
                if s.renew_at.is_some_and(|t| now >= t) {
                    s.renew_at = None;
                    self.actions.push_back(Action::Renew);
                }
                if let (Some(probe), Some(at)) = (s.probe, s.next_probe)
                    && now >= at
                {
                    s.next_probe = Some(now + PROBE_INTERVAL);
                    if !s.probing {
                        s.probing = true;
                        self.actions.push_back(Action::Probe(probe));
                    }
                }
                if s.next_heartbeat.is_some_and(|t| now >= t) {
                    s.next_heartbeat = Some(now + HEARTBEAT_INTERVAL);
                    self.actions.push_back(Action::Heartbeat);
                }
                if s.next_check.is_some_and(|t| now >= t) {
                    s.next_check = Some(now + LIVENESS_CHECK);
                    self.actions.push_back(Action::CheckLiveness);
                }
                self.maybe_dial_standby(now);
            }
            _ => {}
        }
    }
}
