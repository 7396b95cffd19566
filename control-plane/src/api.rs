//! The admin API under `/knocker/`, on the HTTP ingress: jobs (lookup, list by state,
//! replay, delete), broadcasts and groups. Every call, reads included, needs
//! `Authorization: Bearer <KNOCKER_ADMIN_TOKEN>` when that is set (the status URL is not
//! part of the API). Secrets are redacted in what it shows ([`crate::redact`]). Errors
//! have the Knocker shape and name the field.
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
//! | `/knocker/monitors…` | monitors: see [`crate::monitor::api`] |

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::clock::Millis;
use crate::ingress::Ingress;
use crate::job::{Job, State as JobState};
use crate::monitor::Monitors;
use crate::store::StoreError;

pub fn router(ingress: Arc<Ingress>, monitors: Arc<Monitors>) -> Router {
    let token = ingress.settings.admin_token.clone();
    Router::new()
        .route("/knocker/jobs", get(list))
        .route("/knocker/jobs/replay", post(replay_many))
        .route("/knocker/jobs/{id}", get(lookup).delete(delete))
        .route("/knocker/jobs/{id}/replay", post(replay_one))
        .route("/knocker/broadcasts/{id}", get(broadcast))
        .route("/knocker/groups", get(groups))
        .merge(crate::monitor::api::router(monitors))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "path", "No such API endpoint.")
        })
        // Every call, reads included: job lists hold other clients' requests.
        .layer(axum::middleware::from_fn_with_state(
            Arc::<str>::from(token),
            require_token,
        ))
        .with_state(ingress)
}

/// Most jobs one list or bulk replay call handles.
pub const MAX_PAGE: usize = 1000;

/// An API error: the status and the field it names, turned into the Knocker error
/// shape in one place.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    field: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, field: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            field,
            message: message.into(),
        }
    }

    fn no_job() -> Self {
        Self::new(StatusCode::NOT_FOUND, "id", "No job with this id.")
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "store", e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"errors": {self.field: [self.message]}, "status": false}));
        let mut response = (self.status, body).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert("retry-after", http::HeaderValue::from_static("1"));
        }
        response
    }
}

pub(crate) type ApiResult = Result<Json<Value>, ApiError>;

/// A time as RFC 3339 with milliseconds.
/// Times past the year 9999 (RFC 3339's last) are shown as its last millisecond.
pub fn time(ms: Millis) -> String {
    const LAST: Millis = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms.min(LAST))).to_string()
}

/// A job as the API shows it (the body is summarised by its length).
pub fn view(job: &Job) -> Value {
    json!({
        "id": job.id,
        "kind": job.kind,
        "state": job.state,
        "method": job.request.method,
        "url": crate::redact::url(&job.request.url),
        "body-length": job.request.body.len(),
        "config": crate::redact::object(&job.config),
        "attempts": job.attempts.iter().map(|a| json!({
            "at": time(a.at), "status": a.status, "error": a.error, "latency_ms": a.latency_ms,
        })).collect::<Vec<_>>(),
        // Unbounded (a rule with only a maximum age): null.
        "attempts_left": (job.policy.retries != u32::MAX)
            .then(|| (job.policy.retries as usize + 1).saturating_sub(job.attempts.len())),
        "next_attempt_at": (job.state == JobState::Pending && !job.is_parked())
            .then(|| time(job.next_attempt_at)),
        "expires_at": job.policy.deadline.map(time),
        "lane": job.lane,
        "waiting_in_lane": job.is_parked(),
        "created_at": time(job.created_at),
        "finished_at": job.finished_at.map(time),
    })
}

/// Compares secrets without an early exit, so the time taken does not reveal how much
/// of a guess was right (only whether its length was).
pub(crate) fn same_secret(given: &str, secret: &str) -> bool {
    given.len() == secret.len()
        && given
            .bytes()
            .zip(secret.bytes())
            .fold(0, |acc, (a, b)| acc | (a ^ b))
            == 0
}

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
pub(crate) fn check_token(token: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    if token.is_empty() {
        return Ok(());
    }
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let matches = given.is_some_and(|g| same_secret(g, token));
    if matches {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authorization",
            "A valid bearer token is required (KNOCKER_ADMIN_TOKEN).",
        ))
    }
}

async fn lookup(State(ingress): State<Arc<Ingress>>, Path(id): Path<String>) -> ApiResult {
    let job = ingress.store.get(&id).await?.ok_or_else(ApiError::no_job)?;
    Ok(Json(view(&job)))
}

async fn broadcast(State(ingress): State<Arc<Ingress>>, Path(id): Path<String>) -> ApiResult {
    let jobs = ingress.stored_broadcast(&id).await?;
    if let (true, Some(bus)) = (jobs.is_empty(), &ingress.agents) {
        if let Some(sent) = bus.sent(&id).await? {
            let agents = bus.status(&sent).await?;
            return Ok(Json(json!({
                "id": id,
                "group": sent.group,
                "agents": true,
                "members": agents.iter().map(|(agent, delivered)| json!({
                    "member": format!("agent:{agent}"),
                    "state": if *delivered { "delivered" } else { "pending" },
                })).collect::<Vec<_>>(),
            })));
        }
    }
    if jobs.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "id",
            "No broadcast with this id.",
        ));
    }
    Ok(Json(crate::broadcast::status(&id, &jobs)))
}

/// Each group's configuration and its members as resolved now (or why there are none).
async fn groups(State(ingress): State<Arc<Ingress>>) -> ApiResult {
    let mut out = serde_json::Map::new();
    for name in ingress.groups.names() {
        let Some(config) = ingress.groups.get(name) else {
            continue;
        };
        let found = match (&ingress.agents, config.agents) {
            (Some(bus), true) => bus
                .agents(name)
                .await
                .map(|agents| agents.into_iter().map(|a| format!("agent:{a}")).collect())
                .map_err(|e| e.to_string()),
            _ => ingress
                .groups
                .members(name)
                .await
                .map_err(|e| e.to_string()),
        };
        let (members, error) = match found {
            Ok(members) => (members, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        let members: Vec<String> = members.iter().map(|m| crate::redact::url(m)).collect();
        out.insert(
            name.clone(),
            json!({
                "dns": config.dns,
                "agents": config.agents,
                "port": config.port,
                "members": members,
                "error": error,
                "preserve_host": config.preserve_host,
                "max_age_s": config.max_age_s,
                "retries": config.retries,
            }),
        );
    }
    Ok(Json(json!({ "groups": out })))
}

#[derive(Deserialize)]
struct ListQuery {
    state: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

fn parse_state(state: Option<&str>) -> Result<JobState, ApiError> {
    match state.unwrap_or("failed") {
        "pending" => Ok(JobState::Pending),
        "in_flight" => Ok(JobState::InFlight),
        "delivered" => Ok(JobState::Delivered),
        "failed" => Ok(JobState::Failed),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "state",
            "Must be one of: pending, in_flight, delivered, failed.",
        )),
    }
}

fn parse_limit(limit: Option<&str>, default: usize) -> Result<usize, ApiError> {
    match limit {
        None => Ok(default),
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
            _ => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "limit",
                format!("Must be a whole number from 1 to {MAX_PAGE}."),
            )),
        },
    }
}

async fn list(State(ingress): State<Arc<Ingress>>, Query(q): Query<ListQuery>) -> ApiResult {
    let state = parse_state(q.state.as_deref())?;
    let limit = parse_limit(q.limit.as_deref(), 100)?;
    let jobs = ingress.store.list(state, q.after.as_deref(), limit).await?;
    let next = if jobs.len() == limit {
        jobs.last().map(|j| j.id.clone())
    } else {
        None
    };
    Ok(Json(
        json!({"jobs": jobs.iter().map(view).collect::<Vec<_>>(), "next": next}),
    ))
}

async fn replay_one(State(ingress): State<Arc<Ingress>>, Path(id): Path<String>) -> ApiResult {
    let job = ingress
        .store
        .replay(&id, ingress.time.now_ms())
        .await?
        .ok_or_else(ApiError::no_job)?;
    if job.state != JobState::Pending {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "id",
            "The job is not finished; only delivered or failed jobs are replayed.",
        ));
    }
    ingress.wake.notify_one();
    tracing::info!(job_id = %id, "job replayed");
    Ok(Json(view(&job)))
}

async fn replay_many(State(ingress): State<Arc<Ingress>>, Query(q): Query<ListQuery>) -> ApiResult {
    let state = match parse_state(q.state.as_deref())? {
        s @ (JobState::Failed | JobState::Delivered) => s,
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "state",
                "Must be one of: failed, delivered.",
            ))
        }
    };
    let limit = parse_limit(q.limit.as_deref(), MAX_PAGE)?;
    let now = ingress.time.now_ms();
    let mut replayed = Vec::new();
    for job in ingress.store.list(state, None, limit).await? {
        if let Some(j) = ingress.store.replay(&job.id, now).await? {
            if j.state == JobState::Pending {
                replayed.push(j.id);
            }
        }
    }
    ingress.wake.notify_one();
    tracing::info!(jobs = replayed.len(), "jobs replayed");
    Ok(Json(json!({"replayed": replayed.len(), "ids": replayed})))
}

async fn delete(State(ingress): State<Arc<Ingress>>, Path(id): Path<String>) -> ApiResult {
    if !ingress.store.delete(&id, ingress.time.now_ms()).await? {
        return Err(ApiError::no_job());
    }
    Ok(Json(json!({"status": true, "deleted": id})))
}
