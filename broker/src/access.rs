//! The access policy in the broker: reloading it, showing it, and asking it
//! about a path (the decisions are `tether_proto::policy`'s).

use std::net::IpAddr;
use std::path::Path;

use tether_config::broker::BrokerFile;
use tether_proto::api::{PolicyCheck, PolicyInfo, PolicyRuleInfo};
use tether_proto::forward::{Ingress, Router};
use tether_proto::policy::{Backends, Ports, Traffic};
use tether_proto::route::{Route, RouteKind, RouteTarget};

use crate::state::Broker;

/// Reads the policy from the configuration file `path` (the whole file is
/// validated, as at start) and puts it in force. Returns the number of
/// rules. On any error the policy in force stays.
pub fn reload(broker: &Broker, path: &Path) -> anyhow::Result<usize> {
    let origin = path.display().to_string();
    let config = BrokerFile::load(path)?.validate(&origin)?;
    let rules = config.policy.rules().len();
    broker.decide(|core| core.handle_access_policy(config.policy.clone()))?;
    Ok(rules)
}

/// The policy in force, for `GET /v1/policy`.
pub fn info(router: &Router) -> PolicyInfo {
    let policy = &router.policy;
    PolicyInfo {
        backends: match policy.backends() {
            Backends::Region => "region".into(),
            Backends::Rules => "rules".into(),
        },
        groups: policy
            .groups()
            .iter()
            .map(|(g, members)| {
                let mut m: Vec<String> = members.iter().map(|s| s.to_string()).collect();
                m.sort();
                (g.clone(), m)
            })
            .collect(),
        rules: policy
            .rules()
            .iter()
            .map(|r| PolicyRuleInfo {
                name: r.name.clone(),
                from: r.from.iter().map(|s| s.to_string()).collect(),
                to: r.to.iter().map(|s| s.to_string()).collect(),
                ports: r.ports.iter().map(|p| p.to_string()).collect(),
            })
            .collect(),
    }
}

/// Reads `tcp/443`, `udp/53`, `icmp` or `any` as the first packet of such
/// a flow (a TCP SYN, a UDP datagram, an echo request).
pub fn traffic(text: &str) -> Result<(Traffic, String), String> {
    let ports: Ports = text
        .parse()
        .map_err(|e: tether_proto::policy::PortsError| e.to_string())?;
    let traffic = Traffic::opening(&ports)
        .ok_or_else(|| format!("{text:?} names no port: write e.g. tcp/443 or udp/53"))?;
    Ok((traffic, ports.to_string()))
}

/// What the policy says of `traffic` from `from` along `route` to `to`,
/// the sender identified by the route table (a site, a site's LAN, a
/// backend behind a gateway). `None` when the sender is no address of the
/// mesh.
pub fn check(
    router: &Router,
    from: IpAddr,
    to: IpAddr,
    route: &Route,
    traffic: (Traffic, String),
) -> Option<PolicyCheck> {
    let sender = router.table.lookup(from).winner()?.clone();
    let (ingress, who) = match &sender.target {
        RouteTarget::Site(site) => (
            Ingress::Site {
                site,
                region: &sender.region,
                allowed: &[],
            },
            if sender.kind == RouteKind::SiteLan {
                format!("lan of site {site}")
            } else {
                format!("site {site}")
            },
        ),
        RouteTarget::Gateway(gateway) => (
            Ingress::Gateway {
                gateway,
                region: &sender.region,
                allowed: &[],
            },
            format!("gateway {gateway}"),
        ),
    };
    let verdict = router.policy_check(&ingress, from, to, traffic.0, route);
    let rule = match &verdict {
        tether_proto::policy::Verdict::Rule(r) | tether_proto::policy::Verdict::Reply(r) => {
            Some(r.to_string())
        }
        _ => None,
    };
    Some(PolicyCheck {
        from,
        sender: who,
        traffic: traffic.1,
        allowed: verdict.allows(),
        verdict: verdict.to_string(),
        rule,
    })
}
