//! The session registry: one current session per site, and its routes.
//!
//! # Which session wins
//!
//! A site reconnects while its old tunnel is still open (NAT rebinding, a
//! transport switch), and two requests of one site can finish their
//! allocation out of order. The session whose connection was established
//! later wins, whatever order they register in: a newer session replaces the
//! current one (closed as [`CloseReason::Replaced`]), an older one is refused
//! ([`OpenError::Superseded`]). Equal times go to the one registering last.
//!
//! # Revocation versus registration
//!
//! A revocation can reach the broker after a request passed its checks and
//! before the session registers. The core keeps every revocation it has
//! seen, so registration refuses the session then ([`OpenError::Revoked`]);
//! the sweep in [`BrokerCore::handle_revocation`] covers sessions already
//! registered.

use std::time::Instant;

use ipnet::IpNet;

use super::{BrokerCore, CloseReason, Event};
use crate::ids::{RegionId, SiteId};
use crate::route::{Route, RouteKind, RouteTarget};

/// Identifies a session. Chosen by the shell, unique for the core's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub u64);

/// A session asking to become its site's current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionOpen {
    /// The session.
    pub id: SessionId,
    /// The site, from its verified certificate.
    pub site: SiteId,
    /// The site's region, from its certificate.
    pub region: RegionId,
    /// The certificate's serial number.
    pub serial: Vec<u8>,
    /// The site's addresses (allocated for this session).
    pub addresses: Vec<IpNet>,
    /// When the connection carrying it was established: orders two
    /// sessions of one site.
    pub connected_at: Instant,
    /// When the site's certificate expires.
    pub not_after: Instant,
}

/// Why a session was not registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The site or the certificate is revoked.
    #[error("the site or its certificate is revoked")]
    Revoked,
    /// The site already has a session on a newer connection.
    #[error("the site has a newer session")]
    Superseded {
        /// The newer session.
        by: SessionId,
    },
    /// The certificate expired before the session registered.
    #[error("the site certificate expired")]
    Expired,
    /// The same session registered twice.
    #[error("the session is already registered")]
    Duplicate,
}

impl OpenError {
    /// How the refused session's tunnel ends.
    pub fn close_reason(self) -> CloseReason {
        match self {
            OpenError::Revoked => CloseReason::Revoked,
            OpenError::Superseded { .. } | OpenError::Duplicate => CloseReason::Replaced,
            OpenError::Expired => CloseReason::CertificateExpired,
        }
    }
}

/// The core's record of a current session.
#[derive(Debug, Clone)]
pub(crate) struct Current {
    pub(crate) id: SessionId,
    pub(crate) region: RegionId,
    pub(crate) serial: Vec<u8>,
    pub(crate) addresses: Vec<IpNet>,
    pub(crate) connected_at: Instant,
    pub(crate) not_after: Instant,
}

impl BrokerCore {
    /// Registers a session and installs its address routes, replacing the
    /// site's current session if this one is newer.
    pub fn handle_session_open(
        &mut self,
        open: SessionOpen,
        now: Instant,
    ) -> Result<(), OpenError> {
        if self.is_revoked(&open.site, &open.region, &open.serial) {
            return Err(OpenError::Revoked);
        }
        if open.not_after <= now {
            return Err(OpenError::Expired);
        }
        if let Some(current) = self.sessions.get(&open.site) {
            if current.id == open.id {
                return Err(OpenError::Duplicate);
            }
            if current.connected_at > open.connected_at {
                return Err(OpenError::Superseded { by: current.id });
            }
            self.end(&open.site, Some(CloseReason::Replaced));
        }
        let target = RouteTarget::Site(open.site.clone());
        for prefix in &open.addresses {
            self.router.table.insert(Route {
                prefix: *prefix,
                kind: RouteKind::SiteAddress,
                target: target.clone(),
                region: open.region.clone(),
            });
        }
        self.sessions.insert(
            open.site,
            Current {
                id: open.id,
                region: open.region,
                serial: open.serial,
                addresses: open.addresses,
                connected_at: open.connected_at,
                not_after: open.not_after,
            },
        );
        self.push_event(Event::RoutesChanged);
        self.push_event(Event::SessionsChanged);
        Ok(())
    }

    /// The tunnel of a session ended on its own. Returns whether it was its
    /// site's current session (whose routes are now withdrawn).
    pub fn handle_session_closed(&mut self, site: &SiteId, id: SessionId, _now: Instant) -> bool {
        if self.sessions.get(site).is_none_or(|s| s.id != id) {
            return false;
        }
        self.end(site, None);
        true
    }

    /// Replaces the LAN routes of a current session with `prefixes`. A
    /// session that is no longer current changes nothing (returns false).
    pub fn handle_lan_routes(&mut self, site: &SiteId, id: SessionId, prefixes: &[IpNet]) -> bool {
        let Some(current) = self.sessions.get(site).filter(|s| s.id == id) else {
            return false;
        };
        let region = current.region.clone();
        let target = RouteTarget::Site(site.clone());
        let stale: Vec<IpNet> = self
            .router
            .table
            .routes_to(&target)
            .into_iter()
            .filter(|r| r.kind == RouteKind::SiteLan && !prefixes.contains(&r.prefix))
            .map(|r| r.prefix)
            .collect();
        for prefix in stale {
            self.router.table.remove(prefix, &target);
        }
        for prefix in prefixes {
            self.router.table.insert(Route {
                prefix: *prefix,
                kind: RouteKind::SiteLan,
                target: target.clone(),
                region: region.clone(),
            });
        }
        self.push_event(Event::RoutesChanged);
        true
    }

    /// The current session of a site.
    pub fn session(&self, site: &SiteId) -> Option<SessionId> {
        self.sessions.get(site).map(|s| s.id)
    }

    /// Every current session, by site.
    pub fn sessions(&self) -> impl Iterator<Item = (&SiteId, SessionId)> {
        self.sessions.iter().map(|(site, s)| (site, s.id))
    }

    /// The addresses the current session of a site was given.
    pub fn session_addresses(&self, site: &SiteId) -> &[IpNet] {
        self.sessions
            .get(site)
            .map(|s| s.addresses.as_slice())
            .unwrap_or_default()
    }

    /// The site's certificate was renewed during its session: the session
    /// now ends at the new certificate's expiry. Returns whether the session
    /// is current.
    pub fn handle_certificate_renewed(
        &mut self,
        site: &SiteId,
        id: SessionId,
        serial: Vec<u8>,
        not_after: Instant,
    ) -> bool {
        match self.sessions.get_mut(site).filter(|s| s.id == id) {
            Some(s) => {
                s.serial = serial;
                s.not_after = not_after;
                true
            }
            None => false,
        }
    }

    /// Forgets the site's current session and withdraws its routes; tells
    /// the shell to close it when `reason` is given.
    pub(crate) fn end(&mut self, site: &SiteId, reason: Option<CloseReason>) {
        let Some(current) = self.sessions.remove(site) else {
            return;
        };
        self.router
            .table
            .remove_target(&RouteTarget::Site(site.clone()));
        if let Some(reason) = reason {
            self.push_event(Event::CloseSession {
                session: current.id,
                site: site.clone(),
                reason,
            });
        }
        self.push_event(Event::RoutesChanged);
        self.push_event(Event::SessionsChanged);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testing::*;
    use super::super::{BrokerCore, Revocation};
    use super::*;

    fn open(id: u64, site: &str, addr: &str, connected_at: Instant) -> SessionOpen {
        SessionOpen {
            id: SessionId(id),
            site: self::id(site),
            region: eu(),
            serial: vec![id as u8],
            addresses: vec![self::id(addr)],
            connected_at,
            not_after: connected_at + Duration::from_secs(3600),
        }
    }

    fn target(core: &BrokerCore, addr: &str) -> Option<RouteTarget> {
        core.router()
            .table
            .lookup(id(addr))
            .winner()
            .map(|r| r.target.clone())
    }

    #[test]
    fn open_installs_routes_and_close_withdraws_them() {
        let t0 = Instant::now();
        let mut core = BrokerCore::new(config());
        core.handle_session_open(open(1, "a", "100.64.0.5/32", t0), t0)
            .unwrap();
        assert_eq!(core.session(&id("a")), Some(SessionId(1)));
        assert_eq!(
            target(&core, "100.64.0.5"),
            Some(RouteTarget::Site(id("a")))
        );
        assert_eq!(
            events(&mut core),
            vec![Event::RoutesChanged, Event::SessionsChanged]
        );
        assert!(core.handle_session_closed(&id("a"), SessionId(1), t0));
        assert_eq!(core.session(&id("a")), None);
        assert_eq!(target(&core, "100.64.0.5"), None);
        // Closed on its own: nothing to close.
        assert!(
            !events(&mut core)
                .iter()
                .any(|e| matches!(e, Event::CloseSession { .. }))
        );
    }

    #[test]
    fn a_newer_session_replaces_the_current_one() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let mut core = BrokerCore::new(config());
        core.handle_session_open(open(1, "a", "100.64.0.5/32", t0), t0)
            .unwrap();
        events(&mut core);
        core.handle_session_open(open(2, "a", "100.64.0.5/32", t1), t1)
            .unwrap();
        assert_eq!(core.session(&id("a")), Some(SessionId(2)));
        assert_eq!(
            events(&mut core).first(),
            Some(&Event::CloseSession {
                session: SessionId(1),
                site: id("a"),
                reason: CloseReason::Replaced
            })
        );
        assert_eq!(
            target(&core, "100.64.0.5"),
            Some(RouteTarget::Site(id("a")))
        );
        // The replaced session's late close changes nothing.
        assert!(!core.handle_session_closed(&id("a"), SessionId(1), t1));
        assert_eq!(
            target(&core, "100.64.0.5"),
            Some(RouteTarget::Site(id("a")))
        );
    }

    /// Regression: a session established earlier but registering later
    /// (its allocation was slow) must not replace the newer one.
    #[test]
    fn a_stale_session_never_replaces_a_newer_one() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let mut core = BrokerCore::new(config());
        core.handle_session_open(open(2, "a", "100.64.0.5/32", t1), t1)
            .unwrap();
        events(&mut core);
        assert_eq!(
            core.handle_session_open(open(1, "a", "100.64.0.5/32", t0), t1),
            Err(OpenError::Superseded { by: SessionId(2) })
        );
        assert_eq!(
            OpenError::Superseded { by: SessionId(2) }.close_reason(),
            CloseReason::Replaced
        );
        assert_eq!(core.session(&id("a")), Some(SessionId(2)));
        assert!(events(&mut core).is_empty());
    }

    /// Regression: a revocation that arrives between a request's checks and
    /// its registration refuses the session.
    #[test]
    fn a_revocation_known_before_registration_refuses_the_session() {
        let t0 = Instant::now();
        let mut core = BrokerCore::new(config());
        core.handle_revocation(
            Revocation::Site {
                site: id("a"),
                region: eu(),
            },
            t0,
        );
        assert_eq!(
            core.handle_session_open(open(1, "a", "100.64.0.5/32", t0), t0),
            Err(OpenError::Revoked)
        );
        assert_eq!(target(&core, "100.64.0.5"), None);
        // A revoked serial refuses only that certificate.
        core.handle_revocation(Revocation::Serial(vec![7]), t0);
        assert_eq!(
            core.handle_session_open(open(7, "b", "100.64.0.6/32", t0), t0),
            Err(OpenError::Revoked)
        );
        core.handle_session_open(open(8, "b", "100.64.0.6/32", t0), t0)
            .unwrap();
        // Re-admission lifts the site revocation.
        core.handle_reinstatement(&Revocation::Site {
            site: id("a"),
            region: eu(),
        });
        core.handle_session_open(open(1, "a", "100.64.0.5/32", t0), t0)
            .unwrap();
    }

    #[test]
    fn revocation_sweeps_sessions_and_routes() {
        let t0 = Instant::now();
        let mut core = BrokerCore::new(config());
        core.handle_session_open(open(1, "a", "100.64.0.5/32", t0), t0)
            .unwrap();
        core.handle_session_open(open(2, "b", "100.64.0.6/32", t0), t0)
            .unwrap();
        assert!(core.handle_lan_routes(&id("a"), SessionId(1), &[id("100.64.1.0/24")]));
        events(&mut core);
        core.handle_revocation(Revocation::Serial(vec![1]), t0);
        assert_eq!(core.session(&id("a")), None);
        assert_eq!(target(&core, "100.64.0.5"), None);
        assert_eq!(target(&core, "100.64.1.9"), None);
        assert_eq!(core.session(&id("b")), Some(SessionId(2)));
        assert_eq!(
            events(&mut core).first(),
            Some(&Event::CloseSession {
                session: SessionId(1),
                site: id("a"),
                reason: CloseReason::Revoked
            })
        );
        core.handle_revocation(
            Revocation::Site {
                site: id("b"),
                region: eu(),
            },
            t0,
        );
        assert_eq!(core.session(&id("b")), None);
        // Only the gateway routes are left.
        assert!(
            core.router()
                .table
                .routes()
                .iter()
                .all(|r| r.kind == RouteKind::Gateway)
        );
    }

    #[test]
    fn lan_routes_follow_the_current_session_only() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let mut core = BrokerCore::new(config());
        core.handle_session_open(open(1, "a", "100.64.0.5/32", t0), t0)
            .unwrap();
        assert!(core.handle_lan_routes(
            &id("a"),
            SessionId(1),
            &[id("100.64.1.0/24"), id("100.64.2.0/24")]
        ));
        assert!(core.handle_lan_routes(&id("a"), SessionId(1), &[id("100.64.2.0/24")]));
        assert_eq!(target(&core, "100.64.1.1"), None);
        assert_eq!(
            target(&core, "100.64.2.1"),
            Some(RouteTarget::Site(id("a")))
        );
        core.handle_session_open(open(2, "a", "100.64.0.5/32", t1), t1)
            .unwrap();
        // The replaced session's LAN routes went with it, and it cannot
        // install new ones.
        assert_eq!(target(&core, "100.64.2.1"), None);
        assert!(!core.handle_lan_routes(&id("a"), SessionId(1), &[id("100.64.3.0/24")]));
        assert_eq!(target(&core, "100.64.3.1"), None);
    }

    #[test]
    fn certificate_expiry_is_a_deadline() {
        let t0 = Instant::now();
        let mut core = BrokerCore::new(config());
        assert_eq!(core.poll_timeout(), None);
        let mut a = open(1, "a", "100.64.0.5/32", t0);
        a.not_after = t0 + Duration::from_secs(60);
        let mut b = open(2, "b", "100.64.0.6/32", t0);
        b.not_after = t0 + Duration::from_secs(120);
        core.handle_session_open(a, t0).unwrap();
        core.handle_session_open(b, t0).unwrap();
        events(&mut core);
        assert_eq!(core.poll_timeout(), Some(t0 + Duration::from_secs(60)));
        core.handle_timeout(t0 + Duration::from_secs(59));
        assert!(events(&mut core).is_empty());
        core.handle_timeout(t0 + Duration::from_secs(60));
        assert_eq!(core.session(&id("a")), None);
        assert_eq!(
            events(&mut core).first(),
            Some(&Event::CloseSession {
                session: SessionId(1),
                site: id("a"),
                reason: CloseReason::CertificateExpired
            })
        );
        // Renewal moves the deadline.
        assert!(core.handle_certificate_renewed(
            &id("b"),
            SessionId(2),
            vec![9],
            t0 + Duration::from_secs(600)
        ));
        assert_eq!(core.poll_timeout(), Some(t0 + Duration::from_secs(600)));
        core.handle_timeout(t0 + Duration::from_secs(599));
        assert_eq!(core.session(&id("b")), Some(SessionId(2)));
        // An already expired certificate does not register.
        let mut c = open(3, "c", "100.64.0.7/32", t0);
        c.not_after = t0;
        assert_eq!(core.handle_session_open(c, t0), Err(OpenError::Expired));
    }
}
