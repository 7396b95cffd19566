//! The admin API under `/knocker/`, on the HTTP door: its router is composed here, from
//! one file per resource. Every call, reads included, needs
//! `Authorization: Bearer <KNOCKER_ADMIN_TOKEN>` when that is set (the status URL is not
//! part of the API). Secrets are redacted in what it shows ([`crate::redact`]). Errors
//! have the Knocker shape and name the field ([`ApiError`]).
//!
//! | call | what |
//! | --- | --- |
//! | `GET /knocker/jobs/{id}` | a job: state, attempts, next attempt |
//! | `GET /knocker/jobs?state=failed&limit=100&after=<id>` | jobs in a state, oldest first; `next` is the cursor |
//! | `POST /knocker/jobs/{id}/replay` | a delivered or failed job, attempted again now |
//! | `POST /knocker/jobs/replay?state=failed&limit=1000` | bulk replay |
//! | `DELETE /knocker/jobs/{id}` | remove a job |
//! | `GET /knocker/broadcasts/{id}` | a broadcast: each member's job and its state |
//! | `GET /knocker/groups` | the broadcast groups and their members now |
//! | `POST /knocker/jobs/replay?target=host:port&since=…&until=…` | failed jobs of one target, finished in a window, again |
//! | `/knocker/monitors…` | monitors: see [`monitors`] |
//! | `/knocker/targets…` | target health, pause and resume: see [`targets`] |
//! | `GET /metrics` (or `/knocker/metrics`) | Prometheus metrics, OpenMetrics text ([`crate::metrics`]) |
//! | `GET /knocker/ui` | the dashboard ([`ui`]; its files need no token, its calls do) |

pub mod broadcasts;
pub mod jobs;
pub mod monitors;
pub mod targets;
pub mod ui;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::Value;

use crate::delivery::Delivery;
use crate::monitor::Monitors;
use crate::store::StoreError;
use crate::submit::{Reply, Submitter};
use crate::telemetry::metrics::Sources;
use crate::token::{bearer, same_secret};

/// The whole API: every resource's routes, the admin token around all of them.
pub fn router(
    submit: Arc<Submitter>,
    monitors: Arc<Monitors>,
    delivery: Arc<Delivery>,
    admin_token: &str,
) -> Router {
    let scrape = Arc::new(Sources {
        store: Arc::clone(&submit.store),
        targets: Arc::clone(&delivery.targets),
        groups: Arc::clone(&submit.groups),
        monitors: Arc::clone(&monitors),
        time: submit.time.clone(),
    });
    Router::new()
        .route("/metrics", get(metrics).with_state(Arc::clone(&scrape)))
        .route("/knocker/metrics", get(metrics).with_state(scrape))
        .merge(jobs::router(Arc::clone(&submit)))
        .merge(broadcasts::router(submit))
        .merge(monitors::router(monitors))
        .merge(targets::router(delivery))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "path", "No such API endpoint.")
        })
        // Every call, reads included: job lists hold other clients' requests.
        .layer(axum::middleware::from_fn_with_state(
            Arc::<str>::from(admin_token),
            require_token,
        ))
        // The dashboard's files hold no data; its calls are API calls, with the token.
        .merge(ui::router())
}

/// Prometheus' scrape: OpenMetrics text.
async fn metrics(State(sources): State<Arc<Sources>>) -> Response {
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        sources.render().await,
    )
        .into_response()
}

/// Most jobs one list or bulk replay call handles.
pub const MAX_PAGE: usize = 1000;

/// An API error: the status and the field it names, in the Knocker error shape
/// ([`Reply::error`]; a store error as every door answers it, [`Reply::store_unavailable`]).
#[derive(Debug)]
pub struct ApiError(Reply);

impl ApiError {
    pub fn new(status: StatusCode, field: &'static str, message: impl Into<String>) -> Self {
        Self(Reply::error(status.as_u16(), field, &message.into()))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self(Reply::store_unavailable(&e, None))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.0.into_response()
    }
}

pub type ApiResult = Result<Json<Value>, ApiError>;

/// The admin token on every API call (the status URL is not routed here).
async fn require_token(
    State(token): State<Arc<str>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match check_token(&token, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// `Authorization: Bearer <token>` when `token` (KNOCKER_ADMIN_TOKEN) is set.
fn check_token(token: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    if token.is_empty() {
        return Ok(());
    }
    let given = bearer(headers.get("authorization").and_then(|v| v.to_str().ok()));
    if given.is_some_and(|g| same_secret(g, token)) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authorization",
            "A valid bearer token is required (KNOCKER_ADMIN_TOKEN).",
        ))
    }
}
