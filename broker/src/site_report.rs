//! Problems a site reports for its event timeline.
//!
//! `POST /.well-known/tether/report` with the site's certificate and a
//! [`ReportRequest`]: the problems its agent met since its last report (a
//! LAN prefix refused, packets it could not translate, a device or clock
//! problem). The site is not trusted: the body is read up to
//! [`MAX_REPORT_BODY`] bytes, a report of more than
//! [`MAX_PROBLEMS`](tether_proto::report::MAX_PROBLEMS) problems is
//! refused, details are cut to printable text, and each site has a budget
//! ([`ReportBudget`](tether_proto::report::ReportBudget)): what is beyond
//! it is counted, not stored. Stored problems go to the timeline like any
//! other event, within its retention limit.
//!
//! An agent repeats a problem that goes on (e.g. packets it cannot
//! translate, with its running counts, every 10 s). Writing each repeat
//! would rewrite the site's timeline in the store about once a minute, so
//! a problem of a kind the site reported before ([`ReportMemory`]) is
//! stored again only when its words changed and the last one of its kind
//! was stored at least [`STORE_CHANGED_EVERY_SECS`] ago: an unchanged
//! problem writes nothing, a changing one at most one event per kind per
//! half hour. What was not stored is kept in memory: the newest words and
//! the count since the stored event, shown after the stored events in the
//! site's event view at this broker (until the site reports that kind on
//! another broker, or this broker restarts).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tether_pki::PeerCert;
use tether_proto::events::{EventKind, SiteEvent};
use tether_proto::ids::SiteId;
use tether_proto::report::{Problem, ProblemKind, ReportRequest, ReportResponse, accept};

use crate::enroll::Reply;
use crate::state::Broker;

pub use tether_proto::report::MAX_REPORT_BODY as MAX_BODY;

/// Stores what a site reports (see the module documentation).
pub fn report(broker: &Arc<Broker>, peer: Option<PeerCert>, body: &[u8]) -> Reply {
    let Some(peer) = peer else {
        return Reply::error(
            401,
            "problem reports are for enrolled sites: present the site certificate",
        );
    };
    let request: ReportRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            crate::metrics::site_problems("refused", 1);
            return Reply::error(400, format!("invalid problem report: {e}"));
        }
    };
    let problems = match accept(&request) {
        Ok(p) => p,
        Err(e) => {
            crate::metrics::site_problems("refused", 1);
            return Reply::error(400, e.to_string());
        }
    };
    let site = &peer.identity.site;
    let now = crate::store::now_unix();
    let fresh = broker.site_reports().sort(site, &problems, now);
    let repeated = problems.len() - fresh.len();
    if repeated > 0 {
        tracing::debug!(%site, repeated, "reported problems repeat stored ones: kept in memory, not stored");
    }
    let stored = broker.admit_reports(site, fresh.len());
    for p in fresh.iter().take(stored) {
        tracing::info!(%site, problem = p.kind.as_str(), count = p.count, "the site reports a problem");
        tracing::debug!(%site, detail = %p.detail, "reported problem");
        broker.site_reports().stored(site, p, now);
        broker.record_event(
            site,
            EventKind::Reported {
                problem: p.kind,
                detail: p.detail.clone(),
                count: p.count,
            },
        );
    }
    let dropped = fresh.len() - stored;
    crate::metrics::site_problems("stored", stored);
    crate::metrics::site_problems("dropped", dropped);
    crate::metrics::site_problems("repeated", repeated);
    if dropped > 0 {
        tracing::debug!(%site, dropped, "reported problems beyond the site's budget");
    }
    Reply::json(
        200,
        &ReportResponse {
            stored,
            // Repeats are not stored either.
            dropped: dropped + repeated,
        },
    )
}

/// The least time between two stored problems of one kind from one site
/// whose words changed, seconds (an unchanged one is not stored again).
pub const STORE_CHANGED_EVERY_SECS: u64 = 30 * 60;

/// Sites remembered before those with nothing recent are forgotten.
const REMEMBERED_SITES: usize = 4096;

/// A kind of problem a site reported and this broker stored.
#[derive(Debug, Clone)]
struct Kept {
    /// The words stored last.
    detail: String,
    /// When, Unix seconds.
    at: u64,
    /// What the site reported since (not stored): the newest words, when,
    /// and how often in all.
    since: Option<(String, u64, u64)>,
}

/// The problems each site reported lately, by kind (see the module
/// documentation). Bounded: beyond [`REMEMBERED_SITES`] sites, those whose
/// last stored problem is older than [`STORE_CHANGED_EVERY_SECS`] are
/// forgotten (a site forgotten stores its next problem again).
#[derive(Debug, Default)]
pub struct ReportMemory(Mutex<HashMap<SiteId, BTreeMap<ProblemKind, Kept>>>);

impl ReportMemory {
    /// The problems of one report (`problems`, at `now`) to store; the
    /// others repeat a stored one and are kept in memory. Every problem of
    /// a kind not stored before is to be stored, however many the report
    /// holds (the budget bounds them).
    pub fn sort(&self, site: &SiteId, problems: &[Problem], now: u64) -> Vec<Problem> {
        let Ok(mut memory) = self.0.lock() else {
            return problems.to_vec();
        };
        if memory.len() >= REMEMBERED_SITES && !memory.contains_key(site) {
            memory.retain(|_, kinds| {
                kinds
                    .values()
                    .any(|k| now.saturating_sub(k.at) < STORE_CHANGED_EVERY_SECS)
            });
        }
        let kinds = memory.entry(site.clone()).or_default();
        let mut fresh = Vec::new();
        for p in problems {
            let repeat = kinds.get_mut(&p.kind).filter(|k| {
                k.detail == p.detail || now.saturating_sub(k.at) < STORE_CHANGED_EVERY_SECS
            });
            match repeat {
                Some(kept) => {
                    let count = kept.since.as_ref().map_or(0, |s| s.2);
                    kept.since = Some((p.detail.clone(), now, count.saturating_add(p.count)));
                }
                _ => fresh.push(p.clone()),
            }
        }
        fresh
    }

    /// Notes that `problem` was stored at `now`.
    pub fn stored(&self, site: &SiteId, problem: &Problem, now: u64) {
        if let Ok(mut memory) = self.0.lock() {
            memory.entry(site.clone()).or_default().insert(
                problem.kind,
                Kept {
                    detail: problem.detail.clone(),
                    at: now,
                    since: None,
                },
            );
        }
    }

    /// What `site` reported since its stored problems, as events seen by
    /// `broker` (one per kind, the newest words and the count since),
    /// oldest first.
    pub fn unstored(&self, site: &SiteId, broker: &str) -> Vec<SiteEvent> {
        let Ok(memory) = self.0.lock() else {
            return Vec::new();
        };
        let mut events: Vec<SiteEvent> = memory
            .get(site)
            .into_iter()
            .flat_map(|kinds| kinds.iter())
            .filter_map(|(kind, kept)| {
                kept.since.as_ref().map(|(detail, at, count)| SiteEvent {
                    at: *at,
                    broker: broker.to_string(),
                    kind: EventKind::Reported {
                        problem: *kind,
                        detail: detail.clone(),
                        count: *count,
                    },
                })
            })
            .collect();
        events.sort_by_key(|e| e.at);
        events
    }

    /// How many kinds of problem of `site` are remembered.
    #[cfg(test)]
    fn kinds(&self, site: &SiteId) -> usize {
        self.0
            .lock()
            .map(|m| m.get(site).map_or(0, BTreeMap::len))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(kind: ProblemKind, detail: &str) -> Problem {
        Problem {
            kind,
            detail: detail.into(),
            count: 1,
        }
    }

    #[test]
    fn a_repeated_problem_is_stored_once_and_a_changing_one_at_most_every_half_hour() {
        let memory = ReportMemory::default();
        let site = SiteId::new("ward-1").unwrap();
        let translation = |n: u64| {
            problem(
                ProblemKind::Translation,
                &format!("packets were dropped since the agent started: not_for_site={n}"),
            )
        };
        let mut stored = 0;
        // A report every 10 s for two hours, its counts growing.
        for i in 0..720u64 {
            let now = 1_000_000 + i * 10;
            for p in memory.sort(&site, &[translation(i)], now) {
                memory.stored(&site, &p, now);
                stored += 1;
            }
        }
        assert_eq!(stored, 4, "once per half hour over two hours");
        // The newest words are kept, with the count since the last stored.
        let view = memory.unstored(&site, "b1");
        assert_eq!(view.len(), 1);
        assert_eq!(
            view[0].kind,
            EventKind::Reported {
                problem: ProblemKind::Translation,
                detail: "packets were dropped since the agent started: not_for_site=719".into(),
                count: 179,
            }
        );
        // An unchanged problem is never stored again.
        let other = SiteId::new("ward-2").unwrap();
        let mut stored = 0;
        for i in 0..720u64 {
            let now = 1_000_000 + i * 10;
            for p in memory.sort(&other, &[problem(ProblemKind::Mtu, "too small")], now) {
                memory.stored(&other, &p, now);
                stored += 1;
            }
        }
        assert_eq!(stored, 1);
        // Distinct problems of a new kind in one report are all to be
        // stored; a later report of that kind is a repeat.
        let many: Vec<Problem> = (0..3)
            .map(|i| problem(ProblemKind::Device, &format!("device {i}")))
            .collect();
        let fresh = memory.sort(&other, &many, 2_000_000);
        assert_eq!(fresh.len(), 3);
        for p in &fresh {
            memory.stored(&other, p, 2_000_000);
        }
        assert!(memory.sort(&other, &many, 2_000_010).is_empty());
        assert_eq!(memory.kinds(&other), 2);
    }
}
