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
use tether_proto::skew::{clock_off, rough_duration};
use tether_shell::quic::transport_config;

pub mod trust;

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
    /// The check named `name`, if the report has one.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }

    fn add(&mut self, name: impl Into<String>, level: Level, detail: impl Into<String>) {
        self.checks.push(Check {
            name: name.into(),
            level,
            detail: detail.into(),
        });
    }

    /// Whether something keeps the site from connecting.
    pub fn blocked(&self) -> bool {
        (self.usable.is_none() && !self.renews_itself())
            || self.checks.iter().any(|c| c.level == Level::Fail)
    }

    /// Whether the broker refuses only this site's certificate, and would
    /// renew it by re-attestation (which `tether up` does by itself).
    fn renews_itself(&self) -> bool {
        self.checks
            .iter()
            .any(|c| c.name == REATTESTATION && c.level == Level::Ok)
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
            (None, false) => out.push_str(
                "\nverdict: this site can connect once `tether up` has renewed its certificate by re-attestation (it does so by itself).\n",
            ),
            _ => {
                // The broker's refusal of a re-attestation says most.
                let first = self
                    .checks
                    .iter()
                    .find(|c| c.level == Level::Fail && c.name == REATTESTATION)
                    .or_else(|| self.checks.iter().find(|c| c.level == Level::Fail))
                    .map(|c| format!("{}: {}", c.name, c.detail))
                    .unwrap_or_else(|| "no broker answered on any transport".into());
                out.push_str(&format!("\nverdict: this site cannot connect. {first}\n"));
            }
        }
        out
    }
}

fn in_or_ago(t: SystemTime, now: SystemTime) -> String {
    match t.duration_since(now) {
        Ok(ahead) => format!("in {}", rough_duration(ahead)),
        Err(e) => format!("{} ago", rough_duration(e.duration())),
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

/// The checks of name resolution, one per endpoint, from what resolving
/// each found (the addresses as described, or the error). An endpoint that
/// does not resolve blocks the site only when no other endpoint does: the
/// agent connects through any of them.
pub fn dns_checks(resolved: Vec<(String, Result<String, String>)>) -> Vec<Check> {
    let any = resolved.iter().any(|(_, r)| r.is_ok());
    resolved
        .into_iter()
        .map(|(endpoint, result)| {
            let (level, detail) = match result {
                Ok(found) => (Level::Ok, found),
                Err(e) if any => (
                    Level::Warn,
                    format!("{e}; the site connects through the other endpoints"),
                ),
                Err(e) => (Level::Fail, e),
            };
            Check {
                name: format!("dns {endpoint}"),
                level,
                detail,
            }
        })
        .collect()
}

/// What a UDP 443 check that got no QUIC answer says, given whether TCP 443
/// to the same address connects.
pub fn udp_blocked(failure: &str, tcp_ok: bool, cidr: ipnet::IpNet) -> String {
    if tcp_ok {
        format!(
            "{failure}. UDP 443 looks blocked: tether falls back to TCP 443 (slower). Ask hospital IT to also allow UDP 443 to {cidr} (`tether firewall-rule`)"
        )
    } else {
        format!(
            "{failure}. UDP 443 looks blocked, and TCP 443 too (next line): ask hospital IT to allow UDP and TCP 443 to {cidr} (`tether firewall-rule`)"
        )
    }
}

/// What a UDP 443 check says when the QUIC handshake got no answer although
/// the broker answers a small QUIC packet: the path loses the handshake's
/// large packets.
pub fn udp_too_small() -> String {
    let payload = tether_shell::quic::TUNNEL_UDP_PAYLOAD;
    let narrow = tether_shell::quic::NARROW_UDP_PAYLOAD;
    format!(
        "the QUIC handshake got no answer, yet the broker answers a {small}-byte QUIC packet: the path carries less than the {payload} bytes of UDP payload the HTTP/3 tunnel needs, and less than the {narrow} of its narrow form (a VPN, PPPoE or GRE link on the way?), so its packets are lost. tether uses TCP 443 (HTTP/2) instead, which adapts to the path; HTTP/3 needs a path MTU of {v4} bytes (IPv4) or {v6} (IPv6), and {full4} / {full6} for full-size packets",
        small = tether_proto::quic_probe::PROBE_LEN,
        v4 = narrow + 28,
        v6 = narrow + 48,
        full4 = payload + 28,
        full6 = payload + 48,
    )
}

/// The clock check from the broker's skew against this machine, in seconds
/// (positive: the broker is ahead). The broker has accepted this site's
/// certificate when the skew is known, so a skew alone does not block the
/// site; it is worth fixing.
pub fn clock_check(skew_secs: f64) -> Check {
    let (level, advice) = if skew_secs.abs() <= tether_proto::skew::TOLERANCE_SECS {
        (Level::Ok, String::new())
    } else {
        (
            Level::Warn,
            format!(
                "; this machine's clock is {} the broker's: fix the clock (NTP), or this site's certificate will look expired or not yet valid here",
                clock_off(skew_secs)
            ),
        )
    };
    Check {
        name: "clock".into(),
        level,
        detail: format!(
            "skew against the broker {:.0} s (±1 s){advice}",
            skew_secs.abs()
        ),
    }
}

/// The certificate check: this site's certificate, valid from `not_before`
/// to `not_after`, at `now` by this machine's clock. `skew_secs` is the
/// broker's clock against this machine's (positive: the broker is ahead),
/// known only once the broker has accepted the certificate; a certificate
/// the broker accepts does not block the site, and when the skew explains
/// why it looks expired or not yet valid here the advice is to fix the
/// clock, not to enroll again.
pub fn certificate_check(
    now: SystemTime,
    not_before: SystemTime,
    not_after: SystemTime,
    skew_secs: Option<f64>,
) -> Check {
    let check = |level, detail: String| Check {
        name: "certificate".into(),
        level,
        detail,
    };
    let valid_at = |t: SystemTime| not_before <= t && t <= not_after;
    let as_seen = |from: SystemTime| {
        if now < not_before {
            format!("becomes valid only {}", in_or_ago(not_before, from))
        } else {
            format!("expired {}", in_or_ago(not_after, from))
        }
    };
    if valid_at(now) {
        return check(
            Level::Ok,
            format!(
                "valid, expires {} (renewed automatically at half-life while connected)",
                in_or_ago(not_after, now)
            ),
        );
    }
    match skew_secs {
        None if now < not_before => check(
            Level::Fail,
            format!(
                "this site's certificate {}: this machine's clock is behind; fix the time (NTP) and try again",
                as_seen(now)
            ),
        ),
        None => check(
            Level::Fail,
            format!(
                "this site's certificate {}: `tether up` asks the broker to renew it on the proof of this site's key (re-attestation, see below); only if the broker refuses, ask the operator for a new token and run `tether enroll --force`",
                as_seen(now)
            ),
        ),
        Some(skew) => {
            let broker_now = if skew >= 0.0 {
                now + Duration::from_secs_f64(skew)
            } else {
                now - Duration::from_secs_f64(-skew)
            };
            if valid_at(broker_now) {
                check(
                    Level::Warn,
                    format!(
                        "by this machine's clock this site's certificate {}, but the clock is {} the broker's, which accepts the certificate: fix the clock (NTP); no new enrollment is needed",
                        as_seen(now),
                        clock_off(skew)
                    ),
                )
            } else {
                check(
                    Level::Warn,
                    format!(
                        "this site's certificate {}, yet the broker accepts it; it renews itself while connected",
                        as_seen(now)
                    ),
                )
            }
        }
    }
}

/// The name of the re-attestation check.
const REATTESTATION: &str = "re-attestation";

/// The re-attestation check from the broker's answer: whether it would
/// renew this site's certificate on the proof of its key.
pub fn reattest_verdict(
    answer: Result<tether_proto::api::ReattestResponse, crate::enroll::ReattestError>,
) -> Check {
    let (level, detail) = match answer {
        Ok(r) if r.expired_secs == 0 => (
            Level::Ok,
            "the broker would renew this site's certificate on the proof of its key; `tether up` does so by itself".to_string(),
        ),
        Ok(r) => (
            Level::Ok,
            format!(
                "this site's certificate expired {} ago by the broker's clock, within its re-attestation window of {}: `tether up` renews it by itself on the proof of this site's key; no new enrollment is needed",
                tether_pki::reattest::plain_duration(Duration::from_secs(r.expired_secs)),
                tether_pki::reattest::plain_duration(Duration::from_secs(r.window_secs)),
            ),
        ),
        Err(crate::enroll::ReattestError::Refused { message, .. }) => (Level::Fail, message),
        Err(crate::enroll::ReattestError::Failed(why)) => (
            Level::Warn,
            format!("could not ask the broker to re-attest this site: {why}"),
        ),
    };
    Check {
        name: REATTESTATION.into(),
        level,
        detail,
    }
}

/// Asks the broker at `target` whether it would re-attest this site (a
/// connection without a client certificate, no CSR: nothing changes).
async fn reattest_check(
    config: &ClientConfig,
    state: &StateDir,
    proxy: Option<Proxy>,
    target: &Target,
) -> Check {
    let failed = |why: String| reattest_verdict(Err(crate::enroll::ReattestError::Failed(why)));
    let dialer = match Dialer::for_reattestation(config, state, proxy.clone()) {
        Ok(d) => d,
        Err(e) => return failed(format!("{e:#}")),
    };
    let mut order = vec![Transport::H3, Transport::H2];
    if proxy.is_some() {
        order.push(Transport::H2Proxy);
    }
    let (conn, target) = match dialer
        .first(&order, std::slice::from_ref(target), Vec::new())
        .await
    {
        Ok(found) => found,
        Err(f) => return failed(f.message),
    };
    let answer = crate::enroll::reattest(&conn, state, &target, false).await;
    conn.close("doctor done");
    conn.drain().await;
    reattest_verdict(answer)
}

/// Runs every check.
pub async fn run(config: &ClientConfig, state: &StateDir) -> Report {
    run_with_clock(config, state, 0).await
}

/// Runs every check with this host's clock taken as `offset_secs` off its
/// real time: how doctor behaves on a host whose clock is wrong (tests).
pub async fn run_with_clock(config: &ClientConfig, state: &StateDir, offset_secs: i64) -> Report {
    let clock = tether_pki::tls::ShiftedClock(offset_secs);
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
    // The certificate against this machine's clock; judged again below
    // once the broker's clock is known.
    let mut certificate = None;
    if let Some(c) = &creds
        && let Some(leaf) = c.chain.first()
    {
        match tether_pki::tls::validity(leaf) {
            Ok((not_before, not_after)) => {
                certificate = Some((report.checks.len(), not_before, not_after));
                report
                    .checks
                    .push(certificate_check(clock.now(), not_before, not_after, None));
            }
            Err(e) => report.add(
                "certificate",
                Level::Fail,
                format!("unreadable ({e}); enroll again"),
            ),
        }
        report
            .checks
            .push(trust::bundle_check(&c.bundle, leaf, clock.now()));
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
    let mut resolved = Vec::new();
    for endpoint in &config.brokers {
        match dial::resolve(endpoint, cidr).await {
            Ok(t) => {
                let addrs: Vec<String> = t.iter().map(|t| t.addr.ip().to_string()).collect();
                resolved.push((
                    endpoint.to_string(),
                    Ok(format!(
                        "{} (inside the published CIDR {cidr})",
                        addrs.join(", ")
                    )),
                ));
                targets.extend(t);
            }
            Err(e) => resolved.push((endpoint.to_string(), Err(e.to_string()))),
        }
    }
    report.checks.extend(dns_checks(resolved));
    // Two endpoints may name the same address: check it once.
    let mut seen = std::collections::HashSet::new();
    targets.retain(|t| seen.insert(t.addr));
    if targets.is_empty() {
        return report;
    }

    let dialer = creds.as_ref().and_then(|c| {
        let tls = tether_pki::tls::client_config_trusting(
            &c.bundle,
            Some((c.chain.clone(), c.key.clone_key())),
            offset_secs,
        )
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
            narrow_paths: Default::default(),
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
        // TCP 443: a plain connection.
        let started = Instant::now();
        let tcp = tokio::time::timeout(config.h3_timeout, TcpStream::connect(addr)).await;
        let tcp_ok = matches!(tcp, Ok(Ok(_)));
        match &udp {
            Some(Ok(_)) => report.add(format!("udp {addr}"), Level::Ok, "HTTP/3 (QUIC) answers"),
            Some(Err(f)) if f.refused => report.add(
                format!("udp {addr}"),
                Level::Ok,
                "HTTP/3 (QUIC) answers (but refused this site: see tls)",
            ),
            Some(Err(f)) if f.path_too_small => {
                report.add(format!("udp {addr}"), Level::Warn, udp_too_small())
            }
            Some(Err(f)) => report.add(
                format!("udp {addr}"),
                Level::Warn,
                udp_blocked(&f.to_string(), tcp_ok, cidr),
            ),
            None => {}
        }
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
                Err(f) if f.refused => refusal = Some(f),
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
                Err(f) if f.refused => refusal = Some(f),
                Err(f) => report.add(
                    format!("{} {addr}", transport.as_str()),
                    Level::Warn,
                    f.message,
                ),
            }
        }
        if let Some(f) = refusal {
            report.add("tls", Level::Fail, f.message.clone());
            let expired_here =
                certificate.is_some_and(|(_, _, not_after)| not_after <= clock.now());
            if f.certificate.is_some() || expired_here {
                let verdict = reattest_check(config, state, proxy.clone(), target).await;
                // Renewable: what the broker refuses now, `tether up`
                // repairs by itself.
                if verdict.level == Level::Ok {
                    for c in report.checks.iter_mut() {
                        if c.name == "tls" || c.name == "certificate" {
                            c.level = Level::Warn;
                        }
                    }
                }
                report.checks.push(verdict);
            }
        }
    }

    let Some((conn, target)) = best else {
        if report.check("tls").is_none() && dialer.is_some() {
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
    let sent = clock.now();
    let authority = target.endpoint.to_string();
    match conn
        .exchange("GET", &authority, crate::clock::DATE_PATH, &[])
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
            match answer
                .date
                .as_deref()
                .and_then(|date| crate::clock::skew_secs(date, sent, rtt))
            {
                Some(secs) => {
                    report.checks.push(clock_check(secs));
                    // The broker accepted this site's certificate: judge it
                    // by the broker's clock, which the skew explains.
                    if let Some((index, not_before, not_after)) = certificate {
                        report.checks[index] =
                            certificate_check(clock.now(), not_before, not_after, Some(secs));
                    }
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
    // the fixed packet size of the tunnel; a connection the dial had to
    // make with the narrow size says so instead (it searches nothing).
    match &conn {
        BrokerConn::H3 { client, narrow, .. } => {
            let full = tether_shell::quic::TUNNEL_UDP_PAYLOAD;
            let small = tether_shell::quic::NARROW_UDP_PAYLOAD;
            if !*narrow {
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            let path = client.conn.stats().path.current_mtu;
            if client.conn.max_datagram_size().is_none() {
                report.add(
                    "path mtu",
                    Level::Warn,
                    "the broker does not accept QUIC datagrams",
                );
            } else if *narrow {
                report.add(
                    "path mtu",
                    Level::Warn,
                    format!("the path loses QUIC packets of the tunnel's full {full} bytes but carries {small}: the site uses HTTP/3 with {small}-byte packets (a tunnel MTU of 1280; something on the path to {cidr} has a small MTU)"),
                );
            } else if path >= full {
                report.add(
                    "path mtu",
                    Level::Ok,
                    format!(
                        "the path carries UDP payloads of {path} bytes; the tunnel sends {full}"
                    ),
                );
            } else {
                report.add(
                    "path mtu",
                    Level::Fail,
                    format!("the path carries UDP payloads of only {path} bytes, the tunnel sends {full}: full-size packets would be lost over HTTP/3 (something on the path to {cidr} has a small MTU; ask hospital IT, or block UDP 443 so the site uses HTTP/2)"),
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

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn an_unresolvable_name_blocks_only_when_no_endpoint_resolves() {
        let checks = dns_checks(vec![
            ("broker.example:443".into(), Err("no such name".into())),
            ("203.0.113.10:443".into(), Ok("203.0.113.10".into())),
        ]);
        assert_eq!(checks[0].level, Level::Warn);
        assert!(checks[0].detail.contains("other endpoints"));
        assert_eq!(checks[1].level, Level::Ok);

        let checks = dns_checks(vec![
            ("a.example:443".into(), Err("no such name".into())),
            ("b.example:443".into(), Err("no such name".into())),
        ]);
        assert!(checks.iter().all(|c| c.level == Level::Fail));
    }

    #[test]
    fn a_skewed_clock_is_a_warning_once_the_broker_accepts() {
        assert_eq!(clock_check(1.0).level, Level::Ok);
        // This machine 2 h ahead: the broker is 7200 s behind.
        let c = clock_check(-7200.0);
        assert_eq!(c.level, Level::Warn);
        assert!(
            c.detail.contains("2 h ahead of the broker's"),
            "{}",
            c.detail
        );
        assert!(c.detail.contains("fix the clock (NTP)"), "{}", c.detail);
        assert!(clock_check(400.0).detail.contains("6 min behind"));
    }

    #[test]
    fn a_certificate_expired_only_by_a_fast_clock_calls_for_the_clock() {
        let issued = SystemTime::UNIX_EPOCH + 1000 * DAY;
        let not_after = issued + DAY;
        // This machine's clock is 3 days ahead; the broker's says the
        // certificate is 2 h old.
        let now = issued + 2 * HOUR + 3 * DAY;
        let c = certificate_check(now, issued, not_after, Some(-259_201.0));
        assert_eq!(c.level, Level::Warn);
        assert!(c.detail.contains("3 days ahead of"), "{}", c.detail);
        assert!(c.detail.contains("fix the clock (NTP)"), "{}", c.detail);
        assert!(!c.detail.contains("enroll --force"), "{}", c.detail);

        // Unmeasured skew (the broker refused or did not answer): expired
        // is expired.
        let c = certificate_check(now, issued, not_after, None);
        assert_eq!(c.level, Level::Fail);
        assert!(c.detail.contains("enroll --force"), "{}", c.detail);

        // A slow clock: not valid yet here, valid at the broker.
        let now = issued - HOUR;
        let c = certificate_check(now, issued, not_after, Some(2.0 * 3600.0));
        assert_eq!(c.level, Level::Warn);
        assert!(c.detail.contains("becomes valid only in"), "{}", c.detail);
        assert!(c.detail.contains("2 h behind"), "{}", c.detail);

        let c = certificate_check(issued + HOUR, issued, not_after, Some(0.0));
        assert_eq!(c.level, Level::Ok);
    }

    #[test]
    fn a_report_with_only_warnings_can_connect() {
        let mut report = Report {
            usable: Some(Transport::H3),
            ..Report::default()
        };
        report.checks.push(clock_check(-259_201.0));
        report.checks.extend(dns_checks(vec![
            ("broker.example:443".into(), Err("no such name".into())),
            ("203.0.113.10:443".into(), Ok("203.0.113.10".into())),
        ]));
        assert!(!report.blocked());
        assert!(report.render().contains("can connect"));
    }

    #[test]
    fn a_path_too_small_for_the_tunnel_is_named() {
        let text = udp_too_small();
        assert!(text.contains("less than the 1400 bytes"), "{text}");
        assert!(
            text.contains("less than the 1320 of its narrow form"),
            "{text}"
        );
        assert!(text.contains("1348 bytes (IPv4)"), "{text}");
        assert!(text.contains("1428 / 1448 for full-size packets"), "{text}");
        assert!(!text.contains("blocked"), "{text}");
    }

    #[test]
    fn udp_blocked_says_whether_tcp_is_blocked_too() {
        let cidr: ipnet::IpNet = "203.0.113.0/24".parse().unwrap_or_else(|_| unreachable!());
        assert!(udp_blocked("no answer", true, cidr).contains("falls back to TCP 443"));
        let both = udp_blocked("no answer", false, cidr);
        assert!(!both.contains("falls back"), "{both}");
        assert!(both.contains("TCP 443 too"), "{both}");
    }
}
