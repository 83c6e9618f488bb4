//! Several brokers on a three-member etcd cluster, every member, broker and
//! site in its own namespace, all joined by one router.
//!
//! ```text
//!  etcdN    10.77.N.2/24   ─┐                 ┌─ brokerN 203.0.113.(4N+2)/30
//!  (N=1..3, client :2379,   ├── core router ──┤   (tunnel :443, link :51821,
//!   peer :2380)             │  (nftables)     │    admin 127.0.0.1:7070)
//!                           └─ siteK 192.168.K.10/24 (tether up)
//! ```
//!
//! Partitions are real: nftables on the router drops what a broker sends
//! to the etcd members and what they send back ([`Cluster::partition`]).
//! The published CIDR is 203.0.113.0/24; region `eu` has the pool
//! 100.64.0.0/16; the sites `lab-1` and `lab-2` may reach each other.

pub mod gateway;

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::topology::{overlay_address, read};
use crate::{NetNs, Proc, binary, link, wait_for};

/// The key prefix of the deployment in etcd.
pub const PREFIX: &str = "/tether/ha/";

/// How long a read of the store tries the members before it fails.
pub const READ_PATIENCE: Duration = Duration::from_secs(10);

/// An etcd member.
pub struct Member {
    /// Its namespace.
    pub ns: NetNs,
    /// The running etcd, if it runs.
    pub proc: Option<Proc>,
    /// Its number (1-3).
    pub n: usize,
}

impl Member {
    /// Its client URL.
    pub fn client_url(&self) -> String {
        format!("http://{}:2379", member_ip(self.n))
    }
}

/// A broker.
pub struct Broker {
    /// Its namespace.
    pub ns: NetNs,
    /// The running broker, if it runs.
    pub proc: Option<Proc>,
    /// Its number (1-3).
    pub n: usize,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its log.
    pub log: PathBuf,
}

impl Broker {
    /// Its tunnel address (inside the published CIDR).
    pub fn addr(&self) -> String {
        broker_ip(self.n)
    }

    /// Whether its admin API says it is ready.
    pub fn ready(&self) -> bool {
        self.ns
            .succeeds("curl", &["-sf", "-m", "1", "http://127.0.0.1:7070/readyz"])
    }

    /// Runs its CLI (`tether-broker ARGS -c CONFIG`); returns stdout.
    pub fn cli(&self, args: &[&str]) -> io::Result<String> {
        let cfg = self.config.display().to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-c", &cfg]);
        let out = self
            .ns
            .run(&binary("tether-broker").display().to_string(), &all)?;
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// Its `/metrics` text (empty if it does not answer).
    pub fn metrics_text(&self) -> String {
        self.ns
            .command("curl")
            .args(["-s", "-m", "2", "http://127.0.0.1:7070/metrics"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    }

    /// The sum of a metric's samples whose line starts with `prefix`.
    pub fn metric(&self, prefix: &str) -> f64 {
        crate::metric_sum(&self.metrics_text(), prefix)
    }
}

/// A site.
pub struct Site {
    /// Its namespace.
    pub ns: NetNs,
    /// The running agent, if it runs.
    pub agent: Option<Proc>,
    /// Its number.
    pub n: usize,
    /// Its name (site id).
    pub name: String,
    /// Its state directory.
    pub state: PathBuf,
}

impl Site {
    /// Its overlay IPv4 address, if its tunnel is up.
    pub fn address(&self) -> Option<String> {
        overlay_address(&self.ns, 4)
    }
}

/// The cluster: the router, three etcd members, the brokers and sites.
/// Fields drop in order: sites, brokers and members stop before the router.
pub struct Cluster {
    /// The sites.
    pub sites: Vec<Site>,
    /// The brokers.
    pub brokers: Vec<Broker>,
    /// The etcd members.
    pub members: Vec<Member>,
    /// The router joining everything.
    pub core: NetNs,
    /// Working files (configs, data, logs).
    pub dir: tempfile::TempDir,
}

/// What every broker of a [`Cluster`] gets besides the common
/// configuration.
#[derive(Debug, Default, Clone)]
pub struct BrokerSetup {
    /// Appended to each broker's configuration file.
    pub extra_config: String,
    /// Files (name, contents) put in each broker's data directory before
    /// its first start.
    pub files: Vec<(String, Vec<u8>)>,
}

/// The etcd member `n`'s address.
pub fn member_ip(n: usize) -> String {
    format!("10.77.{n}.2")
}

/// The broker `n`'s address.
pub fn broker_ip(n: usize) -> String {
    format!("203.0.113.{}", 4 * n + 2)
}

fn sysctl(ns: &NetNs, key: &str, value: &str) -> io::Result<()> {
    ns.run("sysctl", &["-q", "-w", &format!("{key}={value}")])
        .map(|_| ())
}

impl Cluster {
    /// Builds the router and three etcd members and waits until the cluster
    /// is healthy; then `brokers` brokers (the first creates the CA, the
    /// others get a copy) and `sites` site namespaces (not enrolled).
    pub fn new(brokers: usize, sites: usize) -> io::Result<Self> {
        Self::with_brokers(brokers, sites, &BrokerSetup::default())
    }

    /// As [`Cluster::new`], with `setup` added to every broker: more
    /// configuration, and files in its data directory before its first
    /// start.
    pub fn with_brokers(brokers: usize, sites: usize, setup: &BrokerSetup) -> io::Result<Self> {
        let mut cluster = Self {
            sites: Vec::new(),
            brokers: Vec::new(),
            members: Vec::new(),
            core: NetNs::new("core")?,
            dir: tempfile::tempdir()?,
        };
        sysctl(&cluster.core, "net.ipv4.ip_forward", "1")?;
        for n in 1..=3 {
            let ns = NetNs::new(&format!("etcd{n}"))?;
            link(
                &cluster.core,
                &format!("e{n}"),
                &format!("10.77.{n}.1/24"),
                &ns,
                "eth0",
                &format!("{}/24", member_ip(n)),
            )?;
            ns.run(
                "ip",
                &["route", "add", "default", "via", &format!("10.77.{n}.1")],
            )?;
            cluster.members.push(Member { ns, proc: None, n });
        }
        for n in 1..=3 {
            cluster.start_member(n)?;
        }
        for n in 1..=3 {
            let up = wait_for(Duration::from_secs(30), || cluster.member_healthy(n));
            if !up {
                return Err(io::Error::other(format!(
                    "etcd member {n} is not healthy:\n{}",
                    read(&cluster.path(&format!("etcd{n}.log")))
                )));
            }
        }
        for n in 1..=brokers {
            let ns = NetNs::new(&format!("broker{n}"))?;
            link(
                &cluster.core,
                &format!("b{n}"),
                &format!("203.0.113.{}/30", 4 * n + 1),
                &ns,
                "eth0",
                &format!("{}/30", broker_ip(n)),
            )?;
            ns.run(
                "ip",
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("203.0.113.{}", 4 * n + 1),
                ],
            )?;
            let data = cluster.path(&format!("broker{n}"));
            let config = cluster.path(&format!("broker{n}.toml"));
            let kek = cluster.path("ca-kek");
            if !kek.exists() {
                crate::run(
                    &binary("tether-broker").display().to_string(),
                    &["ca", "new-kek", "--out", &kek.display().to_string()],
                )?;
            }
            std::fs::create_dir_all(&data)?;
            for (name, bytes) in &setup.files {
                std::fs::write(data.join(name), bytes)?;
            }
            std::fs::write(&config, broker_config(n, &data, &kek) + &setup.extra_config)?;
            let log = cluster.path(&format!("broker{n}.log"));
            cluster.brokers.push(Broker {
                ns,
                proc: None,
                n,
                config,
                log,
            });
            // The deployment's CA lives in etcd: the first broker makes it,
            // the others read it, all with the same key-encryption key.
            cluster.start_broker(n)?;
        }
        for n in 1..=sites {
            let ns = NetNs::new(&format!("site{n}"))?;
            link(
                &cluster.core,
                &format!("s{n}"),
                &format!("192.168.{n}.1/24"),
                &ns,
                "eth0",
                &format!("192.168.{n}.10/24"),
            )?;
            ns.run(
                "ip",
                &["route", "add", "default", "via", &format!("192.168.{n}.1")],
            )?;
            let state = cluster.path(&format!("site{n}-state"));
            cluster.sites.push(Site {
                ns,
                agent: None,
                n,
                name: format!("lab-{n}"),
                state,
            });
        }
        Ok(cluster)
    }

    /// A file in the working directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The client URLs of the three members, comma-separated.
    pub fn endpoints(&self) -> String {
        (1..=3)
            .map(|n| format!("http://{}:2379", member_ip(n)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts etcd member `n` (1-3) on its data directory (a new cluster
    /// the first time, a restart afterwards).
    pub fn start_member(&mut self, n: usize) -> io::Result<()> {
        let ip = member_ip(n);
        let data = self.path(&format!("etcd{n}.data"));
        let initial = (1..=3)
            .map(|i| format!("m{i}=http://{}:2380", member_ip(i)))
            .collect::<Vec<_>>()
            .join(",");
        let args = [
            format!("--name=m{n}"),
            format!("--data-dir={}", data.display()),
            format!("--listen-client-urls=http://{ip}:2379"),
            format!("--advertise-client-urls=http://{ip}:2379"),
            format!("--listen-peer-urls=http://{ip}:2380"),
            format!("--initial-advertise-peer-urls=http://{ip}:2380"),
            format!("--initial-cluster={initial}"),
            "--initial-cluster-state=new".into(),
            "--initial-cluster-token=tether-ha".into(),
            "--log-level=warn".into(),
        ];
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = self.path(&format!("etcd{n}.log"));
        // Appends: a restarted member's log follows the first.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut cmd = self.members[n - 1].ns.command("/usr/bin/etcd");
        cmd.args(&refs).stdout(file.try_clone()?).stderr(file);
        let proc = Proc::from_child(cmd.spawn()?, Some(log));
        self.members[n - 1].proc = Some(proc);
        Ok(())
    }

    /// Whether member `n` answers its health check.
    pub fn member_healthy(&self, n: usize) -> bool {
        let url = format!("http://{}:2379/health", member_ip(n));
        self.core
            .command("curl")
            .args(["-s", "-m", "1", &url])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("\"health\":\"true\""))
    }

    /// The number (1-3) of the member that is the leader, as the members
    /// that answer say.
    pub fn leader(&self) -> Option<usize> {
        for m in &self.members {
            let Some(status) = self.gateway(m.n, "/v3/maintenance/status", "{}") else {
                continue;
            };
            let me = status["header"]["member_id"].as_str().unwrap_or_default();
            let leader = status["leader"].as_str().unwrap_or_default();
            if !me.is_empty() && me == leader {
                return Some(m.n);
            }
        }
        None
    }

    /// A POST to member `n`'s JSON gateway (the v3 API over HTTP).
    fn gateway(&self, n: usize, path: &str, body: &str) -> Option<serde_json::Value> {
        let url = format!("http://{}:2379{path}", member_ip(n));
        let out = self
            .core
            .command("curl")
            .args(["-s", "-m", "2", "-X", "POST", &url, "-d", body])
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Every key under `PREFIX` + `dir` with its value, read from a member
    /// that answers (a linearizable read). Tries the members for up to
    /// [`READ_PATIENCE`]: a member that rejoins can start an election, and
    /// no member answers a linearizable read until it has a leader.
    pub fn keys(&self, dir: &str) -> io::Result<Vec<(String, String)>> {
        let deadline = Instant::now() + READ_PATIENCE;
        loop {
            match self.keys_once(dir) {
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }

    fn keys_once(&self, dir: &str) -> io::Result<Vec<(String, String)>> {
        use data_encoding::BASE64;
        let start = format!("{PREFIX}{dir}");
        let mut end = start.clone().into_bytes();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let body = serde_json::json!({
            "key": BASE64.encode(start.as_bytes()),
            "range_end": BASE64.encode(&end),
        })
        .to_string();
        for n in 1..=3 {
            let Some(answer) = self.gateway(n, "/v3/kv/range", &body) else {
                continue;
            };
            if answer.get("header").is_none() {
                continue;
            }
            let decode = |v: &serde_json::Value| {
                v.as_str()
                    .and_then(|s| BASE64.decode(s.as_bytes()).ok())
                    .map(|b| String::from_utf8_lossy(&b).to_string())
                    .unwrap_or_default()
            };
            let kvs = answer["kvs"].as_array().cloned().unwrap_or_default();
            return Ok(kvs
                .iter()
                .map(|kv| (decode(&kv["key"]), decode(&kv["value"])))
                .collect());
        }
        Err(io::Error::other("no etcd member answered a read"))
    }

    /// Every key under `PREFIX` + `dir` with its value as member `n` alone
    /// holds it (a serializable read, answered from its own copy without
    /// asking the leader), and the revision of that copy; None if the
    /// member does not answer.
    pub fn keys_at(&self, n: usize, dir: &str) -> Option<(u64, Vec<(String, String)>)> {
        use data_encoding::BASE64;
        let start = format!("{PREFIX}{dir}");
        let mut end = start.clone().into_bytes();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let body = serde_json::json!({
            "key": BASE64.encode(start.as_bytes()),
            "range_end": BASE64.encode(&end),
            "serializable": true,
        })
        .to_string();
        let answer = self.gateway(n, "/v3/kv/range", &body)?;
        let revision = answer["header"]["revision"].as_str()?.parse().ok()?;
        let decode = |v: &serde_json::Value| {
            v.as_str()
                .and_then(|s| BASE64.decode(s.as_bytes()).ok())
                .map(|b| String::from_utf8_lossy(&b).to_string())
                .unwrap_or_default()
        };
        let kvs = answer["kvs"].as_array().cloned().unwrap_or_default();
        Some((
            revision,
            kvs.iter()
                .map(|kv| (decode(&kv["key"]), decode(&kv["value"])))
                .collect(),
        ))
    }

    /// The store's revision (one more for each write of any key), from a
    /// member that answers (trying for up to [`READ_PATIENCE`], as
    /// [`Cluster::keys`] does).
    pub fn revision(&self) -> io::Result<u64> {
        let deadline = Instant::now() + READ_PATIENCE;
        loop {
            match self.revision_once() {
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }

    fn revision_once(&self) -> io::Result<u64> {
        use data_encoding::BASE64;
        let body = serde_json::json!({
            "key": BASE64.encode(PREFIX.as_bytes()),
            "count_only": true,
        })
        .to_string();
        (1..=3)
            .filter_map(|n| self.gateway(n, "/v3/kv/range", &body))
            .find_map(|a| a["header"]["revision"].as_str()?.parse().ok())
            .ok_or_else(|| io::Error::other("no etcd member answered a read"))
    }

    /// The sum of the samples of metric `name` that member `n` serves on
    /// its client URL's `/metrics` (None if it does not answer or has no
    /// such metric).
    pub fn member_metric(&self, n: usize, name: &str) -> Option<f64> {
        let url = format!("http://{}:2379/metrics", member_ip(n));
        let out = self
            .core
            .command("curl")
            .args(["-s", "-m", "2", &url])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let values: Vec<f64> = text
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with([' ', '{']))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    /// Watches every key under `PREFIX` on member `n` (its JSON gateway,
    /// one JSON object per line in `log`) until the process is dropped.
    pub fn watch(&self, n: usize, log: &Path) -> io::Result<Proc> {
        use data_encoding::BASE64;
        let mut end = PREFIX.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let body = serde_json::json!({
            "create_request": {
                "key": BASE64.encode(PREFIX.as_bytes()),
                "range_end": BASE64.encode(&end),
            }
        })
        .to_string();
        let url = format!("http://{}:2379/v3/watch", member_ip(n));
        self.core.spawn(
            "curl",
            &["-sN", "-X", "POST", &url, "-d", &body],
            Some(log.to_path_buf()),
        )
    }

    /// Starts broker `n` and waits until it is ready.
    pub fn start_broker(&mut self, n: usize) -> io::Result<()> {
        let b = &mut self.brokers[n - 1];
        let cfg = b.config.display().to_string();
        // Appends: a restarted broker's log follows the first.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&b.log)?;
        let mut cmd = b.ns.command(&binary("tether-broker").display().to_string());
        cmd.args(["run", "-c", &cfg])
            .stdout(file.try_clone()?)
            .stderr(file);
        b.proc = Some(Proc::from_child(cmd.spawn()?, Some(b.log.clone())));
        let b = &self.brokers[n - 1];
        if !wait_for(Duration::from_secs(30), || b.ready()) {
            return Err(io::Error::other(format!(
                "broker {n} did not start:\n{}",
                read(&b.log)
            )));
        }
        Ok(())
    }

    /// Cuts broker `n` off from every etcd member (both directions, also
    /// flows already established); the sites still reach it.
    pub fn partition(&self, n: usize) -> io::Result<()> {
        let rules = format!(
            "table inet cut{n} {{\n chain forward {{\n  type filter hook forward priority -10; policy accept;\n  iifname \"b{n}\" ip daddr 10.77.0.0/16 drop\n  oifname \"b{n}\" ip saddr 10.77.0.0/16 drop\n }}\n}}\n"
        );
        let file = self.path(&format!("cut{n}.nft"));
        std::fs::write(&file, rules)?;
        self.core
            .run("nft", &["-f", &file.display().to_string()])
            .map(|_| ())
    }

    /// Ends the partition of broker `n`.
    pub fn heal(&self, n: usize) -> io::Result<()> {
        self.core
            .run("nft", &["delete", "table", "inet", &format!("cut{n}")])
            .map(|_| ())
    }

    /// Cuts etcd member `m` off from the other two members, and broker
    /// `broker` off from those two as well (both directions, also flows
    /// already established): the member is a minority of one, the broker
    /// reaches only that member, and the other brokers still reach all
    /// three.
    pub fn partition_member(&self, m: usize, broker: usize) -> io::Result<()> {
        let others = (1..=3)
            .filter(|i| *i != m)
            .map(member_ip)
            .collect::<Vec<_>>()
            .join(", ");
        let rules = format!(
            "table inet minority{m} {{\n chain forward {{\n  type filter hook forward priority -10; policy accept;\n  iifname {{ \"e{m}\", \"b{broker}\" }} ip daddr {{ {others} }} drop\n  oifname {{ \"e{m}\", \"b{broker}\" }} ip saddr {{ {others} }} drop\n }}\n}}\n"
        );
        let file = self.path(&format!("minority{m}.nft"));
        std::fs::write(&file, rules)?;
        self.core
            .run("nft", &["-f", &file.display().to_string()])
            .map(|_| ())
    }

    /// Cuts etcd member `m` off from the other two members only (both
    /// directions, also flows already established): it is a minority of
    /// one, which still answers the brokers but can commit nothing.
    pub fn isolate_member(&self, m: usize) -> io::Result<()> {
        let others = (1..=3)
            .filter(|i| *i != m)
            .map(member_ip)
            .collect::<Vec<_>>()
            .join(", ");
        let rules = format!(
            "table inet isolated{m} {{\n chain forward {{\n  type filter hook forward priority -10; policy accept;\n  iifname \"e{m}\" ip daddr {{ {others} }} drop\n  oifname \"e{m}\" ip saddr {{ {others} }} drop\n }}\n}}\n"
        );
        let file = self.path(&format!("isolated{m}.nft"));
        std::fs::write(&file, rules)?;
        self.core
            .run("nft", &["-f", &file.display().to_string()])
            .map(|_| ())
    }

    /// Ends the isolation of etcd member `m`.
    pub fn rejoin_member(&self, m: usize) -> io::Result<()> {
        self.core
            .run("nft", &["delete", "table", "inet", &format!("isolated{m}")])
            .map(|_| ())
    }

    /// Ends the partition of etcd member `m`.
    pub fn heal_member(&self, m: usize) -> io::Result<()> {
        self.core
            .run("nft", &["delete", "table", "inet", &format!("minority{m}")])
            .map(|_| ())
    }

    /// Drops UDP 443 from site `k` (1-based) on the router, so that its
    /// agent speaks HTTP/2 over TCP to every broker.
    pub fn block_udp(&self, k: usize) -> io::Result<()> {
        let rules = format!(
            "table inet udp{k} {{\n chain forward {{\n  type filter hook forward priority -10; policy accept;\n  iifname \"s{k}\" udp dport 443 drop\n }}\n}}\n"
        );
        let file = self.path(&format!("udp{k}.nft"));
        std::fs::write(&file, rules)?;
        self.core
            .run("nft", &["-f", &file.display().to_string()])
            .map(|_| ())
    }

    /// Creates a token for site `name` at broker `at` (its CLI) and returns
    /// the code.
    pub fn token(&self, at: usize, name: &str) -> io::Result<String> {
        let out =
            self.brokers[at - 1].cli(&["token", "create", "--site", name, "--region", "eu"])?;
        out.split_whitespace()
            .find(|w| w.starts_with("tt1-"))
            .map(str::to_string)
            .ok_or_else(|| io::Error::other(format!("no code in: {out}")))
    }

    /// Enrolls site `k` (1-based) at broker `at`.
    pub fn enroll(&self, k: usize, at: usize) -> io::Result<()> {
        let site = &self.sites[k - 1];
        let code = self.token(at, &site.name)?;
        site.ns
            .run(
                &binary("tether").display().to_string(),
                &[
                    "enroll",
                    "--broker",
                    &broker_ip(at),
                    "--token",
                    &code,
                    "--state-dir",
                    &site.state.display().to_string(),
                ],
            )
            .map(|_| ())
    }

    /// Starts the agent of site `k` and waits for its overlay address.
    pub fn up(&mut self, k: usize) -> io::Result<String> {
        let log = self.path(&format!("site{k}.log"));
        let site = &mut self.sites[k - 1];
        let agent = site.ns.spawn(
            &binary("tether").display().to_string(),
            &["up", "--state-dir", &site.state.display().to_string()],
            Some(log.clone()),
        )?;
        site.agent = Some(agent);
        let site = &self.sites[k - 1];
        let mut address = None;
        wait_for(Duration::from_secs(20), || {
            address = site.address();
            address.is_some()
        });
        address
            .ok_or_else(|| io::Error::other(format!("site {k} did not come up:\n{}", read(&log))))
    }

    /// Waits up to `timeout` until every site is held by exactly one
    /// broker other than `left` (1-based); returns whether they were and
    /// the holders of each site at the end.
    pub fn wait_sites_off(&self, left: usize, timeout: Duration) -> (bool, Vec<Vec<usize>>) {
        let moved = wait_for(timeout, || {
            self.sites
                .iter()
                .all(|s| matches!(self.holders(&s.name)[..], [b] if b != left))
        });
        let holders = self.sites.iter().map(|s| self.holders(&s.name)).collect();
        (moved, holders)
    }

    /// Which broker (1-based) holds a session of `site`, by asking every
    /// running broker's admin API; every broker that lists it.
    pub fn holders(&self, site: &str) -> Vec<usize> {
        self.brokers
            .iter()
            .filter(|b| b.proc.is_some())
            .filter(|b| {
                b.cli(&["sessions"]).is_ok_and(|out| {
                    // Every broker lists the whole fleet's sessions; its
                    // own are marked "(here)".
                    out.lines()
                        .any(|l| l.split_whitespace().next() == Some(site) && l.contains("(here)"))
                })
            })
            .map(|b| b.n)
            .collect()
    }

    /// The transport (`h3`, `h2`, ...) of each running broker's session of
    /// `site`, by broker number.
    pub fn transports(&self, site: &str) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        for b in self.brokers.iter().filter(|b| b.proc.is_some()) {
            let Ok(table) = b.cli(&["sessions"]) else {
                continue;
            };
            // The broker's own session: its row is marked "(here)", and
            // the transport is the next column.
            for line in table.lines() {
                let words: Vec<&str> = line.split_whitespace().collect();
                if words.first() == Some(&site)
                    && let Some(here) = words.iter().position(|w| *w == "(here)")
                {
                    let transport = words.get(here + 1).unwrap_or(&"").to_string();
                    out.push((b.n, transport));
                }
            }
        }
        out
    }

    /// Broker `n`'s own sessions, from its admin API (`/v1/sessions`, the
    /// rows it holds itself): each site with the packets from it and to
    /// it so far. None if the broker does not answer within a second.
    pub fn own_sessions(&self, n: usize) -> Option<std::collections::BTreeMap<String, (u64, u64)>> {
        let token =
            std::fs::read_to_string(self.path(&format!("broker{n}")).join("admin.token")).ok()?;
        let auth = format!("Authorization: Bearer {}", token.trim());
        let out = self.brokers[n - 1]
            .ns
            .command("curl")
            .args([
                "-sf",
                "-m",
                "1",
                "-H",
                &auth,
                "http://127.0.0.1:7070/v1/sessions",
            ])
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
        Some(
            rows.iter()
                .filter(|r| r["local"] == true)
                .filter_map(|r| {
                    Some((
                        r["site"].as_str()?.to_string(),
                        (r["rx_packets"].as_u64()?, r["tx_packets"].as_u64()?),
                    ))
                })
                .collect(),
        )
    }

    /// A broker's log so far.
    pub fn broker_log(&self, n: usize) -> String {
        read(&self.brokers[n - 1].log)
    }
}

/// The configuration of broker `n`.
fn broker_config(n: usize, data: &Path, kek: &Path) -> String {
    let ip = broker_ip(n);
    let endpoints = (1..=3)
        .map(|i| format!("\"http://{}:2379\"", member_ip(i)))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"data_dir = "{}"
trust_domain = "tether.test"
published_cidr = "203.0.113.0/24"
listen = ["{ip}:443"]
advertised = ["{ip}"]

[admin]
listen = "127.0.0.1:7070"

[ca]
key_encryption_key_file = "{}"

[store]
backend = "etcd"

[store.etcd]
endpoints = [{endpoints}]
prefix = "{PREFIX}"
timeout = "3s"

[[region]]
name = "eu"
ipv4_pools = ["100.64.0.0/16"]
ipv6_pools = ["fd74:6574:6865::/48"]

[[policy.allow]]
name = "labs"
from = ["site:lab-1", "site:lab-2"]
to = ["site:lab-1", "site:lab-2"]
"#,
        data.display(),
        kek.display()
    )
}

/// `tether-loadgen enroll` run in broker 1's namespace against the
/// cluster's brokers: `sites` sites enrolled through the three brokers in
/// turn (tokens from broker 1's admin API on its loopback), each attempt
/// retried with the same token 0.5 s apart, as an agent would; its output
/// read line by line.
pub struct LoadEnrollment {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    deadline: Instant,
    /// Every line it printed so far.
    pub out: Vec<String>,
    /// Sites it reported enrolled so far.
    pub enrolled: usize,
    /// Whether it printed its summary.
    pub done: bool,
}

impl LoadEnrollment {
    /// The next line, or `None` at the deadline or its end.
    fn next(&mut self) -> Option<String> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let line = self.lines.recv_timeout(left).ok()?;
        if line.starts_with("enrolled ") {
            self.enrolled += 1;
        }
        if line.contains(" retries, ") {
            self.done = true;
        }
        self.out.push(line.clone());
        Some(line)
    }

    /// Reads until `until` sites are enrolled or it is done; panics when it
    /// stalls until the deadline.
    pub fn wait_enrolled(&mut self, until: usize) {
        while self.enrolled < until && !self.done {
            if self.next().is_none() {
                panic!("loadgen stalled:\n{}", self.out.join("\n"));
            }
        }
    }

    /// Reads to its end and waits for it (killed at the deadline); prints
    /// how many attempts were retried, with `label`. Whether every site
    /// enrolled.
    pub fn finish(&mut self, label: &str) -> bool {
        while !self.done && self.next().is_some() {}
        let success = loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                break status.success();
            }
            if Instant::now() >= self.deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break false;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let retries: Vec<&String> = self
            .out
            .iter()
            .filter(|l| l.starts_with("retry "))
            .collect();
        println!(
            "{label}: {} attempts failed and were retried; summary: {}",
            retries.len(),
            self.out.last().cloned().unwrap_or_default()
        );
        for r in retries.iter().take(10) {
            println!("  {r}");
        }
        success
    }
}

impl Drop for LoadEnrollment {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Cluster {
    /// Starts a [`LoadEnrollment`] of `sites` sites, all of them in flight
    /// at once (spread over the brokers in turn), each attempt retried up
    /// to `retries` times, all done within `within`.
    pub fn enroll_load(
        &self,
        sites: usize,
        retries: u32,
        within: Duration,
    ) -> io::Result<LoadEnrollment> {
        use std::io::{BufRead, BufReader};
        let admin_token = std::fs::read_to_string(self.path("broker1").join("admin.token"))?;
        let brokers: Vec<String> = (1..=self.brokers.len()).map(broker_ip).collect();
        let dir = self.path("load");
        std::fs::create_dir_all(&dir)?;
        let mut child = self.brokers[0]
            .ns
            .command(&binary("tether-loadgen").display().to_string())
            .args([
                "enroll",
                "--count",
                &sites.to_string(),
                "--admin",
                "http://127.0.0.1:7070",
                "--admin-token",
                admin_token.trim(),
                "--broker",
                &brokers.join(","),
                "--region",
                "eu",
                "--dir",
                &dir.display().to_string(),
                "--retries",
                &retries.to_string(),
                // Every enrollment in flight at once, spread over the
                // brokers.
                "--concurrency",
                &sites.to_string(),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()?;
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("the load generator's output is not piped"))?;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let _ = tx.send(line);
            }
        });
        Ok(LoadEnrollment {
            child,
            lines,
            deadline: Instant::now() + within,
            out: Vec::new(),
            enrolled: 0,
            done: false,
        })
    }

    /// The sites recorded in the store.
    pub fn recorded_sites(&self) -> io::Result<std::collections::BTreeSet<String>> {
        Ok(self
            .keys("sites/")?
            .into_iter()
            .filter_map(|(k, _)| k.rsplit('/').next().map(str::to_string))
            .collect())
    }

    /// The IPv4 and IPv6 address leases of region `eu` in the store, by
    /// site.
    pub fn leases_by_site(&self) -> io::Result<std::collections::BTreeMap<String, Vec<String>>> {
        let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (key, value) in self.keys("regions/eu/leases/")? {
            let Some((_, prefix)) = key.rsplit_once("leases/") else {
                continue;
            };
            let lease: serde_json::Value = serde_json::from_str(&value)
                .map_err(|e| io::Error::other(format!("lease {key}: {e}")))?;
            let site = lease["site"].as_str().unwrap_or_default().to_string();
            out.entry(site).or_default().push(prefix.to_string());
        }
        Ok(out)
    }

    /// Asserts that no address (IPv4 or IPv6 prefix) is leased twice, that
    /// no site holds two IPv4 addresses, and that every site holding one is
    /// recorded; returns the leases by site.
    pub fn assert_no_address_twice(
        &self,
    ) -> io::Result<std::collections::BTreeMap<String, Vec<String>>> {
        let leases = self.leases_by_site()?;
        let all: Vec<&String> = leases.values().flatten().collect();
        let unique: std::collections::BTreeSet<&&String> = all.iter().collect();
        assert_eq!(
            all.len(),
            unique.len(),
            "no address is held twice: {leases:?}"
        );
        for (site, held) in &leases {
            let v4 = held.iter().filter(|p| !p.contains(':')).count();
            assert!(v4 <= 1, "{site} holds one IPv4 address: {held:?}");
        }
        let sites = self.recorded_sites()?;
        assert!(
            leases.keys().all(|s| sites.contains(s)),
            "no address is held by a site that is not recorded"
        );
        Ok(leases)
    }
}

impl Cluster {
    /// Which broker (1-based) each broker id of the fleet is, from the
    /// fleet records in etcd (their endpoints name the broker's address).
    pub fn broker_numbers(&self) -> io::Result<std::collections::BTreeMap<String, usize>> {
        let mut out = std::collections::BTreeMap::new();
        for (key, value) in self.keys("fleet/brokers/")? {
            let Some(id) = key.rsplit('/').next() else {
                continue;
            };
            let member: serde_json::Value = serde_json::from_str(&value)
                .map_err(|e| io::Error::other(format!("fleet record {key}: {e}")))?;
            let endpoint = member["endpoints"][0].as_str().unwrap_or_default();
            for b in &self.brokers {
                if endpoint.starts_with(&format!("{}:", broker_ip(b.n))) {
                    out.insert(id.to_string(), b.n);
                }
            }
        }
        Ok(out)
    }

    /// The owner of each site in etcd, as a broker number (0: an id that
    /// is no live broker).
    pub fn owners(&self) -> io::Result<std::collections::BTreeMap<String, usize>> {
        let numbers = self.broker_numbers()?;
        Ok(self
            .keys("fleet/owners/")?
            .into_iter()
            .filter_map(|(key, id)| {
                let site = key.rsplit('/').next()?.to_string();
                Some((site, numbers.get(&id).copied().unwrap_or(0)))
            })
            .collect())
    }

    /// After a heal: broker `n` joins the fleet again under a new lease
    /// (within 30 s), and then every site has one holder, the one etcd
    /// names (within 15 s). The error says which did not happen.
    pub fn rejoined(&self, n: usize) -> Result<(), String> {
        let back = wait_for(Duration::from_secs(30), || {
            self.broker_numbers()
                .is_ok_and(|b| b.values().any(|b| *b == n))
        });
        if !back {
            return Err(format!(
                "broker {n} did not rejoin the fleet:\n{}",
                self.broker_log(n)
            ));
        }
        if !wait_for(Duration::from_secs(15), || self.one_owner_each().is_ok()) {
            return Err(format!(
                "not one owner per site after the heal: {:?}",
                self.one_owner_each()
            ));
        }
        Ok(())
    }

    /// Every site whose agent runs is held by exactly one running broker,
    /// the one etcd names.
    pub fn one_owner_each(&self) -> Result<(), String> {
        let owners = self.owners().map_err(|e| e.to_string())?;
        for site in self.sites.iter().filter(|s| s.agent.is_some()) {
            let holders = self.holders(&site.name);
            let owner = owners.get(&site.name).copied();
            if holders.len() != 1 || owner != Some(holders[0]) {
                return Err(format!(
                    "{}: held by brokers {holders:?}, etcd owner {owner:?}",
                    site.name
                ));
            }
        }
        Ok(())
    }
}
