//! Site routes in the gateway's own routing table, and the rule that
//! consults it.
//!
//! Routes go into one table (7300 by default), through the TUN device; one
//! rule per address family at the configured priority (7300 by default)
//! sends every lookup to that table first. The table holds only site
//! prefixes and the site pools, so anything else falls through to the
//! next rules (`main`).
//! Both stay clear of Cilium's tables (200-202, 2004, 2005) and rule
//! priorities (1-112) and of Tailscale's table 52; no packet marks are
//! involved.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Context;
use ipnet::IpNet;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::route::RouteMessage;
use rtnetlink::packet_route::rule::{RuleAction, RuleMessage};

/// The routes and rules the gateway owns.
pub struct Routes {
    /// For the rules.
    netlink: rtnetlink::Handle,
    /// For the routes, changed in batches.
    batches: tether_shell::netlink::RouteHandle,
    device: u32,
    table: u32,
    priority: u32,
    installed: BTreeSet<IpNet>,
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routes")
            .field("table", &self.table)
            .field("priority", &self.priority)
            .field("installed", &self.installed.len())
            .finish_non_exhaustive()
    }
}

/// Whether netlink answered EEXIST.
fn exists(e: &rtnetlink::Error) -> bool {
    const EEXIST: i32 = 17;
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -EEXIST)
}

impl Routes {
    /// Opens netlink and installs the rules (an identical rule left by an
    /// earlier run is kept).
    pub async fn new(device: u32, table: u32, priority: u32) -> anyhow::Result<Self> {
        let (conn, netlink, _) = rtnetlink::new_connection().context("cannot open netlink")?;
        tokio::spawn(conn);
        let batches = tether_shell::netlink::connect().context("cannot open netlink")?;
        let routes = Self {
            netlink,
            batches,
            device,
            table,
            priority,
            installed: BTreeSet::new(),
        };
        for v6 in [false, true] {
            let add = routes.rule();
            let result = if v6 {
                add.v6().execute().await
            } else {
                add.v4().execute().await
            };
            if let Err(e) = result
                && !exists(&e)
            {
                return Err(e).with_context(|| {
                    format!(
                        "cannot add the rule `priority {priority} lookup {table}` (IPv{})",
                        if v6 { 6 } else { 4 }
                    )
                });
            }
        }
        Ok(routes)
    }

    fn rule(&self) -> rtnetlink::RuleAddRequest {
        self.netlink
            .rule()
            .add()
            .table_id(self.table)
            .priority(self.priority)
            .action(RuleAction::ToTable)
    }

    fn rule_message(&self, v6: bool) -> RuleMessage {
        if v6 {
            self.rule().v6().message_mut().clone()
        } else {
            self.rule().v4().message_mut().clone()
        }
    }

    fn message(&self, prefix: IpNet) -> RouteMessage {
        match prefix {
            IpNet::V4(p) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(p.network(), p.prefix_len())
                .output_interface(self.device)
                .table_id(self.table)
                .build(),
            IpNet::V6(p) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(p.network(), p.prefix_len())
                .output_interface(self.device)
                .table_id(self.table)
                .build(),
        }
    }

    /// The prefixes installed now.
    pub fn installed(&self) -> &BTreeSet<IpNet> {
        &self.installed
    }

    /// Reads back which of the gateway's routes the table holds and makes
    /// that what [`Routes::set`] compares against; returns how many the
    /// gateway had installed that are gone. The kernel drops a device's
    /// routes without a word when the device goes down (and IPv4 routes
    /// stay gone when it comes back), and an operator may delete one by
    /// hand: the next `set` adds them again.
    pub async fn refresh(&mut self) -> anyhow::Result<usize> {
        use futures_util::TryStreamExt;
        use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
        let mut present = BTreeSet::new();
        for message in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut dump = self.netlink.route().get(message).execute();
            while let Some(route) = dump
                .try_next()
                .await
                .with_context(|| format!("cannot read table {}", self.table))?
            {
                let (mut table, mut oif, mut destination) =
                    (u32::from(route.header.table), None, None);
                for attribute in &route.attributes {
                    match attribute {
                        RouteAttribute::Table(t) => table = *t,
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        RouteAttribute::Destination(d) => destination = Some(d),
                        _ => {}
                    }
                }
                let len = route.header.destination_prefix_length;
                let prefix = match destination {
                    Some(RouteAddress::Inet(a)) => ipnet::Ipv4Net::new(*a, len).ok().map(IpNet::V4),
                    Some(RouteAddress::Inet6(a)) => {
                        ipnet::Ipv6Net::new(*a, len).ok().map(IpNet::V6)
                    }
                    _ => None,
                };
                if table == self.table
                    && oif == Some(self.device)
                    && let Some(prefix) = prefix
                {
                    present.insert(prefix);
                }
            }
        }
        let lost = self.installed.difference(&present).count();
        self.installed.retain(|p| present.contains(p));
        Ok(lost)
    }

    /// Makes the table hold exactly `wanted`; returns (added, removed).
    /// The changes go in batches (see `tether_shell::netlink`): a gateway
    /// serving many sites holds a route for each. What the kernel took is
    /// recorded even when another change is refused.
    pub async fn set(&mut self, wanted: &BTreeSet<IpNet>) -> anyhow::Result<(usize, usize)> {
        use tether_shell::netlink::RouteChange;
        let stale: Vec<IpNet> = self.installed.difference(wanted).copied().collect();
        let new: Vec<IpNet> = wanted.difference(&self.installed).copied().collect();
        let changes: Vec<RouteChange> = stale
            .iter()
            .map(|p| RouteChange::Remove(self.message(*p)))
            .chain(new.iter().map(|p| RouteChange::Add(self.message(*p))))
            .collect();
        let mut outcomes = tether_shell::netlink::apply(&self.batches, &changes)
            .await
            .into_iter();
        // Already gone (e.g. deleted by hand) is fine.
        for prefix in &stale {
            let _ = outcomes.next();
            self.installed.remove(prefix);
        }
        let mut refused = None;
        for (prefix, outcome) in new.iter().zip(outcomes) {
            match outcome {
                Ok(()) => {
                    self.installed.insert(*prefix);
                }
                Err(e) => {
                    refused.get_or_insert((*prefix, e));
                }
            }
        }
        if let Some((prefix, e)) = refused {
            return Err(e)
                .with_context(|| format!("cannot add the route {prefix} to table {}", self.table));
        }
        Ok((new.len(), stale.len()))
    }

    /// Removes the rules and routes (on shutdown).
    pub async fn remove_all(&mut self) {
        let _ = self.set(&BTreeSet::new()).await;
        for v6 in [false, true] {
            let _ = self
                .netlink
                .rule()
                .del(self.rule_message(v6))
                .execute()
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use tether_shell::netns;

    use super::*;

    fn set_of(prefixes: impl IntoIterator<Item = IpNet>) -> BTreeSet<IpNet> {
        prefixes.into_iter().collect()
    }

    /// The table follows the wanted set over many routes (several netlink
    /// batches); when the kernel refuses some additions the error names
    /// one and what it took is still recorded; shutting down removes the
    /// routes and the rules. In a network namespace of the test's thread;
    /// needs root.
    #[test]
    fn the_table_follows_the_set_and_records_what_the_kernel_took() {
        netns::run(|| async {
            let device = netns::tun_device("tt-gw0");
            let mut routes = Routes::new(device.if_index().unwrap(), 7300, 7300)
                .await
                .unwrap();
            let table = || netns::routes(&["table", "7300"]);
            assert!(netns::ip(&["-4", "rule", "show"]).contains("lookup 7300"));
            let hosts = (0..300u32).map(|i| {
                IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::from(0x0a32_0000 + i), 32).unwrap())
            });
            let pools: Vec<IpNet> = vec![
                "100.64.0.0/16".parse().unwrap(),
                "fd74::/48".parse().unwrap(),
            ];
            let wanted = set_of(hosts.clone().chain(pools.iter().copied()));
            assert_eq!(routes.set(&wanted).await.unwrap(), (302, 0));
            assert_eq!(table().len(), 302);
            assert_eq!(routes.installed(), &wanted);
            let fewer = set_of(hosts.clone().take(10).chain(pools.iter().copied()));
            assert_eq!(routes.set(&fewer).await.unwrap(), (0, 290));
            assert_eq!(table().len(), 12);

            // A device that is down takes no IPv4 route; IPv6 may go in.
            netns::ip(&["link", "set", "tt-gw0", "down"]);
            let more = set_of(fewer.iter().copied().chain([
                "10.40.0.0/16".parse().unwrap(),
                "fd40::/64".parse().unwrap(),
            ]));
            let e = routes.set(&more).await.unwrap_err();
            assert!(
                format!("{e:#}").contains("cannot add the route 10.40.0.0/16 to table 7300"),
                "{e:#}"
            );
            // (The kernel flushed the device's routes when it went down;
            // only the changes of this call are compared.)
            let v4: IpNet = "10.40.0.0/16".parse().unwrap();
            let v6: IpNet = "fd40::/64".parse().unwrap();
            assert!(!routes.installed().contains(&v4));
            assert_eq!(
                routes.installed().contains(&v6),
                table().contains(&v6.to_string()),
                "{:?}",
                table()
            );

            // Up again: the kernel does not bring the IPv4 routes back;
            // read back, the table gets them again.
            netns::ip(&["link", "set", "tt-gw0", "up"]);
            let before = table();
            let lost = routes.refresh().await.unwrap();
            assert!(lost >= 11, "{lost} routes found gone; table: {before:?}");
            let (added, removed) = routes.set(&more).await.unwrap();
            assert!(
                added > lost && removed == 0,
                "{added} added, {removed} removed"
            );
            assert_eq!(table().len(), more.len(), "{:?}", table());
            assert_eq!(routes.installed(), &more);
            // Nothing gone: nothing to do.
            assert_eq!(routes.refresh().await.unwrap(), 0);
            assert_eq!(routes.set(&more).await.unwrap(), (0, 0));

            routes.remove_all().await;
            assert!(table().is_empty(), "{:?}", table());
            assert!(!netns::ip(&["-4", "rule", "show"]).contains("lookup 7300"));
        });
    }
}
