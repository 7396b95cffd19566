//! The HTTP transport: one attempt of a job's request through [`Outbound`] (the outbound
//! policy on every hop a client chose), and the one place that decides which Knocker
//! code a failure without an HTTP answer gets.

use std::error::Error as _;
use std::time::{Duration, Instant, SystemTime};

use http::header::{HeaderName, HeaderValue};

use super::attempt::{code, Outcome};
use super::backoff::parse_retry_after;
use super::signing::Signing;
use super::transport::Transport;
use crate::clock::Time;
use crate::job::{Job, Kind, VERSION};
use crate::outbound::{self, Failure, Outbound};
use crate::trace_context::{self, Accepted, Kind as SpanKind, Span, Value};

/// The headers a job is sent with: ours first, then the forwarded ones.
pub fn wire_headers(job: &Job) -> Vec<(String, Vec<u8>)> {
    let mut headers = Vec::with_capacity(job.request.headers.len() + 3);
    if job.kind == Kind::Callback {
        headers.push(("x-knocker-origin".to_owned(), b"knocker".to_vec()));
    }
    headers.push(("x-knocker".to_owned(), VERSION.as_bytes().to_vec()));
    headers.push((
        "x-knocker-id".to_owned(),
        job.knocker_id().as_bytes().to_vec(),
    ));
    headers.extend(job.request.headers.iter().cloned());
    headers
}

/// Targets, callbacks and webhooks: through the one door out, signed when a secret
/// applies (see [`super::signing`]).
pub struct Http {
    pub outbound: std::sync::Arc<Outbound>,
    pub signing: std::sync::Arc<Signing>,
    pub time: Time,
}

#[async_trait::async_trait]
impl Transport for Http {
    async fn send(&self, job: &Job) -> Outcome {
        let signed = self.signing.headers(job, self.time.now_ms() / 1000);
        // The target hears of this attempt's span, a child of the submission's.
        let trace = trace_context::attempt(&job.request.headers);
        let traceparent = trace.map(|t| t.span.header());
        let start = SystemTime::now();
        let outcome = send(
            &self.outbound,
            job,
            signed.as_ref().map_or(&[][..], |h| &h[..]),
            traceparent.as_deref(),
        )
        .await;
        if let Some(trace) = trace.filter(|_| trace_context::enabled()) {
            trace_context::record(attempt_span(job, trace, start, &outcome));
        }
        outcome
    }
}

/// An attempt as a span (OpenTelemetry's HTTP client conventions, the URL redacted).
fn attempt_span(job: &Job, trace: Accepted, start: SystemTime, outcome: &Outcome) -> Span {
    let mut attributes = vec![
        (
            "http.request.method",
            Value::Str(job.request.method.clone()),
        ),
        ("url.full", Value::Str(crate::redact::url(&job.request.url))),
        ("server.address", Value::Str(job.host().to_owned())),
        ("knocker.job_id", Value::Str(job.knocker_id().to_owned())),
        ("knocker.kind", Value::Str(job.kind.name().to_owned())),
        ("knocker.attempt", Value::Int(job.attempts.len() as i64 + 1)),
    ];
    if outcome.error.is_none() {
        attributes.push((
            "http.response.status_code",
            Value::Int(i64::from(outcome.status)),
        ));
    }
    let error = match &outcome.error {
        Some(e) => Some(e.clone()),
        None if outcome.status >= 400 => Some(format!("status {}", outcome.status)),
        None => None,
    };
    Span {
        name: "knocker.attempt",
        kind: SpanKind::Client,
        trace,
        tracestate: trace_context::tracestate(&job.request.headers),
        start,
        end: start + outcome.latency,
        attributes,
        error,
    }
}

/// Sends the job's request once, through the outbound policy when a client chose its
/// URL, with `extra` headers in front (a signature) and the attempt's `traceparent` in
/// place of the stored one.
pub async fn send(
    outbound: &Outbound,
    job: &Job,
    extra: &[(&'static str, String)],
    traceparent: Option<&str>,
) -> Outcome {
    let started = Instant::now();
    let fail = |status: u16, error: String| Outcome::failed(status, error, started.elapsed());
    let timeout = outbound::timeout(job.policy.timeout);
    if timeout.is_zero() {
        return fail(
            code::TIMEOUT,
            "timeout is 0: every attempt times out".into(),
        );
    }
    let Ok(method) = http::Method::from_bytes(job.request.method.as_bytes()) else {
        return fail(
            code::PROTOCOL,
            format!("invalid method {:?}", job.request.method),
        );
    };
    let mut headers = http::HeaderMap::with_capacity(job.request.headers.len() + 3 + extra.len());
    for (name, value) in extra {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(HeaderName::from_static(name), v);
        }
    }
    for (name, value) in wire_headers(job) {
        // Our signature replaces a forwarded one (unsigned, a forwarded one passes as is).
        if extra.iter().any(|(n, _)| *n == name) {
            continue;
        }
        let value = match traceparent {
            Some(t) if name == "traceparent" => t.as_bytes().to_vec(),
            _ => value,
        };
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(&value),
        ) {
            (Ok(n), Ok(v)) => {
                headers.append(n, v);
            }
            _ => tracing::warn!(job_id = %job.id, header = ?name, "header not sendable; left out"),
        }
    }
    let request = outbound::Request {
        method,
        url: job.request.url.clone(),
        headers,
        body: bytes::Bytes::from(job.request.body.clone()),
        timeout,
        trust: job.trust,
    };
    match outbound.send(request).await {
        Ok(response) => {
            let status = response.status().as_u16();
            let retry_after_s = if status == 429 || status == 503 {
                response
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()))
            } else {
                None
            };
            drain(response, timeout).await;
            Outcome {
                status,
                error: None,
                retry_after_s,
                latency: started.elapsed(),
                local_shortage: false,
            }
        }
        Err(failure) => {
            let (status, reason) = classify_failure(&failure);
            Outcome {
                local_shortage: is_local_shortage(&failure),
                ..fail(status, reason)
            }
        }
    }
}

/// Out of descriptors or buffers in this process: EMFILE, ENFILE, ENOBUFS, ENOMEM.
fn is_local_shortage(failure: &Failure) -> bool {
    let Failure::Transport(e) = failure else {
        return false;
    };
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(23 | 24 | 105 | 12)) {
                return true;
            }
        }
        source = s.source();
    }
    false
}

/// Knocker's code for a request that got no answer.
pub fn classify_failure(failure: &Failure) -> (u16, String) {
    match failure {
        Failure::Denied(_) => (code::DENIED, failure.to_string()),
        Failure::Timeout(_) => (code::TIMEOUT, failure.to_string()),
        Failure::TooManyRedirects(_) | Failure::BadUrl(_) => (code::PROTOCOL, failure.to_string()),
        Failure::Transport(e) => classify(e),
    }
}

/// Reads a little of the response so the connection can be reused; a large body is
/// not worth reading, the connection is dropped instead.
async fn drain(mut response: outbound::Response, timeout: Duration) {
    let mut left: usize = 64 * 1024;
    while let Ok(Ok(Some(chunk))) =
        tokio::time::timeout(timeout, outbound::chunk(&mut response)).await
    {
        match left.checked_sub(chunk.len()) {
            Some(rest) => left = rest,
            None => return,
        }
    }
}

/// The one place that maps a transport failure to Knocker's codes: refused 502, other
/// network errors 503, timeouts 504, protocol errors and unsupported schemes 418.
pub fn classify(e: &(dyn std::error::Error + 'static)) -> (u16, String) {
    let mut io_kind = None;
    let mut hyper_error = None;
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            io_kind.get_or_insert(io.kind());
        }
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            hyper_error.get_or_insert((
                h.is_parse() || h.is_parse_status() || h.is_parse_too_large(),
                h.to_string(),
            ));
        }
        source = s.source();
    }
    let reason = outbound::error_chain(e);
    if io_kind == Some(std::io::ErrorKind::TimedOut) {
        return (code::TIMEOUT, reason);
    }
    if io_kind == Some(std::io::ErrorKind::ConnectionRefused) {
        return (code::REFUSED, reason);
    }
    if let Some((true, _)) = hyper_error {
        return (code::PROTOCOL, reason);
    }
    (code::NETWORK, reason)
}
