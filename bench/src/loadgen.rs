//! `tether-loadgen`: many sites against one broker, built on the client
//! library.
//!
//! `tether-loadgen enroll --count N --admin URL --admin-token T --broker A --dir D`
//! creates N tokens and enrolls N sites into `D/site-<i>` (with
//! `--enroll-first K`, only the first K; the others stay registered only); `--broker` may
//! list several brokers (comma-separated, used in turn), and with
//! `--retries R` an enrollment that fails is tried again (same token, same
//! broker) up to R times, 0.5 s apart; `--concurrency C` enrollments are in
//! flight at once (default 32). It prints `tokens N` once the tokens
//! exist, `enrolled <i>` per site, `retry <i>: <error>` per failed attempt,
//! and exits non-zero if a site could not be enrolled.
//! `tether-loadgen connect --count N --broker A --dir D --hold S` opens a
//! CONNECT-IP tunnel for each (one QUIC endpoint), prints `connected N`
//! when all are up, and holds them idle for S seconds; with `--first F`
//! it takes the sites `F .. F + N` of `D`. A site whose tunnel does not
//! open is tried again (up to 12 more times, 0.5 s doubling to 5 s;
//! `retry <i>: ...`); one that still fails is reported (`failed <i>: ...`)
//! and counted in `connected N in S s, R retries, F failed`.
//! `tether-loadgen storm --count N --broker A --dir D --rounds R [--keepalive S]` connects
//! them too, then reconnects every site whose connection ends (as the agent
//! does: a first retry after 0.25-0.5 s, doubling up to 5 s) and, each
//! time all are back after losses, prints
//! `round K: N back ... changed C; per broker X/Y/..` (C sites came back
//! with another address; how many are on each broker) until R rounds are
//! done. `--broker` may list several brokers (comma-separated): every site
//! dials the first, and a site whose connection ends dials the others
//! first (spread by site), the lost broker last, as the agent does. The broker is killed and restarted by whoever
//! runs it (`tether-bench --storm`).
//! `tether-loadgen busy` and `tether-loadgen backend` are the two ends of
//! the busy-sites measurement: sites that send and receive real packets,
//! and a sink and source on the backend host (see the `traffic` module).
//! `tether-loadgen renew --count N --broker A --dir D --hold S` holds the
//! tunnels and renews each site's certificate at half its lifetime, as
//! the agent does (see `loadgen_renew`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tether::h3client::{H3Client, quic_config};
use tether::state_dir::StateDir;
use tether_proto::api::{TokenRequest, TokenResponse};
use tether_shell::operator::AdminClient;
use tether_shell::quic::transport_config;
use tether_tests::Tunnel;
use tokio::sync::Semaphore;

mod loadgen_renew;
mod traffic;

/// Token requests in flight at once during `enroll`.
const TOKEN_REQUESTS: usize = 16;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create tokens and enroll sites.
    Enroll {
        #[arg(long)]
        count: usize,
        #[arg(long)]
        admin: String,
        #[arg(long)]
        admin_token: String,
        #[arg(long, value_delimiter = ',')]
        broker: Vec<String>,
        #[arg(long)]
        region: String,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 0)]
        retries: u32,
        /// Enroll only the first this many of the sites; the others are
        /// only registered (a token each), as sites not yet installed.
        #[arg(long)]
        enroll_first: Option<usize>,
        /// Enrollments in flight at once.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
    /// Connect enrolled sites and reconnect them after each loss.
    Storm {
        #[arg(long)]
        count: usize,
        /// The brokers: every site dials the first; a site whose broker
        /// is lost dials the others, the lost one last.
        #[arg(long, value_delimiter = ',', required = true)]
        broker: Vec<SocketAddr>,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// The sites' QUIC keepalive interval, seconds (the agent's
        /// `transport.keepalive`).
        #[arg(long, default_value_t = 5.0)]
        keepalive: f64,
    },
    /// Connect enrolled sites and hold their tunnels.
    Connect {
        #[arg(long)]
        count: usize,
        #[arg(long)]
        broker: SocketAddr,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 60)]
        hold: u64,
        /// The first site's index: sites `first .. first + count`.
        #[arg(long, default_value_t = 0)]
        first: usize,
    },
    /// Connect enrolled sites and send and count traffic on command.
    Busy {
        #[arg(long)]
        count: usize,
        #[arg(long)]
        broker: SocketAddr,
        #[arg(long)]
        dir: PathBuf,
        /// Where the sites send to (the backend's sink).
        #[arg(long)]
        sink: std::net::SocketAddrV4,
    },
    /// Count what arrives per source, and send to sites, on command.
    Backend {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Connect enrolled sites, hold their tunnels and renew their
    /// certificates at half-life.
    Renew {
        #[arg(long)]
        count: usize,
        #[arg(long)]
        broker: SocketAddr,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 600)]
        hold: u64,
    },
}

/// Further attempts `connect` makes for a site whose tunnel did not open
/// (0.5 s apart, doubling up to 5 s, as an agent backs off); a site that
/// still fails is counted as failed, and the others stay connected.
const CONNECT_RETRIES: u32 = 12;

fn site_dir(dir: &std::path::Path, i: usize) -> StateDir {
    StateDir::new(dir.join(format!("site-{i}")))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Enroll {
            count,
            admin,
            admin_token,
            broker,
            region,
            dir,
            retries,
            enroll_first,
            concurrency,
        } => {
            let started = Instant::now();
            // Tokens from a few requests at a time: the broker commits
            // concurrent writes together.
            let codes = tokio::task::spawn_blocking(move || {
                let mut codes = vec![String::new(); count];
                let per = count.div_ceil(TOKEN_REQUESTS).max(1);
                std::thread::scope(|scope| {
                    for (chunk, slots) in codes.chunks_mut(per).enumerate() {
                        let (admin, admin_token, region) = (&admin, &admin_token, &region);
                        scope.spawn(move || {
                            let client = AdminClient::new(admin, admin_token);
                            for (j, slot) in slots.iter_mut().enumerate() {
                                let i = chunk * per + j;
                                let t: TokenResponse = client
                                    .post(
                                        "/v1/tokens",
                                        &TokenRequest {
                                            site: format!("load-{i}").parse().unwrap(),
                                            region: region.parse().unwrap(),
                                            ttl: None,
                                        },
                                    )
                                    .unwrap();
                                *slot = t.code;
                            }
                        });
                    }
                });
                codes
            })
            .await?;
            println!(
                "tokens {} in {:.1} s",
                codes.len(),
                started.elapsed().as_secs_f64()
            );
            anyhow::ensure!(!broker.is_empty(), "--broker names no broker");
            let limit = Arc::new(Semaphore::new(concurrency.max(1)));
            // Enrollments finished so far: the rate per 1,000 is printed as
            // it goes (it falls as sites accumulate when a cost grows with
            // the number of enrolled sites).
            let finished = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let enrolling = Instant::now();
            let mut tasks = Vec::new();
            let enrolled = enroll_first.unwrap_or(count).min(count);
            for (i, code) in codes.into_iter().take(enrolled).enumerate() {
                let (limit, broker, state, finished) = (
                    limit.clone(),
                    broker[i % broker.len()].clone(),
                    site_dir(&dir, i),
                    finished.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let _permit = limit.acquire().await.unwrap();
                    let mut attempt = 0;
                    loop {
                        match tether::enroll::enroll(&broker, &code, &state, true, None).await {
                            Ok(_) => {
                                println!("enrolled {i}");
                                let n =
                                    finished.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                                if n % 1000 == 0 {
                                    println!(
                                        "progress {n} enrolled in {:.1} s",
                                        enrolling.elapsed().as_secs_f64()
                                    );
                                }
                                return (true, attempt);
                            }
                            Err(e) if attempt < retries => {
                                println!("retry {i}: {e:#}");
                                attempt += 1;
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                            Err(e) => {
                                println!("failed {i}: {e:#}");
                                return (false, attempt);
                            }
                        }
                    }
                }));
            }
            let (mut failed, mut retried) = (0, 0);
            for t in tasks {
                let (ok, attempts) = t.await?;
                failed += usize::from(!ok);
                retried += attempts;
            }
            println!(
                "enrolled {} in {:.1} s, {retried} retries, {failed} failed",
                enrolled - failed,
                started.elapsed().as_secs_f64()
            );
            anyhow::ensure!(failed == 0, "{failed} sites could not be enrolled");
        }
        Command::Connect {
            count,
            broker,
            dir,
            hold,
            first,
        } => {
            let endpoint = tether::dial::client_endpoint(&broker)?;
            let limit = Arc::new(Semaphore::new(64));
            let mut tasks = Vec::new();
            let started = Instant::now();
            for i in first..first + count {
                let (limit, endpoint, state) = (limit.clone(), endpoint.clone(), site_dir(&dir, i));
                tasks.push(tokio::spawn(async move {
                    let _permit = limit.acquire().await.unwrap();
                    // A broker that is slow to answer (a loaded machine)
                    // gets a few more tries, as an agent would retry.
                    let mut attempt = 0;
                    let mut pause = Duration::from_millis(500);
                    loop {
                        match open_tunnel(&endpoint, broker, &state, agent_keepalive()).await {
                            Ok(tunnel) => return (Some(tunnel), attempt),
                            Err(e) if attempt < CONNECT_RETRIES => {
                                println!("retry {i}: {e:#}");
                                attempt += 1;
                                tokio::time::sleep(pause).await;
                                pause = (pause * 2).min(Duration::from_secs(5));
                            }
                            Err(e) => {
                                println!("failed {i}: {e:#}");
                                return (None, attempt);
                            }
                        }
                    }
                }));
            }
            let (mut tunnels, mut retried, mut failed) = (Vec::new(), 0, 0);
            for t in tasks {
                let (tunnel, attempts) = t.await?;
                match tunnel {
                    Some(tunnel) => tunnels.push(tunnel),
                    None => failed += 1,
                }
                retried += attempts;
            }
            println!(
                "connected {} in {:.1} s, {retried} retries, {failed} failed",
                tunnels.len(),
                started.elapsed().as_secs_f64()
            );
            tokio::time::sleep(Duration::from_secs(hold)).await;
            drop(tunnels);
        }
        Command::Storm {
            count,
            broker,
            dir,
            rounds,
            keepalive,
        } => {
            storm(
                count,
                broker,
                &dir,
                rounds,
                Duration::from_secs_f64(keepalive),
            )
            .await?
        }
        Command::Busy {
            count,
            broker,
            dir,
            sink,
        } => traffic::busy(count, broker, &dir, sink).await?,
        Command::Backend { listen } => {
            tokio::task::spawn_blocking(move || traffic::backend(listen)).await??
        }
        Command::Renew {
            count,
            broker,
            dir,
            hold,
        } => loadgen_renew::run(count, broker, &dir, hold).await?,
    }
    Ok(())
}

/// What a site task reports.
enum Event {
    /// The site's tunnel is up with this IPv4 address, on this broker
    /// (its index in `--broker`).
    Up(usize, std::net::Ipv4Addr, usize),
    /// The site's connection ended: by a stateless reset (true) or
    /// otherwise (idle timeout, ...), with the connection's smoothed RTT
    /// estimate then (its probe timeouts follow from it).
    Lost(usize, bool, Duration),
}

/// The agent's default keepalive interval (`[transport] keepalive`).
pub(crate) fn agent_keepalive() -> Duration {
    humantime::parse_duration(&tether_config::client::TransportFile::default().keepalive)
        .unwrap_or(Duration::from_secs(3))
}

/// Opens one site's tunnel.
async fn open_tunnel(
    endpoint: &quinn::Endpoint,
    broker: SocketAddr,
    state: &StateDir,
    keepalive: Duration,
) -> anyhow::Result<Tunnel> {
    let creds = state.credentials()?;
    open_tunnel_with(endpoint, broker, client_tls(&creds), keepalive).await
}

/// Opens a tunnel to `broker` with the site's TLS configuration `tls`, as
/// the agent does with keepalive `keepalive`, and waits until the broker
/// has configured it.
pub(crate) async fn open_tunnel_with(
    endpoint: &quinn::Endpoint,
    broker: SocketAddr,
    tls: quinn::rustls::ClientConfig,
    keepalive: Duration,
) -> anyhow::Result<Tunnel> {
    // The agent's idle timeout: two keepalives and 2 s.
    let config = quic_config(
        tls,
        transport_config(keepalive, keepalive * 2 + Duration::from_secs(2)),
    )?;
    let mut client = H3Client::connect(endpoint, config, broker, &broker.ip().to_string()).await?;
    client.peer_settings(Duration::from_secs(10)).await?;
    let mut tunnel = Tunnel::open(client)
        .await
        .map_err(|(status, body)| anyhow::anyhow!("{status} {body}"))?;
    tokio::time::timeout(Duration::from_secs(10), tunnel.configured()).await?;
    Ok(tunnel)
}

/// One site: connects, reports, waits for the connection to end, and
/// dials again with the agent's backoff: the other brokers first (from a
/// different one per site), the lost one last.
async fn site_loop(
    i: usize,
    endpoint: quinn::Endpoint,
    brokers: Arc<[SocketAddr]>,
    state: StateDir,
    keepalive: Duration,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
) {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
    let n = brokers.len();
    let mut at = 0;
    loop {
        let mut step = Duration::from_millis(500);
        let tunnel = loop {
            match open_tunnel(&endpoint, brokers[at], &state, keepalive).await {
                Ok(t) => break t,
                Err(_) => {
                    at = (at + 1) % n;
                    // Half to all of the step, as the agent's jitter.
                    let wait = step.mul_f64(0.5 + rng.random::<f64>() * 0.5);
                    tokio::time::sleep(wait).await;
                    step = (step * 2).min(Duration::from_secs(5));
                }
            }
        };
        if events
            .send(Event::Up(i, tether_tests::v4(&tunnel), at))
            .is_err()
        {
            return;
        }
        let why = tunnel.client.conn.closed().await;
        let reset = matches!(why, quinn::ConnectionError::Reset);
        let rtt = tunnel.client.conn.rtt();
        if !reset {
            // Rare (a site that heard nothing, not even a reset, until its
            // idle timeout): what the connection sent and received, to
            // tell a packet lost on the way from one never sent.
            let stats = tunnel.client.conn.stats();
            eprintln!(
                "site {i}: connection ended without a reset: {why}; sent {} datagrams ({} PINGs, {} lost packets), received {}, RTT {:?}",
                stats.udp_tx.datagrams,
                stats.frame_tx.ping,
                stats.path.lost_packets,
                stats.udp_rx.datagrams,
                rtt
            );
        }
        if events.send(Event::Lost(i, reset, rtt)).is_err() {
            return;
        }
        if n > 1 {
            at = (at + 1 + i % (n - 1)) % n;
        }
        // The agent's first retry after a session that had settled.
        let first = Duration::from_millis(250).mul_f64(1.0 + rng.random::<f64>());
        tokio::time::sleep(first).await;
    }
}

/// The `storm` command.
async fn storm(
    count: usize,
    brokers: Vec<SocketAddr>,
    dir: &std::path::Path,
    rounds: usize,
    keepalive: Duration,
) -> anyhow::Result<()> {
    anyhow::ensure!(!brokers.is_empty(), "--broker names no broker");
    let endpoint = tether::dial::client_endpoint(&brokers[0])?;
    let brokers: Arc<[SocketAddr]> = brokers.into();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        tasks.spawn(site_loop(
            i,
            endpoint.clone(),
            brokers.clone(),
            site_dir(dir, i),
            keepalive,
            tx.clone(),
        ));
    }
    let mut first: Vec<Option<std::net::Ipv4Addr>> = vec![None; count];
    let mut up = vec![false; count];
    // The broker (index) each site is on.
    let mut on = vec![0usize; count];
    // Sites that lost their connection in this round: a broker restart
    // ends every connection, and a round is over only when every site
    // has noticed and is back (not when the first few to notice are).
    let (mut lost, mut n_lost) = (vec![false; count], 0usize);
    let (mut n_up, mut changed, mut round) = (0usize, 0usize, 0usize);
    let mut first_loss: Option<Instant> = None;
    let mut lost_at: Vec<Option<Instant>> = vec![None; count];
    let mut gaps: Vec<Duration> = Vec::new();
    // When each site noticed the loss (from the first loss of the round),
    // by stateless reset and otherwise.
    let (mut by_reset, mut by_other) = (Vec::new(), Vec::new());
    let mut rtts: Vec<Duration> = Vec::new();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Up(i, addr, broker) => {
                on[i] = broker;
                if !up[i] {
                    up[i] = true;
                    n_up += 1;
                }
                match first[i] {
                    None => first[i] = Some(addr),
                    Some(a) if a != addr => changed += 1,
                    Some(_) => {}
                }
                if let Some(at) = lost_at[i].take() {
                    gaps.push(at.elapsed());
                }
            }
            Event::Lost(i, reset, rtt) => {
                rtts.push(rtt);
                if up[i] {
                    up[i] = false;
                    n_up -= 1;
                }
                let since = first_loss.get_or_insert_with(Instant::now).elapsed();
                if reset {
                    by_reset.push(since);
                } else {
                    by_other.push(since);
                }
                lost_at[i] = Some(Instant::now());
                if !lost[i] {
                    lost[i] = true;
                    n_lost += 1;
                }
            }
        }
        if n_up < count || (first_loss.is_some() && n_lost < count) {
            continue;
        }
        match first_loss.take() {
            None if round == 0 && gaps.is_empty() => {
                println!(
                    "connected {count} in {:.1} s",
                    started.elapsed().as_secs_f64()
                );
            }
            None => {}
            Some(loss) => {
                round += 1;
                let pick = |v: &mut Vec<Duration>, q: f64| {
                    v.sort();
                    v.get(((v.len() as f64 - 1.0) * q).round() as usize)
                        .map(|d| d.as_secs_f64())
                        .unwrap_or(0.0)
                };
                let per_broker = (0..brokers.len())
                    .map(|b| on.iter().filter(|x| **x == b).count().to_string())
                    .collect::<Vec<_>>()
                    .join("/");
                println!(
                    "round {round}: {count} back {:.2} s after the first loss; per site lost-to-back p50 {:.2} s, max {:.2} s; {} reconnections; noticed by reset {} (p50 {:.2} s, max {:.2} s), otherwise {} (p50 {:.2} s, max {:.2} s); RTT estimate at the loss p50 {:.3} s, max {:.3} s; changed {changed}; per broker {per_broker}",
                    loss.elapsed().as_secs_f64(),
                    pick(&mut gaps, 0.5),
                    pick(&mut gaps, 1.0),
                    gaps.len(),
                    by_reset.len(),
                    pick(&mut by_reset, 0.5),
                    pick(&mut by_reset, 1.0),
                    by_other.len(),
                    pick(&mut by_other, 0.5),
                    pick(&mut by_other, 1.0),
                    pick(&mut rtts, 0.5),
                    pick(&mut rtts, 1.0),
                );
                gaps.clear();
                lost.iter_mut().for_each(|l| *l = false);
                n_lost = 0;
                by_reset.clear();
                by_other.clear();
                rtts.clear();
                if round >= rounds {
                    break;
                }
            }
        }
    }
    tasks.abort_all();
    Ok(())
}

fn client_tls(creds: &tether::state_dir::Credentials) -> quinn::rustls::ClientConfig {
    tether_pki::tls::client_config(
        &creds.ca,
        Some((creds.chain.clone(), creds.key.clone_key())),
    )
    .unwrap()
}
