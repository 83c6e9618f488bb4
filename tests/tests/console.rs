//! The fleet console in a real browser: a real broker on loopback, a site
//! enrolled and connected through the agent's own client code, and
//! Debian's Chromium driven by Playwright (`tests/console/browser.py`):
//! log in, see the site online, kill its agent and see it offline with the
//! reason, trace its name, and check that a viewer cannot revoke.
//!
//! Without Chromium or Playwright the test prints why and passes, except
//! under CI (`CI` set), where it fails. `TETHER_UPDATE_SCREENSHOTS=1`
//! copies the screenshots it takes to `docs/console/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tether_netns_tests::browser::{self, CHROMIUM, repo_root};
use tether_proto::events::{Disconnect, EventKind};
use tether_tests::{TestBroker, TestSite, tunnel_for};

/// A WireGuard gateway (never started: the broker lists it, and routes its
/// backend network to it).
const GATEWAY: &str = r#"
[wireguard]
listen = ["127.0.0.1:0"]
[[gateway]]
id = "gw-local-1"
region = "local"
public_key = "PGczmhJJZDKv8IR1wpKkQZXEh/tJ3wR/3t3WiFAXh3g="
prefixes = ["10.244.0.0/16"]
"#;

/// The whole browser session, at most.
const DEADLINE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_a_site_going_offline_and_keeps_viewers_read_only() {
    if !browser::available() {
        return;
    }
    let broker = TestBroker::start(GATEWAY).await;
    let running = broker.running.as_ref().unwrap();
    let b = running.broker.clone();
    let site = TestSite::enroll(&broker, "clinic-7").await;
    let mut tunnel = Some(tunnel_for(&broker, &site).await);
    report_a_refused_lan(&broker, &site).await;
    let zone = broker.config.dns_zone.clone();
    let name = tether_proto::dns::site_name(
        &"clinic-7".parse().unwrap(),
        &"local".parse().unwrap(),
        &zone,
    );
    let shots = tempfile::tempdir().unwrap();
    let mut child = Command::new("python3")
        .arg(repo_root().join("tests/console/browser.py"))
        .env(
            "CONSOLE_URL",
            format!("http://{}/console/", running.admin_addr),
        )
        .env("ADMIN_TOKEN", &b.admin_token)
        .env("VIEWER_TOKEN", b.viewer_token().unwrap())
        .env("SITE", "clinic-7")
        .env("SITE_NAME", &name)
        .env("GATEWAY", "gw-local-1")
        .env("SHOTS", shots.path())
        .env("CHROMIUM", CHROMIUM)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    // The script's lines, read on a thread of their own.
    let (lines_tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("browser: {line}");
            let _ = lines_tx.send(line);
        }
    });
    let mut stdin = child.stdin.take().unwrap();
    let started = Instant::now();
    let mut ok = false;
    let mut killed = false;
    while started.elapsed() < DEADLINE {
        let line = tokio::task::block_in_place(|| lines.recv_timeout(Duration::from_millis(200)));
        match line.as_deref() {
            Ok("KILL") => {
                // The agent goes away: its connection ends.
                let t = tunnel.take().unwrap();
                t.client.conn.close(0u32.into(), b"agent killed");
                drop(t);
                killed = true;
                writeln!(stdin, "killed").unwrap();
                stdin.flush().unwrap();
            }
            Ok("OK") => ok = true,
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    if child.try_wait().unwrap().is_none() {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    assert!(killed, "the browser never got as far as the agent's death");
    assert!(
        ok && status.success(),
        "the browser checks failed ({status}); see its output above"
    );

    // What the browser saw is what the store holds, and the viewer's
    // attempt changed nothing.
    let b2 = b.clone();
    let (timeline, record) = tokio::task::spawn_blocking(move || {
        assert!(b2.events().flush(Duration::from_secs(10)));
        let s = "clinic-7".parse().unwrap();
        (
            b2.events().timeline(&s).unwrap(),
            b2.store.site(&s).unwrap().unwrap(),
        )
    })
    .await
    .unwrap();
    assert!(!record.revoked, "a viewer revoked the site");
    let kinds: Vec<&EventKind> = timeline.events().map(|e| &e.kind).collect();
    assert!(
        matches!(kinds.as_slice(), [
            EventKind::Enrolled { .. },
            EventKind::Connected { transport, .. },
            EventKind::Reported { count: 2, .. },
            EventKind::Disconnected { reason: Disconnect::ConnectionLost, .. },
        ] if transport == "h3"),
        "{kinds:?}"
    );

    if std::env::var_os("TETHER_UPDATE_SCREENSHOTS").is_some() {
        let docs = repo_root().join("docs/console");
        std::fs::create_dir_all(&docs).unwrap();
        for entry in std::fs::read_dir(shots.path()).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), docs.join(entry.file_name())).unwrap();
        }
    }
}

/// The site's agent reports a LAN the broker refused, twice, over a
/// connection of its own (the agent's queue and sender); returns once the
/// report is in the timeline.
async fn report_a_refused_lan(broker: &TestBroker, site: &TestSite) {
    let config = broker.client_config();
    let dialer = tether::link::Dialer::for_site(&config, &site.state, None).unwrap();
    let (conn, target) = dialer
        .connect(&config, &[tether_proto::tunnel::Transport::H3])
        .await
        .unwrap();
    let conn = std::sync::Arc::new(conn);
    let problems = tether::report::Problems::default();
    for _ in 0..2 {
        problems.push(
            tether_proto::report::ProblemKind::LanRefused,
            "the broker denied a mapping for the LAN 10.9.0.0/16: it stays unreachable",
        );
    }
    let sender = tokio::spawn(tether::report::send(
        conn.clone(),
        target.endpoint.to_string(),
        problems,
    ));
    let b = broker.broker().clone();
    let site_id: tether_proto::ids::SiteId = "clinic-7".parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (b, s) = (b.clone(), site_id.clone());
        let stored = tokio::task::spawn_blocking(move || {
            assert!(b.events().flush(Duration::from_secs(10)));
            b.events()
                .timeline(&s)
                .unwrap()
                .events()
                .any(|e| matches!(e.kind, EventKind::Reported { .. }))
        })
        .await
        .unwrap();
        if stored {
            break;
        }
        assert!(Instant::now() < deadline, "the report did not arrive");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sender.abort();
    conn.close("done");
}

/// The same timeline through the operator CLI's client and tables
/// (`tether events SITE`, `tether sites --since 10m`), over the real port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_shows_a_sites_timeline_and_recent_changes() {
    let broker = TestBroker::start("").await;
    let site = TestSite::enroll(&broker, "clinic-8").await;
    TestSite::enroll(&broker, "quiet-1").await;
    let t = tunnel_for(&broker, &site).await;
    t.client.conn.close(0u32.into(), b"agent stopped");
    drop(t);
    let b = broker.broker().clone();
    let url = format!("http://{}", broker.running.as_ref().unwrap().admin_addr);
    let viewer = b.viewer_token().unwrap().to_string();
    tokio::task::spawn_blocking(move || {
        // The session's end reaches the timeline when the broker notices.
        let deadline = Instant::now() + Duration::from_secs(20);
        while b.session(&"clinic-8".parse().unwrap()).is_some() {
            assert!(Instant::now() < deadline, "the broker kept the session");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(b.events().flush(Duration::from_secs(10)));
        let client = tether_shell::operator::AdminClient::new(&url, &viewer);
        let now = tether_broker::store::now_unix();
        let events: tether_proto::api::SiteEvents =
            client.get("/v1/sites/clinic-8/events").unwrap();
        let text = tether_shell::operator::events_table(&events, now);
        println!("{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("WHEN"), "{text}");
        // Newest first.
        assert!(
            lines[1].contains("disconnected: the connection was lost"),
            "{text}"
        );
        assert!(
            lines[2].contains("connected over h3 from 127.0.0.1:"),
            "{text}"
        );
        assert!(lines[3].contains("enrolled"), "{text}");
        let page: tether_proto::api::SitePage = client
            .get("/v1/site-states?since=10m&state=offline")
            .unwrap();
        let text = tether_shell::operator::site_states_table(&page.sites, now);
        println!("{text}");
        assert!(text.contains("clinic-8"), "{text}");
        assert!(text.contains("the connection was lost"), "{text}");
        // quiet-1 enrolled within the 10 minutes too, but never connected.
        assert!(text.contains("quiet-1"), "{text}");
        let page: tether_proto::api::SitePage = client.get("/v1/site-states?q=clinic").unwrap();
        assert_eq!(page.total, 1);
    })
    .await
    .unwrap();
}
