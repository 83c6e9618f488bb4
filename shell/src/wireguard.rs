//! One datagram through a boringtun peer, as the broker (for each gateway)
//! and the gateway (for its broker) receive them.

use std::net::IpAddr;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{Tunn, TunnResult};

/// Decrypts `datagram` from `from` with `tunn`: what must go back to the
/// network (handshake responses, cookies, packets queued while the session
/// was being set up) is passed to `to_network`, in order; the decrypted IP
/// packet, if the datagram carried one, to `to_tunnel`. `out` is scratch
/// space for the largest packet. An error means boringtun refused the
/// datagram (a replayed one is [`WireGuardError::DuplicateCounter`]).
pub fn decapsulate(
    tunn: &mut Tunn,
    from: IpAddr,
    datagram: &[u8],
    out: &mut [u8],
    mut to_network: impl FnMut(&[u8]),
    to_tunnel: impl FnOnce(&[u8]),
) -> Result<(), WireGuardError> {
    let mut result = tunn.decapsulate(Some(from), datagram, out);
    loop {
        match result {
            TunnResult::WriteToNetwork(reply) => {
                to_network(reply);
                result = tunn.decapsulate(None, &[], out);
            }
            TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                to_tunnel(p);
                return Ok(());
            }
            TunnResult::Done => return Ok(()),
            TunnResult::Err(e) => return Err(e),
        }
    }
}
