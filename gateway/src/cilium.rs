//! Cilium resources for the live site routes.
//!
//! One `CiliumCIDRGroup` per site, labelled with the site and its region,
//! lists the site's prefixes; policies select sites by those labels, so
//! they keep working as sites come and go. The example
//! `CiliumNetworkPolicy` lets the pods of one namespace reach every site of
//! one region (Cilium 1.17 or later for `cidrGroupSelector` in egress
//! rules).

use std::collections::BTreeMap;
use std::fmt::Write;

use ipnet::IpNet;
use tether_proto::gateway::SiteRoute;
use tether_proto::ids::{RegionId, SiteId};

/// Label carrying the site id.
pub const SITE_LABEL: &str = "tether.io/site";
/// Label carrying the region.
pub const REGION_LABEL: &str = "tether.io/region";
/// Default API version of `CiliumCIDRGroup`.
pub const CIDR_GROUP_API: &str = "cilium.io/v2alpha1";

/// The name of a site's `CiliumCIDRGroup`.
pub fn group_name(site: &SiteId) -> String {
    format!("tether-site-{site}")
}

/// Renders one `CiliumCIDRGroup` per site, as a YAML stream.
pub fn cidr_groups(routes: &[SiteRoute], api_version: &str) -> String {
    let mut sites: BTreeMap<(&SiteId, &RegionId), Vec<IpNet>> = BTreeMap::new();
    for r in routes {
        sites
            .entry((&r.site, &r.region))
            .or_default()
            .push(r.prefix);
    }
    let mut out = String::new();
    for ((site, region), prefixes) in sites {
        out.push_str("---\n");
        let _ = writeln!(out, "apiVersion: {api_version}");
        out.push_str("kind: CiliumCIDRGroup\n");
        out.push_str("metadata:\n");
        let _ = writeln!(out, "  name: {}", group_name(site));
        out.push_str("  labels:\n");
        out.push_str("    app.kubernetes.io/managed-by: tether-gateway\n");
        let _ = writeln!(out, "    {SITE_LABEL}: {site}");
        let _ = writeln!(out, "    {REGION_LABEL}: {region}");
        out.push_str("spec:\n");
        out.push_str("  externalCIDRs:\n");
        for p in prefixes {
            let _ = writeln!(out, "    - \"{p}\"");
        }
    }
    out
}

/// Renders an example `CiliumNetworkPolicy` letting every pod of
/// `namespace` reach the sites of `region` (and nothing else it does not
/// already allow).
pub fn example_policy(namespace: &str, region: &RegionId) -> String {
    format!(
        "---\n\
apiVersion: cilium.io/v2\n\
kind: CiliumNetworkPolicy\n\
metadata:\n  name: tether-sites-{region}\n  namespace: {namespace}\n\
spec:\n  endpointSelector: {{}}\n  egress:\n    - toCIDRSet:\n        - cidrGroupSelector:\n            matchLabels:\n              {REGION_LABEL}: {region}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str, site: &str, region: &str) -> SiteRoute {
        SiteRoute {
            prefix: prefix.parse().unwrap(),
            site: SiteId::new(site).unwrap(),
            region: RegionId::new(region).unwrap(),
        }
    }

    fn docs(text: &str) -> Vec<serde_yaml::Value> {
        serde_yaml::Deserializer::from_str(text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect()
    }

    #[test]
    fn one_group_per_site_with_its_prefixes_and_labels() {
        let routes = vec![
            route("100.64.0.5/32", "lab-a", "eu"),
            route("fd74::5/128", "lab-a", "eu"),
            route("100.64.9.0/24", "lab-a", "eu"),
            route("100.64.0.6/32", "lab-b", "eu"),
        ];
        let yaml = cidr_groups(&routes, CIDR_GROUP_API);
        let docs = docs(&yaml);
        assert_eq!(docs.len(), 2, "{yaml}");
        let a = &docs[0];
        assert_eq!(a["apiVersion"], "cilium.io/v2alpha1");
        assert_eq!(a["kind"], "CiliumCIDRGroup");
        assert_eq!(a["metadata"]["name"], "tether-site-lab-a");
        assert_eq!(a["metadata"]["labels"][SITE_LABEL], "lab-a");
        assert_eq!(a["metadata"]["labels"][REGION_LABEL], "eu");
        let cidrs: Vec<&str> = a["spec"]["externalCIDRs"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(cidrs, ["100.64.0.5/32", "fd74::5/128", "100.64.9.0/24"]);
        assert_eq!(docs[1]["metadata"]["name"], "tether-site-lab-b");
        assert!(cidr_groups(&[], CIDR_GROUP_API).is_empty());
    }

    #[test]
    fn the_example_policy_selects_the_region_by_label() {
        let yaml = example_policy("analytics", &RegionId::new("eu").unwrap());
        let docs = docs(&yaml);
        let p = &docs[0];
        assert_eq!(p["kind"], "CiliumNetworkPolicy");
        assert_eq!(p["metadata"]["namespace"], "analytics");
        assert!(
            p["spec"]["endpointSelector"]
                .as_mapping()
                .unwrap()
                .is_empty()
        );
        let sel = &p["spec"]["egress"][0]["toCIDRSet"][0]["cidrGroupSelector"]["matchLabels"];
        assert_eq!(sel[REGION_LABEL], "eu");
    }
}
