//! The receipt: given only once the job is committed.

use serde_json::{json, Value};

use super::{Headers, Job, VERSION};

/// The headers a receipt shows the target will get: `x-knocker`, then the forwarded ones.
pub fn header_list(forwarded: &Headers) -> Vec<Value> {
    let mut headers = vec![json!(["x-knocker", VERSION])];
    headers.extend(
        forwarded
            .iter()
            .map(|(name, value)| json!([name, String::from_utf8_lossy(value)])),
    );
    headers
}

/// The Knocker 1.4.1 receipt for a job (`200`, `"status": true`).
pub fn receipt(job: &Job) -> Value {
    let headers = header_list(&job.request.headers);
    json!({
        "status": true,
        "config": job.config,
        "url": job.request.url,
        "method": job.request.method,
        "headers": headers,
        "body-length": job.request.body.len(),
    })
}
