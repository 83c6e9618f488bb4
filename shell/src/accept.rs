//! Accept loops that do not spin: a failed `accept` (out of descriptors,
//! `EMFILE`/`ENFILE`, or out of memory) leaves the connection in the
//! listener's queue, so the listener stays readable and an immediate retry
//! fails again at once. [`AcceptBackoff`] pauses instead.
//!
//! [`ConnectionLimit`] caps the connections a listener holds open.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long an accepted connection past the cap waits for a place before
/// it is closed: connections whose peers are gone still hold their places
/// until their tasks next run, so a client arriving just after a wave of
/// closes would otherwise be refused for capacity that is already free.
pub const LIMIT_GRACE: Duration = Duration::from_millis(500);

/// At most so many connections open at once.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    places: Arc<Semaphore>,
}

impl ConnectionLimit {
    /// A limit of `max` connections.
    pub fn new(max: usize) -> Self {
        Self {
            places: Arc::new(Semaphore::new(max)),
        }
    }

    /// A place for a connection just accepted, held until the permit
    /// drops: at once when one is free, else the first to free within
    /// [`LIMIT_GRACE`]; `None` past that (close the connection). The
    /// accept loop waits here, so meanwhile new connections queue in the
    /// kernel rather than take descriptors.
    pub async fn admit(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = self.places.clone().try_acquire_owned() {
            return Some(p);
        }
        tokio::time::timeout(LIMIT_GRACE, self.places.clone().acquire_owned())
            .await
            .ok()?
            .ok()
    }
}

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

    #[tokio::test(start_paused = true)]
    async fn a_place_freed_within_the_grace_is_given_else_none() {
        let limit = ConnectionLimit::new(1);
        let held = limit.admit().await.unwrap();
        // Nobody frees the place: refused after the grace.
        let start = tokio::time::Instant::now();
        assert!(limit.admit().await.is_none());
        assert_eq!(start.elapsed(), LIMIT_GRACE);
        // The holder goes away during the wait: the place is given.
        let releaser = tokio::spawn(async move {
            tokio::time::sleep(LIMIT_GRACE / 5).await;
            drop(held);
        });
        assert!(limit.admit().await.is_some());
        releaser.await.unwrap();
    }

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
