//! End-to-end tests as root: real binaries in Linux network namespaces.
//!
//! This library is the harness: [`NetNs`] creates a uniquely named namespace
//! and removes it on drop — also when the test panics — after killing every
//! process still inside (and, before a process's first namespace, those an
//! earlier run left behind when it was killed: [`sweep_stale`]); [`Proc`]
//! kills its process on drop; [`link`] joins two namespaces with a veth pair
//! created inside them, so parallel tests never collide on interface names.
//! All traffic stays inside the test's own namespaces.

pub mod browser;
pub mod cluster;
pub mod lan;
pub mod stream;
pub mod topology;
pub mod wan;

use std::io;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Whether the netns tests can run. Without root they are skipped, except
/// under CI (`CI` set), where skipping would hide failures: then this panics.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "netns tests must run as root in CI"
    );
    eprintln!("skipped: netns tests need root");
    false
}

/// Runs a command, failing with its output if it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> io::Result<Output> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`{program} {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(out)
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A network namespace owned by a test.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `tt-<role>-<pid>-<n>` with loopback up.
    pub fn new(role: &str) -> io::Result<Self> {
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(|| {
            sweep_stale();
        });
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("tt-{role}-{}-{n}", std::process::id());
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.run("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs a command inside the namespace, failing if it exits non-zero.
    pub fn run(&self, program: &str, args: &[&str]) -> io::Result<Output> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a command inside the namespace, whatever its exit status, and
    /// returns what it printed (standard output, then standard error).
    pub fn transcript(&self, program: &str, args: &[&str]) -> String {
        match self.command(program).args(args).output() {
            Ok(out) => format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => format!("cannot run {program}: {e}"),
        }
    }

    /// Runs a command inside the namespace and returns whether it succeeded.
    pub fn succeeds(&self, program: &str, args: &[&str]) -> bool {
        self.command(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Starts a long-running process inside the namespace.
    pub fn spawn(&self, program: &str, args: &[&str], log: Option<PathBuf>) -> io::Result<Proc> {
        let mut cmd = self.command(program);
        cmd.args(args);
        Proc::start(cmd, log)
    }

    /// A command that enters only the namespace's network, through
    /// `nsenter --net` (one small exec and a `setns`), as a service started
    /// by its supervisor inside a namespace would; `ip netns exec` also
    /// enters a new mount namespace, remounts `/sys` and binds
    /// `/etc/netns/NAME` (not done here), which lengthens a process's start.
    /// For measuring a process's own start.
    pub fn command_entered(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program);
        cmd.stdin(Stdio::null());
        cmd
    }
}

impl Proc {
    /// Spawns `cmd` with its output to `log` (or discarded).
    pub fn start(mut cmd: Command, log: Option<PathBuf>) -> io::Result<Proc> {
        match &log {
            Some(path) => {
                let file = std::fs::File::create(path)?;
                cmd.stdout(file.try_clone()?).stderr(file);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        Ok(Proc {
            child: cmd.spawn()?,
            log,
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        remove_netns(&self.name);
    }
}

/// Kills every process still inside namespace `name`, then deletes it.
fn remove_netns(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let _ = Command::new("ip").args(["netns", "del", name]).status();
}

/// The process that created namespace `name`, if it is one of this
/// harness's (`tt-<role>-<pid>-<n>`).
pub fn netns_owner(name: &str) -> Option<u32> {
    let mut parts = name.strip_prefix("tt-")?.rsplitn(3, '-');
    parts.next()?.parse::<usize>().ok()?;
    let pid = parts.next()?.parse().ok()?;
    parts.next().filter(|role| !role.is_empty())?;
    Some(pid)
}

/// Removes the namespaces of this harness whose creating process is gone
/// (a test run killed with SIGKILL, or stopped with Ctrl-C, drops
/// nothing), with the processes still running inside them (brokers,
/// agents, etcd, iperf3 of that run, which would otherwise keep running
/// and skew every later measurement). Returns the names removed. Runs once
/// per process before its first namespace; a namespace of a live process
/// (another test binary running now) is left alone.
pub fn sweep_stale() -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(owner) = netns_owner(name) else {
            continue;
        };
        if owner == std::process::id() || std::path::Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        remove_netns(name);
        removed.push(name.to_string());
    }
    removed
}

/// Whether a namespace of this name exists.
pub fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

/// Joins `a` and `b` with a veth pair: `a_if` in `a` with `a_addr` (CIDR
/// notation) and `b_if` in `b` with `b_addr`, both up.
pub fn link(
    a: &NetNs,
    a_if: &str,
    a_addr: &str,
    b: &NetNs,
    b_if: &str,
    b_addr: &str,
) -> io::Result<()> {
    run(
        "ip",
        &[
            "-n",
            a.name(),
            "link",
            "add",
            a_if,
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            b.name(),
        ],
    )?;
    for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        ns.run("ip", &["addr", "add", addr, "dev", ifname])?;
        ns.run("ip", &["link", "set", ifname, "up"])?;
    }
    Ok(())
}

/// A process started by a test; killed on drop.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    log: Option<PathBuf>,
}

impl Proc {
    /// Takes charge of a child already spawned (its output redirected to
    /// `log`, if any): it is killed on drop.
    pub fn from_child(child: Child, log: Option<PathBuf>) -> Self {
        Self { child, log }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// What it has written to its log so far.
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Kills it with SIGKILL (as `kill -9`) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal);
    }

    /// Waits up to `timeout` for it to exit; returns whether it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        wait_for(timeout, || self.exited())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The sequence numbers of the pings in a `ping` log that got no reply
/// although a later one did (those sent after the last reply were still in
/// flight when the ping was stopped).
pub fn lost_pings(log: &str) -> Vec<u64> {
    let answered: std::collections::BTreeSet<u64> = log
        .lines()
        .filter(|l| l.contains(" bytes from "))
        .filter_map(|l| {
            let seq = l.split("icmp_seq=").nth(1)?;
            seq.split_whitespace().next()?.parse().ok()
        })
        .collect();
    let last = answered.last().copied().unwrap_or(0);
    (1..last).filter(|n| !answered.contains(n)).collect()
}

/// Sent and received echo requests from a finished `ping` summary.
pub fn ping_summary(text: &str) -> (u64, u64) {
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary in:\n{text}"));
    let mut numbers = line
        .split(',')
        .filter_map(|p| p.split_whitespace().next()?.parse::<u64>().ok());
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0))
}

/// The directory holding the workspace's built binaries: `TETHER_BIN_DIR`
/// if set, else the directory of the running executable (for a test, the
/// parent of its `deps/` directory).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TETHER_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(PathBuf::from).unwrap_or_default()
    } else {
        dir
    }
}

/// The path of a workspace binary, with a clear error if it was not built.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`)",
        path.display()
    );
    path
}

/// The sum of the samples in a Prometheus text `metrics` whose line starts
/// with `prefix`.
pub fn metric_sum(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
