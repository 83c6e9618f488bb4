//! tether's public key infrastructure.
//!
//! - [`ca`]: the deployment's certificate authority (ECDSA P-256), issuing
//!   site certificates from CSRs and broker server certificates.
//! - [`identity`]: site identities as SPIFFE IDs,
//!   `spiffe://<trust-domain>/region/<region>/site/<site-id>`.
//! - [`token`]: one-time, expiring enrollment tokens stored only as hashes.
//! - [`revocation`]: the revocation set the handshake consults.
//! - [`reattest`]: a site whose certificate expired proves it holds the
//!   key of its last certificate, and the broker's decision on it.
//! - [`rotation`]: CA rotation phases and the trust bundle of each.
//! - [`kek`]: the CA's private keys sealed at rest under a key-encryption
//!   key.
//! - [`link`]: brokers' link keys vouched for by the deployment's CA.
//! - [`tls`]: rustls server and client configurations and identity
//!   extraction from a verified peer.

#![warn(missing_docs)]

pub mod ca;
pub mod identity;
pub mod kek;
pub mod link;
pub mod reattest;
pub mod revocation;
pub mod rotation;
pub mod tls;
pub mod token;
pub mod wg;

pub use ca::{Ca, IssuedCert, PkiError};
pub use identity::{IdentityError, SiteIdentity, TrustDomain};
pub use revocation::{RevocationSet, Revoked};
pub use tls::{CertSlot, ClientAuth, PeerCert, TrustAnchors};
