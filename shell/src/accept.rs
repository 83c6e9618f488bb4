//! Accept loops that do not spin: a failed `accept` (out of descriptors,
//! `EMFILE`/`ENFILE`, or out of memory) leaves the connection in the
//! listener's queue, so the listener stays readable and an immediate retry
//! fails again at once. [`AcceptBackoff`] pauses instead.

use std::time::Duration;

/// Pauses after a failed accept, longer each time in a row (10 ms doubling
/// up to a second).
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    failures: u32,
}

impl AcceptBackoff {
    /// After a successful accept.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// The pause after the next failure.
    pub fn next_delay(&self) -> Duration {
        Duration::from_millis(10u64 << self.failures.min(7)).min(Duration::from_secs(1))
    }

    /// After a failed accept on `listener`: logs (the first of a run at
    /// warn, the rest at debug) and sleeps.
    pub async fn pause(&mut self, listener: &'static str, error: &std::io::Error) {
        if self.failures == 0 {
            tracing::warn!(listener, %error, "accept failed; pausing before the next (out of file descriptors?)");
        } else {
            tracing::debug!(listener, %error, "accept failed again");
        }
        let delay = self.next_delay();
        self.failures = self.failures.saturating_add(1);
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_doubles_up_to_a_second_and_resets() {
        let mut b = AcceptBackoff::default();
        let mut seen = Vec::new();
        for _ in 0..10 {
            seen.push(b.next_delay().as_millis());
            b.failures += 1;
        }
        assert_eq!(seen, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(10));
    }
}
