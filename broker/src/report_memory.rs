//! The problems each site reported lately, by kind, so that a problem an
//! agent repeats is not written to the store again and again (see
//! [`crate::site_report`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use tether_proto::events::{EventKind, SiteEvent};
use tether_proto::ids::SiteId;
use tether_proto::report::{Problem, ProblemKind};

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
