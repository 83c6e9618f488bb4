//! Accept loops that do not spin: a failed `accept` (out of descriptors,
//! `EMFILE`/`ENFILE`, or out of memory) leaves the connection in the
//! listener's queue, so the listener stays readable and an immediate retry
//! fails again at once. [`AcceptBackoff`] pauses instead.
//!
//! [`ConnectionLimit`] caps the connections a listener holds open.
//!
//! [`serve_http1`] is both, for an HTTP/1 listener (the broker's admin
//! API, the gateway's metrics), with a deadline for each request header: a
//! client that opens a connection and sends half a header (or nothing)
//! would otherwise hold a descriptor for as long as it likes.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
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

/// Limits of an HTTP/1 listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Longest wait for a complete request header (also while a connection
    /// is idle between requests); the connection is closed past it.
    pub header_read_timeout: Duration,
    /// Most connections open at once; past it a new connection waits up to
    /// [`LIMIT_GRACE`] for a place and is then closed.
    pub max_connections: usize,
}

/// What an HTTP/1 listener reports to its binary's metrics.
pub trait ListenerEvents: Send + Sync + 'static {
    /// Held while a connection is open (e.g. a gauge's increment).
    type Open: Send + 'static;
    /// An `accept` failed (the loop pauses).
    fn accept_failed(&self);
    /// A connection was closed at once: the listener holds
    /// `max_connections` already.
    fn refused_at_limit(&self, remote: std::net::SocketAddr);
    /// A connection was accepted.
    fn opened(&self) -> Self::Open;
}

/// Serves `app` over HTTP/1 on `listener` within `limits`, until the task
/// is aborted; `name` names the listener in logs.
pub async fn serve_http1<E: ListenerEvents>(
    name: &'static str,
    listener: TcpListener,
    app: axum::Router,
    limits: HttpLimits,
    events: E,
) {
    let places = ConnectionLimit::new(limits.max_connections);
    let mut backoff = AcceptBackoff::default();
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(a) => {
                backoff.reset();
                a
            }
            Err(e) => {
                events.accept_failed();
                backoff.pause(name, &e).await;
                continue;
            }
        };
        let Some(permit) = places.admit().await else {
            events.refused_at_limit(remote);
            tracing::debug!(listener = name, %remote, "connection refused: too many open");
            drop(tcp);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let open = events.opened();
        tokio::spawn(async move {
            let _held = (permit, open);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            if let Err(e) = builder.serve_connection(TokioIo::new(tcp), service).await {
                tracing::debug!(listener = name, %remote, error = %e, "connection ended");
            }
        });
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
