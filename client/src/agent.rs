//! `tether up`: keep this site connected.
//!
//! The agent climbs a transport ladder ([`Ladder`]): HTTP/3 over QUIC, then
//! HTTP/2 over TCP, then HTTP/2 through an HTTP proxy when one is
//! configured (or given by `HTTPS_PROXY`). It starts on the rung that last
//! worked, and while on a lower rung it probes HTTP/3 every
//! [`PROBE_INTERVAL`] and moves up as soon as it answers. On whichever rung,
//! it opens CONNECT-IP, configures the TUN device from the broker's
//! capsules, and moves packets between the device and the tunnel. When the
//! connection is lost it reconnects with jittered exponential backoff; the
//! broker gives it the same address again, and the device (with its
//! addresses and routes) stays in place meanwhile. It renews its
//! certificate at half its lifetime over the tunnel and reconnects with the
//! new one.

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use tether_config::client::ClientConfig;
use tether_proto::agent::{Backoff, ClientEvent, ClientSession, Ladder, Move, PROBE_INTERVAL};
use tether_proto::api::{ApiError, RENEW_PATH, RenewRequest, RenewResponse};
use tether_proto::capsule::{Capsule, CapsuleDecoder};
use tether_proto::datagram::{self, Payload};
use tether_proto::ip::{self, IcmpError, Packet};
use tether_proto::net::Family;
use tether_proto::tunnel::Transport;
use tokio::sync::watch;

use crate::dial::{self, Target};
use crate::failure::Failure;
use crate::h3client::quic_config;
use crate::link::{BrokerConn, Dialer, Link};
use crate::proxy::Proxy;
use crate::state::{Identity, StateDir};
use crate::tun::Tun;
use tether_shell::quic::transport_config;

/// Why a session ended.
enum End {
    /// Asked to stop.
    Shutdown,
    /// A new certificate is in place; reconnect with it.
    Renewed,
    /// A better transport answered: continue on this connection.
    Upgrade(Box<(BrokerConn, Target)>),
    /// The connection was lost.
    Lost(String),
    /// The broker refused the tunnel.
    Refused(String),
}

impl From<Failure> for End {
    fn from(f: Failure) -> Self {
        if f.refused {
            End::Refused(f.message)
        } else {
            End::Lost(f.message)
        }
    }
}

/// Runs the agent until `shutdown` becomes true.
pub async fn run(
    config: ClientConfig,
    state: StateDir,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // Fail early, with the reason, if the site is not enrolled or the proxy
    // setting is unusable.
    let first = state.credentials()?;
    let proxy = Proxy::from_config_or_env(config.proxy.as_deref())?;
    tracing::info!(site = %first.identity.site, region = %first.identity.region, "starting");
    if let Some(p) = &proxy {
        tracing::info!(proxy = %p, from = %p.source, "an HTTP proxy is available as the last resort");
    }
    let mut ladder = Ladder::new(proxy.is_some(), state.last_transport());
    let mut backoff = Backoff::new(
        Duration::from_millis(500),
        config.max_backoff,
        rand::random(),
    );
    let mut tun: Option<Tun> = None;
    let mut ready: Option<(BrokerConn, Target)> = None;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let started = Instant::now();
        let connected = match ready.take() {
            Some(c) => Ok(c),
            None => {
                let dialer = dialer(&config, &state, proxy.clone())?;
                connect(&config, &dialer, &ladder).await
            }
        };
        let end = match connected {
            Ok((conn, target)) => {
                let transport = conn.transport();
                match ladder.connected(transport) {
                    Move::Fallback => tracing::warn!(
                        broker = %target.addr,
                        "fell back to {}: the better transports did not answer",
                        transport.describe()
                    ),
                    Move::Upgrade => tracing::info!(
                        broker = %target.addr,
                        "moved up to {}",
                        transport.describe()
                    ),
                    Move::Stay => {}
                }
                state.save_transport(transport);
                let end = session(
                    &conn,
                    &target,
                    &mut tun,
                    &config,
                    &state,
                    &ladder,
                    proxy.clone(),
                    &mut shutdown,
                )
                .await;
                if matches!(end, End::Shutdown) {
                    // Deliver the close, so the broker ends the session now
                    // rather than at its idle timeout.
                    conn.drain().await;
                }
                match &end {
                    End::Lost(why) => {
                        tracing::warn!(broker = %target.addr, "lost the connection to the broker: {why}")
                    }
                    End::Refused(why) => {
                        tracing::error!(broker = %target.addr, "the broker refused the tunnel: {why}")
                    }
                    End::Renewed => tracing::info!("reconnecting with the renewed certificate"),
                    End::Upgrade(_) | End::Shutdown => {}
                }
                end
            }
            Err(f) => {
                tracing::warn!("cannot reach any broker: {f}");
                End::from(f)
            }
        };
        match end {
            End::Shutdown => break,
            End::Renewed => continue,
            End::Upgrade(next) => {
                ready = Some(*next);
                continue;
            }
            End::Lost(_) | End::Refused(_) => {}
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        tracing::info!("retrying in {:.1} s", delay.as_secs_f64());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => {}
        }
    }
    tracing::info!("stopped; the tunnel device is removed");
    drop(tun);
    Ok(())
}

/// A dialer with the site's current certificate.
fn dialer(config: &ClientConfig, state: &StateDir, proxy: Option<Proxy>) -> anyhow::Result<Dialer> {
    let creds = state.credentials()?;
    let tls = tether_pki::tls::client_config(&creds.ca, Some((creds.chain, creds.key)))?;
    // Silence for two keepalive intervals (and a margin) means the broker
    // is gone; a restarted broker resets the connection sooner.
    let quic = quic_config(
        tls.clone(),
        transport_config(
            config.keepalive,
            config.keepalive * 2 + Duration::from_secs(2),
        ),
    )?;
    Ok(Dialer {
        tls,
        quic,
        proxy,
        timeout: config.h3_timeout,
        keepalive: config.keepalive,
    })
}

/// Connects to the first broker that answers, climbing the ladder: every
/// broker on one rung before the next rung.
async fn connect(
    config: &ClientConfig,
    dialer: &Dialer,
    ladder: &Ladder,
) -> Result<(BrokerConn, Target), Failure> {
    let mut targets = Vec::new();
    let mut errors = Vec::new();
    for endpoint in &config.brokers {
        match dial::resolve(endpoint, config.published_cidr).await {
            Ok(t) => targets.extend(t),
            Err(e) => errors.push(e.to_string()),
        }
    }
    dialer
        .first(&ladder.attempt_order(), &targets, errors)
        .await
}

#[allow(clippy::too_many_arguments)]
async fn session(
    conn: &BrokerConn,
    target: &Target,
    tun: &mut Option<Tun>,
    config: &ClientConfig,
    state: &StateDir,
    ladder: &Ladder,
    proxy: Option<Proxy>,
    shutdown: &mut watch::Receiver<bool>,
) -> End {
    let transport = conn.transport();
    let authority = target.endpoint.to_string();
    let (mut tunnel, link) = match conn
        .open_tunnel(
            &authority,
            config.h3_timeout.max(Duration::from_secs(5)),
            &config.services,
        )
        .await
    {
        Ok(t) => t,
        Err(f) => return End::from(f),
    };
    tracing::info!(broker = %target.addr, "connected to the broker over {}", transport.describe());

    let mut core = ClientSession::default();
    let mut capsules = CapsuleDecoder::default();
    let mut pumps: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut mtu_tick = tokio::time::interval(Duration::from_secs(2));
    let renew_at = renewal_deadline(state);
    let renewal = tokio::time::sleep(renew_at);
    tokio::pin!(renewal);
    if let Some(tun) = tun.as_ref() {
        pumps.extend(start_pumps(tun, &link));
    }
    // On a lower rung, HTTP/3 is probed in the background.
    let probing = ladder.probe(transport).is_some();
    let mut probe_tick =
        tokio::time::interval_at(tokio::time::Instant::now() + PROBE_INTERVAL, PROBE_INTERVAL);
    let (probe_tx, mut probe_rx) = tokio::sync::mpsc::channel::<BrokerConn>(1);
    let mut probe: Option<tokio::task::JoinHandle<()>> = None;

    let end = loop {
        tokio::select! {
            data = tunnel.read() => {
                let data = match data {
                    Ok(Some(d)) => d,
                    Ok(None) => break End::Lost("the broker ended the tunnel".into()),
                    Err(e) => break match conn_failure(conn).await {
                        Some(f) => End::from(f),
                        None => End::Lost(e),
                    },
                };
                capsules.push(&data);
                let mut events = Vec::new();
                let mut failure = None;
                loop {
                    match capsules.next_capsule() {
                        Ok(Some(raw)) => match Capsule::parse(raw) {
                            Ok(c) => events.extend(core.on_capsule(c)),
                            Err(e) => {
                                failure = Some(e.to_string());
                                break;
                            }
                        },
                        Ok(None) => break,
                        Err(e) => {
                            failure = Some(e.to_string());
                            break;
                        }
                    }
                }
                if let Some(f) = failure {
                    break End::Lost(format!("protocol error from the broker: {f}"));
                }
                for event in events {
                    if let Err(e) = apply(event, tun, &config.tun_name, &link, target, &mut pumps).await {
                        tracing::error!("{e:#}");
                    }
                }
            }
            _ = mtu_tick.tick() => {
                if let (Some(tun), Some(mtu)) = (tun.as_mut(), link.mtu()) {
                    let has_v6 = core.host_address(Family::V6).is_some();
                    let mtu = if has_v6 { mtu.max(1280) } else { mtu.max(576) };
                    if mtu != tun.mtu() {
                        tracing::debug!(mtu, "tunnel MTU changed");
                        if let Err(e) = tun.set_mtu(mtu) {
                            tracing::warn!("{e:#}");
                        }
                    }
                }
            }
            _ = &mut renewal => {
                match renew(conn, state, target).await {
                    Ok(()) => break End::Renewed,
                    Err(e) => {
                        tracing::warn!("certificate renewal failed, retrying in 10 minutes: {e:#}");
                        renewal.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(600));
                    }
                }
            }
            _ = probe_tick.tick(), if probing => {
                if probe.as_ref().is_none_or(|p| p.is_finished()) {
                    let tx = probe_tx.clone();
                    let target = target.clone();
                    let dialer = match dialer(config, state, proxy.clone()) {
                        Ok(d) => d,
                        Err(e) => {
                            tracing::debug!("cannot probe: {e:#}");
                            continue;
                        }
                    };
                    probe = Some(tokio::spawn(async move {
                        match dialer.dial(Transport::H3, &target).await {
                            Ok(c) => {
                                let _ = tx.send(c).await;
                            }
                            Err(f) => tracing::debug!(broker = %target.addr, "HTTP/3 still unavailable: {f}"),
                        }
                    }));
                }
            }
            Some(better) = probe_rx.recv() => {
                tracing::info!(broker = %target.addr, "HTTP/3 answers again; moving the tunnel back to it");
                break End::Upgrade(Box::new((better, target.clone())));
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    conn.close("site shutting down");
                    break End::Shutdown;
                }
            }
            f = conn.closed() => break End::from(f),
        }
    };
    if let Some(p) = probe {
        p.abort();
    }
    for p in pumps {
        p.abort();
    }
    end
}

/// The connection's own failure, if it has already failed (the better
/// explanation when a stream fails).
async fn conn_failure(conn: &BrokerConn) -> Option<Failure> {
    tokio::time::timeout(Duration::from_millis(100), conn.closed())
        .await
        .ok()
}

/// When to renew: half-way through the certificate's lifetime.
fn renewal_deadline(state: &StateDir) -> Duration {
    let Ok(creds) = state.credentials() else {
        return Duration::from_secs(3600);
    };
    let Identity {
        issued_at,
        not_after,
        ..
    } = creds.identity;
    let midpoint = issued_at + not_after.saturating_sub(issued_at) / 2;
    let now = tether_pki::token::unix_secs(SystemTime::now());
    Duration::from_secs(midpoint.saturating_sub(now))
}

/// Renews the site certificate over the tunnel connection.
async fn renew(conn: &BrokerConn, state: &StateDir, target: &Target) -> anyhow::Result<()> {
    let creds = state.credentials()?;
    let (key, csr) = tether_pki::ca::site_key_and_csr(creds.identity.site.as_str())?;
    let body = serde_json::to_vec(&RenewRequest {
        csr: data_encoding::BASE64.encode(&csr),
    })?;
    let (status, answer) = conn
        .request("POST", &target.endpoint.to_string(), RENEW_PATH, &body)
        .await?;
    if status != 200 {
        let message = serde_json::from_slice::<ApiError>(&answer)
            .map(|e| e.error)
            .unwrap_or_default();
        anyhow::bail!("HTTP {status}: {message}");
    }
    let renewed: RenewResponse = serde_json::from_slice(&answer)?;
    state.save(
        &key.serialize_der(),
        &renewed.certificate,
        &renewed.ca,
        &Identity {
            not_after: renewed.not_after,
            issued_at: tether_pki::token::unix_secs(SystemTime::now()),
            ..creds.identity
        },
    )?;
    tracing::info!("certificate renewed");
    Ok(())
}

/// Applies an event from the broker's capsules.
async fn apply(
    event: ClientEvent,
    tun: &mut Option<Tun>,
    tun_name: &str,
    link: &Link,
    target: &Target,
    pumps: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<()> {
    match event {
        ClientEvent::Addresses(addresses) => {
            if tun.is_none() {
                let mtu = link.mtu().unwrap_or(1280).max(1280);
                let created = Tun::create(tun_name, mtu)?;
                pumps.extend(start_pumps(&created, link));
                *tun = Some(created);
            }
            if let Some(tun) = tun.as_mut() {
                tun.set_addresses(&addresses)?;
                let shown: Vec<String> = addresses.iter().map(|a| a.addr().to_string()).collect();
                tracing::info!(
                    device = tun.name(),
                    "this site is reachable as {}",
                    shown.join(" and ")
                );
            }
        }
        ClientEvent::Routes(routes) => {
            if let Some(tun) = tun.as_mut() {
                let skipped = tun.set_routes(&routes, &[target.addr.ip()]).await?;
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
        ClientEvent::Denied { request_id } => {
            tracing::warn!(request_id, "the broker denied an address request")
        }
        // Packets carried in DATAGRAM capsules (HTTP/2).
        ClientEvent::Datagram(payload) => {
            if let (Some(tun), Ok(Payload::IpPacket(p))) =
                (tun.as_ref(), datagram::parse_payload(&payload))
            {
                let _ = tether_shell::tun::write_one(&tun.dev, tun.offload, p).await;
            }
        }
    }
    Ok(())
}

/// Starts the packet pumps of a session: device to tunnel, and over HTTP/3
/// tunnel to device. One read of an offloading device yields a whole TCP burst, and
/// one write carries the coalesced segments of a batch of datagrams.
fn start_pumps(tun: &Tun, link: &Link) -> Vec<tokio::task::JoinHandle<()>> {
    let offload = tun.offload;
    let outbound = {
        let (dev, link) = (tun.dev.clone(), link.clone());
        tokio::spawn(async move {
            let offset = link.headroom();
            let mut packets =
                tether_shell::tun::BatchReader::new(tun_rs::IDEAL_BATCH_SIZE, 4096, offset);
            loop {
                if let Err(e) = packets.read(&dev).await {
                    tracing::error!(error = %e, "tunnel device failed");
                    return;
                }
                let mtu = link.mtu().map(usize::from).unwrap_or(1200);
                for framed in packets.framed_mut() {
                    let Some(packet) = framed.get(offset..) else {
                        continue;
                    };
                    if packet.len() > mtu {
                        // Tell the local sender the tunnel's MTU.
                        if let Some(icmp) = too_big(packet, mtu) {
                            let _ = tether_shell::tun::write_one(&dev, offload, &icmp).await;
                        }
                        continue;
                    }
                    if link.send(framed).is_err() {
                        return;
                    }
                }
            }
        })
    };
    // Over HTTP/2, packets arrive in capsules on the stream and are
    // written by the session itself.
    let Link::H3 {
        conn, stream_id, ..
    } = link.clone()
    else {
        return vec![outbound];
    };
    let inbound = {
        let dev = tun.dev.clone();
        tokio::spawn(async move {
            use futures_util::FutureExt;
            // Datagrams that arrived together are written together: with
            // offload, consecutive TCP segments are coalesced into large
            // ones, so the kernel hands the receiving application one packet
            // where it would have handled dozens. The buffers are sized for
            // a coalesced 64 KiB segment and kept across batches.
            let mut batch = tether_shell::tun::WriteBatch::default();
            while let Ok(first) = conn.read_datagram().await {
                let mut next = Some(first);
                while let Some(d) = next.take() {
                    if let Ok((stream, payload)) = datagram::parse_h3(&d)
                        && stream == stream_id
                        && let Ok(Payload::IpPacket(p)) = datagram::parse_payload(payload)
                    {
                        batch.push(p);
                    }
                    if batch.has_room() {
                        next = conn.read_datagram().now_or_never().and_then(Result::ok);
                    }
                }
                let _ = batch.write(&dev, offload).await;
            }
        })
    };
    vec![outbound, inbound]
}

/// A packet-too-big for a packet the tunnel cannot carry, as if from the
/// packet's destination (the local stack accepts it for path MTU).
fn too_big(packet: &[u8], mtu: usize) -> Option<Vec<u8>> {
    let p = Packet::parse(packet).ok()?;
    let from: IpAddr = p.dst;
    ip::icmp_error(
        &p,
        IcmpError::PacketTooBig {
            mtu: u16::try_from(mtu).unwrap_or(u16::MAX),
        },
        from,
    )
}
