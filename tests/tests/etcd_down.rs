//! etcd fully down (its process killed by PID, the real `/usr/bin/etcd`):
//! a site that reconnects to the broker that held it keeps its address;
//! another broker, which cannot prove it may take the site, refuses it, and
//! so does the holding broker for a site it did not hold. When etcd is back
//! the fleet converges: the holding broker claims the site again under a
//! new lease, and the refused site connects.
//!
//! Brokers A and B run in this process and share one CA, as the brokers
//! of a deployment do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tether_proto::fleet::Readmit;
use tether_proto::ids::SiteId;
use tether_tests::child_broker::data_dir_with_ca;
use tether_tests::etcd::EtcdServer;
use tether_tests::{TestBroker, TestSite, Tunnel, connect_trusting, v4};

/// Deadline of the test body.
const TEST_DEADLINE: Duration = Duration::from_secs(120);

/// Opens a configured tunnel of `site` at the broker at `addr`; the status
/// and body when it is refused.
async fn open_at(addr: SocketAddr, site: &TestSite) -> Result<Tunnel, (u16, String)> {
    let c = site.state.credentials().unwrap();
    let client = connect_trusting(addr, &c.bundle, Some((c.chain, c.key)))
        .await
        .map_err(|e| (0, e.to_string()))?;
    let mut t = Tunnel::open(client).await?;
    t.configured().await;
    Ok(t)
}

/// Waits until `ok` holds, at most `within`.
async fn until(what: &str, within: Duration, ok: impl Fn() -> bool) -> Duration {
    let started = Instant::now();
    while !ok() {
        assert!(started.elapsed() < within, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_reconnecting_while_etcd_is_down_keeps_its_address_at_the_broker_that_held_it() {
    let Some(mut server) = tokio::task::spawn_blocking(|| EtcdServer::start(false))
        .await
        .unwrap()
    else {
        return;
    };
    let prefix = "/tether/down/";
    let extra = server.broker_toml(prefix);
    let config = server.config(prefix);
    let server = tokio::time::timeout(TEST_DEADLINE, async move {
        let mut b = TestBroker::start(&extra).await;
        let ca_dir = b.config.data_dir.clone().unwrap();
        let data = tempfile::tempdir().unwrap();
        data_dir_with_ca(&ca_dir, &data.path().join("data"));
        let mut a = TestBroker::start_with(&extra, |c| {
            c.data_dir = Some(data.path().join("data"));
        })
        .await;
        let fleet = b.broker().fleet().unwrap().clone();
        let fleet_a = a.broker().fleet().unwrap().clone();
        let me = fleet.snapshot().unwrap().me().clone();
        let one: SiteId = "site-1".parse().unwrap();
        let two: SiteId = "site-2".parse().unwrap();

        // Site 1 is held by B; site 2 is enrolled and held by no broker.
        let site = TestSite::enroll(&b, "site-1").await;
        let other = TestSite::enroll(&b, "site-2").await;
        let tunnel = open_at(b.addr(), &site).await.unwrap();
        let address = v4(&tunnel);
        until(
            "B holds site 1 and A's view names B its holder",
            Duration::from_secs(10),
            || {
                fleet.snapshot().unwrap().holds(&one, Instant::now())
                    && fleet_a.readmit_offline(&one) == Readmit::HeldElsewhere(me.clone())
            },
        )
        .await;

        // A code made while etcd is up, for a site installed while it is
        // down.
        let code3 = b.token("site-3").await;

        // etcd goes down; B's lease runs out (it cannot renew it).
        let killed = Instant::now();
        let server = tokio::task::spawn_blocking(move || {
            server.kill();
            server
        })
        .await
        .unwrap();
        until("the leases of A and B ran out", Duration::from_secs(15), || {
            !fleet.lease_held() && !fleet_a.lease_held()
        })
        .await;
        eprintln!("B fenced {:?} after etcd was killed", killed.elapsed());

        // The site's connection breaks; B's session ends (the release
        // cannot be written).
        drop(tunnel);
        until("B's session of site 1 ended", Duration::from_secs(15), || {
            b.broker().session(&one).is_none()
        })
        .await;

        // A cannot prove it may take the site over: refused, with a reason.
        let (status, body) = open_at(a.addr(), &site).await.err().expect("A refuses site 1");
        eprintln!("A refused site 1: {status} {body}");
        assert_eq!(status, 503, "{body}");
        assert!(
            body.contains(&format!("etcd cannot be reached (its lease in etcd ran out) and broker {me} held this site last")),
            "{body}"
        );

        // B, which held it, serves it again with its address.
        let tunnel = open_at(b.addr(), &site).await.unwrap();
        assert_eq!(v4(&tunnel), address, "the same address while etcd is down");
        assert!(b.broker().session(&one).is_some());

        // A site B did not hold is refused by B too.
        let (status, body) = open_at(b.addr(), &other).await.err().expect("B refuses site 2");
        eprintln!("B refused site 2: {status} {body}");
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("not held by this broker"), "{body}");

        // Enrollment is refused as temporary, not as a bad code: the code
        // is not spent, and `tether up` on its first start keeps asking.
        let dir3 = tempfile::tempdir().unwrap();
        let state3 = tether::state_dir::StateDir::new(dir3.path().join("state"));
        let err = tether::enroll::enroll(&b.addr().to_string(), &code3, &state3, false, None)
            .await
            .expect_err("no enrollment while etcd is down");
        eprintln!("enrollment while etcd is down: {err:#}");
        let unavailable = err
            .downcast_ref::<tether::enroll::EnrollmentUnavailable>()
            .unwrap_or_else(|| panic!("not refused as temporary: {err:#}"));
        assert_eq!(unavailable.status, 503);
        assert!(err.downcast_ref::<tether::enroll::EnrollmentRefused>().is_none());
        let first = tether::enroll::FirstStart {
            broker: Some(b.addr().to_string()),
            code: Some(code3.clone()),
            ..Default::default()
        };
        let first_start = tokio::spawn(async move {
            let enrolled = tether::enroll::enroll_on_first_start(&state3, &first).await;
            (enrolled.map(|e| e.is_some()).map_err(|e| format!("{e:#}")), dir3)
        });
        let scraped = b.scrape().await;
        // etcd's requests are timed, and their failures counted (a lease
        // grant fails once etcd is down: refused, or after the timeout).
        for line in [
            "tether_broker_etcd_request_duration_seconds_bucket{operation=\"read\"",
            "tether_broker_etcd_request_duration_seconds_bucket{operation=\"lease_renewal\"",
        ] {
            assert!(scraped.contains(line), "{line}:\n{scraped}");
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        let failed = "tether_broker_etcd_errors_total{operation=\"lease_grant\"}";
        while !b.scrape().await.contains(failed) {
            assert!(Instant::now() < deadline, "{failed} counted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for result in ["readmitted", "not_held", "held_elsewhere"] {
            assert!(
                scraped.contains(&format!(
                    "tether_broker_connects_without_store_total{{result=\"{result}\"}}"
                )),
                "{result} counted:\n{scraped}"
            );
        }

        // etcd comes back: B joins again under a new lease and claims site
        // 1 again; etcd names B its holder.
        let server = tokio::task::spawn_blocking(move || {
            let mut server = server;
            server.start_again();
            server
        })
        .await
        .unwrap();
        let back = Instant::now();
        until(
            "B joined the fleet again and claimed site 1",
            Duration::from_secs(30),
            || fleet.snapshot().unwrap().holds(&one, Instant::now()),
        )
        .await;
        let mut client = etcd_client::Client::connect(config.endpoints.clone(), None)
            .await
            .unwrap();
        let key = format!("{prefix}fleet/owners/site-1");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = client.get(key.as_str(), None).await.unwrap();
            let holder = got.kvs().first().map(|kv| kv.value().to_vec());
            if holder.as_deref() == Some(me.as_bytes()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "etcd names B the holder of site 1 again: {holder:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("etcd names B the holder of site 1 {:?} after etcd was back", back.elapsed());
        // The site installed while etcd was down enrolled by itself.
        let (enrolled, _dir3) = tokio::time::timeout(Duration::from_secs(60), first_start)
            .await
            .expect("the first start enrolled within 60 s of etcd's return")
            .unwrap();
        assert_eq!(enrolled, Ok(true), "first start");
        eprintln!("site 3 enrolled {:?} after etcd was back", back.elapsed());
        assert!(b.broker().session(&one).is_some(), "site 1 was not cut");
        assert_eq!(v4(&tunnel), address);

        // With etcd back, site 2 connects at A.
        let deadline = Instant::now() + Duration::from_secs(20);
        let t2 = loop {
            match open_at(a.addr(), &other).await {
                Ok(t) => break t,
                Err(e) => {
                    assert!(Instant::now() < deadline, "site 2 connects at A: {e:?}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        until("B's view names A the holder of site 2", Duration::from_secs(10), || {
            matches!(fleet.readmit_offline(&two), Readmit::HeldElsewhere(_))
        })
        .await;
        drop((t2, tunnel));
        a.running.take().unwrap().shutdown().await;
        b.running.take().unwrap().shutdown().await;
        server
    })
    .await
    .expect("test finished in time");
    drop(server);
}
