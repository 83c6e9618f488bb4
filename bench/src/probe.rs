//! Connect-to-first-packet with a fine clock: a UDP echo on the backend and
//! a prober on the site that sends a numbered datagram every 200 µs while a
//! tunnel comes up, and reports when the first echo came back.
//!
//! `ping` sends about every 10 ms while no reply arrives, whatever `-i`
//! says, so it cannot tell 3 ms from 12 ms. The two halves run as hidden
//! subcommands of `tether-bench` inside the namespaces (`probe-echo` on the
//! backend, `probe-send` on the site); [`first_reply`] starts them around
//! the start of a tunnel and reads the prober's report. Both run on the
//! same machine, so their wall clocks agree with the bench's.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Subcommand;
use tether_netns_tests::topology::{Topology, read};
use tether_netns_tests::{NetNs, Proc, binary, wait_for};

/// The UDP port of the echo on the backend.
pub(crate) const ECHO_PORT: u16 = 7;
/// The backend's address, as the site reaches it through a tunnel.
const BACKEND: &str = "10.20.0.10";
/// How often the prober sends while no echo came back.
const INTERVAL: Duration = Duration::from_micros(200);

/// The hidden halves of the probe, run inside the namespaces.
#[derive(Subcommand)]
pub(crate) enum Probe {
    /// Echo every UDP datagram on `--listen` back to its sender.
    #[command(hide = true, name = "probe-echo")]
    Echo {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Send a datagram to `--to` every 200 µs until one comes back (or
    /// `--timeout-secs` pass); print when it was sent and when its echo
    /// arrived, as seconds since the Unix epoch.
    #[command(hide = true, name = "probe-send")]
    Send {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
    },
    /// Send a numbered datagram to `--to` every `--interval-ms` until
    /// killed; print `echo SEQ SENT RECEIVED` (seconds since the Unix
    /// epoch) for every echo that comes back.
    #[command(hide = true, name = "probe-stream")]
    Stream {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 10)]
        interval_ms: u64,
    },
    /// Send `--count` datagrams to `--to`, 10 ms apart, each after the
    /// echo of the one before (or 1 s); print the round trips' p50 and p99
    /// in µs: what a userspace echo costs next to ping's kernel one.
    #[command(hide = true, name = "probe-rtt")]
    Rtt {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 300)]
        count: u32,
    },
}

pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl Probe {
    /// Runs this half until it is killed (echo) or done (prober).
    pub(crate) fn run(self) -> std::io::Result<()> {
        match self {
            Probe::Echo { listen } => echo(listen),
            Probe::Send { to, timeout_secs } => send(to, Duration::from_secs(timeout_secs)),
            Probe::Rtt { to, count } => rtt(to, count),
            Probe::Stream { to, interval_ms } => stream(to, Duration::from_millis(interval_ms)),
        }
    }
}

fn echo(listen: SocketAddr) -> std::io::Result<()> {
    let socket = UdpSocket::bind(listen)?;
    println!("echo listening on {listen}");
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = socket.recv_from(&mut buf)?;
        let _ = socket.send_to(&buf[..n], from);
    }
}

fn rtt(to: SocketAddr, count: u32) -> std::io::Result<()> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(to)?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut rtts = Vec::new();
    let mut buf = [0u8; 64];
    for seq in 0..count {
        let sent = Instant::now();
        socket.send(&seq.to_be_bytes())?;
        while let Ok(n) = socket.recv(&mut buf) {
            if n == 4 && buf[..4] == seq.to_be_bytes() {
                rtts.push(sent.elapsed().as_secs_f64() * 1e6);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    rtts.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        rtts.get(((rtts.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "{} of {count} echoed: p50 {:.0} µs, p99 {:.0} µs",
        rtts.len(),
        pct(0.5),
        pct(0.99)
    );
    Ok(())
}

/// Sends probes `[seq u64][sent-at f64]` every `interval` from a thread
/// and prints every echo, until killed.
fn stream(to: SocketAddr, interval: Duration) -> std::io::Result<()> {
    use std::io::Write;
    // Not connected, as in `send`: a tunnel that moves or is down for a
    // while leaves no error stuck to the socket.
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    let sender = socket.try_clone()?;
    std::thread::spawn(move || {
        let mut seq: u64 = 0;
        let mut next = Instant::now();
        loop {
            let mut probe = [0u8; 16];
            probe[..8].copy_from_slice(&seq.to_be_bytes());
            probe[8..].copy_from_slice(&unix_now().to_be_bytes());
            let _ = sender.send_to(&probe, to);
            seq += 1;
            next += interval;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    });
    println!("probing {to}");
    let mut out = std::io::stdout().lock();
    let mut buf = [0u8; 64];
    loop {
        let (seq, sent, received) = recv_echo(&socket, &mut buf)?;
        writeln!(out, "echo {seq} {sent:.6} {received:.6}")?;
        out.flush()?;
    }
}

/// Sends probes `[seq u64][sent-at f64]` from a thread while this one waits
/// for the first echo.
fn send(to: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    // Not connected: the source address follows the routes as they change
    // (the tunnel device appears), and errors of the unrouted phase (ICMP
    // unreachable) do not stick to the socket.
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    let sender = socket.try_clone()?;
    let deadline = Instant::now() + timeout;
    std::thread::spawn(move || {
        let mut seq: u64 = 0;
        let mut next = Instant::now();
        while Instant::now() < deadline {
            let mut probe = [0u8; 16];
            probe[..8].copy_from_slice(&seq.to_be_bytes());
            probe[8..].copy_from_slice(&unix_now().to_be_bytes());
            let _ = sender.send_to(&probe, to);
            if seq == 0 {
                println!("probing {to}");
            }
            seq += 1;
            next += INTERVAL;
            // Sleep most of the gap, spin the rest: a lone sleep of 200 µs
            // overshoots by tens of µs on a busy machine.
            let now = Instant::now();
            if next > now + Duration::from_micros(60) {
                std::thread::sleep(next - now - Duration::from_micros(50));
            }
            while Instant::now() < next {
                std::hint::spin_loop();
            }
        }
    });
    socket.set_read_timeout(Some(timeout))?;
    let mut buf = [0u8; 64];
    let (seq, sent, received) = recv_echo(&socket, &mut buf)?;
    println!("first echo: probe {seq} sent at {sent:.6}, echo received at {received:.6}");
    Ok(())
}

/// Receives the next echo of a probe: its sequence number, when it was
/// sent and when its echo arrived (UNIX seconds); shorter datagrams are
/// skipped.
fn recv_echo(socket: &UdpSocket, buf: &mut [u8; 64]) -> std::io::Result<(u64, f64, f64)> {
    loop {
        let (n, _) = socket.recv_from(buf)?;
        let received = unix_now();
        if n < 16 {
            continue;
        }
        let seq = u64::from_be_bytes(buf[..8].try_into().unwrap_or_default());
        let sent = f64::from_be_bytes(buf[8..16].try_into().unwrap_or_default());
        return Ok((seq, sent, received));
    }
}

/// Starts the UDP echo (`probe-echo` on [`ECHO_PORT`]) in `ns`, logging to
/// `log`, and waits until it listens.
pub(crate) fn start_echo(ns: &NetNs, log: std::path::PathBuf) -> Proc {
    let bench = binary("tether-bench").display().to_string();
    let listen = format!("0.0.0.0:{ECHO_PORT}");
    let echo = ns
        .spawn(
            &bench,
            &["probe-echo", "--listen", &listen],
            Some(log.clone()),
        )
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || read(&log).contains("listening")),
        "probe echo did not start:\n{}",
        read(&log)
    );
    echo
}

/// Starts a tunnel with `start` while the site probes the backend every
/// 200 µs, and returns what `start` returned and the time from just before
/// `start` to the arrival of the first echo (neither the prober's process
/// start nor polling is counted; the resolution is the probe interval plus
/// one round trip).
pub(crate) fn first_reply<T>(
    topo: &Topology,
    log: &str,
    start: impl FnOnce() -> T,
) -> (T, Option<Duration>) {
    let bench = binary("tether-bench").display().to_string();
    let _echo = start_echo(&topo.backend, topo.path(&format!("{log}.echo")));
    let log = topo.path(log);
    let to = format!("{BACKEND}:{ECHO_PORT}");
    let prober = topo
        .site
        .spawn(&bench, &["probe-send", "--to", &to], Some(log.clone()))
        .unwrap();
    // The prober is sending before the clock starts.
    assert!(
        wait_for(Duration::from_secs(10), || read(&log).contains("probing")),
        "prober did not start:\n{}",
        read(&log)
    );
    let t0 = unix_now();
    let out = start();
    let mut first = None;
    wait_for(Duration::from_secs(35), || {
        first = read(&log).lines().find_map(|l| {
            l.strip_prefix("first echo: ")?
                .rsplit("echo received at ")
                .next()?
                .trim()
                .parse::<f64>()
                .ok()
        });
        first.is_some()
    });
    drop(prober);
    let setup = first.map(|at| Duration::from_secs_f64((at - t0).max(0.0)));
    (out, setup)
}

/// What the agent's and the broker's logs say about one start, as seconds
/// after the clock started (`None` when the line is missing).
struct Timeline {
    /// The agent's first log line: exec of the binary (and namespace entry)
    /// done, configuration and state read.
    starting: Option<f64>,
    /// The broker accepted the CONNECT-IP request (its log).
    site_connected: Option<f64>,
    /// The QUIC handshake and HTTP/3 SETTINGS exchange done (agent).
    connected: Option<f64>,
    /// The tunnel device has its address (agent).
    address: Option<f64>,
    /// The routes into the tunnel are installed (agent).
    routes: Option<f64>,
    /// The first echo came back through the tunnel.
    first_echo: Option<f64>,
}

/// The time of the first line of `log` at or after `since` (seconds since
/// the Unix epoch) that contains `needle`, from its RFC 3339 timestamp.
fn logged_at(log: &str, needle: &str, since: f64) -> Option<f64> {
    log.lines().filter(|l| l.contains(needle)).find_map(|l| {
        let stamp = l.split_whitespace().next()?;
        let at = humantime::parse_rfc3339(stamp)
            .ok()?
            .duration_since(UNIX_EPOCH)
            .ok()?
            .as_secs_f64();
        (at >= since).then_some(at)
    })
}

/// Starts the site's agent `rounds` times (stopping it in between) while
/// probing, and prints when each step of its start happened, from the
/// agent's and the broker's own log timestamps. The agent logs at
/// `agent_log` (a `RUST_LOG` value); the broker logs at the `RUST_LOG` the
/// bench was started with.
///
/// With `hold` the last agent stays up that long afterwards, with the
/// processes' ids printed, for a profiler to attach to.
pub(crate) fn timeline(topo: &Topology, rounds: usize, agent_log: &str, hold: Option<u64>) {
    let state = topo.path("site-state");
    topo.enroll("bench-site", &state).unwrap();
    let broker_log = topo.path("broker.log");
    let mut rows = Vec::new();
    for round in 0..rounds {
        let log = format!("agent-{round}.log");
        let probe_log = format!("first-probe-{round}.log");
        let mut t0 = 0.0;
        let (agent, first) = first_reply(topo, &probe_log, || {
            t0 = unix_now();
            topo.spawn_up_entered(&state, &log, &[("RUST_LOG", agent_log)])
                .unwrap()
        });
        let agent_text = read(&topo.path(&log));
        let broker_text = read(&broker_log);
        let rel = |at: Option<f64>| at.map(|a| a - t0);
        rows.push(Timeline {
            starting: rel(logged_at(&agent_text, "starting", t0)),
            site_connected: rel(logged_at(&broker_text, "site connected over", t0)),
            connected: rel(logged_at(&agent_text, "connected to the broker", t0)),
            address: rel(logged_at(&agent_text, "this site is reachable as", t0)),
            routes: rel(logged_at(&agent_text, "routes to the cloud installed", t0)),
            first_echo: first.map(|d| d.as_secs_f64()),
        });
        if round + 1 == rounds
            && let Some(secs) = hold
        {
            let broker = topo.broker.as_ref().map(|b| b.id()).unwrap_or(0);
            println!(
                "holding {secs} s: agent pid {}, broker pid {broker}, site address {}, topology in {}",
                agent.id(),
                topo.site_address(4).unwrap_or_default(),
                topo.path("").display()
            );
            std::thread::sleep(Duration::from_secs(secs));
        }
        drop(agent);
        // The device goes with the agent; the next round starts without it.
        wait_for(Duration::from_secs(10), || {
            !topo.site.succeeds("ip", &["link", "show", "tether0"])
        });
        std::thread::sleep(Duration::from_millis(300));
    }
    let ms = |v: Option<f64>| {
        v.map(|s| format!("{:.1}", s * 1000.0))
            .unwrap_or_else(|| "-".into())
    };
    println!();
    println!("agent start to first packet, ms after starting the agent (probe every 200 µs)");
    println!(
        "{:>5} {:>9} {:>11} {:>11} {:>9} {:>8} {:>11}",
        "round", "starting", "broker: up", "connected", "address", "routes", "first echo"
    );
    for (i, r) in rows.iter().enumerate() {
        println!(
            "{:>5} {:>9} {:>11} {:>11} {:>9} {:>8} {:>11}",
            i,
            ms(r.starting),
            ms(r.site_connected),
            ms(r.connected),
            ms(r.address),
            ms(r.routes),
            ms(r.first_echo)
        );
    }
    let median = |f: fn(&Timeline) -> Option<f64>| {
        let mut v: Vec<f64> = rows.iter().filter_map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    // What process start costs without the agent's own work: through
    // `nsenter --net`, as the agent above; through `ip netns exec`, which
    // the other benches use, for comparison.
    let exec_ms = |mut command: std::process::Command| {
        let mut v: Vec<f64> = (0..7)
            .map(|_| {
                let at = Instant::now();
                let _ = command.output();
                at.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let tether = binary("tether").display().to_string();
    let mut version = topo.site.command_entered(&tether);
    version.arg("--version");
    let entered_version = exec_ms(version);
    let netns_true = exec_ms(topo.site.command("true"));
    let mut version = topo.site.command(&tether);
    version.arg("--version");
    let netns_version = exec_ms(version);
    println!(
        "{:>5} {:>9} {:>11} {:>11} {:>9} {:>8} {:>11}",
        "med",
        ms(median(|r| r.starting)),
        ms(median(|r| r.site_connected)),
        ms(median(|r| r.connected)),
        ms(median(|r| r.address)),
        ms(median(|r| r.routes)),
        ms(median(|r| r.first_echo))
    );
    println!(
        "process start alone (median of 7): `nsenter --net=… tether --version` (as the agent above) {entered_version:.1} ms; through `ip netns exec` (not used above): `true` {netns_true:.1} ms, `tether --version` {netns_version:.1} ms"
    );
}
