//! One check: the monitor's request, its answer against the conditions.

use std::time::{Duration, Instant};

use super::condition::{Check, Observed};
use super::store::CheckResult;
use super::MonitorConfig;
use crate::clock::Millis;

/// Most of an answer's body that conditions look at.
pub const MAX_BODY: usize = 1024 * 1024;

/// Sends the request once and judges the answer. A network error or timeout is a
/// failed check whose reason is the error.
pub async fn run(
    client: &reqwest::Client,
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
    let method = match reqwest::Method::from_bytes(config.method.as_bytes()) {
        Ok(m) => m,
        Err(_) => return failed(format!("invalid method {}", config.method), None, started),
    };
    let mut request = client
        .request(method, &config.url)
        .timeout(Duration::from_secs_f64(config.timeout_s));
    for (name, value) in &config.headers {
        request = request.header(name, value);
    }
    if let Some(body) = &config.body {
        request = request.body(body.clone());
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            let (_, reason) = crate::delivery::attempt::classify(&e);
            return failed(format!("no answer: {reason}"), None, started);
        }
    };
    let status = response.status().as_u16();
    let mut body = Vec::new();
    let mut response = response;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                body.extend_from_slice(&chunk);
                if body.len() >= MAX_BODY {
                    body.truncate(MAX_BODY);
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                let (_, reason) = crate::delivery::attempt::classify(&e);
                return failed(format!("body unreadable: {reason}"), Some(status), started);
            }
        }
    }
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
