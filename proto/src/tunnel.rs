//! CONNECT-IP sessions, the broker's end, and what both ends share.
//!
//! [`BrokerSession`] is the broker's half of one site's tunnel. Inputs: the
//! site's addresses when the session opens, the site's capsules, the results
//! of LAN allocations. Outputs ([`BrokerAction`]): capsules to send,
//! allocations to perform, routes to install. The site's half, and its
//! reconnection, are in [`crate::agent`]. [`Transport`] names the rungs of
//! the site's ladder, which the broker shows and counts sessions by.
//!
//! Contract for shells: call `open` once, then feed every capsule read from
//! the request stream to `on_capsule` and perform the returned actions in
//! order.

use std::collections::BTreeMap;

use ipnet::IpNet;

use crate::capsule::Capsule;
use crate::connect_ip::{
    AddressAssign, AddressRequest, AssignedAddress, RequestedAddress, RouteAdvertisement,
};
use crate::net::{self, Family};

/// What the broker's session asks its shell to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerAction {
    /// Send this capsule on the request stream.
    Send(Capsule),
    /// Map the LAN `lan` behind the site into the pool (IPAM), then call
    /// [`BrokerSession::on_allocated`] with `request_id`.
    AllocateLan {
        /// The site's Request ID.
        request_id: u64,
        /// The LAN prefix as the site numbers it.
        lan: IpNet,
    },
    /// The prefixes the site routes (its accepted ROUTE_ADVERTISEMENT):
    /// replace its LAN routes with these.
    SetLanRoutes(Vec<IpNet>),
    /// The site advertised prefixes it may not route; they were ignored.
    RejectedRoutes(Vec<(IpNet, RouteRefused)>),
    /// After a ROUTE_ADVERTISEMENT with no LAN mapping in flight: the site
    /// routes these mapped prefixes. Record its LAN mappings covering none
    /// of them as unused (released after a grace period), and those
    /// covering one as in use ([`crate::ipam::Ipam::mark_lans`]).
    LansInUse(Vec<IpNet>),
    /// An IP packet carried in a DATAGRAM capsule (HTTP/2).
    Datagram(Vec<u8>),
}

/// The broker's half of a site's CONNECT-IP session.
#[derive(Debug, Clone)]
pub struct BrokerSession {
    /// Assigned prefixes with the Request ID they answer (0: unsolicited).
    assigned: BTreeMap<IpNet, u64>,
    /// LAN mappings in flight, by Request ID.
    pending: BTreeMap<u64, IpNet>,
    /// Refusals of LAN mappings, sent with the answer to the last one in
    /// flight.
    denied: Vec<AssignedAddress>,
}

impl BrokerSession {
    /// A session for a site whose stable addresses are `addresses` (one per
    /// family the region has pools for) and whose LAN mappings are `lans`.
    pub fn new(addresses: &[IpNet], lans: &[IpNet]) -> Self {
        Self {
            assigned: addresses.iter().chain(lans).map(|&p| (p, 0)).collect(),
            pending: BTreeMap::new(),
            denied: Vec::new(),
        }
    }

    /// Every prefix the site may use as a source.
    pub fn source_prefixes(&self) -> Vec<IpNet> {
        self.assigned.keys().copied().collect()
    }

    /// The opening capsules: ADDRESS_ASSIGN with the site's addresses, and
    /// ROUTE_ADVERTISEMENT with what it may reach.
    pub fn open(&self, reachable: &[IpNet]) -> Vec<BrokerAction> {
        vec![
            BrokerAction::Send(Capsule::AddressAssign(self.assign_capsule())),
            BrokerAction::Send(Capsule::RouteAdvertisement(
                RouteAdvertisement::from_prefixes(reachable.iter().copied()),
            )),
        ]
    }

    /// A new ROUTE_ADVERTISEMENT after routes changed.
    pub fn advertise(&self, reachable: &[IpNet]) -> BrokerAction {
        BrokerAction::Send(Capsule::RouteAdvertisement(
            RouteAdvertisement::from_prefixes(reachable.iter().copied()),
        ))
    }

    fn assign_capsule(&self) -> AddressAssign {
        AddressAssign {
            addresses: self
                .assigned
                .iter()
                .map(|(&prefix, &request_id)| AssignedAddress { request_id, prefix })
                .collect(),
        }
    }

    /// A capsule arrived from the site.
    pub fn on_capsule(&mut self, capsule: Capsule) -> Vec<BrokerAction> {
        match capsule {
            Capsule::AddressRequest(req) => self.on_address_request(req),
            Capsule::RouteAdvertisement(ad) => self.on_route_advertisement(&ad),
            Capsule::Datagram(payload) => vec![BrokerAction::Datagram(payload)],
            // Sites do not assign addresses to the broker; unknown capsules
            // are skipped (RFC 9297).
            Capsule::AddressAssign(_) | Capsule::Unknown { .. } => Vec::new(),
        }
    }

    fn on_address_request(&mut self, req: AddressRequest) -> Vec<BrokerAction> {
        let mut actions = Vec::new();
        let mut changed = false;
        for RequestedAddress { request_id, prefix } in req.requests {
            let family = Family::of(prefix.addr());
            if prefix.prefix_len() == family.width() {
                // A host address: the site's stable address of that family,
                // whatever it asked for.
                let own = self
                    .assigned
                    .keys()
                    .find(|p| Family::of(p.addr()) == family && p.prefix_len() == family.width())
                    .copied();
                match own {
                    Some(own) => {
                        self.assigned.insert(own, request_id);
                        changed = true;
                    }
                    None => actions.push(self.deny(request_id, family)),
                }
            } else if prefix.addr().is_unspecified() {
                // A LAN mapping must name the LAN, so it can stay stable.
                actions.push(self.deny(request_id, family));
            } else if let Some((&mapped, _)) =
                self.assigned.iter().find(|(_, id)| **id == request_id)
            {
                // A repeated request: answer with what it already got.
                let _ = mapped;
                changed = true;
            } else {
                self.pending.insert(request_id, prefix);
                actions.push(BrokerAction::AllocateLan {
                    request_id,
                    lan: prefix,
                });
            }
        }
        if changed {
            actions.push(BrokerAction::Send(Capsule::AddressAssign(
                self.assign_capsule(),
            )));
        }
        actions
    }

    /// RFC 9484 section 4.7.1: a request that cannot be honoured is answered
    /// with the unspecified address and the full prefix length.
    fn deny(&self, request_id: u64, family: Family) -> BrokerAction {
        let unspecified = net::prefix(family, 0, family.width());
        let mut assign = self.assign_capsule();
        assign.addresses.push(AssignedAddress {
            request_id,
            prefix: unspecified,
        });
        BrokerAction::Send(Capsule::AddressAssign(assign))
    }

    /// The outcome of an [`BrokerAction::AllocateLan`]. The answers go out
    /// together, in one ADDRESS_ASSIGN once no mapping is in flight: the
    /// site then advertises all its mapped LANs at once, and its
    /// advertisement says which mappings it uses.
    pub fn on_allocated(&mut self, request_id: u64, result: Option<IpNet>) -> Vec<BrokerAction> {
        let Some(lan) = self.pending.remove(&request_id) else {
            return Vec::new();
        };
        match result {
            Some(mapped) => {
                self.assigned.insert(mapped, request_id);
            }
            None => {
                let family = Family::of(lan.addr());
                self.denied.push(AssignedAddress {
                    request_id,
                    prefix: net::prefix(family, 0, family.width()),
                });
            }
        }
        if !self.pending.is_empty() {
            return Vec::new();
        }
        let mut assign = self.assign_capsule();
        assign.addresses.append(&mut self.denied);
        vec![BrokerAction::Send(Capsule::AddressAssign(assign))]
    }

    fn on_route_advertisement(&mut self, ad: &RouteAdvertisement) -> Vec<BrokerAction> {
        // Only prefixes inside what the site was assigned, for all protocols;
        // its own host address is already routed.
        let (mut accepted, mut rejected) = (Vec::new(), Vec::new());
        for range in &ad.ranges {
            for prefix in range.to_prefixes() {
                let owned = self.assigned.keys().any(|a| a.contains(&prefix));
                let host = self
                    .assigned
                    .keys()
                    .any(|a| *a == prefix && a.prefix_len() == a.max_prefix_len());
                if !owned {
                    rejected.push((prefix, RouteRefused::NotAssigned));
                } else if range.protocol != 0 {
                    rejected.push((prefix, RouteRefused::Protocol));
                } else if !host {
                    accepted.push(prefix);
                }
            }
        }
        let mut actions = vec![BrokerAction::SetLanRoutes(accepted.clone())];
        if !rejected.is_empty() {
            actions.push(BrokerAction::RejectedRoutes(rejected));
        }
        // While mappings are in flight the site has not seen them all yet:
        // its advertisement is not the whole set.
        if self.pending.is_empty() {
            actions.push(BrokerAction::LansInUse(accepted));
        }
        actions
    }
}

/// Why a prefix of a site's ROUTE_ADVERTISEMENT was ignored (the metric
/// label is [`RouteRefused::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteRefused {
    /// The prefix is not inside an address or LAN mapping the broker
    /// assigned to the site.
    NotAssigned,
    /// The range is for one IP protocol only; a site routes a prefix for
    /// all protocols or not at all.
    Protocol,
}

impl RouteRefused {
    /// Every reason, in label order.
    pub const ALL: [RouteRefused; 2] = [RouteRefused::NotAssigned, RouteRefused::Protocol];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteRefused::NotAssigned => "not_assigned",
            RouteRefused::Protocol => "protocol",
        }
    }

    /// The reason in plain words, for the log.
    pub fn describe(self) -> &'static str {
        match self {
            RouteRefused::NotAssigned => "the broker did not assign it to the site",
            RouteRefused::Protocol => "it is limited to one IP protocol",
        }
    }
}

/// How a site reaches a broker: the rungs of the agent's ladder, best
/// first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Transport {
    /// HTTP/3 over QUIC on UDP 443, packets in QUIC datagrams.
    H3,
    /// HTTP/2 extended CONNECT (RFC 8441) on TCP 443, packets in DATAGRAM
    /// capsules on the request stream.
    H2,
    /// HTTP/2 as above, through an HTTP CONNECT proxy (TLS stays end to
    /// end).
    H2Proxy,
}

impl Transport {
    /// Every transport, best first.
    pub const ALL: [Transport; 3] = [Transport::H3, Transport::H2, Transport::H2Proxy];

    /// Stable label (state file, metrics, API).
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::H3 => "h3",
            Transport::H2 => "h2",
            Transport::H2Proxy => "h2-proxy",
        }
    }

    /// Parses [`Transport::as_str`].
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == text.trim())
    }

    /// Plain words for logs and `tether doctor`.
    pub fn describe(self) -> &'static str {
        match self {
            Transport::H3 => "HTTP/3 (QUIC, UDP 443)",
            Transport::H2 => "HTTP/2 (TLS, TCP 443)",
            Transport::H2Proxy => "HTTP/2 through the HTTP proxy",
        }
    }

    /// Whether this runs over QUIC.
    pub fn is_quic(self) -> bool {
        self == Transport::H3
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Request header of an HTTP/2 CONNECT-IP saying the site came through an
/// HTTP proxy (`h2-proxy`); informational: sessions are shown and counted
/// by transport.
pub const TRANSPORT_HEADER: &str = "tether-transport";

/// Request header of a CONNECT-IP (HTTP/3 and HTTP/2) listing the TCP
/// services the site announces, `name=port,name=port`; they become SRV
/// names in the mesh zone while the session lives.
pub const SERVICES_HEADER: &str = "tether-services";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::ClientSession;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn open_assigns_and_advertises() {
        let broker = BrokerSession::new(&[net("100.64.0.7/32"), net("fd00::7/128")], &[]);
        let actions = broker.open(&[net("100.64.0.0/16"), net("10.20.0.0/16")]);
        let mut client = ClientSession::default();
        let mut events = Vec::new();
        for a in actions {
            let BrokerAction::Send(c) = a else {
                panic!("{a:?}")
            };
            events.extend(client.on_capsule(c));
        }
        assert_eq!(
            client.host_address(Family::V4),
            Some("100.64.0.7".parse().unwrap())
        );
        assert_eq!(
            client.host_address(Family::V6),
            Some("fd00::7".parse().unwrap())
        );
        assert_eq!(
            client.routes(),
            &[net("10.20.0.0/16"), net("100.64.0.0/16")]
        );
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn address_requests() {
        let mut broker = BrokerSession::new(&[net("100.64.0.7/32")], &[]);
        // Asking for a host address gets the stable one, echoing the ID.
        let actions = broker.on_capsule(Capsule::AddressRequest(AddressRequest {
            requests: vec![RequestedAddress {
                request_id: 5,
                prefix: net("0.0.0.0/32"),
            }],
        }));
        let [BrokerAction::Send(Capsule::AddressAssign(a))] = actions.as_slice() else {
            panic!("{actions:?}")
        };
        assert_eq!(
            a.addresses,
            vec![AssignedAddress {
                request_id: 5,
                prefix: net("100.64.0.7/32")
            }]
        );
        // An IPv6 host address without an IPv6 pool is denied.
        let actions = broker.on_capsule(Capsule::AddressRequest(AddressRequest {
            requests: vec![RequestedAddress {
                request_id: 6,
                prefix: net("::/128"),
            }],
        }));
        let [BrokerAction::Send(Capsule::AddressAssign(a))] = actions.as_slice() else {
            panic!("{actions:?}")
        };
        assert!(a.addresses.contains(&AssignedAddress {
            request_id: 6,
            prefix: net("::/128")
        }));
        // A LAN is mapped through IPAM.
        let actions = broker.on_capsule(Capsule::AddressRequest(AddressRequest {
            requests: vec![RequestedAddress {
                request_id: 7,
                prefix: net("192.168.1.0/24"),
            }],
        }));
        assert_eq!(
            actions,
            vec![BrokerAction::AllocateLan {
                request_id: 7,
                lan: net("192.168.1.0/24")
            }]
        );
        let actions = broker.on_allocated(7, Some(net("100.64.9.0/24")));
        let [BrokerAction::Send(Capsule::AddressAssign(a))] = actions.as_slice() else {
            panic!("{actions:?}")
        };
        assert!(a.addresses.contains(&AssignedAddress {
            request_id: 7,
            prefix: net("100.64.9.0/24")
        }));
        assert_eq!(
            broker.source_prefixes(),
            vec![net("100.64.0.7/32"), net("100.64.9.0/24")]
        );
    }

    #[test]
    fn site_may_only_advertise_what_it_owns() {
        let mut broker = BrokerSession::new(&[net("100.64.0.7/32")], &[net("100.64.9.0/24")]);
        let actions = broker.on_capsule(Capsule::RouteAdvertisement(
            RouteAdvertisement::from_prefixes([
                net("100.64.9.0/25"),
                net("100.64.0.7/32"),
                net("10.0.0.0/8"),
            ]),
        ));
        assert_eq!(
            actions,
            vec![
                BrokerAction::SetLanRoutes(vec![net("100.64.9.0/25")]),
                BrokerAction::RejectedRoutes(vec![(net("10.0.0.0/8"), RouteRefused::NotAssigned)]),
                BrokerAction::LansInUse(vec![net("100.64.9.0/25")]),
            ]
        );
        // A route for one protocol only is refused even inside its own LAN.
        let mut tcp_only = crate::connect_ip::IpAddressRange::from_prefix(net("100.64.9.128/25"));
        tcp_only.protocol = 6;
        let actions = broker.on_capsule(Capsule::RouteAdvertisement(RouteAdvertisement {
            ranges: vec![tcp_only],
        }));
        assert!(
            actions.contains(&BrokerAction::RejectedRoutes(vec![(
                net("100.64.9.128/25"),
                RouteRefused::Protocol
            )])),
            "{actions:?}"
        );
    }

    #[test]
    fn lan_answers_go_out_together_and_only_a_settled_advertisement_marks_use() {
        let mut broker = BrokerSession::new(&[net("100.64.0.7/32")], &[]);
        let actions = broker.on_capsule(Capsule::AddressRequest(AddressRequest {
            requests: vec![
                RequestedAddress {
                    request_id: 1,
                    prefix: net("192.168.1.0/24"),
                },
                RequestedAddress {
                    request_id: 2,
                    prefix: net("10.0.0.0/16"),
                },
            ],
        }));
        assert_eq!(actions.len(), 2, "{actions:?}");
        assert!(
            broker
                .on_allocated(1, Some(net("100.64.9.0/24")))
                .is_empty()
        );
        // An advertisement while a mapping is in flight routes what it
        // names but says nothing of use.
        let actions = broker.on_capsule(Capsule::RouteAdvertisement(
            RouteAdvertisement::from_prefixes([net("100.64.9.0/24")]),
        ));
        assert_eq!(
            actions,
            vec![BrokerAction::SetLanRoutes(vec![net("100.64.9.0/24")])]
        );
        // The refusal and the mapping arrive in one capsule.
        let actions = broker.on_allocated(2, None);
        let [BrokerAction::Send(Capsule::AddressAssign(a))] = actions.as_slice() else {
            panic!("{actions:?}")
        };
        assert!(a.addresses.contains(&AssignedAddress {
            request_id: 1,
            prefix: net("100.64.9.0/24")
        }));
        assert!(a.addresses.contains(&AssignedAddress {
            request_id: 2,
            prefix: net("0.0.0.0/32")
        }));
        // Settled: an empty advertisement says no LAN is in use.
        let actions = broker.on_capsule(Capsule::RouteAdvertisement(
            RouteAdvertisement::from_prefixes(std::iter::empty()),
        ));
        assert_eq!(
            actions,
            vec![
                BrokerAction::SetLanRoutes(vec![]),
                BrokerAction::LansInUse(vec![])
            ]
        );
    }
}
