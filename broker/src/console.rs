//! The fleet console on the admin listener: static pages embedded in the
//! binary (`/console/`, nothing fetched from elsewhere), and the API
//! routes it reads besides the admin API's own: the site list with state,
//! filter and paging (`GET /v1/site-states`), a site's timeline
//! (`GET /v1/sites/{site}/events`) and the caller's role (`GET
//! /v1/whoami`).
//!
//! The pages hold no data: the browser asks the API with the token the
//! operator typed in, exactly as the CLI does. Two tokens open the API:
//! the admin token (everything) and the viewer token (`viewer.token` in
//! the data directory): a viewer reads (GET) and changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use tether_proto::api::{ApiError, SiteEvents, SiteListQuery, SitePage, SiteSummary, Whoami};
use tether_proto::events::{SiteFacts, SiteQuery, SiteState};
use tether_proto::ids::SiteId;

use crate::state::Broker;
use crate::store::now_unix;

/// What a presented token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything the admin API offers.
    Admin,
    /// Reads only (GET and HEAD).
    Viewer,
}

impl Role {
    /// Label.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }
}

/// Most events one timeline request returns.
const MAX_EVENTS: usize = tether_proto::events::TIMELINE_LIMIT;

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(ApiError {
            error: message.into(),
        }),
    )
        .into_response()
}

/// The console's API routes; the caller puts them behind authentication,
/// which adds the caller's [`Role`] to the request.
pub fn api_routes() -> Router<Arc<Broker>> {
    Router::new()
        .route("/v1/site-states", get(site_states))
        .route("/v1/sites/{site}/events", get(site_events))
        .route("/v1/whoami", get(whoami))
}

/// The console's pages: open (they hold no data), with a policy that lets
/// them load nothing but themselves.
pub fn page_routes() -> Router<Arc<Broker>> {
    Router::new()
        .route(
            "/console",
            get(|| async { Redirect::permanent("/console/") }),
        )
        .route(
            "/console/",
            get(|| async { page(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/console/app.js",
            get(|| async { page(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/console/app.css",
            get(|| async { page(STYLE, "text/css; charset=utf-8") }),
        )
}

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/app.js");
const STYLE: &str = include_str!("console/app.css");

/// A page with headers that keep it to itself: no outside resource, no
/// framing, no referrer, no caching of a page that may be replaced by an
/// upgrade.
fn page(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn whoami(Extension(role): Extension<Role>) -> Json<Whoami> {
    Json(Whoami {
        role: role.as_str().into(),
    })
}

async fn site_events(
    State(broker): State<Arc<Broker>>,
    Path(site): Path<String>,
) -> Result<Json<SiteEvents>, Response> {
    let site: SiteId = site
        .parse()
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid site: {e}")))?;
    let b = broker.clone();
    let s = site.clone();
    let found = tokio::task::spawn_blocking(move || {
        let record = b.store.site(&s)?;
        let timeline = b.events().timeline(&s)?;
        Ok::<_, crate::store::StoreError>(record.map(|r| (r.region, timeline)))
    })
    .await
    .map_err(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))?
    .map_err(|e| {
        tracing::error!(error = %e, "site events not read");
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; see the broker log",
        )
    })?;
    let Some((region, timeline)) = found else {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!("no site {site} (create it with an enrollment token)"),
        ));
    };
    let events = broker.site_events_view(&site, &timeline, MAX_EVENTS);
    Ok(Json(SiteEvents {
        site,
        region,
        events,
    }))
}

/// The filter of a site list request, in the core's terms.
fn site_query(q: &SiteListQuery, now: u64) -> Result<SiteQuery, String> {
    let state = q
        .state
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(str::parse::<SiteState>)
        .transpose()?;
    let changed_since = match q.since.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(text) => {
            let d: Duration = humantime::parse_duration(text).map_err(|e| {
                format!("since {text:?} is not a duration ({e}); write e.g. 10m or 1h")
            })?;
            Some(now.saturating_sub(d.as_secs()))
        }
    };
    Ok(SiteQuery {
        text: q.q.clone(),
        state,
        region: q.region.clone().filter(|r| !r.is_empty()),
        changed_since,
    })
}

async fn site_states(
    State(broker): State<Arc<Broker>>,
    query: Result<Query<SiteListQuery>, QueryRejection>,
) -> Result<Json<SitePage>, Response> {
    let Query(query) = query.map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!(
                "invalid query: {} (filters: q, state, region, since, offset, limit)",
                e.body_text()
            ),
        )
    })?;
    let now = now_unix();
    let filter = site_query(&query, now).map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
    let page = tokio::task::spawn_blocking(move || site_page(&broker, &filter, &query, now))
        .await
        .map_err(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))?
        .map_err(|e| {
            tracing::error!(error = %e, "site list not read");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error; see the broker log",
            )
        })?;
    Ok(Json(page))
}

/// One site that passed the filter, with what the filter computed; its
/// summary is built only if it lands on the page.
struct Matched {
    record: crate::store::SiteRecord,
    state: SiteState,
    since: Option<u64>,
    session: Option<Arc<crate::sessions::Session>>,
    elsewhere: Option<String>,
}

/// One page of the site list: every site's state from its live session
/// (here or, in a fleet, at another broker), its summary of events and
/// its record; filtered, then paged. Only the sites of the page are
/// summarised (addresses, traffic, latest event), so the cost of a
/// request over many sites is one pass over their records. Blocking (the
/// store).
fn site_page(
    broker: &Broker,
    filter: &SiteQuery,
    query: &SiteListQuery,
    now: u64,
) -> Result<SitePage, crate::store::StoreError> {
    let mut records = broker.store.sites()?;
    records.sort_by(|a, b| (&a.region, &a.site).cmp(&(&b.region, &b.site)));
    let histories = broker.events().histories();
    let addresses = broker.addresses_by_site();
    let fleet = broker.fleet().and_then(|f| f.snapshot());
    let empty = tether_proto::events::History::default();
    let no_addresses = (Vec::new(), Vec::new());
    let mut counts: BTreeMap<String, usize> = SiteState::ALL
        .iter()
        .map(|s| (s.as_str().to_string(), 0))
        .collect();
    // The words of a site are needed only by a text search.
    let searching = filter.text.as_deref().is_some_and(|t| !t.trim().is_empty());
    let mut words: Vec<String> = Vec::new();
    let mut matching = Vec::new();
    for record in records {
        let history = histories.get(&record.site).unwrap_or(&empty);
        let session = broker.session(&record.site);
        let elsewhere = fleet
            .as_ref()
            .and_then(|f| f.owner(&record.site).filter(|o| &o.broker != f.me()))
            .map(|o| o.broker.clone());
        let online_since = match (&session, &elsewhere) {
            (Some(s), _) => Some(tether_pki::token::unix_secs(s.since)),
            (None, Some(_)) => Some(history.last_connected.unwrap_or(now)),
            (None, None) => None,
        };
        let (state, since) = history.state(online_since, record.revoked, now);
        *counts.entry(state.as_str().to_string()).or_default() += 1;
        words.clear();
        if searching {
            let (own, lans) = addresses.get(&record.site).unwrap_or(&no_addresses);
            words.extend(own.iter().map(|a| a.to_string()));
            for l in lans {
                words.push(l.lan.to_string());
                words.push(l.mapped.to_string());
            }
            if let Some(i) = session.as_ref().map(|s| s.info()) {
                words.push(i.remote.to_string());
                words.push(i.transport.clone());
            }
        }
        let facts = SiteFacts {
            site: record.site.as_str(),
            region: record.region.as_str(),
            state,
            last_change: history.last_change(),
            words: &words,
        };
        if !filter.matches(&facts) {
            continue;
        }
        matching.push(Matched {
            record,
            state,
            since,
            session,
            elsewhere,
        });
    }
    let offset = query.offset.unwrap_or(0);
    let (total, page) = tether_proto::events::page(matching, offset, query.limit);
    if page.is_empty() {
        return Ok(SitePage {
            total,
            offset,
            counts,
            sites: Vec::new(),
        });
    }
    let here = broker
        .enroll_endpoints()
        .into_iter()
        .next()
        .or_else(|| broker.tunnel_addr().map(|a| a.to_string()))
        .unwrap_or_else(|| "this broker".into());
    let traffic: HashMap<SiteId, (u64, u64)> = broker
        .site_totals()
        .into_iter()
        .map(|(s, _, t)| (s, (t.traffic.rx_bytes, t.traffic.tx_bytes)))
        .collect();
    let sites = page
        .into_iter()
        .map(|m| {
            let Matched {
                record,
                state,
                since,
                session,
                elsewhere,
            } = m;
            let history = histories.get(&record.site).unwrap_or(&empty);
            let (own, lans) = addresses.get(&record.site).cloned().unwrap_or_default();
            let info = session.as_ref().map(|s| s.info());
            let (rx_bytes, tx_bytes) = traffic.get(&record.site).copied().unwrap_or_default();
            SiteSummary {
                state,
                since,
                enrolled: record.enrolled.is_some(),
                broker: match (&session, elsewhere) {
                    (Some(_), _) => Some(here.clone()),
                    (None, other) => other,
                },
                transport: info.as_ref().map(|i| i.transport.clone()),
                remote: info.as_ref().map(|i| i.remote),
                rtt_ms: info.as_ref().map(|i| i.rtt_ms),
                addresses: own,
                lans,
                cert_not_after: session
                    .as_ref()
                    .map(|s| tether_pki::token::unix_secs(s.peer.not_after))
                    .max(history.cert_not_after),
                rx_bytes,
                tx_bytes,
                last_event: history.last.clone(),
                site: record.site,
                region: record.region,
            }
        })
        .collect();
    Ok(SitePage {
        total,
        offset,
        counts,
        sites,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_names_what_is_wrong() {
        let q = |state: &str, since: &str| SiteListQuery {
            state: Some(state.into()),
            since: Some(since.into()),
            ..SiteListQuery::default()
        };
        let ok = site_query(&q("flapping", "10m"), 10_000).unwrap();
        assert_eq!(ok.state, Some(SiteState::Flapping));
        assert_eq!(ok.changed_since, Some(9_400));
        let empty = site_query(&q("", ""), 10_000).unwrap();
        assert_eq!((empty.state, empty.changed_since), (None, None));
        assert!(site_query(&q("up", ""), 0).unwrap_err().contains("online"));
        assert!(
            site_query(&q("", "yesterday"), 0)
                .unwrap_err()
                .contains("write e.g. 10m")
        );
    }
}
