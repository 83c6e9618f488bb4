//! This host's clock against the broker's, while the agent runs: a wrong
//! clock (a hospital host without NTP) is logged and reported to the
//! broker for the site's timeline ([`crate::report`]), in the words
//! `tether doctor` uses.
//!
//! A clock ahead, or behind by less than the broker certificate's
//! backdating, still lets the site connect: [`check`] measures the skew
//! from the `Date` of a broker answer on each new session. A clock further
//! behind (or far ahead) makes this host refuse the broker's certificate:
//! the dial fails with [`Failure::clock`](crate::failure::Failure::clock),
//! which the agent queues; it reaches the broker at the next session, after
//! the clock was fixed.

use std::time::{Duration, SystemTime};

use tether_pki::tls::ShiftedClock;
use tether_proto::report::ProblemKind;

use crate::link::BrokerConn;
use crate::report::Problems;

pub use tether_proto::skew::{TOLERANCE_SECS, skew_problem};

/// The path asked for the broker's `Date`: any answer carries one (the
/// broker answers `404`; `tether doctor` asks the same).
pub const DATE_PATH: &str = "/.well-known/tether/doctor";

/// The broker's clock against this host's, in seconds (positive: the
/// broker is ahead), from its `Date` header (`broker_date`) on an answer to
/// a request sent at `sent`, `rtt` being the round trip
/// ([`tether_proto::skew::skew_secs`]); `None` if it is not a date.
pub fn skew_secs(broker_date: &str, sent: SystemTime, rtt: Duration) -> Option<f64> {
    let broker_time = httpdate::parse_http_date(broker_date).ok()?;
    Some(tether_proto::skew::skew_secs(broker_time, sent, rtt))
}

/// Asks the broker on `conn` for its time and, when this host's clock
/// (`clock`) is off by more than [`TOLERANCE_SECS`], logs it and queues it
/// as a [`ProblemKind::Clock`] report. Returns the skew, if measured.
pub async fn check(
    conn: &BrokerConn,
    authority: &str,
    problems: &Problems,
    clock: &ShiftedClock,
) -> Option<f64> {
    let sent = clock.now();
    let answer = match conn.exchange("GET", authority, DATE_PATH, &[]).await {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!("cannot read the broker's time: {e:#}");
            return None;
        }
    };
    let skew = skew_secs(answer.date.as_deref()?, sent, conn.rtt())?;
    if let Some(problem) = skew_problem(skew) {
        tracing::warn!("{problem}");
        problems.push(ProblemKind::Clock, problem);
    }
    Some(skew)
}

/// Logs and queues a dial failure that this host's clock explains.
pub fn dial_failed(problems: &Problems, failure: &crate::failure::Failure) {
    if let Some(words) = &failure.clock {
        problems.push(ProblemKind::Clock, words.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_skew_is_read_from_the_date_half_a_round_trip_later() {
        let sent = httpdate::parse_http_date("Mon, 30 Nov 2026 12:00:00 GMT").unwrap();
        let skew = skew_secs(
            "Mon, 30 Nov 2026 14:00:01 GMT",
            sent,
            Duration::from_secs(2),
        )
        .unwrap();
        assert!((skew - 7200.0).abs() < 0.01, "{skew}");
        assert_eq!(skew_secs("not a date", sent, Duration::ZERO), None);
    }
}
