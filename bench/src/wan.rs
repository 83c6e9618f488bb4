//! `tether-wan`: an impaired WAN link for the lossy-path benchmark.
//!
//! The kernel of the benchmark machines has no `netem` qdisc, so loss and
//! delay are built into the topology: this program runs in a namespace
//! between two veth ends and forwards every Ethernet frame from one to the
//! other (raw `AF_PACKET` sockets), dropping each frame with probability
//! `--loss` and holding each surviving frame for `--delay` before it is
//! sent on. Both directions are impaired alike, so `--delay 25ms` gives a
//! 50 ms round trip.
//!
//! ```text
//! tether-wan --a a --b b --loss 1 --delay 25ms --seed 7 --stats wan.json
//! ```
//!
//! Besides loss and delay it can reorder (`--reorder P`: a frame is held
//! `--reorder-gap` longer than the others, so the frames behind it
//! overtake it), duplicate (`--duplicate P`: the frame is sent twice) and
//! cut the link: SIGUSR1 takes it down (every frame is dropped and counted
//! as `blackholed`), SIGUSR2 brings it back.
//!
//! Frames larger than the link's MTU would mean the senders hand over
//! segmentation-offloaded super-frames (dropping one would drop dozens of
//! packets at once): the benchmark turns offloads off on both veth pairs,
//! and this program counts such frames (`oversize`) so a run can prove it.
//! Counters are written to `--stats` as JSON every 200 ms and on exit.
//!
//! The delay line is bounded (`--queue-bytes`, default 32 MiB, far above
//! the bandwidth-delay product of the benchmark's paths); frames beyond it
//! are counted as `overflow`, never silently lost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use pnet_datalink::{Channel, Config, DataLinkReceiver, DataLinkSender, NetworkInterface};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

#[derive(Parser)]
struct Args {
    /// One end of the link (an interface in this namespace).
    #[arg(long)]
    a: String,
    /// The other end.
    #[arg(long)]
    b: String,
    /// Loss in percent, per direction (0 to 100).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// One-way delay, per direction (e.g. `25ms`).
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    delay: Duration,
    /// Reordering in percent, per direction: such a frame is held
    /// `--reorder-gap` longer than the others.
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// How much longer a reordered frame is held.
    #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
    reorder_gap: Duration,
    /// Duplication in percent, per direction: such a frame is sent twice.
    #[arg(long, default_value_t = 0.0)]
    duplicate: f64,
    /// Seed of the loss pattern.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Bytes the delay line may hold per direction.
    #[arg(long, default_value_t = 32 << 20)]
    queue_bytes: usize,
    /// Where to write the counters (JSON).
    #[arg(long)]
    stats: Option<PathBuf>,
}

/// Counters of one direction.
#[derive(Default)]
struct Counters {
    received: AtomicU64,
    dropped: AtomicU64,
    overflow: AtomicU64,
    oversize: AtomicU64,
    sent: AtomicU64,
    send_errors: AtomicU64,
    reordered: AtomicU64,
    duplicated: AtomicU64,
    blackholed: AtomicU64,
}

impl Counters {
    fn json(&self) -> serde_json::Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "received": g(&self.received),
            "dropped": g(&self.dropped),
            "overflow": g(&self.overflow),
            "oversize": g(&self.oversize),
            "sent": g(&self.sent),
            "send_errors": g(&self.send_errors),
            "reordered": g(&self.reordered),
            "duplicated": g(&self.duplicated),
            "blackholed": g(&self.blackholed),
        })
    }
}

/// The link's state, shared by all threads.
struct Switches {
    /// The link is down: every frame is dropped.
    down: Arc<AtomicBool>,
    /// The program is ending.
    stop: Arc<AtomicBool>,
}

/// A frame held back: due time, then arrival number (so frames due at the
/// same time leave in arrival order).
type Frame = Reverse<(Instant, u64, Vec<u8>)>;

/// Frames ordered by the time each is due, and their bytes in all.
type Held = (BinaryHeap<Frame>, usize);

/// The frames held back, released in the order they are due: arrival
/// order, except for the frames picked for reordering.
struct DelayLine {
    queue: Mutex<Held>,
    ready: Condvar,
}

fn channel(iface: &NetworkInterface) -> (Box<dyn DataLinkSender>, Box<dyn DataLinkReceiver>) {
    let config = Config {
        read_buffer_size: 65536,
        write_buffer_size: 65536,
        read_timeout: Some(Duration::from_millis(100)),
        promiscuous: true,
        ..Config::default()
    };
    match pnet_datalink::channel(iface, config) {
        Ok(Channel::Ethernet(tx, rx)) => (tx, rx),
        Ok(_) => panic!("{}: not an Ethernet channel", iface.name),
        Err(e) => panic!("{}: {e}", iface.name),
    }
}

/// Moves frames from `rx` through the delay line to `tx`.
fn direction(
    mut rx: Box<dyn DataLinkReceiver>,
    mut tx: Box<dyn DataLinkSender>,
    args: &Args,
    seed: u64,
    mtu: usize,
    counters: Arc<Counters>,
    switches: &Switches,
) -> [std::thread::JoinHandle<()>; 2] {
    let (down, stop) = (switches.down.clone(), switches.stop.clone());
    let line = Arc::new(DelayLine {
        queue: Mutex::new((BinaryHeap::new(), 0)),
        ready: Condvar::new(),
    });
    let (loss, delay, limit) = (args.loss / 100.0, args.delay, args.queue_bytes);
    let (reorder, gap, duplicate) = (
        args.reorder / 100.0,
        args.reorder_gap,
        args.duplicate / 100.0,
    );
    let receiver = {
        let (line, counters, stop) = (line.clone(), counters.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut arrival = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let frame = match rx.next() {
                    Ok(frame) => frame,
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
                    Err(e) => panic!("receive: {e}"),
                };
                counters.received.fetch_add(1, Ordering::Relaxed);
                // Ethernet header (14) plus the IP MTU.
                if frame.len() > mtu + 14 {
                    counters.oversize.fetch_add(1, Ordering::Relaxed);
                }
                if down.load(Ordering::Relaxed) {
                    counters.blackholed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if loss > 0.0 && rng.random::<f64>() < loss {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let mut due = Instant::now() + delay;
                if reorder > 0.0 && rng.random::<f64>() < reorder {
                    counters.reordered.fetch_add(1, Ordering::Relaxed);
                    due += gap;
                }
                let copies = if duplicate > 0.0 && rng.random::<f64>() < duplicate {
                    counters.duplicated.fetch_add(1, Ordering::Relaxed);
                    2
                } else {
                    1
                };
                let mut q = line.queue.lock().unwrap();
                if q.1 + copies * frame.len() > limit {
                    counters.overflow.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                for _ in 0..copies {
                    q.1 += frame.len();
                    q.0.push(Reverse((due, arrival, frame.to_vec())));
                    arrival += 1;
                }
                drop(q);
                line.ready.notify_one();
            }
            line.ready.notify_one();
        })
    };
    let sender = std::thread::spawn(move || {
        loop {
            let frame = {
                let mut q = line.queue.lock().unwrap();
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let now = Instant::now();
                    // The earliest frame leaves when it is due; a frame
                    // pushed meanwhile with an earlier due time (one not
                    // picked for reordering overtaking one that was) wakes
                    // this wait and is looked at first.
                    let wait = match q.0.peek() {
                        Some(Reverse((due, _, _))) if *due <= now => {
                            let Reverse((_, _, frame)) = q.0.pop().unwrap();
                            q.1 -= frame.len();
                            break frame;
                        }
                        Some(Reverse((due, _, _))) => *due - now,
                        None => Duration::from_millis(100),
                    };
                    q = line.ready.wait_timeout(q, wait).unwrap().0;
                }
            };
            match tx.send_to(&frame, None) {
                Some(Ok(())) => counters.sent.fetch_add(1, Ordering::Relaxed),
                _ => counters.send_errors.fetch_add(1, Ordering::Relaxed),
            };
        }
    });
    [receiver, sender]
}

fn interface(name: &str) -> NetworkInterface {
    pnet_datalink::interfaces()
        .into_iter()
        .find(|i| i.name == name)
        .unwrap_or_else(|| panic!("no interface {name}"))
}

fn mtu(name: &str) -> usize {
    std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))
        .ok()
        .and_then(|m| m.trim().parse().ok())
        .unwrap_or(1500)
}

fn main() {
    let args = Args::parse();
    for (name, p) in [
        ("--loss", args.loss),
        ("--reorder", args.reorder),
        ("--duplicate", args.duplicate),
    ] {
        assert!(
            (0.0..=100.0).contains(&p),
            "{name} is a percentage from 0 to 100"
        );
    }
    let (a, b) = (interface(&args.a), interface(&args.b));
    let (a_tx, a_rx) = channel(&a);
    let (b_tx, b_rx) = channel(&b);
    let switches = Switches {
        down: Arc::new(AtomicBool::new(false)),
        stop: Arc::new(AtomicBool::new(false)),
    };
    let (down, stop) = (switches.down.clone(), switches.stop.clone());
    let (ab, ba) = (Arc::new(Counters::default()), Arc::new(Counters::default()));
    let mut threads = Vec::new();
    threads.extend(direction(
        a_rx,
        b_tx,
        &args,
        args.seed,
        mtu(&args.b),
        ab.clone(),
        &switches,
    ));
    threads.extend(direction(
        b_rx,
        a_tx,
        &args,
        args.seed.wrapping_add(1),
        mtu(&args.a),
        ba.clone(),
        &switches,
    ));
    let write_stats = || {
        if let Some(path) = &args.stats {
            let json = serde_json::json!({
                "loss_percent": args.loss,
                "delay_ms": args.delay.as_secs_f64() * 1000.0,
                "down": down.load(Ordering::Relaxed),
                (args.a.clone() + "->" + &args.b): ab.json(),
                (args.b.clone() + "->" + &args.a): ba.json(),
            });
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, json.to_string()).is_ok() {
                let _ = std::fs::rename(&tmp, path);
            }
        }
    };
    // Runs until killed; SIGTERM and SIGINT end it after a last write.
    // SIGUSR1 takes the link down, SIGUSR2 brings it back.
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGUSR1, SIGUSR2])
        .expect("signal handler");
    eprintln!(
        "tether-wan: {} <-> {}, loss {} %, delay {:?}, reorder {} % by {:?}, duplicate {} % each way",
        args.a, args.b, args.loss, args.delay, args.reorder, args.reorder_gap, args.duplicate
    );
    'run: loop {
        for sig in signals.pending() {
            match sig {
                SIGUSR1 => down.store(true, Ordering::Relaxed),
                SIGUSR2 => down.store(false, Ordering::Relaxed),
                _ => break 'run,
            }
        }
        write_stats();
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    write_stats();
}
