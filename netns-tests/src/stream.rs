//! A TCP stream checked end to end: a sink in one namespace counts and
//! hashes (SHA-256) what arrives, a sender in another sends a
//! pseudo-random stream and hashes what it sent.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::topology::read;
use crate::{NetNs, Proc, wait_for};

/// The sink: accepts one connection on `port`, then prints `received
/// <bytes> <sha256>` once the sender has closed it.
const SINK: &str = "import hashlib, socket, sys\n\
     s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n\
     s.bind(('0.0.0.0', int(sys.argv[1])))\n\
     s.listen(1)\n\
     print('ready', flush=True)\n\
     s.settimeout(60)\n\
     c, _ = s.accept()\n\
     c.settimeout(60)\n\
     h, n = hashlib.sha256(), 0\n\
     while True:\n\
     \x20   b = c.recv(1 << 20)\n\
     \x20   if not b:\n\
     \x20       break\n\
     \x20   h.update(b); n += len(b)\n\
     print('received', n, h.hexdigest(), flush=True)\n";

/// Starts `script` with python3 in `ns` (its output in `work/<name>.log`)
/// with `args`, and waits until it prints `ready`.
pub fn start_script(
    ns: &NetNs,
    work: &Path,
    name: &str,
    script: &str,
    args: &[&str],
) -> io::Result<(Proc, PathBuf)> {
    let path = work.join(format!("{name}.py"));
    std::fs::write(&path, script)?;
    let log = work.join(format!("{name}.log"));
    let path = path.display().to_string();
    let mut argv = vec![path.as_str()];
    argv.extend_from_slice(args);
    let proc = ns.spawn("python3", &argv, Some(log.clone()))?;
    if !wait_for(Duration::from_secs(10), || read(&log).contains("ready")) {
        return Err(io::Error::other(format!(
            "{name} did not start:\n{}",
            read(&log)
        )));
    }
    Ok((proc, log))
}

/// Starts the hashing sink in `ns` on TCP `port`.
pub fn start_sink(ns: &NetNs, work: &Path, port: u16) -> io::Result<(Proc, PathBuf)> {
    start_script(ns, work, "sink", SINK, &[&port.to_string()])
}

/// Sends `bytes` pseudo-random bytes from `ns` to `addr:port` and returns
/// the SHA-256 of what was sent (hex), or what went wrong.
pub fn send(ns: &NetNs, addr: &str, port: u16, bytes: usize) -> Result<String, String> {
    let script = format!(
        "import hashlib, random, socket\n\
         rng = random.Random(7)\n\
         h = hashlib.sha256()\n\
         s = socket.create_connection(('{addr}', {port}), timeout=60)\n\
         left = {bytes}\n\
         while left:\n\
         \x20   b = rng.randbytes(min(left, 1 << 18))\n\
         \x20   s.sendall(b); h.update(b); left -= len(b)\n\
         s.shutdown(socket.SHUT_WR)\n\
         s.recv(1)\n\
         print(h.hexdigest())\n"
    );
    let out = ns
        .run("python3", &["-c", &script])
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "{:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Waits for the sink to finish and checks that it received `bytes` with
/// the hash `sent`; what it printed otherwise.
pub fn received_whole(sink: &mut Proc, log: &Path, bytes: usize, sent: &str) -> Result<(), String> {
    if !sink.wait_exit(Duration::from_secs(60)) {
        return Err(format!("the sink did not finish:\n{}", read(log)));
    }
    let got = read(log);
    if got.contains(&format!("received {bytes} {sent}")) {
        Ok(())
    } else {
        Err(format!(
            "the stream did not arrive whole (sent {bytes} bytes, sha256 {sent}):\n{got}"
        ))
    }
}

/// The count of packets the kernel took from user space on `dev` in `ns`
/// (a TUN device's `rx_packets`: one per write, a coalesced segment
/// counting once).
pub fn device_writes(ns: &NetNs, dev: &str) -> u64 {
    ns.run(
        "cat",
        &[&format!("/sys/class/net/{dev}/statistics/rx_packets")],
    )
    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    .unwrap_or_default()
    .parse()
    .unwrap_or(0)
}
