//! Submit: the one path every request to be delivered takes, whichever door it came in
//! by — the gRPC one the Envoy filter calls and the HTTP one for clients without Envoy
//! (`crate::ingress`). The same request gets the same answer.
//!
//! A request a filter rule took over (capture, fallback) is built from its rule's policy
//! and answered `202` with the receipt; a broadcast rule fans out ([`broadcast`]).
//! Otherwise, order of checks (Knocker 1.4.1): status URL; `X-Knocker` loop guard (406); header
//! `Knocker-Broadcast` (fan-out to a group); validation (400, every failing header at
//! once); commit, then the receipt (200).
//! A failure to commit is a 503 with `Retry-After`, never a receipt ([`reply`]).

mod broadcast;
pub mod reply;

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde_json::json;
use tokio::sync::Notify;

use crate::broadcast::{agents::AgentBus, groups::Groups};
use crate::clock::Time;
use crate::job::receipt::receipt;
use crate::job::rule::build_rule_job;
use crate::job::rule::RuleMode;
use crate::job::spec::{build_job, unsafe_header, Defaults, Submission};
use crate::job::{Job, VERSION};
use crate::metrics::{self, Door, Mode};
use crate::redact;
use crate::store::{ClaimHealth, Inserted, Store, StoreError};
use crate::trace_context::{self, Kind as SpanKind, Span, Value};

pub use reply::Reply;

/// Everything the submit path needs.
pub struct Submitter {
    /// What a submission gets for the `Knocker-*` settings it leaves out.
    pub defaults: Defaults,
    /// The status URL's exact path (`STATUS_URL`).
    pub status_url: String,
    pub store: Arc<dyn Store>,
    pub time: Time,
    /// Wakes the delivery loop when a job is committed.
    pub wake: Arc<Notify>,
    /// Broadcast groups (`KNOCKER_CONFIG`).
    pub groups: Arc<Groups>,
    /// Agent groups' broadcasts (NATS engine only).
    pub agents: Option<Arc<AgentBus>>,
    /// Whether the store hands out due jobs: while it cannot, nothing is accepted.
    pub claims: Arc<ClaimHealth>,
}

impl Submitter {
    /// [`Self::submit`], counted in `knocker_submissions_total` by door, mode and answer,
    /// and timed from here to the answer in `knocker_submission_duration_seconds` (the
    /// status URL is not a submission).
    ///
    /// A submission is a span of the request's trace ([`trace_context::accept`]); its
    /// jobs keep that span's `traceparent`.
    pub async fn submit_by(&self, door: Door, mut submission: Submission) -> Reply {
        let Some(mode) = self.mode(&submission) else {
            return self.submit(submission).await;
        };
        let arrived = Instant::now();
        let start = SystemTime::now();
        let trace = trace_context::accept(&mut submission.headers);
        let tracestate = trace_context::tracestate(&submission.headers);
        let reply = self.submit(submission).await;
        let took = arrived.elapsed();
        metrics::get().submitted(door, mode, reply.status, took);
        if trace_context::enabled() {
            let mut attributes = vec![
                ("knocker.door", Value::Str(door.name().to_owned())),
                ("knocker.mode", Value::Str(mode.name().to_owned())),
                (
                    "http.response.status_code",
                    Value::Int(i64::from(reply.status)),
                ),
            ];
            if let Some(id) = reply.header("knocker-id") {
                attributes.push(("knocker.job_id", Value::Str(id.to_owned())));
            }
            trace_context::record(Span {
                name: "knocker.submit",
                kind: SpanKind::Server,
                trace,
                tracestate,
                start,
                end: start + took,
                attributes,
                error: (reply.status >= 500).then(|| format!("answered {}", reply.status)),
            });
        }
        reply
    }

    /// Why the request came: a filter rule's mode, a broadcast, or `Knocker-*` headers.
    fn mode(&self, submission: &Submission) -> Option<Mode> {
        if let Some(rule) = &submission.rule {
            return Some(match rule.mode {
                RuleMode::Capture => Mode::Capture,
                RuleMode::Fallback => Mode::Fallback,
            });
        }
        let broadcast = submission.broadcast_rule.is_some()
            || submission
                .headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("knocker-broadcast"));
        if broadcast {
            return Some(Mode::Broadcast);
        }
        let path_only = submission.path.split('?').next().unwrap_or_default();
        (path_only != self.status_url).then_some(Mode::Knock)
    }

    pub async fn submit(&self, submission: Submission) -> Reply {
        if let Some(reply) = refuse_unsafe(&submission) {
            return reply;
        }
        if let Some(rule) = &submission.rule {
            // A filter rule took the request over: no Knocker headers to read.
            let job = match build_rule_job(rule, &submission, self.time.now_ms(), new_id) {
                Ok(job) => job,
                Err(errors) => return Reply::invalid(&errors),
            };
            return self.commit(job, 202).await;
        }
        // The broadcast and status branches are boxed: every submission's future is as
        // large as its largest branch, and most submissions are one job.
        if let Some(b) = &submission.broadcast_rule {
            return Box::pin(self.broadcast(&submission, &b.group, Some(&b.rule), 202)).await;
        }
        let path_only = submission.path.split('?').next().unwrap_or_default();
        if path_only == self.status_url {
            return Box::pin(self.status()).await;
        }
        let loop_guard = submission.headers.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case("x-knocker") && !v.iter().all(u8::is_ascii_whitespace)
        });
        if loop_guard {
            return Reply::text(406, "Ignore requests from knocker");
        }
        let group = submission
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("knocker-broadcast"))
            .map(|(_, v)| String::from_utf8_lossy(v).trim().to_owned());
        if let Some(group) = group {
            return Box::pin(self.broadcast(&submission, &group, None, 200)).await;
        }
        let now = self.time.now_ms();
        let job = match build_job(&self.defaults, submission, now, new_id) {
            Ok(job) => job,
            Err(errors) => return Reply::invalid(&errors),
        };
        self.commit(job, 200).await
    }

    /// Commits the job; the receipt (with `status`) only once it is stored.
    ///
    /// An id that is already stored is not stored again, and its receipt describes the
    /// request just made, not the stored one: the same id reveals nothing of another
    /// client's request (its headers, its target) to whoever sends it.
    async fn commit(&self, job: Job, status: u16) -> Reply {
        if let Some(reply) = self.unclaimable() {
            return reply;
        }
        let asked = Reply::json(status, &receipt(&job));
        // The job is the store's once committed (it may go straight to delivery).
        let id = job.id.clone();
        let url = tracing::enabled!(tracing::Level::DEBUG).then(|| redact::url(&job.request.url));
        match self.store.insert(job).await {
            Ok(Inserted::Created) => {
                self.wake.notify_one();
                tracing::debug!(job_id = %id, url = url.as_deref().unwrap_or_default(), "job accepted");
                asked.with_header("knocker-id", id)
            }
            Ok(Inserted::Existing(_)) => asked.with_header("knocker-id", id),
            Err(e) => {
                tracing::error!(error = %e, "submission refused: the store cannot commit");
                Reply::from(&e)
            }
        }
    }

    /// A 503 while the store cannot hand out due jobs (a damaged database): a job taken
    /// now would wait for a repair, so the client is told to retry instead.
    fn unclaimable(&self) -> Option<Reply> {
        let why = self.claims.failing()?;
        Some(Reply::from(&StoreError::Unavailable(format!(
            "the store cannot hand out jobs ({why})"
        ))))
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
            Err(e) => Reply::from(&e),
        }
    }
}

/// A request whose method, path or headers hold what must never be stored or forwarded
/// (control characters, names that are not HTTP tokens): a 400 naming the field.
fn refuse_unsafe(submission: &Submission) -> Option<Reply> {
    if let Some((field, why)) = unsafe_header(&submission.headers) {
        return Some(Reply::error(400, &field, why));
    }
    let method_ok =
        !submission.method.is_empty() && submission.method.bytes().all(|b| b.is_ascii_graphic());
    if !method_ok {
        return Some(Reply::error(400, "method", "Not a valid HTTP method."));
    }
    if submission.path.bytes().any(|b| b <= 0x20 || b == 0x7f) {
        return Some(Reply::error(
            400,
            "path",
            "Control characters and spaces are not allowed.",
        ));
    }
    None
}

/// A new job id: 32 lower-case hex characters (a UUID without dashes), as Knocker's.
///
/// UUIDv7 rather than Knocker's v4: the ids of jobs accepted together sort together, so a
/// batch of new jobs extends the end of the store's id index instead of touching one
/// random index page per job (about a 4 KiB page written to the log for each).
pub fn new_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ingress() -> Submitter {
        Submitter {
            defaults: Defaults::default(),
            status_url: "/knocker/status".into(),
            store: Arc::new(crate::store::memory::MemoryStore::default()),
            time: Time::system(),
            wake: Arc::new(Notify::new()),
            groups: Arc::new(Groups::new(Default::default(), None).unwrap()),
            agents: None,
            claims: Arc::default(),
        }
    }

    fn submission(headers: &[(&str, &[u8])]) -> Submission {
        Submission {
            method: "POST".into(),
            path: "/p".into(),
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), v.to_vec()))
                .collect(),
            body: b"b".to_vec(),
            remote: None,
            authority: None,
            rule: None,
            broadcast_rule: None,
        }
    }

    #[tokio::test]
    async fn while_the_store_cannot_claim_nothing_is_accepted() {
        let ingress = ingress();
        let knock = || submission(&[("knocker-host", b"t.example")]);
        ingress.claims.failed(&StoreError::Unavailable(
            "database disk image is malformed".into(),
        ));
        let refused = ingress.submit(knock()).await;
        assert_eq!(refused.status, 503);
        assert!(String::from_utf8_lossy(&refused.body).contains("malformed"));
        assert_eq!(ingress.store.stats().await.unwrap().pending, 0);
        ingress.claims.claimed();
        assert_eq!(ingress.submit(knock()).await.status, 200);
    }

    #[tokio::test]
    async fn control_characters_are_refused_naming_the_field() {
        let ingress = ingress();
        let reply = ingress
            .submit(submission(&[
                ("knocker-host", b"t.example"),
                ("x-a", b"a\r\nx-b: 1"),
            ]))
            .await;
        assert_eq!(reply.status, 400);
        assert!(String::from_utf8_lossy(&reply.body).contains("x-a"));
        let mut bad_path = submission(&[("knocker-host", b"t.example")]);
        bad_path.path = "/a b".into();
        let reply = ingress.submit(bad_path).await;
        assert_eq!(reply.status, 400);
        assert!(String::from_utf8_lossy(&reply.body).contains("path"));
    }

    #[test]
    fn new_ids_are_knocker_shaped_and_sort_in_creation_order() {
        let ids: Vec<String> = (0..1000).map(|_| new_id()).collect();
        for id in &ids {
            assert_eq!(id.len(), 32, "{id}");
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        }
        // The store's id index relies on it: later ids sort after earlier ones.
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids out of order");
    }
}
