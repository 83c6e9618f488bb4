//! tether's configuration files.
//!
//! Each program reads one TOML file: [`broker::BrokerFile`],
//! [`gateway::GatewayFile`], [`client::ClientFile`]. Files are parsed
//! strictly (unknown fields are errors, so a typo cannot silently fall back
//! to a default) and then validated into typed configurations
//! ([`broker::BrokerConfig`], ...). Validation reports every problem at once,
//! each naming the field and how to fix it.
//!
//! Every field has a default, so an empty file — or no file — is a working
//! single-machine configuration on loopback.

#![warn(missing_docs)]

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use thiserror::Error;

pub mod broker;
pub mod client;
pub mod gateway;
pub mod policy;
pub mod services;

/// One problem in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the field, e.g. `region[0].ipv4_pools[1]`.
    pub field: String,
    /// What is wrong.
    pub message: String,
    /// What to do about it.
    pub fix: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} (fix: {})", self.field, self.message, self.fix)
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this program, or has unknown fields.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message (with line and column).
        message: String,
    },
    /// The values do not make a working configuration.
    #[error("{path} is not a valid configuration:\n{}", format_problems(.problems))]
    Invalid {
        /// The file.
        path: String,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

fn format_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    /// The problems of an `Invalid` error (empty for the others).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}

/// Collects problems during validation.
#[derive(Debug, Default)]
pub(crate) struct Problems(Vec<Problem>);

impl Problems {
    pub(crate) fn add(
        &mut self,
        field: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.0.push(Problem {
            field: field.into(),
            message: message.into(),
            fix: fix.into(),
        });
    }

    /// How many problems are recorded.
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The problems as text, one each.
    #[cfg(test)]
    pub(crate) fn messages(&self) -> Vec<String> {
        self.0.iter().map(|p| p.to_string()).collect()
    }

    /// Parses a duration field, recording a problem if it is malformed or
    /// outside `min..=max`.
    pub(crate) fn duration(
        &mut self,
        field: &str,
        text: &str,
        min: Duration,
        max: Duration,
    ) -> Duration {
        match humantime::parse_duration(text) {
            Ok(d) if d >= min && d <= max => d,
            Ok(_) => {
                self.add(
                    field,
                    format!("{text:?} is out of range"),
                    format!(
                        "use a duration between {} and {}",
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                );
                min
            }
            Err(e) => {
                self.add(
                    field,
                    format!("{text:?} is not a duration ({e})"),
                    "write a number with a unit, e.g. \"15s\", \"10m\" or \"24h\"",
                );
                min
            }
        }
    }

    /// The error for the recorded problems (called when a required value is
    /// missing, which always comes with a recorded problem).
    pub(crate) fn into_error(self, path: &str) -> ConfigError {
        ConfigError::Invalid {
            path: path.to_string(),
            problems: self.0,
        }
    }

    pub(crate) fn finish<T>(self, path: &str, value: T) -> Result<T, ConfigError> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_string(),
                problems: self.0,
            })
        }
    }
}

/// Where a program keeps its state unless configured: `/var/lib/<name>`
/// when run as root, else `$XDG_STATE_HOME/<name>` (by default
/// `~/.local/state/<name>`).
pub fn default_state_dir(name: &str) -> std::path::PathBuf {
    use std::path::PathBuf;
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib").join(name);
    }
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join(name)
}

/// Renders a configuration file as TOML (used to print effective defaults).
pub fn to_toml<T: serde::Serialize>(file: &T) -> String {
    toml::to_string_pretty(file).unwrap_or_default()
}

/// Reads and parses a TOML file into `T`.
pub(crate) fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_toml(&text, &path.display().to_string())
}

/// Parses TOML text into `T`; `origin` names the source in errors.
pub(crate) fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: origin.to_string(),
        message: e.to_string(),
    })
}

/// The published CIDR rule: `addr` must be inside `cidr`.
pub(crate) fn check_in_cidr(
    problems: &mut Problems,
    field: &str,
    addr: IpAddr,
    cidr: IpNet,
    what: &str,
) {
    if !cidr.contains(&addr) {
        problems.add(
            field,
            format!("{what} {addr} is outside the published CIDR {cidr}, the only range hospital firewalls allow"),
            format!("use an address inside {cidr}, or change published_cidr if the published range really changed"),
        );
    }
}

/// Parses a WireGuard key (32 bytes, standard base64 as `wg genkey` and
/// `wg pubkey` print them), recording a problem if malformed.
pub(crate) fn parse_wg_key(problems: &mut Problems, field: &str, text: &str) -> Option<[u8; 32]> {
    match data_encoding::BASE64.decode(text.trim().as_bytes()) {
        Ok(bytes) if bytes.len() == 32 => bytes.try_into().ok(),
        _ => {
            problems.add(
                field,
                format!("{text:?} is not a WireGuard key (32 bytes in base64)"),
                "paste the output of `tether-gateway key` (or `wg pubkey` for a stock peer)",
            );
            None
        }
    }
}

/// Parses a prefix field, recording a problem if malformed or with host bits.
pub(crate) fn parse_prefix(problems: &mut Problems, field: &str, text: &str) -> Option<IpNet> {
    match text.parse::<IpNet>() {
        Ok(p) if p.trunc() == p => Some(p),
        Ok(p) => {
            problems.add(
                field,
                format!("{text} has bits set beyond its prefix length"),
                format!("write it as {}", p.trunc()),
            );
            None
        }
        Err(_) => {
            problems.add(
                field,
                format!("{text:?} is not a prefix"),
                "write an address and a length, e.g. \"100.64.0.0/16\" or \"fd7a:115c:a1e0::/48\"",
            );
            None
        }
    }
}

/// Whether `text` is a syntactically valid DNS name (letters, digits, '-',
/// dot-separated labels of 1-63 characters).
pub fn is_dns_name(text: &str) -> bool {
    let text = text.strip_suffix('.').unwrap_or(text);
    !text.is_empty()
        && text.len() <= 253
        && text.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Linux interface names: 1-15 bytes, no '/', whitespace or ':'.
pub(crate) fn check_interface_name(problems: &mut Problems, field: &str, name: &str) {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if !ok {
        problems.add(
            field,
            format!("{name:?} is not a valid interface name"),
            "use 1-15 characters without '/', ':' or spaces, e.g. \"tether0\"",
        );
    }
}

/// The host part of a broker endpoint.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Host {
    /// An IP address literal.
    Ip(IpAddr),
    /// A DNS name, resolved when dialling.
    Name(String),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
            Host::Ip(a) => write!(f, "{a}"),
            Host::Name(n) => f.write_str(n),
        }
    }
}

/// A broker endpoint: host and port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    /// Address or name.
    pub host: Host,
    /// Port (443 unless given).
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl Endpoint {
    /// Parses `host`, `host:port`, `[v6]` or `[v6]:port`; the port defaults
    /// to `default_port`.
    pub fn parse(text: &str, default_port: u16) -> Option<Self> {
        let text = text.trim();
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Some(Self {
                host: Host::Ip(ip),
                port: default_port,
            });
        }
        if let Ok(sa) = text.parse::<std::net::SocketAddr>() {
            return Some(Self {
                host: Host::Ip(sa.ip()),
                port: sa.port(),
            });
        }
        if let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            return inner.parse::<std::net::Ipv6Addr>().ok().map(|a| Self {
                host: Host::Ip(IpAddr::V6(a)),
                port: default_port,
            });
        }
        let (host, port) = match text.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().ok()?),
            None => (text, default_port),
        };
        if port == 0 || !is_dns_name(host) {
            return None;
        }
        Some(Self {
            host: Host::Name(host.to_ascii_lowercase()),
            port,
        })
    }
}

/// Parses a list of endpoints, checking IP literals against the published
/// CIDR (names are checked when they are resolved).
pub(crate) fn parse_endpoints(
    problems: &mut Problems,
    field: &str,
    list: &[String],
    default_port: u16,
    cidr: Option<IpNet>,
) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for (i, text) in list.iter().enumerate() {
        let f = format!("{field}[{i}]");
        match Endpoint::parse(text, default_port) {
            Some(ep) => {
                if let (Host::Ip(ip), Some(cidr)) = (&ep.host, cidr) {
                    check_in_cidr(problems, &f, *ip, cidr, "broker address");
                }
                out.push(ep);
            }
            None => problems.add(
                f,
                format!("{text:?} is not a broker endpoint"),
                "write a name or address with an optional port, e.g. \"broker.example.org\" or \"203.0.113.10:443\"",
            ),
        }
    }
    if list.is_empty() {
        problems.add(
            field,
            "no broker endpoint",
            "list at least one broker name or address",
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let ep = |s| Endpoint::parse(s, 443);
        assert_eq!(ep("203.0.113.1").unwrap().to_string(), "203.0.113.1:443");
        assert_eq!(ep("203.0.113.1:8443").unwrap().port, 8443);
        assert_eq!(
            ep("[2001:db8::1]:444").unwrap().to_string(),
            "[2001:db8::1]:444"
        );
        assert_eq!(ep("[2001:db8::1]").unwrap().port, 443);
        assert_eq!(ep("2001:db8::1").unwrap().port, 443);
        assert_eq!(
            ep("Broker.Example.org").unwrap().host,
            Host::Name("broker.example.org".into())
        );
        assert_eq!(ep("broker.example.org:443").unwrap().port, 443);
        for bad in ["", "a b", "host:0", "host:99999", "[::1", "-bad-.org"] {
            assert!(ep(bad).is_none(), "{bad}");
        }
    }
}
