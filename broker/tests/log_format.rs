//! `tether-broker --log-format json run`: a running broker logs one JSON
//! object per line on standard error, the plain-words message in
//! `message`, while its banner stays on standard output.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

#[test]
fn a_running_broker_logs_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nlisten = [\"127.0.0.1:0\"]\nadvertised = [\"127.0.0.1\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n[dns]\nlisten = [\"127.0.0.1:0\"]\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether-broker"))
        .args(["run", "-c"])
        .arg(&config)
        .env("TETHER_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The banner's last line says the broker is serving.
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            let _ = child.kill();
            panic!("the broker stopped before serving:\n{banner}");
        }
        banner.push_str(&line);
        if line.contains("tether up") {
            break;
        }
    }
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(child.wait().unwrap().success(), "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "shutting down" && l["level"] == "INFO"),
        "{stderr}"
    );
}
