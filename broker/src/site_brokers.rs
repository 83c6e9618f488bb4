//! How sites learn the brokers of their region over the tunnel connection.
//!
//! `POST /.well-known/tether/brokers` with the site's certificate and
//! `{"known": <version>}`: the broker answers with the endpoints of every
//! live broker serving the site's region (its own first) and the version of
//! that list. When the site already knows the current version, the broker
//! holds the request until the list changes or
//! [`BROKERS_HOLD_SECS`](tether_proto::api::BROKERS_HOLD_SECS) pass (an
//! HTTP long poll), so a broker that joins or leaves reaches every site
//! within the store's watch delay, with one idle request stream per site
//! and nothing written anywhere.

use std::sync::Arc;
use std::time::Duration;

use tether_pki::PeerCert;
use tether_proto::api::{BROKERS_HOLD_SECS, BrokersRequest, BrokersResponse};

use crate::enroll::Reply;
use crate::state::Broker;

/// Largest brokers request body.
pub const MAX_BODY: usize = 1024;

/// Answers a site's brokers request (see the module documentation).
pub async fn brokers(broker: &Arc<Broker>, peer: Option<PeerCert>, body: &[u8]) -> Reply {
    let Some(peer) = peer else {
        return Reply::error(
            401,
            "the broker list is for enrolled sites: present the site certificate",
        );
    };
    let request: BrokersRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return Reply::error(400, format!("invalid brokers request: {e}")),
    };
    let region = &peer.identity.region;
    let mut changes = broker.fleet().map(|f| f.changes());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(BROKERS_HOLD_SECS);
    loop {
        let (version, brokers) = broker.site_brokers(region);
        if request.known != Some(version) {
            return Reply::json(200, &BrokersResponse { version, brokers });
        }
        let changed = match changes.as_mut() {
            Some(rx) => matches!(
                tokio::time::timeout_at(deadline, rx.changed()).await,
                Ok(Ok(()))
            ),
            None => {
                tokio::time::sleep_until(deadline).await;
                false
            }
        };
        if !changed {
            return Reply::json(200, &BrokersResponse { version, brokers });
        }
    }
}
