//! A real etcd server for tests: Debian's `etcd-server` started on
//! loopback ports with a temporary data directory, ready once its client
//! API answers, killed (by its PID) on drop. Shared by the broker's store
//! tests and the cross-crate tests (`tests/tests/etcd_store.rs`).
//!
//! Without `etcd` on PATH, [`EtcdServer::start`] prints "skipped" and
//! returns `None`, except under CI (`CI` set), where it panics.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tether_config::broker::{EtcdConfig, EtcdTls};

/// How long etcd may take to answer after it was started.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// The etcd binary, or `None` (after printing "skipped") when it is not
/// installed. Under CI a missing etcd fails the test.
fn etcd_binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("etcd"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "etcd is not on PATH; CI must install Debian's etcd-server"
        );
        eprintln!("skipped: etcd is not installed (apt-get install etcd-server)");
    }
    found
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// TLS material for a server started with client certificate checks.
struct TlsFiles {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

/// An etcd server on loopback, killed (by its PID) on drop.
pub struct EtcdServer {
    child: Child,
    binary: PathBuf,
    client_url: String,
    peer_url: String,
    /// The data directory and the log.
    dir: tempfile::TempDir,
    tls: Option<TlsFiles>,
}

/// Starts etcd (output appended to `dir/etcd.log`).
fn spawn(
    binary: &Path,
    dir: &Path,
    client_url: &str,
    peer_url: &str,
    tls: Option<&TlsFiles>,
) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("etcd.log"))
        .unwrap();
    let mut cmd = Command::new(binary);
    cmd.arg("--name=default")
        .arg(format!("--data-dir={}", dir.join("data").display()))
        .arg(format!("--listen-client-urls={client_url}"))
        .arg(format!("--advertise-client-urls={client_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=default={peer_url}"))
        .arg("--log-level=warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    if let Some(files) = tls {
        cmd.arg(format!("--cert-file={}", files.server_cert.display()))
            .arg(format!("--key-file={}", files.server_key.display()))
            .arg(format!("--trusted-ca-file={}", files.ca.display()))
            .arg("--client-cert-auth");
    }
    cmd.spawn().unwrap()
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("etcd.log")).unwrap_or_default()
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl EtcdServer {
    /// Starts etcd and waits until it answers; `None` when etcd is not
    /// installed (outside CI).
    pub fn start(tls: bool) -> Option<Self> {
        let binary = etcd_binary()?;
        let dir = tempfile::tempdir().unwrap();
        let tls = tls.then(|| write_tls_files(dir.path()));
        let scheme = if tls.is_some() { "https" } else { "http" };
        // Ports are picked free and bound by etcd right after; a rare
        // collision with a parallel test shows as etcd exiting, and is
        // retried on new ports.
        for _ in 0..5 {
            let (client_port, peer_port) = (free_port(), free_port());
            let client_url = format!("{scheme}://127.0.0.1:{client_port}");
            let peer_url = format!("http://127.0.0.1:{peer_port}");
            let mut child = spawn(&binary, dir.path(), &client_url, &peer_url, tls.as_ref());
            match wait_ready(&mut child, &client_url, tls.as_ref()) {
                Ready::Yes => {
                    return Some(EtcdServer {
                        child,
                        binary,
                        client_url,
                        peer_url,
                        dir,
                        tls,
                    });
                }
                Ready::Exited => {
                    // Most likely a port taken in between: new ports.
                    let _ = std::fs::remove_dir_all(dir.path().join("data"));
                }
                Ready::TimedOut => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        panic!(
            "etcd did not start (answering within {READY_WITHIN:?}); its log:\n{}",
            log_of(dir.path())
        );
    }

    /// Kills etcd and starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.start_again();
    }

    /// Kills the etcd process (`kill -9`, by its PID) and waits for it:
    /// etcd is down until [`EtcdServer::start_again`].
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts etcd again after [`EtcdServer::kill`], on the same ports and
    /// data, and waits until it answers.
    pub fn start_again(&mut self) {
        // The ports may be busy for a moment after the kill.
        for _ in 0..50 {
            let mut child = spawn(
                &self.binary,
                self.dir.path(),
                &self.client_url,
                &self.peer_url,
                self.tls.as_ref(),
            );
            match wait_ready(&mut child, &self.client_url, self.tls.as_ref()) {
                Ready::Yes => {
                    self.child = child;
                    return;
                }
                Ready::Exited => std::thread::sleep(Duration::from_millis(100)),
                Ready::TimedOut => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        panic!(
            "etcd did not restart; its log:\n{}",
            log_of(self.dir.path())
        );
    }

    /// Stops the etcd process (SIGSTOP): it keeps its sockets open and
    /// answers nothing, like a hung server.
    pub fn pause(&self) {
        self.signal("-STOP");
        // kill returns once the signal is queued; a thread still running
        // could answer one more request. Wait until every thread of the
        // process is stopped.
        let tasks = format!("/proc/{}/task", self.child.id());
        let stopped = || {
            std::fs::read_dir(&tasks).is_ok_and(|dir| {
                dir.flatten().all(|t| {
                    std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
                        // The state follows the command name in parentheses.
                        stat.rsplit_once(") ")
                            .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
                    })
                })
            })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !stopped() {
            assert!(
                std::time::Instant::now() < deadline,
                "etcd did not stop within 5 s"
            );
            std::thread::yield_now();
        }
    }

    /// Lets a paused etcd process go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(signal)
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} failed");
    }

    /// The client URL.
    pub fn url(&self) -> &str {
        &self.client_url
    }

    /// The `[ca]` section naming the key-encryption key file every broker
    /// of this cluster's deployment shares (created on first call).
    pub fn ca_toml(&self) -> String {
        let path = self.dir.path().join("ca-kek");
        if !path.exists() {
            tether_pki::kek::Kek::generate(&path)
                .unwrap()
                .write_new()
                .unwrap();
        }
        format!("[ca]\nkey_encryption_key_file = {path:?}\n")
    }

    /// The broker configuration tables for this server under `prefix`:
    /// the deployment's `[ca]` key-encryption key and `[store]` on etcd.
    pub fn broker_toml(&self, prefix: &str) -> String {
        format!(
            "{}[store]\nbackend = \"etcd\"\n[store.etcd]\nendpoints = [{:?}]\nprefix = {:?}\n",
            self.ca_toml(),
            self.client_url,
            prefix
        )
    }

    /// A store configuration for this server under `prefix`.
    pub fn config(&self, prefix: &str) -> EtcdConfig {
        EtcdConfig {
            endpoints: vec![self.client_url.clone()],
            prefix: prefix.to_string(),
            timeout: Duration::from_secs(5),
            tls: self.tls.as_ref().map(|t| EtcdTls {
                ca_file: t.ca.clone(),
                identity: Some((t.client_cert.clone(), t.client_key.clone())),
            }),
        }
    }
}

impl EtcdServer {
    /// Compacts etcd's history up to its present revision (physically):
    /// a watch that resumes at an older revision is told it was
    /// compacted. Returns that revision.
    pub fn compact(&self) -> i64 {
        let revision = self.revision();
        let url = self.client_url.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let mut client = etcd_client::Client::connect([url], None).await.unwrap();
            client
                .compact(
                    revision,
                    Some(etcd_client::CompactionOptions::new().with_physical()),
                )
                .await
                .unwrap();
        });
        revision
    }

    /// etcd's present revision (one more for every write).
    pub fn revision(&self) -> i64 {
        assert!(self.tls.is_none(), "revision() talks plain HTTP");
        let url = self.client_url.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let mut client = etcd_client::Client::connect([url], None).await.unwrap();
            client
                .get("/", None)
                .await
                .unwrap()
                .header()
                .unwrap()
                .revision()
        })
    }
}

/// A TCP relay on loopback between the clients that dial it and an etcd
/// server (plain HTTP), which a test can cut (close every connection
/// and refuse new ones until [`Gate::reopen`]) or hold (stop passing the
/// clients' bytes on to etcd, while etcd's still reach the clients:
/// requests get no answer, a watch still delivers its events). Its
/// threads end when it is dropped.
pub struct Gate {
    addr: std::net::SocketAddr,
    state: std::sync::Arc<GateState>,
}

#[derive(Default)]
struct GateState {
    cut: std::sync::atomic::AtomicBool,
    held: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
    conns: std::sync::Mutex<Vec<std::net::TcpStream>>,
}

impl GateState {
    fn close_all(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Gate {
    /// A relay to `server`.
    pub fn new(server: &EtcdServer) -> Gate {
        use std::sync::atomic::Ordering;
        let target = server
            .client_url
            .strip_prefix("http://")
            .expect("a gate relays plain HTTP")
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = std::sync::Arc::new(GateState::default());
        let shared = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if shared.cut.load(Ordering::SeqCst) {
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(upstream) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                {
                    let mut conns = shared.conns.lock().unwrap();
                    conns.push(client.try_clone().unwrap());
                    conns.push(upstream.try_clone().unwrap());
                }
                let relay = |mut from: std::net::TcpStream,
                             mut to: std::net::TcpStream,
                             holdable: bool,
                             state: std::sync::Arc<GateState>| {
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            while holdable
                                && state.held.load(Ordering::SeqCst)
                                && !state.stop.load(Ordering::SeqCst)
                            {
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = from.shutdown(std::net::Shutdown::Both);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                };
                relay(
                    client.try_clone().unwrap(),
                    upstream.try_clone().unwrap(),
                    true,
                    shared.clone(),
                );
                relay(upstream, client, false, shared.clone());
            }
        });
        Gate { addr, state }
    }

    /// The URL clients dial.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every connection through the gate and refuses new ones.
    pub fn cut(&self) {
        self.state
            .cut
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.state.close_all();
    }

    /// Lets connections through again after [`Gate::cut`].
    pub fn reopen(&self) {
        self.state
            .cut
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stops passing the clients' bytes on to etcd (kept, not lost).
    pub fn hold(&self) {
        self.state
            .held
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Passes the clients' bytes held since [`Gate::hold`], and the next.
    pub fn release(&self) {
        self.state
            .held
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.state
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.state.close_all();
        // Wakes the accepting thread, which then sees `stop`.
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

enum Ready {
    Yes,
    Exited,
    TimedOut,
}

/// Polls the client API until etcd answers a read.
fn wait_ready(child: &mut Child, client_url: &str, tls: Option<&TlsFiles>) -> Ready {
    let deadline = Instant::now() + READY_WITHIN;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return Ready::Exited;
        }
        let answered = runtime.block_on(async {
            let mut options = etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_millis(500))
                .with_timeout(Duration::from_millis(500));
            if let Some(tls) = tls {
                options = options.with_tls(
                    etcd_client::TlsOptions::new()
                        .ca_certificate(etcd_client::Certificate::from_pem(
                            std::fs::read(&tls.ca).unwrap(),
                        ))
                        .identity(etcd_client::Identity::from_pem(
                            std::fs::read(&tls.client_cert).unwrap(),
                            std::fs::read(&tls.client_key).unwrap(),
                        )),
                );
            }
            let attempt = async {
                let mut client = etcd_client::Client::connect([client_url], Some(options)).await?;
                client.get("/ready", None).await
            };
            matches!(
                tokio::time::timeout(Duration::from_secs(1), attempt).await,
                Ok(Ok(_))
            )
        });
        if answered {
            return Ready::Yes;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ready::TimedOut
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate.
fn write_tls_files(dir: &Path) -> TlsFiles {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, SanType,
    };
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "etcd test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |name: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf("etcd", ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert, client_key) = leaf("tether-broker", ExtendedKeyUsagePurpose::ClientAuth);
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    TlsFiles {
        ca: write("ca.pem", &ca_cert.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client.key", &client_key),
    }
}
