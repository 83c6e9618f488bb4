//! The agent's health endpoint (`tether up --health-listen ADDR`), for
//! Kubernetes probes and monitors.
//!
//! - `GET /livez`: 200 while the agent's event loop answers. The agent runs
//!   on one thread, so a loop stuck in a blocking call stops answering
//!   this too. A disconnected agent is alive: it reconnects on its own.
//! - `GET /readyz`: 200 when the tunnel is up (CONNECT-IP open and the
//!   device carrying the site's addresses), 503 otherwise; both with the
//!   [`Health`] as JSON, the reason in plain words when not ready.
//!
//! The agent publishes its state through a `watch` channel as it changes;
//! the endpoint only reads the latest value.

use std::net::SocketAddr;
use std::time::SystemTime;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Where the tunnel stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelState {
    /// The agent has not dialled yet.
    Starting,
    /// Dialling the brokers.
    Connecting,
    /// A broker answered; the tunnel is being opened.
    Connected,
    /// The broker accepted CONNECT-IP.
    Up,
    /// The connection was lost or no broker answers; reconnecting.
    Disconnected,
    /// The broker refused this site; retrying.
    Refused,
}

/// What the endpoint reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Whether the tunnel is up: the broker accepted CONNECT-IP and the
    /// device carries the site's addresses.
    pub ready: bool,
    /// Where the tunnel stands.
    pub state: TunnelState,
    /// The broker holding (or last holding) the tunnel.
    pub broker: Option<String>,
    /// Its transport, in plain words.
    pub transport: Option<String>,
    /// The site's overlay addresses while the tunnel is up.
    pub addresses: Vec<String>,
    /// Why the tunnel is not up, in plain words.
    pub reason: Option<String>,
    /// When the state last changed (Unix seconds).
    pub since: u64,
    /// The broker of the standby connection, when one is ready.
    #[serde(default)]
    pub standby: Option<String>,
    /// Tunnels moved to the standby after the broker was lost, since start.
    #[serde(default)]
    pub failovers: u64,
    /// Tunnels moved to another broker when the broker went away (GOAWAY),
    /// since start.
    #[serde(default)]
    pub handovers: u64,
}

impl Health {
    /// The state of an agent that has not dialled yet.
    pub fn starting() -> Self {
        Self {
            ready: false,
            state: TunnelState::Starting,
            broker: None,
            transport: None,
            addresses: Vec::new(),
            reason: Some("the agent is starting".into()),
            since: now(),
            standby: None,
            failovers: 0,
            handovers: 0,
        }
    }
}

fn now() -> u64 {
    tether_pki::token::unix_secs(SystemTime::now())
}

/// How the agent changes what the endpoint reports.
#[derive(Debug, Clone)]
pub struct Reporter(watch::Sender<Health>);

impl Reporter {
    /// A reporter and the receiver the endpoint reads.
    pub fn new() -> (Self, watch::Receiver<Health>) {
        let (tx, rx) = watch::channel(Health::starting());
        (Self(tx), rx)
    }

    fn set(&self, f: impl FnOnce(&mut Health)) {
        self.0.send_modify(|h| {
            let before = (h.ready, h.state);
            f(h);
            h.ready = h.state == TunnelState::Up && !h.addresses.is_empty();
            if (h.ready, h.state) != before {
                h.since = now();
            }
        });
    }

    /// Dialling the brokers.
    pub fn connecting(&self) {
        self.set(|h| {
            if h.state == TunnelState::Starting {
                h.state = TunnelState::Connecting;
                h.reason = Some("dialling the brokers".into());
            }
        });
    }

    /// A broker answered over `transport`.
    pub fn connected(&self, broker: &str, transport: &str) {
        self.set(|h| {
            h.state = TunnelState::Connected;
            h.broker = Some(broker.into());
            h.transport = Some(transport.into());
            h.reason = Some("the tunnel is being opened".into());
        });
    }

    /// The broker accepted CONNECT-IP.
    pub fn tunnel_open(&self) {
        self.set(|h| {
            h.state = TunnelState::Up;
            h.reason = None;
        });
    }

    /// The device carries `addresses`.
    pub fn addresses(&self, addresses: Vec<String>) {
        self.set(|h| h.addresses = addresses);
    }

    /// The standby connection's broker (`None`: no standby).
    pub fn standby(&self, broker: Option<String>) {
        self.set(|h| h.standby = broker);
    }

    /// The failover and handover counts.
    pub fn moves(&self, failovers: u64, handovers: u64) {
        self.set(|h| {
            h.failovers = failovers;
            h.handovers = handovers;
        });
    }

    /// The tunnel is down, for `reason`; `refused` when the broker refused
    /// this site rather than being unreachable.
    pub fn down(&self, reason: &str, refused: bool) {
        self.set(|h| {
            h.state = if refused {
                TunnelState::Refused
            } else {
                TunnelState::Disconnected
            };
            h.addresses.clear();
            h.reason = Some(reason.into());
        });
    }
}

/// The endpoint's routes.
pub fn router(health: watch::Receiver<Health>) -> axum::Router {
    axum::Router::new()
        .route("/livez", get(|| async { "alive\n" }))
        .route("/readyz", get(ready))
        .with_state(health)
}

async fn ready(State(health): State<watch::Receiver<Health>>) -> (StatusCode, Json<Health>) {
    let h = health.borrow().clone();
    let status = if h.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(h))
}

/// Binds `addr` and serves the endpoint in the background.
pub async fn serve(addr: SocketAddr, health: watch::Receiver<Health>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for health checks on {addr}: {e}"))?;
    tracing::info!(listen = %addr, "health endpoint: /livez, /readyz");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(health)).await {
            tracing::error!("the health endpoint stopped: {e}");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;

    async fn readyz(rx: &watch::Receiver<Health>) -> (StatusCode, Health) {
        let response = router(rx.clone())
            .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn ready_only_while_the_tunnel_carries_addresses() {
        let (reporter, rx) = Reporter::new();
        assert_eq!(readyz(&rx).await.0, StatusCode::SERVICE_UNAVAILABLE);
        reporter.connecting();
        reporter.connected("203.0.113.10:443", "HTTP/3 (QUIC, UDP 443)");
        let (status, h) = readyz(&rx).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(h.state, TunnelState::Connected);
        reporter.tunnel_open();
        // Open but the device has no address yet.
        assert_eq!(readyz(&rx).await.0, StatusCode::SERVICE_UNAVAILABLE);
        reporter.addresses(vec!["100.64.0.1".into()]);
        let (status, h) = readyz(&rx).await;
        assert_eq!(status, StatusCode::OK);
        assert!(h.ready && h.reason.is_none());
        assert_eq!(h.broker.as_deref(), Some("203.0.113.10:443"));

        reporter.down("lost the connection to the broker: timed out", false);
        let (status, h) = readyz(&rx).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(h.state, TunnelState::Disconnected);
        assert!(h.addresses.is_empty());
        assert_eq!(
            h.reason.as_deref(),
            Some("lost the connection to the broker: timed out")
        );
        // Reconnecting needs the addresses again.
        reporter.tunnel_open();
        assert_eq!(readyz(&rx).await.0, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn alive_whatever_the_tunnel() {
        let (_reporter, rx) = Reporter::new();
        let response = router(rx)
            .oneshot(Request::get("/livez").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
}
