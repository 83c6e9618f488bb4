//! Services forwarded into the edge cluster: each `services` entry with a
//! `target` names where traffic to its port on the site's overlay address
//! goes. A target given by name (a Kubernetes Service's
//! `name.namespace.svc.cluster.local`) is resolved with the system
//! resolver at start, every [`RESOLVE_EVERY`] and when asked (SIGHUP);
//! the addresses found go to the agent's shell, which loads them into the
//! site's nftables table ([`crate::lan::SiteTable`]).
//!
//! A name that stops resolving keeps its last addresses: a resolver that
//! hiccups does not cut a working service off. The failure is logged and
//! reported to the broker once per change.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tether_config::services::{Forward, ForwardTarget};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use crate::lan::Forwarded;

/// How often names are resolved again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(30);

/// The longest wait for one name.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The resolved forwards, and problems to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// The ports and where they go now (every forwarded service with at
    /// least one address, one per address family).
    Forwards(Vec<Forwarded>),
    /// A target cannot be resolved (plain words).
    Unresolved(String),
}

/// The task resolving the targets; stopped when dropped.
#[derive(Debug)]
pub struct Resolver {
    task: JoinHandle<()>,
    nudge: Arc<Notify>,
}

impl Resolver {
    /// Starts resolving `forwards`, sending each change to `updates`.
    pub fn start(forwards: Vec<Forward>, updates: mpsc::UnboundedSender<Update>) -> Self {
        let nudge = Arc::new(Notify::new());
        let task = tokio::spawn(run(forwards, updates, nudge.clone()));
        Self { task, nudge }
    }

    /// Resolves every name again now.
    pub fn resolve_now(&self) {
        self.nudge.notify_one();
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(forwards: Vec<Forward>, updates: mpsc::UnboundedSender<Update>, nudge: Arc<Notify>) {
    // Per service name: its addresses, and the last failure reported.
    let mut known: BTreeMap<String, Vec<SocketAddr>> = BTreeMap::new();
    let mut failing: BTreeMap<String, String> = BTreeMap::new();
    let mut sent: Option<Vec<Forwarded>> = None;
    loop {
        for f in &forwards {
            let name = f.service.name.to_string();
            match resolve(&f.target).await {
                Ok(addrs) => {
                    if failing.remove(&name).is_some() {
                        tracing::info!(service = %name, target = %f.target, "the service's target resolves again");
                    }
                    known.insert(name, addrs);
                }
                Err(e) => {
                    let why = format!(
                        "the target {} of the service {name} (port {}) cannot be resolved: {e}{}",
                        f.target,
                        f.service.port,
                        if known.contains_key(&name) {
                            "; its last addresses stay in use"
                        } else {
                            "; the port is not forwarded until it resolves"
                        }
                    );
                    if failing.get(&name) != Some(&why) {
                        tracing::warn!("{why}");
                        failing.insert(name, why.clone());
                        if updates.send(Update::Unresolved(why)).is_err() {
                            return;
                        }
                    }
                }
            }
        }
        let mut now: Vec<Forwarded> = forwards
            .iter()
            .flat_map(|f| {
                known
                    .get(&f.service.name.to_string())
                    .into_iter()
                    .flatten()
                    .map(|to| Forwarded {
                        port: f.service.port,
                        to: *to,
                    })
            })
            .collect();
        now.sort();
        if sent.as_ref() != Some(&now) {
            sent = Some(now.clone());
            if updates.send(Update::Forwards(now)).is_err() {
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RESOLVE_EVERY) => {}
            _ = nudge.notified() => {}
        }
    }
}

/// The target's addresses: the first of each address family.
async fn resolve(target: &ForwardTarget) -> Result<Vec<SocketAddr>, String> {
    let found: Vec<SocketAddr> = match target {
        ForwardTarget::Addr(a) => return Ok(vec![*a]),
        ForwardTarget::Name { host, port } => {
            match tokio::time::timeout(
                RESOLVE_TIMEOUT,
                tokio::net::lookup_host((host.as_str(), *port)),
            )
            .await
            {
                Ok(Ok(addrs)) => addrs.collect(),
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => {
                    return Err(format!("no answer within {} s", RESOLVE_TIMEOUT.as_secs()));
                }
            }
        }
    };
    Ok(first_of_each_family(&found))
}

/// The first IPv4 and the first IPv6 address of `found`, IPv4 first.
fn first_of_each_family(found: &[SocketAddr]) -> Vec<SocketAddr> {
    let v4 = found.iter().find(|a| a.is_ipv4());
    let v6 = found.iter().find(|a| a.is_ipv6());
    v4.into_iter().chain(v6).copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_per_family() {
        let found: Vec<SocketAddr> = ["[fd00::1]:80", "10.0.0.1:80", "10.0.0.2:80", "[fd00::2]:80"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let kept: Vec<String> = first_of_each_family(&found)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(kept, ["10.0.0.1:80", "[fd00::1]:80"]);
    }

    #[tokio::test]
    async fn changes_are_sent_once() {
        // Names are resolved in the netns tests (through the namespace's
        // hosts file): here no query may leave the machine.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let resolver = Resolver::start(
            vec![Forward {
                service: tether_proto::dns::Service::parse("web=80").unwrap(),
                target: tether_config::services::parse_target("10.0.0.5:8080").unwrap(),
            }],
            tx,
        );
        assert_eq!(
            rx.recv().await.unwrap(),
            Update::Forwards(vec![Forwarded {
                port: 80,
                to: "10.0.0.5:8080".parse().unwrap()
            }])
        );
        // Asked again, nothing changed: nothing is sent.
        resolver.resolve_now();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), rx.recv())
                .await
                .is_err()
        );
    }
}
