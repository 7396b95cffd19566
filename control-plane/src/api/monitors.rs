//! `/knocker/monitors`: the status API and the API-made monitors.
//!
//! | call | what |
//! | --- | --- |
//! | `GET /knocker/monitors` | every monitor: health, last result, uptime 24 h / 7 d / 30 d |
//! | `GET /knocker/monitors/{name}` | one monitor, with its last results, transitions and definition |
//! | `POST /knocker/monitors` | create: `{"name": …, "url": …, …}` (the fields of `[monitors.<name>]`) |
//! | `PUT /knocker/monitors/{name}` | replace an API monitor's definition (state and history kept) |
//! | `DELETE /knocker/monitors/{name}` | stop an API monitor and remove its history |
//!
//! Monitors from `KNOCKER_CONFIG` are shown but changed only in the file (`409`).
//! Every call needs the admin token when `KNOCKER_ADMIN_TOKEN` is set.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{ApiError, ApiResult};
use crate::monitor::{MonitorConfig, MonitorError, Monitors};

#[derive(Clone)]
struct Api {
    monitors: Arc<Monitors>,
}

/// The admin token is checked by the API's router around these routes.
pub fn router<S>(monitors: Arc<Monitors>) -> Router<S> {
    Router::new()
        .route("/knocker/monitors", get(list).post(create))
        .route(
            "/knocker/monitors/{name}",
            get(one).put(update).delete(delete),
        )
        .with_state(Api { monitors })
}

impl From<MonitorError> for ApiError {
    fn from(e: MonitorError) -> Self {
        let status = match &e {
            MonitorError::NotFound(_) => StatusCode::NOT_FOUND,
            MonitorError::Exists(_) | MonitorError::FromFile(_) => StatusCode::CONFLICT,
            MonitorError::Invalid(_) => StatusCode::BAD_REQUEST,
            MonitorError::Limit(_) => StatusCode::TOO_MANY_REQUESTS,
            MonitorError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        let field = match &e {
            MonitorError::Store(_) => "store",
            MonitorError::Invalid(_) => "monitor",
            MonitorError::Limit(_) => "monitors",
            _ => "name",
        };
        ApiError::new(status, field, e.to_string())
    }
}

async fn list(State(api): State<Api>) -> ApiResult {
    let mut monitors = Vec::new();
    for name in api.monitors.names() {
        match api.monitors.status(&name, false).await {
            Ok(view) => monitors.push(view),
            Err(MonitorError::NotFound(_)) => {} // removed meanwhile
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Json(json!({ "monitors": monitors })))
}

async fn one(State(api): State<Api>, Path(name): Path<String>) -> ApiResult {
    Ok(Json(api.monitors.status(&name, true).await?))
}

/// The request body as a definition; a bad body is a 400 naming what is wrong.
fn definition(
    body: Result<Json<Value>, JsonRejection>,
) -> Result<(Option<String>, MonitorConfig), ApiError> {
    let Json(mut value) = body.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "body",
            format!("Not a JSON object: {e}"),
        )
    })?;
    let name = value
        .as_object_mut()
        .and_then(|o| o.remove("name"))
        .and_then(|n| n.as_str().map(str::to_owned));
    let config: MonitorConfig = serde_json::from_value(value)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "monitor", e.to_string()))?;
    Ok((name, config))
}

async fn create(
    State(api): State<Api>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (name, config) = definition(body)?;
    let name = name.ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "name",
            "Missing data for required field.",
        )
    })?;
    api.monitors.create(&name, config).await?;
    tracing::info!(monitor = %name, "monitor created");
    Ok((
        StatusCode::CREATED,
        Json(api.monitors.status(&name, true).await?),
    ))
}

async fn update(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: Result<Json<Value>, JsonRejection>,
) -> ApiResult {
    let (body_name, config) = definition(body)?;
    if body_name.is_some_and(|n| n != name) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "name",
            "The body's name differs from the path's; a monitor is not renamed.",
        ));
    }
    api.monitors.update(&name, config).await?;
    tracing::info!(monitor = %name, "monitor updated");
    Ok(Json(api.monitors.status(&name, true).await?))
}

async fn delete(State(api): State<Api>, Path(name): Path<String>) -> ApiResult {
    api.monitors.delete(&name).await?;
    tracing::info!(monitor = %name, "monitor deleted");
    Ok(Json(json!({ "status": true, "deleted": name })))
}
