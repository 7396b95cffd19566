//! The receipt: given only once the job is committed.

use serde_json::{json, Value};

use super::{Job, VERSION};

/// The Knocker 1.4.1 receipt for a job (`200`, `"status": true`).
pub fn receipt(job: &Job) -> Value {
    let mut headers = vec![json!(["x-knocker", VERSION])];
    headers.extend(
        job.request
            .headers
            .iter()
            .map(|(name, value)| json!([name, String::from_utf8_lossy(value)])),
    );
    json!({
        "status": true,
        "config": job.config,
        "url": job.request.url,
        "method": job.request.method,
        "headers": headers,
        "body-length": job.request.body.len(),
    })
}
