//! The services an edge site announces (`services` in `tether.toml`): a
//! port on the site's overlay address, answered either by this host
//! itself or, forwarded by the agent, by a target inside the edge cluster
//! (a Kubernetes Service's DNS name, or an address).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Deserializer, Serialize};
use tether_proto::dns::Service;

use crate::Problems;

/// One entry of `services`: the string `"name=port"`, or a table
/// `{ name = "pacs", port = 104, target = "pacs.imaging.svc.cluster.local:11112" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ServiceEntry {
    /// `"name=port"`: this host answers on its overlay address itself.
    Local(String),
    /// A port the agent forwards to a target in the edge cluster.
    Forward(ServiceForwardFile),
}

/// `{ name, port, target }` in `services`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceForwardFile {
    /// The service's name: backends find it as the SRV record
    /// `_<name>._tcp.<site>.<region>.<zone>`.
    pub name: String,
    /// The port announced on the site's overlay address; TCP and UDP
    /// arriving there from the tunnel go to `target`.
    pub port: u32,
    /// Where that traffic goes: `host:port` with a DNS name the agent
    /// resolves with the system resolver (again every 30 s and on SIGHUP),
    /// e.g. a Kubernetes Service's `name.namespace.svc.cluster.local:port`;
    /// or `address:port` (`[v6]:port` for IPv6).
    pub target: String,
}

impl<'de> Deserialize<'de> for ServiceEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ServiceEntry;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "\"name=port\" or a table { name = ..., port = ..., target = \"host:port\" }",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ServiceEntry, E> {
                Ok(ServiceEntry::Local(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ServiceEntry, A::Error> {
                ServiceForwardFile::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(ServiceEntry::Forward)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl From<&str> for ServiceEntry {
    fn from(text: &str) -> Self {
        ServiceEntry::Local(text.to_string())
    }
}

/// Where a forwarded service's traffic goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ForwardTarget {
    /// A fixed address.
    Addr(SocketAddr),
    /// A DNS name, resolved by the agent, and the port on it.
    Name {
        /// The host name.
        host: String,
        /// The port.
        port: u16,
    },
}

impl fmt::Display for ForwardTarget {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            ForwardTarget::Addr(a) => write!(f, "{a}"),
            ForwardTarget::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// A validated forwarded service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// The service as announced (name and port on the overlay address).
    pub service: Service,
    /// Where its traffic goes.
    pub target: ForwardTarget,
}

/// Parses a target `host:port`, `a.b.c.d:port` or `[v6]:port`.
pub fn parse_target(text: &str) -> Result<ForwardTarget, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        let ip = addr.ip();
        if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
            return Err(format!(
                "{ip} cannot receive forwarded traffic (loopback, unspecified or multicast)"
            ));
        }
        if addr.port() == 0 {
            return Err(format!("{text:?} has port 0"));
        }
        return Ok(ForwardTarget::Addr(addr));
    }
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?} has no port"))?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{port:?} in {text:?} is not a port (1-65535)"))?;
    if host.parse::<IpAddr>().is_ok() || host.starts_with('[') {
        return Err(format!(
            "{text:?} is not address:port (write IPv6 as [address]:port)"
        ));
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!("{host:?} is not a DNS name"));
    }
    if name.eq_ignore_ascii_case("localhost") {
        return Err("localhost cannot receive forwarded traffic".into());
    }
    Ok(ForwardTarget::Name {
        host: host.to_string(),
        port,
    })
}

/// Validates `services`: every service to announce, and those of them the
/// agent forwards. Problems name the entry (`services[1].target`).
pub(crate) fn validate(p: &mut Problems, entries: &[ServiceEntry]) -> (Vec<Service>, Vec<Forward>) {
    let mut services: Vec<Service> = Vec::new();
    let mut forwards: Vec<Forward> = Vec::new();
    if entries.len() > tether_proto::events::MAX_SERVICES {
        // The broker refuses a session that announces more.
        p.add(
            "services",
            format!(
                "{} services listed; a site announces at most {}",
                entries.len(),
                tether_proto::events::MAX_SERVICES
            ),
            "list the services backends reach by name, at most that many",
        );
    }
    for (i, entry) in entries.iter().enumerate() {
        let field = format!("services[{i}]");
        let parsed = match entry {
            ServiceEntry::Local(text) => match Service::parse(text) {
                Ok(s) => Some((s, None)),
                Err(e) => {
                    p.add(
                        &field,
                        e,
                        "write \"name=port\" with a lowercase DNS label, e.g. \"dicom=104\"",
                    );
                    None
                }
            },
            ServiceEntry::Forward(f) => {
                let name = tether_proto::ids::ServiceName::new(f.name.trim());
                let port = u16::try_from(f.port).ok().filter(|p| *p != 0);
                let target = parse_target(f.target.trim());
                if let Err(e) = &name {
                    p.add(
                        format!("{field}.name"),
                        e.to_string(),
                        "write a lowercase DNS label, e.g. \"pacs\"",
                    );
                }
                if port.is_none() {
                    p.add(
                        format!("{field}.port"),
                        format!("{} is not a port (1-65535)", f.port),
                        "write the port backends connect to on the site's address, e.g. 104",
                    );
                }
                if let Err(e) = &target {
                    p.add(
                        format!("{field}.target"),
                        e.clone(),
                        "write host:port, e.g. \"pacs.imaging.svc.cluster.local:11112\", or address:port",
                    );
                }
                match (name, port, target) {
                    (Ok(name), Some(port), Ok(target)) => {
                        Some((Service { name, port }, Some(target)))
                    }
                    _ => None,
                }
            }
        };
        let Some((service, target)) = parsed else {
            continue;
        };
        if services.iter().any(|s| s.name == service.name) {
            p.add(
                &field,
                format!("service {} is listed twice", service.name),
                "list each service name once",
            );
            continue;
        }
        // A forwarded port takes every packet to it: nothing else can be
        // announced on that port.
        let forwarded = |port: u16| forwards.iter().any(|f| f.service.port == port);
        if forwarded(service.port)
            || (target.is_some() && services.iter().any(|s| s.port == service.port))
        {
            p.add(
                &field,
                format!(
                    "port {} is taken by another service, and a forwarded port carries one service only",
                    service.port
                ),
                "give a forwarded service a port of its own",
            );
            continue;
        }
        if let Some(target) = target {
            forwards.push(Forward {
                service: service.clone(),
                target,
            });
        }
        services.push(service);
    }
    (services, forwards)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ClientFile;

    fn fields(text: &str) -> Vec<String> {
        ClientFile::parse(text, "t")
            .unwrap()
            .validate("t")
            .unwrap_err()
            .problems()
            .iter()
            .map(|p| p.field.clone())
            .collect()
    }

    #[test]
    fn strings_and_tables_mix_and_both_are_announced() {
        let c = ClientFile::parse(
            "services = [\"dicom=104\", { name = \"pacs\", port = 4242, target = \"pacs.imaging.svc.cluster.local:11112\" }, { name = \"web\", port = 80, target = \"[fd00::5]:8080\" }]",
            "t",
        )
        .unwrap();
        let again = ClientFile::parse(&c.to_toml(), "t").unwrap();
        assert_eq!(again, c);
        let c = c.validate("t").unwrap();
        let announced: Vec<String> = c
            .services
            .iter()
            .map(|s| format!("{}={}", s.name, s.port))
            .collect();
        assert_eq!(announced, ["dicom=104", "pacs=4242", "web=80"]);
        let targets: Vec<String> = c
            .forwards
            .iter()
            .map(|f| format!("{} {}", f.service.port, f.target))
            .collect();
        assert_eq!(
            targets,
            [
                "4242 pacs.imaging.svc.cluster.local:11112",
                "80 [fd00::5]:8080"
            ]
        );
    }

    #[test]
    fn bad_entries_are_refused_with_the_field_named() {
        assert_eq!(
            fields(
                "services = [{ name = \"Pacs!\", port = 0, target = \"pacs.imaging\" }, { name = \"a\", port = 70000, target = \"127.0.0.1:80\" }, { name = \"b\", port = 5, target = \"bad host:80\" }]"
            ),
            [
                "services[0].name",
                "services[0].port",
                "services[0].target",
                "services[1].port",
                "services[1].target",
                "services[2].target"
            ]
        );
        // A port forwarded and announced again, and a name twice.
        assert_eq!(
            fields(
                "services = [\"dicom=104\", { name = \"pacs\", port = 104, target = \"10.0.0.5:104\" }, { name = \"dicom\", port = 5, target = \"10.0.0.5:104\" }]"
            ),
            ["services[1]", "services[2]"]
        );
        assert_eq!(
            fields(
                "services = [{ name = \"pacs\", port = 104, target = \"10.0.0.5:104\" }, \"dicom=104\"]"
            ),
            ["services[1]"]
        );
        // Unknown keys in a table are refused by the parser.
        let err = ClientFile::parse(
            "services = [{ name = \"pacs\", port = 104, target = \"10.0.0.5:104\", proto = \"udp\" }]",
            "t",
        )
        .unwrap_err();
        assert!(err.to_string().contains("proto"), "{err}");
    }

    #[test]
    fn more_services_than_a_site_may_announce_are_refused() {
        let entries = |n: usize| -> Vec<ServiceEntry> {
            (0..n)
                .map(|i| ServiceEntry::Local(format!("s{i}={}", 1000 + i)))
                .collect()
        };
        let max = tether_proto::events::MAX_SERVICES;
        let mut p = Problems::default();
        let (services, _) = validate(&mut p, &entries(max));
        assert_eq!(services.len(), max);
        assert_eq!(p.len(), 0, "{:?}", p.messages());
        let mut p = Problems::default();
        validate(&mut p, &entries(max + 1));
        assert_eq!(p.len(), 1, "{} services accepted", max + 1);
        assert!(p.messages()[0].contains("at most 32"), "{:?}", p.messages());
    }

    #[test]
    fn targets_parse() {
        assert_eq!(
            parse_target("10.96.0.10:11112"),
            Ok(ForwardTarget::Addr("10.96.0.10:11112".parse().unwrap()))
        );
        assert_eq!(
            parse_target("pacs.imaging.svc.cluster.local.:104"),
            Ok(ForwardTarget::Name {
                host: "pacs.imaging.svc.cluster.local.".into(),
                port: 104
            })
        );
        for bad in [
            "pacs",
            "pacs:0",
            "pacs:x",
            "fd00::5:80",
            "[::1]:80",
            "0.0.0.0:80",
            "localhost:80",
            "-pacs:80",
            "a..b:80",
        ] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }
}
