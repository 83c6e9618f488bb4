//! Identity DNS on the broker: the mesh zone kept in step with enrollment,
//! sessions and revocation, served by hickory-server and handed to
//! gateways.
//!
//! Every change that can alter a name bumps a generation
//! ([`crate::core_cell::CoreCell::names_changed`]); one task rebuilds the
//! [`ZoneData`] from the store and the live sessions, and publishes it
//! ([`Broker::publish_zone`]) with a new serial when the names differ. The
//! DNS server and the gateway push follow the published zone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use tether_proto::dns::{SiteNames, ZoneData};
use tether_shell::dns::DnsServer;

use crate::error::BrokerError;
use crate::state::Broker;

/// How long changes are gathered before the zone is rebuilt (a burst of
/// reconnecting sites makes one new serial, not hundreds).
const SETTLE: Duration = Duration::from_millis(20);

/// Changes are also gathered for this many times as long as the last
/// rebuild took, so that rebuilding a large zone takes at most about a
/// fifth of a core during a burst of enrollments (each one a change).
const SETTLE_PER_REBUILD: u32 = 4;

/// The longest changes are gathered: a name changed during a burst is
/// published at most this long, plus the rebuild under way and its own,
/// after its change.
const SETTLE_MAX: Duration = Duration::from_secs(1);

/// How long to gather changes after a rebuild that took `rebuild`.
fn settle_after(rebuild: Duration) -> Duration {
    (rebuild * SETTLE_PER_REBUILD).clamp(SETTLE, SETTLE_MAX)
}

/// The zone as the store and the sessions describe it now. Blocking.
pub fn zone_data(broker: &Broker, serial: u32) -> Result<ZoneData, BrokerError> {
    let config = &broker.config;
    let reverse = config
        .regions
        .values()
        .flat_map(|r| r.pools.clone())
        .collect();
    let mut zone = ZoneData::empty(&config.dns_zone, config.dns_ttl, reverse);
    zone.serial = serial;
    for record in broker.store.sites()? {
        if record.revoked || record.enrolled.is_none() {
            continue;
        }
        let addresses = broker.host_addresses(&record.site, &record.region);
        let services = broker
            .session(&record.site)
            .filter(|s| s.region() == &record.region)
            .map(|s| s.services.clone())
            .unwrap_or_default();
        let lans = broker.lan_mappings(&record.site, &record.region);
        zone.sites.push(SiteNames {
            site: record.site,
            region: record.region,
            addresses,
            services,
            lans,
        });
    }
    zone.sites.sort();
    Ok(zone)
}

/// A serial that grows across restarts: seconds since 2020, or one more
/// than the last.
fn next_serial(last: u32) -> u32 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs().saturating_sub(1_577_836_800))
        .unwrap_or_default() as u32;
    now.max(last.wrapping_add(1))
}

/// Builds the first zone, so that the DNS server answers from the start.
pub async fn first_zone(broker: &Arc<Broker>) -> anyhow::Result<()> {
    let b = broker.clone();
    let zone = tokio::task::spawn_blocking(move || zone_data(&b, next_serial(0))).await??;
    broker.publish_zone(Arc::new(zone));
    Ok(())
}

/// Rebuilds the zone on every change; runs until the broker is dropped.
pub async fn keep_zone(broker: Arc<Broker>) {
    let mut changes = broker.core().name_changes();
    let mut last: Option<Arc<ZoneData>> = broker.zone();
    loop {
        let serial = next_serial(last.as_ref().map_or(0, |z| z.serial));
        let b = broker.clone();
        let previous = last.clone();
        let started = std::time::Instant::now();
        // Reading the store and comparing every site with the last zone
        // grow with the fleet: both off the runtime's workers.
        let rebuilt = tokio::task::spawn_blocking(move || {
            zone_data(&b, serial).map(|zone| {
                let changed = !previous.as_ref().is_some_and(|l| l.same_names(&zone));
                (zone, changed)
            })
        })
        .await;
        let settle = settle_after(started.elapsed());
        match rebuilt {
            Ok(Ok((zone, changed))) => {
                if changed {
                    tracing::debug!(serial, sites = zone.sites.len(), "mesh zone rebuilt");
                    let zone = Arc::new(zone);
                    last = Some(zone.clone());
                    broker.publish_zone(zone);
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot rebuild the mesh zone; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(_) => return,
        }
        // A change made while the zone was rebuilt or while changes are
        // gathered is not lost: it marks `changes` seen only here, before
        // the next rebuild reads the store, so a change after this point
        // wakes the loop again.
        if changes.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(settle).await;
        changes.borrow_and_update();
    }
}

/// Starts the DNS server on the configured addresses, if any.
pub async fn serve(broker: &Arc<Broker>) -> anyhow::Result<Option<DnsServer>> {
    if broker.config.dns_listen.is_empty() {
        return Ok(None);
    }
    let count = Arc::new(|code: ResponseCode| crate::metrics::dns_answer(code));
    let server = DnsServer::start(
        &broker.config.dns_listen,
        broker.zone_changes(),
        Some(count),
    )
    .await?;
    Ok(Some(server))
}

/// The DNS addresses of a running server, for logs and tests.
pub fn addrs(server: &Option<DnsServer>) -> Vec<SocketAddr> {
    server
        .as_ref()
        .map(|s| s.local_addrs.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_gathered_longer_after_a_long_rebuild_but_never_past_the_bound() {
        assert_eq!(settle_after(Duration::ZERO), SETTLE);
        assert_eq!(
            settle_after(Duration::from_millis(100)),
            Duration::from_millis(400)
        );
        // A zone that takes seconds to rebuild still publishes a change
        // within the bound the docs give.
        assert_eq!(settle_after(Duration::from_secs(3)), SETTLE_MAX);
    }
}
