//! A network namespace of the calling thread, for tests of code that
//! changes devices and routes: the namespace (with what was made in it)
//! goes when the thread ends, whatever the test's outcome. Built for this
//! crate's tests and with the `testing` feature (the agent's and the
//! gateway's tests); helpers of tests, they panic on failure.
#![allow(clippy::expect_used)]

/// Runs the future `f` makes to completion on a thread of its own, in a
/// new network namespace, on a current-thread runtime; `None` (the test
/// skipped) when not root, which a CI run (`CI` set) refuses.
pub fn run<F, Fut>(f: F) -> Option<Fut::Output>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future,
    Fut::Output: Send + 'static,
{
    if !nix::unistd::geteuid().is_root() {
        assert!(std::env::var_os("CI").is_none(), "CI must run this as root");
        println!("skipped: needs root");
        return None;
    }
    let thread = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare the network");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(f())
    });
    match thread.join() {
        Ok(value) => Some(value),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A TUN device named `name`, up, in the namespace of the calling thread
/// (gone when the returned device is dropped).
pub fn tun_device(name: &str) -> tun_rs::SyncDevice {
    tun_rs::DeviceBuilder::new()
        .name(name)
        .enable(true)
        .build_sync()
        .expect("a TUN device")
}

/// Runs `ip args` in the network namespace of the calling thread; panics
/// unless it succeeds. Returns its output.
pub fn ip(args: &[&str]) -> String {
    let ns = format!(
        "--net=/proc/{}/task/{}/ns/net",
        std::process::id(),
        nix::unistd::gettid()
    );
    let out = std::process::Command::new("nsenter")
        .arg(ns)
        .arg("ip")
        .args(args)
        .output()
        .expect("nsenter runs");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The destinations of the routes `ip -4` and `ip -6 route show <args>`
/// lists (link-local and multicast ones left out), sorted.
pub fn routes(args: &[&str]) -> Vec<String> {
    let mut routes: Vec<String> = ["-4", "-6"]
        .iter()
        .flat_map(|family| {
            let mut command = vec![*family, "-o", "route", "show"];
            command.extend_from_slice(args);
            ip(&command)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                .filter(|p| !p.starts_with("fe80") && !p.starts_with("multicast"))
                .collect::<Vec<_>>()
        })
        .collect();
    routes.sort();
    routes
}
