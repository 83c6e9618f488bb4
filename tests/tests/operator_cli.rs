//! The operator's timeline commands as an operator runs them: the real
//! `tether` binary (`tether events SITE`, `tether sites --since`,
//! `tether sites --state`) against a real `tether-broker` process, reading
//! the admin API's address and token from `TETHER_ADMIN_URL` and
//! `TETHER_ADMIN_TOKEN`. A site enrolls, connects and closes its tunnel;
//! another enrolls and never connects; the tables and the JSON say so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tether::state_dir::StateDir;
use tether_proto::api::{TokenRequest, TokenResponse};
use tether_tests::{Tunnel, binary, connect_trusting};

/// `tether-broker run` on loopback, killed on drop.
struct RealBroker {
    child: Child,
    tunnel: SocketAddr,
    admin: SocketAddr,
    token: String,
}

/// The address in a banner line `  <label>  <address> (...)`.
fn banner_addr(banner: &str, label: &str) -> SocketAddr {
    let line = banner
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label:?} in the banner:\n{banner}"));
    let word = line.split_whitespace().next().unwrap();
    word.trim_start_matches("http://").parse().unwrap()
}

impl RealBroker {
    fn start(dir: &Path) -> Self {
        let data = dir.join("data");
        let config = dir.join("broker.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {data:?}\nlisten = [\"127.0.0.1:0\"]\nadvertised = [\"127.0.0.1\"]\n\
                 [admin]\nlisten = \"127.0.0.1:0\"\n[dns]\nlisten = [\"127.0.0.1:0\"]\n"
            ),
        )
        .unwrap();
        let mut child = Command::new(binary("tether-broker"))
            .args(["run", "-c"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Read by a thread, so that the wait below is bounded.
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut banner = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    banner.push_str(&line);
                    banner.push('\n');
                    if line.contains("tether up") {
                        break;
                    }
                }
                Err(e) => {
                    let _ = child.kill();
                    panic!("tether-broker did not serve ({e}):\n{banner}");
                }
            }
        }
        let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
        Self {
            child,
            tunnel: banner_addr(&banner, "tunnel"),
            admin: banner_addr(&banner, "admin API"),
            token: token.trim().to_string(),
        }
    }

    /// An enrollment code for `site` of region `local`, and the site
    /// enrolled with it into `state`.
    async fn enroll(&self, site: &str, state: &StateDir) {
        let client = tether_shell::operator::AdminClient::new(
            &format!("http://{}", self.admin),
            &self.token,
        );
        let request = TokenRequest {
            site: site.parse().unwrap(),
            region: "local".parse().unwrap(),
            ttl: None,
        };
        let created: TokenResponse =
            tokio::task::spawn_blocking(move || client.post("/v1/tokens", &request).unwrap())
                .await
                .unwrap();
        tether::enroll::enroll(&self.tunnel.to_string(), &created.code, state, false, None)
            .await
            .unwrap();
    }

    /// Runs the real `tether ARGS` against this broker's admin API:
    /// (success, stdout, stderr), bounded to 30 s.
    fn tether(&self, args: &[&str]) -> (bool, String, String) {
        let mut child = Command::new(binary("tether"))
            .args(args)
            .env("TETHER_ADMIN_URL", format!("http://{}", self.admin))
            .env("TETHER_ADMIN_TOKEN", &self.token)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("tether {args:?} ran for more than 30 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }
}

impl Drop for RealBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
    let broker = RealBroker::start(dir.path());

    // ward-b enrolls and never connects; its only event is older than the
    // window asked below.
    let b = StateDir::new(dir.path().join("ward-b"));
    broker.enroll("ward-b", &b).await;
    tokio::time::sleep(Duration::from_millis(4100)).await;

    // ward-a enrolls, connects, closes its tunnel, connects again.
    let a = StateDir::new(dir.path().join("ward-a"));
    broker.enroll("ward-a", &a).await;
    let open = || async {
        let c = a.credentials().unwrap();
        let client = connect_trusting(broker.tunnel, &c.bundle, Some((c.chain, c.key)))
            .await
            .unwrap();
        let mut t = Tunnel::open(client).await.unwrap();
        t.configured().await;
        t
    };
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
