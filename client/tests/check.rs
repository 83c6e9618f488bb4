//! `tether check-config` and `tether policy check`: a file is checked
//! before it is loaded, every problem named once with its fix.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

fn tether(args: &[&str], file: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(args)
        .arg(file)
        .env_remove("TETHER_LOG_FORMAT")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn check_config_refuses_lans_overlapping_the_published_cidr_each_other_or_the_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let file = dir.path().join("tether.toml");
    let head = format!(
        "state_dir = {:?}\npublished_cidr = \"203.0.113.0/24\"\nbrokers = [\"203.0.113.5\"]\n",
        state.display().to_string()
    );
    std::fs::write(
        &file,
        format!(
            "{head}lans = [\"203.0.113.0/25\", \"100.64.0.0/16\", \"192.168.1.0/24\", \"192.168.1.0/25\"]\n"
        ),
    )
    .unwrap();
    let out = tether(&["check-config"], &file);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("lans[0]: 203.0.113.0/25 overlaps the published CIDR 203.0.113.0/24"),
        "{err}"
    );
    assert!(
        err.contains("lans[3]: 192.168.1.0/25 overlaps lans[2] (192.168.1.0/24)"),
        "{err}"
    );
    assert!(
        !err.contains("lans[1]") && !err.contains("lans[2]:"),
        "{err}"
    );

    // The overlay the site learned at its last session (the state
    // directory's record of the broker's routes) is checked too.
    std::fs::write(
        state.join("tunnel-routes"),
        "100.64.0.0/10\nfd7a:115c:a1e0::/48\n",
    )
    .unwrap();
    std::fs::write(
        &file,
        format!("{head}lans = [\"192.168.1.0/24\", \"100.64.0.0/16\"]\n"),
    )
    .unwrap();
    let out = tether(&["check-config"], &file);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("lans[1]: 100.64.0.0/16 overlaps 100.64.0.0/10, which the broker routes through the tunnel"),
        "{err}"
    );
    assert!(!err.contains("lans[0]"), "{err}");

    std::fs::write(&file, format!("{head}lans = [\"192.168.1.0/24\"]\n")).unwrap();
    let out = tether(&["check-config"], &file);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).ends_with(": ok\n"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn policy_check_accepts_a_file_of_only_policy_and_names_each_fix_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, "[policy]\n").unwrap();
    let out = tether(&["policy", "check"], &file);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).ends_with(": ok, 0 rules, 0 groups, backends = region\n"),
        "{}",
        text(&out.stdout)
    );

    std::fs::write(
        &file,
        r#"[policy]
backends = "rules"
[policy.groups]
labs = ["lab-1"]
[[policy.allow]]
name = "labs"
from = ["group:labs"]
to = ["lan-of:group:labs"]
ports = ["tcp/443", "icmp"]
"#,
    )
    .unwrap();
    let out = tether(&["policy", "check"], &file);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).ends_with(": ok, 1 rules, 1 groups, backends = rules\n"),
        "{}",
        text(&out.stdout)
    );

    std::fs::write(
        &file,
        r#"[policy]
[[policy.allow]]
name = "bad"
from = ["host:x"]
to = ["sites"]
ports = ["tcp/99999"]
"#,
    )
    .unwrap();
    let out = tether(&["policy", "check"], &file);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let selector = err
        .lines()
        .find(|l| l.contains("policy.allow[0] (\"bad\").from[0]"))
        .unwrap_or_else(|| panic!("{err}"));
    let ports = err
        .lines()
        .find(|l| l.contains("policy.allow[0] (\"bad\").ports[0]"))
        .unwrap_or_else(|| panic!("{err}"));
    for (line, fix) in [(selector, "gateway:<id>"), (ports, "udp/53")] {
        assert_eq!(line.matches(fix).count(), 1, "the fix twice: {line}");
        assert!(line.contains("(fix: write"), "{line}");
    }
}
