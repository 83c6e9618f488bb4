//! A broker that comes back to etcd after losing its lease never writes
//! stale ownership (docs/ha.md, "Fencing"), on a real etcd (started per
//! test, see `broker/src/store/etcd_server.rs`).
//!
//! Broker A reaches etcd through a [`Gate`] (a TCP relay on loopback) that
//! the test cuts; broker B reaches etcd directly. Site `lab-1` holds a
//! session at A, and A is cut off from etcd: its lease runs out (A is
//! fenced) and etcd drops A's owner key of `lab-1`. The site's first
//! connection stays open on A (it does not act on A's GOAWAY, as a site
//! that cannot move would not), and the site connects to B as well, which
//! writes the owner key. When A reaches etcd again it still has the
//! session and claims the site again under its new lease, by
//! compare-and-set: etcd refuses (B holds the site, at a newer revision),
//! and A ends its session (`replaced`). etcd's owner record of `lab-1`
//! names B from B's claim to the end, read every 50 ms.
//!
//! ```text
//!               etcd (127.0.0.1, per test)
//!              /                      \
//!   gate (cut, then reopened)          |
//!            |                         |
//!        broker A                  broker B
//!            \                        /
//!   lab-1 (first connection)   lab-1 (second connection)
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tether_tests::child_broker::data_dir_with_ca;
use tether_tests::etcd::{EtcdServer, Gate, gated_toml};
use tether_tests::{TestBroker, TestSite, metric, tunnel_for};

/// Deadline of the test body.
const TEST_DEADLINE: Duration = Duration::from_secs(120);

/// How often the owner record is read while A comes back.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// etcd's owner record of a site: the broker id it names and the
/// revision it was written at; None while there is none.
async fn owner(client: &mut etcd_client::Client, key: &str) -> Option<(String, i64)> {
    let answer = client.get(key, None).await.unwrap();
    answer.kvs().first().map(|kv| {
        (
            String::from_utf8_lossy(kv.value()).to_string(),
            kv.mod_revision(),
        )
    })
}

/// Reads `key` until `ok` holds for its owner record (up to `limit`).
async fn owner_until(
    client: &mut etcd_client::Client,
    key: &str,
    limit: Duration,
    what: &str,
    ok: impl Fn(&Option<(String, i64)>) -> bool,
) -> Option<(String, i64)> {
    let started = Instant::now();
    loop {
        let now = owner(client, key).await;
        if ok(&now) {
            return now;
        }
        assert!(
            started.elapsed() < limit,
            "{what}: the owner record is {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_back_from_a_partition_cannot_reclaim_a_site_another_broker_took() {
    let Some(server) = tokio::task::spawn_blocking(|| EtcdServer::start(false))
        .await
        .unwrap()
    else {
        return;
    };
    let prefix = "/tether/reclaim/";
    let gate = Gate::new(&server);
    let key = format!("{prefix}fleet/owners/lab-1");
    let server = tokio::time::timeout(TEST_DEADLINE, async move {
        let a = TestBroker::start(&gated_toml(&server, &gate.url(), prefix)).await;
        // B shares A's CA, as the brokers of a deployment do.
        let data_parent = tempfile::tempdir().unwrap();
        let data = data_parent.path().join("data");
        data_dir_with_ca(a.config.data_dir.as_ref().unwrap(), &data);
        let b = TestBroker::start_with(&server.broker_toml(prefix), |c| {
            c.data_dir = Some(data.clone())
        })
        .await;
        let a_id = a.broker().fleet().unwrap().id().unwrap();
        let b_id = b.broker().fleet().unwrap().id().unwrap();
        let mut etcd = etcd_client::Client::connect([server.url()], None)
            .await
            .unwrap();
        let site = TestSite::enroll(&b, "lab-1").await;
        let lab1 = "lab-1".parse().unwrap();

        // lab-1 on A: etcd names A.
        let ta = tunnel_for(&a, &site).await;
        owner_until(&mut etcd, &key, Duration::from_secs(10), "A claims lab-1", |o| {
            o.as_ref().is_some_and(|(id, _)| *id == a_id)
        })
        .await;

        // A cut off from etcd: its lease runs out (fenced), and etcd drops
        // its owner key with the lease.
        let fenced_before = metric("tether_broker_fleet_fenced_total");
        gate.cut();
        let cut = Instant::now();
        while metric("tether_broker_fleet_fenced_total") <= fenced_before {
            assert!(
                cut.elapsed() < Duration::from_secs(15),
                "A was not fenced within 15 s of the cut"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        owner_until(
            &mut etcd,
            &key,
            Duration::from_secs(15),
            "A's owner key expires with its lease",
            |o| o.is_none(),
        )
        .await;
        // A still has the session (the site did not leave it), and its
        // view of the fleet is frozen: it last saw its own claim.
        assert!(a.broker().session(&lab1).is_some());
        assert!(
            a.broker()
                .fleet()
                .unwrap()
                .snapshot()
                .unwrap()
                .owner(&lab1)
                .is_some_and(|o| o.broker == a_id),
            "A's frozen view names A"
        );

        // lab-1 connects to B as well: B holds it.
        let tb = tunnel_for(&b, &site).await;
        let (_, b_revision) =
            owner_until(&mut etcd, &key, Duration::from_secs(10), "B claims lab-1", |o| {
                o.as_ref().is_some_and(|(id, _)| *id == b_id)
            })
            .await
            .unwrap();

        // A still has its session of lab-1: nothing but etcd can tell it
        // that the site is held elsewhere.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            a.broker().session(&lab1).is_some(),
            "A kept lab-1's session while cut off from etcd"
        );

        // From now on etcd's owner record must name B, at B's revision:
        // read every 50 ms while A comes back, until A has ended its
        // session, joined the fleet again and learnt that B holds the
        // site, and for a second after that.
        gate.reopen();
        let reopened = Instant::now();
        let mut readings = 0;
        let mut settled: Option<Instant> = None;
        while settled.is_none_or(|at| at.elapsed() < Duration::from_secs(1)) {
            let now = owner(&mut etcd, &key).await;
            readings += 1;
            assert_eq!(
                now,
                Some((b_id.clone(), b_revision)),
                "etcd's owner record of lab-1 left B ({b_id}) while A ({a_id}) came back, {:?} after the gate reopened",
                reopened.elapsed()
            );
            let fleet = a.broker().fleet().unwrap().snapshot().unwrap();
            let done = ta.client.conn.close_reason().is_some()
                && a.broker().session(&lab1).is_none()
                && !fleet.is_fenced()
                && fleet.owner(&lab1).is_some_and(|o| o.broker == b_id);
            if done && settled.is_none() {
                settled = Some(Instant::now());
            }
            assert!(
                reopened.elapsed() < Duration::from_secs(30),
                "within 30 s of the gate's reopening A did not end lab-1's session ({:?}), rejoin (fenced {}) and learn that B holds the site (A's view: {:?})",
                ta.client.conn.close_reason(),
                fleet.is_fenced(),
                fleet.owner(&lab1)
            );
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
        assert!(readings > 20, "the owner record was read {readings} times");
        // A ended the session because etcd refused its claim: the site's
        // connection to A was closed as replaced.
        let reason = ta.client.conn.close_reason().unwrap();
        assert!(
            reason.to_string().contains("replaced"),
            "A closed lab-1's connection as replaced: {reason}"
        );
        // B still holds the site: its session is up and its connection
        // open.
        assert!(b.broker().session(&lab1).is_some(), "B kept lab-1");
        assert!(
            tb.client.conn.close_reason().is_none(),
            "lab-1's connection to B stays open: {:?}",
            tb.client.conn.close_reason()
        );
        drop(tb);
        drop(a);
        drop(b);
        server
    })
    .await
    .expect("test finished in time");
    drop(server);
}
