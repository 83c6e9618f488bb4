//! A small client of the admin API, for the operator CLI.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tether_proto::api::ApiError;

/// Talks to a broker's admin API with its token.
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl AdminClient {
    /// A client of the API at `base` (e.g. `http://127.0.0.1:7070`).
    pub fn new(base: &str, token: &str) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(10)))
            .build()
            .into();
        Self {
            base: base.trim_end_matches('/').to_string(),
            token: token.trim().to_string(),
            agent,
        }
    }

    fn finish<T: DeserializeOwned>(
        &self,
        what: &str,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<T> {
        let mut response = result.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the broker's admin API at {}: {e} (is tether-broker running?)",
                self.base
            )
        })?;
        let status = response.status();
        if status.is_success() {
            return response
                .body_mut()
                .read_json::<T>()
                .map_err(|e| anyhow::anyhow!("{what}: unexpected answer from the broker: {e}"));
        }
        let message = response
            .body_mut()
            .read_json::<ApiError>()
            .map(|e| e.error)
            .unwrap_or_else(|_| status.to_string());
        anyhow::bail!("{what}: {message} (HTTP {})", status.as_u16())
    }

    /// GET `path`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let result = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {}", self.token))
            .call();
        self.finish(path, result)
    }

    /// POST `body` as JSON to `path`.
    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        let result = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {}", self.token))
            .send_json(body);
        self.finish(path, result)
    }
}
