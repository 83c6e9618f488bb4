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
    let stored = broker.admit_reports(site, problems.len());
    for p in problems.iter().take(stored) {
        tracing::info!(%site, problem = p.kind.as_str(), count = p.count, "the site reports a problem");
        tracing::debug!(%site, detail = %p.detail, "reported problem");
        broker.record_event(
            site,
            EventKind::Reported {
                problem: p.kind,
                detail: p.detail.clone(),
                count: p.count,
            },
        );
    }
    let dropped = problems.len() - stored;
    crate::metrics::site_problems("stored", stored);
    crate::metrics::site_problems("dropped", dropped);
    if dropped > 0 {
        tracing::debug!(%site, dropped, "reported problems beyond the site's budget");
    }
    Reply::json(200, &ReportResponse { stored, dropped })
}
