//! Problems an agent reports to its broker, so that the people who run the
//! fleet see them in the site's event timeline (see `docs/protocol.md`,
//! "Problems reported by the site").
//!
//! The agent queues what an operator must see ([`ProblemQueue`]: a LAN
//! prefix the broker refused, packets it could not translate, a device or
//! MTU problem, a wrong clock), folding repeats of the same problem into one
//! entry with a count, and sends the queue at most every
//! [`AGENT_REPORT_EVERY_SECS`] over its tunnel connection
//! (`POST` [`REPORT_PATH`], a [`ReportRequest`]).
//!
//! A site is not trusted: the broker reads at most [`MAX_REPORT_BODY`]
//! bytes and [`MAX_PROBLEMS`] problems a request, cuts each detail to
//! [`MAX_DETAIL`] bytes of printable text ([`Problem::sanitized`]), and
//! stores no more than a [`ReportBudget`] allows per site: a burst of
//! [`REPORT_BURST`], then one per [`REPORT_REFILL_SECS`]. What it does not
//! store it counts. Time is an input.

use std::time::{Duration, Instant};

/// Where a site sends its problems (with its site certificate).
pub const REPORT_PATH: &str = "/.well-known/tether/report";

/// Largest report request body the broker reads, bytes.
pub const MAX_REPORT_BODY: usize = 4096;

/// Most problems in one report; the broker refuses a report with more.
pub const MAX_PROBLEMS: usize = 8;

/// Longest detail the broker keeps, bytes (cut at a character boundary).
pub const MAX_DETAIL: usize = 240;

/// Problems the broker stores for one site at once, after a quiet time.
pub const REPORT_BURST: u32 = 10;

/// Seconds for one more problem to be stored, once the burst is spent.
pub const REPORT_REFILL_SECS: u64 = 60;

/// Distinct problems the agent holds before it only counts the others.
pub const AGENT_QUEUE: usize = 16;

/// The least time between two reports from the agent, seconds.
pub const AGENT_REPORT_EVERY_SECS: u64 = 10;

/// What went wrong at the site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum ProblemKind {
    /// The broker refused a LAN prefix of the site's configuration.
    LanRefused,
    /// The LAN mappings the broker gave cannot be used.
    LanMapping,
    /// Packets from the tunnel not for the site, or packets to or from a
    /// LAN that could not be translated, were dropped (counted by reason
    /// in the detail).
    Translation,
    /// The tunnel device or the host's routing could not be set up.
    Device,
    /// The path's MTU is too small for the tunnel.
    Mtu,
    /// A configuration change could not be applied.
    Reload,
    /// The site's clock is wrong.
    Clock,
    /// Anything else (also: a kind this broker does not know yet).
    #[cfg_attr(feature = "serde", serde(other))]
    Other,
}

impl ProblemKind {
    /// Stable label (the JSON value).
    pub fn as_str(self) -> &'static str {
        match self {
            ProblemKind::LanRefused => "lan_refused",
            ProblemKind::LanMapping => "lan_mapping",
            ProblemKind::Translation => "translation",
            ProblemKind::Device => "device",
            ProblemKind::Mtu => "mtu",
            ProblemKind::Reload => "reload",
            ProblemKind::Clock => "clock",
            ProblemKind::Other => "other",
        }
    }

    /// Plain words for an operator.
    pub fn describe(self) -> &'static str {
        match self {
            ProblemKind::LanRefused => "a LAN prefix was refused",
            ProblemKind::LanMapping => "the LAN mappings cannot be used",
            ProblemKind::Translation => {
                "packets from the tunnel or a LAN were dropped (not for the site, or not translatable)"
            }
            ProblemKind::Device => "the tunnel device failed",
            ProblemKind::Mtu => "the path's MTU is too small",
            ProblemKind::Reload => "a configuration change was not applied",
            ProblemKind::Clock => "the site's clock is wrong",
            ProblemKind::Other => "a problem at the site",
        }
    }
}

/// One problem, as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Problem {
    /// What kind of problem.
    pub kind: ProblemKind,
    /// The agent's own words (its log message).
    pub detail: String,
    /// How often it happened since the last report (at least 1).
    #[cfg_attr(feature = "serde", serde(default = "one"))]
    pub count: u64,
}

#[cfg(feature = "serde")]
fn one() -> u64 {
    1
}

impl Problem {
    /// The problem as the broker keeps it: the detail reduced to printable
    /// characters (controls become spaces) and cut to [`MAX_DETAIL`] bytes,
    /// the count at least 1.
    pub fn sanitized(&self) -> Problem {
        let mut detail = String::with_capacity(self.detail.len().min(MAX_DETAIL));
        for c in self.detail.chars() {
            let c = if c.is_control() { ' ' } else { c };
            if detail.len() + c.len_utf8() > MAX_DETAIL {
                break;
            }
            detail.push(c);
        }
        Problem {
            kind: self.kind,
            detail,
            count: self.count.max(1),
        }
    }
}

/// `POST` [`REPORT_PATH`]: the problems since the last report.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ReportRequest {
    /// At most [`MAX_PROBLEMS`].
    pub problems: Vec<Problem>,
}

/// The broker's answer to a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ReportResponse {
    /// Problems stored in the site's timeline.
    pub stored: usize,
    /// Problems not stored: the site reported more than its budget allows.
    pub dropped: usize,
}

/// Why the broker refused a whole report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReportRefused {
    /// More than [`MAX_PROBLEMS`] problems.
    #[error("a report holds at most {MAX_PROBLEMS} problems, this one {0}")]
    TooMany(usize),
}

/// Checks a report's size and returns its problems sanitized.
pub fn accept(request: &ReportRequest) -> Result<Vec<Problem>, ReportRefused> {
    if request.problems.len() > MAX_PROBLEMS {
        return Err(ReportRefused::TooMany(request.problems.len()));
    }
    Ok(request.problems.iter().map(Problem::sanitized).collect())
}

/// How many problems the broker still stores for one site: a token bucket
/// of [`REPORT_BURST`] refilled one per [`REPORT_REFILL_SECS`].
#[derive(Debug, Clone)]
pub struct ReportBudget {
    tokens: u32,
    refilled: Instant,
}

impl ReportBudget {
    /// A full budget at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            tokens: REPORT_BURST,
            refilled: now,
        }
    }

    /// Takes up to `wanted` problems at `now`; returns how many may be
    /// stored (the rest are dropped).
    pub fn admit(&mut self, wanted: usize, now: Instant) -> usize {
        self.refill(now);
        let granted = self.tokens.min(u32::try_from(wanted).unwrap_or(u32::MAX));
        self.tokens -= granted;
        granted as usize
    }

    /// Whether the budget is full at `now` (a full budget need not be
    /// kept: a new one is the same).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens == REPORT_BURST
    }

    fn refill(&mut self, now: Instant) {
        let every = Duration::from_secs(REPORT_REFILL_SECS);
        let elapsed = now.saturating_duration_since(self.refilled);
        let earned = elapsed.as_secs() / REPORT_REFILL_SECS;
        if earned == 0 {
            return;
        }
        let room = u64::from(REPORT_BURST - self.tokens);
        if earned >= room {
            self.tokens = REPORT_BURST;
            self.refilled = now;
        } else {
            // `earned` < REPORT_BURST here, so it fits.
            self.tokens += earned as u32;
            self.refilled += every * earned as u32;
        }
    }
}

/// The agent's problems not yet reported: repeats of one problem (same
/// kind and detail) fold into one entry with a count; beyond
/// [`AGENT_QUEUE`] entries new problems are only counted.
#[derive(Debug, Clone, Default)]
pub struct ProblemQueue {
    entries: Vec<Problem>,
    overflow: u64,
}

impl ProblemQueue {
    /// Queues one occurrence of a problem.
    pub fn push(&mut self, kind: ProblemKind, detail: impl Into<String>) {
        self.add(
            Problem {
                kind,
                detail: detail.into(),
                count: 1,
            }
            .sanitized(),
        );
    }

    fn add(&mut self, problem: Problem) {
        if let Some(e) = self
            .entries
            .iter_mut()
            .find(|e| e.kind == problem.kind && e.detail == problem.detail)
        {
            e.count = e.count.saturating_add(problem.count);
        } else if self.entries.len() < AGENT_QUEUE {
            self.entries.push(problem);
        } else {
            self.overflow = self.overflow.saturating_add(problem.count);
        }
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.overflow == 0
    }

    /// The next report: the oldest problems, at most [`MAX_PROBLEMS`], with
    /// one more saying how many were only counted when the queue was full.
    pub fn take(&mut self) -> ReportRequest {
        let mut problems: Vec<Problem> = self
            .entries
            .drain(..self.entries.len().min(MAX_PROBLEMS))
            .collect();
        if self.overflow > 0 && problems.len() < MAX_PROBLEMS {
            problems.push(Problem {
                kind: ProblemKind::Other,
                detail: "more problems than the agent keeps between reports; see its log".into(),
                count: self.overflow,
            });
            self.overflow = 0;
        }
        ReportRequest { problems }
    }

    /// Puts back a report that could not be sent (kept in front, within
    /// the queue's bound).
    pub fn put_back(&mut self, report: ReportRequest) {
        let later = std::mem::take(&mut self.entries);
        for p in report.problems.into_iter().chain(later) {
            self.add(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_allows_a_burst_then_one_per_refill_period() {
        let t0 = Instant::now();
        let mut b = ReportBudget::new(t0);
        assert!(b.is_full(t0));
        assert_eq!(b.admit(4, t0), 4);
        assert_eq!(b.admit(100, t0), (REPORT_BURST - 4) as usize);
        assert_eq!(b.admit(1, t0), 0);
        let period = Duration::from_secs(REPORT_REFILL_SECS);
        assert_eq!(b.admit(5, t0 + period - Duration::from_secs(1)), 0);
        assert_eq!(b.admit(5, t0 + period), 1);
        assert_eq!(b.admit(5, t0 + period * 3 + period / 2), 2);
        // The half period already waited counts towards the next one.
        assert_eq!(b.admit(5, t0 + period * 4), 1);
        // After a long quiet time: a full burst, no more.
        assert_eq!(b.admit(100, t0 + period * 1000), REPORT_BURST as usize);
        assert!(!b.is_full(t0 + period * 1000));
        assert!(b.is_full(t0 + period * 1000 + period * REPORT_BURST));
    }

    #[test]
    fn a_clock_going_backwards_earns_nothing() {
        let t0 = Instant::now() + Duration::from_secs(3600);
        let mut b = ReportBudget::new(t0);
        assert_eq!(b.admit(REPORT_BURST as usize, t0), REPORT_BURST as usize);
        assert_eq!(b.admit(1, t0 - Duration::from_secs(600)), 0);
    }

    #[test]
    fn details_are_cut_to_printable_text() {
        let long = Problem {
            kind: ProblemKind::Device,
            detail: format!("a\nb\u{1b}[31m{}", "é".repeat(400)),
            count: 0,
        }
        .sanitized();
        assert!(long.detail.len() <= MAX_DETAIL, "{}", long.detail.len());
        assert!(long.detail.starts_with("a b [31m"), "{}", long.detail);
        assert!(!long.detail.chars().any(char::is_control));
        assert_eq!(long.count, 1);
        let many = ReportRequest {
            problems: vec![long.clone(); MAX_PROBLEMS + 1],
        };
        assert_eq!(accept(&many), Err(ReportRefused::TooMany(MAX_PROBLEMS + 1)));
        let fine = ReportRequest {
            problems: vec![long; MAX_PROBLEMS],
        };
        assert_eq!(accept(&fine).unwrap().len(), MAX_PROBLEMS);
    }

    #[test]
    fn the_queue_folds_repeats_and_counts_what_it_cannot_hold() {
        let mut q = ProblemQueue::default();
        assert!(q.is_empty());
        for _ in 0..3 {
            q.push(ProblemKind::LanRefused, "10.0.0.0/8 overlaps the pool");
        }
        for i in 0..(AGENT_QUEUE + 5) {
            q.push(ProblemKind::Device, format!("error {i}"));
        }
        let first = q.take();
        assert_eq!(first.problems.len(), MAX_PROBLEMS);
        assert_eq!(first.problems[0].count, 3);
        assert_eq!(first.problems[0].kind, ProblemKind::LanRefused);
        // The rest: the other queued entries, then the count of the ones
        // that did not fit.
        let second = q.take();
        assert_eq!(second.problems.len(), AGENT_QUEUE - MAX_PROBLEMS);
        assert!(
            second
                .problems
                .iter()
                .all(|p| p.kind == ProblemKind::Device)
        );
        assert!(!q.is_empty());
        let third = q.take();
        assert_eq!(third.problems.len(), 1);
        assert_eq!(
            (third.problems[0].kind, third.problems[0].count),
            (ProblemKind::Other, 6)
        );
        assert!(q.is_empty());
        // A report that could not be sent comes back first, folded with
        // what was queued meanwhile.
        q.push(ProblemKind::Clock, "the clock is 2 hours behind");
        q.put_back(first);
        q.push(ProblemKind::LanRefused, "10.0.0.0/8 overlaps the pool");
        let again = q.take();
        assert_eq!(again.problems[0].kind, ProblemKind::LanRefused);
        assert_eq!(again.problems[0].count, 4);
        assert_eq!(again.problems.len(), MAX_PROBLEMS);
        assert!(
            q.take()
                .problems
                .iter()
                .any(|p| p.kind == ProblemKind::Clock)
        );
    }

    #[cfg(feature = "serde")]
    #[test]
    fn an_unknown_kind_is_read_as_other() {
        let p: Problem =
            serde_json::from_str(r#"{"kind":"cosmic_ray","detail":"bit flipped"}"#).unwrap();
        assert_eq!((p.kind, p.count), (ProblemKind::Other, 1));
    }
}
