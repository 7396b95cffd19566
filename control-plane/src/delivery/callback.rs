//! The failure callback: after a job's last attempt fails, a new job POSTs a report to
//! `Knocker-Callback`. It is stored and retried like any job, with the job's policy, and
//! never has a callback of its own.

use serde_json::json;

use crate::clock::Millis;
use crate::job::{Job, Kind, Policy, Request, CALLBACK_SUFFIX};

/// The callback job for `job`, failed with `status_code`; `None` without a callback URL
/// or when `job` is itself a callback.
pub fn callback_job(job: &Job, status_code: u16, now: Millis) -> Option<Job> {
    if job.kind == Kind::Callback {
        return None;
    }
    let url = job.policy.callback.clone()?;
    let mut config = job.config.clone();
    config.remove("callback");
    let body = json!({
        "url": job.request.url,
        "method": job.request.method,
        "config": config,
        "status_code": status_code,
    });
    // The forwarded headers, except the body's type: the callback's body is JSON.
    let mut headers: Vec<(String, Vec<u8>)> = job
        .request
        .headers
        .iter()
        .filter(|(n, _)| n != "content-type")
        .cloned()
        .collect();
    headers.push(("content-type".to_owned(), b"application/json".to_vec()));
    let request = Request {
        method: "POST".into(),
        url,
        headers,
        body: body.to_string().into_bytes(),
    };
    let policy = Policy {
        callback: None,
        // A job with a maximum age gives its callback the same age, from now.
        deadline: job
            .policy
            .deadline
            .map(|d| now + d.saturating_sub(job.created_at)),
        // Its source's rate limits the source's target, not the callback's.
        rate: None,
        ..job.policy.clone()
    };
    // A callback goes to another URL: it is never held up by its job's lane.
    let id = format!("{}{CALLBACK_SUFFIX}", job.id);
    let callback = Job::new_pending(
        id,
        Kind::Callback,
        request,
        policy,
        job.policy.callback_trust,
        now,
    );
    Some(callback.with_config(job.config.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::http::wire_headers;
    use crate::job::{test_job, State};

    fn job(callback: Option<&str>) -> Job {
        let mut job = test_job("j1", "PUT", "http://t/x?y");
        job.request.headers = vec![
            ("content-type".into(), b"text/plain".to_vec()),
            ("x-a".into(), b"1".to_vec()),
        ];
        job.request.body = b"payload".to_vec();
        job.policy = Policy {
            timeout: 2.0,
            retries: 3,
            backoff_factor: 0.1,
            callback: callback.map(Into::into),
            deadline: None,
            max_backoff_s: None,
            callback_trust: crate::job::Trust::Operator,
            retry: crate::job::retry::RetryRules::default(),
            source: None,
            rate: None,
        };
        job.config.insert("callback".into(), json!(callback));
        job.config.insert("id".into(), json!("j1"));
        job.state = State::Failed;
        job
    }

    #[test]
    fn callback_reports_the_failure() {
        let cb = callback_job(&job(Some("http://cb/hook")), 503, 42).unwrap();
        assert_eq!(cb.id, "j1:callback");
        assert_eq!(cb.request.method, "POST");
        assert_eq!(cb.request.url, "http://cb/hook");
        assert_eq!(
            cb.policy,
            Policy {
                timeout: 2.0,
                retries: 3,
                backoff_factor: 0.1,
                callback: None,
                deadline: None,
                max_backoff_s: None,
                callback_trust: crate::job::Trust::Operator,
                retry: crate::job::retry::RetryRules::default(),
                source: None,
                rate: None,
            }
        );
        let body: serde_json::Value = serde_json::from_slice(&cb.request.body).unwrap();
        assert_eq!(
            body,
            json!({"url": "http://t/x?y", "method": "PUT", "config": {"id": "j1"}, "status_code": 503})
        );
        let names: Vec<String> = wire_headers(&cb).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "x-knocker-origin",
                "x-knocker",
                "x-knocker-id",
                "x-a",
                "content-type"
            ]
        );
        assert_eq!(cb.knocker_id(), "j1");
        assert_eq!(cb.next_attempt_at, 42);
    }

    #[test]
    fn no_callback_without_url_or_for_a_callback() {
        assert!(callback_job(&job(None), 503, 0).is_none());
        let cb = callback_job(&job(Some("http://cb/")), 503, 0).unwrap();
        assert!(callback_job(&cb, 503, 0).is_none());
    }
}
