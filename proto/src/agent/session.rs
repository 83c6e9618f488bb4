//! The site's half of a CONNECT-IP session: the broker's capsules turned
//! into addresses and routes for the TUN device.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::capsule::Capsule;
use crate::connect_ip::AssignedAddress;
use crate::net::Family;

/// What the site's session reports to its shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The addresses this site may use (replace the TUN's addresses).
    Addresses(Vec<IpNet>),
    /// The prefixes reachable through the tunnel (replace the routes).
    Routes(Vec<IpNet>),
    /// A request this site made was denied.
    Denied {
        /// Its Request ID.
        request_id: u64,
    },
    /// An IP packet carried in a DATAGRAM capsule (HTTP/2).
    Datagram(Vec<u8>),
}

/// The site's half of a CONNECT-IP session.
#[derive(Debug, Clone, Default)]
pub struct ClientSession {
    addresses: Vec<IpNet>,
    /// The last ADDRESS_ASSIGN, with the Request IDs each entry answers.
    assigned: Vec<AssignedAddress>,
    routes: Vec<IpNet>,
}

impl ClientSession {
    /// The addresses last assigned.
    pub fn addresses(&self) -> &[IpNet] {
        &self.addresses
    }

    /// The routes last advertised.
    pub fn routes(&self) -> &[IpNet] {
        &self.routes
    }

    /// The prefix last assigned in answer to `request_id`, if any.
    pub fn assigned_for(&self, request_id: u64) -> Option<IpNet> {
        self.assigned
            .iter()
            .find(|a| a.request_id == request_id && !a.prefix.addr().is_unspecified())
            .map(|a| a.prefix)
    }

    /// The address of `family` assigned as a single host, if any.
    pub fn host_address(&self, family: Family) -> Option<IpAddr> {
        self.addresses
            .iter()
            .find(|p| Family::of(p.addr()) == family && p.prefix_len() == family.width())
            .map(|p| p.addr())
    }

    /// A capsule arrived from the broker.
    pub fn on_capsule(&mut self, capsule: Capsule) -> Vec<ClientEvent> {
        match capsule {
            Capsule::AddressAssign(assign) => {
                let mut events = Vec::new();
                let mut addresses = Vec::new();
                self.assigned = assign.addresses.clone();
                for a in assign.addresses {
                    if a.prefix.addr().is_unspecified() {
                        events.push(ClientEvent::Denied {
                            request_id: a.request_id,
                        });
                    } else {
                        addresses.push(a.prefix);
                    }
                }
                addresses.sort();
                addresses.dedup();
                if addresses != self.addresses {
                    self.addresses = addresses.clone();
                    events.push(ClientEvent::Addresses(addresses));
                }
                events
            }
            Capsule::RouteAdvertisement(ad) => {
                let routes: Vec<IpNet> = ad
                    .ranges
                    .iter()
                    .filter(|r| r.protocol == 0)
                    .flat_map(|r| r.to_prefixes())
                    .collect();
                if routes == self.routes {
                    return Vec::new();
                }
                self.routes = routes.clone();
                vec![ClientEvent::Routes(routes)]
            }
            Capsule::Datagram(payload) => vec![ClientEvent::Datagram(payload)],
            Capsule::AddressRequest(_) | Capsule::Unknown { .. } => Vec::new(),
        }
    }
}
