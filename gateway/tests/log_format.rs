//! `tether-gateway --log-format json`: the error that ends a command is one
//! JSON object on standard error, its plain words in `message`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn the_error_that_stops_the_gateway_is_a_json_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, "this is = not toml =\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tether-gateway"))
        .args(["--log-format", "json", "run", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert_eq!(lines[0]["level"], "ERROR", "{text}");
    let message = lines[0]["message"].as_str().unwrap();
    assert!(message.contains(&config.display().to_string()), "{message}");
}
