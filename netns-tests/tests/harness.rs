//! The harness itself: namespaces connect, and disappear even when a test
//! panics, or (with what runs in them) at the next run when the test
//! process was killed.
//!
//! ```text
//! [left: 10.99.0.1/30] --veth-- [right: 10.99.0.2/30]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tether_netns_tests::{NetNs, link, netns_exists, netns_owner, require_root, sweep_stale};

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

#[test]
fn names_of_the_harness_tell_their_creator() {
    assert_eq!(netns_owner("tt-backend-1234-7"), Some(1234));
    assert_eq!(netns_owner("tt-site-a-1234-0"), Some(1234));
    assert_eq!(netns_owner("tt-1234-0"), None);
    assert_eq!(netns_owner("tt-site-x-0"), None);
    assert_eq!(netns_owner("other-1234-0"), None);
}

#[test]
fn namespaces_of_a_killed_run_are_removed_with_their_processes() {
    if !require_root() {
        return;
    }
    // The namespace of a live process (this one) stays. Made first: the
    // harness's own sweep before its first namespace also removes what a
    // failed run of this test left.
    let live = NetNs::new("live").unwrap();
    // A namespace as a run whose process is gone would have left it: the
    // pid is above the kernel's limit (4,194,304), so no process has it.
    let name = format!("tt-stale-{}-0", 4_194_305);
    tether_netns_tests::run("ip", &["netns", "add", &name]).unwrap();
    let mut sleeper = std::process::Command::new("ip")
        .args(["netns", "exec", &name, "sleep", "300"])
        .spawn()
        .unwrap();
    assert!(tether_netns_tests::wait_for(Duration::from_secs(5), || {
        tether_netns_tests::run("ip", &["netns", "pids", &name]).is_ok_and(|o| !o.stdout.is_empty())
    }));
    let removed = sweep_stale();
    assert!(removed.contains(&name), "{removed:?}");
    assert!(!removed.iter().any(|r| r == live.name()), "{removed:?}");
    assert!(!netns_exists(&name), "the stale namespace is still there");
    assert!(netns_exists(live.name()));
    let ended = tether_netns_tests::wait_for(Duration::from_secs(5), || {
        sleeper.try_wait().is_ok_and(|s| s.is_some())
    });
    if !ended {
        let _ = sleeper.kill();
    }
    let _ = sleeper.wait();
    assert!(ended, "the process in the stale namespace was not ended");
}
