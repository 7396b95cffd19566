//! HTTP ingress: the Knocker protocol for clients without Envoy, on any method and path,
//! plus the status URL (through the shared submit path); `/knocker/…` and `GET /metrics`
//! go to the admin API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures_util::StreamExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use super::{body_too_large, Doors};
use crate::job::spec::Submission;
use crate::metrics::Door;
use crate::submit::{Reply, Submitter};

/// Every request is a Knocker submission, except `/knocker/…` API calls (those without
/// a `Knocker-Host` header; the status URL goes through the submit path), which go to
/// `api`.
pub fn router(ingress: Arc<Submitter>, api: Router, doors: &Doors) -> Router {
    let limits = BodyLimits {
        bytes: doors.max_body_bytes,
        time: doors.body_timeout,
    };
    Router::new()
        .fallback(move |state, peer, request: Request| dispatch(api.clone(), state, peer, request))
        .layer(axum::middleware::from_fn_with_state(limits, read_body))
        .with_state(ingress)
}

#[derive(Clone, Copy)]
struct BodyLimits {
    bytes: usize,
    time: Duration,
}

/// Every request's body is read here, whole, within `KNOCKER_MAX_BODY_BYTES` (413) and
/// `KNOCKER_BODY_TIMEOUT` (408): a client that stalls in its body does not hold a
/// connection and a task for ever, on the submit path and the API alike.
async fn read_body(State(limits): State<BodyLimits>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let body = match tokio::time::timeout(limits.time, axum::body::to_bytes(body, limits.bytes))
        .await
    {
        Err(_) => {
            let reply = Reply::error(
                408,
                "body",
                &format!(
                    "The request body did not arrive within {:?} (KNOCKER_BODY_TIMEOUT).",
                    limits.time
                ),
            );
            return Reply::into_response(reply.with_header("connection", "close"));
        }
        Ok(Err(_)) => {
            return Reply::into_response(Reply::error(413, "body", &body_too_large(limits.bytes)))
        }
        Ok(Ok(body)) => body,
    };
    next.run(Request::from_parts(parts, Body::from(body))).await
}

/// Serves the router on `listener` until `shutdown`, with the connection limits of
/// [`super::conn`] and hyper's header deadline; then lets open requests finish (5 s at
/// most).
pub async fn serve(listener: TcpListener, app: Router, doors: &Doors, shutdown: CancellationToken) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(doors.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(doors.idle_timeout / 3);
    let graceful = GracefulShutdown::new();
    let incoming = super::conn::accept(listener, doors.max_connections, doors.idle_timeout);
    tokio::pin!(incoming);
    loop {
        let next = tokio::select! {
            next = incoming.next() => next,
            () = shutdown.cancelled() => break,
        };
        let Some(Ok(io)) = next else { break };
        let peer = io.peer();
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(request.map(Body::new))
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open 5 s after shutdown; closing them");
    }
}

async fn dispatch(
    api: Router,
    state: State<Arc<Submitter>>,
    peer: ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let path = request.uri().path();
    // `/metrics` without `Knocker-Host` could only be refused as a submission.
    let is_api = (path.starts_with("/knocker/") && path != state.0.status_url
        || path == "/metrics")
        && !request.headers().contains_key("knocker-host");
    if is_api {
        return match api.oneshot(request).await {
            Ok(response) => response,
            Err(infallible) => match infallible {},
        };
    }
    submit(state, peer, request).await
}

async fn submit(
    State(ingress): State<Arc<Submitter>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    // Read whole, within the limits, by `read_body` already.
    let body = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(body) => body,
        Err(e) => return Reply::into_response(Reply::error(400, "body", &e.to_string())),
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
    Reply::into_response(ingress.submit_by(Door::Http, submission).await)
}
