//! Keeps the broker-to-broker link and the routes through other brokers in
//! step with the fleet: on every change of members or owners, the link's
//! peers become the live brokers that announce a link
//! ([`crate::link::Link::set_peers`]), and the core learns which sites and
//! gateways they hold ([`tether_proto::peering::PeerView`], turned into
//! routes by the core with the leases it caches). The gauge of live
//! brokers is set here too.

use std::sync::Arc;

use tether_proto::fleet::{Fleet, MemberGateway};
use tether_proto::peering::PeerView;
use tokio::task::JoinHandle;

use crate::core_cell::CoreCell;
use crate::fleet::FleetHandle;
use crate::link::Link;

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
/// the routes in `core`.
pub fn follow(fleet: Arc<FleetHandle>, link: Arc<Link>, core: Arc<CoreCell>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut changes = fleet.view_changes();
        loop {
            if let Some(snapshot) = fleet.snapshot() {
                link.set_peers(&snapshot);
                let view = PeerView::of(&snapshot);
                let mtu = link.mtu();
                if core.decide(|c| c.handle_peers(view, mtu)).is_err() {
                    return;
                }
                gauges(&snapshot);
            }
            if changes.changed().await.is_err() {
                return;
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
