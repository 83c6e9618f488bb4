//! `tether doctor`: why this site can or cannot connect, in plain words.
//!
//! Each check prints one line: a verdict (`ok`, `info`, `WARN`, `FAIL`),
//! what was found, and what to do. Nothing here disturbs a running agent:
//! the checks open connections but never a tunnel.

use std::time::{Duration, Instant, SystemTime};

use tether_config::client::ClientConfig;
use tether_proto::tunnel::Transport;
use tokio::net::TcpStream;

use crate::dial::{self, Target};
use crate::h3client::quic_config;
use crate::link::{BrokerConn, Dialer};
use crate::proxy::Proxy;
use crate::state_dir::StateDir;
use tether_shell::quic::transport_config;

/// A check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Fine.
    Ok,
    /// For information.
    Info,
    /// Works, but not as well as it could.
    Warn,
    /// Blocks the site.
    Fail,
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Info => "info",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        }
    }
}

/// One check.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// The verdict.
    pub level: Level,
    /// What was found, and what to do.
    pub detail: String,
}

/// Everything `tether doctor` found.
#[derive(Debug, Default)]
pub struct Report {
    /// The checks, in order.
    pub checks: Vec<Check>,
    /// The best transport that works end to end, if any.
    pub usable: Option<Transport>,
}

impl Report {
    fn add(&mut self, name: impl Into<String>, level: Level, detail: impl Into<String>) {
        self.checks.push(Check {
            name: name.into(),
            level,
            detail: detail.into(),
        });
    }

    /// Whether something keeps the site from connecting.
    pub fn blocked(&self) -> bool {
        self.usable.is_none() || self.checks.iter().any(|c| c.level == Level::Fail)
    }

    /// The report as printed.
    pub fn render(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for c in &self.checks {
            out.push_str(&format!(
                "{:<4}  {:<width$}  {}\n",
                c.level.label(),
                c.name,
                c.detail
            ));
        }
        match (self.usable, self.blocked()) {
            (Some(t), false) => out.push_str(&format!(
                "\nverdict: this site can connect, over {}.\n",
                t.describe()
            )),
            _ => {
                let first = self
                    .checks
                    .iter()
                    .find(|c| c.level == Level::Fail)
                    .map(|c| format!("{}: {}", c.name, c.detail))
                    .unwrap_or_else(|| "no broker answered on any transport".into());
                out.push_str(&format!("\nverdict: this site cannot connect. {first}\n"));
            }
        }
        out
    }
}

fn ago_or_in(t: SystemTime) -> String {
    let now = SystemTime::now();
    match t.duration_since(now) {
        Ok(ahead) => format!("in {}", humanize(ahead)),
        Err(e) => format!("{} ago", humanize(e.duration())),
    }
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 2 * 86_400 {
        format!("{} days", s / 86_400)
    } else if s >= 7200 {
        format!("{} h", s / 3600)
    } else if s >= 120 {
        format!("{} min", s / 60)
    } else {
        format!("{s} s")
    }
}

/// The LANs to expose: the kernel must forward, and (by default) `nft`
/// must be there for the source rewrite (docs/lans.md).
fn lan_checks(config: &ClientConfig, report: &mut Report) {
    for lan in &config.lans {
        let (name, key) = if matches!(lan, ipnet::IpNet::V6(_)) {
            ("IPv6", "net.ipv6.conf.all.forwarding")
        } else {
            ("IPv4", "net.ipv4.ip_forward")
        };
        match crate::lan::forwarding_enabled(lan) {
            Some(true) => report.add(
                format!("lan {lan}"),
                Level::Ok,
                format!("{name} forwarding is on"),
            ),
            _ => report.add(
                format!("lan {lan}"),
                Level::Warn,
                format!(
                    "{name} forwarding is off: `tether up` turns IPv4 forwarding on when run as root; otherwise (and always for IPv6) run `sysctl -w {key}=1`"
                ),
            ),
        }
    }
    if config.lans.is_empty() || config.lan_source != tether_config::client::LanSource::Edge {
        return;
    }
    let nft = std::process::Command::new("nft")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if nft {
        report.add(
            "lan source",
            Level::Ok,
            "nft is available for the source rewrite (lan_source = \"edge\")",
        );
    } else {
        report.add(
            "lan source",
            Level::Fail,
            "the LANs' source rewrite (lan_source = \"edge\") needs the nft command: install nftables, or set lan_source = \"original\" if the LANs route the overlay back to this host",
        );
    }
}

/// Runs every check.
pub async fn run(config: &ClientConfig, state: &StateDir) -> Report {
    let mut report = Report::default();
    let cidr = config.published_cidr;

    // Enrollment and this site's certificate.
    let creds = match state.credentials() {
        Ok(c) => {
            report.add(
                "enrollment",
                Level::Ok,
                format!(
                    "site {} in region {} ({})",
                    c.identity.site,
                    c.identity.region,
                    state.path.display()
                ),
            );
            Some(c)
        }
        Err(e) => {
            report.add("enrollment", Level::Fail, format!("{e:#}"));
            None
        }
    };
    if let Some(c) = &creds
        && let Some(leaf) = c.chain.first()
    {
        match tether_pki::tls::validity(leaf) {
            Ok((not_before, not_after)) => {
                let now = SystemTime::now();
                if now < not_before {
                    report.add(
                        "certificate",
                        Level::Fail,
                        format!(
                            "this site's certificate becomes valid only {}: this machine's clock is behind; fix the time (NTP) and try again",
                            ago_or_in(not_before)
                        ),
                    );
                } else if now > not_after {
                    report.add(
                        "certificate",
                        Level::Fail,
                        format!(
                            "this site's certificate expired {}: it renews itself only while connected; ask the operator for a new token and run `tether enroll --force`",
                            ago_or_in(not_after)
                        ),
                    );
                } else {
                    report.add(
                        "certificate",
                        Level::Ok,
                        format!(
                            "valid, expires {} (renewed automatically at half-life while connected)",
                            ago_or_in(not_after)
                        ),
                    );
                }
            }
            Err(e) => report.add(
                "certificate",
                Level::Fail,
                format!("unreadable ({e}); enroll again"),
            ),
        }
    }

    // Proxy.
    let proxy = match Proxy::from_config_or_env(config.proxy.as_deref()) {
        Ok(Some(p)) => {
            report.add(
                "proxy",
                Level::Info,
                format!(
                    "{p} from {}{}; used only when direct TCP 443 fails",
                    p.source,
                    if p.has_credentials() {
                        ", with credentials"
                    } else {
                        ""
                    }
                ),
            );
            Some(p)
        }
        Ok(None) => {
            report.add(
                "proxy",
                Level::Info,
                "none configured and HTTPS_PROXY is not set (direct connections only)",
            );
            None
        }
        Err(e) => {
            report.add("proxy", Level::Fail, e.to_string());
            None
        }
    };

    lan_checks(config, &mut report);

    // Name resolution, held to the published CIDR.
    let mut targets: Vec<Target> = Vec::new();
    for endpoint in &config.brokers {
        match dial::resolve(endpoint, cidr).await {
            Ok(t) => {
                let addrs: Vec<String> = t.iter().map(|t| t.addr.ip().to_string()).collect();
                report.add(
                    format!("dns {endpoint}"),
                    Level::Ok,
                    format!("{} (inside the published CIDR {cidr})", addrs.join(", ")),
                );
                targets.extend(t);
            }
            Err(e) => report.add(format!("dns {endpoint}"), Level::Fail, e.to_string()),
        }
    }
    if targets.is_empty() {
        return report;
    }

    let dialer = creds.as_ref().and_then(|c| {
        let tls = tether_pki::tls::client_config(&c.ca, Some((c.chain.clone(), c.key.clone_key())))
            .ok()?;
        // The tunnel's packet size is fixed; doctor's connection searches
        // the path's instead (from QUIC's minimum up), to compare the two.
        let mut transport = transport_config(config.keepalive, Duration::from_secs(10));
        transport.initial_mtu(1200);
        transport.min_mtu(1200);
        transport.mtu_discovery_config(Some(quinn::MtuDiscoveryConfig::default()));
        let quic = quic_config(tls.clone(), transport).ok()?;
        Some(Dialer {
            tls,
            quic,
            proxy: proxy.clone(),
            timeout: config.h3_timeout,
            keepalive: config.keepalive,
        })
    });

    // Reachability of each address, and the best working transport.
    let mut best: Option<(BrokerConn, Target)> = None;
    for target in targets.iter().take(4) {
        let addr = target.addr;
        // UDP 443: a QUIC handshake (with this site's certificate when
        // enrolled).
        let udp = match &dialer {
            Some(d) => Some(d.dial(Transport::H3, target).await),
            None => None,
        };
        match &udp {
            Some(Ok(_)) => report.add(format!("udp {addr}"), Level::Ok, "HTTP/3 (QUIC) answers"),
            Some(Err(f)) if f.refused => report.add(
                format!("udp {addr}"),
                Level::Ok,
                "HTTP/3 (QUIC) answers (but refused this site: see tls)",
            ),
            Some(Err(f)) => report.add(
                format!("udp {addr}"),
                Level::Warn,
                format!(
                    "{f}. UDP 443 looks blocked: tether falls back to TCP 443 (slower). Ask hospital IT to also allow UDP 443 to {cidr} (`tether firewall-rule`)"
                ),
            ),
            None => {}
        }
        // TCP 443: a plain connection.
        let started = Instant::now();
        let tcp = tokio::time::timeout(config.h3_timeout, TcpStream::connect(addr)).await;
        let tcp_ok = matches!(tcp, Ok(Ok(_)));
        match tcp {
            Ok(Ok(_)) => report.add(
                format!("tcp {addr}"),
                Level::Ok,
                format!("connects in {} ms", started.elapsed().as_millis()),
            ),
            Ok(Err(e)) => report.add(
                format!("tcp {addr}"),
                Level::Warn,
                format!("{e}: TCP 443 is refused on the way (a firewall rejecting, or no broker listening)"),
            ),
            Err(_) => report.add(
                format!("tcp {addr}"),
                Level::Warn,
                format!(
                    "no answer within {} s: TCP 443 looks blocked (dropped by a firewall)",
                    config.h3_timeout.as_secs_f64()
                ),
            ),
        }
        // Through the proxy, when there is one.
        if let Some(p) = &proxy {
            match p.connect(addr, config.h3_timeout).await {
                Ok(_) => report.add(
                    format!("proxy {addr}"),
                    Level::Ok,
                    format!("{p} connects to the broker"),
                ),
                Err(e) => report.add(format!("proxy {addr}"), Level::Warn, e.to_string()),
            }
        }
        if best.is_some() {
            continue;
        }
        let Some(d) = &dialer else { continue };
        // The best rung with a full TLS handshake.
        let mut refusal = None;
        if let Some(result) = udp {
            match result {
                Ok(conn) => best = Some((conn, target.clone())),
                Err(f) if f.refused => refusal = Some(f.message),
                Err(_) => {}
            }
        }
        for transport in [Transport::H2, Transport::H2Proxy] {
            if best.is_some() || refusal.is_some() {
                break;
            }
            if (transport == Transport::H2 && !tcp_ok)
                || (transport == Transport::H2Proxy && proxy.is_none())
            {
                continue;
            }
            match d.dial(transport, target).await {
                Ok(conn) => best = Some((conn, target.clone())),
                Err(f) if f.refused => refusal = Some(f.message),
                Err(f) => report.add(
                    format!("{} {addr}", transport.as_str()),
                    Level::Warn,
                    f.message,
                ),
            }
        }
        if let Some(why) = refusal {
            report.add("tls", Level::Fail, why);
        }
    }

    let Some((conn, target)) = best else {
        if !report.checks.iter().any(|c| c.name == "tls") && dialer.is_some() {
            report.add(
                "reachability",
                Level::Fail,
                format!(
                    "no broker answers on UDP 443, TCP 443{}: ask hospital IT to allow {cidr} on TCP and UDP 443 (`tether firewall-rule` prints the rule){}",
                    if proxy.is_some() { " or through the proxy" } else { "" },
                    if proxy.is_none() {
                        "; if the hospital requires an HTTP proxy, set it with HTTPS_PROXY or [transport] proxy"
                    } else {
                        ""
                    }
                ),
            );
        }
        return report;
    };
    let transport = conn.transport();

    // TLS in both directions, and the broker's clock, with a request that
    // opens no tunnel.
    let sent = SystemTime::now();
    let authority = target.endpoint.to_string();
    match conn
        .exchange("GET", &authority, "/.well-known/tether/doctor", &[])
        .await
    {
        Ok(answer) => {
            report.add(
                "tls",
                Level::Ok,
                format!(
                    "over {}: the broker's certificate is signed by this site's CA, and the broker accepts this site's certificate",
                    transport.describe()
                ),
            );
            let rtt = conn.rtt();
            match answer.date.as_deref().map(httpdate::parse_http_date) {
                Some(Ok(broker_time)) => {
                    // The broker's clock read about half a round trip after
                    // the request left; its Date has one-second resolution.
                    let local = sent + rtt / 2;
                    let (skew, sign) = match broker_time.duration_since(local) {
                        Ok(d) => (d, "ahead of"),
                        Err(e) => (e.duration(), "behind"),
                    };
                    let secs = skew.as_secs_f64();
                    let level = if secs <= 5.0 {
                        Level::Ok
                    } else if secs <= 300.0 {
                        Level::Warn
                    } else {
                        Level::Fail
                    };
                    let advice = match level {
                        Level::Ok => String::new(),
                        _ => format!(
                            "; the broker is {sign} this machine: fix this machine's time (NTP), or certificates will look expired or not yet valid"
                        ),
                    };
                    report.add(
                        "clock",
                        level,
                        format!("skew against the broker {secs:.0} s (±1 s){advice}"),
                    );
                }
                _ => report.add(
                    "clock",
                    Level::Info,
                    "the broker sent no Date; skew unknown",
                ),
            }
        }
        Err(e) => {
            let text = format!("{e:#}");
            let plain = crate::failure::tls_refusal(&text).unwrap_or(text);
            report.add("tls", Level::Fail, plain);
            return report;
        }
    }

    // Path MTU: what QUIC's path MTU discovery finds (HTTP/3 only), against
    // the fixed packet size of the tunnel.
    match &conn {
        BrokerConn::H3 { client, .. } => {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let path = client.conn.stats().path.current_mtu;
            let needed = tether_shell::quic::TUNNEL_UDP_PAYLOAD;
            if client.conn.max_datagram_size().is_none() {
                report.add(
                    "path mtu",
                    Level::Warn,
                    "the broker does not accept QUIC datagrams",
                );
            } else if path >= needed {
                report.add(
                    "path mtu",
                    Level::Ok,
                    format!(
                        "the path carries UDP payloads of {path} bytes; the tunnel sends {needed}"
                    ),
                );
            } else {
                report.add(
                    "path mtu",
                    Level::Fail,
                    format!("the path carries UDP payloads of only {path} bytes, the tunnel sends {needed}: full-size packets would be lost over HTTP/3 (something on the path to {cidr} has a small MTU; ask hospital IT, or block UDP 443 so the site uses HTTP/2)"),
                );
            }
        }
        BrokerConn::H2(_) => report.add(
            "path mtu",
            Level::Info,
            format!(
                "over TCP the tunnel MTU is {} bytes; TCP finds the path MTU itself",
                tether_proto::datagram::STREAM_MTU
            ),
        ),
    }
    conn.close("doctor done");
    conn.drain().await;
    report.usable = Some(transport);
    report
}
