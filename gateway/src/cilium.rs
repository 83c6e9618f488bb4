//! Cilium resources for the live site routes.
//!
//! One `CiliumCIDRGroup` per site, labelled with the site and its region,
//! lists the site's prefixes (its own addresses and its mapped LANs);
//! policies select sites by those labels, so they keep working as sites
//! come and go. Each mapped LAN also has a group of its own, labelled with
//! the site it is behind (`tether.io/lan-of`) and annotated with the LAN as
//! the hospital numbers it, so that a policy can allow a LAN without the
//! edge host, and an operator can read the mapping. The example
//! `CiliumNetworkPolicy` lets the pods of one namespace reach every site of
//! one region (Cilium 1.17 or later for `cidrGroupSelector` in egress
//! rules).

use std::collections::BTreeMap;
use std::fmt::Write;

use ipnet::IpNet;
use tether_proto::dns::SiteNames;
use tether_proto::gateway::SiteRoute;
use tether_proto::ids::{RegionId, SiteId};

/// Label carrying the site id.
pub const SITE_LABEL: &str = "tether.io/site";
/// Label carrying the region.
pub const REGION_LABEL: &str = "tether.io/region";
/// Label of a mapped LAN's group carrying the site it is behind.
pub const LAN_OF_LABEL: &str = "tether.io/lan-of";
/// Annotation of a mapped LAN's group: the LAN as the hospital numbers it.
pub const LAN_ANNOTATION: &str = "tether.io/lan";
/// Annotation of a mapped LAN's group: the prefix it is mapped to.
pub const MAPPED_ANNOTATION: &str = "tether.io/mapped";
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

/// The name of a mapped LAN's `CiliumCIDRGroup`: the site and the mapped
/// prefix, with `.`, `:` and `/` written as `-` (a DNS subdomain name).
pub fn lan_group_name(site: &SiteId, mapped: IpNet) -> String {
    let prefix: String = mapped
        .to_string()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!("tether-lan-{site}-{prefix}")
}

/// Renders one `CiliumCIDRGroup` per mapped LAN the gateway routes now:
/// the mappings come from the mesh zone's `sites` (which names each LAN),
/// the routes say which are live. A mapping without a route (its site is
/// offline, or no longer routes the LAN) is left out.
pub fn lan_groups(routes: &[SiteRoute], sites: &[SiteNames], api_version: &str) -> String {
    let mut out = String::new();
    for names in sites {
        for m in &names.lans {
            let routed = routes
                .iter()
                .any(|r| r.site == names.site && r.prefix == m.mapped);
            if !routed {
                continue;
            }
            out.push_str("---\n");
            let _ = writeln!(out, "apiVersion: {api_version}");
            out.push_str("kind: CiliumCIDRGroup\n");
            out.push_str("metadata:\n");
            let _ = writeln!(out, "  name: {}", lan_group_name(&names.site, m.mapped));
            out.push_str("  labels:\n");
            out.push_str("    app.kubernetes.io/managed-by: tether-gateway\n");
            let _ = writeln!(out, "    {LAN_OF_LABEL}: {}", names.site);
            let _ = writeln!(out, "    {REGION_LABEL}: {}", names.region);
            out.push_str("  annotations:\n");
            let _ = writeln!(out, "    {LAN_ANNOTATION}: \"{}\"", m.real);
            let _ = writeln!(out, "    {MAPPED_ANNOTATION}: \"{}\"", m.mapped);
            out.push_str("spec:\n");
            out.push_str("  externalCIDRs:\n");
            let _ = writeln!(out, "    - \"{}\"", m.mapped);
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
    fn each_routed_lan_mapping_has_a_group_naming_the_lan() {
        use tether_proto::netmap::Mapping;
        let names = |site: &str, lans: &[(&str, &str)]| SiteNames {
            site: SiteId::new(site).unwrap(),
            region: RegionId::new("eu").unwrap(),
            addresses: Vec::new(),
            services: Vec::new(),
            lans: lans
                .iter()
                .map(|(real, mapped)| {
                    Mapping::new(real.parse().unwrap(), mapped.parse().unwrap()).unwrap()
                })
                .collect(),
        };
        let sites = [
            names(
                "hospital-a",
                &[
                    ("192.168.1.0/24", "100.64.9.0/24"),
                    ("fd00:1::/64", "fd74:0:0:9::/64"),
                ],
            ),
            // Same LAN, mapped apart; not routed now (offline).
            names("hospital-b", &[("192.168.1.0/24", "100.64.10.0/24")]),
        ];
        let routes = vec![
            route("100.64.0.5/32", "hospital-a", "eu"),
            route("100.64.9.0/24", "hospital-a", "eu"),
            route("fd74:0:0:9::/64", "hospital-a", "eu"),
        ];
        let yaml = lan_groups(&routes, &sites, CIDR_GROUP_API);
        let docs = docs(&yaml);
        assert_eq!(docs.len(), 2, "{yaml}");
        let v4 = &docs[0];
        assert_eq!(v4["kind"], "CiliumCIDRGroup");
        assert_eq!(
            v4["metadata"]["name"],
            "tether-lan-hospital-a-100-64-9-0-24"
        );
        assert_eq!(v4["metadata"]["labels"][LAN_OF_LABEL], "hospital-a");
        assert_eq!(v4["metadata"]["labels"][REGION_LABEL], "eu");
        assert!(v4["metadata"]["labels"].get(SITE_LABEL).is_none());
        assert_eq!(
            v4["metadata"]["annotations"][LAN_ANNOTATION],
            "192.168.1.0/24"
        );
        assert_eq!(
            v4["metadata"]["annotations"][MAPPED_ANNOTATION],
            "100.64.9.0/24"
        );
        assert_eq!(v4["spec"]["externalCIDRs"][0], "100.64.9.0/24");
        let v6 = &docs[1];
        assert_eq!(
            v6["metadata"]["name"],
            "tether-lan-hospital-a-fd74-0-0-9---64"
        );
        assert_eq!(v6["metadata"]["annotations"][LAN_ANNOTATION], "fd00:1::/64");
        // Without the zone, or without routes, no LAN groups.
        assert!(lan_groups(&routes, &[], CIDR_GROUP_API).is_empty());
        assert!(lan_groups(&[], &sites, CIDR_GROUP_API).is_empty());
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
