//! `[policy]` of the broker configuration: who may reach whom.
//!
//! ```toml
//! [policy]
//! # "region" (default): backends and the sites their region may reach,
//! # both ways; "rules": only what a rule allows.
//! backends = "region"
//!
//! [policy.groups]
//! labs = ["lab-1", "lab-2"]
//!
//! [[policy.allow]]
//! name = "labs-share-results"
//! from = ["group:labs"]
//! to = ["group:labs"]
//! ports = ["tcp/443", "icmp"]
//! ```
//!
//! Between sites everything not allowed is denied. The selectors and ports
//! are those of [`tether_proto::policy`].

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};
use tether_proto::ids::{GatewayId, RegionId, SiteId};
use tether_proto::policy::{Backends, Policy, Ports, Rule, Selector, Sites};

use crate::Problems;

/// Most rules a policy may hold.
pub const MAX_RULES: usize = 100_000;

/// `[policy]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyFile {
    /// `"region"` or `"rules"`.
    pub backends: String,
    /// Named groups of sites.
    pub groups: BTreeMap<String, Vec<String>>,
    /// Allow rules, checked in order (the first that allows a flow is the
    /// one reported).
    pub allow: Vec<RuleFile>,
}

impl Default for PolicyFile {
    fn default() -> Self {
        Self {
            backends: "region".into(),
            groups: BTreeMap::new(),
            allow: Vec::new(),
        }
    }
}

/// `[[policy.allow]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    /// A name, unique in the policy.
    pub name: String,
    /// Selectors of the senders.
    pub from: Vec<String>,
    /// Selectors of the receivers.
    pub to: Vec<String>,
    /// What may pass; empty or absent is anything.
    #[serde(default)]
    pub ports: Vec<String>,
}

/// What the rest of the configuration defines, to check names against.
#[derive(Debug, Clone, Default)]
pub struct Known<'a> {
    /// The configured regions (`None`: do not check).
    pub regions: Option<Vec<&'a RegionId>>,
    /// The configured gateways (`None`: do not check).
    pub gateways: Option<Vec<&'a GatewayId>>,
}

impl PolicyFile {
    /// Validates and compiles the policy, recording every problem under
    /// `policy.…` with the rule's position and name.
    pub(crate) fn compile(&self, p: &mut Problems, known: &Known<'_>) -> Option<Policy> {
        let before = p.len();
        let backends = match self.backends.as_str() {
            "region" => Backends::Region,
            "rules" => Backends::Rules,
            other => {
                p.add(
                    "policy.backends",
                    format!("{other:?} is neither \"region\" nor \"rules\""),
                    "write \"region\" (backends reach the sites of their region, as without a policy) or \"rules\" (only what a rule allows)",
                );
                Backends::Region
            }
        };
        if self.allow.len() > MAX_RULES {
            p.add(
                "policy.allow",
                format!("{} rules, more than {MAX_RULES}", self.allow.len()),
                "group sites ([policy.groups]) and name the groups in fewer rules",
            );
        }
        let mut groups: HashMap<String, HashSet<SiteId>> = HashMap::new();
        for (name, members) in &self.groups {
            let field = format!("policy.groups.{name}");
            if name.is_empty() || name.contains(':') {
                p.add(
                    &field,
                    format!("{name:?} is not a group name"),
                    "name groups with letters, digits and '-'",
                );
            }
            let mut set = HashSet::new();
            for (i, m) in members.iter().enumerate() {
                match m.parse::<SiteId>() {
                    Ok(s) => {
                        set.insert(s);
                    }
                    Err(e) => p.add(
                        format!("{field}[{i}]"),
                        e.to_string(),
                        "list site ids, as enrolled (e.g. \"hospital-a\")",
                    ),
                }
            }
            groups.insert(name.clone(), set);
        }
        let mut rules = Vec::with_capacity(self.allow.len());
        let mut names = HashSet::new();
        for (i, rule) in self.allow.iter().enumerate() {
            let at = format!("policy.allow[{i}] ({:?})", rule.name);
            if rule.name.trim().is_empty() {
                p.add(
                    format!("policy.allow[{i}].name"),
                    "the rule has no name",
                    "name every rule; traces and metrics show the name",
                );
            } else if !names.insert(rule.name.as_str()) {
                p.add(
                    format!("{at}.name"),
                    "another rule has the same name",
                    "give each rule its own name",
                );
            }
            let mut side = |list: &[String], which: &str| -> Vec<Selector> {
                if list.is_empty() {
                    p.add(
                        format!("{at}.{which}"),
                        "empty",
                        format!(
                            "name at least one sender or receiver in {which}, e.g. [\"group:labs\"]"
                        ),
                    );
                }
                let mut out = Vec::new();
                for (j, text) in list.iter().enumerate() {
                    let field = format!("{at}.{which}[{j}]");
                    match text.parse::<Selector>() {
                        Ok(s) => {
                            check_names(p, &field, &s, &groups, known);
                            out.push(s);
                        }
                        // The error's own text ends with the fix: name
                        // the problem here and the fix once, below.
                        Err(e) => p.add(
                            field,
                            format!("{:?} is not a selector: {}", e.text, e.problem),
                            "write sites, site:<id>, group:<name>, region:<name>, lan-of:<one of those>, gateways, gateway:<id> or prefix:<cidr> (docs/policy.md)",
                        ),
                    }
                }
                out
            };
            let from = side(&rule.from, "from");
            let to = side(&rule.to, "to");
            let mut ports = Vec::new();
            for (j, text) in rule.ports.iter().enumerate() {
                match text.parse::<Ports>() {
                    Ok(x) => ports.push(x),
                    Err(e) => p.add(
                        format!("{at}.ports[{j}]"),
                        format!("{:?} is not a port specification: {}", e.text, e.problem),
                        "write tcp/443, tcp/8000-8100, udp/53, tcp, udp, icmp or any",
                    ),
                }
            }
            rules.push(Rule {
                name: rule.name.clone(),
                from,
                to,
                ports,
            });
        }
        if p.len() > before {
            return None;
        }
        match Policy::new(rules, groups, backends) {
            Ok(policy) => Some(policy),
            Err(e) => {
                p.add("policy", e.to_string(), "fix the rule named");
                None
            }
        }
    }
}

/// Checks the `[policy]` of `path`: a whole broker configuration (names
/// are checked against its regions and gateways; the rest of the file is
/// not validated), or a file holding only `[policy]`.
pub fn check_file(path: &std::path::Path) -> Result<Policy, crate::ConfigError> {
    let origin = path.display().to_string();
    let file = crate::broker::BrokerFile::load(path)?;
    let regions: Vec<RegionId> = file
        .region
        .iter()
        .filter_map(|r| r.name.parse().ok())
        .collect();
    let mut gateways: Vec<GatewayId> = file
        .gateway
        .iter()
        .filter_map(|g| g.id.parse().ok())
        .collect();
    if file.local_gateway.enabled {
        gateways.extend(file.local_gateway.id.parse().ok());
    }
    // A file of only [policy] has the embedded default region, which names
    // none of the operator's: check region and gateway names only against
    // a file that declares them.
    let whole = file
        != crate::broker::BrokerFile {
            policy: file.policy.clone(),
            ..Default::default()
        };
    let known = Known {
        regions: whole.then(|| regions.iter().collect()),
        gateways: whole.then(|| gateways.iter().collect()),
    };
    let mut p = Problems::default();
    match file.policy.compile(&mut p, &known) {
        Some(policy) => p.finish(&origin, policy),
        None => Err(p.into_error(&origin)),
    }
}

/// Checks the groups, regions and gateways a selector names exist.
fn check_names(
    p: &mut Problems,
    field: &str,
    selector: &Selector,
    groups: &HashMap<String, HashSet<SiteId>>,
    known: &Known<'_>,
) {
    let sites = match selector {
        Selector::Sites(s) | Selector::LanOf(s) => Some(s),
        Selector::Gateway(g) => {
            if let Some(list) = &known.gateways
                && !list.contains(&g)
            {
                p.add(
                    field,
                    format!("no gateway {g} is configured"),
                    "name a gateway of [[gateway]] or [local_gateway]",
                );
            }
            None
        }
        _ => None,
    };
    match sites {
        Some(Sites::Group(g)) if !groups.contains_key(g) => p.add(
            field,
            format!("group {g:?} is not defined"),
            format!("define it under [policy.groups], e.g. {g} = [\"site-a\", \"site-b\"]"),
        ),
        Some(Sites::Region(r)) => {
            if let Some(list) = &known.regions
                && !list.contains(&r)
            {
                p.add(
                    field,
                    format!("no region {r} is configured"),
                    "name a region of [[region]]",
                );
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn compile(text: &str) -> Result<Policy, Vec<String>> {
        #[derive(Deserialize)]
        struct Wrapper {
            policy: PolicyFile,
        }
        let file: Wrapper = toml::from_str(text).unwrap();
        let mut p = Problems::default();
        let eu: RegionId = "eu".parse().unwrap();
        let gw: GatewayId = "gw-eu".parse().unwrap();
        let known = Known {
            regions: Some(vec![&eu]),
            gateways: Some(vec![&gw]),
        };
        let policy = file.policy.compile(&mut p, &known);
        match policy {
            Some(policy) => Ok(policy),
            None => Err(p.messages()),
        }
    }

    #[test]
    fn a_policy_compiles() {
        let policy = compile(
            r#"
[policy]
backends = "rules"
[policy.groups]
labs = ["lab-1", "lab-2"]
[[policy.allow]]
name = "labs"
from = ["group:labs"]
to = ["group:labs", "lan-of:group:labs"]
ports = ["tcp/443", "icmp"]
[[policy.allow]]
name = "pacs"
from = ["gateway:gw-eu", "prefix:10.31.0.0/24"]
to = ["region:eu"]
"#,
        )
        .unwrap();
        assert_eq!(policy.rules().len(), 2);
        assert_eq!(policy.backends(), Backends::Rules);
    }

    #[test]
    fn every_problem_names_the_rule_and_the_fix() {
        let problems = compile(
            r#"
[policy]
backends = "open"
[[policy.allow]]
name = "a"
from = ["group:nobody", "region:mars"]
to = []
ports = ["tcp/99999"]
[[policy.allow]]
name = "a"
from = ["host:x"]
to = ["gateway:gw-us"]
"#,
        )
        .unwrap_err();
        let all = problems.join("\n");
        for needle in [
            "policy.backends",
            "policy.allow[0] (\"a\").from[0]: group \"nobody\" is not defined",
            "policy.allow[0] (\"a\").from[1]: no region mars",
            "policy.allow[0] (\"a\").to: empty",
            "policy.allow[0] (\"a\").ports[0]",
            "policy.allow[1] (\"a\").name: another rule has the same name",
            "policy.allow[1] (\"a\").from[0]",
            "policy.allow[1] (\"a\").to[0]: no gateway gw-us",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }
}
