//! The admin API (axum): sites, sessions, routes, enrollment tokens,
//! revocation, the CA and its rotation ([`crate::ca_admin`]), metrics and
//! health.
//!
//! Everything under `/v1` needs `Authorization: Bearer <admin token>`; the
//! token is created with the data directory (`admin.token`, mode 0600).
//! The viewer token (`viewer.token`) opens every `GET` and nothing else.
//! The fleet console's pages (`/console/`) and routes are in
//! [`crate::console`].
//! `/metrics`, `/healthz`, `/readyz` and `/openapi.json` are open, for scrapers and probes;
//! the API binds to loopback by default.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use subtle::ConstantTimeEq;

use tether_proto::api::{
    ApiError, BrokerRef, FleetSession, GatewayInfo, LanHost, PolicyInfo, ReleaseResponse,
    ResidencyCheck, RevokeResponse, RouteFilter, RouteInfo, SessionDetail, SiteInfo, TokenRequest,
    TokenResponse, Trace, TracePath, TraceQuery, TraceTarget,
};
use tether_proto::fleet::{BrokerId, Fleet};
use tether_proto::ids::{RegionId, SiteId};
use tether_proto::route::{Route, RouteKind, RouteTarget};

use crate::console::Role;
use crate::error::BrokerError;
use crate::state::Broker;

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
            BrokerError::SiteInOtherRegion { .. } | BrokerError::NotRevoked(_) => {
                StatusCode::CONFLICT
            }
            BrokerError::Revoked(_) => StatusCode::FORBIDDEN,
            BrokerError::Ipam(_) | BrokerError::Contention => StatusCode::SERVICE_UNAVAILABLE,
            BrokerError::Store(_) => {
                // The store did not answer or failed (etcd down, cut off):
                // the caller may try again, and the store's words say why.
                tracing::warn!(error = %e, "admin request failed: the store failed");
                StatusCode::SERVICE_UNAVAILABLE
            }
            BrokerError::Pki(_) => {
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
        .route("/v1/sites/{region}/{site}/release", post(release))
        .route("/v1/trace/{target}", get(trace))
        .route("/v1/policy", get(policy))
        .merge(crate::console::api_routes())
        .route("/v1/ca", get(crate::ca_admin::status))
        .route("/v1/ca/rotate", post(crate::ca_admin::rotate))
        .route("/v1/ca/rollback", post(crate::ca_admin::rollback))
        .route("/v1/backup", get(crate::ca_admin::backup))
        .layer(middleware::from_fn_with_state(broker.clone(), authenticate));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .merge(api)
        .merge(crate::console::page_routes())
        .fallback(|| async { AdminError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(broker)
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is
/// case-insensitive (RFC 9110 section 11.1).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

/// Reads the viewer token may not make: what they return is not for a
/// help desk (a backup holds the sealed CA keys, every token hash and
/// certificate record).
const ADMIN_ONLY_READS: [&str; 1] = ["/v1/backup"];

async fn authenticate(
    State(broker): State<Arc<Broker>>,
    mut request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .unwrap_or_default();
    let role = if bool::from(presented.as_bytes().ct_eq(broker.admin_token.as_bytes())) {
        Role::Admin
    } else if broker
        .viewer_token()
        .is_some_and(|v| bool::from(presented.as_bytes().ct_eq(v.as_bytes())))
    {
        Role::Viewer
    } else {
        return AdminError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token (Authorization: Bearer <token from admin.token>)",
        )
        .into_response();
    };
    if role == Role::Viewer && !request.method().is_safe() {
        return AdminError::new(
            StatusCode::FORBIDDEN,
            "the viewer token can only read; this needs the admin token (admin.token)",
        )
        .into_response();
    }
    if role == Role::Viewer && ADMIN_ONLY_READS.contains(&request.uri().path()) {
        return AdminError::new(
            StatusCode::FORBIDDEN,
            "a backup holds the sealed CA keys and every site's records; it needs the admin token (admin.token)",
        )
        .into_response();
    }
    request.extensions_mut().insert(role);
    next.run(request).await
}

async fn ready(State(broker): State<Arc<Broker>>) -> Response {
    if broker.tunnel_addr().is_some() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "tunnel listener not up\n").into_response()
    }
}

async fn metrics(State(broker): State<Arc<Broker>>, headers: axum::http::HeaderMap) -> Response {
    // The series name every site: behind the admin token when configured.
    if broker.config.admin_limits.metrics_require_token {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .unwrap_or_default();
        if !bool::from(presented.as_bytes().ct_eq(broker.admin_token.as_bytes())) {
            return AdminError::new(
                StatusCode::UNAUTHORIZED,
                "/metrics needs the admin token here (admin.metrics_require_token): \
                 Authorization: Bearer <token from admin.token>",
            )
            .into_response();
        }
    }
    let traffic = broker.traffic();
    broker.metrics().refresh(&traffic);
    let mut text = crate::metrics::recorder().render();
    let fleet = broker.fleet().and_then(|f| f.snapshot());
    text.push_str(&crate::metrics::fleet_text(
        &traffic.brokers,
        fleet.as_ref(),
    ));
    text.push_str(&crate::metrics::trust_text(
        &broker.ca.trust(),
        std::time::SystemTime::now(),
    ));
    let reads = broker.core().lease_reads();
    text.push_str(&crate::metrics::lease_reads_text(
        reads.allocation.load(std::sync::atomic::Ordering::Relaxed),
        reads.notice.load(std::sync::atomic::Ordering::Relaxed),
    ));
    let windows = crate::metrics::SITE_CERT_WINDOWS.map(|(_, secs)| secs);
    text.push_str(&crate::metrics::site_expiry_text(
        &broker
            .events()
            .certificates_expiring(crate::store::now_unix(), &windows),
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// This broker as the admin views name it: its fleet id (with a shared
/// store) and its first advertised endpoint.
fn this_broker(broker: &Broker) -> BrokerRef {
    BrokerRef {
        id: broker.fleet().and_then(|f| f.id()),
        address: broker
            .enroll_endpoints()
            .into_iter()
            .next()
            .or_else(|| broker.tunnel_addr().map(|a| a.to_string()))
            .unwrap_or_default(),
    }
}

/// The broker of the fleet called `id`, as this broker's view of the
/// fleet announces it (by id alone if it left meanwhile).
fn fleet_broker(fleet: Option<&Fleet>, id: &BrokerId) -> BrokerRef {
    match fleet.and_then(|f| f.members().get(id)) {
        Some(member) => crate::fleet::broker_ref(id, member),
        None => BrokerRef {
            id: Some(id.clone()),
            address: String::new(),
        },
    }
}

/// Every site, with the broker holding its session: this broker for a
/// session here, another live broker of the fleet as the store's owner
/// records say. A site whose broker died (its lease expired) has none.
async fn list_sites(State(broker): State<Arc<Broker>>) -> Result<Json<Vec<SiteInfo>>, AdminError> {
    let b = broker.clone();
    let mut sites = blocking(move || b.site_infos()).await?;
    let here = this_broker(&broker);
    let fleet = broker.fleet().and_then(|f| f.snapshot());
    for site in &mut sites {
        site.broker = match (&site.session, &fleet) {
            (Some(_), _) => Some(here.clone()),
            (None, Some(f)) => f
                .live_holder_elsewhere(&site.site)
                .map(|(id, member)| crate::fleet::broker_ref(id, member)),
            (None, None) => None,
        };
    }
    Ok(Json(sites))
}

/// The sessions of the whole fleet: this broker's with their detail, and
/// those other live brokers hold (the store's owner records), by site
/// and region. A site with a session here is listed once, as here: the
/// session here is the one packets take.
async fn list_sessions(State(broker): State<Arc<Broker>>) -> Json<Vec<FleetSession>> {
    let here = this_broker(&broker);
    let mut sessions: Vec<FleetSession> = broker
        .sessions()
        .all()
        .iter()
        .map(|s| FleetSession {
            session: SessionDetail::Here(Box::new(s.info())),
            broker: here.clone(),
            local: true,
        })
        .collect();
    let fleet = broker.fleet().and_then(|f| f.snapshot());
    let elsewhere: Vec<(SiteId, BrokerRef)> = match &fleet {
        Some(f) => f
            .held_elsewhere()
            .filter(|(site, _, _)| broker.session(site).is_none())
            .map(|(site, id, member)| (site.clone(), crate::fleet::broker_ref(id, member)))
            .collect(),
        None => Vec::new(),
    };
    if !elsewhere.is_empty() {
        let regions =
            site_regions(&broker, elsewhere.iter().map(|(s, _)| s.clone()).collect()).await;
        for (site, holder) in elsewhere {
            let Some(region) = regions.get(&site) else {
                continue;
            };
            sessions.push(FleetSession {
                session: SessionDetail::Elsewhere {
                    site,
                    region: region.clone(),
                },
                broker: holder,
                local: false,
            });
        }
    }
    sessions.sort_by(|a, b| (a.region(), a.site()).cmp(&(b.region(), b.site())));
    Json(sessions)
}

/// The regions of `sites`: from the address leases this broker caches
/// (every connected site holds one), else from the store's site records
/// (a region this broker does not serve). A site found in neither (the
/// store unreachable) is left out, and logged.
async fn site_regions(
    broker: &Arc<Broker>,
    wanted: BTreeSet<SiteId>,
) -> BTreeMap<SiteId, RegionId> {
    let mut out = BTreeMap::new();
    if let Ok(core) = broker.core().core() {
        for region in broker.config.regions.keys() {
            for lease in core.leases(region).into_iter().flat_map(|l| l.leases()) {
                if wanted.contains(&lease.site) {
                    out.insert(lease.site.clone(), lease.region.clone());
                }
            }
        }
    }
    if out.len() < wanted.len() {
        let b = broker.clone();
        match blocking(move || Ok(b.store.sites()?)).await {
            Ok(records) => {
                for r in records {
                    if wanted.contains(&r.site) {
                        out.entry(r.site).or_insert(r.region);
                    }
                }
            }
            Err(e) => tracing::debug!(
                error = %e.message,
                "sessions of other brokers without a cached lease left out"
            ),
        }
    }
    out
}

async fn list_routes(
    State(broker): State<Arc<Broker>>,
    filter: Result<Query<RouteFilter>, QueryRejection>,
) -> Result<Json<Vec<RouteInfo>>, AdminError> {
    let Query(filter) = filter.map_err(|e| {
        AdminError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "invalid query: {} (filters: site, region, kind, prefix)",
                e.body_text()
            ),
        )
    })?;
    let site: Option<SiteId> = filter
        .site
        .as_deref()
        .map(|t| parse_id("site", t))
        .transpose()?;
    let region: Option<RegionId> = filter
        .region
        .as_deref()
        .map(|t| parse_id("region", t))
        .transpose()?;
    let kind = match filter.kind.as_deref() {
        None => None,
        Some(k) => Some(
            [
                RouteKind::SiteAddress,
                RouteKind::SiteLan,
                RouteKind::Gateway,
            ]
            .into_iter()
            .find(|x| x.as_str() == k)
            .ok_or_else(|| {
                AdminError::new(
                    StatusCode::BAD_REQUEST,
                    format!("invalid kind {k:?}: use site-address, site-lan or gateway"),
                )
            })?,
        ),
    };
    let prefix = match filter.prefix.as_deref() {
        None => None,
        Some(t) => Some(
            t.parse::<IpNet>()
                .or_else(|_| t.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    AdminError::new(
                        StatusCode::BAD_REQUEST,
                        format!("invalid prefix {t:?}: write e.g. 100.64.0.0/16 or 100.64.0.7"),
                    )
                })?
                .trunc(),
        ),
    };
    let router = broker
        .core()
        .read()
        .map_err(|_| AdminError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))?;
    let fleet = broker.fleet().and_then(|f| f.snapshot());
    let routes = router
        .routes()
        .into_iter()
        .filter(|(r, _)| {
            site.as_ref()
                .is_none_or(|s| r.target == RouteTarget::Site(s.clone()))
        })
        .filter(|(r, _)| region.as_ref().is_none_or(|g| &r.region == g))
        .filter(|(r, _)| kind.is_none_or(|k| r.kind == k))
        .filter(|(r, _)| prefix.is_none_or(|p| p.contains(&r.prefix) || r.prefix.contains(&p)))
        .map(|(r, via)| RouteInfo {
            route: r.clone(),
            broker: via.map(|id| fleet_broker(fleet.as_ref(), id)),
        })
        .collect();
    Ok(Json(routes))
}

async fn list_gateways(State(broker): State<Arc<Broker>>) -> Json<Vec<GatewayInfo>> {
    Json(gateway_infos(&broker))
}

/// Every gateway, local and over WireGuard, with its counters.
fn gateway_infos(broker: &Broker) -> Vec<GatewayInfo> {
    let mut out = Vec::new();
    if let Some(gw) = broker.plane().local_gateway() {
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
            wire_rx_bytes: None,
            wire_tx_bytes: None,
        });
    }
    if let Some(wg) = broker.plane().wireguard() {
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
                wire_rx_bytes: Some(peer.wire.rx.get().1),
                wire_tx_bytes: Some(peer.wire.tx.get().1),
            });
        }
    }
    out
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

async fn release(
    State(broker): State<Arc<Broker>>,
    Path((region, site)): Path<(String, String)>,
) -> Result<Json<ReleaseResponse>, AdminError> {
    let region: RegionId = parse_id("region", &region)?;
    let site: SiteId = parse_id("site", &site)?;
    let (r, s) = (region.clone(), site.clone());
    let released = blocking(move || broker.release_revoked(&s, &r)).await?;
    tracing::info!(site = %site, region = %region, count = released.len(), "revoked site's addresses released");
    Ok(Json(ReleaseResponse {
        site,
        region,
        released,
    }))
}

async fn policy(State(broker): State<Arc<Broker>>) -> Result<Json<PolicyInfo>, AdminError> {
    let router = broker
        .core()
        .read()
        .map_err(|_| AdminError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))?;
    Ok(Json(crate::access::info(&router)))
}

/// An address, or a site's name in the mesh zone: the name (if one) and the
/// addresses it stands for.
fn resolve(broker: &Broker, target: &str) -> Result<(Option<String>, Vec<IpAddr>), AdminError> {
    Ok(match target.parse::<IpAddr>() {
        Ok(ip) => (None, vec![ip]),
        Err(_) => {
            // Looked up in the sorted site list: no index of the whole zone
            // for one name.
            let Some(zone) = broker.zone() else {
                return Err(AdminError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the mesh zone is not built yet; retry in a moment",
                ));
            };
            let Some(site) = zone.site(target) else {
                return Err(AdminError::new(
                    StatusCode::NOT_FOUND,
                    format!(
                        "{target:?} is neither an IP address nor a site name in {} (write <site>.<region>.{} or an address)",
                        zone.zone, zone.zone
                    ),
                ));
            };
            let name = tether_proto::dns::site_name(&site.site, &site.region, &zone.zone);
            (Some(name), site.addresses.clone())
        }
    })
}

async fn trace(
    State(broker): State<Arc<Broker>>,
    Path(target): Path<String>,
    query: Result<Query<TraceQuery>, QueryRejection>,
) -> Result<Json<Trace>, AdminError> {
    let Query(query) =
        query.map_err(|e| AdminError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let (name, destinations) = resolve(&broker, &target)?;
    let senders = match &query.from {
        Some(from) => resolve(&broker, from)?.1,
        None => Vec::new(),
    };
    let traffic = crate::access::traffic(query.traffic.as_deref().unwrap_or("icmp"))
        .map_err(|e| AdminError::new(StatusCode::BAD_REQUEST, e))?;
    let gateways = gateway_infos(&broker);
    let fleet = broker.fleet().and_then(|f| f.snapshot());
    let router = broker
        .core()
        .read()
        .map_err(|_| AdminError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))?;
    let mut paths = Vec::new();
    for destination in destinations {
        // The same choice the forwarding makes, routes through other
        // brokers included.
        let (explanation, via) = router.explain(destination);
        let peer = via.map(|id| fleet_broker(fleet.as_ref(), &id));
        let target = explanation.winner.as_ref().map(|route| {
            let residency_for = |site_region: &RegionId| -> Vec<ResidencyCheck> {
                gateways
                    .iter()
                    .map(|g| ResidencyCheck {
                        gateway: g.id.clone(),
                        gateway_region: g.region.clone(),
                        site_region: site_region.clone(),
                        permitted: router.residency.permits(site_region, &g.region),
                    })
                    .collect()
            };
            match &route.target {
                RouteTarget::Site(site) => TraceTarget {
                    kind: "site".into(),
                    id: site.to_string(),
                    region: route.region.clone(),
                    session: broker.session(site).map(|s| s.info()),
                    gateway: None,
                    residency: residency_for(&route.region),
                },
                RouteTarget::Gateway(id) => {
                    let gateway = gateways.iter().find(|g| &g.id == id).cloned();
                    // Which site regions may reach this gateway.
                    let residency = broker
                        .config
                        .regions
                        .keys()
                        .map(|site_region| ResidencyCheck {
                            gateway: id.clone(),
                            gateway_region: route.region.clone(),
                            site_region: site_region.clone(),
                            permitted: router.residency.permits(site_region, &route.region),
                        })
                        .collect();
                    TraceTarget {
                        kind: "gateway".into(),
                        id: id.to_string(),
                        region: route.region.clone(),
                        session: None,
                        gateway,
                        residency,
                    }
                }
            }
        });
        let policy = explanation.winner.as_ref().and_then(|route| {
            let from = senders
                .iter()
                .find(|a| a.is_ipv4() == destination.is_ipv4())?;
            crate::access::check(&router, *from, destination, route, traffic.clone())
        });
        paths.push(TracePath {
            explanation,
            target,
            policy,
            lan: None,
            peer,
        });
    }
    // The leases live behind the same lock: read them once it is released.
    drop(router);
    for path in &mut paths {
        let e = &path.explanation;
        if let Some(Route {
            kind: RouteKind::SiteLan,
            target: RouteTarget::Site(site),
            region,
            ..
        }) = &e.winner
        {
            path.lan = LanHost::find(e.destination, site, &broker.lan_mappings(site, region));
        }
    }
    Ok(Json(Trace {
        query: target,
        name,
        broker: broker
            .tunnel_addr()
            .map(|a| a.to_string())
            .unwrap_or_default(),
        paths,
    }))
}

/// The OpenAPI document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}
