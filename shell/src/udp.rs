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
