//! `tether up`: keep this site connected.
//!
//! The agent dials the brokers in order, opens CONNECT-IP over HTTP/3,
//! configures the TUN device from the broker's capsules, and moves packets
//! between the device and QUIC datagrams. When the connection is lost it
//! reconnects with jittered exponential backoff; the broker gives it the
//! same address again, and the device (with its addresses and routes) stays
//! in place meanwhile. It renews its certificate at half its lifetime over
//! the tunnel and reconnects with the new one.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use quinn::{Connection, ConnectionError, VarInt};
use tether_config::client::ClientConfig;
use tether_proto::api::{ApiError, RENEW_PATH, RenewRequest, RenewResponse};
use tether_proto::capsule::{Capsule, CapsuleDecoder};
use tether_proto::connect_ip;
use tether_proto::datagram::{self, Payload};
use tether_proto::h3::error::H3_REQUEST_REJECTED;
use tether_proto::h3::{MessageDecoder, MessageEvent, Request};
use tether_proto::ip::{self, IcmpError, Packet};
use tether_proto::net::Family;
use tether_proto::tunnel::{Backoff, ClientEvent, ClientSession};
use tether_proto::varint;
use tokio::sync::watch;

use crate::dial::{self, Target};
use crate::h3client::{self, H3Client, quic_config, transport_config};
use crate::state::{Identity, StateDir};
use crate::tun::Tun;

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// Asked to stop.
    Shutdown,
    /// A new certificate is in place; reconnect with it.
    Renewed,
    /// The connection was lost.
    Lost(String),
    /// The broker refused the tunnel.
    Refused(String),
}

/// Runs the agent until `shutdown` becomes true.
pub async fn run(
    config: ClientConfig,
    state: StateDir,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // Fail early, with the reason, if the site is not enrolled.
    let first = state.credentials()?;
    tracing::info!(site = %first.identity.site, region = %first.identity.region, "starting");
    let mut backoff = Backoff::new(
        Duration::from_millis(500),
        config.max_backoff,
        rand::random(),
    );
    let mut tun: Option<Tun> = None;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let started = Instant::now();
        let end = match connect(&config, &state).await {
            Ok((client, target, endpoint)) => {
                let end = session(client, &target, &mut tun, &config, &state, &mut shutdown).await;
                if matches!(end, End::Shutdown) {
                    // Deliver the CONNECTION_CLOSE, so the broker ends the
                    // session now rather than at its idle timeout.
                    let _ =
                        tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
                }
                match &end {
                    End::Lost(why) => {
                        tracing::warn!(broker = %target.addr, "lost the connection to the broker: {why}")
                    }
                    End::Refused(why) => {
                        tracing::error!(broker = %target.addr, "the broker refused the tunnel: {why}")
                    }
                    End::Renewed => tracing::info!("reconnecting with the renewed certificate"),
                    End::Shutdown => {}
                }
                end
            }
            Err(e) => {
                tracing::warn!("cannot reach any broker: {e:#}");
                End::Lost(e.to_string())
            }
        };
        match end {
            End::Shutdown => break,
            End::Renewed => continue,
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

/// How a session ended when an operation on `conn` failed: refused when the
/// broker rejected this site (a TLS alert about its certificate, or a
/// rejection by the broker), lost otherwise. The connection's own close
/// reason is the better explanation when it has one: a refusal often
/// surfaces first as a failed stream or a missing SETTINGS frame.
fn ended(conn: &Connection, e: impl std::fmt::Display) -> End {
    match conn.close_reason() {
        Some(reason) if is_refusal(&reason) => End::Refused(explain(&reason)),
        Some(reason) => End::Lost(explain(&reason)),
        None => End::Lost(e.to_string()),
    }
}

/// Whether the broker closed the connection because it refuses this site.
fn is_refusal(e: &ConnectionError) -> bool {
    match e {
        // TLS alerts travel as QUIC crypto errors 0x100-0x1ff.
        ConnectionError::TransportError(t) => (0x100..0x200).contains(&u64::from(t.code)),
        ConnectionError::ConnectionClosed(c) => (0x100..0x200).contains(&u64::from(c.error_code)),
        ConnectionError::ApplicationClosed(c) => u64::from(c.error_code) == H3_REQUEST_REJECTED,
        _ => false,
    }
}

/// Explains a failed handshake or closed connection in plain words.
fn explain(e: &ConnectionError) -> String {
    let text = e.to_string();
    let alert = |code: u64| {
        matches!(e, ConnectionError::TransportError(t) if u64::from(t.code) == 0x100 + code)
            || matches!(e, ConnectionError::ConnectionClosed(c) if u64::from(c.error_code) == 0x100 + code)
    };
    if alert(44) {
        "the broker refused this site's certificate because it was revoked; ask the operator".into()
    } else if alert(45) {
        "this site's certificate has expired; check the clock, or enroll again with a new token"
            .into()
    } else if alert(48) || text.contains("UnknownIssuer") {
        "the broker and this site do not share a CA (wrong broker, or enrolled elsewhere)".into()
    } else if matches!(e, ConnectionError::TimedOut) {
        "no answer (is UDP 443 to the published CIDR allowed by the firewall?)".into()
    } else if let ConnectionError::ApplicationClosed(c) = e {
        String::from_utf8_lossy(&c.reason).to_string()
    } else {
        text
    }
}

/// Connects to the first broker that answers.
async fn connect(
    config: &ClientConfig,
    state: &StateDir,
) -> anyhow::Result<(H3Client, Target, quinn::Endpoint)> {
    let creds = state.credentials()?;
    let tls = tether_pki::tls::client_config(&creds.ca, Some((creds.chain, creds.key)))?;
    // Silence for two keepalive intervals (and a margin) means the broker
    // is gone; a restarted broker resets the connection sooner.
    let quic = quic_config(
        tls,
        transport_config(
            config.keepalive,
            config.keepalive * 2 + Duration::from_secs(2),
        ),
    )?;
    let mut errors = Vec::new();
    for endpoint in &config.brokers {
        let targets = match dial::resolve(endpoint, config.published_cidr).await {
            Ok(t) => t,
            Err(e) => {
                errors.push(e.to_string());
                continue;
            }
        };
        for target in targets {
            let local = dial::client_endpoint(&target.addr)?;
            let connecting = local
                .connect_with(quic.clone(), target.addr, &target.server_name)
                .context("invalid broker address")?;
            match tokio::time::timeout(config.h3_timeout, connecting).await {
                Ok(Ok(conn)) => match H3Client::over(conn.clone()).await {
                    Ok(client) => return Ok((client, target, local)),
                    Err(e) => errors.push(format!(
                        "{}: {}",
                        target.addr,
                        conn.close_reason()
                            .map(|r| explain(&r))
                            .unwrap_or_else(|| e.to_string())
                    )),
                },
                Ok(Err(e)) => errors.push(format!("{}: {}", target.addr, explain(&e))),
                Err(_) => errors.push(format!(
                    "{}: no answer within {} s (is UDP 443 to the published CIDR allowed?)",
                    target.addr,
                    config.h3_timeout.as_secs_f64()
                )),
            }
        }
    }
    anyhow::bail!("{}", errors.join("; "))
}

/// Bytes before each IP packet in a datagram on `stream_id`.
fn datagram_prefix(stream_id: u64) -> Vec<u8> {
    let mut prefix = Vec::with_capacity(9);
    let _ = varint::encode(stream_id / 4, &mut prefix);
    prefix.push(datagram::IP_PACKET_CONTEXT as u8);
    prefix
}

/// The largest IP packet the connection carries now.
fn tunnel_mtu(conn: &Connection, prefix_len: usize) -> Option<u16> {
    conn.max_datagram_size()
        .map(|m| m.saturating_sub(prefix_len))
        .and_then(|m| u16::try_from(m).ok())
}

async fn session(
    mut client: H3Client,
    target: &Target,
    tun: &mut Option<Tun>,
    config: &ClientConfig,
    state: &StateDir,
    shutdown: &mut watch::Receiver<bool>,
) -> End {
    match client.peer_settings(Duration::from_secs(5)).await {
        Ok(s) if s.enable_connect_protocol && s.h3_datagram => {}
        Ok(_) => {
            return End::Refused("the broker does not offer CONNECT-IP with HTTP Datagrams".into());
        }
        Err(e) => return ended(&client.conn, e),
    }
    let request = connect_ip::request(&target.endpoint.to_string());
    let (send, mut recv) = match client.send(&request, &[]).await {
        Ok(s) => s,
        Err(e) => return ended(&client.conn, e),
    };
    let mut dec = MessageDecoder::new(h3client::MAX_FIELD_SECTION);
    let head = match h3client::read_head(&mut recv, &mut dec).await {
        Ok(h) => h,
        Err(e) => return ended(&client.conn, e),
    };
    if head.status != 200 {
        let mut body = Vec::new();
        loop {
            while let Ok(Some(MessageEvent::Data(d))) = dec.next_event() {
                body.extend_from_slice(&d);
            }
            match recv.read_chunk(64 * 1024, true).await {
                Ok(Some(chunk)) => dec.push(&chunk.bytes),
                _ => break,
            }
        }
        let message = serde_json::from_slice::<ApiError>(&body)
            .map(|e| e.error)
            .unwrap_or_default();
        return End::Refused(format!("HTTP {}: {message}", head.status));
    }
    let conn = client.conn.clone();
    let stream_id = VarInt::from(recv.id()).into_inner();
    let prefix: Arc<[u8]> = datagram_prefix(stream_id).into();
    tracing::info!(broker = %target.addr, "connected to the broker over HTTP/3 (QUIC, UDP 443)");

    let mut core = ClientSession::default();
    let mut capsules = CapsuleDecoder::default();
    let mut pumps: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut mtu_tick = tokio::time::interval(Duration::from_secs(2));
    let renew_at = renewal_deadline(state);
    let renewal = tokio::time::sleep(renew_at);
    tokio::pin!(renewal);
    let _send = send;
    if let Some(tun) = tun.as_ref() {
        pumps.extend(start_pumps(tun, &conn, stream_id, prefix.clone()));
    }

    // Bytes that arrived with the response head are already in `dec`.
    let mut pending = true;
    let end = loop {
        if std::mem::take(&mut pending) {
            let mut events = Vec::new();
            let mut failure = None;
            loop {
                match dec.next_event() {
                    Ok(Some(MessageEvent::Data(d))) => capsules.push(&d),
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        failure = Some(e.to_string());
                        break;
                    }
                }
            }
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
                if let Err(e) = apply(
                    event,
                    tun,
                    &config.tun_name,
                    &conn,
                    stream_id,
                    &prefix,
                    target,
                    &mut pumps,
                )
                .await
                {
                    tracing::error!("{e:#}");
                }
            }
        }
        tokio::select! {
            chunk = recv.read_chunk(64 * 1024, true) => {
                match chunk {
                    Ok(Some(chunk)) => {
                        dec.push(&chunk.bytes);
                        pending = true;
                    }
                    Ok(None) => break End::Lost("the broker ended the tunnel".into()),
                    Err(e) => break ended(&conn, e),
                }
            }
            _ = mtu_tick.tick() => {
                if let (Some(tun), Some(mtu)) = (tun.as_mut(), tunnel_mtu(&conn, prefix.len())) {
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
                match renew(&client, state, target).await {
                    Ok(()) => break End::Renewed,
                    Err(e) => {
                        tracing::warn!("certificate renewal failed, retrying in 10 minutes: {e:#}");
                        renewal.as_mut().reset(tokio::time::Instant::now() + Duration::from_secs(600));
                    }
                }
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    conn.close(VarInt::from_u32(0x100), b"site shutting down");
                    break End::Shutdown;
                }
            }
            e = conn.closed() => {
                break ended(&conn, e);
            }
        }
    };
    for p in pumps {
        p.abort();
    }
    end
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
async fn renew(client: &H3Client, state: &StateDir, target: &Target) -> anyhow::Result<()> {
    let creds = state.credentials()?;
    let (key, csr) = tether_pki::ca::site_key_and_csr(creds.identity.site.as_str())?;
    let body = serde_json::to_vec(&RenewRequest {
        csr: data_encoding::BASE64.encode(&csr),
    })?;
    let request = Request::new("POST", &target.endpoint.to_string(), RENEW_PATH)
        .with_header("content-type", "application/json");
    let answer = client.request(&request, &body).await?;
    if answer.head.status != 200 {
        let message = serde_json::from_slice::<ApiError>(&answer.body)
            .map(|e| e.error)
            .unwrap_or_default();
        anyhow::bail!("HTTP {}: {message}", answer.head.status);
    }
    let renewed: RenewResponse = serde_json::from_slice(&answer.body)?;
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
#[allow(clippy::too_many_arguments)]
async fn apply(
    event: ClientEvent,
    tun: &mut Option<Tun>,
    tun_name: &str,
    conn: &Connection,
    stream_id: u64,
    prefix: &Arc<[u8]>,
    target: &Target,
    pumps: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<()> {
    match event {
        ClientEvent::Addresses(addresses) => {
            if tun.is_none() {
                let mtu = tunnel_mtu(conn, prefix.len()).unwrap_or(1280).max(1280);
                let created = Tun::create(tun_name, mtu)?;
                pumps.extend(start_pumps(&created, conn, stream_id, prefix.clone()));
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
        ClientEvent::Datagram(payload) => {
            if let (Some(tun), Ok(Payload::IpPacket(p))) =
                (tun.as_ref(), datagram::parse_payload(&payload))
            {
                let _ = tun.dev.send(p).await;
            }
        }
    }
    Ok(())
}

/// Starts the two packet pumps of a session: device to tunnel, tunnel to
/// device. One read of an offloading device yields a whole TCP burst, and
/// one write carries the coalesced segments of a batch of datagrams.
fn start_pumps(
    tun: &Tun,
    conn: &Connection,
    stream_id: u64,
    prefix: Arc<[u8]>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let offload = tun.offload;
    let outbound = {
        let (dev, conn, prefix) = (tun.dev.clone(), conn.clone(), prefix.clone());
        tokio::spawn(async move {
            let offset = prefix.len();
            let mut original = vec![0u8; crate::tun::VNET_HDR + 65_536];
            let mut bufs = vec![vec![0u8; offset + 4096]; tun_rs::IDEAL_BATCH_SIZE];
            let mut sizes = vec![0usize; tun_rs::IDEAL_BATCH_SIZE];
            loop {
                let n = match dev
                    .recv_multiple(&mut original, &mut bufs, &mut sizes, offset)
                    .await
                {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::error!(error = %e, "tunnel device failed");
                        return;
                    }
                };
                let mtu = tunnel_mtu(&conn, offset).map(usize::from).unwrap_or(1200);
                for (buf, &size) in bufs.iter_mut().zip(&sizes).take(n) {
                    let Some(packet) = buf.get(offset..offset + size) else {
                        continue;
                    };
                    if size > mtu {
                        // Tell the local sender the tunnel's MTU.
                        if let Some(icmp) = too_big(packet, mtu) {
                            let _ = crate::tun::write_one(&dev, offload, &icmp).await;
                        }
                        continue;
                    }
                    buf[..offset].copy_from_slice(&prefix);
                    let datagram = Bytes::copy_from_slice(&buf[..offset + size]);
                    if let Err(quinn::SendDatagramError::ConnectionLost(_)) =
                        conn.send_datagram(datagram)
                    {
                        return;
                    }
                }
            }
        })
    };
    let inbound = {
        let (dev, conn) = (tun.dev.clone(), conn.clone());
        tokio::spawn(async move {
            use futures_util::FutureExt;
            // Datagrams that arrived together are written together: with
            // offload, consecutive TCP segments are coalesced into large
            // ones, so the kernel hands the receiving application one packet
            // where it would have handled dozens. The buffers are sized for
            // a coalesced 64 KiB segment and kept across batches.
            let hdr = crate::tun::VNET_HDR;
            let mut pool: Vec<bytes::BytesMut> = (0..tun_rs::IDEAL_BATCH_SIZE)
                .map(|_| bytes::BytesMut::with_capacity(hdr + 65_536))
                .collect();
            let mut gro = tun_rs::GROTable::default();
            while let Ok(first) = conn.read_datagram().await {
                let mut n = 0;
                let mut next = Some(first);
                while let Some(d) = next.take() {
                    if let Ok((stream, payload)) = datagram::parse_h3(&d)
                        && stream == stream_id
                        && let Ok(Payload::IpPacket(p)) = datagram::parse_payload(payload)
                        && let Some(b) = pool.get_mut(n)
                    {
                        b.clear();
                        b.resize(hdr, 0);
                        b.extend_from_slice(p);
                        n += 1;
                    }
                    if n < pool.len() {
                        next = conn.read_datagram().now_or_never().and_then(Result::ok);
                    }
                }
                let batch = &mut pool[..n];
                if offload {
                    let _ = dev.send_multiple(&mut gro, batch, hdr).await;
                } else {
                    for b in batch.iter() {
                        let _ = dev.send(&b[hdr..]).await;
                    }
                }
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
