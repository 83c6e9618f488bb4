//! The frame of the broker-to-broker link: a relayed IP packet, then a
//! trailer naming who sent it.
//!
//! The broker where a packet entered ([`crate::forward::Router::decide`])
//! knows who sent it (a site by its certificate, a gateway by its key) and
//! names that sender with the packet it relays; the broker at the other
//! end checks residency and the access policy again against that sender
//! with its own rules ([`crate::forward::Router::decide_relayed`]). The
//! link's WireGuard session authenticates the whole frame, so the trailer
//! is as trustworthy as the peer that sent it.
//!
//! The sender's name follows the packet rather than preceding it because
//! a WireGuard receiver (boringtun, as the link uses) reads the start of
//! what it decrypts as an IP header and refuses anything else; it hands
//! over the packet that header describes, and the trailer is the rest of
//! the decrypted message (a data message's length less WireGuard's 32
//! bytes). Version 1, read from the end, every field one byte but the
//! names:
//!
//! ```text
//! +-----------+-----------+------+---------------+------+------+---------+
//! | IP packet | id (n)    |  n   | region (m)    |  m   | kind | version |
//! |           | DNS label | 1-63 | DNS label     | 1-63 |      |  0x01   |
//! +-----------+-----------+------+---------------+------+------+---------+
//! ```
//!
//! `kind` is 1 for a site's own address, 2 for a host on one of the
//! site's mapped LANs, 3 for a backend behind a gateway (`id` is the
//! site's or gateway's id, `region` its region), and 4 for an ICMP error
//! a broker itself answered a relayed packet with, which names nobody: its
//! trailer is `kind` and `version` alone (2 bytes). The trailer thus costs
//! `4 + len(id) + len(region)` bytes, 130 at most ([`MAX_TRAILER`]), which
//! come out of the link's MTU for that sender's packets.
//!
//! Parsing is strict: an unknown version or kind, a name out of bounds or
//! breaking the DNS label rules, a frame shorter than its trailer says or
//! one with no packet in front is an error, and the frame is dropped. A
//! frame from a broker that sends another version, or bare IP packets,
//! fails here or leaves a packet that is not whole
//! ([`crate::forward::Router::decide_relayed`] wants the packet to end
//! where its IP header says).

use thiserror::Error;

use crate::ids::{GatewayId, IdError, RegionId, SiteId};

/// The version of the frame this broker sends and reads.
pub const VERSION: u8 = 1;

/// The longest name a header carries (a DNS label).
pub const MAX_NAME: usize = 63;

/// The longest trailer: two names, their lengths, kind and version.
pub const MAX_TRAILER: usize = 4 + 2 * MAX_NAME;

const KIND_SITE: u8 = 1;
const KIND_SITE_LAN: u8 = 2;
const KIND_GATEWAY: u8 = 3;
const KIND_ROUTER: u8 = 4;

/// Who sent a relayed packet, as the broker where it entered knew it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    /// A site: from its own address (`lan` false) or from a host on one
    /// of its mapped LANs.
    Site {
        /// The site.
        site: SiteId,
        /// Its region.
        region: RegionId,
        /// Whether the source is on one of its mapped LANs.
        lan: bool,
    },
    /// A backend behind a gateway.
    Gateway {
        /// The gateway.
        gateway: GatewayId,
        /// Its region.
        region: RegionId,
    },
    /// A broker of the fleet, answering a relayed packet with an ICMP
    /// error (packet too big, time exceeded, prohibited).
    Router,
    /// Nobody named: a bare packet from a broker of a release before
    /// these frames, a peer of the link only while
    /// `peering.allow_unproven_peers` lets such brokers in during an
    /// upgrade. Checked where it entered only, as that release did; it
    /// has no trailer, and is never parsed from one.
    Unnamed,
}

/// Why a frame cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The frame is shorter than its trailer says.
    #[error("the frame is shorter than its trailer")]
    Truncated,
    /// The frame has a version this broker does not read (another release
    /// of tether, or a bare IP packet).
    #[error("frame version {0} is not {VERSION}")]
    Version(u8),
    /// The kind of sender is unknown.
    #[error("sender kind {0} is unknown")]
    Kind(u8),
    /// A name is empty or longer than [`MAX_NAME`].
    #[error("a name of {0} bytes is not 1 to {MAX_NAME} bytes long")]
    Oversize(usize),
    /// A name breaks the DNS label rules.
    #[error("{0}")]
    Name(IdError),
    /// Nothing precedes the trailer.
    #[error("the frame carries no packet")]
    NoPacket,
}

impl Sender {
    /// The sender's region; none for [`Sender::Router`] and
    /// [`Sender::Unnamed`].
    pub fn region(&self) -> Option<&RegionId> {
        match self {
            Sender::Site { region, .. } | Sender::Gateway { region, .. } => Some(region),
            Sender::Router | Sender::Unnamed => None,
        }
    }

    /// The length of its trailer behind a packet.
    pub fn trailer_len(&self) -> usize {
        match self {
            Sender::Site { site, region, .. } => 4 + site.as_str().len() + region.as_str().len(),
            Sender::Gateway { gateway, region } => {
                4 + gateway.as_str().len() + region.as_str().len()
            }
            Sender::Router => 2,
            Sender::Unnamed => 0,
        }
    }

    /// Writes its trailer into `out` (at least [`MAX_TRAILER`] bytes) and
    /// returns the trailer's length, or `None` when `out` is too short.
    pub fn write_trailer(&self, out: &mut [u8]) -> Option<usize> {
        let (kind, names) = match self {
            Sender::Site { site, region, lan } => (
                if *lan { KIND_SITE_LAN } else { KIND_SITE },
                Some((site.as_str(), region.as_str())),
            ),
            Sender::Gateway { gateway, region } => {
                (KIND_GATEWAY, Some((gateway.as_str(), region.as_str())))
            }
            Sender::Router => (KIND_ROUTER, None),
            Sender::Unnamed => return Some(0),
        };
        let len = self.trailer_len();
        let trailer = out.get_mut(..len)?;
        let mut at = 0;
        if let Some((id, region)) = names {
            for name in [id, region] {
                trailer
                    .get_mut(at..at + name.len())?
                    .copy_from_slice(name.as_bytes());
                // Identifiers are DNS labels: at most 63 bytes.
                *trailer.get_mut(at + name.len())? = u8::try_from(name.len()).ok()?;
                at += name.len() + 1;
            }
        }
        *trailer.get_mut(at)? = kind;
        *trailer.get_mut(at + 1)? = VERSION;
        Some(len)
    }

    /// The frame of `packet`: the packet, then its trailer.
    pub fn frame(&self, packet: &[u8]) -> Vec<u8> {
        let mut trailer = [0u8; MAX_TRAILER];
        let n = self.write_trailer(&mut trailer).unwrap_or(0);
        let mut out = Vec::with_capacity(packet.len() + n);
        out.extend_from_slice(packet);
        out.extend_from_slice(trailer.get(..n).unwrap_or_default());
        out
    }
}

/// Reads the trailer of `frame`: the sender, and the length of the packet
/// in front of the trailer (not zero).
pub fn parse(frame: &[u8]) -> Result<(Sender, usize), FrameError> {
    let [rest @ .., version] = frame else {
        return Err(FrameError::Truncated);
    };
    if *version != VERSION {
        return Err(FrameError::Version(*version));
    }
    let [rest @ .., kind] = rest else {
        return Err(FrameError::Truncated);
    };
    let (sender, packet) = match *kind {
        KIND_ROUTER => (Sender::Router, rest),
        KIND_SITE | KIND_SITE_LAN | KIND_GATEWAY => {
            let (region, rest) = name(rest)?;
            let (id, rest) = name(rest)?;
            let region = RegionId::new(region).map_err(FrameError::Name)?;
            let sender = if *kind == KIND_GATEWAY {
                Sender::Gateway {
                    gateway: GatewayId::new(id).map_err(FrameError::Name)?,
                    region,
                }
            } else {
                Sender::Site {
                    site: SiteId::new(id).map_err(FrameError::Name)?,
                    region,
                    lan: *kind == KIND_SITE_LAN,
                }
            };
            (sender, rest)
        }
        other => return Err(FrameError::Kind(other)),
    };
    if packet.is_empty() {
        return Err(FrameError::NoPacket);
    }
    Ok((sender, packet.len()))
}

/// A name followed by its length, at the end of `bytes`, and what
/// precedes it.
fn name(bytes: &[u8]) -> Result<(&str, &[u8]), FrameError> {
    let [rest @ .., len] = bytes else {
        return Err(FrameError::Truncated);
    };
    let len = usize::from(*len);
    if len == 0 || len > MAX_NAME {
        return Err(FrameError::Oversize(len));
    }
    let at = rest.len().checked_sub(len).ok_or(FrameError::Truncated)?;
    let (rest, name) = rest.split_at(at);
    // Not UTF-8 is not a DNS label either; the label check names the
    // problem.
    let name = std::str::from_utf8(name).unwrap_or("\u{fffd}");
    Ok((name, rest))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn site(lan: bool) -> Sender {
        Sender::Site {
            site: "branch-7".parse().unwrap(),
            region: "eu".parse().unwrap(),
            lan,
        }
    }

    const PACKET: [u8; 4] = [0x45, 0, 0, 20];

    #[test]
    fn every_sender_survives_the_round_trip() {
        let senders = [
            site(false),
            site(true),
            Sender::Gateway {
                gateway: "local".parse().unwrap(),
                region: "us-east".parse().unwrap(),
            },
            Sender::Router,
        ];
        for sender in senders {
            let frame = sender.frame(&PACKET);
            assert_eq!(frame.len(), PACKET.len() + sender.trailer_len());
            assert_eq!(frame.last(), Some(&VERSION));
            let (parsed, len) = parse(&frame).unwrap();
            assert_eq!((&parsed, &frame[..len]), (&sender, &PACKET[..]));
        }
        // "branch-7" and "eu": 4 + 8 + 2 bytes.
        assert_eq!(site(false).trailer_len(), 14);
        assert_eq!(
            site(false).frame(&PACKET)[4..],
            *b"branch-7\x08eu\x02\x01\x01"
        );
        assert_eq!(Sender::Router.frame(&PACKET)[4..], [4, 1]);
        // A bare packet of an older release is sent on bare.
        assert_eq!(Sender::Unnamed.frame(&PACKET), PACKET);
    }

    #[test]
    fn the_longest_trailer_is_bounded() {
        let long = "a".repeat(MAX_NAME);
        let sender = Sender::Gateway {
            gateway: long.parse().unwrap(),
            region: long.parse().unwrap(),
        };
        assert_eq!(sender.trailer_len(), MAX_TRAILER);
        let mut out = [0u8; MAX_TRAILER];
        assert_eq!(sender.write_trailer(&mut out), Some(MAX_TRAILER));
        assert_eq!(sender.write_trailer(&mut out[..MAX_TRAILER - 1]), None);
        let (parsed, len) = parse(&sender.frame(&[0x60])).unwrap();
        assert_eq!((parsed, len), (sender, 1));
    }

    #[test]
    fn a_truncated_frame_is_refused_at_every_length() {
        let trailer = &site(true).frame(&[])[..];
        for n in 0..trailer.len() {
            let cut = &trailer[trailer.len() - n..];
            let err = parse(cut).unwrap_err();
            assert!(
                matches!(err, FrameError::Truncated | FrameError::Oversize(_)),
                "last {n} bytes: {err:?}"
            );
        }
        // The whole trailer but no packet.
        assert_eq!(parse(trailer), Err(FrameError::NoPacket));
        assert_eq!(parse(&[KIND_ROUTER, VERSION]), Err(FrameError::NoPacket));
        assert_eq!(parse(&[VERSION]), Err(FrameError::Truncated));
        assert_eq!(parse(&[]), Err(FrameError::Truncated));
        // A length that reaches past the front.
        assert_eq!(parse(b"u\x05eu\x02\x01\x01"), Err(FrameError::Truncated));
    }

    #[test]
    fn another_version_or_a_bare_ip_packet_is_refused() {
        let mut frame = site(false).frame(&PACKET);
        *frame.last_mut().unwrap() = 2;
        assert_eq!(parse(&frame), Err(FrameError::Version(2)));
        // What a broker without the trailer sends: a packet ending in
        // payload bytes.
        assert_eq!(parse(&[0x45, 0, 0, 20, 0]), Err(FrameError::Version(0)));
        assert_eq!(parse(&[0x60, 0, 0, 0xff]), Err(FrameError::Version(0xff)));
    }

    #[test]
    fn unknown_kinds_and_oversize_or_bad_names_are_refused() {
        assert_eq!(parse(&[0x45, 0, VERSION]), Err(FrameError::Kind(0)));
        assert_eq!(parse(&[0x45, 5, VERSION]), Err(FrameError::Kind(5)));
        // A 64-byte name: over the bound even with the bytes present.
        let mut frame = vec![0x45];
        frame.extend_from_slice(&[b'a'; 64]);
        frame.extend_from_slice(b"\x40eu\x02\x01\x01");
        assert_eq!(parse(&frame), Err(FrameError::Oversize(64)));
        assert_eq!(
            parse(&[0x45, b'a', 255, KIND_GATEWAY, VERSION]),
            Err(FrameError::Oversize(255))
        );
        // An empty name.
        assert_eq!(
            parse(b"\x45\x00eu\x02\x01\x01"),
            Err(FrameError::Oversize(0))
        );
        // Names that are no DNS labels: uppercase, not UTF-8, a dot.
        for bad in [
            &b"\x45A\x01eu\x02\x01\x01"[..],
            b"\x45\xff\x01eu\x02\x01\x01",
            b"\x45a\x01e.\x02\x03\x01",
        ] {
            assert!(
                matches!(parse(bad), Err(FrameError::Name(_))),
                "{bad:?}: {:?}",
                parse(bad)
            );
        }
    }
}
