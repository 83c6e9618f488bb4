//! The errors of the broker's operations that an operator or a site can
//! act on.

use tether_proto::broker::{AllocationError, TokenError};
use tether_proto::ids::{RegionId, SiteId};
use tether_proto::ipam::IpamError;
use thiserror::Error;

use crate::store::StoreError;

/// Errors an operator or a site can act on.
#[derive(Debug, Error)]
pub enum BrokerError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No address could be allocated.
    #[error(transparent)]
    Ipam(#[from] IpamError),
    /// The region is not configured.
    #[error("region {0} is not configured on this broker")]
    UnknownRegion(RegionId),
    /// The site id is taken in another region.
    #[error("site {site} already exists in region {existing}; site ids are unique across regions")]
    SiteInOtherRegion {
        /// The site.
        site: SiteId,
        /// Where it exists.
        existing: RegionId,
    },
    /// No such site.
    #[error("no site {site} in region {region}")]
    UnknownSite {
        /// The site.
        site: SiteId,
        /// The region.
        region: RegionId,
    },
    /// A bad duration.
    #[error("{0}")]
    BadInput(String),
    /// Allocation kept conflicting.
    #[error("address allocation kept conflicting with concurrent changes; try again")]
    Contention,
    /// The site is revoked.
    #[error("site {0} is revoked")]
    Revoked(SiteId),
    /// The site is not revoked (only a revoked site's addresses may be
    /// released).
    #[error("site {0} is not revoked; revoke it before releasing its addresses")]
    NotRevoked(SiteId),
    /// Certificate issuance failed.
    #[error(transparent)]
    Pki(#[from] tether_pki::PkiError),
}

impl From<AllocationError> for BrokerError {
    fn from(e: AllocationError) -> Self {
        match e {
            AllocationError::UnknownRegion(r) => BrokerError::UnknownRegion(r),
            AllocationError::Revoked(s) => BrokerError::Revoked(s),
            AllocationError::NotRevoked(s) => BrokerError::NotRevoked(s),
            AllocationError::Ipam(e) => BrokerError::Ipam(e),
            AllocationError::Contention => BrokerError::Contention,
            AllocationError::Store(e) => BrokerError::Store(StoreError(e)),
        }
    }
}

impl From<TokenError> for BrokerError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::UnknownRegion(r) => BrokerError::UnknownRegion(r),
            TokenError::BadTtl => BrokerError::BadInput(e.to_string()),
            TokenError::SiteInOtherRegion { site, existing } => {
                BrokerError::SiteInOtherRegion { site, existing }
            }
        }
    }
}
