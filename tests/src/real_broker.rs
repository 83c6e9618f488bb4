//! The real `tether-broker` binary as an operator runs it: `tether-broker
//! run -c FILE` in a child process (killed when dropped), its addresses
//! read from the banner it prints, its admin API reached with the token in
//! its data directory; and the `tether-broker` and `tether` commands run
//! against it, each bounded in time.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use tether::state_dir::StateDir;
use tether_proto::api::{SiteInfo, TokenRequest, TokenResponse};
use tether_shell::operator::AdminClient;

use crate::{Tunnel, binary, connect_trusting};

/// How long a command run by [`run_bounded`] may take.
const COMMAND_LIMIT: Duration = Duration::from_secs(30);

/// Writes `dir/broker.toml`: a broker on loopback (tunnel, admin API and
/// DNS on ports of their own) with the data directory `data`, and `extra`
/// appended (`[store]`, `[ca]`, ...). Returns its path.
pub fn write_config(dir: &Path, data: &Path, extra: &str) -> PathBuf {
    write_config_listening(dir, data, "127.0.0.1:0", extra)
}

/// As [`write_config`], the tunnel listening on `listen` (to start a broker
/// again at the address its sites know).
pub fn write_config_listening(dir: &Path, data: &Path, listen: &str, extra: &str) -> PathBuf {
    let path = dir.join("broker.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = {data:?}\nlisten = [{listen:?}]\nadvertised = [\"127.0.0.1\"]\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n[dns]\nlisten = [\"127.0.0.1:0\"]\n{extra}"
        ),
    )
    .unwrap();
    path
}

/// The address in a banner line `  <label>  <address> (...)`.
fn banner_addr(banner: &str, label: &str) -> SocketAddr {
    let line = banner
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label:?} in the banner:\n{banner}"));
    let word = line.split_whitespace().next().unwrap();
    word.trim_start_matches("http://").parse().unwrap()
}

/// `tether-broker run` in a child process, killed when dropped.
pub struct RealBroker {
    child: Child,
    /// The tunnel address sites dial.
    pub tunnel: SocketAddr,
    /// The admin API's address.
    pub admin: SocketAddr,
    /// The data directory (the admin token is there).
    pub data: PathBuf,
}

impl RealBroker {
    /// Runs `tether-broker run -c config` until its banner says it serves;
    /// `Err` with what it printed (and its exit status) if it stopped
    /// first. `data` is the data directory the configuration names.
    pub fn start(config: &Path, data: &Path) -> Result<Self, String> {
        let mut child = Command::new(binary("tether-broker"))
            .args(["run", "-c"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Both pipes are read by threads, so the broker never blocks on a
        // full pipe and every wait here is bounded. What it logs goes on
        // to the test's own stderr as it comes, and is kept for an error.
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let _ = tx.send(line);
            }
        });
        let errors = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let sink = errors.clone();
        let stderr_done = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    return;
                }
                let text = String::from_utf8_lossy(&buf[..n]);
                eprint!("{text}");
                sink.lock().unwrap().push_str(&text);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut banner = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    banner.push_str(&line);
                    banner.push('\n');
                    if line.contains("tether up") {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().unwrap();
                    let _ = stderr_done.join();
                    let errors = errors.lock().unwrap().clone();
                    return Err(format!("{status}: {banner}{errors}"));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("tether-broker did not serve within 60 s:\n{banner}");
                }
            }
        }
        Ok(Self {
            tunnel: banner_addr(&banner, "tunnel"),
            admin: banner_addr(&banner, "admin API"),
            data: data.to_path_buf(),
            child,
        })
    }

    /// The admin token from the data directory.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data.join("admin.token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// A client of the admin API (blocking: call it off the runtime's
    /// workers, or where blocking a moment does not matter).
    pub fn client(&self) -> AdminClient {
        AdminClient::new(&format!("http://{}", self.admin), &self.admin_token())
    }

    /// An enrollment code for `site` of region `local`, made through the
    /// admin API (blocking).
    pub fn token(&self, site: &str) -> String {
        let created: TokenResponse = self
            .client()
            .post(
                "/v1/tokens",
                &TokenRequest {
                    site: site.parse().unwrap(),
                    region: "local".parse().unwrap(),
                    ttl: None,
                },
            )
            .unwrap();
        created.code
    }

    /// A code for `site` of region `local`, and the site enrolled with it
    /// into `state` through the agent's enrollment path.
    pub async fn enroll(&self, site: &str, state: &StateDir) {
        let client = self.client();
        let site: tether_proto::ids::SiteId = site.parse().unwrap();
        let request = TokenRequest {
            site,
            region: "local".parse().unwrap(),
            ttl: None,
        };
        let created: TokenResponse =
            tokio::task::spawn_blocking(move || client.post("/v1/tokens", &request).unwrap())
                .await
                .unwrap();
        tether::enroll::enroll(&self.tunnel.to_string(), &created.code, state, false, None)
            .await
            .unwrap();
    }

    /// Every site, as `GET /v1/sites` says (blocking).
    pub fn sites(&self) -> Vec<SiteInfo> {
        self.client().get("/v1/sites").unwrap()
    }

    /// Every site's addresses, as `GET /v1/sites` says (blocking).
    pub fn addresses(&self) -> BTreeMap<String, Vec<ipnet::IpNet>> {
        self.sites()
            .into_iter()
            .map(|s| (s.site.to_string(), s.addresses))
            .collect()
    }

    /// Runs `tether-broker ARGS` against this broker (its admin address
    /// in `TETHER_ADMIN_URL`): success, and what it printed.
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        cli(args, Some(self.admin))
    }

    /// Runs the agent's `tether ARGS` against this broker's admin API
    /// (`TETHER_ADMIN_URL`, `TETHER_ADMIN_TOKEN`): success, stdout, stderr.
    pub fn tether(&self, args: &[&str]) -> (bool, String, String) {
        let mut command = Command::new(binary("tether"));
        command
            .args(args)
            .env("TETHER_ADMIN_URL", format!("http://{}", self.admin))
            .env("TETHER_ADMIN_TOKEN", self.admin_token());
        let out = run_bounded(command);
        (out.success, out.stdout, out.stderr)
    }

    /// SIGTERM, and waits (30 s at most) for the process to exit: its
    /// store is closed once this returns.
    pub fn stop(mut self) {
        let term = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(term.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the broker did not stop in 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RealBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a command did: its exit status and output.
#[derive(Debug)]
pub struct Output {
    /// Whether it exited 0.
    pub success: bool,
    /// Its exit code (`None` when a signal ended it).
    pub code: Option<i32>,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// Runs `command` with no standard input, its output captured; kills it
/// and panics after 30 s.
pub fn run_bounded(mut command: Command) -> Output {
    let what = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The pipes are drained by threads, so a chatty command never blocks
    // on a full pipe while it is waited for.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = pipe.read_to_end(&mut out);
            String::from_utf8_lossy(&out).to_string()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + COMMAND_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} ran for more than {COMMAND_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        success: status.success(),
        code: status.code(),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Runs `tether-broker ARGS` (bounded to 30 s), with `admin` as
/// `TETHER_ADMIN_URL` if given: success, stdout followed by stderr.
pub fn cli(args: &[&str], admin: Option<SocketAddr>) -> (bool, String) {
    let out = broker_command(args, admin);
    (out.success, format!("{}{}", out.stdout, out.stderr))
}

/// Runs `tether-broker ARGS` (bounded to 30 s), with `admin` as
/// `TETHER_ADMIN_URL` if given.
pub fn broker_command(args: &[&str], admin: Option<SocketAddr>) -> Output {
    let mut command = Command::new(binary("tether-broker"));
    command.args(args);
    if let Some(admin) = admin {
        command.env("TETHER_ADMIN_URL", format!("http://{admin}"));
    }
    run_bounded(command)
}

/// A configured tunnel of the site whose state is `state`, at `broker`,
/// with the certificate and trust bundle it has.
pub async fn tunnel_at(broker: SocketAddr, state: &StateDir) -> Tunnel {
    let c = state.credentials().unwrap();
    let client = connect_trusting(broker, &c.bundle, Some((c.chain, c.key)))
        .await
        .unwrap();
    let mut t = Tunnel::open(client).await.unwrap();
    t.configured().await;
    t
}
