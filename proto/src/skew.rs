//! This host's clock against the broker's: the skew measured from the time
//! a broker answer carries, whether it is a wrong clock, and the words the
//! agent's log, its problem reports and `tether doctor` share.

use std::time::{Duration, SystemTime};

/// A skew up to this many seconds (the `Date` header's resolution and a
/// round trip) is not a wrong clock.
pub const TOLERANCE_SECS: f64 = 5.0;

/// The broker's clock against this host's, in seconds (positive: the
/// broker is ahead), from `broker_time` (its `Date`) on an answer to a
/// request sent at `sent` by this host's clock, `rtt` being the round trip.
pub fn skew_secs(broker_time: SystemTime, sent: SystemTime, rtt: Duration) -> f64 {
    // The broker's clock read about half a round trip after the request
    // left; its Date has one-second resolution.
    let local = sent + rtt / 2;
    match broker_time.duration_since(local) {
        Ok(ahead) => ahead.as_secs_f64(),
        Err(behind) => -behind.duration().as_secs_f64(),
    }
}

/// "3 days ahead of", "40 s behind": this host's clock against the
/// broker's, from the broker's skew (positive: the broker is ahead).
pub fn clock_off(skew_secs: f64) -> String {
    let off = rough_duration(Duration::from_secs_f64(skew_secs.abs()));
    if skew_secs < 0.0 {
        format!("{off} ahead of")
    } else {
        format!("{off} behind")
    }
}

/// What to report about a skew, if it is more than [`TOLERANCE_SECS`]:
/// "this host's clock is 2 h ahead of the broker's: fix the clock (NTP)".
pub fn skew_problem(skew_secs: f64) -> Option<String> {
    (skew_secs.abs() > TOLERANCE_SECS).then(|| {
        format!(
            "this host's clock is {} the broker's: fix the clock (NTP), or this site's certificate will look expired or not yet valid here",
            clock_off(skew_secs)
        )
    })
}

/// "3 days", "5 h", "12 min", "40 s": a duration in its largest unit of
/// which there are at least two, rounded down.
pub fn rough_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 2 * 86_400 {
        format!("{} days", s / 86_400)
    } else if s >= 7200 {
        format!("{} h", s / 3600)
    } else if s >= 120 {
        format!("{} min", s / 60)
    } else {
        format!("{s} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skew_within_the_tolerance_is_no_problem() {
        assert_eq!(skew_problem(4.0), None);
        assert_eq!(skew_problem(-5.0), None);
        let ahead = skew_problem(-7200.0).unwrap();
        assert!(
            ahead
                .starts_with("this host's clock is 2 h ahead of the broker's: fix the clock (NTP)"),
            "{ahead}"
        );
        let behind = skew_problem(2.0 * 86_400.0).unwrap();
        assert!(behind.contains("2 days behind the broker's"), "{behind}");
    }

    #[test]
    fn the_skew_is_taken_half_a_round_trip_after_the_request() {
        let sent = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let broker = sent + Duration::from_secs(7201);
        let skew = skew_secs(broker, sent, Duration::from_secs(2));
        assert!((skew - 7200.0).abs() < 0.01, "{skew}");
        let skew = skew_secs(sent, sent + Duration::from_secs(40), Duration::ZERO);
        assert!((skew + 40.0).abs() < 0.01, "{skew}");
        assert_eq!(clock_off(skew), "40 s ahead of");
    }

    #[test]
    fn durations_are_rounded_down_to_their_largest_unit() {
        let d = |s| rough_duration(Duration::from_secs(s));
        assert_eq!(
            [d(119), d(120), d(7199), d(7200), d(172_799), d(172_800)],
            ["119 s", "2 min", "119 min", "2 h", "47 h", "2 days"]
        );
    }
}
