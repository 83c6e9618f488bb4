//! The operator CLI's side of the broker admin API: a small blocking
//! client, and the tables and traces it prints (`tether routes`, `tether
//! sites`, `tether trace`, and the broker's own `tether-broker sites` and
//! friends).

use std::fmt::Write as _;
use std::process::ExitCode;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tether_proto::api::{
    ApiError, FleetSession, GatewayInfo, LanMappingInfo, RouteInfo, SessionDetail, SiteEvents,
    SiteInfo, SiteSummary, Trace,
};

/// Exit code: the broker answered with an error (bad input, 401, 404).
pub const EXIT_REFUSED: u8 = 1;
/// Exit code: the admin API could not be reached.
pub const EXIT_UNREACHABLE: u8 = 2;
/// Exit code: a trace found no route for (one of) the destination(s).
pub const EXIT_NO_ROUTE: u8 = 3;

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No answer from the admin API.
    #[error(
        "cannot reach the broker's admin API at {url}: {reason} (is tether-broker running, and is the URL right?)"
    )]
    Unreachable {
        /// The API's base URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The broker refused the call.
    #[error("{what}: {message} (HTTP {status})")]
    Refused {
        /// The request path.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The broker's message.
        message: String,
    },
    /// The answer did not parse.
    #[error("{what}: unexpected answer from the broker: {reason}")]
    Garbled {
        /// The request path.
        what: String,
        /// The parse error.
        reason: String,
    },
}

impl CallError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CallError::Unreachable { .. } => ExitCode::from(EXIT_UNREACHABLE),
            _ => ExitCode::from(EXIT_REFUSED),
        }
    }
}

/// Talks to a broker's admin API with its token.
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl AdminClient {
    /// A client of the API at `base` (e.g. `http://127.0.0.1:7070`).
    pub fn new(base: &str, token: &str) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(10)))
            .build()
            .into();
        Self {
            base: base.trim_end_matches('/').to_string(),
            token: token.trim().to_string(),
            agent,
        }
    }

    fn finish<T: DeserializeOwned>(
        &self,
        what: &str,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, CallError> {
        let mut response = result.map_err(|e| CallError::Unreachable {
            url: self.base.clone(),
            reason: e.to_string(),
        })?;
        let status = response.status();
        if status.is_success() {
            return response
                .body_mut()
                .read_json::<T>()
                .map_err(|e| CallError::Garbled {
                    what: what.to_string(),
                    reason: e.to_string(),
                });
        }
        let message = response
            .body_mut()
            .read_json::<ApiError>()
            .map(|e| e.error)
            .unwrap_or_else(|_| status.to_string());
        Err(CallError::Refused {
            what: what.to_string(),
            status: status.as_u16(),
            message,
        })
    }

    /// GET `path` (with its query string).
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CallError> {
        let result = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {}", self.token))
            .call();
        self.finish(path.split('?').next().unwrap_or(path), result)
    }

    /// POST `body` as JSON to `path`.
    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, CallError> {
        let result = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {}", self.token))
            .send_json(body);
        self.finish(path, result)
    }
}

/// Lays out rows under a header, each column as wide as its widest cell
/// (the last column is not padded).
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.len());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let cells: Vec<&str> = cells.collect();
        let n = cells.len();
        for (i, cell) in cells.into_iter().enumerate() {
            if i + 1 < n {
                let _ = write!(out, "{cell:<w$}  ", w = widths[i]);
            } else {
                out.push_str(cell);
            }
        }
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// `tether routes`: prefix, kind, target, region, and the broker a route
/// through another broker of the fleet leads to (over the link).
pub fn routes_table(routes: &[RouteInfo]) -> String {
    let rows: Vec<Vec<String>> = routes
        .iter()
        .map(|info| {
            let r = &info.route;
            vec![
                r.prefix.to_string(),
                r.kind.as_str().to_string(),
                r.target.to_string(),
                r.region.to_string(),
                info.broker
                    .as_ref()
                    .map_or("here".into(), |b| format!("{b} over the link")),
            ]
        })
        .collect();
    table(&["PREFIX", "KIND", "VIA", "REGION", "BROKER"], &rows)
}

/// `tether sites`.
pub fn sites_table(sites: &[SiteInfo]) -> String {
    let rows: Vec<Vec<String>> = sites
        .iter()
        .map(|s| {
            let state = if s.revoked {
                "revoked"
            } else if s.session.is_some() || s.broker.is_some() {
                "connected"
            } else if s.enrolled {
                "offline"
            } else {
                "pending"
            };
            let session = s.session.as_ref();
            vec![
                s.site.to_string(),
                s.region.to_string(),
                state.to_string(),
                s.broker.as_ref().map_or("-".into(), |b| b.to_string()),
                session.map_or("-".into(), |x| x.transport.clone()),
                session.map_or("-".into(), |x| format!("{:.1}ms", x.rtt_ms)),
                s.addresses
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
                lan_pairs(&s.lans),
            ]
        })
        .collect();
    table(
        &[
            "SITE",
            "REGION",
            "STATE",
            "BROKER",
            "TRANSPORT",
            "RTT",
            "ADDRESSES",
            "LANS",
        ],
        &rows,
    )
}

/// A site's LAN mappings as `mapped = real` pairs (an unused mapping
/// waiting for release marked so), or `-`.
fn lan_pairs(lans: &[LanMappingInfo]) -> String {
    if lans.is_empty() {
        return "-".into();
    }
    lans.iter()
        .map(|l| match l.release_at {
            Some(_) => format!("{} = {} (unused)", l.mapped, l.lan),
            None => format!("{} = {}", l.mapped, l.lan),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `tether sites --since D` (and `--state`): the site list with state and
/// since when, relative to `now` (Unix seconds).
pub fn site_states_table(sites: &[SiteSummary], now: u64) -> String {
    let rows: Vec<Vec<String>> = sites
        .iter()
        .map(|s| {
            vec![
                s.site.to_string(),
                s.region.to_string(),
                s.state.as_str().to_string(),
                s.since.map_or("-".into(), |t| ago(t, now)),
                match (&s.broker, &s.transport) {
                    (Some(b), Some(t)) => format!("{b} {t}"),
                    (Some(b), None) => b.clone(),
                    _ => "-".into(),
                },
                s.last_event.as_ref().map_or("-".into(), |e| {
                    format!("{} ({})", e.kind.describe(), ago(e.at, now))
                }),
            ]
        })
        .collect();
    table(
        &["SITE", "REGION", "STATE", "SINCE", "BROKER", "LAST EVENT"],
        &rows,
    )
}

/// `tether events SITE`: the site's timeline, newest first.
pub fn events_table(events: &SiteEvents, now: u64) -> String {
    let rows: Vec<Vec<String>> = events
        .events
        .iter()
        .rev()
        .map(|e| {
            vec![
                ago(e.at, now),
                e.kind.as_str().to_string(),
                e.kind.describe(),
                e.broker.clone(),
            ]
        })
        .collect();
    if rows.is_empty() {
        return format!("no events of site {} yet\n", events.site);
    }
    table(&["WHEN", "EVENT", "DETAILS", "BROKER"], &rows)
}

/// `t` as "5m 3s ago" relative to `now` (Unix seconds).
fn ago(t: u64, now: u64) -> String {
    let d = std::time::Duration::from_secs(now.saturating_sub(t));
    format!("{} ago", humantime::format_duration(d))
}

/// `tether-broker sessions`: the fleet's sessions, each with its broker;
/// the detail only for the answering broker's own.
pub fn sessions_table(sessions: &[FleetSession]) -> String {
    let rows: Vec<Vec<String>> = sessions
        .iter()
        .map(|f| {
            let mut row = vec![
                f.site().to_string(),
                f.region().to_string(),
                if f.local {
                    format!("{} (here)", f.broker)
                } else {
                    f.broker.to_string()
                },
            ];
            match &f.session {
                SessionDetail::Here(s) => row.extend([
                    s.transport.clone(),
                    s.remote.to_string(),
                    format!("{:.1}ms", s.rtt_ms),
                    s.rx_bytes.to_string(),
                    s.tx_bytes.to_string(),
                ]),
                SessionDetail::Elsewhere { .. } => {
                    row.extend(std::iter::repeat_n("-".to_string(), 5));
                }
            }
            row
        })
        .collect();
    table(
        &[
            "SITE",
            "REGION",
            "BROKER",
            "TRANSPORT",
            "REMOTE",
            "RTT",
            "RX BYTES",
            "TX BYTES",
        ],
        &rows,
    )
}

/// `tether-broker gateways`.
pub fn gateways_table(gateways: &[GatewayInfo]) -> String {
    let rows: Vec<Vec<String>> = gateways
        .iter()
        .map(|g| {
            vec![
                g.id.to_string(),
                g.region.to_string(),
                g.kind.clone(),
                g.endpoint.map_or("-".into(), |e| e.to_string()),
                match (g.last_handshake_secs, g.kind.as_str()) {
                    (Some(s), _) => format!("{s}s ago"),
                    (None, "wireguard") => "never".into(),
                    (None, _) => "-".into(),
                },
                g.rx_bytes.to_string(),
                g.tx_bytes.to_string(),
                g.wire_rx_bytes.map_or("-".into(), |b| b.to_string()),
                g.wire_tx_bytes.map_or("-".into(), |b| b.to_string()),
            ]
        })
        .collect();
    table(
        &[
            "GATEWAY",
            "REGION",
            "KIND",
            "ENDPOINT",
            "HANDSHAKE",
            "RX BYTES",
            "TX BYTES",
            "WG RX",
            "WG TX",
        ],
        &rows,
    )
}

/// `tether trace`: for each address, the decision, where it leads, the
/// session or gateway tunnel, and residency.
pub fn trace_text(trace: &Trace) -> String {
    let mut out = String::new();
    if let Some(name) = &trace.name {
        let _ = writeln!(out, "{name}");
    }
    for path in &trace.paths {
        let e = &path.explanation;
        match (&e.winner, &path.target) {
            (Some(w), Some(t)) => {
                let _ = writeln!(
                    out,
                    "{} via {} {} ({} {}, region {})",
                    e.destination, t.kind, t.id, w.kind, w.prefix, w.region
                );
                match (&t.session, &t.gateway) {
                    (Some(s), _) => {
                        let _ = writeln!(
                            out,
                            "  session   on broker {} over {} from {}, rtt {:.1} ms, since {}",
                            trace.broker,
                            s.transport,
                            s.remote,
                            s.rtt_ms,
                            humantime_secs(s.since)
                        );
                        let _ = writeln!(
                            out,
                            "  counters  from site {} packets / {} bytes, to site {} packets / {} bytes",
                            s.rx_packets, s.rx_bytes, s.tx_packets, s.tx_bytes
                        );
                        if !s.drops.is_empty() {
                            let drops: Vec<String> =
                                s.drops.iter().map(|(r, n)| format!("{r} {n}")).collect();
                            let _ = writeln!(out, "  drops     {}", drops.join(", "));
                        }
                        if let Some(p) = &s.path {
                            let _ = writeln!(
                                out,
                                "  path      min rtt {:.1} ms, window {} KiB, lost {} of {} packets ({:.2} %), {} KiB queued",
                                p.min_rtt_ms,
                                p.cwnd_bytes / 1024,
                                p.lost_packets,
                                p.sent_packets,
                                p.loss_percent(),
                                p.queued_bytes / 1024
                            );
                        }
                    }
                    (None, Some(g)) => {
                        let _ = writeln!(
                            out,
                            "  tunnel    {} gateway, endpoint {}, handshake {}, rx {} bytes, tx {} bytes",
                            g.kind,
                            g.endpoint.map_or("-".into(), |e| e.to_string()),
                            g.last_handshake_secs
                                .map_or("never".into(), |s| format!("{s}s ago")),
                            g.rx_bytes,
                            g.tx_bytes
                        );
                    }
                    (None, None) if path.peer.is_some() => {
                        if let Some(peer) = &path.peer {
                            let _ = writeln!(
                                out,
                                "  relayed   over the broker link to broker {peer}, which holds it"
                            );
                        }
                    }
                    (None, None) if t.kind == "site" => {
                        let _ = writeln!(
                            out,
                            "  session   none on broker {}: the site is not connected (packets are dropped as target_down)",
                            trace.broker
                        );
                    }
                    _ => {}
                }
                let residency: Vec<String> = t
                    .residency
                    .iter()
                    .map(|r| {
                        let side = if t.kind == "site" {
                            format!("{} ({})", r.gateway, r.gateway_region)
                        } else {
                            format!("sites of {}", r.site_region)
                        };
                        format!(
                            "{side} {}",
                            if r.permitted { "permitted" } else { "refused" }
                        )
                    })
                    .collect();
                if !residency.is_empty() {
                    let _ = writeln!(out, "  residency {}", residency.join(", "));
                }
                if let Some(lan) = &path.lan {
                    let _ = writeln!(out, "  lan host  {lan}");
                }
                if let Some(p) = &path.policy {
                    let _ = writeln!(
                        out,
                        "  policy    {} from {} ({}): {}",
                        p.traffic, p.from, p.sender, p.verdict
                    );
                }
            }
            _ => {
                let _ = writeln!(
                    out,
                    "{}: no route (packets to it are dropped as no_route)",
                    e.destination
                );
            }
        }
        if !e.candidates.is_empty() {
            let rows: Vec<Vec<String>> = e
                .candidates
                .iter()
                .map(|c| {
                    vec![
                        format!("    {}", c.route.prefix),
                        c.route.kind.as_str().to_string(),
                        c.route.target.to_string(),
                        c.route.region.to_string(),
                        c.verdict.to_string(),
                    ]
                })
                .collect();
            let _ = write!(
                out,
                "  candidates:\n{}",
                table(&["    PREFIX", "KIND", "VIA", "REGION", "DECISION"], &rows)
            );
        }
    }
    out
}

fn humantime_secs(unix: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    format!("{}s ago", now.saturating_sub(unix))
}

/// Whether every path of a trace found a route (and, when the trace
/// names a sender, the access policy lets it through).
pub fn trace_routed(trace: &Trace) -> bool {
    !trace.paths.is_empty()
        && trace
            .paths
            .iter()
            .all(|p| p.target.is_some() && p.policy.as_ref().is_none_or(|c| c.allowed))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_gateway_never_heard_from_shows_never() {
        let gateway = |kind: &str, secs| tether_proto::api::GatewayInfo {
            id: tether_proto::ids::GatewayId::new("gw-eu").unwrap_or_else(|_| unreachable!()),
            region: tether_proto::ids::RegionId::new("eu").unwrap_or_else(|_| unreachable!()),
            kind: kind.into(),
            public_key: None,
            prefixes: Vec::new(),
            endpoint: None,
            last_handshake_secs: secs,
            rx_packets: 0,
            rx_bytes: 0,
            tx_packets: 0,
            tx_bytes: 0,
            wire_rx_bytes: (kind == "wireguard").then_some(148),
            wire_tx_bytes: (kind == "wireguard").then_some(92),
        };
        let table = gateways_table(&[gateway("wireguard", None)]);
        assert!(table.contains("never"), "{table}");
        let table = gateways_table(&[gateway("wireguard", Some(12))]);
        assert!(table.contains("12s ago"), "{table}");
        assert!(table.contains("148") && table.contains("92"), "{table}");
        let table = gateways_table(&[gateway("local", None)]);
        assert!(!table.contains("never"), "{table}");
    }

    use super::*;

    #[test]
    fn tables_align_columns_to_their_widest_cell() {
        let t = table(
            &["A", "BB", "C"],
            &[
                vec!["long-cell".into(), "x".into(), "tail".into()],
                vec!["s".into(), "yyyy".into(), "t".into()],
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "A          BB    C");
        assert_eq!(lines[1], "long-cell  x     tail");
        assert_eq!(lines[2], "s          yyyy  t");
    }

    #[test]
    fn sites_pair_each_mapped_lan_with_the_real_one() {
        let net = |t: &str| t.parse::<ipnet::IpNet>().unwrap_or_else(|_| unreachable!());
        let site = |lans: Vec<LanMappingInfo>| SiteInfo {
            site: tether_proto::ids::SiteId::new("hospital-a").unwrap_or_else(|_| unreachable!()),
            region: tether_proto::ids::RegionId::new("eu").unwrap_or_else(|_| unreachable!()),
            addresses: vec![net("100.64.0.2/32")],
            lans,
            revoked: false,
            enrolled: true,
            session: None,
            broker: None,
        };
        let t = sites_table(&[site(vec![
            LanMappingInfo {
                lan: net("192.168.1.0/24"),
                mapped: net("10.200.0.0/24"),
                release_at: None,
            },
            LanMappingInfo {
                lan: net("192.168.2.0/24"),
                mapped: net("10.200.1.0/24"),
                release_at: Some(1),
            },
        ])]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].ends_with("ADDRESSES      LANS"), "{t}");
        assert!(
            lines[1].ends_with(
                "100.64.0.2/32  10.200.0.0/24 = 192.168.1.0/24, 10.200.1.0/24 = 192.168.2.0/24 (unused)"
            ),
            "{t}"
        );
        let t = sites_table(&[site(Vec::new())]);
        assert!(
            t.lines()
                .nth(1)
                .is_some_and(|l| l.ends_with("100.64.0.2/32  -")),
            "{t}"
        );
    }

    #[test]
    fn exit_codes_tell_unreachable_from_refused() {
        let u = CallError::Unreachable {
            url: "http://127.0.0.1:1".into(),
            reason: "refused".into(),
        };
        assert_eq!(u.exit_code(), ExitCode::from(EXIT_UNREACHABLE));
        let r = CallError::Refused {
            what: "/v1/routes".into(),
            status: 401,
            message: "missing token".into(),
        };
        assert_eq!(r.exit_code(), ExitCode::from(EXIT_REFUSED));
        assert!(r.to_string().contains("HTTP 401"));
    }
}
