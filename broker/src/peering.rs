//! Keeps the broker-to-broker link and the routes through other brokers in
//! step with the fleet: on every change of members or owners, the link's
//! peers become the live brokers that announce a link whose key the
//! deployment's CA vouches for ([`crate::link::Link::set_peers`]; checked
//! again every [`RECHECK`], as proofs expire and the trust bundle
//! changes), and the core learns which sites and gateways they hold ([`tether_proto::peering::PeerView`], turned into
//! routes by the core with the leases it caches). The gauge of live
//! brokers is set here too.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tether_proto::fleet::{BrokerId, Fleet, MemberGateway};
use tether_proto::peering::PeerView;
use tokio::task::JoinHandle;

use crate::core_cell::CoreCell;
use crate::fleet::FleetHandle;
use crate::link::{Admission, Link};

/// How often the peers' proofs are checked again without a change of the
/// fleet: a proof that expired, or whose CA left the trust bundle, ends
/// its peer within this time.
pub const RECHECK: Duration = Duration::from_secs(30);

/// The gateways attached to a broker, as it announces them to the fleet:
/// the local gateway and the WireGuard gateways of its configuration.
pub fn announced_gateways(config: &tether_config::broker::BrokerConfig) -> Vec<MemberGateway> {
    let local = config.local_gateway.iter().map(|g| MemberGateway {
        id: g.id.clone(),
        region: g.region.clone(),
        prefixes: g.prefixes.clone(),
    });
    let peers = config.gateways.iter().map(|g| MemberGateway {
        id: g.id.clone(),
        region: g.region.clone(),
        prefixes: g.prefixes.clone(),
    });
    local.chain(peers).collect()
}

/// Follows the fleet until it ends: applies every change to `link` and to
/// the routes in `core`, with the peers `admission` (read at each change)
/// accepts.
pub fn follow(
    fleet: Arc<FleetHandle>,
    link: Arc<Link>,
    core: Arc<CoreCell>,
    admission: impl Fn() -> Admission + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut changes = fleet.view_changes();
        let mut recheck = tokio::time::interval(RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        recheck.tick().await;
        let mut peers: Option<BTreeSet<BrokerId>> = None;
        let mut changed = true;
        loop {
            if let Some(snapshot) = fleet.snapshot() {
                let now = link.set_peers(&snapshot, &admission());
                // Routes follow every change of the fleet, and a change of
                // the peers found by a recheck.
                if changed || peers.as_ref() != Some(&now) {
                    let view = PeerView::among(&snapshot, &now);
                    let mtu = link.mtu();
                    if core.decide(|c| c.handle_peers(view, mtu)).is_err() {
                        return;
                    }
                    gauges(&snapshot);
                }
                peers = Some(now);
            }
            tokio::select! {
                c = changes.changed() => {
                    if c.is_err() {
                        return;
                    }
                    changed = true;
                }
                _ = recheck.tick() => changed = false,
            }
        }
    })
}

/// Sets the fleet's gauge of live brokers. The sessions of each broker
/// are rendered at each scrape ([`crate::metrics::fleet_text`]), so that a
/// broker that left leaves no series behind.
fn gauges(fleet: &Fleet) {
    metrics::gauge!("tether_broker_fleet_brokers_alive").set(fleet.members().len() as f64);
}
