//! The admin API (axum): sites, sessions, routes, enrollment tokens,
//! revocation, metrics and health.
//!
//! Everything under `/v1` needs `Authorization: Bearer <admin token>`; the
//! token is created with the data directory (`admin.token`, mode 0600).
//! `/metrics`, `/healthz` and `/readyz` are open, for scrapers and probes;
//! the API binds to loopback by default.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use subtle::ConstantTimeEq;
use tether_proto::api::{
    ApiError, GatewayInfo, RevokeResponse, SessionInfo, SiteInfo, TokenRequest, TokenResponse,
};
use tether_proto::ids::{RegionId, SiteId};
use tether_proto::route::{Explanation, Route};

use crate::state::{Broker, BrokerError};

/// An error of the admin API: a status and a message for the caller.
#[derive(Debug)]
pub struct AdminError {
    status: StatusCode,
    message: String,
}

impl AdminError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ApiError {
                error: self.message,
            }),
        )
            .into_response()
    }
}

impl From<BrokerError> for AdminError {
    fn from(e: BrokerError) -> Self {
        let status = match &e {
            BrokerError::UnknownRegion(_) | BrokerError::BadInput(_) => StatusCode::BAD_REQUEST,
            BrokerError::UnknownSite { .. } => StatusCode::NOT_FOUND,
            BrokerError::SiteInOtherRegion { .. } => StatusCode::CONFLICT,
            BrokerError::Ipam(_) | BrokerError::Contention => StatusCode::SERVICE_UNAVAILABLE,
            BrokerError::Store(_) | BrokerError::Pki(_) => {
                // Internal details go to the log, not to the caller.
                tracing::error!(error = %e, "admin request failed");
                return AdminError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error; see the broker log",
                );
            }
        };
        AdminError::new(status, e.to_string())
    }
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, AdminError> {
    body.map(|Json(v)| v).map_err(|e| {
        AdminError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {}", e.body_text()),
        )
    })
}

fn parse_id<T: std::str::FromStr>(what: &str, text: &str) -> Result<T, AdminError>
where
    T::Err: std::fmt::Display,
{
    text.parse()
        .map_err(|e| AdminError::new(StatusCode::BAD_REQUEST, format!("invalid {what}: {e}")))
}

/// Runs blocking work (the store) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BrokerError> + Send + 'static,
) -> Result<T, AdminError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| AdminError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))?
        .map_err(AdminError::from)
}

/// The admin API router.
pub fn router(broker: Arc<Broker>) -> Router {
    let api = Router::new()
        .route("/v1/sites", get(list_sites))
        .route("/v1/sessions", get(list_sessions))
        .route("/v1/routes", get(list_routes))
        .route("/v1/gateways", get(list_gateways))
        .route("/v1/tokens", post(create_token))
        .route("/v1/sites/{region}/{site}/revoke", post(revoke))
        .route("/v1/trace/{address}", get(trace))
        .layer(middleware::from_fn_with_state(broker.clone(), authenticate));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .merge(api)
        .fallback(|| async { AdminError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(broker)
}

async fn authenticate(State(broker): State<Arc<Broker>>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if bool::from(presented.as_bytes().ct_eq(broker.admin_token.as_bytes())) {
        next.run(request).await
    } else {
        AdminError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token (Authorization: Bearer <token from admin.token>)",
        )
        .into_response()
    }
}

async fn ready(State(broker): State<Arc<Broker>>) -> Response {
    if broker.tunnel_addr.get().is_some() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "tunnel listener not up\n").into_response()
    }
}

async fn metrics(State(broker): State<Arc<Broker>>) -> Response {
    broker.metrics.refresh(&broker);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::recorder().render(),
    )
        .into_response()
}

async fn list_sites(State(broker): State<Arc<Broker>>) -> Result<Json<Vec<SiteInfo>>, AdminError> {
    Ok(Json(blocking(move || broker.site_infos()).await?))
}

async fn list_sessions(State(broker): State<Arc<Broker>>) -> Json<Vec<SessionInfo>> {
    let mut sessions: Vec<SessionInfo> = broker
        .sessions
        .read()
        .map(|s| s.values().map(|s| s.info()).collect())
        .unwrap_or_default();
    sessions.sort_by(|a, b| (&a.region, &a.site).cmp(&(&b.region, &b.site)));
    Json(sessions)
}

async fn list_routes(State(broker): State<Arc<Broker>>) -> Json<Vec<Route>> {
    Json(
        broker
            .router
            .read()
            .map(|r| r.table.routes().into_iter().cloned().collect())
            .unwrap_or_default(),
    )
}

async fn list_gateways(State(broker): State<Arc<Broker>>) -> Json<Vec<GatewayInfo>> {
    let mut out = Vec::new();
    if let Some(gw) = broker.local_gateway.get() {
        out.push(GatewayInfo {
            id: gw.id.clone(),
            region: gw.region.clone(),
            kind: "local".into(),
            public_key: None,
            prefixes: gw.prefixes.clone(),
            endpoint: None,
            last_handshake_secs: None,
            rx_packets: gw.counters.rx.get().0,
            rx_bytes: gw.counters.rx.get().1,
            tx_packets: gw.counters.tx.get().0,
            tx_bytes: gw.counters.tx.get().1,
        });
    }
    if let Some(wg) = broker.wireguard.get() {
        for peer in wg.peers() {
            let status = peer.status();
            out.push(GatewayInfo {
                id: peer.id.clone(),
                region: peer.region.clone(),
                kind: "wireguard".into(),
                public_key: Some(tether_pki::wg::encode(&peer.public_key)),
                prefixes: peer.prefixes.clone(),
                endpoint: status.endpoint,
                last_handshake_secs: status.since_handshake.map(|d| d.as_secs()),
                rx_packets: peer.counters.rx.get().0,
                rx_bytes: peer.counters.rx.get().1,
                tx_packets: peer.counters.tx.get().0,
                tx_bytes: peer.counters.tx.get().1,
            });
        }
    }
    Json(out)
}

async fn create_token(
    State(broker): State<Arc<Broker>>,
    body: Result<Json<TokenRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<TokenResponse>), AdminError> {
    let req = json_body(body)?;
    let response =
        blocking(move || broker.create_token(&req.site, &req.region, req.ttl.as_deref())).await?;
    tracing::info!(site = %response.site, region = %response.region, "enrollment token created");
    Ok((StatusCode::CREATED, Json(response)))
}

async fn revoke(
    State(broker): State<Arc<Broker>>,
    Path((region, site)): Path<(String, String)>,
) -> Result<Json<RevokeResponse>, AdminError> {
    let region: RegionId = parse_id("region", &region)?;
    let site: SiteId = parse_id("site", &site)?;
    let (r, s) = (region.clone(), site.clone());
    let closed_session = blocking(move || broker.revoke_site(&s, &r)).await?;
    tracing::info!(site = %site, region = %region, closed_session, "site revoked");
    Ok(Json(RevokeResponse {
        site,
        region,
        closed_session,
    }))
}

async fn trace(
    State(broker): State<Arc<Broker>>,
    Path(address): Path<String>,
) -> Result<Json<Explanation>, AdminError> {
    let address: IpAddr = parse_id("address", &address)?;
    let router = broker
        .router
        .read()
        .map_err(|_| AdminError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))?;
    Ok(Json(router.table.lookup(address).explain()))
}
