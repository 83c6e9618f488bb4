//! Site identities: `spiffe://<trust-domain>/region/<region>/site/<site-id>`.

use std::fmt;

pub use tether_proto::ids::TrustDomain;
use tether_proto::ids::{IdError, RegionId, SiteId, TrustDomainError};
use thiserror::Error;

/// Why an identity or trust domain is not valid.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdentityError {
    /// The trust domain breaks the naming rules.
    #[error(transparent)]
    BadTrustDomain(#[from] TrustDomainError),
    /// The URI is not a SPIFFE ID.
    #[error(
        "{0:?} is not a SPIFFE ID (expected spiffe://<trust-domain>/region/<region>/site/<site>)"
    )]
    NotSpiffe(String),
    /// The SPIFFE ID belongs to another trust domain.
    #[error("identity belongs to trust domain {found:?}, expected {expected:?}")]
    WrongTrustDomain {
        /// The deployment's trust domain.
        expected: String,
        /// The one in the identity.
        found: String,
    },
    /// The path is not `/region/<region>/site/<site>`.
    #[error("SPIFFE path {0:?} is not /region/<region>/site/<site>")]
    BadPath(String),
    /// The region or site breaks the label rules.
    #[error(transparent)]
    BadId(#[from] IdError),
    /// The certificate carries no SPIFFE ID, or more than one.
    #[error("certificate must carry exactly one spiffe:// URI SAN, found {0}")]
    SpiffeCount(usize),
}

/// The identity of an edge site, carried as the URI SAN of its certificate.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SiteIdentity {
    /// The deployment's trust domain.
    pub trust_domain: TrustDomain,
    /// The site's region.
    pub region: RegionId,
    /// The site's id within the region.
    pub site: SiteId,
}

impl SiteIdentity {
    /// An identity from its parts.
    pub fn new(trust_domain: TrustDomain, region: RegionId, site: SiteId) -> Self {
        Self {
            trust_domain,
            region,
            site,
        }
    }

    /// The SPIFFE ID URI.
    pub fn uri(&self) -> String {
        format!(
            "spiffe://{}/region/{}/site/{}",
            self.trust_domain, self.region, self.site
        )
    }

    /// Parses a SPIFFE ID, requiring `expected` as its trust domain.
    pub fn parse(uri: &str, expected: &TrustDomain) -> Result<Self, IdentityError> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::NotSpiffe(uri.to_string()))?;
        let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        if domain != expected.as_str() {
            return Err(IdentityError::WrongTrustDomain {
                expected: expected.to_string(),
                found: domain.to_string(),
            });
        }
        let parts: Vec<&str> = path.split('/').collect();
        let ["region", region, "site", site] = parts.as_slice() else {
            return Err(IdentityError::BadPath(format!("/{path}")));
        };
        Ok(Self {
            trust_domain: expected.clone(),
            region: RegionId::new(*region)?,
            site: SiteId::new(*site)?,
        })
    }
}

impl fmt::Display for SiteIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("tether.example.org").unwrap()
    }

    #[test]
    fn round_trip() {
        let id = SiteIdentity::new(
            td(),
            RegionId::new("eu").unwrap(),
            SiteId::new("lab-1").unwrap(),
        );
        assert_eq!(id.uri(), "spiffe://tether.example.org/region/eu/site/lab-1");
        assert_eq!(SiteIdentity::parse(&id.uri(), &td()), Ok(id));
    }

    #[test]
    fn rejections_name_the_problem() {
        assert!(matches!(
            SiteIdentity::parse("https://x/region/eu/site/a", &td()),
            Err(IdentityError::NotSpiffe(_))
        ));
        assert!(matches!(
            SiteIdentity::parse("spiffe://evil.org/region/eu/site/a", &td()),
            Err(IdentityError::WrongTrustDomain { .. })
        ));
        assert!(matches!(
            SiteIdentity::parse("spiffe://tether.example.org/site/a", &td()),
            Err(IdentityError::BadPath(_))
        ));
        assert!(matches!(
            SiteIdentity::parse("spiffe://tether.example.org/region/eu/site/Lab_1", &td()),
            Err(IdentityError::BadId(_))
        ));
        let err =
            SiteIdentity::parse("spiffe://tether.example.org/region/EU/site/a", &td()).unwrap_err();
        assert!(err.to_string().contains("uppercase"), "{err}");
    }
}
