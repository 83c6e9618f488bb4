//! The site's trust bundle as `tether doctor` reports it.
//!
//! The broker sends the bundle (every CA the deployment trusts) with each
//! certificate it issues; the site keeps it in its state directory
//! ([`crate::state_dir::TRUST_BUNDLE_FILE`]) and verifies brokers against
//! it. During a CA rotation it holds two CAs.

use std::time::SystemTime;

use rustls::pki_types::CertificateDer;

use super::{Check, Level};

/// The name of the trust bundle check.
pub const TRUST_BUNDLE: &str = "trust bundle";

/// What the site trusts, and whether its own certificate comes from one
/// of those CAs.
pub fn bundle_check(
    bundle: &[CertificateDer<'_>],
    leaf: &CertificateDer<'_>,
    now: SystemTime,
) -> Check {
    let check = |level, detail: String| Check {
        name: TRUST_BUNDLE.into(),
        level,
        detail,
    };
    let issuer = tether_pki::ca::common_names(leaf)
        .map(|(_, issuer)| issuer)
        .unwrap_or_default();
    let mut names = Vec::new();
    let mut expired = Vec::new();
    let mut signed_by_one = false;
    for ca in bundle {
        let name = tether_pki::ca::common_names(ca)
            .map(|(subject, _)| subject)
            .unwrap_or_else(|| "an unreadable certificate".into());
        if name == issuer {
            signed_by_one = true;
        }
        if let Ok((_, not_after)) = tether_pki::tls::validity(ca)
            && not_after < now
        {
            expired.push(name.clone());
        }
        names.push(name);
    }
    let listed = names.join(", ");
    if !expired.is_empty() {
        return check(
            Level::Warn,
            format!(
                "{listed}; expired by this machine's clock: {} (check the clock; the broker sends a current bundle with the next certificate)",
                expired.join(", ")
            ),
        );
    }
    if !signed_by_one {
        return check(
            Level::Warn,
            format!(
                "{listed}; none of them signed this site's certificate ({issuer}): the next renewal brings a matching bundle"
            ),
        );
    }
    let rotation = if bundle.len() > 1 {
        " (a CA rotation is under way; both are trusted)"
    } else {
        ""
    };
    check(Level::Ok, format!("{listed}{rotation}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tether_pki::{Ca, SiteIdentity, TrustDomain};
    use tether_proto::ids::{RegionId, SiteId};

    fn leaf(ca: &Ca) -> CertificateDer<'static> {
        let (_, csr) = tether_pki::ca::site_key_and_csr("ward").unwrap();
        let id = SiteIdentity::new(
            ca.trust_domain().clone(),
            RegionId::new("eu").unwrap(),
            SiteId::new("ward").unwrap(),
        );
        ca.issue_site(&csr, &id, SystemTime::now(), Duration::from_secs(60))
            .unwrap()
            .der
    }

    #[test]
    fn the_bundle_check_names_the_cas_and_says_when_a_rotation_is_under_way() {
        let td = TrustDomain::new("tether.test").unwrap();
        let old = Ca::generate(td.clone(), SystemTime::now()).unwrap();
        let new = Ca::generate(td, SystemTime::now()).unwrap();
        let now = SystemTime::now();
        let one = bundle_check(&[old.cert_der().clone()], &leaf(&old), now);
        assert_eq!(one.level, Level::Ok, "{}", one.detail);
        assert_eq!(one.detail, old.name());
        let two = bundle_check(
            &[new.cert_der().clone(), old.cert_der().clone()],
            &leaf(&old),
            now,
        );
        assert_eq!(two.level, Level::Ok);
        assert!(
            two.detail.contains("rotation is under way"),
            "{}",
            two.detail
        );
        let stranger = bundle_check(&[new.cert_der().clone()], &leaf(&old), now);
        assert_eq!(stranger.level, Level::Warn);
        assert!(
            stranger.detail.contains("none of them signed"),
            "{}",
            stranger.detail
        );
        let later = now + Duration::from_secs(11 * 365 * 86_400);
        let expired = bundle_check(&[old.cert_der().clone()], &leaf(&old), later);
        assert_eq!(expired.level, Level::Warn);
        assert!(expired.detail.contains("expired"), "{}", expired.detail);
    }
}
