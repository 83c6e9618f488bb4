//! A LAN that leaves a site's configuration: its route goes at once, its
//! mapping is kept for the grace period (through a broker restart) and
//! given back if the LAN returns, then released for other sites.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use ipnet::IpNet;
use tether_proto::capsule::Capsule;
use tether_proto::connect_ip::{AddressRequest, RequestedAddress, RouteAdvertisement};
use tether_proto::ids::RegionId;
use tether_proto::ipam::{LanLimits, Lease};
use tether_tests::{TestBroker, TestSite, tunnel_for};

/// Short enough to wait for, long enough for the steps before it on a
/// loaded machine.
const GRACE: Duration = Duration::from_secs(15);

fn region() -> RegionId {
    "local".parse().unwrap()
}

/// Asks for `lans` (Request IDs from `first_id`) and returns the answer
/// to each: the mapped prefix, or `None` when refused. The broker answers
/// them together in one ADDRESS_ASSIGN.
async fn request_lans(
    t: &mut tether_tests::Tunnel,
    first_id: u64,
    lans: &[&str],
) -> Vec<Option<IpNet>> {
    let ids: Vec<u64> = (first_id..).take(lans.len()).collect();
    t.send_capsule(&Capsule::AddressRequest(AddressRequest {
        requests: lans
            .iter()
            .zip(&ids)
            .map(|(lan, &request_id)| RequestedAddress {
                request_id,
                prefix: lan.parse().unwrap(),
            })
            .collect(),
    }))
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (capsule, _) = t.next_capsule(deadline).await;
        let Capsule::AddressAssign(assign) = capsule else {
            continue;
        };
        let answer = |id: u64| assign.addresses.iter().find(|a| a.request_id == id);
        if ids.iter().all(|&id| answer(id).is_some()) {
            return ids
                .iter()
                .map(|&id| {
                    answer(id)
                        .map(|a| a.prefix)
                        .filter(|p| !p.addr().is_unspecified())
                })
                .collect();
        }
    }
}

async fn advertise(t: &mut tether_tests::Tunnel, prefixes: &[IpNet]) {
    t.send_capsule(&Capsule::RouteAdvertisement(
        RouteAdvertisement::from_prefixes(prefixes.iter().copied()),
    ))
    .await;
}

/// The lease of `prefix` as the broker holds it.
fn lease(broker: &TestBroker, prefix: IpNet) -> Option<Lease> {
    let core = broker.broker().core().core().unwrap();
    core.leases(&region())
        .and_then(|l| l.lease_at(prefix.addr()))
        .filter(|l| l.prefix == prefix)
        .cloned()
}

/// Waits (bounded) until the lease of `prefix` satisfies `ok`.
async fn wait_lease(
    broker: &TestBroker,
    prefix: IpNet,
    timeout: Duration,
    what: &str,
    ok: impl Fn(Option<&Lease>) -> bool,
) -> Option<Lease> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let now = lease(broker, prefix);
        if ok(now.as_ref()) {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} after {timeout:?}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the broker holds no route for exactly `prefix`.
async fn wait_for_no_route(broker: &TestBroker, prefix: IpNet) {
    let b = broker.broker().clone();
    let mut changes = b.core().route_changes();
    let gone = tokio::time::timeout(Duration::from_secs(5), async {
        while !b.core().read().unwrap().table.routes_for(prefix).is_empty() {
            if changes.changed().await.is_err() {
                panic!("the broker stopped");
            }
        }
    })
    .await;
    assert!(gone.is_ok(), "the route for {prefix} stayed");
}

#[tokio::test]
async fn a_removed_lan_keeps_its_mapping_for_the_grace_period_then_another_site_gets_it() {
    // A /22 holds at most two /24 mappings: its first and last /24 hold
    // the network, router and broadcast addresses.
    let mut broker = TestBroker::start_with(
        "[[region]]\nname = \"local\"\nipv4_pools = [\"100.64.0.0/22\"]\n",
        |c| {
            c.ipam = c.ipam.clone().with_lan_limits(
                region(),
                LanLimits {
                    release_after: GRACE,
                    ..LanLimits::default()
                },
            );
        },
    )
    .await;
    let a = TestSite::enroll(&broker, "hospital-a").await;
    let b = TestSite::enroll(&broker, "hospital-b").await;

    // A maps its LAN and routes it.
    let mut ta = tunnel_for(&broker, &a).await;
    let mapped =
        request_lans(&mut ta, 1, &["192.168.1.0/24"]).await[0].expect("a mapping for A's LAN");
    advertise(&mut ta, &[mapped]).await;
    broker.wait_for_route(mapped, Duration::from_secs(5)).await;
    assert!(lease(&broker, mapped).unwrap().in_use());

    // The LAN leaves A's configuration: A routes nothing. The route goes
    // at once; the mapping stays A's with a stored deadline.
    advertise(&mut ta, &[]).await;
    wait_for_no_route(&broker, mapped).await;
    let marked = wait_lease(
        &broker,
        mapped,
        Duration::from_secs(5),
        "not marked unused",
        |l| l.is_some_and(|l| l.release_at.is_some()),
    )
    .await
    .unwrap();
    assert_eq!(marked.site.as_str(), "hospital-a");
    let deadline = marked.release_at.unwrap();

    // The deadline is in the store: a restarted broker has it.
    drop(ta);
    broker.restart().await;
    assert_eq!(
        lease(&broker, mapped).and_then(|l| l.release_at),
        Some(deadline)
    );
    // Names of an unused LAN leave the zone.
    assert!(
        broker
            .broker()
            .lan_mappings(&"hospital-a".parse().unwrap(), &region())
            .is_empty()
    );

    // Still reserved: B, asking for two /24s, is not given A's.
    let mut tb = tunnel_for(&broker, &b).await;
    let got = request_lans(&mut tb, 1, &["10.1.0.0/24", "10.2.0.0/24"]).await;
    assert!(!got.contains(&Some(mapped)), "{got:?}");
    assert!(got.contains(&None), "the pool had room for two: {got:?}");

    // Put back within the grace period (a new session, as after the
    // agent's restart with the LAN in its configuration): the same mapping.
    let mut ta = tunnel_for(&broker, &a).await;
    assert_eq!(
        request_lans(&mut ta, 1, &["192.168.1.0/24"]).await,
        vec![Some(mapped)]
    );
    advertise(&mut ta, &[mapped]).await;
    broker.wait_for_route(mapped, Duration::from_secs(5)).await;
    wait_lease(
        &broker,
        mapped,
        Duration::from_secs(5),
        "not in use again",
        |l| l.is_some_and(Lease::in_use),
    )
    .await;

    // Removed again and left: released after the grace period.
    advertise(&mut ta, &[]).await;
    wait_for_no_route(&broker, mapped).await;
    wait_lease(
        &broker,
        mapped,
        GRACE + Duration::from_secs(15),
        "not released",
        |l| l.is_none(),
    )
    .await;

    // Free for another site: B's next LAN gets it.
    let got = request_lans(&mut tb, 3, &["10.3.0.0/24"]).await;
    assert_eq!(got, vec![Some(mapped)]);
}
