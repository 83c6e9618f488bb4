//! The operator's timeline commands as an operator runs them: the real
//! `tether` binary (`tether events SITE`, `tether sites --since`,
//! `tether sites --state`) against a real `tether-broker` process, reading
//! the admin API's address and token from `TETHER_ADMIN_URL` and
//! `TETHER_ADMIN_TOKEN`. A site enrolls, connects and closes its tunnel;
//! another enrolls and never connects; the tables and the JSON say so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use tether::state_dir::StateDir;
use tether_tests::real_broker::{RealBroker, tunnel_at, write_config};

/// `tether events ward-a` once it lists `rows` events, the newest
/// being `word` (within 10 s).
async fn events_until(broker: &RealBroker, word: &str, rows: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, out, err) = broker.tether(&["events", "ward-a"]);
        assert!(ok, "tether events failed: {err}");
        let newest = out.lines().nth(1).unwrap_or_default();
        if out.lines().count() == rows + 1 && newest.split_whitespace().any(|w| w == word) {
            return out;
        }
        assert!(Instant::now() < deadline, "no {word} in 10 s:\n{out}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The table's row of `site` (its first column).
fn row<'a>(table: &'a str, site: &str) -> Option<&'a str> {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(site))
}

#[tokio::test]
async fn tether_events_and_sites_since_show_a_site_that_connected_and_one_that_never_did() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = RealBroker::start(&write_config(dir.path(), &data, ""), &data).unwrap();

    // ward-b enrolls and never connects; its only event is older than the
    // window asked below.
    let b = StateDir::new(dir.path().join("ward-b"));
    broker.enroll("ward-b", &b).await;
    tokio::time::sleep(Duration::from_millis(4100)).await;

    // ward-a enrolls, connects, closes its tunnel, connects again.
    let a = StateDir::new(dir.path().join("ward-a"));
    broker.enroll("ward-a", &a).await;
    let open = || tunnel_at(broker.tunnel, &a);
    let first = open().await;
    first.client.conn.close(0u32.into(), b"bye");
    drop(first);
    // The broker records each event as it sees it: wait for the
    // disconnection, then for the second connection.
    events_until(&broker, "disconnected", 3).await;
    let _second = open().await;
    let out = events_until(&broker, "connected", 4).await;
    // Asked at once: ward-a's newest event is less than a second old,
    // ward-b's more than four seconds.
    let recent = broker.tether(&["sites", "--since", "3s"]);

    // The timeline, newest first, as the table and as JSON.
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["WHEN", "EVENT", "DETAILS", "BROKER"],
        "{out}"
    );
    let kinds: Vec<&str> = lines[1..]
        .iter()
        .map(|l| {
            // WHEN is "<n>s ago" (one or more words, ending in "ago").
            let rest = &l[l.find(" ago").unwrap() + 4..];
            rest.split_whitespace().next().unwrap()
        })
        .collect();
    assert_eq!(
        kinds,
        ["connected", "disconnected", "connected", "enrolled"],
        "{out}"
    );
    assert!(out.contains("connected over h3 from 127.0.0.1:"), "{out}");
    let (ok, json, err) = broker.tether(&["events", "ward-a", "--json"]);
    assert!(ok, "{err}");
    let events: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(events["site"], "ward-a", "{json}");
    assert_eq!(events["events"].as_array().unwrap().len(), 4, "{json}");

    // ward-b: enrolled, nothing since.
    let (ok, out, err) = broker.tether(&["events", "ward-b"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(out.lines().nth(1).unwrap().contains("enrolled"), "{out}");

    // Sites with an event within the last 3 s: ward-a only, online.
    let (ok, out, err) = recent;
    assert!(ok, "{err}");
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "SITE", "REGION", "STATE", "SINCE", "BROKER", "LAST", "EVENT"
        ],
        "{out}"
    );
    let a_row = row(&out, "ward-a").unwrap_or_else(|| panic!("no ward-a:\n{out}"));
    assert!(a_row.contains(" online "), "{out}");
    assert!(a_row.contains("connected over h3"), "{out}");
    assert!(row(&out, "ward-b").is_none(), "ward-b listed:\n{out}");
    // Within an hour: both; ward-b offline since it enrolled.
    let (ok, out, err) = broker.tether(&["sites", "--since", "1h"]);
    assert!(ok, "{err}");
    assert!(row(&out, "ward-a").is_some(), "{out}");
    let b_row = row(&out, "ward-b").unwrap_or_else(|| panic!("no ward-b:\n{out}"));
    assert!(b_row.contains(" offline "), "{out}");
    assert!(b_row.contains("enrolled"), "{out}");
    // By state, as JSON.
    let (ok, json, err) = broker.tether(&["sites", "--state", "offline", "--json"]);
    assert!(ok, "{err}");
    let sites: serde_json::Value = serde_json::from_str(&json).unwrap();
    let names: Vec<&str> = sites
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["site"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ward-b"], "{json}");

    // A bad duration is refused with the reason, and exits non-zero.
    let (ok, out, err) = broker.tether(&["sites", "--since", "soon"]);
    assert!(!ok, "{out}");
    assert!(err.contains("is not a duration"), "{err}");
}
