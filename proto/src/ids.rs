//! Identifiers of sites, regions and gateways.
//!
//! They become DNS labels (`<site>.<region>.<zone>`) and path segments of
//! SPIFFE identities, so all follow the DNS label rules: 1 to 63 characters,
//! lowercase letters, digits and '-', not starting or ending with '-'.

use std::fmt;

use thiserror::Error;

/// An identifier that breaks the DNS label rules.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "{what} {value:?} is not valid: {problem} (use lowercase letters, digits and '-', e.g. \"{example}\")"
)]
pub struct IdError {
    /// What kind of identifier it was ("site id", "region", ...).
    pub what: &'static str,
    /// The rejected text.
    pub value: String,
    /// What is wrong with it.
    pub problem: &'static str,
    /// A valid example of the same kind.
    pub example: &'static str,
}

/// Checks `value` against the DNS label rules, naming `what` in the error.
pub fn validate_label(
    value: &str,
    what: &'static str,
    example: &'static str,
) -> Result<(), IdError> {
    let err = |problem| IdError {
        what,
        value: value.to_string(),
        problem,
        example,
    };
    if value.is_empty() {
        return Err(err("it is empty"));
    }
    if value.len() > 63 {
        return Err(err("it is longer than 63 characters"));
    }
    if value.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(err("it contains uppercase letters"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(err("it contains characters other than a-z, 0-9 and '-'"));
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err(err("it starts or ends with '-'"));
    }
    Ok(())
}

macro_rules! label_id {
    ($(#[$doc:meta])* $name:ident, $what:literal, $example:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
        #[cfg_attr(feature = "serde", serde(try_from = "String", into = "String"))]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps an identifier.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                validate_label(&value, $what, $example)?;
                Ok(Self(value))
            }

            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

/// The trust domain all identities of one tether deployment share (the SPIFFE
/// trust domain, e.g. `tether.example.org`): a lowercase DNS name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(try_from = "String", into = "String"))]
pub struct TrustDomain(String);

/// A trust domain that breaks the naming rules.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "trust domain {value:?} is not valid: {problem} (use a lowercase DNS name such as \"tether.example.org\")"
)]
pub struct TrustDomainError {
    /// The rejected text.
    pub value: String,
    /// What is wrong.
    pub problem: &'static str,
}

impl TrustDomain {
    /// Validates a trust domain: dot-separated DNS labels (see
    /// [`validate_label`]), at most 255 characters.
    pub fn new(value: impl Into<String>) -> Result<Self, TrustDomainError> {
        let value = value.into();
        let problem = if value.is_empty() {
            Some("it is empty")
        } else if value.len() > 255 {
            Some("it is longer than 255 characters")
        } else if value
            .split('.')
            .any(|l| validate_label(l, "label", "tether").is_err())
        {
            Some(
                "each dot-separated label must be 1-63 of a-z, 0-9 and '-', not starting or ending with '-'",
            )
        } else {
            None
        };
        match problem {
            Some(problem) => Err(TrustDomainError { value, problem }),
            None => Ok(Self(value)),
        }
    }

    /// The trust domain as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for TrustDomain {
    type Err = TrustDomainError;
    fn from_str(s: &str) -> Result<Self, TrustDomainError> {
        Self::new(s)
    }
}

impl TryFrom<String> for TrustDomain {
    type Error = TrustDomainError;
    fn try_from(s: String) -> Result<Self, TrustDomainError> {
        Self::new(s)
    }
}

impl From<TrustDomain> for String {
    fn from(td: TrustDomain) -> String {
        td.0
    }
}

label_id!(
    /// The identifier of an edge site, unique within its region.
    SiteId, "site id", "hospital-a");
label_id!(
    /// The identifier of a region (a data-residency boundary).
    RegionId, "region", "eu-central");
label_id!(
    /// The identifier of a cloud gateway.
    GatewayId, "gateway id", "gw-eu-1");
label_id!(
    /// The name of a TCP service a site announces (the `<service>` of
    /// `_<service>._tcp.<site>.<region>.<zone>` SRV names).
    ServiceName, "service name", "dicom");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_rules() {
        assert!(SiteId::new("hospital-a").is_ok());
        assert!(SiteId::new("a").is_ok());
        assert!(SiteId::new("x".repeat(63)).is_ok());
        for bad in [
            "",
            "-a",
            "a-",
            "Hospital",
            "a_b",
            "a.b",
            "ä",
            &"x".repeat(64),
        ] {
            let err = SiteId::new(bad).unwrap_err();
            assert!(err.to_string().contains("hospital-a"), "{err}");
        }
        let err = RegionId::new("EU").unwrap_err();
        assert_eq!(err.problem, "it contains uppercase letters");
        assert!(TrustDomain::new("tether.example.org").is_ok());
        assert!(TrustDomain::new("Tether.org").is_err());
        assert!(TrustDomain::new("a..b").is_err());
        assert!(TrustDomain::new("").is_err());
    }
}
