//! The admin API's CA and backup routes: `GET /v1/ca` (the CA state and
//! trust bundle), `POST /v1/ca/rotate` and `POST /v1/ca/rollback` (one
//! rotation step forward or back, see [`crate::authority`]), and
//! `GET /v1/backup` (a backup of the embedded store, see
//! [`crate::backup`]).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tether_proto::api::{ApiError, CaStatus};

use crate::authority::AuthorityError;
use crate::state::Broker;

fn refused(e: AuthorityError) -> Response {
    let status = match &e {
        AuthorityError::Rotation(_) => StatusCode::CONFLICT,
        AuthorityError::Contention => StatusCode::SERVICE_UNAVAILABLE,
        _ => {
            // Internal details go to the log, not to the caller.
            tracing::error!(error = %e, "CA request failed");
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(ApiError {
                    error: "internal error; see the broker log".into(),
                }),
            )
                .into_response();
        }
    };
    (
        status,
        Json(ApiError {
            error: e.to_string(),
        }),
    )
        .into_response()
}

/// `GET /v1/ca`.
pub async fn status(State(broker): State<Arc<Broker>>) -> Json<CaStatus> {
    Json(broker.ca.status())
}

async fn step(
    broker: Arc<Broker>,
    what: &'static str,
    f: fn(&Broker) -> Result<CaStatus, AuthorityError>,
) -> Response {
    match tokio::task::spawn_blocking(move || f(&broker)).await {
        Ok(Ok(status)) => {
            tracing::info!(step = what, phase = %status.phase, generation = status.generation, "CA rotation step");
            Json(status).into_response()
        }
        Ok(Err(e)) => refused(e),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(ApiError {
                error: "internal error".into(),
            }),
        )
            .into_response(),
    }
}

/// `POST /v1/ca/rotate`.
pub async fn rotate(State(broker): State<Arc<Broker>>) -> Response {
    step(broker, "rotate", |b| b.ca.rotate()).await
}

/// `POST /v1/ca/rollback`.
pub async fn rollback(State(broker): State<Arc<Broker>>) -> Response {
    step(broker, "rollback", |b| b.ca.rollback()).await
}

/// `GET /v1/backup`: a consistent snapshot of the store (the CA keys
/// included), as `tether-broker backup` writes it.
pub async fn backup(State(broker): State<Arc<Broker>>) -> Response {
    let made = tokio::task::spawn_blocking(move || {
        let dump = broker.store.snapshot()?;
        crate::backup::make(&dump, crate::store::now_unix())
    })
    .await;
    match made {
        Ok(Ok(backup)) => {
            tracing::info!(bytes = backup.content.len(), "backup taken");
            Json(backup).into_response()
        }
        Ok(Err(crate::backup::BackupError::Store(e))) => (
            StatusCode::CONFLICT,
            Json(ApiError {
                error: e.to_string(),
            }),
        )
            .into_response(),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "backup failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(ApiError {
                    error: "internal error; see the broker log".into(),
                }),
            )
                .into_response()
        }
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(ApiError {
                error: "internal error".into(),
            }),
        )
            .into_response(),
    }
}
