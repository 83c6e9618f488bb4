//! The brokers of the site's region, learned over the tunnel connection.
//!
//! While a session is up, [`follow`] keeps one long-poll request open at the
//! broker (`POST /.well-known/tether/brokers`, see `docs/protocol.md`): the
//! broker answers when the list of live brokers changes, and the list is
//! saved in the state directory (`brokers.json`). The agent dials the
//! configured brokers first, then the learned ones ([`dial_config`]), with
//! the broker it just lost last, so after a restart or the loss of its
//! broker it reaches a broker that joined after enrollment.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tether_config::client::ClientConfig;
use tether_config::{Endpoint, Host};
use tether_proto::api::{BROKERS_HOLD_SECS, BROKERS_PATH, BrokersRequest, BrokersResponse};
use tether_proto::fleet::{MAX_BROKERS, dial_order};

use crate::link::BrokerConn;
use crate::state_dir::StateDir;

/// File of the learned brokers in the state directory.
pub const FILE: &str = "brokers.json";

/// How long a failed request waits before the next one.
const RETRY: Duration = Duration::from_secs(5);

/// What the state directory keeps.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Learned {
    version: Option<u64>,
    brokers: Vec<String>,
}

fn read(state: &StateDir) -> Learned {
    std::fs::read(state.path.join(FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The broker endpoints the site learned, as saved.
pub fn learned(state: &StateDir) -> Vec<String> {
    read(state).brokers
}

/// Saves a list (atomically: a crash leaves the old list or the new one).
fn save(state: &StateDir, answer: &BrokersResponse) -> anyhow::Result<()> {
    let learned = Learned {
        version: Some(answer.version),
        brokers: answer.brokers.iter().take(MAX_BROKERS).cloned().collect(),
    };
    let path = state.path.join(FILE);
    let tmp = state.path.join(format!("{FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&learned)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// The configuration to dial with: the configured brokers, then the learned
/// ones inside the published CIDR, `lost` last.
pub fn dial_config(
    config: &ClientConfig,
    state: &StateDir,
    lost: Option<&Endpoint>,
) -> ClientConfig {
    let configured: Vec<String> = config.brokers.iter().map(Endpoint::to_string).collect();
    let learned: Vec<String> = learned(state)
        .into_iter()
        .filter(|e| match Endpoint::parse(e, 443) {
            Some(Endpoint {
                host: Host::Ip(ip), ..
            }) => config.published_cidr.contains(&ip),
            // A name is checked against the CIDR when it is resolved.
            Some(_) => true,
            None => false,
        })
        .collect();
    let lost = lost.map(Endpoint::to_string);
    let mut out = config.clone();
    out.brokers = dial_order(&configured, &learned, lost.as_deref())
        .iter()
        .filter_map(|e| Endpoint::parse(e, 443))
        .collect();
    out
}

/// Keeps the learned list current while `conn` lives: one long-poll
/// request at a time. Runs until the session's tasks are aborted (or the
/// broker does not serve the list).
pub async fn follow(conn: Arc<BrokerConn>, authority: String, state: StateDir) {
    let mut known = read(&state).version;
    loop {
        let body = match serde_json::to_vec(&BrokersRequest { known }) {
            Ok(b) => b,
            Err(_) => return,
        };
        let asked = tokio::time::timeout(
            Duration::from_secs(BROKERS_HOLD_SECS + 30),
            conn.request("POST", &authority, BROKERS_PATH, &body),
        )
        .await;
        match asked {
            Ok(Ok((200, answer))) => match serde_json::from_slice::<BrokersResponse>(&answer) {
                Ok(answer) => {
                    if Some(answer.version) != known || learned(&state) != answer.brokers {
                        tracing::info!(brokers = %answer.brokers.join(", "), "the brokers of this region");
                        if let Err(e) = save(&state, &answer) {
                            tracing::warn!("cannot save the broker list: {e:#}");
                        }
                    }
                    known = Some(answer.version);
                    continue;
                }
                Err(e) => tracing::debug!("unexpected broker list: {e}"),
            },
            // A broker that does not serve the list (older): ask no more on
            // this connection.
            Ok(Ok((404, _))) => return,
            Ok(Ok((status, _))) => tracing::debug!(status, "broker list refused"),
            Ok(Err(e)) => tracing::debug!("cannot ask for the broker list: {e:#}"),
            Err(_) => tracing::debug!("no broker list in time"),
        }
        tokio::time::sleep(RETRY).await;
    }
}
