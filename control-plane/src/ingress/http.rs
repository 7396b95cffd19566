//! HTTP ingress: the Knocker protocol for clients without Envoy, on any method and path,
//! plus the status URL (through the shared submit path).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Router;

use super::grpc::body_too_large;
use super::{Ingress, Reply};
use crate::job::spec::Submission;

/// Every request is a Knocker submission, except `/knocker/…` API calls (those without
/// a `Knocker-Host` header; the status URL goes through the submit path).
pub fn router(ingress: Arc<Ingress>, monitors: Arc<crate::monitor::Monitors>) -> Router {
    let api = crate::api::router(Arc::clone(&ingress), monitors);
    Router::new()
        .fallback(move |state, peer, request: Request| dispatch(api.clone(), state, peer, request))
        .with_state(ingress)
}

async fn dispatch(
    api: Router,
    state: State<Arc<Ingress>>,
    peer: ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let path = request.uri().path();
    let is_api = path.starts_with("/knocker/")
        && path != state.0.settings.status_url
        && !request.headers().contains_key("knocker-host");
    if is_api {
        use tower::ServiceExt as _;
        return match api.oneshot(request).await {
            Ok(response) => response,
            Err(infallible) => match infallible {},
        };
    }
    submit(state, peer, request).await
}

async fn submit(
    State(ingress): State<Arc<Ingress>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let limit = ingress.settings.max_body_bytes;
    let body = match axum::body::to_bytes(body, limit).await {
        Ok(body) => body,
        Err(_) => return into_response(Reply::error(413, "body", &body_too_large(limit))),
    };
    let submission = Submission {
        method: parts.method.as_str().to_owned(),
        path: parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect(),
        body: body.to_vec(),
        remote: Some(peer.to_string()),
        authority: parts
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| parts.uri.authority().map(|a| a.as_str()))
            .map(str::to_owned),
        rule: None,
        broadcast_rule: None,
    };
    into_response(ingress.submit(submission).await)
}

pub fn into_response(reply: Reply) -> Response {
    let mut builder = Response::builder().status(reply.status);
    for (name, value) in &reply.headers {
        builder = builder.header(name, value);
    }
    builder.body(Body::from(reply.body)).unwrap_or_else(|_| {
        (http::StatusCode::INTERNAL_SERVER_ERROR, "invalid response").into_response()
    })
}
