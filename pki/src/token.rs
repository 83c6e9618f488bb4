//! Enrollment tokens: one-time, expiring secrets bound to a site and region.
//!
//! A token is 160 random bits, shown to the operator once
//! (`tt1-<32 base32 characters>`). The broker stores only its SHA-256 hash
//! together with the site and region it enrolls, so a leaked store does not
//! leak usable tokens. Redemption removes the record atomically
//! ([`TokenLedger::take`]): of any number of concurrent attempts, exactly one
//! obtains it.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use data_encoding::BASE32_NOPAD;
use sha2::{Digest, Sha256};
use tether_proto::ids::{RegionId, SiteId};
use thiserror::Error;

/// Prefix of every token; it versions the format and makes tokens easy to
/// recognise in logs and secret scanners.
pub const TOKEN_PREFIX: &str = "tt1-";
/// Random bytes in a token (160 bits).
pub const TOKEN_BYTES: usize = 20;
/// How long a token stays valid unless the operator says otherwise.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// SHA-256 of a token: the only form in which tokens are stored.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    /// Lowercase hex, the form used as a store key.
    pub fn to_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0)
    }

    /// Parses [`to_hex`](Self::to_hex) output.
    pub fn from_hex(hex: &str) -> Option<Self> {
        let bytes = data_encoding::HEXLOWER.decode(hex.as_bytes()).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({})", self.to_hex())
    }
}

/// What the broker keeps about an unredeemed token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Hash of the secret.
    pub hash: TokenHash,
    /// The site the token enrolls.
    pub site: SiteId,
    /// The site's region.
    pub region: RegionId,
    /// When it was created.
    pub created_at: SystemTime,
    /// When it stops being accepted.
    pub expires_at: SystemTime,
    /// A newer token was created for the same site: this one is kept only
    /// to say so when it is used.
    pub replaced: bool,
}

/// A freshly generated token: the secret (show it once) and its record.
#[derive(Clone)]
pub struct IssuedToken {
    /// The secret to hand to the field engineer.
    pub secret: String,
    /// What the broker stores.
    pub record: TokenRecord,
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedToken")
            .field("secret", &"<redacted>")
            .field("record", &self.record)
            .finish()
    }
}

/// Why a token cannot be redeemed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RedeemError {
    /// The text is not a tether enrollment token.
    #[error(
        "this is not a tether enrollment token (tokens look like {TOKEN_PREFIX}xxxx…, 36 characters); check for copy/paste mistakes"
    )]
    Malformed,
    /// No such token: never issued, already used, or revoked.
    #[error("the enrollment token is unknown or was already used; ask the operator for a new one")]
    Unknown,
    /// A newer token was created for the same site, which invalidates
    /// this one: only the operator's latest code for a site is valid.
    #[error(
        "this code was replaced by a newer one for the same site; use the newest code the operator created for it"
    )]
    Replaced,
    /// The token expired before it was used.
    #[error("the enrollment token expired {ago} ago; ask the operator for a new one")]
    Expired {
        /// How long ago, for humans.
        ago: String,
    },
    /// The store failed.
    #[error("token store failed: {0}")]
    Ledger(String),
}

/// Where token records live. [`take`](Self::take) must be atomic.
pub trait TokenLedger {
    /// Stores a new record and, in the same atomic step, marks every
    /// earlier unredeemed record of the same site as
    /// [`replaced`](TokenRecord::replaced): one valid code per site.
    fn put(&self, record: TokenRecord) -> Result<(), String>;
    /// Removes and returns the record for `hash`, atomically: when several
    /// callers race, at most one receives `Some`.
    fn take(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, String>;
}

/// Generates a token for `site` in `region`, valid for `ttl` from `now`.
pub fn generate(site: SiteId, region: RegionId, now: SystemTime, ttl: Duration) -> IssuedToken {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::fill(&mut bytes);
    let secret = format!(
        "{TOKEN_PREFIX}{}",
        BASE32_NOPAD.encode(&bytes).to_ascii_lowercase()
    );
    let hash = hash_unchecked(&secret);
    IssuedToken {
        secret,
        record: TokenRecord {
            hash,
            site,
            region,
            created_at: now,
            expires_at: now + ttl,
            replaced: false,
        },
    }
}

fn hash_unchecked(secret: &str) -> TokenHash {
    TokenHash(Sha256::digest(secret.as_bytes()).into())
}

/// An enrollment code as a field engineer receives it: the token and,
/// after a dash, the pin of the CA that signs the broker's certificate
/// (`tt1-<32 characters>-<26 characters>`), so the site can authenticate
/// the broker before it has the CA.
#[derive(Clone, PartialEq, Eq)]
pub struct EnrollmentCode {
    /// The token part, `tt1-…`.
    pub secret: String,
    /// The CA pin, if the code carries one.
    pub ca_pin: Option<String>,
}

impl fmt::Debug for EnrollmentCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollmentCode")
            .field("secret", &"<redacted>")
            .field("ca_pin", &self.ca_pin)
            .finish()
    }
}

/// Length of a CA pin in base32 characters (128 bits).
pub const CA_PIN_LEN: usize = 26;

impl EnrollmentCode {
    /// Joins a token and a CA pin.
    pub fn format(secret: &str, ca_pin: &str) -> String {
        format!("{secret}-{ca_pin}")
    }

    /// Parses a code (or a bare token), tolerating surrounding whitespace
    /// and upper case.
    pub fn parse(text: &str) -> Result<Self, RedeemError> {
        let text = text.trim().to_ascii_lowercase();
        let body = text
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(RedeemError::Malformed)?;
        let (secret_part, pin) = match body.split_once('-') {
            Some((s, p)) => (s, Some(p)),
            None => (body, None),
        };
        let decoded = BASE32_NOPAD
            .decode(secret_part.to_ascii_uppercase().as_bytes())
            .map_err(|_| RedeemError::Malformed)?;
        if decoded.len() != TOKEN_BYTES {
            return Err(RedeemError::Malformed);
        }
        if let Some(pin) = pin
            && (pin.len() != CA_PIN_LEN
                || BASE32_NOPAD
                    .decode(pin.to_ascii_uppercase().as_bytes())
                    .is_err())
        {
            return Err(RedeemError::Malformed);
        }
        Ok(Self {
            secret: format!("{TOKEN_PREFIX}{secret_part}"),
            ca_pin: pin.map(str::to_string),
        })
    }
}

/// The hash of a token (or of the token part of an enrollment code), after
/// checking that it looks like one.
pub fn hash_secret(text: &str) -> Result<TokenHash, RedeemError> {
    let code = EnrollmentCode::parse(text)?;
    Ok(hash_unchecked(&code.secret))
}

/// Redeems `secret` at `now`: the token is consumed whatever the outcome of
/// the expiry check, so an expired token cannot be retried either.
pub fn redeem<L: TokenLedger + ?Sized>(
    ledger: &L,
    secret: &str,
    now: SystemTime,
) -> Result<TokenRecord, RedeemError> {
    let hash = hash_secret(secret)?;
    let record = ledger
        .take(&hash)
        .map_err(RedeemError::Ledger)?
        .ok_or(RedeemError::Unknown)?;
    if record.replaced {
        return Err(RedeemError::Replaced);
    }
    if now >= record.expires_at {
        let ago = now.duration_since(record.expires_at).unwrap_or_default();
        return Err(RedeemError::Expired { ago: humanize(ago) });
    }
    Ok(record)
}

fn humanize(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0..=119 => format!("{secs} s"),
        120..=7199 => format!("{} min", secs / 60),
        7200..=172_799 => format!("{} h", secs / 3600),
        _ => format!("{} days", secs / 86_400),
    }
}

/// Seconds since the Unix epoch, for stores that keep plain integers.
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// The inverse of [`unix_secs`].
pub fn from_unix_secs(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// An in-memory ledger, for tests and single-process tools.
#[derive(Debug, Default)]
pub struct MemoryLedger {
    records: Mutex<HashMap<TokenHash, TokenRecord>>,
}

impl TokenLedger for MemoryLedger {
    fn put(&self, record: TokenRecord) -> Result<(), String> {
        let mut records = self
            .records
            .lock()
            .map_err(|_| "ledger lock poisoned".to_string())?;
        for earlier in records.values_mut() {
            if earlier.site == record.site {
                earlier.replaced = true;
            }
        }
        records.insert(record.hash, record);
        Ok(())
    }

    fn take(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, String> {
        let mut records = self
            .records
            .lock()
            .map_err(|_| "ledger lock poisoned".to_string())?;
        Ok(records.remove(hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier};

    fn ids() -> (SiteId, RegionId) {
        (SiteId::new("lab-1").unwrap(), RegionId::new("eu").unwrap())
    }

    #[test]
    fn format_and_entropy() {
        let (site, region) = ids();
        let t = generate(site, region, SystemTime::now(), DEFAULT_TOKEN_TTL);
        assert!(t.secret.starts_with(TOKEN_PREFIX));
        assert_eq!(t.secret.len(), TOKEN_PREFIX.len() + 32);
        assert_eq!(hash_secret(&t.secret), Ok(t.record.hash));
        // Pasting with surrounding whitespace or in upper case still works.
        assert_eq!(
            hash_secret(&format!(
                "  {}\n",
                t.secret.to_uppercase().replace("TT1-", "tt1-")
            )),
            Ok(t.record.hash)
        );
        assert!(
            !format!("{t:?}").contains(&t.secret),
            "Debug must not print the secret"
        );
        let (site, region) = ids();
        let other = generate(site, region, SystemTime::now(), DEFAULT_TOKEN_TTL);
        assert_ne!(t.secret, other.secret);
        assert_eq!(hash_secret("tt1-short"), Err(RedeemError::Malformed));
        assert_eq!(hash_secret("hello"), Err(RedeemError::Malformed));
        // A full enrollment code hashes like its token part.
        let pin = BASE32_NOPAD.encode(&[7u8; 16]).to_ascii_lowercase();
        let code = EnrollmentCode::format(&t.secret, &pin);
        assert_eq!(hash_secret(&code), Ok(t.record.hash));
        let parsed = EnrollmentCode::parse(&code).unwrap();
        assert_eq!(parsed.ca_pin.as_deref(), Some(pin.as_str()));
        assert!(!format!("{parsed:?}").contains(&t.secret[4..]));
        assert_eq!(
            hash_secret(&format!("{}-short", t.secret)),
            Err(RedeemError::Malformed)
        );
    }

    #[test]
    fn single_use_and_expiry() {
        let ledger = MemoryLedger::default();
        let now = SystemTime::now();
        let (site, region) = ids();
        let t = generate(site.clone(), region.clone(), now, Duration::from_secs(60));
        ledger.put(t.record.clone()).unwrap();
        let record = redeem(&ledger, &t.secret, now + Duration::from_secs(10)).unwrap();
        assert_eq!((record.site, record.region), (site.clone(), region.clone()));
        assert_eq!(redeem(&ledger, &t.secret, now), Err(RedeemError::Unknown));

        let late = generate(site, region, now, Duration::from_secs(60));
        ledger.put(late.record.clone()).unwrap();
        let err = redeem(&ledger, &late.secret, now + Duration::from_secs(3600)).unwrap_err();
        assert_eq!(
            err,
            RedeemError::Expired {
                ago: "59 min".into()
            }
        );
        // Consumed even though it was refused.
        assert_eq!(
            redeem(&ledger, &late.secret, now),
            Err(RedeemError::Unknown)
        );
    }

    #[test]
    fn concurrent_redemption_succeeds_exactly_once() {
        let ledger = Arc::new(MemoryLedger::default());
        let (site, region) = ids();
        let now = SystemTime::now();
        let t = generate(site, region, now, DEFAULT_TOKEN_TTL);
        ledger.put(t.record.clone()).unwrap();
        let threads = 16;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (ledger, barrier, secret) = (ledger.clone(), barrier.clone(), t.secret.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    redeem(ledger.as_ref(), &secret, now).is_ok()
                })
            })
            .collect();
        let wins = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|&ok| ok)
            .count();
        assert_eq!(wins, 1);
    }
}
