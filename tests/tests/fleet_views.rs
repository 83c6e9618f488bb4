//! The admin views of a fleet (a real etcd, started per test): whichever
//! broker an operator asks, the sessions, sites, routes and traces are
//! those of the whole fleet, each naming the broker that holds the
//! session; when a broker is killed (`SIGKILL`, by its process id), its
//! sites are offline everywhere once its store lease has expired.
//!
//! Broker A runs in a child process (this test binary run again with
//! `FLEET_VIEWS_CHILD_CONFIG` set, executing only [`child_broker`]), so
//! that it can be killed; broker B runs in this process. The operator's
//! tables come from the real `tether-broker` binary pointed at B's admin
//! API.
//!
//! ```text
//!                 etcd (127.0.0.1, per test)
//!                /                          \
//!       broker A (child)  ==== link ====  broker B (in-process)
//!            |              kill -9 A          |
//!         site-x                            site-y
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::Value;
use tether_tests::child_broker::{ChildBroker, serve_child};
use tether_tests::etcd::EtcdServer;
use tether_tests::{
    TestBroker, TestSite, Tunnel, binary, connect_trusting, tunnel_for, v4, wait_for_remote_route,
};

/// Deadline of the test body.
const TEST_DEADLINE: Duration = Duration::from_secs(120);
/// Environment variable naming the configuration a child broker runs.
const CHILD: &str = "FLEET_VIEWS_CHILD_CONFIG";

/// Not a test on its own: the body of a broker in a child process (one
/// that can be killed with `kill -9`). Without `FLEET_VIEWS_CHILD_CONFIG`
/// it does nothing.
#[tokio::test]
async fn child_broker() {
    serve_child(CHILD).await;
}

/// One broker's admin API.
#[derive(Clone)]
struct Admin {
    addr: SocketAddr,
    token: String,
}

impl Admin {
    /// `GET path` as JSON.
    async fn get(&self, path: &str) -> Value {
        let url = format!("http://{}{path}", self.addr);
        let auth = format!("Bearer {}", self.token);
        tokio::task::spawn_blocking(move || {
            let text = ureq::get(&url)
                .header("Authorization", &auth)
                .call()
                .unwrap()
                .body_mut()
                .read_to_string()
                .unwrap();
            serde_json::from_str(&text).unwrap()
        })
        .await
        .unwrap()
    }

    /// `GET /v1/sessions` until `ok` holds for it (the fleet's owner
    /// records reach every broker through its watch); bounded.
    async fn sessions_until(&self, what: &str, ok: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let sessions = self.get("/v1/sessions").await;
            let sessions = sessions.as_array().unwrap().clone();
            if ok(&sessions) {
                return sessions;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: /v1/sessions of {} says {sessions:#?}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `tether-broker <command>` (the real binary) against this broker's
    /// admin API.
    async fn cli(&self, command: &'static str) -> String {
        let (url, token) = (format!("http://{}", self.addr), self.token.clone());
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new(binary("tether-broker"))
                .arg(command)
                .env_remove("TETHER_BROKER_CONFIG")
                .env("TETHER_ADMIN_URL", url)
                .env("TETHER_ADMIN_TOKEN", token)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "tether-broker {command}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        })
        .await
        .unwrap()
    }
}

/// The row of `site` in a list of sessions or sites.
fn row<'a>(rows: &'a [Value], site: &str) -> Option<&'a Value> {
    rows.iter().find(|r| r["site"] == site)
}

/// The line of `site` in a table printed by the CLI.
fn line<'a>(table: &'a str, site: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(site))
        .unwrap_or_else(|| panic!("no line for {site} in\n{table}"))
}

/// A configured tunnel of `site` at the broker listening on `addr`.
async fn tunnel_at(addr: SocketAddr, site: &TestSite) -> Tunnel {
    let c = site.state.credentials().unwrap();
    let client = connect_trusting(addr, &c.bundle, Some((c.chain, c.key)))
        .await
        .unwrap();
    let mut t = Tunnel::open(client).await.unwrap();
    t.configured().await;
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_broker_shows_the_sessions_sites_and_routes_of_the_whole_fleet() {
    let Some(server) = tokio::task::spawn_blocking(|| EtcdServer::start(false))
        .await
        .unwrap()
    else {
        return;
    };
    let extra = format!(
        "{}[peering]\nlisten = \"127.0.0.1:0\"\n",
        server.broker_toml("/tether/views/")
    );
    tokio::time::timeout(TEST_DEADLINE, async {
        let b = TestBroker::start(&extra).await;
        let ca_dir = b.config.data_dir.clone().unwrap();
        let mut a = ChildBroker::start(CHILD, &extra, &ca_dir);
        let a_admin = Admin {
            addr: a.line("ADMIN ", Duration::from_secs(10)).parse().unwrap(),
            token: std::fs::read_to_string(a.data.join("admin.token"))
                .unwrap()
                .trim()
                .to_string(),
        };
        let b_admin = Admin {
            addr: b.running.as_ref().unwrap().admin_addr,
            token: b.broker().admin_token.clone(),
        };
        let (a_addr, b_addr) = (a.addr.to_string(), b.addr().to_string());
        let b_id = b.broker().fleet().unwrap().id().unwrap();
        eprintln!("brokers: A at {a_addr} (child), B at {b_addr} ({b_id})");

        // site-x on A, site-y on B.
        let x = TestSite::enroll(&b, "site-x").await;
        let tx = tunnel_at(a.addr, &x).await;
        let y = TestSite::enroll(&b, "site-y").await;
        let ty = tunnel_for(&b, &y).await;
        let (x_addr, y_addr) = (v4(&tx), v4(&ty));

        // Both brokers list both sessions, each with its holder.
        let both = |s: &[Value]| row(s, "site-x").is_some() && row(s, "site-y").is_some();
        let at_a = a_admin.sessions_until("A lists both sites", both).await;
        let at_b = b_admin.sessions_until("B lists both sites", both).await;
        let a_id = row(&at_a, "site-x").unwrap()["broker"]["id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_ne!(a_id, b_id);
        for (sessions, here) in [(&at_a, &a_addr), (&at_b, &b_addr)] {
            assert_eq!(sessions.len(), 2, "{sessions:#?}");
            let sx = row(sessions, "site-x").unwrap();
            let sy = row(sessions, "site-y").unwrap();
            assert_eq!(sx["broker"]["id"], a_id.as_str(), "{sx}");
            assert_eq!(sx["broker"]["address"], a_addr.as_str(), "{sx}");
            assert_eq!(sy["broker"]["id"], b_id.as_str(), "{sy}");
            assert_eq!(sy["broker"]["address"], b_addr.as_str(), "{sy}");
            for s in [sx, sy] {
                assert_eq!(s["region"], "local", "{s}");
                let local = s["broker"]["address"] == here.as_str();
                assert_eq!(s["local"], local, "{s}");
                // The detail of a session only where it is held.
                assert_eq!(s.get("transport").is_some(), local, "{s}");
            }
        }
        assert_eq!(row(&at_a, "site-x").unwrap()["transport"], "h3");
        assert_eq!(
            row(&at_b, "site-y").unwrap()["remote"]
                .as_str()
                .unwrap()
                .parse::<SocketAddr>()
                .unwrap()
                .ip(),
            IpAddr::from([127, 0, 0, 1])
        );

        // Sites at B: site-x is connected, at A.
        let sites = b_admin.get("/v1/sites").await;
        let sites = sites.as_array().unwrap();
        let sx = row(sites, "site-x").unwrap();
        assert_eq!(sx["broker"]["id"], a_id.as_str(), "{sx}");
        assert!(sx["session"].is_null(), "{sx}");
        assert_eq!(row(sites, "site-y").unwrap()["broker"]["id"], b_id.as_str());
        let table = b_admin.cli("sites").await;
        eprintln!("tether-broker sites at B:\n{table}");
        let lx = line(&table, "site-x");
        assert!(lx.contains(" connected ") && lx.contains(&a_addr), "{lx}");
        let ly = line(&table, "site-y");
        assert!(ly.contains(" connected ") && ly.contains(&b_addr), "{ly}");

        // Routes at B: site-x's address through A, over the link, as the
        // forwarding takes it; site-y's here.
        wait_for_remote_route(&b, x_addr).await;
        let routes = b_admin.get("/v1/routes?kind=site-address").await;
        let routes = routes.as_array().unwrap();
        let via = |addr: std::net::Ipv4Addr| {
            routes
                .iter()
                .find(|r| r["prefix"] == format!("{addr}/32"))
                .unwrap_or_else(|| panic!("no route to {addr}: {routes:#?}"))
        };
        assert_eq!(via(x_addr)["broker"]["id"], a_id.as_str());
        assert!(via(y_addr).get("broker").is_none(), "{}", via(y_addr));
        let table = b_admin.cli("routes").await;
        eprintln!("tether-broker routes at B:\n{table}");
        let rx = table
            .lines()
            .find(|l| l.starts_with(&format!("{x_addr}/32 ")))
            .unwrap();
        assert!(
            rx.contains("site site-x") && rx.contains(&a_addr) && rx.contains("over the link"),
            "{rx}"
        );
        let trace: tether_proto::api::Trace =
            serde_json::from_value(b_admin.get(&format!("/v1/trace/{x_addr}")).await).unwrap();
        let path = &trace.paths[0];
        assert_eq!(
            path.peer.as_ref().and_then(|p| p.id.as_deref()),
            Some(a_id.as_str()),
            "{trace:#?}"
        );
        let text = tether_shell::operator::trace_text(&trace);
        eprintln!("trace at B:\n{text}");
        assert!(
            text.contains(&format!("{x_addr} via site site-x")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "relayed   over the broker link to broker {a_addr}"
            )),
            "{text}"
        );
        assert!(tether_shell::operator::trace_routed(&trace));

        // A dies. Once its lease has expired, site-x is offline at B: no
        // session, no broker, no route.
        a.kill();
        let at_b = b_admin
            .sessions_until("site-x gone from B's sessions", |s| {
                row(s, "site-x").is_none()
            })
            .await;
        assert!(row(&at_b, "site-y").is_some(), "{at_b:#?}");
        let sites = b_admin.get("/v1/sites").await;
        let sx = row(sites.as_array().unwrap(), "site-x").unwrap().clone();
        assert!(sx.get("broker").is_none(), "{sx}");
        let table = b_admin.cli("sites").await;
        eprintln!("tether-broker sites at B after A died:\n{table}");
        assert!(line(&table, "site-x").contains(" offline "), "{table}");
        assert!(line(&table, "site-y").contains(" connected "), "{table}");
        drop((tx, ty));
    })
    .await
    .expect("test finished in time");
    drop(server);
}
