//! `--log-format json` and `TETHER_LOG_FORMAT=json`: standard error is one
//! JSON object per line, the plain-words message in `message`, even for the
//! error that ends a command.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn json_lines(stderr: &[u8]) -> Vec<serde_json::Value> {
    let text = String::from_utf8_lossy(stderr);
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect()
}

#[test]
fn a_failing_command_logs_its_error_as_one_json_object() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    for (args, env) in [(vec!["--log-format", "json"], None), (vec![], Some("json"))] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
        cmd.args(&args)
            .arg("up")
            .arg("--config")
            .arg(&missing)
            .env_remove("TETHER_LOG_FORMAT");
        if let Some(format) = env {
            cmd.env("TETHER_LOG_FORMAT", format);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        let lines = json_lines(&out.stderr);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["level"], "ERROR", "{lines:?}");
        let message = lines[0]["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("no configuration at {}", missing.display())),
            "{message}"
        );
    }
}

#[test]
fn text_stays_the_default_and_an_unknown_format_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["up", "--config", "/nonexistent/tether.toml"])
        .env_remove("TETHER_LOG_FORMAT")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.starts_with("tether: no configuration at /nonexistent/tether.toml"),
        "{text}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["--log-format", "yaml", "up"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("\"text\" or \"json\""), "{text}");
}
