//! `tether-gateway preflight`: what on this node conflicts with the
//! gateway, before (or while) it runs.
//!
//! The facts come from `ip -j` and `/proc/sys` ([`gather`]); the verdicts
//! are a pure function of them ([`analyze`]), so they are tested without a
//! node.

use std::net::SocketAddr;
use std::process::Command;

use serde_json::Value;
use tether_config::gateway::GatewayConfig;

use crate::wireguard::{Resolved, choose_brokers};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Fine.
    Ok,
    /// Works, but worth knowing.
    Warn,
    /// The gateway will not work (or will break something) as configured.
    Fail,
}

impl Level {
    /// Label for the report.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Severity.
    pub level: Level,
    /// What was checked.
    pub check: &'static str,
    /// What was found, and what to do.
    pub detail: String,
}

/// The way to one broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerPath {
    /// The broker's WireGuard endpoint.
    pub addr: SocketAddr,
    /// The interface the route towards it leaves by, and its MTU.
    pub underlay: Option<(String, u32)>,
}

/// What the checks look at.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// `ip -j -4 rule show` and `ip -j -6 rule show`, concatenated.
    pub rules: Vec<Value>,
    /// `ip -j route show table <table>` for both families.
    pub table_routes: Vec<Value>,
    /// rp_filter by interface name (`all` and `default` included).
    pub rp_filter: Vec<(String, u8)>,
    /// Each broker the gateway would talk to, with the underlay interface
    /// towards it and that interface's MTU.
    pub brokers: Vec<BrokerPath>,
    /// Configured brokers the gateway would leave out, and why.
    pub broker_problems: Vec<String>,
    /// `net.ipv4.ip_forward` (and IPv6 forwarding).
    pub forwarding: (bool, bool),
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn table_of(rule: &Value) -> String {
    match rule.get("table") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

/// The verdicts.
pub fn analyze(config: &GatewayConfig, facts: &Facts) -> Vec<Finding> {
    let mut out = Vec::new();
    let (table, prio) = (config.table.to_string(), u64::from(config.rule_priority));

    // Rules in the gateway's band.
    let ours = |r: &Value| {
        r.get("priority").and_then(Value::as_u64) == Some(prio)
            && table_of(r) == table
            && str_of(r, "src").is_none_or(|s| s == "all")
            && r.get("fwmark").is_none()
    };
    let foreign_prio: Vec<String> = facts
        .rules
        .iter()
        .filter(|r| r.get("priority").and_then(Value::as_u64) == Some(prio) && !ours(r))
        .map(|r| format!("priority {prio} lookup {}", table_of(r)))
        .collect();
    let foreign_table: Vec<String> = facts
        .rules
        .iter()
        .filter(|r| table_of(r) == table && !ours(r))
        .map(|r| {
            format!(
                "priority {} lookup {table}",
                r.get("priority").and_then(Value::as_u64).unwrap_or(0)
            )
        })
        .collect();
    if foreign_prio.is_empty() && foreign_table.is_empty() {
        out.push(Finding {
            level: Level::Ok,
            check: "ip rules",
            detail: format!("priority {prio} and table {table} are not used by other rules"),
        });
    } else {
        out.push(Finding {
            level: Level::Fail,
            check: "ip rules",
            detail: format!(
                "other rules use the gateway's band: {}; choose another routing.table / routing.rule_priority",
                [foreign_prio, foreign_table].concat().join(", ")
            ),
        });
    }

    // Routes in the table that are not the gateway's.
    let foreign_routes: Vec<String> = facts
        .table_routes
        .iter()
        .filter(|r| str_of(r, "dev") != Some(config.tun_name.as_str()))
        .map(|r| {
            format!(
                "{} dev {}",
                str_of(r, "dst").unwrap_or("?"),
                str_of(r, "dev").unwrap_or("?")
            )
        })
        .collect();
    out.push(if foreign_routes.is_empty() {
        Finding {
            level: Level::Ok,
            check: "routing table",
            detail: format!("table {table} holds no routes of other software"),
        }
    } else {
        Finding {
            level: Level::Fail,
            check: "routing table",
            detail: format!(
                "table {table} already holds {}; another program owns it: choose another routing.table",
                foreign_routes.join(", ")
            ),
        }
    });

    // Packet marks: tether uses none, but say who does.
    let marks: Vec<String> = facts
        .rules
        .iter()
        .filter_map(|r| {
            str_of(r, "fwmark").map(|m| {
                format!(
                    "priority {} fwmark {m} lookup {}",
                    r.get("priority").and_then(Value::as_u64).unwrap_or(0),
                    table_of(r)
                )
            })
        })
        .collect();
    out.push(Finding {
        level: Level::Ok,
        check: "fwmark",
        detail: if marks.is_empty() {
            "no rule matches packet marks; tether sets none".into()
        } else {
            format!(
                "rules match marks ({}); tether sets no marks and does not touch them",
                marks.join(", ")
            )
        },
    });

    // Reverse-path filtering.
    let get = |name: &str| {
        facts
            .rp_filter
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    };
    let all = get("all").unwrap_or(0);
    let strict: Vec<String> = facts
        .rp_filter
        .iter()
        .filter(|(n, _)| n != "all" && n != "default")
        .filter(|(_, v)| (*v).max(all) == 1)
        .map(|(n, _)| n.clone())
        .collect();
    out.push(if strict.is_empty() {
        Finding {
            level: Level::Ok,
            check: "rp_filter",
            detail: "no strict reverse-path filtering on the gateway's interfaces".into(),
        }
    } else {
        Finding {
            level: Level::Warn,
            check: "rp_filter",
            detail: format!(
                "strict rp_filter (1) on {}: packets whose reply would leave by another interface are dropped; site replies on {} are fine while their routes exist, backends reaching the node asymmetrically are not: set rp_filter=2 (loose) there",
                strict.join(", "),
                config.tun_name
            ),
        }
    });

    // The brokers: resolved, inside the published CIDR, one family.
    out.push(if facts.brokers.is_empty() {
        Finding {
            level: Level::Fail,
            check: "brokers",
            detail: format!("no usable broker: {}", facts.broker_problems.join("; ")),
        }
    } else if facts.broker_problems.is_empty() {
        Finding {
            level: Level::Ok,
            check: "brokers",
            detail: format!(
                "{} reachable by route: {}",
                facts.brokers.len(),
                list(&facts.brokers)
            ),
        }
    } else {
        Finding {
            level: Level::Warn,
            check: "brokers",
            detail: format!(
                "{}; the gateway goes on with {}",
                facts.broker_problems.join("; "),
                list(&facts.brokers)
            ),
        }
    });

    // MTU of the underlay towards each broker: one line per interface.
    type Underlay<'a> = Option<&'a (String, u32)>;
    let mut by_underlay: Vec<(Underlay, Vec<&BrokerPath>)> = Vec::new();
    for b in &facts.brokers {
        match by_underlay
            .iter_mut()
            .find(|(u, _)| *u == b.underlay.as_ref())
        {
            Some((_, v)) => v.push(b),
            None => by_underlay.push((b.underlay.as_ref(), vec![b])),
        }
    }
    for (underlay, brokers) in by_underlay {
        let names = brokers
            .iter()
            .map(|b| b.addr.ip().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let overhead = if brokers.iter().any(|b| b.addr.is_ipv6()) {
            80
        } else {
            60
        };
        out.push(match underlay {
            Some((dev, mtu)) if *mtu >= u32::from(config.mtu) + overhead => Finding {
                level: Level::Ok,
                check: "mtu",
                detail: format!(
                    "{dev} (towards {names}) has MTU {mtu}: room for the tunnel MTU {} plus {overhead} bytes of WireGuard",
                    config.mtu
                ),
            },
            Some((dev, mtu)) => Finding {
                level: Level::Fail,
                check: "mtu",
                detail: format!(
                    "{dev} (towards {names}) has MTU {mtu}, too small for the tunnel MTU {} plus {overhead} bytes of WireGuard: set tun.mtu = {}",
                    config.mtu,
                    mtu.saturating_sub(overhead).max(1280)
                ),
            },
            None => Finding {
                level: Level::Warn,
                check: "mtu",
                detail: format!("no route towards {names} found; cannot check the underlay MTU"),
            },
        });
    }

    // Forwarding: backends route through this node.
    let (v4, v6) = facts.forwarding;
    out.push(if v4 {
        Finding {
            level: Level::Ok,
            check: "forwarding",
            detail: format!(
                "net.ipv4.ip_forward=1{}",
                if v6 { ", IPv6 forwarding on" } else { "" }
            ),
        }
    } else {
        Finding {
            level: Level::Fail,
            check: "forwarding",
            detail: "net.ipv4.ip_forward=0: backends on other hosts cannot route through the gateway; set it to 1 (and net.ipv6.conf.all.forwarding=1 for IPv6)".into(),
        }
    });
    out
}

fn list(brokers: &[BrokerPath]) -> String {
    brokers
        .iter()
        .map(|b| b.addr.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn ip_json(args: &[&str]) -> Vec<Value> {
    Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice::<Vec<Value>>(&o.stdout).ok())
        .unwrap_or_default()
}

fn sysctl(path: &str) -> Option<u8> {
    std::fs::read_to_string(format!("/proc/sys/{path}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Reads the facts from this node, for the brokers chosen from `resolved`
/// as `tether-gateway run` chooses them.
pub fn gather(config: &GatewayConfig, resolved: &[Resolved]) -> Facts {
    let table = config.table.to_string();
    let mut rules = ip_json(&["-4", "rule", "show"]);
    rules.extend(ip_json(&["-6", "rule", "show"]));
    let mut table_routes = ip_json(&["-4", "route", "show", "table", &table]);
    table_routes.extend(ip_json(&["-6", "route", "show", "table", &table]));
    let choice = choose_brokers(&config.published_cidr, resolved);
    let brokers: Vec<BrokerPath> = choice
        .kept
        .iter()
        .map(|addr| BrokerPath {
            addr: *addr,
            underlay: underlay_towards(addr),
        })
        .collect();
    let mut rp_filter = Vec::new();
    let mut names = vec!["all".to_string(), "default".to_string()];
    for b in &brokers {
        if let Some((dev, _)) = &b.underlay
            && !names.contains(dev)
        {
            names.push(dev.clone());
        }
    }
    names.push(config.tun_name.clone());
    for name in names {
        if let Some(v) = sysctl(&format!("net/ipv4/conf/{name}/rp_filter")) {
            rp_filter.push((name, v));
        }
    }
    Facts {
        rules,
        table_routes,
        rp_filter,
        brokers,
        broker_problems: choice.problems,
        forwarding: (
            sysctl("net/ipv4/ip_forward") == Some(1),
            sysctl("net/ipv6/conf/all/forwarding") == Some(1),
        ),
    }
}

/// The interface the route towards `addr` leaves by, and its MTU.
fn underlay_towards(addr: &SocketAddr) -> Option<(String, u32)> {
    let route = ip_json(&["route", "get", &addr.ip().to_string()]);
    let dev = route.first().and_then(|r| str_of(r, "dev"))?.to_string();
    let link = ip_json(&["link", "show", "dev", &dev]);
    let mtu = link
        .first()
        .and_then(|l| l.get("mtu"))
        .and_then(Value::as_u64)?;
    Some((dev, mtu as u32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;
    use serde_json::json;

    fn config() -> GatewayConfig {
        tether_config::gateway::GatewayFile::default()
            .validate("test")
            .unwrap()
    }

    fn level(findings: &[Finding], check: &str) -> Level {
        findings.iter().find(|f| f.check == check).unwrap().level
    }

    fn healthy() -> Facts {
        Facts {
            rules: vec![
                json!({"priority": 0, "src": "all", "table": "local"}),
                json!({"priority": 9, "src": "all", "fwmark": "0x200/0xf00", "table": "2004"}),
                json!({"priority": 7300, "src": "all", "table": "7300"}),
                json!({"priority": 32766, "src": "all", "table": "main"}),
            ],
            table_routes: vec![json!({"dst": "100.64.0.5", "dev": "tether-gw0"})],
            rp_filter: vec![("all".into(), 0), ("eth0".into(), 2)],
            brokers: vec![BrokerPath {
                addr: "100.64.0.1:51820".parse().unwrap(),
                underlay: Some(("eth0".into(), 1500)),
            }],
            broker_problems: vec![],
            forwarding: (true, false),
        }
    }

    #[test]
    fn a_clean_cilium_node_passes() {
        let f = analyze(&config(), &healthy());
        assert!(f.iter().all(|f| f.level == Level::Ok), "{f:#?}");
        assert!(
            f.iter()
                .any(|f| f.check == "fwmark" && f.detail.contains("0x200/0xf00"))
        );
    }

    #[test]
    fn conflicts_are_reported_with_a_fix() {
        let mut facts = healthy();
        facts
            .rules
            .push(json!({"priority": 7300, "src": "all", "table": "main"}));
        facts
            .table_routes
            .push(json!({"dst": "10.0.0.0/8", "dev": "wg0"}));
        facts.rp_filter.push(("tether-gw0".into(), 1));
        facts.brokers[0].underlay = Some(("eth0".into(), 1460));
        facts.forwarding = (false, false);
        let f = analyze(&config(), &facts);
        assert_eq!(level(&f, "ip rules"), Level::Fail);
        assert_eq!(level(&f, "routing table"), Level::Fail);
        assert_eq!(level(&f, "rp_filter"), Level::Warn);
        assert_eq!(level(&f, "mtu"), Level::Fail);
        assert!(
            f.iter()
                .any(|f| f.check == "mtu" && f.detail.contains("tun.mtu = 1400"))
        );
        assert_eq!(level(&f, "forwarding"), Level::Fail);
        // Strict "all" makes every interface strict.
        let mut facts = healthy();
        facts.rp_filter = vec![("all".into(), 1), ("eth0".into(), 0)];
        assert_eq!(level(&analyze(&config(), &facts), "rp_filter"), Level::Warn);
    }

    fn resolved(endpoint: &str, addrs: Result<&[&str], &str>) -> Resolved {
        Resolved {
            endpoint: endpoint.into(),
            addrs: addrs
                .map(|a| a.iter().map(|a| a.parse().unwrap()).collect())
                .map_err(str::to_string),
        }
    }

    #[test]
    fn every_broker_is_checked_not_only_the_first() {
        let published: IpNet = "100.64.0.0/24".parse().unwrap();
        let choice = choose_brokers(
            &published,
            &[
                resolved("b1:51820", Ok(&["100.64.0.1:51820"])),
                resolved("b2.example:51820", Err("no such host")),
                resolved("b3:51820", Ok(&["192.0.2.7:51820", "100.64.0.3:51820"])),
                resolved("b4:51820", Ok(&["10.9.9.9:51820"])),
                resolved("b5:51820", Ok(&["[64:ff9b::100:40]:51820"])),
                resolved("b1-again:51820", Ok(&["100.64.0.1:51820"])),
            ],
        );
        let kept: Vec<String> = choice.kept.iter().map(ToString::to_string).collect();
        assert_eq!(kept, ["100.64.0.1:51820", "100.64.0.3:51820"]);
        assert_eq!(choice.problems.len(), 3, "{:?}", choice.problems);
        assert!(choice.problems[0].contains("cannot resolve the broker b2.example:51820"));
        assert!(choice.problems[1].contains("b4:51820 resolves to [10.9.9.9:51820], none inside"));
        assert!(choice.problems[2].contains("b5:51820"));

        // The second broker's path is narrower than the first's: preflight
        // fails on it, naming that broker, and warns about the others.
        let mut facts = healthy();
        facts.brokers.push(BrokerPath {
            addr: "100.64.0.3:51820".parse().unwrap(),
            underlay: Some(("eth1".into(), 1400)),
        });
        facts.broker_problems = choice.problems.clone();
        let f = analyze(&config(), &facts);
        assert_eq!(level(&f, "brokers"), Level::Warn);
        let mtu: Vec<&Finding> = f.iter().filter(|f| f.check == "mtu").collect();
        assert_eq!(mtu.len(), 2, "{mtu:#?}");
        assert_eq!(mtu[0].level, Level::Ok);
        assert_eq!(mtu[1].level, Level::Fail);
        assert!(
            mtu[1].detail.contains("eth1 (towards 100.64.0.3)"),
            "{}",
            mtu[1].detail
        );

        // No broker usable at all: preflight fails.
        let mut facts = healthy();
        facts.brokers.clear();
        facts.broker_problems =
            vec!["cannot resolve the broker b2.example:51820: no such host".into()];
        let f = analyze(&config(), &facts);
        assert_eq!(level(&f, "brokers"), Level::Fail);
        assert!(f.iter().all(|f| f.check != "mtu"));
    }
}
