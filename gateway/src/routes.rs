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
    netlink: rtnetlink::Handle,
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
        let routes = Self {
            netlink,
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

    /// Makes the table hold exactly `wanted`; returns (added, removed).
    pub async fn set(&mut self, wanted: &BTreeSet<IpNet>) -> anyhow::Result<(usize, usize)> {
        let stale: Vec<IpNet> = self.installed.difference(wanted).copied().collect();
        let new: Vec<IpNet> = wanted.difference(&self.installed).copied().collect();
        for prefix in &stale {
            // Already gone (e.g. deleted by hand) is fine.
            let _ = self
                .netlink
                .route()
                .del(self.message(*prefix))
                .execute()
                .await;
            self.installed.remove(prefix);
        }
        for prefix in &new {
            self.netlink
                .route()
                .add(self.message(*prefix))
                .replace()
                .execute()
                .await
                .with_context(|| {
                    format!("cannot add the route {prefix} to table {}", self.table)
                })?;
            self.installed.insert(*prefix);
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
