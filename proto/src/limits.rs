//! Admission of connections that have not yet authenticated, per source
//! and in all.
//!
//! A TCP connection costs the broker a file descriptor from its accept
//! until it closes; before a client certificate is shown anyone can open
//! one. [`SourceBudget`] bounds how many such connections one source (an
//! IPv4 address, or an IPv6 /64, which one host may own whole) and all
//! sources together hold. The shell admits at accept and releases when the
//! connection closes or proves its identity.
//!
//! A source past its own limit is refused. When all sources together hold
//! the total, a new connection is still admitted and the oldest one
//! admitted is evicted instead (the shell closes it): a site's handshake
//! takes a few round trips, so connections held open by many sources at
//! once cannot keep sites out unless they are opened faster than the total
//! per handshake time, where a refusal at the total would let a steady
//! trickle of idle connections lock every HTTP/2 site out.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Its source holds as many as one source may.
    #[error("too many unauthenticated connections from this source")]
    SourceLimit,
}

impl Refusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::SourceLimit => "source_limit",
        }
    }
}

/// A connection admitted by [`SourceBudget::admit`].
#[derive(Debug, PartialEq, Eq)]
pub struct Admitted<T> {
    /// Its number, to release it by.
    pub id: u64,
    /// The oldest connection, evicted to make room, with what was admitted
    /// with it: the caller closes it.
    pub evicted: Option<(u64, T)>,
}

/// Counts of admitted connections against a per-source and a total limit,
/// each holding a `T` of the caller's (what closes it, in the shell).
#[derive(Debug, Clone)]
pub struct SourceBudget<T = ()> {
    per_source: usize,
    total: usize,
    open: BTreeMap<IpAddr, usize>,
    /// The admitted connections, oldest first, with their source keys.
    order: VecDeque<(u64, IpAddr, T)>,
    next_id: u64,
}

/// The key a source is counted under: the address, or its /64 for IPv6.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

impl<T> SourceBudget<T> {
    /// A budget of `per_source` connections per source and `total` in all
    /// (each at least 1).
    pub fn new(per_source: usize, total: usize) -> Self {
        Self {
            per_source: per_source.max(1),
            total: total.max(1),
            open: BTreeMap::new(),
            order: VecDeque::new(),
            next_id: 0,
        }
    }

    /// Admits a connection from `ip` holding `value`, evicting the oldest
    /// when all sources together hold the total; refuses it when its source
    /// holds its limit.
    pub fn admit(&mut self, ip: IpAddr, value: T) -> Result<Admitted<T>, Refusal> {
        let key = source_key(ip);
        if self.open.get(&key).copied().unwrap_or(0) >= self.per_source {
            return Err(Refusal::SourceLimit);
        }
        let evicted = if self.order.len() >= self.total {
            self.order.pop_front().map(|(id, old, held)| {
                self.forget(old);
                (id, held)
            })
        } else {
            None
        };
        let id = self.next_id;
        self.next_id += 1;
        *self.open.entry(key).or_insert(0) += 1;
        self.order.push_back((id, key, value));
        Ok(Admitted { id, evicted })
    }

    /// Releases the connection `id` (nothing if it was evicted or
    /// released already).
    pub fn release(&mut self, id: u64) {
        // Ids rise with admission: a binary search finds it.
        if let Ok(i) = self.order.binary_search_by_key(&id, |(i, _, _)| *i)
            && let Some((_, key, _)) = self.order.remove(i)
        {
            self.forget(key);
        }
    }

    fn forget(&mut self, key: IpAddr) {
        if let Some(held) = self.open.get_mut(&key) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.open.remove(&key);
            }
        }
    }

    /// Connections admitted and not released.
    pub fn open(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// An admission's id and the id it evicted.
    struct Ids {
        id: u64,
        evicted: Option<u64>,
    }

    /// The ids of `admit`, unwrapped.
    fn admit(b: &mut SourceBudget, s: &str) -> Ids {
        let a = b.admit(ip(s), ()).unwrap();
        Ids {
            id: a.id,
            evicted: a.evicted.map(|(id, ())| id),
        }
    }

    #[test]
    fn per_source_limits_refuse_and_the_total_evicts_the_oldest() {
        let mut b = SourceBudget::new(2, 3);
        let first = admit(&mut b, "192.0.2.1");
        assert_eq!(first.evicted, None);
        let second = admit(&mut b, "192.0.2.1");
        assert_eq!(b.admit(ip("192.0.2.1"), ()), Err(Refusal::SourceLimit));
        let third = admit(&mut b, "192.0.2.2");
        assert_eq!(third.evicted, None);
        assert_eq!(b.open(), 3);
        // Full: a fourth source gets in, the oldest goes, and its source
        // may open one again.
        let fourth = admit(&mut b, "192.0.2.3");
        assert_eq!(fourth.evicted, Some(first.id));
        assert_eq!(b.open(), 3);
        let again = admit(&mut b, "192.0.2.1");
        assert_eq!(again.evicted, Some(second.id));
        // Releasing an evicted connection, or one never admitted, changes
        // nothing; releasing an open one makes room without an eviction.
        b.release(first.id);
        b.release(999);
        assert_eq!(b.open(), 3);
        b.release(fourth.id);
        assert_eq!(b.open(), 2);
        assert_eq!(admit(&mut b, "192.0.2.4").evicted, None);
        assert_eq!(admit(&mut b, "192.0.2.5").evicted, Some(third.id));
        // A source past its own limit evicts nobody.
        let mut b = SourceBudget::new(1, 1);
        let only = admit(&mut b, "192.0.2.9");
        assert_eq!(b.admit(ip("192.0.2.9"), ()), Err(Refusal::SourceLimit));
        assert_eq!(admit(&mut b, "192.0.2.8").evicted, Some(only.id));
    }

    #[test]
    fn an_ipv6_host_counts_as_its_64() {
        let mut b = SourceBudget::new(1, 10);
        admit(&mut b, "2001:db8:1:2::1");
        assert_eq!(
            b.admit(ip("2001:db8:1:2::ffff"), ()),
            Err(Refusal::SourceLimit)
        );
        admit(&mut b, "2001:db8:1:3::1");
        // A mapped IPv4 address counts as the IPv4 address.
        let v4 = admit(&mut b, "192.0.2.7");
        assert_eq!(
            b.admit(ip("::ffff:192.0.2.7"), ()),
            Err(Refusal::SourceLimit)
        );
        b.release(v4.id);
        admit(&mut b, "::ffff:192.0.2.7");
    }
}
