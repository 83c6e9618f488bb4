//! Cross-crate tests without privileges: simulations on a fake clock and
//! loopback integration tests. The tests live in `tests/`; this library
//! holds what they share.

use std::sync::Mutex;

use tether_proto::ipam::{Conflict, RegionLeases, Txn};

/// A compare-and-set store of one region's leases, shared by simulated
/// brokers: the contract the embedded store and etcd both provide.
#[derive(Debug, Default)]
pub struct CasStore {
    leases: Mutex<RegionLeases>,
}

impl CasStore {
    /// A consistent snapshot.
    pub fn snapshot(&self) -> RegionLeases {
        self.leases.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Applies `txn` if its expected version is current.
    pub fn commit(&self, txn: &Txn) -> Result<(), Conflict> {
        let mut leases = self.leases.lock().map_err(|_| Conflict {
            expected: txn.expected_version,
            found: u64::MAX,
        })?;
        leases.apply(txn)
    }
}
