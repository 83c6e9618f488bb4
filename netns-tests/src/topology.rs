//! The hospital topology of the end-to-end tests.
//!
//! ```text
//!  site            hospital-fw                    wan              cloud                  backend
//!  tether up   lan ─ nftables: no inbound,    ─── router ───  broker 203.0.113.10:443 ── routes the overlay
//!  web :8080        out only UDP+TCP 443 to        (no route     local gateway tether-gw0    via the cloud
//!                   203.0.113.0/24, masquerade     to 192.168/16)
//!  192.168.1.10/24  192.168.1.1 | 198.51.100.2/30  198.51.100.1   203.0.113.10/24 | 10.20.0.1  10.20.0.10/24
//!                                                  203.0.113.1/24                   fd20::1    fd20::10/64
//! ```
//!
//! The published CIDR is 203.0.113.0/24; the overlay pools are
//! 100.64.0.0/16 and fd74:6574:6865::/48 (region `eu`).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{NetNs, Proc, binary, link, wait_for};

/// The broker's tunnel address.
pub const BROKER: &str = "203.0.113.10";
/// The backend host.
pub const BACKEND: &str = "10.20.0.10";
/// The site's underlay (hospital LAN) address.
pub const SITE_LAN: &str = "192.168.1.10";

/// The five namespaces and the running broker.
pub struct Topology {
    /// The edge site.
    pub site: NetNs,
    /// The hospital firewall.
    pub fw: NetNs,
    /// The internet in between.
    pub wan: NetNs,
    /// The cloud host running the broker.
    pub cloud: NetNs,
    /// A backend host routing the overlay via the cloud host.
    pub backend: NetNs,
    /// Working files (configs, state, logs).
    pub dir: tempfile::TempDir,
    /// The broker process.
    pub broker: Option<Proc>,
}

/// The hospital firewall: nothing in, only TCP and UDP 443 to the published
/// CIDR out, masqueraded.
pub const FIREWALL_RULES: &str = r#"
flush ruleset
table inet hospital {
    chain input {
        type filter hook input priority 0; policy drop;
        iif "lo" accept
        ct state established,related accept
    }
    chain forward {
        type filter hook forward priority 0; policy drop;
        ct state established,related accept
        iifname "lan" ip daddr 203.0.113.0/24 udp dport 443 accept
        iifname "lan" ip daddr 203.0.113.0/24 tcp dport 443 accept
    }
}
table ip nat {
    chain postrouting {
        type nat hook postrouting priority 100; policy accept;
        oifname "wan" masquerade
    }
}
"#;

/// What the hospital firewall lets out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// TCP and UDP 443 to the published CIDR ([`FIREWALL_RULES`]).
    Open,
    /// TCP 443 only: UDP is dropped, even on flows already established.
    TcpOnly,
    /// Nothing is forwarded; only the firewall's own HTTP proxy on
    /// [`PROXY`] may reach out.
    ProxyOnly,
}

/// The hospital's HTTP proxy, on the firewall's LAN address.
pub const PROXY: &str = "http://192.168.1.1:8888";

/// The firewall rules for `egress`. Drops come before the rule accepting
/// established flows, so a change also cuts flows already running.
pub fn firewall_rules(egress: Egress) -> String {
    let (early, input) = match egress {
        Egress::Open => ("", ""),
        Egress::TcpOnly => (
            "iifname \"lan\" udp dport 443 drop\n        iifname \"wan\" udp sport 443 drop",
            "",
        ),
        Egress::ProxyOnly => (
            "iifname \"lan\" drop\n        iifname \"wan\" drop",
            "iifname \"lan\" tcp dport 8888 accept",
        ),
    };
    FIREWALL_RULES
        .replace(
            "type filter hook forward priority 0; policy drop;",
            &format!("type filter hook forward priority 0; policy drop;\n        {early}"),
        )
        .replace(
            "iif \"lo\" accept",
            &format!("iif \"lo\" accept\n        {input}"),
        )
}

fn sysctl(ns: &NetNs, key: &str, value: &str) -> io::Result<()> {
    ns.run("sysctl", &["-q", "-w", &format!("{key}={value}")])
        .map(|_| ())
}

impl Topology {
    /// Builds the namespaces, links, routes and firewall, and starts the
    /// broker (with `extra` appended to its configuration).
    pub fn new(extra: &str) -> io::Result<Self> {
        let topo = Self {
            site: NetNs::new("site")?,
            fw: NetNs::new("fw")?,
            wan: NetNs::new("wan")?,
            cloud: NetNs::new("cloud")?,
            backend: NetNs::new("backend")?,
            dir: tempfile::tempdir()?,
            broker: None,
        };
        link(
            &topo.site,
            "eth0",
            "192.168.1.10/24",
            &topo.fw,
            "lan",
            "192.168.1.1/24",
        )?;
        link(
            &topo.fw,
            "wan",
            "198.51.100.2/30",
            &topo.wan,
            "hospital",
            "198.51.100.1/30",
        )?;
        link(
            &topo.wan,
            "cloud",
            "203.0.113.1/24",
            &topo.cloud,
            "eth0",
            "203.0.113.10/24",
        )?;
        link(
            &topo.cloud,
            "backend",
            "10.20.0.1/24",
            &topo.backend,
            "eth0",
            "10.20.0.10/24",
        )?;
        topo.cloud.run(
            "ip",
            &["-6", "addr", "add", "fd20::1/64", "dev", "backend", "nodad"],
        )?;
        topo.backend.run(
            "ip",
            &["-6", "addr", "add", "fd20::10/64", "dev", "eth0", "nodad"],
        )?;
        topo.site
            .run("ip", &["route", "add", "default", "via", "192.168.1.1"])?;
        topo.fw
            .run("ip", &["route", "add", "default", "via", "198.51.100.1"])?;
        topo.cloud
            .run("ip", &["route", "add", "default", "via", "203.0.113.1"])?;
        topo.backend
            .run("ip", &["route", "add", "default", "via", "10.20.0.1"])?;
        topo.backend
            .run("ip", &["route", "add", "100.64.0.0/16", "via", "10.20.0.1"])?;
        topo.backend.run(
            "ip",
            &[
                "-6",
                "route",
                "add",
                "fd74:6574:6865::/48",
                "via",
                "fd20::1",
            ],
        )?;
        for ns in [&topo.fw, &topo.wan, &topo.cloud] {
            sysctl(ns, "net.ipv4.ip_forward", "1")?;
        }
        sysctl(&topo.cloud, "net.ipv6.conf.all.forwarding", "1")?;
        let rules = topo.dir.path().join("hospital.nft");
        std::fs::write(&rules, FIREWALL_RULES)?;
        topo.fw.run("nft", &["-f", &rules.display().to_string()])?;
        std::fs::write(
            topo.broker_config(),
            broker_config(&topo.dir.path().join("broker"), extra),
        )?;
        let mut topo = topo;
        topo.start_broker()?;
        Ok(topo)
    }

    /// Changes what the hospital firewall lets out.
    pub fn set_egress(&self, egress: Egress) -> io::Result<()> {
        let rules = self.path("hospital.nft");
        std::fs::write(&rules, firewall_rules(egress))?;
        self.fw
            .run("nft", &["-f", &rules.display().to_string()])
            .map(|_| ())
    }

    /// Starts tinyproxy on the firewall at [`PROXY`], allowing CONNECT to
    /// port 443 for the hospital LAN.
    pub fn start_proxy(&self) -> io::Result<Proc> {
        let conf = self.path("tinyproxy.conf");
        std::fs::write(
            &conf,
            "Port 8888\nListen 192.168.1.1\nTimeout 600\nAllow 192.168.1.0/24\nConnectPort 443\nMaxClients 20\nLogLevel Info\n",
        )?;
        let log = self.path("tinyproxy.log");
        let proc = self.fw.spawn(
            "tinyproxy",
            &["-d", "-c", &conf.display().to_string()],
            Some(log.clone()),
        )?;
        let up = wait_for(Duration::from_secs(10), || {
            self.fw
                .succeeds("sh", &["-c", "ss -ltn | grep -q 192.168.1.1:8888"])
        });
        if !up {
            return Err(io::Error::other(format!(
                "tinyproxy did not start:\n{}",
                read(&log)
            )));
        }
        Ok(proc)
    }

    /// Runs `tether` on the site with `args` (and `env`); returns whether it
    /// succeeded and its output.
    pub fn tether(&self, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
        let mut cmd = self.site.command(&binary("tether").display().to_string());
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        match cmd.output() {
            Ok(o) => (
                o.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
            ),
            Err(e) => (false, e.to_string()),
        }
    }

    /// Starts `tether up` on the site with extra environment variables.
    pub fn spawn_up(&self, state: &Path, log: &str, env: &[(&str, &str)]) -> io::Result<Proc> {
        let mut args: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        args.push(binary("tether").display().to_string());
        args.extend([
            "up".into(),
            "--state-dir".into(),
            state.display().to_string(),
        ]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.site.spawn("env", &refs, Some(self.path(log)))
    }

    /// Starts `tether up` on the site through [`NetNs::command_entered`],
    /// so its start is not lengthened by `ip netns exec`.
    pub fn spawn_up_entered(
        &self,
        state: &Path,
        log: &str,
        env: &[(&str, &str)],
    ) -> io::Result<Proc> {
        let mut cmd = self
            .site
            .command_entered(&binary("tether").display().to_string());
        cmd.arg("up")
            .arg("--state-dir")
            .arg(state)
            .envs(env.iter().copied());
        Proc::start(cmd, Some(self.path(log)))
    }

    /// Serves `index.html` holding `content` on port 8080 of `ns`, bound to
    /// `bind` (`0.0.0.0`, `::` or one address), with the access log (each
    /// client's address) in `log`; stops when the returned process drops.
    pub fn serve_http(&self, ns: &NetNs, bind: &str, content: &str, log: &str) -> Proc {
        let dir = self.path(&format!("{log}-root"));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        std::fs::write(dir.join("index.html"), content)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let web = ns
            .spawn(
                "python3",
                &[
                    "-u",
                    "-m",
                    "http.server",
                    "8080",
                    "--bind",
                    bind,
                    "--directory",
                    &dir.display().to_string(),
                ],
                Some(self.path(log)),
            )
            .unwrap_or_else(|e| panic!("cannot start python3's http.server: {e}"));
        let listening = match bind {
            "0.0.0.0" | "::" => ":8080 ".to_string(),
            addr => format!("{addr}:8080 "),
        };
        assert!(
            wait_for(Duration::from_secs(10), || ns.succeeds(
                "sh",
                &["-c", &format!("ss -ltn | grep -qF '{listening}'")]
            )),
            "the web server on {bind} in {} did not start",
            ns.name()
        );
        web
    }

    /// Serves `index.html` holding `content` from the site on port 8080
    /// (python3's http.server); stops when the returned process drops.
    pub fn serve_page(&self, content: &str) -> io::Result<Proc> {
        Ok(self.serve_http(&self.site, "0.0.0.0", content, "site-web.log"))
    }

    /// The broker's configuration file.
    pub fn broker_config(&self) -> PathBuf {
        self.dir.path().join("broker.toml")
    }

    /// A file in the working directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts the broker and waits until its admin API answers.
    pub fn start_broker(&mut self) -> io::Result<()> {
        let cfg = self.broker_config().display().to_string();
        let log = self.path("broker.log");
        let proc = self.cloud.spawn(
            &binary("tether-broker").display().to_string(),
            &["run", "-c", &cfg],
            Some(log.clone()),
        )?;
        self.broker = Some(proc);
        let up = wait_for(Duration::from_secs(15), || {
            self.cloud
                .succeeds("curl", &["-sf", "-m", "1", "http://127.0.0.1:7070/readyz"])
        });
        if !up {
            return Err(io::Error::other(format!(
                "broker did not start:\n{}",
                read(&log)
            )));
        }
        Ok(())
    }

    /// Kills the broker (SIGKILL, reaped) and starts it again.
    pub fn restart_broker(&mut self) -> io::Result<()> {
        if let Some(broker) = self.broker.as_mut() {
            broker.kill();
        }
        self.start_broker()
    }

    /// Runs the broker CLI in the cloud namespace; returns stdout.
    pub fn broker_cli(&self, args: &[&str]) -> io::Result<String> {
        let cfg = self.broker_config().display().to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-c", &cfg]);
        let out = self
            .cloud
            .run(&binary("tether-broker").display().to_string(), &all)?;
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// Creates a token for `site` and enrolls the site namespace with it
    /// into `state`.
    pub fn enroll(&self, site: &str, state: &Path) -> io::Result<()> {
        self.enroll_in(&self.site, site, state)
    }

    /// Like [`Topology::enroll`], with `tether enroll` run in `ns` (another
    /// host routed to the broker).
    pub fn enroll_in(&self, ns: &NetNs, site: &str, state: &Path) -> io::Result<()> {
        let out = self.broker_cli(&["token", "create", "--site", site, "--region", "eu"])?;
        let code = out
            .split_whitespace()
            .find(|w| w.starts_with("tt1-"))
            .ok_or_else(|| io::Error::other(format!("no code in: {out}")))?
            .to_string();
        ns.run(
            &binary("tether").display().to_string(),
            &[
                "enroll",
                "--broker",
                BROKER,
                "--token",
                &code,
                "--state-dir",
                &state.display().to_string(),
            ],
        )
        .map(|_| ())
    }

    /// Starts `tether up` on the site and waits for its overlay IPv4
    /// address.
    pub fn up(&self, state: &Path, log: &str) -> io::Result<(Proc, String)> {
        let proc = self.site.spawn(
            &binary("tether").display().to_string(),
            &["up", "--state-dir", &state.display().to_string()],
            Some(self.path(log)),
        )?;
        let mut address = None;
        wait_for(Duration::from_secs(15), || {
            address = self.site_address(4);
            address.is_some()
        });
        match address {
            Some(a) => Ok((proc, a)),
            None => Err(io::Error::other(format!(
                "site did not come up:\n{}",
                read(&self.path(log))
            ))),
        }
    }

    /// The site's overlay address of IP version `v` (4 or 6), if any.
    pub fn site_address(&self, v: u8) -> Option<String> {
        overlay_address(&self.site, v)
    }

    /// Whether the backend can ping `addr` (one echo, 1 s timeout).
    pub fn backend_pings(&self, addr: &str) -> bool {
        self.backend.succeeds("ping", &["-c", "1", "-W", "1", addr])
    }

    /// The broker's `/metrics` text (empty if it does not answer).
    pub fn metrics_text(&self) -> String {
        self.cloud
            .command("curl")
            .args(["-s", "http://127.0.0.1:7070/metrics"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    }

    /// `GET path` of the broker's admin API with its admin token, as JSON
    /// (null when the request fails).
    pub fn admin_get(&self, path: &str) -> serde_json::Value {
        let token = read(&self.path("broker").join("admin.token"));
        let out = self
            .cloud
            .command("curl")
            .args([
                "-sf",
                "-m",
                "2",
                "-H",
                &format!("Authorization: Bearer {}", token.trim()),
                &format!("http://127.0.0.1:7070{path}"),
            ])
            .output();
        out.ok()
            .and_then(|o| serde_json::from_slice(&o.stdout).ok())
            .unwrap_or_default()
    }

    /// A broker metric's value, from `/metrics`.
    pub fn metric(&self, line_prefix: &str) -> f64 {
        self.metrics_text()
            .lines()
            .find(|l| l.starts_with(line_prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// The broker's sessions on `transport` (`h3`, `h2` or `h2-proxy`).
    pub fn sessions_on(&self, transport: &str) -> f64 {
        self.metric(&format!(
            "tether_broker_sessions{{transport=\"{transport}\"}}"
        ))
    }

    /// Waits until the broker holds exactly one session, on `transport`.
    pub fn wait_for_transport(&self, transport: &str, timeout: Duration) -> bool {
        wait_for(timeout, || {
            self.sessions_on(transport) == 1.0
                && ["h3", "h2", "h2-proxy"]
                    .iter()
                    .filter(|t| **t != transport)
                    .all(|t| self.sessions_on(t) == 0.0)
        })
    }
}

fn broker_config(data: &Path, extra: &str) -> String {
    format!(
        r#"data_dir = "{}"
trust_domain = "tether.test"
published_cidr = "203.0.113.0/24"
listen = ["203.0.113.10:443"]
advertised = ["203.0.113.10"]

[admin]
listen = "127.0.0.1:7070"

[[region]]
name = "eu"
ipv4_pools = ["100.64.0.0/16"]
ipv6_pools = ["fd74:6574:6865::/48"]

[local_gateway]
enabled = true
id = "cloud"
tun_name = "tether-gw0"
region = "eu"
prefixes = ["10.20.0.0/24", "fd20::/64"]
{extra}
"#,
        data.display()
    )
}

/// The overlay address of IP version `v` (4 or 6) of the agent running in
/// `ns` (on its `tether0`), if it has one.
pub fn overlay_address(ns: &NetNs, v: u8) -> Option<String> {
    let out = ns
        .command("ip")
        .args([
            &format!("-{v}"),
            "-o",
            "addr",
            "show",
            "dev",
            "tether0",
            "scope",
            "global",
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split_whitespace()
        .skip_while(|w| *w != "inet" && *w != "inet6")
        .nth(1)
        .map(|a| a.split('/').next().unwrap_or_default().to_string())
}

/// A file's contents, or a note that it is missing.
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|_| format!("({} missing)", path.display()))
}

/// A backend cloud: a gateway node on the internet and a backend host
/// behind it.
///
/// ```text
///  wan ── gwN 198.18.N.1/24 ─ node eth0 198.18.N.2/24 ── bk 10.3N.0.1/24 ─ backend 10.3N.0.10/24
///                              tether-gateway (or a stock WireGuard peer)
/// ```
pub struct Cloud {
    /// The gateway node.
    pub node: NetNs,
    /// A backend host routing everything via the node.
    pub backend: NetNs,
    /// The backend host's address.
    pub backend_addr: String,
    /// The backend prefix behind the node.
    pub prefix: String,
}

impl Cloud {
    /// Builds cloud number `n` (1-9) attached to the topology's internet.
    pub fn new(topo: &Topology, n: u8) -> io::Result<Self> {
        let cloud = Self {
            node: NetNs::new(&format!("gwnode{n}"))?,
            backend: NetNs::new(&format!("gwback{n}"))?,
            backend_addr: format!("10.3{n}.0.10"),
            prefix: format!("10.3{n}.0.0/24"),
        };
        link(
            &topo.wan,
            &format!("gw{n}"),
            &format!("198.18.{n}.1/24"),
            &cloud.node,
            "eth0",
            &format!("198.18.{n}.2/24"),
        )?;
        link(
            &cloud.node,
            "bk",
            &format!("10.3{n}.0.1/24"),
            &cloud.backend,
            "eth0",
            &format!("10.3{n}.0.10/24"),
        )?;
        cloud.node.run(
            "ip",
            &["route", "add", "default", "via", &format!("198.18.{n}.1")],
        )?;
        cloud.backend.run(
            "ip",
            &["route", "add", "default", "via", &format!("10.3{n}.0.1")],
        )?;
        // The node routes for its backends, as a Kubernetes node does.
        sysctl(&cloud.node, "net.ipv4.ip_forward", "1")?;
        Ok(cloud)
    }

    /// Whether the backend host can ping `addr` (one echo, 1 s timeout).
    pub fn backend_pings(&self, addr: &str) -> bool {
        self.backend.succeeds("ping", &["-c", "1", "-W", "1", addr])
    }

    /// The routes of `table` on the node, one per line.
    pub fn table(&self, table: u32) -> String {
        self.node
            .run("ip", &["route", "show", "table", &table.to_string()])
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default()
    }
}

/// The broker's `[[gateway]]` table for a WireGuard peer `id` of
/// `region` with public key `key`, routing `prefix`.
pub fn gateway_entry(id: &str, region: &str, key: &str, prefix: &str) -> String {
    format!(
        "\n[[gateway]]\nid = \"{id}\"\nregion = \"{region}\"\npublic_key = \"{key}\"\nprefixes = [\"{prefix}\"]\n"
    )
}

/// A `tether-gateway` for a [`Cloud`]. Its key is made first: the broker's
/// configuration registers it ([`broker_entry`](Self::broker_entry)).
pub struct Gateway {
    /// Its id.
    pub id: String,
    /// Its region.
    pub region: String,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its state directory.
    pub state: PathBuf,
    /// Its WireGuard public key.
    pub key: String,
}

impl Gateway {
    /// Makes the key of gateway `id` of `region`, with its files under
    /// `work`.
    pub fn new(work: &Path, id: &str, region: &str) -> io::Result<Self> {
        let state = work.join(id);
        let config = work.join(format!("{id}.toml"));
        std::fs::write(&config, format!("state_dir = \"{}\"\n", state.display()))?;
        let out = crate::run(
            &binary("tether-gateway").display().to_string(),
            &["key", "-c", &config.display().to_string()],
        )?;
        let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(Self {
            id: id.into(),
            region: region.into(),
            config,
            state,
            key,
        })
    }

    /// The broker's `[[gateway]]` table registering it for `prefix`.
    pub fn broker_entry(&self, prefix: &str) -> String {
        gateway_entry(&self.id, &self.region, &self.key, prefix)
    }

    /// Writes its configuration: the topology's broker and its key, then
    /// `extra` (e.g. a `[dns]` table).
    pub fn configure(&self, topo: &Topology, extra: &str) -> io::Result<()> {
        let broker_key = topo.broker_cli(&["gateway", "key"])?;
        std::fs::write(
            &self.config,
            format!(
                "id = \"{}\"\nregion = \"{}\"\npublished_cidr = \"203.0.113.0/24\"\n\
                 brokers = [\"{BROKER}:51820\"]\nbroker_public_key = \"{}\"\nstate_dir = \"{}\"\n{extra}",
                self.id,
                self.region,
                broker_key.trim(),
                self.state.display()
            ),
        )
    }

    /// Starts it on `cloud`'s node and waits (10 s) for its WireGuard
    /// session with the broker. Returns the process and its log.
    pub fn start(&self, cloud: &Cloud) -> io::Result<(Proc, PathBuf)> {
        let log = self.state.with_extension("log");
        let proc = cloud.node.spawn(
            &binary("tether-gateway").display().to_string(),
            &["run", "-c", &self.config.display().to_string()],
            Some(log.clone()),
        )?;
        if !wait_for(Duration::from_secs(10), || {
            read(&log).contains("WireGuard session with the broker established")
        }) {
            return Err(io::Error::other(format!(
                "{}: no WireGuard session with the broker:\n{}",
                self.id,
                read(&log)
            )));
        }
        Ok((proc, log))
    }
}
