//! The one submit path both ingresses call: the gRPC one ([`grpc`], for the Envoy
//! filter) and the HTTP one ([`http`], for clients without Envoy). Whatever the door,
//! the same request gets the same answer.
//!
//! A request a filter rule took over (capture, fallback) is built from its rule's policy
//! and answered `202` with the receipt. Otherwise, order of checks (Knocker 1.4.1): status URL; `X-Knocker` loop guard (406); header
//! validation (400, every failing header at once); commit, then the receipt (200).
//! A failure to commit is a 503 with `Retry-After`, never a receipt.

pub mod grpc;
pub mod http;

use std::sync::Arc;

use serde_json::json;
use tokio::sync::Notify;

use crate::clock::Time;
use crate::config::Settings;
use crate::job::receipt::receipt;
use crate::job::rule::build_rule_job;
use crate::job::spec::{build_job, Submission};
use crate::job::{Job, VERSION};
use crate::store::{Inserted, Store, StoreError};

/// The response for the client, whichever ingress it came through.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(status: u16, body: &serde_json::Value) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
        }
    }

    fn text(status: u16, body: &str) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())],
            body: body.as_bytes().to_vec(),
        }
    }

    /// A JSON error in Knocker's shape, naming the field.
    pub fn error(status: u16, field: &str, message: &str) -> Self {
        Self::json(
            status,
            &json!({ "errors": { field: [message] }, "status": false }),
        )
    }

    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// Seconds a client is asked to wait after a 503 from the store.
const RETRY_AFTER_S: &str = "1";

/// Everything the submit path needs.
pub struct Ingress {
    pub settings: Arc<Settings>,
    pub store: Arc<dyn Store>,
    pub time: Time,
    /// Wakes the delivery loop when a job is committed.
    pub wake: Arc<Notify>,
}

impl Ingress {
    pub async fn submit(&self, submission: Submission) -> Reply {
        if let Some(rule) = &submission.rule {
            // A filter rule took the request over: no Knocker headers to read.
            let job = match build_rule_job(rule, &submission, self.time.now_ms(), new_id) {
                Ok(job) => job,
                Err(errors) => return Reply::json(400, &errors.to_json()),
            };
            return self.commit(job, 202).await;
        }
        let path_only = submission.path.split('?').next().unwrap_or_default();
        if path_only == self.settings.status_url {
            return self.status().await;
        }
        let loop_guard = submission.headers.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case("x-knocker") && !v.iter().all(u8::is_ascii_whitespace)
        });
        if loop_guard {
            return Reply::text(406, "Ignore requests from knocker");
        }
        let now = self.time.now_ms();
        let job = match build_job(&self.settings, &submission, now, new_id) {
            Ok(job) => job,
            Err(errors) => return Reply::json(400, &errors.to_json()),
        };
        self.commit(job, 200).await
    }

    /// Commits the job; the receipt (with `status`) only once it is stored.
    async fn commit(&self, job: Job, status: u16) -> Reply {
        match self.store.insert(job).await {
            Ok(Inserted::Created(job)) => {
                self.wake.notify_one();
                tracing::debug!(job_id = %job.id, url = %job.request.url, "job accepted");
                Reply::json(status, &receipt(&job)).with_header("knocker-id", job.id.clone())
            }
            Ok(Inserted::Existing(job)) => {
                Reply::json(status, &receipt(&job)).with_header("knocker-id", job.id.clone())
            }
            Err(e) => {
                tracing::error!(error = %e, "submission refused: the store cannot commit");
                store_unavailable(&e)
            }
        }
    }

    async fn status(&self) -> Reply {
        match self.store.stats().await {
            Ok(stats) => Reply::json(
                200,
                &json!({
                    "status": true,
                    "processed": stats.delivered + stats.failed,
                    "tasks": stats.pending + stats.in_flight,
                    "version": VERSION,
                    "worker": std::process::id(),
                    "queue": stats,
                }),
            ),
            Err(e) => store_unavailable(&e),
        }
    }
}

fn store_unavailable(e: &StoreError) -> Reply {
    Reply::error(
        503,
        "store",
        &format!("{e}. Nothing was accepted; retry later."),
    )
    .with_header("retry-after", RETRY_AFTER_S)
}

/// A new job id: 32 lower-case hex characters (a UUID4 without dashes), as Knocker.
pub fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
