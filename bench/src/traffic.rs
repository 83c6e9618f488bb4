//! Traffic for the busy-sites measurement (`tether-bench --busy`): real
//! UDP packets through the broker, counted per site where they arrive.
//!
//! Both ends are driven line by line on standard input, so that the bench
//! decides when each phase starts and reads the counts in between.
//!
//! `tether-loadgen busy --count N --broker A --dir D --sink ADDR` (in the
//! site namespace) connects the N enrolled sites on one QUIC endpoint and
//! prints `connected N in T s`, a line `site <i> <address>` per site and
//! `ready`. Then, per command:
//!
//! - `send <phase> <first> <count> <millis> <rate> <size>`: the sites
//!   `first..first+count` each send UDP packets with `size` bytes of
//!   payload from their own overlay address to the sink, in CONNECT-IP
//!   datagrams, for `millis` ms; `rate` packets per second over all of
//!   them, or with 0 each as fast as its connection takes them. Prints
//!   `sent <phase> <i> <queued> <refused>` per site (`refused`: the
//!   connection's send queue was full at the packet's turn) and
//!   `done send <phase>`.
//! - `report <phase> <serial>`: prints `begin report <phase> <serial>`,
//!   `recv <phase> <i> <packets> <payload bytes> <first> <last>` per site
//!   that received packets of that phase (first and last arrival in
//!   microseconds since the Unix epoch), `dropped <n>` (datagrams the
//!   sites' receive queues dropped since the start) and
//!   `done report <phase> <serial>`.
//!
//! `tether-loadgen backend --listen ADDR` (on the backend host) counts the
//! packets arriving on ADDR per source address and prints `ready`. Then:
//!
//! - `send <phase> <millis> <rate> <size> <addr>,<addr>,...`: sends UDP
//!   packets from ADDR to each address (same port) in turn for `millis`
//!   ms, `rate` packets per second in all or with 0 as fast as it can;
//!   prints `sent <phase> <packets> <errors>` and `done send <phase>`.
//! - `report <phase> <serial>`: `begin report <phase> <serial>`,
//!   `recv <phase> <address> <packets> <payload bytes> <first> <last>` per
//!   source, `done report <phase> <serial>`.
//!
//! Every payload starts with a tag: `TBSY`, the phase and the sender's
//! site index (both u32, big-endian), so that a late packet of one phase is
//! never counted in the next.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use tether_proto::datagram;
use tether_proto::ip::{Packet, checksum};

/// The first bytes of every payload.
const MAGIC: &[u8; 4] = b"TBSY";
/// Bytes of the tag: magic, phase, site.
pub const TAG_LEN: usize = 12;
/// IPv4 and UDP headers.
const HEADERS: usize = 28;

/// Bytes of datagrams each site's connection holds waiting to be sent.
/// Smaller than a tunnel's (4 MiB): a saturating sender fills its queue,
/// and 100 full 4 MiB queues would take seconds to drain after a phase,
/// smearing it into the next. 256 KiB still covers several milliseconds of
/// a site's share.
const SEND_QUEUE: usize = 256 << 10;

/// A UDP payload of `size` bytes (at least [`TAG_LEN`]) tagged with
/// `phase` and `site`.
pub fn payload(phase: u32, site: u32, size: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(size.max(TAG_LEN));
    p.extend_from_slice(MAGIC);
    p.extend_from_slice(&phase.to_be_bytes());
    p.extend_from_slice(&site.to_be_bytes());
    p.resize(size.max(TAG_LEN), 0);
    p
}

/// The phase and site a payload is tagged with.
pub fn tag(payload: &[u8]) -> Option<(u32, u32)> {
    let (magic, rest) = payload.split_first_chunk::<4>()?;
    if magic != MAGIC {
        return None;
    }
    let (phase, rest) = rest.split_first_chunk::<4>()?;
    let (site, _) = rest.split_first_chunk::<4>()?;
    Some((u32::from_be_bytes(*phase), u32::from_be_bytes(*site)))
}

/// An IPv4 UDP packet with valid checksums.
pub fn udp_v4(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    // No identification, Don't Fragment, TTL 64, UDP.
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src.ip().octets());
    p.extend_from_slice(&dst.ip().octets());
    let sum = checksum(&[&p[..20]]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut udp = Vec::with_capacity(udp_len);
    udp.extend_from_slice(&src.port().to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let sum = checksum(&[
        &src.ip().octets(),
        &dst.ip().octets(),
        &[0, 17],
        &(udp_len as u16).to_be_bytes(),
        &udp,
    ]);
    // A computed zero is sent as all ones (RFC 768).
    let sum = if sum == 0 { 0xffff } else { sum };
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(&udp);
    p
}

/// The tag and UDP payload length of a tagged UDP packet.
pub fn packet_tag(packet: &[u8]) -> Option<(u32, u32, usize)> {
    let p = Packet::parse(packet).ok()?;
    if p.protocol != 17 || p.later_fragment {
        return None;
    }
    let payload = p.bytes.get(p.header_len + 8..)?;
    let (phase, site) = tag(payload)?;
    Some((phase, site, payload.len()))
}

/// What arrived of one phase from one sender.
#[derive(Debug, Default, Clone, Copy)]
struct Count {
    packets: u64,
    bytes: u64,
    /// First and last arrival, microseconds since the Unix epoch.
    first: u64,
    last: u64,
}

impl Count {
    fn add(&mut self, bytes: usize, now: u64) {
        if self.packets == 0 {
            self.first = now;
        }
        self.packets += 1;
        self.bytes += bytes as u64;
        self.last = now;
    }
}

/// The wall clock in microseconds: the one clock the site and backend
/// namespaces share.
fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// One site of the load generator with its tunnel up.
struct Site {
    conn: quinn::Connection,
    stream_id: u64,
    addr: Ipv4Addr,
    /// What arrived from the backend, by phase.
    received: Arc<Mutex<BTreeMap<u32, Count>>>,
}

/// Opens one site's tunnel with the load generator's send queue.
async fn open(
    endpoint: &quinn::Endpoint,
    broker: SocketAddr,
    state: &tether::state_dir::StateDir,
) -> anyhow::Result<tether_tests::Tunnel> {
    let creds = state.credentials()?;
    let mut transport =
        tether_shell::quic::transport_config(Duration::from_secs(5), Duration::from_secs(12));
    transport.datagram_send_buffer_size(SEND_QUEUE);
    let config = tether::h3client::quic_config(super::client_tls(&creds), transport)?;
    let mut client =
        tether::h3client::H3Client::connect(endpoint, config, broker, &broker.ip().to_string())
            .await?;
    client.peer_settings(Duration::from_secs(10)).await?;
    let mut tunnel = tether_tests::Tunnel::open(client)
        .await
        .map_err(|(status, body)| anyhow::anyhow!("CONNECT-IP refused: {status} {body}"))?;
    tokio::time::timeout(Duration::from_secs(10), tunnel.configured())
        .await
        .context("the broker sent no address in 10 s")?;
    Ok(tunnel)
}

/// Counts what arrives on a site's tunnel.
async fn receive(i: usize, site: Arc<Site>, dropped: Arc<AtomicU64>) {
    let mut reader = tether_shell::quic::DatagramReader::new(site.conn.clone());
    let mut batch = Vec::new();
    loop {
        match reader.next_batch(&mut batch, 64).await {
            Ok(n) => {
                dropped.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                println!("lost {i}: {e}");
                return;
            }
        }
        let now = unix_micros();
        let mut received = site.received.lock().unwrap();
        for d in &batch {
            let Ok((stream, payload)) = datagram::parse_h3(d) else {
                continue;
            };
            if stream != site.stream_id {
                continue;
            }
            if let Ok(datagram::Payload::IpPacket(p)) = datagram::parse_payload(payload)
                && let Some((phase, _, len)) = packet_tag(p)
            {
                received.entry(phase).or_default().add(len, now);
            }
        }
    }
}

/// Sends one site's datagram until `until`: paced at `rate` packets per
/// second, or with `None` as fast as the connection takes them. Returns
/// the datagrams queued and those refused by a full send queue.
async fn send(
    conn: quinn::Connection,
    datagram: Bytes,
    until: Instant,
    rate: Option<f64>,
) -> (u64, u64) {
    let (mut queued, mut refused) = (0u64, 0u64);
    let deadline = tokio::time::Instant::from_std(until);
    match rate {
        None => loop {
            match tokio::time::timeout_at(deadline, conn.send_datagram_wait(datagram.clone())).await
            {
                Ok(Ok(())) => queued += 1,
                Ok(Err(e)) => {
                    println!("send error: {e}");
                    break;
                }
                Err(_) => break,
            }
            // Room in the queue makes the future ready at once: let the
            // other sites and the connection drivers run.
            if queued % 32 == 0 {
                tokio::task::yield_now().await;
            }
        },
        Some(rate) => {
            let start = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let now = Instant::now();
                if now >= until {
                    break;
                }
                let due = (rate * (now - start).as_secs_f64()) as u64;
                while queued + refused < due {
                    match tether_shell::quic::try_send_datagram(&conn, datagram.clone()) {
                        Ok(None) => queued += 1,
                        Ok(Some(_)) => refused += 1,
                        Err(e) => {
                            println!("send error: {e}");
                            return (queued, refused);
                        }
                    }
                }
            }
        }
    }
    (queued, refused)
}

/// Parses the next word of a command.
fn arg<T: std::str::FromStr>(
    words: &mut std::str::SplitWhitespace<'_>,
    what: &str,
) -> anyhow::Result<T> {
    words
        .next()
        .and_then(|w| w.parse().ok())
        .with_context(|| format!("missing or bad {what}"))
}

/// The `busy` command: sites that send and receive on command.
pub async fn busy(
    count: usize,
    broker: SocketAddr,
    dir: &Path,
    sink: SocketAddrV4,
) -> anyhow::Result<()> {
    let endpoint = tether::dial::client_endpoint(&broker)?;
    let limit = Arc::new(tokio::sync::Semaphore::new(64));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..count {
        let (limit, endpoint, state) = (limit.clone(), endpoint.clone(), super::site_dir(dir, i));
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire().await?;
            open(&endpoint, broker, &state)
                .await
                .with_context(|| format!("site {i} could not connect"))
        }));
    }
    // The tunnels stay open (their request streams) until the end.
    let mut tunnels = Vec::new();
    for t in tasks {
        tunnels.push(t.await??);
    }
    println!(
        "connected {count} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let dropped = Arc::new(AtomicU64::new(0));
    let mut sites = Vec::new();
    for (i, t) in tunnels.iter().enumerate() {
        let site = Arc::new(Site {
            conn: t.client.conn.clone(),
            stream_id: t.stream_id,
            addr: tether_tests::v4(t),
            received: Arc::default(),
        });
        println!("site {i} {}", site.addr);
        tokio::spawn(receive(i, site.clone(), dropped.clone()));
        sites.push(site);
    }
    println!("ready");
    // Standard input is read on a thread of its own (blocking reads).
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = lines.recv().await {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("send") => {
                let phase: u32 = arg(&mut words, "phase")?;
                let first: usize = arg(&mut words, "first site")?;
                let n: usize = arg(&mut words, "site count")?;
                let millis: u64 = arg(&mut words, "duration")?;
                let rate: f64 = arg(&mut words, "rate")?;
                let size: usize = arg(&mut words, "size")?;
                let chosen = sites.get(first..first + n).context("sites out of range")?;
                let until = Instant::now() + Duration::from_millis(millis);
                let per_site = (rate > 0.0).then(|| rate / n as f64);
                let mut senders = Vec::new();
                for (k, site) in chosen.iter().enumerate() {
                    let i = first + k;
                    let packet = udp_v4(
                        SocketAddrV4::new(site.addr, sink.port()),
                        sink,
                        &payload(phase, i as u32, size),
                    );
                    let mut d = Vec::new();
                    datagram::encode_h3_ip_packet(site.stream_id, &packet, &mut d);
                    let max = site.conn.max_datagram_size().unwrap_or(0);
                    anyhow::ensure!(
                        d.len() <= max,
                        "a {size}-byte payload makes a {}-byte datagram ({} bytes of IP packet); the tunnel carries datagrams of at most {max} bytes: use a payload of at most {} bytes",
                        d.len(),
                        size + HEADERS,
                        size.saturating_sub(d.len() - max)
                    );
                    senders.push(tokio::spawn(send(
                        site.conn.clone(),
                        d.into(),
                        until,
                        per_site,
                    )));
                }
                for (k, s) in senders.into_iter().enumerate() {
                    let (queued, refused) = s.await?;
                    println!("sent {phase} {} {queued} {refused}", first + k);
                }
                println!("done send {phase}");
            }
            Some("report") => {
                let phase: u32 = arg(&mut words, "phase")?;
                let serial: u64 = arg(&mut words, "serial")?;
                println!("begin report {phase} {serial}");
                for (i, site) in sites.iter().enumerate() {
                    if let Some(c) = site.received.lock().unwrap().get(&phase) {
                        println!(
                            "recv {phase} {i} {} {} {} {}",
                            c.packets, c.bytes, c.first, c.last
                        );
                    }
                }
                println!("dropped {}", dropped.load(Ordering::Relaxed));
                println!("done report {phase} {serial}");
            }
            Some(other) => anyhow::bail!("unknown command {other:?}"),
            None => {}
        }
    }
    drop(tunnels);
    Ok(())
}

/// The `backend` command: a sink counting per source, and a source
/// sending to the sites.
pub fn backend(listen: SocketAddr) -> anyhow::Result<()> {
    let socket =
        std::net::UdpSocket::bind(listen).with_context(|| format!("failed to bind {listen}"))?;
    tether_shell::udp::tune_socket(&socket);
    let counts: Arc<Mutex<BTreeMap<(u32, IpAddr), Count>>> = Arc::default();
    let rx = socket.try_clone()?;
    let sink = counts.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = rx.recv_from(&mut buf) {
            if let Some((phase, _)) = tag(&buf[..n]) {
                let now = unix_micros();
                sink.lock()
                    .unwrap()
                    .entry((phase, from.ip()))
                    .or_default()
                    .add(n, now);
            }
        }
    });
    println!("ready");
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let mut words = line.split_whitespace();
        match words.next() {
            Some("send") => {
                let phase: u32 = arg(&mut words, "phase")?;
                let millis: u64 = arg(&mut words, "duration")?;
                let rate: f64 = arg(&mut words, "rate")?;
                let size: usize = arg(&mut words, "size")?;
                let targets: Vec<SocketAddr> = words
                    .next()
                    .context("missing addresses")?
                    .split(',')
                    .map(|a| {
                        a.parse()
                            .map(|ip: IpAddr| SocketAddr::new(ip, listen.port()))
                    })
                    .collect::<Result<_, _>>()
                    .context("bad address")?;
                anyhow::ensure!(!targets.is_empty(), "no addresses");
                let payloads: Vec<Vec<u8>> = (0..targets.len())
                    .map(|i| payload(phase, i as u32, size))
                    .collect();
                let (sent, errors) = blast(&socket, &targets, &payloads, millis, rate);
                println!("sent {phase} {sent} {errors}");
                println!("done send {phase}");
            }
            Some("report") => {
                let phase: u32 = arg(&mut words, "phase")?;
                let serial: u64 = arg(&mut words, "serial")?;
                println!("begin report {phase} {serial}");
                for ((p, from), c) in counts.lock().unwrap().iter() {
                    if *p == phase {
                        println!(
                            "recv {phase} {from} {} {} {} {}",
                            c.packets, c.bytes, c.first, c.last
                        );
                    }
                }
                println!("done report {phase} {serial}");
            }
            Some(other) => anyhow::bail!("unknown command {other:?}"),
            None => {}
        }
    }
    Ok(())
}

/// Sends to `targets` in turn for `millis` ms at `rate` packets per second
/// (0: as fast as the socket takes them); returns packets sent and send
/// errors.
fn blast(
    socket: &std::net::UdpSocket,
    targets: &[SocketAddr],
    payloads: &[Vec<u8>],
    millis: u64,
    rate: f64,
) -> (u64, u64) {
    let start = Instant::now();
    let until = start + Duration::from_millis(millis);
    let (mut sent, mut errors, mut next) = (0u64, 0u64, 0usize);
    loop {
        let now = Instant::now();
        if now >= until {
            break;
        }
        // Paced: what is due by now; saturating: a batch between clock reads.
        let batch = if rate > 0.0 {
            let due = (rate * (now - start).as_secs_f64()) as u64;
            due.saturating_sub(sent + errors)
        } else {
            64
        };
        if batch == 0 {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        for _ in 0..batch {
            match socket.send_to(&payloads[next], targets[next]) {
                Ok(_) => sent += 1,
                Err(_) => errors += 1,
            }
            next = (next + 1) % targets.len();
        }
    }
    (sent, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tagged_packets_parse_back_with_valid_checksums() {
        let src = SocketAddrV4::new(Ipv4Addr::new(100, 64, 0, 7), 9000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(10, 20, 0, 10), 9000);
        let packet = udp_v4(src, dst, &payload(3, 42, 1200));
        assert_eq!(packet.len(), 1200 + HEADERS);
        assert_eq!(packet_tag(&packet), Some((3, 42, 1200)));
        // Both checksums verify: the sum over what they cover is zero.
        assert_eq!(checksum(&[&packet[..20]]), 0);
        let udp_len = (packet.len() - 20) as u16;
        assert_eq!(
            checksum(&[
                &packet[12..20],
                &[0, 17],
                &udp_len.to_be_bytes(),
                &packet[20..]
            ]),
            0
        );
    }

    #[test]
    fn untagged_payloads_are_not_counted() {
        assert_eq!(tag(b"TBSX\0\0\0\0\0\0\0\0"), None);
        assert_eq!(tag(b"TBSY\0\0\0\x01"), None);
        assert_eq!(tag(&payload(1, 2, 0)), Some((1, 2)));
    }
}
