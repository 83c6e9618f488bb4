//! Admission of connections that have not yet authenticated, per source
//! and in all.
//!
//! A TCP connection costs the broker a file descriptor from its accept
//! until it closes; before a client certificate is shown anyone can open
//! one. [`SourceBudget`] bounds how many such connections one source (an
//! IPv4 address, or an IPv6 /64, which one host may own whole) and all
//! sources together hold. The shell admits at accept and releases when the
//! connection closes or proves its identity.

use std::collections::BTreeMap;
use std::net::IpAddr;

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Its source holds as many as one source may.
    #[error("too many unauthenticated connections from this source")]
    SourceLimit,
    /// All sources together hold as many as the listener allows.
    #[error("too many unauthenticated connections")]
    TotalLimit,
}

impl Refusal {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::SourceLimit => "source_limit",
            Refusal::TotalLimit => "limit",
        }
    }
}

/// Counts of admitted connections against a per-source and a total limit.
#[derive(Debug, Clone)]
pub struct SourceBudget {
    per_source: usize,
    total: usize,
    open: BTreeMap<IpAddr, usize>,
    open_total: usize,
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

impl SourceBudget {
    /// A budget of `per_source` connections per source and `total` in all.
    pub fn new(per_source: usize, total: usize) -> Self {
        Self {
            per_source,
            total,
            open: BTreeMap::new(),
            open_total: 0,
        }
    }

    /// Admits a connection from `ip`, or says why not.
    pub fn admit(&mut self, ip: IpAddr) -> Result<(), Refusal> {
        if self.open_total >= self.total {
            return Err(Refusal::TotalLimit);
        }
        let held = self.open.entry(source_key(ip)).or_insert(0);
        if *held >= self.per_source {
            return Err(Refusal::SourceLimit);
        }
        *held += 1;
        self.open_total += 1;
        Ok(())
    }

    /// Releases a connection admitted from `ip`.
    pub fn release(&mut self, ip: IpAddr) {
        let key = source_key(ip);
        if let Some(held) = self.open.get_mut(&key) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.open.remove(&key);
            }
            self.open_total = self.open_total.saturating_sub(1);
        }
    }

    /// Connections admitted and not released.
    pub fn open(&self) -> usize {
        self.open_total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_source_and_total_limits() {
        let mut b = SourceBudget::new(2, 3);
        assert_eq!(b.admit(ip("192.0.2.1")), Ok(()));
        assert_eq!(b.admit(ip("192.0.2.1")), Ok(()));
        assert_eq!(b.admit(ip("192.0.2.1")), Err(Refusal::SourceLimit));
        assert_eq!(b.admit(ip("192.0.2.2")), Ok(()));
        assert_eq!(b.admit(ip("192.0.2.3")), Err(Refusal::TotalLimit));
        b.release(ip("192.0.2.1"));
        assert_eq!(b.open(), 2);
        assert_eq!(b.admit(ip("192.0.2.3")), Ok(()));
        // Releasing what was never admitted changes nothing.
        b.release(ip("198.51.100.9"));
        assert_eq!(b.open(), 3);
    }

    #[test]
    fn an_ipv6_host_counts_as_its_64() {
        let mut b = SourceBudget::new(1, 10);
        assert_eq!(b.admit(ip("2001:db8:1:2::1")), Ok(()));
        assert_eq!(b.admit(ip("2001:db8:1:2::ffff")), Err(Refusal::SourceLimit));
        assert_eq!(b.admit(ip("2001:db8:1:3::1")), Ok(()));
        // A mapped IPv4 address counts as the IPv4 address.
        assert_eq!(b.admit(ip("192.0.2.7")), Ok(()));
        assert_eq!(b.admit(ip("::ffff:192.0.2.7")), Err(Refusal::SourceLimit));
        b.release(ip("2001:db8:1:2::ffff"));
        assert_eq!(b.admit(ip("2001:db8:1:2::2")), Ok(()));
    }
}
