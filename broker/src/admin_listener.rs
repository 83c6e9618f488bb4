//! The admin API's listener: a bounded number of connections, each with a
//! deadline for its request headers ([`tether_shell::accept::serve_http1`]),
//! answering only to the hosts it serves.
//!
//! A client that opens a connection and sends half a request header (or
//! nothing) would otherwise hold a file descriptor for as long as it likes:
//! enough of them and the broker can no longer accept tunnels, DNS or the
//! operator's own requests. Each connection must deliver a complete request
//! header within `header_read_timeout` (also while idle between requests);
//! beyond `max_connections` a new connection waits briefly for a place
//! ([`LIMIT_GRACE`](tether_shell::accept::LIMIT_GRACE)) and is then closed (counted in
//! `tether_broker_connections_refused_total{listener="admin"}`), and an
//! accept that fails (out of descriptors) pauses the loop instead of
//! spinning.

use std::sync::Arc;
use std::time::Duration;

use tether_shell::accept::{HttpLimits, ListenerEvents, serve_http1};
use tokio::net::TcpListener;

/// Limits of the admin listener.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest wait for a complete request header.
    pub header_read_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
    /// DNS names accepted in `Host` (lower case, no port) besides
    /// `localhost`; IP addresses are always accepted.
    pub allowed_hosts: Arc<Vec<String>>,
}

impl Limits {
    /// The limits of `config`.
    pub fn new(config: &tether_config::broker::BrokerConfig) -> Self {
        let l = &config.admin_limits;
        Self {
            header_read_timeout: l.header_read_timeout,
            max_connections: l.max_connections,
            allowed_hosts: Arc::new(l.allowed_hosts.clone()),
        }
    }
}

/// The host part of a `Host` header value: without port, brackets or a
/// trailing dot, lower case.
fn host_of(value: &str) -> String {
    let host = if let Some(rest) = value.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else if value.matches(':').count() == 1 {
        value.split(':').next().unwrap_or_default()
    } else {
        value
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether a request naming `host` may be answered: an IP address (probes
/// and scrapers name the address they connect to) or `localhost`, and DNS
/// names only when configured. DNS rebinding needs a name of the
/// attacker's, which a web page the operator opens puts in `Host`: such a
/// page cannot then read the API by pointing its name at the broker.
pub fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let host = host_of(host);
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok() || allowed.contains(&host)
}

/// Refuses requests whose `Host` header names a DNS name neither
/// `localhost` nor configured (421); requests without one (HTTP/1.0 tools)
/// pass.
async fn check_host(
    axum::extract::State(allowed): axum::extract::State<Arc<Vec<String>>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let host = request
        .headers()
        .get(http::header::HOST)
        .map(|h| h.to_str().unwrap_or("(not text)").to_string());
    match host {
        Some(h) if !host_allowed(&h, &allowed) => {
            crate::metrics::connection_refused("admin", "host");
            (
                http::StatusCode::MISDIRECTED_REQUEST,
                axum::Json(tether_proto::api::ApiError {
                    error: format!(
                        "this admin API does not answer to the host {h:?}; add it to [admin] allowed_hosts"
                    ),
                }),
            )
                .into_response()
        }
        _ => next.run(request).await,
    }
}

/// The admin listener's counts: accept failures, refusals at the cap, and
/// open connections.
struct AdminEvents;

impl ListenerEvents for AdminEvents {
    type Open = crate::metrics::OpenConnection;

    fn accept_failed(&self) {
        crate::metrics::accept_failed("admin");
    }

    fn refused_at_limit(&self, _remote: std::net::SocketAddr) {
        crate::metrics::connection_refused("admin", "limit");
    }

    fn opened(&self) -> Self::Open {
        crate::metrics::OpenConnection::new("admin")
    }
}

/// Serves `app` on `listener` within `limits`, until the task is aborted.
pub async fn serve(listener: TcpListener, app: axum::Router, limits: Limits) {
    let app = app.layer(axum::middleware::from_fn_with_state(
        limits.allowed_hosts.clone(),
        check_host,
    ));
    let http = HttpLimits {
        header_read_timeout: limits.header_read_timeout,
        max_connections: limits.max_connections,
    };
    serve_http1("admin", listener, app, http, AdminEvents).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_and_configured_hosts_are_answered() {
        let allowed = vec!["broker.example.org".to_string(), "10.0.0.5".to_string()];
        for ok in [
            "localhost",
            "localhost:7070",
            "127.0.0.1:7070",
            "[::1]:7070",
            "Broker.Example.org.",
            "10.0.0.5:7070",
        ] {
            assert!(host_allowed(ok, &allowed), "{ok}");
        }
        for refused in [
            "evil.example.com",
            "broker.example.org.evil.com",
            "10.0.0.6.nip.io",
            "",
        ] {
            assert!(!host_allowed(refused, &allowed), "{refused}");
        }
    }
}
