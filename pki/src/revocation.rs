//! The revocation set: identities and certificate serials no longer trusted.
//!
//! The TLS verifiers consult it at every handshake. Shells register a
//! listener to learn of new revocations as they happen, so they can close the
//! live sessions of a revoked identity; the callback is synchronous and must
//! not block (typically it sends on a channel).

use std::collections::BTreeSet;
use std::sync::{Mutex, RwLock};

use crate::identity::SiteIdentity;

/// One revocation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Revoked {
    /// Every certificate of this identity.
    Site(SiteIdentity),
    /// The certificate with this serial number (DER bytes).
    Serial(Vec<u8>),
}

type Listener = Box<dyn Fn(&Revoked) + Send + Sync>;

/// Shared, thread-safe set of revocations.
#[derive(Default)]
pub struct RevocationSet {
    entries: RwLock<BTreeSet<Revoked>>,
    listeners: Mutex<Vec<Listener>>,
}

impl std::fmt::Debug for RevocationSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationSet")
            .field(
                "entries",
                &self.entries.read().map(|e| e.len()).unwrap_or(0),
            )
            .finish()
    }
}

impl RevocationSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// A set holding `entries` (loaded from a store); no listeners fire.
    pub fn from_entries(entries: impl IntoIterator<Item = Revoked>) -> Self {
        Self {
            entries: RwLock::new(entries.into_iter().collect()),
            listeners: Mutex::new(Vec::new()),
        }
    }

    /// Whether a certificate with this identity and serial is revoked.
    pub fn is_revoked(&self, identity: &SiteIdentity, serial: &[u8]) -> bool {
        let Ok(entries) = self.entries.read() else {
            // A poisoned lock means a writer panicked: fail closed.
            return true;
        };
        entries.contains(&Revoked::Site(identity.clone()))
            || entries.contains(&Revoked::Serial(serial.to_vec()))
    }

    /// Adds a revocation and tells the listeners. Returns whether it was new.
    pub fn revoke(&self, entry: Revoked) -> bool {
        let inserted = match self.entries.write() {
            Ok(mut entries) => entries.insert(entry.clone()),
            Err(_) => false,
        };
        if inserted && let Ok(listeners) = self.listeners.lock() {
            for listener in listeners.iter() {
                listener(&entry);
            }
        }
        inserted
    }

    /// Lifts a revocation (e.g. an operator re-admits a site with a new
    /// token). Returns whether it was present.
    pub fn reinstate(&self, entry: &Revoked) -> bool {
        self.entries
            .write()
            .map(|mut entries| entries.remove(entry))
            .unwrap_or(false)
    }

    /// Every revocation.
    pub fn entries(&self) -> Vec<Revoked> {
        self.entries
            .read()
            .map(|e| e.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Calls `listener` for every revocation added from now on.
    pub fn on_revoke(&self, listener: impl Fn(&Revoked) + Send + Sync + 'static) {
        if let Ok(mut listeners) = self.listeners.lock() {
            listeners.push(Box::new(listener));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::TrustDomain;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tether_proto::ids::{RegionId, SiteId};

    #[test]
    fn revoke_notifies_once_and_reinstate_lifts() {
        let set = RevocationSet::new();
        let id = SiteIdentity::new(
            TrustDomain::new("t.example").unwrap(),
            RegionId::new("eu").unwrap(),
            SiteId::new("a").unwrap(),
        );
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        set.on_revoke(move |_| {
            c.fetch_add(1, Ordering::SeqCst);
        });
        assert!(!set.is_revoked(&id, &[1]));
        assert!(set.revoke(Revoked::Site(id.clone())));
        assert!(!set.revoke(Revoked::Site(id.clone())));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(set.is_revoked(&id, &[1]));
        assert!(set.reinstate(&Revoked::Site(id.clone())));
        assert!(!set.is_revoked(&id, &[1]));
        set.revoke(Revoked::Serial(vec![1]));
        assert!(set.is_revoked(&id, &[1]));
        assert!(!set.is_revoked(&id, &[2]));
    }
}
