//! UDP sockets of tunnels: buffer sizes, and receiving many datagrams per
//! system call.

use std::io::IoSliceMut;
use std::net::SocketAddr;

use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Socket buffer size of tunnel sockets: room for a burst of a Gbit/s tunnel
/// while the process is busy, instead of the kernel's default ~200 KiB
/// whose overflows the tunnelled TCP sees as loss.
pub const SOCKET_BUFFER: usize = 8 << 20;

/// Enlarges the socket's buffers to [`SOCKET_BUFFER`]: with CAP_NET_ADMIN
/// beyond `net.core.rmem_max` for this socket only (no global sysctl is
/// changed), otherwise up to that limit.
pub fn tune_socket(socket: &std::net::UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(socket, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(socket, sockopt::RcvBuf, &SOCKET_BUFFER);
    }
    if setsockopt(socket, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(socket, sockopt::SndBuf, &SOCKET_BUFFER);
    }
}

/// Makes `socket` send every datagram whole with "don't fragment", however
/// small a path MTU the kernel has learned (Linux's `IP_PMTUDISC_PROBE`
/// and its IPv6 twin, as quinn's own sockets): a datagram too large for
/// the path is lost instead of split into fragments, so an answer to it
/// proves that the path carries its size.
pub fn never_fragment(socket: &impl std::os::fd::AsFd) -> std::io::Result<()> {
    quinn_udp::UdpSocketState::new(socket.into()).map(|_| ())
}

/// Why [`bind_pair`] failed: which protocol, and the error.
#[derive(Debug)]
pub struct BindError {
    /// `"UDP"` or `"TCP"`.
    pub protocol: &'static str,
    /// The address tried.
    pub addr: SocketAddr,
    /// The error.
    pub error: std::io::Error,
}

/// Attempts at finding a port free for both UDP and TCP when asked for
/// port 0.
const PAIR_ATTEMPTS: usize = 32;

/// Binds UDP and TCP on the same address and port, as a listener serving
/// HTTP/3 and HTTP/2 side by side needs. For port 0 the port the kernel
/// gives UDP may be taken on TCP by another process: then both are closed
/// and another port tried, so an ephemeral pair never fails by chance.
pub fn bind_pair(
    addr: SocketAddr,
) -> Result<(std::net::UdpSocket, std::net::TcpListener), BindError> {
    bind_pair_with(addr, std::net::UdpSocket::bind)
}

fn bind_pair_with(
    addr: SocketAddr,
    mut bind_udp: impl FnMut(SocketAddr) -> std::io::Result<std::net::UdpSocket>,
) -> Result<(std::net::UdpSocket, std::net::TcpListener), BindError> {
    let attempts = if addr.port() == 0 { PAIR_ATTEMPTS } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = bind_udp(addr).map_err(|error| BindError {
            protocol: "UDP",
            addr,
            error,
        })?;
        let bound = udp.local_addr().map_err(|error| BindError {
            protocol: "UDP",
            addr,
            error,
        })?;
        match std::net::TcpListener::bind(bound) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(error) => {
                last = Some(BindError {
                    protocol: "TCP",
                    addr: bound,
                    error,
                });
                if addr.port() != 0 {
                    break;
                }
            }
        }
    }
    Err(last.unwrap_or(BindError {
        protocol: "TCP",
        addr,
        error: std::io::ErrorKind::AddrInUse.into(),
    }))
}

/// Most bytes one UDP send with segmentation offload carries: an IPv4 UDP
/// datagram's limit, 65,507 bytes, rounded down (the kernel refuses a
/// larger send whole).
pub const MAX_GSO_BYTES: usize = 65_000;

/// Sends the datagrams of `lens`, laid out back to back in `data`, to `to`
/// in as few system calls as UDP segmentation offload allows: each send
/// carries a run of datagrams of one size, optionally ending in one
/// smaller, at most [`MAX_GSO_BYTES`]. Waits while the socket buffer is
/// full. Returns how many datagrams could not be sent.
pub async fn send_segments(
    socket: &UdpSocket,
    state: &quinn_udp::UdpSocketState,
    to: SocketAddr,
    data: &[u8],
    lens: &[usize],
) -> usize {
    let max_segments = state.max_gso_segments().max(1);
    let mut failed = 0;
    let mut start = 0;
    let mut i = 0;
    while i < lens.len() {
        let seg = lens[i];
        let max = max_segments.min((MAX_GSO_BYTES / seg.max(1)).max(1));
        let mut j = i + 1;
        while j < lens.len() && j - i < max && lens[j] == seg {
            j += 1;
        }
        if j < lens.len() && j - i < max && lens[j] < seg {
            j += 1;
        }
        let end = start + lens[i..j].iter().sum::<usize>();
        let transmit = quinn_udp::Transmit {
            destination: to,
            ecn: None,
            contents: data.get(start..end).unwrap_or_default(),
            segment_size: (j - i > 1).then_some(seg),
            src_ip: None,
        };
        let sent = socket
            .async_io(Interest::WRITABLE, || state.send(socket.into(), &transmit))
            .await;
        if sent.is_err() {
            failed += j - i;
        }
        start = end;
        i = j;
    }
    failed
}

/// How many receive buffers one system call may fill.
const SLOTS: usize = 8;

/// Receives datagrams several per system call, coalesced by GRO where the
/// kernel offers it, and splits them up again. Its buffers are reused from
/// one call to the next.
pub struct BatchReceiver {
    storage: Vec<Vec<u8>>,
    meta: [quinn_udp::RecvMeta; SLOTS],
    filled: usize,
}

impl Default for BatchReceiver {
    fn default() -> Self {
        Self {
            storage: vec![vec![0u8; 65_536]; SLOTS],
            meta: [quinn_udp::RecvMeta::default(); SLOTS],
            filled: 0,
        }
    }
}

impl BatchReceiver {
    /// Waits for datagrams on `socket` (whose quinn-udp state is `state`).
    pub async fn recv(
        &mut self,
        socket: &UdpSocket,
        state: &quinn_udp::UdpSocketState,
    ) -> std::io::Result<()> {
        self.filled = 0;
        let n = {
            let mut bufs: Vec<IoSliceMut<'_>> = self
                .storage
                .iter_mut()
                .map(|b| IoSliceMut::new(b))
                .collect();
            let meta = &mut self.meta;
            socket
                .async_io(Interest::READABLE, || {
                    state.recv(socket.into(), &mut bufs, meta)
                })
                .await?
        };
        self.filled = n;
        Ok(())
    }

    /// The datagrams of the last [`recv`](Self::recv), each with its sender.
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.meta
            .iter()
            .zip(&self.storage)
            .take(self.filled)
            .flat_map(|(m, buf)| {
                let stride = m.stride.max(1);
                buf.get(..m.len)
                    .unwrap_or_default()
                    .chunks(stride)
                    .map(move |d| (m.addr, d))
            })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// Port 0 finds a port free for both, when the kernel's first choice
    /// for UDP is taken on TCP.
    #[test]
    fn an_ephemeral_pair_skips_a_port_taken_on_tcp() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = held.local_addr().unwrap();
        // The first UDP socket lands on the port TCP holds, as the kernel
        // may choose; later ones wherever the kernel puts them.
        let mut first = true;
        let (udp, tcp) = bind_pair_with("127.0.0.1:0".parse().unwrap(), |addr| {
            if std::mem::take(&mut first) {
                std::net::UdpSocket::bind(taken)
            } else {
                std::net::UdpSocket::bind(addr)
            }
        })
        .unwrap();
        assert_eq!(udp.local_addr().unwrap(), tcp.local_addr().unwrap());
        assert_ne!(udp.local_addr().unwrap(), taken);
        // A fixed port taken on TCP is an error naming TCP.
        let e = bind_pair(taken).unwrap_err();
        assert_eq!((e.protocol, e.addr), ("TCP", taken));
    }
}
