//! One datagram through a boringtun peer, as the broker (for each gateway)
//! and the gateway (for its broker) receive them, and the handshake check
//! in front of a port that serves many peers.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::PublicKey;

/// Decrypts `datagram` from `from` with `tunn`: what must go back to the
/// network (handshake responses, cookies, packets queued while the session
/// was being set up) is passed to `to_network`, in order; the decrypted IP
/// packet, if the datagram carried one, to `to_tunnel` (to change in place,
/// as an MSS clamp does, before it is copied on). `out` is scratch
/// space for the largest packet. An error means boringtun refused the
/// datagram (a replayed one is [`WireGuardError::DuplicateCounter`]).
pub fn decapsulate(
    tunn: &mut Tunn,
    from: IpAddr,
    datagram: &[u8],
    out: &mut [u8],
    mut to_network: impl FnMut(&[u8]),
    to_tunnel: impl FnOnce(&mut [u8]),
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

/// Handshakes per second a WireGuard port answers before it asks their
/// senders for a cookie (WireGuard's "under load"). Peers handshake every
/// two minutes, so only a flood reaches it; each handshake let through
/// costs an X25519 exchange before its sender is known.
pub const HANDSHAKES_PER_SECOND: u64 = 100;

/// What [`HandshakeGate::check`] says of a datagram.
#[derive(Debug)]
pub enum Gate<'a> {
    /// Not a handshake, or one with a good MAC within the rate: go on.
    Pass,
    /// A handshake past the rate without a valid cookie: send this cookie
    /// reply back to its source and go no further.
    Answer(&'a [u8]),
    /// Malformed, or a handshake whose MAC is not for this key: drop it.
    Refuse,
}

/// The check in front of a WireGuard port that serves many peers: a
/// handshake's MAC is verified, and past [`HANDSHAKES_PER_SECOND`] a
/// cookie asked for, before any key exchange is spent on finding which
/// peer sent it (boringtun's [`RateLimiter`]).
pub struct HandshakeGate {
    limiter: RateLimiter,
    started: Instant,
    /// Milliseconds after `started` of the last reset of the rate.
    reset_at: AtomicU64,
}

impl std::fmt::Debug for HandshakeGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandshakeGate").finish_non_exhaustive()
    }
}

impl HandshakeGate {
    /// A gate for the port whose static public key is `public`.
    pub fn new(public: &PublicKey) -> Self {
        Self {
            limiter: RateLimiter::new(public, HANDSHAKES_PER_SECOND),
            started: Instant::now(),
            reset_at: AtomicU64::new(0),
        }
    }

    /// Checks `datagram` from `from`; `out` holds a cookie reply.
    pub fn check<'a>(&self, from: IpAddr, datagram: &[u8], out: &'a mut [u8]) -> Gate<'a> {
        // The rate is counted per second.
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.reset_at.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000
            && self
                .reset_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.limiter.reset_count();
        }
        match self.limiter.verify_packet(Some(from), datagram, out) {
            Ok(_) => Gate::Pass,
            Err(TunnResult::WriteToNetwork(cookie)) => Gate::Answer(cookie),
            Err(_) => Gate::Refuse,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use boringtun::x25519::StaticSecret;

    use super::*;

    /// A handshake initiation from a fresh key to `to`.
    fn initiation(to: &PublicKey, buf: &mut [u8]) -> Vec<u8> {
        let mut secret = [0u8; 32];
        secret[0] = 7;
        let mut tunn = Tunn::new(StaticSecret::from(secret), *to, None, None, 1, None);
        let TunnResult::WriteToNetwork(d) = tunn.format_handshake_initiation(buf, false) else {
            panic!("no handshake initiation");
        };
        d.to_vec()
    }

    /// A packet from `a` to `b` is opened into `b`'s `out`, handed over
    /// there to be changed in place (the broker passes it on from `out`
    /// without another copy; the gateway clamps it there).
    #[test]
    fn a_packet_is_opened_into_out_and_can_be_changed_there() {
        let (a_secret, b_secret) = (StaticSecret::from([5u8; 32]), StaticSecret::from([6u8; 32]));
        let (a_public, b_public) = (PublicKey::from(&a_secret), PublicKey::from(&b_secret));
        let mut a = Tunn::new(a_secret, b_public, None, None, 1, None);
        let mut b = Tunn::new(b_secret, a_public, None, None, 2, None);
        let from: IpAddr = "192.0.2.1".parse().unwrap();
        let (mut buf, mut out) = (vec![0u8; 2048], vec![0u8; 2048]);
        fn no_packet(_: &mut [u8]) {
            panic!("a handshake carries no packet")
        }

        // The handshake: initiation, response, and the keepalive that
        // confirms the session to the responder.
        let TunnResult::WriteToNetwork(init) = a.format_handshake_initiation(&mut buf, false)
        else {
            panic!("no handshake initiation");
        };
        let mut to_a = Vec::new();
        decapsulate(
            &mut b,
            from,
            init,
            &mut out,
            |r| to_a.push(r.to_vec()),
            no_packet,
        )
        .unwrap();
        let mut to_b = Vec::new();
        for d in &to_a {
            decapsulate(
                &mut a,
                from,
                d,
                &mut out,
                |r| to_b.push(r.to_vec()),
                no_packet,
            )
            .unwrap();
        }
        for d in &to_b {
            decapsulate(&mut b, from, d, &mut out, |_| {}, |p| assert!(p.is_empty())).unwrap();
        }

        // An IPv4 packet of 28 bytes (header and 8 bytes of payload).
        let mut packet = vec![
            0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        packet.extend_from_slice(b"payload!");
        let TunnResult::WriteToNetwork(sealed) = a.encapsulate(&packet, &mut buf) else {
            panic!("no session to seal with");
        };
        let sealed = sealed.to_vec();
        let base = out.as_ptr() as usize;
        let mut at = None;
        decapsulate(
            &mut b,
            from,
            &sealed,
            &mut out,
            |_| {},
            |p| {
                assert_eq!(p, &packet[..]);
                at = Some((p.as_ptr() as usize - base, p.len()));
                p[8] = 1;
            },
        )
        .unwrap();
        let (at, len) = at.expect("no packet handed over");
        assert_eq!(len, packet.len());
        assert_eq!(out[at + 8], 1, "the change is in `out`");
        assert_eq!(out[at + 9..at + len], packet[9..]);
    }

    #[test]
    fn the_gate_refuses_a_wrong_mac_and_asks_a_flood_for_cookies() {
        let public = PublicKey::from(&StaticSecret::from([3u8; 32]));
        let gate = HandshakeGate::new(&public);
        let (mut buf, mut out) = (vec![0u8; 512], vec![0u8; 512]);
        let from: IpAddr = "192.0.2.1".parse().unwrap();
        let good = initiation(&public, &mut buf);
        // Sealed for another key: its MAC does not match.
        let other = PublicKey::from(&StaticSecret::from([4u8; 32]));
        let wrong = initiation(&other, &mut buf);
        assert!(matches!(gate.check(from, &wrong, &mut out), Gate::Refuse));
        assert!(matches!(
            gate.check(from, &[1, 2, 3], &mut out),
            Gate::Refuse
        ));
        // The refusals above counted; the rest of the second's budget
        // passes, then cookies.
        let mut passed = 0;
        for _ in 0..HANDSHAKES_PER_SECOND {
            if matches!(gate.check(from, &good, &mut out), Gate::Pass) {
                passed += 1;
            }
        }
        assert!(passed >= HANDSHAKES_PER_SECOND - 2, "{passed} passed");
        match gate.check(from, &good, &mut out) {
            Gate::Answer(cookie) => assert_eq!((cookie[0], cookie.len()), (3, 64)),
            other => panic!("past the rate: {other:?}"),
        }
    }
}
