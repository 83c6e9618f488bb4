//! The broker's QUIC connection IDs: 8 bytes, of which 6 are random and 2
//! a keyed signature, with the key kept in the data directory.
//!
//! Two properties matter, both across a restart (even `kill -9`):
//!
//! - **A connection of the previous life is recognised**, so its next
//!   packet draws a stateless reset and its site reconnects within a round
//!   trip: the signature is checked with the same key after the restart
//!   (quinn's `validate`), and a packet whose ID was not issued by this
//!   broker draws nothing.
//! - **A new connection never takes an ID a site of the previous life still
//!   uses.** The restarted broker does not know those IDs, so it cannot avoid
//!   them; only a large random part makes a clash unlikely. quinn's own keyed
//!   generator has 3 random bytes (16.7 million IDs): with 1,000 sites, each
//!   connection issuing several IDs, about one restart in three gave a new
//!   connection the ID of an old site, whose packets then went to that new
//!   connection, failed to decrypt there and drew no reset, so the site
//!   waited for its idle timeout (8 s more than the others). With 50,000
//!   sites it would be hundreds per restart. Six random bytes (2^48) make it
//!   about 10^-4 per restart at 50,000 sites.
//!
//! The signature is two bytes of HMAC-SHA256 over the random part: one
//! random packet in 65,536 that looks like QUIC draws a reset, which is
//! always smaller than the packet, so it amplifies nothing. IDs in quinn's
//! former format (issued by a broker before this one, with the same key)
//! are recognised too, so an upgrade restart still resets every old
//! connection.

use std::time::Duration;

use quinn_proto::{ConnectionId, ConnectionIdGenerator, HashedConnectionIdGenerator, InvalidCid};

/// Random bytes of an ID.
const NONCE_LEN: usize = 6;
/// Signature bytes of an ID.
const SIGNATURE_LEN: usize = 2;
/// Length of the broker's connection IDs (quinn's default length, so the
/// tunnel's packet budget is unchanged).
pub const CID_LEN: usize = NONCE_LEN + SIGNATURE_LEN;

/// Generates and recognises the broker's connection IDs.
pub struct SignedCids {
    key: ring::hmac::Key,
    /// The former format (quinn's keyed hash), only recognised.
    former: HashedConnectionIdGenerator,
    /// Where the random parts come from (a CSPRNG seeded by the system).
    rng: rand::rngs::StdRng,
}

impl SignedCids {
    /// A generator with the 8-byte secret `key` (kept in the data
    /// directory, so IDs survive a restart).
    pub fn from_key(key: u64) -> Self {
        Self::with_rng(key, rand::SeedableRng::from_rng(&mut rand::rng()))
    }

    /// A generator drawing its random parts from `rng` (seeded in tests).
    pub fn with_rng(key: u64, rng: rand::rngs::StdRng) -> Self {
        Self {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.to_le_bytes()),
            former: HashedConnectionIdGenerator::from_key(key),
            rng,
        }
    }

    fn signature(&self, nonce: &[u8]) -> [u8; SIGNATURE_LEN] {
        let mut ctx = ring::hmac::Context::with_key(&self.key);
        ctx.update(b"tether broker connection id");
        ctx.update(nonce);
        let tag = ctx.sign();
        let mut out = [0; SIGNATURE_LEN];
        out.copy_from_slice(&tag.as_ref()[..SIGNATURE_LEN]);
        out
    }
}

impl ConnectionIdGenerator for SignedCids {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut bytes = [0u8; CID_LEN];
        rand::Rng::fill_bytes(&mut self.rng, &mut bytes[..NONCE_LEN]);
        let signature = self.signature(&bytes[..NONCE_LEN]);
        bytes[NONCE_LEN..].copy_from_slice(&signature);
        ConnectionId::new(&bytes)
    }

    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        if cid.len() != CID_LEN {
            return Err(InvalidCid);
        }
        let (nonce, signature) = cid.split_at(NONCE_LEN);
        if self.signature(nonce)[..] == signature[..] {
            return Ok(());
        }
        self.former.validate(cid)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashSet;

    use rand::SeedableRng;

    use super::*;

    fn seeded(key: u64, seed: u64) -> SignedCids {
        SignedCids::with_rng(key, rand::rngs::StdRng::seed_from_u64(seed))
    }

    #[test]
    fn ids_are_recognised_after_a_restart_and_others_are_not() {
        let mut before = seeded(7, 1);
        let after = seeded(7, 2);
        for _ in 0..1000 {
            let cid = before.generate_cid();
            assert_eq!(cid.len(), CID_LEN);
            assert!(after.validate(&cid).is_ok(), "the same key recognises it");
        }
        // Another key: only a signature's chance (1 in 65,536 each).
        let mut stranger = seeded(8, 4);
        let accepted = (0..10_000)
            .filter(|_| after.validate(&stranger.generate_cid()).is_ok())
            .count();
        assert!(accepted <= 3, "{accepted} of 10,000 foreign IDs accepted");
    }

    #[test]
    fn ids_of_the_former_format_are_recognised() {
        let mut former = HashedConnectionIdGenerator::from_key(7);
        let now = seeded(7, 1);
        for _ in 0..100 {
            assert!(now.validate(&former.generate_cid()).is_ok());
        }
    }

    /// The restart of a broker holding many sites: the IDs the sites of the
    /// previous life still use, and those the new life issues to the sites
    /// reconnecting. A shared ID sends an old site's packets into a new
    /// connection, where they draw no reset. 20,000 on each side: with
    /// quinn's 3 random bytes about 24 IDs are shared (the test fails);
    /// with 6, about 10^-6.
    #[test]
    fn a_restart_issues_no_id_a_site_of_the_previous_life_still_uses() {
        let mut old_life = seeded(7, 11);
        let mut new_life = seeded(7, 12);
        let old: HashSet<ConnectionId> = (0..20_000).map(|_| old_life.generate_cid()).collect();
        let shared = (0..20_000)
            .filter(|_| old.contains(&new_life.generate_cid()))
            .count();
        assert_eq!(shared, 0, "IDs shared across the restart");
    }
}
