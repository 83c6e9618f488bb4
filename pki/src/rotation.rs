//! CA rotation: its phases, the trust bundle of each, and which CA signs.
//!
//! A deployment's CA state is one value, [`CaState`], kept in the broker's
//! store so every broker sharing the store signs with the same CA and
//! trusts the same bundle. A rotation moves through three phases, each
//! undoable until the last step:
//!
//! | phase      | trust bundle      | signs leaves and server certificates |
//! |------------|-------------------|--------------------------------------|
//! | `stable`   | current           | current                              |
//! | `prepared` | current, next     | current                              |
//! | `active`   | current, next     | next                                 |
//!
//! `rotate` goes one step forward: stable → prepared (a new CA is made),
//! prepared → active, active → stable with the next CA as the only one (the
//! old CA is *retired*). Retiring waits until every site certificate the
//! old CA signed has expired (one site-certificate lifetime after the
//! switch to active), so no connected site is cut off: by then each has
//! renewed into the new CA and received the new bundle.
//!
//! `rollback` goes one step back: prepared → stable drops the next CA,
//! active → prepared makes the current CA sign again. Dropping the next CA
//! after a rollback from active also waits one certificate lifetime, so
//! that the certificates it signed meanwhile have expired.
//!
//! Every decision is a pure function of the state and `now` (Unix
//! seconds), tested below without a clock.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::kek::StoredKey;

/// A CA certificate, PEM, and its private key as stored (sealed under the
/// key-encryption key, or in clear in records of earlier versions).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaPem {
    /// The certificate.
    pub cert: String,
    /// The private key (PKCS#8 PEM, sealed).
    pub key: StoredKey,
}

impl CaPem {
    /// Whether the key is sealed.
    pub fn is_sealed(&self) -> bool {
        self.key.is_sealed()
    }
}

impl std::fmt::Debug for CaPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaPem").finish_non_exhaustive()
    }
}

/// The phase of a CA rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// One CA, trusted and signing.
    Stable,
    /// A next CA is trusted (published in the bundle); the current one
    /// still signs.
    Prepared,
    /// The next CA signs; both are trusted.
    Active,
}

impl Phase {
    /// Every phase, for metric labels.
    pub const ALL: [Phase; 3] = [Phase::Stable, Phase::Prepared, Phase::Active];

    /// The phase's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Stable => "stable",
            Phase::Prepared => "prepared",
            Phase::Active => "active",
        }
    }
}

/// Why a rotation step is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RotationError {
    /// Rollback with no rotation under way.
    #[error(
        "no rotation is under way, there is nothing to roll back (a retired CA cannot come back)"
    )]
    NothingToRollBack,
    /// Retiring the old CA before its site certificates expired.
    #[error(
        "the old CA cannot be retired yet: site certificates it signed stay valid for another {0} s; \
         retiring now would cut off sites that have not renewed (try again then)"
    )]
    OldLeavesValid(u64),
    /// Dropping the next CA before the certificates it signed expired.
    #[error(
        "the new CA cannot be dropped yet: site certificates it signed stay valid for another {0} s; \
         dropping it now would cut off sites that renewed into it (try again then)"
    )]
    NextLeavesValid(u64),
    /// A rotation step found a state without the CA it needs.
    #[error("a rotation step in phase {0} lacks the new CA")]
    Inconsistent(&'static str),
}

/// The CA state of a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaState {
    /// The rotation phase.
    pub phase: Phase,
    /// The CA in use before a rotation; the only one when stable.
    pub current: CaPem,
    /// The CA being rotated in (prepared and active phases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<CaPem>,
    /// When the phase began, Unix seconds.
    pub since: u64,
    /// Until when site certificates signed by the current CA may be valid,
    /// Unix seconds (set when the next CA takes over signing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_leaves_until: Option<u64>,
    /// Until when site certificates signed by the next CA may be valid,
    /// Unix seconds (set when a rollback from active makes the current CA
    /// sign again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_leaves_until: Option<u64>,
    /// Counts changes; each step increments it.
    pub generation: u64,
}

impl CaState {
    /// A stable state with one CA.
    pub fn new(current: CaPem, now: u64) -> Self {
        Self {
            phase: Phase::Stable,
            current,
            next: None,
            since: now,
            current_leaves_until: None,
            next_leaves_until: None,
            generation: 0,
        }
    }

    /// The CA that signs in this phase.
    pub fn signer(&self) -> &CaPem {
        match (self.phase, &self.next) {
            (Phase::Active, Some(next)) => next,
            _ => &self.current,
        }
    }

    /// Every CA the state holds: the current one, then the next.
    pub fn cas_mut(&mut self) -> impl Iterator<Item = &mut CaPem> {
        std::iter::once(&mut self.current).chain(self.next.as_mut())
    }

    /// Whether every CA key is sealed.
    pub fn is_sealed(&self) -> bool {
        self.current.is_sealed() && self.next.as_ref().is_none_or(CaPem::is_sealed)
    }

    /// The trust bundle: every CA trusted in this phase, the signing one
    /// first.
    pub fn bundle(&self) -> Vec<&CaPem> {
        let mut out = vec![self.signer()];
        if self.phase != Phase::Stable {
            for ca in std::iter::once(&self.current).chain(self.next.as_ref()) {
                if !out.contains(&ca) {
                    out.push(ca);
                }
            }
        }
        out
    }

    fn step(mut self, phase: Phase, now: u64) -> Self {
        self.phase = phase;
        self.since = now;
        self.generation += 1;
        self
    }

    /// One step forward. `new_ca` is the CA to prepare (needed only when
    /// stable). `leaf_lifetime` is the site certificates' lifetime (plus
    /// any clock allowance the issuer backdates by).
    pub fn rotate(
        self,
        now: u64,
        leaf_lifetime: Duration,
        new_ca: Option<CaPem>,
    ) -> Result<Self, RotationError> {
        match self.phase {
            Phase::Stable => {
                let Some(new_ca) = new_ca else {
                    return Err(RotationError::Inconsistent("stable"));
                };
                let mut next = self.step(Phase::Prepared, now);
                next.next = Some(new_ca);
                next.current_leaves_until = None;
                next.next_leaves_until = None;
                Ok(next)
            }
            Phase::Prepared => {
                if self.next.is_none() {
                    return Err(RotationError::Inconsistent("prepared"));
                }
                let mut next = self.step(Phase::Active, now);
                next.current_leaves_until = Some(now.saturating_add(leaf_lifetime.as_secs()));
                next.next_leaves_until = None;
                Ok(next)
            }
            Phase::Active => {
                if let Some(until) = self.current_leaves_until
                    && now < until
                {
                    return Err(RotationError::OldLeavesValid(until - now));
                }
                let Some(new) = self.next.clone() else {
                    return Err(RotationError::Inconsistent("active"));
                };
                let mut next = self.step(Phase::Stable, now);
                next.current = new;
                next.next = None;
                next.current_leaves_until = None;
                next.next_leaves_until = None;
                Ok(next)
            }
        }
    }

    /// One step back (see the module documentation).
    pub fn rollback(self, now: u64, leaf_lifetime: Duration) -> Result<Self, RotationError> {
        match self.phase {
            Phase::Stable => Err(RotationError::NothingToRollBack),
            Phase::Prepared => {
                if let Some(until) = self.next_leaves_until
                    && now < until
                {
                    return Err(RotationError::NextLeavesValid(until - now));
                }
                let mut next = self.step(Phase::Stable, now);
                next.next = None;
                next.current_leaves_until = None;
                next.next_leaves_until = None;
                Ok(next)
            }
            Phase::Active => {
                let mut next = self.step(Phase::Prepared, now);
                next.next_leaves_until = Some(now.saturating_add(leaf_lifetime.as_secs()));
                next.current_leaves_until = None;
                Ok(next)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca(n: &str) -> CaPem {
        CaPem {
            cert: format!("cert {n}"),
            key: StoredKey::Clear(format!("key {n}")),
        }
    }

    const L: Duration = Duration::from_secs(100);

    #[test]
    fn a_full_rotation_publishes_first_signs_second_and_retires_last() {
        let s = CaState::new(ca("old"), 0);
        assert_eq!(s.bundle(), vec![&ca("old")]);
        let s = s.rotate(10, L, Some(ca("new"))).unwrap();
        assert_eq!(s.phase, Phase::Prepared);
        assert_eq!(s.signer(), &ca("old"));
        assert_eq!(s.bundle(), vec![&ca("old"), &ca("new")]);
        let s = s.rotate(20, L, None).unwrap();
        assert_eq!(s.phase, Phase::Active);
        assert_eq!(s.signer(), &ca("new"));
        assert_eq!(s.bundle(), vec![&ca("new"), &ca("old")]);
        // Leaves of the old CA issued up to t=20 live until t=120.
        let refused = s.clone().rotate(119, L, None).unwrap_err();
        assert_eq!(refused, RotationError::OldLeavesValid(1));
        assert!(refused.to_string().contains("another 1 s"), "{refused}");
        let s = s.rotate(120, L, None).unwrap();
        assert_eq!(s.phase, Phase::Stable);
        assert_eq!(s.bundle(), vec![&ca("new")]);
        assert_eq!(s.generation, 3);
        assert_eq!(
            s.rollback(121, L).unwrap_err(),
            RotationError::NothingToRollBack
        );
    }

    #[test]
    fn a_rollback_from_prepared_restores_the_old_state() {
        let s0 = CaState::new(ca("old"), 0);
        let s = s0.clone().rotate(10, L, Some(ca("new"))).unwrap();
        let back = s.rollback(11, L).unwrap();
        assert_eq!(back.phase, Phase::Stable);
        assert_eq!(back.current, s0.current);
        assert_eq!(back.next, None);
        assert_eq!(back.bundle(), s0.bundle());
    }

    #[test]
    fn a_rollback_from_active_signs_with_the_old_ca_and_keeps_trusting_the_new_until_its_leaves_expired()
     {
        let s = CaState::new(ca("old"), 0)
            .rotate(10, L, Some(ca("new")))
            .unwrap()
            .rotate(20, L, None)
            .unwrap();
        let s = s.rollback(30, L).unwrap();
        assert_eq!(s.phase, Phase::Prepared);
        assert_eq!(s.signer(), &ca("old"));
        assert_eq!(s.bundle(), vec![&ca("old"), &ca("new")]);
        assert_eq!(
            s.clone().rollback(129, L).unwrap_err(),
            RotationError::NextLeavesValid(1)
        );
        let s = s.rollback(130, L).unwrap();
        assert_eq!(s.phase, Phase::Stable);
        assert_eq!(s.bundle(), vec![&ca("old")]);
    }

    #[test]
    fn the_state_survives_its_stored_form() {
        let s = CaState::new(ca("old"), 0)
            .rotate(10, L, Some(ca("new")))
            .unwrap();
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains("\"phase\":\"prepared\""), "{text}");
        assert_eq!(serde_json::from_str::<CaState>(&text).unwrap(), s);
        assert!(format!("{:?}", s.current).find("key old").is_none());
    }
}
