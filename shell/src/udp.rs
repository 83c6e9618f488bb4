//! UDP sockets of tunnels: buffer sizes.

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
