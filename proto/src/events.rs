//! A site's history for the people who run the fleet: the events of its
//! sessions and of its trust ([`SiteEvent`]), kept per site in a bounded
//! [`Timeline`], what they say about the site now ([`History`],
//! [`SiteState`]: online, offline, flapping, revoked), and the filter and
//! paging of the fleet's site list ([`SiteQuery`], [`page`]).
//!
//! Events are written on session and trust changes only (a tunnel opened or
//! ended, a certificate issued, a site revoked), never per packet. Time is
//! an input: Unix seconds, read by the shell.
//!
//! A site's "connected" event also carries what every broker of a fleet
//! needs to answer the site's SRV names ([`Announced`]): the fleet id of the
//! broker holding the session and the services the site announced. Only
//! the newest such event of a timeline keeps its services.

use std::collections::VecDeque;

use crate::broker::CloseReason;
use crate::dns::Service;

/// Events kept per site: older ones are dropped as new ones arrive.
pub const TIMELINE_LIMIT: usize = 200;

/// A site that lost its tunnel this many times within
/// [`FLAP_WINDOW_SECS`] is flapping.
pub const FLAP_DISCONNECTS: usize = 3;

/// The window of [`FLAP_DISCONNECTS`], seconds.
pub const FLAP_WINDOW_SECS: u64 = 600;

/// Most sites in one page of the site list.
pub const MAX_PAGE: usize = 500;

/// Sites in a page when the caller names no limit.
pub const DEFAULT_PAGE: usize = 100;

/// Most services a site may announce for one session. They travel in its
/// "connected" event, which every broker of a fleet reads: with names of
/// at most 63 bytes (a DNS label) the event stays under 3 KiB of JSON.
pub const MAX_SERVICES: usize = 32;

/// Why a site's tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum Disconnect {
    /// The operator revoked the site.
    Revoked,
    /// The site connected again (a newer session replaced this one).
    Replaced,
    /// The site's certificate expired.
    CertificateExpired,
    /// The broker shut down.
    Shutdown,
    /// The connection was lost (idle timeout, reset, network gone).
    ConnectionLost,
    /// The site ended its tunnel itself.
    SiteClosed,
    /// The site broke the tunnel protocol.
    ProtocolError,
    /// The path stopped carrying full-size packets (its MTU narrowed under
    /// the connection): closed so the site dials again over what fits.
    PathBlackHole,
}

impl Disconnect {
    /// Every reason, for labels and tests.
    pub const ALL: [Disconnect; 8] = [
        Disconnect::Revoked,
        Disconnect::Replaced,
        Disconnect::CertificateExpired,
        Disconnect::Shutdown,
        Disconnect::ConnectionLost,
        Disconnect::SiteClosed,
        Disconnect::ProtocolError,
        Disconnect::PathBlackHole,
    ];

    /// Stable label (the JSON value).
    pub fn as_str(self) -> &'static str {
        match self {
            Disconnect::Revoked => "revoked",
            Disconnect::Replaced => "replaced",
            Disconnect::CertificateExpired => "certificate_expired",
            Disconnect::Shutdown => "shutdown",
            Disconnect::ConnectionLost => "connection_lost",
            Disconnect::SiteClosed => "site_closed",
            Disconnect::ProtocolError => "protocol_error",
            Disconnect::PathBlackHole => "path_black_hole",
        }
    }

    /// Plain words for an operator.
    pub fn describe(self) -> &'static str {
        match self {
            Disconnect::Revoked => "the site was revoked",
            Disconnect::Replaced => "the site connected again (newer session)",
            Disconnect::CertificateExpired => "the site's certificate expired",
            Disconnect::Shutdown => "the broker shut down",
            Disconnect::ConnectionLost => "the connection was lost",
            Disconnect::SiteClosed => "the site closed its tunnel",
            Disconnect::ProtocolError => "the site broke the tunnel protocol",
            Disconnect::PathBlackHole => "the path stopped carrying full-size packets",
        }
    }

    /// Whether it counts towards flapping: the tunnel went away without
    /// the operator, the broker's shutdown or the site's own reconnect
    /// being the cause.
    pub fn is_instability(self) -> bool {
        matches!(
            self,
            Disconnect::ConnectionLost
                | Disconnect::ProtocolError
                | Disconnect::SiteClosed
                | Disconnect::PathBlackHole
        )
    }
}

impl From<CloseReason> for Disconnect {
    fn from(r: CloseReason) -> Self {
        match r {
            CloseReason::Revoked => Disconnect::Revoked,
            CloseReason::Replaced => Disconnect::Replaced,
            CloseReason::CertificateExpired => Disconnect::CertificateExpired,
            CloseReason::Shutdown => Disconnect::Shutdown,
        }
    }
}

impl std::fmt::Display for Disconnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to a site.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(tag = "kind", rename_all = "snake_case")
)]
pub enum EventKind {
    /// A tunnel opened.
    Connected {
        /// `h3`, `h2` or `h2-proxy`.
        transport: String,
        /// The site's address as the broker saw it (after NAT).
        remote: String,
        /// The fleet id of the broker holding the session (a broker on
        /// etcd), which its owner record in the fleet names.
        #[cfg_attr(
            feature = "serde",
            serde(default, skip_serializing_if = "Option::is_none")
        )]
        holder: Option<String>,
        /// The services the site announced for the session (SRV names);
        /// emptied once a newer "connected" event is in the timeline.
        #[cfg_attr(
            feature = "serde",
            serde(default, skip_serializing_if = "Vec::is_empty")
        )]
        services: Vec<Service>,
    },
    /// A tunnel ended.
    Disconnected {
        /// Why.
        reason: Disconnect,
        /// More detail, when there is any (a protocol error's text).
        #[cfg_attr(
            feature = "serde",
            serde(default, skip_serializing_if = "Option::is_none")
        )]
        detail: Option<String>,
    },
    /// The site enrolled with a one-time code.
    Enrolled {
        /// Its certificate's expiry, Unix seconds.
        not_after: u64,
    },
    /// The site renewed its certificate over its tunnel.
    Renewed {
        /// The new certificate's expiry, Unix seconds.
        not_after: u64,
    },
    /// The site proved it holds its key after its certificate expired.
    Reattested {
        /// The new certificate's expiry, if one was issued.
        #[cfg_attr(
            feature = "serde",
            serde(default, skip_serializing_if = "Option::is_none")
        )]
        not_after: Option<u64>,
    },
    /// The operator revoked the site.
    Revoked,
    /// The operator admitted the site again with a new code.
    Readmitted,
    /// The site's agent reported a problem ([`crate::report`]).
    Reported {
        /// What kind of problem.
        problem: crate::report::ProblemKind,
        /// The agent's words, sanitized and cut by the broker.
        detail: String,
        /// How often it happened since the agent's previous report.
        count: u64,
    },
}

impl EventKind {
    /// Short label.
    pub fn as_str(&self) -> &'static str {
        match self {
            EventKind::Connected { .. } => "connected",
            EventKind::Disconnected { .. } => "disconnected",
            EventKind::Enrolled { .. } => "enrolled",
            EventKind::Renewed { .. } => "renewed",
            EventKind::Reattested { .. } => "reattested",
            EventKind::Revoked => "revoked",
            EventKind::Readmitted => "readmitted",
            EventKind::Reported { .. } => "reported",
        }
    }

    /// One line for an operator.
    pub fn describe(&self) -> String {
        match self {
            EventKind::Connected {
                transport, remote, ..
            } => {
                format!("connected over {transport} from {remote}")
            }
            EventKind::Disconnected { reason, detail } => match detail {
                Some(d) => format!("disconnected: {} ({d})", reason.describe()),
                None => format!("disconnected: {}", reason.describe()),
            },
            EventKind::Enrolled { .. } => "enrolled".into(),
            EventKind::Renewed { .. } => "certificate renewed".into(),
            EventKind::Reattested { .. } => "re-attested with its key".into(),
            EventKind::Revoked => "revoked by the operator".into(),
            EventKind::Readmitted => "admitted again by the operator".into(),
            EventKind::Reported {
                problem,
                detail,
                count,
            } => {
                let times = if *count > 1 {
                    format!(" ({count} times)")
                } else {
                    String::new()
                };
                format!("the site reports: {}: {detail}{times}", problem.describe())
            }
        }
    }

    /// The certificate expiry the event announces.
    fn not_after(&self) -> Option<u64> {
        match self {
            EventKind::Enrolled { not_after } | EventKind::Renewed { not_after } => {
                Some(*not_after)
            }
            EventKind::Reattested { not_after } => *not_after,
            _ => None,
        }
    }
}

/// One event of one site.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SiteEvent {
    /// When, Unix seconds.
    pub at: u64,
    /// The broker that saw it (its tunnel address or fleet id).
    pub broker: String,
    /// What happened.
    #[cfg_attr(feature = "serde", serde(flatten))]
    pub kind: EventKind,
}

/// A site's events, oldest first, at most a limit of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(transparent)
)]
pub struct Timeline {
    events: VecDeque<SiteEvent>,
}

impl Timeline {
    /// Appends `event`, dropping the oldest ones beyond `limit` (at least
    /// one is kept). Returns how many were dropped.
    ///
    /// Events are kept in the order they are appended; the broker's clock
    /// may step backwards and brokers' clocks differ, and the order of
    /// arrival is what happened.
    ///
    /// A "connected" event takes the services of the earlier ones: only
    /// the newest session's services matter, and the timeline stays small.
    pub fn push(&mut self, event: SiteEvent, limit: usize) -> usize {
        if matches!(event.kind, EventKind::Connected { .. }) {
            for e in &mut self.events {
                if let EventKind::Connected { services, .. } = &mut e.kind {
                    services.clear();
                }
            }
        }
        self.events.push_back(event);
        let limit = limit.max(1);
        let excess = self.events.len().saturating_sub(limit);
        self.events.drain(..excess);
        excess
    }

    /// The events, oldest first.
    pub fn events(&self) -> impl DoubleEndedIterator<Item = &SiteEvent> + ExactSizeIterator {
        self.events.iter()
    }

    /// How many events it holds.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The newest events, at most `n`, oldest first.
    pub fn newest(&self, n: usize) -> Vec<SiteEvent> {
        let skip = self.events.len().saturating_sub(n);
        self.events.iter().skip(skip).cloned().collect()
    }
}

/// A site's state as the fleet console shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum SiteState {
    /// A tunnel is open.
    Online,
    /// No tunnel.
    Offline,
    /// It lost its tunnel [`FLAP_DISCONNECTS`] times or more within
    /// [`FLAP_WINDOW_SECS`], online or not.
    Flapping,
    /// The operator revoked it.
    Revoked,
}

impl SiteState {
    /// Every state.
    pub const ALL: [SiteState; 4] = [
        SiteState::Online,
        SiteState::Offline,
        SiteState::Flapping,
        SiteState::Revoked,
    ];

    /// Label (the JSON value).
    pub fn as_str(self) -> &'static str {
        match self {
            SiteState::Online => "online",
            SiteState::Offline => "offline",
            SiteState::Flapping => "flapping",
            SiteState::Revoked => "revoked",
        }
    }
}

impl std::str::FromStr for SiteState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| format!("unknown state {s:?}: use online, offline, flapping or revoked"))
    }
}

/// The services a site announced when its latest session opened, and the
/// broker that holds the session.
///
/// They are the site's services while the fleet names `holder` as the
/// site's owner: that record goes when the session ends and when the
/// holder's lease in etcd expires. A "disconnected" event does not end
/// them: a session replaced by a newer one at the same broker can record
/// its end after its successor's start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced {
    /// The fleet id of the broker holding the session.
    pub holder: String,
    /// The services (at most [`MAX_SERVICES`]).
    pub services: Vec<Service>,
}

impl Announced {
    /// The services, if `owner` (the broker the fleet says holds the site
    /// now) is the broker that recorded them.
    pub fn held_by(&self, owner: &str) -> Option<&[Service]> {
        (self.holder == owner).then_some(self.services.as_slice())
    }
}

/// What a site's events say about it, kept small: enough to tell its
/// state and since when without reading its timeline.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// The newest event.
    pub last: Option<SiteEvent>,
    /// When its latest tunnel opened.
    pub last_connected: Option<u64>,
    /// When its latest tunnel ended, and why.
    pub last_disconnected: Option<(u64, Disconnect)>,
    /// When it was last revoked.
    pub revoked_at: Option<u64>,
    /// Its newest certificate's expiry, as the events announced it.
    pub cert_not_after: Option<u64>,
    /// The services its latest session announced, and the broker holding
    /// that session ([`Announced`]); none when that session announced
    /// none, after a revocation, and without a fleet.
    pub announced: Option<Announced>,
    /// Times of the newest unstable disconnects (at most
    /// [`FLAP_DISCONNECTS`]).
    unstable: VecDeque<u64>,
}

impl History {
    /// The history a whole timeline tells.
    pub fn of(timeline: &Timeline) -> Self {
        let mut h = Self::default();
        for e in timeline.events() {
            h.apply(e);
        }
        h
    }

    /// Takes one more event into account.
    pub fn apply(&mut self, event: &SiteEvent) {
        match &event.kind {
            EventKind::Connected {
                holder, services, ..
            } => {
                self.last_connected = Some(event.at);
                self.announced = holder
                    .as_ref()
                    .filter(|_| !services.is_empty())
                    .map(|holder| Announced {
                        holder: holder.clone(),
                        services: services.iter().take(MAX_SERVICES).cloned().collect(),
                    });
            }
            EventKind::Disconnected { reason, .. } => {
                self.last_disconnected = Some((event.at, *reason));
                if reason.is_instability() {
                    self.unstable.push_back(event.at);
                    while self.unstable.len() > FLAP_DISCONNECTS {
                        self.unstable.pop_front();
                    }
                }
            }
            EventKind::Revoked => {
                self.revoked_at = Some(event.at);
                self.announced = None;
            }
            EventKind::Readmitted => self.revoked_at = None,
            kind => {
                if let Some(t) = kind.not_after() {
                    self.cert_not_after = Some(t);
                }
            }
        }
        self.last = Some(event.clone());
    }

    /// Whether the site lost its tunnel [`FLAP_DISCONNECTS`] times within
    /// the [`FLAP_WINDOW_SECS`] before `now`.
    pub fn is_flapping(&self, now: u64) -> bool {
        let since = now.saturating_sub(FLAP_WINDOW_SECS);
        self.unstable.iter().filter(|t| **t >= since).count() >= FLAP_DISCONNECTS
    }

    /// The site's state at `now` and since when (Unix seconds, when
    /// known), given whether a broker holds its tunnel (`online`, since
    /// `online_since`) and whether the store says it is revoked.
    pub fn state(
        &self,
        online_since: Option<u64>,
        revoked: bool,
        now: u64,
    ) -> (SiteState, Option<u64>) {
        if revoked {
            return (SiteState::Revoked, self.revoked_at);
        }
        if self.is_flapping(now) {
            // Unstable since the first of the disconnects that make it so.
            let since = now.saturating_sub(FLAP_WINDOW_SECS);
            return (
                SiteState::Flapping,
                self.unstable.iter().copied().find(|t| *t >= since),
            );
        }
        match online_since {
            Some(t) => (SiteState::Online, Some(t)),
            None => (
                SiteState::Offline,
                self.last_disconnected.map(|(t, _)| t).or(self.revoked_at),
            ),
        }
    }

    /// When anything last happened to the site.
    pub fn last_change(&self) -> Option<u64> {
        self.last.as_ref().map(|e| e.at)
    }
}

/// A filter of the site list: every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SiteQuery {
    /// Words that must all appear (case-insensitive) in the site's id,
    /// region or one of its other words (addresses, remote address).
    pub text: Option<String>,
    /// Only sites in this state.
    pub state: Option<SiteState>,
    /// Only sites of this region.
    pub region: Option<String>,
    /// Only sites with an event at or after this time, Unix seconds.
    pub changed_since: Option<u64>,
}

/// What [`SiteQuery::matches`] looks at in one site.
#[derive(Debug, Clone, Copy)]
pub struct SiteFacts<'a> {
    /// The site id.
    pub site: &'a str,
    /// Its region.
    pub region: &'a str,
    /// Its state.
    pub state: SiteState,
    /// When anything last happened to it.
    pub last_change: Option<u64>,
    /// Other words to search (addresses, LAN prefixes, its remote
    /// address, the transport).
    pub words: &'a [String],
}

impl SiteQuery {
    /// Whether `site` passes the filter.
    pub fn matches(&self, site: &SiteFacts<'_>) -> bool {
        if self.state.is_some_and(|s| s != site.state) {
            return false;
        }
        if self.region.as_deref().is_some_and(|r| r != site.region) {
            return false;
        }
        if let Some(t) = self.changed_since
            && site.last_change.is_none_or(|c| c < t)
        {
            return false;
        }
        match self.text.as_deref().map(str::trim) {
            None | Some("") => true,
            Some(text) => text.split_whitespace().all(|word| {
                let word = word.to_ascii_lowercase();
                contains_ci(site.site, &word)
                    || contains_ci(site.region, &word)
                    || site.words.iter().any(|w| contains_ci(w, &word))
            }),
        }
    }
}

/// Whether `haystack` contains `needle_lower` (lower case), ignoring ASCII
/// case, without allocating.
fn contains_ci(haystack: &str, needle_lower: &str) -> bool {
    let (h, n) = (haystack.as_bytes(), needle_lower.as_bytes());
    n.is_empty()
        || h.windows(n.len())
            .any(|w| w.iter().zip(n).all(|(a, b)| a.to_ascii_lowercase() == *b))
}

/// One page of a list: `limit` items (default [`DEFAULT_PAGE`], at most
/// [`MAX_PAGE`]) from `offset`, and how many there were in all.
pub fn page<T>(items: Vec<T>, offset: usize, limit: Option<usize>) -> (usize, Vec<T>) {
    let total = items.len();
    let limit = limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let page = items.into_iter().skip(offset).take(limit).collect();
    (total, page)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(at: u64, kind: EventKind) -> SiteEvent {
        SiteEvent {
            at,
            broker: "b1".into(),
            kind,
        }
    }

    fn lost(at: u64) -> SiteEvent {
        event(
            at,
            EventKind::Disconnected {
                reason: Disconnect::ConnectionLost,
                detail: None,
            },
        )
    }

    fn connected(at: u64) -> SiteEvent {
        event(
            at,
            EventKind::Connected {
                transport: "h3".into(),
                remote: "192.0.2.1:40000".into(),
                holder: None,
                services: Vec::new(),
            },
        )
    }

    fn announcing(at: u64, holder: &str, services: &str) -> SiteEvent {
        event(
            at,
            EventKind::Connected {
                transport: "h3".into(),
                remote: "192.0.2.1:40000".into(),
                holder: Some(holder.into()),
                services: Service::parse_list(services).unwrap(),
            },
        )
    }

    fn services_of(e: &SiteEvent) -> String {
        match &e.kind {
            EventKind::Connected { services, .. } => Service::format_list(services),
            _ => String::new(),
        }
    }

    #[test]
    fn the_latest_session_announces_the_services_while_its_holder_owns_the_site() {
        let mut h = History::default();
        h.apply(&announcing(10, "b1", "dicom=104,http=80"));
        let a = h.announced.clone().unwrap();
        assert_eq!(
            Service::format_list(a.held_by("b1").unwrap()),
            "dicom=104,http=80"
        );
        // Another broker owns the site (it moved, and that broker's event
        // has not arrived yet): not these services.
        assert_eq!(a.held_by("b2"), None);
        // The end of a session is told by the owner record, not by the
        // event: a replaced session may record its end after the next
        // one's start.
        h.apply(&lost(11));
        assert!(h.announced.is_some());
        h.apply(&announcing(12, "b2", "dicom=104"));
        let a = h.announced.clone().unwrap();
        assert_eq!(a.holder, "b2");
        assert_eq!(Service::format_list(&a.services), "dicom=104");
        // A session without services, or recorded without a fleet,
        // announces none.
        h.apply(&announcing(13, "b2", ""));
        assert_eq!(h.announced, None);
        h.apply(&announcing(14, "b1", "http=80"));
        h.apply(&connected(15));
        assert_eq!(h.announced, None);
        // Revoked: none.
        h.apply(&announcing(16, "b1", "http=80"));
        h.apply(&event(17, EventKind::Revoked));
        assert_eq!(h.announced, None);
    }

    #[test]
    fn only_the_newest_connected_event_keeps_its_services() {
        let mut t = Timeline::default();
        t.push(announcing(1, "b1", "dicom=104"), TIMELINE_LIMIT);
        t.push(lost(2), TIMELINE_LIMIT);
        assert_eq!(services_of(t.events().next().unwrap()), "dicom=104");
        t.push(announcing(3, "b2", "http=80"), TIMELINE_LIMIT);
        t.push(announcing(4, "b2", "pacs=4242"), TIMELINE_LIMIT);
        let kept: Vec<_> = t.events().map(services_of).collect();
        assert_eq!(kept, ["", "", "", "pacs=4242"]);
        // The summary of the timeline is the summary of the events.
        assert_eq!(
            History::of(&t)
                .announced
                .map(|a| Service::format_list(&a.services)),
            Some("pacs=4242".to_string())
        );
    }

    #[test]
    fn a_connected_event_carries_its_services_and_reads_without_them() {
        let e = announcing(5, "0123456789abcdef", "dicom=104");
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(
            json,
            r#"{"at":5,"broker":"b1","kind":"connected","transport":"h3","remote":"192.0.2.1:40000","holder":"0123456789abcdef","services":[{"name":"dicom","port":104}]}"#
        );
        assert_eq!(serde_json::from_str::<SiteEvent>(&json).unwrap(), e);
        // Events written before services travelled with them.
        let old = r#"{"at":1,"broker":"b1","kind":"connected","transport":"h3","remote":"192.0.2.1:40000"}"#;
        assert_eq!(
            serde_json::from_str::<SiteEvent>(old).unwrap(),
            connected(1)
        );
        assert_eq!(
            serde_json::to_string(&connected(1)).unwrap(),
            old,
            "no empty fields"
        );
        // The largest announcement: MAX_SERVICES names of 63 bytes.
        let largest: Vec<_> = (0..MAX_SERVICES)
            .map(|i| format!("{i:0>63}=65535"))
            .collect();
        let e = announcing(u64::MAX, &"f".repeat(16), &largest.join(","));
        assert_eq!(services_of(&e).split(',').count(), MAX_SERVICES);
        let size = serde_json::to_string(&e).unwrap().len();
        assert!(size < 3 * 1024, "{size} bytes");
    }

    #[test]
    fn the_timeline_keeps_the_newest_events_up_to_its_limit() {
        let mut t = Timeline::default();
        for i in 0..250 {
            let dropped = t.push(connected(i), TIMELINE_LIMIT);
            assert_eq!(dropped, usize::from(i >= 200));
        }
        assert_eq!(t.len(), TIMELINE_LIMIT);
        assert_eq!(t.events().next().unwrap().at, 50);
        assert_eq!(t.events().last().unwrap().at, 249);
        assert_eq!(
            t.newest(3).iter().map(|e| e.at).collect::<Vec<_>>(),
            [247, 248, 249]
        );
        // A limit of zero still keeps the newest.
        t.push(connected(300), 0);
        assert_eq!(t.len(), 1);
        assert_eq!(t.events().next().unwrap().at, 300);
    }

    #[test]
    fn three_lost_tunnels_in_ten_minutes_is_flapping() {
        let mut h = History::default();
        for at in [1000, 1100] {
            h.apply(&connected(at - 10));
            h.apply(&lost(at));
        }
        assert!(!h.is_flapping(1200));
        h.apply(&connected(1190));
        assert_eq!(
            h.state(Some(1190), false, 1200),
            (SiteState::Online, Some(1190))
        );
        h.apply(&lost(1200));
        assert!(h.is_flapping(1200));
        assert_eq!(
            h.state(None, false, 1200),
            (SiteState::Flapping, Some(1000))
        );
        // Still flapping while online again within the window.
        assert_eq!(h.state(Some(1250), false, 1300).0, SiteState::Flapping);
        // The first disconnect leaves the window: stable again.
        assert!(h.is_flapping(1600));
        assert!(!h.is_flapping(1601));
        assert_eq!(h.state(None, false, 1601), (SiteState::Offline, Some(1200)));
    }

    #[test]
    fn spread_out_losses_are_not_flapping() {
        let mut h = History::default();
        for at in [0, 601, 1202, 1803] {
            h.apply(&lost(at));
        }
        assert!(!h.is_flapping(1803));
    }

    #[test]
    fn disconnects_the_operator_or_broker_caused_are_not_instability() {
        let mut h = History::default();
        for (at, reason) in [
            (10, Disconnect::Replaced),
            (20, Disconnect::Shutdown),
            (30, Disconnect::Revoked),
            (40, Disconnect::CertificateExpired),
        ] {
            h.apply(&event(
                at,
                EventKind::Disconnected {
                    reason,
                    detail: None,
                },
            ));
        }
        assert!(!h.is_flapping(40));
        assert_eq!(
            h.last_disconnected,
            Some((40, Disconnect::CertificateExpired))
        );
        for reason in Disconnect::ALL {
            assert_eq!(
                reason.is_instability(),
                matches!(
                    reason,
                    Disconnect::ConnectionLost
                        | Disconnect::SiteClosed
                        | Disconnect::ProtocolError
                        | Disconnect::PathBlackHole
                )
            );
        }
    }

    #[test]
    fn revocation_wins_and_readmission_lifts_it() {
        let mut h = History::default();
        h.apply(&event(5, EventKind::Enrolled { not_after: 100 }));
        h.apply(&event(50, EventKind::Renewed { not_after: 200 }));
        assert_eq!(h.cert_not_after, Some(200));
        h.apply(&event(60, EventKind::Revoked));
        assert_eq!(h.state(None, true, 70), (SiteState::Revoked, Some(60)));
        h.apply(&event(80, EventKind::Readmitted));
        assert_eq!(h.revoked_at, None);
        assert_eq!(h.state(None, false, 90), (SiteState::Offline, None));
        assert_eq!(h.last_change(), Some(80));
        h.apply(&event(95, EventKind::Reattested { not_after: None }));
        assert_eq!(h.cert_not_after, Some(200));
        h.apply(&event(
            96,
            EventKind::Reattested {
                not_after: Some(300),
            },
        ));
        assert_eq!(h.cert_not_after, Some(300));
    }

    #[test]
    fn a_history_rebuilt_from_the_timeline_is_the_same() {
        let mut t = Timeline::default();
        let mut h = History::default();
        for i in 0..10 {
            for e in [connected(i * 100), lost(i * 100 + 50)] {
                h.apply(&e);
                t.push(e, TIMELINE_LIMIT);
            }
        }
        assert_eq!(History::of(&t), h);
    }

    fn facts<'a>(site: &'a str, state: SiteState, words: &'a [String]) -> SiteFacts<'a> {
        SiteFacts {
            site,
            region: "eu",
            state,
            last_change: Some(1000),
            words,
        }
    }

    #[test]
    fn the_query_filters_on_every_condition_given() {
        let words = vec!["100.64.0.7/32".to_string(), "h2".to_string()];
        let site = facts("Hospital-A", SiteState::Online, &words);
        assert!(SiteQuery::default().matches(&site));
        let q = |text: &str| SiteQuery {
            text: Some(text.into()),
            ..SiteQuery::default()
        };
        assert!(q("hospital").matches(&site));
        assert!(q("  ").matches(&site));
        assert!(q("HOSP 100.64.0.7").matches(&site));
        assert!(q("eu h2").matches(&site));
        assert!(!q("hospital 10.1.").matches(&site));
        assert!(!q("lab").matches(&site));
        let state = |s| SiteQuery {
            state: Some(s),
            ..SiteQuery::default()
        };
        assert!(state(SiteState::Online).matches(&site));
        assert!(!state(SiteState::Flapping).matches(&site));
        let region = |r: &str| SiteQuery {
            region: Some(r.into()),
            ..SiteQuery::default()
        };
        assert!(region("eu").matches(&site));
        assert!(!region("us").matches(&site));
        let since = |t| SiteQuery {
            changed_since: Some(t),
            ..SiteQuery::default()
        };
        assert!(since(1000).matches(&site));
        assert!(!since(1001).matches(&site));
        let quiet = SiteFacts {
            last_change: None,
            ..site
        };
        assert!(!since(0).matches(&quiet));
    }

    #[test]
    fn states_parse_from_their_labels() {
        for s in SiteState::ALL {
            assert_eq!(s.as_str().parse::<SiteState>(), Ok(s));
        }
        assert!(
            "up".parse::<SiteState>()
                .unwrap_err()
                .contains("online, offline")
        );
    }

    #[test]
    fn pages_are_bounded() {
        let items: Vec<u32> = (0..1000).collect();
        let (total, p) = page(items.clone(), 0, None);
        assert_eq!((total, p.len(), p[0]), (1000, DEFAULT_PAGE, 0));
        let (_, p) = page(items.clone(), 990, Some(50));
        assert_eq!(p, (990..1000).collect::<Vec<_>>());
        let (_, p) = page(items.clone(), 0, Some(100_000));
        assert_eq!(p.len(), MAX_PAGE);
        let (_, p) = page(items.clone(), 0, Some(0));
        assert_eq!(p.len(), 1);
        let (total, p) = page(items, 5000, Some(10));
        assert_eq!((total, p.len()), (1000, 0));
    }

    #[test]
    fn events_round_trip_as_json() {
        let mut t = Timeline::default();
        t.push(connected(1), 10);
        t.push(
            event(
                2,
                EventKind::Disconnected {
                    reason: Disconnect::ProtocolError,
                    detail: Some("bad capsule".into()),
                },
            ),
            10,
        );
        t.push(event(3, EventKind::Revoked), 10);
        let json = serde_json::to_string(&t).unwrap();
        assert!(
            json.contains(r#"{"at":2,"broker":"b1","kind":"disconnected","reason":"protocol_error","detail":"bad capsule"}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Timeline>(&json).unwrap(), t);
        assert_eq!(
            t.events().nth(1).unwrap().kind.describe(),
            "disconnected: the site broke the tunnel protocol (bad capsule)"
        );
    }
}
