//! A WireGuard gateway played by boringtun on a loopback socket, for
//! tests: it sends IP packets and control messages to one broker and reads
//! what comes back, answering handshakes on the way. Shared by the
//! broker's WireGuard tests (`broker/src/wireguard.rs`) and the cross-crate
//! fleet tests (`tests/tests/fleet_forward.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;
use tether_proto::gateway::{
    BROKER_CONTROL, GATEWAY_CONTROL, Message, control_packet, control_payload,
};
use tokio::net::UdpSocket;

/// A gateway peer of one broker.
pub struct TestGateway {
    tunn: Tunn,
    socket: UdpSocket,
    broker: SocketAddr,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl TestGateway {
    /// A gateway with the key `secret`, on a socket of its own, peer of the
    /// broker with the public key `broker_key` listening at `broker`.
    pub async fn new(
        secret: x25519::StaticSecret,
        broker_key: [u8; 32],
        broker: SocketAddr,
    ) -> Self {
        Self {
            tunn: Tunn::new(
                secret,
                x25519::PublicKey::from(broker_key),
                None,
                None,
                1,
                None,
            ),
            socket: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            broker,
            buf: vec![0u8; 65_536],
            out: vec![0u8; 65_536],
        }
    }

    /// Sends an IP packet (queued in boringtun until the handshake is
    /// done, which [`recv`](Self::recv) completes).
    pub async fn send(&mut self, packet: &[u8]) {
        if let TunnResult::WriteToNetwork(d) = self.tunn.encapsulate(packet, &mut self.buf) {
            self.socket.send_to(d, self.broker).await.unwrap();
        }
    }

    /// Sends a control message (queued as [`send`](Self::send) queues).
    pub async fn send_control(&mut self, message: &Message) {
        self.send(&control_packet(
            GATEWAY_CONTROL,
            BROKER_CONTROL,
            &message.encode(),
        ))
        .await;
    }

    /// The next IPv4 packet from the broker before `deadline`, control
    /// packets included, answering handshakes on the way.
    pub async fn recv(&mut self, deadline: tokio::time::Instant) -> Option<Vec<u8>> {
        loop {
            let Ok(Ok((n, _))) =
                tokio::time::timeout_at(deadline, self.socket.recv_from(&mut self.out)).await
            else {
                return None;
            };
            let mut result = self.tunn.decapsulate(None, &self.out[..n], &mut self.buf);
            loop {
                match result {
                    TunnResult::WriteToNetwork(d) => {
                        self.socket.send_to(d, self.broker).await.unwrap();
                        result = self.tunn.decapsulate(None, &[], &mut self.buf);
                    }
                    TunnResult::WriteToTunnelV4(p, _) => return Some(p.to_vec()),
                    _ => break,
                }
            }
        }
    }

    /// The control messages that arrive within `within` (other packets
    /// are dropped).
    pub async fn messages(&mut self, within: Duration) -> Vec<Message> {
        let deadline = tokio::time::Instant::now() + within;
        let mut got = Vec::new();
        while let Some(packet) = self.recv(deadline).await {
            if let Some(m) = control_payload(&packet, BROKER_CONTROL, GATEWAY_CONTROL)
                .and_then(|m| Message::decode(m).ok())
            {
                got.push(m);
            }
        }
        got
    }
}
