//! Problems an operator must see, sent to the broker for the site's event
//! timeline (`POST /.well-known/tether/report`, see `docs/protocol.md`).
//!
//! Anything in the agent [`Problems::push`]es a problem as it logs it; the
//! queue folds repeats and is bounded
//! ([`ProblemQueue`](tether_proto::report::ProblemQueue)). While a session
//! is up, [`send`] posts what is queued over its connection, at most every
//! [`AGENT_REPORT_EVERY_SECS`]; what could not be sent waits for the next
//! session.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether_proto::report::{
    AGENT_REPORT_EVERY_SECS, ProblemKind, ProblemQueue, REPORT_PATH, ReportResponse,
};
use tokio::sync::Notify;

use crate::link::BrokerConn;

/// The agent's problems not yet reported; cheap to clone, shared.
#[derive(Debug, Clone, Default)]
pub struct Problems {
    queue: Arc<Mutex<ProblemQueue>>,
    queued: Arc<Notify>,
}

impl Problems {
    /// Queues a problem for the broker.
    pub fn push(&self, kind: ProblemKind, detail: impl Into<String>) {
        if let Ok(mut q) = self.queue.lock() {
            q.push(kind, detail);
        }
        self.queued.notify_one();
    }

    fn take(&self) -> Option<tether_proto::report::ReportRequest> {
        let mut q = self.queue.lock().ok()?;
        (!q.is_empty()).then(|| q.take())
    }

    fn put_back(&self, report: tether_proto::report::ReportRequest) {
        if let Ok(mut q) = self.queue.lock() {
            q.put_back(report);
        }
    }
}

/// Sends the queued problems over `conn` while it lives (the session's
/// tasks are aborted when it ends). A broker without the report path
/// (`404`, older) gets none on this connection.
pub async fn send(conn: Arc<BrokerConn>, authority: String, problems: Problems) {
    let every = Duration::from_secs(AGENT_REPORT_EVERY_SECS);
    loop {
        let Some(report) = problems.take() else {
            problems.queued.notified().await;
            continue;
        };
        let body = match serde_json::to_vec(&report) {
            Ok(b) => b,
            Err(_) => return,
        };
        let asked =
            tokio::time::timeout(every, conn.request("POST", &authority, REPORT_PATH, &body)).await;
        match asked {
            Ok(Ok((200, answer))) => {
                if let Ok(r) = serde_json::from_slice::<ReportResponse>(&answer)
                    && r.dropped > 0
                {
                    tracing::debug!(
                        dropped = r.dropped,
                        "the broker did not keep every reported problem (too many)"
                    );
                }
            }
            Ok(Ok((404, _))) => {
                problems.put_back(report);
                return;
            }
            Ok(Ok((status, answer))) => {
                // Refused as a whole (malformed): sending it again would not
                // help.
                tracing::debug!(
                    status,
                    answer = %String::from_utf8_lossy(&answer),
                    "problem report refused"
                );
            }
            Ok(Err(e)) => {
                tracing::debug!("cannot report problems: {e:#}");
                problems.put_back(report);
            }
            Err(_) => {
                tracing::debug!("no answer to the problem report in time");
                problems.put_back(report);
            }
        }
        tokio::time::sleep(every).await;
    }
}
