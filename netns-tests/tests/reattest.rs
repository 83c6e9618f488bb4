//! A site offline for longer than its certificate lives, with the real
//! binaries: the broker and the agent run with their clocks moved days
//! ahead (libfaketime), as after a long power-off, in one namespace on
//! loopback.
//!
//! ```text
//!  ns tt-reatt-*:  tether up ──(127.0.0.1:443, HTTP/3)──► tether-broker
//!                  (both at real time + 30 days, then + 130 days, + 35 days)
//! ```
//!
//! After 30 days switched off the agent re-attests by itself and gets its
//! address back; 100 days after that (past the 90-day window) and once
//! revoked, it is refused, and its log and `tether doctor` say why in
//! plain words.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use tether_netns_tests::{NetNs, Proc, binary, require_root, wait_for};

/// Debian's libfaketime (package `faketime`).
fn libfaketime() -> PathBuf {
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ];
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("libfaketime is missing: install Debian's faketime package (.ci/run does)")
}

/// Arguments for `env` running `program` with the wall clock `offset`
/// ahead (monotonic time untouched, so timers behave).
fn shifted(offset: &str, program: &Path, args: &[&str]) -> Vec<String> {
    let mut all = vec![
        format!("LD_PRELOAD={}", libfaketime().display()),
        format!("FAKETIME={offset}"),
        "FAKETIME_DONT_FAKE_MONOTONIC=1".to_string(),
        program.display().to_string(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    all
}

struct Lab {
    ns: NetNs,
    dir: tempfile::TempDir,
    config: String,
    state: String,
}

impl Lab {
    fn new() -> Self {
        let ns = NetNs::new("reatt").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("broker.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\nlisten = [\"127.0.0.1:443\"]\nadvertised = [\"127.0.0.1\"]\n",
                dir.path().join("broker")
            ),
        )
        .unwrap();
        let state = dir.path().join("site").display().to_string();
        Self {
            ns,
            config: config.display().to_string(),
            state,
            dir,
        }
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `program` in the namespace with the clock `offset` ahead.
    fn spawn(&self, offset: &str, program: &str, args: &[&str], log: &str) -> Proc {
        let args = shifted(offset, &binary(program), args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ns.spawn("env", &args, Some(self.log(log))).unwrap()
    }

    /// Runs a command to its end with the clock `offset` ahead; its output.
    fn run(&self, offset: &str, program: &str, args: &[&str]) -> String {
        let args = shifted(offset, &binary(program), args);
        let out = self.ns.command("env").args(&args).output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Starts the broker and waits until its admin API answers.
    fn broker(&self, offset: &str) -> Proc {
        let broker = self.spawn(
            offset,
            "tether-broker",
            &["run", "-c", &self.config],
            "broker.log",
        );
        assert!(
            wait_for(Duration::from_secs(20), || self
                .run(offset, "tether-broker", &["sites", "-c", &self.config])
                .contains("SITE")),
            "the broker did not come up:\n{}",
            broker.log()
        );
        broker
    }

    /// Runs `tether up` until its log contains `needle`; returns the log.
    fn up_until(&self, offset: &str, needle: &str, log: &str) -> String {
        let mut agent = self.spawn(offset, "tether", &["up", "--state-dir", &self.state], log);
        let seen = wait_for(Duration::from_secs(30), || agent.log().contains(needle));
        let text = agent.log();
        agent.kill();
        assert!(seen, "no {needle:?} in the agent's log:\n{text}");
        text
    }
}

#[test]
fn a_site_back_after_30_days_reattests_by_itself_and_is_refused_past_the_window_or_revoked() {
    if !require_root() {
        return;
    }
    let lab = Lab::new();
    let (mut broker, address) = enrolled(&lab);
    broker.kill();

    // 30 days later (the certificate lives one): back by itself, with the
    // same address.
    let mut broker = lab.broker("+30d");
    let log = lab.up_until("+30d", "this site is reachable as", "up-30d.log");
    assert!(
        log.contains("the broker renewed this site's certificate by re-attestation"),
        "{log}"
    );
    assert!(
        log.contains(&format!("this site is reachable as {address} ")),
        "{log}"
    );
    broker.kill();

    // 100 days later: 99 days past the certificate of day 30, the window
    // is 90.
    let mut broker = lab.broker("+130d");
    let log = lab.up_until("+130d", "asking again in 10 minutes", "up-130d.log");
    assert!(
        log.contains("the broker refused to renew this site's certificate: this site has been offline for at least 99 days"),
        "{log}"
    );
    assert!(
        log.contains("longer than the broker's re-attestation window of 90 days"),
        "{log}"
    );
    let doctor = lab.run("+130d", "tether", &["doctor", "--state-dir", &lab.state]);
    assert!(
        doctor.contains("FAIL  re-attestation     this site has been offline for at least 99 days"),
        "{doctor}"
    );
    broker.kill();

    // Day 35: four days past the certificate of day 30, within the window,
    // but revoked.
    let _broker = lab.broker("+35d");
    let out = lab.run(
        "+35d",
        "tether-broker",
        &[
            "site",
            "revoke",
            "-c",
            &lab.config,
            "--site",
            "lab-1",
            "--region",
            "local",
        ],
    );
    assert!(out.contains("revoked"), "{out}");
    let log = lab.up_until("+35d", "asking again in 10 minutes", "up-revoked.log");
    assert!(
        log.contains("the broker refused to renew this site's certificate: this site was revoked by the operator on "),
        "{log}"
    );
    let doctor = lab.run("+35d", "tether", &["doctor", "--state-dir", &lab.state]);
    assert!(
        doctor.contains("FAIL  re-attestation     this site was revoked by the operator on"),
        "{doctor}"
    );
}

/// Starts a broker at the real time and enrolls `lab-1`; returns the broker
/// and the site's address.
fn enrolled(lab: &Lab) -> (Proc, String) {
    let broker = lab.broker("+0");
    let out = lab.run(
        "+0",
        "tether-broker",
        &[
            "token",
            "create",
            "-c",
            &lab.config,
            "--site",
            "lab-1",
            "--region",
            "local",
        ],
    );
    let code = out
        .split_whitespace()
        .find(|w| w.starts_with("tt1-"))
        .unwrap_or_else(|| panic!("no code in:\n{out}"))
        .to_string();
    let out = lab.run(
        "+0",
        "tether",
        &[
            "enroll",
            "--broker",
            "127.0.0.1",
            "--token",
            &code,
            "--state-dir",
            &lab.state,
        ],
    );
    assert!(out.contains("tether up"), "{out}");
    let sites = lab.run("+0", "tether-broker", &["sites", "-c", &lab.config]);
    let address = sites
        .split_whitespace()
        .find(|w| w.starts_with("100.64.") && w.ends_with("/32"))
        .unwrap_or_else(|| panic!("no address in:\n{sites}"))
        .trim_end_matches("/32")
        .to_string();
    (broker, address)
}

/// The agent runs with its clock wrong against a broker on the real time,
/// as on a hospital host without NTP: 3 days ahead (the site connects and
/// its log says to fix the clock; its certificate, expired by its own
/// clock, is renewed once, not again and again), 2 hours ahead (connects)
/// and behind (refused), 30 minutes behind (it connects: certificates are
/// backdated an hour) and 2 days behind (TLS fails here; the log names the
/// clock, never the certificate or a new enrollment). `tether doctor` agrees at each offset.
#[test]
fn a_site_whose_clock_is_wrong_says_so_in_its_log() {
    if !require_root() {
        return;
    }
    let lab = Lab::new();
    let (_broker, address) = enrolled(&lab);
    let reachable = format!("this site is reachable as {address} ");

    // 3 days ahead.
    let mut agent = lab.spawn(
        "+3d",
        "tether",
        &["up", "--state-dir", &lab.state],
        "up-ahead.log",
    );
    let fix = "this host's clock is 3 days ahead of the broker's: fix the clock (NTP)";
    let seen = wait_for(Duration::from_secs(30), || agent.log().contains(fix));
    // Renewal (the certificate looks past its half-life here) happens
    // once: the renewed certificate is timed from when it was stored.
    std::thread::sleep(Duration::from_secs(5));
    let log = agent.log();
    agent.kill();
    assert!(seen, "no {fix:?} in the agent's log:\n{log}");
    assert!(log.contains(&reachable), "{log}");
    assert!(log.matches("certificate renewed").count() <= 2, "{log}");
    assert!(
        !log.contains("enroll again") && !log.contains("new token"),
        "{log}"
    );
    let doctor = lab.run("+3d", "tether", &["doctor", "--state-dir", &lab.state]);
    assert!(
        doctor.contains("verdict: this site can connect"),
        "{doctor}"
    );
    assert!(doctor.contains("fix the clock (NTP)"), "{doctor}");
    assert!(!doctor.contains("tether enroll"), "{doctor}");

    // 2 hours either way: ahead connects and says so; behind, past the
    // hour certificates are backdated, is refused and names the clock.
    let log = lab.up_until(
        "+2h",
        "2 h ahead of the broker's: fix the clock (NTP)",
        "up-2h.log",
    );
    assert!(log.contains(&reachable), "{log}");
    let doctor = lab.run("+2h", "tether", &["doctor", "--state-dir", &lab.state]);
    assert!(
        doctor.contains("verdict: this site can connect"),
        "{doctor}"
    );
    assert!(doctor.contains("fix the clock (NTP)"), "{doctor}");
    let log = lab.up_until("-2h", "retrying in", "up-minus-2h.log");
    assert!(
        log.contains("behind the broker's (the broker's certificate is not valid yet by it); fix the clock (NTP)"),
        "{log}"
    );
    assert!(
        !log.contains("enroll again") && !log.contains("new token"),
        "{log}"
    );

    // 30 minutes behind: within the hour certificates are backdated.
    let mut agent = lab.spawn(
        "-30m",
        "tether",
        &["up", "--state-dir", &lab.state],
        "up-30m.log",
    );
    let behind = "behind the broker's: fix the clock (NTP)";
    let seen = wait_for(Duration::from_secs(30), || agent.log().contains(behind));
    let log = agent.log();
    agent.kill();
    assert!(seen, "no {behind:?} in the agent's log:\n{log}");
    assert!(log.contains(&reachable), "{log}");
    let doctor = lab.run("-30m", "tether", &["doctor", "--state-dir", &lab.state]);
    assert!(
        doctor.contains("verdict: this site can connect"),
        "{doctor}"
    );

    // 2 days behind: the broker's certificate is not valid yet here.
    let log = lab.up_until("-2d", "retrying in", "up-behind.log");
    assert!(
        log.contains("hours behind the broker's (the broker's certificate is not valid yet by it); fix the clock (NTP)"),
        "{log}"
    );
    assert!(
        !log.contains("enroll again") && !log.contains("new token"),
        "{log}"
    );
    assert!(!log.contains(&reachable), "{log}");
    let doctor = lab.run("-2d", "tether", &["doctor", "--state-dir", &lab.state]);
    assert!(
        doctor.contains("verdict: this site cannot connect"),
        "{doctor}"
    );
    assert!(doctor.contains("fix the clock (NTP)"), "{doctor}");
    assert!(!doctor.contains("tether enroll"), "{doctor}");
}
