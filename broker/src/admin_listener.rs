//! The admin API's listener: a bounded number of connections, each with a
//! deadline for its request headers.
//!
//! A client that opens a connection and sends half a request header (or
//! nothing) would otherwise hold a file descriptor for as long as it likes:
//! enough of them and the broker can no longer accept tunnels, DNS or the
//! operator's own requests. Each connection must deliver a complete request
//! header within `header_read_timeout` (also while idle between requests);
//! beyond `max_connections` new connections are closed at once (counted in
//! `tether_broker_connections_refused_total{listener="admin"}`), and an
//! accept that fails (out of descriptors) pauses the loop instead of
//! spinning.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Limits of the admin listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest wait for a complete request header.
    pub header_read_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

impl From<&tether_config::broker::AdminLimits> for Limits {
    fn from(l: &tether_config::broker::AdminLimits) -> Self {
        Self {
            header_read_timeout: l.header_read_timeout,
            max_connections: l.max_connections,
        }
    }
}

/// Pauses after a failed accept, longer each time in a row (up to a
/// second): out of descriptors, retrying at once only burns the CPU.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    failures: u32,
}

impl AcceptBackoff {
    /// After a successful accept.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// After a failed accept on `listener`: logs (the first of a run at
    /// warn) and sleeps.
    pub async fn pause(&mut self, listener: &'static str, error: &std::io::Error) {
        if self.failures == 0 {
            tracing::warn!(listener, %error, "accept failed; pausing before the next (out of file descriptors?)");
        } else {
            tracing::debug!(listener, %error, "accept failed again");
        }
        let delay =
            Duration::from_millis(10u64 << self.failures.min(7)).min(Duration::from_secs(1));
        self.failures = self.failures.saturating_add(1);
        crate::metrics::accept_failed(listener);
        tokio::time::sleep(delay).await;
    }
}

/// Serves `app` on `listener` within `limits`, until the task is aborted.
pub async fn serve(listener: TcpListener, app: axum::Router, limits: Limits) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut backoff = AcceptBackoff::default();
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(a) => {
                backoff.reset();
                a
            }
            Err(e) => {
                backoff.pause("admin", &e).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            crate::metrics::connection_refused("admin", "limit");
            tracing::debug!(%remote, "admin connection refused: too many open");
            drop(tcp);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let open = crate::metrics::OpenConnection::new("admin");
        tokio::spawn(async move {
            let _held = (permit, open);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            if let Err(e) = builder.serve_connection(TokioIo::new(tcp), service).await {
                tracing::debug!(%remote, error = %e, "admin connection ended");
            }
        });
    }
}
