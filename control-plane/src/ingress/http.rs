//! HTTP ingress: the Knocker protocol for clients without Envoy, on any method and path,
//! plus the status URL (through the shared submit path); `/knocker/…` and `GET /metrics`
//! go to the admin API.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::response::{IntoResponse as _, Response};
use axum::Router;
use bytes::Bytes;
use futures_util::StreamExt as _;
use http_body_util::BodyExt as _;
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

/// The HTTP door: every request is a Knocker submission, except `/knocker/…` API calls
/// (those without a `Knocker-Host` header; the status URL goes through the submit path)
/// and `GET /metrics`, which go to `api`.
///
/// Submissions are answered here, not through the API's router: a job costs no routing,
/// no middleware and no extractors (6% of the control plane's instructions per job went
/// there, `scripts/instructions-per-job.sh`).
pub struct Front {
    submitter: Arc<Submitter>,
    api: Router,
    limits: BodyLimits,
}

impl Front {
    pub fn new(submitter: Arc<Submitter>, api: Router, doors: &Doors) -> Self {
        Self {
            submitter,
            api,
            limits: BodyLimits {
                bytes: doors.max_body_bytes,
                time: doors.body_timeout,
            },
        }
    }

    async fn answer(&self, peer: SocketAddr, request: http::Request<Incoming>) -> Response {
        let (parts, body) = request.into_parts();
        let body = match read_body(body, self.limits).await {
            Ok(body) => body,
            Err(refused) => return refused,
        };
        let path = parts.uri.path();
        // `/metrics` without `Knocker-Host` could only be refused as a submission.
        let is_api = (path.starts_with("/knocker/") && path != self.submitter.status_url
            || path == "/metrics")
            && !parts.headers.contains_key("knocker-host");
        if is_api {
            let mut request = Request::from_parts(parts, Body::from(body));
            request.extensions_mut().insert(ConnectInfo(peer));
            return match self.api.clone().oneshot(request).await {
                Ok(response) => response,
                Err(infallible) => match infallible {},
            };
        }
        submit(&self.submitter, peer, parts, body).await
    }
}

#[derive(Clone, Copy)]
struct BodyLimits {
    bytes: usize,
    time: Duration,
}

/// Every request's body is read here, whole, within `KNOCKER_MAX_BODY_BYTES` (413) and
/// `KNOCKER_BODY_TIMEOUT` (408): a client that stalls in its body does not hold a
/// connection and a task for ever, on the submit path and the API alike.
async fn read_body(body: Incoming, limits: BodyLimits) -> Result<Bytes, Response> {
    let limited = http_body_util::Limited::new(body, limits.bytes);
    match tokio::time::timeout(limits.time, limited.collect()).await {
        Err(_) => {
            let reply = Reply::error(
                408,
                "body",
                &format!(
                    "The request body did not arrive within {:?} (KNOCKER_BODY_TIMEOUT).",
                    limits.time
                ),
            );
            Err(Reply::into_response(
                reply.with_header("connection", "close"),
            ))
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(Reply::into_response(
            Reply::error(413, "body", &body_too_large(limits.bytes)),
        )),
        Ok(Err(e)) => Err(Reply::into_response(Reply::error(
            400,
            "body",
            &format!("The request body could not be read: {e}."),
        ))),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// Serves `front` on `listener` until `shutdown`, with the connection limits of
/// [`super::conn`] and hyper's header deadline; then lets open requests finish (5 s at
/// most).
pub async fn serve(
    listener: TcpListener,
    front: Front,
    doors: &Doors,
    shutdown: CancellationToken,
) {
    let front = Arc::new(front);
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
        let front = Arc::clone(&front);
        let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
            let front = Arc::clone(&front);
            async move { Ok::<_, Infallible>(front.answer(peer, request).await) }
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

async fn submit(
    ingress: &Submitter,
    peer: SocketAddr,
    parts: http::request::Parts,
    body: Bytes,
) -> Response {
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
