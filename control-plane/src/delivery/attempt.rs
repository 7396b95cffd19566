//! One delivery attempt over HTTP, and the one place that decides what a failure is.

use std::collections::HashMap;
use std::error::Error as _;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use reqwest::header::{HeaderName, HeaderValue};

use super::backoff::parse_retry_after;
use crate::job::{Job, Kind, VERSION};

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The HTTP status, or Knocker's code for a failure without one.
    pub status: u16,
    /// Why there was no HTTP status.
    pub error: Option<String>,
    /// `Retry-After` of a 429/503, in seconds.
    pub retry_after_s: Option<f64>,
    pub latency: Duration,
}

impl Outcome {
    pub fn is_success(&self) -> bool {
        self.error.is_none() && (200..300).contains(&self.status)
    }
}

/// Knocker's codes for failures without an HTTP response.
pub mod code {
    pub const REFUSED: u16 = 502;
    pub const NETWORK: u16 = 503;
    pub const TIMEOUT: u16 = 504;
    pub const PROTOCOL: u16 = 418;
}

/// HTTP clients, one per per-attempt timeout: `timeout` bounds the connect and each read
/// as in Knocker 1.4.1, which reqwest sets per client. No cookie store: jobs share none.
pub struct Clients {
    max_redirects: usize,
    by_timeout_ms: Mutex<HashMap<u64, reqwest::Client>>,
}

impl Clients {
    pub fn new(max_redirects: u32) -> Self {
        Self {
            max_redirects: max_redirects as usize,
            by_timeout_ms: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
        let key = timeout.as_millis() as u64;
        if let Some(client) = self.by_timeout_ms.lock().get(&key) {
            return Ok(client.clone());
        }
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            .read_timeout(timeout)
            .redirect(reqwest::redirect::Policy::limited(self.max_redirects))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        self.by_timeout_ms.lock().insert(key, client.clone());
        Ok(client)
    }
}

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

/// How attempts leave the process: HTTP in production, a fake in schedule tests.
#[async_trait::async_trait]
pub trait Transport: Send + Sync + 'static {
    async fn send(&self, job: &Job) -> Outcome;
}

#[async_trait::async_trait]
impl Transport for Clients {
    async fn send(&self, job: &Job) -> Outcome {
        send(self, job).await
    }
}

/// Attempts by kind: email notifications over SMTP, everything else over HTTP.
pub struct Dispatch {
    pub http: Clients,
    pub mail: crate::notify::email::Mailer,
}

#[async_trait::async_trait]
impl Transport for Dispatch {
    async fn send(&self, job: &Job) -> Outcome {
        match job.kind {
            Kind::Email => self.mail.send(job).await,
            Kind::Target | Kind::Callback => send(&self.http, job).await,
        }
    }
}

/// Sends the job's request once.
pub async fn send(clients: &Clients, job: &Job) -> Outcome {
    let started = Instant::now();
    let fail = |status: u16, error: String| Outcome {
        status,
        error: Some(error),
        retry_after_s: None,
        latency: started.elapsed(),
    };
    if job.policy.timeout <= 0.0 {
        return fail(
            code::TIMEOUT,
            "timeout is 0: every attempt times out".into(),
        );
    }
    let timeout = Duration::from_secs_f64(job.policy.timeout);
    let client = match clients.get(timeout) {
        Ok(client) => client,
        Err(e) => return fail(code::PROTOCOL, format!("cannot build an HTTP client: {e}")),
    };
    let Ok(method) = reqwest::Method::from_bytes(job.request.method.as_bytes()) else {
        return fail(
            code::PROTOCOL,
            format!("invalid method {:?}", job.request.method),
        );
    };
    let mut headers = reqwest::header::HeaderMap::with_capacity(job.request.headers.len() + 3);
    for (name, value) in wire_headers(job) {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(&value),
        ) {
            (Ok(n), Ok(v)) => {
                headers.append(n, v);
            }
            _ => tracing::warn!(job_id = %job.id, header = %name, "header not sendable; left out"),
        }
    }
    let request = client
        .request(method, &job.request.url)
        .headers(headers)
        .body(job.request.body.clone());
    match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let retry_after_s = if status == 429 || status == 503 {
                response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()))
            } else {
                None
            };
            drain(response).await;
            Outcome {
                status,
                error: None,
                retry_after_s,
                latency: started.elapsed(),
            }
        }
        Err(e) => {
            let (status, reason) = classify(&e);
            fail(status, reason)
        }
    }
}

/// Reads a little of the response so the connection can be reused; a large body is
/// not worth reading, the connection is dropped instead.
async fn drain(mut response: reqwest::Response) {
    let mut left: usize = 64 * 1024;
    while let Ok(Some(chunk)) = response.chunk().await {
        match left.checked_sub(chunk.len()) {
            Some(rest) => left = rest,
            None => return,
        }
    }
}

/// The one place that maps a transport failure to Knocker's codes: refused 502, other
/// network errors 503, timeouts 504, protocol errors and unsupported schemes 418.
pub fn classify(e: &reqwest::Error) -> (u16, String) {
    let mut io_kind = None;
    let mut hyper_error = None;
    let mut source = e.source();
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
    let reason = error_chain(e);
    if e.is_timeout() || io_kind == Some(std::io::ErrorKind::TimedOut) {
        return (code::TIMEOUT, reason);
    }
    if io_kind == Some(std::io::ErrorKind::ConnectionRefused) {
        return (code::REFUSED, reason);
    }
    if e.is_builder() || e.is_redirect() {
        return (code::PROTOCOL, reason);
    }
    if let Some((true, _)) = hyper_error {
        return (code::PROTOCOL, reason);
    }
    (code::NETWORK, reason)
}

fn error_chain(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
