//! How a gateway learns the brokers of its region from the brokers
//! themselves.
//!
//! A gateway's configuration names some brokers (`brokers = [...]`): its
//! **seed**. Every broker knows, from the fleet in the shared store, which
//! brokers of the region are alive and where gateways reach their
//! WireGuard; it tells each gateway that asks ([`super::Message::BrokersRequest`])
//! as a [`BrokerList`] in [`super::Message::Brokers`] chunks ([`chunks`],
//! [`ListAssembler`]), and again whenever the list changes. The list's
//! version is a digest of its content, so every broker with the same view
//! gives the same version and a gateway that moves to another broker is
//! not sent a list it already holds.
//!
//! [`BrokerSet`] is the gateway's decision, sans-IO: which brokers it
//! follows, each in a fixed **slot** (the index the failover and the
//! WireGuard sessions use).
//!
//! - The configured brokers always keep their slots, listed or not: the
//!   operator's configuration is the gateway's way back into the region
//!   whatever a broker says (a broker whose fleet view is wrong, or a
//!   store that lost its keys, cannot cut a gateway off).
//! - A listed broker that the gateway does not follow yet is **learned**:
//!   it gets a free slot, and the gateway opens a WireGuard session to it
//!   with the same broker key as for the configured ones.
//! - A learned broker that a later list no longer names is **forgotten**:
//!   its slot is freed, and reused by the next learned broker.
//! - Only endpoints the gateway could use count: inside the published CIDR,
//!   of the configured brokers' address family, a port other than 0; at
//!   most [`super::failover::MAX_BROKERS`] slots. An empty list is no
//!   knowledge (a broker without a fleet view) and changes nothing.
//! - The learned brokers are saved in the state directory
//!   ([`encode_saved`], [`decode_saved`]) and restored at start
//!   ([`BrokerSet::restore`]), so a restarted gateway reaches brokers added
//!   since its configuration was written even when the configured ones
//!   are gone. A restored broker that the next list does not name is
//!   forgotten like any learned one.

use std::net::SocketAddr;

use ipnet::IpNet;

use super::failover::MAX_BROKERS;
use super::{HEADER, MAX_PAYLOAD, Message, Reassembly, endpoint_len};

/// The most endpoints a broker list holds.
pub const MAX_LISTED: usize = MAX_BROKERS;
/// The most chunks a broker list may come in.
pub const MAX_CHUNKS: u16 = 4;
/// The most lines read from the saved list.
const MAX_SAVED_LINES: usize = 256;

/// The gateway endpoints of the live brokers of a region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerList {
    /// A digest of the endpoints, never 0.
    pub version: u64,
    /// The endpoints, no one twice, at most [`MAX_LISTED`].
    pub endpoints: Vec<SocketAddr>,
}

impl BrokerList {
    /// The list of `endpoints` (the sending broker's own first): the first
    /// [`MAX_LISTED`] distinct ones, with their digest as version.
    pub fn new(endpoints: impl IntoIterator<Item = SocketAddr>) -> Self {
        let mut out: Vec<SocketAddr> = Vec::new();
        for e in endpoints {
            if out.len() >= MAX_LISTED {
                break;
            }
            if !out.contains(&e) {
                out.push(e);
            }
        }
        Self {
            version: version_of(&out),
            endpoints: out,
        }
    }
}

/// The version of a list: a digest (64-bit FNV-1a) of its endpoints in
/// sorted order, so the order a broker lists them in does not matter;
/// never 0, which stands for "no list".
pub fn version_of(endpoints: &[SocketAddr]) -> u64 {
    let mut sorted = endpoints.to_vec();
    sorted.sort();
    sorted.dedup();
    let mut bytes = Vec::with_capacity(sorted.len() * 19);
    for e in &sorted {
        super::encode_endpoint(e, &mut bytes);
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

/// The list as chunk messages, each within [`MAX_PAYLOAD`]; an empty list
/// is one empty chunk.
pub fn chunks(list: &BrokerList) -> Vec<Message> {
    let mut parts: Vec<Vec<SocketAddr>> = vec![Vec::new()];
    // The header and the format byte.
    let mut size = HEADER + 1;
    for e in list.endpoints.iter().take(MAX_LISTED) {
        let n = endpoint_len(e);
        if size + n > MAX_PAYLOAD && parts.last().is_some_and(|p| !p.is_empty()) {
            parts.push(Vec::new());
            size = HEADER + 1;
        }
        size += n;
        if let Some(last) = parts.last_mut() {
            last.push(*e);
        }
    }
    let count = parts.len() as u16;
    parts
        .into_iter()
        .enumerate()
        .map(|(i, endpoints)| Message::Brokers {
            version: list.version,
            index: i as u16,
            count,
            endpoints,
        })
        .collect()
}

/// Collects broker list chunks on the gateway.
#[derive(Debug, Default)]
pub struct ListAssembler {
    inner: Reassembly<Vec<SocketAddr>>,
}

impl ListAssembler {
    /// Takes a chunk; returns the list once this chunk completes a version
    /// other than the one completed last. A list announced in more than
    /// [`MAX_CHUNKS`] chunks is refused; one with more than
    /// [`MAX_LISTED`] endpoints keeps the first of them.
    pub fn push(&mut self, message: Message) -> Option<BrokerList> {
        let Message::Brokers {
            version,
            index,
            count,
            endpoints,
        } = message
        else {
            return None;
        };
        if count > MAX_CHUNKS {
            return None;
        }
        let (version, parts) = self.inner.push(version, index, count, endpoints)?;
        self.inner.applied = Some(version);
        let mut out: Vec<SocketAddr> = Vec::new();
        for e in parts.into_iter().flatten() {
            if out.len() < MAX_LISTED && !out.contains(&e) {
                out.push(e);
            }
        }
        Some(BrokerList {
            version,
            endpoints: out,
        })
    }
}

/// Where a followed broker comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The gateway's configuration: never forgotten.
    Configured,
    /// A broker's list (or the saved copy of one).
    Learned,
}

/// A change to the brokers a gateway follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerChange {
    /// A broker is learned: open a session to `addr` in slot `slot`.
    Learned {
        /// Its slot.
        slot: usize,
        /// Its endpoint.
        addr: SocketAddr,
    },
    /// A learned broker is no longer listed: close slot `slot`.
    Forgotten {
        /// Its slot.
        slot: usize,
        /// Its endpoint.
        addr: SocketAddr,
    },
}

/// What applying a list did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// The changes, forgotten ones first (their slots may be reused by the
    /// learned ones).
    pub changes: Vec<BrokerChange>,
    /// Listed endpoints the gateway cannot use (another address family,
    /// outside the published CIDR, port 0).
    pub unusable: Vec<SocketAddr>,
    /// Listed endpoints left out for want of a free slot.
    pub no_room: Vec<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    addr: SocketAddr,
    origin: Origin,
}

/// The brokers a gateway follows, by slot (see the module documentation).
#[derive(Debug, Clone)]
pub struct BrokerSet {
    slots: Vec<Option<Slot>>,
    published: IpNet,
    version: u64,
}

impl BrokerSet {
    /// The configured brokers (already resolved and checked, at least
    /// one) in slots 0, 1, …; learned ones must be inside `published`.
    pub fn new(configured: &[SocketAddr], published: IpNet) -> Self {
        let mut slots: Vec<Option<Slot>> = Vec::new();
        for addr in configured.iter().take(MAX_BROKERS) {
            if !slots.iter().flatten().any(|s| s.addr == *addr) {
                slots.push(Some(Slot {
                    addr: *addr,
                    origin: Origin::Configured,
                }));
            }
        }
        Self {
            slots,
            published,
            version: 0,
        }
    }

    /// How many slots there are (followed or free); every slot index is
    /// below it.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no broker is followed.
    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    /// The endpoint of slot `slot`, if it is followed.
    pub fn addr(&self, slot: usize) -> Option<SocketAddr> {
        self.slots.get(slot).copied().flatten().map(|s| s.addr)
    }

    /// Where slot `slot`'s broker comes from, if it is followed.
    pub fn origin(&self, slot: usize) -> Option<Origin> {
        self.slots.get(slot).copied().flatten().map(|s| s.origin)
    }

    /// Every slot's endpoint (`None`: free).
    pub fn addrs(&self) -> Vec<Option<SocketAddr>> {
        self.slots.iter().map(|s| s.map(|s| s.addr)).collect()
    }

    /// The learned brokers, by slot: what to save.
    pub fn learned(&self) -> Vec<SocketAddr> {
        self.slots
            .iter()
            .flatten()
            .filter(|s| s.origin == Origin::Learned)
            .map(|s| s.addr)
            .collect()
    }

    /// The version of the list applied last (0: none since
    /// [`forget_version`](Self::forget_version)): what to ask with.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Asks for the list afresh (the traffic moved to another broker).
    pub fn forget_version(&mut self) {
        self.version = 0;
    }

    /// Whether the gateway could use `addr`.
    fn usable(&self, addr: &SocketAddr) -> bool {
        let family = self
            .slots
            .iter()
            .flatten()
            .find(|s| s.origin == Origin::Configured)
            .map(|s| s.addr.is_ipv4());
        addr.port() != 0
            && !addr.ip().is_unspecified()
            && self.published.contains(&addr.ip())
            && family.is_none_or(|v4| v4 == addr.is_ipv4())
    }

    /// Follows the learned brokers saved by an earlier run.
    pub fn restore(&mut self, saved: &[SocketAddr]) -> Applied {
        let mut applied = Applied::default();
        self.learn(saved, &mut applied);
        applied
    }

    /// Applies a broker's list: learns the listed brokers it does not
    /// follow, forgets the learned ones not listed. An empty list changes
    /// nothing.
    pub fn apply(&mut self, list: &BrokerList) -> Applied {
        let mut applied = Applied::default();
        if list.endpoints.is_empty() {
            return applied;
        }
        self.version = list.version;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Some(s) = slot
                && s.origin == Origin::Learned
                && !list.endpoints.contains(&s.addr)
            {
                applied.changes.push(BrokerChange::Forgotten {
                    slot: i,
                    addr: s.addr,
                });
                *slot = None;
            }
        }
        self.learn(&list.endpoints, &mut applied);
        applied
    }

    fn learn(&mut self, endpoints: &[SocketAddr], applied: &mut Applied) {
        for addr in endpoints.iter().take(MAX_LISTED) {
            if self.slots.iter().flatten().any(|s| s.addr == *addr) {
                continue;
            }
            if !self.usable(addr) {
                applied.unusable.push(*addr);
                continue;
            }
            let slot = Some(Slot {
                addr: *addr,
                origin: Origin::Learned,
            });
            let index = match self.slots.iter().position(Option::is_none) {
                Some(free) => {
                    self.slots[free] = slot;
                    free
                }
                None if self.slots.len() < MAX_BROKERS => {
                    self.slots.push(slot);
                    self.slots.len() - 1
                }
                None => {
                    applied.no_room.push(*addr);
                    continue;
                }
            };
            applied.changes.push(BrokerChange::Learned {
                slot: index,
                addr: *addr,
            });
        }
    }
}

/// The learned brokers as the state directory keeps them: one endpoint a
/// line.
pub fn encode_saved(learned: &[SocketAddr]) -> String {
    learned.iter().map(|a| format!("{a}\n")).collect()
}

/// The learned brokers of a saved file: every line that is an endpoint
/// (others are skipped), at most [`MAX_LISTED`].
pub fn decode_saved(text: &str) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for line in text.lines().take(MAX_SAVED_LINES) {
        if let Ok(a) = line.trim().parse::<SocketAddr>()
            && !out.contains(&a)
            && out.len() < MAX_LISTED
        {
            out.push(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn set(configured: &[&str]) -> BrokerSet {
        let c: Vec<SocketAddr> = configured.iter().map(|s| a(s)).collect();
        BrokerSet::new(&c, "10.0.0.0/8".parse().unwrap())
    }

    fn list(endpoints: &[&str]) -> BrokerList {
        BrokerList::new(endpoints.iter().map(|s| a(s)))
    }

    #[test]
    fn lists_round_trip_in_chunks_within_the_payload() {
        let l = list(&["10.0.0.1:51820", "10.0.0.2:51820", "[fd00::3]:51820"]);
        let c = chunks(&l);
        assert_eq!(c.len(), 1);
        for m in &c {
            assert!(m.encode().len() <= MAX_PAYLOAD);
            assert_eq!(Message::decode(&m.encode()).as_ref(), Ok(m));
        }
        let mut asm = ListAssembler::default();
        assert_eq!(asm.push(c[0].clone()), Some(l.clone()));
        // The same version again is not applied twice.
        assert_eq!(asm.push(c[0].clone()), None);
        assert_eq!(
            Message::decode(&Message::BrokersRequest { known: 77 }.encode()),
            Ok(Message::BrokersRequest { known: 77 })
        );
        // An empty list is one empty chunk.
        let empty = chunks(&BrokerList::new([]));
        assert_eq!(empty.len(), 1);
        assert_eq!(Message::decode(&empty[0].encode()).as_ref(), Ok(&empty[0]));
    }

    #[test]
    fn lists_are_bounded_and_chunks_reassemble() {
        let many: Vec<SocketAddr> = (0..200u16)
            .map(|i| {
                SocketAddr::new(
                    std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i).into(),
                    51820,
                )
            })
            .collect();
        let l = BrokerList::new(many.clone());
        assert_eq!(l.endpoints.len(), MAX_LISTED);
        assert_eq!(l.endpoints[..], many[..MAX_LISTED]);
        // Chunks built by hand beyond the bound: split by the same rule.
        let big = BrokerList {
            version: 9,
            endpoints: many.clone(),
        };
        let c = chunks(&big);
        for m in &c {
            assert!(m.encode().len() <= MAX_PAYLOAD);
        }
        // A list announced in too many chunks is refused.
        let mut asm = ListAssembler::default();
        let over = Message::Brokers {
            version: 5,
            index: 0,
            count: MAX_CHUNKS + 1,
            endpoints: vec![a("10.0.0.1:1")],
        };
        assert_eq!(asm.push(over), None);
        // Two chunks, in either order, make one list.
        let first = Message::Brokers {
            version: 6,
            index: 1,
            count: 2,
            endpoints: vec![a("10.0.0.2:1")],
        };
        let second = Message::Brokers {
            version: 6,
            index: 0,
            count: 2,
            endpoints: vec![a("10.0.0.1:1"), a("10.0.0.2:1")],
        };
        assert_eq!(asm.push(first), None);
        assert_eq!(
            asm.push(second).map(|l| l.endpoints),
            Some(vec![a("10.0.0.1:1"), a("10.0.0.2:1")])
        );
        // A chunk with more endpoints than a list may hold is malformed.
        let mut bytes = Message::Brokers {
            version: 1,
            index: 0,
            count: 1,
            endpoints: vec![],
        }
        .encode();
        for _ in 0..=MAX_LISTED {
            super::super::encode_endpoint(&a("10.0.0.1:1"), &mut bytes);
        }
        assert!(matches!(
            Message::decode(&bytes),
            Err(super::super::ControlError::Malformed(_))
        ));
    }

    #[test]
    fn unknown_kinds_and_formats_are_newer_not_broken() {
        let mut unknown = Message::Request.encode();
        unknown[4] = 200;
        let e = Message::decode(&unknown).unwrap_err();
        assert!(e.is_newer(), "{e}");
        let mut format = chunks(&list(&["10.0.0.1:51820"]))[0].encode();
        format[super::super::HEADER] = 2;
        let e = Message::decode(&format).unwrap_err();
        assert!(e.is_newer(), "{e}");
        let mut cut = chunks(&list(&["10.0.0.1:51820"]))[0].encode();
        cut.pop();
        assert!(!Message::decode(&cut).unwrap_err().is_newer());
    }

    #[test]
    fn the_version_is_the_content_not_the_order() {
        let x = list(&["10.0.0.1:51820", "10.0.0.2:51820"]);
        let y = list(&["10.0.0.2:51820", "10.0.0.1:51820"]);
        assert_eq!(x.version, y.version);
        assert_ne!(x.version, list(&["10.0.0.1:51820"]).version);
        assert_ne!(BrokerList::new([]).version, 0);
    }

    #[test]
    fn listed_brokers_are_learned_and_unlisted_learned_ones_forgotten() {
        let mut s = set(&["10.0.0.1:51820"]);
        let got = s.apply(&list(&["10.0.0.1:51820", "10.0.0.2:51820"]));
        assert_eq!(
            got.changes,
            vec![BrokerChange::Learned {
                slot: 1,
                addr: a("10.0.0.2:51820")
            }]
        );
        assert_eq!(s.learned(), vec![a("10.0.0.2:51820")]);
        assert_eq!(s.origin(1), Some(Origin::Learned));
        // The same list again changes nothing.
        assert_eq!(
            s.apply(&list(&["10.0.0.2:51820", "10.0.0.1:51820"])),
            Applied::default()
        );
        // Broker 2 leaves, broker 3 joins: 3 takes 2's slot.
        let got = s.apply(&list(&["10.0.0.1:51820", "10.0.0.3:51820"]));
        assert_eq!(
            got.changes,
            vec![
                BrokerChange::Forgotten {
                    slot: 1,
                    addr: a("10.0.0.2:51820")
                },
                BrokerChange::Learned {
                    slot: 1,
                    addr: a("10.0.0.3:51820")
                },
            ]
        );
        assert_eq!(s.len(), 2);
        assert_eq!(
            s.version(),
            list(&["10.0.0.1:51820", "10.0.0.3:51820"]).version
        );
        s.forget_version();
        assert_eq!(s.version(), 0);
    }

    #[test]
    fn configured_brokers_are_never_forgotten() {
        let mut s = set(&["10.0.0.1:51820", "10.0.0.2:51820"]);
        let got = s.apply(&list(&["10.0.0.3:51820"]));
        assert_eq!(
            got.changes,
            vec![BrokerChange::Learned {
                slot: 2,
                addr: a("10.0.0.3:51820")
            }]
        );
        assert_eq!(s.addr(0), Some(a("10.0.0.1:51820")));
        assert_eq!(s.addr(1), Some(a("10.0.0.2:51820")));
        // An empty list is no knowledge: nothing is forgotten.
        assert_eq!(s.apply(&BrokerList::new([])), Applied::default());
        assert_eq!(s.learned(), vec![a("10.0.0.3:51820")]);
    }

    #[test]
    fn unusable_endpoints_and_those_beyond_the_slots_are_left_out() {
        let mut s = set(&["10.0.0.1:51820"]);
        let got = s.apply(&list(&[
            "192.0.2.1:51820",
            "[fd00::1]:51820",
            "10.0.0.9:0",
            "0.0.0.0:51820",
        ]));
        assert!(got.changes.is_empty());
        assert_eq!(got.unusable.len(), 4);
        let many: Vec<SocketAddr> = (2..100u8)
            .map(|i| SocketAddr::from(([10, 0, 1, i], 51820)))
            .collect();
        let got = s.apply(&BrokerList::new(many));
        assert_eq!(got.changes.len(), MAX_BROKERS - 1);
        assert_eq!(got.no_room.len(), MAX_LISTED - (MAX_BROKERS - 1));
        assert_eq!(s.len(), MAX_BROKERS);
    }

    #[test]
    fn the_learned_list_survives_a_restart() {
        let mut s = set(&["10.0.0.1:51820"]);
        s.apply(&list(&[
            "10.0.0.1:51820",
            "10.0.0.2:51820",
            "10.0.0.3:51820",
        ]));
        let text = encode_saved(&s.learned());
        let mut again = set(&["10.0.0.1:51820"]);
        let got = again.restore(&decode_saved(&text));
        assert_eq!(got.changes.len(), 2);
        assert_eq!(again.addrs(), s.addrs());
        // A restored broker no longer listed is forgotten like any other.
        let got = again.apply(&list(&["10.0.0.1:51820", "10.0.0.3:51820"]));
        assert_eq!(
            got.changes,
            vec![BrokerChange::Forgotten {
                slot: 1,
                addr: a("10.0.0.2:51820")
            }]
        );
        assert_eq!(
            decode_saved("junk\n10.0.0.5:1\n\n10.0.0.5:1\n"),
            vec![a("10.0.0.5:1")]
        );
    }
}
