//! A broker in a child process: the test binary run again with an
//! environment variable naming the broker's configuration, executing only
//! the binary's `child_broker` test, which loads it with [`child_config`].
//! Each test binary that uses it defines that entry test itself, since the
//! child runs the test binary, not this library.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tether_config::broker::{BrokerConfig, BrokerFile};

/// The configuration the child's entry test runs: read from the file that
/// `env` names, or `None` when `env` is unset (the entry test then does
/// nothing, as in an ordinary test run).
pub fn child_config(env: &str) -> Option<BrokerConfig> {
    let path = std::env::var(env).ok()?;
    let text = std::fs::read_to_string(&path).unwrap();
    Some(
        BrokerFile::parse(&text, &path)
            .unwrap()
            .validate(&path)
            .unwrap(),
    )
}

/// The body of a child's entry test: runs the broker that `env` names
/// (see [`child_config`]), prints `READY <tunnel address>` once it serves,
/// then `ADMIN <admin API address>`, and serves until killed. Returns at
/// once when `env` is unset.
pub async fn serve_child(env: &str) {
    let Some(config) = child_config(env) else {
        return;
    };
    let running = tether_broker::run::start(config).await.unwrap();
    println!("READY {}", running.tunnel_addrs[0]);
    println!("ADMIN {}", running.admin_addr);
    std::future::pending::<()>().await;
}

/// Creates the broker data directory `data` holding the CA files of the
/// data directory `ca_from`: a CA file in the data directory is imported
/// when the store has none (brokers on etcd share the store's CA).
pub fn data_dir_with_ca(ca_from: &Path, data: &Path) {
    tether_pki::ca::create_private_dir(data).unwrap();
    for file in [tether_pki::ca::CA_CERT_FILE, tether_pki::ca::CA_KEY_FILE] {
        if ca_from.join(file).exists() {
            std::fs::copy(ca_from.join(file), data.join(file)).unwrap();
        }
    }
}

/// A broker in a child process, killed with `SIGKILL` when dropped. Its
/// entry test prints `READY <tunnel address>` once it serves.
pub struct ChildBroker {
    child: Child,
    /// The broker's tunnel address.
    pub addr: SocketAddr,
    /// Its data directory (the admin token is there).
    pub data: std::path::PathBuf,
    lines: mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
}

impl ChildBroker {
    /// Starts a broker with `extra` configuration and the CA of
    /// `ca_from`'s data directory, its configuration path passed in the
    /// environment variable `env`; returns once it serves.
    pub fn start(env: &str, extra: &str, ca_from: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        data_dir_with_ca(ca_from, &data);
        let text = format!(
            "data_dir = {data:?}\nlisten = [\"127.0.0.1:0\"]\nadvertised = [\"127.0.0.1\"]\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n[dns]\nlisten = [\"127.0.0.1:0\"]\n{extra}"
        );
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, text).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["child_broker", "--exact", "--nocapture", "--test-threads=1"])
            .env(env, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        // Lines are read by a thread, so that every wait is bounded; the
        // pipe closes if the child dies.
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let _ = tx.send(line);
            }
        });
        let mut child = ChildBroker {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            data,
            lines,
            _dir: dir,
        };
        let addr = child.line("READY ", Duration::from_secs(60));
        child.addr = addr.parse().unwrap();
        child
    }

    /// What follows `tag` on the next line that has it (the harness prints
    /// the test's name on the same line).
    pub fn line(&self, tag: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("the child broker printed {tag:?} within {within:?}"));
            if let Some((_, rest)) = line.split_once(tag) {
                return rest.trim().to_string();
            }
        }
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `kill -STOP`: the broker answers nothing and closes nothing, as a
    /// machine that lost power or its network (dropping it kills it).
    /// Returns once the process is stopped.
    pub fn freeze(&self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-STOP", &pid]).status().unwrap();
        assert!(status.success());
        // The state follows the command name (in parentheses) in
        // /proc/<pid>/stat: `T` once stopped.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next());
            if state == Some('T') {
                return;
            }
            assert!(Instant::now() < deadline, "the child broker stopped in 5 s");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// `kill -TERM`.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for ChildBroker {
    fn drop(&mut self) {
        self.kill();
    }
}
