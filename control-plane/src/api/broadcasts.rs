//! `/knocker/broadcasts/{id}` (each member's job and its state) and `/knocker/groups`
//! (each group and its members now).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::{ApiError, ApiResult};
use crate::submit::Submitter;

pub fn router<S>(submit: Arc<Submitter>) -> Router<S> {
    Router::new()
        .route("/knocker/broadcasts/{id}", get(broadcast))
        .route("/knocker/groups", get(groups))
        .with_state(submit)
}

async fn broadcast(State(ingress): State<Arc<Submitter>>, Path(id): Path<String>) -> ApiResult {
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
async fn groups(State(ingress): State<Arc<Submitter>>) -> ApiResult {
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
                "max_age_s": config.delivery.max_age_s,
                "retries": config.delivery.retries,
            }),
        );
    }
    Ok(Json(json!({ "groups": out })))
}
