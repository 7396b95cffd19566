//! `/knocker/targets`: each target's health — its circuit, attempts in flight, backlog,
//! rate limit, last error — and pausing or resuming one by hand.
//!
//! | call | what |
//! | --- | --- |
//! | `GET /knocker/targets` | every target attempted since start, and every one configured |
//! | `GET /knocker/targets/{target}` | one target (`host:port` as its jobs' URLs write it) |
//! | `POST /knocker/targets/{target}/pause` | nothing is sent to it until it is resumed |
//! | `POST /knocker/targets/{target}/resume` | its jobs go out again (a paused or open circuit closes) |

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{ApiError, ApiResult};
use crate::clock::rfc3339;
use crate::delivery::targets::TargetView;
use crate::delivery::Delivery;

pub fn router<S>(delivery: Arc<Delivery>) -> Router<S> {
    Router::new()
        .route("/knocker/targets", get(list))
        .route("/knocker/targets/{target}", get(one))
        .route("/knocker/targets/{target}/pause", post(pause))
        .route("/knocker/targets/{target}/resume", post(resume))
        .with_state(delivery)
}

/// A target names a host and, optionally, a port; nothing else.
fn check(target: &str) -> Result<(), ApiError> {
    let ok = !target.is_empty()
        && target.len() <= 300
        && target
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-_:[]".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "target",
            "Name a target as host or host:port, as its jobs' URLs write it.",
        ))
    }
}

async fn view(delivery: &Delivery, t: &TargetView) -> Result<Value, ApiError> {
    let backlog = delivery.store.backlog(&t.target).await?;
    let mut v = json!({
        "target": t.target,
        "circuit": t.circuit.name(),
        "in_flight": t.in_flight,
        "backlog": backlog,
        "consecutive_failures": t.consecutive_failures,
        "rate_per_s": t.rate_per_s,
        "burst": t.burst,
        "slowed_until": t.slow_until.map(rfc3339),
        "attempts": t.attempts,
        "last_error": t.last_error.as_ref().map(|e| json!({
            "at": rfc3339(e.at), "status": e.status, "error": e.error,
        })),
    });
    use crate::delivery::targets::Circuit;
    match &t.circuit {
        Circuit::Open {
            since,
            retry_at,
            reason,
        } => {
            v["since"] = json!(rfc3339(*since));
            v["probe_at"] = json!(rfc3339(*retry_at));
            v["reason"] = json!(reason);
        }
        Circuit::Probing { since, reason } => {
            v["since"] = json!(rfc3339(*since));
            v["reason"] = json!(reason);
        }
        Circuit::Paused { since } => {
            v["since"] = json!(rfc3339(*since));
            v["reason"] = json!("paused by an operator");
        }
        Circuit::Closed => {}
    }
    Ok(v)
}

async fn list(State(delivery): State<Arc<Delivery>>) -> ApiResult {
    let now = delivery.time.now_ms();
    let mut targets = Vec::new();
    for t in delivery.targets.view(now) {
        targets.push(view(&delivery, &t).await?);
    }
    Ok(Json(json!({ "targets": targets })))
}

async fn one(State(delivery): State<Arc<Delivery>>, Path(target): Path<String>) -> ApiResult {
    check(&target)?;
    let now = delivery.time.now_ms();
    let t = delivery.targets.view_one(&target, now);
    Ok(Json(view(&delivery, &t).await?))
}

async fn pause(State(delivery): State<Arc<Delivery>>, Path(target): Path<String>) -> ApiResult {
    check(&target)?;
    let changed = delivery.pause_target(&target).await;
    tracing::warn!(target_host = %target, "target paused by an operator");
    let t = delivery.targets.view_one(&target, delivery.time.now_ms());
    let mut v = view(&delivery, &t).await?;
    v["changed"] = json!(changed);
    Ok(Json(v))
}

async fn resume(State(delivery): State<Arc<Delivery>>, Path(target): Path<String>) -> ApiResult {
    check(&target)?;
    let changed = delivery.resume_target(&target).await;
    tracing::info!(target_host = %target, changed, "target resumed by an operator");
    let t = delivery.targets.view_one(&target, delivery.time.now_ms());
    let mut v = view(&delivery, &t).await?;
    v["changed"] = json!(changed);
    Ok(Json(v))
}
