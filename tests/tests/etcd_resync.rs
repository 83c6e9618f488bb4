//! Brokers on a real etcd (started per test, see
//! `broker/src/store/etcd_server.rs`) when etcd fails them for a while: a
//! revocation whose notice arrived but could not be checked, or that fell
//! into history etcd compacted while the broker's watch was away, still
//! ends the site's session, and another broker's event of a site in that
//! history is known afterwards; the admin API answers 503 with the store's
//! reason while etcd is down; a problem an agent keeps reporting writes
//! nothing to etcd; an unanswered lease renewal is counted as an etcd
//! error.
//!
//! Broker two reaches etcd through a [`Gate`] (a TCP relay on loopback)
//! that the test cuts or holds; broker one reaches etcd directly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use tether::link::Dialer;
use tether_proto::report::{Problem, ProblemKind, REPORT_PATH, ReportRequest};
use tether_proto::tunnel::Transport;
use tether_tests::etcd::{EtcdServer, Gate, gated_toml, start_etcd};
use tether_tests::{TestBroker, TestSite, Tunnel, metric, tunnel_for};
use tower::ServiceExt;

/// Deadline of each test body.
const TEST_DEADLINE: Duration = Duration::from_secs(120);

/// Brokers one and two on `server` under `prefix`: one reaches etcd
/// directly, two through `gate`.
async fn brokers(server: &EtcdServer, gate: &Gate, prefix: &str) -> (TestBroker, TestBroker) {
    let one = TestBroker::start(&server.broker_toml(prefix)).await;
    let two = TestBroker::start(&gated_toml(server, &gate.url(), prefix)).await;
    (one, two)
}

/// Waits up to 15 s for `tunnel`'s connection to end as revoked; panics
/// with `what` if it does not end.
async fn ends_revoked(tunnel: &Tunnel, what: &str) {
    let reason = tokio::time::timeout(Duration::from_secs(15), tunnel.client.conn.closed())
        .await
        .unwrap_or_else(|_| panic!("{what}"));
    assert!(reason.to_string().contains("revoked"), "{reason}");
}

/// Broker one revokes `site`.
async fn revoke(one: &TestBroker, site: &str) {
    let b1 = one.broker().clone();
    let site = site.parse().unwrap();
    tokio::task::spawn_blocking(move || b1.revoke_site(&site, &"local".parse().unwrap()))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_whose_notice_could_not_be_checked_still_ends_the_session() {
    let Some(server) = start_etcd().await else {
        return;
    };
    let prefix = "/tether/notice/";
    let gate = Gate::new(&server);
    let server = tokio::time::timeout(TEST_DEADLINE, async move {
        let (one, two) = brokers(&server, &gate, prefix).await;
        let a = TestSite::enroll(&two, "site-a").await;
        let ta = tunnel_for(&two, &a).await;

        // Broker two's requests to etcd get no answer while etcd's watch
        // still brings it the revocation's notice: the read that checks
        // the notice fails (1 s store timeout).
        gate.hold();
        revoke(&one, "site-a").await;
        tokio::time::sleep(Duration::from_millis(1600)).await;
        assert!(
            two.broker().session(&"site-a".parse().unwrap()).is_some(),
            "the session ended while broker two could not read etcd"
        );
        gate.release();
        // Broker two reads the store again once it answers, and ends the
        // session.
        ends_revoked(
            &ta,
            "the revoked site's session at broker two ends once etcd answers",
        )
        .await;
        drop(one);
        drop(two);
        server
    })
    .await
    .expect("test finished in time");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_in_history_etcd_compacted_ends_the_session_when_the_watch_resumes() {
    let Some(server) = start_etcd().await else {
        return;
    };
    let prefix = "/tether/compact/";
    let gate = Gate::new(&server);
    let server = tokio::time::timeout(TEST_DEADLINE, async move {
        let (one, two) = brokers(&server, &gate, prefix).await;
        let a = TestSite::enroll(&two, "site-a").await;
        let ta = tunnel_for(&two, &a).await;

        // Broker two's watch is away while site A is revoked, and etcd
        // compacts its history past the revocation.
        gate.cut();
        revoke(&one, "site-a").await;
        // A later write: etcd keeps the revision it compacts at, this
        // makes the revocation's one it no longer has.
        one.token("site-b").await;
        let server = tokio::task::spawn_blocking(move || {
            server.compact();
            server
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(two.broker().session(&"site-a".parse().unwrap()).is_some());
        gate.reopen();
        // The resumed watch finds its revision compacted: broker two reads
        // the store again and ends the session.
        ends_revoked(
            &ta,
            "the revoked site's session at broker two ends after the watch resumes",
        )
        .await;
        drop(one);
        drop(two);
        server
    })
    .await
    .expect("test finished in time");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_brokers_event_in_history_etcd_compacted_is_seen_when_the_watch_resumes() {
    let Some(server) = start_etcd().await else {
        return;
    };
    let prefix = "/tether/compact-events/";
    let gate = Gate::new(&server);
    let server = tokio::time::timeout(TEST_DEADLINE, async move {
        let (one, two) = brokers(&server, &gate, prefix).await;
        let b = TestSite::enroll(&one, "site-b").await;
        let site: tether_proto::ids::SiteId = "site-b".parse().unwrap();

        // Broker two's watch is away while site B opens its tunnel at
        // broker one, and etcd compacts its history past that event.
        gate.cut();
        let _tb = tunnel_for(&one, &b).await;
        let b1 = one.broker().clone();
        assert!(
            tokio::task::spawn_blocking(move || b1.events().flush(Duration::from_secs(10)))
                .await
                .unwrap()
        );
        one.token("site-c").await;
        let server = tokio::task::spawn_blocking(move || {
            server.compact();
            server
        })
        .await
        .unwrap();
        assert_eq!(two.broker().events().history(&site).last_connected, None);
        gate.reopen();
        // The resumed watch finds its revision compacted: broker two reads
        // every timeline again, and knows of the tunnel at broker one.
        let start = Instant::now();
        while two
            .broker()
            .events()
            .history(&site)
            .last_connected
            .is_none()
        {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "broker two never learnt of site B's tunnel at broker one"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(one);
        drop(two);
        server
    })
    .await
    .expect("test finished in time");
    drop(server);
}

/// An admin API call on `broker`'s router with its admin token.
async fn call(broker: &TestBroker, method: &str, path: &str, body: &str) -> (StatusCode, String) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .header(
            "authorization",
            format!("Bearer {}", broker.broker().admin_token),
        );
    let app = tether_broker::admin::router(broker.broker().clone());
    let resp = app
        .oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&bytes).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_creation_and_revocation_answer_503_with_the_stores_reason_while_etcd_is_down() {
    let Some(mut server) = start_etcd().await else {
        return;
    };
    let extra = server.broker_toml("/tether/admin-down/");
    let server = tokio::time::timeout(TEST_DEADLINE, async move {
        let broker = TestBroker::start(&extra).await;
        let (status, body) = call(
            &broker,
            "POST",
            "/v1/tokens",
            r#"{"site": "lab-1", "region": "local"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let mut server = tokio::task::spawn_blocking(move || {
            server.kill();
            server
        })
        .await
        .unwrap();
        let (status, body) = call(
            &broker,
            "POST",
            "/v1/tokens",
            r#"{"site": "lab-2", "region": "local"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("etcd at "), "{body}");
        let (status, body) = call(&broker, "POST", "/v1/sites/local/lab-1/revoke", "").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("etcd at "), "{body}");
        server = tokio::task::spawn_blocking(move || {
            server.start_again();
            server
        })
        .await
        .unwrap();
        drop(broker);
        server
    })
    .await
    .expect("test finished in time");
    drop(server);
}

/// The store's revision once it stopped changing (the broker's queued
/// event writes are done).
async fn settled_revision(server: &std::sync::Arc<EtcdServer>, broker: &TestBroker) -> i64 {
    let b = broker.broker().clone();
    let server = server.clone();
    tokio::task::spawn_blocking(move || {
        let mut last = server.revision();
        loop {
            assert!(b.events().flush(Duration::from_secs(10)));
            std::thread::sleep(Duration::from_millis(500));
            let now = server.revision();
            if now == last {
                return now;
            }
            last = now;
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_problem_reported_again_and_again_writes_nothing_to_etcd() {
    let Some(server) = start_etcd().await else {
        return;
    };
    let server = std::sync::Arc::new(server);
    let extra = server.broker_toml("/tether/reports/");
    tokio::time::timeout(TEST_DEADLINE, async {
        let broker = TestBroker::start(&extra).await;
        let site = TestSite::enroll(&broker, "ward-1").await;
        let config = broker.client_config();
        let dialer = Dialer::for_site(&config, &site.state, None).unwrap();
        let (conn, target) = dialer.connect(&config, &[Transport::H3]).await.unwrap();
        let authority = target.endpoint.to_string();
        let report = |detail: String| {
            serde_json::to_vec(&ReportRequest {
                problems: vec![Problem {
                    kind: ProblemKind::Translation,
                    detail,
                    count: 1,
                }],
            })
            .unwrap()
        };
        let before = settled_revision(&server, &broker).await;
        // The same problem, 20 times (an agent reports every 10 s).
        for _ in 0..20 {
            let (status, _) = conn
                .request(
                    "POST",
                    &authority,
                    REPORT_PATH,
                    &report("packets were dropped: not_for_site=5".into()),
                )
                .await
                .unwrap();
            assert_eq!(status, 200);
        }
        let identical = settled_revision(&server, &broker).await;
        assert_eq!(
            identical - before,
            1,
            "20 identical reports: one timeline write, not more"
        );
        // Its running counts change with every report: still nothing more
        // is written for a while.
        for n in 6..26 {
            let (status, _) = conn
                .request(
                    "POST",
                    &authority,
                    REPORT_PATH,
                    &report(format!("packets were dropped: not_for_site={n}")),
                )
                .await
                .unwrap();
            assert_eq!(status, 200);
        }
        let changing = settled_revision(&server, &broker).await;
        assert_eq!(changing, identical, "changing repeats were written");
        // The operator sees the newest words and how often since.
        let timeline = broker
            .broker()
            .events()
            .timeline(&"ward-1".parse().unwrap())
            .unwrap();
        let view = broker
            .broker()
            .site_events_view(&"ward-1".parse().unwrap(), &timeline, 200);
        let last = view.last().unwrap();
        assert_eq!(
            last.kind,
            tether_proto::events::EventKind::Reported {
                problem: ProblemKind::Translation,
                detail: "packets were dropped: not_for_site=25".into(),
                count: 39,
            }
        );
        conn.close("done");
    })
    .await
    .expect("test finished in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_renewal_without_an_answer_counts_as_an_etcd_error() {
    let Some(server) = start_etcd().await else {
        return;
    };
    let prefix = "/tether/renewal/";
    let gate = Gate::new(&server);
    tokio::time::timeout(TEST_DEADLINE, async {
        let broker = TestBroker::start(&gated_toml(&server, &gate.url(), prefix)).await;
        // Held only once the lease is kept alive: held while the broker is
        // still joining, its requests there fail instead (the lease grant,
        // the opening of the keep-alive stream), and no renewal is asked.
        let fleet = broker.broker().fleet().unwrap().clone();
        let started = Instant::now();
        while !fleet.lease_renewed() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the broker's lease was not renewed within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let errors = || metric("tether_broker_etcd_errors_total{operation=\"lease_renewal\"}");
        let before = errors();
        // A renewal asked now gets no answer; the broker gives it up at
        // the next renewal (1.7 s later), before its lease runs out.
        gate.hold();
        let started = Instant::now();
        while errors() <= before {
            assert!(
                started.elapsed() < tether_broker::fleet::LEASE_TTL,
                "no unanswered renewal counted before the lease ran out"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        gate.release();
        drop(broker);
    })
    .await
    .expect("test finished in time");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_series_of_a_broker_that_left_the_fleet_are_gone_from_the_others_metrics() {
    let Some(server) = start_etcd().await else {
        return;
    };
    let extra = server.broker_toml("/tether/series/");
    tokio::time::timeout(TEST_DEADLINE, async {
        let one = TestBroker::start(&extra).await;
        let mut two = TestBroker::start(&extra).await;
        let two_id = two.broker().fleet().unwrap().id().unwrap();
        let series = format!("tether_broker_fleet_sessions{{broker=\"{two_id}\"}}");
        let started = Instant::now();
        while !one.scrape().await.contains(&series) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "broker one never showed broker two's sessions"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Broker two leaves (ids are random per start: it never returns).
        two.running.take().unwrap().shutdown().await;
        let fleet = one.broker().fleet().unwrap().clone();
        let started = Instant::now();
        while fleet
            .snapshot()
            .is_some_and(|f| f.members().contains_key(&two_id))
        {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "broker two never left"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let text = one.scrape().await;
        assert!(!text.contains(&two_id), "{text}");
    })
    .await
    .expect("test finished in time");
    drop(server);
}
