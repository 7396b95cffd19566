//! `/knocker/jobs`: look a job up, list jobs by state, replay, delete.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, ApiResult, MAX_PAGE};
use crate::clock::rfc3339;
use crate::job::{Job, State as JobState};
use crate::submit::Submitter;

pub fn router<S>(submit: Arc<Submitter>) -> Router<S> {
    Router::new()
        .route("/knocker/jobs", get(list))
        .route("/knocker/jobs/replay", post(replay_many))
        .route("/knocker/jobs/{id}", get(lookup).delete(delete))
        .route("/knocker/jobs/{id}/replay", post(replay_one))
        .with_state(submit)
}

fn no_job() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "id", "No job with this id.")
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
            "at": rfc3339(a.at), "status": a.status, "error": a.error, "latency_ms": a.latency_ms,
        })).collect::<Vec<_>>(),
        // Unbounded (a rule with only a maximum age): null.
        "attempts_left": (job.policy.retries != u32::MAX)
            .then(|| (job.policy.retries as usize + 1).saturating_sub(job.attempts.len())),
        "next_attempt_at": (job.state == JobState::Pending && !job.is_parked())
            .then(|| rfc3339(job.next_attempt_at)),
        "expires_at": job.policy.deadline.map(rfc3339),
        "lane": job.lane,
        "waiting_in_lane": job.is_parked(),
        "created_at": rfc3339(job.created_at),
        "finished_at": job.finished_at.map(rfc3339),
    })
}

async fn lookup(State(ingress): State<Arc<Submitter>>, Path(id): Path<String>) -> ApiResult {
    let job = ingress.store.get(&id).await?.ok_or_else(no_job)?;
    Ok(Json(view(&job)))
}

#[derive(Deserialize)]
struct ListQuery {
    state: Option<String>,
    limit: Option<String>,
    after: Option<String>,
    /// Bulk replay: only jobs to this target (`host:port`) …
    target: Option<String>,
    /// … that finished in this window (RFC 3339).
    since: Option<String>,
    until: Option<String>,
}

/// An RFC 3339 time of a query, in ms; `field` names it.
fn parse_time(value: Option<&str>, field: &'static str) -> Result<Option<u64>, ApiError> {
    let Some(v) = value else {
        return Ok(None);
    };
    humantime::parse_rfc3339_weak(v)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| Some(d.as_millis() as u64))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                field,
                "Must be a time as RFC 3339 (2026-12-03T10:00:00Z).",
            )
        })
}

/// Most failed jobs one replay by target looks through.
const MAX_SCAN: usize = 1_000_000;

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

async fn list(State(ingress): State<Arc<Submitter>>, Query(q): Query<ListQuery>) -> ApiResult {
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

async fn replay_one(State(ingress): State<Arc<Submitter>>, Path(id): Path<String>) -> ApiResult {
    let job = ingress
        .store
        .replay(&id, ingress.time.now_ms())
        .await?
        .ok_or_else(no_job)?;
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

async fn replay_many(
    State(ingress): State<Arc<Submitter>>,
    Query(q): Query<ListQuery>,
) -> ApiResult {
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
    let since = parse_time(q.since.as_deref(), "since")?;
    let until = parse_time(q.until.as_deref(), "until")?;
    if let Some(target) = q.target.as_deref() {
        // One target's failures in a window, oldest first; its rate limit paces them.
        let wanted = crate::delivery::signing::target_key(&format!("http://{target}/"));
        let in_window = |j: &Job| {
            let at = j.finished_at.unwrap_or(j.created_at);
            since.is_none_or(|s| at >= s) && until.is_none_or(|u| at <= u)
        };
        let mut after: Option<String> = None;
        let mut scanned = 0;
        'pages: while replayed.len() < limit && scanned < MAX_SCAN {
            let page = ingress
                .store
                .list(state, after.as_deref(), MAX_PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            scanned += page.len();
            for job in &page {
                let same = job.host() == target
                    || crate::delivery::signing::target_key(&job.request.url) == wanted;
                if same && in_window(job) {
                    if let Some(j) = ingress.store.replay(&job.id, now).await? {
                        if j.state == JobState::Pending {
                            replayed.push(j.id);
                            if replayed.len() == limit {
                                break 'pages;
                            }
                        }
                    }
                }
            }
            if page.len() < MAX_PAGE {
                break;
            }
        }
    } else {
        if since.is_some() || until.is_some() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "target",
                "A window (since, until) is given with a target.",
            ));
        }
        for job in ingress.store.list(state, None, limit).await? {
            if let Some(j) = ingress.store.replay(&job.id, now).await? {
                if j.state == JobState::Pending {
                    replayed.push(j.id);
                }
            }
        }
    }
    ingress.wake.notify_one();
    tracing::info!(jobs = replayed.len(), "jobs replayed");
    Ok(Json(json!({"replayed": replayed.len(), "ids": replayed})))
}

async fn delete(State(ingress): State<Arc<Submitter>>, Path(id): Path<String>) -> ApiResult {
    if !ingress.store.delete(&id, ingress.time.now_ms()).await? {
        return Err(no_job());
    }
    Ok(Json(json!({"status": true, "deleted": id})))
}
