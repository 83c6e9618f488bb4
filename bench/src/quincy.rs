//! quincy, a QUIC VPN on quinn, as an external benchmark peer: its own
//! binaries (`quincy-server`, `quincy-client`, `quincy-identity`, installed
//! with `cargo install`), never linked.
//!
//! It runs like the WireGuard baselines: the server in the cloud namespace
//! on UDP 443 of the broker's published address (the broker stopped), the
//! client on the site, through the same hospital firewall. The server's
//! tunnel network is [`NETWORK`]; the backend routes it via the cloud host,
//! and the client routes the backend network into its tunnel. Both of
//! quincy's modes are measured:
//!
//! - `tls`: QUIC with TLS 1.3 and mutual certificates (made by
//!   `quincy-identity tls gencert`); quincy offers AES-256-GCM first, then
//!   ChaCha20-Poly1305;
//! - `noise`: QUIC with a Noise IK handshake (keys from `quincy-identity
//!   noise genkey`), ChaCha20-Poly1305.
//!
//! Both with the standard X25519 key exchange and quincy's defaults
//! otherwise (tunnel MTU 1400, quinn's Cubic, its buffer sizes).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tether_netns_tests::topology::{BROKER, Topology, read};
use tether_netns_tests::{NetNs, Proc, wait_for};

/// The tunnel network of the quincy server (its own address first).
pub(crate) const NETWORK: &str = "10.98.0.1/24";

/// quincy's two protocol modes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// QUIC with TLS 1.3 (AES-256-GCM).
    Tls,
    /// QUIC with the Noise IK handshake (ChaCha20-Poly1305).
    Noise,
}

impl Mode {
    /// Both modes, in the order they run.
    pub(crate) const ALL: [Mode; 2] = [Mode::Tls, Mode::Noise];

    /// The `mode` of quincy's configuration.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Tls => "tls",
            Mode::Noise => "noise",
        }
    }

    /// The row label of the bench's tables.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Mode::Tls => "quincy (tls)",
            Mode::Noise => "quincy (noise)",
        }
    }

    /// The path name of `--only`.
    pub(crate) fn only_name(self) -> &'static str {
        match self {
            Mode::Tls => "quincy-tls",
            Mode::Noise => "quincy-noise",
        }
    }
}

/// The three quincy binaries.
pub(crate) struct Quincy {
    server: PathBuf,
    client: PathBuf,
    identity: PathBuf,
}

impl Quincy {
    /// Finds the binaries in `dir`, else in PATH, else in `~/.cargo/bin`.
    /// The error says which are missing and how to install them.
    pub(crate) fn find(dir: Option<&Path>) -> Result<Self, String> {
        let find = |name: &str| -> Option<PathBuf> {
            let candidates = match dir {
                Some(d) => vec![d.join(name)],
                None => crate::which(name)
                    .into_iter()
                    .chain(
                        std::env::var_os("HOME")
                            .map(|h| PathBuf::from(h).join(".cargo/bin").join(name)),
                    )
                    .collect(),
            };
            candidates.into_iter().find(|p| p.is_file())
        };
        let names = ["quincy-server", "quincy-client", "quincy-identity"];
        let found: Vec<Option<PathBuf>> = names.iter().map(|n| find(n)).collect();
        match found.as_slice() {
            [Some(server), Some(client), Some(identity)] => Ok(Self {
                server: server.clone(),
                client: client.clone(),
                identity: identity.clone(),
            }),
            _ => {
                let missing: Vec<&str> = names
                    .iter()
                    .zip(&found)
                    .filter(|(_, f)| f.is_none())
                    .map(|(n, _)| *n)
                    .collect();
                Err(format!(
                    "{} not found in {} (install with `cargo install --locked --version 3.1.1 quincy-client quincy-server quincy-identity`)",
                    missing.join(", "),
                    dir.map(|d| d.display().to_string())
                        .unwrap_or_else(|| "PATH or ~/.cargo/bin".into())
                ))
            }
        }
    }

    /// Runs `quincy-identity args...` (with `stdin`); returns its trimmed
    /// standard output.
    fn identity(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        let mut child = Command::new(&self.identity)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", self.identity.display()))?;
        {
            use std::io::Write;
            let mut input = child.stdin.take().context("quincy-identity's stdin")?;
            if let Some(s) = stdin {
                writeln!(input, "{s}")?;
            }
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "quincy-identity {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Writes the server's, the client's and the users' configuration of
    /// `mode` into `dir`, with the keys or certificates they need. The
    /// server's TUN device is `<tag>-c`, the client's `<tag>-s`.
    fn configure(&self, dir: &Path, mode: Mode, tag: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        std::fs::create_dir_all(dir)?;
        let file = |name: &str| dir.join(name);
        let quote = |p: &Path| format!("\"{}\"", p.display());
        let (server_protocol, client_protocol, user) = match mode {
            Mode::Tls => {
                // The client connects to the broker's address: the server's
                // certificate names it (rcgen makes an IP address SAN of it).
                let (sc, sk) = (file("server_cert.pem"), file("server_key.pem"));
                let (cc, ck) = (file("client_cert.pem"), file("client_key.pem"));
                for (cert, key, cn) in [(&sc, &sk, BROKER), (&cc, &ck, "bench-site")] {
                    let _ = std::fs::remove_file(cert);
                    let _ = std::fs::remove_file(key);
                    self.identity(
                        &[
                            "tls",
                            "gencert",
                            "--out-cert",
                            &cert.display().to_string(),
                            "--out-key",
                            &key.display().to_string(),
                            "--cn",
                            cn,
                        ],
                        None,
                    )?;
                }
                let fingerprint = self.identity(
                    &["tls", "fingerprint", "--cert", &cc.display().to_string()],
                    None,
                )?;
                (
                    format!(
                        "mode = \"tls\"\nkey_exchange = \"standard\"\ncertificate_file = {}\ncertificate_key_file = {}\n",
                        quote(&sc),
                        quote(&sk)
                    ),
                    format!(
                        "mode = \"tls\"\nkey_exchange = \"standard\"\ntrusted_certificate_paths = [{}]\nclient_certificate_file = {}\nclient_certificate_key_file = {}\n",
                        quote(&sc),
                        quote(&cc),
                        quote(&ck)
                    ),
                    format!("authorized_certs = [\"{fingerprint}\"]\n"),
                )
            }
            Mode::Noise => {
                let server_key = self.identity(&["noise", "genkey"], None)?;
                let server_pub = self.identity(&["noise", "pubkey"], Some(&server_key))?;
                let client_key = self.identity(&["noise", "genkey"], None)?;
                let client_pub = self.identity(&["noise", "pubkey"], Some(&client_key))?;
                (
                    format!(
                        "mode = \"noise\"\nkey_exchange = \"standard\"\nprivate_key = \"{server_key}\"\n"
                    ),
                    format!(
                        "mode = \"noise\"\nkey_exchange = \"standard\"\nserver_public_key = \"{server_pub}\"\nprivate_key = \"{client_key}\"\n"
                    ),
                    format!("authorized_keys = [\"{client_pub}\"]\n"),
                )
            }
        };
        let users = file("users.toml");
        std::fs::write(&users, format!("[users.site]\n{user}"))?;
        let server = file("server.toml");
        std::fs::write(
            &server,
            format!(
                "name = \"bench\"\ninterface_name = \"{tag}-c\"\nbind_address = \"{BROKER}\"\nbind_port = 443\ntunnel_network = \"{NETWORK}\"\nusers_file = {}\n\n[protocol]\n{server_protocol}\n[log]\nlevel = \"info\"\n",
                quote(&users)
            ),
        )?;
        let client = file("client.toml");
        std::fs::write(
            &client,
            format!(
                "connection_string = \"{BROKER}:443\"\n\n[protocol]\n{client_protocol}\n[network]\ninterface_name = \"{tag}-s\"\nroutes = [\"10.20.0.0/24\"]\n\n[log]\nlevel = \"info\"\n"
            ),
        )?;
        Ok((server, client))
    }
}

/// The IPv4 address of `dev` in `ns`, if it has one.
fn address(ns: &NetNs, dev: &str) -> Option<String> {
    let out = ns
        .command("ip")
        .args(["-4", "-o", "addr", "show", "dev", dev])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .map(|a| a.split('/').next().unwrap_or_default().to_string())
}

/// A quincy tunnel between site and cloud, up until dropped (both
/// processes are killed; their TUN devices and the client's routes go with
/// them).
pub(crate) struct QuincyTunnel {
    /// The site's address inside the tunnel.
    pub(crate) addr: String,
    /// From starting the client to the first packet through.
    pub(crate) setup: Option<Duration>,
    /// The server, in the cloud namespace.
    pub(crate) server: Proc,
    /// The client, on the site.
    pub(crate) client: Proc,
}

impl QuincyTunnel {
    /// Starts quincy in `mode`: the server on the broker's UDP 443 (which
    /// must be free), then the client; waits for the client's address and
    /// its first packet to the backend.
    pub(crate) fn up(topo: &Topology, quincy: &Quincy, mode: Mode) -> anyhow::Result<Self> {
        let tag = format!("qy{}", mode.name());
        let dir = topo.path(&format!("quincy-{}", mode.name()));
        let (server_cfg, client_cfg) = quincy.configure(&dir, mode, &tag)?;
        let server_log = dir.join("server.log");
        let mut server = topo.cloud.spawn(
            &quincy.server.display().to_string(),
            &["--config-path", &server_cfg.display().to_string()],
            Some(server_log.clone()),
        )?;
        let listening = wait_for(Duration::from_secs(10), || {
            server.exited()
                || topo.cloud.succeeds(
                    "sh",
                    &["-c", &format!("ss -Hlun | grep -q '{BROKER}:443 '")],
                ) && address(&topo.cloud, &format!("{tag}-c")).is_some()
        });
        if !listening || server.exited() {
            bail!(
                "quincy-server ({}) did not start:\n{}",
                mode.name(),
                read(&server_log)
            );
        }
        topo.backend.run(
            "ip",
            &["route", "replace", "10.98.0.0/24", "via", "10.20.0.1"],
        )?;
        let client_log = dir.join("client.log");
        let ((client, addr), setup) =
            crate::first_reply(topo, &format!("{tag}-first-probe.log"), || {
                let mut client = topo.site.spawn(
                    &quincy.client.display().to_string(),
                    &["--config-path", &client_cfg.display().to_string()],
                    Some(client_log.clone()),
                );
                let mut addr = None;
                if let Ok(c) = client.as_mut() {
                    wait_for(Duration::from_secs(15), || {
                        addr = address(&topo.site, &format!("{tag}-s"));
                        addr.is_some() || c.exited()
                    });
                }
                (client, addr)
            });
        let client = client?;
        let addr = addr.ok_or_else(|| {
            anyhow!(
                "quincy-client ({}) did not come up:\n{}\nserver:\n{}",
                mode.name(),
                read(&client_log),
                read(&server_log)
            )
        })?;
        if setup.is_none() {
            bail!(
                "no packet through quincy ({}):\n{}\nserver:\n{}",
                mode.name(),
                read(&client_log),
                read(&server_log)
            );
        }
        Ok(Self {
            addr,
            setup,
            server,
            client,
        })
    }
}

/// The main table's rows for quincy in both modes, measured like the
/// WireGuard baselines (the broker must be stopped). Skipped, with the
/// reason printed, when the binaries are missing or a mode does not come
/// up.
pub(crate) fn rows(topo: &Topology, dir: Option<&Path>, secs: u32) -> Vec<crate::Row> {
    let quincy = match Quincy::find(dir) {
        Ok(q) => q,
        Err(why) => {
            eprintln!("quincy skipped: {why}");
            return Vec::new();
        }
    };
    let mut rows = Vec::new();
    for mode in Mode::ALL {
        let tunnel = match QuincyTunnel::up(topo, &quincy, mode) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{} skipped: {e:#}", mode.label());
                continue;
            }
        };
        rows.push(crate::measure_procs(
            topo,
            &topo.backend,
            mode.label(),
            &tunnel.addr,
            secs,
            tunnel.setup,
            &[
                ("server", tunnel.server.id()),
                ("client", tunnel.client.id()),
            ],
        ));
    }
    rows
}
