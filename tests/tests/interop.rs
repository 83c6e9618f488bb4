//! Interoperability: an independent HTTP/3 and CONNECT-IP client (aioquic,
//! with ls-qpack) opens a tunnel to the broker and exchanges capsules and a
//! datagram. It proves the wire format is RFC 9484's, not only tether's
//! own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use tether_tests::{TestBroker, TestSite};

fn aioquic_available() -> bool {
    Command::new("python3")
        .args(["-c", "import aioquic"])
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test]
async fn aioquic_client_opens_a_tunnel() {
    if !aioquic_available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "aioquic is required in CI (.ci/run installs it)"
        );
        eprintln!("skipped: python3 with aioquic not installed");
        return;
    }
    let broker = TestBroker::start("").await;
    let site = TestSite::enroll(&broker, "interop").await;
    let dir = &site.state.path;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/connect_ip_client.py");
    let addr = broker.addr();
    let (script, dir2) = (script.clone(), dir.clone());
    let output = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .arg("30")
            .arg("python3")
            .arg(&script)
            .arg(addr.ip().to_string())
            .arg(addr.port().to_string())
            .arg(dir2.join("ca.crt"))
            .arg(dir2.join("site.crt"))
            .arg(dir2.join("site.key"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "client failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(result["status"], 200, "{result}");
    let capsules = result["capsules"].as_array().unwrap();
    let assign = capsules
        .iter()
        .find(|c| c["type"] == "ADDRESS_ASSIGN")
        .expect("ADDRESS_ASSIGN");
    let addresses = assign["addresses"].as_array().unwrap();
    assert!(
        addresses
            .iter()
            .any(|a| a["prefix"].as_str().unwrap().starts_with("100.64.")
                && a["prefix"].as_str().unwrap().ends_with("/32")),
        "{assign}"
    );
    assert!(
        addresses.iter().all(|a| a["request_id"] == 0),
        "unsolicited assignment uses request ID 0"
    );
    let routes = capsules
        .iter()
        .find(|c| c["type"] == "ROUTE_ADVERTISEMENT")
        .expect("ROUTE_ADVERTISEMENT");
    assert!(
        routes["ranges"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["start"] == "100.64.0.0"
                && r["end"] == "100.64.255.255"
                && r["protocol"] == 0),
        "{routes}"
    );
    // The datagram went through: ICMP host unreachable came back in context 0.
    let reply = &result["reply"];
    assert_eq!(
        (
            reply["context"].as_u64(),
            reply["protocol"].as_u64(),
            reply["icmp_type"].as_u64(),
            reply["icmp_code"].as_u64()
        ),
        (Some(0), Some(1), Some(3), Some(1)),
        "{result}"
    );
}
