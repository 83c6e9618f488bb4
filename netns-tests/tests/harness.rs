//! The harness itself: namespaces connect, and disappear even when a test
//! panics.
//!
//! ```text
//! [left: 10.99.0.1/30] --veth-- [right: 10.99.0.2/30]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tether_netns_tests::{NetNs, link, netns_exists, require_root};

#[test]
fn veth_link_carries_traffic_between_namespaces() {
    if !require_root() {
        return;
    }
    let left = NetNs::new("left").unwrap();
    let right = NetNs::new("right").unwrap();
    link(&left, "l0", "10.99.0.1/30", &right, "r0", "10.99.0.2/30").unwrap();
    assert!(left.succeeds("ping", &["-c", "1", "-W", "2", "10.99.0.2"]));
    // Nothing outside: the namespace has no route elsewhere.
    assert!(!left.succeeds("ping", &["-c", "1", "-W", "1", "10.98.0.1"]));
}

#[test]
fn namespaces_and_their_processes_are_removed_on_panic() {
    if !require_root() {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let ns = NetNs::new("doomed").unwrap();
        let sleeper = ns.spawn("sleep", &["300"], None).unwrap();
        tx.send((ns.name().to_string(), sleeper.id())).unwrap();
        std::mem::forget(sleeper); // only the namespace guard is left to clean up
        panic!("simulated test failure");
    })
    .join();
    assert!(result.is_err());
    let (name, pid) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(!netns_exists(&name), "namespace {name} survived the panic");
    assert!(
        tether_netns_tests::wait_for(Duration::from_secs(5), || !std::path::Path::new(&format!(
            "/proc/{pid}"
        ))
        .exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))),
        "process {pid} survived its namespace"
    );
}
