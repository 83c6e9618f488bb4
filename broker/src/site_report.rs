//! Problems a site reports for its event timeline.
//!
//! `POST /.well-known/tether/report` with the site's certificate and a
//! [`ReportRequest`]: the problems its agent met since its last report (a
//! LAN prefix refused, packets it could not translate, a device or clock
//! problem). The site is not trusted: the body is read up to
//! [`MAX_REPORT_BODY`] bytes, a report of more than
//! [`MAX_PROBLEMS`](tether_proto::report::MAX_PROBLEMS) problems is
//! refused, details are cut to printable text, and each site has a budget
//! ([`ReportBudget`](tether_proto::report::ReportBudget)): what is beyond
//! it is counted, not stored. Stored problems go to the timeline like any
//! other event, within its retention limit.
//!
//! An agent repeats a problem that goes on (e.g. packets it cannot
//! translate, with its running counts, every 10 s). Writing each repeat
//! would rewrite the site's timeline in the store about once a minute, so
//! a problem of a kind the site reported before ([`ReportMemory`](crate::report_memory::ReportMemory)) is
//! stored again only when its words changed and the last one of its kind
//! was stored at least [`STORE_CHANGED_EVERY_SECS`](crate::report_memory::STORE_CHANGED_EVERY_SECS) ago: an unchanged
//! problem writes nothing, a changing one at most one event per kind per
//! half hour. What was not stored is kept in memory: the newest words and
//! the count since the stored event, shown after the stored events in the
//! site's event view at this broker (until the site reports that kind on
//! another broker, or this broker restarts).

use std::sync::Arc;

use tether_pki::PeerCert;
use tether_proto::events::EventKind;
use tether_proto::report::{ReportRequest, ReportResponse, accept};

use crate::enroll::Reply;
use crate::state::Broker;

pub use tether_proto::report::MAX_REPORT_BODY as MAX_BODY;

/// Stores what a site reports (see the module documentation).
pub fn report(broker: &Arc<Broker>, peer: Option<PeerCert>, body: &[u8]) -> Reply {
    let Some(peer) = peer else {
        return Reply::error(
            401,
            "problem reports are for enrolled sites: present the site certificate",
        );
    };
    let request: ReportRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            crate::metrics::site_problems("refused", 1);
            return Reply::error(400, format!("invalid problem report: {e}"));
        }
    };
    let problems = match accept(&request) {
        Ok(p) => p,
        Err(e) => {
            crate::metrics::site_problems("refused", 1);
            return Reply::error(400, e.to_string());
        }
    };
    let site = &peer.identity.site;
    let now = crate::store::now_unix();
    let fresh = broker.site_reports().sort(site, &problems, now);
    let repeated = problems.len() - fresh.len();
    if repeated > 0 {
        tracing::debug!(%site, repeated, "reported problems repeat stored ones: kept in memory, not stored");
    }
    let stored = broker.admit_reports(site, fresh.len());
    for p in fresh.iter().take(stored) {
        tracing::info!(%site, problem = p.kind.as_str(), count = p.count, "the site reports a problem");
        tracing::debug!(%site, detail = %p.detail, "reported problem");
        broker.site_reports().stored(site, p, now);
        broker.record_event(
            site,
            EventKind::Reported {
                problem: p.kind,
                detail: p.detail.clone(),
                count: p.count,
            },
        );
    }
    let dropped = fresh.len() - stored;
    crate::metrics::site_problems("stored", stored);
    crate::metrics::site_problems("dropped", dropped);
    crate::metrics::site_problems("repeated", repeated);
    if dropped > 0 {
        tracing::debug!(%site, dropped, "reported problems beyond the site's budget");
    }
    Reply::json(
        200,
        &ReportResponse {
            stored,
            // Repeats are not stored either.
            dropped: dropped + repeated,
        },
    )
}
