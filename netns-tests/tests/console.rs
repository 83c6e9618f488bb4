//! The fleet console watching a real agent die: the real broker and the
//! real `tether up` in the hospital topology, Debian's Chromium (driven by
//! Playwright, `tests/console/agent_killed.py`) inside the broker's
//! namespace on its admin listener. The agent is killed with SIGKILL by
//! its PID, as a power cut would (it closes nothing), and the console must
//! show the site offline with "the connection was lost" within the bound
//! docs/console.md states; started again, the site is online again and
//! its timeline has the loss between the two tunnels.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tether_netns_tests::browser::{self, CHROMIUM, repo_root};
use tether_netns_tests::topology::{Topology, read};
use tether_netns_tests::{Proc, require_root};

/// How long after an idle agent's death the broker notices it, at most,
/// with the default keepalives (docs/operations.md, "When a killed site's
/// routes leave": about 13 s), plus the site list's refresh (2 s): the
/// bound docs/console.md states.
const OFFLINE_BOUND: Duration = Duration::from_secs(15);
/// What the browser adds on a loaded machine: Playwright polls the page
/// (at most 1 s apart) and the page renders.
const BROWSER_SLACK: Duration = Duration::from_secs(2);
/// The agent is an idle site: the broker cannot know it is gone before
/// the smallest idle timeout in force (the agent's, 8 s, counted from its
/// last packet, at most one of its 3 s keepalives before the kill).
const OFFLINE_NOT_BEFORE: Duration = Duration::from_secs(5);
/// The whole browser session, at most.
const DEADLINE: Duration = Duration::from_secs(150);

/// The browser script's lines, read on a thread of their own so that
/// every wait is bounded.
struct Script {
    lines: mpsc::Receiver<String>,
    stdin: std::process::ChildStdin,
    started: Instant,
}

impl Script {
    /// Waits for `word` (other lines are printed); panics with `why` when
    /// the script ends or the deadline passes first.
    fn expect(&self, word: &str, why: &str) -> Instant {
        loop {
            let left = DEADLINE.saturating_sub(self.started.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == word => return Instant::now(),
                Ok(_) => {}
                Err(_) => panic!("{why}: the browser script ended or timed out first"),
            }
        }
    }

    fn say(&mut self, word: &str) {
        writeln!(self.stdin, "{word}").unwrap();
        self.stdin.flush().unwrap();
    }
}

/// The PID's command name, as `/proc` has it.
fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
fn the_console_shows_a_killed_agent_offline_and_back_online() {
    if !require_root() {
        return;
    }
    if !browser::available() {
        return;
    }
    let topo = Topology::new("").unwrap();
    let state = topo.path("site-state");
    topo.enroll("clinic-kill", &state).unwrap();
    let (mut agent, _) = topo.up(&state, "agent-1.log").unwrap();
    let viewer = read(&topo.path("broker").join("viewer.token"));

    // Chromium runs in the broker's namespace, where the admin listener
    // is; the namespace's removal kills it if this test fails.
    let mut cmd = topo.cloud.command("python3");
    cmd.arg(repo_root().join("tests/console/agent_killed.py"))
        .env("CONSOLE_URL", "http://127.0.0.1:7070/console/")
        .env("VIEWER_TOKEN", viewer.trim())
        .env("SITE", "clinic-kill")
        .env("CHROMIUM", CHROMIUM)
        .env("WAIT_MS", "60000")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().expect("python3 runs");
    let stdout = child.stdout.take().unwrap();
    let stdin = child.stdin.take().unwrap();
    let mut python = Proc::from_child(child, None);
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("browser: {line}");
            let _ = tx.send(line);
        }
    });
    let mut script = Script {
        lines,
        stdin,
        started: Instant::now(),
    };
    let agent_log = || read(&topo.path("agent-1.log"));

    script.expect("ONLINE", "the console never showed the site online");

    // SIGKILL by PID: `ip netns exec` execs the agent, so the PID is
    // tether's own.
    let pid = agent.id();
    assert_eq!(comm(pid), "tether", "PID {pid} is not the agent");
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        agent.wait_exit(Duration::from_secs(5)),
        "the agent survived SIGKILL"
    );
    script.say("killed");
    let offline = script
        .expect("OFFLINE", "the console never showed the site offline")
        .duration_since(killed);
    println!(
        "the console showed the killed agent's site offline after {:.2} s",
        offline.as_secs_f64()
    );
    assert!(
        offline <= OFFLINE_BOUND + BROWSER_SLACK,
        "the console showed the site offline {:.2} s after the kill; docs/console.md states {} s\nbroker:\n{}",
        offline.as_secs_f64(),
        OFFLINE_BOUND.as_secs(),
        read(&topo.path("broker.log"))
    );
    assert!(
        offline >= OFFLINE_NOT_BEFORE,
        "offline {:.2} s after the kill: sooner than any idle timeout, so the agent's \
         death was not silent (it must close nothing)\nagent:\n{}",
        offline.as_secs_f64(),
        agent_log()
    );

    // The same agent, same state directory, started again.
    let restarted = Instant::now();
    let (_agent, _) = topo.up(&state, "agent-2.log").unwrap();
    script.say("started");
    let online = script
        .expect("ONLINE", "the console never showed the site online again")
        .duration_since(restarted);
    println!(
        "the console showed the restarted agent's site online {:.2} s after its start",
        online.as_secs_f64()
    );
    script.expect("OK", "the timeline was not as expected");
    assert!(
        python.wait_exit(Duration::from_secs(30)),
        "the browser script did not end"
    );
}
