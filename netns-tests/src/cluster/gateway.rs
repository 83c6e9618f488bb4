//! A cloud gateway on a [`Cluster`]: a `tether-gateway` node registered on
//! every broker, with a backend host behind it.
//!
//! ```text
//!  backend 10.31.0.10 ── gwnode (tether-gateway) ── core ── brokers, etcd, sites
//!                         198.18.1.2
//! ```
//!
//! Two steps, since the brokers' configuration names the gateway before
//! they start: [`GatewayKeys::new`] makes the gateway's WireGuard key and
//! the one key every broker of the deployment holds for its gateways, and
//! [`GatewayKeys::broker_setup`] is what each broker gets (its
//! `[[gateway]]` entry, a policy letting the gateway reach every site, and
//! the key file). Once the cluster runs, [`GatewayKeys::attach`] builds the
//! node and the backend on its router and writes the gateway's
//! configuration listing every broker; [`ClusterGateway::start`] runs it
//! and [`ClusterGateway::wait_routes`] waits until the backend reaches a
//! site through it.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{BrokerSetup, Cluster, broker_ip};
use crate::topology::{gateway_entry, read};
use crate::{NetNs, Proc, binary, link, wait_for};

/// The routing table the gateway installs its site routes in.
pub const TABLE: u32 = 7300;

/// The backend prefix behind the gateway node.
pub const BACKEND_PREFIX: &str = "10.31.0.0/24";

/// The backend host's address.
pub const BACKEND_ADDR: &str = "10.31.0.10";

/// The gateway's metrics listener, on the node's loopback.
const METRICS: &str = "http://127.0.0.1:9469/metrics";

/// Prints the public key of the WireGuard key in `work/name` (created on
/// first use), with `tether-gateway key`.
fn wg_key(work: &Path, name: &str) -> io::Result<String> {
    let config = work.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!("state_dir = \"{}\"\n", work.join(name).display()),
    )?;
    let out = crate::run(
        &binary("tether-gateway").display().to_string(),
        &["key", "-c", &config.display().to_string()],
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The keys of a gateway `id` of region `eu`, made before the brokers
/// start.
pub struct GatewayKeys {
    /// The gateway's id.
    pub id: String,
    /// Its WireGuard public key.
    pub key: String,
    /// The brokers' WireGuard key for their gateways (every broker of the
    /// deployment holds the same one).
    pub broker_key_file: Vec<u8>,
    /// The gateway's files (key, configuration, state, log).
    pub dir: tempfile::TempDir,
}

impl GatewayKeys {
    /// Makes the keys of gateway `id`.
    pub fn new(id: &str) -> io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let key = wg_key(dir.path(), id)?;
        wg_key(dir.path(), "brokers-wg")?;
        let broker_key_file = std::fs::read(dir.path().join("brokers-wg").join("wireguard.key"))?;
        Ok(Self {
            id: id.into(),
            key,
            broker_key_file,
            dir,
        })
    }

    /// What every broker gets: the gateway registered for the backend
    /// prefix, a policy letting it reach every site, and the brokers'
    /// gateway key.
    pub fn broker_setup(&self) -> BrokerSetup {
        BrokerSetup {
            extra_config: format!(
                "{}\n[[policy.allow]]\nname = \"backends\"\nfrom = [\"gateway:{}\"]\nto = [\"sites\"]\n",
                gateway_entry(&self.id, "eu", &self.key, BACKEND_PREFIX),
                self.id
            ),
            files: vec![("wireguard.key".into(), self.broker_key_file.clone())],
        }
    }

    /// As [`broker_setup`](Self::broker_setup), and the sites may reach
    /// the backends too (not only answer them).
    pub fn broker_setup_both_ways(&self) -> BrokerSetup {
        let mut setup = self.broker_setup();
        setup.extra_config += &format!(
            "\n[[policy.allow]]\nname = \"to-backends\"\nfrom = [\"sites\"]\nto = [\"gateway:{}\"]\n",
            self.id
        );
        setup
    }

    /// Builds the gateway node and the backend on `cluster`'s router and
    /// writes the gateway's configuration, listing every broker of the
    /// cluster in order. Checks that every broker has the same gateway key.
    pub fn attach(self, cluster: &Cluster) -> io::Result<ClusterGateway> {
        let every: Vec<usize> = (1..=cluster.brokers.len()).collect();
        self.attach_listing(cluster, &every)
    }

    /// As [`attach`](Self::attach), but the configuration lists only the
    /// brokers `listed` (1-based, in that order): the others the gateway
    /// can only learn from them.
    pub fn attach_listing(self, cluster: &Cluster, listed: &[usize]) -> io::Result<ClusterGateway> {
        let mut broker_key = None;
        for b in &cluster.brokers {
            let k = b.cli(&["gateway", "key"])?.trim().to_string();
            match &broker_key {
                None => broker_key = Some(k),
                Some(first) if *first != k => {
                    return Err(io::Error::other(format!(
                        "broker {} has another gateway key: {k} (broker 1: {first})",
                        b.n
                    )));
                }
                Some(_) => {}
            }
        }
        let broker_key = broker_key.ok_or_else(|| io::Error::other("no broker"))?;

        let node = NetNs::new("gwnode")?;
        let backend = NetNs::new("gwback")?;
        link(
            &cluster.core,
            "g1",
            "198.18.1.1/24",
            &node,
            "eth0",
            "198.18.1.2/24",
        )?;
        link(
            &node,
            "bk",
            "10.31.0.1/24",
            &backend,
            "eth0",
            &format!("{BACKEND_ADDR}/24"),
        )?;
        node.run("ip", &["route", "add", "default", "via", "198.18.1.1"])?;
        backend.run("ip", &["route", "add", "default", "via", "10.31.0.1"])?;
        // The node routes for its backends, as a Kubernetes node does.
        node.run("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"])?;

        let brokers: Vec<String> = listed
            .iter()
            .map(|n| format!("\"{}:51820\"", broker_ip(*n)))
            .collect();
        let config = self.dir.path().join(format!("{}.toml", self.id));
        std::fs::write(
            &config,
            format!(
                "id = \"{}\"\nregion = \"eu\"\npublished_cidr = \"203.0.113.0/24\"\n\
                 brokers = [{}]\nbroker_public_key = \"{}\"\n\
                 state_dir = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:9469\"\n",
                self.id,
                brokers.join(", "),
                broker_key,
                self.dir.path().join(&self.id).display()
            ),
        )?;
        let log = self.dir.path().join(format!("{}.log", self.id));
        Ok(ClusterGateway {
            proc: None,
            node,
            backend,
            brokers: cluster.brokers.len(),
            config,
            log,
            id: self.id,
            dir: self.dir,
        })
    }
}

/// A `tether-gateway` on its node, with a backend host behind it.
/// Fields drop in order: the gateway stops before its namespaces go.
pub struct ClusterGateway {
    /// The running gateway, if it runs.
    pub proc: Option<Proc>,
    /// The gateway node (on the cluster's router, 198.18.1.2).
    pub node: NetNs,
    /// The backend host ([`BACKEND_ADDR`]), routing everything via the
    /// node.
    pub backend: NetNs,
    /// How many brokers the cluster has (brokers 1 to N), which its log
    /// may name.
    pub brokers: usize,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its log.
    pub log: PathBuf,
    /// Its id.
    pub id: String,
    /// Its files.
    pub dir: tempfile::TempDir,
}

impl ClusterGateway {
    /// A file in its working directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `tether-gateway preflight` on the node: its report (stdout).
    pub fn preflight(&self) -> io::Result<String> {
        let out = self
            .node
            .command(&binary("tether-gateway").display().to_string())
            .args(["preflight", "-c", &self.config.display().to_string()])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// Starts the gateway on its node (its log appended to
    /// [`log`](Self::log)).
    pub fn start(&mut self) -> io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = self
            .node
            .command(&binary("tether-gateway").display().to_string());
        cmd.args(["run", "-c", &self.config.display().to_string()])
            .stdout(file.try_clone()?)
            .stderr(file);
        self.proc = Some(Proc::from_child(cmd.spawn()?, Some(self.log.clone())));
        Ok(())
    }

    /// Waits until the gateway routes `addr` (a site's overlay address)
    /// and the backend gets an answer from it: up to 20 s each.
    pub fn wait_routes(&self, addr: &str) -> io::Result<()> {
        if !wait_for(Duration::from_secs(20), || self.table().contains(addr)) {
            return Err(io::Error::other(format!(
                "the gateway does not route the site {addr}:\n{}",
                self.log_text()
            )));
        }
        if !wait_for(Duration::from_secs(20), || {
            self.backend.succeeds("ping", &["-c", "1", "-W", "1", addr])
        }) {
            return Err(io::Error::other(format!(
                "the backend does not reach the site {addr}:\n{}",
                self.log_text()
            )));
        }
        Ok(())
    }

    /// The gateway's site routes on the node, one per line.
    pub fn table(&self) -> String {
        self.node
            .run("ip", &["route", "show", "table", &TABLE.to_string()])
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        read(&self.log)
    }

    /// Its `/metrics` text (empty if it does not answer).
    pub fn metrics_text(&self) -> String {
        self.node
            .command("curl")
            .args(["-s", "-m", "2", METRICS])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    }

    /// The sum of a metric's samples whose line starts with `prefix`.
    pub fn metric(&self, prefix: &str) -> f64 {
        crate::metric_sum(&self.metrics_text(), prefix)
    }

    /// Drops everything the gateway node sends to broker `n` (nftables on
    /// the node), so that the gateway hears nothing more from it and
    /// moves its traffic to another broker, while the broker itself and
    /// its sites go on as before. [`unsilence`](Self::unsilence) ends it.
    pub fn silence(&self, n: usize) -> io::Result<()> {
        let rules = format!(
            "table inet silence{n} {{\n chain output {{\n  type filter hook output priority 0; policy accept;\n  ip daddr {} drop\n }}\n}}\n",
            broker_ip(n)
        );
        let file = self.path(&format!("silence{n}.nft"));
        std::fs::write(&file, rules)?;
        self.node
            .run("nft", &["-f", &file.display().to_string()])
            .map(|_| ())
    }

    /// Ends [`silence`](Self::silence) of broker `n`.
    pub fn unsilence(&self, n: usize) -> io::Result<()> {
        self.node
            .run("nft", &["delete", "table", "inet", &format!("silence{n}")])
            .map(|_| ())
    }

    /// The broker (1-based) its log last named as carrying its traffic;
    /// broker 1 if it names none.
    pub fn active_broker(&self) -> usize {
        self.named_broker().unwrap_or(1)
    }

    /// The broker (1-based) its log last named as carrying its traffic,
    /// if it names one.
    pub fn named_broker(&self) -> Option<usize> {
        let log = self.log_text();
        log.lines()
            .rev()
            .filter(|l| {
                l.contains("traffic goes through this broker")
                    || l.contains("traffic moved to this broker")
            })
            .find_map(|l| {
                let addr = l.split("broker=").nth(1)?.split(':').next()?;
                (1..=self.brokers).find(|n| broker_ip(*n) == addr)
            })
    }

    /// How many times its log says a broker answers (once when each
    /// broker first answers, and again after each comes back).
    pub fn answers(&self) -> usize {
        self.log_text().matches("broker answers").count()
    }

    /// Starts `ping` on the backend towards `addr` every 10 ms, with a
    /// receive timestamp on every line and a line for each reply missing
    /// when the next request goes (`-D -O`), logged to `log`.
    pub fn ping(&self, addr: &str, log: &Path) -> io::Result<Proc> {
        self.backend.spawn(
            "ping",
            // A count, not a deadline: with a deadline ping stops at the
            // first ICMP error.
            &["-D", "-O", "-i", "0.01", "-W", "1", "-c", "1000000", addr],
            Some(log.to_path_buf()),
        )
    }
}

/// The replies in a `ping -D` log: (receive time, icmp_seq).
pub fn replies(log: &str) -> Vec<(f64, u64)> {
    log.lines()
        .filter(|l| l.contains(" bytes from "))
        .filter_map(|l| {
            let ts = l.strip_prefix('[')?.split(']').next()?.parse().ok()?;
            let seq = l.split("icmp_seq=").nth(1)?.split_whitespace().next()?;
            Some((ts, seq.parse().ok()?))
        })
        .collect()
}

/// The outage around `at` (a Unix time) in a `ping -D` log: the longest
/// wait between two replies from the last one before `at` on, in seconds.
pub fn longest_gap(log: &str, at: f64) -> f64 {
    longest_gap_between(log, at, f64::INFINITY)
}

/// The longest wait between two replies in a `ping -D` log, from the last
/// reply before `from` to the last one before `until` (Unix times), in
/// seconds.
pub fn longest_gap_between(log: &str, from: f64, until: f64) -> f64 {
    let seen = replies(log);
    let last_before = seen
        .iter()
        .map(|(t, _)| *t)
        .filter(|t| *t <= from)
        .fold(from, f64::max);
    let after = seen
        .iter()
        .map(|(t, _)| *t)
        .filter(|t| *t > from && *t <= until);
    std::iter::once(last_before)
        .chain(after)
        .collect::<Vec<_>>()
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(0.0, f64::max)
}

/// The requests in a `ping -D` log that got no reply, among those after the
/// last reply received up to `from` and before the first received after
/// `until` (Unix times): the pings an outage in between lost.
pub fn lost_between(log: &str, from: f64, until: f64) -> Vec<u64> {
    let seen = replies(log);
    let Some(first) = seen
        .iter()
        .filter(|(t, _)| *t <= from)
        .map(|(_, s)| *s)
        .max()
    else {
        return Vec::new();
    };
    let Some(last) = seen
        .iter()
        .filter(|(t, _)| *t > until)
        .map(|(_, s)| *s)
        .min()
    else {
        return Vec::new();
    };
    let answered: std::collections::BTreeSet<u64> = seen.iter().map(|(_, s)| *s).collect();
    (first + 1..last)
        .filter(|s| !answered.contains(s))
        .collect()
}

/// The current Unix time in seconds (the clock of `ping -D`).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
