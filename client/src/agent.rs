//! `tether up`: keep this site connected.
//!
//! The agent climbs a transport ladder: HTTP/3 over QUIC, then HTTP/2 over
//! TCP, then HTTP/2 through an HTTP proxy when one is configured (or given
//! by `HTTPS_PROXY`). It starts on the rung that last worked, and while on
//! a lower rung it probes HTTP/3 every
//! [`PROBE_INTERVAL`](tether_proto::agent::PROBE_INTERVAL) and moves up as
//! soon as it answers. On whichever rung, it opens CONNECT-IP, configures
//! the TUN device from the broker's capsules, and moves packets between the
//! device and the tunnel. When the connection is lost it reconnects with
//! jittered exponential backoff; the broker gives it the same address
//! again, and the device (with its addresses and routes) stays in place
//! meanwhile. It renews its certificate at half its lifetime over the
//! tunnel, connects again with the new one and moves the tunnel to that
//! connection before it lets the old one go. With `lans` configured it
//! requests a mapping for each LAN, advertises the mapped prefixes, and
//! translates packets between the LANs and the tunnel (`crate::lan`).
//!
//! Those decisions are [`AgentCore`]'s (`tether_proto::agent`). This module
//! is its shell: it owns the connection, the tunnel, the device, the state
//! directory, one timer and the tasks that dial, open, renew and probe; it
//! feeds what happens into the core and carries out what the core decides.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tether_config::client::{ClientConfig, LanSource};
use tether_proto::agent::liveness::{HEARTBEAT_INTERVAL, RETIRE_AFTER};
use tether_proto::agent::{
    Action, AgentConfig, AgentCore, BACKOFF_BASE, Ending, Event, Lifetime, Move, ReattestFailure,
    TunConfig,
};
use tether_proto::tunnel::Transport;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::dial::Target;
use crate::enroll::RenewError;
use crate::failure::Failure;
use crate::health::Reporter;
use crate::lan::{LanPath, SiteTable};
use crate::link::{BrokerConn, Dialer, NarrowPaths, Tunnel, TunnelLink};
use crate::proxy::Proxy;
use crate::pumps::start_pumps;
use crate::report::Problems;
use crate::state_dir::{Identity, StateDir};
use crate::tun::Tun;
use tether_proto::report::ProblemKind;

/// How long a broker that sent GOAWAY is not used for a standby: it still
/// answers while it drains, but not for long.
const LEAVING: Duration = Duration::from_secs(60);

/// What a task reports back.
enum Input {
    Dialed(Result<(BrokerConn, Target), Failure>),
    Opened(Result<(Tunnel, TunnelLink), Failure>),
    Renewed(Result<(), Ending>),
    Reattested(Result<(), ReattestFailure>),
    Probed(Option<BrokerConn>),
    Standby(Result<(BrokerConn, Target), Failure>),
    Redialed(Result<(BrokerConn, Target), Failure>),
    HandedOver(Box<Result<(Session, Lifetimes), Failure>>),
}

impl Input {
    /// Whether the result belongs to the standby, which outlives sessions
    /// (and epochs).
    fn is_standby(&self) -> bool {
        matches!(self, Input::Standby(_) | Input::HandedOver(_))
    }
}

/// The certificate's lifetime when a handed-over tunnel opened.
type Lifetimes = Option<Lifetime>;

/// What woke the shell.
enum Wake {
    Shutdown,
    Timer,
    Data(Vec<u8>),
    Ended(Failure),
    Input(u64, Box<Input>),
    GoAway,
    StandbyLost,
    Reload(Box<Reload>),
    Expose(crate::expose::Update),
    Nothing,
}

/// A configuration read again on SIGHUP, or why it cannot be used.
pub type Reload = Result<ClientConfig, String>;

/// A connection to a broker and what runs on it.
struct Session {
    conn: Arc<BrokerConn>,
    target: Target,
    tunnel: Option<Tunnel>,
    link: Option<TunnelLink>,
    /// Packet pumps, and the tasks opening, renewing, probing.
    tasks: Vec<JoinHandle<()>>,
    /// The broker's GOAWAY was seen (and handed to the core).
    goaway_seen: bool,
}

/// The agent's shell.
struct Shell {
    config: Arc<ClientConfig>,
    state: StateDir,
    proxy: Option<Proxy>,
    tun: Option<Tun>,
    /// The device being made ahead ([`Action::PrepareTun`]), until the
    /// broker's addresses take it.
    preparing: Option<JoinHandle<anyhow::Result<Tun>>>,
    session: Option<Session>,
    dialing: Option<JoinHandle<()>>,
    /// The connection the last probe made.
    probed: Option<(BrokerConn, Target)>,
    /// Tags task results, so that those of an ended session are dropped.
    epoch: u64,
    /// The LAN map the pumps translate with.
    lan: Arc<LanPath>,
    /// The site's nftables table: the source rewrite of tunnel traffic
    /// entering the LANs, and the forwarded services.
    nat: SiteTable,
    /// Resolves the targets of forwarded services, if there are any.
    resolver: Option<crate::expose::Resolver>,
    /// What the resolver finds.
    exposed: mpsc::UnboundedReceiver<crate::expose::Update>,
    inputs: mpsc::UnboundedSender<(u64, Input)>,
    /// What the health endpoint reports.
    health: Reporter,
    /// The broker of the latest session, dialed last after it is lost.
    last_broker: Option<tether_config::Endpoint>,
    /// The brokers whose path needed the narrow QUIC packets, remembered
    /// across the dialers.
    narrow_paths: NarrowPaths,
    /// The standby connection, when one is ready.
    standby: Option<(BrokerConn, Target)>,
    /// The broker that last said it is going away, and when: no standby
    /// there for [`LEAVING`].
    leaving: Option<(std::net::SocketAddr, Instant)>,
    /// Problems for the site's timeline at the broker.
    problems: Problems,
    /// Packets from an HTTP/2 tunnel on their way to the device: those of
    /// one read of the stream are written together, TCP segments
    /// coalesced, as the HTTP/3 pump does (made for the device, with it).
    deliveries: Option<tether_shell::tun::DeviceBatch>,
}

/// The fields of `new` other than `lans` that differ from `old`: they
/// apply only when the agent starts.
fn needs_restart(old: &ClientConfig, new: &ClientConfig) -> Vec<&'static str> {
    // Destructured, so that a field added to the configuration is listed
    // here too.
    let ClientConfig {
        state_dir,
        published_cidr,
        brokers,
        lans: _,
        lan_source,
        services,
        forwards,
        tun_name,
        h3_timeout,
        keepalive,
        proxy,
        max_backoff,
    } = new;
    [
        ("state_dir", *state_dir != old.state_dir),
        ("published_cidr", *published_cidr != old.published_cidr),
        ("brokers", *brokers != old.brokers),
        ("lan_source", *lan_source != old.lan_source),
        (
            "services",
            *services != old.services || *forwards != old.forwards,
        ),
        ("tun.name", *tun_name != old.tun_name),
        ("transport.h3_timeout", *h3_timeout != old.h3_timeout),
        ("transport.keepalive", *keepalive != old.keepalive),
        ("transport.proxy", *proxy != old.proxy),
        ("transport.max_backoff", *max_backoff != old.max_backoff),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect()
}

/// How an attempt ended, for the core. A certificate the broker refused
/// as expired or revoked calls for re-attestation; so does any refusal
/// while the certificate has expired by this machine's clock (the
/// transport may not say which certificate was refused).
fn ending(f: Failure, state: &StateDir) -> Ending {
    let expired_here = || {
        state
            .credentials()
            .is_ok_and(|c| c.identity.not_after <= tether_pki::token::unix_secs(SystemTime::now()))
    };
    if f.certificate.is_some() || (f.refused && expired_here()) {
        Ending::CertificateRefused(f.message)
    } else if f.refused {
        Ending::Refused(f.message)
    } else {
        Ending::Lost(f.message)
    }
}

/// Runs the agent until `shutdown` becomes true.
pub async fn run(
    config: ClientConfig,
    state: StateDir,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (_reload, reloads) = mpsc::unbounded_channel();
    run_reporting(config, state, shutdown, Reporter::new().0, reloads).await
}

/// Runs the agent until `shutdown` becomes true, publishing the tunnel's
/// state to `health`. Each configuration from `reloads` (the file read
/// again on SIGHUP) applies its `lans` without a restart; the other fields
/// wait for the next start, and a configuration that does not validate is
/// refused, logged and reported, the running one staying in force.
pub async fn run_reporting(
    config: ClientConfig,
    state: StateDir,
    mut shutdown: watch::Receiver<bool>,
    health: Reporter,
    mut reloads: mpsc::UnboundedReceiver<Reload>,
) -> anyhow::Result<()> {
    // Fail early, with the reason, if the site is not enrolled or the proxy
    // setting is unusable.
    let first = state.credentials()?;
    let proxy = Proxy::from_config_or_env(config.proxy.as_deref())?;
    tracing::info!(site = %first.identity.site, region = %first.identity.region, "starting");
    if let Some(p) = &proxy {
        tracing::info!(proxy = %p, from = %p.source, "an HTTP proxy is available as the last resort");
    }
    let mut core = AgentCore::new(
        AgentConfig {
            proxy: proxy.is_some(),
            remembered: state.last_transport(),
            backoff_base: BACKOFF_BASE,
            backoff_max: config.max_backoff,
            seed: rand::random(),
            lans: config.lans.clone(),
        },
        Instant::now(),
    );
    let (inputs, mut rx) = mpsc::unbounded_channel();
    let problems = Problems::default();
    let (found, exposed) = mpsc::unbounded_channel();
    let resolver = (!config.forwards.is_empty())
        .then(|| crate::expose::Resolver::start(config.forwards.clone(), found));
    let nat = SiteTable::new(&config.tun_name);
    let mut shell = Shell {
        config: Arc::new(config),
        state,
        proxy,
        tun: None,
        preparing: None,
        session: None,
        dialing: None,
        probed: None,
        epoch: 0,
        lan: Arc::new(LanPath::reporting(problems.clone())),
        nat,
        resolver,
        exposed,
        inputs,
        health,
        last_broker: None,
        narrow_paths: NarrowPaths::default(),
        standby: None,
        leaving: None,
        problems,
        deliveries: None,
    };
    if *shutdown.borrow() {
        core.handle_shutdown(Instant::now());
    }
    let mut watching = true;
    loop {
        loop {
            while let Some(event) = core.poll_event() {
                shell.report(event);
            }
            match core.poll_action() {
                Some(action) => shell.act(action, &mut core).await?,
                None => {
                    shell.flush_deliveries().await;
                    break;
                }
            }
        }
        if core.is_stopped() {
            break;
        }
        let wake = shell
            .wait(
                &mut rx,
                &mut reloads,
                &mut shutdown,
                &mut watching,
                core.poll_timeout(),
            )
            .await;
        let now = Instant::now();
        match wake {
            Wake::Shutdown => core.handle_shutdown(now),
            Wake::Timer => core.handle_timeout(now),
            Wake::Data(data) => core.handle_tunnel_data(&data, now),
            Wake::Ended(f) => core.handle_session_ended(ending(f, &shell.state), now),
            Wake::Input(epoch, input) if epoch == shell.epoch || input.is_standby() => {
                shell.answer(*input, &mut core)
            }
            Wake::GoAway => {
                if let Some(s) = shell.session.as_mut() {
                    s.goaway_seen = true;
                    shell.leaving = Some((s.target.addr, now));
                }
                core.handle_goaway(now)
            }
            Wake::StandbyLost => {
                if let Some((_, target)) = shell.standby.take() {
                    tracing::info!(standby = %target.addr, "the standby connection ended");
                }
                shell.health.standby(None);
                core.handle_standby_lost(now)
            }
            Wake::Reload(reload) => shell.reload(*reload, &mut core, now),
            Wake::Expose(update) => shell.expose(update),
            Wake::Input(..) | Wake::Nothing => {}
        }
        shell.health.moves(core.failovers(), core.handovers());
    }
    tracing::info!("stopped; the tunnel device is removed");
    drop(shell);
    Ok(())
}

impl Shell {
    /// Waits for the next thing that happens.
    async fn wait(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<(u64, Input)>,
        reloads: &mut mpsc::UnboundedReceiver<Reload>,
        shutdown: &mut watch::Receiver<bool>,
        watching: &mut bool,
        deadline: Option<Instant>,
    ) -> Wake {
        let timer = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let session = async {
            match self.session.as_mut() {
                Some(Session {
                    conn,
                    tunnel: Some(tunnel),
                    goaway_seen,
                    ..
                }) => tokio::select! {
                    data = tunnel.read() => match data {
                        Ok(Some(d)) => Wake::Data(d),
                        Ok(None) => Wake::Ended(Failure::lost("the broker ended the tunnel")),
                        Err(e) => Wake::Ended(
                            conn_failure(conn).await.unwrap_or_else(|| Failure::lost(e)),
                        ),
                    },
                    f = conn.closed() => Wake::Ended(f),
                    _ = conn.goaway(), if !*goaway_seen => Wake::GoAway,
                },
                _ => std::future::pending().await,
            }
        };
        let standby = async {
            match &self.standby {
                Some((conn, _)) => {
                    conn.closed().await;
                    Wake::StandbyLost
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            wake = session => wake,
            wake = standby => wake,
            Some((epoch, input)) = rx.recv() => Wake::Input(epoch, Box::new(input)),
            Some(reload) = reloads.recv() => Wake::Reload(Box::new(reload)),
            Some(update) = self.exposed.recv(), if self.resolver.is_some() => Wake::Expose(update),
            _ = timer => Wake::Timer,
            changed = shutdown.changed(), if *watching => match changed {
                Ok(()) if *shutdown.borrow() => Wake::Shutdown,
                Ok(()) => Wake::Nothing,
                // Nobody can ask any more.
                Err(_) => {
                    *watching = false;
                    Wake::Nothing
                }
            },
        }
    }

    /// Applies a configuration read again: its `lans` now, over the
    /// session in place; the other fields at the next start.
    fn reload(&mut self, reload: Reload, core: &mut AgentCore, now: Instant) {
        // The names of forwarded services' targets are resolved again on
        // every SIGHUP, whatever the file says.
        if let Some(r) = &self.resolver {
            r.resolve_now();
        }
        let new = match reload {
            Ok(config) => config,
            Err(e) => {
                let why =
                    format!("configuration not reloaded, the running one stays in force: {e}");
                tracing::error!("{why}");
                self.problems.push(ProblemKind::Reload, why);
                return;
            }
        };
        let waiting = needs_restart(&self.config, &new);
        if !waiting.is_empty() {
            tracing::warn!(
                "configuration reloaded: changes to {} take effect at the next start of `tether up` (only `lans` applies on reload)",
                waiting.join(", ")
            );
        }
        if let Err(e) = self
            .state
            .check_lans(&new.lans, "the configuration read again")
        {
            let why = format!(
                "configuration not reloaded, the running one stays in force: {}",
                format!("{e:#}")
                    .lines()
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            tracing::error!("{why}");
            self.problems.push(ProblemKind::Reload, why);
            return;
        }
        if new.lans == self.config.lans {
            tracing::info!(
                lans = new.lans.len(),
                "configuration reloaded: the LANs are unchanged"
            );
            return;
        }
        let mut applied = (*self.config).clone();
        applied.lans = new.lans;
        self.config = Arc::new(applied);
        core.handle_lans_changed(self.config.lans.clone(), now);
    }

    /// Makes `conn` to `target` the site's session and tells the core.
    fn adopt(&mut self, conn: BrokerConn, target: Target, core: &mut AgentCore, now: Instant) {
        let transport = conn.transport();
        self.health
            .connected(&target.addr.to_string(), transport.describe());
        self.session = Some(Session::new(conn, target));
        core.handle_connected(transport, now);
    }

    /// Feeds a task's result into the core.
    fn answer(&mut self, input: Input, core: &mut AgentCore) {
        let now = Instant::now();
        match input {
            Input::Dialed(Ok((conn, target))) => {
                self.last_broker = Some(target.endpoint.clone());
                self.adopt(conn, target, core, now);
            }
            Input::Dialed(Err(f)) => {
                crate::clock::dial_failed(&self.problems, &f);
                core.handle_dial_failed(ending(f, &self.state), now)
            }
            Input::Opened(Ok((tunnel, link))) => {
                if let Some(s) = self.session.as_mut() {
                    if let Some(tun) = &self.tun {
                        s.tasks.extend(start_pumps(tun, &link, &self.lan));
                    }
                    s.tunnel = Some(tunnel);
                    s.link = Some(link);
                    // Learn the region's brokers while the session lives.
                    s.tasks.push(tokio::spawn(crate::brokers::follow(
                        s.conn.clone(),
                        s.target.endpoint.to_string(),
                        self.state.clone(),
                    )));
                    s.tasks.push(tokio::spawn(crate::report::send(
                        s.conn.clone(),
                        s.target.endpoint.to_string(),
                        self.problems.clone(),
                    )));
                    s.tasks.push(check_clock(
                        s.conn.clone(),
                        s.target.endpoint.to_string(),
                        self.problems.clone(),
                    ));
                }
                self.health.tunnel_open();
                core.handle_tunnel_opened(lifetime(&self.state), now);
            }
            Input::Opened(Err(f)) => core.handle_session_ended(ending(f, &self.state), now),
            Input::Renewed(result) => core.handle_renewal_result(result, now),
            Input::Reattested(result) => core.handle_reattest_result(result, now),
            Input::Probed(conn) => {
                let answered = conn.is_some();
                let target = self.session.as_ref().map(|s| s.target.clone());
                self.probed = conn.zip(target);
                core.handle_probe_result(answered, now);
            }
            Input::Standby(result) => {
                let ok = result.is_ok();
                match result {
                    Ok(standby) => self.standby = Some(standby),
                    Err(f) => tracing::debug!("no standby connection: {f}"),
                }
                core.handle_standby_result(ok, now);
                if core.standby_ready() {
                    let target = self.standby.as_ref().map(|(_, t)| t.addr);
                    if let Some(addr) = target {
                        tracing::info!(standby = %addr, "standby connection ready");
                        self.health.standby(Some(addr.to_string()));
                    }
                } else if let Some((conn, _)) = self.standby.take() {
                    // The core no longer wants it.
                    conn.close("standby no longer needed");
                }
            }
            Input::Redialed(result) => {
                let conn = match result {
                    Ok(conn) => Some(conn),
                    Err(f) => {
                        tracing::warn!(
                            "cannot connect again with the renewed certificate, reconnecting: {f}"
                        );
                        None
                    }
                };
                if core.handle_redial_result(conn.is_some(), now) {
                    // The connection the tunnel is handed over to.
                    if let Some((old, _)) = std::mem::replace(&mut self.standby, conn) {
                        old.close("standby no longer needed");
                    }
                } else if let Some((conn, _)) = conn {
                    conn.close("no longer needed");
                }
            }
            Input::HandedOver(result) => match *result {
                Ok((mut session, life)) => {
                    if let (Some(tun), Some(link)) = (&self.tun, &session.link) {
                        session.tasks.extend(start_pumps(tun, link, &self.lan));
                    }
                    session.tasks.push(tokio::spawn(crate::brokers::follow(
                        session.conn.clone(),
                        session.target.endpoint.to_string(),
                        self.state.clone(),
                    )));
                    session.tasks.push(tokio::spawn(crate::report::send(
                        session.conn.clone(),
                        session.target.endpoint.to_string(),
                        self.problems.clone(),
                    )));
                    session.tasks.push(check_clock(
                        session.conn.clone(),
                        session.target.endpoint.to_string(),
                        self.problems.clone(),
                    ));
                    self.last_broker = Some(session.target.endpoint.clone());
                    self.health.connected(
                        &session.target.addr.to_string(),
                        session.conn.transport().describe(),
                    );
                    self.health.tunnel_open();
                    self.health.standby(None);
                    if let Some(old) = self.session.replace(session) {
                        self.retire(old);
                    }
                    self.epoch += 1;
                    core.handle_handover_result(Ok(()), life, now);
                }
                Err(f) => {
                    self.health.standby(None);
                    core.handle_handover_result(Err(ending(f, &self.state)), None, now)
                }
            },
        }
    }

    /// Lets the old session of a handover go: its device-to-tunnel pump
    /// stops at once (the new session's took over), while packets its
    /// broker still sends reach the device until that broker closes the
    /// connection or [`RETIRE_AFTER`] passes.
    fn retire(&self, mut old: Session) {
        for t in old.tasks.drain(..) {
            t.abort();
        }
        let inbound = match (&self.tun, &old.link) {
            (Some(tun), Some(link)) => crate::pumps::start_inbound(tun, link, &self.lan),
            _ => None,
        };
        tokio::spawn(async move {
            let _ = tokio::time::timeout(RETIRE_AFTER, old.conn.closed()).await;
            if let Some(t) = inbound {
                t.abort();
            }
            old.conn.close("moved to another broker");
            old.conn.drain().await;
        });
    }

    /// Logs what the core reports.
    fn report(&self, event: Event) {
        let broker = self.session.as_ref().map(|s| s.target.addr.to_string());
        let broker = broker.as_deref().unwrap_or("-");
        match event {
            Event::Moved {
                transport,
                moved: Move::Fallback,
            } => tracing::warn!(
                broker,
                "fell back to {}: the better transports did not answer",
                transport.describe()
            ),
            Event::Moved { transport, .. } => {
                tracing::info!(broker, "moved up to {}", transport.describe())
            }
            Event::Connected(transport) => tracing::info!(
                broker,
                "connected to the broker over {}",
                transport.describe()
            ),
            Event::DialFailed(e) => {
                let why = format!("cannot reach any broker: {}", e.message());
                self.health.down(&why, matches!(e, Ending::Refused(_)));
                tracing::warn!("{why}")
            }
            Event::SessionEnded(Ending::Lost(why)) => {
                let why = format!("lost the connection to the broker: {why}");
                self.health.down(&why, false);
                tracing::warn!(broker, "{why}")
            }
            Event::SessionEnded(Ending::Refused(why) | Ending::CertificateRefused(why)) => {
                let why = format!("the broker refused the tunnel: {why}");
                self.health.down(&why, true);
                tracing::error!(broker, "{why}")
            }
            Event::Reattesting => tracing::info!(
                "asking the broker to renew this site's certificate on the proof of its key (re-attestation)"
            ),
            Event::Reattested => tracing::info!(
                "the broker renewed this site's certificate by re-attestation; reconnecting with it"
            ),
            Event::ReattestFailed {
                failure: ReattestFailure::Refused(why),
                retry_in,
            } => tracing::error!(
                "the broker refused to renew this site's certificate: {why} (asking again in {} minutes)",
                retry_in.as_secs() / 60
            ),
            Event::ReattestFailed {
                failure: ReattestFailure::Lost(why),
                retry_in,
            } => tracing::warn!(
                "re-attestation failed, retrying in {:.1} s: {why}",
                retry_in.as_secs_f64()
            ),
            Event::Renewed => tracing::info!(
                "certificate renewed; moving the tunnel to a connection made with it"
            ),
            Event::MovedToRenewed(transport) => tracing::info!(
                broker,
                "the tunnel moved to a connection with the renewed certificate over {} before the old one was left",
                transport.describe()
            ),
            Event::RenewalFailed { error, retry_in } => {
                let why = format!(
                    "certificate renewal failed, retrying in {} minutes: {error}",
                    retry_in.as_secs() / 60
                );
                tracing::warn!("{why}");
                self.problems.push(ProblemKind::Other, why);
            }
            Event::Upgrading(_) => {
                tracing::info!(broker, "HTTP/3 answers again; moving the tunnel back to it")
            }
            Event::Denied { request_id } => {
                tracing::warn!(request_id, "the broker denied an address request")
            }
            Event::LanDenied { lan } => {
                tracing::warn!(
                    %lan,
                    "the broker denied a mapping for the LAN: it stays unreachable"
                );
                self.problems.push(
                    ProblemKind::LanRefused,
                    format!("the broker denied a mapping for the LAN {lan}: it stays unreachable"),
                );
            }
            Event::LanMapped(mappings) => {
                for m in mappings {
                    tracing::info!(lan = %m.real, mapped = %m.mapped, "LAN mapped");
                }
            }
            Event::LansChanged { added, removed } => {
                let list = |l: &[ipnet::IpNet]| {
                    l.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                tracing::info!(
                    added = list(&added),
                    removed = list(&removed),
                    "configuration reloaded: LANs added are mapped over the open tunnel, LANs removed are withdrawn"
                );
            }
            Event::LanMapUnusable(e) => {
                tracing::error!("the broker's LAN mapping cannot be used: {e}");
                self.problems.push(
                    ProblemKind::LanMapping,
                    format!("the broker's LAN mapping cannot be used: {e}"),
                );
            }
            Event::Retrying(delay) => {
                tracing::info!("retrying in {:.1} s", delay.as_secs_f64())
            }
            Event::FailingOver => tracing::warn!(
                broker,
                "moving the tunnel to the standby connection's broker"
            ),
            Event::GoingAway { standby_ready } => tracing::info!(
                broker,
                standby_ready,
                "the broker is going away; moving the tunnel to another broker"
            ),
            Event::HandedOver(transport) => tracing::info!(
                broker,
                "the tunnel moved to this broker over {} before the old one was left",
                transport.describe()
            ),
            Event::HandoverFailed(e) => tracing::warn!(
                broker,
                "could not move the tunnel to the standby broker, staying: {}",
                e.message()
            ),
            Event::StandbyReady => {}
        }
    }

    /// Starts a task whose result comes back as an input of this epoch.
    fn spawn(&self, task: impl Future<Output = Input> + Send + 'static) -> JoinHandle<()> {
        let (inputs, epoch) = (self.inputs.clone(), self.epoch);
        tokio::spawn(async move {
            let _ = inputs.send((epoch, task.await));
        })
    }

    /// Writes the packets [`Action::Deliver`] gathered.
    async fn flush_deliveries(&mut self) {
        if let (Some(tun), Some(batch)) = (&self.tun, &mut self.deliveries) {
            let _ = batch.write(&tun.dev).await;
        }
    }

    /// Carries out one action of the core.
    async fn act(&mut self, action: Action, core: &mut AgentCore) -> anyhow::Result<()> {
        // Packets go to the device before whatever comes after them.
        if !matches!(action, Action::Deliver(_)) {
            self.flush_deliveries().await;
        }
        match action {
            Action::Dial { order } => {
                self.health.connecting();
                let dialer = self.dialer()?;
                self.epoch += 1;
                let config = Arc::new(crate::brokers::dial_config(
                    &self.config,
                    &self.state,
                    self.last_broker.as_ref(),
                ));
                self.dialing =
                    Some(self.spawn(async move {
                        Input::Dialed(dialer.connect(&config, &order).await)
                    }));
            }
            Action::PrepareTun { mtu } => {
                if self.tun.is_none() && self.preparing.is_none() {
                    // On a thread of its own: the dial just started goes on
                    // meanwhile.
                    let name = self.config.tun_name.clone();
                    self.preparing =
                        Some(tokio::task::spawn_blocking(move || Tun::create(&name, mtu)));
                }
            }
            Action::SaveTransport(transport) => self.state.save_transport(transport),
            Action::OpenTunnel => {
                let Some(s) = &self.session else {
                    return Ok(());
                };
                let (conn, authority) = (s.conn.clone(), s.target.endpoint.to_string());
                let timeout = self.config.h3_timeout.max(Duration::from_secs(5));
                let services = self.config.services.clone();
                let task = self.spawn(async move {
                    Input::Opened(conn.open_tunnel(&authority, timeout, &services).await)
                });
                self.tasks(task);
            }
            Action::CheckMtu => {
                let link = self.session.as_ref().and_then(|s| s.link.as_ref());
                let tun = self.tun.as_ref().map(Tun::mtu);
                core.handle_path_mtu(link.and_then(TunnelLink::mtu), tun, Instant::now());
            }
            Action::SetTunMtu(mtu) => {
                if let Some(tun) = self.tun.as_mut() {
                    // Rare (a change of transport) and it changes what
                    // crosses the tunnel: an operator must see it.
                    tracing::info!(from = tun.mtu(), to = mtu, "tunnel device MTU changed");
                    if let Err(e) = tun.set_mtu(mtu) {
                        tracing::warn!("{e:#}");
                        self.problems.push(
                            ProblemKind::Mtu,
                            format!("cannot set the tunnel MTU to {mtu}: {e:#}"),
                        );
                    }
                }
            }
            Action::ConfigureTun(change) => {
                if let Err(e) = self.configure(change).await {
                    tracing::error!("{e:#}");
                    self.problems.push(ProblemKind::Device, format!("{e:#}"));
                }
            }
            Action::Deliver(mut packet) => {
                if let Some(tun) = &self.tun
                    && self.lan.to_device(&self.lan.current(), &mut packet)
                {
                    let batch = self.deliveries.get_or_insert_with(|| tun.write_batch());
                    let _ = batch.push_or_write(&tun.dev, &packet).await;
                }
            }
            Action::SendCapsule(capsule) => {
                let mut bytes = Vec::new();
                if let Err(e) = capsule.encode(&mut bytes) {
                    tracing::error!("cannot encode a capsule: {e}");
                    return Ok(());
                }
                if let Some(Session {
                    tunnel: Some(tunnel),
                    link: Some(link),
                    ..
                }) = self.session.as_mut()
                    && let Err(e) = tunnel.send_capsule(link, bytes).await
                {
                    // The session's end is reported by its stream.
                    tracing::debug!("cannot send a capsule: {e}");
                }
            }
            Action::SetLanMap(map) => self.set_lan_map(map)?,
            Action::Renew => {
                let Some(s) = &self.session else {
                    return Ok(());
                };
                let (conn, target, state) = (s.conn.clone(), s.target.clone(), self.state.clone());
                let task = self.spawn(async move {
                    Input::Renewed(crate::enroll::renew(&conn, &state, &target).await.map_err(
                        |e| match e {
                            RenewError::CertificateRefused(m) => Ending::CertificateRefused(m),
                            RenewError::Failed(m) => Ending::Lost(m),
                        },
                    ))
                });
                self.tasks(task);
            }
            Action::Redial { transport } => {
                let Some(target) = self.session.as_ref().map(|s| s.target.clone()) else {
                    core.handle_redial_result(false, Instant::now());
                    return Ok(());
                };
                // Reads the renewed certificate.
                let dialer = self.dialer()?;
                let task = self.spawn(async move {
                    Input::Redialed(
                        dialer
                            .first(&[transport], std::slice::from_ref(&target), Vec::new())
                            .await,
                    )
                });
                self.tasks(task);
            }
            Action::Reattest => {
                let dialer =
                    Dialer::for_reattestation(&self.config, &self.state, self.proxy.clone())?
                        .remembering(self.narrow_paths.clone());
                self.epoch += 1;
                let (config, state) = (self.config.clone(), self.state.clone());
                let order = core.ladder().attempt_order();
                self.dialing = Some(self.spawn(async move {
                    Input::Reattested(reattest(&dialer, &config, &state, &order).await)
                }));
            }
            Action::Probe(transport) => self.probe(transport, core),
            Action::EndSession { close } => {
                if let Some(s) = self.session.take() {
                    if close {
                        s.conn.close("site shutting down");
                    }
                    for t in &s.tasks {
                        t.abort();
                    }
                    if close {
                        // Deliver the close, so the broker ends the session
                        // now rather than at its idle timeout.
                        s.conn.drain().await;
                    }
                }
            }
            Action::UseProbe => {
                self.epoch += 1;
                match self.probed.take() {
                    Some((conn, target)) => self.adopt(conn, target, core, Instant::now()),
                    None => core.handle_dial_failed(
                        Ending::Lost("the probe's connection is gone".into()),
                        Instant::now(),
                    ),
                }
            }
            Action::Stop => {
                if let Some(d) = self.dialing.take() {
                    d.abort();
                }
                if let Some((conn, _)) = self.standby.take() {
                    conn.close("site shutting down");
                }
            }
            Action::DialStandby { transport } => {
                let dialer = self.dialer()?;
                let config = crate::brokers::dial_config(&self.config, &self.state, None);
                let mut avoid: Vec<std::net::SocketAddr> =
                    self.session.iter().map(|s| s.target.addr).collect();
                avoid.extend(
                    self.leaving
                        .filter(|(_, at)| at.elapsed() < LEAVING)
                        .map(|(addr, _)| addr),
                );
                // Not tied to the session's epoch: the standby outlives it.
                let inputs = self.inputs.clone();
                tokio::spawn(async move {
                    let result = crate::standby::dial(&dialer, &config, transport, &avoid).await;
                    let _ = inputs.send((0, Input::Standby(result)));
                });
            }
            Action::DropStandby => {
                if let Some((conn, _)) = self.standby.take() {
                    conn.close("standby no longer needed");
                }
                self.health.standby(None);
            }
            Action::Heartbeat => {
                if let Some(s) = &self.session {
                    let conn = s.conn.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(HEARTBEAT_INTERVAL, conn.heartbeat()).await;
                    });
                }
            }
            Action::CheckLiveness => {
                if let Some(s) = &self.session {
                    core.handle_liveness(s.conn.received(), s.conn.rtt(), Instant::now());
                }
            }
            Action::UseStandby => {
                self.epoch += 1;
                self.health.standby(None);
                match self.standby.take() {
                    Some((conn, target)) => {
                        self.last_broker = Some(target.endpoint.clone());
                        self.adopt(conn, target, core, Instant::now());
                    }
                    None => core.handle_dial_failed(
                        Ending::Lost("the standby connection is gone".into()),
                        Instant::now(),
                    ),
                }
            }
            Action::Handover => {
                let Some((conn, target)) = self.standby.take() else {
                    core.handle_handover_result(
                        Err(Ending::Lost("the standby connection is gone".into())),
                        None,
                        Instant::now(),
                    );
                    return Ok(());
                };
                let timeout = self.config.h3_timeout.max(Duration::from_secs(5));
                let services = self.config.services.clone();
                let state = self.state.clone();
                let inputs = self.inputs.clone();
                tokio::spawn(async move {
                    let authority = target.endpoint.to_string();
                    let result = match conn.open_tunnel(&authority, timeout, &services).await {
                        Ok((tunnel, link)) => {
                            let mut session = Session::new(conn, target);
                            session.tunnel = Some(tunnel);
                            session.link = Some(link);
                            Ok((session, lifetime(&state)))
                        }
                        Err(f) => Err(f),
                    };
                    let _ = inputs.send((0, Input::HandedOver(Box::new(result))));
                });
            }
        }
        Ok(())
    }

    /// Translates with `map` from now on, with the kernel forwarding to the
    /// LANs and (by default) rewriting the source of what enters them.
    fn set_lan_map(&mut self, map: tether_proto::netmap::LanMap) -> anyhow::Result<()> {
        let lans: Vec<ipnet::IpNet> = map.mappings().iter().map(|m| m.real).collect();
        crate::lan::enable_forwarding(&lans)?;
        if self.config.lan_source == LanSource::Edge {
            self.nat.set_lans(&lans)?;
            tracing::info!(
                table = crate::lan::table_name(&self.config.tun_name),
                "tunnel traffic enters the LANs from this host's own address"
            );
        }
        self.lan.set(map);
        Ok(())
    }

    /// Forwards services as the resolver found their targets, or reports
    /// why one cannot be.
    fn expose(&mut self, update: crate::expose::Update) {
        let forwards = match update {
            crate::expose::Update::Unresolved(why) => {
                self.problems.push(ProblemKind::Other, why);
                return;
            }
            crate::expose::Update::Forwards(f) => f,
        };
        for f in &forwards {
            let what = format!("the target {} of port {}", f.to, f.port);
            if let Err(e) = crate::lan::enable_forwarding_to(f.to.is_ipv6(), &what) {
                let why = format!("{e:#}");
                tracing::error!("{why}");
                self.problems.push(ProblemKind::Other, why);
            }
        }
        match self.nat.set_forwards(&forwards) {
            Ok(()) => {
                let shown: Vec<String> = forwards
                    .iter()
                    .map(|f| format!("{} -> {}", f.port, f.to))
                    .collect();
                tracing::info!(
                    table = crate::lan::table_name(&self.config.tun_name),
                    "services forwarded into the edge cluster (port -> target): {}",
                    if shown.is_empty() {
                        "none yet".to_string()
                    } else {
                        shown.join(", ")
                    }
                );
            }
            Err(e) => {
                let why = format!("{e:#}");
                tracing::error!("{why}");
                self.problems.push(ProblemKind::Other, why);
            }
        }
    }

    /// A dialer with the site's current certificate (it reads a renewed
    /// one) and the paths this agent found narrow.
    fn dialer(&self) -> anyhow::Result<Dialer> {
        Ok(
            Dialer::for_site(&self.config, &self.state, self.proxy.clone())?
                .remembering(self.narrow_paths.clone()),
        )
    }

    fn tasks(&mut self, task: JoinHandle<()>) {
        match self.session.as_mut() {
            Some(s) => s.tasks.push(task),
            None => task.abort(),
        }
    }

    /// Dials `transport` to the current broker in the background.
    fn probe(&mut self, transport: Transport, core: &mut AgentCore) {
        let Some(target) = self.session.as_ref().map(|s| s.target.clone()) else {
            return;
        };
        let dialer = match self.dialer() {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!("cannot probe: {e:#}");
                core.handle_probe_result(false, Instant::now());
                return;
            }
        };
        let task = self.spawn(async move {
            match dialer.dial(transport, &target).await {
                Ok(c) => Input::Probed(Some(c)),
                Err(f) => {
                    tracing::debug!(broker = %target.addr, "HTTP/3 still unavailable: {f}");
                    Input::Probed(None)
                }
            }
        });
        self.tasks(task);
    }

    /// The device made ahead ([`Action::PrepareTun`]), given `mtu`; `None`
    /// if none was asked for or it could not be made (then the caller
    /// creates it and reports why it cannot).
    async fn take_prepared(&mut self, mtu: u16) -> Option<Tun> {
        let mut tun = match self.preparing.take()?.await {
            Ok(Ok(tun)) => tun,
            Ok(Err(e)) => {
                tracing::debug!("the device could not be made ahead: {e:#}");
                return None;
            }
            Err(e) => {
                tracing::debug!("the device could not be made ahead: {e}");
                return None;
            }
        };
        // A smaller MTU than the link's stays safe: only a warning.
        if let Err(e) = tun.set_mtu(mtu) {
            tracing::warn!("{e:#}");
        }
        Some(tun)
    }

    /// Changes the device as the broker's capsules say.
    async fn configure(&mut self, change: TunConfig) -> anyhow::Result<()> {
        match change {
            TunConfig::Addresses {
                addresses,
                create_mtu,
            } => {
                // Before the device (and its pumps) exist: the pumps write
                // only packets for these addresses and the mapped LANs.
                self.lan.set_assigned(&addresses);
                if self.tun.is_none() {
                    let created = match self.take_prepared(create_mtu).await {
                        Some(prepared) => prepared,
                        None => Tun::create(&self.config.tun_name, create_mtu)?,
                    };
                    if let Some(s) = self.session.as_mut()
                        && let Some(link) = &s.link
                    {
                        s.tasks.extend(start_pumps(&created, link, &self.lan));
                    }
                    self.tun = Some(created);
                }
                if let Some(tun) = self.tun.as_mut() {
                    tun.set_addresses(&addresses)?;
                    // Mapped LAN prefixes are not this host's addresses.
                    let shown: Vec<String> = addresses
                        .iter()
                        .filter(|a| a.prefix_len() == a.max_prefix_len())
                        .map(|a| a.addr().to_string())
                        .collect();
                    tracing::info!(
                        device = tun.name(),
                        "this site is reachable as {}",
                        shown.join(" and ")
                    );
                    self.health.addresses(shown);
                    let overlay: Vec<std::net::IpAddr> = addresses
                        .iter()
                        .filter(|a| a.prefix_len() == a.max_prefix_len())
                        .map(|a| a.addr())
                        .collect();
                    if let Err(e) = self.nat.set_overlay(&overlay) {
                        let why = format!("{e:#}");
                        tracing::error!("{why}");
                        self.problems.push(ProblemKind::Other, why);
                    }
                }
            }
            TunConfig::Routes(routes) => {
                // Kept for checking the LANs of the next start or reload.
                self.state.save_tunnel_routes(&routes);
                if let Err(e) = tether_config::client::check_lans_against_tunnel(
                    &self.config.lans,
                    &routes,
                    "the running configuration",
                ) {
                    let why = format!(
                        "the broker now routes through the tunnel addresses of a configured LAN; fix the configuration: {}",
                        e.to_string()
                            .lines()
                            .map(str::trim)
                            .collect::<Vec<_>>()
                            .join(" ")
                    );
                    tracing::error!("{why}");
                    self.problems.push(ProblemKind::LanMapping, why);
                }
                let (Some(tun), Some(s)) = (self.tun.as_mut(), self.session.as_ref()) else {
                    return Ok(());
                };
                let skipped = tun.set_routes(&routes, &[s.target.addr.ip()]).await?;
                tracing::info!(
                    count = routes.len() - skipped.len(),
                    "routes to the cloud installed"
                );
                tracing::debug!(?routes, "routes");
                if !skipped.is_empty() {
                    tracing::warn!(
                        ?skipped,
                        "routes covering the broker's own address were not installed"
                    );
                }
            }
        }
        Ok(())
    }
}

impl Session {
    fn new(conn: BrokerConn, target: Target) -> Self {
        Self {
            conn: Arc::new(conn),
            target,
            tunnel: None,
            link: None,
            tasks: Vec::new(),
            goaway_seen: false,
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Connects without a client certificate and asks for re-attestation.
async fn reattest(
    dialer: &Dialer,
    config: &ClientConfig,
    state: &StateDir,
    order: &[Transport],
) -> Result<(), ReattestFailure> {
    let (conn, target) = dialer
        .connect(config, order)
        .await
        .map_err(|f| ReattestFailure::Lost(f.message))?;
    let result = crate::enroll::reattest(&conn, state, &target, true).await;
    conn.close("re-attested");
    conn.drain().await;
    match result {
        Ok(_) => Ok(()),
        Err(crate::enroll::ReattestError::Refused { message, .. }) => {
            Err(ReattestFailure::Refused(message))
        }
        Err(crate::enroll::ReattestError::Failed(why)) => Err(ReattestFailure::Lost(why)),
    }
}

/// The connection's own failure, if it has already failed (the better
/// explanation when a stream fails).
async fn conn_failure(conn: &BrokerConn) -> Option<Failure> {
    tokio::time::timeout(Duration::from_millis(100), conn.closed())
        .await
        .ok()
}

/// Measures this host's clock against the broker's on a new session, and
/// reports it when wrong.
fn check_clock(conn: Arc<BrokerConn>, authority: String, problems: Problems) -> JoinHandle<()> {
    tokio::spawn(async move {
        let clock = tether_pki::tls::ShiftedClock(0);
        crate::clock::check(&conn, &authority, &problems, &clock).await;
    })
}

/// The certificate's lifetime on this host's clock: its span (the
/// broker's notBefore, backdated by the CA's allowance, to notAfter)
/// counted from when this host stored it, so that a wrong clock here does
/// not move renewal.
fn lifetime(state: &StateDir) -> Option<Lifetime> {
    let creds = state.credentials().ok()?;
    let Identity {
        issued_at,
        not_after,
        ..
    } = creds.identity;
    let (not_before, _) = tether_pki::tls::validity(creds.chain.first()?).ok()?;
    let issued =
        tether_pki::token::unix_secs(not_before) + tether_pki::ca::CLOCK_SKEW_ALLOWANCE.as_secs();
    Some(Lifetime::measured(
        issued,
        not_after,
        issued_at,
        tether_pki::token::unix_secs(SystemTime::now()),
    ))
}

#[cfg(test)]
mod reload_tests {
    use super::*;
    use tether_config::client::ClientFile;

    fn config(text: &str) -> ClientConfig {
        ClientFile::parse(text, "t")
            .and_then(|f| f.validate("t"))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn only_fields_other_than_lans_wait_for_a_restart() {
        let old = config("lans = [\"192.168.1.0/24\"]");
        let lans = config("lans = [\"192.168.1.0/24\", \"10.1.0.0/16\"]");
        assert!(needs_restart(&old, &lans).is_empty());
        let more = config("lans = [\"10.1.0.0/16\"]\n[tun]\nname = \"tether9\"");
        assert_eq!(needs_restart(&old, &more), ["tun.name"]);
    }
}
