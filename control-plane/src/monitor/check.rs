//! One check: the monitor's request, its answer against the conditions.

use std::time::Instant;

use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::condition::{Check, Observed};
use super::history::CheckResult;
use super::MonitorConfig;
use crate::clock::Millis;
use crate::job::Trust;
use crate::outbound::{self, Outbound};

/// Most of an answer's body that conditions look at.
pub const MAX_BODY: usize = 1024 * 1024;

/// Sends the request once (through the outbound policy when a client chose the URL) and
/// judges the answer. A network error, a denied destination or a timeout is a failed
/// check whose reason is the error. `timeout_s` bounds the whole check.
pub async fn run(
    outbound: &Outbound,
    trust: Trust,
    config: &MonitorConfig,
    checks: &[Check],
    at: Millis,
) -> CheckResult {
    let started = Instant::now();
    let failed = |reason: String, status: Option<u16>, started: Instant| CheckResult {
        at,
        ok: false,
        status,
        latency_ms: started.elapsed().as_millis() as u64,
        failed_condition: Some(reason),
    };
    let timeout = outbound::timeout(config.timeout_s);
    let answer = tokio::time::timeout(timeout, request(outbound, trust, config, timeout)).await;
    let (status, body) = match answer {
        Err(_) => {
            return failed(
                format!("no answer: timed out after {timeout:?}"),
                None,
                started,
            )
        }
        Ok(Err((reason, status))) => return failed(reason, status, started),
        Ok(Ok(answer)) => answer,
    };
    let latency_ms = started.elapsed().as_millis() as u64;
    let seen = Observed {
        status,
        body: &body,
        latency_ms,
    };
    let failed_condition = checks.iter().find_map(|c| c.failure(&seen));
    CheckResult {
        at,
        ok: failed_condition.is_none(),
        status: Some(status),
        latency_ms,
        failed_condition,
    }
}

/// The answer's status and (the start of) its body, or why there is none.
async fn request(
    outbound: &Outbound,
    trust: Trust,
    config: &MonitorConfig,
    timeout: std::time::Duration,
) -> Result<(u16, Vec<u8>), (String, Option<u16>)> {
    let method = http::Method::from_bytes(config.method.as_bytes())
        .map_err(|_| (format!("invalid method {}", config.method), None))?;
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::USER_AGENT,
        HeaderValue::from_static(concat!("knocker-monitor/", env!("CARGO_PKG_VERSION"))),
    );
    for (name, value) in &config.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(n, v);
        }
    }
    let request = outbound::Request {
        method,
        url: config.url.clone(),
        headers,
        body: config.body.clone().unwrap_or_default().into(),
        timeout,
        trust,
    };
    let mut response = outbound.send(request).await.map_err(|failure| {
        let (_, reason) = crate::delivery::http::classify_failure(&failure);
        (format!("no answer: {reason}"), None)
    })?;
    let status = response.status().as_u16();
    let mut body = Vec::new();
    loop {
        match outbound::chunk(&mut response).await {
            Ok(Some(chunk)) => {
                body.extend_from_slice(&chunk);
                if body.len() >= MAX_BODY {
                    body.truncate(MAX_BODY);
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                let (_, reason) = crate::delivery::http::classify(&e);
                return Err((format!("body unreadable: {reason}"), Some(status)));
            }
        }
    }
    Ok((status, body))
}
