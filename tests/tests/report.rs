//! Problems a site reports reach its event timeline: a real broker on
//! loopback, a site dialed by the agent's own dialer over HTTP/3 and over
//! HTTP/2, the agent's problem queue and sender
//! (`tether::report::send`), and reports written by hand to check the
//! broker's limits (size, count, per-site budget, sanitizing).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use tether::link::{BrokerConn, Dialer};
use tether::report::Problems;
use tether_pki::tls::ShiftedClock;
use tether_proto::events::{EventKind, SiteEvent};
use tether_proto::report::{
    MAX_DETAIL, MAX_PROBLEMS, MAX_REPORT_BODY, Problem, ProblemKind, REPORT_BURST, REPORT_PATH,
    ReportRequest, ReportResponse,
};
use tether_proto::tunnel::Transport;
use tether_tests::{TestBroker, TestSite};

/// A connection of `site` to `broker` over `transport`, dialed as the
/// agent dials, and its authority.
async fn dial(
    broker: &TestBroker,
    site: &TestSite,
    transport: Transport,
) -> (Arc<BrokerConn>, String) {
    let config = broker.client_config();
    let dialer = Dialer::for_site(&config, &site.state, None).unwrap();
    let (conn, target) = dialer.connect(&config, &[transport]).await.unwrap();
    (Arc::new(conn), target.endpoint.to_string())
}

/// The problems in `site`'s timeline, oldest first.
async fn reported(broker: &TestBroker, site: &str) -> Vec<SiteEvent> {
    let b = broker.broker().clone();
    let site = site.parse().unwrap();
    tokio::task::spawn_blocking(move || {
        assert!(b.events().flush(Duration::from_secs(10)));
        b.events()
            .timeline(&site)
            .unwrap()
            .events()
            .filter(|e| matches!(e.kind, EventKind::Reported { .. }))
            .cloned()
            .collect()
    })
    .await
    .unwrap()
}

async fn post(conn: &BrokerConn, authority: &str, body: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
    conn.request("POST", authority, REPORT_PATH, body).await
}

fn problems(n: usize, detail: &str) -> Vec<u8> {
    serde_json::to_vec(&ReportRequest {
        problems: (0..n)
            .map(|i| Problem {
                kind: ProblemKind::Device,
                detail: format!("{detail} {i}"),
                count: 1,
            })
            .collect(),
    })
    .unwrap()
}

async fn reports_reach_the_timeline(transport: Transport, name: &str) {
    let broker = TestBroker::start("").await;
    let site = TestSite::enroll(&broker, name).await;
    let (conn, authority) = dial(&broker, &site, transport).await;

    // The agent's queue and sender: three repeats fold into one event.
    let queue = Problems::default();
    for _ in 0..3 {
        queue.push(
            ProblemKind::LanRefused,
            "the broker denied a mapping for the LAN 10.9.0.0/16: it stays unreachable",
        );
    }
    let sender = tokio::spawn(tether::report::send(
        conn.clone(),
        authority.clone(),
        queue.clone(),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut events = Vec::new();
    while events.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        events = reported(&broker, name).await;
    }
    sender.abort();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        events[0].kind,
        EventKind::Reported {
            problem: ProblemKind::LanRefused,
            detail: "the broker denied a mapping for the LAN 10.9.0.0/16: it stays unreachable"
                .into(),
            count: 3,
        }
    );
    assert_eq!(
        events[0].kind.describe(),
        "the site reports: a LAN prefix was refused: the broker denied a mapping for the LAN 10.9.0.0/16: it stays unreachable (3 times)"
    );

    // Over the limits: too many problems, an oversized body, not JSON.
    let (status, body) = post(&conn, &authority, &problems(MAX_PROBLEMS + 1, "x"))
        .await
        .unwrap();
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    assert!(
        String::from_utf8_lossy(&body).contains("at most 8 problems"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let huge = problems(1, &"y".repeat(MAX_REPORT_BODY));
    match post(&conn, &authority, &huge).await {
        Ok((status, _)) => assert_eq!(status, 400),
        // HTTP/3 resets the request stream.
        Err(e) => assert!(e.to_string().contains("larger than"), "{e:#}"),
    }
    let (status, _) = post(&conn, &authority, b"{\"problems\": 5}").await.unwrap();
    assert_eq!(status, 400);
    assert_eq!(reported(&broker, name).await.len(), 1);

    // A detail with control characters and far too long is cut to
    // printable text.
    let nasty = serde_json::to_vec(&ReportRequest {
        problems: vec![Problem {
            kind: ProblemKind::Clock,
            detail: format!("clock\n\u{1b}[2J{}", "z".repeat(1000)),
            count: 7,
        }],
    })
    .unwrap();
    let (status, body) = post(&conn, &authority, &nasty).await.unwrap();
    assert_eq!(status, 200);
    let answer: ReportResponse = serde_json::from_slice(&body).unwrap();
    assert_eq!((answer.stored, answer.dropped), (1, 0));

    // The budget: what is left of the burst is stored, the rest dropped.
    let left = REPORT_BURST as usize - 2;
    let mut stored = 0;
    let mut dropped = 0;
    for _ in 0..2 {
        let (status, body) = post(&conn, &authority, &problems(MAX_PROBLEMS, "flood"))
            .await
            .unwrap();
        assert_eq!(status, 200);
        let answer: ReportResponse = serde_json::from_slice(&body).unwrap();
        stored += answer.stored;
        dropped += answer.dropped;
    }
    assert_eq!((stored, dropped), (left, 2 * MAX_PROBLEMS - left));
    let events = reported(&broker, name).await;
    assert_eq!(events.len(), REPORT_BURST as usize, "{events:?}");
    let EventKind::Reported { detail, count, .. } = &events[1].kind else {
        unreachable!()
    };
    assert!(
        detail.len() <= MAX_DETAIL && detail.starts_with("clock  [2Jzzz"),
        "{detail:?}"
    );
    assert!(!detail.chars().any(char::is_control));
    assert_eq!(*count, 7);
    conn.close("done");
}

#[tokio::test]
async fn problems_reported_over_http3_reach_the_timeline_within_limits() {
    reports_reach_the_timeline(Transport::H3, "ward-h3").await;
}

#[tokio::test]
async fn problems_reported_over_http2_reach_the_timeline_within_limits() {
    reports_reach_the_timeline(Transport::H2, "ward-h2").await;
}

/// Waits until `site`'s timeline holds a problem of `kind`, and returns
/// its detail.
async fn reported_kind(broker: &TestBroker, site: &str, kind: ProblemKind) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let found = reported(broker, site)
            .await
            .into_iter()
            .find_map(|e| match e.kind {
                EventKind::Reported {
                    problem, detail, ..
                } if problem == kind => Some(detail),
                _ => None,
            });
        if let Some(detail) = found {
            return detail;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {kind:?} problem reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_clock_two_hours_ahead_is_reported_from_the_brokers_date() {
    let broker = TestBroker::start("").await;
    let site = TestSite::enroll(&broker, "ward-fast").await;
    // Ahead, the broker's certificate is still valid here: the site
    // connects, and the agent's check on a new session measures the skew.
    for transport in [Transport::H3, Transport::H2] {
        let (conn, authority) = dial(&broker, &site, transport).await;
        let queue = Problems::default();
        // Half a minute more than 2 h, so the Date's one-second
        // resolution cannot make it read as 119 minutes.
        let clock = ShiftedClock(2 * 3600 + 30);
        let skew = tether::clock::check(&conn, &authority, &queue, &clock)
            .await
            .unwrap();
        assert!((skew + 7230.0).abs() < 3.0, "{skew}");
        // The right clock is not reported.
        let right = Problems::default();
        let skew = tether::clock::check(&conn, &authority, &right, &ShiftedClock(0))
            .await
            .unwrap();
        assert!(skew.abs() <= tether::clock::TOLERANCE_SECS, "{skew}");
        let sender = tokio::spawn(tether::report::send(conn.clone(), authority, queue));
        let detail = reported_kind(&broker, "ward-fast", ProblemKind::Clock).await;
        sender.abort();
        assert!(
            detail
                .starts_with("this host's clock is 2 h ahead of the broker's: fix the clock (NTP)"),
            "{detail}"
        );
        conn.close("done");
    }
    let events = reported(&broker, "ward-fast").await;
    assert!(
        events.iter().all(|e| matches!(
            e.kind,
            EventKind::Reported {
                problem: ProblemKind::Clock,
                ..
            }
        )),
        "{events:?}"
    );
    assert!(
        events[0].kind.describe().starts_with(
            "the site reports: the site's clock is wrong: this host's clock is 2 h ahead"
        ),
        "{}",
        events[0].kind.describe()
    );
}

#[tokio::test]
async fn a_clock_two_days_behind_is_reported_once_the_site_connects() {
    let broker = TestBroker::start("").await;
    let site = TestSite::enroll(&broker, "ward-slow").await;
    let config = broker.client_config();
    // Behind, this host refuses the broker's certificate as not yet valid:
    // no connection, over either transport; the agent queues the words.
    let queue = Problems::default();
    let slow = Dialer::for_site_with_clock(&config, &site.state, -2 * 86_400).unwrap();
    for transport in [Transport::H3, Transport::H2] {
        let failure = match slow.connect(&config, &[transport]).await {
            Ok(_) => panic!("connected over {transport:?} with a clock 2 days behind"),
            Err(f) => f,
        };
        let words = failure
            .clock
            .clone()
            .unwrap_or_else(|| panic!("not told as a clock over {transport:?}: {failure}"));
        assert!(
            words.starts_with("this host's clock is at least")
                && words.contains("hours behind the broker's")
                && words.ends_with("fix the clock (NTP)"),
            "{words}"
        );
        tether::clock::dial_failed(&queue, &failure);
    }
    // The clock is fixed; the next session carries the report.
    let (conn, authority) = dial(&broker, &site, Transport::H3).await;
    let sender = tokio::spawn(tether::report::send(conn.clone(), authority, queue));
    let detail = reported_kind(&broker, "ward-slow", ProblemKind::Clock).await;
    sender.abort();
    assert!(
        detail.starts_with("this host's clock is at least"),
        "{detail}"
    );
    assert!(detail.contains("behind the broker's"), "{detail}");
    conn.close("done");
}
